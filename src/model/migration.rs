//! Migration: moving a service from one origin to another (Consul hosts to pods, typically)
//! as one declared, observed, reversible operation (`MeshService.spec.migration`).

use std::time::Duration;

use serde::Serialize;

use super::Origin;

/// Most steps a plan may have.
pub const MAX_MIGRATION_STEPS: usize = 20;
/// Shortest interval between two steps.
pub const MIN_MIGRATION_INTERVAL: Duration = Duration::from_secs(1);

/// A service's migration towards the instances of one origin.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Migration {
    /// The origin traffic moves to (`to`); every other origin is the old one.
    pub to: Origin,
    /// Percent of callers' requests sent to the new origin's instances, 0–100, whatever the
    /// instance counts (the rest to the old origins). An origin without a healthy instance
    /// gets none and the other takes everything.
    pub weight: u32,
    /// Percent of requests also copied to the new origin (responses discarded), 0–100.
    pub mirror: u32,
    /// The weights of an automatic plan, increasing (`steps`); empty: the weight is set by
    /// hand.
    pub steps: Vec<u32>,
    /// Time between two steps of the plan.
    pub interval: Duration,
    /// How much higher than the old origin's the new origin's error rate may be over an
    /// interval before the plan rolls back, in hundredths of a percent (100 = 1%).
    pub max_error_rate_increase_bp: u32,
}

impl Migration {
    /// The share of requests the new origin gets, in percent, when both origins have
    /// healthy instances.
    pub fn new_share(&self) -> u32 {
        self.weight.min(100)
    }

    /// Whether the instances of `origin` are the new ones.
    pub fn is_new(&self, origin: Origin) -> bool {
        origin == self.to
    }
}
