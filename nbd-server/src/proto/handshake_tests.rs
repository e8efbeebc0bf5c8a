//! Byte-level tests of the handshake state machine: one test per rule, one
//! negative test per rejected input.

use super::*;
use crate::proto::consts::{rep, REPLY_MAGIC};

struct OneExport;

fn disk_info() -> ExportInfo {
    ExportInfo {
        name: "disk".into(),
        description: "test disk".into(),
        size: 1 << 20,
        flags: tx_flags::HAS_FLAGS
            | tx_flags::SEND_FLUSH
            | tx_flags::SEND_FUA
            | tx_flags::SEND_WRITE_ZEROES
            | tx_flags::SEND_FAST_ZERO,
        min_block: 1,
        preferred_block: 4096,
        max_payload: 32 << 20,
        base_allocation: true,
        allocation_depth: false,
    }
}

impl ExportCatalog for OneExport {
    type Export = &'static str;
    fn lookup(&self, name: &str) -> Option<(ExportInfo, &'static str)> {
        (name == "disk" || name.is_empty()).then(|| (disk_info(), "handle"))
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("disk".into(), "test disk".into())]
    }
}

fn option(code: u32, data: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&code.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    v
}

fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(name.len() as u32).to_be_bytes());
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// One parsed option reply.
#[derive(Debug)]
struct Reply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

fn replies(mut out: &[u8]) -> Vec<Reply> {
    let mut v = Vec::new();
    while !out.is_empty() {
        assert_eq!(
            u64::from_be_bytes(out[0..8].try_into().unwrap()),
            REPLY_MAGIC
        );
        let option = u32::from_be_bytes(out[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(out[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(out[16..20].try_into().unwrap()) as usize;
        v.push(Reply {
            option,
            kind,
            data: out[20..20 + len].to_vec(),
        });
        out = &out[20 + len..];
    }
    v
}

/// Feed client flags 3 (fixed newstyle + no zeroes) and `bytes`.
fn run(
    hs: &mut Handshake,
    bytes: &[u8],
) -> (
    Result<HandshakeStep<&'static str>, HandshakeError>,
    BytesMut,
) {
    let mut input = BytesMut::new();
    input.extend_from_slice(bytes);
    let mut out = BytesMut::new();
    let r = hs.step(&mut input, &mut out, &OneExport);
    (r, out)
}

fn with_flags(flags: u32, rest: &[u8]) -> Vec<u8> {
    let mut v = flags.to_be_bytes().to_vec();
    v.extend_from_slice(rest);
    v
}

#[test]
fn greeting_is_magic_ihaveopt_and_flags() {
    let mut out = BytesMut::new();
    Handshake::greeting(&mut out);
    assert_eq!(
        &out[..],
        &[
            b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
            b'P', b'T', 0, 3
        ]
    );
}

#[test]
fn partial_client_flags_need_more() {
    let mut hs = Handshake::new();
    let (r, out) = run(&mut hs, &[0, 0]);
    assert!(matches!(r, Ok(HandshakeStep::NeedMore)));
    assert!(out.is_empty());
}

#[test]
fn unknown_client_flag_is_rejected() {
    let mut hs = Handshake::new();
    let (r, _) = run(&mut hs, &[0, 0, 0, 4]);
    assert_eq!(r.unwrap_err(), HandshakeError::BadClientFlags(4));
}

#[test]
fn bad_option_magic_is_rejected() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(opt::GO, &[]));
    bytes[4] ^= 0xff;
    let (r, _) = run(&mut hs, &bytes);
    assert!(matches!(r, Err(HandshakeError::BadOptionMagic(_))));
}

#[test]
fn unknown_option_gets_err_unsup_and_negotiation_continues() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(0x1234, b"hello"));
    bytes.extend(option(opt::LIST, &[]));
    let (r, out) = run(&mut hs, &bytes);
    assert!(matches!(r, Ok(HandshakeStep::NeedMore)));
    let rs = replies(&out);
    assert_eq!(rs[0].option, 0x1234);
    assert_eq!(rs[0].kind, rep::ERR_UNSUP);
    assert_eq!(rs[1].kind, rep::SERVER);
    assert_eq!(rs[2].kind, rep::ACK);
}

#[test]
fn peek_export_is_treated_as_unknown() {
    let mut hs = Handshake::new();
    let (_, out) = run(&mut hs, &with_flags(3, &option(opt::PEEK_EXPORT, &[])));
    assert_eq!(replies(&out)[0].kind, rep::ERR_UNSUP);
}

