//! The watch of one Consul datacenter as a pure state machine: it owns what the datacenter's
//! driver remembers between answers (the last catalog and check fingerprints, fetches in
//! flight, services that changed again while fetched, per-service failures, a held removal,
//! flap dampers, what was published) and turns each event into commands for the driver.
//!
//! No IO, no tokio, no clock: the driver passes the time as `now`, a monotonic reading since
//! the watch started, and performs the commands in the order they are returned.
//!
//! Rules it keeps:
//! - the checks baseline is taken before the catalog is watched, so no change can fall
//!   between the two; a check change only fetches services the catalog lists;
//! - a service is fetched at most once at a time: a service that changes again while fetched
//!   is fetched once more when the answer arrives (the connection bound itself is the
//!   client's semaphore);
//! - a failed fetch is reported and retried after [`backoff`]; the last known instances stay;
//! - a catalog answer removing services goes through [`removal_verdict`]: a held removal keeps
//!   the services (and their instances) until the same answer has held for `confirm_removal`;
//! - an answer hiding a known service's instances from the token (ACL filtering) keeps them;
//! - instances pass through a [`FlapDamper`] per service; a held instance is looked at again
//!   when its hold ends;
//! - a catalog answer whose `X-Consul-Index` moved while its content (names and tags) did not
//!   means an instance's registration changed in a way neither feed shows (port, address,
//!   weights, meta, or an instance without checks): every service is fetched again (a sweep),
//!   at most once per [`SWEEP_GAP`]; a move inside the gap sweeps once when it ends. So such
//!   a change is seen within about a second, and a steady stream of changes costs at most one
//!   fetch per service per gap.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::model::Endpoint;

use super::client::{ConsulError, backoff};
use super::damper::FlapDamper;
use super::removal::{Verdict, removal_verdict};
use super::wire::{CheckFingerprints, changed_services};

/// The shortest time between two sweeps caused by catalog index moves.
pub const SWEEP_GAP: Duration = Duration::from_secs(1);

/// What the watch is told: answers, failures and timers, as the driver observes them.
#[derive(Debug)]
pub enum WatchEvent {
    /// `/v1/health/state/any` answered.
    ChecksAnswered(CheckFingerprints),
    /// `/v1/catalog/services` answered.
    CatalogAnswered {
        /// Service name → tags.
        services: BTreeMap<String, Vec<String>>,
        /// Whether Consul hid results from this token.
        acl_filtered: bool,
        /// Whether `X-Consul-Index` differs from the one the query asked with (always true
        /// for the first answer after a start or an error).
        moved: bool,
    },
    /// `/v1/health/service/<service>` answered.
    HealthAnswered {
        /// The service fetched.
        service: String,
        /// Its instances.
        endpoints: Vec<Endpoint>,
        /// Whether Consul hid instances from this token.
        acl_filtered: bool,
        /// How long the fetch took.
        elapsed: Duration,
    },
    /// `/v1/health/service/<service>` failed.
    HealthFailed {
        /// The service fetched.
        service: String,
        /// Why.
        error: ConsulError,
    },
    /// The fetch of `service` ended without an answer (its task panicked): retried like a
    /// failure, so the service is not left "in flight" forever.
    FetchLost(String),
    /// The wake-up asked for by [`WatchCommand::WakeAfter`] is due.
    RetryDue(String),
    /// Time to fetch every listed service again, repairing any drift.
    ResyncDue,
    /// The sweep asked for by [`WatchCommand::SweepAfter`] is due.
    SweepDue,
}

/// What the driver does for the watch.
#[derive(Debug)]
pub enum WatchCommand {
    /// Open the catalog blocking query (the checks baseline is taken).
    WatchCatalog,
    /// Fetch `/v1/health/service/<service>` and report the answer or the failure.
    Fetch(String),
    /// Set the service's instances in the index.
    Publish {
        /// The service.
        service: String,
        /// Its instances, damped.
        endpoints: Vec<Endpoint>,
    },
    /// Remove the service from the index: it left the catalog.
    Remove(String),
    /// Send [`WatchEvent::RetryDue`] for `service` after `wait`.
    WakeAfter {
        /// The service to look at again.
        service: String,
        /// When.
        wait: Duration,
    },
    /// Send [`WatchEvent::SweepDue`] after this long.
    SweepAfter(Duration),
    /// Mark the source degraded: an answer is held back, the last known state stays.
    Hold(String),
    /// Clear a hold: Consul's answers apply again.
    ClearHold,
    /// Report a failed request (metric, log, source status).
    ReportError(ConsulError),
    /// Record a successful fetch taking this long.
    ObserveSync(Duration),
    /// Every service of the first catalog answer is published: the first full sync is done.
    MarkSynced,
}

