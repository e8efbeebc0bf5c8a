//! The API reference: an OpenAPI 3.1 document built from the handlers'
//! `#[utoipa::path]` annotations and the bodies' `ToSchema` derives, served
//! at `GET /api/v1/openapi.json`.
//!
//! The route table and the document come from one source: every route is
//! registered through `utoipa_axum::routes!` (see [`super::router`]), which
//! reads the method and path from the same annotation that documents them.
//!
//! Statuses that depend on the route's access rather than on the handler
//! (401 and 403 from [`super::auth`], 414 from the URI limit, 500 from
//! anywhere) are added here, from the same table the auth layer enforces,
//! so a change of a route's role changes its documentation too. Everything
//! else a handler can answer is listed on the handler, with the error types
//! below ([`E400`] …) so the error shape is written once.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use axum::http::{header, Method};
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::path::{HttpMethod, Operation};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{ContentBuilder, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{OpenApi, ToSchema};

use super::auth::{self, Access};
use crate::catalog::Role;

/// Name of the bearer security scheme in the document.
const BEARER: &str = "bearer";

/// Pattern of VM, repository and policy names (see `crate::names`).
pub const NAME_PATTERN: &str = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$";
/// Pattern of backup ids (longer: they embed the VM name).
pub const ID_PATTERN: &str = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$";

/// Every error: `{"error": {"status": 404, "code": "not_found", "message": "..."}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: ErrorDetail,
}

/// The error itself.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// The HTTP status, repeated.
    #[schema(minimum = 400, maximum = 599)]
    pub status: u16,
    /// Machine-readable code (see the table in the README).
    #[schema(value_type = ErrorCode)]
    pub code: &'static str,
    /// Human-readable message; generic for 500 (details go to the log).
    pub message: String,
}

/// The codes of [`ErrorDetail::code`] (documentation only; `api::error`
/// decides which status carries which).
#[derive(Debug, ToSchema)]
#[schema(rename_all = "snake_case")]
#[allow(dead_code)] // Never built: it only lists the codes in the document.
pub enum ErrorCode {
    /// 400.
    BadRequest,
    /// 401.
    Unauthorized,
    /// 403.
    Forbidden,
    /// 404.
    NotFound,
    /// 405.
    MethodNotAllowed,
    /// 409.
    Conflict,
    /// 413.
    PayloadTooLarge,
    /// 414.
    UriTooLong,
    /// 415.
    UnsupportedMediaType,
    /// 422: an image is corrupt, unsupported or refused by policy.
    BadImage,
    /// 422: a backup could not complete as a faithful copy.
    BackupFailed,
    /// 500.
    Internal,
    /// 502.
    ApplianceError,
    /// 503.
    Unavailable,
    /// 504.
    ApplianceTimeout,
    /// 507.
    InsufficientStorage,
}

/// One error response in the error shape.
fn error_response(description: &str) -> RefOr<Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}

/// Error statuses a handler lists in its `responses(...)`, each in the one
/// error shape.
macro_rules! error_responses {
    ($($ty:ident => $status:literal, $desc:literal;)*) => {$(
        #[doc = concat!($status, ": ", $desc)]
        #[derive(Debug)]
        pub struct $ty;

        impl utoipa::IntoResponses for $ty {
            fn responses() -> BTreeMap<String, RefOr<Response>> {
                BTreeMap::from([($status.to_owned(), error_response($desc))])
            }
        }
    )*};
}

error_responses! {
    E400 => "400", "`bad_request`: malformed or invalid request (JSON, names, sizes, paths, query).";
    E404 => "404", "`not_found`: no such VM, repository, backup or policy.";
    E409 => "409", "`conflict`: the current state forbids it (a backup running, already finished, dependents).";
    E413 => "413", "`payload_too_large`: body over 2 MiB.";
    E415 => "415", "`unsupported_media_type`: a body whose Content-Type is not JSON.";
    E422 => "422", "`bad_image` (an image is corrupt, unsupported or refused) or `backup_failed` (the backup could not be completed as a faithful copy and is now failed).";
    E502 => "502", "`appliance_error`: the backup appliance refused, was unreachable or broke the contract; `object_store_error`: the repository's object store refused or was unreachable.";
    E503 => "503", "`unavailable`: out of NBD ports, or shutting down.";
    E504 => "504", "`appliance_timeout`: the backup appliance did not answer in time.";
    E507 => "507", "`insufficient_storage`: the repository's or the catalog's filesystem is full.";
}

/// The JSON-body refusals every route with a body can answer.
#[derive(Debug)]
pub struct BodyErrors;

