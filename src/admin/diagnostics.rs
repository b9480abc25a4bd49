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
use serde_json::Value;

use super::AdminState;

use super::config_diff::config_diff;
use super::views::{EjectedInstance, EjectionsView, ErrorView, LogLevelView};
use crate::metrics::label;
use crate::xds::registry::ProxyStatus;

/// An error answer: status and a message naming what was wrong.
pub struct ApiError(pub StatusCode, pub String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorView { error: self.1 })).into_response()
    }
}

/// Levels Envoy's `/logging` accepts.
pub const LEVELS: [&str; 8] = [
    "trace", "debug", "info", "warning", "warn", "error", "critical", "off",
];

/// The connected proxy `node` and its admin address. Streams of one node id from different
/// addresses are refused: either two proxies share an id, or something impersonates one
/// (xDS clients name themselves), and meshbridge cannot tell which one is meant.
fn target(s: &AdminState, node: &str) -> Result<(ProxyStatus, String), ApiError> {
    let streams = s.registry.find_all(node);
    let hosts: BTreeSet<String> = streams
        .iter()
        .map(|p| {
            p.peer
                .as_deref()
                .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
                .map_or_else(|| "unknown".to_string(), |a| a.ip().to_string())
        })
        .collect();
    if hosts.len() > 1 {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "node id {node:?} is used by streams from several addresses ({}): give each proxy its own node id",
                hosts.into_iter().collect::<Vec<_>>().join(", ")
            ),
        ));
    }
    let Some((proxy, _)) = s.registry.find(node) else {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no connected proxy with node id {node:?}"),
        ));
    };
    if s.diagnostics_need_identity && proxy.identity.as_deref() != Some(proxy.service.as_str()) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "proxy {node:?} did not prove service {:?} with a client certificate, so meshbridge does not ask it for diagnostics (--xds-client-auth)",
                proxy.service
            ),
        ));
    }
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

/// Envoy admin requests meshbridge makes at once, at most (each may buffer up to
/// `MAX_BODY`).
pub const MAX_IN_FLIGHT: usize = 8;

/// The most meshbridge reads of one Envoy admin answer (a config dump of a very large mesh
/// is tens of MiB).
const MAX_BODY: usize = 64 << 20;

/// One request to an Envoy admin interface: its body when Envoy answered 2xx, else an error
/// naming the address. Redirects are not followed (see [`super::AdminState::new`]).
async fn envoy_request(
    s: &AdminState,
    action: &'static str,
    admin: &str,
    method: reqwest::Method,
    path: &str,
    query: &[(String, String)],
) -> Result<String, ApiError> {
    let url = format!("http://{admin}{path}");
    let Ok(_permit) = s.diagnostics_permits.try_acquire() else {
        s.metrics
            .diagnostics_requests
            .get_or_create(&label::ActionResult {
                action,
                result: "busy",
            })
            .inc();
        return Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{MAX_IN_FLIGHT} Envoy admin requests are in flight already; try again shortly"
            ),
        ));
    };
    let exchange = async {
        let mut resp = s
            .http
            .request(method, &url)
            .query(query)
            .send()
            .await
            .map_err(|e| unreachable(admin, path, &e, s.diagnostics_timeout))?;
        let status = resp.status();
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| unreachable(admin, path, &e, s.diagnostics_timeout))?
        {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(ApiError(
                    StatusCode::BAD_GATEWAY,
                    format!(
                        "Envoy admin at {admin} ({path}): answer larger than {} MiB",
                        MAX_BODY >> 20
                    ),
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let body = String::from_utf8_lossy(&body).into_owned();
        if status.is_success() {
            Ok(body)
        } else {
            let excerpt: String = body.trim().chars().take(300).collect();
            Err(ApiError(
                StatusCode::BAD_GATEWAY,
                format!("Envoy admin at {admin} answered {status} to {path}: {excerpt}"),
            ))
        }
    };
    let outcome = match tokio::time::timeout(s.diagnostics_timeout, exchange).await {
        Ok(outcome) => outcome,
        Err(_) => Err(ApiError(
            StatusCode::BAD_GATEWAY,
            format!(
                "Envoy admin at {admin} ({path}): no answer within {} ms",
                s.diagnostics_timeout.as_millis()
            ),
        )),
    };
    let result = match &outcome {
        Ok(_) => "ok",
        Err(e) if e.1.contains(" answered ") => "refused",
        Err(_) => "unreachable",
    };
    s.metrics
        .diagnostics_requests
        .get_or_create(&label::ActionResult { action, result })
        .inc();
    outcome
}

/// An Envoy admin answer relayed to the caller: always JSON or plain text (never what the
/// other side claims, so nothing it sends runs as a page on this origin), not sniffed, and
/// sandboxed should a browser open it directly.
fn relayed(json: bool, body: String) -> Response {
    let content_type = if json {
        "application/json"
    } else {
        "text/plain; charset=utf-8"
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (
                header::CONTENT_SECURITY_POLICY,
                "sandbox; default-src 'none'",
            ),
        ],
        body,
    )
        .into_response()
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

/// A read-only view of a connected proxy's admin interface, answered verbatim: `action`
/// names it in metrics, `path` is Envoy's, and only the `allowed` query parameters are
/// passed on. `format` may only ask for JSON (or, for stats, Prometheus text).
async fn read_only_view(
    s: &AdminState,
    node: &str,
    action: &'static str,
    path: &str,
    q: &BTreeMap<String, String>,
    allowed: &[&str],
) -> Result<Response, ApiError> {
    let format = q.get("format").map(String::as_str);
    let formats: &[&str] = if path == "/stats" {
        &["json", "prometheus"]
    } else {
        &["json"]
    };
    if let Some(f) = format
        && !formats.contains(&f)
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("format {f:?} is not one of {}", formats.join(", ")),
        ));
    }
    let (_, admin) = target(s, node)?;
    let query: Vec<(String, String)> = q
        .iter()
        .filter(|(k, _)| allowed.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let body = envoy_request(s, action, &admin, reqwest::Method::GET, path, &query).await?;
    Ok(relayed(
        path == "/config_dump" || format == Some("json"),
        body,
    ))
}

