//! Graceful drain with real Envoys: the injected sidecar's own `preStop` command, run against
//! the sidecar's Envoy while traffic flows, lets in-flight requests finish, fails `/ready`
//! and then closes the ingress (not the egress); and a rolling restart of a pod-backed
//! service under steady traffic, done as Kubernetes does it (new pod Ready, old pod gets a
//! `deletionTimestamp`, its drain runs, only then its application and Envoy stop), loses no
//! request. Every wait is bounded; every process is killed on drop.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::kube_e2e::{answering, legacy, orders_service, pod};
use crate::support::fixtures::Fixture;
use crate::support::kube_fake::FakeKube;
use crate::support::{
    Backend, ControlPlane, Envoy, EnvoyOptions, Traffic, eventually, free_port, http_get,
};
use meshbridge::bootstrap::{DEFAULT_DRAIN_SECONDS, drain_script};
use meshbridge::webhook::{InjectSettings, Outcome, inject_manifest};

const LIMIT: Duration = Duration::from_secs(20);
/// How long the pods' application takes to answer: with several callers at once, requests
/// are always in flight on every pod, so stopping one without its drain fails some.
const WORK: Duration = Duration::from_millis(100);
/// Request streams of the rolling restart, each one request at a time.
const STREAMS: usize = 4;

/// An application answering `hello from orders NAME: PATH` after `delay` (its work), or
/// after MS milliseconds for `/slow/MS`; stops accepting on drop.
struct App {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    fn start(name: &str, delay: Duration) -> App {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let name = name.to_string();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(answer(stream, name.clone(), delay));
            }
        });
        App { port, task }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads one request from `stream` and answers it (connection closed after).
