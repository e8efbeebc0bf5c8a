//! The agent's own change tracking: per disk, the `blake3-tree-v1` leaf of
//! every 64 KiB block as of the last completed push, and the change id that
//! push reported. An incremental compares fresh leaves against these and
//! sends only the blocks that differ.
//!
//! One file per disk, `STATE_DIR/<disk>.state`, replaced atomically (tmp +
//! fsync + rename + directory fsync), so a crash leaves the old state or the
//! new one. The file ends with a BLAKE3 of its contents: anything that does
//! not check out is "no state", which means a full, never a wrong
//! incremental.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use disk_digest::algo::Geometry;
use disk_digest::{Hash, BLOCK_SIZE};

const MAGIC: &[u8; 8] = b"HACT0001";
/// Longest change id stored (ours are 35 characters).
const MAX_CHANGE_ID: usize = 256;

/// What the last completed push of one disk left behind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskState {
    /// Change id reported for that push.
    pub change_id: String,
    /// Disk size then.
    pub size: u64,
    /// Leaf of every block, in order.
    pub leaves: Vec<Hash>,
}

/// A fresh random change id (`ha-` + 32 hex digits).
pub fn new_change_id() -> String {
    let mut b = [0u8; 16];
    // /dev/urandom never blocks once the system is up; should it be
    // missing, time and process id still make ids unique per push.
    let ok = File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_ok();
    if !ok {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let mut h = blake3::Hasher::new();
        h.update(&t.to_le_bytes());
        h.update(&std::process::id().to_le_bytes());
        b.copy_from_slice(&h.finalize().as_bytes()[..16]);
    }
    let mut s = String::from("ha-");
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// The file name of a disk's state: letters, digits, `.` and `-` kept,
/// every other byte as `_XX`, so distinct names never collide.
fn file_name(disk: &str) -> String {
    let mut s = String::new();
    for b in disk.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            s.push(char::from(b));
        } else {
            s.push_str(&format!("_{b:02X}"));
        }
    }
    // File names are limited to 255 bytes: long ones keep a readable
    // prefix and end in a hash of the whole name.
    if s.len() > 160 {
        let h = blake3::hash(disk.as_bytes()).to_hex();
        s.truncate(96);
        s.push('~');
        s.push_str(&h[..32]);
    }
    s.push_str(".state");
    s
}

/// Path of `disk`'s state file.
pub fn state_path(dir: &Path, disk: &str) -> PathBuf {
    dir.join(file_name(disk))
}

fn encode(st: &DiskState) -> Vec<u8> {
    let id = st.change_id.as_bytes();
    let mut v = Vec::with_capacity(64 + id.len() + st.leaves.len() * 32);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&st.size.to_le_bytes());
    v.extend_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    v.extend_from_slice(&(id.len() as u32).to_le_bytes());
    v.extend_from_slice(id);
    v.extend_from_slice(&(st.leaves.len() as u64).to_le_bytes());
    for l in &st.leaves {
        v.extend_from_slice(&l.0);
    }
    let sum = blake3::hash(&v);
    v.extend_from_slice(sum.as_bytes());
    v
}

fn decode(v: &[u8]) -> Result<DiskState, &'static str> {
    let body_len = v.len().checked_sub(32).ok_or("truncated")?;
    let (body, sum) = v.split_at(body_len);
    if blake3::hash(body).as_bytes() != sum {
        return Err("checksum mismatch");
    }
    let mut r = body;
    let mut take = |n: usize| -> Result<&[u8], &'static str> {
        if r.len() < n {
            return Err("truncated");
        }
        let (a, b) = r.split_at(n);
        r = b;
        Ok(a)
    };
    if take(8)? != MAGIC {
        return Err("not a state file");
    }
    let u64_of = |b: &[u8]| {
        b.try_into()
            .map(u64::from_le_bytes)
            .map_err(|_| "truncated")
    };
    let u32_of = |b: &[u8]| {
        b.try_into()
            .map(u32::from_le_bytes)
            .map_err(|_| "truncated")
    };
    let size = u64_of(take(8)?)?;
    if u64::from(u32_of(take(4)?)?) != BLOCK_SIZE {
        return Err("other block size");
    }
    let id_len = u32_of(take(4)?)? as usize;
    if id_len > MAX_CHANGE_ID {
        return Err("change id too long");
    }
    let change_id = String::from_utf8(take(id_len)?.to_vec()).map_err(|_| "change id not UTF-8")?;
    let n = u64_of(take(8)?)?;
    if n != Geometry::new(size).blocks() {
        return Err("block count does not match the size");
    }
    let leaves_bytes = take((n as usize).checked_mul(32).ok_or("too large")?)?;
    if !r.is_empty() {
        return Err("trailing bytes");
    }
    let leaves = leaves_bytes
        .chunks_exact(32)
        .map(|c| {
            let mut h = [0u8; 32];
            h.copy_from_slice(c);
            Hash(h)
        })
        .collect();
    Ok(DiskState {
        change_id,
        size,
        leaves,
    })
}

