//! Envoy diagnostics through the control plane: a connected proxy's config dump, stats and
//! clusters, its log level, and the difference between what meshbridge sent it and what it
//! runs.
//!
//! The address is never the caller's to choose: it is the connected stream's peer address
//! with the port the proxy announced (`diagnostics_port`, else `admin_port`), so the admin
//! API can only reach proxies that are connected right now. Every request has a time limit
//! and an unreachable Envoy is a 502 naming its address.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::AdminState;
use super::changes::{AuditEntry, requester};
use crate::metrics::labels;
use crate::snapshot::{ResourceType, Snapshot};
use crate::xds::registry::ProxyStatus;

/// An error answer: status and a message naming what was wrong.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({"error": self.1}))).into_response()
    }
}

/// Levels Envoy's `/logging` accepts.
pub const LEVELS: [&str; 8] = [
    "trace", "debug", "info", "warning", "warn", "error", "critical", "off",
];

/// The connected proxy `node` and its admin address.
fn target(s: &AdminState, node: &str) -> Result<(ProxyStatus, String), ApiError> {
    let Some((proxy, _)) = s.registry.find(node) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no connected proxy with node id {node:?}"),
        ));
    };
    let Some(admin) = proxy.admin.clone() else {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "proxy {node:?} announced no admin_port or diagnostics_port in its node metadata (or its address is unknown), so meshbridge cannot reach its admin interface"
            ),
        ));
    };
    Ok((proxy, admin))
}

/// One request to an Envoy admin interface; the body as text, or an error naming the address.
async fn envoy_request(
    s: &AdminState,
    action: &'static str,
    admin: &str,
    method: reqwest::Method,
    path: &str,
    query: &[(String, String)],
) -> Result<(StatusCode, String, String), ApiError> {
    let url = format!("http://{admin}{path}");
    let result = s
        .http
        .request(method, &url)
        .query(query)
        .timeout(s.diagnostics_timeout)
        .send()
        .await;
    let outcome = match result {
        Ok(resp) => {
            let status = StatusCode::from_u16(resp.status().as_u16())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let content_type = resp
                .headers()
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("text/plain")
                .to_string();
            match resp.text().await {
                Ok(body) => Ok((status, content_type, body)),
                Err(e) => Err(unreachable(admin, path, &e, s.diagnostics_timeout)),
            }
        }
        Err(e) => Err(unreachable(admin, path, &e, s.diagnostics_timeout)),
    };
    let result = match &outcome {
        Ok((status, _, _)) if status.is_success() => "ok",
        Ok(_) => "refused",
        Err(_) => "unreachable",
    };
    s.metrics
        .diagnostics_requests
        .get_or_create(&labels(&[("action", action), ("result", result)]))
        .inc();
    outcome
}

fn unreachable(admin: &str, path: &str, e: &reqwest::Error, limit: Duration) -> ApiError {
    let why = if e.is_timeout() {
        format!("no answer within {} ms", limit.as_millis())
    } else if e.is_connect() {
        "connection failed (is the admin interface or diagnostics listener reachable from the control plane?)".to_string()
    } else {
        e.to_string()
    };
    ApiError(
        StatusCode::BAD_GATEWAY,
        format!("Envoy admin at {admin} ({path}): {why}"),
    )
}

fn passthrough(status: StatusCode, content_type: String, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

/// Query parameters forwarded to Envoy, by name.
fn forwarded(q: &BTreeMap<String, String>, allowed: &[&str]) -> Vec<(String, String)> {
    q.iter()
        .filter(|(k, _)| allowed.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `GET /api/proxies/{node}/config_dump`: Envoy's own config dump, verbatim.
pub async fn config_dump(
    State(s): State<AdminState>,
    Path(node): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let (_, admin) = target(&s, &node)?;
    let query = forwarded(&q, &["resource", "mask", "name_regex", "include_eds"]);
    let (status, ct, body) = envoy_request(
        &s,
        "config_dump",
        &admin,
        reqwest::Method::GET,
        "/config_dump",
        &query,
    )
    .await?;
    Ok(passthrough(status, ct, body))
}

/// `GET /api/proxies/{node}/stats`: Envoy's stats, verbatim (`filter`, `format`, `usedonly`).
pub async fn stats(
    State(s): State<AdminState>,
    Path(node): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let (_, admin) = target(&s, &node)?;
    if let Some(f) = q.get("filter")
        && let Err(e) = regex::Regex::new(f)
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("filter {f:?} is not a regular expression: {e}"),
        ));
    }
    let query = forwarded(&q, &["filter", "format", "usedonly", "type"]);
    let (status, ct, body) =
        envoy_request(&s, "stats", &admin, reqwest::Method::GET, "/stats", &query).await?;
    Ok(passthrough(status, ct, body))
}

