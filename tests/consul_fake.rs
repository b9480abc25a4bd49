//! Tests of the fake Consul agent itself (`tests/support/consul_fake.rs`): the JSON shapes,
//! headers, blocking-query semantics and failure modes it claims, seen through a real HTTP
//! client. Every wait is bounded.
#![allow(clippy::unwrap_used)]

mod support {
    pub mod consul_fake;
}

use std::time::{Duration, Instant};

use serde_json::Value;
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
    let g = tokio::time::timeout(LIMIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
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
    let g = tokio::time::timeout(LIMIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
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
    let g = tokio::time::timeout(LIMIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
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
    let g = tokio::time::timeout(LIMIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
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
    let g = tokio::time::timeout(LIMIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
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
    let g = tokio::time::timeout(LIMIT, p1)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(g.index, Some(i));
    assert_eq!(g.body, before.body);
    let g2 = tokio::time::timeout(LIMIT, p2)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
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
    let g = tokio::time::timeout(LIMIT, pending)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
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
