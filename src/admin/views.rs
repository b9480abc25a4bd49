//! The admin API's answers as types: what every JSON route returns, shared by the server
//! that builds them and by `meshbridge ctl`, which reads them back.
//!
//! These are the wire format of `/api/*` (see the "Admin API" section of the contract):
//! field names, nesting, `null` where a value is absent and the order of lists are the
//! API's, and the web UI reads the same fields. Fields are declared in alphabetical order,
//! the order the API has always written its keys in. Model types stay free of admin
//! concerns: the views are built from them here, never serialized in their place.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::model::{AccessPolicy, AccessRuleSet, CallerMatch, Endpoint, PathMatch};
use crate::snapshot::ResourceType;
use crate::sources::SourceStatus;
use crate::xds::registry::{ProxyStatus, TypeStatus};

/// A `{TYPE_URL: x}` object (the type URLs of [`ResourceType`]).
pub type ByTypeUrl<T> = BTreeMap<String, T>;

/// The short names of the resource types (`cds`, `eds`, `lds`, `rds`), in push order: the
/// one list the API's `type` fields and `ctl`'s columns use.
pub fn type_short_names() -> [&'static str; crate::snapshot::TYPES] {
    ResourceType::ALL.map(ResourceType::short_name)
}

/// The short name of an xDS type URL: `cds`, `eds`, `lds`, `rds` for the types meshbridge
/// serves, else the URL's last segment.
pub fn type_short_name(type_url: &str) -> String {
    match ResourceType::from_type_url(type_url) {
        Some(t) => t.short_name().to_string(),
        None => type_url
            .rsplit(['.', '/'])
            .next()
            .unwrap_or(type_url)
            .to_string(),
    }
}

/// An error answer: `{"error": message}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorView {
    /// What was wrong.
    pub error: String,
}

// ---------------------------------------------------------------------------------------
// Services.

/// One instance of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceView {
    /// IP address.
    pub address: String,
    /// Datacenter; null for the local one.
    pub datacenter: Option<String>,
    /// Whether it may receive traffic.
    pub healthy: bool,
    /// `consul`, `kubernetes` or `config`.
    pub origin: String,
    /// Port callers connect to.
    pub port: u16,
    /// Tags, sorted.
    pub tags: Vec<String>,
    /// Load-balancing weight.
    pub weight: u32,
}

impl From<&Endpoint> for InstanceView {
    fn from(e: &Endpoint) -> Self {
        InstanceView {
            address: e.address.clone(),
            datacenter: e.datacenter.clone(),
            healthy: e.healthy,
            origin: e.origin.to_string(),
            port: e.port,
            tags: e.tags.iter().cloned().collect(),
            weight: e.weight,
        }
    }
}

/// `GET /api/services`: one entry per service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    /// Whether a MeshService declares it.
    pub declared: bool,
    /// Declared dependencies, as written (`orders`, `*`, a domain).
    pub dependencies: Vec<String>,
    /// Services that depend on it, sorted.
    pub dependents: Vec<String>,
    /// Instances, healthy or not.
    pub instances: Vec<InstanceView>,
    /// `disabled`, `permissive` or `strict`.
    pub mtls: String,
    /// Its name.
    pub name: String,
}

/// Instances of one origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginCount {
    /// How many are healthy.
    pub healthy: usize,
    /// How many there are.
    pub total: usize,
}

/// A connected proxy whose dependencies name a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DependentProxy {
    /// Its group id.
    pub group: String,
    /// `sotw` or `delta`.
    pub mode: String,
    /// Its node id.
    pub node: String,
    /// Whether its configuration routes to the service (it has the service's cluster).
    pub reaches: bool,
    /// Its service.
    pub service: String,
}

/// What depends on a service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dependents {
    /// Connected proxies.
    pub proxies: Vec<DependentProxy>,
    /// Services, sorted.
    pub services: Vec<String>,
}

