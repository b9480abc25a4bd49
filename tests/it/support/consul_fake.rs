//! An in-process fake of the parts of the Consul HTTP API that a service-discovery client and
//! a catalog sync (such as consul-k8s catalog sync, which registers Kubernetes pods under a
//! synthetic node) use: the agent's own configuration, the catalog's reads and writes and the
//! health of a service's instances, all reads with blocking queries. It serves real HTTP/1.1
//! on 127.0.0.1 so a client under test talks to it exactly as it would to a Consul agent, and
//! it can misbehave on demand (errors, latency, hangs, malformed bodies, unreachable
//! datacenters, ACLs, restarts).
//!
//! Include it from a test crate with `mod support { pub mod consul_fake; }` or
//! `#[path = "support/consul_fake.rs"] mod consul_fake;`.
//!
//! Semantics follow the published API:
//! - blocking queries: <https://developer.hashicorp.com/consul/api-docs/features/blocking>
//! - `GET /v1/agent/self`:
//!   <https://developer.hashicorp.com/consul/api-docs/agent#read-configuration>
//! - `GET /v1/catalog/services`:
//!   <https://developer.hashicorp.com/consul/api-docs/catalog#list-services>
//! - `GET /v1/catalog/service/:service`:
//!   <https://developer.hashicorp.com/consul/api-docs/catalog#list-nodes-for-service>
//!   (`tag` may repeat: every one must match; `filter` on the entry's top-level fields)
//! - `GET /v1/catalog/node-services/:node`:
//!   <https://developer.hashicorp.com/consul/api-docs/catalog#list-services-for-node>
//! - `PUT /v1/catalog/register`:
//!   <https://developer.hashicorp.com/consul/api-docs/catalog#register-entity>
//! - `PUT /v1/catalog/deregister`:
//!   <https://developer.hashicorp.com/consul/api-docs/catalog#deregister-entity>
//! - `GET /v1/health/service/:service`:
//!   <https://developer.hashicorp.com/consul/api-docs/health#list-service-instances-for-service>
//! - `GET /v1/health/state/:state`:
//!   <https://developer.hashicorp.com/consul/api-docs/health#list-checks-in-state>
//!
//! The store is Consul's catalog: datacenters hold nodes (address, tagged addresses, meta),
//! each node holds service instances (unique by ID on that node) and checks (node-level, or
//! bound to one of its services by `ServiceID`). The HTTP writes and the Rust control
//! ([`FakeConsul::register`], [`FakeConsul::deregister`], [`FakeConsul::set_health`]) work on
//! the same store, and [`FakeConsul::instances`] reads it whatever wrote it. An instance's
//! health is the worst status of its node's checks and its own; without any check it is
//! passing (its `Checks` list is then empty, which clients treat as passing). The Rust control
//! keeps its simpler model on top: [`FakeConsul::register`] creates a node like an agent's
//! (with a passing `serfHealth` check), gives the instance a single TTL check
//! `service:<id>` carrying [`Instance::health`], treats service IDs as unique within the
//! datacenter (registering an ID on another node moves it), and a node it created goes away
//! with its last instance.
//!
//! Writes as Consul's agent handles them (`agent/catalog_endpoint.go`, `agent/http.go`,
//! `agent/consul/catalog_endpoint.go`, `agent/consul/state/catalog.go`):
//! - the datacenter is the body's `Datacenter`, else the agent's; `?dc=` is not read (the
//!   register/deregister handlers never parse it and the page lists no `dc` parameter);
//! - a body that does not decode answers `400` `Request decode failed: ...`; keys match
//!   case-insensitively as in Go, unknown keys are ignored (Consul rejects them with 400);
//! - a request that decodes but is refused by the server answers `500` with Consul's
//!   message, as Consul's HTTP layer maps plain RPC errors: `Must provide node`,
//!   `Must provide address if SkipNodeUpdate is not set`,
//!   `Must provide service name (Service.Service) when service ID is provided`,
//!   `Invalid service address`, `Missing service registration` (a check naming a service
//!   that is not on the node), `Bad node ID: ...`;
//! - success answers `200` with body `true` and no `X-Consul-Index`;
//! - a `Check` (or each of `Checks`) without `CheckID` takes its `Name`; without `Status` it
//!   is critical, as in Consul's state store; `Service.ID` defaults to `Service.Service`;
//!   `Service.Weights` defaults to `{"Passing": 1, "Warning": 1}` (also when `Passing < 1`);
//! - a register replaces the node's fields (unless `SkipNodeUpdate` and the node exists),
//!   upserts the service and the checks it carries, and leaves the node's other services
//!   and checks alone; a deregister with `ServiceID` removes that instance and its checks,
//!   else with `CheckID` that check, else the node with everything on it; deregistering
//!   something absent succeeds and changes nothing;
//! - every failure mode applies to writes as to reads (a write refused by `fail_next`, ACLs
//!   or an unreachable datacenter changes nothing); with [`FakeConsul::set_malformed`] a
//!   write is applied and its `true` comes back garbled.
//!
//! `GET /v1/catalog/node-services/:node` answers, as Consul does (`Store.NodeServiceList`
//! returns nil for an unknown node and the handler encodes the zero `NodeServiceList`),
//! `200` with `{"Node": null, "Services": null}` for a node that does not exist, and
//! `"Services": null` for a node without services.
//!
//! Indexes: one raft-like counter increments on every mutation (in any datacenter). Each
//! (datacenter, endpoint, name) has the counter's value at the last change that affected
//! it: `catalog/services` moves on any change of a service instance in its datacenter;
//! `health/service/<name>` and `catalog/service/<name>` share one index (Consul's
//! `service.<name>`), moved by any change of that service's instances, of their checks or of
//! their nodes (fields or node-level checks); `catalog/node-services/<node>` has the node's
//! own index (Consul's `node.<name>`), moved by changes of the node's fields or services;
//! `health/state/<state>` moves on any check change in the datacenter. A returned
//! `X-Consul-Index` is never 0 (the minimum is 1), as the blocking-query page asks of
//! servers. Idempotent writes (re-registering an identical instance or node, setting the same
//! health, deregistering something absent) change nothing, as in Consul's state store.
//!
//! Everything is bounded: request counters per path are capped, the write log keeps the
//! last [`MAX_WRITE_LOG`] writes, request bodies are limited to 4 MiB, a parked query ends at
//! its `wait` (at most 10 minutes plus jitter), and `stop()` ends every connection.
#![allow(clippy::unwrap_used)]

// Included by path rather than shared through `support`, so that the benches that include
// this fake by path get it as well; the test binary thus holds two copies.
#[allow(clippy::duplicate_mod)]
#[path = "query.rs"]
mod query;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use query::{parse_query, percent_decode};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Body of the 500 answered by [`FakeConsul::fail_next`] (what a Consul agent says while its
/// servers have no leader).
pub const NO_LEADER: &str = "rpc error: No cluster leader";
/// Body of the 429 answered while [`Outage::RateLimited`] is set.
pub const RATE_LIMITED: &str = "rpc error making call: rate limit exceeded, try again later";
/// Body of the 500 answered for a datacenter marked unreachable (Consul's `ErrNoDCPath`).
pub const NO_PATH_TO_DC: &str = "No path to datacenter";
/// Body of the 403 answered when a required token is missing or wrong.
pub const ACL_NOT_FOUND: &str = "ACL not found";
/// Default `wait` of a blocking query.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(5 * 60);
/// Maximum `wait` of a blocking query (before jitter).
pub const MAX_WAIT: Duration = Duration::from_secs(10 * 60);
/// Node name of the fake agent (`Config.NodeName` of `/v1/agent/self`).
pub const AGENT_NODE: &str = "fake-agent";
/// Writes kept by [`FakeConsul::write_log`] (older ones are dropped; the counters go on).
pub const MAX_WRITE_LOG: usize = 100_000;
/// Distinct request paths counted individually (later ones are counted under `"<other>"`).
const MAX_COUNTED_PATHS: usize = 4096;
/// Largest request body read (larger ones answer 400).
const MAX_BODY: usize = 4 << 20;
/// The check every agent-managed node has.
const SERF_HEALTH: &str = "serfHealth";

/// A failure every request meets while it is set ([`FakeConsul::set_outage`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// The agent is up but its servers have no leader, or it is cut from them: `500` with
    /// body [`NO_LEADER`] (what the agent's HTTP handler writes for the RPC error
    /// `structs.ErrNoLeader`).
    NoLeader,
    /// The servers refuse reads over their rate limit (`limits.request_limits` in
    /// `enforcing` mode, developer.hashicorp.com/consul/docs/agent/limits): `429 Too Many
    /// Requests` with body [`RATE_LIMITED`].
    RateLimited,
}

/// The status of a check, and the aggregated health of an instance (the worst of its
/// checks and its node's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    /// The `Status` string Consul uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }

    fn parse(s: &str) -> Option<Health> {
        match s {
            "passing" => Some(Health::Passing),
            "warning" => Some(Health::Warning),
            "critical" => Some(Health::Critical),
            _ => None,
        }
    }

    fn rank(self) -> u8 {
        match self {
            Health::Passing => 0,
            Health::Warning => 1,
            Health::Critical => 2,
        }
    }

    fn worst(self, other: Health) -> Health {
        if other.rank() > self.rank() {
            other
        } else {
            self
        }
    }
}

/// One service instance registered on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub service: String,
    /// Service ID. Consul keeps it unique per node; the Rust control of this fake keeps it
    /// unique within a datacenter.
    pub id: String,
    pub node: String,
    pub node_address: String,
    /// `Service.Address`; may be empty, in which case clients are expected to use
    /// `Node.Address` (as with real Consul).
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// `Service.Weights.Passing` (Consul's default is 1). [`FakeConsul::register`] sets
    /// `Weights.Warning` to 1.
    pub weight_passing: u32,
    /// Given to [`FakeConsul::register`]: the status of the instance's TTL check. Read from
    /// [`FakeConsul::instances`]: the worst status of the instance's checks and its node's
    /// (passing without checks).
    pub health: Health,
}

