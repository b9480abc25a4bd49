//! Snapshots: the encoded, versioned resources one proxy group gets.
//!
//! Every resource is encoded once into a shared [`Resource`] whose version is a hash of its
//! bytes, so a version changes only when the resource does. The clusters and assignments of
//! mesh services are encoded once per mesh state ([`EncodedMesh`]) and shared by every group
//! snapshot that uses them. [`build`] checks consistency before anything is published.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use envoy_types::pb::envoy::config::cluster::v3::cluster::{ClusterDiscoveryType, DiscoveryType};
use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
use envoy_types::pb::envoy::config::route::v3::{route::Action, route_action::ClusterSpecifier};
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpConnectionManager, http_connection_manager::RouteSpecifier,
};
use envoy_types::pb::google::protobuf::Any;
use prost::{Message, Name};
use xxhash_rust::xxh3::Xxh3;

use crate::model::{MeshSettings, MeshState, StateDiff};
use crate::translate::{self, GroupResources, MeshResources};

/// The four resource types meshbridge serves, in the order they are pushed (CDS, EDS, LDS,
/// RDS), so that a listener never names a route or cluster Envoy does not have yet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ResourceType {
    /// `envoy.config.cluster.v3.Cluster`
    Cluster,
    /// `envoy.config.endpoint.v3.ClusterLoadAssignment`
    Endpoint,
    /// `envoy.config.listener.v3.Listener`
    Listener,
    /// `envoy.config.route.v3.RouteConfiguration`
    Route,
    /// `envoy.extensions.transport_sockets.tls.v3.Secret`: a proxy's own certificate files,
    /// by path (never their contents).
    Secret,
}

/// How many resource types meshbridge serves.
pub const TYPES: usize = 5;

impl ResourceType {
    /// Every type, in push order.
    pub const ALL: [ResourceType; TYPES] = [
        ResourceType::Cluster,
        ResourceType::Endpoint,
        ResourceType::Listener,
        ResourceType::Route,
        ResourceType::Secret,
    ];

    /// The xDS type URL.
    pub fn type_url(self) -> &'static str {
        match self {
            ResourceType::Cluster => "type.googleapis.com/envoy.config.cluster.v3.Cluster",
            ResourceType::Endpoint => {
                "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
            }
            ResourceType::Listener => "type.googleapis.com/envoy.config.listener.v3.Listener",
            ResourceType::Route => "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
            ResourceType::Secret => {
                "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
            }
        }
    }

    /// The short name, as in metrics and the admin API: `cds`, `eds`, `lds`, `rds`.
    pub fn short_name(self) -> &'static str {
        match self {
            ResourceType::Cluster => "cds",
            ResourceType::Endpoint => "eds",
            ResourceType::Listener => "lds",
            ResourceType::Route => "rds",
            ResourceType::Secret => "sds",
        }
    }

    /// The type of a type URL, if meshbridge serves it.
    pub fn from_type_url(url: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.type_url() == url)
    }

    /// Whether an empty subscription means "everything" (CDS and LDS).
    pub fn wildcard_by_default(self) -> bool {
        matches!(self, ResourceType::Cluster | ResourceType::Listener)
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ResourceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResourceType::Cluster => "CDS",
            ResourceType::Endpoint => "EDS",
            ResourceType::Listener => "LDS",
            ResourceType::Route => "RDS",
            ResourceType::Secret => "SDS",
        })
    }
}

/// One encoded resource, shared by every snapshot that contains it.
#[derive(Clone, Debug, PartialEq)]
pub struct Resource {
    /// Resource name.
    pub name: String,
    /// Hash of the encoded bytes (16 hex digits).
    pub version: String,
    /// The encoded message.
    pub body: Any,
    /// Hash of the name and the encoded bytes, from which set versions are computed.
    pub digest: u64,
}

/// Encodes a message into a shared resource whose version derives from its bytes.
pub fn encode<M: Message + Name>(name: &str, message: &M) -> Arc<Resource> {
    let value = message.encode_to_vec();
    let content = xxhash_rust::xxh3::xxh3_64(&value);
    Arc::new(Resource {
        name: name.to_string(),
        version: format!("{content:016x}"),
        body: Any {
            type_url: M::type_url(),
            value,
        },
        digest: xxhash_rust::xxh3::xxh3_64_with_seed(name.as_bytes(), content),
    })
}

/// The version of a set of resources (in name order): changes when any member or the
/// membership changes. One hash over the members' digests, so a set of a thousand resources
/// costs microseconds.
pub fn resources_version<'a>(resources: impl IntoIterator<Item = &'a Resource>) -> String {
    let mut hasher = Xxh3::new();
    let mut chunk = [0u8; 512];
    let mut len = 0;
    for r in resources {
        chunk[len..len + 8].copy_from_slice(&r.digest.to_le_bytes());
        len += 8;
        if len == chunk.len() {
            hasher.update(&chunk);
            len = 0;
        }
    }
    hasher.update(&chunk[..len]);
    format!("{:016x}", hasher.digest())
}

