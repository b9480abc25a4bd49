//! Processes the scale benchmarks run: the release `meshbridge run` and a real Envoy, and the
//! admin API calls that tell when they are ready and what they ACKed.
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A bench's knob: the environment variable `name` as a number, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The ACK a simulated Envoy sends for a delta xDS response.
pub fn delta_ack(
    r: &envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryResponse,
) -> envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
    envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest {
        type_url: r.type_url.clone(),
        response_nonce: r.nonce.clone(),
        ..Default::default()
    }
}

/// A child process killed when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user + system) of process `pid` so far, in clock ticks (`USER_HZ`, 100 a
/// second on Linux).
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // utime and stime are fields 14 and 15; after the command's closing parenthesis they are
    // at 11 and 12.
    let fields: Vec<u64> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    fields.iter().sum()
}

/// A field of `/proc/<pid>/status` in KiB (`"VmRSS:"`, `"VmHWM:"`).
pub fn status_kb(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A port free on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// GET a URL as JSON.
pub async fn get_json(url: &str) -> Option<serde_json::Value> {
    reqwest::get(url).await.ok()?.json().await.ok()
}

/// Starts `meshbridge run` with `args` (plus run-time xDS and admin ports) and `env`.
/// Returns the process, the xDS port and the admin URL.
pub fn start_meshbridge(args: &[&str], env: &[(&str, &Path)]) -> (KillOnDrop, u16, String) {
    let (xds, admin) = (free_port(), free_port());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshbridge"));
    cmd.arg("run")
        .args(args)
        .args(["--xds-addr", &format!("127.0.0.1:{xds}")])
        .args(["--admin-addr", &format!("127.0.0.1:{admin}")])
        .env(
            "MESHBRIDGE_LOG",
            std::env::var("MESHBRIDGE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn meshbridge: {e}"));
    (KillOnDrop(child), xds, format!("http://127.0.0.1:{admin}"))
}

/// Starts `meshbridge run` on the Consul agent at `consul_url` (Kubernetes off, flap damping
/// off, plus `extra`), waits for `/readyz` and checks that the published state holds
/// `endpoints` instances. Returns the process, the xDS port, the admin URL and the time to
/// ready.
pub async fn start_on_consul(
    consul_url: &str,
    extra: &[&str],
    endpoints: usize,
    limit: Duration,
) -> (KillOnDrop, u16, String, Duration) {
    let started = Instant::now();
    let mut args = vec![
        "--kube",
        "off",
        "--consul-addr",
        consul_url,
        "--consul-flap-hold",
        "0",
    ];
    args.extend_from_slice(extra);
    let (cp, xds, admin_url) = start_meshbridge(&args, &[]);
    let ready = wait_ready(&admin_url, started, limit).await;
    let state = get_json(&format!("{admin_url}/api/state"))
        .await
        .unwrap_or_default();
    assert_eq!(
        state["endpoints"], endpoints,
        "ready before the whole catalog was published: {state}"
    );
    (cp, xds, admin_url, ready)
}

/// Waits for `/readyz` (at most `limit`) and returns how long it took since `started`.
pub async fn wait_ready(admin_url: &str, started: Instant, limit: Duration) -> Duration {
    loop {
        if let Ok(r) = reqwest::get(format!("{admin_url}/readyz")).await
            && r.status() == 200
        {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "not ready within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Starts a real Envoy (node `bench-1`) bootstrapped by `meshbridge bootstrap` to depend on
/// `dependency`, with its files in `dir`.
pub fn start_envoy(xds: u16, dependency: &str, dir: &Path) -> KillOnDrop {
    let args = [
        "--node-id",
        "bench-1",
        "--egress-port",
        &free_port().to_string(),
        "--dependency",
        dependency,
    ]
    .map(String::from);
    start_envoy_with(xds, "bench", &args, dir)
}

/// Starts a real Envoy for `service` bootstrapped by `meshbridge bootstrap` with `args` (node
/// id `service` unless `args` names one), its admin on a free port, its files in `dir`.
pub fn start_envoy_with(xds: u16, service: &str, args: &[String], dir: &Path) -> KillOnDrop {
    let envoy_bin = std::env::var("ENVOY_BIN")
        .unwrap_or_else(|_| format!("{}/.venv/bin/envoy", env!("CARGO_MANIFEST_DIR")));
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshbridge"));
    cmd.args(["bootstrap", "--service", service])
        .args(["--xds-addr", &format!("127.0.0.1:{xds}")])
        .args(["--admin-port", &free_port().to_string()])
        .args(args);
    if !args.iter().any(|a| a == "--node-id") {
        cmd.args(["--node-id", service]);
    }
    let bootstrap = cmd.output().unwrap_or_else(|e| panic!("{e}"));
    assert!(
        bootstrap.status.success(),
        "bootstrap: {}",
        String::from_utf8_lossy(&bootstrap.stderr)
    );
    let file = dir.join(format!("{service}-envoy.yaml"));
    std::fs::write(&file, &bootstrap.stdout).unwrap_or_else(|e| panic!("{e}"));
    KillOnDrop(
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
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {envoy_bin}: {e}")),
    )
}

/// Runs `openssl` in `dir`; panics with its message on an error.
pub fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl: {e}"));
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits until the one connected proxy has ACKed an EDS version other than `previous`.
pub async fn wait_acked(admin_url: &str, previous: Option<&str>) -> String {
    let eds = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    let url = format!("{admin_url}/api/proxies");
    let started = Instant::now();
    loop {
        if let Some(proxies) = get_json(&url).await
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

/// Runs `change(round)` 20 times and measures each until Envoy ACKs the new assignment;
/// sorted.
pub async fn ack_latencies(admin_url: &str, mut change: impl FnMut(u16)) -> Vec<Duration> {
    let mut version = wait_acked(admin_url, None).await;
    let mut latencies = Vec::new();
    for round in 0..20u16 {
        let t = Instant::now();
        change(round);
        version = wait_acked(admin_url, Some(&version)).await;
        latencies.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    latencies.sort();
    latencies
}
