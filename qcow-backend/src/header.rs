//! Our own qcow2 header validation, run before imago ever sees an image.
//!
//! imago accepts some headers qemu refuses (encryption, absurd sizes, tables
//! past the end of the file) and can overflow its stack on a broken refcount
//! table, so every image is checked here first. Parsing is pure: bytes and
//! the file length in, a [`HeaderInfo`] or the precise reason out.
//! Layout per `docs/interop/qcow2.rst` in the QEMU tree.

/// `QFI\xfb`.
pub const QCOW2_MAGIC: [u8; 4] = *b"QFI\xfb";
/// Bytes of the fixed v2 header.
const V2_HEADER_LEN: usize = 72;
/// Bytes of the fixed v3 header.
const V3_HEADER_LEN: usize = 104;
/// Largest virtual size accepted (64 PiB): far above any VM disk, far below
/// where offset arithmetic could overflow.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Largest L1 table (qemu's QCOW_MAX_L1_SIZE).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// Largest refcount table (qemu's QCOW_MAX_REFTABLE_SIZE).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Longest backing file name qemu writes.
pub const MAX_BACKING_NAME: u32 = 1023;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
const EXT_FEATURE_NAMES: u32 = 0x6803_f857;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

/// Incompatible feature bits.
mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
}

/// Why a header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Shorter than a header.
    #[error("file too short for a qcow2 header ({0} bytes)")]
    Truncated(u64),
    /// Not a qcow2 file.
    #[error("bad magic (not a qcow2 image)")]
    BadMagic,
    /// Version other than 2 or 3.
    #[error("unsupported qcow2 version {0}")]
    Version(u32),
    /// Cluster size outside 512 B … 2 MiB.
    #[error("cluster_bits {0} out of range 9..=21")]
    ClusterBits(u32),
    /// Encrypted images are refused outright.
    #[error("image is encrypted (crypt_method {0})")]
    Encrypted(u32),
    /// A field is inconsistent with the format or the file.
    #[error("{0}")]
    Invalid(String),
    /// The image is marked dirty (lazy refcounts left inconsistent).
    #[error("image is marked dirty; repair it with `qemu-img check -r all`")]
    Dirty,
    /// qemu marked the image corrupt.
    #[error("image is marked corrupt")]
    CorruptBit,
    /// A feature we cannot handle safely.
    #[error("unsupported feature: {0}")]
    Unsupported(String),
}

/// What the rest of the backend needs from a validated header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderInfo {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Virtual disk size.
    pub size: u64,
    /// Backing file name as stored (not resolved).
    pub backing_file: Option<String>,
    /// Backing file format from the header extension.
    pub backing_format: Option<String>,
    /// L1 table offset and entry count.
    pub l1_offset: u64,
    /// L1 entries.
    pub l1_entries: u32,
    /// Refcount table offset.
    pub reftable_offset: u64,
    /// Refcount table size in clusters.
    pub reftable_clusters: u32,
    /// log2 of the refcount width in bits.
    pub refcount_order: u32,
}

impl HeaderInfo {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
}

/// Bytes to read from the start of a file to validate its header: the
/// whole first cluster at the largest cluster size.
pub const HEADER_PROBE_LEN: usize = 2 << 20;

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn invalid(msg: impl Into<String>) -> HeaderError {
    HeaderError::Invalid(msg.into())
}

/// Check that `[offset, offset+len)` is cluster aligned and inside the file.
fn check_table(
    what: &str,
    offset: u64,
    len: u64,
    cluster: u64,
    file_len: u64,
) -> Result<(), HeaderError> {
    if offset % cluster != 0 {
        return Err(invalid(format!(
            "{what} offset {offset:#x} is not cluster aligned"
        )));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(invalid(format!(
            "{what} at {offset:#x}+{len:#x} extends past the end of the file ({file_len:#x})"
        ))),
    }
}

