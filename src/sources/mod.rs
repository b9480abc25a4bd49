//! Sources: where the model comes from. Each source moves data into the [`crate::index`]
//! through one [`IndexHandle`], and reports its health here, for `/readyz` and
//! `/api/sources`.

pub mod consul;
pub mod files;
pub mod kube;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use tokio::sync::Notify;

use crate::index::{Index, IndexObject};
use crate::metrics::{Metrics, label};

use serde::Serialize;

/// The one way into the index: every change applied through it signals the publisher, and
/// only a change that moved the index does (an identical object applied again wakes
/// nothing).
#[derive(Clone, Default)]
pub struct IndexHandle {
    index: Arc<Mutex<Index>>,
    changed: Arc<Notify>,
}

impl IndexHandle {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the index under its lock (several changes, one signal); signals when the
    /// index generation moved. Returns `f`'s result.
    pub fn update<R>(&self, f: impl FnOnce(&mut Index) -> R) -> R {
        let (result, moved) = {
            let mut index = self.index.lock().unwrap_or_else(|p| p.into_inner());
            let before = index.generation();
            let result = f(&mut index);
            (result, index.generation() != before)
        };
        if moved {
            self.changed.notify_one();
        }
        result
    }

    /// Sets what `source` says under `key`; whether that changed anything.
    pub fn apply(&self, source: &str, key: &str, objects: Vec<IndexObject>) -> bool {
        self.update(|i| i.apply(source, key, objects))
    }

    /// Removes what `source` said under `key`; whether there was anything.
    pub fn delete(&self, source: &str, key: &str) -> bool {
        self.update(|i| i.delete(source, key))
    }

    /// Reads the index under its lock.
    pub fn read<R>(&self, f: impl FnOnce(&Index) -> R) -> R {
        f(&self.index.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The index generation (moves with every change).
    pub fn generation(&self) -> u64 {
        self.read(Index::generation)
    }

    /// Signalled after changes (a burst of changes may signal once).
    pub fn changes(&self) -> &Notify {
        &self.changed
    }
}

/// Health of one source.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct SourceStatus {
    /// Source name, e.g. `config:/etc/meshbridge`.
    pub name: String,
    /// `consul`, `kubernetes` or `config`.
    pub kind: &'static str,
    /// Whether the first full sync completed.
    pub synced: bool,
    /// Seconds since the Unix epoch of the last successful sync.
    pub last_sync: Option<u64>,
    /// The current problems, one line each (a bad manifest names its file and line); null
    /// when healthy.
    pub error: Option<String>,
    /// How many times the source entered an error, or its error changed.
    pub errors: u64,
    /// Seconds since the last successful sync (filled in by [`SourceStatuses::list`]).
    pub staleness_seconds: Option<u64>,
    /// How long the last sync step took (a config-dir scan, a Consul service fetch, the
    /// Kubernetes initial list), in milliseconds.
    pub last_sync_duration_ms: Option<f64>,
}

/// The status of every source.
#[derive(Default)]
pub struct SourceStatuses {
    sources: Mutex<BTreeMap<String, SourceStatus>>,
    metrics: OnceLock<Arc<Metrics>>,
}

impl SourceStatuses {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, SourceStatus>> {
        self.sources.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reports source health in these metrics from now on.
    pub fn attach_metrics(&self, metrics: Arc<Metrics>) {
        let _ = self.metrics.set(metrics);
    }

    /// Records how long one sync step of a source took.
    pub fn observe_sync(&self, name: &str, elapsed: Duration) {
        if let Some(s) = self.lock().get_mut(name) {
            s.last_sync_duration_ms = Some(elapsed.as_secs_f64() * 1000.0);
        }
        if let Some(m) = self.metrics.get() {
            m.source_sync_seconds
                .get_or_create(&label::Source {
                    source: name.to_string(),
                })
                .observe(elapsed.as_secs_f64());
        }
    }

    /// Sets the per-source gauges (staleness moves with the clock, so it is computed when
    /// scraped).
    pub fn refresh_metrics(&self) {
        let Some(m) = self.metrics.get() else { return };
        for s in self.list() {
            let l = label::Source {
                source: s.name.clone(),
            };
            m.source_synced.get_or_create(&l).set(i64::from(s.synced));
            m.source_staleness_seconds
                .get_or_create(&l)
                .set(s.staleness_seconds.map_or(-1, |x| x as i64));
            // Present from the start, so a rate over it is defined before the first error.
            let _ = m.source_errors.get_or_create(&l);
        }
    }

    /// Adds a source that has not synced yet.
    pub fn register(&self, name: &str, kind: &'static str) {
        self.lock().insert(
            name.to_string(),
            SourceStatus {
                name: name.to_string(),
                kind,
                ..Default::default()
            },
        );
    }

    /// Forgets a source.
    pub fn remove(&self, name: &str) {
        self.lock().remove(name);
    }

    /// Updates one source. A new or different error counts as one more error.
    pub fn update(&self, name: &str, f: impl FnOnce(&mut SourceStatus)) {
        let mut counted = false;
        if let Some(s) = self.lock().get_mut(name) {
            let before = s.error.clone();
            f(s);
            if s.error.is_some() && s.error != before {
                s.errors += 1;
                counted = true;
            }
        }
        if counted && let Some(m) = self.metrics.get() {
            m.source_errors
                .get_or_create(&label::Source {
                    source: name.to_string(),
                })
                .inc();
        }
    }

    /// Every source, by name, with its staleness now.
    pub fn list(&self) -> Vec<SourceStatus> {
        let now = now_secs();
        self.lock()
            .values()
            .map(|s| SourceStatus {
                staleness_seconds: s.last_sync.map(|t| now.saturating_sub(t)),
                ..s.clone()
            })
            .collect()
    }

    /// Whether one source completed its first sync.
    pub fn is_synced(&self, name: &str) -> bool {
        self.lock().get(name).is_some_and(|s| s.synced)
    }

    /// Whether every source completed its first sync.
    pub fn all_synced(&self) -> bool {
        self.lock().values().all(|s| s.synced)
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn orders(port: u16) -> Vec<IndexObject> {
        let text = format!(
            "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {{name: orders}}\nspec:\n  endpoints: [{{address: 10.0.0.1, port: {port}}}]\n"
        );
        files::parse_manifests("orders.yaml", &text).unwrap()
    }

    /// Whether the handle has signalled since the last call (a pending signal completes at
    /// once; none does not complete within the paused clock's minute).
    async fn signalled(handle: &IndexHandle) -> bool {
        tokio::time::timeout(Duration::from_secs(60), handle.changes().notified())
            .await
            .is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn the_handle_signals_the_changes_that_moved_the_index_and_only_those() {
        let handle = IndexHandle::new();
        assert!(handle.apply("config", "orders.yaml", orders(80)));
        assert!(signalled(&handle).await);
        // The same objects again: nothing moved, nobody is woken.
        assert!(!handle.apply("config", "orders.yaml", orders(80)));
        assert!(!signalled(&handle).await);
        // Several changes under one lock: one signal, and the index has them all.
        handle.update(|i| {
            i.apply("config", "orders.yaml", orders(81));
            i.delete("config", "gone.yaml");
        });
        assert!(signalled(&handle).await);
        assert!(!signalled(&handle).await);
        let state = handle.read(|i| i.state());
        assert_eq!(state.services["orders"].endpoints[0].port, 81);
        assert!(handle.delete("config", "orders.yaml"));
        assert!(signalled(&handle).await);
        assert!(handle.read(|i| i.state()).services.is_empty());
    }
}
