//! One valid header written out as annotated bytes, then one change per
//! negative test (crosvm style).

use super::*;

const FILE_LEN: u64 = 0x40000;

fn valid_header() -> Vec<u8> {
    let mut h = vec![
        b'Q', b'F', b'I', 0xfb, // magic
        0, 0, 0, 3, // version
        0, 0, 0, 0, 0, 0, 0, 0, // backing_file_offset
        0, 0, 0, 0, // backing_file_size
        0, 0, 0, 16, // cluster_bits (64 KiB)
        0, 0, 0, 0, 0, 0x10, 0, 0, // size: 1 MiB
        0, 0, 0, 0, // crypt_method
        0, 0, 0, 1, // l1_size
        0, 0, 0, 0, 0, 3, 0, 0, // l1_table_offset 0x30000
        0, 0, 0, 0, 0, 1, 0, 0, // refcount_table_offset 0x10000
        0, 0, 0, 1, // refcount_table_clusters
        0, 0, 0, 0, // nb_snapshots
        0, 0, 0, 0, 0, 0, 0, 0, // snapshots_offset
        0, 0, 0, 0, 0, 0, 0, 0, // incompatible_features
        0, 0, 0, 0, 0, 0, 0, 0, // compatible_features
        0, 0, 0, 0, 0, 0, 0, 0, // autoclear_features
        0, 0, 0, 4, // refcount_order
        0, 0, 0, 104, // header_length
    ];
    h.extend_from_slice(&[0; 8]); // end-of-extensions marker
    h.resize(512, 0);
    h
}

