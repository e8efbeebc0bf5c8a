//! Object Lock: the two S3 calls `object_store` has no method for.
//! * `PUT /<key>?retention&versionId=…` with a COMPLIANCE retention;
//! * `DELETE /<key>?versionId=…`: removing one version for good (which
//!   the store refuses while that version's retention lasts), where a
//!   plain delete of a versioned key would only add a delete marker.
//!
//! The requests are presigned (SigV4, `rusty-s3`; the retention body's
//! `Content-MD5`, which S3 requires on that call, is a signed header) and
//! sent with reqwest.

use std::time::Duration;

use base64::Engine as _;
use md5::Digest as _;
use rusty_s3::actions::{DeleteObject, PutObject, S3Action as _};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use crate::catalog::S3Settings;
use crate::error::{DaemonError, Result};

/// How long a presigned retention request stays valid: it is sent at once.
const PRESIGN_FOR: Duration = Duration::from_secs(300);

/// Signs and sends the retention requests of one bucket.
pub struct Signer {
    bucket: Bucket,
    credentials: Credentials,
    http: reqwest::Client,
}

// Written by hand: `Credentials` holds the secret.
impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("bucket", &self.bucket.name())
            .finish_non_exhaustive()
    }
}

/// The XML body of a COMPLIANCE retention until `until` (RFC 3339).
pub fn retention_xml(until: &str) -> String {
    format!(
        "<Retention xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Mode>COMPLIANCE</Mode><RetainUntilDate>{until}</RetainUntilDate></Retention>"
    )
}

impl Signer {
    /// A signer for the bucket of `s` with these credentials.
    pub fn new(s: &S3Settings, key: String, secret: String) -> Result<Signer> {
        let endpoint: reqwest::Url = s
            .endpoint
            .parse()
            .map_err(|e| DaemonError::BadRequest(format!("S3 endpoint {:?}: {e}", s.endpoint)))?;
        let style = if s.path_style {
            UrlStyle::Path
        } else {
            UrlStyle::VirtualHost
        };
        let bucket = Bucket::new(endpoint, style, s.bucket.clone(), s.region.clone())
            .map_err(|e| DaemonError::BadRequest(format!("S3 endpoint {:?}: {e}", s.endpoint)))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| DaemonError::Internal(format!("HTTP client for S3: {e}")))?;
        Ok(Signer {
            bucket,
            credentials: Credentials::new(key, secret),
            http,
        })
    }

    /// Lock object `key` (version `version`, else the latest) in
    /// COMPLIANCE mode until `until_ms`: nobody, the hub included, can
    /// delete or overwrite that version before then.
    pub async fn put_retention(
        &self,
        key: &str,
        version: Option<&str>,
        until_ms: i64,
    ) -> Result<()> {
        let body = retention_xml(&crate::time::rfc3339(until_ms));
        let md5 = base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(&body));
        let mut action = PutObject::new(&self.bucket, Some(&self.credentials), key);
        action.query_mut().insert("retention", "");
        if let Some(v) = version {
            action.query_mut().insert("versionId", v.to_owned());
        }
        action.headers_mut().insert("content-md5", md5.clone());
        let url = action.sign(PRESIGN_FOR);
        let resp = self
            .http
            .put(url)
            .header("content-md5", md5)
            .body(body)
            .send()
            .await
            .map_err(|e| DaemonError::ObjectStore(format!("retention of {key}: {e}")))?;
        check(resp, &format!("retention of {key}")).await
    }

    /// Delete object `key` for good: version `version`, else (a bucket
    /// without versions) the key itself. An object already gone counts
    /// as deleted; a version under retention is refused (an error).
    pub async fn delete_object(&self, key: &str, version: Option<&str>) -> Result<()> {
        let mut action = DeleteObject::new(&self.bucket, Some(&self.credentials), key);
        if let Some(v) = version {
            action.query_mut().insert("versionId", v.to_owned());
        }
        let url = action.sign(PRESIGN_FOR);
        let resp = self
            .http
            .delete(url)
            .send()
            .await
            .map_err(|e| DaemonError::ObjectStore(format!("deleting {key}: {e}")))?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(());
        }
        check(resp, &format!("deleting {key}")).await
    }
}

/// A store's answer as a result: its status and the start of its error
/// document (S3 says why there, e.g. `AccessDenied` for a locked version).
async fn check(resp: reqwest::Response, what: &str) -> Result<()> {
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let text = resp.text().await.unwrap_or_default();
    let text: String = text.chars().take(300).collect();
    Err(DaemonError::ObjectStore(format!(
        "{what}: {status}: {text}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retention_body_is_compliance_mode() {
        let x = retention_xml("2030-01-02T03:04:05Z");
        assert!(x.contains("<Mode>COMPLIANCE</Mode>"));
        assert!(x.contains("<RetainUntilDate>2030-01-02T03:04:05Z</RetainUntilDate>"));
    }
}
