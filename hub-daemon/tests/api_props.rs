//! Property test of the whole API: thousands of random requests — real
//! routes with random segments, percent-encoding and very long segments,
//! random methods, query strings, Content-Types and bodies (JSON shaped like
//! the real bodies with random types, field names, huge and negative
//! numbers and unicode; arbitrary JSON; raw bytes; oversized bodies) — sent
//! in-process through the router to one daemon whose state accumulates
//! across cases. After every request:
//! * the status is never 5xx (the generator never exhausts ports, so not
//!   even 503);
//! * every non-2xx answer has the one error shape with the same status;
//! * the catalog agrees with the world: every `running` backup has live
//!   exports and every backup export a running row, ports in use match the
//!   exports, every VM reads back as the last accepted PUT made it (a
//!   refused PUT changes nothing), and no file in any repository is one the
//!   catalog does not know.
//!
//! At the end every running backup is aborted through the API and nothing
//! may be left running. `PROPTEST_CASES` overrides the number of cases.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use hub_daemon::api::{router, AppState};
use hub_daemon::backup::Backups;
use hub_daemon::catalog::Catalog;
use hub_daemon::model::{DiskSpec, Repository, VmRequest};
use hub_daemon::nbd::NbdHub;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::{json, Map, Value};
use tower::ServiceExt;

const DEFAULT_CASES: u32 = 3000;
/// VM names most requests use, so that PUT, backup and delete meet.
const VMS: &[&str] = &["vm0", "vm1", "vm2", "vm3", "vm4", "vm5"];
/// Repository ids most requests use.
const REPOS: &[&str] = &["default", "r0", "r1", "r2"];

// ---------------------------------------------------------------- generators

