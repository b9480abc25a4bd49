//! The snapshot cache: the newest snapshot of every proxy group with a connected stream.
//!
//! Streams subscribe to their group and get a `watch` receiver: a slow stream only ever
//! misses intermediate versions, it never holds up a push to the others. A new mesh state
//! rebuilds each connected group once, however many proxies share it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::model::{MeshSettings, MeshState, ProxyGroup};
use crate::snapshot::{self, EncodedMesh, Snapshot};
use crate::translate;

struct GroupEntry {
    tx: watch::Sender<Arc<Snapshot>>,
    streams: usize,
}

struct Inner {
    state: Arc<MeshState>,
    mesh: Arc<EncodedMesh>,
    groups: HashMap<ProxyGroup, GroupEntry>,
}

/// What a state update did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpdateReport {
    /// Groups whose snapshot was rebuilt.
    pub groups: usize,
    /// Groups whose snapshot changed and was pushed.
    pub changed: usize,
    /// Groups whose new snapshot was inconsistent (the previous one stays in force).
    pub inconsistent: Vec<(String, String)>,
    /// Ids of the groups whose snapshot changed.
    pub pushed: Vec<String>,
    /// Time each group's snapshot took to build, in seconds.
    pub build_seconds: Vec<f64>,
}

/// Snapshots per proxy group.
pub struct SnapshotCache {
    settings: MeshSettings,
    inner: Mutex<Inner>,
}

impl SnapshotCache {
    /// A cache over an empty mesh.
    pub fn new(settings: MeshSettings) -> Self {
        SnapshotCache {
            settings,
            inner: Mutex::new(Inner {
                state: Arc::new(MeshState::default()),
                mesh: Arc::new(EncodedMesh::default()),
                groups: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The operator settings translation uses.
    pub fn settings(&self) -> &MeshSettings {
        &self.settings
    }

    /// The mesh state in force.
    pub fn state(&self) -> Arc<MeshState> {
        self.lock().state.clone()
    }

    fn build(
        &self,
        state: &MeshState,
        mesh: &EncodedMesh,
        group: &ProxyGroup,
    ) -> Result<Snapshot, snapshot::InconsistentSnapshot> {
        let resources = translate::group_resources(state, &self.settings, group);
        snapshot::build(mesh, &resources)
    }

    /// Registers a stream of `group` and returns its snapshot channel.
    pub fn subscribe(&self, group: &ProxyGroup) -> watch::Receiver<Arc<Snapshot>> {
        let mut inner = self.lock();
        if let Some(entry) = inner.groups.get_mut(group) {
            entry.streams += 1;
            return entry.tx.subscribe();
        }
        let snap = match self.build(&inner.state, &inner.mesh, group) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(group = %group.id(), error = %e, "first snapshot of group is inconsistent; serving an empty one");
                Snapshot::default()
            }
        };
        let (tx, rx) = watch::channel(Arc::new(snap));
        inner
            .groups
            .insert(group.clone(), GroupEntry { tx, streams: 1 });
        rx
    }

    /// Unregisters a stream of `group`; the group is forgotten with its last stream.
    pub fn unsubscribe(&self, group: &ProxyGroup) {
        let mut inner = self.lock();
        if let Some(entry) = inner.groups.get_mut(group) {
            entry.streams = entry.streams.saturating_sub(1);
            if entry.streams == 0 {
                inner.groups.remove(group);
            }
        }
    }

    /// The current snapshot of a connected group.
    pub fn snapshot(&self, group: &ProxyGroup) -> Option<Arc<Snapshot>> {
        self.lock().groups.get(group).map(|e| e.tx.borrow().clone())
    }

    /// Number of groups with at least one stream.
    pub fn group_count(&self) -> usize {
        self.lock().groups.len()
    }

    /// Installs a new mesh state and rebuilds every connected group; only groups whose
    /// snapshot changed wake their streams.
    pub fn update(&self, state: MeshState) -> UpdateReport {
        let state = Arc::new(state);
        let mesh = Arc::new(snapshot::encode_mesh(&translate::mesh_resources(
            &state,
            &self.settings,
        )));
        let groups: Vec<ProxyGroup> = {
            let mut inner = self.lock();
            inner.state = state.clone();
            inner.mesh = mesh.clone();
            inner.groups.keys().cloned().collect()
        };
        let mut report = UpdateReport {
            groups: groups.len(),
            ..Default::default()
        };
        let built: Vec<(ProxyGroup, Result<Snapshot, _>)> = groups
            .into_iter()
            .map(|g| {
                let started = std::time::Instant::now();
                let s = self.build(&state, &mesh, &g);
                report.build_seconds.push(started.elapsed().as_secs_f64());
                (g, s)
            })
            .collect();
        let inner = self.lock();
        for (group, result) in built {
            let Some(entry) = inner.groups.get(&group) else {
                continue;
            };
            match result {
                Ok(snap) => {
                    let snap = Arc::new(snap);
                    let changed = entry.tx.send_if_modified(|current| {
                        if current.same_versions(&snap) {
                            false
                        } else {
                            *current = snap.clone();
                            true
                        }
                    });
                    tracing::debug!(group = %group.id(), changed, version = %snap.version_all(), "group snapshot rebuilt");
                    if changed {
                        report.changed += 1;
                        report.pushed.push(group.id());
                    }
                }
                Err(e) => {
                    tracing::error!(group = %group.id(), error = %e, "inconsistent snapshot not published; previous one stays in force");
                    report.inconsistent.push((group.id(), e.to_string()));
                }
            }
        }
        report
    }
}
