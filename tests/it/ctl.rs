//! End to end: `meshbridge ctl` against the real `meshbridge run` with a real Envoy connected
//! through `meshbridge bootstrap`. Every check runs the `meshbridge` binary as a user would
//! and looks at what it prints and how it exits.

use crate::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::fixtures::{AccessRule, MeshService, manifests};
use support::{ControlPlane, Envoy, EnvoyOptions, eventually, free_port, http_get};

const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
const TYPES: [&str; 4] = [CDS, EDS, LDS, RDS];

/// frontend calls orders (two instances, one tagged canary, neither needs to run: nothing
/// here sends traffic); billing has one instance; an AccessRule lets frontend GET /hello on
/// orders.
fn mesh(billing_port: u16) -> String {
    manifests(&[
        &MeshService::build("frontend").dependency("orders"),
        &MeshService::build("orders")
            .set("mtls", "permissive")
            .tagged_endpoint("127.0.0.1", 41001, &["v1"])
            .tagged_endpoint("127.0.0.1", 41002, &["v2", "canary"]),
        &MeshService::build("billing").endpoint("127.0.0.1", billing_port),
        &AccessRule::build("orders")
            .target("orders")
            .action("deny")
            .allow_with(
                json!({"from": ["frontend"], "paths": [{"prefix": "/hello"}], "methods": ["GET"]}),
            ),
    ])
}

/// [`mesh`] as most tests see it.
fn default_mesh() -> String {
    mesh(41003)
}

/// What one `meshbridge ctl` run printed and how it exited.
#[derive(Debug)]
pub(crate) struct Out {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Out {
    pub(crate) fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "ctl failed: {self:?}");
        &self.stdout
    }

    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(self.ok())
            .unwrap_or_else(|e| panic!("ctl output is not JSON ({e}): {}", self.stdout))
    }

    /// Exit 1 with a one-line message on stderr and nothing on stdout.
    fn failed(&self) -> &str {
        assert_eq!(self.code, 1, "expected exit 1: {self:?}");
        assert!(self.stdout.is_empty(), "{self:?}");
        assert_eq!(self.stderr.trim_end().lines().count(), 1, "{self:?}");
        self.stderr.trim_end()
    }

    /// [`Out::failed`], with a message saying each of `needles`.
    pub(crate) fn failed_saying(&self, needles: &[&str]) {
        let msg = self.failed();
        for needle in needles {
            assert!(msg.contains(needle), "no {needle:?} in {msg}");
        }
    }
}

/// Runs `meshbridge ctl ARGS` with `MESHBRIDGE_ADMIN=admin` (unless `admin` is empty), no
/// proxy settings from the environment, bounded to 60 s.
pub(crate) async fn ctl_env(admin: &str, args: &[&str]) -> Out {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"));
    cmd.arg("ctl").args(args).kill_on_drop(true);
    for var in [
        "MESHBRIDGE_ADMIN",
        "HTTP_PROXY",
        "http_proxy",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "all_proxy",
    ] {
        cmd.env_remove(var);
    }
    if !admin.is_empty() {
        cmd.env("MESHBRIDGE_ADMIN", admin);
    }
    let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
        .await
        .expect("meshbridge ctl did not finish within 60s")
        .unwrap();
    Out {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

/// Runs `meshbridge ctl --admin URL ARGS` against `cp`.
async fn ctl(cp: &ControlPlane, args: &[&str]) -> Out {
    let admin = format!("http://{}", cp.admin_addr());
    let mut all = vec!["--admin", admin.as_str()];
    all.extend_from_slice(args);
    ctl_env("", &all).await
}

/// The control plane on [`default_mesh`] and a frontend Envoy (SotW, with egress) that has ACKed a
/// version of every type; returns them with the proxy as `/api/proxies` lists it.
async fn mesh_with_envoy() -> (ControlPlane, Envoy, Value) {
    let cp = ControlPlane::start(&default_mesh(), &[]).await;
    let envoy = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "frontend".into(),
            dependencies: vec!["orders".into()],
            egress: true,
            ..Default::default()
        },
    )
    .await;
    let proxy = acked_proxy(&cp, &envoy.node_id).await;
    (cp, envoy, proxy)
}

