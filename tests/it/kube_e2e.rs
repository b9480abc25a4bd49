//! The Kubernetes source end to end: the real `meshbridge` binary pointed at the Kubernetes
//! API fake through a kubeconfig, real Envoys, and (for registration) the Consul fake.
//! Every test also checks that each request meshbridge made is granted by the ClusterRole
//! the Helm chart ships.

use crate::support;
use crate::support::consul_fake;
use crate::support::kube_fake;

use std::time::Duration;

use consul_fake::{FakeConsul, Instance};
use kube_fake::{FakeKube, assert_rbac_covers};
use serde_json::{Value, json};
use support::fixtures::{AccessRule, Fixture, MeshService};
use support::{Backend, ControlPlane, Envoy, EnvoyOptions, eventually};

const LIMIT: Duration = Duration::from_secs(20);
pub(crate) const MS: &str = "meshbridge.io/v1alpha1";

/// A pod of `app`, ready, with an injected sidecar whose ingress port is `port` (so each pod
/// can live on 127.0.0.1 with its own port).
pub(crate) fn pod(name: &str, app: &str, port: u16, ready: bool) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "labels": {"app": app},
            "annotations": {"meshbridge.io/ingress-port": port.to_string()},
        },
        "spec": {"containers": [{"name": "app", "image": "app"}, {"name": "meshbridge-proxy", "image": "envoy"}]},
        "status": {
            "phase": "Running",
            "podIP": "127.0.0.1",
            "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
        },
    })
}

pub(crate) fn legacy(deps: &[&str]) -> EnvoyOptions {
    EnvoyOptions {
        service: "legacy".into(),
        dependencies: deps.iter().map(|s| s.to_string()).collect(),
        egress: true,
        ..Default::default()
    }
}

/// The `orders` MeshService in `shop`, selecting the pods labelled `app: orders`.
pub(crate) fn orders_service() -> MeshService {
    MeshService::build("orders")
        .namespace("shop")
        .selector("orders")
}

/// For each of `names`, a backend answering `orders pod-<name>` and a ready pod
/// `orders-<name>` whose sidecar listens on the backend's port.
pub(crate) async fn orders_pods<const N: usize>(kube: &FakeKube, names: [&str; N]) -> [Backend; N] {
    let mut backends = Vec::new();
    for name in names {
        backends.push(Backend::start("orders", &format!("pod-{name}")).await);
    }
    for (name, backend) in names.iter().zip(&backends) {
        kube.apply(pod(&format!("orders-{name}"), "orders", backend.port, true));
    }
    backends.try_into().ok().unwrap()
}

async fn start(kube: &FakeKube, extra: &[&str]) -> ControlPlane {
    // The kubeconfig outlives the test's temporary directories (it is tiny).
    let dir = tempfile::tempdir().unwrap().keep();
    let kubeconfig = kube.write_kubeconfig(&dir);
    let mut cp = ControlPlane::start_kube(&kubeconfig, "", extra);
    cp.wait_ready().await;
    cp
}