/// Settings of the watch.
#[derive(Clone, Copy, Debug, Default)]
pub struct WatchSettings {
    /// Flap damping hold (zero: off).
    pub flap_hold: Duration,
    /// How long a mass removal must hold before it is applied.
    pub confirm_removal: Duration,
}

/// A catalog removal held back, and since when the same removal has been answered.
#[derive(Debug)]
struct HeldRemoval {
    services: BTreeSet<String>,
    since: Duration,
}

/// The state of one datacenter's watch (pure): feed it events, perform its commands.
#[derive(Debug, Default)]
pub struct DatacenterWatch {
    settings: WatchSettings,
    catalog: Option<BTreeMap<String, Vec<String>>>,
    checks: Option<CheckFingerprints>,
    /// Services of the first catalog answer not yet published (`None` before it).
    pending_sync: Option<BTreeSet<String>>,
    in_flight: BTreeSet<String>,
    /// Services that changed again while fetched.
    dirty: BTreeSet<String>,
    failures: BTreeMap<String, u32>,
    held: Option<HeldRemoval>,
    dampers: BTreeMap<String, FlapDamper>,
    /// Service → number of instances last published.
    published: BTreeMap<String, usize>,
    /// When every service was last fetched (a sweep or a resync).
    last_sweep: Option<Duration>,
    /// A [`WatchCommand::SweepAfter`] is outstanding.
    sweep_scheduled: bool,
}

impl DatacenterWatch {
    /// A watch that has seen nothing yet.
    pub fn new(settings: WatchSettings) -> Self {
        Self {
            settings,
            ..Self::default()
        }
    }

    /// Services being fetched now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Takes one event observed at `now` (time since the watch started); returns what to do,
    /// in order.
    pub fn handle(&mut self, event: WatchEvent, now: Duration) -> Vec<WatchCommand> {
        match event {
            WatchEvent::ChecksAnswered(checks) => self.checks_answered(checks),
            WatchEvent::CatalogAnswered {
                services,
                acl_filtered,
                moved,
            } => self.catalog_answered(services, acl_filtered, moved, now),
            WatchEvent::HealthAnswered {
                service,
                endpoints,
                acl_filtered,
                elapsed,
            } => self.health_answered(service, endpoints, acl_filtered, elapsed, now),
            WatchEvent::HealthFailed { service, error } => self.health_failed(service, Some(error)),
            WatchEvent::FetchLost(service) => self.health_failed(service, None),
            WatchEvent::RetryDue(service) => {
                let mut out = Vec::new();
                if self.listed(&service) {
                    self.fetch(service, &mut out);
                }
                out
            }
            WatchEvent::ResyncDue => {
                let mut out = Vec::new();
                self.fetch_all(now, &mut out);
                out
            }
            WatchEvent::SweepDue => {
                let mut out = Vec::new();
                self.sweep_scheduled = false;
                self.fetch_all(now, &mut out);
                out
            }
        }
    }

    /// Fetches every listed service (those being fetched once more when answered).
    fn fetch_all(&mut self, now: Duration, out: &mut Vec<WatchCommand>) {
        self.last_sweep = Some(now);
        let all: Vec<String> = self
            .catalog
            .iter()
            .flat_map(|c| c.keys())
            .cloned()
            .collect();
        for service in all {
            self.fetch(service, out);
        }
    }

    /// Sweeps now if the last sweep is at least [`SWEEP_GAP`] old, else once when it is;
    /// returns whether it swept now.
    fn sweep(&mut self, now: Duration, out: &mut Vec<WatchCommand>) -> bool {
        match self.last_sweep {
            Some(last) if now < last + SWEEP_GAP => {
                if !self.sweep_scheduled {
                    self.sweep_scheduled = true;
                    out.push(WatchCommand::SweepAfter(last + SWEEP_GAP - now));
                }
                false
            }
            _ => {
                self.fetch_all(now, out);
                true
            }
        }
    }

