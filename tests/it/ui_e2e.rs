//! End to end: the admin web UI in a real headless Chromium, against the real `meshbridge`
//! binary configuring a real Envoy. `tests/ui/ui.mjs` (playwright-core) drives the browser:
//! every page is loaded and checked, the proxy's diagnostics buttons are clicked, and a
//! full-page screenshot of each page is kept in `<target dir>/ui-screenshots/`.
//!
//! Needs Chromium (`/usr/bin/chromium`, or `CHROMIUM_BIN`), Node.js and
//! `tests/ui/node_modules`: `make test` installs them with `tests/ui/setup.sh`.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::kube_e2e::{legacy, pod};
use crate::migration_e2e::{start_with, within_bound};
use crate::support::consul_fake::{FakeConsul, Instance};
use crate::support::kube_fake::FakeKube;

use serde_json::{Value, json};
use support::fixtures::{AccessRule, Fixture, MeshService, manifests};
use support::{Backend, ControlPlane, Envoy, EnvoyOptions, eventually};

/// The most the browser script may take, start to end.
const UI_LIMIT: Duration = Duration::from_secs(150);
/// How long a configuration change may take to reach the Envoy.
const LIMIT: Duration = Duration::from_secs(20);
/// A tag that is HTML: the UI must show it as text.
const HTML_TAG: &str = "<img src=nope>";
/// Every page's screenshot (`error` is the page of a service that does not exist).
const SCREENSHOTS: &[&str] = &[
    "services",
    "service",
    "proxies",
    "proxy-stats",
    "proxy",
    "sources",
    "compare",
    "changes",
    "board",
    "error",
];

/// frontend calls orders and billing; orders' AccessRule names frontend and a caller no
/// service matches. The peer replica sees only the first two services.
struct Mesh {
    frontend: MeshService,
    orders: MeshService,
    billing: MeshService,
    orders_rule: AccessRule,
}

impl Mesh {
    fn new(orders_port: u16, billing_port: u16) -> Mesh {
        Mesh {
            frontend: MeshService::build("frontend")
                .dependency("orders")
                .dependency("billing"),
            orders: MeshService::build("orders")
                .set("mtls", "permissive")
                .set(
                    "migration",
                    json!({"to": "config", "weight": 100, "mirror": 10}),
                )
                .endpoint_with(json!({
                    "address": "127.0.0.1",
                    "port": orders_port,
                    "datacenter": "dc1",
                    "tags": ["canary", HTML_TAG],
                })),
            billing: MeshService::build("billing")
                .endpoint_with(json!({"address": "127.0.0.1", "port": billing_port, "weight": 5})),
            orders_rule: AccessRule::build("orders")
                .target("orders")
                .action("deny")
                .allow_with(json!({
                    "from": ["frontend", "legacy-batch"],
                    "paths": [{"prefix": "/hello"}],
                    "methods": ["GET"],
                })),
        }
    }

    /// Every document: what the replica under test reads.
    fn all(&self) -> String {
        manifests(&[
            &self.frontend,
            &self.orders,
            &self.billing,
            &self.orders_rule,
        ])
    }

    /// frontend and orders only: what the peer replica reads.
    fn peer(&self) -> String {
        manifests(&[&self.frontend, &self.orders])
    }
}

/// `CARGO_TARGET_DIR` if set, else `target/` of this crate.
fn target_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    }
}

