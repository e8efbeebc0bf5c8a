//! Daemon configuration: defaults, a TOML file, environment variables and
//! flags, in increasing precedence.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Which NBD ports backups may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortRange {
    /// Ports `first..=last`.
    Range {
        /// First port.
        first: u16,
        /// Last port (inclusive).
        last: u16,
    },
    /// Any free port the OS gives (port 0), at most `capacity` at a time.
    /// For tests and for hosts where a fixed range is not needed.
    Ephemeral {
        /// Most ports held at once.
        capacity: usize,
    },
}

impl PortRange {
    /// Parse `FIRST-LAST`, or `0` / `0:CAPACITY` for ephemeral ports.
    pub fn parse(s: &str) -> Result<PortRange, String> {
        let s = s.trim();
        if s == "0" {
            return Ok(PortRange::Ephemeral { capacity: 100 });
        }
        if let Some(cap) = s.strip_prefix("0:") {
            let capacity = cap
                .parse()
                .map_err(|_| format!("bad port capacity {cap:?}"))?;
            return Ok(PortRange::Ephemeral { capacity });
        }
        let (a, b) = s
            .split_once('-')
            .ok_or_else(|| format!("port range {s:?} is not FIRST-LAST"))?;
        let first: u16 = a.trim().parse().map_err(|_| format!("bad port {a:?}"))?;
        let last: u16 = b.trim().parse().map_err(|_| format!("bad port {b:?}"))?;
        if first == 0 || last < first {
            return Err(format!("port range {s:?} is empty or starts at 0"));
        }
        Ok(PortRange::Range { first, last })
    }

    /// How many ports the range holds.
    pub fn capacity(&self) -> usize {
        match *self {
            PortRange::Range { first, last } => usize::from(last - first) + 1,
            PortRange::Ephemeral { capacity } => capacity,
        }
    }
}

/// Everything the daemon needs to run.
#[derive(Debug, Clone)]
pub struct Config {
    /// HTTP API address.
    pub listen: SocketAddr,
    /// Data directory: catalog and default repository.
    pub data_dir: PathBuf,
    /// Where the catalog is (`None`: the SQLite file in the data
    /// directory, [`Config::catalog_path`]).
    pub catalog: Option<crate::catalog::CatalogUrl>,
    /// NBD ports for per-disk exports.
    pub nbd_ports: PortRange,
    /// Port serving every export by name (0 = off).
    pub nbd_shared_port: u16,
    /// Address NBD listeners bind to.
    pub nbd_bind: IpAddr,
    /// Host put into `nbd_targets_string`.
    pub advertise_host: String,
    /// A backup whose exports see no request for this long fails.
    pub idle_timeout: Duration,
    /// Memory and connection limits of the NBD server.
    pub nbd_limits: NbdLimits,
    /// Answer NBD_OPT_LIST with the export names (off: names are
    /// capabilities and stay secret).
    pub nbd_list_exports: bool,
    /// Serve the API on a non-loopback address even when no token exists
    /// (otherwise the daemon refuses to start there).
    pub insecure_no_auth: bool,
    /// Directories repositories may be created under (empty: the data
    /// directory).
    pub repository_roots: Vec<PathBuf>,
    /// NBD over TLS (default certificates directory: `<data dir>/tls`).
    pub nbd_tls: crate::tls::NbdTls,
    /// Serve the API over HTTPS with the server certificate of the same
    /// certificates directory.
    pub api_tls: bool,
    /// The backup appliance (hand-off contract) and how to reach it.
    pub sna: SnaConfig,
    /// Bytes a repository must keep free beyond a backup's estimate
    /// (`None`: 1 % of the filesystem, at most 1 GiB); see [`crate::space`].
    pub space_reserve: Option<u64>,
    /// Prune every VM with a policy and build due synthetic fulls this
    /// often (`None`: never on a schedule; `POST /api/v1/prune` still works).
    pub prune_interval: Option<Duration>,
    /// Scheduled verification and the verification read budget.
    pub verify: VerifyConfig,
    /// This hub's name in the fleet (default: the host name); see
    /// [`crate::catalog`]'s nodes.
    pub node_id: String,
    /// How long this node's heartbeat lease lasts; renewed every third of
    /// it. A node whose lease ran out is taken for dead by the others.
    pub node_lease: Duration,
}

