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
//! - admission webhooks (the chain described below):
//!   <https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/>
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
//! - no authentication or authorization (admission webhooks see every caller as
//!   `system:admin`); the namespaces `default`, `kube-system`, `kube-public` and
//!   `kube-node-lease` exist from the start, creating a
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
//!   and records the manager in `managedFields`; a field the manager applied before and
//!   leaves out of a later apply is removed unless another manager owns it too (lists count
//!   as one field), but there are no conflicts;
//! - pods are deleted at once (as an unscheduled pod is); `propagationPolicy` and owner
//!   references have no effect (no garbage collector);
//! - core `v1` Events and `events.k8s.io/v1` Events are separate stores;
//! - a watch does not send `DELETED` to a watcher whose selector an object stops matching;
//! - bookmarks are sent every [`BOOKMARK_INTERVAL`] (the real server sends them about once a
//!   minute), which makes them observable in tests.
//!
//! Admission webhooks: creates, updates and patches (server-side apply included) made over
//! HTTP go through the chain the API server runs, built from the stored
//! MutatingWebhookConfigurations and ValidatingWebhookConfigurations (test-side
//! [`FakeKube::apply`] and deletions do not). Every webhook of every mutating configuration,
//! in configuration-name order then webhook order, whose `rules` (operations, apiGroups,
//! apiVersions, resources with `*` and `res/sub` forms, scope), `namespaceSelector` (on the
//! namespace's labels, `kubernetes.io/metadata.name` included; on the object's own labels for
//! a Namespace; not applied to other cluster-scoped objects) and `objectSelector` (new or old
//! object) match is POSTed an `admission.k8s.io/v1` AdmissionReview over HTTPS, trusting only
//! `clientConfig.caBundle` when given: at `clientConfig.url`, or at
//! `https://<name>.<namespace>.svc<path>` for `clientConfig.service`, connected to the address
//! [`FakeKube::route_service`] gives (the certificate is still verified for that DNS name).
//! Each call is bounded by `timeoutSeconds` (default 10, at most 30). A JSONPatch a mutating
//! webhook returns is applied before the next webhook; then validating webhooks see the
//! object as it would be stored (name generated, defaults and identity set), one after the
//! other (the real server calls them in parallel). A refusal fails the write with the
//! webhook's `status` code (at least 400) and `admission webhook "<name>" denied the request:
//! <message>`; a failed call (connection, TLS, timeout, non-200, a malformed or mismatched
//! review) is skipped under `failurePolicy: Ignore` and fails the write with a 500 under
//! `Fail` (the default); a patch that does not apply is a 500 whatever the policy. `warnings`
//! reach the client as `Warning: 299 - "<text>"` headers. A dry-run request matching a webhook
//! whose `sideEffects` is not `None`/`NoneOnDryRun` fails with 400 without calling it, as
//! documented. Writes to webhook configurations are not admitted by webhooks (as documented).
//! Calls are recorded ([`FakeKube::admission_calls`]). A write whose object
//! changed while webhooks ran is re-admitted (at most [`ADMISSION_ATTEMPTS`] times, then 409).
//! Not modelled: `reinvocationPolicy` (no webhook is called twice), `matchPolicy` (one
//! version per resource), `matchConditions` (not evaluated: treated as holding), DELETE and
//! CONNECT admission, the built-in admission plugins; configurations are not validated when
//! stored (an unparsable selector fails the matching write with a 500).
//!
//! Token and access reviews: `POST /apis/authentication.k8s.io/v1/tokenreviews` answers
//! from the tokens a test registers ([`FakeKube::add_token`]), and `POST
//! /apis/authorization.k8s.io/v1/subjectaccessreviews` decides non-resource requests from the
//! grants a test registers ([`FakeKube::grant_non_resource`]) with RBAC's matching rules (a
//! user or one of its groups; `nonResourceURLs` entries are exact paths, `*`, or a prefix
//! ending in `*`; verb `*` matches any). Resource attributes are always denied. Semantics:
//! <https://kubernetes.io/docs/reference/kubernetes-api/authentication-resources/token-review-v1/>,
//! <https://kubernetes.io/docs/reference/kubernetes-api/authorization-resources/subject-access-review-v1/>,
//! <https://kubernetes.io/docs/reference/access-authn-authz/rbac/#role-examples>.
//!
//! Discovery requests (`/version`, `/api`, `/apis`, `/api/v1`, `/apis/{g}`, `/apis/{g}/{v}`)
//! are logged with verb `get` and resource `""` and are exempt from [`FakeKube::fail_next`].
//!
//! Everything is bounded: the history, the request log ([`LOG_CAP`] entries), request bodies
//! ([`MAX_BODY`]), watch duration (`timeoutSeconds`, at most [`MAX_WATCH_TIMEOUT`]), and
//! `stop()` ends every connection.
#![allow(clippy::unwrap_used)]

// Included by path rather than shared through `support`, so that the benches that include
// this fake by path get it as well; the test binary thus holds two copies.
#[allow(clippy::duplicate_mod)]
#[path = "query.rs"]
mod query;

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use query::parse_query;
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
/// User-Agent of a test's own API clients (standing for a controller or `kubectl`):
/// [`assert_rbac_covers`] leaves their requests out.
pub const TEST_USER_AGENT: &str = "kube-fake-test-client";
/// Namespaces that exist from the start, as in a fresh cluster.
pub const DEFAULT_NAMESPACES: &[&str] =
    &["default", "kube-system", "kube-public", "kube-node-lease"];
