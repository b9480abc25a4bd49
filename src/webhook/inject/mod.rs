//! Sidecar injection (pure): a pod template and settings in, the injected template out.
//!
//! The sidecar is Envoy with the bootstrap `meshbridge bootstrap` would print, passed as
//! `--config-yaml` (no config volume, no extra image); its node id is set per pod with
//! `--service-node $(POD_NAME).$(POD_NAMESPACE)`. By default it is a native sidecar (an init
//! container with `restartPolicy: Always`), so it starts before the application and stops
//! after it. The application gets explicit egress: `MESHBRIDGE_EGRESS_ADDR` and `HTTP_PROXY`
//! pointing at the sidecar's egress listener. With `meshbridge.io/transparent: "true"`, an
//! init container redirects the pod's inbound and outbound HTTP traffic with iptables.
//!
//! Injecting an injected pod changes nothing. Annotations (on the pod template) tune it:
//!
//! | annotation | meaning |
//! |---|---|
//! | `meshbridge.io/inject: "false"` | no sidecar |
//! | `meshbridge.io/service` | service name (else the MeshService selecting the pod, else label `app.kubernetes.io/name`, else `app`) |
//! | `meshbridge.io/dependencies` | comma-separated dependencies (service names, `https://host`) |
//! | `meshbridge.io/app-port` | the application's port (else its first container port) |
//! | `meshbridge.io/ports` | the sidecar's listeners for further ports, `NAME=INGRESS:APP,…` (else one per other named container port, from 15100) |
//! | `meshbridge.io/ingress-port`, `meshbridge.io/egress-port` | the sidecar's listeners |
//! | `meshbridge.io/proxy-cpu`, `…-memory`, `…-cpu-limit`, `…-memory-limit` | sidecar resources |
//! | `meshbridge.io/log-level` | Envoy's log level |
//! | `meshbridge.io/http-proxy: "false"` | no `HTTP_PROXY` env for the application |
//! | `meshbridge.io/transparent: "true"` | iptables redirection (init container with `NET_ADMIN`) |
//! | `meshbridge.io/tls-secret` | Secret with the pod's mesh certificate (overrides [`InjectSettings::tls_secret`]; `""`: no TLS) |
//! | `meshbridge.io/drain-seconds` | how long the sidecar drains when the pod stops, 0–300 (overrides [`InjectSettings::drain_seconds`]; `0`: no drain) |
//!
//! ## Graceful drain
//!
//! The sidecar gets a `preStop` hook running [`drain_script`]: Envoy fails its readiness and
//! closes inbound connections after their current request, waits the drain time (in-flight
//! requests finish; the control plane has already dropped the terminating pod from its
//! callers' endpoints, since a pod with a `deletionTimestamp` is no endpoint), then stops
//! its inbound listeners. The hook runs `bash` (Envoy's Ubuntu-based images have it; a
//! distroless image has no shell: use drain `0` with one).
//!
//! Kubernetes runs every container's `preStop` hook when the pod starts terminating, then
//! sends that container SIGTERM, all within `terminationGracePeriodSeconds`; a pod whose grace
//! period is shorter than the drain plus [`DRAIN_EXIT_MARGIN_SECONDS`] (Kubernetes' default is
//! 30 s) gets it raised to that, so the drain is never cut short by SIGKILL.
//!
//! - Native sidecar: Kubernetes already orders the shutdown: the sidecar's hook starts with
//!   the application's termination, but the sidecar gets SIGTERM only after every application
//!   container has exited, so the application keeps its egress while it shuts down.
//! - Classic sidecar: the application gets SIGTERM as the drain starts, and the sidecar when
//!   its hook ends; the application should keep serving for the drain time after SIGTERM
//!   (or sleep in its own `preStop`), and cannot call out once the sidecar is gone.
//!
//! ## Mesh identity (TLS)
//!
//! Certificates (SAN URI `spiffe://<trust-domain>/service/<name>`) come from the deployment
//! system, e.g. cert-manager, never from meshbridge. When a Secret applies to a pod (the
//! annotation `meshbridge.io/tls-secret`, else [`InjectSettings::tls_secret`]), it is mounted
//! read-only into the sidecar at [`TLS_DIR`] (volume [`TLS_VOLUME`], a whole volume rather than
//! `subPath` mounts, which the kubelet would never update) and the bootstrap names the files
//! (`tls.crt`, `tls.key`, `ca.crt`) in the node metadata: meshbridge hands them back to the
//! sidecar as its SDS secrets `server_cert` and `validation_context`, so a renewed Secret
//! rotates the certificate without a restart. The Secret's files are mode `0444` ([`TLS_FILE_MODE`]): the sidecar runs as
//! user [`PROXY_UID`] and the pod gets no `fsGroup`, so group-only modes would leave Envoy
//! unable to read its key; the pod is the trust boundary (every container of the pod could
//! mount the Secret anyway). The injected pod carries the annotation with the Secret actually
//! mounted, which is how the index knows its proxy accepts mutual TLS.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PodSpec, SecretVolumeSource, Volume};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::api::annotations::{
    self as ann, INGRESS_PORT, INJECT, INJECTED, PORTS, SIDECAR_LABEL, TLS_SECRET,
};
use crate::api::{DEFAULT_INGRESS_PORT, SIDECAR_CONTAINER};
use crate::bootstrap::{BootstrapOptions, MAX_DRAIN_SECONDS, bootstrap_yaml, drain_script};
use crate::model::{MAX_NAMED_PORTS, PortBinding, valid_port_name};

