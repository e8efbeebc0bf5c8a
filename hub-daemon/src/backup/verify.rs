//! Verification: re-read every layer of a restore point's chain, recompute
//! the digests and compare them with what was recorded at completion.
//!
//! Verifying a restore point verifies its ancestors too (each layer's data
//! is read once), and follows bad blocks into later restore points that
//! still read them, so the outcome names every restore point that shares
//! the damage. Every restore point built on a corrupt one is flagged
//! corrupt as well (`depends_on` in its detail), so none of them is ever a
//! parent again.
//!
//! Reads and hashing run on verification's own I/O threads, every read
//! through the daemon's one verification throttle (`throttle`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use disk_digest::verify::{block_runs, verify_chain, LayerReport, VerifyLayer};
use disk_digest::{Hash, Sidecar, BLOCK_SIZE};
use nbd_server::BlockBackend;
use qcow_backend::{IoPool, OpenOptions, QcowBackend};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::throttle::Throttled;
use super::{Backups, Layout};
use crate::catalog::{ChainLink, DiskVerified};
use crate::error::{DaemonError, Result};
use crate::model::BackupRecord;

/// Bad blocks of one restore point, each with the backup whose image holds it.
type Findings = BTreeMap<String, BTreeMap<u64, String>>;

/// How one verification ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyOutcome {
    /// Every layer read as recorded.
    Ok,
    /// These restore points are flagged corrupt (the verified one, its
    /// ancestors and descendants as found).
    Corrupt(Vec<String>),
    /// Verification could not run; nothing recorded.
    Failed(String),
}

/// Cancels a verification's reads when its task goes away (shutdown drops
/// it): reads running on the verification threads then stop at the next
/// block instead of reading the rest of the disk for nobody.
struct StopOnDrop(CancellationToken);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Backups {
    /// Start verifying backup `id` (its whole chain, every disk) in the
    /// background; the record shows `verify_status: "verifying"` until the
    /// outcome is recorded.
    pub async fn verify(self: &Arc<Self>, id: &str) -> Result<BackupRecord> {
        let b = self.begin_verify(id).await?;
        let me = Arc::clone(self);
        tokio::spawn(async move {
            me.finish_verify(b).await;
        });
        self.record(id).await
    }

    /// Check that `id` can be verified and mark it `verifying` (409 if it
    /// already is); [`Backups::finish_verify`] must follow.
    pub(crate) async fn begin_verify(&self, id: &str) -> Result<BackupRecord> {
        let b = self.record(id).await?;
        if b.status != "completed" {
            return Err(DaemonError::Conflict(format!(
                "backup {id:?} is {}, not completed",
                b.status
            )));
        }
        for d in &b.disks {
            let chain = self
                .catalog
                .chain(id, d.disk_id, qcow_backend::DEFAULT_MAX_DEPTH)
                .await?;
            if let Some(old) = chain.iter().find(|l| l.digest.is_none()) {
                return Err(DaemonError::BadImage(format!(
                    "restore point {} (disk {}) has no recorded digest: it predates digests and cannot be verified",
                    old.backup_id, d.disk_id
                )));
            }
        }
        if !self.verifying_insert(id) {
            return Err(DaemonError::Conflict(format!(
                "backup {id:?} is already being verified"
            )));
        }
        if let Err(e) = self.catalog.set_verify_status(id, Some("verifying")).await {
            self.verifying_remove(id);
            return Err(e);
        }
        Ok(b)
    }

