//! Pins the semantics of the fake Kubernetes API server (`tests/it/support/kube_fake.rs`)
//! through real clients: kube-rs (`Api`, `watcher`, `reflector`, `Discovery`) and raw HTTP
//! (reqwest), and its admission chain against a tiny HTTPS webhook served here (certificates
//! made by `openssl`). Every wait is bounded.

use crate::support;
use crate::support::kube_fake;

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{
    DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{reflector, watcher};
use kube::{Api, Client, Config, Discovery, ResourceExt};
use kube_fake::{AdmissionCall, FakeKube};
use meshbridge::api::mesh_service::MeshService;
use serde_json::{Value, json};
use support::fixtures;
use support::issue_cert;

/// Bound of every single wait.
const WAIT: Duration = Duration::from_secs(10);

/// Sends a raw request; its status and JSON body.
async fn call(req: reqwest::RequestBuilder) -> (u16, Value) {
    let r = req.send().await.unwrap();
    let code = r.status().as_u16();
    (code, r.json().await.unwrap())
}

fn client(fake: &FakeKube) -> Client {
    let cfg = Config::new(fake.url().parse().unwrap());
    Client::try_from(cfg).unwrap()
}

/// A client that does not retry 429/503/504 (kube-rs retries them by default).
fn client_no_retry(fake: &FakeKube) -> Client {
    let mut cfg = Config::new(fake.url().parse().unwrap());
    cfg.default_retry = false;
    Client::try_from(cfg).unwrap()
}

fn pod(name: &str, labels: Value) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
    }))
    .unwrap()
}

/// The `Status` of a failed kube call.
fn api_err<T: std::fmt::Debug>(r: kube::Result<T>) -> kube::core::Status {
    match r {
        Err(kube::Error::Api(s)) => *s,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn rv_of(meta_rv: Option<String>) -> u64 {
    meta_rv.unwrap().parse().unwrap()
}

/// Creates the MeshService `name` serving the service of the same name.
/// A MeshService `name` (serviceName too), not yet created.
fn mesh_service(name: &str) -> MeshService {
    fixtures::MeshService::build(name)
        .set("serviceName", name)
        .typed()
}

async fn create_mesh_service(msvcs: &Api<MeshService>, name: &str) -> MeshService {
    msvcs
        .create(&PostParams::default(), &mesh_service(name))
        .await
        .unwrap()
}

/// A client of `fake`, and the MeshServices of its `default` namespace.
fn fake_mesh_services(fake: &FakeKube) -> (Client, Api<MeshService>) {
    let client = client(fake);
    let msvcs = Api::default_namespaced(client.clone());
    (client, msvcs)
}

async fn timed<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

/// Reads a watch body until `stop` says so or it ends; returns the events seen.
async fn read_events(
    resp: &mut reqwest::Response,
    limit: Duration,
    stop: impl Fn(&[Value]) -> bool,
) -> (Vec<Value>, bool) {
    let deadline = tokio::time::Instant::now() + limit;
    let mut buf = Vec::new();
    let mut events = Vec::new();
    loop {
        if stop(&events) {
            return (events, false);
        }
        match tokio::time::timeout_at(deadline, resp.chunk()).await {
            Err(_) => panic!("watch: timed out; events so far: {events:?}"),
            Ok(Err(e)) => panic!("watch body error: {e}"),
            Ok(Ok(None)) => return (events, true),
            Ok(Ok(Some(chunk))) => {
                buf.extend_from_slice(&chunk);
                while let Some(i) = buf.iter().position(|b| *b == b'\n') {
                    let line: Vec<u8> = buf.drain(..=i).collect();
                    events.push(serde_json::from_slice(&line).unwrap());
                }
            }
        }
    }
}

#[tokio::test]
async fn kubeconfig_version_and_discovery() {
    let fake = FakeKube::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = fake.write_kubeconfig(dir.path());
    let kc = kube::config::Kubeconfig::read_from(&path).unwrap();
    let cfg = Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
        .await
        .unwrap();
    assert_eq!(cfg.default_namespace, "default");
    assert_eq!(
        cfg.cluster_url.to_string().trim_end_matches('/'),
        fake.url()
    );
    let client = Client::try_from(cfg).unwrap();

    let v = timed("version", client.apiserver_version()).await.unwrap();
    assert_eq!((v.major.as_str(), v.minor.as_str()), ("1", "34"));
    assert!(v.git_version.starts_with("v1.34"));

    let discovery = timed("discovery", Discovery::new(client.clone()).run())
        .await
        .unwrap();
    assert!(discovery.has_group("meshbridge.io"));
    let gvk = kube::api::GroupVersionKind::gvk("meshbridge.io", "v1alpha1", "MeshService");
    let (ar, caps) = discovery.resolve_gvk(&gvk).unwrap();
    assert_eq!(ar.plural, "meshservices");
    assert_eq!(caps.scope, kube::discovery::Scope::Namespaced);
    assert!(
        caps.subresources
            .iter()
            .any(|(sub, _)| sub.plural == "meshservices/status" || sub.plural == "status")
    );
    let pods = discovery
        .resolve_gvk(&kube::api::GroupVersionKind::gvk("", "v1", "Pod"))
        .unwrap();
    assert_eq!(pods.0.plural, "pods");
    let webhooks = kube::api::GroupVersionKind::gvk(
        "admissionregistration.k8s.io",
        "v1",
        "MutatingWebhookConfiguration",
    );
    assert_eq!(
        discovery.resolve_gvk(&webhooks).unwrap().1.scope,
        kube::discovery::Scope::Cluster
    );
    for g in ["coordination.k8s.io", "discovery.k8s.io", "events.k8s.io"] {
        assert!(discovery.has_group(g), "{g}");
    }

    let agg = timed(
        "aggregated discovery",
        Discovery::new(client.clone()).run_aggregated(),
    )
    .await
    .unwrap();
    assert!(agg.has_group("meshbridge.io"));
    assert!(agg.resolve_gvk(&gvk).is_some());

    // Raw discovery documents.
    let http = reqwest::Client::new();
    let (_, api) = call(http.get(format!("{}/api", fake.url()))).await;
    assert_eq!(api["kind"], "APIVersions");
    assert_eq!(api["versions"], json!(["v1"]));
    let (_, list) = call(http.get(format!("{}/apis/meshbridge.io/v1alpha1", fake.url()))).await;
    assert_eq!(list["kind"], "APIResourceList");
    let names: Vec<&str> = list["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "meshservices",
            "meshservices/status",
            "accessrules",
            "accessrules/status"
        ]
    );
    assert_eq!(list["resources"][0]["namespaced"], true);
    assert_eq!(list["resources"][0]["kind"], "MeshService");
    assert!(
        list["resources"][0]["verbs"]
            .as_array()
            .unwrap()
            .contains(&json!("watch"))
    );

    // Discovery is logged as `get` of resource "" and never fails on purpose.
    assert!(fake.count("get", "") >= 4);
    fake.fail_next(1, 500);
    assert!(timed("version", client.apiserver_version()).await.is_ok());
}

#[tokio::test]
async fn crud_and_optimistic_concurrency() {
    let fake = FakeKube::start().await;
    let client = client(&fake);
    let pods: Api<Pod> = Api::default_namespaced(client.clone());

    let before = fake.resource_version();
    let a = pods
        .create(&PostParams::default(), &pod("a", json!({"app": "web"})))
        .await
        .unwrap();
    let meta = &a.metadata;
    assert_eq!(rv_of(meta.resource_version.clone()), before + 1);
    assert_eq!(meta.namespace.as_deref(), Some("default"));
    assert!(meta.uid.as_ref().is_some_and(|u| u.len() == 36));
    assert!(meta.creation_timestamp.is_some());
    assert_eq!(meta.generation, Some(1));
    assert_eq!(a.status.as_ref().unwrap().phase.as_deref(), Some("Pending"));

    let dup = api_err(
        pods.create(&PostParams::default(), &pod("a", json!({})))
            .await,
    );
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));
    assert_eq!(dup.message, "pods \"a\" already exists");

    let missing = api_err(pods.get("nope").await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, "pods \"nope\" not found");
    let details = missing.details.unwrap();
    assert_eq!(
        (details.name.as_str(), details.kind.as_str()),
        ("nope", "pods")
    );
    assert!(pods.get_opt("nope").await.unwrap().is_none());

    let got = pods.get("a").await.unwrap();
    assert_eq!(got.metadata.resource_version, a.metadata.resource_version);
    assert_eq!(
        pods.list(&ListParams::default()).await.unwrap().items.len(),
        1
    );

    // Replace with the current version succeeds; with a stale one it conflicts.
    let mut fresh = got.clone();
    fresh.labels_mut().insert("tier".into(), "front".into());
    let replaced = pods
        .replace("a", &PostParams::default(), &fresh)
        .await
        .unwrap();
    assert!(
        rv_of(replaced.metadata.resource_version.clone())
            > rv_of(got.metadata.resource_version.clone())
    );
    assert_eq!(
        replaced.metadata.uid, a.metadata.uid,
        "uid survives updates"
    );
    let stale = api_err(pods.replace("a", &PostParams::default(), &got).await);
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));
    assert_eq!(
        stale.message,
        "Operation cannot be fulfilled on pods \"a\": the object has been modified; please apply your changes to the latest version and try again"
    );
    // Without a resourceVersion the update is unconditional.
    let mut blind = got.clone();
    blind.metadata.resource_version = None;
    blind.labels_mut().insert("tier".into(), "back".into());
    let blind = pods
        .replace("a", &PostParams::default(), &blind)
        .await
        .unwrap();
    assert_eq!(blind.labels()["tier"], "back");
    // Labels are metadata: no generation bump. A spec change bumps it.
    assert_eq!(blind.metadata.generation, Some(1));
    let mut spec_change = blind.clone();
    spec_change.spec.as_mut().unwrap().containers[0].image = Some("busybox:2".into());
    let spec_change = pods
        .replace("a", &PostParams::default(), &spec_change)
        .await
        .unwrap();
    assert_eq!(spec_change.metadata.generation, Some(2));

    // generateName.
    let mut g = pod("", json!({}));
    g.metadata.name = None;
    g.metadata.generate_name = Some("worker-".into());
    let g = pods.create(&PostParams::default(), &g).await.unwrap();
    assert!(g.name_any().starts_with("worker-") && g.name_any().len() == "worker-".len() + 5);

    // A namespace that does not exist.
    let nowhere: Api<Pod> = Api::namespaced(client.clone(), "nowhere");
    let e = api_err(
        nowhere
            .create(&PostParams::default(), &pod("x", json!({})))
            .await,
    );
    assert_eq!(e.code, 404);
    assert_eq!(e.message, "namespaces \"nowhere\" not found");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": "nowhere"}})).unwrap();
    let ns = namespaces
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    assert_eq!(ns.status.unwrap().phase.as_deref(), Some("Active"));
    nowhere
        .create(&PostParams::default(), &pod("x", json!({})))
        .await
        .unwrap();
    // Cluster-wide list of a namespaced resource.
    let all: Api<Pod> = Api::all(client.clone());
    let names: Vec<String> = all
        .list(&ListParams::default())
        .await
        .unwrap()
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert_eq!(names.len(), 3);
    assert_eq!(
        names.last().unwrap(),
        "x",
        "ordered by namespace, then name"
    );

    // Invalid names.
    let e = api_err(
        pods.create(&PostParams::default(), &pod("Not_Valid", json!({})))
            .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));

    // Delete returns the object; a second delete is 404.
    let gone = pods.delete("a", &DeleteParams::default()).await.unwrap();
    let gone = gone.left().unwrap();
    assert_eq!(gone.name_any(), "a");
    assert!(fake.get("v1", "Pod", Some("default"), "a").is_none());
    assert_eq!(
        api_err(pods.delete("a", &DeleteParams::default()).await).code,
        404
    );

    // Dry run persists nothing.
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let rv = fake.resource_version();
    pods.create(&dry, &pod("dry", json!({}))).await.unwrap();
    assert_eq!(fake.resource_version(), rv);
    assert!(pods.get_opt("dry").await.unwrap().is_none());
}