#[test]
fn oversized_unknown_option_is_skipped_without_buffering() {
    let mut hs = Handshake::new();
    let mut header = option(0x77, &[]);
    header[12..16].copy_from_slice(&(MAX_OPTION_LEN + 10).to_be_bytes());
    let (r, out) = run(&mut hs, &with_flags(3, &header));
    assert!(matches!(r, Ok(HandshakeStep::NeedMore)));
    assert!(out.is_empty());
    // Feed the payload in two pieces; nothing is answered until it is all gone.
    let (_, out) = run(&mut hs, &vec![0u8; MAX_OPTION_LEN as usize]);
    assert!(out.is_empty());
    let mut tail = vec![0u8; 10];
    tail.extend(option(opt::ABORT, &[]));
    let (r, out) = run(&mut hs, &tail);
    assert!(matches!(r, Ok(HandshakeStep::Close)));
    let rs = replies(&out);
    assert_eq!(rs[0].kind, rep::ERR_UNSUP);
    assert_eq!(rs[1].kind, rep::ACK);
}

#[test]
fn oversized_known_option_gets_err_too_big() {
    let mut hs = Handshake::new();
    let mut header = option(opt::GO, &[]);
    header[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    let mut bytes = with_flags(3, &header);
    bytes.extend(vec![0u8; MAX_OPTION_LEN as usize + 1]);
    let (r, out) = run(&mut hs, &bytes);
    assert!(matches!(r, Ok(HandshakeStep::NeedMore)));
    assert_eq!(replies(&out)[0].kind, rep::ERR_TOO_BIG);
}

#[test]
fn oversized_export_name_closes() {
    let mut hs = Handshake::new();
    let mut header = option(opt::EXPORT_NAME, &[]);
    header[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
    let mut bytes = with_flags(3, &header);
    bytes.extend(vec![b'a'; MAX_OPTION_LEN as usize + 1]);
    let (r, _) = run(&mut hs, &bytes);
    assert_eq!(r.unwrap_err(), HandshakeError::InvalidExportName);
}

#[test]
fn partial_option_payload_waits() {
    let mut hs = Handshake::new();
    let full = with_flags(3, &option(opt::GO, &go_payload("disk", &[])));
    let (r, out) = run(&mut hs, &full[..full.len() - 1]);
    assert!(matches!(r, Ok(HandshakeStep::NeedMore)));
    assert!(out.is_empty());
}

#[test]
fn abort_is_acked_and_closes() {
    let mut hs = Handshake::new();
    let (r, out) = run(&mut hs, &with_flags(3, &option(opt::ABORT, b"ignored")));
    assert!(matches!(r, Ok(HandshakeStep::Close)));
    let rs = replies(&out);
    assert_eq!(rs.len(), 1);
    assert_eq!((rs[0].option, rs[0].kind), (opt::ABORT, rep::ACK));
}

#[test]
fn list_with_data_is_one_err_invalid_only() {
    let mut hs = Handshake::new();
    let (_, out) = run(&mut hs, &with_flags(3, &option(opt::LIST, b"xx")));
    let rs = replies(&out);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].kind, rep::ERR_INVALID);
}

#[test]
fn list_names_exports_with_descriptions() {
    let mut hs = Handshake::new();
    let (_, out) = run(&mut hs, &with_flags(3, &option(opt::LIST, &[])));
    let rs = replies(&out);
    assert_eq!(rs[0].kind, rep::SERVER);
    assert_eq!(&rs[0].data[..8], &[0, 0, 0, 4, b'd', b'i', b's', b'k']);
    assert_eq!(&rs[0].data[8..], b"test disk");
}

#[test]
fn starttls_is_refused_by_policy() {
    let mut hs = Handshake::new();
    let (_, out) = run(&mut hs, &with_flags(3, &option(opt::STARTTLS, &[])));
    assert_eq!(replies(&out)[0].kind, rep::ERR_POLICY);
}

