//! End to end: access control and mutual TLS between real Envoys configured by the real
//! `meshbridge` binary. Certificates are made by openssl (SAN URI
//! `spiffe://mesh.local/service/<name>`); callers are the callers' Envoys or test clients
//! connecting straight to a callee's ingress (plaintext, or TLS with a client certificate).
//!
//! What the tests rely on, in one place each so a rename is a one-line fix:
//! - the callee's Envoy stats: [`rbac_stat`];
//! - the callee's JSON access log fields: [`field`];
//! - the app's echo of the identity it was given: response header `x-client-name-seen`
//!   (`meshbridge::demo::serve_app`).

use crate::support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};
use support::fixtures::{AccessRule, Fixture, MeshService, manifests};
use support::static_envoy;
use support::{
    Backend, ControlPlane, Envoy, EnvoyOptions, HttpResponse, TlsError, TlsFiles, eventually,
    free_port, http_request, http_request_from, issue_identity, spiffe_id, tls_request,
    tls_request_with,
};

const TRUST_DOMAIN: &str = "mesh.local";
/// How long a configuration change may take to reach the Envoys.
const LIMIT: Duration = Duration::from_secs(20);
/// The header an app reads the caller from, and the app's echo of it.
const CLIENT_NAME: &str = "x-client-name";
const CLIENT_NAME_SEEN: &str = "x-client-name-seen";

/// The callee Envoy's access-control counters for `target`: `allowed`, `denied`,
/// `shadow_denied`.
fn rbac_stat(target: &str, outcome: &str) -> String {
    format!("http.ingress.rbac.{target}.{outcome}")
}

/// Field names of the callee Envoy's JSON access log lines.
mod field {
    /// The caller's service name, or `-`.
    pub const CALLER: &str = "caller";
    /// How the caller was identified: `mtls`, `source-ip`, `header` or `none`.
    pub const IDENTITY: &str = "identity";
    /// The HTTP status (a number).
    pub const STATUS: &str = "status";
    /// Envoy's response code details (`rbac_access_denied...` on a denial).
    pub const DETAILS: &str = "details";
    /// `allowed` / `denied` for a rule in `log` mode.
    pub const RBAC_SHADOW: &str = "rbac_shadow";
    pub const METHOD: &str = "method";
    pub const PATH: &str = "path";
}

// ---------------------------------------------------------------------------------------
// Set-up helpers

/// `service`'s instance at 127.0.0.1:`ingress`, with `mtls` mode `mode`.
fn callee_service(service: &str, ingress: u16, mode: &str) -> MeshService {
    MeshService::build(service)
        .set("mtls", mode)
        .endpoint("127.0.0.1", ingress)
}

/// A service calling `orders`.
fn orders_caller(service: &str) -> MeshService {
    MeshService::build(service).dependency("orders")
}

/// The rule `orders-callers`: only `callers` may call orders.
fn orders_callers(callers: &[&str]) -> AccessRule {
    AccessRule::build("orders-callers")
        .target("orders")
        .allow(callers)
}

/// What a test with one callee prepares first: the certificates, the callee's app
/// (`<service> a`) and a free port for its Envoy's ingress.
struct Callee {
    pki: Pki,
    app: Backend,
    ingress: u16,
}

impl Callee {
    async fn prepare(service: &str) -> Callee {
        Callee {
            pki: Pki::new(),
            app: Backend::start(service, "a").await,
            ingress: free_port(),
        }
    }
}

/// Certificates: `mesh` is the CA every proxy trusts, `other` an unrelated one.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// A certificate for `service` signed by the mesh CA.
    fn identity(&self, service: &str) -> TlsFiles {
        issue_identity(self.dir.path(), "mesh", service, TRUST_DOMAIN)
    }

    /// A certificate for `service` with the right SAN, signed by a CA nobody trusts.
    fn foreign(&self, service: &str) -> TlsFiles {
        issue_identity(self.dir.path(), "other", service, TRUST_DOMAIN)
    }
}

/// The Envoy of a callee: an ingress on `ingress_port` in front of `app`.
async fn callee(
    cp: &ControlPlane,
    service: &str,
    ingress_port: u16,
    app: &Backend,
    tls: Option<TlsFiles>,
) -> Envoy {
    Envoy::start(
        cp,
        EnvoyOptions {
            service: service.into(),
            ingress_port: Some(ingress_port),
            app_port: Some(app.port),
            tls,
            ..Default::default()
        },
    )
    .await
}

