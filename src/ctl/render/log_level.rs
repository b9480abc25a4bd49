//! `ctl log-level NODE LEVEL`: what was set, and the levels Envoy reports, summarised.

use std::fmt::Write as _;

use super::indent;
use crate::admin::views::LogLevelView;

/// What was set, then the levels Envoy reports, summarised (the most common level as a
/// count, the other levels with their loggers).
pub fn render_log_level(v: &LogLevelView) -> String {
    let target = match &v.logger {
        Some(l) => format!(" for logger {l}"),
        None => String::new(),
    };
    let mut out = format!(
        "{}: Envoy log level set to {}{target} (admin {})\n",
        super::text(&v.node),
        super::text(&v.level),
        super::text(&v.admin)
    );
    let text = v.output.as_str();
    let loggers: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.trim().split_once(": "))
        .map(|(k, v)| (k.trim(), v.trim()))
        .collect();
    if loggers.is_empty() {
        if !text.trim().is_empty() {
            out.push_str(&indent(text.trim_end(), "  "));
        }
        return out;
    }
    let mut by_level: Vec<(&str, Vec<&str>)> = Vec::new();
    for (name, level) in &loggers {
        match by_level.iter_mut().find(|(l, _)| l == level) {
            Some((_, names)) => names.push(name),
            None => by_level.push((level, vec![name])),
        }
    }
    by_level.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(b.0)));
    let mut parts = Vec::new();
    for (i, (level, names)) in by_level.iter().enumerate() {
        if i == 0 && by_level.len() > 1 {
            parts.push(format!("{level}: {} other loggers", names.len()));
        } else if i == 0 {
            parts.push(format!("{level}: all {} loggers", names.len()));
        } else {
            parts.push(format!("{level}: {}", names.join(", ")));
        }
    }
    let _ = writeln!(out, "Envoy reports {}", parts.join("; "));
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ctl::render::tests::view;
    use serde_json::json;

    #[test]
    fn log_level() {
        let v = json!({"node": "n1", "level": "debug", "admin": "127.0.0.1:1", "logger": null,
                       "output": "active loggers:\n  admin: debug\n  http: debug\n"});
        assert_eq!(
            render_log_level(&view(v.clone())),
            "n1: Envoy log level set to debug (admin 127.0.0.1:1)\n\
             Envoy reports debug: all 2 loggers\n"
        );
        let v = json!({"node": "n1", "level": "warning", "logger": "http", "admin": "a:1",
                       "output": "active loggers:\n  admin: debug\n  http: warning\n  upstream: debug\n  pool: off\n"});
        assert_eq!(
            render_log_level(&view(v.clone())),
            "n1: Envoy log level set to warning for logger http (admin a:1)\n\
             Envoy reports debug: 2 other loggers; off: pool; warning: http\n"
        );
        let v = json!({"node": "n1", "level": "info", "admin": "a:1", "logger": null,
                       "output": "done\n"});
        assert_eq!(
            render_log_level(&view(v.clone())),
            "n1: Envoy log level set to info (admin a:1)\n  done\n"
        );
    }
}