/// Instances of `service` in `/api/services`, as `(port, healthy)`.
pub(crate) async fn instances(cp: &ControlPlane, service: &str) -> Vec<(u64, String)> {
    let services = cp.admin_json("/api/services").await;
    services
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .filter(|i| i["healthy"] == true)
        .map(|i| {
            (
                i["port"].as_u64().unwrap(),
                i["origin"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// Distinct backends answering through `envoy` for `host` over a few calls.
pub(crate) async fn answering(
    envoy: &Envoy,
    host: &str,
    calls: usize,
) -> std::collections::BTreeSet<String> {
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..calls {
        if let Ok(r) = envoy.call(host, "/").await
            && r.status == 200
        {
            seen.insert(r.body.split(':').next().unwrap_or_default().to_string());
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_pods_become_endpoints_and_leave_when_unready_or_deleted() {
    let kube = FakeKube::start().await;
    let [a, b] = orders_pods(&kube, ["a", "b"]).await;
    kube.apply(
        orders_service()
            .set("ports", json!([{"port": 8080}]))
            .json(),
    );
    kube.apply(pod("orders-c", "orders", 1, false));
    kube.apply(pod("other", "billing", 2, true));
    let cp = start(&kube, &[]).await;
    let envoy = Envoy::start(&cp, legacy(&["orders"])).await;

    eventually(LIMIT, "both pods answer", || async {
        let seen = answering(&envoy, "orders", 12).await;
        (seen.len() == 2).then_some(())
    })
    .await;
    // The names Kubernetes DNS gives the service route the same way.
    for host in [
        "orders.shop",
        "orders.shop.svc:8080",
        "orders.shop.svc.cluster.local:8080",
    ] {
        assert_eq!(answering(&envoy, host, 6).await.len(), 2, "{host}");
    }
    let mut ports: Vec<u64> = instances(&cp, "orders")
        .await
        .into_iter()
        .map(|(p, o)| {
            assert_eq!(o, "kubernetes");
            p
        })
        .collect();
    ports.sort();
    let mut want = vec![u64::from(a.port), u64::from(b.port)];
    want.sort();
    assert_eq!(
        ports, want,
        "only the two ready pods, on their sidecar ports"
    );

    // Unready: out of the assignment.
    kube.apply(pod("orders-a", "orders", a.port, false));
    eventually(LIMIT, "the unready pod leaves", || async {
        let seen = answering(&envoy, "orders", 8).await;
        (seen.len() == 1 && seen.contains("hello from orders pod-b")).then_some(())
    })
    .await;
    // Still listed, as unhealthy, like a Consul instance whose checks fail.
    let services = cp.admin_json("/api/services").await;
    let listed: Vec<(u64, bool)> = services
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "orders")
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .map(|i| (i["port"].as_u64().unwrap(), i["healthy"].as_bool().unwrap()))
        .collect();
    assert!(listed.contains(&(u64::from(a.port), false)), "{listed:?}");
    // Deleted: the service has no instance left; callers get a local reply, not a hang.
    kube.delete("v1", "Pod", Some("shop"), "orders-b");
    eventually(LIMIT, "the deleted pod leaves", || async {
        let r = envoy.call("orders", "/").await.ok()?;
        (r.status == 503).then_some(())
    })
    .await;
    assert!(instances(&cp, "orders").await.is_empty());
    assert_rbac_covers(&kube);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_broken_by_410_gone_recovers_without_losing_a_deletion() {
    let kube = FakeKube::start().await;
    let [_a, _b] = orders_pods(&kube, ["a", "b"]).await;
    kube.apply(orders_service().json());
    let cp = start(&kube, &[]).await;
    let envoy = Envoy::start(&cp, legacy(&["orders"])).await;
    eventually(LIMIT, "both pods answer", || async {
        (answering(&envoy, "orders", 12).await.len() == 2).then_some(())
    })
    .await;
    eventually(LIMIT, "watches open", || async {
        (kube.open_watches() >= 3).then_some(())
    })
    .await;
    let lists_before = kube.count("list", "pods");

    // The history is compacted: open watches end with 410 Gone; the pod is deleted before
    // meshbridge can watch again, so no DELETED event ever reaches it — only the relist.
    kube.compact();
    kube.delete("v1", "Pod", Some("shop"), "orders-a");
    kube.compact();
    eventually(LIMIT, "the deletion is seen after the relist", || async {
        let seen = answering(&envoy, "orders", 8).await;
        (seen.len() == 1 && seen.contains("hello from orders pod-b")).then_some(())
    })
    .await;
    assert!(
        kube.count("list", "pods") > lists_before,
        "pods were listed again"
    );
    assert_eq!(instances(&cp, "orders").await.len(), 1);
    // And the source goes on watching: a new pod arrives through the new watch.
    let c = Backend::start("orders", "pod-c").await;
    kube.apply(pod("orders-c", "orders", c.port, true));
    eventually(LIMIT, "a pod added after the relist answers", || async {
        answering(&envoy, "orders", 12)
            .await
            .contains("hello from orders pod-c")
            .then_some(())
    })
    .await;
    assert_rbac_covers(&kube);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_backed_service_and_a_consul_service_call_each_other() {
    let kube = FakeKube::start().await;
    let consul = FakeConsul::start("dc1").await;
    let orders_app = Backend::start("orders", "pod").await;
    let billing_app = Backend::start("billing", "vm").await;
    let (orders_ingress, billing_ingress) = (support::free_port(), support::free_port());
    // orders runs in Kubernetes (a pod with the sidecar); billing on a VM known to Consul.
    kube.apply(orders_service().dependency("billing").json());
    kube.apply(pod("orders-1", "orders", orders_ingress, true));
    consul.register(
        "dc1",
        Instance::new("billing", "billing-vm-1", "127.0.0.1", billing_ingress),
    );
    let cp = start(
        &kube,
        &["--consul-addr", &consul.url(), "--consul-datacenter", "dc1"],
    )
    .await;
    let orders = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "orders".into(),
            ingress_port: Some(orders_ingress),
            app_port: Some(orders_app.port),
            egress: true,
            ..Default::default()
        },
    )
    .await;
    let billing = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "billing".into(),
            dependencies: vec!["orders".into()],
            ingress_port: Some(billing_ingress),
            app_port: Some(billing_app.port),
            egress: true,
            ..Default::default()
        },
    )
    .await;
    let r = orders
        .wait_call("billing", "pod → VM", |r| r.status == 200)
        .await;
    assert!(r.body.starts_with("hello from billing vm"), "{}", r.body);
    let r = billing
        .wait_call("orders", "VM → pod", |r| r.status == 200)
        .await;
    assert!(r.body.starts_with("hello from orders pod"), "{}", r.body);
    assert_rbac_covers(&kube);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_namespace_that_does_not_own_consul_services_cannot_take_one_over() {
    let kube = FakeKube::start().await;
    let consul = FakeConsul::start("dc1").await;
    let vm = Backend::start("billing", "vm").await;
    let impostor = Backend::start("billing", "impostor").await;
    consul.register(
        "dc1",
        Instance::new("billing", "billing-vm-1", "127.0.0.1", vm.port),
    );
    // A tenant declares Consul's billing, with a pod of its own behind it.
    kube.apply(
        MeshService::build("billing")
            .namespace("tenant")
            .selector("billing")
            .json(),
    );
    let mut pod = pod("billing-1", "billing", impostor.port, true);
    pod["metadata"]["namespace"] = json!("tenant");
    kube.apply(pod);
    let consul_flags = ["--consul-addr", &consul.url(), "--consul-datacenter", "dc1"];
    let cp = start(&kube, &consul_flags).await;
    let caller = Envoy::start(&cp, legacy(&["billing"])).await;
    caller
        .wait_call("billing", "billing through the mesh", |r| r.status == 200)
        .await;
    assert_eq!(
        answering(&caller, "billing", 12).await,
        ["hello from billing vm".to_string()].into(),
        "the tenant's pod took traffic of Consul's billing"
    );
    assert_eq!(
        instances(&cp, "billing").await,
        [(vm.port as u64, "consul".to_string())]
    );
    let degraded = eventually(LIMIT, "the tenant's claim is Degraded", || async {
        let o = kube.get(MS, "MeshService", Some("tenant"), "billing")?;
        condition(&o, "Degraded").cloned()
    })
    .await;
    assert_eq!(degraded["reason"], "ConsulService", "{degraded}");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("--consul-services-owned-by"),
        "{degraded}"
    );
    drop(caller);
    drop(cp);

    // Where the operator lets the namespace own Consul's services (a migration to pods),
    // its pods join the VM.
    let owner_flags = [&consul_flags[..], &["--consul-services-owned-by", "tenant"]].concat();
    let cp = start(&kube, &owner_flags).await;
    let origins = eventually(LIMIT, "billing in both origins", || async {
        let found = instances(&cp, "billing").await;
        (found.len() == 2).then_some(found)
    })
    .await;
    assert!(
        origins.contains(&(impostor.port as u64, "kubernetes".to_string())),
        "{origins:?}"
    );
}

pub(crate) fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

fn lease_holder(kube: &FakeKube) -> Option<String> {
    kube.get(
        "coordination.k8s.io/v1",
        "Lease",
        Some("default"),
        "meshbridge-leader",
    )?["spec"]["holderIdentity"]
        .as_str()
        .map(str::to_string)
        .filter(|h| !h.is_empty())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_is_written_once_by_the_leader_and_a_second_replica_takes_over() {
    let kube = FakeKube::start().await;
    let [a] = orders_pods(&kube, ["a"]).await;
    kube.apply(orders_service().json());
    kube.apply(pod("orders-b", "orders", a.port + 1, true));
    let lease = ["--lease-duration", "2", "--identity"];
    let mut first = start(&kube, &[lease[0], lease[1], lease[2], "first"]).await;
    let get = || kube.get(MS, "MeshService", Some("shop"), "orders").unwrap();
    let status = eventually(LIMIT, "Ready with two pod instances", || async {
        let o = get();
        (condition(&o, "Ready")?["status"] == "True").then_some(o["status"].clone())
    })
    .await;
    assert_eq!(status["instances"], json!({"kubernetes": 2}));
    assert_eq!(status["observedGeneration"], 1);
    assert_eq!(lease_holder(&kube).as_deref(), Some("first"));
    let second = start(&kube, &[lease[0], lease[1], lease[2], "second"]).await;
    // Nothing changes: no more writes from either replica, whatever the time.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let writes = kube.count("patch", "meshservices/status");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        kube.count("patch", "meshservices/status"),
        writes,
        "status is not rewritten"
    );
    assert_eq!(writes, 1, "one write for one state");
    assert_eq!(lease_holder(&kube).as_deref(), Some("first"));

    // An invalid spec: the last valid one stays in force, and the status says why.
    let bad = MeshService::build("orders")
        .namespace("shop")
        .meta("generation", 2)
        .selector("orders")
        .dependency_with(json!({"service": "billing", "timeout": "soon"}))
        .json();
    kube.apply(bad);
    let synced = eventually(LIMIT, "Synced=False", || async {
        let o = get();
        let c = condition(&o, "Synced")?.clone();
        (c["status"] == "False").then_some(c)
    })
    .await;
    assert_eq!(synced["reason"], "InvalidSpec");
    assert!(
        synced["message"]
            .as_str()
            .unwrap()
            .contains("spec.dependencies[0].timeout"),
        "{synced}"
    );
    assert_eq!(
        condition(&get(), "Ready").unwrap()["status"],
        "True",
        "the last valid spec still serves"
    );
    // The Event follows the status write.
    eventually(LIMIT, "a Warning event names the problem", || async {
        kube.list("events.k8s.io/v1", "Event")
            .iter()
            .any(|e| e["reason"] == "InvalidSpec" && e["type"] == "Warning")
            .then_some(())
    })
    .await;

    // The leader dies without releasing; the second takes over once the Lease expires.
    first.kill();
    eventually(LIMIT, "second leads", || async {
        (lease_holder(&kube).as_deref() == Some("second")).then_some(())
    })
    .await;
    kube.delete("v1", "Pod", Some("shop"), "orders-b");
    let status = eventually(LIMIT, "the new leader writes the new count", || async {
        let o = get();
        (o["status"]["instances"] == json!({"kubernetes": 1})).then_some(o["status"].clone())
    })
    .await;
    assert_eq!(status["observedGeneration"], 2);
    drop(second);
    assert_rbac_covers(&kube);
}

/// A Lease held by `ghost`, renewed at `renewed` (on ghost's clock), for 2 s.
fn ghost_lease(renewed: k8s_openapi::jiff::Timestamp) -> Value {
    let time = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        renewed,
    ))
    .unwrap();
    json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": "meshbridge-leader", "namespace": "default"},
        "spec": {
            "holderIdentity": "ghost",
            "leaseDurationSeconds": 2,
            "acquireTime": time,
            "renewTime": time,
            "leaseTransitions": 0,
        },
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewing_holder_with_a_skewed_clock_is_followed_until_it_stops_renewing() {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    let kube = FakeKube::start().await;
    let [_a] = orders_pods(&kube, ["a"]).await;
    kube.apply(orders_service().json());
    // ghost's clock runs minutes ahead of ours; it renews every 500 ms.
    let base = Timestamp::now() + SignedDuration::from_mins(5);
    let mut renewed = base;
    kube.apply(ghost_lease(renewed));
    let _cp = start(&kube, &["--lease-duration", "2", "--identity", "me"]).await;
    // Three lease durations and more: meshbridge reads the Lease, never takes it, and never
    // acts as leader.
    for _ in 0..16 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(lease_holder(&kube).as_deref(), Some("ghost"));
        renewed += SignedDuration::from_millis(500);
        kube.apply(ghost_lease(renewed));
    }
    assert!(
        kube.count("get", "leases") > 0,
        "meshbridge reads the Lease"
    );
    assert_eq!(lease_holder(&kube).as_deref(), Some("ghost"));
    assert_eq!(
        kube.count("patch", "meshservices/status"),
        0,
        "a follower writes no status"
    );
    // ghost stops renewing, its renewTime still minutes ahead: meshbridge takes the Lease
    // once it has seen no change for a lease duration, and leads.
    eventually(LIMIT, "me takes the Lease", || async {
        (lease_holder(&kube).as_deref() == Some("me")).then_some(())
    })
    .await;
    eventually(LIMIT, "the new leader writes status", || async {
        (kube.count("patch", "meshservices/status") > 0).then_some(())
    })
    .await;
    assert_rbac_covers(&kube);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_rule_from_another_namespace_is_ignored_and_says_so() {
    let kube = FakeKube::start().await;
    kube.apply(
        MeshService::build("payments")
            .namespace("shop")
            .endpoint("10.0.0.1", 80)
            .json(),
    );
    // A tenant opens payments to everyone from its own namespace.
    kube.apply(
        AccessRule::build("open-payments")
            .namespace("tenant")
            .target("payments")
            .allow(&["*"])
            .json(),
    );
    // The owner's own rule.
    kube.apply(
        AccessRule::build("payments-callers")
            .namespace("shop")
            .target("payments")
            .action("deny")
            .allow(&["orders"])
            .json(),
    );
    let cp = start(&kube, &[]).await;
    let degraded = eventually(LIMIT, "the tenant's rule is Degraded", || async {
        let o = kube.get(MS, "AccessRule", Some("tenant"), "open-payments")?;
        condition(&o, "Degraded").cloned()
    })
    .await;
    assert_eq!(degraded["reason"], "ForeignTarget", "{degraded}");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("namespace shop"),
        "{degraded}"
    );
    // In force: the owner's rule only.
    let access = cp.admin_json("/api/access").await;
    let payments = access
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["target"] == "payments")
        .cloned()
        .unwrap_or_else(|| panic!("{access}"));
    assert_eq!(
        payments["sources"],
        json!(["shop/payments-callers"]),
        "{payments}"
    );
    let owner = kube
        .get(MS, "AccessRule", Some("shop"), "payments-callers")
        .unwrap();
    assert_ne!(
        condition(&owner, "Degraded").map(|c| c["reason"].clone()),
        Some(json!("ForeignTarget")),
        "{owner}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_callers_are_authenticated_and_authorized_by_the_kubernetes_api() {
    let kube = FakeKube::start().await;
    kube.add_token("alice-token", "alice", &["ops"]);
    kube.add_token("grafana-token", "system:serviceaccount:mon:grafana", &[]);
    kube.add_token("nobody-token", "nobody", &[]);
    // `ops` may read and change; grafana may read only (the chart's two ClusterRoles).
    kube.grant_non_resource("ops", &["get", "create"], &["/api/*"]);
    kube.grant_non_resource("system:serviceaccount:mon:grafana", &["get"], &["/api/*"]);
    let cp = start(&kube, &["--admin-kubernetes-auth"]).await;
    let admin = cp.admin_addr();
    let call = |method: &'static str, path: &'static str, token: Option<&'static str>| async move {
        let bearer = token.map(|t| format!("Bearer {t}"));
        let mut headers = vec![("content-length", "0")];
        if let Some(b) = &bearer {
            headers.push(("authorization", b.as_str()));
        }
        let r = support::http_request(admin, method, "localhost", path, &headers)
            .await
            .unwrap();
        let error = serde_json::from_str::<Value>(&r.body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string));
        (r.status, error.unwrap_or_default())
    };

    // Probes stay open; the API needs a token the API server accepts.
    assert_eq!(call("GET", "/readyz", None).await.0, 200);
    let (status, error) = call("GET", "/api/services", None).await;
    assert_eq!(status, 401, "{error}");
    let (status, error) = call("GET", "/api/services", Some("forged-token")).await;
    assert_eq!(status, 401, "{error}");
    assert!(error.contains("TokenReview"), "{error}");
    // Authenticated but granted nothing: 403 saying what to grant.
    let (status, error) = call("GET", "/api/services", Some("nobody-token")).await;
    assert_eq!(status, 403, "{error}");
    assert!(
        error.contains("nobody may not get /api/services"),
        "{error}"
    );

    // A reader reads and may not change a log level; an operator may (the proxy is unknown,
    // so the call gets as far as the handler: 404).
    assert_eq!(
        call("GET", "/api/services", Some("grafana-token")).await.0,
        200
    );
    let level = "/api/proxies/ghost/logging?level=debug";
    let (status, error) = call("POST", level, Some("grafana-token")).await;
    assert_eq!(status, 403, "{error}");
    assert!(error.contains("may not create"), "{error}");
    let (status, error) = call("POST", level, Some("alice-token")).await;
    assert_eq!(status, 404, "{error}");

    // The audit names the users the API server authenticated.
    let r = support::http_get(
        admin,
        "localhost",
        "/api/audit",
        &[("authorization", "Bearer alice-token")],
    )
    .await
    .unwrap();
    let audit: Value = serde_json::from_str(&r.body).unwrap();
    let refused: Vec<&Value> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "admin-call")
        .collect();
    assert!(
        refused
            .iter()
            .any(|e| e["who"] == "system:serviceaccount:mon:grafana"
                && e["detail"] == "POST /api/proxies/ghost/logging"),
        "{audit}"
    );
    assert!(refused.iter().any(|e| e["who"] == "nobody"), "{audit}");

    // Answers are cached: many calls with one token cost one TokenReview.
    let before = kube.count("create", "tokenreviews");
    for _ in 0..10 {
        assert_eq!(
            call("GET", "/api/services", Some("grafana-token")).await.0,
            200
        );
    }
    assert_eq!(kube.count("create", "tokenreviews"), before);
    assert!(kube.count("create", "subjectaccessreviews") >= 4);
    assert_rbac_covers(&kube);

    // An API server that cannot be asked: 503 for a token not yet cached, not a pass.
    let mut kube = kube;
    kube.stop().await;
    let (status, error) = call("GET", "/api/services", Some("another-token")).await;
    assert_eq!(status, 503, "{error}");
    assert!(error.contains("could not check"), "{error}");
}

