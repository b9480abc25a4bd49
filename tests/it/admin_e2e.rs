//! End to end: operating the mesh through the admin API of the real `meshbridge` binary,
//! with real Envoys on 127.0.0.1 — where a service's instances are and who calls it, what
//! config an Envoy runs (fetched through meshbridge and compared with Envoy's own admin),
//! log levels, the config diff, comparing two meshbridge instances, and the metrics the
//! README promises (parsed by the Prometheus project's own Python parser).

use crate::support;
use crate::support::consul_fake;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};
use support::fixtures::{Fixture, MeshService, manifests};
use support::{Backend, ControlPlane, Envoy, EnvoyOptions, HttpResponse, eventually, http_get};

/// How long a configuration change may take to reach the Envoys.
const LIMIT: Duration = Duration::from_secs(20);

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";

/// frontend calls orders; orders has instances on `orders_ports`; billing one instance.
fn mesh(orders_ports: &[u16]) -> String {
    manifests(&[
        &MeshService::build("frontend").dependency("orders"),
        &MeshService::build("orders").endpoints("127.0.0.1", orders_ports),
        &MeshService::build("billing").tagged_endpoint("127.0.0.2", 8080, &["canary"]),
    ])
}

fn frontend() -> EnvoyOptions {
    EnvoyOptions {
        service: "frontend".into(),
        egress: true,
        dependencies: vec!["orders".into()],
        ..Default::default()
    }
}

async fn get(addr: SocketAddr, path: &str) -> HttpResponse {
    http_get(addr, "localhost", path, &[]).await.unwrap()
}

async fn post(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut all = vec![("content-length", "0")];
    all.extend_from_slice(headers);
    support::http_request(addr, "POST", "localhost", path, &all)
        .await
        .unwrap()
}

/// `POST /api/proxies/<node>/logging?<query>` on meshbridge's admin API.
async fn set_log_level(
    admin: SocketAddr,
    node: &str,
    query: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    post(
        admin,
        &format!("/api/proxies/{node}/logging?{query}"),
        headers,
    )
    .await
}

/// `r` is a `status` whose JSON `error` says `needle`.
fn assert_error(r: &HttpResponse, status: u16, needle: &str) {
    assert_eq!(r.status, status, "{}", r.body);
    let error = json_of(r)["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains(needle), "no {needle:?} in {error:?}");
}

fn json_of(r: &HttpResponse) -> Value {
    serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}), status {}: {}", r.status, r.body))
}

/// A control plane with orders on two real backends and a frontend Envoy that reaches them.
async fn running_mesh(
    extra_flags: &[&str],
    envoy: EnvoyOptions,
) -> (Backend, Backend, ControlPlane, Envoy) {
    let a = Backend::start("orders", "a").await;
    let b = Backend::start("orders", "b").await;
    let cp = ControlPlane::start(&mesh(&[a.port, b.port]), extra_flags).await;
    let envoy = Envoy::start(&cp, envoy).await;
    envoy
        .wait_call("orders", "orders reachable", |r| r.status == 200)
        .await;
    (a, b, cp, envoy)
}

