//! Certificate rotation without restarting Envoy, end to end: meshbridge sends each proxy its
//! certificate secrets over SDS as the paths its bootstrap names, Envoy reads the files and
//! reads them again when they are replaced — the two ways a deployment system does it:
//! - [`Layout::Renamed`]: new files written next to the old ones and renamed into place (the
//!   certificate, then the key, then the CA bundle);
//! - [`Layout::Kubelet`]: a Kubernetes Secret volume: the files are symlinks through `..data`,
//!   a symlink to a timestamped directory that the kubelet swaps atomically.
//!
//! Under traffic through a caller's Envoy to a `strict` callee, the callee's certificate is
//! renewed (same identity, new serial): no request fails, the callee's Envoy serves the new
//! certificate to a fresh handshake, and a CA added to the bundle is trusted from then on.

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use support::fixtures::{MeshService, manifests};
use support::{
    Backend, ControlPlane, Envoy, EnvoyOptions, TlsError, TlsFiles, Traffic, eventually, free_port,
    issue_identity, sign_cert, spiffe_id, tls_request,
};

const TRUST_DOMAIN: &str = "mesh.local";
/// How long a replaced file may take to reach Envoy.
const LIMIT: Duration = Duration::from_secs(20);

/// How certificate files are replaced on disk.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// New files renamed over the old ones, one at a time.
    Renamed,
    /// A Kubernetes Secret volume: `tls.crt -> ..data/tls.crt`, `..data -> ..<generation>`.
    Kubelet,
}

/// The three files of a proxy's identity, as a Secret volume names them.
const FILES: [&str; 3] = ["tls.crt", "tls.key", "ca.crt"];

