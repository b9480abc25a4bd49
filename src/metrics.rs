//! Prometheus metrics, all prefixed `meshbridge_`, served on `/metrics`.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Every metric meshbridge exports.
pub struct Metrics {
    registry: Registry,
    /// Connected xDS streams by mode (`sotw`, `delta`).
    pub xds_streams: Family<Labels, Gauge>,
    /// Streams refused (bad node metadata).
    pub xds_refused: Counter,
    /// Streams ended by a limit, by limit (`streams`, `groups`, `names`, `first_request`).
    pub xds_limited: Family<Labels, Counter>,
    /// Streams checked against their client certificate, by result (`verified`, `absent`,
    /// `mismatch`).
    pub xds_identity: Family<Labels, Counter>,
    /// When each rate-limited log line was last written.
    log_times: std::sync::Mutex<std::collections::HashMap<&'static str, std::time::Instant>>,
    /// Responses sent, by type and mode.
    pub xds_responses: Family<Labels, Counter>,
    /// Bytes of resources sent, by type.
    pub xds_bytes: Family<Labels, Counter>,
    /// ACKs received, by type.
    pub xds_acks: Family<Labels, Counter>,
    /// NACKs received, by type.
    pub xds_nacks: Family<Labels, Counter>,
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
    pub consul_requests: Family<Labels, Counter>,
    /// Status writes to MeshServices and AccessRules (leader only).
    pub status_writes: Counter,
    /// Whether this replica holds the leader Lease (1) or not (0).
    pub leader: Gauge,
    /// Consul catalog writes for Kubernetes instances by operation (`register`,
    /// `deregister`) and result (`ok`, `error`).
    pub consul_registrations: Family<Labels, Counter>,
    /// Pods the Kubernetes source keeps.
    pub kube_pods: Gauge,
    /// Admission reviews by path and result (`patched`, `allowed`, `denied`, `malformed`).
    pub webhook_requests: Family<Labels, Counter>,
    /// Time to answer an admission review.
    pub webhook_seconds: Histogram,
    /// Whether a source completed its first sync (1) or not (0), by source.
    pub source_synced: Family<Labels, Gauge>,
    /// Seconds since a source last synced successfully, by source (set when scraped).
    pub source_staleness_seconds: Family<Labels, Gauge>,
    /// Times a source entered an error or its error changed (a failed request, a rejected
    /// manifest, a broken watch).
    pub source_errors: Family<Labels, Counter>,
    /// Time one sync step of a source took (a config-dir scan, a Consul service fetch, the
    /// Kubernetes initial list), by source.
    pub source_sync_seconds: Family<Labels, Histogram>,
    /// Objects each source holds in the index.
    pub index_objects: Family<Labels, Gauge>,
    /// Time to build and encode one group's snapshot.
    pub snapshot_group_build_seconds: Histogram,
    /// Group snapshots that changed and woke their streams.
    pub snapshot_group_pushes: Counter,
    /// Group snapshots built: a new group's first, and each one a change can affect.
    pub snapshot_group_builds: Counter,
    /// Streams subscribed to a resource type, by type and mode.
    pub xds_subscriptions: Family<Labels, Gauge>,
    /// Time from sending a response to its ACK or NACK, by type.
    pub xds_ack_seconds: Family<Labels, Histogram>,
    /// Envoy admin requests made for the admin API, by action and result.
    pub diagnostics_requests: Family<Labels, Counter>,
    /// Whether a peer meshbridge instance agrees with this one (1) or not (0), by peer.
    pub peer_agree: Family<Labels, Gauge>,
    /// Always 1, labelled with the version.
    pub build_info: Family<Labels, Gauge>,
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
        };
        m.registry.register(
            "xds_streams",
            "Connected xDS streams",
            m.xds_streams.clone(),
        );
        m.registry.register(
            "xds_refused_streams",
            "xDS streams refused for bad node metadata",
            m.xds_refused.clone(),
        );
        m.registry.register(
            "xds_limited",
            "xDS streams ended by a limit (the run flags --xds-max-*, --xds-first-request-timeout)",
            m.xds_limited.clone(),
        );
        m.registry.register(
            "xds_identity",
            "xDS streams checked against their client certificate (--xds-client-auth), by result",
            m.xds_identity.clone(),
        );
        m.registry.register(
            "xds_responses",
            "xDS responses sent",
            m.xds_responses.clone(),
        );
        m.registry.register(
            "xds_sent_bytes",
            "Bytes of xDS resources sent",
            m.xds_bytes.clone(),
        );
        m.registry
            .register("xds_acks", "xDS ACKs received", m.xds_acks.clone());
        m.registry
            .register("xds_nacks", "xDS NACKs received", m.xds_nacks.clone());
        m.registry.register(
            "snapshot_groups",
            "Proxy groups with a connected stream",
            m.snapshot_groups.clone(),
        );
        m.registry.register(
            "snapshot_inconsistent",
            "Snapshots refused by the consistency check",
            m.snapshot_inconsistent.clone(),
        );
        m.registry.register(
            "snapshot_build_seconds",
            "Time to rebuild connected groups after a change",
            m.snapshot_build_seconds.clone(),
        );
        m.registry.register(
            "debounce_batches",
            "Debounced change batches applied",
            m.debounce_batches.clone(),
        );
        m.registry
            .register("services", "Services in the mesh state", m.services.clone());
        m.registry.register(
            "endpoints",
            "Endpoints in the mesh state",
            m.endpoints.clone(),
        );
        m.registry.register(
            "access_policies",
            "Services protected by at least one AccessRule",
            m.access_policies.clone(),
        );
        m.registry.register(
            "access_unknown_callers",
            "Callers named by AccessRules that match no known service",
            m.access_unknown_callers.clone(),
        );
        m.registry.register(
            "config_errors",
            "Manifest files currently rejected",
            m.config_errors.clone(),
        );
        m.registry.register(
            "consul_requests",
            "Requests to Consul by datacenter and result",
            m.consul_requests.clone(),
        );
        m.registry.register(
            "services_emptied",
            "Changes that removed every instance of a service",
            m.services_emptied.clone(),
        );
        m.registry.register(
            "status_writes",
            "Status writes to MeshServices and AccessRules",
            m.status_writes.clone(),
        );
        m.registry.register(
            "leader",
            "Whether this replica holds the leader Lease",
            m.leader.clone(),
        );
        m.registry.register(
            "consul_registrations",
            "Consul catalog writes for Kubernetes instances by operation and result",
            m.consul_registrations.clone(),
        );
        m.registry.register(
            "kube_pods",
            "Pods the Kubernetes source keeps",
            m.kube_pods.clone(),
        );
        m.registry.register(
            "webhook_requests",
            "Admission reviews by path and result",
            m.webhook_requests.clone(),
        );
        m.registry.register(
            "webhook_seconds",
            "Time to answer an admission review",
            m.webhook_seconds.clone(),
        );
        m.registry.register(
            "source_synced",
            "Whether a source completed its first sync",
            m.source_synced.clone(),
        );
        m.registry.register(
            "source_staleness_seconds",
            "Seconds since a source last synced successfully",
            m.source_staleness_seconds.clone(),
        );
        m.registry.register(
            "source_errors",
            "Times a source entered an error or its error changed",
            m.source_errors.clone(),
        );
        m.registry.register(
            "source_sync_seconds",
            "Time one sync step of a source took: a config-dir scan, a Consul service fetch, the Kubernetes initial list",
            m.source_sync_seconds.clone(),
        );
        m.registry.register(
            "index_objects",
            "Objects each source holds in the index",
            m.index_objects.clone(),
        );
        m.registry.register(
            "snapshot_group_build_seconds",
            "Time to build and encode one group's snapshot",
            m.snapshot_group_build_seconds.clone(),
        );
        m.registry.register(
            "snapshot_group_pushes",
            "Group snapshots that changed and woke their streams",
            m.snapshot_group_pushes.clone(),
        );
        m.registry.register(
            "snapshot_group_builds",
            "Group snapshots built (a new group's first, and each one a change can affect)",
            m.snapshot_group_builds.clone(),
        );
        m.registry.register(
            "xds_subscriptions",
            "Streams subscribed to a resource type",
            m.xds_subscriptions.clone(),
        );
        m.registry.register(
            "xds_ack_seconds",
            "Time from sending an xDS response to its ACK or NACK",
            m.xds_ack_seconds.clone(),
        );
        m.registry.register(
            "diagnostics_requests",
            "Envoy admin requests made for the admin API by action and result",
            m.diagnostics_requests.clone(),
        );
        m.registry.register(
            "peer_agree",
            "Whether a peer meshbridge instance agrees with this one",
            m.peer_agree.clone(),
        );
        m.registry
            .register("build_info", "meshbridge version", m.build_info.clone());
        m.build_info
            .get_or_create(&labels(&[("version", env!("CARGO_PKG_VERSION"))]))
            .set(1);
        m.preset_series();
        m
    }

    /// Creates the series whose label values are known in advance at zero, so rates and
    /// alerts work before the first event and every family is listed from the start.
    fn preset_series(&self) {
        let types =
            crate::snapshot::ResourceType::ALL.map(crate::snapshot::ResourceType::short_name);
        const MODES: [&str; 2] = ["sotw", "delta"];
        for mode in MODES {
            let _ = self.xds_streams.get_or_create(&labels(&[("mode", mode)]));
            for t in types {
                let l = labels(&[("type", t), ("mode", mode)]);
                let _ = self.xds_subscriptions.get_or_create(&l);
                let _ = self.xds_responses.get_or_create(&l);
            }
        }
        for t in types {
            let l = labels(&[("type", t)]);
            let _ = self.xds_bytes.get_or_create(&l);
            let _ = self.xds_acks.get_or_create(&l);
            let _ = self.xds_nacks.get_or_create(&l);
            let _ = self.xds_ack_seconds.get_or_create(&l);
        }
        for limit in crate::xds::LIMITS {
            let _ = self.xds_limited.get_or_create(&labels(&[("limit", limit)]));
        }
        for result in ["verified", "absent", "mismatch"] {
            let _ = self
                .xds_identity
                .get_or_create(&labels(&[("result", result)]));
        }
        for action in ["config_dump", "stats", "clusters", "logging", "diff"] {
            for result in ["ok", "refused", "unreachable", "busy"] {
                let _ = self
                    .diagnostics_requests
                    .get_or_create(&labels(&[("action", action), ("result", result)]));
            }
        }
        for operation in ["register", "deregister"] {
            for result in ["ok", "error"] {
                let _ = self
                    .consul_registrations
                    .get_or_create(&labels(&[("operation", operation), ("result", result)]));
            }
        }
        for path in ["/inject", "/validate"] {
            for result in ["patched", "allowed", "denied", "malformed"] {
                let _ = self
                    .webhook_requests
                    .get_or_create(&labels(&[("path", path), ("result", result)]));
            }
        }
    }

    /// Records one admission review.
    pub fn observe_webhook(&self, path: &str, result: &str, elapsed: std::time::Duration) {
        self.webhook_requests
            .get_or_create(&vec![
                ("path".to_string(), path.to_string()),
                ("result".to_string(), result.to_string()),
            ])
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

/// Labels from pairs.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}
