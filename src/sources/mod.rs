//! Sources: where the model comes from. Each source moves data into the [`crate::index`]
//! and reports its health here, for `/readyz` and `/api/sources`.

pub mod consul;
pub mod files;
pub mod kube;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::metrics::{Metrics, labels};

use serde::Serialize;

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
                .get_or_create(&labels(&[("source", name)]))
                .observe(elapsed.as_secs_f64());
        }
    }

    /// Sets the per-source gauges (staleness moves with the clock, so it is computed when
    /// scraped).
    pub fn refresh_metrics(&self) {
        let Some(m) = self.metrics.get() else { return };
        for s in self.list() {
            let l = labels(&[("source", &s.name)]);
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
                .get_or_create(&labels(&[("source", name)]))
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
