//! Subcommands that talk to a running hub over its HTTP API: `vm`, `repo`,
//! `policy`, `backup`, `restore`, `prune`, and `completion` for shells.
//!
//! Human tables by default; `--json` prints the API's JSON answer as it
//! came (indented), for scripts. Exit codes (see [`ClientError::exit_code`]):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | done |
//! | 1 | the hub refused or failed (4xx/5xx; its message on stderr), or answered something that is not the API |
//! | 2 | usage: bad arguments or options (clap's own code), unreadable `--from` file, bad `--hub` URL |
//! | 3 | the hub cannot be reached: refused, unresolvable, TLS handshake failed, or no answer in time |
//!
//! The token comes from `HUB_TOKEN` or `--token-file`, never from an
//! argument: arguments are visible to every user through `ps`.

pub mod backup;
pub mod http;
pub mod policy;
pub mod prune;
pub mod repo;
pub mod restore;
pub mod table;
pub mod vm;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use hyper::Method;
use serde_json::Value;

use http::HubClient;

/// Exit codes of the client commands, for `--help`.
pub const EXIT_CODES: &str =
    "Client commands (vm, repo, policy, backup, restore, prune) exit 0 when \
done, 1 when the hub refused or failed (its message on stderr), 2 on bad usage, 3 when the hub \
cannot be reached. The API token comes from HUB_TOKEN or --token-file.";

/// The hub a client talks to by default: `serve`'s default `listen`.
pub const DEFAULT_HUB: &str = "http://127.0.0.1:8082";

/// Why a client command failed; each kind has its exit code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hub answered with an error status; `message` is the API's.
    #[error("{message} (HTTP {status} {code})")]
    Api {
        /// HTTP status.
        status: u16,
        /// The API's machine-readable code (`not_found`, ...).
        code: String,
        /// The API's message.
        message: String,
    },
    /// No answer: connection refused, name unknown, TLS failed, timeout.
    #[error("cannot reach the hub at {url}: {reason}")]
    Unreachable {
        /// The `--hub` URL.
        url: String,
        /// What went wrong.
        reason: String,
    },
    /// The command line (or a file it names) is unusable.
    #[error("{0}")]
    Usage(String),
    /// A 2xx answer that is not the API's JSON.
    #[error("the hub's answer is not the API's JSON: {0}")]
    Protocol(String),
    /// Writing to stdout failed.
    #[error("writing the output: {0}")]
    Output(std::io::Error),
}

impl ClientError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            ClientError::Api { .. } | ClientError::Protocol(_) | ClientError::Output(_) => 1,
            ClientError::Usage(_) => 2,
            ClientError::Unreachable { .. } => 3,
        }
    }
}

/// Where the hub is and how to talk to it; shared by every client command
/// and accepted before or after the subcommand.
#[derive(Debug, Clone, Args)]
#[command(next_help_heading = "Hub connection")]
pub struct ClientOpts {
    /// The hub's API.
    #[arg(long = "hub", env = "HUB_URL", value_name = "URL", default_value = DEFAULT_HUB, global = true)]
    pub hub: String,
    /// CA certificate (PEM) the hub's HTTPS certificate must chain to;
    /// needed for https:// (`hub-daemon tls init` writes ca-cert.pem).
    #[arg(long, env = "HUB_CA_CERT", value_name = "FILE", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// File whose first line is the API bearer token. Without it the
    /// token comes from HUB_TOKEN (there is no flag for the token itself:
    /// `ps` shows arguments to every user).
    #[arg(long, env = "HUB_TOKEN_FILE", value_name = "FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON answer instead of a table (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
    /// Give up when the hub has not answered within SECS seconds (0: wait
    /// as long as it takes; a prune with merges can take long).
    #[arg(
        long,
        env = "HUB_TIMEOUT",
        value_name = "SECS",
        default_value_t = 600,
        global = true
    )]
    pub timeout: u64,
}

