//! The admission webhooks over real TLS on 127.0.0.1, served by the real binary with
//! certificates made by openssl: AdmissionReviews shaped like the Kubernetes documentation's,
//! bad requests, namespace opt-in/opt-out through the Kubernetes API fake, validation, and
//! certificate rotation.

use crate::support;
use crate::support::kube_fake;

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use kube_fake::{FakeKube, assert_rbac_covers};
use serde_json::{Value, json};
use support::{ControlPlane, eventually, free_port, issue_cert};

const LIMIT: Duration = Duration::from_secs(20);

/// An AdmissionReview for a Pod CREATE, in the shape of the example in
/// <https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/#request>.
fn pod_review(namespace: &str, annotations: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace,
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller",
                         "uid": "014fbff9-a07c-11e8-a59c-42010a800002",
                         "groups": ["system:serviceaccounts", "system:authenticated"]},
            "object": {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"generateName": "orders-5d8f7c9b6-", "namespace": namespace,
                             "labels": {"app": "orders"}, "annotations": annotations},
                "spec": {"containers": [{"name": "app", "image": "orders:1.4",
                                         "ports": [{"containerPort": 8080}]}]},
            },
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    })
}

struct Webhook {
    cp: ControlPlane,
    url: String,
    client: reqwest::Client,
    dir: tempfile::TempDir,
}

fn client_trusting(ca: &Path) -> reqwest::Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    reqwest::Client::builder()
        .add_root_certificate(ca)
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

fn install_cert(dir: &Path, name: &str) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    // Written next to the files, then renamed, as a Secret volume update does.
    for (from, to) in [
        (format!("{name}.pem"), "tls.crt"),
        (format!("{name}.key"), "tls.key"),
    ] {
        std::fs::copy(dir.join(from), certs.join(format!(".{to}"))).unwrap();
        std::fs::rename(certs.join(format!(".{to}")), certs.join(to)).unwrap();
    }
}

async fn start(kube: Option<&FakeKube>, extra: &[&str]) -> Webhook {
    let dir = tempfile::tempdir().unwrap();
    issue_cert(dir.path(), "webhook", "IP:127.0.0.1,DNS:localhost");
    install_cert(dir.path(), "webhook");
    let port = free_port();
    let certs = dir.path().join("certs").display().to_string();
    let addr = format!("127.0.0.1:{port}");
    let mut args = vec![
        "--webhook-cert-dir",
        &certs,
        "--webhook-addr",
        &addr,
        "--sidecar-xds-addr",
        "meshbridge-xds.mesh.svc:18000",
    ];
    args.extend_from_slice(extra);
    let mut cp = match kube {
        Some(kube) => {
            let kubeconfig = kube.write_kubeconfig(dir.path());
            ControlPlane::start_kube(&kubeconfig, "", &args)
        }
        None => ControlPlane::start_unready("", &args),
    };
    cp.wait_ready().await;
    Webhook {
        cp,
        url: format!("https://127.0.0.1:{port}"),
        client: client_trusting(&dir.path().join("webhook-ca.pem")),
        dir,
    }
}

