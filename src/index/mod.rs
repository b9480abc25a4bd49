//! The index: what every source currently says, and the [`MeshState`] built from it.
//!
//! Sources call [`Index::apply`], [`Index::delete`] and [`Index::reset`] with objects keyed
//! by source and key (a manifest file, a Kubernetes object, a Consul service); the index keeps
//! each source's last good objects and builds one deterministic [`MeshState`] on demand.
//! Synchronous and pure: no IO, no clock. A change counter lets the IO shell debounce.

pub mod convert;
pub mod pods;

use std::collections::BTreeMap;

use serde::Serialize;

use crate::model::{
    AccessAction, AccessPolicy, AccessRuleSet, Dependency, Endpoint, MeshState, MtlsMode, Origin,
    Service,
};

/// A MeshService, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDeclaration {
    /// Mesh-wide name.
    pub name: String,
    /// Orders competing claims on one name; the lowest wins (oldest creation time, or the
    /// file and document for manifests).
    pub precedence: String,
    /// Mutual TLS requirement.
    pub mtls: MtlsMode,
    /// Dependencies, sorted by target.
    pub dependencies: Vec<Dependency>,
    /// Static endpoints (`spec.endpoints`), sorted.
    pub endpoints: Vec<Endpoint>,
    /// The Kubernetes namespace it was declared in; none for the operator's manifests.
    pub namespace: Option<String>,
    /// What its instances speak.
    pub protocol: crate::model::AppProtocol,
    /// Its first port (`spec.ports[0].port`).
    pub port: Option<u16>,
    /// Its further ports (`spec.ports[1..]`).
    pub named_ports: Vec<crate::model::NamedPort>,
    /// `spec.migration`.
    pub migration: Option<crate::model::Migration>,
    /// `spec.http1.preserveHeaderCase`.
    pub preserve_header_case: bool,
    /// `spec.rateLimit`.
    pub rate_limit: crate::model::RateLimit,
}

/// An AccessRule, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessDeclaration {
    /// The protected service.
    pub target: String,
    /// What happens to calls no rule allows.
    pub action: AccessAction,
    /// Allowed calls.
    pub rules: Vec<AccessRuleSet>,
    /// Where it came from (`namespace/name` or `file#document`).
    pub source: String,
    /// The Kubernetes namespace it was declared in; none for the operator's manifests.
    pub namespace: Option<String>,
}

/// An AccessRule from a namespace that may not protect its target: ignored, and reported.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ForeignRule {
    /// The rule (`namespace/name`).
    pub source: String,
    /// Its target.
    pub target: String,
    /// Who owns the target: `namespace/...` of its MeshService, the operator's manifests, or
    /// Consul.
    pub owner: String,
}

/// Instances of one service reported by a discovery source (Consul, pods).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSet {
    /// The service.
    pub service: String,
    /// Its instances.
    pub endpoints: Vec<Endpoint>,
}

/// Something a source contributes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IndexObject {
    /// A service declaration.
    Service(ServiceDeclaration),
    /// An access rule.
    Access(AccessDeclaration),
    /// Discovered instances.
    Endpoints(EndpointSet),
}

/// Two declarations claiming one service name, or a namespace claiming a name Consul knows:
/// the loser is reported, not used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NameConflict {
    /// The contested name.
    pub service: String,
    /// The declaration in force (for [`ConflictKind::ConsulService`]: `Consul`, or the
    /// declaration of an owner namespace).
    pub winner: String,
    /// The declaration ignored.
    pub loser: String,
    /// Why the loser lost.
    pub kind: ConflictKind,
}

/// Why a declaration lost its name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ConflictKind {
    /// An older declaration holds the name.
    Older,
    /// Consul has instances of the name, and the declaration's namespace is not one of
    /// `--consul-services-owned-by`: it may neither add instances to a Consul service nor
    /// change its settings.
    ConsulService,
}

/// The objects of every source, keyed by source name and then by object key.
#[derive(Clone, Debug, Default)]
pub struct Index {
    sources: BTreeMap<String, BTreeMap<String, Vec<IndexObject>>>,
    generation: u64,
    /// Namespaces whose AccessRules may protect services no namespace declares (Consul's,
    /// and the operator's manifests'): `--consul-services-owned-by`.
    consul_owners: Vec<String>,
}