/// One path segment.
#[derive(Debug, Clone)]
enum Seg {
    /// One of [`VMS`].
    Vm(usize),
    /// A backup id the daemon handed out (index into the known ones), or a
    /// made-up one if none is known yet.
    Backup(usize),
    /// Arbitrary bytes, percent-encoded where needed (and sometimes where
    /// not).
    Bytes(Vec<u8>, Vec<bool>),
    /// Odd literal segments.
    Odd(&'static str),
    /// `n` letters (over 8 KiB the URI limit answers).
    Long(usize),
}

const ODD: &[&str] = &[
    "..",
    ".",
    "%",
    "%G1",
    "%2F",
    "%2e%2e",
    "%00",
    "a%2Fb",
    "%C3%A9",
    "%E2%80%AE",
    "%FF%FE",
    "~",
    "a;b",
    "a,b",
    "*",
    "-",
    "_",
    "%20",
    "+",
];

fn seg() -> impl Strategy<Value = Seg> {
    prop_oneof![
        4 => (0..VMS.len()).prop_map(Seg::Vm),
        4 => any::<usize>().prop_map(Seg::Backup),
        3 => (proptest::collection::vec(any::<u8>(), 0..16), proptest::collection::vec(any::<bool>(), 16))
            .prop_map(|(b, m)| Seg::Bytes(b, m)),
        2 => proptest::sample::select(ODD).prop_map(Seg::Odd),
        1 => prop_oneof![100usize..300, 7000usize..9000, 20_000usize..30_000].prop_map(Seg::Long),
    ]
}

/// Which route (or none) a request aims at.
#[derive(Debug, Clone)]
enum PathSpec {
    Fixed(&'static str),
    Vm(Seg),
    Backup(Seg, Option<&'static str>),
    Junk(Vec<Seg>),
}

fn any_path() -> impl Strategy<Value = PathSpec> {
    prop_oneof![
        proptest::sample::select(
            &[
                "/healthz",
                "/metrics",
                "/api/v1/vms",
                "/api/v1/repositories",
                "/api/v1/backups",
                "/",
                "/api/v1",
                "/api/v1/vms/",
                "/api/v1/backups/",
            ][..]
        )
        .prop_map(PathSpec::Fixed),
        seg().prop_map(PathSpec::Vm),
        (
            seg(),
            proptest::option::of(proptest::sample::select(
                &["/complete", "/abort", "/restore", "/x", "/restore/x"][..]
            ))
        )
            .prop_map(|(s, t)| PathSpec::Backup(s, t)),
        proptest::collection::vec(seg(), 1..4).prop_map(PathSpec::Junk),
    ]
}

/// Query string pairs (key, value), each a segment-like thing.
fn query() -> impl Strategy<Value = Option<Vec<(Seg, Seg)>>> {
    let key = prop_oneof![
        3 => proptest::sample::select(&["vm_name", "status"][..]).prop_map(Seg::Odd),
        1 => seg(),
    ];
    let value = prop_oneof![
        2 => proptest::sample::select(&["running", "completed", "failed", "weird", ""][..])
            .prop_map(Seg::Odd),
        2 => seg(),
    ];
    proptest::option::weighted(0.2, proptest::collection::vec((key, value), 0..3))
}

fn edge_number() -> impl Strategy<Value = Value> {
    proptest::sample::select(vec![
        json!(0),
        json!(1),
        json!(511),
        json!(512),
        json!(4096),
        json!(2000),
        json!(u32::MAX),
        json!(u64::from(u32::MAX) + 1),
        json!(u32::MAX - 1999),
        json!(u32::MAX - 2000),
        json!((1u64 << 40)),
        json!((1u64 << 51) + 512),
        json!(1u64 << 52),
        json!(1u64 << 56),
        json!(u64::MAX),
        json!(-1),
        json!(-512),
        json!(i64::MIN),
        json!(0.5),
        json!(1e300),
        json!(-0.0),
        json!((1u64 << 53) + 1),
    ])
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_filter_map("finite", |f| serde_json::Number::from_f64(f)
            .map(Value::Number)),
        edge_number(),
        ".{0,16}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map("[a-z_]{0,10}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A field: usually a good value, sometimes missing, of another type, or
/// an edge number.
fn field(good: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Option<Value>> {
    prop_oneof![
        40 => good.prop_map(Some),
        1 => Just(None),
        1 => any_json().prop_map(Some),
        1 => edge_number().prop_map(Some),
    ]
    .boxed()
}

/// An object from fields, plus now and then a field nobody knows.
fn object(fields: Vec<(&'static str, BoxedStrategy<Option<Value>>)>) -> BoxedStrategy<Value> {
    let (names, strategies): (Vec<_>, Vec<_>) = fields.into_iter().unzip();
    (
        strategies,
        proptest::option::weighted(0.03, ("[a-z_]{1,12}", any_json())),
    )
        .prop_map(move |(values, extra)| {
            let mut m = Map::new();
            for (n, v) in names.iter().zip(values) {
                if let Some(v) = v {
                    m.insert((*n).to_owned(), v);
                }
            }
            if let Some((k, v)) = extra {
                m.insert(k, v);
            }
            Value::Object(m)
        })
        .boxed()
}

fn text(max: usize) -> BoxedStrategy<Value> {
    prop_oneof![
        30 => proptest::string::string_regex(&format!(".{{0,{max}}}")).unwrap().prop_map(Value::from),
        1 => (250usize..1100).prop_map(|n| Value::from("é".repeat(n / 2))),
    ]
    .boxed()
}

fn vm_name() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => proptest::sample::select(VMS).prop_map(Value::from),
        1 => "[a-zA-Z0-9._-]{0,12}".prop_map(Value::from),
        1 => ".{0,12}".prop_map(Value::from),
    ]
    .boxed()
}

fn repo_id() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => proptest::sample::select(REPOS).prop_map(Value::from),
        1 => "[a-zA-Z0-9._/-]{0,12}".prop_map(Value::from),
    ]
    .boxed()
}

fn disk() -> BoxedStrategy<Value> {
    object(vec![
        (
            "disk_id",
            field(prop_oneof![0u32..6, Just(u32::MAX)].prop_map(Value::from)),
        ),
        (
            "size_bytes",
            field(prop_oneof![
                20 => (1u64..=8192).prop_map(|n| Value::from(n * 512)),
                1 => (1u64..=1000).prop_map(Value::from),
                1 => edge_number(),
            ]),
        ),
        (
            "unit_number",
            field(prop_oneof![
                12 => (0u32..16).prop_map(Value::from),
                1 => proptest::sample::select(&[u32::MAX, u32::MAX - 1999, u32::MAX - 2000][..])
                    .prop_map(Value::from),
            ]),
        ),
        (
            "disk_key",
            prop_oneof![
                4 => Just(None),
                2 => (2000u32..2010).prop_map(|k| Some(Value::from(k))),
                1 => edge_number().prop_map(Some),
                1 => Just(Some(Value::Null)),
            ]
            .boxed(),
        ),
        ("label", field(text(20))),
    ])
}

fn vm_body() -> BoxedStrategy<Value> {
    object(vec![
        ("vm_context_id", field(text(16))),
        (
            "disks",
            field(
                (
                    proptest::collection::vec(disk(), 0..5),
                    proptest::bool::weighted(0.8),
                )
                    .prop_map(|(mut disks, renumber)| {
                        // Mostly distinct ids and units, as a real VM has.
                        if renumber {
                            for (i, d) in disks.iter_mut().enumerate() {
                                if let Some(o) = d.as_object_mut() {
                                    for k in ["disk_id", "unit_number"] {
                                        if o.get(k).is_some_and(Value::is_u64) {
                                            o.insert(k.into(), Value::from(i));
                                        }
                                    }
                                }
                            }
                        }
                        Value::Array(disks)
                    }),
            ),
        ),
    ])
}

fn backup_body() -> BoxedStrategy<Value> {
    object(vec![
        ("vm_name", field(vm_name())),
        (
            "backup_type",
            field(prop_oneof![
                4 => proptest::sample::select(&["full", "incremental"][..]).prop_map(Value::from),
                1 => ".{0,8}".prop_map(Value::from),
            ]),
        ),
        ("repository_id", field(repo_id())),
        (
            "policy_id",
            prop_oneof![3 => Just(None), 1 => field(vm_name())].boxed(),
        ),
        (
            "tags",
            prop_oneof![
                10 => Just(None),
                8 => field(
                    proptest::collection::btree_map(
                        prop_oneof![6 => "[a-z]{1,6}", 1 => ".{0,6}"],
                        text(8),
                        0..4
                    )
                        .prop_map(|m| Value::Object(m.into_iter().collect()))
                ),
                1 => (60usize..70).prop_map(|n| Some(Value::Object(
                    (0..n).map(|i| (format!("k{i}"), Value::from("v"))).collect()
                ))),
            ]
            .boxed(),
        ),
    ])
}

fn complete_body() -> BoxedStrategy<Value> {
    object(vec![(
        "disks",
        field(
            proptest::collection::vec(
                object(vec![
                    ("disk_id", field((0u32..6).prop_map(Value::from))),
                    ("change_id", field(text(24))),
                ]),
                0..4,
            )
            .prop_map(Value::Array),
        ),
    )])
}

fn abort_body() -> BoxedStrategy<Value> {
    object(vec![("reason", field(text(40)))])
}

/// Where a repository request points; resolved against the temp dir.
#[derive(Debug, Clone)]
enum RepoPath {
    /// `<tmp>/repos/<name>` (valid).
    Under(String),
    /// `<tmp>/repos/<a>/<b>` (valid, may nest in another repository).
    Nested(String, String),
    /// A file in the temp dir, or below it.
    File(bool),
    /// `<tmp>/repos/x\0y`.
    Nul,
    /// Over 4096 bytes, or a component over 255.
    TooLong(bool),
    /// A system tree, directly or through a symlink in the temp dir.
    System(&'static str, bool),
    /// `/`.
    Root,
    /// Any string that is not absolute.
    Relative(String),
    /// `<tmp>/repos/../../..` etc.
    DotDot,
    /// Not a string.
    Json(Value),
}

fn repo_path() -> impl Strategy<Value = RepoPath> {
    prop_oneof![
        6 => "[a-z]{1,3}".prop_map(RepoPath::Under),
        2 => ("[a-z]{1,2}", "[a-z]{1,2}").prop_map(|(a, b)| RepoPath::Nested(a, b)),
        1 => any::<bool>().prop_map(RepoPath::File),
        1 => Just(RepoPath::Nul),
        1 => any::<bool>().prop_map(RepoPath::TooLong),
        2 => (
            proptest::sample::select(
                &["/proc", "/proc/self", "/sys", "/dev", "/etc", "/boot", "/run", "/usr", "/bin", "/sbin", "/lib", "/lib64"][..]
            ),
            any::<bool>()
        )
            .prop_map(|(s, l)| RepoPath::System(s, l)),
        1 => Just(RepoPath::Root),
        1 => "[^/].{0,10}".prop_map(RepoPath::Relative),
        1 => Just(RepoPath::DotDot),
        1 => any_json().prop_map(RepoPath::Json),
    ]
}

/// A request body.
#[derive(Debug, Clone)]
enum BodySpec {
    Empty,
    Json(Value),
    Raw(Vec<u8>),
    /// `{"id": ..., "path": ...}` with the path resolved at run time.
    Repo(Option<Value>, Option<RepoPath>),
    /// Just over the 2 MiB limit.
    Big,
}

fn chaos_body() -> impl Strategy<Value = BodySpec> {
    prop_oneof![
        3 => Just(BodySpec::Empty),
        3 => any_json().prop_map(BodySpec::Json),
        2 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(BodySpec::Raw),
        1 => prop_oneof![vm_body(), backup_body(), complete_body(), abort_body()].prop_map(BodySpec::Json),
        1 => "\\{.{0,20}".prop_map(|s| BodySpec::Raw(s.into_bytes())),
    ]
}

fn maybe_big(b: impl Strategy<Value = BodySpec>) -> impl Strategy<Value = BodySpec> {
    prop_oneof![150 => b, 1 => Just(BodySpec::Big)]
}

fn content_type() -> impl Strategy<Value = Option<String>> {
    prop_oneof![
        40 => Just(Some("application/json".to_owned())),
        2 => Just(None),
        1 => Just(Some("text/plain".to_owned())),
        1 => Just(Some("application/json; charset=utf-8".to_owned())),
        1 => "[ -~]{0,24}".prop_map(Some),
    ]
}

fn method(m: &'static str) -> BoxedStrategy<String> {
    Just(m.to_owned()).boxed()
}

fn any_method() -> BoxedStrategy<String> {
    prop_oneof![
        4 => proptest::sample::select(&["GET", "PUT", "POST", "DELETE"][..]).prop_map(str::to_owned),
        1 => proptest::sample::select(&["PATCH", "HEAD", "OPTIONS", "TRACE", "BREW"][..]).prop_map(str::to_owned),
        1 => "[A-Z]{1,8}",
    ]
    .boxed()
}

/// One request, symbolically.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: PathSpec,
    query: Option<Vec<(Seg, Seg)>>,
    content_type: Option<String>,
    body: BodySpec,
}

fn req(
    m: BoxedStrategy<String>,
    p: impl Strategy<Value = PathSpec> + 'static,
    b: impl Strategy<Value = BodySpec> + 'static,
) -> BoxedStrategy<Req> {
    (m, p, query(), content_type(), maybe_big(b))
        .prop_map(|(method, path, query, content_type, body)| Req {
            method,
            path,
            query,
            content_type,
            body,
        })
        .boxed()
}

fn known_backup(tail: Option<&'static str>) -> impl Strategy<Value = PathSpec> {
    prop_oneof![
        8 => any::<usize>().prop_map(move |i| PathSpec::Backup(Seg::Backup(i), tail)),
        1 => seg().prop_map(move |s| PathSpec::Backup(s, tail)),
    ]
}

/// Scenarios aimed at each route (mostly well-formed, so state builds up),
/// plus pure chaos.
fn request() -> BoxedStrategy<Req> {
    let vm_path = prop_oneof![
        8 => (0..VMS.len()).prop_map(|i| PathSpec::Vm(Seg::Vm(i))),
        1 => seg().prop_map(PathSpec::Vm),
    ];
    prop_oneof![
        14 => req(method("PUT"), vm_path.clone(), vm_body().prop_map(BodySpec::Json)),
        14 => req(method("POST"), Just(PathSpec::Fixed("/api/v1/backups")), backup_body().prop_map(BodySpec::Json)),
        6 => req(method("POST"), known_backup(Some("/complete")), prop_oneof![3 => complete_body().prop_map(BodySpec::Json), 1 => Just(BodySpec::Empty)]),
        6 => req(method("POST"), known_backup(Some("/abort")), prop_oneof![3 => abort_body().prop_map(BodySpec::Json), 1 => Just(BodySpec::Empty), 1 => Just(BodySpec::Json(Value::Null))]),
        4 => req(method("POST"), known_backup(Some("/restore")), Just(BodySpec::Empty)),
        4 => req(method("DELETE"), known_backup(Some("/restore")), Just(BodySpec::Empty)),
        4 => req(method("DELETE"), known_backup(None), Just(BodySpec::Empty)),
        3 => req(method("DELETE"), vm_path.clone(), Just(BodySpec::Empty)),
        8 => req(method("GET"), any_path(), Just(BodySpec::Empty)),
        6 => req(
            method("POST"),
            Just(PathSpec::Fixed("/api/v1/repositories")),
            (field(repo_id()), proptest::option::weighted(0.95, repo_path()))
                .prop_map(|(id, path)| BodySpec::Repo(id, path)),
        ),
        12 => req(any_method(), any_path(), chaos_body()),
    ]
    .boxed()
}

// ---------------------------------------------------------------- the world

struct World {
    dir: tempfile::TempDir,
    backups: Arc<Backups>,
    app: Router,
    /// VM name → the VM as the last accepted PUT defined it.
    vms: BTreeMap<String, (String, Vec<DiskSpec>)>,
    /// Backup ids handed out.
    ids: Vec<String>,
    requests: u64,
    by_status: BTreeMap<u16, u64>,
    /// (method, route, status) → count, for the summary.
    by_route: BTreeMap<(String, String, u16), u64>,
}

fn encode(bytes: &[u8], mask: &[bool]) -> String {
    let mut s = String::new();
    for (i, b) in bytes.iter().enumerate() {
        let unreserved = b.is_ascii_alphanumeric() || b"-._~".contains(b);
        if unreserved && !mask.get(i).copied().unwrap_or(false) {
            s.push(char::from(*b));
        } else {
            s.push_str(&format!("%{b:02X}"));
        }
    }
    s
}

impl World {
    /// The daemon's state, assembled as `app::Daemon::start` does, minus the
    /// HTTP listener: requests go straight into the router.
    async fn start() -> World {
        let dir = tempfile::tempdir().unwrap();
        let config =
            common::hub::config(&dir.path().join("data"), 4096, 0, Duration::from_secs(3600));
        std::fs::create_dir_all(&config.data_dir).unwrap();
        std::fs::create_dir_all(dir.path().join("repos")).unwrap();
        std::fs::write(dir.path().join("a-file"), b"x").unwrap();
        let catalog = Catalog::open(&config.catalog_path()).unwrap();
        let repo = config.default_repository();
        std::fs::create_dir_all(&repo).unwrap();
        catalog
            .ensure_repository(Repository {
                shared: false,
                id: "default".into(),
                path: repo.canonicalize().unwrap().display().to_string(),
                s3: None,
                node_id: hub_daemon::catalog::LOCAL.into(),
            })
            .await
            .unwrap();
        let nbd = NbdHub::start(&config).await.unwrap();
        let backups = Backups::new(catalog, nbd, config);
        backups.reconcile().await.unwrap();
        let app = router(AppState::new(Arc::clone(&backups)));
        World {
            dir,
            backups,
            app,
            vms: BTreeMap::new(),
            ids: Vec::new(),
            requests: 0,
            by_status: BTreeMap::new(),
            by_route: BTreeMap::new(),
        }
    }

