//! What legacy services speak besides HTTP/1, end to end through real Envoys: gRPC (retries
//! on `UNAVAILABLE`, the caller's deadline) and opaque TCP (a port per dependency, mutual
//! TLS, access rules by certificate).

use crate::support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use support::fixtures::{AccessRule, MeshService, manifests};
use support::{ControlPlane, Envoy, EnvoyOptions, eventually, issue_identity};
use tonic::codegen::{BoxFuture, Context, Poll, Service, http};

/// The one message of the echo service: a text.
#[derive(Clone, PartialEq, prost::Message)]
struct Text {
    #[prost(string, tag = "1")]
    text: String,
}

const SAY: &str = "/meshbridge.test.Echo/Say";

/// A gRPC echo application (tonic, no generated code). `Say` answers the text back; a text
/// starting `flaky` is answered `UNAVAILABLE` on its first attempt, one starting `slow` after
/// 3 s. Counts the attempts per text.
#[derive(Clone, Default)]
struct EchoApp {
    attempts: Arc<Mutex<HashMap<String, usize>>>,
}

impl EchoApp {
    fn attempts(&self, text: &str) -> usize {
        self.attempts
            .lock()
            .unwrap()
            .get(text)
            .copied()
            .unwrap_or(0)
    }
}

impl tonic::server::UnaryService<Text> for EchoApp {
    type Response = Text;
    type Future = BoxFuture<tonic::Response<Text>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<Text>) -> Self::Future {
        let text = request.into_inner().text;
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap();
            let n = attempts.entry(text.clone()).or_default();
            *n += 1;
            *n
        };
        Box::pin(async move {
            if text.starts_with("flaky") && attempt == 1 {
                return Err(tonic::Status::unavailable("warming up"));
            }
            if text.starts_with("slow") {
                tokio::time::sleep(Duration::from_secs(3)).await;
            }
            Ok(tonic::Response::new(Text { text }))
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for EchoApp {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let app = self.clone();
        Box::pin(async move {
            if request.uri().path() == SAY {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(app, request).await)
            } else {
                Ok(tonic::Status::unimplemented(request.uri().path().to_string()).into_http())
            }
        })
    }
}

impl tonic::server::NamedService for EchoApp {
    const NAME: &'static str = "meshbridge.test.Echo";
}

/// Serves `app` on a fresh port; returns the port.
async fn serve_grpc(app: EchoApp) -> (u16, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(app)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    (port, task)
}

/// A gRPC client of `service` through `envoy`'s egress listener (the authority names the
/// service, as a client configured with `http://SERVICE` sends it), once the listener,
/// which comes with the proxy's first configuration, accepts connections.
async fn grpc_client(
    envoy: &Envoy,
    service: &str,
) -> tonic::client::Grpc<tonic::transport::Channel> {
    let endpoint =
        tonic::transport::Endpoint::from_shared(format!("http://{}", envoy.egress_addr()))
            .unwrap()
            .origin(format!("http://{service}").parse().unwrap())
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10));
    let channel = eventually(
        Duration::from_secs(20),
        "the egress listener accepting",
        || async { endpoint.connect().await.ok() },
    )
    .await;
    tonic::client::Grpc::new(channel)
}

/// One `Say` call.
async fn say(
    client: &mut tonic::client::Grpc<tonic::transport::Channel>,
    text: &str,
) -> Result<String, tonic::Status> {
    client
        .ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let request = tonic::Request::new(Text {
        text: text.to_string(),
    });
    client
        .unary(
            request,
            http::uri::PathAndQuery::from_static(SAY),
            tonic_prost::ProstCodec::<Text, Text>::default(),
        )
        .await
        .map(|r: tonic::Response<Text>| r.into_inner().text)
}

/// One `Say` call written by hand (HTTP/1.1 to the egress listener, which Envoy carries on
/// as gRPC), with `grpc-timeout: DEADLINE`: unlike a gRPC library, the client does not
/// enforce the deadline itself, so what ends the call early is Envoy. The raw response.
async fn say_with_deadline(envoy: &Envoy, service: &str, text: &str, deadline: &str) -> String {
    use prost::Message as _;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let message = Text {
        text: text.to_string(),
    }
    .encode_to_vec();
    let mut body = vec![0u8];
    body.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&message);
    let head = format!(
        "POST {SAY} HTTP/1.1\r\nHost: {service}\r\ncontent-type: application/grpc\r\n\
         te: trailers\r\ngrpc-timeout: {deadline}\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        body.len()
    );
    let mut stream = tokio::net::TcpStream::connect(envoy.egress_addr())
        .await
        .unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut out))
        .await
        .expect("no answer within 10 s")
        .unwrap();
    String::from_utf8_lossy(&out).to_ascii_lowercase()
}

