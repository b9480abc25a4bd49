//! The Kubernetes source: watchers for MeshServices, AccessRules and Pods feeding the index.
//!
//! Each watcher (kube-runtime `watcher`, with its backoff) lists, then watches; a relist
//! (first start, `410 Gone`, a broken watch) replaces everything that watcher covers, so a
//! deletion missed during a watch gap disappears too. Between relists, each event updates only
//! the index keys it affects. The source is synced once every watcher has listed once.

pub mod store;

use crate::config::KubeSource;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::core::PartialObjectMeta;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Api, Client};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::api::{AccessRule, MeshService};
use crate::index::pods::{PodInfo, pod_info};
use crate::sources::SourceStatuses;

pub use store::{KubeStore, ObjectKey};

/// Source name (index and `/api/sources`).
pub const SOURCE: &str = "kubernetes";

/// What the Kubernetes source shares with the rest of the control plane.
#[derive(Clone)]
pub struct KubeContext {
    /// The index sources apply into.
    pub index: crate::sources::IndexHandle,
    /// Source health.
    pub statuses: Arc<SourceStatuses>,
    /// What the watchers have seen (read by the status reconcilers and the Consul sync).
    pub store: Arc<Mutex<KubeStore>>,
    /// Counts store changes (status and Consul registration follow it).
    pub store_epoch: watch::Sender<u64>,
    /// Becomes true once every watcher has listed once.
    pub synced: watch::Sender<bool>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
}

enum Watched {
    /// Boxed: the resources are much larger than a pod's few fields.
    Service(Event<Box<MeshService>>),
    Rule(Event<Box<AccessRule>>),
    Pod(Event<PodInfo>),
    Namespace(Event<(String, BTreeMap<String, String>)>),
}

/// The same event about something else (what meshbridge keeps of the object).
fn map_event<A, B>(event: Event<A>, f: impl Fn(A) -> B) -> Event<B> {
    match event {
        Event::Apply(o) => Event::Apply(f(o)),
        Event::Delete(o) => Event::Delete(f(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(f(o)),
        Event::InitDone => Event::InitDone,
    }
}

/// A namespace's name and labels.
fn namespace_labels(n: PartialObjectMeta<Namespace>) -> (String, BTreeMap<String, String>) {
    (
        n.metadata.name.unwrap_or_default(),
        n.metadata.labels.unwrap_or_default(),
    )
}

/// Relist buffers and sync progress of one watcher.
#[derive(Default)]
struct Progress {
    services: Option<Vec<MeshService>>,
    rules: Option<Vec<AccessRule>>,
    pods: Option<Vec<PodInfo>>,
    namespaces: Option<BTreeMap<String, BTreeMap<String, String>>>,
    listed: bool,
}

/// The resource a watch follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Resource {
    MeshServices,
    AccessRules,
    Pods,
    Namespaces,
}

impl Resource {
    /// Its name in the API (and in the source's error).
    fn plural(self) -> &'static str {
        match self {
            Resource::MeshServices => "meshservices",
            Resource::AccessRules => "accessrules",
            Resource::Pods => "pods",
            Resource::Namespaces => "namespaces",
        }
    }
}

/// One watch: a resource, in one of the watched scopes (an index into them; the cluster-wide
/// namespaces watch uses 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct StreamId {
    resource: Resource,
    scope: usize,
}

