//! `/api/v1/repositories`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::Serialize;

use super::doc::{BodyErrors, E400, E404, E409, E507};
use super::error::ApiError;
use super::json::{AppJson, AppPath};
use super::AppState;
use crate::catalog::S3Settings;
use crate::error::DaemonError;
use crate::model::{Repository, RepositoryBody, S3Body, S3View};
use crate::names;

/// `GET /api/v1/repositories`.
#[utoipa::path(
    get,
    path = "/api/v1/repositories",
    tag = "repositories",
    responses((status = 200, description = "Every repository.", body = Vec<Repository>))
)]
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<Repository>>, ApiError> {
    let mut repos = st.catalog().repositories().await?;
    for r in &mut repos {
        r.s3 = s3_view(&st, &r.id).await?;
    }
    Ok(Json(repos))
}

/// The S3 tier of repository `id` as the API shows it (no secrets).
async fn s3_view(st: &AppState, id: &str) -> Result<Option<S3View>, ApiError> {
    Ok(st.catalog().repository_s3(id).await?.map(|s| S3View {
        credentials: if s.access_key_id.is_some() {
            "set".into()
        } else {
            "environment".into()
        },
        endpoint: s.endpoint,
        bucket: s.bucket,
        region: s.region,
        path_style: s.path_style,
    }))
}

/// Check an S3 tier as given and turn it into what the catalog stores.
fn s3_settings(b: S3Body) -> Result<S3Settings, ApiError> {
    let url: reqwest::Url = b
        .endpoint
        .parse()
        .map_err(|e| ApiError::bad_request(format!("s3.endpoint: {e}")))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(ApiError::bad_request(
            "s3.endpoint must be an http(s) URL with a host",
        ));
    }
    let bucket_ok = (3..=63).contains(&b.bucket.len())
        && b.bucket
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-')
        && !b.bucket.starts_with(['.', '-'])
        && !b.bucket.ends_with(['.', '-']);
    if !bucket_ok {
        return Err(ApiError::bad_request(
            "s3.bucket must be 3-63 of a-z 0-9 . - (starting and ending with a letter or digit)",
        ));
    }
    let printable =
        |v: &str| !v.is_empty() && v.len() <= 256 && v.bytes().all(|c| c.is_ascii_graphic());
    if !printable(&b.region) || b.region.len() > 64 {
        return Err(ApiError::bad_request(
            "s3.region must be 1-64 printable characters",
        ));
    }
    match (&b.access_key_id, &b.secret_access_key) {
        (Some(k), Some(v)) if printable(k) && printable(v) => {}
        (None, None) => {}
        _ => {
            return Err(ApiError::bad_request(
                "s3.access_key_id and s3.secret_access_key: both (1-256 printable characters) or neither",
            ))
        }
    }
    if b.endpoint.len() > 2048 {
        return Err(ApiError::bad_request("s3.endpoint is too long"));
    }
    Ok(S3Settings {
        endpoint: b.endpoint,
        bucket: b.bucket,
        region: b.region,
        path_style: b.path_style,
        access_key_id: b.access_key_id,
        secret_access_key: b.secret_access_key,
    })
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
    /// On storage every node mounts (measured here, as any node sees it).
    pub shared: bool,
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
    /// Its object-storage tier, if any (never the credentials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3View>,
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
    let fs = if repo.node_id == st.catalog().node_id() || repo.shared {
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
        shared: repo.shared,
        capacity_bytes: fs.capacity_bytes,
        free_bytes: fs.free_bytes,
        used_bytes: fs.used_bytes,
        backup_bytes,
        reserve_bytes: reserve,
        s3: s3_view(&st, &id).await?,
    }))
}

/// `POST /api/v1/repositories`: register a directory under a configured
/// repository root (created if missing; see [`names::repository_dir`] for
/// what is refused), optionally with an S3 tier.
#[utoipa::path(
    post,
    path = "/api/v1/repositories",
    tag = "repositories",
    request_body = RepositoryBody,
    responses(
        (status = 201, description = "Registered; `path` is the canonical directory.", body = Repository),
        BodyErrors,
        E409,
        E507,
    )
)]
pub async fn create(
    State(st): State<AppState>,
    AppJson(body): AppJson<RepositoryBody>,
) -> Result<(StatusCode, Json<Repository>), ApiError> {
    names::validate("id", &body.id).map_err(ApiError::bad_request)?;
    let s3 = body.s3.map(s3_settings).transpose()?;
    let path = body.path.clone();
    let roots = st.backups().config().repository_roots();
    let canonical = tokio::task::spawn_blocking(move || names::repository_dir(&path, &roots))
        .await
        .map_err(|e| DaemonError::Internal(format!("repository task failed: {e}")))??;
    if body.shared {
        let (dir, id) = (canonical.clone(), body.id.clone());
        tokio::task::spawn_blocking(move || crate::shared_repo::write(&dir, &id))
            .await
            .map_err(|e| DaemonError::Internal(format!("repository task failed: {e}")))??;
    }
    let repo = Repository {
        id: body.id,
        path: canonical.display().to_string(),
        s3: None,
        node_id: st.catalog().node_id().to_owned(),
        shared: body.shared,
    };
    st.catalog().create_repository(repo.clone()).await?;
    if let Some(s) = s3 {
        st.catalog().set_repository_s3(&repo.id, Some(s)).await?;
    }
    let s3 = s3_view(&st, &repo.id).await?;
    Ok((StatusCode::CREATED, Json(Repository { s3, ..repo })))
}
