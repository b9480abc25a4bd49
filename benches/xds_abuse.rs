//! What an abusive xDS client costs the release `meshbridge run` under its default limits:
//! its resident memory (VmRSS) before, at the peak of (VmHWM, reset before each attack) and
//! after each of the attacks a review reproduced against an unlimited server:
//! - `groups`: 3,000 streams with distinct groups on ONE connection (unlimited: 18 → 173 MB),
//!   then the same over 12 connections (within the per-connection limit), then 12,000 groups
//!   (past `--xds-max-groups`);
//! - `names`: one Delta request naming 500,000 resources (unlimited: 214 → 512 MB, 960 MB
//!   for a second round), and 300,000 short names (under the message size, past
//!   `--xds-max-names`);
//! - `silent`: 2,000 streams that never send a request (closed by
//!   `--xds-first-request-timeout`).
//!
//! Each line reports how many attempts were served and refused, and the memory; the last,
//! what stays resident once every stream is closed, and what the same attack costs again. The mesh is 200 services × 2 instances
//! from `--config-dir`. `GROUPS` (3000) sizes the first attack.
// A bench reads its knobs from the environment and runs one scenario top to bottom.
#![allow(clippy::too_many_lines, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DiscoveryRequest,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use envoy_types::pb::google::protobuf::{ListValue, Struct, Value, value::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

#[path = "support/mesh_gen.rs"]
mod mesh_gen;
#[path = "support/processes.rs"]
mod processes;

use processes::{start_meshbridge, status_kb, wait_ready};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const SERVICES: usize = 200;