#[test]
fn forced_tls_refuses_every_option_but_starttls_and_abort() {
    for code in [
        opt::LIST,
        opt::INFO,
        opt::GO,
        opt::STRUCTURED_REPLY,
        opt::EXTENDED_HEADERS,
        opt::LIST_META_CONTEXT,
        opt::SET_META_CONTEXT,
        999,
    ] {
        let mut hs = Handshake::with_tls(TlsMode::Required);
        let payload = if code == opt::GO || code == opt::INFO {
            go_payload("disk", &[])
        } else {
            Vec::new()
        };
        let (r, out) = run(&mut hs, &with_flags(3, &option(code, &payload)));
        assert!(matches!(r, Ok(HandshakeStep::NeedMore)), "option {code}");
        let rs = replies(&out);
        assert_eq!(rs.len(), 1, "option {code}: nothing leaks before TLS");
        assert_eq!(rs[0].kind, rep::ERR_TLS_REQD, "option {code}");
    }
    // EXPORT_NAME cannot be answered with an error: the connection closes.
    let mut hs = Handshake::with_tls(TlsMode::Required);
    let (r, out) = run(&mut hs, &with_flags(3, &option(opt::EXPORT_NAME, b"disk")));
    assert!(matches!(r, Err(HandshakeError::TlsRequired)));
    assert!(out.is_empty());
    // ABORT still works.
    let mut hs = Handshake::with_tls(TlsMode::Required);
    let (r, _) = run(&mut hs, &with_flags(3, &option(opt::ABORT, &[])));
    assert!(matches!(r, Ok(HandshakeStep::Close)));
}

#[test]
fn starttls_acks_then_haggling_restarts_inside_tls_without_old_state() {
    let mut hs = Handshake::with_tls(TlsMode::Required);
    // Structured replies asked before TLS are refused anyway in forced
    // mode; in offered mode they are granted and must be forgotten.
    let mut hs2 = Handshake::with_tls(TlsMode::Offered);
    for hs in [&mut hs, &mut hs2] {
        let mut bytes = with_flags(3, &option(opt::STRUCTURED_REPLY, &[]));
        bytes.extend(option(opt::STARTTLS, &[]));
        let (r, out) = run(hs, &bytes);
        assert!(matches!(r, Ok(HandshakeStep::StartTls)));
        let rs = replies(&out);
        assert_eq!(rs.last().unwrap().option, opt::STARTTLS);
        assert_eq!(rs.last().unwrap().kind, rep::ACK);
        // Stepping before the TLS handshake is a caller bug, not a hang.
        let (r, _) = run(hs, &[]);
        assert!(matches!(r, Err(HandshakeError::Finished)));
        hs.tls_started();
        assert!(hs.tls_active());
        // A second STARTTLS is invalid; no TLS_REQD ever inside TLS.
        let (r, out) = run(hs, &option(opt::STARTTLS, &[]));
        assert!(matches!(r, Ok(HandshakeStep::NeedMore)));
        assert_eq!(replies(&out)[0].kind, rep::ERR_INVALID);
        let (r, _) = run(hs, &option(opt::GO, &go_payload("disk", &[])));
        let Ok(HandshakeStep::Enter(n)) = r else {
            panic!("GO inside TLS must enter")
        };
        assert!(!n.structured, "structured replies from before TLS kept");
    }
}

#[test]
fn bytes_after_starttls_before_tls_close_the_connection() {
    // The STARTTLS injection attack: plaintext pipelined behind STARTTLS
    // must never be taken as if it came through TLS.
    let mut hs = Handshake::with_tls(TlsMode::Offered);
    let mut bytes = with_flags(3, &option(opt::STARTTLS, &[]));
    bytes.extend(option(opt::GO, &go_payload("disk", &[])));
    let (r, _) = run(&mut hs, &bytes);
    assert!(matches!(r, Err(HandshakeError::DataAfterStartTls)));
}

#[test]
fn starttls_with_data_is_invalid_and_offered_tls_serves_plaintext() {
    let mut hs = Handshake::with_tls(TlsMode::Offered);
    let (r, out) = run(&mut hs, &with_flags(3, &option(opt::STARTTLS, b"x")));
    assert!(matches!(r, Ok(HandshakeStep::NeedMore)));
    assert_eq!(replies(&out)[0].kind, rep::ERR_INVALID);
    let (r, _) = run(&mut hs, &option(opt::GO, &go_payload("disk", &[])));
    assert!(matches!(r, Ok(HandshakeStep::Enter(_))));
    assert!(!hs.tls_active());
}

