//! Flap damping (pure).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::model::Endpoint;

/// Flap damping, like Consul's own `success_before_passing`: an instance whose checks
/// failed less than `hold` ago is kept unhealthy even if they pass again, so an instance that
/// flaps between passing and critical causes one change, not one per flip. Failing is applied
/// at once (safety first); recovering waits. Pure: the caller passes the time.
#[derive(Debug, Default)]
pub struct FlapDamper {
    last_failure: BTreeMap<(String, u16), Duration>,
}

impl FlapDamper {
    /// Applies damping to `endpoints` observed at `now` (any monotonic clock reading).
    /// Returns when to look again to let a held instance back in, if any is held.
    pub fn damp(
        &mut self,
        now: Duration,
        hold: Duration,
        endpoints: &mut [Endpoint],
    ) -> Option<Duration> {
        let mut recheck: Option<Duration> = None;
        for e in endpoints.iter_mut() {
            let key = (e.address.clone(), e.port);
            if !e.healthy {
                self.last_failure.insert(key, now);
                continue;
            }
            if let Some(failed) = self.last_failure.get(&key).copied() {
                let since = now.saturating_sub(failed);
                if since < hold {
                    e.healthy = false;
                    let wait = hold - since;
                    recheck = Some(recheck.map_or(wait, |r| r.min(wait)));
                } else {
                    self.last_failure.remove(&key);
                }
            }
        }
        recheck
    }
}
