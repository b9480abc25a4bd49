//! Spec → model conversion: the one validation path.
//!
//! The `--config-dir` loader, the Kubernetes watchers and the validating webhook all call
//! these functions, so what is admitted is exactly what the index can use. Errors name the
//! field (`spec.endpoints[1].port`) and what is wrong with it.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::api::access_rule::{AccessAction as ApiAction, AccessRule};
use crate::api::mesh_service::{DependencySpec, MeshService, MtlsMode as ApiMtls, PortProtocol};
use crate::model::{
    AccessAction, AccessRuleSet, AppProtocol, CallerMatch, Dependency, DependencySettings,
    DependencyTarget, Endpoint, ExternalDomain, MAX_WEIGHT, MtlsMode, Origin, PathMatch,
    RetryPolicy, valid_service_name,
};

use super::{AccessDeclaration, ServiceDeclaration};

/// One problem in a resource, located by its field path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Dotted path of the field, e.g. `spec.dependencies[0].timeout`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn err(field: impl Into<String>, message: impl Into<String>) -> FieldError {
    FieldError {
        field: field.into(),
        message: message.into(),
    }
}

/// Envoy `retry_on` conditions accepted in `retries.on`, with their Envoy names.
const RETRY_CONDITIONS: &[(&str, &str)] = &[
    ("5xx", "5xx"),
    ("gateway-error", "gateway-error"),
    ("reset", "reset"),
    ("connect-failure", "connect-failure"),
    ("retriable-4xx", "retriable-4xx"),
    ("refused-stream", "refused-stream"),
    ("retriable-status-codes", "retriable-status-codes"),
    ("unavailable", "unavailable"),
    ("cancelled", "cancelled"),
    ("deadline-exceeded", "deadline-exceeded"),
    ("resource-exhausted", "resource-exhausted"),
];

/// The longest timeout a manifest may set. A request timeout beyond a day is a mistake, and
/// an unbounded one could overflow the signed seconds of Envoy's duration (Envoy refuses the
/// whole route configuration of every caller then).
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// Parses a duration such as `2s`, `1500ms` or `1m30s`, greater than zero and at most
/// [`MAX_DURATION`].
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(text.trim()).map_err(|e| format!("{text:?}: {e}"))?;
    if d.is_zero() {
        return Err(format!("{text:?}: must be greater than zero"));
    }
    if d > MAX_DURATION {
        return Err(format!("{text:?}: must be at most 24h"));
    }
    Ok(d)
}

/// The mesh-wide name of a MeshService: `spec.serviceName`, else `metadata.name`.
pub fn service_name(obj: &MeshService) -> Option<String> {
    obj.spec
        .service_name
        .clone()
        .or_else(|| obj.metadata.name.clone())
}

