//! Snapshot tests of the Envoy configuration generated for named scenarios.
//!
//! Every scenario goes through the real path: YAML manifests → `parse_manifests` → `Index`
//! → `translate` → `snapshot::build`. The snapshot is a readable rendering of the decoded
//! resources; each test also asserts the facts a user would notice, so that a wrong snapshot
//! accepted by mistake still fails.

use crate::support;

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::process::Command;
use std::time::Duration;

use envoy_types::pb::envoy::config::bootstrap::v3::{Bootstrap, bootstrap::StaticResources};
use envoy_types::util::pack_any;

use envoy_types::pb::envoy::config::cluster::v3::{
    Cluster,
    circuit_breakers::Thresholds,
    cluster::{ClusterDiscoveryType, DiscoveryType, DnsLookupFamily, LbPolicy},
};
use envoy_types::pb::envoy::config::core::v3::{
    Address, RoutingPriority, WatchedDirectory, address, config_source::ConfigSourceSpecifier,
    data_source::Specifier, socket_address::PortSpecifier,
    transport_socket::ConfigType as TransportConfig,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, lb_endpoint::HostIdentifier,
};
use envoy_types::pb::envoy::config::listener::v3::{Listener, filter::ConfigType as FilterConfig};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, Route, RouteConfiguration, VirtualHost, header_matcher::HeaderMatchSpecifier,
    route::Action,
    route_action::ClusterSpecifier, route_match::PathSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
    http_connection_manager::StripPortMode,
};
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Principal, permission, principal};
use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::extensions::filters::network::tcp_proxy::v3::{
    TcpProxy, tcp_proxy::ClusterSpecifier as TcpClusterSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType as HttpFilterConfig;
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, Secret, TlsCertificate,
    UpstreamTlsContext, secret,
    common_tls_context::ValidationContextType, subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    StringMatcher, path_matcher, string_matcher::MatchPattern,
};
use envoy_types::pb::google::protobuf::{Duration as ProtoDuration, UInt32Value};
use prost::{Message, Name};

use serde_json::json;
use support::fixtures::{AccessRule, Fixture, MeshService};

use meshbridge::index::Index;
use meshbridge::model::{DependencyTarget, MeshSettings, MeshState, ProxyGroup};
use meshbridge::snapshot::{ResourceType, Snapshot, build, encode_mesh};
use meshbridge::sources::files::parse_manifests;
use meshbridge::translate::{group_resources, mesh_resources};

// ---------------------------------------------------------------------------------------
// The real path: manifests → index → translate → snapshot.
// ---------------------------------------------------------------------------------------

/// Parses each `(file, text)` and applies it to a fresh index under source `config`.
fn mesh(files: &[(&str, &str)]) -> MeshState {
    let mut index = Index::new();
    for (file, text) in files {
        let objects = parse_manifests(file, text)
            .unwrap_or_else(|errs| panic!("{file}: {}", display_errors(&errs)));
        assert!(
            index.apply("config", file, objects),
            "{file} changed nothing"
        );
    }
    index.state()
}

fn display_errors(errs: &[meshbridge::sources::files::ManifestError]) -> String {
    errs.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn snapshot(state: &MeshState, settings: &MeshSettings, group: &ProxyGroup) -> Snapshot {
    let mesh = encode_mesh(&mesh_resources(state, settings));
    let group = group_resources(state, settings, group);
    build(&mesh, &group).unwrap_or_else(|e| panic!("{e}"))
}

/// The snapshot of the `frontend` proxy (egress, default settings) over the manifests `files`.
fn frontend_snapshot(files: &[(&str, &str)]) -> Snapshot {
    snapshot(
        &mesh(files),
        &MeshSettings::default(),
        &egress_group("frontend", &[]),
    )
}

/// A group with only an egress listener, calling what its node metadata names.
fn egress_group(service: &str, deps: &[&str]) -> ProxyGroup {
    ProxyGroup {
        service: service.to_string(),
        egress_port: Some(15001),
        dependencies: deps.iter().map(|d| d.parse().unwrap()).collect(),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Decoding helpers.
// ---------------------------------------------------------------------------------------

fn decode<M: Message + Name + Default>(snap: &Snapshot, t: ResourceType, name: &str) -> M {
    let r = snap
        .resources(t)
        .get(name)
        .unwrap_or_else(|| panic!("no {t} resource {name:?}; have {:?}", names(snap, t)));
    assert_eq!(r.name, name);
    assert_eq!(r.body.type_url, M::type_url());
    assert_eq!(r.body.type_url, t.type_url());
    M::decode(r.body.value.as_slice()).unwrap()
}

fn names(snap: &Snapshot, t: ResourceType) -> Vec<String> {
    snap.resources(t).keys().cloned().collect()
}

fn cluster(snap: &Snapshot, name: &str) -> Cluster {
    decode(snap, ResourceType::Cluster, name)
}

fn cla(snap: &Snapshot, name: &str) -> ClusterLoadAssignment {
    decode(snap, ResourceType::Endpoint, name)
}

fn listener(snap: &Snapshot, name: &str) -> Listener {
    decode(snap, ResourceType::Listener, name)
}

fn route_config(snap: &Snapshot, name: &str) -> RouteConfiguration {
    decode(snap, ResourceType::Route, name)
}

fn vhost<'a>(rc: &'a RouteConfiguration, name: &str) -> &'a VirtualHost {
    rc.virtual_hosts
        .iter()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no vhost {name:?} in {}", rc.name))
}

fn vhost_names(rc: &RouteConfiguration) -> Vec<&str> {
    rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect()
}

fn std_duration(d: &ProtoDuration) -> Duration {
    Duration::new(d.seconds as u64, d.nanos as u32)
}

fn addr(a: &Option<Address>) -> String {
    match a.as_ref().and_then(|a| a.address.as_ref()) {
        Some(address::Address::SocketAddress(s)) => match s.port_specifier {
            Some(PortSpecifier::PortValue(p)) => format!("{}:{p}", s.address),
            _ => format!("{}:?", s.address),
        },
        other => format!("{other:?}"),
    }
}

/// `(priority, zone, address:port, weight)` of every endpoint of an assignment.
fn lb_endpoints(a: &ClusterLoadAssignment) -> Vec<(u32, String, String, u32)> {
    let mut out = Vec::new();
    for l in &a.endpoints {
        let zone = l
            .locality
            .as_ref()
            .map(|l| l.zone.clone())
            .unwrap_or_default();
        for e in &l.lb_endpoints {
            let address = match &e.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => addr(&ep.address),
                other => format!("{other:?}"),
            };
            let weight = e.load_balancing_weight.as_ref().map_or(0, |w| w.value);
            out.push((l.priority, zone.clone(), address, weight));
        }
    }
    out
}

fn hcm(l: &Listener) -> HttpConnectionManager {
    support::listener_hcm(l)
}

fn rbac_of(l: &Listener) -> Option<HttpRbac> {
    support::listener_rbac(l)
}

fn render_string_matcher(m: &Option<StringMatcher>) -> String {
    match m.as_ref().and_then(|m| m.match_pattern.as_ref()) {
        Some(MatchPattern::Exact(s)) => format!("={s}"),
        Some(MatchPattern::Prefix(s)) => format!("^{s}"),
        Some(MatchPattern::SafeRegex(r)) => format!("~/{}/", r.regex),
        other => format!("{other:?}"),
    }
}

/// Each item rendered, joined by commas.
fn joined<T>(items: &[T], render: fn(&T) -> String) -> String {
    items.iter().map(render).collect::<Vec<_>>().join(", ")
}

fn render_principal(p: &Principal) -> String {
    use principal::Identifier;
    match p.identifier.as_ref().unwrap() {
        Identifier::Any(_) => "any".into(),
        Identifier::OrIds(s) => format!("or({})", joined(&s.ids, render_principal)),
        Identifier::AndIds(s) => format!("and({})", joined(&s.ids, render_principal)),
        Identifier::NotId(p) => format!("not({})", render_principal(p)),
        Identifier::Authenticated(a) if a.principal_name.is_none() => "any certificate".into(),
        Identifier::Authenticated(a) => {
            format!("san{}", render_string_matcher(&a.principal_name))
        }
        Identifier::DirectRemoteIp(c) => format!(
            "ip={}/{}",
            c.address_prefix,
            c.prefix_len.as_ref().map_or(0, |l| l.value)
        ),
        Identifier::Header(h) => render_header(h),
        other => format!("{other:?}"),
    }
}

fn render_header(h: &HeaderMatcher) -> String {
    match &h.header_match_specifier {
        Some(HeaderMatchSpecifier::StringMatch(m)) => {
            format!(
                "header {}{}",
                h.name,
                render_string_matcher(&Some(m.clone()))
            )
        }
        other => format!("header {} {other:?}", h.name),
    }
}

fn render_permission(p: &Permission) -> String {
    use permission::Rule;
    match p.rule.as_ref().unwrap() {
        Rule::Any(_) => "any".into(),
        Rule::OrRules(s) => format!("or({})", joined(&s.rules, render_permission)),
        Rule::AndRules(s) => format!("and({})", joined(&s.rules, render_permission)),
        Rule::UrlPath(m) => match &m.rule {
            Some(path_matcher::Rule::Path(s)) => {
                format!("path{}", render_string_matcher(&Some(s.clone())))
            }
            other => format!("{other:?}"),
        },
        Rule::Header(h) => render_header(h),
        other => format!("{other:?}"),
    }
}

fn render_rbac(r: &HttpRbac) -> String {
    let mut out = String::new();
    for (mode, rules, prefix) in [
        ("enforced", &r.rules, &r.rules_stat_prefix),
        ("shadow", &r.shadow_rules, &r.shadow_rules_stat_prefix),
    ] {
        let Some(rules) = rules else { continue };
        writeln!(
            out,
            "rbac {mode}, stat prefix {prefix:?}, {} policies",
            rules.policies.len()
        )
        .unwrap();
        let sorted: std::collections::BTreeMap<_, _> = rules.policies.iter().collect();
        for (name, p) in sorted {
            writeln!(
                out,
                "  {name}: principals [{}] permissions [{}]",
                p.principals
                    .iter()
                    .map(render_principal)
                    .collect::<Vec<_>>()
                    .join(", "),
                p.permissions
                    .iter()
                    .map(render_permission)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
            .unwrap();
        }
    }
    out
}

fn rds_name(l: &Listener) -> String {
    match hcm(l).route_specifier {
        Some(RouteSpecifier::Rds(r)) => r.route_config_name,
        other => panic!("listener {} has no RDS: {other:?}", l.name),
    }
}

/// The name of the assignment an EDS cluster reads: its EDS service name, else its own.
fn eds_assignment(c: &Cluster) -> String {
    match c.eds_cluster_config.as_ref() {
        Some(cfg) if !cfg.service_name.is_empty() => cfg.service_name.clone(),
        _ => c.name.clone(),
    }
}

fn discovery_type(c: &Cluster) -> DiscoveryType {
    match c.cluster_discovery_type {
        Some(ClusterDiscoveryType::Type(t)) => DiscoveryType::try_from(t).unwrap(),
        ref other => panic!("cluster {} has discovery {other:?}", c.name),
    }
}

fn upstream_tls(c: &Cluster) -> Option<UpstreamTlsContext> {
    let ts = c.transport_socket.as_ref()?;
    match &ts.config_type {
        Some(TransportConfig::TypedConfig(any)) => {
            assert_eq!(any.type_url, UpstreamTlsContext::type_url());
            Some(UpstreamTlsContext::decode(any.value.as_slice()).unwrap())
        }
        other => panic!("unexpected transport socket {other:?}"),
    }
}

/// The cluster a route forwards to, with its timeout.
fn route_target(r: &Route) -> (&str, Option<Duration>) {
    match &r.action {
        Some(Action::Route(a)) => match &a.cluster_specifier {
            Some(ClusterSpecifier::Cluster(c)) => {
                (c.as_str(), a.timeout.as_ref().map(std_duration))
            }
            other => panic!("route {} has {other:?}", r.name),
        },
        other => panic!("route {} is not a cluster route: {other:?}", r.name),
    }
}

/// Status, body and reason header of a direct-response route.
fn direct_response(r: &Route) -> (u32, String, String) {
    let Some(Action::DirectResponse(d)) = &r.action else {
        panic!("route {} is not a direct response: {:?}", r.name, r.action);
    };
    let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
        Some(Specifier::InlineString(s)) => s.clone(),
        other => format!("{other:?}"),
    };
    let reason: Vec<_> = r
        .response_headers_to_add
        .iter()
        .filter_map(|h| h.header.as_ref())
        .filter(|h| h.key == "x-meshbridge-reason")
        .map(|h| h.value.clone())
        .collect();
    assert_eq!(reason.len(), 1, "route {}", r.name);
    (d.status, body, reason[0].clone())
}

// ---------------------------------------------------------------------------------------
// Rendering for the snapshot.
// ---------------------------------------------------------------------------------------

fn render(snap: &Snapshot) -> String {
    let mut out = String::new();
    out.push_str("warnings:\n");
    for w in &snap.warnings {
        writeln!(out, "  - {w}").unwrap();
    }
    for t in ResourceType::ALL {
        writeln!(out, "{t} version {}", snap.version(t)).unwrap();
        for (name, r) in snap.resources(t) {
            writeln!(out, "  {name:?} version {}", r.version).unwrap();
            let body = match t {
                ResourceType::Cluster => render_cluster(&cluster(snap, name)),
                ResourceType::Endpoint => render_assignment(&cla(snap, name)),
                ResourceType::Listener => render_listener(&listener(snap, name)),
                ResourceType::Route => render_routes(&route_config(snap, name)),
                ResourceType::Secret => render_secret(&decode(snap, ResourceType::Secret, name)),
            };
            for line in body.lines() {
                writeln!(out, "    {line}").unwrap();
            }
        }
    }
    out
}

/// The files a secret names and the directory watched for their replacement.
fn render_secret(s: &Secret) -> String {
    let path = |d: &Option<envoy_types::pb::envoy::config::core::v3::DataSource>| match d
        .as_ref()
        .and_then(|d| d.specifier.as_ref())
    {
        Some(Specifier::Filename(f)) => format!("file {f}"),
        other => format!("{other:?}"),
    };
    match &s.r#type {
        Some(secret::Type::TlsCertificate(c)) => format!(
            "certificate {}, key {}, watched {:?}\n",
            path(&c.certificate_chain),
            path(&c.private_key),
            c.watched_directory.as_ref().map(|w| w.path.as_str())
        ),
        Some(secret::Type::ValidationContext(v)) => format!(
            "trusted ca {}, watched {:?}\n",
            path(&v.trusted_ca),
            v.watched_directory.as_ref().map(|w| w.path.as_str())
        ),
        other => format!("{other:?}\n"),
    }
}