/// `GET /api/services/{name}`: one service with its instances by origin, its dependents
/// and its access policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServiceDetail {
    /// The access policy targeting it; null when no AccessRule does.
    pub access: Option<AccessView>,
    /// Whether a MeshService declares it.
    pub declared: bool,
    /// Declared dependencies, as written.
    pub dependencies: Vec<String>,
    /// Services and connected proxies that depend on it.
    pub dependents: Dependents,
    /// Instances, healthy or not.
    pub instances: Vec<InstanceView>,
    /// `disabled`, `permissive` or `strict`.
    pub mtls: String,
    /// Its name.
    pub name: String,
    /// Instance counts by origin.
    pub origins: BTreeMap<String, OriginCount>,
    /// What its instances speak: `http`, `http2`, `grpc` or `tcp` (its first port's).
    #[serde(default)]
    pub protocol: String,
    /// Its first port, as its MeshService declares it.
    #[serde(default)]
    pub port: Option<u16>,
    /// `spec.http1.preserveHeaderCase`.
    #[serde(default)]
    pub preserve_header_case: bool,
    /// Its local rate limits (each of its proxies' own buckets); null when unlimited.
    #[serde(default)]
    pub rate_limit: Option<RateLimitView>,
    /// Its further ports (`spec.ports[1..]`), each reached as `NAME:PORT`.
    #[serde(default)]
    pub ports: Vec<PortView>,
    /// What callers' proxies reported of it (load reports).
    #[serde(default)]
    pub load: LoadView,
    /// Its migration, if it declares one: where traffic moves and how much moves now.
    #[serde(default)]
    pub migration: Option<MigrationView>,
}

/// A service's migration as in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationView {
    /// The new origin.
    pub to: String,
    /// Percent of requests it gets now (a plan's current step).
    pub weight: u32,
    /// Percent copied to it.
    pub mirror: u32,
    /// The plan's steps (empty: the weight is set by hand).
    pub steps: Vec<u32>,
    /// Where the plan stands, as its MeshService's `status.migration` says (null: no plan,
    /// or no status written yet).
    #[serde(default)]
    pub plan: Option<PlanView>,
    /// The operator's standing order (the annotation `meshbridge.io/migration`), if any.
    #[serde(default)]
    pub order: Option<String>,
}

/// Where a migration plan stands (`status.migration`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanView {
    /// Error rates the last decision was made on (`old`, `new`).
    pub error_rates: BTreeMap<String, String>,
    /// Why it stands there.
    pub message: String,
    /// When the next step is due (RFC 3339).
    pub next_step_at: Option<String>,
    /// `Progressing`, `Paused`, `RolledBack` or `Complete`.
    pub phase: String,
    /// The step in force (0-based).
    pub step: Option<u32>,
    /// Percent of requests sent to the new origin now.
    pub weight: u32,
}

impl From<&crate::api::mesh_service::MigrationStatus> for PlanView {
    fn from(m: &crate::api::mesh_service::MigrationStatus) -> Self {
        PlanView {
            error_rates: m.error_rates.clone(),
            message: m.message.clone(),
            next_step_at: m.next_step_at.clone(),
            phase: m.phase.clone(),
            step: m.step,
            weight: m.weight,
        }
    }
}

/// `GET /api/services/{name}/latency`: request times its callers' proxies measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyView {
    /// The proxies asked (the first by node id, at most a bound).
    pub asked: Vec<String>,
    /// Connected proxies holding a cluster of it.
    pub callers: usize,
    /// Proxies asked that did not answer, with why.
    pub errors: BTreeMap<String, String>,
    /// The service.
    pub service: String,
    /// By traffic: `live`, and `mirror` (a migration's copies, the new origin only).
    pub traffic: Vec<LatencyTraffic>,
}

/// Request times of one kind of traffic, over every proxy asked, since each started.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencyTraffic {
    /// Median, milliseconds (null without a request).
    pub p50_ms: Option<f64>,
    /// 90th percentile.
    pub p90_ms: Option<f64>,
    /// 99th percentile.
    pub p99_ms: Option<f64>,
    /// Requests measured.
    pub requests: u64,
    /// `live` or `mirror`.
    pub traffic: String,
}

/// `GET /api/migration`: the migration board.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BoardView {
    /// Who calls whom (service to service), sorted.
    pub edges: Vec<BoardEdge>,
    /// Dependencies beyond the most listed (see [`crate::admin::board::MAX_EDGES`]).
    pub edges_left_out: usize,
    /// How often proxies report their load.
    pub interval_seconds: f64,
    /// Every service (not its further ports), sorted by name.
    pub services: Vec<BoardService>,
    /// Counts over the mesh.
    pub summary: BoardSummary,
    /// How long the traffic figures cover.
    pub window_seconds: u64,
}

