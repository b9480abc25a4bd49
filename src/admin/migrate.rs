//! `POST /api/services/{name}/migration?order=ORDER`: an operator's order on a service's
//! migration plan (`meshbridge ctl migrate NAME ORDER`).
//!
//! The order is written where every replica and every future leader sees it: the annotation
//! `meshbridge.io/migration` on the MeshService that declares the service (a merge patch of
//! that one annotation), the same standing order `kubectl annotate` gives. The leader's
//! status reconciler carries it out and records it in `status.migration` (see
//! [`crate::model::advance_plan`]). `resume` is written as `resume@TIME`, so the leader tells
//! a new resume from one already carried out.
//!
//! Audited like every action of this API (`/api/audit`, log target `meshbridge::audit`),
//! refused or not, and recorded as a Kubernetes Event on the MeshService naming who gave it,
//! so the cluster keeps the record whichever replica took the call.

use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use kube::Resource as _;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use serde::Deserialize;
use serde_json::json;

use super::AdminState;
use super::changes::AuditRecord;
use super::diagnostics::ApiError;
use super::views::{MigrationOrderView, PlanView};
use crate::api::MeshService;
use crate::api::annotations::MIGRATION;
use crate::model::MeshState;
use crate::sources::kube::{KubeStore, ObjectKey};

/// The orders an operator may give.
pub const ORDERS: [&str; 4] = ["pause", "resume", "rollback", "promote"];

/// Field manager of the annotation write.
const FIELD_MANAGER: &str = "meshbridge-admin";

/// Where orders go: the Kubernetes API, the store that tells which MeshService declares a
/// service, and the Event recorder.
pub struct OrderWriter {
    client: kube::Client,
    store: Arc<Mutex<KubeStore>>,
    recorder: Recorder,
}

impl OrderWriter {
    /// A writer; `identity` names this replica in Events.
    pub fn new(client: kube::Client, store: Arc<Mutex<KubeStore>>, identity: &str) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.to_string(),
            instance: Some(identity.to_string()),
        };
        OrderWriter {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            store,
        }
    }

    fn store(&self) -> std::sync::MutexGuard<'_, KubeStore> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where `service`'s plan stands and the standing order on it, as the store last saw its
    /// MeshService.
    pub fn plan_of(&self, service: &str) -> (Option<PlanView>, Option<String>) {
        let store = self.store();
        store
            .declaring(crate::model::access_target(service))
            .map(|(_, entry)| plan_and_order(&entry.object))
            .unwrap_or_default()
    }
}

/// Where a MeshService's plan stands (its `status.migration`; none without steps) and the
/// standing order it carries.
fn plan_and_order(object: &MeshService) -> (Option<PlanView>, Option<String>) {
    let plan = object
        .status
        .as_ref()
        .and_then(|s| s.migration.as_ref())
        .filter(|m| m.phase != "Manual")
        .map(PlanView::from);
    let order = crate::api::annotations::value(object.metadata.annotations.as_ref(), MIGRATION)
        .map(str::to_string);
    (plan, order)
}

/// The annotation value of `order` given at `now` (RFC 3339).
pub fn annotation_for(order: &str, now: &str) -> Result<String, String> {
    match order {
        "pause" | "rollback" | "promote" => Ok(order.to_string()),
        "resume" => Ok(format!("resume@{now}")),
        other => Err(format!(
            "order {other:?} is not one of {}",
            ORDERS.join(", ")
        )),
    }
}

/// The MeshService an order on `service` is written on.
#[derive(Debug)]
pub struct OrderTarget {
    /// Its key.
    pub key: ObjectKey,
    /// The object as seen (for the Event's reference).
    pub object: MeshService,
    /// The standing order it carries.
    pub previous: Option<String>,
    /// Where its plan stands.
    pub plan: Option<PlanView>,
}