fn render_cluster(c: &Cluster) -> String {
    let mut out = String::new();
    let dt = discovery_type(c);
    write!(out, "type: {}", dt.as_str_name()).unwrap();
    if let Some(cfg) = &c.eds_cluster_config {
        let ads = matches!(
            cfg.eds_config
                .as_ref()
                .and_then(|s| s.config_source_specifier.as_ref()),
            Some(ConfigSourceSpecifier::Ads(_))
        );
        write!(out, " (eds via {})", if ads { "ADS" } else { "?" }).unwrap();
        if !cfg.service_name.is_empty() {
            write!(out, " reading assignment {:?}", cfg.service_name).unwrap();
        }
    }
    writeln!(
        out,
        ", lb: {}, connect_timeout: {:?}",
        LbPolicy::try_from(c.lb_policy).unwrap().as_str_name(),
        c.connect_timeout.as_ref().map(std_duration)
    )
    .unwrap();
    if let Some(o) = &c.outlier_detection {
        let n = |v: &Option<UInt32Value>| v.as_ref().map(|v| v.value);
        writeln!(
            out,
            "outlier detection: consecutive 5xx {:?} (enforcing {:?}%), consecutive gateway failure {:?} (enforcing {:?}%), interval {:?}, base ejection {:?}, max ejection {:?}%",
            n(&o.consecutive_5xx),
            n(&o.enforcing_consecutive_5xx),
            n(&o.consecutive_gateway_failure),
            n(&o.enforcing_consecutive_gateway_failure),
            o.interval.as_ref().map(std_duration),
            o.base_ejection_time.as_ref().map(std_duration),
            n(&o.max_ejection_percent),
        )
        .unwrap();
    }
    for t in c.circuit_breakers.iter().flat_map(|b| &b.thresholds) {
        writeln!(out, "circuit breakers: {}", render_thresholds(t)).unwrap();
    }
    if dt == DiscoveryType::LogicalDns || dt == DiscoveryType::StrictDns {
        writeln!(
            out,
            "dns_lookup_family: {}",
            DnsLookupFamily::try_from(c.dns_lookup_family)
                .unwrap()
                .as_str_name()
        )
        .unwrap();
    }
    if let Some(a) = &c.load_assignment {
        out.push_str("load_assignment:\n");
        for line in render_assignment(a).lines() {
            writeln!(out, "  {line}").unwrap();
        }
    }
    if let Some(tls) = upstream_tls(c) {
        writeln!(out, "tls: sni={}", tls.sni).unwrap();
        let ctx = tls.common_tls_context.unwrap_or_default();
        match ctx.validation_context_type {
            Some(ValidationContextType::ValidationContext(v)) => {
                let ca = match v.trusted_ca.as_ref().and_then(|d| d.specifier.as_ref()) {
                    Some(Specifier::Filename(f)) => f.clone(),
                    other => format!("{other:?}"),
                };
                writeln!(out, "  trusted_ca: {ca}").unwrap();
                writeln!(
                    out,
                    "  system_root_certs: {}",
                    v.system_root_certs.is_some()
                )
                .unwrap();
                for m in &v.match_typed_subject_alt_names {
                    writeln!(
                        out,
                        "  san {}: {:?}",
                        SanType::try_from(m.san_type).unwrap().as_str_name(),
                        m.matcher.as_ref().and_then(|m| m.match_pattern.as_ref())
                    )
                    .unwrap();
                }
            }
            other => writeln!(out, "  validation: {other:?}").unwrap(),
        }
    }
    for m in &c.transport_socket_matches {
        let socket = match m
            .transport_socket
            .as_ref()
            .and_then(|t| t.config_type.as_ref())
        {
            Some(TransportConfig::TypedConfig(any)) => {
                let u = UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
                format!(
                    "sni={} {}",
                    u.sni,
                    render_tls(u.common_tls_context.as_ref().unwrap())
                )
            }
            other => format!("{other:?}"),
        };
        let keys: Vec<&String> = m.r#match.iter().flat_map(|s| s.fields.keys()).collect();
        writeln!(out, "transport match {:?} on {keys:?}: {socket}", m.name).unwrap();
    }
    out
}

fn render_thresholds(t: &Thresholds) -> String {
    let n = |v: &Option<UInt32Value>| v.as_ref().map(|v| v.value);
    format!(
        "priority {}, max connections {:?}, pending {:?}, requests {:?}, retries {:?}",
        RoutingPriority::try_from(t.priority).unwrap().as_str_name(),
        n(&t.max_connections),
        n(&t.max_pending_requests),
        n(&t.max_requests),
        n(&t.max_retries),
    )
}

/// Addresses of the instances an assignment marks for mutual TLS.
fn mtls_marked(a: &ClusterLoadAssignment) -> Vec<String> {
    let mut out = Vec::new();
    for e in a.endpoints.iter().flat_map(|l| &l.lb_endpoints) {
        let marked = e.metadata.as_ref().is_some_and(|m| {
            m.filter_metadata
                .get("envoy.transport_socket_match")
                .is_some_and(|s| s.fields.contains_key("mtls"))
        });
        if marked && let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier {
            out.push(addr(&ep.address));
        }
    }
    out
}

fn render_assignment(a: &ClusterLoadAssignment) -> String {
    let mut out = format!("cluster_name: {}\n", a.cluster_name);
    if a.endpoints.is_empty() {
        out.push_str("(no endpoints)\n");
    }
    let marked = mtls_marked(a);
    for l in &a.endpoints {
        let place = l.locality.clone().unwrap_or_default();
        let locality_weight = l
            .load_balancing_weight
            .as_ref()
            .map(|w| format!(" locality weight {}", w.value))
            .unwrap_or_default();
        for e in &l.lb_endpoints {
            let address = match &e.host_identifier {
                Some(HostIdentifier::Endpoint(ep)) => addr(&ep.address),
                other => format!("{other:?}"),
            };
            let weight = e.load_balancing_weight.as_ref().map_or(0, |w| w.value);
            let tls = if marked.contains(&address) {
                " mtls"
            } else {
                ""
            };
            writeln!(
                out,
                "priority {} zone {:?} origin {}{locality_weight}: {address} weight {weight}{tls}",
                l.priority, place.zone, place.sub_zone
            )
            .unwrap();
        }
    }
    out
}

/// The TCP proxy and the network RBAC filter of a listener's first chain, if it forwards
/// connections.
fn tcp_filters(l: &Listener) -> Option<(TcpProxy, Option<NetworkRbac>)> {
    use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
    let typed = |name: &str| {
        l.filter_chains[0]
            .filters
            .iter()
            .find(|f| f.name == name)
            .and_then(|f| match &f.config_type {
                Some(ConfigType::TypedConfig(any)) => Some(any.value.clone()),
                _ => None,
            })
    };
    let proxy = TcpProxy::decode(typed("envoy.filters.network.tcp_proxy")?.as_slice()).unwrap();
    let rbac =
        typed("envoy.filters.network.rbac").map(|v| NetworkRbac::decode(v.as_slice()).unwrap());
    Some((proxy, rbac))
}

fn render_tcp_listener(l: &Listener, proxy: &TcpProxy, rbac: Option<NetworkRbac>) -> String {
    let filters: Vec<&str> = l.filter_chains[0]
        .filters
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    let mut out = format!(
        "address: {}\nfilters {filters:?}, tcp_proxy stat_prefix {}, cluster {:?}\n",
        addr(&l.address),
        proxy.stat_prefix,
        proxy.cluster_specifier,
    );
    out.push_str(&render_chains(l));
    if let Some(r) = rbac {
        out.push_str(&format!("network rbac stat prefix {:?}\n", r.stat_prefix));
        out.push_str(&render_rbac(&HttpRbac {
            rules: r.rules,
            shadow_rules: r.shadow_rules,
            shadow_rules_stat_prefix: r.shadow_rules_stat_prefix,
            ..Default::default()
        }));
    }
    out
}

fn render_listener(l: &Listener) -> String {
    if let Some((proxy, rbac)) = tcp_filters(l) {
        return render_tcp_listener(l, &proxy, rbac);
    }
    let h = hcm(l);
    let filters: Vec<_> = h.http_filters.iter().map(|f| f.name.as_str()).collect();
    let strip = matches!(
        h.strip_port_mode,
        Some(StripPortMode::StripAnyHostPort(true))
    );
    let mut out = format!(
        "address: {}\nhcm stat_prefix {}, rds {:?}, strip_any_host_port {strip}, http_filters {filters:?}\n",
        addr(&l.address),
        h.stat_prefix,
        rds_name(l),
    );
    // Upgrades beyond the default (WebSocket): CONNECT on the egress listener.
    let upgrades: Vec<&str> = h
        .upgrade_configs
        .iter()
        .map(|u| u.upgrade_type.as_str())
        .collect();
    if upgrades != ["websocket"] {
        writeln!(
            out,
            "upgrades {upgrades:?}, h2 allow_connect {:?}",
            h.http2_protocol_options.as_ref().map(|o| o.allow_connect)
        )
        .unwrap();
    }
    out.push_str(&render_chains(l));
    if !h.access_log.is_empty() {
        let names: Vec<&str> = h.access_log.iter().map(|a| a.name.as_str()).collect();
        writeln!(out, "access logs {names:?}").unwrap();
    }
    if let Some(r) = rbac_of(l) {
        out.push_str(&render_rbac(&r));
    }
    out
}

/// The listener filters, and each filter chain's match and transport.
fn render_chains(l: &Listener) -> String {
    let mut out = String::new();
    if !l.listener_filters.is_empty() {
        let names: Vec<&str> = l.listener_filters.iter().map(|f| f.name.as_str()).collect();
        writeln!(out, "listener filters {names:?}").unwrap();
    }
    for c in &l.filter_chains {
        let matched = c
            .filter_chain_match
            .as_ref()
            .map_or("any", |m| m.transport_protocol.as_str());
        let transport = match &c.transport_socket {
            None => "plaintext".to_string(),
            Some(t) => match &t.config_type {
                Some(TransportConfig::TypedConfig(any)) => {
                    let d = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
                    render_tls(d.common_tls_context.as_ref().unwrap())
                        + &format!(
                            ", client certificate required {:?}",
                            d.require_client_certificate.map(|b| b.value)
                        )
                }
                other => format!("{other:?}"),
            },
        };
        writeln!(out, "chain (transport {matched}): {transport}").unwrap();
    }
    out
}

