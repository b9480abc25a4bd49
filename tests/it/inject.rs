//! Sidecar injection: what it does to each workload kind and annotation (snapshots), that it
//! is idempotent (property), that its output is valid Kubernetes (the real schemas), and that
//! the injected sidecar's arguments make a real Envoy that connects to meshbridge.

use crate::support;

use std::process::{Command, Stdio};
use std::time::Duration;

use meshbridge::webhook::{InjectSettings, Outcome, inject_manifest, inject_stream};
use proptest::prelude::*;
use serde_json::{Value, json};
use support::{ControlPlane, eventually, free_port, http_get};

fn yaml(v: &Value) -> String {
    serde_norway::to_string(v).unwrap()
}

fn pod(annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "orders-7d9f", "namespace": "shop", "labels": {"app": "orders"},
                     "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "orders:1.4",
                                 "ports": [{"containerPort": 8080}]}]},
    })
}

fn workload(kind: &str, api_version: &str) -> Value {
    let template = json!({
        "metadata": {"labels": {"app.kubernetes.io/name": "billing"}},
        "spec": {"containers": [{"name": "app", "image": "billing:2", "ports": [{"containerPort": 9000}]}],
                 "restartPolicy": if kind == "Job" || kind == "CronJob" { "OnFailure" } else { "Always" }},
    });
    let selector = json!({"matchLabels": {"app.kubernetes.io/name": "billing"}});
    let spec = match kind {
        "Deployment" | "DaemonSet" => json!({"selector": selector, "template": template}),
        "StatefulSet" => {
            json!({"selector": selector, "serviceName": "billing", "template": template})
        }
        "Job" => json!({"template": template}),
        "CronJob" => {
            json!({"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template}}})
        }
        _ => unreachable!(),
    };
    json!({"apiVersion": api_version, "kind": kind, "metadata": {"name": "billing", "namespace": "shop"}, "spec": spec})
}

fn injected(doc: Value, settings: &InjectSettings) -> Value {
    let (out, outcome) = inject_manifest(doc, settings).unwrap();
    assert_eq!(outcome, Outcome::Injected);
    out
}

#[test]
fn each_workload_kind_gets_its_template_injected() {
    let settings = InjectSettings::default();
    for (kind, api) in [
        ("Deployment", "apps/v1"),
        ("StatefulSet", "apps/v1"),
        ("DaemonSet", "apps/v1"),
        ("Job", "batch/v1"),
        ("CronJob", "batch/v1"),
    ] {
        insta::assert_snapshot!(
            format!("workload_{kind}"),
            yaml(&injected(workload(kind, api), &settings))
        );
    }
}

#[test]
fn a_pod_with_every_annotation() {
    let settings = InjectSettings::default();
    insta::assert_snapshot!("pod_plain", yaml(&injected(pod(json!({})), &settings)));
    insta::assert_snapshot!(
        "pod_annotated",
        yaml(&injected(
            pod(json!({
                "meshbridge.io/service": "orders-v2",
                "meshbridge.io/dependencies": "payments, https://api.example.com",
                "meshbridge.io/app-port": "8081",
                "meshbridge.io/ingress-port": "16000",
                "meshbridge.io/egress-port": "16001",
                "meshbridge.io/proxy-cpu": "250m",
                "meshbridge.io/proxy-memory": "64Mi",
                "meshbridge.io/proxy-cpu-limit": "1",
                "meshbridge.io/proxy-memory-limit": "512Mi",
                "meshbridge.io/log-level": "debug",
                "meshbridge.io/http-proxy": "false",
                "meshbridge.io/transparent": "true",
            })),
            &settings
        ))
    );
    let legacy = InjectSettings {
        native_sidecar: false,
        ..InjectSettings::default()
    };
    insta::assert_snapshot!(
        "pod_without_native_sidecars",
        yaml(&injected(pod(json!({})), &legacy))
    );
}

#[test]
fn opting_out_host_network_and_other_kinds_are_left_alone() {
    let settings = InjectSettings::default();
    let cases = [
        pod(json!({"meshbridge.io/inject": "false"})),
        {
            let mut p = pod(json!({}));
            p["spec"]["hostNetwork"] = json!(true);
            p
        },
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "orders"}, "spec": {"ports": [{"port": 80}]}}),
    ];
    for doc in cases {
        let (out, outcome) = inject_manifest(doc.clone(), &settings).unwrap();
        assert!(matches!(outcome, Outcome::Unchanged(_)), "{outcome:?}");
        assert_eq!(out, doc);
    }
}

