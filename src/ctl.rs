//! `meshbridge ctl`: the admin API from the command line.
//!
//! Pure parts (what to ask for, [`render`] and the `render_*` functions turning the API's
//! JSON into aligned tables, [`pretty_json`]) and a thin IO shell ([`run`]) doing one HTTP
//! call per command with bounded timeouts.

use std::fmt::Write as _;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use reqwest::Url;
use serde_json::Value;

/// Where `ctl` finds the admin API unless `--admin` or `MESHBRIDGE_ADMIN` says otherwise.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9090";

/// Bound on establishing the connection to the admin API.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// Bound on a whole call (Envoy diagnostics go through meshbridge to the proxy).
pub const TOTAL_TIMEOUT: Duration = Duration::from_secs(30);

/// Envoy log levels the admin API accepts.
pub const LOG_LEVELS: [&str; 7] = [
    "trace", "debug", "info", "warning", "error", "critical", "off",
];

/// `meshbridge ctl`.
#[derive(Args, Debug, Clone)]
pub struct CtlArgs {
    /// Admin API of a running `meshbridge run` (its --admin-addr); `host:port` means http.
    #[arg(
        long,
        env = "MESHBRIDGE_ADMIN",
        default_value = DEFAULT_ADMIN,
        value_parser = parse_admin,
        global = true
    )]
    pub admin: Url,
    /// Output format: aligned tables for people, or the API's JSON (pretty-printed).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// File whose first word is a bearer token of the admin API (`run --admin-token-file`).
    #[arg(long, env = "MESHBRIDGE_TOKEN_FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned human-readable tables.
    Table,
    /// The API's JSON, pretty-printed, content unchanged.
    Json,
}

/// What to show.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum CtlCommand {
    /// Services of the model; with NAME, that service's instances, dependents and access rule.
    Services {
        /// One service.
        name: Option<String>,
    },
    /// Connected proxies: mode, connection age, versions sent and ACKed per type.
    Proxies,
    /// One proxy: status, versions, last NACK, resource names, warnings.
    Proxy {
        /// Its node id.
        node: String,
    },
    /// The proxy's Envoy /config_dump, as Envoy answers it.
    ConfigDump {
        /// Node id of the proxy.
        node: String,
        /// Only this resource type, e.g. dynamic_active_clusters.
        #[arg(long)]
        resource: Option<String>,
        /// Include endpoints (EDS).
        #[arg(long)]
        include_eds: bool,
    },
    /// The proxy's Envoy /stats, as Envoy answers them.
    Stats {
        /// Node id of the proxy.
        node: String,
        /// Only stats whose name matches this regular expression.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Set the log level of the proxy's Envoy (all loggers, or --logger).
    LogLevel {
        /// Node id of the proxy.
        node: String,
        /// The level.
        #[arg(value_parser = LOG_LEVELS)]
        level: String,
        /// Only this Envoy logger, e.g. `http`.
        #[arg(long)]
        logger: Option<String>,
    },
    /// This instance's state digest against its peers', and where they differ.
    Compare,
    /// Sources (config directory, Consul, Kubernetes): synced, staleness, errors.
    Sources,
    /// Recent model changes and the rebuilds and pushes they caused, newest first.
    Changes,
    /// What meshbridge sent the proxy against what its Envoy holds, per type (exit 0 either
    /// way: a report, not a check).
    Diff {
        /// Node id of the proxy.
        node: String,
    },
    /// The proxy's Envoy /clusters (clusters, their hosts and host stats), as Envoy answers.
    Clusters {
        /// Node id of the proxy.
        node: String,
    },
    /// Actions taken through the admin API (log level changes), newest first.
    Audit,
}

