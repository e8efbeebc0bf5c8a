//! TLS for NBD (`NBD_OPT_STARTTLS`): server credentials in nbdkit's
//! directory layout, so one directory made for nbdkit, qemu or libnbd works
//! here too.
//!
//! ```text
//! DIR/ca-cert.pem      CA that signs client certificates (needed to verify peers)
//! DIR/ca-crl.pem       optional revocation list of that CA
//! DIR/server-cert.pem  this server's certificate (chain), leaf first
//! DIR/server-key.pem   its private key (PKCS#8, PKCS#1 or SEC1 PEM)
//! ```
//!
//! TLS 1.3 and 1.2 only, through rustls with the ring provider.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::proto::TlsMode;

/// Why TLS credentials could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file is missing or unreadable, or holds no usable PEM item.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// rustls refused the combination (e.g. the key does not match the
    /// certificate).
    #[error("TLS configuration: {0}")]
    Config(String),
}

/// TLS as one server offers it.
#[derive(Debug, Clone)]
pub struct ServerTls {
    config: Arc<rustls::ServerConfig>,
    required: bool,
}

impl ServerTls {
    /// Load credentials from `dir` (nbdkit layout). `required` is FORCEDTLS
    /// (`--tls=require`); otherwise TLS is offered and plaintext clients
    /// are served too (`--tls=on`). `verify_peer` demands a client
    /// certificate signed by `ca-cert.pem` (and not in `ca-crl.pem`).
    pub fn from_dir(dir: &Path, required: bool, verify_peer: bool) -> Result<Self, TlsSetupError> {
        let certs = load_certs(&dir.join("server-cert.pem"))?;
        let key_path = dir.join("server-key.pem");
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|e| file_err(&key_path, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsSetupError::Config(e.to_string()))?;
        let builder = if verify_peer {
            let ca_path = dir.join("ca-cert.pem");
            let mut roots = RootCertStore::empty();
            for c in load_certs(&ca_path)? {
                roots
                    .add(c)
                    .map_err(|e| file_err(&ca_path, format!("bad CA certificate: {e}")))?;
            }
            let crl_path = dir.join("ca-crl.pem");
            let crls: Vec<CertificateRevocationListDer<'static>> = if crl_path.exists() {
                CertificateRevocationListDer::pem_file_iter(&crl_path)
                    .map_err(|e| file_err(&crl_path, e))?
                    .collect::<Result<_, _>>()
                    .map_err(|e| file_err(&crl_path, e))?
            } else {
                Vec::new()
            };
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .with_crls(crls)
                .build()
                .map_err(|e| TlsSetupError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        } else {
            builder.with_no_client_auth()
        };
        let config = builder
            .with_single_cert(certs, key)
            .map_err(|e| TlsSetupError::Config(e.to_string()))?;
        Ok(Self::from_config(Arc::new(config), required))
    }

    /// TLS from a rustls configuration built by the embedder.
    pub fn from_config(config: Arc<rustls::ServerConfig>, required: bool) -> Self {
        ServerTls { config, required }
    }

    /// The rustls configuration (e.g. to serve HTTPS with the same
    /// credentials).
    pub fn rustls_config(&self) -> Arc<rustls::ServerConfig> {
        Arc::clone(&self.config)
    }

    /// Whether plaintext clients are refused.
    pub fn required(&self) -> bool {
        self.required
    }

    pub(crate) fn mode(&self) -> TlsMode {
        if self.required {
            TlsMode::Required
        } else {
            TlsMode::Offered
        }
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }
}

fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no certificate in the file"));
    }
    Ok(certs)
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> TlsSetupError {
    TlsSetupError::File {
        path: path.to_owned(),
        message: e.to_string(),
    }
}
