//! The Helm chart (`charts/meshbridge`): the real Helm SDK lints and renders it
//! (`tests/it/support/helm_chart.py` under `.venv/bin/python`), the real `kubernetes-validate
//! --strict` accepts every rendered document, and what the chart tells meshbridge to do is
//! what the real binary accepts.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::support::helm;
use crate::support::kube_fake;

use helm::{
    NAMESPACE, RELEASE, Rendered, chart_dir, helm, render, repo, run_bounded, text, venv_tool,
};

/// The admission webhook with the certificate Helm generates (the webhook's default mode).
const WEBHOOK_HELM_CERTS: &str = "
webhook:
  enabled: true
";

/// The admission webhook with cert-manager issuing the certificate, and sidecars mounting
/// the mesh certificates cert-manager keeps in one Secret per service.
const WEBHOOK_CERT_MANAGER: &str = "
webhook:
  enabled: true
  failurePolicy: Fail
  certManager:
    enabled: true
sidecar:
  tlsSecret: \"{service}-mesh-tls\"
";

/// The admission webhook with meshbridge managing its own certificate, and an xDS Service
/// reachable from legacy hosts outside the cluster.
const WEBHOOK_SELF_MANAGED: &str = "
webhook:
  enabled: true
  selfManaged: true
  inject:
    namespaceSelector:
      matchLabels: null
    excludeNamespaces: [kube-system, kube-public]
service:
  xds:
    type: LoadBalancer
    annotations: {service.beta.kubernetes.io/aws-load-balancer-internal: \"true\"}
    loadBalancerSourceRanges: [10.0.0.0/8]
";

/// Consul with an ACL token and a CA from Secrets, two datacenters, restricted namespaces,
/// a ServiceMonitor, a single replica, and access control for legacy hosts.
const CONSUL: &str = "
replicaCount: 1
accessControl:
  defaultDeny: true
  sourceIpIdentity: true
  identityHeaderFrom: [edge, \"gw-*\"]
watchNamespaces: [payments, orders]
allowWildcard: [gateway, \"edge-*\"]
consul:
  addr: https://$(HOST_IP):8501
  datacenters: [dc1, dc2]
  servicesOwnedBy: [payments, platform]
  token:
    secretName: consul-acl
    key: meshbridge-token
  ca:
    secretName: consul-ca
serviceMonitor:
  enabled: true
  labels: {release: prometheus}
sidecar:
  ports: {diagnostics: 15002}
  diagnosticsAllowFrom: [10.42.0.0/16]
sidecarPodMonitor:
  enabled: true
  labels: {release: prometheus}
";

/// Every security setting on: admin API tokens (also for /metrics, which the ServiceMonitor
/// then scrapes with a token), a NetworkPolicy, xDS over TLS checking client certificates,
/// and injected sidecars connecting over mutual TLS.
const SECURED: &str = "
admin:
  tokenSecret: meshbridge-admin-tokens
  tokenSecretKey: tokens.txt
  metricsAuth: true
serviceMonitor:
  enabled: true
  bearerTokenSecret: {name: prometheus-meshbridge, key: bearer}
networkPolicy:
  enabled: true
  adminFrom:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: monitoring}}
      podSelector: {matchLabels: {app.kubernetes.io/name: prometheus}}
    - ipBlock: {cidr: 10.20.0.0/16}
xds:
  tls:
    secretName: meshbridge-xds-tls
    clientCaKey: mesh-ca.crt
    clientAuth: strict
sidecar:
  tlsSecret: \"{service}-mesh-tls\"
  xdsTls: true
";

/// cert-manager issues the xDS serving certificate from the mesh's ClusterIssuer; strict
/// client certificates; sidecars over TLS.
const XDS_CERT_MANAGER: &str = "
xds:
  tls:
    clientAuth: strict
    certManager:
      enabled: true
      issuerRef: {name: mesh-ca, kind: ClusterIssuer}
      extraDnsNames: [xds.mesh.example.com]
      uris: [\"spiffe://mesh.local/control-plane\"]
sidecar:
  tlsSecret: \"{service}-mesh-tls\"
  xdsTls: true
";

/// Every value set the tests render: (name, values YAML).
const VALUE_SETS: &[(&str, &str)] = &[
    ("default", ""),
    ("xds-cert-manager", XDS_CERT_MANAGER),
    ("webhook-helm-certs", WEBHOOK_HELM_CERTS),
    ("webhook-cert-manager", WEBHOOK_CERT_MANAGER),
    ("webhook-self-managed", WEBHOOK_SELF_MANAGED),
    ("consul", CONSUL),
    ("dashboards", DASHBOARDS),
    ("secured", SECURED),
];

/// The value that follows `flag` in `args`, for a flag given once.
fn flag_value<'a>(args: &'a [String], flag: &str) -> Option<&'a str> {
    let values = flag_values(args, flag);
    assert!(values.len() <= 1, "{flag} given {} times", values.len());
    values.first().copied()
}

/// Every value that follows `flag` in `args`.
fn flag_values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

/// With each of `cases` (`(what, values)`), the chart does not give the control plane `flag`.
fn assert_not_given(flag: &str, cases: &[(&str, &str)]) {
    for (what, values) in cases {
        let args = render(values).args();
        assert!(
            !args.iter().any(|a| a == flag),
            "{what}: {flag} in {args:?}"
        );
    }
}

/// Fails unless `meshbridge run --help` lists `flag`.
fn assert_run_has(flag: &str) {
    assert!(
        run_flags().contains(flag),
        "`meshbridge run --help` does not list {flag}"
    );
}

/// The flags `meshbridge run --help` lists.
fn run_flags() -> BTreeSet<String> {
    let out = run_bounded(
        Command::new(env!("CARGO_BIN_EXE_meshbridge")).args(["run", "--help"]),
        "meshbridge run --help",
    );
    assert!(out.status.success(), "{}", text(&out));
    let help = String::from_utf8(out.stdout).unwrap();
    let flags: BTreeSet<String> = help
        .lines()
        .map(str::trim_start)
        .filter(|line| line.starts_with('-'))
        .flat_map(|line| line.split([' ', ',', '=']))
        .filter(|word| word.starts_with("--"))
        .map(str::to_string)
        .collect();
    assert!(
        flags.contains("--xds-addr") && flags.contains("--drain"),
        "cannot read the flags of `meshbridge run --help`:\n{help}"
    );
    flags
}

#[test]
fn the_chart_lints_cleanly_with_every_value_set() {
    for (name, values) in VALUE_SETS {
        let out = helm("lint", values, &[]);
        let report: Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{name}: lint printed no report ({e}): {}", text(&out)));
        assert!(out.status.success(), "{name}: lint failed: {report:#}");
        assert_eq!(report["total_charts_linted"], 1, "{name}: {report:#}");
        // Strict lint; only informational findings (severity 1, e.g. "icon is recommended").
        let findings: Vec<&Value> = report["messages"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["severity"].as_u64() != Some(1))
            .collect();
        assert!(findings.is_empty(), "{name}: lint findings: {findings:#?}");
    }
}

/// Kinds that kubernetes-validate has no schema for, hence cannot check.
const UNKNOWN_TO_KUBERNETES_VALIDATE: &[&str] =
    &["Certificate", "Issuer", "ServiceMonitor", "PodMonitor"];