impl Webhook {
    async fn post(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self
            .client
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn review(&self, path: &str, review: &Value) -> Value {
        let (status, body) = self.post(path, serde_json::to_vec(review).unwrap()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(body["kind"], "AdmissionReview");
        assert_eq!(
            body["response"]["uid"], review["request"]["uid"],
            "the uid is echoed"
        );
        body["response"].clone()
    }

    /// The review of a pod in namespace `namespace` annotated `annotations`, at `/inject`.
    async fn inject_pod(&self, namespace: &str, annotations: Value) -> Value {
        self.review("/inject", &pod_review(namespace, annotations))
            .await
    }
}

/// The status line answered to a POST announcing a 5 MiB body (only its start is sent).
async fn oversized_status(w: &Webhook) -> String {
    use rustls_pki_types::pem::PemObject;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(w.dir.path().join("webhook-ca.pem"))
        .unwrap()
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let addr = w.url.trim_start_matches("https://").to_string();
    let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let name = rustls_pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let mut tls = connector.connect(name, tcp).await.unwrap();
    tls.write_all(b"POST /inject HTTP/1.1\r\nHost: webhook\r\nContent-Type: application/json\r\nContent-Length: 5242880\r\n\r\n")
        .await
        .unwrap();
    let _ = tls.write_all(&[b' '; 16 * 1024]).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Applies the response's JSON Patch to the reviewed object, as the API server does.
fn patched(review: &Value, response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut object = review["request"]["object"].clone();
    json_patch::patch(&mut object, &patch).unwrap();
    object
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_create_review_gets_a_patch_that_adds_the_sidecar() {
    let w = start(None, &[]).await;
    let review = pod_review("shop", json!({"meshbridge.io/inject": "true"}));
    let response = w.review("/inject", &review).await;
    assert_eq!(response["allowed"], true);
    let pod = patched(&review, &response);
    // The same pod `meshbridge inject` prints for the same settings.
    let settings = meshbridge::webhook::InjectSettings {
        xds_addr: "meshbridge-xds.mesh.svc:18000".into(),
        ..Default::default()
    };
    let (expected, _) =
        meshbridge::webhook::inject_manifest(review["request"]["object"].clone(), &settings)
            .unwrap();
    assert_eq!(pod, expected);
    let sidecar = &pod["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "meshbridge-proxy");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(
        pod["spec"]["containers"][0]["env"][0]["name"],
        "MESHBRIDGE_EGRESS_ADDR"
    );

    // Opted out, or not opted in (no annotation, namespace unknown): admitted unchanged.
    for annotations in [json!({"meshbridge.io/inject": "false"}), json!({})] {
        let response = w.inject_pod("shop", annotations).await;
        assert_eq!(response["allowed"], true);
        assert!(response.get("patch").is_none(), "{response}");
    }
    let metrics = w.cp.metrics().await;
    assert!(
        metrics
            .contains("meshbridge_webhook_requests_total{path=\"/inject\",result=\"patched\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_answers_naming_the_problem() {
    let w = start(None, &["--inject-fail-closed"]).await;
    let (status, body) = w.post("/inject", b"{not json".to_vec()).await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("not JSON"),
        "{body}"
    );

    let (status, body) = w
        .post(
            "/inject",
            serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "Pod"})).unwrap(),
        )
        .await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().contains("AdmissionReview"),
        "{body}"
    );

    // Another kind sent to the pod webhook: admitted, with a warning saying so.
    let mut deployment = pod_review("shop", json!({}));
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let response = w.review("/inject", &deployment).await;
    assert_eq!(response["allowed"], true);
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap()
            .contains("Pods only"),
        "{response}"
    );

