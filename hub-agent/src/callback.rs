//! Reporting back to the hub: `{callback.url}/complete`, `/abort` and
//! `/progress`, each a JSON POST with the backup's Bearer token, over plain
//! HTTP/1.1 (hyper-util's pooled client).

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use sna_contract::{AbortRequest, Callback, CompleteRequest, ProgressRequest};

/// Per request, connection included.
const TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts at complete and abort when the hub is unreachable or answers 5xx.
const ATTEMPTS: u32 = 3;
/// Longest error body quoted in a message.
const MAX_QUOTE: usize = 512;

/// Why a callback failed.
#[derive(Debug, thiserror::Error)]
pub enum CallbackError {
    /// Bad callback URL or body.
    #[error("bad callback request: {0}")]
    Request(String),
    /// No answer (connection, timeout).
    #[error("hub unreachable: {0}")]
    Transport(String),
    /// The hub answered non-2xx.
    #[error("hub answered {status}: {body}")]
    Status {
        /// HTTP status.
        status: u16,
        /// Start of the body.
        body: String,
    },
}

impl CallbackError {
    fn retryable(&self) -> bool {
        match self {
            CallbackError::Transport(_) => true,
            CallbackError::Status { status, .. } => *status >= 500,
            CallbackError::Request(_) => false,
        }
    }
}

/// The callbacks of one backup.
#[derive(Debug, Clone)]
pub struct Callbacks {
    client: Client<HttpConnector, Full<Bytes>>,
    url: String,
    token: String,
}

impl Callbacks {
    /// For the callback the hub sent with start. Checked here, so a bad
    /// URL is refused at start instead of after streaming every disk.
    pub fn new(cb: &Callback) -> Result<Self, CallbackError> {
        let url = cb.url.trim_end_matches('/').to_owned();
        let uri: hyper::Uri = format!("{url}/complete")
            .parse()
            .map_err(|e| CallbackError::Request(format!("callback URL: {e}")))?;
        if uri.scheme_str() != Some("http") {
            return Err(CallbackError::Request(
                "callback URL must be http:// (https is not supported yet)".into(),
            ));
        }
        Ok(Callbacks {
            client: Client::builder(TokioExecutor::new()).build_http(),
            url,
            token: cb.token.clone(),
        })
    }

    async fn post_once(&self, what: &str, body: &[u8]) -> Result<(), CallbackError> {
        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("{}/{what}", self.url))
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, format!("Bearer {}", self.token))
            .body(Full::new(Bytes::copy_from_slice(body)))
            .map_err(|e| CallbackError::Request(e.to_string()))?;
        let exchange = async {
            let resp = self
                .client
                .request(req)
                .await
                .map_err(|e| CallbackError::Transport(e.to_string()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| CallbackError::Transport(e.to_string()))?
                .to_bytes();
            if status.is_success() {
                Ok(())
            } else {
                let text = String::from_utf8_lossy(&body[..body.len().min(MAX_QUOTE)]);
                Err(CallbackError::Status {
                    status: status.as_u16(),
                    body: text.into_owned(),
                })
            }
        };
        tokio::time::timeout(TIMEOUT, exchange)
            .await
            .map_err(|_| CallbackError::Transport("timed out".into()))?
    }

    async fn post<T: Serialize>(
        &self,
        what: &str,
        body: &T,
        attempts: u32,
    ) -> Result<(), CallbackError> {
        let body = serde_json::to_vec(body).map_err(|e| CallbackError::Request(e.to_string()))?;
        let mut n = 0;
        loop {
            n += 1;
            match self.post_once(what, &body).await {
                Err(e) if e.retryable() && n < attempts => {
                    tracing::warn!(error = %e, attempt = n, "callback {what} failed; retrying");
                    // Back off a little: a restarting hub needs a moment.
                    tokio::time::sleep(Duration::from_secs(u64::from(n))).await;
                }
                other => return other,
            }
        }
    }

    /// `POST …/complete`.
    pub async fn complete(&self, req: &CompleteRequest) -> Result<(), CallbackError> {
        self.post("complete", req, ATTEMPTS).await
    }

    /// `POST …/abort`.
    pub async fn abort(&self, reason: &str) -> Result<(), CallbackError> {
        let req = AbortRequest {
            reason: Some(reason.to_owned()),
        };
        self.post("abort", &req, ATTEMPTS).await
    }

    /// `POST …/progress`, once, failures only logged (progress is optional).
    pub async fn progress(&self, req: &ProgressRequest) {
        if let Err(e) = self.post("progress", req, 1).await {
            tracing::debug!(error = %e, "progress report failed");
        }
    }
}