#[test]
fn bad_annotations_are_refused_naming_them() {
    let settings = InjectSettings::default();
    for (annotations, field) in [
        (
            json!({"meshbridge.io/ingress-port": "99999"}),
            "meshbridge.io/ingress-port",
        ),
        (
            json!({"meshbridge.io/log-level": "loud"}),
            "meshbridge.io/log-level",
        ),
        (
            json!({"meshbridge.io/proxy-memory": "lots"}),
            "meshbridge.io/proxy-memory",
        ),
        (
            json!({"meshbridge.io/ingress-port": "8080"}),
            "port 8080 is used twice",
        ),
        (
            json!({"meshbridge.io/drain-seconds": "301"}),
            "meshbridge.io/drain-seconds",
        ),
        (
            json!({"meshbridge.io/drain-seconds": "-1"}),
            "not a number of seconds from 0 to 300",
        ),
        (
            json!({"meshbridge.io/drain-seconds": "5s"}),
            "meshbridge.io/drain-seconds",
        ),
        (
            json!({"meshbridge.io/ports": "admin"}),
            "meshbridge.io/ports",
        ),
        (
            json!({"meshbridge.io/ports": "admin=15006:8081"}),
            "port 15006 of admin is used twice",
        ),
    ] {
        let err = inject_manifest(pod(annotations), &settings).unwrap_err();
        assert!(err.to_string().contains(field), "{err}");
    }
    let mut nameless = pod(json!({}));
    nameless["metadata"]["labels"] = json!({});
    let err = inject_manifest(nameless, &settings).unwrap_err();
    assert!(err.to_string().contains("no service name"), "{err}");
}

fn arb_annotations() -> impl Strategy<Value = Value> {
    (
        prop::option::of(prop::sample::select(vec!["orders", "billing-v2", "a.b_c"])),
        prop::option::of(prop::sample::select(vec![
            "payments",
            "payments,https://x.example.com",
            "",
        ])),
        prop::option::of(16000u16..16010),
        prop::option::of(prop::sample::select(vec!["true", "false"])),
        prop::option::of(prop::sample::select(vec!["info", "debug"])),
        any::<bool>(),
        prop::option::of(prop::sample::select(vec![
            "orders-tls",
            "{service}-mtls",
            "",
        ])),
        prop::option::of(prop::sample::select(vec!["0", "5", "120"])),
    )
        .prop_map(
            |(service, deps, ingress, transparent, level, http_proxy, tls, drain)| {
                let mut a = serde_json::Map::new();
                if let Some(s) = service {
                    a.insert("meshbridge.io/service".into(), json!(s));
                }
                if let Some(d) = deps {
                    a.insert("meshbridge.io/dependencies".into(), json!(d));
                }
                if let Some(p) = ingress {
                    a.insert("meshbridge.io/ingress-port".into(), json!(p.to_string()));
                }
                if let Some(t) = transparent {
                    a.insert("meshbridge.io/transparent".into(), json!(t));
                }
                if let Some(l) = level {
                    a.insert("meshbridge.io/log-level".into(), json!(l));
                }
                if !http_proxy {
                    a.insert("meshbridge.io/http-proxy".into(), json!("false"));
                }
                if let Some(t) = tls {
                    a.insert("meshbridge.io/tls-secret".into(), json!(t));
                }
                if let Some(d) = drain {
                    a.insert("meshbridge.io/drain-seconds".into(), json!(d));
                }
                Value::Object(a)
            },
        )
}

