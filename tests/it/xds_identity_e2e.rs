//! End to end: xDS over mutual TLS with the data plane's own host certificates
//! (`spiffe://<trust domain>/service/<name>`). Real Envoys bootstrapped with `--xds-tls`
//! reach the real `meshbridge run --xds-tls-cert/--xds-tls-key/--xds-client-ca`; under
//! `--xds-client-auth strict` a proxy whose certificate proves another service than its
//! node claims is refused and counted, and under `permissive` it is served and counted.

use crate::support;

use std::path::Path;
use std::time::Duration;

use support::fixtures::{MeshService, manifests};
use support::{Backend, ControlPlane, Envoy, EnvoyOptions, TlsFiles, eventually};

const TRUST_DOMAIN: &str = "mesh.local";

/// frontend calls orders, which has one instance on `port`.
fn mesh(port: u16) -> String {
    manifests(&[
        &MeshService::build("orders").endpoint("127.0.0.1", port),
        &MeshService::build("frontend").dependency("orders"),
    ])
}

/// The mesh CA in `dir`, the control plane's certificate (for 127.0.0.1) and the flags
/// that serve xDS with it.
fn control_plane_tls(dir: &Path, mode: &str) -> Vec<String> {
    // The CA the host certificates come from signs the control plane's too.
    support::issue_identity(dir, "mesh", "frontend", TRUST_DOMAIN);
    support::sign_cert(dir, "mesh", "control-plane", "IP:127.0.0.1,DNS:localhost");
    let path = |f: &str| dir.join(f).display().to_string();
    vec![
        "--xds-tls-cert".into(),
        path("control-plane.pem"),
        "--xds-tls-key".into(),
        path("control-plane.key"),
        "--xds-client-ca".into(),
        path("mesh-ca.pem"),
        "--xds-client-auth".into(),
        mode.into(),
    ]
}

/// A frontend Envoy reaching the control plane over mTLS with `identity`'s certificate.
fn frontend(identity: TlsFiles) -> EnvoyOptions {
    EnvoyOptions {
        service: "frontend".into(),
        egress: true,
        tls: Some(identity),
        xds_tls: true,
        ..Default::default()
    }
}

/// meshbridge's answer to `GET /api/proxies/<envoy's node>/config_dump`.
async fn config_dump(cp: &ControlPlane, envoy: &Envoy) -> support::HttpResponse {
    support::http_get(
        cp.admin_addr(),
        "localhost",
        &format!("/api/proxies/{}/config_dump", envoy.node_id),
        &[],
    )
    .await
    .unwrap()
}

