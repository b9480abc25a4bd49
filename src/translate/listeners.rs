//! Listeners and route configurations.

use envoy_types::pb::envoy::config::accesslog::v3::{
    AccessLogFilter, AndFilter, ComparisonFilter, HeaderFilter as AccessLogHeaderFilter, OrFilter,
    ResponseFlagFilter, StatusCodeFilter, access_log_filter::FilterSpecifier, comparison_filter,
};
use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::config::core::v3::{
    HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction,
};
use envoy_types::pb::envoy::config::core::v3::{
    Http2ProtocolOptions, RuntimeFractionalPercent, RuntimeUInt32, TrafficDirection,
};
use envoy_types::pb::envoy::config::core::v3::{
    SubstitutionFormatString, substitution_format_string::Format,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, Listener, filter::ConfigType as FilterConfig, listener::DrainType,
};
use envoy_types::pb::envoy::config::route::v3::{
    DirectResponseAction, HeaderMatcher, RetryPolicy as EnvoyRetryPolicy, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost, header_matcher::HeaderMatchSpecifier,
    route::Action, route_action::ClusterSpecifier, route_action::MaxStreamDuration,
    route_action::RequestMirrorPolicy, route_action::UpgradeConfig as RouteUpgradeConfig,
    route_action::upgrade_config::ConnectConfig, route_match::ConnectMatcher,
    route_match::PathSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, LocalReplyConfig, Rds, ResponseMapper,
    http_connection_manager::RouteSpecifier, http_connection_manager::UpgradeConfig,
    http_filter::ConfigType as HttpFilterConfig,
};
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier as TcpClusterSpecifier,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    RegexMatcher, StringMatcher, string_matcher::MatchPattern,
};
use envoy_types::pb::envoy::r#type::v3::{FractionalPercent, fractional_percent::DenominatorType};
use envoy_types::pb::google::protobuf::{BoolValue, UInt32Value};
use envoy_types::util::pack_any;

use crate::model::{
    AppProtocol, DEFAULT_TIMEOUT, DependencySettings, RateLimit, RetryPolicy, TokenBucket,
};

use super::proto::{ads_config_source, proto_duration, socket_address};
use super::{names, rate_limit};

/// The egress listener: HTTP whose routes come from RDS (a route configuration from
/// [`egress_route_configuration`], which ignores the port in `Host` when picking a virtual
/// host), keeping HTTP/1 header names' case when `preserve_case`. It lets WebSocket and
/// `CONNECT` through (over HTTP/1, and over HTTP/2 where a client asks for it); a `CONNECT`
/// that no tunnel route takes is refused (see [`egress_local_reply_config`]).
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
        // The port stays in the authority (the route configuration ignores it when picking a
        // virtual host): a tunnel route checks the port a `CONNECT` names, which Envoy's
        // `strip_any_host_port` would remove before routing.
        http_protocol_options: preserve_case.then(super::proto::preserve_case_http1),
        http2_protocol_options: Some(Http2ProtocolOptions {
            allow_connect: true,
            ..Default::default()
        }),
        local_reply_config: Some(egress_local_reply_config()),
        upgrade_configs: egress_upgrades(),
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

/// Upgrade type of an HTTP `CONNECT` in Envoy's upgrade configurations.
const CONNECT: &str = "CONNECT";

/// The upgrades the egress listener lets through: those of [`upgrades`], and `CONNECT`,
/// which only a tunnel route (see [`tunnel_route`]) takes.
pub fn egress_upgrades() -> Vec<UpgradeConfig> {
    let mut all = upgrades();
    all.push(UpgradeConfig {
        upgrade_type: CONNECT.to_string(),
        ..Default::default()
    });
    all
}

/// Reason of the refusal of a `CONNECT` that no tunnel route takes.
pub const UNDECLARED_TUNNEL: &str = "undeclared-tunnel";

