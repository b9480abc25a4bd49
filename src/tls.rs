//! TLS shared by meshbridge's servers: serving certificates that follow their files (a bad
//! new pair keeps the old one in force), client-certificate verification against a CA, and
//! the SPIFFE identity a client certificate proves.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::ring::default_provider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use tokio::sync::watch;
use tracing::{info, warn};

/// Why certificates, keys or a CA did not load. Each names the file (or what was given) at
/// fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("{name}: {source}")]
    Read {
        /// The file.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// Something in it is not what it should be (PEM, a key, a certificate).
    #[error("{name}: {why}")]
    Invalid {
        /// The file, or what was given.
        name: String,
        /// Why.
        why: String,
    },
    /// The certificate and the key are not a pair.
    #[error("{cert} and {key} do not match: {why}")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
        /// Why.
        why: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
}

fn invalid(name: &str, why: impl std::fmt::Display) -> TlsError {
    TlsError::Invalid {
        name: name.to_string(),
        why: why.to_string(),
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        name: path.display().to_string(),
        source,
    })
}

/// A serving certificate: from files it follows, or set by the webhook's self-managed loop.
#[derive(Debug)]
pub struct ReloadingCert {
    /// Certificate chain and key files.
    files: Option<(PathBuf, PathBuf)>,
    current: RwLock<Option<(Vec<u8>, Arc<CertifiedKey>)>>,
}

type Loaded = (Vec<u8>, Arc<CertifiedKey>);

fn load(cert_file: &Path, key_file: &Path) -> Result<Loaded, TlsError> {
    let cert_pem = read(cert_file)?;
    let key_pem = read(key_file)?;
    parse(
        cert_pem,
        &key_pem,
        &cert_file.display().to_string(),
        &key_file.display().to_string(),
    )
}

/// A PEM certificate chain and key; errors name `cert_name` or `key_name`.
fn parse(
    cert_pem: Vec<u8>,
    key_pem: &[u8],
    cert_name: &str,
    key_name: &str,
) -> Result<Loaded, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| invalid(cert_name, e))?;
    if chain.is_empty() {
        return Err(invalid(cert_name, "no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| invalid(key_name, e))?;
    let signer = default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(key_name, e))?;
    let certified = CertifiedKey::new(chain, signer);
    certified.keys_match().map_err(|e| TlsError::Mismatch {
        cert: cert_name.to_string(),
        key: key_name.to_string(),
        why: e.to_string(),
    })?;
    let mut fingerprint = cert_pem;
    fingerprint.extend_from_slice(key_pem);
    Ok((fingerprint, Arc::new(certified)))
}

impl ReloadingCert {
    /// Loads `tls.crt` and `tls.key` in `dir` (a Secret volume); fails naming the file at
    /// fault.
    pub fn new(dir: &Path) -> Result<Self, TlsError> {
        Self::from_files(&dir.join("tls.crt"), &dir.join("tls.key"))
    }

    /// Loads a certificate chain and key; fails naming the file at fault.
    pub fn from_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        Ok(ReloadingCert {
            files: Some((cert.to_path_buf(), key.to_path_buf())),
            current: RwLock::new(Some(load(cert, key)?)),
        })
    }

    /// No certificate yet (handshakes fail until [`Self::set`]).
    pub fn empty() -> Self {
        ReloadingCert {
            files: None,
            current: RwLock::new(None),
        }
    }

    /// Serves this pair from now on.
    pub fn set(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), TlsError> {
        let loaded = parse(cert_pem.to_vec(), key_pem, "certificate", "key")?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(loaded);
        Ok(())
    }

    /// Re-reads the files; returns whether the certificate changed. A pair that does not
    /// load leaves the current one in force. Without files, there is nothing to do.
    pub fn reload(&self) -> Result<bool, TlsError> {
        let Some((cert, key)) = &self.files else {
            return Ok(false);
        };
        let (fingerprint, key) = load(cert, key)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.as_ref().is_some_and(|c| c.0 == fingerprint) {
            return Ok(false);
        }
        *current = Some((fingerprint, key));
        Ok(true)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|c| c.1.clone())
    }
}

/// Something that re-reads its files: `Ok(true)` when what it serves changed; an error
/// leaves the current one in force.
pub trait Reload: Send + Sync + 'static {
    /// Re-reads the files.
    fn reload(&self) -> Result<bool, TlsError>;
}

impl Reload for ReloadingCert {
    fn reload(&self) -> Result<bool, TlsError> {
        ReloadingCert::reload(self)
    }
}

/// Re-reads `what`'s files every `every` until `stop` turns true; `name` says what it is in
/// logs (e.g. "xds certificate").
pub fn reload_periodically(
    name: &'static str,
    what: Arc<dyn Reload>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
            match what.reload() {
                Ok(true) => info!("{name} reloaded"),
                Ok(false) => {}
                Err(e) => warn!(error = %e, "{name} not reloaded; the current one stays"),
            }
        }
    });
}