async fn identity_count(cp: &ControlPlane, result: &str) -> u64 {
    let name = format!("meshbridge_xds_identity_total{{result=\"{result}\"}} ");
    cp.metrics()
        .await
        .lines()
        .find_map(|l| l.strip_prefix(name.as_str()))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The mesh under `--xds-client-auth <mode>`: the directory of its certificates, the
/// `orders` backend and the control plane.
async fn start(mode: &str) -> (tempfile::TempDir, Backend, ControlPlane) {
    let dir = tempfile::tempdir().unwrap();
    let orders = Backend::start("orders", "a").await;
    let flags = control_plane_tls(dir.path(), mode);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cp = ControlPlane::start(&mesh(orders.port), &flags).await;
    (dir, orders, cp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_serves_proven_proxies_and_refuses_impostors() {
    let (dir, _orders, cp) = start("strict").await;

    // A proxy whose certificate proves frontend: configured over mTLS, traffic flows.
    let proven = support::issue_identity(dir.path(), "mesh", "frontend", TRUST_DOMAIN);
    let good = Envoy::start(&cp, frontend(proven)).await;
    good.wait_call("orders", "orders through a proven proxy", |r| {
        r.status == 200
    })
    .await;
    assert_eq!(identity_count(&cp, "verified").await, 1);
    let proxies = cp.admin_json("/api/proxies").await;
    assert_eq!(proxies[0]["identity"], "frontend", "{proxies}");
    // A proven proxy answers diagnostics.
    let dump = config_dump(&cp, &good).await;
    assert_eq!(dump.status, 200, "{}", dump.body);

    // A proxy holding billing's certificate that says it is frontend: refused.
    let billing = support::issue_identity(dir.path(), "mesh", "billing", TRUST_DOMAIN);
    let impostor = Envoy::start(&cp, frontend(billing)).await;
    eventually(
        Duration::from_secs(20),
        "the impostor refused and counted",
        || async { (identity_count(&cp, "mismatch").await > 0).then_some(()) },
    )
    .await;
    assert!(
        cp.log().contains("xDS client identity not proven"),
        "the refusal is logged"
    );
    assert!(
        impostor.call("orders", "/").await.is_err(),
        "the impostor got an egress listener"
    );
    assert_eq!(
        cp.admin_json("/api/proxies")
            .await
            .as_array()
            .unwrap()
            .len(),
        1,
        "only the proven proxy is connected"
    );

    // A plaintext client does not get past the TLS port.
    let plain = tokio::net::TcpStream::connect(cp.xds_addr()).await.unwrap();
    drop(plain);
    let mut client = envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient::connect(format!("http://{}", cp.xds_addr()))
        .await
        .unwrap();
    let (_tx, rx) = tokio::sync::mpsc::channel(1);
    let answer = tokio::time::timeout(
        Duration::from_secs(15),
        client.stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await;
    assert!(
        !matches!(answer, Ok(Ok(_))),
        "a plaintext stream was served on the TLS port"
    );

    // The proven proxy still follows changes.
    let other = Backend::start("orders", "b").await;
    cp.write_manifests(&mesh(other.port));
    good.wait_call("orders", "orders b", |r| r.body.contains("orders b"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_serves_impostors_and_counts_them() {
    let (dir, _orders, cp) = start("permissive").await;
    let billing = support::issue_identity(dir.path(), "mesh", "billing", TRUST_DOMAIN);
    let envoy = Envoy::start(&cp, frontend(billing)).await;
    envoy
        .wait_call("orders", "orders through an unproven proxy", |r| {
            r.status == 200
        })
        .await;
    assert_eq!(identity_count(&cp, "mismatch").await, 1);
    assert_eq!(identity_count(&cp, "verified").await, 0);
    // Served, but not asked for diagnostics: what it would answer is not proven to be
    // frontend's.
    let dump = config_dump(&cp, &envoy).await;
    assert_eq!(dump.status, 403, "{}", dump.body);
    assert!(dump.body.contains("did not prove service"), "{}", dump.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_ca_is_followed_without_a_restart() {
    let (dir, _orders, cp) = start("strict").await;
    // Host certificates from a new CA; the hosts trust old and new (the rotation's bundle),
    // so they accept the control plane's certificate, which the old CA signed.
    let mut rotated = support::issue_identity(dir.path(), "mesh2", "frontend", TRUST_DOMAIN);
    let bundle = dir.path().join("bundle.pem");
    let both = [
        std::fs::read(dir.path().join("mesh-ca.pem")).unwrap(),
        std::fs::read(&rotated.ca).unwrap(),
    ]
    .concat();
    std::fs::write(&bundle, &both).unwrap();
    rotated.ca = bundle;
    let envoy = Envoy::start(&cp, frontend(rotated)).await;
    // The control plane trusts only the old CA: the handshake fails, nothing is served.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(envoy.call("orders", "/").await.is_err());
    assert_eq!(identity_count(&cp, "verified").await, 0);

    // The CA file becomes the bundle (written aside and renamed, as a Secret update is):
    // the next handshake of the same Envoy is accepted.
    let staged = dir.path().join("mesh-ca.pem.new");
    std::fs::write(&staged, &both).unwrap();
    std::fs::rename(&staged, dir.path().join("mesh-ca.pem")).unwrap();
    envoy
        .wait_call("orders", "orders once the new CA is trusted", |r| {
            r.status == 200
        })
        .await;
    assert_eq!(identity_count(&cp, "verified").await, 1);
    assert!(cp.log().contains("xds client CA reloaded"), "{}", cp.log());

    // A CA file that no longer reads keeps the bundle in force.
    let mut old = support::issue_identity(dir.path(), "mesh", "frontend", TRUST_DOMAIN);
    let old_ca = dir.path().join("old-ca.pem");
    std::fs::copy(&old.ca, &old_ca).unwrap();
    old.ca = old_ca;
    std::fs::write(dir.path().join("mesh-ca.pem"), "not a certificate").unwrap();
    eventually(
        Duration::from_secs(10),
        "the broken CA file is reported",
        || async {
            cp.log()
                .contains("xds client CA not reloaded")
                .then_some(())
        },
    )
    .await;
    let again = Envoy::start(&cp, frontend(old)).await;
    again
        .wait_call(
            "orders",
            "a proxy of the old CA after the broken write",
            |r| r.status == 200,
        )
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_certificate_of_the_mesh_ca_cannot_stand_in_for_the_control_plane() {
    let dir = tempfile::tempdir().unwrap();
    let orders = Backend::start("orders", "a").await;
    // "The control plane" serves billing's host certificate: the mesh CA signed it, but it
    // does not name the xDS address the proxies were given.
    let billing = support::issue_identity(dir.path(), "mesh", "billing", TRUST_DOMAIN);
    let path = |p: &Path| p.display().to_string();
    let flags = [
        "--xds-tls-cert".to_string(),
        path(&billing.cert),
        "--xds-tls-key".into(),
        path(&billing.key),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let cp = ControlPlane::start(&mesh(orders.port), &flags).await;
    let frontend_id = support::issue_identity(dir.path(), "mesh", "frontend", TRUST_DOMAIN);
    let envoy = Envoy::start(&cp, frontend(frontend_id)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        envoy.call("orders", "/").await.is_err(),
        "the proxy was configured"
    );
    assert_eq!(
        cp.admin_json("/api/proxies").await,
        serde_json::json!([]),
        "a stream was served"
    );
}

#[test]
fn unreadable_tls_or_token_files_stop_the_start_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let short = dir.path().join("tokens");
    std::fs::write(&short, "too-short\n").unwrap();
    let missing = dir.path().join("missing.pem").display().to_string();
    let cases: [(Vec<String>, &str); 2] = [
        (
            vec![
                "--xds-tls-cert".into(),
                missing.clone(),
                "--xds-tls-key".into(),
                missing,
            ],
            "--xds-tls-cert/--xds-tls-key",
        ),
        (
            vec!["--admin-token-file".into(), short.display().to_string()],
            "--admin-token-file",
        ),
    ];
    for (flags, named) in cases {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_meshbridge"))
            .args(["run", "--kube", "off", "--xds-addr", "127.0.0.1:0"])
            .args(["--admin-addr", "127.0.0.1:0"])
            .args(&flags)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{flags:?}: {stderr}");
        assert!(stderr.contains(named), "{stderr}");
        assert!(
            !stderr.contains("meshbridge listening"),
            "it listened before refusing: {stderr}"
        );
    }
}