/// A gRPC call crosses the caller's and the callee's Envoy over HTTP/2. A call answered
/// `UNAVAILABLE` is retried by default (the application sees two attempts, the client one
/// success); with `retries: {attempts: 0}` the client sees the `UNAVAILABLE`. A caller's
/// `grpc-timeout` shorter than the dependency's timeout ends the call at the caller's Envoy,
/// which says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_call_is_retried_on_unavailable_and_keeps_the_callers_deadline() {
    let app = EchoApp::default();
    let (app_port, server) = serve_grpc(app.clone()).await;
    let ingress_port = support::free_port();
    let echo = MeshService::build("echo")
        .set("ports", json!([{"port": 9090, "protocol": "grpc"}]))
        .endpoint("127.0.0.1", ingress_port);
    let caller = MeshService::build("frontend").dependency("echo");
    let cp = ControlPlane::start(&manifests(&[&caller, &echo]), &[]).await;
    let _callee = Envoy::start(&cp, EnvoyOptions::callee("echo", ingress_port, app_port)).await;
    let envoy = Envoy::start(&cp, EnvoyOptions::caller("frontend")).await;
    let mut client = grpc_client(&envoy, "echo").await;
    let mut n = 0;
    eventually(Duration::from_secs(20), "echo answers over gRPC", || {
        n += 1;
        let text = format!("hello {n}");
        let mut client = client.clone();
        async move { say(&mut client, &text).await.ok() }
    })
    .await;

    let detail = cp.admin_json("/api/services/echo").await;
    assert_eq!(
        (&detail["protocol"], &detail["port"]),
        (&json!("grpc"), &json!(9090)),
        "{detail}"
    );

    // Retried by default: the application saw the attempt it refused and the retry.
    assert_eq!(say(&mut client, "flaky 1").await.unwrap(), "flaky 1");
    assert_eq!(app.attempts("flaky 1"), 2);

    // The caller's deadline (500 ms) ends the call long before the dependency's timeout
    // (15 s), at the caller's Envoy, which says so; a longer one lets it finish (3 s).
    let timed_out = say_with_deadline(&envoy, "echo", "slow 1", "500m").await;
    assert!(timed_out.contains("grpc-status: 4\r\n"), "{timed_out}");
    assert!(
        timed_out.contains("x-meshbridge-reason: deadline-exceeded\r\n"),
        "{timed_out}"
    );
    let answered = say_with_deadline(&envoy, "echo", "slow 2", "8S").await;
    assert!(answered.contains("slow 2"), "{answered}");

    // Without retries the client sees what the application answered.
    let caller = MeshService::build("frontend")
        .dependency_with(json!({"service": "echo", "retries": {"attempts": 0}}));
    cp.write_manifests(&manifests(&[&caller, &echo]));
    let mut n = 0;
    let refused = eventually(Duration::from_secs(20), "retries turned off", || {
        n += 1;
        let text = format!("flaky off {n}");
        let mut client = client.clone();
        async move { say(&mut client, &text).await.err() }
    })
    .await;
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert_eq!(refused.message(), "warming up");
    server.abort();
}

/// A TCP application that echoes every byte back.
async fn tcp_echo(listener: tokio::net::TcpListener) {
    while let Ok((stream, _)) = listener.accept().await {
        tokio::spawn(async move {
            let (mut r, mut w) = stream.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
        });
    }
}

/// Connects to `port` on 127.0.0.1, writes `message` and reads as many bytes back: the echo,
/// or why there was none.
async fn echo_through(port: u16, message: &str) -> Result<String, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .write_all(message.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut echo = vec![0u8; message.len()];
        stream
            .read_exact(&mut echo)
            .await
            .map_err(|e| format!("read: {e}"))?;
        Ok(String::from_utf8_lossy(&echo).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| Err("no echo within 5 s".into()))
}