proptest! {
    #[test]
    fn injecting_twice_equals_injecting_once(
        annotations in arb_annotations(),
        native in any::<bool>(),
        tls in prop::option::of(prop::sample::select(vec!["{service}-mesh-tls", "mesh-tls"])),
    ) {
        let settings = InjectSettings {
            native_sidecar: native,
            tls_secret: tls.map(str::to_string),
            ..InjectSettings::default()
        };
        let (once, outcome) = match inject_manifest(pod(annotations), &settings) {
            Ok(injected) => injected,
            // "a.b_c" is a service name but, in "{service}-…", no Secret name.
            Err(e) => {
                prop_assert!(e.message.contains("\"a.b_c-"), "{}", e);
                return Ok(());
            }
        };
        prop_assert_eq!(outcome, Outcome::Injected);
        let (twice, again) = inject_manifest(once.clone(), &settings).unwrap();
        prop_assert!(matches!(again, Outcome::Unchanged(_)));
        prop_assert_eq!(once, twice);
    }
}

#[test]
fn injected_manifests_pass_the_kubernetes_schema() {
    let mut docs = vec![
        pod(json!({"meshbridge.io/transparent": "true"})),
        pod(json!({"meshbridge.io/drain-seconds": "60"})),
        pod(json!({"meshbridge.io/tls-secret": "orders-mesh-tls"})),
        workload("Deployment", "apps/v1"),
        workload("StatefulSet", "apps/v1"),
        workload("DaemonSet", "apps/v1"),
        workload("Job", "batch/v1"),
        workload("CronJob", "batch/v1"),
    ];
    let legacy = InjectSettings {
        native_sidecar: false,
        ..InjectSettings::default()
    };
    docs.push(injected(pod(json!({})), &legacy));
    let text: Vec<String> = docs.iter().map(yaml).collect();
    let (out, _) = inject_stream(&text.join("---\n"), &InjectSettings::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("injected.yaml");
    std::fs::write(&file, &out).unwrap();
    let result = Command::new(support::venv_tool("kubernetes-validate"))
        .args(["--strict", "--kubernetes-version", "1.33"])
        .arg(&file)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&result.stdout),
        String::from_utf8_lossy(&result.stderr)
    );
    assert!(result.status.success(), "{printed}\n{out}");
    assert_eq!(printed.matches("passed").count(), docs.len(), "{printed}");
}