/// Fails, naming the fix, when the browser test's tools are not installed.
fn require_browser_tools(ui_dir: &Path) {
    const FIX: &str = "run `make test`, or `bash tests/ui/setup.sh`, to install them";
    let chromium = std::env::var_os("CHROMIUM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/chromium"));
    assert!(
        chromium.is_file(),
        "Chromium not found at {} (set CHROMIUM_BIN to use another): {FIX}",
        chromium.display()
    );
    let node = std::process::Command::new("node").arg("--version").output();
    assert!(
        node.as_ref().is_ok_and(|o| o.status.success()),
        "Node.js (`node`) is not installed: {FIX} ({node:?})"
    );
    assert!(
        ui_dir
            .join("node_modules/playwright-core/package.json")
            .is_file(),
        "tests/ui/node_modules has no playwright-core: {FIX}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_ui_in_a_real_browser_shows_the_mesh_and_runs_diagnostics() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ui_dir = root.join("tests/ui");
    require_browser_tools(&ui_dir);

    let orders = Backend::start("orders", "a").await;
    let billing = Backend::start("billing", "a").await;
    // A peer replica that sees only frontend and orders: the compare page shows how it differs.
    let mesh = Mesh::new(orders.port, billing.port);
    let peer = ControlPlane::start(&mesh.peer(), &[]).await;
    let peer_url = format!("http://{}", peer.admin_addr());
    let cp = ControlPlane::start(&mesh.all(), &["--peer", &peer_url]).await;
    let envoy = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "frontend".into(),
            egress: true,
            ..Default::default()
        },
    )
    .await;
    let node = envoy.node_id.clone();
    // Traffic flows, so the proxy has its whole configuration and stats about orders.
    envoy
        .wait_call("orders", "orders routed", |r| r.status == 200)
        .await;
    // The browser checks that meshbridge and Envoy agree: wait for it first.
    eventually(LIMIT, "the config diff in sync", || async {
        let r = support::http_get(
            cp.admin_addr(),
            "localhost",
            &format!("/api/proxies/{node}/diff"),
            &[],
        )
        .await
        .ok()?;
        let diff: Value = serde_json::from_str(&r.body).ok()?;
        (r.status == 200 && diff["in_sync"] == true).then_some(())
    })
    .await;
    let before = envoy.log_levels().await;
    assert!(
        before.iter().any(|(_, level)| level != "debug"),
        "Envoy already logs at debug: {before:?}"
    );

    let shots = screenshot_dir("ui-screenshots");
    let expectations = json!({
        "url": format!("http://{}/", cp.admin_addr()),
        "screenshots": shots,
        "services": ["billing", "frontend", "orders"],
        "search": {"query": "ORD", "match": ["orders"], "hidden": ["billing", "frontend"]},
        "service": {
            "name": "orders",
            "instances": 1,
            "dependent_proxy": node,
            "dependent_services": ["frontend"],
            "access_action": "deny",
            "unknown_callers": ["legacy-batch"],
            "text": [format!("127.0.0.1:{}", orders.port), "permissive", "dc1", "canary", "prefix /hello", "100% to config, 10% mirrored", "Load (last minute)"],
            "escaped": HTML_TAG,
            "ejections": "Asked 1 of 1 proxies holding it (1 answered): no instance ejected.",
            "latency": "Asked 1 of 1 proxies holding it (1 answered):",
        },
        "proxy": node,
        "stats": {"filter": "^cluster\\.orders\\.membership_", "expect": "cluster.orders.membership_healthy: 1"},
        "clusters": "orders::",
        "log_level": "debug",
        "compare": {"overall": "peers disagree", "peers": 1, "text": [peer_url, "billing"]},
        "missing_service": "no-such-service",
        "changes_min": 1,
        "board": {
            "services": {
                "orders": {"runs_on": "hosts", "text": ["100% to config, 10% mirrored", "1/1"]},
                "billing": {"runs_on": "hosts"},
                "frontend": {"runs_on": "none"},
            },
            "edges": [["frontend", "orders"], ["frontend", "billing"]],
            "summary": ["Migrating"],
        },
    });

    run_browser(&ui_dir, &expectations, &shots, SCREENSHOTS).await;

    // The "Apply" button changed the level in Envoy itself, as Envoy's own admin tells.
    let after = envoy.log_levels().await;
    assert!(after.len() > 10, "too few loggers listed: {after:?}");
    let not_debug: Vec<_> = after.iter().filter(|(_, l)| l != "debug").collect();
    assert!(not_debug.is_empty(), "loggers not at debug: {not_debug:?}");
    // And the change was audited.
    let audit = cp.admin_json("/api/audit").await;
    let entries = audit.as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["node"] == node.as_str() && e.to_string().contains("debug")),
        "no audit entry for the log level change: {audit}"
    );
}

/// An empty directory for screenshots under the target directory.
fn screenshot_dir(name: &str) -> PathBuf {
    let shots = target_dir().join(name);
    std::fs::create_dir_all(&shots).unwrap();
    for entry in std::fs::read_dir(&shots).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "png") {
            std::fs::remove_file(path).unwrap();
        }
    }
    shots
}

/// Runs `tests/ui/ui.mjs` with `expectations`; fails with its output unless every one holds
/// and every screenshot of `expected` is a real PNG in `shots`.
async fn run_browser(ui_dir: &Path, expectations: &Value, shots: &Path, expected: &[&str]) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let mut cmd = tokio::process::Command::new("node");
    cmd.arg(ui_dir.join("ui.mjs"))
        .arg(expectations.to_string())
        .current_dir(root)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(UI_LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("tests/ui/ui.mjs took longer than {UI_LIMIT:?}"))
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "tests/ui/ui.mjs failed ({}); screenshots in {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
        out.status,
        shots.display()
    );
    eprintln!(
        "{stdout}browser checks took {:.1}s; screenshots in {}",
        started.elapsed().as_secs_f64(),
        shots.display()
    );
    for name in expected {
        let file = shots.join(format!("{name}.png"));
        let bytes = std::fs::read(&file)
            .unwrap_or_else(|e| panic!("screenshot {} missing: {e}", file.display()));
        assert!(
            bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 5_000,
            "{} is not a real PNG screenshot ({} bytes)",
            file.display(),
            bytes.len()
        );
    }
}

