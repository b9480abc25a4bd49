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

    /// What names the plan in its status record (its steps, `5,50,100`): a record of
    /// another plan is not this one's progress.
    pub fn plan_key(&self) -> String {
        self.steps
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Where an automatic plan stands (kept in `MeshService.status.migration`, so that a restart
/// or another leader carries on from it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PlanPhase {
    /// Going through the steps.
    Progressing,
    /// The new origin did worse than the old one: back at weight 0 until the plan changes.
    RolledBack,
    /// The last step is reached.
    Complete,
    /// Held at its step by an operator.
    Paused,
}

/// What an operator asks of a plan (the MeshService annotation `meshbridge.io/migration`):
/// a standing order, so that every replica, and a leader that takes over, sees the same.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Operator {
    /// Hold at the step in force (no step is taken, nothing is judged).
    Pause,
    /// Back to weight 0 at once.
    Rollback,
    /// The last step at once.
    Promote,
    /// Go on: a paused plan continues at its step, a rolled-back one starts again at its
    /// first step. The token (`resume@TOKEN`, a time stamp) tells a new order from one
    /// already carried out.
    Resume(String),
}

impl Operator {
    /// Parses `pause`, `rollback`, `promote` or `resume@TOKEN` (TOKEN at most 64 characters).
    pub fn parse(text: &str) -> Result<Operator, String> {
        match text.trim() {
            "pause" => Ok(Operator::Pause),
            "rollback" => Ok(Operator::Rollback),
            "promote" => Ok(Operator::Promote),
            t => match t.strip_prefix("resume@") {
                Some(token) if !token.is_empty() && token.len() <= 64 => {
                    Ok(Operator::Resume(token.to_string()))
                }
                _ => Err(format!(
                    "{t:?} is not pause, rollback, promote or resume@<time>"
                )),
            },
        }
    }
}

/// A plan's progress.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PlanProgress {
    /// Phase.
    pub phase: PlanPhase,
    /// The step in force (index into the steps).
    pub step: usize,
    /// The weight in force.
    pub weight: u32,
    /// When the step started (seconds since the Unix epoch).
    pub step_started: i64,
    /// The token of the last `resume@TOKEN` carried out.
    pub resumed: Option<String>,
}

impl PlanProgress {
    /// This progress rolled back at `now`: weight 0, at its step.
    fn rolled_back(&self, now: i64) -> PlanProgress {
        PlanProgress {
            phase: PlanPhase::RolledBack,
            weight: 0,
            step_started: now,
            ..self.clone()
        }
    }
}

/// Error rates over the last interval, from the load reports: the old origins' and the new
/// one's (none: no request answered there).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PlanCheck {
    /// The old origins' error rate (0–1).
    pub old: Option<f64>,
    /// The new origin's.
    pub new: Option<f64>,
}