#[test]
fn go_sends_export_block_size_and_ack_then_enters() {
    let mut hs = Handshake::new();
    let bytes = with_flags(
        3,
        &option(
            opt::GO,
            &go_payload("disk", &[info::NAME, info::DESCRIPTION]),
        ),
    );
    let (r, out) = run(&mut hs, &bytes);
    let n = match r {
        Ok(HandshakeStep::Enter(n)) => n,
        other => panic!("{other:?}"),
    };
    assert!(!n.structured && !n.extended && n.contexts.is_empty());
    assert_eq!(n.export, "handle");
    let rs = replies(&out);
    let kinds: Vec<u32> = rs.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        vec![rep::INFO, rep::INFO, rep::INFO, rep::INFO, rep::ACK]
    );
    // INFO_EXPORT: no DF without structured replies.
    assert_eq!(&rs[0].data[..2], &[0, 0]);
    let flags = u16::from_be_bytes(rs[0].data[10..12].try_into().unwrap());
    assert_eq!(flags & tx_flags::SEND_DF, 0);
    assert_eq!(&rs[1].data, &[0, 1, b'd', b'i', b's', b'k']);
    assert_eq!(&rs[3].data, &[0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 2, 0, 0, 0]);
}

#[test]
fn go_leaves_following_bytes_for_transmission() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(opt::GO, &go_payload("disk", &[])));
    bytes.extend_from_slice(&[0x25, 0x60, 0x95, 0x13]);
    let mut input = BytesMut::from(&bytes[..]);
    let mut out = BytesMut::new();
    let r = hs.step(&mut input, &mut out, &OneExport).unwrap();
    assert!(matches!(r, HandshakeStep::Enter(_)));
    assert_eq!(&input[..], &[0x25, 0x60, 0x95, 0x13]);
    assert_eq!(
        hs.step(&mut input, &mut out, &OneExport).unwrap_err(),
        HandshakeError::Finished
    );
}

#[test]
fn info_does_not_enter_transmission() {
    let mut hs = Handshake::new();
    let (r, out) = run(
        &mut hs,
        &with_flags(3, &option(opt::INFO, &go_payload("disk", &[]))),
    );
    assert!(matches!(r, Ok(HandshakeStep::NeedMore)));
    assert_eq!(replies(&out).last().unwrap().kind, rep::ACK);
}

#[test]
fn go_for_unknown_export_is_err_unknown_and_continues() {
    let mut hs = Handshake::new();
    let (r, out) = run(
        &mut hs,
        &with_flags(3, &option(opt::GO, &go_payload("nope", &[]))),
    );
    assert!(matches!(r, Ok(HandshakeStep::NeedMore)));
    let rs = replies(&out);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].kind, rep::ERR_UNKNOWN);
}

#[test]
fn go_with_malformed_payload_is_err_invalid() {
    let mut hs = Handshake::new();
    let (_, out) = run(
        &mut hs,
        &with_flags(3, &option(opt::GO, &[0, 0, 0, 50, 0, 0])),
    );
    assert_eq!(replies(&out)[0].kind, rep::ERR_INVALID);
}

#[test]
fn default_export_name_resolves() {
    let mut hs = Handshake::new();
    let (r, _) = run(
        &mut hs,
        &with_flags(3, &option(opt::GO, &go_payload("", &[]))),
    );
    assert!(matches!(r, Ok(HandshakeStep::Enter(_))));
}

#[test]
fn export_name_with_no_zeroes_sends_ten_bytes() {
    let mut hs = Handshake::new();
    let (r, out) = run(&mut hs, &with_flags(3, &option(opt::EXPORT_NAME, b"disk")));
    assert!(matches!(r, Ok(HandshakeStep::Enter(_))));
    assert_eq!(out.len(), 10);
    assert_eq!(&out[..8], &(1u64 << 20).to_be_bytes());
}

#[test]
fn export_name_without_no_zeroes_pads_124_bytes() {
    let mut hs = Handshake::new();
    let (_, out) = run(&mut hs, &with_flags(1, &option(opt::EXPORT_NAME, b"disk")));
    assert_eq!(out.len(), 10 + 124);
    assert!(out[10..].iter().all(|b| *b == 0));
}

#[test]
fn export_name_for_unknown_export_closes() {
    let mut hs = Handshake::new();
    let (r, _) = run(&mut hs, &with_flags(3, &option(opt::EXPORT_NAME, b"nope")));
    assert_eq!(r.unwrap_err(), HandshakeError::UnknownExport("nope".into()));
}

#[test]
fn export_name_after_extended_headers_closes() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(opt::EXTENDED_HEADERS, &[]));
    bytes.extend(option(opt::EXPORT_NAME, b"disk"));
    let (r, _) = run(&mut hs, &bytes);
    assert_eq!(
        r.unwrap_err(),
        HandshakeError::ExportNameAfterExtendedHeaders
    );
}

