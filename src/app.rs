//! Wiring: sources → index → debounced state → snapshot cache → ADS and admin servers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
use crate::sources::consul::{
    ConsulClient, ConsulContext, ConsulSettings, HealthPolicy, watch_datacenter,
};
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
    /// Index generation of the last published state.
    pub published: AtomicU64,
    /// Latched once every source has synced and that sync is published (`/readyz`).
    pub ready: Arc<AtomicBool>,
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
            published: AtomicU64::new(0),
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Waits until every source has synced and a state containing that sync is published,
    /// then latches readiness (a later source error does not make a serving instance unready).
    async fn become_ready(&self) {
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
        loop {
            tick.tick().await;
            if self.sources.all_synced() {
                break;
            }
        }
        let synced_at = self.generation();
        while self.published.load(Ordering::Acquire) < synced_at {
            tick.tick().await;
        }
        self.ready.store(true, Ordering::Release);
        info!("ready: every source synced and published");
    }

    fn generation(&self) -> u64 {
        self.index
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .generation()
    }

    /// Builds the mesh state from the index and publishes it to every connected group.
    async fn publish(&self, previous: &mut MeshState) {
        let (state, generation) = {
            let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
            (index.state(), index.generation())
        };
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
                self.published.store(generation, Ordering::Release);
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

/// Coalesces index changes: the first change signal opens a batch that closes `window`
/// later; changes arriving meanwhile join it. A batch whose changes were already published
/// (the signal raced with the previous batch) is skipped.
pub struct Debouncer {
    window: std::time::Duration,
    published: u64,
}

impl Debouncer {
    /// A debouncer that considers `generation` already published.
    pub fn new(window: std::time::Duration, generation: u64) -> Self {
        Debouncer {
            window,
            published: generation,
        }
    }

    /// Waits for the next batch and returns the index generation it covers.
    pub async fn next(&mut self, changed: &Notify, generation: impl Fn() -> u64) -> u64 {
        loop {
            changed.notified().await;
            tokio::time::sleep(self.window).await;
            let g = generation();
            if g != self.published {
                self.published = g;
                return g;
            }
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

    if let Some(addr) = &args.consul_addr {
        let settings = ConsulSettings {
            addr: addr.clone(),
            datacenters: args.consul_datacenters.clone(),
            token_file: args.consul_token_file.clone(),
            ca_file: args.consul_ca_file.clone(),
            health: if args.consul_include_warning {
                HealthPolicy::PassingAndWarning
            } else {
                HealthPolicy::PassingOnly
            },
            wait: std::time::Duration::from_millis(args.consul_wait),
            max_connections: args.consul_max_connections,
        };
        let client = ConsulClient::new(&settings).map_err(|e| anyhow::anyhow!("{e}"))?;
        let ctx = ConsulContext {
            index: cp.index.clone(),
            changed: cp.changed.clone(),
            statuses: cp.sources.clone(),
            metrics: cp.metrics.clone(),
            health: settings.health,
            flap_hold: std::time::Duration::from_millis(args.consul_flap_hold),
        };
        // Registered before any request, so /readyz waits for every datacenter.
        let pending = "consul:(agent datacenter)";
        if settings.datacenters.is_empty() {
            cp.sources.register(pending, "consul");
        }
        for dc in &settings.datacenters {
            cp.sources
                .register(&crate::sources::consul::source_name(dc), "consul");
        }
        let sources = cp.sources.clone();
        tokio::spawn(async move {
            let mut datacenters = settings.datacenters.clone();
            let mut failures = 0;
            while datacenters.is_empty() {
                match client.agent_datacenter().await {
                    Ok(dc) => {
                        sources.register(&crate::sources::consul::source_name(&dc), "consul");
                        sources.remove(pending);
                        datacenters.push(dc);
                    }
                    Err(e) => {
                        failures += 1;
                        warn!(error = %e, "cannot learn the Consul agent's datacenter; retrying");
                        sources.update(pending, |s| s.error = Some(e.to_string()));
                        tokio::time::sleep(crate::sources::consul::backoff(failures)).await;
                    }
                }
            }
            for dc in datacenters {
                tokio::spawn(watch_datacenter(client.clone(), dc, ctx.clone()));
            }
        });
    }

    // The first state is published before any proxy can connect.
    let mut previous = MeshState::default();
    let mut debouncer = Debouncer::new(config.debounce, cp.generation());
    cp.publish(&mut previous).await;
    {
        let cp = cp.clone();
        tokio::spawn(async move {
            loop {
                debouncer.next(&cp.changed, || cp.generation()).await;
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
        ready: cp.ready.clone(),
    });
    {
        let cp = cp.clone();
        tokio::spawn(async move { cp.become_ready().await });
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_becomes_one_batch_at_most_one_window_after_the_first() {
        let changed = Arc::new(Notify::new());
        let generation = Arc::new(AtomicU64::new(0));
        let batches = Arc::new(Mutex::new(Vec::new()));
        let started = tokio::time::Instant::now();
        {
            let (changed, generation, batches) =
                (changed.clone(), generation.clone(), batches.clone());
            tokio::spawn(async move {
                let mut d = Debouncer::new(Duration::from_millis(100), 0);
                loop {
                    let g = d.next(&changed, || generation.load(Ordering::SeqCst)).await;
                    batches.lock().unwrap().push((g, started.elapsed()));
                }
            });
        }
        // 20 changes 5 ms apart (a flapping instance): one batch, 100 ms after the first.
        for _ in 0..20 {
            generation.fetch_add(1, Ordering::SeqCst);
            changed.notify_one();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            *batches.lock().unwrap(),
            vec![(20, Duration::from_millis(100))]
        );
        // A later change is its own batch.
        generation.fetch_add(1, Ordering::SeqCst);
        changed.notify_one();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let b = batches.lock().unwrap().clone();
        assert_eq!(b.len(), 2);
        assert_eq!(b[1].0, 21);
    }
}
