//! Soak: the release `meshbridge run` on the Consul fake for a long time under everything
//! that changes in production, sampling its memory, to show whether it stays flat after
//! warm-up. Nothing is reused, so a map that only grows shows as a slope:
//!
//! - Consul churn at `RATE` writes a second: health flips (at most 5% out of rotation at a
//!   time) and port changes (the same instance registered again with another port) of the
//!   base instances, and instances registered and deregistered with a new ID on a new node
//!   each time; every `SERVICE_SECS` a whole new service appears and the oldest added one
//!   disappears.
//! - Proxy churn: `PROXIES` simulated delta ADS streams, each on its own connection as an
//!   Envoy holds it (10% on `"*"`, the others on 5 live services, possibly one that later
//!   disappears); every `RECONNECT_SECS`, `RECONNECT_PERCENT` of them end (half closing their
//!   side and waiting for the server to end the stream, half cut) and as many new ones
//!   connect with new node ids, and as many others change their EDS subscriptions (one
//!   cluster unsubscribed, or subscribed again). Streams subscribe to the clusters CDS adds
//!   and drop those it removes, as Envoy does.
//! - Admin reads every `ADMIN_SECS`: `/api/services`, `/api/proxies` and `/metrics`.
//!
//! Every `SAMPLE_SECS` over `SOAK_SECS` it prints meshbridge's RSS, VmHWM, CPU over the
//! interval, open file descriptors, the streams connected (as the bench counts them and as
//! `/metrics` does) and the changes so far; then a verdict over the samples after warm-up
//! (the first 20% of the run, at least 2 samples): min/max RSS, the least-squares slope, and
//! "flat" when the fitted growth over that window is under 5% of its mean RSS. At the end it
//! compares what `/metrics` and `/api/proxies` say is connected with the streams actually
//! open, and `/api/services` with the Consul fake. It asserts nothing about memory.
//!
//! Sizes: `SERVICES` (500) × `INSTANCES` (4), plus `SERVICES / 4` churned instances and two
//! added services at any time; `PROXIES` (1000). Defaults: `SOAK_SECS` 1800, `SAMPLE_SECS`
//! 30, `RATE` 5, `RECONNECT_SECS` 10, `RECONNECT_PERCENT` 5, `SERVICE_SECS` 120, `ADMIN_SECS`
//! 5.
// A bench reads its knobs from the environment and runs one scenario top to bottom.
#![allow(clippy::too_many_lines, clippy::disallowed_methods)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use prost::Message;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

// The fakes of the test kit; a bench uses only part of them.
#[allow(dead_code)]
#[path = "../tests/it/support/consul_fake.rs"]
mod consul_fake;
#[path = "support/mesh_gen.rs"]
mod mesh_gen;
#[path = "support/processes.rs"]
mod processes;

use consul_fake::{FakeConsul, Health, Instance};
use processes::{cpu_ticks, delta_ack, env_usize, start_on_consul, status_kb};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const PER_NODE: usize = 4;
/// Services added during the run that are live at any time.
const ADDED_LIVE: usize = 2;

/// Base instance `i` of service `service`, `PER_NODE` instances a node.
fn base_instance(service: usize, i: usize, instances: usize) -> Instance {
    let host = service * instances + i;
    let node = host / PER_NODE;
    let address = format!("10.{}.{}.{}", node / 250, node % 250, 1 + host % PER_NODE);
    Instance::new(
        &mesh_gen::service(service),
        &format!("{}-{i}", mesh_gen::service(service)),
        &address,
        31000 + i as u16,
    )
    .on_node(
        &format!("host-{node}"),
        &format!("10.{}.{}.200", node / 250, node % 250),
    )
}

/// A churned instance of `service`: host `h` (never reused) gives its ID, its node and its
/// address.
fn added_instance(service: &str, h: usize) -> Instance {
    let address = format!("172.{}.{}.{}", 16 + (h >> 16) % 16, (h >> 8) % 256, h % 256);
    Instance::new(
        service,
        &format!("{service}-x{h}"),
        &address,
        32000 + (h % 1000) as u16,
    )
}

