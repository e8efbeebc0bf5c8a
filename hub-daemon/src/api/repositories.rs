//! `/api/v1/repositories`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use super::doc::{BodyErrors, E400, E404, E409, E507};
use super::error::ApiError;
use super::json::{AppJson, AppPath};
use super::AppState;
use crate::error::DaemonError;
use crate::model::Repository;
use crate::names;

/// `GET /api/v1/repositories`.
#[utoipa::path(
    get,
    path = "/api/v1/repositories",
    tag = "repositories",
    responses((status = 200, description = "Every repository.", body = Vec<Repository>))
)]
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<Repository>>, ApiError> {
    Ok(Json(st.catalog().repositories().await?))
}

/// A repository with the space of its filesystem.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct RepositorySpace {
    /// Identifier.
    pub id: String,
    /// Absolute directory.
    pub path: String,
    /// The node holding its files. The space figures below are measured
    /// there: for another node's repository they are 0 (ask that node).
    pub node_id: String,
    /// Size of the filesystem holding it.
    pub capacity_bytes: u64,
    /// Bytes free for the hub on that filesystem.
    pub free_bytes: u64,
    /// Bytes used on that filesystem (by anything).
    pub used_bytes: u64,
    /// Bytes of completed restore points' images in this repository.
    pub backup_bytes: u64,
    /// Free space a backup start keeps in reserve (`space_reserve`).
    pub reserve_bytes: u64,
}

/// `GET /api/v1/repositories/{id}`: the repository with its space.
#[utoipa::path(
    get,
    path = "/api/v1/repositories/{id}",
    tag = "repositories",
    params(("id" = String, Path, description = "Repository id")),
    responses((status = 200, description = "The repository and its space.", body = RepositorySpace), E400, E404)
)]
pub async fn get(
    State(st): State<AppState>,
    AppPath(id): AppPath<String>,
) -> Result<Json<RepositorySpace>, ApiError> {
    let repo = st
        .catalog()
        .repository(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("repository", id.clone()))?;
    let path = std::path::PathBuf::from(&repo.path);
    let fs = if repo.node_id == st.catalog().node_id() {
        tokio::task::spawn_blocking(move || crate::space::fs_space(&path))
            .await
            .map_err(|e| DaemonError::Internal(format!("statvfs task failed: {e}")))?
            .map_err(|e| DaemonError::io(format!("repository {}", repo.path), e))?
    } else {
        // Its directory is on another host; the same path here is not it.
        crate::space::FsSpace::default()
    };
    let backup_bytes = st.catalog().repository_backup_bytes(&repo.id).await?;
    let reserve = crate::space::reserve(st.backups().config().space_reserve, fs.capacity_bytes);
    Ok(Json(RepositorySpace {
        id: repo.id,
        path: repo.path,
        node_id: repo.node_id,
        capacity_bytes: fs.capacity_bytes,
        free_bytes: fs.free_bytes,
        used_bytes: fs.used_bytes,
        backup_bytes,
        reserve_bytes: reserve,
    }))
}

/// `POST /api/v1/repositories`: register a directory under a configured
/// repository root (created if missing; see [`names::repository_dir`] for
/// what is refused).
#[utoipa::path(
    post,
    path = "/api/v1/repositories",
    tag = "repositories",
    request_body = Repository,
    responses(
        (status = 201, description = "Registered; `path` is the canonical directory.", body = Repository),
        BodyErrors,
        E409,
        E507,
    )
)]
pub async fn create(
    State(st): State<AppState>,
    AppJson(repo): AppJson<Repository>,
) -> Result<(StatusCode, Json<Repository>), ApiError> {
    names::validate("id", &repo.id).map_err(ApiError::bad_request)?;
    let path = repo.path.clone();
    let roots = st.backups().config().repository_roots();
    let canonical = tokio::task::spawn_blocking(move || names::repository_dir(&path, &roots))
        .await
        .map_err(|e| DaemonError::Internal(format!("repository task failed: {e}")))??;
    let repo = Repository {
        id: repo.id,
        path: canonical.display().to_string(),
        node_id: st.catalog().node_id().to_owned(),
    };
    st.catalog().create_repository(repo.clone()).await?;
    Ok((StatusCode::CREATED, Json(repo)))
}
