//! The admin API on `--admin-addr`: health, readiness, metrics, JSON views of the model,
//! the sources, the connected proxies and their snapshots, Envoy diagnostics through the
//! control plane, comparison with peer instances, and the web UI.

pub mod auth;
pub mod board;
pub mod changes;
pub mod compare;
pub mod config_diff;
pub mod diagnostics;
pub mod kube_auth;
pub mod latency;
pub mod migrate;
pub mod state;
pub mod views;

pub use state::{state_detail, state_digest};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use prost::Message;
use serde::Deserialize;

use views::{
    AccessView, Change, DependentProxy, Dependents, InstanceView, OriginCount, ProxyDetail,
    ProxyView, ResourceNames, ServiceDetail, ServiceView, SnapshotResource, SnapshotType,
    SnapshotView, SourceView,
};

use crate::metrics::{Metrics, label};
use crate::model::{DependencyTarget, MeshSettings, MeshState};
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
    /// Recent published changes.
    pub changes: Arc<changes::BoundedLog<changes::Change>>,
    /// Actions taken through this API.
    pub audit: Arc<changes::BoundedLog<changes::AuditEntry>>,
    /// Client for Envoy admin interfaces and peers. It follows no redirect: an answer
    /// pointing elsewhere is relayed as an error, never fetched (a proxy must not be able
    /// to make the control plane read an address of its choosing).
    pub http: reqwest::Client,
    /// Envoy admin requests in flight at most; beyond, callers get 503 at once.
    pub diagnostics_permits: Arc<tokio::sync::Semaphore>,
    /// Who may call (`--admin-token-file`, `--admin-kubernetes-auth`); neither: the API is
    /// open.
    pub auth: Arc<auth::AdminAuth>,
    /// Whether `/metrics` needs a token too (`--admin-metrics-auth`).
    pub metrics_auth: bool,
    /// Diagnostics only reach proxies whose client certificate proved their service (set
    /// when `--xds-client-auth` is on).
    pub diagnostics_need_identity: bool,
    /// Time limit of one such request.
    pub diagnostics_timeout: Duration,
    /// Where the peer instances are.
    pub peers: Arc<compare::PeerSettings>,
    /// Peers with a `meshbridge_peer_agree` series, so that those of peers that are gone
    /// can be removed.
    pub peer_series: Arc<std::sync::Mutex<BTreeSet<String>>>,
    /// Load reports from the proxies.
    pub load: Arc<crate::xds::lrs::LoadState>,
    /// Where operators' orders on migration plans are written (with the Kubernetes source).
    pub orders: Option<Arc<migrate::OrderWriter>>,
}

impl AdminState {
    /// Admin state over the given parts, with empty logs and no peers.
    pub fn new(
        cache: Arc<SnapshotCache>,
        registry: Arc<ProxyRegistry>,
        sources: Arc<SourceStatuses>,
        metrics: Arc<Metrics>,
    ) -> Self {
        AdminState {
            cache,
            registry,
            sources,
            metrics,
            ready: Arc::default(),
            draining: Arc::default(),
            changes: Arc::default(),
            audit: Arc::default(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .unwrap_or_else(|_| unreachable_client()),
            diagnostics_permits: Arc::new(tokio::sync::Semaphore::new(diagnostics::MAX_IN_FLIGHT)),
            auth: Arc::default(),
            metrics_auth: false,
            diagnostics_need_identity: false,
            diagnostics_timeout: Duration::from_secs(5),
            peers: Arc::default(),
            peer_series: Arc::default(),
            load: Arc::new(crate::xds::lrs::LoadState::new(Duration::from_secs(10))),
            orders: None,
        }
    }
}

/// A client that cannot reach anything (no redirects, no proxy), should building the
/// configured one ever fail: never the default client, which follows redirects.
fn unreachable_client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .build()
        .unwrap_or_else(|e| panic!("an HTTP client without options cannot be built: {e}"))
}

