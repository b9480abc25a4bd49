//! Authorization: a target's merged AccessRules as an Envoy RBAC filter, principals matched
//! on what the connection proves.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use envoy_types::pb::envoy::config::core::v3::CidrRange;
use envoy_types::pb::envoy::config::rbac::v3::{
    Permission, Policy, Principal, Rbac, permission, principal, rbac::Action as RbacAction,
};
use envoy_types::pb::envoy::config::route::v3::{
    HeaderMatcher, header_matcher::HeaderMatchSpecifier,
};
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::extensions::filters::network::rbac::v3::Rbac as NetworkRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    PathMatcher, RegexMatcher, StringMatcher, path_matcher, string_matcher::MatchPattern,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use prost::{Message, Name};

use crate::model::{
    AccessAction, AccessPolicy, AccessRuleSet, CallerMatch, MeshSettings, MeshState, PathMatch,
    glob_match,
};

use crate::translate::names;

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
    rbac_config_with(target, policy, settings, &addresses, false)
}

/// [`rbac_config`] with the callers' addresses looked up; for the connections of a `tcp`
/// service when `tcp`: a rule naming paths or methods (which a connection does not have)
/// admits nothing, and only what the connection proves identifies the caller.
pub(super) fn rbac_config_with(
    target: &str,
    policy: Option<&AccessPolicy>,
    settings: &MeshSettings,
    addresses: &CallerAddresses<'_>,
    tcp: bool,
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
        .map(|(i, rule)| {
            (
                format!("rule-{i}"),
                rule_policy(rule, settings, addresses, tcp),
            )
        })
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
    tcp: bool,
) -> Policy {
    let mut checks = Vec::new();
    if tcp && !(rule.paths.is_empty() && rule.methods.is_empty()) {
        // Fails closed: the rule allows requests of some kind, and a connection is none.
        checks.push(Permission {
            rule: Some(permission::Rule::NotRule(Box::new(Permission {
                rule: Some(permission::Rule::Any(true)),
            }))),
        });
    }
    if !tcp && !rule.paths.is_empty() {
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
    if !tcp && !rule.methods.is_empty() {
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
        .map(|c| caller_principal(c, settings, addresses, tcp))
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
    tcp: bool,
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
    if !tcp && !settings.identity_header_from.is_empty() {
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
    pub(super) by_ip: BTreeMap<IpAddr, BTreeSet<&'a str>>,
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
    let (rules, shadow_rules) = (config.rules.take(), config.shadow_rules.take());
    encode_sorted(config, rules, shadow_rules, |rules, shadow_rules| {
        HttpRbac {
            rules,
            shadow_rules,
            ..Default::default()
        }
    })
}

/// The network RBAC filter (connections of a `tcp` service) with the same rules as `config`,
/// encoded as [`encode_rbac`] does. Its stats are `<stat_prefix>rbac.{allowed,denied,…}`.
pub fn encode_network_rbac(config: HttpRbac, stat_prefix: &str) -> Any {
    let head = NetworkRbac {
        stat_prefix: stat_prefix.to_string(),
        shadow_rules_stat_prefix: config.shadow_rules_stat_prefix.clone(),
        ..Default::default()
    };
    encode_sorted(
        head,
        config.rules,
        config.shadow_rules,
        |rules, shadow_rules| NetworkRbac {
            rules,
            shadow_rules,
            ..Default::default()
        },
    )
}

/// `head` (a filter configuration without rules), then its enforced and shadow rules one
/// policy at a time in name order, each wrapped by `wrap(rules, shadow_rules)`.
fn encode_sorted<M: Message + Name>(
    head: M,
    rules: Option<Rbac>,
    shadow_rules: Option<Rbac>,
    wrap: impl Fn(Option<Rbac>, Option<Rbac>) -> M,
) -> Any {
    let mut value = head.encode_to_vec();
    for (shadow, rules) in [(false, rules), (true, shadow_rules)] {
        let Some(rules) = rules else {
            continue;
        };
        // The rules without policies first: an enforced empty set stays, and denies everything.
        let empty = Rbac {
            action: rules.action,
            ..Default::default()
        };
        let part = |one: Rbac| {
            if shadow {
                wrap(None, Some(one))
            } else {
                wrap(Some(one), None)
            }
        };
        value.extend(part(empty).encode_to_vec());
        let sorted: BTreeMap<String, Policy> = rules.policies.into_iter().collect();
        for (name, policy) in sorted {
            let one = Rbac {
                action: rules.action,
                policies: HashMap::from([(name, policy)]),
                ..Default::default()
            };
            value.extend(part(one).encode_to_vec());
        }
    }
    Any {
        type_url: M::type_url(),
        value,
    }
}