/// Finds the MeshService that an order on `service` (or a port of it, `NAME:PORT`) is
/// written on, or why none can be: the service is unknown (404), runs no plan, or no
/// MeshService of the Kubernetes source declares it (409).
pub fn order_target(
    state: &MeshState,
    store: &KubeStore,
    service: &str,
) -> Result<OrderTarget, ApiError> {
    let base = crate::model::access_target(service);
    let Some(s) = state.services.get(base) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no service named {base:?} in the mesh"),
        ));
    };
    let conflict = |m: String| ApiError(StatusCode::CONFLICT, m);
    match &s.migration {
        None => {
            return Err(conflict(format!(
                "service {base:?} declares no migration (spec.migration)"
            )));
        }
        Some(m) if m.steps.is_empty() => {
            return Err(conflict(format!(
                "service {base:?} has no migration plan (spec.migration.steps): its weight, {}, is set by hand in spec.migration.weight",
                m.weight
            )));
        }
        Some(_) => {}
    }
    let Some((key, entry)) = store.declaring(base) else {
        return Err(conflict(format!(
            "no MeshService of the Kubernetes source declares {base:?}"
        )));
    };
    let (plan, previous) = plan_and_order(&entry.object);
    Ok(OrderTarget {
        key: key.clone(),
        previous,
        object: entry.object.clone(),
        plan,
    })
}

/// Query of an order.
#[derive(Deserialize)]
pub struct OrderQuery {
    order: Option<String>,
}

/// `POST /api/services/{name}/migration?order=pause|resume|rollback|promote`.
pub async fn order(
    State(s): State<AdminState>,
    Path(name): Path<String>,
    Query(q): Query<OrderQuery>,
    from: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    principal: Option<axum::Extension<super::auth::Principal>>,
    headers: HeaderMap,
) -> Result<Json<MigrationOrderView>, ApiError> {
    let order = q.order.unwrap_or_default();
    let record = AuditRecord {
        action: "migration",
        who: super::changes::who(principal, &headers),
        from: from.map(|f| f.0.0.to_string()),
        node: String::new(),
        service: Some(crate::xds::loggable(&name, 256)),
        detail: format!("order={}", crate::xds::loggable(&order, 64)),
    };
    let checked = check(&s, &name, &order, &headers);
    let (writer, target, annotation) = match checked {
        Ok(x) => x,
        Err(e) => {
            record.audit(&s.audit, "-", &e.1);
            return Err(e);
        }
    };
    // The write and its record complete even if the caller goes away.
    let task = tokio::spawn(async move {
        let via = target.key.to_string();
        let outcome = write(&writer, &target, &annotation, record.who.as_deref()).await;
        let result = match &outcome {
            Ok(()) => "ok".to_string(),
            Err(e) => e.1.clone(),
        };
        record.audit(&s.audit, &via, &result);
        outcome.map(|()| MigrationOrderView {
            annotation,
            object: via,
            order,
            plan: target.plan,
            previous: target.previous,
            service: crate::model::access_target(&name).to_string(),
        })
    });
    let view = task.await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("migration order interrupted: {e}"),
        )
    })??;
    Ok(Json(view))
}

/// Validates an order: the writer, the MeshService and the annotation value.
fn check(
    s: &AdminState,
    name: &str,
    order: &str,
    headers: &HeaderMap,
) -> Result<(Arc<OrderWriter>, OrderTarget, String), ApiError> {
    if let Some(why) = super::diagnostics::cross_site(headers) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("cross-site request refused ({why})"),
        ));
    }
    let annotation = annotation_for(order, &crate::status::reconcile::now_rfc3339())
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e))?;
    let Some(writer) = s.orders.clone() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            "migration plans run only with the Kubernetes source (--kube): this instance has none"
                .into(),
        ));
    };
    let target = order_target(&s.cache.state(), &writer.store(), name)?;
    Ok((writer, target, annotation))
}

