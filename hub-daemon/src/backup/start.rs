//! Starting a VM backup: plan every disk, record the backup, then bring up
//! one image and one export per disk — all of it, or none of it.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use disk_digest::{DigestBackend, DigestChain, Hash};
use nbd_server::{BlockBackend, Export};
use qcow_backend::{BackingPolicy, CreateOptions, ImageFormat, OpenOptions, QcowBackend};
use tokio_util::sync::CancellationToken;

use super::{watchdog, Backups, DiskJob, Job, Layout};
use crate::catalog::{NewBackup, NewBackupDisk};
use crate::error::{DaemonError, Result};
use crate::model::{BackupRequest, BackupStarted, BackupType, DiskResult, DiskSpec};
use crate::names;
use crate::time::{now_ms, rfc3339};
use sna_contract::{Callback, Mode, PrepareDisk, PrepareRequest, StartRequest, StartTarget};

/// Most tags on a backup, and the longest tag key or value.
const MAX_TAGS: usize = 64;
const MAX_TAG_LEN: usize = 256;

/// One disk, planned.
#[derive(Debug, Clone)]
struct Planned {
    disk_id: u32,
    disk_key: u32,
    size: u64,
    /// The validated parent, for an incremental.
    parent: Option<ParentPlan>,
    /// Why an incremental request backs this disk up in full.
    mode_reason: Option<String>,
    relative: String,
    export_name: String,
}

impl Planned {
    fn mode(&self) -> BackupType {
        if self.parent.is_some() {
            BackupType::Incremental
        } else {
            BackupType::Full
        }
    }

    fn contract_mode(&self) -> Mode {
        contract_mode(self.mode())
    }

    /// The catalog's view of this disk.
    fn record(&self) -> NewBackupDisk {
        NewBackupDisk {
            disk_id: self.disk_id,
            disk_key: self.disk_key,
            size_bytes: self.size,
            backup_mode: self.mode().as_str().into(),
            parent_backup_id: self.parent.as_ref().map(|x| x.backup_id.clone()),
            mode_reason: self.mode_reason.clone(),
            file: self.relative.clone(),
            export_name: self.export_name.clone(),
            nbd_port: None,
        }
    }
}

fn contract_mode(t: BackupType) -> Mode {
    match t {
        BackupType::Full => Mode::Full,
        BackupType::Incremental => Mode::Incremental,
    }
}

/// A parent that passed every check.
#[derive(Debug, Clone)]
struct ParentPlan {
    /// Image (absolute).
    path: PathBuf,
    /// Its backup.
    backup_id: String,
    /// Sidecars of the parent and its ancestors, newest first.
    sidecars: Vec<PathBuf>,
    /// The sender's change id at the parent: the base of this incremental.
    change_id: String,
}

fn validate(req: &BackupRequest) -> Result<()> {
    names::validate("vm_name", &req.vm_name).map_err(DaemonError::BadRequest)?;
    names::validate("repository_id", &req.repository_id).map_err(DaemonError::BadRequest)?;
    if let Some(p) = &req.policy_id {
        names::validate("policy_id", p).map_err(DaemonError::BadRequest)?;
    }
    if req.tags.len() > MAX_TAGS {
        return Err(DaemonError::BadRequest(format!(
            "more than {MAX_TAGS} tags"
        )));
    }
    if req
        .tags
        .iter()
        .any(|(k, v)| k.is_empty() || k.len() > MAX_TAG_LEN || v.len() > MAX_TAG_LEN)
    {
        return Err(DaemonError::BadRequest(format!(
            "tag keys must be 1..={MAX_TAG_LEN} bytes, values ≤ {MAX_TAG_LEN}"
        )));
    }
    Ok(())
}

