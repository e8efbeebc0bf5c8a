//! API authentication: bearer tokens checked by one middleware layer, with
//! the role each route needs decided in one table ([`ROUTES`]).
//!
//! * `/healthz` and the dashboard page (`GET /`, no data in it) are open; everything else needs a token once any token
//!   exists: 401 without one or with a bad or revoked one, 403 when the
//!   token's role is too low.
//! * With no token at all the API is open only where the configuration
//!   allows it ([`crate::config::Config::open_without_tokens`]: a loopback
//!   address, or `--insecure-no-auth`); elsewhere every request is 401.
//! * Tokens are read from the catalog on every request, so creating or
//!   revoking one (even from the CLI, in another process) takes effect at
//!   once. The token itself is never logged; only its name is.
//! * A backup's callback token (`hcb_…`, given to its appliance at start)
//!   is no API token: it opens exactly `GET /api/v1/backups/{id}` and
//!   `POST /api/v1/backups/{id}/progress|complete|abort` of its own backup,
//!   while that runs, whether API tokens exist or not; anything else with
//!   it is 401.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::catalog::{Role, CALLBACK_PREFIX};

/// What a route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing (health checks).
    Open,
    /// A token of at least this role.
    Role(Role),
}

/// Who may do what: method, path pattern (`*` is one path segment),
/// access. The first match wins. Anything not listed needs a reader token
/// for GET/HEAD and an admin token otherwise, so a route added without an
/// entry here fails closed.
pub const ROUTES: &[(&str, &str, Access)] = &[
    ("GET", "/healthz", Access::Open),
    // The dashboard page only: it holds no data (its API calls are checked
    // like any other).
    ("GET", "/", Access::Open),
    // The API reference: no data and no secret, and a client needs it
    // before it has a token.
    ("GET", "/api/v1/openapi.json", Access::Open),
    ("GET", "/metrics", Access::Role(Role::Reader)),
    ("PUT", "/api/v1/vms/*", Access::Role(Role::Admin)),
    ("DELETE", "/api/v1/vms/*", Access::Role(Role::Admin)),
    ("POST", "/api/v1/repositories", Access::Role(Role::Admin)),
    ("PUT", "/api/v1/policies/*", Access::Role(Role::Admin)),
    ("DELETE", "/api/v1/policies/*", Access::Role(Role::Admin)),
    ("POST", "/api/v1/prune", Access::Role(Role::Operator)),
    ("POST", "/api/v1/backups", Access::Role(Role::Operator)),
    ("DELETE", "/api/v1/backups/*", Access::Role(Role::Operator)),
    (
        "POST",
        "/api/v1/backups/*/complete",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/backups/*/abort",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/backups/*/progress",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/backups/*/verify",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/backups/*/offload",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/backups/*/evict",
        Access::Role(Role::Operator),
    ),
    (
        "POST",
        "/api/v1/backups/*/restore",
        Access::Role(Role::Operator),
    ),
    (
        "DELETE",
        "/api/v1/backups/*/restore",
        Access::Role(Role::Operator),
    ),
];

fn matches(pattern: &str, path: &str) -> bool {
    let mut p = pattern.split('/');
    let mut s = path.split('/');
    loop {
        match (p.next(), s.next()) {
            (None, None) => return true,
            (Some("*"), Some(seg)) if !seg.is_empty() => {}
            (Some(a), Some(b)) if a == b => {}
            _ => return false,
        }
    }
}

/// The access `method path` needs, from [`ROUTES`].
pub fn required(method: &Method, path: &str) -> Access {
    let m = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    if let Some((_, _, a)) = ROUTES
        .iter()
        .find(|(rm, rp, _)| *rm == m && matches(rp, path))
    {
        return *a;
    }
    if m == "GET" {
        Access::Role(Role::Reader)
    } else {
        Access::Role(Role::Admin)
    }
}

/// Recording "last used" costs a durable catalog write; do it at most
/// this often per token.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// Per-process authentication state.
#[derive(Debug, Default)]
pub struct Auth {
    touched: Mutex<HashMap<String, Instant>>,
}

