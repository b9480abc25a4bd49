//! Spec → model conversion: the one validation path.
//!
//! The `--config-dir` loader, the Kubernetes watchers and the validating webhook all call
//! these functions, so what is admitted is exactly what the index can use. Errors name the
//! field (`spec.endpoints[1].port`) and what is wrong with it.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::api::access_rule::{AccessAction as ApiAction, AccessRule};
use crate::api::mesh_service::{
    DependencySpec, MeshService, MigrationOrigin, MigrationSpec, MtlsMode as ApiMtls, PortProtocol,
    RateLimitSpec, RetrySpec,
};
use crate::model::{
    AccessAction, AccessRuleSet, AppProtocol, CallerMatch, CircuitBreakers, ClusterPolicy,
    Dependency, DependencySettings, DependencyTarget, Endpoint, ExternalDomain,
    MAX_MIGRATION_STEPS, MAX_NAMED_PORTS, MAX_PATH_RATE_LIMITS, MAX_RATE_LIMIT_REQUESTS,
    MAX_WEIGHT, MIN_MIGRATION_INTERVAL, MIN_RATE_LIMIT_PERIOD, Migration, MtlsMode, NamedPort,
    Origin, OutlierDetection, PathMatch, PathRateLimit, RateLimit, RetryPolicy, TokenBucket,
    valid_port_name, valid_service_name,
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
    let (protocol, named_ports) = ports(obj, &mut errors);
    let mut endpoints: Vec<Endpoint> = obj
        .spec
        .endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| {
            static_endpoint(
                e,
                &format!("spec.endpoints[{i}]"),
                &named_ports,
                &mut errors,
            )
        })
        .collect();
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
    let rate_limit = rate_limit(obj.spec.rate_limit.as_ref(), &mut errors);
    let migration = obj.spec.migration.as_ref().map(|m| {
        let mut migration = migration(m, &mut errors);
        if !migration.steps.is_empty() {
            // A plan's weight is where the plan stands: its status, written by the leader
            // (nothing moves before the plan's first step).
            migration.weight = plan_weight(obj, &migration).unwrap_or(0);
        }
        migration
    });
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
        port: first_port(obj),
        named_ports,
        migration,
        preserve_header_case: obj
            .spec
            .http1
            .as_ref()
            .is_some_and(|h| h.preserve_header_case),
        rate_limit,
    })
}

/// `spec.migration`: percentages within 0–100, steps increasing, the interval and the
/// error-rate bound within their ranges.
fn migration(m: &MigrationSpec, errors: &mut Vec<FieldError>) -> Migration {
    const FIELD: &str = "spec.migration";
    let percent = |errors: &mut Vec<FieldError>, field: &str, value: Option<u32>| {
        let v = value.unwrap_or(0);
        if v > 100 {
            errors.push(err(
                format!("{FIELD}.{field}"),
                format!("{v} is outside 0..=100 (percent)"),
            ));
        }
        v.min(100)
    };
    let weight = percent(errors, "weight", m.weight);
    let mirror = percent(errors, "mirror", m.mirror);
    if m.steps.len() > MAX_MIGRATION_STEPS {
        errors.push(err(
            format!("{FIELD}.steps"),
            format!("{} steps; at most {MAX_MIGRATION_STEPS}", m.steps.len()),
        ));
    }
    for (i, pair) in m.steps.windows(2).enumerate() {
        if pair[1] <= pair[0] {
            errors.push(err(
                format!("{FIELD}.steps[{}]", i + 1),
                format!("{} does not increase on {}: steps go up", pair[1], pair[0]),
            ));
        }
    }
    for (i, &step) in m.steps.iter().enumerate() {
        if step > 100 {
            errors.push(err(
                format!("{FIELD}.steps[{i}]"),
                format!("{step} is outside 0..=100 (percent)"),
            ));
        }
    }
    let interval = match m.interval.as_deref().map(parse_duration) {
        None => std::time::Duration::from_secs(300),
        Some(Ok(d)) if d >= MIN_MIGRATION_INTERVAL => d,
        Some(Ok(_)) => {
            errors.push(err(format!("{FIELD}.interval"), "must be at least 1s"));
            MIN_MIGRATION_INTERVAL
        }
        Some(Err(e)) => {
            errors.push(err(format!("{FIELD}.interval"), e));
            MIN_MIGRATION_INTERVAL
        }
    };
    let max_error_rate_increase_bp = match m.max_error_rate_increase.as_deref() {
        None => 100,
        Some(text) => parse_percent_bp(text).unwrap_or_else(|| {
            errors.push(err(
                format!("{FIELD}.maxErrorRateIncrease"),
                format!("{text:?} is not a percentage such as 1% or 0.5% (0-100%)"),
            ));
            100
        }),
    };
    Migration {
        to: match m.to {
            MigrationOrigin::Kubernetes => Origin::Kubernetes,
            MigrationOrigin::Consul => Origin::Consul,
            MigrationOrigin::Config => Origin::Config,
        },
        weight,
        mirror,
        steps: m.steps.iter().map(|s| (*s).min(100)).collect(),
        interval,
        max_error_rate_increase_bp,
    }
}