/// Callers' proxies one ejections request asks, at most (the first by node id), and how many
/// at once.
pub const EJECTION_PROXIES: usize = 16;
const EJECTION_CONCURRENCY: usize = 4;

/// Whether `cluster` is one of `service`'s (its own, canary, policy variants): every other
/// name contains `|` after a different prefix, and a service name cannot contain `|`.
fn is_cluster_of(cluster: &str, service: &str) -> bool {
    cluster
        .strip_prefix(service)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('|'))
}

/// The instances of `service`'s clusters that one Envoy's `/clusters?format=json` shows
/// ejected by outlier detection, with the cluster.
fn ejected_in(clusters: &Value, service: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let statuses = clusters["cluster_statuses"]
        .as_array()
        .map_or(&[][..], Vec::as_slice);
    for cluster in statuses {
        let Some(name) = cluster["name"].as_str() else {
            continue;
        };
        if !is_cluster_of(name, service) {
            continue;
        }
        let hosts = cluster["host_statuses"]
            .as_array()
            .map_or(&[][..], Vec::as_slice);
        for host in hosts {
            if host["health_status"]["failed_outlier_check"].as_bool() != Some(true) {
                continue;
            }
            let a = &host["address"]["socket_address"];
            if let (Some(ip), Some(port)) = (a["address"].as_str(), a["port_value"].as_u64()) {
                out.push((format!("{ip}:{port}"), name.to_string()));
            }
        }
    }
    out
}

/// Asks up to [`EJECTION_PROXIES`] connected proxies holding a cluster of `service` for the
/// Envoy admin `path` (JSON), [`EJECTION_CONCURRENCY`] at a time, through the same bounded
/// admin requests as the other diagnostics: how many proxies hold one, those asked, and each
/// answer or why there is none. 404 for an unknown service.
pub(super) async fn ask_callers(
    s: &AdminState,
    service: &str,
    kind: &'static str,
    path: &'static str,
    query: &[(String, String)],
) -> Result<(usize, Vec<String>, Vec<(String, Result<Value, String>)>), ApiError> {
    use futures::StreamExt as _;
    if !s.cache.state().services.contains_key(service) {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!("no service named {service:?}"),
        ));
    }
    let callers: Vec<String> = s
        .registry
        .list()
        .into_iter()
        .filter(|p| {
            s.cache.snapshot(&p.group_key).is_some_and(|snap| {
                snap.resources(crate::snapshot::ResourceType::Cluster)
                    .keys()
                    .any(|c| is_cluster_of(c, service))
            })
        })
        .map(|p| p.node)
        .collect();
    let asked: Vec<String> = callers.iter().take(EJECTION_PROXIES).cloned().collect();
    let answers = futures::stream::iter(asked.clone())
        .map(|node| {
            let s = s.clone();
            async move {
                let answer = async {
                    let (_, admin) = target(&s, &node)?;
                    let body =
                        envoy_request(&s, kind, &admin, reqwest::Method::GET, path, query).await?;
                    serde_json::from_str::<Value>(&body).map_err(|e| {
                        ApiError(
                            StatusCode::BAD_GATEWAY,
                            format!("Envoy admin at {admin} ({path}): not JSON: {e}"),
                        )
                    })
                }
                .await;
                (node, answer.map_err(|e| e.1))
            }
        })
        .buffer_unordered(EJECTION_CONCURRENCY)
        .collect()
        .await;
    Ok((callers.len(), asked, answers))
}

