//! The object-storage tier against a real S3 server (SeaweedFS, started
//! per test): offload, evict, re-hydrate and restore a chain; Object Lock
//! holds; a damaged object is caught at re-hydration and never served;
//! verify, synthetic fulls and prune bring evicted layers back first; the
//! objects a merge, prune or delete leaves unreferenced are deleted, a
//! locked one once its retention ends.
//! Images are written by nbdcopy / qemu-io and judged by qemu-img against
//! contents built independently of the hub.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};

use common::files_under;
use common::hub::{parse_targets, Hub};
use common::tmpfs::Tmpfs;
use integration_tests::seaweed::{self, SeaweedFs};
use integration_tests::support::{self, assert_identical, require, run_ok, write_file};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

fn tools() -> bool {
    require("nbdcopy") && require("qemu-io") && require("qemu-img")
}

fn id_of(v: &Value) -> String {
    v["backup_id"].as_str().unwrap().to_owned()
}

async fn qemu_io(fmt: &str, target: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend(["-c", c]);
    }
    args.push(target);
    let out = run_ok("qemu-io", &args).await;
    assert!(!out.contains("failed"), "{out}");
}

/// Register repository `id` (beside the data directory) with an S3 tier
/// on `bucket`; credentials in the body.
async fn tiered_repo(hub: &Hub, s3: &SeaweedFs, id: &str, bucket: &str) -> PathBuf {
    tiered_repo_at(hub, s3, id, bucket, &hub.dir.path().join(id)).await
}

