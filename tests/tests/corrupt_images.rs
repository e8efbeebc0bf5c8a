//! Hostile and broken images: each must give a typed error, none may crash
//! the process, and an export already being served keeps working meanwhile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use integration_tests::support::{export, qemu_img_create, require, run_ok, TestServer};
use nbd_server::MemoryBackend;
use qcow_backend::header::HeaderError;
use qcow_backend::{open_image, BackingPolicy, ImageError, ImageErrorKind, OpenOptions};

const MIB: u64 = 1 << 20;

async fn qemu_image(dir: &Path, name: &str, extra: &[&str]) -> PathBuf {
    let p = dir.join(name);
    qemu_img_create(&p, Some("4M"), None, extra).await;
    p
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

async fn open_err(path: &Path) -> ImageError {
    match open_image(path, &OpenOptions::new()).await {
        Ok(_) => panic!("{} opened", path.display()),
        Err(e) => e,
    }
}

fn header_err(e: &ImageError) -> &HeaderError {
    match e {
        ImageError::Header { source, .. } => source,
        other => panic!("expected a header error, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_images_are_refused_while_serving_continues() {
    if !require("qemu-img") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A healthy export served all along.
    let mem = Arc::new(MemoryBackend::new(MIB));
    let srv = TestServer::start(vec![export("ok", mem)]).await;

    // Truncated to less than a header: not qcow2 magic... it is, so header check.
    let p = qemu_image(d, "trunc.qcow2", &[]).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(100)
        .unwrap();
    let e = open_err(&p).await;
    assert!(
        matches!(
            header_err(&e),
            HeaderError::Invalid(_) | HeaderError::Truncated(_)
        ),
        "{e}"
    );

    // Truncated inside the metadata tables.
    let p = qemu_image(d, "trunc2.qcow2", &[]).await;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&p)
        .unwrap()
        .set_len(70_000)
        .unwrap();
    let e = open_err(&p).await;
    assert_eq!(e.kind(), ImageErrorKind::BadImage, "{e}");

    // Bad header fields.
    let p = qemu_image(d, "version.qcow2", &[]).await;
    patch(&p, 4, &9u32.to_be_bytes());
    assert_eq!(header_err(&open_err(&p).await), &HeaderError::Version(9));
    let p = qemu_image(d, "cbits.qcow2", &[]).await;
    patch(&p, 20, &30u32.to_be_bytes());
    assert_eq!(
        header_err(&open_err(&p).await),
        &HeaderError::ClusterBits(30)
    );
    let p = qemu_image(d, "size.qcow2", &[]).await;
    patch(&p, 24, &u64::MAX.to_be_bytes());
    assert!(matches!(
        header_err(&open_err(&p).await),
        HeaderError::Invalid(_)
    ));

    // L1 and refcount tables outside the file.
    let p = qemu_image(d, "l1.qcow2", &[]).await;
    patch(&p, 40, &(1u64 << 40).to_be_bytes());
    assert!(matches!(header_err(&open_err(&p).await), HeaderError::Invalid(m) if m.contains("L1")));
    let p = qemu_image(d, "rt.qcow2", &[]).await;
    patch(&p, 48, &(1u64 << 40).to_be_bytes());
    assert!(
        matches!(header_err(&open_err(&p).await), HeaderError::Invalid(m) if m.contains("refcount"))
    );
    let p = qemu_image(d, "rtzero.qcow2", &[]).await;
    patch(&p, 56, &0u32.to_be_bytes());
    assert!(matches!(
        header_err(&open_err(&p).await),
        HeaderError::Invalid(_)
    ));

    // Dirty and corrupt bits.
    let p = qemu_image(d, "dirty.qcow2", &[]).await;
    patch(&p, 72, &1u64.to_be_bytes());
    assert_eq!(header_err(&open_err(&p).await), &HeaderError::Dirty);

    // Encrypted (LUKS) image, made by qemu-img itself.
    let p = qemu_image(
        d,
        "luks.qcow2",
        &[
            "--object",
            "secret,id=sec0,data=123456",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
        ],
    )
    .await;
    assert!(matches!(
        header_err(&open_err(&p).await),
        HeaderError::Encrypted(_)
    ));

    // Internal snapshot.
    let p = qemu_image(d, "snap.qcow2", &[]).await;
    run_ok("qemu-img", &["snapshot", "-c", "s1", p.to_str().unwrap()]).await;
    assert!(matches!(
        header_err(&open_err(&p).await),
        HeaderError::Unsupported(_)
    ));

    // A backing file that names itself: make top -> base.qcow2, then move top
    // onto that name.
    let base = qemu_image(d, "self.qcow2", &[]).await;
    let top = d.join("self-top.qcow2");
    qemu_img_create(&top, None, Some(("self.qcow2", "qcow2")), &[]).await;
    std::fs::rename(&top, &base).unwrap();
    let e = open_err(&base).await;
    assert!(matches!(e, ImageError::BackingLoop { .. }), "{e}");

    // A backing file outside the allowed directories.
    let p = d.join("passwd.qcow2");
    qemu_img_create(&p, Some("1M"), Some(("/etc/passwd", "raw")), &[]).await;
    let e = open_err(&p).await;
    assert!(matches!(e, ImageError::BackingNotAllowed { .. }), "{e}");
    // ...also through a relative name climbing out.
    let sub = d.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let _outside = qemu_image(d, "outside.qcow2", &[]).await;
    let p = sub.join("climb.qcow2");
    qemu_img_create(&p, None, Some(("../outside.qcow2", "qcow2")), &[]).await;
    let e = open_image(&p, &OpenOptions::new()).await.err().unwrap();
    assert!(matches!(e, ImageError::BackingNotAllowed { .. }), "{e}");
    // Allowed once the parent directory is whitelisted.
    let policy = BackingPolicy::within([d.canonicalize().unwrap()]);
    assert!(open_image(&p, &OpenOptions::new().policy(policy))
        .await
        .is_ok());

    // Backing file missing, or with no recorded format (never probed).
    let p = d.join("missing.qcow2");
    qemu_img_create(&p, Some("1M"), Some(("gone.qcow2", "qcow2")), &["-u"]).await;
    assert!(matches!(
        open_err(&p).await,
        ImageError::BackingMissing { .. }
    ));
    let base = qemu_image(d, "nofmt-base.qcow2", &[]).await;
    let p = d.join("nofmt.qcow2");
    qemu_img_create(
        &p,
        None,
        Some((base.file_name().unwrap().to_str().unwrap(), "qcow2")),
        &[],
    )
    .await;
    // Turn the backing-format extension into the end-of-extensions marker.
    let head = std::fs::read(&p).unwrap();
    let at = head
        .windows(4)
        .position(|w| w == [0xe2, 0x79, 0x2a, 0xca])
        .unwrap();
    patch(&p, at as u64, &[0, 0, 0, 0]);
    assert!(matches!(
        open_err(&p).await,
        ImageError::BackingFormatMissing { .. }
    ));

    // Not an image at all is served as raw (content detection), not an error.
    let junk = d.join("junk.bin");
    std::fs::write(&junk, vec![0x41u8; 8192]).unwrap();
    let (b, fmt) = open_image(&junk, &OpenOptions::new()).await.unwrap();
    assert_eq!(fmt, qcow_backend::ImageFormat::Raw);
    assert_eq!(b.size(), 8192);

    // Through all of that, the served export kept working.
    run_ok("nbdinfo", &["--size", &srv.uri("ok")]).await;
}

/// Hand-crafted images with inconsistent metadata (found while fuzzing): each
/// opened, wrote and closed "successfully" before metadata-layout checks
/// existed, with imago writing guest data over the header or tables. Now
/// every one is refused before imago sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_with_overlapping_or_unreferenced_metadata_are_refused() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/qcow2_open");
    let dir = tempfile::tempdir().unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&corpus).unwrap() {
        let p = entry.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_owned();
        if !name.starts_with("crafted-") {
            continue;
        }
        seen += 1;
        let img = dir.path().join(&name);
        std::fs::copy(&p, &img).unwrap();
        match open_image(&img, &OpenOptions::new()).await {
            Ok(_) => panic!("{name} was accepted"),
            Err(e) => assert_eq!(e.kind(), ImageErrorKind::BadImage, "{name}: {e}"),
        }
    }
    assert!(seen >= 8, "crafted images missing from the corpus");
}