/// The version of a set of resources: changes when any member or the membership changes.
pub fn set_version<'a>(resources: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut hasher = Xxh3::new();
    for (name, version) in resources {
        hasher.update(name.as_bytes());
        hasher.update(&[0]);
        hasher.update(version.as_bytes());
        hasher.update(&[0]);
    }
    format!("{:016x}", hasher.digest())
}

/// Mesh clusters and assignments, encoded once per mesh state.
#[derive(Clone, Debug, Default)]
pub struct EncodedMesh {
    /// Clusters by name.
    pub clusters: BTreeMap<String, Arc<Resource>>,
    /// Assignments by cluster name.
    pub assignments: BTreeMap<String, Arc<Resource>>,
    /// Mutual-TLS variants of clusters, for callers holding a certificate, by name.
    pub tls_clusters: BTreeMap<String, Arc<Resource>>,
}

/// Encodes the shared mesh resources, each once.
pub fn encode_mesh(mesh: &MeshResources) -> EncodedMesh {
    EncodedMesh {
        clusters: mesh
            .clusters
            .iter()
            .map(|(n, c)| (n.clone(), encode(n, c)))
            .collect(),
        assignments: mesh
            .assignments
            .iter()
            .map(|(n, a)| (n.clone(), encode(n, a)))
            .collect(),
        tls_clusters: mesh
            .tls_clusters
            .iter()
            .map(|(n, c)| (n.clone(), encode(n, c)))
            .collect(),
    }
}

impl EncodedMesh {
    /// The encoded mesh of `state`, given this one (of the state before) and what changed
    /// since: only the changed services' clusters and assignments are built and encoded,
    /// every other entry is shared. Equal to `encode_mesh(&mesh_resources(state, settings))`.
    pub fn updated(
        &self,
        state: &MeshState,
        settings: &MeshSettings,
        diff: &StateDiff,
    ) -> EncodedMesh {
        let mut out = self.clone();
        let mut fresh = MeshResources::default();
        for name in diff.services() {
            for cluster in translate::service_cluster_names(name) {
                out.clusters.remove(&cluster);
                out.assignments.remove(&cluster);
                out.tls_clusters.remove(&cluster);
            }
            if let Some(service) = state.services.get(name) {
                fresh.add_service(service, settings);
            }
        }
        let encoded = encode_mesh(&fresh);
        out.clusters.extend(encoded.clusters);
        out.assignments.extend(encoded.assignments);
        out.tls_clusters.extend(encoded.tls_clusters);
        out
    }
}

/// Resources of one type, by name.
pub type ResourceMap = BTreeMap<String, Arc<Resource>>;

/// The resources of one proxy group, by type, with a version per type. Groups whose
/// resources of a type are the same (every wildcard group's clusters and assignments) share
/// one map.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    resources: [Arc<ResourceMap>; TYPES],
    versions: [String; TYPES],
    /// Dependencies ignored while translating, with the reason.
    pub warnings: Vec<String>,
}

impl Snapshot {
    /// The resources of one type, by name.
    pub fn resources(&self, t: ResourceType) -> &ResourceMap {
        &self.resources[t.index()]
    }

    /// The resources of one type as the shared map: the same map (by identity) means the
    /// same resources.
    pub fn resources_shared(&self, t: ResourceType) -> &Arc<ResourceMap> {
        &self.resources[t.index()]
    }

    /// The version of one type (all its resources).
    pub fn version(&self, t: ResourceType) -> &str {
        &self.versions[t.index()]
    }

    /// Whether both snapshots carry the same resources (compared by version) and warnings.
    pub fn same_versions(&self, other: &Snapshot) -> bool {
        self.versions == other.versions && self.warnings == other.warnings
    }

    /// A version of the whole snapshot.
    pub fn version_all(&self) -> String {
        set_version(
            ResourceType::ALL
                .iter()
                .map(|t| (t.type_url(), self.version(*t))),
        )
    }

    /// Number of resources of every type.
    pub fn len(&self) -> usize {
        self.resources.iter().map(|m| m.len()).sum()
    }

    /// Whether the snapshot holds nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A snapshot that would leave Envoy with a dangling reference; it is never published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("inconsistent snapshot: {}", .problems.join("; "))]
pub struct InconsistentSnapshot {
    /// Each dangling reference.
    pub problems: Vec<String>,
}

/// A part together with the shared mesh clusters and assignments it uses, checked as far as
/// it can be on its own: ready to assemble into snapshots, as many as share it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResolvedPart {
    /// Resources by type (push order), each sorted by name.
    resources: [Vec<Arc<Resource>>; TYPES],
    /// Dangling references found within the part.
    problems: Vec<String>,
    /// References to clusters the part does not define (another part may).
    open_clusters: Vec<(String, String)>,
    /// References to route configurations the part does not define.
    open_routes: Vec<(String, String)>,
    /// EDS clusters of the part without an assignment in it.
    open_assignments: Vec<String>,
    warnings: Vec<String>,
}

