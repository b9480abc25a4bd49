//! Tests of the fake Consul agent itself (`tests/it/support/consul_fake.rs`): the JSON shapes,
//! headers, blocking-query semantics and failure modes it claims, seen through a real HTTP
//! client. Every wait is bounded.

use crate::support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::consul_fake::{
    ACL_NOT_FOUND, FakeConsul, Health, Instance, NO_LEADER, NO_PATH_TO_DC, effective_wait,
    parse_go_duration,
};

const LIMIT: Duration = Duration::from_secs(10);

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

#[derive(Debug)]
struct Got {
    status: u16,
    index: Option<u64>,
    headers: reqwest::header::HeaderMap,
    body: String,
}

impl Got {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// The answer of a spawned [`send`], within [`LIMIT`].
async fn answer(pending: tokio::task::JoinHandle<Result<Got, reqwest::Error>>) -> Got {
    tokio::time::timeout(LIMIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap()
}

async fn send(req: reqwest::RequestBuilder) -> Result<Got, reqwest::Error> {
    let r = tokio::time::timeout(Duration::from_secs(30), req.send())
        .await
        .expect("request not finished within 30 s")?;
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let index = headers
        .get("X-Consul-Index")
        .map(|v| v.to_str().unwrap().parse().unwrap());
    let body = r.text().await?;
    Ok(Got {
        status,
        index,
        headers,
        body,
    })
}

async fn get(c: &reqwest::Client, url: String) -> Got {
    send(c.get(&url)).await.unwrap()
}

/// Polls `f` every 10 ms until true, for at most [`LIMIT`].
async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn health_url(fake: &FakeConsul, svc: &str, extra: &str) -> String {
    format!("{}/v1/health/service/{svc}{extra}", fake.url())
}

fn ids(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["Service"]["ID"].as_str().unwrap().to_string())
        .collect()
}

fn assert_consul_headers(g: &Got) {
    assert_eq!(g.status, 200, "{}", g.body);
    assert!(g.index.unwrap() >= 1, "X-Consul-Index {:?}", g.index);
    assert_eq!(g.header("X-Consul-KnownLeader"), Some("true"));
    assert_eq!(g.header("X-Consul-LastContact"), Some("0"));
    assert_eq!(g.header("Content-Type"), Some("application/json"));
}

#[tokio::test]
async fn agent_self_reports_the_local_datacenter() {
    let fake = FakeConsul::start("dc1").await;
    let g = get(&client(), format!("{}/v1/agent/self", fake.url())).await;
    assert_consul_headers(&g);
    let v = g.json();
    assert_eq!(v["Config"]["Datacenter"], "dc1");
    assert_eq!(v["Config"]["NodeName"], "fake-agent");
    assert_eq!(v["Member"]["Name"], "fake-agent");
    assert_eq!(v["Member"]["Tags"]["dc"], "dc1");
    assert!(fake.url().starts_with("http://127.0.0.1:"));
    assert_eq!(fake.url(), format!("http://127.0.0.1:{}", fake.addr.port()));
}

#[tokio::test]
async fn catalog_services_lists_tag_unions_and_the_consul_service() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let g = get(&c, format!("{}/v1/catalog/services", fake.url())).await;
    assert_consul_headers(&g);
    assert_eq!(g.json(), serde_json::json!({"consul": []}));

    fake.register(
        "dc1",
        Instance::new("web", "web-1", "10.0.0.1", 80).tags(&["v1", "blue"]),
    );
    fake.register(
        "dc1",
        Instance::new("web", "web-2", "10.0.0.2", 80).tags(&["v2", "blue"]),
    );
    fake.register("dc1", Instance::new("db", "db-1", "10.0.0.3", 5432));
    fake.register("dc2", Instance::new("cache", "cache-1", "10.1.0.1", 6379));
    let g = get(&c, format!("{}/v1/catalog/services", fake.url())).await;
    assert_consul_headers(&g);
    assert_eq!(
        g.json(),
        serde_json::json!({"consul": [], "db": [], "web": ["blue", "v1", "v2"]})
    );
    let g = get(&c, format!("{}/v1/catalog/services?dc=dc2", fake.url())).await;
    assert_eq!(g.json(), serde_json::json!({"consul": [], "cache": []}));
}

#[tokio::test]
async fn health_service_has_consuls_json_shape() {
    let fake = FakeConsul::start("dc1").await;
    fake.register(
        "dc1",
        Instance::new("web", "web-1", "10.0.0.1", 8080)
            .tags(&["v1"])
            .meta("version", "1.2")
            .weight(10)
            .health(Health::Warning),
    );
    fake.register(
        "dc1",
        Instance::new("web", "web-2", "10.0.0.2", 8080)
            .on_node("vm-7", "10.0.0.7")
            .service_address(""),
    );
    let g = get(&client(), health_url(&fake, "web", "")).await;
    assert_consul_headers(&g);
    let v = g.json();
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 2);
    let e = &a[0];
    assert_eq!(e["Node"]["Node"], "node-web-1");
    assert_eq!(e["Node"]["Address"], "10.0.0.1");
    assert_eq!(e["Node"]["Datacenter"], "dc1");
    assert_eq!(e["Node"]["TaggedAddresses"]["lan"], "10.0.0.1");
    assert!(e["Node"]["ID"].as_str().unwrap().len() == 36);
    assert!(e["Node"]["Meta"].is_object());
    let s = &e["Service"];
    assert_eq!(s["ID"], "web-1");
    assert_eq!(s["Service"], "web");
    assert_eq!(s["Tags"], serde_json::json!(["v1"]));
    assert_eq!(s["Address"], "10.0.0.1");
    assert_eq!(s["Port"], 8080);
    assert_eq!(
        s["Weights"],
        serde_json::json!({"Passing": 10, "Warning": 1})
    );
    assert_eq!(s["Meta"], serde_json::json!({"version": "1.2"}));
    assert_eq!(s["EnableTagOverride"], false);
    let checks = e["Checks"].as_array().unwrap();
    assert_eq!(checks.len(), 2);
    assert_eq!(checks[0]["CheckID"], "serfHealth");
    assert_eq!(checks[0]["Name"], "Serf Health Status");
    assert_eq!(checks[0]["Status"], "passing");
    assert_eq!(checks[0]["Node"], "node-web-1");
    assert_eq!(checks[0]["ServiceID"], "");
    assert_eq!(checks[1]["CheckID"], "service:web-1");
    assert_eq!(checks[1]["Status"], "warning");
    assert_eq!(checks[1]["ServiceID"], "web-1");
    assert_eq!(checks[1]["ServiceName"], "web");

    // Empty service address: the node's address is the one to use.
    let e = &a[1];
    assert_eq!(e["Node"]["Node"], "vm-7");
    assert_eq!(e["Node"]["Address"], "10.0.0.7");
    assert_eq!(e["Service"]["Address"], "");
    assert_eq!(e["Service"]["Weights"]["Passing"], 1);
    assert_eq!(e["Service"]["Meta"], serde_json::json!({}));
    assert_eq!(e["Checks"][1]["Status"], "passing");
}

#[tokio::test]
async fn unknown_service_is_an_empty_array_and_consul_lists_its_server() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let g = get(&c, health_url(&fake, "nope", "")).await;
    assert_consul_headers(&g);
    assert_eq!(g.json(), serde_json::json!([]));
    assert_eq!(g.index, Some(1), "never 0");

    let g = get(&c, health_url(&fake, "consul", "")).await;
    let v = g.json();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["Service"]["Port"], 8300);
    assert_eq!(v[0]["Node"]["Node"], "fake-agent");
}

