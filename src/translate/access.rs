//! The ingress listener: who is calling, whether they may, and a record of it.
//!
//! Three pieces, in the order a request meets them:
//!
//! 1. **Transport**: by the service's `mtls` mode and whether the proxy holds a certificate,
//!    plaintext, mutual TLS, or both (a TLS inspector picks the filter chain).
//! 2. **Identity** (a small Lua filter): the caller is the service named by its certificate's
//!    SPIFFE id; without a certificate, with `--source-ip-identity`, the service whose instance
//!    has the connection's source address; a peer whose certificate names a service allowed by
//!    `--identity-header-from` may assert it in `x-client-name`. Every other incoming spelling
//!    of `x-client-name` is removed, and the identity found is set in its place for the
//!    application and recorded for the access log. Paths are normalized before anything looks
//!    at them.
//! 3. **Authorization** (Envoy RBAC, built by [`rbac_config`]): the target's merged
//!    AccessRules as ALLOW policies. Principals are matched on what the connection proves
//!    (certificate SAN, source address of a connection without certificate), never on the
//!    header the identity filter wrote, except for a trusted peer's assertion. `deny`
//!    enforces; `log` runs the same policies as shadow rules, so the call passes and is counted
//!    as a shadow denial (enforced anyway under `--default-deny`).
//!
//! Every request is logged as one JSON line on the proxy's standard output, with the caller,
//! how it was identified and the RBAC outcome; Envoy counts decisions per target in
//! `http.ingress.rbac.<target>.{allowed,denied,shadow_allowed,shadow_denied}`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::core::v3::{
    CidrRange, DataSource, SubstitutionFormatString, data_source::Specifier,
    substitution_format_string::Format,
};
use envoy_types::pb::envoy::config::listener::v3::{
    Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter,
    filter::ConfigType as FilterConfig, listener_filter::ConfigType as ListenerFilterConfig,
};
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal, rbac::Action as RbacAction,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, RouteConfiguration, header_matcher::HeaderMatchSpecifier,
};
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{
    StdoutAccessLog, stdout_access_log::AccessLogFormat,
};
use envoy_types::pb::envoy::extensions::filters::http::lua::v3::Lua;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::listener::tls_inspector::v3::TlsInspector;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, HttpFilter, Rds,
    http_connection_manager::{PathWithEscapedSlashesAction, RouteSpecifier},
    http_filter::ConfigType as HttpFilterConfig,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher::MatchPattern,
};
use envoy_types::pb::google::protobuf::{Any, BoolValue, Struct, UInt32Value, Value, value::Kind};
use envoy_types::util::pack_any;
use prost::{Message, Name};

use crate::model::{
    AccessAction, AccessPolicy, AccessRuleSet, CallerMatch, MeshSettings, MeshState, MtlsMode,
    PathMatch, glob_match,
};

use super::clusters::{ads_config_source, socket_address};
use super::{IngressSpec, listeners, names, tls};

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
pub fn ingress(state: &MeshState, settings: &MeshSettings, spec: &IngressSpec) -> Ingress {
    let group = spec;
    let mode = state
        .services
        .get(&group.service)
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
            names::INGRESS_ROUTE,
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
        listeners::ingress_route()
    };
    let policy = state.access.get(&group.service);
    let addresses = CallerAddresses::new(policy, state, settings);
    let rbac = rbac_config_with(&group.service, policy, settings, &addresses);
    let mode_name = match &rbac {
        None => "off",
        Some(r) if r.rules.is_none() => "log",
        Some(_) => "deny",
    };
    let mut http_filters = vec![identity_filter(settings, &addresses)];
    if let Some(rbac) = rbac {
        http_filters.push(HttpFilter {
            name: "envoy.filters.http.rbac".to_string(),
            config_type: Some(HttpFilterConfig::TypedConfig(encode_rbac(rbac))),
            ..Default::default()
        });
    }
    http_filters.push(HttpFilter {
        name: "envoy.filters.http.router".to_string(),
        config_type: Some(HttpFilterConfig::TypedConfig(pack_any(Router::default()))),
        ..Default::default()
    });
    let hcm = HttpConnectionManager {
        stat_prefix: names::INGRESS_LISTENER.to_string(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads_config_source()),
            route_config_name: names::INGRESS_ROUTE.to_string(),
        })),
        http_filters,
        access_log: vec![access_log(&group.service, mode_name)],
        // Paths are matched by RBAC as the application will read them: `/api/../admin` and
        // `//admin` are normalized first, and an escaped slash (`/api%2F..%2Fadmin`) is
        // unescaped and the caller redirected, as Envoy advises for path-based access rules.
        normalize_path: Some(BoolValue { value: true }),
        merge_slashes: true,
        path_with_escaped_slashes_action: PathWithEscapedSlashesAction::UnescapeAndRedirect as i32,
        ..Default::default()
    };
    let filters = vec![Filter {
        name: "envoy.filters.network.http_connection_manager".to_string(),
        config_type: Some(FilterConfig::TypedConfig(pack_any(hcm))),
    }];
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
            name: names::INGRESS_LISTENER.to_string(),
            address: Some(socket_address(host, port)),
            filter_chains,
            listener_filters,
            ..Default::default()
        },
        route,
        warnings,
    }
}

