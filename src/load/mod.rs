//! Load reports: what callers' Envoys saw of each service, by origin and datacenter (pure).
//!
//! Envoys report through the Load Reporting Service (LRS) on the xDS port: for each cluster
//! and locality, the requests issued, answered without error and answered with an error (a
//! 5xx or a reset) since the last report. meshbridge puts each service's instances in
//! localities by datacenter (zone) and origin (sub-zone), so the reports say, per service,
//! how the Consul hosts and the pods are doing side by side — the view a migration is
//! checked against. The [`LoadBook`] keeps them in buckets of [`BUCKET_SECONDS`] for
//! [`KEEP_SECONDS`], and answers sums over sliding windows. Time is passed in (seconds on a
//! monotonic clock), never read here.

use std::collections::{BTreeMap, HashMap, VecDeque};

use envoy_types::pb::envoy::service::load_stats::v3::LoadStatsRequest;
use serde::Serialize;

use crate::model::{MeshState, Origin};
use crate::translate::names;

/// Width of a bucket of the book.
pub const BUCKET_SECONDS: u64 = 10;
/// How long reports are kept: the longest window that can be asked for.
pub const KEEP_SECONDS: u64 = 15 * 60;
/// Cluster entries of one report looked at; the rest are dropped (Envoy sends one per
/// cluster it has, a few hundred at most in a large mesh).
pub const MAX_CLUSTERS_PER_REPORT: usize = 10_000;
/// Locality entries of one cluster looked at.
pub const MAX_LOCALITIES_PER_CLUSTER: usize = 256;

/// What a load figure is about: a service's instances of one origin in one datacenter, as
/// called for real or as a mirrored copy.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct LoadKey {
    /// The service.
    pub service: String,
    /// The instances' origin.
    pub origin: Origin,
    /// Their datacenter (empty: the local one).
    pub datacenter: String,
    /// Requests copied by a migration's mirroring (answers discarded), not callers' own.
    pub mirror: bool,
}

/// Request counts over some time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LoadCounts {
    /// Requests sent to the instances (each retry counts).
    pub requests: u64,
    /// Requests answered without error.
    pub successes: u64,
    /// Requests answered with a 5xx or lost to a reset.
    pub errors: u64,
    /// Connections to the instances that failed.
    pub failed_connections: u64,
}

impl LoadCounts {
    /// Adds `other`'s counts.
    pub fn add(&mut self, other: &LoadCounts) {
        self.requests = self.requests.saturating_add(other.requests);
        self.successes = self.successes.saturating_add(other.successes);
        self.errors = self.errors.saturating_add(other.errors);
        self.failed_connections = self
            .failed_connections
            .saturating_add(other.failed_connections);
    }

    /// Errors per completed request, none when nothing completed.
    pub fn error_rate(&self) -> Option<f64> {
        let done = self.successes + self.errors;
        (done > 0).then(|| self.errors as f64 / done as f64)
    }

    /// Whether nothing was counted.
    pub fn is_empty(&self) -> bool {
        *self == LoadCounts::default()
    }
}

/// The figures of one report that are about known services.
pub type Report = Vec<(LoadKey, LoadCounts)>;

/// Reads a load report: every cluster of a known service (or a variant of one: canary,
/// policy, mirror) and every locality naming one of its origins and one of its datacenters.
/// Anything else — an unknown cluster, a made-up locality — is left out, so a client cannot
/// make the book hold keys of its choosing. Figures of one key are summed.
pub fn read_report(request: &LoadStatsRequest, state: &MeshState) -> Report {
    let mut out: BTreeMap<LoadKey, LoadCounts> = BTreeMap::new();
    for cluster in request.cluster_stats.iter().take(MAX_CLUSTERS_PER_REPORT) {
        let (service_name, mirror) = names::cluster_service(&cluster.cluster_name);
        let Some(service) = state.services.get(service_name) else {
            continue;
        };
        for locality in cluster
            .upstream_locality_stats
            .iter()
            .take(MAX_LOCALITIES_PER_CLUSTER)
        {
            let place = locality.locality.clone().unwrap_or_default();
            let Some(origin) = parse_origin(&place.sub_zone) else {
                continue;
            };
            let known = service.endpoints.iter().any(|e| {
                e.origin == origin && e.datacenter.as_deref().unwrap_or_default() == place.zone
            });
            if !known {
                continue;
            }
            let counts = LoadCounts {
                requests: locality.total_issued_requests,
                successes: locality.total_successful_requests,
                errors: locality.total_error_requests,
                failed_connections: locality.total_fail_connections,
            };
            if counts.is_empty() {
                continue;
            }
            out.entry(LoadKey {
                service: service.name.clone(),
                origin,
                datacenter: place.zone,
                mirror,
            })
            .or_default()
            .add(&counts);
        }
    }
    out.into_iter().collect()
}

fn parse_origin(text: &str) -> Option<Origin> {
    match text {
        "consul" => Some(Origin::Consul),
        "kubernetes" => Some(Origin::Kubernetes),
        "config" => Some(Origin::Config),
        _ => None,
    }
}

/// Recent load reports, summed per key in buckets of [`BUCKET_SECONDS`].
#[derive(Clone, Debug, Default)]
pub struct LoadBook {
    /// `(bucket number, sums)`, oldest first.
    buckets: VecDeque<(u64, HashMap<LoadKey, LoadCounts>)>,
}