    fn base(&self) -> PathBuf {
        self.dir.path().canonicalize().unwrap()
    }

    fn seg(&self, s: &Seg) -> String {
        match s {
            Seg::Vm(i) => VMS[i % VMS.len()].to_owned(),
            Seg::Backup(i) if !self.ids.is_empty() => self.ids[i % self.ids.len()].clone(),
            Seg::Backup(i) => format!("backup-vm0-{i}"),
            Seg::Bytes(b, m) => encode(b, m),
            Seg::Odd(s) => (*s).to_owned(),
            Seg::Long(n) => "a".repeat(*n),
        }
    }

    fn uri(&self, r: &Req) -> String {
        let mut uri = match &r.path {
            PathSpec::Fixed(p) => (*p).to_owned(),
            PathSpec::Vm(s) => format!("/api/v1/vms/{}", self.seg(s)),
            PathSpec::Backup(s, tail) => {
                format!("/api/v1/backups/{}{}", self.seg(s), tail.unwrap_or(""))
            }
            PathSpec::Junk(segs) => segs.iter().map(|s| format!("/{}", self.seg(s))).collect(),
        };
        if let Some(q) = &r.query {
            let pairs: Vec<String> = q
                .iter()
                .map(|(k, v)| format!("{}={}", self.seg(k), self.seg(v)))
                .collect();
            uri.push('?');
            uri.push_str(&pairs.join("&"));
        }
        uri
    }

