//! The hub's client of a backup appliance (the "SNA"): prepare, start and
//! cancel calls of the hand-off contract ([`sna_contract`],
//! `docs/sna-contract.md`), over plain HTTP/1.1 ([`crate::http_client`]).
//!
//! The appliance is another party: every answer is bounded in time
//! ([`SnaClient`]'s timeout, for connecting, sending and reading the whole
//! answer) and in size ([`MAX_ANSWER_BYTES`]), and only what parses as the
//! contract's bodies is believed. Its error messages are passed to the
//! hub's client shortened and without control characters.

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, StatusCode, Uri};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sna_contract::{
    ApplianceError, Mode, PrepareDisk, PrepareRequest, PrepareResponse, StartRequest,
    StartResponse, CANCEL_PATH, PREPARE_PATH, START_PATH,
};
use tokio_util::task::TaskTracker;

use crate::error::{DaemonError, Result};
use crate::http_client::{Endpoint, TransportError};

/// Largest appliance answer read.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;
/// Longest appliance message passed on.
const MAX_MESSAGE_CHARS: usize = 512;
/// Longest URL accepted for an appliance or the hub's public address.
const MAX_URL_LEN: usize = 1024;

/// The bearer token the hub presents to the appliance; never shown.
#[derive(Clone, PartialEq, Eq)]
pub struct SnaToken(String);

impl SnaToken {
    /// A token fit for an `Authorization` header.
    pub fn new(t: String) -> std::result::Result<SnaToken, String> {
        let ok = !t.is_empty() && t.len() <= 4096 && t.bytes().all(|b| b.is_ascii_graphic());
        if !ok {
            return Err("sna_token must be 1..=4096 printable ASCII characters".into());
        }
        Ok(SnaToken(t))
    }
}

impl fmt::Debug for SnaToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SnaToken(<redacted>)")
    }
}

/// Check an `http://host[:port][/path]` URL and return it without a
/// trailing slash (paths are appended to it). HTTPS needs a TLS-terminating
/// proxy in front of the hub's client; say so rather than fail later.
pub fn check_url(what: &str, url: &str) -> std::result::Result<String, String> {
    let url = url.trim();
    if url.len() > MAX_URL_LEN {
        return Err(format!("{what} longer than {MAX_URL_LEN} bytes"));
    }
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{what} {url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "{what} {url:?} must be http://HOST[:PORT][/PATH] (https: through a proxy)"
        ));
    }
    let host_ok = uri.authority().is_some_and(|a| !a.host().is_empty());
    if !host_ok || url.contains('@') {
        return Err(format!("{what} {url:?} needs a host and no user info"));
    }
    if uri.query().is_some() || url.contains('#') {
        return Err(format!("{what} {url:?} may not have a query or fragment"));
    }
    Ok(url.trim_end_matches('/').to_owned())
}

/// The appliance's text, made safe to pass on: bounded, one line.
fn clean(msg: &str) -> String {
    crate::http_client::clean(msg)
        .chars()
        .take(MAX_MESSAGE_CHARS)
        .collect()
}

/// Client of every appliance the hub talks to.
#[derive(Clone)]
pub struct SnaClient {
    token: Option<SnaToken>,
    timeout: Duration,
    /// Cancels on their way (waited for when the daemon stops).
    cancels: TaskTracker,
}