#[tokio::test]
async fn raw_http_errors() {
    let fake = FakeKube::start().await;
    let http = reqwest::Client::new();
    let url = fake.url();
    let send = call;

    let (code, body) = send(
        http.post(format!("{url}/api/v1/namespaces/default/configmaps"))
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(body["kind"], "Status");
    assert_eq!(body["status"], "Failure");
    assert_eq!(body["reason"], "BadRequest");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("json parse error"),
        "{body}"
    );

    let (code, body) = send(http.get(format!("{url}/api/v1/namespaces/default/widgets"))).await;
    assert_eq!((code, body["reason"].as_str()), (404, Some("NotFound")));
    let (code, _) = send(http.get(format!("{url}/apis/example.com/v1/things"))).await;
    assert_eq!(code, 404);
    let (code, _) = send(http.get(format!("{url}/api/v1/namespaces/default/pods/p/log"))).await;
    assert_eq!(code, 404, "unknown subresource");

    let (code, body) = send(
        http.put(format!("{url}/api/v1/namespaces/default/configmaps"))
            .header("content-type", "application/json")
            .body("{}"),
    )
    .await;
    assert_eq!(
        (code, body["reason"].as_str()),
        (405, Some("MethodNotAllowed"))
    );
    let (code, _) = send(http.post(format!("{url}/api/v1/pods")).body("{}")).await;
    assert_eq!(code, 405, "create needs a namespace");

    let (code, body) = send(
        http.post(format!("{url}/api/v1/namespaces/default/configmaps"))
            .header("content-type", "application/json")
            .json(&json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "other"}})),
    )
    .await;
    assert_eq!(code, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("does not match the namespace")
    );

    let (code, _) = send(
        http.post(format!("{url}/api/v1/namespaces/default/configmaps"))
            .json(&json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "c"}})),
    )
    .await;
    assert_eq!(code, 400, "kind mismatch");

    // YAML create works; the list carries apiVersion/kind on items.
    let r = http
        .post(format!("{url}/api/v1/namespaces/default/configmaps"))
        .header("content-type", "application/yaml")
        .body("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: y\ndata:\n  k: v\n")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let (code, list) = send(http.get(format!("{url}/api/v1/namespaces/default/configmaps"))).await;
    assert_eq!(code, 200);
    assert_eq!(list["kind"], "ConfigMapList");
    assert_eq!(list["apiVersion"], "v1");
    assert_eq!(
        list["metadata"]["resourceVersion"],
        json!(fake.resource_version().to_string())
    );
    assert_eq!(list["items"][0]["kind"], "ConfigMap");
    assert_eq!(list["items"][0]["data"]["k"], "v");

    let (code, body) = send(http.get(format!("{url}/api/v1/pods?labelSelector=a%20in%20(b"))).await;
    assert_eq!((code, body["reason"].as_str()), (400, Some("BadRequest")));
    let (code, body) = send(http.get(format!(
        "{url}/apis/meshbridge.io/v1alpha1/meshservices?fieldSelector=spec.serviceName%3Dx"
    )))
    .await;
    assert_eq!(code, 400);
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("not a known field selector")
    );
}

#[tokio::test]
async fn patches() {
    let fake = FakeKube::start().await;
    let client = client(&fake);
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "cfg", "labels": {"a": "1"}},
        "data": {"x": "1", "y": "2"},
    }))
    .unwrap();
    let created = cms.create(&PostParams::default(), &cm).await.unwrap();
    let pp = PatchParams::default();

    // Merge patch (RFC 7386): null deletes, maps merge.
    let merged = cms
        .patch(
            "cfg",
            &pp,
            &Patch::Merge(
                json!({"data": {"x": null, "z": "3"}, "metadata": {"labels": {"b": "2"}}}),
            ),
        )
        .await
        .unwrap();
    let data = merged.data.clone().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["y", "z"]);
    assert_eq!(merged.labels().len(), 2);
    assert_eq!(
        merged.metadata.generation,
        Some(2),
        "data is outside metadata"
    );

    // JSON patch (RFC 6902) with a passing test.
    let ops = serde_json::from_value(json!([
        {"op": "test", "path": "/data/y", "value": "2"},
        {"op": "add", "path": "/data/w", "value": "4"},
        {"op": "replace", "path": "/data/y", "value": "20"},
        {"op": "remove", "path": "/metadata/labels/a"},
    ]))
    .unwrap();
    let patched = cms
        .patch("cfg", &pp, &Patch::<()>::Json(ops))
        .await
        .unwrap();
    assert_eq!(patched.data.as_ref().unwrap()["y"], "20");
    assert_eq!(patched.data.as_ref().unwrap()["w"], "4");
    assert!(!patched.labels().contains_key("a"));

    // A failing test is 422 Invalid and changes nothing.
    let rv = fake.resource_version();
    let failing =
        serde_json::from_value(json!([{"op": "test", "path": "/data/y", "value": "nope"}, {"op": "remove", "path": "/data"}]))
            .unwrap();
    let e = api_err(cms.patch("cfg", &pp, &Patch::<()>::Json(failing)).await);
    assert_eq!((e.code, e.reason.as_str()), (422, "Invalid"));
    assert_eq!(fake.resource_version(), rv);

    // Strategic merge patch works for built-ins...
    let s = cms
        .patch("cfg", &pp, &Patch::Strategic(json!({"data": {"s": "1"}})))
        .await
        .unwrap();
    assert_eq!(s.data.unwrap()["s"], "1");
    // ...and is 415 for custom resources.
    let msvcs: Api<MeshService> = Api::default_namespaced(client.clone());
    create_mesh_service(&msvcs, "web").await;
    let e = api_err(
        msvcs
            .patch(
                "web",
                &pp,
                &Patch::Strategic(json!({"spec": {"serviceName": "w"}})),
            )
            .await,
    );
    assert_eq!((e.code, e.reason.as_str()), (415, "UnsupportedMediaType"));

    // metadata.resourceVersion in a patch is a precondition.
    let stale = created.metadata.resource_version.clone().unwrap();
    let e = api_err(
        cms.patch(
            "cfg",
            &pp,
            &Patch::Merge(json!({"metadata": {"resourceVersion": stale}, "data": {"q": "1"}})),
        )
        .await,
    );
    assert_eq!(e.code, 409);
    let current = cms
        .get("cfg")
        .await
        .unwrap()
        .metadata
        .resource_version
        .unwrap();
    cms.patch(
        "cfg",
        &pp,
        &Patch::Merge(json!({"metadata": {"resourceVersion": current}, "data": {"q": "1"}})),
    )
    .await
    .unwrap();

    // Patching a missing object is 404.
    assert_eq!(
        api_err(
            cms.patch("ghost", &pp, &Patch::Merge(json!({"data": {}})))
                .await
        )
        .code,
        404
    );

    // A no-op patch writes nothing: no new version.
    let rv = fake.resource_version();
    let same = cms
        .patch("cfg", &pp, &Patch::Merge(json!({"data": {"q": "1"}})))
        .await
        .unwrap();
    assert_eq!(fake.resource_version(), rv);
    assert_eq!(rv_of(same.metadata.resource_version), rv);
}