/// What a plan does next at `now`: its first step when it has no progress yet; nothing
/// before the interval of the step in force is over, nor once rolled back or complete;
/// then, the new origin's error rate compared with the old one's over the interval — more
/// than `max_error_rate_increase_bp` higher rolls back to weight 0 (with the reason, numbers
/// included), otherwise the next step (complete after the last). A step whose interval saw
/// no answered request at the new origin waits (nothing to judge by).
///
/// An operator's order comes first: `Pause` holds, `Rollback` goes to 0 (with the reason),
/// `Promote` takes the last step, and a new `Resume` restarts the clock of a paused step or
/// a rolled-back plan's first step. Once the pause order is gone, the paused step goes on
/// with a fresh interval.
pub fn advance_plan(
    m: &Migration,
    previous: Option<&PlanProgress>,
    check: PlanCheck,
    now: i64,
    operator: Option<&Operator>,
) -> (PlanProgress, Option<String>) {
    let first = PlanProgress {
        phase: PlanPhase::Progressing,
        step: 0,
        weight: m.steps.first().copied().unwrap_or(m.weight),
        step_started: now,
        resumed: previous.and_then(|p| p.resumed.clone()),
    };
    let p = previous
        .filter(|p| p.step < m.steps.len())
        .cloned()
        .unwrap_or_else(|| first.clone());
    if let Some(order) = operator
        && let Some(out) = obey(m, &p, &first, now, order)
    {
        return out;
    }
    if previous.is_none() || p.phase == PlanPhase::Paused {
        let going = PlanProgress {
            phase: PlanPhase::Progressing,
            step_started: now,
            ..p
        };
        return (going, None);
    }
    let due = now.saturating_sub(p.step_started) >= m.interval.as_secs() as i64;
    if p.phase != PlanPhase::Progressing || !due {
        return (p.clone(), None);
    }
    let Some(new) = check.new else {
        return (p.clone(), None);
    };
    let old = check.old.unwrap_or(0.0);
    let allowed = f64::from(m.max_error_rate_increase_bp) / 10_000.0;
    if new - old > allowed {
        let reason = format!(
            "the new origin ({}) answered {:.2}% of requests with errors over the last {}s, the old {:.2}% (allowed increase {:.2} points): rolled back from weight {} to 0",
            m.to,
            new * 100.0,
            m.interval.as_secs(),
            old * 100.0,
            allowed * 100.0,
            p.weight
        );
        return (p.rolled_back(now), Some(reason));
    }
    let next = p.step + 1;
    let progress = match m.steps.get(next) {
        Some(&weight) => PlanProgress {
            phase: PlanPhase::Progressing,
            step: next,
            weight,
            step_started: now,
            resumed: p.resumed.clone(),
        },
        None => PlanProgress {
            phase: PlanPhase::Complete,
            ..p.clone()
        },
    };
    (progress, None)
}

