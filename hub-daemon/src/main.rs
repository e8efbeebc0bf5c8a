//! `hub-daemon` binary: parse the command line, set up logging, run.

use std::io::IsTerminal;

use clap::Parser;
use hub_daemon::cli::{Cli, Command, LogFormat};
use tracing_subscriber::EnvFilter;

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // rustls warns about every client that sends an IP address as SNI
    // (qemu does); that is the client's quirk, not news.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        // One JSON object per line, for log collectors.
        LogFormat::Json => logs.json().with_current_span(false).init(),
        // Colour only for a person at a terminal, never in log files.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
    }
    // Client commands exit with their own codes (API error, usage, hub
    // unreachable) rather than anyhow's blanket 1; they need neither the
    // daemon's runtime nor its file limit.
    if let Command::Client(cmd) = cli.command {
        std::process::exit(hub_daemon::cli::client::main(cmd));
    }
    hub_daemon::cli::raise_fd_limit();
    // `serve` resolves its configuration once, here: whether NBD runs over
    // TLS decides the runtime's size.
    let serve = match &cli.command {
        Command::Serve(args) => Some((args.config()?, args.check_only())),
        _ => None,
    };
    let tls = match (&serve, &cli.command) {
        (Some((config, _)), _) => config.nbd_tls.enabled(),
        (None, Command::Export(args)) => args.tls_enabled(),
        _ => false,
    };
    let rt = hub_daemon::cli::runtime_for(tls)?;
    rt.block_on(async move {
        match (cli.command, serve) {
            (Command::Serve(_), Some((config, check))) => {
                hub_daemon::cli::serve::run_with(config, check).await
            }
            (Command::Serve(args), None) => hub_daemon::cli::serve::run(*args).await,
            (Command::Export(args), _) => hub_daemon::cli::export::run(args).await,
            (Command::Digest(args), _) => hub_daemon::cli::digest::run(args).await,
            (Command::Token(args), _) => hub_daemon::cli::token::run(args).await,
            (Command::Tls(args), _) => hub_daemon::cli::tls::run(args),
            // Handled above, before the runtime.
            (Command::Client(_), _) => Ok(()),
        }
    })
}