    fn repo_path(&self, p: &RepoPath) -> Value {
        let base = self.base();
        let repos = base.join("repos");
        let s = |p: PathBuf| Value::from(p.display().to_string());
        match p {
            RepoPath::Under(n) => s(repos.join(n)),
            RepoPath::Nested(a, b) => s(repos.join(a).join(b)),
            RepoPath::File(below) => {
                let f = base.join("a-file");
                s(if *below { f.join("x") } else { f })
            }
            RepoPath::Nul => Value::from(format!("{}/x\0y", repos.display())),
            RepoPath::TooLong(whole) => Value::from(if *whole {
                format!("{}{}", repos.display(), "/abcdefg".repeat(600))
            } else {
                format!("{}/{}", repos.display(), "c".repeat(256))
            }),
            RepoPath::System(sys, via_link) => {
                if *via_link {
                    let link = base.join(format!("link{}", sys.replace('/', "-")));
                    if std::fs::symlink_metadata(&link).is_err() {
                        std::os::unix::fs::symlink(sys, &link).unwrap();
                    }
                    s(link.join("hub-repo"))
                } else {
                    Value::from(format!("{sys}/hub-repo"))
                }
            }
            RepoPath::Root => Value::from("/"),
            RepoPath::Relative(r) => Value::from(r.as_str()),
            RepoPath::DotDot => Value::from(format!("{}/../../../etc/hub-repo", repos.display())),
            RepoPath::Json(v) => v.clone(),
        }
    }

