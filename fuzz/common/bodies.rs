//! Fuzz target bodies, shared by the cargo-fuzz targets (`fuzz/fuzz_targets/`)
//! and the corpus replay test (`tests/tests/fuzz_corpus.rs`).
//!
//! Plain functions over `&[u8]` that depend only on the workspace crates,
//! tokio, bytes and tempfile, so ordinary `cargo test` can run them. Each one
//! checks invariants, not only the absence of panics: a violated invariant
//! panics, which libFuzzer reports as a crash.
#![allow(dead_code)]

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use nbd_server::proto::consts::{
    client_flags, cmd, cmd_flags, info, opt, rep, tx_flags, IHAVEOPT, MAX_OPTION_LEN, MAX_PAYLOAD,
    REPLY_MAGIC,
};
use nbd_server::proto::{
    validate, Command, ExportCatalog, ExportInfo, FrameError, Handshake, HandshakeError,
    HandshakeStep, MetaContext, RequestHeader, Session,
};
use nbd_server::{BlockBackend, Export, MemoryBackend, Server, ServerConfig, ZeroFlags};
use qcow_backend::header::{check_l1, check_reftable, parse_header, HeaderInfo, MAX_L1_BYTES};
use qcow_backend::{OpenOptions, QcowBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

// ---------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------

/// Export size used by the handshake catalog and the session server.
const DISK_SIZE: u64 = 1 << 20;

/// Wall-clock limit for one session or image run; exceeding it is a hang.
const RUN_LIMIT: Duration = Duration::from_secs(5);

thread_local! {
    /// One current-thread runtime per thread, reused across inputs (building
    /// one per input would dominate the cost of small inputs).
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RUNTIME.with(|cell| {
        let mut slot = cell.borrow_mut();
        let rt = slot.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build runtime")
        });
        rt.block_on(f)
    })
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// Reads integers from fuzz bytes, yielding zeroes once they run out.
struct IntReader<'a> {
    data: &'a [u8],
}

impl IntReader<'_> {
    fn u8(&mut self) -> u8 {
        match self.data.split_first() {
            Some((b, rest)) => {
                self.data = rest;
                *b
            }
            None => 0,
        }
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    fn u64(&mut self) -> u64 {
        let mut v = 0u64;
        for _ in 0..8 {
            v = (v << 8) | u64::from(self.u8());
        }
        v
    }
}

// ---------------------------------------------------------------------------
// nbd_handshake
// ---------------------------------------------------------------------------

/// One export "disk", also reachable as the default export "".
struct TestCatalog;

fn disk_info() -> ExportInfo {
    ExportInfo {
        name: "disk".into(),
        description: "fuzz disk".into(),
        size: DISK_SIZE,
        flags: tx_flags::HAS_FLAGS
            | tx_flags::SEND_FLUSH
            | tx_flags::SEND_FUA
            | tx_flags::SEND_TRIM
            | tx_flags::SEND_WRITE_ZEROES
            | tx_flags::SEND_FAST_ZERO
            | tx_flags::SEND_CACHE,
        min_block: 1,
        preferred_block: 4096,
        max_payload: MAX_PAYLOAD,
        base_allocation: true,
        allocation_depth: true,
    }
}

impl ExportCatalog for TestCatalog {
    type Export = ();
    fn lookup(&self, name: &str) -> Option<(ExportInfo, ())> {
        (name == "disk" || name.is_empty()).then(|| (disk_info(), ()))
    }
    fn list(&self) -> Vec<(String, String)> {
        vec![("disk".into(), "fuzz disk".into())]
    }
}

/// Chunk sizes for feeding the stream: the first input byte picks a maximum
/// chunk size and seeds a small PRNG, so short reads of every shape happen.
/// Byte 0 feeds everything at once.
struct Chunker {
    state: u32,
    max: usize,
}

impl Chunker {
    fn new(seed: u8) -> Self {
        const MAX: [usize; 8] = [1, 2, 5, 16, 64, 512, 4096, 1 << 17];
        Chunker {
            state: u32::from(seed).wrapping_mul(0x9E37_79B9) | 1,
            max: if seed == 0 {
                usize::MAX
            } else {
                MAX[usize::from(seed & 7)]
            },
        }
    }

    fn next(&mut self, left: usize) -> usize {
        if self.max == usize::MAX {
            return left;
        }
        // xorshift32
        self.state ^= self.state << 13;
        self.state ^= self.state >> 17;
        self.state ^= self.state << 5;
        (1 + self.state as usize % self.max).min(left)
    }
}

/// An option request as framed in the client stream (independent of the
/// state machine under test).
#[derive(Debug, Clone, Copy)]
struct OptFrame {
    code: u32,
    len: u32,
    /// Offset just past its payload.
    end: u64,
}

