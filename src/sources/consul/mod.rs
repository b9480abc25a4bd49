//! The Consul source: every instance in the Consul catalog becomes a model
//! [`Endpoint`](crate::model::Endpoint).
//!
//! Per datacenter, two blocking queries (developer.hashicorp.com/consul/api-docs/features/blocking)
//! stay open whatever the number of services: `/v1/health/state/any` tells which services'
//! instances or health changed, `/v1/catalog/services` which services appeared, left or
//! changed tags; only those services are fetched from `/v1/health/service/<name>`. Rules:
//! - `X-Consul-Index` is kept per query; an index that goes backwards resets to 0 (the next
//!   query answers at once), and an index below 1 is never used to block;
//! - `wait` carries per-query jitter so queries do not return in lockstep;
//! - errors back off exponentially (capped) and keep the last known instances: a failed,
//!   hanging or restarting Consul never empties the mesh;
//! - answers are compared by content, not by index: a spurious wake-up changes nothing, and
//!   an index that went back and forward to the same number does not hide a change.
//!
//! A catalog answer whose index moved while its names and tags did not means a registration
//! changed where neither feed shows it (port, address, weights, meta); the watch then fetches
//! every service again, at most once per second ([`SWEEP_GAP`]).
//!
//! Every request holds a permit of one semaphore per agent, so requests in flight stay at
//! `max_connections`; open connections stay close to it (the HTTP pool may finish a few
//! connects it started while another connection freed up: 65–73 at most for the default 64
//! with 1,000 services), well under Consul's default per-client limit of 200. Parsing and the
//! index rules are pure functions, tested directly.
//!
//! Layout: `client` (the HTTP client, token, limits and index rules), `wire` (Consul's
//! answers and their parsers), `damper` (flap damping), `removal` (holding suspect
//! removals) and `watch` (what a datacenter's watch remembers and decides: events in,
//! commands out) are pure or nearly; this module is the driver: one task per datacenter
//! running the two blocking queries and the fetches, feeding their answers to the watch and
//! performing its commands (index, status, metrics, timers).

mod client;
mod damper;
mod removal;
mod watch;
mod wire;

pub use client::{
    Answer, ConsulClient, ConsulError, ConsulSettings, MAX_BODY, backoff, next_index,
};
pub use damper::FlapDamper;
pub use removal::{Verdict, removal_verdict};
pub use watch::{DatacenterWatch, SWEEP_GAP, WatchCommand, WatchEvent, WatchSettings};
pub use wire::{
    CheckFingerprints, HealthPolicy, PORT_META_PREFIX, changed_services, parse_checks, parse_health,
};

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::index::{EndpointSet, IndexObject};

use super::SourceStatuses;
use wire::parse_catalog;

/// What the Consul watchers share.
#[derive(Clone)]
pub struct ConsulContext {
    /// The index sources apply into.
    pub index: super::IndexHandle,
    /// Source health.
    pub statuses: Arc<SourceStatuses>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Which instances receive traffic.
    pub health: HealthPolicy,
    /// Flap damping: an instance that failed less than this long ago stays out of rotation
    /// even if its checks pass again (zero: off).
    pub flap_hold: Duration,
    /// The node meshbridge registers Kubernetes instances on; its instances are skipped.
    pub own_node: Option<String>,
    /// How long an answer removing most of a datacenter's services must hold before it is
    /// applied.
    pub confirm_removal: Duration,
}

/// Index source name of one datacenter.
pub fn source_name(dc: &str) -> String {
    format!("consul:{dc}")
}