impl Backups {
    /// Start a backup of every disk of `req.vm_name`.
    pub async fn start(self: &Arc<Self>, req: BackupRequest) -> Result<BackupStarted> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(DaemonError::Unavailable("daemon is shutting down".into()));
        }
        validate(&req)?;
        let vm = self
            .catalog
            .vm(&req.vm_name)
            .await?
            .ok_or_else(|| DaemonError::NotFound {
                what: "VM",
                id: req.vm_name.clone(),
            })?;
        let repo = self
            .catalog
            .repository(&req.repository_id)
            .await?
            .ok_or_else(|| DaemonError::NotFound {
                what: "repository",
                id: req.repository_id.clone(),
            })?;
        // Its files are on another node: that node runs the backup (the
        // API forwards such a start there before it gets here).
        if repo.shared {
            // Every node mounts it, or should: a node that does not must
            // not write the backup onto its own disk under the mount point.
            let (dir, id, node) = (
                std::path::PathBuf::from(&repo.path),
                repo.id.clone(),
                self.catalog.node_id().to_owned(),
            );
            tokio::task::spawn_blocking(move || crate::shared_repo::check(&dir, &id, &node))
                .await
                .map_err(|e| DaemonError::Internal(format!("repository check task: {e}")))??;
        } else if repo.node_id != self.catalog.node_id() {
            return Err(DaemonError::Conflict(format!(
                "repository {:?} is on node {:?}; start the backup there",
                repo.id, repo.node_id
            )));
        }
        // A backup naming a policy that does not exist would never be
        // pruned: refuse it rather than store a dangling reference.
        if let Some(p) = &req.policy_id {
            if self.catalog.policy(p).await?.is_none() {
                return Err(DaemonError::NotFound {
                    what: "policy",
                    id: p.clone(),
                });
            }
        }
        if vm.disks.is_empty() {
            return Err(DaemonError::BadRequest(format!(
                "VM {:?} has no disks",
                vm.vm_name
            )));
        }
        let layout = Layout::new(&repo.path);
        let created_ms = now_ms();
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) % 10_000;
        let id = format!("backup-{}-{created_ms}-{seq:04}", vm.vm_name);

        let mut plan = Vec::with_capacity(vm.disks.len());
        for d in &vm.disks {
            let (parent, mode_reason) = match req.backup_type {
                BackupType::Full => (None, None),
                BackupType::Incremental => {
                    match self.plan_parent(&vm.vm_name, &repo.id, &layout, d).await? {
                        Ok(p) => (Some(p), None),
                        Err(reason) => {
                            tracing::warn!(vm = %vm.vm_name, disk_id = d.disk_id, %reason, "disk goes full");
                            (None, Some(reason))
                        }
                    }
                }
            };
            // Registered VMs always carry a key; an old row without one
            // must not wrap 2000 + unit_number.
            let disk_key = match d.disk_key {
                Some(k) => k,
                None => 2000u32.checked_add(d.unit_number).ok_or_else(|| {
                    DaemonError::BadRequest(format!(
                        "disk {}: unit_number {} gives no valid disk_key",
                        d.disk_id, d.unit_number
                    ))
                })?,
            };
            plan.push(Planned {
                disk_id: d.disk_id,
                disk_key,
                size: d.size_bytes,
                parent,
                mode_reason,
                relative: Layout::relative(&vm.vm_name, d.disk_id, &id),
                // The export name is the capability to reach the disk:
                // 128 random bits after the readable part.
                export_name: format!(
                    "{id}-disk{}-{}",
                    d.disk_id,
                    crate::secret::capability()
                        .map_err(|e| DaemonError::io("reading random bytes", e))?
                ),
            });
        }

        let appliance = vm.sna_url.clone().or_else(|| self.config.sna.url.clone());
        let callback_url = match &appliance {
            Some(_) => Some(format!("{}/api/v1/backups/{id}", self.public_url()?)),
            None => None,
        };

        self.check_space(&vm.vm_name, &repo.id, &layout, &plan)
            .await?;

        // Recording first makes the catalog the arbiter of "one running
        // backup per VM" (409 here, before any file or port exists).
        self.catalog
            .insert_running(NewBackup {
                id: id.clone(),
                vm_name: vm.vm_name.clone(),
                repository_id: repo.id.clone(),
                backup_type: req.backup_type.as_str().into(),
                policy_id: req.policy_id.clone(),
                tags: req.tags.clone(),
                created_ms,
                disks: plan.iter().map(Planned::record).collect(),
            })
            .await?;

        // From here on, any failure releases everything: ports, exports,
        // files, the catalog row (and tells the appliance, once told).
        let mut handoff = None;
        if let Some(url) = &appliance {
            match self
                .prepare(&id, &vm, req.backup_type, url, &mut plan)
                .await
            {
                Ok(h) => handoff = Some(h),
                Err(e) => return Err(self.discard(&id, None, appliance, e).await),
            }
        }

        let disks = match self.bring_up(&layout, &plan).await {
            Ok(d) => d,
            Err(e) => return Err(self.discard(&id, None, appliance, e).await),
        };
        let ports: Vec<(u32, u16)> = disks
            .iter()
            .filter_map(|d| d.published.as_ref().map(|p| (d.disk_id, p.port)))
            .collect();
        let stop = CancellationToken::new();
        let job = Job {
            id: id.clone(),
            disks,
            watchdog: stop.clone(),
            appliance: appliance.clone(),
            progress: Default::default(),
        };
        if let Err(e) = self.catalog.set_ports(&id, ports).await {
            return Err(self.discard(&id, Some(job), appliance, e).await);
        }

        let results: Vec<DiskResult> = plan
            .iter()
            .zip(&job.disks)
            .map(|(p, d)| {
                let port = d.published.as_ref().map_or(0, |x| x.port);
                DiskResult {
                    disk_id: p.disk_id,
                    disk_key: p.disk_key,
                    nbd_port: port,
                    nbd_export_name: p.export_name.clone(),
                    nbd_uri: self.nbd.uri(port, &p.export_name),
                    qcow2_path: d.final_path.display().to_string(),
                    status: "exporting".into(),
                    backup_mode: p.mode().as_str().into(),
                    parent_backup_id: p.parent.as_ref().map(|x| x.backup_id.clone()),
                    mode_reason: p.mode_reason.clone(),
                }
            })
            .collect();
        let targets = results
            .iter()
            .map(|r| format!("{}:{}", r.disk_key, r.nbd_uri))
            .collect::<Vec<_>>()
            .join(",");

        // The job is in the table (and watched) before the appliance hears
        // of it: its first callback may come before its answer to start.
        self.jobs().insert(id.clone(), job);
        watchdog::spawn(
            Arc::downgrade(self),
            id.clone(),
            created_ms,
            self.config.idle_timeout,
            stop,
        );
        let mut appliance_job_id = None;
        if let (Some(url), Some(token), Some(callback_url)) = (&appliance, handoff, callback_url) {
            let start = StartRequest {
                contract: sna_contract::CONTRACT.into(),
                backup_id: id.clone(),
                vm_name: vm.vm_name.clone(),
                vm_context_id: vm.vm_context_id.clone(),
                backup_type: contract_mode(req.backup_type),
                nbd_targets_string: targets.clone(),
                targets: plan
                    .iter()
                    .zip(&results)
                    .map(|(p, r)| StartTarget {
                        disk_id: p.disk_id,
                        disk_key: p.disk_key,
                        size_bytes: p.size,
                        mode: p.contract_mode(),
                        parent_change_id: p.parent.as_ref().map(|x| x.change_id.clone()),
                        nbd_uri: r.nbd_uri.clone(),
                    })
                    .collect(),
                callback: Callback {
                    url: callback_url,
                    token,
                },
            };
            match self.sna.start(url, &start).await {
                Ok(r) => appliance_job_id = r.job_id.map(|j| j.chars().take(256).collect()),
                Err(e) => {
                    let job = self.jobs().remove(&id);
                    if job.is_none() {
                        // Completed or aborted by a callback while start
                        // was in flight: that outcome stands.
                        tracing::warn!(backup = %id, error = %e, "appliance start failed after the backup had ended");
                        return Err(e);
                    }
                    return Err(self.discard(&id, job, appliance, e).await);
                }
            }
        }
        tracing::info!(backup = %id, vm = %vm.vm_name, disks = results.len(), appliance = appliance.as_deref().unwrap_or("none"), "backup started");
        Ok(BackupStarted {
            node_id: self.catalog.node_id().to_owned(),
            backup_id: id,
            vm_name: vm.vm_name,
            disk_results: results,
            nbd_targets_string: targets,
            backup_type: req.backup_type,
            status: "started".into(),
            created_at: rfc3339(created_ms),
            nbd_shared_port: self.nbd.shared_addr().map(|a| a.port()),
            appliance_job_id,
        })
    }

    /// Ask the appliance how it sends each disk, make the plan say so (an
    /// incremental it downgrades loses its parent and gets its reason), and
    /// record the outcome. Returns the callback token for start.
    async fn prepare(
        &self,
        id: &str,
        vm: &crate::model::Vm,
        backup_type: BackupType,
        url: &str,
        plan: &mut [Planned],
    ) -> Result<String> {
        let offered: Vec<PrepareDisk> = plan
            .iter()
            .map(|p| PrepareDisk {
                disk_id: p.disk_id,
                disk_key: p.disk_key,
                size_bytes: p.size,
                mode: p.contract_mode(),
                parent_change_id: p.parent.as_ref().map(|x| x.change_id.clone()),
                reason: p.mode_reason.clone(),
            })
            .collect();
        let req = PrepareRequest {
            contract: sna_contract::CONTRACT.into(),
            backup_id: id.to_owned(),
            vm_name: vm.vm_name.clone(),
            vm_context_id: vm.vm_context_id.clone(),
            backup_type: contract_mode(backup_type),
            disks: offered.clone(),
        };
        let answer = self.sna.prepare(url, &req).await?;
        let agreed = crate::sna::agree(&offered, &answer)?;
        let mut changed = false;
        for (p, a) in plan.iter_mut().zip(agreed) {
            if a.mode == Mode::Full && p.parent.is_some() {
                tracing::info!(backup = %id, disk_id = p.disk_id, reason = a.reason.as_deref().unwrap_or(""), "the appliance sends a full");
                p.parent = None;
                p.mode_reason = a.reason;
                changed = true;
            }
        }
        if changed {
            self.catalog
                .set_disk_modes(id, plan.iter().map(Planned::record).collect())
                .await?;
        }
        self.catalog.create_callback_token(id).await
    }

    /// Undo a start that failed after its catalog row was written: stop
    /// the exports of `job`, delete its files, delete the row, tell the
    /// appliance (if it was asked anything); returns `err` to report.
    async fn discard(
        &self,
        id: &str,
        job: Option<Job>,
        appliance: Option<String>,
        err: DaemonError,
    ) -> DaemonError {
        if let Some(mut job) = job {
            let _ = self.stop_exports(&mut job).await;
            Self::remove_files(std::mem::take(&mut job.disks)).await;
        }
        if let Err(ce) = self.catalog.delete_backup(id).await {
            tracing::error!(backup = %id, error = %ce, "cannot remove the row of a backup that failed to start");
        }
        if let Some(url) = appliance {
            self.sna.cancel_in_background(url, id.to_owned());
        }
        tracing::warn!(backup = %id, error = %err, "backup failed to start; everything released");
        err
    }

    /// Refuse up front (507) a backup whose estimated size plus the
    /// reserve does not fit in the repository's free space.
    async fn check_space(
        &self,
        vm: &str,
        repo: &str,
        layout: &Layout,
        plan: &[Planned],
    ) -> Result<()> {
        let fs = crate::space::fs_space(layout.root())
            .map_err(|e| DaemonError::io(format!("repository {}", layout.root().display()), e))?;
        let mut need: u64 = 0;
        for p in plan {
            let h = self.catalog.disk_history(vm, repo, p.disk_id).await?;
            need = need.saturating_add(crate::space::estimate(p.parent.is_none(), &h));
        }
        let reserve = crate::space::reserve(self.config.space_reserve, fs.capacity_bytes);
        if need.saturating_add(reserve) > fs.free_bytes {
            return Err(DaemonError::NoSpace(format!(
                "repository {repo:?} has {} bytes free; this backup is expected to write about {need} bytes and {reserve} must stay free",
                fs.free_bytes
            )));
        }
        Ok(())
    }

    /// Choose and check the parent of one disk of an incremental. `Ok(Err)`
    /// is the reason the disk must be backed up in full instead: no
    /// usable parent, a parent that is not a valid qcow2 inside the
    /// repository, or one whose recorded digests do not hold together.
    /// Never a silent wrong base.
    async fn plan_parent(
        &self,
        vm: &str,
        repo_id: &str,
        layout: &Layout,
        d: &DiskSpec,
    ) -> Result<std::result::Result<ParentPlan, String>> {
        let Some(p) = self.catalog.latest_image(vm, repo_id, d.disk_id).await? else {
            return Ok(Err("no completed backup of this disk to build on".into()));
        };
        if p.size_bytes != d.size_bytes {
            return Ok(Err(format!(
                "disk size changed ({} -> {} bytes) since backup {}",
                p.size_bytes, d.size_bytes, p.backup_id
            )));
        }
        if p.format != "qcow2" {
            return Ok(Err(format!(
                "parent {} is recorded as {}, not qcow2",
                p.backup_id, p.format
            )));
        }
        if p.verify_status.as_deref() == Some("corrupt") {
            return Ok(Err(format!("parent {} failed verification", p.backup_id)));
        }
        let Some(change_id) = p.change_id.clone().filter(|c| !c.is_empty()) else {
            return Ok(Err(format!(
                "lineage lost: parent {} has no change id",
                p.backup_id
            )));
        };
        let Some(root) = p.digest.as_deref().and_then(Hash::from_hex) else {
            return Ok(Err(format!(
                "parent {} has no recorded digest",
                p.backup_id
            )));
        };
        let chain = match self
            .catalog
            .chain(&p.backup_id, d.disk_id, qcow_backend::DEFAULT_MAX_DEPTH)
            .await
        {
            Ok(c) => c,
            Err(e) => return Ok(Err(format!("parent {}: {e}", p.backup_id))),
        };
        // A parent whose own verification is older than an ancestor's
        // finding (or that was never verified) still reads through the
        // damaged layer: the whole chain must be clean.
        if let Some(bad) = chain
            .iter()
            .find(|l| l.verify_status.as_deref() == Some("corrupt"))
        {
            return Ok(Err(format!(
                "parent {} depends on {}, which failed verification",
                p.backup_id, bad.backup_id
            )));
        }
        // The new overlay reads through the whole chain: evicted layers
        // come back first. One that cannot is a reason for a full.
        if chain.iter().any(|l| l.location == "s3") {
            if let Err(e) = self.ensure_local(&p.backup_id).await {
                return Ok(Err(format!(
                    "parent {} cannot be re-hydrated: {e}",
                    p.backup_id
                )));
            }
        }
        let sidecars: Vec<PathBuf> = chain
            .iter()
            .map(|l| Layout::sidecar(&layout.path_of(&l.file)))
            .collect();
        let path = layout.path_of(&p.file);
        let root_dir = layout
            .root()
            .canonicalize()
            .map_err(|e| DaemonError::io(format!("repository {}", layout.root().display()), e))?;
        // Open the parent chain as a reader would: qcow2 only, strict
        // policy, every header checked; and its digests, linked.
        let opts = OpenOptions::new()
            .read_only(true)
            .policy(BackingPolicy::strict_within([root_dir]));
        let check = async {
            layout.check_plain_file(&path).map_err(|e| {
                format!("is a symlink or not a plain file inside the repository: {e}")
            })?;
            if !qcow_backend::chain::is_qcow2(&path).map_err(|e| e.to_string())? {
                return Err("has no qcow2 header; never used as raw".to_owned());
            }
            let q = QcowBackend::open(&path, &opts)
                .await
                .map_err(|e| e.to_string())?;
            let depth = q.chain_depth();
            drop(q);
            if depth != chain.len() {
                return Err(format!(
                    "image chain has {depth} layers, the catalog {}",
                    chain.len()
                ));
            }
            let dc = DigestChain::open(&sidecars, d.size_bytes).map_err(|e| e.to_string())?;
            if dc.root() != root {
                return Err("digest sidecar does not match the catalog".to_owned());
            }
            Ok(())
        };
        Ok(match check.await {
            Ok(()) => Ok(ParentPlan {
                path,
                backup_id: p.backup_id,
                sidecars,
                change_id,
            }),
            Err(why) => Err(format!("parent {} unusable: {why}", p.backup_id)),
        })
    }

    /// Ports, images and exports for every disk; on any failure, undo all.
    async fn bring_up(&self, layout: &Layout, plan: &[Planned]) -> Result<Vec<DiskJob>> {
        let leases = self.nbd.pool().allocate(plan.len())?;
        let root = layout
            .root()
            .canonicalize()
            .map_err(|e| DaemonError::io(format!("repository {}", layout.root().display()), e))?;
        let policy = BackingPolicy::strict_within([root]);
        let mut disks: Vec<DiskJob> = Vec::with_capacity(plan.len());
        let mut made: Vec<PathBuf> = Vec::new();
        let result: Result<()> = async {
            for (p, (lease, listener)) in plan.iter().zip(leases) {
                let final_path = layout.path_of(&p.relative);
                let partial = Layout::partial(&final_path);
                // Made inside the repository, following no symlink: a
                // planted <vm> or disk<N> link refuses the backup.
                layout.create_parent(&final_path).map_err(|e| {
                    if crate::confined::is_link_refusal(&e) {
                        DaemonError::BadImage(format!(
                            "disk {}: a symlink or non-directory is in the way of {} in the repository",
                            p.disk_id, p.relative
                        ))
                    } else {
                        DaemonError::io(format!("creating the directory of {}", p.relative), e)
                    }
                })?;
                let create = CreateOptions {
                    size: Some(p.size),
                    cluster_size: qcow_backend::DEFAULT_CLUSTER_SIZE,
                    backing: p.parent.as_ref().map(|x| x.path.clone()),
                    backing_format: Some(ImageFormat::Qcow2),
                };
                let opts = OpenOptions::new().policy(policy.clone());
                let backend = QcowBackend::create(&partial, &create, &opts).await?;
                made.push(partial.clone());
                let sidecar = Layout::partial(&Layout::sidecar(&final_path));
                let digest = Arc::new(DigestBackend::new(Arc::new(backend), &sidecar)?);
                made.push(sidecar);
                let export = Export::new(
                    p.export_name.clone(),
                    Arc::clone(&digest) as Arc<dyn BlockBackend>,
                )
                // Nothing about the VM's insides: the owner knows the rest.
                .with_description(format!("backup disk {}", p.disk_id));
                let published = self.nbd.publish(export, lease, listener)?;
                disks.push(DiskJob {
                    disk_id: p.disk_id,
                    layout: layout.clone(),
                    partial,
                    final_path,
                    digest,
                    parent_sidecars: p
                        .parent
                        .as_ref()
                        .map(|x| x.sidecars.clone())
                        .unwrap_or_default(),
                    published: Some(published),
                    incremental: p.parent.is_some(),
                });
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            for d in &mut disks {
                if let Some(p) = d.published.take() {
                    let _ = self.nbd.unpublish(p).await;
                }
            }
            for f in made {
                let _ = layout.remove(&f);
            }
            return Err(e);
        }
        Ok(disks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> BackupRequest {
        BackupRequest {
            vm_name: "vm1".into(),
            backup_type: BackupType::Full,
            repository_id: "default".into(),
            policy_id: None,
            tags: Default::default(),
        }
    }

    #[test]
    fn request_validation() {
        assert!(validate(&req()).is_ok());
        let mut r = req();
        r.vm_name = "../etc".into();
        assert!(validate(&r).is_err());
        let mut r = req();
        r.repository_id = "a/b".into();
        assert!(validate(&r).is_err());
        let mut r = req();
        r.policy_id = Some("".into());
        assert!(validate(&r).is_err());
        let mut r = req();
        r.tags.insert("k".into(), "v".repeat(300));
        assert!(validate(&r).is_err());
    }
}
