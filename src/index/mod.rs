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
        for (name, mut decls) in declarations {
            decls.sort_by(|a, b| {
                a.precedence
                    .cmp(&b.precedence)
                    .then_with(|| format!("{a:?}").cmp(&format!("{b:?}")))
            });
            let winner = decls[0];
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
            services.insert(
                name.to_string(),
                Service {
                    name: name.to_string(),
                    endpoints: sorted(found.into_iter().cloned().collect()),
                    ..Service::default()
                },
            );
        }
        let access = access
            .into_iter()
            .map(|(target, decls)| (target.to_string(), merge_access(target, &decls)))
            .collect();
        (MeshState { services, access }, conflicts)
    }

    /// Builds the mesh state.
    pub fn state(&self) -> MeshState {
        self.build().0
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