/// A dependency: `from` calls `to`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoardEdge {
    /// The caller.
    pub from: String,
    /// The service called.
    pub to: String,
}

/// One service on the board.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BoardService {
    /// Its migration, if it declares one.
    pub migration: Option<MigrationView>,
    /// Mirrored copies sent to it over the window (`requests`, `errors`, `error_rate`).
    pub mirror: Option<BoardOrigin>,
    /// `disabled`, `permissive` or `strict`.
    pub mtls: String,
    /// Its name.
    pub name: String,
    /// By origin (`consul`, `kubernetes`, `config`): instances and live traffic.
    pub origins: BTreeMap<String, BoardOrigin>,
    /// `hosts` (Consul or static endpoints), `pods`, `both` or `none`.
    pub runs_on: String,
}

/// A service's instances of one origin, and the live traffic they took over the window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BoardOrigin {
    /// Requests answered with an error (5xx, reset).
    pub errors: u64,
    /// `errors` over answered requests; null when none was answered.
    pub error_rate: Option<f64>,
    /// Healthy instances.
    pub healthy: usize,
    /// Instances.
    pub instances: usize,
    /// Instances callers reach over mutual TLS.
    pub mtls: usize,
    /// Requests sent to them.
    pub requests: u64,
    /// Their part of the service's live requests; null when it had none.
    pub share: Option<f64>,
    /// Requests answered without error.
    pub successes: u64,
}

/// Counts over the mesh.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoardSummary {
    /// Services running on both hosts and pods.
    pub both: usize,
    /// Services running on hosts only.
    pub hosts: usize,
    /// Instances.
    pub instances: usize,
    /// Services declaring a migration.
    pub migrating: usize,
    /// Instances callers reach over mutual TLS.
    pub mtls_instances: usize,
    /// Services without instances.
    pub none: usize,
    /// Services running on pods only.
    pub pods: usize,
    /// Services.
    pub services: usize,
}

/// `POST /api/services/{name}/migration`: an order written on a service's plan.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationOrderView {
    /// The annotation value written (`resume@TIME` for `resume`).
    pub annotation: String,
    /// The MeshService it was written on, `NAMESPACE/NAME`.
    pub object: String,
    /// The order: `pause`, `resume`, `rollback` or `promote`.
    pub order: String,
    /// Where the plan stood when the order was written; the leader carries the order out
    /// at its next reconcile.
    pub plan: Option<PlanView>,
    /// The standing order it replaced, if any.
    pub previous: Option<String>,
    /// The service.
    pub service: String,
}

/// Load reports about a service: what its callers' proxies sent to its instances.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadView {
    /// How often proxies report.
    pub interval_seconds: f64,
    /// Over the last minute, by origin, datacenter and traffic.
    pub last_minute: Vec<OriginLoad>,
    /// Over the last five minutes.
    pub last_5_minutes: Vec<OriginLoad>,
}

/// Requests to a service's instances of one origin in one datacenter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OriginLoad {
    /// `consul`, `kubernetes` or `config`.
    pub origin: String,
    /// Empty: the local datacenter.
    pub datacenter: String,
    /// `live` (callers' requests) or `mirror` (copies of them, answers discarded).
    pub traffic: String,
    /// Requests sent (each retry counts).
    pub requests: u64,
    /// Answered without error.
    pub successes: u64,
    /// Answered with a 5xx or lost to a reset.
    pub errors: u64,
    /// Connections that failed.
    pub failed_connections: u64,
    /// Errors per answered request; null before any answer.
    pub error_rate: Option<f64>,
    /// Its part of the service's live requests; null for mirrored traffic.
    pub share: Option<f64>,
}

/// A further port of a service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortView {
    /// Its name: callers depend on `SERVICE:NAME`.
    pub name: String,
    /// The port callers use.
    pub port: u16,
    /// The application's port.
    pub target_port: u16,
    /// `http`, `http2`, `grpc` or `tcp`.
    pub protocol: String,
}

/// `spec.rateLimit` as in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitView {
    /// The bucket of requests no path limit takes (null: not limited).
    pub service: Option<BucketView>,
    /// Path limits, in the order they are matched.
    pub paths: Vec<PathBucketView>,
}

/// A token bucket: `requests` per `per` (e.g. `1s`), at most `burst` at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketView {
    /// Tokens added per `per`.
    pub requests: u32,
    /// The period, e.g. `1s`.
    pub per: String,
    /// The bucket's size.
    pub burst: u32,
}