/// [`local_reply_config`], and: a `CONNECT` that no route takes (a mesh service, an
/// `http://` domain, an `https://` domain at a port other than its own: Envoy finds no
/// route, 404) is refused with 403 and the reason [`UNDECLARED_TUNNEL`].
pub fn egress_local_reply_config() -> LocalReplyConfig {
    let mut config = local_reply_config();
    let mut refused = reply_mapper(
        AccessLogFilter {
            filter_specifier: Some(FilterSpecifier::AndFilter(AndFilter {
                filters: vec![
                    AccessLogFilter {
                        filter_specifier: Some(FilterSpecifier::ResponseFlagFilter(
                            ResponseFlagFilter {
                                flags: vec!["NR".to_string()],
                            },
                        )),
                    },
                    AccessLogFilter {
                        filter_specifier: Some(FilterSpecifier::HeaderFilter(
                            AccessLogHeaderFilter {
                                header: Some(exact_header(":method", CONNECT)),
                            },
                        )),
                    },
                ],
            })),
        },
        UNDECLARED_TUNNEL,
        "CONNECT opens a tunnel only to a declared https:// domain, at the port it is declared with",
    );
    refused.status_code = Some(UInt32Value { value: 403 });
    config.mappers.push(refused);
    config
}

/// Matches a request whose header `name` is `value`.
fn exact_header(name: &str, value: &str) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(value.to_string())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Gives Envoy's own error replies (no healthy instance, timeout, overflow, connection
/// failure) the `x-meshbridge-reason` header and a body naming the service and the reason;
/// Envoy's status code and `RESPONSE_CODE_DETAILS` are kept.
pub fn local_reply_config() -> LocalReplyConfig {
    let mut mappers: Vec<ResponseMapper> = ENVOY_REPLIES
        .iter()
        .map(|(flag, reason, what)| {
            reply_mapper(
                AccessLogFilter {
                    filter_specifier: Some(FilterSpecifier::ResponseFlagFilter(
                        ResponseFlagFilter {
                            flags: vec![flag.to_string()],
                        },
                    )),
                },
                reason,
                what,
            )
        })
        .collect();
    // A gRPC caller's own deadline (`grpc-timeout`, honoured as the stream's duration) ends
    // the call with 408 or 504 and no response flag: told apart from the router's timeout
    // (UT, matched first) by the request's header.
    let status = |code: u32| status_filter(code, &format!("meshbridge.deadline_status_{code}"));
    mappers.push(reply_mapper(
        AccessLogFilter {
            filter_specifier: Some(FilterSpecifier::AndFilter(AndFilter {
                filters: vec![
                    AccessLogFilter {
                        filter_specifier: Some(FilterSpecifier::HeaderFilter(
                            AccessLogHeaderFilter {
                                header: Some(HeaderMatcher {
                                    name: "grpc-timeout".to_string(),
                                    header_match_specifier: Some(
                                        HeaderMatchSpecifier::PresentMatch(true),
                                    ),
                                    ..Default::default()
                                }),
                            },
                        )),
                    },
                    AccessLogFilter {
                        filter_specifier: Some(FilterSpecifier::OrFilter(OrFilter {
                            filters: vec![status(408), status(504)],
                        })),
                    },
                ],
            })),
        },
        "deadline-exceeded",
        "the caller's deadline (grpc-timeout) passed before %UPSTREAM_CLUSTER% answered",
    ));
    LocalReplyConfig {
        mappers,
        ..Default::default()
    }
}

/// Matches replies of status `code` (`runtime_key` names the value in Envoy's runtime, which
/// meshbridge never sets).
pub(crate) fn status_filter(code: u32, runtime_key: &str) -> AccessLogFilter {
    AccessLogFilter {
        filter_specifier: Some(FilterSpecifier::StatusCodeFilter(StatusCodeFilter {
            comparison: Some(ComparisonFilter {
                op: comparison_filter::Op::Eq as i32,
                value: Some(RuntimeUInt32 {
                    default_value: code,
                    runtime_key: runtime_key.to_string(),
                }),
            }),
        })),
    }
}