impl Index {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts changes; it moves only when an apply, delete or reset changed something.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How many objects each source holds.
    pub fn sizes(&self) -> BTreeMap<String, usize> {
        self.sources
            .iter()
            .map(|(source, entries)| (source.clone(), entries.values().map(Vec::len).sum()))
            .collect()
    }

    /// Sets the namespaces whose AccessRules may protect services no namespace declares.
    pub fn set_consul_owners(&mut self, namespaces: Vec<String>) {
        if self.consul_owners != namespaces {
            self.consul_owners = namespaces;
            self.generation += 1;
        }
    }

    /// The objects `source` has under `key`.
    pub fn get(&self, source: &str, key: &str) -> Option<&[IndexObject]> {
        self.sources.get(source)?.get(key).map(Vec::as_slice)
    }

    /// Sets the objects `source` has under `key`. Returns whether anything changed.
    pub fn apply(&mut self, source: &str, key: &str, objects: Vec<IndexObject>) -> bool {
        let entries = self.sources.entry(source.to_string()).or_default();
        if entries.get(key) == Some(&objects) {
            return false;
        }
        entries.insert(key.to_string(), objects);
        self.generation += 1;
        true
    }

    /// Removes what `source` had under `key`. Returns whether anything changed.
    pub fn delete(&mut self, source: &str, key: &str) -> bool {
        let removed = self
            .sources
            .get_mut(source)
            .is_some_and(|entries| entries.remove(key).is_some());
        if removed {
            self.generation += 1;
        }
        removed
    }

    /// Replaces everything `source` has (after a relist). Returns whether anything changed.
    pub fn reset(&mut self, source: &str, objects: BTreeMap<String, Vec<IndexObject>>) -> bool {
        if self.sources.get(source) == Some(&objects) {
            return false;
        }
        self.sources.insert(source.to_string(), objects);
        self.generation += 1;
        true
    }

    /// Builds the mesh state and reports name conflicts.
    pub fn build(&self) -> (MeshState, Vec<NameConflict>) {
        let (state, conflicts, _) = self.build_full();
        (state, conflicts)
    }