mod containers;
use containers::{
    add_egress_env, place_containers, proxy_resources, redirect_container, sidecar_container,
};

/// Name of the iptables init container.
pub const INIT_CONTAINER: &str = "meshbridge-init";
/// User the sidecar runs as (its own traffic is not redirected).
pub const PROXY_UID: i64 = 1337;
/// Name of the pod volume holding the sidecar's TLS Secret.
pub const TLS_VOLUME: &str = "meshbridge-tls";
/// Where the TLS Secret is mounted (read-only) in the sidecar.
pub const TLS_DIR: &str = "/etc/meshbridge/tls";
/// File mode of the mounted Secret's files (`0444`): readable by the sidecar's user
/// [`PROXY_UID`] without an `fsGroup`.
pub const TLS_FILE_MODE: i32 = 0o444;
/// The placeholder in [`InjectSettings::tls_secret`] replaced by the pod's service name.
pub const SERVICE_PLACEHOLDER: &str = "{service}";
/// Seconds a pod's `terminationGracePeriodSeconds` must exceed the drain by: the
/// application's and Envoy's own exit after SIGTERM.
pub const DRAIN_EXIT_MARGIN_SECONDS: i64 = 5;
/// Kubernetes' `terminationGracePeriodSeconds` when a pod sets none.
const DEFAULT_GRACE_SECONDS: i64 = 30;
/// What names the cluster-wide TLS Secret setting in errors.
const TLS_SECRET_SETTING: &str = "--sidecar-tls-secret (meshbridge inject: --tls-secret)";
const LOG_LEVELS: &[&str] = &[
    "trace", "debug", "info", "warning", "warn", "error", "critical", "off",
];