/// Walk the client stream the way the spec frames it: 4 bytes of client
/// flags, then options (IHAVEOPT, code, length, payload). Returns the
/// complete-header options and, if the walk stopped at a bad magic, where.
fn walk_options(stream: &[u8]) -> (Vec<OptFrame>, Option<usize>) {
    let mut frames = Vec::new();
    let mut at = 4usize;
    while at + 16 <= stream.len() {
        if be64(stream, at) != IHAVEOPT {
            return (frames, Some(at));
        }
        let code = be32(stream, at + 8);
        let len = be32(stream, at + 12);
        let end = at as u64 + 16 + u64::from(len);
        frames.push(OptFrame { code, len, end });
        if end > stream.len() as u64 {
            break;
        }
        at = end as usize;
    }
    (frames, None)
}

/// One option reply parsed from the server output.
#[derive(Debug)]
struct OptReply {
    option: u32,
    kind: u32,
    data: Vec<u8>,
}

/// Parse `out` as a sequence of whole option replies; panics on anything
/// else (partial reply, bad magic). Returns the replies and the bytes used.
fn parse_replies(out: &[u8], limit: usize) -> Vec<OptReply> {
    let mut v = Vec::new();
    let mut at = 0;
    while at < limit {
        assert!(at + 20 <= limit, "partial option reply header in output");
        assert_eq!(be64(out, at), REPLY_MAGIC, "option reply with bad magic");
        let len = be32(out, at + 16) as usize;
        assert!(at + 20 + len <= limit, "partial option reply payload");
        v.push(OptReply {
            option: be32(out, at + 8),
            kind: be32(out, at + 12),
            data: out[at + 20..at + 20 + len].to_vec(),
        });
        at += 20 + len;
    }
    v
}

fn is_error(kind: u32) -> bool {
    kind & (1 << 31) != 0
}

fn is_known_option(code: u32) -> bool {
    matches!(
        code,
        opt::EXPORT_NAME
            | opt::ABORT
            | opt::LIST
            | opt::STARTTLS
            | opt::INFO
            | opt::GO
            | opt::STRUCTURED_REPLY
            | opt::LIST_META_CONTEXT
            | opt::SET_META_CONTEXT
            | opt::EXTENDED_HEADERS
    )
}

/// Check the replies to one completed option: zero or more intermediate
/// replies of the kinds this option may send, then exactly one final ACK or
/// error. Returns how many replies it used.
fn check_option_replies(f: &OptFrame, replies: &[OptReply]) -> usize {
    let mut i = 0;
    loop {
        let r = replies
            .get(i)
            .unwrap_or_else(|| panic!("option {} got no final reply", f.code));
        assert_eq!(r.option, f.code, "reply for the wrong option");
        i += 1;
        if r.kind == rep::ACK || is_error(r.kind) {
            if r.kind == rep::ACK {
                assert!(r.data.is_empty(), "ACK with payload");
                assert!(
                    f.len <= MAX_OPTION_LEN,
                    "oversized option {} was acknowledged",
                    f.code
                );
                assert!(is_known_option(f.code), "unknown option acknowledged");
            }
            if !is_known_option(f.code) {
                assert_eq!(r.kind, rep::ERR_UNSUP, "unknown option not ERR_UNSUP");
            }
            if f.len > MAX_OPTION_LEN && is_known_option(f.code) {
                assert_eq!(r.kind, rep::ERR_TOO_BIG, "oversized option not ERR_TOO_BIG");
            }
            return i;
        }
        let allowed = match r.kind {
            rep::SERVER => f.code == opt::LIST,
            rep::INFO => f.code == opt::INFO || f.code == opt::GO,
            rep::META_CONTEXT => {
                f.code == opt::LIST_META_CONTEXT || f.code == opt::SET_META_CONTEXT
            }
            _ => false,
        };
        assert!(allowed, "reply type {:#x} to option {}", r.kind, f.code);
        if r.kind == rep::INFO {
            assert!(r.data.len() >= 2, "INFO reply without type");
            if be16(&r.data, 0) == info::EXPORT {
                assert_eq!(r.data.len(), 12, "INFO_EXPORT length");
                assert_eq!(be64(&r.data, 2), DISK_SIZE, "INFO_EXPORT size");
            }
        }
        if r.kind == rep::META_CONTEXT {
            assert!(r.data.len() > 4, "META_CONTEXT reply too short");
            let id = be32(&r.data, 0);
            if f.code == opt::LIST_META_CONTEXT {
                assert_eq!(id, 0, "LIST_META_CONTEXT must reply with id 0");
            } else {
                assert!(
                    MetaContext::ALL.iter().any(|c| c.id() == id),
                    "unknown context id {id}"
                );
            }
        }
    }
}

