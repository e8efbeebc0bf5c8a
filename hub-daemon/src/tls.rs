//! NBD over TLS as the daemon configures it (`--tls off|on|require`,
//! `--tls-certificates DIR`, `--tls-verify-peer`, nbdkit's conventions),
//! and `hub-daemon tls init`, which makes one directory of credentials that
//! the hub, libnbd (`tls-certificates=DIR`) and qemu
//! (`tls-creds-x509,dir=DIR`) all read.

use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use nbd_server::ServerTls;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType,
};

/// `--tls`: nbdkit's three settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsSetting {
    /// Plaintext only; `STARTTLS` refused.
    #[default]
    Off,
    /// TLS offered; plaintext clients still served.
    On,
    /// TLS required before anything else (the spec's FORCEDTLS).
    Require,
}

/// NBD TLS settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NbdTls {
    /// Off, on or require.
    pub setting: TlsSetting,
    /// Credentials directory (nbdkit layout); `None`: `<data dir>/tls` for
    /// `serve`, required for `export`.
    pub certificates: Option<PathBuf>,
    /// Demand client certificates signed by the directory's CA.
    pub verify_peer: bool,
}

impl NbdTls {
    /// Whether TLS is offered at all.
    pub fn enabled(&self) -> bool {
        self.setting != TlsSetting::Off
    }

    /// URI scheme clients should use: `nbds` once TLS is offered (a client
    /// following our URIs then always encrypts), `nbd` otherwise.
    pub fn scheme(&self) -> &'static str {
        if self.enabled() {
            "nbds"
        } else {
            "nbd"
        }
    }

    /// The server's TLS, loaded from the certificates directory (or
    /// `default_dir`), or `None` when off.
    pub fn load(&self, default_dir: Option<&Path>) -> Result<Option<ServerTls>, String> {
        if !self.enabled() {
            return Ok(None);
        }
        let dir = self
            .certificates
            .as_deref()
            .or(default_dir)
            .ok_or("--tls needs --tls-certificates DIR")?;
        let tls = ServerTls::from_dir(dir, self.setting == TlsSetting::Require, self.verify_peer)
            .map_err(|e| {
            format!(
                "loading TLS credentials from {} (make them with `hub-daemon tls init {}`): {e}",
                dir.display(),
                dir.display()
            )
        })?;
        Ok(Some(tls))
    }
}

/// What `tls init` wrote.
#[derive(Debug)]
pub struct InitReport {
    /// Files written, in order.
    pub files: Vec<PathBuf>,
}

/// Write a CA, a server certificate for `localhost`, 127.0.0.1, ::1 and
/// every `sans` entry (IP addresses become IP SANs, the rest DNS names),
/// and a client certificate into `dir`. Private keys are created with
/// mode 0600. Refuses to overwrite existing files (a CA replaced by
/// accident locks every client out).
pub fn init(dir: &Path, sans: &[String]) -> Result<InitReport, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let names = [
        "ca-cert.pem",
        "ca-key.pem",
        "server-cert.pem",
        "server-key.pem",
        "client-cert.pem",
        "client-key.pem",
    ];
    if let Some(n) = names.iter().find(|n| dir.join(n).exists()) {
        return Err(format!(
            "{} already exists; remove the old credentials first",
            dir.join(n).display()
        ));
    }
    let err = |e: rcgen::Error| format!("making certificates: {e}");
    let now = time::OffsetDateTime::now_utc();
    let since = now - time::Duration::days(1);

    let ca_key = KeyPair::generate().map_err(err)?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "nbd-backup-hub CA");
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    ca.not_before = since;
    ca.not_after = now + time::Duration::days(3650);
    let ca = CertifiedIssuer::self_signed(ca, ca_key).map_err(err)?;

    let mut all_sans = vec!["localhost".to_owned(), "127.0.0.1".into(), "::1".into()];
    for s in sans {
        if !all_sans.contains(s) {
            all_sans.push(s.clone());
        }
    }
    let server_key = KeyPair::generate().map_err(err)?;
    let mut server = leaf("nbd-backup-hub server", since, now)?;
    for s in &all_sans {
        server.subject_alt_names.push(match s.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(s.clone().try_into().map_err(err)?),
        });
    }
    server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server_cert = server.signed_by(&server_key, &ca).map_err(err)?;

    let client_key = KeyPair::generate().map_err(err)?;
    let mut client = leaf("nbd-backup-hub client", since, now)?;
    client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client.signed_by(&client_key, &ca).map_err(err)?;

    let files: [(&str, String, bool); 6] = [
        ("ca-cert.pem", ca.pem(), false),
        ("ca-key.pem", ca.key().serialize_pem(), true),
        ("server-cert.pem", server_cert.pem(), false),
        ("server-key.pem", server_key.serialize_pem(), true),
        ("client-cert.pem", client_cert.pem(), false),
        ("client-key.pem", client_key.serialize_pem(), true),
    ];
    let mut written = Vec::with_capacity(files.len());
    for (name, pem, secret) in files {
        let path = dir.join(name);
        write_new(&path, pem.as_bytes(), if secret { 0o600 } else { 0o644 })
            .map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(InitReport { files: written })
}

/// Parameters of a leaf certificate. Key usages are the ones qemu's
/// certificate checks expect of a peer (digital signature and key
/// encipherment); a name only in the CN is ignored by webpki, so servers
/// carry SANs.
fn leaf(
    cn: &str,
    since: time::OffsetDateTime,
    now: time::OffsetDateTime,
) -> Result<CertificateParams, String> {
    let mut p = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| format!("making certificates: {e}"))?;
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    p.not_before = since;
    p.not_after = now + time::Duration::days(825);
    Ok(p)
}

/// Create `path` (never overwrite, never follow a symlink) with `mode`,
/// write and sync it. The mode is set at creation, so a key is never
/// readable by others, not even for a moment.
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(libc_o_nofollow())
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

fn libc_o_nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_writes_six_files_keys_private_and_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let r = init(dir.path(), &["backup.example".into(), "10.1.2.3".into()]).unwrap();
        assert_eq!(r.files.len(), 6);
        for f in &r.files {
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            let name = f.file_name().unwrap().to_str().unwrap();
            if name.ends_with("-key.pem") {
                assert_eq!(mode, 0o600, "{name}");
            } else {
                assert_eq!(mode & 0o077, 0o044 & mode, "{name}");
            }
        }
        // The hub can load them, with and without peer verification.
        for verify in [false, true] {
            let t = NbdTls {
                setting: TlsSetting::Require,
                certificates: Some(dir.path().into()),
                verify_peer: verify,
            };
            assert!(t.load(None).unwrap().is_some());
        }
        let again = init(dir.path(), &[]).unwrap_err();
        assert!(again.contains("already exists"), "{again}");
    }

    #[test]
    fn off_loads_nothing_and_missing_dir_is_a_clear_error() {
        assert!(NbdTls::default().load(None).unwrap().is_none());
        let t = NbdTls {
            setting: TlsSetting::On,
            certificates: Some("/nonexistent/tls".into()),
            verify_peer: false,
        };
        let e = t.load(None).unwrap_err();
        assert!(
            e.contains("server-cert.pem") && e.contains("tls init"),
            "{e}"
        );
        assert_eq!(t.scheme(), "nbds");
    }
}
