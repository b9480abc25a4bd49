//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's `leaderelection`
//! does it. The holder renews `renewTime` every `duration / 3`. Another replica never compares
//! the holder's `renewTime` with its own clock (replicas' clocks may disagree by seconds):
//! like client-go's `observedRecord` / `observedTime`, it remembers the record it last read
//! and the instant, on its own monotonic clock, at which it saw that record change. The
//! holder counts as expired only once the record (the whole spec: holder, `renewTime`,
//! `acquireTime`, transitions, `leaseDurationSeconds`) has stayed the same for
//! `leaseDurationSeconds` since that local observation, whatever `renewTime` says. A record
//! this replica has never seen counts as just observed, so a freshly started replica waits a
//! full duration before taking over a holder it has not seen renew (client-go does the same).
//! An empty holder (a released Lease) is taken at once.
//!
//! Every write carries the `resourceVersion` read, so two replicas racing for the Lease cannot
//! both win (the loser gets `409 Conflict`). A leader that cannot renew for two thirds of the
//! duration steps down; it counts from before its last successful write, and any other
//! replica saw that write no earlier than it was made, so the leader steps down before anyone
//! else may take over (clock rates aside, not clock values). On shutdown the leader releases
//! the Lease (empty holder), so a successor takes over at once instead of waiting for expiry.
//!
//! Every replica serves xDS; only the leader writes status and registers into Consul.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{info, warn};

/// What to do with the Lease as read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Nobody holds it, or the holder's time ran out: take it.
    Acquire,
    /// We hold it: renew.
    Renew,
    /// Someone else holds it.
    Follow {
        /// The holder.
        holder: String,
    },
}

/// The Lease record this replica last read, and when (on this replica's monotonic clock) it
/// saw that record change: client-go's `observedRecord` and `observedTime`.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    last: Option<(LeaseSpec, Instant)>,
}

impl Observed {
    /// Records `spec` as read at `now`, keeping the earlier instant if it did not change.
    /// Returns when the current record was first seen.
    fn see(&mut self, spec: &LeaseSpec, now: Instant) -> Instant {
        match &self.last {
            Some((seen, at)) if seen == spec => *at,
            _ => {
                self.last = Some((spec.clone(), now));
                now
            }
        }
    }
}

/// Decides from the Lease's spec as read at `now` (pure; the caller passes the time and keeps
/// `observed` from one round to the next). The holder's `renewTime` is never compared with
/// `now`: only whether the record changed within the last `leaseDurationSeconds`.
pub fn decide(
    spec: Option<&LeaseSpec>,
    me: &str,
    observed: &mut Observed,
    now: Instant,
) -> Decision {
    let Some(spec) = spec else {
        observed.last = None;
        return Decision::Acquire;
    };
    let changed_at = observed.see(spec, now);
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let secs = u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0);
    if now.saturating_duration_since(changed_at) >= Duration::from_secs(secs) {
        Decision::Acquire
    } else {
        Decision::Follow {
            holder: holder.to_string(),
        }
    }
}

/// Where the Lease is and who we are.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
    /// This replica's identity (`holderIdentity`).
    pub identity: String,
    /// `leaseDurationSeconds`.
    pub duration: Duration,
}