    fn listed(&self, service: &str) -> bool {
        self.catalog
            .as_ref()
            .is_some_and(|c| c.contains_key(service))
    }

    /// Fetches `service` unless it is being fetched; then it is fetched again once answered.
    fn fetch(&mut self, service: String, out: &mut Vec<WatchCommand>) {
        if self.in_flight.insert(service.clone()) {
            out.push(WatchCommand::Fetch(service));
        } else {
            self.dirty.insert(service);
        }
    }

    fn checks_answered(&mut self, new: CheckFingerprints) -> Vec<WatchCommand> {
        let mut out = Vec::new();
        let changed = match &self.checks {
            Some(old) => changed_services(old, &new),
            None => {
                // Baseline taken: now the catalog, and the first full fetch.
                out.push(WatchCommand::WatchCatalog);
                BTreeSet::new()
            }
        };
        self.checks = Some(new);
        for service in changed {
            if self.listed(&service) {
                self.fetch(service, &mut out);
            }
        }
        out
    }

    fn catalog_answered(
        &mut self,
        mut new: BTreeMap<String, Vec<String>>,
        acl_filtered: bool,
        moved: bool,
        now: Duration,
    ) -> Vec<WatchCommand> {
        let mut out = Vec::new();
        let first = self.catalog.is_none();
        let old = self.catalog.take().unwrap_or_default();
        let leaving: BTreeSet<String> = old
            .keys()
            .filter(|s| !new.contains_key(*s))
            .cloned()
            .collect();
        let held_for = self
            .held
            .as_ref()
            .filter(|h| h.services == leaving)
            .map(|h| now.saturating_sub(h.since));
        let verdict = removal_verdict(
            old.len(),
            leaving.len(),
            acl_filtered,
            held_for,
            self.settings.confirm_removal,
        );
        match verdict {
            Verdict::Apply => {
                if self.held.take().is_some() {
                    out.push(WatchCommand::ClearHold);
                }
                for service in leaving {
                    self.dampers.remove(&service);
                    self.published.remove(&service);
                    out.push(WatchCommand::Remove(service));
                }
            }
            Verdict::Hold(why) => {
                // The services stay, as last known, until the answer is confirmed.
                for service in &leaving {
                    new.insert(service.clone(), old[service].clone());
                }
                if held_for.is_none() {
                    self.held = Some(HeldRemoval {
                        services: leaving,
                        since: now,
                    });
                }
                out.push(WatchCommand::Hold(why));
            }
        }
        if self.pending_sync.is_none() {
            self.pending_sync = Some(new.keys().cloned().collect());
            self.mark_synced_if_done(&mut out);
        }
        let changed: Vec<String> = new
            .iter()
            .filter(|(service, tags)| old.get(*service) != Some(tags))
            .map(|(service, _)| service.clone())
            .collect();
        self.catalog = Some(new);
        // The first answer fetches everything as new; later, an index that moved may hide a
        // registration change no content shows.
        if !first && moved && self.sweep(now, &mut out) {
            return out;
        }
        for service in changed {
            self.fetch(service, &mut out);
        }
        out
    }

    fn health_answered(
        &mut self,
        service: String,
        mut endpoints: Vec<Endpoint>,
        acl_filtered: bool,
        elapsed: Duration,
        now: Duration,
    ) -> Vec<WatchCommand> {
        let mut out = vec![WatchCommand::ObserveSync(elapsed)];
        self.in_flight.remove(&service);
        let listed = self.listed(&service);
        let removal_held = self
            .held
            .as_ref()
            .is_some_and(|h| h.services.contains(&service));
        let known = self.published.get(&service).copied().unwrap_or(0);
        if endpoints.is_empty() && removal_held {
            // A service whose removal from the catalog is held keeps its instances too.
        } else if acl_filtered && listed && endpoints.is_empty() && known > 0 {
            // Consul hid this service's instances from the token: the last known stay.
            out.push(WatchCommand::Hold(format!(
                "Consul hid the instances of {service} from this token (X-Consul-Results-Filtered-By-ACLs); the last known stay (grant the token service:read and node:read)"
            )));
        } else if listed {
            self.failures.remove(&service);
            let damper = self.dampers.entry(service.clone()).or_default();
            if let Some(wait) = damper.damp(now, self.settings.flap_hold, &mut endpoints) {
                out.push(WatchCommand::WakeAfter {
                    service: service.clone(),
                    wait,
                });
            }
            self.published.insert(service.clone(), endpoints.len());
            out.push(WatchCommand::Publish {
                service: service.clone(),
                endpoints,
            });
            if let Some(pending) = self.pending_sync.as_mut()
                && pending.remove(&service)
            {
                self.mark_synced_if_done(&mut out);
            }
        }
        self.refetch_if_dirty(service, listed, &mut out);
        out
    }