/// Validates a MeshService and converts it into a declaration.
///
/// `precedence` orders competing claims on one name (lower wins): the creation timestamp
/// for Kubernetes objects, the file and document for manifests.
pub fn mesh_service(
    obj: &MeshService,
    precedence: String,
) -> Result<ServiceDeclaration, Vec<FieldError>> {
    let mut errors = Vec::new();
    let name = service_name(obj).unwrap_or_default();
    if name.is_empty() {
        errors.push(err(
            "spec.serviceName",
            "required when metadata.name is absent",
        ));
    } else if !valid_service_name(&name) {
        errors.push(err(
            if obj.spec.service_name.is_some() {
                "spec.serviceName"
            } else {
                "metadata.name"
            },
            format!(
                "{name:?} is not a valid service name (letters, digits, '-', '.', '_'; at most 253)"
            ),
        ));
    }
    let protocol = ports(obj, &mut errors);
    let mut endpoints = Vec::new();
    for (i, e) in obj.spec.endpoints.iter().enumerate() {
        let field = format!("spec.endpoints[{i}]");
        if e.address.trim().parse::<std::net::IpAddr>().is_err() {
            errors.push(err(
                format!("{field}.address"),
                format!(
                    "{:?} is not an IP address (proxies take IP addresses only; list each address of a host name)",
                    e.address
                ),
            ));
        }
        check_port(&mut errors, &format!("{field}.port"), e.port);
        if let Some(w) = e.weight
            && !(1..=MAX_WEIGHT).contains(&w)
        {
            errors.push(err(
                format!("{field}.weight"),
                format!("{w} is outside 1..={MAX_WEIGHT}"),
            ));
        }
        let weight = e
            .weight
            .or_else(|| Endpoint::weight_from_tags(&e.tags))
            .unwrap_or(1);
        endpoints.push(Endpoint {
            address: e.address.trim().to_string(),
            port: u16::try_from(e.port).unwrap_or(0),
            origin: Origin::Config,
            datacenter: e.datacenter.clone().filter(|d| !d.is_empty()),
            tags: e.tags.iter().cloned().collect(),
            weight: weight.clamp(1, MAX_WEIGHT),
            healthy: true,
        });
    }
    endpoints.sort();
    endpoints.dedup();
    let mut dependencies = Vec::new();
    let mut seen = BTreeSet::new();
    for (i, d) in obj.spec.dependencies.iter().enumerate() {
        let field = format!("spec.dependencies[{i}]");
        match dependency(d, &field) {
            Ok(dep) => {
                if !seen.insert(dep.target.clone()) {
                    errors.push(err(field, format!("{} is listed twice", dep.target)));
                } else {
                    dependencies.push(dep);
                }
            }
            Err(mut e) => errors.append(&mut e),
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    dependencies.sort_by(|a, b| a.target.cmp(&b.target));
    Ok(ServiceDeclaration {
        name,
        precedence,
        mtls: match obj.spec.mtls.unwrap_or_default() {
            ApiMtls::Disabled => MtlsMode::Disabled,
            ApiMtls::Permissive => MtlsMode::Permissive,
            ApiMtls::Strict => MtlsMode::Strict,
        },
        dependencies,
        endpoints,
        namespace: None,
        protocol,
        preserve_header_case: obj
            .spec
            .http1
            .as_ref()
            .is_some_and(|h| h.preserve_header_case),
    })
}

/// Checks `spec.ports`; returns what the service speaks (its first port's protocol).
fn ports(obj: &MeshService, errors: &mut Vec<FieldError>) -> AppProtocol {
    let mut seen_ports = BTreeSet::new();
    for (i, p) in obj.spec.ports.iter().enumerate() {
        check_port(errors, &format!("spec.ports[{i}].port"), p.port);
        if let Some(t) = p.target_port {
            check_port(errors, &format!("spec.ports[{i}].targetPort"), t);
        }
        if !seen_ports.insert(p.port) {
            errors.push(err(
                format!("spec.ports[{i}].port"),
                format!("port {} is listed twice", p.port),
            ));
        }
        if p.protocol == Some(PortProtocol::Tcp) {
            // Refused rather than accepted and ignored: callers' proxies would speak HTTP to it.
            errors.push(err(
                format!("spec.ports[{i}].protocol"),
                "tcp is not supported yet: proxies speak http, http2 or grpc to a service",
            ));
        }
    }
    match obj.spec.ports.first().and_then(|p| p.protocol) {
        None | Some(PortProtocol::Http | PortProtocol::Tcp) => AppProtocol::Http,
        Some(PortProtocol::Http2) => AppProtocol::Http2,
        Some(PortProtocol::Grpc) => AppProtocol::Grpc,
    }
}

fn check_port(errors: &mut Vec<FieldError>, field: &str, port: u32) {
    if !(1..=65535).contains(&port) {
        errors.push(err(field, format!("{port} is outside 1..=65535")));
    }
}

fn dependency(d: &DependencySpec, field: &str) -> Result<Dependency, Vec<FieldError>> {
    let mut errors = Vec::new();
    let target = match (&d.service, &d.domain) {
        (Some(s), None) => match s.parse::<DependencyTarget>() {
            Ok(DependencyTarget::Domain(_)) => {
                errors.push(err(
                    format!("{field}.service"),
                    format!("{s:?} is a URL; use `domain`"),
                ));
                None
            }
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(err(format!("{field}.service"), e.to_string()));
                None
            }
        },
        (None, Some(u)) => match ExternalDomain::parse(u) {
            Ok(dom) => Some(DependencyTarget::Domain(dom)),
            Err(e) => {
                errors.push(err(format!("{field}.domain"), e.to_string()));
                None
            }
        },
        (Some(_), Some(_)) => {
            errors.push(err(
                field,
                "set exactly one of `service` and `domain`, not both",
            ));
            None
        }
        (None, None) => {
            errors.push(err(field, "set one of `service` or `domain`"));
            None
        }
    };
    let timeout = match &d.timeout {
        Some(t) => match parse_duration(t) {
            Ok(d) => Some(d),
            Err(e) => {
                errors.push(err(format!("{field}.timeout"), e));
                None
            }
        },
        None => None,
    };
    let retries = match &d.retries {
        Some(r) => {
            if r.attempts > 10 {
                errors.push(err(
                    format!("{field}.retries.attempts"),
                    format!("{} is outside 0..=10", r.attempts),
                ));
            }
            let mut on = Vec::new();
            for (j, cond) in r.on.iter().enumerate() {
                match RETRY_CONDITIONS.iter().find(|(k, _)| k == cond) {
                    Some((_, envoy)) => on.push((*envoy).to_string()),
                    None => errors.push(err(
                        format!("{field}.retries.on[{j}]"),
                        format!(
                            "unknown retry condition {cond:?}; known: {}",
                            RETRY_CONDITIONS
                                .iter()
                                .map(|(k, _)| *k)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    )),
                }
            }
            if on.is_empty() {
                on = RetryPolicy::default().on;
            }
            on.sort();
            on.dedup();
            let per_try_timeout = match &r.per_try_timeout {
                Some(t) => match parse_duration(t) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        errors.push(err(format!("{field}.retries.perTryTimeout"), e));
                        None
                    }
                },
                None => None,
            };
            Some(RetryPolicy {
                attempts: r.attempts,
                on,
                per_try_timeout,
            })
        }
        None => None,
    };
    match target {
        Some(target) if errors.is_empty() => Ok(Dependency {
            target,
            settings: DependencySettings { timeout, retries },
        }),
        _ => Err(errors),
    }
}

