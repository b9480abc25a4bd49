//! The snapshot cache: the newest snapshot of every proxy group with a connected stream.
//!
//! Streams subscribe to their group and get a `watch` receiver: a slow stream only ever
//! misses intermediate versions, it never holds up a push to the others.
//!
//! Work follows the change. A new mesh state is compared with the one in force
//! ([`crate::model::diff_states`]); a reverse index from each service and access target to
//! the groups whose snapshot reads it ([`translate::Reads`]) names the groups to rebuild, and
//! only those are rebuilt. Shared work is done once per state: the clusters and assignments
//! of changed services are encoded once ([`EncodedMesh::updated`]), and each ingress and
//! egress is built and encoded once per spec ([`IngressSpec`], [`EgressSpec`]) and shared by
//! every group with that spec — all wildcard groups share one 1,000-virtual-host route. Builds
//! run outside the cache's lock, in parallel up to the machine's cores.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use prometheus_client::metrics::counter::Counter;
use tokio::sync::watch;

use crate::model::{MeshSettings, MeshState, ProxyGroup, StateDiff, diff_states};
use crate::snapshot::{
    self, EncodedMesh, InconsistentSnapshot, ResolvedPart, SharedMaps, Snapshot,
};
use crate::translate::{self, EgressSpec, IngressSpec, Reads};

/// One built part, resolved against the state's mesh resources, and what it read.
type BuiltPart = (Arc<ResolvedPart>, Reads);

/// Ingress and egress parts of one mesh state, by spec. Each is built by the first group that
/// needs it; groups asking at the same time wait for that one build.
#[derive(Default)]
struct PartMemo {
    ingress: Mutex<HashMap<IngressSpec, Arc<OnceLock<BuiltPart>>>>,
    egress: Mutex<HashMap<EgressSpec, Arc<OnceLock<BuiltPart>>>>,
}

/// The memo cell of `key`, built by `build` if nobody built it yet.
fn memo_get<K: Clone + Eq + std::hash::Hash>(
    map: &Mutex<HashMap<K, Arc<OnceLock<BuiltPart>>>>,
    key: &K,
    build: impl FnOnce() -> BuiltPart,
) -> Arc<OnceLock<BuiltPart>> {
    let cell = {
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(key) {
            Some(cell) => cell.clone(),
            None => map.entry(key.clone()).or_default().clone(),
        }
    };
    cell.get_or_init(build);
    cell
}

/// The parts of `map` still valid after `diff` and still used by a connected group (whose
/// entry holds the cell).
fn memo_carry<K: Clone + Eq + std::hash::Hash>(
    map: &Mutex<HashMap<K, Arc<OnceLock<BuiltPart>>>>,
    diff: &StateDiff,
) -> HashMap<K, Arc<OnceLock<BuiltPart>>> {
    let map = map.lock().unwrap_or_else(|p| p.into_inner());
    map.iter()
        .filter(|(_, cell)| {
            Arc::strong_count(cell) > 1
                && cell.get().is_some_and(|(_, reads)| {
                    !reads.affected_by(diff.services(), diff.access_changed.iter())
                })
        })
        .map(|(k, cell)| (k.clone(), cell.clone()))
        .collect()
}

/// One published mesh state and what is built from it.
struct World {
    generation: u64,
    state: Arc<MeshState>,
    mesh: Arc<EncodedMesh>,
    parts: PartMemo,
    /// Per-type resource maps shared by the snapshots built in this state.
    maps: SharedMaps,
}

struct GroupEntry {
    group: ProxyGroup,
    tx: watch::Sender<Arc<Snapshot>>,
    streams: usize,
    reads: Reads,
    /// The memo cells of the parts the group uses: a part no group uses is not carried into
    /// the next state.
    parts: Vec<Arc<OnceLock<BuiltPart>>>,
}

/// From each service and access target to the groups whose snapshot reads it.
#[derive(Default)]
struct ReverseIndex {
    by_service: HashMap<String, HashSet<u64>>,
    by_access: HashMap<String, HashSet<u64>>,
    by_glob: HashMap<String, HashSet<u64>>,
    every_service: HashSet<u64>,
}

