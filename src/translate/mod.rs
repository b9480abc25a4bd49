//! Translation (pure): the mesh model and a proxy group become Envoy configuration.
//!
//! Split so that work is shared: [`mesh_resources`] builds, once per [`MeshState`], the
//! clusters and endpoint assignments of every service (identical for every proxy that uses
//! them); [`ingress_resources`] and [`egress_resources`] build a group's two parts from an
//! [`IngressSpec`] and an [`EgressSpec`] — groups with equal specs get equal parts, so the
//! snapshot cache builds each once — and name the mesh clusters they need;
//! [`group_resources`] is both parts of one [`ProxyGroup`]. [`Reads`] says what a part reads
//! from the state, so a change rebuilds only the parts that read it. Encoding and versioning
//! happen in [`crate::snapshot`].

pub mod access;
pub mod clusters;
pub mod listeners;
pub mod names;
pub mod proto;
pub mod rate_limit;
pub mod tls;

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::{Route, RouteConfiguration, VirtualHost};

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
        out.add_service(service, settings);
    }
    out
}

impl MeshResources {
    /// Adds the clusters and assignments of one service.
    pub fn add_service(&mut self, service: &crate::model::Service, settings: &MeshSettings) {
        let uses_tls = clusters::service_uses_tls(service);
        for (cluster, assignment) in clusters::service_clusters(service, settings) {
            self.assignments.insert(cluster.name.clone(), assignment);
            if uses_tls {
                self.tls_clusters.insert(
                    cluster.name.clone(),
                    clusters::with_upstream_tls(
                        cluster.clone(),
                        &settings.trust_domain,
                        &service.name,
                    ),
                );
            }
            self.clusters.insert(cluster.name.clone(), cluster);
        }
    }
}

/// Names of every mesh cluster a service can have (whether or not it has them now).
pub fn service_cluster_names(service: &str) -> [String; 3] {
    [
        names::service_cluster(service),
        names::canary_cluster(service),
        names::mirror_cluster(service),
    ]
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
    /// The proxy's certificate secrets (file paths; the group's own).
    pub secrets: Vec<envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret>,
    /// Names of the [`MeshResources`] clusters (and assignments) the group uses.
    pub mesh_clusters: BTreeSet<String>,
    /// Names of [`MeshResources`] assignments the group's own clusters read (policy variants
    /// of mesh clusters), without the shared cluster itself.
    pub mesh_assignments: BTreeSet<String>,
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

/// Everything a group's ingress is made from besides the mesh state: groups with the same
/// spec share one ingress (built and encoded once per mesh state). A proxy has one for its
/// service's first port and one for each further port it serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct IngressSpec {
    /// The service the proxy runs beside, or one of its further ports (`NAME:PORT`).
    pub service: String,
    /// Port of the ingress listener.
    pub port: u16,
    /// Address it binds to (default `0.0.0.0`).
    pub host: Option<String>,
    /// Port of the local application.
    pub app_port: u16,
    /// Whether the proxy holds a certificate.
    pub tls: bool,
}

/// Everything a group's egress is made from besides the mesh state. It does not name the
/// group's service: every group calling the same dependencies with the same settings (all
/// wildcard groups, typically) shares one egress listener and one route configuration.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct EgressSpec {
    /// Port of the egress listener on 127.0.0.1.
    pub port: u16,
    /// Whether the proxy holds a certificate (and so gets mutual-TLS cluster variants).
    pub tls: bool,
    /// Dependencies from node metadata merged with those of the service's MeshService
    /// (whose settings win).
    pub dependencies: BTreeMap<DependencyTarget, DependencySettings>,
    /// Whether the service may depend on every service (`--allow-wildcard`).
    pub wildcard_allowed: bool,
    /// Whether the listener keeps HTTP/1 header names' case (`spec.http1`).
    pub preserve_header_case: bool,
}