/// Secrets named and the peer SAN required by a TLS context.
fn render_tls(c: &CommonTlsContext) -> String {
    // A secret named over ADS (`name@ads`), or one of the bootstrap's static ones.
    let secret =
        |s: &envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::SdsSecretConfig| {
            match s
                .sds_config
                .as_ref()
                .and_then(|c| c.config_source_specifier.as_ref())
            {
                Some(ConfigSourceSpecifier::Ads(_)) => format!("{}@ads", s.name),
                None => s.name.clone(),
                Some(other) => format!("{}@{other:?}", s.name),
            }
        };
    let certs: Vec<String> = c
        .tls_certificate_sds_secret_configs
        .iter()
        .map(secret)
        .collect();
    let validation = match &c.validation_context_type {
        Some(ValidationContextType::CombinedValidationContext(v)) => format!(
            "ca secret {:?}, peer {}",
            v.validation_context_sds_secret_config.as_ref().map(secret),
            v.default_validation_context
                .as_ref()
                .map(|d| {
                    d.match_typed_subject_alt_names
                        .iter()
                        .map(|m| {
                            format!(
                                "{:?}{}",
                                SanType::try_from(m.san_type).unwrap(),
                                render_string_matcher(&m.matcher)
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(" | ")
                })
                .unwrap_or_default()
        ),
        other => format!("{other:?}"),
    };
    format!("mtls cert secrets {certs:?}, {validation}")
}

fn render_routes(rc: &RouteConfiguration) -> String {
    let mut out = String::new();
    if rc.ignore_port_in_host_matching {
        out.push_str("port in Host ignored when picking a vhost\n");
    }
    for vh in &rc.virtual_hosts {
        writeln!(out, "vhost {:?} domains {:?}", vh.name, vh.domains).unwrap();
        if let Some(limit) = rate_limit_of(&vh.typed_per_filter_config) {
            writeln!(out, "  {}", render_rate_limit(&limit)).unwrap();
        }
        for r in &vh.routes {
            let m = r.r#match.clone().unwrap_or_default();
            let path = match &m.path_specifier {
                Some(PathSpecifier::Prefix(p)) => format!("prefix {p:?}"),
                Some(PathSpecifier::ConnectMatcher(_)) => "CONNECT".to_string(),
                other => format!("{other:?}"),
            };
            let headers: Vec<String> = m
                .headers
                .iter()
                .map(|h| match &h.header_match_specifier {
                    Some(HeaderMatchSpecifier::StringMatch(s)) => match &s.match_pattern {
                        Some(MatchPattern::Exact(v)) if s.ignore_case => {
                            format!("{}={v:?} (any case)", h.name)
                        }
                        Some(MatchPattern::Exact(v)) => format!("{}={v:?}", h.name),
                        Some(MatchPattern::SafeRegex(r)) => format!("{}~{:?}", h.name, r.regex),
                        other => format!("{} {other:?}", h.name),
                    },
                    other => format!("{} {other:?}", h.name),
                })
                .collect();
            writeln!(
                out,
                "  route {:?}: match {path} headers {headers:?}",
                r.name
            )
            .unwrap();
            match &r.action {
                Some(Action::Route(a)) => {
                    let (cluster, timeout) = route_target(r);
                    writeln!(out, "    -> cluster {cluster:?} timeout {timeout:?}").unwrap();
                    for m in &a.request_mirror_policies {
                        let percent = m
                            .runtime_fraction
                            .as_ref()
                            .and_then(|f| f.default_value.as_ref())
                            .map(|v| v.numerator);
                        writeln!(out, "    mirror {percent:?}% to {:?}", m.cluster).unwrap();
                    }
                    match &a.retry_policy {
                        Some(p) => writeln!(
                            out,
                            "    retries {:?} on {:?} per_try_timeout {:?}",
                            p.num_retries.as_ref().map(|n| n.value),
                            p.retry_on,
                            p.per_try_timeout.as_ref().map(std_duration)
                        )
                        .unwrap(),
                        None => out.push_str("    no retries\n"),
                    }
                    for u in a
                        .upgrade_configs
                        .iter()
                        .filter(|u| u.upgrade_type == "CONNECT")
                    {
                        writeln!(
                            out,
                            "    upgrade CONNECT, {}",
                            if u.connect_config.is_some() {
                                "terminated: payload forwarded as TCP"
                            } else {
                                "forwarded"
                            }
                        )
                        .unwrap();
                    }
                }
                Some(Action::DirectResponse(_)) => {
                    let (status, body, reason) = direct_response(r);
                    writeln!(
                        out,
                        "    -> direct response {status}, reason {reason:?}, body {body:?}"
                    )
                    .unwrap();
                }
                other => writeln!(out, "    -> {other:?}").unwrap(),
            }
            if let Some(limit) = rate_limit_of(&r.typed_per_filter_config) {
                writeln!(out, "    {}", render_rate_limit(&limit)).unwrap();
            }
        }
    }
    out
}

/// The local rate limit of a virtual host's or route's per-filter configuration.
fn rate_limit_of(
    per_filter: &std::collections::HashMap<String, envoy_types::pb::google::protobuf::Any>,
) -> Option<LocalRateLimit> {
    assert!(
        per_filter
            .keys()
            .all(|k| k == "envoy.filters.http.local_ratelimit"),
        "{per_filter:?}"
    );
    per_filter
        .get("envoy.filters.http.local_ratelimit")
        .map(|any| LocalRateLimit::decode(any.value.as_slice()).unwrap())
}

/// A rate limit's bucket, share enabled and enforced, status and response headers.
fn render_rate_limit(l: &LocalRateLimit) -> String {
    let percent =
        |p: &Option<RuntimeFractionalPercent>| match p.as_ref().and_then(|p| p.default_value) {
            Some(f) if f.denominator == 0 => format!("{}%", f.numerator),
            Some(f) => format!("{}/{:?}", f.numerator, f.denominator),
            None => "0% (unset)".to_string(),
        };
    let bucket = match l.token_bucket.as_ref() {
        Some(b) => format!(
            "{} per {:?}, burst {}",
            b.tokens_per_fill.as_ref().map_or(1, |t| t.value),
            std_duration(b.fill_interval.as_ref().unwrap()),
            b.max_tokens
        ),
        None => "no bucket".to_string(),
    };
    let headers: Vec<String> = l
        .response_headers_to_add
        .iter()
        .filter_map(|h| h.header.as_ref())
        .map(|h| format!("{}: {}", h.key, h.value))
        .collect();
    format!(
        "rate limit {:?}: {bucket}, enabled {}, enforced {}, status {}, per connection {}, response headers {headers:?}",
        l.stat_prefix,
        percent(&l.filter_enabled),
        percent(&l.filter_enforced),
        l.status
            .map_or("default".to_string(), |s| s.code.to_string()),
        l.local_rate_limit_per_downstream_connection
    )
}

/// Facts every consistent egress snapshot shares: one egress listener on 127.0.0.1 loading
/// route `egress`, whose last vhost is the catch-all 403 listing what is declared (it does
/// not name the calling service: groups calling the same dependencies share the route).
fn check_egress_basics(snap: &Snapshot) -> RouteConfiguration {
    let l = listener(snap, "egress");
    assert_eq!(addr(&l.address), "127.0.0.1:15001");
    assert_eq!(rds_name(&l), "egress");
    let rc = route_config(snap, "egress");
    let last = rc.virtual_hosts.last().unwrap();
    assert_eq!(last.name, "undeclared|*");
    assert_eq!(last.domains, vec!["*"]);
    let (status, body, reason) = direct_response(&last.routes[0]);
    assert_eq!(status, 403);
    assert_eq!(reason, "undeclared-dependency");
    assert!(
        body.contains("not a declared dependency") && body.contains("declared: ["),
        "{body}"
    );
    // "*" appears in exactly one vhost, and domains are unique across vhosts.
    let mut seen = BTreeSet::new();
    for vh in &rc.virtual_hosts {
        for d in &vh.domains {
            assert!(seen.insert(d.to_ascii_lowercase()), "domain {d} twice");
        }
    }
    rc
}

// ---------------------------------------------------------------------------------------
// Scenarios.
// ---------------------------------------------------------------------------------------

/// `orders`: a named port and two instances on it, the second tagged `canary` when `canary`.
fn orders_service(canary: bool) -> String {
    let orders = MeshService::build("orders")
        .set("ports", json!([{"name": "http", "port": 8080}]))
        .endpoint("10.0.0.1", 8080);
    let orders = if canary {
        orders.tagged_endpoint("10.0.0.2", 8080, &["canary"])
    } else {
        orders.endpoint("10.0.0.2", 8080)
    };
    orders.yaml()
}

/// `orders` with a canary instance.
fn orders() -> String {
    orders_service(true)
}

/// `frontend`: calls `orders` with a 2s timeout and three retries of 500ms.
fn frontend() -> String {
    MeshService::build("frontend")
        .dependency_with(json!({
            "service": "orders",
            "timeout": "2s",
            "retries": {"attempts": 3, "on": ["5xx", "reset"], "perTryTimeout": "500ms"},
        }))
        .yaml()
}

fn scenario_a() -> Snapshot {
    frontend_snapshot(&[("frontend.yaml", &frontend()), ("orders.yaml", &orders())])
}

#[test]
fn a_canary_route_precedes_default_route() {
    let snap = scenario_a();
    insta::assert_snapshot!(render(&snap));

    assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);
    assert_eq!(
        names(&snap, ResourceType::Cluster),
        ["orders", "orders|canary"]
    );
    assert_eq!(
        names(&snap, ResourceType::Endpoint),
        ["orders", "orders|canary"]
    );
    for c in ["orders", "orders|canary"] {
        assert_eq!(discovery_type(&cluster(&snap, c)), DiscoveryType::Eds);
    }
    assert_eq!(
        lb_endpoints(&cla(&snap, "orders")),
        [
            (0, String::new(), "10.0.0.1:8080".into(), 1),
            (0, String::new(), "10.0.0.2:8080".into(), 1)
        ]
    );
    assert_eq!(
        lb_endpoints(&cla(&snap, "orders|canary")),
        [(0, String::new(), "10.0.0.2:8080".into(), 1)]
    );

    let rc = check_egress_basics(&snap);
    assert_eq!(vhost_names(&rc), ["orders", "undeclared|*"]);
    let orders = vhost(&rc, "orders");
    assert_eq!(orders.domains, ["orders"]);
    assert_eq!(orders.routes.len(), 2);
    let (canary, default) = (&orders.routes[0], &orders.routes[1]);
    // Canary first, selected by `x-canary: 1` exactly.
    let m = canary.r#match.as_ref().unwrap();
    assert_eq!(m.headers.len(), 1);
    assert_eq!(m.headers[0].name, "x-canary");
    match &m.headers[0].header_match_specifier {
        Some(HeaderMatchSpecifier::StringMatch(s)) => {
            assert_eq!(s.match_pattern, Some(MatchPattern::Exact("1".into())));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        route_target(canary),
        ("orders|canary", Some(Duration::from_secs(2)))
    );
    // Then everything else, with no header condition.
    assert!(default.r#match.as_ref().unwrap().headers.is_empty());
    assert_eq!(
        route_target(default),
        ("orders", Some(Duration::from_secs(2)))
    );
    for r in [canary, default] {
        let Some(Action::Route(a)) = &r.action else {
            unreachable!()
        };
        let p = a.retry_policy.as_ref().unwrap();
        assert_eq!(p.num_retries.as_ref().unwrap().value, 3);
        assert_eq!(p.retry_on, "5xx,reset");
        assert_eq!(
            p.per_try_timeout.as_ref().map(std_duration),
            Some(Duration::from_millis(500))
        );
    }
}

#[test]
fn a_without_canary_instances_there_is_no_canary_route() {
    let snap = frontend_snapshot(&[
        ("frontend.yaml", &frontend()),
        ("orders.yaml", &orders_service(false)),
    ]);
    assert_eq!(names(&snap, ResourceType::Cluster), ["orders"]);
    let rc = check_egress_basics(&snap);
    let routes = &vhost(&rc, "orders").routes;
    assert_eq!(routes.len(), 1);
    assert_eq!(
        route_target(&routes[0]),
        ("orders", Some(Duration::from_secs(2)))
    );
}

fn scenario_b() -> Snapshot {
    let inventory = MeshService::build("inventory")
        .endpoint_with(json!({"address": "10.2.0.1", "port": 9000, "datacenter": "dc2"}))
        .endpoint_with(json!({"address": "10.1.0.1", "port": 9000, "datacenter": "dc1"}))
        .endpoint_with(json!({"address": "10.9.0.1", "port": 9000, "datacenter": "dc9"}))
        .endpoint_with(json!({"address": "10.1.0.2", "port": 9000, "datacenter": "dc1"}))
        .yaml();
    let reports = MeshService::build("reports")
        .endpoint_with(json!({"address": "10.2.0.7", "port": 7000, "datacenter": "dc2"}))
        .endpoint_with(json!({"address": "10.2.0.8", "port": 7000, "datacenter": "dc2"}))
        .yaml();
    let caller = MeshService::build("caller")
        .dependency("inventory")
        .dependency("reports")
        .yaml();
    let state = mesh(&[
        ("caller.yaml", &caller),
        ("inventory.yaml", &inventory),
        ("reports.yaml", &reports),
    ]);
    let settings = MeshSettings {
        datacenters: vec!["dc1".into(), "dc2".into()],
        ..Default::default()
    };
    snapshot(&state, &settings, &egress_group("caller", &[]))
}

#[test]
fn b_datacenters_become_dense_priorities() {
    let snap = scenario_b();
    insta::assert_snapshot!(render(&snap));

    // dc1 (local) first, then dc2, then datacenters no flag names.
    assert_eq!(
        lb_endpoints(&cla(&snap, "inventory")),
        [
            (0, "dc1".into(), "10.1.0.1:9000".into(), 1),
            (0, "dc1".into(), "10.1.0.2:9000".into(), 1),
            (1, "dc2".into(), "10.2.0.1:9000".into(), 1),
            (2, "dc9".into(), "10.9.0.1:9000".into(), 1),
        ]
    );
    // Only dc2 instances: Envoy needs priorities to start at 0.
    assert_eq!(
        lb_endpoints(&cla(&snap, "reports")),
        [
            (0, "dc2".into(), "10.2.0.7:7000".into(), 1),
            (0, "dc2".into(), "10.2.0.8:7000".into(), 1),
        ]
    );
    let rc = check_egress_basics(&snap);
    assert_eq!(vhost_names(&rc), ["inventory", "reports", "undeclared|*"]);
    // Defaults: 15s timeout, one retry on connection failure.
    let r = &vhost(&rc, "reports").routes[0];
    assert_eq!(route_target(r), ("reports", Some(Duration::from_secs(15))));
    let Some(Action::Route(a)) = &r.action else {
        unreachable!()
    };
    let p = a.retry_policy.as_ref().unwrap();
    assert_eq!(p.num_retries.as_ref().unwrap().value, 1);
    assert_eq!(p.retry_on, "connect-failure,refused-stream");
}

fn scenario_c() -> Snapshot {
    let pricing = MeshService::build("pricing")
        .endpoint("10.0.1.1", 80)
        .tagged_endpoint("10.0.1.2", 80, &["weight:5"])
        .endpoint_with(
            json!({"address": "10.0.1.3", "port": 80, "weight": 7, "tags": ["weight:3"]}),
        )
        .tagged_endpoint("10.0.1.4", 80, &["weight:1000"])
        .tagged_endpoint("10.0.1.5", 80, &["weight:0"])
        .endpoint_with(json!({"address": "10.0.1.6", "port": 80, "weight": 128}))
        .yaml();
    let state = mesh(&[("pricing.yaml", &pricing)]);
    snapshot(
        &state,
        &MeshSettings::default(),
        &egress_group("shop", &["pricing"]),
    )
}

#[test]
fn c_weights_from_tags_and_field() {
    let snap = scenario_c();
    insta::assert_snapshot!(render(&snap));

    let weights: Vec<(String, u32)> = lb_endpoints(&cla(&snap, "pricing"))
        .into_iter()
        .map(|(_, _, a, w)| (a, w))
        .collect();
    assert_eq!(
        weights,
        [
            ("10.0.1.1:80".to_string(), 1),   // default
            ("10.0.1.2:80".to_string(), 5),   // tag
            ("10.0.1.3:80".to_string(), 7),   // field wins over tag
            ("10.0.1.4:80".to_string(), 128), // tag clamped to the maximum
            ("10.0.1.5:80".to_string(), 1),   // tag clamped to the minimum
            ("10.0.1.6:80".to_string(), 128),
        ]
    );
    // `shop` has no MeshService: its dependency comes from node metadata alone.
    let rc = check_egress_basics(&snap);
    assert_eq!(vhost_names(&rc), ["pricing", "undeclared|*"]);
}

#[test]
fn c_weight_field_out_of_range_is_rejected() {
    let bad = MeshService::build("pricing")
        .endpoint_with(json!({"address": "10.0.1.1", "port": 80, "weight": 129}))
        .yaml();
    let errs = parse_manifests("pricing.yaml", &bad).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].field.as_deref(), Some("spec.endpoints[0].weight"));
}

fn scenario_d() -> Snapshot {
    let frontend = MeshService::build("frontend")
        .dependency("orders")
        .dependency("ghost")
        .yaml();
    frontend_snapshot(&[("frontend.yaml", &frontend), ("orders.yaml", &orders())])
}

#[test]
fn d_unknown_dependency_gets_503_and_undeclared_gets_403() {
    let snap = scenario_d();
    insta::assert_snapshot!(render(&snap));

    // No cluster for the unknown service: nothing would ever resolve it.
    assert_eq!(
        names(&snap, ResourceType::Cluster),
        ["orders", "orders|canary"]
    );
    let rc = check_egress_basics(&snap);
    assert_eq!(vhost_names(&rc), ["ghost", "orders", "undeclared|*"]);
    let ghost = vhost(&rc, "ghost");
    assert_eq!(ghost.domains, ["ghost"]);
    assert_eq!(ghost.routes.len(), 1);
    let (status, body, reason) = direct_response(&ghost.routes[0]);
    assert_eq!(status, 503);
    assert_eq!(reason, "unknown-service");
    assert!(
        body.contains("ghost") && body.contains("no such service is known"),
        "{body}"
    );
    // The 403 body lists what is declared.
    let (_, body, _) = direct_response(&vhost(&rc, "undeclared|*").routes[0]);
    assert!(body.contains("declared: [ghost, orders]"), "{body}");
}

#[test]
fn d_dependency_becoming_known_replaces_the_503() {
    let frontend = MeshService::build("frontend").dependency("ghost").yaml();
    let ghost = MeshService::build("ghost").endpoint("10.6.6.6", 80).yaml();
    let before = frontend_snapshot(&[("frontend.yaml", &frontend)]);
    let after = frontend_snapshot(&[("frontend.yaml", &frontend), ("ghost.yaml", &ghost)]);
    assert!(names(&before, ResourceType::Cluster).is_empty());
    assert_eq!(names(&after, ResourceType::Cluster), ["ghost"]);
    let rc = route_config(&after, "egress");
    assert_eq!(route_target(&vhost(&rc, "ghost").routes[0]).0, "ghost");
    assert_ne!(
        before.version(ResourceType::Route),
        after.version(ResourceType::Route)
    );
    // The listener itself did not change.
    assert_eq!(
        before.version(ResourceType::Listener),
        after.version(ResourceType::Listener)
    );
}

fn wildcard_mesh() -> MeshState {
    let admin = MeshService::build("admin-console").dependency("*").yaml();
    let frontend = MeshService::build("frontend")
        .dependency("*")
        .dependency_with(json!({"service": "orders", "timeout": "3s"}))
        .yaml();
    let billing = MeshService::build("billing")
        .endpoint("10.3.0.1", 80)
        .yaml();
    mesh(&[
        ("admin.yaml", &admin),
        ("billing.yaml", &billing),
        ("frontend.yaml", &frontend),
        ("orders.yaml", &orders()),
    ])
}

fn wildcard_settings() -> MeshSettings {
    MeshSettings {
        allow_wildcard: vec!["admin-*".into()],
        ..Default::default()
    }
}

fn scenario_e_allowed() -> Snapshot {
    let state = wildcard_mesh();
    snapshot(
        &state,
        &wildcard_settings(),
        &egress_group("admin-console", &[]),
    )
}

#[test]
fn e_wildcard_dependency_of_an_allowed_service() {
    let snap = scenario_e_allowed();
    insta::assert_snapshot!(render(&snap));

    assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);
    let rc = check_egress_basics(&snap);
    // Every service of the mesh, itself included.
    assert_eq!(
        vhost_names(&rc),
        [
            "admin-console",
            "billing",
            "frontend",
            "orders",
            "undeclared|*"
        ]
    );
    assert_eq!(
        names(&snap, ResourceType::Cluster),
        [
            "admin-console",
            "billing",
            "frontend",
            "orders",
            "orders|canary"
        ]
    );
    // Services without instances get an (empty) assignment, not a 503.
    assert!(lb_endpoints(&cla(&snap, "frontend")).is_empty());
    assert_eq!(
        route_target(&vhost(&rc, "frontend").routes[0]).0,
        "frontend"
    );
}

fn scenario_e_denied() -> Snapshot {
    let state = wildcard_mesh();
    snapshot(&state, &wildcard_settings(), &egress_group("frontend", &[]))
}

#[test]
fn e_wildcard_dependency_of_a_service_not_allowed() {
    let snap = scenario_e_denied();
    insta::assert_snapshot!(render(&snap));

    assert_eq!(snap.warnings.len(), 1, "{:?}", snap.warnings);
    assert!(
        snap.warnings[0].contains("\"*\"") && snap.warnings[0].contains("--allow-wildcard"),
        "{}",
        snap.warnings[0]
    );
    let rc = check_egress_basics(&snap);
    // Only the explicit dependency, with its own settings; no vhost for billing etc.
    assert_eq!(vhost_names(&rc), ["orders", "undeclared|*"]);
    assert_eq!(
        route_target(vhost(&rc, "orders").routes.last().unwrap()),
        ("orders", Some(Duration::from_secs(3)))
    );
    assert_eq!(
        names(&snap, ResourceType::Cluster),
        ["orders", "orders|canary"]
    );
}

#[test]
fn e_explicit_settings_win_over_wildcard_settings() {
    let state = wildcard_mesh();
    let settings = MeshSettings {
        allow_wildcard: vec!["*".into()],
        ..Default::default()
    };
    let snap = snapshot(&state, &settings, &egress_group("frontend", &[]));
    let rc = check_egress_basics(&snap);
    assert_eq!(
        route_target(vhost(&rc, "orders").routes.last().unwrap()),
        ("orders", Some(Duration::from_secs(3)))
    );
    assert_eq!(
        route_target(&vhost(&rc, "billing").routes[0]),
        ("billing", Some(Duration::from_secs(15)))
    );
}

fn scenario_f() -> Snapshot {
    let frontend = MeshService::build("frontend")
        .dependency_with(json!({"domain": "https://api.example.com", "timeout": "5s"}))
        .domain("http://legacy.example.com:8080")
        .yaml();
    frontend_snapshot(&[("frontend.yaml", &frontend)])
}

#[test]
fn f_external_domain_dependency() {
    let snap = scenario_f();
    insta::assert_snapshot!(render(&snap));

    assert_eq!(
        names(&snap, ResourceType::Cluster),
        [
            "ext|https|api.example.com|443",
            "ext|http|legacy.example.com|8080",
            // CONNECT tunnels to the https domain (see the `connect` scenario).
            "ext|tunnel|api.example.com|443"
        ]
    );
    // DNS clusters carry their own endpoints: nothing is served over EDS.
    assert!(names(&snap, ResourceType::Endpoint).is_empty());
    let api = cluster(&snap, "ext|https|api.example.com|443");
    assert_eq!(discovery_type(&api), DiscoveryType::LogicalDns);
    assert_eq!(
        lb_endpoints(api.load_assignment.as_ref().unwrap()),
        [(0, String::new(), "api.example.com:443".into(), 0)]
    );
    let tls = upstream_tls(&api).expect("https domain without TLS");
    assert_eq!(tls.sni, "api.example.com");
    let Some(ValidationContextType::ValidationContext(v)) =
        tls.common_tls_context.unwrap().validation_context_type
    else {
        panic!("no validation context");
    };
    // Envoy ignores `system_root_certs` and refuses SAN checks without a trusted CA.
    assert_eq!(
        v.trusted_ca.as_ref().and_then(|d| d.specifier.clone()),
        Some(Specifier::Filename(
            "/etc/ssl/certs/ca-certificates.crt".into()
        ))
    );
    assert_eq!(v.match_typed_subject_alt_names.len(), 1);
    assert_eq!(
        v.match_typed_subject_alt_names[0].san_type,
        SanType::Dns as i32
    );
    assert_eq!(
        v.match_typed_subject_alt_names[0]
            .matcher
            .as_ref()
            .unwrap()
            .match_pattern,
        Some(MatchPattern::Exact("api.example.com".into()))
    );
    let legacy = cluster(&snap, "ext|http|legacy.example.com|8080");
    assert_eq!(discovery_type(&legacy), DiscoveryType::LogicalDns);
    assert!(upstream_tls(&legacy).is_none());

    let rc = check_egress_basics(&snap);
    assert_eq!(
        vhost_names(&rc),
        // Domains in model order (plain http before https), the catch-all last.
        [
            "ext|legacy.example.com",
            "ext|api.example.com",
            "undeclared|*"
        ]
    );
    assert_eq!(
        vhost(&rc, "ext|api.example.com").domains,
        ["api.example.com"]
    );
    // After the CONNECT tunnel route, plain requests: TLS originated by Envoy.
    assert_eq!(
        route_target(&vhost(&rc, "ext|api.example.com").routes[1]),
        (
            "ext|https|api.example.com|443",
            Some(Duration::from_secs(5))
        )
    );
    // Callers send `Host: legacy.example.com:8080`; the port is ignored to pick the vhost.
    assert!(rc.ignore_port_in_host_matching);
}

/// frontend calls `orders`, two https domains (one on a port of its own) and an http one.
fn scenario_connect() -> Snapshot {
    let frontend = MeshService::build("frontend")
        .dependency("orders")
        .domain("https://api.example.com")
        .dependency_with(json!({"domain": "https://files.example.com:8443", "timeout": "5s"}))
        .domain("http://legacy.example.com:8080")
        .yaml();
    frontend_snapshot(&[("frontend.yaml", &frontend), ("orders.yaml", &orders())])
}

#[test]
fn f_https_domains_tunnel_connect_to_their_declared_port_only() {
    let snap = scenario_connect();
    insta::assert_snapshot!(render(&snap));
    assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);

    // A tunnel cluster per https domain: the declared host and port, plain TCP (the client
    // runs its own TLS inside); none for the http domain.
    let clusters = names(&snap, ResourceType::Cluster);
    for (name, endpoint) in [
        ("ext|tunnel|api.example.com|443", "api.example.com:443"),
        (
            "ext|tunnel|files.example.com|8443",
            "files.example.com:8443",
        ),
    ] {
        assert!(clusters.contains(&name.to_string()), "{clusters:?}");
        let c = cluster(&snap, name);
        assert_eq!(discovery_type(&c), DiscoveryType::LogicalDns);
        assert_eq!(
            lb_endpoints(c.load_assignment.as_ref().unwrap()),
            [(0, String::new(), endpoint.into(), 0)]
        );
        assert!(upstream_tls(&c).is_none(), "{name} must not originate TLS");
        assert!(c.transport_socket_matches.is_empty());
    }
    assert!(!clusters.iter().any(|c| c.contains("|tunnel|legacy")));
    // The plain-HTTP path to an https domain still originates TLS.
    assert!(upstream_tls(&cluster(&snap, "ext|https|files.example.com|8443")).is_some());

    let rc = check_egress_basics(&snap);
    // The port stays in the authority for the tunnel routes to check; vhosts ignore it.
    assert!(rc.ignore_port_in_host_matching);
    let files = vhost(&rc, "ext|files.example.com");
    assert_eq!(files.domains, ["files.example.com"]);
    let connect = &files.routes[0];
    let m = connect.r#match.clone().unwrap();
    assert!(matches!(
        m.path_specifier,
        Some(PathSpecifier::ConnectMatcher(_))
    ));
    assert_eq!(m.headers.len(), 1);
    assert_eq!(m.headers[0].name, ":authority");
    let Some(HeaderMatchSpecifier::StringMatch(authority)) = &m.headers[0].header_match_specifier
    else {
        panic!("{:?}", m.headers[0]);
    };
    assert_eq!(
        authority.match_pattern,
        Some(MatchPattern::Exact("files.example.com:8443".into()))
    );
    assert!(authority.ignore_case);
    // Timeout off (the tunnel lasts as long as the client keeps it), no retries, Envoy ends
    // the CONNECT and forwards bytes.
    assert_eq!(
        route_target(connect),
        ("ext|tunnel|files.example.com|8443", Some(Duration::ZERO))
    );
    let Some(Action::Route(action)) = &connect.action else {
        panic!("{connect:?}");
    };
    assert!(action.retry_policy.is_none());
    assert_eq!(action.upgrade_configs.len(), 1);
    assert_eq!(action.upgrade_configs[0].upgrade_type, "CONNECT");
    assert!(action.upgrade_configs[0].connect_config.is_some());
    // Plain requests keep going to the TLS-originating cluster with the dependency's timeout.
    assert_eq!(
        route_target(&files.routes[1]),
        (
            "ext|https|files.example.com|8443",
            Some(Duration::from_secs(5))
        )
    );
    // No tunnel towards a mesh service or an http domain.
    for name in ["orders", "ext|legacy.example.com"] {
        let vh = vhost(&rc, name);
        assert!(
            vh.routes.iter().all(|r| !matches!(
                r.r#match.as_ref().and_then(|m| m.path_specifier.as_ref()),
                Some(PathSpecifier::ConnectMatcher(_))
            )),
            "{name}: {:?}",
            vh.routes
        );
    }
    // Undeclared hosts: the catch-all refuses a CONNECT too, naming what may be tunnelled.
    let undeclared = rc.virtual_hosts.last().unwrap();
    let refuse = &undeclared.routes[1];
    assert!(matches!(
        refuse
            .r#match
            .as_ref()
            .and_then(|m| m.path_specifier.as_ref()),
        Some(PathSpecifier::ConnectMatcher(_))
    ));
    let (status, body, reason) = direct_response(refuse);
    assert_eq!((status, reason.as_str()), (403, "undeclared-dependency"));
    assert!(
        body.contains("[api.example.com:443, files.example.com:8443]"),
        "{body}"
    );

    // The listener: CONNECT allowed (also over HTTP/2), no port stripping (which would
    // hide the port a CONNECT names from the routes), and a CONNECT no route takes (a
    // declared host at another port, a mesh service, an http domain) refused with 403.
    let h = hcm(&listener(&snap, "egress"));
    assert!(h.strip_port_mode.is_none());
    let upgrades: Vec<&str> = h
        .upgrade_configs
        .iter()
        .map(|u| u.upgrade_type.as_str())
        .collect();
    assert_eq!(upgrades, ["websocket", "CONNECT"]);
    assert!(h.http2_protocol_options.unwrap().allow_connect);
    let mapper = h
        .local_reply_config
        .unwrap()
        .mappers
        .into_iter()
        .find(|m| m.status_code.as_ref().map(|c| c.value) == Some(403))
        .expect("no mapper refusing CONNECT");
    let rendered = format!("{:?}", mapper.filter);
    assert!(
        rendered.contains("\"NR\"") && rendered.contains(":method") && rendered.contains("CONNECT"),
        "{rendered}"
    );
    assert!(
        mapper
            .headers_to_add
            .iter()
            .filter_map(|h| h.header.as_ref())
            .any(|h| h.key == "x-meshbridge-reason" && h.value == "undeclared-tunnel")
    );
}