/// Waits until the proxy `node` has ACKed what it was last sent, for every type.
async fn acked_proxy(cp: &ControlPlane, node: &str) -> Value {
    eventually(
        Duration::from_secs(20),
        "the proxy ACKs every type",
        || async {
            let list = cp.admin_json("/api/proxies").await;
            let p = list.as_array()?.iter().find(|p| p["node"] == node)?.clone();
            TYPES
                .iter()
                .all(|t| {
                    let s = &p["types"][*t];
                    s["acked"].is_string() && s["acked"] == s["sent"] && s["nack"].is_null()
                })
                .then_some(p)
        },
    )
    .await
}

/// The line of a table whose first column is `first`.
fn row<'a>(table: &'a str, first: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.split_whitespace().next() == Some(first))
        .unwrap_or_else(|| panic!("no row {first:?} in:\n{table}"))
}

/// `value` without any `last_updated` field, at any depth.
fn without_last_updated(value: &Value) -> Value {
    match value {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| k.as_str() != "last_updated")
                .map(|(k, v)| (k.clone(), without_last_updated(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_last_updated).collect()),
        other => other.clone(),
    }
}

/// Envoy's own admin answer to a GET of `path`.
async fn envoy_admin(envoy: &Envoy, path: &str) -> String {
    let r = http_get(envoy.admin_addr(), "localhost", path, &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "Envoy {path}: {}", r.body);
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_list_and_one_service() {
    let (cp, envoy, _) = mesh_with_envoy().await;

    let list = ctl(&cp, &["services"]).await;
    let out = list.ok();
    assert!(out.starts_with("NAME"), "{out}");
    let orders = row(out, "orders");
    for want in ["2/2", "config", "permissive", "frontend"] {
        assert!(orders.contains(want), "{want:?} missing from {orders:?}");
    }
    assert!(row(out, "billing").contains("1/1"), "{out}");
    assert!(row(out, "frontend").contains("0/0"), "{out}");

    let one = ctl(&cp, &["services", "orders"]).await;
    let out = one.ok();
    for want in [
        "service:       orders",
        "127.0.0.1:41001",
        "127.0.0.1:41002",
        "canary, v2",
        "config 2/2 healthy",
        "services: frontend",
        envoy.node_id.as_str(),
        "access: deny",
        "frontend -> GET /hello*",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    // The instances table: one row per instance, with origin and health.
    let instance = out.lines().find(|l| l.contains("127.0.0.1:41001")).unwrap();
    assert!(instance.trim_start().starts_with("config "), "{out}");
    assert!(instance.contains(" v1 "), "{out}");
    assert!(instance.ends_with(" yes"), "{out}");

    let billing = ctl(&cp, &["services", "billing"]).await;
    let out = billing.ok();
    assert!(out.contains("127.0.0.1:41003"), "{out}");
    assert!(out.contains("access: no AccessRule"), "{out}");

    ctl(&cp, &["services", "nosuch"])
        .await
        .failed_saying(&["404", "/api/services/nosuch"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_and_one_proxy_show_acked_versions() {
    let (cp, envoy, proxy) = mesh_with_envoy().await;
    let node = envoy.node_id.as_str();

    let list = ctl(&cp, &["proxies"]).await;
    let out = list.ok();
    let line = row(out, node);
    assert!(line.contains("frontend"), "{line}");
    assert!(line.contains("sotw"), "{line}");
    assert!(!line.contains("NACK"), "{line}");
    for t in TYPES {
        let acked = proxy["types"][t]["acked"].as_str().unwrap();
        let short: String = acked.chars().take(8).collect();
        assert!(line.contains(&short), "{t} version {short} missing: {line}");
    }

    let one = ctl(&cp, &["proxy", node]).await;
    let out = one.ok();
    assert!(out.contains(&format!("node:          {node}")), "{out}");
    assert!(out.contains("status:        in sync"), "{out}");
    assert!(out.contains("dependencies:  orders"), "{out}");
    for t in TYPES {
        let acked = proxy["types"][t]["acked"].as_str().unwrap();
        assert!(out.contains(acked), "{t} version {acked} missing:\n{out}");
    }
    // Every resource name the API lists for the proxy is printed.
    let detail = cp.admin_json(&format!("/api/proxies/{node}")).await;
    let resources = detail["resources"].as_object().unwrap();
    assert!(!resources.is_empty(), "{detail}");
    for r in resources.values() {
        for name in r["names"].as_array().unwrap() {
            let name = name.as_str().unwrap();
            assert!(
                out.lines().any(|l| l.trim() == name),
                "resource {name} missing:\n{out}"
            );
        }
    }

    ctl(&cp, &["proxy", "no-such-node"])
        .await
        .failed_saying(&["no-such-node", "404"]);
}

/// `-o json` prints the API's own JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_output_is_the_api_json() {
    let (cp, envoy, _) = mesh_with_envoy().await;
    let node = envoy.node_id.as_str();
    let cases: Vec<(Vec<&str>, String)> = vec![
        (vec!["services"], "/api/services".into()),
        (vec!["services", "orders"], "/api/services/orders".into()),
        (vec!["proxies"], "/api/proxies".into()),
        (vec!["proxy", node], format!("/api/proxies/{node}")),
        (vec!["sources"], "/api/sources".into()),
        (vec!["changes"], "/api/changes".into()),
        (vec!["compare"], "/api/compare".into()),
    ];
    for (args, path) in cases {
        let mut with_o = vec!["-o", "json"];
        with_o.extend_from_slice(&args);
        let printed = ctl(&cp, &with_o).await.json();
        let api = cp.admin_json(&path).await;
        // A source re-syncs while it runs: when and how long are volatile.
        if path == "/api/sources" {
            let strip = |v: &Value| {
                let mut v = v.clone();
                for s in v.as_array_mut().unwrap() {
                    let s = s.as_object_mut().unwrap();
                    for volatile in ["staleness_seconds", "last_sync", "last_sync_duration_ms"] {
                        s.remove(volatile);
                    }
                }
                v
            };
            assert_eq!(strip(&printed), strip(&api), "{args:?}");
        } else {
            assert_eq!(printed, api, "ctl -o json {args:?} differs from {path}");
        }
    }
    // `-o` may also follow the command.
    let after = ctl(&cp, &["services", "-o", "json"]).await.json();
    assert_eq!(after, cp.admin_json("/api/services").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sources_changes_and_compare_tables() {
    let (cp, _envoy, _) = mesh_with_envoy().await;

    let sources = ctl(&cp, &["sources"]).await;
    let out = sources.ok();
    let line = out
        .lines()
        .find(|l| l.starts_with("config:"))
        .unwrap_or_else(|| panic!("no config source:\n{out}"));
    assert!(line.contains(" config "), "{line}");
    assert!(line.contains(" yes "), "{line}");
    assert!(line.contains(" ago "), "{line}");

    let changes = ctl(&cp, &["changes"]).await;
    let out = changes.ok();
    assert!(out.starts_with("AGE"), "{out}");
    // The first build added every service.
    assert!(
        out.lines()
            .any(|l| l.contains("billing") || l.contains("+")),
        "{out}"
    );

    let compare = ctl(&cp, &["compare"]).await;
    let out = compare.ok();
    let digest = cp.admin_json("/api/state").await["digest"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(out.contains(&format!("self digest:  {digest}")), "{out}");
    assert!(out.contains("no peers configured"), "{out}");
}

/// `ctl compare` against a peer meshbridge that sees a different mesh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_names_a_disagreeing_peer() {
    let other = ControlPlane::start(&mesh(41004), &[]).await;
    let peer = format!("http://{}", other.admin_addr());
    let cp = ControlPlane::start(&default_mesh(), &["--peer", &peer]).await;
    eprintln!(
        "DEBUG self {}",
        cp.admin_json("/api/state?detail=true").await
    );
    eprintln!(
        "DEBUG other {}",
        other.admin_json("/api/state?detail=true").await
    );
    let out = eventually(Duration::from_secs(20), "the peer compared", || async {
        let out = ctl(&cp, &["compare"]).await;
        (out.code == 0 && out.stdout.contains("service billing changed")).then_some(out)
    })
    .await;
    let out = &out.stdout;
    assert!(out.contains("peers:        DISAGREE"), "{out}");
    assert!(row(out, &peer).contains(" no "), "{out}");
    assert!(out.contains(&format!("differences with {peer}:")), "{out}");
    assert!(out.contains("service billing changed"), "{out}");
    assert!(out.contains("127.0.0.1:41003"), "{out}");
    assert!(out.contains("127.0.0.1:41004"), "{out}");
}

/// `ctl config-dump NODE` is Envoy's own /config_dump.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_is_envoys_own() {
    let (cp, envoy, _) = mesh_with_envoy().await;
    let node = envoy.node_id.as_str();
    let configs = |v: &Value| without_last_updated(&v["configs"]);

    let dump = ctl(&cp, &["config-dump", node]).await.json();
    let own: Value = serde_json::from_str(&envoy_admin(&envoy, "/config_dump").await).unwrap();
    assert!(
        dump["configs"].as_array().is_some_and(|c| c.len() >= 3),
        "{dump}"
    );
    assert_eq!(configs(&dump), configs(&own));
    let types: Vec<&str> = dump["configs"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["@type"].as_str())
        .collect();
    assert!(
        types.iter().any(|t| t.ends_with("ClustersConfigDump")),
        "{types:?}"
    );
    assert!(
        !types.iter().any(|t| t.ends_with("EndpointsConfigDump")),
        "{types:?}"
    );

    // The same through -o json.
    let json = ctl(&cp, &["-o", "json", "config-dump", node]).await.json();
    assert_eq!(configs(&json), configs(&own));

    // One resource type.
    let clusters = ctl(
        &cp,
        &["config-dump", node, "--resource", "dynamic_active_clusters"],
    )
    .await
    .json();
    let own: Value = serde_json::from_str(
        &envoy_admin(&envoy, "/config_dump?resource=dynamic_active_clusters").await,
    )
    .unwrap();
    assert_eq!(configs(&clusters), configs(&own));
    assert!(
        clusters.to_string().contains("orders"),
        "no orders cluster: {clusters}"
    );

    // Endpoints on request.
    let with_eds = ctl(&cp, &["config-dump", node, "--include-eds"])
        .await
        .json();
    let own: Value =
        serde_json::from_str(&envoy_admin(&envoy, "/config_dump?include_eds").await).unwrap();
    assert_eq!(configs(&with_eds), configs(&own));
    assert!(with_eds.to_string().contains("EndpointsConfigDump"));
    assert!(with_eds.to_string().contains("41002"), "{with_eds}");

    ctl(&cp, &["config-dump", "no-such-node"])
        .await
        .failed_saying(&["no-such-node"]);
}

/// `ctl stats` and `ctl log-level` reach the proxy's Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_and_log_level_reach_envoy() {
    let (cp, envoy, _) = mesh_with_envoy().await;
    let node = envoy.node_id.as_str();

    let stats = ctl(&cp, &["stats", node, "--filter", "^server\\.live$"]).await;
    assert_eq!(stats.ok().trim(), "server.live: 1");
    let all = ctl(&cp, &["stats", node]).await;
    assert!(all.ok().contains("cluster_manager.cds.update_success: "));
    let json = ctl(
        &cp,
        &["-o", "json", "stats", node, "--filter", "^server\\.live$"],
    )
    .await
    .json();
    assert_eq!(
        json["stats"][0],
        serde_json::json!({"name": "server.live", "value": 1})
    );

    let before = envoy.log_levels().await;
    assert!(before.iter().any(|(_, l)| l == "info"), "{before:?}");

    let set = ctl(&cp, &["log-level", node, "debug"]).await;
    let out = set.ok();
    assert!(
        out.starts_with(&format!("{node}: Envoy log level set to debug")),
        "{out}"
    );
    assert!(out.contains("Envoy reports debug: all "), "{out}");
    let after = envoy.log_levels().await;
    assert!(!after.is_empty());
    assert!(
        after.iter().all(|(_, l)| l == "debug"),
        "Envoy reports {after:?}"
    );

    // One logger, JSON output.
    let json = ctl(
        &cp,
        &[
            "-o",
            "json",
            "log-level",
            node,
            "warning",
            "--logger",
            "http",
        ],
    )
    .await
    .json();
    assert_eq!(json["node"], node);
    assert_eq!(json["level"], "warning");
    let after = envoy.log_levels().await;
    assert!(
        after.contains(&("http".into(), "warning".into())),
        "{after:?}"
    );
    assert!(
        after.contains(&("upstream".into(), "debug".into())),
        "{after:?}"
    );

    // A level Envoy does not know is bad usage, refused before any call.
    let bad = ctl(&cp, &["log-level", node, "loud"]).await;
    assert_eq!(bad.code, 2, "{bad:?}");
    assert!(bad.stderr.contains("loud"), "{bad:?}");

    ctl(&cp, &["log-level", "no-such-node", "debug"])
        .await
        .failed_saying(&["no-such-node"]);
}

/// `ctl diff NODE` on a connected Envoy: in sync, four types, the counts Envoy holds being
/// what meshbridge sent; the table agrees with the API's own JSON.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diff_of_a_connected_envoy_is_in_sync() {
    let (cp, envoy, proxy) = mesh_with_envoy().await;
    let node = envoy.node_id.as_str();

    let json = ctl(&cp, &["-o", "json", "diff", node]).await.json();
    assert_eq!(
        json,
        cp.admin_json(&format!("/api/proxies/{node}/diff")).await
    );
    assert_eq!(json["node"], node);
    assert_eq!(json["in_sync"], true, "{json}");
    let types = json["types"].as_array().unwrap();
    assert_eq!(types.len(), 5, "{json}");

    let diff = ctl(&cp, &["diff", node]).await;
    let out = diff.ok();
    assert_eq!(
        out.lines().next(),
        Some(format!("{node} in sync").as_str()),
        "{out}"
    );
    assert!(!out.contains("OUT OF SYNC"), "{out}");
    let header = row(out, "TYPE");
    assert!(header.contains("ONLY SENT"), "{out}");
    for t in types {
        let name = t["type"].as_str().unwrap();
        let line = row(out, name);
        let cells: Vec<&str> = line.split_whitespace().collect();
        // TYPE, SENT VERSION, ACKED VERSION, SENT, ENVOY, ONLY SENT, ONLY ENVOY, WARMING, ERRORS
        assert_eq!(cells.len(), 9, "{line}");
        let sent = t["sent"].as_u64().unwrap();
        if name == "sds" {
            // A proxy without a certificate asks for no secret.
            assert_eq!(sent, 0, "{json}");
            continue;
        }
        assert!(sent > 0, "{name}: nothing sent: {json}");
        assert_eq!(cells[3], sent.to_string(), "{line}");
        assert_eq!(
            cells[4],
            sent.to_string(),
            "{name}: Envoy holds another count: {line}"
        );
        assert_eq!(&cells[5..], ["0", "0", "0", "0"], "{line}");
        // The versions are the ones /api/proxies reports ACKed.
        let acked = proxy["types"][t["type_url"].as_str().unwrap()]["acked"]
            .as_str()
            .unwrap();
        let short: String = acked.chars().take(8).collect();
        assert_eq!(cells[1], short, "{line}");
        assert_eq!(cells[2], short, "{line}");
    }
    let rows: Vec<&str> = out
        .lines()
        .filter(|l| {
            ["cds", "eds", "lds", "rds"].contains(&l.split_whitespace().next().unwrap_or(""))
        })
        .collect();
    assert_eq!(rows.len(), 4, "{out}");

    ctl(&cp, &["diff", "no-such-node"])
        .await
        .failed_saying(&["404", "/api/proxies/no-such-node/diff"]);
}

/// `ctl clusters NODE` is Envoy's /clusters: the dependency's cluster with the addresses of
/// its instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_show_a_dependency_and_its_instances() {
    let (cp, envoy, _) = mesh_with_envoy().await;
    let node = envoy.node_id.as_str();
    let detail = cp.admin_json(&format!("/api/proxies/{node}")).await;
    let cluster = detail["resources"][CDS]["names"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .find(|n| n.contains("orders"))
        .unwrap_or_else(|| panic!("no orders cluster: {detail}"))
        .to_string();

    // Envoy adds hosts as EDS arrives: wait for both instances.
    let out = eventually(
        Duration::from_secs(20),
        "Envoy lists both orders hosts",
        || async {
            let out = ctl(&cp, &["clusters", node]).await;
            let text = out.ok().to_string();
            ["127.0.0.1:41001", "127.0.0.1:41002"]
                .iter()
                .all(|a| text.contains(&format!("{cluster}::{a}::")))
                .then_some(text)
        },
    )
    .await;
    // Printed as Envoy answers it.
    let own = envoy_admin(&envoy, "/clusters").await;
    let names = |text: &str| -> Vec<String> {
        let mut v: Vec<String> = text
            .lines()
            .filter_map(|l| l.split("::").next().map(str::to_string))
            .collect();
        // Envoy lists its clusters in no fixed order, even from one call to the next.
        v.sort();
        v.dedup();
        v
    };
    assert_eq!(names(&out), names(&own));
    assert!(
        out.lines()
            .any(|l| l.starts_with(&format!("{cluster}::127.0.0.1:41002::health_flags::"))),
        "{out}"
    );

    // -o json: Envoy's JSON (format=json), the same hosts.
    let json = ctl(&cp, &["-o", "json", "clusters", node]).await.json();
    let status = json["cluster_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == cluster.as_str())
        .unwrap_or_else(|| panic!("no {cluster} in {json}"));
    let mut ports: Vec<u64> = status["host_statuses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            h["address"]["socket_address"]["port_value"]
                .as_u64()
                .unwrap()
        })
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, [41001, 41002], "{status}");
}

/// `ctl audit` lists a log level change made through `ctl log-level`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lists_a_log_level_change() {
    let (cp, envoy, _) = mesh_with_envoy().await;
    let node = envoy.node_id.as_str();

    let empty = ctl(&cp, &["audit"]).await;
    assert_eq!(empty.ok(), "no admin actions recorded\n");

    ctl(&cp, &["log-level", node, "debug"]).await.ok();
    let audit = ctl(&cp, &["audit"]).await;
    let out = audit.ok();
    assert!(out.starts_with("AT "), "{out}");
    let rows: Vec<&str> = out.lines().filter(|l| l.contains(node)).collect();
    assert_eq!(rows.len(), 1, "{out}");
    let cells: Vec<&str> = rows[0].split_whitespace().collect();
    // AT is `Ns ago`: two words.
    assert_eq!(cells[1], "ago", "{out}");
    assert_eq!(
        &cells[2..],
        ["-", "log-level", node, "level=debug", "ok"],
        "{out}"
    );

    let json = ctl(&cp, &["-o", "json", "audit"]).await.json();
    assert_eq!(json, cp.admin_json("/api/audit").await);
    assert_eq!(json[0]["detail"], "level=debug");
}

/// Unreachable admin, a non-JSON answer, the environment default, bad usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_name_the_address_and_exit_1() {
    let port = free_port();
    let admin = format!("http://127.0.0.1:{port}");
    let started = std::time::Instant::now();
    ctl_env("", &["--admin", &admin, "services"])
        .await
        .failed_saying(&[&format!("127.0.0.1:{port}"), "cannot connect"]);
    assert!(started.elapsed() < Duration::from_secs(10));

    // MESHBRIDGE_ADMIN is the default address, `host:port` means http.
    let env = ctl_env(&format!("127.0.0.1:{port}"), &["proxies"]).await;
    assert!(env.failed().contains(&format!("127.0.0.1:{port}")));

    // An answer that is not JSON (a plain HTTP server, not meshbridge).
    let backend = support::Backend::start("web", "a").await;
    let not_json = ctl_env(&format!("http://127.0.0.1:{}", backend.port), &["services"]).await;
    let services_url = format!("127.0.0.1:{}/api/services", backend.port);
    not_json.failed_saying(&[&services_url, "not JSON"]);

    // Against a running meshbridge, MESHBRIDGE_ADMIN works.
    let cp = ControlPlane::start(&default_mesh(), &[]).await;
    let ok = ctl_env(&format!("http://{}", cp.admin_addr()), &["services"]).await;
    assert!(ok.ok().contains("orders"));

    for bad in [
        vec!["ctl-nonsense"],
        vec!["-o", "yaml", "services"],
        vec!["--admin", "ftp://x", "services"],
        vec!["proxy"],
    ] {
        let out = ctl_env("", &bad).await;
        assert_eq!(out.code, 2, "{bad:?}: {out:?}");
    }
}