#[tokio::test]
async fn server_side_apply() {
    let fake = FakeKube::start().await;
    let (_, msvcs) = fake_mesh_services(&fake);
    let ssa = PatchParams::apply("meshbridge");

    // Apply creates a missing object (no 404).
    let applied = json!({
        "apiVersion": "meshbridge.io/v1alpha1",
        "kind": "MeshService",
        "metadata": {"name": "api", "labels": {"team": "core"}},
        "spec": {"serviceName": "api", "ports": [{"name": "http", "port": 8080}]},
        "status": {"observedGeneration": 7},
    });
    let created = msvcs
        .patch("api", &ssa, &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(created.spec.service_name.as_deref(), Some("api"));
    assert!(
        created.status.is_none(),
        "status of the main resource is ignored"
    );
    assert_eq!(created.metadata.generation, Some(1));
    let mf = created.metadata.managed_fields.clone().unwrap();
    assert_eq!(mf.len(), 1);
    assert_eq!(mf[0].manager.as_deref(), Some("meshbridge"));
    assert_eq!(mf[0].operation.as_deref(), Some("Apply"));
    assert_eq!(mf[0].fields_type.as_deref(), Some("FieldsV1"));
    assert_eq!(mf[0].api_version.as_deref(), Some("meshbridge.io/v1alpha1"));
    assert!(mf[0].fields_v1.as_ref().unwrap().0["f:spec"]["f:serviceName"].is_object());
    assert_eq!(fake.count("patch", "meshservices"), 1);

    // Re-applying the same configuration is a no-op.
    let rv = fake.resource_version();
    let again = msvcs
        .patch("api", &ssa.clone().force(), &Patch::Apply(&applied))
        .await
        .unwrap();
    assert_eq!(fake.resource_version(), rv);
    assert_eq!(
        again.metadata.resource_version,
        created.metadata.resource_version
    );

    // A later apply by the same manager sets what it applies and removes what it leaves out
    // (fields it alone owned, as the real server does); spec changes bump generation.
    let more = json!({
        "apiVersion": "meshbridge.io/v1alpha1",
        "kind": "MeshService",
        "metadata": {"name": "api"},
        "spec": {"mtls": "strict"},
    });
    let merged = msvcs
        .patch("api", &ssa, &Patch::Apply(&more))
        .await
        .unwrap();
    assert_eq!(merged.spec.service_name, None);
    assert_eq!(
        serde_json::to_value(&merged.spec).unwrap()["mtls"],
        "strict"
    );
    assert_eq!(merged.metadata.generation, Some(2));
    assert!(
        !merged.labels().contains_key("team"),
        "{:?}",
        merged.labels()
    );

    // Another manager adds its own entry; apply to /status records the subresource.
    let status = json!({
        "apiVersion": "meshbridge.io/v1alpha1",
        "kind": "MeshService",
        "metadata": {"name": "api"},
        "status": {"observedGeneration": 2},
    });
    let st = msvcs
        .patch_status(
            "api",
            &PatchParams::apply("status-writer"),
            &Patch::Apply(&status),
        )
        .await
        .unwrap();
    assert_eq!(st.status.unwrap().observed_generation, Some(2));
    assert_eq!(st.metadata.generation, Some(2));
    let mf = st.metadata.managed_fields.unwrap();
    let entry = mf
        .iter()
        .find(|e| e.manager.as_deref() == Some("status-writer"))
        .unwrap();
    assert_eq!(entry.subresource.as_deref(), Some("status"));

    // YAML bodies; fieldManager is required.
    let http = reqwest::Client::new();
    let url = format!(
        "{}/apis/meshbridge.io/v1alpha1/namespaces/default/meshservices/yml",
        fake.url()
    );
    let yaml = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata:\n  name: yml\nspec:\n  serviceName: yml\n";
    let r = http
        .patch(&url)
        .header("content-type", "application/apply-patch+yaml")
        .body(yaml)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let body: Value = r.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("fieldManager"));
    let r = http
        .patch(format!("{url}?fieldManager=kubectl"))
        .header("content-type", "application/apply-patch+yaml")
        .body(yaml)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    assert!(
        fake.get("meshbridge.io/v1alpha1", "MeshService", None, "yml")
            .is_some()
    );

    // A stale resourceVersion in an apply is a conflict.
    let stale = json!({
        "apiVersion": "meshbridge.io/v1alpha1",
        "kind": "MeshService",
        "metadata": {"name": "api", "resourceVersion": "1"},
        "spec": {"mtls": "permissive"},
    });
    assert_eq!(
        api_err(msvcs.patch("api", &ssa, &Patch::Apply(&stale)).await).code,
        409
    );
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let fake = FakeKube::start().await;
    let (client, msvcs) = fake_mesh_services(&fake);

    let mut ms = mesh_service("web");
    ms.status = Some(serde_json::from_value(json!({"observedGeneration": 9})).unwrap());
    let created = msvcs.create(&PostParams::default(), &ms).await.unwrap();
    assert!(created.status.is_none(), "create ignores status");

    // Writing /status changes only the status, and not the generation.
    let pp = PatchParams::default();
    let st = msvcs
        .patch_status(
            "web",
            &pp,
            &Patch::Merge(json!({
                "spec": {"serviceName": "hacked"},
                "metadata": {"labels": {"x": "y"}},
                "status": {"observedGeneration": 1, "conditions": [{"type": "Ready", "status": "True", "reason": "Ok", "message": ""}]},
            })),
        )
        .await
        .unwrap();
    assert_eq!(st.spec.service_name.as_deref(), Some("web"));
    assert!(st.labels().is_empty());
    assert_eq!(st.metadata.generation, Some(1));
    let status = st.status.clone().unwrap();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!(status.conditions[0].type_, "Ready");
    assert!(
        rv_of(st.metadata.resource_version.clone())
            > rv_of(created.metadata.resource_version.clone())
    );

    // Writing the main resource leaves the status alone and bumps generation on spec changes.
    let main = msvcs
        .patch(
            "web",
            &pp,
            &Patch::Merge(
                json!({"spec": {"mtls": "strict"}, "status": {"observedGeneration": 42}}),
            ),
        )
        .await
        .unwrap();
    assert_eq!(main.status.as_ref().unwrap().observed_generation, Some(1));
    assert_eq!(main.metadata.generation, Some(2));
    let mut replaced = main.clone();
    replaced.status = None;
    replaced.spec.mtls = None;
    let replaced = msvcs
        .replace("web", &PostParams::default(), &replaced)
        .await
        .unwrap();
    assert_eq!(replaced.status, main.status);
    assert_eq!(replaced.metadata.generation, Some(3));
    // A metadata-only change does not bump generation.
    let labeled = msvcs
        .patch(
            "web",
            &pp,
            &Patch::Merge(json!({"metadata": {"labels": {"l": "1"}}})),
        )
        .await
        .unwrap();
    assert_eq!(labeled.metadata.generation, Some(3));

    // PUT /status with a stale version conflicts; with the current one it works.
    let mut st2 = labeled.clone();
    st2.status.as_mut().unwrap().observed_generation = Some(3);
    let ok = msvcs
        .replace_status("web", &PostParams::default(), &st2)
        .await
        .unwrap();
    assert_eq!(ok.status.as_ref().unwrap().observed_generation, Some(3));
    assert_eq!(ok.metadata.generation, Some(3));
    let e = api_err(
        msvcs
            .replace_status("web", &PostParams::default(), &st2)
            .await,
    );
    assert_eq!(e.code, 409);

    // An identical status write is a no-op.
    let rv = fake.resource_version();
    msvcs
        .patch_status(
            "web",
            &pp,
            &Patch::Merge(json!({"status": {"observedGeneration": 3}})),
        )
        .await
        .unwrap();
    assert_eq!(fake.resource_version(), rv);

    // Pods have a status subresource too; the test side can set pod status like a kubelet.
    fake.apply(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"containers": [{"name": "c", "image": "i"}]},
        "status": {"phase": "Running", "podIP": "10.0.0.7"},
    }));
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    let p = pods
        .patch(
            "p",
            &pp,
            &Patch::Merge(json!({"status": {"phase": "Failed"}})),
        )
        .await
        .unwrap();
    assert_eq!(p.status.as_ref().unwrap().phase.as_deref(), Some("Running"));
    let p = pods
        .patch_status(
            "p",
            &pp,
            &Patch::Merge(json!({"status": {"phase": "Succeeded"}})),
        )
        .await
        .unwrap();
    assert_eq!(p.status.unwrap().phase.as_deref(), Some("Succeeded"));
    assert_eq!(fake.count("patch", "pods/status"), 1);
    assert_eq!(fake.count("patch", "meshservices/status"), 2);
    assert_eq!(fake.count("update", "meshservices/status"), 2);
}

#[tokio::test]
async fn finalizers_delay_deletion() {
    let fake = FakeKube::start().await;
    let (_, msvcs) = fake_mesh_services(&fake);
    let mut ms = mesh_service("fin");
    ms.metadata.finalizers = Some(vec!["meshbridge.io/cleanup".into()]);
    let created = msvcs.create(&PostParams::default(), &ms).await.unwrap();

    let mut events = msvcs
        .watch(
            &WatchParams::default(),
            &created.metadata.resource_version.clone().unwrap(),
        )
        .await
        .unwrap()
        .boxed();

    // Delete with a finalizer pending: deletionTimestamp set, object kept.
    let deleted = msvcs
        .delete("fin", &DeleteParams::default())
        .await
        .unwrap()
        .left()
        .unwrap();
    assert!(deleted.metadata.deletion_timestamp.is_some());
    assert_eq!(deleted.metadata.deletion_grace_period_seconds, Some(0));
    let still = msvcs.get("fin").await.unwrap();
    assert!(still.metadata.deletion_timestamp.is_some());
    // Deleting again changes nothing.
    let rv = fake.resource_version();
    msvcs.delete("fin", &DeleteParams::default()).await.unwrap();
    assert_eq!(fake.resource_version(), rv);
    // Status writes do not finish a deletion; removing the finalizer does.
    msvcs
        .patch_status(
            "fin",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observedGeneration": 1}})),
        )
        .await
        .unwrap();
    assert!(msvcs.get_opt("fin").await.unwrap().is_some());
    msvcs
        .patch(
            "fin",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": null}})),
        )
        .await
        .unwrap();
    assert!(msvcs.get_opt("fin").await.unwrap().is_none());

    let mut seen = Vec::new();
    while seen.len() < 3 {
        match timed("watch events", events.next()).await.unwrap().unwrap() {
            WatchEvent::Modified(o) => {
                seen.push(("MODIFIED", o.metadata.deletion_timestamp.is_some()))
            }
            WatchEvent::Deleted(o) => {
                seen.push(("DELETED", o.metadata.deletion_timestamp.is_some()))
            }
            WatchEvent::Bookmark(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [("MODIFIED", true), ("MODIFIED", true), ("DELETED", true)],
        "deletion requested, status written, finalizer removed"
    );

    // The test-side delete honours finalizers too.
    fake.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "held", "finalizers": ["x/y"]},
    }));
    assert!(fake.delete("v1", "ConfigMap", None, "held"));
    let held = fake.get("v1", "ConfigMap", None, "held").unwrap();
    assert!(held["metadata"]["deletionTimestamp"].is_string());
    let mut cleared = held.clone();
    cleared["metadata"]["finalizers"] = json!([]);
    fake.apply(cleared);
    assert!(fake.get("v1", "ConfigMap", None, "held").is_none());
    assert!(!fake.delete("v1", "ConfigMap", None, "held"));
}