#[test]
fn g_ingress_routes_to_the_local_app() {
    // Methods are written in lower case here: the model upper-cases them.
    let rule = AccessRule::build("orders-callers")
        .target("orders")
        .allow_with(json!({"from": ["frontend"], "methods": ["get"]}))
        .yaml();
    let state = mesh(&[("orders.yaml", &orders()), ("rules.yaml", &rule)]);
    // The rule reaches the model.
    let policy = &state.access["orders"];
    assert_eq!(policy.sources, ["rules.yaml#1"]);
    assert_eq!(policy.rules[0].methods, ["GET"]);

    let group = ProxyGroup {
        service: "orders".into(),
        ingress_host: Some("10.0.0.1".into()),
        ingress_port: Some(15006),
        app_port: Some(8080),
        ..Default::default()
    };
    let snap = snapshot(&state, &MeshSettings::default(), &group);
    insta::assert_snapshot!(render(&snap));

    // No egress port: no egress listener, no mesh clusters.
    assert_eq!(names(&snap, ResourceType::Listener), ["ingress"]);
    assert_eq!(names(&snap, ResourceType::Route), ["ingress"]);
    assert_eq!(names(&snap, ResourceType::Cluster), ["local|app"]);
    assert!(names(&snap, ResourceType::Endpoint).is_empty());
    let l = listener(&snap, "ingress");
    assert_eq!(addr(&l.address), "10.0.0.1:15006");
    assert_eq!(rds_name(&l), "ingress");
    let app = cluster(&snap, "local|app");
    assert_eq!(discovery_type(&app), DiscoveryType::Static);
    assert_eq!(
        lb_endpoints(app.load_assignment.as_ref().unwrap()),
        [(0, String::new(), "127.0.0.1:8080".into(), 0)]
    );
    let rc = route_config(&snap, "ingress");
    assert_eq!(rc.virtual_hosts.len(), 1);
    assert_eq!(rc.virtual_hosts[0].domains, ["*"]);
    assert_eq!(rc.virtual_hosts[0].routes.len(), 1);
    assert_eq!(route_target(&rc.virtual_hosts[0].routes[0]).0, "local|app");

    // Without a host the ingress binds every address.
    let snap = snapshot(
        &state,
        &MeshSettings::default(),
        &ProxyGroup {
            ingress_host: None,
            ..group
        },
    );
    assert_eq!(addr(&listener(&snap, "ingress").address), "0.0.0.0:15006");
}

#[test]
fn g_ingress_and_egress_together() {
    let state = mesh(&[("frontend.yaml", &frontend()), ("orders.yaml", &orders())]);
    let group = ProxyGroup {
        service: "frontend".into(),
        ingress_port: Some(15006),
        app_port: Some(3000),
        egress_port: Some(15001),
        dependencies: [DependencyTarget::Service("orders".into())].into(),
        ..Default::default()
    };
    let snap = snapshot(&state, &MeshSettings::default(), &group);
    assert_eq!(names(&snap, ResourceType::Listener), ["egress", "ingress"]);
    assert_eq!(names(&snap, ResourceType::Route), ["egress", "ingress"]);
    assert_eq!(
        names(&snap, ResourceType::Cluster),
        ["local|app", "orders", "orders|canary"]
    );
    check_egress_basics(&snap);
    // The MeshService's settings win over the bare metadata dependency.
    let rc = route_config(&snap, "egress");
    assert_eq!(
        route_target(&vhost(&rc, "orders").routes[1]),
        ("orders", Some(Duration::from_secs(2)))
    );
}

