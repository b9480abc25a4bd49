//! Clusters and endpoint assignments.

use std::collections::BTreeMap;
use std::time::Duration as StdDuration;

use envoy_types::pb::envoy::config::cluster::v3::cluster::TransportSocketMatch;
use envoy_types::pb::envoy::config::cluster::v3::{
    CircuitBreakers, Cluster, OutlierDetection,
    circuit_breakers::Thresholds,
    cluster::{ClusterDiscoveryType, DiscoveryType, DnsLookupFamily, EdsClusterConfig, LbPolicy},
};
use envoy_types::pb::envoy::config::core::v3::{
    DataSource, Locality, Metadata, RoutingPriority, TransportSocket, data_source,
    transport_socket::ConfigType,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, Endpoint as EnvoyEndpoint, LbEndpoint, LocalityLbEndpoints,
    lb_endpoint::HostIdentifier,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, SubjectAltNameMatcher, UpstreamTlsContext,
    certificate_validation_context::SystemRootCerts, common_tls_context::ValidationContextType,
    subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::{Struct, UInt32Value, Value, value::Kind};
use envoy_types::util::pack_any;

use crate::model::{
    AppProtocol, ClusterPolicy, Endpoint, ExternalDomain, MTLS_TAG, MeshSettings, Migration,
    MtlsMode, Origin, Service,
};

use super::names;
use super::proto::{ads_config_source, proto_duration, socket_address};

const CONNECT_TIMEOUT: StdDuration = StdDuration::from_secs(1);

/// An EDS cluster of a mesh service (or of its canary subset), with the default policy.
pub fn eds_cluster(name: &str) -> Cluster {
    policy_cluster(name, "", &ClusterPolicy::default())
}

/// An EDS cluster named `name` with the outlier detection and circuit breakers of `policy`,
/// reading the assignment named `assignment` (its own name when empty): a policy variant of
/// a mesh cluster reads the shared cluster's instances.
pub fn policy_cluster(name: &str, assignment: &str, policy: &ClusterPolicy) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads_config_source()),
            service_name: assignment.to_string(),
        }),
        connect_timeout: Some(proto_duration(CONNECT_TIMEOUT)),
        lb_policy: LbPolicy::RoundRobin as i32,
        outlier_detection: Some(outlier_detection(&policy.outlier_detection)),
        circuit_breakers: Some(circuit_breakers(&policy.circuit_breakers)),
        ..Default::default()
    }
}

fn uint32(value: u32) -> Option<UInt32Value> {
    Some(UInt32Value { value })
}

/// Consecutive-failure ejection, enforced every time it triggers (Envoy enforces gateway
/// failures 0% of the time by default, i.e. counts them without ejecting).
fn outlier_detection(o: &crate::model::OutlierDetection) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx: uint32(o.consecutive_5xx),
        enforcing_consecutive_5xx: uint32(100),
        consecutive_gateway_failure: uint32(o.consecutive_gateway_failure),
        enforcing_consecutive_gateway_failure: uint32(100),
        interval: Some(proto_duration(o.interval)),
        base_ejection_time: Some(proto_duration(o.base_ejection_time)),
        max_ejection_percent: uint32(o.max_ejection_percent),
        ..Default::default()
    }
}

