//! `MeshService`: a service in the mesh, wherever its instances run.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A service in the mesh: its ports, the instances registered by manifest, and what it calls.
///
/// Service names are mesh-wide, like Consul's: a Consul service and a MeshService of the same
/// name are one service whose instances come from both.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "meshbridge.io",
    version = "v1alpha1",
    kind = "MeshService",
    doc = "A service in the mesh, wherever its instances run: its ports, the hosts registered by manifest, and what it calls.",
    namespaced,
    status = "MeshServiceStatus",
    shortname = "msvc",
    printcolumn = r#"{"name":"Service","type":"string","jsonPath":".spec.serviceName"}"#,
    printcolumn = r#"{"name":"mTLS","type":"string","jsonPath":".spec.mtls"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshServiceSpec {
    /// Mesh-wide service name; equals the Consul service name. Defaults to `metadata.name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
    )]
    pub service_name: Option<String>,

    /// Labels of the pods backing this service. Omit for a service with no pods (legacy hosts
    /// only, from Consul or `endpoints`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<BTreeMap<String, String>>,

    /// Ports the service listens on, at most 17. The first is the service itself; each
    /// further port needs a `name` and is reached by callers that depend on `SERVICE:NAME`
    /// (`orders:admin`), with its own protocol, behind the same AccessRules.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 17))]
    pub ports: Vec<ServicePort>,

    /// Whether callers must use mutual TLS towards this service. `permissive` accepts plaintext
    /// and TLS during a migration. Default `disabled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsMode>,

    /// Publication of the Kubernetes instances into Consul for legacy callers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consul: Option<ConsulRegistration>,

    /// Hosts registered by manifest (VMs, Mesos tasks), like Istio's WorkloadEntry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<StaticEndpoint>,

    /// The services and external domains this service calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependencies: Vec<DependencySpec>,

    /// HTTP/1 behaviour of this service's proxies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1: Option<Http1Spec>,

    /// Local rate limits enforced by the ingress proxy of each instance: requests beyond them
    /// are answered `429` with `x-meshbridge-reason: rate-limited` and never reach the
    /// application. Each proxy keeps its own token buckets, so the service as a whole admits
    /// up to the limit times the number of its instances with a proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimitSpec>,

    /// Moving the service from one origin's instances to another's (Consul hosts to pods):
    /// a share of callers' requests by origin whatever the instance counts, a mirrored copy
    /// before that, and an automatic, checked and reversible plan of steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationSpec>,
}

/// A migration towards the instances of one origin.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MigrationSpec {
    /// The origin traffic moves to; the instances of every other origin are the old ones.
    pub to: MigrationOrigin,
    /// Percent of callers' requests sent to the new origin's instances, whatever the
    /// instance counts; the rest go to the old ones. An origin without a healthy instance
    /// gets none. Ignored with `steps`: the plan's status holds the weight in force.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub weight: Option<u32>,
    /// Percent of requests also copied to the new origin's instances, their answers
    /// discarded (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub mirror: Option<u32>,
    /// An automatic plan: the weights to go through, increasing, e.g. `[1, 5, 25, 50, 100]`;
    /// at most 20.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub steps: Vec<u32>,
    /// Time between two steps, e.g. `5m` (default `5m`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// How much higher than the old origin's the new origin's error rate may be over an
    /// interval, e.g. `1%` (default `1%`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^[0-9]{1,3}(\.[0-9]{1,2})?%$"))]
    pub max_error_rate_increase: Option<String>,
}

/// Where instances come from.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MigrationOrigin {
    /// Pods selected by the MeshService.
    #[default]
    Kubernetes,
    /// Instances in the Consul catalog.
    Consul,
    /// The MeshService's static `endpoints`.
    Config,
}

/// Local rate limits of a service: one for every request (`requests`), and one per path
/// prefix (`paths`). A request counts against one bucket only: the longest `paths` prefix
/// matching its path, else the service-wide limit.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Requests admitted per `per` by each instance's proxy, for requests no `paths` entry
    /// matches, 1–1000000. Omit for no service-wide limit (only `paths`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests: Option<u32>,
    /// The period `requests` are counted over, e.g. `1s`, `1m`; 50ms–24h. Default `1s`.
    /// Tokens are refilled continuously (`requests: 60, per: 1m` is one a second).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<String>,
    /// Requests admitted at once after a quiet period (the bucket's size), 1–1000000.
    /// Default `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub burst: Option<u32>,
    /// Limits of their own for the requests whose path starts with a prefix, at most 64, each
    /// prefix once (a list keyed by `prefix`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 64),
        extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["prefix"])
    )]
    pub paths: Vec<PathRateLimitSpec>,
}