/// Feed raw client bytes to the handshake state machine in data-driven
/// chunks. Input: one chunking byte, then the client->server stream
/// (client flags, options, and possibly the first requests).
pub fn handshake(data: &[u8]) {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let (frames, bad_magic_at) = walk_options(stream);
    let no_zeroes = stream.len() >= 4 && be32(stream, 0) & client_flags::NO_ZEROES != 0;
    let mut chunker = Chunker::new(seed);
    let mut hs = Handshake::new();
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let mut fed = 0usize;
    // Options (indices into `frames`) whose replies were checked.
    let mut answered = 0usize;
    loop {
        let step = hs.step(&mut input, &mut out, &TestCatalog);
        let consumed = fed - input.len();
        assert_eq!(
            &input[..],
            &stream[consumed..fed],
            "input buffer is not the unconsumed suffix"
        );
        // Options now completely consumed.
        let done = frames[answered..]
            .iter()
            .take_while(|f| f.end <= consumed as u64)
            .count();
        let new = &frames[answered..answered + done];
        // The option that ended the handshake, if any, is the last one done.
        let (replied, terminal) = match &step {
            Ok(HandshakeStep::NeedMore) => (new, None),
            Ok(HandshakeStep::StartTls) => panic!("STARTTLS accepted on a server without TLS"),
            Ok(HandshakeStep::Enter(_)) | Ok(HandshakeStep::Close) => {
                let (last, rest) = new.split_last().expect("handshake ended without an option");
                (rest, Some(*last))
            }
            Err(HandshakeError::BadClientFlags(_)) => {
                assert_eq!(consumed, 4, "client flags are 4 bytes");
                assert!(new.is_empty() && out.is_empty());
                return;
            }
            Err(HandshakeError::BadOptionMagic(_)) => {
                assert_eq!(Some(consumed), bad_magic_at, "bad magic at the wrong place");
                (new, None)
            }
            Err(HandshakeError::Finished) => panic!("handshake reported Finished while running"),
            Err(_) => {
                let (last, rest) = new.split_last().expect("EXPORT_NAME error without option");
                assert_eq!(
                    last.code,
                    opt::EXPORT_NAME,
                    "only EXPORT_NAME fails this way"
                );
                (rest, Some(*last))
            }
        };
        if let Some(t) = terminal {
            assert_eq!(
                t.end, consumed as u64,
                "terminal option not consumed exactly"
            );
        }
        // Output: whole replies for every option answered in this step,
        // then (EXPORT_NAME success only) the 10- or 134-byte export reply.
        let export_reply = match (&step, terminal) {
            (Ok(HandshakeStep::Enter(_)), Some(t)) if t.code == opt::EXPORT_NAME => {
                if no_zeroes {
                    10
                } else {
                    134
                }
            }
            _ => 0,
        };
        assert!(out.len() >= export_reply, "EXPORT_NAME reply missing");
        let replies = parse_replies(&out, out.len() - export_reply);
        let mut used = 0;
        for f in replied {
            assert_ne!(
                f.code,
                opt::EXPORT_NAME,
                "EXPORT_NAME did not end the handshake"
            );
            used += check_option_replies(f, &replies[used..]);
        }
        match (&step, terminal) {
            (Ok(HandshakeStep::Enter(n)), Some(t)) => {
                assert!(t.code == opt::GO || t.code == opt::EXPORT_NAME);
                if t.code == opt::GO {
                    let k = check_option_replies(&t, &replies[used..]);
                    assert_eq!(
                        replies[used + k - 1].kind,
                        rep::ACK,
                        "GO entered after error"
                    );
                    used += k;
                } else {
                    let tail = &out[out.len() - export_reply..];
                    assert_eq!(be64(tail, 0), DISK_SIZE, "EXPORT_NAME size");
                    assert_eq!(be16(tail, 8), n.flags, "EXPORT_NAME flags");
                    assert!(tail[10..].iter().all(|b| *b == 0), "padding not zero");
                    assert!(!n.extended, "EXPORT_NAME cannot enter extended mode");
                }
                assert!(!n.extended || n.structured, "extended without structured");
                assert_eq!(n.flags & tx_flags::SEND_DF != 0, n.structured, "SEND_DF");
                assert!(n.flags & tx_flags::HAS_FLAGS != 0, "HAS_FLAGS");
                assert!(
                    n.contexts.is_empty() || n.structured,
                    "contexts unstructured"
                );
            }
            (Ok(HandshakeStep::Close), Some(t)) => {
                assert_eq!(t.code, opt::ABORT, "Close without ABORT");
                let k = check_option_replies(&t, &replies[used..]);
                assert_eq!(
                    replies[used + k - 1].kind,
                    rep::ACK,
                    "ABORT not acknowledged"
                );
                used += k;
            }
            _ => {}
        }
        assert_eq!(used, replies.len(), "replies without an option");
        out.clear();
        answered += done;

        match step {
            Ok(HandshakeStep::NeedMore) => {
                // Nothing complete may be left unprocessed.
                if fed >= 4 {
                    assert!(consumed >= 4, "client flags left unread");
                }
                if let Some(f) = frames.get(answered) {
                    assert!(f.end > fed as u64, "complete option left unprocessed");
                }
                if let Some(at) = bad_magic_at {
                    assert!(at + 16 > fed, "bad magic not reported");
                }
                if fed == stream.len() {
                    return;
                }
                let n = chunker.next(stream.len() - fed);
                input.extend_from_slice(&stream[fed..fed + n]);
                fed += n;
            }
            Ok(HandshakeStep::Enter(_) | HandshakeStep::Close | HandshakeStep::StartTls)
            | Err(_) => {
                // A finished handshake stays finished.
                let again = hs.step(&mut input, &mut out, &TestCatalog);
                assert!(matches!(again, Err(HandshakeError::Finished)));
                assert!(out.is_empty(), "output after the handshake finished");
                return;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// nbd_request
// ---------------------------------------------------------------------------

/// Decode a request header in both modes, check the encode round trip, then
/// validate it against a session built from the bytes after the header.
pub fn request(data: &[u8]) {
    for extended in [false, true] {
        let hlen = RequestHeader::wire_len(extended);
        let h = match RequestHeader::decode(data, extended) {
            Ok(None) => {
                assert!(data.len() < hlen, "Ok(None) with a whole header");
                continue;
            }
            Ok(Some(h)) => h,
            Err(FrameError::BadMagic(m)) => {
                assert_eq!(m, be32(data, 0), "BadMagic reports another magic");
                continue;
            }
            Err(FrameError::PayloadTooLarge(n)) => {
                assert!(
                    n > u64::from(MAX_PAYLOAD),
                    "PayloadTooLarge below the limit"
                );
                continue;
            }
        };
        assert!(data.len() >= hlen);
        assert!(h.payload_len(extended) <= u64::from(MAX_PAYLOAD));
        if !extended {
            assert!(h.length <= u64::from(u32::MAX));
        }
        let mut enc = Vec::new();
        h.encode(extended, &mut enc);
        assert_eq!(&enc[..], &data[..hlen], "header does not round-trip");

        let mut r = IntReader {
            data: &data[hlen..],
        };
        let size = r.u64();
        let flags = r.u16() | tx_flags::HAS_FLAGS;
        let bits = r.u8();
        let s = Session {
            size,
            flags,
            structured: extended || bits & 1 != 0,
            extended,
            has_contexts: bits & 2 != 0,
        };
        check_command(&h, &s, validate(&h, &s));
    }
}

fn in_range(offset: u64, len: u64, size: u64) -> bool {
    matches!(offset.checked_add(len), Some(e) if e <= size)
}

fn check_command(h: &RequestHeader, s: &Session, r: Result<Command, nbd_server::proto::NbdErrno>) {
    let Ok(c) = r else {
        return;
    };
    let read_only = s.flags & tx_flags::READ_ONLY != 0;
    match c {
        Command::Read { offset, len, df } => {
            assert_eq!(h.kind, cmd::READ);
            assert!(
                in_range(offset, u64::from(len), s.size),
                "READ out of range"
            );
            assert!(len <= MAX_PAYLOAD);
            assert!(!df || s.structured, "DF without structured replies");
            assert_eq!((offset, u64::from(len)), (h.offset, h.length));
        }
        Command::Write { offset, len, .. } => {
            assert_eq!(h.kind, cmd::WRITE);
            assert!(!read_only, "WRITE on a read-only export");
            assert!(
                in_range(offset, u64::from(len), s.size),
                "WRITE out of range"
            );
            assert_eq!(u64::from(len), h.payload_len(s.extended), "WRITE payload");
            assert_eq!((offset, u64::from(len)), (h.offset, h.length));
        }
        Command::Disconnect => assert_eq!(h.kind, cmd::DISC),
        Command::Flush => {
            assert_eq!(h.kind, cmd::FLUSH);
            assert_eq!((h.offset, h.length), (0, 0));
        }
        Command::Trim { offset, len, .. } => {
            assert_eq!(h.kind, cmd::TRIM);
            assert!(!read_only, "TRIM on a read-only export");
            assert!(in_range(offset, len, s.size), "TRIM out of range");
        }
        Command::Cache { offset, len } => {
            assert_eq!(h.kind, cmd::CACHE);
            assert!(in_range(offset, len, s.size), "CACHE out of range");
        }
        Command::WriteZeroes {
            offset, len, fast, ..
        } => {
            assert_eq!(h.kind, cmd::WRITE_ZEROES);
            assert!(!read_only, "WRITE_ZEROES on a read-only export");
            assert!(in_range(offset, len, s.size), "WRITE_ZEROES out of range");
            assert!(!fast || s.flags & tx_flags::SEND_FAST_ZERO != 0);
        }
        Command::BlockStatus { offset, len, .. } => {
            assert_eq!(h.kind, cmd::BLOCK_STATUS);
            assert!(
                s.structured && s.has_contexts,
                "BLOCK_STATUS without contexts"
            );
            assert!(
                len > 0 && in_range(offset, len, s.size),
                "BLOCK_STATUS range"
            );
        }
    }
    // Payload-length flag only in extended mode.
    assert!(s.extended || h.flags & cmd_flags::PAYLOAD_LEN == 0);
}

// ---------------------------------------------------------------------------
// nbd_session
// ---------------------------------------------------------------------------

/// The server's exports, seen through the sans-IO handshake's catalog trait
/// (the model the session's output is checked against).
struct ServerCatalog<'a>(&'a Server);

impl ExportCatalog for ServerCatalog<'_> {
    type Export = ();
    fn lookup(&self, name: &str) -> Option<(ExportInfo, ())> {
        let e = self.0.export(name).or_else(|| {
            let all = self.0.exports();
            (name.is_empty() && all.len() == 1)
                .then(|| all.into_iter().next())
                .flatten()
        })?;
        Some((e.info(), ()))
    }
    fn list(&self) -> Vec<(String, String)> {
        self.0
            .exports()
            .iter()
            .map(|e| (e.name().to_owned(), e.description().to_owned()))
            .collect()
    }
}

/// A request the server must answer, as the model decoded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Expected {
    kind: u16,
    offset: u64,
    /// Bytes of READ data a successful reply carries (valid READs only).
    read_len: Option<u32>,
}

/// What the server must send after its greeting, derived from the client
/// bytes alone with the sans-IO handshake and request codec.
struct SessionModel {
    /// Exact handshake output.
    handshake_out: Vec<u8>,
    /// Transmission mode, if the client entered transmission.
    mode: Option<(bool, bool)>,
    /// Requests needing a reply, in order.
    requests: Vec<(u64, Expected)>,
}

fn session_model(input: &[u8], server: &Server) -> SessionModel {
    let mut hs = Handshake::new();
    let mut buf = BytesMut::from(input);
    let mut out = BytesMut::new();
    let step = hs.step(&mut buf, &mut out, &ServerCatalog(server));
    let mut model = SessionModel {
        handshake_out: out.to_vec(),
        mode: None,
        requests: Vec::new(),
    };
    let Ok(HandshakeStep::Enter(n)) = step else {
        return model;
    };
    let structured = n.structured || n.extended;
    model.mode = Some((structured, n.extended));
    let session = Session {
        size: n.info.size,
        flags: n.flags,
        structured,
        extended: n.extended,
        has_contexts: !n.contexts.is_empty(),
    };
    let hlen = RequestHeader::wire_len(n.extended);
    let mut rest = &buf[..];
    // Stops where the server stops reading: end of input, a truncated
    // request, a framing error or DISC.
    while let Ok(Some(h)) = RequestHeader::decode(rest, n.extended) {
        let need = hlen as u64 + h.payload_len(n.extended);
        if (rest.len() as u64) < need {
            break;
        }
        rest = &rest[need as usize..];
        let read_len = match validate(&h, &session) {
            Ok(Command::Disconnect) => break,
            Ok(Command::Read { len, .. }) => Some(len),
            _ => None,
        };
        model.requests.push((
            h.cookie,
            Expected {
                kind: h.kind,
                offset: h.offset,
                read_len,
            },
        ));
    }
    model
}

/// Incremental checker of everything the server sent, fed as it arrives
/// (READ data is skipped, never stored: replies can run to gigabytes).
struct SessionChecker {
    model: SessionModel,
    /// Unparsed bytes (headers and small payloads only).
    buf: Vec<u8>,
    /// Data bytes still to skip.
    skip: u64,
    /// Bytes of greeting + handshake output verified so far.
    prefix_done: usize,
    /// Requests awaiting a reply, by cookie.
    outstanding: std::collections::HashMap<u64, Vec<Expected>>,
    /// Structured replies in progress: cookie -> (bytes of READ covered, saw error).
    partial: std::collections::HashMap<u64, (u64, bool)>,
    /// Cookies shared by requests that differ: which reply answers which
    /// is unknowable, so per-request checks skip them.
    ambiguous: std::collections::HashSet<u64>,
    /// Cookies shared by requests whose simple success replies differ in
    /// length (READs of different sizes, or a READ and something else).
    data_ambiguous: std::collections::HashSet<u64>,
    /// A simple reply to an ambiguous cookie made the stream unparseable
    /// (its data length is unknown): stop checking.
    gave_up: bool,
}

const SIMPLE_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_MAGIC: u32 = 0x668e_33ef;
const EXTENDED_MAGIC: u32 = 0x6e8a_278c;

impl SessionChecker {
    fn new(model: SessionModel) -> Self {
        let mut outstanding: std::collections::HashMap<u64, Vec<Expected>> =
            std::collections::HashMap::new();
        for (cookie, e) in &model.requests {
            outstanding.entry(*cookie).or_default().push(*e);
        }
        let differ = |same: fn(&Expected, &Expected) -> bool| {
            outstanding
                .iter()
                .filter(|(_, v)| v.iter().any(|e| !same(e, &v[0])))
                .map(|(c, _)| *c)
                .collect()
        };
        let ambiguous = differ(|a, b| a == b);
        let data_ambiguous = differ(|a, b| a.read_len == b.read_len);
        SessionChecker {
            model,
            buf: Vec::new(),
            skip: 0,
            prefix_done: 0,
            outstanding,
            partial: std::collections::HashMap::new(),
            ambiguous,
            data_ambiguous,
            gave_up: false,
        }
    }

    fn prefix_len(&self) -> usize {
        18 + self.model.handshake_out.len()
    }

    fn feed(&mut self, mut data: &[u8]) {
        if self.gave_up {
            return;
        }
        // Greeting and handshake replies: byte for byte.
        while self.prefix_done < self.prefix_len() && !data.is_empty() {
            let i = self.prefix_done;
            let want = if i < 18 {
                let mut g = BytesMut::new();
                Handshake::greeting(&mut g);
                g[i]
            } else {
                self.model.handshake_out[i - 18]
            };
            assert_eq!(data[0], want, "handshake output differs at byte {i}");
            self.prefix_done += 1;
            data = &data[1..];
        }
        if data.is_empty() {
            return;
        }
        assert!(
            self.model.mode.is_some(),
            "bytes after a handshake that did not enter transmission"
        );
        if self.skip > 0 {
            let n = self.skip.min(data.len() as u64);
            self.skip -= n;
            data = &data[n as usize..];
        }
        self.buf.extend_from_slice(data);
        self.parse();
    }

    /// Parse as many whole reply headers (with small payloads) as buffered.
    fn parse(&mut self) {
        let Some((structured, extended)) = self.model.mode else {
            return;
        };
        loop {
            if self.gave_up || self.skip > 0 || self.buf.len() < 4 {
                return;
            }
            let magic = be32(&self.buf, 0);
            let used = match magic {
                SIMPLE_MAGIC => {
                    assert!(!extended, "simple reply with extended headers");
                    if self.buf.len() < 16 {
                        return;
                    }
                    let error = be32(&self.buf, 4);
                    let cookie = be64(&self.buf, 8);
                    let entries = self
                        .outstanding
                        .get(&cookie)
                        .unwrap_or_else(|| panic!("simple reply for unknown cookie {cookie:#x}"));
                    assert!(
                        !self.partial.contains_key(&cookie),
                        "simple reply inside a structured one"
                    );
                    let shape = entries[0].read_len;
                    if self.data_ambiguous.contains(&cookie) {
                        self.gave_up = true;
                        return;
                    }
                    if error == 0 {
                        if let Some(len) = shape {
                            assert!(!structured, "structured READ got a simple success reply");
                            self.skip = u64::from(len);
                        }
                    }
                    self.answered(cookie);
                    16
                }
                STRUCTURED_MAGIC | EXTENDED_MAGIC => {
                    assert!(structured, "chunk without structured replies");
                    assert_eq!(magic == EXTENDED_MAGIC, extended, "wrong chunk header kind");
                    let hlen = if extended { 32 } else { 20 };
                    if self.buf.len() < hlen {
                        return;
                    }
                    let flags = be16(&self.buf, 4);
                    let kind = be16(&self.buf, 6);
                    let cookie = be64(&self.buf, 8);
                    let len = if extended {
                        be64(&self.buf, 24)
                    } else {
                        u64::from(be32(&self.buf, 16))
                    };
                    assert!(
                        self.outstanding.contains_key(&cookie),
                        "chunk for unknown cookie {cookie:#x}"
                    );
                    // Payload kept in the buffer: all but READ data (whose
                    // 8-byte offset is kept and the rest skipped).
                    let keep = if kind == 1 { 8 } else { len };
                    assert!(keep <= 1 << 24, "implausible chunk payload {len}");
                    if (self.buf.len() as u64) < hlen as u64 + keep {
                        return;
                    }
                    let p = self.buf[hlen..hlen + keep as usize].to_vec();
                    self.chunk(cookie, flags, kind, len, &p);
                    if kind == 1 {
                        self.skip = len - 8;
                    }
                    hlen + keep as usize
                }
                _ => panic!("garbage in the reply stream: magic {magic:#010x}"),
            };
            self.buf.drain(..used);
            if self.skip > 0 && !self.buf.is_empty() {
                let n = self.skip.min(self.buf.len() as u64) as usize;
                self.buf.drain(..n);
                self.skip -= n as u64;
            }
        }
    }

    fn chunk(&mut self, cookie: u64, flags: u16, kind: u16, len: u64, p: &[u8]) {
        let extended = matches!(self.model.mode, Some((_, true)));
        let entry = self.partial.entry(cookie).or_insert((0, false));
        match kind {
            0 => assert_eq!(len, 0, "NONE chunk with payload"),
            1 => {
                assert!(len >= 8, "OFFSET_DATA too short");
                entry.0 += len - 8;
            }
            2 => {
                assert_eq!(len, 12, "OFFSET_HOLE length");
                entry.0 += u64::from(be32(p, 8));
            }
            5 | 6 => {
                assert_eq!(kind == 6, extended, "block status chunk of the wrong width");
                let (head, per) = if extended { (8, 16) } else { (4, 8) };
                assert!(
                    len >= head && (len - head) % per == 0,
                    "block status length"
                );
                assert!(len > head, "block status without extents");
            }
            0x8001 | 0x8002 => {
                assert!(len >= 6, "error chunk too short");
                assert_ne!(be32(p, 0), 0, "error chunk with errno 0");
                let msg = u64::from(be16(p, 4));
                let extra = if kind == 0x8002 { 8 } else { 0 };
                assert_eq!(6 + msg + extra, len, "error chunk message length");
                entry.1 = true;
            }
            _ => panic!("unknown chunk type {kind:#x}"),
        }
        if flags & 1 != 0 {
            let (covered, failed) = self.partial.remove(&cookie).unwrap_or((0, false));
            let first = self.outstanding[&cookie][0];
            if !self.ambiguous.contains(&cookie) && first.kind == cmd::READ && !failed {
                if let Some(len) = first.read_len {
                    assert_eq!(
                        covered,
                        u64::from(len),
                        "READ reply covers the wrong length"
                    );
                }
            }
            self.answered(cookie);
        }
    }

    fn answered(&mut self, cookie: u64) {
        let entries = self.outstanding.get_mut(&cookie).expect("known cookie");
        entries.pop();
        if entries.is_empty() {
            self.outstanding.remove(&cookie);
        }
    }

    fn finish(&self) {
        if self.gave_up {
            return;
        }
        assert_eq!(
            self.prefix_done,
            self.prefix_len(),
            "handshake output cut short"
        );
        assert!(
            self.buf.is_empty() && self.skip == 0,
            "reply stream ends inside a reply"
        );
        assert!(self.partial.is_empty(), "structured reply without DONE");
        let missing: usize = self.outstanding.values().map(Vec::len).sum();
        assert_eq!(missing, 0, "{missing} requests got no reply");
    }
}

/// Serve the input as one client's whole byte stream (after the greeting)
/// and check everything the server sends against a model built from the
/// sans-IO codec: the exact handshake bytes, then exactly one well-formed
/// reply per request read before the server stops reading. The server must
/// close once the client's side is shut, within [`RUN_LIMIT`], without
/// panicking anywhere.
pub fn session(data: &[u8]) {
    let input = Bytes::copy_from_slice(data);
    block_on(async move {
        let run = async move {
            let server = Server::new(ServerConfig::default());
            server
                .add_export(
                    Export::new("disk", Arc::new(MemoryBackend::new(DISK_SIZE)))
                        .with_description("fuzz disk"),
                )
                .expect("add disk");
            let ro: Vec<u8> = (0..64 * 1024u32).map(|i| (i % 251) as u8).collect();
            server
                .add_export(Export::new(
                    "ro",
                    Arc::new(MemoryBackend::read_only_from(&ro)),
                ))
                .expect("add ro");
            let mut checker = SessionChecker::new(session_model(&input, &server));
            let (client, server_side) = tokio::io::duplex(1 << 20);
            let srv = server.clone();
            let serving = tokio::spawn(async move { srv.serve_connection(server_side).await });
            let (mut rd, mut wr) = tokio::io::split(client);
            let writer = async move {
                // The server may hang up early (bad handshake): ignore errors.
                let _ = wr.write_all(&input).await;
                let _ = wr.shutdown().await;
            };
            let reader = async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = rd.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    checker.feed(&buf[..n]);
                }
                checker
            };
            let ((), checker) = tokio::join!(writer, reader);
            serving.await.expect("serve_connection panicked");
            checker.finish();
            server.shutdown().await.expect("shutdown");
        };
        tokio::time::timeout(RUN_LIMIT, run)
            .await
            .expect("session hung (no EOF from the server)");
    });
}

