//! Load client: runs the release `meshbridge run` over a 1,000 × 5 mesh, opens many ADS
//! streams (no real Envoys) that each complete the CDS → EDS → LDS → RDS handshake with
//! ACKs, then reports the control plane's peak RSS, the time until every stream had its full
//! configuration, and the time one endpoint change takes to reach every stream.
//!
//! `STREAMS` (default 100) and `ADS_GROUPS` (default 50) size the run.
// A bench reads its knobs from the environment and runs one scenario top to bottom.
#![allow(clippy::too_many_lines, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter::ConfigType};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::envoy::service::discovery::v3::{
    DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[path = "support/mesh_gen.rs"]
mod mesh_gen;
#[path = "support/processes.rs"]
mod processes;

use processes::{KillOnDrop, env_usize, free_port, status_kb};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

fn node(group: &meshbridge::model::ProxyGroup, id: usize) -> Node {
    let s = |v: String| Value {
        kind: Some(Kind::StringValue(v)),
    };
    let n = |v: u16| Value {
        kind: Some(Kind::NumberValue(f64::from(v))),
    };
    let mut fields = BTreeMap::new();
    fields.insert("service_name".to_string(), s(group.service.clone()));
    fields.insert(
        "ingress_port".to_string(),
        n(group.ingress_port.unwrap_or(15000)),
    );
    fields.insert("app_port".to_string(), n(group.app_port.unwrap_or(8080)));
    fields.insert(
        "egress_port".to_string(),
        n(group.egress_port.unwrap_or(15001)),
    );
    fields.insert(
        "dependencies".to_string(),
        Value {
            kind: Some(Kind::ListValue(ListValue {
                values: group
                    .dependencies
                    .iter()
                    .map(|d| s(d.to_string()))
                    .collect(),
            })),
        },
    );
    Node {
        id: format!("load-{id}"),
        cluster: group.service.clone(),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

struct Stream {
    tx: mpsc::Sender<DiscoveryRequest>,
    rx: tonic::Streaming<DiscoveryResponse>,
    bytes: usize,
}

impl Stream {
    async fn recv(&mut self) -> DiscoveryResponse {
        let r = tokio::time::timeout(Duration::from_secs(60), self.rx.message())
            .await
            .unwrap_or_else(|_| panic!("no response within 60 s"))
            .unwrap_or_else(|e| panic!("stream failed: {e}"))
            .unwrap_or_else(|| panic!("stream closed"));
        self.bytes += r.resources.iter().map(|a| a.value.len()).sum::<usize>();
        r
    }

    async fn send(
        &self,
        type_url: &str,
        names: Vec<String>,
        ack: Option<&DiscoveryResponse>,
        node: Option<Node>,
    ) {
        let req = DiscoveryRequest {
            node,
            type_url: type_url.to_string(),
            resource_names: names,
            version_info: ack.map(|r| r.version_info.clone()).unwrap_or_default(),
            response_nonce: ack.map(|r| r.nonce.clone()).unwrap_or_default(),
            ..Default::default()
        };
        self.tx
            .send(req)
            .await
            .unwrap_or_else(|e| panic!("send: {e}"));
    }

    /// Receives until a response of `type_url` arrives (others are ACKed).
    async fn recv_type(&mut self, type_url: &str) -> DiscoveryResponse {
        loop {
            let r = self.recv().await;
            if r.type_url == type_url {
                return r;
            }
            self.send(&r.type_url.clone(), vec![], Some(&r), None).await;
        }
    }
}

async fn open(addr: &str, node: Node) -> Stream {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
        .max_decoding_message_size(256 * 1024 * 1024);
    let (tx, rx) = mpsc::channel(16);
    let first = DiscoveryRequest {
        node: Some(node),
        type_url: CDS.to_string(),
        ..Default::default()
    };
    tx.send(first).await.unwrap_or_else(|e| panic!("send: {e}"));
    let rx = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap_or_else(|e| panic!("stream: {e}"))
        .into_inner();
    Stream { tx, rx, bytes: 0 }
}

async fn handshake(s: &mut Stream) {
    let cds = s.recv_type(CDS).await;
    let clusters: Vec<String> = cds
        .resources
        .iter()
        .filter_map(|a| {
            envoy_types::pb::envoy::config::cluster::v3::Cluster::decode(a.value.as_slice()).ok()
        })
        .filter(|c| c.eds_cluster_config.is_some())
        .map(|c| c.name)
        .collect();
    s.send(CDS, vec![], Some(&cds), None).await;
    s.send(EDS, clusters, None, None).await;
    let eds = s.recv_type(EDS).await;
    s.send(EDS, eds_names(&eds), Some(&eds), None).await;
    s.send(LDS, vec![], None, None).await;
    let lds = s.recv_type(LDS).await;
    let routes: Vec<String> = lds
        .resources
        .iter()
        .filter_map(|a| Listener::decode(a.value.as_slice()).ok())
        .flat_map(|l| l.filter_chains.into_iter().flat_map(|fc| fc.filters))
        .filter_map(|f| match f.config_type {
            Some(ConfigType::TypedConfig(any)) => {
                HttpConnectionManager::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .filter_map(|h| match h.route_specifier {
            Some(RouteSpecifier::Rds(r)) => Some(r.route_config_name),
            _ => None,
        })
        .collect();
    s.send(LDS, vec![], Some(&lds), None).await;
    s.send(RDS, routes.clone(), None, None).await;
    let rds = s.recv_type(RDS).await;
    s.send(RDS, routes, Some(&rds), None).await;
}

fn eds_names(r: &DiscoveryResponse) -> Vec<String> {
    r.resources
        .iter()
        .filter_map(|a| {
            envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment::decode(
                a.value.as_slice(),
            )
            .ok()
        })
        .map(|c| c.cluster_name)
        .collect()
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let streams = env_usize("STREAMS", 100);
    let groups = env_usize("ADS_GROUPS", 50);
    let dir = std::env::temp_dir().join(format!("meshbridge-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let manifests = mesh_gen::manifests(1000, 5);
    std::fs::write(dir.join("mesh.yaml"), &manifests).unwrap_or_else(|e| panic!("{e}"));
    let (xds, admin) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args([
            "run",
            "--kube",
            "off",
            "--allow-wildcard",
            "*",
            "--config-poll",
            "200",
        ])
        .arg("--config-dir")
        .arg(&dir)
        .args([
            "--xds-addr",
            &format!("127.0.0.1:{xds}"),
            "--admin-addr",
            &format!("127.0.0.1:{admin}"),
        ])
        .env(
            "MESHBRIDGE_LOG",
            std::env::var("MESHBRIDGE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn meshbridge: {e}"));
    let mut child = KillOnDrop(child);
    let pid = child.0.id();
    let addr = format!("127.0.0.1:{xds}");
    let started = Instant::now();
    while tokio::net::TcpStream::connect(&addr).await.is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "meshbridge did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let state = reqwest::get(format!("http://127.0.0.1:{admin}/api/state"))
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("admin API: {e}"))
        .json::<serde_json::Value>()
        .await
        .unwrap_or_else(|e| panic!("admin API: {e}"));
    assert_eq!(
        state["services"], 1000,
        "the generated mesh did not load: {state}"
    );
    let idle_rss = status_kb(pid, "VmRSS:");

    let all_groups = mesh_gen::groups(1000, groups);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..streams {
        let node = node(&all_groups[i % groups], i);
        let addr = addr.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = open(&addr, node).await;
            handshake(&mut s).await;
            s
        }));
    }
    let mut opened = Vec::new();
    for t in tasks {
        opened.push(t.await.unwrap_or_else(|e| panic!("{e}")));
    }
    let converge = t0.elapsed();
    let bytes: usize = opened.iter().map(|s| s.bytes).sum();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss = status_kb(pid, "VmRSS:");
    let hwm = status_kb(pid, "VmHWM:");

    // One endpoint weight of svc-0000, which every group calls, changes: time until every
    // stream has the new assignment.
    let marker = "port: 31000, tags: [canary], datacenter: dc1, weight: ";
    let first = format!("metadata: {{name: {}}}", mesh_gen::service(0));
    assert!(
        manifests.find(marker) > manifests.find(&first),
        "svc-0000 comes first"
    );
    let changed = manifests.replacen(marker, &format!("{marker}1"), 1);
    assert_ne!(changed, manifests);
    let t1 = Instant::now();
    std::fs::write(dir.join("mesh.yaml"), changed).unwrap_or_else(|e| panic!("{e}"));
    let mut pushes = Vec::new();
    for mut s in opened {
        pushes.push(tokio::spawn(async move {
            let r = s.recv().await;
            s.send(&r.type_url.clone(), eds_names(&r), Some(&r), None)
                .await;
            t1.elapsed()
        }));
    }
    let mut slowest = Duration::ZERO;
    for p in pushes {
        slowest = slowest.max(p.await.unwrap_or_else(|e| panic!("{e}")));
    }
    let _ = child.0.kill();
    let _ = child.0.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "ads_load: 1000 services x 5 endpoints, {streams} streams over {groups} groups (10% of groups with \"*\")"
    );
    println!(
        "  RSS idle (mesh loaded, no streams): {:.1} MiB",
        idle_rss as f64 / 1024.0
    );
    println!(
        "  RSS with {streams} streams:          {:.1} MiB (peak {:.1} MiB)",
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "  all streams fully configured in   {converge:?} ({:.1} MiB of resources sent)",
        bytes as f64 / 1048576.0
    );
    println!(
        "  one endpoint change reached all streams in {slowest:?} (includes the config-dir poll of up to 200 ms and the 100 ms debounce)"
    );
}
