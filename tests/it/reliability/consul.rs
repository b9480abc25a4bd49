//! Consul failing in every way an agent and its servers fail: the agent down or slow, its
//! servers without a leader, reads rate-limited, every datacenter down, one datacenter cut off, and
//! Consul back with an index lower than before. In each, Envoys keep the last known instances
//! (traffic never fails, nothing is emptied), `/api/sources` says what is wrong, and once
//! Consul is back the mesh follows what changed meanwhile within [`RECOVERY`].

use std::time::{Duration, Instant};

use crate::support::consul_fake::{Instance, Outage};
use crate::support::consul_mesh::ConsulMesh;
use crate::support::faults::Fault as Toxic;
use crate::support::{Traffic, eventually};

/// How long after Consul is back the mesh must follow what changed while it was away: the
/// client's longest backoff (5 s) plus a blocking query, a fetch and a push, with room for a
/// loaded machine.
const RECOVERY: Duration = Duration::from_secs(20);

/// How long a fault lasts after meshbridge has noticed it: several backoffs, so retries
/// meet it too.
const HELD: Duration = Duration::from_secs(3);

/// The ways Consul fails in this suite.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// The local agent is down: connections are refused.
    AgentDown,
    /// The agent is up, its servers have no leader (`500 No cluster leader`).
    NoLeader,
    /// The servers rate-limit reads (`429`).
    RateLimited,
    /// Neither datacenter's servers answer (`500 No path to datacenter` for both).
    AllDatacentersDown,
    /// dc2 is cut off; dc1 keeps answering.
    Dc2CutOff,
    /// The agent comes back with its index restarted lower (servers rebuilt, a snapshot
    /// restored), answering blocking queries as Consul's servers do.
    BackWithLowerIndex,
}

impl Fault {
    /// Whether dc1 stays visible during the fault.
    fn dc1_followed(self) -> bool {
        matches!(self, Fault::Dc2CutOff)
    }

    /// The sources `/api/sources` must mark during the fault.
    fn failing_sources(self) -> &'static [&'static str] {
        if self.dc1_followed() {
            &["consul:dc2"]
        } else {
            &["consul:dc1", "consul:dc2"]
        }
    }

    async fn apply(self, mesh: &mut ConsulMesh) {
        let consul = &mut mesh.consul;
        match self {
            Fault::AgentDown | Fault::BackWithLowerIndex => consul.stop().await,
            Fault::NoLeader => consul.set_outage(Some(Outage::NoLeader)),
            Fault::RateLimited => consul.set_outage(Some(Outage::RateLimited)),
            Fault::AllDatacentersDown => {
                consul.set_dc_unreachable("dc1", true);
                consul.set_dc_unreachable("dc2", true);
            }
            Fault::Dc2CutOff => consul.set_dc_unreachable("dc2", true),
        }
    }

    async fn heal(self, mesh: &mut ConsulMesh) {
        let consul = &mut mesh.consul;
        match self {
            Fault::AgentDown => consul.restart().await,
            Fault::BackWithLowerIndex => {
                consul.reset_index(1);
                consul.restart().await;
            }
            Fault::NoLeader | Fault::RateLimited => consul.set_outage(None),
            Fault::AllDatacentersDown => {
                consul.set_dc_unreachable("dc1", false);
                consul.set_dc_unreachable("dc2", false);
            }
            Fault::Dc2CutOff => consul.set_dc_unreachable("dc2", false),
        }
    }
}

/// `orders` in dc1 (instance `a`, local, taking the traffic) and dc2 (`c`, in reserve), with
/// backends `b` (dc1) and `d` (dc2) started and not registered; meshbridge watching both
/// datacenters; the frontend proxy, routing to `a`.
async fn two_datacenters(fault: Fault) -> ConsulMesh {
    let lower_index = matches!(fault, Fault::BackWithLowerIndex);
    let mesh = ConsulMesh::build("dc1")
        // As Consul's servers do: a query waits while the index is at or below the one
        // asked for, so a client that kept an index from before the reset would wait for
        // the whole blocking wait, far longer than RECOVERY.
        .setup(move |consul| consul.set_strict_min_index(lower_index))
        .register("dc1", "orders", "a", "orders-a")
        .register("dc2", "orders", "c", "orders-c")
        .backend("orders", "b")
        .backend("orders", "d")
        .consul_wait(if lower_index { 60_000 } else { 2_000 })
        .args(&["--consul-datacenter", "dc1", "--consul-datacenter", "dc2"])
        .proxy(&[])
        .start()
        .await;
    mesh.wait_orders_from("a", "orders routed to a").await;
    if lower_index {
        // Changes first, so that meshbridge holds an index well above what follows.
        for i in 0..20 {
            mesh.consul.register(
                "dc1",
                Instance::new("other", &format!("o-{i}"), "127.0.0.1", 9),
            );
        }
        mesh.wait_service("other", "the other instances seen").await;
    }
    mesh
}

/// The `error` of each named source in `/api/sources`.
async fn source_errors(mesh: &ConsulMesh, names: &[&str]) -> Vec<Option<String>> {
    let sources = mesh.cp.admin_json("/api/sources").await;
    names
        .iter()
        .map(|name| {
            sources
                .as_array()
                .and_then(|all| all.iter().find(|s| s["name"] == *name))
                .and_then(|s| s["error"].as_str())
                .map(str::to_string)
        })
        .collect()
}

/// `orders`' instances as `/api/services` shows them: `(datacenter, port)`.
async fn orders_instances(mesh: &ConsulMesh) -> Vec<(String, u16)> {
    let orders = mesh.service("orders").await;
    let mut out: Vec<(String, u16)> = orders["instances"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            (
                i["datacenter"].as_str().unwrap_or_default().to_string(),
                i["port"].as_u64().unwrap_or_default() as u16,
            )
        })
        .collect();
    out.sort();
    out
}