#[test]
fn every_rendered_document_passes_kubernetes_validate_strict() {
    for (name, values) in VALUE_SETS {
        let rendered = render(values);
        let dir = tempfile::tempdir().unwrap();
        let mut files = Vec::new();
        // The templates' text as Helm rendered it (what kubectl would receive), one file each.
        for (template, text) in &rendered.manifests {
            let file = dir.path().join(template.replace('/', "_"));
            std::fs::write(&file, text).unwrap();
            files.push(file);
        }
        // Each version's schemas: the oldest Kubernetes the chart supports, and the newest.
        let versions = ["1.27.0", "1.37.0"];
        let mut cmd = Command::new(venv_tool("kubernetes-validate"));
        cmd.arg("--strict");
        for v in versions {
            cmd.args(["-k", v]);
        }
        let out = run_bounded(cmd.args(&files), "kubernetes-validate");
        let report = text(&out);
        assert!(out.status.success(), "{name}:\n{report}");
        assert!(!report.contains("ERROR"), "{name}:\n{report}");

        let expected_unknown: Vec<&Value> = rendered
            .docs
            .iter()
            .filter(|d| UNKNOWN_TO_KUBERNETES_VALIDATE.contains(&d["kind"].as_str().unwrap()))
            .collect();
        let passed = report.matches(" passed for resource ").count();
        assert_eq!(
            passed,
            (rendered.docs.len() - expected_unknown.len()) * versions.len(),
            "{name}: not every document was validated:\n{report}"
        );
        // What was skipped is exactly the kinds it cannot know, each document once per version.
        let mut skipped: Vec<String> = report
            .lines()
            .filter(|l| l.starts_with("WARN"))
            .map(|l| {
                let kind = l
                    .split("schema for kind ")
                    .nth(1)
                    .unwrap_or_else(|| panic!("{name}: unexpected warning: {l}"));
                kind.split(' ').next().unwrap().to_string()
            })
            .collect();
        skipped.sort();
        let mut expected: Vec<String> = expected_unknown
            .iter()
            .flat_map(|d| versions.map(|_| d["kind"].as_str().unwrap().to_string()))
            .collect();
        expected.sort();
        assert_eq!(skipped, expected, "{name}:\n{report}");
    }
}

#[test]
fn value_sets_render_what_they_promise() {
    let default = render("");
    assert_eq!(
        default.kinds(),
        BTreeSet::from(
            [
                "ClusterRole",
                "ClusterRoleBinding",
                "Deployment",
                "MutatingWebhookConfiguration",
                "PodDisruptionBudget",
                "Secret",
                "Service",
                "ServiceAccount",
                "ValidatingWebhookConfiguration",
            ]
            .map(String::from)
        ),
        "the webhooks are on by default, with a certificate Helm generates"
    );
    assert_eq!(default.of_kind("Service").len(), 4);
    // The replicas find each other through a headless Service of their admin port.
    let peers_dns = flag_value(&default.args(), "--peers-dns")
        .unwrap()
        .to_string();
    let (host, port) = peers_dns.rsplit_once(':').unwrap();
    let peers = default
        .of_kind("Service")
        .into_iter()
        .find(|s| {
            format!(
                "{}.{NAMESPACE}.svc",
                s["metadata"]["name"].as_str().unwrap()
            ) == host
        })
        .unwrap_or_else(|| panic!("no Service behind --peers-dns {peers_dns}"));
    assert_eq!(peers["spec"]["clusterIP"], "None");
    assert_eq!(peers["spec"]["ports"][0]["port"].to_string(), port);
    let pod_labels = &default.one("Deployment")["spec"]["template"]["metadata"]["labels"];
    for (k, v) in peers["spec"]["selector"].as_object().unwrap() {
        assert_eq!(
            &pod_labels[k], v,
            "the peers Service selects the meshbridge pods"
        );
    }
    let admin_port =
        default.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "http-admin")
            .unwrap()["containerPort"]
            .clone();
    assert_eq!(admin_port.to_string(), port);
    assert_eq!(default.one("Deployment")["spec"]["replicas"], 2);
    assert_eq!(
        default.one("PodDisruptionBudget")["spec"]["minAvailable"],
        1
    );

    let consul = render(CONSUL);
    let args = consul.args();
    assert!(args.iter().any(|a| a == "--default-deny"), "{args:?}");
    assert!(args.iter().any(|a| a == "--source-ip-identity"), "{args:?}");
    assert_eq!(
        flag_values(&args, "--identity-header-from"),
        ["edge", "gw-*"]
    );
    let default_args = default.args();
    assert!(
        !default_args
            .iter()
            .any(|a| a == "--default-deny" || a == "--source-ip-identity"),
        "access control is opt-in: {default_args:?}"
    );
    assert!(
        consul.of_kind("PodDisruptionBudget").is_empty(),
        "one replica: no PDB"
    );
    let monitor = consul.one("ServiceMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["port"], "http-admin");
    assert_eq!(endpoint["path"], "/metrics");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    // The ServiceMonitor selects the admin Service, and only it.
    let selector = monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap();
    let selected: Vec<&Value> = consul
        .of_kind("Service")
        .into_iter()
        .filter(|s| {
            selector
                .iter()
                .all(|(k, v)| &s["metadata"]["labels"][k] == v)
        })
        .collect();
    assert_eq!(selected.len(), 1);
    assert_eq!(selected[0]["spec"]["ports"][0]["port"], 9090);
    assert_eq!(selected[0]["spec"]["ports"][0]["name"], "http-admin");
}

#[test]
fn the_chart_crds_are_the_repository_crds_byte_for_byte() {
    let names = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };
    let ours = repo().join("crds");
    let charts = chart_dir().join("crds");
    assert_eq!(names(&charts), names(&ours));
    for name in names(&ours) {
        assert!(
            std::fs::read(ours.join(&name)).unwrap() == std::fs::read(charts.join(&name)).unwrap(),
            "charts/meshbridge/crds/{name} differs from crds/{name}: copy it over"
        );
    }
    // And Helm installs them from there.
    let rendered = render("");
    let mut installed = rendered.crd_files.clone();
    installed.sort();
    let expected: Vec<String> = names(&ours).iter().map(|n| format!("crds/{n}")).collect();
    assert_eq!(installed, expected);
}