impl Instance {
    /// A passing instance with weight 1 on node `"node-" + id` whose node address is
    /// `address`.
    pub fn new(service: &str, id: &str, address: &str, port: u16) -> Self {
        Instance {
            service: service.to_string(),
            id: id.to_string(),
            node: format!("node-{id}"),
            node_address: address.to_string(),
            address: address.to_string(),
            port,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            weight_passing: 1,
            health: Health::Passing,
        }
    }

    pub fn tags(mut self, tags: &[&str]) -> Self {
        self.tags = tags.iter().map(|t| t.to_string()).collect();
        self
    }

    pub fn meta(mut self, key: &str, value: &str) -> Self {
        self.meta.insert(key.to_string(), value.to_string());
        self
    }

    pub fn weight(mut self, passing: u32) -> Self {
        self.weight_passing = passing;
        self
    }

    pub fn health(mut self, health: Health) -> Self {
        self.health = health;
        self
    }

    /// Places the instance on another node.
    pub fn on_node(mut self, node: &str, node_address: &str) -> Self {
        self.node = node.to_string();
        self.node_address = node_address.to_string();
        self
    }

    /// Sets `Service.Address` (empty: clients use the node address).
    pub fn service_address(mut self, address: &str) -> Self {
        self.address = address.to_string();
        self
    }
}

/// What a blocking index belongs to within one datacenter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Key {
    /// `/v1/catalog/services`.
    Catalog,
    /// `/v1/health/service/<name>` and `/v1/catalog/service/<name>`.
    Health(String),
    /// Every check of the datacenter (`/v1/health/state/<state>`).
    Checks,
    /// `/v1/catalog/node-services/<node>`.
    Node(String),
}

/// The node's own fields, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeInfo {
    id: String,
    address: String,
    tagged: BTreeMap<String, String>,
    meta: BTreeMap<String, String>,
}

/// One service instance, as registered.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SvcInfo {
    name: String,
    address: String,
    port: u16,
    tags: Vec<String>,
    meta: BTreeMap<String, String>,
    /// `Weights.Passing`, `Weights.Warning`.
    weights: (u32, u32),
}

/// One check, as registered; `service_id` is empty for a node-level check.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CheckInfo {
    name: String,
    status: Health,
    notes: String,
    output: String,
    service_id: String,
    kind: String,
}

/// A value with its raft indexes.
#[derive(Debug, Clone)]
struct Indexed<T> {
    v: T,
    create: u64,
    modify: u64,
}

impl<T: PartialEq> Indexed<T> {
    /// Each of `new` as stored by a write at `idx` over the entry of `old` with its key.
    fn update_all(
        old: Option<&BTreeMap<String, Indexed<T>>>,
        new: BTreeMap<String, T>,
        idx: u64,
    ) -> BTreeMap<String, Indexed<T>> {
        new.into_iter()
            .map(|(k, v)| {
                let prev = old.and_then(|o| o.get(&k));
                let v = Indexed::update(prev, v, idx);
                (k, v)
            })
            .collect()
    }

    /// `v` as stored by a write at `idx`: the indexes stay when nothing changed.
    fn update(old: Option<&Indexed<T>>, v: T, idx: u64) -> Indexed<T> {
        match old {
            Some(o) if o.v == v => Indexed {
                v,
                create: o.create,
                modify: o.modify,
            },
            Some(o) => Indexed {
                v,
                create: o.create,
                modify: idx,
            },
            None => Indexed {
                v,
                create: idx,
                modify: idx,
            },
        }
    }
}

/// What a node holds, without indexes: writes build the new content, [`commit`] diffs it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct NodeContent {
    info: NodeInfo,
    /// By service ID.
    services: BTreeMap<String, SvcInfo>,
    /// By check ID.
    checks: BTreeMap<String, CheckInfo>,
}

/// The checks of a node as `/v1/health/state` shows them (with their service's name and
/// tags).
type ChecksView<'a> = Vec<(
    &'a String,
    &'a CheckInfo,
    Option<(&'a String, &'a Vec<String>)>,
)>;
/// A node's part of `/v1/health/service/<name>`: its fields, its node-level checks, and each
/// instance of the service with its checks.
type HealthView<'a> = (
    &'a NodeInfo,
    Vec<(&'a String, &'a CheckInfo)>,
    Vec<(&'a String, &'a SvcInfo, Vec<(&'a String, &'a CheckInfo)>)>,
);

impl NodeContent {
    /// A node as the catalog API creates it: nothing but its name.
    fn bare(node: &str) -> NodeContent {
        NodeContent {
            info: NodeInfo {
                id: node_id(node),
                address: String::new(),
                tagged: BTreeMap::new(),
                meta: BTreeMap::new(),
            },
            services: BTreeMap::new(),
            checks: BTreeMap::new(),
        }
    }

    /// A node as an agent creates it: tagged addresses, segment meta, a passing serfHealth.
    fn agent(node: &str, address: &str) -> NodeContent {
        let mut c = NodeContent::bare(node);
        c.info.address = address.to_string();
        c.info.tagged = agent_tagged(address);
        c.info.meta = BTreeMap::from([("consul-network-segment".to_string(), String::new())]);
        c.checks.insert(
            SERF_HEALTH.to_string(),
            CheckInfo {
                name: "Serf Health Status".to_string(),
                status: Health::Passing,
                notes: String::new(),
                output: "Agent alive and reachable".to_string(),
                service_id: String::new(),
                kind: String::new(),
            },
        );
        c
    }

    /// Removes service `id` and its checks.
    fn remove_service(&mut self, id: &str) {
        self.services.remove(id);
        self.checks.retain(|_, c| c.service_id != id);
    }

    fn checks_view(&self) -> ChecksView<'_> {
        self.checks
            .iter()
            .map(|(id, c)| {
                let svc = self.services.get(&c.service_id).map(|s| (&s.name, &s.tags));
                (id, c, svc)
            })
            .collect()
    }

    fn health_view(&self, name: &str) -> Option<HealthView<'_>> {
        let instances: Vec<_> = self
            .services
            .iter()
            .filter(|(_, s)| s.name == name)
            .map(|(id, s)| {
                let checks = self
                    .checks
                    .iter()
                    .filter(|(_, c)| c.service_id == *id)
                    .collect();
                (id, s, checks)
            })
            .collect();
        if instances.is_empty() {
            return None;
        }
        let node_checks = self
            .checks
            .iter()
            .filter(|(_, c)| c.service_id.is_empty())
            .collect();
        Some((&self.info, node_checks, instances))
    }
}

/// A stored node.
#[derive(Debug, Clone)]
struct Node {
    info: Indexed<NodeInfo>,
    services: BTreeMap<String, Indexed<SvcInfo>>,
    checks: BTreeMap<String, Indexed<CheckInfo>>,
    /// Created by [`FakeConsul::register`]: goes away with its last instance when the Rust
    /// control removes that (a node registered through the API stays until deregistered).
    implicit: bool,
}

impl Node {
    fn content(&self) -> NodeContent {
        NodeContent {
            info: self.info.v.clone(),
            services: self
                .services
                .iter()
                .map(|(k, s)| (k.clone(), s.v.clone()))
                .collect(),
            checks: self
                .checks
                .iter()
                .map(|(k, c)| (k.clone(), c.v.clone()))
                .collect(),
        }
    }

    /// `c` stored by a write at `idx` over `old`.
    fn merge(old: Option<&Node>, c: NodeContent, implicit: bool, idx: u64) -> Node {
        Node {
            info: Indexed::update(old.map(|o| &o.info), c.info, idx),
            services: Indexed::update_all(old.map(|o| &o.services), c.services, idx),
            checks: Indexed::update_all(old.map(|o| &o.checks), c.checks, idx),
            implicit,
        }
    }

    /// The checks that decide the health of instance `id`: the node's, then its own, in
    /// check ID order.
    fn checks_of<'a>(
        &'a self,
        id: &'a str,
    ) -> impl Iterator<Item = (&'a String, &'a Indexed<CheckInfo>)> + 'a {
        self.checks
            .iter()
            .filter(move |(_, c)| c.v.service_id.is_empty() || c.v.service_id == id)
    }

    /// The worst status of the checks of instance `id` (passing without checks).
    fn health_of(&self, id: &str) -> Health {
        self.checks_of(id)
            .fold(Health::Passing, |h, (_, c)| h.worst(c.v.status))
    }

    fn instance(&self, node: &str, id: &str) -> Instance {
        let s = &self.services[id].v;
        Instance {
            service: s.name.clone(),
            id: id.to_string(),
            node: node.to_string(),
            node_address: self.info.v.address.clone(),
            address: s.address.clone(),
            port: s.port,
            tags: s.tags.clone(),
            meta: s.meta.clone(),
            weight_passing: s.weights.0,
            health: self.health_of(id),
        }
    }
}

/// One datacenter's catalog.
#[derive(Debug, Default)]
struct Dc {
    /// By node name.
    nodes: BTreeMap<String, Node>,
    /// Service ID -> the nodes that have an instance with that ID.
    by_id: HashMap<String, BTreeSet<String>>,
}

/// A node's new content (`None`: the node goes), for [`commit`].
struct Change {
    node: String,
    new: Option<NodeContent>,
    implicit: bool,
}

/// Adds to `keys` the indexes a change of node `node` from `old` to `new` moves.
fn diff_keys(
    node: &str,
    old: Option<&NodeContent>,
    new: Option<&NodeContent>,
    keys: &mut BTreeSet<Key>,
) {
    if old == new {
        return;
    }
    let services_differ = old.map(|c| &c.services) != new.map(|c| &c.services);
    if services_differ || old.map(|c| &c.info) != new.map(|c| &c.info) {
        keys.insert(Key::Node(node.to_string()));
    }
    if services_differ {
        keys.insert(Key::Catalog);
    }
    if old.map(NodeContent::checks_view) != new.map(NodeContent::checks_view) {
        keys.insert(Key::Checks);
    }
    let names: BTreeSet<&String> = old
        .into_iter()
        .chain(new)
        .flat_map(|c| c.services.values().map(|s| &s.name))
        .collect();
    for name in names {
        if old.and_then(|c| c.health_view(name)) != new.and_then(|c| c.health_view(name)) {
            keys.insert(Key::Health(name.clone()));
        }
    }
}

