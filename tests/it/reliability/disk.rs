//! The host's disks failing under the control plane: its log on a full disk (every write
//! fails with `ENOSPC`, as `/dev/full` answers) and its manifest directory read-only (a
//! ConfigMap mount). meshbridge needs neither to serve: it becomes ready, configures Envoy,
//! follows manifest changes and writes nothing into the manifest directory.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde_json::json;

use crate::support::fixtures::{Fixture, MeshService, manifests};
use crate::support::{Backend, ControlPlane, Envoy, EnvoyOptions, Traffic};

/// Every entry of `dir` with its size and modification time.
fn listing(dir: &Path) -> BTreeMap<String, (u64, SystemTime)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let m = e.metadata().unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                (m.len(), m.modified().unwrap()),
            )
        })
        .collect()
}

fn set_mode(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mesh(orders_port: u16) -> String {
    let frontend = MeshService::build("frontend").dependency("orders");
    let orders = MeshService::build("orders").endpoint("127.0.0.1", orders_port);
    manifests(&[&frontend as &dyn Fixture, &orders])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_for_the_log_and_a_read_only_manifest_directory_change_nothing() {
    let a = Backend::start("orders", "a").await;
    let b = Backend::start("orders", "b").await;
    // Debug logging: a log line for nearly everything meshbridge does, each one failing.
    let cp = ControlPlane::start_with_log(&mesh(a.port), &[], Path::new("/dev/full")).await;
    let dir = cp.dir.path().to_path_buf();
    set_mode(&dir.join("mesh.yaml"), 0o444);
    set_mode(&dir, 0o555);
    let before = listing(&dir);

    let envoy = Arc::new(
        Envoy::start(
            &cp,
            EnvoyOptions {
                service: "frontend".into(),
                egress: true,
                ..Default::default()
            },
        )
        .await,
    );
    envoy
        .wait_call("orders", "orders routed", |r| r.body.contains("orders a"))
        .await;
    let traffic = Traffic::start(envoy.clone(), "orders", Duration::from_millis(20));
    tokio::time::sleep(Duration::from_secs(1)).await;

    // The manifest changes, as a ConfigMap update does (the directory is writable for that
    // moment only): meshbridge follows it.
    set_mode(&dir, 0o755);
    cp.write_manifests(&mesh(b.port));
    set_mode(&dir.join("mesh.yaml"), 0o444);
    set_mode(&dir, 0o555);
    let written = listing(&dir);
    envoy
        .wait_call("orders", "orders moved to b", |r| {
            r.body.contains("orders b")
        })
        .await;
    let status = cp.admin_json("/api/sources").await;
    let config = status
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["kind"] == "config")
        .unwrap();
    assert_eq!(config["error"], json!(null), "{status}");
    tokio::time::sleep(Duration::from_secs(1)).await;
    traffic.assert_no_failure().await;
    assert!(cp.metrics().await.contains("meshbridge_"));

    // meshbridge wrote nothing into the directory: only the test's own write changed it.
    assert_eq!(
        written.keys().collect::<Vec<_>>(),
        before.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        listing(&dir),
        written,
        "meshbridge changed its manifest directory"
    );
    set_mode(&dir, 0o755);
}