/// The web UI, embedded in the binary.
const UI_INDEX: &str = include_str!("ui/index.html");
const UI_SCRIPT: &str = include_str!("ui/app.js");
const UI_STYLE: &str = include_str!("ui/app.css");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

/// The admin router.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/services", get(services))
        .route("/api/services/{name}", get(service))
        .route("/api/services/{name}/migration", post(migrate::order))
        .route("/api/migration", get(board::board))
        .route("/api/services/{name}/latency", get(latency::latency))
        .route(
            "/api/services/{name}/ejections",
            get(diagnostics::ejections),
        )
        .route("/api/proxies", get(proxies))
        .route("/api/proxies/{node}", get(proxy))
        .route(
            "/api/proxies/{node}/config_dump",
            get(diagnostics::config_dump),
        )
        .route("/api/proxies/{node}/stats", get(diagnostics::stats))
        .route("/api/proxies/{node}/clusters", get(diagnostics::clusters))
        .route("/api/proxies/{node}/logging", post(diagnostics::logging))
        .route("/api/proxies/{node}/diff", get(diagnostics::diff))
        .route("/api/sources", get(sources))
        .route("/api/snapshot", get(snapshot))
        .route("/api/state", get(state::mesh_state))
        .route("/api/access", get(access))
        .route("/api/changes", get(recent_changes))
        .route("/api/audit", get(audit))
        .route("/api/compare", get(compare::compare))
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", UI_INDEX) }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", UI_SCRIPT) }),
        )
        .route(
            "/ui/app.css",
            get(|| async { asset("text/css; charset=utf-8", UI_STYLE) }),
        )
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ))
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
    s.sources.refresh_metrics();
    (
        [(
            header::CONTENT_TYPE,
            // The encoder writes OpenMetrics (`# EOF`, counters as `x_total` under `# TYPE x
            // counter`); read as the older text format, counters would become untyped.
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// The services that declare a dependency on each service (directly, or through `"*"` where
/// the operator allows it).
pub fn dependents(
    state: &MeshState,
    settings: &MeshSettings,
) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for s in state.services.values() {
        let allowed = settings.wildcard_allowed(&s.name);
        for d in &s.dependencies {
            // A service is not listed as its own dependent (through "*").
            let reached = state.services_reached(&d.target, allowed);
            for t in reached.filter(|t| *t != s.name || d.target != DependencyTarget::All) {
                out.entry(t.to_string()).or_default().insert(s.name.clone());
            }
        }
    }
    out
}

fn service_view(s: &crate::model::Service, dependents: Option<&BTreeSet<String>>) -> ServiceView {
    ServiceView {
        declared: s.declared,
        dependencies: s
            .dependencies
            .iter()
            .map(|d| d.target.to_string())
            .collect(),
        dependents: dependents
            .map(|d| d.iter().cloned().collect())
            .unwrap_or_default(),
        instances: s.endpoints.iter().map(InstanceView::from).collect(),
        mtls: mtls_name(s.mtls).to_string(),
        name: s.name.clone(),
    }
}

fn mtls_name(m: crate::model::MtlsMode) -> &'static str {
    match m {
        crate::model::MtlsMode::Disabled => "disabled",
        crate::model::MtlsMode::Permissive => "permissive",
        crate::model::MtlsMode::Strict => "strict",
    }
}

/// `GET /api/services`.
pub fn services_view(state: &MeshState, settings: &MeshSettings) -> Vec<ServiceView> {
    let dependents = dependents(state, settings);
    state
        .services
        .values()
        .map(|s| service_view(s, dependents.get(&s.name)))
        .collect()
}

/// Whether `service`, declaring `declared`, depends on `target` as translation expands
/// dependencies ([`MeshState::reaches`]); a service never counts as its own dependent.
fn depends_on<'a>(
    state: &MeshState,
    settings: &MeshSettings,
    service: &str,
    mut declared: impl Iterator<Item = &'a DependencyTarget>,
    target: &str,
) -> bool {
    let allowed = settings.wildcard_allowed(service);
    target != service && declared.any(|d| state.reaches(d, allowed, target))
}