    /// Builds the mesh state and reports name conflicts and AccessRules that may not
    /// protect their target. An AccessRule from a namespace protects a service declared by
    /// a MeshService of the same namespace; a service no namespace declares (only Consul's
    /// instances, or the operator's manifests) only from a namespace of
    /// `--consul-services-owned-by`. A rule for a service nobody knows yet is kept (it
    /// protects nothing until the service appears, and is judged again then). The
    /// operator's manifests' rules protect anything.
    #[allow(clippy::too_many_lines)] // one pass over every declaration; its maps are the pass's working state.
    pub fn build_full(&self) -> (MeshState, Vec<NameConflict>, Vec<ForeignRule>) {
        let mut declarations: BTreeMap<&str, Vec<&ServiceDeclaration>> = BTreeMap::new();
        let mut discovered: BTreeMap<&str, Vec<&Endpoint>> = BTreeMap::new();
        let mut access: BTreeMap<&str, Vec<&AccessDeclaration>> = BTreeMap::new();
        for object in self.sources.values().flat_map(|m| m.values()).flatten() {
            match object {
                IndexObject::Service(d) => declarations.entry(&d.name).or_default().push(d),
                IndexObject::Access(a) => access.entry(&a.target).or_default().push(a),
                IndexObject::Endpoints(set) => discovered
                    .entry(&set.service)
                    .or_default()
                    .extend(set.endpoints.iter()),
            }
        }
        let mut conflicts = Vec::new();
        let mut services = BTreeMap::new();
        let mut owners: BTreeMap<&str, Owner<'_>> = BTreeMap::new();
        for (name, decls) in declarations {
            // A name Consul knows is declared only by the operator or an owner namespace.
            let consul_known = discovered
                .get(name)
                .is_some_and(|found| found.iter().any(|e| e.origin == Origin::Consul));
            let (mut decls, refused): (Vec<&ServiceDeclaration>, Vec<&ServiceDeclaration>) =
                decls.into_iter().partition(|d| {
                    !consul_known || may_claim(d.namespace.as_deref(), &self.consul_owners)
                });
            decls.sort_by(|a, b| {
                a.precedence
                    .cmp(&b.precedence)
                    .then_with(|| format!("{a:?}").cmp(&format!("{b:?}")))
            });
            for loser in refused {
                conflicts.push(NameConflict {
                    service: name.to_string(),
                    winner: decls
                        .first()
                        .map_or_else(|| "Consul".to_string(), |w| w.precedence.clone()),
                    loser: loser.precedence.clone(),
                    kind: ConflictKind::ConsulService,
                });
            }
            // Nobody may declare it: it stays Consul's (built below, from its instances).
            let Some(&winner) = decls.first() else {
                continue;
            };
            owners.insert(
                name,
                winner
                    .namespace
                    .as_deref()
                    .map_or(Owner::Operator, Owner::Namespace),
            );
            for loser in &decls[1..] {
                conflicts.push(NameConflict {
                    service: name.to_string(),
                    winner: winner.precedence.clone(),
                    loser: loser.precedence.clone(),
                    kind: ConflictKind::Older,
                });
            }
            let mut endpoints = winner.endpoints.clone();
            if let Some(found) = discovered.remove(name) {
                endpoints.extend(found.into_iter().cloned());
            }
            // Each further port is a service of its own, with the declaration's settings.
            for port in &winner.named_ports {
                let port_name = crate::model::port_service(name, &port.name);
                services.insert(
                    port_name.clone(),
                    Service {
                        name: port_name,
                        declared: true,
                        mtls: winner.mtls,
                        namespace: winner.namespace.clone(),
                        protocol: port.protocol,
                        port: Some(port.port),
                        preserve_header_case: winner.preserve_header_case
                            && !port.protocol.is_tcp(),
                        migration: winner.migration.clone(),
                        ..Service::default()
                    },
                );
            }
            services.insert(
                name.to_string(),
                Service {
                    name: name.to_string(),
                    declared: true,
                    mtls: winner.mtls,
                    dependencies: winner.dependencies.clone(),
                    endpoints: sorted(endpoints),
                    namespace: winner.namespace.clone(),
                    protocol: winner.protocol,
                    port: winner.port,
                    preserve_header_case: winner.preserve_header_case,
                    rate_limit: winner.rate_limit.clone(),
                    named_ports: winner.named_ports.clone(),
                    migration: winner.migration.clone(),
                },
            );
        }
        for (name, found) in discovered {
            owners.insert(name, Owner::Consul);
            services.insert(
                name.to_string(),
                Service {
                    name: name.to_string(),
                    endpoints: sorted(found.into_iter().cloned().collect()),
                    ..Service::default()
                },
            );
        }
        add_port_services(&mut services);
        let mut foreign = Vec::new();
        let access = access
            .into_iter()
            .filter_map(|(target, decls)| {
                let owner = owners.get(target).copied();
                let (kept, refused): (Vec<&AccessDeclaration>, Vec<&AccessDeclaration>) = decls
                    .into_iter()
                    .partition(|d| may_protect(d.namespace.as_deref(), owner, &self.consul_owners));
                for d in refused {
                    foreign.push(ForeignRule {
                        source: d.source.clone(),
                        target: target.to_string(),
                        owner: match owner {
                            Some(Owner::Namespace(ns)) => format!("namespace {ns}"),
                            Some(Owner::Operator) => "the operator's manifests".into(),
                            Some(Owner::Consul) | None => "Consul".into(),
                        },
                    });
                }
                (!kept.is_empty()).then(|| (target.to_string(), merge_access(target, &kept)))
            })
            .collect();
        (MeshState { services, access }, conflicts, foreign)
    }

    /// Why a MeshService of `namespace` may not declare `service`, if it may not: Consul
    /// has instances of it and `namespace` is not one of `--consul-services-owned-by` (what
    /// [`Self::build_full`] would report as [`ConflictKind::ConsulService`]).
    pub fn claim_refusal(&self, service: &str, namespace: &str) -> Option<String> {
        (!self.may_claim_consul(namespace) && self.consul_services().contains(service))
            .then(|| consul_claim_text(service, &self.consul_owners))
    }

