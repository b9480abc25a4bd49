//! Status reconcilers (kube-runtime `Controller`), run by the leader only.
//!
//! Each reconcile computes the status an object should have from what the Kubernetes source
//! has seen and the published mesh state, and writes it with server-side apply on the
//! `status` subresource (field manager `meshbridge`) only when it differs from what the
//! object carries. Every object is reconciled again whenever the source's store or the
//! published state moves. Significant transitions become Kubernetes Events.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder};
use kube::runtime::watcher;
use kube::{Client, Resource, ResourceExt};
use serde_json::json;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{View, access_rule_status, mesh_service_status};
use crate::api::access_rule::AccessRuleStatus;
use crate::api::mesh_service::{Condition, MeshServiceStatus};
use crate::api::{AccessRule, MeshService};
use crate::index::NameConflict;
use crate::model::MeshState;
use crate::sources::kube::{KubeStore, ObjectKey};

/// Field manager of every write meshbridge makes.
pub const FIELD_MANAGER: &str = "meshbridge";

/// The published state, as the status reconcilers see it.
#[derive(Clone, Debug, Default)]
pub struct Published {
    /// The mesh state.
    pub state: MeshState,
    /// Its name conflicts.
    pub conflicts: Vec<NameConflict>,
    /// AccessRules ignored because their namespace may not protect their target.
    pub foreign: Vec<crate::index::ForeignRule>,
}

/// What the reconcilers share.
pub struct StatusContext {
    /// Kubernetes client.
    pub client: Client,
    /// What the Kubernetes source has seen.
    pub store: Arc<Mutex<KubeStore>>,
    /// The last published state.
    pub published: watch::Receiver<Arc<Published>>,
    /// Consul registration problems by MeshService.
    pub registration_errors: watch::Receiver<BTreeMap<ObjectKey, String>>,
    /// Event recorder.
    pub recorder: Recorder,
    /// Status writes.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Load reports, that migration plans are checked against.
    pub load: Arc<crate::xds::lrs::LoadState>,
    /// What was last written, and the `resourceVersion` of the object it was computed from:
    /// until the write comes back through the watch, the object still carries the old status
    /// and must not cause a second, identical write.
    written_services: Written<MeshServiceStatus>,
    written_rules: Written<AccessRuleStatus>,
}

impl StatusContext {
    /// A context; `identity` names this replica in Events.
    pub fn new(
        client: Client,
        store: Arc<Mutex<KubeStore>>,
        published: watch::Receiver<Arc<Published>>,
        registration_errors: watch::Receiver<BTreeMap<ObjectKey, String>>,
        metrics: Arc<crate::metrics::Metrics>,
        load: Arc<crate::xds::lrs::LoadState>,
        identity: &str,
    ) -> Self {
        let reporter = kube::runtime::events::Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: Some(identity.to_string()),
        };
        StatusContext {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            store,
            published,
            registration_errors,
            metrics,
            load,
            written_services: Mutex::default(),
            written_rules: Mutex::default(),
        }
    }
}

/// A failed status write.
#[derive(Debug, thiserror::Error)]
#[error("writing the status of {object}: {source}")]
pub struct StatusError {
    object: String,
    #[source]
    source: kube::Error,
}

/// Now, as RFC 3339 to the second.
pub(crate) fn now_rfc3339() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Conditions whose status changed (or appeared), for Events.
fn transitions<'a>(previous: &[Condition], now: &'a [Condition]) -> Vec<&'a Condition> {
    now.iter()
        .filter(|c| {
            !previous
                .iter()
                .any(|p| p.type_ == c.type_ && p.status == c.status && p.reason == c.reason)
        })
        .collect()
}

async fn record<K: Resource<DynamicType = ()>>(
    ctx: &StatusContext,
    object: &K,
    changed: &[&Condition],
) {
    for c in changed {
        let warning = match (c.type_.as_str(), c.status.as_str()) {
            ("Degraded", "True") | ("Synced", "False") => true,
            ("Ready", "False") => c.reason != "NoInstances",
            _ => false,
        };
        if !warning && c.type_ == "Degraded" {
            continue;
        }
        let event = Event {
            type_: if warning {
                EventType::Warning
            } else {
                EventType::Normal
            },
            reason: c.reason.clone(),
            note: Some(c.message.chars().take(1000).collect()),
            action: format!("{}{}", c.type_, c.status),
            secondary: None,
        };
        if let Err(e) = ctx.recorder.publish(&event, &object.object_ref(&())).await {
            debug!(error = %e, "cannot record an Event");
        }
    }
}

