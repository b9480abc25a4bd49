//! The control plane fails, restarts, moves or loses its network while requests flow through
//! Envoy: no request may fail (Envoy keeps its last configuration without a control plane),
//! and afterwards a manifest change still reaches Envoy.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::faults::{Fault, FaultProxy};
use crate::support::fixtures::{MeshService, manifests};
use crate::support::{Backend, ControlPlane, Envoy, EnvoyOptions, Traffic, eventually, http_get};

/// How often the traffic calls through Envoy: 50 requests a second.
const TRAFFIC_EVERY: Duration = Duration::from_millis(20);

/// How long a manifest change may take to reach Envoy once the control plane is back: the
/// manifest poll (100 ms), Envoy's reconnection backoff (up to a few seconds after repeated
/// failures) and one push, with ample room for a loaded machine.
const CHANGE_BOUND: Duration = Duration::from_secs(20);

/// How long Envoy may take to open a stream to another control plane: its ADS retry backoff
/// (500 ms doubling, jittered) over a few failed attempts at the address that went away.
const RECONNECT_BOUND: Duration = Duration::from_secs(20);

/// How long traffic flows before a fault and after recovery, so requests run across every
/// transition and enough of them are sent for "none failed" to mean something.
const HOLD: Duration = Duration::from_secs(1);

/// frontend calls orders, whose instances listen on `orders_ports`.
fn mesh(orders_ports: &[u16]) -> String {
    let frontend = MeshService::build("frontend").dependency("orders");
    let orders = MeshService::build("orders").endpoints("127.0.0.1", orders_ports);
    manifests(&[&frontend, &orders])
}

fn frontend() -> EnvoyOptions {
    EnvoyOptions {
        service: "frontend".into(),
        egress: true,
        ..Default::default()
    }
}

/// The instances `a` and `b` of orders.
async fn orders() -> (Backend, Backend) {
    (
        Backend::start("orders", "a").await,
        Backend::start("orders", "b").await,
    )
}

/// Starts traffic through `envoy` once orders is routed.
async fn traffic(envoy: &Arc<Envoy>) -> Traffic {
    envoy
        .wait_call("orders", "orders routed", |r| r.status == 200)
        .await;
    let traffic = Traffic::start(envoy.clone(), "orders", TRAFFIC_EVERY);
    tokio::time::sleep(HOLD).await;
    traffic
}

/// Writes a mesh where orders has the instances on `ports` to every running control plane
/// in `cps`, and waits until Envoy routes a request to `instance`; how long that took.
async fn change_reaches_envoy(
    cps: &[&ControlPlane],
    envoy: &Envoy,
    ports: &[u16],
    instance: &str,
) -> Duration {
    let started = Instant::now();
    for cp in cps {
        cp.write_manifests(&mesh(ports));
    }
    let body = format!("orders {instance}");
    eventually(
        CHANGE_BOUND,
        &format!("instance {instance} routed after the change"),
        || async {
            envoy
                .call("orders", "/")
                .await
                .ok()
                .filter(|r| r.body.contains(&body))
        },
    )
    .await;
    started.elapsed()
}

/// Stops `traffic` after a last [`HOLD`] and fails unless every request succeeded (and
/// enough were sent for that to mean something), naming the first failures.
async fn assert_no_request_failed(traffic: Traffic, during: &str) {
    tokio::time::sleep(HOLD).await;
    eprintln!("{during}: {:?} (succeeded, failed)", traffic.counts());
    traffic.assert_no_failure().await;
}

/// Whether `cp` lists a stream of `node` in `/api/proxies` (false when it does not answer).
async fn serves(cp: &ControlPlane, node: &str) -> bool {
    let Ok(r) = http_get(cp.admin_addr(), "localhost", "/api/proxies", &[]).await else {
        return false;
    };
    let proxies: serde_json::Value = serde_json::from_str(&r.body).unwrap_or_default();
    proxies
        .as_array()
        .is_some_and(|all| all.iter().any(|p| p["node"] == node))
}