/// Applies `changes` to datacenter `dc` as one mutation: if anything visible changes, the
/// counter moves once and every affected index takes its value. Returns whether anything
/// changed (the caller then notifies).
fn commit(st: &mut State, dc: &str, changes: Vec<Change>) -> bool {
    let mut keys = BTreeSet::new();
    {
        let nodes = st.dcs.get(dc).map(|d| &d.nodes);
        for ch in &changes {
            let old = nodes.and_then(|m| m.get(&ch.node)).map(Node::content);
            diff_keys(&ch.node, old.as_ref(), ch.new.as_ref(), &mut keys);
        }
    }
    if keys.is_empty() {
        // Nothing visible changes; only the bookkeeping flag may.
        if let Some(d) = st.dcs.get_mut(dc) {
            for ch in &changes {
                if let Some(n) = d.nodes.get_mut(&ch.node) {
                    n.implicit = ch.implicit;
                }
            }
        }
        return false;
    }
    let keys: Vec<Key> = keys.into_iter().collect();
    let idx = st.touch(dc, &keys);
    let d = st.dcs.entry(dc.to_string()).or_default();
    for ch in changes {
        let old = d.nodes.remove(&ch.node);
        if let Some(o) = &old {
            for id in o.services.keys() {
                if let Some(set) = d.by_id.get_mut(id) {
                    set.remove(&ch.node);
                    if set.is_empty() {
                        d.by_id.remove(id);
                    }
                }
            }
        }
        if let Some(c) = ch.new {
            let n = Node::merge(old.as_ref(), c, ch.implicit, idx);
            for id in n.services.keys() {
                d.by_id
                    .entry(id.clone())
                    .or_default()
                    .insert(ch.node.clone());
            }
            d.nodes.insert(ch.node, n);
        }
    }
    true
}

/// One successful catalog write: `("register" | "deregister", node, service ID)`.
pub type WriteRecord = (String, String, Option<String>);

#[derive(Debug)]
struct State {
    local_dc: String,
    /// The raft-like counter: bumped by every mutation.
    raft: u64,
    dcs: BTreeMap<String, Dc>,
    indexes: HashMap<(String, Key), u64>,
    /// Bumped by `spurious_wakeup`; parked queries that saw another value return.
    spurious: u64,
    latency: Duration,
    fail_next: usize,
    outage: Option<Outage>,
    hang: bool,
    malformed: bool,
    acl_hidden: bool,
    unreachable: BTreeSet<String>,
    token: Option<String>,
    strict_min_index: bool,
    requests: usize,
    by_path: HashMap<String, usize>,
    /// Response body bytes of successful reads, by path (same keys as `by_path`).
    bytes_by_path: HashMap<String, u64>,
    catalog_registers: usize,
    catalog_deregisters: usize,
    write_log: VecDeque<WriteRecord>,
}

impl State {
    fn index(&self, dc: &str, key: &Key) -> u64 {
        self.indexes
            .get(&(dc.to_string(), key.clone()))
            .copied()
            .unwrap_or(0)
    }

    /// One mutation: the counter moves and every key in `keys` takes its value. The first
    /// value is 2, never 1: an untouched key answers 1 (indexes are never 0), so a client
    /// blocking on 1 must see the first change.
    fn touch(&mut self, dc: &str, keys: &[Key]) -> u64 {
        self.raft = (self.raft + 1).max(2);
        for k in keys {
            self.indexes.insert((dc.to_string(), k.clone()), self.raft);
        }
        self.raft
    }

    fn nodes(&self, dc: &str) -> Option<&BTreeMap<String, Node>> {
        self.dcs.get(dc).map(|d| &d.nodes)
    }

    /// The nodes of `dc` holding an instance with service ID `id`.
    fn nodes_with(&self, dc: &str, id: &str) -> Vec<(String, &Node)> {
        let Some(d) = self.dcs.get(dc) else {
            return Vec::new();
        };
        d.by_id
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|n| d.nodes.get(n).map(|node| (n.clone(), node)))
            .collect()
    }

    fn log_write(&mut self, kind: &str, node: &str, service_id: Option<&str>) {
        if kind == "register" {
            self.catalog_registers += 1;
        } else {
            self.catalog_deregisters += 1;
        }
        if self.write_log.len() >= MAX_WRITE_LOG {
            self.write_log.pop_front();
        }
        self.write_log.push_back((
            kind.to_string(),
            node.to_string(),
            service_id.map(str::to_string),
        ));
    }
}

struct Shared {
    state: Mutex<State>,
    /// Bumped after every change a parked or hanging request may care about.
    changed: watch::Sender<u64>,
    open: AtomicUsize,
    max_open: AtomicUsize,
    parked: AtomicUsize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn notify(&self) {
        self.changed.send_modify(|g| *g = g.wrapping_add(1));
    }
}