// ---------------------------------------------------------------------------
// qcow2_header
// ---------------------------------------------------------------------------

fn check_header_info(info: &HeaderInfo, file_len: u64) {
    assert!((9..=21).contains(&info.cluster_bits));
    assert!(info.version == 2 || info.version == 3);
    assert!(info.size <= qcow_backend::header::MAX_VIRTUAL_SIZE);
    let cluster = info.cluster_size();
    let l1_bytes = u64::from(info.l1_entries) * 8;
    assert!(l1_bytes <= MAX_L1_BYTES);
    assert!(u64::from(info.l1_entries) * cluster * (cluster / 8) >= info.size);
    if info.l1_entries > 0 {
        assert!(info.l1_offset % cluster == 0 && info.l1_offset > 0);
        assert!(info.l1_offset + l1_bytes <= file_len);
    }
    assert!(info.reftable_clusters > 0);
    assert!(info.reftable_offset % cluster == 0 && info.reftable_offset > 0);
    assert!(info.reftable_offset + u64::from(info.reftable_clusters) * cluster <= file_len);
    if let Some(b) = &info.backing_file {
        assert!(!b.is_empty() && b.len() <= 1023);
    }
}

/// `data[offset..offset+len]`, clipped to what exists.
fn clipped(data: &[u8], offset: u64, len: u64) -> &[u8] {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(data.len());
    let end = usize::try_from(offset.saturating_add(len))
        .unwrap_or(usize::MAX)
        .min(data.len());
    &data[start..end]
}