impl ProxyGroup {
    /// The specs of this group's ingresses: its service's, when it has one (an ingress port
    /// and an app port), then one per further port of its service it serves (node metadata
    /// `ports`), by port name.
    pub fn ingress_specs(&self) -> Vec<IngressSpec> {
        let spec = |service: String, port, app_port| IngressSpec {
            service,
            port,
            host: self.ingress_host.clone(),
            app_port,
            tls: self.tls,
        };
        let first = self
            .ingress_port
            .zip(self.app_port)
            .map(|(port, app)| spec(self.service.clone(), port, app));
        first
            .into_iter()
            .chain(self.ports.iter().map(|(name, b)| {
                spec(
                    crate::model::port_service(&self.service, name),
                    b.ingress_port,
                    b.app_port,
                )
            }))
            .collect()
    }

    /// The spec of this group's egress in `state`, when it has one: node-metadata
    /// dependencies merged with those of the service's MeshService.
    pub fn egress_spec(&self, state: &MeshState, settings: &MeshSettings) -> Option<EgressSpec> {
        Some(self.egress_spec_on(self.egress_port?, state, settings))
    }

    fn egress_spec_on(&self, port: u16, state: &MeshState, settings: &MeshSettings) -> EgressSpec {
        let mut dependencies: BTreeMap<DependencyTarget, DependencySettings> = self
            .dependencies
            .iter()
            .map(|t| (t.clone(), DependencySettings::default()))
            .collect();
        if let Some(service) = state.services.get(&self.service) {
            for d in &service.dependencies {
                dependencies.insert(d.target.clone(), d.settings.clone());
            }
        }
        let wildcard_allowed = dependencies.contains_key(&DependencyTarget::All)
            && settings.wildcard_allowed(&self.service);
        // Its own service's setting, or a dependency asking for it: the listener reads the
        // application's requests (and writes answers) keeping the case.
        let preserve_header_case = state
            .services
            .get(&self.service)
            .is_some_and(|s| s.preserve_header_case)
            || dependencies
                .values()
                .any(|d| d.cluster.preserve_header_case == Some(true));
        EgressSpec {
            port,
            tls: self.tls,
            dependencies,
            wildcard_allowed,
            preserve_header_case,
        }
    }
}

/// Merges the dependencies from node metadata with those of the service's MeshService
/// (whose settings win), and expands `"*"` where the operator allows it.
pub fn resolve_dependencies(
    state: &MeshState,
    settings: &MeshSettings,
    group: &ProxyGroup,
) -> ResolvedDependencies {
    // Resolved as an egress would, also for a group without an egress listener.
    let spec = group.egress_spec_on(group.egress_port.unwrap_or_default(), state, settings);
    resolve_spec(state, &spec)
}

fn resolve_spec(state: &MeshState, spec: &EgressSpec) -> ResolvedDependencies {
    let mut out = ResolvedDependencies {
        services: BTreeMap::new(),
        domains: BTreeMap::new(),
        warnings: Vec::new(),
    };
    for (target, s) in &spec.dependencies {
        match target {
            DependencyTarget::Service(name) => {
                out.services.insert(name.clone(), s.clone());
            }
            DependencyTarget::Domain(d) => {
                out.domains.insert(d.clone(), s.clone());
            }
            DependencyTarget::All if spec.wildcard_allowed => {
                // Named dependencies (iterated first) keep their own settings. A `tcp` service
                // takes a port of the caller's: only a named dependency opens one.
                for name in state.services_reached(target, true) {
                    if state.services.get(name).is_some_and(|s| s.protocol.is_tcp()) {
                        continue;
                    }
                    out.services
                        .entry(name.to_string())
                        .or_insert_with(|| s.clone());
                }
            }
            DependencyTarget::All => out.warnings.push(
                "dependency \"*\" ignored: this service is not allowed to call every service (see --allow-wildcard)"
                    .to_string(),
            ),
        }
    }
    out
}