/// A path prefix's bucket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PathBucketView {
    /// The prefix.
    pub prefix: String,
    /// Its bucket.
    pub bucket: BucketView,
}

impl RateLimitView {
    /// The view of `limit`, or none when it limits nothing.
    pub fn of(limit: &crate::model::RateLimit) -> Option<RateLimitView> {
        let bucket = |b: &crate::model::TokenBucket| BucketView {
            requests: b.requests,
            per: humantime::format_duration(b.per).to_string(),
            burst: b.burst,
        };
        (!limit.is_unlimited()).then(|| RateLimitView {
            service: limit.service.as_ref().map(bucket),
            paths: limit
                .paths
                .iter()
                .map(|p| PathBucketView {
                    prefix: p.prefix.clone(),
                    bucket: bucket(&p.bucket),
                })
                .collect(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Access.

/// Callers a rule names: `"any"` or `{"service": NAME}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CallerView {
    /// Every caller.
    Any,
    /// A service name or a glob over service names.
    Service(String),
}

/// A path matcher: `{"exact"|"prefix"|"regex": text}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PathView {
    /// The whole path.
    Exact(String),
    /// A path prefix.
    Prefix(String),
    /// A regular expression over the whole path.
    Regex(String),
}

/// One allowed combination of callers, paths and methods.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    /// Who.
    pub from: Vec<CallerView>,
    /// Which methods (empty: all).
    pub methods: Vec<String>,
    /// Which paths (empty: all).
    pub paths: Vec<PathView>,
}

impl From<&AccessRuleSet> for RuleView {
    fn from(r: &AccessRuleSet) -> Self {
        RuleView {
            from: r
                .from
                .iter()
                .map(|c| match c {
                    CallerMatch::Any => CallerView::Any,
                    CallerMatch::Service(s) => CallerView::Service(s.clone()),
                })
                .collect(),
            methods: r.methods.clone(),
            paths: r
                .paths
                .iter()
                .map(|p| match p {
                    PathMatch::Exact(x) => PathView::Exact(x.clone()),
                    PathMatch::Prefix(x) => PathView::Prefix(x.clone()),
                    PathMatch::Regex(x) => PathView::Regex(x.clone()),
                })
                .collect(),
        }
    }
}

/// `GET /api/access` (one entry per target) and a service's `access`: the merged policy of
/// a target, with the callers its rules name split into known and unknown services.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessView {
    /// `deny` or `log`: what happens to calls no rule allows.
    pub action: String,
    /// Callers named by the rules that are services of the mesh.
    pub resolved_callers: Vec<String>,
    /// Allowed calls.
    pub rules: Vec<RuleView>,
    /// The resources the policy was merged from.
    pub sources: Vec<String>,
    /// The protected service.
    pub target: String,
    /// Whether the target is a service of the mesh.
    pub target_known: bool,
    /// Callers named by the rules that match no service.
    pub unknown_callers: Vec<String>,
}

impl AccessView {
    /// The view of `policy`, its callers resolved by the caller of this function.
    pub fn new(
        policy: &AccessPolicy,
        target_known: bool,
        resolved_callers: Vec<String>,
        unknown_callers: Vec<String>,
    ) -> Self {
        AccessView {
            action: match policy.action {
                crate::model::AccessAction::Deny => "deny",
                crate::model::AccessAction::Log => "log",
            }
            .to_string(),
            resolved_callers,
            rules: policy.rules.iter().map(RuleView::from).collect(),
            sources: policy.sources.clone(),
            target: policy.target.clone(),
            target_known,
            unknown_callers,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Proxies.

/// Per type URL: the last version sent, the last version ACKed, the last NACK message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeStatusView {
    /// Version the proxy last acknowledged.
    pub acked: Option<String>,
    /// Error detail of the last NACK, cleared by a later ACK.
    pub nack: Option<String>,
    /// Version of the last response sent.
    pub sent: Option<String>,
}

impl From<&TypeStatus> for TypeStatusView {
    fn from(t: &TypeStatus) -> Self {
        TypeStatusView {
            acked: t.acked.clone(),
            nack: t.nack.clone(),
            sent: t.sent.clone(),
        }
    }
}

/// `GET /api/proxies`: one entry per connected stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyView {
    /// Where meshbridge reaches its Envoy admin interface; null when it cannot.
    pub admin: Option<String>,
    /// Announced Envoy admin port.
    pub admin_port: Option<u16>,
    /// Seconds since the Unix epoch when the stream started.
    pub connected_at: u64,
    /// Announced diagnostics listener port.
    pub diagnostics_port: Option<u16>,
    /// Its group id.
    pub group: String,
    /// The service its client certificate proved.
    pub identity: Option<String>,
    /// `sotw` or `delta`.
    pub mode: String,
    /// `node.id`.
    pub node: String,
    /// Peer address of the stream.
    pub peer: Option<String>,
    /// Its service.
    pub service: String,
    /// Versions by type URL.
    pub types: ByTypeUrl<TypeStatusView>,
}

impl From<&ProxyStatus> for ProxyView {
    fn from(p: &ProxyStatus) -> Self {
        ProxyView {
            admin: p.admin.clone(),
            admin_port: p.admin_port,
            connected_at: p.connected_at,
            diagnostics_port: p.diagnostics_port,
            group: p.group.clone(),
            identity: p.identity.clone(),
            mode: p.mode.to_string(),
            node: p.node.clone(),
            peer: p.peer.clone(),
            service: p.service.clone(),
            types: p
                .types
                .iter()
                .map(|(url, t)| (url.clone(), t.into()))
                .collect(),
        }
    }
}

/// The resources of one type a proxy's group gets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceNames {
    /// Resource names.
    pub names: Vec<String>,
    /// Version of the type.
    pub version: String,
}

/// `GET /api/proxies/{node}`: the stream's status and what its group gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyDetail {
    /// See [`ProxyView::admin`].
    pub admin: Option<String>,
    /// See [`ProxyView::admin_port`].
    pub admin_port: Option<u16>,
    /// The dependencies the node announced.
    pub announced_dependencies: Vec<String>,
    /// See [`ProxyView::connected_at`].
    pub connected_at: u64,
    /// What translation uses: the announced ones merged with its MeshService's.
    pub dependencies: Vec<String>,
    /// See [`ProxyView::diagnostics_port`].
    pub diagnostics_port: Option<u16>,
    /// See [`ProxyView::group`].
    pub group: String,
    /// See [`ProxyView::identity`].
    pub identity: Option<String>,
    /// See [`ProxyView::mode`].
    pub mode: String,
    /// See [`ProxyView::node`].
    pub node: String,
    /// See [`ProxyView::peer`].
    pub peer: Option<String>,
    /// Resource names by type URL (empty before the group has a snapshot).
    pub resources: ByTypeUrl<ResourceNames>,
    /// See [`ProxyView::service`].
    pub service: String,
    /// The ports on 127.0.0.1 where the proxy accepts connections for its `tcp`
    /// dependencies, by service.
    #[serde(default)]
    pub tcp_ports: BTreeMap<String, u16>,
    /// See [`ProxyView::types`].
    pub types: ByTypeUrl<TypeStatusView>,
    /// Translation warnings of its group.
    pub warnings: Vec<String>,
}

