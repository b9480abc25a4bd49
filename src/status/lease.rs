//! Leader election on a `coordination.k8s.io/v1` Lease, the way client-go's `leaderelection`
//! does it: the holder renews `renewTime` every `duration / 3`; another replica takes the
//! Lease once `renewTime + leaseDurationSeconds` has passed; every write carries the
//! `resourceVersion` read, so two replicas racing for it cannot both win (the loser gets
//! `409 Conflict`). A leader that cannot renew for two thirds of the duration steps down
//! before anyone else may take over. On shutdown the leader releases the Lease (empty holder),
//! so a successor takes over at once instead of waiting for expiry.
//!
//! Every replica serves xDS; only the leader writes status and registers into Consul.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
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

/// Decides from the Lease's spec (pure; the caller passes the time).
pub fn decide(spec: Option<&LeaseSpec>, me: &str, now: Timestamp) -> Decision {
    let Some(spec) = spec else {
        return Decision::Acquire;
    };
    let holder = spec.holder_identity.as_deref().unwrap_or("");
    if holder.is_empty() {
        return Decision::Acquire;
    }
    if holder == me {
        return Decision::Renew;
    }
    let duration = SignedDuration::from_secs(i64::from(spec.lease_duration_seconds.unwrap_or(0)));
    let expired = spec
        .renew_time
        .as_ref()
        .or(spec.acquire_time.as_ref())
        .is_none_or(|t| t.0 + duration < now);
    if expired {
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
    loop {
        // Taken before the request: the renewTime written is no older than this. A request
        // may not outlast the renew deadline, so a hung API call cannot keep a stale leader.
        let attempt = tokio::time::Instant::now();
        let bound = match (last_renewal, *leader.borrow()) {
            (Some(t), true) => renew_deadline.saturating_sub(t.elapsed()),
            _ => renew_deadline,
        };
        let round = tokio::time::timeout(bound, try_acquire_or_renew(&api, &settings))
            .await
            .unwrap_or_else(|_| Err(kube::Error::Service("the Lease request timed out".into())));
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
) -> Result<Decision, kube::Error> {
    let now = Timestamp::now();
    let current = api.get_opt(&settings.name).await?;
    let decision = decide(
        current.as_ref().and_then(|l| l.spec.as_ref()),
        &settings.identity,
        now,
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
    use super::*;

    fn spec(holder: Option<&str>, renewed: Timestamp, secs: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: holder.map(str::to_string),
            lease_duration_seconds: Some(secs),
            renew_time: Some(MicroTime(renewed)),
            ..Default::default()
        }
    }

    #[test]
    fn a_held_lease_is_followed_until_it_expires_then_taken() {
        let t0: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        let s = spec(Some("a"), t0, 15);
        let at = |secs| t0 + SignedDuration::from_secs(secs);
        assert_eq!(
            decide(Some(&s), "b", at(14)),
            Decision::Follow { holder: "a".into() }
        );
        assert_eq!(decide(Some(&s), "b", at(16)), Decision::Acquire);
        assert_eq!(decide(Some(&s), "a", at(100)), Decision::Renew);
    }

    #[test]
    fn a_missing_or_released_lease_is_taken_at_once() {
        let t0: Timestamp = "2026-11-23T10:00:00Z".parse().unwrap();
        assert_eq!(decide(None, "b", t0), Decision::Acquire);
        assert_eq!(
            decide(Some(&spec(None, t0, 15)), "b", t0),
            Decision::Acquire
        );
        assert_eq!(
            decide(Some(&spec(Some(""), t0, 15)), "b", t0),
            Decision::Acquire
        );
    }
}
