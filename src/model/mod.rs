//! The domain model: services, their endpoints and dependencies, access policies, and the
//! proxy groups that share one snapshot.
//!
//! Every source (Consul, Kubernetes, `--config-dir`) produces these same types, so
//! [`crate::translate`] never knows where an endpoint came from. Pure data, no IO.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde::Serialize;

mod access;
mod change;
mod dependency;
mod migration;
mod ports;
mod rate_limit;

pub use access::{AccessAction, AccessPolicy, AccessRuleSet, CallerMatch, PathMatch};
pub use change::{StateDiff, diff_states};
pub use dependency::{
    CircuitBreakers, ClusterPolicy, Dependency, DependencySettings, DependencyTarget,
    ExternalDomain, OutlierDetection, ParseDependencyError, RetryPolicy, valid_service_name,
    valid_service_ref,
};
pub use migration::{
    MAX_MIGRATION_STEPS, MIN_MIGRATION_INTERVAL, Migration, Operator, PlanCheck, PlanPhase,
    PlanProgress, advance_plan,
};
pub use ports::{
    MAX_NAMED_PORTS, NamedPort, PORT_SEPARATOR, PortBinding, access_target, port_service,
    split_port_service, valid_port_name,
};
pub use rate_limit::{
    MAX_PATH_RATE_LIMITS, MAX_RATE_LIMIT_REQUESTS, MIN_RATE_LIMIT_PERIOD, PathRateLimit, RateLimit,
    TokenBucket,
};

/// Where an endpoint came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    /// An instance in the Consul catalog.
    Consul,
    /// A pod selected by a MeshService.
    Kubernetes,
    /// A static endpoint of a MeshService manifest (`--config-dir` or the CRD).
    Config,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Origin::Consul => "consul",
            Origin::Kubernetes => "kubernetes",
            Origin::Config => "config",
        })
    }
}

/// Mutual TLS requirement of a service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Plaintext only.
    #[default]
    Disabled,
    /// Plaintext and mutual TLS.
    Permissive,
    /// Mutual TLS only.
    Strict,
}

/// One instance of a service, wherever it runs.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct Endpoint {
    /// IP address (host names are refused by validation, or left out for Consul).
    pub address: String,
    /// Port callers connect to.
    pub port: u16,
    /// Where the endpoint came from.
    pub origin: Origin,
    /// Datacenter; `None` means the local one.
    pub datacenter: Option<String>,
    /// Tags (`canary`, `weight:N`, `mtls`, and anything else the source carried).
    pub tags: BTreeSet<String>,
    /// Load-balancing weight, at least 1.
    pub weight: u32,
    /// Whether the instance may receive traffic.
    pub healthy: bool,
    /// Where it serves its service's further ports, by port name (see [`port_service`]):
    /// static endpoints' `ports`, Consul's `meshbridge-port-NAME` meta, a pod's sidecar.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u16>,
}

/// Tag marking a canary instance.
pub const CANARY_TAG: &str = "canary";
/// Tag marking an instance that accepts only mutual TLS callers.
pub const MTLS_TAG: &str = "mtls";
/// Largest load-balancing weight (Envoy's limit is higher; this keeps sums safe).
pub const MAX_WEIGHT: u32 = 128;

impl Endpoint {
    /// Whether the instance is a canary.
    pub fn is_canary(&self) -> bool {
        self.tags.contains(CANARY_TAG)
    }

    /// The weight given by a `weight:N` tag, if any tag parses (clamped to 1..=`MAX_WEIGHT`).
    pub fn weight_from_tags<'a>(tags: impl IntoIterator<Item = &'a String>) -> Option<u32> {
        tags.into_iter()
            .filter_map(|t| t.strip_prefix("weight:"))
            .find_map(|w| w.parse::<u32>().ok())
            .map(|w| w.clamp(1, MAX_WEIGHT))
    }
}

