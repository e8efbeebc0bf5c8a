//! Moving one image file to and from its object, hashing the bytes on the
//! way (SHA-256 of the file's bytes, which is also the object's).
//!
//! File I/O and hashing run on a blocking thread; the async side only
//! moves buffers between it and the object store through a channel of a
//! few chunks, so memory stays bounded: at most
//! `PART_SIZE × (PARTS_IN_FLIGHT + 1)` plus the channel on upload.

use std::io::Read;

use bytes::Bytes;
use futures_util::StreamExt as _;
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, ObjectStore as _, ObjectStoreExt as _, WriteMultipart};

use super::sink::{self, Gather};
use super::{store_error, ObjectTier};
use crate::error::{DaemonError, Result};

/// Bytes per uploaded part (S3 wants at least 5 MiB but for the last).
pub const PART_SIZE: usize = 8 << 20;
/// Parts uploaded at once: 8 × 8 MiB kept a local SeaweedFS busier than
/// 4 × 16 MiB (same memory bound). Downloads stay one GET stream: eight
/// ranged GETs of 8 MiB halved the re-hydration rate against SeaweedFS
/// (192 vs 354 MB/s, idle, 512 MiB).
pub const PARTS_IN_FLIGHT: usize = 8;
/// Bytes the reader thread hands over at a time.
const CHUNK: usize = 4 << 20;
/// Chunks queued between the file thread and the network.
const QUEUE: usize = 4;
/// What an upload made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uploaded {
    /// Bytes.
    pub size_bytes: u64,
    /// SHA-256 of the bytes (hex).
    pub sha256: String,
    /// The version the store gave the object, if it versions.
    pub version_id: Option<String>,
}

pub(super) fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn object_path(key: &str) -> Result<ObjectPath> {
    ObjectPath::parse(key).map_err(|e| DaemonError::Internal(format!("object key {key:?}: {e}")))
}

/// Read as much of `buf` as the file has (short only at its end).
fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl ObjectTier {
    /// Upload `file` (open for reading) as object `key`, in parts.
    pub async fn upload(&self, mut file: std::fs::File, key: &str) -> Result<Uploaded> {
        let path = object_path(key)?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUE);
        let reader = tokio::task::spawn_blocking(move || -> std::io::Result<(u64, String)> {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut total = 0u64;
            loop {
                let mut buf = vec![0u8; CHUNK];
                let n = read_full(&mut file, &mut buf)?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                ctx.update(&buf);
                total += n as u64;
                if tx.blocking_send(Bytes::from(buf)).is_err() {
                    // The upload gave up; its error is the one reported.
                    break;
                }
            }
            Ok((total, hex(ctx.finish().as_ref())))
        });
        let upload = self
            .store()
            .put_multipart(&path)
            .await
            .map_err(|e| store_error(&format!("starting the upload of {key}"), e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
        let sent: Result<()> = async {
            while let Some(chunk) = rx.recv().await {
                w.wait_for_capacity(PARTS_IN_FLIGHT)
                    .await
                    .map_err(|e| store_error(&format!("uploading {key}"), e))?;
                w.put(chunk);
            }
            Ok(())
        }
        .await;
        drop(rx);
        let read = reader
            .await
            .map_err(|e| DaemonError::Internal(format!("upload reader: {e}")))
            .and_then(|r| {
                r.map_err(|e| DaemonError::io(format!("reading the image for {key}"), e))
            });
        let (size_bytes, sha256) = match (sent, read) {
            (Ok(()), Ok(v)) => v,
            (Err(e), _) | (Ok(()), Err(e)) => {
                // Leaves no half object: the parts are discarded.
                if let Err(a) = w.abort().await {
                    tracing::warn!(key, error = %a, "aborting a failed multipart upload");
                }
                return Err(e);
            }
        };
        let put = w
            .finish()
            .await
            .map_err(|e| store_error(&format!("completing the upload of {key}"), e))?;
        Ok(Uploaded {
            size_bytes,
            sha256,
            version_id: put.version,
        })
    }

    /// Download object `key` (version `version`, else the latest) into
    /// `file` (new, open for writing), synced when this returns. Returns
    /// the bytes and their SHA-256; more than `max_bytes` is an error
    /// (the catalog knows the size: a longer object is not ours).
    pub async fn download(
        &self,
        key: &str,
        version: Option<String>,
        file: std::fs::File,
        max_bytes: u64,
    ) -> Result<(u64, String)> {
        let path = object_path(key)?;
        let opts = GetOptions {
            version,
            ..Default::default()
        };
        let got = self
            .store()
            .get_opts(&path, opts)
            .await
            .map_err(|e| store_error(&format!("downloading {key}"), e))?;
        // Hashing and writing run on threads of their own, side by side,
        // each behind a short queue of whole buffers (see `sink`).
        let (hash_tx, hash_rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUE);
        let (write_tx, write_rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUE);
        let hasher = tokio::task::spawn_blocking(move || sink::hash(hash_rx));
        let writer = tokio::task::spawn_blocking(move || sink::write(file, write_rx));
        let mut stream = got.into_stream();
        let mut total = 0u64;
        let received: Result<()> = async {
            let mut gather = Gather::new();
            let mut full = Vec::new();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|e| store_error(&format!("downloading {key}"), e))?;
                total = total.saturating_add(chunk.len() as u64);
                if total > max_bytes {
                    return Err(DaemonError::BadImage(format!(
                        "object {key} is longer than the {max_bytes} bytes recorded"
                    )));
                }
                gather.push(&chunk, |b| full.push(b));
                if !sink::send_both(&mut full, &hash_tx, &write_tx).await {
                    // A thread failed; the writer's error is the one reported.
                    return Ok(());
                }
            }
            full.extend(gather.finish());
            sink::send_both(&mut full, &hash_tx, &write_tx).await;
            Ok(())
        }
        .await;
        drop(hash_tx);
        drop(write_tx);
        let sha256 = hasher
            .await
            .map_err(|e| DaemonError::Internal(format!("download hasher: {e}")))?;
        let written = writer
            .await
            .map_err(|e| DaemonError::Internal(format!("download writer: {e}")))?
            .map_err(|e| DaemonError::io(format!("writing the download of {key}"), e))
            .map(|n| (n, sha256));
        received?;
        written
    }
}
