//! An in-process fake of the Kubernetes API server: the REST semantics a controller relies
//! on (CRUD, optimistic concurrency, patches, server-side apply, the status subresource,
//! finalizers, label and field selectors, paginated lists, watches with bookmarks and `410
//! Gone`), served as real HTTP/1.1 (plain, no TLS) on 127.0.0.1 so kube-rs, `kubectl` or a
//! raw HTTP client talk to it exactly as to a cluster. Tests drive it from the side (create
//! objects as an admin or a kubelet would, compact history, fail requests, close watches) and
//! inspect a log of the requests it answered.
//!
//! Include it from a test crate with `mod support { pub mod kube_fake; }` or
//! `#[path = "support/kube_fake.rs"] mod kube_fake;`.
//!
//! Semantics follow the published documentation:
//! - API concepts (resource versions, efficient detection of changes, `410 Gone`, watch
//!   bookmarks, retrieving large results in chunks with `limit`/`continue`):
//!   <https://kubernetes.io/docs/reference/using-api/api-concepts/>
//! - server-side apply: <https://kubernetes.io/docs/reference/using-api/server-side-apply/>
//! - finalizers: <https://kubernetes.io/docs/concepts/overview/working-with-objects/finalizers/>
//! - API conventions (`Status` errors, optimistic concurrency, generation):
//!   <https://github.com/kubernetes/community/blob/master/contributors/devel/sig-architecture/api-conventions.md>
//! - the status subresource:
//!   <https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#status-subresource>
//! - request verbs (as recorded in the request log):
//!   <https://kubernetes.io/docs/reference/access-authn-authz/authorization/#determine-the-request-verb>
//!
//! The model: one global resource-version counter (etcd's revision) moves on every write, in
//! any resource; every write appends an event to a bounded history ([`HISTORY_CAP`] events;
//! evicting an event raises the *compaction floor*, and [`FakeKube::compact`] raises it to the
//! current version). Lists at an older version (`resourceVersionMatch=Exact`, or a `continue`
//! token) are consistent snapshots rebuilt from that history; watches replay it. A version
//! below the floor is `410 Expired`, as after an etcd compaction. Objects are kept in one
//! ordered map per resource keyed by (namespace, name) with their JSON serialized once per
//! write, so lists and watches of thousands of objects stay cheap.
//!
//! Simplifications (each documented where it applies):
//! - no authentication, authorization or admission webhooks; the namespaces `default`,
//!   `kube-system`, `kube-public` and `kube-node-lease` exist from the start, creating a
//!   namespaced object over HTTP in a missing namespace is `404` (the test-side
//!   [`FakeKube::apply`] creates the namespace instead); deleting a namespace deletes only the
//!   Namespace object (no cascade, no `Terminating` phase);
//! - no schema validation beyond names (DNS subdomain) and the object's type;
//! - `generation` starts at 1 for every resource and increases on any change outside
//!   `metadata` and `status` (and when a deletion with finalizers pending sets
//!   `deletionTimestamp`, as the real server does);
//! - strategic merge patch is treated as a JSON merge patch (lists are replaced, no
//!   `$patch` directives) for built-in types; CRDs answer `415` as the real server does;
//! - server-side apply deep-merges the applied configuration (maps merged, lists replaced)
//!   and records the manager in `managedFields`, but does not track field ownership: no
//!   conflicts, and a field dropped from a later apply is not removed;
//! - pods are deleted at once (as an unscheduled pod is); `propagationPolicy` and owner
//!   references have no effect (no garbage collector);
//! - core `v1` Events and `events.k8s.io/v1` Events are separate stores;
//! - a watch does not send `DELETED` to a watcher whose selector an object stops matching;
//! - bookmarks are sent every [`BOOKMARK_INTERVAL`] (the real server sends them about once a
//!   minute), which makes them observable in tests.
//!
//! Discovery requests (`/version`, `/api`, `/apis`, `/api/v1`, `/apis/{g}`, `/apis/{g}/{v}`)
//! are logged with verb `get` and resource `""` and are exempt from [`FakeKube::fail_next`].
//!
//! Everything is bounded: the history, the request log ([`LOG_CAP`] entries), request bodies
//! ([`MAX_BODY`]), watch duration (`timeoutSeconds`, at most [`MAX_WATCH_TIMEOUT`]), and
//! `stop()` ends every connection.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Events kept for watches and snapshot lists; evicting one raises the compaction floor.
pub const HISTORY_CAP: usize = 10_000;
/// Requests kept in the log (the oldest are dropped).
pub const LOG_CAP: usize = 100_000;
/// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
pub const BOOKMARK_INTERVAL: Duration = Duration::from_secs(1);
/// Default and maximum `timeoutSeconds` of a watch.
pub const MAX_WATCH_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Largest request body accepted (the real server's limit is 3 MiB too); larger is `413`.
pub const MAX_BODY: usize = 3 * 1024 * 1024;
/// `gitVersion` of `GET /version`.
pub const GIT_VERSION: &str = "v1.34.0";
/// Namespaces that exist from the start, as in a fresh cluster.
pub const DEFAULT_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];
/// Objects per chunk of the synthetic ADDED events that start a watch from "now".
const WATCH_CHUNK: usize = 500;

/// A resource the fake serves.
#[derive(Debug, Clone, Copy)]
pub struct ResourceDef {
    /// API group, `""` for the core group.
    pub group: &'static str,
    pub version: &'static str,
    /// Plural, lower case: the URL segment and the RBAC resource.
    pub resource: &'static str,
    pub singular: &'static str,
    pub kind: &'static str,
    pub namespaced: bool,
    /// Has a `status` subresource: main-resource writes keep the old status, `/status`
    /// writes change only the status.
    pub status: bool,
    /// A custom resource (strategic merge patch is `415`, field selectors limited to
    /// `metadata.name` and `metadata.namespace`).
    pub crd: bool,
    pub short_names: &'static [&'static str],
    /// Field-selector labels supported besides `metadata.name` and `metadata.namespace`.
    pub fields: &'static [&'static str],
}

impl ResourceDef {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_string()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `pods` or `meshservices.meshbridge.io`, as in error messages.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.resource.to_string()
        } else {
            format!("{}.{}", self.resource, self.group)
        }
    }
}

const fn def(
    group: &'static str,
    version: &'static str,
    resource: &'static str,
    singular: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> ResourceDef {
    ResourceDef {
        group,
        version,
        resource,
        singular,
        kind,
        namespaced,
        status: false,
        crd: false,
        short_names: &[],
        fields: &[],
    }
}

/// The resources served, in discovery order.
pub const RESOURCES: &[ResourceDef] = &[
    ResourceDef {
        status: true,
        short_names: &["po"],
        fields: &[
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        ..def("", "v1", "pods", "pod", "Pod", true)
    },
    ResourceDef {
        short_names: &["ns"],
        fields: &["status.phase"],
        ..def("", "v1", "namespaces", "namespace", "Namespace", false)
    },
    ResourceDef {
        short_names: &["ev"],
        fields: &[
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "type",
        ],
        ..def("", "v1", "events", "event", "Event", true)
    },
    ResourceDef {
        fields: &["type"],
        ..def("", "v1", "secrets", "secret", "Secret", true)
    },
    ResourceDef {
        short_names: &["svc"],
        ..def("", "v1", "services", "service", "Service", true)
    },
    ResourceDef {
        short_names: &["cm"],
        ..def("", "v1", "configmaps", "configmap", "ConfigMap", true)
    },
    ResourceDef {
        short_names: &["ev"],
        fields: &[
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "reason",
            "reportingController",
            "type",
        ],
        ..def("events.k8s.io", "v1", "events", "event", "Event", true)
    },
    def(
        "coordination.k8s.io",
        "v1",
        "leases",
        "lease",
        "Lease",
        true,
    ),
    def(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "endpointslice",
        "EndpointSlice",
        true,
    ),
    def(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "mutatingwebhookconfiguration",
        "MutatingWebhookConfiguration",
        false,
    ),
    def(
        "admissionregistration.k8s.io",
        "v1",
        "validatingwebhookconfigurations",
        "validatingwebhookconfiguration",
        "ValidatingWebhookConfiguration",
        false,
    ),
    ResourceDef {
        status: true,
        crd: true,
        short_names: &["msvc"],
        ..def(
            "meshbridge.io",
            "v1alpha1",
            "meshservices",
            "meshservice",
            "MeshService",
            true,
        )
    },
    ResourceDef {
        status: true,
        crd: true,
        short_names: &["arule"],
        ..def(
            "meshbridge.io",
            "v1alpha1",
            "accessrules",
            "accessrule",
            "AccessRule",
            true,
        )
    },
];

const NAMESPACES: usize = 1;
const VERBS: &[&str] = &[
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
];
const STATUS_VERBS: &[&str] = &["get", "patch", "update"];

fn find_resource(group: &str, version: &str, resource: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|d| d.group == group && d.version == version && d.resource == resource)
}

fn find_kind(api_version: &str, kind: &str) -> Option<usize> {
    RESOURCES
        .iter()
        .position(|d| d.api_version() == api_version && d.kind == kind)
}

/// One HTTP request, as the API server's audit log would name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    /// RBAC verb: get, list, watch, create, update, patch, delete, deletecollection (the
    /// lower-cased HTTP method for other methods).
    pub verb: String,
    /// API group, `""` for core.
    pub group: String,
    /// Plural resource (`""` for discovery).
    pub resource: String,
    pub subresource: Option<String>,
    pub namespace: Option<String>,
    pub name: Option<String>,
    /// The `fieldManager` query parameter.
    pub field_manager: Option<String>,
    pub content_type: Option<String>,
    pub user_agent: Option<String>,
    /// The raw query string (`""` when absent).
    pub query: String,
}

type Key = (String, String);

/// A stored object and its JSON, serialized once per write.
struct Obj {
    value: Value,
    json: Bytes,
}

impl Obj {
    fn new(value: Value) -> Arc<Obj> {
        let json = Bytes::from(serde_json::to_vec(&value).unwrap());
        Arc::new(Obj { value, json })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

struct HistEvent {
    rv: u64,
    res: usize,
    etype: EventType,
    key: Key,
    /// The object after the write (for DELETED: the last state, with the deletion's rv).
    obj: Arc<Obj>,
    /// The object before the write (None for ADDED), to rebuild older snapshots.
    prev: Option<Arc<Obj>>,
}

struct State {
    rv: u64,
    /// Events with `rv <= floor` are gone: lists and watches from below it are `410`.
    floor: u64,
    objects: Vec<BTreeMap<Key, Arc<Obj>>>,
    history: VecDeque<HistEvent>,
    /// Bumped by `compact()`: open watches end with a 410 ERROR event.
    compact_epoch: u64,
    /// Bumped by `close_watches()`: open watches end cleanly.
    close_epoch: u64,
    fail_left: usize,
    fail_code: u16,
    log: VecDeque<Recorded>,
    serial: u64,
    seed: u64,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    open_watches: AtomicUsize,
    addr: SocketAddr,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }

    /// Runs `f` on the state and wakes watchers if it wrote anything.
    fn write<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (out, wrote) = {
            let mut st = self.lock();
            let before = (st.rv, st.compact_epoch, st.close_epoch);
            let out = f(&mut st);
            (out, before != (st.rv, st.compact_epoch, st.close_epoch))
        };
        if wrote {
            self.notify();
        }
        out
    }
}

