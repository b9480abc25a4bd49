//! Sidecar injection end to end, as in a cluster: the Kubernetes API fake calls meshbridge's
//! admission webhooks the way the API server would, from the MutatingWebhookConfiguration and
//! ValidatingWebhookConfiguration of the rendered Helm chart (default values) and with the
//! certificate Helm generated for `meshbridge-webhook.mesh-system.svc`; a Pod created through
//! the API gets the sidecar, and that sidecar's own arguments run a real Envoy that connects
//! to meshbridge and carries a legacy host's traffic to the pod's application. Every wait is
//! bounded; every process is killed on drop.

use crate::support;
use crate::support::helm;
use crate::support::kube_fake;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client, Config, ResourceExt};
use meshbridge::api::mesh_service::{MeshService, MeshServiceSpec, ServicePort};
use serde_json::{Value, json};

use kube_fake::{FakeKube, assert_rbac_covers};
use support::{
    Backend, ControlPlane, Envoy, EnvoyOptions, envoy_bin, eventually, free_port, http_get,
};

const LIMIT: Duration = Duration::from_secs(20);

/// Stands for the `meshbridge-xds` Service (kube-proxy) between sidecars and meshbridge:
/// forwards every TCP connection on `front` to `to`. (The sidecar's xDS address is a
/// `meshbridge run` flag, and `ControlPlane` picks meshbridge's xDS port itself.)
struct Forwarder(tokio::task::JoinHandle<()>);

impl Forwarder {
    fn start(front: tokio::net::TcpListener, to: SocketAddr) -> Forwarder {
        Forwarder(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = front.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                conns.spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(to).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        }))
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        // Dropping the task's JoinSet aborts every forwarded connection.
        self.0.abort();
    }
}

/// The injected sidecar, run as the kubelet would run the container.
struct Sidecar {
    child: Child,
    dir: tempfile::TempDir,
}

impl Sidecar {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- sidecar envoy log (last lines) ---\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The container's `args` with `$(VAR)` expanded from its `env` (`value`, or a `fieldRef`
/// to `metadata.name` / `metadata.namespace` of `pod`), as the kubelet expands them.
fn expanded_args(pod: &Value, container: &Value) -> Vec<String> {
    let vars: Vec<(String, String)> = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                Some("metadata.name") => pod["metadata"]["name"].as_str()?,
                Some("metadata.namespace") => pod["metadata"]["namespace"].as_str()?,
                Some(_) => return None,
                None => e["value"].as_str()?,
            };
            Some((e["name"].as_str()?.to_string(), value.to_string()))
        })
        .collect();
    container["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let mut a = a.as_str().unwrap().to_string();
            for (name, value) in &vars {
                a = a.replace(&format!("$({name})"), value);
            }
            a
        })
        .collect()
}

fn base64_decode(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap()
}

