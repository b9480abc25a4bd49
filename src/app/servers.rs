//! The servers a run listens with: ADS, the admin API (and UI), and the admission webhook.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::{BoundAddrs, ControlPlane};
use crate::admin::{self, AdminState};
use crate::config::{AdminConfig, Listen, RunConfig, WebhookConfig};
use crate::sources::kube::KubeStore;
use crate::webhook::server::ReloadingCert;
use crate::xds::conn::{XdsTls, incoming};
use crate::xds::{AdsService, XdsContext};

/// The bound listeners (bound before anything is served, so a port in use fails the start).
pub(super) struct Listeners {
    pub xds: TcpListener,
    pub admin: TcpListener,
    /// `--admin-local-addr`.
    pub admin_local: Option<TcpListener>,
    pub webhook: Option<TcpListener>,
}

impl Listeners {
    /// Binds `--xds-addr`, `--admin-addr` and, when the webhook is on, `--webhook-addr`.
    pub(super) async fn bind(listen: &Listen, webhook: bool) -> anyhow::Result<Self> {
        let xds = TcpListener::bind(listen.xds)
            .await
            .with_context(|| format!("--xds-addr {}: cannot listen", listen.xds))?;
        let admin = TcpListener::bind(listen.admin)
            .await
            .with_context(|| format!("--admin-addr {}: cannot listen", listen.admin))?;
        let admin_local = match listen.admin_local {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--admin-local-addr {addr}: cannot listen"))?,
            ),
            None => None,
        };
        let webhook = if webhook {
            Some(
                TcpListener::bind(listen.webhook)
                    .await
                    .with_context(|| format!("--webhook-addr {}: cannot listen", listen.webhook))?,
            )
        } else {
            None
        };
        Ok(Listeners {
            xds,
            admin,
            admin_local,
            webhook,
        })
    }

    /// The addresses actually bound (useful with port 0).
    pub(super) fn addrs(&self) -> anyhow::Result<BoundAddrs> {
        Ok(BoundAddrs {
            xds: self.xds.local_addr()?,
            admin: self.admin.local_addr()?,
            webhook: self.webhook.as_ref().map(|l| l.local_addr()).transpose()?,
        })
    }
}

/// The xDS port's TLS, when `--xds-tls-cert` is given: the certificate and the client CA,
/// each re-read every 2 s until `stop`. Fails naming the flag when a file does not load.
pub(super) fn xds_tls(
    config: &RunConfig,
    stop: watch::Receiver<bool>,
) -> anyhow::Result<Option<XdsTls>> {
    let Some(files) = &config.xds.tls else {
        return Ok(None);
    };
    let reloading = Arc::new(
        ReloadingCert::from_files(&files.cert, &files.key)
            .map_err(|e| super::BadConfig(format!("--xds-tls-cert/--xds-tls-key: {e}")))?,
    );
    let client_ca = match &files.client_ca {
        Some(path) => Some(Arc::new(
            crate::tls::ReloadingClientCa::from_file(path)
                .map_err(|e| super::BadConfig(format!("--xds-client-ca: {e}")))?,
        )),
        None => None,
    };
    let server = crate::tls::server_config(reloading.clone(), client_ca.clone(), &[b"h2"])
        .map_err(|e| super::BadConfig(format!("--xds-tls-cert: {e}")))?;
    let every = std::time::Duration::from_secs(2);
    crate::tls::reload_periodically("xds certificate", reloading, every, stop.clone());
    if let Some(ca) = client_ca {
        crate::tls::reload_periodically("xds client CA", ca, every, stop);
    }
    Ok(Some(XdsTls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        trust_domain: config.settings.trust_domain.clone(),
    }))
}

/// Who may call the admin API: the token file, when `--admin-token-file` is given (fails
/// naming the flag when it does not load), and the Kubernetes API with
/// `--admin-kubernetes-auth` (fails when there is no Kubernetes client).
pub(super) fn admin_auth(
    config: &AdminConfig,
    kube: Option<&kube::Client>,
) -> anyhow::Result<admin::auth::AdminAuth> {
    let tokens = match &config.token_file {
        Some(path) => Some(
            admin::auth::TokenFile::new(path)
                .map_err(|e| super::BadConfig(format!("--admin-token-file: {e}")))?,
        ),
        None => None,
    };
    let kube = match (config.kubernetes_auth, kube) {
        (false, _) => None,
        (true, Some(client)) => Some(admin::kube_auth::KubeAuth::new(
            client.clone(),
            admin::kube_auth::SERVICE_ACCOUNT_TOKEN.into(),
        )),
        (true, None) => {
            return Err(super::BadConfig(
                "--admin-kubernetes-auth checks tokens with the Kubernetes API: it needs --kube auto with a cluster or KUBECONFIG".into(),
            )
            .into());
        }
    };
    Ok(admin::auth::AdminAuth { tokens, kube })
}

