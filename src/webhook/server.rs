//! The admission webhook server: HTTPS on `--webhook-addr` with the certificate in
//! `--webhook-cert-dir` (`tls.crt`, `tls.key`), re-read when the files change (cert-manager
//! and Secret volumes rotate them in place); a bad new pair keeps the old one in force.
//!
//! `POST /inject` (mutating, Pods) and `POST /validate` (MeshServices, AccessRules) answer
//! from [`super::admission`]; handlers hold no lock across an await and do no IO, so a review
//! costs microseconds. Bodies over 4 MiB get `413`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::warn;

use super::admission::{InjectContext, review_inject, review_validate};
use super::inject::InjectSettings;
use crate::sources::kube::KubeStore;

/// Largest review accepted.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

pub use crate::tls::ReloadingCert;

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
    /// The index: which services Consul knows (a MeshService of a namespace not owning
    /// Consul's services may not declare one).
    pub index: crate::sources::IndexHandle,
}

fn answer(
    state: &WebhookState,
    path: &'static str,
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
        crate::webhook::admission::PodContext {
            namespace_labels: store.namespace_labels(namespace).cloned(),
            service: store.service_for_pod(namespace, labels),
        }
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
    let declared_in = |service: &str| {
        state
            .store
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .namespaces_declaring(service)
    };
    let consul_claim =
        |service: &str, namespace: &str| state.index.read(|i| i.claim_refusal(service, namespace));
    let lookups = crate::webhook::admission::Ownership {
        declared_in: &declared_in,
        consul_claim: &consul_claim,
    };
    let out = review_validate(&body, &lookups);
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
    stop: watch::Receiver<bool>,
) {
    let config = match crate::tls::server_config(cert.clone(), None, &[b"http/1.1"]) {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, "webhook TLS configuration failed; the webhook is off");
            return;
        }
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    crate::tls::reload_periodically("webhook certificate", cert, reload_every, stop.clone());
    // The API server's own call times out after at most 30 s (10 s by default).
    let limits = crate::serve::HttpLimits {
        max_connections: 256,
        header_timeout: Duration::from_secs(10),
        request_timeout: Some(Duration::from_secs(10)),
    };
    crate::serve::serve(
        "webhook",
        listener,
        router(state),
        Some(acceptor),
        limits,
        stop,
    )
    .await;
}