/// The host name (the kernel's, read from procfs: no libc call), or
/// `localhost` where it cannot be read or is not a valid node id.
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| crate::names::validate("node_id", h).is_ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

/// A node lease in seconds: at least 1 s (renewals come every third).
pub fn node_lease(secs: u64) -> Result<Duration, String> {
    if secs == 0 {
        return Err("node_lease_secs must be at least 1".into());
    }
    Ok(Duration::from_secs(secs))
}

/// Scheduled verification (policies' `verify_every_days`) and the read
/// budget every verification shares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyConfig {
    /// How often the scheduler looks for restore points due (zero: never;
    /// on-demand verification still works).
    pub check_interval: Duration,
    /// Restore points the scheduler verifies at once.
    pub max_concurrent: usize,
    /// Verification read bytes/s while no backup runs (0 = unlimited).
    pub rate: u64,
    /// Verification read bytes/s while any backup runs (0 = unlimited).
    /// Low by default: a running backup keeps its throughput (see
    /// BENCHMARKS.md, "Scheduled verify next to a backup").
    pub rate_during_backup: u64,
}

impl Default for VerifyConfig {
    fn default() -> Self {
        VerifyConfig {
            check_interval: Duration::from_secs(3600),
            max_concurrent: 1,
            rate: 0,
            rate_during_backup: 16 << 20,
        }
    }
}

impl VerifyConfig {
    /// Set what is given (from a file, or flags and environment).
    pub fn apply(
        &mut self,
        check_interval_secs: Option<u64>,
        max_concurrent: Option<usize>,
        rate: Option<u64>,
        rate_during_backup: Option<u64>,
    ) -> Result<(), String> {
        if let Some(v) = check_interval_secs {
            self.check_interval = Duration::from_secs(v);
        }
        if let Some(v) = max_concurrent {
            if v == 0 {
                return Err("verify_max_concurrent must be at least 1".into());
            }
            self.max_concurrent = v;
        }
        if let Some(v) = rate {
            self.rate = v;
        }
        if let Some(v) = rate_during_backup {
            self.rate_during_backup = v;
        }
        Ok(())
    }
}

/// The hub's side of the appliance hand-off (`docs/sna-contract.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnaConfig {
    /// Default appliance for VMs registered without one (none: backups of
    /// such VMs are driven by the client, as without an appliance).
    pub url: Option<String>,
    /// Sent to the appliance as `Authorization: Bearer`.
    pub token: Option<crate::sna::SnaToken>,
    /// Longest wait for each prepare or start answer.
    pub timeout: Duration,
    /// Base URL the appliance reaches this hub's API at (default
    /// `http://{listen address}`).
    pub public_url: Option<String>,
}

impl Default for SnaConfig {
    fn default() -> Self {
        SnaConfig {
            url: None,
            token: None,
            timeout: Duration::from_secs(30),
            public_url: None,
        }
    }
}

/// Memory and connection limits of the NBD server (what
/// [`nbd_server::ServerConfig`] enforces), as the daemon configures them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NbdLimits {
    /// Bytes all connections together may hold in requests and replies.
    pub max_buffer_memory: u64,
    /// Bytes one connection may hold in requests and replies, WRITEs half
    /// of it (one larger request is still admitted alone).
    pub max_inflight_per_connection: u64,
    /// Most connections over all ports.
    pub max_connections: usize,
    /// Most connections on one port.
    pub max_connections_per_port: usize,
    /// Most connections to one export.
    pub max_connections_per_export: usize,
    /// Close an NBD connection with no request for this long (zero: never).
    pub idle_timeout: Duration,
    /// Close an NBD connection whose replies go unread for this long.
    pub send_timeout: Duration,
    /// Most time the handshake may go without progress, per option.
    pub handshake_timeout: Duration,
    /// Which clients get READ replies spliced from the page cache into
    /// the socket (`remote`, `always`, `never`).
    pub splice_reads: nbd_server::SpliceReads,
}