/// Cluster-wide injection settings (from `meshbridge run` flags or the Helm values).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InjectSettings {
    /// Envoy image of the sidecar.
    pub image: String,
    /// Image of the iptables init container (needs `iptables` and `sh`).
    pub init_image: String,
    /// Where sidecars reach meshbridge's ADS, HOST:PORT.
    pub xds_addr: String,
    /// Default ingress port.
    pub ingress_port: u16,
    /// Default egress port.
    pub egress_port: u16,
    /// Envoy admin port (127.0.0.1 only).
    pub admin_port: u16,
    /// Port of the readiness listener (`GET /ready` only).
    pub ready_port: u16,
    /// Port of the diagnostics listener through which the control plane reads the sidecar's
    /// config dump, stats and clusters and changes its log level; `None`: no such listener
    /// (diagnostics of the pod's proxy are then unavailable).
    pub diagnostics_port: Option<u16>,
    /// Address ranges (CIDR) allowed to use the diagnostics listener.
    pub diagnostics_allow: Vec<String>,
    /// Default Envoy log level.
    pub log_level: String,
    /// Default CPU request, memory request and memory limit.
    pub cpu: String,
    /// Memory request.
    pub memory: String,
    /// Memory limit.
    pub memory_limit: String,
    /// Native sidecar (init container with `restartPolicy: Always`, Kubernetes ≥ 1.29);
    /// otherwise the first regular container.
    pub native_sidecar: bool,
    /// Name of the Secret holding the sidecar's certificate in the cert-manager layout
    /// (`tls.crt`, `tls.key`, `ca.crt`), in the pod's namespace; `{service}` in it is replaced
    /// by the pod's service name (e.g. `{service}-mesh-tls`). A pod's annotation
    /// `meshbridge.io/tls-secret` overrides it (`""`: no TLS for that pod). `None` (or empty):
    /// no TLS unless the pod asks for it.
    pub tls_secret: Option<String>,
    /// A sidecar with a certificate reaches the control plane over mutual TLS with it
    /// (`run --sidecar-xds-tls`; the control plane's `--xds-client-auth` checks it).
    pub xds_tls: bool,
    /// Seconds the sidecar drains for when its pod stops (its `preStop` hook, see the
    /// module's "Graceful drain"), at most [`MAX_DRAIN_SECONDS`]; `0`: no hook. A pod's
    /// annotation `meshbridge.io/drain-seconds` overrides it.
    pub drain_seconds: u32,
}

/// Port the chart gives the sidecar's diagnostics listener when it is turned on.
pub const DEFAULT_DIAGNOSTICS_PORT: u16 = 15002;

impl Default for InjectSettings {
    fn default() -> Self {
        InjectSettings {
            image: "envoyproxy/envoy:v1.40.0".into(),
            init_image: "ghcr.io/meshbridge/proxy-init:0.1.0".into(),
            xds_addr: "meshbridge-xds.meshbridge.svc:18000".into(),
            ingress_port: DEFAULT_INGRESS_PORT,
            egress_port: 15001,
            admin_port: 15000,
            ready_port: 15021,
            diagnostics_port: None,
            diagnostics_allow: Vec::new(),
            log_level: "info".into(),
            cpu: "100m".into(),
            memory: "128Mi".into(),
            memory_limit: "256Mi".into(),
            native_sidecar: true,
            tls_secret: None,
            xds_tls: false,
            drain_seconds: crate::bootstrap::DEFAULT_DRAIN_SECONDS,
        }
    }
}

/// Whether a Kubernetes version (`major`, `minor` as `/version` reports them, e.g. `"1"`,
/// `"28+"`) runs native sidecars: init containers with `restartPolicy: Always`, on by
/// default since 1.29.
pub fn supports_native_sidecars(major: &str, minor: &str) -> bool {
    let number = |s: &str| {
        s.trim_end_matches(|c: char| !c.is_ascii_digit())
            .parse::<u32>()
            .ok()
    };
    match (number(major), number(minor)) {
        (Some(1), Some(minor)) => minor >= 29,
        (Some(major), _) => major > 1,
        _ => true,
    }
}

/// What injection did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// Nothing to do (already injected, or opted out); the reason.
    Unchanged(String),
}

/// A pod that asks for something that cannot work; it is admitted unchanged with this as a
/// warning (or refused under `failurePolicy: Fail`).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InjectError {
    /// The annotation or field at fault.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn bad(field: &str, message: impl Into<String>) -> InjectError {
    InjectError {
        field: field.to_string(),
        message: message.into(),
    }
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    ann::value(meta.annotations.as_ref(), key)
}

