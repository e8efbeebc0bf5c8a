//! Zeroing ranges without ever handing imago a sub-cluster `write_zeroes`.

use std::io;

use imago::Mapping;

use super::*;

static ZERO: [u8; 1 << 20] = [0; 1 << 20];

fn aligned_down(x: u64, a: u64) -> u64 {
    x - x % a
}

/// Whether `[off, off+len)` already reads as zeroes (mappings, not data).
async fn reads_zero(a: &Access, mut off: u64, len: u64) -> io::Result<bool> {
    let end = off + len;
    while off < end {
        match a.get_mapping(off, end - off).await? {
            (Mapping::Zero { .. }, n) if n > 0 => off += n,
            (Mapping::Eof { .. }, _) => return Ok(true),
            _ => return Ok(false),
        }
    }
    Ok(true)
}

async fn write_zero_buffers(a: &Access, mut off: u64, len: u64) -> io::Result<()> {
    let end = off + len;
    while off < end {
        let n = (end - off).min(ZERO.len() as u64) as usize;
        a.write(&ZERO[..n], off).await?;
        off += n as u64;
    }
    Ok(())
}

/// Zero a range: whole clusters through imago's metadata-only zeroing,
/// partial head and tail as plain zero writes (never a sub-cluster
/// `write_zeroes`, see the module docs). Ranges that already read as zero
/// are left alone, so zeroing a fresh image allocates nothing.
pub(super) async fn zero_range(
    a: &Access,
    off: u64,
    len: u64,
    cluster: u64,
    fast: bool,
) -> io::Result<()> {
    let end = off + len;
    let mid_start = off.div_ceil(cluster) * cluster;
    let mid_end = aligned_down(end, cluster);
    let (head, tail) = if mid_start >= mid_end {
        ((off, len), (end, 0))
    } else {
        ((off, mid_start - off), (mid_end, end - mid_end))
    };
    let head_needs = head.1 > 0 && !reads_zero(a, head.0, head.1).await?;
    let tail_needs = tail.1 > 0 && !reads_zero(a, tail.0, tail.1).await?;
    if fast && (head_needs || tail_needs) {
        return Err(io::Error::from_raw_os_error(95)); // EOPNOTSUPP: would need data writes
    }
    if head_needs {
        write_zero_buffers(a, head.0, head.1).await?;
    }
    if mid_start < mid_end && !reads_zero(a, mid_start, mid_end - mid_start).await? {
        a.write_zeroes(mid_start, mid_end - mid_start).await?;
    }
    if tail_needs {
        write_zero_buffers(a, tail.0, tail.1).await?;
    }
    Ok(())
}