/// What a part of a group's configuration reads from the mesh state: a change to anything
/// else leaves it as it is. Pure data, so the snapshot cache can keep a reverse index from
/// each service and access target to the groups that read it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reads {
    /// Services read by name (whether or not they exist).
    pub services: BTreeSet<String>,
    /// Reads every service (an allowed `"*"` dependency).
    pub every_service: bool,
    /// Access targets whose merged policy is read.
    pub access: BTreeSet<String>,
    /// Services read by glob (source-IP identity: the addresses of the callers a rule names).
    pub service_globs: BTreeSet<String>,
}

impl Reads {
    /// Adds what `other` reads.
    pub fn extend(&mut self, other: &Reads) {
        self.services.extend(other.services.iter().cloned());
        self.every_service |= other.every_service;
        self.access.extend(other.access.iter().cloned());
        self.service_globs
            .extend(other.service_globs.iter().cloned());
    }

    /// Whether a change to the services `services` and access targets `access` can change
    /// what was built from these reads.
    pub fn affected_by<'a>(
        &self,
        mut services: impl Iterator<Item = &'a String> + Clone,
        mut access: impl Iterator<Item = &'a String>,
    ) -> bool {
        if self.every_service && services.clone().next().is_some() {
            return true;
        }
        access.any(|t| self.access.contains(t))
            || services.any(|s| {
                self.services.contains(s)
                    || self
                        .service_globs
                        .iter()
                        .any(|g| crate::model::glob_match(g, s))
            })
    }
}

/// What the ingress of `spec` reads: its service (mTLS mode, protocol, rate limits), the
/// access policy targeting it, and with source-IP identity the services its rules name as callers.
pub fn ingress_reads(state: &MeshState, settings: &MeshSettings, spec: &IngressSpec) -> Reads {
    let target = crate::model::access_target(&spec.service);
    let mut reads = Reads {
        services: [spec.service.clone(), target.to_string()].into(),
        access: [target.to_string()].into(),
        ..Default::default()
    };
    if settings.source_ip_identity
        && let Some(policy) = state.access.get(target)
    {
        for caller in policy.rules.iter().flat_map(|r| &r.from) {
            if let crate::model::CallerMatch::Service(glob) = caller {
                if glob.contains('*') {
                    reads.service_globs.insert(glob.clone());
                } else {
                    reads.services.insert(glob.clone());
                }
            }
        }
    }
    reads
}

/// What the egress of `spec` reads: every service it calls, and the service of every
/// further port it calls (or every service at all).
pub fn egress_reads(spec: &EgressSpec) -> Reads {
    let mut reads = Reads {
        every_service: spec.wildcard_allowed,
        ..Default::default()
    };
    for target in spec.dependencies.keys() {
        if let DependencyTarget::Service(name) = target {
            // A further port is routed in its service's virtual host (names, ports).
            reads
                .services
                .insert(crate::model::access_target(name).to_string());
            reads.services.insert(name.clone());
        }
    }
    reads
}

/// What a group reads: its ingress and egress reads, and its own service, whose
/// MeshService dependencies shape the egress spec.
pub fn group_reads(state: &MeshState, settings: &MeshSettings, group: &ProxyGroup) -> Reads {
    let ingress = group
        .ingress_specs()
        .into_iter()
        .map(|spec| ingress_reads(state, settings, &spec));
    let egress = group
        .egress_spec(state, settings)
        .map(|spec| egress_reads(&spec));
    let parts: Vec<Reads> = ingress.chain(egress).collect();
    Reads::of_group(&group.service, &parts)
}

impl Reads {
    /// What a group of `service` reads, given what its parts read.
    pub fn of_group<'a>(service: &str, parts: impl IntoIterator<Item = &'a Reads>) -> Reads {
        let mut reads = Reads {
            services: [service.to_string()].into(),
            ..Default::default()
        };
        for part in parts {
            reads.extend(part);
        }
        reads
    }
}