fn port_annotation(meta: &ObjectMeta, key: &str) -> Result<Option<u16>, InjectError> {
    annotation(meta, key)
        .map(|v| ann::port(v).map_err(|e| bad(&format!("metadata.annotations[{key}]"), e)))
        .transpose()
}

/// The drain time of a pod's sidecar: its annotation, else the setting.
fn drain_seconds(meta: &ObjectMeta, settings: &InjectSettings) -> Result<u32, InjectError> {
    let Some(value) = annotation(meta, ann::DRAIN_SECONDS) else {
        return Ok(settings.drain_seconds);
    };
    value
        .parse::<u32>()
        .ok()
        .filter(|s| *s <= MAX_DRAIN_SECONDS)
        .ok_or_else(|| {
            bad(
                &format!("metadata.annotations[{}]", ann::DRAIN_SECONDS),
                format!("{value:?} is not a number of seconds from 0 to {MAX_DRAIN_SECONDS}"),
            )
        })
}

/// Raises the pod's `terminationGracePeriodSeconds` (Kubernetes' default when unset) to
/// cover a drain of `drain` seconds plus [`DRAIN_EXIT_MARGIN_SECONDS`]; a longer one is kept.
fn cover_drain(spec: &mut PodSpec, drain: u32) {
    if drain == 0 {
        return;
    }
    let needed = i64::from(drain) + DRAIN_EXIT_MARGIN_SECONDS;
    if spec
        .termination_grace_period_seconds
        .unwrap_or(DEFAULT_GRACE_SECONDS)
        < needed
    {
        spec.termination_grace_period_seconds = Some(needed);
    }
}

/// Why `name` is not a DNS-1123 subdomain (what Kubernetes requires of a Secret's name).
fn dns_subdomain_problem(name: &str) -> Option<&'static str> {
    if name.len() > 253 {
        return Some("must be at most 253 characters");
    }
    let label_ok = |label: &str| {
        let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        label.starts_with(alnum)
            && label.ends_with(alnum)
            && label.chars().all(|c| alnum(c) || c == '-')
    };
    (!name.split('.').all(label_ok)).then_some(
        "must be a DNS-1123 subdomain: lowercase letters, digits, '-' and '.', starting and ending with a letter or digit",
    )
}

/// The TLS Secret that applies to a pod of `service`: its annotation (`""`: none), else the
/// setting; `{service}` replaced, and the result checked to be a Secret name.
fn tls_secret(
    meta: &ObjectMeta,
    settings: &InjectSettings,
    service: &str,
) -> Result<Option<String>, InjectError> {
    let from_annotation = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(TLS_SECRET))
        .map(|v| v.trim());
    let (template, field) = match from_annotation {
        Some("") => return Ok(None),
        Some(name) => (name, format!("metadata.annotations[{TLS_SECRET}]")),
        None => match settings.tls_secret.as_deref().map(str::trim) {
            None | Some("") => return Ok(None),
            Some(name) => (name, TLS_SECRET_SETTING.to_string()),
        },
    };
    let name = template.replace(SERVICE_PLACEHOLDER, service);
    match dns_subdomain_problem(&name) {
        None => Ok(Some(name)),
        Some(problem) if name == template => {
            Err(bad(&field, format!("Secret name {name:?} {problem}")))
        }
        Some(problem) => Err(bad(
            &field,
            format!("Secret name {name:?} (from {template:?}) {problem}"),
        )),
    }
}

fn has_sidecar(spec: &PodSpec) -> bool {
    spec.containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .any(|c| c.name == SIDECAR_CONTAINER)
}

/// The service a pod template belongs to, from its annotation or labels (`found` is the
/// MeshService selecting it, when the caller knows one).
pub fn service_name(meta: &ObjectMeta, found: Option<&str>) -> Option<String> {
    annotation(meta, ann::SERVICE)
        .map(str::to_string)
        .or_else(|| found.map(str::to_string))
        .or_else(|| {
            let labels = meta.labels.as_ref()?;
            labels
                .get("app.kubernetes.io/name")
                .or_else(|| labels.get("app"))
                .cloned()
        })
}