#[tokio::test]
async fn label_and_field_selectors() {
    let fake = FakeKube::start().await;
    let client = client(&fake);
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    for (name, labels) in [
        ("p1", json!({"app": "web", "tier": "front"})),
        ("p2", json!({"app": "web", "tier": "back"})),
        ("p3", json!({"app": "db", "tier": "back", "n": "5"})),
        ("p4", json!({"app": "cache"})),
    ] {
        pods.create(&PostParams::default(), &pod(name, labels))
            .await
            .unwrap();
    }
    fake.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "other", "namespace": "elsewhere", "labels": {"app": "web"}}}));

    let names = |lp: ListParams| {
        let pods = pods.clone();
        async move {
            pods.list(&lp)
                .await
                .unwrap()
                .iter()
                .map(|p| p.name_any())
                .collect::<Vec<_>>()
        }
    };
    let l = |s: &str| ListParams::default().labels(s);
    assert_eq!(names(l("app=web")).await, ["p1", "p2"]);
    assert_eq!(names(l("app==web")).await, ["p1", "p2"]);
    assert_eq!(names(l("app!=web")).await, ["p3", "p4"]);
    assert_eq!(names(l("tier")).await, ["p1", "p2", "p3"]);
    assert_eq!(names(l("!tier")).await, ["p4"]);
    assert_eq!(names(l("app in (db, cache)")).await, ["p3", "p4"]);
    assert_eq!(names(l("app notin (db,cache)")).await, ["p1", "p2"]);
    assert_eq!(names(l("app=web,tier=back")).await, ["p2"]);
    assert_eq!(names(l("tier notin (front),app")).await, ["p2", "p3", "p4"]);
    assert_eq!(names(l("n>4")).await, ["p3"]);
    let f = |s: &str| ListParams::default().fields(s);
    assert_eq!(names(f("metadata.name=p2")).await, ["p2"]);
    assert_eq!(names(f("metadata.name!=p2")).await, ["p1", "p3", "p4"]);
    assert_eq!(
        names(f("metadata.namespace=default,metadata.name!=p1").labels("app=web")).await,
        ["p2"]
    );
    assert_eq!(names(f("status.phase=Pending")).await.len(), 4);

    let all: Api<Pod> = Api::all(client.clone());
    let n = all
        .list(&ListParams::default().labels("app=web"))
        .await
        .unwrap();
    assert_eq!(n.items.len(), 3);
    let n = all
        .list(&ListParams::default().fields("metadata.namespace=elsewhere"))
        .await
        .unwrap();
    assert_eq!(n.items.len(), 1);
}

#[tokio::test]
async fn pagination_with_consistent_snapshots() {
    let fake = FakeKube::start().await;
    let client = client(&fake);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "paging");
    for i in 1..=5 {
        fake.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": format!("p{i}"), "namespace": "paging"}}));
    }
    let lp = ListParams::default().limit(2);
    let page1 = pods.list(&lp).await.unwrap();
    assert_eq!(
        page1.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["p1", "p2"]
    );
    let token = page1.metadata.continue_.clone().unwrap();
    assert_eq!(page1.metadata.remaining_item_count, Some(3));
    let snapshot_rv = page1.metadata.resource_version.clone().unwrap();

    // Writes between pages are not seen: the pages are one snapshot.
    fake.delete("v1", "Pod", Some("paging"), "p4");
    fake.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p5", "namespace": "paging", "labels": {"new": "yes"}}}));
    fake.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p6", "namespace": "paging"}}));

    let page2 = pods.list(&lp.clone().continue_token(&token)).await.unwrap();
    assert_eq!(
        page2.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["p3", "p4"]
    );
    assert_eq!(
        page2.metadata.resource_version.as_deref(),
        Some(snapshot_rv.as_str())
    );
    let page3 = pods
        .list(
            &lp.clone()
                .continue_token(page2.metadata.continue_.as_deref().unwrap()),
        )
        .await
        .unwrap();
    assert_eq!(
        page3.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["p5"]
    );
    assert!(page3.items[0].labels().is_empty(), "p5 as of the snapshot");
    assert!(
        page3
            .metadata
            .continue_
            .as_deref()
            .is_none_or(str::is_empty)
    );

    // A fresh list sees the present.
    let now = pods.list(&ListParams::default()).await.unwrap();
    assert_eq!(
        now.iter().map(|p| p.name_any()).collect::<Vec<_>>(),
        ["p1", "p2", "p3", "p5", "p6"]
    );

    // An exact list at an old version is the snapshot too.
    let exact = pods
        .list(
            &ListParams::default()
                .at(&snapshot_rv)
                .matching(kube::api::VersionMatch::Exact),
        )
        .await
        .unwrap();
    assert_eq!(exact.items.len(), 5);
    assert!(exact.iter().any(|p| p.name_any() == "p4"));

    // After compaction an old continue token is 410 Expired.
    fake.compact();
    let e = api_err(pods.list(&lp.clone().continue_token(&token)).await);
    assert_eq!((e.code, e.reason.as_str()), (410, "Expired"));
    assert!(e.message.contains("continue parameter is too old"));
    let e = api_err(
        pods.list(
            &ListParams::default()
                .at(&snapshot_rv)
                .matching(kube::api::VersionMatch::Exact),
        )
        .await,
    );
    assert_eq!(e.code, 410);
    // A version from the future is a timeout.
    let pods: Api<Pod> = Api::namespaced(client_no_retry(&fake), "paging");
    let e = api_err(pods.list(&ListParams::default().at("999999")).await);
    assert_eq!(e.code, 504);
}

/// What the test keeps of a watcher event.
#[derive(Debug, Clone, PartialEq)]
enum Seen {
    Init,
    InitApply(String),
    InitDone,
    Apply(String),
    Delete(String),
    Error(u16),
}