// ---------------------------------------------------------------------------------------
// Authorization
// ---------------------------------------------------------------------------------------

/// The RBAC filter configuration of `target`'s ingress, or `None` when every call is allowed
/// (no AccessRule targets it and the mesh is not default-deny).
///
/// Each merged rule becomes one ALLOW policy `rule-N` (N its position in the merged, sorted
/// rules): any of its callers, and any of its paths (all when none), and any of its methods
/// (all when none). With `deny` the policies are enforced: a call none of them admits gets 403.
/// With `log` they are shadow rules, unless the mesh is default-deny, where `log` is enforced
/// like `deny` (a team's rule cannot open what the operator closed). Default-deny without a
/// rule is an enforced empty policy set, which admits nothing.
pub fn rbac_config(
    target: &str,
    policy: Option<&AccessPolicy>,
    state: &MeshState,
    settings: &MeshSettings,
) -> Option<HttpRbac> {
    let addresses = CallerAddresses::new(policy, state, settings);
    rbac_config_with(target, policy, settings, &addresses)
}

fn rbac_config_with(
    target: &str,
    policy: Option<&AccessPolicy>,
    settings: &MeshSettings,
    addresses: &CallerAddresses<'_>,
) -> Option<HttpRbac> {
    let (action, rules): (AccessAction, &[AccessRuleSet]) = match policy {
        // Under default-deny, `log` cannot open a service: calls no rule allows are refused.
        Some(p) if settings.default_deny => (AccessAction::Deny, &p.rules),
        Some(p) => (p.action, &p.rules),
        None if settings.default_deny => (AccessAction::Deny, &[]),
        None => return None,
    };
    let policies: HashMap<String, Policy> = rules
        .iter()
        .enumerate()
        .map(|(i, rule)| (format!("rule-{i}"), rule_policy(rule, settings, addresses)))
        .collect();
    let config = Rbac {
        action: RbacAction::Allow as i32,
        policies,
        ..Default::default()
    };
    let prefix = format!("{target}.");
    Some(match action {
        AccessAction::Deny => HttpRbac {
            rules: Some(config),
            rules_stat_prefix: prefix,
            ..Default::default()
        },
        AccessAction::Log => HttpRbac {
            shadow_rules: Some(config),
            shadow_rules_stat_prefix: prefix,
            ..Default::default()
        },
    })
}

fn rule_policy(
    rule: &AccessRuleSet,
    settings: &MeshSettings,
    addresses: &CallerAddresses<'_>,
) -> Policy {
    let mut checks = Vec::new();
    if !rule.paths.is_empty() {
        checks.push(any_permission(
            rule.paths
                .iter()
                .map(|p| Permission {
                    rule: Some(permission::Rule::UrlPath(PathMatcher {
                        rule: Some(path_matcher::Rule::Path(path_matcher_of(p))),
                    })),
                })
                .collect(),
        ));
    }
    if !rule.methods.is_empty() {
        checks.push(any_permission(
            rule.methods
                .iter()
                .map(|m| Permission {
                    rule: Some(permission::Rule::Header(header_exact(":method", m))),
                })
                .collect(),
        ));
    }
    let permission = match checks.len() {
        0 => Permission {
            rule: Some(permission::Rule::Any(true)),
        },
        1 => checks.remove(0),
        _ => Permission {
            rule: Some(permission::Rule::AndRules(permission::Set {
                rules: checks,
            })),
        },
    };
    let callers = rule
        .from
        .iter()
        .map(|c| caller_principal(c, settings, addresses))
        .collect();
    Policy {
        permissions: vec![permission],
        principals: vec![any_principal(callers)],
        ..Default::default()
    }
}

fn any_permission(mut rules: Vec<Permission>) -> Permission {
    if rules.len() == 1 {
        return rules.remove(0);
    }
    Permission {
        rule: Some(permission::Rule::OrRules(permission::Set { rules })),
    }
}