/// A `tcp` service behind its Envoy (strict mutual TLS, one AccessRule): the caller the rule
/// names reaches the application's echo through its own Envoy's port for the service (the
/// service's port, shown in `/api/proxies/NODE`); another caller with a valid certificate,
/// on the port its dependency names, has its connections closed, counted by the callee's
/// network RBAC. An HTTP request for the service says where to connect instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tcp_service_is_reached_on_a_port_of_the_callers_over_mtls_with_access_rules() {
    const TRUST_DOMAIN: &str = "mesh.local";
    let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app_port = app.local_addr().unwrap().port();
    let server = tokio::spawn(tcp_echo(app));
    let pki = tempfile::tempdir().unwrap();
    let identity = |service: &str| issue_identity(pki.path(), "mesh", service, TRUST_DOMAIN);
    let (ingress_port, service_port, reports_port) = (
        support::free_port(),
        support::free_port(),
        support::free_port(),
    );
    let cache = MeshService::build("cache")
        .set("ports", json!([{"port": service_port, "protocol": "tcp"}]))
        .set("mtls", "strict")
        .endpoint("127.0.0.1", ingress_port);
    let frontend = MeshService::build("frontend").dependency("cache");
    let reports = MeshService::build("reports")
        .dependency_with(json!({"service": "cache", "port": reports_port}));
    let rule = AccessRule::build("cache-clients")
        .target("cache")
        .allow(&["frontend"]);
    let cp = ControlPlane::start(&manifests(&[&cache, &frontend, &reports, &rule]), &[]).await;
    let callee = Envoy::start(
        &cp,
        EnvoyOptions {
            tls: Some(identity("cache")),
            ..EnvoyOptions::callee("cache", ingress_port, app_port)
        },
    )
    .await;
    let caller = |service: &str| EnvoyOptions {
        tls: Some(identity(service)),
        ..EnvoyOptions::caller(service)
    };
    let frontend_envoy = Envoy::start(&cp, caller("frontend")).await;
    let reports_envoy = Envoy::start(&cp, caller("reports")).await;

    let echo = eventually(
        Duration::from_secs(20),
        "frontend reaches cache",
        || async { echo_through(service_port, "ping").await.ok() },
    )
    .await;
    assert_eq!(echo, "ping");
    let detail = cp
        .admin_json(&format!("/api/proxies/{}", frontend_envoy.node_id))
        .await;
    assert_eq!(
        detail["tcp_ports"],
        json!({"cache": service_port}),
        "{detail}"
    );

    // reports' Envoy listens on the port its dependency names; the callee closes it out.
    eventually(
        Duration::from_secs(20),
        "reports' port for cache",
        || async {
            tokio::net::TcpStream::connect(("127.0.0.1", reports_port))
                .await
                .ok()
        },
    )
    .await;
    let refused = echo_through(reports_port, "ping").await;
    assert!(refused.is_err(), "{refused:?}");
    let denied = eventually(Duration::from_secs(10), "the denial counted", || async {
        callee.stat("ingress.rbac.denied").await.filter(|n| *n > 0)
    })
    .await;
    assert!(denied >= 1);
    assert!(callee.stat("ingress.rbac.allowed").await.unwrap_or(0) >= 1);

    // Asked over HTTP, the egress listener says where to connect.
    let r = frontend_envoy.call("cache", "/").await.unwrap();
    assert_eq!(r.status, 400, "{r:?}");
    assert_eq!(r.header("x-meshbridge-reason"), Some("tcp-service"));
    assert!(
        r.body
            .contains(&format!("connect to 127.0.0.1:{service_port}")),
        "{}",
        r.body
    );
    drop(reports_envoy);
    server.abort();
}

