//! Translation (pure): the mesh model and a proxy group become Envoy configuration.
//!
//! Split in two so that work is shared: [`mesh_resources`] builds, once per [`MeshState`],
//! the clusters and endpoint assignments of every service (identical for every proxy that
//! uses them); [`group_resources`] builds what is specific to one [`ProxyGroup`] — its
//! listeners, routes, local and external clusters — and names the mesh clusters it needs.
//! Encoding and versioning happen in [`crate::snapshot`].

pub mod access;
pub mod clusters;
pub mod listeners;
pub mod names;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{RouteConfiguration, VirtualHost};

use crate::model::{
    DependencySettings, DependencyTarget, ExternalDomain, MeshSettings, MeshState, MtlsMode,
    ProxyGroup,
};

/// Clusters and assignments of every service in the mesh, shared by all groups.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MeshResources {
    /// EDS clusters by name.
    pub clusters: BTreeMap<String, Cluster>,
    /// Their assignments by cluster name.
    pub assignments: BTreeMap<String, ClusterLoadAssignment>,
    /// For clusters with instances called over mutual TLS: the variant given to callers that
    /// hold a certificate (the plain one goes to the others), by name.
    pub tls_clusters: BTreeMap<String, Cluster>,
}

/// Builds the clusters and assignments of every service.
pub fn mesh_resources(state: &MeshState, settings: &MeshSettings) -> MeshResources {
    let mut out = MeshResources::default();
    for service in state.services.values() {
        let uses_tls = clusters::service_uses_tls(service);
        for (cluster, assignment) in clusters::service_clusters(service, settings) {
            out.assignments.insert(cluster.name.clone(), assignment);
            if uses_tls {
                out.tls_clusters.insert(
                    cluster.name.clone(),
                    clusters::with_upstream_tls(
                        cluster.clone(),
                        &settings.trust_domain,
                        &service.name,
                    ),
                );
            }
            out.clusters.insert(cluster.name.clone(), cluster);
        }
    }
    out
}

/// What one proxy group gets besides shared mesh clusters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GroupResources {
    /// Listeners (ingress, egress).
    pub listeners: Vec<Listener>,
    /// Route configurations named by the listeners.
    pub routes: Vec<RouteConfiguration>,
    /// Clusters built for this group only (local application, external domains).
    pub clusters: Vec<Cluster>,
    /// Names of the [`MeshResources`] clusters (and assignments) the group uses.
    pub mesh_clusters: BTreeSet<String>,
    /// Whether the group holds a certificate and gets the mutual-TLS variant of mesh clusters.
    pub originate_tls: bool,
    /// Things an operator should know: dependencies ignored and why.
    pub warnings: Vec<String>,
}

/// A dependency of a group after merging node metadata with the MeshService.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResolvedDependencies {
    /// Mesh services called, with their settings.
    pub services: BTreeMap<String, DependencySettings>,
    /// External domains called, with their settings.
    pub domains: BTreeMap<ExternalDomain, DependencySettings>,
    /// Dependencies ignored, with the reason.
    pub warnings: Vec<String>,
}

/// Merges the dependencies from node metadata with those of the service's MeshService
/// (whose settings win), and expands `"*"` where the operator allows it.
pub fn resolve_dependencies(
    state: &MeshState,
    settings: &MeshSettings,
    group: &ProxyGroup,
) -> ResolvedDependencies {
    let mut explicit: BTreeMap<DependencyTarget, DependencySettings> = group
        .dependencies
        .iter()
        .map(|t| (t.clone(), DependencySettings::default()))
        .collect();
    if let Some(service) = state.services.get(&group.service) {
        for d in &service.dependencies {
            explicit.insert(d.target.clone(), d.settings.clone());
        }
    }
    let mut out = ResolvedDependencies {
        services: BTreeMap::new(),
        domains: BTreeMap::new(),
        warnings: Vec::new(),
    };
    for (target, s) in &explicit {
        match target {
            DependencyTarget::Service(name) => {
                out.services.insert(name.clone(), s.clone());
            }
            DependencyTarget::Domain(d) => {
                out.domains.insert(d.clone(), s.clone());
            }
            DependencyTarget::All if settings.wildcard_allowed(&group.service) => {
                for name in state.services.keys() {
                    out.services
                        .entry(name.clone())
                        .or_insert_with(|| s.clone());
                }
            }
            DependencyTarget::All => out.warnings.push(format!(
                "dependency \"*\" of {} ignored: the service is not allowed to call every service (see --allow-wildcard)",
                group.service
            )),
        }
    }
    out
}

