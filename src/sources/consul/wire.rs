//! Consul's answers as it sends them, and their parsers (pure): health entries into model
//! endpoints, checks into fingerprints, the catalog into names and tags.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;

use crate::model::{Endpoint, MAX_NAMED_PORTS, MAX_WEIGHT, Origin, valid_port_name};

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: HealthNode,
    service: HealthService,
    #[serde(default)]
    checks: Vec<HealthCheck>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthNode {
    #[serde(default)]
    node: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    datacenter: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthService {
    #[serde(default)]
    address: String,
    port: u16,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    weights: Option<Weights>,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

/// Meta key prefix naming where a Consul instance serves a further port of its service:
/// `meshbridge-port-admin: "15007"` (Consul has one port per registration).
pub const PORT_META_PREFIX: &str = "meshbridge-port-";

/// The further ports an instance's meta names: valid port names with a port number, at most
/// [`MAX_NAMED_PORTS`]; anything else is ignored (other tools' meta).
fn named_ports(meta: Option<&BTreeMap<String, String>>) -> BTreeMap<String, u16> {
    meta.into_iter()
        .flatten()
        .filter_map(|(key, value)| {
            let name = key.strip_prefix(PORT_META_PREFIX)?;
            let port = value.trim().parse::<u16>().ok().filter(|p| *p > 0)?;
            valid_port_name(name).then(|| (name.to_string(), port))
        })
        .take(MAX_NAMED_PORTS)
        .collect()
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    #[serde(default)]
    passing: u32,
    #[serde(default)]
    warning: u32,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthCheck {
    status: String,
}

/// Which instances receive traffic.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HealthPolicy {
    /// Only instances whose checks all pass.
    #[default]
    PassingOnly,
    /// Instances with passing or warning checks.
    PassingAndWarning,
}

/// Maps a `/v1/health/service/<name>` body to endpoints: address (service address, else
/// node address), port, tags, weight (`weight:N` tag, else `Weights.Passing` — or
/// `Weights.Warning` for a warning instance — default 1), datacenter and health.
///
/// Instances on `skip_node` (where meshbridge registers pods, which the Kubernetes source
/// already provides) are left out.
pub fn parse_health(
    body: &[u8],
    datacenter: &str,
    policy: HealthPolicy,
    skip_node: Option<&str>,
) -> Result<Vec<Endpoint>, serde_json::Error> {
    let entries: Vec<HealthEntry> = serde_json::from_slice(body)?;
    let mut out: Vec<Endpoint> = entries
        .into_iter()
        .filter(|e| e.service.port > 0 && skip_node != Some(e.node.node.as_str()))
        .map(|e| {
            let worst = e
                .checks
                .iter()
                .map(|c| match c.status.as_str() {
                    "passing" => 0,
                    "warning" => 1,
                    _ => 2,
                })
                .max()
                .unwrap_or(0);
            let healthy = match policy {
                HealthPolicy::PassingOnly => worst == 0,
                HealthPolicy::PassingAndWarning => worst <= 1,
            };
            let tags: BTreeSet<String> = e.service.tags.unwrap_or_default().into_iter().collect();
            let from_weights = e
                .service
                .weights
                .map(|w| if worst == 1 { w.warning } else { w.passing });
            let weight = Endpoint::weight_from_tags(&tags)
                .or(from_weights.filter(|w| *w > 0))
                .unwrap_or(1)
                .clamp(1, MAX_WEIGHT);
            let address = if e.service.address.is_empty() {
                e.node.address
            } else {
                e.service.address
            };
            Endpoint {
                address,
                port: e.service.port,
                origin: Origin::Consul,
                datacenter: Some(
                    e.node
                        .datacenter
                        .filter(|d| !d.is_empty())
                        .unwrap_or_else(|| datacenter.to_string()),
                ),
                tags,
                weight,
                healthy,
                ports: named_ports(e.service.meta.as_ref()),
            }
        })
        .filter(|e| {
            // Envoy's endpoint assignments take IP addresses only: one host name would make
            // the proxy refuse the whole assignment, and every instance with it.
            let ip = e.address.parse::<std::net::IpAddr>().is_ok();
            if !ip && !e.address.is_empty() {
                tracing::warn!(address = %e.address, port = e.port, "Consul instance with a host name for its address is left out: proxies need an IP address");
            }
            ip
        })
        .collect();
    out.sort();
    out.dedup();
    Ok(out)
}

/// The checks of a datacenter reduced to fingerprints: one per service (its service checks)
/// and one per node (its node checks, which affect every service on the node).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckFingerprints {
    /// Service name → hash of its checks (node, id, status, modify index).
    pub services: BTreeMap<String, u64>,
    /// Node → hash of its node-level checks.
    pub nodes: BTreeMap<String, u64>,
    /// Service name → nodes it runs on.
    pub placement: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Deserialize)]
