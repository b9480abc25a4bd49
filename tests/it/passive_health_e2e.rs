//! Passive health and limits end to end: a real Envoy stops sending requests to an instance
//! that answers every request with an error (outlier detection), and fails at once the
//! requests beyond its caller's limits instead of queueing them (circuit breakers).

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use support::fixtures::{MeshService, manifests};
use support::{Backend, ControlPlane, Envoy, EnvoyOptions, eventually, http_get};
use tokio::io::AsyncWriteExt;

/// An instance that is up (it accepts connections and answers) but broken: every request
/// gets `500`. Counts the requests it answered.
pub(crate) struct FailingBackend {
    pub(crate) port: u16,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FailingBackend {
    pub(crate) async fn start() -> FailingBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    if support::read_request_head(&mut stream).await.is_none() {
                        return;
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    let body = "broken instance\n";
                    let response = format!(
                        "HTTP/1.1 500 Internal Server Error\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        FailingBackend {
            port,
            requests,
            task,
        }
    }

    pub(crate) fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

impl Drop for FailingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The value of every counter whose name ends in `suffix`, by name.
async fn stats_ending(envoy: &Envoy, suffix: &str) -> Vec<(String, u64)> {
    let r = http_get(
        envoy.admin_addr(),
        "localhost",
        &format!("/stats?filter={}$", suffix.replace('.', "\\.")),
        &[],
    )
    .await
    .unwrap();
    r.body
        .lines()
        .filter_map(|l| l.split_once(": "))
        .filter(|(name, _)| name.ends_with(suffix))
        .filter_map(|(name, v)| Some((name.to_string(), v.trim().parse().ok()?)))
        .collect()
}

/// Calls `orders` until twenty calls in a row are answered by the healthy instance and none
/// reaches the broken one (bounded).
async fn until_only_the_healthy_instance_answers(envoy: &Envoy, bad: &FailingBackend, what: &str) {
    eventually(Duration::from_secs(20), what, || async {
        let before = bad.requests();
        for _ in 0..20 {
            let r = envoy.call("orders", "/").await.ok()?;
            if r.status != 200 || !r.body.starts_with("hello from orders good") {
                return None;
            }
        }
        (bad.requests() == before).then_some(())
    })
    .await;
}

/// The outlier detection Envoy holds for `cluster` (from its config dump), as JSON.
async fn outlier_config(envoy: &Envoy, cluster: &str) -> serde_json::Value {
    let r = http_get(
        envoy.admin_addr(),
        "localhost",
        "/config_dump?resource=dynamic_active_clusters",
        &[],
    )
    .await
    .unwrap();
    let dump: serde_json::Value = serde_json::from_str(&r.body).unwrap();
    dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| &c["cluster"])
        .find(|c| c["name"] == cluster)
        .unwrap_or_else(|| panic!("Envoy has no cluster {cluster}: {dump}"))["outlier_detection"]
        .clone()
}

async fn ejects_the_failing_instance(delta: bool) {
    let good = Backend::start("orders", "good").await;
    let bad = FailingBackend::start().await;
    let orders = MeshService::build("orders").endpoints("127.0.0.1", &[good.port, bad.port]);
    let plain = MeshService::build("frontend").dependency("orders");
    let cp = ControlPlane::start(&manifests(&[&plain, &orders]), &[]).await;
    let envoy = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "frontend".into(),
            egress: true,
            delta,
            ..Default::default()
        },
    )
    .await;

    // Both instances are in rotation: the broken one answers 500, which the caller sees.
    envoy
        .wait_call("orders", "the healthy instance answering", |r| {
            r.status == 200 && r.body.starts_with("hello from orders good")
        })
        .await;
    let failure = envoy
        .wait_call("orders", "the broken instance answering", |r| {
            r.status == 500
        })
        .await;
    assert!(failure.body.contains("broken instance"), "{}", failure.body);

    // The defaults alone eject it from the shared cluster after a few failures.
    until_only_the_healthy_instance_answers(&envoy, &bad, "the defaults ejecting").await;
    let by_default = bad.requests();
    assert!(
        by_default >= 5,
        "ejected after {by_default} failures, fewer than 5"
    );
    let shared = envoy
        .stat("cluster.orders.outlier_detection.ejections_enforced_total")
        .await;
    assert!(shared >= Some(1), "{shared:?}");
    // The control plane shows which instance the callers' proxies have ejected, and where.
    let ejections = cp.admin_json("/api/services/orders/ejections").await;
    assert_eq!(ejections["callers"], 1, "{ejections}");
    assert_eq!(
        ejections["asked"],
        serde_json::json!([envoy.node_id]),
        "{ejections}"
    );
    assert_eq!(
        ejections["ejected"],
        serde_json::json!([{
            "instance": format!("127.0.0.1:{}", bad.port),
            "by": [envoy.node_id],
            "clusters": ["orders"],
        }]),
        "{ejections}"
    );
    let none = cp.admin_json("/api/services/frontend/ejections").await;
    assert_eq!(none["ejected"], serde_json::json!([]), "{none}");

    // The caller overrides its outlier detection: it gets its own variant of the cluster,
    // whose instances start uneaten by ejections, and ejects after three failures.
    let frontend = MeshService::build("frontend").dependency_with(json!({
        "service": "orders",
        "outlierDetection": {"consecutive5xx": 3, "interval": "1s", "baseEjectionTime": "30s"},
    }));
    cp.write_manifests(&manifests(&[&frontend, &orders]));
    let cluster = variant_cluster(&envoy, 2).await;
    // It got the shared assignment at once, not after giving up waiting for it (Envoy
    // subscribes to the name `orders` it already has).
    assert_eq!(
        envoy
            .stat(&format!("cluster.{cluster}.init_fetch_timeout"))
            .await,
        Some(0),
        "the variant warmed until Envoy gave up waiting for its endpoints"
    );
    let o = outlier_config(&envoy, &cluster).await;
    assert_eq!(o["consecutive_5xx"], 3, "{o}");
    assert_eq!(o["interval"], "1s", "{o}");
    assert_eq!(o["max_ejection_percent"], 50, "{o}");
    envoy
        .wait_call("orders", "the broken instance back in the variant", |r| {
            r.status == 500
        })
        .await;
    until_only_the_healthy_instance_answers(&envoy, &bad, "the override ejecting").await;
    let by_override = bad.requests() - by_default;
    assert!(
        by_override >= 3,
        "ejected after {by_override} failures, fewer than 3"
    );

    // Envoy says so, on the caller's variant.
    let ejections = stats_ending(&envoy, ".outlier_detection.ejections_enforced_total").await;
    let enforced = ejections
        .iter()
        .find(|(name, _)| {
            name == &format!("cluster.{cluster}.outlier_detection.ejections_enforced_total")
        })
        .map(|(_, count)| *count);
    assert!(enforced >= Some(1), "{ejections:?}");
    assert_eq!(
        envoy
            .stat(&format!(
                "cluster.{cluster}.outlier_detection.ejections_active"
            ))
            .await,
        Some(1),
        "half the instances at most may be ejected: exactly the broken one"
    );
    assert_eq!(
        envoy
            .stat(&format!("cluster.{cluster}.membership_healthy"))
            .await,
        Some(1)
    );
    assert_eq!(
        envoy.stat("cluster_manager.warming_clusters").await,
        Some(0)
    );
    // The admin API finds what Envoy runs to be what meshbridge sent: the variant and the
    // shared assignment it reads, no shared cluster left over.
    let path = format!("/api/proxies/{}/diff", envoy.node_id);
    let diff = eventually(Duration::from_secs(20), "the proxy in sync", || async {
        let diff = cp.admin_json(&path).await;
        (diff["in_sync"] == true).then_some(diff)
    })
    .await;
    for t in diff["types"].as_array().unwrap() {
        assert_eq!(t["only_sent"], json!([]), "{t}");
        assert_eq!(t["only_envoy"], json!([]), "{t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_an_instance_failing_every_request_is_ejected_by_default_and_by_an_override() {
    ejects_the_failing_instance(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_an_instance_failing_every_request_is_ejected_by_default_and_by_an_override() {
    ejects_the_failing_instance(true).await;
}

/// An instance that holds every request until released, then answers `200 held`. Counts the
/// requests it received.
struct HeldBackend {
    pub(crate) port: u16,
    requests: Arc<AtomicUsize>,
    release: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl HeldBackend {
    async fn start() -> HeldBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let (release, released) = tokio::sync::watch::channel(false);
        let counted = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let (counted, mut released) = (counted.clone(), released.clone());
                tokio::spawn(async move {
                    if support::read_request_head(&mut stream).await.is_none() {
                        return;
                    }
                    counted.fetch_add(1, Ordering::SeqCst);
                    if released.wait_for(|r| *r).await.is_err() {
                        return;
                    }
                    let response =
                        "HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nheld\n";
                    let _ = stream.write_all(response.as_bytes()).await;
                    let _ = stream.shutdown().await;
                });
            }
        });
        HeldBackend {
            port,
            requests,
            release,
            task,
        }
    }
}

