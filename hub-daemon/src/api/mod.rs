//! The HTTP API: thin axum handlers that validate, call the backup service
//! or the catalog, and map results. Every route is wired here.

pub mod auth;
mod backups;
mod dashboard;
pub mod doc;
mod error;
mod forward;
mod json;
mod nodes;
mod ops;
mod policies;
mod repositories;
pub mod tls_listener;
mod vms;

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::Router;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub use error::ApiError;

use crate::backup::Backups;
use crate::catalog::Catalog;

/// Shared state of every handler.
#[derive(Clone)]
pub struct AppState {
    backups: Arc<Backups>,
    auth: Arc<auth::Auth>,
    throughput: Arc<ops::Throughput>,
    /// Trust for other hubs' HTTPS API (see [`forward`]).
    fleet_tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("backups", &self.backups)
            .field("fleet_tls", &self.fleet_tls.is_some())
            .finish_non_exhaustive()
    }
}

impl AppState {
    /// State over the backup service.
    pub fn new(backups: Arc<Backups>) -> Self {
        AppState {
            backups,
            auth: Arc::default(),
            throughput: Arc::default(),
            fleet_tls: None,
        }
    }

    /// Reach other hubs of the fleet over HTTPS with this trust (their
    /// certificates signed by the fleet's CA).
    pub fn with_fleet_tls(mut self, tls: tokio_rustls::TlsConnector) -> Self {
        self.fleet_tls = Some(tls);
        self
    }

    fn fleet_tls(&self) -> Option<tokio_rustls::TlsConnector> {
        self.fleet_tls.clone()
    }

    fn backups(&self) -> &Arc<Backups> {
        &self.backups
    }

    fn auth(&self) -> &auth::Auth {
        &self.auth
    }

    fn throughput(&self) -> &ops::Throughput {
        &self.throughput
    }

    fn catalog(&self) -> &Catalog {
        self.backups.catalog()
    }
}

/// Longest request URI (path and query) the API reads. Real ones are a
/// few hundred bytes at most.
///
/// Beyond 64 KiB hyper's HTTP/1 parser answers 414 by itself, with an empty
/// body, before any of our code runs (the limit is hard-coded in hyper and
/// `axum::serve` exposes no hook into parse errors). The same holds for
/// hyper's other parse-time refusals: more than 100 header fields (431)
/// and requests that are not HTTP/1 at all (400). Those are the only 4xx
/// without the JSON shape; everything between this limit and hyper's gets
/// our 414.
pub const URI_LIMIT: usize = 8 << 10;

async fn not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    let path: String = uri.path().chars().take(256).collect();
    ApiError::not_found("route", format!("{method} {path}"))
}

async fn method_not_allowed(method: Method) -> ApiError {
    ApiError::MethodNotAllowed(method.as_str().chars().take(32).collect())
}

/// Refuse URIs over [`URI_LIMIT`] before routing or extracting anything.
async fn limit_uri(req: Request, next: Next) -> Response {
    let len = req
        .uri()
        .path_and_query()
        .map_or(0, |pq| pq.as_str().len())
        .saturating_add(req.uri().authority().map_or(0, |a| a.as_str().len()));
    if len > URI_LIMIT {
        return ApiError::UriTooLong {
            len,
            limit: URI_LIMIT,
        }
        .into_response();
    }
    next.run(req).await
}

/// Every route, each registered with the annotation that documents it
/// (`routes!` takes the method and path from `#[utoipa::path]`), so the
/// route table and the OpenAPI document cannot drift apart. Handlers that
/// share a path share one `routes!` (its method router is bound to one path).
fn documented() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(dashboard::page))
        .routes(routes!(ops::healthz))
        .routes(routes!(ops::metrics))
        .routes(routes!(doc::openapi_json))
        .routes(routes!(vms::list))
        .routes(routes!(vms::put, vms::get, vms::delete))
        .routes(routes!(repositories::list, repositories::create))
        .routes(routes!(repositories::get))
        .routes(routes!(nodes::list))
        .routes(routes!(policies::list))
        .routes(routes!(policies::put, policies::get, policies::delete))
        .routes(routes!(policies::prune))
        .routes(routes!(backups::start, backups::list))
        .routes(routes!(backups::get, backups::delete))
        .routes(routes!(backups::complete))
        .routes(routes!(backups::abort))
        .routes(routes!(backups::progress))
        .routes(routes!(backups::verify))
        .routes(routes!(backups::offload))
        .routes(routes!(backups::evict))
        .routes(routes!(backups::restore, backups::stop_restore))
}

/// The OpenAPI 3.1 document of every route (served at
/// `GET /api/v1/openapi.json`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    doc::build(documented().into_openapi())
}

/// Every route.
pub fn router(state: AppState) -> Router {
    let (routes, _) = documented().split_for_parts();
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(json::BODY_LIMIT))
        // What only a backup's own node can serve goes there, once the
        // caller is authenticated (and again, by the owner).
        .layer(middleware::from_fn_with_state(
            state.clone(),
            forward::layer,
        ))
        // Authentication before anything reads the body (layers added
        // later run first: URI limit, authentication, forwarding).
        .layer(middleware::from_fn_with_state(state.clone(), auth::layer))
        .layer(middleware::from_fn(limit_uri))
        .with_state(state)
}
