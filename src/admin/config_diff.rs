//! What a proxy's Envoy holds against what meshbridge sent it (pure): reading Envoy's
//! config dump per resource type, and comparing it with the snapshot of the proxy's group
//! for `/api/proxies/{node}/diff`.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::views::{ConfigDiffView, ResourceError, TypeDiff};
use crate::snapshot::{ResourceType, Snapshot};
use crate::xds::registry::ProxyStatus;

/// What Envoy holds of one resource type, from its config dump.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EnvoyHolds {
    /// Active dynamic resources.
    pub active: BTreeSet<String>,
    /// Resources Envoy is still warming.
    pub warming: BTreeSet<String>,
    /// Resources whose last update failed, with Envoy's details.
    pub errors: BTreeMap<String, String>,
}

/// The config dump section of one type (`ClustersConfigDump`, …; not `ScopedRoutesConfigDump`
/// for `RoutesConfigDump`).
fn dump_section<'a>(dump: &'a Value, type_suffix: &str) -> Option<&'a Value> {
    dump.get("configs")?.as_array()?.iter().find(|c| {
        c.get("@type")
            .and_then(Value::as_str)
            .and_then(|t| t.rsplit('.').next())
            .is_some_and(|t| t == type_suffix)
    })
}

fn strings<'a>(v: Option<&'a Value>, field: &str, name_at: &[&str]) -> Vec<(String, &'a Value)> {
    v.and_then(|v| v.get(field))
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|item| {
                    let mut at = item;
                    for key in name_at {
                        at = at.get(*key)?;
                    }
                    at.as_str().map(|n| (n.to_string(), item))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn error_details(item: &Value) -> Option<String> {
    let e = item.get("error_state")?;
    Some(
        e.get("details")
            .and_then(Value::as_str)
            .unwrap_or("update failed")
            .to_string(),
    )
}

/// What Envoy's config dump (fetched with `include_eds`) says it holds of type `t`.
pub fn envoy_holds(dump: &Value, t: ResourceType) -> EnvoyHolds {
    let mut holds = EnvoyHolds::default();
    match t {
        ResourceType::Cluster => {
            let section = dump_section(dump, "ClustersConfigDump");
            for (name, item) in strings(section, "dynamic_active_clusters", &["cluster", "name"]) {
                if let Some(e) = error_details(item) {
                    holds.errors.insert(name.clone(), e);
                }
                holds.active.insert(name);
            }
            for (name, _) in strings(section, "dynamic_warming_clusters", &["cluster", "name"]) {
                holds.warming.insert(name);
            }
        }
        ResourceType::Listener => {
            let section = dump_section(dump, "ListenersConfigDump");
            for (name, item) in strings(section, "dynamic_listeners", &["name"]) {
                if item.get("active_state").is_some() {
                    holds.active.insert(name.clone());
                }
                if item.get("warming_state").is_some() {
                    holds.warming.insert(name.clone());
                }
                if let Some(e) = error_details(item) {
                    holds.errors.insert(name, e);
                }
            }
        }
        ResourceType::Route => {
            let section = dump_section(dump, "RoutesConfigDump");
            for (name, _) in strings(section, "dynamic_route_configs", &["route_config", "name"]) {
                holds.active.insert(name);
            }
        }
        ResourceType::Secret => {
            let section = dump_section(dump, "SecretsConfigDump");
            for (name, _) in strings(section, "dynamic_active_secrets", &["name"]) {
                holds.active.insert(name);
            }
            for (name, _) in strings(section, "dynamic_warming_secrets", &["name"]) {
                holds.warming.insert(name);
            }
        }
        ResourceType::Endpoint => {
            let section = dump_section(dump, "EndpointsConfigDump");
            for (name, _) in strings(
                section,
                "dynamic_endpoint_configs",
                &["endpoint_config", "cluster_name"],
            ) {
                holds.active.insert(name);
            }
        }
    }
    holds
}

/// Compares the snapshot a proxy's group gets with the proxy's config dump (pure).
pub fn config_diff(proxy: &ProxyStatus, snap: &Snapshot, dump: &Value) -> ConfigDiffView {
    let types: Vec<TypeDiff> = ResourceType::ALL
        .into_iter()
        .map(|t| type_diff(proxy, snap, dump, t))
        .collect();
    let in_sync = types.iter().all(|t| {
        t.only_sent.is_empty()
            && t.only_envoy.is_empty()
            && t.warming.is_empty()
            && t.errors.is_empty()
            && t.sent_version == t.acked_version
            && t.nack.is_none()
    });
    ConfigDiffView {
        in_sync,
        mode: proxy.mode.to_string(),
        node: proxy.node.clone(),
        types,
    }
}

/// What meshbridge sent of type `t` against what the config dump says Envoy holds.
fn type_diff(proxy: &ProxyStatus, snap: &Snapshot, dump: &Value, t: ResourceType) -> TypeDiff {
    let sent: BTreeSet<String> = snap.resources(t).keys().cloned().collect();
    let holds = envoy_holds(dump, t);
    let status = proxy.types.get(t.type_url());
    TypeDiff {
        acked_version: status.and_then(|s| s.acked.clone()),
        envoy: holds.active.len(),
        errors: holds
            .errors
            .iter()
            .map(|(name, details)| ResourceError {
                details: details.clone(),
                name: name.clone(),
            })
            .collect(),
        nack: status.and_then(|s| s.nack.clone()),
        only_envoy: holds.active.difference(&sent).cloned().collect(),
        only_sent: sent
            .iter()
            .filter(|n| !holds.active.contains(*n) && !holds.warming.contains(*n))
            .cloned()
            .collect(),
        sent: sent.len(),
        sent_version: status.and_then(|s| s.sent.clone()),
        short_name: t.short_name().to_string(),
        type_url: t.type_url().to_string(),
        warming: holds.warming.into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_config_dump_is_read_per_type_with_warming_and_failed_resources() {
        let dump = json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
             "static_clusters": [{"cluster": {"name": "xds"}}],
             "dynamic_active_clusters": [{"version_info": "1", "cluster": {"name": "orders"}}],
             "dynamic_warming_clusters": [{"version_info": "2", "cluster": {"name": "billing"}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
             "dynamic_listeners": [
                {"name": "ingress", "active_state": {"listener": {"name": "ingress"}},
                 "error_state": {"details": "bad filter"}},
                {"name": "egress", "warming_state": {"listener": {"name": "egress"}}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump"},
            {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
             "dynamic_route_configs": [{"route_config": {"name": "egress"}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
             "dynamic_endpoint_configs": [{"endpoint_config": {"cluster_name": "orders"}}]}
        ]});
        let c = envoy_holds(&dump, ResourceType::Cluster);
        assert_eq!(c.active, BTreeSet::from(["orders".to_string()]));
        assert_eq!(c.warming, BTreeSet::from(["billing".to_string()]));
        let l = envoy_holds(&dump, ResourceType::Listener);
        assert_eq!(l.active, BTreeSet::from(["ingress".to_string()]));
        assert_eq!(l.warming, BTreeSet::from(["egress".to_string()]));
        assert_eq!(
            l.errors.get("ingress").map(String::as_str),
            Some("bad filter")
        );
        assert_eq!(
            envoy_holds(&dump, ResourceType::Route).active,
            BTreeSet::from(["egress".to_string()])
        );
        assert_eq!(
            envoy_holds(&dump, ResourceType::Endpoint).active,
            BTreeSet::from(["orders".to_string()])
        );
        assert_eq!(
            envoy_holds(&json!({}), ResourceType::Cluster),
            EnvoyHolds::default()
        );
    }
}
