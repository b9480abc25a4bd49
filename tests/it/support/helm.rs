//! Lints and renders the Helm chart (`charts/meshbridge`) with the real Helm SDK, through
//! `tests/it/support/helm_chart.py` under `.venv/bin/python`; every tool run is bounded.
//!
//! Include it from a test crate with `#[path = "support/helm.rs"] mod helm;`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::Value;

/// Longest any one tool run may take before the test kills it and fails.
pub const TOOL_TIMEOUT: Duration = Duration::from_secs(60);
/// Release name and namespace every render uses.
pub const RELEASE: &str = "meshbridge";
pub const NAMESPACE: &str = "mesh-system";

pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

pub fn chart_dir() -> PathBuf {
    repo().join("charts/meshbridge")
}

pub fn venv_tool(name: &str) -> PathBuf {
    let p = repo().join(".venv/bin").join(name);
    assert!(
        p.exists(),
        "{} missing: run `make test`, which installs it into .venv",
        p.display()
    );
    p
}

/// Runs `cmd` to completion, killing it and failing the test after [`TOOL_TIMEOUT`].
pub fn run_bounded(cmd: &mut Command, what: &str) -> Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            pipe.read_to_end(&mut bytes).unwrap();
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + TOOL_TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not finish within {TOOL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    }
}

pub fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs the helper with `command` (`lint` or `render`), the values YAML and `--set`s.
pub fn helm(command: &str, values_yaml: &str, sets: &[&str]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let values = dir.path().join("values.yaml");
    std::fs::write(&values, values_yaml).unwrap();
    let mut cmd = Command::new(venv_tool("python"));
    cmd.arg(repo().join("tests/it/support/helm_chart.py"))
        .arg(command)
        .arg(chart_dir())
        .args(["--name", RELEASE, "--namespace", NAMESPACE])
        .arg("-f")
        .arg(&values);
    for set in sets {
        cmd.args(["--set", set]);
    }
    run_bounded(&mut cmd, &format!("helm {command}"))
}

/// What the helper prints for `render`.
#[derive(Deserialize)]
struct RenderOutput {
    manifests: BTreeMap<String, String>,
    notes: String,
    crds: Vec<Value>,
}

/// A rendered chart: the templates' text and their documents.
pub struct Rendered {
    /// Template path (e.g. `meshbridge/templates/deployment.yaml`) → rendered text, for the
    /// templates that produced at least one document.
    pub manifests: BTreeMap<String, String>,
    /// Every document, parsed.
    pub docs: Vec<Value>,
    pub notes: String,
    /// The files Helm installs from the chart's `crds/`.
    pub crd_files: Vec<String>,
}

impl Rendered {
    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    /// The only document of `kind`.
    pub fn one(&self, kind: &str) -> &Value {
        let found = self.of_kind(kind);
        assert_eq!(found.len(), 1, "expected one {kind}, got {}", found.len());
        found[0]
    }

    pub fn kinds(&self) -> BTreeSet<String> {
        self.docs
            .iter()
            .map(|d| d["kind"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn container(&self) -> &Value {
        let containers = &self.one("Deployment")["spec"]["template"]["spec"]["containers"];
        assert_eq!(containers.as_array().unwrap().len(), 1);
        &containers[0]
    }

    pub fn args(&self) -> Vec<String> {
        self.container()["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().expect("every arg is a string").to_string())
            .collect()
    }
}

/// Every document of a multi-document YAML text, empty ones left out.
pub fn yaml_documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Renders the chart with `values_yaml`; fails the test when Helm refuses.
pub fn render(values_yaml: &str) -> Rendered {
    let out = helm("render", values_yaml, &[]);
    assert!(out.status.success(), "helm render failed: {}", text(&out));
    let parsed: RenderOutput = serde_json::from_slice(&out.stdout).unwrap();
    let mut manifests = BTreeMap::new();
    let mut docs = Vec::new();
    for (template, text) in parsed.manifests {
        let found = yaml_documents(&text);
        if !found.is_empty() {
            docs.extend(found);
            manifests.insert(template, text);
        }
    }
    Rendered {
        manifests,
        docs,
        notes: parsed.notes,
        crd_files: parsed
            .crds
            .iter()
            .map(|c| c["name"].as_str().unwrap().to_string())
            .collect(),
    }
}
