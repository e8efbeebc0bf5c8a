//! Forwarding a request to the node that owns what it acts on: a backup
//! started on one hub for a repository of another runs on that other
//! node (its files and NBD exports are there). The request goes on with
//! the same body and `Authorization` header (the fleet shares the catalog,
//! so a token valid here is valid there); the owner's answer comes back
//! verbatim, status and body. A node whose lease ran out gets nothing
//! forwarded: 503 in the error shape.

use std::time::Duration;

use axum::body::Body;
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE};
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use bytes::Bytes;
use http_body_util::Full;

use super::error::ApiError;
use super::AppState;
use crate::error::DaemonError;
use crate::http_client::Endpoint;
use crate::time::now_ms;

/// Longest answer relayed (a start answer is a few KiB per disk).
const MAX_ANSWER: usize = 4 << 20;
/// How long connecting to the owner may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the owner may take to answer (it may wait on its appliance).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);

/// Send `method path` with `body` to node `node_id`; its answer.
pub async fn to_node(
    st: &AppState,
    node_id: &str,
    method: Method,
    path: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Response, ApiError> {
    let unavailable = |why: String| ApiError::from(DaemonError::Unavailable(why));
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
    // HTTPS between hubs would need the fleet's CA here; not built yet.
    let endpoint = Endpoint::parse("node API URL", &node.api_url, None)
        .map_err(|e| unavailable(format!("node {node_id:?}: {e}")))?;
    let mut req = endpoint
        .request(method, path)
        .header(CONTENT_TYPE, "application/json");
    if let Some(auth) = headers.get(AUTHORIZATION) {
        req = req.header(AUTHORIZATION, auth);
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
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, "application/json")
        .body(Body::from(answer))
        .map_err(|e| DaemonError::Internal(format!("relaying the answer: {e}")).into())
}