/// A rate limit of its own for the requests whose path starts with `prefix`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathRateLimitSpec {
    /// Path prefix, e.g. `/api/`: a string prefix of the normalized path, as in AccessRule
    /// paths (`/api` also matches `/apis`). Each prefix may appear once.
    #[schemars(length(min = 1, max = 1024), regex(pattern = r"^/[^\s]*$"))]
    pub prefix: String,
    /// Requests admitted per `per` by each instance's proxy, 1–1000000.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests: u32,
    /// The period `requests` are counted over; 50ms–24h. Default `1s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<String>,
    /// Requests admitted at once after a quiet period, 1–1000000. Default `requests`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub burst: Option<u32>,
}

/// HTTP/1 behaviour of a service's proxies.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Http1Spec {
    /// Keep the case of the HTTP/1 header names this service sends (Envoy lower-cases them
    /// otherwise), for clients and servers that compare names case-sensitively: what its
    /// instances answer reaches every caller spelled as sent, and what its application sends
    /// reaches the services it calls spelled as sent.
    #[serde(default)]
    pub preserve_header_case: bool,
}

/// A port of the service.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// Port name, e.g. `http`; required on every port but the first. A pod's sidecar serves
    /// a further port for the pod's container port of the same name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 15),
        regex(pattern = r"^[a-z0-9]([a-z0-9-]*[a-z0-9])?$")
    )]
    pub name: Option<String>,
    /// The port callers use.
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,
    /// The port the application listens on; defaults to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub target_port: Option<u32>,
    /// Application protocol: what callers' proxies speak to the instances on this port
    /// (`http2` and `grpc`: HTTP/2; `tcp`: connections, each caller reaching the port on a
    /// port of its own, see `dependencies[].port`). Default `http`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<PortProtocol>,
}

/// Application protocol of a port.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// HTTP/1.1 (and HTTP/2 with prior knowledge).
    Http,
    /// HTTP/2.
    Http2,
    /// gRPC over HTTP/2.
    Grpc,
    /// Opaque TCP.
    Tcp,
}

/// Mutual TLS requirement of a service.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    /// Plaintext only.
    #[default]
    Disabled,
    /// Plaintext and mutual TLS are both accepted.
    Permissive,
    /// Only mutual TLS callers are accepted.
    Strict,
}

/// Registration of Kubernetes instances into Consul.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ConsulRegistration {
    /// Register ready pod instances into Consul.
    #[serde(default)]
    pub register: bool,
    /// Tags added to every registration (`k8s` is always added).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
}

/// A host registered by manifest.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StaticEndpoint {
    /// IP address (v4 or v6) of the host (proxies take IP addresses only, not host names).
    #[schemars(length(min = 1))]
    pub address: String,
    /// Port on which the host serves the service (its Envoy ingress port, if it has one).
    #[schemars(range(min = 1, max = 65535))]
    pub port: u32,
    /// Tags, with the same meaning as Consul tags: `canary`, `weight:N`, `mtls`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Load-balancing weight, 1–128. Default 1 (or the `weight:N` tag).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 128))]
    pub weight: Option<u32>,
    /// Datacenter of the host; instances outside the local datacenter get a lower priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// Where the host serves the service's further ports, by port name (`admin: 15007`):
    /// its Envoy's listener for that port, if it has one. A port left out is not served by
    /// this host.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = 16))]
    pub ports: BTreeMap<String, u32>,
}