/// The fake agent. Dropping it stops serving (connections are aborted).
pub struct FakeConsul {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl FakeConsul {
    /// Starts an agent of datacenter `local_dc` on 127.0.0.1, on a port chosen by the OS.
    pub async fn start(local_dc: &str) -> FakeConsul {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                local_dc: local_dc.to_string(),
                raft: 0,
                dcs: BTreeMap::new(),
                indexes: HashMap::new(),
                spurious: 0,
                latency: Duration::ZERO,
                fail_next: 0,
                outage: None,
                hang: false,
                malformed: false,
                acl_hidden: false,
                unreachable: BTreeSet::new(),
                token: None,
                strict_min_index: false,
                requests: 0,
                by_path: HashMap::new(),
                bytes_by_path: HashMap::new(),
                catalog_registers: 0,
                catalog_deregisters: 0,
                write_log: VecDeque::new(),
            }),
            changed: watch::channel(0).0,
            open: AtomicUsize::new(0),
            max_open: AtomicUsize::new(0),
            parked: AtomicUsize::new(0),
        });
        let mut fake = FakeConsul {
            addr,
            shared,
            server: None,
        };
        fake.spawn(listener);
        fake
    }

    fn spawn(&mut self, listener: TcpListener) {
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(serve(listener, self.shared.clone(), rx));
        self.server = Some((tx, task));
    }

    /// `http://127.0.0.1:PORT`, without a trailing slash.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Registers `instance` in `dc` on `instance.node`, replacing any instance with the same
    /// ID in `dc` (on whatever node). A node this creates is agent-like (tagged addresses,
    /// passing `serfHealth`); an existing node takes `instance.node_address` and keeps its
    /// other fields. The instance's checks become one TTL check `service:<id>` with status
    /// `instance.health`. Registering an identical instance again changes nothing (no index
    /// moves).
    pub fn register(&self, dc: &str, instance: Instance) {
        let changed = {
            let mut st = self.shared.lock();
            let mut changes = Vec::new();
            for (name, n) in st.nodes_with(dc, &instance.id) {
                if name == instance.node {
                    continue;
                }
                let mut c = n.content();
                c.remove_service(&instance.id);
                let gone = n.implicit && c.services.is_empty();
                changes.push(Change {
                    node: name,
                    new: (!gone).then_some(c),
                    implicit: n.implicit,
                });
            }
            let existing = st.nodes(dc).and_then(|m| m.get(&instance.node));
            let (mut c, implicit) = match existing {
                Some(n) => (n.content(), n.implicit),
                None => (
                    NodeContent::agent(&instance.node, &instance.node_address),
                    true,
                ),
            };
            c.info.address = instance.node_address.clone();
            if implicit {
                c.info.tagged = agent_tagged(&instance.node_address);
            }
            c.checks.retain(|_, ch| ch.service_id != instance.id);
            c.checks.insert(
                format!("service:{}", instance.id),
                CheckInfo {
                    name: format!("Service '{}' check", instance.service),
                    status: instance.health,
                    notes: String::new(),
                    output: String::new(),
                    service_id: instance.id.clone(),
                    kind: "ttl".to_string(),
                },
            );
            c.services.insert(
                instance.id.clone(),
                SvcInfo {
                    name: instance.service,
                    address: instance.address,
                    port: instance.port,
                    tags: instance.tags,
                    meta: instance.meta,
                    weights: (instance.weight_passing, 1),
                },
            );
            changes.push(Change {
                node: instance.node,
                new: Some(c),
                implicit,
            });
            commit(&mut st, dc, changes)
        };
        if changed {
            self.shared.notify();
        }
    }

    /// Removes every instance with service ID `id` from `dc`, with its checks (nothing
    /// happens if there is none). A node [`register`](Self::register) created goes with its
    /// last instance; a node registered through the API stays.
    pub fn deregister(&self, dc: &str, id: &str) {
        let changed = {
            let mut st = self.shared.lock();
            let changes = st
                .nodes_with(dc, id)
                .into_iter()
                .map(|(name, n)| {
                    let mut c = n.content();
                    c.remove_service(id);
                    let gone = n.implicit && c.services.is_empty();
                    Change {
                        node: name,
                        new: (!gone).then_some(c),
                        implicit: n.implicit,
                    }
                })
                .collect();
            commit(&mut st, dc, changes)
        };
        if changed {
            self.shared.notify();
        }
    }

    /// Sets the status of every check of the instances with service ID `id` in `dc` (an
    /// instance without checks gets a TTL check `service:<id>`). Panics if there is no such
    /// instance (a mistake in the test). Setting the current status changes nothing.
    pub fn set_health(&self, dc: &str, id: &str, health: Health) {
        let changed = {
            let mut st = self.shared.lock();
            let found = st.nodes_with(dc, id);
            if found.is_empty() {
                drop(st);
                panic!("FakeConsul::set_health: no instance {id:?} in datacenter {dc:?}");
            }
            let changes = found
                .into_iter()
                .map(|(name, n)| {
                    let mut c = n.content();
                    let mut any = false;
                    for ch in c.checks.values_mut().filter(|ch| ch.service_id == id) {
                        ch.status = health;
                        any = true;
                    }
                    if !any {
                        let service = c.services[id].name.clone();
                        c.checks.insert(
                            format!("service:{id}"),
                            CheckInfo {
                                name: format!("Service '{service}' check"),
                                status: health,
                                notes: String::new(),
                                output: String::new(),
                                service_id: id.to_string(),
                                kind: "ttl".to_string(),
                            },
                        );
                    }
                    Change {
                        node: name,
                        new: Some(c),
                        implicit: n.implicit,
                    }
                })
                .collect();
            commit(&mut st, dc, changes)
        };
        if changed {
            self.shared.notify();
        }
    }

    /// The instances registered in `dc` (through the API or [`register`](Self::register)),
    /// by service ID then node.
    pub fn instances(&self, dc: &str) -> Vec<Instance> {
        let st = self.shared.lock();
        let mut out: Vec<Instance> = st
            .nodes(dc)
            .into_iter()
            .flatten()
            .flat_map(|(name, n)| n.services.keys().map(|id| n.instance(name, id)))
            .collect();
        out.sort_by(|a, b| (&a.id, &a.node).cmp(&(&b.id, &b.node)));
        out
    }

    /// The `X-Consul-Index` the fake would answer now for `catalog/services` (`service` =
    /// `None`) or `health/service/<service>` (and `catalog/service/<service>`) in `dc`.
    pub fn index(&self, dc: &str, service: Option<&str>) -> u64 {
        let key = service.map_or(Key::Catalog, |s| Key::Health(s.to_string()));
        self.shared.lock().index(dc, &key).max(1)
    }

    /// The `X-Consul-Index` the fake would answer now for `health/state/<state>` in `dc`.
    pub fn checks_index(&self, dc: &str) -> u64 {
        self.shared.lock().index(dc, &Key::Checks).max(1)
    }

    /// The `X-Consul-Index` the fake would answer now for `catalog/node-services/<node>` in
    /// `dc`.
    pub fn node_index(&self, dc: &str, node: &str) -> u64 {
        self.shared
            .lock()
            .index(dc, &Key::Node(node.to_string()))
            .max(1)
    }

    /// Successful `PUT /v1/catalog/register` requests so far (idempotent ones included).
    pub fn catalog_registers(&self) -> usize {
        self.shared.lock().catalog_registers
    }

    /// Successful `PUT /v1/catalog/deregister` requests so far (including those that found
    /// nothing to remove).
    pub fn catalog_deregisters(&self) -> usize {
        self.shared.lock().catalog_deregisters
    }

    /// The successful catalog writes received over HTTP, oldest first:
    /// `("register" | "deregister", node, service ID)` (the service ID a register gave its
    /// service after defaulting, or the `ServiceID` of a deregister; `None` when there was
    /// none). Keeps the last [`MAX_WRITE_LOG`]; writes through the Rust control are not
    /// logged.
    pub fn write_log(&self) -> Vec<WriteRecord> {
        self.shared.lock().write_log.iter().cloned().collect()
    }

    /// The raft-like counter (the index of the last mutation).
    pub fn raft_index(&self) -> u64 {
        self.shared.lock().raft
    }

    /// Every index (the counter and each endpoint's) jumps to `to`, as after a snapshot
    /// restore or when a new leader has older data; later changes continue from `to + 1`
    /// (at least 2, so that they differ from the minimum answer 1).
    /// Parked queries are woken (as a restore fires every watch) and return if their index no
    /// longer matches.
    pub fn reset_index(&self, to: u64) {
        {
            let mut st = self.shared.lock();
            st.raft = to;
            for v in st.indexes.values_mut() {
                *v = to;
            }
        }
        self.shared.notify();
    }

    /// Every parked blocking query returns now with unchanged data and the same
    /// `X-Consul-Index` (the blocking page warns that a return is no guarantee of a change).
    pub fn spurious_wakeup(&self) {
        self.shared.lock().spurious += 1;
        self.shared.notify();
    }

    /// Delay added before every response.
    pub fn set_latency(&self, d: Duration) {
        self.shared.lock().latency = d;
    }

    /// The next `n` requests answer `500` with body [`NO_LEADER`].
    pub fn fail_next(&self, n: usize) {
        self.shared.lock().fail_next = n;
    }

    /// While `Some`, every request (read or write) fails as the outage says.
    pub fn set_outage(&self, outage: Option<Outage>) {
        self.shared.lock().outage = outage;
    }

    /// While on, requests get no response at all (the client's own timeout has to end them).
    /// Requests held this way continue normally once it is turned off, if their client still
    /// waits.
    pub fn set_hang(&self, on: bool) {
        self.shared.lock().hang = on;
        self.shared.notify();
    }

    /// While on, requests that would succeed answer `200` with the usual headers and a body
    /// that is not valid JSON (and do not block). Catalog writes are still applied.
    pub fn set_malformed(&self, on: bool) {
        self.shared.lock().malformed = on;
    }

    /// While on, reads answer as to a token that lost its read rights: every list empty,
    /// with `X-Consul-Results-Filtered-By-ACLs: true` (Consul 1.11+: "most list endpoints
    /// support an `X-Consul-Results-Filtered-By-ACLs` HTTP response header", set when ACL
    /// filtering left results out — <https://developer.hashicorp.com/consul/api-docs/api-structure>,
    /// `agent/http.go` `setResultsFilteredByACLs`). Indexes still move with the store, as
    /// they do in Consul (the index is the table's, not the filtered result's).
    pub fn set_acl_hidden(&self, on: bool) {
        self.shared.lock().acl_hidden = on;
        self.shared.notify();
    }

    /// While on, requests for datacenter `dc` (by `?dc=` for reads, the body's `Datacenter`
    /// for writes, or the agent's own datacenter when absent) answer `500` with body
    /// [`NO_PATH_TO_DC`] (writes change nothing).
    pub fn set_dc_unreachable(&self, dc: &str, on: bool) {
        let mut st = self.shared.lock();
        if on {
            st.unreachable.insert(dc.to_string());
        } else {
            st.unreachable.remove(dc);
        }
    }

    /// With `Some(t)`, every request must carry `t` in `X-Consul-Token`, `?token=` or
    /// `Authorization: Bearer`, else it gets `403` with body [`ACL_NOT_FOUND`].
    pub fn require_token(&self, token: Option<&str>) {
        self.shared.lock().token = token.map(str::to_string);
    }

    /// Off (the default): a blocking query answers at once when its `index` differs from the
    /// current one, lower or higher. On: like Consul's servers, it waits while the current
    /// index is `<=` the requested one, so a client holding an index from before a
    /// [`reset_index`](Self::reset_index) blocks for its whole `wait` before seeing the lower
    /// index.
    pub fn set_strict_min_index(&self, on: bool) {
        self.shared.lock().strict_min_index = on;
        self.shared.notify();
    }

    /// Closes the listener and every open connection (parked and hanging requests end without
    /// a response). Data and settings are kept.
    pub async fn stop(&mut self) {
        if let Some((tx, task)) = self.server.take() {
            let _ = tx.send(());
            let _ = task.await;
        }
    }

    /// Listens again on the same address with the same data (stops first if running).
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut last = None;
        for _ in 0..100 {
            match TcpListener::bind(self.addr).await {
                Ok(l) => {
                    self.spawn(l);
                    return;
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("FakeConsul::restart: cannot bind {}: {last:?}", self.addr);
    }

    /// TCP connections open right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// The most TCP connections ever open at once.
    pub fn max_open_connections(&self) -> usize {
        self.shared.max_open.load(Ordering::SeqCst)
    }

    /// Blocking queries parked right now (waiting for a change).
    pub fn parked_queries(&self) -> usize {
        self.shared.parked.load(Ordering::SeqCst)
    }

    /// Requests received so far (counted on arrival, whatever their outcome).
    pub fn requests(&self) -> usize {
        self.shared.lock().requests
    }

    /// Response body bytes of successful reads so far whose path (without query) starts
    /// with `path_prefix` (`""` for all).
    #[allow(dead_code)] // read by benches/consul_churn.rs
    pub fn bytes_served_for(&self, path_prefix: &str) -> u64 {
        self.shared
            .lock()
            .bytes_by_path
            .iter()
            .filter(|(p, _)| p.starts_with(path_prefix))
            .map(|(_, n)| n)
            .sum()
    }

    /// Requests received so far whose path (without query) starts with `path_prefix`.
    pub fn requests_for(&self, path_prefix: &str) -> usize {
        self.shared
            .lock()
            .by_path
            .iter()
            .filter(|(p, _)| p.starts_with(path_prefix))
            .map(|(_, n)| n)
            .sum()
    }
}

impl Drop for FakeConsul {
    fn drop(&mut self) {
        if let Some((_tx, task)) = self.server.take() {
            // Dropping the task's future drops its JoinSet, which aborts every connection.
            task.abort();
        }
    }
}

/// Counts one open connection for as long as it lives.
struct ConnGuard(Arc<Shared>);

impl ConnGuard {
    fn new(shared: Arc<Shared>) -> Self {
        let now = shared.open.fetch_add(1, Ordering::SeqCst) + 1;
        shared.max_open.fetch_max(now, Ordering::SeqCst);
        ConnGuard(shared)
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Counts one parked query for as long as it lives.
struct ParkGuard(Arc<Shared>);

impl ParkGuard {
    fn new(shared: Arc<Shared>) -> Self {
        shared.parked.fetch_add(1, Ordering::SeqCst);
        ParkGuard(shared)
    }
}

impl Drop for ParkGuard {
    fn drop(&mut self) {
        self.0.parked.fetch_sub(1, Ordering::SeqCst);
    }
}

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
                let guard = ConnGuard::new(shared.clone());
                let shared = shared.clone();
                conns.spawn(async move {
                    let _guard = guard;
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

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, body: &str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn consul_json(index: u64, body: Bytes) -> Resp {
    let mut r = Response::new(Full::new(body));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    h.insert("X-Consul-Index", index.max(1).into());
    h.insert(
        "X-Consul-KnownLeader",
        header::HeaderValue::from_static("true"),
    );
    h.insert(
        "X-Consul-LastContact",
        header::HeaderValue::from_static("0"),
    );
    r
}

fn param<'a>(q: &'a [(String, String)], name: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// Parses a Go duration (`"5s"`, `"10m"`, `"100ms"`, `"1m30s"`, `"1.5h"`, `"0"`) as Consul
/// parses `wait`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let mut rest = s;
    if rest.is_empty() {
        return None;
    }
    let mut nanos = 0f64;
    while !rest.is_empty() {
        let n_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if n_end == 0 {
            return None;
        }
        let n: f64 = rest[..n_end].parse().ok()?;
        rest = &rest[n_end..];
        let u_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let unit = match &rest[..u_end] {
            "ns" => 1.0,
            "us" | "µs" | "μs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return None,
        };
        nanos += n * unit;
        rest = &rest[u_end..];
    }
    if !nanos.is_finite() || nanos > u64::MAX as f64 {
        return None;
    }
    Some(Duration::from_nanos(nanos as u64))
}

/// The time a blocking query may park: `wait` (0 or absent: 5 minutes, at most 10 minutes)
/// plus a random jitter of up to `wait / 16`, as the blocking-query page documents.
pub fn effective_wait(wait: Option<Duration>) -> Duration {
    let mut w = wait.unwrap_or(DEFAULT_WAIT);
    if w.is_zero() {
        w = DEFAULT_WAIT;
    }
    w = w.min(MAX_WAIT);
    let max_jitter = (w / 16).as_nanos() as u64;
    let jitter = if max_jitter == 0 {
        0
    } else {
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
            % max_jitter
    };
    w + Duration::from_nanos(jitter)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Resp {
    let path = req.uri().path().to_string();
    let query = parse_query(req.uri().query().unwrap_or(""));
    let latency = {
        let mut st = shared.lock();
        st.requests += 1;
        let key = if st.by_path.len() >= MAX_COUNTED_PATHS && !st.by_path.contains_key(&path) {
            "<other>".to_string()
        } else {
            path.clone()
        };
        *st.by_path.entry(key).or_insert(0) += 1;
        st.latency
    };
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    // Hang: no response while on. The connection stays open until the client gives up,
    // the hang is turned off, or the fake stops.
    let mut rx = shared.changed.subscribe();
    loop {
        rx.borrow_and_update();
        if !shared.lock().hang {
            break;
        }
        if rx.changed().await.is_err() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
        }
    }

    let (local_dc, token_ok, fail) = {
        let mut st = shared.lock();
        let fail = if st.fail_next > 0 {
            st.fail_next -= 1;
            Some(Outage::NoLeader)
        } else {
            st.outage
        };
        let token_ok = match &st.token {
            None => true,
            Some(want) => request_token(&req, &query).as_deref() == Some(want.as_str()),
        };
        (st.local_dc.clone(), token_ok, fail)
    };
    match fail {
        Some(Outage::NoLeader) => return text(StatusCode::INTERNAL_SERVER_ERROR, NO_LEADER),
        Some(Outage::RateLimited) => return text(StatusCode::TOO_MANY_REQUESTS, RATE_LIMITED),
        None => {}
    }
    if !token_ok {
        return text(StatusCode::FORBIDDEN, ACL_NOT_FOUND);
    }

    let read = if path == "/v1/agent/self" {
        None
    } else if path == "/v1/catalog/register" || path == "/v1/catalog/deregister" {
        if req.method() != Method::PUT {
            return method_not_allowed(req.method());
        }
        let register = path == "/v1/catalog/register";
        return handle_write(&shared, req.into_body(), register, &local_dc).await;
    } else if path == "/v1/catalog/services" {
        Some(Read::Catalog)
    } else if let Some(name) = path.strip_prefix("/v1/catalog/service/") {
        let name = percent_decode(name);
        if name.is_empty() {
            return text(StatusCode::BAD_REQUEST, "Missing service name");
        }
        Some(Read::CatalogService(name))
    } else if let Some(node) = path.strip_prefix("/v1/catalog/node-services/") {
        let node = percent_decode(node);
        if node.is_empty() {
            return text(StatusCode::BAD_REQUEST, "Missing node name");
        }
        Some(Read::NodeServices(node))
    } else if let Some(state) = path.strip_prefix("/v1/health/state/") {
        if !matches!(state, "any" | "passing" | "warning" | "critical") {
            return text(StatusCode::BAD_REQUEST, "Invalid check state");
        }
        Some(Read::State(state.to_string()))
    } else if let Some(name) = path.strip_prefix("/v1/health/service/") {
        let name = percent_decode(name);
        if name.is_empty() {
            return text(StatusCode::BAD_REQUEST, "Missing service name");
        }
        Some(Read::Health(name))
    } else {
        return text(StatusCode::NOT_FOUND, "404 page not found");
    };
    if req.method() != Method::GET {
        return method_not_allowed(req.method());
    }

    let Some(read) = read else {
        // `/v1/agent/self`.
        let st = shared.lock();
        if st.malformed {
            return consul_json(
                st.raft,
                Bytes::from_static(b"{\"Config\": {\"Datacenter\": "),
            );
        }
        return consul_json(st.raft, Bytes::from(agent_self(&st.local_dc).to_string()));
    };

    let dc = match param(&query, "dc") {
        Some(d) if !d.is_empty() => d.to_string(),
        _ => local_dc.clone(),
    };
    if shared.lock().unreachable.contains(&dc) {
        return text(StatusCode::INTERNAL_SERVER_ERROR, NO_PATH_TO_DC);
    }
    let malformed = shared.lock().malformed;

    let filter = match param(&query, "filter").filter(|f| !f.is_empty()) {
        None => None,
        Some(f) => {
            let roots = match &read {
                Read::Health(_) => HEALTH_ROOTS,
                Read::CatalogService(_) => CATALOG_SERVICE_ROOTS,
                Read::NodeServices(_) => NODE_SERVICE_ROOTS,
                Read::Catalog | Read::State(_) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("filter on {path} is not supported by the fake"),
                    );
                }
            };
            match Filter::parse_for(f, roots) {
                Ok(f) => Some(f),
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("Failed to create boolean expression evaluator: {e}"),
                    );
                }
            }
        }
    };
    let key = read.key();

    let index = match param(&query, "index") {
        None => None,
        Some(s) => match s.parse::<u64>() {
            Ok(i) => Some(i),
            Err(_) => return text(StatusCode::BAD_REQUEST, "Invalid index"),
        },
    };
    let wait = match param(&query, "wait") {
        None => None,
        Some(s) => match parse_go_duration(s) {
            Some(w) => Some(w),
            None => return text(StatusCode::BAD_REQUEST, "Invalid wait time"),
        },
    };

    if malformed {
        let idx = shared.lock().index(&dc, &key);
        return consul_json(idx, Bytes::from_static(b"[{\"Node\": {\"Node\": \"x\""));
    }

    if let Some(want) = index.filter(|&i| i > 0) {
        block(&shared, &dc, &key, want, effective_wait(wait)).await;
    }

    let passing = match param(&query, "passing") {
        None => false,
        Some(v) => !matches!(v, "false" | "0" | "f" | "F" | "FALSE" | "False"),
    };
    let tags: Vec<&str> = query
        .iter()
        .filter(|(k, _)| k == "tag")
        .map(|(_, v)| v.as_str())
        .collect();
    let keep = |v: &Value| filter.as_ref().is_none_or(|f| f.eval(v));
    let has_tags = |s: &SvcInfo| tags.iter().all(|t| s.tags.iter().any(|x| x == t));

    let st = shared.lock();
    let idx = st.index(&dc, &key);
    let nodes = st.nodes(&dc);
    let hidden = st.acl_hidden;
    let body = match &read {
        Read::Catalog if hidden => json!({}),
        Read::NodeServices(_) if hidden => json!({"Node": null, "Services": null}),
        _ if hidden => json!([]),
        Read::Catalog => catalog_services(nodes),
        Read::State(state) => {
            let mut out = Vec::new();
            for (name, n) in nodes.into_iter().flatten() {
                for (id, c) in &n.checks {
                    if state == "any" || c.v.status.as_str() == state {
                        out.push(check_json(name, n, id, c));
                    }
                }
            }
            Value::Array(out)
        }
        Read::Health(name) | Read::CatalogService(name) => {
            let synthetic = (name == "consul").then(|| synthetic_consul(&st, &dc));
            let mut rows = service_rows(nodes, name);
            if let Some((node_name, node)) = &synthetic {
                rows.push((node_name.as_str(), node, "consul"));
            }
            rows.sort_by(|a, b| (a.0, a.2).cmp(&(b.0, b.2)));
            let health = matches!(read, Read::Health(_));
            let mut out = Vec::new();
            for (node_name, n, id) in rows {
                let s = &n.services[id];
                if !has_tags(&s.v) || (health && passing && n.health_of(id) != Health::Passing) {
                    continue;
                }
                let v = if health {
                    health_json(&dc, node_name, n, id)
                } else {
                    catalog_service_json(&dc, node_name, n, id)
                };
                if keep(&v) {
                    out.push(v);
                }
            }
            Value::Array(out)
        }
        Read::NodeServices(node) => match nodes.and_then(|m| m.get(node)) {
            None => json!({"Node": null, "Services": null}),
            Some(n) => {
                let services: Vec<Value> = n
                    .services
                    .iter()
                    .map(|(id, s)| service_json(id, s))
                    .filter(|v| keep(v))
                    .collect();
                json!({
                    "Node": node_json(&dc, node, n),
                    // A nil slice in Consul when the node has no services.
                    "Services": if n.services.is_empty() { Value::Null } else { Value::Array(services) },
                })
            }
        },
    };
    drop(st);
    let body = Bytes::from(body.to_string());
    let mut st = shared.lock();
    let key =
        if st.bytes_by_path.len() >= MAX_COUNTED_PATHS && !st.bytes_by_path.contains_key(&path) {
            "<other>".to_string()
        } else {
            path
        };
    *st.bytes_by_path.entry(key).or_insert(0) += body.len() as u64;
    let mut r = consul_json(idx, body);
    if hidden {
        r.headers_mut().insert(
            "X-Consul-Results-Filtered-By-ACLs",
            header::HeaderValue::from_static("true"),
        );
    }
    r
}

