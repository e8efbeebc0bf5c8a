//! `/api/v1/backups`: start, inspect, complete, abort, delete, restore.

use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Deserialize;
use sna_contract::ProgressRequest;

use super::auth::CallbackCaller;
use super::doc::{BodyErrors, E400, E404, E409, E422, E502, E503, E504, E507};
use super::error::ApiError;
use super::json::{AppJson, AppPath, AppQuery, OptionalJson};
use super::AppState;
use crate::error::DaemonError;
use crate::model::{
    AbortRequest, BackupRecord, BackupRequest, BackupStarted, CompleteRequest, RestoreRequest,
    RestoreStarted,
};
use crate::names;

fn check_id(id: &str) -> Result<(), ApiError> {
    names::validate_id(id).map_err(ApiError::bad_request)
}

/// `POST /api/v1/backups`: back up every disk of a VM.
#[utoipa::path(
    post,
    path = "/api/v1/backups",
    tag = "backups",
    request_body = BackupRequest,
    responses(
        (status = 201, description = "Started: one NBD export per disk, and the appliance told (if one is configured).", body = BackupStarted),
        BodyErrors,
        E404,
        E409,
        E422,
        E502,
        E503,
        E504,
        E507,
    )
)]
pub async fn start(
    State(st): State<AppState>,
    headers: HeaderMap,
    AppJson(req): AppJson<BackupRequest>,
) -> Result<Response, ApiError> {
    // A repository of another node: that node runs the backup, and its
    // answer (its NBD targets) is relayed as it is. A shared repository:
    // the node placement picks (this one unless forwarded here already).
    let forwarded = headers.contains_key(super::forward::FORWARDED_BY);
    if let Some(repo) = st.catalog().repository(&req.repository_id).await? {
        let runner = if repo.shared && !forwarded {
            st.catalog()
                .place_in_shared(&req.vm_name, &repo.id, crate::time::now_ms())
                .await?
                .unwrap_or_else(|| st.catalog().node_id().to_owned())
        } else if repo.shared {
            st.catalog().node_id().to_owned()
        } else {
            repo.node_id.clone()
        };
        if runner != st.catalog().node_id() {
            if forwarded {
                return Err(DaemonError::Unavailable(format!(
                    "forwarded here, but repository {} belongs to node {:?}: \
                     not forwarding a second time",
                    repo.id, repo.node_id
                ))
                .into());
            }
            let body = serde_json::to_vec(&req)
                .map_err(|e| DaemonError::Internal(format!("forward body: {e}")))?;
            return super::forward::to_node(
                &st,
                &runner,
                Method::POST,
                "/api/v1/backups",
                &headers,
                body.into(),
            )
            .await;
        }
    }
    // In its own task: a client that hangs up while the appliance is
    // being asked must not cut a start in half (it either completes or
    // releases everything).
    let backups = std::sync::Arc::clone(st.backups());
    let started = tokio::spawn(async move { backups.start(req).await })
        .await
        .map_err(|e| DaemonError::Internal(format!("backup start task: {e}")))??;
    Ok((StatusCode::CREATED, Json(started)).into_response())
}

/// Filters of `GET /api/v1/backups`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    /// Only this VM's.
    #[param(pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")]
    vm_name: Option<String>,
    /// Only those in this state.
    #[param(inline, value_type = Option<StatusFilter>)]
    status: Option<String>,
}

/// The states `GET /api/v1/backups?status=` filters on (documentation;
/// the handler checks the same three).
#[derive(Debug, utoipa::ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)] // Never built: it only lists the states in the document.
pub enum StatusFilter {
    /// Exporting, waiting for the sender.
    Running,
    /// A restore point.
    Completed,
    /// Failed or aborted.
    Failed,
}

