//! The CLI's side of the hub's API, on the daemon's one HTTP client
//! ([`crate::http_client`]): the token, the answer timeout, and the API's
//! error shape turned into [`ClientError`].

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, StatusCode};
use serde::Deserialize;

pub use crate::http_client::clean;
use crate::http_client::{connector, Endpoint, TransportError};

use super::ClientError;

/// Largest answer read: a list of thousands of backups with their disks
/// is a few MiB; anything far beyond is not the hub.
pub const MAX_ANSWER_BYTES: usize = 64 << 20;
/// Longest wait for a connection (TCP and TLS): a hub that does not accept
/// within this is down or unreachable, and a script should learn that
/// without waiting for the whole answer timeout.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Most of a non-JSON error body shown (a proxy's HTML page, say).
const MAX_SHOWN_BODY: usize = 200;

/// A client of one hub.
#[derive(Clone)]
pub struct HubClient {
    endpoint: Endpoint,
    /// `Bearer …`; never printed.
    authorization: Option<String>,
    /// Limit on the whole exchange (`None`: no limit).
    timeout: Option<Duration>,
}

impl std::fmt::Debug for HubClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HubClient")
            .field("endpoint", &self.endpoint)
            .field("token", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The error body every API refusal carries (`api/error.rs`).
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    code: String,
    message: String,
}

impl HubClient {
    /// A client of the hub at `url` (`http://` or `https://`, with
    /// `ca_cert` required for the latter), sending `token` if any.
    pub fn new(
        url: &str,
        ca_cert: Option<&Path>,
        token: Option<String>,
        timeout: Option<Duration>,
    ) -> Result<HubClient, ClientError> {
        let https = url.trim_start().starts_with("https://");
        let tls = match (https, ca_cert) {
            (true, Some(ca)) => Some(connector(ca).map_err(ClientError::Usage)?),
            (true, None) => {
                return Err(ClientError::Usage(format!(
                    "--hub {url:?} is HTTPS: give the CA certificate that signed the hub's \
                     (--ca-cert FILE or HUB_CA_CERT; `hub-daemon tls init` wrote ca-cert.pem)"
                )))
            }
            // A CA for a plain-HTTP hub is harmless (HUB_CA_CERT set for
            // another hub, say): unused.
            (false, _) => None,
        };
        let endpoint = Endpoint::parse("--hub", url, tls).map_err(ClientError::Usage)?;
        let authorization = token
            .map(|t| {
                let t = t.trim().to_owned();
                let ok = !t.is_empty() && t.bytes().all(|b| b.is_ascii_graphic());
                if ok {
                    Ok(format!("Bearer {t}"))
                } else {
                    Err(ClientError::Usage(
                        "the API token must be printable ASCII without spaces".into(),
                    ))
                }
            })
            .transpose()?;
        Ok(HubClient {
            endpoint,
            authorization,
            timeout,
        })
    }

    /// `method path` with an optional JSON body; the body of a 2xx answer
    /// (empty for 204). Any other status is [`ClientError::Api`] with the
    /// API's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<Bytes, ClientError> {
        let mut req = self
            .endpoint
            .request(method, path)
            .header(ACCEPT, "application/json");
        if let Some(a) = &self.authorization {
            req = req.header(AUTHORIZATION, a);
        }
        let payload = match body {
            Some(b) => {
                req = req.header(CONTENT_TYPE, "application/json");
                Bytes::from(
                    serde_json::to_vec(b)
                        .map_err(|e| ClientError::Usage(format!("encoding the request: {e}")))?,
                )
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| ClientError::Usage(format!("bad request path {path:?}: {e}")))?;
        let unreachable = |reason: String| ClientError::Unreachable {
            url: self.endpoint.url().to_owned(),
            reason,
        };
        // The connection gets its own, shorter bound (see CONNECT_TIMEOUT).
        let connect = self
            .timeout
            .map_or(CONNECT_TIMEOUT, |t| t.min(CONNECT_TIMEOUT));
        let exchange = self.endpoint.send(req, MAX_ANSWER_BYTES, connect);
        let answer = match self.timeout {
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .map_err(|_| unreachable(format!("no answer within {} s", t.as_secs())))?,
            None => exchange.await,
        };
        let (status, bytes) = answer.map_err(|e| match e {
            TransportError::Connect(m) | TransportError::Exchange(m) => unreachable(m),
        })?;
        if status.is_success() {
            return Ok(bytes);
        }
        Err(api_error(status, &bytes))
    }
}

/// The API's refusal as an error: its message when the body has the
/// API's error shape, else the status and the start of the body.
fn api_error(status: StatusCode, body: &[u8]) -> ClientError {
    if let Ok(b) = serde_json::from_slice::<ErrorBody>(body) {
        return ClientError::Api {
            status: status.as_u16(),
            code: b.error.code,
            message: clean(&b.error.message),
        };
    }
    let text = String::from_utf8_lossy(body);
    let text: String = clean(text.trim()).chars().take(MAX_SHOWN_BODY).collect();
    ClientError::Api {
        status: status.as_u16(),
        code: status
            .canonical_reason()
            .unwrap_or("error")
            .to_ascii_lowercase()
            .replace(' ', "_"),
        message: if text.is_empty() {
            format!("the hub answered {status} without a message")
        } else {
            text
        },
    }
}

/// `s` made safe as one path segment or query value: unreserved
/// characters as they are, everything else percent-encoded.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        for bad in ["127.0.0.1:8082", "ftp://a", "http://", "http://u@a"] {
            assert!(
                matches!(
                    HubClient::new(bad, None, None, None),
                    Err(ClientError::Usage(_))
                ),
                "{bad}"
            );
        }
        // HTTPS without a CA to trust is refused up front, not at connect.
        assert!(matches!(
            HubClient::new("https://a", None, None, None),
            Err(ClientError::Usage(m)) if m.contains("--ca-cert")
        ));
        assert!(HubClient::new("http://a", None, Some("a b".into()), None).is_err());
        let c = HubClient::new("http://a", None, Some("hub_secret\n".into()), None).unwrap();
        assert!(!format!("{c:?}").contains("secret"));
    }

    #[test]
    fn api_errors_keep_the_message() {
        let body =
            br#"{"error":{"status":404,"code":"not_found","message":"backup \"x\" not found"}}"#;
        let e = api_error(StatusCode::NOT_FOUND, body);
        assert!(matches!(&e, ClientError::Api { status: 404, code, message }
            if code == "not_found" && message == "backup \"x\" not found"));
        let e = api_error(StatusCode::BAD_GATEWAY, b"<html>\x1b[31m proxy</html>");
        assert!(matches!(&e, ClientError::Api { status: 502, code, message }
            if code == "bad_gateway" && !message.contains('\x1b')));
        let e = api_error(StatusCode::URI_TOO_LONG, b"");
        assert!(e.to_string().contains("414"), "{e}");
    }

    #[test]
    fn encoding() {
        assert_eq!(encode("web-01.a_b~"), "web-01.a_b~");
        assert_eq!(encode("a b/?&é"), "a%20b%2F%3F%26%C3%A9");
    }
}