// current_thread: the fake, the watcher and the test share one thread, so side-effects of the
// test between two awaits are atomic with respect to the watch stream.
#[tokio::test(flavor = "current_thread")]
async fn watcher_relists_after_compaction() {
    let fake = FakeKube::start().await;
    let client = client(&fake);
    let pods: Api<Pod> = Api::namespaced(client.clone(), "w");
    for name in ["p1", "p2", "p3"] {
        fake.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "w"}}));
    }
    let (reader, writer) = reflector::store::<Pod>();
    let stream = reflector::reflector(writer, watcher(pods.clone(), watcher::Config::default()));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(ev) = stream.next().await {
            let seen = match ev {
                Ok(watcher::Event::Init) => Seen::Init,
                Ok(watcher::Event::InitApply(p)) => Seen::InitApply(p.name_any()),
                Ok(watcher::Event::InitDone) => Seen::InitDone,
                Ok(watcher::Event::Apply(p)) => Seen::Apply(p.name_any()),
                Ok(watcher::Event::Delete(p)) => Seen::Delete(p.name_any()),
                Err(watcher::Error::WatchError(s)) => Seen::Error(s.code),
                Err(e) => panic!("watcher error: {e}"),
            };
            if tx.send(seen).is_err() {
                break;
            }
        }
    });
    let mut next = async || timed("watcher event", rx.recv()).await.unwrap();
    let init: Vec<Seen> = [
        next().await,
        next().await,
        next().await,
        next().await,
        next().await,
    ]
    .into();
    assert_eq!(
        init,
        [
            Seen::Init,
            Seen::InitApply("p1".into()),
            Seen::InitApply("p2".into()),
            Seen::InitApply("p3".into()),
            Seen::InitDone
        ]
    );
    timed("store ready", reader.wait_until_ready())
        .await
        .unwrap();
    // Wait for the watch to be open before writing (the watcher lists, then watches).
    timed("watch open", async {
        while fake.open_watches() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    pods.create(&PostParams::default(), &pod("p4", json!({})))
        .await
        .unwrap();
    assert_eq!(next().await, Seen::Apply("p4".into()));
    pods.patch(
        "p4",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"x": "1"}}})),
    )
    .await
    .unwrap();
    assert_eq!(next().await, Seen::Apply("p4".into()));
    pods.delete("p4", &DeleteParams::default()).await.unwrap();
    assert_eq!(next().await, Seen::Delete("p4".into()));

    // Compaction while p1 is deleted: the watch ends with 410, the watcher lists again and
    // the store loses p1 without a Delete event.
    fake.compact();
    assert!(fake.delete("v1", "Pod", Some("w"), "p1"));
    let mut after = Vec::new();
    while after.last() != Some(&Seen::InitDone) {
        after.push(next().await);
    }
    assert_eq!(
        after,
        [
            Seen::Error(410),
            Seen::Init,
            Seen::InitApply("p2".into()),
            Seen::InitApply("p3".into()),
            Seen::InitDone
        ]
    );
    let mut names: Vec<String> = reader.state().iter().map(|p| p.name_any()).collect();
    names.sort();
    assert_eq!(names, ["p2", "p3"]);

    // The watcher used a paginated list (limit=500) and a bookmark-enabled watch.
    let lists: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.verb == "list")
        .collect();
    assert_eq!(lists.len(), 2);
    assert!(
        lists
            .iter()
            .all(|r| r.resource == "pods" && r.namespace.as_deref() == Some("w"))
    );
    assert!(lists[0].query.contains("limit=500"), "{}", lists[0].query);
    let watches: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.verb == "watch")
        .collect();
    assert!(!watches.is_empty());
    assert!(
        watches[0].query.contains("resourceVersion="),
        "{}",
        watches[0].query
    );
    assert!(
        watches[0].query.contains("allowWatchBookmarks=true"),
        "{}",
        watches[0].query
    );
    assert!(
        watches[0].query.contains("timeoutSeconds=290"),
        "{}",
        watches[0].query
    );

    // close_watches ends the stream cleanly: the watcher re-watches from its version.
    timed("watch open after the relist", async {
        while fake.open_watches() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let watches_before = fake.count("watch", "pods");
    fake.close_watches();
    timed("re-watch", async {
        while fake.count("watch", "pods") == watches_before || fake.open_watches() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    fake.apply(
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p9", "namespace": "w"}}),
    );
    assert_eq!(next().await, Seen::Apply("p9".into()));
    assert_eq!(
        fake.count("list", "pods"),
        2,
        "no relist after a clean close"
    );
    task.abort();
}

#[tokio::test]
async fn watcher_with_streaming_lists() {
    let fake = FakeKube::start().await;
    for name in ["a", "b"] {
        fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}}));
    }
    let cms: Api<ConfigMap> = Api::default_namespaced(client(&fake));
    let mut stream = watcher(cms, watcher::Config::default().streaming_lists()).boxed();
    let mut seen = Vec::new();
    while seen.last() != Some(&Seen::InitDone) {
        seen.push(
            match timed("streaming list", stream.next())
                .await
                .unwrap()
                .unwrap()
            {
                watcher::Event::Init => Seen::Init,
                watcher::Event::InitApply(o) => Seen::InitApply(o.name_any()),
                watcher::Event::InitDone => Seen::InitDone,
                other => panic!("unexpected {other:?}"),
            },
        );
    }
    assert_eq!(
        seen,
        [
            Seen::Init,
            Seen::InitApply("a".into()),
            Seen::InitApply("b".into()),
            Seen::InitDone
        ]
    );
    fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}));
    match timed("live event", stream.next()).await.unwrap().unwrap() {
        watcher::Event::Apply(o) => assert_eq!(o.name_any(), "c"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(fake.count("list", "configmaps"), 0);
    let watch = &fake.requests()[0];
    assert!(
        watch.query.contains("sendInitialEvents=true"),
        "{}",
        watch.query
    );
}

#[tokio::test]
async fn raw_watch_protocol() {
    let fake = FakeKube::start().await;
    let http = reqwest::Client::new();
    let base = format!("{}/api/v1/namespaces/default/configmaps", fake.url());
    fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}}));
    let old_rv = fake.resource_version();
    fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "b"}}));
    fake.compact();
    let floor = fake.compaction_floor();
    assert_eq!(floor, fake.resource_version());

    // Too old: 200, a single ERROR event with a 410 Status, then the end.
    let mut r = http
        .get(format!("{base}?watch=true&resourceVersion={old_rv}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let (events, ended) = read_events(&mut r, WAIT, |_| false).await;
    assert!(ended);
    assert_eq!(events.len(), 1);
    assert_eq!(events[0]["type"], "ERROR");
    let status = &events[0]["object"];
    assert_eq!(status["kind"], "Status");
    assert_eq!(status["code"], 410);
    assert_eq!(status["reason"], "Expired");
    assert_eq!(
        status["message"],
        format!("too old resource version: {old_rv} ({floor})")
    );

    // resourceVersion=0: synthetic ADDED for what exists, then live events and bookmarks.
    let mut r = http
        .get(format!(
            "{base}?watch=1&resourceVersion=0&allowWatchBookmarks=true&timeoutSeconds=20"
        ))
        .send()
        .await
        .unwrap();
    let (events, _) = read_events(&mut r, WAIT, |e| e.len() >= 2).await;
    let names: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap(),
                e["object"]["metadata"]["name"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(names, [("ADDED", "a"), ("ADDED", "b")]);
    assert_eq!(fake.open_watches(), 1);
    fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}}));
    fake.delete("v1", "ConfigMap", None, "b");
    let rv_after = fake.resource_version();
    let (events, _) = read_events(&mut r, WAIT, |e| {
        e.iter().any(|e| {
            e["type"] == "BOOKMARK"
                && e["object"]["metadata"]["resourceVersion"] == json!(rv_after.to_string())
        })
    })
    .await;
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .filter(|t| *t != "BOOKMARK")
        .collect();
    assert_eq!(kinds, ["MODIFIED", "DELETED"]);
    let deleted = events.iter().find(|e| e["type"] == "DELETED").unwrap();
    assert_eq!(
        deleted["object"]["metadata"]["resourceVersion"],
        json!(rv_after.to_string())
    );
    assert_eq!(deleted["object"]["kind"], "ConfigMap");
    let bm = events.iter().find(|e| e["type"] == "BOOKMARK").unwrap();
    assert_eq!(bm["object"]["kind"], "ConfigMap");
    assert_eq!(bm["object"]["apiVersion"], "v1");

    // compact() ends open watches with the 410 ERROR event.
    fake.compact();
    let (events, ended) = read_events(&mut r, WAIT, |_| false).await;
    assert!(ended);
    assert_eq!(events.last().unwrap()["type"], "ERROR");
    assert_eq!(events.last().unwrap()["object"]["code"], 410);

    // timeoutSeconds ends the stream; selectors filter events.
    let from = fake.resource_version();
    let started = Instant::now();
    let mut r = http
        .get(format!(
            "{base}?watch=true&resourceVersion={from}&timeoutSeconds=1&labelSelector=keep%3Dyes"
        ))
        .send()
        .await
        .unwrap();
    fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "skip"}}));
    fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "keep", "labels": {"keep": "yes"}}}));
    let (events, ended) = read_events(&mut r, WAIT, |_| false).await;
    assert!(ended);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["object"]["metadata"]["name"], "keep");

    // A watch from a version after compaction replays the history since then.
    let mut r = http
        .get(format!(
            "{base}?watch=true&resourceVersion={from}&timeoutSeconds=1"
        ))
        .send()
        .await
        .unwrap();
    let (events, _) = read_events(&mut r, WAIT, |_| false).await;
    let names: Vec<_> = events
        .iter()
        .map(|e| e["object"]["metadata"]["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["skip", "keep"]);

    // close_watches ends streams cleanly. The response head comes at once, before any event.
    let mut r = http.get(format!("{base}?watch=true")).send().await.unwrap();
    let (events, _) = read_events(&mut r, WAIT, |e| e.len() >= 3).await;
    assert!(events.iter().all(|e| e["type"] == "ADDED"));
    let now = fake.resource_version();
    let mut quiet = timed(
        "response head of an idle watch",
        http.get(format!("{base}?watch=true&resourceVersion={now}"))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(quiet.status().as_u16(), 200);
    timed("watches registered", async {
        while fake.open_watches() < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    fake.close_watches();
    let (events, ended) = read_events(&mut r, WAIT, |_| false).await;
    assert!(ended && events.is_empty());
    let (events, ended) = read_events(&mut quiet, WAIT, |_| false).await;
    assert!(ended && events.is_empty());
    timed("watch closed", async {
        while fake.open_watches() != 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn request_log_and_injected_failures() {
    let fake = FakeKube::start().await;
    let (_, msvcs) = fake_mesh_services(&fake);
    create_mesh_service(&msvcs, "web").await;
    msvcs
        .patch_status(
            "web",
            &PatchParams::apply("meshbridge").force(),
            &Patch::Apply(json!({
                "apiVersion": "meshbridge.io/v1alpha1", "kind": "MeshService",
                "metadata": {"name": "web"}, "status": {"observedGeneration": 1},
            })),
        )
        .await
        .unwrap();
    msvcs.list(&ListParams::default()).await.unwrap();
    msvcs.get("web").await.unwrap();
    msvcs.delete("web", &DeleteParams::default()).await.unwrap();

    let log = fake.requests();
    let verbs: Vec<&str> = log.iter().map(|r| r.verb.as_str()).collect();
    assert_eq!(verbs, ["create", "patch", "list", "get", "delete"]);
    let patch = &log[1];
    assert_eq!(patch.group, "meshbridge.io");
    assert_eq!(patch.resource, "meshservices");
    assert_eq!(patch.subresource.as_deref(), Some("status"));
    assert_eq!(patch.namespace.as_deref(), Some("default"));
    assert_eq!(patch.name.as_deref(), Some("web"));
    assert_eq!(patch.field_manager.as_deref(), Some("meshbridge"));
    assert_eq!(
        patch.content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(fake.count("patch", "meshservices/status"), 1);
    assert_eq!(fake.count("patch", "meshservices"), 0);
    assert_eq!(fake.count("list", "meshservices"), 1);
    assert_eq!(log[2].name, None);
    // Test-side calls are not logged.
    fake.apply(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}}));
    fake.get("v1", "ConfigMap", None, "c");
    assert_eq!(fake.requests().len(), 5);
    fake.clear_requests();
    assert!(fake.requests().is_empty());

    // Injected failures: a Status with the code, then back to normal; they are logged.
    let lp = ListParams::default();
    let no_retry: Api<MeshService> = Api::default_namespaced(client_no_retry(&fake));
    fake.fail_next(2, 503);
    let e = api_err(no_retry.list(&lp).await);
    assert_eq!((e.code, e.reason.as_str()), (503, "ServiceUnavailable"));
    assert_eq!(api_err(no_retry.list(&lp).await).code, 503);
    assert!(no_retry.list(&lp).await.is_ok());
    // kube-rs retries 503 by default, after the fake's `Retry-After: 1`.
    fake.fail_next(1, 503);
    assert!(msvcs.list(&lp).await.is_ok());
    assert_eq!(fake.count("list", "meshservices"), 5);
    fake.fail_next(1, 500);
    let r = reqwest::Client::new()
        .get(format!(
            "{}/api/v1/namespaces/default/configmaps/c",
            fake.url()
        ))
        .header("user-agent", "fake-test/1.0")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 500);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        (body["kind"].as_str(), body["reason"].as_str()),
        (Some("Status"), Some("InternalError"))
    );
    let log = fake.requests();
    assert_eq!(log.len(), 6);
    assert_eq!(log[5].user_agent.as_deref(), Some("fake-test/1.0"));
    assert_eq!(
        (log[5].verb.as_str(), log[5].resource.as_str()),
        ("get", "configmaps")
    );
}

#[tokio::test]
async fn test_side_controls() {
    let mut fake = FakeKube::start().await;
    let rv0 = fake.resource_version();
    assert_eq!(rv0, 4, "the four default namespaces");
    assert_eq!(fake.list("v1", "Namespace").len(), 4);

    let stored = fake.apply(json!({
        "apiVersion": "meshbridge.io/v1alpha1", "kind": "MeshService",
        "metadata": {"name": "s", "namespace": "team-a"},
        "spec": {"serviceName": "s"},
        "status": {"observedGeneration": 1},
    }));
    // The namespace was created, then the object.
    assert_eq!(fake.resource_version(), rv0 + 2);
    assert!(fake.get("v1", "Namespace", None, "team-a").is_some());
    assert_eq!(
        stored["status"]["observedGeneration"], 1,
        "admin writes keep status"
    );
    assert_eq!(
        stored["metadata"]["resourceVersion"],
        json!((rv0 + 2).to_string())
    );
    assert_eq!(stored["metadata"]["generation"], 1);
    let uid = stored["metadata"]["uid"].clone();

    // Identical apply: no write. Changed spec: generation bumps, uid kept.
    assert_eq!(
        fake.apply(stored.clone())["metadata"]["resourceVersion"],
        stored["metadata"]["resourceVersion"]
    );
    let mut changed = stored.clone();
    changed["spec"]["mtls"] = json!("strict");
    let changed = fake.apply(changed);
    assert_eq!(changed["metadata"]["generation"], 2);
    assert_eq!(changed["metadata"]["uid"], uid);
    assert_eq!(fake.list("meshbridge.io/v1alpha1", "MeshService").len(), 1);

    // Through kube, the object reads the same.
    let client = client(&fake);
    let msvcs: Api<MeshService> = Api::namespaced(client, "team-a");
    let got = msvcs.get("s").await.unwrap();
    assert_eq!(
        got.spec.mtls,
        Some(meshbridge::api::mesh_service::MtlsMode::Strict)
    );
    assert_eq!(got.status.unwrap().observed_generation, Some(1));

    // The test side may backdate an object or choose its uid.
    let old = fake.apply(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "old", "uid": "u-1", "creationTimestamp": "2020-01-01T00:00:00Z"},
    }));
    assert_eq!(old["metadata"]["creationTimestamp"], "2020-01-01T00:00:00Z");
    assert_eq!(old["metadata"]["uid"], "u-1");
    assert_eq!(old["metadata"]["namespace"], "default");

    assert!(fake.delete("meshbridge.io/v1alpha1", "MeshService", Some("team-a"), "s"));
    assert!(
        fake.get("meshbridge.io/v1alpha1", "MeshService", Some("team-a"), "s")
            .is_none()
    );

    fake.stop().await;
    assert!(
        reqwest::get(format!("{}/version", fake.url()))
            .await
            .is_err()
    );
}