/// A MeshService `orders` selecting the pods labelled `app: orders`; `port` as given.
fn orders_service(name: &str, port: u32) -> MeshService {
    MeshService::new(
        name,
        MeshServiceSpec {
            service_name: Some("orders".into()),
            selector: Some([("app".to_string(), "orders".to_string())].into()),
            ports: vec![ServicePort {
                port,
                ..Default::default()
            }],
            ..Default::default()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_created_through_the_api_gets_a_sidecar_that_carries_traffic() {
    let started = Instant::now();
    // The chart as `helm install meshbridge -n mesh-system` renders it.
    let rendered = tokio::task::spawn_blocking(|| helm::render(""))
        .await
        .unwrap();
    let mutating = rendered.one("MutatingWebhookConfiguration").clone();
    let validating = rendered.one("ValidatingWebhookConfiguration").clone();
    let secret = rendered.one("Secret").clone();
    let inject_hook = mutating["webhooks"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let validate_hook = validating["webhooks"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let service = &mutating["webhooks"][0]["clientConfig"]["service"];
    assert_eq!(
        (&service["namespace"], &service["name"]),
        (&json!(helm::NAMESPACE), &json!("meshbridge-webhook"))
    );
    let work = tempfile::tempdir().unwrap();
    let cert_dir = work.path().join("webhook");
    std::fs::create_dir(&cert_dir).unwrap();
    for file in ["tls.crt", "tls.key"] {
        let data = base64_decode(secret["data"][file].as_str().unwrap());
        std::fs::write(cert_dir.join(file), data).unwrap();
    }

    let kube = FakeKube::start().await;
    kube.apply(mutating);
    kube.apply(validating);
    kube.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                      "metadata": {"name": "shop", "labels": {"meshbridge.io/inject": "enabled"}}}));
    let kubeconfig = kube.write_kubeconfig(work.path());

    let webhook_port = free_port();
    let sidecar_ports: Vec<u16> = {
        let mut ports = Vec::new();
        while ports.len() < 4 {
            let p = free_port();
            if !ports.contains(&p) && p != webhook_port {
                ports.push(p);
            }
        }
        ports
    };
    let [ingress, egress, admin, ready] = sidecar_ports[..] else {
        unreachable!()
    };
    let xds_front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let sidecar_xds = xds_front.local_addr().unwrap().to_string();
    let (webhook_addr, cert_dir_arg) = (
        format!("127.0.0.1:{webhook_port}"),
        cert_dir.display().to_string(),
    );
    let port_args: Vec<String> = [ingress, egress, admin, ready]
        .iter()
        .map(u16::to_string)
        .collect();
    let mut cp = ControlPlane::start_kube(
        &kubeconfig,
        "",
        &[
            "--webhook-cert-dir",
            &cert_dir_arg,
            "--webhook-addr",
            &webhook_addr,
            "--sidecar-xds-addr",
            &sidecar_xds,
            "--sidecar-ingress-port",
            &port_args[0],
            "--sidecar-egress-port",
            &port_args[1],
            "--sidecar-admin-port",
            &port_args[2],
            "--sidecar-ready-port",
            &port_args[3],
        ],
    );
    cp.wait_ready().await;
    let _xds_service = Forwarder::start(xds_front, cp.xds_addr().parse().unwrap());
    let webhook = SocketAddr::from(([127, 0, 0, 1], webhook_port));
    kube.route_service(helm::NAMESPACE, "meshbridge-webhook", 443, webhook);
    eventually(LIMIT, "the webhook listens", || async {
        tokio::net::TcpStream::connect(webhook).await.ok()
    })
    .await;

    // A ReplicaSet controller creates the pod through the API.
    let backend = Backend::start("orders", "pod-1").await;
    let client = {
        // The test's client, told apart from meshbridge's by assert_rbac_covers.
        let mut config = Config::new(kube.url().parse().unwrap());
        config.headers.push((
            http::header::USER_AGENT,
            http::HeaderValue::from_static(kube_fake::TEST_USER_AGENT),
        ));
        Client::try_from(config).unwrap()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), "shop");
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "orders-5d8f7c9b6-",
            "labels": {"app": "orders", "pod-template-hash": "5d8f7c9b6"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                                 "name": "orders-5d8f7c9b6", "uid": "7c1e5f0e-2b8a-4c33-9d64-3f0f2b6f6d11",
                                 "controller": true, "blockOwnerDeletion": true}],
        },
        "spec": {"containers": [{"name": "app", "image": "orders:1.4",
                                 "ports": [{"containerPort": backend.port}]}]},
    }))
    .unwrap();
    let created = pods.create(&PostParams::default(), &pod).await.unwrap();
    let name = created.name_any();
    let stored = kube.get("v1", "Pod", Some("shop"), &name).unwrap();
    let calls: Vec<_> = kube
        .admission_calls()
        .into_iter()
        .filter(|c| c.webhook == inject_hook)
        .collect();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let call = &calls[0];
    assert!(
        call.allowed && call.patched && call.error.is_none(),
        "{call:?}"
    );
    assert_eq!(
        (
            call.operation.as_str(),
            call.resource.as_str(),
            call.namespace.as_deref()
        ),
        ("CREATE", "pods", Some("shop"))
    );
    let sidecar = stored["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == "meshbridge-proxy")
        .unwrap_or_else(|| panic!("no native sidecar in the stored pod: {stored:#}"))
        .clone();
    assert_eq!(sidecar["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(
        stored["metadata"]["annotations"]["meshbridge.io/ingress-port"],
        ingress.to_string()
    );

    // The chart's namespaceSelector keeps kube-system away from the webhook (through the
    // namespace's `kubernetes.io/metadata.name` label).
    let system: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let mut plain = pod.clone();
    plain.metadata.owner_references = None;
    let plain = system.create(&PostParams::default(), &plain).await.unwrap();
    assert!(
        plain.spec.unwrap().init_containers.is_none(),
        "not injected"
    );
    assert_eq!(
        kube.admission_calls().len(),
        1,
        "the webhook was not called"
    );

    // The kubelet starts the sidecar with its own arguments.
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
    let child = Command::new(envoy_bin())
        .args(expanded_args(&stored, &sidecar))
        .args(["--base-id", &free_port().to_string(), "--concurrency", "1"])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let sidecar_envoy = Sidecar { child, dir };
    let ready_addr = SocketAddr::from(([127, 0, 0, 1], ready));
    eventually(
        LIMIT,
        "the sidecar's readiness listener answers 200",
        || async {
            let r = http_get(ready_addr, "localhost", "/ready", &[])
                .await
                .ok()?;
            (r.status == 200).then_some(())
        },
    )
    .await;
    let node = format!("{name}.shop");
    let proxy = eventually(LIMIT, "meshbridge lists the sidecar", || async {
        let proxies = cp.admin_json("/api/proxies").await;
        proxies
            .as_array()?
            .iter()
            .find(|p| p["node"] == node.as_str())
            .cloned()
    })
    .await;
    assert_eq!(proxy["service"], "orders");

    // The kubelet reports the pod running and ready; the service is declared over the API.
    let mut running = stored.clone();
    running["status"] = json!({
        "phase": "Running",
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": "True"}],
    });
    kube.apply(running);
    let msvcs: Api<MeshService> = Api::namespaced(client.clone(), "shop");
    msvcs
        .create(&PostParams::default(), &orders_service("orders", 8080))
        .await
        .unwrap();
    let validated = kube
        .admission_calls()
        .into_iter()
        .find(|c| c.webhook == validate_hook)
        .unwrap();
    assert!(
        validated.allowed && validated.error.is_none(),
        "{validated:?}"
    );

    // A legacy host calls `orders`: through its Envoy, to the pod's sidecar ingress port, to
    // the application.
    let legacy = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "legacy".into(),
            dependencies: vec!["orders".into()],
            egress: true,
            ..Default::default()
        },
    )
    .await;
    let r = legacy
        .wait_call("orders", "the legacy host reaches the pod", |r| {
            r.status == 200
        })
        .await;
    assert!(r.body.starts_with("hello from orders pod-1"), "{}", r.body);
    let services = cp.admin_json("/api/services").await;
    let ports: Vec<u64> = services
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == "orders")
        .flat_map(|s| s["instances"].as_array().cloned().unwrap_or_default())
        .filter_map(|i| i["port"].as_u64())
        .collect();
    assert_eq!(
        ports,
        [u64::from(ingress)],
        "the pod is reached on its sidecar"
    );
    let admin_addr = SocketAddr::from(([127, 0, 0, 1], admin));
    let sidecar_requests = http_get(
        admin_addr,
        "localhost",
        "/stats?filter=^http\\.ingress\\.downstream_rq_2xx$",
        &[],
    )
    .await
    .unwrap();
    let served: u64 = sidecar_requests
        .body
        .lines()
        .find_map(|l| l.strip_prefix("http.ingress.downstream_rq_2xx: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(
        served >= 1,
        "the sidecar's ingress served the call: {}",
        sidecar_requests.body
    );

    // An invalid MeshService is refused by the validating webhook, naming the field.
    let e = match msvcs
        .create(&PostParams::default(), &orders_service("broken", 0))
        .await
    {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(e.code, 422, "{e:?}");
    assert!(
        e.message.starts_with(&format!(
            "admission webhook \"{validate_hook}\" denied the request: "
        )) && e.message.contains("spec.ports[0].port"),
        "{}",
        e.message
    );
    assert!(
        kube.get(
            "meshbridge.io/v1alpha1",
            "MeshService",
            Some("shop"),
            "broken"
        )
        .is_none()
    );

    drop(legacy);
    drop(sidecar_envoy);
    assert_rbac_covers(&kube);
    let took = started.elapsed();
    eprintln!("inject_e2e: {took:?}");
    assert!(took < Duration::from_secs(40), "took {took:?}");
}
