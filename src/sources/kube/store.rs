//! What the Kubernetes watchers have seen, and the index objects it becomes (pure).
//!
//! MeshServices, AccessRules and pods arrive one event at a time or as a whole relist; each
//! call returns the index keys whose objects changed, so the watcher loop updates only those.
//! A MeshService whose spec stops validating keeps its last valid spec in force (its pods
//! still come and go) and reports the errors; one that never validated contributes nothing.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::{AccessRule, MeshService};
use crate::index::convert::{self, FieldError};
use crate::index::pods::{NotAnEndpoint, PodInfo, pod_endpoint, pod_instance, selects};
use crate::index::{AccessDeclaration, IndexObject};
use crate::model::Endpoint;

/// Namespace and name of an object.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl ObjectKey {
    /// The key of a namespaced object.
    pub fn of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        ObjectKey {
            namespace: meta.namespace.clone().unwrap_or_default(),
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A MeshService as seen, and what of it is in force.
#[derive(Clone, Debug)]
pub struct ServiceEntry {
    /// The latest object (status dropped).
    pub object: MeshService,
    /// The latest object that validated.
    pub in_force: Option<MeshService>,
    /// Problems of `object`; empty when it validated.
    pub errors: Vec<FieldError>,
}

/// An AccessRule as seen, and what of it is in force.
#[derive(Clone, Debug)]
pub struct RuleEntry {
    /// The latest object (status dropped).
    pub object: AccessRule,
    /// The latest declaration that validated.
    pub in_force: Option<AccessDeclaration>,
    /// Problems of `object`; empty when it validated.
    pub errors: Vec<FieldError>,
}

/// The pods a MeshService selects, by what became of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodCounts {
    /// Selected pods that are endpoints.
    pub ready: u32,
    /// Selected pods that are not ready (yet).
    pub not_ready: u32,
    /// Ready pods that have no port to be reached on.
    pub no_port: u32,
}

/// Consul tag of the pods of a MeshService that declares a migration.
pub const MIGRATION_TAG: &str = "meshbridge-migration";

/// A ready pod of a MeshService that asks for Consul registration.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct PodInstance {
    /// Mesh-wide service name.
    pub service: String,
    /// Pod namespace.
    pub namespace: String,
    /// Pod name.
    pub pod: String,
    /// Pod IP.
    pub address: String,
    /// The port callers use (the sidecar's ingress port when injected).
    pub port: u16,
    /// Tags: the MeshService's `spec.consul.tags` and the pod's own.
    pub tags: BTreeSet<String>,
    /// Where it serves its service's further ports, by port name.
    pub ports: BTreeMap<String, u16>,
    /// The MeshService that asked.
    pub owner: ObjectKey,
}

/// The Kubernetes objects meshbridge uses.
#[derive(Clone, Debug, Default)]
pub struct KubeStore {
    services: BTreeMap<ObjectKey, ServiceEntry>,
    rules: BTreeMap<ObjectKey, RuleEntry>,
    pods: BTreeMap<String, BTreeMap<String, PodInfo>>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
}

/// Index key of a MeshService.
pub fn service_index_key(key: &ObjectKey) -> String {
    format!("MeshService/{key}")
}

/// Index key of an AccessRule.
pub fn rule_index_key(key: &ObjectKey) -> String {
    format!("AccessRule/{key}")
}

fn in_scope(namespace: &str, scope: Option<&str>) -> bool {
    scope.is_none_or(|s| s == namespace)
}