/// Writes the annotation, then records an Event naming who gave the order.
async fn write(
    writer: &OrderWriter,
    target: &OrderTarget,
    annotation: &str,
    who: Option<&str>,
) -> Result<(), ApiError> {
    let api: Api<MeshService> = Api::namespaced(writer.client.clone(), &target.key.namespace);
    let patch = json!({"metadata": {"annotations": {MIGRATION: annotation}}});
    let params = PatchParams {
        field_manager: Some(FIELD_MANAGER.to_string()),
        ..PatchParams::default()
    };
    api.patch(&target.key.name, &params, &Patch::Merge(&patch))
        .await
        .map_err(|e| {
            let status = match &e {
                kube::Error::Api(a) if a.code == 404 => StatusCode::NOT_FOUND,
                kube::Error::Api(a) if a.code == 403 => StatusCode::FORBIDDEN,
                _ => StatusCode::BAD_GATEWAY,
            };
            ApiError(
                status,
                format!(
                    "writing {MIGRATION}={annotation} on MeshService {}: {e}",
                    target.key
                ),
            )
        })?;
    let event = Event {
        type_: EventType::Normal,
        reason: "MigrationOrder".into(),
        note: Some(format!(
            "{MIGRATION}={annotation} set by {} through the admin API",
            who.unwrap_or("an unnamed caller")
        )),
        action: "MigrationOrder".into(),
        secondary: None,
    };
    if let Err(e) = writer
        .recorder
        .publish(&event, &target.object.object_ref(&()))
        .await
    {
        tracing::debug!(error = %e, "cannot record an Event");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mesh_service(name: &str, ns: &str, created: &str, spec: serde_json::Value) -> MeshService {
        serde_json::from_value(json!({
            "apiVersion": "meshbridge.io/v1alpha1", "kind": "MeshService",
            "metadata": {"name": name, "namespace": ns, "generation": 1,
                         "creationTimestamp": created,
                         "annotations": {MIGRATION: "pause"}},
            "spec": spec,
        }))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn orders_are_written_on_the_meshservice_that_wins_the_name() {
        let plan = json!({"ports": [{"port": 8080}],
            "migration": {"to": "kubernetes", "steps": [5, 50, 100], "interval": "1m"}});
        let mut store = KubeStore::new();
        store.apply_service(mesh_service(
            "billing",
            "b",
            "2026-01-02T00:00:00Z",
            plan.clone(),
        ));
        store.apply_service(mesh_service("billing", "a", "2026-01-01T00:00:00Z", plan));
        store.apply_service(mesh_service(
            "orders",
            "a",
            "2026-01-01T00:00:00Z",
            json!({"migration": {"to": "kubernetes", "weight": 25}}),
        ));
        let mut index = crate::index::Index::new();
        for (key, objects) in store.all_index_objects() {
            index.apply("kubernetes", &key, objects);
        }
        let state = index.state();

        let t = order_target(&state, &store, "billing").unwrap_or_else(|e| panic!("{}", e.1));
        assert_eq!(t.key.to_string(), "a/billing", "the oldest claim wins");
        assert_eq!(t.previous.as_deref(), Some("pause"));
        // A port of the service: its MeshService.
        let on_port = order_target(&state, &store, "billing:admin");
        assert_eq!(
            on_port.map(|t| t.key.to_string()).ok(),
            Some("a/billing".into())
        );

        let e = order_target(&state, &store, "orders").unwrap_err();
        assert_eq!(e.0, StatusCode::CONFLICT);
        assert!(e.1.contains("set by hand") && e.1.contains("25"), "{}", e.1);
        let e = order_target(&state, &store, "nowhere").unwrap_err();
        assert_eq!(e.0, StatusCode::NOT_FOUND);

        assert_eq!(annotation_for("pause", "T").as_deref(), Ok("pause"));
        assert_eq!(annotation_for("resume", "T").as_deref(), Ok("resume@T"));
        assert!(
            annotation_for("faster", "T")
                .unwrap_err()
                .contains("pause, resume")
        );
        // Every order written parses as the leader reads it.
        for o in ORDERS {
            let value = annotation_for(o, "2026-12-07T12:00:00Z").unwrap_or_default();
            assert!(crate::model::Operator::parse(&value).is_ok(), "{value}");
        }
    }
}