/// Runs one fault with traffic flowing: Consul changes while it fails (in dc1 `b` replaces
/// `a`, in dc2 `d` replaces `c`); meshbridge keeps the last known instances through the fault
/// and follows the changes once it ends.
async fn survive(fault: Fault) {
    let mut mesh = two_datacenters(fault).await;
    let port = |name: &str| mesh.port("orders", name);
    let (a, b, c, d) = (port("a"), port("b"), port("c"), port("d"));
    let before = vec![("dc1".to_string(), a), ("dc2".to_string(), c)];
    assert_eq!(orders_instances(&mesh).await, before);
    let traffic = Traffic::start(mesh.envoy().clone(), "orders", Duration::from_millis(20));

    fault.apply(&mut mesh).await;
    let failing = fault.failing_sources();
    let noticed = eventually(
        Duration::from_secs(20),
        "the fault shown in /api/sources",
        || {
            let mesh = &mesh;
            async move {
                let errors = source_errors(mesh, failing).await;
                errors.iter().all(Option::is_some).then_some(errors)
            }
        },
    )
    .await;
    eprintln!("{fault:?}: /api/sources says {noticed:?}");
    let metrics = mesh.cp.metrics().await;
    let failed_dc = if fault.dc1_followed() { "dc2" } else { "dc1" };
    assert!(
        metrics.contains(&format!(
            "meshbridge_consul_requests_total{{dc=\"{failed_dc}\",result=\"error\"}}"
        )),
        "failed requests are counted"
    );

    // Consul's real state moves on while meshbridge cannot see it (a write during an agent
    // outage is what its servers hold: the fake takes it while stopped or failing).
    mesh.consul.deregister("dc1", "orders-a");
    mesh.register("dc1", "orders", "b", "orders-b");
    mesh.consul.deregister("dc2", "orders-c");
    mesh.register("dc2", "orders", "d", "orders-d");
    tokio::time::sleep(HELD).await;
    let during = orders_instances(&mesh).await;
    if fault.dc1_followed() {
        // dc1 is followed through dc2's cut; dc2's last known instance stays.
        assert_eq!(during, vec![("dc1".to_string(), b), ("dc2".to_string(), c)]);
    } else {
        assert_eq!(
            during, before,
            "the last known instances stay, none is emptied"
        );
    }

    let healed = Instant::now();
    fault.heal(&mut mesh).await;
    let after = vec![("dc1".to_string(), b), ("dc2".to_string(), d)];
    eventually(
        RECOVERY,
        "the changes made during the fault followed",
        || {
            let (mesh, after) = (&mesh, &after);
            async move {
                let shown = orders_instances(mesh).await == *after;
                let routed = mesh.envoy().call("orders", "/").await.ok()?;
                (shown && routed.body.contains("orders b")).then_some(())
            }
        },
    )
    .await;
    let recovered = healed.elapsed();
    eventually(RECOVERY, "the sources healthy again", || {
        let mesh = &mesh;
        async move {
            let errors = source_errors(mesh, &["consul:dc1", "consul:dc2"]).await;
            errors.iter().all(Option::is_none).then_some(())
        }
    })
    .await;
    eprintln!("{fault:?}: Consul's state followed {recovered:?} after the fault ended");
    mesh.assert_orders_from("b", 10).await;
    traffic.assert_no_failure().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_agent_down() {
    survive(Fault::AgentDown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_cut_from_its_servers_no_cluster_leader() {
    survive(Fault::NoLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_rate_limited_with_429() {
    survive(Fault::RateLimited).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_datacenter_down() {
    survive(Fault::AllDatacentersDown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_datacenter_cut_off() {
    survive(Fault::Dc2CutOff).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_back_with_a_lower_index() {
    survive(Fault::BackWithLowerIndex).await;
}

/// How long a change may take to reach Envoy while every byte between meshbridge and the
/// agent is delayed by a second each way: a blocking query, a fetch (two round trips each)
/// and a push, with room for a loaded machine.
const SLOW_BOUND: Duration = Duration::from_secs(20);

/// The agent slow (a latency fault of 1 s each way between meshbridge and the agent): no
/// request fails, changes still arrive, only later, and slowness alone is not reported as a
/// failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_local_agent_slow() {
    let mesh = ConsulMesh::build("dc1")
        .through_faults()
        .register("dc1", "orders", "a", "orders-a")
        .backend("orders", "b")
        .proxy(&[])
        .start()
        .await;
    mesh.wait_orders_from("a", "orders routed to a").await;
    let traffic = Traffic::start(mesh.envoy().clone(), "orders", Duration::from_millis(20));
    let second = Duration::from_secs(1);
    mesh.faults().set_both(Toxic::Latency {
        latency: second,
        jitter: Duration::from_millis(200),
    });
    // Let the queries already open meet the latency too.
    tokio::time::sleep(2 * second).await;

    let changed = Instant::now();
    mesh.consul.deregister("dc1", "orders-a");
    mesh.register("dc1", "orders", "b", "orders-b");
    eventually(
        SLOW_BOUND,
        "orders moved to b through the slow agent",
        || async {
            let r = mesh.envoy().call("orders", "/").await.ok()?;
            r.body.contains("orders b").then_some(())
        },
    )
    .await;
    eprintln!(
        "AgentSlow: followed {:?} after the change",
        changed.elapsed()
    );
    assert_eq!(
        source_errors(&mesh, &["consul:dc1"]).await,
        vec![None],
        "a slow agent is not a failing one"
    );
    mesh.faults().clear_all();
    mesh.assert_orders_from("b", 10).await;
    traffic.assert_no_failure().await;
}