    fn health_failed(&mut self, service: String, error: Option<ConsulError>) -> Vec<WatchCommand> {
        self.in_flight.remove(&service);
        let listed = self.listed(&service);
        let failures = self.failures.entry(service.clone()).or_default();
        *failures += 1;
        let mut out: Vec<WatchCommand> = error.map(WatchCommand::ReportError).into_iter().collect();
        out.push(WatchCommand::WakeAfter {
            service: service.clone(),
            wait: backoff(*failures),
        });
        self.refetch_if_dirty(service, listed, &mut out);
        out
    }

    fn refetch_if_dirty(&mut self, service: String, listed: bool, out: &mut Vec<WatchCommand>) {
        if self.dirty.remove(&service) && listed {
            self.fetch(service, out);
        }
    }

    fn mark_synced_if_done(&self, out: &mut Vec<WatchCommand>) {
        if self.pending_sync.as_ref().is_some_and(BTreeSet::is_empty) {
            out.push(WatchCommand::MarkSynced);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Origin;

    const SECOND: Duration = Duration::from_secs(1);

    fn settings() -> WatchSettings {
        WatchSettings {
            flap_hold: SECOND,
            confirm_removal: 30 * SECOND,
        }
    }

    fn ep(address: &str, healthy: bool) -> Endpoint {
        Endpoint {
            address: address.into(),
            port: 80,
            origin: Origin::Consul,
            datacenter: Some("dc1".into()),
            tags: BTreeSet::new(),
            weight: 1,
            healthy,
            ports: Default::default(),
        }
    }

    fn catalog(services: &[&str]) -> WatchEvent {
        WatchEvent::CatalogAnswered {
            services: services
                .iter()
                .map(|s| (s.to_string(), Vec::new()))
                .collect(),
            acl_filtered: false,
            moved: false,
        }
    }

    /// A catalog answer with the same content as before whose index moved.
    fn catalog_moved(services: &[&str]) -> WatchEvent {
        let WatchEvent::CatalogAnswered {
            services,
            acl_filtered,
            ..
        } = catalog(services)
        else {
            unreachable!()
        };
        WatchEvent::CatalogAnswered {
            services,
            acl_filtered,
            moved: true,
        }
    }

    fn answered(service: &str, endpoints: Vec<Endpoint>) -> WatchEvent {
        WatchEvent::HealthAnswered {
            service: service.into(),
            endpoints,
            acl_filtered: false,
            elapsed: Duration::from_millis(3),
        }
    }

    fn failed(service: &str) -> WatchEvent {
        WatchEvent::HealthFailed {
            service: service.into(),
            error: ConsulError::Status {
                url: format!("/v1/health/service/{service}"),
                status: 500,
                body: "rpc error".into(),
            },
        }
    }

    /// Check fingerprints where each named service has the given fingerprint.
    fn checks(services: &[(&str, u64)]) -> WatchEvent {
        WatchEvent::ChecksAnswered(CheckFingerprints {
            services: services.iter().map(|(s, f)| (s.to_string(), *f)).collect(),
            ..CheckFingerprints::default()
        })
    }

    fn fetched(commands: &[WatchCommand]) -> Vec<&str> {
        commands
            .iter()
            .filter_map(|c| match c {
                WatchCommand::Fetch(s) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }

    fn removed(commands: &[WatchCommand]) -> Vec<&str> {
        commands
            .iter()
            .filter_map(|c| match c {
                WatchCommand::Remove(s) => Some(s.as_str()),
                _ => None,
            })
            .collect()
    }

    /// What was published: service → (address, healthy) of each instance.
    fn published(commands: &[WatchCommand]) -> Vec<(&str, Vec<(&str, bool)>)> {
        commands
            .iter()
            .filter_map(|c| match c {
                WatchCommand::Publish { service, endpoints } => Some((
                    service.as_str(),
                    endpoints
                        .iter()
                        .map(|e| (e.address.as_str(), e.healthy))
                        .collect(),
                )),
                _ => None,
            })
            .collect()
    }

    fn wake_ups(commands: &[WatchCommand]) -> Vec<(&str, Duration)> {
        commands
            .iter()
            .filter_map(|c| match c {
                WatchCommand::WakeAfter { service, wait } => Some((service.as_str(), *wait)),
                _ => None,
            })
            .collect()
    }

    fn holds(commands: &[WatchCommand]) -> Vec<&str> {
        commands
            .iter()
            .filter_map(|c| match c {
                WatchCommand::Hold(why) => Some(why.as_str()),
                _ => None,
            })
            .collect()
    }

    fn synced(commands: &[WatchCommand]) -> bool {
        commands
            .iter()
            .any(|c| matches!(c, WatchCommand::MarkSynced))
    }

    /// A watch that took its checks baseline, got `services` from the catalog and published
    /// one instance of each.
    fn watching(services: &[&str]) -> DatacenterWatch {
        let mut w = DatacenterWatch::new(settings());
        w.handle(checks(&[]), Duration::ZERO);
        w.handle(catalog(services), Duration::ZERO);
        for s in services {
            w.handle(answered(s, vec![ep("10.0.0.1", true)]), Duration::ZERO);
        }
        w
    }

    #[test]
    fn the_catalog_is_watched_after_the_checks_baseline_and_fetches_new_services_only() {
        let mut w = DatacenterWatch::new(settings());
        let out = w.handle(checks(&[("orders", 1)]), Duration::ZERO);
        assert!(matches!(out[..], [WatchCommand::WatchCatalog]), "{out:?}");
        // A check change before the catalog is known fetches nothing.
        assert!(fetched(&w.handle(checks(&[("orders", 2)]), Duration::ZERO)).is_empty());

        let out = w.handle(catalog(&["billing", "orders"]), Duration::ZERO);
        assert_eq!(fetched(&out), ["billing", "orders"]);
        assert!(!synced(&out));
        let out = w.handle(
            answered("orders", vec![ep("10.0.0.1", true)]),
            Duration::ZERO,
        );
        assert_eq!(published(&out), [("orders", vec![("10.0.0.1", true)])]);
        assert!(!synced(&out), "synced before billing was published");
        let out = w.handle(
            answered("billing", vec![ep("10.0.0.2", true)]),
            Duration::ZERO,
        );
        assert_eq!(published(&out), [("billing", vec![("10.0.0.2", true)])]);
        assert!(synced(&out), "every first service published, not synced");

        // billing leaves (a small removal: applied at once), payments arrives; orders is
        // unchanged and not fetched again.
        let out = w.handle(catalog(&["orders", "payments"]), Duration::ZERO);
        assert_eq!(removed(&out), ["billing"]);
        assert_eq!(fetched(&out), ["payments"]);
        // billing is never fetched again, whatever wakes it.
        assert!(
            fetched(&w.handle(checks(&[("billing", 9), ("orders", 2)]), Duration::ZERO)).is_empty()
        );
        assert!(
            fetched(&w.handle(WatchEvent::RetryDue("billing".into()), Duration::ZERO)).is_empty()
        );
        // A check change of a listed service fetches it; a tag change too.
        assert_eq!(
            fetched(&w.handle(checks(&[("billing", 9), ("orders", 3)]), Duration::ZERO)),
            ["orders"]
        );
        w.handle(
            answered("orders", vec![ep("10.0.0.1", true)]),
            Duration::ZERO,
        );
        let tagged = WatchEvent::CatalogAnswered {
            services: BTreeMap::from([
                ("orders".to_string(), vec!["canary".to_string()]),
                ("payments".to_string(), Vec::new()),
            ]),
            acl_filtered: false,
            moved: false,
        };
        assert_eq!(fetched(&w.handle(tagged, Duration::ZERO)), ["orders"]);
    }

    #[test]
    fn a_catalog_index_move_without_visible_change_sweeps_at_most_once_per_gap() {
        let ms = Duration::from_millis;
        let mut w = DatacenterWatch::new(settings());
        w.handle(checks(&[]), Duration::ZERO);
        // The first answer fetches everything once, moved or not.
        assert_eq!(
            fetched(&w.handle(catalog_moved(&["billing", "orders"]), Duration::ZERO)),
            ["billing", "orders"]
        );
        for s in ["billing", "orders"] {
            w.handle(answered(s, vec![ep("10.0.0.1", true)]), ms(10));
        }
        // Same names and tags, same index: nothing to fetch.
        assert!(fetched(&w.handle(catalog(&["billing", "orders"]), ms(20))).is_empty());
        // Same names and tags, moved index (a port changed): every service is fetched.
        let out = w.handle(catalog_moved(&["billing", "orders"]), ms(2000));
        assert_eq!(fetched(&out), ["billing", "orders"]);
        for s in ["billing", "orders"] {
            let out = w.handle(answered(s, vec![ep("10.0.0.2", true)]), ms(2010));
            assert_eq!(published(&out), [(s, vec![("10.0.0.2", true)])]);
        }
        // Moves inside the gap: one sweep, when the gap ends, whatever their number.
        let out = w.handle(catalog_moved(&["billing", "orders"]), ms(2300));
        assert!(fetched(&out).is_empty(), "{out:?}");
        assert!(
            matches!(out[..], [WatchCommand::SweepAfter(d)] if d == ms(700)),
            "{out:?}"
        );
        let out = w.handle(catalog_moved(&["billing", "orders"]), ms(2600));
        assert!(out.is_empty(), "a second wake-up was asked for: {out:?}");
        assert_eq!(
            fetched(&w.handle(WatchEvent::SweepDue, ms(3000))),
            ["billing", "orders"]
        );
        // A tag change inside the gap is fetched at once; the rest waits for the sweep.
        for s in ["billing", "orders"] {
            w.handle(answered(s, vec![ep("10.0.0.2", true)]), ms(3010));
        }
        let tagged = WatchEvent::CatalogAnswered {
            services: BTreeMap::from([
                ("billing".to_string(), Vec::new()),
                ("orders".to_string(), vec!["canary".to_string()]),
            ]),
            acl_filtered: false,
            moved: true,
        };
        let out = w.handle(tagged, ms(3100));
        assert_eq!(fetched(&out), ["orders"]);
        assert!(
            out.iter()
                .any(|c| matches!(c, WatchCommand::SweepAfter(d) if *d == ms(900))),
            "{out:?}"
        );
    }

    #[test]
    fn an_empty_catalog_is_synced_at_once() {
        let mut w = DatacenterWatch::new(settings());
        w.handle(checks(&[]), Duration::ZERO);
        assert!(synced(&w.handle(catalog(&[]), Duration::ZERO)));
    }

    #[test]
    fn a_failed_fetch_is_retried_with_backoff_and_the_last_instances_stay() {
        let mut w = watching(&["orders"]);
        let out = w.handle(checks(&[("orders", 2)]), Duration::ZERO);
        assert_eq!(fetched(&out), ["orders"]);

        let out = w.handle(failed("orders"), Duration::ZERO);
        assert!(
            matches!(
                out[0],
                WatchCommand::ReportError(ConsulError::Status { status: 500, .. })
            ),
            "{out:?}"
        );
        assert!(
            published(&out).is_empty() && removed(&out).is_empty(),
            "{out:?}"
        );
        assert_eq!(wake_ups(&out), [("orders", Duration::from_millis(250))]);
        assert_eq!(
            fetched(&w.handle(WatchEvent::RetryDue("orders".into()), Duration::ZERO)),
            ["orders"]
        );
        let out = w.handle(failed("orders"), Duration::ZERO);
        assert_eq!(wake_ups(&out), [("orders", Duration::from_millis(500))]);
        assert!(
            published(&out).is_empty() && removed(&out).is_empty(),
            "{out:?}"
        );

        // Recovery publishes and resets the backoff.
        w.handle(WatchEvent::RetryDue("orders".into()), Duration::ZERO);
        let out = w.handle(
            answered("orders", vec![ep("10.0.0.9", true)]),
            Duration::ZERO,
        );
        assert_eq!(published(&out), [("orders", vec![("10.0.0.9", true)])]);
        w.handle(WatchEvent::ResyncDue, Duration::ZERO);
        let out = w.handle(failed("orders"), Duration::ZERO);
        assert_eq!(wake_ups(&out), [("orders", Duration::from_millis(250))]);
    }

    #[test]
    fn a_lost_fetch_is_retried_and_does_not_block_the_service() {
        let mut w = watching(&["orders"]);
        assert_eq!(
            fetched(&w.handle(WatchEvent::ResyncDue, Duration::ZERO)),
            ["orders"]
        );
        let out = w.handle(WatchEvent::FetchLost("orders".into()), Duration::ZERO);
        assert!(
            published(&out).is_empty() && removed(&out).is_empty(),
            "{out:?}"
        );
        assert_eq!(wake_ups(&out), [("orders", Duration::from_millis(250))]);
        assert_eq!(w.in_flight(), 0);
        assert_eq!(
            fetched(&w.handle(checks(&[("orders", 2)]), Duration::ZERO)),
            ["orders"],
            "the service stayed in flight"
        );
    }

    #[test]
    fn a_service_is_fetched_at_most_once_at_a_time_and_changes_meanwhile_are_not_lost() {
        let services: Vec<String> = (0..40).map(|i| format!("svc-{i:02}")).collect();
        let names: Vec<&str> = services.iter().map(String::as_str).collect();
        let mut w = DatacenterWatch::new(settings());
        w.handle(checks(&[]), Duration::ZERO);
        let mut outstanding: Vec<String> = Vec::new();
        let track = |out: &[WatchCommand], outstanding: &mut Vec<String>| {
            for s in fetched(out) {
                assert!(
                    !outstanding.iter().any(|o| o == s),
                    "{s} fetched while its fetch is in flight"
                );
                outstanding.push(s.to_string());
            }
            assert!(outstanding.len() <= names.len());
        };
        track(&w.handle(catalog(&names), Duration::ZERO), &mut outstanding);
        assert_eq!(outstanding.len(), 40);
        // A pseudo-random storm of check changes, retries, resyncs and answers.
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for round in 0..3_000u64 {
            let event = match next(5) {
                0 => checks(&[(names[next(40) as usize], round)]),
                1 => WatchEvent::RetryDue(names[next(40) as usize].to_string()),
                2 if round % 50 == 0 => WatchEvent::ResyncDue,
                _ if outstanding.is_empty() => continue,
                3 => {
                    let s = outstanding.remove(next(outstanding.len() as u64) as usize);
                    failed(&s)
                }
                _ => {
                    let s = outstanding.remove(next(outstanding.len() as u64) as usize);
                    answered(&s, vec![ep("10.0.0.1", true)])
                }
            };
            track(&w.handle(event, Duration::ZERO), &mut outstanding);
            assert_eq!(w.in_flight(), outstanding.len());
        }
        // A service that changed while fetched is fetched once more after the answer.
        track(&w.handle(checks(&[]), Duration::ZERO), &mut outstanding);
        while let Some(s) = outstanding.pop() {
            track(
                &w.handle(answered(&s, Vec::new()), Duration::ZERO),
                &mut outstanding,
            );
        }
        track(
            &w.handle(checks(&[("svc-03", 1)]), Duration::ZERO),
            &mut outstanding,
        );
        track(
            &w.handle(checks(&[("svc-03", 2)]), Duration::ZERO),
            &mut outstanding,
        );
        assert_eq!(outstanding, ["svc-03"]);
        let out = w.handle(answered("svc-03", Vec::new()), Duration::ZERO);
        assert_eq!(fetched(&out), ["svc-03"], "the second change was lost");
        let out = w.handle(answered("svc-03", Vec::new()), Duration::ZERO);
        assert!(
            fetched(&out).is_empty(),
            "fetched again with nothing changed"
        );
    }

    #[test]
    fn a_mass_removal_applies_only_once_the_same_answer_held_for_the_confirmation() {
        let six = ["a", "b", "c", "d", "e", "f"];
        let mut w = watching(&six);
        let start = 10 * SECOND;
        let out = w.handle(catalog(&["a", "b"]), start);
        assert!(removed(&out).is_empty(), "{out:?}");
        assert!(
            holds(&out)[0].contains("would remove 4 of 6 services"),
            "{out:?}"
        );
        // The held services stay listed, and an empty answer for one keeps its instances.
        assert_eq!(
            fetched(&w.handle(WatchEvent::RetryDue("c".into()), start)),
            ["c"]
        );
        assert!(published(&w.handle(answered("c", Vec::new()), start)).is_empty());

        let out = w.handle(catalog(&["a", "b"]), start + 29 * SECOND);
        assert!(
            removed(&out).is_empty(),
            "applied before the confirmation: {out:?}"
        );
        let out = w.handle(catalog(&["a", "b"]), start + 30 * SECOND);
        assert!(matches!(out[0], WatchCommand::ClearHold), "{out:?}");
        assert_eq!(removed(&out), ["c", "d", "e", "f"]);
        assert!(fetched(&w.handle(WatchEvent::ResyncDue, start + 31 * SECOND)).len() == 2);
    }

    #[test]
    fn a_different_removal_restarts_the_confirmation_and_a_hidden_one_never_applies() {
        let mut w = watching(&["a", "b", "c", "d", "e", "f"]);
        w.handle(catalog(&["a", "b"]), Duration::ZERO);
        // Another set leaving: its own 30 seconds start now.
        let out = w.handle(catalog(&["a"]), 20 * SECOND);
        assert!(removed(&out).is_empty(), "{out:?}");
        let out = w.handle(catalog(&["a"]), 40 * SECOND);
        assert!(
            removed(&out).is_empty(),
            "confirmed by another removal: {out:?}"
        );
        assert_eq!(
            removed(&w.handle(catalog(&["a"]), 50 * SECOND)),
            ["b", "c", "d", "e", "f"]
        );

        let mut w = watching(&["a", "b"]);
        let hidden = || WatchEvent::CatalogAnswered {
            services: BTreeMap::from([("a".to_string(), Vec::new())]),
            acl_filtered: true,
            moved: false,
        };
        w.handle(hidden(), Duration::ZERO);
        let out = w.handle(hidden(), 3_600 * SECOND);
        assert!(removed(&out).is_empty(), "{out:?}");
        assert!(holds(&out)[0].contains("X-Consul-Results-Filtered-By-ACLs"));
    }

    #[test]
    fn instances_hidden_by_acls_keep_the_last_known() {
        let mut w = watching(&["orders"]);
        w.handle(WatchEvent::ResyncDue, Duration::ZERO);
        let out = w.handle(
            WatchEvent::HealthAnswered {
                service: "orders".into(),
                endpoints: Vec::new(),
                acl_filtered: true,
                elapsed: Duration::ZERO,
            },
            Duration::ZERO,
        );
        assert!(published(&out).is_empty(), "{out:?}");
        assert!(
            holds(&out)[0].contains("hid the instances of orders"),
            "{out:?}"
        );
        // Not filtered: the service really has no instances now.
        w.handle(WatchEvent::ResyncDue, Duration::ZERO);
        let out = w.handle(answered("orders", Vec::new()), Duration::ZERO);
        assert_eq!(published(&out), [("orders", vec![])]);
    }

    #[test]
    fn a_recovering_instance_stays_out_for_the_flap_hold_then_is_looked_at_again() {
        let ms = Duration::from_millis;
        let mut w = watching(&["orders"]);
        w.handle(WatchEvent::ResyncDue, ms(100));
        let out = w.handle(answered("orders", vec![ep("10.0.0.1", false)]), ms(100));
        assert_eq!(published(&out), [("orders", vec![("10.0.0.1", false)])]);
        w.handle(WatchEvent::ResyncDue, ms(200));
        let out = w.handle(answered("orders", vec![ep("10.0.0.1", true)]), ms(200));
        assert_eq!(published(&out), [("orders", vec![("10.0.0.1", false)])]);
        assert_eq!(wake_ups(&out), [("orders", ms(900))]);
        assert_eq!(
            fetched(&w.handle(WatchEvent::RetryDue("orders".into()), ms(1100))),
            ["orders"]
        );
        let out = w.handle(answered("orders", vec![ep("10.0.0.1", true)]), ms(1100));
        assert_eq!(published(&out), [("orders", vec![("10.0.0.1", true)])]);
        assert!(wake_ups(&out).is_empty());
    }
}