fn seed(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

/// How often every service of a datacenter is fetched again, repairing any drift.
const RESYNC: Duration = Duration::from_secs(300);

/// One kind of blocking query a datacenter keeps open.
struct BlockingQuery<T> {
    path: &'static str,
    parse: fn(&[u8]) -> Result<T, serde_json::Error>,
    /// Makes the event of an answer.
    wrap: fn(T, AnswerMeta) -> WatchEvent,
    /// Pause after each answer (large answers are not fetched more often than this).
    pause: Duration,
}

/// What a blocking query's answer says besides its body.
#[derive(Clone, Copy, Debug)]
struct AnswerMeta {
    /// Consul hid results from the token (`X-Consul-Results-Filtered-By-ACLs`).
    acl_filtered: bool,
    /// `X-Consul-Index` differs from the index asked with (always so after a start or an
    /// error, when the query asks with 0).
    moved: bool,
}

/// The checks query: which services' instances or health changed.
const CHECKS: BlockingQuery<CheckFingerprints> = BlockingQuery {
    path: "/v1/health/state/any",
    parse: parse_checks,
    wrap: |checks, _| WatchEvent::ChecksAnswered(checks),
    pause: Duration::from_millis(100),
};

/// The catalog query: which services appeared, left or changed tags.
const CATALOG: BlockingQuery<BTreeMap<String, Vec<String>>> = BlockingQuery {
    path: "/v1/catalog/services",
    parse: parse_catalog,
    wrap: |services, meta| WatchEvent::CatalogAnswered {
        services,
        acl_filtered: meta.acl_filtered,
        moved: meta.moved,
    },
    pause: Duration::ZERO,
};

/// Runs one blocking query forever, sending each parsed answer; errors back off and are
/// recorded, the last answer stays in force.
async fn blocking_watch<T: Send + 'static>(
    client: ConsulClient,
    dc: String,
    ctx: ConsulContext,
    query: BlockingQuery<T>,
    tx: tokio::sync::mpsc::Sender<WatchEvent>,
) {
    let BlockingQuery {
        path,
        parse,
        wrap,
        pause,
    } = query;
    let mut index = 0u64;
    let mut failures = 0u32;
    let mut round = 0u64;
    loop {
        round += 1;
        let result = client
            .get_answer(path, Some(&dc), index, seed(&dc) ^ seed(path) ^ round)
            .await
            .and_then(|a| {
                parse(&a.body)
                    .map(|v| (a.index, v, a.acl_filtered))
                    .map_err(|source| ConsulError::Malformed {
                        url: format!("{path}?dc={dc}"),
                        source,
                    })
            });
        match result {
            Ok((returned, value, acl_filtered)) => {
                failures = 0;
                record_ok(&ctx, &dc);
                tracing::debug!(dc = %dc, path, index, returned, "blocking query answered");
                let meta = AnswerMeta {
                    acl_filtered,
                    moved: returned != index,
                };
                index = next_index(index, returned);
                // Every answer is compared by content downstream: the same index does not
                // prove the same data (an index that went back and forward again while this
                // watch was backing off looks unchanged), and a spurious wake-up compares
                // equal and changes nothing.
                if tx.send(wrap(value, meta)).await.is_err() {
                    return;
                }
                tokio::time::sleep(pause).await;
            }
            Err(e) => {
                failures += 1;
                record_error(&ctx, &dc, &e);
                // The agent that answers next may have lost its index (servers rebuilt, a
                // snapshot restored, a dev agent restarted): Consul's servers hold a query
                // while their index is at or below the one asked for, so retrying at the old
                // index could hide every change for a whole wait. The first query after an
                // error reads the current state at once; answers are compared by content.
                index = 0;
                tokio::time::sleep(backoff(failures)).await;
            }
        }
    }
}

/// Fetches one service's instances (non-blocking, bounded by the client's permits) and
/// sends the answer or the failure.
#[tracing::instrument(name = "fetch", skip_all, fields(service = %service))]
async fn fetch_service(
    client: ConsulClient,
    dc: String,
    policy: HealthPolicy,
    own_node: Option<String>,
    service: String,
    tx: tokio::sync::mpsc::Sender<WatchEvent>,
) {
    let path = format!("/v1/health/service/{service}");
    let started = std::time::Instant::now();
    let result = client
        .get_answer(&path, Some(&dc), 0, 0)
        .await
        .and_then(|a| {
            parse_health(&a.body, &dc, policy, own_node.as_deref())
                .map(|endpoints| (endpoints, a.acl_filtered))
                .map_err(|source| ConsulError::Malformed {
                    url: format!("{path}?dc={dc}"),
                    source,
                })
        });
    let event = match result {
        Ok((endpoints, acl_filtered)) => WatchEvent::HealthAnswered {
            service,
            endpoints,
            acl_filtered,
            elapsed: started.elapsed(),
        },
        Err(error) => WatchEvent::HealthFailed { service, error },
    };
    let _ = tx.send(event).await;
}