/// What an operator's order makes of progress `p` (`first`: the plan's first step), if it
/// changes anything: see [`advance_plan`].
fn obey(
    m: &Migration,
    p: &PlanProgress,
    first: &PlanProgress,
    now: i64,
    order: &Operator,
) -> Option<(PlanProgress, Option<String>)> {
    match order {
        Operator::Pause => {
            let paused = PlanProgress {
                phase: PlanPhase::Paused,
                ..p.clone()
            };
            Some((paused, None))
        }
        Operator::Rollback if p.phase == PlanPhase::RolledBack => Some((p.clone(), None)),
        Operator::Rollback => {
            let reason = format!(
                "rolled back by an operator (meshbridge.io/migration: rollback) from weight {} to 0",
                p.weight
            );
            Some((p.rolled_back(now), Some(reason)))
        }
        Operator::Promote => {
            let last = m.steps.len().saturating_sub(1);
            let done = PlanProgress {
                phase: PlanPhase::Complete,
                step: last,
                weight: m.steps.get(last).copied().unwrap_or(100),
                ..p.clone()
            };
            Some((done, None))
        }
        Operator::Resume(token) if p.resumed.as_ref() != Some(token) => {
            let resumed = match p.phase {
                PlanPhase::RolledBack => PlanProgress {
                    resumed: Some(token.clone()),
                    ..first.clone()
                },
                PlanPhase::Paused | PlanPhase::Progressing => PlanProgress {
                    phase: PlanPhase::Progressing,
                    step_started: now,
                    resumed: Some(token.clone()),
                    ..p.clone()
                },
                PlanPhase::Complete => PlanProgress {
                    resumed: Some(token.clone()),
                    ..p.clone()
                },
            };
            Some((resumed, None))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operators_pause_roll_back_promote_and_resume() {
        let m = plan();
        let none = PlanCheck::default();
        let (p, _) = advance_plan(&m, None, none, 0, None);
        let (p, _) = advance_plan(&m, Some(&p), check(0.0, 0.0), 60, None);
        assert_eq!(p.weight, 50);
        // Paused: held, whatever is due and whatever the rates.
        let pause = Operator::parse("pause").unwrap();
        let (held, _) = advance_plan(&m, Some(&p), check(0.0, 0.9), 500, Some(&pause));
        assert_eq!((held.phase, held.weight), (PlanPhase::Paused, 50));
        // The order gone: the step goes on with a fresh interval.
        let (going, _) = advance_plan(&m, Some(&held), check(0.0, 0.0), 600, None);
        assert_eq!(
            (going.phase, going.weight, going.step_started),
            (PlanPhase::Progressing, 50, 600)
        );
        // Rolled back by hand, then resumed: from the first step again, once per token.
        let rollback = Operator::parse("rollback").unwrap();
        let (back, why) = advance_plan(&m, Some(&going), none, 610, Some(&rollback));
        assert_eq!((back.phase, back.weight), (PlanPhase::RolledBack, 0));
        assert!(why.unwrap().contains("by an operator"));
        let resume = Operator::parse("resume@2026-12-07T12:00:00Z").unwrap();
        let (again, _) = advance_plan(&m, Some(&back), none, 620, Some(&resume));
        assert_eq!(
            (again.phase, again.step, again.weight),
            (PlanPhase::Progressing, 0, 5)
        );
        let (later, _) = advance_plan(&m, Some(&again), check(0.0, 0.0), 700, Some(&resume));
        assert_eq!(
            later.weight, 50,
            "the same resume order is not carried out twice"
        );
        let promote = Operator::parse("promote").unwrap();
        let (done, _) = advance_plan(&m, Some(&later), none, 701, Some(&promote));
        assert_eq!((done.phase, done.weight), (PlanPhase::Complete, 100));
        assert!(Operator::parse("faster").unwrap_err().contains("faster"));
        assert!(Operator::parse("resume@").is_err());
    }

    fn plan() -> Migration {
        Migration {
            to: Origin::Kubernetes,
            weight: 0,
            mirror: 0,
            steps: vec![5, 50, 100],
            interval: Duration::from_secs(60),
            max_error_rate_increase_bp: 100,
        }
    }

    fn check(old: f64, new: f64) -> PlanCheck {
        PlanCheck {
            old: Some(old),
            new: Some(new),
        }
    }

    #[test]
    fn a_healthy_plan_goes_step_by_step_once_per_interval_to_the_end() {
        let m = plan();
        let (p, _) = advance_plan(&m, None, PlanCheck::default(), 1000, None);
        assert_eq!((p.phase, p.step, p.weight), (PlanPhase::Progressing, 0, 5));
        // Not yet due.
        assert_eq!(advance_plan(&m, Some(&p), check(0.0, 0.0), 1059, None).0, p);
        // Due, but nothing answered at the new origin: waits.
        assert_eq!(
            advance_plan(&m, Some(&p), PlanCheck::default(), 1060, None).0,
            p
        );
        // Within the allowed increase (0.5 points over 1 allowed).
        let (p, rolled) = advance_plan(&m, Some(&p), check(0.01, 0.015), 1060, None);
        assert_eq!(
            (p.step, p.weight, p.step_started, rolled),
            (1, 50, 1060, None)
        );
        let (p, _) = advance_plan(&m, Some(&p), check(0.0, 0.0), 1120, None);
        assert_eq!((p.phase, p.weight), (PlanPhase::Progressing, 100));
        let (p, _) = advance_plan(&m, Some(&p), check(0.0, 0.0), 1180, None);
        assert_eq!((p.phase, p.weight), (PlanPhase::Complete, 100));
        assert_eq!(advance_plan(&m, Some(&p), check(0.0, 0.9), 9999, None).0, p);
    }

    #[test]
    fn a_worse_new_origin_rolls_back_to_zero_with_the_numbers_and_stays() {
        let m = plan();
        let (p, _) = advance_plan(&m, None, PlanCheck::default(), 0, None);
        let (p, _) = advance_plan(&m, Some(&p), check(0.0, 0.0), 60, None);
        let (back, reason) = advance_plan(&m, Some(&p), check(0.005, 0.25), 120, None);
        assert_eq!((back.phase, back.weight), (PlanPhase::RolledBack, 0));
        let reason = reason.unwrap();
        assert!(
            reason.contains("25.00%") && reason.contains("0.50%"),
            "{reason}"
        );
        assert!(reason.contains("from weight 50 to 0"), "{reason}");
        assert_eq!(
            advance_plan(&m, Some(&back), check(0.0, 0.0), 999, None).0,
            back
        );
        // A plan whose steps changed under it (fewer now) starts again.
        let shorter = Migration {
            steps: vec![10],
            ..plan()
        };
        let (p, _) = advance_plan(&shorter, Some(&p), PlanCheck::default(), 500, None);
        assert_eq!((p.step, p.weight), (0, 10));
    }
}
