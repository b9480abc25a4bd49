//! `/api/state`: digests of the model — of the whole, and per service and per access
//! target — equal on two instances that see the same sources, so replicas can be compared
//! (see [`super::compare`]).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Query, State};
use serde::{Deserialize, Serialize};

use super::AdminState;
use super::views::StateView;
use crate::model::MeshState;

fn digest<T: Serialize>(value: &T) -> String {
    let text = serde_json::to_vec(value).unwrap_or_default();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&text))
}

/// What an access policy enforces, without where it was merged from (`sources` names
/// manifest paths, which differ between replicas reading the same manifests from different
/// directories).
fn access_digest(p: &crate::model::AccessPolicy) -> String {
    digest(&(&p.target, &p.action, &p.rules))
}

/// A digest per service and per access target.
struct Digests<'a> {
    services: BTreeMap<&'a str, String>,
    access: BTreeMap<&'a str, String>,
}

impl<'a> Digests<'a> {
    fn of(state: &'a MeshState) -> Self {
        Digests {
            services: state
                .services
                .iter()
                .map(|(n, s)| (n.as_str(), digest(s)))
                .collect(),
            access: state
                .access
                .iter()
                .map(|(t, p)| (t.as_str(), access_digest(p)))
                .collect(),
        }
    }

    /// The digest of the whole model, from the digests of its parts.
    fn whole(&self) -> String {
        digest(&(&self.services, &self.access))
    }
}

/// A digest of the whole model: equal on two instances that see the same sources.
pub fn state_digest(state: &MeshState) -> String {
    Digests::of(state).whole()
}

fn state_summary(state: &MeshState, instance: &str, digest: String) -> StateView {
    StateView {
        access_digests: None,
        access_policies: state.access.len(),
        digest,
        endpoints: state.services.values().map(|s| s.endpoints.len()).sum(),
        instance: instance.to_string(),
        service_digests: None,
        services: state.services.len(),
    }
}

/// The summary with a digest per service and per access target, for comparison.
pub fn state_detail(state: &MeshState, instance: &str) -> StateView {
    let digests = Digests::of(state);
    let owned = |m: BTreeMap<&str, String>| -> BTreeMap<String, String> {
        m.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    };
    let mut v = state_summary(state, instance, digests.whole());
    v.service_digests = Some(owned(digests.services));
    v.access_digests = Some(owned(digests.access));
    v
}

/// Query of `/api/state`.
#[derive(Deserialize)]
pub struct StateQuery {
    /// `true` (anything but `false` or `0`): the digests per service and access target too.
    detail: Option<String>,
}

/// `GET /api/state[?detail=true]`.
pub async fn mesh_state(
    State(s): State<AdminState>,
    Query(q): Query<StateQuery>,
) -> Json<StateView> {
    let state = s.cache.state();
    let detail = q.detail.is_some_and(|d| d != "false" && d != "0");
    Json(if detail {
        state_detail(&state, &s.peers.instance)
    } else {
        state_summary(&state, &s.peers.instance, state_digest(&state))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{AccessAction, AccessPolicy};

    fn state(sources: &[&str], action: AccessAction) -> MeshState {
        let mut s = MeshState::default();
        s.access.insert(
            "orders".into(),
            AccessPolicy {
                target: "orders".into(),
                action,
                sources: sources.iter().map(|x| x.to_string()).collect(),
                ..Default::default()
            },
        );
        s
    }

    #[test]
    fn digests_ignore_where_a_policy_came_from_but_not_what_it_enforces() {
        let a = state(&["/etc/a/mesh.yaml#1"], AccessAction::Deny);
        let b = state(&["/srv/b/mesh.yaml#1"], AccessAction::Deny);
        let c = state(&["/etc/a/mesh.yaml#1"], AccessAction::Log);
        assert_eq!(state_digest(&a), state_digest(&b));
        assert_ne!(state_digest(&a), state_digest(&c));
        assert_eq!(
            state_detail(&a, "x").access_digests,
            state_detail(&b, "y").access_digests
        );
    }
}
