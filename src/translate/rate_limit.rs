//! Local rate limiting on the ingress: Envoy's `local_ratelimit` HTTP filter, one token
//! bucket per limit of the service, per proxy.
//!
//! The filter sits in every ingress chain after access control (a refused caller takes no
//! token from the allowed ones) and before the router, configured to do nothing by itself.
//! The limits are per-route configuration in the ingress route configuration: the
//! service-wide bucket on its virtual host, each path bucket on a route of its own (matched
//! before the catch-all route, longest prefix first). Envoy gives each of those its own
//! bucket, so a request counts against exactly one. A change of limits therefore changes the
//! route configuration only, never the listener: connections are not drained for it.

use envoy_types::pb::envoy::config::core::v3::RuntimeFractionalPercent;
use envoy_types::pb::envoy::extensions::filters::http::local_ratelimit::v3::LocalRateLimit;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, ResponseMapper, http_filter::ConfigType as HttpFilterConfig,
};
use envoy_types::pb::envoy::r#type::v3::{
    FractionalPercent, HttpStatus, StatusCode, TokenBucket as EnvoyTokenBucket,
    fractional_percent::DenominatorType,
};
use envoy_types::pb::google::protobuf::{Any, UInt32Value};
use envoy_types::util::pack_any;

use crate::model::TokenBucket;

use super::listeners::{reason_header, reply_mapper, status_filter};
use super::proto::proto_duration;

/// Name of the HTTP filter, also the key of its per-route configuration.
pub const FILTER: &str = "envoy.filters.http.local_ratelimit";
/// Stat prefix of every bucket: Envoy counts in
/// `http_local_rate_limit.{enabled,enforced,rate_limited,ok}` under it.
pub const STAT_PREFIX: &str = "rate_limit";
/// The `x-meshbridge-reason` of a request refused by a rate limit.
pub const REASON: &str = "rate-limited";
/// The status of a refused request.
const STATUS: StatusCode = StatusCode::TooManyRequests;
/// Runtime key Envoy requires beside the status the local reply of a refusal is matched by.
const STATUS_RUNTIME_KEY: &str = "meshbridge.rate_limited_status";

/// The ingress filter: without a bucket and enabled for no request, it limits only where a
/// virtual host or route carries [`bucket_config`].
pub fn filter() -> HttpFilter {
    HttpFilter {
        name: FILTER.to_string(),
        config_type: Some(HttpFilterConfig::TypedConfig(pack_any(LocalRateLimit {
            stat_prefix: STAT_PREFIX.to_string(),
            ..Default::default()
        }))),
        ..Default::default()
    }
}

/// The per-route configuration of one bucket: enabled and enforced for every request,
/// refusing with `429` and `x-meshbridge-reason: rate-limited`; the bucket is shared by the
/// proxy's worker threads (one bucket per proxy, not per connection).
/// The stat prefix of a bucket: [`STAT_PREFIX`] for the service's, and for a path's the
/// prefix with every character other than a letter or digit as `_` (`/api/export` →
/// `rate_limit_api_export`), so Envoy's counters say which path refused.
pub fn bucket_stat_prefix(path: Option<&str>) -> String {
    match path {
        None => STAT_PREFIX.to_string(),
        Some(prefix) => {
            let name: String = prefix
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                .collect();
            format!("{STAT_PREFIX}{name}")
        }
    }
}

/// One bucket's configuration, counted under `stat_prefix` (see [`bucket_stat_prefix`]).
pub fn bucket_config(bucket: &TokenBucket, stat_prefix: &str) -> Any {
    let all = || {
        Some(RuntimeFractionalPercent {
            default_value: Some(FractionalPercent {
                numerator: 100,
                denominator: DenominatorType::Hundred as i32,
            }),
            ..Default::default()
        })
    };
    pack_any(LocalRateLimit {
        stat_prefix: stat_prefix.to_string(),
        status: Some(HttpStatus {
            code: STATUS as i32,
        }),
        token_bucket: Some(EnvoyTokenBucket {
            max_tokens: bucket.burst,
            tokens_per_fill: Some(UInt32Value {
                value: bucket.requests,
            }),
            fill_interval: Some(proto_duration(bucket.per)),
        }),
        filter_enabled: all(),
        filter_enforced: all(),
        response_headers_to_add: vec![reason_header(REASON)],
        local_rate_limit_per_downstream_connection: false,
        ..Default::default()
    })
}

/// The local reply of a request a rate limit refused: Envoy's `429`, the reason header, and a
/// body naming the service.
///
/// Matched by its status: Envoy marks the request rate-limited (response flag `RL`) only after
/// the reply is made, too late for a flag filter, and no other local reply of the ingress is a
/// `429` (a `429` from the application is no local reply and keeps its own body).
pub fn local_reply_mapper(service: &str) -> ResponseMapper {
    // A service name has no `%`: nothing in it is read as a format command.
    reply_mapper(
        status_filter(STATUS as u32, STATUS_RUNTIME_KEY),
        REASON,
        &format!(
            "too many requests to {service}: this instance's rate limit (spec.rateLimit) is exceeded"
        ),
    )
}
