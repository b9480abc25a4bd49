//! What differs between two mesh states, by service and by access target (pure).

use std::collections::{BTreeMap, BTreeSet};

use super::MeshState;

/// The model-level difference between two states (pure).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StateDiff {
    /// Services only in the new state.
    pub added: Vec<String>,
    /// Services only in the old state.
    pub removed: Vec<String>,
    /// Services in both, different.
    pub changed: Vec<String>,
    /// Access targets added, removed or different.
    pub access_changed: Vec<String>,
}

impl StateDiff {
    /// Services added, removed or changed.
    pub fn services(&self) -> impl Iterator<Item = &String> + Clone {
        self.added.iter().chain(&self.removed).chain(&self.changed)
    }

    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty()
            && self.removed.is_empty()
            && self.changed.is_empty()
            && self.access_changed.is_empty()
    }
}

/// Compares two states by service and by access target. Walks both maps once; a service
/// counts as changed when any of its settings or instances differ.
pub fn diff_states(old: &MeshState, new: &MeshState) -> StateDiff {
    let (added, removed, changed) = diff_maps(&old.services, &new.services);
    let (a, r, c) = diff_maps(&old.access, &new.access);
    let access_changed: BTreeSet<String> = a.into_iter().chain(r).chain(c).collect();
    StateDiff {
        added,
        removed,
        changed,
        access_changed: access_changed.into_iter().collect(),
    }
}

fn diff_maps<V: PartialEq>(
    old: &BTreeMap<String, V>,
    new: &BTreeMap<String, V>,
) -> (Vec<String>, Vec<String>, Vec<String>) {
    let added = new
        .keys()
        .filter(|k| !old.contains_key(*k))
        .cloned()
        .collect();
    let removed = old
        .keys()
        .filter(|k| !new.contains_key(*k))
        .cloned()
        .collect();
    let changed = new
        .iter()
        .filter(|(k, v)| old.get(*k).is_some_and(|o| o != *v))
        .map(|(k, _)| k.clone())
        .collect();
    (added, removed, changed)
}