    fn body(&self, b: &BodySpec) -> Vec<u8> {
        match b {
            BodySpec::Empty => Vec::new(),
            BodySpec::Json(v) => serde_json::to_vec(v).unwrap(),
            BodySpec::Raw(r) => r.clone(),
            BodySpec::Repo(id, path) => {
                let mut m = Map::new();
                if let Some(id) = id {
                    m.insert("id".into(), id.clone());
                }
                if let Some(p) = path {
                    m.insert("path".into(), self.repo_path(p));
                }
                serde_json::to_vec(&Value::Object(m)).unwrap()
            }
            BodySpec::Big => {
                let mut v = br#"{"vm_context_id": "c", "disks": [], "pad": ""#.to_vec();
                v.resize((2 << 20) + 1, b' ');
                v
            }
        }
    }

    /// Send one request and check the answer; update the model.
    async fn step(&mut self, r: &Req) -> Result<(), TestCaseError> {
        let uri = self.uri(r);
        let body = self.body(&r.body);
        let mut b = Request::builder().method(r.method.as_str()).uri(&uri);
        if let Some(ct) = &r.content_type {
            b = b.header(header::CONTENT_TYPE, ct);
        }
        // A URI or header the http crate itself refuses never reaches a
        // server; nothing to test.
        let Ok(request) = b.body(Body::from(body.clone())) else {
            return Ok(());
        };
        let response = self.app.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), 64 << 20)
            .await
            .unwrap();
        self.requests += 1;
        *self.by_status.entry(status.as_u16()).or_default() += 1;
        let route = match &r.path {
            PathSpec::Fixed(p) => (*p).to_owned(),
            PathSpec::Vm(_) => "/api/v1/vms/{vm}".to_owned(),
            PathSpec::Backup(_, t) => format!("/api/v1/backups/{{id}}{}", t.unwrap_or("")),
            PathSpec::Junk(_) => "junk".to_owned(),
        };
        *self
            .by_route
            .entry((r.method.clone(), route, status.as_u16()))
            .or_default() += 1;
        let ctx = || {
            format!(
                "{} {} ({} body bytes) -> {status}: {}",
                r.method,
                uri.chars().take(300).collect::<String>(),
                body.len(),
                String::from_utf8_lossy(&bytes)
                    .chars()
                    .take(500)
                    .collect::<String>()
            )
        };
        prop_assert!(!status.is_server_error(), "5xx: {}", ctx());
        if uri.len() > hub_daemon::api::URI_LIMIT {
            prop_assert_eq!(status, StatusCode::URI_TOO_LONG, "{}", ctx());
        }
        let head = r.method == "HEAD";
        if !status.is_success() && !head {
            let j: Value = serde_json::from_slice(&bytes)
                .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {}", ctx())))?;
            let e = j
                .get("error")
                .filter(|_| j.as_object().is_some_and(|o| o.len() == 1))
                .ok_or_else(|| TestCaseError::fail(format!("no error object: {}", ctx())))?;
            prop_assert_eq!(&e["status"], &json!(status.as_u16()), "{}", ctx());
            prop_assert!(
                e["code"].as_str().is_some_and(
                    |c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                ),
                "code: {}",
                ctx()
            );
            prop_assert!(
                e["message"].as_str().is_some_and(|m| !m.is_empty()),
                "message: {}",
                ctx()
            );
        }
        // The two routes that answer text: metrics and the dashboard page.
        let is_text = matches!(uri.split('?').next(), Some("/metrics" | "/"));
        if status.is_success() && !head && status != StatusCode::NO_CONTENT && !is_text {
            prop_assert!(
                serde_json::from_slice::<Value>(&bytes).is_ok(),
                "2xx not JSON: {}",
                ctx()
            );
        }
        self.learn(r, &uri, status, &body, &bytes)
    }