/// Objects per chunk of the synthetic ADDED events that start a watch from "now".
const WATCH_CHUNK: usize = 500;
/// Admission calls kept for [`FakeKube::admission_calls`] (the oldest are dropped).
pub const ADMISSION_LOG_CAP: usize = 10_000;
/// Times a write is admitted again when its object changed while webhooks ran.
pub const ADMISSION_ATTEMPTS: usize = 5;
/// `timeoutSeconds` of a webhook when absent, and its maximum (as on the real server).
pub const WEBHOOK_DEFAULT_TIMEOUT: u64 = 10;
pub const WEBHOOK_MAX_TIMEOUT: u64 = 30;

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
const MUTATING: usize = 9;
const VALIDATING: usize = 10;
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
    /// `route_service`: (namespace, name, port) of a Service → where to connect.
    routes: BTreeMap<(String, String, u16), SocketAddr>,
    admission: VecDeque<AdmissionCall>,
    /// `add_token`: token → (username, groups).
    tokens: BTreeMap<String, (String, Vec<String>)>,
    /// `grant_non_resource`: (user or group, verbs, nonResourceURLs).
    grants: Vec<(String, Vec<String>, Vec<String>)>,
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
        assert_eq!(RESOURCES[MUTATING].kind, "MutatingWebhookConfiguration");
        assert_eq!(RESOURCES[VALIDATING].kind, "ValidatingWebhookConfiguration");
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
                routes: BTreeMap::new(),
                admission: VecDeque::new(),
                tokens: BTreeMap::new(),
                grants: Vec::new(),
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
        self.write_kubeconfig_for(dir, &self.url())
    }

    /// [`write_kubeconfig`](Self::write_kubeconfig) with another `server` URL (a proxy in
    /// front of the fake).
    pub fn write_kubeconfig_for(&self, dir: &Path, server: &str) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
             users:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    \
             cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n\
             preferences: {{}}\n",
            server
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

    /// Where a webhook's `clientConfig.service` (`namespace`, `name`, `port`) is reached, in
    /// place of cluster DNS and kube-proxy: the call connects to `to` and still verifies the
    /// certificate for `<name>.<namespace>.svc`. A Service without a route fails the call
    /// (its `failurePolicy` applies).
    pub fn route_service(&self, namespace: &str, name: &str, port: u16, to: SocketAddr) {
        self.shared
            .lock()
            .routes
            .insert((namespace.to_string(), name.to_string(), port), to);
    }

    /// Makes TokenReviews of `token` authenticate `user` in `groups`.
    pub fn add_token(&self, token: &str, user: &str, groups: &[&str]) {
        let groups = groups.iter().map(|g| g.to_string()).collect();
        self.shared
            .lock()
            .tokens
            .insert(token.to_string(), (user.to_string(), groups));
    }

    /// Lets `subject` (a username or group) use `verbs` on the non-resource `urls`, as a
    /// ClusterRole rule bound to it would.
    pub fn grant_non_resource(&self, subject: &str, verbs: &[&str], urls: &[&str]) {
        let own = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        self.shared
            .lock()
            .grants
            .push((subject.to_string(), own(verbs), own(urls)));
    }

    /// Every admission webhook call so far, oldest first (at most [`ADMISSION_LOG_CAP`]).
    pub fn admission_calls(&self) -> Vec<AdmissionCall> {
        self.shared.lock().admission.iter().cloned().collect()
    }

    /// Empties the admission call log.
    pub fn clear_admission_calls(&self) {
        self.shared.lock().admission.clear();
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
    reason: Cow<'static, str>,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason: Cow::Borrowed(reason),
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

fn already_exists(def: &ResourceDef, name: &str) -> ApiError {
    ApiError::new(
        409,
        "AlreadyExists",
        format!("{} \"{name}\" already exists", def.qualified()),
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
#[derive(Clone)]
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
        format_uid(a, b)
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

    /// The namespace a create goes to: the URL's (which the body may repeat but not
    /// contradict), else the body's, else `default`. It must exist, except for the test side.
    fn create_namespace(
        &self,
        ns_path: Option<&str>,
        in_body: Option<&str>,
        ctx: &Ctx,
    ) -> Result<String, ApiError> {
        let in_body = in_body.filter(|s| !s.is_empty());
        let ns = match (ns_path, in_body) {
            (Some(p), Some(b)) if p != b => return Err(bad_request(NAMESPACE_MISMATCH)),
            (Some(p), _) => p.to_string(),
            (None, Some(b)) => b.to_string(),
            (None, None) => "default".to_string(),
        };
        if !ctx.admin && !self.objects[NAMESPACES].contains_key(&(String::new(), ns.clone())) {
            return Err(not_found(&RESOURCES[NAMESPACES], &ns));
        }
        Ok(ns)
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
            let in_body = meta.get("namespace").and_then(Value::as_str);
            let ns = self.create_namespace(ns_path, in_body, ctx)?;
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
            return Err(already_exists(def, &name));
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
        if r == NAMESPACES {
            let name = old_meta["name"].as_str().unwrap_or_default().to_string();
            namespace_name_label(&mut result, &name);
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
/// The strings of a JSON array (none when it is not an array).
fn string_items(v: &Value) -> impl Iterator<Item = &str> {
    v.as_array().into_iter().flatten().filter_map(Value::as_str)
}

/// The refusal of a body whose namespace contradicts the URL's.
const NAMESPACE_MISMATCH: &str =
    "the namespace of the provided object does not match the namespace sent on the request";

/// Refuses a body naming another object than the URL does.
fn check_name_matches(body: &Value, url_name: &str) -> Result<(), ApiError> {
    match body["metadata"]["name"].as_str() {
        Some(n) if n != url_name => Err(bad_request(format!(
            "the name of the object ({n}) does not match the name on the URL ({url_name})"
        ))),
        _ => Ok(()),
    }
}

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
            namespace_name_label(obj, name);
            obj.entry("spec")
                .or_insert_with(|| json!({"finalizers": ["kubernetes"]}));
            if !obj.get("status").is_some_and(Value::is_object) {
                obj.insert("status".into(), json!({"phase": "Active"}));
            }
        }
        _ => {}
    }
}

/// The label `kubernetes.io/metadata.name` the real server keeps on every Namespace (set on
/// create and on every update, whatever the client sent).
fn namespace_name_label(obj: &mut Map<String, Value>, name: &str) {
    let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    let labels = meta.entry("labels").or_insert_with(|| json!({}));
    if !labels.is_object() {
        *labels = json!({});
    }
    labels["kubernetes.io/metadata.name"] = json!(name);
}

/// A version-4 UUID from two random words.
fn format_uid(a: u64, b: u64) -> String {
    format!(
        "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        0x8000 | ((b >> 48) & 0x3fff),
        b & 0xffff_ffff_ffff
    )
}

/// A fresh UUID without the state's lock (admission request uids).
fn fresh_uid() -> String {
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let word = || {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(SERIAL.fetch_add(1, Ordering::Relaxed));
        h.finish()
    };
    let a = word();
    format_uid(a, word())
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

/// Server-side apply: fields the manager applied before and leaves out now are removed,
/// unless another manager owns them too
/// (<https://kubernetes.io/docs/reference/using-api/server-side-apply/#field-management>).
/// Lists are leaves here, as in [`field_set`].
fn remove_dropped(doc: &mut Value, ctx: &Ctx, applied: &Value) {
    fn dropped(old: &Value, new: &Value, at: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        let Some(old) = old.as_object() else { return };
        for (k, v) in old {
            let Some(name) = k.strip_prefix("f:") else {
                continue;
            };
            at.push(name.to_string());
            match new.get(k) {
                None => out.push(at.clone()),
                Some(n) => dropped(v, n, at, out),
            }
            at.pop();
        }
    }
    fn owns(fields: &Value, path: &[String]) -> bool {
        path.iter()
            .try_fold(fields, |f, p| f.get(format!("f:{p}")))
            .is_some()
    }
    let Some(manager) = &ctx.manager else { return };
    let entries = doc["metadata"]["managedFields"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let mine = |e: &Value| {
        e["manager"] == json!(manager)
            && e["operation"] == "Apply"
            && e.get("subresource").and_then(Value::as_str) == ctx.sub.as_deref()
    };
    let Some(before) = entries.iter().find(|e| mine(e)) else {
        return;
    };
    let mut paths = Vec::new();
    dropped(&before["fieldsV1"], applied, &mut Vec::new(), &mut paths);
    for path in paths {
        if entries
            .iter()
            .any(|e| !mine(e) && owns(&e["fieldsV1"], &path))
        {
            continue;
        }
        let (last, parents) = path.split_last().unwrap();
        if let Some(Value::Object(m)) = parents.iter().try_fold(&mut *doc, |d, p| d.get_mut(p)) {
            m.remove(last);
        }
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
// Admission webhooks

/// One call of an admission webhook, as [`FakeKube::admission_calls`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdmissionCall {
    /// The webhook's `name` (e.g. `inject.meshbridge.io`).
    pub webhook: String,
    /// The `metadata.name` of its configuration.
    pub configuration: String,
    /// From a MutatingWebhookConfiguration (else a ValidatingWebhookConfiguration).
    pub mutating: bool,
    /// `CREATE` or `UPDATE`.
    pub operation: String,
    /// Plural resource, with `/subresource` for a write to one (`pods/status`).
    pub resource: String,
    /// The object's namespace (for a Namespace, its own name; None for other cluster-scoped
    /// objects).
    pub namespace: Option<String>,
    /// The object's name as the webhook saw it: None in mutating calls on a create by
    /// `generateName` (the real server names the object after mutating admission).
    pub name: Option<String>,
    pub dry_run: bool,
    /// Whether the write went on past this webhook (a failed call under `Ignore` did).
    pub allowed: bool,
    /// A mutating webhook's JSONPatch was applied.
    pub patched: bool,
    /// The response's `warnings`.
    pub warnings: Vec<String>,
    /// Why the call failed (connection, TLS, timeout, non-200, malformed or mismatched
    /// review, a patch that does not apply).
    pub error: Option<String>,
}

/// A write as planned under the lock from the request and the stored object, before
/// admission.
struct Plan {
    op: PlanOp,
    ctx: Ctx,
    fields: Option<Value>,
    /// `CreateOptions`, `UpdateOptions` or `PatchOptions` (the review's `options`).
    options: &'static str,
}

enum PlanOp {
    /// Create `body`; `ns_path` is the namespace in the URL, `ns` the resolved namespace
    /// (`""` for a cluster-scoped object).
    Create {
        ns_path: Option<String>,
        ns: String,
        body: Value,
    },
    /// Replace `old` by `body`, the whole new object.
    Update { old: Arc<Obj>, body: Value },
}

impl Plan {
    /// The write as without admission webhooks: at once, in the caller's critical section.
    fn execute(self, st: &mut State, r: usize) -> Result<(u16, Arc<Obj>), ApiError> {
        match self.op {
            PlanOp::Create { ns_path, body, .. } => st
                .create_obj(r, ns_path.as_deref(), body, &self.ctx, self.fields)
                .map(|o| (201, o)),
            PlanOp::Update { old, body } => st
                .finish_update(r, &old, body, &self.ctx, self.fields)
                .map(|o| (200, o)),
        }
    }
}

/// What `create_obj` refuses before anything else (the real server: decoding and the
/// NamespaceLifecycle plugin, both before webhooks). Returns the object's namespace (`""`
/// for a cluster-scoped one).
fn precheck_create(
    st: &State,
    r: usize,
    ns_path: Option<&str>,
    body: &Value,
    ctx: &Ctx,
) -> Result<String, ApiError> {
    let def = &RESOURCES[r];
    check_type(def, body)?;
    let meta = &body["metadata"];
    if !meta.is_null() && !meta.is_object() {
        return Err(bad_request("metadata must be an object"));
    }
    if !def.namespaced {
        return Ok(String::new());
    }
    st.create_namespace(ns_path, meta["namespace"].as_str(), ctx)
}

/// The webhooks and what matching them needs, copied under the lock.
struct Hooks {
    /// (configuration name, webhook), in call order.
    mutating: Vec<(String, Value)>,
    validating: Vec<(String, Value)>,
    /// Labels of the write's namespace (null when cluster-scoped or missing).
    namespace_labels: Value,
    routes: BTreeMap<(String, String, u16), SocketAddr>,
}

impl Hooks {
    fn capture(st: &State, ns: &str) -> Hooks {
        // The map is ordered by (namespace "", name): configuration-name order.
        let collect = |r: usize| -> Vec<(String, Value)> {
            st.objects[r]
                .values()
                .flat_map(|o| {
                    let cfg = o.value["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    o.value["webhooks"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(move |w| (cfg.clone(), w.clone()))
                })
                .collect()
        };
        let namespace_labels = st.objects[NAMESPACES]
            .get(&(String::new(), ns.to_string()))
            .map(|o| o.value["metadata"]["labels"].clone())
            .unwrap_or(Value::Null);
        Hooks {
            mutating: collect(MUTATING),
            validating: collect(VALIDATING),
            namespace_labels,
            routes: st.routes.clone(),
        }
    }
}

/// The attributes of a write under admission.
struct Attrs<'a> {
    r: usize,
    sub: Option<&'a str>,
    operation: &'static str,
    /// `""` for a cluster-scoped object.
    namespace: String,
    dry_run: bool,
    options: Value,
    old: Option<Value>,
}

/// Runs a write through the admission chain (or straight, when no webhook configuration
/// exists) and answers it, webhook warnings in `Warning` headers.
async fn admit_write(
    shared: &Arc<Shared>,
    r: usize,
    sub: Option<&str>,
    plan: impl Fn(&State) -> Result<Plan, ApiError>,
) -> Resp {
    let mut warnings = Vec::new();
    let out = admit(shared, r, sub, plan, &mut warnings).await;
    let mut resp = match out {
        Ok((code, o)) => json_resp(code, o.json.clone()),
        Err(e) => error_resp(&e),
    };
    for w in &warnings {
        if let Ok(v) = header::HeaderValue::from_str(&warning_header(w)) {
            resp.headers_mut().append(header::WARNING, v);
        }
    }
    resp
}

/// `299 - "text"`, as the real server writes a warning (RFC 7234 quoted string).
fn warning_header(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    for c in text.chars() {
        match c {
            '"' | '\\' => {
                quoted.push('\\');
                quoted.push(c);
            }
            c if c.is_control() => quoted.push(' '),
            c => quoted.push(c),
        }
    }
    format!("299 - \"{quoted}\"")
}

async fn admit(
    shared: &Arc<Shared>,
    r: usize,
    sub: Option<&str>,
    plan: impl Fn(&State) -> Result<Plan, ApiError>,
    warnings: &mut Vec<String>,
) -> Result<(u16, Arc<Obj>), ApiError> {
    let def = &RESOURCES[r];
    let mut name = String::new();
    for _ in 0..ADMISSION_ATTEMPTS {
        warnings.clear();
        let step = shared.write(|st| -> Result<Result<_, (Plan, Hooks)>, ApiError> {
            let p = plan(st)?;
            // Webhook configurations themselves are never admitted by webhooks (so a broken
            // webhook cannot lock its own configuration), as on the real server.
            let exempt = r == MUTATING || r == VALIDATING;
            if exempt || (st.objects[MUTATING].is_empty() && st.objects[VALIDATING].is_empty()) {
                return p.execute(st, r).map(Ok);
            }
            let ns = match &p.op {
                PlanOp::Create { ns, .. } => ns.clone(),
                PlanOp::Update { old, .. } => obj_key(def, &old.value).0,
            };
            let hooks = Hooks::capture(st, &ns);
            Ok(Err((p, hooks)))
        })?;
        let (p, hooks) = match step {
            Ok(done) => return Ok(done),
            Err(admission) => admission,
        };
        if let PlanOp::Update { old, .. } = &p.op {
            name = obj_key(def, &old.value).1;
        }
        if let Some(out) = admit_once(shared, r, sub, p, &hooks, warnings).await {
            return out;
        }
    }
    Err(conflict(def, &name, MODIFIED))
}

/// One pass of the chain; None when the stored object changed meanwhile (admit again).
async fn admit_once(
    shared: &Arc<Shared>,
    r: usize,
    sub: Option<&str>,
    plan: Plan,
    hooks: &Hooks,
    warnings: &mut Vec<String>,
) -> Option<Result<(u16, Arc<Obj>), ApiError>> {
    let def = &RESOURCES[r];
    let Plan {
        op,
        ctx,
        fields,
        options,
    } = plan;
    let (operation, namespace, old, mut object) = match &op {
        PlanOp::Create { ns, body, .. } => ("CREATE", ns.clone(), None, body.clone()),
        PlanOp::Update { old, body } => (
            "UPDATE",
            obj_key(def, &old.value).0,
            Some(old.value.clone()),
            body.clone(),
        ),
    };
    if let Some(o) = object.as_object_mut() {
        o.insert("apiVersion".into(), json!(def.api_version()));
        o.insert("kind".into(), json!(def.kind));
        let meta = o.entry("metadata").or_insert_with(|| json!({}));
        if meta.is_null() {
            *meta = json!({});
        }
        if def.namespaced && meta.is_object() {
            meta["namespace"] = json!(namespace);
        }
    }
    let mut options = json!({"apiVersion": "meta.k8s.io/v1", "kind": options});
    if let Some(m) = &ctx.manager {
        options["fieldManager"] = json!(m);
    }
    if ctx.dry_run {
        options["dryRun"] = json!(["All"]);
    }
    let attrs = Attrs {
        r,
        sub,
        operation,
        namespace,
        dry_run: ctx.dry_run,
        options,
        old,
    };
    for (cfg, hook) in &hooks.mutating {
        match run_hook(shared, &attrs, cfg, hook, true, &object, hooks, warnings).await {
            Ok(Some(patched)) => object = patched,
            Ok(None) => {}
            Err(e) => return Some(Err(e)),
        }
    }
    // The object as it would be stored (name generated, identity and defaults set).
    let mut dry = ctx.clone();
    dry.dry_run = true;
    let unchanged = |st: &State, old: &Arc<Obj>| {
        st.objects[r]
            .get(&obj_key(def, &old.value))
            .is_some_and(|cur| Arc::ptr_eq(cur, old))
    };
    let stored = shared.write(|st| match &op {
        PlanOp::Create { ns_path, .. } => {
            Some(st.create_obj(r, ns_path.as_deref(), object.clone(), &dry, fields.clone()))
        }
        PlanOp::Update { old, .. } => unchanged(st, old)
            .then(|| st.finish_update(r, old, object.clone(), &dry, fields.clone())),
    })?;
    let stored = match stored {
        Ok(o) => o,
        Err(e) => return Some(Err(e)),
    };
    for (cfg, hook) in &hooks.validating {
        if let Err(e) = run_hook(
            shared,
            &attrs,
            cfg,
            hook,
            false,
            &stored.value,
            hooks,
            warnings,
        )
        .await
        {
            return Some(Err(e));
        }
    }
    let code = match &op {
        PlanOp::Create { .. } => 201,
        PlanOp::Update { .. } => 200,
    };
    if ctx.dry_run {
        return Some(Ok((code, stored)));
    }
    shared.write(|st| match &op {
        PlanOp::Create { .. } => {
            let key = obj_key(def, &stored.value);
            if def.namespaced
                && !st.objects[NAMESPACES].contains_key(&(String::new(), key.0.clone()))
            {
                return Some(Err(not_found(&RESOURCES[NAMESPACES], &key.0)));
            }
            if st.objects[r].contains_key(&key) {
                return Some(Err(already_exists(def, &key.1)));
            }
            Some(Ok((code, st.commit(r, key, stored.value.clone(), false))))
        }
        PlanOp::Update { old, .. } => {
            if !unchanged(st, old) {
                return None;
            }
            if same_object(&old.value, &stored.value) {
                return Some(Ok((code, old.clone())));
            }
            let finished = stored.value["metadata"].get("deletionTimestamp").is_some()
                && stored.value["metadata"]["finalizers"]
                    .as_array()
                    .is_none_or(|f| f.is_empty());
            let key = obj_key(def, &old.value);
            Some(Ok((
                code,
                st.commit(r, key, stored.value.clone(), finished),
            )))
        }
    })
}

/// Calls one webhook if it matches the write. Returns the patched object of a mutating
/// webhook that patched it; an error fails the write.
#[allow(clippy::too_many_arguments)]
async fn run_hook(
    shared: &Arc<Shared>,
    attrs: &Attrs<'_>,
    configuration: &str,
    hook: &Value,
    mutating: bool,
    object: &Value,
    hooks: &Hooks,
    warnings: &mut Vec<String>,
) -> Result<Option<Value>, ApiError> {
    let name = hook["name"].as_str().unwrap_or_default();
    let internal = |why: String| {
        let mut e = ApiError::new(
            500,
            "InternalError",
            format!("Internal error occurred: {why}"),
        );
        e.details = Some(json!({"causes": [{"message": why}]}));
        e
    };
    let matched = hook_matches(hook, attrs, object, &hooks.namespace_labels)
        .map_err(|e| internal(format!("webhook \"{name}\": {e}")))?;
    if !matched {
        return Ok(None);
    }
    if attrs.dry_run && !matches!(hook["sideEffects"].as_str(), Some("None" | "NoneOnDryRun")) {
        return Err(bad_request(format!(
            "admission webhook \"{name}\" does not support dry run"
        )));
    }
    let def = &RESOURCES[attrs.r];
    let uid = fresh_uid();
    let review = review_of(attrs, &uid, object);
    let mut call = AdmissionCall {
        webhook: name.to_string(),
        configuration: configuration.to_string(),
        mutating,
        operation: attrs.operation.to_string(),
        resource: match attrs.sub {
            Some(s) => format!("{}/{s}", def.resource),
            None => def.resource.to_string(),
        },
        namespace: review["request"]["namespace"].as_str().map(str::to_string),
        name: object["metadata"]["name"]
            .as_str()
            .filter(|n| !n.is_empty())
            .map(str::to_string),
        dry_run: attrs.dry_run,
        allowed: true,
        patched: false,
        warnings: Vec::new(),
        error: None,
    };
    let out = match call_webhook(hook, &hooks.routes, &review, &uid, mutating).await {
        Err(why) => {
            let ignore = hook["failurePolicy"] == "Ignore";
            call.allowed = ignore;
            call.error = Some(why.clone());
            if ignore {
                Ok(None)
            } else {
                Err(internal(format!(
                    "failed calling webhook \"{name}\": {why}"
                )))
            }
        }
        Ok(response) => {
            call.warnings = string_items(&response["warnings"])
                .map(str::to_string)
                .collect();
            warnings.extend(call.warnings.iter().cloned());
            let patch = response["patch"].as_str().filter(|p| !p.is_empty());
            if response["allowed"] != true {
                call.allowed = false;
                Err(denied(name, &response["status"]))
            } else if let Some(patch) = patch {
                match apply_webhook_patch(object, patch) {
                    Ok(patched) => {
                        call.patched = true;
                        Ok(Some(patched))
                    }
                    Err(why) => {
                        call.allowed = false;
                        call.error = Some(why.clone());
                        Err(internal(why))
                    }
                }
            } else {
                Ok(None)
            }
        }
    };
    let mut st = shared.lock();
    if st.admission.len() >= ADMISSION_LOG_CAP {
        st.admission.pop_front();
    }
    st.admission.push_back(call);
    out
}

/// `admission webhook "<name>" denied the request: <message>`, with the webhook's code (at
/// least 400) and reason, as the real server words a refusal.
fn denied(name: &str, status: &Value) -> ApiError {
    let code = status["code"]
        .as_u64()
        .and_then(|c| u16::try_from(c).ok())
        .filter(|c| *c >= 400)
        .unwrap_or(400);
    let by = format!("admission webhook \"{name}\" denied the request");
    let message = match (status["message"].as_str(), status["reason"].as_str()) {
        (Some(m), _) if !m.is_empty() => format!("{by}: {m}"),
        (_, Some(r)) if !r.is_empty() => format!("{by}: {r}"),
        _ => format!("{by} without explanation"),
    };
    let mut e = ApiError::new(code, "", message);
    e.reason = Cow::Owned(status["reason"].as_str().unwrap_or_default().to_string());
    if let Some(d) = status.get("details").filter(|d| d.is_object()) {
        e.details = Some(d.clone());
    }
    e
}

fn hook_matches(
    hook: &Value,
    attrs: &Attrs<'_>,
    object: &Value,
    namespace_labels: &Value,
) -> Result<bool, String> {
    let def = &RESOURCES[attrs.r];
    let rules = hook["rules"].as_array().into_iter().flatten();
    if !rules
        .into_iter()
        .any(|rule| rule_matches(rule, attrs.operation, def, attrs.sub))
    {
        return Ok(false);
    }
    let ns_ok = if attrs.r == NAMESPACES {
        // A Namespace is matched on its own labels.
        selector_matches(&hook["namespaceSelector"], &object["metadata"]["labels"])
            .map_err(|e| format!("namespaceSelector: {e}"))?
    } else if !def.namespaced {
        true
    } else {
        selector_matches(&hook["namespaceSelector"], namespace_labels)
            .map_err(|e| format!("namespaceSelector: {e}"))?
    };
    if !ns_ok {
        return Ok(false);
    }
    let on = |v: &Value| {
        selector_matches(&hook["objectSelector"], &v["metadata"]["labels"])
            .map_err(|e| format!("objectSelector: {e}"))
    };
    // The new object or the old one, as the real server matches objectSelector.
    Ok(on(object)? || attrs.old.as_ref().map(on).transpose()?.unwrap_or(false))
}

/// A `RuleWithOperations` against a write: operations, apiGroups, apiVersions and resources
/// (`*`, `res`, `res/sub`, `res/*`, `*/sub`; a `*` subresource also matches the resource
/// itself, as in the real server's matcher), and scope.
fn rule_matches(rule: &Value, operation: &str, def: &ResourceDef, sub: Option<&str>) -> bool {
    let has = |field: &str, want: &str| {
        rule[field]
            .as_array()
            .is_some_and(|l| l.iter().any(|v| v == "*" || v == want))
    };
    let resource_ok = string_items(&rule["resources"]).any(|pattern| {
        let (res, s) = pattern.split_once('/').unwrap_or((pattern, ""));
        (res == "*" || res == def.resource) && (s == "*" || s == sub.unwrap_or_default())
    });
    let scope_ok = match rule["scope"].as_str().unwrap_or("*") {
        "Cluster" => !def.namespaced,
        "Namespaced" => def.namespaced,
        _ => true,
    };
    has("operations", operation)
        && has("apiGroups", def.group)
        && has("apiVersions", def.version)
        && resource_ok
        && scope_ok
}

/// A `metav1.LabelSelector` (matchLabels, matchExpressions with In, NotIn, Exists,
/// DoesNotExist) against labels; null or `{}` selects everything.
fn selector_matches(selector: &Value, labels: &Value) -> Result<bool, String> {
    if selector.is_null() {
        return Ok(true);
    }
    if !selector.is_object() {
        return Err("a label selector must be an object".into());
    }
    let mut reqs = Vec::new();
    if let Some(m) = selector["matchLabels"].as_object() {
        for (k, v) in m {
            let v = v
                .as_str()
                .ok_or_else(|| format!("matchLabels[{k}] must be a string"))?;
            reqs.push(LabelReq::Eq(k.clone(), v.to_string()));
        }
    }
    for e in selector["matchExpressions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = e["key"]
            .as_str()
            .ok_or("matchExpressions: key is required")?
            .to_string();
        let values: Vec<String> = string_items(&e["values"]).map(str::to_string).collect();
        let op = e["operator"].as_str().unwrap_or_default();
        reqs.push(match op {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!("{key}: values must be non-empty for operator {op}"));
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(format!("{key}: values must be empty for operator {op}"));
            }
            "In" => LabelReq::In(key, values),
            "NotIn" => LabelReq::NotIn(key, values),
            "Exists" => LabelReq::Exists(key),
            "DoesNotExist" => LabelReq::NotExists(key),
            other => return Err(format!("{other:?} is not a valid label selector operator")),
        });
    }
    let sel = Selector {
        labels: reqs,
        fields: Vec::new(),
    };
    Ok(sel.matches(&json!({"metadata": {"labels": labels}})))
}

/// The `admission.k8s.io/v1` AdmissionReview of a write.
fn review_of(attrs: &Attrs<'_>, uid: &str, object: &Value) -> Value {
    let def = &RESOURCES[attrs.r];
    let kind = json!({"group": def.group, "version": def.version, "kind": def.kind});
    let resource = json!({"group": def.group, "version": def.version, "resource": def.resource});
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let mut request = json!({
        "uid": uid,
        "kind": kind,
        "resource": resource,
        "requestKind": kind,
        "requestResource": resource,
        "name": name,
        "operation": attrs.operation,
        // The fake authenticates nobody: every caller is an administrator.
        "userInfo": {"username": "system:admin", "groups": ["system:masters", "system:authenticated"]},
        "object": object,
        "oldObject": attrs.old.clone().unwrap_or(Value::Null),
        "dryRun": attrs.dry_run,
        "options": attrs.options,
    });
    if attrs.r == NAMESPACES {
        // The real server gives a Namespace's own name as the request's namespace.
        request["namespace"] = json!(name);
    } else if def.namespaced {
        request["namespace"] = json!(attrs.namespace);
    }
    if let Some(s) = attrs.sub {
        request["subResource"] = json!(s);
        request["requestSubResource"] = json!(s);
    }
    json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request})
}

/// An error and its sources, `a: b: c` (repeats left out).
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// POSTs `review` to the webhook; the verified `response`, or why the call failed.
async fn call_webhook(
    hook: &Value,
    routes: &BTreeMap<(String, String, u16), SocketAddr>,
    review: &Value,
    uid: &str,
    mutating: bool,
) -> Result<Value, String> {
    let cc = &hook["clientConfig"];
    let timeout = Duration::from_secs(
        hook["timeoutSeconds"]
            .as_u64()
            .unwrap_or(WEBHOOK_DEFAULT_TIMEOUT)
            .clamp(1, WEBHOOK_MAX_TIMEOUT),
    );
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .connect_timeout(timeout)
        .pool_max_idle_per_host(0);
    if let Some(ca) = cc["caBundle"].as_str().filter(|s| !s.is_empty()) {
        let pem = base64::engine::general_purpose::STANDARD
            .decode(ca.trim())
            .map_err(|e| format!("clientConfig.caBundle is not base64: {e}"))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("clientConfig.caBundle: {}", error_chain(&e)))?;
        builder = builder.tls_built_in_root_certs(false);
        for c in certs {
            builder = builder.add_root_certificate(c);
        }
    }
    let url = if let Some(url) = cc["url"].as_str() {
        if !url.starts_with("https://") {
            return Err(format!("clientConfig.url {url:?} is not an https:// URL"));
        }
        url.to_string()
    } else if cc["service"].is_object() {
        let svc = &cc["service"];
        let ns = svc["namespace"].as_str().unwrap_or_default();
        let name = svc["name"].as_str().unwrap_or_default();
        let port = svc["port"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or(443);
        let path = svc["path"].as_str().unwrap_or("/");
        let host = format!("{name}.{ns}.svc");
        let to = routes
            .get(&(ns.to_string(), name.to_string(), port))
            .ok_or_else(|| {
                format!(
                    "failed to call webhook: service {ns}/{name} port {port} is not routed \
                     (FakeKube::route_service): lookup {host}: no such host"
                )
            })?;
        // The URL carries no port, so the connection goes to `to` as given.
        builder = builder.resolve(&host, *to);
        format!("https://{host}{path}")
    } else {
        return Err("clientConfig has neither url nor service".into());
    };
    let client = builder
        .build()
        .map_err(|e| format!("cannot build the webhook client: {}", error_chain(&e)))?;
    let call = async {
        let mut resp = client
            .post(&url)
            .header(header::ACCEPT, "application/json")
            .json(review)
            .send()
            .await
            .map_err(|e| {
                format!(
                    "failed to call webhook: Post \"{url}\": {}",
                    error_chain(&e)
                )
            })?;
        let status = resp.status().as_u16();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| {
            format!(
                "failed to call webhook: reading the response: {}",
                error_chain(&e)
            )
        })? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_BODY {
                return Err(format!(
                    "the webhook response is larger than {MAX_BODY} bytes"
                ));
            }
        }
        if status != 200 {
            let text = String::from_utf8_lossy(&body);
            let text: String = text.chars().take(200).collect();
            return Err(format!(
                "received invalid webhook response: the server responded with HTTP {status}: {text}"
            ));
        }
        verify_review(&body, uid, mutating)
    };
    // reqwest's timeout covers the body too; this bounds anything else.
    tokio::time::timeout(timeout + Duration::from_secs(1), call)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "failed to call webhook: timed out after {timeout:?}"
            ))
        })
}