/// Client certificates checked against a CA file that is followed: a new CA (rotation,
/// or a bundle of old and new during one) applies to the next handshake; a file that no
/// longer loads keeps the CA last read. A client without a certificate is let through:
/// what it may do is decided above TLS, where a refusal can say why.
pub struct ReloadingClientCa {
    path: PathBuf,
    current: RwLock<(Vec<u8>, Arc<dyn ClientCertVerifier>)>,
}

impl std::fmt::Debug for ReloadingClientCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingClientCa")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

fn client_verifier(path: &Path) -> Result<(Vec<u8>, Arc<dyn ClientCertVerifier>), TlsError> {
    let name = path.display().to_string();
    let named = |e: &dyn std::fmt::Display| invalid(&name, e);
    let pem = read(path)?;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(&pem) {
        roots
            .add(c.map_err(|e| named(&e))?)
            .map_err(|e| named(&e))?;
    }
    if roots.is_empty() {
        return Err(named(&"no certificate"));
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), Arc::new(default_provider()))
            .allow_unauthenticated()
            .build()
            .map_err(|e| named(&e))?;
    Ok((pem, verifier))
}

impl ReloadingClientCa {
    /// Reads the CA bundle at `path`; fails naming it.
    pub fn from_file(path: &Path) -> Result<Self, TlsError> {
        Ok(ReloadingClientCa {
            path: path.to_path_buf(),
            current: RwLock::new(client_verifier(path)?),
        })
    }

    fn verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }
}

impl Reload for ReloadingClientCa {
    fn reload(&self) -> Result<bool, TlsError> {
        let (pem, verifier) = client_verifier(&self.path)?;
        let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
        if current.0 == pem {
            return Ok(false);
        }
        *current = (pem, verifier);
        Ok(true)
    }
}

impl ClientCertVerifier for ReloadingClientCa {
    fn client_auth_mandatory(&self) -> bool {
        false
    }

    /// No hints: the CA may change under a handshake, and Envoy sends its one certificate
    /// whatever the hints say.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.verifier()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.verifier().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.verifier().supported_verify_schemes()
    }
}

/// A TLS server configuration serving `cert`, offering `alpn`. With `client_ca`, clients
/// are asked for a certificate, and one they present must chain to that CA.
pub fn server_config(
    cert: Arc<ReloadingCert>,
    client_ca: Option<Arc<ReloadingClientCa>>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => builder.with_client_cert_verifier(ca),
    };
    let mut config = builder.with_cert_resolver(cert);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The service a certificate proves: its URI SAN `spiffe://{trust_domain}/service/{name}`.
/// None for a certificate without one (or for another trust domain).
pub fn spiffe_service(cert_der: &[u8], trust_domain: &str) -> Option<String> {
    use x509_parser::extensions::GeneralName;
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let prefix = format!("spiffe://{trust_domain}/service/");
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(uri) => uri
            .strip_prefix(prefix.as_str())
            .filter(|s| crate::model::valid_service_name(s))
            .map(str::to_string),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(text: &str) -> rcgen::SanType {
        rcgen::SanType::URI(text.try_into().unwrap())
    }

    #[test]
    fn load_errors_name_the_file_at_fault() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key, other_key) = (
            dir.path().join("tls.crt"),
            dir.path().join("tls.key"),
            dir.path().join("other.key"),
        );
        let pair = rcgen::generate_simple_self_signed(vec!["x".into()]).unwrap();
        std::fs::write(&cert, pair.cert.pem()).unwrap();
        std::fs::write(&key, pair.signing_key.serialize_pem()).unwrap();
        std::fs::write(
            &other_key,
            rcgen::KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        assert!(ReloadingCert::from_files(&cert, &key).is_ok());
        let missing = dir.path().join("missing.crt");
        let e = ReloadingCert::from_files(&missing, &key).unwrap_err();
        assert!(
            matches!(e, TlsError::Read { .. }) && e.to_string().contains("missing.crt"),
            "{e}"
        );
        let e = ReloadingCert::from_files(&key, &key).unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
        let e = ReloadingCert::from_files(&cert, &other_key).unwrap_err();
        assert!(matches!(e, TlsError::Mismatch { .. }), "{e}");
        let e = ReloadingClientCa::from_file(&key).unwrap_err();
        assert!(e.to_string().contains("tls.key: no certificate"), "{e}");
    }

    #[test]
    fn a_certificate_proves_the_service_of_its_spiffe_uri_in_the_trust_domain() {
        let der = cert_with(vec![
            rcgen::SanType::DnsName("web.example".try_into().unwrap()),
            uri("spiffe://mesh.local/service/web"),
        ]);
        assert_eq!(spiffe_service(&der, "mesh.local").as_deref(), Some("web"));
        assert_eq!(spiffe_service(&der, "other.domain"), None);
        let other = cert_with(vec![uri("spiffe://mesh.local/ns/default/sa/web")]);
        assert_eq!(spiffe_service(&other, "mesh.local"), None);
        let bad = cert_with(vec![uri("spiffe://mesh.local/service/../../x")]);
        assert_eq!(spiffe_service(&bad, "mesh.local"), None);
        assert_eq!(spiffe_service(b"not a certificate", "mesh.local"), None);
    }
}