#[tokio::test]
async fn indexes_move_only_with_changes_that_affect_them() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let catalog = format!("{}/v1/catalog/services", fake.url());
    let idx = |g: Got| g.index.unwrap();

    let c0 = idx(get(&c, catalog.clone()).await);
    assert_eq!(c0, 1, "a fresh catalog answers 1, never 0");

    fake.register("dc1", Instance::new("a", "a-1", "10.0.0.1", 80));
    let c1 = idx(get(&c, catalog.clone()).await);
    let a1 = idx(get(&c, health_url(&fake, "a", "")).await);
    assert!(c1 > c0);
    assert_eq!(a1, c1, "both moved with the same raft index");
    assert_eq!(idx(get(&c, health_url(&fake, "b", "")).await), 1);

    fake.set_health("dc1", "a-1", Health::Critical);
    let a2 = idx(get(&c, health_url(&fake, "a", "")).await);
    assert!(a2 > a1, "health change moves the service's index");
    assert_eq!(
        idx(get(&c, catalog.clone()).await),
        c1,
        "health change does not move the catalog"
    );

    // Idempotent writes change nothing.
    fake.set_health("dc1", "a-1", Health::Critical);
    fake.register(
        "dc1",
        Instance::new("a", "a-1", "10.0.0.1", 80).health(Health::Critical),
    );
    assert_eq!(idx(get(&c, health_url(&fake, "a", "")).await), a2);
    assert_eq!(idx(get(&c, catalog.clone()).await), c1);

    // Another datacenter's changes do not move this one's indexes.
    fake.register("dc2", Instance::new("a", "a-9", "10.9.0.1", 80));
    assert_eq!(idx(get(&c, catalog.clone()).await), c1);
    assert_eq!(idx(get(&c, health_url(&fake, "a", "")).await), a2);

    // Another service's registration moves the catalog but not this service.
    fake.register("dc1", Instance::new("b", "b-1", "10.0.0.2", 80));
    let c2 = idx(get(&c, catalog.clone()).await);
    assert!(c2 > c1);
    assert_eq!(idx(get(&c, health_url(&fake, "a", "")).await), a2);

    fake.deregister("dc1", "a-1");
    let c3 = idx(get(&c, catalog.clone()).await);
    let g = get(&c, health_url(&fake, "a", "")).await;
    assert!(c3 > c2);
    assert_eq!(g.index, Some(c3));
    assert_eq!(g.json(), serde_json::json!([]));
    assert!(get(&c, catalog.clone()).await.json().get("a").is_none());
    assert_eq!(fake.index("dc1", None), c3);
    assert_eq!(fake.raft_index(), c3);
}

#[tokio::test]
async fn blocking_query_parks_until_a_change() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.register("dc1", Instance::new("web", "web-1", "10.0.0.1", 80));
    let first = get(&c, health_url(&fake, "web", "")).await;
    let i1 = first.index.unwrap();

    let url = health_url(&fake, "web", &format!("?index={i1}&wait=30s"));
    let started = Instant::now();
    let pending = tokio::spawn(send(c.get(url)));
    until("the query to park", || fake.parked_queries() == 1).await;
    assert!(!pending.is_finished());

    fake.register("dc1", Instance::new("web", "web-2", "10.0.0.2", 80));
    let g = answer(pending).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(g.index.unwrap() > i1);
    assert_eq!(ids(&g.json()), ["web-1", "web-2"]);
    assert_eq!(fake.parked_queries(), 0);

    // The catalog parks and wakes the same way.
    let ci = fake.index("dc1", None);
    let url = format!("{}/v1/catalog/services?index={ci}&wait=30s", fake.url());
    let pending = tokio::spawn(send(c.get(url)));
    until("the catalog query to park", || fake.parked_queries() == 1).await;
    fake.register("dc1", Instance::new("db", "db-1", "10.0.0.3", 5432));
    let g = answer(pending).await;
    assert!(g.index.unwrap() > ci);
    assert!(g.json().get("db").is_some());
}

#[tokio::test]
async fn blocking_query_returns_after_wait_with_the_same_index() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.register("dc1", Instance::new("a", "a-1", "10.0.0.1", 80));
    let i = fake.index("dc1", Some("a"));

    let started = Instant::now();
    let g = get(
        &c,
        health_url(&fake, "a", &format!("?index={i}&wait=300ms")),
    )
    .await;
    let took = started.elapsed();
    assert_eq!(g.index, Some(i));
    assert_eq!(ids(&g.json()), ["a-1"]);
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");

    // A change of another service does not wake it.
    let url = health_url(&fake, "a", &format!("?index={i}&wait=500ms"));
    let started = Instant::now();
    let pending = tokio::spawn(send(c.get(url)));
    until("the query to park", || fake.parked_queries() == 1).await;
    fake.register("dc1", Instance::new("b", "b-1", "10.0.0.2", 80));
    let g = answer(pending).await;
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(g.index, Some(i));

    // A stale index answers at once; index=0 does not block.
    fake.register("dc1", Instance::new("a", "a-2", "10.0.0.3", 80));
    let started = Instant::now();
    let g = get(&c, health_url(&fake, "a", &format!("?index={i}&wait=30s"))).await;
    assert!(g.index.unwrap() > i);
    let g0 = get(&c, health_url(&fake, "a", "?index=0&wait=30s")).await;
    assert_eq!(g0.index, g.index);
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[tokio::test]
async fn passing_keeps_only_instances_whose_checks_all_pass() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.register("dc1", Instance::new("web", "p", "10.0.0.1", 80));
    fake.register(
        "dc1",
        Instance::new("web", "w", "10.0.0.2", 80).health(Health::Warning),
    );
    fake.register(
        "dc1",
        Instance::new("web", "x", "10.0.0.3", 80).health(Health::Critical),
    );
    let all = get(&c, health_url(&fake, "web", "")).await;
    let statuses: Vec<_> = all
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["Checks"][1]["Status"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids(&all.json()), ["p", "w", "x"]);
    assert_eq!(statuses, ["passing", "warning", "critical"]);

    let passing = get(&c, health_url(&fake, "web", "?passing")).await;
    assert_eq!(ids(&passing.json()), ["p"]);
    assert_eq!(
        passing.index, all.index,
        "filtering does not change the index"
    );
    let g = get(&c, health_url(&fake, "web", "?passing=true")).await;
    assert_eq!(ids(&g.json()), ["p"]);
    let g = get(&c, health_url(&fake, "web", "?passing=false")).await;
    assert_eq!(ids(&g.json()).len(), 3);

    fake.set_health("dc1", "x", Health::Passing);
    let g = get(&c, health_url(&fake, "web", "?passing")).await;
    assert_eq!(ids(&g.json()), ["p", "x"]);
}

