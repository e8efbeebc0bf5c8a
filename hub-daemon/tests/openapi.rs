//! The API reference (issue 12): `GET /api/v1/openapi.json` documents every
//! route, and nothing but routes.
//!
//! Three independent witnesses, so a route cannot be added, or a method
//! grow on a path, without the document following:
//! * a hand-kept list of every route here, compared both ways;
//! * the source of `api/`: every path handed to axum directly (`.route(`,
//!   `.nest(`, …, bypassing the documenting `routes!`) must be documented;
//! * a running hub: every documented operation is routed (never the
//!   `route` 404 or a 405), and on every documented path every other
//!   method is a 405 (so the router has no method the document lacks).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeSet;

use common::hub::Hub;
use hub_daemon::catalog::Role;
use integration_tests::http::call_as;
use serde_json::{json, Value};

/// Every route of the hub, as (method, path).
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/healthz"),
    ("GET", "/metrics"),
    ("GET", "/api/v1/openapi.json"),
    ("GET", "/api/v1/vms"),
    ("PUT", "/api/v1/vms/{vm_name}"),
    ("GET", "/api/v1/vms/{vm_name}"),
    ("DELETE", "/api/v1/vms/{vm_name}"),
    ("GET", "/api/v1/repositories"),
    ("POST", "/api/v1/repositories"),
    ("GET", "/api/v1/repositories/{id}"),
    ("GET", "/api/v1/nodes"),
    ("GET", "/api/v1/policies"),
    ("PUT", "/api/v1/policies/{id}"),
    ("GET", "/api/v1/policies/{id}"),
    ("DELETE", "/api/v1/policies/{id}"),
    ("POST", "/api/v1/prune"),
    ("POST", "/api/v1/backups"),
    ("GET", "/api/v1/backups"),
    ("GET", "/api/v1/backups/{id}"),
    ("DELETE", "/api/v1/backups/{id}"),
    ("POST", "/api/v1/backups/{id}/complete"),
    ("POST", "/api/v1/backups/{id}/abort"),
    ("POST", "/api/v1/backups/{id}/progress"),
    ("POST", "/api/v1/backups/{id}/verify"),
    ("POST", "/api/v1/backups/{id}/offload"),
    ("POST", "/api/v1/backups/{id}/evict"),
    ("POST", "/api/v1/backups/{id}/restore"),
    ("DELETE", "/api/v1/backups/{id}/restore"),
];

const METHODS: &[&str] = &["GET", "PUT", "POST", "DELETE", "PATCH"];

fn doc() -> Value {
    serde_json::to_value(hub_daemon::api::openapi()).unwrap()
}

/// (method, path) of every operation in `doc`.
fn operations(doc: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for m in METHODS {
            if item.get(m.to_lowercase()).is_some() {
                out.insert((m.to_string(), path.clone()));
            }
        }
    }
    out
}

#[test]
fn the_document_lists_exactly_the_routes() {
    let documented = operations(&doc());
    let listed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    let missing: Vec<_> = listed.difference(&documented).collect();
    let unlisted: Vec<_> = documented.difference(&listed).collect();
    assert!(
        missing.is_empty(),
        "routes missing from the document: {missing:?}"
    );
    assert!(
        unlisted.is_empty(),
        "documented operations this test does not know (add them to ROUTES): {unlisted:?}"
    );
}

/// Paths given to axum directly in the API's source: routes that bypass
/// `routes!` and so its documentation.
#[test]
fn no_route_bypasses_the_document() {
    let documented: BTreeSet<String> = operations(&doc()).into_iter().map(|(_, p)| p).collect();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("rs") {
            continue;
        }
        let src = std::fs::read_to_string(&path).unwrap();
        for call in [".route(", ".route_service(", ".nest(", ".nest_service("] {
            for (at, _) in src.match_indices(call) {
                // The first string literal after the call is its path.
                let rest = &src[at + call.len()..];
                let Some(open) = rest.find('"') else { continue };
                let lit = &rest[open + 1..];
                let Some(close) = lit.find('"') else { continue };
                found.push((path.clone(), lit[..close].to_owned()));
            }
        }
    }
    let undocumented: Vec<_> = found
        .iter()
        .filter(|(_, p)| !documented.contains(p))
        .collect();
    assert!(
        undocumented.is_empty(),
        "routes added outside utoipa_axum::routes! and missing from the document \
         (annotate the handler with #[utoipa::path] and register it with routes!): {undocumented:?}"
    );
}

