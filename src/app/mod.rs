//! Wiring, top to bottom: the sources feed the index through one handle; the publisher
//! turns debounced index changes into snapshots; the servers serve them. With Kubernetes,
//! the watchers also feed a store that the status writer, the webhook and the Consul
//! registration read. Each part is started by its own function; this module only orders
//! them and stops them.

mod kubernetes;
mod publish;
mod servers;
mod sources;
pub mod supervise;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::info;

use crate::config::{RunConfig, WebhookCertificate};
use crate::sources::kube::KubeStore;
use crate::webhook::server::ReloadingCert;
use kubernetes::Kubernetes;
pub use publish::{ControlPlane, Debouncer};
use servers::{Listeners, WebhookInputs};

/// A configuration problem found at start (exit code 2, like a bad flag).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadConfig(pub String);

/// Addresses the servers actually bound (useful with port 0).
#[derive(Clone, Copy, Debug)]
pub struct BoundAddrs {
    /// ADS.
    pub xds: SocketAddr,
    /// Admin API.
    pub admin: SocketAddr,
    /// Admission webhooks, when on.
    pub webhook: Option<SocketAddr>,
}

/// Runs the control plane until `shutdown` completes. `bound` receives the addresses once
/// the servers listen.
pub async fn run(
    config: RunConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
    bound: Option<tokio::sync::oneshot::Sender<BoundAddrs>>,
) -> anyhow::Result<()> {
    let cp = Arc::new(ControlPlane::new(&config));
    // Turns true at shutdown: the lease is released, ADS stops taking streams.
    let (stop_tx, stop) = watch::channel(false);
    // Turns true after the drain: the admin server (`/readyz` answers 503 meanwhile) and
    // the webhook (the API server can still reach it while the Service forgets this replica).
    let (late_stop_tx, late_stop) = watch::channel(false);

    let webhook_cert = webhook_certificate(&config)?;
    // Files the servers need, read before anything starts: a bad one fails the start.
    let xds_tls = servers::xds_tls(&config, stop.clone())?;
    let kube_client = crate::sources::kube::client_for(&config.kube)
        .await
        .map_err(|e| BadConfig(format!("--kube auto: {e:#}")))?;
    let admin_auth = servers::admin_auth(&config.admin, kube_client.as_ref())?;
    if kube_client.is_none() {
        info!("no Kubernetes source (--kube off, or neither in a cluster nor KUBECONFIG set)");
    }

    // Sources.
    let mut kube = start_kubernetes(&cp, &config, kube_client.as_ref(), &webhook_cert, &stop)?;
    start_sources(&cp, &config, kube.as_mut()).await?;

    // The publisher: the first state is published before any proxy can connect.
    publish::spawn(cp.clone(), config.debounce).await;

    // Servers.
    let listeners = Listeners::bind(&config.listen, webhook_cert.is_some()).await?;
    let addrs = listeners.addrs()?;
    let Listeners {
        xds,
        admin,
        admin_local,
        webhook,
    } = listeners;
    if let (Some(listener), Some(cert)) = (webhook, webhook_cert) {
        let inputs = WebhookInputs {
            client: kube_client.as_ref(),
            store: kube.as_ref().map_or_else(
                || Arc::new(Mutex::new(KubeStore::new())),
                |k| k.store.clone(),
            ),
            synced: kube.as_ref().map(|k| k.synced.clone()),
        };
        servers::spawn_webhook(
            &cp,
            &config.webhook,
            listener,
            cert,
            inputs,
            late_stop.clone(),
        )
        .await;
    }
    info!(xds = %addrs.xds, admin = %addrs.admin, webhook = ?addrs.webhook, "meshbridge listening");
    let xds = servers::spawn_xds(&cp, &config, xds, xds_tls, stop.clone());
    let draining = Arc::new(AtomicBool::new(false));
    let orders = match (kube_client.as_ref(), kube.as_ref()) {
        (Some(client), Some(k)) => Some(Arc::new(crate::admin::migrate::OrderWriter::new(
            client.clone(),
            k.store.clone(),
            &config.identity,
        ))),
        _ => None,
    };
    let admin = servers::spawn_admin(
        &cp,
        &config.admin,
        config.xds.client_auth,
        (admin, admin_local),
        (admin_auth, orders),
        draining.clone(),
        late_stop.clone(),
    );
    {
        let cp = cp.clone();
        tokio::spawn(async move { cp.become_ready().await });
    }
    if let Some(tx) = bound {
        let _ = tx.send(addrs);
    }

    // Until shutdown, a supervised task that ends takes the process down (exit 1).
    let ended = tokio::select! {
        () = shutdown => None,
        end = cp.tasks.ended() => Some(end),
    };
    if let Some(end) = &ended {
        tracing::error!(task = end.task, cause = %end.cause, "a background task ended: /readyz fails and the process exits 1, to be restarted");
        cp.metrics
            .tasks_ended
            .get_or_create(&crate::metrics::label::Task { task: end.task })
            .inc();
    }
    let drain = config.drain;
    info!(
        drain_ms = drain.as_millis(),
        "shutting down: refusing new streams, draining existing ones"
    );
    draining.store(true, Ordering::Release);
    let _ = stop_tx.send(true);
    if let Some(k) = kube {
        // Releases the Lease so another replica leads at once.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), k.lease).await;
    }
    // Streams are long-lived: serve them until they go or the drain period ends.
    let _ = tokio::time::timeout(drain, xds).await;
    let _ = late_stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), admin).await;
    match ended {
        Some(end) => Err(end.into()),
        None => Ok(()),
    }
}