/// Builds the listeners, routes and group-specific clusters of a proxy group: its ingress
/// and its egress, in that order.
pub fn group_resources(
    state: &MeshState,
    settings: &MeshSettings,
    group: &ProxyGroup,
) -> GroupResources {
    let mut out = GroupResources {
        originate_tls: group.tls,
        ..Default::default()
    };
    for spec in group.ingress_specs() {
        out.merge(ingress_resources(state, settings, &spec));
    }
    if let Some(spec) = group.egress_spec(state, settings) {
        out.merge(egress_resources(state, settings, &spec));
    }
    out.merge(secret_resources(group));
    out
}

/// The group's own certificate secrets, when it holds a certificate.
pub fn secret_resources(group: &ProxyGroup) -> GroupResources {
    GroupResources {
        secrets: group
            .certificate_files
            .as_ref()
            .map(tls::secrets)
            .unwrap_or_default(),
        ..Default::default()
    }
}

impl GroupResources {
    fn merge(&mut self, other: GroupResources) {
        self.listeners.extend(other.listeners);
        self.routes.extend(other.routes);
        self.clusters.extend(other.clusters);
        self.secrets.extend(other.secrets);
        self.mesh_clusters.extend(other.mesh_clusters);
        self.mesh_assignments.extend(other.mesh_assignments);
        self.originate_tls |= other.originate_tls;
        self.warnings.extend(other.warnings);
    }

    /// Routes to the mesh cluster `shared` of `service` with the dependency settings `s`:
    /// the shared cluster itself under the default policy, else the group's own variant of
    /// it (its mutual-TLS form when the shared one has one and the proxy holds a
    /// certificate) reading the shared assignment. Returns the cluster to route to.
    fn use_mesh_cluster(
        &mut self,
        shared: String,
        service: &crate::model::Service,
        s: &DependencySettings,
        spec: &EgressSpec,
        settings: &MeshSettings,
    ) -> String {
        if s.cluster.is_default() {
            self.mesh_clusters.insert(shared.clone());
            return shared;
        }
        let name = names::policy_cluster(&shared, &s.cluster);
        // The variant speaks to the instances as the shared cluster does, unless the
        // dependency sets the header case.
        let mut cluster = clusters::speaking(
            clusters::policy_cluster(&name, &shared, &s.cluster),
            service.protocol,
            s.cluster
                .preserve_header_case
                .unwrap_or(service.preserve_header_case),
        );
        // The variant reads the shared assignment, locality weights included (the mirror
        // cluster's has none).
        if !names::cluster_service(&shared).1 {
            cluster = clusters::weighted_by_origin(cluster, service);
        }
        if spec.tls && clusters::service_uses_tls(service) {
            cluster = clusters::with_upstream_tls(cluster, &settings.trust_domain, &service.name);
        }
        self.clusters.push(cluster);
        self.mesh_assignments.insert(shared);
        name
    }
}

/// The ingress listener, its route configuration and the local application cluster.
pub fn ingress_resources(
    state: &MeshState,
    settings: &MeshSettings,
    spec: &IngressSpec,
) -> GroupResources {
    let ingress = access::ingress(state, settings, spec);
    GroupResources {
        listeners: vec![ingress.listener],
        routes: vec![ingress.route],
        // The application speaks what its service declares.
        clusters: vec![{
            let service = state.services.get(&spec.service);
            clusters::speaking(
                clusters::local_app_cluster(&spec.service, spec.app_port),
                service.map(|s| s.protocol).unwrap_or_default(),
                service.is_some_and(|s| s.preserve_header_case),
            )
        }],
        warnings: ingress.warnings,
        originate_tls: spec.tls,
        ..Default::default()
    }
}

