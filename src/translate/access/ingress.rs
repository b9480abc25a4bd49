//! The ingress listener: transport by `mtls` mode, the identity, RBAC, rate limit and access
//! log filters in order, and the route to the application.

use envoy_types::pb::envoy::config::core::v3::TrafficDirection;
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
    filter::ConfigType as FilterConfig, listener_filter::ConfigType as ListenerFilterConfig,
};
use envoy_types::pb::envoy::config::rbac::v3::Rbac;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
    http_connection_manager::{PathWithEscapedSlashesAction, RouteSpecifier},
    http_filter::ConfigType as HttpFilterConfig,
};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;

use crate::model::{MeshSettings, MeshState, MtlsMode, RateLimit, access_target};

use crate::translate::proto::{ads_config_source, socket_address};
use crate::translate::{IngressSpec, listeners, names, rate_limit, tls};

use super::identity::identity_filter;
use super::log::access_log;
use super::rbac::{CallerAddresses, encode_network_rbac, encode_rbac, rbac_config_with};

/// How the ingress listener treats the transport.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IngressTransport {
    /// Plaintext only.
    Plaintext,
    /// Mutual TLS and plaintext, told apart by a TLS inspector.
    Permissive,
    /// Mutual TLS only.
    Strict,
    /// The service requires mutual TLS but the proxy holds no certificate: every request is
    /// answered 503 naming the problem.
    StrictWithoutCertificate,
}

/// The transport of a group's ingress: the service's mode, and what the proxy can do. A proxy
/// with a certificate always accepts mutual TLS too (callers use it towards instances tagged
/// `mtls`, whatever the service's mode).
pub fn ingress_transport(mode: MtlsMode, has_certificate: bool) -> IngressTransport {
    match (mode, has_certificate) {
        (MtlsMode::Strict, true) => IngressTransport::Strict,
        (MtlsMode::Strict, false) => IngressTransport::StrictWithoutCertificate,
        (_, true) => IngressTransport::Permissive,
        (_, false) => IngressTransport::Plaintext,
    }
}

/// The ingress listener, its route configuration and what an operator should know.
#[derive(Clone, Debug, PartialEq)]
pub struct Ingress {
    /// The listener.
    pub listener: Listener,
    /// Its route configuration.
    pub route: RouteConfiguration,
    /// Problems, in words.
    pub warnings: Vec<String>,
}

/// Builds the ingress of `spec`: a listener on its port for the application on
/// `127.0.0.1:app_port` (the local application cluster is built elsewhere).
#[allow(clippy::too_many_lines)] // one listener, its filter chains built in the order Envoy applies them.
pub fn ingress(state: &MeshState, settings: &MeshSettings, spec: &IngressSpec) -> Ingress {
    let group = spec;
    // A further port (`NAME:PORT`) is guarded as its service is: its AccessRules, and its
    // mTLS mode when the port itself is unknown.
    let target = access_target(&group.service);
    let mode = state
        .services
        .get(&group.service)
        .or_else(|| state.services.get(target))
        .map(|s| s.mtls)
        .unwrap_or_default();
    let transport = ingress_transport(mode, group.tls);
    let mut warnings = Vec::new();
    let route = if transport == IngressTransport::StrictWithoutCertificate {
        warnings.push(format!(
            "{} requires mutual TLS (spec.mtls: strict) but this proxy has no certificate (node metadata tls; meshbridge bootstrap --tls-*): every call is refused",
            group.service
        ));
        listeners::route_configuration(
            &names::ingress_route(&group.service),
            vec![listeners::local_reply_vhost(
                "local",
                vec!["*".to_string()],
                503,
                "mtls-without-certificate",
                format!(
                    "meshbridge: {} accepts only mutual TLS and this proxy has no certificate\n",
                    group.service
                ),
            )],
        )
    } else {
        let unlimited = RateLimit::default();
        listeners::ingress_route(
            &group.service,
            state
                .services
                .get(&group.service)
                .map_or(&unlimited, |s| &s.rate_limit),
        )
    };
    let policy = state.access.get(target);
    let addresses = CallerAddresses::new(policy, state, settings);
    let tcp = state
        .services
        .get(&group.service)
        .is_some_and(|s| s.protocol.is_tcp());
    let mut rbac = rbac_config_with(target, policy, settings, &addresses, tcp);
    let mode_name = match &rbac {
        None => "off",
        Some(r) if r.rules.is_none() => "log",
        Some(_) => "deny",
    };
    let filters = if tcp {
        if transport == IngressTransport::StrictWithoutCertificate {
            // No reply to send on a connection: every one is closed.
            rbac = Some(HttpRbac {
                rules: Some(Rbac::default()),
                ..Default::default()
            });
        }
        for (i, rule) in policy.into_iter().flat_map(|p| &p.rules).enumerate() {
            if !(rule.paths.is_empty() && rule.methods.is_empty()) {
                warnings.push(format!(
                    "access rule-{i} of {target} names paths or methods, which connections to the tcp service {} do not have: it admits no connection",
                    group.service
                ));
            }
        }
        tcp_filters(&group.service, rbac, mode_name)
    } else {
        vec![http_filter(
            state, settings, group, &addresses, rbac, mode_name,
        )]
    };
    let chain = |transport_protocol: Option<&str>, tls: bool| FilterChain {
        filter_chain_match: transport_protocol.map(|p| FilterChainMatch {
            transport_protocol: p.to_string(),
            ..Default::default()
        }),
        filters: filters.clone(),
        transport_socket: tls.then(|| tls::downstream_tls(&settings.trust_domain)),
        ..Default::default()
    };
    let (filter_chains, listener_filters) = match transport {
        IngressTransport::Plaintext | IngressTransport::StrictWithoutCertificate => {
            (vec![chain(None, false)], Vec::new())
        }
        IngressTransport::Strict => (vec![chain(None, true)], Vec::new()),
        IngressTransport::Permissive => (
            vec![chain(Some("tls"), true), chain(Some("raw_buffer"), false)],
            vec![ListenerFilter {
                name: "envoy.filters.listener.tls_inspector".to_string(),
                config_type: Some(ListenerFilterConfig::TypedConfig(pack_any(
                    TlsInspector::default(),
                ))),
                ..Default::default()
            }],
        ),
    };
    let (host, port) = (spec.host.as_deref().unwrap_or("0.0.0.0"), spec.port);
    Ingress {
        listener: Listener {
            name: names::ingress_listener(&group.service),
            address: Some(socket_address(host, port)),
            filter_chains,
            listener_filters,
            // What a proxy's drain (`/drain_listeners?inboundonly`) stops.
            traffic_direction: TrafficDirection::Inbound.into(),
            ..Default::default()
        },
        route,
        warnings,
    }
}