/// Something the service calls: exactly one of `service` or `domain`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DependencySpec {
    /// A mesh service name, `SERVICE:PORT` for a further named port of one, or `"*"` for
    /// every service (only where the operator allows it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// An external domain, `https://host[:port]` or `http://host[:port]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^/:]+(:[0-9]{1,5})?/?$"))]
    pub domain: Option<String>,
    /// Request timeout, e.g. `2s` or `1500ms`. Default 15s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// Retry policy. Default: one retry on connection failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<RetrySpec>,
    /// Passive health checking of the called service's instances (`service` dependencies
    /// only). Fields left out keep their defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// Connection and request limits towards the called service (`service` dependencies
    /// only). Fields left out keep their defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit_breakers: Option<CircuitBreakersSpec>,
    /// HTTP/1 behaviour towards this dependency (`service` dependencies): overrides the called
    /// service's `spec.http1` for this caller; `preserveHeaderCase: true` also keeps the case
    /// of what this service's application sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http1: Option<Http1Spec>,
    /// Let WebSocket upgrades through to the service (`service` dependencies). Default: on
    /// towards an HTTP/1 service, off towards `http2` and `grpc` ones.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub websocket: Option<bool>,
    /// For a `tcp` service (or port, `SERVICE:NAME`): the port on 127.0.0.1 where this
    /// service's proxy accepts connections for it. Default: the called port's own number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u32>,
}

/// Passive health checking: an instance that keeps failing is ejected from load balancing
/// for a while.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct OutlierDetectionSpec {
    /// Consecutive 5xx responses (or connection failures) that eject an instance, 1–1000.
    /// Default 5.
    #[serde(
        rename = "consecutive5xx",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_5xx: Option<u32>,
    /// Consecutive 502, 503 or 504 responses that eject an instance, 1–1000. Default 5.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_gateway_failure: Option<u32>,
    /// Time between ejection sweeps, which also return ejected instances, e.g. `10s`.
    /// Default 10s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
    /// How long an instance is ejected for, multiplied by the times it has been ejected, e.g.
    /// `30s`. Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    /// Largest share of the instances ejected at once, in percent, 0–100. Default 50.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 100))]
    pub max_ejection_percent: Option<u32>,
}

/// Limits per calling proxy: requests beyond them fail at once (503) instead of queueing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakersSpec {
    /// Connections to all instances, 1–1000000. Default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection, 1–1000000. Default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_pending_requests: Option<u32>,
    /// Requests in flight, 1–1000000. Default 1024.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub max_requests: Option<u32>,
    /// Retries in flight, 0–1000000. Default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 1_000_000))]
    pub max_retries: Option<u32>,
}

/// Retry policy for calls to a dependency.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetrySpec {
    /// Number of retries (not counting the first attempt), 0–10.
    #[schemars(range(min = 0, max = 10))]
    pub attempts: u32,
    /// Conditions that trigger a retry: `5xx`, `gateway-error`, `reset`, `connect-failure`,
    /// `retriable-4xx`, `refused-stream`, `retriable-status-codes`, and the gRPC statuses
    /// `unavailable`, `cancelled`, `deadline-exceeded`, `resource-exhausted`. Default
    /// `connect-failure`, `refused-stream` (and `unavailable` towards a `grpc` service).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on: Vec<String>,
    /// Timeout of each attempt, e.g. `500ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<String>,
}

/// Observed state of a MeshService.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MeshServiceStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, and `Degraded` when something is wrong.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Instance counts by origin (`kubernetes`, `consul`, `config`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub instances: BTreeMap<String, u32>,
    /// Where `spec.migration` stands. With `steps`, the record of the plan: the weight in
    /// force is this one, and another leader or a restart carries on from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
}

/// Where a migration stands.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MigrationStatus {
    /// `Manual` (no `steps`: the weight is the spec's), `Progressing`, `Paused`,
    /// `RolledBack` or `Complete`.
    pub phase: String,
    /// The new origin.
    pub to: String,
    /// The plan this progress belongs to (its steps, e.g. `5,50,100`): a changed plan starts
    /// again.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub plan: String,
    /// The step in force (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<u32>,
    /// Percent of requests sent to the new origin now.
    pub weight: u32,
    /// When the step in force started (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_started_at: Option<String>,
    /// When the next step is due, if the new origin does not do worse (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_step_at: Option<String>,
    /// Error rates the last decision was made on, over one interval, from the load reports:
    /// `old` and `new` origins, e.g. `0.50%` (`-`: no request answered).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub error_rates: BTreeMap<String, String>,
    /// Why it stands there (the numbers of a roll-back).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// The token of the last `resume@TOKEN` order carried out.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub resumed: String,
}

/// A status condition, following the Kubernetes API conventions.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// Machine-readable reason in CamelCase.
    #[serde(default)]
    pub reason: String,
    /// Human-readable message.
    #[serde(default)]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}