#[test]
fn structured_reply_adds_df_flag() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(opt::STRUCTURED_REPLY, &[]));
    bytes.extend(option(opt::GO, &go_payload("disk", &[])));
    let (r, out) = run(&mut hs, &bytes);
    let n = match r {
        Ok(HandshakeStep::Enter(n)) => n,
        other => panic!("{other:?}"),
    };
    assert!(n.structured);
    assert_ne!(n.flags & tx_flags::SEND_DF, 0);
    assert_eq!(replies(&out)[0].kind, rep::ACK);
}

#[test]
fn structured_reply_with_data_is_invalid() {
    let mut hs = Handshake::new();
    let (_, out) = run(
        &mut hs,
        &with_flags(3, &option(opt::STRUCTURED_REPLY, b"x")),
    );
    assert_eq!(replies(&out)[0].kind, rep::ERR_INVALID);
}

#[test]
fn structured_reply_after_extended_headers_is_refused() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(opt::EXTENDED_HEADERS, &[]));
    bytes.extend(option(opt::STRUCTURED_REPLY, &[]));
    let (_, out) = run(&mut hs, &bytes);
    let rs = replies(&out);
    assert_eq!(rs[0].kind, rep::ACK);
    assert_eq!(rs[1].kind, rep::ERR_EXT_HEADER_REQD);
}

#[test]
fn extended_headers_with_data_is_invalid() {
    let mut hs = Handshake::new();
    let (_, out) = run(
        &mut hs,
        &with_flags(3, &option(opt::EXTENDED_HEADERS, b"x")),
    );
    assert_eq!(replies(&out)[0].kind, rep::ERR_INVALID);
}

#[test]
fn extended_headers_imply_structured_on_go() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(opt::EXTENDED_HEADERS, &[]));
    bytes.extend(option(opt::GO, &go_payload("disk", &[])));
    let (r, _) = run(&mut hs, &bytes);
    match r {
        Ok(HandshakeStep::Enter(n)) => assert!(n.extended && n.structured),
        other => panic!("{other:?}"),
    }
}

#[test]
fn meta_context_before_structured_replies_is_invalid() {
    let mut hs = Handshake::new();
    let p = meta_payload("disk", &["base:allocation"]);
    let (_, out) = run(&mut hs, &with_flags(3, &option(opt::SET_META_CONTEXT, &p)));
    assert_eq!(replies(&out)[0].kind, rep::ERR_INVALID);
}

#[test]
fn set_meta_context_selects_base_allocation_for_that_export() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(opt::STRUCTURED_REPLY, &[]));
    let p = meta_payload(
        "disk",
        &[
            "base:allocation",
            "x-unknown:thing",
            "qemu:allocation-depth",
        ],
    );
    bytes.extend(option(opt::SET_META_CONTEXT, &p));
    bytes.extend(option(opt::GO, &go_payload("disk", &[])));
    let (r, out) = run(&mut hs, &bytes);
    let rs = replies(&out);
    assert_eq!(rs[1].kind, rep::META_CONTEXT);
    assert_eq!(&rs[1].data[..4], &1u32.to_be_bytes());
    assert_eq!(&rs[1].data[4..], b"base:allocation");
    // allocation-depth is not offered by this export; unknown namespaces ignored.
    assert_eq!(rs[2].kind, rep::ACK);
    match r {
        Ok(HandshakeStep::Enter(n)) => assert_eq!(n.contexts, vec![MetaContext::BaseAllocation]),
        other => panic!("{other:?}"),
    }
}

#[test]
fn set_meta_context_for_another_export_name_does_not_apply() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(opt::STRUCTURED_REPLY, &[]));
    bytes.extend(option(
        opt::SET_META_CONTEXT,
        &meta_payload("", &["base:allocation"]),
    ));
    bytes.extend(option(opt::GO, &go_payload("disk", &[])));
    let (r, _) = run(&mut hs, &bytes);
    match r {
        Ok(HandshakeStep::Enter(n)) => assert!(n.contexts.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn set_meta_context_namespace_wildcard_selects_nothing() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(opt::STRUCTURED_REPLY, &[]));
    bytes.extend(option(
        opt::SET_META_CONTEXT,
        &meta_payload("disk", &["base:"]),
    ));
    let (_, out) = run(&mut hs, &bytes);
    let rs = replies(&out);
    assert_eq!(rs.len(), 2);
    assert_eq!(rs[1].kind, rep::ACK);
}