fn scenario_collide() -> Snapshot {
    // Envoy matches vhost domains case-insensitively and rejects a route configuration that
    // names one twice; the first dependency keeps the name, the others are warned about.
    let upper = MeshService::build("Orders").endpoint("10.0.0.7", 80).yaml();
    let domainlike = MeshService::build("api.example.com")
        .endpoint("10.0.0.8", 80)
        .yaml();
    let frontend = MeshService::build("frontend")
        .dependency("orders")
        .dependency("Orders")
        .dependency("api.example.com")
        .domain("https://API.example.com")
        .yaml();
    frontend_snapshot(&[
        ("api.yaml", &domainlike),
        ("frontend.yaml", &frontend),
        ("orders.yaml", &orders()),
        ("upper.yaml", &upper),
    ])
}

#[test]
fn d_names_that_collide_in_envoy_get_one_vhost() {
    let snap = scenario_collide();
    let rc = check_egress_basics(&snap);
    assert_eq!(
        vhost_names(&rc),
        ["Orders", "api.example.com", "undeclared|*"]
    );
    assert_eq!(route_target(&vhost(&rc, "Orders").routes[0]).0, "Orders");
    assert_eq!(
        route_target(&vhost(&rc, "api.example.com").routes[0]).0,
        "api.example.com"
    );
    assert_eq!(snap.warnings.len(), 2, "{:?}", snap.warnings);
    assert!(
        snap.warnings
            .iter()
            .any(|w| w.starts_with("dependency orders ignored"))
    );
    assert!(
        snap.warnings
            .iter()
            .any(|w| w.starts_with("dependency https://api.example.com:443 ignored"))
    );
    // Nothing is sent for the dependencies that lost.
    assert_eq!(
        names(&snap, ResourceType::Cluster),
        ["Orders", "api.example.com"]
    );
}

// ---------------------------------------------------------------------------------------
// Access control and mutual TLS.
// ---------------------------------------------------------------------------------------

fn access_settings() -> MeshSettings {
    MeshSettings {
        trust_domain: "mesh.local".into(),
        source_ip_identity: true,
        identity_header_from: vec!["edge".into()],
        ..Default::default()
    }
}

fn access_mesh() -> MeshState {
    let orders = MeshService::build("orders")
        .set("mtls", "strict")
        .endpoint("10.0.0.1", 15006)
        .yaml();
    let billing = MeshService::build("billing")
        .endpoint("10.0.0.9", 80)
        .endpoint("10.0.0.10", 80)
        .yaml();
    let payments = MeshService::build("payments")
        .set("mtls", "permissive")
        .endpoint("10.0.0.5", 80)
        .tagged_endpoint("10.0.0.6", 80, &["mtls"])
        .yaml();
    let first = AccessRule::build("orders-api")
        .target("orders")
        .allow_with(json!({
            "from": ["checkout", "billing"],
            "paths": [{"prefix": "/api/"}],
            "methods": ["GET", "POST"],
        }))
        .yaml();
    let second = AccessRule::build("orders-ops")
        .target("orders")
        .action("log")
        .allow_with(json!({
            "from": ["admin-*"],
            "paths": [{"exact": "/status"}, {"regex": "/debug/[a-z]+"}],
        }))
        .allow_with(json!({"from": ["*"], "paths": [{"exact": "/health"}]}))
        .yaml();
    let shadow = AccessRule::build("payments")
        .target("payments")
        .action("log")
        .allow(&["checkout"])
        .yaml();
    mesh(&[
        ("orders.yaml", &orders),
        ("billing.yaml", &billing),
        ("payments.yaml", &payments),
        ("orders-api.yaml", &first),
        ("orders-ops.yaml", &second),
        ("payments-rule.yaml", &shadow),
    ])
}

fn ingress_group(service: &str, tls: bool) -> ProxyGroup {
    ProxyGroup {
        service: service.into(),
        ingress_port: Some(15006),
        app_port: Some(8080),
        tls,
        ..Default::default()
    }
}

fn scenario_access_strict() -> Snapshot {
    snapshot(
        &access_mesh(),
        &access_settings(),
        &ingress_group("orders", true),
    )
}

#[test]
fn h_access_rules_merge_into_enforced_rbac_over_strict_mtls() {
    let state = access_mesh();
    // Two AccessRules, one target: the union of their rules, `deny` because one says so.
    let policy = &state.access["orders"];
    assert_eq!(policy.sources, ["orders-api.yaml#1", "orders-ops.yaml#1"]);
    assert_eq!(policy.rules.len(), 3);
    let snap = scenario_access_strict();
    insta::assert_snapshot!(render(&snap));

    let l = listener(&snap, "ingress");
    // Strict: one chain, TLS only, client certificate of the trust domain required.
    assert_eq!(l.filter_chains.len(), 1);
    assert!(l.filter_chains[0].transport_socket.is_some());
    assert!(l.listener_filters.is_empty());
    let rendered = render_listener(&l);
    assert!(
        rendered.contains("client certificate required Some(true)"),
        "{rendered}"
    );
    assert!(
        rendered.contains("peer Uri^spiffe://mesh.local/service/"),
        "{rendered}"
    );
    // Identity first, then RBAC, then the rate limits, then the router; every call logged.
    let h = hcm(&l);
    let filters: Vec<&str> = h.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        filters,
        [
            "envoy.filters.http.lua",
            "envoy.filters.http.rbac",
            "envoy.filters.http.local_ratelimit",
            "envoy.filters.http.router"
        ]
    );
    assert_eq!(h.access_log[0].name, "envoy.access_loggers.stdout");
    let rbac = rbac_of(&l).unwrap();
    assert!(rbac.shadow_rules.is_none());
    let rules = rbac.rules.unwrap();
    assert_eq!(rules.policies.len(), 3);
    assert_eq!(rbac.rules_stat_prefix, "orders.");
    // billing, hosts without a certificate, is known by its instances' IPs.
    let text = render_rbac(&rbac_of(&l).unwrap());
    assert!(text.contains("ip=10.0.0.9/32"), "{text}");
    assert!(text.contains("ip=10.0.0.10/32"), "{text}");
    // The trusted edge may assert callers.
    assert!(text.contains("header x-client-name=checkout"), "{text}");
}

/// The identity filter's Lua program of `l`, run outside Envoy on `cases` by
/// `tests/it/support/lua_identity.py` (Lua 5.4 with a `handle` of Envoy's Lua API).
fn run_identity_filter(l: &Listener, cases: &serde_json::Value) -> Vec<serde_json::Value> {
    use envoy_types::pb::envoy::extensions::filters::http::lua::v3::Lua;
    let lua = hcm(l)
        .http_filters
        .iter()
        .find(|f| f.name == "envoy.filters.http.lua")
        .and_then(|f| match &f.config_type {
            Some(HttpFilterConfig::TypedConfig(any)) => Lua::decode(any.value.as_slice()).ok(),
            _ => None,
        })
        .unwrap();
    let Some(Specifier::InlineString(script)) = lua.default_source_code.and_then(|d| d.specifier)
    else {
        panic!("no inline Lua program");
    };
    let dir = tempfile::tempdir().unwrap();
    let (script_file, cases_file) = (
        dir.path().join("identity.lua"),
        dir.path().join("cases.json"),
    );
    std::fs::write(&script_file, script).unwrap();
    std::fs::write(&cases_file, cases.to_string()).unwrap();
    let helper = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/support/lua_identity.py"
    );
    let out = support::stdout_of(Command::new(support::venv_tool("python")).args([
        helper.as_ref(),
        script_file.as_os_str(),
        cases_file.as_os_str(),
    ]));
    serde_json::from_slice(&out).unwrap()
}

#[test]
fn h_the_identity_filter_names_the_caller_from_what_the_connection_proves() {
    let snap = scenario_access_strict();
    let spiffe = |s: &str| format!("spiffe://mesh.local/service/{s}");
    let results = run_identity_filter(
        &listener(&snap, "ingress"),
        &serde_json::json!([
            // mTLS: the certificate names the caller; every spelling of the header a caller
            // sent is removed, the found identity set in its place.
            {"headers": [["x-client-name", "admin"], ["x_client_name", "admin"], ["accept", "*/*"]],
             "uri_sans": [spiffe("checkout")], "remote": "10.1.1.1:4000"},
            // No certificate: an instance address of a named caller (source-IP identity).
            {"headers": [], "uri_sans": null, "remote": "10.0.0.9:4000"},
            // The trusted edge may assert a caller; checkout may not.
            {"headers": [["x-client-name", "mobile-app"]], "uri_sans": [spiffe("edge")], "remote": "10.1.1.2:1"},
            {"headers": [["x-client-name", "mobile-app"]], "uri_sans": [spiffe("checkout")], "remote": "10.1.1.3:1"},
            // Nobody known: no identity, and the forged header is gone.
            {"headers": [["x-client-name", "billing"]], "uri_sans": null, "remote": "[fd00::1]:4000"},
            // Another trust domain proves nothing.
            {"headers": [], "uri_sans": ["spiffe://other/service/checkout"], "remote": "10.1.1.4:1"},
        ]),
    );
    let seen: Vec<(String, String, Vec<String>)> = results
        .iter()
        .map(|r| {
            let identity = r["meta"]["meshbridge:identity"]
                .as_str()
                .unwrap()
                .to_string();
            let caller = r["meta"]["meshbridge:caller"].as_str().unwrap().to_string();
            let asserted = r["headers"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|h| h[0].as_str().unwrap().replace('_', "-") == "x-client-name")
                .map(|h| h[1].as_str().unwrap().to_string())
                .collect();
            (identity, caller, asserted)
        })
        .collect();
    let row = |identity: &str, caller: &str, header: &[&str]| {
        (
            identity.to_string(),
            caller.to_string(),
            header.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        )
    };
    assert_eq!(
        seen,
        [
            row("mtls", "checkout", &["checkout"]),
            row("source-ip", "billing", &["billing"]),
            row("header", "mobile-app", &["mobile-app"]),
            row("mtls", "checkout", &["checkout"]),
            row("none", "-", &[]),
            row("none", "-", &[]),
        ]
    );
    // Other headers pass untouched.
    assert!(results[0]["headers"].to_string().contains("accept"));
}

#[test]
fn h_log_mode_is_shadow_rbac_over_permissive_mtls() {
    let snap = snapshot(
        &access_mesh(),
        &access_settings(),
        &ingress_group("payments", true),
    );
    insta::assert_snapshot!(render(&snap));
    let l = listener(&snap, "ingress");
    // Permissive with a certificate: a TLS chain and a plaintext chain, told apart by the
    // TLS inspector.
    let matches: Vec<&str> = l
        .filter_chains
        .iter()
        .map(|c| {
            c.filter_chain_match
                .as_ref()
                .unwrap()
                .transport_protocol
                .as_str()
        })
        .collect();
    assert_eq!(matches, ["tls", "raw_buffer"]);
    assert!(l.filter_chains[0].transport_socket.is_some());
    assert!(l.filter_chains[1].transport_socket.is_none());
    assert_eq!(
        l.listener_filters[0].name,
        "envoy.filters.listener.tls_inspector"
    );
    let rbac = rbac_of(&l).unwrap();
    assert!(rbac.rules.is_none(), "log mode enforces nothing");
    assert_eq!(rbac.shadow_rules.unwrap().policies.len(), 1);
    assert_eq!(rbac.shadow_rules_stat_prefix, "payments.");

    // The same service on a proxy without a certificate: plaintext only.
    let plain = snapshot(
        &access_mesh(),
        &access_settings(),
        &ingress_group("payments", false),
    );
    let l = listener(&plain, "ingress");
    assert_eq!(l.filter_chains.len(), 1);
    assert!(l.filter_chains[0].transport_socket.is_none());
}

#[test]
fn h_strict_service_on_a_proxy_without_certificate_refuses_calls_and_says_why() {
    let snap = snapshot(
        &access_mesh(),
        &access_settings(),
        &ingress_group("orders", false),
    );
    assert!(
        snap.warnings
            .iter()
            .any(|w| w.contains("requires mutual TLS")),
        "{:?}",
        snap.warnings
    );
    let rc = route_config(&snap, "ingress");
    let (status, body, reason) = direct_response(&rc.virtual_hosts[0].routes[0]);
    assert_eq!(status, 503);
    assert_eq!(reason, "mtls-without-certificate");
    assert!(body.contains("no certificate"), "{body}");
}

#[test]
fn h_default_deny_refuses_a_service_without_rules() {
    let settings = MeshSettings {
        default_deny: true,
        ..access_settings()
    };
    let snap = snapshot(&access_mesh(), &settings, &ingress_group("billing", false));
    let rbac = rbac_of(&listener(&snap, "ingress")).unwrap();
    assert!(
        rbac.rules.unwrap().policies.is_empty(),
        "an empty enforced policy set admits nothing"
    );
    // Without the option, no RBAC at all.
    let snap = snapshot(
        &access_mesh(),
        &access_settings(),
        &ingress_group("billing", false),
    );
    assert!(rbac_of(&listener(&snap, "ingress")).is_none());
}

fn scenario_caller_tls() -> Snapshot {
    let mut group = egress_group("checkout", &["orders", "payments", "billing"]);
    group.tls = true;
    group.certificate_files = Some(meshbridge::model::CertificateFiles {
        cert: "/etc/meshbridge/tls/tls.crt".into(),
        key: "/etc/meshbridge/tls/tls.key".into(),
        ca: "/etc/ssl/mesh/ca.crt".into(),
    });
    snapshot(&access_mesh(), &access_settings(), &group)
}

#[test]
fn h_callers_with_certificates_originate_mtls_where_needed() {
    let snap = scenario_caller_tls();
    insta::assert_snapshot!(render(&snap));
    // Strict orders: every instance over mTLS, verifying exactly orders' identity.
    let orders = cluster(&snap, "orders");
    assert_eq!(orders.transport_socket_matches.len(), 1);
    let text = render_cluster(&orders);
    assert!(
        text.contains("peer Uri=spiffe://mesh.local/service/orders"),
        "{text}"
    );
    assert_eq!(mtls_marked(&cla(&snap, "orders")), ["10.0.0.1:15006"]);
    // Permissive payments: only the instance tagged mtls.
    assert_eq!(mtls_marked(&cla(&snap, "payments")), ["10.0.0.6:80"]);
    assert_eq!(cluster(&snap, "payments").transport_socket_matches.len(), 1);
    // billing needs no TLS at all: the plain cluster.
    assert!(
        cluster(&snap, "billing")
            .transport_socket_matches
            .is_empty()
    );

    // A caller without a certificate gets no TLS (it could not present one): strict orders
    // is refused locally, with the reason; payments stays reachable in plaintext.
    let plain = snapshot(
        &access_mesh(),
        &access_settings(),
        &egress_group("checkout", &["orders", "payments"]),
    );
    assert!(!names(&plain, ResourceType::Cluster).contains(&"orders".to_string()));
    assert!(
        cluster(&plain, "payments")
            .transport_socket_matches
            .is_empty()
    );
    let rc = route_config(&plain, "egress");
    let (status, _, reason) = direct_response(&vhost(&rc, "orders").routes[0]);
    assert_eq!((status, reason.as_str()), (503, "mtls-required"));
}