/// Validate the header in `head` (the first bytes of the file, up to
/// [`HEADER_PROBE_LEN`]) of a file `file_len` bytes long.
pub fn parse_header(head: &[u8], file_len: u64) -> Result<HeaderInfo, HeaderError> {
    if head.len() < V2_HEADER_LEN || file_len < V2_HEADER_LEN as u64 {
        return Err(HeaderError::Truncated(file_len.min(head.len() as u64)));
    }
    if head[0..4] != QCOW2_MAGIC {
        return Err(HeaderError::BadMagic);
    }
    let version = be32(head, 4);
    if version != 2 && version != 3 {
        return Err(HeaderError::Version(version));
    }
    let backing_offset = be64(head, 8);
    let backing_size = be32(head, 16);
    let cluster_bits = be32(head, 20);
    if !(9..=21).contains(&cluster_bits) {
        return Err(HeaderError::ClusterBits(cluster_bits));
    }
    let cluster = 1u64 << cluster_bits;
    let size = be64(head, 24);
    let crypt = be32(head, 32);
    if crypt != 0 {
        return Err(HeaderError::Encrypted(crypt));
    }
    let l1_entries = be32(head, 36);
    let l1_offset = be64(head, 40);
    let reftable_offset = be64(head, 48);
    let reftable_clusters = be32(head, 56);
    let nb_snapshots = be32(head, 60);

    let (header_len, incompatible, refcount_order) = if version == 3 {
        if head.len() < V3_HEADER_LEN || file_len < V3_HEADER_LEN as u64 {
            return Err(HeaderError::Truncated(file_len.min(head.len() as u64)));
        }
        let header_len = be32(head, 100);
        (header_len, be64(head, 72), be32(head, 96))
    } else {
        (V2_HEADER_LEN as u32, 0, 4)
    };
    if version == 3
        && (u64::from(header_len) < V3_HEADER_LEN as u64 || u64::from(header_len) > cluster)
    {
        return Err(invalid(format!("header_length {header_len} out of range")));
    }
    if incompatible & incompat::DIRTY != 0 {
        return Err(HeaderError::Dirty);
    }
    if incompatible & incompat::CORRUPT != 0 {
        return Err(HeaderError::CorruptBit);
    }
    if incompatible & incompat::EXTERNAL_DATA != 0 {
        return Err(HeaderError::Unsupported("external data file".into()));
    }
    if incompatible & incompat::COMPRESSION_TYPE != 0 {
        return Err(HeaderError::Unsupported("non-zlib compression type".into()));
    }
    if incompatible & incompat::EXTENDED_L2 != 0 {
        return Err(HeaderError::Unsupported(
            "extended L2 entries (subclusters)".into(),
        ));
    }
    let unknown = incompatible & !0x1f;
    if unknown != 0 {
        return Err(HeaderError::Unsupported(format!(
            "incompatible feature bits {unknown:#x}"
        )));
    }
    if refcount_order > 6 {
        return Err(invalid(format!("refcount_order {refcount_order} > 6")));
    }
    if nb_snapshots != 0 {
        return Err(HeaderError::Unsupported(format!(
            "{nb_snapshots} internal snapshot(s)"
        )));
    }
    if size > MAX_VIRTUAL_SIZE {
        return Err(invalid(format!(
            "virtual size {size} exceeds {MAX_VIRTUAL_SIZE}"
        )));
    }

    // L1 must map the whole disk: each entry covers cluster * (cluster / 8) bytes.
    let per_l1 = cluster * (cluster / 8);
    let needed = size.div_ceil(per_l1);
    if u64::from(l1_entries) < needed {
        return Err(invalid(format!(
            "l1_size {l1_entries} too small for {size} bytes (need {needed})"
        )));
    }
    let l1_bytes = u64::from(l1_entries) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(invalid(format!(
            "L1 table of {l1_bytes} bytes is too large"
        )));
    }
    if l1_entries > 0 {
        check_table("L1 table", l1_offset, l1_bytes, cluster, file_len)?;
    }
    if reftable_clusters == 0 {
        return Err(invalid("refcount table has zero clusters"));
    }
    let rt_bytes = u64::from(reftable_clusters) * cluster;
    if rt_bytes > MAX_REFTABLE_BYTES {
        return Err(invalid(format!(
            "refcount table of {rt_bytes} bytes is too large"
        )));
    }
    check_table(
        "refcount table",
        reftable_offset,
        rt_bytes,
        cluster,
        file_len,
    )?;
    if reftable_offset == 0 || (l1_entries > 0 && l1_offset == 0) {
        return Err(invalid("metadata table overlaps the header"));
    }

    let backing_file = if backing_offset != 0 {
        if backing_size == 0 || backing_size > MAX_BACKING_NAME {
            return Err(invalid(format!(
                "backing file name length {backing_size} out of range"
            )));
        }
        let end = backing_offset
            .checked_add(u64::from(backing_size))
            .filter(|e| *e <= cluster && *e <= head.len() as u64 && *e <= file_len)
            .ok_or_else(|| invalid("backing file name lies outside the first cluster"))?;
        let name = &head[backing_offset as usize..end as usize];
        Some(
            std::str::from_utf8(name)
                .map_err(|_| invalid("backing file name is not UTF-8"))?
                .to_owned(),
        )
    } else {
        None
    };

    let backing_format = parse_extensions(head, header_len as usize, cluster)?;
    Ok(HeaderInfo {
        version,
        cluster_bits,
        size,
        backing_file,
        backing_format,
        l1_offset,
        l1_entries,
        reftable_offset,
        reftable_clusters,
        refcount_order,
    })
}

