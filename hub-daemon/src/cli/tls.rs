//! The NBD TLS flags shared by `serve` and `export` (nbdkit's names), and
//! `hub-daemon tls init`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use crate::tls::{NbdTls, TlsSetting};

/// NBD TLS; unset ones keep the value from the config file or default.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// NBD over TLS: off, on (offered; plaintext clients still served) or
    /// require (every option before STARTTLS refused) [default: off].
    #[arg(long, env = "HUB_TLS", value_name = "MODE", value_enum)]
    tls: Option<TlsSetting>,
    /// Directory with ca-cert.pem, server-cert.pem, server-key.pem and an
    /// optional ca-crl.pem (nbdkit's layout; `hub-daemon tls init DIR`
    /// makes one) [default for serve: DATA_DIR/tls].
    #[arg(long, env = "HUB_TLS_CERTIFICATES", value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// Demand a client certificate signed by the directory's CA.
    #[arg(long, env = "HUB_TLS_VERIFY_PEER")]
    tls_verify_peer: bool,
}

impl TlsArgs {
    /// Override `t` with every flag given.
    pub fn apply(&self, t: &mut NbdTls) {
        if let Some(v) = self.tls {
            t.setting = v;
        }
        if let Some(v) = &self.tls_certificates {
            t.certificates = Some(v.clone());
        }
        if self.tls_verify_peer {
            t.verify_peer = true;
        }
    }
}

/// `hub-daemon tls …`.
#[derive(Debug, Args)]
pub struct TlsCommand {
    /// What to do.
    #[command(subcommand)]
    action: TlsAction,
}

#[derive(Debug, Subcommand)]
enum TlsAction {
    /// Make a CA, a server and a client certificate in DIR (ca-cert.pem,
    /// ca-key.pem, server-cert.pem, server-key.pem, client-cert.pem,
    /// client-key.pem; keys mode 0600): enough for the hub
    /// (`--tls-certificates DIR`), libnbd (`tls-certificates=DIR`) and qemu
    /// (`tls-creds-x509,dir=DIR`). Never overwrites.
    Init {
        /// Directory to write (created if missing).
        dir: PathBuf,
        /// Another name or address clients use for the hub (repeatable);
        /// localhost, 127.0.0.1 and ::1 are always in.
        #[arg(long = "san", value_name = "HOST")]
        sans: Vec<String>,
    },
}

/// Run the command.
pub fn run(cmd: TlsCommand) -> anyhow::Result<()> {
    match cmd.action {
        TlsAction::Init { dir, sans } => {
            let report = crate::tls::init(&dir, &sans).map_err(anyhow::Error::msg)?;
            for f in report.files {
                println!("{}", f.display());
            }
            Ok(())
        }
    }
}
