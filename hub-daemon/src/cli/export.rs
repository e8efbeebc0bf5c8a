//! `hub-daemon export`: serve image files over NBD in the foreground.
//!
//! Takes its own form (`--listen ADDR NAME=PATH ...`) and the qemu-nbd flags
//! the backup scripts use (`-f qcow2 -x NAME -p PORT -b ADDR [-t] [-r]
//! IMAGE`), so it can replace `qemu-nbd` in those scripts unchanged.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use disk_digest::{DigestBackend, DigestChain};
use nbd_server::{BlockBackend, Export, Server};
use qcow_backend::{
    open_image, BackingPolicy, CreateOptions, ImageFormat, OpenOptions, QcowBackend,
};

use super::limits::LimitArgs;
use super::size::parse_size;
use super::tls::TlsArgs;
use crate::config::NbdLimits;

/// Serve image files (qcow2 detected by content, else raw) until SIGINT or
/// SIGTERM, then flush and exit 0.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Address to listen on (the first port with --port-per-export).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// qemu-nbd style bind address (default 127.0.0.1).
    #[arg(short = 'b', long = "bind", value_name = "ADDR")]
    bind: Option<IpAddr>,
    /// qemu-nbd style port (default 10809).
    #[arg(short = 'p', long = "port")]
    port: Option<u16>,
    /// qemu-nbd style export name for a single bare IMAGE.
    #[arg(short = 'x', long = "export-name")]
    export_name: Option<String>,
    /// Expected image format (qcow2 or raw); checked against the content.
    #[arg(short = 'f', long = "format")]
    format: Option<String>,
    /// Refuse writes.
    #[arg(short = 'r', long = "readonly", visible_alias = "read-only")]
    readonly: bool,
    /// Accepted for qemu-nbd compatibility: this server always persists
    /// across client connections.
    #[arg(short = 't', long = "persistent")]
    persistent: bool,
    /// Accepted for qemu-nbd compatibility: any number of clients may
    /// connect (multi-conn is advertised).
    #[arg(short = 'e', long = "shared", value_name = "N")]
    shared: Option<u32>,
    /// Give each export its own port, counting up from the listen port.
    #[arg(long)]
    port_per_export: bool,
    /// Create each image first as a fresh qcow2 of SIZE (e.g. 10G); the file
    /// must not exist.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    create: Option<u64>,
    /// Create each image first as a qcow2 overlay on PARENT (an incremental).
    #[arg(long, value_name = "PARENT")]
    backing: Option<PathBuf>,
    /// Directory backing files may come from (repeatable; the image's own
    /// directory is always allowed).
    #[arg(long, value_name = "DIR")]
    allow_backing_dir: Vec<PathBuf>,
    /// Record a `blake3-tree-v1` digest of what clients write: a sidecar
    /// `PATH.digest` is kept beside each image and the digest is printed
    /// as `digest NAME HEX` on exit. The image must start out reading as
    /// zeroes (a fresh image), or as its parent with --backing (whose
    /// `.digest` sidecar is then required). Measures the hub's
    /// digest-on-ingest path outside the API.
    #[arg(long)]
    digest: bool,
    /// NBD memory and connection limits.
    #[command(flatten)]
    limits: LimitArgs,
    /// NBD over TLS.
    #[command(flatten)]
    tls: TlsArgs,
    /// Answer NBD_OPT_LIST with an empty list (listing is on by default,
    /// as with qemu-nbd).
    #[arg(long)]
    no_list: bool,
    /// Description sent to clients for every export (default: the export
    /// name; image paths are never sent).
    #[arg(long, value_name = "TEXT")]
    description: Option<String>,
    /// NAME=PATH pairs, or one bare PATH (named by -x, else its file name).
    /// PATH may also be `null:SIZE` (discards writes, reads zeroes) or
    /// `memory:SIZE` (sparse RAM disk).
    #[arg(required = true, value_name = "NAME=PATH")]
    images: Vec<String>,
}

/// One export to serve.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Spec {
    name: String,
    path: PathBuf,
}