/// Load `disk`'s state. `Err` says why there is none (missing, unreadable
/// or corrupt: all mean "send a full").
pub fn load(dir: &Path, disk: &str) -> Result<DiskState, String> {
    let p = state_path(dir, disk);
    match fs::read(&p) {
        Ok(v) => decode(&v).map_err(|why| format!("its state file is unusable: {why}")),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err("no state file for this disk".to_owned())
        }
        Err(e) => Err(format!("its state file is unreadable: {e}")),
    }
}

/// The state to base an incremental on: exactly `parent_change_id`'s, of a
/// disk of `size` bytes. `Err` is the reason for sending a full instead.
pub fn base_for(
    dir: &Path,
    disk: &str,
    parent_change_id: &str,
    size: u64,
) -> Result<DiskState, String> {
    let no_state = || format!("change tracking has no state for change id {parent_change_id}");
    let st = load(dir, disk).map_err(|why| format!("{} ({why})", no_state()))?;
    if st.change_id != parent_change_id {
        return Err(no_state());
    }
    if st.size != size {
        return Err(format!(
            "disk size changed since change id {parent_change_id} ({} -> {size} bytes)",
            st.size
        ));
    }
    Ok(st)
}

/// Store `st` as `disk`'s state, atomically and durably.
pub fn commit(dir: &Path, disk: &str, st: &DiskState) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    let dst = state_path(dir, disk);
    let tmp = dir.join(format!("{}.tmp", file_name(disk)));
    {
        let mut f = File::create(&tmp)?;
        f.write_all(&encode(st))?;
        f.sync_all()?;
    }
    fs::rename(&tmp, &dst)?;
    // The rename itself is durable only once the directory is synced.
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn sample() -> DiskState {
        let size = 3 * BLOCK_SIZE + 100;
        DiskState {
            change_id: new_change_id(),
            size,
            leaves: (0..4u8).map(|i| disk_digest::algo::leaf(&[i])).collect(),
        }
    }

    #[test]
    fn round_trips_and_rejects_corruption() {
        let d = tempfile::tempdir().unwrap();
        let st = sample();
        commit(d.path(), "vm 1/2000", &st).unwrap();
        assert_eq!(load(d.path(), "vm 1/2000").unwrap(), st);
        assert!(base_for(d.path(), "vm 1/2000", &st.change_id, st.size).is_ok());
        let e = base_for(d.path(), "vm 1/2000", "other", st.size).unwrap_err();
        assert!(e.contains("no state for change id other"), "{e}");
        assert!(base_for(d.path(), "vm 1/2000", &st.change_id, 1).is_err());
        assert!(load(d.path(), "vm 1/2001").is_err());

        let p = state_path(d.path(), "vm 1/2000");
        let mut v = fs::read(&p).unwrap();
        v[40] ^= 1;
        fs::write(&p, &v).unwrap();
        assert!(load(d.path(), "vm 1/2000")
            .unwrap_err()
            .contains("unusable"));
        fs::write(&p, b"short").unwrap();
        assert!(load(d.path(), "vm 1/2000").is_err());
    }

    #[test]
    fn names_do_not_collide_and_ids_differ() {
        assert_ne!(file_name("vm/1"), file_name("vm_1"));
        assert_ne!(file_name("vm/1"), file_name("vm_2F1"));
        let long_a = format!("{}/2000", "v".repeat(300));
        let long_b = format!("{}/2001", "v".repeat(300));
        assert!(file_name(&long_a).len() < 160);
        assert_ne!(file_name(&long_a), file_name(&long_b));
        let a = new_change_id();
        assert_eq!(a.len(), 35);
        assert_ne!(a, new_change_id());
    }
}
