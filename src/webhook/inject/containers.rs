//! The containers of an injected pod: the sidecar (Envoy with its bootstrap, ports, probes,
//! resources and certificate mount), the iptables init container of transparent mode, and
//! the application containers' egress environment.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, ExecAction, HTTPGetAction,
    Lifecycle, LifecycleHandler, ObjectFieldSelector, PodSpec, Probe, ResourceRequirements,
    SecurityContext, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    INIT_CONTAINER, InjectError, InjectSettings, PROXY_UID, TLS_DIR, TLS_VOLUME, annotation, bad,
};
use crate::api::SIDECAR_CONTAINER;
use crate::api::annotations as ann;
use crate::model::PortBinding;

/// The sidecar's resource requests and limits: the annotations', else the settings'.
pub(super) fn proxy_resources(
    meta: &ObjectMeta,
    settings: &InjectSettings,
) -> Result<ResourceRequirements, InjectError> {
    let quantity = |key: &str, default: &str| -> Result<Quantity, InjectError> {
        let v = annotation(meta, key).unwrap_or(default);
        if v.is_empty()
            || !v
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit() || c == '.')
        {
            return Err(bad(
                &format!("metadata.annotations[{key}]"),
                format!("{v:?} is not a quantity"),
            ));
        }
        Ok(Quantity(v.to_string()))
    };
    let mut requests = BTreeMap::new();
    requests.insert("cpu".to_string(), quantity(ann::PROXY_CPU, &settings.cpu)?);
    requests.insert(
        "memory".to_string(),
        quantity(ann::PROXY_MEMORY, &settings.memory)?,
    );
    let mut limits = BTreeMap::new();
    limits.insert(
        "memory".to_string(),
        quantity(ann::PROXY_MEMORY_LIMIT, &settings.memory_limit)?,
    );
    if let Some(cpu) = annotation(meta, ann::PROXY_CPU_LIMIT) {
        limits.insert("cpu".to_string(), quantity(ann::PROXY_CPU_LIMIT, cpu)?);
    }
    Ok(ResourceRequirements {
        requests: Some(requests),
        limits: Some(limits),
        ..Default::default()
    })
}