fn any_principal(mut ids: Vec<Principal>) -> Principal {
    if ids.len() == 1 {
        return ids.remove(0);
    }
    Principal {
        identifier: Some(principal::Identifier::OrIds(principal::Set { ids })),
    }
}

fn path_matcher_of(p: &PathMatch) -> StringMatcher {
    StringMatcher {
        match_pattern: Some(match p {
            PathMatch::Exact(s) => MatchPattern::Exact(s.clone()),
            PathMatch::Prefix(s) => MatchPattern::Prefix(s.clone()),
            PathMatch::Regex(r) => MatchPattern::SafeRegex(RegexMatcher {
                regex: r.clone(),
                ..Default::default()
            }),
        }),
        ..Default::default()
    }
}

fn header_exact(name: &str, value: &str) -> HeaderMatcher {
    header_matching(name, exact_or_glob(value, ""))
}

fn header_matching(name: &str, matcher: StringMatcher) -> HeaderMatcher {
    HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(matcher)),
        ..Default::default()
    }
}

/// Matches `prefix` followed by a service name matching `glob` (exactly, for a plain name).
fn exact_or_glob(glob: &str, prefix: &str) -> StringMatcher {
    let pattern = if glob.contains('*') {
        let parts: Vec<String> = glob.split('*').map(regex::escape).collect();
        MatchPattern::SafeRegex(RegexMatcher {
            regex: format!("{}{}", regex::escape(prefix), parts.join("[^/,]*")),
            ..Default::default()
        })
    } else {
        MatchPattern::Exact(format!("{prefix}{glob}"))
    };
    StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    }
}

/// The principal of callers matching `caller`: its certificate names a matching service; or,
/// with source-IP identity, it connects from an instance address of a matching service; or a
/// trusted peer asserts a matching name in `x-client-name`.
fn caller_principal(
    caller: &CallerMatch,
    settings: &MeshSettings,
    addresses: &CallerAddresses<'_>,
) -> Principal {
    let glob = match caller {
        CallerMatch::Any => {
            return Principal {
                identifier: Some(principal::Identifier::Any(true)),
            };
        }
        CallerMatch::Service(glob) => glob,
    };
    let mut ids = vec![certificate_principal(glob, settings)];
    if settings.source_ip_identity {
        let addresses: Vec<Principal> = addresses
            .of(glob)
            .iter()
            .map(|ip| Principal {
                identifier: Some(principal::Identifier::DirectRemoteIp(CidrRange {
                    address_prefix: ip.to_string(),
                    prefix_len: Some(UInt32Value {
                        value: if ip.is_ipv4() { 32 } else { 128 },
                    }),
                })),
            })
            .collect();
        if !addresses.is_empty() {
            // Only for a connection without a certificate: one that presents a certificate
            // is whoever the certificate says, wherever it connects from.
            ids.push(Principal {
                identifier: Some(principal::Identifier::AndIds(principal::Set {
                    ids: vec![
                        Principal {
                            identifier: Some(principal::Identifier::NotId(Box::new(Principal {
                                identifier: Some(principal::Identifier::Authenticated(
                                    principal::Authenticated {
                                        principal_name: None,
                                    },
                                )),
                            }))),
                        },
                        any_principal(addresses),
                    ],
                })),
            });
        }
    }
    if !settings.identity_header_from.is_empty() {
        // A peer may assert identities only when its own is proven by a certificate.
        let trusted = any_principal(
            settings
                .identity_header_from
                .iter()
                .map(|peer| certificate_principal(peer, settings))
                .collect(),
        );
        ids.push(Principal {
            identifier: Some(principal::Identifier::AndIds(principal::Set {
                ids: vec![
                    trusted,
                    Principal {
                        identifier: Some(principal::Identifier::Header(header_matching(
                            names::IDENTITY_HEADER,
                            exact_or_glob(glob, ""),
                        ))),
                    },
                ],
            })),
        });
    }
    any_principal(ids)
}

/// A peer whose verified certificate names a service matching `glob`.
fn certificate_principal(glob: &str, settings: &MeshSettings) -> Principal {
    Principal {
        identifier: Some(principal::Identifier::Authenticated(
            principal::Authenticated {
                principal_name: Some(exact_or_glob(
                    glob,
                    &names::spiffe_prefix(&settings.trust_domain),
                )),
            },
        )),
    }
}

/// With source-IP identity, the instance addresses (IPs only) of the callers one target's
/// rules name, looked up once per ingress and shared by RBAC and the identity filter. Only
/// named callers are looked up, so that an instance change elsewhere in the mesh does not
/// change this proxy's configuration.
#[derive(Debug, Default)]
pub struct CallerAddresses<'a> {
    by_glob: BTreeMap<&'a str, Vec<IpAddr>>,
    by_ip: BTreeMap<IpAddr, BTreeSet<&'a str>>,
}

