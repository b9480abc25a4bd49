//! The admin API on `--admin-addr`: health, readiness, metrics and JSON views of the model,
//! the sources, the connected proxies and their snapshots.

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use prost::Message;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::metrics::Metrics;
use crate::model::MeshState;
use crate::snapshot::{Resource, ResourceType};
use crate::sources::SourceStatuses;
use crate::xds::cache::SnapshotCache;
use crate::xds::registry::ProxyRegistry;

/// What the admin API reads.
#[derive(Clone)]
pub struct AdminState {
    /// Snapshots and the mesh state in force.
    pub cache: Arc<SnapshotCache>,
    /// Connected proxies.
    pub registry: Arc<ProxyRegistry>,
    /// Source health.
    pub sources: Arc<SourceStatuses>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Set once every source has synced and the state built from that sync is published.
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// Set when shutdown starts: `/readyz` fails while existing streams drain.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/services", get(services))
        .route("/api/proxies", get(proxies))
        .route("/api/sources", get(sources))
        .route("/api/snapshot", get(snapshot))
        .route("/api/state", get(mesh_state))
        .route("/api/access", get(access))
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> Response {
    let pending: Vec<String> = s
        .sources
        .list()
        .into_iter()
        .filter(|x| !x.synced)
        .map(|x| x.name)
        .collect();
    if s.draining.load(std::sync::atomic::Ordering::Acquire) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down: draining existing streams\n",
        )
            .into_response()
    } else if s.ready.load(std::sync::atomic::Ordering::Acquire) {
        (StatusCode::OK, "ready\n").into_response()
    } else if pending.is_empty() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "every source has synced; publishing the first complete state\n",
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("waiting for the first sync of: {}\n", pending.join(", ")),
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

#[derive(Serialize)]
struct InstanceView<'a> {
    address: &'a str,
    port: u16,
    origin: String,
    datacenter: Option<&'a str>,
    tags: Vec<&'a str>,
    weight: u32,
    healthy: bool,
}

/// `GET /api/services`.
pub fn services_view(state: &MeshState) -> Value {
    let list: Vec<Value> = state
        .services
        .values()
        .map(|s| {
            let instances: Vec<InstanceView<'_>> = s
                .endpoints
                .iter()
                .map(|e| InstanceView {
                    address: &e.address,
                    port: e.port,
                    origin: e.origin.to_string(),
                    datacenter: e.datacenter.as_deref(),
                    tags: e.tags.iter().map(String::as_str).collect(),
                    weight: e.weight,
                    healthy: e.healthy,
                })
                .collect();
            json!({
                "name": s.name,
                "declared": s.declared,
                "mtls": s.mtls,
                "dependencies": s.dependencies.iter().map(|d| d.target.to_string()).collect::<Vec<_>>(),
                "instances": instances,
            })
        })
        .collect();
    Value::Array(list)
}

/// `GET /api/access`: the merged access policy of every target, with the callers its rules
/// name split into known and unknown services.
pub fn access_view(state: &MeshState) -> Value {
    let list: Vec<Value> = state
        .access
        .values()
        .map(|p| {
            let (resolved, unknown) = state.resolve_callers(p.caller_names());
            json!({
                "target": p.target,
                "target_known": state.services.contains_key(&p.target),
                "action": p.action,
                "sources": p.sources,
                "rules": p.rules,
                "resolved_callers": resolved,
                "unknown_callers": unknown,
            })
        })
        .collect();
    Value::Array(list)
}

async fn access(State(s): State<AdminState>) -> Json<Value> {
    Json(access_view(&s.cache.state()))
}

async fn services(State(s): State<AdminState>) -> Json<Value> {
    Json(services_view(&s.cache.state()))
}

async fn proxies(State(s): State<AdminState>) -> Json<Value> {
    Json(serde_json::to_value(s.registry.list()).unwrap_or(Value::Null))
}

async fn sources(State(s): State<AdminState>) -> Json<Value> {
    Json(serde_json::to_value(s.sources.list()).unwrap_or(Value::Null))
}

#[derive(Deserialize)]
struct NodeQuery {
    node: Option<String>,
}

fn decoded(t: ResourceType, r: &Resource) -> String {
    let bytes = r.body.value.as_slice();
    let text = match t {
        ResourceType::Cluster => Cluster::decode(bytes).map(|m| format!("{m:#?}")),
        ResourceType::Endpoint => ClusterLoadAssignment::decode(bytes).map(|m| format!("{m:#?}")),
        ResourceType::Listener => Listener::decode(bytes).map(|m| format!("{m:#?}")),
        ResourceType::Route => RouteConfiguration::decode(bytes).map(|m| format!("{m:#?}")),
    };
    text.unwrap_or_else(|e| format!("<undecodable: {e}>"))
}

async fn snapshot(State(s): State<AdminState>, Query(q): Query<NodeQuery>) -> Response {
    let Some(node) = q.node.filter(|n| !n.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            "query parameter 'node' is required\n",
        )
            .into_response();
    };
    let Some((proxy, group)) = s.registry.find(&node) else {
        return (
            StatusCode::NOT_FOUND,
            format!("no connected proxy with node id {node:?}\n"),
        )
            .into_response();
    };
    let Some(snap) = s.cache.snapshot(&group) else {
        return (
            StatusCode::NOT_FOUND,
            format!("proxy {node:?} has no snapshot yet\n"),
        )
            .into_response();
    };
    let mut resources = serde_json::Map::new();
    for t in ResourceType::ALL {
        let list: Vec<Value> = snap
            .resources(t)
            .values()
            .map(|r| json!({"name": r.name, "version": r.version, "config": decoded(t, r)}))
            .collect();
        resources.insert(
            t.type_url().to_string(),
            json!({"version": snap.version(t), "resources": list}),
        );
    }
    Json(json!({
        "node": proxy.node,
        "service": proxy.service,
        "group": proxy.group,
        "warnings": snap.warnings,
        "resources": resources,
    }))
    .into_response()
}

/// A digest of the whole model: equal on two instances that see the same sources.
pub fn state_digest(state: &MeshState) -> String {
    let text = serde_json::to_vec(state).unwrap_or_default();
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&text))
}

async fn mesh_state(State(s): State<AdminState>) -> Json<Value> {
    let state = s.cache.state();
    Json(json!({
        "digest": state_digest(&state),
        "services": state.services.len(),
        "endpoints": state.services.values().map(|s| s.endpoints.len()).sum::<usize>(),
        "access_policies": state.access.len(),
    }))
}
