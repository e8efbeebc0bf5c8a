//! `hub-daemon serve`: the backup hub with its API.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::limits::LimitArgs;
use super::tls::TlsArgs;
use crate::app::Daemon;
use crate::config::{Config, FileConfig, PortRange};

/// Run the hub: VM-level backup API plus every NBD export, in one process.
/// Precedence: flags, then environment, then the config file, then defaults.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "HUB_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// API address [default: 127.0.0.1:8082].
    #[arg(long, env = "HUB_LISTEN", value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Data directory: catalog and default repository [default: ./data].
    #[arg(long, env = "HUB_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Catalog: sqlite:PATH or postgres://USER[:PASSWORD]@HOST:PORT/DB
    /// [default: sqlite:DATA_DIR/catalog.sqlite].
    // Parsed in `config`, not by clap: clap's error would echo the URL,
    // password and all.
    #[arg(long, env = "HUB_CATALOG", value_name = "URL", hide_env_values = true)]
    catalog: Option<String>,
    /// NBD port range for per-disk exports, FIRST-LAST; 0 for any free
    /// ports [default: 10100-10200].
    #[arg(long, env = "HUB_NBD_PORTS", value_name = "FIRST-LAST", value_parser = PortRange::parse)]
    nbd_ports: Option<PortRange>,
    /// Port serving every export by name; 0 turns it off [default: 10809].
    #[arg(long, env = "HUB_NBD_SHARED_PORT", value_name = "PORT")]
    nbd_shared_port: Option<u16>,
    /// Address NBD listeners bind to [default: 127.0.0.1].
    #[arg(long, env = "HUB_NBD_BIND", value_name = "ADDR")]
    nbd_bind: Option<IpAddr>,
    /// Host written into nbd_targets_string [default: 127.0.0.1].
    #[arg(long, env = "HUB_ADVERTISE_HOST", value_name = "HOST")]
    advertise_host: Option<String>,
    /// Fail a backup whose exports see no NBD request for this many seconds
    /// [default: 3600].
    #[arg(long, env = "HUB_IDLE_TIMEOUT", value_name = "SECS")]
    idle_timeout: Option<u64>,
    /// NBD memory and connection limits.
    #[command(flatten)]
    limits: LimitArgs,
    /// NBD over TLS.
    #[command(flatten)]
    tls: TlsArgs,
    /// Serve the API over HTTPS with server-cert.pem and server-key.pem of
    /// the TLS certificates directory.
    #[arg(long, env = "HUB_API_TLS")]
    api_tls: bool,
    /// Space a repository must keep free beyond a backup's estimate, e.g.
    /// 10G [default: 1 % of the filesystem, at most 1G].
    #[arg(long, env = "HUB_SPACE_RESERVE", value_name = "SIZE", value_parser = super::size::parse_size)]
    space_reserve: Option<u64>,
    /// Prune every VM with a retention policy, and build due synthetic
    /// fulls, every this many seconds; 0 = never on a schedule
    /// [default: 3600].
    #[arg(long, env = "HUB_PRUNE_INTERVAL", value_name = "SECS")]
    prune_interval: Option<u64>,
    /// This hub's name in a fleet sharing one PostgreSQL catalog
    /// [default: the host name].
    #[arg(long, env = "HUB_NODE_ID", value_name = "NAME")]
    node_id: Option<String>,
    /// Heartbeat lease of this node, seconds: a node not heard from this
    /// long is taken for dead and its running backups fail [default: 30].
    #[arg(long, env = "HUB_NODE_LEASE", value_name = "SECS")]
    node_lease: Option<u64>,
    /// Check the configuration (file, environment, flags, TLS credentials,
    /// directories) and exit: 0 if the hub would start with it.
    #[arg(long)]
    check_config: bool,
    /// Let NBD clients list the exports (NBD_OPT_LIST); off by default,
    /// since export names are the capability to reach a disk.
    #[arg(long, env = "HUB_NBD_LIST_EXPORTS")]
    nbd_list_exports: bool,
    /// Serve the API on a non-loopback address even though no API token
    /// exists (anyone who reaches the address can do anything).
    #[arg(long, env = "HUB_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// Directory under which repositories may be created (repeatable; the
    /// environment variable takes a colon-separated list) [default: the
    /// data directory].
    #[arg(
        long = "repository-root",
        env = "HUB_REPOSITORY_ROOTS",
        value_name = "DIR",
        value_delimiter = ':'
    )]
    repository_roots: Vec<PathBuf>,
    /// Backup appliance (SNA) for VMs registered without their own, as
    /// http://HOST:PORT; see docs/sna-contract.md [default: none].
    #[arg(long, env = "HUB_SNA_URL", value_name = "URL")]
    sna_url: Option<String>,
    /// Bearer token the hub sends to the appliance.
    #[arg(
        long,
        env = "HUB_SNA_TOKEN",
        value_name = "TOKEN",
        hide_env_values = true
    )]
    sna_token: Option<String>,
    /// Longest wait for the appliance's prepare and start answers, seconds
    /// [default: 30].
    #[arg(long, env = "HUB_SNA_TIMEOUT", value_name = "SECS")]
    sna_timeout: Option<u64>,
    /// URL the appliance reaches this hub's API at, for its callbacks
    /// [default: http://{listen address}].
    #[arg(long, env = "HUB_PUBLIC_URL", value_name = "URL")]
    public_url: Option<String>,
    /// How often to look for restore points due for their policy's
    /// scheduled verification, seconds; 0 = never [default: 3600].
    #[arg(long, env = "HUB_VERIFY_CHECK_INTERVAL", value_name = "SECS")]
    verify_check_interval: Option<u64>,
    /// Restore points verified at once by the scheduler [default: 1].
    #[arg(long, env = "HUB_VERIFY_MAX_CONCURRENT", value_name = "N")]
    verify_max_concurrent: Option<usize>,
    /// Verification read rate while no backup runs, bytes/s such as 256M;
    /// 0 = unlimited, the default: an idle hub verifies at disk speed.
    #[arg(long, env = "HUB_VERIFY_RATE", value_name = "SIZE", value_parser = super::size::parse_size)]
    verify_rate: Option<u64>,
    /// Verification read rate while any backup runs, bytes/s; 0 =
    /// unlimited [default: 16M].
    #[arg(long, env = "HUB_VERIFY_RATE_DURING_BACKUP", value_name = "SIZE", value_parser = super::size::parse_size)]
    verify_rate_during_backup: Option<u64>,
}