/// `GET /api/proxies/{node}/clusters`: Envoy's clusters and their hosts, verbatim.
pub async fn clusters(
    State(s): State<AdminState>,
    Path(node): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let (_, admin) = target(&s, &node)?;
    let query = forwarded(&q, &["format"]);
    let (status, ct, body) = envoy_request(
        &s,
        "clusters",
        &admin,
        reqwest::Method::GET,
        "/clusters",
        &query,
    )
    .await?;
    Ok(passthrough(status, ct, body))
}

/// Query of a log level change.
#[derive(Deserialize)]
pub struct LevelQuery {
    level: Option<String>,
    logger: Option<String>,
}

/// `POST /api/proxies/{node}/logging?level=LEVEL[&logger=NAME]`: changes the proxy's log
/// level (every logger, or one). Audited: logged with who asked, and kept in `/api/audit`.
pub async fn logging(
    State(s): State<AdminState>,
    Path(node): Path<String>,
    Query(q): Query<LevelQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let level = q.level.unwrap_or_default();
    if !LEVELS.contains(&level.as_str()) {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("level {level:?} is not one of {}", LEVELS.join(", ")),
        ));
    }
    if let Some(l) = &q.logger
        && (l.is_empty()
            || !l
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-'))
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("logger {l:?} is not a logger name"),
        ));
    }
    let (_, admin) = target(&s, &node)?;
    let who = requester(&headers);
    let query = match &q.logger {
        Some(l) => vec![(l.clone(), level.clone())],
        None => vec![("level".to_string(), level.clone())],
    };
    let detail = match &q.logger {
        Some(l) => format!("{l}={level}"),
        None => format!("level={level}"),
    };
    let outcome = envoy_request(
        &s,
        "logging",
        &admin,
        reqwest::Method::POST,
        "/logging",
        &query,
    )
    .await;
    let result = match &outcome {
        Ok((status, _, _)) if status.is_success() => "ok".to_string(),
        Ok((status, _, body)) => format!("Envoy answered {status}: {}", body.trim()),
        Err(e) => e.1.clone(),
    };
    tracing::info!(
        target: "meshbridge::audit",
        who = %who.as_deref().unwrap_or("(unknown)"),
        action = "log-level",
        node = %node,
        admin = %admin,
        detail = %detail,
        result = %result,
        "admin action"
    );
    s.audit.push(AuditEntry {
        at: crate::sources::now_secs(),
        who,
        action: "log-level".into(),
        node: node.clone(),
        detail,
        result: result.clone(),
    });
    let (status, _, body) = outcome?;
    if !status.is_success() {
        return Err(ApiError(
            StatusCode::BAD_GATEWAY,
            format!("Envoy admin at {admin} refused the change: {result}"),
        ));
    }
    Ok(Json(
        json!({"node": node, "level": level, "logger": q.logger, "admin": admin, "output": body}),
    )
    .into_response())
}