/// The `version_info` of Envoy's dynamic clusters and listeners (its `/config_dump`).
async fn envoy_versions(envoy: &Envoy) -> (String, String) {
    let r = http_get(envoy.admin_addr(), "localhost", "/config_dump", &[])
        .await
        .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    let of = |kind: &str| {
        dump["configs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["@type"].as_str().is_some_and(|t| t.ends_with(kind)))
            .and_then(|c| c["version_info"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    (of("ClustersConfigDump"), of("ListenersConfigDump"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_plane_killed_and_restarted_fails_no_request() {
    let (a, b) = orders().await;
    let mut cp = ControlPlane::start(&mesh(&[a.port]), &[]).await;
    let envoy = Arc::new(Envoy::start(&cp, frontend()).await);
    let traffic = traffic(&envoy).await;

    cp.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted = Instant::now();
    cp.restart().await;
    eprintln!("restart: ready after {:?}", restarted.elapsed());
    let took = change_reaches_envoy(&[&cp], &envoy, &[a.port, b.port], "b").await;
    eprintln!(
        "restart: change reached Envoy {took:?} after it was written, {:?} after the restart",
        restarted.elapsed()
    );
    assert_no_request_failed(traffic, "the control plane was killed and restarted").await;
}

/// Two replicas over the same manifests, and an Envoy bootstrapped with both addresses.
async fn replicas_and_envoy(manifests: &str) -> ([ControlPlane; 2], Arc<Envoy>) {
    let cps = [
        ControlPlane::start(manifests, &[]).await,
        ControlPlane::start(manifests, &[]).await,
    ];
    let options = EnvoyOptions {
        xds_addrs: cps.iter().map(ControlPlane::xds_addr).collect(),
        ..frontend()
    };
    let envoy = Arc::new(Envoy::start(&cps[0], options).await);
    (cps, envoy)
}

/// The index of the replica in `cps` that has Envoy's stream (waits for one to have it).
async fn serving_replica(cps: &[ControlPlane], envoy: &Envoy, except: Option<usize>) -> usize {
    eventually(RECONNECT_BOUND, "a replica serving Envoy", || async {
        for (i, cp) in cps.iter().enumerate() {
            if Some(i) != except && serves(cp, &envoy.node_id).await {
                return Some(i);
            }
        }
        None
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_serving_envoy_killed_envoy_moves_to_the_other_with_the_same_versions() {
    let (a, b) = orders().await;
    let (mut cps, envoy) = replicas_and_envoy(&mesh(&[a.port])).await;
    let traffic = traffic(&envoy).await;
    let serving = serving_replica(&cps, &envoy, None).await;
    let before = envoy_versions(&envoy).await;
    let cds_updates = envoy.stat("cluster_manager.cds.update_success").await;

    cps[serving].kill();
    let killed = Instant::now();
    let other = serving_replica(&cps, &envoy, Some(serving)).await;
    eprintln!(
        "replicas: Envoy moved from replica {serving} to replica {other} {:?} after the kill",
        killed.elapsed()
    );
    // Both replicas translate the same manifests: the other one's versions are Envoy's, so
    // it has nothing new to send (whatever it sends on the new stream has arrived by then).
    tokio::time::sleep(HOLD).await;
    let after = envoy_versions(&envoy).await;
    eprintln!(
        "replicas: versions (cds, lds) before {before:?}, after {after:?}; cds updates {cds_updates:?} before, {:?} after",
        envoy.stat("cluster_manager.cds.update_success").await
    );
    assert!(!before.0.is_empty() && !before.1.is_empty(), "{before:?}");
    assert_eq!(
        after, before,
        "Envoy got new versions from the other replica"
    );

    let took = change_reaches_envoy(&[&cps[other]], &envoy, &[a.port, b.port], "b").await;
    eprintln!("replicas: change reached Envoy {took:?} after it was written");
    assert_no_request_failed(traffic, "the replica serving Envoy was killed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_of_two_replicas_fails_no_request() {
    /// A replica's graceful shutdown drains streams for 5 s (`--drain` default) at most.
    const EXIT_BOUND: Duration = Duration::from_secs(15);
    let (a, b) = orders().await;
    let (mut cps, envoy) = replicas_and_envoy(&mesh(&[a.port])).await;
    let traffic = traffic(&envoy).await;

    for i in 0..cps.len() {
        let started = Instant::now();
        cps[i].terminate();
        eventually(EXIT_BOUND, "the replica to exit", || {
            let exited = cps[i].exited();
            async move { exited }
        })
        .await;
        let exited = started.elapsed();
        cps[i].restart().await;
        let serving = serving_replica(&cps, &envoy, None).await;
        eprintln!(
            "rolling restart: replica {i} exited {exited:?} after SIGTERM, ready again after {:?}; Envoy on replica {serving}",
            started.elapsed()
        );
    }
    let took = change_reaches_envoy(&[&cps[0], &cps[1]], &envoy, &[a.port, b.port], "b").await;
    eprintln!("rolling restart: change reached Envoy {took:?} after it was written");
    assert_no_request_failed(traffic, "both replicas restarted one after the other").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_to_the_control_plane_cut_slowed_and_blackholed_fails_no_request() {
    /// Latency each way: far past a push's usual time, short of Envoy's HTTP/2 keepalive
    /// timeout (5 s), so the stream stays up and slow.
    const LATENCY: Duration = Duration::from_secs(2);
    /// How long the link stays slow: a change and its acknowledgement cross it meanwhile.
    const LATENCY_FOR: Duration = Duration::from_secs(6);
    /// A black hole shorter than the keepalive interval (30 s) plus timeout (5 s): the stream
    /// survives it and carries on with the held data.
    const BLACKHOLE_FOR: Duration = Duration::from_secs(5);
    let (a, b) = orders().await;
    let cp = ControlPlane::start(&mesh(&[a.port]), &[]).await;
    let link = FaultProxy::start(cp.xds_addr().parse().unwrap()).await;
    let options = EnvoyOptions {
        xds_addrs: vec![link.addr().to_string()],
        ..frontend()
    };
    let envoy = Arc::new(Envoy::start(&cp, options).await);
    let traffic = traffic(&envoy).await;

    let accepted = link.accepted();
    link.cut_all().await;
    let cut = Instant::now();
    eventually(
        RECONNECT_BOUND,
        "Envoy to reconnect through the link",
        || async {
            (link.accepted() > accepted && serves(&cp, &envoy.node_id).await).then_some(())
        },
    )
    .await;
    eprintln!("link: Envoy reconnected {:?} after the cut", cut.elapsed());

    tokio::time::sleep(HOLD).await;

    // A change made while the link is slow arrives, late.
    link.set_both(Fault::Latency {
        latency: LATENCY,
        jitter: Duration::from_millis(200),
    });
    let slow = Instant::now();
    let took = change_reaches_envoy(&[&cp], &envoy, &[a.port, b.port], "b").await;
    eprintln!("link: with {LATENCY:?} latency each way, a change reached Envoy after {took:?}");
    tokio::time::sleep(LATENCY_FOR.saturating_sub(slow.elapsed())).await;

    // A change made during the black hole arrives once it ends.
    link.set_both(Fault::Timeout(Duration::ZERO));
    let c = Backend::start("orders", "c").await;
    cp.write_manifests(&mesh(&[a.port, b.port, c.port]));
    tokio::time::sleep(BLACKHOLE_FOR).await;
    link.clear_all();
    let cleared = Instant::now();
    eventually(
        CHANGE_BOUND,
        "instance c routed after the black hole",
        || async {
            envoy
                .call("orders", "/")
                .await
                .ok()
                .filter(|r| r.body.contains("orders c"))
        },
    )
    .await;
    eprintln!(
        "link: the change written during the black hole reached Envoy {:?} after it ended; {} connections through the link in all",
        cleared.elapsed(),
        link.accepted()
    );
    assert_no_request_failed(
        traffic,
        "the link to the control plane was cut, slow and black-holed",
    )
    .await;
}