/// Injects the sidecar into a pod template (`meta` and `spec` of a Pod, or of a workload's
/// `spec.template`). `found_service` is the MeshService selecting the pod, if known.
#[allow(clippy::too_many_lines)] // the order a sidecar is assembled in; each step is a named builder, and splitting the glue left would only pass the pod from hand to hand.
pub fn inject(
    meta: &mut ObjectMeta,
    spec: &mut PodSpec,
    settings: &InjectSettings,
    found_service: Option<&str>,
) -> Result<Outcome, InjectError> {
    if has_sidecar(spec) {
        return Ok(Outcome::Unchanged("already injected".into()));
    }
    if annotation(meta, INJECT) == Some("false") {
        return Ok(Outcome::Unchanged(format!("{INJECT} is \"false\"")));
    }
    if spec.host_network == Some(true) {
        return Ok(Outcome::Unchanged(
            "hostNetwork pods share the node's ports; not injected".into(),
        ));
    }
    let service = service_name(meta, found_service).ok_or_else(|| {
        bad(
            "metadata.annotations[meshbridge.io/service]",
            "no service name: set the annotation, a MeshService selecting the pod, or label app.kubernetes.io/name or app",
        )
    })?;
    if !crate::model::valid_service_name(&service) {
        return Err(bad(
            ann::SERVICE,
            format!("{service:?} is not a valid service name"),
        ));
    }
    let Ports {
        ingress,
        egress,
        app: app_port,
        named,
    } = ports(meta, spec, settings)?;
    let log_level = annotation(meta, ann::LOG_LEVEL).unwrap_or(&settings.log_level);
    if !LOG_LEVELS.contains(&log_level) {
        return Err(bad(
            "metadata.annotations[meshbridge.io/log-level]",
            format!("{log_level:?} is not one of {}", LOG_LEVELS.join(", ")),
        ));
    }
    let drain = drain_seconds(meta, settings)?;
    let tls_secret = tls_secret(meta, settings, &service)?;
    if tls_secret.is_some() && spec.volumes.iter().flatten().any(|v| v.name == TLS_VOLUME) {
        return Err(bad(
            "spec.volumes",
            format!(
                "a volume named {TLS_VOLUME} already exists; the sidecar's TLS Secret needs that name"
            ),
        ));
    }
    let tls_file = |file: &str| {
        tls_secret
            .as_ref()
            .map(|_| std::path::PathBuf::from(format!("{TLS_DIR}/{file}")))
    };
    let dependencies: Vec<String> = annotation(meta, ann::DEPENDENCIES)
        .map(|d| ann::list(d).map(str::to_string).collect())
        .unwrap_or_default();
    let options = BootstrapOptions {
        service: service.clone(),
        // Replaced per pod by --service-node.
        node_id: service.clone(),
        xds_addr: settings.xds_addr.clone(),
        ingress_port: Some(ingress),
        app_port,
        egress_port: Some(egress),
        admin_port: settings.admin_port,
        ready_port: Some(settings.ready_port),
        diagnostics_port: settings.diagnostics_port,
        diagnostics_allow: settings.diagnostics_allow.clone(),
        dependencies,
        ports: named
            .iter()
            .map(|(name, b)| PortBinding::format(name, b))
            .collect(),
        tls_cert: tls_file("tls.crt"),
        tls_key: tls_file("tls.key"),
        tls_ca: tls_file("ca.crt"),
        xds_tls: settings.xds_tls && tls_secret.is_some(),
        ..Default::default()
    };
    let bootstrap =
        bootstrap_yaml(&options).map_err(|e| bad("metadata.annotations", e.to_string()))?;

    let resources = proxy_resources(meta, settings)?;

    let sidecar = sidecar_container(
        settings,
        &service,
        log_level,
        bootstrap,
        (ingress, resources),
        tls_secret.is_some(),
        (drain > 0).then(|| drain_script(settings.admin_port, drain)),
    );
    cover_drain(spec, drain);

    add_egress_env(
        spec,
        egress,
        annotation(meta, ann::HTTP_PROXY) != Some("false"),
    );

    let redirect = (annotation(meta, ann::TRANSPARENT) == Some("true"))
        .then(|| redirect_container(settings, ingress, egress, &named));
    place_containers(spec, settings.native_sidecar, sidecar, redirect);

    if let Some(secret) = &tls_secret {
        spec.volumes.get_or_insert_default().push(Volume {
            name: TLS_VOLUME.to_string(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.clone()),
                default_mode: Some(TLS_FILE_MODE),
                ..Default::default()
            }),
            ..Default::default()
        });
    }

    mark_injected(meta, settings, ingress, &named, tls_secret);
    Ok(Outcome::Injected)
}