/// Encodes a part's resources (its ingress or its egress), each once, adds the mesh clusters
/// (their mutual-TLS variant when the part originates mutual TLS) and assignments it uses,
/// and checks what refers to what within it.
pub fn resolve_part(part: &GroupResources, mesh: &EncodedMesh) -> ResolvedPart {
    let mut out = ResolvedPart {
        warnings: part.warnings.clone(),
        ..Default::default()
    };
    let mut clusters: BTreeMap<&str, Arc<Resource>> = BTreeMap::new();
    let mut assignments: BTreeMap<&str, Arc<Resource>> = BTreeMap::new();
    for name in &part.mesh_clusters {
        let cluster = match part.originate_tls {
            true => mesh
                .tls_clusters
                .get(name)
                .or_else(|| mesh.clusters.get(name)),
            false => mesh.clusters.get(name),
        };
        match (cluster, mesh.assignments.get(name)) {
            (Some(c), Some(a)) => {
                clusters.insert(name, c.clone());
                assignments.insert(name, a.clone());
            }
            (Some(c), None) => {
                clusters.insert(name, c.clone());
                out.problems
                    .push(format!("cluster {name} has no assignment"));
            }
            (None, _) => out
                .problems
                .push(format!("mesh cluster {name} does not exist")),
        }
    }
    for name in &part.mesh_assignments {
        match mesh.assignments.get(name) {
            Some(a) => {
                assignments.insert(name, a.clone());
            }
            None => out
                .problems
                .push(format!("mesh assignment {name} does not exist")),
        }
    }
    for c in &part.clusters {
        if clusters.insert(&c.name, encode(&c.name, c)).is_some() {
            out.problems
                .push(format!("cluster {} defined twice", c.name));
        }
        let eds = Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32));
        let assignment = match c.eds_cluster_config.as_ref() {
            Some(cfg) if !cfg.service_name.is_empty() => &cfg.service_name,
            _ => &c.name,
        };
        if c.cluster_discovery_type == eds && !assignments.contains_key(assignment.as_str()) {
            out.open_assignments.push(assignment.clone());
        }
    }
    for r in &part.routes {
        for vh in &r.virtual_hosts {
            for route in &vh.routes {
                if let Some(Action::Route(action)) = &route.action
                    && let Some(ClusterSpecifier::Cluster(c)) = &action.cluster_specifier
                    && !clusters.contains_key(c.as_str())
                {
                    let at = format!("{}/{}/{}", r.name, vh.name, route.name);
                    out.open_clusters.push((at, c.clone()));
                }
            }
        }
    }
    for l in &part.listeners {
        for rds in listener_routes(l) {
            if !part.routes.iter().any(|r| r.name == rds) {
                out.open_routes.push((l.name.clone(), rds));
            }
        }
    }
    let listeners: BTreeMap<&str, Arc<Resource>> = part
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), encode(&l.name, l)))
        .collect();
    let routes: BTreeMap<&str, Arc<Resource>> = part
        .routes
        .iter()
        .map(|r| (r.name.as_str(), encode(&r.name, r)))
        .collect();
    let secrets: BTreeMap<&str, Arc<Resource>> = part
        .secrets
        .iter()
        .map(|s| (s.name.as_str(), encode(&s.name, s)))
        .collect();
    out.resources = [
        clusters.into_values().collect(),
        assignments.into_values().collect(),
        listeners.into_values().collect(),
        routes.into_values().collect(),
        secrets.into_values().collect(),
    ];
    out
}

/// Resource maps shared by content between the snapshots of one mesh state, keyed by type
/// and set version.
#[derive(Debug, Default)]
pub struct SharedMaps {
    maps: std::sync::Mutex<std::collections::HashMap<(ResourceType, String), Arc<ResourceMap>>>,
}

impl SharedMaps {
    /// The maps of `self` some snapshot still uses, for the next state: a map whose content
    /// did not change keeps its identity, so streams can tell at a glance that it did not.
    pub fn carry(&self) -> SharedMaps {
        let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        SharedMaps {
            maps: std::sync::Mutex::new(
                maps.iter()
                    .filter(|(_, m)| Arc::strong_count(m) > 1)
                    .map(|(k, m)| (k.clone(), m.clone()))
                    .collect(),
            ),
        }
    }