impl ServeArgs {
    /// Whether to only check the configuration.
    pub fn check_only(&self) -> bool {
        self.check_config
    }

    /// Resolve the configuration.
    pub fn config(&self) -> anyhow::Result<Config> {
        let mut c = Config::default();
        if let Some(path) = &self.config {
            FileConfig::load(path)
                .and_then(|f| f.apply(&mut c))
                .map_err(anyhow::Error::msg)?;
        }
        if let Some(v) = self.listen {
            c.listen = v;
        }
        if let Some(v) = &self.data_dir {
            c.data_dir = v.clone();
        }
        if let Some(v) = &self.catalog {
            c.catalog = Some(v.parse().map_err(anyhow::Error::msg)?);
        }
        if let Some(v) = self.nbd_ports {
            c.nbd_ports = v;
        }
        if let Some(v) = self.nbd_shared_port {
            c.nbd_shared_port = v;
        }
        if let Some(v) = self.nbd_bind {
            c.nbd_bind = v;
        }
        if let Some(v) = &self.advertise_host {
            c.advertise_host = v.clone();
        }
        if let Some(v) = self.idle_timeout {
            c.idle_timeout = Duration::from_secs(v);
        }
        self.limits.apply(&mut c.nbd_limits);
        self.tls.apply(&mut c.nbd_tls);
        if self.api_tls {
            c.api_tls = true;
        }
        if let Some(v) = self.space_reserve {
            c.space_reserve = Some(v);
        }
        if let Some(v) = self.prune_interval {
            c.prune_interval = crate::config::prune_interval(v);
        }
        if let Some(v) = &self.node_id {
            crate::names::validate("node_id", v).map_err(anyhow::Error::msg)?;
            c.node_id = v.clone();
        }
        if let Some(v) = self.node_lease {
            c.node_lease = crate::config::node_lease(v).map_err(anyhow::Error::msg)?;
        }
        if self.nbd_list_exports {
            c.nbd_list_exports = true;
        }
        if self.insecure_no_auth {
            c.insecure_no_auth = true;
        }
        if !self.repository_roots.is_empty() {
            c.repository_roots = self.repository_roots.clone();
        }
        c.verify
            .apply(
                self.verify_check_interval,
                self.verify_max_concurrent,
                self.verify_rate,
                self.verify_rate_during_backup,
            )
            .map_err(anyhow::Error::msg)?;
        c.sna
            .apply(
                self.sna_url.clone(),
                self.sna_token.clone(),
                self.sna_timeout,
                self.public_url.clone(),
            )
            .map_err(anyhow::Error::msg)?;
        Ok(c)
    }
}

