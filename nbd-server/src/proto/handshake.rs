//! Server side of the fixed-newstyle handshake, as a sans-IO state machine.
//!
//! ```text
//!  server: greeting ──▶ client: flags ──▶ ┌─ option ──▶ reply(s) ─┐
//!                                         └───────────◀───────────┘
//!                          GO / EXPORT_NAME success ──▶ transmission
//!                          ABORT, violation          ──▶ close
//! ```
//!
//! The caller owns the socket: it appends received bytes to an input buffer,
//! calls [`Handshake::step`], writes whatever was appended to the output
//! buffer, and acts on the returned [`HandshakeStep`]. Bytes after the
//! option that entered transmission stay in the input buffer: they are the
//! first requests.

use bytes::{Buf, BufMut, BytesMut};

use super::consts::{
    client_flags, handshake_flags, info, opt, rep, tx_flags, CONTEXT_BASE_ALLOCATION,
    CONTEXT_QEMU_ALLOCATION_DEPTH, EXPORT_NAME_PADDING, IHAVEOPT, MAX_OPTION_LEN, NBDMAGIC,
    OPTION_HEADER_LEN,
};
use super::option::{
    parse_export_name, parse_info_request, parse_meta_context_request, put_error,
    put_info_block_size, put_info_export, put_info_string, put_meta_context, put_reply, put_server,
};

/// Handshake flags this server sends.
pub const SERVER_HANDSHAKE_FLAGS: u16 =
    handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES;

/// A metadata context this server can serve.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetaContext {
    /// `base:allocation`: hole and zero bits.
    BaseAllocation,
    /// `qemu:allocation-depth`: layer of a backing chain the data comes from.
    AllocationDepth,
}

impl MetaContext {
    /// Every context, in id order.
    pub const ALL: [MetaContext; 2] = [MetaContext::BaseAllocation, MetaContext::AllocationDepth];

    /// The (transient) id we assign in `SET_META_CONTEXT` replies.
    pub fn id(self) -> u32 {
        match self {
            MetaContext::BaseAllocation => 1,
            MetaContext::AllocationDepth => 2,
        }
    }

    /// The context's full name.
    pub fn name(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => CONTEXT_BASE_ALLOCATION,
            MetaContext::AllocationDepth => CONTEXT_QEMU_ALLOCATION_DEPTH,
        }
    }

    fn namespace(self) -> &'static str {
        match self {
            MetaContext::BaseAllocation => "base:",
            MetaContext::AllocationDepth => "qemu:",
        }
    }
}

/// What the handshake tells a client about one export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// Canonical name.
    pub name: String,
    /// Human-readable description (may be empty).
    pub description: String,
    /// Size in bytes.
    pub size: u64,
    /// Transmission flags that do not depend on negotiation: everything but
    /// `SEND_DF`, which is added only when structured replies are on.
    pub flags: u16,
    /// Minimum block size.
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Maximum payload.
    pub max_payload: u32,
    /// Whether `base:allocation` is offered.
    pub base_allocation: bool,
    /// Whether `qemu:allocation-depth` is offered.
    pub allocation_depth: bool,
}

impl ExportInfo {
    fn offers(&self, ctx: MetaContext) -> bool {
        match ctx {
            MetaContext::BaseAllocation => self.base_allocation,
            MetaContext::AllocationDepth => self.allocation_depth,
        }
    }

    /// Transmission flags as sent once negotiation reached `structured`.
    pub fn negotiated_flags(&self, structured: bool) -> u16 {
        let mut flags = (self.flags | tx_flags::HAS_FLAGS) & !tx_flags::SEND_DF;
        if structured {
            flags |= tx_flags::SEND_DF;
        }
        // The spec forbids FAST_ZERO without WRITE_ZEROES and payload block
        // status without extended headers (which we never offer).
        if flags & tx_flags::SEND_WRITE_ZEROES == 0 {
            flags &= !tx_flags::SEND_FAST_ZERO;
        }
        flags & !tx_flags::BLOCK_STATUS_PAYLOAD
    }
}

/// Where the handshake looks up exports. `Export` is whatever handle the
/// caller wants back when a client enters transmission.
pub trait ExportCatalog {
    /// Handle returned with a successful `GO`/`EXPORT_NAME`.
    type Export;
    /// Find an export by the name a client sent ("" = default export).
    fn lookup(&self, name: &str) -> Option<(ExportInfo, Self::Export)>;
    /// Names and descriptions of all exports, for `NBD_OPT_LIST`.
    fn list(&self) -> Vec<(String, String)>;
}

