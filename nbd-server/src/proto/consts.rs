//! Wire constants of the NBD protocol (`doc/proto.md`, including the
//! extended-headers extension). Names follow the spec with the `NBD_` prefix
//! dropped, so `NBD_OPT_GO` is [`opt::GO`].

/// `NBDMAGIC`: first 8 bytes of every newstyle greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: second greeting word, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (28-byte) request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (32-byte) request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple (16-byte) reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured (20-byte header) reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended (32-byte header) reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

/// Length of the server greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Length of an option request header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Length of a compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;
/// Zero padding after an `EXPORT_NAME` reply unless both sides chose NO_ZEROES.
pub const EXPORT_NAME_PADDING: usize = 124;

/// Longest string (export name, description, context name, error message)
/// the spec allows.
pub const MAX_STRING_LEN: usize = 4096;
/// Largest option payload we buffer. The biggest legitimate option is a
/// `SET_META_CONTEXT` with a 4 KiB name and a few queries; anything beyond
/// this is refused with `ERR_TOO_BIG` and the connection is closed, so no
/// option can make us allocate more than this.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Most meta-context queries accepted in one option.
pub const MAX_META_QUERIES: u32 = 128;
/// Largest READ/WRITE payload we accept (and advertise): 32 MiB, the value
/// every client treats as safe (spec "Size constraints").
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size we advertise.
pub const PREFERRED_BLOCK: u32 = 4096;
/// Most extents returned in one block-status chunk (spec: SHOULD NOT exceed 2^20).
pub const MAX_EXTENTS: usize = 1 << 20;

/// Handshake flags sent by the server.
pub mod handshake_flags {
    /// `NBD_FLAG_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// `NBD_FLAG_NO_ZEROES`.
    pub const NO_ZEROES: u16 = 1 << 1;
}

/// Client flags sent in reply to the greeting.
pub mod client_flags {
    /// `NBD_FLAG_C_FIXED_NEWSTYLE`.
    pub const FIXED_NEWSTYLE: u32 = 1 << 0;
    /// `NBD_FLAG_C_NO_ZEROES`.
    pub const NO_ZEROES: u32 = 1 << 1;
}

/// Transmission flags (`NBD_FLAG_*`), sent with the export size.
pub mod tx_flags {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// Export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// Hint: rotational medium.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// WRITE_ZEROES (and NO_HOLE) is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// READ accepts DF (only with structured replies).
    pub const SEND_DF: u16 = 1 << 7;
    /// FLUSH on one connection covers all of them.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// Experimental RESIZE (never set by us).
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// CACHE is supported.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// WRITE_ZEROES accepts FAST_ZERO.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
    /// BLOCK_STATUS accepts a payload (extended headers only; never set by us).
    pub const BLOCK_STATUS_PAYLOAD: u16 = 1 << 12;
}

/// Option codes (`NBD_OPT_*`).
pub mod opt {
    /// Choose an export and enter transmission (no error path).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Withdrawn; treated as unknown.
    pub const PEEK_EXPORT: u32 = 4;
    /// Start TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export.
    pub const INFO: u32 = 6;
    /// Ask about an export and enter transmission.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List metadata contexts.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select metadata contexts.
    pub const SET_META_CONTEXT: u32 = 10;
    /// Use 64-bit extended headers.
    pub const EXTENDED_HEADERS: u32 = 11;
}

/// Option reply types (`NBD_REP_*`).
pub mod rep {
    /// Success / end of list.
    pub const ACK: u32 = 1;
    /// One export in a LIST reply.
    pub const SERVER: u32 = 2;
    /// One information item in an INFO/GO reply.
    pub const INFO: u32 = 3;
    /// One metadata context.
    pub const META_CONTEXT: u32 = 4;
    const ERR: u32 = 1 << 31;
    /// Unknown option.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// TLS required first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// Server shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// Client must ask for block sizes first.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// Request or reply too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;
    /// Extended headers required.
    pub const ERR_EXT_HEADER_REQD: u32 = ERR | 10;
}

/// Information types inside `NBD_REP_INFO` (`NBD_INFO_*`).
pub mod info {
    /// Size and transmission flags (mandatory).
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Command types (`NBD_CMD_*`).
pub mod cmd {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Soft disconnect.
    pub const DISC: u16 = 2;
    /// Flush to stable storage.
    pub const FLUSH: u16 = 3;
    /// Discard hint.
    pub const TRIM: u16 = 4;
    /// Prefetch hint.
    pub const CACHE: u16 = 5;
    /// Write zeroes without payload.
    pub const WRITE_ZEROES: u16 = 6;
    /// Query block status.
    pub const BLOCK_STATUS: u16 = 7;
}

/// Command flags (`NBD_CMD_FLAG_*`).
pub mod cmd_flags {
    /// Force unit access.
    pub const FUA: u16 = 1 << 0;
    /// WRITE_ZEROES must not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// READ reply must be one content chunk.
    pub const DF: u16 = 1 << 2;
    /// BLOCK_STATUS: one extent only.
    pub const REQ_ONE: u16 = 1 << 3;
    /// WRITE_ZEROES: fail with ENOTSUP unless fast.
    pub const FAST_ZERO: u16 = 1 << 4;
    /// Extended headers: the length field is a payload length.
    pub const PAYLOAD_LEN: u16 = 1 << 5;
}

/// Structured reply chunk types (`NBD_REPLY_TYPE_*`).
pub mod reply_type {
    /// Final empty chunk.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// A range reading as zeroes.
    pub const OFFSET_HOLE: u16 = 2;
    /// Block status, 32-bit descriptors.
    pub const BLOCK_STATUS: u16 = 5;
    /// Block status, 64-bit descriptors (extended headers).
    pub const BLOCK_STATUS_EXT: u16 = 6;
    /// Error without offset.
    pub const ERROR: u16 = (1 << 15) | 1;
    /// Error at an offset.
    pub const ERROR_OFFSET: u16 = (1 << 15) | 2;
}

/// Structured reply flags.
pub mod reply_flags {
    /// Last chunk of the reply.
    pub const DONE: u16 = 1 << 0;
}

/// `base:allocation` status bits.
pub mod state {
    /// Not allocated in the backing storage.
    pub const HOLE: u32 = 1 << 0;
    /// Reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// Name of the one standard metadata context.
pub const CONTEXT_BASE_ALLOCATION: &str = "base:allocation";
/// qemu's allocation-depth context: 0 unallocated, 1 top layer, 2 first backing, ...
pub const CONTEXT_QEMU_ALLOCATION_DEPTH: &str = "qemu:allocation-depth";
