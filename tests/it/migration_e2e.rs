//! Migration from Consul hosts to pods, end to end: the Kubernetes API fake and the Consul
//! fake feed the real `meshbridge`, a real Envoy calls the service, and the Envoy's load
//! reports (LRS) come back to meshbridge. What is checked is what a platform team sees: the
//! share of requests each origin answers, whatever the instance counts; mirrored copies that
//! leave the callers' answers alone; and per-origin counts in `/api/services/NAME` equal to
//! what the instances answered.

use crate::kube_e2e::{legacy, pod};
use crate::support;
use crate::support::consul_fake::{FakeConsul, Instance};
use crate::support::kube_fake::FakeKube;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{Value, json};
use support::fixtures::{Fixture, MeshService};
use support::{Backend, ControlPlane, Envoy, eventually};

const LIMIT: Duration = Duration::from_secs(20);

/// `orders` in namespace `shop`, its pods labelled `app: orders`, migrating to them.
pub(crate) fn orders(migration: Value) -> Value {
    MeshService::build("orders")
        .namespace("shop")
        .selector("orders")
        .set("ports", json!([{"port": 80}]))
        .set("migration", migration)
        .json()
}

/// meshbridge on the Kubernetes API fake and the Consul fake (namespace `shop` owns the
/// Consul services), proxies reporting their load every `report_ms`; ready.
async fn start(kube: &FakeKube, consul: &FakeConsul, report_ms: u32) -> ControlPlane {
    start_with(kube, consul, report_ms, &[]).await
}

/// [`start`] with `extra` flags.
pub(crate) async fn start_with(
    kube: &FakeKube,
    consul: &FakeConsul,
    report_ms: u32,
    extra: &[&str],
) -> ControlPlane {
    let dir = tempfile::tempdir().unwrap().keep();
    let kubeconfig = kube.write_kubeconfig(&dir);
    let interval = report_ms.to_string();
    let consul_url = consul.url();
    let mut flags = vec![
        "--consul-addr",
        &consul_url,
        "--consul-datacenter",
        "dc1",
        "--consul-services-owned-by",
        "shop",
        "--load-report-interval",
        &interval,
    ];
    flags.extend_from_slice(extra);
    let mut cp = ControlPlane::start_kube(&kubeconfig, "", &flags);
    cp.wait_ready().await;
    cp
}

/// Who answered `calls` requests for `orders` through `envoy`: counts by the instance the
/// answer names (`pod-a`, `vm-1`, …); failed calls under `failed`.
async fn answers(envoy: &Envoy, calls: usize) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for _ in 0..calls {
        let who = match envoy.call("orders", "/").await {
            Ok(r) if r.status == 200 => r
                .body
                .strip_prefix("hello from orders ")
                .and_then(|b| b.split(':').next())
                .unwrap_or("?")
                .to_string(),
            _ => "failed".to_string(),
        };
        *out.entry(who).or_insert(0) += 1;
    }
    out
}

/// Answers from pods (instances named `pod-*`).
fn from_pods(counts: &BTreeMap<String, usize>) -> usize {
    counts
        .iter()
        .filter(|(k, _)| k.starts_with("pod-"))
        .map(|(_, n)| n)
        .sum()
}

/// `load.last_5_minutes` of `orders` summed per `origin/traffic`.
async fn reported(cp: &ControlPlane) -> BTreeMap<String, u64> {
    let detail = cp.admin_json("/api/services/orders").await;
    let mut out = BTreeMap::new();
    for o in detail["load"]["last_5_minutes"]
        .as_array()
        .into_iter()
        .flatten()
    {
        let key = format!(
            "{}/{}",
            o["origin"].as_str().unwrap_or_default(),
            o["traffic"].as_str().unwrap_or_default()
        );
        *out.entry(key).or_insert(0) += o["requests"].as_u64().unwrap_or(0);
    }
    out
}