/// The outcome of a successful negotiation.
#[derive(Debug)]
pub struct Negotiated<E> {
    /// The export as described to the client.
    pub info: ExportInfo,
    /// The caller's handle for it.
    pub export: E,
    /// Transmission flags as sent.
    pub flags: u16,
    /// Structured replies negotiated.
    pub structured: bool,
    /// Extended headers negotiated (implies structured replies).
    pub extended: bool,
    /// Metadata contexts selected for this export.
    pub contexts: Vec<MetaContext>,
}

/// Whether and how the server offers TLS (the spec's NOTLS / FORCEDTLS
/// modes, plus nbdkit's `--tls=on`: offered, not forced).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// No TLS: `NBD_OPT_STARTTLS` is refused with `NBD_REP_ERR_POLICY`.
    #[default]
    Off,
    /// TLS offered; plaintext clients are served too.
    Offered,
    /// FORCEDTLS: before TLS every option but `STARTTLS` and `ABORT` is
    /// answered `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME` closes.
    Required,
}

/// What the caller should do after [`Handshake::step`].
#[derive(Debug)]
pub enum HandshakeStep<E> {
    /// Write the output, read more input, call again.
    NeedMore,
    /// Write the output (the `STARTTLS` ACK), run the TLS handshake on the
    /// connection, call [`Handshake::tls_started`], then go on stepping
    /// with the bytes read through TLS. The input buffer is empty.
    StartTls,
    /// Write the output, then start transmission.
    Enter(Negotiated<E>),
    /// Write the output, then close the connection (client sent ABORT).
    Close,
}

/// A violation after which the server must drop the connection. Any output
/// already produced should still be written first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The client set flags we do not know or did not offer.
    #[error("client sent unsupported flags {0:#x}")]
    BadClientFlags(u32),
    /// An option did not start with `IHAVEOPT`.
    #[error("option request has bad magic {0:#018x}")]
    BadOptionMagic(u64),
    /// `EXPORT_NAME` named an export we do not have (no error reply exists).
    #[error("EXPORT_NAME for unknown export {0:?}")]
    UnknownExport(String),
    /// `EXPORT_NAME` payload was not a valid name.
    #[error("EXPORT_NAME with invalid name")]
    InvalidExportName,
    /// `EXPORT_NAME` after extended headers, which the spec forbids.
    #[error("EXPORT_NAME after extended headers were negotiated")]
    ExportNameAfterExtendedHeaders,
    /// `EXPORT_NAME` before TLS on a server that requires TLS (it has no
    /// error reply, so the connection closes).
    #[error("EXPORT_NAME before TLS on a server that requires TLS")]
    TlsRequired,
    /// Bytes followed `STARTTLS` before the TLS handshake: plaintext that
    /// would otherwise be read as if it came through TLS (the STARTTLS
    /// injection attack), so the connection closes.
    #[error("data sent after STARTTLS before the TLS handshake")]
    DataAfterStartTls,
    /// `step` was called after the handshake finished.
    #[error("handshake already finished")]
    Finished,
}

#[derive(Debug)]
enum Phase {
    ClientFlags,
    OptionHeader,
    /// Skipping the payload of an option too large to buffer.
    Discard {
        option: u32,
        remaining: u64,
    },
    /// STARTTLS acknowledged; waiting for [`Handshake::tls_started`].
    AwaitTls,
    Finished,
}

/// Server-side handshake state.
#[derive(Debug)]
pub struct Handshake {
    phase: Phase,
    no_zeroes: bool,
    structured: bool,
    extended: bool,
    /// Contexts chosen by the last `SET_META_CONTEXT`, and for which export.
    selection: Option<(String, Vec<MetaContext>)>,
    tls: TlsMode,
    /// TLS is running on this connection.
    tls_active: bool,
}

enum OptionOutcome<E> {
    Continue,
    Enter(Negotiated<E>),
    StartTls,
    Close,
}

impl Default for Handshake {
    fn default() -> Self {
        Self::new()
    }
}

impl Handshake {
    /// A handshake waiting for the client flags (send [`Handshake::greeting`]
    /// first), on a server without TLS.
    pub fn new() -> Self {
        Self::with_tls(TlsMode::Off)
    }