/// The node of a simulated proxy: `service`, on `"*"` (one in ten) or 5 of the live services.
fn node(id: &str, service: &str, live: &[String], rng: &mut mesh_gen::Rng) -> Node {
    let s = |v: String| Value {
        kind: Some(Kind::StringValue(v)),
    };
    let dependencies: Vec<Value> = if rng.next(10) == 0 {
        vec![s("*".to_string())]
    } else {
        (0..5)
            .map(|_| s(live[rng.next(live.len())].clone()))
            .collect()
    };
    let n = |v: u16| Value {
        kind: Some(Kind::NumberValue(f64::from(v))),
    };
    let fields = BTreeMap::from([
        ("service_name".to_string(), s(service.to_string())),
        ("ingress_port".to_string(), n(15000)),
        ("app_port".to_string(), n(8080)),
        ("egress_port".to_string(), n(15001)),
        (
            "dependencies".to_string(),
            Value {
                kind: Some(Kind::ListValue(ListValue {
                    values: dependencies,
                })),
            },
        ),
    ]);
    Node {
        id: id.to_string(),
        cluster: service.to_string(),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

/// Counters shared by the simulated proxies and the drivers.
#[derive(Default)]
struct Stats {
    /// Streams started (connection attempted).
    started: AtomicUsize,
    /// Streams that received their configuration, in total.
    configured: AtomicUsize,
    /// Streams configured and still open.
    connected: AtomicUsize,
    /// Connections or stream openings that failed (each is tried again, 10 times at most).
    failed: AtomicUsize,
    /// Streams the server ended (or that stalled) without the bench asking.
    unexpected_ends: AtomicUsize,
    /// Assignments received.
    assignments: AtomicUsize,
    /// EDS subscription changes sent (besides following CDS).
    resubscriptions: AtomicUsize,
    /// Streams ended by the bench and replaced.
    replaced: AtomicUsize,
    /// Writes to the Consul fake.
    changes: AtomicUsize,
}

/// Counts a configured stream as connected until dropped.
struct Connected(Arc<Stats>);

impl Connected {
    fn new(stats: &Arc<Stats>) -> Self {
        stats.configured.fetch_add(1, Relaxed);
        stats.connected.fetch_add(1, Relaxed);
        Connected(stats.clone())
    }
}

impl Drop for Connected {
    fn drop(&mut self) {
        self.0.connected.fetch_sub(1, Relaxed);
    }
}

fn eds(subscribe: Vec<String>, unsubscribe: Vec<String>) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: EDS.to_string(),
        resource_names_subscribe: subscribe,
        resource_names_unsubscribe: unsubscribe,
        ..Default::default()
    }
}

/// Connects to meshbridge and opens a delta stream for `node` subscribing CDS (wildcard).
async fn open(
    xds: u16,
    node: &Node,
) -> Option<(
    mpsc::Sender<DeltaDiscoveryRequest>,
    tonic::Streaming<DeltaDiscoveryResponse>,
)> {
    let endpoint = Endpoint::from_shared(format!("http://127.0.0.1:{xds}"))
        .unwrap_or_else(|e| panic!("{e}"))
        .connect_timeout(Duration::from_secs(10));
    let channel = tokio::time::timeout(Duration::from_secs(20), endpoint.connect())
        .await
        .ok()?
        .ok()?;
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(64);
    tx.send(DeltaDiscoveryRequest {
        node: Some(node.clone()),
        type_url: CDS.to_string(),
        ..Default::default()
    })
    .await
    .ok()?;
    let responses = tokio::time::timeout(
        Duration::from_secs(30),
        client.delta_aggregated_resources(ReceiverStream::new(rx)),
    )
    .await
    .ok()?
    .ok()?;
    Some((tx, responses.into_inner()))
}

