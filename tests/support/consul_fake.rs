//! An in-process fake of the parts of the Consul HTTP API that a service-discovery client
//! uses: the agent's own configuration, the catalog's service list and the health of a
//! service's instances, all with blocking queries. It serves real HTTP/1.1 on 127.0.0.1 so a
//! client under test talks to it exactly as it would to a Consul agent, and it can misbehave on
//! demand (errors, latency, hangs, malformed bodies, unreachable datacenters, ACLs, restarts).
//!
//! Include it from a test crate with `mod support { pub mod consul_fake; }` or
//! `#[path = "support/consul_fake.rs"] mod consul_fake;`.
//!
//! Semantics follow the published API:
//! - blocking queries: <https://developer.hashicorp.com/consul/api-docs/features/blocking>
//! - `GET /v1/catalog/services`:
//!   <https://developer.hashicorp.com/consul/api-docs/catalog#list-services>
//! - `GET /v1/health/service/:service`:
//!   <https://developer.hashicorp.com/consul/api-docs/health#list-service-instances-for-service>
//! - `GET /v1/agent/self`:
//!   <https://developer.hashicorp.com/consul/api-docs/agent#read-configuration>
//!
//! Indexes: one raft-like counter increments on every mutation (in any datacenter). Each
//! (datacenter, endpoint, service) has the counter's value at the last change that affected
//! it: `catalog/services` moves on any registration change in its datacenter, and
//! `health/service/<name>` on any change of that service's instances or their health. A
//! returned `X-Consul-Index` is never 0 (the minimum is 1), as the blocking-query page asks of
//! servers. Idempotent writes (re-registering an identical instance, setting the same health)
//! change nothing, as in Consul's state store.
//!
//! Everything is bounded: request counters per path are capped, a parked query ends at its
//! `wait` (at most 10 minutes plus jitter), and `stop()` ends every connection.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::convert::Infallible;
use std::hash::{BuildHasher, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

/// Body of the 500 answered by [`FakeConsul::fail_next`] (what a Consul agent says while its
/// servers have no leader).
pub const NO_LEADER: &str = "rpc error: No cluster leader";
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
/// Distinct request paths counted individually (later ones are counted under `"<other>"`).
const MAX_COUNTED_PATHS: usize = 4096;

/// The aggregated status of an instance's service check.
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
}

/// One service instance registered on one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub service: String,
    /// Service ID, unique within a datacenter in this fake.
    pub id: String,
    pub node: String,
    pub node_address: String,
    /// `Service.Address`; may be empty, in which case clients are expected to use
    /// `Node.Address` (as with real Consul).
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
    /// `Service.Weights.Passing` (Consul's default is 1). `Weights.Warning` is always 1.
    pub weight_passing: u32,
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
    Catalog,
    Health(String),
    /// Every check of the datacenter (`/v1/health/state/<state>`).
    Checks,
}

#[derive(Debug, Clone)]
struct Entry {
    inst: Instance,
    create_index: u64,
    modify_index: u64,
}

#[derive(Debug)]
struct State {
    local_dc: String,
    /// The raft-like counter: bumped by every mutation.
    raft: u64,
    /// dc -> service id -> entry.
    dcs: BTreeMap<String, BTreeMap<String, Entry>>,
    indexes: HashMap<(String, Key), u64>,
    /// Bumped by `spurious_wakeup`; parked queries that saw another value return.
    spurious: u64,
    latency: Duration,
    fail_next: usize,
    hang: bool,
    malformed: bool,
    unreachable: BTreeSet<String>,
    token: Option<String>,
    strict_min_index: bool,
    requests: usize,
    by_path: HashMap<String, usize>,
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
                hang: false,
                malformed: false,
                unreachable: BTreeSet::new(),
                token: None,
                strict_min_index: false,
                requests: 0,
                by_path: HashMap::new(),
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

    /// The agent's datacenter.
    pub fn local_dc(&self) -> String {
        self.shared.lock().local_dc.clone()
    }

