//! Listeners and route configurations.

use envoy_types::pb::envoy::config::accesslog::v3::{
    AccessLogFilter, ResponseFlagFilter, access_log_filter::FilterSpecifier,
};
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::config::core::v3::{
    SubstitutionFormatString, substitution_format_string::Format,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, Listener, filter::ConfigType as FilterConfig,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, RetryPolicy as EnvoyRetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, header_matcher::HeaderMatchSpecifier,
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, LocalReplyConfig, Rds, ResponseMapper,
    http_connection_manager::RouteSpecifier, http_connection_manager::StripPortMode,
    http_connection_manager::UpgradeConfig, http_filter::ConfigType as HttpFilterConfig,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::UInt32Value;
use envoy_types::util::pack_any;

use crate::model::{DEFAULT_TIMEOUT, DependencySettings, RateLimit, RetryPolicy, TokenBucket};

use super::proto::{ads_config_source, proto_duration, socket_address};
use super::{names, rate_limit};

/// An HTTP listener whose routes come from RDS, ignoring the port in `Host`, keeping HTTP/1
/// header names' case when `preserve_case`.
pub fn http_listener(
    name: &str,
    host: &str,
    port: u16,
    route: &str,
    preserve_case: bool,
) -> Listener {
    let hcm = HttpConnectionManager {
        stat_prefix: name.to_string(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: route.to_string(),
        })),
        http_filters: vec![HttpFilter {
            name: "envoy.filters.http.router".to_string(),
            config_type: Some(HttpFilterConfig::TypedConfig(pack_any(Router::default()))),
            ..Default::default()
        }],
        strip_port_mode: Some(StripPortMode::StripAnyHostPort(true)),
        http_protocol_options: preserve_case.then(super::proto::preserve_case_http1),
        local_reply_config: Some(local_reply_config()),
        upgrade_configs: upgrades(),
        ..Default::default()
    };
    Listener {
        name: name.to_string(),
        address: Some(socket_address(host, port)),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".to_string(),
                config_type: Some(FilterConfig::TypedConfig(pack_any(hcm))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Envoy's own error replies, by the response flag that caused them: the reason meshbridge
/// gives it (in `x-meshbridge-reason`, as on meshbridge's own replies) and what the body says.
/// `%UPSTREAM_CLUSTER%` is the service's cluster (`orders`, `orders|canary`).
pub const ENVOY_REPLIES: [(&str, &str, &str); 5] = [
    (
        "UH",
        "no-healthy-upstream",
        "no healthy instance of %UPSTREAM_CLUSTER%",
    ),
    (
        "UT",
        "upstream-timeout",
        "%UPSTREAM_CLUSTER% did not answer within the timeout",
    ),
    (
        "UO",
        "overflow",
        "too many requests to %UPSTREAM_CLUSTER% at once (circuit breaker)",
    ),
    (
        "UF",
        "upstream-connect-failure",
        "cannot connect to %UPSTREAM_CLUSTER% (%UPSTREAM_HOST%)",
    ),
    (
        "UC",
        "upstream-reset",
        "%UPSTREAM_CLUSTER% (%UPSTREAM_HOST%) closed the connection before answering",
    ),
];

/// The upgrades an HTTP listener lets through: WebSocket (the upgraded connection is then
/// bytes both ways); Envoy refuses the others.
pub fn upgrades() -> Vec<UpgradeConfig> {
    vec![UpgradeConfig {
        upgrade_type: "websocket".to_string(),
        ..Default::default()
    }]
}

/// Gives Envoy's own error replies (no healthy instance, timeout, overflow, connection
/// failure) the `x-meshbridge-reason` header and a body naming the service and the reason;
/// Envoy's status code and `RESPONSE_CODE_DETAILS` are kept.
pub fn local_reply_config() -> LocalReplyConfig {
    let mappers = ENVOY_REPLIES
        .iter()
        .map(|(flag, reason, what)| ResponseMapper {
            filter: Some(AccessLogFilter {
                filter_specifier: Some(FilterSpecifier::ResponseFlagFilter(ResponseFlagFilter {
                    flags: vec![flag.to_string()],
                })),
            }),
            body_format_override: Some(SubstitutionFormatString {
                format: Some(Format::TextFormatSource(DataSource {
                    specifier: Some(Specifier::InlineString(format!(
                        "meshbridge: {what} ({reason}: %RESPONSE_CODE_DETAILS%)\n"
                    ))),
                    ..Default::default()
                })),
                ..Default::default()
            }),
            headers_to_add: vec![reason_header(reason)],
            ..Default::default()
        })
        .collect();
    LocalReplyConfig {
        mappers,
        ..Default::default()
    }
}

/// The `x-meshbridge-reason` header of a reply meshbridge or Envoy makes.
pub(crate) fn reason_header(reason: &str) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: names::REASON_HEADER.to_string(),
            value: reason.to_string(),
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// Matches every path.
pub fn prefix_match() -> RouteMatch {
    RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix("/".to_string())),
        ..Default::default()
    }
}

