//! The admission webhook server: HTTPS on `--webhook-addr` with the certificate in
//! `--webhook-cert-dir` (`tls.crt`, `tls.key`), re-read when the files change (cert-manager
//! and Secret volumes rotate them in place); a bad new pair keeps the old one in force.
//!
//! `POST /inject` (mutating, Pods) and `POST /validate` (MeshServices, AccessRules) answer
//! from [`super::admission`]; handlers hold no lock across an await and do no IO, so a review
//! costs microseconds. Bodies over 4 MiB get `413`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use rustls::crypto::ring::default_provider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use super::admission::{InjectContext, review_inject, review_validate};
use super::inject::InjectSettings;
use crate::sources::kube::KubeStore;

/// Largest review accepted.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// The serving certificate: from files it follows, or set by the self-managed loop.
#[derive(Debug)]
pub struct ReloadingCert {
    dir: Option<PathBuf>,
    current: RwLock<Option<(Vec<u8>, Arc<CertifiedKey>)>>,
}

type Loaded = (Vec<u8>, Arc<CertifiedKey>);

fn load(dir: &Path) -> Result<Loaded, String> {
    let (cert_file, key_file) = (dir.join("tls.crt"), dir.join("tls.key"));
    let cert_pem =
        std::fs::read(&cert_file).map_err(|e| format!("{}: {e}", cert_file.display()))?;
    let key_pem = std::fs::read(&key_file).map_err(|e| format!("{}: {e}", key_file.display()))?;
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
) -> Result<Loaded, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{cert_name}: {e}"))?;
    if chain.is_empty() {
        return Err(format!("{cert_name}: no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("{key_name}: {e}"))?;
    let signer = default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("{key_name}: {e}"))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| format!("{cert_name} and {key_name} do not match: {e}"))?;
    let mut fingerprint = cert_pem;
    fingerprint.extend_from_slice(key_pem);
    Ok((fingerprint, Arc::new(certified)))
}

impl ReloadingCert {
    /// Loads the pair in `dir`; fails naming the file at fault.
    pub fn new(dir: &Path) -> Result<Self, String> {
        Ok(ReloadingCert {
            dir: Some(dir.to_path_buf()),
            current: RwLock::new(Some(load(dir)?)),
        })
    }

    /// No certificate yet (handshakes fail until [`Self::set`]).
    pub fn empty() -> Self {
        ReloadingCert {
            dir: None,
            current: RwLock::new(None),
        }
    }

    /// Serves this pair from now on.
    pub fn set(&self, cert_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
        let loaded = parse(cert_pem.to_vec(), key_pem, "certificate", "key")?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Some(loaded);
        Ok(())
    }

    /// Re-reads the files; returns whether the certificate changed. A pair that does not
    /// load leaves the current one in force. Without files, there is nothing to do.
    pub fn reload(&self) -> Result<bool, String> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let (fingerprint, key) = load(dir)?;
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

/// What the handlers share.
#[derive(Clone)]
pub struct WebhookState {
    /// Sidecar settings.
    pub settings: Arc<InjectSettings>,
    /// Namespaces and MeshServices, from the Kubernetes source.
    pub store: Arc<Mutex<KubeStore>>,
    /// Refuse pods that cannot be injected.
    pub fail_closed: bool,
    /// With a Kubernetes source: true once it has listed everything (namespace labels and
    /// MeshServices decide injection, so no pod is answered before).
    pub synced: Option<watch::Receiver<bool>>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

fn answer(
    state: &WebhookState,
    path: &str,
    started: Instant,
    (code, body): (u16, serde_json::Value),
) -> Response {
    let result = match (code, body["response"]["allowed"].as_bool()) {
        (200, Some(true)) if body["response"]["patch"].is_string() => "patched",
        (200, Some(true)) => "allowed",
        (200, _) => "denied",
        _ => "malformed",
    };
    state
        .metrics
        .observe_webhook(path, result, started.elapsed());
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
    (status, axum::Json(body)).into_response()
}

async fn inject(State(state): State<WebhookState>, body: Bytes) -> Response {
    let started = Instant::now();
    if state.synced.as_ref().is_some_and(|s| !*s.borrow()) {
        // The API server applies the webhook's failurePolicy.
        let body = serde_json::json!({"error": "meshbridge has not listed namespaces and MeshServices yet"});
        return answer(&state, "/inject", started, (503, body));
    }
    let lookup = |namespace: &str, labels: &std::collections::BTreeMap<String, String>| {
        let store = state.store.lock().unwrap_or_else(|e| e.into_inner());
        (
            store.namespace_labels(namespace).cloned(),
            store.service_for_pod(namespace, labels),
        )
    };
    let ctx = InjectContext {
        settings: &state.settings,
        lookup: &lookup,
        fail_closed: state.fail_closed,
    };
    let out = review_inject(&body, &ctx);
    answer(&state, "/inject", started, out)
}

async fn validate(State(state): State<WebhookState>, body: Bytes) -> Response {
    let started = Instant::now();
    let out = review_validate(&body);
    answer(&state, "/validate", started, out)
}

/// Refuses a body announced larger than [`MAX_BODY`] before reading any of it (a body
/// without a length is cut at the limit by `DefaultBodyLimit`).
async fn refuse_oversized(
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let announced = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if announced.is_some_and(|n| n > MAX_BODY) {
        return (
            StatusCode::PAYLOAD_TOO_LARGE,
            axum::Json(
                serde_json::json!({"error": format!("the review is larger than {MAX_BODY} bytes")}),
            ),
        )
            .into_response();
    }
    next.run(request).await
}

/// The webhook's routes (without TLS; [`serve`] adds it).
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/inject", post(inject))
        .route("/validate", post(validate))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(axum::middleware::from_fn(refuse_oversized))
        .with_state(state)
}

/// Serves the webhook over TLS until `stop` turns true, re-reading the certificate every
/// `reload_every`.
pub async fn serve(
    listener: TcpListener,
    cert: Arc<ReloadingCert>,
    state: WebhookState,
    reload_every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut config = match rustls::ServerConfig::builder_with_provider(Arc::new(default_provider()))
        .with_safe_default_protocol_versions()
    {
        Ok(b) => b.with_no_client_auth().with_cert_resolver(cert.clone()),
        Err(e) => {
            warn!(error = %e, "webhook TLS configuration failed; the webhook is off");
            return;
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    {
        let (cert, mut stop) = (cert.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(reload_every) => {}
                    _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
                }
                match cert.reload() {
                    Ok(true) => info!("webhook certificate reloaded"),
                    Ok(false) => {}
                    Err(e) => {
                        warn!(error = %e, "webhook certificate not reloaded; the current one stays")
                    }
                }
            }
        });
    }
    let service = hyper_util::service::TowerToHyperService::new(router(state));
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "webhook accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        };
        let (acceptor, service) = (acceptor.clone(), service.clone());
        tokio::spawn(async move {
            let tls =
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => tls,
                    _ => return,
                };
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                .await;
        });
    }
}
