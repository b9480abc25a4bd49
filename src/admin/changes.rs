//! What changed and who did what: a bounded in-memory log of published mesh states (which
//! services changed, which groups were pushed) and an audit log of actions taken through
//! the admin API. Both keep the newest entries only, so memory stays bounded however long
//! the process runs.

use std::collections::VecDeque;
use std::sync::Mutex;

/// How many entries each log keeps.
pub const LOG_CAPACITY: usize = 256;

/// How many pushed group ids one change entry lists (the count is always exact).
pub const GROUPS_LISTED: usize = 50;

/// A log that keeps the newest `capacity` entries.
pub struct BoundedLog<T> {
    capacity: usize,
    entries: Mutex<VecDeque<T>>,
}

impl<T: Clone> BoundedLog<T> {
    /// An empty log.
    pub fn new(capacity: usize) -> Self {
        BoundedLog {
            capacity,
            entries: Mutex::new(VecDeque::with_capacity(capacity.min(64))),
        }
    }

    /// Adds an entry, dropping the oldest beyond capacity.
    pub fn push(&self, entry: T) {
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len() == self.capacity {
            entries.pop_front();
        }
        entries.push_back(entry);
    }

    /// Every entry, newest first.
    pub fn newest_first(&self) -> Vec<T> {
        let entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        entries.iter().rev().cloned().collect()
    }
}

impl<T: Clone> Default for BoundedLog<T> {
    fn default() -> Self {
        Self::new(LOG_CAPACITY)
    }
}

pub use super::views::{AuditEntry, Change};
pub use crate::model::{StateDiff, diff_states};

/// Who asked for an action: the authenticated caller when the API checks tokens, else what
/// the request says ([`requester`]).
pub fn who(
    principal: Option<axum::Extension<super::auth::Principal>>,
    headers: &axum::http::HeaderMap,
) -> Option<String> {
    principal.map(|p| p.0.user).or_else(|| requester(headers))
}

/// An action taken through the admin API, before its outcome is known.
pub struct AuditRecord {
    /// What is done, e.g. `log-level`.
    pub action: &'static str,
    /// Who asked.
    pub who: Option<String>,
    /// Where the request came from.
    pub from: Option<String>,
    /// The proxy acted on (empty when a service is).
    pub node: String,
    /// The service acted on, if not a proxy.
    pub service: Option<String>,
    /// The arguments.
    pub detail: String,
}

impl AuditRecord {
    /// Logs the action and its outcome (target `meshbridge::audit`) and keeps it in `log`;
    /// `via` is where it was carried out (a proxy's admin address, a MeshService).
    pub fn audit(&self, log: &BoundedLog<AuditEntry>, via: &str, result: &str) {
        tracing::info!(
            target: "meshbridge::audit",
            who = %self.who.as_deref().unwrap_or("(not said)"),
            from = %self.from.as_deref().unwrap_or("(unknown)"),
            action = self.action,
            node = %self.node,
            service = %self.service.as_deref().unwrap_or(""),
            via = %via,
            detail = %self.detail,
            result = %result,
            "admin action"
        );
        log.push(AuditEntry {
            at: crate::sources::now_secs(),
            who: self.who.clone(),
            from: self.from.clone(),
            action: self.action.into(),
            node: self.node.clone(),
            detail: self.detail.clone(),
            result: result.to_string(),
            service: self.service.clone(),
        });
    }
}

/// Who an admin request says made it: the user an authenticating proxy in front of the
/// admin API names (`X-Auth-Request-User`, `X-Forwarded-User`, `X-Remote-User`), else the
/// user of a Basic authorization header, else nothing. meshbridge authenticates none of
/// them: they are as good as the proxy that sets them (and strips them from clients).
pub fn requester(headers: &axum::http::HeaderMap) -> Option<String> {
    for name in ["x-auth-request-user", "x-forwarded-user", "x-remote-user"] {
        if let Some(v) = headers.get(name).and_then(|v| v.to_str().ok()) {
            let v = v.trim();
            if !v.is_empty() {
                return Some(v.chars().take(128).collect());
            }
        }
    }
    let basic = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Basic ")?;
    use base64::Engine;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(basic.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let user = text.split(':').next()?.trim();
    (!user.is_empty()).then(|| user.chars().take(128).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::MeshState;
    use crate::model::{Endpoint, Origin, Service};

    fn service(name: &str, addresses: &[&str]) -> Service {
        Service {
            name: name.into(),
            endpoints: addresses
                .iter()
                .map(|a| Endpoint {
                    address: (*a).into(),
                    port: 80,
                    origin: Origin::Config,
                    datacenter: None,
                    tags: Default::default(),
                    healthy: true,
                    weight: 1,
                    ports: Default::default(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn state(services: &[Service]) -> MeshState {
        MeshState {
            services: services
                .iter()
                .map(|s| (s.name.clone(), s.clone()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_diff_names_added_removed_and_changed_services() {
        let old = state(&[service("a", &["10.0.0.1"]), service("b", &["10.0.0.2"])]);
        let new = state(&[
            service("b", &["10.0.0.2", "10.0.0.3"]),
            service("c", &["10.0.0.4"]),
        ]);
        let d = diff_states(&old, &new);
        assert_eq!(d.added, vec!["c"]);
        assert_eq!(d.removed, vec!["a"]);
        assert_eq!(d.changed, vec!["b"]);
        assert!(diff_states(&new, &new).is_empty());
    }

    #[test]
    fn the_log_keeps_the_newest_entries_newest_first() {
        let log = BoundedLog::new(3);
        for i in 0..5 {
            log.push(i);
        }
        assert_eq!(log.newest_first(), vec![4, 3, 2]);
    }

    #[test]
    fn the_requester_comes_from_an_authenticating_proxys_header_or_basic_auth() {
        let mut h = axum::http::HeaderMap::new();
        assert_eq!(requester(&h), None);
        h.insert(
            "authorization",
            "Basic YWxpY2U6c2VjcmV0"
                .parse()
                .unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(requester(&h).as_deref(), Some("alice"));
        h.insert(
            "x-forwarded-user",
            "bob".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(requester(&h).as_deref(), Some("bob"));
        h.insert(
            "x-auth-request-user",
            "carol".parse().unwrap_or_else(|_| unreachable!()),
        );
        assert_eq!(requester(&h).as_deref(), Some("carol"));
    }
}