/// The weight the status of `obj` records for the plan of `m`, if it records this plan.
fn plan_weight(obj: &MeshService, m: &Migration) -> Option<u32> {
    let status = obj.status.as_ref()?.migration.as_ref()?;
    (status.plan == m.plan_key() && status.to == m.to.to_string()).then_some(status.weight.min(100))
}

/// `1%`, `0.5%`, `12.25%` in hundredths of a percent (basis points), at most 100%.
fn parse_percent_bp(text: &str) -> Option<u32> {
    let number = text.trim().strip_suffix('%')?;
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty()
        || whole.len() > 3
        || fraction.len() > 2
        || !whole
            .bytes()
            .chain(fraction.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let whole: u32 = whole.parse().ok()?;
    let fraction: u32 = format!("{fraction:0<2}").parse().ok()?;
    let bp = whole * 100 + fraction;
    (bp <= 10_000).then_some(bp)
}

/// A static endpoint (`spec.endpoints[i]`, at `field`), its further ports among `named_ports`.
fn static_endpoint(
    e: &crate::api::mesh_service::StaticEndpoint,
    field: &str,
    named_ports: &[NamedPort],
    errors: &mut Vec<FieldError>,
) -> Endpoint {
    if e.address.trim().parse::<std::net::IpAddr>().is_err() {
        errors.push(err(
            format!("{field}.address"),
            format!(
                "{:?} is not an IP address (proxies take IP addresses only; list each address of a host name)",
                e.address
            ),
        ));
    }
    check_port(errors, &format!("{field}.port"), e.port);
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
    if e.ports.len() > MAX_NAMED_PORTS {
        errors.push(err(
            format!("{field}.ports"),
            format!("{} ports; at most {MAX_NAMED_PORTS}", e.ports.len()),
        ));
    }
    for (port_name, &port) in &e.ports {
        let port_field = format!("{field}.ports.{port_name}");
        if named_ports.iter().any(|p| &p.name == port_name) {
            check_port(errors, &port_field, port);
        } else {
            errors.push(err(
                port_field,
                format!(
                    "{port_name:?} is not a further port of this service (spec.ports[1..] names: [{}])",
                    named_ports
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    Endpoint {
        address: e.address.trim().to_string(),
        port: u16::try_from(e.port).unwrap_or(0),
        origin: Origin::Config,
        datacenter: e.datacenter.clone().filter(|d| !d.is_empty()),
        tags: e.tags.iter().cloned().collect(),
        weight: weight.clamp(1, MAX_WEIGHT),
        healthy: true,
        ports: e
            .ports
            .iter()
            .map(|(name, port)| (name.clone(), u16::try_from(*port).unwrap_or(0)))
            .collect(),
    }
}

/// The rate limits of `spec.rateLimit` (none when it is absent): every count within bounds,
/// every period between [`MIN_RATE_LIMIT_PERIOD`] and [`MAX_DURATION`], each path prefix once.
/// `spec.ports[0].port`, when it is a port.
fn first_port(obj: &MeshService) -> Option<u16> {
    obj.spec
        .ports
        .first()
        .and_then(|p| u16::try_from(p.port).ok())
}

fn rate_limit(spec: Option<&RateLimitSpec>, errors: &mut Vec<FieldError>) -> RateLimit {
    const FIELD: &str = "spec.rateLimit";
    let Some(spec) = spec else {
        return RateLimit::default();
    };
    let service = match spec.requests {
        Some(requests) => token_bucket(requests, spec.per.as_ref(), spec.burst, FIELD, errors),
        None => {
            for (set, name) in [(spec.per.is_some(), "per"), (spec.burst.is_some(), "burst")] {
                if set {
                    errors.push(err(
                        format!("{FIELD}.{name}"),
                        "applies to the service-wide limit: set `requests` too",
                    ));
                }
            }
            if spec.paths.is_empty() {
                errors.push(err(
                    FIELD,
                    "set `requests` (a limit for every request) or `paths`, or leave rateLimit out",
                ));
            }
            None
        }
    };
    if spec.paths.len() > MAX_PATH_RATE_LIMITS {
        errors.push(err(
            format!("{FIELD}.paths"),
            format!(
                "{} entries; at most {MAX_PATH_RATE_LIMITS}",
                spec.paths.len()
            ),
        ));
        return RateLimit::default();
    }
    let mut paths: Vec<PathRateLimit> = Vec::new();
    let mut seen: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    for (i, p) in spec.paths.iter().enumerate() {
        let field = format!("{FIELD}.paths[{i}]");
        let prefix_ok = if !p.prefix.starts_with('/') {
            errors.push(err(
                format!("{field}.prefix"),
                format!("{:?} must start with '/'", p.prefix),
            ));
            false
        } else if p.prefix.chars().count() > 1024 {
            errors.push(err(
                format!("{field}.prefix"),
                format!("{} characters; at most 1024", p.prefix.chars().count()),
            ));
            false
        } else if p
            .prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            errors.push(err(
                format!("{field}.prefix"),
                format!(
                    "{:?} contains a space or control character, which no path has",
                    p.prefix
                ),
            ));
            false
        } else if let Some(first) = seen.insert(&p.prefix, i) {
            errors.push(err(
                format!("{field}.prefix"),
                format!("{:?} is listed twice (also paths[{first}])", p.prefix),
            ));
            false
        } else {
            true
        };
        let bucket = token_bucket(p.requests, p.per.as_ref(), p.burst, &field, errors);
        if let (true, Some(bucket)) = (prefix_ok, bucket) {
            paths.push(PathRateLimit {
                prefix: p.prefix.clone(),
                bucket,
            });
        }
    }
    RateLimit::sort_paths(&mut paths);
    RateLimit { service, paths }
}

/// A token bucket of `requests` per `per` (default one second) holding `burst` (default
/// `requests`), or none with errors naming the fields under `field`.
fn token_bucket(
    requests: u32,
    per: Option<&String>,
    burst: Option<u32>,
    field: &str,
    errors: &mut Vec<FieldError>,
) -> Option<TokenBucket> {
    let before = errors.len();
    let range = 1..=MAX_RATE_LIMIT_REQUESTS;
    let requests = bounded(
        Some(requests),
        range.clone(),
        1,
        format!("{field}.requests"),
        errors,
    );
    let burst = bounded(burst, range, requests, format!("{field}.burst"), errors);
    let per = duration_or(per, Duration::from_secs(1), format!("{field}.per"), errors);
    if per < MIN_RATE_LIMIT_PERIOD {
        errors.push(err(
            format!("{field}.per"),
            format!(
                "{per:?} is shorter than {}ms (Envoy refills a bucket no faster)",
                MIN_RATE_LIMIT_PERIOD.as_millis()
            ),
        ));
    }
    (errors.len() == before).then_some(TokenBucket {
        requests,
        per,
        burst,
    })
}

/// Checks `spec.ports`; returns what the service speaks (its first port's protocol).
/// Validates `spec.ports`: the first port's protocol (the service's), and the further ports,
/// each named, each name and number once.
fn ports(obj: &MeshService, errors: &mut Vec<FieldError>) -> (AppProtocol, Vec<NamedPort>) {
    let mut seen_ports = BTreeSet::new();
    let mut seen_names = BTreeSet::new();
    let mut named = Vec::new();
    if obj.spec.ports.len() > MAX_NAMED_PORTS + 1 {
        errors.push(err(
            "spec.ports",
            format!(
                "{} ports; at most {}",
                obj.spec.ports.len(),
                MAX_NAMED_PORTS + 1
            ),
        ));
    }
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
        match p.name.as_deref() {
            Some(name) if !valid_port_name(name) => errors.push(err(
                format!("spec.ports[{i}].name"),
                format!(
                    "{name:?} is not a valid port name (1-15 lower-case letters, digits and '-', with a letter, as Kubernetes container ports)"
                ),
            )),
            Some(name) if !seen_names.insert(name) => errors.push(err(
                format!("spec.ports[{i}].name"),
                format!("{name:?} is listed twice"),
            )),
            None if i > 0 => errors.push(err(
                format!("spec.ports[{i}].name"),
                "required on every port but the first: callers reach it as SERVICE:NAME",
            )),
            Some(name) if i > 0 => named.push(NamedPort {
                name: name.to_string(),
                port: u16::try_from(p.port).unwrap_or(0),
                target_port: u16::try_from(p.target_port.unwrap_or(p.port)).unwrap_or(0),
                protocol: app_protocol(p.protocol),
            }),
            _ => {}
        }
    }
    let protocol = app_protocol(obj.spec.ports.first().and_then(|p| p.protocol));
    if protocol.is_tcp()
        && obj
            .spec
            .http1
            .as_ref()
            .is_some_and(|h| h.preserve_header_case)
    {
        errors.push(err(
            "spec.http1.preserveHeaderCase",
            "applies to HTTP services; spec.ports[0].protocol is tcp",
        ));
    }
    (protocol, named)
}

fn app_protocol(protocol: Option<PortProtocol>) -> AppProtocol {
    match protocol {
        None | Some(PortProtocol::Http) => AppProtocol::Http,
        Some(PortProtocol::Http2) => AppProtocol::Http2,
        Some(PortProtocol::Grpc) => AppProtocol::Grpc,
        Some(PortProtocol::Tcp) => AppProtocol::Tcp,
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
    let retries = d
        .retries
        .as_ref()
        .map(|r| retry_policy(r, field, &mut errors));
    let cluster = cluster_policy(d, field, &mut errors);
    let local_port = d.port.and_then(|p| {
        check_port(&mut errors, &format!("{field}.port"), p);
        u16::try_from(p).ok()
    });
    if matches!(target, Some(DependencyTarget::Domain(_))) {
        for (set, name) in [
            (d.outlier_detection.is_some(), "outlierDetection"),
            (d.circuit_breakers.is_some(), "circuitBreakers"),
            (d.port.is_some(), "port"),
            (d.websocket.is_some(), "websocket"),
            (d.http1.is_some(), "http1"),
        ] {
            if set {
                errors.push(err(
                    format!("{field}.{name}"),
                    "applies to `service` dependencies only, not to an external `domain`",
                ));
            }
        }
    }
    match target {
        Some(target) if errors.is_empty() => Ok(Dependency {
            target,
            settings: DependencySettings {
                timeout,
                retries,
                cluster,
                local_port,
                websocket: d.websocket,
            },
        }),
        _ => Err(errors),
    }
}

fn retry_policy(r: &RetrySpec, field: &str, errors: &mut Vec<FieldError>) -> RetryPolicy {
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
    // Left empty: the called service's protocol decides (see `RetryPolicy::for_protocol`).
    on.sort();
    on.dedup();
    let per_try_timeout = r.per_try_timeout.as_ref().and_then(|t| {
        parse_duration(t)
            .map_err(|e| errors.push(err(format!("{field}.retries.perTryTimeout"), e)))
            .ok()
    });
    RetryPolicy {
        attempts: r.attempts,
        on,
        per_try_timeout,
    }
}

/// `value` when set and within `range`, else `default` (with an error naming `field` when it
/// is out of range).
fn bounded(
    value: Option<u32>,
    range: std::ops::RangeInclusive<u32>,
    default: u32,
    field: String,
    errors: &mut Vec<FieldError>,
) -> u32 {
    match value {
        Some(v) if range.contains(&v) => v,
        Some(v) => {
            errors.push(err(
                field,
                format!("{v} is outside {}..={}", range.start(), range.end()),
            ));
            default
        }
        None => default,
    }
}

/// A duration field when set and valid, else `default` (with an error naming `field`).
fn duration_or(
    value: Option<&String>,
    default: Duration,
    field: String,
    errors: &mut Vec<FieldError>,
) -> Duration {
    match value.map(|t| parse_duration(t)) {
        Some(Ok(d)) => d,
        Some(Err(e)) => {
            errors.push(err(field, e));
            default
        }
        None => default,
    }
}

/// The largest connection and request limit a manifest may set.
const MAX_LIMIT: u32 = 1_000_000;

/// The outlier detection and circuit breakers of a dependency: the defaults, with what the
/// manifest overrides.
fn cluster_policy(d: &DependencySpec, field: &str, errors: &mut Vec<FieldError>) -> ClusterPolicy {
    let defaults = ClusterPolicy::default();
    let mut policy = defaults;
    if let Some(o) = &d.outlier_detection {
        let (od, f) = (
            &defaults.outlier_detection,
            format!("{field}.outlierDetection"),
        );
        policy.outlier_detection = OutlierDetection {
            consecutive_5xx: bounded(
                o.consecutive_5xx,
                1..=1000,
                od.consecutive_5xx,
                format!("{f}.consecutive5xx"),
                errors,
            ),
            consecutive_gateway_failure: bounded(
                o.consecutive_gateway_failure,
                1..=1000,
                od.consecutive_gateway_failure,
                format!("{f}.consecutiveGatewayFailure"),
                errors,
            ),
            interval: duration_or(
                o.interval.as_ref(),
                od.interval,
                format!("{f}.interval"),
                errors,
            ),
            base_ejection_time: duration_or(
                o.base_ejection_time.as_ref(),
                od.base_ejection_time,
                format!("{f}.baseEjectionTime"),
                errors,
            ),
            max_ejection_percent: bounded(
                o.max_ejection_percent,
                0..=100,
                od.max_ejection_percent,
                format!("{f}.maxEjectionPercent"),
                errors,
            ),
        };
    }
    if let Some(c) = &d.circuit_breakers {
        let (cb, f) = (
            &defaults.circuit_breakers,
            format!("{field}.circuitBreakers"),
        );
        let mut limit = |value, min, default, name: &str| {
            bounded(
                value,
                min..=MAX_LIMIT,
                default,
                format!("{f}.{name}"),
                errors,
            )
        };
        policy.circuit_breakers = CircuitBreakers {
            max_connections: limit(c.max_connections, 1, cb.max_connections, "maxConnections"),
            max_pending_requests: limit(
                c.max_pending_requests,
                1,
                cb.max_pending_requests,
                "maxPendingRequests",
            ),
            max_requests: limit(c.max_requests, 1, cb.max_requests, "maxRequests"),
            max_retries: limit(c.max_retries, 0, cb.max_retries, "maxRetries"),
        };
    }
    policy.preserve_header_case = d.http1.as_ref().map(|h| h.preserve_header_case);
    policy
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

    /// The errors of a MeshService whose one dependency is `dependency` (flow YAML).
    fn errors_of(dependency: &str) -> String {
        let text = format!(
            "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {{name: web}}\nspec:\n  dependencies:\n    - {dependency}\n"
        );
        match crate::sources::files::parse_manifests("web.yaml", &text) {
            Ok(_) => String::new(),
            Err(errors) => errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    #[test]
    fn outlier_detection_and_circuit_breakers_out_of_range_are_refused_naming_the_field() {
        assert_eq!(
            errors_of(
                "{service: orders, outlierDetection: {consecutive5xx: 3, consecutiveGatewayFailure: 1000, interval: 1s, baseEjectionTime: 2m, maxEjectionPercent: 0}, circuitBreakers: {maxConnections: 1, maxPendingRequests: 1000000, maxRequests: 10, maxRetries: 0}}"
            ),
            ""
        );
        let errors = errors_of(
            "{service: orders, outlierDetection: {consecutive5xx: 0, consecutiveGatewayFailure: 1001, interval: 0s, baseEjectionTime: soon, maxEjectionPercent: 101}, circuitBreakers: {maxConnections: 0, maxPendingRequests: 1000001, maxRequests: 0}}",
        );
        for expected in [
            "spec.dependencies[0].outlierDetection.consecutive5xx: 0 is outside 1..=1000",
            "spec.dependencies[0].outlierDetection.consecutiveGatewayFailure: 1001 is outside 1..=1000",
            "spec.dependencies[0].outlierDetection.interval: \"0s\": must be greater than zero",
            "spec.dependencies[0].outlierDetection.baseEjectionTime: \"soon\"",
            "spec.dependencies[0].outlierDetection.maxEjectionPercent: 101 is outside 0..=100",
            "spec.dependencies[0].circuitBreakers.maxConnections: 0 is outside 1..=1000000",
            "spec.dependencies[0].circuitBreakers.maxPendingRequests: 1000001 is outside 1..=1000000",
            "spec.dependencies[0].circuitBreakers.maxRequests: 0 is outside 1..=1000000",
        ] {
            assert!(errors.contains(expected), "{expected} not in {errors}");
        }
        assert!(!errors.contains("maxRetries"), "{errors}");
        // Negative numbers and unknown fields are refused by the schema, naming the field.
        let negative = errors_of("{service: orders, circuitBreakers: {maxRetries: -1}}");
        assert!(negative.contains("maxRetries"), "{negative}");
        let unknown = errors_of("{service: orders, outlierDetection: {consecutive5XX: 3}}");
        assert!(unknown.contains("consecutive5XX"), "{unknown}");
        // An external domain has no mesh cluster to tune.
        let domain = errors_of(
            "{domain: \"https://api.example.com\", outlierDetection: {consecutive5xx: 3}, circuitBreakers: {}}",
        );
        for field in ["outlierDetection", "circuitBreakers"] {
            assert!(
                domain.contains(&format!(
                    "spec.dependencies[0].{field}: applies to `service` dependencies only"
                )),
                "{domain}"
            );
        }
    }

    #[test]
    fn overrides_keep_the_defaults_of_the_fields_left_out() {
        let service = |dependency: &str| {
            let text = format!(
                "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {{name: web}}\nspec:\n  dependencies:\n    - {dependency}\n"
            );
            let objects = crate::sources::files::parse_manifests("web.yaml", &text).unwrap();
            let crate::index::IndexObject::Service(declaration) = &objects[0] else {
                panic!("not a service declaration")
            };
            declaration.dependencies[0].settings.cluster
        };
        assert!(service("{service: orders}").is_default());
        assert!(
            service("{service: orders, outlierDetection: {}, circuitBreakers: {}}").is_default()
        );
        let policy = service(
            "{service: orders, outlierDetection: {consecutive5xx: 3, interval: 1500ms}, circuitBreakers: {maxRetries: 0}}",
        );
        let defaults = ClusterPolicy::default();
        assert_eq!(
            policy.outlier_detection,
            OutlierDetection {
                consecutive_5xx: 3,
                interval: Duration::from_millis(1500),
                ..defaults.outlier_detection
            }
        );
        assert_eq!(
            policy.circuit_breakers,
            CircuitBreakers {
                max_retries: 0,
                ..defaults.circuit_breakers
            }
        );
    }

    /// The rate limits of a MeshService whose `spec.rateLimit` is `rate_limit` (flow YAML),
    /// or its errors joined by newlines.
    fn rate_limit_of(rate_limit: &str) -> Result<RateLimit, String> {
        let text = format!(
            "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {{name: orders}}\nspec:\n  rateLimit: {rate_limit}\n"
        );
        match crate::sources::files::parse_manifests("orders.yaml", &text) {
            Ok(objects) => match &objects[0] {
                crate::index::IndexObject::Service(declaration) => {
                    Ok(declaration.rate_limit.clone())
                }
                _ => panic!("not a service declaration"),
            },
            Err(errors) => Err(errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n")),
        }
    }

    #[test]
    fn rate_limits_default_their_period_and_burst_and_match_longer_prefixes_first() {
        let limits = rate_limit_of(
            "{requests: 100, paths: [{prefix: /api, requests: 10, per: 1m}, {prefix: /api/orders, requests: 5, per: 10s, burst: 20}]}",
        )
        .unwrap();
        let bucket = |requests, per, burst| TokenBucket {
            requests,
            per,
            burst,
        };
        assert_eq!(
            limits,
            RateLimit {
                service: Some(bucket(100, Duration::from_secs(1), 100)),
                paths: vec![
                    PathRateLimit {
                        prefix: "/api/orders".into(),
                        bucket: bucket(5, Duration::from_secs(10), 20),
                    },
                    PathRateLimit {
                        prefix: "/api".into(),
                        bucket: bucket(10, Duration::from_secs(60), 10),
                    },
                ],
            }
        );
        // Paths alone: only their requests are limited.
        let paths_only = rate_limit_of("{paths: [{prefix: /login, requests: 1}]}").unwrap();
        assert_eq!(paths_only.service, None);
        assert_eq!(paths_only.paths.len(), 1);
        // No rateLimit: nothing is limited.
        let text = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: orders}\nspec: {}\n";
        let objects = crate::sources::files::parse_manifests("orders.yaml", text).unwrap();
        let crate::index::IndexObject::Service(declaration) = &objects[0] else {
            panic!("not a service declaration")
        };
        assert!(declaration.rate_limit.is_unlimited());
    }

    #[test]
    fn rate_limits_out_of_bounds_are_refused_naming_the_field() {
        let errors = rate_limit_of(
            "{requests: 0, per: 10ms, burst: 1000001, paths: [{prefix: /a, requests: 1000001}, {prefix: api, requests: 1}, {prefix: /a, requests: 1, per: 25h}, {prefix: \"/a b\", requests: 1, burst: 0}]}",
        )
        .unwrap_err();
        for expected in [
            "spec.rateLimit.requests: 0 is outside 1..=1000000",
            "spec.rateLimit.per: 10ms is shorter than 50ms",
            "spec.rateLimit.burst: 1000001 is outside 1..=1000000",
            "spec.rateLimit.paths[0].requests: 1000001 is outside 1..=1000000",
            "spec.rateLimit.paths[1].prefix: \"api\" must start with '/'",
            "spec.rateLimit.paths[2].prefix: \"/a\" is listed twice (also paths[0])",
            "spec.rateLimit.paths[2].per: \"25h\": must be at most 24h",
            "spec.rateLimit.paths[3].prefix: \"/a b\" contains a space",
            "spec.rateLimit.paths[3].burst: 0 is outside 1..=1000000",
        ] {
            assert!(errors.contains(expected), "{expected} not in {errors}");
        }
        // Nothing to limit, or a period and burst without the limit they belong to.
        let empty = rate_limit_of("{}").unwrap_err();
        assert!(
            empty.contains("spec.rateLimit: set `requests` (a limit for every request) or `paths`"),
            "{empty}"
        );
        let orphans =
            rate_limit_of("{per: 1s, burst: 5, paths: [{prefix: /a, requests: 1}]}").unwrap_err();
        for field in ["per", "burst"] {
            assert!(
                orphans.contains(&format!(
                    "spec.rateLimit.{field}: applies to the service-wide limit"
                )),
                "{orphans}"
            );
        }
        // A bounded number of path limits.
        let many: Vec<String> = (0..=MAX_PATH_RATE_LIMITS)
            .map(|i| format!("{{prefix: /p{i}, requests: 1}}"))
            .collect();
        let too_many = rate_limit_of(&format!("{{paths: [{}]}}", many.join(", "))).unwrap_err();
        assert!(
            too_many.contains("spec.rateLimit.paths: 65 entries; at most 64"),
            "{too_many}"
        );
        assert!(rate_limit_of(&format!("{{paths: [{}]}}", many[1..].join(", "))).is_ok());
        // Negative counts and unknown fields are refused by the schema, naming the field.
        let negative = rate_limit_of("{requests: -1}").unwrap_err();
        assert!(negative.contains("requests"), "{negative}");
        let unknown = rate_limit_of("{requestsPerSecond: 5}").unwrap_err();
        assert!(unknown.contains("requestsPerSecond"), "{unknown}");
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