/// 5,000 pods and 1,000 MeshServices: seeding, paginated lists and a watcher's initial list
/// stay fast.
#[tokio::test]
async fn scale() {
    let fake = FakeKube::start().await;
    let started = Instant::now();
    for i in 0..5000 {
        fake.apply(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("pod-{i:05}"), "namespace": format!("ns-{}", i % 10), "labels": {"app": format!("svc-{}", i % 1000)}},
            "spec": {"containers": [{"name": "app", "image": "busybox"}]},
            "status": {"phase": "Running", "podIP": format!("10.0.{}.{}", i / 250, i % 250)},
        }));
    }
    for i in 0..1000 {
        fake.apply(json!({
            "apiVersion": "meshbridge.io/v1alpha1", "kind": "MeshService",
            "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % 10)},
            "spec": {"serviceName": format!("svc-{i}"), "selector": {"app": format!("svc-{i}")}},
        }));
    }
    let seeded = started.elapsed();

    let client = client(&fake);
    let pods: Api<Pod> = Api::all(client.clone());
    let msvcs: Api<MeshService> = Api::all(client.clone());
    let started = Instant::now();
    let (reader, writer) = reflector::store::<Pod>();
    let stream = reflector::reflector(writer, watcher(pods.clone(), watcher::Config::default()));
    let task = tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    timed("reflector ready", reader.wait_until_ready())
        .await
        .unwrap();
    assert_eq!(reader.state().len(), 5000);
    assert_eq!(fake.count("list", "pods"), 10, "ten pages of 500");
    let ms = msvcs.list(&ListParams::default()).await.unwrap();
    assert_eq!(ms.items.len(), 1000);
    let selected = pods
        .list(&ListParams::default().labels("app=svc-7"))
        .await
        .unwrap();
    assert_eq!(selected.items.len(), 5);
    let listed = started.elapsed();
    task.abort();
    eprintln!("scale: seeded 6000 objects in {seeded:?}, listed in {listed:?}");
    assert!(seeded < Duration::from_secs(20), "seeding took {seeded:?}");
    assert!(listed < Duration::from_secs(20), "listing took {listed:?}");
}

// ---------------------------------------------------------------------------------------
// Admission webhooks

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use base64::Engine;
use http_body_util::BodyExt;

/// `(HTTP status, body)` a test webhook answers to `(path, review)`.
type Answer = Arc<dyn Fn(&str, &Value) -> (u16, Value) + Send + Sync>;