/// A blocking read endpoint.
enum Read {
    Catalog,
    CatalogService(String),
    NodeServices(String),
    Health(String),
    State(String),
}

impl Read {
    fn key(&self) -> Key {
        match self {
            Read::Catalog => Key::Catalog,
            Read::CatalogService(name) | Read::Health(name) => Key::Health(name.clone()),
            Read::NodeServices(node) => Key::Node(node.clone()),
            Read::State(_) => Key::Checks,
        }
    }
}

fn method_not_allowed(method: &Method) -> Resp {
    text(
        StatusCode::METHOD_NOT_ALLOWED,
        &format!("method {method} not allowed"),
    )
}

/// `PUT /v1/catalog/register` (`register`) or `PUT /v1/catalog/deregister`.
async fn handle_write(
    shared: &Arc<Shared>,
    body: Incoming,
    register: bool,
    local_dc: &str,
) -> Resp {
    let decode_failed = |e: &str| {
        text(
            StatusCode::BAD_REQUEST,
            &format!("Request decode failed: {e}"),
        )
    };
    let bytes = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return decode_failed(&e.to_string()),
    };
    let v: Value = match serde_json::from_slice(&bytes) {
        Ok(v) => v,
        Err(e) => return decode_failed(&e.to_string()),
    };
    let write = if register {
        parse_register(&v).map(|r| Write::Register(Box::new(r)))
    } else {
        parse_deregister(&v).map(Write::Deregister)
    };
    let write = match write {
        Ok(w) => w,
        Err(e) => return decode_failed(&e),
    };
    let (result, malformed) = {
        let mut st = shared.lock();
        let dc = write
            .datacenter()
            .filter(|d| !d.is_empty())
            .unwrap_or(local_dc)
            .to_string();
        if st.unreachable.contains(&dc) {
            return text(StatusCode::INTERNAL_SERVER_ERROR, NO_PATH_TO_DC);
        }
        let result = match &write {
            Write::Register(r) => apply_register(&mut st, &dc, r),
            Write::Deregister(d) => apply_deregister(&mut st, &dc, d),
        };
        if result.is_ok() {
            match &write {
                Write::Register(r) => {
                    let id = r.service.as_ref().map(|s| s.id.as_str());
                    st.log_write("register", &r.node, id);
                }
                Write::Deregister(d) => {
                    let id = Some(d.service_id.as_str()).filter(|s| !s.is_empty());
                    st.log_write("deregister", &d.node, id);
                }
            }
        }
        (result, st.malformed)
    };
    match result {
        Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, &e),
        Ok(changed) => {
            if changed {
                shared.notify();
            }
            let mut r = Response::new(Full::new(Bytes::from_static(if malformed {
                b"tru"
            } else {
                b"true"
            })));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/json"),
            );
            r
        }
    }
}