impl Drop for HeldBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_the_callers_limits_fail_at_once_instead_of_queueing() {
    let orders = HeldBackend::start().await;
    let service = MeshService::build("orders").endpoint("127.0.0.1", orders.port);
    let frontend = MeshService::build("frontend").dependency_with(json!({
        "service": "orders",
        "circuitBreakers": {"maxConnections": 1, "maxPendingRequests": 1},
    }));
    let cp = ControlPlane::start(&manifests(&[&frontend, &service]), &[]).await;
    let envoy = Arc::new(
        Envoy::start(
            &cp,
            EnvoyOptions {
                service: "frontend".into(),
                egress: true,
                ..Default::default()
            },
        )
        .await,
    );
    let cluster = variant_cluster(&envoy, 1).await;

    // One request in flight on the one connection allowed, one waiting for it.
    let call = |envoy: Arc<Envoy>| tokio::spawn(async move { envoy.call("orders", "/").await });
    let first = call(envoy.clone());
    eventually(
        Duration::from_secs(20),
        "the first request held",
        || async { (orders.requests.load(Ordering::SeqCst) == 1).then_some(()) },
    )
    .await;
    let second = call(envoy.clone());
    let pending = format!("cluster.{cluster}.upstream_rq_pending_active");
    eventually(
        Duration::from_secs(20),
        "the second request pending",
        || async { (envoy.stat(&pending).await == Some(1)).then_some(()) },
    )
    .await;

