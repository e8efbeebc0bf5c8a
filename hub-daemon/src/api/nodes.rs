//! `/api/v1/nodes`: the fleet of hubs sharing this catalog.

use axum::extract::State;
use axum::Json;

use super::error::ApiError;
use super::AppState;
use crate::catalog::NodeInfo;
use crate::time::now_ms;

/// `GET /api/v1/nodes`: every hub that registered in this catalog, with
/// its lease state (as this hub's clock sees it) and running backups.
#[utoipa::path(
    get,
    path = "/api/v1/nodes",
    tag = "nodes",
    responses((status = 200, description = "Every node of the fleet.", body = Vec<NodeInfo>))
)]
pub async fn list(State(st): State<AppState>) -> Result<Json<Vec<NodeInfo>>, ApiError> {
    Ok(Json(st.catalog().nodes(now_ms()).await?))
}
