//! The admission webhook under load: the release `meshbridge run` serving `/inject` over TLS
//! on loopback, called at 200 reviews per second (each a Pod CREATE that gets a sidecar) by a
//! client keeping its connections, as the API server does. Reports latency p50/p99/max and
//! meshbridge's memory after 10,000 reviews.
// A bench reads its knobs from the environment and runs one scenario top to bottom.
#![allow(clippy::too_many_lines, clippy::disallowed_methods)]

use std::time::{Duration, Instant};

#[path = "support/processes.rs"]
mod processes;

use processes::{free_port, openssl, start_meshbridge, wait_ready};
use serde_json::json;

fn review(i: usize) -> serde_json::Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": format!("uid-{i}"),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": "CREATE",
            "object": {
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "orders-", "namespace": "shop",
                             "labels": {"app": "orders", "pod-template-hash": "5d8f7c9b6"},
                             "annotations": {"meshbridge.io/inject": "true",
                                             "meshbridge.io/dependencies": "payments,billing"}},
                "spec": {"containers": [{"name": "app", "image": "registry.example/orders:1.4",
                                         "ports": [{"containerPort": 8080}],
                                         "env": [{"name": "MODE", "value": "prod"}]}]},
            },
        },
    })
}

fn memory_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

#[tokio::main]
async fn main() {
    let dir = std::env::temp_dir().join(format!("meshbridge-webhook-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    // A CA and the serving certificate it signs (as the chart or cert-manager provide).
    for args in [
        "req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=bench-ca -keyout ca.key -out ca.crt",
        "req -newkey rsa:2048 -nodes -subj /CN=webhook -keyout tls.key -out tls.csr",
        "x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out tls.crt",
    ] {
        std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\n")
            .unwrap_or_else(|e| panic!("{e}"));
        openssl(&args.split(' ').collect::<Vec<_>>(), &dir);
    }
    let port = free_port();
    let certs = dir.display().to_string();
    let addr = format!("127.0.0.1:{port}");
    let started = Instant::now();
    let (cp, _xds, admin_url) = start_meshbridge(
        &[
            "--kube",
            "off",
            "--webhook-cert-dir",
            &certs,
            "--webhook-addr",
            &addr,
        ],
        &[],
    );
    let pid = cp.0.id();
    wait_ready(&admin_url, started, Duration::from_secs(30)).await;
    let ca = reqwest::Certificate::from_pem(&std::fs::read(dir.join("ca.crt")).unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}"));
    let client = reqwest::Client::builder()
        .add_root_certificate(ca)
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let url = format!("https://{addr}/inject");
    let rss_before = memory_mib(pid);

    // 200 reviews per second, each sent on schedule whatever the previous ones do.
    let total = 10_000usize;
    let interval = Duration::from_secs(1) / 200;
    let mut tasks = tokio::task::JoinSet::new();
    let t0 = Instant::now();
    for i in 0..total {
        let due = t0 + interval * i as u32;
        tokio::time::sleep_until(due.into()).await;
        let (client, url, body) = (client.clone(), url.clone(), review(i));
        tasks.spawn(async move {
            let sent = Instant::now();
            let r = client
                .post(&url)
                .json(&body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let v: serde_json::Value = r.json().await.map_err(|e| e.to_string())?;
            if v["response"]["patch"].is_string() {
                Ok(sent.elapsed())
            } else {
                Err(format!("no patch: {v}"))
            }
        });
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Ok(l)) => latencies.push(l),
            Ok(Err(e)) => {
                if failed == 0 {
                    eprintln!("first failure: {e}");
                }
                failed += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(!latencies.is_empty(), "every review failed");
    let elapsed = t0.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = memory_mib(pid);
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "webhook_load: {total} Pod CREATE reviews over TLS on loopback at 200/s ({elapsed:?})"
    );
    println!(
        "  latency: p50 {:?}, p99 {:?}, max {:?}; {} patched, {failed} failed",
        pct(0.50),
        pct(0.99),
        latencies[latencies.len() - 1],
        latencies.len()
    );
    println!(
        "  meshbridge RSS: {rss_before:.1} MiB before, {rss_after:.1} MiB after {total} reviews"
    );
}