fn parse_specs(images: &[String], export_name: Option<&str>) -> anyhow::Result<Vec<Spec>> {
    let mut specs = Vec::new();
    for arg in images {
        let spec = match arg.split_once('=') {
            Some((name, path)) if !name.is_empty() && !path.is_empty() => Spec {
                name: name.to_owned(),
                path: PathBuf::from(path),
            },
            Some(_) => bail!("bad export {arg:?}: expected NAME=PATH"),
            None => {
                if images.len() != 1 {
                    bail!("bare image {arg:?}: use NAME=PATH when serving several images");
                }
                let path = PathBuf::from(arg);
                let name = match export_name {
                    Some(n) => n.to_owned(),
                    None => path
                        .file_name()
                        .and_then(|n| n.to_str())
                        .unwrap_or("disk")
                        .to_owned(),
                };
                Spec { name, path }
            }
        };
        if specs.iter().any(|s: &Spec| s.name == spec.name) {
            bail!("export name {:?} given twice", spec.name);
        }
        specs.push(spec);
    }
    Ok(specs)
}

fn listen_addr(args: &ExportArgs) -> SocketAddr {
    args.listen.unwrap_or_else(|| {
        SocketAddr::new(
            args.bind.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            args.port.unwrap_or(10809),
        )
    })
}

/// `null:SIZE` and `memory:SIZE` pseudo-images: a disk that discards
/// writes and reads zeroes, or a sparse RAM disk (for benchmarks and tests).
fn pseudo_image(path: &Path) -> anyhow::Result<Option<Arc<dyn nbd_server::BlockBackend>>> {
    let Some(s) = path.to_str() else {
        return Ok(None);
    };
    if let Some(size) = s.strip_prefix("null:") {
        let size = parse_size(size).map_err(anyhow::Error::msg)?;
        return Ok(Some(Arc::new(nbd_server::NullBackend::with_dense_reads(
            size,
        ))));
    }
    if let Some(size) = s.strip_prefix("memory:") {
        let size = parse_size(size).map_err(anyhow::Error::msg)?;
        return Ok(Some(Arc::new(nbd_server::MemoryBackend::new(size))));
    }
    Ok(None)
}