/// The `response` of a webhook's AdmissionReview, checked as the real server checks it.
fn verify_review(body: &[u8], uid: &str, mutating: bool) -> Result<Value, String> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| format!("received invalid webhook response: {e}"))?;
    if v["apiVersion"] != "admission.k8s.io/v1" || v["kind"] != "AdmissionReview" {
        return Err(format!(
            "expected webhook response of admission.k8s.io/v1, Kind=AdmissionReview, got {}, Kind={}",
            v["apiVersion"].as_str().unwrap_or_default(),
            v["kind"].as_str().unwrap_or_default()
        ));
    }
    let response = v
        .get("response")
        .filter(|r| r.is_object())
        .ok_or("webhook response was absent")?;
    let got = response["uid"].as_str().unwrap_or_default();
    if got != uid {
        return Err(format!("expected response.uid=\"{uid}\", got \"{got}\""));
    }
    let patch = response["patch"].as_str().is_some_and(|p| !p.is_empty());
    let patch_type = response["patchType"].as_str();
    if !mutating && patch {
        return Err("validating webhook may not return response.patch".into());
    }
    if !mutating && patch_type.is_some() {
        return Err("validating webhook may not return response.patchType".into());
    }
    if patch && patch_type.is_none() {
        return Err("webhook returned response.patch but not response.patchType".into());
    }
    if let Some(t) = patch_type
        && t != "JSONPatch"
    {
        return Err(format!(
            "webhook returned invalid response.patchType of {t:?}"
        ));
    }
    Ok(response.clone())
}