impl ProxyDetail {
    /// The detail of `proxy` with what its group gets.
    pub fn new(
        proxy: ProxyView,
        announced_dependencies: Vec<String>,
        dependencies: Vec<String>,
        resources: ByTypeUrl<ResourceNames>,
        tcp_ports: BTreeMap<String, u16>,
        warnings: Vec<String>,
    ) -> Self {
        ProxyDetail {
            admin: proxy.admin,
            admin_port: proxy.admin_port,
            announced_dependencies,
            connected_at: proxy.connected_at,
            dependencies,
            diagnostics_port: proxy.diagnostics_port,
            group: proxy.group,
            identity: proxy.identity,
            mode: proxy.mode,
            node: proxy.node,
            peer: proxy.peer,
            resources,
            service: proxy.service,
            tcp_ports,
            types: proxy.types,
            warnings,
        }
    }
}

/// One resource of a snapshot, decoded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotResource {
    /// The decoded message, as Rust debug text.
    pub config: String,
    /// Its name.
    pub name: String,
    /// Its version.
    pub version: String,
}

/// The resources of one type of a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotType {
    /// The resources.
    pub resources: Vec<SnapshotResource>,
    /// Version of the type.
    pub version: String,
}

/// `GET /api/snapshot?node=ID`: the resources that node gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotView {
    /// Its group id.
    pub group: String,
    /// Its node id.
    pub node: String,
    /// Resources by type URL.
    pub resources: ByTypeUrl<SnapshotType>,
    /// Its service.
    pub service: String,
    /// Translation warnings of the group.
    pub warnings: Vec<String>,
}