    /// A handshake on a server with the given TLS mode.
    pub fn with_tls(tls: TlsMode) -> Self {
        Handshake {
            phase: Phase::ClientFlags,
            no_zeroes: false,
            structured: false,
            extended: false,
            selection: None,
            tls,
            tls_active: false,
        }
    }

    /// Whether TLS runs on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// The TLS handshake after [`HandshakeStep::StartTls`] succeeded:
    /// option haggling restarts inside TLS with no state kept from before
    /// (the spec: structured replies and meta contexts must be asked again).
    pub fn tls_started(&mut self) {
        if matches!(self.phase, Phase::AwaitTls) {
            self.tls_active = true;
            self.structured = false;
            self.extended = false;
            self.selection = None;
            self.phase = Phase::OptionHeader;
        }
    }

    /// Append the 18-byte server greeting.
    pub fn greeting(out: &mut BytesMut) {
        out.put_u64(NBDMAGIC);
        out.put_u64(IHAVEOPT);
        out.put_u16(SERVER_HANDSHAKE_FLAGS);
    }

    /// Consume as many complete messages from `input` as possible, appending
    /// replies to `out`.
    pub fn step<C: ExportCatalog>(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
        catalog: &C,
    ) -> Result<HandshakeStep<C::Export>, HandshakeError> {
        loop {
            match self.phase {
                Phase::Finished => return Err(HandshakeError::Finished),
                Phase::AwaitTls => return Err(HandshakeError::Finished),
                Phase::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(HandshakeStep::NeedMore);
                    }
                    let flags = input.get_u32();
                    let known = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;
                    if flags & !known != 0 {
                        self.phase = Phase::Finished;
                        return Err(HandshakeError::BadClientFlags(flags));
                    }
                    self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
                    self.phase = Phase::OptionHeader;
                }
                Phase::Discard { option, remaining } => {
                    let n = remaining.min(input.len() as u64);
                    // n ≤ input.len(), so it fits in usize.
                    input.advance(n as usize);
                    let remaining = remaining - n;
                    if remaining > 0 {
                        self.phase = Phase::Discard { option, remaining };
                        return Ok(HandshakeStep::NeedMore);
                    }
                    self.phase = Phase::OptionHeader;
                    if option == opt::EXPORT_NAME {
                        // No error reply exists for EXPORT_NAME; a name this
                        // long cannot be valid.
                        self.phase = Phase::Finished;
                        return Err(HandshakeError::InvalidExportName);
                    }
                    if is_known_option(option) {
                        put_error(out, option, rep::ERR_TOO_BIG, "option payload too large");
                    } else {
                        put_error(out, option, rep::ERR_UNSUP, "unknown option");
                    }
                }
                Phase::OptionHeader => {
                    if input.len() < OPTION_HEADER_LEN {
                        return Ok(HandshakeStep::NeedMore);
                    }
                    let magic = u64::from_be_bytes(fixed(&input[0..8]));
                    if magic != IHAVEOPT {
                        self.phase = Phase::Finished;
                        return Err(HandshakeError::BadOptionMagic(magic));
                    }
                    let option = u32::from_be_bytes(fixed(&input[8..12]));
                    let len = u32::from_be_bytes(fixed(&input[12..16]));
                    if len > MAX_OPTION_LEN {
                        input.advance(OPTION_HEADER_LEN);
                        self.phase = Phase::Discard {
                            option,
                            remaining: u64::from(len),
                        };
                        continue;
                    }
                    // len ≤ MAX_OPTION_LEN, so this cannot overflow.
                    let total = OPTION_HEADER_LEN + len as usize;
                    if input.len() < total {
                        input.reserve(total - input.len());
                        return Ok(HandshakeStep::NeedMore);
                    }
                    input.advance(OPTION_HEADER_LEN);
                    let payload = input.split_to(len as usize);
                    match self.handle_option(option, &payload, out, catalog) {
                        Ok(OptionOutcome::Continue) => {}
                        Ok(OptionOutcome::Enter(n)) => {
                            self.phase = Phase::Finished;
                            return Ok(HandshakeStep::Enter(n));
                        }
                        Ok(OptionOutcome::Close) => {
                            self.phase = Phase::Finished;
                            return Ok(HandshakeStep::Close);
                        }
                        Ok(OptionOutcome::StartTls) => {
                            // The client must wait for our ACK before its
                            // TLS ClientHello; anything already here was
                            // sent in plaintext and must not be trusted.
                            if !input.is_empty() {
                                self.phase = Phase::Finished;
                                return Err(HandshakeError::DataAfterStartTls);
                            }
                            self.phase = Phase::AwaitTls;
                            return Ok(HandshakeStep::StartTls);
                        }
                        Err(e) => {
                            self.phase = Phase::Finished;
                            return Err(e);
                        }
                    }
                }
            }
        }
    }

    fn handle_option<C: ExportCatalog>(
        &mut self,
        option: u32,
        payload: &[u8],
        out: &mut BytesMut,
        catalog: &C,
    ) -> Result<OptionOutcome<C::Export>, HandshakeError> {
        if self.tls == TlsMode::Required && !self.tls_active {
            match option {
                opt::STARTTLS | opt::ABORT => {}
                opt::EXPORT_NAME => return Err(HandshakeError::TlsRequired),
                _ => {
                    put_error(out, option, rep::ERR_TLS_REQD, "TLS is required");
                    return Ok(OptionOutcome::Continue);
                }
            }
        }
        match option {
            opt::EXPORT_NAME => self.export_name(payload, out, catalog),
            opt::ABORT => {
                // The spec says to ignore any data sent with ABORT.
                put_reply(out, option, rep::ACK, &[]);
                Ok(OptionOutcome::Close)
            }
            opt::LIST => {
                if !payload.is_empty() {
                    put_error(out, option, rep::ERR_INVALID, "LIST takes no data");
                } else {
                    for (name, description) in catalog.list() {
                        put_server(out, &name, &description);
                    }
                    put_reply(out, option, rep::ACK, &[]);
                }
                Ok(OptionOutcome::Continue)
            }
            opt::STARTTLS => Ok(self.starttls(payload, out)),
            opt::INFO | opt::GO => Ok(self.info_or_go(option, payload, out, catalog)),
            opt::STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    put_error(
                        out,
                        option,
                        rep::ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    );
                } else if self.extended {
                    put_error(
                        out,
                        option,
                        rep::ERR_EXT_HEADER_REQD,
                        "extended headers already negotiated",
                    );
                } else {
                    self.structured = true;
                    put_reply(out, option, rep::ACK, &[]);
                }
                Ok(OptionOutcome::Continue)
            }
            opt::EXTENDED_HEADERS => {
                if !payload.is_empty() {
                    put_error(
                        out,
                        option,
                        rep::ERR_INVALID,
                        "EXTENDED_HEADERS takes no data",
                    );
                } else {
                    self.extended = true;
                    put_reply(out, option, rep::ACK, &[]);
                }
                Ok(OptionOutcome::Continue)
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, payload, out, catalog);
                Ok(OptionOutcome::Continue)
            }
            _ => {
                put_error(out, option, rep::ERR_UNSUP, "unknown option");
                Ok(OptionOutcome::Continue)
            }
        }
    }

    fn starttls<E>(&mut self, payload: &[u8], out: &mut BytesMut) -> OptionOutcome<E> {
        let option = opt::STARTTLS;
        if self.tls == TlsMode::Off {
            put_error(
                out,
                option,
                rep::ERR_POLICY,
                "TLS is not configured on this server",
            );
        } else if self.tls_active {
            put_error(out, option, rep::ERR_INVALID, "TLS is already running");
        } else if !payload.is_empty() {
            put_error(out, option, rep::ERR_INVALID, "STARTTLS takes no data");
        } else {
            put_reply(out, option, rep::ACK, &[]);
            return OptionOutcome::StartTls;
        }
        OptionOutcome::Continue
    }

    fn export_name<C: ExportCatalog>(
        &mut self,
        payload: &[u8],
        out: &mut BytesMut,
        catalog: &C,
    ) -> Result<OptionOutcome<C::Export>, HandshakeError> {
        if self.extended {
            return Err(HandshakeError::ExportNameAfterExtendedHeaders);
        }
        let name = parse_export_name(payload).map_err(|_| HandshakeError::InvalidExportName)?;
        let Some((info, export)) = catalog.lookup(&name) else {
            return Err(HandshakeError::UnknownExport(name));
        };
        let flags = info.negotiated_flags(self.structured);
        out.put_u64(info.size);
        out.put_u16(flags);
        if !self.no_zeroes {
            out.put_bytes(0, EXPORT_NAME_PADDING);
        }
        let contexts = self.contexts_for(&name);
        Ok(OptionOutcome::Enter(Negotiated {
            info,
            export,
            flags,
            structured: self.structured,
            extended: false,
            contexts,
        }))
    }

    fn info_or_go<C: ExportCatalog>(
        &mut self,
        option: u32,
        payload: &[u8],
        out: &mut BytesMut,
        catalog: &C,
    ) -> OptionOutcome<C::Export> {
        let req = match parse_info_request(payload) {
            Ok(r) => r,
            Err(e) => {
                put_error(out, option, rep::ERR_INVALID, &e.to_string());
                return OptionOutcome::Continue;
            }
        };
        let Some((info, export)) = catalog.lookup(&req.name) else {
            put_error(
                out,
                option,
                rep::ERR_UNKNOWN,
                &format!("no export named {:?}", req.name),
            );
            return OptionOutcome::Continue;
        };
        let structured = self.structured || self.extended;
        let flags = info.negotiated_flags(structured);
        put_info_export(out, option, info.size, flags);
        if req.requests.contains(&info::NAME) {
            put_info_string(out, option, info::NAME, &info.name);
        }
        if req.requests.contains(&info::DESCRIPTION) && !info.description.is_empty() {
            put_info_string(out, option, info::DESCRIPTION, &info.description);
        }
        // Sent even when not asked for (the spec allows unrequested items);
        // our constraints are the defaults, so nothing depends on the client
        // honouring them.
        put_info_block_size(
            out,
            option,
            info.min_block,
            info.preferred_block,
            info.max_payload,
        );
        put_reply(out, option, rep::ACK, &[]);
        if option == opt::INFO {
            return OptionOutcome::Continue;
        }
        let contexts = self.contexts_for(&req.name);
        OptionOutcome::Enter(Negotiated {
            info,
            export,
            flags,
            structured,
            extended: self.extended,
            contexts,
        })
    }

    fn meta_context<C: ExportCatalog>(
        &mut self,
        option: u32,
        payload: &[u8],
        out: &mut BytesMut,
        catalog: &C,
    ) {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            // A SET replaces the previous selection even when it fails.
            self.selection = None;
        }
        if !self.structured && !self.extended {
            put_error(
                out,
                option,
                rep::ERR_INVALID,
                "negotiate structured replies before meta contexts",
            );
            return;
        }
        let req = match parse_meta_context_request(payload) {
            Ok(r) => r,
            Err(e) => {
                put_error(out, option, rep::ERR_INVALID, &e.to_string());
                return;
            }
        };
        let Some((info, _)) = catalog.lookup(&req.export) else {
            put_error(
                out,
                option,
                rep::ERR_UNKNOWN,
                &format!("no export named {:?}", req.export),
            );
            return;
        };
        let mut chosen: Vec<MetaContext> = Vec::new();
        let offered = MetaContext::ALL.into_iter().filter(|c| info.offers(*c));
        if req.queries.is_empty() {
            // LIST with no query lists everything; SET with none selects nothing.
            if !set {
                chosen.extend(offered);
            }
        } else {
            for ctx in offered {
                let wanted = req
                    .queries
                    .iter()
                    .any(|q| q == ctx.name() || (!set && q == ctx.namespace()));
                if wanted {
                    chosen.push(ctx);
                }
            }
        }
        for ctx in &chosen {
            // LIST replies carry id 0 (reserved), SET replies the real id.
            let id = if set { ctx.id() } else { 0 };
            put_meta_context(out, option, id, ctx.name());
        }
        put_reply(out, option, rep::ACK, &[]);
        if set {
            self.selection = Some((req.export, chosen));
        }
    }

    /// Contexts that apply when entering transmission on `export`.
    fn contexts_for(&self, export: &str) -> Vec<MetaContext> {
        match &self.selection {
            Some((name, contexts)) if name == export => contexts.clone(),
            _ => Vec::new(),
        }
    }
}

fn is_known_option(option: u32) -> bool {
    matches!(
        option,
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

/// Copy a slice of known length into an array (callers index exact ranges).
fn fixed<const N: usize>(s: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(s);
    a
}

#[cfg(test)]
#[path = "handshake_tests.rs"]
mod tests;
