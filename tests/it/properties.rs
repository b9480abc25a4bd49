//! Invariants over generated meshes, through the real path: YAML manifests →
//! `parse_manifests` → `Index` → `translate` → `snapshot::build`.

use crate::support;

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier};
use envoy_types::pb::envoy::config::endpoint::v3::{
    ClusterLoadAssignment, lb_endpoint::HostIdentifier,
};
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use meshbridge::index::{EndpointSet, Index, IndexObject};
use meshbridge::model::{
    DependencyTarget, Endpoint, MeshSettings, MeshState, Origin, ProxyGroup, valid_service_name,
};
use meshbridge::snapshot::{EncodedMesh, ResourceType, Snapshot, build, encode_mesh};
use meshbridge::sources::files::parse_manifests;
use meshbridge::translate::{group_resources, mesh_resources};
use proptest::prelude::*;
use prost::Message;
use serde_json::{Value, json};
use support::fixtures::{AccessRule, Fixture, MeshService};

// ---------------------------------------------------------------------------------------
// The generated model.
// ---------------------------------------------------------------------------------------

/// Service names: lower and mixed case (one pair equal but for case), one that looks like a
/// domain, and one the wildcard glob `admin-*` matches.
const NAMES: &[&str] = &[
    "orders",
    "Orders",
    "billing",
    "api.example.com",
    "admin-panel",
];
/// Named as dependencies but never declared.
const UNKNOWN: &[&str] = &["ghost", "legacy-db"];
/// Further ports named as dependencies: of services that may declare or serve `admin`, and of
/// one that never exists.
const PORTS: &[&str] = &["orders:admin", "billing:admin", "ghost:admin"];
const DOMAINS: &[&str] = &[
    "https://api.example.com",
    "http://api.example.com",
    "http://legacy.example.com:8080",
    "https://orders",
];
const DATACENTERS: &[Option<&str>] = &[None, Some("dc1"), Some("dc2"), Some("dc3")];

#[derive(Clone, Debug)]
struct GenEndpoint {
    host: u8,
    port: u16,
    datacenter: Option<&'static str>,
    canary: bool,
    weight_tag: Option<u32>,
    weight: Option<u32>,
    mtls: bool,
    /// Where it serves the further port `admin`, when its service has one.
    admin: Option<u16>,
}

impl GenEndpoint {
    /// The endpoint as a manifest writes it.
    fn json(&self) -> Value {
        let mut e = json!({"address": format!("10.0.0.{}", self.host), "port": self.port});
        if let Some(dc) = self.datacenter {
            e["datacenter"] = json!(dc);
        }
        let mut tags = Vec::new();
        if self.canary {
            tags.push("canary".to_string());
        }
        if let Some(w) = self.weight_tag {
            tags.push(format!("weight:{w}"));
        }
        if self.mtls {
            tags.push("mtls".to_string());
        }
        if !tags.is_empty() {
            e["tags"] = json!(tags);
        }
        if let Some(w) = self.weight {
            e["weight"] = json!(w);
        }
        e
    }

    /// The further ports it serves, as a source reports them.
    fn ports(&self) -> BTreeMap<String, u16> {
        self.admin
            .map(|p| ("admin".to_string(), p))
            .into_iter()
            .collect()
    }

    /// The weight meshbridge should give it.
    fn effective_weight(&self) -> u32 {
        self.weight
            .or(self.weight_tag.map(|w| w.clamp(1, 128)))
            .unwrap_or(1)
    }
}

#[derive(Clone, Debug)]
struct GenDependency {
    target: &'static str,
    timeout_ms: Option<u32>,
    attempts: Option<u32>,
    /// An outlier detection override (service dependencies only): few values, so that
    /// callers share variants.
    consecutive_5xx: Option<u32>,
}

/// A path rate limit: `requests` a second on `prefix`.
#[derive(Clone, Debug)]
struct GenPathLimit {
    prefix: &'static str,
    requests: u32,
}

#[derive(Clone, Debug)]
struct GenService {
    name: &'static str,
    mtls: Option<&'static str>,
    endpoints: Vec<GenEndpoint>,
    dependencies: Vec<GenDependency>,
    /// `spec.rateLimit.requests`.
    rate_limit: Option<u32>,
    /// `spec.rateLimit.paths`, each prefix once.
    path_limits: Vec<GenPathLimit>,
    /// The protocol of a further port `admin` it declares, if any.
    admin_protocol: Option<&'static str>,
}

impl GenService {
    /// The manifest, endpoints, dependencies and path rate limits in the given order.
    fn yaml_with(
        &self,
        endpoints: &[GenEndpoint],
        deps: &[GenDependency],
        path_limits: &[GenPathLimit],
    ) -> String {
        let mut service = MeshService::build(self.name);
        if let Some(mode) = self.mtls {
            service = service.set("mtls", mode);
        }
        if self.rate_limit.is_some() || !path_limits.is_empty() {
            let paths: Vec<_> = path_limits
                .iter()
                .map(|p| json!({"prefix": p.prefix, "requests": p.requests}))
                .collect();
            let mut limit = json!({"paths": paths});
            if let Some(requests) = self.rate_limit {
                limit["requests"] = json!(requests);
            }
            service = service.set("rateLimit", limit);
        }
        if let Some(protocol) = self.admin_protocol {
            service = service.set(
                "ports",
                json!([{"port": 80}, {"name": "admin", "port": 9090, "protocol": protocol}]),
            );
        }
        for e in endpoints {
            let mut json = e.json();
            // A host may name only ports its service declares.
            if let (Some(port), Some(_)) = (e.admin, self.admin_protocol) {
                json["ports"] = json!({"admin": port});
            }
            service = service.endpoint_with(json);
        }
        for d in deps {
            let mut dependency = if d.target.contains("://") {
                json!({"domain": d.target})
            } else {
                json!({"service": d.target})
            };
            if let Some(t) = d.timeout_ms {
                dependency["timeout"] = json!(format!("{t}ms"));
            }
            if let Some(a) = d.attempts {
                dependency["retries"] = json!({"attempts": a, "on": ["5xx"]});
            }
            if let Some(n) = d.consecutive_5xx.filter(|_| !d.target.contains("://")) {
                dependency["outlierDetection"] = json!({"consecutive5xx": n});
            }
            service = service.dependency_with(dependency);
        }
        service.yaml()
    }

    fn yaml(&self) -> String {
        self.yaml_with(&self.endpoints, &self.dependencies, &self.path_limits)
    }
}