/// A status type and how to find its conditions.
trait HasConditions: serde::Serialize + PartialEq + Clone {
    fn conditions(&self) -> &[Condition];
}

impl HasConditions for MeshServiceStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
}

impl HasConditions for AccessRuleStatus {
    fn conditions(&self) -> &[Condition] {
        &self.conditions
    }
}

type Written<S> = Mutex<HashMap<ObjectKey, (Option<String>, S)>>;

/// What we last wrote for `key`, if the object we see is still the one it was computed from
/// (our write has not come back through the watch yet).
fn written_since<S: Clone>(
    written: &Written<S>,
    key: &ObjectKey,
    version: &Option<String>,
) -> Option<S> {
    lock(written)
        .get(key)
        .filter(|(v, _)| v == version)
        .map(|(_, s)| s.clone())
}

/// Writes `desired` to the object's status subresource unless it already carries it (or
/// carries the state our last, not yet observed, write was computed from), then records
/// Events for the conditions that changed.
async fn write_status<K, S>(
    ctx: &StatusContext,
    object: &K,
    current: Option<&S>,
    desired: S,
    written: &Written<S>,
) -> Result<Action, StatusError>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    S: HasConditions,
{
    let key = ObjectKey::of(object.meta());
    let version = object.meta().resource_version.clone();
    let pending = lock(written).get(&key) == Some(&(version.clone(), desired.clone()));
    if current == Some(&desired) || pending {
        return Ok(Action::await_change());
    }
    let kind = K::kind(&());
    let api: Api<K> = Api::namespaced(ctx.client.clone(), &key.namespace);
    let patch = json!({
        "apiVersion": K::api_version(&()),
        "kind": kind,
        "status": desired,
    });
    api.patch_status(
        &key.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|source| StatusError {
        object: format!("{kind} {key}"),
        source,
    })?;
    ctx.metrics.status_writes.inc();
    // Transitions against what the object had, or against our own write it has not shown yet.
    let last = written_since(written, &key, &version);
    let previous = last
        .as_ref()
        .or(current)
        .map(HasConditions::conditions)
        .unwrap_or(&[]);
    record(ctx, object, &transitions(previous, desired.conditions())).await;
    lock(written).insert(key, (version, desired));
    Ok(Action::await_change())
}

#[tracing::instrument(skip_all, fields(kind = "MeshService", namespace = ?object.metadata.namespace, name = ?object.metadata.name))]
async fn reconcile_service(
    object: Arc<MeshService>,
    ctx: Arc<StatusContext>,
) -> Result<Action, StatusError> {
    let key = ObjectKey::of(&object.metadata);
    let (entry, counts) = {
        let store = lock(&ctx.store);
        (store.service(&key).cloned(), store.pod_counts(&key))
    };
    // Not seen by the source yet: the store's next change brings it back.
    let Some(entry) = entry else {
        return Ok(Action::await_change());
    };
    let registration_error = ctx.registration_errors.borrow().get(&key).cloned();
    let published = ctx.published.borrow().clone();
    let now = now_rfc3339();
    let view = View {
        state: &published.state,
        conflicts: &published.conflicts,
        foreign: &published.foreign,
        now: &now,
    };
    let current = object.status.as_ref();
    // Stamp transition times against our own unseen write, if any, so a second pass before
    // the watch catches up computes the very same status.
    let unseen = written_since(
        &ctx.written_services,
        &key,
        &object.metadata.resource_version,
    );
    let name = entry
        .in_force
        .as_ref()
        .and_then(crate::index::convert::service_name)
        .unwrap_or_default();
    let migration = published
        .state
        .services
        .get(&name)
        .and_then(|s| s.migration.clone());
    let check = migration
        .as_ref()
        .map(|m| crate::xds::lrs::plan_check(&ctx.load, &name, m))
        .unwrap_or_default();
    let before = unseen.as_ref().or(current);
    let was_rolled_back = before
        .and_then(|s| s.migration.as_ref())
        .is_some_and(|m| m.phase == "RolledBack");
    let desired = mesh_service_status(
        &entry,
        &counts,
        registration_error.as_deref(),
        view,
        before,
        check,
    );
    // A plan in progress is looked at again when its step is due.
    let due = desired
        .migration
        .as_ref()
        .filter(|m| m.phase == "Progressing")
        .and_then(|m| m.next_step_at.as_deref())
        .map(|at| {
            let wait = super::unix_seconds(at) - super::unix_seconds(&now);
            Duration::from_secs(u64::try_from(wait.clamp(1, 300)).unwrap_or(1))
        });
    let rolled_back = !was_rolled_back
        && desired
            .migration
            .as_ref()
            .is_some_and(|m| m.phase == "RolledBack");
    let action = write_status(
        &ctx,
        object.as_ref(),
        current,
        desired,
        &ctx.written_services,
    )
    .await?;
    if rolled_back {
        ctx.metrics.migration_rollbacks.inc();
    }
    Ok(due.map_or(action, Action::requeue))
}