    /// Registers `instance` in `dc`, replacing any instance with the same ID. Registering an
    /// identical instance again changes nothing (no index moves).
    pub fn register(&self, dc: &str, instance: Instance) {
        {
            let mut st = self.shared.lock();
            let previous = st.dcs.get(dc).and_then(|m| m.get(&instance.id)).cloned();
            if previous.as_ref().is_some_and(|p| p.inst == instance) {
                return;
            }
            let mut keys = vec![
                Key::Catalog,
                Key::Checks,
                Key::Health(instance.service.clone()),
            ];
            if let Some(p) = &previous
                && p.inst.service != instance.service
            {
                keys.push(Key::Health(p.inst.service.clone()));
            }
            let idx = st.touch(dc, &keys);
            let create_index = previous.map_or(idx, |p| p.create_index);
            st.dcs.entry(dc.to_string()).or_default().insert(
                instance.id.clone(),
                Entry {
                    inst: instance,
                    create_index,
                    modify_index: idx,
                },
            );
        }
        self.shared.notify();
    }

    /// Removes the instance with service ID `id` from `dc` (nothing happens if there is none).
    pub fn deregister(&self, dc: &str, id: &str) {
        {
            let mut st = self.shared.lock();
            let Some(old) = st.dcs.get_mut(dc).and_then(|m| m.remove(id)) else {
                return;
            };
            st.touch(
                dc,
                &[Key::Catalog, Key::Checks, Key::Health(old.inst.service)],
            );
        }
        self.shared.notify();
    }

    /// Sets the status of the service check of instance `id` in `dc`. Panics if there is no
    /// such instance (a mistake in the test). Setting the current status changes nothing.
    pub fn set_health(&self, dc: &str, id: &str, health: Health) {
        {
            let mut st = self.shared.lock();
            let Some(entry) = st.dcs.get(dc).and_then(|m| m.get(id)).cloned() else {
                panic!("FakeConsul::set_health: no instance {id:?} in datacenter {dc:?}");
            };
            if entry.inst.health == health {
                return;
            }
            let idx = st.touch(dc, &[Key::Checks, Key::Health(entry.inst.service.clone())]);
            let e = st.dcs.get_mut(dc).unwrap().get_mut(id).unwrap();
            e.inst.health = health;
            e.modify_index = idx;
        }
        self.shared.notify();
    }

    /// The instances registered in `dc`, by service ID.
    pub fn instances(&self, dc: &str) -> Vec<Instance> {
        self.shared
            .lock()
            .dcs
            .get(dc)
            .map(|m| m.values().map(|e| e.inst.clone()).collect())
            .unwrap_or_default()
    }

    /// The `X-Consul-Index` the fake would answer now for `catalog/services` (`service` =
    /// `None`) or `health/service/<service>` in `dc`.
    pub fn index(&self, dc: &str, service: Option<&str>) -> u64 {
        let key = service.map_or(Key::Catalog, |s| Key::Health(s.to_string()));
        self.shared.lock().index(dc, &key).max(1)
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

    /// While on, requests get no response at all (the client's own timeout has to end them).
    /// Requests held this way continue normally once it is turned off, if their client still
    /// waits.
    pub fn set_hang(&self, on: bool) {
        self.shared.lock().hang = on;
        self.shared.notify();
    }

    /// While on, requests that would succeed answer `200` with the usual headers and a body
    /// that is not valid JSON (and do not block).
    pub fn set_malformed(&self, on: bool) {
        self.shared.lock().malformed = on;
    }

    /// While on, requests for datacenter `dc` (by `?dc=`, or the agent's own datacenter when
    /// absent) answer `500` with body [`NO_PATH_TO_DC`].
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

/// Query parameters in order, percent-decoded (`+` is a space); a bare `passing` has value "".
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
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
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
        let fail = st.fail_next > 0;
        if fail {
            st.fail_next -= 1;
        }
        let token_ok = match &st.token {
            None => true,
            Some(want) => request_token(&req, &query).as_deref() == Some(want.as_str()),
        };
        (st.local_dc.clone(), token_ok, fail)
    };
    if fail {
        return text(StatusCode::INTERNAL_SERVER_ERROR, NO_LEADER);
    }
    if !token_ok {
        return text(StatusCode::FORBIDDEN, ACL_NOT_FOUND);
    }

