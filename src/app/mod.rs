//! Wiring, top to bottom: the sources feed the index through one handle; the publisher
//! turns debounced index changes into snapshots; the servers serve them. With Kubernetes,
//! the watchers also feed a store that the status writer, the webhook and the Consul
//! registration read. Each part is started by its own function; this module only orders
//! them and stops them.

mod kubernetes;
mod publish;
mod servers;
mod sources;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::info;

use crate::config::{KubeMode, RunConfig};
use crate::sources::kube::KubeStore;
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
    let args = &config.args;
    // Turns true at shutdown: the lease is released, ADS stops taking streams.
    let (stop_tx, stop) = watch::channel(false);
    // Turns true after the drain: the admin server (`/readyz` answers 503 meanwhile) and
    // the webhook (the API server can still reach it while the Service forgets this replica).
    let (late_stop_tx, late_stop) = watch::channel(false);

    let webhook_cert = match &args.webhook_cert_dir {
        Some(dir) => Some(Arc::new(
            crate::webhook::server::ReloadingCert::new(dir)
                .map_err(|e| BadConfig(format!("--webhook-cert-dir: {e}")))?,
        )),
        // Filled in by the self-managed loop once the Kubernetes client exists.
        None if args.webhook_self_managed => {
            Some(Arc::new(crate::webhook::server::ReloadingCert::empty()))
        }
        None => {
            info!("admission webhook off (no --webhook-cert-dir or --webhook-self-managed)");
            None
        }
    };
    // Files the servers need, read before anything starts: a bad one fails the start.
    let xds_tls = servers::xds_tls(&config, stop.clone())?;
    let kube_client = match args.kube {
        KubeMode::Off => None,
        KubeMode::Auto => crate::sources::kube::client_from_environment()
            .await
            .map_err(|e| BadConfig(format!("--kube auto: {e:#}")))?,
    };
    let admin_auth = servers::admin_auth(args, kube_client.as_ref())?;
    if kube_client.is_none() {
        info!("no Kubernetes source (--kube off, or neither in a cluster nor KUBECONFIG set)");
    }
    let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "meshbridge".into());
    let identity = args.identity.clone().unwrap_or_else(|| {
        let name = std::env::var("POD_NAME").unwrap_or_else(|_| hostname());
        format!("{name}_{}", std::process::id())
    });

    // Sources.
    let mut kube = match &kube_client {
        Some(client) => {
            if let (true, Some(cert)) = (args.webhook_self_managed, &webhook_cert) {
                kubernetes::spawn_webhook_certificate(
                    client,
                    args,
                    &namespace,
                    cert.clone(),
                    stop.clone(),
                );
            }
            Some(Kubernetes::spawn(
                client,
                &cp,
                args,
                &identity,
                webhook_cert.is_some(),
                stop.clone(),
            ))
        }
        None if args.webhook_self_managed => {
            return Err(BadConfig(
                "--webhook-self-managed keeps its certificate in Kubernetes: it needs --kube auto with a cluster or KUBECONFIG".into(),
            )
            .into());
        }
        None => None,
    };
    if let Some(dir) = &args.config_dir {
        sources::spawn_config_dir(&cp, dir, config.config_poll).await?;
    }
    if let Some(addr) = &args.consul_addr {
        let (client, settings) = sources::consul_client(args, addr)?;
        if let Some(k) = kube.as_mut() {
            k.spawn_consul_registration(client.clone(), args, &cp);
        }
        let own_node = kube.as_ref().map(|_| args.consul_sync_node.clone());
        sources::spawn_consul(&cp, args, client, settings, own_node);
    }

    // The publisher: the first state is published before any proxy can connect.
    publish::spawn(cp.clone(), config.debounce).await;

    // Servers.
    let listeners = Listeners::bind(args, webhook_cert.is_some()).await?;
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
            args,
            &namespace,
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
    let admin = servers::spawn_admin(
        &cp,
        args,
        &identity,
        (admin, admin_local),
        admin_auth,
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

    shutdown.await;
    let drain = std::time::Duration::from_millis(args.drain);
    info!(
        drain_ms = args.drain,
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
    Ok(())
}

fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unknown".to_string())
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