/// Limits on the default routing priority (the only one meshbridge routes with).
fn circuit_breakers(c: &crate::model::CircuitBreakers) -> CircuitBreakers {
    CircuitBreakers {
        thresholds: vec![Thresholds {
            priority: RoutingPriority::Default as i32,
            max_connections: uint32(c.max_connections),
            max_pending_requests: uint32(c.max_pending_requests),
            max_requests: uint32(c.max_requests),
            max_retries: uint32(c.max_retries),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Key of the upstream HTTP options in `typed_extension_protocol_options`.
const HTTP_OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";

/// `cluster` speaking `protocol` to its hosts: HTTP/2 (prior knowledge) for `http2` and
/// `grpc`, HTTP/1.1 otherwise, keeping the case of header names when `preserve_case` (HTTP/1
/// only: HTTP/2 names are lower case by definition).
pub fn speaking(mut cluster: Cluster, protocol: AppProtocol, preserve_case: bool) -> Cluster {
    use envoy_types::pb::envoy::config::core::v3::Http2ProtocolOptions;
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::{
        HttpProtocolOptions,
        http_protocol_options::{
            ExplicitHttpConfig, UpstreamProtocolOptions, explicit_http_config::ProtocolConfig,
        },
    };
    let config = if protocol.is_http2() {
        ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())
    } else if preserve_case {
        ProtocolConfig::HttpProtocolOptions(super::proto::preserve_case_http1())
    } else {
        return cluster;
    };
    let options = HttpProtocolOptions {
        upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
            ExplicitHttpConfig {
                protocol_config: Some(config),
            },
        )),
        ..Default::default()
    };
    cluster
        .typed_extension_protocol_options
        .insert(HTTP_OPTIONS.to_string(), pack_any(options));
    cluster
}

/// Whether callers reach this instance of `service` over mutual TLS: the service is `strict`,
/// or the instance carries the `mtls` tag.
pub fn calls_need_tls(service: &Service, endpoint: &Endpoint) -> bool {
    service.mtls == MtlsMode::Strict || endpoint.tags.contains(MTLS_TAG)
}

/// Whether some instance of `service` is reached over mutual TLS.
pub fn service_uses_tls(service: &Service) -> bool {
    service.mtls == MtlsMode::Strict || service.endpoints.iter().any(|e| calls_need_tls(service, e))
}

/// The `{mtls: true}` struct that marks an instance (and matches the TLS transport socket).
fn mtls_marker() -> Struct {
    Struct {
        fields: [(
            names::MTLS_MATCH.to_string(),
            Value {
                kind: Some(Kind::BoolValue(true)),
            },
        )]
        .into_iter()
        .collect(),
    }
}

/// The endpoint assignment of a cluster: healthy instances grouped by datacenter and origin
/// (locality zone and sub-zone, which load reports name), the local datacenter at priority 0
/// and the others after it, densely numbered as Envoy requires. Instances for which `tls`
/// holds are marked for the cluster's mutual-TLS transport socket.
///
/// Under a `migration`, the localities of a datacenter get weights: the new origin's share
/// the migration's weight, the old origins' the rest, whatever the instance counts. At
/// weight 0 (100) the new (old) origin is not weighted but moved one priority down: it takes
/// traffic only when the others have no healthy instance left.
pub fn assignment<'a>(
    cluster: &str,
    endpoints: impl Iterator<Item = &'a Endpoint>,
    settings: &MeshSettings,
    tls: impl Fn(&Endpoint) -> bool,
    migration: Option<&Migration>,
) -> ClusterLoadAssignment {
    // (datacenter priority, demoted, datacenter, origin)
    let mut by_locality: BTreeMap<(u32, bool, String, Origin), Vec<LbEndpoint>> = BTreeMap::new();
    for e in endpoints.filter(|e| e.healthy) {
        let priority = settings.datacenter_priority(e.datacenter.as_deref());
        let demoted = migration.is_some_and(|m| {
            (m.weight == 0 && m.is_new(e.origin)) || (m.weight >= 100 && !m.is_new(e.origin))
        });
        by_locality
            .entry((
                priority,
                demoted,
                e.datacenter.clone().unwrap_or_default(),
                e.origin,
            ))
            .or_default()
            .push(LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(EnvoyEndpoint {
                    address: Some(socket_address(&e.address, e.port)),
                    ..Default::default()
                })),
                load_balancing_weight: Some(UInt32Value { value: e.weight }),
                metadata: tls(e).then(|| Metadata {
                    filter_metadata: [(TRANSPORT_SOCKET_MATCH.to_string(), mtls_marker())]
                        .into_iter()
                        .collect(),
                    ..Default::default()
                }),
                ..Default::default()
            });
    }
    let mut dense = BTreeMap::new();
    for (priority, demoted, _, _) in by_locality.keys() {
        let next = dense.len() as u32;
        dense.entry((*priority, *demoted)).or_insert(next);
    }
    // Localities of each side in each priority, to split that side's share between them
    // (only a migrating service's localities are weighted).
    let mut sides: BTreeMap<(u32, bool, bool), u32> = BTreeMap::new();
    if let Some(m) = migration {
        for (priority, demoted, _, origin) in by_locality.keys() {
            *sides
                .entry((*priority, *demoted, m.is_new(*origin)))
                .or_default() += 1;
        }
    }
    let weight = |priority: u32, demoted: bool, origin: Origin| -> Option<UInt32Value> {
        let m = migration?;
        let new = m.is_new(origin);
        let share = if demoted {
            100
        } else if new {
            m.new_share()
        } else {
            100 - m.new_share()
        };
        let count = sides.get(&(priority, demoted, new)).copied().unwrap_or(1);
        // Envoy takes locality weights of at least 1; in hundredths, split evenly.
        Some(UInt32Value {
            value: (share * 100 / count.max(1)).max(1),
        })
    };
    ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: by_locality
            .into_iter()
            .map(
                |((priority, demoted, dc, origin), lb_endpoints)| LocalityLbEndpoints {
                    locality: Some(Locality {
                        zone: dc,
                        sub_zone: origin.to_string(),
                        ..Default::default()
                    }),
                    load_balancing_weight: weight(priority, demoted, origin),
                    lb_endpoints,
                    priority: dense[&(priority, demoted)],
                    ..Default::default()
                },
            )
            .collect(),
        ..Default::default()
    }
}