/// `GET /api/services/{name}`: one service with its instances by origin, what depends on it
/// (services, and connected proxies whose configuration routes to it) and its access policy.
pub fn service_detail(s: &AdminState, state: &MeshState, name: &str) -> Option<ServiceDetail> {
    let service = state.services.get(name)?;
    let settings = s.cache.settings();
    let declaring: BTreeSet<String> = state
        .services
        .values()
        .filter(|s| {
            depends_on(
                state,
                settings,
                &s.name,
                s.dependencies.iter().map(|d| &d.target),
                name,
            )
        })
        .map(|s| s.name.clone())
        .collect();
    let view = service_view(service, Some(&declaring));
    let mut origins: BTreeMap<String, OriginCount> = BTreeMap::new();
    for e in &service.endpoints {
        let o = origins.entry(e.origin.to_string()).or_insert(OriginCount {
            healthy: 0,
            total: 0,
        });
        o.total += 1;
        o.healthy += usize::from(e.healthy);
    }
    Some(ServiceDetail {
        access: state
            .access
            .get(crate::model::access_target(name))
            .map(|p| access_view_of(state, p)),
        declared: view.declared,
        dependencies: view.dependencies,
        dependents: Dependents {
            proxies: dependent_proxies(s, state, name, &declaring),
            services: view.dependents,
        },
        instances: view.instances,
        mtls: view.mtls,
        name: view.name,
        origins,
        protocol: service.protocol.to_string(),
        port: service.port,
        preserve_header_case: service.preserve_header_case,
        rate_limit: views::RateLimitView::of(&service.rate_limit),
        load: load_view(&s.load, name),
        migration: service.migration.as_ref().map(|m| {
            let plan = s.orders.as_ref().map(|o| o.plan_of(name));
            board::migration_view(m, plan.unwrap_or_default())
        }),
        ports: service
            .named_ports
            .iter()
            .map(|p| views::PortView {
                name: p.name.clone(),
                port: p.port,
                target_port: p.target_port,
                protocol: p.protocol.to_string(),
            })
            .collect(),
    })
}

/// What callers' proxies reported of `service` over the last minute and the last five, by
/// origin and datacenter, live and mirrored.
fn load_view(load: &crate::xds::lrs::LoadState, service: &str) -> views::LoadView {
    let window = |seconds: u64| {
        let sums = load.window(seconds, |k| k.service == service);
        let live: u64 = sums
            .iter()
            .filter(|(k, _)| !k.mirror)
            .map(|(_, c)| c.requests)
            .sum();
        sums.into_iter()
            .map(|(k, c)| views::OriginLoad {
                origin: k.origin.to_string(),
                datacenter: k.datacenter,
                traffic: if k.mirror { "mirror" } else { "live" }.to_string(),
                requests: c.requests,
                successes: c.successes,
                errors: c.errors,
                failed_connections: c.failed_connections,
                error_rate: c.error_rate(),
                share: (!k.mirror && live > 0).then(|| c.requests as f64 / live as f64),
            })
            .collect()
    };
    views::LoadView {
        interval_seconds: load.interval.as_secs_f64(),
        last_minute: window(60),
        last_5_minutes: window(300),
    }
}

/// Connected proxies whose dependencies name `name` (their own, their MeshService's, or
/// "*" where allowed), and whether their configuration actually routes to it (not, e.g., a
/// caller without a certificate towards a `strict` service).
fn dependent_proxies(
    s: &AdminState,
    state: &MeshState,
    name: &str,
    declaring: &BTreeSet<String>,
) -> Vec<DependentProxy> {
    let settings = s.cache.settings();
    let cluster = crate::translate::names::service_cluster(name);
    let mut reaches_by_group: BTreeMap<String, bool> = BTreeMap::new();
    s.registry
        .list()
        .into_iter()
        .filter(|p| {
            let g = &p.group_key;
            declaring.contains(&g.service)
                || depends_on(state, settings, &g.service, g.dependencies.iter(), name)
        })
        .map(|p| {
            let reaches = *reaches_by_group.entry(p.group.clone()).or_insert_with(|| {
                s.cache.snapshot(&p.group_key).is_some_and(|snap| {
                    snap.resources(ResourceType::Cluster).contains_key(&cluster)
                })
            });
            DependentProxy {
                group: p.group,
                mode: p.mode.to_string(),
                node: p.node,
                reaches,
                service: p.service,
            }
        })
        .collect()
}

