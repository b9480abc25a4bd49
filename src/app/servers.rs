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
use crate::config::{RunArgs, RunConfig};
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
    pub(super) async fn bind(args: &RunArgs, webhook: bool) -> anyhow::Result<Self> {
        let xds = TcpListener::bind(args.xds_addr)
            .await
            .with_context(|| format!("--xds-addr {}: cannot listen", args.xds_addr))?;
        let admin = TcpListener::bind(args.admin_addr)
            .await
            .with_context(|| format!("--admin-addr {}: cannot listen", args.admin_addr))?;
        let admin_local = match args.admin_local_addr {
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("--admin-local-addr {addr}: cannot listen"))?,
            ),
            None => None,
        };
        let webhook = if webhook {
            Some(
                TcpListener::bind(args.webhook_addr)
                    .await
                    .with_context(|| {
                        format!("--webhook-addr {}: cannot listen", args.webhook_addr)
                    })?,
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
    let args = &config.args;
    let (Some(cert), Some(key)) = (&args.xds_tls_cert, &args.xds_tls_key) else {
        return Ok(None);
    };
    let reloading = Arc::new(
        ReloadingCert::from_files(cert, key)
            .map_err(|e| super::BadConfig(format!("--xds-tls-cert/--xds-tls-key: {e}")))?,
    );
    let client_ca = match &args.xds_client_ca {
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
    args: &RunArgs,
    kube: Option<&kube::Client>,
) -> anyhow::Result<admin::auth::AdminAuth> {
    let tokens = match &args.admin_token_file {
        Some(path) => Some(
            admin::auth::TokenFile::new(path)
                .map_err(|e| super::BadConfig(format!("--admin-token-file: {e}")))?,
        ),
        None => None,
    };
    let kube = match (args.admin_kubernetes_auth, kube) {
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
) -> JoinHandle<Result<(), tonic::transport::Error>> {
    let args = &config.args;
    info!(
        tls = tls.is_some(),
        client_auth = ?args.xds_client_auth,
        "xDS server"
    );
    let ctx = Arc::new(XdsContext {
        cache: cp.cache.clone(),
        registry: cp.registry.clone(),
        metrics: cp.metrics.clone(),
        control_plane: format!("meshbridge/{}", super::hostname()),
        limits: config.xds_limits.clone(),
        client_auth: args.xds_client_auth,
    });
    tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .max_concurrent_streams(Some(args.xds_max_streams_per_connection))
            .add_service(AdsService::new(ctx).into_server())
            .serve_with_incoming_shutdown(incoming(listener, tls), async move {
                let _ = stop.wait_for(|s| *s).await;
            }),
    )
}

/// Serves the admin API and UI on `listener` (and `local`, `--admin-local-addr`) until `stop`
/// turns true, and checks the peer instances every `--peer-check-interval`.
pub(super) fn spawn_admin(
    cp: &ControlPlane,
    args: &RunArgs,
    identity: &str,
    (listener, local): (TcpListener, Option<TcpListener>),
    auth: admin::auth::AdminAuth,
    draining: Arc<AtomicBool>,
    stop: watch::Receiver<bool>,
) -> JoinHandle<()> {
    let admin_state = AdminState {
        auth: Arc::new(auth),
        metrics_auth: args.admin_metrics_auth,
        diagnostics_need_identity: args.xds_client_auth != crate::xds::ClientAuth::None,
        ready: cp.ready.clone(),
        draining,
        changes: cp.changes.clone(),
        diagnostics_timeout: std::time::Duration::from_millis(args.diagnostics_timeout),
        peers: Arc::new(admin::compare::PeerSettings {
            urls: args.peers.clone(),
            dns: args.peers_dns.clone(),
            instance: identity.to_string(),
        }),
        ..AdminState::new(
            cp.cache.clone(),
            cp.registry.clone(),
            cp.sources.clone(),
            cp.metrics.clone(),
        )
    };
    if args.peer_check_interval > 0 {
        tokio::spawn(admin::compare::check_periodically(
            admin_state.clone(),
            std::time::Duration::from_secs(args.peer_check_interval),
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
        tokio::spawn(crate::serve::serve(
            "admin-local",
            local,
            router.clone(),
            None,
            limits.clone(),
            stop.clone(),
        ));
    }
    tokio::spawn(crate::serve::serve(
        "admin", listener, router, None, limits, stop,
    ))
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
    args: &RunArgs,
    namespace: &str,
    listener: TcpListener,
    cert: Arc<ReloadingCert>,
    inputs: WebhookInputs<'_>,
    stop: watch::Receiver<bool>,
) {
    // Native sidecars where the cluster runs them; a regular container before 1.29.
    let mut native_sidecars_supported = true;
    if let (Some(client), false) = (inputs.client, args.no_native_sidecar) {
        match client.apiserver_version().await {
            Ok(v) => {
                native_sidecars_supported =
                    crate::webhook::inject::supports_native_sidecars(&v.major, &v.minor);
                if !native_sidecars_supported {
                    info!(version = %v.git_version, "Kubernetes before 1.29: sidecars are injected as regular containers");
                }
            }
            Err(e) => {
                warn!(error = %e, "cannot read the Kubernetes version; injecting native sidecars")
            }
        }
    }
    let settings = crate::webhook::InjectSettings {
        image: args.sidecar_image.clone(),
        init_image: args.sidecar_init_image.clone(),
        xds_addr: args
            .sidecar_xds_addr
            .clone()
            .unwrap_or_else(|| format!("meshbridge-xds.{namespace}.svc:18000")),
        log_level: args.sidecar_log_level.clone(),
        native_sidecar: !args.no_native_sidecar && native_sidecars_supported,
        cpu: args.sidecar_cpu.clone(),
        memory: args.sidecar_memory.clone(),
        memory_limit: args.sidecar_memory_limit.clone(),
        ingress_port: args.sidecar_ingress_port,
        egress_port: args.sidecar_egress_port,
        admin_port: args.sidecar_admin_port,
        ready_port: args.sidecar_ready_port,
        diagnostics_port: (args.sidecar_diagnostics_port != 0)
            .then_some(args.sidecar_diagnostics_port),
        diagnostics_allow: args.sidecar_diagnostics_allow.clone(),
        tls_secret: args.sidecar_tls_secret.clone(),
        xds_tls: args.sidecar_xds_tls,
    };
    let state = crate::webhook::server::WebhookState {
        settings: Arc::new(settings),
        store: inputs.store,
        fail_closed: args.inject_fail_closed,
        synced: inputs.synced,
        metrics: cp.metrics.clone(),
        index: cp.index.clone(),
    };
    tokio::spawn(crate::webhook::server::serve(
        listener,
        cert,
        state,
        std::time::Duration::from_secs(2),
        stop,
    ));
}