#[tokio::test]
async fn tag_and_filter_parameters() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.register(
        "dc1",
        Instance::new("web", "a", "10.0.0.1", 80)
            .tags(&["canary"])
            .meta("version", "v2"),
    );
    fake.register(
        "dc1",
        Instance::new("web", "b", "10.0.0.2", 81).meta("version", "v1"),
    );
    let url = health_url(&fake, "web", "");
    let q = |f: &str| c.get(&url).query(&[("filter", f.to_string())]);

    let g = send(q(r#"Service.Meta.version == "v2""#)).await.unwrap();
    assert_eq!(ids(&g.json()), ["a"]);
    let g = send(q(r#""canary" in Service.Tags"#)).await.unwrap();
    assert_eq!(ids(&g.json()), ["a"]);
    let g = send(q(r#""canary" not in Service.Tags and Service.Port == 81"#))
        .await
        .unwrap();
    assert_eq!(ids(&g.json()), ["b"]);
    let g = send(q(r#"Service.Meta.version == "v9" or Service.Port == 80"#))
        .await
        .unwrap();
    assert_eq!(ids(&g.json()), ["a"]);
    let g = send(q("Service.Tags is empty")).await.unwrap();
    assert_eq!(ids(&g.json()), ["b"]);
    let g = send(q(r#"(Service.Port == 80)"#)).await.unwrap();
    assert_eq!(
        g.status, 400,
        "unsupported filters are refused, not ignored"
    );

    let g = get(&c, health_url(&fake, "web", "?tag=canary")).await;
    assert_eq!(ids(&g.json()), ["a"]);
}

#[tokio::test]
async fn reset_index_makes_the_index_go_backwards() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    for n in 0..5 {
        fake.register("dc1", Instance::new("a", &format!("a-{n}"), "10.0.0.1", 80));
    }
    let old = fake.index("dc1", Some("a"));
    assert!(old >= 5);

    // A query parked on the current index is woken by the reset and sees the lower index.
    let url = health_url(&fake, "a", &format!("?index={old}&wait=30s"));
    let pending = tokio::spawn(send(c.get(url)));
    until("the query to park", || fake.parked_queries() == 1).await;
    fake.reset_index(2);
    let g = answer(pending).await;
    assert_eq!(g.index, Some(2));
    assert_eq!(ids(&g.json()).len(), 5, "data is kept");

    // A query with the old (now higher) index answers at once.
    let started = Instant::now();
    let g = get(
        &c,
        health_url(&fake, "a", &format!("?index={old}&wait=30s")),
    )
    .await;
    assert_eq!(g.index, Some(2));
    assert!(started.elapsed() < Duration::from_secs(5));
    let g = get(&c, format!("{}/v1/catalog/services", fake.url())).await;
    assert_eq!(g.index, Some(2));

    // Later changes continue from there.
    fake.register("dc1", Instance::new("a", "a-9", "10.0.0.1", 80));
    assert_eq!(fake.index("dc1", Some("a")), 3);

    // Strict mode (Consul's servers): the higher index blocks for the whole wait.
    fake.set_strict_min_index(true);
    let started = Instant::now();
    let g = get(
        &c,
        health_url(&fake, "a", &format!("?index={old}&wait=300ms")),
    )
    .await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(g.index, Some(3));

    // Never 0, and the next change still moves the index.
    fake.reset_index(0);
    let g = get(&c, health_url(&fake, "a", "")).await;
    assert_eq!(g.index, Some(1));
    fake.register("dc1", Instance::new("a", "a-10", "10.0.0.1", 80));
    assert_eq!(fake.index("dc1", Some("a")), 2);
}

#[tokio::test]
async fn the_first_registration_wakes_a_query_on_index_1() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let url = format!("{}/v1/catalog/services?index=1&wait=30s", fake.url());
    let pending = tokio::spawn(send(c.get(url)));
    until("the query to park", || fake.parked_queries() == 1).await;
    fake.register("dc1", Instance::new("a", "a-1", "10.0.0.1", 80));
    let g = answer(pending).await;
    assert!(g.index.unwrap() > 1);
    assert!(g.json().get("a").is_some());
}

#[tokio::test]
async fn spurious_wakeup_returns_the_same_index_and_data() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.register("dc1", Instance::new("a", "a-1", "10.0.0.1", 80));
    let before = get(&c, health_url(&fake, "a", "")).await;
    let i = before.index.unwrap();

    let url = health_url(&fake, "a", &format!("?index={i}&wait=60s"));
    let url2 = format!("{}/v1/catalog/services?index={i}&wait=60s", fake.url());
    let p1 = tokio::spawn(send(c.get(url)));
    let p2 = tokio::spawn(send(c.get(url2)));
    until("two queries to park", || fake.parked_queries() == 2).await;
    fake.spurious_wakeup();
    let g = answer(p1).await;
    assert_eq!(g.index, Some(i));
    assert_eq!(g.body, before.body);
    let g2 = answer(p2).await;
    assert_eq!(g2.index, Some(fake.index("dc1", None)));
    assert_eq!(fake.parked_queries(), 0);
}

#[tokio::test]
async fn fail_next_answers_no_leader() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.fail_next(2);
    for _ in 0..2 {
        let g = get(&c, health_url(&fake, "a", "")).await;
        assert_eq!(g.status, 500);
        assert_eq!(g.body, NO_LEADER);
        assert_eq!(g.index, None, "errors carry no index, as with Consul");
    }
    let g = get(&c, health_url(&fake, "a", "")).await;
    assert_eq!(g.status, 200);
    assert_eq!(fake.requests(), 3);
}

#[tokio::test]
async fn malformed_answers_200_with_invalid_json() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.register("dc1", Instance::new("a", "a-1", "10.0.0.1", 80));
    fake.set_malformed(true);
    for url in [
        health_url(&fake, "a", ""),
        format!("{}/v1/catalog/services", fake.url()),
        format!("{}/v1/agent/self", fake.url()),
    ] {
        let g = get(&c, url).await;
        assert_consul_headers(&g);
        assert!(
            serde_json::from_str::<Value>(&g.body).is_err(),
            "{}",
            g.body
        );
    }
    // Malformed answers do not block.
    let i = fake.index("dc1", Some("a"));
    let started = Instant::now();
    let g = get(&c, health_url(&fake, "a", &format!("?index={i}&wait=30s"))).await;
    assert_eq!(g.status, 200);
    assert!(started.elapsed() < Duration::from_secs(5));
    fake.set_malformed(false);
    let g = get(&c, health_url(&fake, "a", "")).await;
    assert_eq!(ids(&g.json()), ["a-1"]);
}

#[tokio::test]
async fn hang_never_answers_until_turned_off() {
    let fake = FakeConsul::start("dc1").await;
    fake.set_hang(true);
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let err = send(impatient.get(health_url(&fake, "a", "")))
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err:?}");
    // The client gave up and closed its connection: the fake notices.
    until("the abandoned connection to close", || {
        fake.open_connections() == 0
    })
    .await;

    // A held request continues once the hang ends.
    let c = client();
    let pending = tokio::spawn(send(c.get(format!("{}/v1/agent/self", fake.url()))));
    until("the request to arrive", || fake.requests() == 2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished());
    fake.set_hang(false);
    let g = answer(pending).await;
    assert_eq!(g.status, 200);
}

#[tokio::test]
async fn unreachable_datacenter_answers_no_path() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.set_dc_unreachable("dc2", true);
    let g = get(&c, health_url(&fake, "a", "?dc=dc2")).await;
    assert_eq!(g.status, 500);
    assert_eq!(g.body, NO_PATH_TO_DC);
    let g = get(&c, format!("{}/v1/catalog/services?dc=dc2", fake.url())).await;
    assert_eq!(g.status, 500);
    assert_eq!(get(&c, health_url(&fake, "a", "?dc=dc1")).await.status, 200);
    assert_eq!(get(&c, health_url(&fake, "a", "")).await.status, 200);
    fake.set_dc_unreachable("dc2", false);
    assert_eq!(get(&c, health_url(&fake, "a", "?dc=dc2")).await.status, 200);
}

#[tokio::test]
async fn require_token_checks_header_query_and_bearer() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let url = health_url(&fake, "a", "");
    fake.require_token(Some("s3cret"));
    let g = get(&c, url.clone()).await;
    assert_eq!(g.status, 403);
    assert_eq!(g.body, ACL_NOT_FOUND);
    let g = send(c.get(&url).header("X-Consul-Token", "wrong"))
        .await
        .unwrap();
    assert_eq!(g.status, 403);
    let g = send(c.get(&url).header("X-Consul-Token", "s3cret"))
        .await
        .unwrap();
    assert_eq!(g.status, 200);
    let g = send(c.get(&url).bearer_auth("s3cret")).await.unwrap();
    assert_eq!(g.status, 200);
    let g = get(&c, health_url(&fake, "a", "?token=s3cret")).await;
    assert_eq!(g.status, 200);
    let g = get(&c, format!("{}/v1/agent/self", fake.url())).await;
    assert_eq!(g.status, 403);
    fake.require_token(None);
    assert_eq!(get(&c, url).await.status, 200);
}

#[tokio::test]
async fn bad_parameters_and_paths() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let g = get(&c, health_url(&fake, "a", "?index=abc")).await;
    assert_eq!(g.status, 400);
    let g = get(&c, health_url(&fake, "a", "?index=1&wait=soon")).await;
    assert_eq!(g.status, 400);
    let g = get(&c, format!("{}/v1/kv/x", fake.url())).await;
    assert_eq!(g.status, 404);
    let g = send(c.put(health_url(&fake, "a", ""))).await.unwrap();
    assert_eq!(g.status, 405);
}

