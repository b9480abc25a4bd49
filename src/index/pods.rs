//! Pods → endpoints (pure).
//!
//! A pod selected by a MeshService is an endpoint while it has `status.podIP`, phase
//! `Running`, condition `Ready=True` and no `deletionTimestamp`. Its port is the sidecar's
//! ingress port when the pod carries the injected sidecar, otherwise the MeshService's first
//! port's `targetPort` (default: `port`). A selected pod with an IP that is not ready is
//! listed unhealthy (no traffic), as Consul instances with failing checks are. A pod whose
//! injected sidecar holds certificates (annotation `meshbridge.io/tls-secret`, non-empty, set
//! by the injector) gets the tag `mtls`: callers originate mutual TLS to it. Only the few
//! fields meshbridge needs are kept, so thousands of pods cost little memory.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Pod;

use crate::api::annotations::{self as ann, INGRESS_PORT, PORTS, TAGS, TLS_SECRET};
use crate::api::mesh_service::MeshServiceSpec;
use crate::api::{DEFAULT_INGRESS_PORT, SIDECAR_CONTAINER};
use crate::model::{Endpoint, MTLS_TAG, Origin, PortBinding, valid_port_name};

/// What meshbridge keeps of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// `status.podIP`.
    pub ip: Option<String>,
    /// Running, `Ready=True`, not terminating.
    pub ready: bool,
    /// The sidecar's ingress port when the pod carries the injected sidecar.
    pub sidecar_port: Option<u16>,
    /// The sidecar's listeners for the pod's further named ports (annotation
    /// `meshbridge.io/ports`), by port name.
    pub sidecar_ports: BTreeMap<String, u16>,
    /// Tags from the `meshbridge.io/tags` annotation.
    pub tags: BTreeSet<String>,
    /// The pod carries the injected sidecar and it holds certificates (non-empty annotation
    /// `meshbridge.io/tls-secret`): its endpoint accepts mutual TLS.
    pub tls: bool,
}

/// Extracts what meshbridge needs from a pod.
pub fn pod_info(pod: &Pod) -> PodInfo {
    let meta = &pod.metadata;
    let annotations = meta.annotations.as_ref();
    let status = pod.status.as_ref();
    let running = status.and_then(|s| s.phase.as_deref()) == Some("Running");
    let ready_condition = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let ip = status
        .and_then(|s| s.pod_ip.clone())
        .filter(|ip| !ip.is_empty());
    let has_sidecar = pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_CONTAINER)
    });
    let sidecar_port = has_sidecar.then(|| {
        ann::value(annotations, INGRESS_PORT)
            .and_then(|p| ann::port(p).ok())
            .unwrap_or(DEFAULT_INGRESS_PORT)
    });
    // Written by the injector; unreadable (edited by hand) means no further port is served.
    let sidecar_ports = ann::value(annotations, PORTS)
        .filter(|_| has_sidecar)
        .and_then(|v| PortBinding::parse_all(ann::list(v)).ok())
        .map(|ports| {
            ports
                .into_iter()
                .map(|(name, b)| (name, b.ingress_port))
                .collect()
        })
        .unwrap_or_default();
    let tls = has_sidecar && ann::value(annotations, TLS_SECRET).is_some();
    let tags = ann::value(annotations, TAGS)
        .map(|t| ann::list(t).map(str::to_string).collect())
        .unwrap_or_default();
    PodInfo {
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        labels: meta.labels.clone().unwrap_or_default(),
        ready: running && ready_condition && ip.is_some() && meta.deletion_timestamp.is_none(),
        ip,
        sidecar_port,
        sidecar_ports,
        tags,
        tls,
    }
}

