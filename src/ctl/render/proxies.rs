//! `ctl proxies` and `ctl proxy NODE`: the connected streams with the versions sent and
//! ACKed per type, and one proxy with its status, resources and warnings.

use std::fmt::Write as _;

use super::{Table, ago, by_type, fields, indent, list, opt, plural, short};
use crate::admin::views::{ProxyDetail, ProxyView, TypeStatusView, type_short_names};

/// A proxy's version cell for one type: the ACKed version when it is the one sent, else
/// `acked/sent`; ` NACK` when the last response was rejected.
fn version_cell(t: &TypeStatusView) -> String {
    let mut s = if t.sent == t.acked || t.sent.is_none() {
        short(&t.acked)
    } else {
        format!("{}/{}", short(&t.acked), short(&t.sent))
    };
    if t.nack.is_some() {
        s.push_str(" NACK");
    }
    s
}

/// `ctl proxies`: one line per connected stream.
pub fn render_proxies(proxies: &[ProxyView], now: u64) -> String {
    if proxies.is_empty() {
        return "no connected proxies\n".into();
    }
    let mut t = Table::new(&[
        "NODE",
        "SERVICE",
        "GROUP",
        "MODE",
        "CONNECTED",
        "CDS",
        "EDS",
        "LDS",
        "RDS",
        "SDS",
    ]);
    let mut pending = false;
    for p in proxies {
        let mut row = vec![
            super::text(&p.node),
            super::text(&p.service),
            super::text(&p.group),
            super::text(&p.mode),
            super::format_age(now.saturating_sub(p.connected_at)),
        ];
        let types = by_type(&p.types);
        for name in type_short_names() {
            let c = types
                .iter()
                .find(|(n, _)| n == name)
                .map_or_else(|| "-".into(), |(_, s)| version_cell(s));
            pending |= c.contains('/') || c.contains("NACK");
            row.push(c);
        }
        t.row(row);
    }
    let mut out = t.render();
    if pending {
        out.push_str(
            "\nversions: ACKed; acked/sent while a response awaits its ACK; \
             NACK: the last response was rejected (see `ctl proxy NODE`)\n",
        );
    }
    out
}

/// The status line of a proxy: NACKed types, else types awaiting an ACK, else in sync.
fn status(types: &[(String, &TypeStatusView)]) -> String {
    let nacked: Vec<&str> = types
        .iter()
        .filter(|(_, s)| s.nack.is_some())
        .map(|(n, _)| n.as_str())
        .collect();
    let waiting: Vec<&str> = types
        .iter()
        .filter(|(_, s)| s.sent != s.acked)
        .map(|(n, _)| n.as_str())
        .collect();
    if !nacked.is_empty() {
        format!("NACK ({})", nacked.join(", "))
    } else if !waiting.is_empty() {
        format!("waiting for ACK ({})", waiting.join(", "))
    } else if types.is_empty() {
        "nothing sent yet".into()
    } else {
        "in sync (every response ACKed)".into()
    }
}