async fn service(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<ServiceDetail>, diagnostics::ApiError> {
    let state = s.cache.state();
    service_detail(&s, &state, &name).map(Json).ok_or_else(|| {
        diagnostics::ApiError(
            StatusCode::NOT_FOUND,
            format!("no service named {name:?} in the mesh"),
        )
    })
}

/// `GET /api/access`: the merged access policy of every target, with the callers its rules
/// name split into known and unknown services.
pub fn access_view(state: &MeshState) -> Vec<AccessView> {
    state
        .access
        .values()
        .map(|p| access_view_of(state, p))
        .collect()
}

fn access_view_of(state: &MeshState, p: &crate::model::AccessPolicy) -> AccessView {
    let (resolved, unknown) = state.resolve_callers(p.caller_names());
    AccessView::new(p, state.services.contains_key(&p.target), resolved, unknown)
}

async fn access(State(s): State<AdminState>) -> Json<Vec<AccessView>> {
    Json(access_view(&s.cache.state()))
}

async fn services(State(s): State<AdminState>) -> Json<Vec<ServiceView>> {
    Json(services_view(&s.cache.state(), s.cache.settings()))
}

async fn proxies(State(s): State<AdminState>) -> Json<Vec<ProxyView>> {
    Json(s.registry.list().iter().map(ProxyView::from).collect())
}

/// `GET /api/proxies/{node}`: the stream's status and what its group gets.
async fn proxy(
    State(s): State<AdminState>,
    Path(node): Path<String>,
) -> Result<Json<ProxyDetail>, diagnostics::ApiError> {
    let Some((proxy, group)) = s.registry.find(&node) else {
        return Err(diagnostics::ApiError(
            StatusCode::NOT_FOUND,
            format!("no connected proxy with node id {node:?}"),
        ));
    };
    let announced: BTreeSet<String> = group.dependencies.iter().map(ToString::to_string).collect();
    // What translation uses: the node's own, merged with its MeshService's.
    let mut effective = announced.clone();
    if let Some(service) = s.cache.state().services.get(&group.service) {
        effective.extend(service.dependencies.iter().map(|d| d.target.to_string()));
    }
    let snap = s.cache.snapshot(&group);
    let warnings = snap
        .as_ref()
        .map(|s| s.warnings.clone())
        .unwrap_or_default();
    let mut resources = BTreeMap::new();
    let mut tcp_ports = BTreeMap::new();
    if let Some(snap) = &snap {
        for (name, r) in snap.resources(ResourceType::Listener) {
            if let Some(service) = crate::translate::names::tcp_egress_service(name)
                && let Some(port) = listener_port(r)
            {
                tcp_ports.insert(service.to_string(), port);
            }
        }
        for t in ResourceType::ALL {
            let names = ResourceNames {
                names: snap.resources(t).keys().cloned().collect(),
                version: snap.version(t).to_string(),
            };
            resources.insert(t.type_url().to_string(), names);
        }
    }
    Ok(Json(ProxyDetail::new(
        ProxyView::from(&proxy),
        announced.into_iter().collect(),
        effective.into_iter().collect(),
        resources,
        tcp_ports,
        warnings,
    )))
}

/// The port a listener resource listens on.
fn listener_port(r: &Resource) -> Option<u16> {
    use envoy_types::pb::envoy::config::core::v3::{address, socket_address::PortSpecifier};
    let listener = Listener::decode(r.body.value.as_slice()).ok()?;
    match listener.address?.address? {
        address::Address::SocketAddress(a) => match a.port_specifier? {
            PortSpecifier::PortValue(p) => u16::try_from(p).ok(),
            PortSpecifier::NamedPort(_) => None,
        },
        _ => None,
    }
}

async fn recent_changes(State(s): State<AdminState>) -> Json<Vec<Change>> {
    Json(s.changes.newest_first())
}

async fn audit(State(s): State<AdminState>) -> Json<Vec<views::AuditEntry>> {
    Json(s.audit.newest_first())
}

async fn sources(State(s): State<AdminState>) -> Json<Vec<SourceView>> {
    Json(s.sources.list().iter().map(SourceView::from).collect())
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
        ResourceType::Secret => {
            envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::Secret::decode(bytes)
                .map(|m| format!("{m:#?}"))
        }
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
    let mut resources = BTreeMap::new();
    for t in ResourceType::ALL {
        let list = snap
            .resources(t)
            .values()
            .map(|r| SnapshotResource {
                config: decoded(t, r),
                name: r.name.clone(),
                version: r.version.clone(),
            })
            .collect();
        let of_type = SnapshotType {
            resources: list,
            version: snap.version(t).to_string(),
        };
        resources.insert(t.type_url().to_string(), of_type);
    }
    Json(SnapshotView {
        group: proxy.group,
        node: proxy.node,
        resources,
        service: proxy.service,
        warnings: snap.warnings.clone(),
    })
    .into_response()
}

/// Records what one published state changed (for `/api/changes`) and its build metrics.
pub fn record_change(
    changes: &changes::BoundedLog<changes::Change>,
    metrics: &Metrics,
    diff: changes::StateDiff,
    generation: u64,
    report: &crate::xds::cache::UpdateReport,
    build: Duration,
) {
    for seconds in &report.build_seconds {
        metrics.snapshot_group_build_seconds.observe(*seconds);
    }
    metrics
        .snapshot_group_pushes
        .inc_by(report.pushed.len() as u64);
    if diff.is_empty() && report.pushed.is_empty() {
        return;
    }
    changes.push(Change {
        access_changed: diff.access_changed,
        at: crate::sources::now_secs(),
        build_ms: build.as_secs_f64() * 1000.0,
        generation,
        groups_pushed: report
            .pushed
            .iter()
            .take(changes::GROUPS_LISTED)
            .cloned()
            .collect(),
        groups_pushed_count: report.pushed.len(),
        groups_rebuilt: report.groups,
        services_added: diff.added,
        services_changed: diff.changed,
        services_removed: diff.removed,
    });
}

/// Sets the per-source index size gauges.
pub fn record_index_sizes(metrics: &Metrics, sizes: &BTreeMap<String, usize>) {
    for (source, n) in sizes {
        metrics
            .index_objects
            .get_or_create(&label::Source {
                source: source.to_string(),
            })
            .set(*n as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependents_follow_translations_expansion_of_the_wildcard() {
        let yaml = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: gateway}\nspec:\n  dependencies: [{service: \"*\"}]\n---\napiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: orders}\nspec:\n  dependencies: [{service: orders}]\n";
        let mut index = crate::index::Index::new();
        index.apply(
            "config",
            "mesh.yaml",
            crate::sources::files::parse_manifests("mesh.yaml", yaml).unwrap(),
        );
        let state = index.state();
        let allowed = MeshSettings {
            allow_wildcard: vec!["gate*".into()],
            ..Default::default()
        };
        let d = dependents(&state, &allowed);
        // Through "*": every other service, not itself; by name: itself too.
        assert_eq!(
            d["orders"],
            BTreeSet::from(["gateway".into(), "orders".into()])
        );
        assert!(!d.contains_key("gateway"), "{d:?}");
        // "*" where the operator does not allow it reaches nothing.
        let d = dependents(&state, &MeshSettings::default());
        assert_eq!(d["orders"], BTreeSet::from(["orders".to_string()]));
    }
}