    // A pod the injector cannot handle: refused (fail closed), naming the annotation.
    let response = w
        .inject_pod(
            "shop",
            json!({"meshbridge.io/inject": "true", "meshbridge.io/log-level": "loud"}),
        )
        .await;
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 400);
    assert!(
        response["status"]["message"]
            .as_str()
            .unwrap()
            .contains("meshbridge.io/log-level"),
        "{response}"
    );

    // Oversized: refused from its Content-Length, before it is read.
    let status = oversized_status(&w).await;
    assert!(status.starts_with("HTTP/1.1 413"), "{status}");
    // The server is still there.
    let response = w
        .inject_pod("shop", json!({"meshbridge.io/inject": "true"}))
        .await;
    assert!(response["patch"].is_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_time_of_the_flag_or_the_annotation_reaches_the_patch() {
    let w = start(None, &["--sidecar-drain-seconds", "40"]).await;
    let script = |pod: &Value| {
        pod["spec"]["initContainers"][0]["lifecycle"]["preStop"]["exec"]["command"][2]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let review = pod_review("shop", json!({"meshbridge.io/inject": "true"}));
    let pod = patched(&review, &w.review("/inject", &review).await);
    assert_eq!(script(&pod), meshbridge::bootstrap::drain_script(15000, 40));
    // Kubernetes' default grace period (30 s) would cut the drain: raised in the patch.
    assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 45);

    let review = pod_review(
        "shop",
        json!({"meshbridge.io/inject": "true", "meshbridge.io/drain-seconds": "0"}),
    );
    let pod = patched(&review, &w.review("/inject", &review).await);
    assert!(pod["spec"]["initContainers"][0].get("lifecycle").is_none());
    assert!(pod["spec"].get("terminationGracePeriodSeconds").is_none());

    // Out of bounds: admitted without a sidecar, the warning naming the annotation.
    let response = w
        .inject_pod(
            "shop",
            json!({"meshbridge.io/inject": "true", "meshbridge.io/drain-seconds": "3600"}),
        )
        .await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none());
    let warning = response["warnings"][0].as_str().unwrap();
    assert!(
        warning.contains("meshbridge.io/drain-seconds") && warning.contains("0 to 300"),
        "{response}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_fail_closed_an_unhandled_pod_is_admitted_with_a_warning() {
    let w = start(None, &[]).await;
    let response = w
        .inject_pod(
            "shop",
            json!({"meshbridge.io/inject": "true", "meshbridge.io/ingress-port": "8080"}),
        )
        .await;
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none());
    assert!(
        response["warnings"][0]
            .as_str()
            .unwrap()
            .contains("port 8080 is used twice"),
        "{response}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn namespaces_opt_in_and_out_and_the_mesh_service_names_the_pod() {
    let kube = FakeKube::start().await;
    for (ns, label) in [("shop", "enabled"), ("legacy", "disabled")] {
        kube.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": ns, "labels": {"meshbridge.io/inject": label}}}));
    }
    kube.apply(
        json!({"apiVersion": "meshbridge.io/v1alpha1", "kind": "MeshService",
                      "metadata": {"name": "orders-svc", "namespace": "shop"},
                      "spec": {"serviceName": "orders-mesh", "selector": {"app": "orders"}}}),
    );
    let w = start(Some(&kube), &[]).await;
    let response = w.inject_pod("shop", json!({})).await;
    let pod = patched(&pod_review("shop", json!({})), &response);
    let bootstrap = pod["spec"]["initContainers"][0]["args"][1]
        .as_str()
        .unwrap();
    assert!(
        bootstrap.contains("service_name: orders-mesh"),
        "the MeshService names the pod:\n{bootstrap}"
    );
    let response = w.inject_pod("legacy", json!({})).await;
    assert!(
        response.get("patch").is_none(),
        "an opted-out namespace: {response}"
    );
    // The pod's own annotation wins over its namespace.
    let response = w
        .inject_pod("legacy", json!({"meshbridge.io/inject": "true"}))
        .await;
    assert!(response["patch"].is_string());
    assert_rbac_covers(&kube);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_validating_webhook_refuses_what_the_index_would_refuse() {
    let w = start(None, &[]).await;
    let review = |object: Value, operation: &str| {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
            "uid": "b1", "kind": {"group": "meshbridge.io", "version": "v1alpha1", "kind": object["kind"]},
            "namespace": "shop", "operation": operation, "object": object}})
    };
    let good = json!({"apiVersion": "meshbridge.io/v1alpha1", "kind": "MeshService",
                      "metadata": {"name": "orders"}, "spec": {"ports": [{"port": 8080}],
                      "dependencies": [{"service": "payments", "timeout": "2s"}]}});
    assert_eq!(
        w.review("/validate", &review(good.clone(), "CREATE")).await["allowed"],
        true
    );
    let mut bad = good.clone();
    bad["spec"]["dependencies"][0]["timeout"] = json!("soon");
    let response = w.review("/validate", &review(bad, "UPDATE")).await;
    assert_eq!(response["allowed"], false);
    assert_eq!(response["status"]["code"], 422);
    let message = response["status"]["message"].as_str().unwrap();
    assert!(
        message.contains("MeshService shop/orders")
            && message.contains("spec.dependencies[0].timeout"),
        "{message}"
    );
    let mut unknown = good;
    unknown["spec"]["colour"] = json!("blue");
    let response = w.review("/validate", &review(unknown, "CREATE")).await;
    assert_eq!(response["allowed"], false);
    assert!(
        response["status"]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{response}"
    );
    let rule = json!({"apiVersion": "meshbridge.io/v1alpha1", "kind": "AccessRule", "metadata": {"name": "r"},
                      "spec": {"target": "orders", "rules": [{"from": ["checkout"], "paths": [{"regex": "("}]}]}});
    let response = w.review("/validate", &review(rule, "CREATE")).await;
    assert_eq!(response["allowed"], false, "{response}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_certificate_is_served_without_a_restart() {
    let w = start(None, &[]).await;
    let review = pod_review("shop", json!({"meshbridge.io/inject": "true"}));
    w.review("/inject", &review).await;
    // A new certificate from another CA replaces the files.
    issue_cert(w.dir.path(), "rotated", "IP:127.0.0.1");
    install_cert(w.dir.path(), "rotated");
    let rotated = client_trusting(&w.dir.path().join("rotated-ca.pem"));
    eventually(LIMIT, "the new certificate is served", || async {
        let r = rotated
            .post(format!("{}/inject", w.url))
            .json(&review)
            .send()
            .await
            .ok()?;
        (r.status() == 200).then_some(())
    })
    .await;
    // A broken pair does not replace it.
    std::fs::write(w.dir.path().join("certs/tls.key"), "not a key").unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let r = rotated
        .post(format!("{}/inject", w.url))
        .json(&review)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        w.cp.log().contains("webhook certificate not reloaded"),
        "{}",
        w.cp.log()
    );
}