#[tokio::test]
async fn kubernetes_auth_without_a_kubernetes_client_fails_the_start_naming_the_flag() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args(["run", "--kube", "off", "--admin-kubernetes-auth"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--admin-kubernetes-auth"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn name_conflicts_and_unknown_callers_show_in_status() {
    let kube = FakeKube::start().await;
    kube.apply(
        MeshService::build("orders")
            .namespace("shop")
            .meta("creationTimestamp", "2026-01-01T00:00:00Z")
            .selector("orders")
            .json(),
    );
    kube.apply(
        MeshService::build("orders-copy")
            .namespace("shop")
            .meta("creationTimestamp", "2026-06-01T00:00:00Z")
            .set("serviceName", "orders")
            .json(),
    );
    kube.apply(
        AccessRule::build("orders-callers")
            .namespace("shop")
            .target("orders")
            .allow(&["orders", "ghost", "order*"])
            .json(),
    );
    let _cp = start(&kube, &[]).await;
    let degraded = eventually(LIMIT, "the newer claim is Degraded", || async {
        let o = kube.get(MS, "MeshService", Some("shop"), "orders-copy")?;
        condition(&o, "Degraded").cloned()
    })
    .await;
    assert_eq!(degraded["reason"], "NameConflict");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap()
            .contains("shop/orders"),
        "{degraded}"
    );
    let older = kube.get(MS, "MeshService", Some("shop"), "orders").unwrap();
    assert!(condition(&older, "Degraded").is_none(), "{older}");
    let rule = eventually(LIMIT, "the AccessRule status", || async {
        let o = kube.get(MS, "AccessRule", Some("shop"), "orders-callers")?;
        o.get("status").cloned()
    })
    .await;
    assert_eq!(rule["unknownCallers"], json!(["ghost"]));
    assert_eq!(rule["resolvedCallers"], json!(["order*", "orders"]));
    assert_eq!(
        condition(&json!({"status": rule.clone()}), "Degraded").unwrap()["reason"],
        "UnknownCallers"
    );
    assert_rbac_covers(&kube);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_registered_in_consul_and_a_restart_does_not_flap() {
    let kube = FakeKube::start().await;
    let consul = FakeConsul::start("dc1").await;
    // Someone else's instance on meshbridge's node: never touched.
    let mut foreign = Instance::new("hand-made", "hand-made-1", "10.9.9.9", 9999);
    foreign = foreign.on_node("meshbridge-k8s", "127.0.0.1");
    consul.register("dc1", foreign);
    kube.apply(
        orders_service()
            .set("consul", json!({"register": true, "tags": ["blue"]}))
            .json(),
    );
    kube.apply(pod("orders-a", "orders", 31001, true));
    kube.apply(pod("orders-b", "orders", 31002, true));
    let extra = [
        "--consul-addr",
        &consul.url(),
        "--consul-datacenter",
        "dc1",
        "--consul-sync-resync",
        "1",
    ];
    let mut cp = start(&kube, &extra).await;
    let registered = || {
        let mut ports: Vec<u16> = consul
            .instances("dc1")
            .into_iter()
            .filter(|i| i.service == "orders")
            .map(|i| i.port)
            .collect();
        ports.sort();
        ports
    };
    eventually(LIMIT, "two registrations", || async {
        (registered() == vec![31001, 31002]).then_some(())
    })
    .await;
    let orders: Vec<Instance> = consul
        .instances("dc1")
        .into_iter()
        .filter(|i| i.service == "orders")
        .collect();
    for i in &orders {
        assert!(
            i.tags.contains(&"k8s".to_string()) && i.tags.contains(&"blue".to_string()),
            "{:?}",
            i.tags
        );
        assert_eq!(
            i.meta.get("k8s-namespace").map(String::as_str),
            Some("shop")
        );
        assert_eq!(i.node, "meshbridge-k8s");
    }
    // meshbridge does not see its own registrations as extra Consul instances.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = instances(&cp, "orders").await;
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert!(seen.iter().all(|(_, o)| o == "kubernetes"));

    // Deleting a pod deregisters it.
    kube.delete("v1", "Pod", Some("shop"), "orders-b");
    eventually(LIMIT, "deregistered", || async {
        (registered() == vec![31001]).then_some(())
    })
    .await;

    // A restart neither deregisters nor re-registers anything.
    let (regs, deregs) = (consul.catalog_registers(), consul.catalog_deregisters());
    cp.kill();
    let mut cp = start(&kube, &extra).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(
        (consul.catalog_registers(), consul.catalog_deregisters()),
        (regs, deregs),
        "no flap across a restart"
    );
    assert_eq!(registered(), vec![31001]);

    // Drift is repaired: a registration deleted behind meshbridge's back comes back.
    let regs = consul.catalog_registers();
    consul.deregister("dc1", "orders:shop:orders-a");
    assert!(registered().is_empty());
    eventually(LIMIT, "re-registered by the resync", || async {
        (registered() == vec![31001]).then_some(())
    })
    .await;
    assert_eq!(consul.catalog_registers(), regs + 1);
    assert!(
        consul
            .instances("dc1")
            .iter()
            .any(|i| i.service == "hand-made"),
        "a foreign entry stays"
    );
    cp.kill();
    assert_rbac_covers(&kube);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_and_drains_before_exiting() {
    let kube = FakeKube::start().await;
    let mut first = start(&kube, &["--identity", "first", "--drain", "1500"]).await;
    eventually(LIMIT, "first leads", || async {
        (lease_holder(&kube).as_deref() == Some("first")).then_some(())
    })
    .await;
    let second = start(&kube, &["--identity", "second"]).await;
    let envoy = Envoy::start(&first, legacy(&[])).await;
    eventually(LIMIT, "Envoy connected", || async {
        (envoy.stat("control_plane.connected_state").await? == 1).then_some(())
    })
    .await;
    first.terminate();
    // Not ready any more (so a Service stops sending new Envoys here), but still serving the
    // existing stream during the drain.
    eventually(Duration::from_secs(5), "readyz answers 503", || async {
        let r = support::http_get(first.admin_addr(), "localhost", "/readyz", &[]).await;
        r.is_ok_and(|r| r.status == 503).then_some(())
    })
    .await;
    eventually(Duration::from_secs(5), "the Lease is released", || async {
        let lease = kube.get(
            "coordination.k8s.io/v1",
            "Lease",
            Some("default"),
            "meshbridge-leader",
        )?;
        lease["spec"]["holderIdentity"]
            .as_str()
            .is_none_or(str::is_empty)
            .then_some(())
    })
    .await;
    assert!(
        first.exited().is_none(),
        "existing streams are served during the drain"
    );
    assert_eq!(
        envoy.stat("control_plane.connected_state").await,
        Some(1),
        "the connected Envoy keeps its stream during the drain"
    );
    // The Lease is released: the second replica leads long before 15 s of expiry.
    eventually(
        Duration::from_secs(8),
        "second leads after the release",
        || async { (lease_holder(&kube).as_deref() == Some("second")).then_some(()) },
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = first.exited() {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "first did not exit");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "exit status {status}");
    drop(second);
    assert_rbac_covers(&kube);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_registration_shows_in_status_and_is_retried() {
    let kube = FakeKube::start().await;
    let consul = FakeConsul::start("dc1").await;
    kube.apply(
        orders_service()
            .set("consul", json!({"register": true}))
            .json(),
    );
    kube.apply(pod("orders-a", "orders", 31001, true));
    let extra = ["--consul-addr", &consul.url(), "--consul-datacenter", "dc1"];
    let cp = start(&kube, &extra).await;
    let orders = || {
        consul
            .instances("dc1")
            .into_iter()
            .filter(|i| i.service == "orders")
            .count()
    };
    eventually(LIMIT, "registered", || async {
        (orders() == 1).then_some(())
    })
    .await;

    // The agent starts refusing meshbridge (an ACL change); a new pod cannot be registered.
    consul.require_token(Some("rotated"));
    kube.apply(pod("orders-b", "orders", 31002, true));
    let degraded = eventually(LIMIT, "Degraded=RegistrationFailed", || async {
        let o = kube.get(MS, "MeshService", Some("shop"), "orders")?;
        let c = condition(&o, "Degraded")?.clone();
        (c["reason"] == "RegistrationFailed").then_some(c)
    })
    .await;
    assert!(
        degraded["message"].as_str().unwrap().contains("403"),
        "{degraded}"
    );
    eventually(LIMIT, "a Warning event", || async {
        kube.list("events.k8s.io/v1", "Event")
            .iter()
            .any(|e| e["reason"] == "RegistrationFailed" && e["type"] == "Warning")
            .then_some(())
    })
    .await;
    // Traffic is not affected: the pod is an endpoint whatever Consul says.
    eventually(LIMIT, "both pods are endpoints", || async {
        (instances(&cp, "orders").await.len() == 2).then_some(())
    })
    .await;

    // Access restored: the retry registers it and the condition clears.
    consul.require_token(None);
    eventually(LIMIT, "registered after the retry", || async {
        (orders() == 2).then_some(())
    })
    .await;
    eventually(LIMIT, "Degraded clears", || async {
        let o = kube.get(MS, "MeshService", Some("shop"), "orders")?;
        condition(&o, "Degraded").is_none().then_some(())
    })
    .await;
    assert_rbac_covers(&kube);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_can_be_restricted() {
    let kube = FakeKube::start().await;
    kube.apply(orders_service().json());
    kube.apply(pod("orders-a", "orders", 31001, true));
    kube.apply(
        MeshService::build("billing")
            .namespace("other")
            .selector("billing")
            .json(),
    );
    let cp = start(&kube, &["--namespace", "shop"]).await;
    let services = cp.admin_json("/api/services").await;
    let names: Vec<&str> = services
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["orders"]);
    // Every list and watch named the namespace: nothing cluster-wide was read.
    let reads: Vec<_> = kube
        .requests()
        .into_iter()
        .filter(|r| ["pods", "meshservices", "accessrules"].contains(&r.resource.as_str()))
        .filter(|r| r.verb == "list" || r.verb == "watch")
        .collect();
    assert!(!reads.is_empty());
    assert!(
        reads.iter().all(|r| r.namespace.as_deref() == Some("shop")),
        "{reads:?}"
    );
    assert_rbac_covers(&kube);
}

/// The operator's path: a MeshService and an AccessRule written to Kubernetes are enforced
/// by real Envoys over mutual TLS, and follow the AccessRule as it is edited and deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_access_rule_in_kubernetes_is_enforced_over_mtls_and_follows_edits() {
    let kube = FakeKube::start().await;
    let certs = tempfile::tempdir().unwrap();
    let identity =
        |service: &str| support::issue_identity(certs.path(), "mesh", service, "mesh.local");
    let app = Backend::start("orders", "pod-a").await;
    let ingress = support::free_port();
    kube.apply(
        orders_service()
            .set("ports", json!([{"port": 8080}]))
            .set("mtls", "strict")
            .json(),
    );
    let mut orders_pod = pod("orders-a", "orders", ingress, true);
    orders_pod["metadata"]["annotations"]["meshbridge.io/tls-secret"] = json!("orders-tls");
    kube.apply(orders_pod);
    let rule = |from: &[&str]| {
        AccessRule::build("orders-callers")
            .namespace("shop")
            .target("orders")
            .allow_with(json!({"from": from, "methods": ["GET"]}))
            .json()
    };
    kube.apply(rule(&["checkout"]));
    let cp = start(&kube, &[]).await;
    // The pod's sidecar, holding the pod's certificate.
    let _sidecar = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "orders".into(),
            ingress_port: Some(ingress),
            app_port: Some(app.port),
            tls: Some(identity("orders")),
            ..Default::default()
        },
    )
    .await;
    let caller = |service: &str| EnvoyOptions {
        service: service.into(),
        dependencies: vec!["orders".into()],
        egress: true,
        tls: Some(identity(service)),
        ..Default::default()
    };
    let checkout = Envoy::start(&cp, caller("checkout")).await;
    let billing = Envoy::start(&cp, caller("billing")).await;

    let ok = checkout
        .wait_call("orders", "checkout reaches orders", |r| r.status == 200)
        .await;
    assert!(ok.body.starts_with("hello from orders pod-a"), "{ok:?}");
    assert_eq!(ok.header("x-client-name-seen"), Some("checkout"));
    let refused = billing
        .wait_call("orders", "billing is answered by orders", |r| {
            r.status == 403 || r.status == 200
        })
        .await;
    assert_eq!(refused.status, 403, "billing is not named: {refused:?}");
    assert_eq!(refused.body, "RBAC: access denied");

    // Edited: billing too.
    kube.apply(rule(&["checkout", "billing"]));
    let ok = billing
        .wait_call("orders", "billing allowed after the edit", |r| {
            r.status == 200
        })
        .await;
    assert_eq!(ok.header("x-client-name-seen"), Some("billing"));
    // Deleted: no AccessRule, no RBAC (the mesh is not default-deny); still only over mTLS.
    kube.delete(MS, "AccessRule", Some("shop"), "orders-callers");
    eventually(LIMIT, "the policy is gone from /api/access", || async {
        let access = cp.admin_json("/api/access").await;
        access.as_array().unwrap().is_empty().then_some(())
    })
    .await;
    let r = checkout.call("orders", "/").await.unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    assert_rbac_covers(&kube);
}
