//! Handshake messages, client side, without I/O: the greeting, option
//! requests, option reply headers and the payloads of `NBD_REP_INFO` and
//! `NBD_REP_META_CONTEXT`.

use nbd_server::proto::consts::{
    handshake_flags, info, GREETING_LEN, IHAVEOPT, MAX_OPTION_LEN, MAX_STRING_LEN, NBDMAGIC,
    OPTION_HEADER_LEN, REPLY_MAGIC,
};

use crate::error::HandshakeError;

/// Length of an option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}
fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Check the greeting; returns the server's handshake flags.
pub fn parse_greeting(g: &[u8; GREETING_LEN]) -> Result<u16, HandshakeError> {
    if be64(&g[0..8]) != NBDMAGIC || be64(&g[8..16]) != IHAVEOPT {
        return Err(HandshakeError::BadGreeting);
    }
    let flags = be16(&g[16..18]);
    if flags & handshake_flags::FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixedNewstyle);
    }
    Ok(flags)
}

/// An option request: header and payload.
pub fn encode_option(option: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(OPTION_HEADER_LEN + payload.len());
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    // Payloads we build are names ≤ 4096 bytes plus small fixed fields.
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn check_name(name: &str) -> Result<(), HandshakeError> {
    if name.len() > MAX_STRING_LEN {
        return Err(HandshakeError::NameTooLong(name.len()));
    }
    Ok(())
}

/// Payload of `NBD_OPT_GO` / `NBD_OPT_INFO`.
pub fn go_payload(export: &str, infos: &[u16]) -> Result<Vec<u8>, HandshakeError> {
    check_name(export)?;
    let mut p = Vec::with_capacity(6 + export.len() + 2 * infos.len());
    p.extend_from_slice(&(export.len() as u32).to_be_bytes());
    p.extend_from_slice(export.as_bytes());
    p.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        p.extend_from_slice(&i.to_be_bytes());
    }
    Ok(p)
}

/// Payload of `NBD_OPT_SET_META_CONTEXT` / `NBD_OPT_LIST_META_CONTEXT`.
pub fn meta_context_payload(export: &str, queries: &[&str]) -> Result<Vec<u8>, HandshakeError> {
    check_name(export)?;
    let mut p = Vec::new();
    p.extend_from_slice(&(export.len() as u32).to_be_bytes());
    p.extend_from_slice(export.as_bytes());
    p.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        check_name(q)?;
        p.extend_from_slice(&(q.len() as u32).to_be_bytes());
        p.extend_from_slice(q.as_bytes());
    }
    Ok(p)
}

/// A validated option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// `NBD_REP_*`.
    pub reply: u32,
    /// Payload length (≤ [`MAX_OPTION_LEN`]).
    pub len: u32,
}

/// Parse an option reply header answering `option`.
pub fn parse_reply_header(
    h: &[u8; OPTION_REPLY_HEADER_LEN],
    option: u32,
) -> Result<OptionReplyHeader, HandshakeError> {
    let magic = be64(&h[0..8]);
    if magic != REPLY_MAGIC {
        return Err(HandshakeError::BadReplyMagic(magic));
    }
    let got = be32(&h[8..12]);
    if got != option {
        return Err(HandshakeError::WrongOption {
            expected: option,
            got,
        });
    }
    let len = be32(&h[16..20]);
    if len > MAX_OPTION_LEN {
        return Err(HandshakeError::ReplyTooLarge(len));
    }
    Ok(OptionReplyHeader {
        reply: be32(&h[12..16]),
        len,
    })
}

/// Whether a reply type is an error (`NBD_REP_ERR_*`).
pub fn is_error(reply: u32) -> bool {
    reply & (1 << 31) != 0
}

/// One `NBD_REP_INFO` item we use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    /// `NBD_INFO_EXPORT`.
    Export {
        /// Size in bytes.
        size: u64,
        /// Transmission flags.
        flags: u16,
    },
    /// `NBD_INFO_BLOCK_SIZE`.
    BlockSize {
        /// Minimum.
        min: u32,
        /// Preferred.
        preferred: u32,
        /// Maximum payload.
        max: u32,
    },
    /// Anything else (name, description, future types): ignored.
    Other,
}