/// One simulated proxy: a connection of its own, a delta stream subscribing CDS (wildcard)
/// and the EDS clusters CDS announces (dropping those it removes), ACKing everything. A
/// message on `toggle` unsubscribes one cluster, or subscribes it again. `stop` ends it:
/// `true` closes the request side and waits (at most 5 s) for the server to end the stream,
/// `false` (or the sender dropped) cuts the stream and the connection.
async fn proxy(
    xds: u16,
    node: Node,
    stats: Arc<Stats>,
    mut stop: oneshot::Receiver<bool>,
    mut toggle: mpsc::Receiver<()>,
) {
    stats.started.fetch_add(1, Relaxed);
    // As Envoy does, a failed connection or stream opening is tried again (10 times at most).
    let mut opened = None;
    for attempt in 0..10 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        opened = open(xds, &node).await;
        if opened.is_some() {
            break;
        }
        stats.failed.fetch_add(1, Relaxed);
    }
    let Some((tx, mut responses)) = opened else {
        return;
    };
    let mut subscribed: BTreeSet<String> = BTreeSet::new();
    let mut parked: Option<String> = None;
    let mut connected: Option<Connected> = None;
    let graceful = loop {
        tokio::select! {
            s = &mut stop => break s.unwrap_or(false),
            Some(()) = toggle.recv() => {
                let req = if let Some(name) = parked.take() {
                    subscribed.insert(name.clone());
                    eds(vec![name], Vec::new())
                } else if let Some(name) = subscribed.iter().next().cloned() {
                    subscribed.remove(&name);
                    parked = Some(name.clone());
                    eds(Vec::new(), vec![name])
                } else {
                    continue;
                };
                stats.resubscriptions.fetch_add(1, Relaxed);
                let _ = tx.send(req).await;
            }
            r = tokio::time::timeout(Duration::from_secs(600), responses.message()) => {
                let Ok(Ok(Some(r))) = r else {
                    stats.unexpected_ends.fetch_add(1, Relaxed);
                    return;
                };
                let _ = tx.send(delta_ack(&r)).await;
                if r.type_url == CDS {
                    let new: Vec<String> = r
                        .resources
                        .iter()
                        .filter_map(|res| res.resource.as_ref())
                        .filter_map(|any| Cluster::decode(any.value.as_slice()).ok())
                        .filter(|c| c.eds_cluster_config.is_some())
                        .map(|c| c.name)
                        .filter(|n| !subscribed.contains(n) && parked.as_ref() != Some(n))
                        .collect();
                    let mut gone = Vec::new();
                    for name in &r.removed_resources {
                        if subscribed.remove(name) {
                            gone.push(name.clone());
                        }
                        if parked.as_ref() == Some(name) {
                            parked = None;
                        }
                    }
                    subscribed.extend(new.iter().cloned());
                    if !new.is_empty() || !gone.is_empty() {
                        let _ = tx.send(eds(new, gone)).await;
                    }
                    if connected.is_none() && subscribed.is_empty() {
                        connected = Some(Connected::new(&stats));
                    }
                } else if r.type_url == EDS {
                    stats.assignments.fetch_add(r.resources.len(), Relaxed);
                    if connected.is_none() {
                        connected = Some(Connected::new(&stats));
                    }
                }
            }
        }
    };
    drop(connected);
    if graceful {
        drop(tx);
        let _ = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(_)) = responses.message().await {}
        })
        .await;
    }
}

/// A running simulated proxy.
struct Proxy {
    stop: oneshot::Sender<bool>,
    toggle: mpsc::Sender<()>,
}

/// What starting a simulated proxy needs: meshbridge's xDS port, the number of base
/// services, the live services (dependencies are picked among them) and the counters.
#[derive(Clone)]
struct Fleet {
    xds: u16,
    services: usize,
    live: Arc<Mutex<Vec<String>>>,
    stats: Arc<Stats>,
}

impl Fleet {
    /// Starts simulated proxy number `n` (node id `soak-<n>`, service `n mod services`).
    fn spawn(&self, n: usize, rng: &mut mesh_gen::Rng) -> Proxy {
        let node = {
            let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
            node(
                &format!("soak-{n}"),
                &mesh_gen::service(n % self.services),
                &live,
                rng,
            )
        };
        let (stop, stop_rx) = oneshot::channel();
        let (toggle, toggle_rx) = mpsc::channel(4);
        tokio::spawn(proxy(
            self.xds,
            node,
            self.stats.clone(),
            stop_rx,
            toggle_rx,
        ));
        Proxy { stop, toggle }
    }
}