/// The fake API server. Dropping it stops serving (connections are aborted).
pub struct FakeKube {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl FakeKube {
    /// Starts serving on 127.0.0.1 on a port chosen by the OS, with the namespaces of
    /// [`DEFAULT_NAMESPACES`].
    pub async fn start() -> FakeKube {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seed = RandomState::new().build_hasher().finish();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 0,
                floor: 0,
                objects: RESOURCES.iter().map(|_| BTreeMap::new()).collect(),
                history: VecDeque::new(),
                compact_epoch: 0,
                close_epoch: 0,
                fail_left: 0,
                fail_code: 500,
                log: VecDeque::new(),
                serial: 0,
                seed,
            }),
            changed: watch::channel(0).0,
            open_watches: AtomicUsize::new(0),
            addr,
        });
        for ns in DEFAULT_NAMESPACES {
            shared.write(|st| st.ensure_namespace(ns));
        }
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(serve(listener, shared.clone(), rx));
        FakeKube {
            addr,
            shared,
            server: Some((tx, task)),
        }
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Closes the listener and every open connection (watches end without a final event).
    /// The data is kept.
    pub async fn stop(&mut self) {
        if let Some((tx, task)) = self.server.take() {
            let _ = tx.send(());
            let _ = task.await;
        }
    }

    /// Writes `dir/kubeconfig`: one cluster whose server is [`url`](Self::url), a user
    /// without credentials, and a current context with namespace `default`.
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n\
             preferences: {{}}\n",
            self.url()
        );
        std::fs::write(&path, text).unwrap();
        path
    }

    /// Creates or replaces an object as an administrator (or the kubelet) would: by its
    /// `apiVersion`, `kind`, `metadata.namespace` (default `default`, created when missing)
    /// and `metadata.name`. Its `status` is stored as given (no status-subresource rule),
    /// `metadata.resourceVersion` is ignored (unconditional), and the watch events are those
    /// of a real write. `uid` and `creationTimestamp` are generated on create and kept on
    /// replace, unless the given object sets them (a test may backdate an object); a pending
    /// `deletionTimestamp` is kept, and clearing the finalizers of an object being deleted
    /// deletes it. Writing an identical object is a no-op (no new version, no event).
    /// Returns the stored object. Panics on an unknown kind or an invalid object.
    pub fn apply(&self, obj: Value) -> Value {
        let api_version = obj["apiVersion"].as_str().unwrap_or_default().to_string();
        let kind = obj["kind"].as_str().unwrap_or_default().to_string();
        let r = find_kind(&api_version, &kind)
            .unwrap_or_else(|| panic!("FakeKube::apply: unknown kind {api_version} {kind}"));
        let def = &RESOURCES[r];
        let ns = if def.namespaced {
            obj["metadata"]["namespace"]
                .as_str()
                .filter(|s| !s.is_empty())
                .unwrap_or("default")
                .to_string()
        } else {
            String::new()
        };
        let name = obj["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let ctx = Ctx::admin();
        let out = self.shared.write(|st| {
            let key = (ns.clone(), name.clone());
            match st.objects[r].get(&key).cloned() {
                Some(old) => st.finish_update(r, &old, obj, &ctx, None),
                None => {
                    if def.namespaced {
                        st.ensure_namespace(&ns);
                    }
                    st.create_obj(r, def.namespaced.then_some(ns.as_str()), obj, &ctx, None)
                }
            }
        });
        match out {
            Ok(o) => o.value.clone(),
            Err(e) => panic!("FakeKube::apply: {} {}", e.code, e.message),
        }
    }

    /// Deletes an object as `kubectl delete` would: with finalizers pending it only gets a
    /// `deletionTimestamp`. Returns whether the object existed. `namespace` None means
    /// `default` for a namespaced kind.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> bool {
        let (r, key) = key_for(api_version, kind, namespace, name);
        self.shared
            .write(|st| st.delete_obj(r, &key, None, false))
            .is_ok()
    }

    /// The stored object, if any (`namespace` None means `default` for a namespaced kind).
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let (r, key) = key_for(api_version, kind, namespace, name);
        self.shared.lock().objects[r]
            .get(&key)
            .map(|o| o.value.clone())
    }

    /// Every stored object of a kind, in all namespaces, ordered by namespace and name.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let r = find_kind(api_version, kind)
            .unwrap_or_else(|| panic!("FakeKube: unknown kind {api_version} {kind}"));
        self.shared.lock().objects[r]
            .values()
            .map(|o| o.value.clone())
            .collect()
    }

    /// The current resource version (the global write counter).
    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }

    /// The compaction floor: lists, continues and watches from a version below it are `410`.
    pub fn compaction_floor(&self) -> u64 {
        self.shared.lock().floor
    }

    /// Compacts the history up to the current version, like an etcd compaction followed by
    /// a watch-cache reset: later watches, exact lists and continue tokens from an older
    /// version get `410 Expired`, and every open watch gets an `ERROR` event with a `410`
    /// Status and is closed, so its client must list again.
    pub fn compact(&self) {
        self.shared.write(|st| {
            st.floor = st.rv;
            st.history.clear();
            st.compact_epoch += 1;
        });
    }

    /// Ends every open watch stream cleanly (as at the end of `timeoutSeconds`).
    pub fn close_watches(&self) {
        self.shared.write(|st| st.close_epoch += 1);
    }

    /// Watch streams open right now.
    pub fn open_watches(&self) -> usize {
        self.shared.open_watches.load(Ordering::SeqCst)
    }

    /// The next `n` non-discovery requests fail with `code` and a `Status` body (the
    /// reason matching the code, e.g. 500 `InternalError`, 503 `ServiceUnavailable`, 429
    /// `TooManyRequests` with `Retry-After: 1`). They are still logged.
    pub fn fail_next(&self, n: usize, code: u16) {
        let mut st = self.shared.lock();
        st.fail_left = n;
        st.fail_code = code;
    }

    /// Every request logged so far (at most [`LOG_CAP`], oldest first).
    pub fn requests(&self) -> Vec<Recorded> {
        self.shared.lock().log.iter().cloned().collect()
    }

    /// Requests logged with `verb` on `resource`, where `resource` is a plural
    /// (`meshservices`, any group) or `resource/subresource` (`meshservices/status`). A plain
    /// resource does not count its subresource's requests.
    pub fn count(&self, verb: &str, resource: &str) -> usize {
        let (res, sub) = match resource.split_once('/') {
            Some((r, s)) => (r, Some(s)),
            None => (resource, None),
        };
        self.shared
            .lock()
            .log
            .iter()
            .filter(|r| r.verb == verb && r.resource == res && r.subresource.as_deref() == sub)
            .count()
    }

    /// Empties the request log.
    pub fn clear_requests(&self) {
        self.shared.lock().log.clear();
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some((_tx, task)) = self.server.take() {
            // Dropping the task's future drops its JoinSet, which aborts every connection.
            task.abort();
        }
    }
}

fn key_for(api_version: &str, kind: &str, namespace: Option<&str>, name: &str) -> (usize, Key) {
    let r = find_kind(api_version, kind)
        .unwrap_or_else(|| panic!("FakeKube: unknown kind {api_version} {kind}"));
    let ns = if RESOURCES[r].namespaced {
        namespace.unwrap_or("default").to_string()
    } else {
        String::new()
    };
    (r, (ns, name.to_string()))
}

// ---------------------------------------------------------------------------------------
// Errors

#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn about(mut self, def: &ResourceDef, name: &str) -> Self {
        let mut d = Map::new();
        if !name.is_empty() {
            d.insert("name".into(), json!(name));
        }
        if !def.group.is_empty() {
            d.insert("group".into(), json!(def.group));
        }
        d.insert("kind".into(), json!(def.resource));
        self.details = Some(Value::Object(d));
        self
    }

    fn to_json(&self) -> Value {
        let mut v = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(d) = &self.details {
            v["details"] = d.clone();
        }
        v
    }
}

fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "InternalError",
    }
}

fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError::new(400, "BadRequest", msg)
}

fn not_found(def: &ResourceDef, name: &str) -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        format!("{} \"{name}\" not found", def.qualified()),
    )
    .about(def, name)
}

fn no_such_resource() -> ApiError {
    ApiError::new(
        404,
        "NotFound",
        "the server could not find the requested resource",
    )
    .with_empty_details()
}

impl ApiError {
    fn with_empty_details(mut self) -> Self {
        self.details = Some(json!({}));
        self
    }
}

fn conflict(def: &ResourceDef, name: &str, why: &str) -> ApiError {
    ApiError::new(
        409,
        "Conflict",
        format!(
            "Operation cannot be fulfilled on {} \"{name}\": {why}",
            def.qualified()
        ),
    )
    .about(def, name)
}

const MODIFIED: &str =
    "the object has been modified; please apply your changes to the latest version and try again";

fn invalid(def: &ResourceDef, name: &str, why: &str) -> ApiError {
    ApiError::new(
        422,
        "Invalid",
        format!("{} \"{name}\" is invalid: {why}", def.kind),
    )
    .about(def, name)
}

fn method_not_allowed() -> ApiError {
    ApiError::new(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
    )
    .with_empty_details()
}

fn expired(msg: impl Into<String>) -> ApiError {
    ApiError::new(410, "Expired", msg)
}

fn too_old(rv: u64, floor: u64) -> String {
    format!("too old resource version: {rv} ({floor})")
}

