//! Kubernetes at scale: the release `meshbridge run` watching the Kubernetes API fake with
//! 1,000 MeshServices selecting 5,000 pods (5 each). Reports the time to `/readyz`, the
//! memory meshbridge keeps (RSS and its peak), and the time from a MeshService change, and
//! from a pod turning unready, to the new assignment being ACKed by a connected real Envoy
//! (median of 20 each).
// A bench reads its knobs from the environment and runs one scenario top to bottom.
#![allow(clippy::too_many_lines, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

// The fakes of the test kit; a bench uses only part of them.
#[allow(dead_code)]
#[path = "../tests/it/support/kube_fake.rs"]
mod kube_fake;
#[path = "support/processes.rs"]
mod processes;

use kube_fake::FakeKube;
use processes::{ack_latencies, get_json, start_envoy, start_meshbridge, wait_ready};
use serde_json::json;

/// `VmRSS` and `VmHWM` of a process, in MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mesh_service(s: usize, extra_port: Option<u16>) -> serde_json::Value {
    let endpoints: Vec<_> = extra_port
        .map(|p| json!({"address": "10.255.0.1", "port": p}))
        .into_iter()
        .collect();
    json!({
        "apiVersion": "meshbridge.io/v1alpha1",
        "kind": "MeshService",
        "metadata": {"name": format!("svc-{s:04}"), "namespace": "shop"},
        "spec": {
            "selector": {"app": format!("svc-{s:04}")},
            "ports": [{"port": 8080}],
            "endpoints": endpoints,
        },
    })
}

fn pod(s: usize, i: usize, ready: bool) -> serde_json::Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": format!("svc-{s:04}-{i}"),
            "namespace": "shop",
            "labels": {"app": format!("svc-{s:04}"), "pod-template-hash": "5d8f7c9b6"},
        },
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1.0"}]},
        "status": {
            "phase": "Running",
            "podIP": format!("10.{}.{}.{}", s / 250, s % 250, i + 1),
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

#[tokio::main]
async fn main() {
    let kube = FakeKube::start().await;
    for s in 0..1000 {
        kube.apply(mesh_service(s, None));
        for i in 0..5 {
            kube.apply(pod(s, i, true));
        }
    }
    let dir = std::env::temp_dir().join(format!("meshbridge-kube-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let kubeconfig = kube.write_kubeconfig(&dir);
    let started = Instant::now();
    let (cp, xds, admin_url) =
        start_meshbridge(&["--kube", "auto"], &[("KUBECONFIG", &kubeconfig)]);
    let pid = cp.0.id();
    let ready = wait_ready(&admin_url, started, Duration::from_secs(120)).await;
    let state = get_json(&format!("{admin_url}/api/state"))
        .await
        .unwrap_or_default();
    assert_eq!(
        state["endpoints"], 5000,
        "ready before every pod was published: {state}"
    );

    // A real Envoy calling svc-0000.
    let _envoy = start_envoy(xds, "svc-0000", &dir);
    processes::wait_acked(&admin_url, None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, peak) = memory_mib(pid);

    let spec_changes = ack_latencies(&admin_url, |round| {
        kube.apply(mesh_service(0, Some(20000 + round)));
    })
    .await;
    let pod_changes = ack_latencies(&admin_url, |round| {
        kube.apply(pod(0, 0, round % 2 == 1));
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    println!("kube_load: 1000 MeshServices, 5000 pods in the Kubernetes API fake, one real Envoy");
    println!("  start to /readyz:                     {ready:?}");
    println!("  meshbridge memory:                    RSS {rss:.1} MiB, peak {peak:.1} MiB");
    println!(
        "  MeshService change -> ACKed by Envoy: median {:?}, min {:?}, max {:?} (20 changes; includes the 100 ms debounce)",
        spec_changes[10], spec_changes[0], spec_changes[19]
    );
    println!(
        "  pod readiness change -> ACKed:        median {:?}, min {:?}, max {:?} (20 changes)",
        pod_changes[10], pod_changes[0], pod_changes[19]
    );
}
