//! The peer plane's mutual TLS, with the account CA as the only trust root on both sides.
//!
//! - Server: TLS 1.3 only; a client certificate is required and must chain to the account CA
//!   (rustls' WebPKI client verifier), so a node of another account, or a client without a
//!   certificate, fails the handshake before any request is read.
//! - Client: presents this node's leaf and trusts only the account CA, never the system roots.
//!   The name it verifies the server by is chosen by the sender (`sender.rs`: the discovery DNS
//!   name, `replication.tls.server_name`, or the host of the static peer URL).
//! - Reload: the three files are read again every [`RELOAD_INTERVAL`]; when their bytes change
//!   (Kubernetes replaces Secret files in place) new configurations are built and used by every
//!   connection made from then on. A rotation caught half-done fails to load and the previous
//!   configuration stays in force until the files are whole again.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use crate::config::PeerTlsConfig;

/// How often the certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// Why the peer TLS files could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM {what}")]
    Empty { path: String, what: &'static str },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The three files of `replication.tls`.
#[derive(Clone, Debug)]
struct Files {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

/// The loaded configurations and the bytes they were built from.
struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    fingerprint: blake3::Hash,
}

/// The peer plane's TLS state, shared by the listener and the senders.
pub struct PeerTls {
    files: Files,
    loaded: RwLock<Loaded>,
    /// Bumped on every reload, so senders know to rebuild their clients.
    generation: AtomicU64,
}

impl PeerTls {
    /// Loads `config`'s files; `None` when none is configured (the insecure plane).
    pub fn load(config: &PeerTlsConfig) -> Result<Option<Arc<PeerTls>>, TlsError> {
        let (Some(ca), Some(cert), Some(key)) = (&config.ca, &config.cert, &config.key) else {
            return Ok(None);
        };
        let files = Files {
            ca: ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        };
        let loaded = build(&files)?;
        Ok(Some(Arc::new(PeerTls {
            files,
            loaded: RwLock::new(loaded),
            generation: AtomicU64::new(0),
        })))
    }

    /// The server configuration for a connection accepted now.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.read().server.clone()
    }

    /// The client configuration for connections made now.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.read().client.clone()
    }

    /// Changes with every reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Loaded> {
        self.loaded.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Reloads when the files' bytes changed: `Some(Ok)` reloaded, `Some(Err)` changed but
    /// unusable (the previous configuration stays), `None` unchanged.
    pub fn reload_if_changed(&self) -> Option<Result<(), TlsError>> {
        let fingerprint = match fingerprint(&self.files) {
            Ok(fingerprint) => fingerprint,
            Err(error) => return Some(Err(error)),
        };
        if fingerprint == self.read().fingerprint {
            return None;
        }
        match build(&self.files) {
            Ok(loaded) => {
                *self.loaded.write().unwrap_or_else(|p| p.into_inner()) = loaded;
                self.generation.fetch_add(1, Ordering::SeqCst);
                Some(Ok(()))
            }
            Err(error) => Some(Err(error)),
        }
    }

    /// Watches the files for the life of the process.
    pub fn spawn_reloader(self: &Arc<Self>) {
        let tls = self.clone();
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(RELOAD_INTERVAL);
            let mut last_error: Option<String> = None;
            loop {
                ticker.tick().await;
                let checker = tls.clone();
                let outcome = tokio::task::spawn_blocking(move || checker.reload_if_changed())
                    .await
                    .ok()
                    .flatten();
                match outcome {
                    Some(Ok(())) => {
                        last_error = None;
                        tracing::info!(cert = %tls.files.cert.display(), "peer TLS certificates reloaded");
                    }
                    Some(Err(error)) => {
                        let text = error.to_string();
                        if last_error.as_deref() != Some(&text) {
                            tracing::error!(%error, "peer TLS files changed but cannot be used; the previous certificates stay in force");
                            last_error = Some(text);
                        }
                    }
                    None => {}
                }
            }
        });
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn fingerprint(files: &Files) -> Result<blake3::Hash, TlsError> {
    let mut hasher = blake3::Hasher::new();
    for path in [&files.ca, &files.cert, &files.key] {
        let bytes = read(path)?;
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(&bytes);
    }
    Ok(hasher.finalize())
}

fn certificates(path: &PathBuf) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Invalid {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            path: path.display().to_string(),
            what: "certificate",
        });
    }
    Ok(certs)
}

fn build(files: &Files) -> Result<Loaded, TlsError> {
    let fingerprint = fingerprint(files)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in certificates(&files.ca)? {
        roots.add(ca).map_err(|e| TlsError::Invalid {
            path: files.ca.display().to_string(),
            message: e.to_string(),
        })?;
    }
    let roots = Arc::new(roots);
    let chain = certificates(&files.cert)?;
    let key_bytes = read(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Invalid {
        path: files.key.display().to_string(),
        message: e.to_string(),
    })?;

    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut server = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain.clone(), key.clone_key())?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];

    let mut client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    client.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Loaded {
        server: Arc::new(server),
        client: Arc::new(client),
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> PeerTlsConfig {
        PeerTlsConfig {
            ca: Some(dir.join("ca.crt")),
            cert: Some(dir.join("tls.crt")),
            key: Some(dir.join("tls.key")),
            server_name: None,
        }
    }

    #[test]
    fn files_from_kura_certs_load_and_reload_only_when_they_change() {
        let dir = tempfile::tempdir().unwrap();
        crate::certs::create_ca("acme", &dir.path().join("ca")).unwrap();
        let node = dir.path().join("node");
        let sans = ["peers.example".to_string()];
        crate::certs::issue_leaf(&dir.path().join("ca"), &node, &sans, 1).unwrap();
        let tls = PeerTls::load(&config(&node)).unwrap().unwrap();
        assert!(tls.reload_if_changed().is_none());
        crate::certs::issue_leaf(&dir.path().join("ca"), &node, &sans, 1).unwrap();
        assert!(matches!(tls.reload_if_changed(), Some(Ok(()))));
        assert_eq!(tls.generation(), 1);
        // A half-written rotation is refused and the previous configuration stays.
        std::fs::write(node.join("tls.key"), b"not a key").unwrap();
        assert!(matches!(tls.reload_if_changed(), Some(Err(_))));
        assert_eq!(tls.generation(), 1);
    }

    #[test]
    fn missing_or_empty_files_are_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = PeerTls::load(&config(dir.path())).err().unwrap();
        assert!(error.to_string().contains("ca.crt"), "{error}");
        std::fs::write(dir.path().join("ca.crt"), b"").unwrap();
        std::fs::write(dir.path().join("tls.crt"), b"").unwrap();
        std::fs::write(dir.path().join("tls.key"), b"").unwrap();
        let error = PeerTls::load(&config(dir.path())).err().unwrap();
        assert!(error.to_string().contains("no PEM certificate"), "{error}");
    }

    #[test]
    fn no_files_means_no_tls() {
        assert!(PeerTls::load(&PeerTlsConfig::default()).unwrap().is_none());
    }
}