/// The Envoy container: `bootstrap` as its configuration, probes on the ready port, the
/// proxy's user, the TLS volume mounted when the pod has a certificate, and `drain` (the
/// drain script) as its `preStop` hook.
pub(super) fn sidecar_container(
    settings: &InjectSettings,
    service: &str,
    log_level: &str,
    bootstrap: String,
    (ingress, resources): (u16, ResourceRequirements),
    tls: bool,
    drain: Option<String>,
) -> Container {
    let field_env = |name: &str, path: &str| EnvVar {
        name: name.to_string(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_string(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let port = |name: &str, p: u16| ContainerPort {
        name: Some(name.to_string()),
        container_port: i32::from(p),
        protocol: Some("TCP".to_string()),
        ..Default::default()
    };
    Container {
        name: SIDECAR_CONTAINER.to_string(),
        image: Some(settings.image.clone()),
        args: Some(vec![
            "--config-yaml".into(),
            bootstrap,
            "--service-node".into(),
            "$(POD_NAME).$(POD_NAMESPACE)".into(),
            "--service-cluster".into(),
            service.to_string(),
            "--log-level".into(),
            log_level.to_string(),
            "--disable-hot-restart".into(),
        ]),
        command: Some(vec!["envoy".into()]),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
        ]),
        ports: Some(
            [
                Some(port("mesh-ingress", ingress)),
                Some(port("mesh-ready", settings.ready_port)),
                settings.diagnostics_port.map(|p| port("mesh-diag", p)),
            ]
            .into_iter()
            .flatten()
            .collect(),
        ),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::Int(i32::from(settings.ready_port)),
                ..Default::default()
            }),
            period_seconds: Some(2),
            failure_threshold: Some(30),
            ..Default::default()
        }),
        startup_probe: settings.native_sidecar.then(|| Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/ready".into()),
                port: IntOrString::Int(i32::from(settings.ready_port)),
                ..Default::default()
            }),
            period_seconds: Some(1),
            failure_threshold: Some(120),
            ..Default::default()
        }),
        resources: Some(resources),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        // Native or classic, Kubernetes runs this when the pod starts terminating and sends
        // Envoy SIGTERM only once it has returned (a native sidecar's, moreover, only once
        // every application container has exited).
        lifecycle: drain.map(|script| Lifecycle {
            pre_stop: Some(LifecycleHandler {
                exec: Some(ExecAction {
                    command: Some(vec!["bash".into(), "-c".into(), script]),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        restart_policy: settings.native_sidecar.then(|| "Always".to_string()),
        volume_mounts: tls.then(|| {
            vec![VolumeMount {
                name: TLS_VOLUME.to_string(),
                mount_path: TLS_DIR.to_string(),
                read_only: Some(true),
                ..Default::default()
            }]
        }),
        ..Default::default()
    }
}

/// Points the application containers at the egress listener (their own settings win).
pub(super) fn add_egress_env(spec: &mut PodSpec, egress: u16, http_proxy: bool) {
    let egress_addr = format!("127.0.0.1:{egress}");
    for c in &mut spec.containers {
        let env = c.env.get_or_insert_default();
        let mut add = |name: &str, value: &str| {
            if !env.iter().any(|e| e.name == name) {
                env.push(EnvVar {
                    name: name.to_string(),
                    value: Some(value.to_string()),
                    ..Default::default()
                });
            }
        };
        add("MESHBRIDGE_EGRESS_ADDR", &egress_addr);
        if http_proxy {
            let url = format!("http://{egress_addr}");
            add("HTTP_PROXY", &url);
            add("http_proxy", &url);
            add("NO_PROXY", "localhost,127.0.0.1,::1");
            add("no_proxy", "localhost,127.0.0.1,::1");
        }
    }
}

/// Adds the sidecar (first of the init containers when native, else first of the
/// containers) and the traffic redirection (`redirect`) to the pod.
pub(super) fn place_containers(
    spec: &mut PodSpec,
    native_sidecar: bool,
    sidecar: Container,
    redirect: Option<Container>,
) {
    let mut init: Vec<Container> = redirect.into_iter().collect();
    if native_sidecar {
        init.push(sidecar);
        let existing = spec.init_containers.take().unwrap_or_default();
        init.extend(existing);
        spec.init_containers = Some(init);
    } else {
        // The sidecar is not running yet while init containers run: the redirection goes
        // last, so their traffic is not sent to a listener that does not exist yet.
        if !init.is_empty() {
            let mut all = spec.init_containers.take().unwrap_or_default();
            all.extend(init);
            spec.init_containers = Some(all);
        }
        spec.containers.insert(0, sidecar);
    }
}

/// The init container redirecting inbound TCP to the ingress listener and outbound port-80
/// traffic to the egress listener, except the sidecar's own (user 1337) and loopback traffic.
pub(super) fn redirect_container(
    settings: &InjectSettings,
    ingress: u16,
    egress: u16,
    named: &BTreeMap<String, PortBinding>,
) -> Container {
    let admin = settings.admin_port;
    let ready = settings.ready_port;
    let mut diagnostics = settings
        .diagnostics_port
        .map(|p| format!("iptables -t nat -A MESHBRIDGE_IN -p tcp --dport {p} -j RETURN\n"))
        .unwrap_or_default();
    // A further named port: its listener is reached as it is, and its application port
    // through that listener (not the first port's).
    for b in named.values() {
        diagnostics.push_str(&format!(
            "iptables -t nat -A MESHBRIDGE_IN -p tcp --dport {} -j RETURN\n\
             iptables -t nat -A MESHBRIDGE_IN -p tcp --dport {} -j REDIRECT --to-ports {}\n",
            b.ingress_port, b.app_port, b.ingress_port
        ));
    }
    // Idempotent: a restarted init container (same network namespace) finds its chains.
    let script = format!(
        "set -e\n\
         iptables -t nat -N MESHBRIDGE_IN 2>/dev/null || iptables -t nat -F MESHBRIDGE_IN\n\
         iptables -t nat -A MESHBRIDGE_IN -p tcp --dport {ingress} -j RETURN\n\
         iptables -t nat -A MESHBRIDGE_IN -p tcp --dport {ready} -j RETURN\n\
         iptables -t nat -A MESHBRIDGE_IN -p tcp --dport {admin} -j RETURN\n\
         {diagnostics}\
         iptables -t nat -A MESHBRIDGE_IN -p tcp -j REDIRECT --to-ports {ingress}\n\
         iptables -t nat -C PREROUTING -p tcp -j MESHBRIDGE_IN 2>/dev/null || iptables -t nat -A PREROUTING -p tcp -j MESHBRIDGE_IN\n\
         iptables -t nat -N MESHBRIDGE_OUT 2>/dev/null || iptables -t nat -F MESHBRIDGE_OUT\n\
         iptables -t nat -A MESHBRIDGE_OUT -m owner --uid-owner {PROXY_UID} -j RETURN\n\
         iptables -t nat -A MESHBRIDGE_OUT -d 127.0.0.1/32 -j RETURN\n\
         iptables -t nat -A MESHBRIDGE_OUT -p tcp --dport 80 -j REDIRECT --to-ports {egress}\n\
         iptables -t nat -C OUTPUT -p tcp -j MESHBRIDGE_OUT 2>/dev/null || iptables -t nat -A OUTPUT -p tcp -j MESHBRIDGE_OUT\n"
    );
    Container {
        name: INIT_CONTAINER.to_string(),
        image: Some(settings.init_image.clone()),
        command: Some(vec!["sh".into(), "-c".into(), script]),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_non_root: Some(false),
            allow_privilege_escalation: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".into(), "NET_RAW".into()]),
                drop: Some(vec!["ALL".into()]),
            }),
            ..Default::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_string(), Quantity("10m".into())),
                ("memory".to_string(), Quantity("16Mi".into())),
            ])),
            limits: Some(BTreeMap::from([(
                "memory".to_string(),
                Quantity("64Mi".into()),
            )])),
            ..Default::default()
        }),
        ..Default::default()
    }
}
