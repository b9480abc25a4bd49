//! The CRDs on disk are what the binary generates and what Kubernetes accepts; the bootstrap
//! for legacy hosts is accepted by a real Envoy.

use crate::support;

use std::path::Path;
use std::process::Command;

#[test]
fn crd_files_are_exactly_what_meshbridge_generates() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let generated = meshbridge::api::crd_documents();
    let names: Vec<&str> = generated.iter().map(|(n, _)| *n).collect();
    assert_eq!(
        on_disk, names,
        "crds/ holds other files than the generated CRDs"
    );
    for (name, yaml) in &generated {
        let disk = std::fs::read_to_string(dir.join(name)).unwrap();
        assert!(
            disk == *yaml,
            "crds/{name} differs from the generated CRD: run `make crds` and commit the result"
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .arg("crds")
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let joined: Vec<String> = generated.into_iter().map(|(_, y)| y).collect();
    assert_eq!(printed, joined.join("---\n"));
}

/// Runs the real `kubernetes-validate --strict` on `files`; fails the test on a rejection.
/// Returns what it printed.
fn kubernetes_validate(files: &[&Path]) -> String {
    let out = Command::new(support::venv_tool("kubernetes-validate"))
        .arg("--strict")
        .args(files)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn crds_pass_the_kubernetes_schema_and_carry_validation() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("crds");
    let text = kubernetes_validate(&[
        &dir.join("meshservices.yaml"),
        &dir.join("accessrules.yaml"),
    ]);
    assert_eq!(text.matches("passed").count(), 2, "{text}");
    // Validation that must live in the schema, so the API server rejects bad objects.
    let ms = std::fs::read_to_string(dir.join("meshservices.yaml")).unwrap();
    assert!(ms.contains("maximum: 65535"), "port range missing");
    assert!(ms.contains("- permissive"), "mtls enum missing");
    let ar = std::fs::read_to_string(dir.join("accessrules.yaml")).unwrap();
    assert!(ar.contains("- target"), "target not required");
}

fn bootstrap(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .arg("bootstrap")
        .args(args)
        .output()
        .unwrap()
}

/// The YAML `meshbridge bootstrap ARGS` prints; fails unless it succeeds.
fn bootstrap_ok(args: &[&str]) -> String {
    let out = bootstrap(args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Fails unless `envoy --mode validate` accepts the bootstrap `yaml`.
fn assert_envoy_accepts(yaml: &[u8]) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bootstrap.yaml");
    std::fs::write(&file, yaml).unwrap();
    let v = Command::new(support::envoy_bin())
        .args(["--mode", "validate", "--disable-hot-restart", "-c"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "{}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );
}

#[test]
fn bootstrap_is_accepted_by_envoy_validate() {
    let yaml = bootstrap_ok(&[
        "--service",
        "frontend",
        "--node-id",
        "frontend-1",
        "--xds-addr",
        "meshbridge.mesh:18000",
        "--ingress-port",
        "15000",
        "--app-port",
        "8080",
        "--egress-port",
        "15001",
        "--admin-port",
        "9901",
        "--dependency",
        "orders",
        "--dependency",
        "https://api.example.com",
    ]);
    assert!(yaml.contains("service_name: frontend"), "{yaml}");
    assert!(yaml.contains("- https://api.example.com"), "{yaml}");
    assert_envoy_accepts(yaml.as_bytes());
}

#[test]
fn bootstrap_with_several_control_planes_lists_each_and_envoy_accepts_it() {
    for (xds, cluster_type) in [
        ("127.0.0.1:18000,127.0.0.2:18001", "STATIC"),
        ("meshbridge-a.mesh:18000,10.0.0.7:18000", "STRICT_DNS"),
    ] {
        let yaml = bootstrap_ok(&[
            "--service",
            "frontend",
            "--node-id",
            "frontend-1",
            "--xds-addr",
            xds,
            "--egress-port",
            "15001",
        ]);
        let doc: serde_json::Value = serde_norway::from_str(&yaml).unwrap();
        let cluster = &doc["static_resources"]["clusters"][0];
        assert_eq!(cluster["type"], cluster_type, "{yaml}");
        let endpoints: Vec<String> = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let a = &e["endpoint"]["address"]["socket_address"];
                format!("{}:{}", a["address"].as_str().unwrap(), a["port_value"])
            })
            .collect();
        let expected: Vec<&str> = xds.split(',').collect();
        assert_eq!(endpoints, expected, "{yaml}");
        assert_envoy_accepts(yaml.as_bytes());
    }
}

#[test]
fn bootstrap_with_host_certificates_declares_static_secrets_envoy_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    support::openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=frontend",
            "-addext",
            "subjectAltName=URI:spiffe://mesh.local/service/frontend",
            "-keyout",
            "key.pem",
            "-out",
            "cert.pem",
        ],
        d,
    );
    let p = |f: &str| d.join(f).display().to_string();
    let (cert, key) = (p("cert.pem"), p("key.pem"));
    // The host certificate, self-signed: it is its own CA.
    let host_cert = ["--tls-cert", &cert, "--tls-key", &key, "--tls-ca", &cert];
    let plain = [
        "--service",
        "frontend",
        "--node-id",
        "f-1",
        "--xds-addr",
        "127.0.0.1:18000",
        "--egress-port",
        "15001",
    ];
    let yaml = bootstrap_ok(&[&plain[..], &host_cert[..]].concat());
    assert!(
        yaml.contains("name: server_cert") && yaml.contains("name: validation_context"),
        "{yaml}"
    );
    assert_envoy_accepts(yaml.as_bytes());

    // Over TLS to the control plane, whose certificate must carry one of the given names
    // (each kind of SAN): Envoy accepts the pinned validation context.
    let over_tls = [
        "--service",
        "frontend",
        "--node-id",
        "f-1",
        "--xds-addr",
        "meshbridge-xds.mesh-system.svc:18000",
        "--xds-tls",
    ];
    let tls = [&over_tls[..], &host_cert[..]].concat();
    let pinned = [
        "--xds-server-san",
        "spiffe://mesh.local/control-plane",
        "--xds-server-san",
        "10.0.0.7",
        "--xds-server-san",
        "meshbridge-xds",
    ];
    let yaml = bootstrap_ok(&[&tls[..], &pinned[..]].concat());
    for kind in ["san_type: URI", "san_type: IP_ADDRESS", "san_type: DNS"] {
        assert!(yaml.contains(kind), "{kind}: {yaml}");
    }
    assert_envoy_accepts(yaml.as_bytes());
    // By default, the xDS host name.
    let out = bootstrap(&tls);
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(
        yaml.contains("exact: meshbridge-xds.mesh-system.svc"),
        "{yaml}"
    );
}

