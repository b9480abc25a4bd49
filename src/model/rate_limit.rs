//! Local rate limits: how many requests a service's ingress proxies admit, per service and
//! per path prefix.

use std::time::Duration;

use serde::Serialize;

/// A token bucket: `requests` tokens per `per`, refilled continuously, holding at most
/// `burst`. Each request takes one token; a request finding none is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct TokenBucket {
    /// Tokens added per `per`.
    pub requests: u32,
    /// The period `requests` are added over.
    pub per: Duration,
    /// Tokens the bucket holds at most (and starts with): the requests admitted at once.
    pub burst: u32,
}

/// A bucket of its own for the requests whose path starts with `prefix`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct PathRateLimit {
    /// Path prefix (a string prefix of the normalized path).
    pub prefix: String,
    /// Its bucket.
    pub bucket: TokenBucket,
}

/// The local rate limits of a service, enforced by each of its ingress proxies with its own
/// buckets. A request counts against one bucket: the first of `paths` whose prefix its path
/// starts with, else `service`. The default limits nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct RateLimit {
    /// The bucket of every request no path limit takes; none: those are not limited.
    pub service: Option<TokenBucket>,
    /// Path limits, most specific first (longer prefixes before their own prefixes), each
    /// prefix once.
    pub paths: Vec<PathRateLimit>,
}

/// The most path limits a service may set.
pub const MAX_PATH_RATE_LIMITS: usize = 64;
/// The largest `requests` and `burst` of a bucket.
pub const MAX_RATE_LIMIT_REQUESTS: u32 = 1_000_000;
/// The shortest period a bucket may be refilled over (Envoy refuses faster fill intervals).
pub const MIN_RATE_LIMIT_PERIOD: Duration = Duration::from_millis(50);

impl RateLimit {
    /// Whether no request is limited.
    pub fn is_unlimited(&self) -> bool {
        self.service.is_none() && self.paths.is_empty()
    }

    /// Path limits in the order they are matched: longest prefix first, then by prefix, so
    /// the result does not depend on the order they were written in.
    pub fn sort_paths(paths: &mut [PathRateLimit]) {
        paths.sort_by(|a, b| {
            b.prefix
                .len()
                .cmp(&a.prefix.len())
                .then_with(|| a.prefix.cmp(&b.prefix))
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longer_prefixes_are_matched_first_whatever_the_order_written() {
        let bucket = TokenBucket {
            requests: 1,
            per: Duration::from_secs(1),
            burst: 1,
        };
        let path = |prefix: &str| PathRateLimit {
            prefix: prefix.into(),
            bucket,
        };
        let mut paths = vec![path("/api"), path("/b"), path("/api/orders"), path("/a")];
        RateLimit::sort_paths(&mut paths);
        let order: Vec<&str> = paths.iter().map(|p| p.prefix.as_str()).collect();
        assert_eq!(order, ["/api/orders", "/api", "/a", "/b"]);
    }
}