/// `remote`, `always` or `never`: see [`nbd_server::SpliceReads`].
pub fn parse_splice_reads(s: &str) -> Result<nbd_server::SpliceReads, String> {
    use nbd_server::SpliceReads;
    match s.trim().to_ascii_lowercase().as_str() {
        "remote" => Ok(SpliceReads::Remote),
        "always" => Ok(SpliceReads::Always),
        "never" => Ok(SpliceReads::Never),
        other => Err(format!(
            "splice_reads is remote, always or never, not {other:?}"
        )),
    }
}

impl Default for NbdLimits {
    fn default() -> Self {
        let s = nbd_server::ServerConfig::default();
        NbdLimits {
            max_buffer_memory: s.max_buffer_memory,
            max_inflight_per_connection: s.max_inflight_bytes_per_connection,
            max_connections: s.max_connections,
            max_connections_per_port: s.max_connections_per_listener,
            max_connections_per_export: s.max_connections_per_export,
            idle_timeout: s.idle_timeout,
            send_timeout: s.send_timeout,
            handshake_timeout: s.handshake_timeout,
            splice_reads: s.splice_reads,
        }
    }
}

impl NbdLimits {
    /// The server configuration these limits make.
    pub fn server_config(&self) -> nbd_server::ServerConfig {
        nbd_server::ServerConfig {
            max_buffer_memory: self.max_buffer_memory,
            max_inflight_bytes_per_connection: self.max_inflight_per_connection,
            max_connections: self.max_connections,
            max_connections_per_listener: self.max_connections_per_port,
            max_connections_per_export: self.max_connections_per_export,
            idle_timeout: self.idle_timeout,
            send_timeout: self.send_timeout,
            handshake_timeout: self.handshake_timeout,
            splice_reads: self.splice_reads,
            ..nbd_server::ServerConfig::default()
        }
    }
}

/// A size in a config file: bytes, or a string with a K/M/G/T suffix.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SizeValue {
    /// Bytes.
    Bytes(u64),
    /// `1G`, `512M`, ...
    Text(String),
}

impl SizeValue {
    fn bytes(&self) -> Result<u64, String> {
        match self {
            SizeValue::Bytes(b) => Ok(*b),
            SizeValue::Text(t) => crate::cli::size::parse_size(t),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 8082),
            data_dir: PathBuf::from("./data"),
            catalog: None,
            nbd_ports: PortRange::Range {
                first: 10100,
                last: 10200,
            },
            nbd_shared_port: 10809,
            nbd_bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise_host: "127.0.0.1".into(),
            idle_timeout: Duration::from_secs(3600),
            nbd_limits: NbdLimits::default(),
            nbd_list_exports: false,
            insecure_no_auth: false,
            repository_roots: Vec::new(),
            nbd_tls: Default::default(),
            api_tls: false,
            sna: SnaConfig::default(),
            space_reserve: None,
            prune_interval: Some(Duration::from_secs(3600)),
            verify: VerifyConfig::default(),
            node_id: host_name(),
            node_lease: Duration::from_secs(30),
        }
    }
}

impl Config {
    /// Path of the default SQLite catalog (in the data directory).
    pub fn catalog_path(&self) -> PathBuf {
        self.data_dir.join("catalog.sqlite")
    }

    /// Where the catalog is: the configured URL, or `sqlite:` the default
    /// file.
    pub fn catalog_url(&self) -> crate::catalog::CatalogUrl {
        self.catalog
            .clone()
            .unwrap_or_else(|| crate::catalog::CatalogUrl::Sqlite(self.catalog_path()))
    }

    /// Whether the API may be served without tokens: on a loopback
    /// address (local admin), or when the operator insists.
    pub fn open_without_tokens(&self) -> bool {
        self.listen.ip().is_loopback() || self.insecure_no_auth
    }

    /// Where repositories may be created: the configured roots, or the
    /// data directory.
    pub fn repository_roots(&self) -> Vec<PathBuf> {
        if self.repository_roots.is_empty() {
            vec![self.data_dir.clone()]
        } else {
            self.repository_roots.clone()
        }
    }

    /// Where `serve` looks for TLS credentials without `--tls-certificates`.
    pub fn default_tls_dir(&self) -> PathBuf {
        self.data_dir.join("tls")
    }

    /// The TLS credentials directory in use.
    pub fn tls_dir(&self) -> PathBuf {
        self.nbd_tls
            .certificates
            .clone()
            .unwrap_or_else(|| self.default_tls_dir())
    }