/// Applies a webhook's base64 JSON Patch to `object`; it must stay the same kind of object.
fn apply_webhook_patch(object: &Value, patch: &str) -> Result<Value, String> {
    let raw = base64::engine::general_purpose::STANDARD
        .decode(patch.trim())
        .map_err(|e| format!("the webhook's patch is not base64: {e}"))?;
    let ops: json_patch::Patch = serde_json::from_slice(&raw)
        .map_err(|e| format!("the webhook's patch is not a JSON Patch: {e}"))?;
    let mut doc = object.clone();
    json_patch::patch(&mut doc, &ops)
        .map_err(|e| format!("the webhook's JSON Patch does not apply: {e}"))?;
    if !doc.is_object()
        || doc["apiVersion"] != object["apiVersion"]
        || doc["kind"] != object["kind"]
    {
        return Err("the webhook's JSON Patch changed the object's apiVersion or kind".into());
    }
    Ok(doc)
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
    /// `tokenreviews` (true) or `subjectaccessreviews` (false).
    Review(bool),
    Unknown {
        group: String,
        resource: String,
    },
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
        ["apis", "authentication.k8s.io", "v1", "tokenreviews"] => Route::Review(true),
        ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"] => Route::Review(false),
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
    let discovery = !matches!(
        route,
        Route::Object(_) | Route::Unknown { .. } | Route::Review(_)
    );
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
        Route::Review(token) => {
            rec.verb = rbac_verb(&method, false, false);
            let (group, resource) = if *token {
                ("authentication.k8s.io", "tokenreviews")
            } else {
                ("authorization.k8s.io", "subjectaccessreviews")
            };
            rec.group = group.into();
            rec.resource = resource.into();
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
        Route::Review(_) if method != Method::POST => return error_resp(&method_not_allowed()),
        Route::Review(token) => {
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return error_resp(&bad_request(format!("cannot read the body: {e}"))),
            };
            return match serde_json::from_slice::<Value>(&body) {
                Ok(v) if token => value_resp(201, &token_review(&shared.lock(), v)),
                Ok(v) => value_resp(201, &access_review(&shared.lock(), v)),
                Err(e) => error_resp(&bad_request(format!("json parse error: {e}"))),
            };
        }
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
    match dispatch(&shared, &method, req, watch_param).await {
        Ok(r) => r,
        Err(e) => error_resp(&e),
    }
}

