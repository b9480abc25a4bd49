//! `ctl compare`: this instance's state digest against its peers', and where they differ.

use std::fmt::Write as _;

use super::{Table, fields, list, opt, yes_no};
use crate::admin::views::{CompareView, Differences, ServiceDifference};

/// This instance's digest, each peer's, then the differences of every peer that has some.
pub fn render_compare(v: &CompareView) -> String {
    let verdict = match v.agree {
        None => "no peers configured (meshbridge run --peer URL or --peers-dns HOST:PORT)",
        Some(true) => "every peer agrees",
        Some(false) => "DISAGREE",
    };
    let mut out = fields(&[
        ("self digest", super::text(&v.this.digest)),
        ("peers", verdict.into()),
    ]);
    if v.peers.is_empty() {
        return out;
    }
    let mut t = Table::new(&["PEER", "DIGEST", "AGREE", "ERROR"]);
    for p in &v.peers {
        t.row(vec![
            super::text(&p.peer),
            opt(&p.digest),
            yes_no(p.agree),
            opt(&p.error),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    for p in &v.peers {
        let lines = p.differences.as_ref().map(differences).unwrap_or_default();
        if !lines.is_empty() {
            let _ = write!(out, "\ndifferences with {}:\n{lines}", super::text(&p.peer));
        }
    }
    out
}

/// One line per kind of difference with a peer; empty when there is none.
fn differences(d: &Differences) -> String {
    let mut lines = String::new();
    for (items, label) in [
        (&d.services_only_here, "services only here"),
        (&d.services_only_there, "services only there"),
        (&d.access_only_here, "access policies only here"),
        (&d.access_only_there, "access policies only there"),
        (&d.access_changed, "access policies changed"),
    ] {
        if !items.is_empty() {
            let _ = writeln!(lines, "  {label}: {}", list(items));
        }
    }
    let listed = d.services_changed.len();
    let total = d.services_changed_count;
    if total > listed {
        let _ = writeln!(
            lines,
            "  services changed: {total} (the first {listed} below)"
        );
    }
    for s in &d.services_changed {
        let _ = writeln!(
            lines,
            "  service {} changed: {}",
            super::text(&s.name),
            service_difference(s)
        );
    }
    lines
}

/// How one service differs: instances only on either side, fields; `-` when unknown.
fn service_difference(s: &ServiceDifference) -> String {
    let mut parts = Vec::new();
    for (items, label) in [
        (&s.instances_only_here, "instances only here"),
        (&s.instances_only_there, "instances only there"),
        (&s.fields, "fields"),
    ] {
        if !items.is_empty() {
            parts.push(format!("{label}: {}", list(items)));
        }
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join("; ")
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ctl::render::tests::view;
    use serde_json::json;

    #[test]
    fn compare_table() {
        let none = json!({"self": {"digest": "d1", "instance": "a"}, "agree": null, "error": null,
                         "peers": []});
        assert_eq!(
            render_compare(&view(none)),
            "self digest:  d1\npeers:        no peers configured (meshbridge run --peer URL or --peers-dns HOST:PORT)\n"
        );
        let v = json!({"self": {"digest": "d1", "instance": "a"}, "agree": false, "error": null, "peers": [
            {"peer": "http://b:9090", "digest": "d1", "agree": true, "error": null,
             "differences": {"services_only_here": [], "services_only_there": [],
                "services_changed": [], "services_changed_count": 0, "access_only_here": [],
                "access_only_there": [], "access_changed": []}},
            {"peer": "http://c:9090", "digest": "d2", "agree": false, "error": null,
             "differences": {"services_only_here": ["a"], "services_only_there": [],
                "services_changed": [{"name": "orders", "instances_only_here": ["10.0.0.1:80"],
                    "instances_only_there": [], "fields": ["mtls"]}],
                "services_changed_count": 1,
                "access_only_here": [], "access_only_there": ["orders"], "access_changed": []}},
            {"peer": "http://d:9090", "digest": null, "agree": false,
             "error": "connection refused", "differences": null},
        ]});
        let expected = "\
self digest:  d1
peers:        DISAGREE

PEER           DIGEST  AGREE  ERROR
http://b:9090  d1      yes    -
http://c:9090  d2      no     -
http://d:9090  -       no     connection refused

differences with http://c:9090:
  services only here: a
  access policies only there: orders
  service orders changed: instances only here: 10.0.0.1:80; fields: mtls
";
        assert_eq!(render_compare(&view(v.clone())), expected);
        // More changed services than the peer detailed: the total is said.
        let mut many = v.clone();
        many["peers"][1]["differences"]["services_changed_count"] = json!(120);
        assert!(
            render_compare(&view(many.clone()))
                .contains("  services changed: 120 (the first 1 below)\n"),
            "{}",
            render_compare(&view(many.clone()))
        );
    }
}