#[test]
fn a_missing_certificate_refuses_to_start_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), "x").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args(["run", "--kube", "off", "--webhook-cert-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("tls.key"));
}

fn webhook_configuration(kind: &str, name: &str, path: &str) -> Value {
    json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": name},
        "webhooks": [{
            "name": format!("{path}.meshbridge.io").trim_start_matches('/').to_string(),
            "clientConfig": {"service": {"namespace": "meshbridge", "name": "meshbridge-webhook", "path": path}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"], "operations": ["CREATE"]}],
            "sideEffects": "None",
            "admissionReviewVersions": ["v1"],
            "failurePolicy": "Ignore",
        }],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_managed_certificates_live_in_a_secret_and_fill_the_ca_bundles() {
    let kube = FakeKube::start().await;
    // meshbridge's namespace (POD_NAMESPACE, default "meshbridge").
    kube.apply(
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "meshbridge"}}),
    );
    // As the chart installs them in self-managed mode: no caBundle.
    kube.apply(webhook_configuration(
        "MutatingWebhookConfiguration",
        "meshbridge-inject",
        "/inject",
    ));
    kube.apply(webhook_configuration(
        "ValidatingWebhookConfiguration",
        "meshbridge-validate",
        "/validate",
    ));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.write_kubeconfig(dir.path());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let args = ["--webhook-self-managed", "--webhook-addr", &addr];
    let mut cp = ControlPlane::start_kube(&kubeconfig, "", &args);
    cp.wait_ready().await;
    let ca_bundle = |kind: &str, name: &str| {
        kube.get("admissionregistration.k8s.io/v1", kind, None, name)
            .and_then(|c| {
                c["webhooks"][0]["clientConfig"]["caBundle"]
                    .as_str()
                    .map(str::to_string)
            })
    };
    let bundle = eventually(LIMIT, "the caBundles are set", || async {
        let m = ca_bundle("MutatingWebhookConfiguration", "meshbridge-inject")?;
        let v = ca_bundle("ValidatingWebhookConfiguration", "meshbridge-validate")?;
        (m == v).then_some(m)
    })
    .await;
    let secret = kube
        .get("v1", "Secret", Some("meshbridge"), "meshbridge-webhook-tls")
        .unwrap();
    assert_eq!(secret["type"], "kubernetes.io/tls");
    let ca = base64::engine::general_purpose::STANDARD
        .decode(&bundle)
        .unwrap();
    let stored_ca = base64::engine::general_purpose::STANDARD
        .decode(secret["data"]["ca.crt"].as_str().unwrap())
        .unwrap();
    assert_eq!(ca, stored_ca, "the caBundle is the Secret's CA");

    // The API server's view: trust the caBundle, call the Service's DNS name.
    let call = |ca: Vec<u8>| {
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .tls_built_in_root_certs(false)
            .resolve(
                "meshbridge-webhook.meshbridge.svc",
                format!("127.0.0.1:{port}").parse().unwrap(),
            )
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        async move {
            let r = client
                .post(format!(
                    "https://meshbridge-webhook.meshbridge.svc:{port}/inject"
                ))
                .json(&pod_review("shop", json!({"meshbridge.io/inject": "true"})))
                .send()
                .await
                .ok()?;
            let v: Value = r.json().await.ok()?;
            v["response"]["patch"].is_string().then_some(())
        }
    };
    eventually(LIMIT, "the webhook serves the Secret's certificate", || {
        call(ca.clone())
    })
    .await;

    // A restart (or a second replica) serves the same certificate and writes nothing.
    let writes = |kube: &FakeKube| {
        kube.requests()
            .iter()
            .filter(|r| {
                r.resource == "secrets" && ["create", "update", "patch"].contains(&r.verb.as_str())
            })
            .count()
    };
    let before = writes(&kube);
    assert_eq!(before, 1, "one Secret written");
    cp.kill();
    let mut cp = ControlPlane::start_kube(&kubeconfig, "", &args);
    cp.wait_ready().await;
    eventually(
        LIMIT,
        "the restarted webhook serves the same certificate",
        || call(ca.clone()),
    )
    .await;
    assert_eq!(writes(&kube), before, "no new certificate after a restart");
    assert_eq!(
        ca_bundle("MutatingWebhookConfiguration", "meshbridge-inject"),
        Some(bundle)
    );
    cp.kill();
    // Within what the chart's self-managed Role and ClusterRole grant.
    for r in kube.requests() {
        let allowed: &[&str] = match r.resource.as_str() {
            "secrets" => &["get", "create", "update", "patch"],
            "mutatingwebhookconfigurations" | "validatingwebhookconfigurations" => {
                &["get", "patch"]
            }
            _ => continue,
        };
        assert!(
            allowed.contains(&r.verb.as_str()),
            "{} {}",
            r.verb,
            r.resource
        );
    }
}
