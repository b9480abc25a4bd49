//! Wiring: sources → index → debounced state → snapshot cache → ADS and admin servers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::admin::{self, AdminState};
use crate::config::{KubeMode, RunConfig};
use crate::index::Index;
use crate::metrics::Metrics;
use crate::model::MeshState;
use crate::sources::SourceStatuses;
use crate::sources::files::ConfigDirSource;
use crate::xds::cache::SnapshotCache;
use crate::xds::registry::ProxyRegistry;
use crate::xds::{AdsService, XdsContext};

/// Shared parts of a running control plane.
pub struct ControlPlane {
    /// Every source's objects.
    pub index: Arc<Mutex<Index>>,
    /// Signals that the index changed.
    pub changed: Arc<Notify>,
    /// Snapshots per group.
    pub cache: Arc<SnapshotCache>,
    /// Connected proxies.
    pub registry: Arc<ProxyRegistry>,
    /// Source health.
    pub sources: Arc<SourceStatuses>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
}

impl ControlPlane {
    fn new(config: &RunConfig) -> Self {
        ControlPlane {
            index: Arc::new(Mutex::new(Index::new())),
            changed: Arc::new(Notify::new()),
            cache: Arc::new(SnapshotCache::new(config.settings.clone())),
            registry: Arc::new(ProxyRegistry::default()),
            sources: Arc::new(SourceStatuses::default()),
            metrics: Arc::new(Metrics::new()),
        }
    }

    /// Builds the mesh state from the index and publishes it to every connected group.
    async fn publish(&self, previous: &mut MeshState) {
        let state = self.index.lock().unwrap_or_else(|p| p.into_inner()).state();
        for (name, old) in &previous.services {
            let had = old.healthy_endpoints().count();
            let now = state
                .services
                .get(name)
                .map_or(0, |s| s.healthy_endpoints().count());
            if had > 0 && now == 0 {
                warn!(service = %name, instances = had, "change removes every instance of the service (applied)");
                self.metrics.services_emptied.inc();
            }
        }
        self.metrics.services.set(state.services.len() as i64);
        self.metrics.endpoints.set(
            state
                .services
                .values()
                .map(|s| s.endpoints.len() as i64)
                .sum(),
        );
        *previous = state.clone();
        let cache = self.cache.clone();
        let started = Instant::now();
        match tokio::task::spawn_blocking(move || cache.update(state)).await {
            Ok(report) => {
                self.metrics
                    .snapshot_build_seconds
                    .observe(started.elapsed().as_secs_f64());
                self.metrics
                    .snapshot_inconsistent
                    .inc_by(report.inconsistent.len() as u64);
                info!(
                    groups = report.groups,
                    changed = report.changed,
                    "mesh state published"
                );
            }
            Err(e) => warn!(error = %e, "snapshot rebuild failed"),
        }
    }
}

/// Addresses the servers actually bound (useful with port 0).
#[derive(Clone, Copy, Debug)]
pub struct BoundAddrs {
    /// ADS.
    pub xds: SocketAddr,
    /// Admin API.
    pub admin: SocketAddr,
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

    if args.kube == KubeMode::Auto
        && (std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            || std::env::var_os("KUBECONFIG").is_some())
    {
        warn!(
            "a Kubernetes configuration is present, but this version of meshbridge has no Kubernetes source; continuing with the other sources"
        );
    }
    info!("admission webhook off (no --webhook-cert-dir or --webhook-self-managed)");

    if let Some(dir) = &args.config_dir {
        let mut source = ConfigDirSource::new(dir.clone());
        cp.sources.register(source.name(), "config");
        let (index, sources) = (cp.index.clone(), cp.sources.clone());
        let (source, report) = tokio::task::spawn_blocking(move || {
            let r = source.scan(&index, &sources);
            (source, r)
        })
        .await
        .context("first scan of --config-dir")?;
        cp.metrics.config_errors.set(report.bad_files as i64);
        let (index, sources, changed, metrics) = (
            cp.index.clone(),
            cp.sources.clone(),
            cp.changed.clone(),
            cp.metrics.clone(),
        );
        tokio::spawn(
            source.run(config.config_poll, index, sources, move |report| {
                metrics.config_errors.set(report.bad_files as i64);
                if report.changed {
                    changed.notify_one();
                }
            }),
        );
    }

    // The first state is published before any proxy can connect.
    let mut previous = MeshState::default();
    cp.publish(&mut previous).await;
    {
        let cp = cp.clone();
        let debounce = config.debounce;
        tokio::spawn(async move {
            loop {
                cp.changed.notified().await;
                tokio::time::sleep(debounce).await;
                cp.metrics.debounce_batches.inc();
                cp.publish(&mut previous).await;
            }
        });
    }

    let xds_listener = TcpListener::bind(args.xds_addr)
        .await
        .with_context(|| format!("--xds-addr {}: cannot listen", args.xds_addr))?;
    let admin_listener = TcpListener::bind(args.admin_addr)
        .await
        .with_context(|| format!("--admin-addr {}: cannot listen", args.admin_addr))?;
    let addrs = BoundAddrs {
        xds: xds_listener.local_addr()?,
        admin: admin_listener.local_addr()?,
    };
    info!(xds = %addrs.xds, admin = %addrs.admin, "meshbridge listening");

    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Arc::new(XdsContext {
        cache: cp.cache.clone(),
        registry: cp.registry.clone(),
        metrics: cp.metrics.clone(),
        control_plane: format!("meshbridge/{}", hostname()),
    });
    let mut xds_stop = stop_rx.clone();
    let xds = tokio::spawn(
        tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .add_service(AdsService::new(ctx).into_server())
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(xds_listener),
                async move {
                    let _ = xds_stop.wait_for(|s| *s).await;
                },
            ),
    );
    let router = admin::router(AdminState {
        cache: cp.cache.clone(),
        registry: cp.registry.clone(),
        sources: cp.sources.clone(),
        metrics: cp.metrics.clone(),
    });
    let mut admin_stop = stop_rx.clone();
    let admin = tokio::spawn(async move {
        axum::serve(admin_listener, router)
            .with_graceful_shutdown(async move {
                let _ = admin_stop.wait_for(|s| *s).await;
            })
            .await
    });
    if let Some(tx) = bound {
        let _ = tx.send(addrs);
    }

    shutdown.await;
    info!("shutting down");
    let _ = stop_tx.send(true);
    // Streams are long-lived: give them a moment, then stop regardless.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let _ = xds.await;
        let _ = admin.await;
    })
    .await;
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