/// Serves ADS on `listener` (over `tls` when given) until `stop` turns true; existing
/// streams then drain.
pub(super) fn spawn_xds(
    cp: &ControlPlane,
    config: &RunConfig,
    listener: TcpListener,
    tls: Option<XdsTls>,
    mut stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    info!(
        tls = tls.is_some(),
        client_auth = ?config.xds.client_auth,
        "xDS server"
    );
    let ctx = Arc::new(XdsContext {
        cache: cp.cache.clone(),
        registry: cp.registry.clone(),
        metrics: cp.metrics.clone(),
        control_plane: format!("meshbridge/{}", config.hostname),
        limits: config.xds.limits.clone(),
        client_auth: config.xds.client_auth,
        load: cp.load.clone(),
    });
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
        .max_concurrent_streams(Some(config.xds.max_streams_per_connection))
        .add_service(AdsService::new(ctx.clone()).into_server())
        .add_service(crate::xds::lrs::LrsService::new(ctx).into_server())
        .serve_with_incoming_shutdown(incoming(listener, tls), async move {
            let _ = stop.wait_for(|s| *s).await;
        });
    cp.tasks
        .spawn(super::supervise::task::XDS_SERVER, async move {
            if let Err(e) = server.await {
                tracing::error!(error = %e, "the xDS server failed");
            }
        })
}

/// Serves the admin API and UI on `listener` (and `local`, `--admin-local-addr`) until `stop`
/// turns true (with `orders`, where operators' migration orders are written), and checks the
/// peer instances every `--peer-check-interval`.
pub(super) fn spawn_admin(
    cp: &ControlPlane,
    config: &AdminConfig,
    client_auth: crate::xds::ClientAuth,
    (listener, local): (TcpListener, Option<TcpListener>),
    (auth, orders): (
        admin::auth::AdminAuth,
        Option<Arc<admin::migrate::OrderWriter>>,
    ),
    draining: Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let admin_state = AdminState {
        auth: Arc::new(auth),
        metrics_auth: config.metrics_auth,
        diagnostics_need_identity: client_auth != crate::xds::ClientAuth::None,
        ready: cp.ready.clone(),
        draining,
        changes: cp.changes.clone(),
        diagnostics_timeout: config.diagnostics_timeout,
        peers: Arc::new(config.peers.clone()),
        load: cp.load.clone(),
        orders,
        ..AdminState::new(
            cp.cache.clone(),
            cp.registry.clone(),
            cp.sources.clone(),
            cp.metrics.clone(),
        )
    };
    if let Some(every) = config.peer_check_interval {
        tokio::spawn(admin::compare::check_periodically(
            admin_state.clone(),
            every,
        ));
    }
    let router = admin::router(admin_state);
    // Diagnostics and peer comparisons bound themselves (--diagnostics-timeout).
    let limits = crate::serve::HttpLimits {
        max_connections: 512,
        header_timeout: std::time::Duration::from_secs(10),
        request_timeout: None,
    };
    if let Some(local) = local {
        cp.tasks.spawn(
            super::supervise::task::ADMIN_SERVER_LOCAL,
            crate::serve::serve(
                "admin-local",
                local,
                router.clone(),
                None,
                limits.clone(),
                stop.clone(),
            ),
        );
    }
    cp.tasks.spawn(
        super::supervise::task::ADMIN_SERVER,
        crate::serve::serve("admin", listener, router, None, limits, stop),
    )
}

/// What the webhook reads from the Kubernetes side: the store, and whether it has listed
/// (without Kubernetes: an empty store, always "listed").
pub(super) struct WebhookInputs<'a> {
    pub client: Option<&'a kube::Client>,
    pub store: Arc<Mutex<KubeStore>>,
    pub synced: Option<watch::Receiver<bool>>,
}

/// Serves the admission webhook on `listener` with `cert` until `stop` turns true.
pub(super) async fn spawn_webhook(
    cp: &ControlPlane,
    config: &WebhookConfig,
    listener: TcpListener,
    cert: Arc<ReloadingCert>,
    inputs: WebhookInputs<'_>,
    stop: watch::Receiver<bool>,
) {
    // Native sidecars where the cluster runs them; a regular container before 1.29.
    let mut settings = config.inject.clone();
    if let (Some(client), true) = (inputs.client, settings.native_sidecar) {
        match client.apiserver_version().await {
            Ok(v) => {
                settings.native_sidecar =
                    crate::webhook::inject::supports_native_sidecars(&v.major, &v.minor);
                if !settings.native_sidecar {
                    info!(version = %v.git_version, "Kubernetes before 1.29: sidecars are injected as regular containers");
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read the Kubernetes version; injecting native sidecars")
            }
        }
    }
    let state = crate::webhook::server::WebhookState {
        settings: Arc::new(settings),
        store: inputs.store,
        fail_closed: config.fail_closed,
        synced: inputs.synced,
        metrics: cp.metrics.clone(),
        index: cp.index.clone(),
    };
    cp.tasks.spawn(
        super::supervise::task::WEBHOOK_SERVER,
        crate::webhook::server::serve(
            listener,
            cert,
            state,
            std::time::Duration::from_secs(2),
            stop,
        ),
    );
}