/// The IO side of one datacenter's watch: performs the state machine's commands.
struct DatacenterDriver {
    client: ConsulClient,
    dc: String,
    source: String,
    ctx: ConsulContext,
    tx: tokio::sync::mpsc::Sender<WatchEvent>,
    /// Blocking queries, fetches and wake-up timers.
    tasks: tokio::task::JoinSet<()>,
    /// The service each running fetch task is fetching.
    fetches: HashMap<tokio::task::Id, String>,
    /// The feed each running blocking-query task follows.
    feeds: HashMap<tokio::task::Id, Feed>,
    /// Blocking-query tasks that ended without being asked to (each restart waits longer).
    feed_restarts: u32,
}

/// The two blocking queries a datacenter keeps open.
#[derive(Clone, Copy, Debug)]
enum Feed {
    Checks,
    Catalog,
}

impl DatacenterDriver {
    /// Opens the blocking query of `feed` after `delay`.
    fn spawn_feed(&mut self, feed: Feed, delay: Duration) {
        let (client, dc, ctx, tx) = (
            self.client.clone(),
            self.dc.clone(),
            self.ctx.clone(),
            self.tx.clone(),
        );
        let task = self.tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            match feed {
                Feed::Checks => blocking_watch(client, dc, ctx, CHECKS, tx).await,
                Feed::Catalog => blocking_watch(client, dc, ctx, CATALOG, tx).await,
            }
        });
        self.feeds.insert(task.id(), feed);
    }

    fn execute(&mut self, command: WatchCommand) {
        let (ctx, source, dc) = (&self.ctx, self.source.as_str(), self.dc.as_str());
        match command {
            WatchCommand::WatchCatalog => self.spawn_feed(Feed::Catalog, Duration::ZERO),
            WatchCommand::Fetch(service) => {
                let task = self.tasks.spawn(fetch_service(
                    self.client.clone(),
                    self.dc.clone(),
                    ctx.health,
                    ctx.own_node.clone(),
                    service.clone(),
                    self.tx.clone(),
                ));
                self.fetches.insert(task.id(), service);
            }
            WatchCommand::Publish { service, endpoints } => {
                let object = IndexObject::Endpoints(EndpointSet {
                    service: service.clone(),
                    endpoints,
                });
                ctx.index.apply(source, &service, vec![object]);
            }
            WatchCommand::Remove(service) => {
                ctx.index.delete(source, &service);
                tracing::info!(dc = %dc, service = %service, "service left the Consul catalog");
            }
            WatchCommand::WakeAfter { service, wait } => {
                let tx = self.tx.clone();
                self.tasks.spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = tx.send(WatchEvent::RetryDue(service)).await;
                });
            }
            WatchCommand::SweepAfter(wait) => {
                let tx = self.tx.clone();
                self.tasks.spawn(async move {
                    tokio::time::sleep(wait).await;
                    let _ = tx.send(WatchEvent::SweepDue).await;
                });
            }
            WatchCommand::Hold(why) => hold(ctx, source, dc, &why),
            WatchCommand::ClearHold => clear_hold(ctx, source),
            WatchCommand::ReportError(e) => record_error(ctx, dc, &e),
            WatchCommand::ObserveSync(elapsed) => ctx.statuses.observe_sync(source, elapsed),
            WatchCommand::MarkSynced => mark_synced(ctx, source),
        }
    }

    /// A task ended. A fetch that ended without sending its answer becomes an event; a
    /// blocking query that ended (it panicked) is opened again after a backoff, from index
    /// 0, so the feed is never lost (answers are compared by content).
    fn task_ended(
        &mut self,
        ended: Result<(tokio::task::Id, ()), tokio::task::JoinError>,
    ) -> Option<WatchEvent> {
        let id = match &ended {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let fetch = self.fetches.remove(&id);
        if let Some(feed) = self.feeds.remove(&id) {
            self.feed_restarts += 1;
            let wait = backoff(self.feed_restarts);
            tracing::error!(dc = %self.dc, ?feed, outcome = ?ended.as_ref().err(), ?wait, "a Consul blocking query ended; it is opened again");
            self.spawn_feed(feed, wait);
            return None;
        }
        match ended {
            Ok(_) => None,
            Err(e) => {
                tracing::error!(dc = %self.dc, error = %e, "a Consul watch task ended without an answer");
                fetch.map(WatchEvent::FetchLost)
            }
        }
    }
}

