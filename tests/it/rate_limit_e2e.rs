//! Local rate limits end to end: a real callee Envoy, configured by the real `meshbridge`
//! binary from a MeshService's `spec.rateLimit`, refuses the requests beyond a path's limit
//! with `429` and `x-meshbridge-reason: rate-limited` while other paths keep answering, stops
//! refusing once the manifest no longer sets the limit, and refuses every path under a
//! service-wide limit.
//!
//! The limits refill one request every twelve minutes or slower: no request of the test can
//! find a token refilled, however slow the machine.

use crate::support;

use std::time::Duration;

use serde_json::json;
use support::fixtures::{MeshService, manifests};
use support::{Backend, ControlPlane, Envoy, EnvoyOptions, HttpResponse, eventually, free_port};

/// How long a configuration change may take to reach the Envoys.
const LIMIT: Duration = Duration::from_secs(20);
/// The callee Envoy's count of refused requests.
const RATE_LIMITED_STAT: &str = "rate_limit_limited.http_local_rate_limit.rate_limited";
/// Requests admitted on `/limited` before the first refusal.
const BURST: usize = 5;

/// `orders`, whose instance is the Envoy on `ingress`, with `spec.rateLimit` when given.
fn orders(ingress: u16, rate_limit: Option<serde_json::Value>) -> MeshService {
    let service = MeshService::build("orders").endpoint("127.0.0.1", ingress);
    match rate_limit {
        Some(limit) => service.set("rateLimit", limit),
        None => service,
    }
}

/// `BURST` requests an hour on `/limited`, bursts of `BURST`.
fn limited_path() -> Option<serde_json::Value> {
    Some(json!({"paths": [{"prefix": "/limited", "requests": BURST, "per": "1h", "burst": BURST}]}))
}

/// A GET to `orders` through the caller's Envoy; the test fails on a transport error.
async fn get(caller: &Envoy, path: &str) -> HttpResponse {
    caller
        .call("orders", path)
        .await
        .unwrap_or_else(|e| panic!("GET orders{path}: {e}"))
}

fn is_hello(r: &HttpResponse) -> bool {
    r.status == 200 && r.body.starts_with("hello from orders a")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_beyond_a_path_limit_get_429_with_the_reason_until_the_limit_is_removed() {
    let app = Backend::start("orders", "a").await;
    let ingress = free_port();
    let frontend = MeshService::build("frontend").dependency("orders");
    let cp = ControlPlane::start(
        &manifests(&[&frontend, &orders(ingress, limited_path())]),
        &[],
    )
    .await;
    let callee = Envoy::start(&cp, EnvoyOptions::callee("orders", ingress, app.port)).await;
    let caller = Envoy::start(&cp, EnvoyOptions::caller("frontend")).await;
    // The callee's ingress serves: its routes, limits included, are in place (Envoy
    // activates a listener only once its route configuration arrived).
    caller
        .wait_call("orders", "orders answering through its ingress", is_hello)
        .await;

    // The burst is admitted, the next request refused by the callee's proxy, with the
    // reason and the service named, through the caller's proxy unchanged.
    for i in 0..BURST {
        let r = get(&caller, "/limited").await;
        assert!(is_hello(&r), "request {i} within the burst: {r:?}");
    }
    let refused = get(&caller, "/limited").await;
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(
        refused.header("x-meshbridge-reason"),
        Some("rate-limited"),
        "{refused:?}"
    );
    assert!(
        refused.body.contains("too many requests to orders"),
        "{refused:?}"
    );
    // The same path spelled otherwise is the same path: the ingress normalizes it first.
    let dotted = get(&caller, "/other/../limited/x").await;
    assert_eq!(dotted.status, 429, "{dotted:?}");
    // The callee's Envoy counts them.
    let stats = support::http_get(
        callee.admin_addr(),
        "localhost",
        "/stats?filter=http_local_rate_limit",
        &[],
    )
    .await
    .unwrap()
    .body;
    assert_eq!(callee.stat(RATE_LIMITED_STAT).await, Some(2), "{stats}");
    // Other paths have no limit.
    for _ in 0..BURST + 2 {
        let r = get(&caller, "/other").await;
        assert!(is_hello(&r), "{r:?}");
    }

    // The admin API shows the limit in force.
    let detail = cp.admin_json("/api/services/orders").await;
    assert_eq!(
        detail["rate_limit"]["paths"][0]["prefix"],
        serde_json::json!("/limited"),
        "{detail}"
    );
    assert_eq!(
        detail["rate_limit"]["paths"][0]["bucket"]["per"], "1h",
        "{detail}"
    );

    // The limit removed from the manifest, the path answers again.
    cp.write_manifests(&manifests(&[&frontend, &orders(ingress, None)]));
    eventually(LIMIT, "the limit lifted", || async {
        caller
            .call("orders", "/limited")
            .await
            .ok()
            .filter(is_hello)
    })
    .await;
    for _ in 0..BURST + 2 {
        let r = get(&caller, "/limited").await;
        assert!(is_hello(&r), "{r:?}");
    }

    // A service-wide limit takes every path: once it is in force, its bucket runs dry.
    let service_wide = json!({"requests": 1, "per": "1h", "burst": 1});
    cp.write_manifests(&manifests(&[
        &frontend,
        &orders(ingress, Some(service_wide)),
    ]));
    eventually(LIMIT, "the service-wide limit refusing", || async {
        caller
            .call("orders", "/anything")
            .await
            .ok()
            .filter(|r| r.status == 429)
    })
    .await;
    for path in ["/", "/limited", "/other"] {
        let r = get(&caller, path).await;
        assert_eq!(r.status, 429, "{path}: {r:?}");
        assert_eq!(
            r.header("x-meshbridge-reason"),
            Some("rate-limited"),
            "{r:?}"
        );
    }
}