/// The Envoy of a caller: an egress only.
async fn caller(cp: &ControlPlane, service: &str, tls: Option<TlsFiles>) -> Envoy {
    Envoy::start(
        cp,
        EnvoyOptions {
            service: service.into(),
            egress: true,
            tls,
            ..Default::default()
        },
    )
    .await
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// A request through a caller's egress to `host`.
async fn via(
    envoy: &Envoy,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    let mut all = headers.to_vec();
    if method != "GET" {
        all.push(("content-length", "0"));
    }
    http_request(envoy.egress_addr(), method, host, path, &all)
        .await
        .unwrap_or_else(|e| panic!("{method} {host}{path} through {}: {e}", envoy.node_id))
}

/// Waits until `request` gets an HTTP answer `pred` accepts.
async fn wait_answer<E, F>(
    what: &str,
    pred: impl Fn(&HttpResponse) -> bool,
    request: impl Fn() -> F,
) -> HttpResponse
where
    F: std::future::Future<Output = Result<HttpResponse, E>>,
{
    let (pred, request) = (&pred, &request);
    eventually(LIMIT, what, move || async move {
        request().await.ok().filter(|r| pred(r))
    })
    .await
}

/// Waits until a request through `envoy`'s egress gets an answer `pred` accepts.
async fn wait_via(
    envoy: &Envoy,
    host: &str,
    path: &str,
    what: &str,
    pred: impl Fn(&HttpResponse) -> bool,
) -> HttpResponse {
    wait_answer(what, pred, || {
        http_request(envoy.egress_addr(), "GET", host, path, &[])
    })
    .await
}

/// Waits until a TLS request with `id` to `addr` gets an HTTP answer `pred` accepts.
async fn wait_tls(
    addr: SocketAddr,
    id: &TlsFiles,
    path: &str,
    what: &str,
    pred: impl Fn(&HttpResponse) -> bool,
) -> HttpResponse {
    wait_answer(what, pred, || {
        tls_request(addr, &id.cert, &id.key, path, &[])
    })
    .await
}

/// One GET of `path` over mTLS with `id`'s certificate, carrying `headers`: it must be
/// answered.
async fn mtls_get(
    addr: SocketAddr,
    id: &TlsFiles,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    tls_request(addr, &id.cert, &id.key, path, headers)
        .await
        .unwrap_or_else(|e| panic!("GET {path} over mTLS: {e:?}"))
}

/// The app answered, and was told the call came from `caller`.
fn reached_app_as(r: &HttpResponse, service: &str, method: &str, path: &str, caller: &str) {
    reached_app(r, service, method, path);
    assert_eq!(r.header(CLIENT_NAME_SEEN), Some(caller), "{r:?}");
}

/// The app answered (the request was not refused on the way).
fn reached_app(r: &HttpResponse, service: &str, method: &str, path: &str) {
    assert_eq!(r.status, 200, "{r:?}");
    let expected = format!("hello from {service} ");
    assert!(
        r.body.starts_with(&expected) && r.body.contains(&format!(": {method} {path}")),
        "{r:?}"
    );
}

/// Refused by access control: HTTP 403 and the app was not reached.
fn denied(r: &HttpResponse, what: &str) {
    assert_eq!(r.status, 403, "{what}: {r:?}");
    assert!(!r.body.contains("hello from"), "{what}: app reached: {r:?}");
}

async fn stat(envoy: &Envoy, name: &str) -> u64 {
    envoy.stat(name).await.unwrap_or(0)
}

/// Waits until a counter of `envoy` exceeds `above`.
async fn wait_stat_above(envoy: &Envoy, name: &str, above: u64) -> u64 {
    eventually(LIMIT, &format!("{name} > {above}"), move || async move {
        envoy.stat(name).await.filter(|v| *v > above)
    })
    .await
}

/// Waits for the access log entry of `method path` on `envoy` (Envoy flushes its access
/// log about once a second); the newest one if there are several.
async fn access_entry(envoy: &Envoy, method: &str, path: &str) -> Value {
    eventually(
        LIMIT,
        &format!("access log entry for {method} {path}"),
        move || async move {
            envoy
                .access_log_entries()
                .into_iter()
                .rev()
                .find(|e| e[field::PATH] == path && e[field::METHOD] == method)
        },
    )
    .await
}

/// The newest access log entry for `method path`, once it names `caller`, says how it was
/// identified (`identity`) and records `status`.
async fn assert_logged(
    envoy: &Envoy,
    method: &str,
    path: &str,
    (caller, identity, status): (&str, &str, u16),
) -> Value {
    let entry = access_entry(envoy, method, path).await;
    assert_eq!(entry[field::CALLER], caller, "{method} {path}: {entry}");
    assert_eq!(entry[field::IDENTITY], identity, "{method} {path}: {entry}");
    assert_eq!(entry[field::STATUS], status, "{method} {path}: {entry}");
    entry
}

// ---------------------------------------------------------------------------------------
// The test harness itself (needs no control plane)

/// The TLS client, the source-address binding and the access log capture of `support`,
/// against a hand-configured Envoy: a TLS listener requiring a client certificate from the
/// mesh CA, and a plaintext listener echoing the caller's address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_tls_client_source_address_and_access_log_work_with_envoy() {
    let pki = Pki::new();
    let server = pki.identity("orders");
    let checkout = pki.identity("checkout");
    let foreign = pki.foreign("checkout");
    let (admin, tls_port, plain_port) = (free_port(), free_port(), free_port());
    // Each listener answers `body` itself, echoes the caller's address and logs each call.
    let hcm = |prefix: &str, body: &str| {
        let answer = json!({
            "direct_response": {"status": 200, "body": {"inline_string": body}},
            "response_headers_to_add": [{"header": {
                "key": "x-remote",
                "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
            }}],
        });
        static_envoy::with_access_log(
            static_envoy::http_connection_manager(prefix, answer),
            json!({
                "path": "%REQ(:PATH)%",
                "method": "%REQ(:METHOD)%",
                "status": "%RESPONSE_CODE%",
                "peer": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
                "san": "%DOWNSTREAM_PEER_URI_SAN%",
            }),
        )
    };
    let tls = static_envoy::downstream_tls(&server.cert, &server.key, Some(&server.ca));
    let bootstrap = static_envoy::bootstrap(
        admin,
        vec![
            static_envoy::listener(
                "mtls",
                "127.0.0.1",
                tls_port,
                Some(tls),
                hcm("mtls", "tls ok"),
            ),
            static_envoy::listener(
                "plain",
                "0.0.0.0",
                plain_port,
                None,
                hcm("plain", "plain ok"),
            ),
        ],
        vec![],
    );
    let envoy = Envoy::start_static("harness", &bootstrap, admin).await;
    let tls_addr = local(tls_port);

    // A certificate from the mesh CA: a response; the SAN is the SPIFFE identity.
    let ok = wait_tls(tls_addr, &checkout, "/tls-check", "mTLS listener", |r| {
        r.status == 200
    })
    .await;
    assert_eq!(ok.body, "tls ok");
    let entry = access_entry(&envoy, "GET", "/tls-check").await;
    assert_eq!(entry["san"], spiffe_id(TRUST_DOMAIN, "checkout"), "{entry}");
    assert_eq!(entry["status"], 200, "{entry}");

    // A certificate from another CA, or none: refused at the handshake.
    let refused = tls_request(tls_addr, &foreign.cert, &foreign.key, "/", &[]).await;
    assert!(
        matches!(refused, Err(TlsError::Handshake(_))),
        "foreign CA: {refused:?}"
    );
    let refused = tls_request_with(tls_addr, None, "GET", "localhost", "/", &[]).await;
    assert!(
        matches!(refused, Err(TlsError::Handshake(_))),
        "no client certificate: {refused:?}"
    );
    // Plaintext to a TLS listener: no HTTP response.
    let plain = http_request(tls_addr, "GET", "orders", "/", &[]).await;
    assert!(plain.is_err(), "plaintext to TLS: {plain:?}");
    // TLS to a plaintext listener: the handshake fails.
    let to_plain = tls_request(local(plain_port), &checkout.cert, &checkout.key, "/", &[]).await;
    assert!(
        matches!(to_plain, Err(TlsError::Handshake(_))),
        "TLS to plaintext: {to_plain:?}"
    );

    // Calls from another loopback address are seen as coming from it.
    for last in [2, 3] {
        let r = http_request_from(
            loopback(last),
            local(plain_port),
            "GET",
            "orders",
            &format!("/from-{last}"),
            &[],
        )
        .await
        .unwrap();
        assert_eq!(r.body, "plain ok");
        assert_eq!(
            r.header("x-remote"),
            Some(format!("127.0.0.{last}").as_str())
        );
    }
    let entry = access_entry(&envoy, "GET", "/from-2").await;
    assert_eq!(entry["peer"], "127.0.0.2", "{entry}");
    let r = http_request(local(plain_port), "DELETE", "orders", "/x", &[])
        .await
        .unwrap();
    assert_eq!(r.header("x-remote"), Some("127.0.0.1"));
    assert_eq!(access_entry(&envoy, "DELETE", "/x").await["status"], 200);
}

