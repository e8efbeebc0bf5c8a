//! One catalog suite, run against both backends: every case below runs as
//! `sqlite::<case>` (a temporary file) and `postgres::<case>` (a database
//! of its own on `HUB_TEST_POSTGRES_URL`; skipped with a line when unset,
//! failed when `NBD_INTEROP_REQUIRED=1`). The rules that matter across
//! hubs (one running backup per VM, one backup per NBD port, no parent
//! deleted under a child) are checked through two handles, as two hubs
//! would hold them.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod catalog {
    pub mod fixture;
}

catalog_cases!(
    repositories,
    vms,
    one_running_backup_per_vm,
    complete_and_fail,
    chain_and_latest_image,
    policies,
    prune_commit,
    tokens,
    verify_records,
    ports_are_unique_among_running_backups,
    a_parent_is_not_deleted_under_a_child,
    large_values_round_trip,
    nodes_lease_and_reaper,
    rows_belong_to_nodes,
    shared_repository_chains,
    object_deletions,
);

mod cases {
    use std::collections::BTreeMap;

    use hub_daemon::catalog::{
        Backend, Catalog, DiskCompletion, DiskFailure, DiskVerified, JournalEntry, LayerObject,
        NewBackup, NewBackupDisk, NodeRegistration, ObjectDeletion, Policy, PruneCommit, Reparent,
        Role,
    };
    use hub_daemon::error::DaemonError;
    use hub_daemon::model::{DiskSpec, Repository};
    use hub_daemon::time::now_ms;
    use std::time::Duration;

    use crate::catalog::fixture::Fixture;

    const GIB: u64 = 1 << 30;

    async fn with_repo(f: &Fixture) -> Catalog {
        let c = f.open().await;
        let want = if f.is_postgres() {
            Backend::Postgres
        } else {
            Backend::Sqlite
        };
        assert_eq!(c.backend().await.unwrap(), want);
        c.ensure_repository(Repository {
            shared: false,
            id: "default".into(),
            path: "/srv/default".into(),
            s3: None,
            node_id: hub_daemon::catalog::LOCAL.into(),
        })
        .await
        .unwrap();
        c
    }

