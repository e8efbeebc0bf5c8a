//! Forwarding a request to the node that owns what it acts on. A backup's
//! files and NBD exports live on one node of the fleet (its repository's);
//! a request that needs them (start, complete, abort, progress, verify,
//! offload, evict, restore, delete, and the live figures of a running
//! backup) may reach any hub, and is served by that node.
//!
//! * The request goes on with the same method, path, body, `Content-Type`
//!   and `Authorization` (the fleet shares the catalog, so a token or a
//!   backup's callback token valid here is valid there: the owner checks
//!   it again). The owner's answer comes back verbatim, status and body.
//! * In a shared repository (storage every node mounts) the owner is the
//!   node managing the backup's chain; while it is away, any hub serves
//!   (the files are reachable from all).
//! * Otherwise a node whose lease ran out gets nothing forwarded: 503 in
//!   the error shape. Only a `GET` falls back to what the catalog says
//!   (without the live figures only the owner has).
//! * One hop at most: a forwarded request carries [`FORWARDED_BY`]; a hub
//!   that receives one for a backup it does not own (the two hubs disagree
//!   about the catalog, say during a node's rename) answers 503 instead
//!   of forwarding it again, so no request can loop between hubs.
//! * Hubs reach each other at the `api_url` they registered; with
//!   `--api-tls` it is `https://` and the certificate must be signed by the
//!   CA of this hub's certificates directory (`ca-cert.pem`: one CA for the
//!   fleet, as `hub-daemon tls init` sets it up).

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::Full;

use super::error::ApiError;
use super::json::BODY_LIMIT;
use super::AppState;
use crate::catalog::NodeInfo;
use crate::error::DaemonError;
use crate::http_client::Endpoint;
use crate::names;
use crate::time::now_ms;

/// Set on a forwarded request: the node that forwarded it.
pub const FORWARDED_BY: HeaderName = HeaderName::from_static("x-hub-forwarded-by");
/// Set on every answer that passed the router: the node that served it
/// (the owner's, for a forwarded request), for whoever debugs a fleet.
pub const SERVED_BY: HeaderName = HeaderName::from_static("x-hub-node");
/// Longest answer relayed (a start answer is a few KiB per disk).
const MAX_ANSWER: usize = 4 << 20;
/// How long connecting to the owner may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the owner may take to answer (it may wait on its appliance,
/// or upload a restore point to S3).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// The backup a request acts on, when it is one only the backup's node
/// can serve; `None` for every other route (catalog-only routes are
/// answered by any hub).
fn owned_target<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    let rest = path.strip_prefix("/api/v1/backups/")?;
    let (id, action) = match rest.split_once('/') {
        Some((id, action)) => (id, Some(action)),
        None => (rest, None),
    };
    let needs_owner = matches!(
        (method.as_str(), action),
        ("GET" | "DELETE", None)
            | (
                "POST",
                Some(
                    "complete" | "abort" | "progress" | "verify" | "offload" | "evict" | "restore"
                )
            )
            | ("DELETE", Some("restore"))
    );
    (needs_owner && names::validate_id(id).is_ok()).then_some(id)
}

/// Middleware: serve here what this node owns (or what no node does:
/// the handler answers 404); forward the rest to its owner. Every answer
/// says which node served it ([`SERVED_BY`]).
pub async fn layer(State(st): State<AppState>, req: Request, next: Next) -> Response {
    let mut answer = route(&st, req, next).await;
    if let Ok(v) = HeaderValue::from_str(st.catalog().node_id()) {
        answer.headers_mut().entry(SERVED_BY).or_insert(v);
    }
    answer
}

async fn route(st: &AppState, req: Request, next: Next) -> Response {
    let Some(id) = owned_target(req.method(), req.uri().path()).map(str::to_owned) else {
        return next.run(req).await;
    };
    let owner = match st.catalog().backup_owner(&id).await {
        Ok(Some(owner)) => owner,
        Ok(None) => return next.run(req).await,
        Err(e) => return ApiError::from(e).into_response(),
    };
    let node = owner.node_id;
    if node == st.catalog().node_id() {
        return next.run(req).await;
    }
    let is_get = req.method() == Method::GET;
    // Only a running backup has figures the catalog lacks.
    if is_get && owner.status != "running" {
        return next.run(req).await;
    }
    // A shared repository's files are here too: while the node managing
    // the chain is away, this one serves (a dead node touches nothing).
    let known = if owner.shared {
        match st.catalog().node(&node, now_ms()).await {
            Ok(Some(n)) if n.alive() => Some(n),
            Ok(_) => return next.run(req).await,
            Err(e) => return ApiError::from(e).into_response(),
        }
    } else {
        None
    };
    if let Some(from) = req.headers().get(FORWARDED_BY) {
        let from = String::from_utf8_lossy(from.as_bytes())
            .chars()
            .take(64)
            .collect::<String>();
        return ApiError::from(DaemonError::Unavailable(format!(
            "forwarded here by node {from:?}, but backup {id} belongs to node {node:?}: \
             not forwarding a second time"
        )))
        .into_response();
    }
    let (parts, body) = req.into_parts();
    let body = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => return ApiError::PayloadTooLarge { limit: BODY_LIMIT }.into_response(),
    };
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path().to_owned(), |pq| pq.as_str().to_owned());
    let method = parts.method.clone();
    let sent = match known {
        // Looked up just above: no second catalog query.
        Some(n) => send_to(st, &n, method, &path, &parts.headers, body.clone()).await,
        None => to_node(st, &node, method, &path, &parts.headers, body.clone()).await,
    };
    match sent {
        Ok(answer) => answer,
        // The owner is away: what the catalog knows is still an answer.
        Err(e) if is_get => {
            tracing::debug!(%id, %node, error = %e, "owner unreachable; answering from the catalog");
            next.run(Request::from_parts(parts, Body::from(body))).await
        }
        Err(e) => e.into_response(),
    }
}