/// The migration board in Chromium, on the Kubernetes and Consul fakes with real Envoy
/// traffic: `orders` runs on a Consul host and a pod and is 25% into a plan, `billing` only
/// on a Consul host, `frontend` only on a pod. The board colours each by where it runs,
/// draws frontend's calls, shows the live share the load reports measured, and its Pause
/// button writes the order the leader then carries out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_migration_board_shows_where_services_run_and_gives_orders() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let ui_dir = root.join("tests/ui");
    require_browser_tools(&ui_dir);

    let kube = FakeKube::start().await;
    let consul = FakeConsul::start("dc1").await;
    let vm = Backend::start("orders", "vm-1").await;
    let pod_a = Backend::start("orders", "pod-a").await;
    let billing = Backend::start("billing", "vm-1").await;
    let front = Backend::start("frontend", "pod-a").await;
    consul.register(
        "dc1",
        Instance::new("orders", "orders-vm-1", "127.0.0.1", vm.port),
    );
    consul.register(
        "dc1",
        Instance::new("billing", "billing-vm-1", "127.0.0.1", billing.port),
    );
    kube.apply(crate::migration_e2e::orders(json!({
        "to": "kubernetes", "steps": [25, 100], "interval": "10m"
    })));
    kube.apply(
        MeshService::build("frontend")
            .namespace("shop")
            .selector("frontend")
            .set("ports", json!([{"port": 80}]))
            .dependency("orders")
            .dependency("billing")
            .json(),
    );
    kube.apply(pod("orders-a", "orders", pod_a.port, true));
    kube.apply(pod("frontend-a", "frontend", front.port, true));
    let cp = start_with(&kube, &consul, 500, &[]).await;
    let caller = Envoy::start(&cp, legacy(&["orders", "billing"])).await;

    // Traffic until the load reports show both origins of orders.
    const N: usize = 200;
    let reported = eventually(LIMIT, "orders' traffic in the load reports", || async {
        for _ in 0..20 {
            let _ = caller.call("orders", "/").await;
        }
        let board = cp.admin_json("/api/migration").await;
        let orders = board["services"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == "orders")?
            .clone();
        let total: u64 = ["consul", "kubernetes"]
            .iter()
            .map(|o| orders["origins"][o]["requests"].as_u64().unwrap_or(0))
            .sum();
        (total >= N as u64).then_some(orders)
    })
    .await;
    let pods = reported["origins"]["kubernetes"]["requests"]
        .as_u64()
        .unwrap() as usize;
    let hosts = reported["origins"]["consul"]["requests"].as_u64().unwrap() as usize;
    assert!(
        within_bound(pods, pods + hosts, 0.25),
        "{pods} of {} at the pods",
        pods + hosts
    );
    assert_eq!(reported["runs_on"], "both", "{reported}");

    let shots = screenshot_dir("ui-screenshots/board");
    let expectations = json!({
        "url": format!("http://{}/", cp.admin_addr()),
        "screenshots": shots,
        "board_only": true,
        "board": {
            "services": {
                "orders": {"runs_on": "both", "text": [
                    "consul 1/1", "kubernetes 1/1", "25% to kubernetes",
                    "Progressing at step 1 of 2", "hosts ", "· pods ",
                ]},
                "billing": {"runs_on": "hosts", "text": ["consul 1/1"]},
                "frontend": {"runs_on": "pods", "text": ["kubernetes 1/1"]},
            },
            "edges": [["frontend", "orders"], ["frontend", "billing"]],
            "summary": ["On both", "Migrating"],
            "order": {"service": "orders", "order": "pause", "expect": "Paused"},
        },
    });
    run_browser(&ui_dir, &expectations, &shots, &["board", "board-order"]).await;

    // The button wrote the standing order, audited.
    let object = kube
        .get(crate::kube_e2e::MS, "MeshService", Some("shop"), "orders")
        .unwrap();
    assert_eq!(
        object["metadata"]["annotations"]["meshbridge.io/migration"],
        "pause"
    );
    assert_eq!(object["status"]["migration"]["phase"], "Paused");
    let audit = cp.admin_json("/api/audit").await;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "migration" && e["service"] == "orders" && e["result"] == "ok"),
        "{audit}"
    );
}
