//! The publisher: index changes, debounced, become a mesh state that the snapshot cache
//! turns into every connected group's snapshot.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use tokio::sync::{Notify, watch};
use tracing::{info, warn};

use crate::admin;
use crate::config::RunConfig;
use crate::metrics::Metrics;
use crate::model::MeshState;
use crate::sources::{IndexHandle, SourceStatuses};
use crate::status::reconcile::Published;
use crate::xds::cache::SnapshotCache;
use crate::xds::registry::ProxyRegistry;

/// Shared parts of a running control plane.
pub struct ControlPlane {
    /// Every source's objects; changes applied through it wake the publisher.
    pub index: IndexHandle,
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
    /// The long-lived tasks.
    pub tasks: Arc<super::supervise::Supervisor>,
    /// Load reports from the proxies.
    pub load: Arc<crate::xds::lrs::LoadState>,
}

impl ControlPlane {
    pub(super) fn new(config: &RunConfig) -> Self {
        let index = IndexHandle::new();
        index.update(|i| i.set_consul_owners(config.consul_owners.clone()));
        let metrics = Arc::new(Metrics::new());
        let sources = Arc::new(SourceStatuses::default());
        sources.attach_metrics(metrics.clone());
        // Every supervised task's series exists at zero from the start.
        for task in super::supervise::task::ALL {
            let _ = metrics
                .tasks_ended
                .get_or_create(&crate::metrics::label::Task { task });
        }
        ControlPlane {
            index,
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
            tasks: Arc::default(),
            load: Arc::new(crate::xds::lrs::LoadState::new(
                config.xds.load_report_interval,
            )),
        }
    }

    /// Waits until every source has synced and a state containing that sync is published,
    /// then latches readiness (a later source error does not make a serving instance unready).
    pub(super) async fn become_ready(&self) {
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
        self.index.generation()
    }

    /// Builds the mesh state from the index and publishes it to every connected group.
    async fn publish(&self, previous: &mut MeshState) {
        let began = Instant::now();
        let (state, conflicts, foreign, generation, sizes) = self.index.read(|index| {
            let (state, conflicts, foreign) = index.build_full();
            (state, conflicts, foreign, index.generation(), index.sizes())
        });
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
            foreign,
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

/// Publishes the first state (before any proxy can connect), then every debounced batch of
/// index changes, forever.
pub(super) async fn spawn(cp: Arc<ControlPlane>, window: std::time::Duration) {
    let mut previous = MeshState::default();
    let mut debouncer = Debouncer::new(window, cp.generation());
    cp.publish(&mut previous).await;
    let tasks = cp.tasks.clone();
    tasks.spawn(super::supervise::task::PUBLISHER, async move {
        loop {
            debouncer.next(cp.index.changes(), || cp.generation()).await;
            cp.metrics.debounce_batches.inc();
            cp.publish(&mut previous).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
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