/// `GET /api/proxies/{node}/diff`: what meshbridge sent against what the proxy runs.
pub async fn diff(
    State(s): State<AdminState>,
    Path(node): Path<String>,
) -> Result<Response, ApiError> {
    let (proxy, admin) = target(&s, &node)?;
    let snap = s.cache.snapshot(&proxy.group_key).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("proxy {node:?} has no snapshot yet"),
        )
    })?;
    let query = vec![("include_eds".to_string(), String::new())];
    let (status, _, body) = envoy_request(
        &s,
        "diff",
        &admin,
        reqwest::Method::GET,
        "/config_dump",
        &query,
    )
    .await?;
    if !status.is_success() {
        return Err(ApiError(
            StatusCode::BAD_GATEWAY,
            format!("Envoy admin at {admin} answered {status} to /config_dump"),
        ));
    }
    let dump: Value = serde_json::from_str(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_GATEWAY,
            format!("Envoy admin at {admin}: /config_dump is not JSON: {e}"),
        )
    })?;
    Ok(Json(config_diff(&proxy, &snap, &dump)).into_response())
}

/// What Envoy holds of one resource type, from its config dump.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct EnvoyHolds {
    /// Active dynamic resources.
    pub active: BTreeSet<String>,
    /// Resources Envoy is still warming.
    pub warming: BTreeSet<String>,
    /// Resources whose last update failed, with Envoy's details.
    pub errors: BTreeMap<String, String>,
}

/// The config dump section of one type (`ClustersConfigDump`, …; not `ScopedRoutesConfigDump`
/// for `RoutesConfigDump`).
fn dump_section<'a>(dump: &'a Value, type_suffix: &str) -> Option<&'a Value> {
    dump.get("configs")?.as_array()?.iter().find(|c| {
        c.get("@type")
            .and_then(Value::as_str)
            .and_then(|t| t.rsplit('.').next())
            .is_some_and(|t| t == type_suffix)
    })
}