impl LoadBook {
    /// An empty book.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a report received at `now` (seconds), dropping buckets older than
    /// [`KEEP_SECONDS`].
    pub fn record(&mut self, now: u64, report: &Report) {
        let bucket = now / BUCKET_SECONDS;
        if self.buckets.back().is_none_or(|(b, _)| *b != bucket) {
            self.buckets.push_back((bucket, HashMap::new()));
        }
        let oldest = bucket.saturating_sub(KEEP_SECONDS / BUCKET_SECONDS);
        while self.buckets.front().is_some_and(|(b, _)| *b < oldest) {
            self.buckets.pop_front();
        }
        if let Some((_, sums)) = self.buckets.back_mut() {
            for (key, counts) in report {
                sums.entry(key.clone()).or_default().add(counts);
            }
        }
    }

    /// The sums of the last `seconds` before `now` (whole buckets: the current one and
    /// those that started within the window), for the keys `keep` accepts.
    pub fn window(
        &self,
        now: u64,
        seconds: u64,
        keep: impl Fn(&LoadKey) -> bool,
    ) -> BTreeMap<LoadKey, LoadCounts> {
        let first = now.saturating_sub(seconds) / BUCKET_SECONDS;
        let mut out: BTreeMap<LoadKey, LoadCounts> = BTreeMap::new();
        for (_, sums) in self.buckets.iter().filter(|(b, _)| *b >= first) {
            for (key, counts) in sums.iter().filter(|(k, _)| keep(k)) {
                out.entry(key.clone()).or_default().add(counts);
            }
        }
        out
    }

    /// Keys held, over every bucket (what the book costs).
    pub fn keys(&self) -> usize {
        self.buckets.iter().map(|(_, s)| s.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Service};
    use envoy_types::pb::envoy::config::core::v3::Locality;
    use envoy_types::pb::envoy::config::endpoint::v3::{ClusterStats, UpstreamLocalityStats};

    fn state() -> MeshState {
        let endpoint = |origin, dc: Option<&str>| Endpoint {
            address: "10.0.0.1".into(),
            port: 80,
            origin,
            datacenter: dc.map(str::to_string),
            tags: Default::default(),
            weight: 1,
            healthy: true,
            ports: Default::default(),
        };
        let mut state = MeshState::default();
        state.services.insert(
            "orders".into(),
            Service {
                name: "orders".into(),
                endpoints: vec![
                    endpoint(Origin::Consul, Some("dc1")),
                    endpoint(Origin::Kubernetes, None),
                ],
                ..Default::default()
            },
        );
        state
    }

    fn locality(zone: &str, sub_zone: &str, ok: u64, errors: u64) -> UpstreamLocalityStats {
        UpstreamLocalityStats {
            locality: Some(Locality {
                zone: zone.into(),
                sub_zone: sub_zone.into(),
                ..Default::default()
            }),
            total_successful_requests: ok,
            total_error_requests: errors,
            total_issued_requests: ok + errors,
            ..Default::default()
        }
    }

    fn report(clusters: &[(&str, Vec<UpstreamLocalityStats>)]) -> LoadStatsRequest {
        LoadStatsRequest {
            cluster_stats: clusters
                .iter()
                .map(|(name, localities)| ClusterStats {
                    cluster_name: name.to_string(),
                    upstream_locality_stats: localities.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn reports_count_by_origin_and_leave_out_what_the_mesh_does_not_have() {
        let state = state();
        let r = read_report(
            &report(&[
                (
                    "orders",
                    vec![
                        locality("dc1", "consul", 8, 2),
                        locality("", "kubernetes", 5, 0),
                        // Made up: no such origin, no such datacenter of this origin.
                        locality("dc1", "mars", 1, 0),
                        locality("dc9", "consul", 1, 0),
                    ],
                ),
                // A policy variant of the same service adds up; the mirror is its own.
                ("orders|o-1234abcd", vec![locality("dc1", "consul", 2, 0)]),
                ("orders|mirror", vec![locality("", "kubernetes", 3, 1)]),
                ("ghost", vec![locality("", "consul", 9, 9)]),
                ("local|app", vec![locality("", "", 9, 9)]),
            ]),
            &state,
        );
        let by = |origin, mirror| {
            r.iter()
                .find(|(k, _)| k.origin == origin && k.mirror == mirror)
                .map(|(_, c)| *c)
        };
        assert_eq!(r.len(), 3, "{r:?}");
        let consul = by(Origin::Consul, false).unwrap();
        assert_eq!(
            (consul.successes, consul.errors, consul.requests),
            (10, 2, 12)
        );
        assert_eq!(consul.error_rate(), Some(2.0 / 12.0));
        assert_eq!(by(Origin::Kubernetes, false).unwrap().successes, 5);
        assert_eq!(by(Origin::Kubernetes, true).unwrap().errors, 1);
    }

    #[test]
    fn windows_sum_recent_buckets_and_old_ones_are_dropped() {
        let key = LoadKey {
            service: "orders".into(),
            origin: Origin::Consul,
            datacenter: String::new(),
            mirror: false,
        };
        let counts = |n| LoadCounts {
            requests: n,
            successes: n,
            ..Default::default()
        };
        let mut book = LoadBook::new();
        book.record(5, &vec![(key.clone(), counts(1))]);
        book.record(25, &vec![(key.clone(), counts(10))]);
        book.record(27, &vec![(key.clone(), counts(100))]);
        let all = |_: &LoadKey| true;
        assert_eq!(book.window(29, 10, all)[&key].requests, 110);
        assert_eq!(book.window(29, 60, all)[&key].requests, 111);
        assert_eq!(book.keys(), 2);
        // Far later: the old buckets are gone.
        book.record(5 + KEEP_SECONDS + 40, &vec![(key.clone(), counts(7))]);
        assert_eq!(
            book.window(5 + KEEP_SECONDS + 40, KEEP_SECONDS, all)[&key].requests,
            7
        );
        assert_eq!(book.keys(), 1);
        assert!(book.window(30, 60, |k| k.mirror).is_empty());
    }
}