/// A decoded catalog write.
enum Write {
    Register(Box<RegisterReq>),
    Deregister(DeregisterReq),
}

impl Write {
    fn datacenter(&self) -> Option<&str> {
        match self {
            Write::Register(r) => r.datacenter.as_deref(),
            Write::Deregister(d) => d.datacenter.as_deref(),
        }
    }
}

/// The body of `PUT /v1/catalog/register` (Consul's `structs.RegisterRequest`).
struct RegisterReq {
    datacenter: Option<String>,
    id: String,
    node: String,
    address: String,
    tagged: BTreeMap<String, String>,
    node_meta: BTreeMap<String, String>,
    service: Option<ServiceReq>,
    /// `Check` followed by `Checks`.
    checks: Vec<CheckReq>,
    skip_node_update: bool,
}

struct ServiceReq {
    /// After defaulting to the name.
    id: String,
    name: String,
    tags: Vec<String>,
    address: String,
    port: u16,
    meta: BTreeMap<String, String>,
    weights: (u32, u32),
}

struct CheckReq {
    node: String,
    check_id: String,
    name: String,
    status: String,
    notes: String,
    output: String,
    service_id: String,
    kind: String,
}

/// The body of `PUT /v1/catalog/deregister` (Consul's `structs.DeregisterRequest`).
struct DeregisterReq {
    datacenter: Option<String>,
    node: String,
    service_id: String,
    check_id: String,
}

type Obj = serde_json::Map<String, Value>;

/// Field `name` of `o`, matched case-insensitively as Go's `encoding/json` does; `null` is
/// absent.
fn field<'a>(o: &'a Obj, name: &str) -> Option<&'a Value> {
    o.get(name)
        .or_else(|| {
            o.iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v)
        })
        .filter(|v| !v.is_null())
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn type_error(name: &str, want: &str, v: &Value) -> String {
    format!(
        "json: cannot unmarshal {} into Go struct field .{name} of type {want}",
        kind_of(v)
    )
}

fn as_obj<'a>(v: &'a Value, name: &str, go_type: &str) -> Result<&'a Obj, String> {
    v.as_object().ok_or_else(|| type_error(name, go_type, v))
}

fn get_str(o: &Obj, name: &str) -> Result<String, String> {
    match field(o, name) {
        None => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(v) => Err(type_error(name, "string", v)),
    }
}

fn get_bool(o: &Obj, name: &str) -> Result<bool, String> {
    match field(o, name) {
        None => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(type_error(name, "bool", v)),
    }
}

fn get_int(o: &Obj, name: &str) -> Result<i64, String> {
    match field(o, name) {
        None => Ok(0),
        Some(v) => v.as_i64().ok_or_else(|| type_error(name, "int", v)),
    }
}

fn get_strs(o: &Obj, name: &str) -> Result<Vec<String>, String> {
    match field(o, name) {
        None => Ok(Vec::new()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| type_error(name, "string", x))
            })
            .collect(),
        Some(v) => Err(type_error(name, "[]string", v)),
    }
}

fn get_str_map(o: &Obj, name: &str) -> Result<BTreeMap<String, String>, String> {
    match field(o, name) {
        None => Ok(BTreeMap::new()),
        Some(Value::Object(m)) => m
            .iter()
            .map(|(k, x)| {
                x.as_str()
                    .map(|s| (k.clone(), s.to_string()))
                    .ok_or_else(|| type_error(name, "string", x))
            })
            .collect(),
        Some(v) => Err(type_error(name, "map[string]string", v)),
    }
}

fn parse_register(v: &Value) -> Result<RegisterReq, String> {
    let o = as_obj(v, "", "structs.RegisterRequest")?;
    let service = match field(o, "Service") {
        None => None,
        Some(s) => {
            let s = as_obj(s, "Service", "structs.NodeService")?;
            let name = get_str(s, "Service")?;
            let mut id = get_str(s, "ID")?;
            if id.is_empty() {
                id = name.clone();
            }
            let port = get_int(s, "Port")?;
            let port =
                u16::try_from(port).map_err(|_| format!("Service.Port {port} is out of range"))?;
            // Consul's ToServiceNode: invalid or absent weights become 1/1.
            let weights = match field(s, "Weights") {
                None => (1, 1),
                Some(w) => {
                    let w = as_obj(w, "Weights", "structs.Weights")?;
                    let (p, wa) = (get_int(w, "Passing")?, get_int(w, "Warning")?);
                    match (u32::try_from(p), u32::try_from(wa)) {
                        (Ok(p), Ok(wa)) if p >= 1 => (p, wa),
                        _ => (1, 1),
                    }
                }
            };
            Some(ServiceReq {
                id,
                name,
                tags: get_strs(s, "Tags")?,
                address: get_str(s, "Address")?,
                port,
                meta: get_str_map(s, "Meta")?,
                weights,
            })
        }
    };
    let mut check_values: Vec<&Value> = field(o, "Check").into_iter().collect();
    match field(o, "Checks") {
        None => {}
        Some(Value::Array(a)) => check_values.extend(a.iter().filter(|c| !c.is_null())),
        Some(other) => return Err(type_error("Checks", "structs.HealthChecks", other)),
    }
    let mut checks = Vec::new();
    for c in check_values {
        let c = as_obj(c, "Check", "structs.HealthCheck")?;
        let kind = match get_str(c, "Type")? {
            t if !t.is_empty() => t,
            _ => match field(c, "Definition").and_then(Value::as_object) {
                // Consul derives the type of a catalog-registered check from its definition.
                Some(d) => ["HTTP", "TCP", "UDP", "GRPC", "H2PING"]
                    .iter()
                    .find(|k| field(d, k).is_some_and(|x| x.as_str().is_none_or(|s| !s.is_empty())))
                    .map_or(String::new(), |k| k.to_ascii_lowercase()),
                None => String::new(),
            },
        };
        checks.push(CheckReq {
            node: get_str(c, "Node")?,
            check_id: get_str(c, "CheckID")?,
            name: get_str(c, "Name")?,
            status: get_str(c, "Status")?,
            notes: get_str(c, "Notes")?,
            output: get_str(c, "Output")?,
            service_id: get_str(c, "ServiceID")?,
            kind,
        });
    }
    Ok(RegisterReq {
        datacenter: field(o, "Datacenter")
            .map(|_| get_str(o, "Datacenter"))
            .transpose()?,
        id: get_str(o, "ID")?,
        node: get_str(o, "Node")?,
        address: get_str(o, "Address")?,
        tagged: get_str_map(o, "TaggedAddresses")?,
        node_meta: get_str_map(o, "NodeMeta")?,
        service,
        checks,
        skip_node_update: get_bool(o, "SkipNodeUpdate")?,
    })
}

fn parse_deregister(v: &Value) -> Result<DeregisterReq, String> {
    let o = as_obj(v, "", "structs.DeregisterRequest")?;
    Ok(DeregisterReq {
        datacenter: field(o, "Datacenter")
            .map(|_| get_str(o, "Datacenter"))
            .transpose()?,
        node: get_str(o, "Node")?,
        service_id: get_str(o, "ServiceID")?,
        check_id: get_str(o, "CheckID")?,
    })
}

fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.char_indices().all(|(i, c)| {
            if matches!(i, 8 | 13 | 18 | 23) {
                c == '-'
            } else {
                c.is_ascii_hexdigit()
            }
        })
}

/// Validates and applies a register as Consul's `Catalog.Register` and state store do.
/// `Err` is the message of Consul's 500; `Ok` says whether anything changed.
fn apply_register(st: &mut State, dc: &str, r: &RegisterReq) -> Result<bool, String> {
    if r.node.is_empty() {
        return Err("Must provide node".to_string());
    }
    if !r.id.is_empty() && !is_uuid(&r.id) {
        return Err(format!("Bad node ID: {:?} is not a UUID", r.id));
    }
    if r.address.is_empty() && !r.skip_node_update {
        return Err("Must provide address if SkipNodeUpdate is not set".to_string());
    }
    if let Some(s) = &r.service {
        if s.name.is_empty() {
            return Err(
                "Must provide service name (Service.Service) when service ID is provided"
                    .to_string(),
            );
        }
        if matches!(s.address.as_str(), "0.0.0.0" | "::" | "[::]") {
            return Err("Invalid service address".to_string());
        }
    }
    let existing = st.nodes(dc).and_then(|m| m.get(&r.node));
    let mut c = existing.map_or_else(|| NodeContent::bare(&r.node), Node::content);
    if existing.is_none() || !r.skip_node_update {
        let id = if r.id.is_empty() {
            c.info.id.clone()
        } else {
            r.id.clone()
        };
        c.info = NodeInfo {
            id,
            address: r.address.clone(),
            tagged: r.tagged.clone(),
            meta: r.node_meta.clone(),
        };
    }
    if let Some(s) = &r.service {
        c.services.insert(
            s.id.clone(),
            SvcInfo {
                name: s.name.clone(),
                address: s.address.clone(),
                port: s.port,
                tags: s.tags.clone(),
                meta: s.meta.clone(),
                weights: s.weights,
            },
        );
    }
    for ch in &r.checks {
        if !ch.node.is_empty() && !ch.node.eq_ignore_ascii_case(&r.node) {
            return Err(format!(
                "Node '{}' for check '{}' doesn't match register request node '{}'",
                ch.node, ch.check_id, r.node
            ));
        }
        let check_id = if ch.check_id.is_empty() {
            ch.name.clone()
        } else {
            ch.check_id.clone()
        };
        if check_id.is_empty() {
            return Err("Missing check ID (CheckID or Name)".to_string());
        }
        let status = if ch.status.is_empty() {
            Health::Critical
        } else {
            Health::parse(&ch.status).ok_or_else(|| {
                format!(
                    "Invalid check status {:?}: must be passing, warning or critical",
                    ch.status
                )
            })?
        };
        if !ch.service_id.is_empty() && !c.services.contains_key(&ch.service_id) {
            return Err("Missing service registration".to_string());
        }
        c.checks.insert(
            check_id,
            CheckInfo {
                name: ch.name.clone(),
                status,
                notes: ch.notes.clone(),
                output: ch.output.clone(),
                service_id: ch.service_id.clone(),
                kind: ch.kind.clone(),
            },
        );
    }
    let change = Change {
        node: r.node.clone(),
        new: Some(c),
        implicit: false,
    };
    Ok(commit(st, dc, vec![change]))
}

/// Applies a deregister as Consul does: `ServiceID` first, else `CheckID`, else the node.
fn apply_deregister(st: &mut State, dc: &str, d: &DeregisterReq) -> Result<bool, String> {
    if d.node.is_empty() {
        return Err("Must provide node".to_string());
    }
    let Some(n) = st.nodes(dc).and_then(|m| m.get(&d.node)) else {
        return Ok(false);
    };
    let implicit = n.implicit;
    let new = if !d.service_id.is_empty() {
        if !n.services.contains_key(&d.service_id) {
            return Ok(false);
        }
        let mut c = n.content();
        c.remove_service(&d.service_id);
        Some(c)
    } else if !d.check_id.is_empty() {
        let mut c = n.content();
        c.checks.remove(&d.check_id);
        Some(c)
    } else {
        None
    };
    let change = Change {
        node: d.node.clone(),
        new,
        implicit,
    };
    Ok(commit(st, dc, vec![change]))
}

fn request_token(req: &Request<Incoming>, query: &[(String, String)]) -> Option<String> {
    if let Some(t) = req
        .headers()
        .get("X-Consul-Token")
        .and_then(|v| v.to_str().ok())
    {
        return Some(t.to_string());
    }
    if let Some(t) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim().to_string());
    }
    param(query, "token").map(str::to_string)
}

/// Parks until the index of `key` no longer matches `want` (strict mode: exceeds it), a
/// spurious wakeup, or `wait` elapses.
async fn block(shared: &Arc<Shared>, dc: &str, key: &Key, want: u64, wait: Duration) {
    let mut rx = shared.changed.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    let spurious0 = shared.lock().spurious;
    let mut guard = None;
    loop {
        rx.borrow_and_update();
        {
            let st = shared.lock();
            let cur = st.index(dc, key).max(1);
            let done = if st.strict_min_index {
                cur > want
            } else {
                cur != want
            };
            if done || st.spurious != spurious0 {
                return;
            }
        }
        if guard.is_none() {
            guard = Some(ParkGuard::new(shared.clone()));
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(deadline) => return,
        }
    }
}

fn agent_self(dc: &str) -> Value {
    json!({
        "Config": {
            "Datacenter": dc,
            "PrimaryDatacenter": dc,
            "NodeName": AGENT_NODE,
            "NodeID": node_id(AGENT_NODE),
            "Revision": "fake",
            "Server": false,
            "Version": "1.21.0",
            "BuildDate": "2025-01-01T00:00:00Z"
        },
        "DebugConfig": {},
        "Coord": {"Vec": [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], "Error": 1.5, "Adjustment": 0.0, "Height": 1e-5},
        "Member": {
            "Name": AGENT_NODE,
            "Addr": "127.0.0.1",
            "Port": 8301,
            "Tags": {
                "build": "1.21.0:fake",
                "dc": dc,
                "id": node_id(AGENT_NODE),
                "role": "node",
                "segment": "",
                "vsn": "2",
                "vsn_max": "3",
                "vsn_min": "2"
            },
            "Status": 1,
            "ProtocolMin": 1,
            "ProtocolMax": 5,
            "ProtocolCur": 2,
            "DelegateMin": 2,
            "DelegateMax": 5,
            "DelegateCur": 4
        },
        "Meta": {"consul-network-segment": ""},
        "Stats": {}
    })
}

fn catalog_services(nodes: Option<&BTreeMap<String, Node>>) -> Value {
    let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
    services.insert("consul".to_string(), Vec::new());
    for n in nodes.into_iter().flat_map(|m| m.values()) {
        for s in n.services.values() {
            let tags = services.entry(s.v.name.clone()).or_default();
            for t in &s.v.tags {
                if !tags.contains(t) {
                    tags.push(t.clone());
                }
            }
        }
    }
    for tags in services.values_mut() {
        tags.sort();
    }
    json!(services)
}

/// The instances of service `name`: (node name, node, service ID).
fn service_rows<'a>(
    nodes: Option<&'a BTreeMap<String, Node>>,
    name: &str,
) -> Vec<(&'a str, &'a Node, &'a str)> {
    let mut out = Vec::new();
    for (node_name, n) in nodes.into_iter().flatten() {
        for (id, s) in &n.services {
            if s.v.name == name {
                out.push((node_name.as_str(), n, id.as_str()));
            }
        }
    }
    out
}

/// The datacenter's (synthetic) server and its `consul` instance, listed by the `consul`
/// service as a real agent lists its servers.
fn synthetic_consul(st: &State, dc: &str) -> (String, Node) {
    let node = if dc == st.local_dc {
        AGENT_NODE.to_string()
    } else {
        format!("fake-server-{dc}")
    };
    let mut c = NodeContent::agent(&node, "127.0.0.1");
    c.services.insert(
        "consul".to_string(),
        SvcInfo {
            name: "consul".to_string(),
            address: String::new(),
            port: 8300,
            tags: Vec::new(),
            meta: BTreeMap::new(),
            weights: (1, 1),
        },
    );
    c.checks.insert(
        "service:consul".to_string(),
        CheckInfo {
            name: "Service 'consul' check".to_string(),
            status: Health::Passing,
            notes: String::new(),
            output: String::new(),
            service_id: "consul".to_string(),
            kind: "ttl".to_string(),
        },
    );
    let n = Node::merge(None, c, true, 1);
    (node, n)
}

/// The tagged addresses an agent gives its node.
fn agent_tagged(address: &str) -> BTreeMap<String, String> {
    ["lan", "lan_ipv4", "wan", "wan_ipv4"]
        .iter()
        .map(|k| (k.to_string(), address.to_string()))
        .collect()
}

/// Filter selectors of `/v1/health/service` (the entry's top-level fields).
const HEALTH_ROOTS: &[&str] = &["Node", "Service", "Checks"];
/// Filter selectors of `/v1/catalog/service`.
const CATALOG_SERVICE_ROOTS: &[&str] = &[
    "ID",
    "Node",
    "Address",
    "Datacenter",
    "TaggedAddresses",
    "NodeMeta",
    "ServiceKind",
    "ServiceID",
    "ServiceName",
    "ServiceTags",
    "ServiceAddress",
    "ServiceWeights",
    "ServiceMeta",
    "ServicePort",
    "ServiceEnableTagOverride",
    "ServiceProxy",
    "ServiceConnect",
];
/// Filter selectors of `/v1/catalog/node-services` (each service's fields).
const NODE_SERVICE_ROOTS: &[&str] = &[
    "ID",
    "Service",
    "Tags",
    "Address",
    "Meta",
    "Port",
    "Weights",
    "Kind",
    "EnableTagOverride",
    "Proxy",
    "Connect",
];

fn node_json(dc: &str, name: &str, n: &Node) -> Value {
    let i = &n.info.v;
    json!({
        "ID": i.id,
        "Node": name,
        "Address": i.address,
        "Datacenter": dc,
        "TaggedAddresses": i.tagged,
        "Meta": i.meta,
        "CreateIndex": n.info.create,
        "ModifyIndex": n.info.modify
    })
}

