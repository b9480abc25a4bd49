//! Manifest fixtures: fluent builders for the `MeshService` and `AccessRule` documents the
//! tests feed to meshbridge, rendered as a manifest document ([`Fixture::yaml`]), as a
//! Kubernetes object ([`Fixture::json`]) or as a file of several documents ([`manifests`]).
//!
//! Tests whose subject is the manifest text itself (YAML syntax, errors naming a line or a
//! column) keep writing that text by hand; everything else builds its documents here.

use serde_json::{Map, Value, json};

/// The API group and version of meshbridge's resources.
pub const API_VERSION: &str = "meshbridge.io/v1alpha1";

/// A document the tests can hand to meshbridge: a manifest file entry or a Kubernetes object.
pub trait Fixture {
    /// The object: `apiVersion`, `kind`, `metadata` and `spec`.
    fn json(&self) -> Value;

    /// The object as one manifest document (YAML, ending in a newline).
    fn yaml(&self) -> String {
        serde_norway::to_string(&self.json()).unwrap()
    }
}

/// Several documents as one manifest file, separated by `---`.
pub fn manifests(docs: &[&dyn Fixture]) -> String {
    docs.iter()
        .map(|d| d.yaml())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// What both builders share: the kind, the metadata and the spec being built.
#[derive(Clone, Debug)]
struct Object {
    kind: &'static str,
    metadata: Map<String, Value>,
    spec: Map<String, Value>,
}

impl Object {
    fn new(kind: &'static str, name: &str) -> Object {
        let mut metadata = Map::new();
        metadata.insert("name".into(), json!(name));
        Object {
            kind,
            metadata,
            spec: Map::new(),
        }
    }

    /// Appends `item` to the spec's list `key`.
    fn push(&mut self, key: &str, item: Value) {
        let list = self
            .spec
            .entry(key)
            .or_insert_with(|| Value::Array(Vec::new()));
        list.as_array_mut()
            .unwrap_or_else(|| panic!("spec.{key} was set to a non-list"))
            .push(item);
    }

    fn json(&self) -> Value {
        json!({
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": self.metadata,
            "spec": self.spec,
        })
    }
}

/// A `MeshService`: `MeshService::build("orders").endpoint("10.0.0.1", 80).dependency("payments")`.
#[derive(Clone, Debug)]
pub struct MeshService(Object);

impl MeshService {
    /// A service named `name` with an empty spec.
    pub fn build(name: &str) -> MeshService {
        MeshService(Object::new("MeshService", name))
    }

    /// Puts the object in `namespace` (`metadata.namespace`).
    pub fn namespace(self, namespace: &str) -> MeshService {
        self.meta("namespace", namespace)
    }

    /// Sets any metadata field (`generation`, `creationTimestamp`, ...).
    pub fn meta(mut self, key: &str, value: impl Into<Value>) -> MeshService {
        self.0.metadata.insert(key.into(), value.into());
        self
    }

    /// Sets any spec field (`mtls`, `serviceName`, `consul`, ...).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> MeshService {
        self.0.spec.insert(key.into(), value.into());
        self
    }

    /// Selects the pods labelled `app: <app>`.
    pub fn selector(self, app: &str) -> MeshService {
        self.set("selector", json!({"app": app}))
    }

    /// A static endpoint at `address:port`.
    pub fn endpoint(self, address: &str, port: u16) -> MeshService {
        self.endpoint_with(json!({"address": address, "port": port}))
    }

    /// One static endpoint at `address` per port of `ports`.
    pub fn endpoints(self, address: &str, ports: &[u16]) -> MeshService {
        ports
            .iter()
            .fold(self, |m, &port| m.endpoint(address, port))
    }

    /// A static endpoint at `address:port` carrying `tags`.
    pub fn tagged_endpoint(self, address: &str, port: u16, tags: &[&str]) -> MeshService {
        self.endpoint_with(json!({"address": address, "port": port, "tags": tags}))
    }

    /// A static endpoint given in full (`datacenter`, `weight`, ...).
    pub fn endpoint_with(mut self, endpoint: Value) -> MeshService {
        self.0.push("endpoints", endpoint);
        self
    }

    /// A dependency on the service `service` (a name, a glob or `"*"`).
    pub fn dependency(self, service: &str) -> MeshService {
        self.dependency_with(json!({"service": service}))
    }

    /// A dependency on an external `domain` (`https://api.example.com`).
    pub fn domain(self, domain: &str) -> MeshService {
        self.dependency_with(json!({"domain": domain}))
    }

    /// A dependency given in full (`timeout`, `retries`, ...).
    pub fn dependency_with(mut self, dependency: Value) -> MeshService {
        self.0.push("dependencies", dependency);
        self
    }

    /// The object as the crate's typed custom resource.
    pub fn typed(&self) -> meshbridge::api::mesh_service::MeshService {
        serde_json::from_value(self.json()).unwrap()
    }
}

impl Fixture for MeshService {
    fn json(&self) -> Value {
        self.0.json()
    }
}

/// An `AccessRule`: `AccessRule::build("orders-callers").target("orders").allow(&["checkout"])`.
#[derive(Clone, Debug)]
pub struct AccessRule(Object);

impl AccessRule {
    /// A rule object named `name`; its target is set with [`AccessRule::target`].
    pub fn build(name: &str) -> AccessRule {
        AccessRule(Object::new("AccessRule", name))
    }

    /// Puts the object in `namespace` (`metadata.namespace`).
    pub fn namespace(mut self, namespace: &str) -> AccessRule {
        self.0.metadata.insert("namespace".into(), json!(namespace));
        self
    }

    /// Sets any spec field.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> AccessRule {
        self.0.spec.insert(key.into(), value.into());
        self
    }

    /// The service the rules protect.
    pub fn target(self, service: &str) -> AccessRule {
        self.set("target", service)
    }

    /// What happens to calls no rule allows: `deny` or `log`.
    pub fn action(self, action: &str) -> AccessRule {
        self.set("action", action)
    }

    /// A rule allowing every call from `callers`.
    pub fn allow(self, callers: &[&str]) -> AccessRule {
        self.allow_with(json!({ "from": callers }))
    }

    /// A rule given in full (`from`, `paths`, `methods`).
    pub fn allow_with(mut self, rule: Value) -> AccessRule {
        self.0.push("rules", rule);
        self
    }
}

impl Fixture for AccessRule {
    fn json(&self) -> Value {
        self.0.json()
    }
}
