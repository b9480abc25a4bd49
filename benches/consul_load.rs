//! Consul at scale: the release `meshbridge run` watching the Consul fake with 1,000
//! services × 5 instances. Reports the time to `/readyz`, the open connections to the agent,
//! the CPU used while idle (blocking queries parked), and the time from one instance change
//! in Consul to the new assignment being ACKed by a connected real Envoy (median of 20).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/support/consul_fake.rs"]
mod consul_fake;

use consul_fake::{FakeConsul, Instance};

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

fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15; after the command they are at 11 and 12.
    fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
}

async fn get_json(url: &str) -> Option<serde_json::Value> {
    reqwest::get(url).await.ok()?.json().await.ok()
}

fn instance(service: usize, i: usize, weight: u32) -> Instance {
    Instance::new(
        &format!("svc-{service:04}"),
        &format!("svc-{service:04}-{i}"),
        &format!("10.{}.{}.{}", service / 250, service % 250, i + 1),
        31000 + i as u16,
    )
    .weight(weight)
}

#[tokio::main]
async fn main() {
    let consul = FakeConsul::start("dc1").await;
    for s in 0..1000 {
        for i in 0..5 {
            consul.register("dc1", instance(s, i, 1));
        }
    }
    let envoy_bin = std::env::var("ENVOY_BIN")
        .unwrap_or_else(|_| format!("{}/.venv/bin/envoy", env!("CARGO_MANIFEST_DIR")));
    let dir = std::env::temp_dir().join(format!("meshbridge-consul-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let (xds, admin) = (free_port(), free_port());
    let started = Instant::now();
    let cp = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_meshbridge"))
            .args(["run", "--kube", "off", "--consul-addr", &consul.url()])
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
    // Plus Consul's own `consul` service, as a real agent lists it.
    assert_eq!(
        state["endpoints"], 5001,
        "ready before the whole catalog was published: {state}"
    );

    // A real Envoy calling svc-0000.
    let bootstrap = Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args([
            "bootstrap",
            "--service",
            "bench",
            "--node-id",
            "bench-1",
            "--xds-addr",
            &format!("127.0.0.1:{xds}"),
        ])
        .args([
            "--egress-port",
            &free_port().to_string(),
            "--admin-port",
            &free_port().to_string(),
            "--dependency",
            "svc-0000",
        ])
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
    let eds = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    let acked = || async {
        let proxies = get_json(&format!("{admin_url}/api/proxies")).await?;
        let t = &proxies.as_array()?.first()?["types"][eds];
        let (sent, acked) = (t["sent"].as_str()?, t["acked"].as_str()?);
        (sent == acked).then(|| acked.to_string())
    };
    let wait_start = Instant::now();
    let mut version = loop {
        if let Some(v) = acked().await {
            break v;
        }
        assert!(
            wait_start.elapsed() < Duration::from_secs(30),
            "Envoy did not connect"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };

    // Idle: blocking queries parked, nothing changes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = (cpu_ticks(pid) - c0) as f64 / ticks_per_s / t0.elapsed().as_secs_f64() * 100.0;
    let open = consul.open_connections();

    let mut latencies = Vec::new();
    for round in 0..20u32 {
        let t = Instant::now();
        consul.register("dc1", instance(0, 0, 2 + round % 50));
        let new = loop {
            if let Some(v) = acked().await
                && v != version
            {
                break v;
            }
            assert!(t.elapsed() < Duration::from_secs(30), "change not ACKed");
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        latencies.push(t.elapsed());
        version = new;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    latencies.sort();
    let _ = std::fs::remove_dir_all(&dir);
    println!("consul_load: 1000 services x 5 instances in the Consul fake, one real Envoy");
    println!("  start to /readyz:                 {ready:?}");
    println!(
        "  open connections to the agent:    {open} now, {} at most",
        consul.max_open_connections()
    );
    println!("  CPU while idle:                   {idle_cpu:.2}% of one core");
    println!(
        "  instance change -> ACKed by Envoy: median {:?}, min {:?}, max {:?} (20 changes; includes the 100 ms debounce)",
        latencies[10], latencies[0], latencies[19]
    );
}