/// A local-reply mapper: replies matching `filter` get `reason` in `x-meshbridge-reason` and
/// a body saying `what` (Envoy format commands in it are expanded).
pub(crate) fn reply_mapper(filter: AccessLogFilter, reason: &str, what: &str) -> ResponseMapper {
    ResponseMapper {
        filter: Some(filter),
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

/// Matches a `CONNECT` request; with `authority`, only one naming that `host:port` (host in
/// any case). Envoy matches no other request with it, nor a `CONNECT` with a path matcher.
pub fn connect_match(authority: Option<&str>) -> RouteMatch {
    RouteMatch {
        path_specifier: Some(PathSpecifier::ConnectMatcher(ConnectMatcher {})),
        headers: authority
            .map(|a| {
                let mut header = exact_header(":authority", a);
                if let Some(HeaderMatchSpecifier::StringMatch(m)) =
                    &mut header.header_match_specifier
                {
                    m.ignore_case = true;
                }
                header
            })
            .into_iter()
            .collect(),
        ..Default::default()
    }
}

/// The route of the tunnels to `authority` (`host:port`): a `CONNECT` naming it is
/// answered 200 once Envoy has connected to `cluster`, then bytes flow both ways, untouched
/// (the client runs its own TLS inside). No timeout (the tunnel lives as long as the client
/// keeps it, bounded by the listener's idle timeout) and no retries.
pub fn tunnel_route(authority: &str, cluster: &str) -> Route {
    Route {
        name: "connect".to_string(),
        r#match: Some(connect_match(Some(authority))),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_string())),
            timeout: Some(proto_duration(std::time::Duration::ZERO)),
            upgrade_configs: vec![RouteUpgradeConfig {
                upgrade_type: CONNECT.to_string(),
                // Envoy ends the CONNECT itself and forwards the payload as TCP.
                connect_config: Some(ConnectConfig::default()),
                ..Default::default()
            }],
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// A route to `cluster`, whose instances speak `protocol`, with the dependency's timeout and
/// retries. Towards gRPC, retries default to covering `UNAVAILABLE` too, and a caller's
/// shorter `grpc-timeout` deadline is honoured (capped by the dependency's timeout).
pub fn cluster_route(
    name: &str,
    matcher: RouteMatch,
    cluster: &str,
    settings: &DependencySettings,
    protocol: AppProtocol,
) -> Route {
    let retries = match &settings.retries {
        Some(r) => r.for_protocol(protocol),
        None => RetryPolicy::default_for(protocol),
    };
    let timeout = proto_duration(settings.timeout.unwrap_or(DEFAULT_TIMEOUT));
    // The listener lets WebSocket through; a route turns it off where the dependency or the
    // service's protocol says so.
    let websocket = settings.websocket.unwrap_or(protocol == AppProtocol::Http);
    Route {
        name: name.to_string(),
        r#match: Some(matcher),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.to_string())),
            max_stream_duration: (protocol == AppProtocol::Grpc).then(|| MaxStreamDuration {
                grpc_timeout_header_max: Some(timeout),
                ..Default::default()
            }),
            timeout: Some(timeout),
            retry_policy: (retries.attempts > 0).then(|| retry_policy(&retries)),
            upgrade_configs: if websocket {
                Vec::new()
            } else {
                vec![RouteUpgradeConfig {
                    upgrade_type: "websocket".to_string(),
                    enabled: Some(BoolValue { value: false }),
                    ..Default::default()
                }]
            },
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
    mirror: Option<(&str, u32)>,
    settings: &DependencySettings,
    protocol: AppProtocol,
) -> Vec<Route> {
    let mirrored = |mut route: Route| {
        if let (Some((mirror_cluster, percent)), Some(Action::Route(action))) =
            (mirror, route.action.as_mut())
        {
            action.request_mirror_policies = vec![RequestMirrorPolicy {
                cluster: mirror_cluster.to_string(),
                runtime_fraction: Some(RuntimeFractionalPercent {
                    default_value: Some(FractionalPercent {
                        numerator: percent,
                        denominator: DenominatorType::Hundred as i32,
                    }),
                    runtime_key: String::new(),
                }),
                ..Default::default()
            }];
        }
        route
    };
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
        routes.push(mirrored(cluster_route(
            "canary",
            matcher,
            canary_cluster,
            settings,
            protocol,
        )));
    }
    routes.push(mirrored(cluster_route(
        "default",
        prefix_match(),
        cluster,
        settings,
        protocol,
    )));
    routes
}

/// `route` taken only by requests whose `Host` ends in `:PORT` for one of `ports` (a port
/// name or number), renamed `NAME|route`: a route of the further port `NAME` of a service,
/// in the service's virtual host.
pub fn on_port(mut route: Route, name: &str, ports: &[String]) -> Route {
    route.name = format!("{name}|{}", route.name);
    let matcher = route.r#match.get_or_insert_with(prefix_match);
    matcher.headers.push(HeaderMatcher {
        name: ":authority".to_string(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
            match_pattern: Some(MatchPattern::SafeRegex(RegexMatcher {
                // Port names and numbers carry no regex metacharacters (validated).
                regex: format!("[^:]+:({})", ports.join("|")),
                ..Default::default()
            })),
            ignore_case: false,
        })),
        ..Default::default()
    });
    route
}

/// A virtual host answering every request (but a `CONNECT`) with a local reply naming the
/// reason.
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
        routes: vec![local_reply_route(
            reason,
            prefix_match(),
            status,
            reason,
            body,
        )],
        ..Default::default()
    }
}