/// Parse the bytes as a qcow2 header under several file lengths, then run
/// the table checks on the tables the header points at.
pub fn qcow2_header(data: &[u8]) {
    let n = data.len() as u64;
    let tail = if data.len() >= 8 {
        be64(data, data.len() - 8)
    } else {
        0
    };
    for file_len in [n, tail, n / 2, n.saturating_mul(4), u64::MAX] {
        if let Ok(info) = parse_header(data, file_len) {
            check_header_info(&info, file_len);
            let cluster = info.cluster_size();
            let rt = clipped(
                data,
                info.reftable_offset,
                u64::from(info.reftable_clusters) * cluster,
            );
            let _ = check_reftable(rt, cluster, file_len);
            let l1 = clipped(data, info.l1_offset, u64::from(info.l1_entries) * 8);
            let _ = check_l1(l1, cluster, file_len);
        }
    }
    // The table checks on raw bytes, at every legal cluster size.
    for bits in [9u32, 12, 16, 21] {
        let _ = check_reftable(data, 1 << bits, n);
        let _ = check_l1(data, 1 << bits, n);
    }
}

// ---------------------------------------------------------------------------
// qcow2_open
// ---------------------------------------------------------------------------

/// Fixed base images placed next to the fuzzed one, so seeds with a backing
/// file (`base.raw`, or `base.qcow2` in format qcow2) reach the chain code.
fn base_images() -> &'static (Vec<u8>, Vec<u8>) {
    static BASES: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    BASES.get_or_init(|| {
        let raw: Vec<u8> = (0..256 * 1024u32).map(|i| (i % 253) as u8 | 1).collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("base.qcow2");
        let qcow = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let mut c = qcow_backend::CreateOptions::fresh(DISK_SIZE);
                c.cluster_size = 512;
                let b = QcowBackend::create(&p, &c, &OpenOptions::new())
                    .await
                    .expect("create base");
                b.write(0, Bytes::from(vec![0xa5u8; 8192]))
                    .await
                    .expect("write base");
                b.close().await.expect("close base");
                drop(b);
                std::fs::read(&p).expect("read base")
            })
        })
        .join()
        .expect("base image thread");
        (raw, qcow)
    })
}