#[tracing::instrument(skip_all, fields(kind = "AccessRule", namespace = ?object.metadata.namespace, name = ?object.metadata.name))]
async fn reconcile_rule(
    object: Arc<AccessRule>,
    ctx: Arc<StatusContext>,
) -> Result<Action, StatusError> {
    let key = ObjectKey::of(&object.metadata);
    let Some(entry) = lock(&ctx.store).rule(&key).cloned() else {
        return Ok(Action::await_change());
    };
    let published = ctx.published.borrow().clone();
    let now = now_rfc3339();
    let view = View {
        state: &published.state,
        conflicts: &published.conflicts,
        foreign: &published.foreign,
        now: &now,
    };
    let current = object.status.as_ref();
    let unseen = written_since(&ctx.written_rules, &key, &object.metadata.resource_version);
    let desired = access_rule_status(&key, &entry, view, unseen.as_ref().or(current));
    write_status(&ctx, object.as_ref(), current, desired, &ctx.written_rules).await
}

fn retry_later<K>(object: Arc<K>, error: &StatusError, _ctx: Arc<StatusContext>) -> Action
where
    K: ResourceExt,
{
    warn!(error = %error, object = %object.name_any(), "status write failed; retrying");
    Action::requeue(Duration::from_secs(5))
}

/// Runs both reconcilers until `stop` completes. `trigger` yields whenever every object
/// should be looked at again (the store or the published state moved).
pub async fn run<T>(
    ctx: Arc<StatusContext>,
    namespace: Option<String>,
    trigger: impl Fn() -> T,
    stop: impl Future<Output = ()> + Send + Sync + 'static,
) where
    T: futures::Stream<Item = ()> + Send + 'static,
{
    let (services, rules): (Api<MeshService>, Api<AccessRule>) = match &namespace {
        Some(ns) => (
            Api::namespaced(ctx.client.clone(), ns),
            Api::namespaced(ctx.client.clone(), ns),
        ),
        None => (Api::all(ctx.client.clone()), Api::all(ctx.client.clone())),
    };
    let stop = futures::future::FutureExt::shared(Box::pin(stop));
    // Written objects come back through the watch; let a burst of those settle into one pass.
    let config = kube::runtime::controller::Config::default().debounce(Duration::from_millis(200));
    let services = Controller::new(services, watcher::Config::default())
        .with_config(config.clone())
        .reconcile_all_on(trigger())
        .graceful_shutdown_on(stop.clone())
        .run(reconcile_service, retry_later, ctx.clone())
        .for_each(|_| async {});
    let rules = Controller::new(rules, watcher::Config::default())
        .with_config(config)
        .reconcile_all_on(trigger())
        .graceful_shutdown_on(stop)
        .run(reconcile_rule, retry_later, ctx)
        .for_each(|_| async {});
    futures::future::join(services, rules).await;
}