/// `GET /api/services/{name}/ejections`: the instances of a service that its callers'
/// proxies have ejected (outlier detection), asked of up to [`EJECTION_PROXIES`] connected
/// proxies holding a cluster of it, through the same bounded admin requests as the other
/// diagnostics.
pub async fn ejections(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<EjectionsView>, ApiError> {
    let query = [("format".to_string(), "json".to_string())];
    let (callers, asked, answers) =
        ask_callers(&s, &name, "ejections", "/clusters", &query).await?;
    let mut by_instance: BTreeMap<String, EjectedInstance> = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for (node, answer) in answers {
        match answer {
            Ok(clusters) => {
                for (instance, cluster) in ejected_in(&clusters, &name) {
                    let e =
                        by_instance
                            .entry(instance.clone())
                            .or_insert_with(|| EjectedInstance {
                                instance,
                                by: BTreeSet::new(),
                                clusters: BTreeSet::new(),
                            });
                    e.by.insert(node.clone());
                    e.clusters.insert(cluster);
                }
            }
            Err(why) => {
                errors.insert(node, why);
            }
        }
    }
    Ok(Json(EjectionsView {
        service: name,
        callers,
        asked,
        errors,
        ejected: by_instance.into_values().collect(),
    }))
}

/// `GET /api/proxies/{node}/config_dump`: Envoy's own config dump, verbatim.
pub async fn config_dump(
    State(s): State<AdminState>,
    Path(node): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    let allowed = ["resource", "mask", "name_regex", "include_eds"];
    read_only_view(&s, &node, "config_dump", "/config_dump", &q, &allowed).await
}

/// `GET /api/proxies/{node}/stats`: Envoy's stats, verbatim (`filter`, `format`, `usedonly`).
pub async fn stats(
    State(s): State<AdminState>,
    Path(node): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    if let Some(f) = q.get("filter")
        && let Err(e) = regex::Regex::new(f)
    {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("filter {f:?} is not a regular expression: {e}"),
        ));
    }
    let allowed = ["filter", "format", "usedonly", "type"];
    read_only_view(&s, &node, "stats", "/stats", &q, &allowed).await
}

/// `GET /api/proxies/{node}/clusters`: Envoy's clusters and their hosts, verbatim.
pub async fn clusters(
    State(s): State<AdminState>,
    Path(node): Path<String>,
    Query(q): Query<BTreeMap<String, String>>,
) -> Result<Response, ApiError> {
    read_only_view(&s, &node, "clusters", "/clusters", &q, &["format"]).await
}

/// Query of a log level change.
#[derive(Deserialize)]
pub struct LevelQuery {
    level: Option<String>,
    logger: Option<String>,
}

/// Whether a browser sent this request from another site (a page the operator happened to
/// open must not change log levels): a foreign `Origin`, or `Sec-Fetch-Site` other than
/// `same-origin`/`none`. Clients that are not browsers send neither.
pub(super) fn cross_site(headers: &HeaderMap) -> Option<String> {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = get("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Some(format!("Sec-Fetch-Site: {site}"));
    }
    let origin = get("origin")?;
    let host = get("host").unwrap_or_default();
    let origin_host = origin.split_once("://").map_or(origin, |(_, h)| h);
    (origin_host != host).then(|| format!("Origin {origin} is not this server ({host})"))
}

/// `POST /api/proxies/{node}/logging?level=LEVEL[&logger=NAME]`: changes the proxy's log
/// level (every logger, or one). Audited: every attempt, refused or not, is logged (target
/// `meshbridge::audit`) with who the request says asked and where it came from, and kept in
/// `/api/audit`; the change and its record complete even if the caller goes away.
pub async fn logging(
    State(s): State<AdminState>,
    Path(node): Path<String>,
    Query(q): Query<LevelQuery>,
    from: Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>,
    principal: Option<axum::Extension<super::auth::Principal>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let level = q.level.clone().unwrap_or_default();
    let detail = match &q.logger {
        Some(l) => format!("{l}={level}"),
        None => format!("level={level}"),
    };
    let record = super::changes::AuditRecord {
        action: "log-level",
        who: super::changes::who(principal, &headers),
        from: from.map(|f| f.0.0.to_string()),
        node: node.clone(),
        service: None,
        detail,
    };
    let checked = check_level_request(&s, &node, &q, &headers);
    let (admin, query) = match checked {
        Ok(x) => x,
        Err(e) => {
            record.audit(&s.audit, "-", &e.1);
            return Err(e);
        }
    };
    let task = {
        let s = s.clone();
        let admin = admin.clone();
        tokio::spawn(async move {
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
                Ok(_) => "ok".to_string(),
                Err(e) => e.1.clone(),
            };
            record.audit(&s.audit, &admin, &result);
            outcome
        })
    };
    let body = task.await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("log level change interrupted: {e}"),
        )
    })??;
    Ok(Json(LogLevelView {
        admin,
        level,
        logger: q.logger,
        node,
        output: body,
    })
    .into_response())
}