/// Runs the watchers (cluster-wide, or one set per namespace in `namespaces`) until the
/// process ends. With `namespace_labels_too`, namespaces' labels are watched too (metadata
/// only; the injection webhook reads `meshbridge.io/inject`).
#[allow(clippy::too_many_lines)] // every watcher is declared here, so the set of streams reads at a glance.
pub async fn run(
    client: Client,
    namespaces: Vec<String>,
    namespace_labels_too: bool,
    ctx: KubeContext,
) {
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    let mut streams = Vec::new();
    for (i, scope) in scopes.iter().enumerate() {
        let (services, rules, pods): (Api<MeshService>, Api<AccessRule>, Api<Pod>) = match scope {
            None => (
                Api::all(client.clone()),
                Api::all(client.clone()),
                Api::all(client.clone()),
            ),
            Some(ns) => (
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
                Api::namespaced(client.clone(), ns),
            ),
        };
        let config = watcher::Config::default;
        let id = move |resource| StreamId { resource, scope: i };
        streams.push(
            watcher::watcher(services, config())
                .default_backoff()
                .map(move |e| {
                    let e = e.map(|ev| Watched::Service(map_event(ev, Box::new)));
                    (id(Resource::MeshServices), e)
                })
                .boxed(),
        );
        streams.push(
            watcher::watcher(rules, config())
                .default_backoff()
                .map(move |e| {
                    let e = e.map(|ev| Watched::Rule(map_event(ev, Box::new)));
                    (id(Resource::AccessRules), e)
                })
                .boxed(),
        );
        streams.push(
            watcher::watcher(pods, config())
                .default_backoff()
                .map(move |e| {
                    (
                        id(Resource::Pods),
                        e.map(|e| Watched::Pod(map_event(e, |p| pod_info(&p)))),
                    )
                })
                .boxed(),
        );
    }
    if namespace_labels_too {
        let id = StreamId {
            resource: Resource::Namespaces,
            scope: 0,
        };
        let api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());
        streams.push(
            watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                .map(move |e| {
                    (
                        id,
                        e.map(|e| Watched::Namespace(map_event(e, namespace_labels))),
                    )
                })
                .boxed(),
        );
    }
    // Every watch, so that the source is synced only once each has listed.
    let namespaced = [
        Resource::MeshServices,
        Resource::AccessRules,
        Resource::Pods,
    ];
    let mut progress: BTreeMap<StreamId, Progress> = (0..scopes.len())
        .flat_map(|scope| namespaced.map(|resource| StreamId { resource, scope }))
        .chain(namespace_labels_too.then_some(StreamId {
            resource: Resource::Namespaces,
            scope: 0,
        }))
        .map(|id| (id, Progress::default()))
        .collect();
    let mut all = futures::stream::select_all(streams);
    let mut failing: BTreeSet<StreamId> = BTreeSet::new();
    let (started, mut initial_sync_seen) = (std::time::Instant::now(), false);
    while let Some((id, item)) = all.next().await {
        let scope = match id.resource {
            Resource::Namespaces => None,
            _ => scopes.get(id.scope).and_then(|s| s.as_deref()),
        };
        match item {
            Err(e) => {
                let resource = id.resource.plural();
                if failing.insert(id) {
                    warn!(error = %e, resource, scope, "Kubernetes watch failed; retrying with backoff");
                }
                let message = format!("{resource}: {e}");
                ctx.statuses.update(SOURCE, |s| s.error = Some(message));
            }
            Ok(event) => {
                if failing.remove(&id) && failing.is_empty() {
                    ctx.statuses.update(SOURCE, |s| s.error = None);
                }
                handle(&ctx, &mut progress, id, scope, event);
                if !initial_sync_seen && ctx.statuses.is_synced(SOURCE) {
                    initial_sync_seen = true;
                    ctx.statuses.observe_sync(SOURCE, started.elapsed());
                }
            }
        }
    }
}