// ---------------------------------------------------------------------------------------
// Access rules

/// orders requires mTLS; only checkout may GET under /api/; billing calls too.
fn strict_orders_mesh(orders_ingress: u16, action: &str) -> String {
    manifests(&[
        &callee_service("orders", orders_ingress, "strict"),
        &orders_caller("checkout"),
        &orders_caller("billing"),
        &AccessRule::build("orders-callers")
            .target("orders")
            .action(action)
            .allow_with(
                json!({"from": ["checkout"], "paths": [{"prefix": "/api/"}], "methods": ["GET"]}),
            ),
    ])
}

/// Through the callers' Envoys to a `strict` target: the named caller gets through (and the
/// app learns who it is, whatever the caller claims); another caller with a valid
/// certificate, a path outside the rule and a method outside the rule get 403. The callee
/// counts and logs each decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_rule_allows_the_named_caller_and_denies_everything_else() {
    let Callee { pki, app, ingress } = Callee::prepare("orders").await;
    let cp = ControlPlane::start(&strict_orders_mesh(ingress, "deny"), &[]).await;
    let orders = callee(&cp, "orders", ingress, &app, Some(pki.identity("orders"))).await;
    let checkout = caller(&cp, "checkout", Some(pki.identity("checkout"))).await;
    let billing = caller(&cp, "billing", Some(pki.identity("billing"))).await;

    let ok = wait_via(
        &checkout,
        "orders",
        "/api/orders",
        "checkout → orders",
        |r| r.status == 200,
    )
    .await;
    reached_app(&ok, "orders", "GET", "/api/orders");
    assert_eq!(ok.header(CLIENT_NAME_SEEN), Some("checkout"), "{ok:?}");

    // A forged name from the caller never reaches the app.
    let forged = via(
        &checkout,
        "GET",
        "orders",
        "/api/forged",
        &[(CLIENT_NAME, "admin")],
    )
    .await;
    reached_app_as(&forged, "orders", "GET", "/api/forged", "checkout");

    // billing has a valid certificate but no rule names it. Wait until billing's own Envoy
    // routes to orders at all (it may still be getting its configuration), then look.
    let refused = wait_via(
        &billing,
        "orders",
        "/api/from-billing",
        "billing → orders answered by orders",
        |r| r.status == 200 || r.status == 403,
    )
    .await;
    denied(&refused, "billing, not named by the rule");

    let outside_path = via(&checkout, "GET", "orders", "/admin", &[]).await;
    denied(&outside_path, "checkout, path outside the rule");
    let outside_method = via(&checkout, "POST", "orders", "/api/orders", &[]).await;
    denied(&outside_method, "checkout, method outside the rule");
    // A path that only looks like it is inside the rule is judged as the app would read it.
    let dot_dot = via(&checkout, "GET", "orders", "/api/../admin", &[]).await;
    denied(&dot_dot, "checkout, /api/../admin is /admin");
    let escaped = via(&checkout, "GET", "orders", "/api%2F..%2Fadmin", &[]).await;
    assert_ne!(
        escaped.status, 200,
        "an escaped slash must not reach the app: {escaped:?}"
    );

    // The callee counts its decisions: checkout's two calls allowed, four refusals (the
    // escaped slash is redirected before RBAC).
    assert_eq!(stat(&orders, &rbac_stat("orders", "allowed")).await, 2);
    assert_eq!(stat(&orders, &rbac_stat("orders", "denied")).await, 4);

    // ...and logs who was refused, how it was identified, and why.
    let entry = assert_logged(
        &orders,
        "GET",
        "/api/from-billing",
        ("billing", "mtls", 403),
    )
    .await;
    assert!(
        entry[field::DETAILS]
            .as_str()
            .is_some_and(|d| d.contains("rbac_access_denied")),
        "{entry}"
    );
    let entry = access_entry(&orders, "POST", "/api/orders").await;
    assert_eq!(entry[field::CALLER], "checkout", "{entry}");
    assert_eq!(entry[field::STATUS], 403, "{entry}");
    assert_logged(&orders, "GET", "/api/orders", ("checkout", "mtls", 200)).await;
}

