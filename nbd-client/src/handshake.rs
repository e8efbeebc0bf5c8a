//! The handshake driver: fixed newstyle, then extended headers (or
//! structured replies as the fallback), `base:allocation` and any other
//! metadata contexts asked for, and `GO` with
//! block sizes (falling back to `EXPORT_NAME` for servers without `GO`).
//! Message formats live in [`crate::option_wire`].

use nbd_server::proto::consts::{
    client_flags, handshake_flags, info, opt, rep, CONTEXT_BASE_ALLOCATION, EXPORT_NAME_PADDING,
    GREETING_LEN, MAX_PAYLOAD,
};
use nbd_server::proto::ReplyMode;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{ClientError, HandshakeError};
use crate::option_wire::{self as wire, Info, OPTION_REPLY_HEADER_LEN};

/// What to negotiate.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Export name ("" is the server's default export).
    pub export: String,
    /// Try 64-bit extended headers (falls back when refused).
    pub extended_headers: bool,
    /// Ask for structured replies (sparse reads, block status).
    pub structured_replies: bool,
    /// Select `base:allocation` (needs structured replies).
    pub block_status: bool,
    /// Further metadata contexts to select, by exact name (for example
    /// `qemu:dirty-bitmap:NAME`; needs structured replies). A context the
    /// server does not offer is not a handshake error: asking for its
    /// status fails with [`ClientError::NoMetaContext`], and
    /// [`crate::Client::meta_context`] tells beforehand.
    pub meta_contexts: Vec<String>,
    /// Most requests in flight on the connection.
    pub max_in_flight: usize,
    /// Most payload bytes (write data sent plus read data expected) in
    /// flight; raised to the maximum payload if smaller.
    pub max_in_flight_bytes: usize,
    /// Upgrade to TLS with `STARTTLS` before anything else (a server that
    /// refuses fails the connection: no silent plaintext fallback).
    pub tls: Option<crate::tls::ClientTls>,
}

impl ConnectOptions {
    /// Defaults for `export`: everything on, 64 requests / 64 MiB in flight.
    pub fn new(export: impl Into<String>) -> Self {
        ConnectOptions {
            export: export.into(),
            extended_headers: true,
            structured_replies: true,
            block_status: true,
            meta_contexts: Vec::new(),
            max_in_flight: 64,
            max_in_flight_bytes: 64 << 20,
            tls: None,
        }
    }
}

/// What the handshake settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExportInfo {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags (`NBD_FLAG_*`).
    pub flags: u16,
    /// Minimum block size (alignment the server requires).
    pub min_block: u32,
    /// Preferred block size.
    pub preferred_block: u32,
    /// Largest READ/WRITE payload: the server's maximum, capped at 32 MiB.
    pub max_payload: u32,
    /// Reply framing.
    pub mode: ReplyMode,
    /// Id of the `base:allocation` context, if selected.
    pub base_allocation: Option<u32>,
}

/// A metadata context the server selected: its name and the id its
/// block-status chunks carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContext {
    /// Name, as the server replied it.
    pub name: String,
    /// Id.
    pub id: u32,
}

impl ExportInfo {
    /// Whether transmission flag `flag` is set.
    pub fn has(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }
}

/// Most metadata contexts accepted from one `SET_META_CONTEXT` (we ask
/// for a few exact names; a namespace query could select more).
const MAX_META_CONTEXTS: usize = 64;

struct Driver<'a, S> {
    s: &'a mut S,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Driver<'_, S> {
    async fn send(&mut self, option: u32, payload: &[u8]) -> Result<(), ClientError> {
        self.s
            .write_all(&wire::encode_option(option, payload))
            .await?;
        self.s.flush().await?;
        Ok(())
    }

    /// One option reply: type and payload (bounded by the header check).
    async fn reply(&mut self, option: u32) -> Result<(u32, Vec<u8>), ClientError> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).await?;
        let hdr = wire::parse_reply_header(&h, option)?;
        let mut p = vec![0u8; hdr.len as usize];
        self.s.read_exact(&mut p).await?;
        Ok((hdr.reply, p))
    }

    /// Send an option that is answered by a single ACK; `Ok(false)` if the
    /// server refused it with an error reply.
    async fn simple_option(&mut self, option: u32) -> Result<bool, ClientError> {
        self.send(option, &[]).await?;
        let (reply, _) = self.reply(option).await?;
        match reply {
            rep::ACK => Ok(true),
            r if wire::is_error(r) => Ok(false),
            r => Err(HandshakeError::UnexpectedReply { option, reply: r }.into()),
        }
    }

    /// Select `queries`; the contexts the server agreed to (none if it
    /// refused the option).
    async fn set_meta_context(
        &mut self,
        export: &str,
        queries: &[&str],
    ) -> Result<Vec<MetaContext>, ClientError> {
        let option = opt::SET_META_CONTEXT;
        let payload = wire::meta_context_payload(export, queries)?;
        self.send(option, &payload).await?;
        let mut selected: Vec<MetaContext> = Vec::new();
        loop {
            let (reply, p) = self.reply(option).await?;
            match reply {
                rep::META_CONTEXT => {
                    let (id, name) = wire::parse_meta_context(&p)?;
                    // Every reply is kept (the server will send status for
                    // each), but a repeated id or name, or more than a
                    // generous bound, is a server growing the list without
                    // end.
                    if selected.iter().any(|c| c.id == id || c.name == name)
                        || selected.len() >= MAX_META_CONTEXTS
                    {
                        return Err(HandshakeError::Malformed("NBD_REP_META_CONTEXT").into());
                    }
                    selected.push(MetaContext { name, id });
                }
                rep::ACK => return Ok(selected),
                r if wire::is_error(r) => return Ok(Vec::new()),
                r => return Err(HandshakeError::UnexpectedReply { option, reply: r }.into()),
            }
        }
    }

    /// `GO`: `Ok(None)` if the server does not know the option.
    async fn go(&mut self, export: &str) -> Result<Option<(u64, u16, Info)>, ClientError> {
        let option = opt::GO;
        self.send(option, &wire::go_payload(export, &[info::BLOCK_SIZE])?)
            .await?;
        let mut export_info = None;
        let mut sizes = Info::Other;
        loop {
            let (reply, p) = self.reply(option).await?;
            match reply {
                rep::INFO => match wire::parse_info(&p)? {
                    Info::Export { size, flags } => export_info = Some((size, flags)),
                    b @ Info::BlockSize { .. } => sizes = b,
                    Info::Other => {}
                },
                rep::ACK => {
                    let (size, flags) = export_info.ok_or(HandshakeError::NoExportInfo)?;
                    return Ok(Some((size, flags, sizes)));
                }
                rep::ERR_UNSUP => return Ok(None),
                r if wire::is_error(r) => {
                    return Err(HandshakeError::Refused {
                        option,
                        reply: r,
                        message: String::from_utf8_lossy(&p).into_owned(),
                    }
                    .into())
                }
                r => return Err(HandshakeError::UnexpectedReply { option, reply: r }.into()),
            }
        }
    }

    /// Old-style `EXPORT_NAME`: no error path (the server hangs up).
    async fn export_name(
        &mut self,
        export: &str,
        no_zeroes: bool,
    ) -> Result<(u64, u16), ClientError> {
        if export.len() > nbd_server::proto::consts::MAX_STRING_LEN {
            return Err(HandshakeError::NameTooLong(export.len()).into());
        }
        self.send(opt::EXPORT_NAME, export.as_bytes()).await?;
        let mut r = [0u8; 10];
        self.s.read_exact(&mut r).await?;
        if !no_zeroes {
            let mut pad = [0u8; EXPORT_NAME_PADDING];
            self.s.read_exact(&mut pad).await?;
        }
        Ok(wire::parse_export_name_reply(&r))
    }
}