/// A `meshbridge bootstrap` for a frontend Envoy with node id `node`, announcing admin port
/// `announced`.
fn bootstrap_yaml(cp: &ControlPlane, node: &str, announced: u16) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .arg("bootstrap")
        .args(["--service", "frontend", "--node-id", node])
        .args(["--xds-addr", &cp.xds_addr()])
        .args(["--admin-port", &announced.to_string()])
        .args(["--egress-port", &free_port().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Diagnostics of a proxy whose Envoy admin cannot be reached (502, naming the address) or
/// that announced no admin port (409) fail with exit 1 and the API's message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diagnostics_errors_name_the_proxy_and_envoy_address() {
    let cp = ControlPlane::start(&default_mesh(), &[]).await;

    // Announces one admin port, listens on another.
    let (announced, real) = (free_port(), free_port());
    let yaml = bootstrap_yaml(&cp, "frontend-elsewhere", announced).replace(
        &format!("port_value: {announced}"),
        &format!("port_value: {real}"),
    );
    assert!(yaml.contains(&format!("admin_port: {announced}")), "{yaml}");
    let _elsewhere = Envoy::start_static("frontend-elsewhere", &yaml, real).await;

    // Announces none.
    let silent_admin = free_port();
    let yaml: String = bootstrap_yaml(&cp, "frontend-silent", silent_admin)
        .lines()
        .filter(|l| !l.trim_start().starts_with("admin_port:"))
        .map(|l| format!("{l}\n"))
        .collect();
    let _silent = Envoy::start_static("frontend-silent", &yaml, silent_admin).await;

    acked_proxy(&cp, "frontend-elsewhere").await;
    acked_proxy(&cp, "frontend-silent").await;

    let elsewhere = format!("127.0.0.1:{announced}");
    ctl(&cp, &["config-dump", "frontend-elsewhere"])
        .await
        .failed_saying(&["502", &elsewhere]);
    ctl(&cp, &["log-level", "frontend-elsewhere", "debug"])
        .await
        .failed_saying(&["502"]);
    ctl(&cp, &["diff", "frontend-elsewhere"])
        .await
        .failed_saying(&["502", &elsewhere]);
    ctl(&cp, &["clusters", "frontend-silent"])
        .await
        .failed_saying(&["409"]);

    ctl(&cp, &["stats", "frontend-silent"])
        .await
        .failed_saying(&["409"]);
    // The proxy itself is still shown, without diagnostics.
    let shown = ctl(&cp, &["proxy", "frontend-silent"]).await;
    assert!(
        shown.ok().contains("envoy admin:   - (no diagnostics"),
        "{}",
        shown.stdout
    );
}