/// Open the bytes as a qcow2 image (with fixed base images beside it) and,
/// if that works, run one of each operation and close it. Errors are fine;
/// panics, aborts and hangs are bugs.
pub fn qcow2_open(data: &[u8]) {
    let (raw, qcow) = base_images();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("top.qcow2");
    std::fs::write(&path, data).expect("write image");
    std::fs::write(dir.path().join("base.raw"), raw).expect("write base.raw");
    std::fs::write(dir.path().join("base.qcow2"), qcow).expect("write base.qcow2");
    block_on(async {
        let run = async {
            let Ok(b) = QcowBackend::open(&path, &OpenOptions::new()).await else {
                return;
            };
            exercise(&b).await;
            let _ = b.close().await;
        };
        tokio::time::timeout(RUN_LIMIT * 2, run)
            .await
            .expect("qcow2 open/IO hung");
    });
}

async fn exercise(b: &QcowBackend) {
    let size = b.size();
    if size == 0 {
        let _ = b.flush().await;
        return;
    }
    let n = size.min(4096);
    let last = size - n;
    let _ = b.write(0, Bytes::from(vec![0x5au8; n as usize])).await;
    let _ = b.write(last, Bytes::from(vec![0xc3u8; n as usize])).await;
    if let Ok(chunks) = b.read(0, n as u32).await {
        let total: u64 = chunks.iter().map(|c| c.len()).sum();
        assert_eq!(total, n, "read returned the wrong length");
    }
    let _ = b.read(last, n as u32).await;
    // Across a cluster boundary, partial at both ends when possible.
    let zlen = size.min(3 * b.cluster_size() / 2 + 1000);
    let zoff = (size - zlen) / 2;
    let _ = b.write_zeroes(zoff, zlen, ZeroFlags::default()).await;
    let _ = b.trim(0, size.min(2 * b.cluster_size())).await;
    let _ = b.block_status(0, size).await;
    let _ = b.flush().await;
}