#[test]
fn the_cluster_role_carries_exactly_the_rules_of_files_rbac_rules_yaml() {
    let file = std::fs::read_to_string(chart_dir().join("files/rbac-rules.yaml")).unwrap();
    let rules: Value = serde_norway::from_str(&file).unwrap();
    assert!(
        rules.as_array().is_some_and(|r| !r.is_empty()),
        "files/rbac-rules.yaml must be a non-empty list of rules"
    );
    for (name, values) in VALUE_SETS {
        let rendered = render(values);
        // Self-managed webhook certificates need rights of their own, in a separate role.
        let role = rendered
            .of_kind("ClusterRole")
            .into_iter()
            .find(|r| r["metadata"]["name"] == RELEASE)
            .unwrap_or_else(|| panic!("{name}: no ClusterRole named {RELEASE}"));
        assert_eq!(role["rules"], rules, "{name}");
        // Bound to the ServiceAccount the Deployment runs as.
        let binding = rendered
            .of_kind("ClusterRoleBinding")
            .into_iter()
            .find(|b| b["roleRef"]["name"] == RELEASE)
            .unwrap();
        let account = &rendered.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"];
        assert_eq!(
            binding["subjects"],
            json!([{"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}]),
            "{name}"
        );
        assert_eq!(rendered.one("ServiceAccount")["metadata"]["name"], *account);
    }
}

#[test]
fn every_flag_in_the_rendered_args_is_one_meshbridge_run_has() {
    let known = run_flags();
    for (name, values) in VALUE_SETS {
        let args = render(values).args();
        assert_eq!(args[0], "run", "{name}: {args:?}");
        for arg in args.iter().filter(|a| a.starts_with("--")) {
            let flag = arg.split('=').next().unwrap();
            assert!(
                known.contains(flag),
                "{name}: the chart passes {flag}, which `meshbridge run --help` does not list"
            );
        }
        assert_eq!(flag_value(&args, "--kube"), Some("auto"), "{name}");
        assert_eq!(flag_value(&args, "--xds-addr"), Some("0.0.0.0:18000"));
        assert_eq!(flag_value(&args, "--admin-addr"), Some("$(POD_IP):9090"));
        assert_eq!(
            flag_value(&args, "--admin-local-addr"),
            Some("127.0.0.1:9090")
        );
        assert_eq!(flag_value(&args, "--webhook-addr"), Some("0.0.0.0:9443"));
        assert_eq!(
            flag_value(&args, "--leader-election-namespace"),
            Some(NAMESPACE)
        );
    }

    let consul = render(CONSUL).args();
    assert_eq!(flag_values(&consul, "--namespace"), ["payments", "orders"]);
    assert_eq!(flag_values(&consul, "--consul-datacenter"), ["dc1", "dc2"]);
    assert_eq!(
        flag_values(&consul, "--consul-services-owned-by"),
        ["payments", "platform"]
    );
    assert_eq!(
        flag_values(&consul, "--allow-wildcard"),
        ["gateway", "edge-*"]
    );
    assert_eq!(
        flag_value(&consul, "--consul-addr"),
        Some("https://$(HOST_IP):8501")
    );
    let default = render("").args();
    assert!(
        flag_values(&default, "--namespace").is_empty(),
        "all namespaces"
    );
    assert!(flag_value(&default, "--consul-addr").is_none());
}

#[test]
fn the_sidecar_tls_secret_reaches_the_injector_only_when_set() {
    let args = render(WEBHOOK_CERT_MANAGER).args();
    assert_eq!(
        flag_value(&args, "--sidecar-tls-secret"),
        Some("{service}-mesh-tls")
    );
    assert_run_has("--sidecar-tls-secret");
    assert_not_given(
        "--sidecar-tls-secret",
        &[
            ("default", ""),
            ("empty", "sidecar: {tlsSecret: \"\"}\n"),
            (
                "webhook off",
                "webhook: {enabled: false}\nsidecar: {tlsSecret: orders-tls}\n",
            ),
        ],
    );
}

#[test]
fn the_drain_time_reaches_the_injector_and_is_bounded() {
    assert_eq!(
        flag_value(&render("").args(), "--sidecar-drain-seconds"),
        Some("5")
    );
    assert_eq!(
        flag_value(
            &render("sidecar: {drainSeconds: 0}\n").args(),
            "--sidecar-drain-seconds"
        ),
        Some("0"),
        "0 turns the drain off; it is still passed"
    );
    assert_run_has("--sidecar-drain-seconds");
    for values in [
        "sidecar: {drainSeconds: 301}\n",
        "sidecar: {drainSeconds: -1}\n",
    ] {
        render_fails_naming(values, &["drainSeconds"]);
    }
}

/// The mount whose directory holds `file`, and the volume behind it.
fn volume_for<'a>(rendered: &'a Rendered, file: &str) -> (&'a Value, &'a Value) {
    let mount = rendered.container()["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| Path::new(file).parent() == Some(Path::new(m["mountPath"].as_str().unwrap())))
        .unwrap_or_else(|| panic!("nothing is mounted where {file} is"));
    assert_eq!(mount["readOnly"], true, "{mount}");
    let volume = rendered.one("Deployment")["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mount["name"])
        .unwrap();
    (mount, volume)
}

#[test]
fn consul_token_and_ca_files_come_from_their_secrets() {
    let rendered = render(CONSUL);
    let args = rendered.args();
    let token = flag_value(&args, "--consul-token-file").unwrap();
    assert_eq!(token, "/etc/meshbridge/consul/token");
    let (_, volume) = volume_for(&rendered, token);
    assert_eq!(volume["secret"]["secretName"], "consul-acl");
    assert_eq!(
        volume["secret"]["items"],
        json!([{"key": "meshbridge-token", "path": "token"}])
    );
    let ca = flag_value(&args, "--consul-ca-file").unwrap();
    let (_, volume) = volume_for(&rendered, ca);
    assert_eq!(volume["secret"]["secretName"], "consul-ca");
    assert_eq!(
        volume["secret"]["items"],
        json!([{"key": "ca.crt", "path": "ca.crt"}])
    );
    // $(HOST_IP) in --consul-addr is expanded by Kubernetes from the container's env.
    let env = rendered.container()["env"].as_array().unwrap();
    let host_ip = env.iter().find(|e| e["name"] == "HOST_IP").unwrap();
    assert_eq!(
        host_ip["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );

    let default = render("");
    assert!(flag_value(&default.args(), "--consul-token-file").is_none());
    assert_no_mount_containing(&default, "consul");
}

/// Fails if a volume mount of the rendered container has `part` in its path.
fn assert_no_mount_containing(rendered: &Rendered, part: &str) {
    let mounts = rendered.container()["volumeMounts"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert!(
        mounts
            .iter()
            .all(|m| !m["mountPath"].as_str().unwrap_or("").contains(part)),
        "{mounts:?}"
    );
}

/// Renders `values` expecting Helm to refuse, with a message naming each of `named`.
fn render_fails_naming(values: &str, named: &[&str]) {
    let out = helm("render", values, &[]);
    let message = text(&out);
    assert!(!out.status.success(), "rendered:\n{values}");
    for name in named {
        assert!(
            message.contains(name),
            "{values}: the error does not name {name}: {message}"
        );
    }
}

/// The `items` of the Secret volume behind `file`, checked to hold `file` from `key`.
fn secret_item<'a>(rendered: &'a Rendered, file: &str, key: &str) -> &'a Value {
    let (_, volume) = volume_for(rendered, file);
    let name = Path::new(file).file_name().unwrap().to_str().unwrap();
    let items = &volume["secret"]["items"];
    assert!(
        items
            .as_array()
            .unwrap()
            .contains(&json!({"key": key, "path": name})),
        "{file} is not {key} of its Secret: {volume}"
    );
    volume
}

#[test]
fn admin_tokens_come_from_their_secret_and_the_service_monitor_sends_one() {
    let rendered = render(SECURED);
    let args = rendered.args();
    let tokens = flag_value(&args, "--admin-token-file").unwrap();
    assert_eq!(tokens, "/etc/meshbridge/admin/tokens");
    let volume = secret_item(&rendered, tokens, "tokens.txt");
    assert_eq!(volume["secret"]["secretName"], "meshbridge-admin-tokens");
    assert_eq!(volume["secret"]["defaultMode"], 0o440);
    assert_eq!(volume["secret"]["items"].as_array().unwrap().len(), 1);
    assert!(args.iter().any(|a| a == "--admin-metrics-auth"), "{args:?}");
    // /metrics wants a token: Prometheus sends one from its Secret.
    let endpoint = &rendered.one("ServiceMonitor")["spec"]["endpoints"][0];
    assert_eq!(
        endpoint["authorization"],
        json!({"type": "Bearer", "credentials": {"name": "prometheus-meshbridge", "key": "bearer"}})
    );

    // Off by default; the key defaults to `tokens`; metrics stay open unless asked.
    let default = render("").args();
    assert!(flag_value(&default, "--admin-token-file").is_none());
    assert!(!default.iter().any(|a| a == "--admin-metrics-auth"));
    let tokens_only =
        render("admin: {tokenSecret: admin-tokens}\nserviceMonitor: {enabled: true}\n");
    let args = tokens_only.args();
    assert!(
        !args.iter().any(|a| a == "--admin-metrics-auth"),
        "{args:?}"
    );
    let file = flag_value(&args, "--admin-token-file").unwrap();
    secret_item(&tokens_only, file, "tokens");
    let endpoint = &tokens_only.one("ServiceMonitor")["spec"]["endpoints"][0];
    assert!(endpoint.get("authorization").is_none(), "{endpoint}");
    let consul = render(CONSUL);
    let endpoint = &consul.one("ServiceMonitor")["spec"]["endpoints"][0];
    assert!(endpoint.get("authorization").is_none(), "{endpoint}");
    // Without a ServiceMonitor, protected metrics need no bearer Secret.
    let args = render("admin: {tokenSecret: admin-tokens, metricsAuth: true}\n").args();
    assert!(args.iter().any(|a| a == "--admin-metrics-auth"), "{args:?}");

    // With the Kubernetes API checking tokens (the default), no token file is needed.
    let args = render("admin: {metricsAuth: true}\n").args();
    assert!(args.iter().any(|a| a == "--admin-metrics-auth"), "{args:?}");
    render_fails_naming(
        "admin: {metricsAuth: true, kubernetesAuth: false}\n",
        &[
            "admin.metricsAuth",
            "admin.tokenSecret",
            "admin.kubernetesAuth",
        ],
    );
    render_fails_naming(
        "admin: {tokenSecret: admin-tokens, metricsAuth: true}\nserviceMonitor: {enabled: true}\n",
        &["admin.metricsAuth", "serviceMonitor.bearerTokenSecret"],
    );
}

#[test]
fn xds_tls_files_come_from_their_secret() {
    let rendered = render(SECURED);
    let args = rendered.args();
    let cert = flag_value(&args, "--xds-tls-cert").unwrap();
    let key = flag_value(&args, "--xds-tls-key").unwrap();
    let ca = flag_value(&args, "--xds-client-ca").unwrap();
    for (file, item) in [(cert, "tls.crt"), (key, "tls.key"), (ca, "mesh-ca.crt")] {
        let volume = secret_item(&rendered, file, item);
        assert_eq!(volume["secret"]["secretName"], "meshbridge-xds-tls");
        assert_eq!(volume["secret"]["defaultMode"], 0o440);
    }
    assert_eq!(flag_value(&args, "--xds-client-auth"), Some("strict"));
    assert!(args.iter().any(|a| a == "--sidecar-xds-tls"), "{args:?}");

    // TLS without client certificates: no CA mounted or passed.
    let server_only = render("xds: {tls: {secretName: xds-cert}}\n");
    let args = server_only.args();
    let cert = flag_value(&args, "--xds-tls-cert").unwrap();
    let volume = secret_item(&server_only, cert, "tls.crt");
    assert_eq!(
        volume["secret"]["items"],
        json!([{"key": "tls.crt", "path": "tls.crt"}, {"key": "tls.key", "path": "tls.key"}])
    );
    secret_item(
        &server_only,
        flag_value(&args, "--xds-tls-key").unwrap(),
        "tls.key",
    );
    assert!(flag_value(&args, "--xds-client-ca").is_none(), "{args:?}");
    assert!(flag_value(&args, "--xds-client-auth").is_none(), "{args:?}");
    assert!(!args.iter().any(|a| a == "--sidecar-xds-tls"), "{args:?}");
    // The CA under its default key.
    let permissive = render("xds: {tls: {secretName: xds-cert, clientAuth: permissive}}\n");
    let args = permissive.args();
    assert_eq!(flag_value(&args, "--xds-client-auth"), Some("permissive"));
    secret_item(
        &permissive,
        flag_value(&args, "--xds-client-ca").unwrap(),
        "ca.crt",
    );

    let default = render("");
    let args = default.args();
    for flag in [
        "--xds-tls-cert",
        "--xds-tls-key",
        "--xds-client-ca",
        "--xds-client-auth",
    ] {
        assert!(flag_value(&args, flag).is_none(), "{flag}: {args:?}");
    }
    assert_no_mount_containing(&default, "xds");

    render_fails_naming(
        "xds: {tls: {clientAuth: strict}}\n",
        &["xds.tls.clientAuth", "xds.tls.secretName"],
    );
}

#[test]
fn cert_manager_issues_the_xds_certificate_naming_the_service_sidecars_dial() {
    let rendered = render(XDS_CERT_MANAGER);
    let cert = rendered.one("Certificate");
    let spec = &cert["spec"];
    assert_eq!(spec["secretName"], format!("{RELEASE}-xds-tls"));
    assert_eq!(
        spec["issuerRef"],
        json!({"group": "cert-manager.io", "kind": "ClusterIssuer", "name": "mesh-ca"})
    );
    let names: Vec<&str> = spec["dnsNames"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    // The host injected sidecars dial is among the names their bootstraps check.
    let args = rendered.args();
    let sidecar_xds = flag_value(&args, "--sidecar-xds-addr").unwrap();
    let host = sidecar_xds.rsplit_once(':').unwrap().0;
    assert!(names.contains(&host), "{host} not in {names:?}");
    assert!(names.contains(&"xds.mesh.example.com"), "{names:?}");
    assert_eq!(spec["uris"], json!(["spiffe://mesh.local/control-plane"]));
    // The Secret cert-manager writes feeds the serving flags, and its ca.crt the client CA.
    for (flag, item) in [
        ("--xds-tls-cert", "tls.crt"),
        ("--xds-tls-key", "tls.key"),
        ("--xds-client-ca", "ca.crt"),
    ] {
        let volume = secret_item(&rendered, flag_value(&args, flag).unwrap(), item);
        assert_eq!(volume["secret"]["secretName"], format!("{RELEASE}-xds-tls"));
    }
    assert!(args.iter().any(|a| a == "--sidecar-xds-tls"), "{args:?}");
    // An issuer is required: it must be the one the proxies trust.
    render_fails_naming(
        "xds: {tls: {certManager: {enabled: true}}}\n",
        &["xds.tls.certManager.issuerRef.name"],
    );
    // Off by default.
    assert!(render("").of_kind("Certificate").is_empty());
}

#[test]
fn sidecars_reach_the_control_plane_over_tls_only_with_a_certificate_and_a_tls_server() {
    let args = render(SECURED).args();
    assert!(args.iter().any(|a| a == "--sidecar-xds-tls"), "{args:?}");
    assert_eq!(
        flag_value(&args, "--sidecar-tls-secret"),
        Some("{service}-mesh-tls")
    );
    assert_run_has("--sidecar-xds-tls");
    assert_not_given(
        "--sidecar-xds-tls",
        &[
            ("default", ""),
            ("certificate only", WEBHOOK_CERT_MANAGER),
            (
                "webhook off",
                "webhook: {enabled: false}\nsidecar: {tlsSecret: orders-tls, xdsTls: true}\n",
            ),
        ],
    );
    render_fails_naming(
        "sidecar: {xdsTls: true}\nxds: {tls: {secretName: xds-cert}}\n",
        &["sidecar.xdsTls", "sidecar.tlsSecret"],
    );
    render_fails_naming(
        "sidecar: {xdsTls: true, tlsSecret: orders-tls}\n",
        &["sidecar.xdsTls", "xds.tls.secretName"],
    );
}

/// The container port named `name`.
fn container_port(rendered: &Rendered, name: &str) -> u64 {
    rendered.container()["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no container port {name}"))["containerPort"]
        .as_u64()
        .unwrap()
}

/// The NetworkPolicy's ingress rules by the one container port each opens, checked to select
/// the meshbridge pods, to restrict ingress only, and to open each port over TCP in one rule.
fn ingress_rules(rendered: &Rendered) -> BTreeMap<u64, &Value> {
    let policy = rendered.one("NetworkPolicy");
    assert_eq!(policy["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(policy["metadata"]["namespace"], NAMESPACE);
    let deployment = rendered.one("Deployment");
    assert_eq!(
        policy["spec"]["podSelector"], deployment["spec"]["selector"],
        "the policy selects the meshbridge pods"
    );
    assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    let mut rules = BTreeMap::new();
    for rule in policy["spec"]["ingress"].as_array().unwrap() {
        let ports = rule["ports"].as_array().unwrap();
        assert_eq!(ports.len(), 1, "one port per rule: {rule}");
        assert_eq!(ports[0]["protocol"], "TCP", "{rule}");
        let port = ports[0]["port"].as_u64().unwrap();
        assert!(rules.insert(port, rule).is_none(), "{port} opened twice");
    }
    rules
}

#[test]
fn the_network_policy_opens_xds_and_the_webhook_to_all_and_admin_to_the_listed_peers() {
    let rendered = render(SECURED);
    let rules = ingress_rules(&rendered);
    let (xds, webhook, admin) = (
        container_port(&rendered, "grpc-xds"),
        container_port(&rendered, "https-webhook"),
        container_port(&rendered, "http-admin"),
    );
    assert_eq!(
        rules.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([xds, webhook, admin]),
        "only the three ports are opened"
    );
    // No `from`: every source (proxies on pods and hosts, the API server).
    for port in [xds, webhook] {
        assert!(rules[&port].get("from").is_none(), "{}", rules[&port]);
    }
    let replicas = json!({"podSelector": rendered.one("Deployment")["spec"]["selector"]});
    assert_eq!(
        rules[&admin]["from"],
        json!([
            replicas,
            {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}},
             "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}},
            {"ipBlock": {"cidr": "10.20.0.0/16"}}
        ]),
        "the admin port: the replicas (comparing their state) and adminFrom, nothing else"
    );

    // Without adminFrom, only the replicas reach the admin port; without the webhook, its
    // port stays closed.
    let closed = render("networkPolicy: {enabled: true}\nwebhook: {enabled: false}\n");
    let rules = ingress_rules(&closed);
    assert_eq!(
        rules.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([xds, admin])
    );
    assert_eq!(rules[&admin]["from"], json!([replicas]));

    assert!(
        render("").of_kind("NetworkPolicy").is_empty(),
        "off by default"
    );
}

/// Kills the process on drop.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Status code of `GET path` on 127.0.0.1:`port`, or `None` when nothing answers.
fn http_status(port: u16, path: &str) -> Option<u16> {
    http_status_with(port, path, None)
}

/// Status code of `GET path` on 127.0.0.1:`port` with `Authorization: Bearer token` when
/// given, or `None` when nothing answers.
fn http_status_with(port: u16, path: &str, token: Option<&str>) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split(' ').nth(1)?.parse().ok()
}

/// Writes a self-signed certificate (`tls.crt`) and its key (`tls.key`) into `dir`.
fn self_signed(dir: &Path, subject: &str) {
    let out = run_bounded(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", subject])
            .args(["-keyout", "tls.key", "-out", "tls.crt"])
            .current_dir(dir),
        "openssl req",
    );
    assert!(out.status.success(), "{}", text(&out));
}

/// The real binary started with a render's arguments, its listeners on free loopback ports.
struct Started {
    /// Killed on drop.
    _running: Running,
    /// Listener flag (`--admin-addr`, …) → its port.
    ports: BTreeMap<&'static str, u16>,
    log: tempfile::NamedTempFile,
    /// The Kubernetes API the binary is given (through KUBECONFIG).
    kube: kube_fake::FakeKube,
    _kubeconfig: tempfile::TempDir,
    /// Serves `kube`; dropped last.
    _runtime: tokio::runtime::Runtime,
}

/// Starts `meshbridge` with the arguments `rendered` passes, the listeners moved to free
/// loopback ports and each flag of `files` given a local path instead of the mounted one, and
/// waits (bounded) until the container's liveness and readiness probes answer 200.
fn start_rendered(rendered: &Rendered, files: &[(&str, &Path)]) -> Started {
    let mut args = rendered.args();
    let mut ports = BTreeMap::new();
    for flag in [
        "--xds-addr",
        "--admin-addr",
        "--admin-local-addr",
        "--webhook-addr",
    ] {
        let Some(i) = args.iter().position(|a| a == flag) else {
            continue;
        };
        let i = i + 1;
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        args[i] = format!("127.0.0.1:{port}");
        ports.insert(flag, port);
    }
    for (flag, path) in files {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("the chart does not pass {flag}: {args:?}"))
            + 1;
        args[i] = path.display().to_string();
    }
    let log = tempfile::NamedTempFile::new().unwrap();
    // The Kubernetes API: the fake, through a kubeconfig (--kube auto reads KUBECONFIG), with
    // the release's namespace (leader election writes its Lease there).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let kube = runtime.block_on(kube_fake::FakeKube::start());
    kube.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}}));
    let kubeconfig = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshbridge"));
    cmd.args(&args)
        .env("KUBECONFIG", kube.write_kubeconfig(kubeconfig.path()))
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("POD_NAME", "meshbridge-0")
        .env("POD_NAMESPACE", NAMESPACE)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log.reopen().unwrap());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MESHBRIDGE_") {
            cmd.env_remove(key);
        }
    }
    let mut running = Running(cmd.spawn().unwrap());
    let probes = &rendered.container();
    let admin = ports["--admin-addr"];
    let deadline = Instant::now() + Duration::from_secs(20);
    for probe in ["livenessProbe", "readinessProbe"] {
        let path = probes[probe]["httpGet"]["path"].as_str().unwrap();
        loop {
            if let Some(status) = running.0.try_wait().unwrap() {
                panic!(
                    "meshbridge {args:?} exited with {status}: {}",
                    std::fs::read_to_string(log.path()).unwrap()
                );
            }
            if http_status(admin, path) == Some(200) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{probe} {path} never answered 200: {}",
                std::fs::read_to_string(log.path()).unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    Started {
        _running: running,
        ports,
        log,
        kube,
        _kubeconfig: kubeconfig,
        _runtime: runtime,
    }
}

#[test]
fn the_default_args_start_the_real_binary_and_its_probes_answer() {
    // The webhook certificate the chart mounts: made here with openssl.
    let certs = tempfile::tempdir().unwrap();
    self_signed(certs.path(), "/CN=meshbridge-webhook.mesh-system.svc");
    let rendered = render("");
    let started = start_rendered(&rendered, &[("--webhook-cert-dir", certs.path())]);
    // The admin API listens on the pod IP (the kubelet expands $(POD_IP) from the
    // container's env) and on loopback for kubectl port-forward.
    let env = &rendered.container()["env"];
    let pod_ip = env
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "POD_IP")
        .unwrap_or_else(|| panic!("no POD_IP in {env}"));
    assert_eq!(pod_ip["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    let local = started.ports["--admin-local-addr"];
    assert_eq!(http_status(local, "/readyz"), Some(200));
    assert_eq!(http_status(local, "/api/services"), Some(401));
}

#[test]
fn the_secured_args_start_the_real_binary_and_the_admin_api_wants_a_token() {
    let rendered = render(SECURED);
    let dir = tempfile::tempdir().unwrap();
    let webhook = dir.path().join("webhook");
    let xds = dir.path().join("xds");
    for (d, subject) in [
        (&webhook, "/CN=meshbridge-webhook.mesh-system.svc"),
        (&xds, "/CN=meshbridge-xds.mesh-system.svc"),
    ] {
        std::fs::create_dir(d).unwrap();
        self_signed(d, subject);
    }
    let token = "0123456789abcdef-prometheus";
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, format!("# admin API\n{token} prometheus read\n")).unwrap();
    let started = start_rendered(
        &rendered,
        &[
            ("--webhook-cert-dir", &webhook),
            ("--admin-token-file", &tokens),
            ("--xds-tls-cert", &xds.join("tls.crt")),
            ("--xds-tls-key", &xds.join("tls.key")),
            // The serving certificate is self-signed: it stands for the proxies' CA too.
            ("--xds-client-ca", &xds.join("tls.crt")),
        ],
    );
    let admin = started.ports["--admin-addr"];
    let log = || std::fs::read_to_string(started.log.path()).unwrap();
    // A token of the file, and Prometheus's ServiceAccount token, which the Kubernetes API
    // accepts and authorizes for /metrics only (as the chart's admin-view role would, bound
    // to Prometheus, were it granted only /metrics).
    let prometheus = "prometheus-service-account-token";
    started.kube.add_token(
        prometheus,
        "system:serviceaccount:monitoring:prometheus",
        &[],
    );
    started.kube.grant_non_resource(
        "system:serviceaccount:monitoring:prometheus",
        &["get"],
        &["/metrics"],
    );
    for path in ["/api/services", "/metrics"] {
        assert_eq!(http_status(admin, path), Some(401), "{path}: {}", log());
        assert_eq!(
            http_status_with(admin, path, Some(token)),
            Some(200),
            "{path}: {}",
            log()
        );
    }
    assert_eq!(
        http_status_with(admin, "/metrics", Some(prometheus)),
        Some(200)
    );
    assert_eq!(
        http_status_with(admin, "/api/services", Some(prometheus)),
        Some(403)
    );
    kube_fake::assert_rbac_covers(&started.kube);
}

#[test]
fn admin_roles_grant_reading_or_operating_and_the_replicas_read() {
    let rendered = render("");
    assert!(
        rendered
            .args()
            .contains(&"--admin-kubernetes-auth".to_string())
    );
    let role = |suffix: &str| {
        let name = format!("{RELEASE}-{suffix}");
        rendered
            .of_kind("ClusterRole")
            .into_iter()
            .find(|r| r["metadata"]["name"] == name.as_str())
            .unwrap_or_else(|| panic!("no ClusterRole {name}"))
    };
    let view = role("admin-view");
    assert_eq!(
        view["rules"],
        json!([{"nonResourceURLs": ["/api/*", "/metrics"], "verbs": ["get"]}])
    );
    let operate = role("admin-operate");
    assert_eq!(
        operate["rules"][1],
        json!({"nonResourceURLs": ["/api/proxies/*", "/api/services/*"], "verbs": ["create"]})
    );
    let binding = rendered
        .of_kind("ClusterRoleBinding")
        .into_iter()
        .find(|b| b["roleRef"]["name"] == format!("{RELEASE}-admin-view").as_str())
        .unwrap();
    let account = &rendered.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"];
    assert_eq!(binding["subjects"][0]["name"], *account);

    // Off: no flag, no roles; metricsAuth then needs a token file.
    let off = render("admin: {kubernetesAuth: false}\n");
    assert!(!off.args().contains(&"--admin-kubernetes-auth".to_string()));
    assert!(
        off.of_kind("ClusterRole")
            .iter()
            .all(|r| r["metadata"]["name"] == RELEASE)
    );
}

#[test]
fn probes_resources_and_security_context_are_as_promised() {
    let rendered = render("");
    let container = rendered.container();
    let admin_port = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http-admin")
        .unwrap();
    assert_eq!(admin_port["containerPort"], 9090);
    let args = rendered.args();
    assert!(
        flag_value(&args, "--admin-addr")
            .unwrap()
            .ends_with(":9090")
    );
    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(get["port"], "http-admin", "{probe}");
    }
    let xds = container["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "grpc-xds")
        .unwrap();
    assert_eq!(xds["containerPort"], 18000);

    let sc = &container["securityContext"];
    assert_eq!(sc["runAsNonRoot"], true);
    assert_eq!(sc["runAsUser"], 65532);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    let pod = &rendered.one("Deployment")["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    assert_eq!(flag_value(&args, "--load-report-interval"), Some("10000"));
    let out = helm("render", "", &["loadReportIntervalMs=100"]);
    assert!(!out.status.success(), "an interval below 500 ms is refused");
    assert!(
        text(&out).contains("loadReportIntervalMs"),
        "{}",
        text(&out)
    );

    // The kubelet must not kill meshbridge while it drains.
    let drain_ms: u64 = flag_value(&args, "--drain").unwrap().parse().unwrap();
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(
        grace * 1000 > drain_ms,
        "grace {grace}s, drain {drain_ms}ms"
    );
    let out = helm(
        "render",
        "",
        &["drainMs=30000,terminationGracePeriodSeconds=30"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("terminationGracePeriodSeconds"),
        "{}",
        text(&out)
    );

    assert_eq!(
        container["resources"],
        json!({"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}})
    );
    assert_eq!(
        container["image"], "ghcr.io/meshbridge/meshbridge:0.1.0",
        "the tag defaults to the appVersion"
    );
    let env: Vec<&Value> = container["env"].as_array().unwrap().iter().collect();
    for (name, field) in [
        ("POD_NAME", "metadata.name"),
        ("POD_NAMESPACE", "metadata.namespace"),
    ] {
        let e = env.iter().find(|e| e["name"] == name).unwrap();
        assert_eq!(e["valueFrom"]["fieldRef"]["fieldPath"], field);
    }
    let anti =
        &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"];
    assert_eq!(
        anti[0]["podAffinityTerm"]["topologyKey"],
        "kubernetes.io/hostname"
    );
}

/// Decodes standard base64 (what Kubernetes Secret data and caBundle hold).
fn base64_decode(text: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_else(|e| panic!("not base64 ({e}): {text}"))
}

fn openssl(args: &[&str], dir: &Path) -> String {
    let out = run_bounded(
        Command::new("openssl").args(args).current_dir(dir),
        "openssl",
    );
    assert!(out.status.success(), "openssl {args:?}: {}", text(&out));
    text(&out)
}

/// The two webhook configurations, checked for what does not depend on the certificate mode.
fn check_webhook_configurations<'a>(rendered: &'a Rendered, what: &str) -> (&'a Value, &'a Value) {
    let service = rendered
        .of_kind("Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "meshbridge-webhook")
        .unwrap_or_else(|| panic!("{what}: no webhook Service"));
    assert_eq!(
        service["spec"]["ports"],
        json!([{"name": "https-webhook", "port": 443, "targetPort": "https-webhook", "protocol": "TCP"}])
    );
    let webhook_port = rendered.container()["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "https-webhook")
        .unwrap();
    assert_eq!(webhook_port["containerPort"], 9443);

    let mutating = rendered.one("MutatingWebhookConfiguration");
    assert_eq!(mutating["metadata"]["name"], "meshbridge-inject");
    let inject = &mutating["webhooks"][0];
    assert_eq!(inject["clientConfig"]["service"]["path"], "/inject");
    assert_eq!(
        inject["clientConfig"]["service"]["name"],
        "meshbridge-webhook"
    );
    assert_eq!(inject["clientConfig"]["service"]["namespace"], NAMESPACE);
    assert_eq!(
        inject["rules"],
        json!([{"apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"],
                "operations": ["CREATE"], "scope": "Namespaced"}])
    );
    assert_eq!(inject["sideEffects"], "None");
    assert_eq!(inject["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(inject["timeoutSeconds"], 5);
    assert_eq!(inject["reinvocationPolicy"], "Never");
    let excluded = inject["namespaceSelector"]["matchExpressions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "kubernetes.io/metadata.name")
        .unwrap();
    assert_eq!(excluded["operator"], "NotIn");
    let excluded: Vec<&str> = excluded["values"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(
        excluded.contains(&NAMESPACE) && excluded.contains(&"kube-system"),
        "{what}: {excluded:?}"
    );

    let validating = rendered.one("ValidatingWebhookConfiguration");
    assert_eq!(validating["metadata"]["name"], "meshbridge-validate");
    let validate = &validating["webhooks"][0];
    assert_eq!(validate["clientConfig"]["service"]["path"], "/validate");
    assert_eq!(
        validate["rules"],
        json!([{"apiGroups": ["meshbridge.io"], "apiVersions": ["v1alpha1"],
                "resources": ["meshservices", "accessrules"],
                "operations": ["CREATE", "UPDATE"], "scope": "Namespaced"}])
    );
    assert_eq!(
        validate["failurePolicy"], "Fail",
        "bad manifests are refused"
    );
    assert_eq!(validate["sideEffects"], "None");
    (inject, validate)
}

#[test]
fn webhook_with_helm_certificates_trusts_the_ca_that_signed_the_mounted_certificate() {
    let rendered = render(WEBHOOK_HELM_CERTS);
    let (inject, validate) = check_webhook_configurations(&rendered, "helm certs");
    assert_eq!(inject["failurePolicy"], "Ignore");
    // Every namespace but the opted-out ones reaches the webhook, which decides from the
    // pod's annotation and its namespace's label.
    assert!(inject["namespaceSelector"]["matchLabels"].is_null());
    assert!(
        inject["namespaceSelector"]["matchExpressions"]
            .as_array()
            .unwrap()
            .contains(
                &json!({"key": "meshbridge.io/inject", "operator": "NotIn", "values": ["disabled"]})
            ),
        "{inject}"
    );
    let args = rendered.args();
    let cert_dir = flag_value(&args, "--webhook-cert-dir").unwrap();
    assert_eq!(cert_dir, "/etc/meshbridge/webhook");
    let (_, volume) = volume_for(&rendered, &format!("{cert_dir}/tls.crt"));
    let secret = rendered.one("Secret");
    assert_eq!(secret["type"], "kubernetes.io/tls");
    assert_eq!(volume["secret"]["secretName"], secret["metadata"]["name"]);
    let ca = secret["data"]["ca.crt"].as_str().unwrap();
    assert_eq!(inject["clientConfig"]["caBundle"], ca);
    assert_eq!(validate["clientConfig"]["caBundle"], ca);

    let dir = tempfile::tempdir().unwrap();
    for (key, file) in [
        ("ca.crt", "ca.pem"),
        ("tls.crt", "tls.pem"),
        ("tls.key", "key.pem"),
    ] {
        let data = base64_decode(secret["data"][key].as_str().unwrap());
        std::fs::write(dir.path().join(file), data).unwrap();
    }
    let d = dir.path();
    let verified = openssl(&["verify", "-CAfile", "ca.pem", "tls.pem"], d);
    assert!(verified.contains("tls.pem: OK"), "{verified}");
    let san = openssl(
        &["x509", "-in", "tls.pem", "-noout", "-ext", "subjectAltName"],
        d,
    );
    for name in [
        "DNS:meshbridge-webhook.mesh-system.svc",
        "DNS:meshbridge-webhook.mesh-system.svc.cluster.local",
    ] {
        assert!(san.contains(name), "{name} missing: {san}");
    }
    let cert_key = openssl(&["x509", "-in", "tls.pem", "-noout", "-pubkey"], d);
    let key = openssl(&["pkey", "-in", "key.pem", "-pubout"], d);
    assert_eq!(cert_key, key, "tls.key is not the certificate's key");
}

#[test]
fn webhook_with_cert_manager_lets_cert_manager_issue_and_inject_the_ca() {
    let rendered = render(WEBHOOK_CERT_MANAGER);
    let (inject, validate) = check_webhook_configurations(&rendered, "cert-manager");
    assert_eq!(inject["failurePolicy"], "Fail", "from values");
    assert!(
        rendered.of_kind("Secret").is_empty(),
        "cert-manager writes it"
    );
    assert!(inject["clientConfig"].get("caBundle").is_none());
    assert!(validate["clientConfig"].get("caBundle").is_none());
    let certificate = rendered.one("Certificate");
    let issuer = rendered.one("Issuer");
    assert_eq!(issuer["spec"], json!({"selfSigned": {}}));
    assert_eq!(
        certificate["spec"]["issuerRef"]["name"],
        issuer["metadata"]["name"]
    );
    assert_eq!(
        certificate["spec"]["dnsNames"],
        json!([
            "meshbridge-webhook.mesh-system.svc",
            "meshbridge-webhook.mesh-system.svc.cluster.local"
        ])
    );
    let from = format!(
        "{NAMESPACE}/{}",
        certificate["metadata"]["name"].as_str().unwrap()
    );
    for kind in [
        "MutatingWebhookConfiguration",
        "ValidatingWebhookConfiguration",
    ] {
        assert_eq!(
            rendered.one(kind)["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
            from.as_str(),
            "{kind}"
        );
    }
    let args = rendered.args();
    let (_, volume) = volume_for(
        &rendered,
        &format!(
            "{}/tls.crt",
            flag_value(&args, "--webhook-cert-dir").unwrap()
        ),
    );
    assert_eq!(
        volume["secret"]["secretName"],
        certificate["spec"]["secretName"]
    );
}

#[test]
fn webhook_self_managed_leaves_certificate_and_ca_bundle_to_meshbridge() {
    let rendered = render(WEBHOOK_SELF_MANAGED);
    let (inject, validate) = check_webhook_configurations(&rendered, "self-managed");
    let args = rendered.args();
    assert!(args.iter().any(|a| a == "--webhook-self-managed"));
    assert!(flag_value(&args, "--webhook-cert-dir").is_none());
    assert!(rendered.of_kind("Secret").is_empty());
    assert!(rendered.of_kind("Certificate").is_empty());
    assert!(inject["clientConfig"].get("caBundle").is_none());
    assert!(validate["clientConfig"].get("caBundle").is_none());
    assert!(rendered.container().get("volumeMounts").is_none());
    // matchLabels: null selects every namespace but the excluded ones.
    assert!(inject["namespaceSelector"].get("matchLabels").is_none());
    let xds = rendered
        .of_kind("Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == "meshbridge-xds")
        .unwrap();
    assert_eq!(xds["spec"]["type"], "LoadBalancer");
    assert_eq!(xds["spec"]["ports"][0]["port"], 18000);
    assert_eq!(xds["spec"]["ports"][0]["name"], "grpc-xds");
}

#[test]
fn values_schema_rejects_typos_naming_them() {
    for (set, named) in [
        ("replicaCount=two", "replicaCount"),
        ("replicaCont=3", "replicaCont"),
        ("consul.adress=http://consul:8500", "adress"),
        ("consul.addr=consul:8500", "addr"),
        ("webhook.failurePolicy=Sometimes", "failurePolicy"),
        ("drainMs=900000", "drainMs"),
        ("sidecar.tlsSecret=Orders_TLS", "tlsSecret"),
        ("dashboards.enable=true", "enable"),
        ("dashboards.enabled=yes", "enabled"),
        ("dashboards.labelvalue=1", "labelvalue"),
        ("dashboards.label=grafana dashboard", "label"),
        ("dashboards.namespace=Monitoring", "namespace"),
        (
            "dashboards.annotations.grafana_folder=null",
            "grafana_folder",
        ),
        ("admin.tokenSecrets=admin-tokens", "tokenSecrets"),
        ("admin.metricsAuth=yes", "metricsAuth"),
        ("xds.tsl.secretName=xds-cert", "tsl"),
        ("xds.tls.clientCA=ca.crt", "clientCA"),
        ("xds.tls.clientAuth=required", "clientAuth"),
        ("xds.tls.clientAuth=Strict", "clientAuth"),
        ("sidecar.xdsTLS=true", "xdsTLS"),
        (
            "serviceMonitor.bearerTokenSecret.secretName=prom",
            "secretName",
        ),
        ("networkPolicy.enabeld=true", "enabeld"),
        (
            "networkPolicy.adminfrom[0].ipBlock.cidr=10.0.0.0/8",
            "adminfrom",
        ),
        (
            "networkPolicy.adminFrom[0].podselector.matchLabels.app=prometheus",
            "podselector",
        ),
        // An ipBlock peer may not also select pods or namespaces.
        (
            "networkPolicy.adminFrom[0].ipBlock.cidr=10.0.0.0/8,networkPolicy.adminFrom[0].podSelector.matchLabels.app=x",
            "adminFrom",
        ),
    ] {
        let out = helm("render", "", &[set]);
        let message = text(&out);
        assert!(!out.status.success(), "--set {set} was accepted");
        assert!(
            message.contains(named) && message.contains("schema"),
            "--set {set}: the error does not name {named}: {message}"
        );
        let lint = helm("lint", "", &[set]);
        assert!(!lint.status.success(), "lint accepted --set {set}");
        assert!(text(&lint).contains(named), "{}", text(&lint));
    }
}

#[test]
fn notes_tell_how_to_check_reach_and_connect() {
    let default = render("");
    let notes = &default.notes;
    assert!(
        notes.contains("rollout status deployment/meshbridge"),
        "{notes}"
    );
    assert!(
        notes.contains("port-forward service/meshbridge-admin"),
        "{notes}"
    );
    assert!(
        notes.contains("--xds-addr meshbridge-xds.mesh-system.svc:18000"),
        "{notes}"
    );
    let off = render("webhook: {enabled: false}\n");
    assert!(
        !off.notes.contains("kubectl label namespace"),
        "{}",
        off.notes
    );
    let webhook = render(WEBHOOK_HELM_CERTS);
    assert!(
        webhook
            .notes
            .contains("kubectl label namespace <namespace> meshbridge.io/inject=enabled"),
        "{}",
        webhook.notes
    );
    // By default the examples say how to get a Kubernetes token bound to the admin roles;
    // with the admin API open, they carry no token.
    for needle in [
        "Authorization: Bearer",
        "--clusterrole=meshbridge-admin-operate",
        "create token",
    ] {
        assert!(notes.contains(needle), "{needle}: {notes}");
    }
    let open = render("admin: {kubernetesAuth: false}\n").notes;
    assert!(!open.contains("Authorization: Bearer"), "{open}");
    let secured = render(SECURED);
    for needle in ["Authorization: Bearer", "--token-file", "--xds-tls"] {
        assert!(
            secured.notes.contains(needle),
            "{needle}: {}",
            secured.notes
        );
    }
}

// ---------------------------------------------------------------------------------------
// Grafana dashboards (`charts/meshbridge/dashboards/*.json`, `templates/dashboards.yaml`)

/// The dashboards as ConfigMaps for the Grafana sidecar, with the defaults.
const DASHBOARDS: &str = "
dashboards:
  enabled: true
";

/// Largest ConfigMap the API server stores (its data, in bytes).
const CONFIG_MAP_LIMIT: usize = 1024 * 1024;

/// The chart's dashboard files: file name → contents.
fn dashboard_files() -> BTreeMap<String, String> {
    let dir = chart_dir().join("dashboards");
    let files: BTreeMap<String, String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    assert!(
        files.contains_key("meshbridge-overview.json")
            && files.contains_key("meshbridge-service.json"),
        "{:?}",
        files.keys()
    );
    files
}

/// The ConfigMaps of a render, by name.
fn config_maps(rendered: &Rendered) -> BTreeMap<String, &Value> {
    rendered
        .of_kind("ConfigMap")
        .into_iter()
        .map(|m| (m["metadata"]["name"].as_str().unwrap().to_string(), m))
        .collect()
}

#[test]
fn dashboards_render_one_config_map_per_file_holding_it_byte_for_byte() {
    let files = dashboard_files();
    let rendered = render(DASHBOARDS);
    let maps = config_maps(&rendered);
    assert_eq!(
        maps.keys().collect::<Vec<_>>(),
        [
            "meshbridge-dashboard-overview",
            "meshbridge-dashboard-service"
        ],
        "one ConfigMap per dashboard file"
    );
    let mut carried = BTreeMap::new();
    for (name, map) in &maps {
        assert_eq!(map["apiVersion"], "v1");
        assert_eq!(map["metadata"]["namespace"], NAMESPACE, "{name}");
        let labels = &map["metadata"]["labels"];
        assert_eq!(labels["grafana_dashboard"], "1", "{name}: {labels}");
        assert_eq!(labels["app.kubernetes.io/instance"], RELEASE, "{name}");
        assert!(map["metadata"].get("annotations").is_none(), "{name}");
        assert!(map.get("binaryData").is_none(), "{name}");
        let data = map["data"].as_object().unwrap();
        assert_eq!(data.len(), 1, "{name}: one dashboard each");
        let (file, text) = data.iter().next().unwrap();
        let text = text.as_str().unwrap();
        assert!(
            text == files[file.as_str()],
            "{name}: data {file} differs from dashboards/{file}"
        );
        assert!(
            text.len() < CONFIG_MAP_LIMIT,
            "{name}: {} bytes",
            text.len()
        );
        carried.insert(file.clone(), name.clone());
    }
    assert_eq!(
        carried.keys().collect::<Vec<_>>(),
        files.keys().collect::<Vec<_>>(),
        "every dashboard file is carried once"
    );

    // Every setting reaches every ConfigMap.
    let custom = render(
        "
dashboards:
  enabled: true
  label: grafana.example.com/dashboard
  labelValue: mesh
  namespace: monitoring
  annotations: {grafana_folder: Mesh}
",
    );
    let maps = config_maps(&custom);
    assert_eq!(maps.len(), files.len());
    for (name, map) in maps {
        let meta = &map["metadata"];
        assert_eq!(meta["namespace"], "monitoring", "{name}");
        assert_eq!(meta["labels"]["grafana.example.com/dashboard"], "mesh");
        assert!(meta["labels"].get("grafana_dashboard").is_none(), "{name}");
        assert_eq!(meta["annotations"], json!({"grafana_folder": "Mesh"}));
    }
}

#[test]
fn dashboards_disabled_render_nothing() {
    for values in [
        "",
        "dashboards: {enabled: false, annotations: {grafana_folder: Mesh}}\n",
    ] {
        let rendered = render(values);
        assert!(rendered.of_kind("ConfigMap").is_empty(), "{values}");
        assert!(
            !rendered
                .manifests
                .keys()
                .any(|t| t.ends_with("templates/dashboards.yaml")),
            "{values}: {:?}",
            rendered.manifests.keys()
        );
    }
}

#[test]
fn the_sidecar_pod_monitor_scrapes_what_the_injector_exposes() {
    let rendered = render(CONSUL);
    let monitor = rendered.one("PodMonitor");
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["namespaceSelector"]["any"], true);
    let endpoint = &monitor["spec"]["podMetricsEndpoints"][0];
    assert_eq!(endpoint["path"], "/stats/prometheus");
    // A pod injected with the settings the chart passes carries the selected label and
    // names the diagnostics port as the PodMonitor does.
    let args = rendered.args();
    let port: u16 = flag_value(&args, "--sidecar-diagnostics-port")
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        flag_values(&args, "--sidecar-diagnostics-allow"),
        ["10.42.0.0/16"]
    );
    let settings = meshbridge::webhook::InjectSettings {
        diagnostics_port: Some(port),
        diagnostics_allow: vec!["10.42.0.0/16".into()],
        ..Default::default()
    };
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: orders-1, labels: {app: orders}}\nspec:\n  containers: [{name: app, image: orders, ports: [{containerPort: 8080}]}]\n";
    let (injected, _) = meshbridge::webhook::inject_stream(pod, &settings).unwrap();
    let injected: Value = serde_norway::from_str(&injected).unwrap();
    for (k, v) in monitor["spec"]["selector"]["matchLabels"]
        .as_object()
        .unwrap()
    {
        assert_eq!(&injected["metadata"]["labels"][k], v, "{injected:#}");
    }
    let ports: Vec<&Value> = injected["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .chain(injected["spec"]["containers"].as_array())
        .flatten()
        .flat_map(|c| c["ports"].as_array().into_iter().flatten())
        .filter(|p| p["name"] == endpoint["port"])
        .collect();
    assert_eq!(ports.len(), 1, "{injected:#}");
    assert_eq!(ports[0]["containerPort"], port);

    assert!(
        render("").of_kind("PodMonitor").is_empty(),
        "off by default"
    );
    assert!(
        flag_value(&render("").args(), "--sidecar-diagnostics-port").is_none(),
        "sidecar diagnostics are opt-in"
    );
    let out = helm("render", "sidecar: {ports: {diagnostics: 15002}}\n", &[]);
    assert!(!out.status.success());
    assert!(
        text(&out).contains("diagnosticsAllowFrom"),
        "{}",
        text(&out)
    );
    let out = helm(
        "render",
        "sidecarPodMonitor: {enabled: true}\nsidecar: {ports: {diagnostics: 0}}\n",
        &[],
    );
    assert!(!out.status.success());
    assert!(
        text(&out).contains("sidecar.ports.diagnostics"),
        "{}",
        text(&out)
    );
}