/// The ports of an injected pod.
struct Ports {
    ingress: u16,
    egress: u16,
    /// The application's, from the annotation or the first TCP container port.
    app: Option<u16>,
    /// The sidecar's listeners for the application's further named ports.
    named: BTreeMap<String, PortBinding>,
}

/// First port of the sidecar's listeners for further named ports (one each, upwards).
pub const NAMED_PORT_BASE: u16 = 15100;

/// The sidecar's listeners for the pod's further named ports: the annotation
/// `meshbridge.io/ports` when the pod sets it, else one per named TCP container port other
/// than the application's, on [`NAMED_PORT_BASE`] upwards (skipping `taken`), at most
/// [`MAX_NAMED_PORTS`].
fn named_ports(
    meta: &ObjectMeta,
    spec: &PodSpec,
    app_port: Option<u16>,
    taken: &[u16],
) -> Result<BTreeMap<String, PortBinding>, InjectError> {
    if let Some(value) = annotation(meta, PORTS) {
        return PortBinding::parse_all(ann::list(value))
            .map_err(|e| bad(&format!("metadata.annotations[{PORTS}]"), e));
    }
    let mut out = BTreeMap::new();
    let mut next = NAMED_PORT_BASE;
    for p in spec
        .containers
        .iter()
        .flat_map(|c| c.ports.iter().flatten())
    {
        let (Some(name), Ok(app)) = (p.name.as_deref(), u16::try_from(p.container_port)) else {
            continue;
        };
        if p.protocol.as_deref().unwrap_or("TCP") != "TCP"
            || Some(app) == app_port
            || !valid_port_name(name)
            || out.contains_key(name)
            || out.len() == MAX_NAMED_PORTS
        {
            continue;
        }
        while taken.contains(&next) || out.values().any(|b: &PortBinding| b.app_port == next) {
            next += 1;
        }
        out.insert(
            name.to_string(),
            PortBinding {
                ingress_port: next,
                app_port: app,
            },
        );
        next += 1;
    }
    Ok(out)
}