/// The TokenReview `review` with its status filled from the registered tokens.
fn token_review(st: &State, mut review: Value) -> Value {
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    review["status"] = match st.tokens.get(token) {
        Some((user, groups)) => json!({
            "authenticated": true,
            "user": {"username": user, "uid": format!("uid-{user}"), "groups": groups},
        }),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    review
}

/// Whether an RBAC `nonResourceURLs` entry matches `path`.
fn non_resource_matches(rule: &str, path: &str) -> bool {
    match rule.strip_suffix('*') {
        Some(prefix) => path.starts_with(prefix),
        None => rule == path,
    }
}

/// The SubjectAccessReview `review` with its status decided by the registered grants.
fn access_review(st: &State, mut review: Value) -> Value {
    let spec = &review["spec"];
    let mut subjects: Vec<&str> = spec["groups"]
        .as_array()
        .map(|g| g.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    subjects.extend(spec["user"].as_str());
    let attrs = &spec["nonResourceAttributes"];
    let (path, verb) = (attrs["path"].as_str(), attrs["verb"].as_str());
    let allowed = match (path, verb) {
        (Some(path), Some(verb)) if spec["resourceAttributes"].is_null() => {
            st.grants.iter().any(|(who, verbs, urls)| {
                subjects.contains(&who.as_str())
                    && verbs.iter().any(|v| v == "*" || v == verb)
                    && urls.iter().any(|u| non_resource_matches(u, path))
            })
        }
        _ => false,
    };
    review["status"] = if allowed {
        json!({"allowed": true, "reason": "allowed by the fake's grants"})
    } else {
        json!({"allowed": false})
    };
    review
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

async fn dispatch(
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
            let ctx = req.ctx("Update");
            let fields = field_set(&body, def, &ctx);
            let ns_path = req.t.namespace.clone();
            let plan = |st: &State| {
                let ns = precheck_create(st, r, ns_path.as_deref(), &body, &ctx)?;
                Ok(Plan {
                    op: PlanOp::Create {
                        ns_path: ns_path.clone(),
                        ns,
                        body: body.clone(),
                    },
                    ctx: ctx.clone(),
                    fields: Some(fields.clone()),
                    options: "CreateOptions",
                })
            };
            Ok(admit_write(shared, r, req.t.sub.as_deref(), plan).await)
        }
        Method::PUT if has_name => {
            let body = req.object_body()?;
            let ctx = req.ctx("Update");
            let fields = field_set(&body, def, &ctx);
            let key = req.key();
            let plan = |st: &State| -> Result<Plan, ApiError> {
                let old = st.objects[r]
                    .get(&key)
                    .cloned()
                    .ok_or_else(|| not_found(def, &key.1))?;
                check_type(def, &body)?;
                check_name_matches(&body, &key.1)?;
                if def.namespaced
                    && let Some(n) = body["metadata"]["namespace"].as_str()
                    && !n.is_empty()
                    && n != key.0
                {
                    return Err(bad_request(NAMESPACE_MISMATCH));
                }
                check_precondition(def, &old, &body)?;
                Ok(Plan {
                    op: PlanOp::Update {
                        old,
                        body: body.clone(),
                    },
                    ctx: ctx.clone(),
                    fields: Some(fields.clone()),
                    options: "UpdateOptions",
                })
            };
            Ok(admit_write(shared, r, req.t.sub.as_deref(), plan).await)
        }
        Method::PATCH if has_name => patch(shared, &req).await,
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

async fn patch(shared: &Arc<Shared>, req: &Req) -> Result<Resp, ApiError> {
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
            check_name_matches(&v, &key.1)?;
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
    let plan = |st: &State| -> Result<Plan, ApiError> {
        let Some(old) = st.objects[r].get(&key).cloned() else {
            return match &kind {
                Kind::Apply(v) if !ctx.status_only() => {
                    let mut v = v.clone();
                    if let Some(m) = v["metadata"].as_object_mut() {
                        m.remove("resourceVersion");
                    }
                    if v["metadata"]["name"].is_null() {
                        v["metadata"]["name"] = json!(key.1);
                    }
                    let ns_path = def.namespaced.then(|| key.0.clone());
                    let ns = precheck_create(st, r, ns_path.as_deref(), &v, &ctx)?;
                    Ok(Plan {
                        op: PlanOp::Create {
                            ns_path,
                            ns,
                            body: v,
                        },
                        ctx: ctx.clone(),
                        fields: Some(fields.clone()),
                        options: "PatchOptions",
                    })
                }
                _ => Err(not_found(def, &key.1)),
            };
        };
        let mut doc = old.value.clone();
        let precondition = match &kind {
            Kind::Apply(p) => {
                merge_patch(&mut doc, p);
                remove_dropped(&mut doc, &ctx, &fields);
                p.clone()
            }
            Kind::Merge(p) => {
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
        Ok(Plan {
            op: PlanOp::Update { old, body: doc },
            ctx: ctx.clone(),
            fields: Some(fields.clone()),
            options: "PatchOptions",
        })
    };
    Ok(admit_write(shared, r, req.t.sub.as_deref(), plan).await)
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
/// Discovery requests need no grant; requests of the test's own clients (User-Agent
/// starting with [`TEST_USER_AGENT`]) are not meshbridge's.
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
        let test_client = r
            .user_agent
            .as_deref()
            .is_some_and(|ua| ua.starts_with(TEST_USER_AGENT));
        if r.resource.is_empty() || test_client {
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
