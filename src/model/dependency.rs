//! Dependencies: what a service calls, and how.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Serialize;

/// What a dependency points at.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind", content = "value", rename_all = "lowercase")]
pub enum DependencyTarget {
    /// A mesh service by name.
    Service(String),
    /// Every service in the mesh (`"*"`), honoured only where the operator allows it.
    All,
    /// An external domain reached through the egress listener.
    Domain(ExternalDomain),
}

/// An external domain, `https://host[:port]` or `http://host[:port]`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ExternalDomain {
    /// Whether Envoy originates TLS to it.
    pub tls: bool,
    /// Host name (lower case).
    pub host: String,
    /// Port (default 443 for https, 80 for http).
    pub port: u16,
}

impl fmt::Display for ExternalDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

/// A dependency string that is neither a service name, `"*"`, nor an http(s) URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseDependencyError {
    /// An empty string.
    #[error("dependency is empty")]
    Empty,
    /// A URL whose scheme is not http or https.
    #[error("domain {0:?} must start with https:// or http://")]
    BadScheme(String),
    /// A URL with a path, query or empty host.
    #[error("domain {0:?} must be scheme://host[:port] with no path")]
    BadDomain(String),
    /// A port that is not 1–65535.
    #[error("domain {0:?} has an invalid port")]
    BadPort(String),
    /// A service name with characters Consul and DNS do not allow.
    #[error(
        "service name {0:?} is invalid: use letters, digits, '-', '.', '_', starting and ending with a letter or digit, at most 253 characters, optionally followed by ':' and a port name (lower-case letters, digits, '-', at most 15)"
    )]
    BadServiceName(String),
}

/// Whether `name` is a valid mesh service name.
pub fn valid_service_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && bytes[0].is_ascii_alphanumeric()
        && bytes[bytes.len() - 1].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

/// Whether `name` names a service or one of its named ports (`orders:admin`, see
/// [`super::ports`]).
pub fn valid_service_ref(name: &str) -> bool {
    match super::ports::split_port_service(name) {
        (service, None) => valid_service_name(service),
        (service, Some(port)) => valid_service_name(service) && super::ports::valid_port_name(port),
    }
}

impl ExternalDomain {
    /// Parses `https://host[:port]` or `http://host[:port]` (a trailing `/` is accepted).
    pub fn parse(text: &str) -> Result<Self, ParseDependencyError> {
        let (tls, rest) = if let Some(r) = text.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = text.strip_prefix("http://") {
            (false, r)
        } else {
            return Err(ParseDependencyError::BadScheme(text.to_string()));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) {
            return Err(ParseDependencyError::BadDomain(text.to_string()));
        }
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) => {
                let port = p
                    .parse::<u16>()
                    .ok()
                    .filter(|p| *p > 0)
                    .ok_or_else(|| ParseDependencyError::BadPort(text.to_string()))?;
                (h, port)
            }
            None => (rest, if tls { 443 } else { 80 }),
        };
        if !valid_service_name(host) {
            return Err(ParseDependencyError::BadDomain(text.to_string()));
        }
        Ok(ExternalDomain {
            tls,
            host: host.to_ascii_lowercase(),
            port,
        })
    }
}

impl FromStr for DependencyTarget {
    type Err = ParseDependencyError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let text = text.trim();
        if text.is_empty() {
            Err(ParseDependencyError::Empty)
        } else if text == "*" {
            Ok(DependencyTarget::All)
        } else if text.contains("://") {
            ExternalDomain::parse(text).map(DependencyTarget::Domain)
        } else if valid_service_ref(text) {
            Ok(DependencyTarget::Service(text.to_string()))
        } else {
            Err(ParseDependencyError::BadServiceName(text.to_string()))
        }
    }
}

impl fmt::Display for DependencyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DependencyTarget::Service(s) => f.write_str(s),
            DependencyTarget::All => f.write_str("*"),
            DependencyTarget::Domain(d) => d.fmt(f),
        }
    }
}

/// Retry policy towards a dependency.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Envoy `retry_on` conditions; empty: those of [`RetryPolicy::default_for`] the
    /// called service's protocol.
    pub on: Vec<String>,
    /// Timeout of each attempt.
    pub per_try_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    /// One retry when the connection could not be made or the stream was refused: safe for
    /// every method because the request never reached the application.
    fn default() -> Self {
        RetryPolicy {
            attempts: 1,
            on: vec!["connect-failure".into(), "refused-stream".into()],
            per_try_timeout: None,
        }
    }
}

impl RetryPolicy {
    /// The default policy towards a service speaking `protocol`: [`RetryPolicy::default`],
    /// and for gRPC also a call answered `UNAVAILABLE`, which gRPC defines as transient and
    /// safe to retry (the server did not act on it).
    pub fn default_for(protocol: super::AppProtocol) -> Self {
        let mut policy = RetryPolicy::default();
        if protocol == super::AppProtocol::Grpc {
            policy.on.push("unavailable".into());
        }
        policy
    }

