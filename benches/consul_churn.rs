//! Consul churn: the release `meshbridge run` following the Consul fake with 10,000 instances
//! (1,000 services × 10, five instances per node) while 2,000 simulated proxies hold delta ADS
//! streams (one in ten on `"*"`, the others on 5 random services), and instances' health
//! changes at a sustained rate. Reports meshbridge's CPU over the churn, the bytes it read
//! from Consul per second (by endpoint), and the propagation time from each health change to
//! each affected stream receiving the new assignment (p50/p99 over every pair).
//!
//! `PROXIES` (2000), `CONNECTIONS` (50), `RATE` (changes per second, 20) and `CHURN_SECS` (60)
//! size the run. Change `k` takes one instance of service `k mod 1000` out of rotation (or, a
//! round later, brings it back), so a service changes at most once every 50 s at the default
//! rate and every new assignment of its cluster after the change belongs to that change.
//! `CHURN=ports` makes each change a redeploy on the same node instead: the instance is
//! registered again with another port (and back a round later), which moves neither the
//! checks nor the catalog's content, only the catalog's index, so meshbridge sees it through
//! its sweeps; the cost of those sweeps shows in the requests and bytes read from Consul.
// A bench reads its knobs from the environment and runs one scenario top to bottom.
#![allow(clippy::too_many_lines, clippy::disallowed_methods)]

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

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
const SERVICES: usize = 1000;
const INSTANCES: usize = 10;
const PER_NODE: usize = 5;