/// A node of service `svc-<i mod SERVICES>` whose dependencies make its group unique.
fn node(i: usize) -> Node {
    let s = |v: String| Value {
        kind: Some(Kind::StringValue(v)),
    };
    let dependencies = vec![
        s(mesh_gen::service(i % SERVICES)),
        s(mesh_gen::service((i / SERVICES) % SERVICES)),
        s(format!("unknown-{i}")),
    ];
    let fields = BTreeMap::from([
        (
            "service_name".to_string(),
            s(mesh_gen::service(i % SERVICES)),
        ),
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
        id: format!("abuse-{i}"),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

/// What became of attempts: served (a response came), refused (a gRPC status), or neither
/// within the time given.
#[derive(Default, Debug)]
struct Outcome {
    served: usize,
    refused: BTreeMap<String, usize>,
    pending: usize,
}

impl Outcome {
    /// Counts one attempt: `None` when it neither was served nor refused in time.
    fn add(&mut self, result: Option<Result<(), String>>) {
        match result {
            None => self.pending += 1,
            Some(Ok(())) => self.served += 1,
            Some(Err(code)) => *self.refused.entry(code).or_default() += 1,
        }
    }

    /// Counts `count` attempts answered on `rx`, waiting until `limit` at most.
    async fn collect(
        count: usize,
        rx: &mut mpsc::Receiver<Result<(), String>>,
        limit: Duration,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let deadline = tokio::time::Instant::now() + limit;
        for _ in 0..count {
            outcome.add(
                tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten(),
            );
        }
        outcome
    }
}

/// Opens a SotW stream for `node` on `channel`, asks for clusters and holds the stream open
/// until `hold` ends. Sends `Ok` once served, `Err(code)` when refused.
async fn sotw(
    channel: Channel,
    node: Node,
    hold: Duration,
    done: mpsc::Sender<Result<(), String>>,
) {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(4);
    let _ = tx
        .send(DiscoveryRequest {
            node: Some(node),
            type_url: CDS.into(),
            ..Default::default()
        })
        .await;
    let result = match client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
    {
        Err(s) => Err(format!("{:?}", s.code())),
        Ok(stream) => {
            let mut stream = stream.into_inner();
            match stream.message().await {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err("closed".into()),
                Err(s) => Err(format!("{:?}", s.code())),
            }
        }
    };
    let served = result.is_ok();
    let _ = done.send(result).await;
    if served {
        tokio::time::sleep(hold).await;
    }
    drop(tx);
}

async fn connect(xds: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{xds}"))
        .unwrap_or_else(|e| panic!("{e}"))
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect: {e}"))
}

/// Opens `count` streams of distinct groups (from `first`) over `connections` connections,
/// waits up to 30 s for each to be served or refused, and keeps the served ones open 20 s.
async fn groups(xds: u16, first: usize, count: usize, connections: usize) -> Outcome {
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(connect(xds).await);
    }
    let (tx, mut rx) = mpsc::channel(count);
    for i in 0..count {
        tokio::spawn(sotw(
            channels[i % connections].clone(),
            node(first + i),
            Duration::from_secs(20),
            tx.clone(),
        ));
    }
    drop(tx);
    Outcome::collect(count, &mut rx, Duration::from_secs(30)).await
}

/// One Delta request subscribing to `names` EDS resources of `len` bytes each.
async fn many_names(xds: u16, names: usize, len: usize) -> Outcome {
    let mut client = AggregatedDiscoveryServiceClient::new(connect(xds).await)
        .max_encoding_message_size(usize::MAX);
    let (tx, rx) = mpsc::channel(2);
    let _ = tx
        .send(DeltaDiscoveryRequest {
            node: Some(node(1_000_000)),
            type_url: EDS.into(),
            resource_names_subscribe: (0..names).map(|i| format!("{i:0len$}")).collect(),
            ..Default::default()
        })
        .await;
    let mut outcome = Outcome::default();
    let result = match client
        .delta_aggregated_resources(ReceiverStream::new(rx))
        .await
    {
        Err(s) => Err(format!("{:?}", s.code())),
        Ok(stream) => {
            match tokio::time::timeout(Duration::from_secs(30), stream.into_inner().message()).await
            {
                Ok(Ok(Some(_))) => Ok(()),
                Ok(Ok(None)) => Err("closed".into()),
                Ok(Err(s)) => Err(format!("{:?}", s.code())),
                Err(_) => Err("no answer in 30 s".into()),
            }
        }
    };
    outcome.add(Some(result));
    outcome
}

/// `count` streams that never send anything, over 8 connections; waits for their end.
async fn silent(xds: u16, count: usize) -> Outcome {
    let mut channels = Vec::new();
    for _ in 0..8 {
        channels.push(connect(xds).await);
    }
    let (done, mut rx) = mpsc::channel(count);
    let mut keep = Vec::new();
    for i in 0..count {
        let channel = channels[i % channels.len()].clone();
        let done = done.clone();
        let (tx, requests) = mpsc::channel::<DiscoveryRequest>(1);
        keep.push(tx);
        tokio::spawn(async move {
            let mut client = AggregatedDiscoveryServiceClient::new(channel);
            let result = match client
                .stream_aggregated_resources(ReceiverStream::new(requests))
                .await
            {
                Err(s) => Err(format!("{:?}", s.code())),
                Ok(stream) => match stream.into_inner().message().await {
                    Ok(_) => Err("closed".into()),
                    Err(s) => Err(format!("{:?}", s.code())),
                },
            };
            let _ = done.send(result).await;
        });
    }
    drop(done);
    let outcome = Outcome::collect(count, &mut rx, Duration::from_secs(60)).await;
    drop(keep);
    outcome
}

/// Resets the peak resident size of `pid` (`/proc/PID/clear_refs`, value 5).
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

#[tokio::main]
async fn main() {
    let group_count: usize = std::env::var("GROUPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000);
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    std::fs::write(
        dir.path().join("mesh.yaml"),
        mesh_gen::manifests(SERVICES, 2),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let config_dir = dir.path().display().to_string();
    let started = Instant::now();
    let (cp, xds, admin) = start_meshbridge(
        &[
            "--kube",
            "off",
            "--config-dir",
            &config_dir,
            "--allow-wildcard",
            "*",
        ],
        &[],
    );
    wait_ready(&admin, started, Duration::from_secs(60)).await;
    let pid = cp.0.id();
    println!(
        "meshbridge with default limits, {SERVICES} services; baseline RSS {:.1} MB",
        mb(status_kb(pid, "VmRSS:"))
    );
    println!(
        "{:<44} {:>7} {:>30} {:>8} {:>9} {:>9}",
        "attack", "served", "refused", "pending", "peak MB", "after MB"
    );
    let report = |what: &str, o: Outcome| {
        let refused = o
            .refused
            .iter()
            .map(|(code, n)| format!("{n} {code}"))
            .collect::<Vec<_>>()
            .join(", ");
        println!(
            "{what:<44} {:>7} {refused:>30} {:>8} {:>9.1} {:>9.1}",
            o.served,
            o.pending,
            mb(status_kb(pid, "VmHWM:")),
            mb(status_kb(pid, "VmRSS:"))
        );
    };

    reset_peak(pid);
    let o = groups(xds, 0, group_count, 1).await;
    report(&format!("{group_count} groups on one connection"), o);
    tokio::time::sleep(Duration::from_secs(22)).await;
    reset_peak(pid);
    let o = groups(xds, 100_000, group_count, 12).await;
    report(&format!("{group_count} groups on 12 connections"), o);
    tokio::time::sleep(Duration::from_secs(22)).await;
    reset_peak(pid);
    let o = groups(xds, 200_000, 12_000, 60).await;
    report("12000 groups on 60 connections", o);
    tokio::time::sleep(Duration::from_secs(22)).await;

    for round in 1..=2 {
        reset_peak(pid);
        let o = many_names(xds, 500_000, 10).await;
        report(&format!("500000 names in one request (round {round})"), o);
    }
    reset_peak(pid);
    let o = many_names(xds, 300_000, 6).await;
    report("300000 short names in one request", o);

    reset_peak(pid);
    let o = silent(xds, 2000).await;
    report("2000 silent streams", o);

    // Every stream gone: what stays resident.
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let proxies = processes::get_json(&format!("{admin}/api/proxies")).await;
        if proxies
            .as_ref()
            .and_then(|p| p.as_array())
            .is_some_and(Vec::is_empty)
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    reset_peak(pid);
    report("(every stream closed)", Outcome::default());
    // The same groups again: memory freed by the closed streams is reused, not added to.
    reset_peak(pid);
    let o = groups(xds, 200_000, 9_000, 60).await;
    report("9000 groups again on 60 connections", o);

    let metrics = reqwest::get(format!("{admin}/metrics"))
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .text()
        .await
        .unwrap_or_default();
    for line in metrics.lines().filter(|l| {
        l.starts_with("meshbridge_xds_limited_total") || l.starts_with("meshbridge_snapshot_groups")
    }) {
        println!("{line}");
    }
    drop(cp);
}