async fn prepare(
    spec: &Spec,
    args: &ExportArgs,
) -> anyhow::Result<(Arc<dyn nbd_server::BlockBackend>, ImageFormat)> {
    if let Some(b) = pseudo_image(&spec.path)? {
        return Ok((b, ImageFormat::Raw));
    }
    let mut dirs: Vec<PathBuf> = args
        .allow_backing_dir
        .iter()
        .map(|d| {
            d.canonicalize()
                .with_context(|| format!("backing dir {}", d.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    let image_dir = spec
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Ok(d) = image_dir.canonicalize() {
        dirs.push(d);
    }
    if let Some(parent) = &args.backing {
        if let Some(d) = parent
            .canonicalize()
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
        {
            dirs.push(d);
        }
    }
    let opts = OpenOptions::new()
        .read_only(args.readonly)
        .policy(BackingPolicy::within(dirs));
    if args.create.is_some() || args.backing.is_some() {
        let create = CreateOptions {
            size: args.create,
            cluster_size: qcow_backend::DEFAULT_CLUSTER_SIZE,
            backing: args.backing.clone(),
            backing_format: None,
        };
        let q = QcowBackend::create(&spec.path, &create, &opts)
            .await
            .with_context(|| format!("creating {}", spec.path.display()))?;
        // close() releases the image (and its lock) before it is reopened below.
        q.close()
            .await
            .with_context(|| format!("closing {}", spec.path.display()))?;
        drop(q);
    }
    let (backend, format) = open_image(&spec.path, &opts)
        .await
        .with_context(|| format!("opening {}", spec.path.display()))?;
    if let Some(f) = &args.format {
        let want = match f.as_str() {
            "qcow2" => ImageFormat::Qcow2,
            "raw" => ImageFormat::Raw,
            other => bail!("unsupported format {other:?} (qcow2 or raw)"),
        };
        if want != format {
            bail!("{} is {:?}, not {f}", spec.path.display(), format);
        }
    }
    Ok((backend, format))
}

impl ExportArgs {
    /// Whether `--tls` offers or requires TLS.
    pub fn tls_enabled(&self) -> bool {
        let mut t = crate::tls::NbdTls::default();
        self.tls.apply(&mut t);
        t.enabled()
    }
}

/// Run the command.
pub async fn run(args: ExportArgs) -> anyhow::Result<()> {
    let _ = (args.persistent, args.shared);
    let specs = parse_specs(&args.images, args.export_name.as_deref())?;
    let mut limits = NbdLimits::default();
    args.limits.apply(&mut limits);
    let mut server_config = limits.server_config();
    server_config.list_exports = !args.no_list;
    let mut tls = crate::tls::NbdTls::default();
    args.tls.apply(&mut tls);
    server_config.tls = tls.load(None).map_err(anyhow::Error::msg)?;
    let scheme = tls.scheme();
    let server = Server::new(server_config);
    let mut exports = Vec::new();
    let mut digests = Vec::new();
    for spec in &specs {
        let (backend, format) = prepare(spec, &args).await?;
        let backend = if args.digest {
            let (d, chain) = digest_wrap(spec, backend, &args)?;
            digests.push((spec.name.clone(), Arc::clone(&d), chain));
            d as Arc<dyn nbd_server::BlockBackend>
        } else {
            backend
        };
        let export = Export::new(spec.name.clone(), backend)
            .read_only(args.readonly)
            .with_description(
                args.description
                    .clone()
                    .unwrap_or_else(|| spec.name.clone()),
            );
        let export = server.add_export(export)?;
        tracing::info!(export = %spec.name, path = %spec.path.display(), ?format, "serving");
        exports.push(export);
    }
    let base = listen_addr(&args);
    let mut lines = Vec::new();
    if args.port_per_export {
        for (i, export) in exports.iter().enumerate() {
            // Port 0 means "any free port" for each export.
            let port = if base.port() == 0 {
                0
            } else {
                u16::try_from(usize::from(base.port()) + i).context("port range overflows")?
            };
            let addr = SocketAddr::new(base.ip(), port);
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let h = server.serve_export(l, export)?;
            lines.push(format!(
                "export {} {scheme}://{}/{}",
                export.name(),
                h.local_addr(),
                export.name()
            ));
        }
    } else {
        let l = tokio::net::TcpListener::bind(base)
            .await
            .with_context(|| format!("binding {base}"))?;
        let h = server.serve(l)?;
        for export in &exports {
            lines.push(format!(
                "export {} {scheme}://{}/{}",
                export.name(),
                h.local_addr(),
                export.name()
            ));
        }
    }
    for l in lines {
        println!("{l}");
    }
    let signals = super::Signals::listen()?;
    println!("ready");
    signals.wait().await?;
    tracing::info!("signal received; draining and flushing");
    server
        .shutdown()
        .await
        .context("flushing images on shutdown")?;
    for (name, d, chain) in digests {
        let header = d.finish(&chain).await.context("finishing the digest")?;
        d.inner().close().await.context("closing the image")?;
        println!("digest {name} {}", header.root);
    }
    Ok(())
}

/// An export's backend wrapped for `--digest`, and the parent's digests.
fn digest_wrap(
    spec: &Spec,
    backend: Arc<dyn nbd_server::BlockBackend>,
    args: &ExportArgs,
) -> anyhow::Result<(Arc<DigestBackend>, DigestChain)> {
    if args.readonly {
        bail!("--digest records writes; it cannot be used with --readonly");
    }
    let chain = match &args.backing {
        Some(parent) => {
            let mut p = parent.as_os_str().to_owned();
            p.push(".digest");
            DigestChain::open(&[PathBuf::from(p)], backend.size())
                .context("--digest with --backing needs the parent's .digest sidecar")?
        }
        None => DigestChain::empty(),
    };
    let mut sidecar = spec.path.as_os_str().to_owned();
    sidecar.push(".digest");
    let d = Arc::new(DigestBackend::new(backend, Path::new(&sidecar))?);
    Ok((d, chain))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_from_pairs_and_bare_path() {
        let s = parse_specs(&["a=/x/a.qcow2".into(), "b=/x/b.raw".into()], None).unwrap();
        assert_eq!(
            s[1],
            Spec {
                name: "b".into(),
                path: "/x/b.raw".into()
            }
        );
        let s = parse_specs(&["/x/disk.qcow2".into()], Some("vm-disk0")).unwrap();
        assert_eq!(s[0].name, "vm-disk0");
        let s = parse_specs(&["/x/disk.qcow2".into()], None).unwrap();
        assert_eq!(s[0].name, "disk.qcow2");
    }

    #[test]
    fn bad_specs_are_refused() {
        assert!(parse_specs(&["=/x".into()], None).is_err());
        assert!(parse_specs(&["a=".into()], None).is_err());
        assert!(parse_specs(&["a=/x".into(), "a=/y".into()], None).is_err());
        assert!(parse_specs(&["/x".into(), "/y".into()], None).is_err());
    }
}
