//! `ctl sources`, `ctl changes` and `ctl audit`: the sources' health, the recent model
//! changes and the actions taken through the admin API, one line each.

use super::{Table, ago, format_age, join, millis, opt, yes_no};
use crate::admin::views::{AuditEntry, Change, SourceView};

/// `ctl sources`.
pub fn render_sources(sources: &[SourceView], now: u64) -> String {
    if sources.is_empty() {
        return "no sources\n".into();
    }
    let mut t = Table::new(&[
        "NAME",
        "KIND",
        "SYNCED",
        "LAST SYNC",
        "STALENESS",
        "SYNC MS",
        "ERRORS",
        "ERROR",
    ]);
    for s in sources {
        t.row(vec![
            super::text(&s.name),
            super::text(&s.kind),
            yes_no(s.synced),
            s.last_sync
                .map_or_else(|| "never".into(), |at| ago(at, now)),
            s.staleness_seconds.map_or_else(|| "-".into(), format_age),
            millis(s.last_sync_duration_ms),
            s.errors.to_string(),
            opt(&s.error).replace('\n', "; "),
        ]);
    }
    t.render()
}

/// `ctl changes`: newest first.
pub fn render_changes(changes: &[Change], now: u64) -> String {
    if changes.is_empty() {
        return "no changes recorded\n".into();
    }
    let mut t = Table::new(&[
        "AGE",
        "GENERATION",
        "ADDED",
        "REMOVED",
        "CHANGED",
        "ACCESS",
        "REBUILT",
        "PUSHED",
        "BUILD MS",
    ]);
    for c in changes {
        t.row(vec![
            format_age(now.saturating_sub(c.at)),
            c.generation.to_string(),
            join(&c.services_added, 3),
            join(&c.services_removed, 3),
            join(&c.services_changed, 3),
            join(&c.access_changed, 3),
            c.groups_rebuilt.to_string(),
            c.groups_pushed_count.to_string(),
            millis(Some(c.build_ms)),
        ]);
    }
    t.render()
}

/// `ctl audit`: admin actions, newest first.
pub fn render_audit(entries: &[AuditEntry], now: u64) -> String {
    if entries.is_empty() {
        return "no admin actions recorded\n".into();
    }
    let mut t = Table::new(&["AT", "WHO", "ACTION", "TARGET", "DETAIL", "RESULT"]);
    for e in entries {
        let target = match &e.service {
            Some(s) if e.node.is_empty() => format!("service {s}"),
            _ => e.node.clone(),
        };
        t.row(vec![
            ago(e.at, now),
            opt(&e.who),
            super::text(&e.action),
            super::text(&target),
            super::text(&e.detail),
            super::text(&e.result),
        ]);
    }
    t.render()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ctl::render::tests::view;
    use serde_json::json;

    #[test]
    fn sources_table() {
        let v = json!([
            {"name": "config:/etc/mesh", "kind": "config", "synced": true, "last_sync": 990,
             "error": null, "errors": 0, "staleness_seconds": 10, "last_sync_duration_ms": 1.25},
            {"name": "consul", "kind": "consul", "synced": false, "last_sync": null,
             "error": "connection refused\nretrying", "errors": 3, "staleness_seconds": null,
             "last_sync_duration_ms": null},
        ]);
        let expected = "\
NAME              KIND    SYNCED  LAST SYNC  STALENESS  SYNC MS  ERRORS  ERROR
config:/etc/mesh  config  yes     10s ago    10s        1.2      0       -
consul            consul  no      never      -          -        3       connection refused; retrying
";
        assert_eq!(render_sources(&view::<Vec<_>>(v), 1000), expected);
    }

    #[test]
    fn changes_table() {
        let v = json!([
            {"at": 995, "generation": 7, "services_added": ["a", "b", "c", "d"],
             "services_removed": [], "services_changed": ["orders"], "access_changed": [],
             "groups_rebuilt": 2, "groups_pushed": ["g1", "g2"], "groups_pushed_count": 2,
             "build_ms": 0.5},
        ]);
        let expected = "\
AGE  GENERATION  ADDED             REMOVED  CHANGED  ACCESS  REBUILT  PUSHED  BUILD MS
5s   7           a, b, c, +1 more  -        orders   -       2        2       0.5
";
        assert_eq!(render_changes(&view::<Vec<_>>(v), 1000), expected);
        assert_eq!(render_changes(&[], 0), "no changes recorded\n");
    }

    #[test]
    fn audit_table() {
        let v = json!([
            {"at": 990, "who": "alice", "from": null, "action": "log-level", "node": "frontend-1",
             "detail": "http=warning",
             "result": "Envoy admin at 127.0.0.1:15000 is unreachable: connection refused"},
            {"at": 700, "who": null, "from": null, "action": "log-level", "node": "frontend-1",
             "detail": "level=debug", "result": "ok"},
            {"at": 600, "who": "bob", "from": null, "action": "migration", "node": "",
             "service": "billing", "detail": "order=pause", "result": "ok"},
        ]);
        let expected = "\
AT         WHO    ACTION     TARGET           DETAIL        RESULT
10s ago    alice  log-level  frontend-1       http=warning  Envoy admin at 127.0.0.1:15000 is unreachable: connection refused
5m00s ago  -      log-level  frontend-1       level=debug   ok
6m40s ago  bob    migration  service billing  order=pause   ok
";
        assert_eq!(render_audit(&view::<Vec<_>>(v), 1000), expected);
        assert_eq!(render_audit(&[], 0), "no admin actions recorded\n");
    }
}
