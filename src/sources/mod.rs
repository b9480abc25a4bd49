//! Sources: where the model comes from. Each source moves data into the [`crate::index`]
//! and reports its health here, for `/readyz` and `/api/sources`.

pub mod consul;
pub mod files;
pub mod kube;

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

/// Health of one source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
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
}

/// The status of every source.
#[derive(Default)]
pub struct SourceStatuses(Mutex<BTreeMap<String, SourceStatus>>);

impl SourceStatuses {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, SourceStatus>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
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

    /// Updates one source.
    pub fn update(&self, name: &str, f: impl FnOnce(&mut SourceStatus)) {
        if let Some(s) = self.lock().get_mut(name) {
            f(s);
        }
    }

    /// Every source, by name.
    pub fn list(&self) -> Vec<SourceStatus> {
        self.lock().values().cloned().collect()
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