impl fmt::Debug for SnaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SnaClient")
            .field("token", &self.token)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl SnaClient {
    /// A client sending `token` and waiting at most `timeout` per call.
    pub fn new(token: Option<SnaToken>, timeout: Duration) -> SnaClient {
        SnaClient {
            token,
            timeout,
            cancels: TaskTracker::new(),
        }
    }

    /// POST `body` as JSON to `{base}{path}`; the status and the answer
    /// (at most [`MAX_ANSWER_BYTES`]), all within the timeout.
    async fn post<B: Serialize>(
        &self,
        base: &str,
        path: &str,
        body: &B,
    ) -> Result<(StatusCode, Bytes)> {
        let url = format!("{base}{path}");
        let json = serde_json::to_vec(body)
            .map_err(|e| DaemonError::Internal(format!("encoding an appliance request: {e}")))?;
        let endpoint = Endpoint::parse("appliance URL", base, None)
            .map_err(|e| DaemonError::Appliance(format!("bad appliance URL {url:?}: {e}")))?;
        let mut req = endpoint
            .request(Method::POST, path)
            .header(CONTENT_TYPE, "application/json")
            .header("accept", "application/json");
        if let Some(t) = &self.token {
            req = req.header(AUTHORIZATION, format!("Bearer {}", t.0));
        }
        let req = req
            .body(Full::new(Bytes::from(json)))
            .map_err(|e| DaemonError::Appliance(format!("bad appliance URL {url:?}: {e}")))?;
        let call = endpoint.send(req, MAX_ANSWER_BYTES, self.timeout);
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(TransportError::Connect(e))) => Err(DaemonError::Appliance(format!(
                "{url} unreachable: {}",
                clean(&e)
            ))),
            Ok(Err(TransportError::Exchange(e))) => {
                Err(DaemonError::Appliance(format!("{url}: {}", clean(&e))))
            }
            Err(_) => Err(DaemonError::ApplianceTimeout(format!(
                "{url} did not answer within {} s",
                self.timeout.as_secs_f64()
            ))),
        }
    }

    /// A call whose 2xx answer is `T` (`empty_ok`: an empty body is
    /// `T::default()`); a refusal carries the appliance's message.
    async fn call<B: Serialize, T: DeserializeOwned + Default>(
        &self,
        base: &str,
        path: &str,
        body: &B,
        empty_ok: bool,
    ) -> Result<T> {
        let (status, bytes) = self.post(base, path, body).await?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<ApplianceError>(&bytes)
                .map(|e| clean(&e.message))
                .unwrap_or_else(|_| "no message".into());
            return Err(DaemonError::Appliance(format!(
                "{path} refused with {}: {msg}",
                status.as_u16()
            )));
        }
        if empty_ok && bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(T::default());
        }
        serde_json::from_slice(&bytes).map_err(|e| {
            DaemonError::Appliance(format!("{path}: answer is not the contract's body: {e}"))
        })
    }

    /// Ask the appliance how it will send each disk.
    pub async fn prepare(&self, base: &str, req: &PrepareRequest) -> Result<PrepareResponse> {
        self.call::<_, PrepareAnswer>(base, PREPARE_PATH, req, false)
            .await
            .map(|a| a.0)
    }

    /// Hand the targets over; `Ok` once the appliance accepted.
    pub async fn start(&self, base: &str, req: &StartRequest) -> Result<StartResponse> {
        self.call(base, START_PATH, req, true).await
    }

    /// Best-effort cancel, in the background; the answer is ignored.
    pub fn cancel_in_background(&self, base: String, backup_id: String) {
        let me = self.clone();
        self.cancels.spawn(async move {
            let path = CANCEL_PATH.replace("{backup_id}", &backup_id);
            let body =
                serde_json::json!({ "contract": sna_contract::CONTRACT, "backup_id": backup_id });
            match me.post(&base, &path, &body).await {
                Ok((s, _)) => {
                    tracing::info!(backup = %backup_id, status = s.as_u16(), "appliance cancel sent")
                }
                Err(e) => {
                    tracing::warn!(backup = %backup_id, error = %e, "appliance cancel failed")
                }
            }
        });
    }
}

impl SnaClient {
    /// Wait for every cancel sent so far (each bounded by the timeout).
    pub async fn drain(&self) {
        self.cancels.close();
        self.cancels.wait().await;
    }
}

/// [`PrepareResponse`] has no `Default`; an empty prepare answer is not
/// allowed anyway.
#[derive(serde::Deserialize)]
#[serde(transparent)]
struct PrepareAnswer(PrepareResponse);

impl Default for PrepareAnswer {
    fn default() -> Self {
        PrepareAnswer(PrepareResponse { disks: Vec::new() })
    }
}

/// What the appliance agreed to send for one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Agreed {
    /// Full or incremental.
    pub mode: Mode,
    /// The appliance's reason for a full where incremental was offered.
    pub reason: Option<String>,
}