/// The auth table and the document agree: every route the table names is
/// documented, and the access it gives shows in the document (open routes
/// have no security requirement and no 401; the others have both).
#[test]
fn auth_table_routes_are_documented_with_their_access() {
    let doc = doc();
    let ops = operations(&doc);
    let matches = |pattern: &str, path: &str| {
        let p: Vec<_> = pattern.split('/').collect();
        let s: Vec<_> = path.split('/').collect();
        p.len() == s.len()
            && p.iter()
                .zip(&s)
                .all(|(a, b)| a == b || (*a == "*" && b.starts_with('{')))
    };
    for (m, pattern, _) in hub_daemon::api::auth::ROUTES {
        assert!(
            ops.iter().any(|(om, op)| om == m && matches(pattern, op)),
            "{m} {pattern} is in the auth table but not in the document"
        );
    }
    for (m, path) in &ops {
        let op = &doc["paths"][path][m.to_lowercase()];
        let open = matches!(
            hub_daemon::api::auth::required(&m.parse().unwrap(), &concrete(path)),
            hub_daemon::api::auth::Access::Open
        );
        assert_eq!(op["responses"].get("401").is_none(), open, "{m} {path}");
        assert_eq!(op.get("security").is_none(), open, "{m} {path}");
    }
}

/// Every `$ref` in `v` points at a component that exists.
fn check_refs(doc: &Value, v: &Value, at: &str) {
    match v {
        Value::Object(o) => {
            if let Some(Value::String(r)) = o.get("$ref") {
                let ptr = r.strip_prefix('#').expect("local refs only");
                assert!(doc.pointer(ptr).is_some(), "{at}: dangling $ref {r}");
            }
            for (k, x) in o {
                check_refs(doc, x, &format!("{at}/{k}"));
            }
        }
        Value::Array(a) => a.iter().for_each(|x| check_refs(doc, x, at)),
        _ => {}
    }
}

#[test]
fn document_is_openapi_3_1_with_errors_on_every_operation() {
    let doc = doc();
    assert!(
        doc["openapi"].as_str().unwrap().starts_with("3.1."),
        "{}",
        doc["openapi"]
    );
    check_refs(&doc, &doc, "");
    let error_ref = json!({"$ref": "#/components/schemas/ErrorBody"});
    for (m, path) in operations(&doc) {
        let responses = doc["paths"][&path][m.to_lowercase()]["responses"]
            .as_object()
            .unwrap();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{m} {path}: no success status"
        );
        for status in ["414", "500"] {
            assert!(responses.contains_key(status), "{m} {path}: no {status}");
        }
        for (status, r) in responses {
            if !status.starts_with('2') {
                assert_eq!(
                    r["content"]["application/json"]["schema"], error_ref,
                    "{m} {path} {status}: not the error shape"
                );
            }
        }
        // A path parameter can be malformed: 400; the entity it names can
        // be absent: 404 (PUT creates it instead).
        if path.contains('{') {
            assert!(responses.contains_key("400"), "{m} {path}: no 400");
            if m != "PUT" {
                assert!(responses.contains_key("404"), "{m} {path}: no 404");
            }
        }
        // A body can be malformed (400), too large (413) or not JSON (415).
        if doc["paths"][&path][m.to_lowercase()]
            .get("requestBody")
            .is_some()
        {
            for status in ["400", "413", "415"] {
                assert!(responses.contains_key(status), "{m} {path}: no {status}");
            }
        }
    }
}