    // A third is beyond the limits: refused by the caller's Envoy, never reaching orders.
    let third = envoy.call("orders", "/").await.unwrap();
    assert_eq!(third.status, 503, "{third:?}");
    assert_eq!(
        third.header("x-envoy-overloaded"),
        Some("true"),
        "{third:?}"
    );
    assert_eq!(orders.requests.load(Ordering::SeqCst), 1);
    assert_eq!(
        envoy
            .stat(&format!("cluster.{cluster}.upstream_rq_pending_overflow"))
            .await,
        Some(1)
    );

    // Released, the two admitted requests are answered.
    orders.release.send(true).unwrap();
    for r in [first, second] {
        let r = tokio::time::timeout(Duration::from_secs(20), r)
            .await
            .expect("an admitted request answered")
            .unwrap()
            .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "held\n"));
    }
    assert_eq!(orders.requests.load(Ordering::SeqCst), 2);
}

/// Waits until `envoy` has a policy variant of `orders` with `members` hosts; its name.
async fn variant_cluster(envoy: &Envoy, members: u64) -> String {
    eventually(Duration::from_secs(20), "the variant cluster", || async {
        stats_ending(envoy, ".membership_total")
            .await
            .into_iter()
            .find(|(name, total)| name.starts_with("cluster.orders|o-") && *total == members)
            .map(|(name, _)| {
                name.strip_prefix("cluster.")
                    .and_then(|n| n.strip_suffix(".membership_total"))
                    .unwrap()
                    .to_string()
            })
    })
    .await
}