/// What the Consul churn changes: the base instances (current port and health), the churned
/// instances (oldest first) and the added services.
struct Catalog {
    base: Vec<Instance>,
    added: VecDeque<String>,
    next_host: usize,
    services_added: VecDeque<(String, Vec<String>)>,
    next_service: usize,
    instances: usize,
    live: Arc<Mutex<Vec<String>>>,
}

impl Catalog {
    fn add_instance(&mut self, consul: &FakeConsul, service: &str) -> String {
        let i = added_instance(service, self.next_host);
        self.next_host += 1;
        let id = i.id.clone();
        consul.register("dc1", i);
        id
    }

    /// Registers a new service with `instances` instances.
    fn add_service(&mut self, consul: &FakeConsul, stats: &Stats) {
        let name = format!("added-{:05}", self.next_service);
        self.next_service += 1;
        let ids = (0..self.instances)
            .map(|_| self.add_instance(consul, &name))
            .collect();
        stats.changes.fetch_add(self.instances, Relaxed);
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(name.clone());
        self.services_added.push_back((name, ids));
    }

    /// Deregisters every instance of the oldest added service.
    fn remove_service(&mut self, consul: &FakeConsul, stats: &Stats) {
        let Some((name, ids)) = self.services_added.pop_front() else {
            return;
        };
        self.live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|s| *s != name);
        for id in &ids {
            consul.deregister("dc1", id);
        }
        stats.changes.fetch_add(ids.len(), Relaxed);
    }
}

/// The Consul churn until `end`: `rate` writes a second (40% health flips taking base
/// instances out of rotation and back, at most 5% out at a time, 20% port
/// changes, 40% alternately deregistering the oldest churned instance and registering a new
/// one) and a service added and one removed every `service_every`. Returns how many of each.
async fn consul_churn(
    consul: Arc<FakeConsul>,
    mut catalog: Catalog,
    stats: Arc<Stats>,
    rate: usize,
    service_every: Duration,
    end: Instant,
) -> [usize; 5] {
    let mut rng = mesh_gen::Rng::new(11);
    // Base instances out of rotation, oldest first.
    let mut down: VecDeque<usize> = VecDeque::new();
    let (mut health, mut ports, mut added, mut removed, mut services) = (0, 0, 0, 0, 0);
    let t0 = Instant::now();
    let period = Duration::from_secs(1) / rate as u32;
    let mut next_service = t0 + service_every;
    let mut remove_next = true;
    for k in 0.. {
        let due = t0 + period * k;
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        if due >= next_service {
            next_service += service_every;
            catalog.add_service(&consul, &stats);
            catalog.remove_service(&consul, &stats);
            services += 1;
        }
        let r = rng.next(10);
        if r < 4 {
            // At most one base instance in twenty out of rotation, as in a healthy fleet:
            // once that many are, each flip brings the one out longest back.
            let i = if down.len() >= catalog.base.len().div_ceil(20) {
                down.pop_front()
            } else {
                Some(rng.next(catalog.base.len()))
            };
            if let Some(i) = i {
                let b = &mut catalog.base[i];
                b.health = if b.health == Health::Passing {
                    down.push_back(i);
                    Health::Critical
                } else {
                    down.retain(|d| *d != i);
                    Health::Passing
                };
                consul.set_health("dc1", &b.id, b.health);
                health += 1;
            }
        } else if r < 6 {
            let i = rng.next(catalog.base.len());
            let b = &mut catalog.base[i];
            b.port = if b.port < 41000 {
                b.port + 10000
            } else {
                b.port - 10000
            };
            consul.register("dc1", b.clone());
            ports += 1;
        } else if remove_next && let Some(id) = catalog.added.pop_front() {
            consul.deregister("dc1", &id);
            removed += 1;
            remove_next = false;
        } else {
            let service = catalog.base[rng.next(catalog.base.len())].service.clone();
            let id = catalog.add_instance(&consul, &service);
            catalog.added.push_back(id);
            added += 1;
            remove_next = true;
        }
        stats.changes.fetch_add(1, Relaxed);
    }
    [health, ports, added, removed, services]
}