impl ReverseIndex {
    fn insert(&mut self, id: u64, reads: &Reads) {
        for s in &reads.services {
            self.by_service.entry(s.clone()).or_default().insert(id);
        }
        for t in &reads.access {
            self.by_access.entry(t.clone()).or_default().insert(id);
        }
        for g in &reads.service_globs {
            self.by_glob.entry(g.clone()).or_default().insert(id);
        }
        if reads.every_service {
            self.every_service.insert(id);
        }
    }

    fn remove(&mut self, id: u64, reads: &Reads) {
        fn drop_from(map: &mut HashMap<String, HashSet<u64>>, key: &str, id: u64) {
            if let Some(ids) = map.get_mut(key) {
                ids.remove(&id);
                if ids.is_empty() {
                    map.remove(key);
                }
            }
        }
        for s in &reads.services {
            drop_from(&mut self.by_service, s, id);
        }
        for t in &reads.access {
            drop_from(&mut self.by_access, t, id);
        }
        for g in &reads.service_globs {
            drop_from(&mut self.by_glob, g, id);
        }
        self.every_service.remove(&id);
    }

    /// The groups whose snapshot can differ after `diff`.
    fn affected(&self, diff: &StateDiff) -> HashSet<u64> {
        let mut out = HashSet::new();
        let mut any_service = false;
        for s in diff.services() {
            any_service = true;
            out.extend(self.by_service.get(s).into_iter().flatten());
            for (glob, ids) in &self.by_glob {
                if crate::model::glob_match(glob, s) {
                    out.extend(ids);
                }
            }
        }
        for t in &diff.access_changed {
            out.extend(self.by_access.get(t).into_iter().flatten());
        }
        if any_service {
            out.extend(&self.every_service);
        }
        out
    }
}

struct Inner {
    world: Arc<World>,
    next_id: u64,
    ids: HashMap<ProxyGroup, u64>,
    groups: HashMap<u64, GroupEntry>,
    readers: ReverseIndex,
}

/// What a state update did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct UpdateReport {
    /// Groups connected.
    pub connected: usize,
    /// Groups whose snapshot was rebuilt (those reading something that changed).
    pub groups: usize,
    /// Groups whose snapshot changed and was pushed.
    pub changed: usize,
    /// Groups whose new snapshot was inconsistent (the previous one stays in force).
    pub inconsistent: Vec<(String, String)>,
    /// Ids of the groups whose snapshot changed.
    pub pushed: Vec<String>,
    /// Time each group's snapshot took to build, in seconds.
    pub build_seconds: Vec<f64>,
    /// What changed between the state in force and the new one.
    pub diff: StateDiff,
}

/// A built group: its snapshot (or why it is inconsistent), what it read, its parts.
struct Built {
    snapshot: Result<Snapshot, InconsistentSnapshot>,
    reads: Reads,
    parts: Vec<Arc<OnceLock<BuiltPart>>>,
    seconds: f64,
}

/// Snapshots per proxy group.
pub struct SnapshotCache {
    settings: MeshSettings,
    inner: Mutex<Inner>,
    /// Serializes state updates (streams keep subscribing meanwhile).
    updating: Mutex<()>,
    builds: Counter,
    workers: usize,
}

