use super::*;

fn compact(flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) -> Vec<u8> {
    let mut v = vec![0x25, 0x60, 0x95, 0x13];
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&kind.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&offset.to_be_bytes());
    v.extend_from_slice(&length.to_be_bytes());
    v
}

fn session() -> Session {
    Session {
        size: 1 << 20,
        flags: tx_flags::HAS_FLAGS
            | tx_flags::SEND_FLUSH
            | tx_flags::SEND_FUA
            | tx_flags::SEND_TRIM
            | tx_flags::SEND_WRITE_ZEROES
            | tx_flags::SEND_FAST_ZERO,
        structured: true,
        extended: false,
        has_contexts: true,
    }
}

fn header(kind: u16, flags: u16, offset: u64, length: u64) -> RequestHeader {
    RequestHeader {
        flags,
        kind,
        cookie: 7,
        offset,
        length,
    }
}

#[test]
fn decodes_compact_header_fields() {
    let b = compact(1, 1, 0x0102030405060708, 4096, 512);
    let h = RequestHeader::decode(&b, false).unwrap().unwrap();
    assert_eq!(
        h,
        RequestHeader {
            flags: 1,
            kind: 1,
            cookie: 0x0102030405060708,
            offset: 4096,
            length: 512
        }
    );
    assert_eq!(h.payload_len(false), 512);
}

#[test]
fn short_buffer_needs_more() {
    let b = compact(0, 0, 1, 0, 512);
    assert_eq!(RequestHeader::decode(&b[..27], false), Ok(None));
}

#[test]
fn bad_magic_is_a_frame_error() {
    let mut b = compact(0, 0, 1, 0, 512);
    b[0] = 0x12;
    assert_eq!(
        RequestHeader::decode(&b, false),
        Err(FrameError::BadMagic(0x12609513))
    );
}

#[test]
fn compact_magic_is_rejected_in_extended_mode() {
    let mut b = compact(0, 0, 1, 0, 512);
    b.extend_from_slice(&[0; 4]);
    assert!(matches!(
        RequestHeader::decode(&b, true),
        Err(FrameError::BadMagic(_))
    ));
}

#[test]
fn oversized_write_payload_is_a_frame_error() {
    let b = compact(0, cmd::WRITE, 1, 0, MAX_PAYLOAD + 1);
    assert_eq!(
        RequestHeader::decode(&b, false),
        Err(FrameError::PayloadTooLarge(u64::from(MAX_PAYLOAD) + 1))
    );
}

#[test]
fn oversized_read_is_not_a_frame_error() {
    let b = compact(0, cmd::READ, 1, 0, u32::MAX);
    assert!(RequestHeader::decode(&b, false).unwrap().is_some());
}

#[test]
fn extended_header_round_trips_and_payload_follows_flag() {
    let h = header(cmd::WRITE, cmd_flags::PAYLOAD_LEN, 1 << 40, 4096);
    let mut v = Vec::new();
    h.encode(true, &mut v);
    assert_eq!(v.len(), 32);
    assert_eq!(&v[..4], &[0x21, 0xe4, 0x1c, 0x71]);
    let d = RequestHeader::decode(&v, true).unwrap().unwrap();
    assert_eq!(d, h);
    assert_eq!(d.payload_len(true), 4096);
    let z = header(cmd::WRITE_ZEROES, 0, 0, 1 << 40);
    assert_eq!(z.payload_len(true), 0);
    let extended_write_over_max = header(cmd::WRITE, 0, 0, 1 << 40);
    let mut v = Vec::new();
    extended_write_over_max.encode(true, &mut v);
    assert!(matches!(
        RequestHeader::decode(&v, true),
        Err(FrameError::PayloadTooLarge(_))
    ));
}

#[test]
fn extended_payload_len_over_max_is_a_frame_error() {
    let h = header(cmd::BLOCK_STATUS, cmd_flags::PAYLOAD_LEN, 0, 1 << 33);
    let mut v = Vec::new();
    h.encode(true, &mut v);
    assert!(matches!(
        RequestHeader::decode(&v, true),
        Err(FrameError::PayloadTooLarge(_))
    ));
}