impl<'a> CallerAddresses<'a> {
    /// Looks up the callers `policy` names (nothing without source-IP identity).
    pub fn new(
        policy: Option<&'a AccessPolicy>,
        state: &'a MeshState,
        settings: &MeshSettings,
    ) -> Self {
        let mut out = CallerAddresses::default();
        if !settings.source_ip_identity {
            return out;
        }
        let globs = policy
            .into_iter()
            .flat_map(|p| &p.rules)
            .flat_map(|r| &r.from)
            .filter_map(|c| match c {
                CallerMatch::Service(g) => Some(g.as_str()),
                CallerMatch::Any => None,
            });
        for glob in globs {
            if out.by_glob.contains_key(glob) {
                continue;
            }
            let services: Vec<&'a crate::model::Service> = if glob.contains('*') {
                state
                    .services
                    .values()
                    .filter(|s| glob_match(glob, &s.name))
                    .collect()
            } else {
                state.services.get(glob).into_iter().collect()
            };
            let mut ips = Vec::new();
            for service in services {
                for e in &service.endpoints {
                    if let Ok(ip) = e.address.parse::<IpAddr>() {
                        ips.push(ip);
                        out.by_ip.entry(ip).or_default().insert(&service.name);
                    }
                }
            }
            ips.sort_unstable();
            ips.dedup();
            out.by_glob.insert(glob, ips);
        }
        out
    }

    /// The addresses of services matching `glob`, sorted.
    pub fn of(&self, glob: &str) -> &[IpAddr] {
        self.by_glob.get(glob).map_or(&[], Vec::as_slice)
    }
}

/// Encodes an RBAC filter configuration with its policies in name order. Protobuf maps have no
/// defined order and prost writes a `HashMap` in iteration order, which differs between runs;
/// a resource's version is the hash of its bytes, so each policy is written as a separate
/// message and the messages concatenated, which protobuf parsers merge (maps accumulate).
pub fn encode_rbac(mut config: HttpRbac) -> Any {
    let rules = config
        .rules
        .as_mut()
        .map(|r| (r.action, std::mem::take(&mut r.policies)));
    let shadow_rules = config
        .shadow_rules
        .as_mut()
        .map(|r| (r.action, std::mem::take(&mut r.policies)));
    // The configuration without policies (an enforced empty set stays: it denies everything).
    let mut value = config.encode_to_vec();
    for (shadow, rules) in [(false, rules), (true, shadow_rules)] {
        let Some((action, policies)) = rules else {
            continue;
        };
        let sorted: BTreeMap<String, Policy> = policies.into_iter().collect();
        for (name, policy) in sorted {
            let one = Rbac {
                action,
                policies: HashMap::from([(name, policy)]),
                ..Default::default()
            };
            let part = if shadow {
                HttpRbac {
                    shadow_rules: Some(one),
                    ..Default::default()
                }
            } else {
                HttpRbac {
                    rules: Some(one),
                    ..Default::default()
                }
            };
            value.extend(part.encode_to_vec());
        }
    }
    Any {
        type_url: HttpRbac::type_url(),
        value,
    }
}

// ---------------------------------------------------------------------------------------
// Identity
// ---------------------------------------------------------------------------------------

fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\{}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A glob as an anchored Lua pattern.
fn lua_pattern(glob: &str) -> String {
    let mut out = String::from("^");
    for c in glob.chars() {
        match c {
            '*' => out.push_str("[^/,]*"),
            '^' | '$' | '(' | ')' | '%' | '.' | '[' | ']' | '+' | '-' | '?' => {
                out.push('%');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push('$');
    out
}

/// The Lua source of the identity filter of `target`.
pub fn identity_script(settings: &MeshSettings, addresses: &CallerAddresses<'_>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    s.push_str("-- meshbridge: who is calling (see the translate::access module)\n");
    s.push_str(&format!(
        "local prefix = {}\n",
        lua_string(&names::spiffe_prefix(&settings.trust_domain))
    ));
    s.push_str("local by_ip = {\n");
    for (ip, services) in &addresses.by_ip {
        let joined: Vec<&str> = services.iter().copied().collect();
        // An IP needs no escaping.
        let _ = writeln!(s, "  [\"{ip}\"] = {},", lua_string(&joined.join(",")));
    }
    s.push_str("}\nlocal trusted = {");
    for glob in &settings.identity_header_from {
        s.push_str(&lua_string(&lua_pattern(glob)));
        s.push_str(", ");
    }
    s.push_str("}\n");
    s.push_str(&format!(
        r#"local header = {header}
local function is_trusted(name)
  for _, p in ipairs(trusted) do
    if string.find(name, p) ~= nil then return true end
  end
  return false
end
function envoy_on_request(handle)
  local headers = handle:headers()
  local asserted = headers:get(header)
  -- Remove every spelling an application could read as this header (x_client_name
  -- becomes HTTP_X_CLIENT_NAME in CGI-style servers).
  local spellings = {{}}
  for name, _ in pairs(headers) do
    if string.gsub(string.lower(name), "_", "-") == header then
      spellings[#spellings + 1] = name
    end
  end
  for _, name in ipairs(spellings) do
    headers:remove(name)
  end
  local caller, how = nil, "none"
  local ssl = handle:streamInfo():downstreamSslConnection()
  if ssl ~= nil then
    for _, uri in ipairs(ssl:uriSanPeerCertificate()) do
      if string.sub(uri, 1, #prefix) == prefix then
        caller, how = string.sub(uri, #prefix + 1), "mtls"
        break
      end
    end
  end
  if caller == nil then
    local address = handle:streamInfo():downstreamDirectRemoteAddress()
    local ip = string.match(address, "^%[?(.-)%]?:%d+$")
    if ip ~= nil and by_ip[ip] ~= nil then
      caller, how = by_ip[ip], "source-ip"
    end
  end
  if how == "mtls" and asserted ~= nil and asserted ~= "" and is_trusted(caller) then
    caller, how = asserted, "header"
  end
  if caller ~= nil then
    headers:add(header, caller)
  end
  local meta = handle:streamInfo():dynamicMetadata()
  meta:set({namespace}, "caller", caller or "-")
  meta:set({namespace}, "identity", how)
end
"#,
        header = lua_string(names::IDENTITY_HEADER),
        namespace = lua_string(names::IDENTITY_METADATA),
    ));
    s
}

fn identity_filter(settings: &MeshSettings, addresses: &CallerAddresses<'_>) -> HttpFilter {
    let lua = Lua {
        default_source_code: Some(DataSource {
            specifier: Some(Specifier::InlineString(identity_script(
                settings, addresses,
            ))),
            ..Default::default()
        }),
        ..Default::default()
    };
    HttpFilter {
        name: "envoy.filters.http.lua".to_string(),
        config_type: Some(HttpFilterConfig::TypedConfig(pack_any(lua))),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------
// Access log
// ---------------------------------------------------------------------------------------

/// The fields of an ingress access log line, in name order.
pub fn access_log_fields(target: &str, rbac_mode: &str) -> Vec<(&'static str, String)> {
    let rbac = |key: &str| format!("%DYNAMIC_METADATA(envoy.filters.http.rbac:{target}.{key})%");
    let identity = |key: &str| format!("%DYNAMIC_METADATA({}:{key})%", names::IDENTITY_METADATA);
    vec![
        ("caller", identity("caller")),
        ("details", "%RESPONSE_CODE_DETAILS%".to_string()),
        ("duration_ms", "%DURATION%".to_string()),
        ("identity", identity("identity")),
        ("method", "%REQ(:METHOD)%".to_string()),
        ("path", "%REQ(:PATH)%".to_string()),
        ("peer_uri_san", "%DOWNSTREAM_PEER_URI_SAN%".to_string()),
        ("rbac_mode", rbac_mode.to_string()),
        ("rbac_shadow", rbac("shadow_engine_result")),
        (
            "source_address",
            "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%".to_string(),
        ),
        ("start_time", "%START_TIME%".to_string()),
        ("status", "%RESPONSE_CODE%".to_string()),
        ("target", target.to_string()),
    ]
}

/// JSON access log on standard output. The JSON format is a `Struct` (a map); like
/// [`encode_rbac`], each field is written as its own message so that the bytes are stable.
fn access_log(target: &str, rbac_mode: &str) -> AccessLog {
    let mut value = Vec::new();
    for (key, format) in access_log_fields(target, rbac_mode) {
        let one = StdoutAccessLog {
            access_log_format: Some(AccessLogFormat::LogFormat(SubstitutionFormatString {
                format: Some(Format::JsonFormat(Struct {
                    fields: HashMap::from([(
                        key.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(format)),
                        },
                    )]),
                })),
                ..Default::default()
            })),
        };
        value.extend(one.encode_to_vec());
    }
    AccessLog {
        name: "envoy.access_loggers.stdout".to_string(),
        config_type: Some(access_log::ConfigType::TypedConfig(Any {
            type_url: StdoutAccessLog::type_url(),
            value,
        })),
        ..Default::default()
    }
}