/// `action: log`: a caller no rule allows still gets through, and the callee counts and
/// logs it as a shadow denial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_mode_lets_unnamed_callers_through_and_records_a_shadow_denial() {
    let Callee { pki, app, ingress } = Callee::prepare("orders").await;
    let cp = ControlPlane::start(&strict_orders_mesh(ingress, "log"), &[]).await;
    let orders = callee(&cp, "orders", ingress, &app, Some(pki.identity("orders"))).await;
    let billing = caller(&cp, "billing", Some(pki.identity("billing"))).await;

    let before = stat(&orders, &rbac_stat("orders", "shadow_denied")).await;
    let r = wait_via(
        &billing,
        "orders",
        "/api/shadow",
        "billing → orders answered by orders",
        |r| r.status == 200 || r.status == 403,
    )
    .await;
    reached_app(&r, "orders", "GET", "/api/shadow");
    assert_eq!(r.header(CLIENT_NAME_SEEN), Some("billing"), "{r:?}");
    wait_stat_above(&orders, &rbac_stat("orders", "shadow_denied"), before).await;
    assert_eq!(stat(&orders, &rbac_stat("orders", "denied")).await, 0);

    let entry = access_entry(&orders, "GET", "/api/shadow").await;
    assert_eq!(entry[field::RBAC_SHADOW], "denied", "{entry}");
    assert_eq!(entry[field::CALLER], "billing", "{entry}");
    assert_eq!(entry[field::STATUS], 200, "{entry}");

    // A call the rule allows is logged as such (checkout calls the ingress directly).
    let checkout = pki.identity("checkout");
    let allowed = wait_tls(local(ingress), &checkout, "/api/allowed", "checkout", |r| {
        r.status == 200
    })
    .await;
    assert_eq!(allowed.header(CLIENT_NAME_SEEN), Some("checkout"));
    let entry = access_entry(&orders, "GET", "/api/allowed").await;
    assert_eq!(entry[field::RBAC_SHADOW], "allowed", "{entry}");
    assert_eq!(entry[field::CALLER], "checkout", "{entry}");
}