/// A service: its settings, dependencies and instances from every source.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Service {
    /// Mesh-wide name (equals the Consul name).
    pub name: String,
    /// Whether a MeshService declares it (otherwise it is known only from endpoints).
    pub declared: bool,
    /// Mutual TLS requirement.
    pub mtls: MtlsMode,
    /// Declared dependencies (from its MeshService).
    pub dependencies: Vec<Dependency>,
    /// Instances, sorted, healthy or not.
    pub endpoints: Vec<Endpoint>,
    /// The Kubernetes namespace of the MeshService declaring it (none for the operator's
    /// manifests and for services known only from Consul).
    pub namespace: Option<String>,
    /// What its instances speak (`spec.ports[0].protocol`; HTTP/1 when undeclared).
    pub protocol: AppProtocol,
    /// The port its MeshService declares first (`spec.ports[0].port`): where callers' proxies
    /// listen for a `tcp` service unless the dependency names another.
    pub port: Option<u16>,
    /// The HTTP/1 header names it sends keep their case: its callers' proxies read its
    /// instances' answers, and its own proxies read its application's requests, remembering
    /// the case (`spec.http1.preserveHeaderCase`).
    pub preserve_header_case: bool,
    /// Local rate limits its ingress proxies enforce (`spec.rateLimit`; none by default).
    pub rate_limit: RateLimit,
    /// The further ports its MeshService declares (`spec.ports[1..]`), each also a service
    /// of its own named `NAME:PORT` (see [`port_service`]).
    pub named_ports: Vec<NamedPort>,
    /// Its migration from one origin to another (`spec.migration`), if one is declared.
    pub migration: Option<Migration>,
}

/// The application protocol of a service's instances, as callers' proxies speak it to them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppProtocol {
    /// HTTP/1.1.
    #[default]
    Http,
    /// HTTP/2 without TLS from the proxy (prior knowledge, `h2c`).
    Http2,
    /// gRPC: HTTP/2.
    Grpc,
    /// Opaque TCP: callers reach it on a port of their own (no Host to route by), and its
    /// ingress forwards connections, authorized by the caller's certificate.
    Tcp,
}

impl fmt::Display for AppProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AppProtocol::Http => "http",
            AppProtocol::Http2 => "http2",
            AppProtocol::Grpc => "grpc",
            AppProtocol::Tcp => "tcp",
        })
    }
}

impl AppProtocol {
    /// Whether proxies speak HTTP/2 to the instances.
    pub fn is_http2(self) -> bool {
        matches!(self, AppProtocol::Http2 | AppProtocol::Grpc)
    }

    /// Whether proxies carry connections, not HTTP requests.
    pub fn is_tcp(self) -> bool {
        self == AppProtocol::Tcp
    }
}

impl Service {
    /// Healthy instances.
    pub fn healthy_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.iter().filter(|e| e.healthy)
    }

    /// Whether some healthy instance is a canary.
    pub fn has_canary(&self) -> bool {
        self.healthy_endpoints().any(Endpoint::is_canary)
    }
}

/// Everything the control plane knows, built by the index from all sources.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MeshState {
    /// Services by name.
    pub services: BTreeMap<String, Service>,
    /// Access policies by target service.
    pub access: BTreeMap<String, AccessPolicy>,
}

impl MeshState {
    /// The services a dependency on `target` reaches: the one it names (known or not), every
    /// service for `"*"` when the caller may use it (`wildcard_allowed`), none for a domain or
    /// a `"*"` it may not use. The one expansion translation and the admin API share.
    pub fn services_reached<'a>(
        &'a self,
        target: &'a DependencyTarget,
        wildcard_allowed: bool,
    ) -> Box<dyn Iterator<Item = &'a str> + 'a> {
        match target {
            DependencyTarget::Service(name) => Box::new(std::iter::once(name.as_str())),
            DependencyTarget::All if wildcard_allowed => {
                Box::new(self.services.keys().map(String::as_str))
            }
            DependencyTarget::All | DependencyTarget::Domain(_) => Box::new(std::iter::empty()),
        }
    }

    /// Whether a dependency on `target` reaches `service`: [`Self::services_reached`]
    /// without walking every service for `"*"`.
    pub fn reaches(
        &self,
        target: &DependencyTarget,
        wildcard_allowed: bool,
        service: &str,
    ) -> bool {
        match target {
            DependencyTarget::Service(name) => name == service,
            DependencyTarget::All => wildcard_allowed && self.services.contains_key(service),
            DependencyTarget::Domain(_) => false,
        }
    }

    /// Splits caller names (service names, globs, `"*"`) into those that match a known service
    /// (`"*"` always does) and those that match none, each sorted and without repeats.
    pub fn resolve_callers<'a>(
        &self,
        callers: impl IntoIterator<Item = &'a str>,
    ) -> (Vec<String>, Vec<String>) {
        let mut resolved = BTreeSet::new();
        let mut unknown = BTreeSet::new();
        for caller in callers {
            if caller == "*" || self.services.keys().any(|s| glob_match(caller, s)) {
                resolved.insert(caller.to_string());
            } else {
                unknown.insert(caller.to_string());
            }
        }
        (
            resolved.into_iter().collect(),
            unknown.into_iter().collect(),
        )
    }
}