    /// This policy towards a service speaking `protocol`: conditions left out are that
    /// protocol's defaults.
    pub fn for_protocol(&self, protocol: super::AppProtocol) -> Self {
        let mut policy = self.clone();
        if policy.on.is_empty() {
            policy.on = RetryPolicy::default_for(protocol).on;
        }
        policy
    }
}

/// Passive health checking of a mesh cluster: an instance that keeps failing is ejected
/// from load balancing for a while.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct OutlierDetection {
    /// Consecutive 5xx responses (or connection failures) that eject an instance.
    pub consecutive_5xx: u32,
    /// Consecutive 502, 503 or 504 responses that eject an instance.
    pub consecutive_gateway_failure: u32,
    /// Time between ejection sweeps (which also return ejected instances).
    pub interval: Duration,
    /// How long an instance is ejected for, multiplied by the times it has been ejected.
    pub base_ejection_time: Duration,
    /// Largest share of a cluster's instances ejected at once, in percent.
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    /// Envoy's thresholds, enforced: at most half the instances ejected, so that a service is
    /// never ejected entirely.
    fn default() -> Self {
        OutlierDetection {
            consecutive_5xx: 5,
            consecutive_gateway_failure: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 50,
        }
    }
}

/// Limits of a mesh cluster, per calling proxy: requests beyond them fail at once instead of
/// queueing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct CircuitBreakers {
    /// Connections to all instances.
    pub max_connections: u32,
    /// Requests waiting for a connection.
    pub max_pending_requests: u32,
    /// Requests in flight.
    pub max_requests: u32,
    /// Retries in flight.
    pub max_retries: u32,
}

impl Default for CircuitBreakers {
    /// Envoy's own defaults, stated so that they show in the configuration.
    fn default() -> Self {
        CircuitBreakers {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// How the cluster of a mesh dependency treats its instances. The default is what every
/// mesh cluster carries; a dependency with another policy gets its own variant of the
/// cluster (sharing the instances).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ClusterPolicy {
    /// Passive health checking.
    pub outlier_detection: OutlierDetection,
    /// Connection and request limits.
    pub circuit_breakers: CircuitBreakers,
    /// Whether HTTP/1 header names keep their case towards this dependency, overriding the
    /// called service's `spec.http1` (none: as the service says).
    pub preserve_header_case: Option<bool>,
}

impl ClusterPolicy {
    /// Whether this is the policy of the shared mesh clusters.
    pub fn is_default(&self) -> bool {
        *self == ClusterPolicy::default()
    }
}

/// How calls to a dependency behave.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct DependencySettings {
    /// Request timeout (default [`super::DEFAULT_TIMEOUT`]).
    pub timeout: Option<Duration>,
    /// Retry policy (default [`RetryPolicy::default`]).
    pub retries: Option<RetryPolicy>,
    /// Outlier detection and circuit breakers of the called service's cluster.
    pub cluster: ClusterPolicy,
    /// For a `tcp` service: the port the caller's proxy listens on for it (on 127.0.0.1;
    /// default the service's own port).
    pub local_port: Option<u16>,
    /// Whether WebSocket upgrades pass (default: towards HTTP/1 services only).
    pub websocket: Option<bool>,
}

/// A dependency with its settings.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Dependency {
    /// What is called.
    pub target: DependencyTarget,
    /// How.
    pub settings: DependencySettings,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_dependencies() {
        assert_eq!("*".parse(), Ok(DependencyTarget::All));
        assert_eq!(
            "orders".parse(),
            Ok(DependencyTarget::Service("orders".into()))
        );
        assert_eq!(
            "https://API.example.com".parse(),
            Ok(DependencyTarget::Domain(ExternalDomain {
                tls: true,
                host: "api.example.com".into(),
                port: 443
            }))
        );
        assert_eq!(
            "http://example.com:8080/".parse::<DependencyTarget>(),
            Ok(DependencyTarget::Domain(ExternalDomain {
                tls: false,
                host: "example.com".into(),
                port: 8080
            }))
        );
        assert!(matches!(
            "ftp://x".parse::<DependencyTarget>(),
            Err(ParseDependencyError::BadScheme(_))
        ));
        assert!(matches!(
            "https://x/path".parse::<DependencyTarget>(),
            Err(ParseDependencyError::BadDomain(_))
        ));
        assert!(matches!(
            "https://x:0".parse::<DependencyTarget>(),
            Err(ParseDependencyError::BadPort(_))
        ));
        assert!(matches!(
            "bad name".parse::<DependencyTarget>(),
            Err(ParseDependencyError::BadServiceName(_))
        ));
    }
}
