//! The HTTP side of `meshbridge ctl`: which call a command makes ([`call_for`], [`url_for`],
//! pure), and one bounded request to the admin API with the bearer token of `--token-file`
//! ([`fetch`]). Every failure is a [`CtlError`] naming the request.

use std::time::Duration;

use reqwest::Url;

use super::args::{CtlCommand, Output};
use crate::admin::views::ErrorView;

/// Bound on establishing the connection to the admin API.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Bound on a whole call (Envoy diagnostics go through meshbridge to the proxy).
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(30);

/// What went wrong talking to the admin API, each in one line naming the request.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// The HTTP client could not be built.
    #[error("cannot build an HTTP client: {0}")]
    Client(String),
    /// `--token-file` could not be read or holds no token.
    #[error("--token-file {path}: {reason}")]
    TokenFile {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// No answer: connection refused or timed out, or the answer was cut.
    #[error("{what}: {message}")]
    Transport {
        /// `METHOD URL`.
        what: String,
        /// The failure, naming the address.
        message: String,
    },
    /// A non-2xx answer.
    #[error("{what}: {message}")]
    Refused {
        /// `METHOD URL`.
        what: String,
        /// `HTTP STATUS REASON: the API's message`.
        message: String,
    },
    /// A 2xx answer that is not JSON.
    #[error("{what}: the answer (HTTP {status}) is not JSON: {source}")]
    NotJson {
        /// `METHOD URL`.
        what: String,
        /// The answer's status.
        status: reqwest::StatusCode,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A JSON answer that is not the view the command expects.
    #[error("{what}: the answer (HTTP {status}) is not what the admin API answers: {source}")]
    UnexpectedAnswer {
        /// `METHOD URL`.
        what: String,
        /// The answer's status.
        status: reqwest::StatusCode,
        /// Where it differs.
        source: serde_json::Error,
    },
}

/// HTTP method of a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// GET.
    Get,
    /// POST (no body).
    Post,
}

/// One call to the admin API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    /// Method.
    pub method: Method,
    /// Path segments under the admin URL, unescaped (`["api", "proxies", node]`).
    pub segments: Vec<String>,
    /// Query parameters; `None` values are keys alone (`?include_eds`).
    pub query: Vec<(String, Option<String>)>,
    /// Whether the answer is JSON (checked and parsed) or text printed as is.
    pub json: bool,
}

/// The call a command makes.
pub fn call_for(command: &CtlCommand, output: Output) -> Call {
    let seg = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let get = |segments: Vec<String>| Call {
        method: Method::Get,
        segments,
        query: Vec::new(),
        json: true,
    };
    let proxy = |node: &str, what: &str| {
        let mut s = seg(&["api", "proxies", node]);
        if !what.is_empty() {
            s.push(what.to_string());
        }
        s
    };
    match command {
        CtlCommand::Services { name: None } => get(seg(&["api", "services"])),
        CtlCommand::Services { name: Some(n) } => get(seg(&["api", "services", n])),
        CtlCommand::Proxies => get(seg(&["api", "proxies"])),
        CtlCommand::Proxy { node } => get(proxy(node, "")),
        CtlCommand::ConfigDump {
            node,
            resource,
            include_eds,
        } => {
            let mut c = get(proxy(node, "config_dump"));
            if let Some(r) = resource {
                c.query.push(("resource".into(), Some(r.clone())));
            }
            if *include_eds {
                c.query.push(("include_eds".into(), None));
            }
            c
        }
        CtlCommand::Stats { node, filter } => {
            let mut c = get(proxy(node, "stats"));
            if let Some(f) = filter {
                c.query.push(("filter".into(), Some(f.clone())));
            }
            envoy_format(c, output)
        }
        CtlCommand::Clusters { node } => envoy_format(get(proxy(node, "clusters")), output),
        CtlCommand::LogLevel {
            node,
            level,
            logger,
        } => {
            let mut c = get(proxy(node, "logging"));
            c.method = Method::Post;
            c.query.push(("level".into(), Some(level.clone())));
            if let Some(l) = logger {
                c.query.push(("logger".into(), Some(l.clone())));
            }
            c
        }
        CtlCommand::Compare => get(seg(&["api", "compare"])),
        CtlCommand::Sources => get(seg(&["api", "sources"])),
        CtlCommand::Changes => get(seg(&["api", "changes"])),
        CtlCommand::Diff { node } => get(proxy(node, "diff")),
        CtlCommand::Audit => get(seg(&["api", "audit"])),
        CtlCommand::Latency { name } => get(seg(&["api", "services", name, "latency"])),
        CtlCommand::Migrate { name, order } => {
            let mut c = get(seg(&["api", "services", name, "migration"]));
            c.method = Method::Post;
            c.query.push(("order".into(), Some(order.clone())));
            c
        }
    }
}