/// Operator settings that shape translation (from `meshbridge run` flags).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeshSettings {
    /// Globs of services whose proxies may depend on `"*"`.
    pub allow_wildcard: Vec<String>,
    /// Datacenters in priority order; the first is local.
    pub datacenters: Vec<String>,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// CA bundle, on the proxies' hosts, that verifies external `https://` domains (default
    /// the Debian/Alpine system bundle).
    pub external_ca_file: Option<String>,
    /// A service no AccessRule targets refuses every call (otherwise it accepts every call).
    pub default_deny: bool,
    /// Callers without a certificate are identified by their source IP, matched against the
    /// addresses of every known instance. Weaker than mTLS: anyone who can send from that
    /// address (a shared host, a reused pod IP) is taken for that service.
    pub source_ip_identity: bool,
    /// Globs of services whose proxies may assert the caller's identity in the
    /// `x-client-name` header (an edge gateway that authenticated the caller itself). The peer
    /// must itself present a certificate naming such a service.
    pub identity_header_from: Vec<String>,
    /// Consul's DNS domain (`consul`): each service also answers to `NAME.service.DOMAIN`
    /// and `NAME.service.DC.DOMAIN` for every datacenter; none: no Consul names.
    pub consul_domain: Option<String>,
    /// The Kubernetes cluster domain (`cluster.local`): a service declared in namespace NS
    /// also answers to `NAME.NS`, `NAME.NS.svc` and `NAME.NS.svc.DOMAIN`; none: no
    /// Kubernetes names.
    pub cluster_domain: Option<String>,
}

impl MeshSettings {
    /// Every name callers may use for `service` (lower case, its own name first): the names
    /// Consul DNS and Kubernetes DNS give it, as configured. A caller's `Host` matches any,
    /// with or without a port.
    pub fn service_names(&self, service: &Service) -> Vec<String> {
        let name = service.name.to_ascii_lowercase();
        let mut out = vec![name.clone()];
        if let Some(domain) = self.consul_domain.as_deref() {
            out.push(format!("{name}.service.{domain}"));
            for dc in &self.datacenters {
                out.push(format!(
                    "{name}.service.{}.{domain}",
                    dc.to_ascii_lowercase()
                ));
            }
        }
        if let (Some(domain), Some(ns)) = (self.cluster_domain.as_deref(), &service.namespace) {
            out.push(format!("{name}.{ns}"));
            out.push(format!("{name}.{ns}.svc"));
            out.push(format!("{name}.{ns}.svc.{domain}"));
        }
        out
    }

    /// The CA bundle path external domains are verified against.
    pub fn external_ca_file(&self) -> &str {
        self.external_ca_file
            .as_deref()
            .unwrap_or(DEFAULT_EXTERNAL_CA_FILE)
    }

    /// Whether proxies of `service` may depend on every service.
    pub fn wildcard_allowed(&self, service: &str) -> bool {
        self.allow_wildcard.iter().any(|g| glob_match(g, service))
    }

    /// Priority of a datacenter: the local one (or none) is 0, the others follow their flag
    /// order, and datacenters not named by a flag come last.
    pub fn datacenter_priority(&self, datacenter: Option<&str>) -> u32 {
        match datacenter {
            None => 0,
            Some(dc) => match self.datacenters.iter().position(|d| d == dc) {
                Some(i) => i as u32,
                None if self.datacenters.is_empty() => 0,
                None => self.datacenters.len() as u32,
            },
        }
    }
}

