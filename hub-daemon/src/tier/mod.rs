//! The object-storage tier: a repository's S3 bucket, where completed and
//! verified restore points are offloaded to, evicted from local disk, and
//! re-hydrated from before anything opens them again.
//!
//! # What goes where
//! * Each layer (one disk image of one restore point) becomes one object,
//!   `<repository id>/<image path in the repository>`, uploaded in parts
//!   (several in flight, bounded memory) while its SHA-256 is computed
//!   from the same bytes ([`transfer`]). The catalog records key, size,
//!   SHA-256, the object version and any retention (`catalog::offload`).
//! * With a policy's `min_retention_days`, the object gets an Object Lock
//!   retention in COMPLIANCE mode until then ([`lock`]); a bucket without
//!   Object Lock refuses, which is logged and leaves no retention recorded.
//! * Digest sidecars always stay local: verification and the next
//!   incremental read them, and they are small.
//! * Re-hydration downloads the recorded version to `<image>.rehydrating`,
//!   checks size and SHA-256, fsyncs, and renames it into place; a
//!   mismatch deletes the download and fails the operation, so a damaged
//!   object is never served. Everything that reads a chain re-hydrates
//!   its evicted layers first: restore, verify, the merges of prune and
//!   synthetic fulls, and an incremental's parent.
//!
//! # No object is lost track of
//! A merge rewrites a layer (the result is `local` only, offloaded anew to
//! the same key), a prune or a delete removes restore points: the catalog
//! transaction that forgets their objects also queues each for deletion
//! (`catalog::object_deletions`). The sweep (`backup::object_sweep`)
//! deletes the queued objects — the recorded version, where the bucket
//! versions, so nothing newer under the same key is touched — right after
//! a prune or synthetic full, in the background after a delete, and again
//! in every scheduled lifecycle pass. An object whose recorded retention
//! has not ended is not tried; one the store refuses (Object Lock) or
//! cannot be reached for stays queued, its attempts and last error kept,
//! until a later pass succeeds. A queued deletion without a version is
//! dropped instead once a layer counts on that key again (a re-offloaded
//! merged layer overwrote it). A repository's bucket is set when it is
//! registered and never changes, so a queued object is always in it.
//!
//! # Clients
//! Transfers use `object_store` (Apache Arrow's S3 client) over reqwest
//! with rustls and ring, as the rest of the workspace (no aws-lc). It has
//! no call for an object's retention nor for deleting one version, so
//! those two requests are presigned with `rusty-s3` (SigV4 only, no I/O)
//! and sent with reqwest ([`lock`]).

pub mod lock;
mod sink;
pub mod transfer;

use std::sync::Arc;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::ClientOptions;

use crate::catalog::S3Settings;
use crate::error::{DaemonError, Result};

/// Environment variables the credentials come from when a repository's
/// S3 settings carry none.
pub const ENV_ACCESS_KEY: &str = "AWS_ACCESS_KEY_ID";
/// See [`ENV_ACCESS_KEY`].
pub const ENV_SECRET_KEY: &str = "AWS_SECRET_ACCESS_KEY";

/// A connected bucket.
#[derive(Clone)]
pub struct ObjectTier {
    store: Arc<AmazonS3>,
    signer: Arc<lock::Signer>,
}

// Written by hand: the store's own `Debug` includes its credentials.
impl std::fmt::Debug for ObjectTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectTier")
            .field("signer", &self.signer)
            .finish_non_exhaustive()
    }
}

/// `object_store`'s error as the daemon's (its message names the request
/// that failed, never the credentials).
pub(crate) fn store_error(what: &str, e: object_store::Error) -> DaemonError {
    DaemonError::ObjectStore(format!("{what}: {e}"))
}

impl ObjectTier {
    /// Connect to the bucket of `s` (no request is made yet). Credentials
    /// from `s`, else from the environment.
    pub fn connect(s: &S3Settings) -> Result<ObjectTier> {
        let (key, secret) = match (&s.access_key_id, &s.secret_access_key) {
            (Some(k), Some(v)) => (k.clone(), v.clone()),
            _ => (
                std::env::var(ENV_ACCESS_KEY).map_err(|_| {
                    DaemonError::BadRequest(format!(
                        "the S3 tier has no credentials: give access_key_id and secret_access_key, or set {ENV_ACCESS_KEY} and {ENV_SECRET_KEY}"
                    ))
                })?,
                std::env::var(ENV_SECRET_KEY).map_err(|_| {
                    DaemonError::BadRequest(format!("{ENV_SECRET_KEY} is not set"))
                })?,
            ),
        };
        // reqwest is built without a bundled provider: make ring the
        // process default (an error only means one is installed already).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let allow_http = s.endpoint.starts_with("http://");
        let store = AmazonS3Builder::new()
            .with_endpoint(&s.endpoint)
            .with_bucket_name(&s.bucket)
            .with_region(&s.region)
            .with_access_key_id(&key)
            .with_secret_access_key(&secret)
            .with_virtual_hosted_style_request(!s.path_style)
            .with_client_options(ClientOptions::new().with_allow_http(allow_http))
            .build()
            .map_err(|e| DaemonError::BadRequest(format!("S3 settings: {e}")))?;
        let signer = lock::Signer::new(s, key, secret)?;
        Ok(ObjectTier {
            store: Arc::new(store),
            signer: Arc::new(signer),
        })
    }

    /// The object store itself.
    pub fn store(&self) -> &Arc<AmazonS3> {
        &self.store
    }

    /// The retention signer of the bucket.
    pub fn signer(&self) -> &lock::Signer {
        &self.signer
    }

    /// The object key of image `file` (relative to repository `repo_id`).
    pub fn key_of(repo_id: &str, file: &str) -> String {
        format!("{repo_id}/{file}")
    }
}
