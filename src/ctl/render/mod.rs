//! Turning the admin API's views into text for people: one renderer per view (a module
//! each), the aligned [`Table`] and the cell formats they share, and [`pretty_json`] for
//! `-o json`. Pure: a view and the time in, text out.

mod access;
mod compare;
mod diff;
mod log_level;
mod migrate;
mod proxies;
mod records;
mod services;

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;

use super::args::CtlCommand;
use crate::admin::views::{type_short_name, type_short_names};

pub use compare::render_compare;
pub use diff::render_diff;
pub use log_level::render_log_level;
pub use migrate::{migration_summary, render_latency, render_migration_order};
pub use proxies::{render_proxies, render_proxy};
pub use records::{render_audit, render_changes, render_sources};
pub use services::{render_service, render_services};

/// The table output of `command` for the API's answer `body` (JSON answers), at `now`
/// (seconds since the Unix epoch, for ages); an error when `body` is not the command's
/// view. Commands whose answer is printed as fetched (`config-dump`, `stats`, `clusters`)
/// are only re-indented here.
pub fn render(command: &CtlCommand, body: &str, now: u64) -> Result<String, serde_json::Error> {
    fn view<T: DeserializeOwned>(body: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(body)
    }
    Ok(match command {
        CtlCommand::Services { name: None } => render_services(&view::<Vec<_>>(body)?),
        CtlCommand::Services { name: Some(_) } => render_service(&view(body)?),
        CtlCommand::Proxies => render_proxies(&view::<Vec<_>>(body)?, now),
        CtlCommand::Proxy { .. } => render_proxy(&view(body)?, now),
        CtlCommand::ConfigDump { .. } | CtlCommand::Stats { .. } | CtlCommand::Clusters { .. } => {
            view::<serde::de::IgnoredAny>(body)?;
            pretty_json(body)
        }
        CtlCommand::LogLevel { .. } => render_log_level(&view(body)?),
        CtlCommand::Compare => render_compare(&view(body)?),
        CtlCommand::Sources => render_sources(&view::<Vec<_>>(body)?, now),
        CtlCommand::Changes => render_changes(&view::<Vec<_>>(body)?, now),
        CtlCommand::Diff { .. } => render_diff(&view(body)?),
        CtlCommand::Audit => render_audit(&view::<Vec<_>>(body)?, now),
        CtlCommand::Migrate { .. } => render_migration_order(&view(body)?),
        CtlCommand::Latency { .. } => render_latency(&view(body)?),
    })
}

// ---------------------------------------------------------------------------------------
// Tables and cells.

/// A column-aligned text table: two spaces between columns, no trailing spaces.
#[derive(Debug, Default, Clone)]
pub struct Table {
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with this header row.
    pub fn new(header: &[&str]) -> Table {
        Table {
            rows: vec![header.iter().map(|h| h.to_string()).collect()],
        }
    }

    /// Appends a row (newlines and tabs in cells become spaces).
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(
            cells
                .into_iter()
                .map(|c| c.replace(['\n', '\r', '\t'], " "))
                .collect(),
        );
    }

    /// Rows other than the header.
    pub fn len(&self) -> usize {
        self.rows.len() - 1
    }

    /// Whether there are no rows besides the header.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The aligned text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let columns = self.rows.iter().map(Vec::len).max().unwrap_or(0);
        let mut widths = vec![0; columns];
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let mut out = String::new();
        for row in &self.rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = widths[i] - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Prefixes every line of `text` with `prefix`.
fn indent(text: &str, prefix: &str) -> String {
    text.lines().map(|l| format!("{prefix}{l}\n")).collect()
}

/// A text cell: `-` when empty.
fn text(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_string()
    }
}

/// An optional text cell: `-` when absent or empty.
fn opt(s: &Option<String>) -> String {
    s.as_deref().map_or_else(|| "-".into(), text)
}

fn yes_no(b: bool) -> String {
    if b { "yes" } else { "no" }.into()
}

/// Every item joined by `, `; `-` when empty.
fn list<T: AsRef<str>>(items: &[T]) -> String {
    join(items, items.len())
}

/// At most `max` items joined by `, ` (then `+N more`); `-` when empty.
fn join<T: AsRef<str>>(items: &[T], max: usize) -> String {
    if items.is_empty() {
        return "-".into();
    }
    let mut parts: Vec<String> = items.iter().take(max).map(|s| text(s.as_ref())).collect();
    if items.len() > max {
        parts.push(format!("+{} more", items.len() - max));
    }
    parts.join(", ")
}

/// `5s`, `3m12s`, `2h05m`, `4d03h`.
pub fn format_age(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{s:02}s")
    } else {
        format!("{s}s")
    }
}

/// How long ago the Unix timestamp `at` was at `now`: `5s ago`.
fn ago(at: u64, now: u64) -> String {
    format!("{} ago", format_age(now.saturating_sub(at)))
}

/// A number with one decimal, `-` when absent.
fn millis(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".into(), |x| format!("{x:.1}"))
}

