//! `GET /api/services/{name}/latency`: how long a service's instances take to answer, as its
//! callers' Envoys measured it (`cluster.<cluster>.upstream_rq_time`), live and mirrored.
//!
//! Envoy's load reports carry no latency, so this asks the callers' proxies themselves, like
//! the ejections view: up to 16 connected proxies holding a cluster of the service, through
//! the same bounded admin requests as the other diagnostics. Their histograms (cumulative
//! since each Envoy started, in Envoy's default buckets) are summed bucket by bucket and the
//! quantiles interpolated within a bucket, as Prometheus' `histogram_quantile` does. A
//! migration's mirror cluster reaches the new origin only, so during mirroring the `mirror`
//! row is the new origin's latency and `live` the old one's; under a split, `live` mixes both
//! origins (Envoy keeps one histogram per cluster, not per locality).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use serde_json::Value;

use super::AdminState;
use super::diagnostics::{ApiError, ask_callers};
use super::views::{LatencyTraffic, LatencyView};

/// Envoy's `/stats` query for the service's request-time histograms: every cluster of it
/// (its own, canary, policy and mirror variants).
fn stats_query(service: &str) -> Vec<(String, String)> {
    let filter = format!(
        r"^cluster\.{}(\|[^.]*)?\.upstream_rq_time$",
        regex::escape(service)
    );
    vec![
        ("format".into(), "json".into()),
        ("filter".into(), filter),
        ("histogram_buckets".into(), "cumulative".into()),
    ]
}

/// Cumulative bucket counts by upper bound (ms), summed per traffic (`live`, `mirror`), from
/// one Envoy's `/stats?format=json&histogram_buckets=cumulative` answer.
fn add_histograms(
    stats: &Value,
    service: &str,
    into: &mut BTreeMap<&'static str, BTreeMap<u64, u64>>,
) {
    for block in stats["stats"].as_array().map_or(&[][..], Vec::as_slice) {
        for h in block["histograms"]
            .as_array()
            .map_or(&[][..], Vec::as_slice)
        {
            let Some(cluster) = h["name"]
                .as_str()
                .and_then(|n| n.strip_prefix("cluster."))
                .and_then(|n| n.strip_suffix(".upstream_rq_time"))
            else {
                continue;
            };
            let traffic = match crate::translate::names::cluster_service(cluster) {
                (s, true) if s == service => "mirror",
                (s, false) if s == service => "live",
                _ => continue,
            };
            let sums = into.entry(traffic).or_default();
            for b in h["buckets"].as_array().map_or(&[][..], Vec::as_slice) {
                if let (Some(upper), Some(count)) =
                    (b["upper_bound"].as_f64(), b["cumulative"].as_u64())
                {
                    // Bounds in thousandths of a millisecond: exact for Envoy's buckets.
                    let key = (upper * 1000.0).round() as u64;
                    *sums.entry(key).or_default() += count;
                }
            }
        }
    }
}

/// The `q` quantile (0–1) of cumulative buckets (upper bound in thousandths of a ms → count),
/// interpolated linearly within its bucket; `None` without a request.
pub fn quantile(buckets: &BTreeMap<u64, u64>, q: f64) -> Option<f64> {
    let total = *buckets.values().max()?;
    if total == 0 {
        return None;
    }
    let target = q * total as f64;
    let (mut lower, mut below) = (0.0, 0u64);
    for (&upper, &count) in buckets {
        let upper = upper as f64 / 1000.0;
        if count as f64 >= target && count > below {
            let within = (target - below as f64) / (count - below) as f64;
            return Some(lower + (upper - lower) * within.clamp(0.0, 1.0));
        }
        (lower, below) = (upper, count);
    }
    Some(lower)
}

fn traffic_view(traffic: &str, buckets: &BTreeMap<u64, u64>) -> LatencyTraffic {
    LatencyTraffic {
        p50_ms: quantile(buckets, 0.5),
        p90_ms: quantile(buckets, 0.9),
        p99_ms: quantile(buckets, 0.99),
        requests: buckets.values().copied().max().unwrap_or(0),
        traffic: traffic.to_string(),
    }
}

/// `GET /api/services/{name}/latency`.
pub async fn latency(
    State(s): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<LatencyView>, ApiError> {
    let query = stats_query(&name);
    let (callers, asked, answers) = ask_callers(&s, &name, "latency", "/stats", &query).await?;
    let mut sums: BTreeMap<&'static str, BTreeMap<u64, u64>> = BTreeMap::new();
    let mut errors = BTreeMap::new();
    for (node, answer) in answers {
        match answer {
            Ok(stats) => add_histograms(&stats, &name, &mut sums),
            Err(why) => {
                errors.insert(node, why);
            }
        }
    }
    Ok(Json(LatencyView {
        asked,
        callers,
        errors,
        service: name,
        traffic: sums
            .iter()
            .map(|(traffic, buckets)| traffic_view(traffic, buckets))
            .collect(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn envoy_answer(cluster: &str, counts: &[(f64, u64)]) -> Value {
        let buckets: Vec<Value> = counts
            .iter()
            .map(|(upper, n)| json!({"upper_bound": upper, "interval": 0, "cumulative": n}))
            .collect();
        json!({"stats": [{"histograms": [
            {"name": format!("cluster.{cluster}.upstream_rq_time"), "buckets": buckets}
        ]}]})
    }

    #[test]
    fn histograms_of_many_proxies_are_summed_per_traffic_and_read_as_quantiles() {
        let mut sums = BTreeMap::new();
        // Two proxies: live answers under 1 ms, mirrored ones between 100 and 250 ms.
        for _ in 0..2 {
            add_histograms(
                &envoy_answer("orders", &[(0.5, 40), (1.0, 50), (100.0, 50), (250.0, 50)]),
                "orders",
                &mut sums,
            );
            add_histograms(
                &envoy_answer(
                    "orders|mirror",
                    &[(0.5, 0), (1.0, 0), (100.0, 0), (250.0, 10)],
                ),
                "orders",
                &mut sums,
            );
            // Another service's clusters are not read.
            add_histograms(&envoy_answer("orders2", &[(0.5, 7)]), "orders", &mut sums);
        }
        let live = traffic_view("live", &sums["live"]);
        assert_eq!(live.requests, 100);
        // 80 of 100 under 0.5 ms: the 50th is 50/80 into that bucket; the 90th half-way
        // through the next (0.5–1 ms, 20 answers).
        assert_eq!(live.p50_ms, Some(0.3125));
        assert_eq!(live.p90_ms, Some(0.75));
        let mirror = traffic_view("mirror", &sums["mirror"]);
        assert_eq!(mirror.requests, 20);
        assert_eq!(mirror.p50_ms, Some(175.0), "half-way through 100–250 ms");
        assert_eq!(quantile(&BTreeMap::new(), 0.5), None);
        assert_eq!(quantile(&BTreeMap::from([(500, 0)]), 0.5), None);
        // The query names the service's clusters only, its name escaped.
        let q = stats_query("a.b");
        assert!(
            q.iter()
                .any(|(k, v)| k == "filter" && v.starts_with(r"^cluster\.a\.b("))
        );
    }
}