fn put32(h: &mut [u8], at: usize, v: u32) {
    h[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(h: &mut [u8], at: usize, v: u64) {
    h[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

#[test]
fn valid_header_parses() {
    let info = parse_header(&valid_header(), FILE_LEN).unwrap();
    assert_eq!(info.version, 3);
    assert_eq!(info.cluster_size(), 65536);
    assert_eq!(info.size, 1 << 20);
    assert_eq!(info.backing_file, None);
}

#[test]
fn truncated_file_is_rejected() {
    assert!(matches!(
        parse_header(&valid_header()[..50], 50),
        Err(HeaderError::Truncated(_))
    ));
    assert!(matches!(
        parse_header(&valid_header()[..80], 80),
        Err(HeaderError::Truncated(_))
    ));
}

#[test]
fn bad_magic_is_rejected() {
    let mut h = valid_header();
    h[3] = 0xfa;
    assert_eq!(parse_header(&h, FILE_LEN), Err(HeaderError::BadMagic));
}

#[test]
fn unknown_version_is_rejected() {
    for v in [1, 4, 99] {
        let mut h = valid_header();
        put32(&mut h, 4, v);
        assert_eq!(parse_header(&h, FILE_LEN), Err(HeaderError::Version(v)));
    }
}

#[test]
fn cluster_bits_out_of_range_are_rejected() {
    for bits in [0, 8, 22, 63, 200] {
        let mut h = valid_header();
        put32(&mut h, 20, bits);
        assert_eq!(
            parse_header(&h, FILE_LEN),
            Err(HeaderError::ClusterBits(bits))
        );
    }
}

#[test]
fn encrypted_image_is_rejected() {
    for m in [1, 2] {
        let mut h = valid_header();
        put32(&mut h, 32, m);
        assert_eq!(parse_header(&h, FILE_LEN), Err(HeaderError::Encrypted(m)));
    }
}

#[test]
fn luks_header_extension_is_rejected() {
    let mut h = valid_header();
    put32(&mut h, 104, 0x0537_be77);
    put32(&mut h, 108, 16);
    assert_eq!(parse_header(&h, FILE_LEN), Err(HeaderError::Encrypted(0)));
}

#[test]
fn huge_virtual_size_is_rejected() {
    let mut h = valid_header();
    put64(&mut h, 24, u64::MAX);
    assert!(matches!(
        parse_header(&h, FILE_LEN),
        Err(HeaderError::Invalid(_))
    ));
}

#[test]
fn l1_too_small_for_size_is_rejected() {
    let mut h = valid_header();
    put64(&mut h, 24, 1 << 40);
    assert!(
        matches!(parse_header(&h, FILE_LEN), Err(HeaderError::Invalid(m)) if m.contains("too small"))
    );
}

#[test]
fn huge_l1_size_rejected() {
    let mut h = valid_header();
    put32(&mut h, 36, 0xffff_ffff);
    assert!(
        matches!(parse_header(&h, FILE_LEN), Err(HeaderError::Invalid(m)) if m.contains("too large"))
    );
}

#[test]
fn l1_table_past_end_of_file_is_rejected() {
    let mut h = valid_header();
    put64(&mut h, 40, 0x10_0000);
    assert!(
        matches!(parse_header(&h, FILE_LEN), Err(HeaderError::Invalid(m)) if m.contains("past the end"))
    );
}

#[test]
fn unaligned_l1_offset_is_rejected() {
    let mut h = valid_header();
    put64(&mut h, 40, 0x30001);
    assert!(
        matches!(parse_header(&h, FILE_LEN), Err(HeaderError::Invalid(m)) if m.contains("aligned"))
    );
}

#[test]
fn refcount_table_past_end_of_file_is_rejected() {
    let mut h = valid_header();
    put64(&mut h, 48, 0x1000_0000);
    assert!(matches!(
        parse_header(&h, FILE_LEN),
        Err(HeaderError::Invalid(_))
    ));
}

#[test]
fn zero_refcount_table_clusters_is_rejected() {
    let mut h = valid_header();
    put32(&mut h, 56, 0);
    assert!(
        matches!(parse_header(&h, FILE_LEN), Err(HeaderError::Invalid(m)) if m.contains("zero clusters"))
    );
}

#[test]
fn refcount_table_at_header_is_rejected() {
    let mut h = valid_header();
    put64(&mut h, 48, 0);
    assert!(matches!(
        parse_header(&h, FILE_LEN),
        Err(HeaderError::Invalid(_))
    ));
}

#[test]
fn refcount_order_over_six_is_rejected() {
    let mut h = valid_header();
    put32(&mut h, 96, 7);
    assert!(matches!(
        parse_header(&h, FILE_LEN),
        Err(HeaderError::Invalid(_))
    ));
}

#[test]
fn header_length_out_of_range_is_rejected() {
    for len in [0, 100, 0x20000] {
        let mut h = valid_header();
        put32(&mut h, 100, len);
        assert!(
            matches!(parse_header(&h, FILE_LEN), Err(HeaderError::Invalid(_))),
            "{len}"
        );
    }
}

#[test]
fn dirty_and_corrupt_bits_are_rejected() {
    let mut h = valid_header();
    put64(&mut h, 72, 1);
    assert_eq!(parse_header(&h, FILE_LEN), Err(HeaderError::Dirty));
    put64(&mut h, 72, 2);
    assert_eq!(parse_header(&h, FILE_LEN), Err(HeaderError::CorruptBit));
}

#[test]
fn unsupported_incompatible_features_are_rejected() {
    for bit in [2u64, 3, 4, 5, 63] {
        let mut h = valid_header();
        put64(&mut h, 72, 1 << bit);
        assert!(
            matches!(parse_header(&h, FILE_LEN), Err(HeaderError::Unsupported(_))),
            "bit {bit}"
        );
    }
}

#[test]
fn internal_snapshots_are_rejected() {
    let mut h = valid_header();
    put32(&mut h, 60, 1);
    assert!(matches!(
        parse_header(&h, FILE_LEN),
        Err(HeaderError::Unsupported(_))
    ));
}

#[test]
fn backing_file_name_and_format_are_read() {
    let mut h = valid_header();
    // extension: backing format "qcow2" (5 bytes, padded to 8), then end
    put32(&mut h, 104, 0xe279_2aca);
    put32(&mut h, 108, 5);
    h[112..117].copy_from_slice(b"qcow2");
    put32(&mut h, 120, 0);
    put32(&mut h, 124, 0);
    h[200..209].copy_from_slice(b"base.qcow2"[..9].as_ref());
    put64(&mut h, 8, 200);
    put32(&mut h, 16, 9);
    let info = parse_header(&h, FILE_LEN).unwrap();
    assert_eq!(info.backing_file.as_deref(), Some("base.qcow"));
    assert_eq!(info.backing_format.as_deref(), Some("qcow2"));
}

#[test]
fn backing_name_outside_first_cluster_is_rejected() {
    let mut h = valid_header();
    put64(&mut h, 8, 0xffff);
    put32(&mut h, 16, 10);
    assert!(
        matches!(parse_header(&h, FILE_LEN), Err(HeaderError::Invalid(m)) if m.contains("first cluster"))
    );
}

#[test]
fn backing_name_too_long_is_rejected() {
    let mut h = valid_header();
    put64(&mut h, 8, 200);
    put32(&mut h, 16, 5000);
    assert!(matches!(
        parse_header(&h, FILE_LEN),
        Err(HeaderError::Invalid(_))
    ));
}

#[test]
fn backing_name_offset_overflow_is_rejected() {
    let mut h = valid_header();
    put64(&mut h, 8, u64::MAX - 2);
    put32(&mut h, 16, 10);
    assert!(matches!(
        parse_header(&h, FILE_LEN),
        Err(HeaderError::Invalid(_))
    ));
}

#[test]
fn extension_overrunning_cluster_is_rejected() {
    let mut h = valid_header();
    put32(&mut h, 104, 0x1234);
    put32(&mut h, 108, 0xffff_fff0);
    assert!(
        matches!(parse_header(&h, FILE_LEN), Err(HeaderError::Invalid(m)) if m.contains("overruns"))
    );
}

#[test]
fn external_data_file_extension_is_rejected() {
    let mut h = valid_header();
    put32(&mut h, 104, 0x4441_5441);
    put32(&mut h, 108, 4);
    assert!(matches!(
        parse_header(&h, FILE_LEN),
        Err(HeaderError::Unsupported(_))
    ));
}

#[test]
fn reftable_entries_are_checked() {
    let c = 65536;
    let mut t = vec![0u8; 16];
    assert!(
        check_reftable(&t, c, FILE_LEN).is_err(),
        "first entry missing"
    );
    t[0..8].copy_from_slice(&0x20000u64.to_be_bytes());
    assert!(check_reftable(&t, c, FILE_LEN).is_ok());
    t[8..16].copy_from_slice(&0x100000u64.to_be_bytes());
    assert!(check_reftable(&t, c, FILE_LEN).is_err(), "block past EOF");
    t[8..16].copy_from_slice(&0x20001u64.to_be_bytes());
    assert!(check_reftable(&t, c, FILE_LEN).is_err(), "reserved bits");
}

#[test]
fn l1_entries_are_checked() {
    let c = 65536;
    let mut t = vec![0u8; 16];
    assert!(check_l1(&t, c, FILE_LEN).is_ok());
    t[0..8].copy_from_slice(&(0x8000_0000_0003_0000u64).to_be_bytes());
    assert!(check_l1(&t, c, FILE_LEN).is_ok(), "COPIED flag is fine");
    t[8..16].copy_from_slice(&0x7000_0000u64.to_be_bytes());
    assert!(check_l1(&t, c, FILE_LEN).is_err());
    t[8..16].copy_from_slice(&0x30200u64.to_be_bytes());
    assert!(check_l1(&t, c, FILE_LEN).is_err());
}

#[test]
fn v2_header_without_extensions_parses() {
    let mut h = valid_header();
    put32(&mut h, 4, 2);
    h.truncate(72);
    h.resize(512, 0);
    let info = parse_header(&h, FILE_LEN).unwrap();
    assert_eq!(info.version, 2);
}

#[test]
fn arbitrary_bytes_never_panic() {
    // A cheap in-test sweep; the fuzz target goes much further.
    let mut seed = 1u64;
    for _ in 0..2000 {
        let mut h = valid_header();
        for _ in 0..4 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let at = (seed >> 33) as usize % h.len();
            h[at] = (seed >> 13) as u8;
        }
        let _ = parse_header(&h, (seed >> 40) % (1 << 22));
    }
}

/// The layout of `valid_header()`: header 0x0, refcount table 0x10000,
/// refcount block 0x20000, L1 0x30000 (all one 64 KiB cluster).
fn layout() -> (HeaderInfo, Vec<u8>, Vec<u8>, Vec<u8>) {
    let info = parse_header(&valid_header(), FILE_LEN).unwrap();
    let mut reftable = vec![0u8; 65536];
    reftable[0..8].copy_from_slice(&0x20000u64.to_be_bytes());
    // 16-bit refcounts: clusters 0..=3 used once each.
    let mut refblock = vec![0u8; 65536];
    for c in 0..4 {
        refblock[c * 2 + 1] = 1;
    }
    let l1 = vec![0u8; 8];
    (info, reftable, refblock, l1)
}

fn check(info: &HeaderInfo, rt: &[u8], l1: &[u8], rb: &[u8]) -> Result<(), HeaderError> {
    let rb = rb.to_vec();
    check_metadata_layout(info, rt, l1, &mut |_| Ok(rb.clone()))
}

#[test]
fn consistent_layout_passes() {
    let (info, rt, rb, l1) = layout();
    check(&info, &rt, &l1, &rb).unwrap();
}

#[test]
fn refcount_block_on_the_refcount_table_is_rejected() {
    // Found by fuzzing (crafted-b-rt-self): the table points at itself.
    let (info, mut rt, rb, l1) = layout();
    rt[0..8].copy_from_slice(&0x10000u64.to_be_bytes());
    assert!(
        matches!(check(&info, &rt, &l1, &rb), Err(HeaderError::Invalid(m)) if m.contains("overlaps"))
    );
}

#[test]
fn l2_table_on_the_l1_table_is_rejected() {
    let (info, rt, rb, _) = layout();
    let l1 = 0x30000u64.to_be_bytes().to_vec();
    assert!(
        matches!(check(&info, &rt, &l1, &rb), Err(HeaderError::Invalid(m)) if m.contains("overlaps"))
    );
}

#[test]
fn l1_overlapping_the_refcount_table_is_rejected() {
    let (mut info, rt, rb, l1) = layout();
    info.l1_offset = 0x10000;
    assert!(
        matches!(check(&info, &rt, &l1, &rb), Err(HeaderError::Invalid(m)) if m.contains("overlaps"))
    );
}

#[test]
fn metadata_with_refcount_zero_is_rejected() {
    // Found by fuzzing (crafted-g-header-free): the header's refcount is 0,
    // so the allocator would hand out cluster 0 for guest data.
    let (info, rt, mut rb, l1) = layout();
    rb[1] = 0;
    assert!(
        matches!(check(&info, &rt, &l1, &rb), Err(HeaderError::Invalid(m)) if m.contains("refcount 0"))
    );
    let (info, rt, mut rb, l1) = layout();
    rb[3 * 2 + 1] = 0; // the L1 table's cluster
    assert!(check(&info, &rt, &l1, &rb).is_err());
}

#[test]
fn sub_byte_refcount_widths_are_read_correctly() {
    // refcount_order 0 (1-bit refcounts): clusters 0..=3 are bits 7..=4 of byte 0.
    let (mut info, rt, _, l1) = layout();
    info.refcount_order = 0;
    let mut rb = vec![0u8; 65536];
    rb[0] = 0b1111_0000;
    check(&info, &rt, &l1, &rb).unwrap();
    rb[0] = 0b0111_0000;
    assert!(
        check(&info, &rt, &l1, &rb).is_err(),
        "header refcount bit clear"
    );
}

#[test]
fn zero_cluster_size_is_an_error_not_a_panic() {
    assert!(check_reftable(&[0; 8], 0, FILE_LEN).is_err());
    assert!(check_l1(&[0; 8], 0, FILE_LEN).is_err());
}
