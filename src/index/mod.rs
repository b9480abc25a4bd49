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
    AccessAction, AccessPolicy, AccessRuleSet, Dependency, Endpoint, MeshState, MtlsMode, Service,
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

/// Two declarations claiming one service name: the loser is reported, not used.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NameConflict {
    /// The contested name.
    pub service: String,
    /// The declaration in force.
    pub winner: String,
    /// The declaration ignored.
    pub loser: String,
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
        for (name, mut decls) in declarations {
            decls.sort_by(|a, b| {
                a.precedence
                    .cmp(&b.precedence)
                    .then_with(|| format!("{a:?}").cmp(&format!("{b:?}")))
            });
            let winner = decls[0];
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
                });
            }
            let mut endpoints = winner.endpoints.clone();
            if let Some(found) = discovered.remove(name) {
                endpoints.extend(found.into_iter().cloned());
            }
            services.insert(
                name.to_string(),
                Service {
                    name: name.to_string(),
                    declared: true,
                    mtls: winner.mtls,
                    dependencies: winner.dependencies.clone(),
                    endpoints: sorted(endpoints),
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