/// A `NodeService` (`Service` of a health entry, an element of `node-services`).
fn service_json(id: &str, s: &Indexed<SvcInfo>) -> Value {
    let v = &s.v;
    json!({
        "Kind": "",
        "ID": id,
        "Service": v.name,
        "Tags": v.tags,
        "Address": v.address,
        "Meta": v.meta,
        "Port": v.port,
        "Weights": {"Passing": v.weights.0, "Warning": v.weights.1},
        "EnableTagOverride": false,
        "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
        "Connect": {},
        "PeerName": "",
        "CreateIndex": s.create,
        "ModifyIndex": s.modify
    })
}

fn check_json(node: &str, n: &Node, id: &str, c: &Indexed<CheckInfo>) -> Value {
    let svc = n.services.get(&c.v.service_id).map(|s| &s.v);
    json!({
        "Node": node,
        "CheckID": id,
        "Name": c.v.name,
        "Status": c.v.status.as_str(),
        "Notes": c.v.notes,
        "Output": c.v.output,
        "ServiceID": c.v.service_id,
        "ServiceName": svc.map_or("", |s| s.name.as_str()),
        "ServiceTags": svc.map_or(&[][..], |s| s.tags.as_slice()),
        "Type": c.v.kind,
        "Interval": "",
        "Timeout": "",
        "ExposedPort": 0,
        "Definition": {},
        "CreateIndex": c.create,
        "ModifyIndex": c.modify
    })
}

/// An entry of `/v1/health/service/<name>`: the node, the instance, and the node's checks
/// and the instance's, in check ID order.
fn health_json(dc: &str, node: &str, n: &Node, id: &str) -> Value {
    let checks: Vec<Value> = n
        .checks_of(id)
        .map(|(cid, c)| check_json(node, n, cid, c))
        .collect();
    json!({
        "Node": node_json(dc, node, n),
        "Service": service_json(id, &n.services[id]),
        "Checks": checks
    })
}

/// An entry of `/v1/catalog/service/<name>` (Consul's `ServiceNode`).
fn catalog_service_json(dc: &str, node: &str, n: &Node, id: &str) -> Value {
    let i = &n.info.v;
    let s = &n.services[id];
    json!({
        "ID": i.id,
        "Node": node,
        "Address": i.address,
        "Datacenter": dc,
        "TaggedAddresses": i.tagged,
        "NodeMeta": i.meta,
        "ServiceKind": "",
        "ServiceID": id,
        "ServiceName": s.v.name,
        "ServiceTags": s.v.tags,
        "ServiceAddress": s.v.address,
        "ServiceWeights": {"Passing": s.v.weights.0, "Warning": s.v.weights.1},
        "ServiceMeta": s.v.meta,
        "ServicePort": s.v.port,
        "ServiceSocketPath": "",
        "ServiceEnableTagOverride": false,
        "ServiceProxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
        "ServiceConnect": {},
        "ServicePeerName": "",
        "CreateIndex": s.create,
        "ModifyIndex": s.modify
    })
}

/// A stable UUID-shaped node ID derived from the node name.
fn node_id(node: &str) -> String {
    // FNV-1a, twice with different offsets, for 128 bits.
    let fnv = |seed: u64| {
        let mut h = seed;
        for b in node.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h
    };
    let a = fnv(0xcbf2_9ce4_8422_2325);
    let b = fnv(0x8422_2325_cbf2_9ce4);
    format!(
        "{:08x}-{:04x}-{:04x}-{:04x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xffff,
        b >> 48,
        b & 0xffff_ffff_ffff
    )
}

/// The subset of Consul's filter language (go-bexpr) the fake understands: clauses joined by
/// `and` / `or` (`and` binds tighter; no parentheses, no `not` prefix), each one of
/// `Sel == "v"`, `Sel != "v"`, `"v" in Sel`, `"v" not in Sel`, `Sel contains "v"`,
/// `Sel not contains "v"`, `Sel is empty`, `Sel is not empty`, where `Sel` is a dotted path
/// into the entry (`Service.Meta.version`, `Service.Tags`, `Node.Datacenter`, ...). Anything
/// else is refused with 400 rather than ignored.
#[derive(Debug, Clone)]
pub struct Filter {
    /// Disjunction of conjunctions.
    any: Vec<Vec<Clause>>,
}

#[derive(Debug, Clone)]
enum Clause {
    Eq(Vec<String>, String, bool),
    In(String, Vec<String>, bool),
    Empty(Vec<String>, bool),
}

impl Filter {
    /// A filter whose selectors must start with one of `roots`.
    pub fn parse_for(src: &str, roots: &[&str]) -> Result<Filter, String> {
        let tokens = tokenize(src)?;
        let mut any = Vec::new();
        let mut all = Vec::new();
        let mut cur: Vec<Tok> = Vec::new();
        let flush = |cur: &mut Vec<Tok>, all: &mut Vec<Clause>| -> Result<(), String> {
            all.push(Clause::parse(cur, roots)?);
            cur.clear();
            Ok(())
        };
        for t in tokens {
            match &t {
                Tok::Word(w) if w == "and" => flush(&mut cur, &mut all)?,
                Tok::Word(w) if w == "or" => {
                    flush(&mut cur, &mut all)?;
                    any.push(std::mem::take(&mut all));
                }
                _ => cur.push(t),
            }
        }
        flush(&mut cur, &mut all)?;
        any.push(all);
        Ok(Filter { any })
    }

    pub fn eval(&self, v: &Value) -> bool {
        self.any.iter().any(|all| all.iter().all(|c| c.eval(v)))
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Word(String),
    Str(String),
}

fn tokenize(src: &str) -> Result<Vec<Tok>, String> {
    let mut out = Vec::new();
    let mut chars = src.chars().peekable();
    while let Some(&c) = chars.peek() {
        if c.is_whitespace() {
            chars.next();
        } else if c == '"' || c == '`' {
            chars.next();
            let mut s = String::new();
            loop {
                match chars.next() {
                    None => return Err(format!("unterminated string in {src:?}")),
                    Some('\\') if c == '"' => match chars.next() {
                        Some(e) => s.push(e),
                        None => return Err(format!("unterminated string in {src:?}")),
                    },
                    Some(x) if x == c => break,
                    Some(x) => s.push(x),
                }
            }
            out.push(Tok::Str(s));
        } else if c == '(' || c == ')' {
            return Err("parentheses are not supported by the fake".to_string());
        } else {
            let mut w = String::new();
            while let Some(&x) = chars.peek() {
                if x.is_whitespace() || x == '"' || x == '`' {
                    break;
                }
                w.push(x);
                chars.next();
            }
            out.push(Tok::Word(w));
        }
    }
    Ok(out)
}

fn selector(t: &Tok, roots: &[&str]) -> Result<Vec<String>, String> {
    match t {
        Tok::Word(w)
            if roots
                .iter()
                .any(|root| w == root || w.starts_with(&format!("{root}."))) =>
        {
            Ok(w.split('.').map(str::to_string).collect())
        }
        other => Err(format!("Selector {other:?} is not valid")),
    }
}

fn literal(t: &Tok) -> Result<String, String> {
    match t {
        Tok::Str(s) => Ok(s.clone()),
        Tok::Word(w)
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_') =>
        {
            Ok(w.clone())
        }
        other => Err(format!("expected a value, found {other:?}")),
    }
}

impl Clause {
    fn parse(t: &[Tok], roots: &[&str]) -> Result<Clause, String> {
        let w = |i: usize, s: &str| matches!(t.get(i), Some(Tok::Word(x)) if x == s);
        match t.len() {
            3 if w(1, "==") => Ok(Clause::Eq(selector(&t[0], roots)?, literal(&t[2])?, true)),
            3 if w(1, "!=") => Ok(Clause::Eq(selector(&t[0], roots)?, literal(&t[2])?, false)),
            3 if w(1, "in") => Ok(Clause::In(literal(&t[0])?, selector(&t[2], roots)?, true)),
            4 if w(1, "not") && w(2, "in") => {
                Ok(Clause::In(literal(&t[0])?, selector(&t[3], roots)?, false))
            }
            3 if w(1, "contains") => Ok(Clause::In(literal(&t[2])?, selector(&t[0], roots)?, true)),
            4 if w(1, "not") && w(2, "contains") => {
                Ok(Clause::In(literal(&t[3])?, selector(&t[0], roots)?, false))
            }
            3 if w(1, "is") && w(2, "empty") => Ok(Clause::Empty(selector(&t[0], roots)?, true)),
            4 if w(1, "is") && w(2, "not") && w(3, "empty") => {
                Ok(Clause::Empty(selector(&t[0], roots)?, false))
            }
            _ => Err(format!("unsupported expression {t:?}")),
        }
    }

    fn eval(&self, v: &Value) -> bool {
        let lookup = |path: &[String]| {
            let mut cur = v;
            for p in path {
                cur = cur.get(p)?;
            }
            Some(cur)
        };
        let as_text = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => None,
        };
        match self {
            Clause::Eq(path, want, eq) => {
                let got = lookup(path).and_then(as_text);
                (got.as_deref() == Some(want.as_str())) == *eq
            }
            Clause::In(needle, path, yes) => {
                let found = match lookup(path) {
                    Some(Value::Array(a)) => {
                        a.iter().any(|x| as_text(x).as_deref() == Some(needle))
                    }
                    Some(Value::Object(o)) => o.contains_key(needle),
                    Some(Value::String(s)) => s.contains(needle.as_str()),
                    _ => false,
                };
                found == *yes
            }
            Clause::Empty(path, yes) => {
                let empty = match lookup(path) {
                    None | Some(Value::Null) => true,
                    Some(Value::Array(a)) => a.is_empty(),
                    Some(Value::Object(o)) => o.is_empty(),
                    Some(Value::String(s)) => s.is_empty(),
                    Some(_) => false,
                };
                empty == *yes
            }
        }
    }
}