/// 503 with `why`.
fn unavailable(why: String) -> ApiError {
    ApiError::from(DaemonError::Unavailable(why))
}

/// Send `method path` with `body` to node `node_id`; its answer.
pub async fn to_node(
    st: &AppState,
    node_id: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let node = st
        .catalog()
        .node(node_id, now_ms())
        .await?
        .ok_or_else(|| unavailable(format!("node {node_id:?} has never registered")))?;
    if !node.alive() {
        return Err(unavailable(format!(
            "node {node_id:?} lost its heartbeat lease (last heard from at {})",
            node.heartbeat_at
        )));
    }
    send_to(st, &node, method, path, headers, body).await
}

/// Send `method path` with `body` to `node`, known alive; its answer.
async fn send_to(
    st: &AppState,
    node: &NodeInfo,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let node_id = node.node_id.as_str();
    let endpoint = Endpoint::parse("node API URL", &node.api_url, st.fleet_tls())
        .map_err(|e| unavailable(format!("node {node_id:?}: {e}")))?;
    let mut req = endpoint
        .request(method, path)
        .header(FORWARDED_BY, st.catalog().node_id());
    for name in [CONTENT_TYPE, AUTHORIZATION] {
        if let Some(v) = headers.get(&name) {
            req = req.header(name, v);
        }
    }
    let req = req
        .body(Full::new(body))
        .map_err(|e| DaemonError::Internal(format!("forward request: {e}")))?;
    let (status, answer) = tokio::time::timeout(
        ANSWER_TIMEOUT,
        endpoint.send(req, MAX_ANSWER, CONNECT_TIMEOUT),
    )
    .await
    .map_err(|_| unavailable(format!("node {node_id:?} did not answer in time")))?
    .map_err(|e| unavailable(format!("node {node_id:?} at {}: {e}", node.api_url)))?;
    tracing::info!(node = node_id, %path, %status, "request forwarded to the owning node");
    let mut answer_builder = Response::builder().status(status);
    if let Ok(v) = HeaderValue::from_str(node_id) {
        answer_builder = answer_builder.header(SERVED_BY, v);
    }
    // 204 has no body and therefore no type.
    if !answer.is_empty() {
        answer_builder = answer_builder.header(CONTENT_TYPE, "application/json");
    }
    answer_builder
        .body(Body::from(answer))
        .map_err(|e| DaemonError::Internal(format!("relaying the answer: {e}")).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_what_needs_the_owners_files_is_forwarded() {
        let t = |m: &str, p: &str| owned_target(&m.parse().unwrap(), p).map(str::to_owned);
        let id = Some("vm-20261130-x".to_owned());
        assert_eq!(t("GET", "/api/v1/backups/vm-20261130-x"), id);
        assert_eq!(t("DELETE", "/api/v1/backups/vm-20261130-x"), id);
        for action in [
            "complete", "abort", "progress", "verify", "offload", "evict", "restore",
        ] {
            let p = format!("/api/v1/backups/vm-20261130-x/{action}");
            assert_eq!(t("POST", &p), id, "{p}");
        }
        assert_eq!(t("DELETE", "/api/v1/backups/vm-20261130-x/restore"), id);
        // Catalog-only routes, unknown actions and bad ids stay here.
        assert_eq!(t("GET", "/api/v1/backups"), None);
        assert_eq!(t("POST", "/api/v1/backups"), None);
        assert_eq!(t("GET", "/api/v1/backups/vm-x/restore"), None);
        assert_eq!(t("POST", "/api/v1/backups/vm-x/frobnicate"), None);
        assert_eq!(t("POST", "/api/v1/backups/../complete"), None);
        assert_eq!(t("GET", "/api/v1/vms/vm-x"), None);
    }
}