/// An empty assignment: what an EDS request for an unknown cluster gets, so that no
/// cluster is ever left warming.
pub fn empty_assignment(cluster: &str) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        ..Default::default()
    }
}

/// Endpoint metadata namespace Envoy matches `transport_socket_matches` against.
const TRANSPORT_SOCKET_MATCH: &str = "envoy.transport_socket_match";

/// The variant of a mesh cluster for callers holding a certificate: instances marked in the
/// assignment are called over mutual TLS verifying the callee's identity, the others in
/// plaintext.
pub fn with_upstream_tls(mut cluster: Cluster, trust_domain: &str, service: &str) -> Cluster {
    cluster.transport_socket_matches = vec![TransportSocketMatch {
        name: names::MTLS_MATCH.to_string(),
        r#match: Some(mtls_marker()),
        transport_socket: Some(super::tls::upstream_tls(trust_domain, service)),
    }];
    cluster
}

/// The clusters and assignments of one service: all instances, plus a canary cluster when
/// some healthy instance carries the `canary` tag.
pub fn service_clusters(
    service: &Service,
    settings: &MeshSettings,
) -> Vec<(Cluster, ClusterLoadAssignment)> {
    let name = names::service_cluster(&service.name);
    let tls = |e: &Endpoint| calls_need_tls(service, e);
    let migration = service.migration.as_ref();
    let shaped = |name: &str| {
        speaking(
            eds_cluster(name),
            service.protocol,
            service.preserve_header_case,
        )
    };
    let mut out = vec![(
        weighted_by_origin(shaped(&name), service),
        assignment(&name, service.endpoints.iter(), settings, tls, migration),
    )];
    if service.has_canary() {
        let canary = names::canary_cluster(&service.name);
        out.push((
            weighted_by_origin(shaped(&canary), service),
            assignment(
                &canary,
                service.endpoints.iter().filter(|e| e.is_canary()),
                settings,
                tls,
                migration,
            ),
        ));
    }
    if let Some(m) = migration.filter(|_| has_mirror(service)) {
        let mirror = names::mirror_cluster(&service.name);
        out.push((
            shaped(&mirror),
            assignment(
                &mirror,
                service.endpoints.iter().filter(|e| m.is_new(e.origin)),
                settings,
                tls,
                None,
            ),
        ));
    }
    out
}

/// Whether a migrating service has a mirror cluster: it has healthy instances of the new
/// origin (requests are copied to them).
pub fn has_mirror(service: &Service) -> bool {
    service
        .migration
        .as_ref()
        .is_some_and(|m| m.mirror > 0 && service.healthy_endpoints().any(|e| m.is_new(e.origin)))
}