/// Instances a discovery source (Consul) reports for one service.
#[derive(Clone, Debug)]
struct GenDiscovered {
    service: &'static str,
    endpoints: Vec<(GenEndpoint, bool)>,
}

impl GenDiscovered {
    fn object(&self, endpoints: &[(GenEndpoint, bool)]) -> IndexObject {
        IndexObject::Endpoints(EndpointSet {
            service: self.service.to_string(),
            endpoints: endpoints
                .iter()
                .map(|(e, healthy)| {
                    let mut tags = BTreeSet::new();
                    if e.canary {
                        tags.insert("canary".to_string());
                    }
                    if let Some(w) = e.weight_tag {
                        tags.insert(format!("weight:{w}"));
                    }
                    if e.mtls {
                        tags.insert("mtls".to_string());
                    }
                    Endpoint {
                        address: format!("10.1.0.{}", e.host),
                        port: e.port,
                        origin: Origin::Consul,
                        datacenter: e.datacenter.map(str::to_string),
                        weight: Endpoint::weight_from_tags(&tags).unwrap_or(1),
                        tags,
                        healthy: *healthy,
                        ports: e.ports(),
                    }
                })
                .collect(),
        })
    }
}

/// Callers an access rule may name: services, unknown ones, globs and everyone.
const CALLERS: &[&str] = &[
    "orders", "billing", "admin-*", "*", "ghost", "Orders", "b*g",
];
const PATHS: &[GenPath] = &[
    GenPath::Exact("/health"),
    GenPath::Prefix("/api/"),
    GenPath::Regex("/v[0-9]+/.*"),
];
const METHODS: &[&str] = &["GET", "POST", "DELETE"];