/// The domains of the virtual host of dependency `name`: its name (already taken by the
/// caller), then the Consul and Kubernetes DNS names of it that are neither another
/// dependency's own name (`own_names`) nor taken by another virtual host of the listener
/// (Envoy refuses a route configuration where a domain repeats). With a warning when a name
/// had to be left out.
fn service_domains(
    state: &MeshState,
    settings: &MeshSettings,
    name: &str,
    own_names: &BTreeSet<String>,
    taken: &mut BTreeSet<String>,
) -> Result<Vec<String>, (Vec<String>, String)> {
    let names = match state.services.get(name) {
        Some(service) => settings.service_names(service),
        None => settings.service_names(&crate::model::Service {
            name: name.to_string(),
            ..Default::default()
        }),
    };
    let mut domains = vec![name.to_string()];
    let mut left_out = Vec::new();
    for alias in names.into_iter().skip(1) {
        if !own_names.contains(&alias) && taken.insert(alias.clone()) {
            domains.push(alias);
        } else {
            left_out.push(alias);
        }
    }
    if left_out.is_empty() {
        Ok(domains)
    } else {
        let warning = format!(
            "{} not routed to {name}: another dependency is routed by that name",
            left_out.join(", ")
        );
        Err((domains, warning))
    }
}

/// The egress listener, its route configuration, the external-domain clusters, and the
/// names of the mesh clusters it routes to.
#[allow(clippy::too_many_lines)] // the egress listener and its routes, built together so that route and cluster names agree.
pub fn egress_resources(
    state: &MeshState,
    settings: &MeshSettings,
    spec: &EgressSpec,
) -> GroupResources {
    let mut out = GroupResources {
        originate_tls: spec.tls,
        ..Default::default()
    };
    let deps = resolve_spec(state, spec);
    out.warnings.extend(deps.warnings);
    let mut vhosts: Vec<VirtualHost> = Vec::new();
    // Envoy compares vhost domains case-insensitively and rejects the whole route
    // configuration when one repeats, so names that differ only in case share one entry.
    let mut domains_taken = BTreeSet::new();
    // `tcp` services: their name, the port the proxy listens on for them, the cluster.
    let mut tcp: Vec<(&String, Option<u16>, String)> = Vec::new();
    // A DNS name of one service never hides another's own name or an external domain.
    let own_names: BTreeSet<String> = deps
        .services
        .keys()
        .map(|n| n.to_ascii_lowercase())
        .chain(deps.domains.keys().map(|d| d.host.clone()))
        .collect();
    // Routes of further ports (`NAME:PORT`), by service: they go first in its virtual host,
    // taking the requests whose `Host` names the port.
    let mut port_routes: BTreeMap<&str, Vec<Route>> = BTreeMap::new();
    for (name, s) in &deps.services {
        let (parent, port_name) = crate::model::split_port_service(name);
        if port_name.is_none() && !domains_taken.insert(name.to_ascii_lowercase()) {
            out.warnings.push(format!(
                "dependency {name} ignored: {} is already routed by another dependency",
                name.to_ascii_lowercase()
            ));
            continue;
        }
        let routes = match state.services.get(name) {
            Some(service) if service.mtls == MtlsMode::Strict && !spec.tls => {
                out.warnings.push(format!(
                    "dependency {name} refused locally: it accepts only mutual TLS and this proxy has no certificate (meshbridge bootstrap --tls-*)"
                ));
                vec![listeners::local_reply_route(
                    "mtls-required",
                    listeners::prefix_match(),
                    503,
                    "mtls-required",
                    format!(
                        "meshbridge: {name} accepts only mutual TLS and this proxy has no certificate (meshbridge bootstrap --tls-*)\n"
                    ),
                )]
            }
            Some(service) if service.protocol.is_tcp() => {
                let cluster =
                    out.use_mesh_cluster(names::service_cluster(name), service, s, spec, settings);
                tcp.push((name, s.local_port.or(service.port), cluster));
                if s.timeout.is_some() || s.retries.is_some() {
                    out.warnings.push(format!(
                        "dependency {name}: timeout and retries do not apply to a tcp service (connections are forwarded as they are)"
                    ));
                }
                vec![listeners::local_reply_route(
                    "tcp-service",
                    listeners::prefix_match(),
                    400,
                    "tcp-service",
                    match s.local_port.or(service.port) {
                        Some(port) => format!(
                            "meshbridge: {name} is a tcp service: connect to 127.0.0.1:{port}\n"
                        ),
                        None => format!("meshbridge: {name} is a tcp service\n"),
                    },
                )]
            }
            Some(service) => {
                let mut cluster =
                    |shared: String| out.use_mesh_cluster(shared, service, s, spec, settings);
                let default = cluster(names::service_cluster(name));
                let canary = service
                    .has_canary()
                    .then(|| cluster(names::canary_cluster(name)));
                // A share copied to the new origin of a migration, answers discarded.
                let mirror = service
                    .migration
                    .as_ref()
                    .filter(|_| clusters::has_mirror(service))
                    .map(|m| (cluster(names::mirror_cluster(name)), m.mirror));
                listeners::service_routes(
                    &default,
                    canary.as_deref(),
                    mirror.as_ref().map(|(c, p)| (c.as_str(), *p)),
                    s,
                    service.protocol,
                )
            }
            None => vec![listeners::local_reply_route(
                "unknown-service",
                listeners::prefix_match(),
                503,
                "unknown-service",
                format!(
                    "meshbridge: {name} is a declared dependency but no such service is known (no MeshService, no instances)\n"
                ),
            )],
        };
        if let Some(port_name) = port_name {
            // `Host: orders:admin`, or the port's number (`orders:9090`, as a Kubernetes
            // client names a Service port), under any of the service's names.
            let mut ports = vec![port_name.to_string()];
            if let Some(number) = state.services.get(name).and_then(|s| s.port) {
                ports.push(number.to_string());
            }
            port_routes.entry(parent).or_default().extend(
                routes
                    .into_iter()
                    .map(|r| listeners::on_port(r, port_name, &ports)),
            );
            continue;
        }
        let domains = service_domains(state, settings, name, &own_names, &mut domains_taken)
            .unwrap_or_else(|(domains, warning)| {
                out.warnings.push(warning);
                domains
            });
        // A further port that is no dependency is refused, not taken for the first port.
        let mut vhost_routes: Vec<Route> = state
            .services
            .get(name)
            .into_iter()
            .flat_map(|service| &service.named_ports)
            .filter(|p| {
                !deps
                    .services
                    .contains_key(&crate::model::port_service(name, &p.name))
            })
            .map(|p| {
                listeners::on_port(
                    listeners::local_reply_route(
                        "undeclared-port",
                        listeners::prefix_match(),
                        403,
                        "undeclared-dependency",
                        format!(
                            "meshbridge: {name}:{} is not a declared dependency of the calling service\n",
                            p.name
                        ),
                    ),
                    &p.name,
                    &[p.name.clone(), p.port.to_string()],
                )
            })
            .collect();
        vhost_routes.extend(routes);
        vhosts.push(VirtualHost {
            name: name.clone(),
            domains,
            routes: vhost_routes,
            ..Default::default()
        });
    }
    let by_name: BTreeMap<String, usize> = if port_routes.is_empty() {
        BTreeMap::new()
    } else {
        vhosts
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.clone(), i))
            .collect()
    };
    for (parent, mut routes) in port_routes {
        if let Some(&i) = by_name.get(parent) {
            let vhost = &mut vhosts[i];
            routes.append(&mut vhost.routes);
            vhost.routes = routes;
            continue;
        }
        if !domains_taken.insert(parent.to_ascii_lowercase()) {
            out.warnings.push(format!(
                "dependencies on ports of {parent} ignored: {} is already routed by another dependency",
                parent.to_ascii_lowercase()
            ));
            continue;
        }
        let domains = service_domains(state, settings, parent, &own_names, &mut domains_taken)
            .unwrap_or_else(|(domains, warning)| {
                out.warnings.push(warning);
                domains
            });
        // Only some ports of it are dependencies: the rest is refused as undeclared.
        routes.push(listeners::local_reply_route(
            "undeclared-port",
            listeners::prefix_match(),
            403,
            "undeclared-dependency",
            format!(
                "meshbridge: only some ports of {parent} are declared dependencies of the calling service: name the port in Host ({parent}:PORT)\n"
            ),
        ));
        vhosts.push(VirtualHost {
            name: parent.to_string(),
            domains,
            routes,
            ..Default::default()
        });
    }
    // Authorities (`host:port`) a `CONNECT` may name.
    let mut tunnels: Vec<String> = Vec::new();
    for (domain, s) in &deps.domains {
        if !domains_taken.insert(domain.host.clone()) {
            out.warnings.push(format!(
                "dependency {domain} ignored: {} is already routed by another dependency",
                domain.host
            ));
            continue;
        }
        let cluster = clusters::domain_cluster(domain, settings.external_ca_file());
        let mut routes = Vec::new();
        if domain.tls {
            // `CONNECT host:port` (HTTPS_PROXY): a tunnel to the declared port, TLS end to
            // end between the client and the domain.
            let tunnel = clusters::domain_tunnel_cluster(domain);
            let authority = names::domain_authority(domain);
            routes.push(listeners::tunnel_route(&authority, &tunnel.name));
            tunnels.push(authority);
            out.clusters.push(tunnel);
        }
        routes.push(listeners::cluster_route(
            "default",
            listeners::prefix_match(),
            &cluster.name,
            s,
            crate::model::AppProtocol::Http,
        ));
        out.clusters.push(cluster);
        vhosts.push(VirtualHost {
            name: names::domain_vhost(domain),
            domains: vec![domain.host.clone()],
            routes,
            ..Default::default()
        });
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
    let mut undeclared = listeners::local_reply_vhost(
        names::UNDECLARED_VHOST,
        vec!["*".to_string()],
        403,
        "undeclared-dependency",
        format!(
            "meshbridge: this host is not a declared dependency of the calling service; declared: [{}]\n",
            declared.join(", ")
        ),
    );
    // A `CONNECT` matches no path matcher: refused by a route of its own.
    undeclared.routes.push(listeners::local_reply_route(
        "undeclared-dependency-connect",
        listeners::connect_match(None),
        403,
        "undeclared-dependency",
        format!(
            "meshbridge: this host is not a declared dependency of the calling service; CONNECT tunnels only to declared https:// domains: [{}]\n",
            tunnels.join(", ")
        ),
    ));
    vhosts.push(undeclared);
    out.listeners
        .push(listeners::outbound(listeners::http_listener(
            names::EGRESS_LISTENER,
            "127.0.0.1",
            spec.port,
            names::EGRESS_ROUTE,
            spec.preserve_header_case,
        )));
    let mut ports_taken = BTreeMap::from([(spec.port, "the egress listener".to_string())]);
    for (name, port, cluster) in tcp {
        let Some(port) = port else {
            out.warnings.push(format!(
                "dependency {name} not reachable: it is a tcp service and neither its MeshService (spec.ports) nor the dependency (port) names a port"
            ));
            continue;
        };
        if let Some(holder) = ports_taken.get(&port) {
            out.warnings.push(format!(
                "dependency {name} not reachable: port {port} is already used by {holder}; set the dependency's port"
            ));
            continue;
        }
        ports_taken.insert(port, name.to_string());
        out.listeners
            .push(listeners::outbound(listeners::tcp_listener(
                &names::tcp_egress_listener(name),
                "127.0.0.1",
                port,
                &cluster,
            )));
    }
    out.routes
        .push(listeners::egress_route_configuration(vhosts));
    out
}
