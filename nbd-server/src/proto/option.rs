//! Parsing of option payloads and encoding of option replies.
//!
//! Every parser works on a complete, already length-bounded payload (the
//! handshake never buffers more than [`MAX_OPTION_LEN`](super::consts::MAX_OPTION_LEN)
//! bytes) and checks each inner length against what is left before reading.

use bytes::{BufMut, BytesMut};

use super::consts::{info, rep, MAX_META_QUERIES, MAX_STRING_LEN, REPLY_MAGIC};

/// Why an option payload was rejected; each maps to `NBD_REP_ERR_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionParseError {
    /// A length field points past the end of the payload.
    #[error("option payload truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the field needs.
        need: usize,
        /// Bytes left.
        have: usize,
    },
    /// Bytes left over after the last field.
    #[error("option payload has {0} trailing bytes")]
    Trailing(usize),
    /// A string is longer than the spec's 4096-byte limit.
    #[error("string of {0} bytes exceeds the 4096-byte limit")]
    StringTooLong(usize),
    /// A string is not UTF-8.
    #[error("string is not valid UTF-8")]
    NotUtf8,
    /// More meta-context queries than we accept.
    #[error("{0} meta-context queries exceed the limit of {MAX_META_QUERIES}")]
    TooManyQueries(u32),
    /// A meta-context query lacks the namespace colon.
    #[error("meta-context query {0:?} has no namespace")]
    QueryWithoutNamespace(String),
}

/// A bounds-checked reader over an option payload.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], OptionParseError> {
        if n > self.buf.len() {
            return Err(OptionParseError::Truncated {
                need: n,
                have: self.buf.len(),
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn u16(&mut self) -> Result<u16, OptionParseError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, OptionParseError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A string prefixed by a 32-bit length.
    fn string32(&mut self) -> Result<String, OptionParseError> {
        let len = self.u32()? as usize;
        if len > MAX_STRING_LEN {
            return Err(OptionParseError::StringTooLong(len));
        }
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| OptionParseError::NotUtf8)
    }

    fn finish(self) -> Result<(), OptionParseError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(OptionParseError::Trailing(self.buf.len()))
        }
    }
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name ("" = default export).
    pub name: String,
    /// Information items asked for, in order.
    pub requests: Vec<u16>,
}

/// Parse an `INFO`/`GO` payload.
pub fn parse_info_request(payload: &[u8]) -> Result<InfoRequest, OptionParseError> {
    let mut r = Reader { buf: payload };
    let name = r.string32()?;
    let count = r.u16()?;
    let mut requests = Vec::with_capacity(usize::from(count).min(r.buf.len() / 2));
    for _ in 0..count {
        requests.push(r.u16()?);
    }
    r.finish()?;
    Ok(InfoRequest { name, requests })
}

/// Parse the payload of `NBD_OPT_EXPORT_NAME`: the whole payload is the name.
pub fn parse_export_name(payload: &[u8]) -> Result<String, OptionParseError> {
    if payload.len() > MAX_STRING_LEN {
        return Err(OptionParseError::StringTooLong(payload.len()));
    }
    std::str::from_utf8(payload)
        .map(str::to_owned)
        .map_err(|_| OptionParseError::NotUtf8)
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    /// Export the contexts are for.
    pub export: String,
    /// Queries, each `namespace:leaf`.
    pub queries: Vec<String>,
}

/// Parse a meta-context option payload.
pub fn parse_meta_context_request(payload: &[u8]) -> Result<MetaContextRequest, OptionParseError> {
    let mut r = Reader { buf: payload };
    let export = r.string32()?;
    let count = r.u32()?;
    if count > MAX_META_QUERIES {
        return Err(OptionParseError::TooManyQueries(count));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let q = r.string32()?;
        if !q.contains(':') {
            return Err(OptionParseError::QueryWithoutNamespace(q));
        }
        queries.push(q);
    }
    r.finish()?;
    Ok(MetaContextRequest { export, queries })
}

/// Append an option reply header and payload.
pub fn put_reply(out: &mut BytesMut, option: u32, reply_type: u32, payload: &[u8]) {
    // Payloads we build are bounded (names ≤ 4096 bytes, fixed-size infos);
    // saturate rather than wrap if a caller ever breaks that.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.reserve(20 + payload.len());
    out.put_u64(REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(len);
    out.put_slice(payload);
}

/// Append an error reply with a human-readable message (trimmed to the
/// spec's string limit).
pub fn put_error(out: &mut BytesMut, option: u32, reply_type: u32, message: &str) {
    debug_assert!(reply_type & (1 << 31) != 0, "not an error reply type");
    let msg = truncate_utf8(message, MAX_STRING_LEN);
    put_reply(out, option, reply_type, msg.as_bytes());
}

/// `NBD_REP_SERVER` for one export of a LIST reply.
pub fn put_server(out: &mut BytesMut, name: &str, description: &str) {
    let mut p = BytesMut::with_capacity(4 + name.len() + description.len());
    p.put_u32(len32(name));
    p.put_slice(name.as_bytes());
    p.put_slice(truncate_utf8(description, MAX_STRING_LEN).as_bytes());
    put_reply(out, super::consts::opt::LIST, rep::SERVER, &p);
}

/// `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn put_info_export(out: &mut BytesMut, option: u32, size: u64, flags: u16) {
    let mut p = [0u8; 12];
    p[0..2].copy_from_slice(&info::EXPORT.to_be_bytes());
    p[2..10].copy_from_slice(&size.to_be_bytes());
    p[10..12].copy_from_slice(&flags.to_be_bytes());
    put_reply(out, option, rep::INFO, &p);
}