    /// Whether MeshServices of `namespace` may declare services Consul knows.
    pub fn may_claim_consul(&self, namespace: &str) -> bool {
        may_claim(Some(namespace), &self.consul_owners)
    }

    /// The services Consul has instances of.
    pub fn consul_services(&self) -> std::collections::BTreeSet<&str> {
        self.sources
            .values()
            .flat_map(|m| m.values())
            .flatten()
            .filter_map(|o| match o {
                IndexObject::Endpoints(set)
                    if set.endpoints.iter().any(|e| e.origin == Origin::Consul) =>
                {
                    Some(set.service.as_str())
                }
                _ => None,
            })
            .collect()
    }

    /// Builds the mesh state.
    pub fn state(&self) -> MeshState {
        self.build().0
    }
}

/// Who declares a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner<'a> {
    /// A MeshService in this namespace.
    Namespace(&'a str),
    /// The operator's manifests (`--config-dir`).
    Operator,
    /// Nobody: only Consul's instances.
    Consul,
}

/// Whether a MeshService of `namespace` (none: the operator's manifests) may declare a
/// service Consul knows.
fn may_claim(namespace: Option<&str>, consul_owners: &[String]) -> bool {
    namespace.is_none_or(|ns| consul_owners.iter().any(|o| o == ns))
}

/// Whether an AccessRule from `rule_namespace` (none: the operator's manifests) may
/// protect a service owned by `owner` (none: unknown so far).
fn may_protect(
    rule_namespace: Option<&str>,
    owner: Option<Owner<'_>>,
    consul_owners: &[String],
) -> bool {
    match (rule_namespace, owner) {
        (None, _) | (_, None) => true,
        (Some(ns), Some(Owner::Namespace(owner))) => ns == owner,
        (Some(ns), Some(Owner::Operator | Owner::Consul)) => consul_owners.iter().any(|o| o == ns),
    }
}

/// Why a namespace may not declare `service`, a service of Consul.
pub fn consul_claim_text(service: &str, consul_owners: &[String]) -> String {
    let owners = if consul_owners.is_empty() {
        "none is set".to_string()
    } else {
        consul_owners.join(", ")
    };
    format!(
        "service {service:?} is a Consul service: only a MeshService of a namespace of --consul-services-owned-by ({owners}) may add instances to it or change its settings"
    )
}

/// Gives each port service (`NAME:PORT`) the instances of `NAME` that serve that port, on
/// that port. A port no MeshService declares (a Consul instance's `meshbridge-port-PORT`)
/// becomes a plain HTTP service of its own, with its service's mTLS mode; one declared and
/// served by nobody stays without instances.
fn add_port_services(services: &mut BTreeMap<String, Service>) {
    let mut found: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
    for service in services.values() {
        for e in &service.endpoints {
            for (port_name, &port) in &e.ports {
                found
                    .entry(crate::model::port_service(&service.name, port_name))
                    .or_default()
                    .push(Endpoint {
                        port,
                        ports: BTreeMap::new(),
                        ..e.clone()
                    });
            }
        }
    }
    for (name, endpoints) in found {
        // Guarded and moved as its service is: the same mTLS mode, names and migration.
        let (mtls, namespace, migration) = services
            .get(crate::model::access_target(&name))
            .map(|p| (p.mtls, p.namespace.clone(), p.migration.clone()))
            .unwrap_or_default();
        let service = services.entry(name.clone()).or_insert_with(|| Service {
            name,
            mtls,
            namespace,
            migration,
            ..Service::default()
        });
        service.endpoints = sorted(endpoints);
    }
}

fn sorted(mut endpoints: Vec<Endpoint>) -> Vec<Endpoint> {
    endpoints.sort();
    endpoints.dedup();
    endpoints
}