/// Matches `name` against a glob where `*` stands for any run of characters.
pub fn glob_match(glob: &str, name: &str) -> bool {
    let parts: Vec<&str> = glob.split('*').collect();
    if parts.len() == 1 {
        return glob == name;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    // Both ends checked before cutting them off, so the cuts fall between characters.
    if !name.starts_with(first) || !name.ends_with(last) || name.len() < first.len() + last.len() {
        return false;
    }
    let mut rest = &name[first.len()..name.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// Proxies that get the same configuration: same service, ports and declared dependencies.
///
/// Built from a proxy's node metadata; the dependencies of the service's MeshService are
/// merged in at translation time, so a manifest change never regroups connected proxies.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct ProxyGroup {
    /// The service the proxy runs beside.
    pub service: String,
    /// Port of the ingress listener (none: no ingress).
    pub ingress_port: Option<u16>,
    /// Address the ingress listener binds to (default `0.0.0.0`).
    pub ingress_host: Option<String>,
    /// Port of the local application.
    pub app_port: Option<u16>,
    /// Port of the egress listener on 127.0.0.1 (none: no egress).
    pub egress_port: Option<u16>,
    /// Dependencies named in the node metadata.
    pub dependencies: BTreeSet<DependencyTarget>,
    /// Listeners for the service's further named ports (node metadata `ports`), by name.
    pub ports: BTreeMap<String, PortBinding>,
    /// Whether the proxy holds a certificate (node metadata `tls` with the files named in
    /// [`ProxyGroup::certificate_files`]), so it can accept and originate mutual TLS.
    pub tls: bool,
    /// Where its certificate, key and CA bundle are on its host, when it holds them.
    pub certificate_files: Option<CertificateFiles>,
}

/// The files of a proxy's certificate as the proxy names them (node metadata `tls_cert`,
/// `tls_key`, `tls_ca`). meshbridge never reads them: it hands the paths back to that proxy
/// only, as the SDS secrets `server_cert` and `validation_context`, so that Envoy reads the
/// files itself and reads them again whenever they are replaced.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct CertificateFiles {
    /// Certificate chain (PEM).
    pub cert: String,
    /// Private key (PEM).
    pub key: String,
    /// CA bundle that verifies peers (PEM).
    pub ca: String,
}

impl ProxyGroup {
    /// A short stable identifier of the group, for logs and the admin API.
    pub fn id(&self) -> String {
        let mut text = format!(
            "{}|{:?}|{:?}|{:?}|{:?}{}",
            self.service,
            self.ingress_port,
            self.ingress_host,
            self.app_port,
            self.egress_port,
            if self.tls { "|tls" } else { "" }
        );
        if let Some(f) = &self.certificate_files {
            text.push_str(&format!("|{}|{}|{}", f.cert, f.key, f.ca));
        }
        for d in &self.dependencies {
            text.push('|');
            text.push_str(&d.to_string());
        }
        for (name, binding) in &self.ports {
            text.push_str("|port:");
            text.push_str(&PortBinding::format(name, binding));
        }
        format!(
            "{}-{:08x}",
            self.service,
            xxhash_rust::xxh3::xxh3_64(text.as_bytes()) as u32
        )
    }
}

/// CA bundle external domains are verified against unless configured otherwise: the system
/// roots of the Envoy image (Debian, Ubuntu — the official Envoy image — and Alpine install
/// it here; RHEL-based hosts need `--external-ca-file /etc/pki/tls/certs/ca-bundle.crt`).
pub const DEFAULT_EXTERNAL_CA_FILE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Default request timeout towards a dependency.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reaches_agrees_with_the_expansion() {
        let mut state = MeshState::default();
        for name in ["orders", "billing"] {
            state.services.insert(name.into(), Service::default());
        }
        let targets = [
            DependencyTarget::Service("orders".into()),
            DependencyTarget::Service("unknown".into()),
            DependencyTarget::All,
            "https://api.example.com".parse().unwrap(),
        ];
        for target in &targets {
            for allowed in [true, false] {
                for service in ["orders", "billing", "unknown"] {
                    assert_eq!(
                        state.reaches(target, allowed, service),
                        state
                            .services_reached(target, allowed)
                            .any(|s| s == service),
                        "{target} {allowed} {service}"
                    );
                }
            }
        }
    }

    #[test]
    fn globs() {
        assert!(glob_match("*", "anything"));
        assert!(glob_match("admin-*", "admin-panel"));
        assert!(!glob_match("admin-*", "user-admin"));
        assert!(glob_match("*-api", "orders-api"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("a*c*e", "abde"));
        assert!(glob_match("exact", "exact"));
        // Any text, even where a suffix would cut a character in two, answers without a
        // panic (found by the glob fuzz target).
        assert!(!glob_match("a*é", "ab€"));
        assert!(glob_match("a*é", "abé"));
        assert!(!glob_match("exact", "exactly"));
        assert!(!glob_match("ab*ba", "aba"));
    }

    #[test]
    fn datacenter_priorities_follow_flag_order() {
        let s = MeshSettings {
            datacenters: vec!["dc1".into(), "dc2".into()],
            ..Default::default()
        };
        assert_eq!(s.datacenter_priority(None), 0);
        assert_eq!(s.datacenter_priority(Some("dc1")), 0);
        assert_eq!(s.datacenter_priority(Some("dc2")), 1);
        assert_eq!(s.datacenter_priority(Some("dc9")), 2);
    }

    #[test]
    fn weight_tags() {
        let tags = ["canary".to_string(), "weight:7".to_string()];
        assert_eq!(Endpoint::weight_from_tags(&tags), Some(7));
        assert_eq!(
            Endpoint::weight_from_tags(&["weight:0".to_string()]),
            Some(1)
        );
        assert_eq!(Endpoint::weight_from_tags(&["weight:x".to_string()]), None);
    }
}