    /// [`Backups::begin_verify`] for the scheduler: `Ok(None)` (skip it)
    /// when `id` is no longer due at `now_ms`, is being restored or
    /// verified, or is gone.
    pub(crate) async fn begin_scheduled_verify(
        &self,
        id: &str,
        now_ms: i64,
    ) -> Result<Option<BackupRecord>> {
        // Held while marking: a prune holds it throughout, so it either
        // finishes first (and this sees the catalog after it) or finds
        // this verification marked and refuses.
        let restores = self.restores.lock().await;
        if restores.contains_key(id) || self.is_verifying(id) {
            return Ok(None);
        }
        // Verifying a newer restore point refreshes its ancestors: one
        // due when the pass started may not be any more.
        if self
            .catalog
            .due_for_verify(now_ms, Some(id.to_owned()))
            .await?
            .is_empty()
        {
            return Ok(None);
        }
        match self.begin_verify(id).await {
            Ok(b) => Ok(Some(b)),
            Err(DaemonError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Forget a begun verification whose task was abandoned (shutdown):
    /// nothing is recorded, the status goes back to `before`.
    pub(crate) async fn abandon_verify(&self, id: &str, before: Option<&str>) {
        if let Err(e) = self.catalog.set_verify_status(id, before).await {
            tracing::warn!(backup = %id, error = %e, "cannot clear the verification status");
        }
        self.verifying_remove(id);
    }

    /// Verify `b` (begun with [`Backups::begin_verify`]) and record the
    /// outcome.
    pub(crate) async fn finish_verify(&self, b: BackupRecord) -> VerifyOutcome {
        let id = b.backup_id.clone();
        let started = std::time::Instant::now();
        let stop = StopOnDrop(CancellationToken::new());
        let outcome = match self.run_verify(&b, &stop.0).await {
            Ok(results) => {
                let mut corrupt: Vec<String> = results
                    .iter()
                    .filter(|r| r.status != "ok")
                    .map(|r| r.backup_id.clone())
                    .collect();
                corrupt.sort_unstable();
                corrupt.dedup();
                match self.catalog.record_verify(results).await {
                    Ok(()) if corrupt.is_empty() => VerifyOutcome::Ok,
                    Ok(()) => VerifyOutcome::Corrupt(corrupt),
                    Err(e) => {
                        tracing::error!(backup = %id, error = %e, "cannot record verification");
                        VerifyOutcome::Failed(e.to_string())
                    }
                }
            }
            Err(e) => {
                tracing::error!(backup = %id, error = %e, "verification could not run");
                if let Err(e) = self.catalog.set_verify_status(&id, None).await {
                    tracing::error!(backup = %id, error = %e, "cannot clear the verification status");
                }
                VerifyOutcome::Failed(e.to_string())
            }
        };
        self.verifying_remove(&id);
        let secs = started.elapsed().as_secs_f64();
        match &outcome {
            VerifyOutcome::Ok => tracing::info!(backup = %id, secs, "verification finished: ok"),
            VerifyOutcome::Corrupt(ids) => {
                tracing::warn!(backup = %id, secs, corrupt = ?ids, "verification finished: corrupt restore points flagged")
            }
            VerifyOutcome::Failed(_) => {}
        }
        outcome
    }

    /// The verification threads: their own pool, sized for the
    /// scheduler's concurrency (on-demand verifications share them).
    fn verify_pool(&self) -> Result<IoPool> {
        if let Some(p) = self.verify_pool.get() {
            return Ok(p.clone());
        }
        let threads = self.config.verify.max_concurrent.clamp(1, 4);
        let pool = IoPool::new(threads)
            .map_err(|e| DaemonError::io("starting the verification threads", e))?;
        Ok(self.verify_pool.get_or_init(|| pool).clone())
    }

    async fn run_verify(
        &self,
        b: &BackupRecord,
        stop: &CancellationToken,
    ) -> Result<Vec<DiskVerified>> {
        // Marked verifying by now, so no eviction removes what this
        // brings back before it is read.
        self.ensure_local(&b.backup_id).await?;
        let (layout, mut opts) = self.reader_of(&b.repository_id).await?;
        let pool = self.verify_pool()?;
        opts.pool = Some(pool.clone());
        let mut out = Vec::new();
        for d in &b.disks {
            let mut chain = self
                .catalog
                .chain(&b.backup_id, d.disk_id, qcow_backend::DEFAULT_MAX_DEPTH)
                .await?;
            chain.reverse();
            let findings = self
                .verify_disk(&layout, &opts, &pool, stop, d.disk_id, &chain)
                .await;
            let (mut findings, errors) = match findings {
                Ok(f) => (f, BTreeMap::new()),
                Err(errors) => (Findings::new(), errors),
            };
            if let Some(top) = chain.last() {
                self.follow_descendants(&layout, d.disk_id, &top.backup_id, &mut findings)
                    .await;
            }
            let mut results = describe(d.disk_id, &chain, &findings, &errors);
            self.flag_dependents(d.disk_id, &mut results).await;
            out.extend(results);
        }
        Ok(out)
    }

    /// Flag every completed restore point built on a corrupt one of this
    /// disk as corrupt too, with `depends_on` naming the nearest corrupt
    /// ancestor. Including those that rewrote every bad block and would
    /// restore fine: their chain holds damaged data a merge (prune) would
    /// carry forward, so none of them may parent a new incremental, and
    /// the next backup of the disk is a full.
    async fn flag_dependents(&self, disk_id: u32, results: &mut Vec<DiskVerified>) {
        let corrupt: Vec<String> = results
            .iter()
            .filter(|r| r.status == "corrupt")
            .map(|r| r.backup_id.clone())
            .collect();
        let mut seen: BTreeSet<String> = corrupt.iter().cloned().collect();
        let mut queue: Vec<(String, String)> =
            corrupt.into_iter().map(|c| (c.clone(), c)).collect();
        while let Some((node, cause)) = queue.pop() {
            let children = match self.catalog.children(&node, disk_id).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(backup = %node, disk_id, error = %e, "cannot list the restore points built on a corrupt one");
                    continue;
                }
            };
            for c in children {
                if !seen.insert(c.clone()) {
                    continue;
                }
                let detail = json!({
                    "bad_ranges": [],
                    "shared_with": [],
                    "error": null,
                    "digest_mismatch": false,
                    "depends_on": cause,
                })
                .to_string();
                match results.iter_mut().find(|r| r.backup_id == c) {
                    Some(r) => {
                        r.status = "corrupt".into();
                        r.detail = detail;
                    }
                    None => results.push(DiskVerified {
                        backup_id: c.clone(),
                        disk_id,
                        status: "corrupt".into(),
                        detail,
                    }),
                }
                queue.push((c, cause.clone()));
            }
        }
    }

    /// Verify one disk's chain (oldest first). `Err` maps restore points to
    /// why they could not be read at all (each is then corrupt).
    async fn verify_disk(
        &self,
        layout: &Layout,
        opts: &OpenOptions,
        pool: &IoPool,
        stop: &CancellationToken,
        disk_id: u32,
        chain: &[ChainLink],
    ) -> std::result::Result<Findings, BTreeMap<String, String>> {
        let mut layers = Vec::with_capacity(chain.len());
        let mut errors = BTreeMap::new();
        for l in chain {
            let path = layout.path_of(&l.file);
            let opened = async {
                for p in [path.clone(), Layout::sidecar(&path)] {
                    layout.check_plain_file(&p).map_err(|e| {
                        format!("{}: a symlink or not a plain file: {e}", p.display())
                    })?;
                }
                let backend: Arc<dyn BlockBackend> = Arc::new(
                    QcowBackend::open(&path, opts)
                        .await
                        .map_err(|e| format!("image: {e}"))?,
                );
                let backend =
                    Throttled::wrap(backend, Arc::clone(&self.verify_throttle), stop.clone());
                let (sidecar, header, _) = Sidecar::open(&Layout::sidecar(&path))
                    .map_err(|e| format!("digest sidecar: {e}"))?;
                let expected = l
                    .digest
                    .as_deref()
                    .and_then(Hash::from_hex)
                    .ok_or_else(|| "no digest recorded".to_owned())?;
                if header.root != expected {
                    return Err("digest sidecar does not match the catalog".to_owned());
                }
                Ok(VerifyLayer {
                    backend,
                    sidecar: Arc::new(sidecar),
                    expected_root: expected,
                })
            };
            match opened.await {
                Ok(v) => layers.push(v),
                Err(why) => {
                    errors.insert(l.backup_id.clone(), why);
                }
            }
        }
        if !errors.is_empty() {
            // A restore point that cannot be opened makes every newer one
            // in the chain unreadable too.
            let mut broken = false;
            for l in chain {
                broken |= errors.contains_key(&l.backup_id);
                if broken && !errors.contains_key(&l.backup_id) {
                    errors.insert(
                        l.backup_id.clone(),
                        "an older restore point it reads from is unreadable".into(),
                    );
                }
            }
            return Err(errors);
        }
        // Reads and hashing on the verification threads, off the tokio
        // workers that serve NBD.
        let failed = |why: String| {
            tracing::warn!(disk_id, error = %why, "verification read failed");
            chain
                .iter()
                .map(|l| (l.backup_id.clone(), format!("read failed: {why}")))
                .collect::<BTreeMap<_, _>>()
        };
        let reports = pool
            .run(pool.affinity(), move || verify_chain(layers, |_| {}))
            .await
            .map_err(|e| failed(e.to_string()))?
            .map_err(|e| failed(e.to_string()))?;
        Ok(findings_of(chain, &reports))
    }

    /// Carry bad blocks of `from` into its completed descendants that do
    /// not rewrite them (their sidecars say which blocks they wrote).
    async fn follow_descendants(
        &self,
        layout: &Layout,
        disk_id: u32,
        from: &str,
        findings: &mut Findings,
    ) {
        let Some(bad) = findings.get(from).cloned().filter(|b| !b.is_empty()) else {
            return;
        };
        let mut queue = vec![(from.to_owned(), bad)];
        while let Some((parent, bad)) = queue.pop() {
            let Ok(children) = self.catalog.children(&parent, disk_id).await else {
                continue;
            };
            for c in children {
                let Ok(Some(rec)) = self.catalog.backup(&c).await else {
                    continue;
                };
                let Some(disk) = rec.disks.iter().find(|x| x.disk_id == disk_id) else {
                    continue;
                };
                let path = Layout::sidecar(&layout.path_of(&disk.file));
                let Ok((sidecar, _, _)) = Sidecar::open(&path) else {
                    continue;
                };
                let still: BTreeMap<u64, String> = bad
                    .iter()
                    .filter(|(b, _)| {
                        sidecar
                            .read_leaves(**b, **b + 1)
                            .map(|l| l.first().is_none_or(|h| h.is_none()))
                            .unwrap_or(true)
                    })
                    .map(|(b, s)| (*b, s.clone()))
                    .collect();
                if !still.is_empty() {
                    findings.insert(c.clone(), still.clone());
                    queue.push((c, still));
                }
            }
        }
    }

    fn verifying_insert(&self, id: &str) -> bool {
        self.verifying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_owned())
    }