impl utoipa::IntoResponses for BodyErrors {
    fn responses() -> BTreeMap<String, RefOr<Response>> {
        let mut m = E400::responses();
        m.extend(E413::responses());
        m.extend(E415::responses());
        m
    }
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "NBD backup hub API",
        description = "VM-level backups over NBD into qcow2 repositories. Every error uses one \
            JSON shape (`ErrorBody`). Without any API token the API is open only on loopback \
            (or with `--insecure-no-auth`); once a token exists every route but `/healthz` and \
            this document needs `Authorization: Bearer <token>` of a sufficient role.",
        license(name = "MIT OR Apache-2.0")
    ),
    components(schemas(ErrorBody, ErrorDetail, ErrorCode)),
    tags(
        (name = "vms", description = "VMs and their disks"),
        (name = "repositories", description = "Where backups are written"),
        (name = "policies", description = "Retention policies and pruning"),
        (name = "backups", description = "Backups, their callbacks, verification and restore"),
        (name = "nodes", description = "The hubs sharing the catalog (a fleet)"),
        (name = "ops", description = "Health, metrics and this document"),
    )
)]
struct Base;

/// The methods a document operation can have, as HTTP methods.
fn http_method(m: &HttpMethod) -> Method {
    match m {
        HttpMethod::Get => Method::GET,
        HttpMethod::Post => Method::POST,
        HttpMethod::Put => Method::PUT,
        HttpMethod::Delete => Method::DELETE,
        HttpMethod::Options => Method::OPTIONS,
        HttpMethod::Head => Method::HEAD,
        HttpMethod::Patch => Method::PATCH,
        HttpMethod::Trace => Method::TRACE,
    }
}

/// A concrete path for the auth table (`{id}` → one segment).
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|seg| if seg.starts_with('{') { "x" } else { seg })
        .collect::<Vec<_>>()
        .join("/")
}

/// Add what every operation can answer, by its access in the auth table.
fn add_common(method: &Method, path: &str, op: &mut Operation) {
    let responses = &mut op.responses.responses;
    let mut add = |status: &str, desc: &str| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| error_response(desc));
    };
    add(
        "414",
        "`uri_too_long`: path and query over 8 KiB (beyond 64 KiB the HTTP parser answers 414 with an empty body).",
    );
    add(
        "500",
        "`internal`: the daemon's fault; the message is generic, details are in its log.",
    );
    if let Access::Role(need) = auth::required(method, &concrete(path)) {
        add(
            "401",
            "`unauthorized`: no, a malformed, unknown or revoked bearer token, while tokens exist or the hub is not on loopback (with `WWW-Authenticate: Bearer`).",
        );
        // Every token has at least the reader role.
        if need > Role::Reader {
            add("403", "`forbidden`: the token's role may not do this.");
        }
        // Open without a token when none exists on loopback: the empty
        // requirement says the token is optional there.
        op.security = Some(vec![
            SecurityRequirement::new(BEARER, Vec::<String>::new()),
            SecurityRequirement::default(),
        ]);
    }
}

/// Build the document (used once; see [`openapi_json`]).
pub fn build(mut doc: utoipa::openapi::OpenApi) -> utoipa::openapi::OpenApi {
    let mut base = Base::openapi();
    base.paths = std::mem::take(&mut doc.paths);
    if let Some(c) = doc.components.take() {
        let comps = base.components.get_or_insert_with(Default::default);
        comps.schemas.extend(c.schemas);
        comps.responses.extend(c.responses);
    }
    if let Some(c) = base.components.as_mut() {
        c.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "An API token (`hub-daemon token create`), or a backup's callback token on its own callbacks.",
                    ))
                    .build(),
            ),
        );
    }
    for (path, item) in base.paths.paths.iter_mut() {
        for (m, op) in [
            (HttpMethod::Get, &mut item.get),
            (HttpMethod::Put, &mut item.put),
            (HttpMethod::Post, &mut item.post),
            (HttpMethod::Delete, &mut item.delete),
            (HttpMethod::Patch, &mut item.patch),
            (HttpMethod::Head, &mut item.head),
            (HttpMethod::Options, &mut item.options),
            (HttpMethod::Trace, &mut item.trace),
        ] {
            if let Some(op) = op {
                add_common(&http_method(&m), path, op);
            }
        }
    }
    base
}

/// The document, built on first use.
static DOC: OnceLock<String> = OnceLock::new();

/// The served JSON text of the document.
pub fn json() -> &'static str {
    DOC.get_or_init(|| {
        let doc = super::openapi();
        // Serializing our own types cannot fail; an empty object would at
        // least keep the route answering.
        serde_json::to_string(&doc).unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot serialize the OpenAPI document");
            "{}".to_owned()
        })
    })
}

/// `GET /api/v1/openapi.json`: this document. Open without a token: it
/// describes the public shape of the API (no data, no secret), and clients
/// and API tools need it before they have a token.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "ops",
    responses(
        (status = 200, description = "The OpenAPI 3.1 document of this API.", content_type = "application/json", body = Object),
    )
)]
pub async fn openapi_json() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], json())
}