/// `GET /api/v1/backups?vm_name=&status=`.
#[utoipa::path(
    get,
    path = "/api/v1/backups",
    tag = "backups",
    params(ListQuery),
    responses((status = 200, description = "Backups, oldest first, with live figures for running ones.", body = Vec<BackupRecord>), E400)
)]
pub async fn list(
    State(st): State<AppState>,
    AppQuery(q): AppQuery<ListQuery>,
) -> Result<Json<Vec<BackupRecord>>, ApiError> {
    if let Some(vm) = &q.vm_name {
        names::validate("vm_name", vm).map_err(ApiError::bad_request)?;
    }
    if let Some(s) = &q.status {
        if !matches!(s.as_str(), "running" | "completed" | "failed") {
            return Err(ApiError::bad_request(
                "status must be running, completed or failed",
            ));
        }
    }
    let mut list = st.catalog().backups(q.vm_name, q.status).await?;
    for b in &mut list {
        st.backups().add_live_stats(b);
    }
    Ok(Json(list))
}

/// `GET /api/v1/backups/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/backups/{id}",
    tag = "backups",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$", description = "Backup id")),
    responses(
        (status = 200, description = "The backup, with live figures while it runs.", body = BackupRecord),
        E400,
        E404,
    )
)]
pub async fn get(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<BackupRecord>, ApiError> {
    check_id(&id)?;
    Ok(Json(st.backups().record(&id).await?))
}

/// `DELETE /api/v1/backups/{id}`.
#[utoipa::path(
    delete,
    path = "/api/v1/backups/{id}",
    tag = "backups",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$", description = "Backup id")),
    responses(
        (status = 204, description = "Deleted with its images."),
        E400,
        E404,
        E409,
        E422,
        E507,
    )
)]
pub async fn delete(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    st.backups().delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/backups/{id}/complete`.
#[utoipa::path(
    post,
    path = "/api/v1/backups/{id}/complete",
    tag = "backups",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$", description = "Backup id")),
    request_body = Option<CompleteRequest>,
    responses(
        (status = 200, description = "Completed: a restore point.", body = BackupRecord),
        BodyErrors,
        E404,
        E409,
        E422,
        E507,
    )
)]
pub async fn complete(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
    OptionalJson(req): OptionalJson<CompleteRequest>,
) -> Result<Json<BackupRecord>, ApiError> {
    check_id(&id)?;
    if req
        .disks
        .iter()
        .any(|d| d.change_id.as_ref().is_some_and(|c| c.len() > 1024))
    {
        return Err(ApiError::bad_request("change_id too long"));
    }
    if let Some(d) = req.disks.iter().find(|d| {
        d.digest
            .as_deref()
            .is_some_and(|h| disk_digest::Hash::from_hex(h).is_none())
    }) {
        return Err(ApiError::bad_request(format!(
            "disk {}: digest must be 64 hex digits",
            d.disk_id
        )));
    }
    Ok(Json(st.backups().complete(&id, req).await?))
}

/// `POST /api/v1/backups/{id}/abort` (by an operator, or by the appliance
/// with the backup's callback token: then it is not sent a cancel).
#[utoipa::path(
    post,
    path = "/api/v1/backups/{id}/abort",
    tag = "backups",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$", description = "Backup id")),
    request_body = Option<AbortRequest>,
    responses(
        (status = 200, description = "Aborted: failed, its exports closed.", body = BackupRecord),
        BodyErrors,
        E404,
        E409,
        E507,
    )
)]
pub async fn abort(
    State(st): State<AppState>,
    caller: Option<Extension<CallbackCaller>>,
    AppPath(id): AppPath<String>,
    OptionalJson(req): OptionalJson<AbortRequest>,
) -> Result<Json<BackupRecord>, ApiError> {
    check_id(&id)?;
    let by_appliance = caller.is_some();
    let default = if by_appliance {
        "aborted by the appliance"
    } else {
        "aborted by request"
    };
    let reason = req.reason.unwrap_or_else(|| default.into());
    let reason: String = reason.chars().take(1024).collect();
    Ok(Json(
        st.backups().abort_as(&id, &reason, by_appliance).await?,
    ))
}

/// `POST /api/v1/backups/{id}/progress`: the sender's latest figures per
/// disk, shown by `GET /api/v1/backups/{id}` while it runs.
#[utoipa::path(
    post,
    path = "/api/v1/backups/{id}/progress",
    tag = "backups",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$", description = "Backup id")),
    request_body = ProgressRequest,
    responses(
        (status = 204, description = "Recorded."),
        BodyErrors,
        E404,
        E409,
    )
)]
pub async fn progress(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
    AppJson(req): AppJson<ProgressRequest>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    st.backups().progress(&id, req).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/backups/{id}/verify`: re-read the chain of every disk in
/// the background; `GET` shows `verify_status` and the outcome.
#[utoipa::path(
    post,
    path = "/api/v1/backups/{id}/verify",
    tag = "backups",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$", description = "Backup id")),
    responses(
        (status = 202, description = "Verification started.", body = BackupRecord),
        E400,
        E404,
        E409,
        E422,
    )
)]
pub async fn verify(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<(StatusCode, Json<BackupRecord>), ApiError> {
    check_id(&id)?;
    Ok((StatusCode::ACCEPTED, Json(st.backups().verify(&id).await?)))
}

/// `POST /api/v1/backups/{id}/offload`: upload every local-only disk
/// image of a completed restore point that verified ok to its
/// repository's S3 tier (with Object Lock retention from its policy's
/// `min_retention_days`); answers when done. 409 unless completed and
/// verified ok, or without an S3 tier.
#[utoipa::path(
    post,
    path = "/api/v1/backups/{id}/offload",
    tag = "backups",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$", description = "Backup id")),
    responses(
        (status = 200, description = "Offloaded: every disk is `local+s3` (or `s3`).", body = BackupRecord),
        E400,
        E404,
        E409,
        E422,
        E502,
    )
)]
pub async fn offload(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<BackupRecord>, ApiError> {
    check_id(&id)?;
    Ok(Json(st.backups().offload(&id).await?))
}

/// `POST /api/v1/backups/{id}/evict`: delete the local copies of an
/// offloaded restore point's images (they come back, checked against
/// their SHA-256, before a restore, verify or merge needs them). 409
/// unless every disk is offloaded, or while the VM is backed up or any of
/// its restore points is restored or verified.
#[utoipa::path(
    post,
    path = "/api/v1/backups/{id}/evict",
    tag = "backups",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$", description = "Backup id")),
    responses(
        (status = 200, description = "Evicted: every disk is `s3`.", body = BackupRecord),
        E400,
        E404,
        E409,
    )
)]
pub async fn evict(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<BackupRecord>, ApiError> {
    check_id(&id)?;
    Ok(Json(st.backups().evict(&id).await?))
}

/// `POST /api/v1/backups/{id}/restore` (body optional: `{"writable": true}`
/// for an instant restore through throw-away overlays).
#[utoipa::path(
    post,
    path = "/api/v1/backups/{id}/restore",
    tag = "backups",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$", description = "Backup id")),
    request_body = Option<RestoreRequest>,
    responses(
        (status = 201, description = "Served over NBD for restore (writable: through throw-away overlays).", body = RestoreStarted),
        BodyErrors,
        E404,
        E409,
        E422,
        E503,
        E507,
    )
)]
pub async fn restore(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
    OptionalJson(req): OptionalJson<RestoreRequest>,
) -> Result<(StatusCode, Json<RestoreStarted>), ApiError> {
    check_id(&id)?;
    Ok((
        StatusCode::CREATED,
        Json(st.backups().start_restore(&id, req.writable).await?),
    ))
}

/// `DELETE /api/v1/backups/{id}/restore`.
#[utoipa::path(
    delete,
    path = "/api/v1/backups/{id}/restore",
    tag = "backups",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$", description = "Backup id")),
    responses(
        (status = 204, description = "Restore exports closed."),
        E400,
        E404,
    )
)]
pub async fn stop_restore(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    st.backups().stop_restore(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
