//! TLS for the client (`NBD_OPT_STARTTLS`): credentials in libnbd's and
//! qemu's directory layout.
//!
//! ```text
//! DIR/ca-cert.pem      CA the server's certificate must chain to
//! DIR/client-cert.pem  optional: our certificate, for servers that verify peers
//! DIR/client-key.pem   its private key
//! ```

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::RootCertStore;

/// Client TLS credentials.
#[derive(Debug, Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
}

/// Why credentials could not be loaded.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct TlsConfigError(String);

impl TlsConfigError {
    /// An error with this message.
    pub fn new(msg: &str) -> Self {
        TlsConfigError(msg.to_owned())
    }
}

impl ClientTls {
    /// Load `DIR/ca-cert.pem` and, when present, `DIR/client-cert.pem` with
    /// `DIR/client-key.pem`.
    pub fn from_dir(dir: &Path) -> Result<ClientTls, TlsConfigError> {
        let err =
            |p: &Path, e: &dyn std::fmt::Display| TlsConfigError(format!("{}: {e}", p.display()));
        let ca = dir.join("ca-cert.pem");
        let mut roots = RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&ca).map_err(|e| err(&ca, &e))? {
            let c = c.map_err(|e| err(&ca, &e))?;
            roots.add(c).map_err(|e| err(&ca, &e))?;
        }
        if roots.is_empty() {
            return Err(err(&ca, &"no CA certificate"));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsConfigError(e.to_string()))?
            .with_root_certificates(roots);
        let cert = dir.join("client-cert.pem");
        let config = if cert.exists() {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
                .map_err(|e| err(&cert, &e))?
                .collect::<Result<_, _>>()
                .map_err(|e| err(&cert, &e))?;
            let key_path = dir.join("client-key.pem");
            let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| err(&key_path, &e))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| TlsConfigError(e.to_string()))?
        } else {
            builder.with_no_client_auth()
        };
        Ok(ClientTls {
            config: Arc::new(config),
        })
    }

    /// TLS from a rustls configuration built by the caller.
    pub fn from_config(config: Arc<rustls::ClientConfig>) -> ClientTls {
        ClientTls { config }
    }

    pub(crate) fn connector(&self) -> tokio_rustls::TlsConnector {
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
    }
}

/// The name the server's certificate must carry: an IP SAN for an
/// address, a DNS SAN otherwise.
pub(crate) fn server_name(host: &str) -> Result<ServerName<'static>, TlsConfigError> {
    ServerName::try_from(host.to_owned())
        .map_err(|e| TlsConfigError(format!("bad server name {host:?}: {e}")))
}
