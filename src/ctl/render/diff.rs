//! `ctl diff NODE`: what meshbridge sent a proxy against what its Envoy holds, per type.

use std::fmt::Write as _;

use super::{Table, fields, indent, short, type_rank};
use crate::admin::views::{ConfigDiffView, TypeDiff};

/// Why one type differs (`1 only sent, NACK`), empty when it does not.
fn reasons(t: &TypeDiff) -> Vec<String> {
    let mut why: Vec<String> = Vec::new();
    for (n, label) in [
        (t.only_sent.len(), "only sent"),
        (t.only_envoy.len(), "only in Envoy"),
        (t.warming.len(), "warming"),
        (t.errors.len(), "failed"),
    ] {
        if n > 0 {
            why.push(format!("{n} {label}"));
        }
    }
    if t.nack.is_some() {
        why.push("NACK".into());
    } else if t.sent_version != t.acked_version {
        why.push("awaiting ACK".into());
    }
    why
}

/// A verdict line (`NODE in sync`, or `NODE OUT OF SYNC` with the types that differ), one
/// row per type, then the names behind every non-zero count.
pub fn render_diff(v: &ConfigDiffView) -> String {
    let node = super::text(&v.node);
    let mut types: Vec<&TypeDiff> = v.types.iter().collect();
    types.sort_by_key(|t| type_rank(&t.short_name));

    let reasons: Vec<String> = types
        .iter()
        .filter_map(|t| {
            let why = reasons(t);
            (!why.is_empty()).then(|| format!("{} {}", t.short_name, why.join(", ")))
        })
        .collect();
    let mut out = if v.in_sync {
        format!("{node} in sync\n")
    } else if reasons.is_empty() {
        format!("{node} OUT OF SYNC\n")
    } else {
        format!("{node} OUT OF SYNC: {}\n", reasons.join("; "))
    };
    if types.is_empty() {
        out.push_str("nothing sent yet\n");
        return out;
    }

    let mut t = Table::new(&[
        "TYPE",
        "SENT VERSION",
        "ACKED VERSION",
        "SENT",
        "ENVOY",
        "ONLY SENT",
        "ONLY ENVOY",
        "WARMING",
        "ERRORS",
    ]);
    for ty in &types {
        let mut acked = short(&ty.acked_version);
        if ty.nack.is_some() {
            acked.push_str(" NACK");
        }
        t.row(vec![
            ty.short_name.clone(),
            short(&ty.sent_version),
            acked,
            ty.sent.to_string(),
            ty.envoy.to_string(),
            ty.only_sent.len().to_string(),
            ty.only_envoy.len().to_string(),
            ty.warming.len().to_string(),
            ty.errors.len().to_string(),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());

    for ty in &types {
        let lines = details(ty);
        if !lines.is_empty() {
            let _ = write!(
                out,
                "\n{}:\n{}",
                ty.short_name,
                indent(&fields(&lines), "  ")
            );
        }
    }
    out
}

/// The names behind the counts of one type, labelled.
fn details(ty: &TypeDiff) -> Vec<(&'static str, String)> {
    let mut lines: Vec<(&str, String)> = Vec::new();
    for (names, label) in [
        (&ty.only_sent, "only sent"),
        (&ty.only_envoy, "only in Envoy"),
        (&ty.warming, "warming"),
    ] {
        if !names.is_empty() {
            let cells: Vec<String> = names.iter().map(|n| super::text(n)).collect();
            lines.push((label, cells.join(", ")));
        }
    }
    for e in &ty.errors {
        lines.push((
            "failed",
            format!("{}: {}", super::text(&e.name), super::text(&e.details)),
        ));
    }
    if let Some(msg) = &ty.nack {
        lines.push(("last NACK", msg.clone()));
    }
    lines
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ctl::args::CtlCommand;
    use crate::ctl::render::render;
    use crate::ctl::render::tests::{CDS, EDS, LDS, RDS, view};
    use serde_json::{Value, json};

    fn diff_type(t: &str, url: &str, version: &str, names: &[&str]) -> Value {
        json!({"type": t, "type_url": url, "sent_version": version, "acked_version": version,
               "nack": null, "sent": names.len(), "envoy": names.len(), "only_sent": [],
               "only_envoy": [], "warming": [], "errors": []})
    }

    #[test]
    fn diff_in_sync() {
        // As the API answers for a frontend with egress to orders (types in its order).
        let v = json!({"node": "frontend-1", "mode": "sotw", "in_sync": true, "types": [
            diff_type("cds", CDS, "5f0c2a9d81e4b7c3", &["meshbridge_admin", "orders"]),
            diff_type("eds", EDS, "77aa01bc9d3e4f50", &["orders"]),
            diff_type("lds", LDS, "0b1c2d3e4f5a6b7c", &["egress", "ingress"]),
            diff_type("rds", RDS, "d00dfeedcafe0001", &["egress"]),
        ]});
        let expected = "\
frontend-1 in sync

TYPE  SENT VERSION  ACKED VERSION  SENT  ENVOY  ONLY SENT  ONLY ENVOY  WARMING  ERRORS
cds   5f0c2a9d      5f0c2a9d       2     2      0          0           0        0
eds   77aa01bc      77aa01bc       1     1      0          0           0        0
lds   0b1c2d3e      0b1c2d3e       2     2      0          0           0        0
rds   d00dfeed      d00dfeed       1     1      0          0           0        0
";
        assert_eq!(render_diff(&view(v.clone())), expected);
        assert_eq!(
            render(&CtlCommand::Diff { node: "x".into() }, &v.to_string(), 0).unwrap(),
            expected
        );
    }

    #[test]
    fn diff_out_of_sync_names_what_differs() {
        let mut cds = diff_type("cds", CDS, "c2", &["orders", "billing", "meshbridge_admin"]);
        cds["envoy"] = json!(2);
        cds["only_sent"] = json!(["billing"]);
        cds["only_envoy"] = json!(["payments"]);
        cds["warming"] = json!(["billing"]);
        let mut lds = diff_type("lds", LDS, "l2", &["egress"]);
        lds["acked_version"] = json!("l1");
        lds["nack"] = json!("egress: invalid route");
        lds["errors"] = json!([{"name": "egress", "details": "invalid route"}]);
        let mut rds = diff_type("rds", RDS, "r2", &["egress"]);
        rds["acked_version"] = Value::Null;
        let v = json!({"node": "frontend-1", "mode": "delta", "in_sync": false, "types": [
            rds, lds, diff_type("eds", EDS, "e1", &["orders"]), cds]});
        let expected = "\
frontend-1 OUT OF SYNC: cds 1 only sent, 1 only in Envoy, 1 warming; lds 1 failed, NACK; rds awaiting ACK

TYPE  SENT VERSION  ACKED VERSION  SENT  ENVOY  ONLY SENT  ONLY ENVOY  WARMING  ERRORS
cds   c2            c2             3     2      1          1           1        0
eds   e1            e1             1     1      0          0           0        0
lds   l2            l1 NACK        1     1      0          0           0        1
rds   r2            -              1     1      0          0           0        0

cds:
  only sent:      billing
  only in Envoy:  payments
  warming:        billing

lds:
  failed:     egress: invalid route
  last NACK:  egress: invalid route
";
        assert_eq!(render_diff(&view(v.clone())), expected);
        let none = json!({"node": "n", "mode": "sotw", "in_sync": false, "types": []});
        assert_eq!(
            render_diff(&view(none)),
            "n OUT OF SYNC\nnothing sent yet\n"
        );
    }
}