#[test]
fn the_inject_command_reads_a_file_or_stdin_and_names_a_bad_document() {
    let text = format!(
        "{}---\n{}",
        yaml(&workload("Deployment", "apps/v1")),
        yaml(&pod(json!({"meshbridge.io/log-level": "loud"})))
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args(["inject", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("document 2 (Pod orders-7d9f)") && stderr.contains("log-level"),
        "{stderr}"
    );

    let injected = inject_deployment_file(&["--xds-addr", "mb.example:18000"]);
    let sidecar = &injected["spec"]["template"]["spec"]["initContainers"][0];
    assert_eq!(sidecar["name"], "meshbridge-proxy");
    assert!(sidecar["args"][1].as_str().unwrap().contains("mb.example"));
}

/// The sidecar's `preStop` command, if any.
fn pre_stop(pod: &Value) -> Option<Vec<String>> {
    let sidecar = sidecar(pod);
    sidecar.get("lifecycle").map(|l| {
        serde_json::from_value(l["preStop"]["exec"]["command"].clone())
            .unwrap_or_else(|e| panic!("{e}: {l}"))
    })
}

#[test]
fn the_sidecar_drains_before_it_stops_and_the_grace_period_covers_the_drain() {
    use meshbridge::bootstrap::drain_script;
    let hook = |seconds| {
        Some(vec![
            "bash".to_string(),
            "-c".to_string(),
            drain_script(15000, seconds),
        ])
    };
    for native in [true, false] {
        let settings = InjectSettings {
            native_sidecar: native,
            ..InjectSettings::default()
        };
        // The default drain (5 s) fits Kubernetes' default grace period (30 s): left alone.
        let out = injected(pod(json!({})), &settings);
        assert_eq!(pre_stop(&out), hook(5), "native: {native}");
        assert_eq!(out["spec"].get("terminationGracePeriodSeconds"), None);
        // A longer drain raises the grace period to the drain + 5 s ...
        let out = injected(pod(json!({"meshbridge.io/drain-seconds": "60"})), &settings);
        assert_eq!(pre_stop(&out), hook(60));
        assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 65);
        // ... one the pod set shorter too, but a longer one is kept.
        for (set, kept) in [(10, 65), (0, 65), (120, 120)] {
            let mut p = pod(json!({"meshbridge.io/drain-seconds": "60"}));
            p["spec"]["terminationGracePeriodSeconds"] = json!(set);
            let out = injected(p, &settings);
            assert_eq!(out["spec"]["terminationGracePeriodSeconds"], kept, "{set}");
        }
        // 0: no hook, and nothing to cover.
        let mut p = pod(json!({"meshbridge.io/drain-seconds": "0"}));
        p["spec"]["terminationGracePeriodSeconds"] = json!(1);
        let out = injected(p, &settings);
        assert_eq!(pre_stop(&out), None);
        assert_eq!(out["spec"]["terminationGracePeriodSeconds"], 1);
    }
    // The setting, which the annotation overrides.
    let settings = InjectSettings {
        drain_seconds: 0,
        ..InjectSettings::default()
    };
    assert_eq!(pre_stop(&injected(pod(json!({})), &settings)), None);
    let out = injected(pod(json!({"meshbridge.io/drain-seconds": "7"})), &settings);
    assert_eq!(pre_stop(&out), hook(7));
    // The hook talks to the sidecar's own admin port.
    let settings = InjectSettings {
        admin_port: 15999,
        ..InjectSettings::default()
    };
    let out = injected(pod(json!({})), &settings);
    assert_eq!(
        pre_stop(&out).unwrap()[2],
        drain_script(15999, 5),
        "admin port"
    );
}

#[test]
fn the_inject_command_takes_the_drain_time_bounded() {
    let injected = inject_deployment_file(&["--drain-seconds", "45"]);
    let template = &injected["spec"]["template"];
    assert_eq!(template["spec"]["terminationGracePeriodSeconds"], 50);
    assert!(
        template["spec"]["initContainers"][0]["lifecycle"]["preStop"]["exec"]["command"][2]
            .as_str()
            .unwrap()
            .contains("sleep 45"),
        "{template}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.yaml");
    std::fs::write(&file, yaml(&workload("Deployment", "apps/v1"))).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args(["inject", "--drain-seconds", "301", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--drain-seconds"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `meshbridge inject <flags> -f app.yaml` on a file holding a Deployment: it succeeds, and
/// prints the injected Deployment.
fn inject_deployment_file(flags: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("app.yaml");
    std::fs::write(&file, yaml(&workload("Deployment", "apps/v1"))).unwrap();
    let out = support::stdout_of(
        Command::new(env!("CARGO_BIN_EXE_meshbridge"))
            .arg("inject")
            .args(flags)
            .arg("-f")
            .arg(&file),
    );
    serde_norway::from_slice(&out).unwrap()
}

/// The item of the list `list` (containers, clusters) named `name`.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .unwrap_or_else(|| panic!("not a list: {list}"))
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("nothing named {name} in {list}"))
}

/// The sidecar's command line with the pod's environment expanded, as the kubelet would.
fn sidecar_command(pod: &Value) -> Vec<String> {
    let sidecar = named(&pod["spec"]["initContainers"], "meshbridge-proxy");
    sidecar["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            a.as_str()
                .unwrap()
                .replace("$(POD_NAME)", "orders-7d9f")
                .replace("$(POD_NAMESPACE)", "shop")
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_injected_sidecar_is_a_working_envoy() {
    let cp = ControlPlane::start("", &[]).await;
    let settings = InjectSettings {
        xds_addr: cp.xds_addr(),
        admin_port: free_port(),
        ready_port: free_port(),
        ..InjectSettings::default()
    };
    let (ingress, egress) = (free_port(), free_port());
    let pod = injected(
        pod(
            json!({"meshbridge.io/ingress-port": ingress.to_string(), "meshbridge.io/egress-port": egress.to_string()}),
        ),
        &settings,
    );
    let dir = tempfile::tempdir().unwrap();
    let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
    let mut envoy = Command::new(support::envoy_bin())
        .args(sidecar_command(&pod))
        .args(["--concurrency", "1", "--base-id", &free_port().to_string()])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let ready = std::net::SocketAddr::from(([127, 0, 0, 1], settings.ready_port));
    let r = eventually(
        Duration::from_secs(20),
        "the readiness listener answers 200",
        || async {
            let r = http_get(ready, "localhost", "/ready", &[]).await.ok()?;
            (r.status == 200).then_some(r)
        },
    )
    .await;
    assert!(r.body.contains("LIVE"), "{}", r.body);
    // Only /ready is exposed; the admin interface is not.
    let r = http_get(ready, "localhost", "/config_dump", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 404);
    // meshbridge sees the pod's proxy under its own node id, with the injected ports.
    let proxies = cp.admin_json("/api/proxies").await;
    let _ = envoy.kill();
    let _ = envoy.wait();
    let proxy = proxies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["node"] == "orders-7d9f.shop")
        .unwrap_or_else(|| {
            panic!(
                "{proxies}\n{}",
                std::fs::read_to_string(dir.path().join("envoy.log")).unwrap_or_default()
            )
        });
    assert_eq!(proxy["service"], "orders");
}

#[test]
fn every_injected_sidecar_passes_envoy_validate() {
    let settings = InjectSettings::default();
    let transparent = json!({"meshbridge.io/transparent": "true", "meshbridge.io/dependencies": "payments,https://api.example.com"});
    for pod in [
        injected(pod(json!({})), &settings),
        injected(pod(transparent), &settings),
        // The static secrets read the mounted Secret's files (only once a listener or
        // cluster uses them: validation does not open them).
        injected(
            pod(json!({"meshbridge.io/tls-secret": "orders-mesh-tls"})),
            &settings,
        ),
        injected(
            pod(json!({"meshbridge.io/log-level": "debug", "meshbridge.io/ingress-port": "16000"})),
            &InjectSettings {
                native_sidecar: true,
                ..settings.clone()
            },
        ),
    ] {
        let out = Command::new(support::envoy_bin())
            .args(sidecar_command(&pod))
            .args(["--mode", "validate"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn a_workload_without_a_pod_template_is_refused_not_a_crash() {
    let mut broken = workload("Deployment", "apps/v1");
    broken["spec"] = json!(3);
    let err = inject_manifest(broken, &InjectSettings::default()).unwrap_err();
    assert!(err.to_string().contains("spec.template"), "{err}");
    let mut cron = workload("CronJob", "batch/v1");
    cron["spec"]["jobTemplate"] = json!(["not", "an", "object"]);
    assert!(inject_manifest(cron, &InjectSettings::default()).is_err());
}

/// The sidecar container of an injected pod (native or regular).
fn sidecar(pod: &Value) -> &Value {
    pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .chain(pod["spec"]["containers"].as_array())
        .flatten()
        .find(|c| c["name"] == "meshbridge-proxy")
        .unwrap()
}

/// The bootstrap the sidecar runs (the argument after `--config-yaml`).
fn sidecar_bootstrap(pod: &Value) -> Value {
    let args = sidecar(pod)["args"].as_array().unwrap();
    let i = args.iter().position(|a| a == "--config-yaml").unwrap();
    serde_norway::from_str(args[i + 1].as_str().unwrap()).unwrap()
}

/// The static secrets of a bootstrap: name → the file names it reads.
fn static_secrets(bootstrap: &Value) -> Vec<(String, Vec<String>)> {
    let mut secrets: Vec<(String, Vec<String>)> = bootstrap["static_resources"]["secrets"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let mut files = Vec::new();
            collect_filenames(s, &mut files);
            files.sort();
            (s["name"].as_str().unwrap().to_string(), files)
        })
        .collect();
    secrets.sort();
    secrets
}

fn collect_filenames(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match v.as_str() {
                    Some(f) if k == "filename" => out.push(f.to_string()),
                    _ => collect_filenames(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_filenames(v, out)),
        _ => {}
    }
}

/// What a pod says about its TLS: the Secret of its volume `meshbridge-tls` with the mode
/// of its files, the sidecar's mounts, and the recorded annotation.
fn tls_of(pod: &Value) -> (Option<(String, u64)>, Value, Option<String>) {
    let volume = pod["spec"]["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "meshbridge-tls")
        .map(|v| {
            (
                v["secret"]["secretName"].as_str().unwrap().to_string(),
                v["secret"]["defaultMode"].as_u64().unwrap(),
            )
        });
    let mounts = sidecar(pod)["volumeMounts"].clone();
    let recorded = pod["metadata"]["annotations"]["meshbridge.io/tls-secret"]
        .as_str()
        .map(str::to_string);
    (volume, mounts, recorded)
}

#[test]
fn a_pod_naming_a_tls_secret_gets_it_mounted_into_the_sidecar() {
    for native in [true, false] {
        let settings = InjectSettings {
            native_sidecar: native,
            ..InjectSettings::default()
        };
        let mut doc = pod(json!({"meshbridge.io/tls-secret": "orders-mesh-tls"}));
        doc["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
        let out = injected(doc, &settings);
        if native {
            insta::assert_snapshot!("pod_tls", yaml(&out));
        }
        let (volume, mounts, recorded) = tls_of(&out);
        // Readable by the sidecar's user 1337 without an fsGroup.
        assert_eq!(volume, Some(("orders-mesh-tls".to_string(), 0o444)));
        assert_eq!(
            mounts,
            json!([{"name": "meshbridge-tls", "mountPath": "/etc/meshbridge/tls", "readOnly": true}])
        );
        assert_eq!(recorded.as_deref(), Some("orders-mesh-tls"));
        // The pod's own volumes and containers are untouched by it.
        assert_eq!(out["spec"]["volumes"][0]["name"], "data");
        let app = named(&out["spec"]["containers"], "app");
        assert!(app.get("volumeMounts").is_none(), "{app}");
        // Envoy reads the mounted files as the static secrets the mesh's TLS refers to.
        assert_eq!(
            static_secrets(&sidecar_bootstrap(&out)),
            [
                (
                    "server_cert".to_string(),
                    vec![
                        "/etc/meshbridge/tls/tls.crt".to_string(),
                        "/etc/meshbridge/tls/tls.key".to_string()
                    ]
                ),
                (
                    "validation_context".to_string(),
                    vec!["/etc/meshbridge/tls/ca.crt".to_string()]
                ),
            ]
        );
    }
    // Without a Secret: no volume, no mount, no static secrets, nothing recorded.
    let plain = injected(pod(json!({})), &InjectSettings::default());
    assert_eq!(tls_of(&plain), (None, Value::Null, None));
    assert!(plain["spec"].get("volumes").is_none());
    assert_eq!(static_secrets(&sidecar_bootstrap(&plain)), []);
}

#[test]
fn the_tls_secret_setting_names_one_secret_per_service_and_the_pod_overrides_it() {
    let settings = InjectSettings {
        tls_secret: Some("{service}-mesh-tls".into()),
        ..InjectSettings::default()
    };
    let secret = |annotations: Value| tls_of(&injected(pod(annotations), &settings)).0;
    assert_eq!(
        secret(json!({})),
        Some(("orders-mesh-tls".to_string(), 0o444))
    );
    assert_eq!(
        secret(json!({"meshbridge.io/service": "billing"})),
        Some(("billing-mesh-tls".to_string(), 0o444)),
        "{{service}} is the pod's service"
    );
    assert_eq!(
        secret(json!({"meshbridge.io/tls-secret": "shared-tls"})),
        Some(("shared-tls".to_string(), 0o444)),
        "the annotation wins"
    );
    let out = injected(pod(json!({})), &settings);
    assert_eq!(tls_of(&out).2.as_deref(), Some("orders-mesh-tls"));

    // The same through `meshbridge inject --tls-secret`, on a Deployment's template.
    let deployment = inject_deployment_file(&["--tls-secret", "{service}-mesh-tls"]);
    let template = &deployment["spec"]["template"];
    let (volume, mounts, recorded) = tls_of(template);
    assert_eq!(volume, Some(("billing-mesh-tls".to_string(), 0o444)));
    assert_eq!(mounts[0]["mountPath"], "/etc/meshbridge/tls");
    assert_eq!(recorded.as_deref(), Some("billing-mesh-tls"));
}

#[test]
fn with_xds_tls_a_sidecar_with_a_certificate_reaches_the_control_plane_over_mtls() {
    let xds_tls_of = |settings: &InjectSettings, annotations: Value| {
        let bootstrap = sidecar_bootstrap(&injected(pod(annotations), settings));
        named(&bootstrap["static_resources"]["clusters"], "meshbridge_xds")["transport_socket"]
            .clone()
    };
    let settings = InjectSettings {
        tls_secret: Some("{service}-mesh-tls".into()),
        xds_tls: true,
        ..InjectSettings::default()
    };
    let socket = xds_tls_of(&settings, json!({}));
    let context = &socket["typed_config"]["common_tls_context"];
    assert_eq!(
        context["tls_certificate_sds_secret_configs"][0]["name"],
        "server_cert"
    );
    let validation = &context["combined_validation_context"];
    assert_eq!(
        validation["validation_context_sds_secret_config"]["name"],
        "validation_context"
    );
    assert_eq!(
        socket["typed_config"]["sni"], "meshbridge-xds.meshbridge.svc",
        "the xDS host name"
    );
    // The control plane's certificate must name the xDS host, not merely chain to the CA.
    assert_eq!(
        validation["default_validation_context"]["match_typed_subject_alt_names"],
        json!([{"san_type": "DNS", "matcher": {"exact": "meshbridge-xds.meshbridge.svc"}}])
    );
    // A pod without a certificate cannot prove anything: plaintext as before.
    assert_eq!(
        xds_tls_of(&settings, json!({"meshbridge.io/tls-secret": ""})),
        Value::Null
    );
    // Off by default.
    let off = InjectSettings {
        tls_secret: Some("{service}-mesh-tls".into()),
        ..InjectSettings::default()
    };
    assert_eq!(xds_tls_of(&off, json!({})), Value::Null);
}

#[test]
fn an_empty_tls_secret_annotation_turns_tls_off_for_the_pod() {
    let settings = InjectSettings {
        tls_secret: Some("{service}-mesh-tls".into()),
        ..InjectSettings::default()
    };
    for empty in ["", "  "] {
        let out = injected(pod(json!({"meshbridge.io/tls-secret": empty})), &settings);
        let (volume, mounts, recorded) = tls_of(&out);
        assert_eq!((volume, mounts), (None, Value::Null), "{empty:?}");
        // The pod's own (empty) value stays: it still says "no TLS".
        assert_eq!(recorded.as_deref(), Some(empty));
        assert_eq!(static_secrets(&sidecar_bootstrap(&out)), []);
    }
    // An empty setting is no setting.
    let none = InjectSettings {
        tls_secret: Some(String::new()),
        ..InjectSettings::default()
    };
    assert_eq!(
        tls_of(&injected(pod(json!({})), &none)),
        (None, Value::Null, None)
    );
}

#[test]
fn a_bad_tls_secret_name_is_refused_naming_where_it_came_from() {
    let settings = InjectSettings::default();
    for bad in ["Orders_TLS", "orders-", "a/b", &"a".repeat(254)] {
        let err =
            inject_manifest(pod(json!({"meshbridge.io/tls-secret": bad})), &settings).unwrap_err();
        assert_eq!(err.field, "metadata.annotations[meshbridge.io/tls-secret]");
        assert!(err.to_string().contains("Secret name"), "{err}");
    }
    let err = inject_manifest(
        pod(json!({"meshbridge.io/tls-secret": &"a".repeat(254)})),
        &settings,
    )
    .unwrap_err();
    assert!(err.to_string().contains("at most 253"), "{err}");

    // From the setting: the flag is named, and the name after {service} is replaced.
    let templated = InjectSettings {
        tls_secret: Some("{service}-tls".into()),
        ..InjectSettings::default()
    };
    let err =
        inject_manifest(pod(json!({"meshbridge.io/service": "a.b_c"})), &templated).unwrap_err();
    assert!(err.field.contains("--sidecar-tls-secret"), "{err}");
    assert!(err.to_string().contains("\"a.b_c-tls\""), "{err}");

    // A volume of the pod's own already named meshbridge-tls.
    let mut clash = pod(json!({"meshbridge.io/tls-secret": "orders-tls"}));
    clash["spec"]["volumes"] = json!([{"name": "meshbridge-tls", "emptyDir": {}}]);
    let err = inject_manifest(clash, &settings).unwrap_err();
    assert_eq!(err.field, "spec.volumes");
}

/// The application's further named container ports each get a listener of the sidecar's
/// (from 15100), written into the bootstrap's node metadata and the pod's annotation (what
/// the Kubernetes source reads back); with iptables redirection, a caller reaching such a
/// port directly goes through its listener. A port the pod names itself is kept.
#[test]
fn named_container_ports_get_sidecar_listeners_of_their_own() {
    let mut doc = pod(json!({"meshbridge.io/transparent": "true"}));
    doc["spec"]["containers"][0]["ports"] = json!([
        {"name": "http", "containerPort": 8080},
        {"name": "admin", "containerPort": 8081},
        {"name": "dns", "containerPort": 53, "protocol": "UDP"},
        {"containerPort": 9000},
    ]);
    let out = injected(doc.clone(), &InjectSettings::default());
    assert_eq!(
        out["metadata"]["annotations"]["meshbridge.io/ports"],
        "admin=15100:8081"
    );
    let sidecar = named(&out["spec"]["initContainers"], "meshbridge-proxy").to_string();
    assert!(sidecar.contains("admin=15100:8081"), "{sidecar}");
    let init = named(&out["spec"]["initContainers"], "meshbridge-init")["command"].to_string();
    assert!(
        init.contains("--dport 8081 -j REDIRECT --to-ports 15100"),
        "{init}"
    );
    assert!(init.contains("--dport 15100 -j RETURN"), "{init}");

    doc["metadata"]["annotations"]["meshbridge.io/ports"] = json!("admin=15200:8081");
    let out = injected(doc, &InjectSettings::default());
    assert_eq!(
        out["metadata"]["annotations"]["meshbridge.io/ports"],
        "admin=15200:8081"
    );
}