fn instance(service: usize, i: usize) -> Instance {
    let host = service * INSTANCES + i;
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

/// The node of simulated proxy `p`: service `svc-<p mod 1000>`, on `"*"` or 5 random services.
fn node(p: usize, rng: &mut mesh_gen::Rng) -> Node {
    let s = |v: String| Value {
        kind: Some(Kind::StringValue(v)),
    };
    let dependencies: Vec<Value> = if rng.next(10) == 0 {
        vec![s("*".to_string())]
    } else {
        (0..5)
            .map(|_| s(mesh_gen::service(rng.next(SERVICES))))
            .collect()
    };
    let n = |v: u16| Value {
        kind: Some(Kind::NumberValue(f64::from(v))),
    };
    let fields = BTreeMap::from([
        (
            "service_name".to_string(),
            s(mesh_gen::service(p % SERVICES)),
        ),
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
        id: format!("churn-{p}"),
        cluster: mesh_gen::service(p % SERVICES),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

/// What one simulated proxy saw: every assignment it received after `since`, with the time.
#[derive(Default)]
struct Seen {
    subscribed: Vec<String>,
    updates: Vec<(String, Instant)>,
    bytes: usize,
}

/// Opens a delta stream for `node`, subscribes CDS (wildcard) and then the assignments of its
/// EDS clusters, reports on `configured` once both arrived, and then ACKs and records every
/// assignment received until the stream ends.
async fn proxy(channel: Channel, node: Node, seen: Arc<Mutex<Seen>>, configured: mpsc::Sender<()>) {
    let mut client =
        AggregatedDiscoveryServiceClient::new(channel).max_decoding_message_size(256 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(16);
    let send = |req| {
        let tx = tx.clone();
        async move { tx.send(req).await.unwrap_or_else(|e| panic!("send: {e}")) }
    };
    send(DeltaDiscoveryRequest {
        node: Some(node),
        type_url: CDS.to_string(),
        ..Default::default()
    })
    .await;
    let mut rx = client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap_or_else(|e| panic!("stream: {e}"))
        .into_inner();
    let mut subscribed = false;
    let mut configured = Some(configured);
    loop {
        let r = match tokio::time::timeout(Duration::from_secs(600), rx.message()).await {
            Ok(Ok(Some(r))) => r,
            _ => return,
        };
        let now = Instant::now();
        send(delta_ack(&r)).await;
        if r.type_url == CDS && !subscribed {
            let names: Vec<String> = r
                .resources
                .iter()
                .filter_map(|res| res.resource.as_ref())
                .filter_map(|any| Cluster::decode(any.value.as_slice()).ok())
                .filter(|c| c.eds_cluster_config.is_some())
                .map(|c| c.name)
                .collect();
            subscribed = true;
            {
                seen.lock().unwrap_or_else(|e| e.into_inner()).subscribed = names.clone();
            }
            send(DeltaDiscoveryRequest {
                type_url: EDS.to_string(),
                resource_names_subscribe: names,
                ..Default::default()
            })
            .await;
        } else if r.type_url == EDS {
            {
                let mut s = seen.lock().unwrap_or_else(|e| e.into_inner());
                for res in &r.resources {
                    s.bytes += res.resource.as_ref().map_or(0, |a| a.value.len());
                    s.updates.push((res.name.clone(), now));
                }
            }
            if let Some(c) = configured.take() {
                let _ = c.send(()).await;
            }
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let proxies = env_usize("PROXIES", 2000);
    let connections = env_usize("CONNECTIONS", 50).max(1);
    let rate = env_usize("RATE", 20).max(1);
    let secs = env_usize("CHURN_SECS", 60).max(1);
    let ports = std::env::var("CHURN").is_ok_and(|v| v == "ports");

    let consul = FakeConsul::start("dc1").await;
    for s in 0..SERVICES {
        for i in 0..INSTANCES {
            consul.register("dc1", instance(s, i));
        }
    }
    // Plus Consul's own `consul` service, as a real agent lists it.
    let (cp, xds, _, ready) = start_on_consul(
        &consul.url(),
        &["--allow-wildcard", "*"],
        SERVICES * INSTANCES + 1,
        Duration::from_secs(300),
    )
    .await;
    let pid = cp.0.id();

    // The proxies, over `connections` HTTP/2 connections.
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(
            Channel::from_shared(format!("http://127.0.0.1:{xds}"))
                .unwrap_or_else(|e| panic!("{e}"))
                .connect()
                .await
                .unwrap_or_else(|e| panic!("connect: {e}")),
        );
    }
    let (configured_tx, mut configured_rx) = mpsc::channel(proxies.max(1));
    let mut rng = mesh_gen::Rng::new(42);
    let mut seen = Vec::new();
    let t_connect = Instant::now();
    for p in 0..proxies {
        let s = Arc::new(Mutex::new(Seen::default()));
        seen.push(s.clone());
        tokio::spawn(proxy(
            channels[p % connections].clone(),
            node(p, &mut rng),
            s,
            configured_tx.clone(),
        ));
    }
    drop(configured_tx);
    for _ in 0..proxies {
        tokio::time::timeout(Duration::from_secs(300), configured_rx.recv())
            .await
            .unwrap_or_else(|_| panic!("not every proxy configured within 300 s"))
            .unwrap_or_else(|| panic!("a proxy stream ended before it was configured"));
    }
    let configured_in = t_connect.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for s in &seen {
        s.lock().unwrap_or_else(|e| e.into_inner()).updates.clear();
    }
    let sent_before: usize = seen
        .iter()
        .map(|s| s.lock().unwrap_or_else(|e| e.into_inner()).bytes)
        .sum();

    // The churn: `rate` health changes a second for `secs` seconds.
    let (bytes0, state0, service0) = (
        consul.bytes_served_for(""),
        consul.bytes_served_for("/v1/health/state"),
        consul.bytes_served_for("/v1/health/service/"),
    );
    let (requests0, ticks0) = (consul.requests(), cpu_ticks(pid));
    let t0 = Instant::now();
    let period = Duration::from_secs(1) / rate as u32;
    let total = rate * secs;
    let mut changes: Vec<(usize, Instant)> = Vec::with_capacity(total);
    for k in 0..total {
        let due = t0 + period * k as u32;
        tokio::time::sleep_until(due.into()).await;
        let service = k % SERVICES;
        // Round r takes instance r/2 of every service out (r even) or brings it back.
        let round = k / SERVICES;
        let i = (round / 2) % INSTANCES;
        if ports {
            let mut moved = instance(service, i);
            if round.is_multiple_of(2) {
                moved.port = 41000 + i as u16;
            }
            consul.register("dc1", moved);
        } else {
            let health = if round.is_multiple_of(2) {
                Health::Critical
            } else {
                Health::Passing
            };
            let id = format!("{}-{i}", mesh_gen::service(service));
            consul.set_health("dc1", &id, health);
        }
        changes.push((service, Instant::now()));
    }
    let churn = t0.elapsed();
    let ticks = cpu_ticks(pid) - ticks0;
    let (bytes, state_bytes, service_bytes, requests) = (
        consul.bytes_served_for("") - bytes0,
        consul.bytes_served_for("/v1/health/state") - state0,
        consul.bytes_served_for("/v1/health/service/") - service0,
        consul.requests() - requests0,
    );
    // Let the last changes arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = status_kb(pid, "VmRSS:");

    // Propagation: for every change and every stream subscribed to the changed service's
    // cluster, the first assignment of that cluster received after the change.
    let mut latencies = Vec::new();
    let mut missing = 0usize;
    let mut delivered = 0usize;
    for s in &seen {
        let s = s.lock().unwrap_or_else(|e| e.into_inner());
        delivered += s.bytes;
        let mut by_cluster: HashMap<&str, Vec<Instant>> = HashMap::new();
        for (name, at) in &s.updates {
            by_cluster.entry(name.as_str()).or_default().push(*at);
        }
        for (service, at) in &changes {
            let cluster = mesh_gen::service(*service);
            if !s.subscribed.contains(&cluster) {
                continue;
            }
            match by_cluster
                .get(cluster.as_str())
                .and_then(|times| times.iter().find(|t| *t >= at))
            {
                Some(t) => latencies.push(*t - *at),
                None => missing += 1,
            }
        }
    }
    latencies.sort();
    let per_s = |v: u64| v as f64 / churn.as_secs_f64();
    println!(
        "consul_churn: {} instances ({SERVICES} services x {INSTANCES}, {PER_NODE} per node) in the Consul fake, {proxies} delta streams over {connections} connections (10% on \"*\")",
        SERVICES * INSTANCES
    );
    println!(
        "  start to /readyz:                {ready:?}; all streams configured in {configured_in:?}"
    );
    let kind = if ports { "port" } else { "health" };
    println!("  churn:                           {total} {kind} changes in {churn:.1?} ({rate}/s)");
    println!(
        "  meshbridge CPU during the churn: {:.2} cores",
        ticks as f64 / 100.0 / churn.as_secs_f64()
    );
    println!(
        "  read from Consul:                {:.2} MB/s ({:.2} MB/s /v1/health/state, {:.2} MB/s /v1/health/service), {:.1} requests/s",
        per_s(bytes) / 1e6,
        per_s(state_bytes) / 1e6,
        per_s(service_bytes) / 1e6,
        per_s(requests as u64)
    );
    println!(
        "  propagation (change -> stream):  p50 {:?}, p99 {:?}, max {:?} over {} deliveries; {missing} not delivered",
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        latencies.len()
    );
    println!(
        "  sent to the streams:             {:.2} MB/s of assignments",
        per_s((delivered - sent_before) as u64) / 1e6
    );
    println!(
        "  meshbridge RSS after the churn:  {:.0} MiB",
        rss as f64 / 1024.0
    );
}