/// Builds the listeners, routes and group-specific clusters of a proxy group.
pub fn group_resources(
    state: &MeshState,
    settings: &MeshSettings,
    group: &ProxyGroup,
) -> GroupResources {
    let mut out = GroupResources {
        originate_tls: group.tls,
        ..Default::default()
    };
    if let (Some(ingress_port), Some(app_port)) = (group.ingress_port, group.app_port) {
        let ingress = access::ingress(state, settings, group, ingress_port);
        out.listeners.push(ingress.listener);
        out.routes.push(ingress.route);
        out.warnings.extend(ingress.warnings);
        out.clusters.push(clusters::local_app_cluster(app_port));
    }
    let Some(egress_port) = group.egress_port else {
        return out;
    };
    let deps = resolve_dependencies(state, settings, group);
    out.warnings.extend(deps.warnings);
    let mut vhosts: Vec<VirtualHost> = Vec::new();
    // Envoy compares vhost domains case-insensitively and rejects the whole route
    // configuration when one repeats, so names that differ only in case share one entry.
    let mut domains_taken = BTreeSet::new();
    for (name, s) in &deps.services {
        if !domains_taken.insert(name.to_ascii_lowercase()) {
            out.warnings.push(format!(
                "dependency {name} ignored: {} is already routed by another dependency",
                name.to_ascii_lowercase()
            ));
            continue;
        }
        match state.services.get(name) {
            Some(service) if service.mtls == MtlsMode::Strict && !group.tls => {
                out.warnings.push(format!(
                    "dependency {name} refused locally: it accepts only mutual TLS and this proxy has no certificate (meshbridge bootstrap --tls-*)"
                ));
                vhosts.push(listeners::local_reply_vhost(
                    name,
                    vec![name.clone()],
                    503,
                    "mtls-required",
                    format!(
                        "meshbridge: {name} accepts only mutual TLS and this proxy ({}) has no certificate (meshbridge bootstrap --tls-*)\n",
                        group.service
                    ),
                ));
            }
            Some(service) => {
                let has_canary = service.has_canary();
                out.mesh_clusters.insert(names::service_cluster(name));
                if has_canary {
                    out.mesh_clusters.insert(names::canary_cluster(name));
                }
                vhosts.push(VirtualHost {
                    name: name.clone(),
                    domains: vec![name.clone()],
                    routes: listeners::service_routes(name, has_canary, s),
                    ..Default::default()
                });
            }
            None => vhosts.push(listeners::local_reply_vhost(
                name,
                vec![name.clone()],
                503,
                "unknown-service",
                format!(
                    "meshbridge: {name} is a dependency of {} but no such service is known (no MeshService, no instances)\n",
                    group.service
                ),
            )),
        }
    }
    for (domain, s) in &deps.domains {
        if !domains_taken.insert(domain.host.clone()) {
            out.warnings.push(format!(
                "dependency {domain} ignored: {} is already routed by another dependency",
                domain.host
            ));
            continue;
        }
        let cluster = clusters::domain_cluster(domain, settings.external_ca_file());
        let vhost = VirtualHost {
            name: names::domain_vhost(domain),
            domains: vec![domain.host.clone()],
            routes: vec![listeners::cluster_route(
                "default",
                listeners::prefix_match(),
                &cluster.name,
                s,
            )],
            ..Default::default()
        };
        out.clusters.push(cluster);
        vhosts.push(vhost);
    }
    // What the proxy can call, as routed (a wildcard group's list is cut short).
    const LISTED: usize = 20;
    let mut declared: Vec<String> = vhosts
        .iter()
        .filter_map(|v| v.domains.first().cloned())
        .take(LISTED)
        .collect();
    if vhosts.len() > LISTED {
        declared.push(format!("and {} more", vhosts.len() - LISTED));
    }
    vhosts.push(listeners::local_reply_vhost(
        names::UNDECLARED_VHOST,
        vec!["*".to_string()],
        403,
        "undeclared-dependency",
        format!(
            "meshbridge: this service is not a declared dependency of {}; declared: [{}]\n",
            group.service,
            declared.join(", ")
        ),
    ));
    out.listeners.push(listeners::http_listener(
        names::EGRESS_LISTENER,
        "127.0.0.1",
        egress_port,
        names::EGRESS_ROUTE,
        true,
    ));
    out.routes
        .push(listeners::route_configuration(names::EGRESS_ROUTE, vhosts));
    out
}