/// An Envoy admin answer relayed as is: Envoy's JSON (`format=json`) for `-o json`, else its
/// text, printed as fetched.
fn envoy_format(mut c: Call, output: Output) -> Call {
    if output == Output::Json {
        c.query.push(("format".into(), Some("json".into())));
    } else {
        c.json = false;
    }
    c
}

/// The URL of `call` under the admin URL `base` (which may carry a path prefix).
pub fn url_for(base: &Url, call: &Call) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    if let Ok(mut path) = url.path_segments_mut() {
        path.pop_if_empty().extend(&call.segments);
    }
    if !call.query.is_empty() {
        let mut q = url.query_pairs_mut();
        for (k, v) in &call.query {
            match v {
                Some(v) => q.append_pair(k, v),
                None => q.append_key_only(k),
            };
        }
    }
    url
}

/// A 2xx answer of the admin API.
#[derive(Debug)]
pub struct Answer {
    /// `METHOD URL`, for messages.
    pub what: String,
    /// Its status.
    pub status: reqwest::StatusCode,
    /// Its body.
    pub body: String,
}

impl Answer {
    /// The error for a body that did not parse as expected: not JSON at all, or JSON of
    /// another shape.
    pub fn unreadable(&self, source: serde_json::Error) -> CtlError {
        let (what, status) = (self.what.clone(), self.status);
        match source.classify() {
            serde_json::error::Category::Data => CtlError::UnexpectedAnswer {
                what,
                status,
                source,
            },
            _ => CtlError::NotJson {
                what,
                status,
                source,
            },
        }
    }

    /// Checks that the body is JSON.
    pub fn check_json(&self) -> Result<(), CtlError> {
        serde_json::from_str::<serde::de::IgnoredAny>(&self.body)
            .map(drop)
            .map_err(|e| self.unreadable(e))
    }
}

