//! What load reports (LRS) cost the release `meshbridge run`: `PROXIES` (2,000) simulated
//! Envoys keep one LRS stream each and report every `INTERVAL` seconds (10) for `SECONDS`
//! (60), each report naming `CLUSTERS` (5) clusters of the mesh with two localities (its
//! static hosts in two datacenters) — what a real fleet sends. The mesh is 1,000 services ×
//! 5 instances from `--config-dir`. Reports are spread evenly over the interval.
//!
//! Printed: reports sent and accepted (`meshbridge_load_reports_total`), meshbridge's CPU
//! over the reporting window (cores), its resident memory before the streams open, with
//! them open, and at the end (VmRSS, VmHWM), and the keys the book holds.
// A bench reads its knobs from the environment and runs one scenario top to bottom.
#![allow(clippy::too_many_lines, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::config::endpoint::v3::{ClusterStats, UpstreamLocalityStats};
use envoy_types::pb::envoy::service::load_stats::v3::{
    LoadStatsRequest, load_reporting_service_client::LoadReportingServiceClient,
};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

#[path = "support/mesh_gen.rs"]
mod mesh_gen;
#[path = "support/processes.rs"]
mod processes;

use processes::{cpu_ticks, env_usize, start_meshbridge, status_kb, wait_ready};

const SERVICES: usize = 1000;

fn node(i: usize) -> Node {
    let fields = BTreeMap::from([(
        "service_name".to_string(),
        Value {
            kind: Some(Kind::StringValue(mesh_gen::service(i % SERVICES))),
        },
    )]);
    Node {
        id: format!("lrs-{i}"),
        metadata: Some(Struct {
            fields: fields.into_iter().collect(),
        }),
        ..Default::default()
    }
}

/// One report of proxy `i`: `clusters` of its dependencies, each with its two datacenters'
/// localities and a few requests.
fn report(i: usize, clusters: usize, round: u64) -> LoadStatsRequest {
    let locality = |zone: &str, n: u64| UpstreamLocalityStats {
        locality: Some(Locality {
            zone: zone.to_string(),
            sub_zone: "config".to_string(),
            ..Default::default()
        }),
        total_successful_requests: n,
        total_error_requests: n / 50,
        total_issued_requests: n + n / 50,
        ..UpstreamLocalityStats::default()
    };
    LoadStatsRequest {
        node: (round == 0).then(|| node(i)),
        cluster_stats: (0..clusters)
            .map(|c| ClusterStats {
                cluster_name: mesh_gen::service((i * 7 + c * 13) % SERVICES),
                upstream_locality_stats: vec![
                    locality("dc1", 100 + round % 7),
                    locality("dc2", 10 + round % 3),
                ],
                ..Default::default()
            })
            .collect(),
    }
}

fn main() {
    let proxies = env_usize("PROXIES", 2000);
    let interval = env_usize("INTERVAL", 10) as u64;
    let seconds = env_usize("SECONDS", 60) as u64;
    let clusters = env_usize("CLUSTERS", 5);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    runtime.block_on(async move {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        // Five hosts per service, four in dc1 and one in dc2: reports name real localities.
        std::fs::write(
            dir.path().join("mesh.yaml"),
            mesh_gen::manifests(SERVICES, 5),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let config_dir = dir.path().display().to_string();
        let started = Instant::now();
        let interval_ms = (interval * 1000).to_string();
        let (cp, xds, admin) = start_meshbridge(
            &[
                "--kube",
                "off",
                "--config-dir",
                &config_dir,
                "--consul-datacenter",
                "dc1",
                "--consul-datacenter",
                "dc2",
                "--load-report-interval",
                &interval_ms,
            ],
            &[],
        );
        wait_ready(&admin, started, Duration::from_secs(60)).await;
        let pid = cp.0.id();
        let rss_idle = status_kb(pid, "VmRSS:");

        // 2,000 streams over 20 connections, as a fleet behind a few gateways would not:
        // each Envoy has its own, but the server's cost is per stream either way.
        let mut channels = Vec::new();
        for _ in 0..20 {
            channels.push(
                tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{xds}"))
                    .unwrap_or_else(|e| panic!("{e}"))
                    .connect()
                    .await
                    .unwrap_or_else(|e| panic!("{e}")),
            );
        }
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        for i in 0..proxies {
            let (tx, rx) = mpsc::channel::<LoadStatsRequest>(4);
            let mut client = LoadReportingServiceClient::new(channels[i % channels.len()].clone());
            tasks.push(tokio::spawn(async move {
                let mut answers = client
                    .stream_load_stats(ReceiverStream::new(rx))
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
                    .into_inner();
                while let Ok(Some(_)) = answers.message().await {}
            }));
            tx.send(LoadStatsRequest {
                node: Some(node(i)),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
            senders.push(tx);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss_open = status_kb(pid, "VmRSS:");
        let ticks_before = cpu_ticks(pid);
        let window = Instant::now();
        let mut sent = 0u64;
        let rounds = seconds / interval;
        let step = Duration::from_secs(interval).as_secs_f64() / proxies as f64;
        for round in 0..rounds {
            let round_start = Instant::now();
            for (i, tx) in senders.iter().enumerate() {
                let due = Duration::from_secs_f64(step * i as f64);
                if let Some(wait) = due.checked_sub(round_start.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
                if tx.send(report(i, clusters, round + 1)).await.is_ok() {
                    sent += 1;
                }
            }
            if let Some(wait) = Duration::from_secs(interval).checked_sub(round_start.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let cpu = (cpu_ticks(pid) - ticks_before) as f64
            / 100.0
            / window.elapsed().as_secs_f64();
        let rss_end = status_kb(pid, "VmRSS:");
        let hwm = status_kb(pid, "VmHWM:");
        let metrics = reqwest::get(format!("{admin}/metrics"))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let accepted = metrics
            .lines()
            .find(|l| l.starts_with("meshbridge_load_reports_total{result=\"accepted\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("0")
            .to_string();
        let detail = reqwest::get(format!("{admin}/api/services/{}", mesh_gen::service(13)))
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .text()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let shown = detail.contains("\"last_5_minutes\":[{");
        println!(
            "load reports: {proxies} proxies, {clusters} clusters each, every {interval} s for {seconds} s"
        );
        println!("  reports sent {sent}, accepted {accepted}; a service's load shown: {shown}");
        println!("  meshbridge CPU {cpu:.3} cores over the reporting window");
        println!(
            "  RSS {} MiB idle, {} MiB with the streams open, {} MiB at the end (peak {} MiB)",
            rss_idle / 1024,
            rss_open / 1024,
            rss_end / 1024,
            hwm / 1024
        );
        drop(senders);
        for t in tasks {
            t.abort();
        }
    });
}
