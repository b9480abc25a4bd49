//! Every Envoy resource name meshbridge generates, built in one place.
//!
//! Mesh service clusters carry the plain service name (readable Envoy stats); every other
//! name contains `|`, which a valid service name cannot, so the two never collide.

use crate::model::{ClusterPolicy, ExternalDomain};

/// Listener accepting calls to the local service.
pub const INGRESS_LISTENER: &str = "ingress";
/// Listener on 127.0.0.1 through which the local application calls its dependencies.
pub const EGRESS_LISTENER: &str = "egress";
/// Listener on 127.0.0.1 through which the local application reaches the `tcp` service
/// `service` (one port per such dependency).
pub fn tcp_egress_listener(service: &str) -> String {
    format!("{TCP_EGRESS_PREFIX}{service}")
}

const TCP_EGRESS_PREFIX: &str = "egress|tcp|";

/// The service of a [`tcp_egress_listener`] name.
pub fn tcp_egress_service(listener: &str) -> Option<&str> {
    listener.strip_prefix(TCP_EGRESS_PREFIX)
}
/// Route configuration of the ingress listener.
pub const INGRESS_ROUTE: &str = "ingress";

/// `base` for the ingress of `service`'s first port, `base|PORT` for the ingress of its
/// further port `service:PORT`.
fn per_port(base: &str, service: &str) -> String {
    match crate::model::split_port_service(service) {
        (_, Some(port)) => format!("{base}|{port}"),
        (_, None) => base.to_string(),
    }
}

/// The ingress listener serving `service` (a service or one of its ports, `NAME:PORT`).
pub fn ingress_listener(service: &str) -> String {
    per_port(INGRESS_LISTENER, service)
}

/// The route configuration of [`ingress_listener`].
pub fn ingress_route(service: &str) -> String {
    per_port(INGRESS_ROUTE, service)
}

/// The cluster of the local application behind [`ingress_listener`].
pub fn local_app_cluster(service: &str) -> String {
    per_port(LOCAL_APP_CLUSTER, service)
}
/// Route configuration of the egress listener.
pub const EGRESS_ROUTE: &str = "egress";
/// Cluster of the local application (`127.0.0.1:app_port`).
pub const LOCAL_APP_CLUSTER: &str = "local|app";
/// Virtual host answering calls to undeclared services.
pub const UNDECLARED_VHOST: &str = "undeclared|*";
/// Response header carrying the reason of a local reply.
pub const REASON_HEADER: &str = "x-meshbridge-reason";
/// Request header asking for a canary instance.
pub const CANARY_HEADER: &str = "x-canary";
/// Request header carrying the caller's service name to the application (set by the callee's
/// proxy; a value sent by the caller is removed unless the caller may assert identities).
pub const IDENTITY_HEADER: &str = "x-client-name";
/// Dynamic metadata namespace of the identity filter (`caller`, `identity`), for access logs.
pub const IDENTITY_METADATA: &str = "meshbridge";
/// Endpoint metadata key (under `envoy.transport_socket_match`) marking instances that are
/// called over mutual TLS.
pub const MTLS_MATCH: &str = "mtls";

/// Ingress route of the requests under the rate limit of path prefix `prefix`.
pub fn rate_limited_route(prefix: &str) -> String {
    format!("rate-limit|{prefix}")
}

/// The SPIFFE id of a service: `spiffe://<trust-domain>/service/<name>`.
pub fn spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/service/{service}")
}

/// The prefix every SPIFFE id of the trust domain's services starts with.
pub fn spiffe_prefix(trust_domain: &str) -> String {
    format!("spiffe://{trust_domain}/service/")
}

/// Cluster of all healthy instances of a mesh service.
pub fn service_cluster(service: &str) -> String {
    service.to_string()
}

/// Cluster of the canary instances of a mesh service.
pub fn canary_cluster(service: &str) -> String {
    format!("{service}|canary")
}

/// Cluster of the instances of a migrating service's new origin, which a share of requests
/// is copied to (`spec.migration.mirror`).
pub fn mirror_cluster(service: &str) -> String {
    format!("{service}{MIRROR_SUFFIX}")
}

