//! `/api/v1/policies`: retention policies, and `POST /api/v1/prune`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::doc::{BodyErrors, E400, E404, E409, E422, E503, E507};
use super::error::ApiError;
use super::json::{AppJson, AppPath};
use super::AppState;
use crate::backup::{PruneReport, PruneRequest};
use crate::catalog::Policy;
use crate::error::DaemonError;
use crate::names;

/// Largest value of any option: beyond any sensible retention (a century
/// of days), and small enough that no sum over the options overflows.
const MAX_OPTION: i64 = 100_000;

/// Body of `PUT /api/v1/policies/{id}`; every option defaults to 0 (off).
/// Signed so that a negative value is our 400 with a clear message.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    /// The N newest.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000)]
    keep_last: i64,
    /// Newest of each of the N most recent hours.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000)]
    keep_hourly: i64,
    /// … days.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000)]
    keep_daily: i64,
    /// … ISO weeks.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000)]
    keep_weekly: i64,
    /// … months.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000)]
    keep_monthly: i64,
    /// … years.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000)]
    keep_yearly: i64,
    /// Longest image chain before a forced full (stored, not yet enforced).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000)]
    max_chain_length: i64,
    /// Nothing younger is removed.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000)]
    min_retention_days: i64,
    /// Re-verify interval (stored, not yet enforced).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000)]
    verify_every_days: i64,
    /// Offload to the repository's S3 tier this many days after
    /// completion, once verified ok.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000)]
    offload_after_days: i64,
    /// Delete the local copy of an offloaded restore point this many days
    /// after completion.
    #[serde(default)]
    #[schema(minimum = 0, maximum = 100_000)]
    evict_local_after_days: i64,
}

fn option(name: &str, v: i64) -> Result<u32, ApiError> {
    if !(0..=MAX_OPTION).contains(&v) {
        return Err(ApiError::bad_request(format!(
            "{name} must be between 0 and {MAX_OPTION}"
        )));
    }
    // In range by the check above.
    Ok(v as u32)
}

fn check_id(id: &str) -> Result<(), ApiError> {
    names::validate("policy id", id).map_err(ApiError::bad_request)
}

fn not_found(id: &str) -> ApiError {
    ApiError::Daemon(DaemonError::NotFound {
        what: "policy",
        id: id.to_owned(),
    })
}

/// `GET /api/v1/policies`.
#[utoipa::path(
    get,
    path = "/api/v1/policies",
    tag = "policies",
    responses((status = 200, description = "Every policy.", body = Vec<Policy>))
)]
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<Policy>>, ApiError> {
    Ok(Json(st.catalog().policies().await?))
}

/// `GET /api/v1/policies/{id}`.
#[utoipa::path(
    get,
    path = "/api/v1/policies/{id}",
    tag = "policies",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$", description = "Policy id")),
    responses((status = 200, description = "The policy.", body = Policy), E400, E404)
)]
pub async fn get(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<Policy>, ApiError> {
    check_id(&id)?;
    let p = st.catalog().policy(&id).await?;
    p.map(Json).ok_or_else(|| not_found(&id))
}

/// `PUT /api/v1/policies/{id}`: create (201) or replace (200).
#[utoipa::path(
    put,
    path = "/api/v1/policies/{id}",
    tag = "policies",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$", description = "Policy id")),
    request_body = PolicyBody,
    responses(
        (status = 200, description = "Replaced.", body = Policy),
        (status = 201, description = "Created.", body = Policy),
        BodyErrors,
        E507,
    )
)]
pub async fn put(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
    AppJson(b): AppJson<PolicyBody>,
) -> Result<(StatusCode, Json<Policy>), ApiError> {
    check_id(&id)?;
    let p = Policy {
        id,
        keep_last: option("keep_last", b.keep_last)?,
        keep_hourly: option("keep_hourly", b.keep_hourly)?,
        keep_daily: option("keep_daily", b.keep_daily)?,
        keep_weekly: option("keep_weekly", b.keep_weekly)?,
        keep_monthly: option("keep_monthly", b.keep_monthly)?,
        keep_yearly: option("keep_yearly", b.keep_yearly)?,
        max_chain_length: option("max_chain_length", b.max_chain_length)?,
        min_retention_days: option("min_retention_days", b.min_retention_days)?,
        verify_every_days: option("verify_every_days", b.verify_every_days)?,
        offload_after_days: option("offload_after_days", b.offload_after_days)?,
        evict_local_after_days: option("evict_local_after_days", b.evict_local_after_days)?,
    };
    let created = st.catalog().put_policy(p.clone()).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(p)))
}

/// `DELETE /api/v1/policies/{id}`: 409 while a backup names it.
#[utoipa::path(
    delete,
    path = "/api/v1/policies/{id}",
    tag = "policies",
    params(("id" = String, Path, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$", description = "Policy id")),
    responses((status = 204, description = "Deleted."), E400, E404, E409, E507)
)]
pub async fn delete(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<StatusCode, ApiError> {
    check_id(&id)?;
    st.catalog().delete_policy(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/prune`: plan (`dry_run`) or run retention.
#[utoipa::path(
    post,
    path = "/api/v1/prune",
    tag = "policies",
    request_body = PruneRequest,
    responses(
        (status = 200, description = "What was (or, with dry_run, would be) kept, removed and merged, per VM and repository.", body = Vec<PruneReport>),
        BodyErrors,
        E404,
        E409,
        E422,
        E503,
        E507,
    )
)]
pub async fn prune(
    State(st): State<AppState>,
    AppJson(req): AppJson<PruneRequest>,
) -> Result<Json<Vec<PruneReport>>, ApiError> {
    if let Some(vm) = &req.vm_name {
        names::validate("vm_name", vm).map_err(ApiError::bad_request)?;
    }
    if let Some(r) = &req.repository_id {
        names::validate("repository_id", r).map_err(ApiError::bad_request)?;
    }
    // Own task: a client hanging up must not cut a prune between its
    // merges and its commit.
    let backups = std::sync::Arc::clone(st.backups());
    let out = tokio::spawn(async move { backups.prune(req).await })
        .await
        .map_err(|e| DaemonError::Internal(format!("prune task: {e}")))??;
    Ok(Json(out))
}