/// The filters of a `tcp` service's ingress: network RBAC (on what the connection proves),
/// then the connection forwarded to the application, one access log line per connection.
fn tcp_filters(service: &str, rbac: Option<HttpRbac>, mode_name: &str) -> Vec<Filter> {
    let listener = names::ingress_listener(service);
    let mut filters = Vec::new();
    if let Some(rbac) = rbac {
        filters.push(Filter {
            name: "envoy.filters.network.rbac".to_string(),
            config_type: Some(FilterConfig::TypedConfig(encode_network_rbac(
                rbac,
                &format!("{listener}."),
            ))),
        });
    }
    let mut proxy = listeners::tcp_proxy(&listener, &names::local_app_cluster(service));
    proxy.access_log = vec![access_log(access_target(service), mode_name)];
    filters.push(listeners::tcp_proxy_filter(proxy));
    filters
}

/// The HTTP connection manager of an HTTP service's ingress: identity, RBAC (when `rbac`),
/// then the route to the application.
fn http_filter(
    state: &MeshState,
    settings: &MeshSettings,
    group: &IngressSpec,
    addresses: &CallerAddresses<'_>,
    rbac: Option<HttpRbac>,
    mode_name: &str,
) -> Filter {
    let mut http_filters = vec![identity_filter(settings, addresses)];
    if let Some(rbac) = rbac {
        http_filters.push(HttpFilter {
            name: "envoy.filters.http.rbac".to_string(),
            config_type: Some(HttpFilterConfig::TypedConfig(encode_rbac(rbac))),
            ..Default::default()
        });
    }
    // After access control, so that a refused caller takes no token from the allowed ones.
    http_filters.push(rate_limit::filter());
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".to_string(),
        config_type: Some(HttpFilterConfig::TypedConfig(pack_any(Router::default()))),
        ..Default::default()
    });
    let hcm = HttpConnectionManager {
        stat_prefix: names::ingress_listener(&group.service),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: names::ingress_route(&group.service),
        })),
        http_filters,
        access_log: vec![access_log(access_target(&group.service), mode_name)],
        // Paths are matched by RBAC as the application will read them: `/api/../admin` and
        // `//admin` are normalized first, and an escaped slash (`/api%2F..%2Fadmin`) is
        // unescaped and the caller redirected, as Envoy advises for path-based access rules.
        normalize_path: Some(BoolValue { value: true }),
        merge_slashes: true,
        path_with_escaped_slashes_action: PathWithEscapedSlashesAction::UnescapeAndRedirect as i32,
        local_reply_config: Some({
            let mut replies = listeners::local_reply_config();
            replies
                .mappers
                .push(rate_limit::local_reply_mapper(&group.service));
            replies
        }),
        upgrade_configs: listeners::upgrades(),
        http_protocol_options: state
            .services
            .get(&group.service)
            .is_some_and(|s| s.preserve_header_case)
            .then(crate::translate::proto::preserve_case_http1),
        ..Default::default()
    };
    Filter {
        name: "envoy.filters.network.http_connection_manager".to_string(),
        config_type: Some(FilterConfig::TypedConfig(pack_any(hcm))),
    }
}