/// Two AccessRules for one target are merged: each caller gets what its rule allows, not
/// what the other allows. A caller nobody knows is reported by the admin API.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_rules_for_one_target_both_apply_and_unknown_callers_are_reported() {
    let Callee { pki, app, ingress } = Callee::prepare("orders").await;
    let mesh = manifests(&[
        &callee_service("orders", ingress, "strict"),
        &orders_caller("checkout"),
        &orders_caller("billing"),
        // A regex beyond Envoy's default RE2 size limit (100): still enforced.
        &AccessRule::build("checkout-reads")
            .target("orders")
            .allow_with(json!({
                "from": ["checkout"],
                "paths": [{"prefix": "/a/"}, {"regex": "/orders/[a-z0-9-]{1,36}/items/[0-9]+"}],
            })),
        &AccessRule::build("billing-reports")
            .target("orders")
            .allow_with(json!({
                "from": ["billing", "ghost"],
                "paths": [{"exact": "/b"}],
            })),
    ]);
    let cp = ControlPlane::start(&mesh, &[]).await;
    let _orders = callee(&cp, "orders", ingress, &app, Some(pki.identity("orders"))).await;
    let (checkout, billing) = (pki.identity("checkout"), pki.identity("billing"));
    let addr = local(ingress);

    let r = wait_tls(addr, &checkout, "/a/1", "checkout → orders /a/1", |r| {
        r.status == 200
    })
    .await;
    reached_app(&r, "orders", "GET", "/a/1");
    let r = mtls_get(addr, &billing, "/b", &[]).await;
    reached_app_as(&r, "orders", "GET", "/b", "billing");
    let r = mtls_get(addr, &checkout, "/b", &[]).await;
    denied(&r, "checkout on billing's path");
    let r = mtls_get(addr, &billing, "/a/1", &[]).await;
    denied(&r, "billing on checkout's path");
    let r = mtls_get(addr, &checkout, "/orders/ab-12/items/7", &[]).await;
    reached_app(&r, "orders", "GET", "/orders/ab-12/items/7");
    let r = mtls_get(addr, &checkout, "/orders/AB/items/7", &[]).await;
    denied(&r, "checkout on a path the regex does not match");

    let access = cp.admin_json("/api/access").await;
    let orders = access
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["target"] == "orders")
        .unwrap_or_else(|| panic!("no policy for orders: {access}"));
    assert_eq!(orders["action"], "deny", "{orders}");
    assert_eq!(orders["sources"].as_array().unwrap().len(), 2, "{orders}");
    let names = |key: &str| -> Vec<String> {
        orders[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key}: {orders}"))
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        names("unknown_callers").contains(&"ghost".into()),
        "{orders}"
    );
    // ...and counted for alerting: one protected service, one caller nobody knows.
    let metrics = cp.metrics().await;
    assert!(
        metrics.contains("meshbridge_access_policies 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("meshbridge_access_unknown_callers 1\n"),
        "{metrics}"
    );
    assert!(
        !names("unknown_callers").contains(&"billing".into()),
        "{orders}"
    );
    for known in ["checkout", "billing"] {
        assert!(
            names("resolved_callers").contains(&known.into()),
            "{orders}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Mutual TLS on the ingress

fn orders_with_mtls(ingress: u16, mode: &str, rule: Option<&AccessRule>) -> String {
    let (orders, checkout) = (
        callee_service("orders", ingress, mode),
        orders_caller("checkout"),
    );
    let mut docs: Vec<&dyn Fixture> = vec![&orders, &checkout];
    if let Some(rule) = rule {
        docs.push(rule);
    }
    manifests(&docs)
}

/// `strict` accepts only mTLS with a certificate from the mesh CA; `permissive` accepts
/// plaintext and mTLS. Only a certificate tells the app who calls: a plaintext caller's
/// `x-client-name` is dropped, and a rule naming that service does not let it in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_and_permissive_ingress_and_forged_names_over_plaintext() {
    let Callee { pki, app, ingress } = Callee::prepare("orders").await;
    let addr = local(ingress);
    let cp = ControlPlane::start(&orders_with_mtls(ingress, "strict", None), &[]).await;
    let orders = callee(&cp, "orders", ingress, &app, Some(pki.identity("orders"))).await;
    let checkout = pki.identity("checkout");

    // strict: a valid certificate gets through...
    let ok = wait_tls(addr, &checkout, "/strict", "mTLS to strict orders", |r| {
        r.status == 200
    })
    .await;
    reached_app_as(&ok, "orders", "GET", "/strict", "checkout");
    // ...and what it claims in x-client-name is replaced by what its certificate says.
    let r = mtls_get(addr, &checkout, "/strict-forged", &[(CLIENT_NAME, "admin")]).await;
    reached_app_as(&r, "orders", "GET", "/strict-forged", "checkout");
    // Plaintext gets no HTTP response at all.
    let plain = http_request(addr, "GET", "orders", "/plain", &[]).await;
    assert!(plain.is_err(), "strict answered plaintext: {plain:?}");
    // A certificate from another CA is refused at the handshake, as is TLS without one.
    let foreign = pki.foreign("checkout");
    let r = tls_request(addr, &foreign.cert, &foreign.key, "/foreign", &[]).await;
    assert!(
        matches!(r, Err(TlsError::Handshake(_))),
        "foreign CA: {r:?}"
    );
    let r = tls_request_with(addr, None, "GET", "orders", "/anonymous", &[]).await;
    assert!(r.is_err(), "TLS without a client certificate: {r:?}");

    // permissive: plaintext and mTLS both get through.
    cp.write_manifests(&orders_with_mtls(ingress, "permissive", None));
    let plain = eventually(LIMIT, "plaintext to permissive orders", || async move {
        http_request(
            addr,
            "GET",
            "orders",
            "/plain",
            // Also the spelling CGI-style servers read as the same header.
            &[(CLIENT_NAME, "checkout"), ("x_client_name", "checkout")],
        )
        .await
        .ok()
    })
    .await;
    reached_app(&plain, "orders", "GET", "/plain");
    assert_eq!(
        plain.header(CLIENT_NAME_SEEN),
        None,
        "a plaintext caller's claim reached the app: {plain:?}"
    );
    let r = mtls_get(addr, &checkout, "/permissive", &[]).await;
    reached_app_as(&r, "orders", "GET", "/permissive", "checkout");

    // A rule allowing only checkout: the plaintext caller claiming to be checkout is refused,
    // the caller with checkout's certificate is not.
    let rule = orders_callers(&["checkout"]).action("deny");
    cp.write_manifests(&orders_with_mtls(ingress, "permissive", Some(&rule)));
    eventually(LIMIT, "the rule applied", || async move {
        http_request(addr, "GET", "orders", "/wait", &[(CLIENT_NAME, "checkout")])
            .await
            .ok()
            .filter(|r| r.status != 200)
    })
    .await;
    let forged = http_request(
        addr,
        "GET",
        "orders",
        "/forged",
        &[(CLIENT_NAME, "checkout")],
    )
    .await
    .unwrap();
    denied(&forged, "plaintext caller claiming to be checkout");
    let r = mtls_get(addr, &checkout, "/with-cert", &[]).await;
    reached_app_as(&r, "orders", "GET", "/with-cert", "checkout");
    assert_logged(&orders, "GET", "/forged", ("-", "none", 403)).await;
}

/// A caller with a certificate originates mTLS to an instance tagged `mtls` even though
/// its service does not require it: the callee learns the caller from the certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_use_mtls_towards_instances_tagged_mtls() {
    let Callee { pki, app, ingress } = Callee::prepare("orders").await;
    let mesh = manifests(&[
        &MeshService::build("orders").tagged_endpoint("127.0.0.1", ingress, &["mtls"]),
        &orders_caller("checkout"),
    ]);
    let cp = ControlPlane::start(&mesh, &[]).await;
    let orders = callee(&cp, "orders", ingress, &app, Some(pki.identity("orders"))).await;
    let checkout = caller(&cp, "checkout", Some(pki.identity("checkout"))).await;

    let r = wait_via(&checkout, "orders", "/tagged", "checkout → orders", |r| {
        r.status == 200
    })
    .await;
    reached_app(&r, "orders", "GET", "/tagged");
    assert_eq!(
        r.header(CLIENT_NAME_SEEN),
        Some("checkout"),
        "the call did not arrive over mTLS: {r:?}"
    );
    let entry = access_entry(&orders, "GET", "/tagged").await;
    assert_eq!(entry[field::IDENTITY], "mtls", "{entry}");

    // The service itself is `disabled`: plaintext callers still get in, anonymously.
    let plain = http_request(local(ingress), "GET", "orders", "/plain", &[])
        .await
        .unwrap();
    reached_app(&plain, "orders", "GET", "/plain");
    assert_eq!(plain.header(CLIENT_NAME_SEEN), None);
}

// ---------------------------------------------------------------------------------------
// Other ways to identify callers, and default deny

/// With `--source-ip-identity`, a plaintext caller is the service whose instance has its
/// address: billing is registered at 127.0.0.2; 127.0.0.3 is nobody.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn source_ip_identifies_plaintext_callers() {
    let Callee { pki, app, ingress } = Callee::prepare("payments").await;
    let mesh = manifests(&[
        &callee_service("payments", ingress, "permissive"),
        &MeshService::build("billing")
            .endpoint("127.0.0.2", 8080)
            .dependency("payments"),
        &AccessRule::build("payments-callers")
            .target("payments")
            .action("deny")
            .allow(&["billing"]),
    ]);
    let cp = ControlPlane::start(&mesh, &["--source-ip-identity"]).await;
    let payments = callee(
        &cp,
        "payments",
        ingress,
        &app,
        Some(pki.identity("payments")),
    )
    .await;
    let addr = local(ingress);

    let ok = eventually(LIMIT, "billing (127.0.0.2) → payments", || async move {
        http_request_from(loopback(2), addr, "GET", "payments", "/charge", &[])
            .await
            .ok()
            .filter(|r| r.status == 200)
    })
    .await;
    reached_app(&ok, "payments", "GET", "/charge");
    assert_eq!(ok.header(CLIENT_NAME_SEEN), Some("billing"), "{ok:?}");

    let r = http_request_from(loopback(3), addr, "GET", "payments", "/charge-3", &[])
        .await
        .unwrap();
    denied(&r, "127.0.0.3, no known instance");

    let entry = access_entry(&payments, "GET", "/charge").await;
    assert_eq!(entry[field::CALLER], "billing", "{entry}");
    assert_eq!(entry[field::IDENTITY], "source-ip", "{entry}");
    let entry = access_entry(&payments, "GET", "/charge-3").await;
    assert_eq!(entry[field::IDENTITY], "none", "{entry}");
    assert_eq!(entry[field::STATUS], 403, "{entry}");
}

