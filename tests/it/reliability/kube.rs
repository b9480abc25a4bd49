//! The Kubernetes API failing under two meshbridge replicas: down, slow, and its watches cut
//! mid-stream, again and again. Through each, with traffic flowing from a legacy Envoy to
//! `orders`' pods: no request fails and the pods stay endpoints; a pod created, a pod deleted
//! and an invalid spec written during the fault are followed once the API answers again
//! (status written for them, no Event written twice), and the Lease
//! changes hands at most once.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::kube_e2e::{
    MS, answering, condition, instances, legacy, orders_pods, orders_service, pod,
};
use crate::support::faults::{Direction, Fault as Toxic, FaultProxy};
use crate::support::fixtures::{Fixture, MeshService};
use crate::support::kube_fake::FakeKube;
use crate::support::{Backend, ControlPlane, Envoy, Traffic, eventually};

/// How long after the API is back the replicas must follow what changed meanwhile: the
/// watchers' backoff (at most a few seconds), a relist, a status write and a push, with room
/// for a loaded machine.
const RECOVERY: Duration = Duration::from_secs(30);
/// How long the fault lasts after the changes are made; longer than two thirds of the
/// Lease's duration, so the leader cannot renew in time and steps down when the API is down.
const HELD: Duration = Duration::from_secs(6);
/// `--lease-duration` of both replicas (seconds).
const LEASE_SECONDS: &str = "6";

#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Connections to the API refused, live ones cut.
    ApiDown,
    /// 500 ms added each way to everything the API sends and receives.
    ApiSlow,
    /// Every connection to the API (watches included) cut every 500 ms.
    WatchesCut,
}

impl Fault {
    async fn apply(self, proxy: &FaultProxy) {
        match self {
            Fault::ApiDown => proxy.disable().await,
            Fault::ApiSlow => proxy.set_both(Toxic::Latency {
                latency: Duration::from_millis(500),
                jitter: Duration::ZERO,
            }),
            Fault::WatchesCut => proxy.cut_all().await,
        }
    }

    /// Keeps the fault up for `HELD` (cutting again and again for `WatchesCut`).
    async fn hold(self, proxy: &FaultProxy) {
        let until = Instant::now() + HELD;
        while Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if let Fault::WatchesCut = self {
                proxy.cut_all().await;
            }
        }
    }

    async fn heal(self, proxy: &FaultProxy) {
        match self {
            Fault::ApiDown => proxy.enable().await,
            Fault::ApiSlow => {
                proxy.clear(Direction::Upstream);
                proxy.clear(Direction::Downstream);
            }
            Fault::WatchesCut => {}
        }
    }
}

fn lease(kube: &FakeKube) -> Value {
    kube.get(
        "coordination.k8s.io/v1",
        "Lease",
        Some("default"),
        "meshbridge-leader",
    )
    .map(|l| l["spec"].clone())
    .unwrap_or(Value::Null)
}

fn invalid_spec_events(kube: &FakeKube) -> usize {
    kube.list("events.k8s.io/v1", "Event")
        .iter()
        .filter(|e| e["reason"] == "InvalidSpec" && e["regarding"]["name"] == "orders")
        .count()
}

/// Event objects that say the same thing as another (same object, reason, action and note):
/// a repeat must be recorded in the first one's `series`, not as a second Event.
fn duplicate_events(kube: &FakeKube) -> Vec<Value> {
    let mut seen = std::collections::BTreeSet::new();
    kube.list("events.k8s.io/v1", "Event")
        .into_iter()
        .filter(|e| {
            let key = [
                &e["regarding"]["uid"],
                &e["reason"],
                &e["action"],
                &e["note"],
            ]
            .map(Value::to_string);
            !seen.insert(key)
        })
        .collect()
}

async fn replica(kubeconfig: &std::path::Path, identity: &str) -> ControlPlane {
    let mut cp = ControlPlane::start_kube(
        kubeconfig,
        "",
        &["--identity", identity, "--lease-duration", LEASE_SECONDS],
    );
    cp.wait_ready().await;
    cp
}