impl KubeStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// A MeshService was added or modified.
    pub fn apply_service(&mut self, mut object: MeshService) -> Vec<String> {
        // Only the migration plan's record counts (its weight is in force); the rest of the
        // status is meshbridge's own output.
        object.status = object
            .status
            .take()
            .and_then(|s| s.migration)
            .map(|migration| crate::api::mesh_service::MeshServiceStatus {
                migration: Some(migration),
                ..Default::default()
            });
        let key = ObjectKey::of(&object.metadata);
        let precedence = precedence(&object);
        let errors = convert::mesh_service(&object, precedence)
            .err()
            .unwrap_or_default();
        let previous = self.services.remove(&key);
        let in_force = if errors.is_empty() {
            Some(object.clone())
        } else {
            previous.and_then(|p| p.in_force)
        };
        self.services.insert(
            key.clone(),
            ServiceEntry {
                object,
                in_force,
                errors,
            },
        );
        vec![service_index_key(&key)]
    }

    /// A MeshService was deleted.
    pub fn delete_service(&mut self, key: &ObjectKey) -> Vec<String> {
        self.services.remove(key);
        vec![service_index_key(key)]
    }

    /// Every MeshService in `scope` (a namespace, or all) is `objects` (after a relist).
    pub fn replace_services(&mut self, scope: Option<&str>, objects: Vec<MeshService>) {
        let old = std::mem::take(&mut self.services);
        let (kept, mut replaced): (BTreeMap<_, _>, BTreeMap<_, _>) = old
            .into_iter()
            .partition(|(k, _)| !in_scope(&k.namespace, scope));
        self.services = kept;
        for object in objects {
            // Keep the last valid spec of an object that is still there.
            let key = ObjectKey::of(&object.metadata);
            if let Some(previous) = replaced.remove(&key) {
                self.services.insert(key, previous);
            }
            self.apply_service(object);
        }
    }

    /// An AccessRule was added or modified.
    pub fn apply_rule(&mut self, mut object: AccessRule) -> Vec<String> {
        object.status = None;
        let key = ObjectKey::of(&object.metadata);
        let previous = self.rules.remove(&key);
        let (in_force, errors) = match convert::access_rule(&object, key.to_string()) {
            Ok(decl) => (Some(decl), Vec::new()),
            Err(errors) => (previous.and_then(|p| p.in_force), errors),
        };
        self.rules.insert(
            key.clone(),
            RuleEntry {
                object,
                in_force,
                errors,
            },
        );
        vec![rule_index_key(&key)]
    }

    /// An AccessRule was deleted.
    pub fn delete_rule(&mut self, key: &ObjectKey) -> Vec<String> {
        self.rules.remove(key);
        vec![rule_index_key(key)]
    }

    /// Every AccessRule in `scope` is `objects` (after a relist).
    pub fn replace_rules(&mut self, scope: Option<&str>, objects: Vec<AccessRule>) {
        let old = std::mem::take(&mut self.rules);
        let (kept, mut replaced): (BTreeMap<_, _>, BTreeMap<_, _>) = old
            .into_iter()
            .partition(|(k, _)| !in_scope(&k.namespace, scope));
        self.rules = kept;
        for object in objects {
            let key = ObjectKey::of(&object.metadata);
            if let Some(previous) = replaced.remove(&key) {
                self.rules.insert(key, previous);
            }
            self.apply_rule(object);
        }
    }

    /// A pod was added or modified. Returns the MeshServices it affects.
    pub fn apply_pod(&mut self, pod: PodInfo) -> Vec<String> {
        let previous = self
            .pods
            .entry(pod.namespace.clone())
            .or_default()
            .insert(pod.name.clone(), pod.clone());
        if previous.as_ref() == Some(&pod) {
            return Vec::new();
        }
        let mut affected = self.selecting(&pod);
        if let Some(p) = previous {
            affected.extend(self.selecting(&p));
        }
        affected.sort();
        affected.dedup();
        affected
    }

    /// A pod was deleted.
    pub fn delete_pod(&mut self, namespace: &str, name: &str) -> Vec<String> {
        let removed = self
            .pods
            .get_mut(namespace)
            .and_then(|pods| pods.remove(name));
        if self.pods.get(namespace).is_some_and(BTreeMap::is_empty) {
            self.pods.remove(namespace);
        }
        removed.map(|p| self.selecting(&p)).unwrap_or_default()
    }

    /// Every pod in `scope` is `pods` (after a relist).
    pub fn replace_pods(&mut self, scope: Option<&str>, pods: Vec<PodInfo>) {
        self.pods.retain(|ns, _| !in_scope(ns, scope));
        for pod in pods {
            self.pods
                .entry(pod.namespace.clone())
                .or_default()
                .insert(pod.name.clone(), pod);
        }
    }

    /// A namespace was added or its labels changed (`None`: deleted).
    pub fn set_namespace(&mut self, name: &str, labels: Option<BTreeMap<String, String>>) {
        match labels {
            Some(l) => {
                self.namespaces.insert(name.to_string(), l);
            }
            None => {
                self.namespaces.remove(name);
            }
        }
    }

    /// Every namespace is in `namespaces` (after a relist).
    pub fn replace_namespaces(&mut self, namespaces: BTreeMap<String, BTreeMap<String, String>>) {
        self.namespaces = namespaces;
    }

    /// The labels of a namespace, if it is known.
    pub fn namespace_labels(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.namespaces.get(name)
    }

    /// The mesh-wide name of the MeshService (its spec in force) in `namespace` selecting a
    /// pod with `labels`; the oldest claim when several do.
    pub fn service_for_pod(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> Option<String> {
        self.services
            .iter()
            .filter(|(k, _)| k.namespace == namespace)
            .filter_map(|(_, e)| e.in_force.as_ref())
            .filter(|o| selects(o.spec.selector.as_ref(), labels))
            .min_by_key(|o| precedence(o))
            .and_then(convert::service_name)
    }

    fn selecting(&self, pod: &PodInfo) -> Vec<String> {
        self.services
            .iter()
            .filter(|(k, e)| {
                k.namespace == pod.namespace
                    && e.in_force
                        .as_ref()
                        .is_some_and(|o| selects(o.spec.selector.as_ref(), &pod.labels))
            })
            .map(|(k, _)| service_index_key(k))
            .collect()
    }

    fn selected_pods<'a>(
        &'a self,
        key: &ObjectKey,
        object: &'a MeshService,
    ) -> impl Iterator<Item = &'a PodInfo> {
        self.pods
            .get(&key.namespace)
            .into_iter()
            .flat_map(|pods| pods.values())
            .filter(move |p| selects(object.spec.selector.as_ref(), &p.labels))
    }

    /// The endpoints a MeshService's pods give it.
    fn pod_endpoints(&self, key: &ObjectKey, object: &MeshService) -> Vec<Endpoint> {
        self.selected_pods(key, object)
            .filter_map(|p| pod_instance(&object.spec, p))
            .collect()
    }

    /// The index objects under `index_key`; `None` when there are none (delete the key).
    pub fn index_objects(&self, index_key: &str) -> Option<Vec<IndexObject>> {
        let (kind, rest) = index_key.split_once('/')?;
        let (namespace, name) = rest.split_once('/')?;
        let key = ObjectKey {
            namespace: namespace.to_string(),
            name: name.to_string(),
        };
        match kind {
            "MeshService" => {
                let object = self.services.get(&key)?.in_force.as_ref()?;
                let mut decl = convert::mesh_service(object, precedence(object)).ok()?;
                decl.namespace = Some(key.namespace.clone());
                decl.endpoints.extend(self.pod_endpoints(&key, object));
                decl.endpoints.sort();
                decl.endpoints.dedup();
                Some(vec![IndexObject::Service(decl)])
            }
            "AccessRule" => {
                let mut decl = self.rules.get(&key)?.in_force.clone()?;
                decl.namespace = Some(key.namespace.clone());
                Some(vec![IndexObject::Access(decl)])
            }
            _ => None,
        }
    }

    /// Every index object (what `Index::reset` takes after a relist).
    pub fn all_index_objects(&self) -> BTreeMap<String, Vec<IndexObject>> {
        let keys = self
            .services
            .keys()
            .map(service_index_key)
            .chain(self.rules.keys().map(rule_index_key));
        keys.filter_map(|k| self.index_objects(&k).map(|o| (k, o)))
            .collect()
    }

    /// The namespaces whose MeshServices (as in force) declare `service`.
    pub fn namespaces_declaring(&self, service: &str) -> Vec<String> {
        let mut out: Vec<String> = self
            .services
            .iter()
            .filter(|(_, e)| {
                e.in_force
                    .as_ref()
                    .and_then(convert::service_name)
                    .is_some_and(|n| n == service)
            })
            .map(|(k, _)| k.namespace.clone())
            .collect();
        out.dedup();
        out
    }

    /// The MeshService whose spec in force declares `service` and wins its name (the oldest,
    /// then namespace and name: [`precedence`]), as seen.
    pub fn declaring(&self, service: &str) -> Option<(&ObjectKey, &ServiceEntry)> {
        self.services
            .iter()
            .filter_map(|(k, e)| {
                let in_force = e.in_force.as_ref()?;
                (convert::service_name(in_force).as_deref() == Some(service))
                    .then(|| (precedence(in_force), k, e))
            })
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, k, e)| (k, e))
    }

    /// A MeshService as seen.
    pub fn service(&self, key: &ObjectKey) -> Option<&ServiceEntry> {
        self.services.get(key)
    }

    /// Every MeshService as seen.
    pub fn services(&self) -> impl Iterator<Item = (&ObjectKey, &ServiceEntry)> {
        self.services.iter()
    }

    /// An AccessRule as seen.
    pub fn rule(&self, key: &ObjectKey) -> Option<&RuleEntry> {
        self.rules.get(key)
    }

    /// Every AccessRule as seen.
    pub fn rules(&self) -> impl Iterator<Item = (&ObjectKey, &RuleEntry)> {
        self.rules.iter()
    }

    /// How many pods there are.
    pub fn pod_count(&self) -> usize {
        self.pods.values().map(BTreeMap::len).sum()
    }

    /// What became of the pods a MeshService (its spec in force) selects.
    pub fn pod_counts(&self, key: &ObjectKey) -> PodCounts {
        let mut counts = PodCounts::default();
        let Some(object) = self.services.get(key).and_then(|e| e.in_force.as_ref()) else {
            return counts;
        };
        for pod in self.selected_pods(key, object) {
            match pod_endpoint(&object.spec, pod) {
                Ok(_) => counts.ready += 1,
                Err(NotAnEndpoint::NotReady) => counts.not_ready += 1,
                Err(NotAnEndpoint::NoPort) => counts.no_port += 1,
            }
        }
        counts
    }

    /// Ready pod instances of MeshServices with `spec.consul.register`. Of two MeshServices
    /// claiming one name, only the oldest (the one in force) registers.
    pub fn consul_instances(&self) -> Vec<PodInstance> {
        let mut winners: BTreeMap<String, String> = BTreeMap::new();
        for object in self.services.values().filter_map(|e| e.in_force.as_ref()) {
            if let Some(name) = convert::service_name(object) {
                let p = precedence(object);
                let w = winners.entry(name).or_insert_with(|| p.clone());
                if p < *w {
                    *w = p;
                }
            }
        }
        let mut out = Vec::new();
        for (key, entry) in &self.services {
            let Some(object) = &entry.in_force else {
                continue;
            };
            let won = convert::service_name(object)
                .and_then(|n| winners.get(&n))
                .is_some_and(|w| *w == precedence(object));
            if !won {
                continue;
            }
            let Some(consul) = object.spec.consul.as_ref().filter(|c| c.register) else {
                continue;
            };
            let Some(service) = convert::service_name(object) else {
                continue;
            };
            for pod in self.selected_pods(key, object) {
                let Ok(endpoint) = pod_endpoint(&object.spec, pod) else {
                    continue;
                };
                // The pod's own tags, and `mtls` when its sidecar holds certificates, so that
                // Consul's other consumers know to call it over mutual TLS.
                let mut tags: BTreeSet<String> = consul.tags.iter().cloned().collect();
                tags.extend(endpoint.tags.iter().cloned());
                // Legacy tooling sees that the service is on the move.
                if object.spec.migration.is_some() {
                    tags.insert(MIGRATION_TAG.to_string());
                }
                out.push(PodInstance {
                    service: service.clone(),
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    address: endpoint.address,
                    port: endpoint.port,
                    tags,
                    ports: endpoint.ports,
                    owner: key.clone(),
                });
            }
        }
        out.sort();
        out
    }
}

