//! Status of MeshServices and AccessRules (pure): what meshbridge did with each resource,
//! in conditions an operator can read with `kubectl get -o yaml` / `kubectl describe`.
//!
//! Conditions follow the Kubernetes API conventions: `Synced` (the spec of this generation is
//! in force, or why not), `Ready` (the service has instances to send traffic to; the rule's
//! target exists) and, only when something is wrong, `Degraded` with a CamelCase reason. A
//! condition keeps its `lastTransitionTime` while its status stays the same, so recomputing an
//! unchanged status gives an equal value and nothing is written.

pub mod lease;
pub mod reconcile;

use std::collections::BTreeMap;

use crate::api::access_rule::AccessRuleStatus;
use crate::api::mesh_service::{Condition, MeshServiceStatus, MigrationStatus};
use crate::index::{ConflictKind, ForeignRule, NameConflict};
use crate::model::MeshState;
use crate::sources::kube::store::{ObjectKey, PodCounts, RuleEntry, ServiceEntry, precedence};

/// What a status is computed from, besides the object itself.
#[derive(Clone, Copy)]
pub struct View<'a> {
    /// The published mesh state.
    pub state: &'a MeshState,
    /// Name conflicts of the published state.
    pub conflicts: &'a [NameConflict],
    /// AccessRules ignored because their namespace may not protect their target.
    pub foreign: &'a [ForeignRule],
    /// RFC 3339 time stamped on conditions that change now.
    pub now: &'a str,
}

fn condition(type_: &str, ok: bool, reason: &str, message: String) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if ok { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message,
        last_transition_time: None,
    }
}

/// Stamps transition times: kept from `previous` while a condition's status is unchanged.
fn stamp(mut conditions: Vec<Condition>, previous: &[Condition], now: &str) -> Vec<Condition> {
    for c in &mut conditions {
        c.last_transition_time = previous
            .iter()
            .find(|p| p.type_ == c.type_ && p.status == c.status)
            .and_then(|p| p.last_transition_time.clone())
            .or_else(|| Some(now.to_string()));
    }
    conditions
}