/// Puts `contents` (for `tls.crt`, `tls.key`, `ca.crt`) into `dir` the way `layout` does;
/// `generation` names the kubelet's timestamped directory.
fn install(dir: &Path, layout: Layout, generation: u32, contents: [&[u8]; 3]) {
    match layout {
        Layout::Renamed => {
            for (name, bytes) in FILES.iter().zip(contents) {
                let staged = dir.join(format!(".{name}.new"));
                std::fs::write(&staged, bytes).unwrap();
                std::fs::rename(&staged, dir.join(name)).unwrap();
            }
        }
        Layout::Kubelet => {
            let data = dir.join(format!("..{generation}"));
            std::fs::create_dir(&data).unwrap();
            for (name, bytes) in FILES.iter().zip(contents) {
                std::fs::write(data.join(name), bytes).unwrap();
            }
            let previous = std::fs::read_link(dir.join("..data")).ok();
            let staged = dir.join("..data_tmp");
            std::os::unix::fs::symlink(format!("..{generation}"), &staged).unwrap();
            std::fs::rename(&staged, dir.join("..data")).unwrap();
            for name in FILES {
                let link = dir.join(name);
                if link.symlink_metadata().is_err() {
                    std::os::unix::fs::symlink(format!("..data/{name}"), &link).unwrap();
                }
            }
            if let Some(previous) = previous {
                std::fs::remove_dir_all(dir.join(previous)).unwrap();
            }
        }
    }
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A serial number in hex, lower case and without leading zeros (Envoy keeps a leading zero
/// nibble, openssl writes upper case).
fn normalized_serial(hex: &str) -> String {
    hex.trim().trim_start_matches('0').to_lowercase()
}

/// The serial number of the PEM certificate `cert`.
fn serial(cert: &Path) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(cert)
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    normalized_serial(text.trim().trim_start_matches("serial="))
}

/// The serial numbers of the certificates (not CAs) Envoy's admin `/certs` lists.
async fn served_serials(envoy: &Envoy) -> Vec<String> {
    let r = support::http_get(envoy.admin_addr(), "localhost", "/certs", &[])
        .await
        .unwrap();
    let certs: Value = serde_json::from_str(&r.body).unwrap();
    let mut serials: Vec<String> = certs["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["cert_chain"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c["serial_number"].as_str().map(normalized_serial))
        .collect();
    serials.sort();
    serials.dedup();
    serials
}

/// The serial of the certificate `port` presents to a fresh handshake with `client`'s
/// certificate (openssl, bounded).
async fn presented_serial(port: u16, client: &TlsFiles) -> Option<String> {
    let (cert, key) = (client.cert.clone(), client.key.clone());
    let run = tokio::task::spawn_blocking(move || {
        let script = format!(
            "openssl s_client -connect 127.0.0.1:{port} -cert {} -key {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
            cert.display(),
            key.display()
        );
        std::process::Command::new("timeout")
            .args(["10", "sh", "-c", &script])
            .output()
    });
    let out = tokio::time::timeout(Duration::from_secs(15), run)
        .await
        .ok()?
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.trim().strip_prefix("serial=").map(normalized_serial)
}

/// `delta`: the proxies use incremental xDS (SDS included).
async fn rotate_under_traffic(layout: Layout, delta: bool) {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path().join("tls");
    std::fs::create_dir(&dir).unwrap();
    let issued = certs.path();
    let caller_identity = issue_identity(issued, "mesh", "caller", TRUST_DOMAIN);
    let first = issue_identity(issued, "mesh", "callee", TRUST_DOMAIN);
    // The same identity again, under another subject and serial.
    sign_cert(
        issued,
        "mesh",
        "mesh-callee-renewed",
        &format!("URI:{}", spiffe_id(TRUST_DOMAIN, "callee")),
    );
    let renewed = TlsFiles {
        cert: issued.join("mesh-callee-renewed.pem"),
        key: issued.join("mesh-callee-renewed.key"),
        ca: first.ca.clone(),
    };
    let ca = read(&first.ca);
    install(
        &dir,
        layout,
        1,
        [&read(&first.cert), &read(&first.key), &ca],
    );
    // The callee's bootstrap names the files of `dir`, as an injected sidecar names those
    // of its Secret volume.
    let callee_files = TlsFiles {
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
        ca: dir.join("ca.crt"),
    };

    let app = Backend::start("callee", "a").await;
    let ingress = free_port();
    let callee_service = MeshService::build("callee")
        .set("mtls", "strict")
        .endpoint("127.0.0.1", ingress);
    let caller_service = MeshService::build("caller").dependency("callee");
    let cp = ControlPlane::start(&manifests(&[&callee_service, &caller_service]), &[]).await;
    let callee = Envoy::start(
        &cp,
        EnvoyOptions {
            tls: Some(callee_files),
            delta,
            ..EnvoyOptions::callee("callee", ingress, app.port)
        },
    )
    .await;
    let caller = Arc::new(
        Envoy::start(
            &cp,
            EnvoyOptions {
                tls: Some(caller_identity.clone()),
                delta,
                ..EnvoyOptions::caller("caller")
            },
        )
        .await,
    );
    caller
        .wait_call("callee", "the caller reaches the callee over mTLS", |r| {
            r.status == 200
        })
        .await;
    // The secrets came over SDS from meshbridge, as paths.
    let sds = callee.stat("sds.server_cert.update_success").await;
    assert!(sds >= Some(1), "server_cert not received over SDS: {sds:?}");
    assert_eq!(served_serials(&callee).await, vec![serial(&first.cert)]);

    let traffic = Traffic::start(caller.clone(), "callee", Duration::from_millis(20));
    eventually(LIMIT, "traffic flows before the rotation", || async {
        (traffic.counts().0 >= 10).then_some(())
    })
    .await;
    install(
        &dir,
        layout,
        2,
        [&read(&renewed.cert), &read(&renewed.key), &ca],
    );
    let want = serial(&renewed.cert);
    eventually(
        LIMIT,
        "a fresh handshake sees the renewed certificate",
        || {
            let (want, identity) = (want.clone(), caller_identity.clone());
            async move {
                (presented_serial(ingress, &identity).await.as_deref() == Some(want.as_str()))
                    .then_some(())
            }
        },
    )
    .await;
    assert_eq!(served_serials(&callee).await, vec![want]);
    let before = traffic.counts().0;
    eventually(LIMIT, "traffic flows after the rotation", || async {
        (traffic.counts().0 >= before + 10).then_some(())
    })
    .await;
    traffic.assert_no_failure().await;

    // The CA bundle: a caller whose certificate another CA signed is refused until that CA
    // joins the bundle.
    let other = issue_identity(issued, "other", "caller", TRUST_DOMAIN);
    let callee_addr = std::net::SocketAddr::from(([127, 0, 0, 1], ingress));
    let refused = tls_request(callee_addr, &other.cert, &other.key, "/", &[]).await;
    assert!(
        matches!(refused, Err(TlsError::Handshake(_))),
        "a certificate of an unknown CA: {refused:?}"
    );
    let bundle = [ca.clone(), read(&other.ca)].concat();
    install(
        &dir,
        layout,
        3,
        [&read(&renewed.cert), &read(&renewed.key), &bundle],
    );
    eventually(LIMIT, "the callee trusts the added CA", || async {
        tls_request(callee_addr, &other.cert, &other.key, "/", &[])
            .await
            .ok()
            .filter(|r| r.status == 200)
    })
    .await;
    // The first CA is still trusted.
    caller
        .wait_call("callee", "the first CA still trusted", |r| r.status == 200)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_renamed_into_place_rotates_under_traffic_without_a_restart() {
    rotate_under_traffic(Layout::Renamed, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_a_secret_volume_swapped_by_the_kubelet_rotates_under_traffic_without_a_restart() {
    rotate_under_traffic(Layout::Kubelet, true).await;
}