// ---------------------------------------------------------------------------
// nbd_reply: our client's reply decoder on server bytes
// ---------------------------------------------------------------------------

/// Decode whatever a hostile server sends. The first byte picks the reply
/// mode and what the pending request expects. Invariants: no panic; a
/// `Need(n)` asks for more than is there and never more than a bounded
/// amount (the decoder validates lengths before asking to buffer them);
/// every decoded reply consumed bytes.
pub fn reply(data: &[u8]) {
    use nbd_client::reply::{decode_reply, Decoded, Expect, MAX_STATUS_PAYLOAD};
    use nbd_server::proto::ReplyMode;
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mode = match sel % 3 {
        0 => ReplyMode::Simple,
        1 => ReplyMode::Structured,
        _ => ReplyMode::Extended,
    };
    let expect = match (sel / 3) % 3 {
        0 => Expect::Read {
            len: 1 << (sel % 17),
        },
        1 => Expect::BlockStatus,
        _ => Expect::Other,
    };
    // Largest buffer the decoder may ask for: a header plus a READ payload
    // of at most 64 KiB here, or the largest status/error payload.
    let bound = 64 + (1usize << 16).max(MAX_STATUS_PAYLOAD as usize);
    let mut buf = BytesMut::from(rest);
    for _ in 0..10_000 {
        let before = buf.len();
        match decode_reply(&mut buf, mode, |_| Some(expect)) {
            Ok(Decoded::Reply(_)) => assert!(buf.len() < before, "a reply consumed nothing"),
            Ok(Decoded::Need(n)) => {
                assert!(
                    n > buf.len(),
                    "asked for {n} bytes with {} there",
                    buf.len()
                );
                assert!(n <= bound, "asked to buffer {n} bytes");
                return;
            }
            Err(_) => return,
        }
    }
}