impl Auth {
    fn should_touch(&self, name: &str) -> bool {
        let mut t = self.touched.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match t.get(name) {
            Some(last) if now.duration_since(*last) < TOUCH_EVERY => false,
            _ => {
                t.insert(name.to_owned(), now);
                true
            }
        }
    }
}

/// The bearer token of a request: `Ok(None)` without an Authorization
/// header, `Err` for one that is not `Bearer <token>`.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let bad = || ApiError::Unauthorized("malformed Authorization header; send Bearer <token>");
    let v = v.to_str().map_err(|_| bad())?;
    let (scheme, token) = v.trim().split_once(' ').ok_or_else(bad)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(bad());
    }
    Ok(Some(token))
}

/// `Ok(None)`: the API is open (no token exists and that is allowed);
/// `Ok(Some(role))`: a valid token's role.
async fn authenticate(st: &AppState, headers: &HeaderMap) -> Result<Option<Role>, ApiError> {
    let catalog = st.catalog();
    match bearer(headers)? {
        Some(token) => match catalog.check_token(token).await? {
            Some((name, role)) => {
                if st.auth().should_touch(&name) {
                    if let Err(e) = catalog.touch_token(&name).await {
                        tracing::warn!(token = %name, error = %e, "cannot record token use");
                    }
                }
                tracing::debug!(token = %name, %role, "authenticated");
                Ok(Some(role))
            }
            None => Err(ApiError::Unauthorized("invalid or revoked token")),
        },
        None => {
            if catalog.has_tokens().await? {
                Err(ApiError::Unauthorized("a bearer token is required"))
            } else if st.backups().config().open_without_tokens() {
                Ok(None)
            } else {
                Err(ApiError::Unauthorized(
                    "no API token exists; create one with hub-daemon token create",
                ))
            }
        }
    }
}

/// Set on a request authenticated by the callback token of the backup in
/// its path (the appliance's own call).
#[derive(Debug, Clone)]
pub struct CallbackCaller;

/// The backup a callback token may act on with `method path`: its id, if
/// the route is one of the callbacks (or the backup's GET).
fn callback_scope<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    let rest = path.strip_prefix("/api/v1/backups/")?;
    let (id, tail) = match rest.split_once('/') {
        Some((id, tail)) => (id, Some(tail)),
        None => (rest, None),
    };
    let allowed = match (method.as_str(), tail) {
        ("GET" | "HEAD", None) => true,
        ("POST", Some(t)) => matches!(t, "progress" | "complete" | "abort"),
        _ => false,
    };
    (allowed && !id.is_empty()).then_some(id)
}