    fn verifying_remove(&self, id: &str) {
        self.verifying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Whether backup `id` is being verified.
    pub fn is_verifying(&self, id: &str) -> bool {
        self.verifying
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }
}

/// Per restore point of the chain: bad blocks it reads, each attributed to
/// the restore point whose image holds the bad data. Root mismatches
/// without a bad block (a damaged digest record) show as block-less.
fn findings_of(chain: &[ChainLink], reports: &[LayerReport]) -> Findings {
    let mut holder: BTreeMap<u64, String> = BTreeMap::new();
    let mut out = Findings::new();
    for (l, r) in chain.iter().zip(reports) {
        for b in &r.own_bad_blocks {
            holder.insert(*b, l.backup_id.clone());
        }
        let bad: BTreeMap<u64, String> = r
            .bad_blocks
            .iter()
            .map(|b| {
                (
                    *b,
                    holder
                        .get(b)
                        .cloned()
                        .unwrap_or_else(|| l.backup_id.clone()),
                )
            })
            .collect();
        if !r.root_ok || !bad.is_empty() {
            out.insert(l.backup_id.clone(), bad);
        }
    }
    out
}

fn describe(
    disk_id: u32,
    chain: &[ChainLink],
    findings: &Findings,
    errors: &BTreeMap<String, String>,
) -> Vec<DiskVerified> {
    let mut ids: BTreeSet<&String> = chain.iter().map(|l| &l.backup_id).collect();
    ids.extend(findings.keys());
    let mut out = Vec::new();
    for id in ids {
        let bad = findings.get(id);
        let error = errors.get(id);
        let corrupt = bad.is_some() || error.is_some();
        let blocks: Vec<u64> = bad.map(|b| b.keys().copied().collect()).unwrap_or_default();
        let ranges: Vec<_> = block_runs(&blocks)
            .into_iter()
            .map(|(first, count)| {
                let held_by = bad
                    .and_then(|b| b.get(&first))
                    .cloned()
                    .unwrap_or_default();
                json!({"offset": first * BLOCK_SIZE, "length": count * BLOCK_SIZE, "held_by": held_by})
            })
            .collect();
        let shared_with: Vec<&String> = findings
            .iter()
            .filter(|(other, ob)| {
                *other != id && ob.keys().any(|k| blocks.binary_search(k).is_ok())
            })
            .map(|(other, _)| other)
            .collect();
        let detail = json!({
            "bad_ranges": ranges,
            "shared_with": shared_with,
            "error": error,
            "digest_mismatch": bad.is_some_and(|b| b.is_empty()),
        });
        out.push(DiskVerified {
            backup_id: id.clone(),
            disk_id,
            status: if corrupt { "corrupt" } else { "ok" }.into(),
            detail: detail.to_string(),
        });
    }
    out
}