fn too_large(rv: u64, current: u64) -> ApiError {
    let mut e = ApiError::new(
        504,
        "Timeout",
        format!("Too large resource version: {rv}, current: {current}"),
    );
    e.details = Some(json!({
        "causes": [{"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}],
        "retryAfterSeconds": 1,
    }));
    e
}

// ---------------------------------------------------------------------------------------
// Writes

/// Who writes, and how.
struct Ctx {
    /// Recorded in `managedFields` when set.
    manager: Option<String>,
    /// `Update` or `Apply`.
    operation: &'static str,
    /// `Some("status")` for writes to the status subresource.
    sub: Option<String>,
    dry_run: bool,
    /// Test-side write: status stored as given, no namespace check, rv ignored.
    admin: bool,
}

impl Ctx {
    fn admin() -> Ctx {
        Ctx {
            manager: None,
            operation: "Update",
            sub: None,
            dry_run: false,
            admin: true,
        }
    }

    fn status_only(&self) -> bool {
        self.sub.as_deref() == Some("status")
    }
}

impl State {
    fn random(&mut self) -> u64 {
        self.serial += 1;
        let mut h = RandomState::new().build_hasher();
        h.write_u64(self.seed);
        h.write_u64(self.serial);
        h.finish()
    }

    fn uid(&mut self) -> String {
        let a = self.random();
        let b = self.random();
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    fn ensure_namespace(&mut self, ns: &str) {
        let key = (String::new(), ns.to_string());
        if !self.objects[NAMESPACES].contains_key(&key) {
            let obj = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}});
            let _ = self.create_obj(NAMESPACES, None, obj, &Ctx::admin(), None);
        }
    }

    /// One write: bumps the resource version, stores (or removes) the object, records the
    /// event. Returns the object as stored (for a deletion, its last state).
    fn commit(&mut self, r: usize, key: Key, mut value: Value, delete: bool) -> Arc<Obj> {
        self.rv += 1;
        value["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
        let obj = Obj::new(value);
        let (etype, prev) = if delete {
            (EventType::Deleted, self.objects[r].remove(&key))
        } else {
            let prev = self.objects[r].insert(key.clone(), obj.clone());
            let t = if prev.is_some() {
                EventType::Modified
            } else {
                EventType::Added
            };
            (t, prev)
        };
        self.history.push_back(HistEvent {
            rv: self.rv,
            res: r,
            etype,
            key,
            obj: obj.clone(),
            prev,
        });
        while self.history.len() > HISTORY_CAP {
            if let Some(e) = self.history.pop_front() {
                self.floor = self.floor.max(e.rv);
            }
        }
        obj
    }

    /// POST (and server-side apply of a missing object, and the test-side apply).
    fn create_obj(
        &mut self,
        r: usize,
        ns_path: Option<&str>,
        mut body: Value,
        ctx: &Ctx,
        fields: Option<Value>,
    ) -> Result<Arc<Obj>, ApiError> {
        let def = &RESOURCES[r];
        check_type(def, &body)?;
        let obj = body.as_object_mut().unwrap();
        obj.insert("apiVersion".into(), json!(def.api_version()));
        obj.insert("kind".into(), json!(def.kind));
        let meta = obj.entry("metadata").or_insert_with(|| json!({}));
        if meta.is_null() {
            *meta = json!({});
        }
        let Some(meta) = meta.as_object_mut() else {
            return Err(bad_request("metadata must be an object"));
        };
        let ns = if def.namespaced {
            let in_body = meta
                .get("namespace")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            let ns = match (ns_path, in_body) {
                (Some(p), Some(b)) if p != b => {
                    return Err(bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                (Some(p), _) => p.to_string(),
                (None, Some(b)) => b.to_string(),
                (None, None) => "default".to_string(),
            };
            let ns_key = (String::new(), ns.clone());
            if !ctx.admin && !self.objects[NAMESPACES].contains_key(&ns_key) {
                return Err(not_found(&RESOURCES[NAMESPACES], &ns));
            }
            meta.insert("namespace".into(), json!(ns));
            ns
        } else {
            meta.remove("namespace");
            String::new()
        };
        let mut name = meta
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if name.is_empty() {
            let prefix = meta
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            if prefix.is_empty() {
                return Err(invalid(
                    def,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
            // Bounded: a clash after 8 tries is answered as AlreadyExists below.
            for _ in 0..8 {
                const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
                let mut x = self.random();
                let mut cand = prefix.clone();
                for _ in 0..5 {
                    cand.push(ALPHABET[(x % ALPHABET.len() as u64) as usize] as char);
                    x /= ALPHABET.len() as u64;
                }
                name = cand;
                if !self.objects[r].contains_key(&(ns.clone(), name.clone())) {
                    break;
                }
            }
            meta.insert("name".into(), json!(name));
        }
        if let Err(why) = validate_name(&name) {
            return Err(invalid(
                def,
                &name,
                &format!("metadata.name: Invalid value: \"{name}\": {why}"),
            ));
        }
        if !ctx.admin
            && meta
                .get("resourceVersion")
                .and_then(Value::as_str)
                .is_some_and(|s| !s.is_empty())
        {
            return Err(bad_request(
                "resourceVersion should not be set on objects to be created",
            ));
        }
        let key = (ns, name.clone());
        if self.objects[r].contains_key(&key) {
            return Err(ApiError::new(
                409,
                "AlreadyExists",
                format!("{} \"{name}\" already exists", def.qualified()),
            )
            .about(def, &name));
        }
        let uid = self.uid();
        let meta = body["metadata"].as_object_mut().unwrap();
        // The test side may set uid and creationTimestamp (e.g. to order objects by age).
        let given = |meta: &Map<String, Value>, f: &str| {
            ctx.admin
                && meta
                    .get(f)
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
        };
        if !given(meta, "uid") {
            meta.insert("uid".into(), json!(uid));
        }
        if !given(meta, "creationTimestamp") {
            meta.insert(
                "creationTimestamp".into(),
                json!(rfc3339(SystemTime::now())),
            );
        }
        meta.insert("generation".into(), json!(1));
        for f in [
            "resourceVersion",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "selfLink",
        ] {
            meta.remove(f);
        }
        if !ctx.admin {
            meta.remove("managedFields");
        }
        if let Some(m) = &ctx.manager {
            let entry = managed_entry(m, ctx, def, fields.unwrap_or_else(|| json!({})));
            meta.insert("managedFields".into(), json!([entry]));
        }
        let obj = body.as_object_mut().unwrap();
        if def.status && !ctx.admin {
            obj.remove("status");
        }
        apply_defaults(def, obj, &name);
        if ctx.dry_run {
            return Ok(Obj::new(body));
        }
        Ok(self.commit(r, key, body, false))
    }

    /// The common end of PUT, PATCH and the test-side apply of an existing object: keeps
    /// the identity fields, applies the status-subresource rule, bumps `generation`, records
    /// the manager, skips no-op writes, and completes a deletion whose finalizers are gone.
    fn finish_update(
        &mut self,
        r: usize,
        old: &Arc<Obj>,
        new: Value,
        ctx: &Ctx,
        fields: Option<Value>,
    ) -> Result<Arc<Obj>, ApiError> {
        let def = &RESOURCES[r];
        let Value::Object(mut new) = new else {
            return Err(bad_request("the body must be a JSON object"));
        };
        if new
            .get("metadata")
            .is_some_and(|m| !m.is_object() && !m.is_null())
        {
            return Err(bad_request("metadata must be an object"));
        }
        let oldv = old.value.as_object().unwrap();
        let mut result = if ctx.status_only() {
            let mut res = oldv.clone();
            match new.remove("status") {
                Some(s) if !s.is_null() => res.insert("status".into(), s),
                _ => res.remove("status"),
            };
            res
        } else {
            if def.status && !ctx.admin {
                match oldv.get("status") {
                    Some(s) => new.insert("status".into(), s.clone()),
                    None => new.remove("status"),
                };
            }
            new
        };
        result.insert("apiVersion".into(), json!(def.api_version()));
        result.insert("kind".into(), json!(def.kind));
        let old_meta = oldv["metadata"].as_object().unwrap();
        let meta = result.entry("metadata").or_insert_with(|| json!({}));
        if !meta.is_object() {
            *meta = json!({});
        }
        let meta = meta.as_object_mut().unwrap();
        for f in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            let settable = matches!(f, "uid" | "creationTimestamp");
            if ctx.admin
                && settable
                && meta
                    .get(f)
                    .and_then(Value::as_str)
                    .is_some_and(|s| !s.is_empty())
            {
                continue;
            }
            match old_meta.get(f) {
                Some(v) => meta.insert(f.into(), v.clone()),
                None => meta.remove(f),
            };
        }
        meta.remove("resourceVersion");
        meta.remove("selfLink");
        if !ctx.admin || !meta.contains_key("managedFields") {
            match old_meta.get("managedFields") {
                Some(v) => meta.insert("managedFields".into(), v.clone()),
                None => meta.remove("managedFields"),
            };
        }
        if let Some(m) = &ctx.manager {
            upsert_managed(meta, m, ctx, def, fields.unwrap_or_else(|| json!({})));
        }
        let old_gen = old_meta
            .get("generation")
            .and_then(Value::as_i64)
            .unwrap_or(1);
        let bump = i64::from(!spec_eq(oldv, &result));
        result["metadata"]["generation"] = json!(old_gen + bump);
        let result = Value::Object(result);
        if same_object(&old.value, &result) {
            return Ok(old.clone());
        }
        if ctx.dry_run {
            let mut v = result;
            v["metadata"]["resourceVersion"] = old.value["metadata"]["resourceVersion"].clone();
            return Ok(Obj::new(v));
        }
        let finished = result["metadata"].get("deletionTimestamp").is_some()
            && result["metadata"]["finalizers"]
                .as_array()
                .is_none_or(|f| f.is_empty());
        let key = obj_key(def, &old.value);
        Ok(self.commit(r, key, result, finished))
    }

    /// DELETE: with finalizers pending, sets `deletionTimestamp` (once); otherwise removes.
    fn delete_obj(
        &mut self,
        r: usize,
        key: &Key,
        options: Option<&Value>,
        dry_run: bool,
    ) -> Result<Arc<Obj>, ApiError> {
        let def = &RESOURCES[r];
        let Some(old) = self.objects[r].get(key).cloned() else {
            return Err(not_found(def, &key.1));
        };
        if let Some(pre) = options.and_then(|o| o.get("preconditions")) {
            for (field, label) in [("uid", "UID"), ("resourceVersion", "ResourceVersion")] {
                if let Some(want) = pre.get(field).and_then(Value::as_str) {
                    let have = old.value["metadata"][field].as_str().unwrap_or_default();
                    if want != have {
                        return Err(conflict(
                            def,
                            &key.1,
                            &format!(
                                "Precondition failed: {label} in precondition: {want}, {label} in object meta: {have}"
                            ),
                        ));
                    }
                }
            }
        }
        let pending = old.value["metadata"]["finalizers"]
            .as_array()
            .is_some_and(|f| !f.is_empty());
        if pending {
            if old.value["metadata"].get("deletionTimestamp").is_some() {
                return Ok(old);
            }
            let mut v = old.value.clone();
            let gen_ = v["metadata"]["generation"].as_i64().unwrap_or(1);
            v["metadata"]["deletionTimestamp"] = json!(rfc3339(SystemTime::now()));
            v["metadata"]["deletionGracePeriodSeconds"] = json!(0);
            v["metadata"]["generation"] = json!(gen_ + 1);
            if dry_run {
                return Ok(Obj::new(v));
            }
            return Ok(self.commit(r, key.clone(), v, false));
        }
        if dry_run {
            return Ok(old);
        }
        Ok(self.commit(r, key.clone(), old.value.clone(), true))
    }

    /// The objects of resource `r` (in namespace `ns`, after key `after`) as they were at
    /// version `at`, ordered by key. `at` must not be below the floor.
    fn snapshot(
        &self,
        r: usize,
        at: u64,
        ns: Option<&str>,
        after: Option<&Key>,
    ) -> Vec<(Key, Arc<Obj>)> {
        let map = &self.objects[r];
        let lower = match (after, ns) {
            (Some(k), _) => Bound::Excluded(k.clone()),
            (None, Some(n)) => Bound::Included((n.to_string(), String::new())),
            (None, None) => Bound::Unbounded,
        };
        let in_ns = |k: &Key| ns.is_none_or(|n| k.0 == n);
        let current = map
            .range((lower, Bound::Unbounded))
            .take_while(|(k, _)| in_ns(k));
        if at >= self.rv {
            return current.map(|(k, o)| (k.clone(), o.clone())).collect();
        }
        // Undo the writes made after `at`: the earliest event of each key after `at` holds
        // the object as it was at `at` (None: it did not exist).
        let start = self.history.partition_point(|e| e.rv <= at);
        let mut changes: BTreeMap<Key, Option<Arc<Obj>>> = BTreeMap::new();
        for e in self.history.range(start..) {
            if e.res == r && in_ns(&e.key) && after.is_none_or(|a| &e.key > a) {
                changes
                    .entry(e.key.clone())
                    .or_insert_with(|| e.prev.clone());
            }
        }
        let mut out: BTreeMap<Key, Arc<Obj>> = current
            .filter(|(k, _)| !changes.contains_key(*k))
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        for (k, v) in changes {
            if let Some(v) = v {
                out.insert(k, v);
            }
        }
        out.into_iter().collect()
    }
}

fn obj_key(def: &ResourceDef, v: &Value) -> Key {
    let ns = if def.namespaced {
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    } else {
        String::new()
    };
    (
        ns,
        v["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// The body is an object whose `apiVersion` and `kind`, when present, are the resource's.
fn check_type(def: &ResourceDef, body: &Value) -> Result<(), ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(bad_request("the body of the request must be a JSON object"));
    };
    if let Some(av) = obj.get("apiVersion").and_then(Value::as_str)
        && !av.is_empty()
        && av != def.api_version()
    {
        return Err(bad_request(format!(
            "the API version in the data ({av}) does not match the expected API version ({})",
            def.api_version()
        )));
    }
    if let Some(k) = obj.get("kind").and_then(Value::as_str)
        && !k.is_empty()
        && k != def.kind
    {
        return Err(bad_request(format!(
            "the kind in the data ({k}) does not match the expected kind ({})",
            def.kind
        )));
    }
    Ok(())
}

/// A DNS-1123 subdomain, as most names must be.
fn validate_name(name: &str) -> Result<(), &'static str> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let ends_ok = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if name.len() > 253 {
        return Err("must be no more than 253 characters");
    }
    if !ok_chars || !ends_ok(name.as_bytes().first()) || !ends_ok(name.as_bytes().last()) {
        return Err(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        );
    }
    Ok(())
}

/// What the real server fills in on create.
fn apply_defaults(def: &ResourceDef, obj: &mut Map<String, Value>, name: &str) {
    match (def.group, def.resource) {
        ("", "pods") if !obj.get("status").is_some_and(Value::is_object) => {
            obj.insert("status".into(), json!({"phase": "Pending"}));
        }
        ("", "namespaces") => {
            let meta = obj["metadata"].as_object_mut().unwrap();
            let labels = meta.entry("labels").or_insert_with(|| json!({}));
            if labels.is_object() {
                labels["kubernetes.io/metadata.name"] = json!(name);
            }
            obj.entry("spec")
                .or_insert_with(|| json!({"finalizers": ["kubernetes"]}));
            if !obj.get("status").is_some_and(Value::is_object) {
                obj.insert("status".into(), json!({"phase": "Active"}));
            }
        }
        _ => {}
    }
}

/// Equal outside `metadata`, `status`, `apiVersion` and `kind` (the "spec" for the purpose
/// of `generation`).
fn spec_eq(a: &Map<String, Value>, b: &Map<String, Value>) -> bool {
    let spec = |m: &Map<String, Value>| -> Vec<(String, Value)> {
        m.iter()
            .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status" | "apiVersion" | "kind"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    spec(a) == spec(b)
}

/// Equal but for `resourceVersion` and the timestamps of `managedFields`: such a write is a
/// no-op on the real server (no new version, no event).
fn same_object(a: &Value, b: &Value) -> bool {
    let norm = |v: &Value| {
        let mut v = v.clone();
        if let Some(m) = v["metadata"].as_object_mut() {
            m.remove("resourceVersion");
            if let Some(Value::Array(mf)) = m.get_mut("managedFields") {
                for e in mf {
                    if let Some(e) = e.as_object_mut() {
                        e.remove("time");
                    }
                }
            }
        }
        v
    };
    norm(a) == norm(b)
}

/// The `fieldsV1` of a request body: its field paths (lists are leaves). In `metadata` only
/// labels, annotations, finalizers and ownerReferences are counted, as the real server does.
fn field_set(body: &Value, def: &ResourceDef, ctx: &Ctx) -> Value {
    fn walk(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                Value::Object(m.iter().map(|(k, v)| (format!("f:{k}"), walk(v))).collect())
            }
            _ => json!({}),
        }
    }
    let mut out = Map::new();
    let Some(obj) = body.as_object() else {
        return json!({});
    };
    for (k, v) in obj {
        match k.as_str() {
            "apiVersion" | "kind" => {}
            "metadata" => {
                let mut m = Map::new();
                if let Some(meta) = v.as_object() {
                    for f in ["labels", "annotations", "finalizers", "ownerReferences"] {
                        if let Some(x) = meta.get(f) {
                            m.insert(format!("f:{f}"), walk(x));
                        }
                    }
                }
                if !m.is_empty() {
                    out.insert("f:metadata".into(), Value::Object(m));
                }
            }
            "status" if def.status && !ctx.status_only() => {}
            _ if ctx.status_only() && k != "status" => {}
            _ => {
                out.insert(format!("f:{k}"), walk(v));
            }
        }
    }
    Value::Object(out)
}

fn managed_entry(manager: &str, ctx: &Ctx, def: &ResourceDef, fields: Value) -> Value {
    let mut e = json!({
        "manager": manager,
        "operation": ctx.operation,
        "apiVersion": def.api_version(),
        "time": rfc3339(SystemTime::now()),
        "fieldsType": "FieldsV1",
        "fieldsV1": fields,
    });
    if let Some(s) = &ctx.sub {
        e["subresource"] = json!(s);
    }
    e
}

/// Replaces the entry of (manager, operation, subresource), or adds one. An `Update` entry
/// keeps the union of the fields it wrote; an `Apply` entry holds the last applied set.
fn upsert_managed(
    meta: &mut Map<String, Value>,
    manager: &str,
    ctx: &Ctx,
    def: &ResourceDef,
    fields: Value,
) {
    let list = meta.entry("managedFields").or_insert_with(|| json!([]));
    if !list.is_array() {
        *list = json!([]);
    }
    let list = list.as_array_mut().unwrap();
    let same = |e: &Value| {
        e["manager"] == json!(manager)
            && e["operation"] == json!(ctx.operation)
            && e.get("subresource").and_then(Value::as_str) == ctx.sub.as_deref()
    };
    let mut fields = fields;
    if let Some(pos) = list.iter().position(same) {
        let old = list.remove(pos);
        if ctx.operation == "Update" {
            let mut merged = old["fieldsV1"].clone();
            merge_patch(&mut merged, &fields);
            fields = merged;
        }
        let mut e = managed_entry(manager, ctx, def, fields);
        if old["fieldsV1"] == e["fieldsV1"] {
            // Unchanged ownership keeps its time, so a repeated write stays a no-op.
            e["time"] = old["time"].clone();
        }
        list.insert(pos, e);
    } else {
        list.push(managed_entry(manager, ctx, def, fields));
    }
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let t = target.as_object_mut().unwrap();
    for (k, v) in p {
        if v.is_null() {
            t.remove(k);
        } else {
            merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// RFC 6902 JSON patch. Errors are the message of a 422.
fn json_patch(doc: &mut Value, ops: &[Value]) -> Result<(), String> {
    for op in ops {
        let name = op["op"]
            .as_str()
            .ok_or("a JSON patch operation needs an \"op\"")?;
        let path = op["path"]
            .as_str()
            .ok_or("a JSON patch operation needs a \"path\"")?;
        let path = parse_pointer(path)?;
        match name {
            "add" => {
                let v = op.get("value").ok_or("add needs a value")?.clone();
                pointer_add(doc, &path, v)?;
            }
            "remove" => {
                pointer_remove(doc, &path)?;
            }
            "replace" => {
                let v = op.get("value").ok_or("replace needs a value")?.clone();
                pointer_remove(doc, &path)?;
                pointer_add(doc, &path, v)?;
            }
            "move" => {
                let from = parse_pointer(op["from"].as_str().ok_or("move needs a from")?)?;
                let v = pointer_remove(doc, &from)?;
                pointer_add(doc, &path, v)?;
            }
            "copy" => {
                let from = parse_pointer(op["from"].as_str().ok_or("copy needs a from")?)?;
                let v = pointer_get(doc, &from)
                    .ok_or_else(|| format!("copy from a missing path {:?}", op["from"]))?
                    .clone();
                pointer_add(doc, &path, v)?;
            }
            "test" => {
                let want = op.get("value").unwrap_or(&Value::Null);
                if pointer_get(doc, &path) != Some(want) {
                    return Err(format!(
                        "testing value {} failed: test failed",
                        op["path"].as_str().unwrap_or_default()
                    ));
                }
            }
            other => {
                return Err(format!(
                    "unexpected kind of JSON patch operation: {other:?}"
                ));
            }
        }
    }
    Ok(())
}

fn parse_pointer(p: &str) -> Result<Vec<String>, String> {
    if p.is_empty() {
        return Ok(Vec::new());
    }
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!("JSON pointer {p:?} must start with '/'"));
    };
    Ok(rest
        .split('/')
        .map(|s| s.replace("~1", "/").replace("~0", "~"))
        .collect())
}

fn pointer_get<'a>(doc: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut cur = doc;
    for seg in path {
        cur = match cur {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(cur)
}

fn pointer_parent<'a>(doc: &'a mut Value, path: &[String]) -> Result<&'a mut Value, String> {
    let mut cur = doc;
    for seg in &path[..path.len() - 1] {
        cur = match cur {
            Value::Object(m) => m.get_mut(seg),
            Value::Array(a) => seg.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
            _ => None,
        }
        .ok_or_else(|| format!("missing path: /{}", path.join("/")))?;
    }
    Ok(cur)
}

fn pointer_add(doc: &mut Value, path: &[String], v: Value) -> Result<(), String> {
    let Some(last) = path.last() else {
        *doc = v;
        return Ok(());
    };
    match pointer_parent(doc, path)? {
        Value::Object(m) => {
            m.insert(last.clone(), v);
        }
        Value::Array(a) => {
            let i = if last == "-" {
                a.len()
            } else {
                last.parse::<usize>()
                    .ok()
                    .filter(|i| *i <= a.len())
                    .ok_or_else(|| format!("invalid array index {last:?}"))?
            };
            a.insert(i, v);
        }
        _ => return Err(format!("cannot add at /{}", path.join("/"))),
    }
    Ok(())
}

fn pointer_remove(doc: &mut Value, path: &[String]) -> Result<Value, String> {
    let Some(last) = path.last() else {
        return Err("cannot remove the whole document".into());
    };
    let missing = || format!("missing path: /{}", path.join("/"));
    match pointer_parent(doc, path)? {
        Value::Object(m) => m.remove(last).ok_or_else(missing),
        Value::Array(a) => {
            let i = last
                .parse::<usize>()
                .ok()
                .filter(|i| *i < a.len())
                .ok_or_else(missing)?;
            Ok(a.remove(i))
        }
        _ => Err(missing()),
    }
}

// ---------------------------------------------------------------------------------------
// Selectors

#[derive(Debug, Clone)]
enum LabelReq {
    Exists(String),
    NotExists(String),
    Eq(String, String),
    NotEq(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Gt(String, i64),
    Lt(String, i64),
}

#[derive(Debug, Clone)]
struct FieldReq {
    path: String,
    value: String,
    negate: bool,
}

/// A `labelSelector` and a `fieldSelector` (every requirement must hold).
#[derive(Debug, Clone, Default)]
struct Selector {
    labels: Vec<LabelReq>,
    fields: Vec<FieldReq>,
}

impl Selector {
    fn parse(
        def: &ResourceDef,
        labels: Option<&str>,
        fields: Option<&str>,
    ) -> Result<Selector, ApiError> {
        let labels = parse_labels(labels.unwrap_or_default())
            .map_err(|e| bad_request(format!("unable to parse requirement: {e}")))?;
        let fields = parse_fields(def, fields.unwrap_or_default()).map_err(bad_request)?;
        Ok(Selector { labels, fields })
    }

    fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.fields.is_empty()
    }

    fn matches(&self, v: &Value) -> bool {
        let labels = v["metadata"]["labels"].as_object();
        let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            LabelReq::Exists(k) => label(k).is_some(),
            LabelReq::NotExists(k) => label(k).is_none(),
            LabelReq::Eq(k, x) => label(k) == Some(x.as_str()),
            LabelReq::NotEq(k, x) => label(k) != Some(x.as_str()),
            LabelReq::In(k, xs) => label(k).is_some_and(|l| xs.iter().any(|x| x == l)),
            LabelReq::NotIn(k, xs) => !label(k).is_some_and(|l| xs.iter().any(|x| x == l)),
            LabelReq::Gt(k, n) => label(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l > *n),
            LabelReq::Lt(k, n) => label(k)
                .and_then(|l| l.parse::<i64>().ok())
                .is_some_and(|l| l < *n),
        });
        labels_ok
            && self.fields.iter().all(|f| {
                let mut cur = v;
                for seg in f.path.split('.') {
                    cur = &cur[seg];
                }
                let have = match cur {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (have == f.value) != f.negate
            })
    }
}

fn split_top_level(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

fn label_key(k: &str) -> Result<String, String> {
    let k = k.trim();
    let ok = !k.is_empty()
        && k.len() <= 316
        && k.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
    if ok {
        Ok(k.to_string())
    } else {
        Err(format!("invalid label key {k:?}"))
    }
}

fn label_value(v: &str) -> Result<String, String> {
    let v = v.trim();
    let ok = v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(v.to_string())
    } else {
        Err(format!("invalid label value {v:?}"))
    }
}

fn parse_labels(s: &str) -> Result<Vec<LabelReq>, String> {
    let mut out = Vec::new();
    if s.trim().is_empty() {
        return Ok(out);
    }
    for term in split_top_level(s) {
        let t = term.trim();
        if t.is_empty() {
            return Err(format!("empty requirement in {s:?}"));
        }
        out.push(parse_label_term(t)?);
    }
    Ok(out)
}

fn parse_label_term(t: &str) -> Result<LabelReq, String> {
    if let Some(rest) = t.strip_prefix('!') {
        return Ok(LabelReq::NotExists(label_key(rest)?));
    }
    if let Some(open) = t.find('(') {
        let inner = t[open + 1..]
            .strip_suffix(')')
            .ok_or_else(|| format!("found {t:?}, expected: ')'"))?;
        let head = t[..open].trim();
        let (key, op) = head
            .rsplit_once(char::is_whitespace)
            .ok_or_else(|| format!("found {t:?}, expected: in, notin"))?;
        let values = inner
            .split(',')
            .map(label_value)
            .collect::<Result<Vec<_>, _>>()?;
        if inner.trim().is_empty() {
            return Err("for 'in', 'notin' operators, values set can't be empty".into());
        }
        let key = label_key(key)?;
        return match op {
            "in" => Ok(LabelReq::In(key, values)),
            "notin" => Ok(LabelReq::NotIn(key, values)),
            other => Err(format!("found {other:?}, expected: in, notin")),
        };
    }
    for op in ["!=", "==", "=", ">", "<"] {
        if let Some((k, v)) = t.split_once(op) {
            let k = label_key(k)?;
            return match op {
                "!=" => Ok(LabelReq::NotEq(k, label_value(v)?)),
                "==" | "=" => Ok(LabelReq::Eq(k, label_value(v)?)),
                _ => {
                    let n = v.trim().parse::<i64>().map_err(|_| {
                        format!("for 'Gt', 'Lt' operators, the value must be an integer: {v:?}")
                    })?;
                    Ok(if op == ">" {
                        LabelReq::Gt(k, n)
                    } else {
                        LabelReq::Lt(k, n)
                    })
                }
            };
        }
    }
    Ok(LabelReq::Exists(label_key(t)?))
}

fn parse_fields(def: &ResourceDef, s: &str) -> Result<Vec<FieldReq>, String> {
    let mut out = Vec::new();
    if s.trim().is_empty() {
        return Ok(out);
    }
    for term in s.split(',') {
        let t = term.trim();
        let (path, value, negate) = if let Some((p, v)) = t.split_once("!=") {
            (p, v, true)
        } else if let Some((p, v)) = t.split_once("==") {
            (p, v, false)
        } else if let Some((p, v)) = t.split_once('=') {
            (p, v, false)
        } else {
            return Err(format!("invalid selector: '{s}'; can't understand '{t}'"));
        };
        let path = path.trim();
        let known = matches!(path, "metadata.name" | "metadata.namespace")
            || (!def.crd && def.fields.contains(&path));
        if !known {
            return Err(if def.crd {
                format!(
                    "\"{path}\" is not a known field selector: only \"metadata.name\", \"metadata.namespace\""
                )
            } else {
                format!("field label not supported: {path}")
            });
        }
        out.push(FieldReq {
            path: path.to_string(),
            value: value.trim().to_string(),
            negate,
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------
// HTTP

type Resp = Response<UnsyncBoxBody<Bytes, Infallible>>;

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut stop => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else {
                    // Out of file descriptors or similar: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let shared = shared.clone();
                conns.spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let shared = shared.clone();
                        async move { Ok::<_, Infallible>(handle(shared, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        }
    }
    drop(listener);
    conns.shutdown().await;
}

fn json_resp(code: u16, body: impl Into<Bytes>) -> Resp {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn value_resp(code: u16, v: &Value) -> Resp {
    json_resp(code, serde_json::to_vec(v).unwrap())
}

/// A `Status` response. `Retry-After` accompanies 429 and 503 (1 s) and any Status whose
/// details carry `retryAfterSeconds`, as on the real server; note that kube-rs clients retry
/// 429, 503 and 504 by default (`Config::default_retry`) and honour `Retry-After`.
fn error_resp(e: &ApiError) -> Resp {
    let mut r = value_resp(e.code, &e.to_json());
    let after = e
        .details
        .as_ref()
        .and_then(|d| d["retryAfterSeconds"].as_u64())
        .or_else(|| matches!(e.code, 429 | 503).then_some(1));
    if let Some(secs) = after {
        r.headers_mut().insert(header::RETRY_AFTER, secs.into());
    }
    r
}

/// Query parameters in order, percent-decoded (`+` is a space).
fn parse_query(q: &str) -> Vec<(String, String)> {
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = b
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok());
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// What a path names.
enum Route {
    Version,
    CoreVersions,
    Groups,
    Group(String),
    ResourceList(String, String),
    Object(Target),
    Unknown { group: String, resource: String },
}

struct Target {
    res: usize,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
    /// The path had a `/watch/` segment.
    watch_path: bool,
}

fn known_group_version(group: &str, version: &str) -> bool {
    RESOURCES
        .iter()
        .any(|d| d.group == group && d.version == version)
}

fn parse_route(path: &str) -> Route {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let unknown = |group: &str, resource: &str| Route::Unknown {
        group: group.to_string(),
        resource: resource.to_string(),
    };
    match segs.as_slice() {
        ["version"] => Route::Version,
        ["api"] => Route::CoreVersions,
        ["apis"] => Route::Groups,
        ["apis", g] if RESOURCES.iter().any(|d| d.group == *g) => Route::Group(g.to_string()),
        ["api", v, rest @ ..] => route_in("", v, rest),
        ["apis", g, v, rest @ ..] => route_in(g, v, rest),
        _ => unknown("", ""),
    }
}

fn route_in(group: &str, version: &str, rest: &[&str]) -> Route {
    let unknown = |resource: &str| Route::Unknown {
        group: group.to_string(),
        resource: resource.to_string(),
    };
    if !known_group_version(group, version) {
        return unknown(rest.first().copied().unwrap_or_default());
    }
    if rest.is_empty() {
        return Route::ResourceList(group.to_string(), version.to_string());
    }
    let (watch_path, rest) = match rest {
        ["watch", tail @ ..] => (true, tail),
        _ => (false, rest),
    };
    let target = |res: usize, ns: Option<&str>, tail: &[&str]| {
        Route::Object(Target {
            res,
            namespace: ns.map(str::to_string),
            name: tail.first().map(|s| s.to_string()),
            sub: tail.get(1).map(|s| s.to_string()),
            watch_path,
        })
    };
    if let ["namespaces", ns, res, tail @ ..] = rest {
        // `namespaces/{ns}/{x}` is a namespaced collection (the fake serves no namespace
        // subresources such as `namespaces/{ns}/status`).
        return match find_resource(group, version, res) {
            Some(r) if RESOURCES[r].namespaced && tail.len() <= 2 => target(r, Some(ns), tail),
            _ => unknown(res),
        };
    }
    let [res, tail @ ..] = rest else {
        return unknown("");
    };
    let Some(r) = find_resource(group, version, res) else {
        return unknown(res);
    };
    if tail.len() > 2 || (RESOURCES[r].namespaced && !tail.is_empty()) {
        return unknown(res);
    }
    target(r, None, tail)
}

fn rbac_verb(method: &Method, has_name: bool, watch: bool) -> String {
    match *method {
        Method::GET if watch => "watch",
        Method::GET if has_name => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if has_name => "delete",
        Method::DELETE => "deletecollection",
        _ => return method.as_str().to_ascii_lowercase(),
    }
    .to_string()
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or_default().to_string();
    let query = parse_query(&raw_query);
    let header = |name: header::HeaderName| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let content_type = header(header::CONTENT_TYPE);
    let user_agent = header(header::USER_AGENT);
    let accept = header(header::ACCEPT).unwrap_or_default();
    let route = parse_route(&path);
    let watch_param = matches!(param(&query, "watch"), Some("true" | "1"));

    let mut rec = Recorded {
        verb: String::new(),
        group: String::new(),
        resource: String::new(),
        subresource: None,
        namespace: None,
        name: None,
        field_manager: param(&query, "fieldManager").map(str::to_string),
        content_type: content_type.clone(),
        user_agent: user_agent.clone(),
        query: raw_query.clone(),
    };
    let discovery = !matches!(route, Route::Object(_) | Route::Unknown { .. });
    match &route {
        Route::Object(t) => {
            let d = &RESOURCES[t.res];
            rec.verb = rbac_verb(&method, t.name.is_some(), watch_param || t.watch_path);
            rec.group = d.group.to_string();
            rec.resource = d.resource.to_string();
            rec.subresource = t.sub.clone();
            rec.namespace = t.namespace.clone();
            rec.name = t.name.clone();
        }
        Route::Unknown { group, resource } => {
            rec.verb = rbac_verb(&method, false, watch_param);
            rec.group = group.clone();
            rec.resource = resource.clone();
        }
        Route::Group(g) | Route::ResourceList(g, _) => {
            rec.verb = "get".into();
            rec.group = g.clone();
        }
        _ => rec.verb = "get".into(),
    }
    let failure = {
        let mut st = shared.lock();
        if st.log.len() >= LOG_CAP {
            st.log.pop_front();
        }
        st.log.push_back(rec);
        if !discovery && st.fail_left > 0 {
            st.fail_left -= 1;
            Some(st.fail_code)
        } else {
            None
        }
    };
    if let Some(code) = failure {
        let e = ApiError::new(
            code,
            reason_for(code),
            format!(
                "injected failure (FakeKube::fail_next): {}",
                reason_for(code)
            ),
        );
        return error_resp(&e);
    }
    let aggregated = accept.contains("as=APIGroupDiscoveryList");
    let t = match route {
        Route::Version => return value_resp(200, &version_info()),
        Route::CoreVersions if aggregated => return aggregated_resp(true),
        Route::CoreVersions => {
            return value_resp(
                200,
                &json!({
                    "kind": "APIVersions",
                    "versions": ["v1"],
                    "serverAddressByClientCIDRs": [
                        {"clientCIDR": "0.0.0.0/0", "serverAddress": shared.addr.to_string()}
                    ],
                }),
            );
        }
        Route::Groups if aggregated => return aggregated_resp(false),
        Route::Groups => return value_resp(200, &group_list()),
        Route::Group(g) => return value_resp(200, &api_group(&g)),
        Route::ResourceList(g, v) => return value_resp(200, &resource_list(&g, &v)),
        Route::Unknown { .. } => return error_resp(&no_such_resource()),
        Route::Object(t) => t,
    };
    let def = &RESOURCES[t.res];
    if let Some(sub) = &t.sub
        && !(sub == "status" && def.status)
    {
        return error_resp(&no_such_resource());
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            let e = if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    413,
                    "RequestEntityTooLarge",
                    "Request entity too large: limit is 3145728",
                )
            } else {
                bad_request(format!("cannot read the request body: {e}"))
            };
            return error_resp(&e);
        }
    };
    let req = Req {
        t,
        query,
        content_type: content_type.unwrap_or_default(),
        user_agent,
        body,
    };
    match dispatch(&shared, &method, req, watch_param) {
        Ok(r) => r,
        Err(e) => error_resp(&e),
    }
}

struct Req {
    t: Target,
    query: Vec<(String, String)>,
    content_type: String,
    user_agent: Option<String>,
    body: Bytes,
}

impl Req {
    fn param(&self, name: &str) -> Option<&str> {
        param(&self.query, name)
    }

    fn dry_run(&self) -> bool {
        self.param("dryRun").is_some_and(|v| v == "All")
    }

    /// The field manager: `fieldManager`, else the user agent up to its first `/`, as the
    /// real server derives it.
    fn manager(&self) -> Option<String> {
        match self.param("fieldManager") {
            Some(m) if !m.is_empty() => Some(m.to_string()),
            _ => self
                .user_agent
                .as_deref()
                .map(|ua| {
                    ua.split('/')
                        .next()
                        .unwrap_or(ua)
                        .chars()
                        .take(128)
                        .collect()
                })
                .filter(|m: &String| !m.is_empty()),
        }
    }

    fn media_type(&self) -> String {
        self.content_type
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_ascii_lowercase()
    }

    fn key(&self) -> Key {
        let ns = if RESOURCES[self.t.res].namespaced {
            self.t.namespace.clone().unwrap_or_default()
        } else {
            String::new()
        };
        (ns, self.t.name.clone().unwrap_or_default())
    }

    fn ctx(&self, operation: &'static str) -> Ctx {
        Ctx {
            manager: self.manager(),
            operation,
            sub: self.t.sub.clone(),
            dry_run: self.dry_run(),
            admin: false,
        }
    }

    /// A create or update body: JSON, or YAML when the content type says so.
    fn object_body(&self) -> Result<Value, ApiError> {
        let mt = self.media_type();
        if mt.contains("protobuf") || mt.contains("cbor") {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json, application/yaml (got {mt})"
                ),
            ));
        }
        if mt.contains("yaml") {
            serde_norway::from_slice::<Value>(&self.body).map_err(|e| {
                bad_request(format!("couldn't get version/kind; yaml parse error: {e}"))
            })
        } else {
            serde_json::from_slice::<Value>(&self.body).map_err(|e| {
                bad_request(format!("couldn't get version/kind; json parse error: {e}"))
            })
        }
    }
}

fn dispatch(
    shared: &Arc<Shared>,
    method: &Method,
    req: Req,
    watch_param: bool,
) -> Result<Resp, ApiError> {
    let r = req.t.res;
    let def = &RESOURCES[r];
    let has_name = req.t.name.is_some();
    let is_sub = req.t.sub.is_some();
    match *method {
        Method::GET if watch_param || req.t.watch_path => {
            if is_sub {
                return Err(method_not_allowed());
            }
            watch(shared, &req)
        }
        Method::GET if has_name => {
            let st = shared.lock();
            let o = st.objects[r]
                .get(&req.key())
                .cloned()
                .ok_or_else(|| not_found(def, &req.key().1))?;
            Ok(json_resp(200, o.json.clone()))
        }
        Method::GET => list(shared, &req).map(|b| json_resp(200, b)),
        Method::POST if !has_name && !is_sub => {
            if def.namespaced && req.t.namespace.is_none() {
                return Err(method_not_allowed());
            }
            let body = req.object_body()?;
            let fields = field_set(&body, def, &req.ctx("Update"));
            let ctx = req.ctx("Update");
            let o = shared.write(|st| {
                st.create_obj(r, req.t.namespace.as_deref(), body, &ctx, Some(fields))
            })?;
            Ok(json_resp(201, o.json.clone()))
        }
        Method::PUT if has_name => {
            let body = req.object_body()?;
            let ctx = req.ctx("Update");
            let fields = field_set(&body, def, &ctx);
            let key = req.key();
            let o = shared.write(|st| -> Result<Arc<Obj>, ApiError> {
                let old = st.objects[r]
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| not_found(def, &key.1))?;
                check_type(def, &body)?;
                if let Some(n) = body["metadata"]["name"].as_str()
                    && n != key.1
                {
                    return Err(bad_request(format!(
                        "the name of the object ({n}) does not match the name on the URL ({})",
                        key.1
                    )));
                }
                if def.namespaced
                    && let Some(n) = body["metadata"]["namespace"].as_str()
                    && !n.is_empty()
                    && n != key.0
                {
                    return Err(bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                check_precondition(def, &old, &body)?;
                st.finish_update(r, &old, body, &ctx, Some(fields))
            })?;
            Ok(json_resp(200, o.json.clone()))
        }
        Method::PATCH if has_name => patch(shared, &req),
        Method::DELETE if has_name && !is_sub => {
            let options = if req.body.iter().all(u8::is_ascii_whitespace) {
                None
            } else {
                Some(
                    serde_json::from_slice::<Value>(&req.body)
                        .map_err(|e| bad_request(format!("invalid DeleteOptions: {e}")))?,
                )
            };
            let key = req.key();
            let dry_run = req.dry_run();
            let o = shared.write(|st| st.delete_obj(r, &key, options.as_ref(), dry_run))?;
            Ok(json_resp(200, o.json.clone()))
        }
        Method::DELETE if !has_name && !is_sub => {
            let sel = Selector::parse(def, req.param("labelSelector"), req.param("fieldSelector"))?;
            let ns = req.t.namespace.clone();
            let dry_run = req.dry_run();
            shared.write(|st| {
                let keys: Vec<Key> = st.objects[r]
                    .iter()
                    .filter(|(k, o)| ns.as_ref().is_none_or(|n| &k.0 == n) && sel.matches(&o.value))
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in keys {
                    let _ = st.delete_obj(r, &k, None, dry_run);
                }
            });
            Ok(value_resp(
                200,
                &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}),
            ))
        }
        _ => Err(method_not_allowed()),
    }
}

/// `metadata.resourceVersion` in a write's body (or a patched result) is a precondition.
fn check_precondition(def: &ResourceDef, old: &Obj, body: &Value) -> Result<(), ApiError> {
    if let Some(want) = body["metadata"]["resourceVersion"].as_str()
        && !want.is_empty()
        && Some(want) != old.value["metadata"]["resourceVersion"].as_str()
    {
        let name = old.value["metadata"]["name"].as_str().unwrap_or_default();
        return Err(conflict(def, name, MODIFIED));
    }
    Ok(())
}

fn patch(shared: &Arc<Shared>, req: &Req) -> Result<Resp, ApiError> {
    let r = req.t.res;
    let def = &RESOURCES[r];
    let key = req.key();
    let mt = req.media_type();
    enum Kind {
        Merge(Value),
        Json(Vec<Value>),
        Apply(Value),
    }
    let parse_json = |what: &str| {
        serde_json::from_slice::<Value>(&req.body)
            .map_err(|e| bad_request(format!("error decoding {what} patch: {e}")))
    };
    let kind = match mt.as_str() {
        "application/merge-patch+json" => Kind::Merge(parse_json("merge")?),
        "application/strategic-merge-patch+json" if def.crd => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml",
            ));
        }
        "application/strategic-merge-patch+json" => Kind::Merge(parse_json("strategic merge")?),
        "application/json-patch+json" => match parse_json("JSON")? {
            Value::Array(ops) => Kind::Json(ops),
            _ => return Err(bad_request("a JSON patch must be a list of operations")),
        },
        "application/apply-patch+yaml" => {
            if req.param("fieldManager").is_none_or(str::is_empty) {
                return Err(bad_request(
                    "PATCH requests for apply must set fieldManager: fieldManager is required for apply requests",
                ));
            }
            let v = serde_json::from_slice::<Value>(&req.body)
                .or_else(|_| serde_norway::from_slice::<Value>(&req.body))
                .map_err(|e| bad_request(format!("error decoding YAML: {e}")))?;
            if !v.is_object() {
                return Err(bad_request("an apply patch must be an object"));
            }
            if v["apiVersion"].as_str().is_none_or(str::is_empty)
                || v["kind"].as_str().is_none_or(str::is_empty)
            {
                return Err(bad_request(
                    "invalid object type: apiVersion and kind must be set in an apply patch",
                ));
            }
            check_type(def, &v)?;
            if let Some(n) = v["metadata"]["name"].as_str()
                && n != key.1
            {
                return Err(bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({})",
                    key.1
                )));
            }
            Kind::Apply(v)
        }
        _ => {
            return Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml, application/strategic-merge-patch+json (got {mt:?})"
                ),
            ));
        }
    };
    let (operation, fields) = match &kind {
        Kind::Apply(v) => ("Apply", field_set(v, def, &req.ctx("Apply"))),
        Kind::Merge(v) => ("Update", field_set(v, def, &req.ctx("Update"))),
        Kind::Json(_) => ("Update", json!({})),
    };
    let ctx = req.ctx(operation);
    let (code, o) = shared.write(|st| -> Result<(u16, Arc<Obj>), ApiError> {
        let Some(old) = st.objects[r].get(&key).cloned() else {
            return match kind {
                Kind::Apply(mut v) if !ctx.status_only() => {
                    if let Some(m) = v["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                    }
                    if v["metadata"]["name"].is_null() {
                        v["metadata"]["name"] = json!(key.1);
                    }
                    let ns = def.namespaced.then_some(key.0.as_str());
                    st.create_obj(r, ns, v, &ctx, Some(fields))
                        .map(|o| (201, o))
                }
                _ => Err(not_found(def, &key.1)),
            };
        };
        let mut doc = old.value.clone();
        let precondition = match &kind {
            Kind::Merge(p) | Kind::Apply(p) => {
                merge_patch(&mut doc, p);
                p.clone()
            }
            Kind::Json(ops) => {
                json_patch(&mut doc, ops)
                    .map_err(|e| ApiError::new(422, "Invalid", e).about(def, &key.1))?;
                doc.clone()
            }
        };
        check_precondition(def, &old, &precondition)?;
        st.finish_update(r, &old, doc, &ctx, Some(fields))
            .map(|o| (200, o))
    })?;
    Ok(json_resp(code, o.json.clone()))
}