/// Parse an `NBD_REP_INFO` payload.
pub fn parse_info(p: &[u8]) -> Result<Info, HandshakeError> {
    if p.len() < 2 {
        return Err(HandshakeError::Malformed("NBD_REP_INFO"));
    }
    match be16(&p[0..2]) {
        info::EXPORT if p.len() == 12 => Ok(Info::Export {
            size: be64(&p[2..10]),
            flags: be16(&p[10..12]),
        }),
        info::BLOCK_SIZE if p.len() == 14 => {
            let (min, preferred, max) = (be32(&p[2..6]), be32(&p[6..10]), be32(&p[10..14]));
            let pow2 = |v: u32| v.is_power_of_two();
            if !pow2(min) || min > 65536 || !pow2(preferred) || preferred < min || max < min {
                return Err(HandshakeError::BadBlockSizes {
                    min,
                    preferred,
                    max,
                });
            }
            Ok(Info::BlockSize {
                min,
                preferred,
                max,
            })
        }
        info::EXPORT | info::BLOCK_SIZE => Err(HandshakeError::Malformed("NBD_REP_INFO")),
        _ => Ok(Info::Other),
    }
}

/// Parse an `NBD_REP_META_CONTEXT` payload: id and name.
pub fn parse_meta_context(p: &[u8]) -> Result<(u32, String), HandshakeError> {
    if p.len() < 4 || p.len() > 4 + MAX_STRING_LEN {
        return Err(HandshakeError::Malformed("NBD_REP_META_CONTEXT"));
    }
    let name = std::str::from_utf8(&p[4..])
        .map_err(|_| HandshakeError::Malformed("NBD_REP_META_CONTEXT"))?;
    Ok((be32(&p[0..4]), name.to_owned()))
}

/// Parse the reply to `NBD_OPT_EXPORT_NAME`: size and flags (any padding
/// after them is the caller's to skip).
pub fn parse_export_name_reply(p: &[u8; 10]) -> (u64, u16) {
    (be64(&p[0..8]), be16(&p[8..10]))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use bytes::BytesMut;
    use nbd_server::proto::consts::{opt, rep};
    use nbd_server::proto::option as server;

    #[test]
    fn our_requests_parse_with_the_servers_parsers() {
        let p = go_payload("disk0", &[info::BLOCK_SIZE]).unwrap();
        let r = server::parse_info_request(&p).unwrap();
        assert_eq!(r.name, "disk0");
        assert_eq!(r.requests, vec![info::BLOCK_SIZE]);
        let p = meta_context_payload("disk0", &["base:allocation"]).unwrap();
        let r = server::parse_meta_context_request(&p).unwrap();
        assert_eq!(r.queries, vec!["base:allocation".to_string()]);
        assert!(go_payload(&"x".repeat(4097), &[]).is_err());
    }

    #[test]
    fn the_servers_replies_parse() {
        let mut out = BytesMut::new();
        server::put_info_export(&mut out, opt::GO, 1 << 30, 0x0d6d);
        let h: [u8; 20] = out[..20].try_into().unwrap();
        let hdr = parse_reply_header(&h, opt::GO).unwrap();
        assert_eq!(hdr.reply, rep::INFO);
        assert_eq!(
            parse_info(&out[20..]).unwrap(),
            Info::Export {
                size: 1 << 30,
                flags: 0x0d6d
            }
        );
        assert!(matches!(
            parse_reply_header(&h, opt::INFO),
            Err(HandshakeError::WrongOption { .. })
        ));
        let mut out = BytesMut::new();
        server::put_info_block_size(&mut out, opt::GO, 1, 4096, 32 << 20);
        assert_eq!(
            parse_info(&out[20..]).unwrap(),
            Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 32 << 20
            }
        );
        let mut out = BytesMut::new();
        server::put_meta_context(&mut out, opt::SET_META_CONTEXT, 5, "base:allocation");
        assert_eq!(
            parse_meta_context(&out[20..]).unwrap(),
            (5, "base:allocation".to_string())
        );
    }

    #[test]
    fn bad_headers_and_sizes_are_refused() {
        let mut h = [0u8; 20];
        assert!(matches!(
            parse_reply_header(&h, 7),
            Err(HandshakeError::BadReplyMagic(0))
        ));
        h[..8].copy_from_slice(&REPLY_MAGIC.to_be_bytes());
        h[8..12].copy_from_slice(&7u32.to_be_bytes());
        h[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(
            parse_reply_header(&h, 7),
            Err(HandshakeError::ReplyTooLarge(u32::MAX))
        );
        let mut p = vec![0, 3];
        p.extend_from_slice(&3u32.to_be_bytes());
        p.extend_from_slice(&4096u32.to_be_bytes());
        p.extend_from_slice(&0u32.to_be_bytes());
        assert!(parse_info(&p).is_err());
        assert!(parse_info(&[0, 0, 1]).is_err());
        let mut g = [0u8; 18];
        assert_eq!(parse_greeting(&g), Err(HandshakeError::BadGreeting));
        g[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
        g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
        assert_eq!(parse_greeting(&g), Err(HandshakeError::NotFixedNewstyle));
    }
}