/// A tiny HTTPS admission webhook on 127.0.0.1, serving `hook.pem` from `dir`. It records
/// every review; a review POSTed to `/slow` is answered after 3 s.
struct TestHook {
    addr: SocketAddr,
    reviews: Arc<Mutex<Vec<(String, Value)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TestHook {
    async fn start(dir: &Path, answer: Answer) -> TestHook {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let chain = CertificateDer::pem_file_iter(dir.join("hook.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join("hook.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let reviews = Arc::new(Mutex::new(Vec::new()));
        let recorded = reviews.clone();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, reviews, answer) =
                    (acceptor.clone(), recorded.clone(), answer.clone());
                conns.spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(WAIT, acceptor.accept(tcp)).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (reviews, answer) = (reviews.clone(), answer.clone());
                            async move {
                                let path = req.uri().path().to_string();
                                let body = req
                                    .into_body()
                                    .collect()
                                    .await
                                    .map(|b| b.to_bytes())
                                    .unwrap_or_default();
                                let review: Value =
                                    serde_json::from_slice(&body).unwrap_or(Value::Null);
                                reviews.lock().unwrap().push((path.clone(), review.clone()));
                                if path == "/slow" {
                                    tokio::time::sleep(Duration::from_secs(3)).await;
                                }
                                let (status, out) = answer(&path, &review);
                                let resp = hyper::Response::builder()
                                    .status(status)
                                    .header("content-type", "application/json")
                                    .body(http_body_util::Full::new(bytes::Bytes::from(
                                        serde_json::to_vec(&out).unwrap(),
                                    )))
                                    .unwrap();
                                Ok::<_, Infallible>(resp)
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        TestHook {
            addr,
            reviews,
            task,
        }
    }

    /// The reviews POSTed to `path`, oldest first.
    fn reviews(&self, path: &str) -> Vec<Value> {
        self.reviews
            .lock()
            .unwrap()
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

impl Drop for TestHook {
    fn drop(&mut self) {
        // Dropping the accept loop's JoinSet aborts every connection.
        self.task.abort();
    }
}

/// The AdmissionReview answering `review`: `response` with its uid added.
fn reply(review: &Value, mut response: Value) -> (u16, Value) {
    response["uid"] = review["request"]["uid"].clone();
    (
        200,
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
    )
}

fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// A JSONPatch response adding `ops`.
fn patched(review: &Value, ops: Value, warnings: &[&str]) -> (u16, Value) {
    reply(
        review,
        json!({"allowed": true, "patchType": "JSONPatch",
               "patch": b64(&serde_json::to_vec(&ops).unwrap()), "warnings": warnings}),
    )
}

/// Certificates for the test webhook (`hook.pem` for `hooks.test.svc` and 127.0.0.1) and an
/// unrelated CA (`other-ca.pem`), with the caBundles of both.
struct Certs {
    dir: tempfile::TempDir,
    ca_bundle: String,
    other_ca_bundle: String,
}

fn certs() -> Certs {
    let dir = tempfile::tempdir().unwrap();
    issue_cert(dir.path(), "hook", "DNS:hooks.test.svc,IP:127.0.0.1");
    issue_cert(dir.path(), "other", "DNS:other.test.svc");
    let read = |f: &str| b64(&std::fs::read(dir.path().join(f)).unwrap());
    Certs {
        ca_bundle: read("hook-ca.pem"),
        other_ca_bundle: read("other-ca.pem"),
        dir,
    }
}

fn pod_rule(operations: &[&str]) -> Value {
    json!([{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
            "operations": operations, "scope": "Namespaced"}])
}

/// A webhook configuration of `kind` with one webhook per `(name, webhook fields)`.
fn hook_config(kind: &str, name: &str, webhooks: Vec<(&str, Value)>) -> Value {
    let webhooks: Vec<Value> = webhooks
        .into_iter()
        .map(|(n, mut w)| {
            w["name"] = json!(n);
            w["admissionReviewVersions"] = json!(["v1"]);
            if w.get("sideEffects").is_none() {
                w["sideEffects"] = json!("None");
            }
            w
        })
        .collect();
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": kind,
           "metadata": {"name": name}, "webhooks": webhooks})
}

fn calls_of(fake: &FakeKube, webhook: &str) -> Vec<AdmissionCall> {
    fake.admission_calls()
        .into_iter()
        .filter(|c| c.webhook == webhook)
        .collect()
}

fn labelled_pod(name: &str, namespace: &str, labels: Value) -> Pod {
    let mut p = pod(name, labels);
    p.metadata.namespace = Some(namespace.to_string());
    p
}

#[tokio::test]
async fn admission_webhooks_patch_deny_and_warn_in_order() {
    let certs = certs();
    let answer: Answer = Arc::new(|path: &str, review: &Value| {
        let object = &review["request"]["object"];
        match path {
            // Adds a label and warns.
            "/first" => patched(
                review,
                json!([{"op": "add", "path": "/metadata/labels/first", "value": "yes"}]),
                &["first was here"],
            ),
            // Copies the first webhook's label into an annotation: it ran second.
            "/second" => {
                let seen = object["metadata"]["labels"]["first"]
                    .as_str()
                    .unwrap_or("no")
                    .to_string();
                let mut ops = Vec::new();
                if object["metadata"]["annotations"].is_null() {
                    ops.push(json!({"op": "add", "path": "/metadata/annotations", "value": {}}));
                }
                ops.push(json!({"op": "add", "path": "/metadata/annotations/second-saw-first", "value": seen}));
                patched(review, json!(ops), &[])
            }
            "/validate" if object["metadata"]["name"] == "forbidden" => reply(
                review,
                json!({"allowed": false, "status": {"code": 403, "reason": "Forbidden",
                       "message": "pods named forbidden are not welcome"},
                       "warnings": ["denial warning"]}),
            ),
            _ => reply(review, json!({"allowed": true})),
        }
    });
    let hook = TestHook::start(certs.dir.path(), answer).await;
    let fake = FakeKube::start().await;
    fake.route_service("test", "hooks", 8443, hook.addr);
    let service = |path: &str| {
        json!({"service": {"namespace": "test", "name": "hooks", "port": 8443, "path": path},
               "caBundle": certs.ca_bundle})
    };
    // Applied out of order: configurations are called by name.
    fake.apply(hook_config(
        "MutatingWebhookConfiguration",
        "b-second",
        vec![(
            "second.test.io",
            json!({"clientConfig": service("/second"), "rules": pod_rule(&["CREATE"])}),
        )],
    ));
    fake.apply(hook_config(
        "MutatingWebhookConfiguration",
        "a-first",
        vec![(
            "first.test.io",
            json!({"clientConfig": service("/first"), "rules": pod_rule(&["CREATE"])}),
        )],
    ));
    let url = format!("https://127.0.0.1:{}/validate", hook.addr.port());
    fake.apply(hook_config(
        "ValidatingWebhookConfiguration",
        "validate",
        vec![(
            "validate.test.io",
            json!({"clientConfig": {"url": url, "caBundle": certs.ca_bundle},
                   "rules": pod_rule(&["CREATE", "UPDATE"]), "failurePolicy": "Fail"}),
        )],
    ));

    let pods: Api<Pod> = Api::namespaced(client(&fake), "default");
    let created = timed(
        "create",
        pods.create(&PostParams::default(), &pod("web", json!({"app": "web"}))),
    )
    .await
    .unwrap();
    let labels = created.labels();
    assert_eq!(labels.get("first").map(String::as_str), Some("yes"));
    assert_eq!(
        created
            .annotations()
            .get("second-saw-first")
            .map(String::as_str),
        Some("yes"),
        "the second configuration saw the first one's patch"
    );
    let stored = fake.get("v1", "Pod", None, "web").unwrap();
    assert_eq!(stored["metadata"]["labels"]["first"], "yes");
    let order: Vec<(String, bool, bool)> = fake
        .admission_calls()
        .iter()
        .map(|c| (c.webhook.clone(), c.mutating, c.patched))
        .collect();
    assert_eq!(
        order,
        [
            ("first.test.io".to_string(), true, true),
            ("second.test.io".to_string(), true, true),
            ("validate.test.io".to_string(), false, false),
        ]
    );
    let first = &calls_of(&fake, "first.test.io")[0];
    assert_eq!(
        (
            first.operation.as_str(),
            first.resource.as_str(),
            first.namespace.as_deref(),
            first.name.as_deref(),
            first.configuration.as_str()
        ),
        ("CREATE", "pods", Some("default"), Some("web"), "a-first")
    );
    assert!(first.allowed && first.error.is_none());
    assert_eq!(first.warnings, ["first was here"]);

    // The review is an admission.k8s.io/v1 AdmissionReview with a fresh uid per call; the
    // validating webhook sees the object as stored (identity set, patches applied).
    let review = &hook.reviews("/first")[0];
    assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(review["kind"], "AdmissionReview");
    let request = &review["request"];
    assert_eq!(
        request["kind"],
        json!({"group": "", "version": "v1", "kind": "Pod"})
    );
    assert_eq!(
        request["resource"],
        json!({"group": "", "version": "v1", "resource": "pods"})
    );
    assert_eq!(request["requestKind"], request["kind"]);
    assert_eq!(request["requestResource"], request["resource"]);
    assert_eq!(
        (
            &request["namespace"],
            &request["name"],
            &request["operation"]
        ),
        (&json!("default"), &json!("web"), &json!("CREATE"))
    );
    assert!(request["oldObject"].is_null());
    assert_eq!(request["dryRun"], false);
    assert_eq!(request["options"]["kind"], "CreateOptions");
    assert!(request["userInfo"]["username"].is_string());
    assert!(
        request["object"]["metadata"]["uid"].is_null(),
        "mutating webhooks see the object before the server sets its identity"
    );
    let validated = &hook.reviews("/validate")[0]["request"];
    assert_ne!(validated["uid"], request["uid"]);
    assert_eq!(validated["uid"].as_str().unwrap().len(), 36);
    assert_eq!(
        validated["object"]["metadata"]["uid"],
        stored["metadata"]["uid"]
    );
    assert_eq!(validated["object"]["metadata"]["labels"]["first"], "yes");

    // A refusal: the webhook's code, the server's wording, nothing stored; its warnings
    // still reach the client.
    let e = api_err(
        pods.create(
            &PostParams::default(),
            &pod("forbidden", json!({"app": "web"})),
        )
        .await,
    );
    assert_eq!(e.code, 403);
    assert_eq!(e.reason, "Forbidden");
    assert_eq!(
        e.message,
        "admission webhook \"validate.test.io\" denied the request: pods named forbidden are not welcome"
    );
    assert!(fake.get("v1", "Pod", None, "forbidden").is_none());
    let denied = calls_of(&fake, "validate.test.io").pop().unwrap();
    assert!(!denied.allowed && !denied.patched && denied.error.is_none());
    assert_eq!(denied.warnings, ["denial warning"]);

    // Warnings come back as `Warning: 299 - "<text>"` headers.
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{}/api/v1/namespaces/default/pods", fake.url()))
        .json(&pod("forbidden", json!({})))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let warnings: Vec<String> = r
        .headers()
        .get_all("warning")
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        warnings,
        ["299 - \"first was here\"", "299 - \"denial warning\""]
    );

    // generateName: mutating webhooks see no name yet, validating ones the generated one.
    fake.clear_admission_calls();
    let mut unnamed = pod("", json!({"app": "web"}));
    unnamed.metadata.name = None;
    unnamed.metadata.generate_name = Some("web-".into());
    let made = pods.create(&PostParams::default(), &unnamed).await.unwrap();
    let calls = fake.admission_calls();
    assert_eq!(calls[0].name, None);
    assert_eq!(calls[2].name, made.metadata.name);

    // UPDATE: only the webhook whose rules list it; the old object comes along.
    fake.clear_admission_calls();
    let mut changed = pods.get("web").await.unwrap();
    changed.labels_mut().insert("tier".into(), "front".into());
    pods.replace("web", &PostParams::default(), &changed)
        .await
        .unwrap();
    let calls = fake.admission_calls();
    assert_eq!(calls.len(), 1, "{calls:?}");
    assert_eq!(
        (calls[0].webhook.as_str(), calls[0].operation.as_str()),
        ("validate.test.io", "UPDATE")
    );
    let update = hook.reviews("/validate").pop().unwrap();
    assert_eq!(update["request"]["options"]["kind"], "UpdateOptions");
    assert!(update["request"]["oldObject"]["metadata"]["labels"]["tier"].is_null());
    assert_eq!(
        update["request"]["object"]["metadata"]["labels"]["tier"],
        "front"
    );
}

#[tokio::test]
async fn failure_policies_tls_and_bad_responses() {
    let certs = certs();
    let answer: Answer = Arc::new(|path: &str, review: &Value| match path {
        "/wrong-uid" => (
            200,
            json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                   "response": {"uid": "not-the-uid", "allowed": true}}),
        ),
        "/error" => (500, json!({"error": "boom"})),
        "/not-a-review" => (200, json!({"hello": "world"})),
        _ => reply(review, json!({"allowed": true})),
    });
    let hook = TestHook::start(certs.dir.path(), answer).await;
    let fake = FakeKube::start().await;
    fake.route_service("test", "hooks", 443, hook.addr);
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // Nothing listens there any more.
    let pods: Api<Pod> = Api::namespaced(client(&fake), "default");
    let mut n = 0;
    let mut create = async |config: Value| -> kube::Result<Pod> {
        fake.apply(config);
        n += 1;
        let r = pods
            .create(&PostParams::default(), &pod(&format!("p{n}"), json!({})))
            .await;
        assert!(fake.delete(
            "admissionregistration.k8s.io/v1",
            "ValidatingWebhookConfiguration",
            None,
            "policy"
        ));
        r
    };
    let config = |policy: &str, client_config: Value, timeout: u64| {
        hook_config(
            "ValidatingWebhookConfiguration",
            "policy",
            vec![(
                "policy.test.io",
                json!({"clientConfig": client_config, "rules": pod_rule(&["*"]),
                       "failurePolicy": policy, "timeoutSeconds": timeout}),
            )],
        )
    };
    let url = |port: u16, path: &str| format!("https://127.0.0.1:{port}{path}");
    let cases: Vec<(&str, Value, u64, &str)> = vec![
        (
            "connection refused",
            json!({"url": url(down.port(), "/"), "caBundle": certs.ca_bundle}),
            10,
            "failed to call webhook",
        ),
        (
            "caBundle of another CA",
            json!({"url": url(hook.addr.port(), "/"), "caBundle": certs.other_ca_bundle}),
            10,
            "certificate",
        ),
        (
            "service not routed",
            json!({"service": {"namespace": "test", "name": "elsewhere", "port": 443},
                   "caBundle": certs.ca_bundle}),
            10,
            "not routed",
        ),
        (
            "timeout",
            json!({"url": url(hook.addr.port(), "/slow"), "caBundle": certs.ca_bundle}),
            1,
            "timed out",
        ),
        (
            "non-200",
            json!({"url": url(hook.addr.port(), "/error"), "caBundle": certs.ca_bundle}),
            10,
            "HTTP 500",
        ),
        (
            "uid mismatch",
            json!({"url": url(hook.addr.port(), "/wrong-uid"), "caBundle": certs.ca_bundle}),
            10,
            "expected response.uid",
        ),
        (
            "not a review",
            json!({"url": url(hook.addr.port(), "/not-a-review"), "caBundle": certs.ca_bundle}),
            10,
            "expected webhook response of admission.k8s.io/v1",
        ),
    ];
    for (what, client_config, timeout, why) in cases {
        let started = Instant::now();
        // Ignore: the write goes on; the failure is recorded.
        fake.clear_admission_calls();
        let r = create(config("Ignore", client_config.clone(), timeout)).await;
        assert!(r.is_ok(), "{what}: {r:?}");
        let call = fake.admission_calls().pop().unwrap();
        let error = call.error.clone().unwrap_or_default();
        assert!(call.allowed && error.contains(why), "{what}: {call:?}");
        // Fail: the write fails with a 500 naming the webhook.
        let e = api_err(create(config("Fail", client_config, timeout)).await);
        assert_eq!(
            (e.code, e.reason.as_str()),
            (500, "InternalError"),
            "{what}"
        );
        assert!(
            e.message
                .contains("failed calling webhook \"policy.test.io\": ")
                && e.message.contains(why),
            "{what}: {}",
            e.message
        );
        let call = fake.admission_calls().pop().unwrap();
        assert!(!call.allowed && call.error.is_some(), "{what}: {call:?}");
        assert!(
            started.elapsed() < Duration::from_secs(8),
            "{what} took {:?}",
            started.elapsed()
        );
    }
    // failurePolicy defaults to Fail; the same certificate through the routed service name
    // is trusted.
    let mut no_policy = config(
        "Fail",
        json!({"url": url(down.port(), "/"), "caBundle": certs.ca_bundle}),
        10,
    );
    no_policy["webhooks"][0]
        .as_object_mut()
        .unwrap()
        .remove("failurePolicy");
    assert_eq!(api_err(create(no_policy).await).code, 500);
    let routed = config(
        "Fail",
        json!({"service": {"namespace": "test", "name": "hooks"}, "caBundle": certs.ca_bundle}),
        10,
    );
    assert!(create(routed).await.is_ok());
    let pods_stored = fake.list("v1", "Pod").len();
    assert_eq!(pods_stored, 8, "each Ignore case and the routed one");
    // The TLS failure is a certificate verification failure, for the DNS name too.
    let mut wrong_name = config(
        "Fail",
        json!({"service": {"namespace": "test", "name": "hooks", "port": 443},
               "caBundle": certs.ca_bundle}),
        10,
    );
    fake.route_service("other", "hooks", 443, hook.addr);
    wrong_name["webhooks"][0]["clientConfig"]["service"]["namespace"] = json!("other");
    let e = api_err(create(wrong_name).await);
    assert!(
        e.message.contains("hooks.other.svc") && e.message.contains("certificate"),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn namespace_and_object_selectors_choose_the_webhooks() {
    let certs = certs();
    let answer: Answer =
        Arc::new(|_: &str, review: &Value| reply(review, json!({"allowed": true})));
    let hook = TestHook::start(certs.dir.path(), answer).await;
    let fake = FakeKube::start().await;
    fake.route_service("test", "hooks", 443, hook.addr);
    let client_config =
        json!({"service": {"namespace": "test", "name": "hooks"}, "caBundle": certs.ca_bundle});
    let webhook = |selectors: Value| {
        let mut w = json!({"clientConfig": client_config, "rules": pod_rule(&["CREATE"])});
        for (k, v) in selectors.as_object().unwrap() {
            w[k] = v.clone();
        }
        w
    };
    for (ns, labels) in [
        ("prod-a", json!({"env": "prod"})),
        ("dev-a", json!({"env": "dev"})),
        ("plain", json!({})),
    ] {
        fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                          "metadata": {"name": ns, "labels": labels}}));
    }
    // The server's own label is there, and stays through a replace that drops it.
    fake.apply(json!({"apiVersion": "v1", "kind": "Namespace",
                      "metadata": {"name": "dev-a", "labels": {"env": "dev"}}}));
    let dev = fake.get("v1", "Namespace", None, "dev-a").unwrap();
    assert_eq!(
        dev["metadata"]["labels"],
        json!({"env": "dev", "kubernetes.io/metadata.name": "dev-a"})
    );
    fake.apply(hook_config(
        "MutatingWebhookConfiguration",
        "selectors",
        vec![
            (
                "prod-web.test.io",
                webhook(json!({
                    "namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]},
                    "objectSelector": {"matchLabels": {"app": "web"}},
                })),
            ),
            (
                "not-dev.test.io",
                webhook(json!({
                    "namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]}]},
                    "objectSelector": {"matchExpressions": [{"key": "skip", "operator": "DoesNotExist"}]},
                })),
            ),
            (
                "labelled.test.io",
                webhook(json!({
                    "namespaceSelector": {"matchExpressions": [{"key": "env", "operator": "Exists"}]},
                })),
            ),
            (
                "by-name.test.io",
                webhook(json!({
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dev-a"}},
                })),
            ),
        ],
    ));
    let client = client(&fake);
    let cases = [
        (
            "prod-a",
            json!({"app": "web"}),
            vec!["prod-web", "not-dev", "labelled"],
        ),
        ("prod-a", json!({"app": "db"}), vec!["not-dev", "labelled"]),
        (
            "prod-a",
            json!({"app": "web", "skip": "1"}),
            vec!["prod-web", "labelled"],
        ),
        ("dev-a", json!({"app": "web"}), vec!["labelled", "by-name"]),
        ("plain", json!({"app": "web"}), vec!["not-dev"]),
    ];
    for (i, (ns, labels, want)) in cases.into_iter().enumerate() {
        fake.clear_admission_calls();
        let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
        pods.create(
            &PostParams::default(),
            &labelled_pod(&format!("p{i}"), ns, labels.clone()),
        )
        .await
        .unwrap();
        let called: Vec<String> = fake
            .admission_calls()
            .iter()
            .map(|c| c.webhook.trim_end_matches(".test.io").to_string())
            .collect();
        assert_eq!(called, want, "{ns} {labels}");
    }
    // Test-side writes do not go through admission.
    fake.clear_admission_calls();
    fake.apply(json!({"apiVersion": "v1", "kind": "Pod",
                      "metadata": {"name": "side", "namespace": "prod-a", "labels": {"app": "web"}},
                      "spec": {"containers": [{"name": "app", "image": "busybox"}]}}));
    assert!(fake.admission_calls().is_empty());
    drop(hook);
}