#[tokio::test]
async fn an_operator_finds_a_services_instances_and_the_envoys_that_call_it() {
    let (a, b, cp, envoy) = running_mesh(&[], frontend()).await;
    let admin = cp.admin_addr();

    let orders = json_of(&get(admin, "/api/services/orders").await);
    let mut addresses: Vec<String> = orders["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| format!("{}:{}", i["address"].as_str().unwrap(), i["port"]))
        .collect();
    addresses.sort();
    let mut expected = vec![
        format!("127.0.0.1:{}", a.port),
        format!("127.0.0.1:{}", b.port),
    ];
    expected.sort();
    assert_eq!(addresses, expected);
    assert_eq!(
        orders["origins"],
        json!({"config": {"total": 2, "healthy": 2}})
    );
    assert_eq!(orders["dependents"]["services"], json!(["frontend"]));
    let proxies = orders["dependents"]["proxies"].as_array().unwrap();
    assert_eq!(proxies.len(), 1, "{orders:#}");
    assert_eq!(proxies[0]["node"], json!(envoy.node_id));
    assert_eq!(proxies[0]["reaches"], true);
    // billing: nobody depends on it, and its canary tag shows.
    let billing = json_of(&get(admin, "/api/services/billing").await);
    assert_eq!(
        billing["dependents"],
        json!({"services": [], "proxies": []})
    );
    assert_eq!(billing["instances"][0]["tags"], json!(["canary"]));
    // The list carries dependents too.
    let list = json_of(&get(admin, "/api/services").await);
    let listed = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "orders")
        .unwrap();
    assert_eq!(listed["dependents"], json!(["frontend"]));

    let missing = get(admin, "/api/services/nope").await;
    assert_error(&missing, 404, "\"nope\"");

    // The proxy: its versions per type, and the resources it gets.
    let proxy = json_of(&get(admin, &format!("/api/proxies/{}", envoy.node_id)).await);
    assert_eq!(proxy["service"], "frontend");
    assert_eq!(
        proxy["admin"],
        json!(format!("127.0.0.1:{}", envoy.admin_port))
    );
    assert_eq!(proxy["types"][CDS]["acked"], proxy["types"][CDS]["sent"]);
    let clusters: Vec<&str> = proxy["resources"][CDS]["names"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    assert!(
        clusters.contains(&meshbridge::translate::names::service_cluster("orders").as_str()),
        "{clusters:?}"
    );
    assert_eq!(proxy["dependencies"], json!(["orders"]));
    assert_eq!(proxy["announced_dependencies"], json!(["orders"]));
    assert!(proxy["connected_at"].as_u64().unwrap() > 1_700_000_000);
    assert_eq!(get(admin, "/api/proxies/ghost-node").await.status, 404);

    // A change: one more orders instance. The change log names the service and the pushed
    // group of the frontend proxy.
    let c = Backend::start("orders", "c").await;
    cp.write_manifests(&mesh(&[a.port, b.port, c.port]));
    let change = eventually(
        LIMIT,
        "the change log shows the new orders instance",
        || async {
            let changes = json_of(&get(admin, "/api/changes").await);
            changes
                .as_array()
                .unwrap()
                .first()
                .filter(|c| c["services_changed"] == json!(["orders"]))
                .cloned()
        },
    )
    .await;
    assert_eq!(change["groups_pushed"], json!([proxy["group"]]));
    assert_eq!(change["groups_pushed_count"], 1);
    assert!(change["generation"].as_u64().unwrap() > 0);

    // Sources: synced, fresh, and a bad manifest counts as an error without losing the model.
    let sources = json_of(&get(admin, "/api/sources").await);
    let config = &sources[0];
    assert_eq!(config["kind"], "config");
    assert_eq!(config["synced"], true);
    assert!(
        config["staleness_seconds"].as_u64().unwrap() < 10,
        "{config}"
    );
    assert!(
        config["last_sync_duration_ms"].as_f64().is_some(),
        "{config}"
    );
    assert_eq!(config["errors"], 0);
    cp.write_file("broken.yaml", "kind: MeshService\nspec: [");
    let config = eventually(
        LIMIT,
        "the bad manifest shows as a source error",
        || async {
            let sources = json_of(&get(admin, "/api/sources").await);
            let s = sources[0].clone();
            s["error"]
                .as_str()
                .is_some_and(|e| e.contains("broken.yaml"))
                .then_some(s)
        },
    )
    .await;
    assert_eq!(config["errors"], 1);
    assert_eq!(
        json_of(&get(admin, "/api/services/orders").await)["instances"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test]
async fn envoy_config_dump_stats_and_clusters_through_meshbridge_match_envoys_own() {
    let (_a, _b, cp, envoy) = running_mesh(&[], frontend()).await;
    let admin = cp.admin_addr();
    let node = &envoy.node_id;

    let via = get(admin, &format!("/api/proxies/{node}/config_dump")).await;
    assert_eq!(via.status, 200);
    assert!(
        via.header("content-type")
            .unwrap()
            .starts_with("application/json")
    );
    let own = get(envoy.admin_addr(), "/config_dump").await;
    assert_eq!(json_of(&via), json_of(&own));
    // With endpoints: the orders assignment lists both instances.
    let with_eds = json_of(
        &get(
            admin,
            &format!("/api/proxies/{node}/config_dump?include_eds"),
        )
        .await,
    );
    assert!(with_eds.to_string().contains("ClusterLoadAssignment"));

    let cluster = meshbridge::translate::names::service_cluster("orders");
    let stat = format!("cluster.{cluster}.membership_total");
    let filter = format!("^{}$", regex::escape(&stat));
    let via = get(
        admin,
        &format!("/api/proxies/{node}/stats?filter={}", urlencode(&filter)),
    )
    .await;
    assert_eq!(via.status, 200, "{}", via.body);
    assert_eq!(via.body.trim(), format!("{stat}: 2"));
    assert_eq!(envoy.stat(&stat).await, Some(2));
    // Only JSON or text comes back, whatever Envoy could render.
    let html = get(admin, &format!("/api/proxies/{node}/stats?format=html")).await;
    assert_eq!(html.status, 400, "{}", html.body);
    let text = get(admin, &format!("/api/proxies/{node}/stats")).await;
    assert!(
        text.header("content-type")
            .unwrap()
            .starts_with("text/plain")
    );
    assert_eq!(text.header("x-content-type-options"), Some("nosniff"));
    let bad = get(admin, &format!("/api/proxies/{node}/stats?filter=%28")).await;
    assert_error(&bad, 400, "regular expression");

    let clusters = json_of(&get(admin, &format!("/api/proxies/{node}/clusters?format=json")).await);
    let orders = clusters["cluster_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == json!(cluster))
        .unwrap();
    assert_eq!(orders["host_statuses"].as_array().unwrap().len(), 2);

    // What meshbridge sent and what Envoy runs agree.
    let diff = json_of(&get(admin, &format!("/api/proxies/{node}/diff")).await);
    assert_eq!(diff["in_sync"], true, "{diff:#}");
    for t in diff["types"].as_array().unwrap() {
        assert_eq!(t["sent"], t["envoy"], "{t}");
        assert_eq!(t["only_sent"], json!([]), "{t}");
        assert_eq!(t["only_envoy"], json!([]), "{t}");
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn a_log_level_change_reaches_envoy_and_is_audited() {
    let (_a, _b, cp, envoy) = running_mesh(&[], frontend()).await;
    let admin = cp.admin_addr();
    let node = &envoy.node_id;
    assert!(envoy.log_levels().await.iter().all(|(_, l)| l != "debug"));

    let r = set_log_level(admin, node, "level=debug", &[("x-forwarded-user", "alice")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(json_of(&r)["level"], "debug");
    let levels = envoy.log_levels().await;
    assert!(levels.len() > 10, "{levels:?}");
    assert!(levels.iter().all(|(_, l)| l == "debug"), "{levels:?}");

    // One logger.
    let r = set_log_level(admin, node, "level=trace&logger=upstream", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let levels = envoy.log_levels().await;
    assert!(levels.contains(&("upstream".to_string(), "trace".to_string())));
    assert!(levels.contains(&("config".to_string(), "debug".to_string())));

    let audit = json_of(&get(admin, "/api/audit").await);
    assert_eq!(audit[1]["who"], "alice");
    assert_eq!(audit[1]["action"], "log-level");
    assert_eq!(audit[1]["node"], json!(node));
    assert_eq!(audit[1]["detail"], "level=debug");
    assert_eq!(audit[1]["result"], "ok");
    assert_eq!(audit[0]["who"], Value::Null);
    assert_eq!(audit[0]["detail"], "upstream=trace");
    assert!(
        cp.log().contains("who=alice"),
        "the change is in meshbridge's log"
    );

    let bad = set_log_level(admin, node, "level=loud", &[]).await;
    assert_error(&bad, 400, "debug");
    let nobody = post(admin, "/api/proxies/ghost/logging?level=info", &[]).await;
    assert_error(&nobody, 404, "ghost");
    // A page on another site cannot change levels through an operator's browser.
    let forged = set_log_level(
        admin,
        node,
        "level=trace",
        &[("origin", "http://evil.example")],
    )
    .await;
    assert_eq!(forged.status, 403, "{}", forged.body);
    assert!(
        envoy
            .log_levels()
            .await
            .contains(&("config".to_string(), "debug".to_string())),
        "the forged request changed nothing"
    );
    // Every attempt is audited, refused ones too, with the address it came from.
    let audit = json_of(&get(admin, "/api/audit").await);
    let results: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["result"].as_str().unwrap())
        .collect();
    assert_eq!(results.len(), 5, "{audit:#}");
    assert!(results[0].contains("cross-site"), "{results:?}");
    assert!(results[1].contains("ghost"), "{results:?}");
    assert!(results[2].contains("loud"), "{results:?}");
    assert!(audit[0]["from"].as_str().unwrap().starts_with("127.0.0.1:"));
}

#[tokio::test]
async fn the_diagnostics_listener_serves_the_control_plane_and_refuses_the_rest() {
    let diagnostics = support::free_port();
    let (_a, _b, cp, envoy) = running_mesh(
        &[],
        EnvoyOptions {
            diagnostics_port: Some(diagnostics),
            ..frontend()
        },
    )
    .await;
    let admin = cp.admin_addr();
    let node = &envoy.node_id;
    let proxy = json_of(&get(admin, &format!("/api/proxies/{node}")).await);
    assert_eq!(proxy["diagnostics_port"], diagnostics);
    assert_eq!(proxy["admin"], json!(format!("127.0.0.1:{diagnostics}")));

    let via = json_of(&get(admin, &format!("/api/proxies/{node}/config_dump")).await);
    assert_eq!(via, json_of(&get(envoy.admin_addr(), "/config_dump").await));
    let r = set_log_level(admin, node, "level=warning", &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(envoy.log_levels().await.iter().all(|(_, l)| l == "warning"));

    // Even an allowed address gets only the read-only views, however the path is spelt.
    let port = SocketAddr::from(([127, 0, 0, 1], diagnostics));
    for path in [
        "/quitquitquit",
        "/healthcheck/fail",
        "/runtime_modify?x=1",
        "/reset_counters",
        "/logging/../quitquitquit",
    ] {
        assert_eq!(post(port, path, &[]).await.status, 403, "{path}");
    }
    for path in [
        "/certs",
        "/stats/../certs",
        "//certs",
        "/stats/%2E%2E/certs",
        "/stats%2F..%2Fcerts",
    ] {
        let status = get(port, path).await.status;
        assert!(status == 403 || status == 400, "{path}: {status}");
    }
    assert_eq!(get(port, "/server_info").await.status, 200);
    assert_eq!(get(port, "/stats/prometheus").await.status, 200);
    // Another address is refused outright.
    let other = support::http_request_from(
        std::net::IpAddr::from([127, 0, 0, 2]),
        port,
        "GET",
        "localhost",
        "/config_dump",
        &[],
    )
    .await
    .unwrap();
    assert_eq!(other.status, 403);
    assert_eq!(
        get(envoy.admin_addr(), "/ready").await.status,
        200,
        "Envoy still runs"
    );
}

#[tokio::test]
async fn a_hung_envoy_is_a_clear_error_naming_its_address() {
    let (_a, _b, cp, envoy) = running_mesh(&["--diagnostics-timeout", "500"], frontend()).await;
    let admin = cp.admin_addr();
    let pid = envoy.pid().to_string();
    let stop = std::process::Command::new("kill")
        .args(["-STOP", &pid])
        .status()
        .unwrap();
    assert!(stop.success());
    let r = get(
        admin,
        &format!("/api/proxies/{}/config_dump", envoy.node_id),
    )
    .await;
    let _ = std::process::Command::new("kill")
        .args(["-CONT", &pid])
        .status();
    assert_eq!(r.status, 502, "{}", r.body);
    let error = json_of(&r)["error"].as_str().unwrap().to_string();
    assert!(
        error.contains(&format!("127.0.0.1:{}", envoy.admin_port)),
        "{error}"
    );
    assert!(error.contains("500 ms"), "{error}");
    let metrics = cp.metrics().await;
    assert!(
        metrics.contains(
            "meshbridge_diagnostics_requests_total{action=\"config_dump\",result=\"unreachable\"} 1"
        ),
        "{metrics}"
    );
    // It recovers with Envoy.
    let r = get(
        admin,
        &format!("/api/proxies/{}/config_dump", envoy.node_id),
    )
    .await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn two_instances_agree_on_the_same_sources_and_name_what_differs() {
    let a = Backend::start("orders", "a").await;
    let manifests = mesh(&[a.port]);
    let other = ControlPlane::start(&manifests, &[]).await;
    let peer = format!("http://{}", other.admin_addr());
    let cp =
        ControlPlane::start(&manifests, &["--peer", &peer, "--peer-check-interval", "0"]).await;
    let admin = cp.admin_addr();

    let cmp = json_of(&get(admin, "/api/compare").await);
    assert_eq!(cmp["agree"], true, "{cmp:#}");
    assert_eq!(cmp["peers"][0]["peer"], json!(peer));
    assert_eq!(cmp["peers"][0]["digest"], cmp["self"]["digest"]);
    assert_eq!(
        json_of(&get(admin, "/api/state").await)["digest"],
        json_of(&get(other.admin_addr(), "/api/state").await)["digest"]
    );

    // The other instance gets one more manifest and one more orders instance.
    let b = Backend::start("orders", "b").await;
    other.write_manifests(&mesh(&[a.port, b.port]));
    other.write_file(
        "extra.yaml",
        &MeshService::build("payments")
            .endpoint("127.0.0.9", 9000)
            .yaml(),
    );
    let cmp = eventually(LIMIT, "the instances disagree", || async {
        let cmp = json_of(&get(admin, "/api/compare").await);
        (cmp["agree"] == false
            && cmp["peers"][0]["differences"]["services_only_there"] == json!(["payments"])
            && cmp["peers"][0]["differences"]["services_changed"]
                .as_array()
                .is_some_and(|c| c.len() == 1))
        .then_some(cmp)
    })
    .await;
    let peer_view = &cmp["peers"][0];
    assert_eq!(peer_view["agree"], false);
    assert_ne!(peer_view["digest"], cmp["self"]["digest"]);
    let changed = &peer_view["differences"]["services_changed"][0];
    assert_eq!(changed["name"], "orders");
    assert_eq!(
        changed["instances_only_there"],
        json!([format!("127.0.0.1:{}", b.port)])
    );
    assert_eq!(changed["instances_only_here"], json!([]));
    assert_eq!(peer_view["differences"]["services_only_here"], json!([]));
    assert!(
        cp.metrics()
            .await
            .contains(&format!("meshbridge_peer_agree{{peer=\"{peer}\"}} 0")),
        "the disagreement is a metric"
    );

    // A peer that is down is an error naming it, never agreement.
    drop(other);
    let cmp = json_of(&get(admin, "/api/compare").await);
    assert_eq!(cmp["agree"], false);
    assert!(
        cmp["peers"][0]["error"].as_str().unwrap().contains(&peer),
        "{cmp:#}"
    );
}

#[tokio::test]
async fn the_web_ui_is_served_by_the_admin_server() {
    let cp = ControlPlane::start(&mesh(&[8080]), &[]).await;
    let index = get(cp.admin_addr(), "/").await;
    assert_eq!(index.status, 200);
    assert!(
        index
            .header("content-type")
            .unwrap()
            .starts_with("text/html")
    );
    for asset in ["/ui/app.js", "/ui/app.css"] {
        assert!(index.body.contains(asset), "index.html loads {asset}");
        let r = get(cp.admin_addr(), asset).await;
        assert_eq!(r.status, 200, "{asset}");
        assert!(!r.body.trim().is_empty(), "{asset}");
    }
}

/// The metric table of the README: `(name, labels)` per row.
fn readme_metrics() -> Vec<(String, Vec<String>)> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme
        .split("\n### Metrics\n")
        .nth(1)
        .expect("README has a '### Metrics' section")
        .split("\n#")
        .next()
        .unwrap();
    let rows: Vec<(String, Vec<String>)> = section
        .lines()
        .filter(|l| l.starts_with("| `meshbridge_"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells[1].trim_matches('`').to_string();
            let labels = cells[3]
                .split(',')
                .map(|s| s.trim().trim_matches('`').to_string())
                .filter(|s| !s.is_empty() && s != "—")
                .collect();
            (name, labels)
        })
        .collect();
    assert!(rows.len() > 30, "the README lists the metrics: {rows:?}");
    rows
}

#[tokio::test]
async fn every_metric_the_readme_names_is_exported_and_metrics_parse() {
    // Every kind of source this machine can run: manifests, Consul (the fake) and a peer
    // (one that is down).
    let consul = consul_fake::FakeConsul::start("dc1").await;
    consul.register(
        "dc1",
        consul_fake::Instance::new("payments", "payments-1", "127.0.0.3", 9000),
    );
    let url = consul.url();
    let flags = [
        "--consul-addr",
        url.as_str(),
        "--consul-wait",
        "2000",
        "--peer",
        "http://127.0.0.1:1",
        "--peer-check-interval",
        "1",
        "--load-report-interval",
        "1000",
    ];
    let (_a, _b, cp, envoy) = running_mesh(&flags, frontend()).await;
    // A change, a diagnostics request and a bad manifest, so most families have samples.
    cp.write_file("broken.yaml", "kind: [");
    let r = get(
        cp.admin_addr(),
        &format!("/api/proxies/{}/clusters", envoy.node_id),
    )
    .await;
    assert_eq!(r.status, 200);
    eventually(
        LIMIT,
        "the source error and the proxy's load are counted",
        || async {
            // Calls the proxy keeps reporting (a cluster's first report counts nothing).
            let _ = envoy.call("orders", "/").await;
            let m = cp.metrics().await;
            (m.contains("meshbridge_source_errors_total{source=\"config:")
                && m.contains("meshbridge_peer_agree{")
                && m.contains("meshbridge_load_requests_total{"))
            .then_some(())
        },
    )
    .await;
    let text = cp.metrics().await;

    // Served as OpenMetrics, and parsed by the reference parser (prometheus_client, from the
    // test venv), which is strict about types, suffixes and `# EOF`.
    let r = get(cp.admin_addr(), "/metrics").await;
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/openmetrics-text; version=1.0.0")
    );
    let python = support::envoy_bin().parent().unwrap().join("python");
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = {"type": f.type, "samples": [[s.name, sorted(s.labels)] for s in f.samples]}
print(json.dumps(out))
"#;
    let mut child = std::process::Command::new(&python)
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "{}: {e} (run `make test` to create the venv)",
                python.display()
            )
        });
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "/metrics does not parse: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let families: Value = serde_json::from_slice(&out.stdout).unwrap();

    for (name, labels) in readme_metrics() {
        // The parser names counter families without `_total`.
        let family = families
            .get(&name)
            .or_else(|| families.get(name.trim_end_matches("_total")))
            .unwrap_or_else(|| panic!("README names {name}, /metrics lacks it"));
        for sample in family["samples"].as_array().unwrap() {
            let mut got: Vec<String> = sample[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_str().unwrap().to_string())
                .filter(|l| l != "le")
                .collect();
            got.sort();
            let mut want = labels.clone();
            want.sort();
            assert_eq!(got, want, "labels of {name}");
        }
    }
    // And after this short run, the ones a running mesh always has carry samples.
    for name in [
        "meshbridge_xds_streams",
        "meshbridge_xds_subscriptions",
        "meshbridge_xds_ack_seconds",
        "meshbridge_snapshot_group_build_seconds",
        "meshbridge_source_synced",
        "meshbridge_source_staleness_seconds",
        "meshbridge_source_sync_seconds",
        "meshbridge_index_objects",
        "meshbridge_diagnostics_requests",
        "meshbridge_build_info",
        "meshbridge_consul_requests",
        "meshbridge_peer_agree",
        "meshbridge_load_requests",
        "meshbridge_load_errors",
    ] {
        let samples = families[name]["samples"].as_array().map_or(0, Vec::len);
        assert!(samples > 0, "{name} has no samples:\n{text}");
    }
}

#[tokio::test]
async fn with_a_token_file_only_token_holders_use_the_api_and_read_tokens_only_read() {
    let tokens = tempfile::tempdir().unwrap();
    let file = tokens.path().join("tokens");
    std::fs::write(
        &file,
        "# operators\nalice-0123456789abcdef alice\ngrafana-0123456789abcdef grafana read\n",
    )
    .unwrap();
    let flag = file.display().to_string();
    let (_a, _b, cp, envoy) = running_mesh(&["--admin-token-file", &flag], frontend()).await;
    let admin = cp.admin_addr();
    let alice = [("authorization", "Bearer alice-0123456789abcdef")];
    let grafana = [("authorization", "Bearer grafana-0123456789abcdef")];
    let get_as = |path: &'static str, who: &'static [(&'static str, &'static str)]| async move {
        http_get(admin, "localhost", path, who).await.unwrap()
    };

    // Probes, the UI's files and /metrics stay open; the API does not.
    for open in ["/healthz", "/readyz", "/", "/ui/app.js", "/metrics"] {
        assert_eq!(get_as(open, &[]).await.status, 200, "{open}");
    }
    let r = get_as("/api/services", &[]).await;
    assert_error(&r, 401, "Bearer");
    let r = get_as(
        "/api/proxies",
        &[("authorization", "Bearer not-a-token-at-all")],
    )
    .await;
    assert_error(&r, 401, "not one of");

    // A read token reads but changes nothing; the refusal is audited with its user.
    let r = http_get(admin, "localhost", "/api/services", &grafana)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let node = &envoy.node_id;
    let path = format!("/api/proxies/{node}/logging?level=debug");
    let mut headers = vec![("content-length", "0")];
    headers.extend_from_slice(&grafana);
    let r = support::http_request(admin, "POST", "localhost", &path, &headers)
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(envoy.log_levels().await.iter().all(|(_, l)| l != "debug"));

    // A write token changes the level; the audit names the authenticated user, not what a
    // header claims.
    let mut headers = vec![("content-length", "0"), ("x-forwarded-user", "mallory")];
    headers.extend_from_slice(&alice);
    let r = support::http_request(admin, "POST", "localhost", &path, &headers)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(envoy.log_levels().await.iter().all(|(_, l)| l == "debug"));
    let audit = json_of(
        &http_get(admin, "localhost", "/api/audit", &alice)
            .await
            .unwrap(),
    );
    assert_eq!(audit[0]["who"], "alice", "{audit}");
    assert_eq!(audit[0]["action"], "log-level");
    let refusals: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "admin-call")
        .collect();
    assert_eq!(refusals.len(), 3, "{audit}");
    assert_eq!(refusals[0]["who"], "grafana");
    assert!(refusals[0]["result"].as_str().unwrap().starts_with("403"));
    assert_eq!(refusals[2]["who"], Value::Null);
    assert!(
        refusals[2]["detail"]
            .as_str()
            .unwrap()
            .ends_with("/api/services")
    );

    // `meshbridge ctl` sends the token from its file, and says why without one.
    let ctl_token = tokens.path().join("ctl-token");
    std::fs::write(&ctl_token, "alice-0123456789abcdef\n").unwrap();
    let url = format!("http://{admin}");
    let ctl = |extra: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"))
            .args(["ctl", "--admin", &url])
            .args(extra)
            .arg("services")
            .output()
            .unwrap()
    };
    let out = ctl(&["--token-file", ctl_token.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("orders"));
    let out = ctl(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