/// A `continue` token: hex of `{"rv":N,"ns":..,"name":..}`.
fn encode_continue(rv: u64, key: &Key) -> String {
    let raw = serde_json::to_vec(&json!({"rv": rv, "ns": key.0, "name": key.1})).unwrap();
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_continue(tok: &str) -> Option<(u64, Key)> {
    if !tok.len().is_multiple_of(2) {
        return None;
    }
    let raw = (0..tok.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(tok.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()?;
    let v: Value = serde_json::from_slice(&raw).ok()?;
    Some((
        v["rv"].as_u64()?,
        (
            v["ns"].as_str()?.to_string(),
            v["name"].as_str()?.to_string(),
        ),
    ))
}

fn parse_rv(s: &str) -> Result<u64, ApiError> {
    s.parse::<u64>()
        .map_err(|_| bad_request(format!("invalid resource version: {s:?}")))
}

fn list(shared: &Arc<Shared>, req: &Req) -> Result<Bytes, ApiError> {
    let r = req.t.res;
    let def = &RESOURCES[r];
    let sel = Selector::parse(def, req.param("labelSelector"), req.param("fieldSelector"))?;
    let limit = match req.param("limit") {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<u64>()
                .map_err(|_| bad_request(format!("invalid limit: {s:?}")))?,
        )
        .filter(|l| *l > 0),
    };
    let ns = req.t.namespace.as_deref();
    let (at, snap) = {
        let st = shared.lock();
        let (at, after) = match req.param("continue").filter(|c| !c.is_empty()) {
            Some(tok) => {
                let (rv, key) = decode_continue(tok)
                    .ok_or_else(|| bad_request("continue key is not valid: malformed token"))?;
                if rv < st.floor {
                    return Err(expired(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter, or use the continue token in this response to retrieve the remainder of the results. Continuing with the provided token results in an inconsistent list - objects that were created, modified, or deleted between the time the first chunk was returned and now may show up in the list.",
                    ));
                }
                (rv, Some(key))
            }
            None => match req.param("resourceVersion") {
                None | Some("") | Some("0") => (st.rv, None),
                Some(s) => {
                    let rv = parse_rv(s)?;
                    if rv > st.rv {
                        return Err(too_large(rv, st.rv));
                    }
                    let exact = match req.param("resourceVersionMatch") {
                        Some("Exact") => true,
                        Some("NotOlderThan") => false,
                        None | Some("") => limit.is_some(),
                        Some(other) => {
                            return Err(bad_request(format!(
                                "resourceVersionMatch: Unsupported value: {other:?}: supported values: \"Exact\", \"NotOlderThan\""
                            )));
                        }
                    };
                    if !exact {
                        (st.rv, None)
                    } else if rv < st.floor {
                        return Err(expired(too_old(rv, st.floor)));
                    } else {
                        (rv, None)
                    }
                }
            },
        };
        (at, st.snapshot(r, at, ns, after.as_ref()))
    };
    let mut items: Vec<Arc<Obj>> = Vec::new();
    let mut last: Option<Key> = None;
    let mut remaining = 0u64;
    for (k, o) in snap {
        if !sel.matches(&o.value) {
            continue;
        }
        if limit.is_some_and(|l| items.len() as u64 >= l) {
            remaining += 1;
            continue;
        }
        last = Some(k);
        items.push(o);
    }
    let mut meta = json!({"resourceVersion": at.to_string()});
    if remaining > 0
        && let Some(k) = &last
    {
        meta["continue"] = json!(encode_continue(at, k));
        if sel.is_empty() {
            meta["remainingItemCount"] = json!(remaining);
        }
    }
    let head = json!({
        "apiVersion": def.api_version(),
        "kind": format!("{}List", def.kind),
        "metadata": meta,
    });
    let mut out = serde_json::to_vec(&head).unwrap();
    out.pop(); // the closing brace
    out.extend_from_slice(b",\"items\":[");
    for (i, o) in items.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(&o.json);
    }
    out.extend_from_slice(b"]}");
    Ok(out.into())
}

// ---------------------------------------------------------------------------------------
// Watch

/// Counts one open watch for as long as it lives.
struct WatchGuard(Arc<Shared>);

impl WatchGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.open_watches.fetch_add(1, Ordering::SeqCst);
        WatchGuard(shared)
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.0.open_watches.fetch_sub(1, Ordering::SeqCst);
    }
}

