//! `hub-agent` command line: `serve` (the appliance service the hub calls)
//! and `push` (a one-shot push without the hub).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use hub_agent::config;
use hub_agent::push::{commit_states, push_disks, DiskRequest};
use hub_agent::serve::{serve, Agent, AgentConfig};
use hub_agent::source::SourceSpec;
use hub_agent::stream::{DiskCounter, StreamOptions};
use hub_agent::targets::{parse_key_source, parse_targets};
use hub_agent::{progress, tracking};

#[derive(Debug, Parser)]
#[command(
    name = "hub-agent",
    version,
    about = "Reference backup appliance for the NBD backup hub"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the appliance endpoints the hub calls (prepare, start, cancel).
    Serve(ServeArgs),
    /// Push disks once to NBD targets, without a hub calling.
    Push(PushArgs),
}

#[derive(Debug, Args)]
struct Tuning {
    /// MiB per source read.
    #[arg(long)]
    chunk_mib: Option<u64>,
    /// Reads in flight per disk.
    #[arg(long)]
    in_flight: Option<usize>,
    /// Largest WRITE request in KiB.
    #[arg(long)]
    max_write_kib: Option<u64>,
    /// Directory with the hub's CA (ca-cert.pem) and, when the hub verifies
    /// peers, client-cert.pem and client-key.pem: needed for nbds:// targets.
    #[arg(long, env = "HUB_AGENT_TLS_CERTIFICATES", value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
}