    fn get_or_build(
        &self,
        t: ResourceType,
        version: &str,
        len: usize,
        build: impl FnOnce() -> ResourceMap,
    ) -> Arc<ResourceMap> {
        let key = (t, version.to_string());
        {
            let maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(m) = maps.get(&key).filter(|m| m.len() == len) {
                return m.clone();
            }
        }
        let map = Arc::new(build());
        let mut maps = self.maps.lock().unwrap_or_else(|p| p.into_inner());
        maps.entry(key).or_insert(map).clone()
    }
}

/// The resources of one type of several parts in name order (each part's are sorted).
fn merged<'a>(parts: &[&'a ResolvedPart], t: ResourceType) -> Vec<&'a Arc<Resource>> {
    let lists: Vec<&[Arc<Resource>]> = parts
        .iter()
        .map(|p| p.resources[t.index()].as_slice())
        .collect();
    let mut heads = vec![0usize; lists.len()];
    let mut out = Vec::with_capacity(lists.iter().map(|l| l.len()).sum());
    loop {
        let next = (0..lists.len())
            .filter(|&i| heads[i] < lists[i].len())
            .min_by(|&a, &b| lists[a][heads[a]].name.cmp(&lists[b][heads[b]].name));
        let Some(i) = next else {
            return out;
        };
        out.push(&lists[i][heads[i]]);
        heads[i] += 1;
    }
}

/// Checks a group's resources and assembles its snapshot from them and the shared mesh
/// resources: every route names an existing cluster, every listener an existing route
/// configuration, and every EDS cluster has an assignment.
pub fn build(mesh: &EncodedMesh, group: &GroupResources) -> Result<Snapshot, InconsistentSnapshot> {
    assemble(&[&resolve_part(group, mesh)], &SharedMaps::default())
}

/// Assembles a group's snapshot from its resolved parts, with the checks of [`build`] across
/// the parts. Nothing is encoded here; a map equal to one already in `maps` is shared.
pub fn assemble(
    parts: &[&ResolvedPart],
    maps: &SharedMaps,
) -> Result<Snapshot, InconsistentSnapshot> {
    let mut problems: Vec<String> = parts.iter().flat_map(|p| p.problems.clone()).collect();
    let lists: [Vec<&Arc<Resource>>; TYPES] =
        std::array::from_fn(|i| merged(parts, ResourceType::ALL[i]));
    for (t, list) in ResourceType::ALL.iter().zip(&lists) {
        for pair in list.windows(2) {
            if pair[0].name == pair[1].name {
                problems.push(match t {
                    ResourceType::Cluster => format!("cluster {} defined twice", pair[0].name),
                    _ => format!("{t} {} defined twice", pair[0].name),
                });
            }
        }
    }
    let has = |t: ResourceType, name: &str| {
        lists[t.index()]
            .binary_search_by(|r| r.name.as_str().cmp(name))
            .is_ok()
    };
    for p in parts {
        for name in &p.open_assignments {
            if !has(ResourceType::Endpoint, name) {
                problems.push(format!("EDS cluster {name} has no assignment"));
            }
        }
        for (route, cluster) in &p.open_clusters {
            if !has(ResourceType::Cluster, cluster) {
                problems.push(format!("route {route} names missing cluster {cluster}"));
            }
        }
        for (listener, rds) in &p.open_routes {
            if !has(ResourceType::Route, rds) {
                problems.push(format!("listener {listener} names missing route {rds}"));
            }
        }
    }
    if !problems.is_empty() {
        return Err(InconsistentSnapshot { problems });
    }
    let versions: [String; TYPES] =
        std::array::from_fn(|i| resources_version(lists[i].iter().map(|r| &***r)));
    let resources = std::array::from_fn(|i| {
        let list = &lists[i];
        maps.get_or_build(ResourceType::ALL[i], &versions[i], list.len(), || {
            list.iter()
                .map(|r| (r.name.clone(), (*r).clone()))
                .collect()
        })
    });
    Ok(Snapshot {
        resources,
        versions,
        warnings: parts.iter().flat_map(|p| p.warnings.clone()).collect(),
    })
}

/// Route configuration names a listener's HTTP connection managers load through RDS.
fn listener_routes(
    listener: &envoy_types::pb::envoy::config::listener::v3::Listener,
) -> Vec<String> {
    listener
        .filter_chains
        .iter()
        .flat_map(|fc| fc.filters.iter())
        .filter_map(|f| match &f.config_type {
            Some(ConfigType::TypedConfig(any))
                if any.type_url == HttpConnectionManager::type_url() =>
            {
                HttpConnectionManager::decode(any.value.as_slice()).ok()
            }
            _ => None,
        })
        .filter_map(|hcm| match hcm.route_specifier {
            Some(RouteSpecifier::Rds(rds)) => Some(rds.route_config_name),
            _ => None,
        })
        .collect()
}