#[test]
fn read_in_range_is_valid() {
    let c = validate(&header(cmd::READ, cmd_flags::DF, 512, 4096), &session()).unwrap();
    assert_eq!(
        c,
        Command::Read {
            offset: 512,
            len: 4096,
            df: true
        }
    );
}

#[test]
fn read_past_end_is_einval() {
    assert_eq!(
        validate(&header(cmd::READ, 0, (1 << 20) - 512, 4096), &session()),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn read_with_overflowing_range_is_einval() {
    assert_eq!(
        validate(&header(cmd::READ, 0, u64::MAX, 2), &session()),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn read_larger_than_max_payload_is_eoverflow() {
    let mut s = session();
    s.size = 1 << 30;
    assert_eq!(
        validate(&header(cmd::READ, 0, 0, u64::from(MAX_PAYLOAD) + 1), &s),
        Err(NbdErrno::EOVERFLOW)
    );
}

#[test]
fn df_without_structured_replies_is_einval() {
    let mut s = session();
    s.structured = false;
    assert_eq!(
        validate(&header(cmd::READ, cmd_flags::DF, 0, 512), &s),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn fua_on_read_is_accepted() {
    assert!(validate(&header(cmd::READ, cmd_flags::FUA, 0, 512), &session()).is_ok());
}

#[test]
fn unknown_flag_is_einval() {
    assert_eq!(
        validate(&header(cmd::READ, 0x80, 0, 512), &session()),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn flag_of_another_command_is_einval() {
    assert_eq!(
        validate(&header(cmd::WRITE, cmd_flags::NO_HOLE, 0, 512), &session()),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn unknown_command_is_einval() {
    assert_eq!(
        validate(&header(42, 0, 0, 0), &session()),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn write_past_end_is_enospc() {
    assert_eq!(
        validate(&header(cmd::WRITE, 0, 1 << 20, 1), &session()),
        Err(NbdErrno::ENOSPC)
    );
}

#[test]
fn write_to_read_only_is_eperm() {
    let mut s = session();
    s.flags |= tx_flags::READ_ONLY;
    assert_eq!(
        validate(&header(cmd::WRITE, 0, 0, 512), &s),
        Err(NbdErrno::EPERM)
    );
    assert_eq!(
        validate(&header(cmd::TRIM, 0, 0, 512), &s),
        Err(NbdErrno::EPERM)
    );
    assert_eq!(
        validate(&header(cmd::WRITE_ZEROES, 0, 0, 512), &s),
        Err(NbdErrno::EPERM)
    );
}

#[test]
fn extended_write_carries_its_payload_with_or_without_payload_len() {
    // qemu omits PAYLOAD_LEN on extended writes; the payload follows anyway.
    let mut s = session();
    s.extended = true;
    let plain = header(cmd::WRITE, cmd_flags::FUA, 0, 512);
    assert_eq!(plain.payload_len(true), 512);
    assert!(validate(&plain, &s).is_ok());
    assert!(validate(&header(cmd::WRITE, cmd_flags::PAYLOAD_LEN, 0, 512), &s).is_ok());
}

#[test]
fn payload_len_on_other_commands_is_einval() {
    let mut s = session();
    s.extended = true;
    assert_eq!(
        validate(
            &header(cmd::BLOCK_STATUS, cmd_flags::PAYLOAD_LEN, 0, 16),
            &s
        ),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn payload_len_in_compact_mode_is_einval() {
    assert_eq!(
        validate(
            &header(cmd::WRITE, cmd_flags::PAYLOAD_LEN, 0, 512),
            &session()
        ),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn flush_with_range_is_einval() {
    assert_eq!(
        validate(&header(cmd::FLUSH, 0, 1, 0), &session()),
        Err(NbdErrno::EINVAL)
    );
    assert_eq!(
        validate(&header(cmd::FLUSH, 0, 0, 0), &session()),
        Ok(Command::Flush)
    );
}

#[test]
fn trim_past_end_is_einval() {
    assert_eq!(
        validate(&header(cmd::TRIM, 0, 0, (1 << 20) + 1), &session()),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn cache_past_end_is_einval_and_rejects_unknown_flags() {
    assert_eq!(
        validate(&header(cmd::CACHE, 0, 1 << 20, 1), &session()),
        Err(NbdErrno::EINVAL)
    );
    assert_eq!(
        validate(&header(cmd::CACHE, cmd_flags::DF, 0, 1), &session()),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn write_zeroes_flags_and_range() {
    let c = validate(
        &header(
            cmd::WRITE_ZEROES,
            cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO | cmd_flags::FUA,
            0,
            4096,
        ),
        &session(),
    )
    .unwrap();
    assert_eq!(
        c,
        Command::WriteZeroes {
            offset: 0,
            len: 4096,
            fua: true,
            no_hole: true,
            fast: true
        }
    );
    assert_eq!(
        validate(&header(cmd::WRITE_ZEROES, 0, 1 << 20, 1), &session()),
        Err(NbdErrno::ENOSPC)
    );
}

#[test]
fn fast_zero_not_advertised_is_einval() {
    let mut s = session();
    s.flags &= !tx_flags::SEND_FAST_ZERO;
    assert_eq!(
        validate(&header(cmd::WRITE_ZEROES, cmd_flags::FAST_ZERO, 0, 1), &s),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn block_status_needs_contexts_and_range() {
    let mut s = session();
    assert!(validate(&header(cmd::BLOCK_STATUS, cmd_flags::REQ_ONE, 0, 512), &s).is_ok());
    assert_eq!(
        validate(&header(cmd::BLOCK_STATUS, 0, 0, 0), &s),
        Err(NbdErrno::EINVAL)
    );
    assert_eq!(
        validate(&header(cmd::BLOCK_STATUS, 0, 1 << 20, 1), &s),
        Err(NbdErrno::EINVAL)
    );
    s.has_contexts = false;
    assert_eq!(
        validate(&header(cmd::BLOCK_STATUS, 0, 0, 512), &s),
        Err(NbdErrno::EINVAL)
    );
}

#[test]
fn zero_length_read_is_valid() {
    assert_eq!(
        validate(&header(cmd::READ, 0, 0, 0), &session()),
        Ok(Command::Read {
            offset: 0,
            len: 0,
            df: false
        })
    );
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Any header round-trips, and whatever validation accepts lies inside
        /// the export (the guarantee backends rely on).
        #[test]
        fn decode_round_trips_and_validated_ranges_are_in_bounds(
            flags in any::<u16>(), kind in 0u16..10, cookie in any::<u64>(),
            offset in any::<u64>(), length in any::<u64>(), extended in any::<bool>(),
            size in 0u64..(1 << 50), ro in any::<bool>(), structured in any::<bool>(),
        ) {
            let length = if extended { length } else { length & 0xffff_ffff };
            let h = RequestHeader { flags, kind, cookie, offset, length };
            let mut v = Vec::new();
            h.encode(extended, &mut v);
            match RequestHeader::decode(&v, extended) {
                Ok(Some(d)) => prop_assert_eq!(d, h),
                Ok(None) => prop_assert!(false, "complete header reported incomplete"),
                Err(FrameError::PayloadTooLarge(n)) => prop_assert!(n > u64::from(MAX_PAYLOAD)),
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
            let mut s = session();
            s.size = size;
            s.extended = extended;
            s.structured = structured || extended;
            if ro { s.flags |= tx_flags::READ_ONLY; }
            if let Ok(cmd) = validate(&h, &s) {
                let range = match cmd {
                    Command::Read { offset, len, .. } | Command::Write { offset, len, .. } => Some((offset, u64::from(len))),
                    Command::Trim { offset, len, .. } | Command::Cache { offset, len }
                    | Command::WriteZeroes { offset, len, .. } | Command::BlockStatus { offset, len, .. } => Some((offset, len)),
                    Command::Disconnect | Command::Flush => None,
                };
                if let Some((o, l)) = range {
                    prop_assert!(o.checked_add(l).is_some_and(|e| e <= size));
                }
                let writes = matches!(cmd, Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. });
                prop_assert!(!(ro && writes), "read-only export accepted {:?}", cmd);
            }
        }
    }
}