/// The proxy churn until `end`: every `every`, `count` random streams end and as many new
/// ones start, and `count` others change their subscriptions.
async fn proxy_churn(
    fleet: Fleet,
    mut proxies: Vec<Proxy>,
    every: Duration,
    count: usize,
    end: Instant,
) -> Vec<Proxy> {
    let mut rng = mesh_gen::Rng::new(23);
    let mut node_rng = mesh_gen::Rng::new(29);
    let mut next_id = proxies.len();
    // Rounds fall halfway between samples taken on multiples of `every`, so a sample does not
    // catch the replaced streams before their configuration arrived.
    let t0 = Instant::now()
        .checked_sub(every / 2)
        .unwrap_or_else(Instant::now);
    for round in 1u32.. {
        let due = t0 + every * round;
        if due >= end {
            return proxies;
        }
        tokio::time::sleep_until(due.into()).await;
        let mut picked = BTreeSet::new();
        for _ in 0..count * 4 {
            if picked.len() >= count.min(proxies.len()) {
                break;
            }
            picked.insert(rng.next(proxies.len()));
        }
        for (j, &slot) in picked.iter().enumerate() {
            let fresh = fleet.spawn(next_id, &mut node_rng);
            next_id += 1;
            let old = std::mem::replace(&mut proxies[slot], fresh);
            let _ = old.stop.send(j % 2 == 0);
            fleet.stats.replaced.fetch_add(1, Relaxed);
        }
        for _ in 0..count {
            let p = &proxies[rng.next(proxies.len())];
            let _ = p.toggle.try_send(());
        }
    }
    proxies
}

/// Admin reads until `end`, every `every`: `/api/services`, `/api/proxies`, `/metrics`.
/// Returns the reads, the failed ones and the slowest.
async fn admin_reads(admin: String, every: Duration, end: Instant) -> (usize, usize, Duration) {
    let client = http();
    let (mut reads, mut failed, mut slowest) = (0, 0, Duration::ZERO);
    let t0 = Instant::now();
    for k in 1.. {
        let due = t0 + every * k;
        if due >= end {
            break;
        }
        tokio::time::sleep_until(due.into()).await;
        for path in ["/api/services", "/api/proxies", "/metrics"] {
            let t = Instant::now();
            let ok = match client.get(format!("{admin}{path}")).send().await {
                Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                _ => false,
            };
            reads += 1;
            failed += usize::from(!ok);
            slowest = slowest.max(t.elapsed());
        }
    }
    (reads, failed, slowest)
}