/// `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME` or `NBD_INFO_DESCRIPTION`).
pub fn put_info_string(out: &mut BytesMut, option: u32, info_type: u16, value: &str) {
    let value = truncate_utf8(value, MAX_STRING_LEN);
    let mut p = BytesMut::with_capacity(2 + value.len());
    p.put_u16(info_type);
    p.put_slice(value.as_bytes());
    put_reply(out, option, rep::INFO, &p);
}

/// `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn put_info_block_size(out: &mut BytesMut, option: u32, min: u32, preferred: u32, max: u32) {
    let mut p = [0u8; 14];
    p[0..2].copy_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    p[2..6].copy_from_slice(&min.to_be_bytes());
    p[6..10].copy_from_slice(&preferred.to_be_bytes());
    p[10..14].copy_from_slice(&max.to_be_bytes());
    put_reply(out, option, rep::INFO, &p);
}

/// `NBD_REP_META_CONTEXT`.
pub fn put_meta_context(out: &mut BytesMut, option: u32, id: u32, name: &str) {
    let mut p = BytesMut::with_capacity(4 + name.len());
    p.put_u32(id);
    p.put_slice(name.as_bytes());
    put_reply(out, option, rep::META_CONTEXT, &p);
}

fn len32(s: &str) -> u32 {
    u32::try_from(s.len()).unwrap_or(u32::MAX)
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a
/// character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn info_request_parses_name_and_items() {
        let p = [0, 0, 0, 3, b'a', b'b', b'c', 0, 2, 0, 3, 0, 1];
        let r = parse_info_request(&p).unwrap();
        assert_eq!(r.name, "abc");
        assert_eq!(r.requests, vec![3, 1]);
    }

    #[test]
    fn info_request_with_name_longer_than_payload_is_rejected() {
        let p = [0, 0, 0, 9, b'a', 0, 0];
        assert!(matches!(
            parse_info_request(&p),
            Err(OptionParseError::Truncated { .. })
        ));
    }

    #[test]
    fn info_request_with_missing_item_is_rejected() {
        let p = [0, 0, 0, 0, 0, 2, 0, 3];
        assert!(matches!(
            parse_info_request(&p),
            Err(OptionParseError::Truncated { .. })
        ));
    }

    #[test]
    fn info_request_with_trailing_bytes_is_rejected() {
        let p = [0, 0, 0, 0, 0, 0, 9];
        assert_eq!(parse_info_request(&p), Err(OptionParseError::Trailing(1)));
    }

    #[test]
    fn info_request_with_huge_name_length_is_rejected_without_allocating() {
        let p = [0xff, 0xff, 0xff, 0xff, 0, 0];
        assert_eq!(
            parse_info_request(&p),
            Err(OptionParseError::StringTooLong(u32::MAX as usize))
        );
    }

    #[test]
    fn info_request_with_invalid_utf8_name_is_rejected() {
        let p = [0, 0, 0, 1, 0xff, 0, 0];
        assert_eq!(parse_info_request(&p), Err(OptionParseError::NotUtf8));
    }

    #[test]
    fn info_request_too_short_for_count_is_rejected() {
        assert!(parse_info_request(&[0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn meta_context_request_parses() {
        let mut p = vec![0, 0, 0, 1, b'x', 0, 0, 0, 1, 0, 0, 0, 15];
        p.extend_from_slice(b"base:allocation");
        let r = parse_meta_context_request(&p).unwrap();
        assert_eq!(r.export, "x");
        assert_eq!(r.queries, vec!["base:allocation".to_string()]);
    }

    #[test]
    fn meta_context_query_without_colon_is_rejected() {
        let mut p = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 4];
        p.extend_from_slice(b"base");
        assert!(matches!(
            parse_meta_context_request(&p),
            Err(OptionParseError::QueryWithoutNamespace(_))
        ));
    }

    #[test]
    fn meta_context_request_with_huge_query_count_is_rejected() {
        let p = [0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            parse_meta_context_request(&p),
            Err(OptionParseError::TooManyQueries(u32::MAX))
        );
    }

    #[test]
    fn meta_context_request_with_truncated_query_is_rejected() {
        let p = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 20, b'a', b':'];
        assert!(matches!(
            parse_meta_context_request(&p),
            Err(OptionParseError::Truncated { .. })
        ));
    }

    #[test]
    fn export_name_must_be_utf8_and_bounded() {
        assert_eq!(parse_export_name(b"disk0").unwrap(), "disk0");
        assert_eq!(parse_export_name(&[0xc3]), Err(OptionParseError::NotUtf8));
        assert!(parse_export_name(&vec![b'a'; 4097]).is_err());
    }

    #[test]
    fn reply_header_layout() {
        let mut out = BytesMut::new();
        put_reply(&mut out, 7, rep::ACK, &[]);
        assert_eq!(
            &out[..],
            &[0, 3, 0xe8, 0x89, 0x04, 0x55, 0x65, 0xa9, 0, 0, 0, 7, 0, 0, 0, 1, 0, 0, 0, 0]
        );
    }

    #[test]
    fn info_export_layout() {
        let mut out = BytesMut::new();
        put_info_export(&mut out, 7, 0x1000, 0x0d6d);
        assert_eq!(&out[16..20], &[0, 0, 0, 12]);
        assert_eq!(&out[20..], &[0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0x0d, 0x6d]);
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate_utf8("héllo", 2), "h");
        assert_eq!(truncate_utf8("abc", 10), "abc");
    }
}