// ---------------------------------------------------------------------------------------
// Passive health (outlier detection) and limits (circuit breakers).
// ---------------------------------------------------------------------------------------

/// `(consecutive 5xx, gateway failures, interval, base ejection, max ejection %)` of a
/// cluster, each enforced 100% of the time.
fn outlier(c: &Cluster) -> (u32, u32, Duration, Duration, u32) {
    let o = c
        .outlier_detection
        .as_ref()
        .unwrap_or_else(|| panic!("cluster {} has no outlier detection", c.name));
    let n = |v: &Option<UInt32Value>| v.as_ref().unwrap().value;
    assert_eq!(n(&o.enforcing_consecutive_5xx), 100, "{}", c.name);
    assert_eq!(
        n(&o.enforcing_consecutive_gateway_failure),
        100,
        "{}",
        c.name
    );
    (
        n(&o.consecutive_5xx),
        n(&o.consecutive_gateway_failure),
        std_duration(o.interval.as_ref().unwrap()),
        std_duration(o.base_ejection_time.as_ref().unwrap()),
        n(&o.max_ejection_percent),
    )
}

/// `(max connections, pending, requests, retries)` of a cluster's one (default priority)
/// threshold.
fn limits(c: &Cluster) -> (u32, u32, u32, u32) {
    let t = &c.circuit_breakers.as_ref().unwrap().thresholds;
    assert_eq!(t.len(), 1, "{}", c.name);
    assert_eq!(t[0].priority, RoutingPriority::Default as i32);
    let n = |v: &Option<UInt32Value>| v.as_ref().unwrap().value;
    (
        n(&t[0].max_connections),
        n(&t[0].max_pending_requests),
        n(&t[0].max_requests),
        n(&t[0].max_retries),
    )
}

const SAFE_OUTLIER: (u32, u32, Duration, Duration, u32) =
    (5, 5, Duration::from_secs(10), Duration::from_secs(30), 50);
const SAFE_LIMITS: (u32, u32, u32, u32) = (1024, 1024, 1024, 3);

/// A caller of `orders` whose dependency sets `overrides` (outlierDetection,
/// circuitBreakers) besides a 2s timeout.
fn caller_with(name: &str, overrides: serde_json::Value) -> String {
    let mut dependency = json!({"service": "orders", "timeout": "2s"});
    for (k, v) in overrides.as_object().unwrap() {
        dependency[k] = v.clone();
    }
    MeshService::build(name).dependency_with(dependency).yaml()
}

fn fast_ejection() -> serde_json::Value {
    json!({
        "outlierDetection": {"consecutive5xx": 3, "interval": "1s", "baseEjectionTime": "30s"},
        "circuitBreakers": {"maxRequests": 100},
    })
}

fn scenario_policy_variant() -> Snapshot {
    frontend_snapshot(&[
        ("frontend.yaml", &caller_with("frontend", fast_ejection())),
        ("orders.yaml", &orders()),
    ])
}

#[test]
fn i_mesh_clusters_carry_safe_outlier_detection_and_limits() {
    let snap = scenario_a();
    for name in ["orders", "orders|canary"] {
        let c = cluster(&snap, name);
        assert_eq!(outlier(&c), SAFE_OUTLIER, "{name}");
        assert_eq!(limits(&c), SAFE_LIMITS, "{name}");
        // The shared cluster reads the assignment of its own name.
        assert_eq!(c.eds_cluster_config.unwrap().service_name, "");
    }
    // The same policy on the mutual-TLS variant of a shared cluster.
    let tls = scenario_caller_tls();
    assert_eq!(outlier(&cluster(&tls, "orders")), SAFE_OUTLIER);
    assert_eq!(limits(&cluster(&tls, "orders")), SAFE_LIMITS);
    // External domains are DNS clusters outside the mesh: Envoy's own behaviour.
    let f = scenario_f();
    let domain = cluster(&f, "ext|https|api.example.com|443");
    assert!(domain.outlier_detection.is_none() && domain.circuit_breakers.is_none());
}

#[test]
fn i_an_override_gets_a_variant_cluster_reading_the_shared_assignment() {
    let snap = scenario_policy_variant();
    insta::assert_snapshot!(render(&snap));
    assert!(snap.warnings.is_empty(), "{:?}", snap.warnings);

    let clusters = names(&snap, ResourceType::Cluster);
    assert_eq!(clusters.len(), 2, "{clusters:?}");
    let (canary, variant) = (&clusters[0], &clusters[1]);
    let hash = variant.strip_prefix("orders|o-").expect(variant);
    assert_eq!(hash.len(), 8, "{variant}");
    assert_eq!(canary, &format!("orders|canary|o-{hash}"));
    // No unused copy of the shared cluster; its assignments are the ones served.
    assert_eq!(
        names(&snap, ResourceType::Endpoint),
        ["orders", "orders|canary"]
    );
    for (name, shared) in [(variant, "orders"), (canary, "orders|canary")] {
        let c = cluster(&snap, name);
        assert_eq!(discovery_type(&c), DiscoveryType::Eds);
        assert_eq!(eds_assignment(&c), shared);
        assert_eq!(
            outlier(&c),
            (3, 5, Duration::from_secs(1), Duration::from_secs(30), 50),
            "{name}: the fields left out keep their defaults"
        );
        assert_eq!(limits(&c), (1024, 1024, 100, 3), "{name}");
    }
    // Both routes of the dependency go to the variants, with its timeout.
    let rc = check_egress_basics(&snap);
    let routes = &vhost(&rc, "orders").routes;
    assert_eq!(
        routes.iter().map(route_target).collect::<Vec<_>>(),
        [
            (canary.as_str(), Some(Duration::from_secs(2))),
            (variant.as_str(), Some(Duration::from_secs(2)))
        ]
    );

    // A caller without overrides keeps the shared clusters.
    let state = mesh(&[
        ("frontend.yaml", &caller_with("frontend", fast_ejection())),
        ("orders.yaml", &orders()),
        ("billing.yaml", &caller_with("billing", json!({}))),
    ]);
    let plain = snapshot(
        &state,
        &MeshSettings::default(),
        &egress_group("billing", &[]),
    );
    assert_eq!(
        names(&plain, ResourceType::Cluster),
        ["orders", "orders|canary"]
    );
    // Overrides equal to the defaults are no override.
    let same = frontend_snapshot(&[
        (
            "frontend.yaml",
            &caller_with(
                "frontend",
                json!({"outlierDetection": {"consecutive5xx": 5, "interval": "10s"}, "circuitBreakers": {"maxRetries": 3}}),
            ),
        ),
        ("orders.yaml", &orders()),
    ]);
    assert_eq!(
        names(&same, ResourceType::Cluster),
        ["orders", "orders|canary"]
    );
}

#[test]
fn i_callers_with_the_same_override_share_one_variant() {
    let other = json!({"outlierDetection": {"consecutive5xx": 4}});
    let state = mesh(&[
        ("frontend.yaml", &caller_with("frontend", fast_ejection())),
        // Same override, other settings (no timeout) and another dependency.
        (
            "backoffice.yaml",
            &MeshService::build("backoffice")
                .dependency_with(json!({
                    "service": "orders",
                    "outlierDetection": fast_ejection()["outlierDetection"],
                    "circuitBreakers": fast_ejection()["circuitBreakers"],
                }))
                .dependency("ghost")
                .yaml(),
        ),
        ("reports.yaml", &caller_with("reports", other)),
        ("orders.yaml", &orders()),
    ]);
    let settings = MeshSettings::default();
    let of = |service: &str| snapshot(&state, &settings, &egress_group(service, &[]));
    let (frontend, backoffice, reports) = (of("frontend"), of("backoffice"), of("reports"));
    let clusters = names(&frontend, ResourceType::Cluster);
    assert_eq!(clusters, names(&backoffice, ResourceType::Cluster));
    for name in &clusters {
        // One variant: same name, same bytes.
        assert_eq!(
            frontend.resources(ResourceType::Cluster)[name],
            backoffice.resources(ResourceType::Cluster)[name],
        );
    }
    assert_eq!(
        frontend.version(ResourceType::Endpoint),
        backoffice.version(ResourceType::Endpoint)
    );
    // Another override is another variant.
    let theirs = names(&reports, ResourceType::Cluster);
    assert_eq!(theirs.len(), 2);
    assert!(
        theirs
            .iter()
            .all(|c| c.starts_with("orders|") && !clusters.contains(c)),
        "{theirs:?} vs {clusters:?}"
    );
    assert_eq!(outlier(&cluster(&reports, &theirs[0])).0, 4);
}

fn scenario_policy_tls() -> Snapshot {
    let mut state = access_mesh();
    let policy: meshbridge::model::ClusterPolicy = meshbridge::model::ClusterPolicy {
        outlier_detection: meshbridge::model::OutlierDetection {
            consecutive_5xx: 2,
            ..Default::default()
        },
        ..Default::default()
    };
    let checkout = state.services.entry("checkout".into()).or_default();
    checkout.name = "checkout".into();
    for target in ["payments", "billing"] {
        checkout.dependencies.push(meshbridge::model::Dependency {
            target: DependencyTarget::Service(target.into()),
            settings: meshbridge::model::DependencySettings {
                cluster: policy,
                ..Default::default()
            },
        });
    }
    let mut group = egress_group("checkout", &[]);
    group.tls = true;
    snapshot(&state, &access_settings(), &group)
}

#[test]
fn i_a_variant_originates_mtls_like_the_shared_cluster_it_replaces() {
    let snap = scenario_policy_tls();
    let clusters = names(&snap, ResourceType::Cluster);
    let variant = |service: &str| {
        let prefix = format!("{service}|o-");
        let name = clusters
            .iter()
            .find(|c| c.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no variant of {service} in {clusters:?}"));
        cluster(&snap, name)
    };
    // Permissive payments has an instance tagged mtls: the variant carries the TLS match,
    // verifying payments' identity; billing needs none.
    let payments = variant("payments");
    assert_eq!(payments.transport_socket_matches.len(), 1);
    assert!(
        render_cluster(&payments).contains("peer Uri=spiffe://mesh.local/service/payments"),
        "{}",
        render_cluster(&payments)
    );
    assert_eq!(outlier(&payments).0, 2);
    assert!(variant("billing").transport_socket_matches.is_empty());
    assert_eq!(mtls_marked(&cla(&snap, "payments")), ["10.0.0.6:80"]);
}

// ---------------------------------------------------------------------------------------
// Local rate limits on the ingress.
// ---------------------------------------------------------------------------------------

/// `orders` limited to 100 requests a second (bursts of 200), with limits of their own for
/// `/api/` and, more specific, `/api/orders/export`; only `frontend` may call it.
fn scenario_rate_limit() -> Snapshot {
    let orders = MeshService::build("orders")
        .endpoint("10.0.0.1", 15006)
        .set(
            "rateLimit",
            json!({
                "requests": 100,
                "burst": 200,
                "paths": [
                    {"prefix": "/api/", "requests": 10, "per": "1m"},
                    {"prefix": "/api/orders/export", "requests": 1, "per": "1h", "burst": 2},
                ],
            }),
        )
        .yaml();
    let rule = AccessRule::build("orders-callers")
        .target("orders")
        .allow(&["frontend"])
        .yaml();
    snapshot(
        &mesh(&[("orders.yaml", &orders), ("rules.yaml", &rule)]),
        &MeshSettings::default(),
        &ingress_group("orders", false),
    )
}

#[test]
fn j_rate_limits_are_buckets_on_the_ingress_routes_refusing_with_429_and_the_reason() {
    let snap = scenario_rate_limit();
    insta::assert_snapshot!(render(&snap));
    // The filter runs after access control and before the router, limiting nothing itself.
    let h = hcm(&listener(&snap, "ingress"));
    let filters: Vec<&str> = h.http_filters.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(
        filters[filters.len() - 3..],
        [
            "envoy.filters.http.rbac",
            "envoy.filters.http.local_ratelimit",
            "envoy.filters.http.router"
        ]
    );
    let Some(HttpFilterConfig::TypedConfig(any)) = &h.http_filters[filters.len() - 2].config_type
    else {
        panic!("no typed config")
    };
    let listener_level = LocalRateLimit::decode(any.value.as_slice()).unwrap();
    assert_eq!(listener_level.token_bucket, None);
    assert_eq!(
        listener_level.filter_enabled, None,
        "enabled for no request"
    );

    // The service-wide bucket on the virtual host; each path's on a route of its own, the
    // longer prefix first, all to the application.
    let rc = route_config(&snap, "ingress");
    let vh = &rc.virtual_hosts[0];
    let bucket = |l: &LocalRateLimit| {
        let b = l.token_bucket.unwrap();
        (
            b.tokens_per_fill.unwrap().value,
            std_duration(&b.fill_interval.unwrap()),
            b.max_tokens,
        )
    };
    let service = rate_limit_of(&vh.typed_per_filter_config).unwrap();
    assert_eq!(bucket(&service), (100, Duration::from_secs(1), 200));
    let routes: Vec<(&str, String, &str)> = vh
        .routes
        .iter()
        .map(|r| {
            let path = match &r.r#match.as_ref().unwrap().path_specifier {
                Some(PathSpecifier::Prefix(p)) => p.clone(),
                other => format!("{other:?}"),
            };
            (r.name.as_str(), path, route_target(r).0)
        })
        .collect();
    assert_eq!(
        routes,
        [
            (
                "rate-limit|/api/orders/export",
                "/api/orders/export".to_string(),
                "local|app"
            ),
            ("rate-limit|/api/", "/api/".to_string(), "local|app"),
            ("app", "/".to_string(), "local|app"),
        ]
    );
    let export = rate_limit_of(&vh.routes[0].typed_per_filter_config).unwrap();
    assert_eq!(bucket(&export), (1, Duration::from_secs(3600), 2));
    let api = rate_limit_of(&vh.routes[1].typed_per_filter_config).unwrap();
    assert_eq!(bucket(&api), (10, Duration::from_secs(60), 10));
    assert_eq!(rate_limit_of(&vh.routes[2].typed_per_filter_config), None);
    for limit in [&service, &export, &api] {
        // Every request checked and refused when over, with 429 and the reason.
        for share in [&limit.filter_enabled, &limit.filter_enforced] {
            let f = share.as_ref().unwrap().default_value.unwrap();
            assert_eq!((f.numerator, f.denominator), (100, 0), "100 of HUNDRED");
        }
        assert_eq!(limit.status.unwrap().code, 429);
        let header = limit.response_headers_to_add[0].header.as_ref().unwrap();
        assert_eq!(
            (header.key.as_str(), header.value.as_str()),
            ("x-meshbridge-reason", "rate-limited")
        );
        assert!(!limit.local_rate_limit_per_downstream_connection);
    }

    // Envoy's 429 keeps the reason and says which service refused, in words.
    let mapper = h
        .local_reply_config
        .unwrap()
        .mappers
        .into_iter()
        .find(|m| {
            use envoy_types::pb::envoy::config::accesslog::v3::access_log_filter::FilterSpecifier;
            matches!(
                m.filter.as_ref().and_then(|f| f.filter_specifier.as_ref()),
                Some(FilterSpecifier::StatusCodeFilter(f))
                    if f.comparison.as_ref().and_then(|c| c.value.as_ref()).map(|v| v.default_value) == Some(429)
            )
        })
        .expect("a local reply for the limiter's 429");
    assert_eq!(mapper.status_code, None, "Envoy's 429 is kept");
    let body = format!("{:?}", mapper.body_format_override);
    assert!(body.contains("too many requests to orders"), "{body}");
    assert!(
        mapper
            .headers_to_add
            .iter()
            .filter_map(|h| h.header.as_ref())
            .any(|h| h.key == "x-meshbridge-reason" && h.value == "rate-limited")
    );

    // Without limits: the same filter chain, and one route without a bucket.
    let unlimited = snapshot(
        &mesh(&[("orders.yaml", &orders())]),
        &MeshSettings::default(),
        &ingress_group("orders", false),
    );
    let rc = route_config(&unlimited, "ingress");
    assert_eq!(rc.virtual_hosts[0].routes.len(), 1);
    assert!(rc.virtual_hosts[0].typed_per_filter_config.is_empty());
    assert!(
        hcm(&listener(&unlimited, "ingress"))
            .http_filters
            .iter()
            .any(|f| f.name == "envoy.filters.http.local_ratelimit")
    );
}

