//! Manifests checked before they are served: `meshbridge validate` (exit 0, or 2 with every
//! error naming file, line, document and field) and `meshbridge run`, which refuses to start
//! on a config directory holding a bad manifest (later, a bad file keeps its last good
//! state; see `admin_e2e`).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::fixtures::{Fixture, MeshService};

const BIN: &str = env!("CARGO_BIN_EXE_meshbridge");

/// A directory with one good manifest and one whose second document has a port out of range.
fn config_dir() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let good = MeshService::build("orders").endpoint("10.0.0.1", 80).yaml();
    std::fs::write(dir.path().join("good.yaml"), &good).unwrap();
    let bad = format!(
        "{good}---\n{}",
        MeshService::build("broken")
            .endpoint_with(serde_json::json!({"address": "10.0.0.2", "port": 70000}))
            .yaml()
    );
    std::fs::write(dir.path().join("bad.yaml"), &bad).unwrap();
    let line = 1 + bad.lines().position(|l| l.contains("70000")).unwrap();
    let expected = format!(
        "{}:{line}: document 2 (MeshService broken): spec.endpoints[0].port",
        dir.path().join("bad.yaml").display()
    );
    (dir, expected)
}

#[test]
fn validate_accepts_good_manifests_and_names_every_error() {
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/demo");
    let out = Command::new(BIN)
        .args(["validate", "-f", demo])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: 1 file(s), "));

    let (dir, expected) = config_dir();
    let mut child = Command::new(BIN)
        .args(["validate", "-f"])
        .arg(dir.path())
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"apiVersion: v1\nkind: MeshService\n")
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(lines[0].starts_with(&expected), "{stderr}");
    assert!(
        lines[1].starts_with("-:1: document 1 (MeshService <unnamed>): apiVersion"),
        "{stderr}"
    );
    assert!(stderr.contains("2 error(s) in 3 file(s) read"), "{stderr}");
}

#[test]
fn run_refuses_to_start_on_a_bad_manifest_naming_it() {
    let (dir, expected) = config_dir();
    let mut child = Command::new(BIN)
        .args(["run", "--kube", "off", "--xds-addr", "127.0.0.1:0"])
        .args(["--admin-addr", "127.0.0.1:0", "--config-dir"])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("meshbridge run kept running with a bad manifest");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(&expected), "{stderr}");
}