    /// `http` or `https`, as the API is served.
    pub fn api_scheme(&self) -> &'static str {
        if self.api_tls {
            "https"
        } else {
            "http"
        }
    }

    /// Path of the default repository.
    pub fn default_repository(&self) -> PathBuf {
        self.data_dir.join("repository")
    }
}

/// The TOML file's shape: every key optional, same names as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`Config::listen`].
    pub listen: Option<SocketAddr>,
    /// See [`Config::data_dir`].
    pub data_dir: Option<PathBuf>,
    /// See [`Config::catalog`]: `sqlite:PATH` or `postgres://…`.
    pub catalog: Option<String>,
    /// `FIRST-LAST` or `0`.
    pub nbd_ports: Option<String>,
    /// See [`Config::nbd_shared_port`].
    pub nbd_shared_port: Option<u16>,
    /// See [`Config::nbd_bind`].
    pub nbd_bind: Option<IpAddr>,
    /// See [`Config::advertise_host`].
    pub advertise_host: Option<String>,
    /// Seconds.
    pub idle_timeout_secs: Option<u64>,
    /// Bytes, or a size such as `"1G"`.
    pub max_buffer_memory: Option<SizeValue>,
    /// Bytes, or a size such as `"4M"`; see
    /// [`NbdLimits::max_inflight_per_connection`].
    pub max_inflight_per_connection: Option<SizeValue>,
    /// See [`NbdLimits::max_connections`].
    pub max_connections: Option<usize>,
    /// See [`NbdLimits::max_connections_per_port`].
    pub max_connections_per_port: Option<usize>,
    /// See [`NbdLimits::max_connections_per_export`].
    pub max_connections_per_export: Option<usize>,
    /// Seconds; see [`NbdLimits::idle_timeout`].
    pub nbd_idle_timeout_secs: Option<u64>,
    /// Seconds; see [`NbdLimits::send_timeout`].
    pub send_timeout_secs: Option<u64>,
    /// Seconds; see [`NbdLimits::handshake_timeout`].
    pub handshake_timeout_secs: Option<u64>,
    /// `remote`, `always` or `never`; see [`NbdLimits::splice_reads`].
    pub splice_reads: Option<String>,
    /// See [`Config::nbd_list_exports`].
    pub nbd_list_exports: Option<bool>,
    /// See [`Config::insecure_no_auth`].
    pub insecure_no_auth: Option<bool>,
    /// See [`Config::repository_roots`].
    pub repository_roots: Option<Vec<PathBuf>>,
    /// `"off"`, `"on"` or `"require"`.
    pub tls: Option<crate::tls::TlsSetting>,
    /// Credentials directory (nbdkit layout).
    pub tls_certificates: Option<PathBuf>,
    /// Demand client certificates.
    pub tls_verify_peer: Option<bool>,
    /// See [`Config::api_tls`].
    pub api_tls: Option<bool>,
    /// See [`SnaConfig::url`].
    pub sna_url: Option<String>,
    /// See [`SnaConfig::token`].
    pub sna_token: Option<String>,
    /// Seconds; see [`SnaConfig::timeout`].
    pub sna_timeout_secs: Option<u64>,
    /// See [`SnaConfig::public_url`].
    pub public_url: Option<String>,
    /// Bytes, or a size such as `"10G"`; see [`Config::space_reserve`].
    pub space_reserve: Option<SizeValue>,
    /// Seconds between scheduled prunes; 0 = off.
    pub prune_interval_secs: Option<u64>,
    /// Seconds; see [`VerifyConfig::check_interval`].
    pub verify_check_interval_secs: Option<u64>,
    /// See [`VerifyConfig::max_concurrent`].
    pub verify_max_concurrent: Option<usize>,
    /// Bytes/s, or a size such as `"64M"`; see [`VerifyConfig::rate`].
    pub verify_rate: Option<SizeValue>,
    /// Bytes/s, or a size; see [`VerifyConfig::rate_during_backup`].
    pub verify_rate_during_backup: Option<SizeValue>,
    /// See [`Config::node_id`].
    pub node_id: Option<String>,
    /// Seconds; see [`Config::node_lease`].
    pub node_lease_secs: Option<u64>,
}