#[tokio::test]
async fn latency_delays_every_response() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.set_latency(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(get(&c, health_url(&fake, "a", "")).await.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    fake.fail_next(1);
    let started = Instant::now();
    assert_eq!(get(&c, health_url(&fake, "a", "")).await.status, 500);
    assert!(started.elapsed() >= Duration::from_millis(300));
}

#[tokio::test]
async fn stop_drops_connections_and_restart_keeps_data_and_port() {
    let mut fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.register("dc1", Instance::new("a", "a-1", "10.0.0.1", 80));
    let i = fake.index("dc1", Some("a"));
    let addr = fake.addr;

    let url = health_url(&fake, "a", &format!("?index={i}&wait=60s"));
    let parked = tokio::spawn(send(c.get(url)));
    until("the query to park", || fake.parked_queries() == 1).await;
    fake.set_hang(true);
    let hanging = tokio::spawn(send(c.get(format!("{}/v1/agent/self", fake.url()))));
    until("the hanging request", || fake.requests() == 2).await;

    tokio::time::timeout(LIMIT, fake.stop()).await.unwrap();
    assert_eq!(fake.open_connections(), 0);
    assert_eq!(fake.parked_queries(), 0);
    for p in [parked, hanging] {
        let r = tokio::time::timeout(LIMIT, p).await.unwrap().unwrap();
        assert!(r.is_err(), "a request cut by stop() must fail: {r:?}");
    }
    let fresh = client();
    let r = send(fresh.get(health_url(&fake, "a", ""))).await;
    assert!(r.unwrap_err().is_connect(), "nothing listens while stopped");

    // Changes made while stopped are visible after the restart.
    fake.register("dc1", Instance::new("a", "a-2", "10.0.0.2", 80));
    fake.set_hang(false);
    tokio::time::timeout(LIMIT, fake.restart()).await.unwrap();
    assert_eq!(fake.addr, addr);
    let g = get(&client(), health_url(&fake, "a", "")).await;
    assert_eq!(ids(&g.json()), ["a-1", "a-2"]);
    assert!(g.index.unwrap() > i);
}

#[tokio::test]
async fn open_connections_are_counted() {
    let fake = FakeConsul::start("dc1").await;
    assert_eq!(fake.open_connections(), 0);
    let mut socks = Vec::new();
    for _ in 0..3 {
        socks.push(tokio::net::TcpStream::connect(fake.addr).await.unwrap());
    }
    until("three open connections", || fake.open_connections() == 3).await;
    assert_eq!(fake.max_open_connections(), 3);
    drop(socks);
    until("the connections to close", || fake.open_connections() == 0).await;
    assert_eq!(fake.max_open_connections(), 3, "a high-water mark");

    // Keep-alive: sequential requests of one client share one connection.
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(get(&c, health_url(&fake, "a", "")).await.status, 200);
    }
    assert_eq!(fake.max_open_connections(), 1);
    assert_eq!(fake.open_connections(), 1);
    drop(c);
    until("the pooled connection to close", || {
        fake.open_connections() == 0
    })
    .await;
}

#[tokio::test]
async fn requests_are_counted_by_path() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    get(&c, health_url(&fake, "a", "?passing")).await;
    get(&c, health_url(&fake, "b", "")).await;
    get(&c, format!("{}/v1/catalog/services", fake.url())).await;
    assert_eq!(fake.requests(), 3);
    assert_eq!(fake.requests_for("/v1/health/service/"), 2);
    assert_eq!(fake.requests_for("/v1/health/service/a"), 1);
    assert_eq!(fake.requests_for("/v1/catalog/"), 1);
    assert_eq!(fake.requests_for("/v1/agent/"), 0);
}

#[test]
fn wait_parsing_and_bounds() {
    assert_eq!(parse_go_duration("5s"), Some(Duration::from_secs(5)));
    assert_eq!(parse_go_duration("10m"), Some(Duration::from_secs(600)));
    assert_eq!(parse_go_duration("100ms"), Some(Duration::from_millis(100)));
    assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
    assert_eq!(parse_go_duration("1.5s"), Some(Duration::from_millis(1500)));
    assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
    for bad in ["", "5", "s", "5x", "-5s", "five"] {
        assert_eq!(parse_go_duration(bad), None, "{bad:?}");
    }
    let five = Duration::from_secs(300);
    let ten = Duration::from_secs(600);
    for _ in 0..50 {
        let w = effective_wait(None);
        assert!(w >= five && w <= five + five / 16, "{w:?}");
        let w = effective_wait(Some(Duration::ZERO));
        assert!(w >= five && w <= five + five / 16, "{w:?}");
        let w = effective_wait(Some(Duration::from_secs(3600)));
        assert!(w >= ten && w <= ten + ten / 16, "{w:?}");
        let w = effective_wait(Some(Duration::from_secs(16)));
        assert!(
            w >= Duration::from_secs(16) && w <= Duration::from_secs(17),
            "{w:?}"
        );
    }
}