#[tokio::test]
async fn rules_operations_subresources_apply_and_dry_run() {
    let certs = certs();
    let answer: Answer =
        Arc::new(|_: &str, review: &Value| reply(review, json!({"allowed": true})));
    let hook = TestHook::start(certs.dir.path(), answer).await;
    let fake = FakeKube::start().await;
    let url = format!("https://127.0.0.1:{}/", hook.addr.port());
    let cc = json!({"url": url, "caBundle": certs.ca_bundle});
    fake.apply(hook_config(
        "ValidatingWebhookConfiguration",
        "rules",
        vec![(
            "rules.test.io",
            json!({"clientConfig": cc, "rules": [
                {"apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"], "operations": ["CREATE"]},
                {"apiGroups": ["meshbridge.io"], "apiVersions": ["*"], "resources": ["meshservices/status"], "operations": ["UPDATE"]},
                {"apiGroups": ["*"], "apiVersions": ["*"], "resources": ["namespaces"], "operations": ["*"], "scope": "Namespaced"},
                {"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods/*"], "operations": ["UPDATE"], "scope": "Namespaced"},
            ]}),
        )],
    ));
    let client = client(&fake);
    let seen = |fake: &FakeKube| -> Vec<(String, String)> {
        let calls = fake.admission_calls();
        fake.clear_admission_calls();
        calls
            .into_iter()
            .map(|c| (c.operation, c.resource))
            .collect()
    };
    // Server-side apply of a missing object is a CREATE; of an existing one an UPDATE.
    let cms: Api<ConfigMap> = Api::default_namespaced(client.clone());
    let apply = |data: &str| json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}, "data": {"k": data}});
    let pp = PatchParams::apply("test");
    cms.patch("c", &pp, &Patch::Apply(apply("1")))
        .await
        .unwrap();
    assert_eq!(seen(&fake), [("CREATE".into(), "configmaps".into())]);
    let review = hook.reviews("/").pop().unwrap();
    assert_eq!(review["request"]["options"]["kind"], "PatchOptions");
    assert_eq!(review["request"]["options"]["fieldManager"], "test");
    cms.patch("c", &pp, &Patch::Apply(apply("2")))
        .await
        .unwrap();
    assert!(
        seen(&fake).is_empty(),
        "UPDATE is not in the configmaps rule"
    );
    // A subresource matches only a rule naming it (or `res/*`, which also covers `res`).
    let msvcs: Api<MeshService> = Api::default_namespaced(client.clone());
    create_mesh_service(&msvcs, "m").await;
    assert!(seen(&fake).is_empty());
    msvcs
        .patch_status(
            "m",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"observedGeneration": 1}})),
        )
        .await
        .unwrap();
    assert_eq!(
        seen(&fake),
        [("UPDATE".into(), "meshservices/status".into())]
    );
    let pods: Api<Pod> = Api::default_namespaced(client.clone());
    pods.create(&PostParams::default(), &pod("p", json!({})))
        .await
        .unwrap();
    assert!(seen(&fake).is_empty());
    pods.patch_status(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Running"}})),
    )
    .await
    .unwrap();
    pods.patch(
        "p",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"a": "b"}}})),
    )
    .await
    .unwrap();
    assert_eq!(
        seen(&fake),
        [
            ("UPDATE".into(), "pods/status".into()),
            ("UPDATE".into(), "pods".into())
        ]
    );
    // Scope: a Namespaced rule never matches a Namespace (cluster-scoped).
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "fresh"}})).unwrap(),
        )
        .await
        .unwrap();
    assert!(seen(&fake).is_empty());

    // Dry run: a webhook without side effects is called with dryRun and nothing is stored;
    // one that may have side effects refuses the request without being called.
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let before = fake.resource_version();
    let cm = |name: &str| -> ConfigMap {
        serde_json::from_value(json!({"metadata": {"name": name}})).unwrap()
    };
    cms.create(&dry, &cm("dry")).await.unwrap();
    assert_eq!(fake.resource_version(), before);
    assert!(fake.get("v1", "ConfigMap", None, "dry").is_none());
    let calls = fake.admission_calls();
    assert!(calls[0].dry_run, "{calls:?}");
    assert_eq!(hook.reviews("/").pop().unwrap()["request"]["dryRun"], true);
    seen(&fake);
    let mut unsafe_hook = fake
        .get(
            "admissionregistration.k8s.io/v1",
            "ValidatingWebhookConfiguration",
            None,
            "rules",
        )
        .unwrap();
    unsafe_hook["webhooks"][0]["sideEffects"] = json!("Some");
    fake.apply(unsafe_hook);
    let e = api_err(cms.create(&dry, &cm("dry")).await);
    assert_eq!(e.code, 400);
    assert_eq!(
        e.message,
        "admission webhook \"rules.test.io\" does not support dry run"
    );
    assert!(seen(&fake).is_empty());
    // Webhook configurations are not themselves sent to webhooks.
    let star = json!([{"apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*"], "operations": ["*"]}]);
    let everything = hook_config(
        "ValidatingWebhookConfiguration",
        "everything",
        vec![(
            "everything.test.io",
            json!({"clientConfig": cc, "rules": star}),
        )],
    );
    let configs: Api<kube::api::DynamicObject> = Api::all_with(
        client.clone(),
        &kube::api::ApiResource::erase::<
            k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration,
        >(&()),
    );
    configs
        .create(
            &PostParams::default(),
            &serde_json::from_value(everything.clone()).unwrap(),
        )
        .await
        .unwrap();
    configs
        .patch(
            "everything",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"changed": "yes"}}})),
        )
        .await
        .unwrap();
    assert!(seen(&fake).is_empty());
    cms.create(&PostParams::default(), &cm("seen"))
        .await
        .unwrap();
    assert_eq!(calls_of(&fake, "everything.test.io").len(), 1);
    seen(&fake);
    fake.delete(
        "admissionregistration.k8s.io/v1",
        "ValidatingWebhookConfiguration",
        None,
        "everything",
    );
    // Without configurations, nothing is called.
    fake.delete(
        "admissionregistration.k8s.io/v1",
        "ValidatingWebhookConfiguration",
        None,
        "rules",
    );
    cms.create(&PostParams::default(), &cm("plain"))
        .await
        .unwrap();
    assert!(seen(&fake).is_empty());
}
