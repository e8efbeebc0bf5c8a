//! The NBD memory and connection limit flags, shared by `serve` and
//! `export`. Each flag also reads a `HUB_*` environment variable; a flag
//! given on the command line wins over the variable.

use std::time::Duration;

use clap::Args;

use super::size::parse_size;
use crate::config::{parse_splice_reads, NbdLimits};

/// NBD limits; unset ones keep the value from the config file or default.
#[derive(Debug, Clone, Default, Args)]
pub struct LimitArgs {
    /// Bytes all NBD connections together may hold in requests and replies
    /// (e.g. 1G) [default: 1G].
    #[arg(long, env = "HUB_MAX_BUFFER_MEMORY", value_name = "SIZE", value_parser = parse_size)]
    max_buffer_memory: Option<u64>,
    /// Bytes one NBD connection may hold in requests and replies (WRITEs
    /// half of it); raise it for links with a long round trip (e.g. 32M)
    /// [default: 8M].
    #[arg(long, env = "HUB_MAX_INFLIGHT_PER_CONNECTION", value_name = "SIZE", value_parser = parse_size)]
    max_inflight_per_connection: Option<u64>,
    /// Most NBD connections over all ports; at the limit the longest-idle
    /// connection is closed for a new one [default: 4096].
    #[arg(long, env = "HUB_MAX_CONNECTIONS", value_name = "N")]
    max_connections: Option<usize>,
    /// Most NBD connections on one port [default: 1024].
    #[arg(long, env = "HUB_MAX_CONNECTIONS_PER_PORT", value_name = "N")]
    max_connections_per_port: Option<usize>,
    /// Most NBD connections to one export [default: 256].
    #[arg(long, env = "HUB_MAX_CONNECTIONS_PER_EXPORT", value_name = "N")]
    max_connections_per_export: Option<usize>,
    /// Close an NBD connection with no request for this many seconds; 0
    /// never [default: 3600].
    #[arg(long, env = "HUB_NBD_IDLE_TIMEOUT", value_name = "SECS")]
    nbd_idle_timeout: Option<u64>,
    /// Close an NBD connection whose replies go unread for this many
    /// seconds; 0 never [default: 60].
    #[arg(long, env = "HUB_SEND_TIMEOUT", value_name = "SECS")]
    send_timeout: Option<u64>,
    /// Most seconds the NBD handshake may go without progress, per option
    /// [default: 10].
    #[arg(long, env = "HUB_HANDSHAKE_TIMEOUT", value_name = "SECS")]
    handshake_timeout: Option<u64>,
    /// Which NBD clients get READ data spliced from the page cache into
    /// the socket without a copy: remote (not loopback), always or never
    /// [default: remote].
    #[arg(long, env = "HUB_SPLICE_READS", value_name = "WHO", value_parser = parse_splice_reads)]
    splice_reads: Option<nbd_server::SpliceReads>,
}

impl LimitArgs {
    /// Override `l` with every limit given.
    pub fn apply(&self, l: &mut NbdLimits) {
        if let Some(v) = self.max_buffer_memory {
            l.max_buffer_memory = v;
        }
        if let Some(v) = self.max_inflight_per_connection {
            l.max_inflight_per_connection = v;
        }
        if let Some(v) = self.max_connections {
            l.max_connections = v;
        }
        if let Some(v) = self.max_connections_per_port {
            l.max_connections_per_port = v;
        }
        if let Some(v) = self.max_connections_per_export {
            l.max_connections_per_export = v;
        }
        if let Some(v) = self.nbd_idle_timeout {
            l.idle_timeout = Duration::from_secs(v);
        }
        if let Some(v) = self.send_timeout {
            l.send_timeout = Duration::from_secs(v);
        }
        if let Some(v) = self.handshake_timeout {
            l.handshake_timeout = Duration::from_secs(v);
        }
        if let Some(v) = self.splice_reads {
            l.splice_reads = v;
        }
    }
}