/// Parses `--admin`: an http(s) URL, or `host:port` meaning `http://host:port`.
pub fn parse_admin(s: &str) -> Result<Url, String> {
    let text = s.trim();
    let with_scheme = if text.contains("://") {
        text.to_string()
    } else {
        format!("http://{text}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?}: only http and https are supported"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} names no host"));
    }
    Ok(url)
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

/// The table output of `command` for the API's answer `body` (JSON answers), at `now`
/// (seconds since the Unix epoch, for ages). Commands whose answer is printed as fetched
/// (`config-dump`, `stats`, `clusters`) are not rendered here.
pub fn render(command: &CtlCommand, body: &Value, now: u64) -> String {
    match command {
        CtlCommand::Services { name: None } => render_services(body),
        CtlCommand::Services { name: Some(_) } => render_service(body),
        CtlCommand::Proxies => render_proxies(body, now),
        CtlCommand::Proxy { .. } => render_proxy(body, now),
        CtlCommand::ConfigDump { .. } | CtlCommand::Stats { .. } | CtlCommand::Clusters { .. } => {
            pretty_json(&body.to_string())
        }
        CtlCommand::LogLevel { .. } => render_log_level(body),
        CtlCommand::Compare => render_compare(body),
        CtlCommand::Sources => render_sources(body, now),
        CtlCommand::Changes => render_changes(body, now),
        CtlCommand::Diff { .. } => render_diff(body),
        CtlCommand::Audit => render_audit(body, now),
    }
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

/// A scalar as a cell: strings as they are, null or missing as `-`.
fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => yes_no(*b).into(),
        Value::Array(a) => join(a, a.len()),
        other => other.to_string(),
    }
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// At most `max` items of an array joined by `, ` (then `+N more`); `-` when empty.
fn join(items: &[Value], max: usize) -> String {
    if items.is_empty() {
        return "-".into();
    }
    let mut parts: Vec<String> = items.iter().take(max).map(cell).collect();
    if items.len() > max {
        parts.push(format!("+{} more", items.len() - max));
    }
    parts.join(", ")
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// `address:port`, with brackets around an IPv6 address.
fn host_port(address: &Value, port: &Value) -> String {
    let a = address.as_str().unwrap_or("?");
    let p = cell(port);
    if a.contains(':') {
        format!("[{a}]:{p}")
    } else {
        format!("{a}:{p}")
    }
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

/// The age of a Unix timestamp field at `now`, `-` when absent.
fn age(at: &Value, now: u64) -> String {
    match at.as_u64() {
        Some(t) => format_age(now.saturating_sub(t)),
        None => "-".into(),
    }
}

/// The short name of an xDS type URL: `cds`, `eds`, `lds`, `rds`, else its last segment.
pub fn type_name(type_url: &str) -> String {
    let last = type_url.rsplit(['.', '/']).next().unwrap_or(type_url);
    match last {
        "Cluster" => "cds".into(),
        "ClusterLoadAssignment" => "eds".into(),
        "Listener" => "lds".into(),
        "RouteConfiguration" => "rds".into(),
        other => other.to_string(),
    }
}

const TYPE_ORDER: [&str; 4] = ["cds", "eds", "lds", "rds"];

/// The entries of a `{TYPE_URL: x}` object by short type name, in cds, eds, lds, rds order.
fn by_type(types: &Value) -> Vec<(String, &Value)> {
    let mut list: Vec<(String, &Value)> = types
        .as_object()
        .map(|m| m.iter().map(|(k, v)| (type_name(k), v)).collect())
        .unwrap_or_default();
    let rank = |t: &str| TYPE_ORDER.iter().position(|x| *x == t).unwrap_or(9);
    list.sort_by(|a, b| rank(&a.0).cmp(&rank(&b.0)).then(a.0.cmp(&b.0)));
    list
}

/// A version, shortened to 8 characters.
fn short(v: &Value) -> String {
    match v.as_str() {
        Some(s) if !s.is_empty() => s.chars().take(8).collect(),
        _ => "-".into(),
    }
}

/// A proxy's version cell for one type: the ACKed version when it is the one sent, else
/// `acked/sent`; ` NACK` when the last response was rejected.
fn version_cell(t: &Value) -> String {
    let (sent, acked) = (&t["sent"], &t["acked"]);
    let mut s = if sent == acked || sent.is_null() {
        short(acked)
    } else {
        format!("{}/{}", short(acked), short(sent))
    };
    if !t["nack"].is_null() {
        s.push_str(" NACK");
    }
    s
}

/// Labelled lines (`label:  value`), labels aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:width$}  {v}\n", format!("{k}:")))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Renderers.

/// `ctl services`: one line per service.
pub fn render_services(v: &Value) -> String {
    let services = array(v);
    if services.is_empty() {
        return "no services\n".into();
    }
    let mut t = Table::new(&["NAME", "INSTANCES", "ORIGINS", "MTLS", "DEPENDENTS"]);
    for s in services {
        let name = s["name"].as_str().unwrap_or("?");
        let instances = array(&s["instances"]);
        let healthy = instances
            .iter()
            .filter(|i| i["healthy"].as_bool().unwrap_or(false))
            .count();
        let mut origins: Vec<&str> = instances
            .iter()
            .filter_map(|i| i["origin"].as_str())
            .collect();
        origins.sort_unstable();
        origins.dedup();
        // Older servers list no dependents: derive them from the dependencies.
        let dependents = match s.get("dependents") {
            Some(d) => cell(d),
            None => {
                let names: Vec<Value> = services
                    .iter()
                    .filter(|o| {
                        array(&o["dependencies"])
                            .iter()
                            .any(|d| d.as_str() == Some(name))
                    })
                    .map(|o| o["name"].clone())
                    .collect();
                join(&names, names.len())
            }
        };
        t.row(vec![
            name.to_string(),
            format!("{healthy}/{}", instances.len()),
            if origins.is_empty() {
                "-".into()
            } else {
                origins.join(",")
            },
            cell(&s["mtls"]),
            dependents,
        ]);
    }
    t.render()
}

/// `ctl services NAME`.
pub fn render_service(v: &Value) -> String {
    let mut out = String::new();
    let origins: Vec<String> = v["origins"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(o, c)| format!("{o} {}/{} healthy", cell(&c["healthy"]), cell(&c["total"])))
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&fields(&[
        ("service", cell(&v["name"])),
        ("declared", cell(&v["declared"])),
        ("mtls", cell(&v["mtls"])),
        ("dependencies", cell(&v["dependencies"])),
        (
            "origins",
            if origins.is_empty() {
                "-".into()
            } else {
                origins.join(", ")
            },
        ),
    ]));

    let instances = array(&v["instances"]);
    if instances.is_empty() {
        out.push_str("\ninstances: none\n");
    } else {
        let mut t = Table::new(&[
            "ORIGIN",
            "ADDRESS",
            "DATACENTER",
            "TAGS",
            "WEIGHT",
            "HEALTHY",
        ]);
        for i in instances {
            t.row(vec![
                cell(&i["origin"]),
                host_port(&i["address"], &i["port"]),
                cell(&i["datacenter"]),
                cell(&i["tags"]),
                cell(&i["weight"]),
                cell(&i["healthy"]),
            ]);
        }
        let _ = write!(out, "\ninstances ({}):\n", instances.len());
        out.push_str(&indent(&t.render(), "  "));
    }

    let dependents = &v["dependents"];
    let proxies = array(&dependents["proxies"]);
    let _ = write!(
        out,
        "\ndependents:\n  services: {}\n",
        cell(&dependents["services"])
    );
    if proxies.is_empty() {
        out.push_str("  proxies:  none connected\n");
    } else {
        let mut t = Table::new(&["NODE", "SERVICE", "GROUP", "MODE"]);
        for p in proxies {
            t.row(vec![
                cell(&p["node"]),
                cell(&p["service"]),
                cell(&p["group"]),
                cell(&p["mode"]),
            ]);
        }
        let _ = writeln!(out, "  proxies ({}):", proxies.len());
        out.push_str(&indent(&t.render(), "    "));
    }

    out.push('\n');
    out.push_str(&render_access(&v["access"]));
    out
}

/// The access rule summary of a service.
fn render_access(a: &Value) -> String {
    if a.is_null() {
        return "access: no AccessRule targets this service\n".into();
    }
    let rules = array(&a["rules"]);
    let mut out = format!(
        "access: {} unless allowed, {} rule{} (from {})\n",
        cell(&a["action"]),
        rules.len(),
        if rules.len() == 1 { "" } else { "s" },
        cell(&a["sources"]),
    );
    for r in rules {
        let from: Vec<String> = array(&r["from"]).iter().map(caller).collect();
        let paths: Vec<String> = array(&r["paths"]).iter().map(path_match).collect();
        let methods = array(&r["methods"]);
        let _ = writeln!(
            out,
            "  allow {} -> {} {}",
            if from.is_empty() {
                "-".into()
            } else {
                from.join(", ")
            },
            if methods.is_empty() {
                "any method".into()
            } else {
                join(methods, methods.len())
            },
            if paths.is_empty() {
                "any path".into()
            } else {
                paths.join(", ")
            },
        );
    }
    let _ = writeln!(out, "  resolved callers: {}", cell(&a["resolved_callers"]));
    let _ = writeln!(out, "  unknown callers:  {}", cell(&a["unknown_callers"]));
    out
}

/// A serialized `CallerMatch`: `"any"` or `{"service": NAME}`.
fn caller(c: &Value) -> String {
    match c {
        Value::String(s) if s == "any" => "*".into(),
        Value::Object(m) => m.get("service").map(cell).unwrap_or_else(|| c.to_string()),
        other => cell(other),
    }
}

/// A serialized `PathMatch`: `{"exact"|"prefix"|"regex": text}`.
fn path_match(p: &Value) -> String {
    match p.as_object().and_then(|m| m.iter().next()) {
        Some((kind, text)) => match kind.as_str() {
            "exact" => cell(text),
            "prefix" => format!("{}*", cell(text)),
            _ => format!("{kind} {}", cell(text)),
        },
        None => cell(p),
    }
}

/// `ctl proxies`: one line per connected stream.
pub fn render_proxies(v: &Value, now: u64) -> String {
    let proxies = array(v);
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
    ]);
    let mut pending = false;
    for p in proxies {
        let mut row = vec![
            cell(&p["node"]),
            cell(&p["service"]),
            cell(&p["group"]),
            cell(&p["mode"]),
            age(&p["connected_at"], now),
        ];
        let types = by_type(&p["types"]);
        for name in TYPE_ORDER {
            let c = types
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| version_cell(s))
                .unwrap_or_else(|| "-".into());
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

/// `ctl proxy NODE`.
pub fn render_proxy(v: &Value, now: u64) -> String {
    let types = by_type(&v["types"]);
    let nacked: Vec<&str> = types
        .iter()
        .filter(|(_, s)| !s["nack"].is_null())
        .map(|(n, _)| n.as_str())
        .collect();
    let waiting: Vec<&str> = types
        .iter()
        .filter(|(_, s)| s["sent"] != s["acked"])
        .map(|(n, _)| n.as_str())
        .collect();
    let status = if !nacked.is_empty() {
        format!("NACK ({})", nacked.join(", "))
    } else if !waiting.is_empty() {
        format!("waiting for ACK ({})", waiting.join(", "))
    } else if types.is_empty() {
        "nothing sent yet".into()
    } else {
        "in sync (every response ACKed)".into()
    };
    let connected = match v["connected_at"].as_u64() {
        Some(t) => format!("{} ago", format_age(now.saturating_sub(t))),
        None => "-".into(),
    };
    let admin = match &v["admin"] {
        Value::Null if v.get("admin").is_some() => {
            "- (no diagnostics: no admin/diagnostics port announced)".into()
        }
        other => cell(other),
    };
    let mut out = fields(&[
        ("node", cell(&v["node"])),
        ("service", cell(&v["service"])),
        ("group", cell(&v["group"])),
        ("mode", cell(&v["mode"])),
        ("status", status),
        ("peer", cell(&v["peer"])),
        ("envoy admin", admin),
        ("connected", connected),
        ("dependencies", cell(&v["dependencies"])),
    ]);

    if !types.is_empty() {
        let mut t = Table::new(&["TYPE", "SENT", "ACKED", "NACK"]);
        for (name, s) in &types {
            t.row(vec![
                name.clone(),
                cell(&s["sent"]),
                cell(&s["acked"]),
                if s["nack"].is_null() { "-" } else { "yes" }.into(),
            ]);
        }
        out.push_str("\nversions:\n");
        out.push_str(&indent(&t.render(), "  "));
    }
    for (name, s) in &types {
        if let Some(msg) = s["nack"].as_str() {
            let _ = writeln!(out, "\nlast NACK ({name}): {msg}");
        }
    }

    let resources = by_type(&v["resources"]);
    if !resources.is_empty() {
        out.push_str("\nresources:\n");
        for (name, r) in &resources {
            let names = array(&r["names"]);
            let _ = writeln!(
                out,
                "  {name} (version {}, {} resource{}){}",
                cell(&r["version"]),
                names.len(),
                if names.len() == 1 { "" } else { "s" },
                if names.is_empty() { "" } else { ":" }
            );
            for n in names {
                let _ = writeln!(out, "    {}", cell(n));
            }
        }
    }

    let warnings = array(&v["warnings"]);
    if warnings.is_empty() {
        out.push_str("\nwarnings: none\n");
    } else {
        out.push_str("\nwarnings:\n");
        for w in warnings {
            let _ = writeln!(out, "  - {}", cell(w));
        }
    }
    out
}

/// `ctl log-level NODE LEVEL`: what was set, then the levels Envoy reports, summarised (the
/// most common level as a count, the other levels with their loggers).
pub fn render_log_level(v: &Value) -> String {
    let target = match v["logger"].as_str() {
        Some(l) => format!(" for logger {l}"),
        None => String::new(),
    };
    let mut out = format!(
        "{}: Envoy log level set to {}{target} (admin {})\n",
        cell(&v["node"]),
        cell(&v["level"]),
        cell(&v["admin"])
    );
    let text = v["output"].as_str().unwrap_or_default();
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

/// `ctl compare`: this instance's digest and each peer's.
pub fn render_compare(v: &Value) -> String {
    let peers = array(&v["peers"]);
    let verdict = match v["agree"].as_bool() {
        None => "no peers configured (meshbridge run --peer URL or --peers-dns HOST:PORT)",
        Some(true) => "every peer agrees",
        Some(false) => "DISAGREE",
    };
    let mut out = fields(&[
        ("self digest", cell(&v["self"]["digest"])),
        ("peers", verdict.into()),
    ]);
    if peers.is_empty() {
        return out;
    }
    let mut t = Table::new(&["PEER", "DIGEST", "AGREE", "ERROR"]);
    for p in peers {
        t.row(vec![
            cell(&p["peer"]),
            cell(&p["digest"]),
            cell(&p["agree"]),
            cell(&p["error"]),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    for p in peers {
        let d = &p["differences"];
        let mut lines = String::new();
        for (key, label) in [
            ("services_only_here", "services only here"),
            ("services_only_there", "services only there"),
            ("access_only_here", "access policies only here"),
            ("access_only_there", "access policies only there"),
            ("access_changed", "access policies changed"),
        ] {
            let items = array(&d[key]);
            if !items.is_empty() {
                let _ = writeln!(lines, "  {label}: {}", join(items, items.len()));
            }
        }
        let listed = array(&d["services_changed"]).len();
        let total = d["services_changed_count"]
            .as_u64()
            .map_or(listed, |n| n as usize);
        if total > listed {
            let _ = writeln!(
                lines,
                "  services changed: {total} (the first {listed} below)"
            );
        }
        for s in array(&d["services_changed"]) {
            let mut parts = Vec::new();
            for (key, label) in [
                ("instances_only_here", "instances only here"),
                ("instances_only_there", "instances only there"),
                ("fields", "fields"),
            ] {
                let items = array(&s[key]);
                if !items.is_empty() {
                    parts.push(format!("{label}: {}", join(items, items.len())));
                }
            }
            let _ = writeln!(
                lines,
                "  service {} changed: {}",
                cell(&s["name"]),
                if parts.is_empty() {
                    "-".into()
                } else {
                    parts.join("; ")
                }
            );
        }
        if !lines.is_empty() {
            let _ = write!(out, "\ndifferences with {}:\n{lines}", cell(&p["peer"]));
        }
    }
    out
}

/// `ctl sources`.
pub fn render_sources(v: &Value, now: u64) -> String {
    let sources = array(v);
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
        let last = match s["last_sync"].as_u64() {
            Some(t) => format!("{} ago", format_age(now.saturating_sub(t))),
            None => "never".into(),
        };
        let staleness = match s["staleness_seconds"].as_u64() {
            Some(x) => format_age(x),
            None => "-".into(),
        };
        let ms = match s["last_sync_duration_ms"].as_f64() {
            Some(x) => format!("{x:.1}"),
            None => "-".into(),
        };
        t.row(vec![
            cell(&s["name"]),
            cell(&s["kind"]),
            cell(&s["synced"]),
            last,
            staleness,
            ms,
            cell(&s["errors"]),
            cell(&s["error"]).replace('\n', "; "),
        ]);
    }
    t.render()
}

/// `ctl changes`: newest first.
pub fn render_changes(v: &Value, now: u64) -> String {
    let changes = array(v);
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
        let ms = match c["build_ms"].as_f64() {
            Some(x) => format!("{x:.1}"),
            None => "-".into(),
        };
        t.row(vec![
            age(&c["at"], now),
            cell(&c["generation"]),
            join(array(&c["services_added"]), 3),
            join(array(&c["services_removed"]), 3),
            join(array(&c["services_changed"]), 3),
            join(array(&c["access_changed"]), 3),
            cell(&c["groups_rebuilt"]),
            match (&c["groups_pushed_count"], &c["groups_pushed"]) {
                (Value::Number(n), _) => n.to_string(),
                (_, Value::Array(a)) => a.len().to_string(),
                (_, other) => cell(other),
            },
            ms,
        ]);
    }
    t.render()
}

/// `ctl diff NODE`: a verdict line (`NODE in sync`, or `NODE OUT OF SYNC` with the types
/// that differ), one row per type, then the names behind every non-zero count.
pub fn render_diff(v: &Value) -> String {
    let node = cell(&v["node"]);
    let mut types: Vec<&Value> = array(&v["types"]).iter().collect();
    let rank = |t: &Value| {
        let name = t["type"].as_str().unwrap_or_default();
        TYPE_ORDER.iter().position(|x| *x == name).unwrap_or(9)
    };
    types.sort_by_key(|t| rank(t));
    let name_of = |t: &Value| match t["type"].as_str() {
        Some(n) if !n.is_empty() => n.to_string(),
        _ => type_name(t["type_url"].as_str().unwrap_or("?")),
    };
    let list = |t: &Value, key: &str| -> Vec<String> {
        array(&t[key])
            .iter()
            .map(|x| match x {
                Value::Object(_) => format!("{}: {}", cell(&x["name"]), cell(&x["details"])),
                other => cell(other),
            })
            .collect()
    };

    // Why each type differs, for the verdict line.
    let mut reasons: Vec<String> = Vec::new();
    for t in &types {
        let mut why: Vec<String> = Vec::new();
        for (key, label) in [
            ("only_sent", "only sent"),
            ("only_envoy", "only in Envoy"),
            ("warming", "warming"),
            ("errors", "failed"),
        ] {
            let n = array(&t[key]).len();
            if n > 0 {
                why.push(format!("{n} {label}"));
            }
        }
        if !t["nack"].is_null() {
            why.push("NACK".into());
        } else if t["sent_version"] != t["acked_version"] {
            why.push("awaiting ACK".into());
        }
        if !why.is_empty() {
            reasons.push(format!("{} {}", name_of(t), why.join(", ")));
        }
    }
    let in_sync = v["in_sync"].as_bool().unwrap_or(reasons.is_empty());
    let mut out = if in_sync {
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
        let mut acked = short(&ty["acked_version"]);
        if !ty["nack"].is_null() {
            acked.push_str(" NACK");
        }
        t.row(vec![
            name_of(ty),
            short(&ty["sent_version"]),
            acked,
            cell(&ty["sent"]),
            cell(&ty["envoy"]),
            array(&ty["only_sent"]).len().to_string(),
            array(&ty["only_envoy"]).len().to_string(),
            array(&ty["warming"]).len().to_string(),
            array(&ty["errors"]).len().to_string(),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());

    for ty in &types {
        let mut lines: Vec<(&str, String)> = Vec::new();
        for (key, label) in [
            ("only_sent", "only sent"),
            ("only_envoy", "only in Envoy"),
            ("warming", "warming"),
        ] {
            let names = list(ty, key);
            if !names.is_empty() {
                lines.push((label, names.join(", ")));
            }
        }
        for e in list(ty, "errors") {
            lines.push(("failed", e));
        }
        if let Some(msg) = ty["nack"].as_str() {
            lines.push(("last NACK", msg.to_string()));
        }
        if !lines.is_empty() {
            let _ = write!(out, "\n{}:\n{}", name_of(ty), indent(&fields(&lines), "  "));
        }
    }
    out
}

/// `ctl audit`: admin actions, newest first.
pub fn render_audit(v: &Value, now: u64) -> String {
    let entries = array(v);
    if entries.is_empty() {
        return "no admin actions recorded\n".into();
    }
    let mut t = Table::new(&["AT", "WHO", "ACTION", "NODE", "DETAIL", "RESULT"]);
    for e in entries {
        let at = match e["at"].as_u64() {
            Some(t) => format!("{} ago", format_age(now.saturating_sub(t))),
            None => "-".into(),
        };
        t.row(vec![
            at,
            cell(&e["who"]),
            cell(&e["action"]),
            cell(&e["node"]),
            cell(&e["detail"]),
            cell(&e["result"]),
        ]);
    }
    t.render()
}

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

// ---------------------------------------------------------------------------------------
// The IO shell.

/// Runs `ctl`: one call to the admin API, its answer printed on stdout. Errors are one line
/// naming the URL (unreachable, non-2xx with the API's message and status, bad JSON).
pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let call = call_for(&args.command, args.output);
    let url = url_for(&args.admin, &call);
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
        .map_err(|e| anyhow::anyhow!("cannot build an HTTP client: {}", error_chain(&e)))?;
    let mut request = match call.method {
        Method::Get => client.get(url.clone()),
        Method::Post => client.post(url.clone()),
    };
    if let Some(path) = &args.token_file {
        request = request.bearer_auth(read_token(path)?);
    }
    let response = request
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("{what}: {}", transport_error(&e, &url)))?;
    let status = response.status();
    let body = response
        .text()
        .await
        .map_err(|e| anyhow::anyhow!("{what}: {}", transport_error(&e, &url)))?;
    if !status.is_success() {
        anyhow::bail!("{what}: {}", http_error(status.as_u16(), &body));
    }
    let text = if call.json {
        let value: Value = serde_json::from_str(&body)
            .map_err(|e| anyhow::anyhow!("{what}: the answer (HTTP {status}) is not JSON: {e}"))?;
        match (args.output, &args.command) {
            (Output::Json, _) => pretty_json(&body),
            // Printed as fetched.
            (Output::Table, CtlCommand::ConfigDump { .. }) => ensure_newline(body),
            (Output::Table, command) => render(command, &value, crate::sources::now_secs()),
        }
    } else {
        ensure_newline(body)
    };
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth a message.
    let _ = stdout.write_all(text.as_bytes());
    let _ = stdout.flush();
    Ok(())
}

/// The first word of the first line that is not blank or a `#` comment.
fn read_token(path: &std::path::Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", path.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .and_then(|l| l.split_whitespace().next())
        .map(str::to_string)
        .ok_or_else(|| anyhow::anyhow!("--token-file {}: no token in the file", path.display()))
}

fn ensure_newline(mut s: String) -> String {
    if !s.is_empty() && !s.ends_with('\n') {
        s.push('\n');
    }
    s
}

/// The message of a non-2xx answer: `HTTP 404 Not Found: {error}` from the API's
/// `{"error": ...}`, else the first line of the body.
pub fn http_error(status: u16, body: &str) -> String {
    let reason = reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .map(|r| format!(" {r}"))
        .unwrap_or_default();
    let message = match serde_json::from_str::<Value>(body) {
        Ok(v) if v["error"].is_string() => v["error"].as_str().unwrap_or_default().to_string(),
        _ => body
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
    if message.is_empty() && status == 404 {
        format!("HTTP {status}{reason} (no such route: is the server older than this client?)")
    } else if message.is_empty() {
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
    use serde_json::json;

    const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
    const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
    const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
    const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

    fn parse(args: &[&str]) -> CtlArgs {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            ctl: CtlArgs,
        }
        use clap::Parser as _;
        let mut argv = vec!["ctl"];
        argv.extend_from_slice(args);
        P::try_parse_from(argv).unwrap().ctl
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

    #[test]
    fn admin_urls() {
        assert_eq!(
            parse_admin("127.0.0.1:9090").unwrap().as_str(),
            "http://127.0.0.1:9090/"
        );
        assert_eq!(
            parse_admin("localhost:9090").unwrap().as_str(),
            "http://localhost:9090/"
        );
        assert!(parse_admin("ftp://x").is_err());
        assert!(parse_admin("http://").is_err());
        let a = parse(&["proxies"]);
        assert_eq!(a.admin.as_str(), "http://127.0.0.1:9090/");
        assert_eq!(a.output, Output::Table);
    }

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
    fn bad_usage_is_refused_by_clap() {
        #[derive(clap::Parser, Debug)]
        struct P {
            #[command(flatten)]
            ctl: CtlArgs,
        }
        use clap::Parser as _;
        assert!(P::try_parse_from(["ctl", "log-level", "n", "loud"]).is_err());
        assert!(P::try_parse_from(["ctl", "-o", "yaml", "proxies"]).is_err());
        assert!(P::try_parse_from(["ctl", "--admin", "ftp://x", "proxies"]).is_err());
        assert!(P::try_parse_from(["ctl", "proxy"]).is_err());
        assert!(P::try_parse_from(["ctl", "diff"]).is_err());
        assert!(P::try_parse_from(["ctl", "clusters"]).is_err());
        assert!(P::try_parse_from(["ctl", "audit", "n"]).is_err());
    }

    fn services() -> Value {
        json!([
            {"name": "billing", "declared": true, "mtls": "disabled", "dependencies": [],
             "dependents": [], "instances": []},
            {"name": "orders", "declared": true, "mtls": "strict", "dependencies": [],
             "dependents": ["frontend"], "instances": [
                {"address": "10.0.0.1", "port": 8080, "origin": "consul", "datacenter": "dc1",
                 "tags": ["v1"], "weight": 1, "healthy": true},
                {"address": "fd00::2", "port": 8080, "origin": "kubernetes", "datacenter": null,
                 "tags": [], "weight": 3, "healthy": false}]},
        ])
    }

    #[test]
    fn services_list() {
        assert_eq!(
            render_services(&services()),
            "NAME     INSTANCES  ORIGINS            MTLS      DEPENDENTS\n\
             billing  0/0        -                  disabled  -\n\
             orders   1/2        consul,kubernetes  strict    frontend\n"
        );
        assert_eq!(render_services(&json!([])), "no services\n");
        // Without `dependents` (an older server), they are derived from dependencies.
        let old = json!([
            {"name": "a", "mtls": "disabled", "dependencies": ["b"], "instances": []},
            {"name": "b", "mtls": "disabled", "dependencies": [], "instances": []},
        ]);
        assert!(render_services(&old).contains("b     0/0        -        disabled  a\n"));
    }

    #[test]
    fn one_service() {
        let mut s = services()[1].clone();
        s["origins"] = json!({"consul": {"total": 1, "healthy": 1},
                              "kubernetes": {"total": 1, "healthy": 0}});
        s["dependents"] = json!({"services": ["frontend"], "proxies": [
            {"node": "frontend-1", "service": "frontend", "group": "g1", "mode": "delta"}]});
        s["access"] = json!({"target": "orders", "action": "deny", "sources": ["mesh.yaml#4"],
            "rules": [{"from": [{"service": "frontend"}, "any"], "paths": [{"prefix": "/hello"}],
                       "methods": ["GET"]}],
            "resolved_callers": ["frontend"], "unknown_callers": ["ghost"]});
        let out = render_service(&s);
        let expected = "\
service:       orders
declared:      yes
mtls:          strict
dependencies:  -
origins:       consul 1/1 healthy, kubernetes 0/1 healthy

instances (2):
  ORIGIN      ADDRESS         DATACENTER  TAGS  WEIGHT  HEALTHY
  consul      10.0.0.1:8080   dc1         v1    1       yes
  kubernetes  [fd00::2]:8080  -           -     3       no

dependents:
  services: frontend
  proxies (1):
    NODE        SERVICE   GROUP  MODE
    frontend-1  frontend  g1     delta

access: deny unless allowed, 1 rule (from mesh.yaml#4)
  allow frontend, * -> GET /hello*
  resolved callers: frontend
  unknown callers:  ghost
";
        assert_eq!(out, expected);
        s["access"] = Value::Null;
        s["dependents"] = json!({"services": [], "proxies": []});
        let out = render_service(&s);
        assert!(
            out.contains("access: no AccessRule targets this service"),
            "{out}"
        );
        assert!(out.contains("proxies:  none connected"), "{out}");
    }

    fn proxy() -> Value {
        json!({
            "node": "frontend-1", "service": "frontend", "group": "frontend/abc", "mode": "sotw",
            "peer": "127.0.0.1:5000", "admin_port": 15000, "diagnostics_port": null,
            "admin": "127.0.0.1:15000", "connected_at": 1000,
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
        let out = render_proxies(&json!([proxy()]), 1000 + 125);
        let expected = "\
NODE        SERVICE   GROUP         MODE  CONNECTED  CDS       EDS                LDS                     RDS
frontend-1  frontend  frontend/abc  sotw  2m05s      01234567  aaaaaaaa/11111111  55555555/33333333 NACK  -

versions: ACKed; acked/sent while a response awaits its ACK; NACK: the last response was rejected (see `ctl proxy NODE`)
";
        assert_eq!(out, expected);
        assert_eq!(render_proxies(&json!([]), 0), "no connected proxies\n");
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
        let out = render_proxy(&p, 1010);
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
        let out = render_proxy(&p, 1010);
        assert!(out.contains("status:        in sync"), "{out}");
        assert!(out.contains("envoy admin:   - (no diagnostics"), "{out}");
        assert!(out.contains("warnings: none"), "{out}");
    }

    #[test]
    fn log_level() {
        let v = json!({"node": "n1", "level": "debug", "admin": "127.0.0.1:1",
                       "output": "active loggers:\n  admin: debug\n  http: debug\n"});
        assert_eq!(
            render_log_level(&v),
            "n1: Envoy log level set to debug (admin 127.0.0.1:1)\n\
             Envoy reports debug: all 2 loggers\n"
        );
        let v = json!({"node": "n1", "level": "warning", "logger": "http", "admin": "a:1",
                       "output": "active loggers:\n  admin: debug\n  http: warning\n  upstream: debug\n  pool: off\n"});
        assert_eq!(
            render_log_level(&v),
            "n1: Envoy log level set to warning for logger http (admin a:1)\n\
             Envoy reports debug: 2 other loggers; off: pool; warning: http\n"
        );
        let v = json!({"node": "n1", "level": "info", "admin": "a:1", "output": "done\n"});
        assert_eq!(
            render_log_level(&v),
            "n1: Envoy log level set to info (admin a:1)\n  done\n"
        );
    }

    #[test]
    fn compare() {
        let none = json!({"self": {"digest": "d1"}, "agree": null, "peers": []});
        assert_eq!(
            render_compare(&none),
            "self digest:  d1\npeers:        no peers configured (meshbridge run --peer URL or --peers-dns HOST:PORT)\n"
        );
        let v = json!({"self": {"digest": "d1"}, "agree": false, "peers": [
            {"peer": "http://b:9090", "digest": "d1", "agree": true, "error": null,
             "differences": {}},
            {"peer": "http://c:9090", "digest": "d2", "agree": false, "error": null,
             "differences": {"services_only_here": ["a"], "services_only_there": [],
                "services_changed": [{"name": "orders", "instances_only_here": ["10.0.0.1:80"],
                    "instances_only_there": [], "fields": ["mtls"]}],
                "access_only_here": [], "access_only_there": ["orders"], "access_changed": []}},
            {"peer": "http://d:9090", "digest": null, "agree": false,
             "error": "connection refused", "differences": {}},
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
        assert_eq!(render_compare(&v), expected);
        // More changed services than the peer detailed: the total is said.
        let mut many = v.clone();
        many["peers"][1]["differences"]["services_changed_count"] = json!(120);
        assert!(
            render_compare(&many).contains("  services changed: 120 (the first 1 below)\n"),
            "{}",
            render_compare(&many)
        );
    }

    #[test]
    fn sources() {
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
        assert_eq!(render_sources(&v, 1000), expected);
    }

    #[test]
    fn changes() {
        let v = json!([
            {"at": 995, "generation": 7, "services_added": ["a", "b", "c", "d"],
             "services_removed": [], "services_changed": ["orders"], "access_changed": [],
             "groups_rebuilt": 2, "groups_pushed": ["g1", "g2"], "build_ms": 0.5},
        ]);
        let expected = "\
AGE  GENERATION  ADDED             REMOVED  CHANGED  ACCESS  REBUILT  PUSHED  BUILD MS
5s   7           a, b, c, +1 more  -        orders   -       2        2       0.5
";
        assert_eq!(render_changes(&v, 1000), expected);
        assert_eq!(render_changes(&json!([]), 0), "no changes recorded\n");
    }

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
        assert_eq!(render_diff(&v), expected);
        assert_eq!(
            render(&CtlCommand::Diff { node: "x".into() }, &v, 0),
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
        assert_eq!(render_diff(&v), expected);
        let none = json!({"node": "n", "mode": "sotw", "in_sync": false, "types": []});
        assert_eq!(render_diff(&none), "n OUT OF SYNC\nnothing sent yet\n");
    }

    #[test]
    fn audit() {
        let v = json!([
            {"at": 990, "who": "alice", "action": "log-level", "node": "frontend-1",
             "detail": "http=warning",
             "result": "Envoy admin at 127.0.0.1:15000 is unreachable: connection refused"},
            {"at": 700, "who": null, "action": "log-level", "node": "frontend-1",
             "detail": "level=debug", "result": "ok"},
        ]);
        let expected = "\
AT         WHO    ACTION     NODE        DETAIL        RESULT
10s ago    alice  log-level  frontend-1  http=warning  Envoy admin at 127.0.0.1:15000 is unreachable: connection refused
5m00s ago  -      log-level  frontend-1  level=debug   ok
";
        assert_eq!(render_audit(&v, 1000), expected);
        assert_eq!(render_audit(&json!([]), 0), "no admin actions recorded\n");
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

    #[test]
    fn type_names() {
        assert_eq!(type_name(CDS), "cds");
        assert_eq!(type_name(EDS), "eds");
        assert_eq!(type_name(LDS), "lds");
        assert_eq!(type_name(RDS), "rds");
        assert_eq!(
            type_name("type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"),
            "Secret"
        );
    }
}