impl SnapshotCache {
    /// A cache over an empty mesh.
    pub fn new(settings: MeshSettings) -> Self {
        SnapshotCache {
            settings,
            inner: Mutex::new(Inner {
                world: Arc::new(World {
                    generation: 0,
                    state: Arc::new(MeshState::default()),
                    mesh: Arc::new(EncodedMesh::default()),
                    parts: PartMemo::default(),
                    maps: SharedMaps::default(),
                }),
                next_id: 0,
                ids: HashMap::new(),
                groups: HashMap::new(),
                readers: ReverseIndex::default(),
            }),
            updating: Mutex::new(()),
            builds: Counter::default(),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Counts every group snapshot built in `counter` (`meshbridge_snapshot_group_builds`).
    pub fn with_build_counter(mut self, counter: Counter) -> Self {
        self.builds = counter;
        self
    }

    /// Builds at most `workers` group snapshots at once (default: the machine's cores).
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Group snapshots built since start (on subscription and after changes).
    pub fn builds_total(&self) -> u64 {
        self.builds.get()
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
        self.lock().world.state.clone()
    }

    /// Builds `group`'s snapshot in `world`, sharing its ingress and egress with every group
    /// of the same specs.
    fn build(&self, world: &World, group: &ProxyGroup) -> Built {
        let started = std::time::Instant::now();
        let (state, settings) = (&*world.state, &self.settings);
        let mut cells = Vec::with_capacity(2 + group.ports.len());
        for spec in group.ingress_specs() {
            cells.push(memo_get(&world.parts.ingress, &spec, || {
                let resources = translate::ingress_resources(state, settings, &spec);
                (
                    Arc::new(snapshot::resolve_part(&resources, &world.mesh)),
                    translate::ingress_reads(state, settings, &spec),
                )
            }));
        }
        if let Some(spec) = group.egress_spec(state, settings) {
            cells.push(memo_get(&world.parts.egress, &spec, || {
                let resources = translate::egress_resources(state, settings, &spec);
                (
                    Arc::new(snapshot::resolve_part(&resources, &world.mesh)),
                    translate::egress_reads(&spec),
                )
            }));
        }
        let parts: Vec<&BuiltPart> = cells.iter().filter_map(|c| c.get()).collect();
        let mut reads = Reads::of_group(&group.service, parts.iter().map(|(_, r)| r));
        // The group's own: its certificate files (read from nothing in the state).
        let secrets = group
            .certificate_files
            .is_some()
            .then(|| snapshot::resolve_part(&translate::secret_resources(group), &world.mesh));
        let resolved: Vec<&ResolvedPart> = parts
            .iter()
            .map(|(p, _)| &**p)
            .chain(secrets.as_ref())
            .collect();
        let snapshot = snapshot::assemble(&resolved, &world.maps);
        if snapshot.is_err() {
            // Rebuilt on every change until it is consistent again.
            reads.every_service = true;
        }
        self.builds.inc();
        Built {
            snapshot,
            reads,
            parts: cells,
            seconds: started.elapsed().as_secs_f64(),
        }
    }

    /// Builds the snapshots of `groups` in `world`, in parallel up to the worker count.
    fn build_all(&self, world: &World, groups: Vec<(u64, ProxyGroup)>) -> Vec<(u64, Built)> {
        let workers = self.workers.min(groups.len() / 4).max(1);
        if workers == 1 {
            return groups
                .into_iter()
                .map(|(id, g)| (id, self.build(world, &g)))
                .collect();
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let groups = &groups;
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(|| {
                        let mut out = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some((id, g)) = groups.get(i) else {
                                return out;
                            };
                            out.push((*id, self.build(world, g)));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        })
    }

    /// Registers a stream of `group` and returns its snapshot channel. A new group is built
    /// without the cache's lock held, against the state in force; if a newer state was
    /// published meanwhile, it is built again against that one.
    pub fn subscribe(&self, group: &ProxyGroup) -> watch::Receiver<Arc<Snapshot>> {
        const ATTEMPTS: usize = 3;
        let mut attempt = 1;
        loop {
            let world = {
                let mut inner = self.lock();
                if let Some(rx) = inner.join(group) {
                    return rx;
                }
                inner.world.clone()
            };
            let built = self.build(&world, group);
            let mut inner = self.lock();
            if let Some(rx) = inner.join(group) {
                return rx;
            }
            if inner.world.generation == world.generation {
                return inner.insert(group, built);
            }
            if attempt == ATTEMPTS {
                // States keep arriving faster than this group builds: build it once more
                // with the lock held, so it cannot miss the newest.
                let world = inner.world.clone();
                let built = self.build(&world, group);
                return inner.insert(group, built);
            }
            attempt += 1;
        }
    }

    /// Unregisters a stream of `group`; the group is forgotten with its last stream.
    pub fn unsubscribe(&self, group: &ProxyGroup) {
        let mut inner = self.lock();
        let Some(&id) = inner.ids.get(group) else {
            return;
        };
        let Some(entry) = inner.groups.get_mut(&id) else {
            return;
        };
        entry.streams = entry.streams.saturating_sub(1);
        if entry.streams == 0 {
            inner.ids.remove(group);
            if let Some(entry) = inner.groups.remove(&id) {
                inner.readers.remove(id, &entry.reads);
            }
        }
    }

    /// The current snapshot of a connected group.
    pub fn snapshot(&self, group: &ProxyGroup) -> Option<Arc<Snapshot>> {
        let inner = self.lock();
        let id = inner.ids.get(group)?;
        inner.groups.get(id).map(|e| e.tx.borrow().clone())
    }

    /// Number of groups with at least one stream.
    pub fn group_count(&self) -> usize {
        self.lock().groups.len()
    }

    /// Whether `group` has a stream (and so a snapshot) now.
    pub fn has_group(&self, group: &ProxyGroup) -> bool {
        self.lock().ids.contains_key(group)
    }

    /// Installs a new mesh state and rebuilds the connected groups that read something that
    /// changed; only groups whose snapshot changed wake their streams.
    pub fn update(&self, state: MeshState) -> UpdateReport {
        let _serial = self.updating.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.lock().world.clone();
        let diff = diff_states(&old.state, &state);
        let state = Arc::new(state);
        let world = Arc::new(World {
            generation: old.generation + 1,
            mesh: Arc::new(old.mesh.updated(&state, &self.settings, &diff)),
            parts: PartMemo {
                ingress: Mutex::new(memo_carry(&old.parts.ingress, &diff)),
                egress: Mutex::new(memo_carry(&old.parts.egress, &diff)),
            },
            maps: old.maps.carry(),
            state,
        });
        let (targets, connected) = {
            let mut inner = self.lock();
            inner.world = world.clone();
            let mut targets: Vec<(u64, ProxyGroup)> = inner
                .readers
                .affected(&diff)
                .into_iter()
                .filter_map(|id| inner.groups.get(&id).map(|e| (id, e.group.clone())))
                .collect();
            targets.sort_unstable_by_key(|(id, _)| *id);
            (targets, inner.groups.len())
        };
        let mut report = UpdateReport {
            connected,
            groups: targets.len(),
            ..Default::default()
        };
        let built = self.build_all(&world, targets);
        let mut inner = self.lock();
        for (id, built) in built {
            report.build_seconds.push(built.seconds);
            let Inner {
                groups, readers, ..
            } = &mut *inner;
            let Some(entry) = groups.get_mut(&id) else {
                continue;
            };
            if entry.reads != built.reads {
                readers.remove(id, &entry.reads);
                readers.insert(id, &built.reads);
                entry.reads = built.reads;
            }
            entry.parts = built.parts;
            match built.snapshot {
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
                    tracing::debug!(group = %entry.group.id(), changed, version = %snap.version_all(), "group snapshot rebuilt");
                    if changed {
                        report.changed += 1;
                        report.pushed.push(entry.group.id());
                    }
                }
                Err(e) => {
                    tracing::error!(group = %entry.group.id(), error = %e, "inconsistent snapshot not published; previous one stays in force");
                    report.inconsistent.push((entry.group.id(), e.to_string()));
                }
            }
        }
        report.diff = diff;
        report
    }
}

impl Inner {
    /// Adds a stream to an existing group.
    fn join(&mut self, group: &ProxyGroup) -> Option<watch::Receiver<Arc<Snapshot>>> {
        let id = self.ids.get(group)?;
        let entry = self.groups.get_mut(id)?;
        entry.streams += 1;
        Some(entry.tx.subscribe())
    }

    /// Adds a new group with its first stream.
    fn insert(&mut self, group: &ProxyGroup, built: Built) -> watch::Receiver<Arc<Snapshot>> {
        let snapshot = built.snapshot.unwrap_or_else(|e| {
            tracing::error!(group = %group.id(), error = %e, "first snapshot of group is inconsistent; serving an empty one");
            Snapshot::default()
        });
        let id = self.next_id;
        self.next_id += 1;
        let (tx, rx) = watch::channel(Arc::new(snapshot));
        self.readers.insert(id, &built.reads);
        self.ids.insert(group.clone(), id);
        self.groups.insert(
            id,
            GroupEntry {
                group: group.clone(),
                tx,
                streams: 1,
                reads: built.reads,
                parts: built.parts,
            },
        );
        rx
    }
}