/// Walk the header extensions (bounded by the first cluster and the bytes we
/// have); return the backing format if recorded.
fn parse_extensions(
    head: &[u8],
    start: usize,
    cluster: u64,
) -> Result<Option<String>, HeaderError> {
    let limit = (cluster as usize).min(head.len());
    let mut at = start;
    let mut backing_format = None;
    loop {
        if at + 8 > limit {
            // A v2 image may have no end marker before the backing name;
            // running out of room ends the list.
            return Ok(backing_format);
        }
        let kind = be32(head, at);
        let len = be32(head, at + 4) as usize;
        let data_start = at + 8;
        let data_end = data_start
            .checked_add(len)
            .filter(|e| *e <= limit)
            .ok_or_else(|| {
                invalid(format!(
                    "header extension {kind:#x} overruns the first cluster"
                ))
            })?;
        let data = &head[data_start..data_end];
        match kind {
            EXT_END => return Ok(backing_format),
            EXT_BACKING_FORMAT => {
                backing_format = Some(
                    std::str::from_utf8(data)
                        .map_err(|_| invalid("backing format is not UTF-8"))?
                        .to_owned(),
                );
            }
            EXT_CRYPTO => return Err(HeaderError::Encrypted(0)),
            EXT_DATA_FILE => return Err(HeaderError::Unsupported("external data file".into())),
            EXT_FEATURE_NAMES => {}
            _ => {}
        }
        // Extension data is padded to 8 bytes.
        at = data_start + len.div_ceil(8) * 8;
    }
}

fn check_cluster_size(cluster: u64) -> Result<(), HeaderError> {
    if cluster.is_power_of_two() && (512..=(2 << 20)).contains(&cluster) {
        Ok(())
    } else {
        Err(invalid(format!("cluster size {cluster} is invalid")))
    }
}

/// Check every refcount-table entry: zero, or a cluster-aligned offset inside
/// the file, and the first one present (it covers the header's own cluster;
/// a missing one sends imago into unbounded recursion on the first write).
pub fn check_reftable(table: &[u8], cluster: u64, file_len: u64) -> Result<(), HeaderError> {
    check_cluster_size(cluster)?;
    for (i, e) in table.chunks_exact(8).enumerate() {
        let v = be64(e, 0);
        let off = v & !0x1ff;
        if v & 0x1ff != 0 {
            return Err(invalid(format!(
                "refcount table entry {i} has reserved bits set"
            )));
        }
        if off == 0 {
            if i == 0 {
                return Err(invalid(
                    "refcount table has no block for the header cluster",
                ));
            }
            continue;
        }
        check_table("refcount block", off, cluster, cluster, file_len)?;
    }
    Ok(())
}

/// Offset of the L2 table an L1 entry points to (0 if none).
fn l1_target(entry: u64) -> u64 {
    entry & 0x00ff_ffff_ffff_fe00
}

/// Check every L1 entry: unused, or an L2 table inside the file.
pub fn check_l1(table: &[u8], cluster: u64, file_len: u64) -> Result<(), HeaderError> {
    check_cluster_size(cluster)?;
    for (i, e) in table.chunks_exact(8).enumerate() {
        let off = l1_target(be64(e, 0));
        if off == 0 {
            continue;
        }
        if off % cluster != 0 {
            return Err(invalid(format!("L1 entry {i} is not cluster aligned")));
        }
        check_table("L2 table", off, cluster, cluster, file_len)
            .map_err(|_| invalid(format!("L1 entry {i} points past the end of the file")))?;
    }
    Ok(())
}