fn strings<'a>(v: Option<&'a Value>, field: &str, name_at: &[&str]) -> Vec<(String, &'a Value)> {
    v.and_then(|v| v.get(field))
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|item| {
                    let mut at = item;
                    for key in name_at {
                        at = at.get(*key)?;
                    }
                    at.as_str().map(|n| (n.to_string(), item))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn error_details(item: &Value) -> Option<String> {
    let e = item.get("error_state")?;
    Some(
        e.get("details")
            .and_then(Value::as_str)
            .unwrap_or("update failed")
            .to_string(),
    )
}

/// What Envoy's config dump (fetched with `include_eds`) says it holds of type `t`.
pub fn envoy_holds(dump: &Value, t: ResourceType) -> EnvoyHolds {
    let mut holds = EnvoyHolds::default();
    match t {
        ResourceType::Cluster => {
            let section = dump_section(dump, "ClustersConfigDump");
            for (name, item) in strings(section, "dynamic_active_clusters", &["cluster", "name"]) {
                if let Some(e) = error_details(item) {
                    holds.errors.insert(name.clone(), e);
                }
                holds.active.insert(name);
            }
            for (name, _) in strings(section, "dynamic_warming_clusters", &["cluster", "name"]) {
                holds.warming.insert(name);
            }
        }
        ResourceType::Listener => {
            let section = dump_section(dump, "ListenersConfigDump");
            for (name, item) in strings(section, "dynamic_listeners", &["name"]) {
                if item.get("active_state").is_some() {
                    holds.active.insert(name.clone());
                }
                if item.get("warming_state").is_some() {
                    holds.warming.insert(name.clone());
                }
                if let Some(e) = error_details(item) {
                    holds.errors.insert(name, e);
                }
            }
        }
        ResourceType::Route => {
            let section = dump_section(dump, "RoutesConfigDump");
            for (name, _) in strings(section, "dynamic_route_configs", &["route_config", "name"]) {
                holds.active.insert(name);
            }
        }
        ResourceType::Endpoint => {
            let section = dump_section(dump, "EndpointsConfigDump");
            for (name, _) in strings(
                section,
                "dynamic_endpoint_configs",
                &["endpoint_config", "cluster_name"],
            ) {
                holds.active.insert(name);
            }
        }
    }
    holds
}

/// Short name of a type, as in the metrics.
pub fn short(t: ResourceType) -> &'static str {
    match t {
        ResourceType::Cluster => "cds",
        ResourceType::Endpoint => "eds",
        ResourceType::Listener => "lds",
        ResourceType::Route => "rds",
    }
}

/// Compares the snapshot a proxy's group gets with the proxy's config dump (pure).
pub fn config_diff(proxy: &ProxyStatus, snap: &Snapshot, dump: &Value) -> Value {
    let mut in_sync = true;
    let types: Vec<Value> = ResourceType::ALL
        .into_iter()
        .map(|t| {
            let sent: BTreeSet<String> = snap.resources(t).keys().cloned().collect();
            let holds = envoy_holds(dump, t);
            let status = proxy.types.get(t.type_url());
            let only_sent: Vec<&String> = sent
                .iter()
                .filter(|n| !holds.active.contains(*n) && !holds.warming.contains(*n))
                .collect();
            let only_envoy: Vec<&String> = holds.active.difference(&sent).collect();
            let errors: Vec<Value> = holds
                .errors
                .iter()
                .map(|(name, details)| json!({"name": name, "details": details}))
                .collect();
            let sent_version = status.and_then(|s| s.sent.clone());
            let acked_version = status.and_then(|s| s.acked.clone());
            let nack = status.and_then(|s| s.nack.clone());
            if !only_sent.is_empty()
                || !only_envoy.is_empty()
                || !holds.warming.is_empty()
                || !errors.is_empty()
                || sent_version != acked_version
                || nack.is_some()
            {
                in_sync = false;
            }
            json!({
                "type": short(t),
                "type_url": t.type_url(),
                "sent_version": sent_version,
                "acked_version": acked_version,
                "nack": nack,
                "sent": sent.len(),
                "envoy": holds.active.len(),
                "only_sent": only_sent,
                "only_envoy": only_envoy,
                "warming": holds.warming,
                "errors": errors,
            })
        })
        .collect();
    json!({"node": proxy.node, "mode": proxy.mode, "in_sync": in_sync, "types": types})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_config_dump_is_read_per_type_with_warming_and_failed_resources() {
        let dump = json!({"configs": [
            {"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump",
             "static_clusters": [{"cluster": {"name": "xds"}}],
             "dynamic_active_clusters": [{"version_info": "1", "cluster": {"name": "orders"}}],
             "dynamic_warming_clusters": [{"version_info": "2", "cluster": {"name": "billing"}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.ListenersConfigDump",
             "dynamic_listeners": [
                {"name": "ingress", "active_state": {"listener": {"name": "ingress"}},
                 "error_state": {"details": "bad filter"}},
                {"name": "egress", "warming_state": {"listener": {"name": "egress"}}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.ScopedRoutesConfigDump"},
            {"@type": "type.googleapis.com/envoy.admin.v3.RoutesConfigDump",
             "dynamic_route_configs": [{"route_config": {"name": "egress"}}]},
            {"@type": "type.googleapis.com/envoy.admin.v3.EndpointsConfigDump",
             "dynamic_endpoint_configs": [{"endpoint_config": {"cluster_name": "orders"}}]}
        ]});
        let c = envoy_holds(&dump, ResourceType::Cluster);
        assert_eq!(c.active, BTreeSet::from(["orders".to_string()]));
        assert_eq!(c.warming, BTreeSet::from(["billing".to_string()]));
        let l = envoy_holds(&dump, ResourceType::Listener);
        assert_eq!(l.active, BTreeSet::from(["ingress".to_string()]));
        assert_eq!(l.warming, BTreeSet::from(["egress".to_string()]));
        assert_eq!(
            l.errors.get("ingress").map(String::as_str),
            Some("bad filter")
        );
        assert_eq!(
            envoy_holds(&dump, ResourceType::Route).active,
            BTreeSet::from(["egress".to_string()])
        );
        assert_eq!(
            envoy_holds(&dump, ResourceType::Endpoint).active,
            BTreeSet::from(["orders".to_string()])
        );
        assert_eq!(
            envoy_holds(&json!({}), ResourceType::Cluster),
            EnvoyHolds::default()
        );
    }
}
