//! The Consul source: every instance in the Consul catalog becomes a model [`Endpoint`].
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
//! Every request holds a permit of one semaphore per agent, so requests in flight stay at
//! `max_connections`; open connections stay close to it (the HTTP pool may finish a few
//! connects it started while another connection freed up: 65–73 at most for the default 64
//! with 1,000 services), well under Consul's default per-client limit of 200. Parsing and the
//! index rules are pure functions, tested directly.
//!
//! Layout: `client` (the HTTP client, token, limits and index rules), `wire` (Consul's
//! answers and their parsers), `damper` (flap damping) and `removal` (holding suspect
//! removals) are pure or nearly; this module is the driver: one task per datacenter running
//! the two blocking queries and applying what changed to the index.

mod client;
mod damper;
mod removal;
mod wire;

pub use client::{
    Answer, ConsulClient, ConsulError, ConsulSettings, MAX_BODY, backoff, next_index,
};
pub use damper::FlapDamper;
pub use removal::{Verdict, removal_verdict};
pub use wire::{CheckFingerprints, HealthPolicy, changed_services, parse_checks, parse_health};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use crate::index::{EndpointSet, IndexObject};
use crate::model::Endpoint;

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

enum DcEvent {
    Catalog {
        services: BTreeMap<String, Vec<String>>,
        acl_filtered: bool,
    },
    Checks(CheckFingerprints),
    Fetched {
        service: String,
        /// The instances, and whether Consul hid some from this token.
        result: Result<(Vec<Endpoint>, bool), ConsulError>,
        elapsed: Duration,
    },
    Retry(String),
    Resync,
}

/// How often every service of a datacenter is fetched again, repairing any drift.
const RESYNC: Duration = Duration::from_secs(300);

/// Runs one blocking query forever, sending each parsed answer; errors back off and are
/// recorded, the last answer stays in force.
/// One kind of blocking query a datacenter keeps open.
struct BlockingQuery<T> {
    path: &'static str,
    parse: fn(&[u8]) -> Result<T, serde_json::Error>,
    /// Makes the event of an answer (and whether Consul hid results from the token).
    wrap: fn(T, bool) -> DcEvent,
    /// Pause after each answer (large answers are not fetched more often than this).
    pause: Duration,
}