/// Orders competing claims on one name: the oldest object wins, then namespace and name.
pub fn precedence(object: &MeshService) -> String {
    let created = object
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default();
    format!("{created}/{}", ObjectKey::of(&object.metadata))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::pods::pod_info;
    use serde_json::json;

    fn service(name: &str, spec: serde_json::Value, generation: i64) -> MeshService {
        serde_json::from_value(json!({
            "apiVersion": "meshbridge.io/v1alpha1", "kind": "MeshService",
            "metadata": {"name": name, "namespace": "shop", "generation": generation},
            "spec": spec,
        }))
        .unwrap()
    }

    fn pod(name: &str, app: &str, ip: &str, ready: bool) -> PodInfo {
        pod_info(
            &serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "labels": {"app": app}},
                "status": {"phase": "Running", "podIP": ip,
                           "conditions": [{"type": "Ready", "status": if ready {"True"} else {"False"}}]},
            }))
            .unwrap(),
        )
    }

    fn endpoints(store: &KubeStore, key: &str) -> Vec<String> {
        match store.index_objects(key).as_deref() {
            Some([IndexObject::Service(d)]) => d
                .endpoints
                .iter()
                .map(|e| format!("{}:{}", e.address, e.port))
                .collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn pod_events_touch_only_the_services_that_select_them() {
        let mut store = KubeStore::new();
        store.apply_service(service(
            "orders",
            json!({"selector": {"app": "orders"}, "ports": [{"port": 80}]}),
            1,
        ));
        store.apply_service(service(
            "billing",
            json!({"selector": {"app": "billing"}, "ports": [{"port": 81}]}),
            1,
        ));
        assert_eq!(
            store.apply_pod(pod("o1", "orders", "10.0.0.1", true)),
            vec!["MeshService/shop/orders"]
        );
        // Relabelled: both the old and the new owner change.
        let mut moved = store.apply_pod(pod("o1", "billing", "10.0.0.1", true));
        moved.sort();
        assert_eq!(
            moved,
            vec!["MeshService/shop/billing", "MeshService/shop/orders"]
        );
        assert_eq!(
            endpoints(&store, "MeshService/shop/billing"),
            vec!["10.0.0.1:81"]
        );
        assert!(endpoints(&store, "MeshService/shop/orders").is_empty());
        // An identical update changes nothing.
        assert!(
            store
                .apply_pod(pod("o1", "billing", "10.0.0.1", true))
                .is_empty()
        );
        assert_eq!(
            store.delete_pod("shop", "o1"),
            vec!["MeshService/shop/billing"]
        );
    }

    #[test]
    fn an_invalid_update_keeps_the_last_valid_spec_and_its_pods() {
        let mut store = KubeStore::new();
        store.apply_service(service(
            "orders",
            json!({"selector": {"app": "orders"}, "ports": [{"port": 80}]}),
            1,
        ));
        store.apply_pod(pod("o1", "orders", "10.0.0.1", true));
        store.apply_service(service(
            "orders",
            json!({"selector": {"app": "orders"}, "ports": [{"port": 70000}]}),
            2,
        ));
        let key = ObjectKey {
            namespace: "shop".into(),
            name: "orders".into(),
        };
        let entry = store.service(&key).unwrap();
        assert_eq!(entry.errors[0].field, "spec.ports[0].port");
        assert_eq!(
            entry.in_force.as_ref().unwrap().metadata.generation,
            Some(1)
        );
        assert_eq!(
            endpoints(&store, "MeshService/shop/orders"),
            vec!["10.0.0.1:80"]
        );
        store.apply_pod(pod("o2", "orders", "10.0.0.2", true));
        assert_eq!(endpoints(&store, "MeshService/shop/orders").len(), 2);
        // Never valid: contributes nothing, but is kept for its status.
        store.apply_service(service("broken", json!({"ports": [{"port": 0}]}), 1));
        assert!(store.index_objects("MeshService/shop/broken").is_none());
        assert!(
            !store
                .service(&ObjectKey {
                    namespace: "shop".into(),
                    name: "broken".into()
                })
                .unwrap()
                .errors
                .is_empty()
        );
    }

    #[test]
    fn a_relist_drops_what_disappeared_in_its_scope_only() {
        let mut store = KubeStore::new();
        store.apply_service(service("orders", json!({"selector": {"app": "orders"}}), 1));
        store.apply_pod(pod("o1", "orders", "10.0.0.1", true));
        let mut other = pod("x", "orders", "10.0.0.9", true);
        other.namespace = "elsewhere".into();
        store.apply_pod(other);
        store.replace_pods(Some("shop"), vec![pod("o2", "orders", "10.0.0.2", true)]);
        assert_eq!(store.pod_count(), 2, "the other namespace is not touched");
        store.replace_services(None, vec![]);
        assert!(store.all_index_objects().is_empty());
    }

    #[test]
    fn counts_and_consul_instances_follow_readiness() {
        let mut store = KubeStore::new();
        store.apply_service(service("orders", json!({"selector": {"app": "orders"}, "ports": [{"port": 80}], "consul": {"register": true, "tags": ["blue"]}}), 1));
        store.apply_pod(pod("o1", "orders", "10.0.0.1", true));
        store.apply_pod(pod("o2", "orders", "10.0.0.2", false));
        let key = ObjectKey {
            namespace: "shop".into(),
            name: "orders".into(),
        };
        assert_eq!(
            store.pod_counts(&key),
            PodCounts {
                ready: 1,
                not_ready: 1,
                no_port: 0
            }
        );
        // A younger MeshService claiming the same name registers nothing.
        let mut copy = service(
            "orders-copy",
            json!({"serviceName": "orders", "selector": {"app": "orders"}, "ports": [{"port": 80}], "consul": {"register": true}}),
            1,
        );
        copy.metadata.creation_timestamp =
            Some(serde_json::from_value(json!("2030-01-01T00:00:00Z")).unwrap());
        store.apply_service(copy);
        let instances = store.consul_instances();
        assert_eq!(instances.len(), 1);
        assert_eq!((instances[0].pod.as_str(), instances[0].port), ("o1", 80));
        assert!(instances[0].tags.contains("blue"));
        assert!(!instances[0].tags.contains("mtls"));
        // A pod whose sidecar holds certificates is registered as one to call over mTLS.
        let mut with_certs = pod("o1", "orders", "10.0.0.1", true);
        with_certs.tls = true;
        with_certs.sidecar_port = Some(15006);
        store.apply_pod(with_certs);
        let instances = store.consul_instances();
        assert!(instances[0].tags.contains("mtls"), "{:?}", instances[0]);
        assert!(!instances[0].tags.contains(MIGRATION_TAG));
        // Migrating: legacy tooling sees the move in the tags.
        store.apply_service(service("orders", json!({"selector": {"app": "orders"}, "ports": [{"port": 80}], "consul": {"register": true}, "migration": {"to": "kubernetes", "weight": 5}}), 2));
        let instances = store.consul_instances();
        assert!(
            instances[0].tags.contains(MIGRATION_TAG),
            "{:?}",
            instances[0]
        );
    }
}