/// The pod's ports, each used once among the sidecar's and the application's.
fn ports(
    meta: &ObjectMeta,
    spec: &PodSpec,
    settings: &InjectSettings,
) -> Result<Ports, InjectError> {
    let ingress = port_annotation(meta, INGRESS_PORT)?.unwrap_or(settings.ingress_port);
    let egress = port_annotation(meta, ann::EGRESS_PORT)?.unwrap_or(settings.egress_port);
    let app_port = match port_annotation(meta, ann::APP_PORT)? {
        Some(p) => Some(p),
        None => spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .find(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .and_then(|p| u16::try_from(p.container_port).ok()),
    };
    let reserved = [
        Some(ingress),
        Some(egress),
        Some(settings.admin_port),
        Some(settings.ready_port),
        settings.diagnostics_port,
    ];
    for (i, p) in reserved.iter().enumerate() {
        let Some(p) = p else { continue };
        if reserved[..i].contains(&Some(*p)) || app_port == Some(*p) {
            return Err(bad(
                "metadata.annotations",
                format!(
                    "port {p} is used twice (application {app_port:?}, ingress {ingress}, egress {egress}, admin {}, ready {}, diagnostics {:?})",
                    settings.admin_port, settings.ready_port, settings.diagnostics_port
                ),
            ));
        }
    }
    let named = named_ports(
        meta,
        spec,
        app_port,
        &reserved.iter().flatten().copied().collect::<Vec<_>>(),
    )?;
    for (name, b) in &named {
        let p = b.ingress_port;
        if reserved.contains(&Some(p))
            || app_port == Some(p)
            || named
                .iter()
                .any(|(other, o)| other != name && (o.ingress_port == p || o.app_port == p))
        {
            return Err(bad(
                &format!("metadata.annotations[{PORTS}]"),
                format!("port {p} of {name} is used twice (the sidecar's or the application's)"),
            ));
        }
    }
    Ok(Ports {
        ingress,
        egress,
        app: app_port,
        named,
    })
}

/// Labels and annotates an injected pod: the sidecar label, the image, the ingress port and
/// the TLS Secret mounted (what the Kubernetes source reads back).
fn mark_injected(
    meta: &mut ObjectMeta,
    settings: &InjectSettings,
    ingress: u16,
    named: &BTreeMap<String, PortBinding>,
    tls_secret: Option<String>,
) {
    // Selects injected pods, e.g. for a PodMonitor scraping the sidecars' metrics.
    meta.labels
        .get_or_insert_default()
        .insert(SIDECAR_LABEL.to_string(), "injected".to_string());
    let annotations = meta.annotations.get_or_insert_default();
    annotations.insert(INJECTED.to_string(), settings.image.clone());
    annotations.insert(INGRESS_PORT.to_string(), ingress.to_string());
    if !named.is_empty() {
        let list: Vec<String> = named
            .iter()
            .map(|(name, b)| PortBinding::format(name, b))
            .collect();
        annotations.insert(PORTS.to_string(), list.join(","));
    }
    if let Some(secret) = tls_secret {
        annotations.insert(TLS_SECRET.to_string(), secret);
    }
}

/// The JSON Patch (RFC 6902) turning `before` into `after`: one `add` (which replaces an
/// existing member) per top-level field of `metadata` and `spec` that differs.
pub fn json_patch(before: &serde_json::Value, after: &serde_json::Value) -> serde_json::Value {
    let mut ops = Vec::new();
    for section in ["metadata", "spec"] {
        let (b, a) = (&before[section], &after[section]);
        let Some(fields) = a.as_object() else {
            continue;
        };
        for (key, value) in fields {
            if b.get(key) != Some(value) {
                let path = format!("/{section}/{}", key.replace('~', "~0").replace('/', "~1"));
                ops.push(serde_json::json!({"op": "add", "path": path, "value": value}));
            }
        }
    }
    serde_json::Value::Array(ops)
}

#[cfg(test)]
mod tests {
    use super::{dns_subdomain_problem, supports_native_sidecars};

    #[test]
    fn secret_names_are_dns_1123_subdomains() {
        for ok in [
            "orders-tls",
            "a",
            "orders.mesh-tls",
            "0rders9",
            &"a".repeat(253),
        ] {
            assert_eq!(dns_subdomain_problem(ok), None, "{ok}");
        }
        for bad in [
            "",
            "Orders",
            "orders_tls",
            "-orders",
            "orders-",
            "orders..tls",
            ".orders",
            "orders tls",
            "{service}-tls",
            &"a".repeat(254),
        ] {
            assert!(dns_subdomain_problem(bad).is_some(), "{bad:?}");
        }
    }

    #[test]
    fn native_sidecars_from_kubernetes_1_29() {
        assert!(!supports_native_sidecars("1", "28"));
        assert!(!supports_native_sidecars("1", "27+"));
        assert!(supports_native_sidecars("1", "29"));
        assert!(supports_native_sidecars("1", "34+"));
        assert!(supports_native_sidecars("2", "0"));
        assert!(
            supports_native_sidecars("", ""),
            "unknown: assume a current cluster"
        );
    }
}