/// Makes `call` against the admin API at `admin`, with the bearer token of `token_file`
/// when given: its 2xx answer, or an error naming the request.
pub async fn fetch(
    admin: &Url,
    token_file: Option<&std::path::Path>,
    call: &Call,
) -> Result<Answer, CtlError> {
    let url = url_for(admin, call);
    let method = match call.method {
        Method::Get => "GET",
        Method::Post => "POST",
    };
    let what = format!("{method} {url}");
    let client = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(TOTAL_TIMEOUT)
        .user_agent(concat!("meshbridge-ctl/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| CtlError::Client(error_chain(&e)))?;
    let mut request = match call.method {
        Method::Get => client.get(url.clone()),
        Method::Post => client.post(url.clone()),
    };
    if let Some(path) = token_file {
        request = request.bearer_auth(read_token(path)?);
    }
    let transport = |e: reqwest::Error| CtlError::Transport {
        what: what.clone(),
        message: transport_error(&e, &url),
    };
    let response = request.send().await.map_err(transport)?;
    let status = response.status();
    let body = response.text().await.map_err(transport)?;
    if !status.is_success() {
        return Err(CtlError::Refused {
            message: http_error(status.as_u16(), &body),
            what,
        });
    }
    Ok(Answer { what, status, body })
}

/// The first word of the first line that is not blank or a `#` comment.
fn read_token(path: &std::path::Path) -> Result<String, CtlError> {
    let failed = |reason: String| CtlError::TokenFile {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| failed(e.to_string()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
        .ok_or_else(|| failed("no token in the file".into()))
}

/// The message of a non-2xx answer: `HTTP 404 Not Found: {error}` from the API's
/// `{"error": ...}`, else the first line of the body.
pub fn http_error(status: u16, body: &str) -> String {
    let reason = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map(|r| format!(" {r}"))
        .unwrap_or_default();
    let message = match serde_json::from_str::<ErrorView>(body) {
        Ok(v) => v.error,
        Err(_) => body
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_string(),
    };
    let message: String = message
        .replace(['\n', '\r'], " ")
        .chars()
        .take(500)
        .collect();
    if message.is_empty() {
        format!("HTTP {status}{reason}")
    } else {
        format!("HTTP {status}{reason}: {message}")
    }
}

/// A transport failure in one line, naming the address for connection problems.
fn transport_error(e: &reqwest::Error, url: &Url) -> String {
    let addr = match (url.host_str(), url.port_or_known_default()) {
        (Some(h), Some(p)) => format!("{h}:{p}"),
        (Some(h), None) => h.to_string(),
        _ => url.to_string(),
    };
    let root = root_cause(e);
    if e.is_connect() {
        if e.is_timeout() || root.to_ascii_lowercase().contains("timed out") {
            format!(
                "cannot connect to {addr}: no connection within {}s",
                CONNECT_TIMEOUT.as_secs()
            )
        } else {
            format!(
                "cannot connect to {addr}: {root} (is meshbridge serving its admin API there? see --admin, MESHBRIDGE_ADMIN)"
            )
        }
    } else if e.is_timeout() {
        format!(
            "no complete answer from {addr} within {}s",
            TOTAL_TIMEOUT.as_secs()
        )
    } else {
        format!("{addr}: {}", error_chain(e))
    }
}

fn root_cause(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cur = e;
    while let Some(next) = cur.source() {
        cur = next;
    }
    cur.to_string()
}

/// Every message of an error chain, joined by `: `, repeated ones once.
fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let msg = err.to_string();
        if !parts.iter().any(|p| p.contains(&msg)) {
            parts.push(msg);
        }
        cur = err.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ctl::args::parse_admin;
    use crate::ctl::args::tests::parse;

    #[test]
    fn calls_and_urls() {
        let base = parse_admin("http://mb.example:9090/prefix/").unwrap();
        let url = |args: &[&str]| {
            let a = parse(args);
            url_for(&base, &call_for(&a.command, a.output)).to_string()
        };
        assert_eq!(
            url(&["services"]),
            "http://mb.example:9090/prefix/api/services"
        );
        assert_eq!(
            url(&["services", "a b/c"]),
            "http://mb.example:9090/prefix/api/services/a%20b%2Fc"
        );
        assert_eq!(
            url(&["-o", "json", "proxy", "n1"]),
            "http://mb.example:9090/prefix/api/proxies/n1"
        );
        assert_eq!(
            url(&[
                "config-dump",
                "n1",
                "--resource",
                "dynamic_active_clusters",
                "--include-eds"
            ]),
            "http://mb.example:9090/prefix/api/proxies/n1/config_dump?resource=dynamic_active_clusters&include_eds"
        );
        assert_eq!(
            url(&["stats", "n1", "--filter", "^cluster\\..*"]),
            "http://mb.example:9090/prefix/api/proxies/n1/stats?filter=%5Ecluster%5C..*"
        );
        assert_eq!(
            url(&["stats", "n1", "-o", "json"]),
            "http://mb.example:9090/prefix/api/proxies/n1/stats?format=json"
        );
        let a = parse(&["log-level", "n1", "debug", "--logger", "http"]);
        let c = call_for(&a.command, a.output);
        assert_eq!(c.method, Method::Post);
        assert_eq!(
            url_for(&base, &c).as_str(),
            "http://mb.example:9090/prefix/api/proxies/n1/logging?level=debug&logger=http"
        );
        let a = parse(&["migrate", "orders:admin", "rollback"]);
        let c = call_for(&a.command, a.output);
        assert_eq!(c.method, Method::Post);
        assert_eq!(
            url_for(&base, &c).as_str(),
            "http://mb.example:9090/prefix/api/services/orders:admin/migration?order=rollback"
        );
        assert!(!call_for(&parse(&["stats", "n"]).command, Output::Table).json);
        assert_eq!(
            url(&["diff", "n1"]),
            "http://mb.example:9090/prefix/api/proxies/n1/diff"
        );
        assert_eq!(
            url(&["clusters", "n1"]),
            "http://mb.example:9090/prefix/api/proxies/n1/clusters"
        );
        assert_eq!(
            url(&["clusters", "n1", "-o", "json"]),
            "http://mb.example:9090/prefix/api/proxies/n1/clusters?format=json"
        );
        assert!(!call_for(&parse(&["clusters", "n"]).command, Output::Table).json);
        assert!(call_for(&parse(&["clusters", "n"]).command, Output::Json).json);
        assert!(call_for(&parse(&["diff", "n"]).command, Output::Table).json);
        for (cmd, path) in [
            ("compare", "compare"),
            ("sources", "sources"),
            ("changes", "changes"),
            ("audit", "audit"),
        ] {
            assert_eq!(
                url(&[cmd]),
                format!("http://mb.example:9090/prefix/api/{path}")
            );
        }
    }

    #[test]
    fn http_errors() {
        assert_eq!(
            http_error(404, r#"{"error":"no connected proxy with node id \"x\""}"#),
            "HTTP 404 Not Found: no connected proxy with node id \"x\""
        );
        assert_eq!(
            http_error(502, "upstream down\nmore"),
            "HTTP 502 Bad Gateway: upstream down"
        );
        assert_eq!(http_error(500, ""), "HTTP 500 Internal Server Error");
    }
}
