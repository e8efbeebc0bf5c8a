//! `/api/v1/backups`: start, inspect, complete, abort, delete, restore.

use axum::extract::State;
use axum::http::StatusCode;
use axum::{Extension, Json};
use serde::Deserialize;
use sna_contract::ProgressRequest;

use super::auth::CallbackCaller;
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
pub async fn start(
    State(st): State<AppState>,
    AppJson(req): AppJson<BackupRequest>,
) -> Result<(StatusCode, Json<BackupStarted>), ApiError> {
    // In its own task: a client that hangs up while the appliance is
    // being asked must not cut a start in half (it either completes or
    // releases everything).
    let backups = std::sync::Arc::clone(st.backups());
    let started = tokio::spawn(async move { backups.start(req).await })
        .await
        .map_err(|e| DaemonError::Internal(format!("backup start task: {e}")))??;
    Ok((StatusCode::CREATED, Json(started)))
}

/// Filters of `GET /api/v1/backups`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    vm_name: Option<String>,
    status: Option<String>,
}

/// `GET /api/v1/backups?vm_name=&status=`.
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
pub async fn get(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<BackupRecord>, ApiError> {
    check_id(&id)?;
    Ok(Json(st.backups().record(&id).await?))
}

/// `DELETE /api/v1/backups/{id}`.
pub async fn delete(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    st.backups().delete(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/backups/{id}/complete`.
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
pub async fn verify(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<(StatusCode, Json<BackupRecord>), ApiError> {
    check_id(&id)?;
    Ok((StatusCode::ACCEPTED, Json(st.backups().verify(&id).await?)))
}

/// `POST /api/v1/backups/{id}/restore` (body optional: `{"writable": true}`
/// for an instant restore through throw-away overlays).
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
pub async fn stop_restore(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    st.backups().stop_restore(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