/// Match a prepare answer against what was offered, in the offer's order.
/// Every disk named exactly once, no other disk, and never incremental
/// where the hub offered a full: anything else breaks the contract.
pub fn agree(offered: &[PrepareDisk], answer: &PrepareResponse) -> Result<Vec<Agreed>> {
    let violation =
        |m: String| DaemonError::Appliance(format!("prepare answer breaks the contract: {m}"));
    if let Some(extra) = answer
        .disks
        .iter()
        .find(|a| !offered.iter().any(|o| o.disk_key == a.disk_key))
    {
        return Err(violation(format!("unknown disk_key {}", extra.disk_key)));
    }
    let mut out = Vec::with_capacity(offered.len());
    for o in offered {
        let mut named = answer.disks.iter().filter(|a| a.disk_key == o.disk_key);
        let (Some(a), None) = (named.next(), named.next()) else {
            let n = answer
                .disks
                .iter()
                .filter(|a| a.disk_key == o.disk_key)
                .count();
            return Err(violation(format!(
                "disk_key {} answered {n} times (exactly once expected)",
                o.disk_key
            )));
        };
        match (o.mode, a.mode) {
            (Mode::Full, Mode::Incremental) => {
                return Err(violation(format!(
                    "disk_key {}: incremental where the hub offered full",
                    o.disk_key
                )))
            }
            (Mode::Incremental, Mode::Full) => out.push(Agreed {
                mode: Mode::Full,
                reason: Some(
                    a.reason
                        .as_deref()
                        .map(clean)
                        .filter(|r| !r.trim().is_empty())
                        .unwrap_or_else(|| "the appliance sends a full".into()),
                ),
            }),
            (m, _) => out.push(Agreed {
                mode: m,
                reason: None,
            }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sna_contract::PreparedDisk;

    fn offer(key: u32, mode: Mode) -> PrepareDisk {
        PrepareDisk {
            disk_id: key - 2000,
            disk_key: key,
            size_bytes: 1 << 20,
            mode,
            parent_change_id: (mode == Mode::Incremental).then(|| "c".into()),
            reason: None,
        }
    }

    fn answer(disks: &[(u32, Mode, Option<&str>)]) -> PrepareResponse {
        PrepareResponse {
            disks: disks
                .iter()
                .map(|(k, m, r)| PreparedDisk {
                    disk_key: *k,
                    mode: *m,
                    reason: r.map(str::to_owned),
                })
                .collect(),
        }
    }

    #[test]
    fn agreement_follows_the_contract() {
        use Mode::{Full, Incremental};
        let offered = [
            offer(2000, Incremental),
            offer(2001, Full),
            offer(2002, Incremental),
        ];
        // Downgrade with a reason, in any order.
        let a = agree(
            &offered,
            &answer(&[
                (2002, Full, Some("CBT reset\n")),
                (2000, Incremental, None),
                (2001, Full, None),
            ]),
        )
        .unwrap();
        assert_eq!(
            a[0],
            Agreed {
                mode: Incremental,
                reason: None
            }
        );
        assert_eq!(
            a[1],
            Agreed {
                mode: Full,
                reason: None
            }
        );
        assert_eq!(a[2].mode, Full);
        assert_eq!(a[2].reason.as_deref(), Some("CBT reset "));
        // Violations.
        for bad in [
            answer(&[
                (2000, Incremental, None),
                (2001, Incremental, None),
                (2002, Full, None),
            ]),
            answer(&[(2000, Incremental, None), (2001, Full, None)]),
            answer(&[
                (2000, Full, None),
                (2000, Full, None),
                (2001, Full, None),
                (2002, Full, None),
            ]),
            answer(&[
                (2000, Full, None),
                (2001, Full, None),
                (2002, Full, None),
                (2003, Full, None),
            ]),
        ] {
            assert!(
                matches!(agree(&offered, &bad), Err(DaemonError::Appliance(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn urls_and_tokens() {
        assert_eq!(check_url("u", "http://a:1/").unwrap(), "http://a:1");
        assert_eq!(check_url("u", "http://a/x/").unwrap(), "http://a/x");
        for bad in [
            "https://a",
            "a:1",
            "http://",
            "http://u@a",
            "http://a/?x",
            "http://a/#f",
            "",
        ] {
            assert!(check_url("u", bad).is_err(), "{bad}");
        }
        assert!(SnaToken::new("a b".into()).is_err());
        assert!(SnaToken::new(String::new()).is_err());
        let t = SnaToken::new("secret".into()).unwrap();
        assert!(!format!("{t:?}").contains("secret"));
    }
}