#[tokio::test]
async fn health_state_lists_every_check_and_blocks_on_changes() {
    let consul = FakeConsul::start("dc1").await;
    consul.register("dc1", Instance::new("orders", "o1", "10.0.0.1", 80));
    consul.register("dc1", Instance::new("billing", "b1", "10.0.0.1", 81));
    let http = reqwest::Client::new();
    let url = format!("{}/v1/health/state/any", consul.url());
    let r = http.get(&url).send().await.unwrap();
    let index: u64 = r.headers()["X-Consul-Index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let checks: Vec<serde_json::Value> = r.json().await.unwrap();
    // Each instance runs on its own node: a serfHealth check per node, plus one service
    // check per instance.
    let service_checks: Vec<_> = checks.iter().filter(|c| c["ServiceName"] != "").collect();
    assert_eq!(service_checks.len(), 2);
    assert!(checks.iter().any(|c| c["CheckID"] == "serfHealth"));
    let critical = http
        .get(format!("{}/v1/health/state/critical", consul.url()))
        .send()
        .await
        .unwrap()
        .json::<Vec<serde_json::Value>>()
        .await
        .unwrap();
    assert!(critical.is_empty());
    // A blocking query returns when a check changes, with a higher index.
    let parked = {
        let (http, url) = (http.clone(), format!("{url}?index={index}&wait=5s"));
        tokio::spawn(async move { http.get(url).send().await.unwrap() })
    };
    tokio::time::timeout(Duration::from_secs(5), async {
        while consul.parked_queries() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    consul.set_health("dc1", "b1", Health::Critical);
    let r = tokio::time::timeout(Duration::from_secs(5), parked)
        .await
        .unwrap()
        .unwrap();
    let after: u64 = r.headers()["X-Consul-Index"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(after > index);
    let checks: Vec<serde_json::Value> = r.json().await.unwrap();
    assert!(
        checks
            .iter()
            .any(|c| c["ServiceName"] == "billing" && c["Status"] == "critical")
    );
}

// ---- Catalog writes (`PUT /v1/catalog/register`, `PUT /v1/catalog/deregister`) and the
// ---- catalog reads that show them.

async fn put(c: &reqwest::Client, url: String, body: &Value) -> Got {
    send(c.put(&url).json(body)).await.unwrap()
}

fn register_url(fake: &FakeConsul) -> String {
    format!("{}/v1/catalog/register", fake.url())
}

fn deregister_url(fake: &FakeConsul) -> String {
    format!("{}/v1/catalog/deregister", fake.url())
}

/// A pod registered the way consul-k8s catalog sync does: on the synthetic node
/// `k8s-sync`, with Kubernetes meta.
fn pod(service: &str, id: &str, ip: &str) -> Value {
    json!({
        "Node": "k8s-sync",
        "Address": "127.0.0.1",
        "NodeMeta": {"external-source": "kubernetes"},
        "Service": {
            "ID": id,
            "Service": service,
            "Tags": ["k8s"],
            "Address": ip,
            "Port": 8080,
            "Meta": {"external-source": "kubernetes", "k8s-namespace": "default", "pod-name": id}
        }
    })
}

/// Asserts a successful write: `200 true`, JSON, and no blocking-query headers.
fn assert_written(g: &Got) {
    assert_eq!(g.status, 200, "{}", g.body);
    assert_eq!(g.body, "true");
    assert_eq!(g.header("Content-Type"), Some("application/json"));
    assert_eq!(g.index, None, "writes carry no X-Consul-Index");
}

#[tokio::test]
async fn http_registration_is_visible_in_health_catalog_and_instances() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    assert_written(&put(&c, register_url(&fake), &pod("web", "web-abc", "10.1.0.7")).await);

    let g = get(&c, health_url(&fake, "web", "")).await;
    assert_consul_headers(&g);
    let v = g.json();
    assert_eq!(ids(&v), ["web-abc"]);
    let e = &v[0];
    assert_eq!(e["Node"]["Node"], "k8s-sync");
    assert_eq!(e["Node"]["Address"], "127.0.0.1");
    assert_eq!(e["Node"]["Datacenter"], "dc1");
    assert_eq!(e["Node"]["Meta"], json!({"external-source": "kubernetes"}));
    assert_eq!(e["Node"]["ID"].as_str().unwrap().len(), 36);
    let s = &e["Service"];
    assert_eq!(s["Service"], "web");
    assert_eq!(s["Tags"], json!(["k8s"]));
    assert_eq!(s["Address"], "10.1.0.7");
    assert_eq!(s["Port"], 8080);
    assert_eq!(
        s["Meta"],
        json!({"external-source": "kubernetes", "k8s-namespace": "default", "pod-name": "web-abc"})
    );
    assert_eq!(s["Weights"], json!({"Passing": 1, "Warning": 1}));
    // No checks: an empty list, which clients (and `?passing`) treat as passing.
    assert_eq!(e["Checks"], json!([]));
    assert_eq!(
        ids(&get(&c, health_url(&fake, "web", "?passing")).await.json()),
        ["web-abc"]
    );
    let g = get(
        &c,
        health_url(
            &fake,
            "web",
            "?filter=Service.Meta.pod-name%20%3D%3D%20web-abc",
        ),
    )
    .await;
    assert_eq!(ids(&g.json()), ["web-abc"]);

    let g = get(&c, format!("{}/v1/catalog/services", fake.url())).await;
    assert_eq!(g.json(), json!({"consul": [], "web": ["k8s"]}));

    // The Rust view reads the same store.
    let all = fake.instances("dc1");
    assert_eq!(all.len(), 1);
    let i = &all[0];
    assert_eq!((i.service.as_str(), i.id.as_str()), ("web", "web-abc"));
    assert_eq!(
        (i.node.as_str(), i.node_address.as_str()),
        ("k8s-sync", "127.0.0.1")
    );
    assert_eq!((i.address.as_str(), i.port), ("10.1.0.7", 8080));
    assert_eq!(i.tags, ["k8s"]);
    assert_eq!(
        i.meta.get("k8s-namespace").map(String::as_str),
        Some("default")
    );
    assert_eq!(i.health, Health::Passing);

    // `Datacenter` in the body picks the datacenter; `?dc=` does not (Consul's handler
    // never reads it on writes).
    let mut other = pod("web", "web-dc2", "10.2.0.1");
    other["Datacenter"] = json!("dc2");
    assert_written(&put(&c, register_url(&fake), &other).await);
    assert_written(
        &put(
            &c,
            format!("{}?dc=dc2", register_url(&fake)),
            &pod("web", "web-q", "10.1.0.8"),
        )
        .await,
    );
    assert_eq!(
        ids(&get(&c, health_url(&fake, "web", "?dc=dc2")).await.json()),
        ["web-dc2"]
    );
    assert_eq!(
        ids(&get(&c, health_url(&fake, "web", "")).await.json()),
        ["web-abc", "web-q"]
    );
    assert_eq!(fake.instances("dc2").len(), 1);
}

#[tokio::test]
async fn registered_checks_decide_health() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let mut body = pod("web", "web-1", "10.1.0.1");
    body["Check"] = json!({
        "CheckID": "web-1:ready",
        "Name": "Kubernetes readiness",
        "Status": "critical",
        "ServiceID": "web-1",
        "Output": "pod not ready"
    });
    assert_written(&put(&c, register_url(&fake), &body).await);
    assert_written(&put(&c, register_url(&fake), &pod("web", "web-2", "10.1.0.2")).await);

    let v = get(&c, health_url(&fake, "web", "")).await.json();
    assert_eq!(ids(&v), ["web-1", "web-2"]);
    let checks = v[0]["Checks"].as_array().unwrap();
    assert_eq!(checks.len(), 1);
    assert_eq!(checks[0]["CheckID"], "web-1:ready");
    assert_eq!(checks[0]["Status"], "critical");
    assert_eq!(checks[0]["ServiceID"], "web-1");
    assert_eq!(checks[0]["ServiceName"], "web");
    assert_eq!(checks[0]["ServiceTags"], json!(["k8s"]));
    assert_eq!(checks[0]["Output"], "pod not ready");
    assert_eq!(v[1]["Checks"], json!([]));
    assert_eq!(
        ids(&get(&c, health_url(&fake, "web", "?passing")).await.json()),
        ["web-2"]
    );
    let critical = get(&c, format!("{}/v1/health/state/critical", fake.url())).await;
    let critical = critical.json();
    assert_eq!(critical.as_array().unwrap().len(), 1);
    assert_eq!(critical[0]["CheckID"], "web-1:ready");
    let health: Vec<_> = fake.instances("dc1").iter().map(|i| i.health).collect();
    assert_eq!(health, [Health::Critical, Health::Passing]);

    // The check turns passing: an update of the same check ID.
    body["Check"]["Status"] = json!("passing");
    assert_written(&put(&c, register_url(&fake), &body).await);
    let v = get(&c, health_url(&fake, "web", "?passing")).await.json();
    assert_eq!(ids(&v), ["web-1", "web-2"]);

    // A node-level check (no ServiceID) counts for every instance on the node; a check
    // without Status is critical, as in Consul's state store.
    let node_check = json!({
        "Node": "k8s-sync",
        "Address": "127.0.0.1",
        "NodeMeta": {"external-source": "kubernetes"},
        "SkipNodeUpdate": true,
        "Checks": [{"Name": "node-alive"}]
    });
    assert_written(&put(&c, register_url(&fake), &node_check).await);
    assert_eq!(
        get(&c, health_url(&fake, "web", "?passing")).await.json(),
        json!([])
    );
    let v = get(&c, health_url(&fake, "web", "")).await.json();
    assert_eq!(v[1]["Checks"][0]["CheckID"], "node-alive");
    assert_eq!(v[1]["Checks"][0]["Status"], "critical");
    assert!(
        fake.instances("dc1")
            .iter()
            .all(|i| i.health == Health::Critical)
    );

    // Deregistering that check by CheckID restores them.
    let g = put(
        &c,
        deregister_url(&fake),
        &json!({"Node": "k8s-sync", "CheckID": "node-alive"}),
    )
    .await;
    assert_written(&g);
    assert_eq!(
        ids(&get(&c, health_url(&fake, "web", "?passing")).await.json()),
        ["web-1", "web-2"]
    );
}

#[tokio::test]
async fn registration_moves_indexes_and_wakes_parked_queries() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let first = get(&c, health_url(&fake, "x", "")).await;
    assert_eq!(first.index, Some(1));
    let catalog = fake.index("dc1", None);

    let url = health_url(&fake, "x", "?index=1&wait=30s");
    let started = Instant::now();
    let pending = tokio::spawn(send(c.get(url)));
    until("the query to park", || fake.parked_queries() == 1).await;
    assert_written(&put(&c, register_url(&fake), &pod("x", "x-1", "10.1.0.1")).await);
    let g = answer(pending).await;
    assert!(started.elapsed() < Duration::from_secs(10));
    let i1 = g.index.unwrap();
    assert!(i1 > 1);
    assert_eq!(ids(&g.json()), ["x-1"]);
    assert_eq!(i1, fake.raft_index());
    assert!(fake.index("dc1", None) > catalog, "the catalog moved too");
    assert_eq!(fake.node_index("dc1", "k8s-sync"), i1);
    assert_eq!(
        fake.index("dc1", Some("y")),
        1,
        "other services did not move"
    );

    // An identical registration changes nothing: no index moves, a parked query sleeps on.
    let raft = fake.raft_index();
    let url = health_url(&fake, "x", &format!("?index={i1}&wait=500ms"));
    let started = Instant::now();
    let pending = tokio::spawn(send(c.get(url)));
    until("the query to park", || fake.parked_queries() == 1).await;
    assert_written(&put(&c, register_url(&fake), &pod("x", "x-1", "10.1.0.1")).await);
    let g = answer(pending).await;
    assert!(
        started.elapsed() >= Duration::from_millis(500),
        "woken by a no-op"
    );
    assert_eq!(g.index, Some(i1));
    assert_eq!(fake.raft_index(), raft);
    assert_eq!(fake.node_index("dc1", "k8s-sync"), i1);
    assert_eq!(
        fake.catalog_registers(),
        2,
        "the idempotent write still counts"
    );

    // A real change (new tag) moves the service's index.
    let mut changed = pod("x", "x-1", "10.1.0.1");
    changed["Service"]["Tags"] = json!(["k8s", "canary"]);
    assert_written(&put(&c, register_url(&fake), &changed).await);
    let g = get(&c, health_url(&fake, "x", "")).await;
    assert!(g.index.unwrap() > i1);
    assert_eq!(g.json()[0]["Service"]["Tags"], json!(["k8s", "canary"]));
    // Create stays, modify moves.
    let s = &g.json()[0]["Service"];
    assert_eq!(s["CreateIndex"], i1);
    assert_eq!(s["ModifyIndex"], g.index.unwrap());
}

#[tokio::test]
async fn deregister_by_service_id_removes_only_that_instance() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    for (svc, id) in [("web", "web-1"), ("web", "web-2"), ("api", "api-1")] {
        assert_written(&put(&c, register_url(&fake), &pod(svc, id, "10.1.0.1")).await);
    }
    let api = fake.index("dc1", Some("api"));
    let web = fake.index("dc1", Some("web"));

    let g = put(
        &c,
        deregister_url(&fake),
        &json!({"Node": "k8s-sync", "ServiceID": "web-1"}),
    )
    .await;
    assert_written(&g);
    let g = get(&c, health_url(&fake, "web", "")).await;
    assert_eq!(ids(&g.json()), ["web-2"]);
    assert!(g.index.unwrap() > web);
    assert_eq!(
        fake.index("dc1", Some("api")),
        api,
        "another service is untouched"
    );
    assert_eq!(
        ids(&get(&c, health_url(&fake, "api", "")).await.json()),
        ["api-1"]
    );
    let ns = get(
        &c,
        format!("{}/v1/catalog/node-services/k8s-sync", fake.url()),
    )
    .await;
    let listed: Vec<_> = ns.json()["Services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["ID"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(listed, ["api-1", "web-2"]);

    // Deregistering what is absent succeeds and changes nothing.
    let raft = fake.raft_index();
    for body in [
        json!({"Node": "k8s-sync", "ServiceID": "web-1"}),
        json!({"Node": "nowhere", "ServiceID": "web-2"}),
        json!({"Node": "nowhere"}),
    ] {
        assert_written(&put(&c, deregister_url(&fake), &body).await);
    }
    assert_eq!(fake.raft_index(), raft);
    assert_eq!(fake.instances("dc1").len(), 2);
}

#[tokio::test]
async fn deregister_of_a_node_removes_everything_on_it() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let mut with_check = pod("web", "web-1", "10.1.0.1");
    with_check["Checks"] = json!([
        {"CheckID": "web-1:ready", "Status": "passing", "ServiceID": "web-1"},
        {"CheckID": "node-ok", "Status": "passing"}
    ]);
    assert_written(&put(&c, register_url(&fake), &with_check).await);
    assert_written(&put(&c, register_url(&fake), &pod("api", "api-1", "10.1.0.2")).await);
    let mut elsewhere = pod("web", "web-9", "10.9.0.1");
    elsewhere["Node"] = json!("other-node");
    assert_written(&put(&c, register_url(&fake), &elsewhere).await);

    let g = put(&c, deregister_url(&fake), &json!({"Node": "k8s-sync"})).await;
    assert_written(&g);
    assert_eq!(
        ids(&get(&c, health_url(&fake, "web", "")).await.json()),
        ["web-9"]
    );
    assert_eq!(
        get(&c, health_url(&fake, "api", "")).await.json(),
        json!([])
    );
    let cat = get(&c, format!("{}/v1/catalog/services", fake.url()))
        .await
        .json();
    assert_eq!(cat, json!({"consul": [], "web": ["k8s"]}));
    let checks = get(&c, format!("{}/v1/health/state/any", fake.url()))
        .await
        .json();
    assert_eq!(checks, json!([]), "the node's checks went with it");
    let g = get(
        &c,
        format!("{}/v1/catalog/node-services/k8s-sync", fake.url()),
    )
    .await;
    assert_consul_headers(&g);
    assert_eq!(g.json(), json!({"Node": null, "Services": null}));
    assert_eq!(g.index, Some(fake.raft_index()), "the deletion's index");
    let left: Vec<_> = fake.instances("dc1").into_iter().map(|i| i.id).collect();
    assert_eq!(left, ["web-9"]);

    let raft = fake.raft_index();
    assert_written(&put(&c, deregister_url(&fake), &json!({"Node": "k8s-sync"})).await);
    assert_eq!(fake.raft_index(), raft);
}