/// Whether `selector` selects a pod with `labels`. An absent or empty selector selects
/// nothing (a MeshService without a selector has no pods, unlike a label query).
pub fn selects(
    selector: Option<&BTreeMap<String, String>>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.is_some_and(|s| !s.is_empty() && s.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Why a selected pod is not an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotAnEndpoint {
    /// Not running, not ready, terminating or without an IP.
    NotReady,
    /// Neither a sidecar nor a port in the MeshService.
    NoPort,
}

/// The endpoint a selected pod gives a MeshService: healthy while the pod is ready, listed
/// unhealthy (no traffic, but shown in `/api/services`) while it has an IP and is not.
pub fn pod_instance(spec: &MeshServiceSpec, pod: &PodInfo) -> Option<Endpoint> {
    let as_ready = PodInfo {
        ready: true,
        ..pod.clone()
    };
    pod_endpoint(spec, &as_ready).ok().map(|e| Endpoint {
        healthy: pod.ready,
        ..e
    })
}

/// The endpoint a selected, ready pod gives a MeshService.
pub fn pod_endpoint(spec: &MeshServiceSpec, pod: &PodInfo) -> Result<Endpoint, NotAnEndpoint> {
    let (Some(ip), true) = (&pod.ip, pod.ready) else {
        return Err(NotAnEndpoint::NotReady);
    };
    let port = match pod.sidecar_port {
        Some(p) => p,
        None => spec
            .ports
            .first()
            .map(|p| p.target_port.unwrap_or(p.port))
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
            .ok_or(NotAnEndpoint::NoPort)?,
    };
    let mut tags = pod.tags.clone();
    if pod.tls {
        tags.insert(MTLS_TAG.to_string());
    }
    // The further ports the MeshService declares: through the sidecar's listener for the
    // pod's container port of that name, or straight to the target port without a sidecar
    // (a port the sidecar has no listener for is not served: going around the sidecar would
    // skip its access rules).
    let ports = spec
        .ports
        .iter()
        .skip(1)
        .filter_map(|p| {
            let name = p.name.as_deref().filter(|n| valid_port_name(n))?;
            let port = match pod.sidecar_port {
                Some(_) => *pod.sidecar_ports.get(name)?,
                None => u16::try_from(p.target_port.unwrap_or(p.port))
                    .ok()
                    .filter(|p| *p != 0)?,
            };
            Some((name.to_string(), port))
        })
        .collect();
    Ok(Endpoint {
        address: ip.clone(),
        port,
        origin: Origin::Kubernetes,
        datacenter: None,
        weight: Endpoint::weight_from_tags(&pod.tags).unwrap_or(1),
        tags,
        healthy: true,
        ports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::mesh_service::ServicePort;
    use serde_json::json;

    fn pod(v: serde_json::Value) -> PodInfo {
        pod_info(&serde_json::from_value(v).unwrap())
    }

    fn ready_pod(extra: serde_json::Value) -> serde_json::Value {
        let mut p = json!({
            "metadata": {"name": "orders-1", "namespace": "shop", "labels": {"app": "orders"}},
            "spec": {"containers": [{"name": "app"}]},
            "status": {"phase": "Running", "podIP": "10.0.0.7",
                       "conditions": [{"type": "Ready", "status": "True"}]}
        });
        merge(&mut p, extra);
        p
    }

    fn merge(a: &mut serde_json::Value, b: serde_json::Value) {
        match (a, b) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (a, b) => *a = b,
        }
    }

    fn spec(port: u32, target: Option<u32>) -> MeshServiceSpec {
        MeshServiceSpec {
            ports: vec![ServicePort {
                port,
                target_port: target,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn further_ports_go_through_the_sidecars_listener_or_straight_to_the_target_port() {
        let mut spec = spec(80, None);
        spec.ports.push(ServicePort {
            name: Some("admin".into()),
            port: 9090,
            target_port: Some(8081),
            ..Default::default()
        });
        spec.ports.push(ServicePort {
            name: Some("db".into()),
            port: 5432,
            ..Default::default()
        });
        let bare = pod_endpoint(&spec, &pod(ready_pod(json!({})))).unwrap();
        assert_eq!(
            bare.ports,
            BTreeMap::from([("admin".into(), 8081), ("db".into(), 5432)])
        );
        // With the sidecar: only the ports it has a listener for (the injector's annotation);
        // going around it would skip its access rules.
        let injected = pod(ready_pod(json!({
            "metadata": {"annotations": {"meshbridge.io/ports": "admin=15100:8081,metrics=15101:9102"}},
            "spec": {"containers": [{"name": "app"}, {"name": SIDECAR_CONTAINER}]},
        })));
        let e = pod_endpoint(&spec, &injected).unwrap();
        assert_eq!(e.port, DEFAULT_INGRESS_PORT);
        assert_eq!(e.ports, BTreeMap::from([("admin".into(), 15100)]));
        // An annotation edited into nonsense serves no further port.
        let edited = pod(ready_pod(json!({
            "metadata": {"annotations": {"meshbridge.io/ports": "admin=x"}},
            "spec": {"containers": [{"name": "app"}, {"name": SIDECAR_CONTAINER}]},
        })));
        assert!(pod_endpoint(&spec, &edited).unwrap().ports.is_empty());
    }

    #[test]
    fn a_ready_pod_without_sidecar_is_reached_on_the_target_port() {
        let e = pod_endpoint(&spec(80, Some(8080)), &pod(ready_pod(json!({})))).unwrap();
        assert_eq!(
            (e.address.as_str(), e.port, e.origin),
            ("10.0.0.7", 8080, Origin::Kubernetes)
        );
        let e = pod_endpoint(&spec(80, None), &pod(ready_pod(json!({})))).unwrap();
        assert_eq!(e.port, 80);
    }

    #[test]
    fn an_injected_pod_is_reached_through_its_sidecar() {
        let injected = ready_pod(
            json!({"spec": {"containers": [{"name": "app"}, {"name": SIDECAR_CONTAINER}]}}),
        );
        assert_eq!(
            pod_endpoint(&spec(80, None), &pod(injected.clone()))
                .unwrap()
                .port,
            DEFAULT_INGRESS_PORT
        );
        let mut custom = injected;
        merge(
            &mut custom,
            json!({"metadata": {"annotations": {INGRESS_PORT: "31000"}}}),
        );
        assert_eq!(
            pod_endpoint(&MeshServiceSpec::default(), &pod(custom))
                .unwrap()
                .port,
            31000
        );
        // A native sidecar (init container with restartPolicy Always) counts too.
        let native = ready_pod(
            json!({"spec": {"initContainers": [{"name": SIDECAR_CONTAINER, "restartPolicy": "Always"}]}}),
        );
        assert_eq!(pod(native).sidecar_port, Some(DEFAULT_INGRESS_PORT));
    }

    #[test]
    fn only_running_ready_live_pods_with_an_ip_are_endpoints() {
        let s = spec(80, None);
        for (why, extra) in [
            ("pending", json!({"status": {"phase": "Pending"}})),
            (
                "not ready",
                json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
            ),
            ("no ip", json!({"status": {"podIP": ""}})),
            (
                "terminating",
                json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}}),
            ),
        ] {
            assert_eq!(
                pod_endpoint(&s, &pod(ready_pod(extra))),
                Err(NotAnEndpoint::NotReady),
                "{why}"
            );
        }
        assert_eq!(
            pod_endpoint(&MeshServiceSpec::default(), &pod(ready_pod(json!({})))),
            Err(NotAnEndpoint::NoPort)
        );
    }

    #[test]
    fn a_pod_with_an_ip_that_is_not_ready_is_listed_unhealthy() {
        let s = spec(80, None);
        let unready = pod(ready_pod(
            json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}}),
        ));
        let e = pod_instance(&s, &unready).unwrap();
        assert!(!e.healthy);
        assert!(
            pod_instance(&s, &pod(ready_pod(json!({}))))
                .unwrap()
                .healthy
        );
        assert!(pod_instance(&s, &pod(ready_pod(json!({"status": {"podIP": ""}})))).is_none());
    }

    #[test]
    fn tags_come_from_the_annotation_with_their_consul_meaning() {
        let p = pod(ready_pod(
            json!({"metadata": {"annotations": {TAGS: "canary, weight:5,"}}}),
        ));
        let e = pod_endpoint(&spec(80, None), &p).unwrap();
        assert!(e.is_canary());
        assert_eq!(e.weight, 5);
    }

    #[test]
    fn an_injected_pod_holding_certificates_is_an_mtls_endpoint() {
        let s = spec(80, None);
        let injected = |annotations: serde_json::Value| {
            pod(ready_pod(json!({
                "metadata": {"annotations": annotations},
                "spec": {"initContainers": [{"name": SIDECAR_CONTAINER, "restartPolicy": "Always"}]}
            })))
        };
        let with_tls = injected(json!({TLS_SECRET: "orders-tls", TAGS: "canary"}));
        assert!(with_tls.tls);
        let e = pod_endpoint(&s, &with_tls).unwrap();
        assert!(e.tags.contains(MTLS_TAG), "{:?}", e.tags);
        assert!(e.is_canary(), "its own tags are kept");
        assert_eq!(e.port, DEFAULT_INGRESS_PORT);
        assert!(
            pod_instance(&s, &with_tls).unwrap().tags.contains(MTLS_TAG),
            "unhealthy listing too"
        );

        // No certificates: an empty annotation (TLS turned off for the pod) or none at all.
        for annotations in [
            json!({TLS_SECRET: ""}),
            json!({TLS_SECRET: "  "}),
            json!({}),
        ] {
            let p = injected(annotations.clone());
            assert!(!p.tls, "{annotations}");
            assert!(
                !pod_endpoint(&s, &p).unwrap().tags.contains(MTLS_TAG),
                "{annotations}"
            );
        }
        // Without the sidecar nothing terminates TLS for the pod, whatever it says.
        let bare = pod(ready_pod(
            json!({"metadata": {"annotations": {TLS_SECRET: "orders-tls"}}}),
        ));
        assert!(!bare.tls);
        let e = pod_endpoint(&s, &bare).unwrap();
        assert!(!e.tags.contains(MTLS_TAG));
        assert_eq!(e.port, 80);
    }

    #[test]
    fn selectors_match_all_labels_and_empty_selects_nothing() {
        let labels: BTreeMap<_, _> = [
            ("app".to_string(), "orders".to_string()),
            ("tier".to_string(), "web".to_string()),
        ]
        .into();
        let sel = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(selects(Some(&sel(&[("app", "orders")])), &labels));
        assert!(!selects(
            Some(&sel(&[("app", "orders"), ("tier", "db")])),
            &labels
        ));
        assert!(!selects(Some(&sel(&[])), &labels));
        assert!(!selects(None, &labels));
    }
}