/// A route named `name` answering the requests `matcher` takes with a local reply naming
/// the reason.
pub fn local_reply_route(
    name: &str,
    matcher: RouteMatch,
    status: u32,
    reason: &str,
    body: String,
) -> Route {
    Route {
        name: name.to_string(),
        r#match: Some(matcher),
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
    }
}

/// The ingress route configuration: everything to the local application, under the
/// service's rate limits (see [`super::rate_limit`]): a route of its own per path limit,
/// most specific first, and the service-wide limit on the virtual host.
pub fn ingress_route(service: &str, rate_limit: &RateLimit) -> RouteConfiguration {
    let app_cluster = names::local_app_cluster(service);
    // One entry per map at most: a protobuf map is encoded in no fixed order.
    let limited = |bucket: &TokenBucket, path: Option<&str>| {
        [(
            rate_limit::FILTER.to_string(),
            rate_limit::bucket_config(bucket, &rate_limit::bucket_stat_prefix(path)),
        )]
        .into()
    };
    let app_route = |name: String, matcher: RouteMatch| Route {
        name,
        r#match: Some(matcher),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(app_cluster.clone())),
            ..Default::default()
        })),
        ..Default::default()
    };
    let mut routes: Vec<Route> = rate_limit
        .paths
        .iter()
        .map(|p| Route {
            typed_per_filter_config: limited(&p.bucket, Some(&p.prefix)),
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
        name: names::ingress_route(service),
        virtual_hosts: vec![VirtualHost {
            name: "local".to_string(),
            domains: vec!["*".to_string()],
            routes,
            typed_per_filter_config: rate_limit
                .service
                .as_ref()
                .map(|b| limited(b, None))
                .unwrap_or_default(),
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

/// The egress route configuration from its virtual hosts: the port in `Host` is ignored when
/// picking one (`orders:8080` is `orders`), and stays in the authority for the routes to
/// check (a tunnel route takes only its own port).
pub fn egress_route_configuration(virtual_hosts: Vec<VirtualHost>) -> RouteConfiguration {
    RouteConfiguration {
        ignore_port_in_host_matching: true,
        ..route_configuration(names::EGRESS_ROUTE, virtual_hosts)
    }
}

/// A TCP proxy forwarding each connection to `cluster`, its stats under
/// `tcp.<stat_prefix>.`.
pub fn tcp_proxy(stat_prefix: &str, cluster: &str) -> TcpProxy {
    TcpProxy {
        stat_prefix: stat_prefix.to_string(),
        cluster_specifier: Some(TcpClusterSpecifier::Cluster(cluster.to_string())),
        ..Default::default()
    }
}

/// The network filter running `proxy`.
pub fn tcp_proxy_filter(proxy: TcpProxy) -> Filter {
    Filter {
        name: "envoy.filters.network.tcp_proxy".to_string(),
        config_type: Some(FilterConfig::TypedConfig(pack_any(proxy))),
    }
}

/// `listener` marked as an egress listener: `traffic_direction: OUTBOUND`, so a proxy's
/// drain (`/drain_listeners?inboundonly`) leaves it to the application, and `drain_type:
/// MODIFY_ONLY`, so a proxy failing its health check while it drains does not close the
/// application's connections after each response.
pub fn outbound(mut listener: Listener) -> Listener {
    listener.traffic_direction = TrafficDirection::Outbound.into();
    listener.drain_type = DrainType::ModifyOnly.into();
    listener
}

/// A listener on `host:port` forwarding every connection to `cluster`.
pub fn tcp_listener(name: &str, host: &str, port: u16, cluster: &str) -> Listener {
    Listener {
        name: name.to_string(),
        address: Some(socket_address(host, port)),
        filter_chains: vec![FilterChain {
            filters: vec![tcp_proxy_filter(tcp_proxy(name, cluster))],
            ..Default::default()
        }],
        ..Default::default()
    }
}