/// The static secrets a bootstrap made with `meshbridge bootstrap --tls-*` declares, over
/// certificate files in `dir`.
fn static_secrets(dir: &std::path::Path) -> Vec<Secret> {
    use envoy_types::pb::envoy::config::core::v3::DataSource;
    support::issue_cert(dir, "orders", "URI:spiffe://mesh.local/service/orders");
    let file = |name: &str| DataSource {
        specifier: Some(Specifier::Filename(dir.join(name).display().to_string())),
        ..Default::default()
    };
    vec![
        Secret {
            name: "server_cert".into(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(file("orders.pem")),
                private_key: Some(file("orders.key")),
                ..Default::default()
            })),
        },
        Secret {
            name: "validation_context".into(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: Some(file("orders-ca.pem")),
                    ..Default::default()
                },
            )),
        },
    ]
}

// ---------------------------------------------------------------------------------------
// Envoy itself accepts every scenario.
// ---------------------------------------------------------------------------------------

/// A TLS context naming its secrets as the bootstrap's static secrets instead of over ADS
/// (`envoy --mode validate` cannot run an SDS subscription; the secrets sent are checked as
/// static secrets of their own, and the real subscription in the end-to-end tests).
fn with_static_secrets(t: &mut envoy_types::pb::envoy::config::core::v3::TransportSocket) {
    let Some(TransportConfig::TypedConfig(any)) = t.config_type.as_mut() else {
        return;
    };
    let strip = |c: &mut CommonTlsContext| {
        for s in &mut c.tls_certificate_sds_secret_configs {
            s.sds_config = None;
        }
        if let Some(ValidationContextType::CombinedValidationContext(v)) =
            c.validation_context_type.as_mut()
            && let Some(s) = v.validation_context_sds_secret_config.as_mut()
        {
            s.sds_config = None;
        }
    };
    if any.type_url == UpstreamTlsContext::type_url() {
        let mut u = UpstreamTlsContext::decode(any.value.as_slice()).unwrap();
        strip(u.common_tls_context.as_mut().unwrap());
        *any = pack_any(u);
    } else {
        let mut d = DownstreamTlsContext::decode(any.value.as_slice()).unwrap();
        strip(d.common_tls_context.as_mut().unwrap());
        *any = pack_any(d);
    }
}

/// The snapshot as a static bootstrap: EDS clusters carry their assignment inline and
/// listeners their route configuration, so `envoy --mode validate` checks everything.
fn static_bootstrap(snap: &Snapshot) -> Bootstrap {
    let mut clusters = Vec::new();
    for name in snap.resources(ResourceType::Cluster).keys() {
        let mut c = cluster(snap, name);
        if discovery_type(&c) == DiscoveryType::Eds {
            let assignment = eds_assignment(&c);
            c.cluster_discovery_type =
                Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32));
            c.eds_cluster_config = None;
            let mut cla = cla(snap, &assignment);
            cla.cluster_name = name.clone();
            c.load_assignment = Some(cla);
        }
        for m in &mut c.transport_socket_matches {
            if let Some(t) = m.transport_socket.as_mut() {
                with_static_secrets(t);
            }
        }
        if let Some(t) = c.transport_socket.as_mut() {
            with_static_secrets(t);
        }
        clusters.push(c);
    }
    let mut listeners = Vec::new();
    for name in snap.resources(ResourceType::Listener).keys() {
        let mut l = listener(snap, name);
        for chain in &mut l.filter_chains {
            if let Some(t) = chain.transport_socket.as_mut() {
                with_static_secrets(t);
            }
        }
        if tcp_filters(&l).is_some() {
            listeners.push(l);
            continue;
        }
        let rc = route_config(snap, &rds_name(&l));
        let mut h = hcm(&l);
        h.route_specifier = Some(RouteSpecifier::RouteConfig(rc));
        for chain in &mut l.filter_chains {
            chain.filters[0].config_type = Some(FilterConfig::TypedConfig(pack_any(h.clone())));
        }
        listeners.push(l);
    }
    Bootstrap {
        static_resources: Some(StaticResources {
            listeners,
            clusters,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[test]
fn envoy_accepts_every_scenario() {
    let state = mesh(&[("frontend.yaml", &frontend()), ("orders.yaml", &orders())]);
    let both = snapshot(
        &state,
        &MeshSettings::default(),
        &ProxyGroup {
            service: "frontend".into(),
            ingress_port: Some(15006),
            app_port: Some(3000),
            egress_port: Some(15001),
            dependencies: ["ghost", "https://api.example.com"]
                .iter()
                .map(|d| d.parse().unwrap())
                .collect(),
            ..Default::default()
        },
    );
    let scenarios = [
        ("a", scenario_a()),
        ("b", scenario_b()),
        ("c", scenario_c()),
        ("d", scenario_d()),
        ("e_allowed", scenario_e_allowed()),
        ("e_denied", scenario_e_denied()),
        ("f", scenario_f()),
        ("connect", scenario_connect()),
        ("collide", scenario_collide()),
        ("ingress_and_egress", both),
        ("access_strict", scenario_access_strict()),
        (
            "access_shadow_permissive",
            snapshot(
                &access_mesh(),
                &access_settings(),
                &ingress_group("payments", true),
            ),
        ),
        ("caller_tls", scenario_caller_tls()),
        ("policy_variant", scenario_policy_variant()),
        ("policy_tls", scenario_policy_tls()),
        ("tcp_callers", scenario_tcp_callers()),
        ("tcp_ingress", scenario_tcp_ingress()),
        ("rate_limit", scenario_rate_limit()),
        ("multi_port_callers", scenario_multi_port_callers()),
        ("multi_port_monitor", scenario_multi_port_monitor()),
        ("multi_port_ingress", scenario_multi_port_ingress()),
        ("migration", scenario_migration(25, 10)),
        ("migration_start", scenario_migration(0, 0)),
    ];
    let envoy = support::envoy_bin();
    let dir = tempfile::tempdir().unwrap();
    let secrets = static_secrets(dir.path());
    for (name, snap) in scenarios {
        let path = dir.path().join(format!("{name}.pb"));
        let mut bootstrap = static_bootstrap(&snap);
        if let Some(r) = bootstrap.static_resources.as_mut() {
            r.secrets = secrets.clone();
            // The secrets sent to the proxy, over files that exist, under other names.
            for name in snap.resources(ResourceType::Secret).keys() {
                let mut s: Secret = decode(&snap, ResourceType::Secret, name);
                let real = secrets.iter().find(|r| r.name == s.name).unwrap();
                match (&mut s.r#type, &real.r#type) {
                    (
                        Some(secret::Type::TlsCertificate(c)),
                        Some(secret::Type::TlsCertificate(r)),
                    ) => {
                        c.certificate_chain = r.certificate_chain.clone();
                        c.private_key = r.private_key.clone();
                        c.watched_directory = Some(WatchedDirectory {
                            path: dir.path().display().to_string(),
                            ..Default::default()
                        });
                    }
                    (
                        Some(secret::Type::ValidationContext(v)),
                        Some(secret::Type::ValidationContext(r)),
                    ) => {
                        v.trusted_ca = r.trusted_ca.clone();
                        v.watched_directory = Some(WatchedDirectory {
                            path: dir.path().display().to_string(),
                            ..Default::default()
                        });
                    }
                    other => panic!("unexpected secret {other:?}"),
                }
                s.name = format!("sent|{}", s.name);
                r.secrets.push(s);
            }
        }
        std::fs::write(&path, bootstrap.encode_to_vec()).unwrap();
        let out = Command::new(&envoy)
            .args(["--mode", "validate", "--disable-hot-restart", "-c"])
            .arg(&path)
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "Envoy rejects scenario {name}:\n{log}"
        );
        assert!(log.contains("OK"), "scenario {name}:\n{log}");
    }
}

#[test]
fn e_services_answer_to_their_consul_and_kubernetes_names() {
    let frontend = MeshService::build("frontend")
        .dependency("orders")
        .dependency("orders.shop")
        .dependency("ghost")
        .yaml();
    let dotted = MeshService::build("orders.shop")
        .endpoint("10.7.7.7", 80)
        .yaml();
    let mut state = mesh(&[
        ("frontend.yaml", &frontend),
        ("orders.yaml", &orders()),
        ("dotted.yaml", &dotted),
    ]);
    // As declared by a MeshService of namespace `shop`.
    state.services.get_mut("orders").unwrap().namespace = Some("shop".into());
    let settings = MeshSettings {
        datacenters: vec!["dc1".into(), "DC2".into()],
        consul_domain: Some("consul".into()),
        cluster_domain: Some("cluster.local".into()),
        ..MeshSettings::default()
    };
    let group = egress_group("frontend", &[]);
    let snap = snapshot(&state, &settings, &group);
    let rc = route_config(&snap, "egress");
    // `orders.shop` is another service's own name: it is not taken from it.
    assert_eq!(
        vhost(&rc, "orders").domains,
        [
            "orders",
            "orders.service.consul",
            "orders.service.dc1.consul",
            "orders.service.dc2.consul",
            "orders.shop.svc",
            "orders.shop.svc.cluster.local",
        ]
    );
    assert_eq!(vhost(&rc, "orders.shop").domains[0], "orders.shop");
    // An unknown service answers 503 by its Consul names too; it has no namespace.
    assert_eq!(
        vhost(&rc, "ghost").domains,
        [
            "ghost",
            "ghost.service.consul",
            "ghost.service.dc1.consul",
            "ghost.service.dc2.consul"
        ]
    );
    // Off: the bare names only.
    let plain = snapshot(&state, &MeshSettings::default(), &group);
    assert_eq!(
        vhost(&route_config(&plain, "egress"), "orders").domains,
        ["orders"]
    );
}

#[test]
fn i_http2_and_grpc_services_are_spoken_to_in_http2() {
    let frontend = MeshService::build("frontend")
        .dependency("grpc-api")
        .dependency("orders")
        .yaml();
    let grpc = MeshService::build("grpc-api")
        .set("ports", json!([{"port": 9000, "protocol": "grpc"}]))
        .endpoint("10.9.9.9", 9000)
        .yaml();
    let snap = frontend_snapshot(&[
        ("frontend.yaml", &frontend),
        ("grpc.yaml", &grpc),
        ("orders.yaml", &orders()),
    ]);
    const OPTIONS: &str = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions";
    assert!(
        cluster(&snap, "grpc-api")
            .typed_extension_protocol_options
            .contains_key(OPTIONS)
    );
    assert!(
        cluster(&snap, "orders")
            .typed_extension_protocol_options
            .is_empty()
    );
    // Towards gRPC, the default retry also covers UNAVAILABLE, and the caller's grpc-timeout
    // is honoured up to the dependency's timeout; towards HTTP/1, neither.
    let routes = route_config(&snap, "egress");
    let action = |service: &str| {
        let Some(Action::Route(action)) = vhost(&routes, service).routes[0].action.clone() else {
            panic!("{service} has no route action");
        };
        action
    };
    let grpc = action("grpc-api");
    let retry = grpc.retry_policy.clone().unwrap();
    assert_eq!(retry.retry_on, "connect-failure,refused-stream,unavailable");
    assert_eq!(
        grpc.max_stream_duration
            .and_then(|m| m.grpc_timeout_header_max)
            .map(|d| d.seconds),
        Some(15)
    );
    // WebSocket passes towards HTTP/1 services only, unless the dependency says otherwise.
    assert_eq!(
        grpc.upgrade_configs
            .iter()
            .map(|u| (u.upgrade_type.as_str(), u.enabled.map(|b| b.value)))
            .collect::<Vec<_>>(),
        [("websocket", Some(false))]
    );
    let http = action("orders");
    assert!(http.upgrade_configs.is_empty());
    assert_eq!(
        http.retry_policy.unwrap().retry_on,
        "connect-failure,refused-stream"
    );
    assert_eq!(http.max_stream_duration, None);
}

// ---------------------------------------------------------------------------------------
// TCP services.
// ---------------------------------------------------------------------------------------

/// `cache` speaks TCP (strict mTLS, one rule admitting `frontend`, one naming paths);
/// `sessions` speaks TCP on a port `frontend` moves; `orders` speaks HTTP.
fn tcp_mesh() -> MeshState {
    let cache = MeshService::build("cache")
        .set("ports", json!([{"port": 6379, "protocol": "tcp"}]))
        .set("mtls", "strict")
        .endpoint("10.0.0.9", 15006)
        .yaml();
    let sessions = MeshService::build("sessions")
        .set("ports", json!([{"port": 6379, "protocol": "tcp"}]))
        .endpoint("10.0.0.10", 15006)
        .yaml();
    let frontend = MeshService::build("frontend")
        .dependency("cache")
        .dependency_with(json!({"service": "sessions", "port": 16379}))
        .dependency("orders")
        .yaml();
    let rule = AccessRule::build("cache-clients")
        .target("cache")
        .allow_with(json!({"from": ["frontend"]}))
        .allow_with(json!({"from": ["reports"], "paths": [{"prefix": "/x"}]}))
        .yaml();
    mesh(&[
        ("cache.yaml", &cache),
        ("sessions.yaml", &sessions),
        ("frontend.yaml", &frontend),
        ("orders.yaml", &orders()),
        ("cache-clients.yaml", &rule),
    ])
}

fn scenario_tcp_callers() -> Snapshot {
    let mut group = egress_group("frontend", &[]);
    group.tls = true;
    snapshot(&tcp_mesh(), &access_settings(), &group)
}

fn scenario_tcp_ingress() -> Snapshot {
    snapshot(
        &tcp_mesh(),
        &access_settings(),
        &ingress_group("cache", true),
    )
}

#[test]
fn j_a_tcp_dependency_gets_its_own_port_and_a_tcp_service_forwards_connections() {
    let snap = scenario_tcp_callers();
    insta::assert_snapshot!(render(&snap));
    // One listener per tcp dependency, on the callee's port or the one the dependency names,
    // forwarding to the service's cluster (its mutual-TLS form: cache is strict).
    let cache = listener(&snap, "egress|tcp|cache");
    assert_eq!(addr(&cache.address), "127.0.0.1:6379");
    let (proxy, _) = tcp_filters(&cache).unwrap();
    assert_eq!(
        format!("{:?}", proxy.cluster_specifier),
        format!("{:?}", Some(TcpClusterSpecifier::Cluster("cache".into())))
    );
    assert_eq!(cluster(&snap, "cache").transport_socket_matches.len(), 1);
    let sessions = listener(&snap, "egress|tcp|sessions");
    assert_eq!(addr(&sessions.address), "127.0.0.1:16379");
    // An HTTP request for a tcp service says where to connect instead.
    let routes = route_config(&snap, "egress");
    let text = render_routes(&routes);
    assert!(text.contains("connect to 127.0.0.1:6379"), "{text}");

    // The callee: network RBAC on the certificate, then the application; the rule naming
    // paths admits no connection, and says so.
    let ingress = scenario_tcp_ingress();
    insta::assert_snapshot!("j_tcp_ingress", render(&ingress));
    let l = listener(&ingress, "ingress");
    let (proxy, rbac) = tcp_filters(&l).unwrap();
    assert_eq!(
        format!("{:?}", proxy.cluster_specifier),
        format!(
            "{:?}",
            Some(TcpClusterSpecifier::Cluster("local|app".into()))
        )
    );
    let rbac = render_rbac(&{
        let r = rbac.unwrap();
        HttpRbac {
            rules: r.rules,
            ..Default::default()
        }
    });
    assert!(
        rbac.contains("spiffe://mesh.local/service/frontend"),
        "{rbac}"
    );
    assert!(!rbac.contains("x-client-name"), "{rbac}");
    assert!(
        ingress
            .warnings
            .iter()
            .any(|w| w.contains("names paths or methods")),
        "{:?}",
        ingress.warnings
    );
}

#[test]
fn j_tcp_ports_that_collide_are_reported_and_wildcards_leave_tcp_services_out() {
    let frontend = MeshService::build("frontend")
        .dependency("cache")
        .dependency("sessions")
        .dependency_with(json!({"service": "orders", "port": 7000}))
        .yaml();
    let state = mesh(&[
        (
            "cache.yaml",
            &MeshService::build("cache")
                .set("ports", json!([{"port": 6379, "protocol": "tcp"}]))
                .yaml(),
        ),
        (
            "sessions.yaml",
            &MeshService::build("sessions")
                .set("ports", json!([{"port": 6379, "protocol": "tcp"}]))
                .yaml(),
        ),
        ("frontend.yaml", &frontend),
        ("orders.yaml", &orders()),
    ]);
    let snap = snapshot(
        &state,
        &MeshSettings::default(),
        &egress_group("frontend", &[]),
    );
    let tcp: Vec<&String> = snap
        .resources(ResourceType::Listener)
        .keys()
        .filter(|n| n.starts_with("egress|tcp|"))
        .collect();
    assert_eq!(tcp, ["egress|tcp|cache"]);
    assert!(
        snap.warnings
            .iter()
            .any(|w| w.contains("sessions not reachable: port 6379 is already used by cache")),
        "{:?}",
        snap.warnings
    );

    // `"*"` reaches HTTP services only: a tcp service opens a port only when named.
    let settings = MeshSettings {
        allow_wildcard: vec!["*".into()],
        ..Default::default()
    };
    let snap = snapshot(&state, &settings, &egress_group("tools", &["*"]));
    assert!(
        !snap
            .resources(ResourceType::Listener)
            .keys()
            .any(|n| n.starts_with("egress|tcp|")),
    );
    let routes = vhost_names(&route_config(&snap, "egress"))
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    assert!(routes.contains(&"orders".to_string()), "{routes:?}");
    assert!(!routes.contains(&"cache".to_string()), "{routes:?}");

    // A port on an external domain, or a further port without a name, is refused.
    let bad = MeshService::build("x")
        .dependency_with(json!({"domain": "https://api.example.com", "port": 7000}))
        .set(
            "ports",
            json!([{"port": 80}, {"port": 81, "protocol": "tcp"}]),
        )
        .yaml();
    let errs = parse_manifests("x.yaml", &bad).unwrap_err();
    let text = errs[0].to_string();
    assert!(
        !text.contains("spec.ports[1].protocol"),
        "a further port may be tcp: {text}"
    );
    assert!(
        text.contains("spec.ports[1].name: required on every port but the first"),
        "{text}"
    );
    assert!(
        text.contains("spec.dependencies[0].port: applies to `service` dependencies only"),
        "{text}"
    );
}

/// `orders` serves its API, an admin port and a `tcp` port from one host; `frontend` calls
/// all three, `monitor` only the admin port.
fn multi_port_mesh() -> MeshState {
    let orders = MeshService::build("orders")
        .set(
            "ports",
            json!([
                {"name": "http", "port": 8080},
                {"name": "admin", "port": 9090, "targetPort": 8081},
                {"name": "db", "port": 5432, "protocol": "tcp"},
            ]),
        )
        .set("mtls", "strict")
        .endpoint_with(json!({
            "address": "10.0.0.7",
            "port": 15006,
            "ports": {"admin": 15100, "db": 15101},
        }))
        .endpoint("10.0.0.8", 15006)
        .yaml();
    let frontend = MeshService::build("frontend")
        .dependency("orders")
        .dependency("orders:admin")
        .dependency("orders:db")
        .yaml();
    let monitor = MeshService::build("monitor")
        .dependency("orders:admin")
        .yaml();
    let rule = AccessRule::build("orders-clients")
        .target("orders")
        .allow_with(json!({"from": ["frontend"]}))
        .allow_with(json!({"from": ["monitor"], "paths": [{"prefix": "/metrics"}]}))
        .yaml();
    mesh(&[
        ("orders.yaml", &orders),
        ("frontend.yaml", &frontend),
        ("monitor.yaml", &monitor),
        ("rule.yaml", &rule),
    ])
}

fn tls_egress_group(service: &str) -> ProxyGroup {
    let mut group = egress_group(service, &[]);
    group.tls = true;
    group
}

fn scenario_multi_port_callers() -> Snapshot {
    snapshot(
        &multi_port_mesh(),
        &access_settings(),
        &tls_egress_group("frontend"),
    )
}

fn scenario_multi_port_monitor() -> Snapshot {
    snapshot(
        &multi_port_mesh(),
        &access_settings(),
        &tls_egress_group("monitor"),
    )
}

fn scenario_multi_port_ingress() -> Snapshot {
    let mut group = ingress_group("orders", true);
    group.ports = [("admin", 15100, 8081), ("db", 15101, 5432)]
        .into_iter()
        .map(|(name, ingress_port, app_port)| {
            (
                name.to_string(),
                meshbridge::model::PortBinding {
                    ingress_port,
                    app_port,
                },
            )
        })
        .collect();
    snapshot(&multi_port_mesh(), &access_settings(), &group)
}

#[test]
fn k_each_further_port_is_a_service_of_its_own_named_by_host_and_served_by_its_own_listener() {
    let state = multi_port_mesh();
    // The instances that serve a port, on that port; the host without it serves only the API.
    let admin = &state.services["orders:admin"];
    assert_eq!(
        admin
            .endpoints
            .iter()
            .map(|e| format!("{}:{}", e.address, e.port))
            .collect::<Vec<_>>(),
        ["10.0.0.7:15100"]
    );
    assert_eq!(admin.mtls, meshbridge::model::MtlsMode::Strict);
    assert!(state.services["orders:db"].protocol.is_tcp());

    let callers = scenario_multi_port_callers();
    insta::assert_snapshot!("k_multi_port_callers", render(&callers));
    let routes = route_config(&callers, "egress");
    let orders = routes
        .virtual_hosts
        .iter()
        .find(|v| v.name == "orders")
        .unwrap();
    // The further ports' routes first, taken by the port named in Host, then the API's.
    let names: Vec<&str> = orders.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["admin|default", "db|tcp-service", "default"]);
    let db = listener(&callers, "egress|tcp|orders:db");
    assert_eq!(addr(&db.address), "127.0.0.1:5432");
    // Callers verify the service's one identity on every port.
    let text = render(&callers);
    assert!(!text.contains("service/orders:admin"), "{text}");

    // A caller of the admin port alone: the API is refused as undeclared.
    let monitor = scenario_multi_port_monitor();
    let routes = route_config(&monitor, "egress");
    let orders = routes
        .virtual_hosts
        .iter()
        .find(|v| v.name == "orders")
        .unwrap();
    let names: Vec<&str> = orders.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, ["admin|default", "undeclared-port"]);

    // The callee: one listener per port it serves, each under the service's AccessRules.
    let ingress = scenario_multi_port_ingress();
    insta::assert_snapshot!("k_multi_port_ingress", render(&ingress));
    let admin = listener(&ingress, "ingress|admin");
    assert_eq!(addr(&admin.address), "0.0.0.0:15100");
    let app = cluster(&ingress, "local|app|admin");
    assert!(
        format!("{:?}", app.load_assignment).contains("8081"),
        "{app:?}"
    );
    let db = listener(&ingress, "ingress|db");
    let (proxy, rbac) = tcp_filters(&db).unwrap();
    assert_eq!(
        format!("{:?}", proxy.cluster_specifier),
        format!(
            "{:?}",
            Some(TcpClusterSpecifier::Cluster("local|app|db".into()))
        )
    );
    assert!(rbac.is_some());

    // A host's port the service does not declare, a bad or repeated port name: refused,
    // each named.
    let bad = MeshService::build("x")
        .set(
            "ports",
            json!([
                {"port": 80},
                {"name": "Admin", "port": 81},
                {"name": "db", "port": 82},
                {"name": "db", "port": 83},
            ]),
        )
        .endpoint_with(json!({"address": "10.0.0.1", "port": 80, "ports": {"metrics": 9102}}))
        .yaml();
    let text = parse_manifests("x.yaml", &bad).unwrap_err()[0].to_string();
    for expected in [
        "spec.ports[1].name: \"Admin\" is not a valid port name",
        "spec.ports[3].name: \"db\" is listed twice",
        "spec.endpoints[0].ports.metrics: \"metrics\" is not a further port of this service (spec.ports[1..] names: [db])",
    ] {
        assert!(text.contains(expected), "{expected}\n{text}");
    }
}

