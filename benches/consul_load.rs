//! Consul at scale: the release `meshbridge run` watching the Consul fake with 1,000
//! services × 5 instances. Reports the time to `/readyz`, the open connections to the agent,
//! the CPU used while idle (blocking queries parked), and the time from one instance's health
//! changing in Consul to the new assignment being ACKed by a connected real Envoy (median of
//! 20).
// A bench reads its knobs from the environment and runs one scenario top to bottom.
#![allow(clippy::too_many_lines, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

// The fakes of the test kit; a bench uses only part of them.
#[allow(dead_code)]
#[path = "../tests/it/support/consul_fake.rs"]
mod consul_fake;
#[path = "support/processes.rs"]
mod processes;

use consul_fake::{FakeConsul, Health, Instance};
use processes::{ack_latencies, cpu_ticks, start_envoy, start_on_consul};

fn instance(service: usize, i: usize) -> Instance {
    Instance::new(
        &format!("svc-{service:04}"),
        &format!("svc-{service:04}-{i}"),
        &format!("10.{}.{}.{}", service / 250, service % 250, i + 1),
        31000 + i as u16,
    )
}

#[tokio::main]
async fn main() {
    let consul = FakeConsul::start("dc1").await;
    for s in 0..1000 {
        for i in 0..5 {
            consul.register("dc1", instance(s, i));
        }
    }
    let dir = std::env::temp_dir().join(format!("meshbridge-consul-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    // Plus Consul's own `consul` service, as a real agent lists it.
    let (cp, xds, admin_url, ready) =
        start_on_consul(&consul.url(), &[], 5001, Duration::from_secs(120)).await;
    let pid = cp.0.id();

    // A real Envoy calling svc-0000.
    let _envoy = start_envoy(xds, "svc-0000", &dir);
    processes::wait_acked(&admin_url, None).await;

    // Idle: blocking queries parked, nothing changes.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ticks_per_s = 100.0; // USER_HZ on Linux
    let (t0, c0) = (Instant::now(), cpu_ticks(pid));
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle_cpu = (cpu_ticks(pid) - c0) as f64 / ticks_per_s / t0.elapsed().as_secs_f64() * 100.0;
    let open = consul.open_connections();

    // An instance's checks failing and passing again (flap damping off, so each flip is
    // one change).
    let latencies = ack_latencies(&admin_url, |round| {
        let health = if round % 2 == 0 {
            Health::Critical
        } else {
            Health::Passing
        };
        consul.set_health("dc1", "svc-0000-0", health);
    })
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    println!("consul_load: 1000 services x 5 instances in the Consul fake, one real Envoy");
    println!("  start to /readyz:                 {ready:?}");
    println!(
        "  open connections to the agent:    {open} now, {} at most",
        consul.max_open_connections()
    );
    println!("  CPU while idle:                   {idle_cpu:.2}% of one core");
    println!(
        "  health change -> ACKed by Envoy:   median {:?}, min {:?}, max {:?} (20 changes; includes the 100 ms debounce)",
        latencies[10], latencies[0], latencies[19]
    );
}