/// The short name of an xDS type URL: `cds`, `eds`, `lds`, `rds`, else its last segment.
pub fn type_name(type_url: &str) -> String {
    type_short_name(type_url)
}

/// Where a short type name sorts: cds, eds, lds, rds, then the others.
fn type_rank(name: &str) -> usize {
    type_short_names()
        .iter()
        .position(|x| *x == name)
        .unwrap_or(9)
}

/// The entries of a `{TYPE_URL: x}` object by short type name, in cds, eds, lds, rds order.
fn by_type<T>(types: &BTreeMap<String, T>) -> Vec<(String, &T)> {
    let mut list: Vec<(String, &T)> = types.iter().map(|(k, v)| (type_name(k), v)).collect();
    list.sort_by(|a, b| type_rank(&a.0).cmp(&type_rank(&b.0)).then(a.0.cmp(&b.0)));
    list
}

/// A version, shortened to 8 characters; `-` when absent.
fn short(v: &Option<String>) -> String {
    match v.as_deref() {
        Some(s) if !s.is_empty() => s.chars().take(8).collect(),
        _ => "-".into(),
    }
}

/// Labelled lines (`label:  value`), labels aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:width$}  {v}\n", format!("{k}:")))
        .collect()
}

/// `1 rule`, `2 rules`.
fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

// ---------------------------------------------------------------------------------------
// JSON.

/// Re-indents JSON text (two spaces, `"key": value`) keeping its key order and number
/// spelling: the answer's content unchanged, only its whitespace. `text` must be valid JSON.
pub fn pretty_json(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 2);
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    let mut chars = text.chars().peekable();
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        out.extend(std::iter::repeat_n("  ", depth));
    };
    while let Some(c) = chars.next() {
        if in_string {
            out.push(c);
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
            continue;
        }
        match c {
            '"' => {
                in_string = true;
                out.push(c);
            }
            '{' | '[' => {
                out.push(c);
                while chars.peek().is_some_and(|c| c.is_whitespace()) {
                    chars.next();
                }
                if matches!(chars.peek(), Some('}' | ']')) {
                    if let Some(close) = chars.next() {
                        out.push(close);
                    }
                } else {
                    depth += 1;
                    newline(&mut out, depth);
                }
            }
            '}' | ']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c);
            }
            ',' => {
                out.push(c);
                newline(&mut out, depth);
            }
            ':' => out.push_str(": "),
            c if c.is_whitespace() => {}
            c => out.push(c),
        }
    }
    out.push('\n');
    out
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::Value;

    /// The view of a JSON fixture.
    pub(crate) fn view<T: DeserializeOwned>(v: Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let mut t = Table::new(&["NAME", "X"]);
        t.row(vec!["orders".into(), "1".into()]);
        t.row(vec!["a".into(), "".into()]);
        t.row(vec!["é\nb".into(), "22".into()]);
        assert_eq!(t.len(), 3);
        assert_eq!(t.render(), "NAME    X\norders  1\na\né b     22\n");
    }

    #[test]
    fn ages() {
        assert_eq!(format_age(0), "0s");
        assert_eq!(format_age(59), "59s");
        assert_eq!(format_age(61), "1m01s");
        assert_eq!(format_age(3600 * 2 + 300), "2h05m");
        assert_eq!(format_age(86_400 * 4 + 3600 * 3), "4d03h");
    }

    #[test]
    fn pretty_json_keeps_order_and_content() {
        let text = r#"{"z":1,"a":[],"m":{"s":"a,b:{c}\"]","e":{}},"l":[1, 2.50,true,null]}"#;
        let pretty = pretty_json(text);
        assert_eq!(
            pretty,
            "{\n  \"z\": 1,\n  \"a\": [],\n  \"m\": {\n    \"s\": \"a,b:{c}\\\"]\",\n    \"e\": {}\n  },\n  \"l\": [\n    1,\n    2.50,\n    true,\n    null\n  ]\n}\n"
        );
        let a: Value = serde_json::from_str(text).unwrap();
        let b: Value = serde_json::from_str(&pretty).unwrap();
        assert_eq!(a, b);
        // Already indented input (Envoy's style) is re-indented the same way.
        assert_eq!(pretty_json(&pretty), pretty);
        assert_eq!(pretty_json(&pretty.replace("  ", " ")), pretty);
    }

    pub(crate) const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    pub(crate) const EDS: &str =
        "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    pub(crate) const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    pub(crate) const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

    #[test]
    fn type_names() {
        assert_eq!(type_name(CDS), "cds");
        assert_eq!(type_name(EDS), "eds");
        assert_eq!(type_name(LDS), "lds");
        assert_eq!(type_name(RDS), "rds");
        assert_eq!(
            type_name("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"),
            "sds"
        );
        assert_eq!(
            type_name("type.googleapis.com/envoy.service.runtime.v3.Runtime"),
            "Runtime"
        );
    }
}
