//! End to end: the real `meshbridge` binary configuring real Envoys on 127.0.0.1.

use crate::support;

use std::time::Duration;

use serde_json::json;
use support::fixtures::{Fixture, MeshService, manifests};
use support::{Backend, ControlPlane, Envoy, EnvoyOptions, eventually};

/// frontend calls orders; orders has the given instance ports; billing exists but is not a
/// dependency of frontend; `ghost` is declared but unknown; an external https domain (a TLS
/// DNS cluster Envoy must accept, never called: no network here).
fn mesh(orders_ports: &[u16], billing_port: u16) -> String {
    let orders = MeshService::build("orders").endpoints("127.0.0.1", orders_ports);
    mesh_with(Some(&orders), billing_port)
}

/// [`mesh`] with the given `orders` document, or none.
fn mesh_with(orders: Option<&MeshService>, billing_port: u16) -> String {
    let frontend = MeshService::build("frontend")
        .dependency_with(json!({"service": "orders", "timeout": "3s"}))
        .dependency("ghost")
        .domain("https://api.example.com");
    let billing = MeshService::build("billing").endpoint("127.0.0.1", billing_port);
    let mut docs: Vec<&dyn Fixture> = vec![&frontend];
    if let Some(orders) = orders {
        docs.push(orders);
    }
    docs.push(&billing);
    manifests(&docs)
}

fn frontend(delta: bool) -> EnvoyOptions {
    EnvoyOptions {
        service: "frontend".into(),
        egress: true,
        delta,
        ..Default::default()
    }
}