/// [`reported`] once the reports stop moving (two reads a report interval and a half apart
/// agree): every request made before is in it.
async fn settled(cp: &ControlPlane) -> BTreeMap<String, u64> {
    let mut last = reported(cp).await;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let now = reported(cp).await;
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("load reports still moving after 30 s: {last:?}");
}

/// The statistical bound of a share test: with `n` requests and an expected share `p`, the
/// count is allowed 5 standard deviations (a false failure about once in 3.5 million runs).
/// Envoy's locality choice is a weighted deterministic schedule, so the real spread is
/// much smaller.
pub(crate) fn within_bound(count: usize, n: usize, p: f64) -> bool {
    let expected = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (count as f64 - expected).abs() <= 5.0 * sd
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_weight_splits_requests_by_origin_whatever_the_instance_counts() {
    let kube = FakeKube::start().await;
    let consul = FakeConsul::start("dc1").await;
    let [pod_a, pod_b] = [
        Backend::start("orders", "pod-a").await,
        Backend::start("orders", "pod-b").await,
    ];
    let mut vms = Vec::new();
    for i in 1..=5 {
        vms.push(Backend::start("orders", &format!("vm-{i}")).await);
    }
    for (i, vm) in vms.iter().take(2).enumerate() {
        consul.register(
            "dc1",
            Instance::new(
                "orders",
                &format!("orders-vm-{}", i + 1),
                "127.0.0.1",
                vm.port,
            ),
        );
    }
    kube.apply(orders(json!({"to": "kubernetes", "weight": 25})));
    kube.apply(pod("orders-a", "orders", pod_a.port, true));
    kube.apply(pod("orders-b", "orders", pod_b.port, true));
    let cp = start(&kube, &consul, 1000).await;
    let caller = Envoy::start(&cp, legacy(&["orders"])).await;
    // Both origins routed and reported. (A proxy's reports about a cluster start with the
    // first report after it has the cluster: what it sent before is not counted.)
    eventually(LIMIT, "both origins answer and are reported", || async {
        let seen = answers(&caller, 8).await;
        let r = reported(&cp).await;
        (from_pods(&seen) > 0
            && seen.keys().any(|k| k.starts_with("vm-"))
            && r.contains_key("kubernetes/live")
            && r.contains_key("consul/live"))
        .then_some(())
    })
    .await;
    let before = settled(&cp).await;

    // 2 pods and 2 hosts: a quarter of the requests reach the pods.
    const N: usize = 400;
    let seen = answers(&caller, N).await;
    assert_eq!(seen.get("failed"), None, "{seen:?}");
    let pods = from_pods(&seen);
    assert!(within_bound(pods, N, 0.25), "{seen:?}");

    // The load reports come back equal to what the instances answered, per origin.
    let after = settled(&cp).await;
    let delta =
        |key: &str| after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0);
    assert_eq!(
        delta("kubernetes/live"),
        pods as u64,
        "{before:?} {after:?}"
    );
    assert_eq!(
        delta("consul/live"),
        (N - pods) as u64,
        "{before:?} {after:?}"
    );
    assert_eq!(after.get("kubernetes/mirror"), None, "{after:?}");
    let detail = cp.admin_json("/api/services/orders").await;
    let share: f64 = detail["load"]["last_5_minutes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["origin"] == "kubernetes")
        .map(|o| o["share"].as_f64().unwrap())
        .sum();
    let (k, c) = (after["kubernetes/live"], after["consul/live"]);
    assert!((share - k as f64 / (k + c) as f64).abs() < 1e-9, "{detail}");
    let metrics = cp.metrics().await;
    assert!(
        metrics.contains(&format!(
            "meshbridge_load_requests_total{{service=\"orders\",origin=\"kubernetes\",traffic=\"live\"}} {k}"
        )),
        "{}",
        metrics
            .lines()
            .filter(|l| l.contains("load_"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // 1 pod and 5 hosts: still a quarter.
    kube.delete("v1", "Pod", Some("shop"), "orders-b");
    for (i, vm) in vms.iter().enumerate().skip(2) {
        consul.register(
            "dc1",
            Instance::new(
                "orders",
                &format!("orders-vm-{}", i + 1),
                "127.0.0.1",
                vm.port,
            ),
        );
    }
    eventually(LIMIT, "1 pod and 5 hosts routed", || async {
        let seen = answers(&caller, 30).await;
        (seen.keys().filter(|k| k.starts_with("vm-")).count() == 5 && !seen.contains_key("pod-b"))
            .then_some(())
    })
    .await;
    let seen = answers(&caller, N).await;
    assert!(within_bound(from_pods(&seen), N, 0.25), "{seen:?}");
    assert_eq!(seen.get("pod-a").copied(), Some(from_pods(&seen)));

    // Every pod unready: the hosts take everything.
    kube.apply(pod("orders-a", "orders", pod_a.port, false));
    eventually(LIMIT, "the pods left out", || async {
        (from_pods(&answers(&caller, 20).await) == 0).then_some(())
    })
    .await;
    let seen = answers(&caller, 100).await;
    assert_eq!(from_pods(&seen), 0, "{seen:?}");
    assert_eq!(seen.get("failed"), None, "{seen:?}");
}

/// Mirroring at weight 0: every answer comes from the host, the pods get their share of
/// copies (load reports), and the latency view shows the copies' time at the slow pod next
/// to the live requests' time at the host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirroring_copies_requests_to_the_new_origin_without_changing_the_answers() {
    let kube = FakeKube::start().await;
    let consul = FakeConsul::start("dc1").await;
    let pod_app = Backend::start("orders", "pod-a").await;
    // The pod answers 150 ms late.
    let pod_a =
        support::faults::FaultProxy::start(format!("127.0.0.1:{}", pod_app.port).parse().unwrap())
            .await;
    pod_a.set(
        support::faults::Direction::Downstream,
        support::faults::Fault::Latency {
            latency: Duration::from_millis(150),
            jitter: Duration::ZERO,
        },
    );
    let vm = Backend::start("orders", "vm-1").await;
    consul.register(
        "dc1",
        Instance::new("orders", "orders-vm-1", "127.0.0.1", vm.port),
    );
    // Nothing to the pods yet, half the requests copied to them.
    kube.apply(orders(
        json!({"to": "kubernetes", "weight": 0, "mirror": 50}),
    ));
    kube.apply(pod("orders-a", "orders", pod_a.addr().port(), true));
    let cp = start(&kube, &consul, 1000).await;
    let caller = Envoy::start(&cp, legacy(&["orders"])).await;
    eventually(LIMIT, "orders answers", || async {
        let r = reported(&cp).await;
        let seen = answers(&caller, 10).await;
        (seen.get("vm-1") == Some(&10) && r.get("kubernetes/mirror").is_some_and(|n| *n > 0))
            .then_some(())
    })
    .await;
    const N: usize = 200;
    let before = settled(&cp).await;
    let seen = answers(&caller, N).await;
    // Every answer from the host: the pods' answers to the copies are discarded.
    assert_eq!(seen.get("vm-1"), Some(&N), "{seen:?}");
    let after = settled(&cp).await;
    let delta =
        |key: &str| after.get(key).copied().unwrap_or(0) - before.get(key).copied().unwrap_or(0);
    assert_eq!(delta("consul/live"), N as u64, "{before:?} {after:?}");
    let copies = delta("kubernetes/mirror") as usize;
    assert!(within_bound(copies, N, 0.5), "{copies} copies of {N}");
    assert_eq!(after.get("kubernetes/live"), None, "{after:?}");

    // Latency, from the caller's Envoy (its histograms refresh every 5 s): the copies take
    // the pod's 150 ms, the live requests the host's few.
    let latency = eventually(LIMIT, "latency of live and mirrored requests", || async {
        let v = cp.admin_json("/api/services/orders/latency").await;
        let of = |traffic: &str| {
            v["traffic"]
                .as_array()?
                .iter()
                .find(|t| t["traffic"] == traffic)
                .cloned()
        };
        let (live, mirror) = (of("live")?, of("mirror")?);
        (live["requests"].as_u64()? >= N as u64 && mirror["requests"].as_u64()? > 0)
            .then_some((live, mirror, v))
    })
    .await;
    let (live, mirror, view) = latency;
    assert_eq!(
        (
            view["callers"].as_u64(),
            view["asked"].as_array().map(Vec::len)
        ),
        (Some(1), Some(1)),
        "{view}"
    );
    let p50 = |t: &Value| t["p50_ms"].as_f64().unwrap_or(f64::NAN);
    assert!(
        p50(&mirror) >= 100.0,
        "mirrored copies wait for the pod: {view}"
    );
    assert!(p50(&live) < 50.0, "live requests do not: {view}");
    let admin = format!("http://{}", cp.admin_addr());
    let out = crate::ctl::ctl_env(&admin, &["latency", "orders"]).await;
    let table = out.ok();
    assert!(
        table.starts_with("orders: asked 1 of 1 callers' proxies (1 answered)")
            && table.lines().any(|l| l.starts_with("mirror "))
            && table.lines().any(|l| l.starts_with("live ")),
        "{table}"
    );
}

/// `spec.migration` of `service` as the status reports it, and its conditions.
fn migration_of(kube: &FakeKube, service: &str) -> (Value, Value) {
    let object = kube
        .get(crate::kube_e2e::MS, "MeshService", Some("shop"), service)
        .unwrap_or_default();
    (
        object["status"]["migration"].clone(),
        object["status"]["conditions"].clone(),
    )
}

/// Calls `service` 20 times through `caller`, whatever the answers.
async fn call(caller: &Envoy, service: &str) {
    for _ in 0..20 {
        let _ = caller.call(service, "/").await;
    }
}

/// Calls `service` (a plan is judged on traffic) until its `status.migration` satisfies
/// `reached`; that migration and the conditions.
async fn calling_until(
    caller: &Envoy,
    kube: &FakeKube,
    service: &str,
    what: &str,
    reached: impl Fn(&Value) -> bool,
) -> (Value, Value) {
    eventually(Duration::from_secs(30), what, || async {
        call(caller, service).await;
        let (m, c) = migration_of(kube, service);
        reached(&m).then_some((m, c))
    })
    .await
}

/// A plan of steps under traffic: with healthy pods it goes 25% then 100% (complete), one
/// step per interval, and every request ends at the pods; with pods answering 500 it rolls
/// back to 0 after its first interval, says why (numbers in the `Degraded` condition and an
/// Event), counts it, and the hosts take everything again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plan_advances_on_a_healthy_new_origin_and_rolls_back_when_it_fails() {
    let kube = FakeKube::start().await;
    let consul = FakeConsul::start("dc1").await;
    let pod_ok = Backend::start("orders", "pod-a").await;
    let vm = Backend::start("orders", "vm-1").await;
    let billing_pod = crate::passive_health_e2e::FailingBackend::start().await;
    let billing_vm = Backend::start("billing", "vm-1").await;
    consul.register(
        "dc1",
        Instance::new("orders", "orders-vm-1", "127.0.0.1", vm.port),
    );
    consul.register(
        "dc1",
        Instance::new("billing", "billing-vm-1", "127.0.0.1", billing_vm.port),
    );
    let plan = json!({"to": "kubernetes", "steps": [25, 100], "interval": "3s", "maxErrorRateIncrease": "1%"});
    kube.apply(orders(plan.clone()));
    let billing = MeshService::build("billing")
        .namespace("shop")
        .selector("billing")
        .set("ports", json!([{"port": 80}]))
        .set("migration", plan.clone())
        .json();
    kube.apply(billing.clone());
    kube.apply(pod("orders-a", "orders", pod_ok.port, true));
    kube.apply(pod("billing-a", "billing", billing_pod.port, true));
    let cp = start(&kube, &consul, 500).await;
    let caller = Envoy::start(&cp, legacy(&["orders", "billing"])).await;

    // Healthy pods: 25%, then 100% and complete, each step after its 3 s interval.
    let (first, _) = calling_until(&caller, &kube, "orders", "the plan's first step", |m| {
        m["weight"] == 25
    })
    .await;
    assert_eq!(first["phase"], "Progressing", "{first}");
    assert_eq!(first["step"], 0, "{first}");
    assert!(first["nextStepAt"].is_string(), "{first}");

    // An operator's pause holds the step past its interval; lifted, the plan goes on.
    let mut paused = orders(plan.clone());
    paused["metadata"]["annotations"] = json!({"meshbridge.io/migration": "pause"});
    kube.apply(paused);
    calling_until(&caller, &kube, "orders", "the plan paused", |m| {
        m["phase"] == "Paused"
    })
    .await;
    for _ in 0..4 {
        call(&caller, "orders").await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let (held, _) = migration_of(&kube, "orders");
    assert_eq!(
        (&held["phase"], &held["weight"]),
        (&json!("Paused"), &json!(25)),
        "{held}"
    );
    assert!(
        held["message"]
            .as_str()
            .unwrap_or_default()
            .contains("paused by an operator"),
        "{held}"
    );
    kube.apply(orders(plan.clone()));
    let (done, conditions) = calling_until(&caller, &kube, "orders", "the plan complete", |m| {
        m["phase"] == "Complete"
    })
    .await;
    assert_eq!(done["weight"], 100, "{done}");
    assert_eq!(done["errorRates"]["new"], "0.00%", "{done}");
    assert!(
        !conditions.to_string().contains("MigrationRolledBack"),
        "{conditions}"
    );
    let detail = cp.admin_json("/api/services/orders").await;
    let m = &detail["migration"];
    assert_eq!(
        (&m["to"], &m["weight"], &m["steps"], &m["plan"]["phase"]),
        (
            &json!("kubernetes"),
            &json!(100),
            &json!([25, 100]),
            &json!("Complete")
        ),
        "{detail}"
    );
    eventually(LIMIT, "every request at the pod", || async {
        let seen = answers(&caller, 20).await;
        (seen.get("pod-a") == Some(&20)).then_some(())
    })
    .await;

    // Pods answering 500: back to 0 after the first interval, with the numbers.
    let (back, conditions) = calling_until(&caller, &kube, "billing", "billing rolled back", |m| {
        m["phase"] == "RolledBack"
    })
    .await;
    assert_eq!(back["weight"], 0, "{back}");
    assert_eq!(back["errorRates"]["new"], "100.00%", "{back}");
    let degraded = conditions
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == "Degraded")
        .cloned()
        .unwrap_or_default();
    assert_eq!(degraded["reason"], "MigrationRolledBack", "{conditions}");
    assert!(
        degraded["message"]
            .as_str()
            .unwrap_or_default()
            .contains("100.00% of requests with errors"),
        "{degraded}"
    );
    let event = eventually(LIMIT, "the Event", || async {
        kube.list("events.k8s.io/v1", "Event")
            .into_iter()
            .find(|e| e["reason"] == "MigrationRolledBack")
    })
    .await;
    assert_eq!(event["type"], "Warning", "{event}");
    assert_eq!(event["regarding"]["name"], "billing", "{event}");
    assert!(
        event["note"]
            .as_str()
            .unwrap_or_default()
            .contains("rolled back from weight 25 to 0"),
        "{event}"
    );
    assert!(
        cp.metrics()
            .await
            .contains("meshbridge_migration_rollbacks_total 1"),
    );
    eventually(LIMIT, "billing back on its host", || async {
        let mut ok = 0;
        for _ in 0..20 {
            if let Ok(r) = caller.call("billing", "/").await
                && r.status == 200
            {
                ok += 1;
            }
        }
        (ok == 20).then_some(())
    })
    .await;
    assert!(billing_pod.requests() > 0);

    // An operator's resume starts the rolled-back plan again at its first step, once.
    let mut resumed = billing;
    resumed["metadata"]["annotations"] =
        json!({"meshbridge.io/migration": "resume@2026-12-07T12:00:00Z"});
    kube.apply(resumed);
    let again = eventually(LIMIT, "billing resumed", || async {
        let (m, _) = migration_of(&kube, "billing");
        (m["resumed"] == "2026-12-07T12:00:00Z").then_some(m)
    })
    .await;
    assert_eq!(
        (&again["step"], &again["weight"]),
        (&json!(0), &json!(25)),
        "{again}"
    );
}

/// `meshbridge ctl migrate NAME ORDER` as an operator uses it: each order lands on the
/// MeshService as its standing order, the leader carries it out (paused, rolled back,
/// resumed at the first step, promoted), and who gave it is in the audit and in an Event; a
/// read-only token, a service without a plan and an unknown service are refused, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_migrate_orders_are_carried_out_by_the_leader_and_audited() {
    let kube = FakeKube::start().await;
    let consul = FakeConsul::start("dc1").await;
    consul.register(
        "dc1",
        Instance::new("billing", "billing-vm-1", "127.0.0.1", 41010),
    );
    let plan = json!({"to": "kubernetes", "steps": [25, 100], "interval": "10m"});
    kube.apply(
        MeshService::build("billing")
            .namespace("shop")
            .selector("billing")
            .set("ports", json!([{"port": 80}]))
            .set("migration", plan)
            .json(),
    );
    kube.apply(orders(json!({"to": "kubernetes", "weight": 25})));
    kube.apply(pod("billing-a", "billing", 41011, true));
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        "alice-0123456789abcdef alice\ngrafana-0123456789abcdef grafana read\n",
    )
    .unwrap();
    let (alice, grafana) = (dir.path().join("alice"), dir.path().join("grafana"));
    std::fs::write(&alice, "alice-0123456789abcdef\n").unwrap();
    std::fs::write(&grafana, "grafana-0123456789abcdef\n").unwrap();
    let cp = start_with(
        &kube,
        &consul,
        500,
        &["--admin-token-file", tokens.to_str().unwrap()],
    )
    .await;
    let admin = format!("http://{}", cp.admin_addr());
    let ctl = |token: &std::path::Path, args: &[&str]| {
        let mut all = vec![
            "--admin",
            admin.as_str(),
            "--token-file",
            token.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let all: Vec<String> = all.into_iter().map(str::to_string).collect();
        async move {
            let args: Vec<&str> = all.iter().map(String::as_str).collect();
            crate::ctl::ctl_env("", &args).await
        }
    };
    let status = |what: &'static str, reached: fn(&Value) -> bool| {
        let kube = &kube;
        eventually(LIMIT, what, move || async move {
            let (m, c) = migration_of(kube, "billing");
            reached(&m).then_some((m, c))
        })
    };
    status("the plan's first step", |m| m["weight"] == 25).await;

    // Pause: written, carried out, attributed.
    let out = ctl(&alice, &["migrate", "billing", "pause"]).await;
    assert!(
        out.ok()
            .contains("billing: order pause written on MeshService shop/billing (meshbridge.io/migration=pause)"),
        "{out:?}"
    );
    let annotation = |kube: &FakeKube| {
        kube.get(crate::kube_e2e::MS, "MeshService", Some("shop"), "billing")
            .unwrap_or_default()["metadata"]["annotations"]["meshbridge.io/migration"]
            .clone()
    };
    assert_eq!(annotation(&kube), "pause");
    let (paused, _) = status("paused", |m| m["phase"] == "Paused").await;
    assert_eq!(paused["weight"], 25, "{paused}");
    let event = eventually(LIMIT, "the order's Event", || async {
        kube.list("events.k8s.io/v1", "Event")
            .into_iter()
            .find(|e| e["reason"] == "MigrationOrder")
    })
    .await;
    assert_eq!(event["regarding"]["name"], "billing", "{event}");
    assert_eq!(
        event["note"], "meshbridge.io/migration=pause set by alice through the admin API",
        "{event}"
    );

    // A read-only token may not give orders; nothing changes.
    ctl(&grafana, &["migrate", "billing", "rollback"])
        .await
        .failed_saying(&["403", "grafana may only read"]);
    assert_eq!(annotation(&kube), "pause");

    // Roll back, resume (from the first step), promote.
    ctl(&alice, &["migrate", "billing", "rollback"]).await.ok();
    let (back, conditions) = status("rolled back", |m| m["phase"] == "RolledBack").await;
    assert_eq!(back["weight"], 0, "{back}");
    assert!(
        conditions
            .to_string()
            .contains("rolled back by an operator"),
        "{conditions}"
    );
    let out = ctl(&alice, &["-o", "json", "migrate", "billing", "resume"]).await;
    let written = out.json();
    assert_eq!(written["previous"], "rollback", "{written}");
    assert_eq!(written["plan"]["phase"], "RolledBack", "{written}");
    let token = written["annotation"]
        .as_str()
        .and_then(|a| a.strip_prefix("resume@"))
        .unwrap_or_else(|| panic!("{written}"))
        .to_string();
    let (again, _) = status("resumed", |m| {
        m["phase"] == "Progressing" && !m["resumed"].as_str().unwrap_or_default().is_empty()
    })
    .await;
    assert_eq!(again["resumed"], token.as_str(), "{again}");
    assert_eq!(
        (&again["step"], &again["weight"]),
        (&json!(0), &json!(25)),
        "{again}"
    );
    ctl(&alice, &["migrate", "billing", "promote"]).await.ok();
    status("complete", |m| {
        m["phase"] == "Complete" && m["weight"] == 100
    })
    .await;
    let shown = eventually(LIMIT, "ctl services showing the plan", || async {
        let out = ctl(&alice, &["services", "billing"]).await;
        let text = out.ok().to_string();
        text.contains("to kubernetes: 100%").then_some(text)
    })
    .await;
    assert!(
        shown.contains("migration:     to kubernetes: 100%; plan 25% → 100%: Complete at step 2 of 2 (weight 100%): every step taken: 100% to kubernetes; order promote\n"),
        "{shown}"
    );

    // Refused, saying why.
    ctl(&alice, &["migrate", "orders", "pause"])
        .await
        .failed_saying(&["409", "no migration plan", "set by hand"]);
    ctl(&alice, &["migrate", "ghost", "pause"])
        .await
        .failed_saying(&["404", "no service named \"ghost\""]);

    // The audit: every order, who gave it and what became of it, refusals included.
    let audit = ctl(&alice, &["audit"]).await;
    let table = audit.ok();
    for order in ["pause", "rollback", "resume", "promote"] {
        assert!(
            table.lines().any(|r| r.contains("alice")
                && r.contains("migration ")
                && r.contains("service billing")
                && r.contains(&format!("order={order}"))
                && r.ends_with(" ok")),
            "{order}: {table}"
        );
    }
    let entries = ctl(&alice, &["-o", "json", "audit"]).await.json();
    let orders: Vec<&Value> = entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "migration")
        .collect();
    assert_eq!(orders.len(), 6, "{entries:#}");
    assert!(
        orders.iter().any(|e| e["service"] == "ghost"
            && e["result"]
                .as_str()
                .unwrap_or_default()
                .contains("no service named")),
        "{entries:#}"
    );
    assert!(
        entries.as_array().unwrap().iter().any(|e| e["who"] == "grafana"
            && e["detail"] == "POST /api/services/billing/migration"),
        "the refused call is audited too: {entries:#}"
    );
    // One merge patch per order given (none for the refused ones), granted by the chart's
    // ClusterRole.
    let writes: Vec<_> = kube
        .requests()
        .into_iter()
        .filter(|r| r.verb == "patch" && r.resource == "meshservices" && r.subresource.is_none())
        .collect();
    assert_eq!(writes.len(), 4, "{writes:#?}");
    assert!(
        writes.iter().all(
            |w| w.content_type.as_deref() == Some("application/merge-patch+json")
                && w.field_manager.as_deref() == Some("meshbridge-admin")
        ),
        "{writes:#?}"
    );
    support::kube_fake::assert_rbac_covers(&kube);
}
