//! Prometheus metrics, all prefixed `meshbridge_`, served on `/metrics`. Each family's
//! labels are a typed set from [`label`] (a misspelt label does not compile; the label
//! schema is the code), and each component's families are registered by its own function.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// The label sets of the families. Values known in advance are `&'static str` (no
/// allocation per event); the rest (`dc`, `source`, `peer`) are bounded by configuration.
pub mod label {
    use prometheus_client::encoding::EncodeLabelSet;

    /// `mode`: `sotw` or `delta`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Mode {
        pub mode: &'static str,
    }

    /// `type` (`cds`, `eds`, `lds`, `rds`) and `mode`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct TypeMode {
        pub r#type: &'static str,
        pub mode: &'static str,
    }

    /// `type`: a resource type's short name.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Type {
        pub r#type: &'static str,
    }

    /// `limit`: one of `crate::xds::LIMITS`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Limit {
        pub limit: &'static str,
    }

    /// `result` alone.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Outcome {
        pub result: &'static str,
    }

    /// What load reports are about: a `service`, its instances' `origin`, and whether the
    /// requests were callers' own or mirrored copies (`traffic`: `live`, `mirror`).
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ServiceOrigin {
        pub service: String,
        pub origin: String,
        pub traffic: &'static str,
    }

    /// A Consul datacenter and the request's `result`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct DcResult {
        pub dc: String,
        pub result: &'static str,
    }

    /// A catalog write's `operation` and `result`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct OperationResult {
        pub operation: &'static str,
        pub result: &'static str,
    }

    /// A webhook `path` and the review's `result`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct PathResult {
        pub path: &'static str,
        pub result: &'static str,
    }

    /// A diagnostics `action` and its `result`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct ActionResult {
        pub action: &'static str,
        pub result: &'static str,
    }

    /// A source's name (`config`, `consul:DC`, `kubernetes`).
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Source {
        pub source: String,
    }

    /// A peer instance's admin URL.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Peer {
        pub peer: String,
    }

    /// A supervised task's name.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Task {
        pub task: &'static str,
    }

    /// The build's `version`.
    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    pub struct Version {
        pub version: &'static str,
    }
}

use label::*;

/// Every metric meshbridge exports.
pub struct Metrics {
    registry: Registry,
    /// Connected xDS streams by mode (`sotw`, `delta`).
    pub xds_streams: Family<Mode, Gauge>,
    /// Streams refused (bad node metadata).
    pub xds_refused: Counter,
    /// Streams ended by a limit, by limit (`streams`, `groups`, `names`, `first_request`).
    pub xds_limited: Family<Limit, Counter>,
    /// Streams checked against their client certificate, by result (`verified`, `absent`,
    /// `mismatch`).
    pub xds_identity: Family<Outcome, Counter>,
    /// When each rate-limited log line was last written.
    log_times: std::sync::Mutex<std::collections::HashMap<&'static str, std::time::Instant>>,
    /// Responses sent, by type and mode.
    pub xds_responses: Family<TypeMode, Counter>,
    /// Bytes of resources sent, by type.
    pub xds_bytes: Family<Type, Counter>,
    /// ACKs received, by type.
    pub xds_acks: Family<Type, Counter>,
    /// NACKs received, by type.
    pub xds_nacks: Family<Type, Counter>,
    /// Proxy groups with a connected stream.
    pub snapshot_groups: Gauge,
    /// Snapshots that failed the consistency check and were not published.
    pub snapshot_inconsistent: Counter,
    /// Time to rebuild every connected group's snapshot after a change (seconds).
    pub snapshot_build_seconds: Histogram,
    /// Debounced batches applied (one new mesh state each).
    pub debounce_batches: Counter,
    /// Services in the mesh state.
    pub services: Gauge,
    /// Endpoints in the mesh state (healthy or not).
    pub endpoints: Gauge,
    /// Services protected by at least one AccessRule.
    pub access_policies: Gauge,
    /// Callers named by AccessRules that match no known service (see `/api/access`).
    pub access_unknown_callers: Gauge,
    /// Manifest files currently rejected (their last good state stays in force).
    pub config_errors: Gauge,
    /// Services that lost every instance in one change (applied, but worth a look).
    pub services_emptied: Counter,
    /// Requests to Consul by datacenter and result (`ok`, `error`).
    pub consul_requests: Family<DcResult, Counter>,
    /// Status writes to MeshServices and AccessRules (leader only).
    pub status_writes: Counter,
    /// Whether this replica holds the leader Lease (1) or not (0).
    pub leader: Gauge,
    /// Consul catalog writes for Kubernetes instances by operation (`register`,
    /// `deregister`) and result (`ok`, `error`).
    pub consul_registrations: Family<OperationResult, Counter>,
    /// Pods the Kubernetes source keeps.
    pub kube_pods: Gauge,
    /// Admission reviews by path and result (`patched`, `allowed`, `denied`, `malformed`).
    pub webhook_requests: Family<PathResult, Counter>,
    /// Time to answer an admission review.
    pub webhook_seconds: Histogram,
    /// Whether a source completed its first sync (1) or not (0), by source.
    pub source_synced: Family<Source, Gauge>,
    /// Seconds since a source last synced successfully, by source (set when scraped).
    pub source_staleness_seconds: Family<Source, Gauge>,
    /// Times a source entered an error or its error changed (a failed request, a rejected
    /// manifest, a broken watch).
    pub source_errors: Family<Source, Counter>,
    /// Time one sync step of a source took (a config-dir scan, a Consul service fetch, the
    /// Kubernetes initial list), by source.
    pub source_sync_seconds: Family<Source, Histogram>,
    /// Objects each source holds in the index.
    pub index_objects: Family<Source, Gauge>,
    /// Time to build and encode one group's snapshot.
    pub snapshot_group_build_seconds: Histogram,
    /// Group snapshots that changed and woke their streams.
    pub snapshot_group_pushes: Counter,
    /// Group snapshots built: a new group's first, and each one a change can affect.
    pub snapshot_group_builds: Counter,
    /// Streams subscribed to a resource type, by type and mode.
    pub xds_subscriptions: Family<TypeMode, Gauge>,
    /// Time from sending a response to its ACK or NACK, by type.
    pub xds_ack_seconds: Family<Type, Histogram>,
    /// Envoy admin requests made for the admin API, by action and result.
    pub diagnostics_requests: Family<ActionResult, Counter>,
    /// Whether a peer meshbridge instance agrees with this one (1) or not (0), by peer.
    pub peer_agree: Family<Peer, Gauge>,
    /// Always 1, labelled with the version.
    pub build_info: Family<Version, Gauge>,
    /// Supervised tasks that ended before shutdown (the process then exits 1), by task.
    pub tasks_ended: Family<Task, Counter>,
    /// Migration plans rolled back (the new origin did worse than the old).
    pub migration_rollbacks: Counter,
    /// Load reports received, by result (`accepted`, `dropped`: faster than asked,
    /// `refused`: a stream refused).
    pub load_reports: Family<Outcome, Counter>,
    /// Requests callers' proxies reported sending, by service, origin and traffic.
    pub load_requests: Family<ServiceOrigin, Counter>,
    /// Of those, answered with an error (5xx or reset).
    pub load_errors: Family<ServiceOrigin, Counter>,
}