const MIRROR_SUFFIX: &str = "|mirror";

/// The service a mesh cluster (or a variant of one) belongs to, and whether it is the
/// mirror cluster: what a load report about the cluster is about.
pub fn cluster_service(cluster: &str) -> (&str, bool) {
    let service = cluster.split('|').next().unwrap_or(cluster);
    let mirror = cluster[service.len()..].starts_with(MIRROR_SUFFIX);
    (service, mirror)
}

/// Variant of the mesh cluster `cluster` for callers whose dependency sets another
/// outlier detection, circuit breakers or header case: `orders|o-<hash of the policy>`. Callers with the
/// same policy get the same name, and the name stays the same from one run to the next.
pub fn policy_cluster(cluster: &str, policy: &ClusterPolicy) -> String {
    let (o, c) = (&policy.outlier_detection, &policy.circuit_breakers);
    let mut canonical = format!(
        "{}/{}/{}/{}/{}/{}/{}/{}/{}",
        o.consecutive_5xx,
        o.consecutive_gateway_failure,
        o.interval.as_nanos(),
        o.base_ejection_time.as_nanos(),
        o.max_ejection_percent,
        c.max_connections,
        c.max_pending_requests,
        c.max_requests,
        c.max_retries,
    );
    // Appended only when set, so that the names of the other variants stay as they were.
    if let Some(keep) = policy.preserve_header_case {
        canonical.push_str(&format!("/case={keep}"));
    }
    let hash = xxhash_rust::xxh3::xxh3_64(canonical.as_bytes());
    format!("{cluster}|o-{:08x}", hash >> 32)
}

/// The endpoint assignment a cluster reads: its own name, or for a policy variant (see
/// [`policy_cluster`]) the shared cluster's.
pub fn cluster_assignment(cluster: &str) -> &str {
    match cluster.rsplit_once("|o-") {
        Some((shared, hash)) if hash.len() == 8 && hash.bytes().all(|b| b.is_ascii_hexdigit()) => {
            shared
        }
        _ => cluster,
    }
}

/// Cluster of an external domain.
pub fn domain_cluster(domain: &ExternalDomain) -> String {
    let scheme = if domain.tls { "https" } else { "http" };
    format!("ext|{scheme}|{}|{}", domain.host, domain.port)
}

/// Cluster of the tunnels to an `https://` external domain: plain TCP to its host and port,
/// for the client's own TLS inside a `CONNECT` through the egress listener.
pub fn domain_tunnel_cluster(domain: &ExternalDomain) -> String {
    format!("ext|tunnel|{}|{}", domain.host, domain.port)
}

/// The authority a `CONNECT` to an external domain names: `host:port`.
pub fn domain_authority(domain: &ExternalDomain) -> String {
    format!("{}:{}", domain.host, domain.port)
}

/// Virtual host of an external domain in the egress route configuration.
pub fn domain_vhost(domain: &ExternalDomain) -> String {
    format!("ext|{}", domain.host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_variant_reads_the_assignment_of_the_cluster_it_varies() {
        let policy = ClusterPolicy {
            outlier_detection: crate::model::OutlierDetection {
                consecutive_5xx: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        for shared in ["orders", "orders|canary", "o-1234abcd"] {
            let variant = policy_cluster(shared, &policy);
            assert_ne!(variant, shared);
            assert_eq!(cluster_assignment(&variant), shared);
            assert_eq!(cluster_assignment(shared), shared);
        }
        // A header-case override is another variant, and the names of the others stay.
        let keep = ClusterPolicy {
            preserve_header_case: Some(true),
            ..policy
        };
        assert_ne!(
            policy_cluster("orders", &keep),
            policy_cluster("orders", &policy)
        );
        // Same policy, same name; another policy, another name.
        assert_eq!(
            policy_cluster("orders", &policy),
            policy_cluster("orders", &policy.clone())
        );
        assert_ne!(
            policy_cluster("orders", &policy),
            policy_cluster("orders", &ClusterPolicy::default())
        );
        assert_eq!(cluster_assignment("local|app"), "local|app");
    }
}