/// With `--default-deny`, a service no AccessRule targets refuses every call; adding a rule
/// opens it for the caller it names, and only for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_deny_closes_a_service_until_a_rule_names_the_caller() {
    let Callee { pki, app, ingress } = Callee::prepare("orders").await;
    let addr = local(ingress);
    let cp = ControlPlane::start(
        &orders_with_mtls(ingress, "strict", None),
        &["--default-deny"],
    )
    .await;
    let orders = callee(&cp, "orders", ingress, &app, Some(pki.identity("orders"))).await;
    let (checkout, billing) = (pki.identity("checkout"), pki.identity("billing"));

    // Wait for the ingress to answer at all; its first answer must already be a refusal.
    let closed = eventually(LIMIT, "orders ingress answering", || async {
        tls_request(addr, &checkout.cert, &checkout.key, "/closed", &[])
            .await
            .ok()
    })
    .await;
    denied(&closed, "no AccessRule under --default-deny");
    assert_logged(&orders, "GET", "/closed", ("checkout", "mtls", 403)).await;

    let rule = orders_callers(&["checkout"]);
    cp.write_manifests(&orders_with_mtls(ingress, "strict", Some(&rule)));
    let open = wait_tls(addr, &checkout, "/open", "the rule opening orders", |r| {
        r.status == 200
    })
    .await;
    reached_app_as(&open, "orders", "GET", "/open", "checkout");
    let r = mtls_get(addr, &billing, "/open", &[]).await;
    denied(&r, "billing, not named");
}