impl Tuning {
    fn options(
        &self,
        file_chunk: Option<u64>,
        file_in_flight: Option<usize>,
    ) -> Result<StreamOptions, String> {
        let d = StreamOptions::default();
        let tls = match &self.tls_certificates {
            Some(dir) => Some(nbd_client::ClientTls::from_dir(dir).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(StreamOptions {
            chunk: self
                .chunk_mib
                .or(file_chunk)
                .map_or(d.chunk, |m| m.clamp(1, 32) << 20),
            in_flight: self
                .in_flight
                .or(file_in_flight)
                .unwrap_or(d.in_flight)
                .clamp(1, 64),
            max_write: self
                .max_write_kib
                .map_or(d.max_write, |k| k.clamp(4, 32 << 10) << 10),
            tls,
            ..d
        })
    }
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// TOML configuration file (options below override it).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address, e.g. 0.0.0.0:8090.
    #[arg(long)]
    listen: Option<String>,
    /// Change-tracking state directory.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// VM/DISK_KEY=SOURCE (raw file, block device, qcow2 image or nbd://…); repeatable.
    #[arg(long = "source")]
    sources: Vec<String>,
    /// Bearer token the hub must send.
    #[arg(long, env = "HUB_AGENT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(flatten)]
    tuning: Tuning,
}

#[derive(Debug, Args)]
struct PushArgs {
    /// KEY:URI,KEY:URI,… e.g. 2000:nbd://127.0.0.1:10105/name
    #[arg(long)]
    targets: String,
    /// KEY=SOURCE for every key of the targets.
    #[arg(required = true)]
    sources: Vec<String>,
    /// Change-tracking state directory: record this push's state there.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Send an incremental against this change id (ID for every disk, or
    /// KEY=ID; repeatable). Disks without matching state are sent full.
    #[arg(long = "base-change-id")]
    base_change_ids: Vec<String>,
    /// VM name, so state names match those of `serve` (VM/KEY).
    #[arg(long)]
    vm: Option<String>,
    #[command(flatten)]
    tuning: Tuning,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let default_level = match cli.cmd {
        Cmd::Serve(_) => "info",
        Cmd::Push(_) => "warn",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hub-agent: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        match cli.cmd {
            Cmd::Serve(a) => run_serve(a).await,
            Cmd::Push(a) => run_push(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hub-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_serve(a: ServeArgs) -> Result<(), String> {
    let file = match &a.config {
        Some(p) => config::load(p)?,
        None => config::FileConfig::default(),
    };
    let mut sources = config::sources_of(file.sources.clone())?;
    // Command-line sources win over the file's.
    for s in &a.sources {
        let (vm, key, src) = hub_agent::targets::parse_vm_key_source(s).map_err(|e| e.0)?;
        sources.insert((vm, key), SourceSpec::parse(&src));
    }
    if sources.is_empty() {
        return Err("no sources configured (--source VM/DISK_KEY=SOURCE or [sources])".into());
    }
    let listen = a
        .listen
        .or(file.listen)
        .ok_or("no listen address (--listen or listen =)")?;
    let state_dir = a
        .state_dir
        .or(file.state_dir)
        .ok_or("no state directory (--state-dir or state_dir =)")?;
    std::fs::create_dir_all(&state_dir).map_err(|e| format!("{}: {e}", state_dir.display()))?;
    let stream = a.tuning.options(file.chunk_mib, file.in_flight)?;
    let token = a.token.or(file.token).filter(|t| !t.is_empty());
    if token.is_none() {
        tracing::warn!("no token configured: anyone who can reach the port can start backups");
    }
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("binding {listen}: {e}"))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    // The address line is for people and scripts (with --listen …:0).
    tracing::info!(disks = sources.len(), "listening on {addr}");
    let agent = Agent::new(AgentConfig {
        state_dir,
        token,
        sources,
        stream,
        progress_every: hub_agent::serve::PROGRESS_EVERY,
    });
    // Ctrl-C or SIGTERM (what service managers send) stop it cleanly.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| format!("installing the SIGTERM handler: {e}"))?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    };
    serve(listener, agent, shutdown)
        .await
        .map_err(|e| e.to_string())
}

async fn run_push(a: PushArgs) -> Result<(), String> {
    let targets = parse_targets(&a.targets).map_err(|e| e.0)?;
    let mut sources: HashMap<u32, String> = HashMap::new();
    for s in &a.sources {
        let (k, src) = parse_key_source(s).map_err(|e| e.0)?;
        if sources.insert(k, src).is_some() {
            return Err(format!("disk key {k} has two sources"));
        }
    }
    for k in sources.keys() {
        if !targets.iter().any(|t| t.disk_key == *k) {
            return Err(format!("disk key {k} has a source but no target"));
        }
    }
    let mut bases: BTreeMap<Option<u32>, String> = BTreeMap::new();
    for b in &a.base_change_ids {
        match parse_key_source(b) {
            Ok((k, id)) => bases.insert(Some(k), id),
            Err(_) => bases.insert(None, b.clone()),
        };
    }
    if !bases.is_empty() && a.state_dir.is_none() {
        return Err("--base-change-id needs --state-dir".into());
    }
    let mut disks = Vec::new();
    let mut reasons = Vec::new();
    for (i, t) in targets.iter().enumerate() {
        let src = sources
            .get(&t.disk_key)
            .ok_or_else(|| format!("disk key {} has a target but no source", t.disk_key))?;
        let state_name = match &a.vm {
            Some(vm) => hub_agent::serve::state_name(vm, t.disk_key),
            None => t.disk_key.to_string(),
        };
        let parent = bases.get(&Some(t.disk_key)).or_else(|| bases.get(&None));
        let (base, reason) = match (parent, &a.state_dir) {
            (Some(p), Some(dir)) => match tracking::load(dir, &state_name) {
                Ok(st) if st.change_id == *p => (Some(Arc::new(st)), None),
                Ok(_) => (
                    None,
                    Some(format!("change tracking has no state for change id {p}")),
                ),
                Err(why) => (
                    None,
                    Some(format!(
                        "change tracking has no state for change id {p} ({why})"
                    )),
                ),
            },
            _ => (None, None),
        };
        reasons.push(reason);
        disks.push(DiskRequest {
            disk_id: i as u32,
            disk_key: t.disk_key,
            state_name,
            source: SourceSpec::parse(src),
            target_uri: t.uri.clone(),
            base,
            progress: Arc::new(DiskCounter::default()),
        });
    }
    let counters: Vec<Arc<DiskCounter>> = disks.iter().map(|d| Arc::clone(&d.progress)).collect();
    let bar = progress::spawn_bar(counters);
    let opts = a.tuning.options(None, None)?;
    let pushed = push_disks(disks, opts).await;
    if let Some(b) = bar {
        b.finish();
    }
    let results = pushed.map_err(|e| e.to_string())?;
    if let Some(dir) = &a.state_dir {
        commit_states(dir, &results).map_err(|e| format!("committing change tracking: {e}"))?;
    }
    let out: Vec<serde_json::Value> = results
        .iter()
        .zip(reasons)
        .map(|(r, reason)| {
            let mut v = serde_json::to_value(r).unwrap_or_default();
            if let Some(reason) = reason {
                v["reason"] = serde_json::Value::String(reason);
            }
            v
        })
        .collect();
    let text = serde_json::to_string_pretty(&serde_json::json!({ "disks": out }))
        .map_err(|e| e.to_string())?;
    println!("{text}");
    Ok(())
}