/// Everything `serve` would refuse at start-up that can be known without
/// starting: credentials load, directories exist or can be made.
pub fn check(c: &Config) -> anyhow::Result<()> {
    c.nbd_tls
        .load(Some(&c.default_tls_dir()))
        .map_err(anyhow::Error::msg)?;
    if c.api_tls {
        nbd_server::ServerTls::from_dir(&c.tls_dir(), true, false)
            .with_context(|| format!("api_tls: {}", c.tls_dir().display()))?;
    }
    if c.data_dir.exists() && !c.data_dir.is_dir() {
        anyhow::bail!("data_dir {} is not a directory", c.data_dir.display());
    }
    for root in &c.repository_roots {
        if !root.is_dir() {
            anyhow::bail!("repository_roots: {} is not a directory", root.display());
        }
    }
    if !c.open_without_tokens() {
        tracing::warn!(listen = %c.listen, "the API is not on loopback: it will start only once an API token exists");
    }
    Ok(())
}

/// Run until SIGINT/SIGTERM, then drain.
pub async fn run(args: ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    run_with(config, args.check_only()).await
}

/// Run with a configuration already resolved (the binary resolves it once,
/// before sizing the runtime); `check_only` is `--check-config`.
pub async fn run_with(config: Config, check_only: bool) -> anyhow::Result<()> {
    if check_only {
        check(&config)?;
        println!("config ok");
        return Ok(());
    }
    let signals = super::Signals::listen()?;
    let daemon = Daemon::start(config).await.context("starting the hub")?;
    println!("api {}://{}", daemon.api_scheme, daemon.api_addr);
    if let Some(a) = daemon.nbd_shared_addr {
        println!("nbd-shared {a}");
    }
    println!("ready");
    signals.wait().await?;
    tracing::info!("signal received; draining");
    daemon.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Wrap {
        #[command(flatten)]
        serve: ServeArgs,
    }

    #[test]
    fn nbd_limits_flags_override_the_file() {
        let path = std::env::temp_dir().join(format!("hub-limits-{}.toml", std::process::id()));
        std::fs::write(
            &path,
            "max_connections = 5\nmax_connections_per_port = 3\nmax_buffer_memory = \"2G\"\n\
             splice_reads = \"never\"\n",
        )
        .unwrap();
        let args = Wrap::try_parse_from([
            "x",
            "--config",
            path.to_str().unwrap(),
            "--max-connections",
            "7",
            "--max-buffer-memory",
            "256M",
            "--send-timeout",
            "5",
            "--max-inflight-per-connection",
            "16M",
            "--splice-reads",
            "always",
        ])
        .unwrap();
        let c = args.serve.config();
        std::fs::remove_file(&path).unwrap();
        let l = c.unwrap().nbd_limits;
        assert_eq!(l.max_connections, 7, "flag beats file");
        assert_eq!(l.max_connections_per_port, 3, "file beats default");
        assert_eq!(l.max_buffer_memory, 256 << 20);
        assert_eq!(l.send_timeout, Duration::from_secs(5));
        assert_eq!(l.handshake_timeout, Duration::from_secs(10));
        assert_eq!(l.max_inflight_per_connection, 16 << 20);
        assert_eq!(
            l.splice_reads,
            nbd_server::SpliceReads::Always,
            "flag beats file"
        );
        assert!(Wrap::try_parse_from(["x", "--splice-reads", "sometimes"]).is_err());
        let defaults = Wrap::try_parse_from(["x"])
            .unwrap()
            .serve
            .config()
            .unwrap()
            .nbd_limits;
        assert_eq!(defaults.splice_reads, nbd_server::SpliceReads::Remote);
        assert_eq!(
            defaults.max_inflight_per_connection,
            nbd_server::DEFAULT_INFLIGHT_PER_CONNECTION
        );
    }

    #[test]
    fn prune_interval_flag() {
        let c = |args: &[&str]| Wrap::try_parse_from(args).unwrap().serve.config().unwrap();
        assert_eq!(c(&["x"]).prune_interval, Some(Duration::from_secs(3600)));
        assert_eq!(c(&["x", "--prune-interval", "0"]).prune_interval, None);
        assert_eq!(
            c(&["x", "--prune-interval", "90"]).prune_interval,
            Some(Duration::from_secs(90))
        );
    }

    #[test]
    fn appliance_flags() {
        let c = Wrap::try_parse_from(["x"]).unwrap().serve.config().unwrap();
        assert_eq!(c.sna, crate::config::SnaConfig::default());
        let args = Wrap::try_parse_from([
            "x",
            "--sna-url",
            "http://sna.local:8443/",
            "--sna-token",
            "tok",
            "--sna-timeout",
            "5",
            "--public-url",
            "http://10.0.0.5:8082",
        ])
        .unwrap();
        let c = args.serve.config().unwrap();
        assert_eq!(c.sna.url.as_deref(), Some("http://sna.local:8443"));
        assert_eq!(c.sna.timeout, Duration::from_secs(5));
        assert_eq!(c.sna.public_url.as_deref(), Some("http://10.0.0.5:8082"));
        assert!(c.sna.token.is_some());
        let bad = Wrap::try_parse_from(["x", "--sna-url", "https://sna"]).unwrap();
        assert!(bad.serve.config().is_err());
    }
}