/// Check that the metadata structures do not overlap each other — header
/// cluster, L1 table, refcount table, refcount blocks, L2 tables — and that
/// the header, L1 and refcount table clusters have non-zero refcounts.
/// `refblock` returns the bytes of the refcount block at an offset.
///
/// imago has no overlap protection: on an image where, say, the refcount
/// table points at itself, it would happily allocate a "free" cluster that
/// holds metadata and write guest data over it. (L2 *entries* pointing into
/// metadata are not checked: that needs every L2 table read at open.)
pub fn check_metadata_layout(
    info: &HeaderInfo,
    reftable: &[u8],
    l1: &[u8],
    refblock: &mut dyn FnMut(u64) -> Result<Vec<u8>, HeaderError>,
) -> Result<(), HeaderError> {
    let cluster = info.cluster_size();
    check_cluster_size(cluster)?;
    let round = |n: u64| n.div_ceil(cluster) * cluster;
    // (start, end, what)
    let mut regions: Vec<(u64, u64, &'static str)> = vec![(0, cluster, "header")];
    if info.l1_entries > 0 {
        regions.push((
            info.l1_offset,
            info.l1_offset + round(u64::from(info.l1_entries) * 8),
            "L1 table",
        ));
    }
    regions.push((
        info.reftable_offset,
        info.reftable_offset + u64::from(info.reftable_clusters) * cluster,
        "refcount table",
    ));
    for e in reftable.chunks_exact(8) {
        let off = be64(e, 0) & !0x1ff;
        if off != 0 {
            regions.push((off, off + cluster, "refcount block"));
        }
    }
    for e in l1.chunks_exact(8) {
        let off = l1_target(be64(e, 0));
        if off != 0 {
            regions.push((off, off + cluster, "L2 table"));
        }
    }
    regions.sort_unstable();
    for w in regions.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(invalid(format!(
                "{} at {:#x} overlaps {} at {:#x}",
                w[1].2, w[1].0, w[0].2, w[0].0
            )));
        }
    }

    // Refcounts of the fixed metadata must be non-zero, or the allocator
    // would hand those clusters out for data.
    let bits = 1u64 << refcount_order_of(info);
    let per_block = cluster * 8 / bits;
    let mut fixed: Vec<u64> = vec![0];
    let span = |start: u64, len: u64| (start / cluster)..(start + len).div_ceil(cluster);
    if info.l1_entries > 0 {
        fixed.extend(span(info.l1_offset, u64::from(info.l1_entries) * 8));
    }
    fixed.extend(span(
        info.reftable_offset,
        u64::from(info.reftable_clusters) * cluster,
    ));
    let mut cached: Option<(u64, Vec<u8>)> = None;
    for c in fixed {
        let block = c / per_block;
        let entry = reftable
            .get(block as usize * 8..block as usize * 8 + 8)
            .map(|e| be64(e, 0) & !0x1ff)
            .unwrap_or(0);
        if entry == 0 {
            return Err(invalid(format!(
                "metadata cluster {c} has no refcount block"
            )));
        }
        if cached.as_ref().map(|x| x.0) != Some(entry) {
            cached = Some((entry, refblock(entry)?));
        }
        let data = cached.as_ref().map(|x| x.1.as_slice()).unwrap_or(&[]);
        let idx = c % per_block;
        let bit = idx * bits;
        let byte = (bit / 8) as usize;
        let refcount = match bits {
            1 | 2 | 4 => data.get(byte).map_or(0, |b| {
                u64::from((b >> (8 - bits - bit % 8)) & ((1 << bits) - 1))
            }),
            _ => {
                let n = (bits / 8) as usize;
                data.get(byte..byte + n).map_or(0, |v| {
                    v.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
                })
            }
        };
        if refcount == 0 {
            return Err(invalid(format!("metadata cluster {c} has refcount 0")));
        }
    }
    Ok(())
}

fn refcount_order_of(info: &HeaderInfo) -> u32 {
    info.refcount_order
}

#[cfg(test)]
#[path = "header_tests.rs"]
mod tests;