    /// A disk: (disk id, parent, port).
    type D<'a> = (u32, Option<&'a str>, Option<u16>);

    fn backup(id: &str, vm: &str, created_ms: i64, disks: &[D<'_>]) -> NewBackup {
        NewBackup {
            id: id.into(),
            vm_name: vm.into(),
            repository_id: "default".into(),
            backup_type: if disks.iter().any(|d| d.1.is_some()) {
                "incremental".into()
            } else {
                "full".into()
            },
            policy_id: None,
            tags: BTreeMap::from([("k".to_owned(), "v".to_owned())]),
            created_ms,
            disks: disks
                .iter()
                .map(|&(disk_id, parent, port)| NewBackupDisk {
                    disk_id,
                    disk_key: 2000 + disk_id,
                    size_bytes: 8 * GIB,
                    backup_mode: if parent.is_some() {
                        "incremental"
                    } else {
                        "full"
                    }
                    .into(),
                    parent_backup_id: parent.map(str::to_owned),
                    mode_reason: None,
                    file: format!("{vm}/{id}-{disk_id}.qcow2"),
                    export_name: format!("{id}-{disk_id}"),
                    nbd_port: port,
                })
                .collect(),
        }
    }

    fn done(disk_id: u32, image_bytes: u64) -> DiskCompletion {
        DiskCompletion {
            disk_id,
            bytes_written: image_bytes,
            image_bytes,
            change_id: Some(format!("chg-{disk_id}")),
            digest: format!("{disk_id:064x}"),
        }
    }

    fn is_conflict<T: std::fmt::Debug>(r: &Result<T, DaemonError>) -> bool {
        matches!(r, Err(DaemonError::Conflict(_)))
    }

    pub async fn repositories(f: &Fixture) {
        let c = with_repo(f).await;
        let r = Repository {
            shared: false,
            id: "r2".into(),
            path: "/srv/r2".into(),
            s3: None,
            node_id: hub_daemon::catalog::LOCAL.into(),
        };
        c.create_repository(r.clone()).await.unwrap();
        assert!(is_conflict(&c.create_repository(r.clone()).await));
        // ensure_repository leaves an existing one as it is.
        c.ensure_repository(Repository {
            shared: false,
            id: "r2".into(),
            path: "/elsewhere".into(),
            s3: None,
            node_id: hub_daemon::catalog::LOCAL.into(),
        })
        .await
        .unwrap();
        assert_eq!(c.repository("r2").await.unwrap(), Some(r.clone()));
        assert_eq!(c.repository("nope").await.unwrap(), None);
        let ids: Vec<String> = c
            .repositories()
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(ids, ["default", "r2"]);
        // Another handle (another hub) sees the same rows.
        let other = f.open().await;
        assert_eq!(other.repository("r2").await.unwrap(), Some(r));
    }

    pub async fn vms(f: &Fixture) {
        let c = with_repo(f).await;
        let disks = vec![
            DiskSpec {
                disk_id: 0,
                size_bytes: 3 * GIB,
                unit_number: 0,
                disk_key: Some(2000),
                label: "Hard disk 1".into(),
            },
            DiskSpec {
                disk_id: 1,
                size_bytes: u64::from(u32::MAX) + 1,
                unit_number: 1,
                disk_key: Some(2001),
                label: "Hard disk 2".into(),
            },
        ];
        let vm = c
            .put_vm("vm1", "ctx", disks.clone(), Some("http://sna".into()))
            .await
            .unwrap();
        assert_eq!(vm.disks, disks);
        let got = c.vm("vm1").await.unwrap().unwrap();
        assert_eq!(got.disks, disks);
        assert_eq!(got.sna_url.as_deref(), Some("http://sna"));
        // Replacing: fewer disks, no appliance.
        c.put_vm("vm1", "ctx2", disks[..1].to_vec(), None)
            .await
            .unwrap();
        let got = c.vm("vm1").await.unwrap().unwrap();
        assert_eq!((got.vm_context_id.as_str(), got.disks.len()), ("ctx2", 1));
        assert_eq!(got.sna_url, None);
        c.put_vm("vm0", "c", vec![], None).await.unwrap();
        let names: Vec<String> = c
            .vms()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.vm_name)
            .collect();
        assert_eq!(names, ["vm0", "vm1"]);
        // Not while a backup of it runs.
        c.insert_running(backup("b1", "vm1", 1, &[(0, None, None)]))
            .await
            .unwrap();
        assert!(is_conflict(&c.put_vm("vm1", "x", vec![], None).await));
        assert!(is_conflict(&c.delete_vm("vm1").await));
        c.fail("b1", "test", vec![]).await.unwrap();
        assert!(c.delete_vm("vm1").await.unwrap());
        assert!(!c.delete_vm("vm1").await.unwrap());
        assert_eq!(c.vm("vm1").await.unwrap(), None);
    }

    pub async fn one_running_backup_per_vm(f: &Fixture) {
        let c = with_repo(f).await;
        c.insert_running(backup("b1", "vm", 1, &[(0, None, None)]))
            .await
            .unwrap();
        let r = c
            .insert_running(backup("b2", "vm", 2, &[(0, None, None)]))
            .await;
        assert!(is_conflict(&r), "{r:?}");
        // Nothing of the refused one is left.
        assert_eq!(c.backup("b2").await.unwrap().map(|b| b.backup_id), None);
        // Another VM may run meanwhile.
        c.insert_running(backup("b3", "vm-b", 3, &[(0, None, None)]))
            .await
            .unwrap();
        c.complete("b1", vec![done(0, 10)]).await.unwrap();

        // Two hubs race for the same VM: exactly one wins, the database
        // decides.
        let (h1, h2) = (f.open().await, f.open().await);
        let (r1, r2) = tokio::join!(
            h1.insert_running(backup("r1", "raced", 10, &[(0, None, None)])),
            h2.insert_running(backup("r2", "raced", 11, &[(0, None, None)])),
        );
        assert!(
            r1.is_ok() != r2.is_ok(),
            "exactly one may start: {r1:?} {r2:?}"
        );
        assert!(is_conflict(if r1.is_ok() { &r2 } else { &r1 }));
        let running = c
            .backups(Some("raced".into()), Some("running".into()))
            .await
            .unwrap();
        assert_eq!(running.len(), 1);
    }

    pub async fn complete_and_fail(f: &Fixture) {
        let c = with_repo(f).await;
        c.insert_running(backup(
            "b1",
            "vm",
            100,
            &[(0, None, Some(10100)), (1, None, Some(10101))],
        ))
        .await
        .unwrap();
        let tok = c.create_callback_token("b1").await.unwrap();
        assert!(c.check_callback_token("b1", &tok).await.unwrap());
        let b = c.backup("b1").await.unwrap().unwrap();
        assert_eq!(b.status, "running");
        assert_eq!(b.tags.get("k").map(String::as_str), Some("v"));
        assert_eq!(b.disks[1].nbd_port, Some(10101));
        assert_eq!(b.freed_bytes_if_deleted, None);
        c.complete("b1", vec![done(0, 5 * GIB), done(1, 7)])
            .await
            .unwrap();
        // Completing twice is refused; the token went with the run.
        assert!(is_conflict(&c.complete("b1", vec![]).await));
        assert!(!c.check_callback_token("b1", &tok).await.unwrap());
        let b = c.backup("b1").await.unwrap().unwrap();
        assert_eq!(b.status, "completed");
        assert!(b.completed_at.is_some());
        assert_eq!(b.image_bytes, 5 * GIB + 7);
        assert_eq!(b.freed_bytes_if_deleted, Some(5 * GIB + 7));
        assert_eq!(b.disks[0].digest.as_deref(), Some(&*format!("{:064x}", 0)));
        assert!(b.disks.iter().all(|d| d.nbd_port.is_none()));
        assert_eq!(b.disks[0].change_id.as_deref(), Some("chg-0"));

        c.insert_running(backup("b2", "vm", 200, &[(0, Some("b1"), Some(10100))]))
            .await
            .unwrap();
        c.fail(
            "b2",
            "appliance gone",
            vec![DiskFailure {
                disk_id: 0,
                bytes_written: 3,
                write_errors: 2,
                last_error: Some("EIO".into()),
            }],
        )
        .await
        .unwrap();
        let b = c.backup("b2").await.unwrap().unwrap();
        assert_eq!(b.status, "failed");
        assert_eq!(b.error.as_deref(), Some("appliance gone"));
        assert_eq!(
            (b.disks[0].write_errors, b.disks[0].last_error.as_deref()),
            (2, Some("EIO"))
        );
        assert_eq!(
            c.count_by_status().await.unwrap(),
            [("completed".to_owned(), 1), ("failed".to_owned(), 1)]
        );
        let ids: Vec<String> = c
            .backups(Some("vm".into()), None)
            .await
            .unwrap()
            .into_iter()
            .map(|b| b.backup_id)
            .collect();
        assert_eq!(ids, ["b2", "b1"]);
        let failed = c.backups(None, Some("failed".into())).await.unwrap();
        assert_eq!(failed.len(), 1);
        c.set_files_missing("b1", true).await.unwrap();
        assert!(c.backup("b1").await.unwrap().unwrap().files_missing);
        assert_eq!(
            c.repository_backup_bytes("default").await.unwrap(),
            5 * GIB + 7
        );
    }

    pub async fn chain_and_latest_image(f: &Fixture) {
        let c = with_repo(f).await;
        c.insert_running(backup("full", "vm", 1, &[(0, None, None)]))
            .await
            .unwrap();
        c.complete("full", vec![done(0, 100)]).await.unwrap();
        let p = c.latest_image("vm", "default", 0).await.unwrap().unwrap();
        assert_eq!(
            (p.backup_id.as_str(), p.size_bytes, p.format.as_str()),
            ("full", 8 * GIB, "qcow2")
        );
        c.insert_running(backup("inc1", "vm", 2, &[(0, Some("full"), None)]))
            .await
            .unwrap();
        assert_eq!(c.dependents("full").await.unwrap(), ["inc1"]);
        assert!(c.children("full", 0).await.unwrap().is_empty());
        c.complete("inc1", vec![done(0, 10)]).await.unwrap();
        assert_eq!(c.children("full", 0).await.unwrap(), ["inc1"]);
        // The parent frees nothing while a child builds on it.
        let full = c.backup("full").await.unwrap().unwrap();
        assert_eq!(full.freed_bytes_if_deleted, Some(0));
        let chain = c.chain("inc1", 0, 10).await.unwrap();
        let ids: Vec<&str> = chain.iter().map(|l| l.backup_id.as_str()).collect();
        assert_eq!(ids, ["inc1", "full"]);
        assert_eq!(chain[0].parent_backup_id.as_deref(), Some("full"));
        assert!(matches!(
            c.chain("inc1", 0, 1).await,
            Err(DaemonError::BadImage(_))
        ));
        assert!(matches!(
            c.chain("nope", 0, 5).await,
            Err(DaemonError::BadImage(_))
        ));
        let p = c.latest_image("vm", "default", 0).await.unwrap().unwrap();
        assert_eq!(p.backup_id, "inc1");
        assert_eq!(p.change_id.as_deref(), Some("chg-0"));
        assert_eq!(c.latest_image("vm", "default", 1).await.unwrap(), None);
        let h = c.disk_history("vm", "default", 0).await.unwrap();
        assert_eq!((h.last_full, h.last_incremental), (Some(100), Some(10)));
        // A missing image is no parent.
        c.set_files_missing("inc1", true).await.unwrap();
        let p = c.latest_image("vm", "default", 0).await.unwrap().unwrap();
        assert_eq!(p.backup_id, "full");
    }

    pub async fn policies(f: &Fixture) {
        let c = with_repo(f).await;
        let p = Policy {
            id: "gold".into(),
            keep_last: 3,
            keep_daily: 7,
            max_chain_length: 5,
            verify_every_days: 30,
            ..Default::default()
        };
        assert!(c.put_policy(p.clone()).await.unwrap());
        let p2 = Policy {
            keep_last: 4,
            ..p.clone()
        };
        assert!(!c.put_policy(p2.clone()).await.unwrap());
        assert_eq!(c.policy("gold").await.unwrap(), Some(p2.clone()));
        assert_eq!(c.policy("nope").await.unwrap(), None);
        c.put_policy(Policy {
            id: "bronze".into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let ids: Vec<String> = c
            .policies()
            .await
            .unwrap()
            .into_iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(ids, ["bronze", "gold"]);
        let mut b = backup("b1", "vm", 1, &[]);
        b.policy_id = Some("gold".into());
        c.insert_running(b).await.unwrap();
        assert!(is_conflict(&c.delete_policy("gold").await));
        c.delete_policy("bronze").await.unwrap();
        assert!(matches!(
            c.delete_policy("bronze").await,
            Err(DaemonError::NotFound { .. })
        ));
    }

    pub async fn prune_commit(f: &Fixture) {
        let c = with_repo(f).await;
        for (i, (id, parent)) in [("a", None), ("b", Some("a")), ("c", Some("b"))]
            .into_iter()
            .enumerate()
        {
            c.insert_running(backup(id, "vm", i as i64 + 1, &[(0, parent, None)]))
                .await
                .unwrap();
            c.complete(id, vec![done(0, 10 + i as u64)]).await.unwrap();
        }
        let cands = c.prune_candidates(Some("vm".into()), None).await.unwrap();
        let ids: Vec<&str> = cands.iter().map(|b| b.backup_id.as_str()).collect();
        assert_eq!(ids, ["a", "b", "c"]);
        assert_eq!(cands[1].disks[0].1.as_deref(), Some("a"));
        assert!(c
            .prune_candidates(None, Some("other".into()))
            .await
            .unwrap()
            .is_empty());
        // Not while a backup of the VM runs.
        c.insert_running(backup("run", "vm", 9, &[(0, Some("c"), None)]))
            .await
            .unwrap();
        let commit = PruneCommit {
            vm_name: "vm".into(),
            repository_id: "default".into(),
            // c merged down to no parent: a synthetic full.
            reparent: vec![Reparent {
                backup_id: "c".into(),
                disk_id: 0,
                parent: None,
                image_bytes: 99,
            }],
            // A parent and its child go together, parent listed first.
            remove: vec!["a".into(), "b".into()],
            journal: vec![JournalEntry {
                repository_id: "default".into(),
                path: "vm/a-0.qcow2".into(),
                action: "remove".into(),
            }],
        };
        assert!(is_conflict(&c.commit_prune(commit.clone()).await));
        c.fail("run", "x", vec![]).await.unwrap();
        c.commit_prune(commit.clone()).await.unwrap();
        assert!(c.backup("a").await.unwrap().is_none());
        assert!(c.backup("b").await.unwrap().is_none());
        let cb = c.backup("c").await.unwrap().unwrap();
        assert_eq!(cb.disks[0].parent_backup_id, None);
        assert!(cb.disks[0].synthetic);
        assert_eq!(cb.disks[0].image_bytes, Some(99));
        // The failed run that named c as parent keeps its row.
        assert_eq!(c.backup("run").await.unwrap().unwrap().status, "failed");
        let j = c.prune_journal().await.unwrap();
        assert_eq!(j, commit.journal);
        c.clear_journal(j).await.unwrap();
        assert!(c.prune_journal().await.unwrap().is_empty());
    }

    pub async fn tokens(f: &Fixture) {
        let c = with_repo(f).await;
        assert!(!c.has_tokens().await.unwrap());
        let t = c.create_token("ci", Role::Operator).await.unwrap();
        assert!(is_conflict(&c.create_token("ci", Role::Admin).await));
        assert!(c.has_tokens().await.unwrap());
        assert_eq!(
            c.check_token(&t).await.unwrap(),
            Some(("ci".into(), Role::Operator))
        );
        assert_eq!(c.check_token("hub_00").await.unwrap(), None);
        c.touch_token("ci").await.unwrap();
        let l = c.tokens().await.unwrap();
        assert_eq!((l.len(), l[0].role), (1, Role::Operator));
        assert!(l[0].last_used_at.is_some());
        // Another hub checks the same tokens.
        let other = f.open().await;
        assert!(other.check_token(&t).await.unwrap().is_some());
        c.revoke_token("ci").await.unwrap();
        assert_eq!(other.check_token(&t).await.unwrap(), None);
        assert!(matches!(
            c.revoke_token("ci").await,
            Err(DaemonError::NotFound { .. })
        ));
        // A callback token is replaced, not duplicated.
        c.insert_running(backup("b1", "vm", 1, &[])).await.unwrap();
        let t1 = c.create_callback_token("b1").await.unwrap();
        let t2 = c.create_callback_token("b1").await.unwrap();
        assert!(!c.check_callback_token("b1", &t1).await.unwrap());
        assert!(c.check_callback_token("b1", &t2).await.unwrap());
    }

    pub async fn verify_records(f: &Fixture) {
        let c = with_repo(f).await;
        c.put_policy(Policy {
            id: "v".into(),
            verify_every_days: 40,
            ..Default::default()
        })
        .await
        .unwrap();
        let mut b = backup("b1", "vm", 1, &[(0, None, None), (1, None, None)]);
        b.policy_id = Some("v".into());
        c.insert_running(b).await.unwrap();
        c.complete("b1", vec![done(0, 1), done(1, 1)])
            .await
            .unwrap();
        let now = hub_daemon::time::now_ms();
        const DAY: i64 = 86_400_000;
        // 40 days overflow a 32-bit product: the arithmetic must be BIGINT.
        assert!(c.due_for_verify(now, None).await.unwrap().is_empty());
        assert_eq!(
            c.due_for_verify(now + 41 * DAY, None).await.unwrap(),
            ["b1"]
        );
        assert_eq!(
            c.due_for_verify(now + 41 * DAY, Some("b1".into()))
                .await
                .unwrap(),
            ["b1"]
        );
        assert!(c
            .due_for_verify(now + 41 * DAY, Some("zz".into()))
            .await
            .unwrap()
            .is_empty());
        c.set_verify_status("b1", Some("verifying")).await.unwrap();
        assert!(c
            .due_for_verify(now + 41 * DAY, None)
            .await
            .unwrap()
            .is_empty());
        c.record_verify(vec![
            DiskVerified {
                backup_id: "b1".into(),
                disk_id: 0,
                status: "ok".into(),
                detail: "{}".into(),
            },
            DiskVerified {
                backup_id: "b1".into(),
                disk_id: 1,
                status: "corrupt".into(),
                detail: r#"{"bad_ranges":[]}"#.into(),
            },
        ])
        .await
        .unwrap();
        let r = c.backup("b1").await.unwrap().unwrap();
        assert_eq!(r.verify_status.as_deref(), Some("corrupt"));
        assert!(r.verified_at.is_some());
        assert_eq!(r.disks[0].verify_status.as_deref(), Some("ok"));
        assert_eq!(r.disks[1].verify_status.as_deref(), Some("corrupt"));
        assert!(r.disks[1].verify.is_some());
        // Corrupt stays out of the schedule.
        assert!(c
            .due_for_verify(now + 100 * DAY, None)
            .await
            .unwrap()
            .is_empty());
    }

    pub async fn ports_are_unique_among_running_backups(f: &Fixture) {
        let c = with_repo(f).await;
        let other = f.open().await;
        c.insert_running(backup("b1", "vm1", 1, &[(0, None, Some(10100))]))
            .await
            .unwrap();
        // Another hub recording the same port for another VM is refused,
        // and nothing of that backup stays.
        let r = other
            .insert_running(backup("b2", "vm2", 2, &[(0, None, Some(10100))]))
            .await;
        assert!(is_conflict(&r), "{r:?}");
        assert!(c.backup("b2").await.unwrap().is_none());
        // Ports set once bound (set_ports) are held to the same rule.
        other
            .insert_running(backup("b2", "vm2", 2, &[(0, None, None)]))
            .await
            .unwrap();
        assert!(is_conflict(&other.set_ports("b2", vec![(0, 10100)]).await));
        other.set_ports("b2", vec![(0, 10101)]).await.unwrap();
        // An ended backup holds no port.
        c.complete("b1", vec![done(0, 1)]).await.unwrap();
        other.fail("b2", "x", vec![]).await.unwrap();
        c.insert_running(backup(
            "b3",
            "vm3",
            3,
            &[(0, None, Some(10100)), (1, None, Some(10101))],
        ))
        .await
        .unwrap();
    }

    pub async fn a_parent_is_not_deleted_under_a_child(f: &Fixture) {
        let c = with_repo(f).await;
        c.insert_running(backup("p", "vm", 1, &[(0, None, None)]))
            .await
            .unwrap();
        c.complete("p", vec![done(0, 1)]).await.unwrap();
        // A running child: the parent stays, whole.
        let other = f.open().await;
        other
            .insert_running(backup("k", "vm", 2, &[(0, Some("p"), None)]))
            .await
            .unwrap();
        assert!(is_conflict(&c.delete_backup("p").await));
        let p = c.backup("p").await.unwrap().unwrap();
        assert_eq!(p.disks.len(), 1);
        // A completed child: still refused.
        other.complete("k", vec![done(0, 1)]).await.unwrap();
        assert!(is_conflict(&c.delete_backup("p").await));
        // The child can go; then the parent can.
        c.delete_backup("k").await.unwrap();
        // A failed child does not hold its parent: its link is cleared.
        c.insert_running(backup("f", "vm", 3, &[(0, Some("p"), None)]))
            .await
            .unwrap();
        c.fail("f", "x", vec![]).await.unwrap();
        c.delete_backup("p").await.unwrap();
        assert!(c.backup("p").await.unwrap().is_none());
        let f_rec = c.backup("f").await.unwrap().unwrap();
        assert_eq!(f_rec.disks[0].parent_backup_id, None);
        // A child of a parent that is gone is refused at insert (the
        // foreign key on PostgreSQL; on SQLite nothing checks it there, as
        // before: the start path reads the parent in the same hub).
        let r = c
            .insert_running(backup("orphan", "vm", 4, &[(0, Some("p"), None)]))
            .await;
        if f.is_postgres() {
            assert!(is_conflict(&r), "{r:?}");
        }
    }

    pub async fn large_values_round_trip(f: &Fixture) {
        let c = with_repo(f).await;
        // Sizes and times past 32 bits, text with quotes and placeholders.
        let mut b = backup("big", "vm '?1' \"x\"", 1 << 40, &[(0, None, Some(65535))]);
        b.disks[0].size_bytes = 64 << 40;
        c.insert_running(b).await.unwrap();
        c.complete(
            "big",
            vec![DiskCompletion {
                disk_id: 0,
                bytes_written: 5 << 40,
                image_bytes: 6 << 40,
                change_id: None,
                digest: "d".into(),
            }],
        )
        .await
        .unwrap();
        let r = c.backup("big").await.unwrap().unwrap();
        assert_eq!(r.vm_name, "vm '?1' \"x\"");
        assert_eq!(r.disks[0].size_bytes, 64 << 40);
        assert_eq!(r.disks[0].bytes_written, 5 << 40);
        assert_eq!(r.image_bytes, 6 << 40);
        assert_eq!(c.repository_backup_bytes("default").await.unwrap(), 6 << 40);
    }

    fn registration(api: &str) -> NodeRegistration {
        NodeRegistration {
            api_url: api.into(),
            advertise_host: "127.0.0.1".into(),
            nbd_first_port: 10100,
            nbd_last_port: 10200,
            free_bytes: 5 * GIB,
        }
    }

    fn on(repo: &str, b: NewBackup) -> NewBackup {
        NewBackup {
            repository_id: repo.into(),
            ..b
        }
    }

    pub async fn nodes_lease_and_reaper(f: &Fixture) {
        let base = with_repo(f).await;
        let (n1, n2, n3) = (
            f.open().await.for_node("n1"),
            f.open().await.for_node("n2"),
            f.open().await.for_node("n3"),
        );
        let hour = Duration::from_secs(3600);
        n1.register_node(registration("http://n1"), hour)
            .await
            .unwrap();
        // n2's lease runs out at once: as if it had stopped beating.
        n2.register_node(registration("http://n2"), Duration::ZERO)
            .await
            .unwrap();
        for (c, repo) in [(&n1, "r1"), (&n2, "r2")] {
            c.create_repository(Repository {
                shared: false,
                id: repo.into(),
                path: format!("/srv/{repo}"),
                node_id: c.node_id().into(),
                s3: None,
            })
            .await
            .unwrap();
        }
        // Each node may use the same port numbers: the index is per node.
        n1.insert_running(on("r1", backup("b1", "vm1", 1, &[(0, None, Some(10100))])))
            .await
            .unwrap();
        n2.insert_running(on("r2", backup("b2", "vm2", 2, &[(0, None, Some(10100))])))
            .await
            .unwrap();
        assert_eq!(base.backup("b2").await.unwrap().unwrap().node_id, "n2");

        let now = now_ms() + 1000;
        let nodes = n3.nodes(now).await.unwrap();
        let state: Vec<(&str, &str, u64)> = nodes
            .iter()
            .map(|n| (n.node_id.as_str(), n.lease.as_str(), n.running_backups))
            .collect();
        assert_eq!(state, [("n1", "alive", 1), ("n2", "expired", 1)]);
        assert_eq!(nodes[0].api_url, "http://n1");

        // Two reapers at once: one acts, the other finds nothing left.
        let (r1, r3) = tokio::join!(n1.reap_expired(now), n3.reap_expired(now));
        let (r1, r3) = (r1.unwrap(), r3.unwrap());
        let mut all: Vec<String> = r1.iter().chain(&r3).cloned().collect();
        all.sort();
        assert_eq!(all, ["b2"], "reaped by n1: {r1:?}, by n3: {r3:?}");
        let b2 = base.backup("b2").await.unwrap().unwrap();
        assert_eq!(b2.status, "failed");
        let why = b2.error.unwrap();
        assert!(why.contains("n2") && why.contains("lease"), "{why}");
        assert_eq!(b2.disks[0].nbd_port, None);
        // The live node's backup is untouched; a node never reaps itself.
        assert_eq!(base.backup("b1").await.unwrap().unwrap().status, "running");
        n2.insert_running(on("r2", backup("b4", "vm4", 4, &[(0, None, None)])))
            .await
            .unwrap();
        assert!(n2.reap_expired(now).await.unwrap().is_empty());

        // A heartbeat brings it back; a node without a row is told so.
        assert!(n2.heartbeat(hour, 7).await.unwrap());
        let n = n3.node("n2", now).await.unwrap().unwrap();
        assert!(n.alive());
        assert_eq!(n.free_bytes, 7);
        assert!(n1.reap_expired(now).await.unwrap().is_empty());
        assert!(!n3.heartbeat(hour, 0).await.unwrap());
        assert_eq!(n3.node("n3", now).await.unwrap(), None);
    }

    pub async fn rows_belong_to_nodes(f: &Fixture) {
        // Rows made before the fleet (the `local` node).
        let old = with_repo(f).await;
        old.insert_running(backup("b1", "vm", 1, &[(0, None, None)]))
            .await
            .unwrap();
        old.complete("b1", vec![done(0, 10)]).await.unwrap();
        let a = f.open().await.for_node("a");
        assert!(a.prune_candidates(None, None).await.unwrap().is_empty());
        assert!(a.own_repositories().await.unwrap().is_empty());
        // The first node to claim them takes the `local` rows...
        assert_eq!(a.claim_rows(false).await.unwrap(), 3);
        let b = f.open().await.for_node("b");
        assert_eq!(b.claim_rows(false).await.unwrap(), 0);
        assert_eq!(a.backup("b1").await.unwrap().unwrap().node_id, "a");
        assert_eq!(a.own_repositories().await.unwrap().len(), 1);
        assert_eq!(a.repositories().await.unwrap()[0].node_id, "a");
        // ...and only that node prunes them; every node sees them.
        assert_eq!(a.prune_candidates(None, None).await.unwrap().len(), 1);
        assert!(b.prune_candidates(None, None).await.unwrap().is_empty());
        assert!(b.own_repositories().await.unwrap().is_empty());
        assert_eq!(b.backups(None, None).await.unwrap().len(), 1);
        // A lone SQLite hub claims everything (a renamed host keeps it).
        assert_eq!(b.claim_rows(true).await.unwrap(), 3);
        assert_eq!(b.own_repositories().await.unwrap().len(), 1);
    }

    pub async fn shared_repository_chains(f: &Fixture) {
        let _base = with_repo(f).await;
        let (a, b) = (f.open().await.for_node("a"), f.open().await.for_node("b"));
        let hour = Duration::from_secs(3600);
        a.register_node(registration("http://a"), hour)
            .await
            .unwrap();
        b.register_node(registration("http://b"), hour)
            .await
            .unwrap();
        a.create_repository(Repository {
            shared: true,
            id: "sh".into(),
            path: "/mnt/shared".into(),
            node_id: "a".into(),
            s3: None,
        })
        .await
        .unwrap();
        assert!(b.repository("sh").await.unwrap().unwrap().shared);
        // Both nodes reach it: both reconcile in it.
        assert_eq!(b.own_repositories().await.unwrap().len(), 1);
        let now = now_ms();
        // A new VM goes to the least-loaded node (equal: the id decides).
        assert_eq!(
            a.place_in_shared("vm1", "sh", now)
                .await
                .unwrap()
                .as_deref(),
            Some("a")
        );
        a.insert_running(on("sh", backup("f1", "vm1", 1, &[(0, None, None)])))
            .await
            .unwrap();
        // a is busier now: vm2 goes to b.
        assert_eq!(
            b.place_in_shared("vm2", "sh", now)
                .await
                .unwrap()
                .as_deref(),
            Some("b")
        );
        b.insert_running(on("sh", backup("f2", "vm2", 2, &[(0, None, None)])))
            .await
            .unwrap();
        // Each running backup is served by the node running it.
        let owner = b.backup_owner("f1").await.unwrap().unwrap();
        assert_eq!(
            (owner.node_id.as_str(), owner.status.as_str(), owner.shared),
            ("a", "running", true)
        );
        a.complete("f1", vec![done(0, 10)]).await.unwrap();
        b.complete("f2", vec![done(0, 10)]).await.unwrap();
        // A chain stays with its node while it lives, however loaded:
        // b runs something else, vm2 still goes to b.
        b.insert_running(on("sh", backup("f3", "vm3", 3, &[(0, None, None)])))
            .await
            .unwrap();
        assert_eq!(
            a.place_in_shared("vm2", "sh", now)
                .await
                .unwrap()
                .as_deref(),
            Some("b")
        );
        // Maintenance follows the chain: each node prunes its own chains.
        let ids = |v: Vec<hub_daemon::catalog::PruneCandidate>| {
            v.into_iter().map(|c| c.backup_id).collect::<Vec<_>>()
        };
        assert_eq!(ids(a.prune_candidates(None, None).await.unwrap()), ["f1"]);
        assert_eq!(ids(b.prune_candidates(None, None).await.unwrap()), ["f2"]);
        // Leftovers: a may sweep vm1's, not vm3's (running on b) nor
        // vm2's (b's chain); b (at its start-up, its own running backups
        // failed first) both of its chains.
        assert_eq!(a.sweepable_vms("sh").await.unwrap(), ["vm1"]);
        assert_eq!(b.sweepable_vms("sh").await.unwrap(), ["vm2", "vm3"]);
        b.fail("f3", "test", Vec::new()).await.unwrap();
        // b's lease runs out: vm2's next backup goes to a, which then
        // manages the whole chain (b's old backup included).
        b.register_node(registration("http://b"), Duration::ZERO)
            .await
            .unwrap();
        let later = now_ms() + 1000;
        assert_eq!(
            a.place_in_shared("vm2", "sh", later)
                .await
                .unwrap()
                .as_deref(),
            Some("a")
        );
        a.insert_running(on("sh", backup("i2", "vm2", 5, &[(0, Some("f2"), None)])))
            .await
            .unwrap();
        a.complete("i2", vec![done(0, 10)]).await.unwrap();
        assert_eq!(b.backup_owner("f2").await.unwrap().unwrap().node_id, "a");
        assert_eq!(
            ids(a.prune_candidates(None, None).await.unwrap()),
            ["f1", "f2", "i2"]
        );
        assert!(ids(b.prune_candidates(None, None).await.unwrap()).is_empty());
        // A repository of one node is never placed elsewhere by this.
        let owner = a.backup_owner("nope").await.unwrap();
        assert_eq!(owner, None);
        // No node alive at all: nothing to place on.
        a.register_node(registration("http://a"), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(a.place_in_shared("vm9", "sh", later).await.unwrap(), None);
    }

    fn object(id: &str, disk: u32, version: Option<&str>, until: Option<i64>) -> LayerObject {
        LayerObject {
            backup_id: id.into(),
            disk_id: disk,
            object_key: format!("default/vm/{id}-{disk}.qcow2"),
            size_bytes: 10,
            sha256: "ab".repeat(32),
            version_id: version.map(str::to_owned),
            retain_until_ms: until,
            uploaded_ms: 1,
        }
    }

    pub async fn object_deletions(f: &Fixture) {
        let c = with_repo(f).await;
        c.insert_running(backup("a", "vm", 1, &[(0, None, None), (1, None, None)]))
            .await
            .unwrap();
        c.complete("a", vec![done(0, 10), done(1, 10)])
            .await
            .unwrap();
        for (id, t) in [("b", 2), ("c", 3)] {
            let parent = (id == "b").then_some("a");
            c.insert_running(backup(id, "vm", t, &[(0, parent, None)]))
                .await
                .unwrap();
            c.complete(id, vec![done(0, 10)]).await.unwrap();
        }
        // A locked version, and two objects of a bucket without versions.
        c.record_offload(object("a", 0, Some("v1"), Some(5_000)))
            .await
            .unwrap();
        c.record_offload(object("a", 1, None, None)).await.unwrap();
        c.record_offload(object("b", 0, None, None)).await.unwrap();
        assert!(c.object_deletions(None).await.unwrap().is_empty());

        // A prune that merges b over a and removes a owes all three.
        let merge_b = PruneCommit {
            vm_name: "vm".into(),
            repository_id: "default".into(),
            reparent: vec![Reparent {
                backup_id: "b".into(),
                disk_id: 0,
                parent: None,
                image_bytes: 7,
            }],
            remove: vec!["a".into()],
            journal: vec![],
        };
        c.commit_prune(merge_b.clone()).await.unwrap();
        assert!(c.layer_object("b", 0).await.unwrap().is_none());
        let owed = c.object_deletions(None).await.unwrap();
        let keys: Vec<(&str, Option<&str>)> = owed
            .iter()
            .map(|d| (d.object_key.as_str(), d.version_id.as_deref()))
            .collect();
        assert_eq!(
            keys,
            [
                ("default/vm/a-0.qcow2", Some("v1")),
                ("default/vm/a-1.qcow2", None),
                ("default/vm/b-0.qcow2", None),
            ]
        );
        assert!(owed.iter().all(|d| d.repository_id == "default"
            && d.attempts == 0
            && d.last_error.is_none()
            && d.queued_ms > 0));
        assert_eq!(owed[0].retain_until_ms, Some(5_000));
        // Not due while the recorded retention lasts.
        assert_eq!(c.object_deletions(Some(4_999)).await.unwrap().len(), 2);
        assert_eq!(c.object_deletions(Some(5_000)).await.unwrap().len(), 3);
        // Only the node whose repository it is sweeps.
        assert!(f
            .open()
            .await
            .for_node("elsewhere")
            .object_deletions(None)
            .await
            .unwrap()
            .is_empty());

        // The merged layer offloaded again reuses its key: a deletion
        // without a version must not take the new object along.
        let find = |key: &str| -> ObjectDeletion {
            owed.iter().find(|d| d.object_key == key).unwrap().clone()
        };
        let (a0, a1, b0) = (
            find("default/vm/a-0.qcow2"),
            find("default/vm/a-1.qcow2"),
            find("default/vm/b-0.qcow2"),
        );
        c.record_offload(object("b", 0, None, None)).await.unwrap();
        assert!(c.object_in_use(&b0).await.unwrap());
        assert!(!c.object_in_use(&a0).await.unwrap());
        assert!(!c.object_in_use(&a1).await.unwrap());
        // Another version of a used key is not in use.
        let mut other = b0.clone();
        other.version_id = Some("old".into());
        assert!(!c.object_in_use(&other).await.unwrap());
        // Merged again, the same object is owed once, not twice.
        let mut again = merge_b;
        again.remove.clear();
        c.commit_prune(again).await.unwrap();
        assert_eq!(c.object_deletions(None).await.unwrap().len(), 3);

        // A refusal is counted and kept; a deletion done is forgotten.
        c.object_deletion_failed(&a0, "403 AccessDenied")
            .await
            .unwrap();
        c.object_deletion_failed(&a0, "403 AccessDenied again")
            .await
            .unwrap();
        let now = c.object_deletions(None).await.unwrap();
        assert_eq!(now[0].attempts, 2);
        assert_eq!(now[0].last_error.as_deref(), Some("403 AccessDenied again"));
        c.object_deletion_done(&a1).await.unwrap();
        c.object_deletion_done(&b0).await.unwrap();
        assert_eq!(c.object_deletions(None).await.unwrap().len(), 1);

        // Deleting an offloaded backup owes its object too.
        c.record_offload(object("c", 0, Some("v7"), None))
            .await
            .unwrap();
        c.delete_backup("c").await.unwrap();
        let now = c.object_deletions(None).await.unwrap();
        assert_eq!(now.len(), 2);
        assert_eq!(now[1].object_key, "default/vm/c-0.qcow2");
        assert_eq!(now[1].version_id.as_deref(), Some("v7"));
    }
}