fn errors_text(errors: &[crate::index::convert::FieldError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Seconds since the Unix epoch of an RFC 3339 time (0 when it does not parse).
pub(crate) fn unix_seconds(rfc3339: &str) -> i64 {
    rfc3339
        .parse::<k8s_openapi::jiff::Timestamp>()
        .map(|t| t.as_second())
        .unwrap_or(0)
}

fn rfc3339(seconds: i64) -> Option<String> {
    k8s_openapi::jiff::Timestamp::from_second(seconds)
        .ok()
        .map(|t| t.to_string())
}

fn percent(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".to_string(), |r| format!("{:.2}%", r * 100.0))
}

/// Where a MeshService's migration stands at `now`, given where it stood (`previous`) and the
/// error rates of the last interval (`check`): a plan takes its next step or rolls back (see
/// [`crate::model::advance_plan`]). Returns the status and, when rolled back, why.
pub fn migration_status(
    m: &crate::model::Migration,
    previous: Option<&MigrationStatus>,
    check: crate::model::PlanCheck,
    now: &str,
    order: Option<&str>,
) -> (MigrationStatus, Option<String>) {
    use crate::model::{Operator, PlanPhase, PlanProgress, advance_plan};
    let to = m.to.to_string();
    if m.steps.is_empty() {
        let status = MigrationStatus {
            phase: "Manual".to_string(),
            to,
            weight: m.weight,
            ..Default::default()
        };
        return (status, None);
    }
    let plan = m.plan_key();
    let progress = previous
        .filter(|p| p.plan == plan && p.to == to)
        .and_then(|p| {
            Some(PlanProgress {
                phase: match p.phase.as_str() {
                    "Progressing" => PlanPhase::Progressing,
                    "RolledBack" => PlanPhase::RolledBack,
                    "Complete" => PlanPhase::Complete,
                    "Paused" => PlanPhase::Paused,
                    _ => return None,
                },
                step: p.step? as usize,
                weight: p.weight,
                step_started: unix_seconds(p.step_started_at.as_deref()?),
                resumed: (!p.resumed.is_empty()).then(|| p.resumed.clone()),
            })
        });
    let now_seconds = unix_seconds(now);
    let operator = order.map(Operator::parse);
    let (next, rolled_back) = advance_plan(
        m,
        progress.as_ref(),
        check,
        now_seconds,
        operator.as_ref().and_then(|o| o.as_ref().ok()),
    );
    let decided = progress.as_ref() != Some(&next);
    let error_rates = if decided {
        BTreeMap::from([
            ("new".to_string(), percent(check.new)),
            ("old".to_string(), percent(check.old)),
        ])
    } else {
        previous.map(|p| p.error_rates.clone()).unwrap_or_default()
    };
    let mut message = match (&rolled_back, next.phase) {
        (Some(reason), _) => reason.clone(),
        (None, PlanPhase::RolledBack) => previous.map(|p| p.message.clone()).unwrap_or_default(),
        (None, PlanPhase::Complete) => format!("every step taken: {}% to {to}", next.weight),
        (None, PlanPhase::Paused) => format!(
            "paused by an operator (meshbridge.io/migration: pause) at step {} of {}: {}% to {to}",
            next.step + 1,
            m.steps.len(),
            next.weight
        ),
        (None, PlanPhase::Progressing) => format!(
            "step {} of {}: {}% to {to}",
            next.step + 1,
            m.steps.len(),
            next.weight
        ),
    };
    if let Some(Err(e)) = &operator {
        message.push_str(&format!(
            "; annotation meshbridge.io/migration ignored: {e}"
        ));
    }
    let status = MigrationStatus {
        phase: format!("{:?}", next.phase),
        to,
        plan,
        step: u32::try_from(next.step).ok(),
        weight: next.weight,
        step_started_at: rfc3339(next.step_started),
        next_step_at: (next.phase == PlanPhase::Progressing)
            .then(|| rfc3339(next.step_started + m.interval.as_secs() as i64))
            .flatten(),
        error_rates,
        message,
        resumed: next.resumed.clone().unwrap_or_default(),
    };
    (status, rolled_back)
}

/// The status a MeshService should have. `check` holds the error rates of its migration's
/// last interval (from the load reports).
#[allow(clippy::too_many_lines)] // one block per condition, in the order they appear in the status.
pub fn mesh_service_status(
    entry: &ServiceEntry,
    pods: &PodCounts,
    registration_error: Option<&str>,
    view: View<'_>,
    previous: Option<&MeshServiceStatus>,
    check: crate::model::PlanCheck,
) -> MeshServiceStatus {
    let object = &entry.object;
    let generation = object.metadata.generation;
    let in_force = entry.in_force.as_ref();
    let name = in_force
        .and_then(crate::index::convert::service_name)
        .unwrap_or_default();
    let conflict = in_force.and_then(|o| {
        let mine = precedence(o);
        view.conflicts
            .iter()
            .find(|c| c.service == name && c.loser == mine)
    });
    let mut conditions = Vec::new();
    let mut degraded: Option<(&str, String)> = None;
    if entry.errors.is_empty() {
        conditions.push(condition(
            "Synced",
            true,
            "Applied",
            format!("generation {} is in force", generation.unwrap_or(0)),
        ));
    } else {
        let kept = match in_force {
            Some(o) => format!(
                "; generation {} stays in force",
                o.metadata.generation.unwrap_or(0)
            ),
            None => "; nothing is in force".to_string(),
        };
        let text = errors_text(&entry.errors);
        conditions.push(condition(
            "Synced",
            false,
            "InvalidSpec",
            format!("{text}{kept}"),
        ));
        degraded = Some(("InvalidSpec", text));
    }
    let mut instances = BTreeMap::new();
    let service = view
        .state
        .services
        .get(&name)
        .filter(|_| conflict.is_none());
    if let Some(service) = service {
        for e in service.healthy_endpoints() {
            *instances.entry(e.origin.to_string()).or_insert(0u32) += 1;
        }
    }
    let total: u32 = instances.values().sum();
    let ready = if let Some(c) = conflict {
        let (reason, text) = match c.kind {
            ConflictKind::Older => (
                "NameConflict",
                format!(
                    "service name {:?} is claimed by an older declaration ({}); this one is not used",
                    c.service, c.winner
                ),
            ),
            ConflictKind::ConsulService => (
                "ConsulService",
                format!(
                    "service {:?} is a Consul service, and this namespace is not one of --consul-services-owned-by: this declaration is not used (neither its instances nor its settings)",
                    c.service
                ),
            ),
        };
        degraded = Some((reason, text.clone()));
        condition("Ready", false, reason, text)
    } else if in_force.is_none() {
        condition(
            "Ready",
            false,
            "InvalidSpec",
            "no valid spec has been seen".to_string(),
        )
    } else if total > 0 {
        let by_origin = instances
            .iter()
            .map(|(o, n)| format!("{o} {n}"))
            .collect::<Vec<_>>()
            .join(", ");
        condition(
            "Ready",
            true,
            "InstancesAvailable",
            format!("{total} healthy instance(s): {by_origin}"),
        )
    } else {
        condition(
            "Ready",
            false,
            "NoInstances",
            format!(
                "no healthy instance ({} selected pod(s) not ready)",
                pods.not_ready
            ),
        )
    };
    conditions.push(ready);
    if degraded.is_none() && pods.no_port > 0 {
        degraded = Some((
            "NoPort",
            format!(
                "{} ready pod(s) have no port: add spec.ports or inject the sidecar",
                pods.no_port
            ),
        ));
    }
    if degraded.is_none()
        && let Some(e) = registration_error
    {
        degraded = Some(("RegistrationFailed", format!("Consul registration: {e}")));
    }
    let migration = service.and_then(|s| s.migration.as_ref()).map(|m| {
        migration_status(
            m,
            previous.and_then(|p| p.migration.as_ref()),
            check,
            view.now,
            crate::api::annotations::value(
                entry.object.metadata.annotations.as_ref(),
                crate::api::annotations::MIGRATION,
            ),
        )
        .0
    });
    if let Some(m) = migration.as_ref().filter(|m| m.phase == "RolledBack")
        && degraded.is_none()
    {
        degraded = Some(("MigrationRolledBack", m.message.clone()));
    }
    if let Some((reason, message)) = degraded {
        conditions.push(condition("Degraded", true, reason, message));
    }
    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    MeshServiceStatus {
        observed_generation: generation,
        conditions: stamp(conditions, previous_conditions, view.now),
        instances,
        migration,
    }
}

/// The status an AccessRule should have.
pub fn access_rule_status(
    key: &ObjectKey,
    entry: &RuleEntry,
    view: View<'_>,
    previous: Option<&AccessRuleStatus>,
) -> AccessRuleStatus {
    let object = &entry.object;
    let (resolved, unknown) = view.state.resolve_callers(
        object
            .spec
            .rules
            .iter()
            .flat_map(|r| r.from.iter().map(String::as_str)),
    );
    let mut conditions = Vec::new();
    if entry.errors.is_empty() {
        conditions.push(condition(
            "Synced",
            true,
            "Applied",
            format!(
                "generation {} is in force",
                object.metadata.generation.unwrap_or(0)
            ),
        ));
    } else {
        let text = errors_text(&entry.errors);
        let kept = if entry.in_force.is_some() {
            "; the last valid spec stays in force"
        } else {
            "; nothing is in force"
        };
        conditions.push(condition(
            "Synced",
            false,
            "InvalidSpec",
            format!("{text}{kept}"),
        ));
    }
    let target = &object.spec.target;
    let target_known = view.state.services.contains_key(target);
    conditions.push(if target_known {
        condition(
            "Ready",
            true,
            "TargetFound",
            format!("protects service {target:?}"),
        )
    } else {
        condition(
            "Ready",
            false,
            "UnknownTarget",
            format!("no service named {target:?} is known (from {key})"),
        )
    });
    let key_text = key.to_string();
    if !entry.errors.is_empty() {
        conditions.push(condition(
            "Degraded",
            true,
            "InvalidSpec",
            errors_text(&entry.errors),
        ));
    } else if let Some(f) = view.foreign.iter().find(|f| f.source == key_text) {
        conditions.push(condition(
            "Degraded",
            true,
            "ForeignTarget",
            format!(
                "ignored: service {target:?} belongs to {}; an AccessRule protects only a service declared in its own namespace (or, for Consul's services, from a namespace of --consul-services-owned-by)",
                f.owner
            ),
        ));
    } else if !unknown.is_empty() {
        conditions.push(condition(
            "Degraded",
            true,
            "UnknownCallers",
            format!("no known service matches {}", unknown.join(", ")),
        ));
    }
    let previous_conditions = previous.map(|p| p.conditions.as_slice()).unwrap_or(&[]);
    AccessRuleStatus {
        observed_generation: object.metadata.generation,
        conditions: stamp(conditions, previous_conditions, view.now),
        resolved_callers: resolved,
        unknown_callers: unknown,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::Index;
    use crate::index::pods::pod_info;
    use crate::sources::kube::store::KubeStore;
    use serde_json::json;

    fn store_with(spec: serde_json::Value, ready_pods: usize) -> (KubeStore, ObjectKey) {
        let mut store = KubeStore::new();
        store.apply_service(
            serde_json::from_value(json!({
                "metadata": {"name": "orders", "namespace": "shop", "generation": 3,
                             "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": spec,
            }))
            .unwrap(),
        );
        for i in 0..ready_pods {
            store.apply_pod(pod_info(
                &serde_json::from_value(json!({
                    "metadata": {"name": format!("o{i}"), "namespace": "shop", "labels": {"app": "orders"}},
                    "status": {"phase": "Running", "podIP": format!("10.0.0.{i}"),
                               "conditions": [{"type": "Ready", "status": "True"}]},
                }))
                .unwrap(),
            ));
        }
        (
            store,
            ObjectKey {
                namespace: "shop".into(),
                name: "orders".into(),
            },
        )
    }

    fn state_of(store: &KubeStore) -> (MeshState, Vec<NameConflict>) {
        let mut index = Index::new();
        index.reset("kubernetes", store.all_index_objects());
        index.build()
    }

    fn status_of(
        store: &KubeStore,
        key: &ObjectKey,
        now: &str,
        previous: Option<&MeshServiceStatus>,
    ) -> MeshServiceStatus {
        let (state, conflicts) = state_of(store);
        let view = View {
            state: &state,
            conflicts: &conflicts,
            foreign: &[],
            now,
        };
        mesh_service_status(
            store.service(key).unwrap(),
            &store.pod_counts(key),
            None,
            view,
            previous,
            Default::default(),
        )
    }

    fn find<'a>(s: &'a MeshServiceStatus, t: &str) -> Option<&'a Condition> {
        s.conditions.iter().find(|c| c.type_ == t)
    }

    #[test]
    fn a_healthy_service_is_synced_and_ready_with_counts_by_origin() {
        let (store, key) = store_with(
            json!({"selector": {"app": "orders"}, "ports": [{"port": 80}],
                                             "endpoints": [{"address": "10.1.1.1", "port": 9000}]}),
            2,
        );
        let s = status_of(&store, &key, "t1", None);
        assert_eq!(s.observed_generation, Some(3));
        assert_eq!(
            s.instances,
            BTreeMap::from([("config".to_string(), 1), ("kubernetes".to_string(), 2)])
        );
        assert_eq!(find(&s, "Ready").unwrap().status, "True");
        assert_eq!(find(&s, "Synced").unwrap().reason, "Applied");
        assert!(find(&s, "Degraded").is_none());
    }

    #[test]
    fn recomputing_an_unchanged_status_gives_an_equal_value() {
        let (store, key) = store_with(
            json!({"selector": {"app": "orders"}, "ports": [{"port": 80}]}),
            1,
        );
        let first = status_of(&store, &key, "t1", None);
        let again = status_of(&store, &key, "t2", Some(&first));
        assert_eq!(
            first, again,
            "times are kept while nothing changes, so nothing is written"
        );
        let (store, key) = store_with(
            json!({"selector": {"app": "orders"}, "ports": [{"port": 80}]}),
            0,
        );
        let changed = status_of(&store, &key, "t3", Some(&first));
        let ready = find(&changed, "Ready").unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "NoInstances")
        );
        assert_eq!(ready.last_transition_time.as_deref(), Some("t3"));
        assert_eq!(
            find(&changed, "Synced")
                .unwrap()
                .last_transition_time
                .as_deref(),
            Some("t1")
        );
    }

    #[test]
    fn ready_pods_without_a_port_make_the_service_degraded() {
        let (store, key) = store_with(json!({"selector": {"app": "orders"}}), 2);
        let s = status_of(&store, &key, "t", None);
        let d = find(&s, "Degraded").unwrap();
        assert_eq!(d.reason, "NoPort");
        assert!(d.message.starts_with("2 ready pod(s)"), "{}", d.message);
    }

    #[test]
    fn an_access_rule_reports_unknown_callers_and_target() {
        let (mut store, _) = store_with(
            json!({"selector": {"app": "orders"}, "ports": [{"port": 80}]}),
            1,
        );
        store.apply_rule(
            serde_json::from_value(json!({
                "metadata": {"name": "r", "namespace": "shop", "generation": 1},
                "spec": {"target": "payments", "rules": [{"from": ["orders", "ghost", "ord*", "*"]}]},
            }))
            .unwrap(),
        );
        let (state, conflicts) = state_of(&store);
        let key = ObjectKey {
            namespace: "shop".into(),
            name: "r".into(),
        };
        let view = View {
            state: &state,
            conflicts: &conflicts,
            foreign: &[],
            now: "t",
        };
        let s = access_rule_status(&key, store.rule(&key).unwrap(), view, None);
        assert_eq!(s.unknown_callers, vec!["ghost".to_string()]);
        assert_eq!(
            s.resolved_callers,
            vec!["*".to_string(), "ord*".to_string(), "orders".to_string()]
        );
        let ready = s.conditions.iter().find(|c| c.type_ == "Ready").unwrap();
        assert_eq!(ready.reason, "UnknownTarget");
        let degraded = s.conditions.iter().find(|c| c.type_ == "Degraded").unwrap();
        assert_eq!(degraded.reason, "UnknownCallers");
    }
}
