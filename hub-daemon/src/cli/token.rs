//! `hub-daemon token`: create, list and revoke API bearer tokens in the
//! catalog of a data directory (the daemon may be running or not; it reads
//! tokens on every request).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::catalog::{Catalog, Role};
use crate::config::{Config, FileConfig};

/// Manage API tokens.
#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The daemon's TOML configuration file (for its data_dir).
    #[arg(long, env = "HUB_CONFIG", value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// Data directory holding the catalog [default: ./data].
    #[arg(long, env = "HUB_DATA_DIR", value_name = "DIR", global = true)]
    data_dir: Option<PathBuf>,
    /// Catalog URL, as `serve --catalog` [default: the data directory's].
    #[arg(
        long,
        env = "HUB_CATALOG",
        value_name = "URL",
        global = true,
        hide_env_values = true
    )]
    catalog: Option<String>,
    /// What to do.
    #[command(subcommand)]
    command: TokenCommand,
}

/// Token subcommands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it (alone on stdout). It is shown once:
    /// only a salted hash is stored.
    Create {
        /// Name of the token (letters, digits, '.', '_', '-').
        #[arg(long)]
        name: String,
        /// admin (VMs, repositories, tokens), operator (backups and
        /// restores) or reader (GET only).
        #[arg(long, value_parser = |s: &str| s.parse::<Role>())]
        role: Role,
    },
    /// List tokens: name, role, created, last used (never the secret).
    List,
    /// Revoke a token by name; requests with it get 401 at once.
    Revoke {
        /// The token's name.
        name: String,
    },
}

/// Run the command.
pub async fn run(args: TokenArgs) -> anyhow::Result<()> {
    let mut config = Config::default();
    if let Some(path) = &args.config {
        FileConfig::load(path)
            .and_then(|f| f.apply(&mut config))
            .map_err(anyhow::Error::msg)?;
    }
    if let Some(d) = args.data_dir {
        config.data_dir = d;
    }
    if let Some(u) = args.catalog {
        config.catalog = Some(u.parse().map_err(anyhow::Error::msg)?);
    }
    let url = config.catalog_url();
    if matches!(url, crate::catalog::CatalogUrl::Sqlite(_)) {
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    }
    // `url` shows no password.
    let catalog = Catalog::connect(&url)
        .await
        .with_context(|| format!("opening catalog {url}"))?;
    match args.command {
        TokenCommand::Create { name, role } => {
            let token = catalog.create_token(&name, role).await?;
            println!("{token}");
            eprintln!("token {name:?} ({role}) created; it is not shown again");
        }
        TokenCommand::List => {
            println!("{:<24} {:<9} {:<25} LAST USED", "NAME", "ROLE", "CREATED");
            for t in catalog.tokens().await? {
                println!(
                    "{:<24} {:<9} {:<25} {}",
                    t.name,
                    t.role.as_str(),
                    t.created_at,
                    t.last_used_at.as_deref().unwrap_or("never")
                );
            }
        }
        TokenCommand::Revoke { name } => {
            catalog.revoke_token(&name).await?;
            eprintln!("token {name:?} revoked");
        }
    }
    Ok(())
}