/// Validates a log level request; the admin address and Envoy's query.
fn check_level_request(
    s: &AdminState,
    node: &str,
    q: &LevelQuery,
    headers: &HeaderMap,
) -> Result<(String, Vec<(String, String)>), ApiError> {
    if let Some(why) = cross_site(headers) {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("cross-site request refused ({why})"),
        ));
    }
    let level = q.level.clone().unwrap_or_default();
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
    let (_, admin) = target(s, node)?;
    let query = match &q.logger {
        Some(l) => vec![(l.clone(), level)],
        None => vec![("level".to_string(), level)],
    };
    Ok((admin, query))
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
    let body = envoy_request(
        &s,
        "diff",
        &admin,
        reqwest::Method::GET,
        "/config_dump",
        &query,
    )
    .await?;
    let dump: Value = serde_json::from_str(&body).map_err(|e| {
        ApiError(
            StatusCode::BAD_GATEWAY,
            format!("Envoy admin at {admin}: /config_dump is not JSON: {e}"),
        )
    })?;
    Ok(Json(config_diff(&proxy, &snap, &dump)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn admin_state() -> AdminState {
        AdminState::new(
            Arc::new(crate::xds::cache::SnapshotCache::new(Default::default())),
            Arc::default(),
            Arc::default(),
            Arc::new(crate::metrics::Metrics::new()),
        )
    }

    /// Serves `router` on a free 127.0.0.1 port; returns the address.
    async fn serve(router: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move { axum::serve(listener, router).await });
        addr
    }

    #[test]
    fn ejected_instances_are_read_from_the_services_clusters_only() {
        let clusters = serde_json::json!({"cluster_statuses": [
            {"name": "orders", "host_statuses": [
                {"address": {"socket_address": {"address": "10.0.0.1", "port_value": 80}},
                 "health_status": {"failed_outlier_check": true}},
                {"address": {"socket_address": {"address": "10.0.0.2", "port_value": 80}},
                 "health_status": {"eds_health_status": "HEALTHY"}},
            ]},
            {"name": "orders|o-1234abcd", "host_statuses": [
                {"address": {"socket_address": {"address": "10.0.0.2", "port_value": 80}},
                 "health_status": {"failed_outlier_check": true}},
            ]},
            {"name": "orders-v2", "host_statuses": [
                {"address": {"socket_address": {"address": "10.0.0.3", "port_value": 80}},
                 "health_status": {"failed_outlier_check": true}},
            ]},
        ]});
        assert_eq!(
            ejected_in(&clusters, "orders"),
            [
                ("10.0.0.1:80".to_string(), "orders".to_string()),
                ("10.0.0.2:80".to_string(), "orders|o-1234abcd".to_string()),
            ]
        );
        assert!(ejected_in(&serde_json::json!({"unexpected": 1}), "orders").is_empty());
    }

    #[tokio::test]
    async fn an_envoy_admin_redirecting_elsewhere_is_an_error_and_is_not_followed() {
        // An internal endpoint that must never be read, and a proxy's "admin interface"
        // redirecting every request to it.
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let internal = serve(axum::Router::new().fallback(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async { "internal secret" }
        }))
        .await;
        let location = format!("http://{internal}/secret");
        let admin = serve(axum::Router::new().fallback(move || {
            let location = location.clone();
            async move { (StatusCode::FOUND, [(header::LOCATION, location)], "") }
        }))
        .await;
        let s = admin_state();
        for method in [reqwest::Method::GET, reqwest::Method::POST] {
            let Err(ApiError(status, message)) =
                envoy_request(&s, "config_dump", &admin, method, "/config_dump", &[]).await
            else {
                panic!("a redirect was relayed as an answer");
            };
            assert_eq!(status, StatusCode::BAD_GATEWAY);
            assert!(message.contains("302"), "{message}");
            assert!(!message.contains("internal secret"), "{message}");
        }
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
    }

    #[tokio::test]
    async fn diagnostics_beyond_the_in_flight_bound_are_refused_at_once() {
        let s = admin_state();
        let _all = s
            .diagnostics_permits
            .try_acquire_many(MAX_IN_FLIGHT as u32)
            .unwrap();
        let Err(ApiError(status, message)) = envoy_request(
            &s,
            "stats",
            "127.0.0.1:9",
            reqwest::Method::GET,
            "/stats",
            &[],
        )
        .await
        else {
            panic!("a request beyond the bound was made");
        };
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(message.contains("in flight"), "{message}");
    }
}