/// Reconciler tests the kube-rs way: a `tower-test` mock stands in for the API server and
/// verifies each request the reconciler makes.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;
    use crate::index::pods::pod_info;
    use http::{Request, Response};
    use http_body_util::BodyExt;
    use kube::client::Body;

    type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

    fn context() -> (Arc<StatusContext>, Handle, MeshService) {
        let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let object: MeshService = serde_json::from_value(json!({
            "apiVersion": "meshbridge.io/v1alpha1", "kind": "MeshService",
            "metadata": {"name": "orders", "namespace": "shop", "generation": 2, "uid": "u1"},
            "spec": {"selector": {"app": "orders"}, "ports": [{"port": 80}]},
        }))
        .unwrap();
        let mut store = KubeStore::new();
        store.apply_service(object.clone());
        store.apply_pod(pod_info(
            &serde_json::from_value(json!({
                "metadata": {"name": "o1", "namespace": "shop", "labels": {"app": "orders"}},
                "status": {"phase": "Running", "podIP": "10.0.0.1",
                           "conditions": [{"type": "Ready", "status": "True"}]},
            }))
            .unwrap(),
        ));
        let mut index = Index::new();
        index.reset("kubernetes", store.all_index_objects());
        let (state, conflicts, foreign) = index.build_full();
        let (_tx, published) = watch::channel(Arc::new(Published {
            state,
            conflicts,
            foreign,
        }));
        std::mem::forget(_tx);
        let ctx = StatusContext::new(
            client,
            Arc::new(Mutex::new(store)),
            published,
            watch::channel(BTreeMap::new()).1,
            Arc::new(crate::metrics::Metrics::new()),
            Arc::new(crate::xds::lrs::LoadState::new(Duration::from_secs(10))),
            "replica-1",
        );
        (Arc::new(ctx), handle, object)
    }

    async fn body_json(request: Request<Body>) -> serde_json::Value {
        let bytes = request.into_body().collect().await.unwrap().to_bytes();
        serde_json::from_slice(&bytes).unwrap()
    }

    #[tokio::test]
    async fn a_new_status_is_applied_to_the_status_subresource_then_announced() {
        let (ctx, mut handle, object) = context();
        let stored = serde_json::to_value(&object).unwrap();
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("a status patch");
            assert_eq!(request.method(), http::Method::PATCH);
            let uri = request.uri().to_string();
            assert!(
                uri.starts_with(
                    "/apis/meshbridge.io/v1alpha1/namespaces/shop/meshservices/orders/status?"
                ),
                "{uri}"
            );
            assert!(
                uri.contains("fieldManager=meshbridge") && uri.contains("force=true"),
                "{uri}"
            );
            assert_eq!(
                request.headers()["content-type"],
                "application/apply-patch+yaml"
            );
            let body = body_json(request).await;
            assert_eq!(body["status"]["observedGeneration"], 2);
            assert_eq!(body["status"]["instances"]["kubernetes"], 1);
            // The server answers with the whole object, status included.
            let mut answer = stored;
            answer["status"] = body["status"].clone();
            send.send_response(Response::new(Body::from(
                serde_json::to_vec(&answer).unwrap(),
            )));
            // Two transitions (Synced, Ready) become two Events.
            let mut reasons = Vec::new();
            for _ in 0..2 {
                let (request, send) = handle.next_request().await.expect("an event");
                assert_eq!(request.method(), http::Method::POST);
                assert!(
                    request.uri().path().ends_with("/namespaces/shop/events"),
                    "{}",
                    request.uri()
                );
                let event = body_json(request).await;
                reasons.push(event["reason"].as_str().unwrap().to_string());
                send.send_response(Response::new(Body::from(
                    serde_json::to_vec(&event).unwrap(),
                )));
            }
            reasons.sort();
            assert_eq!(reasons, vec!["Applied", "InstancesAvailable"]);
        });
        reconcile_service(Arc::new(object), ctx.clone())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(ctx.metrics.status_writes.get(), 1);
    }

    #[tokio::test]
    async fn an_object_already_carrying_its_status_causes_no_request() {
        let (ctx, mut handle, mut object) = context();
        let published = ctx.published.borrow().clone();
        let (entry, counts) = {
            let store = lock(&ctx.store);
            let key = ObjectKey::of(&object.metadata);
            (
                store.service(&key).cloned().unwrap(),
                store.pod_counts(&key),
            )
        };
        let view = View {
            state: &published.state,
            conflicts: &published.conflicts,
            foreign: &published.foreign,
            now: "2026-11-23T00:00:00Z",
        };
        object.status = Some(mesh_service_status(
            &entry,
            &counts,
            None,
            view,
            None,
            Default::default(),
        ));
        reconcile_service(Arc::new(object), ctx.clone())
            .await
            .unwrap();
        let nothing = tokio::time::timeout(Duration::from_millis(200), handle.next_request()).await;
        assert!(nothing.is_err(), "no request expected");
        assert_eq!(ctx.metrics.status_writes.get(), 0);
    }
}