/// Read the greeting and send our flags; returns whether the server
/// omits the export-name padding.
pub(crate) async fn greet<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<bool, ClientError> {
    let mut g = [0u8; GREETING_LEN];
    s.read_exact(&mut g).await?;
    let server_flags = wire::parse_greeting(&g)?;
    let no_zeroes = server_flags & handshake_flags::NO_ZEROES != 0;
    let mut cflags = client_flags::FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= client_flags::NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).await?;
    Ok(no_zeroes)
}

/// `STARTTLS`: `Ok` once the server acknowledged (run the TLS handshake
/// next); a refusal is an error, never a fallback to plaintext.
pub(crate) async fn starttls<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
) -> Result<(), ClientError> {
    let mut d = Driver { s };
    let option = opt::STARTTLS;
    d.send(option, &[]).await?;
    let (reply, p) = d.reply(option).await?;
    match reply {
        rep::ACK => Ok(()),
        r if wire::is_error(r) => Err(HandshakeError::Refused {
            option,
            reply: r,
            message: String::from_utf8_lossy(&p).into_owned(),
        }
        .into()),
        r => Err(HandshakeError::UnexpectedReply { option, reply: r }.into()),
    }
}

/// What the handshake settled, with the selected metadata contexts.
pub(crate) type Negotiated = (ExportInfo, Vec<MetaContext>);

/// Negotiate on `s` up to transmission (greeting included).
pub(crate) async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    opts: &ConnectOptions,
) -> Result<Negotiated, ClientError> {
    let no_zeroes = greet(s).await?;
    haggle(s, opts, no_zeroes).await
}

/// Option haggling after the greeting (and after STARTTLS, inside TLS).
pub(crate) async fn haggle<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    opts: &ConnectOptions,
    no_zeroes: bool,
) -> Result<Negotiated, ClientError> {
    let mut d = Driver { s };
    let extended = opts.extended_headers && d.simple_option(opt::EXTENDED_HEADERS).await?;
    let structured =
        extended || (opts.structured_replies && d.simple_option(opt::STRUCTURED_REPLY).await?);
    let mut queries: Vec<&str> = Vec::new();
    if opts.block_status {
        queries.push(CONTEXT_BASE_ALLOCATION);
    }
    for q in &opts.meta_contexts {
        if !queries.contains(&q.as_str()) {
            queries.push(q);
        }
    }
    let contexts = if structured && !queries.is_empty() {
        d.set_meta_context(&opts.export, &queries).await?
    } else {
        Vec::new()
    };
    let base_allocation = contexts
        .iter()
        .find(|c| c.name == CONTEXT_BASE_ALLOCATION)
        .map(|c| c.id);
    let (size, flags, sizes) = match d.go(&opts.export).await? {
        Some(r) => r,
        None => {
            let (size, flags) = d.export_name(&opts.export, no_zeroes).await?;
            (size, flags, Info::Other)
        }
    };
    // Without block sizes the spec's defaults apply: 1, 4096, 32 MiB.
    let (min_block, preferred_block, max) = match sizes {
        Info::BlockSize {
            min,
            preferred,
            max,
        } => (min, preferred, max),
        _ => (1, 4096, MAX_PAYLOAD),
    };
    let info = ExportInfo {
        size,
        flags,
        min_block,
        preferred_block,
        max_payload: max.min(MAX_PAYLOAD),
        mode: ReplyMode::from_negotiation(structured, extended),
        base_allocation,
    };
    Ok((info, contexts))
}