/// The value of the series `name` (with its labels, as written) in the metrics text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// An HTTP client whose requests give up after 30 s.
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The body of `GET url` (empty on a failure).
async fn get(client: &reqwest::Client, url: &str) -> String {
    match client.get(url).send().await {
        Ok(r) => r.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

async fn get_json(client: &reqwest::Client, url: &str) -> serde_json::Value {
    serde_json::from_str(&get(client, url).await).unwrap_or_default()
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

/// Per service: instances, healthy ones, and the ports sorted.
type Counts = BTreeMap<String, (usize, usize, Vec<u16>)>;

fn consul_counts(consul: &FakeConsul) -> Counts {
    let mut out = Counts::new();
    for i in consul.instances("dc1") {
        let e = out.entry(i.service.clone()).or_default();
        e.0 += 1;
        e.1 += usize::from(i.health == Health::Passing);
        e.2.push(i.port);
    }
    for e in out.values_mut() {
        e.2.sort_unstable();
    }
    out
}

/// Per service as `/api/services` lists it, but for Consul's own `consul` service, which the
/// fake serves and does not list among its instances.
async fn meshbridge_counts(client: &reqwest::Client, admin: &str) -> Counts {
    let mut out = Counts::new();
    let services = get_json(client, &format!("{admin}/api/services")).await;
    for s in services.as_array().into_iter().flatten() {
        if s["name"] == "consul" {
            continue;
        }
        let e: &mut (usize, usize, Vec<u16>) = out
            .entry(s["name"].as_str().unwrap_or_default().to_string())
            .or_default();
        for i in s["instances"].as_array().into_iter().flatten() {
            e.0 += 1;
            e.1 += usize::from(i["healthy"].as_bool().unwrap_or(false));
            e.2.push(u16::try_from(i["port"].as_u64().unwrap_or(0)).unwrap_or(0));
        }
        e.2.sort_unstable();
    }
    out
}

struct Sample {
    elapsed: f64,
    rss_mib: f64,
}

#[tokio::main]
async fn main() {
    let soak_secs = env_usize("SOAK_SECS", 1800).max(1);
    let sample_secs = env_usize("SAMPLE_SECS", 30).max(1);
    let services = env_usize("SERVICES", 500).max(1);
    let instances = env_usize("INSTANCES", 4).max(1);
    let proxies_n = env_usize("PROXIES", 1000).max(1);
    let rate = env_usize("RATE", 5).max(1);
    let reconnect_secs = env_usize("RECONNECT_SECS", 10).max(1);
    let reconnect_percent = env_usize("RECONNECT_PERCENT", 5);
    let service_secs = env_usize("SERVICE_SECS", 120).max(1);
    let admin_secs = env_usize("ADMIN_SECS", 5).max(1);

    // The catalog: the base instances, `services / 4` churned ones, two added services.
    let consul = Arc::new(FakeConsul::start("dc1").await);
    let mut base = Vec::new();
    for s in 0..services {
        for i in 0..instances {
            let b = base_instance(s, i, instances);
            consul.register("dc1", b.clone());
            base.push(b);
        }
    }
    let live = Arc::new(Mutex::new(
        (0..services).map(mesh_gen::service).collect::<Vec<_>>(),
    ));
    let stats = Arc::new(Stats::default());
    let mut catalog = Catalog {
        base,
        added: VecDeque::new(),
        next_host: 0,
        services_added: VecDeque::new(),
        next_service: 0,
        instances,
        live: live.clone(),
    };
    for k in 0..services / 4 {
        let service = mesh_gen::service(k * 4 % services);
        let id = catalog.add_instance(&consul, &service);
        catalog.added.push_back(id);
    }
    for _ in 0..ADDED_LIVE {
        catalog.add_service(&consul, &stats);
    }
    stats.changes.store(0, Relaxed);
    // Plus Consul's own `consul` service, as a real agent lists it.
    let endpoints = services * instances + services / 4 + ADDED_LIVE * instances + 1;
    let (cp, xds, admin, ready) = start_on_consul(
        &consul.url(),
        &["--allow-wildcard", "*"],
        endpoints,
        Duration::from_secs(300),
    )
    .await;
    let pid = cp.0.id();

    // The proxies, each on its own connection.
    let fleet = Fleet {
        xds,
        services,
        live,
        stats: stats.clone(),
    };
    let mut rng = mesh_gen::Rng::new(42);
    let t_connect = Instant::now();
    let proxies: Vec<Proxy> = (0..proxies_n).map(|n| fleet.spawn(n, &mut rng)).collect();
    while stats.connected.load(Relaxed) < proxies_n {
        assert!(
            t_connect.elapsed() < Duration::from_secs(300),
            "{} of {proxies_n} streams configured after 300 s ({} failed)",
            stats.connected.load(Relaxed),
            stats.failed.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let configured_in = t_connect.elapsed();
    println!(
        "soak: {} instances ({services} services x {instances}, {} churned, {ADDED_LIVE} added services x {instances}) in the Consul fake, {proxies_n} delta streams on their own connections (10% on \"*\")",
        services * instances + services / 4 + ADDED_LIVE * instances,
        services / 4
    );
    println!(
        "  churn: {rate} Consul writes/s, a service added and one removed every {service_secs} s; {reconnect_percent}% of the streams replaced and {reconnect_percent}% resubscribing every {reconnect_secs} s; admin reads every {admin_secs} s; {soak_secs} s, sampled every {sample_secs} s"
    );
    println!("  start to /readyz {ready:?}; all streams configured in {configured_in:?}");
    let fds_start = fds(pid);
    let consul_conns_start = consul.open_connections();

    let t0 = Instant::now();
    let ticks0 = cpu_ticks(pid);
    let end = t0 + Duration::from_secs(soak_secs as u64);
    let churn = tokio::spawn(consul_churn(
        consul.clone(),
        catalog,
        stats.clone(),
        rate,
        Duration::from_secs(service_secs as u64),
        end,
    ));
    let reconnects = tokio::spawn(proxy_churn(
        fleet,
        proxies,
        Duration::from_secs(reconnect_secs as u64),
        proxies_n * reconnect_percent / 100,
        end,
    ));
    let reads = tokio::spawn(admin_reads(
        admin.clone(),
        Duration::from_secs(admin_secs as u64),
        end,
    ));

    println!();
    println!(
        "  {:>8} {:>8} {:>9} {:>6} {:>8} {:>10} {:>6} {:>8} {:>9}",
        "elapsed",
        "RSS MiB",
        "VmHWM MiB",
        "cores",
        "streams",
        "/metrics",
        "fds",
        "changes",
        "replaced"
    );
    let client = http();
    let mut samples = Vec::new();
    let mut ticks = cpu_ticks(pid);
    let mut last = t0;
    for k in 0..=(soak_secs / sample_secs) {
        tokio::time::sleep_until((t0 + Duration::from_secs((k * sample_secs) as u64)).into()).await;
        let now = Instant::now();
        let t = cpu_ticks(pid);
        let cores = if k == 0 {
            0.0
        } else {
            (t - ticks) as f64 / 100.0 / (now - last).as_secs_f64()
        };
        (ticks, last) = (t, now);
        let rss_mib = status_kb(pid, "VmRSS:") as f64 / 1024.0;
        let hwm_mib = status_kb(pid, "VmHWM:") as f64 / 1024.0;
        let m = get(&client, &format!("{admin}/metrics")).await;
        let streams = metric(&m, "meshbridge_xds_streams{mode=\"delta\"}").unwrap_or(-1.0);
        let elapsed = (now - t0).as_secs_f64();
        println!(
            "  {:>7.0}s {rss_mib:>8.1} {hwm_mib:>9.1} {cores:>6.2} {:>8} {streams:>10} {:>6} {:>8} {:>9}",
            elapsed,
            stats.connected.load(Relaxed),
            fds(pid),
            stats.changes.load(Relaxed),
            stats.replaced.load(Relaxed)
        );
        samples.push(Sample { elapsed, rss_mib });
    }
    let [health, ports, added, removed, services_changed] =
        churn.await.unwrap_or_else(|e| panic!("{e}"));
    let proxies = reconnects.await.unwrap_or_else(|e| panic!("{e}"));
    let (reads, read_failures, slowest_read) = reads.await.unwrap_or_else(|e| panic!("{e}"));

    // The verdict over the samples after warm-up.
    println!();
    let warm = samples
        .iter()
        .filter(|s| s.elapsed < 0.2 * soak_secs as f64)
        .count()
        .max(2);
    let window = samples.get(warm..).unwrap_or_default();
    if window.len() < 2 {
        println!(
            "  verdict: too few samples after warm-up ({})",
            window.len()
        );
    } else {
        let n = window.len() as f64;
        let hours: Vec<f64> = window.iter().map(|s| s.elapsed / 3600.0).collect();
        let mean_x = hours.iter().sum::<f64>() / n;
        let mean_y = window.iter().map(|s| s.rss_mib).sum::<f64>() / n;
        let sxy: f64 = hours
            .iter()
            .zip(window)
            .map(|(x, s)| (x - mean_x) * (s.rss_mib - mean_y))
            .sum();
        let sxx: f64 = hours.iter().map(|x| (x - mean_x) * (x - mean_x)).sum();
        let slope = if sxx > 0.0 { sxy / sxx } else { 0.0 };
        let span = hours[hours.len() - 1] - hours[0];
        let growth = slope * span;
        let min = window.iter().map(|s| s.rss_mib).fold(f64::MAX, f64::min);
        let max = window.iter().map(|s| s.rss_mib).fold(f64::MIN, f64::max);
        let limit = 0.05 * mean_y;
        println!(
            "  after warm-up ({:.0} s to {:.0} s, {} samples): RSS min {min:.1} MiB, max {max:.1} MiB, mean {mean_y:.1} MiB; slope {slope:+.1} MiB/h, fitted growth over the window {growth:+.1} MiB ({:+.1}% of the mean; flat below {limit:.1} MiB)",
            window[0].elapsed,
            window[window.len() - 1].elapsed,
            window.len(),
            100.0 * growth / mean_y
        );
        println!(
            "  verdict: {}",
            if growth < limit { "flat" } else { "GROWING" }
        );
    }

    // Let the last changes arrive, then compare what meshbridge says with what is connected
    // and what Consul holds.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let want = consul_counts(&consul);
    let settle = Instant::now();
    let mut got = meshbridge_counts(&client, &admin).await;
    while got != want && settle.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        got = meshbridge_counts(&client, &admin).await;
    }
    let m = get(&client, &format!("{admin}/metrics")).await;
    let listed = get_json(&client, &format!("{admin}/api/proxies")).await;
    let listed = listed.as_array().cloned().unwrap_or_default();
    let groups: BTreeSet<&str> = listed.iter().filter_map(|p| p["group"].as_str()).collect();
    let connected = stats.connected.load(Relaxed);
    println!();
    println!(
        "  Consul writes: {health} health flips, {ports} port changes, {added} instances registered, {removed} deregistered, {services_changed} services added and as many removed"
    );
    println!(
        "  streams: {} started, {} configured, {} replaced by the bench, {} resubscriptions, {} failed to open (tried again), {} ended by the server; {} assignments received",
        stats.started.load(Relaxed),
        stats.configured.load(Relaxed),
        stats.replaced.load(Relaxed),
        stats.resubscriptions.load(Relaxed),
        stats.failed.load(Relaxed),
        stats.unexpected_ends.load(Relaxed),
        stats.assignments.load(Relaxed)
    );
    println!(
        "  connected at the end: {connected} streams open and configured (of {}); /metrics meshbridge_xds_streams delta {}, sotw {}; /api/proxies {} in {} groups; meshbridge_snapshot_groups {}",
        proxies.len(),
        metric(&m, "meshbridge_xds_streams{mode=\"delta\"}").unwrap_or(-1.0),
        metric(&m, "meshbridge_xds_streams{mode=\"sotw\"}").unwrap_or(-1.0),
        listed.len(),
        groups.len(),
        metric(&m, "meshbridge_snapshot_groups").unwrap_or(-1.0)
    );
    println!(
        "  open file descriptors: {fds_start} at the start, {} at the end; connections to Consul: {consul_conns_start} at the start, {} at the end",
        fds(pid),
        consul.open_connections()
    );
    let differ: Vec<&String> = want
        .keys()
        .chain(got.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|s| want.get(*s) != got.get(*s))
        .collect();
    println!(
        "  /api/services vs Consul: {} services, {} instances ({} healthy) in Consul; {} services, {} instances ({} healthy) in meshbridge; {} services differ{}; meshbridge_endpoints {}",
        want.len(),
        want.values().map(|c| c.0).sum::<usize>(),
        want.values().map(|c| c.1).sum::<usize>(),
        got.len(),
        got.values().map(|c| c.0).sum::<usize>(),
        got.values().map(|c| c.1).sum::<usize>(),
        differ.len(),
        if differ.is_empty() {
            String::new()
        } else {
            format!(
                " (e.g. {}: Consul {:?}, meshbridge {:?})",
                differ[0],
                want.get(differ[0]),
                got.get(differ[0])
            )
        },
        metric(&m, "meshbridge_endpoints").unwrap_or(-1.0)
    );
    println!(
        "  admin reads: {reads}, {read_failures} failed, slowest {slowest_read:.1?}; meshbridge CPU over the run {:.2} cores, VmHWM {:.1} MiB",
        (cpu_ticks(pid) - ticks0) as f64 / 100.0 / (Instant::now() - t0).as_secs_f64(),
        status_kb(pid, "VmHWM:") as f64 / 1024.0
    );
    drop(proxies);
}