fn handle(
    ctx: &KubeContext,
    progress: &mut BTreeMap<StreamId, Progress>,
    id: StreamId,
    scope: Option<&str>,
    event: Watched,
) {
    let p = progress.entry(id).or_default();
    let mut keys = Vec::new();
    let mut relisted = false;
    let mut listed = false;
    let mut namespace_changed = false;
    {
        let mut store = ctx.store.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Watched::Service(Event::Init) => p.services = Some(Vec::new()),
            Watched::Service(Event::InitApply(o)) => p.services.get_or_insert_default().push(*o),
            Watched::Service(Event::InitDone) => {
                store.replace_services(scope, p.services.take().unwrap_or_default());
                relisted = true;
            }
            Watched::Service(Event::Apply(o)) => keys = store.apply_service(*o),
            Watched::Service(Event::Delete(o)) => {
                keys = store.delete_service(&ObjectKey::of(&o.metadata))
            }
            Watched::Rule(Event::Init) => p.rules = Some(Vec::new()),
            Watched::Rule(Event::InitApply(o)) => p.rules.get_or_insert_default().push(*o),
            Watched::Rule(Event::InitDone) => {
                store.replace_rules(scope, p.rules.take().unwrap_or_default());
                relisted = true;
            }
            Watched::Rule(Event::Apply(o)) => keys = store.apply_rule(*o),
            Watched::Rule(Event::Delete(o)) => {
                keys = store.delete_rule(&ObjectKey::of(&o.metadata))
            }
            Watched::Pod(Event::Init) => p.pods = Some(Vec::new()),
            Watched::Pod(Event::InitApply(o)) => p.pods.get_or_insert_default().push(o),
            Watched::Pod(Event::InitDone) => {
                store.replace_pods(scope, p.pods.take().unwrap_or_default());
                relisted = true;
            }
            Watched::Pod(Event::Apply(o)) => keys = store.apply_pod(o),
            Watched::Pod(Event::Delete(o)) => {
                keys = store.delete_pod(&o.namespace, &o.name);
            }
            Watched::Namespace(Event::Init) => p.namespaces = Some(BTreeMap::new()),
            Watched::Namespace(Event::InitApply((name, labels))) => {
                p.namespaces.get_or_insert_default().insert(name, labels);
            }
            Watched::Namespace(Event::InitDone) => {
                store.replace_namespaces(p.namespaces.take().unwrap_or_default());
                listed = true;
            }
            Watched::Namespace(Event::Apply((name, labels))) => {
                store.set_namespace(&name, Some(labels));
                namespace_changed = true;
            }
            Watched::Namespace(Event::Delete((name, _))) => {
                store.set_namespace(&name, None);
                namespace_changed = true;
            }
        }
        listed |= relisted;
        ctx.index.update(|index| {
            if relisted {
                index.reset(SOURCE, store.all_index_objects());
            } else {
                for key in &keys {
                    match store.index_objects(key) {
                        Some(objects) => index.apply(SOURCE, key, objects),
                        None => index.delete(SOURCE, key),
                    };
                }
            }
        });
        ctx.metrics.kube_pods.set(store.pod_count() as i64);
    }
    // Status and Consul registration follow real changes only (not identical pod updates).
    if !keys.is_empty() || listed || namespace_changed {
        ctx.store_epoch.send_modify(|e| *e += 1);
    }
    if listed && !p.listed {
        p.listed = true;
        if progress.values().all(|p| p.listed) {
            info!(
                pods = ctx
                    .store
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .pod_count(),
                "Kubernetes source synced"
            );
            let now = crate::sources::now_secs();
            ctx.statuses.update(SOURCE, |s| {
                s.synced = true;
                s.last_sync = Some(now);
            });
            ctx.synced.send_replace(true);
        }
    } else if listed {
        let now = crate::sources::now_secs();
        ctx.statuses.update(SOURCE, |s| s.last_sync = Some(now));
    }
}

/// Builds the client `source` names: in-cluster configuration in a pod, else the files of
/// `KUBECONFIG` (merged in order, as kubectl does). `None` without a Kubernetes source.
pub async fn client_for(source: &KubeSource) -> anyhow::Result<Option<Client>> {
    let config = match source {
        KubeSource::Off => return Ok(None),
        KubeSource::InCluster => kube::Config::incluster()
            .map_err(|e| anyhow::anyhow!("in-cluster Kubernetes configuration: {e}"))?,
        KubeSource::Kubeconfig(files) => {
            let bad = |e: &dyn std::fmt::Display| anyhow::anyhow!("KUBECONFIG {files:?}: {e}");
            let mut merged: Option<kube::config::Kubeconfig> = None;
            for path in std::env::split_paths(files) {
                let one = kube::config::Kubeconfig::read_from(&path).map_err(|e| bad(&e))?;
                merged = Some(match merged {
                    Some(m) => m.merge(one).map_err(|e| bad(&e))?,
                    None => one,
                });
            }
            let merged = merged.ok_or_else(|| bad(&"no file"))?;
            let options = kube::config::KubeConfigOptions::default();
            kube::Config::from_custom_kubeconfig(merged, &options)
                .await
                .map_err(|e| bad(&e))?
        }
    };
    let client = Client::try_from(config).map_err(|e| anyhow::anyhow!("Kubernetes client: {e}"))?;
    Ok(Some(client))
}