/// A request bearing a callback token: through, marked, if it is the
/// running backup's own on one of its callback routes; otherwise 401.
async fn callback(st: &AppState, mut req: Request, next: Next, token: String) -> Response {
    let Some(id) = callback_scope(req.method(), req.uri().path()).map(str::to_owned) else {
        return ApiError::Unauthorized("a callback token opens only its own backup's callbacks")
            .into_response();
    };
    match st.catalog().check_callback_token(&id, &token).await {
        Ok(true) => {
            tracing::debug!(backup = %id, "authenticated by callback token");
            req.extensions_mut().insert(CallbackCaller);
            next.run(req).await
        }
        Ok(false) => ApiError::Unauthorized(
            "callback token invalid, of another backup, or of a backup that has ended",
        )
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

/// The middleware: decide the route's access, check the token, pass on or
/// refuse in the JSON error shape.
pub async fn layer(State(st): State<AppState>, req: Request, next: Next) -> Response {
    // Open routes look at no credentials at all: whatever a client sends
    // (a callback token, a revoked one), health checks and the API
    // document answer, as the document says.
    let need = match required(req.method(), req.uri().path()) {
        Access::Open => return next.run(req).await,
        Access::Role(r) => r,
    };
    if let Ok(Some(t)) = bearer(req.headers()) {
        if t.starts_with(CALLBACK_PREFIX) {
            let t = t.to_owned();
            return callback(&st, req, next, t).await;
        }
    }
    match authenticate(&st, req.headers()).await {
        Ok(None) => next.run(req).await,
        Ok(Some(have)) if have >= need => next.run(req).await,
        Ok(Some(have)) => ApiError::Forbidden { have, need }.into_response(),
        Err(e) => e.into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_decides_each_route() {
        let r = |m: &str, p: &str| required(&m.parse().unwrap(), p);
        use Access::Open;
        let need = |r: Role| Access::Role(r);
        assert_eq!(r("GET", "/healthz"), Open);
        assert_eq!(r("HEAD", "/healthz"), Open);
        assert_eq!(r("POST", "/healthz"), need(Role::Admin));
        assert_eq!(r("GET", "/metrics"), need(Role::Reader));
        assert_eq!(r("GET", "/api/v1/backups/x"), need(Role::Reader));
        assert_eq!(r("POST", "/api/v1/backups"), need(Role::Operator));
        assert_eq!(r("POST", "/api/v1/backups/x/restore"), need(Role::Operator));
        assert_eq!(
            r("POST", "/api/v1/backups/x/progress"),
            need(Role::Operator)
        );
        assert_eq!(r("DELETE", "/api/v1/backups/x"), need(Role::Operator));
        assert_eq!(r("PUT", "/api/v1/vms/vm1"), need(Role::Admin));
        assert_eq!(r("POST", "/api/v1/repositories"), need(Role::Admin));
        // Not in the table: fails closed.
        assert_eq!(r("POST", "/api/v1/backups/x/y/complete"), need(Role::Admin));
        assert_eq!(r("PUT", "/api/v1/vms/"), need(Role::Admin));
        assert_eq!(r("PATCH", "/api/v1/backups/x"), need(Role::Admin));
        assert_eq!(r("GET", "/healthz/x"), need(Role::Reader));
        // Only the page itself is open, not what lies under it.
        assert_eq!(r("GET", "/"), Open);
        assert_eq!(r("HEAD", "/"), Open);
        assert_eq!(r("POST", "/"), need(Role::Admin));
        assert_eq!(r("GET", "//"), need(Role::Reader));
        assert_eq!(r("GET", "/x"), need(Role::Reader));
    }

    #[test]
    fn callback_tokens_reach_only_the_callbacks() {
        let s = |m: &str, p: &str| callback_scope(&m.parse().unwrap(), p).map(str::to_owned);
        let b1 = Some("b1".to_owned());
        assert_eq!(s("GET", "/api/v1/backups/b1"), b1);
        assert_eq!(s("HEAD", "/api/v1/backups/b1"), b1);
        for t in ["progress", "complete", "abort"] {
            assert_eq!(s("POST", &format!("/api/v1/backups/b1/{t}")), b1, "{t}");
        }
        for (m, p) in [
            ("DELETE", "/api/v1/backups/b1"),
            ("POST", "/api/v1/backups/b1/restore"),
            ("POST", "/api/v1/backups/b1/verify"),
            ("GET", "/api/v1/backups/b1/complete"),
            ("POST", "/api/v1/backups/b1/../b2/complete"),
            ("POST", "/api/v1/backups//complete"),
            ("GET", "/api/v1/backups"),
            ("GET", "/api/v1/backups/"),
            ("POST", "/api/v1/backups"),
            ("PUT", "/api/v1/vms/vm1"),
            ("GET", "/metrics"),
        ] {
            assert_eq!(s(m, p), None, "{m} {p}");
        }
    }

    #[test]
    fn bearer_header_parsing() {
        let h = |v: &str| {
            let mut m = HeaderMap::new();
            m.insert(header::AUTHORIZATION, v.parse().unwrap());
            m
        };
        assert_eq!(bearer(&HeaderMap::new()).unwrap(), None);
        assert_eq!(bearer(&h("Bearer abc")).unwrap(), Some("abc"));
        assert_eq!(bearer(&h("bearer  abc ")).unwrap(), Some("abc"));
        for bad in ["Basic abc", "Bearer", "Bearer ", "abc"] {
            assert!(bearer(&h(bad)).is_err(), "{bad}");
        }
    }
}