struct WatchStream {
    shared: Arc<Shared>,
    res: usize,
    ns: Option<String>,
    sel: Selector,
    /// Every event up to this version has been considered.
    cursor: u64,
    rx: watch::Receiver<u64>,
    compact_epoch: u64,
    close_epoch: u64,
    bookmarks: bool,
    next_bookmark: Instant,
    deadline: Instant,
    /// Synthetic ADDED events still to send.
    initial: VecDeque<Arc<Obj>>,
    /// Send the `k8s.io/initial-events-end` bookmark after the initial events.
    initial_end: bool,
    /// Send this (a 410 ERROR) and end.
    error: Option<Bytes>,
    done: bool,
    _guard: WatchGuard,
}

fn push_event(buf: &mut Vec<u8>, etype: &str, obj: &[u8]) {
    buf.extend_from_slice(b"{\"type\":\"");
    buf.extend_from_slice(etype.as_bytes());
    buf.extend_from_slice(b"\",\"object\":");
    buf.extend_from_slice(obj);
    buf.extend_from_slice(b"}\n");
}

fn error_event(e: &ApiError) -> Bytes {
    let mut buf = Vec::new();
    push_event(
        &mut buf,
        "ERROR",
        &serde_json::to_vec(&e.to_json()).unwrap(),
    );
    buf.into()
}