async fn answer(mut stream: tokio::net::TcpStream, name: String, delay: Duration) {
    let Some(text) = crate::support::read_request_head(&mut stream).await else {
        return;
    };
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_string();
    let delay = path
        .strip_prefix("/slow/")
        .and_then(|ms| ms.parse::<u64>().ok())
        .map_or(delay, Duration::from_millis);
    tokio::time::sleep(delay).await;
    let body = format!("hello from orders {name}: {path}\n");
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

/// A counter or gauge of the Envoy whose admin interface is `admin`.
async fn stat(admin: SocketAddr, name: &str) -> Option<u64> {
    let r = http_get(admin, "localhost", &format!("/stats?filter=^{name}$"), &[])
        .await
        .ok()?;
    r.body
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .and_then(|v| v.trim().parse().ok())
}

/// Runs a `preStop` exec command (`bash -c SCRIPT`) as the kubelet would, bounded; returns
/// its output.
async fn run_hook(command: &[String], limit: Duration) -> String {
    let out = tokio::time::timeout(
        limit,
        tokio::process::Command::new(&command[0])
            .args(&command[1..])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the drain hook ran past its bound")
    .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "the drain hook failed: {text}");
    text
}

fn orders_endpoints(ports: &[u16]) -> String {
    let endpoints: Vec<String> = ports
        .iter()
        .map(|p| format!("{{address: 127.0.0.1, port: {p}}}"))
        .collect();
    format!(
        "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {{name: orders}}\nspec: {{endpoints: [{}]}}\n",
        endpoints.join(", ")
    )
}

/// A sidecar Envoy killed on drop.
struct Sidecar(std::process::Child, tempfile::TempDir);

impl Drop for Sidecar {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.1.path().join("envoy.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(30).collect();
            eprintln!(
                "--- sidecar log (last lines) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_prestop_hook_lets_in_flight_requests_finish_then_closes_the_ingress() {
    let app = App::start("sidecar", Duration::ZERO);
    let app_port = app.port;
    let other = Backend::start("orders", "other").await;
    let (ingress, egress) = (free_port(), free_port());
    let cp = ControlPlane::start(&orders_endpoints(&[ingress, other.port]), &[]).await;
    let settings = InjectSettings {
        xds_addr: cp.xds_addr(),
        admin_port: free_port(),
        ready_port: free_port(),
        drain_seconds: 3,
        ..InjectSettings::default()
    };
    let manifest = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "orders-7d9f", "namespace": "shop", "labels": {"app": "orders"},
                     "annotations": {"meshbridge.io/ingress-port": ingress.to_string(),
                                     "meshbridge.io/egress-port": egress.to_string(),
                                     "meshbridge.io/app-port": app_port.to_string()}},
        "spec": {"containers": [{"name": "app", "image": "orders:1"}]},
    });
    let (pod, outcome) = inject_manifest(manifest, &settings).unwrap();
    assert_eq!(outcome, Outcome::Injected);
    let sidecar = &pod["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "meshbridge-proxy");
    let hook: Vec<String> =
        serde_json::from_value(sidecar["lifecycle"]["preStop"]["exec"]["command"].clone()).unwrap();
    let args: Vec<String> = sidecar["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("$(POD_NAME)", "orders-7d9f")
                .replace("$(POD_NAMESPACE)", "shop")
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
    let child = Command::new(crate::support::envoy_bin())
        .args(&args)
        .args(["--concurrency", "1", "--base-id", &free_port().to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let _sidecar = Sidecar(child, dir);
    let admin = SocketAddr::from(([127, 0, 0, 1], settings.admin_port));
    let ready = SocketAddr::from(([127, 0, 0, 1], settings.ready_port));
    let ingress_addr = SocketAddr::from(([127, 0, 0, 1], ingress));

    let caller = Arc::new(Envoy::start(&cp, legacy(&["orders"])).await);
    eventually(LIMIT, "both instances answer the caller", || async {
        let seen = answering(&caller, "orders", 10).await;
        (seen.len() == 2).then_some(())
    })
    .await;
    let traffic = Traffic::start(caller.clone(), "orders", Duration::from_millis(20));
    // In flight when the drain starts: one ends during the drain, one after the inbound
    // listener has closed.
    let slow = |ms: u64| {
        tokio::spawn(
            async move { http_get(ingress_addr, "orders", &format!("/slow/{ms}"), &[]).await },
        )
    };
    let (short, long) = (slow(1500), slow(4000));
    tokio::time::sleep(Duration::from_millis(300)).await;

    let started = Instant::now();
    let hook_run = tokio::spawn(async move { run_hook(&hook, Duration::from_secs(15)).await });
    // Draining: readiness fails at once, and the control plane drops the instance (what it
    // does for a pod with a deletionTimestamp); new connections are still served meanwhile.
    let r = eventually(LIMIT, "/ready answers 503", || async {
        let r = http_get(ready, "localhost", "/ready", &[]).await.ok()?;
        (r.status == 503).then_some(r)
    })
    .await;
    assert!(r.body.contains("DRAINING"), "{}", r.body);
    cp.write_manifests(&orders_endpoints(&[other.port]));
    let r = http_get(ingress_addr, "orders", "/", &[]).await.unwrap();
    assert_eq!(r.status, 200, "a caller that has not heard yet is served");
    assert_eq!(r.header("connection"), Some("close"), "{:?}", r.headers);

    let printed = hook_run.await.unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(3),
        "the hook returned before the drain time: {took:?}"
    );
    assert_eq!(printed.matches("200 OK").count(), 2, "{printed}");
    let short = short.await.unwrap().unwrap();
    assert_eq!(short.status, 200, "{}", short.body);
    assert!(short.body.contains("/slow/1500"), "{}", short.body);

    // After the drain: the ingress takes no new connection; the egress still does.
    eventually(LIMIT, "the inbound listener stopped", || async {
        tokio::net::TcpStream::connect(ingress_addr)
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert_eq!(
        stat(admin, "listener_manager.listener_stopped").await,
        Some(1),
        "only the ingress"
    );
    assert!(
        tokio::net::TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], egress)))
            .await
            .is_ok(),
        "the application's egress stays up until Envoy stops"
    );
    // The request in flight when the listener closed still completes.
    let long = long.await.unwrap().unwrap();
    assert_eq!(long.status, 200, "{}", long.body);
    let r = http_get(ready, "localhost", "/ready", &[]).await.unwrap();
    assert_eq!(r.status, 503);
    // The gauge follows at Envoy's next stats flush (every 5 s).
    eventually(LIMIT, "server.state is DRAINING (1)", || async {
        (stat(admin, "server.state").await == Some(1)).then_some(())
    })
    .await;
    traffic.assert_no_failure().await;
}

/// A pod of the rolling restart: its application, its sidecar (a real Envoy whose ingress
/// forwards to the application) and its Pod object.
struct PodRun {
    name: String,
    app: App,
    sidecar: Envoy,
    ingress: u16,
}

/// The Pod object of `run`, `ready` or not; it carries a finalizer so that deleting it sets
/// `deletionTimestamp` first, as a graceful deletion of a real pod does.
fn pod_object(run: &PodRun, ready: bool) -> Value {
    let mut p = pod(&run.name, "orders", run.ingress, ready);
    p["metadata"]["finalizers"] = json!(["test.meshbridge.io/running"]);
    p
}

/// Starts pod `orders-NAME` as the kubelet would: containers up, then Ready once the
/// sidecar's readiness passes.
async fn start_pod(kube: &FakeKube, cp: &ControlPlane, name: &str) -> PodRun {
    let app = App::start(&format!("pod-{name}"), WORK);
    let ingress = free_port();
    let sidecar = Envoy::start(
        cp,
        EnvoyOptions {
            service: "orders".into(),
            ingress_port: Some(ingress),
            app_port: Some(app.port),
            ..Default::default()
        },
    )
    .await;
    let run = PodRun {
        name: format!("orders-{name}"),
        app,
        sidecar,
        ingress,
    };
    kube.apply(pod_object(&run, false));
    let admin = run.sidecar.admin_addr();
    eventually(LIMIT, "the new pod's sidecar is ready", || async {
        let r = http_get(admin, "localhost", "/ready", &[]).await.ok()?;
        (r.status == 200).then_some(())
    })
    .await;
    kube.apply(pod_object(&run, true));
    run
}

/// Stops `run` as Kubernetes does: `deletionTimestamp` set (the control plane drops the
/// endpoint), the preStop drain, then the application and Envoy stop; the kubelet then
/// removes the Pod object.
async fn stop_pod(kube: &FakeKube, run: PodRun) {
    assert!(kube.delete("v1", "Pod", Some("shop"), &run.name));
    let stored = kube.get("v1", "Pod", Some("shop"), &run.name).unwrap();
    assert!(
        stored["metadata"].get("deletionTimestamp").is_some(),
        "{stored}"
    );
    let hook = vec![
        "bash".to_string(),
        "-c".to_string(),
        drain_script(run.sidecar.admin_port, DEFAULT_DRAIN_SECONDS),
    ];
    run_hook(
        &hook,
        Duration::from_secs(u64::from(DEFAULT_DRAIN_SECONDS) + 10),
    )
    .await;
    let PodRun {
        name, app, sidecar, ..
    } = run;
    drop(app);
    drop(sidecar);
    let mut gone = kube.get("v1", "Pod", Some("shop"), &name).unwrap();
    gone["metadata"]["finalizers"] = json!([]);
    kube.apply(gone);
    assert!(kube.get("v1", "Pod", Some("shop"), &name).is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_traffic_loses_no_request() {
    let kube = FakeKube::start().await;
    kube.apply(orders_service().json());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let mut cp = ControlPlane::start_kube(&kubeconfig, "", &[]);
    cp.wait_ready().await;
    let a = start_pod(&kube, &cp, "a").await;
    let b = start_pod(&kube, &cp, "b").await;
    let caller = Arc::new(Envoy::start(&cp, legacy(&["orders"])).await);
    eventually(LIMIT, "both pods answer", || async {
        (answering(&caller, "orders", 10).await.len() == 2).then_some(())
    })
    .await;
    let traffic: Vec<Traffic> = (0..STREAMS)
        .map(|_| Traffic::start(caller.clone(), "orders", Duration::from_millis(5)))
        .collect();

    // One at a time (maxSurge 1, maxUnavailable 0): a new pod Ready, then an old one stops.
    let mut running = Vec::new();
    for (old, new) in [(a, "c"), (b, "d")] {
        let new = start_pod(&kube, &cp, new).await;
        let wanted = format!("hello from orders pod-{}", &new.name["orders-".len()..]);
        eventually(LIMIT, "the new pod answers", || async {
            answering(&caller, "orders", 10)
                .await
                .contains(&wanted)
                .then_some(())
        })
        .await;
        stop_pod(&kube, old).await;
        running.push(new);
    }
    eventually(LIMIT, "only the new pods answer", || async {
        let seen = answering(&caller, "orders", 12).await;
        (seen.len() == 2
            && seen.contains("hello from orders pod-c")
            && seen.contains("hello from orders pod-d"))
        .then_some(())
    })
    .await;
    let ok: usize = traffic.iter().map(|t| t.counts().0).sum();
    eprintln!("{ok} requests during the rolling restart");
    for t in traffic {
        t.assert_no_failure().await;
    }
    drop(running);
}
