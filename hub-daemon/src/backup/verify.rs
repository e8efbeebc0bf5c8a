//! Verification: re-read every layer of a restore point's chain, recompute
//! the digests and compare them with what was recorded at completion.
//!
//! Verifying a restore point verifies its ancestors too (each layer's data
//! is read once), and follows bad blocks into later restore points that
//! still read them, so the outcome names every restore point that shares
//! the damage.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use disk_digest::verify::{block_runs, verify_chain, LayerReport, VerifyLayer};
use disk_digest::{Hash, Sidecar, BLOCK_SIZE};
use nbd_server::BlockBackend;
use qcow_backend::{OpenOptions, QcowBackend};
use serde_json::json;

use super::{Backups, Layout};
use crate::catalog::{ChainLink, DiskVerified};
use crate::error::{DaemonError, Result};
use crate::model::BackupRecord;

/// Bad blocks of one restore point, each with the backup whose image holds it.
type Findings = BTreeMap<String, BTreeMap<u64, String>>;

impl Backups {
    /// Start verifying backup `id` (its whole chain, every disk) in the
    /// background; the record shows `verify_status: "verifying"` until the
    /// outcome is recorded.
    pub async fn verify(self: &Arc<Self>, id: &str) -> Result<BackupRecord> {
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
        let me = Arc::clone(self);
        let id2 = id.to_owned();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let outcome = me.run_verify(&b).await;
            let result = match outcome {
                Ok(results) => me.catalog.record_verify(results).await,
                Err(e) => {
                    tracing::error!(backup = %id2, error = %e, "verification could not run");
                    me.catalog.set_verify_status(&id2, None).await
                }
            };
            if let Err(e) = result {
                tracing::error!(backup = %id2, error = %e, "cannot record verification");
            }
            me.verifying_remove(&id2);
            tracing::info!(backup = %id2, secs = started.elapsed().as_secs_f64(), "verification finished");
        });
        self.record(id).await
    }

    async fn run_verify(&self, b: &BackupRecord) -> Result<Vec<DiskVerified>> {
        let (layout, opts) = self.reader_of(&b.repository_id).await?;
        let mut out = Vec::new();
        for d in &b.disks {
            let mut chain = self
                .catalog
                .chain(&b.backup_id, d.disk_id, qcow_backend::DEFAULT_MAX_DEPTH)
                .await?;
            chain.reverse();
            let findings = self.verify_disk(&layout, &opts, d.disk_id, &chain).await;
            let (mut findings, errors) = match findings {
                Ok(f) => (f, BTreeMap::new()),
                Err(errors) => (Findings::new(), errors),
            };
            if let Some(top) = chain.last() {
                self.follow_descendants(&layout, d.disk_id, &top.backup_id, &mut findings)
                    .await;
            }
            out.extend(describe(d.disk_id, &chain, &findings, &errors));
        }
        Ok(out)
    }

    /// Verify one disk's chain (oldest first). `Err` maps restore points to
    /// why they could not be read at all (each is then corrupt).
    async fn verify_disk(
        &self,
        layout: &Layout,
        opts: &OpenOptions,
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
        let reports = verify_chain(layers, |_| {}).await.map_err(|e| {
            tracing::warn!(disk_id, error = %e, "verification read failed");
            chain
                .iter()
                .map(|l| (l.backup_id.clone(), format!("read failed: {e}")))
                .collect::<BTreeMap<_, _>>()
        })?;
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