/// Watches one datacenter forever.
///
/// Two blocking queries per datacenter, whatever the number of services: the checks
/// (`/v1/health/state/any`) tell which services' instances or health changed, the catalog
/// (`/v1/catalog/services`) which services appeared, left or changed tags. Only those
/// services are fetched (`/v1/health/service/<name>`, non-blocking, bounded by the client's
/// permits); every `RESYNC` (5 minutes) all are, repairing drift. What to do with each
/// answer is decided by the pure [`DatacenterWatch`]; this loop waits for answers and
/// timers and performs its commands.
pub async fn watch_datacenter(client: ConsulClient, dc: String, ctx: ConsulContext) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<WatchEvent>(64);
    let mut watch = DatacenterWatch::new(WatchSettings {
        flap_hold: ctx.flap_hold,
        confirm_removal: ctx.confirm_removal,
    });
    let mut driver = DatacenterDriver {
        client,
        source: source_name(&dc),
        dc,
        ctx,
        tx,
        tasks: tokio::task::JoinSet::new(),
        fetches: HashMap::new(),
        feeds: HashMap::new(),
        feed_restarts: 0,
    };
    // The checks baseline comes first; the state machine asks for the catalog after it.
    driver.spawn_feed(Feed::Checks, Duration::ZERO);
    let started = tokio::time::Instant::now();
    let mut resync = tokio::time::interval_at(started + RESYNC, RESYNC);
    loop {
        let event = tokio::select! {
            Some(e) = rx.recv() => e,
            _ = resync.tick() => WatchEvent::ResyncDue,
            Some(ended) = driver.tasks.join_next_with_id(), if !driver.tasks.is_empty() => {
                match driver.task_ended(ended) {
                    Some(lost) => lost,
                    None => continue,
                }
            }
        };
        for command in watch.handle(event, started.elapsed()) {
            driver.execute(command);
        }
    }
}

/// Marks the datacenter's source degraded with `why` (shown in `/api/sources`, counted in
/// `meshbridge_source_errors_total`).
fn hold(ctx: &ConsulContext, source: &str, dc: &str, why: &str) {
    if ctx
        .metrics
        .log_allowed("consul-hold", Duration::from_secs(60))
    {
        tracing::warn!(
            dc,
            reason = why,
            "Consul answer held back; last known instances stay in force"
        );
    }
    ctx.statuses
        .update(source, |s| s.error = Some(why.to_string()));
}

/// Clears a hold once Consul's answers apply again.
fn clear_hold(ctx: &ConsulContext, source: &str) {
    ctx.statuses.update(source, |s| {
        if s.error.as_deref().is_some_and(|e| e.starts_with("held")) {
            s.error = None;
        }
    });
}

/// Marks the datacenter's first full sync done (`/readyz`).
fn mark_synced(ctx: &ConsulContext, source: &str) {
    let now = super::now_secs();
    ctx.statuses.update(source, |s| {
        if !s.synced {
            tracing::info!(source, "first full Consul sync complete");
        }
        s.synced = true;
        s.last_sync = Some(now);
    });
}

fn record_ok(ctx: &ConsulContext, dc: &str) {
    ctx.metrics
        .consul_requests
        .get_or_create(&crate::metrics::label::DcResult {
            dc: dc.to_string(),
            result: "ok",
        })
        .inc();
    ctx.statuses.update(&source_name(dc), |s| {
        if s.error.as_deref().is_some_and(|e| e.starts_with("stale")) {
            s.error = None;
        }
    });
}