    enum Route {
        AgentSelf,
        Catalog,
        Health(String),
        State(String),
    }
    let route = if path == "/v1/agent/self" {
        Route::AgentSelf
    } else if path == "/v1/catalog/services" {
        Route::Catalog
    } else if let Some(state) = path.strip_prefix("/v1/health/state/") {
        if !matches!(state, "any" | "passing" | "warning" | "critical") {
            return text(StatusCode::BAD_REQUEST, "Invalid check state");
        }
        Route::State(state.to_string())
    } else if let Some(name) = path.strip_prefix("/v1/health/service/") {
        let name = percent_decode(name);
        if name.is_empty() {
            return text(StatusCode::BAD_REQUEST, "Missing service name");
        }
        Route::Health(name)
    } else {
        return text(StatusCode::NOT_FOUND, "404 page not found");
    };
    if req.method() != Method::GET {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            &format!("method {} not allowed", req.method()),
        );
    }

    let dc = match param(&query, "dc") {
        Some(d) if !d.is_empty() => d.to_string(),
        _ => local_dc.clone(),
    };
    if shared.lock().unreachable.contains(&dc) {
        return text(StatusCode::INTERNAL_SERVER_ERROR, NO_PATH_TO_DC);
    }
    let malformed = shared.lock().malformed;

    let mut check_state = None;
    let (key, filter) = match route {
        Route::State(state) => {
            check_state = Some(state);
            (Key::Checks, None)
        }
        Route::AgentSelf => {
            if malformed {
                let idx = shared.lock().raft;
                return consul_json(idx, Bytes::from_static(b"{\"Config\": {\"Datacenter\": "));
            }
            let (idx, body) = {
                let st = shared.lock();
                (st.raft, agent_self(&st.local_dc))
            };
            return consul_json(idx, Bytes::from(body.to_string()));
        }
        Route::Catalog => {
            if param(&query, "filter").is_some_and(|f| !f.is_empty()) {
                return text(
                    StatusCode::BAD_REQUEST,
                    "filter on /v1/catalog/services is not supported by the fake",
                );
            }
            (Key::Catalog, None)
        }
        Route::Health(name) => {
            let filter = match param(&query, "filter").filter(|f| !f.is_empty()) {
                None => None,
                Some(f) => match Filter::parse(f) {
                    Ok(f) => Some(f),
                    Err(e) => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            &format!("Failed to create boolean expression evaluator: {e}"),
                        );
                    }
                },
            };
            (Key::Health(name), filter)
        }
    };

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

    let st = shared.lock();
    let idx = st.index(&dc, &key);
    let body = match &key {
        Key::Catalog => catalog_services(&st, &dc),
        Key::Checks => {
            // Every check of the datacenter: each node's serfHealth once, then service checks.
            let state = check_state.unwrap_or_else(|| "any".to_string());
            let mut nodes = BTreeSet::new();
            let mut out = Vec::new();
            for e in st.dcs.get(&dc).into_iter().flat_map(|m| m.values()) {
                let v = health_json(&dc, e);
                for check in v["Checks"].as_array().cloned().unwrap_or_default() {
                    if check["CheckID"] == "serfHealth" && !nodes.insert(e.inst.node.clone()) {
                        continue;
                    }
                    if state == "any" || check["Status"] == state.as_str() {
                        out.push(check);
                    }
                }
            }
            Value::Array(out)
        }
        Key::Health(name) => {
            let mut out = Vec::new();
            for e in health_entries(&st, &dc, name) {
                if passing && e.inst.health != Health::Passing {
                    continue;
                }
                if !tags.iter().all(|t| e.inst.tags.iter().any(|x| x == t)) {
                    continue;
                }
                let v = health_json(&dc, &e);
                if filter.as_ref().is_some_and(|f| !f.eval(&v)) {
                    continue;
                }
                out.push(v);
            }
            Value::Array(out)
        }
    };
    consul_json(idx, Bytes::from(body.to_string()))
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

