//! Sidecar injection: the pure [`inject`] function, and the offline `meshbridge inject` on
//! manifests (Pods and the pod templates of workloads).

pub mod admission;
pub mod certs;
pub mod inject;
pub mod server;

use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::Value;

pub use inject::{InjectError, InjectSettings, Outcome};

/// Where a kind keeps its pod template (`None`: the object is not a workload).
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "Job"
        | "ReplicationController" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Injects the sidecar into one manifest: a Pod, or the pod template of a workload. Other
/// kinds come back unchanged.
pub fn inject_manifest(
    mut doc: Value,
    settings: &InjectSettings,
) -> Result<(Value, Outcome), InjectError> {
    let kind = doc["kind"].as_str().unwrap_or_default().to_string();
    let Some(path) = template_path(&kind) else {
        return Ok((
            doc,
            Outcome::Unchanged(format!("kind {kind:?} has no pod template")),
        ));
    };
    let field = if path.is_empty() {
        String::new()
    } else {
        format!("{}.", path.join("."))
    };
    let pointer: String = path.iter().map(|k| format!("/{k}")).collect();
    let Some(template) = doc.pointer_mut(&pointer).filter(|t| t.is_object()) else {
        return Err(InjectError {
            field: path.join("."),
            message: format!("a {kind} needs an object here"),
        });
    };
    let mut meta: ObjectMeta = if template["metadata"].is_null() {
        ObjectMeta::default()
    } else {
        parse(&field, "metadata", &template["metadata"])?
    };
    let mut spec: PodSpec = parse(&field, "spec", &template["spec"])?;
    let outcome = inject::inject(&mut meta, &mut spec, settings, None)?;
    if outcome == Outcome::Injected {
        // Serializing Kubernetes types cannot fail.
        template["metadata"] = serde_json::to_value(&meta).unwrap_or_default();
        template["spec"] = serde_json::to_value(&spec).unwrap_or_default();
    }
    Ok((doc, outcome))
}

fn parse<T: serde::de::DeserializeOwned>(
    prefix: &str,
    key: &str,
    v: &Value,
) -> Result<T, InjectError> {
    serde_json::from_value(v.clone()).map_err(|e| InjectError {
        field: format!("{prefix}{key}"),
        message: e.to_string(),
    })
}

/// A manifest that could not be injected, located in its file.
#[derive(Debug, thiserror::Error)]
#[error("document {document} ({kind} {name}): {message}")]
pub struct ManifestError {
    /// 1-based document number.
    pub document: usize,
    /// Its kind.
    pub kind: String,
    /// Its name.
    pub name: String,
    /// What went wrong.
    pub message: String,
}

/// `meshbridge inject` on a multi-document YAML stream: every document, injected where it
/// has a pod template, joined again by `---`. Also returns one note per document left
/// unchanged.
pub fn inject_stream(
    text: &str,
    settings: &InjectSettings,
) -> Result<(String, Vec<String>), ManifestError> {
    let mut out = Vec::new();
    let mut notes = Vec::new();
    for (i, document) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value =
            <Value as serde::Deserialize>::deserialize(document).map_err(|e| ManifestError {
                document: i + 1,
                kind: String::new(),
                name: String::new(),
                message: format!("not YAML: {e}"),
            })?;
        if value.is_null() {
            continue;
        }
        let (kind, name) = (
            value["kind"].as_str().unwrap_or("?").to_string(),
            value["metadata"]["name"]
                .as_str()
                .unwrap_or("?")
                .to_string(),
        );
        let (injected, outcome) = inject_manifest(value, settings).map_err(|e| ManifestError {
            document: i + 1,
            kind: kind.clone(),
            name: name.clone(),
            message: e.to_string(),
        })?;
        if let Outcome::Unchanged(why) = outcome {
            notes.push(format!(
                "document {} ({kind} {name}) unchanged: {why}",
                i + 1
            ));
        }
        out.push(serde_norway::to_string(&injected).unwrap_or_default());
    }
    Ok((out.join("---\n"), notes))
}

/// Flags of `meshbridge inject` (the injection settings, as the webhook would use them).
#[derive(Clone, Debug, clap::Args)]
pub struct InjectArgs {
    /// Manifest file (multi-document YAML), or `-` for standard input.
    #[arg(short = 'f', long = "filename")]
    pub file: String,
    /// Where the sidecars reach meshbridge's ADS, HOST:PORT.
    #[arg(long, default_value = "meshbridge-xds.meshbridge.svc:18000")]
    pub xds_addr: String,
    /// Envoy image of the sidecar.
    #[arg(long, default_value = "envoyproxy/envoy:v1.40.0")]
    pub image: String,
    /// Image of the iptables init container (transparent mode).
    #[arg(long, default_value = "ghcr.io/meshbridge/proxy-init:0.1.0")]
    pub init_image: String,
    /// Default Envoy log level.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// Put the sidecar among the regular containers (clusters before Kubernetes 1.29)
    /// instead of a native sidecar init container.
    #[arg(long)]
    pub no_native_sidecar: bool,
    /// Secret (in the pod's namespace) holding the sidecar's certificate: `tls.crt`,
    /// `tls.key`, `ca.crt`, as cert-manager writes them; `{service}` is replaced by the
    /// service name. A pod's annotation `meshbridge.io/tls-secret` overrides it (`""`: no TLS).
    #[arg(long, value_name = "NAME")]
    pub tls_secret: Option<String>,
    /// Seconds the sidecar drains for when its pod stops (its preStop hook), 0–300; 0: no
    /// drain. A pod's annotation `meshbridge.io/drain-seconds` overrides it.
    #[arg(
        long,
        default_value_t = crate::bootstrap::DEFAULT_DRAIN_SECONDS,
        value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::bootstrap::MAX_DRAIN_SECONDS))
    )]
    pub drain_seconds: u32,
}

impl InjectArgs {
    /// The injection settings these flags give.
    pub fn settings(&self) -> InjectSettings {
        InjectSettings {
            xds_addr: self.xds_addr.clone(),
            image: self.image.clone(),
            init_image: self.init_image.clone(),
            log_level: self.log_level.clone(),
            native_sidecar: !self.no_native_sidecar,
            tls_secret: self.tls_secret.clone(),
            drain_seconds: self.drain_seconds,
            ..InjectSettings::default()
        }
    }
}