#[test]
fn bootstrap_rejects_bad_flags_naming_them() {
    // `bootstrap --service frontend --node-id n` and `flags` exits 2 naming `named`.
    let refused = |flags: &[&str], named: &str| {
        let mut args = vec!["--service", "frontend", "--node-id", "n"];
        args.extend_from_slice(flags);
        let out = bootstrap(&args);
        assert_eq!(out.status.code(), Some(2), "{flags:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(named), "{flags:?}: {stderr}");
    };
    refused(&["--xds-addr", "nohostport"], "--xds-addr");
    // With several control planes, the entry that is wrong is named.
    refused(
        &["--xds-addr", "127.0.0.1:18000,nohostport"],
        "--xds-addr \"nohostport\"",
    );
    refused(&["--xds-addr", "127.0.0.1:18000,"], "--xds-addr \"\"");
    refused(
        &["--xds-addr", "h:1", "--dependency", "ftp://x"],
        "--dependency",
    );
}

#[test]
fn run_rejects_bad_flags_with_exit_code_2() {
    let out = Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args(["run", "--kube", "off", "--config-dir", "/does/not/exist"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--config-dir"));
}

#[test]
fn run_with_an_unreadable_kubeconfig_exits_2_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, "clusters: [this is not a kubeconfig").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_meshbridge"))
        .args([
            "run",
            "--kube",
            "auto",
            "--xds-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("KUBECONFIG") && stderr.contains("kubeconfig"),
        "{stderr}"
    );
}

#[test]
fn bootstrap_help_tells_a_legacy_host_the_drain_the_sidecars_run() {
    let out = bootstrap(&["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(
        help.contains("Stopping Envoy without losing requests"),
        "{help}"
    );
    // Every admin request of the injected sidecars' drain, in the same order, then the stop.
    let script = meshbridge::bootstrap::drain_script(9901, 5);
    let paths: Vec<&str> = script
        .lines()
        .filter_map(|l| l.strip_prefix("admin "))
        .map(|p| p.trim_matches('\''))
        .collect();
    assert_eq!(paths, ["/healthcheck/fail", "/drain_listeners?inboundonly"]);
    let mut at = 0;
    for path in paths {
        let found = help[at..]
            .find(&format!("curl -s -X POST 'http://127.0.0.1:ADMIN{path}'"))
            .or_else(|| help[at..].find(&format!("curl -s -X POST http://127.0.0.1:ADMIN{path}")))
            .unwrap_or_else(|| panic!("{path} not documented after the previous step:\n{help}"));
        at += found;
    }
    assert!(help[at..].contains("kill -TERM"), "{help}");
}
