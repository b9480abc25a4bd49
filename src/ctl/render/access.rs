//! The access policy of a service, as `ctl services NAME` shows it: the action, one line
//! per allowed combination of callers, methods and paths, and the callers resolved.

use std::fmt::Write as _;

use super::{list, plural};
use crate::admin::views::{AccessView, CallerView, PathView};

/// The access policy summary of a service; `None` when no AccessRule targets it.
pub fn render_access(a: Option<&AccessView>) -> String {
    let Some(a) = a else {
        return "access: no AccessRule targets this service\n".into();
    };
    let mut out = format!(
        "access: {} unless allowed, {} rule{} (from {})\n",
        super::text(&a.action),
        a.rules.len(),
        plural(a.rules.len()),
        list(&a.sources),
    );
    for r in &a.rules {
        let from: Vec<String> = r.from.iter().map(caller).collect();
        let paths: Vec<String> = r.paths.iter().map(path_match).collect();
        let _ = writeln!(
            out,
            "  allow {} -> {} {}",
            list(&from),
            if r.methods.is_empty() {
                "any method".into()
            } else {
                list(&r.methods)
            },
            if paths.is_empty() {
                "any path".into()
            } else {
                paths.join(", ")
            },
        );
    }
    let _ = writeln!(out, "  resolved callers: {}", list(&a.resolved_callers));
    let _ = writeln!(out, "  unknown callers:  {}", list(&a.unknown_callers));
    out
}

/// A caller: `*` for any, else the service (or glob).
fn caller(c: &CallerView) -> String {
    match c {
        CallerView::Any => "*".into(),
        CallerView::Service(s) => super::text(s),
    }
}

/// A path matcher: the exact path, a prefix with `*`, or `regex TEXT`.
fn path_match(p: &PathView) -> String {
    match p {
        PathView::Exact(text) => super::text(text),
        PathView::Prefix(text) => format!("{}*", super::text(text)),
        PathView::Regex(text) => format!("regex {}", super::text(text)),
    }
}
