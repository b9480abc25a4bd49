//! End to end with Consul: the real binary watching the Consul fake, configuring real Envoys.

use crate::support;
use crate::support::consul_fake;

use std::time::Duration;

use consul_fake::{FakeConsul, Health, Instance};
use serde_json::json;
use support::consul_mesh::{self, ConsulMesh, frontend_manifest};
use support::{ControlPlane, Envoy, eventually, static_envoy};

/// EDS responses meshbridge has sent (one proxy connected: its pushes).
async fn eds_pushes(cp: &ControlPlane) -> u64 {
    cp.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix("meshbridge_xds_responses_total{type=\"eds\",mode=\"sotw\"} "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// orders in dc1 (`o-1`) and dc2 (`o-2`), meshbridge watching both, the frontend proxy.
async fn two_datacenters() -> ConsulMesh {
    ConsulMesh::build("dc1")
        .register("dc1", "orders", "dc1", "o-1")
        .register("dc2", "orders", "dc2", "o-2")
        .args(&["--consul-datacenter", "dc1", "--consul-datacenter", "dc2"])
        .proxy(&[])
        .start()
        .await
}

/// `orders` instance `a` registered and routed through the proxy; backend `b` started but
/// not registered.
async fn orders_a_routed_b_in_reserve() -> ConsulMesh {
    let mesh = ConsulMesh::build("dc1")
        .register("dc1", "orders", "a", "orders-a")
        .backend("orders", "b")
        .proxy(&[])
        .start()
        .await;
    mesh.wait_orders_routed().await;
    mesh
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_instances_become_routable_and_leave_with_deregistration() {
    let mesh = ConsulMesh::build("dc1")
        .register("dc1", "orders", "a", "orders-a")
        .backend("orders", "b")
        .backend("payments", "a")
        .proxy(&["payments"])
        .start()
        .await;
    let (consul, envoy) = (&mesh.consul, mesh.envoy());
    mesh.wait_orders_from("a", "orders from Consul").await;

    // The admin API shows the instance with its origin.
    let orders = mesh.service("orders").await;
    assert_eq!(orders["instances"][0]["origin"], "consul");
    assert_eq!(orders["instances"][0]["datacenter"], "dc1");

    // A second instance joins, the first leaves.
    mesh.register("dc1", "orders", "b", "orders-b");
    mesh.wait_orders_from("b", "instance b").await;
    consul.deregister("dc1", "orders-a");
    eventually(Duration::from_secs(20), "instance a gone", || async {
        for _ in 0..10 {
            if !envoy
                .call("orders", "/")
                .await
                .ok()?
                .body
                .contains("orders b")
            {
                return None;
            }
        }
        Some(())
    })
    .await;

    // A service that appears in Consul becomes routable for a proxy that depends on it.
    let refused = envoy.call("payments", "/").await.unwrap();
    assert_eq!(refused.status, 503, "declared by the proxy, not known yet");
    mesh.register("dc1", "payments", "a", "pay-a");
    envoy
        .wait_call("payments", "payments from Consul", |r| {
            r.body.contains("payments a")
        })
        .await;

    // An unhealthy instance is listed but gets no traffic.
    consul.set_health("dc1", "orders-b", Health::Critical);
    let r = envoy
        .wait_call("orders", "no healthy orders", |r| r.status == 503)
        .await;
    // Envoy's own reply says why, as meshbridge's replies do.
    assert_eq!(r.header("x-meshbridge-reason"), Some("no-healthy-upstream"));
    assert!(
        r.body.contains("no healthy instance of orders"),
        "{}",
        r.body
    );
    let orders = mesh.service("orders").await;
    assert_eq!(orders["instances"][0]["healthy"], false);
}

/// How long a registration change that neither the checks nor the catalog's content show may
/// take to reach Envoy: the sweep gap (1 s) plus the fetch and the push, with room for a
/// loaded machine. Without the sweep it takes the 5-minute resync.
const UNSEEN_CHANGE_BOUND: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_re_registered_with_another_port_or_weight_is_followed_within_seconds() {
    let mesh = ConsulMesh::build("dc1")
        .register("dc1", "orders", "a", "orders-1")
        .backend("orders", "b")
        .proxy(&[])
        .start()
        .await;
    mesh.wait_orders_from("a", "orders-1 on a's port").await;
    let traffic =
        support::Traffic::start(mesh.envoy().clone(), "orders", Duration::from_millis(20));

    // A redeploy on the same node: same instance ID, same checks, another port. Neither the
    // checks feed nor the catalog's names and tags change; only its index does.
    let catalog_before = mesh.consul.index("dc1", None);
    let checks_before = mesh.consul.checks_index("dc1");
    let started = std::time::Instant::now();
    mesh.consul.register(
        "dc1",
        Instance::new("orders", "orders-1", "127.0.0.1", mesh.port("orders", "b")),
    );
    assert!(mesh.consul.index("dc1", None) > catalog_before);
    assert_eq!(mesh.consul.checks_index("dc1"), checks_before);
    eventually(UNSEEN_CHANGE_BOUND, "orders-1 on b's port", || async {
        let r = mesh.envoy().call("orders", "/").await.ok()?;
        r.body.contains("orders b").then_some(())
    })
    .await;
    eprintln!("port change reached Envoy after {:?}", started.elapsed());
    mesh.assert_orders_from("b", 10).await;

    // A weight change, same port: shown by the admin API as quickly.
    let started = std::time::Instant::now();
    mesh.consul.register(
        "dc1",
        Instance::new("orders", "orders-1", "127.0.0.1", mesh.port("orders", "b")).weight(7),
    );
    eventually(UNSEEN_CHANGE_BOUND, "weight 7 shown", || async {
        let orders = mesh.service("orders").await;
        (orders["instances"][0]["weight"] == 7).then_some(())
    })
    .await;
    eprintln!("weight change seen after {:?}", started.elapsed());
    traffic.assert_no_failure().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn index_going_backwards_and_bad_responses_lose_nothing() {
    let mesh = orders_a_routed_b_in_reserve().await;
    let (consul, cp, envoy) = (&mesh.consul, &mesh.cp, mesh.envoy());

    // Malformed JSON and 500s: traffic unaffected, errors counted.
    consul.set_malformed(true);
    consul.spurious_wakeup();
    tokio::time::sleep(Duration::from_secs(1)).await;
    consul.set_malformed(false);
    consul.fail_next(5);
    consul.spurious_wakeup();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for _ in 0..10 {
        assert_eq!(envoy.call("orders", "/").await.unwrap().status, 200);
    }
    eventually(Duration::from_secs(10), "errors in metrics", || async {
        cp.metrics()
            .await
            .contains("result=\"error\"")
            .then_some(())
    })
    .await;

    // A hanging agent: requests time out, the last known instances stay.
    consul.set_hang(true);
    tokio::time::sleep(Duration::from_secs(3)).await;
    for _ in 0..5 {
        assert_eq!(envoy.call("orders", "/").await.unwrap().status, 200);
    }
    consul.set_hang(false);

    // The index goes backwards (a restored snapshot) to below what meshbridge has seen:
    // later changes are still seen.
    for i in 0..3 {
        consul.register(
            "dc1",
            Instance::new("other", &format!("o-{i}"), "127.0.0.1", 9),
        );
    }
    mesh.wait_service("other", "other seen").await;
    consul.reset_index(1);
    mesh.register("dc1", "orders", "b", "orders-b");
    mesh.wait_orders_from("b", "instance b after the index reset")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flapping_instance_causes_a_handful_of_pushes_and_settles() {
    let mesh = ConsulMesh::build("dc1")
        .register("dc1", "orders", "a", "orders-a")
        .register("dc1", "orders", "b", "orders-b")
        .proxy(&[])
        .start()
        .await;
    mesh.wait_orders_routed().await;
    let (consul, cp, envoy) = (&mesh.consul, &mesh.cp, mesh.envoy());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = eds_pushes(cp).await;

    // 20 flips of b in 2 s, ending unhealthy.
    for i in 0..20 {
        let h = if i % 2 == 0 {
            Health::Critical
        } else {
            Health::Passing
        };
        consul.set_health("dc1", "orders-b", h);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    consul.set_health("dc1", "orders-b", Health::Critical);
    eventually(Duration::from_secs(20), "b out of rotation", || async {
        (envoy.stat("cluster.orders.membership_healthy").await == Some(1)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let pushes = eds_pushes(cp).await - before;
    // Failing applies at once; passing again waits for a quiet second (flap damping), so
    // the 20 flips are one or two changes, not 20 (the debounce here is only 50 ms).
    assert!((1..=3).contains(&pushes), "{pushes} pushes for 20 flips");
    mesh.assert_orders_from("a", 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_datacenter_is_preferred_and_traffic_fails_over() {
    let mesh = two_datacenters().await;
    let consul = &mesh.consul;
    mesh.wait_orders_routed().await;
    mesh.assert_orders_from("dc1", 20).await;
    // The names Consul DNS users have in their configs route the same way (any case, any
    // port); a name of an unknown datacenter does not.
    for host in [
        "orders.service.consul",
        "Orders.Service.Consul:8080",
        "orders.service.dc2.consul",
    ] {
        let r = mesh.envoy().call(host, "/").await.unwrap();
        assert!(
            r.body.contains("orders dc1"),
            "{host}: {} {}",
            r.status,
            r.body
        );
    }
    let r = mesh
        .envoy()
        .call("orders.service.dc9.consul", "/")
        .await
        .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    consul.set_health("dc1", "o-1", Health::Critical);
    mesh.wait_orders_from("dc2", "failover to dc2").await;
    consul.set_health("dc1", "o-1", Health::Passing);
    mesh.wait_orders_from("dc1", "back to dc1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_tags_and_weights_from_consul_shape_traffic() {
    let mesh = ConsulMesh::build("dc1")
        .register_with("dc1", "orders", "heavy", "h", |i| i.tags(&["weight:9"]))
        .register_with("dc1", "orders", "light", "l", |i| i.weight(1))
        .register_with("dc1", "orders", "canary", "c", |i| {
            i.tags(&["canary", "weight:1"])
        })
        .proxy(&[])
        .start()
        .await;
    mesh.wait_orders_routed().await;
    let envoy = mesh.envoy();
    for _ in 0..10 {
        let r = support::http_get(envoy.egress_addr(), "orders", "/", &[("x-canary", "1")])
            .await
            .unwrap();
        assert!(r.body.contains("orders canary"), "{}", r.body);
    }
    let mut heavy_hits = 0;
    let n = 220;
    for _ in 0..n {
        if envoy
            .call("orders", "/")
            .await
            .unwrap()
            .body
            .contains("orders heavy")
        {
            heavy_hits += 1;
        }
    }
    // Weights 9:1:1 → 9/11 ≈ 82% to heavy; bounds far outside sampling noise.
    assert!(
        (140..=205).contains(&heavy_hits),
        "{heavy_hits} of {n} to the weight-9 instance"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_to_the_agent_stay_bounded_whatever_the_number_of_services() {
    let mesh = (0..40)
        .fold(ConsulMesh::build("dc1"), |m, i| {
            let id = format!("id-{i}");
            m.instance(
                "dc1",
                Instance::new(&format!("svc-{i}"), &id, "127.0.0.1", 10000 + i),
            )
        })
        .args(&["--consul-max-connections", "8"])
        .start()
        .await;
    let (consul, cp) = (&mesh.consul, &mesh.cp);
    let services = cp.admin_json("/api/services").await;
    let mut names: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names.len(), 42, "{names:?}");
    assert!(
        names.contains(&"frontend") && names.contains(&"consul") && names.contains(&"svc-39"),
        "frontend, the agent's own `consul` service and 40 more: {names:?}"
    );
    // Let the watches park and cycle a few times.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        consul.parked_queries() > 0,
        "blocking queries are parked, not polled"
    );
    // At most 8 requests are in flight; a connection that just finished a request may still be
    // on its way back to the pool while the next request opens one, hence the slack of 2.
    let max = consul.max_open_connections();
    assert!(
        (1..=10).contains(&max),
        "{max} connections open at once (limit 8)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_token_is_sent_and_reread_when_its_file_changes() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "first-secret\n").unwrap();
    let token_arg = token.display().to_string();
    let mesh = ConsulMesh::build("dc1")
        .setup(|consul| consul.require_token(Some("first-secret")))
        .register("dc1", "orders", "a", "orders-a")
        .backend("orders", "b")
        .args(&["--consul-token-file", &token_arg])
        .proxy(&[])
        .start()
        .await;
    let consul = &mesh.consul;
    mesh.wait_orders_from("a", "orders with a token").await;

    // The token rotates: Consul and the file change; changes keep flowing.
    consul.require_token(Some("second-secret"));
    std::fs::write(&token, "second-secret\n").unwrap();
    let later = std::time::SystemTime::now() + Duration::from_secs(2);
    std::fs::File::options()
        .write(true)
        .open(&token)
        .unwrap()
        .set_modified(later)
        .unwrap();
    mesh.register("dc1", "orders", "b", "orders-b");
    mesh.wait_orders_from("b", "instance b after rotation")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_datacenter_keeps_its_instances_marked_stale() {
    let mesh = two_datacenters().await;
    let (consul, cp) = (&mesh.consul, &mesh.cp);
    mesh.wait_orders_from("dc1", "orders routed").await;

    consul.set_dc_unreachable("dc2", true);
    let stale = eventually(Duration::from_secs(20), "dc2 marked stale", || async {
        let sources = cp.admin_json("/api/sources").await;
        let dc2 = sources
            .as_array()?
            .iter()
            .find(|s| s["name"] == "consul:dc2")?
            .clone();
        dc2["error"]
            .as_str()
            .filter(|e| e.starts_with("stale"))
            .map(|_| sources.clone())
    })
    .await;
    let dc1 = stale
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "consul:dc1")
        .unwrap();
    assert!(dc1["error"].is_null(), "{stale}");
    // dc2's last known instance is still there: the local one fails and traffic fails over.
    consul.set_health("dc1", "o-1", Health::Critical);
    mesh.wait_orders_from("dc2", "failover to the stale dc2")
        .await;
    let orders = mesh.service("orders").await;
    assert!(
        orders["instances"]
            .as_array()
            .unwrap()
            .iter()
            .any(|i| i["datacenter"] == "dc2")
    );
}

/// Consul behind TLS (a real Envoy terminating it, with certificates made by openssl):
/// meshbridge verifies the agent with `--consul-ca-file`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consul_over_https_is_verified_with_the_ca_file() {
    let consul = FakeConsul::start("dc1").await;
    consul.register("dc1", Instance::new("orders", "o-1", "127.0.0.1", 31000));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    support::issue_cert(d, "server", "IP:127.0.0.1");
    // An Envoy terminating TLS in front of the fake.
    let (tls_port, admin_port) = (support::free_port(), support::free_port());
    let tls = static_envoy::downstream_tls(&d.join("server.pem"), &d.join("server.key"), None);
    let to_consul = json!({"route": {"cluster": "consul", "timeout": "0s"}});
    let bootstrap = static_envoy::bootstrap(
        admin_port,
        vec![static_envoy::listener(
            "consul_tls",
            "127.0.0.1",
            tls_port,
            Some(tls),
            static_envoy::http_connection_manager("consul", to_consul),
        )],
        vec![static_envoy::static_cluster("consul", consul.addr.port())],
    );
    let _terminator = Envoy::start_static("consul-tls", &bootstrap, admin_port).await;

    let url = format!("https://127.0.0.1:{tls_port}");
    let ca = d.join("server-ca.pem").display().to_string();
    let cp = ControlPlane::start(
        &frontend_manifest(),
        &[
            "--consul-addr",
            &url,
            "--consul-ca-file",
            &ca,
            "--consul-wait",
            "2000",
        ],
    )
    .await;
    let orders = consul_mesh::service(&cp, "orders").await;
    assert_eq!(orders["instances"][0]["origin"], "consul");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_waits_for_the_first_full_consul_sync() {
    let consul = FakeConsul::start("dc1").await;
    consul.register("dc1", Instance::new("orders", "o-1", "127.0.0.1", 31000));
    consul.set_hang(true);
    let url = consul.url();
    let mut cp = ControlPlane::start_unready(
        &frontend_manifest(),
        &["--consul-addr", &url, "--consul-wait", "2000"],
    );
    let admin = cp.admin_addr();
    // While Consul does not answer, the instance serves (healthz) but is not ready.
    let not_ready = eventually(Duration::from_secs(20), "admin up", || async move {
        support::http_get(admin, "localhost", "/readyz", &[])
            .await
            .ok()
    })
    .await;
    assert_eq!(not_ready.status, 503, "{}", not_ready.body);
    assert!(not_ready.body.contains("consul"), "{}", not_ready.body);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let still = support::http_get(admin, "localhost", "/readyz", &[])
        .await
        .unwrap();
    assert_eq!(still.status, 503);
    assert_eq!(
        support::http_get(admin, "localhost", "/healthz", &[])
            .await
            .unwrap()
            .status,
        200
    );
    consul.set_hang(false);
    cp.wait_ready().await;
    let services = cp.admin_json("/api/services").await;
    assert!(
        services
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["name"] == "orders"),
        "ready means synced: {services}"
    );
}

/// The Consul source's current error, from `/api/sources`.
async fn consul_error(cp: &ControlPlane) -> String {
    let sources = cp.admin_json("/api/sources").await;
    sources
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "consul")
        .and_then(|s| s["error"].as_str())
        .unwrap_or("")
        .to_string()
}

/// Waits until the Consul source's error contains `needle`.
async fn wait_consul_error(cp: &ControlPlane, what: &str, needle: &str) {
    eventually(Duration::from_secs(20), what, || async {
        consul_error(cp).await.contains(needle).then_some(())
    })
    .await;
}

/// The services the published state holds.
async fn services(cp: &ControlPlane) -> Vec<String> {
    let state = cp.admin_json("/api/services").await;
    let mut names: Vec<String> = state
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str().map(str::to_string))
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hidden_or_mass_removed_services_keep_their_instances_until_confirmed() {
    let mesh = ["billing", "payments", "stock"]
        .into_iter()
        .fold(
            ConsulMesh::build("dc1").register("dc1", "orders", "a", "orders-a"),
            |m, s| {
                let instance = Instance::new(s, &format!("{s}-1"), "127.0.0.2", 8080);
                m.instance("dc1", instance.on_node("shared", "127.0.0.2"))
            },
        )
        .args(&["--consul-confirm-removal", "4000"])
        .proxy(&[])
        .start()
        .await;
    mesh.wait_orders_routed().await;
    let (consul, cp, envoy) = (&mesh.consul, &mesh.cp, mesh.envoy());
    let all = services(cp).await;
    for s in ["billing", "orders", "payments", "stock"] {
        assert!(all.contains(&s.to_string()), "{all:?}");
    }
    let traffic = support::Traffic::start(envoy.clone(), "orders", Duration::from_millis(50));

    // The token loses its read rights: every list comes back empty, marked as filtered.
    consul.set_acl_hidden(true);
    wait_consul_error(
        cp,
        "the Consul source to say it holds a filtered answer",
        "X-Consul-Results-Filtered-By-ACLs",
    )
    .await;
    // Longer than the confirmation: hidden is never taken for gone.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(services(cp).await, all, "hidden services were removed");
    consul.set_acl_hidden(false);
    eventually(
        Duration::from_secs(20),
        "the hold to clear once Consul answers in full",
        || async { consul_error(cp).await.is_empty().then_some(()) },
    )
    .await;

    // Three of five services (with Consul's own) leave in one answer: the node carrying them
    // is deregistered.
    let url = format!("{}/v1/catalog/deregister", consul.url());
    let resp = reqwest::Client::new()
        .put(&url)
        .json(&serde_json::json!({"Node": "shared"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    wait_consul_error(
        cp,
        "the removal to be held",
        "would remove 3 of 5 services at once",
    )
    .await;
    assert_eq!(services(cp).await, all, "a mass removal applied at once");
    // Confirmed by the answers that follow (the wait is 2 s, the confirmation 4 s).
    eventually(
        Duration::from_secs(20),
        "the confirmed removal to apply",
        || async {
            let left = services(cp).await;
            (left.len() == all.len() - 3 && !left.iter().any(|s| s == "billing")).then_some(())
        },
    )
    .await;
    assert_eq!(consul_error(cp).await, "", "the hold cleared");
    traffic.assert_no_failure().await;
}