#[tokio::test]
async fn node_services_lists_the_node_and_blocks() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let url = format!("{}/v1/catalog/node-services/k8s-sync", fake.url());
    let g = get(&c, url.clone()).await;
    assert_consul_headers(&g);
    assert_eq!(g.index, Some(1));
    // An unknown node: 200 with a null node, as Consul answers (not 404).
    assert_eq!(g.json(), json!({"Node": null, "Services": null}));

    // A node without services: `Services` is null, as Consul encodes its nil slice.
    let bare = json!({"Node": "k8s-sync", "Address": "127.0.0.1", "NodeMeta": {"a": "b"}});
    assert_written(&put(&c, register_url(&fake), &bare).await);
    let g = get(&c, url.clone()).await;
    let v = g.json();
    assert_eq!(v["Node"]["Node"], "k8s-sync");
    assert_eq!(v["Node"]["Address"], "127.0.0.1");
    assert_eq!(v["Node"]["Datacenter"], "dc1");
    assert_eq!(v["Node"]["Meta"], json!({"a": "b"}));
    assert_eq!(v["Services"], Value::Null);
    let i = g.index.unwrap();
    assert!(i > 1);

    // A query parked on the node wakes when a service lands on it, not on another node.
    let pending = tokio::spawn(send(c.get(format!("{url}?index={i}&wait=30s"))));
    until("the query to park", || fake.parked_queries() == 1).await;
    let mut elsewhere = pod("web", "web-9", "10.9.0.1");
    elsewhere["Node"] = json!("other-node");
    assert_written(&put(&c, register_url(&fake), &elsewhere).await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished(), "woken by another node");
    assert_written(&put(&c, register_url(&fake), &pod("web", "web-2", "10.1.0.2")).await);
    assert_written(&put(&c, register_url(&fake), &pod("web", "web-1", "10.1.0.1")).await);
    let g = answer(pending).await;
    assert!(g.index.unwrap() > i);

    let g = get(&c, url.clone()).await;
    let v = g.json();
    assert_eq!(
        v["Node"]["Meta"],
        json!({"external-source": "kubernetes"}),
        "replaced"
    );
    let services = v["Services"].as_array().unwrap();
    assert_eq!(services.len(), 2);
    let s = &services[0];
    assert_eq!(s["ID"], "web-1", "by service ID");
    assert_eq!(s["Service"], "web");
    assert_eq!(s["Tags"], json!(["k8s"]));
    assert_eq!(s["Address"], "10.1.0.1");
    assert_eq!(s["Port"], 8080);
    assert_eq!(s["Meta"]["pod-name"], "web-1");
    assert_eq!(s["Weights"], json!({"Passing": 1, "Warning": 1}));
    assert_eq!(services[1]["ID"], "web-2");
    assert_eq!(g.index, Some(fake.node_index("dc1", "k8s-sync")));

    let g = get(&c, format!("{url}?filter=Meta.pod-name%20%3D%3D%20web-2")).await;
    let only: Vec<_> = g.json()["Services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["ID"].clone())
        .collect();
    assert_eq!(only, [json!("web-2")]);
}