/// With `--identity-header-from`, a trusted peer (here a gateway) may say on whose behalf
/// it calls; any other caller's claim is replaced by its own identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_peers_may_assert_the_caller_in_a_header() {
    let Callee { pki, app, ingress } = Callee::prepare("orders").await;
    let addr = local(ingress);
    let rule = orders_callers(&["checkout"]);
    let mut mesh = orders_with_mtls(ingress, "strict", Some(&rule));
    mesh.push_str("---\n");
    mesh.push_str(&orders_caller("gateway-edge").yaml());
    let cp = ControlPlane::start(&mesh, &["--identity-header-from", "gateway-*"]).await;
    let orders = callee(&cp, "orders", ingress, &app, Some(pki.identity("orders"))).await;
    let (gateway, billing) = (pki.identity("gateway-edge"), pki.identity("billing"));

    let on_behalf = eventually(LIMIT, "gateway on behalf of checkout", || async {
        tls_request(
            addr,
            &gateway.cert,
            &gateway.key,
            "/via-gateway",
            &[(CLIENT_NAME, "checkout")],
        )
        .await
        .ok()
        .filter(|r| r.status == 200)
    })
    .await;
    reached_app_as(&on_behalf, "orders", "GET", "/via-gateway", "checkout");
    let entry = access_entry(&orders, "GET", "/via-gateway").await;
    assert_eq!(entry[field::IDENTITY], "header", "{entry}");
    assert_eq!(entry[field::CALLER], "checkout", "{entry}");

    // billing is not trusted to speak for others: it is billing, and billing is not allowed.
    let r = mtls_get(addr, &billing, "/claimed", &[(CLIENT_NAME, "checkout")]).await;
    denied(&r, "billing claiming to be checkout");
    let entry = access_entry(&orders, "GET", "/claimed").await;
    assert_eq!(entry[field::CALLER], "billing", "{entry}");
    assert_eq!(entry[field::IDENTITY], "mtls", "{entry}");
}