fn record_error(ctx: &ConsulContext, dc: &str, e: &ConsulError) {
    tracing::warn!(dc, error = %e, "Consul request failed; last known instances stay in force");
    ctx.metrics
        .consul_requests
        .get_or_create(&crate::metrics::label::DcResult {
            dc: dc.to_string(),
            result: "error",
        })
        .inc();
    let message = format!("stale: {e}");
    ctx.statuses
        .update(&source_name(dc), |s| s.error = Some(message));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint, Origin};
    use std::collections::BTreeSet;

    #[test]
    fn hidden_or_mass_removals_are_held_and_small_ones_apply() {
        let confirm = Duration::from_secs(30);
        assert_eq!(removal_verdict(10, 0, true, None, confirm), Verdict::Apply);
        assert_eq!(removal_verdict(10, 1, false, None, confirm), Verdict::Apply);
        assert_eq!(removal_verdict(10, 5, false, None, confirm), Verdict::Apply);
        // Hidden is never gone, however long it lasts.
        let Verdict::Hold(why) = removal_verdict(10, 1, true, Some(confirm * 10), confirm) else {
            panic!("an ACL-filtered removal applied");
        };
        assert!(why.contains("X-Consul-Results-Filtered-By-ACLs"), "{why}");
        // Most of the catalog at once: held until confirmed.
        let Verdict::Hold(why) = removal_verdict(10, 6, false, None, confirm) else {
            panic!("a mass removal applied at once");
        };
        assert!(why.contains("would remove 6 of 10 services"), "{why}");
        assert!(matches!(
            removal_verdict(10, 6, false, Some(Duration::from_secs(29)), confirm),
            Verdict::Hold(_)
        ));
        assert_eq!(
            removal_verdict(10, 6, false, Some(confirm), confirm),
            Verdict::Apply
        );
        // A tiny catalog changes freely.
        assert_eq!(removal_verdict(3, 3, false, None, confirm), Verdict::Apply);
    }

    #[tokio::test]
    async fn the_token_never_follows_a_redirect() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        // Another host that must never see the token, and an "agent" redirecting to it.
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let other_addr = other.local_addr().unwrap();
        tokio::spawn(async move {
            let app = axum::Router::new().fallback(move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async { "[]" }
            });
            axum::serve(other, app).await
        });
        let agent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent_addr = agent.local_addr().unwrap();
        tokio::spawn(async move {
            let location = format!("http://{other_addr}/v1/catalog/services");
            let app = axum::Router::new().fallback(move || {
                let location = location.clone();
                async move {
                    (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [(axum::http::header::LOCATION, location)],
                        "",
                    )
                }
            });
            axum::serve(agent, app).await
        });
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cr3t").unwrap();
        let client = ConsulClient::new(&ConsulSettings {
            addr: format!("http://{agent_addr}"),
            datacenters: Vec::new(),
            token_file: Some(token),
            ca_file: None,
            health: HealthPolicy::PassingOnly,
            wait: Duration::from_secs(1),
            max_connections: 4,
        })
        .unwrap();
        let err = client
            .get("/v1/catalog/services", Some("dc1"), 0, 0)
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConsulError::Status { status: 307, .. }),
            "{err}"
        );
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
    }

    #[test]
    fn index_rules_follow_the_blocking_query_documentation() {
        assert_eq!(next_index(0, 42), 42);
        assert_eq!(next_index(42, 42), 42, "spurious wake-up keeps the index");
        assert_eq!(next_index(42, 7), 0, "an index going backwards resets");
        assert_eq!(next_index(0, 0), 1, "never block on an index below 1");
    }

    fn check(node: &str, id: &str, status: &str, service: &str, modify: u64) -> serde_json::Value {
        serde_json::json!({"Node": node, "CheckID": id, "Status": status, "ServiceName": service,
                           "ServiceID": "", "ModifyIndex": modify, "CreateIndex": 1})
    }

    fn fingerprints(checks: &[serde_json::Value]) -> CheckFingerprints {
        parse_checks(serde_json::to_vec(checks).unwrap().as_slice()).unwrap()
    }

    #[test]
    fn check_changes_point_at_the_services_to_fetch() {
        let base = vec![
            check("n1", "serfHealth", "passing", "", 5),
            check("n1", "service:a1", "passing", "orders", 6),
            check("n2", "serfHealth", "passing", "", 5),
            check("n2", "service:b1", "passing", "billing", 7),
        ];
        let old = fingerprints(&base);
        // Same checks in another order: nothing changed.
        let mut shuffled = base.clone();
        shuffled.reverse();
        assert!(changed_services(&old, &fingerprints(&shuffled)).is_empty());
        // A service check flips: that service.
        let mut flip = base.clone();
        flip[1] = check("n1", "service:a1", "critical", "orders", 9);
        assert_eq!(
            changed_services(&old, &fingerprints(&flip)),
            BTreeSet::from(["orders".to_string()])
        );
        // A node check fails: every service on the node.
        let mut node = base.clone();
        node[2] = check("n2", "serfHealth", "critical", "", 10);
        assert_eq!(
            changed_services(&old, &fingerprints(&node)),
            BTreeSet::from(["billing".to_string()])
        );
        // A new instance (new check) and a removed service.
        let mut grown = base.clone();
        grown.push(check("n3", "service:a2", "passing", "orders", 11));
        grown.retain(|c| c["ServiceName"] != "billing");
        assert_eq!(
            changed_services(&old, &fingerprints(&grown)),
            BTreeSet::from(["billing".to_string(), "orders".to_string()])
        );
    }

    #[test]
    fn a_flapping_instance_stays_out_until_it_has_passed_for_the_hold() {
        let hold = Duration::from_secs(1);
        let ep = |healthy| Endpoint {
            address: "10.0.0.1".into(),
            port: 80,
            origin: Origin::Consul,
            datacenter: None,
            tags: BTreeSet::new(),
            weight: 1,
            healthy,
            ports: Default::default(),
        };
        let mut d = FlapDamper::default();
        let ms = Duration::from_millis;
        // A new healthy instance is let in at once.
        let mut set = vec![ep(true)];
        assert_eq!(d.damp(ms(0), hold, &mut set), None);
        assert!(set[0].healthy);
        // It fails: out at once.
        let mut set = vec![ep(false)];
        assert_eq!(d.damp(ms(100), hold, &mut set), None);
        // Passing again 100 ms later: held, look again in 900 ms.
        let mut set = vec![ep(true)];
        assert_eq!(d.damp(ms(200), hold, &mut set), Some(ms(900)));
        assert!(!set[0].healthy);
        // Fails again, then passes: the hold restarts from the last failure.
        d.damp(ms(300), hold, &mut [ep(false)]);
        let mut set = vec![ep(true)];
        assert_eq!(d.damp(ms(1200), hold, &mut set), Some(ms(100)));
        assert!(!set[0].healthy);
        // A full hold after the last failure: back in rotation.
        let mut set = vec![ep(true)];
        assert_eq!(d.damp(ms(1300), hold, &mut set), None);
        assert!(set[0].healthy);
        // Damping off.
        d.damp(ms(1400), Duration::ZERO, &mut [ep(false)]);
        let mut set = vec![ep(true)];
        assert_eq!(d.damp(ms(1401), Duration::ZERO, &mut set), None);
        assert!(set[0].healthy);
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_millis(250));
        assert_eq!(backoff(2), Duration::from_millis(500));
        assert_eq!(backoff(5), Duration::from_secs(4));
        assert_eq!(backoff(30), Duration::from_secs(5));
    }

    #[test]
    fn maps_instances_like_consul_describes_them() {
        let body = br#"[
          {"Node": {"Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc1"},
           "Service": {"ID": "a", "Service": "orders", "Tags": ["canary", "weight:7"], "Address": "", "Port": 8080,
                       "Weights": {"Passing": 3, "Warning": 1}},
           "Checks": [{"Status": "passing"}, {"Status": "passing"}]},
          {"Node": {"Node": "n2", "Address": "10.0.0.2", "Datacenter": "dc1"},
           "Service": {"ID": "b", "Service": "orders", "Tags": null, "Address": "192.168.0.2", "Port": 8081,
                       "Weights": {"Passing": 5, "Warning": 2}},
           "Checks": [{"Status": "passing"}, {"Status": "warning"}]},
          {"Node": {"Node": "n3", "Address": "10.0.0.3", "Datacenter": "dc1"},
           "Service": {"ID": "c", "Service": "orders", "Tags": [], "Address": "", "Port": 8082},
           "Checks": [{"Status": "critical"}]}
        ]"#;
        let e = parse_health(body, "dc1", HealthPolicy::PassingOnly, None).unwrap();
        assert_eq!(e.len(), 3);
        let a = e.iter().find(|x| x.port == 8080).unwrap();
        assert_eq!(
            (a.address.as_str(), a.weight, a.healthy),
            ("10.0.0.1", 7, true)
        );
        assert!(a.is_canary());
        let b = e.iter().find(|x| x.port == 8081).unwrap();
        assert_eq!(
            (b.address.as_str(), b.weight, b.healthy),
            ("192.168.0.2", 2, false)
        );
        let c = e.iter().find(|x| x.port == 8082).unwrap();
        assert!(!c.healthy);
        assert_eq!(c.datacenter.as_deref(), Some("dc1"));
        let w = parse_health(body, "dc1", HealthPolicy::PassingAndWarning, None).unwrap();
        assert!(w.iter().find(|x| x.port == 8081).unwrap().healthy);
        assert!(parse_health(b"{not json", "dc1", HealthPolicy::PassingOnly, None).is_err());
    }

    #[test]
    fn an_instance_whose_address_is_a_host_name_is_left_out_and_the_others_stay() {
        // Consul accepts host names as node or service addresses; Envoy would refuse the
        // whole endpoint assignment for one of them.
        let body = br#"[
          {"Node": {"Node": "n1", "Address": "db-host.example.internal", "Datacenter": "dc1"},
           "Service": {"ID": "a", "Service": "orders", "Address": "", "Port": 8080},
           "Checks": [{"Status": "passing"}]},
          {"Node": {"Node": "n2", "Address": "10.0.0.2", "Datacenter": "dc1"},
           "Service": {"ID": "b", "Service": "orders", "Address": "orders-b.example", "Port": 8081},
           "Checks": [{"Status": "passing"}]},
          {"Node": {"Node": "n3", "Address": "10.0.0.3", "Datacenter": "dc1"},
           "Service": {"ID": "c", "Service": "orders", "Address": "fd00::3", "Port": 8082},
           "Checks": [{"Status": "passing"}]}
        ]"#;
        let e = parse_health(body, "dc1", HealthPolicy::PassingOnly, None).unwrap();
        let kept: Vec<(&str, u16)> = e.iter().map(|x| (x.address.as_str(), x.port)).collect();
        assert_eq!(kept, vec![("fd00::3", 8082)]);
    }

    #[test]
    fn further_ports_come_from_meshbridge_port_meta_and_other_meta_is_ignored() {
        let body = br#"[
          {"Node": {"Node": "n1", "Address": "10.0.0.1", "Datacenter": "dc1"},
           "Service": {"ID": "a", "Service": "orders", "Port": 15006,
                       "Meta": {"meshbridge-port-admin": "15100", "meshbridge-port-Bad": "1",
                                "meshbridge-port-zero": "0", "meshbridge-port-text": "x",
                                "version": "1.2"}},
           "Checks": [{"Status": "passing"}]},
          {"Node": {"Node": "n2", "Address": "10.0.0.2", "Datacenter": "dc1"},
           "Service": {"ID": "b", "Service": "orders", "Port": 15006, "Meta": null},
           "Checks": [{"Status": "passing"}]}
        ]"#;
        let e = parse_health(body, "dc1", HealthPolicy::PassingOnly, None).unwrap();
        assert_eq!(
            e[0].ports,
            std::collections::BTreeMap::from([("admin".to_string(), 15100)])
        );
        assert!(e[1].ports.is_empty());
    }
}
