//! `/api/v1/repositories`.

use std::path::Path;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use super::error::ApiError;
use super::json::AppJson;
use super::AppState;
use crate::error::DaemonError;
use crate::model::Repository;
use crate::names;

/// `GET /api/v1/repositories`.
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<Repository>>, ApiError> {
    Ok(Json(st.catalog().repositories().await?))
}

/// `POST /api/v1/repositories`: register a directory (created if missing).
pub async fn create(
    State(st): State<AppState>,
    AppJson(repo): AppJson<Repository>,
) -> Result<(StatusCode, Json<Repository>), ApiError> {
    names::validate("id", &repo.id).map_err(ApiError::bad_request)?;
    let path = Path::new(&repo.path);
    if !path.is_absolute() || repo.path.len() > 4096 {
        return Err(ApiError::bad_request(
            "path must be an absolute directory path",
        ));
    }
    std::fs::create_dir_all(path)
        .map_err(|e| DaemonError::io(format!("creating {}", path.display()), e))?;
    let canonical = path
        .canonicalize()
        .map_err(|e| DaemonError::io(format!("resolving {}", path.display()), e))?;
    let repo = Repository {
        id: repo.id,
        path: canonical.display().to_string(),
    };
    st.catalog().create_repository(repo.clone()).await?;
    Ok((StatusCode::CREATED, Json(repo)))
}
