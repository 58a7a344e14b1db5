//! `kura certs`: an account CA and node leaves for the peer plane's mTLS, without a control
//! plane (self-hosting, tests, the local three-node mesh).
//!
//! - `kura certs ca --account acme --out DIR` writes `DIR/ca.crt` and `DIR/ca.key`.
//! - `kura certs leaf --ca DIR --out DIR2 --san kura-acme-peers.kura.svc.cluster.local --san
//!   127.0.0.2` writes `DIR2/tls.crt`, `DIR2/tls.key` and a copy of the CA as `DIR2/ca.crt`:
//!   the three files `replication.tls.{cert,key,ca}` name, under the names a Kubernetes TLS
//!   Secret uses.
//!
//! A leaf is usable for both server and client authentication, as every node is both. Keys are
//! ECDSA P-256, written with mode 0600.

use std::io::Write;
use std::net::IpAddr;
use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

/// Validity of an account CA.
const CA_DAYS: i64 = 3650;

/// Why certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("a SAN must be a DNS name or an IP address: {0:?}")]
    BadSan(String),
    #[error("at least one --san is required (the name peers verify this node by)")]
    NoSan,
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> CertsError + '_ {
    move |source| CertsError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = time::OffsetDateTime::now_utc();
    // A little slack for peers whose clocks run behind.
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(days);
}

/// Creates an account CA in `out` (`ca.crt`, `ca.key`).
pub fn create_ca(account: &str, out: &Path) -> Result<(), CertsError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, format!("kura account CA {account}"));
    name.push(DnType::OrganizationName, "kura");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity(&mut params, CA_DAYS);
    let cert = params.self_signed(&key)?;
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    write_file(&out.join("ca.crt"), cert.pem().as_bytes(), false)?;
    write_file(&out.join("ca.key"), key.serialize_pem().as_bytes(), true)?;
    Ok(())
}

/// Issues a node leaf signed by the CA in `ca_dir`, valid for `sans`, into `out`.
pub fn issue_leaf(ca_dir: &Path, out: &Path, sans: &[String], days: i64) -> Result<(), CertsError> {
    if sans.is_empty() {
        return Err(CertsError::NoSan);
    }
    let ca_cert_path = ca_dir.join("ca.crt");
    let ca_key_path = ca_dir.join("ca.key");
    let ca_pem = std::fs::read_to_string(&ca_cert_path).map_err(io_error(&ca_cert_path))?;
    let ca_key_pem = std::fs::read_to_string(&ca_key_path).map_err(io_error(&ca_key_path))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, KeyPair::from_pem(&ca_key_pem)?)?;

    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, sans[0].clone());
    params.distinguished_name = name;
    params.subject_alt_names = sans
        .iter()
        .map(|san| parse_san(san))
        .collect::<Result<_, _>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, days);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    write_file(&out.join("tls.crt"), cert.pem().as_bytes(), false)?;
    write_file(&out.join("tls.key"), key.serialize_pem().as_bytes(), true)?;
    write_file(&out.join("ca.crt"), ca_pem.as_bytes(), false)?;
    Ok(())
}

fn parse_san(san: &str) -> Result<SanType, CertsError> {
    if let Ok(ip) = san.parse::<IpAddr>() {
        return Ok(SanType::IpAddress(ip));
    }
    let valid = !san.is_empty()
        && san.len() <= 253
        && san.split('.').all(|label| {
            !label.is_empty()
                && label
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '*')
        });
    if !valid {
        return Err(CertsError::BadSan(san.to_owned()));
    }
    let name = san
        .to_owned()
        .try_into()
        .map_err(|_| CertsError::BadSan(san.to_owned()))?;
    Ok(SanType::DnsName(name))
}

/// Writes a file whole, replacing it atomically (a node reloading it never reads half of it);
/// private keys are readable by their owner only.
fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), CertsError> {
    use std::os::unix::fs::OpenOptionsExt;
    let temp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        options.mode(0o600);
    }
    let mut file = options.open(&temp).map_err(io_error(&temp))?;
    file.write_all(contents).map_err(io_error(&temp))?;
    file.sync_all().map_err(io_error(&temp))?;
    std::fs::rename(&temp, path).map_err(io_error(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leaf_names_its_sans_and_chains_to_its_ca() {
        let dir = tempfile::tempdir().unwrap();
        create_ca("acme", &dir.path().join("ca")).unwrap();
        let sans = vec!["peers.example".to_string(), "127.0.0.2".to_string()];
        issue_leaf(&dir.path().join("ca"), &dir.path().join("node"), &sans, 30).unwrap();
        let leaf = std::fs::read_to_string(dir.path().join("node/tls.crt")).unwrap();
        let ca = std::fs::read_to_string(dir.path().join("node/ca.crt")).unwrap();
        assert!(leaf.starts_with("-----BEGIN CERTIFICATE-----"));
        assert_eq!(
            ca,
            std::fs::read_to_string(dir.path().join("ca/ca.crt")).unwrap()
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("node/tls.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "the key is private");
        // The TLS module accepts the pair and trusts the chain (see replication::tls tests).
    }

    #[test]
    fn sans_must_be_names_or_addresses() {
        assert!(parse_san("kura-acme-peers.kura.svc.cluster.local").is_ok());
        assert!(parse_san("::1").is_ok());
        for bad in ["", "a..b", "has space", "a/b"] {
            assert!(
                matches!(parse_san(bad), Err(CertsError::BadSan(_))),
                "{bad}"
            );
        }
    }
}
