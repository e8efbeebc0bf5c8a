//! `hub-daemon digest TARGET...`: the `blake3-tree-v1` digest of image
//! files and remote NBD exports, one line per target like `sha256sum`.
//!
//! A file is opened read-only by content (qcow2 with its backing chain, the
//! chain allowed only inside the image's own directory; anything else raw);
//! an `nbd://host:port/export` URI is read through `nbd-client`. Either way
//! the bytes come through a `BlockBackend` and `disk_digest::read`, so a
//! file and the same disk served over NBD give the same digest, and holes
//! are never read or hashed byte by byte.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use nbd_server::BlockBackend;
use qcow_backend::{open_image, BackingPolicy, OpenOptions};
use serde_json::json;

/// Print the digest of each TARGET.
#[derive(Debug, Args)]
pub struct DigestArgs {
    /// One JSON object per line: target, size, algorithm, digest.
    #[arg(long)]
    json: bool,
    /// Image files (qcow2 detected by content, else raw) or
    /// `nbd://host[:port]/export` URIs.
    #[arg(required = true, value_name = "TARGET")]
    targets: Vec<String>,
}

/// Open `target` read-only as a backend.
pub async fn open_target(target: &str) -> anyhow::Result<Arc<dyn BlockBackend>> {
    if target.starts_with("nbd://") || target.starts_with("nbds://") {
        let client = nbd_client::connect_uri(target)
            .await
            .with_context(|| format!("connecting to {target}"))?;
        return Ok(Arc::new(nbd_client::NbdBackend::new(client)));
    }
    let path = Path::new(target);
    // An empty list means "the image's own directory only".
    let opts = OpenOptions::new()
        .read_only(true)
        .policy(BackingPolicy::within(Vec::new()));
    let (backend, _format) = open_image(path, &opts)
        .await
        .with_context(|| format!("opening {target}"))?;
    Ok(backend)
}

/// The digest of one target: size and root hash.
pub async fn digest_target(target: &str) -> anyhow::Result<(u64, disk_digest::Hash)> {
    let backend = open_target(target).await?;
    let size = backend.size();
    let result = disk_digest::read::digest_backend(Arc::clone(&backend), |_| {}).await;
    // Release the image or the connection whatever the outcome.
    let closed = backend.close().await;
    let (root, _segments) = result.with_context(|| format!("reading {target}"))?;
    closed.with_context(|| format!("closing {target}"))?;
    Ok((size, root))
}

/// One output line.
fn line(json: bool, target: &str, size: u64, root: &disk_digest::Hash) -> String {
    if json {
        json!({
            "target": target,
            "size": size,
            "algorithm": disk_digest::ALGORITHM,
            "digest": root.to_hex(),
        })
        .to_string()
    } else {
        format!("{}  {target}", root.to_hex())
    }
}

/// The error and its causes on one line, skipping a cause whose text the
/// previous message already includes (image errors embed their cause).
fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let msg = cause.to_string();
        if out.contains(&msg) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&msg);
    }
    out
}

/// Run the command: every target is tried; the exit status is non-zero if
/// any failed.
pub async fn run(args: DigestArgs) -> anyhow::Result<()> {
    let mut failed = 0usize;
    for target in &args.targets {
        match digest_target(target).await {
            Ok((size, root)) => println!("{}", line(args.json, target, size, &root)),
            Err(e) => {
                eprintln!("hub-daemon digest: {}", error_chain(&e));
                failed += 1;
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} targets failed", args.targets.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lines_look_like_sha256sum_or_json() {
        let h = disk_digest::algo::digest_of_bytes(b"abc");
        let l = line(false, "a b.raw", 3, &h);
        assert_eq!(l, format!("{}  a b.raw", h.to_hex()));
        let j: serde_json::Value = serde_json::from_str(&line(true, "x", 3, &h)).unwrap();
        assert_eq!(j["algorithm"], "blake3-tree-v1");
        assert_eq!(j["size"], 3);
        assert_eq!(j["target"], "x");
        assert_eq!(j["digest"].as_str().unwrap().len(), 64);
    }
}