    /// Update the model from an accepted request.
    fn learn(
        &mut self,
        r: &Req,
        uri: &str,
        status: StatusCode,
        body: &[u8],
        resp: &[u8],
    ) -> Result<(), TestCaseError> {
        // The VM name as the server decoded it from the path.
        let vm_of = |uri: &str| {
            let path = uri.split('?').next().unwrap_or("");
            path.strip_prefix("/api/v1/vms/").map(percent_decode)
        };
        match (r.method.as_str(), status) {
            ("PUT", StatusCode::OK) => {
                let got: Value = serde_json::from_slice(resp).unwrap();
                let name = got["vm_name"].as_str().unwrap().to_owned();
                let from_path = vm_of(uri);
                prop_assert_eq!(Some(&name), from_path.as_ref());
                // What the server accepted must parse, and come back
                // normalized: sorted by disk_id, disk_key resolved.
                let req: VmRequest = serde_json::from_slice(body)
                    .map_err(|e| TestCaseError::fail(format!("accepted but invalid ({e})")))?;
                let mut want = req.disks;
                for d in &mut want {
                    let key = d.disk_key.or_else(|| 2000u32.checked_add(d.unit_number));
                    prop_assert!(key.is_some(), "accepted a wrapping disk_key: {:?}", d);
                    d.disk_key = key;
                }
                want.sort_by_key(|d| d.disk_id);
                let got_disks: Vec<DiskSpec> =
                    serde_json::from_value(got["disks"].clone()).unwrap();
                prop_assert_eq!(&got_disks, &want, "PUT {} answered other disks", name);
                prop_assert_eq!(&got["vm_context_id"], &json!(req.vm_context_id));
                self.vms.insert(name, (req.vm_context_id, want));
            }
            ("DELETE", StatusCode::NO_CONTENT) => {
                if let Some(name) = vm_of(uri) {
                    self.vms.remove(&name);
                }
                // A deleted backup is gone for good: aim at live ones.
                let path = uri.split('?').next().unwrap_or("");
                if let Some(id) = path.strip_prefix("/api/v1/backups/") {
                    let id = percent_decode(id);
                    self.ids.retain(|i| *i != id);
                }
            }
            ("POST", StatusCode::CREATED) if uri.starts_with("/api/v1/backups") => {
                let j: Value = serde_json::from_slice(resp).unwrap();
                if let Some(id) = j["backup_id"].as_str() {
                    if !self.ids.iter().any(|i| i == id) {
                        self.ids.push(id.to_owned());
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The catalog agrees with the exports, the ports, the model and the
    /// files.
    async fn check(&self) -> Result<(), TestCaseError> {
        let catalog = self.backups.catalog();
        // VMs: exactly what the accepted PUTs and DELETEs left.
        let vms: BTreeMap<String, (String, Vec<DiskSpec>)> = catalog
            .vms()
            .await
            .unwrap()
            .into_iter()
            .map(|v| (v.vm_name, (v.vm_context_id, v.disks)))
            .collect();
        prop_assert_eq!(&vms, &self.vms, "catalog VMs differ from the last PUTs");
        // Running rows ⇔ live backup exports; ports ⇔ exports.
        let exports: HashSet<String> = self
            .backups
            .nbd()
            .exports()
            .iter()
            .map(|e| e.name().to_owned())
            .collect();
        let all = catalog.backups(None, None).await.unwrap();
        let running: Vec<_> = all.iter().filter(|b| b.status == "running").collect();
        let mut running_exports = HashSet::new();
        for b in &running {
            for d in &b.disks {
                prop_assert!(
                    exports.contains(&d.nbd_export_name),
                    "running backup {} has no export {}",
                    b.backup_id,
                    d.nbd_export_name
                );
                running_exports.insert(d.nbd_export_name.clone());
            }
        }
        for e in &exports {
            prop_assert!(
                e.starts_with("restore-") || running_exports.contains(e),
                "export {} belongs to no running backup",
                e
            );
        }
        prop_assert_eq!(self.backups.running(), running.len());
        prop_assert_eq!(
            self.backups.nbd().pool().in_use(),
            exports.len(),
            "ports in use vs exports"
        );
        // Files: every file in every repository is a completed image or a
        // running backup's partial one, and each of those exists.
        let repos: BTreeMap<String, PathBuf> = catalog
            .repositories()
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.id, PathBuf::from(r.path)))
            .collect();
        let mut known = BTreeSet::new();
        for b in &all {
            let root = repos.get(&b.repository_id).ok_or_else(|| {
                TestCaseError::fail(format!("{} in unknown repository", b.backup_id))
            })?;
            for d in &b.disks {
                let path = root.join(&d.file);
                let suffix = match b.status.as_str() {
                    "completed" => "",
                    "running" => ".partial",
                    _ => continue,
                };
                // The image and its digest sidecar.
                for extra in ["", ".digest"] {
                    let mut s = path.clone().into_os_string();
                    s.push(extra);
                    s.push(suffix);
                    let file = PathBuf::from(s);
                    prop_assert!(
                        file.is_file(),
                        "{} of {} missing",
                        file.display(),
                        b.backup_id
                    );
                    known.insert(file);
                }
            }
        }
        for root in repos.values() {
            for f in files_under(root) {
                prop_assert!(known.contains(&f), "unknown file {}", f.display());
            }
        }
        // Nothing was created outside the temp dir (the system trees).
        prop_assert!(!Path::new("/etc/hub-repo").exists());
        Ok(())
    }

    /// Abort whatever still runs, through the API; then nothing may run.
    async fn finish(&mut self) -> Result<(), TestCaseError> {
        let running = self
            .backups
            .catalog()
            .backups(None, Some("running".into()))
            .await
            .unwrap();
        for b in running {
            let request = Request::builder()
                .method("POST")
                .uri(format!("/api/v1/backups/{}/abort", b.backup_id))
                .body(Body::empty())
                .unwrap();
            let response = self.app.clone().oneshot(request).await.unwrap();
            prop_assert_eq!(response.status(), StatusCode::OK, "abort {}", b.backup_id);
        }
        self.check().await?;
        prop_assert_eq!(self.backups.running(), 0);
        let left = self
            .backups
            .catalog()
            .backups(None, Some("running".into()))
            .await
            .unwrap();
        prop_assert!(left.is_empty(), "running rows left: {:?}", left);
        let backup_exports = self
            .backups
            .nbd()
            .exports()
            .iter()
            .filter(|e| !e.name().starts_with("restore-"))
            .count();
        prop_assert_eq!(backup_exports, 0);
        self.backups.shutdown().await;
        prop_assert_eq!(self.backups.nbd().exports().len(), 0);
        prop_assert_eq!(self.backups.nbd().pool().in_use(), 0);
        Ok(())
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            match e.file_type() {
                Ok(t) if t.is_dir() => out.extend(files_under(&p)),
                Ok(_) => out.push(p),
                Err(_) => {}
            }
        }
    }
    out
}

#[test]
fn random_requests_get_4xx_in_the_error_shape_and_keep_the_catalog_consistent() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let world = RefCell::new(rt.block_on(World::start()));
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES);
    let mut runner = TestRunner::new(Config {
        cases,
        // State accumulates across cases, so a shrunk case runs against a
        // different daemon state: report the first failure as it was.
        max_shrink_iters: 0,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&request(), |r| {
        let mut guard = world.borrow_mut();
        let w: &mut World = &mut guard;
        rt.block_on(async {
            w.step(&r).await?;
            w.check().await
        })
    });
    let mut w = world.into_inner();
    eprintln!(
        "{} requests, by status: {:?}; {} backups known; {} VMs registered",
        w.requests,
        w.by_status,
        w.ids.len(),
        w.vms.len()
    );
    if std::env::var_os("API_PROPS_SUMMARY").is_some() {
        for ((m, route, status), n) in &w.by_route {
            eprintln!("{n:6} {m} {route} -> {status}");
        }
    }
    let finished = rt.block_on(w.finish());
    result.unwrap();
    finished.unwrap();
}