fn sync_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

fn ack_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Whether a log line of kind `key` may be written now: at most once per `every` (the
    /// counters count every occurrence).
    pub fn log_allowed(&self, key: &'static str, every: std::time::Duration) -> bool {
        let now = std::time::Instant::now();
        let mut times = self.log_times.lock().unwrap_or_else(|p| p.into_inner());
        match times.get(key) {
            Some(last) if now.duration_since(*last) < every => false,
            _ => {
                times.insert(key, now);
                true
            }
        }
    }

    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("meshbridge"),
            xds_streams: Family::default(),
            xds_refused: Counter::default(),
            xds_limited: Family::default(),
            xds_identity: Family::default(),
            log_times: Default::default(),
            xds_responses: Family::default(),
            xds_bytes: Family::default(),
            xds_acks: Family::default(),
            xds_nacks: Family::default(),
            snapshot_groups: Gauge::default(),
            snapshot_inconsistent: Counter::default(),
            snapshot_build_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 14)),
            debounce_batches: Counter::default(),
            services: Gauge::default(),
            endpoints: Gauge::default(),
            access_policies: Gauge::default(),
            access_unknown_callers: Gauge::default(),
            config_errors: Gauge::default(),
            services_emptied: Counter::default(),
            consul_requests: Family::default(),
            status_writes: Counter::default(),
            leader: Gauge::default(),
            consul_registrations: Family::default(),
            kube_pods: Gauge::default(),
            webhook_requests: Family::default(),
            webhook_seconds: Histogram::new(exponential_buckets(0.00002, 2.0, 14)),
            source_synced: Family::default(),
            source_staleness_seconds: Family::default(),
            source_errors: Family::default(),
            source_sync_seconds: Family::new_with_constructor(sync_histogram),
            index_objects: Family::default(),
            snapshot_group_build_seconds: Histogram::new(exponential_buckets(0.00001, 2.0, 18)),
            snapshot_group_pushes: Counter::default(),
            snapshot_group_builds: Counter::default(),
            xds_subscriptions: Family::default(),
            xds_ack_seconds: Family::new_with_constructor(ack_histogram),
            diagnostics_requests: Family::default(),
            peer_agree: Family::default(),
            build_info: Family::default(),
            tasks_ended: Family::default(),
            migration_rollbacks: Counter::default(),
            load_reports: Family::default(),
            load_requests: Family::default(),
            load_errors: Family::default(),
        };
        m.register_xds();
        m.register_snapshots();
        m.register_mesh();
        m.register_sources();
        m.register_kubernetes();
        m.register_admin();
        m.build_info
            .get_or_create(&Version {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        m.preset_series();
        m
    }

    /// Registers the xDS server: streams, responses, ACKs, limits, identities.
    fn register_xds(&mut self) {
        self.registry.register(
            "xds_streams",
            "Connected xDS streams",
            self.xds_streams.clone(),
        );
        self.registry.register(
            "xds_refused_streams",
            "xDS streams refused for bad node metadata",
            self.xds_refused.clone(),
        );
        self.registry.register(
            "xds_limited",
            "xDS streams ended by a limit (the run flags --xds-max-*, --xds-first-request-timeout)",
            self.xds_limited.clone(),
        );
        self.registry.register(
            "xds_identity",
            "xDS streams checked against their client certificate (--xds-client-auth), by result",
            self.xds_identity.clone(),
        );
        self.registry.register(
            "xds_responses",
            "xDS responses sent",
            self.xds_responses.clone(),
        );
        self.registry.register(
            "xds_sent_bytes",
            "Bytes of xDS resources sent",
            self.xds_bytes.clone(),
        );
        self.registry
            .register("xds_acks", "xDS ACKs received", self.xds_acks.clone());
        self.registry
            .register("xds_nacks", "xDS NACKs received", self.xds_nacks.clone());
        self.registry.register(
            "xds_subscriptions",
            "Streams subscribed to a resource type",
            self.xds_subscriptions.clone(),
        );
        self.registry.register(
            "xds_ack_seconds",
            "Time from sending an xDS response to its ACK or NACK",
            self.xds_ack_seconds.clone(),
        );
        self.registry.register(
            "migration_rollbacks",
            "Migration plans rolled back because the new origin answered with more errors than allowed",
            self.migration_rollbacks.clone(),
        );
        self.registry.register(
            "load_reports",
            "Load reports (LRS) received from proxies, by result",
            self.load_reports.clone(),
        );
        self.registry.register(
            "load_requests",
            "Requests proxies reported sending to a service's instances, by origin and traffic (live or mirror)",
            self.load_requests.clone(),
        );
        self.registry.register(
            "load_errors",
            "Requests proxies reported answered with an error (5xx or reset), by service, origin and traffic",
            self.load_errors.clone(),
        );
    }

    /// Registers the snapshot cache and the publisher.
    fn register_snapshots(&mut self) {
        self.registry.register(
            "snapshot_groups",
            "Proxy groups with a connected stream",
            self.snapshot_groups.clone(),
        );
        self.registry.register(
            "snapshot_inconsistent",
            "Snapshots refused by the consistency check",
            self.snapshot_inconsistent.clone(),
        );
        self.registry.register(
            "snapshot_build_seconds",
            "Time to rebuild connected groups after a change",
            self.snapshot_build_seconds.clone(),
        );
        self.registry.register(
            "debounce_batches",
            "Debounced change batches applied",
            self.debounce_batches.clone(),
        );
        self.registry.register(
            "snapshot_group_build_seconds",
            "Time to build and encode one group's snapshot",
            self.snapshot_group_build_seconds.clone(),
        );
        self.registry.register(
            "snapshot_group_pushes",
            "Group snapshots that changed and woke their streams",
            self.snapshot_group_pushes.clone(),
        );
        self.registry.register(
            "snapshot_group_builds",
            "Group snapshots built (a new group's first, and each one a change can affect)",
            self.snapshot_group_builds.clone(),
        );
    }

    /// Registers the mesh state the index publishes.
    fn register_mesh(&mut self) {
        self.registry.register(
            "services",
            "Services in the mesh state",
            self.services.clone(),
        );
        self.registry.register(
            "endpoints",
            "Endpoints in the mesh state",
            self.endpoints.clone(),
        );
        self.registry.register(
            "access_policies",
            "Services protected by at least one AccessRule",
            self.access_policies.clone(),
        );
        self.registry.register(
            "access_unknown_callers",
            "Callers named by AccessRules that match no known service",
            self.access_unknown_callers.clone(),
        );
        self.registry.register(
            "services_emptied",
            "Changes that removed every instance of a service",
            self.services_emptied.clone(),
        );
        self.registry.register(
            "index_objects",
            "Objects each source holds in the index",
            self.index_objects.clone(),
        );
    }

    /// Registers the sources: their sync, staleness and errors; Consul requests; rejected manifests.
    fn register_sources(&mut self) {
        self.registry.register(
            "config_errors",
            "Manifest files currently rejected",
            self.config_errors.clone(),
        );
        self.registry.register(
            "consul_requests",
            "Requests to Consul by datacenter and result",
            self.consul_requests.clone(),
        );
        self.registry.register(
            "source_synced",
            "Whether a source completed its first sync",
            self.source_synced.clone(),
        );
        self.registry.register(
            "source_staleness_seconds",
            "Seconds since a source last synced successfully",
            self.source_staleness_seconds.clone(),
        );
        self.registry.register(
            "source_errors",
            "Times a source entered an error or its error changed",
            self.source_errors.clone(),
        );
        self.registry.register(
            "source_sync_seconds",
            "Time one sync step of a source took: a config-dir scan, a Consul service fetch, the Kubernetes initial list",
            self.source_sync_seconds.clone(),
        );
    }

    /// Registers the Kubernetes side: status writes, the Lease, the Consul registration, pods, the webhook.
    fn register_kubernetes(&mut self) {
        self.registry.register(
            "status_writes",
            "Status writes to MeshServices and AccessRules",
            self.status_writes.clone(),
        );
        self.registry.register(
            "leader",
            "Whether this replica holds the leader Lease",
            self.leader.clone(),
        );
        self.registry.register(
            "consul_registrations",
            "Consul catalog writes for Kubernetes instances by operation and result",
            self.consul_registrations.clone(),
        );
        self.registry.register(
            "kube_pods",
            "Pods the Kubernetes source keeps",
            self.kube_pods.clone(),
        );
        self.registry.register(
            "webhook_requests",
            "Admission reviews by path and result",
            self.webhook_requests.clone(),
        );
        self.registry.register(
            "webhook_seconds",
            "Time to answer an admission review",
            self.webhook_seconds.clone(),
        );
    }

    /// Registers the admin API's diagnostics and peer comparisons, and the build.
    fn register_admin(&mut self) {
        self.registry.register(
            "diagnostics_requests",
            "Envoy admin requests made for the admin API by action and result",
            self.diagnostics_requests.clone(),
        );
        self.registry.register(
            "peer_agree",
            "Whether a peer meshbridge instance agrees with this one",
            self.peer_agree.clone(),
        );
        self.registry
            .register("build_info", "meshbridge version", self.build_info.clone());
        self.registry.register(
            "tasks_ended",
            "Supervised tasks that ended before shutdown (the process then exits 1)",
            self.tasks_ended.clone(),
        );
    }

    /// Creates the series whose label values are known in advance at zero, so rates and
    /// alerts work before the first event and every family is listed from the start.
    fn preset_series(&self) {
        let types =
            crate::snapshot::ResourceType::ALL.map(crate::snapshot::ResourceType::short_name);
        const MODES: [&str; 2] = ["sotw", "delta"];
        for mode in MODES {
            let _ = self.xds_streams.get_or_create(&Mode { mode });
            for t in types {
                let l = TypeMode { r#type: t, mode };
                let _ = self.xds_subscriptions.get_or_create(&l);
                let _ = self.xds_responses.get_or_create(&l);
            }
        }
        for t in types {
            let l = Type { r#type: t };
            let _ = self.xds_bytes.get_or_create(&l);
            let _ = self.xds_acks.get_or_create(&l);
            let _ = self.xds_nacks.get_or_create(&l);
            let _ = self.xds_ack_seconds.get_or_create(&l);
        }
        for limit in crate::xds::LIMITS {
            let _ = self.xds_limited.get_or_create(&Limit { limit });
        }
        for result in ["verified", "absent", "mismatch"] {
            let _ = self.xds_identity.get_or_create(&Outcome { result });
        }
        for result in ["accepted", "dropped", "refused"] {
            let _ = self.load_reports.get_or_create(&Outcome { result });
        }
        for action in [
            "config_dump",
            "stats",
            "clusters",
            "logging",
            "diff",
            "ejections",
            "latency",
        ] {
            for result in ["ok", "refused", "unreachable", "busy"] {
                let _ = self
                    .diagnostics_requests
                    .get_or_create(&ActionResult { action, result });
            }
        }
        for operation in ["register", "deregister"] {
            for result in ["ok", "error"] {
                let _ = self
                    .consul_registrations
                    .get_or_create(&OperationResult { operation, result });
            }
        }
        for path in ["/inject", "/validate"] {
            for result in ["patched", "allowed", "denied", "malformed"] {
                let _ = self
                    .webhook_requests
                    .get_or_create(&PathResult { path, result });
            }
        }
    }

    /// Records one admission review.
    pub fn observe_webhook(
        &self,
        path: &'static str,
        result: &'static str,
        elapsed: std::time::Duration,
    ) {
        self.webhook_requests
            .get_or_create(&PathResult { path, result })
            .inc();
        self.webhook_seconds.observe(elapsed.as_secs_f64());
    }

    /// The metrics in Prometheus text format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