impl WatchStream {
    fn bookmark(&self, buf: &mut Vec<u8>, initial_end: bool) {
        let def = &RESOURCES[self.res];
        let mut meta = json!({"resourceVersion": self.cursor.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        let obj = json!({"kind": def.kind, "apiVersion": def.api_version(), "metadata": meta});
        push_event(buf, "BOOKMARK", &serde_json::to_vec(&obj).unwrap());
    }

    /// The next chunk of the stream; None ends it. Every wait is bounded by the deadline.
    async fn next_frame(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        if let Some(e) = self.error.take() {
            self.done = true;
            return Some(e);
        }
        if !self.initial.is_empty() {
            let mut buf = Vec::new();
            for _ in 0..WATCH_CHUNK {
                let Some(o) = self.initial.pop_front() else {
                    break;
                };
                push_event(&mut buf, "ADDED", &o.json);
            }
            if self.initial.is_empty() && self.initial_end {
                self.initial_end = false;
                self.bookmark(&mut buf, true);
            }
            return Some(buf.into());
        }
        if std::mem::take(&mut self.initial_end) {
            let mut buf = Vec::new();
            self.bookmark(&mut buf, true);
            return Some(buf.into());
        }
        loop {
            self.rx.borrow_and_update();
            let mut buf = Vec::new();
            {
                let st = self.shared.lock();
                if st.compact_epoch != self.compact_epoch || self.cursor < st.floor {
                    self.done = true;
                    return Some(error_event(&expired(too_old(self.cursor, st.floor))));
                }
                if st.close_epoch != self.close_epoch {
                    self.done = true;
                    return None;
                }
                if st.rv > self.cursor {
                    let start = st.history.partition_point(|e| e.rv <= self.cursor);
                    for e in st.history.range(start..) {
                        if e.res == self.res
                            && self.ns.as_ref().is_none_or(|n| &e.key.0 == n)
                            && self.sel.matches(&e.obj.value)
                        {
                            push_event(&mut buf, e.etype.as_str(), &e.obj.json);
                        }
                    }
                    self.cursor = st.rv;
                }
            }
            let now = Instant::now();
            if self.bookmarks && now >= self.next_bookmark {
                self.bookmark(&mut buf, false);
                self.next_bookmark = now + BOOKMARK_INTERVAL;
            }
            if !buf.is_empty() {
                return Some(buf.into());
            }
            if now >= self.deadline {
                self.done = true;
                return None;
            }
            let wake = if self.bookmarks {
                self.deadline.min(self.next_bookmark)
            } else {
                self.deadline
            };
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() {
                        self.done = true;
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(wake)) => {}
            }
        }
    }
}

fn watch(shared: &Arc<Shared>, req: &Req) -> Result<Resp, ApiError> {
    let r = req.t.res;
    let def = &RESOURCES[r];
    let mut fields = req.param("fieldSelector").unwrap_or_default().to_string();
    if let Some(name) = &req.t.name {
        // A watch on an object's own path is a watch filtered by its name.
        if !fields.is_empty() {
            fields.push(',');
        }
        fields.push_str(&format!("metadata.name={name}"));
    }
    let sel = Selector::parse(def, req.param("labelSelector"), Some(&fields))?;
    let timeout = match req.param("timeoutSeconds") {
        None | Some("") => MAX_WATCH_TIMEOUT,
        Some(s) => Duration::from_secs(
            s.parse::<u64>()
                .map_err(|_| bad_request(format!("invalid timeoutSeconds: {s:?}")))?,
        )
        .min(MAX_WATCH_TIMEOUT),
    };
    let bookmarks = matches!(req.param("allowWatchBookmarks"), Some("true" | "1"));
    let send_initial = matches!(req.param("sendInitialEvents"), Some("true" | "1"));
    let rv = match req.param("resourceVersion") {
        None | Some("") | Some("0") => None,
        Some(s) => Some(parse_rv(s)?),
    };
    let ns = if def.namespaced {
        req.t.namespace.clone()
    } else {
        None
    };
    let rx = shared.changed.subscribe();
    let now = Instant::now();
    let mut ws = {
        let st = shared.lock();
        let mut ws = WatchStream {
            shared: shared.clone(),
            res: r,
            ns: ns.clone(),
            sel,
            cursor: st.rv,
            rx,
            compact_epoch: st.compact_epoch,
            close_epoch: st.close_epoch,
            bookmarks,
            next_bookmark: now + BOOKMARK_INTERVAL,
            deadline: now + timeout,
            initial: VecDeque::new(),
            initial_end: false,
            error: None,
            done: false,
            _guard: WatchGuard::new(shared.clone()),
        };
        match rv {
            Some(rv) if rv < st.floor => {
                // The real server answers 200 and a single ERROR event, then closes.
                ws.error = Some(error_event(&expired(too_old(rv, st.floor))));
            }
            Some(rv) if !send_initial => ws.cursor = rv,
            _ => {
                ws.initial = st
                    .snapshot(r, st.rv, ns.as_deref(), None)
                    .into_iter()
                    .map(|(_, o)| o)
                    .filter(|o| ws.sel.matches(&o.value))
                    .collect();
                ws.initial_end = send_initial && bookmarks;
            }
        }
        ws
    };
    ws.rx.borrow_and_update();
    let stream = futures::stream::unfold(ws, |mut ws| async move {
        let b = ws.next_frame().await?;
        Some((Ok::<_, Infallible>(Frame::data(b)), ws))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed_unsync());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache, private"),
    );
    Ok(resp)
}

// ---------------------------------------------------------------------------------------
// Discovery

fn version_info() -> Value {
    json!({
        "major": "1",
        "minor": "34",
        "emulationMajor": "1",
        "emulationMinor": "34",
        "minCompatibilityMajor": "1",
        "minCompatibilityMinor": "33",
        "gitVersion": GIT_VERSION,
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-08-27T00:00:00Z",
        "goVersion": "go1.24.6",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

/// `(group, version)` pairs in table order, without duplicates, core excluded.
fn group_versions() -> Vec<(&'static str, &'static str)> {
    let mut out: Vec<(&str, &str)> = Vec::new();
    for d in RESOURCES {
        if !d.group.is_empty() && !out.contains(&(d.group, d.version)) {
            out.push((d.group, d.version));
        }
    }
    out
}

fn api_group(g: &str) -> Value {
    let versions: Vec<Value> = group_versions()
        .into_iter()
        .filter(|(gg, _)| *gg == g)
        .map(|(g, v)| json!({"groupVersion": format!("{g}/{v}"), "version": v}))
        .collect();
    json!({
        "kind": "APIGroup",
        "apiVersion": "v1",
        "name": g,
        "versions": versions,
        "preferredVersion": versions.first().cloned().unwrap_or_else(|| json!({})),
    })
}

fn group_list() -> Value {
    let mut groups: Vec<&str> = Vec::new();
    for (g, _) in group_versions() {
        if !groups.contains(&g) {
            groups.push(g);
        }
    }
    let groups: Vec<Value> = groups.into_iter().map(api_group).collect();
    json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups})
}

fn resource_list(g: &str, v: &str) -> Value {
    let mut resources = Vec::new();
    for d in RESOURCES.iter().filter(|d| d.group == g && d.version == v) {
        let mut e = json!({
            "name": d.resource,
            "singularName": d.singular,
            "namespaced": d.namespaced,
            "kind": d.kind,
            "verbs": VERBS,
        });
        if !d.short_names.is_empty() {
            e["shortNames"] = json!(d.short_names);
        }
        resources.push(e);
        if d.status {
            resources.push(json!({
                "name": format!("{}/status", d.resource),
                "singularName": "",
                "namespaced": d.namespaced,
                "kind": d.kind,
                "verbs": STATUS_VERBS,
            }));
        }
    }
    let gv = if g.is_empty() {
        v.to_string()
    } else {
        format!("{g}/{v}")
    };
    json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": resources})
}

/// Aggregated discovery (`apidiscovery.k8s.io/v2`), for `/api` (core) or `/apis`.
fn aggregated_resp(core: bool) -> Response<UnsyncBoxBody<Bytes, Infallible>> {
    let gvs: Vec<(&str, &str)> = if core {
        vec![("", "v1")]
    } else {
        group_versions()
    };
    let mut items: Vec<(String, Vec<Value>)> = Vec::new();
    for (g, v) in gvs {
        let resources: Vec<Value> = RESOURCES
            .iter()
            .filter(|d| d.group == g && d.version == v)
            .map(|d| {
                let kind = json!({"group": d.group, "version": d.version, "kind": d.kind});
                let mut e = json!({
                    "resource": d.resource,
                    "responseKind": kind,
                    "scope": if d.namespaced { "Namespaced" } else { "Cluster" },
                    "singularResource": d.singular,
                    "verbs": VERBS,
                });
                if !d.short_names.is_empty() {
                    e["shortNames"] = json!(d.short_names);
                }
                if d.status {
                    e["subresources"] = json!([{
                        "subresource": "status",
                        "responseKind": kind,
                        "verbs": STATUS_VERBS,
                    }]);
                }
                e
            })
            .collect();
        let version = json!({"version": v, "resources": resources, "freshness": "Current"});
        match items.iter_mut().find(|(name, _)| name == g) {
            Some((_, versions)) => versions.push(version),
            None => items.push((g.to_string(), vec![version])),
        }
    }
    let items: Vec<Value> = items
        .into_iter()
        .map(|(name, versions)| json!({"metadata": {"name": name}, "versions": versions}))
        .collect();
    let body = json!({
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    });
    let mut r = value_resp(200, &body);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList",
        ),
    );
    r
}