/// `POST /api/proxies/{node}/logging`: the level set and what Envoy answered.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogLevelView {
    /// The Envoy admin address asked.
    pub admin: String,
    /// The level set.
    pub level: String,
    /// The one logger set; null for all.
    pub logger: Option<String>,
    /// The node id.
    pub node: String,
    /// Envoy's answer (its loggers and their levels).
    pub output: String,
}

/// A resource whose last update failed in Envoy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceError {
    /// Envoy's details.
    pub details: String,
    /// The resource.
    pub name: String,
}

/// What meshbridge sent of one type against what Envoy holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypeDiff {
    /// Version the proxy last ACKed.
    pub acked_version: Option<String>,
    /// How many resources Envoy holds active.
    pub envoy: usize,
    /// Resources whose last update failed.
    pub errors: Vec<ResourceError>,
    /// The last NACK message.
    pub nack: Option<String>,
    /// Active in Envoy, not sent.
    pub only_envoy: Vec<String>,
    /// Sent, neither active nor warming in Envoy.
    pub only_sent: Vec<String>,
    /// How many resources were sent.
    pub sent: usize,
    /// Version last sent.
    pub sent_version: Option<String>,
    /// Short name (`cds`, …).
    #[serde(rename = "type")]
    pub short_name: String,
    /// The type URL.
    pub type_url: String,
    /// Resources Envoy is warming.
    pub warming: Vec<String>,
}

/// `GET /api/proxies/{node}/diff`: what meshbridge sent against what the proxy runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConfigDiffView {
    /// Whether nothing differs, every response is ACKed and none NACKed.
    pub in_sync: bool,
    /// `sotw` or `delta`.
    pub mode: String,
    /// The node id.
    pub node: String,
    /// One entry per type, in push order.
    pub types: Vec<TypeDiff>,
}

// ---------------------------------------------------------------------------------------
// Sources, changes, audit.

/// `GET /api/sources`: one entry per source.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SourceView {
    /// The current problems, one line each; null when healthy.
    pub error: Option<String>,
    /// How many times the source entered an error, or its error changed.
    pub errors: u64,
    /// `consul`, `kubernetes` or `config`.
    pub kind: String,
    /// Seconds since the Unix epoch of the last successful sync.
    pub last_sync: Option<u64>,
    /// How long the last sync step took, in milliseconds.
    pub last_sync_duration_ms: Option<f64>,
    /// Source name, e.g. `config:/etc/meshbridge`.
    pub name: String,
    /// Seconds since the last successful sync.
    pub staleness_seconds: Option<u64>,
    /// Whether the first full sync completed.
    pub synced: bool,
}

impl From<&SourceStatus> for SourceView {
    fn from(s: &SourceStatus) -> Self {
        SourceView {
            error: s.error.clone(),
            errors: s.errors,
            kind: s.kind.to_string(),
            last_sync: s.last_sync,
            last_sync_duration_ms: s.last_sync_duration_ms,
            name: s.name.clone(),
            staleness_seconds: s.staleness_seconds,
            synced: s.synced,
        }
    }
}

/// `GET /api/changes` (newest first): what one published state changed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Change {
    /// Targets whose access policy appeared, changed or left.
    pub access_changed: Vec<String>,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// Time to rebuild the groups, in milliseconds.
    pub build_ms: f64,
    /// Index generation the state was built from.
    pub generation: u64,
    /// Groups whose snapshot changed and was pushed (at most
    /// [`super::changes::GROUPS_LISTED`] named).
    pub groups_pushed: Vec<String>,
    /// How many groups were pushed.
    pub groups_pushed_count: usize,
    /// Connected groups rebuilt.
    pub groups_rebuilt: usize,
    /// Services that appeared.
    pub services_added: Vec<String>,
    /// Services whose settings or instances changed.
    pub services_changed: Vec<String>,
    /// Services that left.
    pub services_removed: Vec<String>,
}