async fn routes_and_refuses(delta: bool) {
    let orders = Backend::start("orders", "a").await;
    let billing = Backend::start("billing", "a").await;
    let cp = ControlPlane::start(&mesh(&[orders.port], billing.port), &[]).await;
    let envoy = Envoy::start(&cp, frontend(delta)).await;

    let ok = envoy
        .wait_call("orders", "orders routed", |r| r.status == 200)
        .await;
    assert!(ok.body.starts_with("hello from orders a"), "{}", ok.body);
    // The port in Host is ignored.
    let with_port = envoy.call("orders:8080", "/x").await.unwrap();
    assert_eq!(with_port.status, 200, "{}", with_port.body);

    let refused = envoy.call("billing", "/").await.unwrap();
    assert_eq!(refused.status, 403);
    assert!(
        refused
            .body
            .contains("not a declared dependency of the calling service; declared: [ghost, orders"),
        "{}",
        refused.body
    );
    assert_eq!(
        refused.header("x-meshbridge-reason"),
        Some("undeclared-dependency")
    );
    assert!(
        !refused.body.contains("hello"),
        "billing must not be reached"
    );

    let unknown = envoy.call("ghost", "/").await.unwrap();
    assert_eq!(unknown.status, 503);
    assert_eq!(
        unknown.header("x-meshbridge-reason"),
        Some("unknown-service")
    );

    // The admin API shows the proxy with what it was sent and ACKed.
    let proxies = cp.admin_json("/api/proxies").await;
    let p = &proxies[0];
    assert_eq!(p["service"], "frontend");
    assert_eq!(p["mode"], if delta { "delta" } else { "sotw" });
    let cds = &p["types"]["type.googleapis.com/envoy.config.cluster.v3.Cluster"];
    assert!(cds["acked"].is_string(), "{p}");
    assert!(cds["nack"].is_null(), "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_routes_declared_dependencies_and_refuses_others() {
    routes_and_refuses(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_routes_declared_dependencies_and_refuses_others() {
    routes_and_refuses(true).await;
}

async fn follows_endpoint_changes(delta: bool) {
    let a = Backend::start("orders", "a").await;
    let b = Backend::start("orders", "b").await;
    let billing = Backend::start("billing", "a").await;
    let cp = ControlPlane::start(&mesh(&[a.port], billing.port), &[]).await;
    let envoy = Envoy::start(&cp, frontend(delta)).await;
    envoy
        .wait_call("orders", "instance a", |r| r.body.contains("orders a"))
        .await;

    cp.write_manifests(&mesh(&[a.port, b.port], billing.port));
    envoy
        .wait_call("orders", "instance b added", |r| {
            r.body.contains("orders b")
        })
        .await;

    cp.write_manifests(&mesh(&[b.port], billing.port));
    // Once a is gone, twenty calls in a row all land on b.
    eventually(Duration::from_secs(20), "instance a removed", || async {
        for _ in 0..20 {
            let r = envoy.call("orders", "/").await.ok()?;
            if !r.body.contains("orders b") {
                return None;
            }
        }
        Some(())
    })
    .await;
    assert_eq!(
        envoy.stat("cluster_manager.warming_clusters").await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_endpoint_added_and_removed_in_manifest_reaches_envoy() {
    follows_endpoint_changes(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_endpoint_added_and_removed_in_manifest_reaches_envoy() {
    follows_endpoint_changes(true).await;
}

async fn service_removed_and_readded(delta: bool) {
    let orders = Backend::start("orders", "a").await;
    let billing = Backend::start("billing", "a").await;
    let full = mesh(&[orders.port], billing.port);
    let cp = ControlPlane::start(&full, &[]).await;
    let envoy = Envoy::start(&cp, frontend(delta)).await;
    envoy
        .wait_call("orders", "orders routed", |r| r.status == 200)
        .await;

    // Remove the orders MeshService entirely: frontend still declares it, so it is unknown.
    let without = mesh_with(None, billing.port);
    cp.write_manifests(&without);
    let gone = envoy
        .wait_call("orders", "orders removed", |r| r.status == 503)
        .await;
    assert_eq!(gone.header("x-meshbridge-reason"), Some("unknown-service"));
    eventually(
        Duration::from_secs(10),
        "orders cluster removed",
        || async {
            (envoy
                .stat("cluster.orders.membership_total")
                .await
                .is_none())
            .then_some(())
        },
    )
    .await;

    cp.write_manifests(&full);
    envoy
        .wait_call("orders", "orders back", |r| r.status == 200)
        .await;
    eventually(Duration::from_secs(10), "no cluster warming", || async {
        (envoy.stat("cluster_manager.warming_clusters").await == Some(0)).then_some(())
    })
    .await;
    assert_eq!(
        envoy.stat("cluster.orders.membership_healthy").await,
        Some(1)
    );
    assert_eq!(
        envoy.stat("cluster_manager.cds.update_rejected").await,
        Some(0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sotw_service_removed_and_readded_leaves_no_cluster_warming() {
    service_removed_and_readded(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_service_removed_and_readded_leaves_no_cluster_warming() {
    service_removed_and_readded(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_without_service_name_is_refused_while_others_keep_working() {
    let a = Backend::start("orders", "a").await;
    let b = Backend::start("orders", "b").await;
    let billing = Backend::start("billing", "a").await;
    let cp = ControlPlane::start(&mesh(&[a.port], billing.port), &[]).await;
    let good = Envoy::start(&cp, frontend(false)).await;
    good.wait_call("orders", "orders routed", |r| r.status == 200)
        .await;
    let bad = Envoy::start(
        &cp,
        EnvoyOptions {
            without_service_name: true,
            ..frontend(false)
        },
    )
    .await;
    eventually(Duration::from_secs(20), "refusal counted", || async {
        cp.metrics()
            .await
            .lines()
            .any(|l| l.starts_with("meshbridge_xds_refused_streams_total ") && !l.ends_with(" 0"))
            .then_some(())
    })
    .await;
    assert!(
        cp.log()
            .contains("node metadata key 'service_name' is required")
    );
    // The refused Envoy got no listener; the good one still follows changes.
    assert!(bad.call("orders", "/").await.is_err());
    cp.write_manifests(&mesh(&[a.port, b.port], billing.port));
    good.wait_call("orders", "instance b", |r| r.body.contains("orders b"))
        .await;
    let proxies = cp.admin_json("/api/proxies").await;
    assert_eq!(proxies.as_array().unwrap().len(), 1, "{proxies}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_manifest_leaves_traffic_unaffected_and_is_reported() {
    let a = Backend::start("orders", "a").await;
    let b = Backend::start("orders", "b").await;
    let billing = Backend::start("billing", "a").await;
    let good = mesh(&[a.port], billing.port);
    let cp = ControlPlane::start(&good, &[]).await;
    let envoy = Envoy::start(&cp, frontend(false)).await;
    envoy
        .wait_call("orders", "orders routed", |r| r.status == 200)
        .await;

    // Port out of range in the orders document (document 2), and instance b added: the
    // whole file is rejected, so b must not appear.
    let orders = MeshService::build("orders")
        .endpoint("127.0.0.1", a.port)
        .endpoint_with(json!({"address": "127.0.0.1", "port": 70000}));
    let bad = mesh_with(Some(&orders), billing.port);
    cp.write_manifests(&bad);
    let error = eventually(Duration::from_secs(10), "error reported", || async {
        let sources = cp.admin_json("/api/sources").await;
        sources[0]["error"].as_str().map(str::to_string)
    })
    .await;
    assert!(error.contains("mesh.yaml:"), "{error}");
    assert!(error.contains("document 2 (MeshService orders)"), "{error}");
    assert!(error.contains("spec.endpoints[1].port"), "{error}");
    for _ in 0..10 {
        let r = envoy.call("orders", "/").await.unwrap();
        assert!(r.body.contains("orders a"), "{}", r.body);
    }
    let services = cp.admin_json("/api/services").await;
    let orders = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "orders")
        .unwrap();
    assert_eq!(orders["instances"].as_array().unwrap().len(), 1);

    // Fixing the file applies it and clears the error.
    cp.write_manifests(&mesh(&[a.port, b.port], billing.port));
    envoy
        .wait_call("orders", "instance b", |r| r.body.contains("orders b"))
        .await;
    let sources = cp.admin_json("/api/sources").await;
    assert!(sources[0]["error"].is_null(), "{sources}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canary_header_selects_canary_instances() {
    let stable = Backend::start("orders", "stable").await;
    let canary = Backend::start("orders", "canary").await;
    let manifests = MeshService::build("orders")
        .endpoint("127.0.0.1", stable.port)
        .tagged_endpoint("127.0.0.1", canary.port, &["canary"])
        .yaml();
    let cp = ControlPlane::start(&manifests, &[]).await;
    let envoy = Envoy::start(
        &cp,
        EnvoyOptions {
            dependencies: vec!["orders".into()],
            ..frontend(false)
        },
    )
    .await;
    envoy
        .wait_call("orders", "orders routed", |r| r.status == 200)
        .await;
    for _ in 0..10 {
        let r = support::http_get(envoy.egress_addr(), "orders", "/", &[("x-canary", "1")])
            .await
            .unwrap();
        assert!(r.body.contains("orders canary"), "{}", r.body);
    }
    // Without the header both instances serve.
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = envoy.call("orders", "/").await.unwrap();
        seen.insert(r.body.split(':').next().unwrap().to_string());
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
}

/// `make demo` runs `meshbridge demo`; `--check` verifies the same traffic and exits.
#[test]
fn demo_routes_canary_and_refuses_undeclared() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .arg("demo")
        .arg("--check")
        .arg("--envoy")
        .arg(support::envoy_bin())
        .env("MESHBRIDGE_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("orders with x-canary -> hello from orders v2-canary"),
        "{stdout}"
    );
    assert!(stdout.contains("billing (undeclared) -> 403"), "{stdout}");
    // Over mutual TLS with the demo's certificates, orders' AccessRule holds.
    assert!(
        stdout.contains("orders /admin (outside its AccessRule) -> 403 RBAC: access denied"),
        "{stdout}"
    );
    assert!(
        stdout.contains("plaintext straight to orders' ingress (it is strict mTLS) -> refused"),
        "{stdout}"
    );
    assert!(
        stdout.contains("curl -s -H 'Host: orders' http://127.0.0.1:10000/hello"),
        "{stdout}"
    );
}

/// Envoy's own error replies carry `x-meshbridge-reason` and a body naming the service: an
/// instance that accepts connections and never answers (`upstream-timeout`, 504), one whose
/// port refuses them (`upstream-connect-failure`, 503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoys_own_errors_name_the_service_and_the_reason() {
    // Accepts and holds every connection, never answering.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let closed_port = support::free_port();
    let caller = MeshService::build("frontend")
        .dependency_with(json!({"service": "slow", "timeout": "1s"}))
        .dependency("down");
    let slow = MeshService::build("slow").endpoint("127.0.0.1", silent_port);
    let down = MeshService::build("down").endpoint("127.0.0.1", closed_port);
    let cp = ControlPlane::start(&manifests(&[&caller, &slow, &down]), &[]).await;
    let envoy = Envoy::start(&cp, frontend(false)).await;

    let r = envoy
        .wait_call("slow", "the timeout", |r| r.status == 504)
        .await;
    assert_eq!(r.header("x-meshbridge-reason"), Some("upstream-timeout"));
    assert!(
        r.body.contains("slow did not answer within the timeout"),
        "{}",
        r.body
    );
    let r = envoy
        .wait_call("down", "the refused connection", |r| r.status == 503)
        .await;
    assert_eq!(
        r.header("x-meshbridge-reason"),
        Some("upstream-connect-failure")
    );
    assert!(
        r.body.contains("cannot connect to down (127.0.0.1:"),
        "{}",
        r.body
    );
    holder.abort();
}

/// Reads from `stream` until the end of an HTTP head; returns it.
async fn read_head(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        if stream.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// A WebSocket application: answers the upgrade with `101` and echoes every byte after it.
async fn websocket_echo(listener: tokio::net::TcpListener) {
    use tokio::io::AsyncWriteExt;
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let head = read_head(&mut stream).await.to_ascii_lowercase();
            if !head.contains("upgrade: websocket") {
                let _ = stream
                    .write_all(
                        b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                    )
                    .await;
                return;
            }
            let _ = stream
                .write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
                      sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
                )
                .await;
            let (mut r, mut w) = stream.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// A WebSocket session through the caller's and the callee's Envoy: the upgrade passes,
/// bytes flow both ways, and the session outlives the dependency's request timeout (1 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_passes_and_outlives_the_request_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    let server = tokio::spawn(websocket_echo(app));
    let caller =
        MeshService::build("frontend").dependency_with(json!({"service": "chat", "timeout": "1s"}));
    let ingress_port = support::free_port();
    let chat = MeshService::build("chat").endpoint("127.0.0.1", ingress_port);
    let cp = ControlPlane::start(&manifests(&[&caller, &chat]), &[]).await;
    // The session crosses the caller's Envoy and the callee's.
    let _callee = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "chat".into(),
            ingress_port: Some(ingress_port),
            app_port: Some(app_port),
            ..Default::default()
        },
    )
    .await;
    let envoy = Envoy::start(&cp, frontend(false)).await;
    envoy
        .wait_call("chat", "chat routed", |r| r.status == 400)
        .await;

    let mut ws = tokio::net::TcpStream::connect(envoy.egress_addr())
        .await
        .unwrap();
    ws.write_all(
        b"GET /chat HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let head = read_head(&mut ws).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    for (i, pause) in [(1, 0), (2, 1500)] {
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let message = format!("frame {i}");
        ws.write_all(message.as_bytes()).await.unwrap();
        let mut echo = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), ws.read_exact(&mut echo))
            .await
            .unwrap_or_else(|_| panic!("no echo of {message}"))
            .unwrap_or_else(|e| panic!("{message}: {e}"));
        assert_eq!(String::from_utf8_lossy(&echo), message);
    }

    // Turned off for the dependency: the upgrade is refused at the caller's Envoy.
    let caller = MeshService::build("frontend")
        .dependency_with(json!({"service": "chat", "timeout": "1s", "websocket": false}));
    cp.write_manifests(&manifests(&[&caller, &chat]));
    let refused = support::eventually(Duration::from_secs(20), "websocket off", || async {
        let mut ws = tokio::net::TcpStream::connect(envoy.egress_addr())
            .await
            .ok()?;
        ws.write_all(
            b"GET /chat HTTP/1.1\r\nHost: chat\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .ok()?;
        let head = read_head(&mut ws).await;
        (!head.starts_with("HTTP/1.1 101")).then_some(head)
    })
    .await;
    assert!(refused.starts_with("HTTP/1.1 403"), "{refused}");
    server.abort();
}

/// An application that speaks HTTP/2 only (prior knowledge, as gRPC servers do): each answer
/// names the HTTP version the request came in.
async fn http2_only_app(listener: tokio::net::TcpListener) {
    use hyper::service::service_fn;
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let body = format!("streams answered over {:?}\n", req.version());
                Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                    bytes::Bytes::from(body),
                )))
            });
            let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// A service whose port says `protocol: http2` is called over HTTP/2 by the caller's Envoy
/// and by its own Envoy, whatever the caller's application speaks (HTTP/1.1 here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_service_is_spoken_to_in_http2_through_both_envoys() {
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    let server = tokio::spawn(http2_only_app(app));
    let ingress_port = support::free_port();
    let caller = MeshService::build("frontend").dependency("streams");
    let streams = MeshService::build("streams")
        .set("ports", json!([{"port": 8080, "protocol": "http2"}]))
        .endpoint("127.0.0.1", ingress_port);
    let cp = ControlPlane::start(&manifests(&[&caller, &streams]), &[]).await;
    let _callee = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "streams".into(),
            ingress_port: Some(ingress_port),
            app_port: Some(app_port),
            ..Default::default()
        },
    )
    .await;
    let envoy = Envoy::start(&cp, frontend(false)).await;
    let r = envoy
        .wait_call("streams", "streams over HTTP/2", |r| r.status == 200)
        .await;
    assert!(r.body.contains("HTTP/2.0"), "{}", r.body);
    server.abort();
}

/// An HTTP/1.1 application answering every request with a mixed-case header name and, as
/// its body, the head of the request as it arrived.
async fn mixed_case_app(listener: tokio::net::TcpListener) {
    use tokio::io::AsyncWriteExt;
    while let Ok((mut stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            loop {
                let head = read_head(&mut stream).await;
                if head.is_empty() {
                    return;
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nX-Custom-Header: Kept\r\nContent-Length: {}\r\n\r\n{head}",
                    head.len()
                );
                if stream.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        });
    }
}

/// The response `envoy` gives a raw HTTP/1.1 request for `host` carrying the header
/// `X-Caller-Header`: its head and body.
async fn raw_call(envoy: &Envoy, host: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(envoy.egress_addr())
        .await
        .unwrap();
    let request = format!(
        "GET / HTTP/1.1\r\nHost: {host}\r\nX-Caller-Header: 1\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut out))
        .await
        .expect("no answer")
        .unwrap();
    out
}

/// `spec.http1.preserveHeaderCase`: the header names a service's instances send reach its
/// callers spelled as sent (`X-Custom-Header`), and those a service's application sends reach
/// the services it calls spelled as sent (`X-Caller-Header`); without it Envoy lower-cases
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_case_is_kept_for_services_that_ask_for_it() {
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    let server = tokio::spawn(mixed_case_app(app));
    let keep = json!({"preserveHeaderCase": true});
    let old_client = MeshService::build("old-client")
        .set("http1", keep.clone())
        .dependency("old-api");
    let new_client = MeshService::build("new-client")
        .dependency("old-api")
        .dependency("new-api");
    let old_api = MeshService::build("old-api")
        .set("http1", keep)
        .endpoint("127.0.0.1", app_port);
    let new_api = MeshService::build("new-api").endpoint("127.0.0.1", app_port);
    let docs: [&dyn Fixture; 4] = [&old_client, &new_client, &old_api, &new_api];
    let cp = ControlPlane::start(&manifests(&docs), &[]).await;
    let proxy = |service: &str| EnvoyOptions {
        service: service.into(),
        egress: true,
        ..Default::default()
    };
    let old = Envoy::start(&cp, proxy("old-client")).await;
    let new = Envoy::start(&cp, proxy("new-client")).await;
    for (envoy, host) in [(&old, "old-api"), (&new, "old-api"), (&new, "new-api")] {
        envoy.wait_call(host, "routed", |r| r.status == 200).await;
    }
    // What old-api's instances send keeps its case, for every caller.
    let from_old = raw_call(&new, "old-api").await;
    assert!(
        from_old.contains("\r\nX-Custom-Header: Kept\r\n"),
        "{from_old}"
    );
    let from_new = raw_call(&new, "new-api").await;
    assert!(
        from_new.contains("\r\nx-custom-header: Kept\r\n"),
        "{from_new}"
    );
    // What old-client's application sends keeps its case; new-client's is lower-cased.
    let sent_by_old = raw_call(&old, "old-api").await;
    assert!(
        sent_by_old.contains("\r\nX-Caller-Header: 1\r\n"),
        "{sent_by_old}"
    );
    assert!(
        from_old.contains("\r\nx-caller-header: 1\r\n"),
        "{from_old}"
    );

    // A dependency overrides the callee's setting for its caller: new-client keeps the case
    // towards new-api (both ways), and no longer towards old-api.
    let new_client = MeshService::build("new-client")
        .dependency_with(json!({"service": "old-api", "http1": {"preserveHeaderCase": false}}))
        .dependency_with(json!({"service": "new-api", "http1": {"preserveHeaderCase": true}}));
    let docs: [&dyn Fixture; 4] = [&old_client, &new_client, &old_api, &new_api];
    cp.write_manifests(&manifests(&docs));
    let kept = support::eventually(Duration::from_secs(20), "the override", || async {
        let r = raw_call(&new, "new-api").await;
        r.contains("\r\nX-Custom-Header: Kept\r\n").then_some(r)
    })
    .await;
    assert!(kept.contains("\r\nX-Caller-Header: 1\r\n"), "{kept}");
    let lowered = raw_call(&new, "old-api").await;
    assert!(
        lowered.contains("\r\nx-custom-header: Kept\r\n"),
        "{lowered}"
    );
    // Other callers of old-api still get its case.
    let still = raw_call(&old, "old-api").await;
    assert!(still.contains("\r\nX-Custom-Header: Kept\r\n"), "{still}");
    server.abort();
}

/// An application for retries: per path, it counts the attempts it sees; `/flaky*` answers
/// `503` to the first two and `200` to the third, `/hang*` holds the first attempt without
/// answering (noting when the caller gives up on it: the connection closed) and answers the
/// next one. Every answer closes its connection.
#[derive(Clone, Default)]
struct RetryApp {
    attempts: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, usize>>>,
    abandoned: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl RetryApp {
    async fn serve(self, listener: tokio::net::TcpListener) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut stream, _)) = listener.accept().await {
            let app = self.clone();
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                let attempt = {
                    let mut attempts = app.attempts.lock().unwrap();
                    let n = attempts.entry(path.clone()).or_default();
                    *n += 1;
                    *n
                };
                if path.starts_with("/hang") && attempt == 1 {
                    // Held until the caller closes it (bounded: 30 s).
                    let mut buf = [0u8; 64];
                    let closed =
                        tokio::time::timeout(Duration::from_secs(30), stream.read(&mut buf))
                            .await
                            .is_ok_and(|r| matches!(r, Ok(0) | Err(_)));
                    if closed {
                        app.abandoned.lock().unwrap().push(path);
                    }
                    return;
                }
                let status = if path.starts_with("/flaky") && attempt <= 2 {
                    "503 Service Unavailable"
                } else {
                    "200 OK"
                };
                let body = format!("attempt {attempt}\n");
                let answer = format!(
                    "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(answer.as_bytes()).await;
            });
        }
    }

    fn attempts(&self, path: &str) -> usize {
        self.attempts
            .lock()
            .unwrap()
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

/// A dependency's retries and per-try timeout, seen from the application's side: with
/// `retries: {attempts: 2, on: [5xx], perTryTimeout: 300ms}`, a path answered `503` twice is
/// retried twice and the caller gets the third answer; an attempt that hangs is given up
/// after the per-try timeout (the application sees its connection closed) and retried. With
/// the default policy (retry on connection failure only) the caller gets the first `503`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_and_per_try_timeouts_are_seen_by_the_application() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = RetryApp::default();
    let server = tokio::spawn(app.clone().serve(listener));
    let retrying = json!({"service": "orders", "timeout": "10s",
        "retries": {"attempts": 2, "on": ["5xx"], "perTryTimeout": "300ms"}});
    let caller = MeshService::build("frontend").dependency_with(retrying);
    let orders = MeshService::build("orders").endpoint("127.0.0.1", port);
    let cp = ControlPlane::start(&manifests(&[&caller, &orders]), &[]).await;
    let envoy = Envoy::start(&cp, frontend(false)).await;
    envoy
        .wait_call("orders", "orders routed", |r| r.status == 200)
        .await;

    let r = envoy.call("orders", "/flaky-1").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "attempt 3\n"), "{r:?}");
    assert_eq!(app.attempts("/flaky-1"), 3);

    let r = envoy.call("orders", "/hang-1").await.unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "attempt 2\n"), "{r:?}");
    assert_eq!(app.attempts("/hang-1"), 2);
    eventually(
        Duration::from_secs(10),
        "the hung attempt given up",
        || async {
            app.abandoned
                .lock()
                .unwrap()
                .contains(&"/hang-1".to_string())
                .then_some(())
        },
    )
    .await;

    // The default policy does not retry a 503 (the request reached the application).
    let caller = MeshService::build("frontend").dependency("orders");
    cp.write_manifests(&manifests(&[&caller, &orders]));
    let mut n = 0;
    let r = eventually(Duration::from_secs(20), "the default policy", || {
        n += 1;
        let path = format!("/flaky-default-{n}");
        let envoy = &envoy;
        async move {
            let r = envoy.call("orders", &path).await.ok()?;
            (r.status == 503).then_some((r, path))
        }
    })
    .await;
    assert_eq!(app.attempts(&r.1), 1, "{:?}", r.0);
    server.abort();
}