async fn survive(fault: Fault) {
    let kube = FakeKube::start().await;
    let api: SocketAddr = kube.url().trim_start_matches("http://").parse().unwrap();
    let proxy = FaultProxy::start(api).await;
    let [_a, b] = orders_pods(&kube, ["a", "b"]).await;
    let c = Backend::start("orders", "pod-c").await;
    kube.apply(orders_service().json());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig_for(dir.path(), &format!("http://{}", proxy.addr()));
    let first = replica(&kubeconfig, "first").await;
    eventually(RECOVERY, "first leads", || async {
        (lease(&kube)["holderIdentity"] == "first").then_some(())
    })
    .await;
    let second = replica(&kubeconfig, "second").await;
    let envoy = std::sync::Arc::new(Envoy::start(&first, legacy(&["orders"])).await);
    eventually(RECOVERY, "both pods answering", || async {
        (answering(&envoy, "orders", 10).await.len() == 2).then_some(())
    })
    .await;
    let transitions = lease(&kube)["leaseTransitions"].as_u64().unwrap_or(0);
    let traffic = Traffic::start(envoy.clone(), "orders", Duration::from_millis(20));

    fault.apply(&proxy).await;
    // While the API fails, a pod starts, another goes away, and the spec turns invalid.
    kube.apply(pod("orders-c", "orders", c.port, true));
    kube.delete("v1", "Pod", Some("shop"), "orders-a");
    let invalid = MeshService::build("orders")
        .namespace("shop")
        .meta("generation", 2)
        .selector("orders")
        .dependency_with(json!({"service": "billing", "timeout": "soon"}))
        .json();
    kube.apply(invalid);
    fault.hold(&proxy).await;
    if let Fault::ApiDown = fault {
        // Nothing reached the replicas: the pods they knew are still endpoints.
        for cp in [&first, &second] {
            assert_eq!(instances(cp, "orders").await.len(), 2, "pods emptied");
        }
    }

    let healed = Instant::now();
    fault.heal(&proxy).await;
    let want = {
        let mut ports = vec![b.port as u64, c.port as u64];
        ports.sort();
        ports
    };
    eventually(RECOVERY, "both replicas follow the pods", || async {
        for cp in [&first, &second] {
            let mut ports: Vec<u64> = instances(cp, "orders").await.iter().map(|i| i.0).collect();
            ports.sort();
            if ports != want {
                return None;
            }
        }
        let seen = answering(&envoy, "orders", 10).await;
        (seen.len() == 2 && seen.iter().all(|s| !s.contains("pod-a"))).then_some(())
    })
    .await;
    let followed = healed.elapsed();
    let get = || kube.get(MS, "MeshService", Some("shop"), "orders").unwrap();
    eventually(RECOVERY, "status written for the new state", || async {
        let o = get();
        let synced = condition(&o, "Synced")?;
        (o["status"]["instances"] == json!({"kubernetes": 2})
            && synced["reason"] == "InvalidSpec"
            && o["status"]["observedGeneration"] == 2)
            .then_some(())
    })
    .await;
    eventually(RECOVERY, "the Warning Event written", || async {
        (invalid_spec_events(&kube) > 0).then_some(())
    })
    .await;
    eprintln!(
        "{fault:?}: pods followed {followed:?}, status and Event {:?} after the API came back",
        healed.elapsed()
    );
    // Let retries, renewals and resyncs run: nothing is written twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        duplicate_events(&kube),
        Vec::<Value>::new(),
        "duplicate Events"
    );
    let after = lease(&kube);
    let handovers = after["leaseTransitions"].as_u64().unwrap_or(0) - transitions;
    assert!(
        handovers <= 1,
        "the Lease changed hands {handovers} times: {after}"
    );
    eprintln!(
        "{fault:?}: Lease handed over {handovers} time(s), held by {}",
        after["holderIdentity"]
    );
    traffic.assert_no_failure().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_api_down() {
    survive(Fault::ApiDown).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_api_slow() {
    survive(Fault::ApiSlow).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watches_cut_again_and_again() {
    survive(Fault::WatchesCut).await;
}