/// A concrete path for a documented one: parameters get a valid name that
/// exists nowhere.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| {
            if seg.starts_with('{') {
                "no-such-thing"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

/// The route fallback's 404 (as opposed to an entity's).
fn is_route_fallback(r: &integration_tests::http::Response) -> bool {
    r.status == 404
        && r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("route "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_document_matches_the_router() {
    let hub = Hub::start().await;
    let r = hub.get("/api/v1/openapi.json").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let served: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(served, doc(), "the served document is the built one");

    let ops = operations(&served);
    let paths: BTreeSet<&String> = ops.iter().map(|(_, p)| p).collect();
    for path in paths {
        let url = concrete(path);
        for m in METHODS {
            // A body that parses as JSON but is no valid request body:
            // nothing gets created, and a routed handler still answers.
            let body = (*m != "GET").then(|| json!({"not": "a field"}));
            let r = call_as(hub.addr, None, m, &url, body.as_ref()).await;
            let documented = ops.contains(&(m.to_string(), path.clone()));
            if documented {
                assert!(
                    !is_route_fallback(&r) && r.status != 405,
                    "{m} {path} is documented but not routed: {} {}",
                    r.status,
                    r.text()
                );
                let op = &served["paths"][path][m.to_lowercase()];
                assert!(
                    op["responses"].get(r.status.to_string()).is_some(),
                    "{m} {url}: status {} is not documented: {}",
                    r.status,
                    r.text()
                );
            } else {
                assert_eq!(
                    r.status,
                    405,
                    "{m} {path} is routed but not documented: {}",
                    r.text()
                );
            }
        }
    }
}

/// The document is readable without a token even once tokens exist (it is
/// no secret, and a client needs it first); the API itself is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_document_needs_no_token() {
    let hub = Hub::start().await;
    let catalog = hub.daemon.as_ref().unwrap().backups().catalog().clone();
    let admin = catalog.create_token("root", Role::Admin).await.unwrap();
    let r = call_as(hub.addr, None, "GET", "/api/v1/openapi.json", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["openapi"], doc()["openapi"]);
    // Open means no credentials are looked at: not even a bad or a
    // callback token is refused there (the document lists no 401).
    for token in [None, Some("hub_0000"), Some("hcb_0000"), Some("")] {
        for path in ["/api/v1/openapi.json", "/healthz", "/"] {
            let r = call_as(hub.addr, token, "GET", path, None).await;
            assert_eq!(r.status, 200, "{path} with {token:?}: {}", r.text());
        }
    }
    let r = call_as(hub.addr, None, "GET", "/api/v1/vms", None).await;
    assert_eq!(r.status, 401);
    let r = call_as(hub.addr, Some(&admin), "GET", "/api/v1/vms", None).await;
    assert_eq!(r.status, 200);
}

/// The JSON examples under `## {heading}` in `md`, in order.
fn examples_under(md: &str, heading: &str) -> Vec<Value> {
    let start = md
        .find(&format!("\n## {heading}"))
        .unwrap_or_else(|| panic!("no section {heading:?}"));
    let mut section = &md[start + 1..];
    if let Some(end) = section[3..].find("\n## ") {
        section = &section[..end + 3];
    }
    let mut out = Vec::new();
    while let Some(open) = section.find("```json\n") {
        let body = &section[open + 8..];
        let close = body.find("```").unwrap();
        out.push(
            serde_json::from_str(&body[..close])
                .unwrap_or_else(|e| panic!("example under {heading:?} is not JSON: {e}")),
        );
        section = &body[close + 3..];
    }
    assert!(!out.is_empty(), "no JSON example under {heading:?}");
    out
}

fn example_under(md: &str, heading: &str) -> Value {
    examples_under(md, heading).remove(0)
}

/// The callback bodies the appliance contract shows vendors are bodies the
/// hub's own handlers accept (parsed with the handlers' types), and the
/// document's schemas name the same fields.
#[test]
fn contract_examples_parse_as_the_documented_bodies() {
    let md = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/sna-contract.md"),
    )
    .unwrap();
    let doc = doc();
    let schemas = &doc["components"]["schemas"];
    let fields = |schema: &str| -> BTreeSet<String> {
        schemas[schema]["properties"]
            .as_object()
            .unwrap_or_else(|| panic!("no schema {schema}"))
            .keys()
            .cloned()
            .collect()
    };
    let keys = |v: &Value| -> BTreeSet<String> { v.as_object().unwrap().keys().cloned().collect() };

    let progress = example_under(&md, "progress");
    serde_json::from_value::<sna_contract::ProgressRequest>(progress.clone()).unwrap();
    assert!(keys(&progress).is_subset(&fields("ProgressRequest")));
    assert!(keys(&progress["disks"][0]).is_subset(&fields("DiskProgress")));

    let complete = example_under(&md, "complete");
    let parsed: hub_daemon::model::CompleteRequest =
        serde_json::from_value(complete.clone()).unwrap();
    assert_eq!(parsed.disks.len(), 2);
    assert!(keys(&complete).is_subset(&fields("CompleteRequest")));
    for d in complete["disks"].as_array().unwrap() {
        assert!(keys(d).is_subset(&fields("DiskChange")), "{d}");
    }

    let abort = example_under(&md, "abort");
    let parsed: hub_daemon::model::AbortRequest = serde_json::from_value(abort.clone()).unwrap();
    assert!(parsed.reason.is_some());
    assert!(keys(&abort).is_subset(&fields("AbortRequest")));

    // The hub's error examples are the documented error shape.
    let errors: Vec<Value> = ["Refusals", "complete"]
        .iter()
        .flat_map(|h| examples_under(&md, h))
        .filter(|v| v.get("error").is_some())
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    for e in &errors {
        assert_eq!(keys(e), fields("ErrorBody"), "{e}");
        assert_eq!(keys(&e["error"]), fields("ErrorDetail"), "{e}");
    }
}