impl LeaseSettings {
    fn seconds(&self) -> i32 {
        i32::try_from(self.duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }
}

/// Campaigns for the Lease until `stop` turns true; `leader` tells whether this replica
/// leads. Releases the Lease on the way out if held.
pub async fn run(
    client: Client,
    settings: LeaseSettings,
    leader: watch::Sender<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    let period = settings.duration / 3;
    let renew_deadline = settings.duration * 2 / 3;
    let mut last_renewal: Option<tokio::time::Instant> = None;
    let mut holder_seen = String::new();
    let mut observed = Observed::default();
    loop {
        // Taken before the request: the renewTime written is no older than this. A request
        // may not outlast the renew deadline, so a hung API call cannot keep a stale leader.
        let attempt = tokio::time::Instant::now();
        let bound = match (last_renewal, *leader.borrow()) {
            (Some(t), true) => renew_deadline.saturating_sub(t.elapsed()),
            _ => renew_deadline,
        };
        let round =
            tokio::time::timeout(bound, try_acquire_or_renew(&api, &settings, &mut observed))
                .await
                .unwrap_or_else(|_| {
                    Err(kube::Error::Service("the Lease request timed out".into()))
                });
        match round {
            Ok(Decision::Acquire | Decision::Renew) => {
                last_renewal = Some(attempt);
                if !*leader.borrow() {
                    info!(lease = %settings.name, identity = %settings.identity, "became leader");
                    leader.send_replace(true);
                }
            }
            Ok(Decision::Follow { holder }) => {
                if *leader.borrow() {
                    warn!(holder = %holder, "lost the Lease to another replica; stepping down");
                    leader.send_replace(false);
                }
                if holder != holder_seen {
                    info!(holder = %holder, "following the leader");
                    holder_seen = holder;
                }
                last_renewal = None;
            }
            Err(e) => {
                warn!(error = %e, lease = %settings.name, "cannot read or write the leader Lease");
                if *leader.borrow() && last_renewal.is_none_or(|t| t.elapsed() >= renew_deadline) {
                    warn!("could not renew the Lease in time; stepping down");
                    leader.send_replace(false);
                }
            }
        }
        // A leader also steps down on time while it waits for the next round.
        let step_down_at = match (last_renewal, *leader.borrow()) {
            (Some(t), true) => Some(t + renew_deadline),
            _ => None,
        };
        let wait = step_down_at.map_or(period, |at| {
            period.min(at.saturating_duration_since(tokio::time::Instant::now()))
        });
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        if step_down_at.is_some_and(|at| tokio::time::Instant::now() >= at) && *leader.borrow() {
            warn!("the Lease was not renewed in time; stepping down");
            leader.send_replace(false);
        }
    }
    if *leader.borrow() {
        leader.send_replace(false);
        match release(&api, &settings).await {
            Ok(()) => info!(lease = %settings.name, "released the leader Lease"),
            Err(e) => warn!(error = %e, "could not release the leader Lease; it expires by itself"),
        }
    }
}

/// One round: read the Lease and take, renew or leave it. A lost race is `Follow`.
async fn try_acquire_or_renew(
    api: &Api<Lease>,
    settings: &LeaseSettings,
    observed: &mut Observed,
) -> Result<Decision, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&settings.name).await?;
    // Seen once the answer is in: the later, the safer for a follower.
    let decision = decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &settings.identity,
        observed,
        Instant::now(),
    );
    let lost = |holder: Option<&str>| Decision::Follow {
        holder: holder.unwrap_or("another replica").to_string(),
    };
    let Some(mut lease) = current else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(settings.name.clone()),
                namespace: Some(settings.namespace.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(settings.identity.clone()),
                lease_duration_seconds: Some(settings.seconds()),
                acquire_time: Some(MicroTime(now)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Decision::Acquire),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(lost(None)),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_default();
    match &decision {
        Decision::Follow { .. } => return Ok(decision),
        Decision::Renew => spec.renew_time = Some(MicroTime(now)),
        Decision::Acquire => {
            spec.holder_identity = Some(settings.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.renew_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
    }
    spec.lease_duration_seconds = Some(settings.seconds());
    match api
        .replace(&settings.name, &PostParams::default(), &lease)
        .await
    {
        Ok(_) => Ok(decision),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(lost(None)),
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, settings: &LeaseSettings) -> Result<(), kube::Error> {
    let Some(mut lease) = api.get_opt(&settings.name).await? else {
        return Ok(());
    };
    let spec = lease.spec.get_or_insert_default();
    if spec.holder_identity.as_deref() != Some(settings.identity.as_str()) {
        return Ok(());
    }
    spec.holder_identity = None;
    spec.lease_duration_seconds = Some(1);
    spec.renew_time = Some(MicroTime(Timestamp::now()));
    api.replace(&settings.name, &PostParams::default(), &lease)
        .await
        .map(|_| ())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::SignedDuration;

    use super::*;

    fn spec(holder: Option<&str>, renewed: Timestamp, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(secs),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }
    }

    fn minutes(m: i64) -> SignedDuration {
        SignedDuration::from_mins(m)
    }

    fn follow(holder: &str) -> Decision {
        Decision::Follow {
            holder: holder.into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewing_holder_is_followed_even_if_its_renew_time_is_long_past() {
        let mut observed = Observed::default();
        // The holder's clock is ten minutes behind ours, and it keeps renewing.
        let mut renewed = Timestamp::now() - minutes(10);
        for _ in 0..60 {
            let s = spec(Some("a"), renewed, 15);
            assert_eq!(
                decide(Some(&s), "b", &mut observed, Instant::now()),
                follow("a")
            );
            tokio::time::advance(Duration::from_secs(5)).await;
            renewed += SignedDuration::from_secs(5);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_holder_that_stops_renewing_is_taken_one_duration_after_its_last_change() {
        let mut observed = Observed::default();
        // The holder's clock is ten minutes ahead of ours.
        let renewed = Timestamp::now() + minutes(10);
        let first = spec(Some("a"), renewed, 15);
        assert_eq!(
            decide(Some(&first), "b", &mut observed, Instant::now()),
            follow("a")
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        // It renews once more, then stops: the lease runs 15 s from when we saw that.
        let last = spec(Some("a"), renewed + SignedDuration::from_secs(10), 15);
        let changed = Instant::now();
        assert_eq!(
            decide(Some(&last), "b", &mut observed, changed),
            follow("a")
        );
        for secs in [1, 5, 10, 14] {
            let now = changed + Duration::from_secs(secs);
            assert_eq!(
                decide(Some(&last), "b", &mut observed, now),
                follow("a"),
                "{secs} s after the last change"
            );
        }
        let now = changed + Duration::from_millis(14_999);
        assert_eq!(decide(Some(&last), "b", &mut observed, now), follow("a"));
        let now = changed + Duration::from_secs(15);
        assert_eq!(
            decide(Some(&last), "b", &mut observed, now),
            Decision::Acquire
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_record_never_seen_before_is_not_taken_at_once_however_old() {
        let mut observed = Observed::default();
        let ancient: Timestamp = "2001-01-01T00:00:00Z".parse().unwrap();
        let s = spec(Some("a"), ancient, 15);
        let seen = Instant::now();
        assert_eq!(decide(Some(&s), "b", &mut observed, seen), follow("a"));
        let now = seen + Duration::from_secs(14);
        assert_eq!(decide(Some(&s), "b", &mut observed, now), follow("a"));
        let now = seen + Duration::from_secs(15);
        assert_eq!(decide(Some(&s), "b", &mut observed, now), Decision::Acquire);
        // Another holder's record counts as new again.
        let other = spec(Some("c"), ancient, 15);
        assert_eq!(decide(Some(&other), "b", &mut observed, now), follow("c"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_or_released_lease_is_taken_at_once_and_our_own_is_renewed() {
        let t0: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let mut observed = Observed::default();
        let now = Instant::now();
        assert_eq!(decide(None, "b", &mut observed, now), Decision::Acquire);
        assert_eq!(
            decide(Some(&spec(None, t0, 15)), "b", &mut observed, now),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&spec(Some(""), t0, 15)), "b", &mut observed, now),
            Decision::Acquire
        );
        let mut fresh = Observed::default();
        assert_eq!(
            decide(Some(&spec(Some("b"), t0, 15)), "b", &mut fresh, now),
            Decision::Renew
        );
        let later = now + Duration::from_secs(100);
        assert_eq!(
            decide(Some(&spec(Some("b"), t0, 15)), "b", &mut fresh, later),
            Decision::Renew
        );
    }
}
