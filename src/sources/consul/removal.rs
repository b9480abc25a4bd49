//! Whether an answer that removes services is applied or held (pure).

use std::time::Duration;

/// What to do with a catalog answer that removes services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Apply it.
    Apply,
    /// Keep the last known services and say why.
    Hold(String),
}

/// Judges a catalog answer removing `leaving` of the `known` services (pure). An answer
/// Consul says it filtered by ACLs never removes anything: hidden is not gone. An answer
/// removing more than half of at least four services at once is applied only once the
/// same removal has been answered for `confirm` (a token losing rights on an older Consul,
/// a restored snapshot, a wrong datacenter); anything smaller is applied at once.
pub fn removal_verdict(
    known: usize,
    leaving: usize,
    acl_filtered: bool,
    held_for: Option<Duration>,
    confirm: Duration,
) -> Verdict {
    if leaving == 0 {
        return Verdict::Apply;
    }
    if acl_filtered {
        return Verdict::Hold(format!(
            "held: Consul hid results from this token (X-Consul-Results-Filtered-By-ACLs) and the answer would remove {leaving} of {known} services; the last known stay (grant the token service:read and node:read)"
        ));
    }
    if known >= 4 && leaving * 2 > known && held_for.is_none_or(|h| h < confirm) {
        return Verdict::Hold(format!(
            "held: the catalog answer would remove {leaving} of {known} services at once; the last known stay until the same answer holds for {} s",
            confirm.as_secs()
        ));
    }
    Verdict::Apply
}
