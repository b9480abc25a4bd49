//! Passive health end to end: a real Envoy stops sending requests to an instance that
//! answers every request with an error, through the outlier detection of its caller's
//! dependency.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::json;
use support::fixtures::{MeshService, manifests};
use support::{Backend, ControlPlane, Envoy, EnvoyOptions, eventually, http_get};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An instance that is up (it accepts connections and answers) but broken: every request
/// gets `500`. Counts the requests it answered.
struct FailingBackend {
    port: u16,
    requests: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FailingBackend {
    async fn start() -> FailingBackend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let counted = counted.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
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

    fn requests(&self) -> usize {
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_failing_every_request_is_ejected_and_the_healthy_one_serves() {
    let good = Backend::start("orders", "good").await;
    let bad = FailingBackend::start().await;
    let orders = MeshService::build("orders").endpoints("127.0.0.1", &[good.port, bad.port]);
    let frontend = MeshService::build("frontend").dependency_with(json!({
        "service": "orders",
        "outlierDetection": {"consecutive5xx": 3, "interval": "1s", "baseEjectionTime": "30s"},
    }));
    let cp = ControlPlane::start(&manifests(&[&frontend, &orders]), &[]).await;
    let envoy = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "frontend".into(),
            egress: true,
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

    // After a few calls the broken instance is ejected: twenty calls in a row, all answered by
    // the healthy instance, none reaching the broken one.
    eventually(
        Duration::from_secs(20),
        "the broken instance ejected",
        || async {
            let before = bad.requests();
            for _ in 0..20 {
                let r = envoy.call("orders", "/").await.ok()?;
                if r.status != 200 || !r.body.starts_with("hello from orders good") {
                    return None;
                }
            }
            (bad.requests() == before).then_some(())
        },
    )
    .await;
    let seen = bad.requests();
    assert!(
        seen >= 3,
        "ejected after {seen} failures, fewer than consecutive5xx"
    );

    // Envoy says so, on the caller's own variant of the orders cluster.
    let ejections = stats_ending(&envoy, ".outlier_detection.ejections_enforced_total").await;
    let (name, count) = ejections
        .iter()
        .find(|(name, _)| name.starts_with("cluster.orders|o-"))
        .unwrap_or_else(|| panic!("no ejection counter of an orders variant: {ejections:?}"));
    assert!(*count >= 1, "{name}: {count}");
    let cluster = name
        .strip_prefix("cluster.")
        .and_then(|n| n.strip_suffix(".outlier_detection.ejections_enforced_total"))
        .unwrap();
    assert_eq!(
        envoy
            .stat(&format!(
                "cluster.{cluster}.outlier_detection.ejections_active"
            ))
            .await,
        Some(1),
        "half the instances at most may be ejected: exactly the broken one"
    );
    // It reads the shared assignment: both instances, one of them ejected.
    assert_eq!(
        envoy
            .stat(&format!("cluster.{cluster}.membership_total"))
            .await,
        Some(2)
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
}