/// Merges the AccessRules of one target: the union of their rules; `deny` if any says so.
fn merge_access(target: &str, decls: &[&AccessDeclaration]) -> AccessPolicy {
    let mut rules: Vec<AccessRuleSet> = decls.iter().flat_map(|d| d.rules.clone()).collect();
    rules.sort();
    rules.dedup();
    let mut sources: Vec<String> = decls.iter().map(|d| d.source.clone()).collect();
    sources.sort();
    AccessPolicy {
        target: target.to_string(),
        action: if decls.iter().any(|d| d.action == AccessAction::Deny) {
            AccessAction::Deny
        } else {
            AccessAction::Log
        },
        rules,
        sources,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The objects of `yaml`, declared in `namespace` (none: the operator's manifests).
    fn objects(yaml: &str, namespace: Option<&str>) -> Vec<IndexObject> {
        let mut objects = crate::sources::files::parse_manifests("t.yaml", yaml).unwrap();
        for o in &mut objects {
            match o {
                IndexObject::Service(d) => d.namespace = namespace.map(str::to_string),
                IndexObject::Access(a) => {
                    a.namespace = namespace.map(str::to_string);
                    if let Some(ns) = namespace {
                        a.source = format!("{ns}/{}", a.target);
                    }
                }
                IndexObject::Endpoints(_) => {}
            }
        }
        objects
    }

    fn rule(target: &str) -> String {
        format!(
            "apiVersion: meshbridge.io/v1alpha1\nkind: AccessRule\nmetadata: {{name: r}}\nspec:\n  target: {target}\n  rules: [{{from: [\"*\"]}}]\n"
        )
    }

    const PAYMENTS: &str = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: payments}\nspec:\n  endpoints: [{address: 10.0.0.1, port: 80}]\n";

    /// Consul's instance of `service` (10.9.9.9:80).
    fn consul_instance(service: &str) -> Vec<IndexObject> {
        vec![IndexObject::Endpoints(EndpointSet {
            service: service.into(),
            endpoints: vec![Endpoint {
                address: "10.9.9.9".into(),
                port: 80,
                origin: Origin::Consul,
                datacenter: None,
                tags: Default::default(),
                weight: 1,
                healthy: true,
                ports: Default::default(),
            }],
        })]
    }

    #[test]
    fn further_ports_are_services_of_their_own_served_by_the_instances_that_name_them() {
        let orders = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: orders}\nspec:\n  mtls: strict\n  ports: [{port: 80}, {name: admin, port: 9090, protocol: grpc}]\n  endpoints: [{address: 10.0.0.1, port: 15006, ports: {admin: 15100}}, {address: 10.0.0.2, port: 15006}]\n";
        let mut index = Index::new();
        index.apply("config", "orders.yaml", objects(orders, None));
        let mut consul = consul_instance("orders");
        if let IndexObject::Endpoints(set) = &mut consul[0] {
            set.endpoints[0].ports =
                BTreeMap::from([("admin".into(), 15200), ("metrics".into(), 9102)]);
        }
        index.apply("consul", "orders", consul);
        let (state, _) = index.build();
        let admin = &state.services["orders:admin"];
        assert_eq!(admin.protocol, crate::model::AppProtocol::Grpc);
        assert_eq!(admin.port, Some(9090));
        let served: Vec<(&str, u16)> = admin
            .endpoints
            .iter()
            .map(|e| (e.address.as_str(), e.port))
            .collect();
        assert_eq!(served, [("10.0.0.1", 15100), ("10.9.9.9", 15200)]);
        // A port only Consul names: plain HTTP, guarded by its service's mTLS mode.
        let metrics = &state.services["orders:metrics"];
        assert_eq!(metrics.protocol, crate::model::AppProtocol::Http);
        assert_eq!(metrics.mtls, MtlsMode::Strict);
        assert_eq!(metrics.endpoints[0].port, 9102);
        assert_eq!(state.services["orders"].endpoints.len(), 3);
    }

    #[test]
    fn only_owner_namespaces_and_the_operator_declare_a_consul_service() {
        let mut index = Index::new();
        index.apply("consul:dc1", "payments", consul_instance("payments"));
        // A tenant claims Consul's payments with its own instance and mTLS.
        let claim = format!("{PAYMENTS}  mtls: strict\n");
        index.apply(
            "kubernetes",
            "tenant/payments",
            objects(&claim, Some("tenant")),
        );
        let (state, conflicts, _) = index.build_full();
        let payments = &state.services["payments"];
        let addresses: Vec<&str> = payments
            .endpoints
            .iter()
            .map(|e| e.address.as_str())
            .collect();
        assert_eq!(addresses, ["10.9.9.9"], "the tenant added an instance");
        assert_eq!(
            payments.mtls,
            MtlsMode::default(),
            "the tenant changed mtls"
        );
        assert!(!payments.declared);
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert_eq!(conflicts[0].kind, ConflictKind::ConsulService);
        assert_eq!(conflicts[0].winner, "Consul");
        assert!(index.claim_refusal("payments", "tenant").is_some());
        assert!(index.claim_refusal("orders", "tenant").is_none());

        // An owner namespace may (the migration of a Consul service to pods); the tenant
        // still may not, and loses to the owner.
        index.set_consul_owners(vec!["shop".into()]);
        index.apply("kubernetes", "shop/payments", objects(&claim, Some("shop")));
        let (state, conflicts, _) = index.build_full();
        let payments = &state.services["payments"];
        assert_eq!(payments.endpoints.len(), 2, "{:?}", payments.endpoints);
        assert_eq!(payments.mtls, MtlsMode::Strict);
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert_eq!(conflicts[0].kind, ConflictKind::ConsulService);
        assert!(index.claim_refusal("payments", "shop").is_none());

        // The operator's manifests may; a name Consul does not know is anyone's.
        let mut index = Index::new();
        index.apply("consul:dc1", "payments", consul_instance("payments"));
        index.apply("config", "payments.yaml", objects(&claim, None));
        index.apply(
            "kubernetes",
            "tenant/orders",
            objects(&PAYMENTS.replace("payments", "orders"), Some("tenant")),
        );
        let (state, conflicts, _) = index.build_full();
        assert!(conflicts.is_empty(), "{conflicts:?}");
        assert_eq!(state.services["payments"].mtls, MtlsMode::Strict);
        assert!(state.services["orders"].declared);
    }

    #[test]
    fn an_access_rule_protects_only_what_its_namespace_may_protect() {
        let mut index = Index::new();
        index.apply("kubernetes", "pay/payments", objects(PAYMENTS, Some("pay")));
        index.apply(
            "consul:dc1",
            "legacy",
            vec![IndexObject::Endpoints(EndpointSet {
                service: "legacy".into(),
                // An instance like any other (its origin does not matter here).
                endpoints: match &objects(PAYMENTS, None)[0] {
                    IndexObject::Service(d) => d.endpoints.clone(),
                    other => panic!("{other:?}"),
                },
            })],
        );
        // A tenant's `from: ["*"]` on payments and on a Consul service: ignored, reported.
        index.apply(
            "kubernetes",
            "tenant/1",
            objects(&rule("payments"), Some("tenant")),
        );
        index.apply(
            "kubernetes",
            "tenant/2",
            objects(&rule("legacy"), Some("tenant")),
        );
        // A rule for a service nobody knows yet is kept; so are the operator's.
        index.apply(
            "kubernetes",
            "tenant/3",
            objects(&rule("future"), Some("tenant")),
        );
        let (state, _, foreign) = index.build_full();
        assert!(!state.access.contains_key("payments"), "{:?}", state.access);
        assert!(!state.access.contains_key("legacy"));
        assert!(state.access.contains_key("future"));
        let owners: Vec<(&str, &str)> = foreign
            .iter()
            .map(|f| (f.target.as_str(), f.owner.as_str()))
            .collect();
        assert_eq!(
            owners,
            vec![("legacy", "Consul"), ("payments", "namespace pay")]
        );
        assert_eq!(foreign[1].source, "tenant/payments");

        // The owner's namespace, an owner of Consul's services, and the operator may.
        index.apply(
            "kubernetes",
            "pay/1",
            objects(&rule("payments"), Some("pay")),
        );
        index.set_consul_owners(vec!["tenant".into()]);
        let (state, _, foreign) = index.build_full();
        assert_eq!(state.access["payments"].sources, vec!["pay/payments"]);
        assert!(state.access.contains_key("legacy"));
        assert_eq!(foreign.len(), 1, "the tenant's payments rule stays foreign");
        index.apply("config", "ops.yaml", objects(&rule("payments"), None));
        let (state, _, _) = index.build_full();
        assert_eq!(state.access["payments"].sources.len(), 2);
    }
}