#[tokio::test]
async fn catalog_service_lists_entries_and_blocks() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let url = format!("{}/v1/catalog/service/web", fake.url());
    let g = get(&c, url.clone()).await;
    assert_consul_headers(&g);
    assert_eq!(g.json(), json!([]));
    let i = g.index.unwrap();

    let pending = tokio::spawn(send(c.get(format!("{url}?index={i}&wait=30s"))));
    until("the query to park", || fake.parked_queries() == 1).await;
    assert_written(&put(&c, register_url(&fake), &pod("web", "web-1", "10.1.0.1")).await);
    let g = answer(pending).await;
    assert!(g.index.unwrap() > i);
    assert_eq!(
        g.index,
        Some(fake.index("dc1", Some("web"))),
        "shares health/service's index"
    );
    let v = g.json();
    let e = &v[0];
    assert_eq!(e["Node"], "k8s-sync");
    assert_eq!(e["Address"], "127.0.0.1");
    assert_eq!(e["Datacenter"], "dc1");
    assert_eq!(e["NodeMeta"], json!({"external-source": "kubernetes"}));
    assert_eq!(e["ServiceID"], "web-1");
    assert_eq!(e["ServiceName"], "web");
    assert_eq!(e["ServiceTags"], json!(["k8s"]));
    assert_eq!(e["ServiceAddress"], "10.1.0.1");
    assert_eq!(e["ServicePort"], 8080);
    assert_eq!(e["ServiceMeta"]["k8s-namespace"], "default");
    assert_eq!(e["ServiceWeights"], json!({"Passing": 1, "Warning": 1}));

    // Rust registrations are listed too; `tag` keeps entries with every given tag.
    fake.register(
        "dc1",
        Instance::new("web", "web-vm", "10.0.0.9", 80).tags(&["vm"]),
    );
    let all = get(&c, url.clone()).await.json();
    let sids: Vec<_> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ServiceID"].clone())
        .collect();
    assert_eq!(sids, [json!("web-1"), json!("web-vm")]);
    let g = get(&c, format!("{url}?tag=vm")).await.json();
    assert_eq!(g.as_array().unwrap().len(), 1);
    assert_eq!(g[0]["ServiceID"], "web-vm");
    assert_eq!(
        get(&c, format!("{url}?tag=vm&tag=k8s")).await.json(),
        json!([])
    );
    let g = get(
        &c,
        format!("{url}?filter=ServiceMeta.pod-name%20%3D%3D%20web-1"),
    )
    .await
    .json();
    assert_eq!(g.as_array().unwrap().len(), 1);
    assert_eq!(g[0]["ServiceID"], "web-1");
}

#[tokio::test]
async fn http_and_rust_writes_share_one_store() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.register(
        "dc1",
        Instance::new("db", "db-1", "10.0.0.5", 5432).on_node("vm-1", "10.0.0.5"),
    );
    let mut body = pod("web", "web-1", "10.0.0.5");
    body["Node"] = json!("vm-1");
    body["Address"] = json!("10.0.0.5");
    assert_written(&put(&c, register_url(&fake), &body).await);
    let ns = get(&c, format!("{}/v1/catalog/node-services/vm-1", fake.url()))
        .await
        .json();
    let listed: Vec<_> = ns["Services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["ID"].clone())
        .collect();
    assert_eq!(listed, [json!("db-1"), json!("web-1")]);
    let ids_now =
        |f: &FakeConsul| -> Vec<String> { f.instances("dc1").into_iter().map(|i| i.id).collect() };
    assert_eq!(ids_now(&fake), ["db-1", "web-1"]);

    // The Rust control acts on HTTP registrations: set_health gives an instance without
    // checks a TTL check; deregister removes it.
    fake.set_health("dc1", "web-1", Health::Warning);
    let v = get(&c, health_url(&fake, "web", "")).await.json();
    let statuses: Vec<_> = v[0]["Checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["Status"].clone())
        .collect();
    assert!(statuses.contains(&json!("warning")), "{statuses:?}");
    fake.deregister("dc1", "web-1");
    assert_eq!(ids_now(&fake), ["db-1"]);

    // HTTP deregisters what Rust registered.
    let g = put(
        &c,
        deregister_url(&fake),
        &json!({"Node": "vm-1", "ServiceID": "db-1"}),
    )
    .await;
    assert_written(&g);
    assert!(fake.instances("dc1").is_empty());
    assert_eq!(get(&c, health_url(&fake, "db", "")).await.json(), json!([]));
}

#[tokio::test]
async fn bad_writes_are_refused_as_consul_refuses_them() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    let raw = |url: String, body: &'static str| c.put(url).body(body);

    // Bodies that do not decode: 400.
    for body in [
        "{",
        "",
        "[]",
        r#"{"Node": 5}"#,
        r#"{"Node":"n","Address":"a","Service":{"Service":"s","Port":"80"}}"#,
    ] {
        let g = send(raw(register_url(&fake), body)).await.unwrap();
        assert_eq!(g.status, 400, "{body:?}: {}", g.body);
        assert!(g.body.starts_with("Request decode failed: "), "{}", g.body);
    }
    let g = send(raw(deregister_url(&fake), "nope")).await.unwrap();
    assert_eq!(g.status, 400);

    // Decoded but refused by the server: Consul's HTTP layer answers 500 with the message.
    let refused = [
        (json!({"Address": "10.0.0.1"}), "Must provide node"),
        (
            json!({"Node": "n"}),
            "Must provide address if SkipNodeUpdate is not set",
        ),
        (
            json!({"Node": "n", "Address": "10.0.0.1", "Service": {"ID": "x"}}),
            "Must provide service name (Service.Service) when service ID is provided",
        ),
        (
            json!({"Node": "n", "Address": "10.0.0.1", "Check": {"CheckID": "c", "ServiceID": "nope"}}),
            "Missing service registration",
        ),
    ];
    for (body, message) in refused {
        let g = put(&c, register_url(&fake), &body).await;
        assert_eq!(g.status, 500, "{body}: {}", g.body);
        assert_eq!(g.body, message);
    }
    let g = put(&c, deregister_url(&fake), &json!({"ServiceID": "x"})).await;
    assert_eq!((g.status, g.body.as_str()), (500, "Must provide node"));

    // Only PUT writes; only GET reads.
    assert_eq!(get(&c, register_url(&fake)).await.status, 405);
    assert_eq!(
        send(c.post(deregister_url(&fake))).await.unwrap().status,
        405
    );
    let g = send(c.put(format!("{}/v1/catalog/node-services/n", fake.url())))
        .await
        .unwrap();
    assert_eq!(g.status, 405);

    // Nothing was written or counted.
    assert_eq!(fake.raft_index(), 0);
    assert_eq!(
        (fake.catalog_registers(), fake.catalog_deregisters()),
        (0, 0)
    );
    assert!(fake.write_log().is_empty());
    assert!(fake.instances("dc1").is_empty());
}