fn catalog_services(st: &State, dc: &str) -> Value {
    let mut services: BTreeMap<String, Vec<String>> = BTreeMap::new();
    services.insert("consul".to_string(), Vec::new());
    if let Some(m) = st.dcs.get(dc) {
        for e in m.values() {
            let tags = services.entry(e.inst.service.clone()).or_default();
            for t in &e.inst.tags {
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

/// The entries of service `name` in `dc`, sorted by node then ID; `consul` also has the
/// datacenter's (synthetic) server, as a real agent lists its servers.
fn health_entries(st: &State, dc: &str, name: &str) -> Vec<Entry> {
    let mut out: Vec<Entry> = st
        .dcs
        .get(dc)
        .map(|m| {
            m.values()
                .filter(|e| e.inst.service == name)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    if name == "consul" {
        let node = if dc == st.local_dc {
            AGENT_NODE.to_string()
        } else {
            format!("fake-server-{dc}")
        };
        out.push(Entry {
            inst: Instance::new("consul", "consul", "127.0.0.1", 8300)
                .on_node(&node, "127.0.0.1")
                .service_address(""),
            create_index: 1,
            modify_index: 1,
        });
    }
    out.sort_by(|a, b| (&a.inst.node, &a.inst.id).cmp(&(&b.inst.node, &b.inst.id)));
    out
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

fn health_json(dc: &str, e: &Entry) -> Value {
    let i = &e.inst;
    let node_addr = &i.node_address;
    json!({
        "Node": {
            "ID": node_id(&i.node),
            "Node": i.node,
            "Address": node_addr,
            "Datacenter": dc,
            "TaggedAddresses": {
                "lan": node_addr,
                "lan_ipv4": node_addr,
                "wan": node_addr,
                "wan_ipv4": node_addr
            },
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": e.create_index,
            "ModifyIndex": e.create_index
        },
        "Service": {
            "ID": i.id,
            "Service": i.service,
            "Tags": i.tags,
            "Address": i.address,
            "Meta": i.meta,
            "Port": i.port,
            "Weights": {"Passing": i.weight_passing, "Warning": 1},
            "EnableTagOverride": false,
            "Proxy": {"Mode": "", "MeshGateway": {}, "Expose": {}},
            "Connect": {},
            "PeerName": "",
            "CreateIndex": e.create_index,
            "ModifyIndex": e.modify_index
        },
        "Checks": [
            {
                "Node": i.node,
                "CheckID": "serfHealth",
                "Name": "Serf Health Status",
                "Status": "passing",
                "Notes": "",
                "Output": "Agent alive and reachable",
                "ServiceID": "",
                "ServiceName": "",
                "ServiceTags": [],
                "Type": "",
                "Interval": "",
                "Timeout": "",
                "ExposedPort": 0,
                "Definition": {},
                "CreateIndex": e.create_index,
                "ModifyIndex": e.create_index
            },
            {
                "Node": i.node,
                "CheckID": format!("service:{}", i.id),
                "Name": format!("Service '{}' check", i.service),
                "Status": i.health.as_str(),
                "Notes": "",
                "Output": "",
                "ServiceID": i.id,
                "ServiceName": i.service,
                "ServiceTags": i.tags,
                "Type": "ttl",
                "Interval": "",
                "Timeout": "",
                "ExposedPort": 0,
                "Definition": {},
                "CreateIndex": e.create_index,
                "ModifyIndex": e.modify_index
            }
        ]
    })
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
    pub fn parse(src: &str) -> Result<Filter, String> {
        let tokens = tokenize(src)?;
        let mut any = Vec::new();
        let mut all = Vec::new();
        let mut cur: Vec<Tok> = Vec::new();
        let flush = |cur: &mut Vec<Tok>, all: &mut Vec<Clause>| -> Result<(), String> {
            all.push(Clause::parse(cur)?);
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

fn selector(t: &Tok) -> Result<Vec<String>, String> {
    match t {
        Tok::Word(w)
            if ["Node", "Service", "Checks"]
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
    fn parse(t: &[Tok]) -> Result<Clause, String> {
        let w = |i: usize, s: &str| matches!(t.get(i), Some(Tok::Word(x)) if x == s);
        match t.len() {
            3 if w(1, "==") => Ok(Clause::Eq(selector(&t[0])?, literal(&t[2])?, true)),
            3 if w(1, "!=") => Ok(Clause::Eq(selector(&t[0])?, literal(&t[2])?, false)),
            3 if w(1, "in") => Ok(Clause::In(literal(&t[0])?, selector(&t[2])?, true)),
            4 if w(1, "not") && w(2, "in") => {
                Ok(Clause::In(literal(&t[0])?, selector(&t[3])?, false))
            }
            3 if w(1, "contains") => Ok(Clause::In(literal(&t[2])?, selector(&t[0])?, true)),
            4 if w(1, "not") && w(2, "contains") => {
                Ok(Clause::In(literal(&t[3])?, selector(&t[0])?, false))
            }
            3 if w(1, "is") && w(2, "empty") => Ok(Clause::Empty(selector(&t[0])?, true)),
            4 if w(1, "is") && w(2, "not") && w(3, "empty") => {
                Ok(Clause::Empty(selector(&t[0])?, false))
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