impl FileConfig {
    /// Read a TOML file.
    pub fn load(path: &Path) -> Result<FileConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Apply the file's values on top of `c`.
    pub fn apply(self, c: &mut Config) -> Result<(), String> {
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = self.data_dir {
            c.data_dir = v;
        }
        if let Some(v) = self.catalog {
            c.catalog = Some(v.parse().map_err(|e| format!("catalog: {e}"))?);
        }
        if let Some(v) = self.nbd_ports {
            c.nbd_ports = PortRange::parse(&v)?;
        }
        if let Some(v) = self.nbd_shared_port {
            c.nbd_shared_port = v;
        }
        if let Some(v) = self.nbd_bind {
            c.nbd_bind = v;
        }
        if let Some(v) = self.advertise_host {
            c.advertise_host = v;
        }
        if let Some(v) = self.idle_timeout_secs {
            c.idle_timeout = Duration::from_secs(v);
        }
        let l = &mut c.nbd_limits;
        if let Some(v) = &self.max_buffer_memory {
            l.max_buffer_memory = v.bytes()?;
        }
        if let Some(v) = &self.max_inflight_per_connection {
            l.max_inflight_per_connection = v.bytes()?;
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
        if let Some(v) = self.nbd_idle_timeout_secs {
            l.idle_timeout = Duration::from_secs(v);
        }
        if let Some(v) = self.send_timeout_secs {
            l.send_timeout = Duration::from_secs(v);
        }
        if let Some(v) = self.handshake_timeout_secs {
            l.handshake_timeout = Duration::from_secs(v);
        }
        if let Some(v) = &self.splice_reads {
            l.splice_reads = parse_splice_reads(v)?;
        }
        if let Some(v) = self.nbd_list_exports {
            c.nbd_list_exports = v;
        }
        if let Some(v) = self.insecure_no_auth {
            c.insecure_no_auth = v;
        }
        if let Some(v) = self.repository_roots {
            c.repository_roots = v;
        }
        if let Some(v) = self.tls {
            c.nbd_tls.setting = v;
        }
        if let Some(v) = self.tls_certificates {
            c.nbd_tls.certificates = Some(v);
        }
        if let Some(v) = self.tls_verify_peer {
            c.nbd_tls.verify_peer = v;
        }
        if let Some(v) = self.api_tls {
            c.api_tls = v;
        }
        if let Some(v) = &self.space_reserve {
            c.space_reserve = Some(v.bytes()?);
        }
        if let Some(v) = self.prune_interval_secs {
            c.prune_interval = prune_interval(v);
        }
        if let Some(v) = self.node_id {
            crate::names::validate("node_id", &v)?;
            c.node_id = v;
        }
        if let Some(v) = self.node_lease_secs {
            c.node_lease = node_lease(v)?;
        }
        c.verify.apply(
            self.verify_check_interval_secs,
            self.verify_max_concurrent,
            self.verify_rate
                .as_ref()
                .map(SizeValue::bytes)
                .transpose()?,
            self.verify_rate_during_backup
                .as_ref()
                .map(SizeValue::bytes)
                .transpose()?,
        )?;
        c.sna.apply(
            self.sna_url,
            self.sna_token,
            self.sna_timeout_secs,
            self.public_url,
        )?;
        Ok(())
    }
}

/// A prune interval in seconds (0: off).
pub fn prune_interval(secs: u64) -> Option<Duration> {
    (secs > 0).then(|| Duration::from_secs(secs))
}

impl SnaConfig {
    /// Set what is given (from a file, or flags and environment), checking
    /// the URLs.
    pub fn apply(
        &mut self,
        url: Option<String>,
        token: Option<String>,
        timeout_secs: Option<u64>,
        public_url: Option<String>,
    ) -> Result<(), String> {
        if let Some(v) = url {
            self.url = Some(crate::sna::check_url("sna_url", &v)?);
        }
        if let Some(v) = token {
            self.token = Some(crate::sna::SnaToken::new(v)?);
        }
        if let Some(v) = timeout_secs {
            if v == 0 {
                return Err("sna_timeout must be at least 1 second".into());
            }
            self.timeout = Duration::from_secs(v);
        }
        if let Some(v) = public_url {
            self.public_url = Some(crate::sna::check_url("public_url", &v)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_interval_defaults_to_an_hour_and_zero_turns_it_off() {
        assert_eq!(
            Config::default().prune_interval,
            Some(Duration::from_secs(3600))
        );
        let mut c = Config::default();
        let f: FileConfig = toml::from_str("prune_interval_secs = 0").unwrap();
        f.apply(&mut c).unwrap();
        assert_eq!(c.prune_interval, None);
        let f: FileConfig = toml::from_str("prune_interval_secs = 60").unwrap();
        f.apply(&mut c).unwrap();
        assert_eq!(c.prune_interval, Some(Duration::from_secs(60)));
    }

    #[test]
    fn port_ranges() {
        assert_eq!(
            PortRange::parse("10100-10200"),
            Ok(PortRange::Range {
                first: 10100,
                last: 10200
            })
        );
        assert_eq!(PortRange::parse("10100-10200").unwrap().capacity(), 101);
        assert_eq!(
            PortRange::parse("0"),
            Ok(PortRange::Ephemeral { capacity: 100 })
        );
        assert_eq!(
            PortRange::parse("0:3"),
            Ok(PortRange::Ephemeral { capacity: 3 })
        );
        for bad in ["", "10", "10-5", "0-5", "a-b", "1-70000"] {
            assert!(PortRange::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_overrides_defaults() {
        let f: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\nnbd_ports = \"20000-20010\"\nidle_timeout_secs = 5",
        )
        .unwrap();
        let mut c = Config::default();
        f.apply(&mut c).unwrap();
        assert_eq!(c.listen.port(), 9000);
        assert_eq!(c.nbd_ports.capacity(), 11);
        assert_eq!(c.idle_timeout, Duration::from_secs(5));
        assert!(toml::from_str::<FileConfig>("bogus = 1").is_err());
    }

    #[test]
    fn file_sets_nbd_limits() {
        let f: FileConfig = toml::from_str(
            "max_buffer_memory = \"256M\"\nmax_connections = 10\nmax_connections_per_port = 5\n\
             max_connections_per_export = 3\nnbd_idle_timeout_secs = 7\nsend_timeout_secs = 8\n\
             handshake_timeout_secs = 9\nmax_inflight_per_connection = \"16M\"\n\
             splice_reads = \"Never\"",
        )
        .unwrap();
        let mut c = Config::default();
        f.apply(&mut c).unwrap();
        let l = c.nbd_limits;
        assert_eq!(l.max_buffer_memory, 256 << 20);
        assert_eq!(l.max_inflight_per_connection, 16 << 20);
        assert_eq!(l.splice_reads, nbd_server::SpliceReads::Never);
        let bad: FileConfig = toml::from_str("splice_reads = \"sometimes\"").unwrap();
        assert!(bad.apply(&mut Config::default()).is_err());
        assert_eq!(
            (
                l.max_connections,
                l.max_connections_per_port,
                l.max_connections_per_export
            ),
            (10, 5, 3)
        );
        assert_eq!(l.idle_timeout, Duration::from_secs(7));
        assert_eq!(l.send_timeout, Duration::from_secs(8));
        assert_eq!(l.handshake_timeout, Duration::from_secs(9));
        let s = l.server_config();
        assert_eq!(s.max_connections_per_listener, 5);
        assert_eq!(s.max_inflight_bytes_per_connection, 16 << 20);
        let f: FileConfig = toml::from_str("max_buffer_memory = 1048576").unwrap();
        f.apply(&mut c).unwrap();
        assert_eq!(c.nbd_limits.max_buffer_memory, 1 << 20);
        let f: FileConfig = toml::from_str("max_buffer_memory = \"lots\"").unwrap();
        assert!(f.apply(&mut c).is_err());
    }

    #[test]
    fn security_keys_and_secure_defaults() {
        let c = Config::default();
        assert!(!c.nbd_list_exports && !c.insecure_no_auth);
        assert!(
            c.open_without_tokens(),
            "loopback API is open without tokens"
        );
        assert_eq!(c.repository_roots(), vec![c.data_dir.clone()]);
        let f: FileConfig = toml::from_str(
            "listen = \"0.0.0.0:8082\"\nnbd_list_exports = true\n\
             repository_roots = [\"/srv/a\", \"/srv/b\"]",
        )
        .unwrap();
        let mut c = Config::default();
        f.apply(&mut c).unwrap();
        assert!(c.nbd_list_exports);
        assert!(!c.open_without_tokens(), "0.0.0.0 needs tokens");
        assert_eq!(
            c.repository_roots(),
            vec![PathBuf::from("/srv/a"), PathBuf::from("/srv/b")]
        );
        let f: FileConfig = toml::from_str("insecure_no_auth = true").unwrap();
        let mut c = Config {
            listen: "[::]:1".parse().unwrap(),
            ..Config::default()
        };
        f.apply(&mut c).unwrap();
        assert!(c.open_without_tokens());
    }

    /// `dist/hub-daemon.toml` names every key (so none is undocumented)
    /// and every value in it parses.
    #[test]
    fn the_example_config_has_every_key() {
        let text: String = include_str!("../../dist/hub-daemon.toml")
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.contains(" = ") && !l.starts_with('#'))
            .map(|l| format!("{l}\n"))
            .collect();
        let f: FileConfig = toml::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let shown = format!("{f:?}");
        assert!(
            !shown.contains("None"),
            "a key is missing from the example: {shown}"
        );
        f.apply(&mut Config::default()).unwrap();
    }

    #[test]
    fn tls_keys_from_the_file() {
        let c = Config::default();
        assert!(!c.nbd_tls.enabled() && !c.api_tls, "TLS is opt-in");
        assert_eq!(c.tls_dir(), c.data_dir.join("tls"));
        let f: FileConfig = toml::from_str(
            "tls = \"require\"\ntls_certificates = \"/etc/hub/tls\"\n\
             tls_verify_peer = true\napi_tls = true",
        )
        .unwrap();
        let mut c = Config::default();
        f.apply(&mut c).unwrap();
        assert_eq!(c.nbd_tls.setting, crate::tls::TlsSetting::Require);
        assert!(c.nbd_tls.verify_peer && c.api_tls);
        assert_eq!(c.tls_dir(), PathBuf::from("/etc/hub/tls"));
        assert_eq!(c.api_scheme(), "https");
        assert!(toml::from_str::<FileConfig>("tls = \"maybe\"").is_err());
    }

    #[test]
    fn file_sets_scheduled_verify() {
        let mut c = Config::default();
        assert_eq!(c.verify, VerifyConfig::default());
        let f: FileConfig = toml::from_str(
            "verify_check_interval_secs = 60\nverify_max_concurrent = 2\n\
             verify_rate = \"128M\"\nverify_rate_during_backup = 1048576",
        )
        .unwrap();
        f.apply(&mut c).unwrap();
        assert_eq!(c.verify.check_interval, Duration::from_secs(60));
        assert_eq!(c.verify.max_concurrent, 2);
        assert_eq!(c.verify.rate, 128 << 20);
        assert_eq!(c.verify.rate_during_backup, 1 << 20);
        for bad in ["verify_max_concurrent = 0", "verify_rate = \"fast\""] {
            let f: FileConfig = toml::from_str(bad).unwrap();
            assert!(f.apply(&mut Config::default()).is_err(), "{bad}");
        }
    }

    #[test]
    fn file_sets_the_appliance() {
        let mut c = Config::default();
        assert_eq!(c.sna, SnaConfig::default());
        let f: FileConfig = toml::from_str(
            "sna_url = \"http://sna.example:8443/\"\nsna_token = \"s3cret\"\n\
             sna_timeout_secs = 7\npublic_url = \"http://10.0.0.5:8082\"",
        )
        .unwrap();
        f.apply(&mut c).unwrap();
        assert_eq!(c.sna.url.as_deref(), Some("http://sna.example:8443"));
        assert_eq!(c.sna.timeout, Duration::from_secs(7));
        assert_eq!(c.sna.public_url.as_deref(), Some("http://10.0.0.5:8082"));
        assert!(
            !format!("{c:?}").contains("s3cret"),
            "the token is never shown"
        );
        for bad in [
            "sna_url = \"ftp://x\"",
            "sna_timeout_secs = 0",
            "public_url = \"http://x/?q\"",
        ] {
            let f: FileConfig = toml::from_str(bad).unwrap();
            assert!(f.apply(&mut Config::default()).is_err(), "{bad}");
        }
    }
}