/// `GET /api/audit` (newest first): one action taken through the admin API.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// What was done, e.g. `log-level`.
    pub action: String,
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// The arguments, e.g. `level=debug`.
    pub detail: String,
    /// The address the request came from.
    pub from: Option<String>,
    /// The proxy acted on (empty when a service was).
    pub node: String,
    /// `ok`, or the error.
    pub result: String,
    /// The service acted on (a migration order), if not a proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Who the request says asked (see [`super::changes::requester`]): as trustworthy as
    /// whatever sets the header in front of the admin API.
    pub who: Option<String>,
}

// ---------------------------------------------------------------------------------------
// State and comparison.

/// `GET /api/state`: a digest of the whole model; with `?detail=true`, one per service and
/// per access target too.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StateView {
    /// Digest per access target (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub access_digests: Option<BTreeMap<String, String>>,
    /// How many access policies.
    pub access_policies: usize,
    /// Digest of the whole model.
    pub digest: String,
    /// How many instances, over every service.
    pub endpoints: usize,
    /// This instance's id.
    pub instance: String,
    /// Digest per service (detail only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_digests: Option<BTreeMap<String, String>>,
    /// How many services.
    pub services: usize,
}

/// How one service differs on a peer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceDifference {
    /// Why its details could not be fetched; absent when they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Fields that differ (`mtls`, `instances[ADDRESS:PORT].healthy`, …).
    pub fields: Vec<String>,
    /// Instances (`ADDRESS:PORT`) only here.
    pub instances_only_here: Vec<String>,
    /// Instances only on the peer.
    pub instances_only_there: Vec<String>,
    /// The service.
    pub name: String,
}

/// Where a peer's model differs from this instance's.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Differences {
    /// Access targets on both sides with different policies.
    pub access_changed: Vec<String>,
    /// Access targets only here.
    pub access_only_here: Vec<String>,
    /// Access targets only on the peer.
    pub access_only_there: Vec<String>,
    /// The first changed services, in detail.
    pub services_changed: Vec<ServiceDifference>,
    /// How many services changed (more than are detailed, possibly).
    pub services_changed_count: usize,
    /// Services only here.
    pub services_only_here: Vec<String>,
    /// Services only on the peer.
    pub services_only_there: Vec<String>,
}

/// One peer compared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerComparison {
    /// Whether its digest equals this instance's.
    pub agree: bool,
    /// Where it differs; null when it could not be compared.
    pub differences: Option<Differences>,
    /// Its digest; null when it could not be read.
    pub digest: Option<String>,
    /// The first error comparing it.
    pub error: Option<String>,
    /// Its admin URL.
    pub peer: String,
}

/// This instance, as compared.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfDigest {
    /// Digest of its model.
    pub digest: String,
    /// Its id.
    pub instance: String,
}

/// `GET /api/compare`: this instance's digest against every peer's.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompareView {
    /// Whether every peer agrees; null when no peer is configured.
    pub agree: Option<bool>,
    /// Why the peers could not be listed (`--peers-dns`).
    pub error: Option<String>,
    /// Every peer but this instance.
    pub peers: Vec<PeerComparison>,
    /// This instance.
    #[serde(rename = "self")]
    pub this: SelfDigest,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_follow_the_resource_types() {
        assert_eq!(type_short_names(), ["cds", "eds", "lds", "rds", "sds"]);
        for t in ResourceType::ALL {
            assert_eq!(type_short_name(t.type_url()), t.short_name());
        }
        assert_eq!(
            type_short_name("type.googleapis.com/envoy.service.runtime.v3.Runtime"),
            "Runtime"
        );
    }
}

/// `GET /api/services/{name}/ejections`: instances of a service its callers' proxies have
/// ejected (outlier detection).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EjectionsView {
    /// The service.
    pub service: String,
    /// Connected proxies holding a cluster of it.
    pub callers: usize,
    /// The proxies asked (the first by node id, at most a bound).
    pub asked: Vec<String>,
    /// Proxies asked that did not answer, with why.
    pub errors: BTreeMap<String, String>,
    /// Instances some proxy has ejected, by address.
    pub ejected: Vec<EjectedInstance>,
}

/// An instance ejected by some callers' proxies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EjectedInstance {
    /// `address:port`.
    pub instance: String,
    /// The proxies (node ids) that have it ejected.
    pub by: BTreeSet<String>,
    /// In which of the service's clusters (its own, canary, policy variants).
    pub clusters: BTreeSet<String>,
}