#[test]
fn list_meta_context_wildcard_and_empty_list_everything_with_id_zero() {
    for queries in [&[][..], &["base:"][..]] {
        let mut hs = Handshake::new();
        let mut bytes = with_flags(3, &option(opt::STRUCTURED_REPLY, &[]));
        bytes.extend(option(
            opt::LIST_META_CONTEXT,
            &meta_payload("disk", queries),
        ));
        let (_, out) = run(&mut hs, &bytes);
        let rs = replies(&out);
        assert_eq!(rs[1].kind, rep::META_CONTEXT);
        assert_eq!(&rs[1].data[..4], &[0, 0, 0, 0]);
        assert_eq!(rs[2].kind, rep::ACK);
    }
}

#[test]
fn meta_context_for_unknown_export_is_err_unknown() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(opt::STRUCTURED_REPLY, &[]));
    bytes.extend(option(opt::LIST_META_CONTEXT, &meta_payload("nope", &[])));
    let (_, out) = run(&mut hs, &bytes);
    assert_eq!(replies(&out)[1].kind, rep::ERR_UNKNOWN);
}

#[test]
fn failed_set_meta_context_clears_the_selection() {
    let mut hs = Handshake::new();
    let mut bytes = with_flags(3, &option(opt::STRUCTURED_REPLY, &[]));
    bytes.extend(option(
        opt::SET_META_CONTEXT,
        &meta_payload("disk", &["base:allocation"]),
    ));
    bytes.extend(option(opt::SET_META_CONTEXT, &[1, 2, 3]));
    bytes.extend(option(opt::GO, &go_payload("disk", &[])));
    let (r, _) = run(&mut hs, &bytes);
    match r {
        Ok(HandshakeStep::Enter(n)) => assert!(n.contexts.is_empty()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn fast_zero_is_dropped_without_write_zeroes() {
    let mut info = disk_info();
    info.flags &= !tx_flags::SEND_WRITE_ZEROES;
    assert_eq!(info.negotiated_flags(false) & tx_flags::SEND_FAST_ZERO, 0);
}

mod forced_tls_props {
    use super::*;
    use proptest::prelude::*;

    fn any_option() -> impl Strategy<Value = (u32, Vec<u8>)> {
        (
            prop_oneof![
                Just(opt::EXPORT_NAME),
                Just(opt::LIST),
                Just(opt::INFO),
                Just(opt::GO),
                Just(opt::STRUCTURED_REPLY),
                Just(opt::LIST_META_CONTEXT),
                Just(opt::SET_META_CONTEXT),
                Just(opt::EXTENDED_HEADERS),
                Just(opt::STARTTLS),
                0u32..64,
            ],
            prop_oneof![
                Just(go_payload("disk", &[])),
                Just(meta_payload("disk", &["base:allocation"])),
                proptest::collection::vec(any::<u8>(), 0..40),
            ],
        )
    }

    proptest! {
        /// Whatever a client sends before TLS, a FORCEDTLS server never
        /// enters transmission and never answers with anything but
        /// TLS_REQD (or the STARTTLS/ABORT answers, or a size refusal).
        #[test]
        fn nothing_but_starttls_gets_through(opts in proptest::collection::vec(any_option(), 1..12)) {
            let mut hs = Handshake::with_tls(TlsMode::Required);
            let mut bytes = 3u32.to_be_bytes().to_vec();
            for (code, data) in &opts {
                bytes.extend(option(*code, data));
            }
            let (r, out) = run(&mut hs, &bytes);
            match r {
                Ok(HandshakeStep::Enter(_)) => prop_assert!(false, "entered transmission before TLS"),
                Ok(HandshakeStep::StartTls) | Ok(HandshakeStep::NeedMore) | Ok(HandshakeStep::Close) => {}
                Err(HandshakeError::TlsRequired) | Err(HandshakeError::DataAfterStartTls) => {}
                Err(e) => prop_assert!(false, "unexpected {e:?}"),
            }
            for rep in replies(&out) {
                let ok = rep.kind == rep::ERR_TLS_REQD
                    || (rep.option == opt::STARTTLS && matches!(rep.kind, rep::ACK | rep::ERR_INVALID))
                    || (rep.option == opt::ABORT && rep.kind == rep::ACK);
                prop_assert!(ok, "option {} got reply {:#x} before TLS", rep.option, rep.kind);
            }
        }
    }
}