/// `orders` moving from its hosts (two static endpoints, one a canary, and a Consul host in
/// another datacenter) to its pods (two), at `weight` percent, `mirror` percent copied.
fn migration_state(weight: u32, mirror: u32) -> MeshState {
    let orders = MeshService::build("orders")
        .set(
            "migration",
            json!({"to": "kubernetes", "weight": weight, "mirror": mirror}),
        )
        .endpoint("10.0.0.1", 8080)
        .endpoint_with(json!({"address": "10.0.0.2", "port": 8080, "tags": ["canary"]}))
        .yaml();
    let frontend = MeshService::build("frontend").dependency("orders").yaml();
    let mut index = Index::new();
    for (file, text) in [("orders.yaml", &orders), ("frontend.yaml", &frontend)] {
        index.apply("config", file, parse_manifests(file, text).unwrap());
    }
    let endpoint = |address: &str, origin, datacenter: Option<&str>| meshbridge::model::Endpoint {
        address: address.into(),
        port: 15006,
        origin,
        datacenter: datacenter.map(str::to_string),
        tags: Default::default(),
        weight: 1,
        healthy: true,
        ports: Default::default(),
    };
    use meshbridge::index::{EndpointSet, IndexObject};
    use meshbridge::model::Origin;
    index.apply(
        "kubernetes",
        "orders",
        vec![IndexObject::Endpoints(EndpointSet {
            service: "orders".into(),
            endpoints: vec![
                endpoint("10.1.0.1", Origin::Kubernetes, None),
                endpoint("10.1.0.2", Origin::Kubernetes, None),
            ],
        })],
    );
    index.apply(
        "consul",
        "orders",
        vec![IndexObject::Endpoints(EndpointSet {
            service: "orders".into(),
            endpoints: vec![endpoint("10.2.0.1", Origin::Consul, Some("dc2"))],
        })],
    );
    index.state()
}

fn migration_settings() -> MeshSettings {
    MeshSettings {
        datacenters: vec!["dc1".into(), "dc2".into()],
        ..Default::default()
    }
}

fn scenario_migration(weight: u32, mirror: u32) -> Snapshot {
    snapshot(
        &migration_state(weight, mirror),
        &migration_settings(),
        &egress_group("frontend", &[]),
    )
}

#[test]
fn l_a_migration_weighs_localities_by_origin_and_mirrors_to_the_new_one() {
    let snap = scenario_migration(25, 10);
    insta::assert_snapshot!("l_migration", render(&snap));
    let a = cla(&snap, "orders");
    // The local datacenter: the pods' locality takes 25, the hosts' 75 (in hundredths),
    // whatever the instance counts; the other datacenter after them.
    let weights: Vec<(u32, String, String, Option<u32>)> = a
        .endpoints
        .iter()
        .map(|l| {
            let place = l.locality.clone().unwrap_or_default();
            (
                l.priority,
                place.zone,
                place.sub_zone,
                l.load_balancing_weight.as_ref().map(|w| w.value),
            )
        })
        .collect();
    let expected: Vec<(u32, String, String, Option<u32>)> = vec![
        (0, String::new(), "kubernetes".into(), Some(2500)),
        (0, String::new(), "config".into(), Some(7500)),
        (1, "dc2".into(), "consul".into(), Some(7500)),
    ];
    assert_eq!(weights, expected);
    let cluster = cluster(&snap, "orders");
    assert!(cluster.common_lb_config.is_some());
    // A tenth of the requests copied to the pods' cluster.
    let mirror = cla(&snap, "orders|mirror");
    assert_eq!(
        lb_endpoints(&mirror)
            .into_iter()
            .map(|(_, _, a, _)| a)
            .collect::<Vec<_>>(),
        ["10.1.0.1:15006", "10.1.0.2:15006"]
    );
    let text = render_routes(&route_config(&snap, "egress"));
    assert!(text.contains("mirror"), "{text}");

    // At 0 the pods wait one priority down (taken only when the hosts are gone), and no
    // copies without `mirror`.
    let start = scenario_migration(0, 0);
    let a = cla(&start, "orders");
    let pods: Vec<u32> = a
        .endpoints
        .iter()
        .filter(|l| {
            l.locality
                .as_ref()
                .is_some_and(|p| p.sub_zone == "kubernetes")
        })
        .map(|l| l.priority)
        .collect();
    assert_eq!(pods, [1]);
    assert!(
        start
            .resources(ResourceType::Cluster)
            .get("orders|mirror")
            .is_none()
    );
}
