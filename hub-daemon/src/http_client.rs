//! The daemon's one HTTP client: one HTTP/1.1 request per connection, over
//! TCP or TLS (rustls, trusting only the roots it is given). Used by the
//! hub to call backup appliances ([`crate::sna`]) and by the CLI to call a
//! hub ([`crate::cli::client`]).
//!
//! One connection per request: appliance calls are a few per backup and a
//! CLI run makes one, so a pool would rarely be reused, and without one no
//! idle connection can go stale between calls. Bounds on time are the
//! caller's (it wraps the whole call); the bound on size is here.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::HOST;
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

/// Where requests go: `http(s)://host[:port][/prefix]`.
#[derive(Clone)]
pub struct Endpoint {
    /// The URL without a trailing slash, for messages.
    url: String,
    /// `host[:port]` for the Host header.
    authority: String,
    /// Host to connect to (no IPv6 brackets).
    host: String,
    port: u16,
    /// Path before every request's own (a service under a subpath).
    prefix: String,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("url", &self.url)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// Why an exchange failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// No connection (refused, unresolvable, TLS handshake failed).
    #[error("{0}")]
    Connect(String),
    /// Connected, but the request or the answer broke off, or the answer
    /// was too long.
    #[error("{0}")]
    Exchange(String),
}

impl Endpoint {
    /// Parse `url`; `https://` needs `tls` (the caller decides whom to
    /// trust), `http://` refuses it. The message names the URL as `what`.
    pub fn parse(
        what: &str,
        url: &str,
        tls: Option<tokio_rustls::TlsConnector>,
    ) -> Result<Endpoint, String> {
        let trimmed = url.trim().trim_end_matches('/');
        let uri: Uri = trimmed
            .parse()
            .map_err(|e| format!("{what} {url:?} is not a URL: {e}"))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(format!(
                    "{what} {url:?} must start with http:// or https://"
                ))
            }
        };
        let Some(auth) = uri.authority().filter(|a| !a.host().is_empty()) else {
            return Err(format!("{what} {url:?} has no host"));
        };
        if trimmed.contains('@') || uri.query().is_some() || trimmed.contains('#') {
            return Err(format!(
                "{what} {url:?} may have no user info, query or fragment"
            ));
        }
        match (https, &tls) {
            (true, None) => return Err(format!("{what} {url:?}: HTTPS needs a CA to trust")),
            (false, Some(_)) => return Err(format!("{what} {url:?}: TLS given for http://")),
            _ => {}
        }
        Ok(Endpoint {
            url: trimmed.to_owned(),
            authority: auth.as_str().to_owned(),
            host: auth
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port: auth.port_u16().unwrap_or(if https { 443 } else { 80 }),
            prefix: uri.path().trim_end_matches('/').to_owned(),
            tls,
        })
    }

    /// The URL, without a trailing slash.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A request for `path` (after the prefix), Host header set.
    pub fn request(&self, method: Method, path: &str) -> hyper::http::request::Builder {
        Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.prefix))
            .header(HOST, &self.authority)
    }

    /// Send `req` on a fresh connection, made within `connect_timeout`
    /// (TCP and TLS); the status and the whole answer, at most
    /// `max_answer` bytes of it.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
        max_answer: usize,
        connect_timeout: Duration,
    ) -> Result<(StatusCode, Bytes), TransportError> {
        let stream = tokio::time::timeout(connect_timeout, self.connect())
            .await
            .map_err(|_| {
                TransportError::Connect(format!(
                    "no connection within {} s",
                    connect_timeout.as_secs_f64()
                ))
            })??;
        match stream {
            Stream::Plain(s) => exchange(TokioIo::new(s), req, max_answer).await,
            Stream::Tls(s) => exchange(TokioIo::new(*s), req, max_answer).await,
        }
    }

    async fn connect(&self) -> Result<Stream, TransportError> {
        let tcp = TcpStream::connect((self.host.as_str(), self.port))
            .await
            .map_err(|e| TransportError::Connect(e.to_string()))?;
        // Requests are small and answered at once: no Nagle delay.
        let _ = tcp.set_nodelay(true);
        let Some(tls) = &self.tls else {
            return Ok(Stream::Plain(tcp));
        };
        let name = ServerName::try_from(self.host.clone())
            .map_err(|e| TransportError::Connect(format!("TLS server name: {e}")))?;
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| TransportError::Connect(format!("TLS: {}", error_chain(&e))))?;
        Ok(Stream::Tls(Box::new(stream)))
    }
}

enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// One request on a connection; the status and the whole answer.
async fn exchange<S>(
    io: TokioIo<S>,
    req: Request<Full<Bytes>>,
    max_answer: usize,
) -> Result<(StatusCode, Bytes), TransportError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let broke = |e: &(dyn std::error::Error + 'static)| TransportError::Exchange(error_chain(e));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| broke(&e))?;
    // The connection's errors reach us through `send_request` and the body;
    // the task only drives the I/O, and ends when both halves are dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = sender.send_request(req).await.map_err(|e| broke(&e))?;
    let status = resp.status();
    let body = Limited::new(resp.into_body(), max_answer)
        .collect()
        .await
        .map_err(|e| {
            TransportError::Exchange(format!(
                "reading the answer (at most {max_answer} bytes): {e}"
            ))
        })?
        .to_bytes();
    Ok((status, body))
}

/// A TLS connector trusting only the certificates in the PEM file `ca`.
pub fn connector(ca: &std::path::Path) -> Result<tokio_rustls::TlsConnector, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", ca.display());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).map_err(|e| err(&e))? {
        roots.add(c.map_err(|e| err(&e))?).map_err(|e| err(&e))?;
    }
    if roots.is_empty() {
        return Err(err(&"no certificate in the file"));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| err(&e))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// An error with its sources, one line, safe for a terminal or a log
/// (control characters become spaces).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    // Bounded: a cyclic source chain must not loop forever.
    for _ in 0..8 {
        let Some(s) = next else { break };
        let text = s.to_string();
        // hyper and io errors often repeat their source in their own text.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    clean(&out)
}

/// Text made safe for a terminal or a log line: control characters (an
/// escape sequence in a crafted message, say) become spaces.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("u", "http://127.0.0.1:8082/", None).unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.prefix.as_str()),
            ("127.0.0.1", 8082, "")
        );
        assert_eq!(e.url(), "http://127.0.0.1:8082");
        let e = Endpoint::parse("u", "http://[::1]/hub/", None).unwrap();
        assert_eq!(
            (e.host.as_str(), e.port, e.prefix.as_str()),
            ("::1", 80, "/hub")
        );
        assert_eq!(e.authority, "[::1]");
        for bad in [
            "127.0.0.1:8082",
            "ftp://a",
            "http://",
            "http://u@a",
            "http://a/?q",
            "http://a/#f",
            "https://a",
        ] {
            assert!(Endpoint::parse("u", bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn cleaning() {
        assert_eq!(clean("a\x1b[2J\nb"), "a [2J b");
    }
}