/// The webhook's certificate: read from `--webhook-cert-dir` (a bad one fails the start), or
/// empty until the self-managed loop fills it; `None` when the webhook is off.
fn webhook_certificate(config: &RunConfig) -> Result<Option<Arc<ReloadingCert>>, BadConfig> {
    Ok(match &config.webhook.certificate {
        Some(WebhookCertificate::Dir(dir)) => {
            Some(Arc::new(ReloadingCert::new(dir).map_err(|e| {
                BadConfig(format!("--webhook-cert-dir: {e}"))
            })?))
        }
        Some(WebhookCertificate::SelfManaged(_)) => Some(Arc::new(ReloadingCert::empty())),
        None => {
            info!("admission webhook off (no --webhook-cert-dir or --webhook-self-managed)");
            None
        }
    })
}

/// The Kubernetes side, with a client: watchers, Lease, status, and the self-managed webhook
/// certificate. Without a client, self-managed certificates cannot work (a start error).
fn start_kubernetes(
    cp: &ControlPlane,
    config: &RunConfig,
    client: Option<&kube::Client>,
    webhook_cert: &Option<Arc<ReloadingCert>>,
    stop: &watch::Receiver<bool>,
) -> Result<Option<Kubernetes>, BadConfig> {
    let self_managed = match &config.webhook.certificate {
        Some(WebhookCertificate::SelfManaged(s)) => Some(s),
        _ => None,
    };
    let Some(client) = client else {
        return match self_managed {
            Some(_) => Err(BadConfig(
                "--webhook-self-managed keeps its certificate in Kubernetes: it needs --kube auto with a cluster or KUBECONFIG".into(),
            )),
            None => Ok(None),
        };
    };
    if let (Some(self_managed), Some(cert)) = (self_managed, webhook_cert) {
        kubernetes::spawn_webhook_certificate(
            client,
            self_managed.clone(),
            cert.clone(),
            stop.clone(),
        );
    }
    Ok(Some(Kubernetes::spawn(
        client,
        cp,
        config,
        webhook_cert.is_some(),
        stop.clone(),
    )))
}

/// The config directory (scanned once before anything is served) and Consul (with the
/// registration of Kubernetes instances into it when there is a Kubernetes side).
async fn start_sources(
    cp: &ControlPlane,
    config: &RunConfig,
    mut kube: Option<&mut Kubernetes>,
) -> anyhow::Result<()> {
    if let Some((dir, poll)) = &config.config_dir {
        sources::spawn_config_dir(cp, dir, *poll).await?;
    }
    if let Some(consul) = &config.consul {
        let client = crate::sources::consul::ConsulClient::new(&consul.settings)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let own_node = kube.as_ref().map(|_| config.consul_sync.node.clone());
        if let Some(k) = kube.as_mut() {
            k.spawn_consul_registration(client.clone(), config.consul_sync.clone(), cp);
        }
        sources::spawn_consul(cp, consul, client, own_node);
    }
    Ok(())
}

/// Completes on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