/// A cluster of a migrating service picks a locality (an origin in a datacenter) by the
/// weights its assignment gives, whatever the instance counts (see [`assignment`]).
pub fn weighted_by_origin(mut cluster: Cluster, service: &Service) -> Cluster {
    use envoy_types::pb::envoy::config::cluster::v3::cluster::{
        CommonLbConfig, common_lb_config::LocalityConfigSpecifier,
        common_lb_config::LocalityWeightedLbConfig,
    };
    if service.migration.is_some() {
        cluster.common_lb_config = Some(CommonLbConfig {
            locality_config_specifier: Some(LocalityConfigSpecifier::LocalityWeightedLbConfig(
                LocalityWeightedLbConfig {},
            )),
            ..Default::default()
        });
    }
    cluster
}

/// The cluster of the local application serving `service` (a service or one of its
/// ports) on `app_port`.
pub fn local_app_cluster(service: &str, app_port: u16) -> Cluster {
    let name = names::local_app_cluster(service);
    Cluster {
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: Some(proto_duration(CONNECT_TIMEOUT)),
        load_assignment: Some(static_assignment(&name, "127.0.0.1", app_port)),
        name,
        ..Default::default()
    }
}

fn static_assignment(cluster: &str, host: &str, port: u16) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: vec![LbEndpoint {
                host_identifier: Some(HostIdentifier::Endpoint(EnvoyEndpoint {
                    address: Some(socket_address(host, port)),
                    ..Default::default()
                })),
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A DNS cluster of an external domain; with `https`, TLS verified against the host's
/// system roots and the domain's name.
pub fn domain_cluster(domain: &ExternalDomain, ca_file: &str) -> Cluster {
    let name = names::domain_cluster(domain);
    let transport_socket = domain.tls.then(|| {
        let tls = UpstreamTlsContext {
            sni: domain.host.clone(),
            common_tls_context: Some(CommonTlsContext {
                validation_context_type: Some(ValidationContextType::ValidationContext(
                    CertificateValidationContext {
                        // Envoy does not implement `system_root_certs` (a gRPC-only field)
                        // and rejects SAN matching without a trusted CA, NACKing all of CDS.
                        trusted_ca: Some(DataSource {
                            specifier: Some(data_source::Specifier::Filename(ca_file.to_string())),
                            ..Default::default()
                        }),
                        system_root_certs: Some(SystemRootCerts {}),
                        match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                            san_type: SanType::Dns as i32,
                            matcher: Some(StringMatcher {
                                match_pattern: Some(MatchPattern::Exact(domain.host.clone())),
                                ..Default::default()
                            }),
                            ..Default::default()
                        }],
                        ..Default::default()
                    },
                )),
                ..Default::default()
            }),
            ..Default::default()
        };
        TransportSocket {
            name: "envoy.transport_sockets.tls".to_string(),
            config_type: Some(ConfigType::TypedConfig(pack_any(tls))),
        }
    });
    Cluster {
        transport_socket,
        ..dns_cluster(&name, domain)
    }
}

/// The cluster of the tunnels to an `https://` external domain: plain TCP to its host and
/// port, resolved as [`domain_cluster`] is. No transport socket: the client runs its own
/// TLS through the tunnel, end to end with the domain.
pub fn domain_tunnel_cluster(domain: &ExternalDomain) -> Cluster {
    dns_cluster(&names::domain_tunnel_cluster(domain), domain)
}

/// A cluster named `name` whose one host is the domain's, resolved by DNS when a connection
/// is made (the first IPv4 address, else IPv6).
fn dns_cluster(name: &str, domain: &ExternalDomain) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::LogicalDns as i32)),
        dns_lookup_family: DnsLookupFamily::V4Preferred as i32,
        connect_timeout: Some(proto_duration(CONNECT_TIMEOUT)),
        load_assignment: Some(static_assignment(name, &domain.host, domain.port)),
        ..Default::default()
    }
}