// ---------------------------------------------------------------------------------------
// Time

/// RFC 3339 in UTC with second precision, as Kubernetes writes `metav1.Time`.
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let (days, sod) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        sod / 3600,
        sod % 3600 / 60,
        sod % 60
    )
}

/// Fails the test unless every (verb, resource) meshbridge requested from `kube` is granted
/// by the ClusterRole rules the Helm chart ships (`charts/meshbridge/files/rbac-rules.yaml`).
/// Discovery requests need no grant.
pub fn assert_rbac_covers(kube: &FakeKube) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/charts/meshbridge/files/rbac-rules.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let rules: Value = serde_norway::from_str(&text).unwrap();
    let rules = rules.as_array().unwrap();
    let has = |list: &Value, item: &str| {
        list.as_array()
            .is_some_and(|l| l.iter().any(|v| v == item || v == "*"))
    };
    let mut missing = std::collections::BTreeSet::new();
    for r in kube.requests() {
        if r.resource.is_empty() {
            continue;
        }
        let resource = match &r.subresource {
            Some(s) => format!("{}/{s}", r.resource),
            None => r.resource.clone(),
        };
        let granted = rules.iter().any(|rule| {
            has(&rule["apiGroups"], &r.group)
                && has(&rule["resources"], &resource)
                && has(&rule["verbs"], &r.verb)
        });
        if !granted {
            missing.insert(format!("{} {}/{}", r.verb, r.group, resource));
        }
    }
    assert!(
        missing.is_empty(),
        "the chart's ClusterRole does not grant: {missing:?}"
    );
}