#[tokio::test]
async fn writes_need_the_token_when_one_is_required() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.require_token(Some("s3cret"));
    let g = put(&c, register_url(&fake), &pod("web", "web-1", "10.1.0.1")).await;
    assert_eq!((g.status, g.body.as_str()), (403, ACL_NOT_FOUND));
    let g = send(
        c.put(register_url(&fake))
            .header("X-Consul-Token", "wrong")
            .json(&pod("web", "web-1", "10.1.0.1")),
    )
    .await
    .unwrap();
    assert_eq!(g.status, 403);
    assert!(fake.instances("dc1").is_empty());
    assert_eq!(fake.catalog_registers(), 0);

    let g = send(
        c.put(register_url(&fake))
            .header("X-Consul-Token", "s3cret")
            .json(&pod("web", "web-1", "10.1.0.1")),
    )
    .await
    .unwrap();
    assert_written(&g);
    let dereg = json!({"Node": "k8s-sync", "ServiceID": "web-1"});
    let g = put(&c, deregister_url(&fake), &dereg).await;
    assert_eq!(g.status, 403);
    assert_eq!(fake.instances("dc1").len(), 1);
    assert_written(
        &put(
            &c,
            format!("{}?token=s3cret", deregister_url(&fake)),
            &dereg,
        )
        .await,
    );
    assert!(fake.instances("dc1").is_empty());
    assert_eq!(
        (fake.catalog_registers(), fake.catalog_deregisters()),
        (1, 1)
    );
}

#[tokio::test]
async fn writes_respect_failure_modes() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    fake.fail_next(1);
    let g = put(&c, register_url(&fake), &pod("web", "web-1", "10.1.0.1")).await;
    assert_eq!((g.status, g.body.as_str()), (500, NO_LEADER));
    assert!(fake.instances("dc1").is_empty());

    fake.set_dc_unreachable("dc2", true);
    let mut body = pod("web", "web-2", "10.1.0.2");
    body["Datacenter"] = json!("dc2");
    let g = put(&c, register_url(&fake), &body).await;
    assert_eq!((g.status, g.body.as_str()), (500, NO_PATH_TO_DC));
    assert!(fake.instances("dc2").is_empty());
    let g = put(
        &c,
        deregister_url(&fake),
        &json!({"Node": "k8s-sync", "Datacenter": "dc2"}),
    )
    .await;
    assert_eq!(g.status, 500);
    assert_eq!(fake.raft_index(), 0);
    assert_eq!(
        (fake.catalog_registers(), fake.catalog_deregisters()),
        (0, 0)
    );

    // A hanging agent holds writes too; they go through once it answers again.
    fake.set_hang(true);
    let pending = tokio::spawn(send(
        c.put(register_url(&fake))
            .json(&pod("web", "web-3", "10.1.0.3")),
    ));
    until("the write to arrive", || {
        fake.requests_for("/v1/catalog/register") == 3
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!pending.is_finished());
    assert!(fake.instances("dc1").is_empty());
    fake.set_hang(false);
    let g = answer(pending).await;
    assert_written(&g);

    // Malformed: the write is applied and its answer garbled.
    fake.set_malformed(true);
    let g = put(&c, register_url(&fake), &pod("web", "web-4", "10.1.0.4")).await;
    assert_eq!(g.status, 200);
    assert!(
        serde_json::from_str::<Value>(&g.body).is_err(),
        "{}",
        g.body
    );
    fake.set_malformed(false);
    let left: Vec<_> = fake.instances("dc1").into_iter().map(|i| i.id).collect();
    assert_eq!(left, ["web-3", "web-4"]);
}

#[tokio::test]
async fn write_counters_and_log() {
    let fake = FakeConsul::start("dc1").await;
    let c = client();
    assert_written(&put(&c, register_url(&fake), &pod("web", "web-1", "10.1.0.1")).await);
    assert_written(&put(&c, register_url(&fake), &pod("web", "web-1", "10.1.0.1")).await);
    // Service.ID defaults to the name; a node-only registration has no service ID.
    let mut unnamed = pod("api", "", "10.1.0.2");
    unnamed["Service"].as_object_mut().unwrap().remove("ID");
    assert_written(&put(&c, register_url(&fake), &unnamed).await);
    assert_written(
        &put(
            &c,
            register_url(&fake),
            &json!({"Node": "bare", "Address": "10.0.0.1"}),
        )
        .await,
    );
    let dereg = json!({"Node": "k8s-sync", "ServiceID": "web-1"});
    assert_written(&put(&c, deregister_url(&fake), &dereg).await);
    assert_written(&put(&c, deregister_url(&fake), &dereg).await);
    assert_written(&put(&c, deregister_url(&fake), &json!({"Node": "bare"})).await);
    // Failed writes are not counted.
    assert_eq!(
        put(&c, register_url(&fake), &json!({"Node": "x"}))
            .await
            .status,
        500
    );
    // Nor are Rust ones.
    fake.register("dc1", Instance::new("db", "db-1", "10.0.0.5", 5432));

    assert_eq!(fake.catalog_registers(), 4);
    assert_eq!(fake.catalog_deregisters(), 3);
    let rec =
        |k: &str, n: &str, s: Option<&str>| (k.to_string(), n.to_string(), s.map(str::to_string));
    assert_eq!(
        fake.write_log(),
        [
            rec("register", "k8s-sync", Some("web-1")),
            rec("register", "k8s-sync", Some("web-1")),
            rec("register", "k8s-sync", Some("api")),
            rec("register", "bare", None),
            rec("deregister", "k8s-sync", Some("web-1")),
            rec("deregister", "k8s-sync", Some("web-1")),
            rec("deregister", "bare", None),
        ]
    );
    assert_eq!(
        ids(&get(&c, health_url(&fake, "api", "")).await.json()),
        ["api"]
    );
}