async fn blocking_watch<T: Send + 'static>(
    client: ConsulClient,
    dc: String,
    ctx: ConsulContext,
    query: BlockingQuery<T>,
    tx: tokio::sync::mpsc::Sender<DcEvent>,
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
                index = next_index(index, returned);
                // Every answer is compared by content downstream: the same index does not
                // prove the same data (an index that went back and forward again while this
                // watch was backing off looks unchanged), and a spurious wake-up compares
                // equal and changes nothing.
                if tx.send(wrap(value, acl_filtered)).await.is_err() {
                    return;
                }
                tokio::time::sleep(pause).await;
            }
            Err(e) => {
                failures += 1;
                record_error(&ctx, &dc, &e);
                tokio::time::sleep(backoff(failures)).await;
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
/// permits); every `RESYNC` (5 minutes) all are, repairing drift. The checks baseline is taken before
/// the first full fetch, so no change can fall between the two.
pub async fn watch_datacenter(client: ConsulClient, dc: String, ctx: ConsulContext) {
    let source = source_name(&dc);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<DcEvent>(64);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(blocking_watch(
        client.clone(),
        dc.clone(),
        ctx.clone(),
        BlockingQuery {
            path: "/v1/health/state/any",
            parse: parse_checks,
            wrap: |checks, _| DcEvent::Checks(checks),
            pause: Duration::from_millis(100),
        },
        tx.clone(),
    ));
    let mut catalog: Option<BTreeMap<String, Vec<String>>> = None;
    let mut checks: Option<CheckFingerprints> = None;
    let mut pending_sync: Option<BTreeSet<String>> = None;
    let mut in_flight: BTreeSet<String> = BTreeSet::new();
    let mut dirty: BTreeSet<String> = BTreeSet::new();
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    // Catalog removals held back, and since when the same removal has been answered.
    let mut held: Option<(BTreeSet<String>, tokio::time::Instant)> = None;
    let mut dampers: BTreeMap<String, FlapDamper> = BTreeMap::new();
    let started = tokio::time::Instant::now();
    let mut resync = tokio::time::interval_at(tokio::time::Instant::now() + RESYNC, RESYNC);
    let fetch = |service: String,
                 in_flight: &mut BTreeSet<String>,
                 dirty: &mut BTreeSet<String>,
                 tasks: &mut tokio::task::JoinSet<()>| {
        if !in_flight.insert(service.clone()) {
            dirty.insert(service);
            return;
        }
        let (client, dc, tx, policy) = (client.clone(), dc.clone(), tx.clone(), ctx.health);
        let own_node = ctx.own_node.clone();
        tasks.spawn(async move {
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
            let elapsed = started.elapsed();
            let _ = tx
                .send(DcEvent::Fetched {
                    service,
                    result,
                    elapsed,
                })
                .await;
        });
    };
    loop {
        let event = tokio::select! {
            Some(e) = rx.recv() => e,
            _ = resync.tick() => DcEvent::Resync,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        match event {
            DcEvent::Checks(new) => {
                let changed = match &checks {
                    Some(old) => changed_services(old, &new),
                    None => {
                        // Baseline taken: now the catalog, and the first full fetch.
                        tasks.spawn(blocking_watch(
                            client.clone(),
                            dc.clone(),
                            ctx.clone(),
                            BlockingQuery {
                                path: "/v1/catalog/services",
                                parse: parse_catalog,
                                wrap: |services, acl_filtered| DcEvent::Catalog {
                                    services,
                                    acl_filtered,
                                },
                                pause: Duration::ZERO,
                            },
                            tx.clone(),
                        ));
                        BTreeSet::new()
                    }
                };
                checks = Some(new);
                let known = catalog.as_ref();
                for service in changed {
                    if known.is_some_and(|c| c.contains_key(&service)) {
                        fetch(service, &mut in_flight, &mut dirty, &mut tasks);
                    }
                }
            }
            DcEvent::Catalog {
                services: mut new,
                acl_filtered,
            } => {
                let old = catalog.take().unwrap_or_default();
                let leaving: BTreeSet<String> = old
                    .keys()
                    .filter(|s| !new.contains_key(*s))
                    .cloned()
                    .collect();
                let held_for = held
                    .as_ref()
                    .filter(|(set, _)| *set == leaving)
                    .map(|(_, since)| since.elapsed());
                match removal_verdict(
                    old.len(),
                    leaving.len(),
                    acl_filtered,
                    held_for,
                    ctx.confirm_removal,
                ) {
                    Verdict::Apply => {
                        if held.take().is_some() {
                            clear_hold(&ctx, &source);
                        }
                        for service in &leaving {
                            dampers.remove(service);
                            ctx.index.delete(&source, service);
                            tracing::info!(dc = %dc, service = %service, "service left the Consul catalog");
                        }
                    }
                    Verdict::Hold(why) => {
                        // The services stay, as last known, until the answer is confirmed.
                        for service in &leaving {
                            new.insert(service.clone(), old[service].clone());
                        }
                        if held_for.is_none() {
                            held = Some((leaving, tokio::time::Instant::now()));
                        }
                        hold(&ctx, &source, &dc, &why);
                    }
                }
                if pending_sync.is_none() {
                    pending_sync = Some(new.keys().cloned().collect());
                    mark_synced_if_done(pending_sync.as_ref(), &ctx, &source);
                }
                for (service, tags) in &new {
                    if old.get(service) != Some(tags) {
                        fetch(service.clone(), &mut in_flight, &mut dirty, &mut tasks);
                    }
                }
                catalog = Some(new);
            }
            DcEvent::Fetched {
                service,
                result,
                elapsed,
            } => {
                in_flight.remove(&service);
                if result.is_ok() {
                    ctx.statuses.observe_sync(&source, elapsed);
                }
                let listed = catalog.as_ref().is_some_and(|c| c.contains_key(&service));
                let known_instances = || {
                    ctx.index.read(|i| {
                        i.get(&source, &service)
                            .unwrap_or_default()
                            .iter()
                            .map(|o| match o {
                                IndexObject::Endpoints(set) => set.endpoints.len(),
                                _ => 0,
                            })
                            .sum::<usize>()
                    })
                };
                match result {
                    // A service whose removal from the catalog is held keeps its instances
                    // too.
                    Ok((endpoints, _))
                        if endpoints.is_empty()
                            && held.as_ref().is_some_and(|(set, _)| set.contains(&service)) => {}
                    // Consul hid this service's instances from the token: the last known stay.
                    Ok((endpoints, true))
                        if listed && endpoints.is_empty() && known_instances() > 0 =>
                    {
                        hold(
                            &ctx,
                            &source,
                            &dc,
                            &format!(
                                "Consul hid the instances of {service} from this token (X-Consul-Results-Filtered-By-ACLs); the last known stay (grant the token service:read and node:read)"
                            ),
                        );
                    }
                    Ok((mut endpoints, _)) if listed => {
                        failures.remove(&service);
                        let damper = dampers.entry(service.clone()).or_default();
                        let now = started.elapsed();
                        if let Some(wait) = damper.damp(now, ctx.flap_hold, &mut endpoints) {
                            let (tx, retry) = (tx.clone(), service.clone());
                            tasks.spawn(async move {
                                tokio::time::sleep(wait).await;
                                let _ = tx.send(DcEvent::Retry(retry)).await;
                            });
                        }
                        let object = IndexObject::Endpoints(EndpointSet {
                            service: service.clone(),
                            endpoints,
                        });
                        ctx.index.apply(&source, &service, vec![object]);
                        if let Some(set) = pending_sync.as_mut()
                            && set.remove(&service)
                        {
                            mark_synced_if_done(pending_sync.as_ref(), &ctx, &source);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        record_error(&ctx, &dc, &e);
                        let n = failures.entry(service.clone()).or_default();
                        *n += 1;
                        let (tx, wait) = (tx.clone(), backoff(*n));
                        let retry = service.clone();
                        tasks.spawn(async move {
                            tokio::time::sleep(wait).await;
                            let _ = tx.send(DcEvent::Retry(retry)).await;
                        });
                    }
                }
                if dirty.remove(&service) && listed {
                    fetch(service, &mut in_flight, &mut dirty, &mut tasks);
                }
            }
            DcEvent::Retry(service) => {
                if catalog.as_ref().is_some_and(|c| c.contains_key(&service)) {
                    fetch(service, &mut in_flight, &mut dirty, &mut tasks);
                }
            }
            DcEvent::Resync => {
                for service in catalog
                    .iter()
                    .flat_map(|c| c.keys())
                    .cloned()
                    .collect::<Vec<_>>()
                {
                    fetch(service, &mut in_flight, &mut dirty, &mut tasks);
                }
            }
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

fn mark_synced_if_done(pending: Option<&BTreeSet<String>>, ctx: &ConsulContext, source: &str) {
    if pending.is_some_and(BTreeSet::is_empty) {
        let now = super::now_secs();
        ctx.statuses.update(source, |s| {
            if !s.synced {
                tracing::info!(source, "first full Consul sync complete");
            }
            s.synced = true;
            s.last_sync = Some(now);
        });
    }
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
    use crate::model::Origin;

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
}