/// Validates an AccessRule and converts it into a declaration.
pub fn access_rule(obj: &AccessRule, source: String) -> Result<AccessDeclaration, Vec<FieldError>> {
    let mut errors = Vec::new();
    let target = obj.spec.target.trim().to_string();
    if !valid_service_name(&target) {
        errors.push(err(
            "spec.target",
            format!("{target:?} is not a valid service name"),
        ));
    }
    let mut rules = Vec::new();
    for (i, r) in obj.spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        if r.from.is_empty() {
            errors.push(err(
                format!("{field}.from"),
                "name at least one caller (or \"*\")",
            ));
        }
        let mut from = Vec::new();
        for (j, f) in r.from.iter().enumerate() {
            let f = f.trim();
            if f == "*" {
                from.push(CallerMatch::Any);
            } else if !f.is_empty() && valid_service_name(&f.replace('*', "x")) {
                from.push(CallerMatch::Service(f.to_string()));
            } else {
                errors.push(err(
                    format!("{field}.from[{j}]"),
                    format!("{f:?} is not a service name or glob"),
                ));
            }
        }
        let mut paths = Vec::new();
        for (j, p) in r.paths.iter().enumerate() {
            let pf = format!("{field}.paths[{j}]");
            match (&p.exact, &p.prefix, &p.regex) {
                (Some(e), None, None) if e.starts_with('/') => {
                    paths.push(PathMatch::Exact(e.clone()))
                }
                (None, Some(e), None) if e.starts_with('/') => {
                    paths.push(PathMatch::Prefix(e.clone()))
                }
                (None, None, Some(e)) if !e.is_empty() => {
                    // Envoy compiles RE2; the `regex` crate's syntax is close to it, so an
                    // expression Envoy would refuse (and NACK) is refused here first.
                    match regex::Regex::new(e) {
                        Ok(_) => paths.push(PathMatch::Regex(e.clone())),
                        Err(why) => errors.push(err(
                            format!("{pf}.regex"),
                            format!(
                                "{e:?} is not a valid regular expression: {}",
                                why.to_string().lines().last().unwrap_or("")
                            ),
                        )),
                    }
                }
                (None, None, None) => {
                    errors.push(err(pf, "set one of `exact`, `prefix` or `regex`"))
                }
                (Some(_), None, None) | (None, Some(_), None) => {
                    errors.push(err(pf, "a path must start with '/'"))
                }
                (None, None, Some(_)) => errors.push(err(pf, "regex is empty")),
                _ => errors.push(err(pf, "set only one of `exact`, `prefix` or `regex`")),
            }
        }
        let mut methods = Vec::new();
        for (j, m) in r.methods.iter().enumerate() {
            let upper = m.trim().to_ascii_uppercase();
            if upper.is_empty() || !upper.bytes().all(|b| b.is_ascii_uppercase()) {
                errors.push(err(
                    format!("{field}.methods[{j}]"),
                    format!("{m:?} is not an HTTP method"),
                ));
            } else {
                methods.push(upper);
            }
        }
        from.sort();
        from.dedup();
        paths.sort();
        paths.dedup();
        methods.sort();
        methods.dedup();
        rules.push(AccessRuleSet {
            from,
            paths,
            methods,
        });
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(AccessDeclaration {
        target,
        action: match obj.spec.action.unwrap_or_default() {
            ApiAction::Deny => AccessAction::Deny,
            ApiAction::Log => AccessAction::Log,
        },
        rules,
        source,
        namespace: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dependency_errors(timeout: &str, per_try: &str) -> Vec<String> {
        let text = format!(
            "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {{name: web}}\nspec:\n  dependencies:\n    - service: orders\n      timeout: {timeout}\n      retries: {{attempts: 2, perTryTimeout: {per_try}}}\n"
        );
        match crate::sources::files::parse_manifests("web.yaml", &text) {
            Ok(_) => Vec::new(),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    #[test]
    fn durations_beyond_a_day_are_refused_naming_the_field() {
        assert!(dependency_errors("24h", "1h").is_empty());
        // One error for the document, naming its file, line and both fields.
        let errors = dependency_errors("400000000000y", "20000y").join("\n");
        assert!(errors.starts_with("web.yaml:"), "{errors}");
        assert!(
            errors.contains("spec.dependencies[0].timeout: \"400000000000y\": must be at most 24h"),
            "{errors}"
        );
        assert!(
            errors.contains(
                "spec.dependencies[0].retries.perTryTimeout: \"20000y\": must be at most 24h"
            ),
            "{errors}"
        );
        assert!(parse_duration("24h1s").is_err());
    }
}