/// `ctl proxy NODE`.
pub fn render_proxy(v: &ProxyDetail, now: u64) -> String {
    let types = by_type(&v.types);
    let admin = match &v.admin {
        None => "- (no diagnostics: no admin/diagnostics port announced)".into(),
        admin => opt(admin),
    };
    let tcp: Vec<String> = v
        .tcp_ports
        .iter()
        .map(|(service, port)| format!("{service} on 127.0.0.1:{port}"))
        .collect();
    let mut rows = vec![
        ("node", super::text(&v.node)),
        ("service", super::text(&v.service)),
        ("group", super::text(&v.group)),
        ("mode", super::text(&v.mode)),
        ("status", status(&types)),
        ("peer", opt(&v.peer)),
        ("envoy admin", admin),
        ("connected", ago(v.connected_at, now)),
        ("dependencies", list(&v.dependencies)),
    ];
    if !tcp.is_empty() {
        rows.push(("tcp dependencies", list(&tcp)));
    }
    let mut out = fields(&rows);

    if !types.is_empty() {
        let mut t = Table::new(&["TYPE", "SENT", "ACKED", "NACK"]);
        for (name, s) in &types {
            t.row(vec![
                name.clone(),
                opt(&s.sent),
                opt(&s.acked),
                if s.nack.is_none() { "-" } else { "yes" }.into(),
            ]);
        }
        out.push_str("\nversions:\n");
        out.push_str(&indent(&t.render(), "  "));
    }
    for (name, s) in &types {
        if let Some(msg) = &s.nack {
            let _ = writeln!(out, "\nlast NACK ({name}): {msg}");
        }
    }

    let resources = by_type(&v.resources);
    if !resources.is_empty() {
        out.push_str("\nresources:\n");
        for (name, r) in &resources {
            let _ = writeln!(
                out,
                "  {name} (version {}, {} resource{}){}",
                super::text(&r.version),
                r.names.len(),
                plural(r.names.len()),
                if r.names.is_empty() { "" } else { ":" }
            );
            for n in &r.names {
                let _ = writeln!(out, "    {}", super::text(n));
            }
        }
    }

    if v.warnings.is_empty() {
        out.push_str("\nwarnings: none\n");
    } else {
        out.push_str("\nwarnings:\n");
        for w in &v.warnings {
            let _ = writeln!(out, "  - {}", super::text(w));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ctl::render::tests::{CDS, EDS, LDS, RDS, view};
    use serde_json::{Value, json};

    /// `p` with the fields `/api/proxies/{node}` adds, where missing, empty.
    fn detail(mut p: Value) -> ProxyDetail {
        for (k, v) in [
            ("announced_dependencies", json!([])),
            ("dependencies", json!([])),
            ("resources", json!({})),
            ("warnings", json!([])),
        ] {
            if p.get(k).is_none() {
                p[k] = v;
            }
        }
        view(p)
    }

    fn proxy() -> Value {
        json!({
            "node": "frontend-1", "service": "frontend", "group": "frontend/abc", "mode": "sotw",
            "peer": "127.0.0.1:5000", "admin_port": 15000, "diagnostics_port": null,
            "admin": "127.0.0.1:15000", "connected_at": 1000, "identity": null,
            "types": {
                CDS: {"sent": "0123456789abcdef", "acked": "0123456789abcdef", "nack": null},
                EDS: {"sent": "1111111122222222", "acked": "aaaaaaaabbbbbbbb", "nack": null},
                LDS: {"sent": "3333333344444444", "acked": "5555555566666666",
                      "nack": "bad listener"},
            }
        })
    }

    #[test]
    fn proxies_list() {
        let out = render_proxies(&view::<Vec<_>>(json!([proxy()])), 1000 + 125);
        let expected = "\
NODE        SERVICE   GROUP         MODE  CONNECTED  CDS       EDS                LDS                     RDS  SDS
frontend-1  frontend  frontend/abc  sotw  2m05s      01234567  aaaaaaaa/11111111  55555555/33333333 NACK  -    -

versions: ACKed; acked/sent while a response awaits its ACK; NACK: the last response was rejected (see `ctl proxy NODE`)
";
        assert_eq!(out, expected);
        assert_eq!(render_proxies(&[], 0), "no connected proxies\n");
    }

    #[test]
    fn one_proxy() {
        let mut p = proxy();
        p["dependencies"] = json!(["orders"]);
        p["warnings"] = json!(["dependency ghost: unknown service"]);
        p["resources"] = json!({
            RDS: {"version": "r1", "names": ["egress"]},
            CDS: {"version": "c1", "names": ["orders", "meshbridge_admin"]},
        });
        let out = render_proxy(&detail(p), 1010);
        let expected = "\
node:          frontend-1
service:       frontend
group:         frontend/abc
mode:          sotw
status:        NACK (lds)
peer:          127.0.0.1:5000
envoy admin:   127.0.0.1:15000
connected:     10s ago
dependencies:  orders

versions:
  TYPE  SENT              ACKED             NACK
  cds   0123456789abcdef  0123456789abcdef  -
  eds   1111111122222222  aaaaaaaabbbbbbbb  -
  lds   3333333344444444  5555555566666666  yes

last NACK (lds): bad listener

resources:
  cds (version c1, 2 resources):
    orders
    meshbridge_admin
  rds (version r1, 1 resource):
    egress

warnings:
  - dependency ghost: unknown service
";
        assert_eq!(out, expected);
        let mut p = proxy();
        p["admin"] = Value::Null;
        p["types"] = json!({CDS: {"sent": "a", "acked": "a", "nack": null}});
        let out = render_proxy(&detail(p), 1010);
        assert!(out.contains("status:        in sync"), "{out}");
        assert!(out.contains("envoy admin:   - (no diagnostics"), "{out}");
        assert!(out.contains("warnings: none"), "{out}");
    }
}