#[derive(Clone, Copy, Debug)]
enum GenPath {
    Exact(&'static str),
    Prefix(&'static str),
    Regex(&'static str),
}

impl GenPath {
    fn matches(self, path: &str) -> bool {
        match self {
            GenPath::Exact(p) => path == p,
            GenPath::Prefix(p) => path.starts_with(p),
            GenPath::Regex(r) => regex::Regex::new(&format!("^(?:{r})$"))
                .unwrap()
                .is_match(path),
        }
    }
}

#[derive(Clone, Debug)]
struct GenRule {
    from: Vec<&'static str>,
    paths: Vec<GenPath>,
    methods: Vec<&'static str>,
}

/// An AccessRule manifest.
#[derive(Clone, Debug)]
struct GenAccess {
    target: &'static str,
    log: bool,
    rules: Vec<GenRule>,
}

impl GenAccess {
    fn yaml_with(&self, i: usize, rules: &[GenRule]) -> String {
        let access = AccessRule::build(&format!("access-{i}"))
            .target(self.target)
            .action(if self.log { "log" } else { "deny" });
        rules
            .iter()
            .fold(access, |access, r| {
                let mut rule = json!({"from": r.from});
                if !r.paths.is_empty() {
                    let paths: Vec<Value> = r
                        .paths
                        .iter()
                        .map(|p| match p {
                            GenPath::Exact(v) => json!({"exact": v}),
                            GenPath::Prefix(v) => json!({"prefix": v}),
                            GenPath::Regex(v) => json!({"regex": v}),
                        })
                        .collect();
                    rule["paths"] = json!(paths);
                }
                if !r.methods.is_empty() {
                    rule["methods"] = json!(r.methods);
                }
                access.allow_with(rule)
            })
            .yaml()
    }
}

fn access_rule() -> impl Strategy<Value = GenAccess> {
    let rule = (
        prop::sample::subsequence(CALLERS.to_vec(), 1..3),
        prop::sample::subsequence(PATHS.to_vec(), 0..3),
        prop::sample::subsequence(METHODS.to_vec(), 0..3),
    )
        .prop_map(|(from, paths, methods)| GenRule {
            from,
            paths,
            methods,
        });
    (
        prop::sample::select([NAMES, UNKNOWN].concat()),
        prop::bool::weighted(0.3),
        prop::collection::vec(rule, 1..4),
    )
        .prop_map(|(target, log, rules)| GenAccess { target, log, rules })
}

#[derive(Clone, Debug)]
struct GenMesh {
    /// One manifest file each (`svc-NN.yaml`); names may repeat (the first file wins).
    services: Vec<GenService>,
    /// One manifest file each (`access-NN.yaml`); several may target one service.
    access: Vec<GenAccess>,
    discovered: Vec<GenDiscovered>,
    settings: MeshSettings,
    groups: Vec<ProxyGroup>,
}

fn file_name(i: usize) -> String {
    format!("svc-{i:02}.yaml")
}

fn endpoint() -> impl Strategy<Value = GenEndpoint> {
    (
        1u8..6,
        prop::sample::select(vec![80u16, 8080]),
        prop::sample::select(DATACENTERS.to_vec()),
        prop::bool::weighted(0.3),
        prop::option::weighted(0.3, 0u32..300),
        prop::option::weighted(0.3, 1u32..=128),
        prop::bool::weighted(0.2),
        prop::option::weighted(0.3, prop::sample::select(vec![15100u16, 15101])),
    )
        .prop_map(
            |(host, port, datacenter, canary, weight_tag, weight, mtls, admin)| GenEndpoint {
                host,
                port,
                datacenter,
                canary,
                weight_tag,
                weight,
                mtls,
                admin,
            },
        )
}

fn all_targets() -> Vec<&'static str> {
    NAMES
        .iter()
        .chain(UNKNOWN)
        .chain(PORTS)
        .chain(DOMAINS)
        .chain(&["*"])
        .copied()
        .collect()
}

fn dependencies() -> impl Strategy<Value = Vec<GenDependency>> {
    prop::sample::subsequence(all_targets(), 0..5).prop_flat_map(|targets| {
        let n = targets.len();
        (
            Just(targets),
            prop::collection::vec(prop::option::of(1u32..5000), n),
            prop::collection::vec(prop::option::of(0u32..4), n),
            prop::collection::vec(prop::option::of(3u32..6), n),
        )
            .prop_map(|(targets, timeouts, attempts, outliers)| {
                targets
                    .into_iter()
                    .zip(timeouts)
                    .zip(attempts)
                    .zip(outliers)
                    .map(
                        |(((target, timeout_ms), attempts), consecutive_5xx)| GenDependency {
                            target,
                            timeout_ms,
                            attempts,
                            consecutive_5xx,
                        },
                    )
                    .collect()
            })
    })
}

fn service() -> impl Strategy<Value = GenService> {
    (
        prop::sample::select(NAMES.to_vec()),
        prop::option::of(prop::sample::select(vec![
            "disabled",
            "permissive",
            "strict",
        ])),
        prop::collection::vec(endpoint(), 0..5),
        dependencies(),
        prop::option::of(1..1000u32),
        prop::sample::subsequence(vec!["/", "/api", "/api/", "/api/orders", "/login"], 0..=3),
        1..100u32,
        prop::option::weighted(0.4, prop::sample::select(vec!["http", "grpc", "tcp"])),
    )
        .prop_map(
            |(name, mtls, endpoints, dependencies, rate_limit, prefixes, requests, admin)| {
                GenService {
                    admin_protocol: admin,
                    name,
                    mtls,
                    endpoints,
                    dependencies,
                    rate_limit,
                    path_limits: prefixes
                        .into_iter()
                        .map(|prefix| GenPathLimit { prefix, requests })
                        .collect(),
                }
            },
        )
}

fn discovered() -> impl Strategy<Value = GenDiscovered> {
    (
        prop::sample::select([NAMES, &["legacy-db"]].concat()),
        prop::collection::vec((endpoint(), prop::bool::weighted(0.8)), 0..4),
    )
        .prop_map(|(service, endpoints)| GenDiscovered { service, endpoints })
}

fn group() -> impl Strategy<Value = ProxyGroup> {
    (
        prop::sample::select([NAMES, UNKNOWN, &["shop"]].concat()),
        prop::option::of(15006u16..15008),
        prop::option::of(prop::sample::select(vec!["10.0.0.1", "0.0.0.0"])),
        prop::option::of(3000u16..3002),
        prop::option::weighted(0.8, Just(15001u16)),
        prop::sample::subsequence(all_targets(), 0..4),
        any::<bool>(),
        prop::bool::weighted(0.3),
    )
        .prop_map(
            |(service, ingress_port, ingress_host, app_port, egress_port, deps, tls, admin)| {
                ProxyGroup {
                    service: service.to_string(),
                    ingress_port,
                    ingress_host: ingress_host.map(str::to_string),
                    app_port,
                    egress_port,
                    dependencies: deps.iter().map(|d| d.parse().unwrap()).collect(),
                    ports: admin
                        .then(|| {
                            let binding = meshbridge::model::PortBinding {
                                ingress_port: 15100,
                                app_port: 3100,
                            };
                            ("admin".to_string(), binding)
                        })
                        .into_iter()
                        .collect(),
                    tls,
                    certificate_files: tls.then(|| meshbridge::model::CertificateFiles {
                        cert: "/tls/tls.crt".into(),
                        key: "/tls/tls.key".into(),
                        ca: "/tls/ca.crt".into(),
                    }),
                }
            },
        )
}

fn settings() -> impl Strategy<Value = MeshSettings> {
    (
        prop::sample::select(vec![
            vec![],
            vec!["admin-*".to_string()],
            vec!["*".to_string()],
        ]),
        prop::sample::select(vec![vec![], vec!["dc1".to_string(), "dc2".to_string()]]),
        any::<bool>(),
        any::<bool>(),
        prop::sample::select(vec![vec![], vec!["admin-*".to_string()]]),
        any::<bool>(),
    )
        .prop_map(
            |(allow_wildcard, datacenters, default_deny, source_ip_identity, header_from, dns)| {
                MeshSettings {
                    allow_wildcard,
                    datacenters,
                    trust_domain: "mesh.test".into(),
                    external_ca_file: None,
                    default_deny,
                    source_ip_identity,
                    identity_header_from: header_from,
                    consul_domain: dns.then(|| "consul".into()),
                    cluster_domain: dns.then(|| "cluster.local".into()),
                }
            },
        )
}

fn gen_mesh() -> impl Strategy<Value = GenMesh> {
    (
        prop::collection::vec(service(), 0..6),
        prop::collection::vec(access_rule(), 0..4),
        prop::collection::vec(discovered(), 0..3),
        settings(),
        prop::collection::vec(group(), 1..4),
    )
        .prop_map(|(services, access, discovered, settings, groups)| GenMesh {
            services,
            access,
            discovered,
            settings,
            groups,
        })
}

// ---------------------------------------------------------------------------------------
// Building.
// ---------------------------------------------------------------------------------------

/// A small deterministic shuffle (the permutation is part of the generated case).
fn shuffle<T: Clone>(items: &[T], seed: &mut u64) -> Vec<T> {
    let mut v = items.to_vec();
    for i in (1..v.len()).rev() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let j = (*seed % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
    v
}

fn parse(file: &str, text: &str) -> Vec<IndexObject> {
    parse_manifests(file, text).unwrap_or_else(|errs| {
        panic!(
            "{file} rejected: {}\n{text}",
            errs.iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

/// What gets applied to the index: `(source, key, objects)`.
type Application = (String, String, Vec<IndexObject>);

/// The applications of a mesh; with a seed, endpoints and dependencies within each object
/// and the applications themselves come in a shuffled order.
fn applications(mesh: &GenMesh, seed: Option<u64>) -> Vec<Application> {
    let mut seed = seed.map(|s| s | 1);
    let mut out = Vec::new();
    for (i, s) in mesh.services.iter().enumerate() {
        let text = match seed.as_mut() {
            Some(seed) => s.yaml_with(
                &shuffle(&s.endpoints, seed),
                &shuffle(&s.dependencies, seed),
                &shuffle(&s.path_limits, seed),
            ),
            None => s.yaml(),
        };
        let file = file_name(i);
        out.push(("config".to_string(), file.clone(), parse(&file, &text)));
    }
    for (i, a) in mesh.access.iter().enumerate() {
        let text = match seed.as_mut() {
            Some(seed) => a.yaml_with(i, &shuffle(&a.rules, seed)),
            None => a.yaml_with(i, &a.rules),
        };
        let file = format!("access-{i:02}.yaml");
        out.push(("config".to_string(), file.clone(), parse(&file, &text)));
    }
    for (i, d) in mesh.discovered.iter().enumerate() {
        let endpoints = match seed.as_mut() {
            Some(seed) => shuffle(&d.endpoints, seed),
            None => d.endpoints.clone(),
        };
        out.push((
            "consul".to_string(),
            format!("{}#{i}", d.service),
            vec![d.object(&endpoints)],
        ));
    }
    match seed.as_mut() {
        Some(seed) => shuffle(&out, seed),
        None => out,
    }
}

fn index_of(apps: &[Application]) -> Index {
    let mut index = Index::new();
    for (source, key, objects) in apps {
        index.apply(source, key, objects.clone());
    }
    index
}

struct Built {
    state: MeshState,
    mesh: EncodedMesh,
    snapshots: Vec<Snapshot>,
}

fn build_all(mesh: &GenMesh, state: MeshState) -> Built {
    let encoded = encode_mesh(&mesh_resources(&state, &mesh.settings));
    let snapshots = mesh
        .groups
        .iter()
        .map(|g| {
            let resources = group_resources(&state, &mesh.settings, g);
            build(&encoded, &resources).unwrap_or_else(|e| panic!("group {g:?}: {e}"))
        })
        .collect();
    Built {
        state,
        mesh: encoded,
        snapshots,
    }
}

fn versions(s: &Snapshot) -> BTreeMap<(ResourceType, String), String> {
    ResourceType::ALL
        .iter()
        .flat_map(|t| {
            s.resources(*t)
                .iter()
                .map(move |(n, r)| ((*t, n.clone()), r.version.clone()))
        })
        .collect()
}

/// What Envoy itself would reject even though every reference resolves.
fn check_envoy_acceptance(s: &Snapshot) -> Result<(), TestCaseError> {
    for r in s.resources(ResourceType::Endpoint).values() {
        let a = ClusterLoadAssignment::decode(r.body.value.as_slice()).unwrap();
        let priorities: BTreeSet<u32> = a.endpoints.iter().map(|l| l.priority).collect();
        // Priorities must be dense from 0.
        prop_assert_eq!(
            priorities.iter().copied().collect::<Vec<_>>(),
            (0..priorities.len() as u32).collect::<Vec<_>>(),
            "assignment {}",
            &r.name
        );
        for l in &a.endpoints {
            prop_assert!(!l.lb_endpoints.is_empty());
            for e in &l.lb_endpoints {
                let w = e.load_balancing_weight.as_ref().map_or(0, |w| w.value);
                prop_assert!((1..=128).contains(&w), "weight {} in {}", w, &r.name);
            }
        }
    }
    for r in s.resources(ResourceType::Route).values() {
        let rc = RouteConfiguration::decode(r.body.value.as_slice()).unwrap();
        // Envoy refuses a route configuration naming a domain twice (case-insensitively).
        let mut seen = BTreeSet::new();
        for vh in &rc.virtual_hosts {
            prop_assert!(!vh.routes.is_empty(), "vhost {} has no routes", &vh.name);
            for d in &vh.domains {
                prop_assert!(
                    seen.insert(d.to_ascii_lowercase()),
                    "domain {} twice in route {}",
                    d,
                    &rc.name
                );
            }
        }
        let names: BTreeSet<&str> = rc.virtual_hosts.iter().map(|v| v.name.as_str()).collect();
        prop_assert_eq!(names.len(), rc.virtual_hosts.len(), "vhost names repeat");
    }
    Ok(())
}

/// Priority rank of a datacenter as documented: the local one (or none) first, then the
/// `datacenters` flag order, then datacenters the flag does not name.
fn rank(settings: &MeshSettings, datacenter: Option<&str>) -> usize {
    match datacenter {
        None => 0,
        Some(dc) => settings
            .datacenters
            .iter()
            .position(|d| d == dc)
            .unwrap_or(settings.datacenters.len()),
    }
}

/// Every assignment holds exactly the healthy instances of its service (only the canaries
/// for a canary cluster), with their weights, at priorities that follow datacenter order.
fn check_assignments(
    state: &MeshState,
    settings: &MeshSettings,
    s: &Snapshot,
) -> Result<(), TestCaseError> {
    for (name, r) in s.resources(ResourceType::Endpoint) {
        let (service, canary) = match name.strip_suffix("|canary") {
            Some(n) => (n, true),
            None => (name.as_str(), false),
        };
        let svc = &state.services[service];
        let mut expected: Vec<(String, u32)> = svc
            .healthy_endpoints()
            .filter(|e| !canary || e.is_canary())
            .map(|e| (format!("{}:{}", e.address, e.port), e.weight))
            .collect();
        expected.sort();
        let a = ClusterLoadAssignment::decode(r.body.value.as_slice()).unwrap();
        prop_assert_eq!(&a.cluster_name, name);
        let mut actual = Vec::new();
        let mut ranks = Vec::new();
        for l in &a.endpoints {
            let zone = l.locality.as_ref().map(|l| l.zone.as_str()).unwrap_or("");
            ranks.push((
                rank(settings, (!zone.is_empty()).then_some(zone)),
                l.priority,
            ));
            for e in &l.lb_endpoints {
                let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    return Err(TestCaseError::fail(format!("{name}: no endpoint")));
                };
                let Some(address::Address::SocketAddress(sa)) =
                    ep.address.as_ref().and_then(|a| a.address.as_ref())
                else {
                    return Err(TestCaseError::fail(format!("{name}: no socket address")));
                };
                let Some(PortSpecifier::PortValue(port)) = sa.port_specifier else {
                    return Err(TestCaseError::fail(format!("{name}: no port")));
                };
                let weight = e.load_balancing_weight.as_ref().map_or(0, |w| w.value);
                actual.push((format!("{}:{port}", sa.address), weight));
            }
        }
        actual.sort();
        prop_assert_eq!(actual, expected, "assignment {}", name);
        for (r1, p1) in &ranks {
            for (r2, p2) in &ranks {
                prop_assert_eq!(
                    r1.cmp(r2),
                    p1.cmp(p2),
                    "priorities of {} {:?}",
                    name,
                    &ranks
                );
            }
        }
    }
    Ok(())
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        // A failure prints its shrunk input; no regression file is written next to the test.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Properties.
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config())]

    /// (i) Every generated group gets a consistent snapshot that Envoy would accept.
    #[test]
    fn every_group_gets_a_consistent_snapshot(mesh in gen_mesh()) {
        let built = build_all(&mesh, index_of(&applications(&mesh, None)).state());
        for (g, s) in mesh.groups.iter().zip(&built.snapshots) {
            check_envoy_acceptance(s)?;
            check_assignments(&built.state, &mesh.settings, s)?;
            // Listeners exactly as the group asks for.
            // (A `tcp` port a dependency names gets a listener of its own, unless its port
            // is taken: checked in the translation's tests.)
            let (tcp, listeners): (Vec<&str>, Vec<&str>) = s
                .resources(ResourceType::Listener)
                .keys()
                .map(String::as_str)
                .partition(|l| l.starts_with("egress|tcp|"));
            let mut expected = Vec::new();
            if g.egress_port.is_some() {
                expected.push("egress");
            }
            if g.ingress_port.is_some() && g.app_port.is_some() {
                expected.push("ingress");
            }
            // One more ingress per further port the proxy serves.
            let further: Vec<String> = g.ports.keys().map(|p| format!("ingress|{p}")).collect();
            expected.extend(further.iter().map(String::as_str));
            prop_assert_eq!(listeners, expected);
            let deps = meshbridge::translate::resolve_dependencies(&built.state, &mesh.settings, g);
            for l in tcp {
                let service = l.trim_start_matches("egress|tcp|");
                prop_assert!(
                    deps.services.contains_key(service)
                        && built.state.services[service].protocol.is_tcp(),
                    "{} without a tcp dependency", l
                );
            }
            // A service the group depends on and the mesh knows is routed (unless its name
            // is taken by another dependency, which is warned about).
            if g.egress_port.is_some() {
                for d in &g.dependencies {
                    if let DependencyTarget::Service(name) = d
                        && built.state.services.contains_key(name)
                        && !s.warnings.iter().any(|w| w.contains(name.as_str()))
                    {
                        // The shared cluster, or the caller's policy variant of it.
                        prop_assert!(
                            s.resources(ResourceType::Cluster)
                                .keys()
                                .any(|c| meshbridge::translate::names::cluster_assignment(c) == name),
                            "no cluster for dependency {} of {:?}", name, g
                        );
                        prop_assert!(
                            s.resources(ResourceType::Endpoint).contains_key(name),
                            "no assignment for dependency {} of {:?}", name, g
                        );
                    }
                }
            }
        }
    }

    /// (ii) Neither the order of applications nor the order of endpoints and dependencies
    /// inside a manifest or endpoint set changes the state, resources or versions.
    #[test]
    fn order_of_application_does_not_matter(mesh in gen_mesh(), seed in any::<u64>()) {
        let a = build_all(&mesh, index_of(&applications(&mesh, None)).state());
        let b = build_all(&mesh, index_of(&applications(&mesh, Some(seed))).state());
        prop_assert_eq!(&a.state, &b.state);
        prop_assert_eq!(
            a.mesh.assignments.values().map(|r| &r.version).collect::<Vec<_>>(),
            b.mesh.assignments.values().map(|r| &r.version).collect::<Vec<_>>()
        );
        for (x, y) in a.snapshots.iter().zip(&b.snapshots) {
            prop_assert_eq!(versions(x), versions(y));
            for t in ResourceType::ALL {
                prop_assert_eq!(x.version(t), y.version(t));
            }
            prop_assert_eq!(x.version_all(), y.version_all());
            prop_assert!(x.same_versions(y));
            prop_assert_eq!(x, y);
        }
    }

    /// (iii) Applying what the index already has changes nothing, including a manifest
    /// whose endpoints and dependencies were only reordered.
    #[test]
    fn reapplying_changes_nothing(mesh in gen_mesh(), seed in any::<u64>()) {
        let apps = applications(&mesh, None);
        let mut index = index_of(&apps);
        let generation = index.generation();
        let state = index.state();
        for (source, key, objects) in &apps {
            prop_assert!(!index.apply(source, key, objects.clone()), "{}/{} applied twice", source, key);
            prop_assert_eq!(index.generation(), generation);
        }
        let mut seed = seed | 1;
        for (i, s) in mesh.services.iter().enumerate() {
            let text = s.yaml_with(
                &shuffle(&s.endpoints, &mut seed),
                &shuffle(&s.dependencies, &mut seed),
                &shuffle(&s.path_limits, &mut seed),
            );
            let file = file_name(i);
            prop_assert!(!index.apply("config", &file, parse(&file, &text)), "{} reordered", file);
            prop_assert_eq!(index.generation(), generation);
        }
        prop_assert_eq!(index.state(), state);
        // A real change moves the generation exactly once.
        prop_assert!(index.apply("config", "extra.yaml", Vec::new()));
        prop_assert_eq!(index.generation(), generation + 1);
        prop_assert!(!index.apply("config", "extra.yaml", Vec::new()));
        prop_assert_eq!(index.generation(), generation + 1);
    }

    /// (iv) A resource's version changes iff its bytes do: changing one endpoint's weight
    /// changes that service's assignments and nothing else.
    #[test]
    fn version_changes_iff_bytes_change(
        mesh in gen_mesh(),
        pick in any::<prop::sample::Index>(),
        delta in 1u32..128,
    ) {
        // Endpoints of services whose manifest wins (the first file of that name).
        let mut candidates = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, s) in mesh.services.iter().enumerate() {
            if seen.insert(s.name) {
                for j in 0..s.endpoints.len() {
                    candidates.push((i, j));
                }
            }
        }
        prop_assume!(!candidates.is_empty());
        let (i, j) = candidates[pick.index(candidates.len())];
        let mut changed = mesh.clone();
        let e = &mut changed.services[i].endpoints[j];
        let old = e.effective_weight();
        let new = (old - 1 + delta) % 128 + 1;
        prop_assert_ne!(old, new);
        e.weight = Some(new);
        let canary = e.canary;
        // The instance also serves its service's further port: that port's too.
        let serves_admin = e.admin.is_some() && changed.services[i].admin_protocol.is_some();
        let name = changed.services[i].name;

        let before = build_all(&mesh, index_of(&applications(&mesh, None)).state());
        let after = build_all(&changed, index_of(&applications(&changed, None)).state());

        let mut expected: BTreeSet<String> = [name.to_string()].into();
        if serves_admin {
            expected.insert(format!("{name}:admin"));
        }
        if canary {
            expected.insert(format!("{name}|canary"));
            if serves_admin {
                expected.insert(format!("{name}:admin|canary"));
            }
        }
        // Shared mesh resources: only the service's assignments moved.
        prop_assert_eq!(
            before.mesh.clusters.keys().collect::<Vec<_>>(),
            after.mesh.clusters.keys().collect::<Vec<_>>()
        );
        for (n, c) in &before.mesh.clusters {
            prop_assert_eq!(&c.version, &after.mesh.clusters[n].version);
        }
        for (n, a) in &before.mesh.assignments {
            let b = &after.mesh.assignments[n];
            prop_assert_eq!(a.version != b.version, expected.contains(n), "assignment {}", n);
            prop_assert_eq!(a.version == b.version, a.body.value == b.body.value);
        }
        for (x, y) in before.snapshots.iter().zip(&after.snapshots) {
            let (vx, vy) = (versions(x), versions(y));
            prop_assert_eq!(vx.keys().collect::<Vec<_>>(), vy.keys().collect::<Vec<_>>());
            for ((t, n), v) in &vx {
                let moved = v != &vy[&(*t, n.clone())];
                let should = *t == ResourceType::Endpoint && expected.contains(n);
                prop_assert_eq!(moved, should, "{} {}", t, n);
                let bytes_differ = x.resources(*t)[n].body.value != y.resources(*t)[n].body.value;
                prop_assert_eq!(moved, bytes_differ, "{} {}", t, n);
            }
            let uses = expected
                .iter()
                .any(|n| x.resources(ResourceType::Endpoint).contains_key(n));
            prop_assert_eq!(
                x.version(ResourceType::Endpoint) != y.version(ResourceType::Endpoint),
                uses
            );
            for t in [ResourceType::Cluster, ResourceType::Listener, ResourceType::Route] {
                prop_assert_eq!(x.version(t), y.version(t));
            }
            prop_assert_eq!(x.version_all() != y.version_all(), uses);
        }
    }
}

/// The generator produces what the brief needs: the names are valid and the manifests parse.
#[test]
fn generated_names_are_valid() {
    for n in NAMES.iter().chain(UNKNOWN) {
        assert!(valid_service_name(n), "{n}");
    }
    for d in DOMAINS {
        assert!(matches!(d.parse(), Ok(DependencyTarget::Domain(_))), "{d}");
    }
    for p in PORTS {
        assert!(matches!(p.parse(), Ok(DependencyTarget::Service(_))), "{p}");
    }
}

// ---------------------------------------------------------------------------------------
// Access control: the RBAC Envoy gets, evaluated like Envoy evaluates it.
// ---------------------------------------------------------------------------------------

use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::rbac::v3::{Permission, Principal, permission, principal};
use envoy_types::pb::envoy::config::route::v3::header_matcher::HeaderMatchSpecifier;
use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac as HttpRbac;
use envoy_types::pb::envoy::r#type::matcher::v3::{
    StringMatcher, path_matcher, string_matcher::MatchPattern,
};
use meshbridge::model::glob_match;

/// What the callee's Envoy knows about one request.
#[derive(Clone, Debug)]
struct Request {
    /// URI SAN of a verified client certificate.
    san: Option<String>,
    /// The connection's source address.
    source_ip: String,
    /// `x-client-name` as RBAC sees it.
    client_name: Option<String>,
    path: String,
    method: String,
}

fn string_matches(m: &StringMatcher, value: &str) -> bool {
    assert!(!m.ignore_case, "case-insensitive matching is not generated");
    match m.match_pattern.as_ref().expect("empty string matcher") {
        MatchPattern::Exact(e) => value == e,
        MatchPattern::Prefix(p) => value.starts_with(p.as_str()),
        // Envoy's safe_regex must match the whole value.
        MatchPattern::SafeRegex(r) => regex::Regex::new(&format!("^(?:{})$", r.regex))
            .unwrap()
            .is_match(value),
        other => panic!("matcher not evaluated by this test: {other:?}"),
    }
}

fn principal_admits(p: &Principal, r: &Request) -> bool {
    use principal::Identifier;
    match p.identifier.as_ref().expect("empty principal") {
        Identifier::Any(any) => *any,
        Identifier::OrIds(set) => set.ids.iter().any(|p| principal_admits(p, r)),
        Identifier::AndIds(set) => set.ids.iter().all(|p| principal_admits(p, r)),
        Identifier::NotId(p) => !principal_admits(p, r),
        Identifier::Authenticated(a) => match (&r.san, &a.principal_name) {
            (Some(san), Some(m)) => string_matches(m, san),
            (Some(_), None) => true,
            (None, _) => false,
        },
        Identifier::DirectRemoteIp(cidr) => {
            let full = if cidr.address_prefix.contains(':') {
                128
            } else {
                32
            };
            assert_eq!(cidr.prefix_len.as_ref().map(|l| l.value), Some(full));
            cidr.address_prefix == r.source_ip
        }
        Identifier::Header(h) => {
            assert_eq!(
                h.name, "x-client-name",
                "only the identity header is a principal"
            );
            match (&r.client_name, &h.header_match_specifier) {
                (Some(v), Some(HeaderMatchSpecifier::StringMatch(m))) => string_matches(m, v),
                (None, _) => false,
                (_, other) => panic!("header matcher not evaluated by this test: {other:?}"),
            }
        }
        other => panic!("principal not evaluated by this test: {other:?}"),
    }
}

fn permission_admits(p: &Permission, r: &Request) -> bool {
    use permission::Rule;
    match p.rule.as_ref().expect("empty permission") {
        Rule::Any(any) => *any,
        Rule::OrRules(set) => set.rules.iter().any(|p| permission_admits(p, r)),
        Rule::AndRules(set) => set.rules.iter().all(|p| permission_admits(p, r)),
        Rule::UrlPath(m) => match &m.rule {
            Some(path_matcher::Rule::Path(s)) => string_matches(s, &r.path),
            other => panic!("path matcher not evaluated by this test: {other:?}"),
        },
        Rule::Header(h) if h.name == ":method" => match &h.header_match_specifier {
            Some(HeaderMatchSpecifier::StringMatch(m)) => string_matches(m, &r.method),
            other => panic!("method matcher not evaluated by this test: {other:?}"),
        },
        other => panic!("permission not evaluated by this test: {other:?}"),
    }
}

/// The RBAC filter of a snapshot's ingress listener, if it has one.
fn ingress_rbac(s: &Snapshot) -> Option<Option<HttpRbac>> {
    let r = s.resources(ResourceType::Listener).get("ingress")?;
    Some(support::listener_rbac(
        &Listener::decode(r.body.value.as_slice()).unwrap(),
    ))
}

/// Whether the RBAC admits the request, in enforced and in shadow mode; `None` for no rules.
fn rbac_admits(rbac: &HttpRbac, r: &Request) -> (Option<bool>, Option<bool>) {
    let eval = |rules: &Option<envoy_types::pb::envoy::config::rbac::v3::Rbac>| {
        rules.as_ref().map(|rules| {
            assert_eq!(rules.action, 0, "only ALLOW policies are generated");
            rules.policies.values().any(|p| {
                p.permissions.iter().any(|x| permission_admits(x, r))
                    && p.principals.iter().any(|x| principal_admits(x, r))
            })
        })
    };
    (eval(&rbac.rules), eval(&rbac.shadow_rules))
}

/// Who may be calling, as generated.
#[derive(Clone, Debug)]
enum Caller {
    /// A verified certificate for this service name.
    Certificate(&'static str),
    /// No certificate, from this address.
    Address(String),
}

fn caller() -> impl Strategy<Value = (Caller, Option<&'static str>)> {
    let who = prop_oneof![
        prop::sample::select([NAMES, UNKNOWN, &["intruder", "admin-panel"]].concat())
            .prop_map(Caller::Certificate),
        (0u8..2, 1u8..7).prop_map(|(net, host)| Caller::Address(format!("10.{net}.0.{host}"))),
    ];
    (
        who,
        prop::option::weighted(
            0.3,
            prop::sample::select(vec!["orders", "billing", "admin"]),
        ),
    )
}

proptest! {
    #![proptest_config(config())]

    /// (v) No generated RBAC policy admits a caller that no AccessRule names: a request the
    /// target's Envoy lets through (or, in `log` mode, would) comes from a caller one of the
    /// target's rules names — by certificate, by a registered address with source-IP
    /// identity, or asserted by a peer trusted to do so — on a path and method that rule
    /// allows. And the converse for certificates: a named caller on an allowed path passes.
    #[test]
    fn no_rbac_admits_a_caller_no_access_rule_names(
        mesh in gen_mesh(),
        (who, asserted) in caller(),
        path in prop::sample::select(vec!["/", "/health", "/healthz", "/api/x", "/v2/a", "/v/a"]),
        method in prop::sample::select(METHODS.to_vec()),
    ) {
        // Every target of a rule (and one service without rules) gets an ingress proxy.
        let mut mesh = mesh;
        let targets: BTreeSet<&str> = mesh.access.iter().map(|a| a.target).chain(["shop"]).collect();
        mesh.groups = targets
            .into_iter()
            .enumerate()
            .map(|(i, t)| ProxyGroup {
                service: t.to_string(),
                ingress_port: Some(15006),
                app_port: Some(3000),
                tls: i % 2 == 0,
                ..ProxyGroup::default()
            })
            .collect();
        let built = build_all(&mesh, index_of(&applications(&mesh, None)).state());
        let settings = &mesh.settings;
        let prefix = format!("spiffe://{}/service/", settings.trust_domain);
        // Names the peer is proven to have.
        let proven: Vec<String> = match &who {
            Caller::Certificate(n) => vec![n.to_string()],
            Caller::Address(ip) if settings.source_ip_identity => built
                .state
                .services
                .values()
                .filter(|s| s.endpoints.iter().any(|e| &e.address == ip))
                .map(|s| s.name.clone())
                .collect(),
            Caller::Address(_) => Vec::new(),
        };
        // Only a peer proven by its certificate may assert the caller.
        let trusted = matches!(who, Caller::Certificate(n)
            if settings.identity_header_from.iter().any(|g| glob_match(g, n)));
        let mut names = proven.clone();
        if let (Some(a), true) = (asserted, trusted) {
            names.push(a.to_string());
        }
        let request = Request {
            san: match &who {
                Caller::Certificate(n) => Some(format!("{prefix}{n}")),
                Caller::Address(_) => None,
            },
            source_ip: match &who {
                Caller::Certificate(_) => "192.0.2.1".to_string(),
                Caller::Address(ip) => ip.clone(),
            },
            client_name: asserted.map(str::to_string).or_else(|| proven.first().cloned()),
            path: path.to_string(),
            method: method.to_string(),
        };
        for (g, s) in mesh.groups.iter().zip(&built.snapshots) {
            let Some(rbac) = ingress_rbac(s) else { continue };
            let target = g.service.as_str();
            let rules: Vec<&GenRule> = mesh
                .access
                .iter()
                .filter(|a| a.target == target)
                .flat_map(|a| &a.rules)
                .collect();
            // `log` only shadows when every rule says so and the mesh is not default-deny.
            let any_log_only = !rules.is_empty()
                && !settings.default_deny
                && mesh.access.iter().filter(|a| a.target == target).all(|a| a.log);
            let named = |r: &GenRule| {
                r.from.iter().any(|f| *f == "*" || names.iter().any(|n| glob_match(f, n)))
            };
            let allowed_call = |r: &GenRule| {
                (r.paths.is_empty() || r.paths.iter().any(|p| p.matches(path)))
                    && (r.methods.is_empty() || r.methods.contains(&method))
            };
            let justified = rules.iter().any(|r| named(r) && allowed_call(r));
            match rbac {
                None => {
                    // No RBAC: only where nothing targets the service and the mesh allows.
                    prop_assert!(rules.is_empty() && !settings.default_deny, "{} has rules but no RBAC", target);
                }
                Some(rbac) => {
                    let (enforced, shadow) = rbac_admits(&rbac, &request);
                    prop_assert_eq!(shadow.is_some(), any_log_only, "log mode of {}", target);
                    prop_assert_eq!(enforced.is_some(), !any_log_only, "deny mode of {}", target);
                    let admitted = enforced.or(shadow).unwrap();
                    prop_assert!(
                        !admitted || justified,
                        "{} admitted {:?} (names {:?}) on {} {} without a rule naming it; rules {:?}",
                        target, who, names, method, path, rules
                    );
                    if let Caller::Certificate(n) = who {
                        let named_by_certificate = rules.iter().any(|r| {
                            allowed_call(r) && r.from.iter().any(|f| *f == "*" || glob_match(f, n))
                        });
                        prop_assert!(
                            !named_by_certificate || admitted,
                            "{} refused {} on {} {} although a rule names it",
                            target, n, method, path
                        );
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Incremental rebuilds.
// ---------------------------------------------------------------------------------------

/// One change to the index: apply an object of another generated mesh under its key, or
/// delete a key.
#[derive(Clone, Debug)]
enum Step {
    Apply(prop::sample::Index),
    Delete(prop::sample::Index),
    /// A proxy of a new group connects.
    Connect(ProxyGroup),
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => any::<prop::sample::Index>().prop_map(Step::Apply),
        1 => any::<prop::sample::Index>().prop_map(Step::Delete),
        1 => group().prop_map(Step::Connect),
    ]
}

/// What a full rebuild gives `group` in `state`: every resource translated and encoded anew.
fn full_build(state: &MeshState, settings: &MeshSettings, group: &ProxyGroup) -> Snapshot {
    let mesh = encode_mesh(&mesh_resources(state, settings));
    build(&mesh, &group_resources(state, settings, group)).unwrap()
}

proptest! {
    #![proptest_config(config())]

    /// (v) Rebuilding only the groups a change can affect, with parts shared between groups,
    /// gives every connected group exactly the snapshot a full rebuild gives, after every
    /// change of a random sequence; and a change no group reads rebuilds nothing.
    #[test]
    fn incremental_rebuilds_equal_full_rebuilds(
        mesh in gen_mesh(),
        other in gen_mesh(),
        steps in prop::collection::vec(step(), 1..12),
        workers in 1usize..3,
    ) {
        let settings = mesh.settings.clone();
        let cache = meshbridge::xds::cache::SnapshotCache::new(settings.clone()).with_workers(workers);
        let mut groups: Vec<ProxyGroup> = mesh.groups.clone();
        let _streams: Vec<_> = groups.iter().map(|g| cache.subscribe(g)).collect();
        let mut index = index_of(&applications(&mesh, None));
        cache.update(index.state());
        let pool: Vec<Application> = applications(&other, None)
            .into_iter()
            .chain(applications(&mesh, Some(7)))
            .collect();
        let mut keys: Vec<(String, String)> = applications(&mesh, None)
            .into_iter()
            .map(|(s, k, _)| (s, k))
            .collect();
        let mut later_streams = Vec::new();
        for step in steps {
            let old = index.state();
            match step {
                Step::Apply(_) if pool.is_empty() => {}
                Step::Delete(_) if keys.is_empty() => {}
                Step::Apply(i) => {
                    let (source, key, objects) = &pool[i.index(pool.len())];
                    index.apply(source, key, objects.clone());
                    keys.push((source.clone(), key.clone()));
                }
                Step::Delete(i) => {
                    let (source, key) = &keys[i.index(keys.len())];
                    index.delete(source, key);
                }
                Step::Connect(g) => {
                    later_streams.push(cache.subscribe(&g));
                    groups.push(g);
                }
            }
            let state = index.state();
            let before = cache.builds_total();
            let report = cache.update(state.clone());
            prop_assert!(report.groups <= report.connected);
            prop_assert_eq!(cache.builds_total(), before + report.groups as u64);
            if old == state {
                prop_assert_eq!(report.groups, 0, "an unchanged state rebuilt groups");
            }
            for g in &groups {
                let got = cache.snapshot(g).unwrap();
                let want = full_build(&state, &settings, g);
                prop_assert_eq!(&*got, &want, "group {:?} after {:?}", g, report.diff);
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]

    /// (vi) A delta stream that finds what changed by comparing the snapshot's maps (the
    /// fast path) sends exactly what comparing every subscribed name sends; a SotW stream
    /// that skips a type whose map did not change sends exactly what selecting it anew sends.
    #[test]
    fn streams_comparing_maps_send_what_comparing_names_sends(
        mesh in gen_mesh(),
        other in gen_mesh(),
        steps in prop::collection::vec(step(), 1..10),
    ) {
        use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DiscoveryRequest};
        use meshbridge::xds::delta::DeltaState;
        use meshbridge::xds::sotw::SotwState;
        let cache = meshbridge::xds::cache::SnapshotCache::new(mesh.settings.clone());
        let groups = mesh.groups.clone();
        let _streams: Vec<_> = groups.iter().map(|g| cache.subscribe(g)).collect();
        let mut index = index_of(&applications(&mesh, None));
        cache.update(index.state());
        let pool: Vec<Application> = applications(&other, None);
        let mut streams: Vec<(DeltaState, DeltaState)> = Vec::new();
        let mut sotw_streams: Vec<(SotwState, SotwState)> = Vec::new();
        for g in &groups {
            let snap = cache.snapshot(g).unwrap();
            let mut pair = (DeltaState::new("cp".into()), DeltaState::new("cp".into()));
            let mut sotw = (SotwState::new("cp".into()), SotwState::new("cp".into()));
            for t in ResourceType::ALL {
                let names: Vec<String> = match t {
                    ResourceType::Cluster | ResourceType::Listener => Vec::new(),
                    // Envoy subscribes to the assignments of its clusters, and to a name
                    // that has no cluster (it gets an empty assignment).
                    ResourceType::Endpoint => snap
                        .resources(ResourceType::Cluster)
                        .keys()
                        .cloned()
                        .chain(["ghost".to_string()])
                        .collect(),
                    ResourceType::Route => vec!["egress".into(), "ingress".into()],
                    // Envoy subscribes to the secrets its TLS contexts name.
                    ResourceType::Secret => {
                        vec!["server_cert".into(), "validation_context".into()]
                    }
                };
                let req = DeltaDiscoveryRequest {
                    type_url: t.type_url().to_string(),
                    resource_names_subscribe: names,
                    ..Default::default()
                };
                let a = pair.0.on_request(&req, &snap);
                let b = pair.1.on_request(&req, &snap);
                prop_assert_eq!(a, b);
                let req = DiscoveryRequest {
                    type_url: req.type_url.clone(),
                    resource_names: req.resource_names_subscribe.clone(),
                    ..Default::default()
                };
                let a = sotw.0.on_request(&req, &snap);
                let b = sotw.1.on_request(&req, &snap);
                prop_assert_eq!(a, b);
            }
            streams.push(pair);
            sotw_streams.push(sotw);
        }
        for step in steps {
            match step {
                Step::Apply(i) if !pool.is_empty() => {
                    let (source, key, objects) = &pool[i.index(pool.len())];
                    index.apply(source, key, objects.clone());
                }
                Step::Delete(i) => {
                    let keys: Vec<(String, String)> = applications(&mesh, None)
                        .into_iter()
                        .map(|(s, k, _)| (s, k))
                        .collect();
                    if !keys.is_empty() {
                        let (source, key) = &keys[i.index(keys.len())];
                        index.delete(source, key);
                    }
                }
                _ => {}
            }
            cache.update(index.state());
            for (g, (fast, full)) in groups.iter().zip(streams.iter_mut()) {
                let snap = cache.snapshot(g).unwrap();
                full.forget_compared();
                let sent = fast.on_snapshot(&snap);
                prop_assert_eq!(&sent, &full.on_snapshot(&snap), "group {:?}", g);
                // The proxy answers each response, every third one with a NACK: neither
                // moves what the next comparison has to find.
                for (i, r) in sent.iter().enumerate() {
                    let answer = DeltaDiscoveryRequest {
                        type_url: r.type_url.clone(),
                        response_nonce: r.nonce.clone(),
                        error_detail: (i % 3 == 2).then(|| {
                            envoy_types::pb::google::rpc::Status {
                                message: "rejected".into(),
                                ..Default::default()
                            }
                        }),
                        ..Default::default()
                    };
                    prop_assert_eq!(fast.on_request(&answer, &snap), full.on_request(&answer, &snap));
                }
            }
            for (g, (fast, full)) in groups.iter().zip(sotw_streams.iter_mut()) {
                let snap = cache.snapshot(g).unwrap();
                full.forget_compared();
                prop_assert_eq!(fast.on_snapshot(&snap), full.on_snapshot(&snap), "group {:?}", g);
            }
        }
    }
}