struct CheckEntry {
    #[serde(rename = "Node", default)]
    node: String,
    #[serde(rename = "CheckID", default)]
    check_id: String,
    #[serde(rename = "Status", default)]
    status: String,
    #[serde(rename = "ServiceName", default)]
    service_name: String,
    #[serde(rename = "ModifyIndex", default)]
    modify_index: u64,
}

/// Parses a `/v1/health/state/any` body into fingerprints.
pub fn parse_checks(body: &[u8]) -> Result<CheckFingerprints, serde_json::Error> {
    let mut checks: Vec<CheckEntry> = serde_json::from_slice(body)?;
    checks.sort_by(|a, b| (&a.node, &a.check_id).cmp(&(&b.node, &b.check_id)));
    let mut services: BTreeMap<String, xxhash_rust::xxh3::Xxh3> = BTreeMap::new();
    let mut nodes: BTreeMap<String, xxhash_rust::xxh3::Xxh3> = BTreeMap::new();
    let mut placement: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for c in &checks {
        let hasher = if c.service_name.is_empty() {
            nodes.entry(c.node.clone()).or_default()
        } else {
            placement
                .entry(c.service_name.clone())
                .or_default()
                .insert(c.node.clone());
            services.entry(c.service_name.clone()).or_default()
        };
        for part in [
            c.node.as_bytes(),
            c.check_id.as_bytes(),
            c.status.as_bytes(),
        ] {
            hasher.update(part);
            hasher.update(&[0]);
        }
        hasher.update(&c.modify_index.to_le_bytes());
    }
    Ok(CheckFingerprints {
        services: services.into_iter().map(|(k, h)| (k, h.digest())).collect(),
        nodes: nodes.into_iter().map(|(k, h)| (k, h.digest())).collect(),
        placement,
    })
}

/// Services whose instances may have changed between two fingerprints.
pub fn changed_services(old: &CheckFingerprints, new: &CheckFingerprints) -> BTreeSet<String> {
    let mut out: BTreeSet<String> = old
        .services
        .keys()
        .chain(new.services.keys())
        .filter(|s| old.services.get(*s) != new.services.get(*s))
        .cloned()
        .collect();
    let nodes: BTreeSet<&String> = old
        .nodes
        .keys()
        .chain(new.nodes.keys())
        .filter(|n| old.nodes.get(*n) != new.nodes.get(*n))
        .collect();
    if !nodes.is_empty() {
        for placement in [&old.placement, &new.placement] {
            for (service, on) in placement {
                if on.iter().any(|n| nodes.contains(n)) {
                    out.insert(service.clone());
                }
            }
        }
    }
    out
}

/// Parses a `/v1/catalog/services` body into service name → tags.
pub(super) fn parse_catalog(
    body: &[u8],
) -> Result<BTreeMap<String, Vec<String>>, serde_json::Error> {
    let map: BTreeMap<String, Option<Vec<String>>> = serde_json::from_slice(body)?;
    Ok(map
        .into_iter()
        .filter(|(n, _)| crate::model::valid_service_name(n))
        .map(|(n, t)| (n, t.unwrap_or_default()))
        .collect())
}