/// A service serving three ports behind one Envoy (strict mutual TLS): its API, an admin
/// port and a `tcp` port. The host's Envoy serves each further port on a listener of its own
/// (`bootstrap --port`), the manifest registers those listeners (`endpoints[].ports`), and a
/// caller reaches each port by naming it: `Host: orders:admin` or the port's number
/// (`orders:9090`), and its own local port for the `tcp` one. The service's AccessRules guard
/// every port: a caller depending on `orders:admin` that no rule names is refused by the
/// admin port's listener. A port the caller did not declare is refused by its own Envoy, not
/// taken for the first port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_port_of_a_multi_port_service_is_reached_by_name_behind_the_same_access_rules() {
    const TRUST_DOMAIN: &str = "mesh.local";
    let api = support::Backend::start("orders", "api").await;
    let admin = support::Backend::start("orders", "admin").await;
    let db = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let db_app_port = db.local_addr().unwrap().port();
    let db_server = tokio::spawn(tcp_echo(db));
    let pki = tempfile::tempdir().unwrap();
    let identity = |service: &str| issue_identity(pki.path(), "mesh", service, TRUST_DOMAIN);
    let [ingress, admin_ingress, db_ingress, db_port] = [(); 4].map(|()| support::free_port());
    let orders = MeshService::build("orders")
        .set(
            "ports",
            json!([
                {"name": "http", "port": 8080},
                {"name": "admin", "port": 9090},
                {"name": "db", "port": db_port, "protocol": "tcp"},
            ]),
        )
        .set("mtls", "strict")
        .endpoint_with(json!({
            "address": "127.0.0.1",
            "port": ingress,
            "ports": {"admin": admin_ingress, "db": db_ingress},
        }));
    let frontend = MeshService::build("frontend")
        .dependency("orders")
        .dependency("orders:admin")
        .dependency("orders:db");
    let reports = MeshService::build("reports").dependency("orders:admin");
    let rule = AccessRule::build("orders-clients")
        .target("orders")
        .allow(&["frontend"]);
    let cp = ControlPlane::start(&manifests(&[&orders, &frontend, &reports, &rule]), &[]).await;
    let callee = Envoy::start(
        &cp,
        EnvoyOptions {
            tls: Some(identity("orders")),
            ports: vec![
                format!("admin={admin_ingress}:{}", admin.port),
                format!("db={db_ingress}:{db_app_port}"),
            ],
            ..EnvoyOptions::callee("orders", ingress, api.port)
        },
    )
    .await;
    let caller = |service: &str| EnvoyOptions {
        tls: Some(identity(service)),
        ..EnvoyOptions::caller(service)
    };
    let frontend_envoy = Envoy::start(&cp, caller("frontend")).await;
    let reports_envoy = Envoy::start(&cp, caller("reports")).await;

    let answer = |host: &'static str| {
        let envoy = &frontend_envoy;
        move || async move {
            envoy
                .call(host, "/x")
                .await
                .ok()
                .filter(|r| r.status == 200)
        }
    };
    let r = eventually(Duration::from_secs(20), "orders' API", answer("orders")).await;
    assert!(r.body.starts_with("hello from orders api"), "{}", r.body);
    for host in ["orders:admin", "orders:9090", "ORDERS:admin"] {
        let r = eventually(Duration::from_secs(20), "orders' admin port", answer(host)).await;
        assert!(
            r.body.starts_with("hello from orders admin"),
            "{host}: {}",
            r.body
        );
    }
    // Another port number is the first port, as without named ports.
    let r = frontend_envoy.call("orders:8080", "/").await.unwrap();
    assert!(r.body.starts_with("hello from orders api"), "{}", r.body);
    let echo = eventually(Duration::from_secs(20), "orders' db port", || async {
        echo_through(db_port, "ping").await.ok()
    })
    .await;
    assert_eq!(echo, "ping");

    // reports may name the admin port but no rule lets it in: the admin port's listener
    // refuses it (mutual TLS, then RBAC), and reports' Envoy refuses the API itself.
    let refused = eventually(Duration::from_secs(20), "reports refused", || async {
        reports_envoy
            .call("orders:admin", "/")
            .await
            .ok()
            .filter(|r| r.status == 403)
    })
    .await;
    assert!(!refused.body.contains("hello"), "{}", refused.body);
    let denied = eventually(Duration::from_secs(10), "the denial counted", || async {
        callee
            .stat("http.ingress|admin.rbac.orders.denied")
            .await
            .filter(|n| *n > 0)
    })
    .await;
    assert!(denied >= 1);
    let r = reports_envoy.call("orders", "/").await.unwrap();
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(
        r.header("x-meshbridge-reason"),
        Some("undeclared-dependency")
    );
    assert!(r.body.contains("name the port"), "{}", r.body);

    // The admin API shows the ports, and each port's instances.
    let detail = cp.admin_json("/api/services/orders").await;
    assert_eq!(
        detail["ports"],
        json!([
            {"name": "admin", "port": 9090, "target_port": 9090, "protocol": "http"},
            {"name": "db", "port": db_port, "target_port": db_port, "protocol": "tcp"},
        ]),
        "{detail}"
    );
    let port = cp.admin_json("/api/services/orders:admin").await;
    assert_eq!(port["instances"][0]["port"], json!(admin_ingress), "{port}");
    assert_eq!(port["access"]["target"], json!("orders"), "{port}");
    db_server.abort();
}