/// Client subcommands (flattened into the top-level command list).
#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Register, list, show and remove VMs.
    Vm(vm::VmArgs),
    /// Add, list and show repositories.
    Repo(repo::RepoArgs),
    /// Create, list, show and remove retention policies.
    Policy(policy::PolicyArgs),
    /// Start, list, show, complete, abort, verify and remove backups.
    Backup(backup::BackupArgs),
    /// Serve a backup's disks over NBD for a restore, and stop.
    Restore(restore::RestoreArgs),
    /// Apply the retention policies: remove and merge backups
    /// (`--dry-run` shows the plan only).
    Prune(prune::PruneArgs),
    /// Print a shell completion script (e.g. `hub-daemon completion bash
    /// > /etc/bash_completion.d/hub-daemon`).
    Completion {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// Run a client command.
pub async fn run(cmd: ClientCommand) -> Result<(), ClientError> {
    match cmd {
        ClientCommand::Vm(a) => vm::run(a).await,
        ClientCommand::Repo(a) => repo::run(a).await,
        ClientCommand::Policy(a) => policy::run(a).await,
        ClientCommand::Backup(a) => backup::run(a).await,
        ClientCommand::Restore(a) => restore::run(a).await,
        ClientCommand::Prune(a) => prune::run(a).await,
        ClientCommand::Completion { shell } => {
            let mut cmd = <crate::cli::Cli as clap::CommandFactory>::command();
            let mut buf = Vec::new();
            clap_complete::generate(shell, &mut cmd, "hub-daemon", &mut buf);
            write_out(&String::from_utf8_lossy(&buf))
        }
    }
}

/// Run `cmd` on a runtime of its own and turn the outcome into an exit
/// code, the error on stderr.
pub fn main(cmd: ClientCommand) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return 1;
        }
    };
    match rt.block_on(run(cmd)) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

/// A connection to the hub for one command, with its output mode.
#[derive(Debug)]
pub struct Session {
    http: HubClient,
    json: bool,
}

impl Session {
    /// From the options: URL, CA, token (file, else `HUB_TOKEN`).
    pub fn new(opts: &ClientOpts) -> Result<Session, ClientError> {
        let token = match &opts.token_file {
            Some(path) => Some(read_token(path)?),
            None => std::env::var("HUB_TOKEN")
                .ok()
                .filter(|t| !t.trim().is_empty()),
        };
        let timeout = (opts.timeout > 0).then(|| Duration::from_secs(opts.timeout));
        Ok(Session {
            http: HubClient::new(&opts.hub, opts.ca_cert.as_deref(), token, timeout)?,
            json: opts.json,
        })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Bytes, ClientError> {
        self.http.call(Method::GET, path, None).await
    }

    /// `method path` with a JSON body.
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: &Value,
    ) -> Result<Bytes, ClientError> {
        self.http.call(method, path, Some(body)).await
    }

    /// `method path` without a body.
    pub async fn call(&self, method: Method, path: &str) -> Result<Bytes, ClientError> {
        self.http.call(method, path, None).await
    }

    /// Print an answer: the API's JSON with `--json`, else what `human`
    /// makes of it.
    pub fn print(
        &self,
        raw: &Bytes,
        human: impl FnOnce(&Value) -> String,
    ) -> Result<(), ClientError> {
        if self.json {
            let text =
                table::pretty_json(raw).ok_or_else(|| ClientError::Protocol(preview(raw)))?;
            return write_out(&text);
        }
        let v: Value = serde_json::from_slice(raw)
            .map_err(|e| ClientError::Protocol(format!("{e}: {}", preview(raw))))?;
        write_out(&human(&v))
    }

    /// After a call answered with no body (204): `done` for people,
    /// nothing for scripts (the exit code says it all).
    pub fn done(&self, done: &str) -> Result<(), ClientError> {
        if self.json {
            Ok(())
        } else {
            write_out(&format!("{done}\n"))
        }
    }
}

fn preview(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    http::clean(&text.chars().take(200).collect::<String>())
}

/// Write to stdout. A closed pipe (`| head`) is not an error: the reader
/// has what it wanted.
pub fn write_out(text: &str) -> Result<(), ClientError> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(ClientError::Output(e)),
        _ => Ok(()),
    }
}

/// The first line of a token file.
fn read_token(path: &Path) -> Result<String, ClientError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ClientError::Usage(format!("--token-file {}: {e}", path.display())))?;
    text.lines()
        .next()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .ok_or_else(|| ClientError::Usage(format!("--token-file {}: empty", path.display())))
}

/// A JSON request body from a file (`-`: stdin), checked to be JSON here so
/// that a typo is a usage error rather than the hub's 400.
pub fn read_json(path: &Path) -> Result<Value, ClientError> {
    let err =
        |e: &dyn std::fmt::Display| ClientError::Usage(format!("--from {}: {e}", path.display()));
    let text = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin()).map_err(|e| err(&e))?
    } else {
        std::fs::read_to_string(path).map_err(|e| err(&e))?
    };
    serde_json::from_str(&text).map_err(|e| err(&e))
}

/// `k=v` (tags, per-disk values) split at the first `=`.
pub fn key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}
