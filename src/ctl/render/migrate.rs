//! `ctl migrate NAME ORDER`, `ctl latency NAME`, and the one-line summary of a migration
//! `ctl services NAME` shows.

use std::fmt::Write as _;

use super::Table;
use crate::admin::views::{LatencyView, MigrationOrderView, MigrationView, PlanView};

/// Where a plan stands: `Progressing at step 2 of 3 (weight 50%), next step at T`.
fn plan_text(p: &PlanView, steps: Option<usize>) -> String {
    let mut out = super::text(&p.phase);
    if let Some(step) = p.step {
        let of = steps.map(|n| format!(" of {n}")).unwrap_or_default();
        let _ = write!(out, " at step {}{of}", step + 1);
    }
    let _ = write!(out, " (weight {}%)", p.weight);
    if let Some(next) = &p.next_step_at {
        let _ = write!(out, ", next step at {next}");
    }
    if !p.message.is_empty() {
        let _ = write!(out, ": {}", p.message);
    }
    out
}

/// A service's migration in one line: where traffic moves, how much, the plan and the
/// operator's standing order.
pub fn migration_summary(m: &MigrationView) -> String {
    let mut out = format!("to {}: {}%", super::text(&m.to), m.weight);
    if m.mirror > 0 {
        let _ = write!(out, ", {}% mirrored", m.mirror);
    }
    if !m.steps.is_empty() {
        let steps: Vec<String> = m.steps.iter().map(|s| format!("{s}%")).collect();
        let _ = write!(out, "; plan {}", steps.join(" → "));
        if let Some(p) = &m.plan {
            let _ = write!(out, ": {}", plan_text(p, Some(m.steps.len())));
        }
    }
    if let Some(o) = &m.order {
        let _ = write!(out, "; order {o}");
    }
    out
}

/// What was written, where, and what comes next.
pub fn render_migration_order(v: &MigrationOrderView) -> String {
    let was = v
        .previous
        .as_deref()
        .map_or_else(String::new, |p| format!(", replacing {p}"));
    let mut out = format!(
        "{}: order {} written on MeshService {} (meshbridge.io/migration={}{was})\n",
        super::text(&v.service),
        super::text(&v.order),
        super::text(&v.object),
        super::text(&v.annotation),
    );
    if let Some(p) = &v.plan {
        let _ = writeln!(out, "plan before the order: {}", plan_text(p, None));
    }
    let _ = writeln!(
        out,
        "the leader carries it out at its next reconcile: watch status.migration (meshbridge ctl services {})",
        v.service
    );
    out
}

/// Request times by traffic, and whom the numbers come from.
pub fn render_latency(v: &LatencyView) -> String {
    let ms = |x: Option<f64>| x.map_or_else(|| "-".to_string(), |x| format!("{x:.1}"));
    let mut out = format!(
        "{}: asked {} of {} callers' proxies ({} answered); request times since each started\n",
        super::text(&v.service),
        v.asked.len(),
        v.callers,
        v.asked.len().saturating_sub(v.errors.len())
    );
    let mut t = Table::new(&["TRAFFIC", "REQUESTS", "P50 MS", "P90 MS", "P99 MS"]);
    for x in &v.traffic {
        t.row(vec![
            super::text(&x.traffic),
            x.requests.to_string(),
            ms(x.p50_ms),
            ms(x.p90_ms),
            ms(x.p99_ms),
        ]);
    }
    if v.traffic.is_empty() {
        out.push_str("no request measured\n");
    } else {
        out.push_str(&t.render());
    }
    for (node, why) in &v.errors {
        let _ = writeln!(out, "not answered: {node}: {}", super::text(why));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ctl::render::tests::view;
    use serde_json::json;

    #[test]
    fn an_order_and_a_summary() {
        let v = json!({"annotation": "resume@2026-12-07T12:00:00Z", "object": "shop/billing",
            "order": "resume", "previous": "pause", "service": "billing",
            "plan": {"phase": "Paused", "step": 1, "weight": 25, "next_step_at": null,
                     "message": "", "error_rates": {}}});
        assert_eq!(
            render_migration_order(&view(v)),
            "billing: order resume written on MeshService shop/billing (meshbridge.io/migration=resume@2026-12-07T12:00:00Z, replacing pause)\n\
             plan before the order: Paused at step 2 (weight 25%)\n\
             the leader carries it out at its next reconcile: watch status.migration (meshbridge ctl services billing)\n"
        );
        let m = json!({"to": "kubernetes", "weight": 50, "mirror": 10, "steps": [5, 50, 100],
            "order": null,
            "plan": {"phase": "Progressing", "step": 1, "weight": 50,
                     "next_step_at": "2026-12-07T12:05:00Z", "message": "", "error_rates": {}}});
        assert_eq!(
            migration_summary(&view(m)),
            "to kubernetes: 50%, 10% mirrored; plan 5% → 50% → 100%: Progressing at step 2 of 3 (weight 50%), next step at 2026-12-07T12:05:00Z"
        );
        let manual = json!({"to": "consul", "weight": 25, "mirror": 0, "steps": []});
        assert_eq!(migration_summary(&view(manual)), "to consul: 25%");
        let latency = json!({"service": "orders", "callers": 3, "asked": ["a", "b"],
            "errors": {"b": "Envoy admin at 10.0.0.2:9901 is unreachable"},
            "traffic": [
                {"traffic": "live", "requests": 200, "p50_ms": 0.31, "p90_ms": 0.75, "p99_ms": 4.2},
                {"traffic": "mirror", "requests": 98, "p50_ms": 175.0, "p90_ms": 235.0, "p99_ms": null}]});
        assert_eq!(
            render_latency(&view(latency)),
            "orders: asked 2 of 3 callers' proxies (1 answered); request times since each started\n\
             TRAFFIC  REQUESTS  P50 MS  P90 MS  P99 MS\n\
             live     200       0.3     0.8     4.2\n\
             mirror   98        175.0   235.0   -\n\
             not answered: b: Envoy admin at 10.0.0.2:9901 is unreachable\n"
        );
    }
}
