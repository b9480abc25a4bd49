//! Kubernetes at scale: the release `meshbridge run` watching the Kubernetes API fake with
//! 1,000 MeshServices selecting 5,000 pods (5 each). Reports the time to `/readyz`, the
//! memory meshbridge keeps (RSS and its peak), and the time from a MeshService change, and
//! from a pod turning unready, to the new assignment being ACKed by a connected real Envoy
//! (median of 20 each).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/support/kube_fake.rs"]
mod kube_fake;

use kube_fake::FakeKube;
use serde_json::json;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

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

async fn get_json(url: &str) -> Option<serde_json::Value> {
    reqwest::get(url).await.ok()?.json().await.ok()
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

/// Waits until the one connected proxy has ACKed an EDS version other than `previous`.
async fn wait_acked(proxies_url: &str, previous: Option<&str>) -> String {
    let eds = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    let started = Instant::now();
    loop {
        if let Some(proxies) = get_json(proxies_url).await
            && let Some(t) = proxies
                .as_array()
                .and_then(|a| a.first())
                .map(|p| &p["types"][eds])
            && let (Some(sent), Some(acked)) = (t["sent"].as_str(), t["acked"].as_str())
            && sent == acked
            && Some(acked) != previous
        {
            return acked.to_string();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no new version ACKed within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
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
    let envoy_bin = std::env::var("ENVOY_BIN")
        .unwrap_or_else(|_| format!("{}/.venv/bin/envoy", env!("CARGO_MANIFEST_DIR")));
    let dir = std::env::temp_dir().join(format!("meshbridge-kube-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let kubeconfig = kube.write_kubeconfig(&dir);
    let (xds, admin) = (free_port(), free_port());
    let started = Instant::now();
    let cp = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_meshbridge"))
            .args(["run", "--kube", "auto"])
            .env("KUBECONFIG", &kubeconfig)
            .args([
                "--xds-addr",
                &format!("127.0.0.1:{xds}"),
                "--admin-addr",
                &format!("127.0.0.1:{admin}"),
            ])
            .env("MESHBRIDGE_LOG", "warn")
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn meshbridge: {e}")),
    );
    let pid = cp.0.id();
    let admin_url = format!("http://127.0.0.1:{admin}");
    loop {
        if let Ok(r) = reqwest::get(format!("{admin_url}/readyz")).await
            && r.status() == 200
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not ready within 120 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ready = started.elapsed();
    let state = get_json(&format!("{admin_url}/api/state"))
        .await
        .unwrap_or_default();
    assert_eq!(
        state["endpoints"], 5000,
        "ready before every pod was published: {state}"
    );

    // A real Envoy calling svc-0000.
    let bootstrap = Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args(["bootstrap", "--service", "bench", "--node-id", "bench-1"])
        .args(["--xds-addr", &format!("127.0.0.1:{xds}")])
        .args(["--egress-port", &free_port().to_string()])
        .args(["--admin-port", &free_port().to_string()])
        .args(["--dependency", "svc-0000"])
        .output()
        .unwrap_or_else(|e| panic!("{e}"));
    let file = dir.join("envoy.yaml");
    std::fs::write(&file, &bootstrap.stdout).unwrap_or_else(|e| panic!("{e}"));
    let _envoy = KillOnDrop(
        Command::new(&envoy_bin)
            .arg("-c")
            .arg(&file)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ])
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {envoy_bin}: {e}")),
    );
    let proxies_url = format!("{admin_url}/api/proxies");
    let mut version = wait_acked(&proxies_url, None).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss, peak) = memory_mib(pid);

    let mut spec_changes = Vec::new();
    for round in 0..20u16 {
        let t = Instant::now();
        kube.apply(mesh_service(0, Some(20000 + round)));
        version = wait_acked(&proxies_url, Some(&version)).await;
        spec_changes.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    spec_changes.sort();
    let mut pod_changes = Vec::new();
    for round in 0..20u16 {
        let t = Instant::now();
        kube.apply(pod(0, 0, round % 2 == 1));
        version = wait_acked(&proxies_url, Some(&version)).await;
        pod_changes.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    pod_changes.sort();
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
