//! Wiring: sources → index → debounced state → snapshot cache → ADS and admin servers.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
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
use crate::sources::kube::{KubeContext, KubeStore};
use crate::status::lease::LeaseSettings;
use crate::status::reconcile::{Published, StatusContext};
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
    /// The last published state and its name conflicts (for status).
    pub published_view: watch::Sender<Arc<Published>>,
    /// Recent published changes (`/api/changes`).
    pub changes: Arc<crate::admin::changes::BoundedLog<crate::admin::changes::Change>>,
}

impl ControlPlane {
    fn new(config: &RunConfig) -> Self {
        let metrics = Arc::new(Metrics::new());
        let sources = Arc::new(SourceStatuses::default());
        sources.attach_metrics(metrics.clone());
        ControlPlane {
            index: Arc::new(Mutex::new(Index::new())),
            changed: Arc::new(Notify::new()),
            cache: Arc::new(
                SnapshotCache::new(config.settings.clone())
                    .with_build_counter(metrics.snapshot_group_builds.clone()),
            ),
            registry: Arc::new(ProxyRegistry::default()),
            sources,
            metrics,
            published: AtomicU64::new(0),
            ready: Arc::new(AtomicBool::new(false)),
            published_view: watch::channel(Arc::new(Published::default())).0,
            changes: Arc::default(),
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
        let began = Instant::now();
        let (state, conflicts, generation, sizes) = {
            let index = self.index.lock().unwrap_or_else(|p| p.into_inner());
            let (state, conflicts) = index.build();
            (state, conflicts, index.generation(), index.sizes())
        };
        admin::record_index_sizes(&self.metrics, &sizes);
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
        self.metrics.access_policies.set(state.access.len() as i64);
        self.metrics.access_unknown_callers.set(
            state
                .access
                .values()
                .map(|p| state.resolve_callers(p.caller_names()).1.len() as i64)
                .sum(),
        );
        *previous = state.clone();
        let view = Arc::new(Published {
            state: state.clone(),
            conflicts,
        });
        let cache = self.cache.clone();
        let started = Instant::now();
        match tokio::task::spawn_blocking(move || cache.update(state)).await {
            Ok(report) => {
                let build = started.elapsed();
                self.metrics
                    .snapshot_build_seconds
                    .observe(build.as_secs_f64());
                admin::record_change(
                    &self.changes,
                    &self.metrics,
                    report.diff.clone(),
                    generation,
                    &report,
                    build,
                );
                self.metrics
                    .snapshot_inconsistent
                    .inc_by(report.inconsistent.len() as u64);
                self.published.store(generation, Ordering::Release);
                self.published_view.send_replace(view);
                info!(
                    groups = report.connected,
                    built = report.groups,
                    changed = report.changed,
                    state_ms = (started - began).as_secs_f64() * 1000.0,
                    build_ms = build.as_secs_f64() * 1000.0,
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

    let (stop_tx, stop_rx) = watch::channel(false);
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
    let webhook_on = webhook_cert.is_some();

    let kube_client = match args.kube {
        KubeMode::Off => None,
        KubeMode::Auto => crate::sources::kube::client_from_environment()
            .await
            .map_err(|e| BadConfig(format!("--kube auto: {e:#}")))?,
    };
    if kube_client.is_none() {
        info!("no Kubernetes source (--kube off, or neither in a cluster nor KUBECONFIG set)");
    }
    let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "meshbridge".into());
    if args.webhook_self_managed {
        let (Some(client), Some(cert)) = (&kube_client, &webhook_cert) else {
            return Err(BadConfig(
                "--webhook-self-managed keeps its certificate in Kubernetes: it needs --kube auto with a cluster or KUBECONFIG".into(),
            )
            .into());
        };
        let self_managed = crate::webhook::certs::SelfManaged {
            namespace: namespace.clone(),
            secret: args.webhook_secret.clone(),
            dns_names: crate::webhook::certs::SelfManaged::service_names(
                &args.webhook_service,
                &namespace,
            ),
            mutating: args.webhook_mutating_configuration.clone(),
            validating: args.webhook_validating_configuration.clone(),
        };
        tokio::spawn(crate::webhook::certs::run(
            client.clone(),
            self_managed,
            cert.clone(),
            stop_rx.clone(),
        ));
    }
    let identity = args.identity.clone().unwrap_or_else(|| {
        let name = std::env::var("POD_NAME").unwrap_or_else(|_| hostname());
        format!("{name}_{}", std::process::id())
    });
    let (leader_tx, leader_rx) = watch::channel(false);
    let store = Arc::new(Mutex::new(KubeStore::new()));
    let (epoch_tx, epoch_rx) = watch::channel(0u64);
    let (synced_tx, synced_rx) = watch::channel(false);
    let (registration_errors, registration_errors_rx) =
        watch::channel(std::collections::BTreeMap::new());
    let mut lease_task = None;
    if let Some(client) = &kube_client {
        cp.sources
            .register(crate::sources::kube::SOURCE, "kubernetes");
        let ctx = KubeContext {
            index: cp.index.clone(),
            changed: cp.changed.clone(),
            statuses: cp.sources.clone(),
            store: store.clone(),
            store_epoch: epoch_tx,
            synced: synced_tx,
            metrics: cp.metrics.clone(),
        };
        tokio::spawn(crate::sources::kube::run(
            client.clone(),
            args.namespaces.clone(),
            webhook_on,
            ctx,
        ));
        let lease = LeaseSettings {
            namespace: args.leader_election_namespace.clone().unwrap_or_else(|| {
                std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".to_string())
            }),
            name: args.leader_election_name.clone(),
            identity: identity.clone(),
            duration: std::time::Duration::from_secs(args.lease_duration),
        };
        {
            let (metrics, mut leader) = (cp.metrics.clone(), leader_rx.clone());
            tokio::spawn(async move {
                while leader.changed().await.is_ok() {
                    metrics.leader.set(i64::from(*leader.borrow_and_update()));
                }
            });
        }
        lease_task = Some(tokio::spawn(crate::status::lease::run(
            client.clone(),
            lease,
            leader_tx,
            stop_rx.clone(),
        )));
        let status = Arc::new(StatusContext::new(
            client.clone(),
            store.clone(),
            cp.published_view.subscribe(),
            registration_errors_rx.clone(),
            cp.metrics.clone(),
            &identity,
        ));
        tokio::spawn(run_status(
            status,
            args.namespaces.clone(),
            epoch_rx.clone(),
            leader_rx.clone(),
            cp.ready.clone(),
        ));
    }

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
            own_node: kube_client.as_ref().map(|_| args.consul_sync_node.clone()),
        };
        if kube_client.is_some() {
            let sync = crate::consul_sync::SyncContext {
                store: store.clone(),
                epoch: epoch_rx.clone(),
                synced: synced_rx.clone(),
                leader: leader_rx.clone(),
                errors: registration_errors,
                metrics: cp.metrics.clone(),
            };
            let settings = crate::consul_sync::SyncSettings {
                node: args.consul_sync_node.clone(),
                resync: std::time::Duration::from_secs(args.consul_sync_resync),
            };
            tokio::spawn(crate::consul_sync::run(client.clone(), settings, sync));
        }
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
    // Stops the admin server and the webhook after the drain: `/readyz` answers 503 and the
    // API server can still reach the webhook while the Service forgets this replica.
    let (admin_stop_tx, late_stop) = watch::channel(false);
    let mut addrs = BoundAddrs {
        xds: xds_listener.local_addr()?,
        admin: admin_listener.local_addr()?,
        webhook: None,
    };
    if let Some(cert) = webhook_cert {
        let listener = TcpListener::bind(args.webhook_addr)
            .await
            .with_context(|| format!("--webhook-addr {}: cannot listen", args.webhook_addr))?;
        addrs.webhook = Some(listener.local_addr()?);
        // Native sidecars where the cluster runs them; a regular container before 1.29.
        let mut native_sidecars_supported = true;
        if let (Some(client), false) = (&kube_client, args.no_native_sidecar) {
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
        };
        let state = crate::webhook::server::WebhookState {
            settings: Arc::new(settings),
            store: store.clone(),
            fail_closed: args.inject_fail_closed,
            synced: kube_client.as_ref().map(|_| synced_rx.clone()),
            metrics: cp.metrics.clone(),
        };
        tokio::spawn(crate::webhook::server::serve(
            listener,
            cert,
            state,
            std::time::Duration::from_secs(2),
            late_stop.clone(),
        ));
    }
    info!(xds = %addrs.xds, admin = %addrs.admin, webhook = ?addrs.webhook, "meshbridge listening");

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
    let draining = Arc::new(AtomicBool::new(false));
    let admin_state = AdminState {
        ready: cp.ready.clone(),
        draining: draining.clone(),
        changes: cp.changes.clone(),
        diagnostics_timeout: std::time::Duration::from_millis(args.diagnostics_timeout),
        peers: Arc::new(admin::compare::PeerSettings {
            urls: args.peers.clone(),
            dns: args.peers_dns.clone(),
            instance: identity.clone(),
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
    {
        let cp = cp.clone();
        tokio::spawn(async move { cp.become_ready().await });
    }
    let mut admin_stop = late_stop.clone();
    let admin = tokio::spawn(async move {
        axum::serve(
            admin_listener,
            router.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(async move {
            let _ = admin_stop.wait_for(|s| *s).await;
        })
        .await
    });
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
    if let Some(task) = lease_task {
        // Releases the Lease so another replica leads at once.
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), task).await;
    }
    // Streams are long-lived: serve them until they go or the drain period ends.
    let _ = tokio::time::timeout(drain, xds).await;
    let _ = admin_stop_tx.send(true);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), admin).await;
    Ok(())
}

/// Runs the status reconcilers while this replica leads (one pair per watched namespace),
/// once the control plane is ready.
async fn run_status(
    ctx: Arc<StatusContext>,
    namespaces: Vec<String>,
    epoch: watch::Receiver<u64>,
    mut leader: watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
) {
    // Status describes the model: none is written before the first complete one is
    // published (no "0 instances" flash while the sources are still listing).
    while !ready.load(Ordering::Acquire) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    loop {
        if leader.wait_for(|l| *l).await.is_err() {
            return;
        }
        info!("leading: writing MeshService and AccessRule status");
        let runs = scopes.iter().map(|scope| {
            let (epoch, published, errors) = (
                epoch.clone(),
                ctx.published.clone(),
                ctx.registration_errors.clone(),
            );
            let trigger = move || {
                use tokio_stream::wrappers::WatchStream;
                futures::stream::select_all([
                    WatchStream::from_changes(epoch.clone()).map(|_| ()).boxed(),
                    WatchStream::from_changes(published.clone())
                        .map(|_| ())
                        .boxed(),
                    WatchStream::from_changes(errors.clone())
                        .map(|_| ())
                        .boxed(),
                ])
            };
            let mut lost = leader.clone();
            let stop = async move {
                let _ = lost.wait_for(|l| !*l).await;
            };
            crate::status::reconcile::run(ctx.clone(), scope.clone(), trigger, stop)
        });
        futures::future::join_all(runs).await;
        info!("not leading: status writes stopped");
    }
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
