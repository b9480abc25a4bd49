//! What enforcing an AccessRule costs a request: the release `meshbridge run`, a real caller
//! Envoy and a real callee Envoy in front of a tiny application, all on loopback. 5,000
//! sequential requests through one kept-alive connection to the caller's egress, twice: with
//! plaintext and no AccessRule, then with `strict` mTLS (certificates made with openssl), the
//! identity filter and an enforced AccessRule. Reports latency p50/p99 of each.
// A bench reads its knobs from the environment and runs one scenario top to bottom.
#![allow(clippy::too_many_lines, clippy::disallowed_methods)]

use std::path::Path;
use std::time::{Duration, Instant};

#[path = "support/processes.rs"]
mod processes;

use processes::{KillOnDrop, free_port, openssl, start_envoy_with, start_meshbridge, wait_ready};

const REQUESTS: usize = 5_000;

/// A CA (`ca.pem`) and, per service, `<service>.pem`/`.key` for its SPIFFE id.
fn identities(dir: &Path, services: &[&str]) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=bench-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        dir,
    );
    for s in services {
        let (key, csr, pem, ext) = (
            format!("{s}.key"),
            format!("{s}.csr"),
            format!("{s}.pem"),
            format!("{s}.ext"),
        );
        openssl(
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={s}"),
                "-keyout",
                &key,
                "-out",
                &csr,
            ],
            dir,
        );
        std::fs::write(
            dir.join(&ext),
            format!("subjectAltName=URI:spiffe://mesh.local/service/{s}\n"),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-extfile",
                &ext,
                "-out",
                &pem,
            ],
            dir,
        );
    }
}

/// A real Envoy for `service` with `args`, holding its certificate from `dir` when `tls`.
fn envoy(xds: u16, service: &str, args: &[String], tls: bool, dir: &Path) -> KillOnDrop {
    let mut args = args.to_vec();
    if tls {
        for (flag, file) in [
            ("--tls-cert", format!("{service}.pem")),
            ("--tls-key", format!("{service}.key")),
            ("--tls-ca", "ca.pem".to_string()),
        ] {
            args.push(flag.to_string());
            args.push(dir.join(file).display().to_string());
        }
    }
    start_envoy_with(xds, service, &args, dir)
}

fn manifests(ingress: u16, enforced: bool) -> String {
    let mut out = format!(
        "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {{name: orders}}\nspec:\n  mtls: {}\n  endpoints: [{{address: 127.0.0.1, port: {ingress}}}]\n",
        if enforced { "strict" } else { "disabled" }
    );
    if enforced {
        out.push_str(
            "---\napiVersion: meshbridge.io/v1alpha1\nkind: AccessRule\nmetadata: {name: orders}\nspec:\n  target: orders\n  rules:\n    - from: [checkout, \"admin-*\"]\n      paths: [{prefix: /api/}]\n      methods: [GET]\n",
        );
    }
    out
}

/// `REQUESTS` sequential GETs through `egress` on one connection; sorted latencies.
async fn measure(egress: u16) -> Vec<Duration> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(1)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let url = format!("http://127.0.0.1:{egress}/api/orders");
    let call = || async {
        client
            .get(&url)
            .header("host", "orders")
            .send()
            .await
            .ok()
            .map(|r| r.status().as_u16())
    };
    // Until the mesh routes (the Envoys are getting their configuration).
    let started = Instant::now();
    while call().await != Some(200) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "no 200 through the mesh within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for _ in 0..500 {
        call().await;
    }
    let mut latencies = Vec::with_capacity(REQUESTS);
    for _ in 0..REQUESTS {
        let t = Instant::now();
        assert_eq!(call().await, Some(200));
        latencies.push(t.elapsed());
    }
    latencies.sort();
    latencies
}

async fn scenario(enforced: bool, dir: &Path) -> Vec<Duration> {
    let config = dir.join(format!("config-{enforced}"));
    std::fs::create_dir_all(&config).unwrap_or_else(|e| panic!("{e}"));
    let (ingress, egress) = (free_port(), free_port());
    std::fs::write(config.join("mesh.yaml"), manifests(ingress, enforced))
        .unwrap_or_else(|e| panic!("{e}"));
    let config_dir = config.display().to_string();
    let (_cp, xds, admin) = start_meshbridge(&["--kube", "off", "--config-dir", &config_dir], &[]);
    wait_ready(&admin, Instant::now(), Duration::from_secs(30)).await;
    let app = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let app_port = app.local_addr().map(|a| a.port()).unwrap_or(0);
    let server = tokio::spawn(meshbridge::demo::serve_app(
        app,
        "orders".into(),
        "a".into(),
    ));
    let _callee = envoy(
        xds,
        "orders",
        &[
            "--ingress-port".into(),
            ingress.to_string(),
            "--app-port".into(),
            app_port.to_string(),
        ],
        enforced,
        dir,
    );
    let _caller = envoy(
        xds,
        "checkout",
        &[
            "--egress-port".into(),
            egress.to_string(),
            "--dependency".into(),
            "orders".into(),
        ],
        enforced,
        dir,
    );
    let latencies = measure(egress).await;
    server.abort();
    latencies
}

fn quantile(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
    identities(dir.path(), &["orders", "checkout"]);
    let plain = scenario(false, dir.path()).await;
    let enforced = scenario(true, dir.path()).await;
    for (name, l) in [
        ("plaintext, no AccessRule", &plain),
        ("strict mTLS + identity + RBAC", &enforced),
    ] {
        println!(
            "{name:32} {REQUESTS} requests: p50 {:?}, p99 {:?}, max {:?}",
            quantile(l, 0.5),
            quantile(l, 0.99),
            l[l.len() - 1]
        );
    }
}