/// [`tiered_repo`] with its files at `path`.
async fn tiered_repo_at(hub: &Hub, s3: &SeaweedFs, id: &str, bucket: &str, path: &Path) -> PathBuf {
    let r = hub
        .post(
            "/api/v1/repositories",
            json!({"id": id, "path": path, "s3": {
                "endpoint": s3.endpoint, "bucket": bucket, "region": seaweed::REGION,
                "access_key_id": seaweed::ACCESS_KEY, "secret_access_key": seaweed::SECRET_KEY,
                "path_style": true}}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    assert_eq!(v["s3"]["bucket"], bucket, "{v}");
    assert_eq!(v["s3"]["credentials"], "set", "{v}");
    // The secret is never shown, by any route.
    for page in [
        r.text(),
        hub.get(&format!("/api/v1/repositories/{id}")).await.text(),
        hub.get("/api/v1/repositories").await.text(),
    ] {
        assert!(!page.contains(seaweed::SECRET_KEY), "{page}");
    }
    path.canonicalize().unwrap()
}

async fn start_backup(
    hub: &Hub,
    vm: &str,
    kind: &str,
    repo: &str,
    policy: &str,
) -> (String, String) {
    let r = hub
        .post(
            "/api/v1/backups",
            json!({"vm_name": vm, "backup_type": kind, "repository_id": repo, "policy_id": policy}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let b = r.json();
    let uri = parse_targets(b["nbd_targets_string"].as_str().unwrap())[0]
        .1
        .clone();
    (id_of(&b), uri)
}

fn location(b: &Value) -> &str {
    b["disks"][0]["location"].as_str().unwrap()
}

fn image(repo: &Path, b: &Value) -> PathBuf {
    repo.join(b["disks"][0]["file"].as_str().unwrap())
}

/// A chain in `repo` under `policy`: a full of `size` bytes, then one
/// incremental per entry of `incrementals` (qemu-io commands). Returns
/// the ids and, for each, a raw file of what it must restore.
async fn backup_chain(
    hub: &Hub,
    vm: &str,
    repo: &str,
    policy: &str,
    size: u64,
    incrementals: &[&[&str]],
) -> (Vec<String>, Vec<PathBuf>) {
    let dir = hub.dir.path();
    let src = write_file(
        dir,
        &format!("{vm}-src.raw"),
        &support::disk_like(11, size as usize),
    );
    let (f, uri) = start_backup(hub, vm, "full", repo, policy).await;
    run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]).await;
    hub.complete(&f).await;
    let (mut ids, mut expected) = (vec![f], vec![src]);
    for (n, cmds) in incrementals.iter().enumerate() {
        let (id, uri) = start_backup(hub, vm, "incremental", repo, policy).await;
        let mut with_flush = cmds.to_vec();
        with_flush.push("flush");
        qemu_io("raw", &uri, &with_flush).await;
        hub.complete(&id).await;
        let next = dir.join(format!("{vm}-expected-{n}.raw"));
        std::fs::copy(expected.last().unwrap(), &next).unwrap();
        qemu_io("raw", next.to_str().unwrap(), cmds).await;
        expected.push(next);
        ids.push(id);
    }
    (ids, expected)
}

/// Offload (once verified) and evict each of `ids`.
async fn offload_and_evict(hub: &Hub, ids: &[String]) {
    for id in ids {
        if hub.record(id).await["verify_status"] != "ok" {
            hub.verify_ok(id).await;
        }
        if location(&hub.record(id).await) == "local" {
            let r = hub
                .post(&format!("/api/v1/backups/{id}/offload"), Value::Null)
                .await;
            assert_eq!(r.status, 200, "{}", r.text());
        }
        let r = hub
            .post(&format!("/api/v1/backups/{id}/evict"), Value::Null)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(location(&r.json()), "s3", "{}", r.text());
    }
}

/// The object key of each of `ids` (disk 0).
async fn keys_of(hub: &Hub, ids: &[String]) -> Vec<String> {
    let catalog = hub.daemon.as_ref().unwrap().backups().catalog();
    let mut keys = Vec::new();
    for id in ids {
        let o = catalog.layer_object(id, 0).await.unwrap().unwrap();
        keys.push(o.object_key);
    }
    keys
}

/// Repository `repo`'s bucket, connected as the hub connects it.
async fn tier_of(hub: &Hub, repo: &str) -> hub_daemon::tier::ObjectTier {
    let settings = hub
        .daemon
        .as_ref()
        .unwrap()
        .backups()
        .catalog()
        .repository_s3(repo)
        .await
        .unwrap()
        .unwrap();
    hub_daemon::tier::ObjectTier::connect(&settings).unwrap()
}

/// Every key under repository `repo`'s prefix, sorted.
async fn listed(tier: &hub_daemon::tier::ObjectTier, repo: &str) -> Vec<String> {
    use futures_util::TryStreamExt as _;
    use object_store::ObjectStore as _;
    let prefix = object_store::path::Path::parse(repo).unwrap();
    let mut keys: Vec<String> = tier
        .store()
        .list(Some(&prefix))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    keys.sort();
    keys
}

/// Whether version `version` (else the latest) of `key` exists.
async fn object_exists(
    tier: &hub_daemon::tier::ObjectTier,
    key: &str,
    version: Option<&str>,
) -> bool {
    use object_store::ObjectStore as _;
    let path = object_store::path::Path::parse(key).unwrap();
    let opts = object_store::GetOptions {
        version: version.map(str::to_owned),
        head: true,
        ..Default::default()
    };
    match tier.store().get_opts(&path, opts).await {
        Ok(_) => true,
        Err(object_store::Error::NotFound { .. }) => false,
        Err(e) => panic!("{key} {version:?}: {e}"),
    }
}

/// What each test here starts from: a SeaweedFS with one bucket, a hub
/// with one repository tiered onto it, a registered one-disk VM and one
/// policy.
struct World {
    /// Bind it for the whole test (`s3: _s3`): dropping it stops the
    /// server, and `..` in a pattern drops it at once.
    s3: SeaweedFs,
    hub: Hub,
    /// The repository's directory.
    repo: PathBuf,
    /// The answer to the policy's `PUT`.
    policy: Value,
}

/// The names and sizes of a [`World`].
struct Setup {
    bucket: &'static str,
    /// Versioning and Object Lock on the bucket.
    locked: bool,
    repo: &'static str,
    vm: &'static str,
    disk_size: u64,
    policy: &'static str,
    rules: Value,
}

impl World {
    /// `None` (the test skips) without the tools or SeaweedFS.
    async fn start(w: Setup) -> Option<World> {
        if !tools() {
            return None;
        }
        let s3 = SeaweedFs::start().await?;
        s3.create_bucket(w.bucket, w.locked).await;
        let hub = Hub::start().await;
        let repo = tiered_repo(&hub, &s3, w.repo, w.bucket).await;
        hub.register(w.vm, &[w.disk_size]).await;
        let r = hub
            .put(&format!("/api/v1/policies/{}", w.policy), w.rules)
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        let policy = r.json();
        Some(World {
            s3,
            hub,
            repo,
            policy,
        })
    }
}

/// Nothing is queued for deletion from the object store.
async fn no_deletions_pending(hub: &Hub) {
    let catalog = hub.daemon.as_ref().unwrap().backups().catalog();
    assert!(catalog.object_deletions(None).await.unwrap().is_empty());
}

/// Read restore point `id`'s disk through a read-only restore export and
/// compare it with `expected` (qemu-img), then stop the restore.
async fn restore_compares(hub: &Hub, id: &str, expected: &Path) {
    let r = hub
        .post(&format!("/api/v1/backups/{id}/restore"), Value::Null)
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let uri = parse_targets(r.json()["nbd_targets_string"].as_str().unwrap())[0]
        .1
        .clone();
    assert_identical("raw", &uri, "raw", expected.to_str().unwrap()).await;
    let r = hub.delete(&format!("/api/v1/backups/{id}/restore")).await;
    assert_eq!(r.status, 204, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_offloaded_and_evicted_restores_identical_and_stays_locked() {
    let Some(World { s3, hub, repo, .. }) = World::start(Setup {
        bucket: "hub-locked",
        locked: true,
        repo: "tiered",
        vm: "app",
        disk_size: 8 * MIB,
        policy: "keep",
        rules: json!({"keep_last": 10, "min_retention_days": 1}),
    })
    .await
    else {
        return;
    };

    // Full + two incrementals; each restore point's contents mirrored.
    let dir = hub.dir.path();
    let src = write_file(dir, "src.raw", &support::disk_like(7, 8 * MIB as usize));
    let (f, uri) = start_backup(&hub, "app", "full", "tiered", "keep").await;
    run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]).await;
    hub.complete(&f).await;
    let mut expected = vec![src];
    let mut ids = vec![f.clone()];
    for (n, cmds) in [
        ["write -P 0xa1 1M 64k", "write -z 4M 1M"],
        ["write -P 0xa2 6M 128k", "write -P 0xa3 1M 4k"],
    ]
    .iter()
    .enumerate()
    {
        let (id, uri) = start_backup(&hub, "app", "incremental", "tiered", "keep").await;
        let mut with_flush = cmds.to_vec();
        with_flush.push("flush");
        qemu_io("raw", &uri, &with_flush).await;
        hub.complete(&id).await;
        let next = dir.join(format!("expected-{n}.raw"));
        std::fs::copy(expected.last().unwrap(), &next).unwrap();
        qemu_io("raw", next.to_str().unwrap(), cmds).await;
        expected.push(next);
        ids.push(id);
    }
    let newest = ids.last().unwrap().clone();
    assert_eq!(
        hub.record(&newest).await["disks"][0]["parent_backup_id"],
        ids[1].as_str()
    );

    // Offload needs a verified restore point.
    let r = hub
        .post(&format!("/api/v1/backups/{f}/offload"), Value::Null)
        .await;
    assert_eq!(r.status, 409, "{}", r.text());
    // Evict needs an offloaded one.
    let r = hub
        .post(&format!("/api/v1/backups/{f}/evict"), Value::Null)
        .await;
    assert_eq!(r.status, 409, "{}", r.text());

    for id in &ids {
        hub.verify_ok(id).await;
        let r = hub
            .post(&format!("/api/v1/backups/{id}/offload"), Value::Null)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        assert_eq!(location(&r.json()), "local+s3", "{}", r.text());
    }
    // Every layer's object is locked until a day from now.
    let backups = std::sync::Arc::clone(hub.daemon.as_ref().unwrap().backups());
    let now = hub_daemon::time::now_ms();
    let mut objects = Vec::new();
    for id in &ids {
        let o = backups
            .catalog()
            .layer_object(id, 0)
            .await
            .unwrap()
            .unwrap();
        let until = o.retain_until_ms.expect("retention recorded");
        assert!(
            until > now + 86_000_000 && until <= now + 86_400_000 + 1000,
            "{o:?}"
        );
        assert_eq!(
            o.size_bytes,
            std::fs::metadata(image(&repo, &hub.record(id).await))
                .unwrap()
                .len()
        );
        objects.push(o);
    }

    for id in &ids {
        let r = hub
            .post(&format!("/api/v1/backups/{id}/evict"), Value::Null)
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
        let b = r.json();
        assert_eq!(location(&b), "s3", "{b}");
        assert!(!image(&repo, &b).exists(), "evicted image still on disk");
        // The digest sidecar stays.
        assert!(repo
            .join(format!(
                "{}.digest",
                b["disks"][0]["file"].as_str().unwrap()
            ))
            .exists());
    }

    // Restoring the newest point brings its whole chain back, checked,
    // and reads exactly what was backed up.
    restore_compares(&hub, &newest, expected.last().unwrap()).await;
    for id in &ids {
        let b = hub.record(id).await;
        assert_eq!(location(&b), "local+s3", "{b}");
        assert!(image(&repo, &b).exists());
    }
    let leftovers: Vec<_> = common::files_under(&repo)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".rehydrating"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    // And the oldest point too, from the re-hydrated files.
    restore_compares(&hub, &f, &expected[0]).await;

    // Object Lock: deleting a locked version is refused by the store.
    for o in &objects {
        let v = o
            .version_id
            .as_deref()
            .expect("a versioned (locked) bucket gives versions");
        let status = s3.delete_version("hub-locked", &o.object_key, v).await;
        assert!(
            (400..500).contains(&status),
            "deleting locked {} {v} answered {status}",
            o.object_key
        );
    }
    // Evicting again and restoring reads the same locked versions.
    let r = hub
        .post(&format!("/api/v1/backups/{newest}/evict"), Value::Null)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    restore_compares(&hub, &newest, expected.last().unwrap()).await;

    // Deleting the newest point queues its locked object with the
    // retention recorded: no attempt before it ends...
    let r = hub.delete(&format!("/api/v1/backups/{newest}")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let o = objects.last().unwrap();
    let catalog = backups.catalog();
    let queued = catalog.object_deletions(None).await.unwrap();
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(
        (
            &queued[0].object_key,
            &queued[0].version_id,
            queued[0].retain_until_ms
        ),
        (&o.object_key, &o.version_id, o.retain_until_ms)
    );
    let swept = backups
        .sweep_objects(hub_daemon::time::now_ms())
        .await
        .unwrap();
    assert!(swept.deleted.is_empty(), "{swept:?}");
    assert_eq!(swept.pending, 1);
    assert_eq!(catalog.object_deletions(None).await.unwrap()[0].attempts, 0);
    // ...and when the hub's clock says it has but the store's does not,
    // the store refuses and the deletion stays owed, with the reason.
    let later = hub_daemon::time::now_ms() + 2 * 86_400_000;
    let swept = backups.sweep_objects(later).await.unwrap();
    assert!(swept.deleted.is_empty(), "{swept:?}");
    assert_eq!(swept.pending, 1);
    let queued = catalog.object_deletions(None).await.unwrap();
    assert_eq!(queued[0].attempts, 1, "{queued:?}");
    assert!(queued[0].last_error.is_some(), "{queued:?}");
    let tier = tier_of(&hub, "tiered").await;
    assert!(object_exists(&tier, &o.object_key, o.version_id.as_deref()).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_object_is_caught_at_rehydration_and_never_served() {
    // No versioning, no lock: the object can be overwritten in place.
    let Some(World {
        s3: _s3, hub, repo, ..
    }) = World::start(Setup {
        bucket: "hub-plain",
        locked: false,
        repo: "plain",
        vm: "db",
        disk_size: 4 * MIB,
        policy: "p",
        rules: json!({"keep_last": 5}),
    })
    .await
    else {
        return;
    };
    let src = write_file(
        hub.dir.path(),
        "src.raw",
        &support::disk_like(3, 4 * MIB as usize),
    );
    let (f, uri) = start_backup(&hub, "db", "full", "plain", "p").await;
    run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]).await;
    hub.complete(&f).await;
    hub.verify_ok(&f).await;
    let r = hub
        .post(&format!("/api/v1/backups/{f}/offload"), Value::Null)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = hub
        .post(&format!("/api/v1/backups/{f}/evict"), Value::Null)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = r.json();

    // Flip one byte of the object, directly in the bucket.
    let backups = std::sync::Arc::clone(hub.daemon.as_ref().unwrap().backups());
    let o = backups
        .catalog()
        .layer_object(&f, 0)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(o.retain_until_ms, None, "{o:?}");
    let settings = backups
        .catalog()
        .repository_s3("plain")
        .await
        .unwrap()
        .unwrap();
    let tier = hub_daemon::tier::ObjectTier::connect(&settings).unwrap();
    let path = object_store::path::Path::parse(&o.object_key).unwrap();
    use object_store::ObjectStoreExt as _;
    let mut bytes = tier
        .store()
        .get(&path)
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap()
        .to_vec();
    assert_eq!(bytes.len() as u64, o.size_bytes);
    let at = bytes.len() / 2;
    bytes[at] ^= 0x40;
    tier.store().put(&path, bytes.into()).await.unwrap();

    // The restore is refused with the reason; nothing is served, nothing
    // is left behind, and the layer is flagged.
    let r = hub
        .post(&format!("/api/v1/backups/{f}/restore"), Value::Null)
        .await;
    assert_eq!(r.status, 422, "{}", r.text());
    let text = r.text();
    assert!(
        text.contains("does not match") && text.contains("SHA-256"),
        "{text}"
    );
    assert!(
        !image(&repo, &b).exists(),
        "a damaged download was put in place"
    );
    let leftovers: Vec<_> = common::files_under(&repo)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".rehydrating"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let b = hub.record(&f).await;
    assert_eq!(location(&b), "s3", "{b}");
    assert_eq!(b["disks"][0]["verify_status"], "corrupt", "{b}");
    assert_eq!(b["verify_status"], "corrupt", "{b}");
    // A next backup does not build on it.
    let (next, _) = start_backup(&hub, "db", "incremental", "plain", "p").await;
    let n = hub.record(&next).await;
    assert_eq!(n["disks"][0]["backup_mode"], "full", "{n}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_offload_then_evict_on_schedule_and_skip_unverified_points() {
    let Some(World {
        s3: _s3,
        hub,
        repo,
        policy,
    }) = World::start(Setup {
        bucket: "hub-sched",
        locked: false,
        repo: "sched",
        vm: "web",
        disk_size: 4 * MIB,
        policy: "tiering",
        rules: json!({"keep_last": 5, "offload_after_days": 1, "evict_local_after_days": 2, "verify_every_days": 1}),
    })
    .await
    else {
        return;
    };
    assert_eq!(policy["evict_local_after_days"], 2);
    let src = write_file(
        hub.dir.path(),
        "src.raw",
        &support::disk_like(5, 4 * MIB as usize),
    );
    let (f, uri) = start_backup(&hub, "web", "full", "sched", "tiering").await;
    run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]).await;
    hub.complete(&f).await;
    let (unverified, uri) = start_backup(&hub, "web", "full", "sched", "tiering").await;
    run_ok("nbdcopy", &["--flush", src.to_str().unwrap(), &uri]).await;
    hub.complete(&unverified).await;
    hub.verify_ok(&f).await;

    let backups = std::sync::Arc::clone(hub.daemon.as_ref().unwrap().backups());
    let now = hub_daemon::time::now_ms();
    const DAY: i64 = 86_400_000;
    // Not due yet: nothing moves.
    let pass = backups.tier_pass(now).await.unwrap();
    assert_eq!(pass, Default::default(), "{pass:?}");
    assert_eq!(location(&hub.record(&f).await), "local");
    // A day and a half on: offloaded, not evicted; the unverified point
    // waits (409 from offload, reported as skipped).
    let pass = backups.tier_pass(now + DAY * 3 / 2).await.unwrap();
    assert_eq!(pass.offloaded, vec![f.clone()], "{pass:?}");
    assert!(pass.evicted.is_empty(), "{pass:?}");
    assert_eq!(pass.skipped.len(), 1, "{pass:?}");
    assert_eq!(pass.skipped[0].0, unverified);
    assert_eq!(location(&hub.record(&f).await), "local+s3");
    assert_eq!(location(&hub.record(&unverified).await), "local");
    // Three days on: evicted.
    let pass = backups.tier_pass(now + DAY * 3).await.unwrap();
    assert_eq!(pass.evicted, vec![f.clone()], "{pass:?}");
    let b = hub.record(&f).await;
    assert_eq!(location(&b), "s3");
    assert!(!image(&repo, &b).exists());
    // Scheduled verification leaves an evicted point alone (the local
    // one is due then).
    assert_eq!(
        backups
            .catalog()
            .due_for_verify(now + DAY * 1000, Some(unverified.clone()))
            .await
            .unwrap(),
        vec![unverified.clone()]
    );
    assert!(backups
        .catalog()
        .due_for_verify(now + DAY * 1000, Some(f.clone()))
        .await
        .unwrap()
        .is_empty());
    restore_compares(&hub, &f, &src).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_and_a_synthetic_full_bring_evicted_layers_back_and_drop_the_replaced_object() {
    let Some(World {
        s3: _s3, hub, repo, ..
    }) = World::start(Setup {
        bucket: "hub-flat",
        locked: false,
        repo: "flat",
        vm: "app",
        disk_size: 4 * MIB,
        policy: "p",
        rules: json!({"keep_last": 10}),
    })
    .await
    else {
        return;
    };
    let (ids, expected) = backup_chain(
        &hub,
        "app",
        "flat",
        "p",
        4 * MIB,
        &[&["write -P 0xb1 1M 64k", "write -z 3M 128k"]],
    )
    .await;
    offload_and_evict(&hub, &ids).await;
    let keys = keys_of(&hub, &ids).await;
    let tier = tier_of(&hub, "flat").await;
    assert_eq!(listed(&tier, "flat").await, {
        let mut k = keys.clone();
        k.sort();
        k
    });

    // Verifying the incremental reads its whole chain, which is only in
    // the bucket: it comes back first, checked, and verifies ok.
    hub.verify_ok(&ids[1]).await;
    for id in &ids {
        let b = hub.record(id).await;
        assert_eq!(location(&b), "local+s3", "{b}");
        assert_eq!(b["disks"][0]["verify_status"], "ok", "{b}");
        assert!(image(&repo, &b).exists());
    }

    // Evicted again, the chain is flattened by a synthetic full: both
    // layers come back for the merge; the rewritten layer is local only
    // and its old object, which no longer matches it, leaves the bucket.
    offload_and_evict(&hub, &ids).await;
    let r = hub
        .put(
            "/api/v1/policies/p",
            json!({"keep_last": 10, "max_chain_length": 2}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let backups = std::sync::Arc::clone(hub.daemon.as_ref().unwrap().backups());
    let built = backups.synthetic_pass(None).await.unwrap();
    assert_eq!(built.len(), 1, "{built:?}");
    assert_eq!(built[0].backup_id, ids[1]);
    let b = hub.record(&ids[1]).await;
    assert_eq!(location(&b), "local", "{b}");
    assert_eq!(b["disks"][0]["parent_backup_id"], Value::Null, "{b}");
    assert_eq!(location(&hub.record(&ids[0]).await), "local+s3");
    assert_eq!(listed(&tier, "flat").await, vec![keys[0].clone()]);
    no_deletions_pending(&hub).await;
    restore_compares(&hub, &ids[1], &expected[1]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prune_merges_evicted_layers_and_deletes_every_object_it_removed() {
    let Some(World { s3: _s3, hub, .. }) = World::start(Setup {
        bucket: "hub-prune",
        locked: false,
        repo: "pruned",
        vm: "web",
        disk_size: 4 * MIB,
        policy: "p",
        rules: json!({"keep_last": 10}),
    })
    .await
    else {
        return;
    };
    let (ids, expected) = backup_chain(
        &hub,
        "web",
        "pruned",
        "p",
        4 * MIB,
        &[&["write -P 0xc1 1M 64k"], &["write -P 0xc2 2M 4k"]],
    )
    .await;
    offload_and_evict(&hub, &ids).await;
    let tier = tier_of(&hub, "pruned").await;
    assert_eq!(listed(&tier, "pruned").await.len(), 3);

    // Keeping only the newest merges it over its evicted ancestors (they
    // come back first) and removes them: no object is left behind, the
    // merged layer's old one included.
    let r = hub.put("/api/v1/policies/p", json!({"keep_last": 1})).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = hub
        .post("/api/v1/prune", json!({"vm_name": "web", "dry_run": false}))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let report = r.json();
    let mut removed: Vec<&str> = report[0]["remove"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    removed.sort_unstable();
    let mut want = vec![ids[0].as_str(), ids[1].as_str()];
    want.sort_unstable();
    assert_eq!(removed, want, "{report}");
    for id in &ids[..2] {
        assert_eq!(hub.get(&format!("/api/v1/backups/{id}")).await.status, 404);
    }
    let b = hub.record(&ids[2]).await;
    assert_eq!(location(&b), "local", "{b}");
    assert_eq!(b["disks"][0]["parent_backup_id"], Value::Null, "{b}");
    assert_eq!(listed(&tier, "pruned").await, Vec::<String>::new());
    no_deletions_pending(&hub).await;
    restore_compares(&hub, &ids[2], &expected[2]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_backups_locked_object_stays_queued_until_its_retention_ends() {
    // No min_retention_days: the hub sets no retention itself.
    let Some(World {
        s3: _s3, hub, repo, ..
    }) = World::start(Setup {
        bucket: "hub-held",
        locked: true,
        repo: "held",
        vm: "db",
        disk_size: 4 * MIB,
        policy: "p",
        rules: json!({"keep_last": 10}),
    })
    .await
    else {
        return;
    };
    let (ids, _) = backup_chain(&hub, "db", "held", "p", 4 * MIB, &[]).await;
    let f = &ids[0];
    hub.verify_ok(f).await;
    let r = hub
        .post(&format!("/api/v1/backups/{f}/offload"), Value::Null)
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let b = r.json();
    let backups = std::sync::Arc::clone(hub.daemon.as_ref().unwrap().backups());
    let o = backups.catalog().layer_object(f, 0).await.unwrap().unwrap();
    assert_eq!(o.retain_until_ms, None, "{o:?}");
    let version = o.version_id.clone().expect("a locked bucket versions");
    // A retention of a few seconds, set behind the hub's back (the hub
    // locks for days): the catalog does not know it, the store does.
    let tier = tier_of(&hub, "held").await;
    let until = (hub_daemon::time::now_ms() / 1000 + 8) * 1000;
    tier.signer()
        .put_retention(&o.object_key, Some(&version), until)
        .await
        .unwrap();

    // The delete removes the files and queues the object; the sweep it
    // starts in the background (well within the retention's seconds) is
    // refused by the store, and the deletion stays owed.
    let r = hub.delete(&format!("/api/v1/backups/{f}")).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(!image(&repo, &b).exists());
    let queued = common::hub::eventually(30, || async {
        let q = backups.catalog().object_deletions(None).await.unwrap();
        q.iter().any(|d| d.attempts >= 1).then_some(q)
    })
    .await;
    assert_eq!(queued.len(), 1, "{queued:?}");
    assert_eq!(queued[0].object_key, o.object_key);
    assert_eq!(queued[0].version_id.as_deref(), Some(version.as_str()));
    assert!(queued[0].last_error.is_some(), "{queued:?}");
    assert!(object_exists(&tier, &o.object_key, Some(&version)).await);
    let pending = "hub_s3_object_deletions_pending{repository=\"held\"}";
    assert_eq!(hub.metric(pending).await, 1);

    // Once the retention has ended, a sweep deletes that version for good.
    let swept = common::hub::eventually(30, || async {
        let s = backups
            .sweep_objects(hub_daemon::time::now_ms())
            .await
            .unwrap();
        (!s.deleted.is_empty()).then_some(s)
    })
    .await;
    assert_eq!(swept.deleted, vec![o.object_key.clone()]);
    assert_eq!(swept.pending, 0);
    assert!(!object_exists(&tier, &o.object_key, Some(&version)).await);
    no_deletions_pending(&hub).await;
    assert_eq!(hub.metric(pending).await, 0);
}

/// Re-hydration onto a full file system: the restore gets 507, no partial
/// file is left and the layer stays evicted; with space back, the same
/// restore reads identical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rehydrating_onto_a_full_disk_is_507_and_leaves_nothing() {
    if !tools() {
        return;
    }
    let Some(s3) = SeaweedFs::start().await else {
        return;
    };
    s3.create_bucket("hub-full", false).await;
    let hub = Hub::start().await;
    let Some(fs) = Tmpfs::mount(&hub.dir.path().join("small"), "24m") else {
        return;
    };
    let repo = tiered_repo_at(&hub, &s3, "small", "hub-full", &fs.dir.join("repo")).await;
    hub.register("vm", &[8 * MIB]).await;
    let r = hub
        .put("/api/v1/policies/keep", json!({"keep_last": 10}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    let (ids, expected) = backup_chain(&hub, "vm", "small", "keep", 8 * MIB, &[]).await;
    offload_and_evict(&hub, &ids).await;
    let before = files_under(&repo);

    let filler = fs.fill();
    let r = hub
        .post(&format!("/api/v1/backups/{}/restore", ids[0]), Value::Null)
        .await;
    assert_eq!(r.status, 507, "{}", r.text());
    assert_eq!(
        r.json()["error"]["code"],
        "insufficient_storage",
        "{}",
        r.text()
    );
    assert_eq!(location(&hub.record(&ids[0]).await), "s3");
    assert_eq!(files_under(&repo), before, "a partial download was left");

    std::fs::remove_file(filler).unwrap();
    restore_compares(&hub, &ids[0], &expected[0]).await;
    assert_eq!(location(&hub.record(&ids[0]).await), "local+s3");
}