/// A route to `cluster` with the dependency's timeout and retries.
pub fn cluster_route(
    name: &str,
    matcher: RouteMatch,
    cluster: &str,
    settings: &DependencySettings,
) -> Route {
    let retries = settings.retries.clone().unwrap_or_default();
    Route {
        name: name.to_string(),
        r#match: Some(matcher),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_string())),
            timeout: Some(proto_duration(settings.timeout.unwrap_or(DEFAULT_TIMEOUT))),
            retry_policy: (retries.attempts > 0).then(|| retry_policy(&retries)),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn retry_policy(r: &RetryPolicy) -> EnvoyRetryPolicy {
    EnvoyRetryPolicy {
        retry_on: r.on.join(","),
        num_retries: Some(UInt32Value { value: r.attempts }),
        per_try_timeout: r.per_try_timeout.map(proto_duration),
        ..Default::default()
    }
}

/// The routes towards one mesh service: canary requests (`x-canary: 1`) first to
/// `canary_cluster` when the service has canary instances, then every request to
/// `cluster` (all instances).
pub fn service_routes(
    cluster: &str,
    canary_cluster: Option<&str>,
    settings: &DependencySettings,
) -> Vec<Route> {
    let mut routes = Vec::new();
    if let Some(canary_cluster) = canary_cluster {
        let mut matcher = prefix_match();
        matcher.headers.push(HeaderMatcher {
            name: names::CANARY_HEADER.to_string(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(MatchPattern::Exact("1".to_string())),
                ..Default::default()
            })),
            ..Default::default()
        });
        routes.push(cluster_route("canary", matcher, canary_cluster, settings));
    }
    routes.push(cluster_route("default", prefix_match(), cluster, settings));
    routes
}

/// A virtual host answering every request with a local reply naming the reason.
pub fn local_reply_vhost(
    name: &str,
    domains: Vec<String>,
    status: u32,
    reason: &str,
    body: String,
) -> VirtualHost {
    VirtualHost {
        name: name.to_string(),
        domains,
        routes: vec![Route {
            name: reason.to_string(),
            r#match: Some(prefix_match()),
            action: Some(Action::DirectResponse(DirectResponseAction {
                status,
                body: Some(DataSource {
                    specifier: Some(Specifier::InlineString(body)),
                    ..Default::default()
                }),
                ..Default::default()
            })),
            response_headers_to_add: vec![reason_header(reason)],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The ingress route configuration: everything to the local application, under the
/// service's rate limits (see [`super::rate_limit`]): a route of its own per path limit,
/// most specific first, and the service-wide limit on the virtual host.
pub fn ingress_route(rate_limit: &RateLimit) -> RouteConfiguration {
    // One entry per map at most: a protobuf map is encoded in no fixed order.
    let limited = |bucket: &TokenBucket| {
        [(
            rate_limit::FILTER.to_string(),
            rate_limit::bucket_config(bucket),
        )]
        .into()
    };
    let app_route = |name: String, matcher: RouteMatch| Route {
        name,
        r#match: Some(matcher),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(
                names::LOCAL_APP_CLUSTER.to_string(),
            )),
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut routes: Vec<Route> = rate_limit
        .paths
        .iter()
        .map(|p| Route {
            typed_per_filter_config: limited(&p.bucket),
            ..app_route(
                names::rate_limited_route(&p.prefix),
                RouteMatch {
                    path_specifier: Some(PathSpecifier::Prefix(p.prefix.clone())),
                    ..Default::default()
                },
            )
        })
        .collect();
    routes.push(app_route("app".to_string(), prefix_match()));
    RouteConfiguration {
        name: names::INGRESS_ROUTE.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: "local".to_string(),
            domains: vec!["*".to_string()],
            routes,
            typed_per_filter_config: rate_limit.service.as_ref().map(limited).unwrap_or_default(),
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A route configuration from its virtual hosts.
pub fn route_configuration(name: &str, virtual_hosts: Vec<VirtualHost>) -> RouteConfiguration {
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts,
        ..Default::default()
    }
}
