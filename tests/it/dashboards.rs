//! The Grafana dashboards in `charts/meshbridge/dashboards/`: each is valid dashboard JSON, and
//! every metric its queries name exists with the labels they use:
//! - `meshbridge_*` as meshbridge's registry declares it (`Metrics::new().render()`, with a
//!   child added to every family, since a family without one is left out of the output), with
//!   the labels [`MESHBRIDGE_LABELS`] declares; a running control plane with real Envoys
//!   connected confirms those labels for every metric it exports a sample of;
//! - `envoy_*` as a real Envoy 1.40 exports it on `/stats/prometheus`: one on a static
//!   configuration that mirrors meshbridge's names (service cluster, canary cluster, the
//!   ingress RBAC filter enforced and in log mode), and the Envoys the running control plane
//!   configures.
//!
//! Queries are read by a small PromQL tokenizer: enough to find metric names, label matchers,
//! grouping labels and the functions around a selector (counters must be read through
//! `rate`/`increase`, gauges must not).

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};
use support::fixtures::{AccessRule, MeshService, manifests};
use support::{Backend, ControlPlane, Envoy, EnvoyOptions, eventually, free_port, http_get};

use meshbridge::translate::names;

/// How long a wait for Envoy or meshbridge may take.
const LIMIT: Duration = Duration::from_secs(20);

/// Labels Prometheus adds to every series from its scrape target (the ServiceMonitor, or a
/// plain scrape configuration).
const TARGET_LABELS: &[&str] = &["instance", "job", "namespace", "pod"];

/// Grafana's own variables.
const GRAFANA_VARIABLES: &[&str] = &["__rate_interval", "__range", "__interval"];

/// The labels of each meshbridge metric the dashboards may use, by series name (counters with
/// `_total`, histograms by their base name). The registry does not list labels; a running
/// control plane confirms these for every metric it has samples of
/// ([`a_running_mesh_exports_what_the_dashboards_query`]).
const MESHBRIDGE_LABELS: &[(&str, &[&str])] = &[
    ("meshbridge_xds_streams", &["mode"]),
    ("meshbridge_xds_subscriptions", &["type", "mode"]),
    ("meshbridge_xds_refused_streams_total", &[]),
    ("meshbridge_xds_limited_total", &["limit"]),
    ("meshbridge_xds_identity_total", &["result"]),
    ("meshbridge_load_reports_total", &["result"]),
    ("meshbridge_migration_rollbacks_total", &[]),
    (
        "meshbridge_load_requests_total",
        &["service", "origin", "traffic"],
    ),
    (
        "meshbridge_load_errors_total",
        &["service", "origin", "traffic"],
    ),
    ("meshbridge_xds_responses_total", &["type", "mode"]),
    ("meshbridge_xds_sent_bytes_total", &["type"]),
    ("meshbridge_xds_acks_total", &["type"]),
    ("meshbridge_xds_nacks_total", &["type"]),
    ("meshbridge_xds_ack_seconds", &["type"]),
    ("meshbridge_snapshot_groups", &[]),
    ("meshbridge_snapshot_inconsistent_total", &[]),
    ("meshbridge_snapshot_build_seconds", &[]),
    ("meshbridge_snapshot_group_build_seconds", &[]),
    ("meshbridge_snapshot_group_pushes_total", &[]),
    ("meshbridge_debounce_batches_total", &[]),
    ("meshbridge_services", &[]),
    ("meshbridge_endpoints", &[]),
    ("meshbridge_config_errors", &[]),
    ("meshbridge_services_emptied_total", &[]),
    ("meshbridge_access_policies", &[]),
    ("meshbridge_access_unknown_callers", &[]),
    ("meshbridge_consul_requests_total", &["dc", "result"]),
    ("meshbridge_status_writes_total", &[]),
    ("meshbridge_leader", &[]),
    (
        "meshbridge_consul_registrations_total",
        &["operation", "result"],
    ),
    ("meshbridge_kube_pods", &[]),
    ("meshbridge_webhook_requests_total", &["path", "result"]),
    ("meshbridge_webhook_seconds", &[]),
    ("meshbridge_source_synced", &["source"]),
    ("meshbridge_source_staleness_seconds", &["source"]),
    ("meshbridge_source_errors_total", &["source"]),
    ("meshbridge_source_sync_seconds", &["source"]),
    ("meshbridge_index_objects", &["source"]),
    (
        "meshbridge_diagnostics_requests_total",
        &["action", "result"],
    ),
    ("meshbridge_peer_agree", &["peer"]),
    ("meshbridge_build_info", &["version"]),
    ("meshbridge_tasks_ended_total", &["task"]),
];

// ---------------------------------------------------------------------------------------
// The dashboards

fn dashboards_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("charts/meshbridge/dashboards")
}

/// Every dashboard file, parsed: file name → dashboard.
fn dashboards() -> BTreeMap<String, Value> {
    let found: BTreeMap<String, Value> = std::fs::read_dir(dashboards_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .map(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&p).unwrap();
            let parsed =
                serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"));
            (name, parsed)
        })
        .collect();
    assert_eq!(
        found.keys().collect::<Vec<_>>(),
        ["meshbridge-overview.json", "meshbridge-service.json"]
    );
    found
}

/// One PromQL query of a dashboard, with where it is and the legend it is shown with.
struct Query {
    place: String,
    expr: String,
    legend: String,
}

/// Every panel query of every dashboard.
fn panel_queries(dashboards: &BTreeMap<String, Value>) -> Vec<Query> {
    let mut out = Vec::new();
    for (file, d) in dashboards {
        for panel in d["panels"].as_array().unwrap() {
            for t in panel["targets"].as_array().into_iter().flatten() {
                out.push(Query {
                    place: format!("{file}: panel {:?} {}", panel["title"], t["refId"]),
                    expr: t["expr"].as_str().unwrap_or_default().to_string(),
                    legend: t["legendFormat"].as_str().unwrap_or_default().to_string(),
                });
            }
        }
    }
    out
}

/// `label_values(METRIC, LABEL)` of every query variable: (place, metric, label).
fn variable_queries(dashboards: &BTreeMap<String, Value>) -> Vec<(String, String, String)> {
    let pattern = regex::Regex::new(
        r"^label_values\(\s*([A-Za-z_:][A-Za-z0-9_:]*)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)$",
    )
    .unwrap();
    let mut out = Vec::new();
    for (file, d) in dashboards {
        for v in d["templating"]["list"].as_array().unwrap() {
            if v["type"] != "query" {
                continue;
            }
            let query = v["query"]["query"].as_str().unwrap();
            let place = format!("{file}: variable {}", v["name"]);
            let caps = pattern
                .captures(query)
                .unwrap_or_else(|| panic!("{place}: not label_values(metric, label): {query}"));
            out.push((place, caps[1].to_string(), caps[2].to_string()));
        }
    }
    out
}

/// The variables a text refers to (`$name`, `${name}`, `${name:format}`).
fn variables_in(text: &str) -> BTreeSet<String> {
    let pattern =
        regex::Regex::new(r"\$(?:\{([A-Za-z0-9_]+)(?::[a-z]+)?\}|([A-Za-z0-9_]+))").unwrap();
    pattern
        .captures_iter(text)
        .map(|c| c.get(1).or(c.get(2)).unwrap().as_str().to_string())
        .collect()
}

// ---------------------------------------------------------------------------------------
// A small PromQL reader

#[derive(Debug, Clone, PartialEq)]
struct Matcher {
    label: String,
    op: String,
    value: String,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str,
    Matchers(Vec<Matcher>),
    Range,
    Number,
    Variable,
    Open,
    Close,
    Comma,
    Operator,
}

/// Reads a quoted string starting at `chars[i]`; returns its value and the index after it.
fn read_string(chars: &[char], mut i: usize) -> (String, usize) {
    let quote = chars[i];
    i += 1;
    let mut value = String::new();
    while i < chars.len() && chars[i] != quote {
        if chars[i] == '\\' {
            i += 1;
            assert!(i < chars.len(), "dangling escape");
            assert!(
                matches!(chars[i], '\\' | '"' | '\'' | 'n' | 't'),
                "PromQL (Go) strings do not know the escape \\{}",
                chars[i]
            );
        }
        value.push(chars[i]);
        i += 1;
    }
    assert!(i < chars.len(), "unterminated string");
    (value, i + 1)
}

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

fn tokenize(expr: &str) -> Vec<Token> {
    let chars: Vec<char> = expr.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_space = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '(' => {
                out.push(Token::Open);
                i += 1;
            }
            ')' => {
                out.push(Token::Close);
                i += 1;
            }
            ',' => {
                out.push(Token::Comma);
                i += 1;
            }
            '"' | '\'' => {
                i = read_string(&chars, i).1;
                out.push(Token::Str);
            }
            '[' => {
                let end = chars[i..]
                    .iter()
                    .position(|c| *c == ']')
                    .expect("unclosed [");
                i += end + 1;
                out.push(Token::Range);
            }
            '{' => {
                i += 1;
                let mut matchers = Vec::new();
                loop {
                    skip_space(&mut i);
                    assert!(i < chars.len(), "unclosed {{");
                    if chars[i] == '}' {
                        i += 1;
                        break;
                    }
                    let start = i;
                    while i < chars.len() && is_ident(chars[i]) {
                        i += 1;
                    }
                    let label: String = chars[start..i].iter().collect();
                    assert!(!label.is_empty(), "a matcher without a label name");
                    skip_space(&mut i);
                    let op = ["=~", "!~", "!=", "="]
                        .into_iter()
                        .find(|op| chars[i..].starts_with(&op.chars().collect::<Vec<_>>()))
                        .unwrap_or_else(|| panic!("no matcher operator after {label}"));
                    i += op.len();
                    skip_space(&mut i);
                    let (value, next) = read_string(&chars, i);
                    i = next;
                    matchers.push(Matcher {
                        label,
                        op: op.to_string(),
                        value,
                    });
                    skip_space(&mut i);
                    if i < chars.len() && chars[i] == ',' {
                        i += 1;
                    }
                }
                out.push(Token::Matchers(matchers));
            }
            '$' => {
                i += 1;
                if chars.get(i) == Some(&'{') {
                    i += chars[i..]
                        .iter()
                        .position(|c| *c == '}')
                        .expect("unclosed ${")
                        + 1;
                } else {
                    while i < chars.len() && is_ident(chars[i]) {
                        i += 1;
                    }
                }
                out.push(Token::Variable);
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < chars.len() && is_ident(chars[i]) {
                    i += 1;
                }
                out.push(Token::Ident(chars[start..i].iter().collect()));
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
                out.push(Token::Number);
            }
            '+' | '-' | '*' | '/' | '%' | '^' | '=' | '!' | '<' | '>' => {
                while i < chars.len() && "+-*/%^=!<>".contains(chars[i]) {
                    i += 1;
                }
                out.push(Token::Operator);
            }
            other => panic!("unexpected {other:?} in {expr}"),
        }
    }
    out
}

/// Functions and aggregations the dashboards may call (a typo is an unknown function).
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "avg",
    "avg_over_time",
    "bottomk",
    "ceil",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count",
    "count_over_time",
    "delta",
    "deriv",
    "floor",
    "group",
    "histogram_quantile",
    "idelta",
    "increase",
    "irate",
    "max",
    "max_over_time",
    "min",
    "min_over_time",
    "quantile",
    "rate",
    "round",
    "sort",
    "sort_desc",
    "stddev",
    "sum",
    "sum_over_time",
    "time",
    "topk",
    "vector",
];
/// Functions whose argument must be a counter.
const COUNTER_FUNCTIONS: &[&str] = &["rate", "irate", "increase"];
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &["and", "or", "unless", "bool", "offset"];

/// One series selector of a query.
#[derive(Debug)]
struct Selector {
    metric: String,
    matchers: Vec<Matcher>,
    /// Directly inside `rate(`, `irate(` or `increase(`.
    in_counter_function: bool,
}

/// What a query reads.
#[derive(Debug, Default)]
struct Analysis {
    selectors: Vec<Selector>,
    /// Labels in `by (...)`: the labels the result keeps.
    by: BTreeSet<String>,
    /// Labels in `without`, `on`, `ignoring`, `group_left`, `group_right`.
    other_grouping: BTreeSet<String>,
}

fn analyse(expr: &str) -> Analysis {
    let tokens = tokenize(expr);
    let mut a = Analysis::default();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            Token::Ident(word) if GROUPING.contains(&word.as_str()) => {
                i += 1;
                if tokens.get(i) == Some(&Token::Open) {
                    i += 1;
                    while tokens.get(i) != Some(&Token::Close) {
                        match &tokens[i] {
                            Token::Ident(label) if word == "by" => {
                                a.by.insert(label.clone());
                            }
                            Token::Ident(label) => {
                                a.other_grouping.insert(label.clone());
                            }
                            Token::Comma => {}
                            other => panic!("{expr}: unexpected {other:?} in {word} (...)"),
                        }
                        i += 1;
                    }
                }
            }
            // A function call, or an aggregation with its grouping first (`sum by (x) (...)`).
            Token::Ident(word)
                if tokens.get(i + 1) == Some(&Token::Open)
                    || matches!(tokens.get(i + 1), Some(Token::Ident(g)) if g == "by" || g == "without") =>
            {
                assert!(
                    FUNCTIONS.contains(&word.as_str()),
                    "{expr}: unknown function {word}"
                );
            }
            Token::Ident(word) if KEYWORDS.contains(&word.as_str()) => {}
            Token::Ident(metric) => {
                let in_counter_function = i >= 2
                    && tokens[i - 1] == Token::Open
                    && matches!(
                        &tokens[i - 2],
                        Token::Ident(f) if COUNTER_FUNCTIONS.contains(&f.as_str())
                    );
                let matchers = match tokens.get(i + 1) {
                    Some(Token::Matchers(m)) => {
                        i += 1;
                        m.clone()
                    }
                    _ => Vec::new(),
                };
                a.selectors.push(Selector {
                    metric: metric.clone(),
                    matchers,
                    in_counter_function,
                });
            }
            Token::Matchers(_) => panic!("{expr}: a selector without a metric name"),
            _ => {}
        }
        i += 1;
    }
    a
}

/// The labels a legend shows (`{{label}}`).
fn legend_labels(legend: &str) -> BTreeSet<String> {
    let pattern = regex::Regex::new(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}").unwrap();
    pattern
        .captures_iter(legend)
        .map(|c| c[1].to_string())
        .collect()
}

#[test]
fn the_promql_reader_finds_metrics_labels_and_counters() {
    let a = analyse(
        r#"histogram_quantile(0.99, sum by (type, le) (rate(meshbridge_xds_ack_seconds_bucket{instance=~"$instance"}[$__rate_interval]))) / on (type) group_left max(meshbridge_xds_streams)"#,
    );
    assert_eq!(a.selectors.len(), 2);
    assert_eq!(a.selectors[0].metric, "meshbridge_xds_ack_seconds_bucket");
    assert!(a.selectors[0].in_counter_function);
    assert_eq!(
        a.selectors[0].matchers,
        [Matcher {
            label: "instance".into(),
            op: "=~".into(),
            value: "$instance".into()
        }]
    );
    assert_eq!(a.selectors[1].metric, "meshbridge_xds_streams");
    assert!(!a.selectors[1].in_counter_function);
    assert_eq!(a.by, BTreeSet::from(["type".into(), "le".into()]));
    assert_eq!(a.other_grouping, BTreeSet::from(["type".into()]));
    let a = analyse(r#"sum(increase(x_total[1h])) > 0 and y{a!="b", c!~'d'}"#);
    assert_eq!(
        a.selectors
            .iter()
            .map(|s| s.metric.as_str())
            .collect::<Vec<_>>(),
        ["x_total", "y"]
    );
    assert!(a.selectors[0].in_counter_function);
    assert_eq!(a.selectors[1].matchers.len(), 2);
    assert!(std::panic::catch_unwind(|| analyse("sum(rat(x_total[5m]))")).is_err());
    assert!(std::panic::catch_unwind(|| analyse(r#"x{a="\|"}"#)).is_err());
    assert_eq!(
        variables_in("${service:regex}([|]canary)? $instance $__rate_interval"),
        BTreeSet::from([
            "service".into(),
            "instance".into(),
            "__rate_interval".into()
        ])
    );
}

// ---------------------------------------------------------------------------------------
// What Prometheus would store

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    /// A `_bucket`, `_sum` or `_count` series of a histogram.
    Histogram,
    Untyped,
}

/// One series name as Prometheus stores it.
#[derive(Debug, Clone)]
struct Series {
    kind: Kind,
    /// The name [`MESHBRIDGE_LABELS`] uses: the series name, a histogram's family name.
    base: String,
    /// Label names (`le` for buckets); `None` when only declared labels are known and none are.
    labels: Option<BTreeSet<String>>,
    /// Every sample's labels, when read from a scrape.
    samples: Vec<BTreeMap<String, String>>,
}

type Catalog = BTreeMap<String, Series>;

/// `# TYPE name type` lines: family → type.
fn family_types(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut parts = l.split_whitespace();
            (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
            )
        })
        .collect()
}

/// The series a family of `kind` is stored as: (series name, kind, base name).
fn family_series(family: &str, kind: &str) -> Vec<(String, Kind, String)> {
    let one = |name: String, k: Kind| vec![(name.clone(), k, name)];
    match kind {
        "counter" => one(format!("{family}_total"), Kind::Counter),
        "gauge" => one(family.to_string(), Kind::Gauge),
        "info" => one(format!("{family}_info"), Kind::Gauge),
        "histogram" => ["_bucket", "_sum", "_count"]
            .iter()
            .map(|s| (format!("{family}{s}"), Kind::Histogram, family.to_string()))
            .collect(),
        _ => one(family.to_string(), Kind::Untyped),
    }
}

/// Parses `k="v",k2="v2"` (values may hold escaped quotes).
fn parse_labels(text: &str) -> BTreeMap<String, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = BTreeMap::new();
    let mut i = 0;
    while i < chars.len() {
        let eq = chars[i..].iter().position(|c| *c == '=').unwrap() + i;
        let key: String = chars[i..eq].iter().collect::<String>().trim().to_string();
        let (value, next) = read_string(&chars, eq + 1);
        out.insert(key.trim_start_matches(',').to_string(), value);
        i = next;
        while i < chars.len() && (chars[i] == ',' || chars[i].is_whitespace()) {
            i += 1;
        }
    }
    out
}

/// Every series of a scrape (Prometheus or OpenMetrics text), with its samples' labels.
fn scraped_catalog(text: &str) -> Catalog {
    let types = family_types(text);
    let mut by_series: BTreeMap<String, (Kind, String)> = BTreeMap::new();
    for (family, kind) in &types {
        for (name, k, base) in family_series(family, kind) {
            by_series.insert(name, (k, base));
        }
        // Prometheus text format: a counter's samples carry the family's own name.
        if kind == "counter" {
            by_series.insert(family.clone(), (Kind::Counter, family.clone()));
        }
    }
    let mut catalog = Catalog::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name, labels) = match line.find('{') {
            Some(open) => {
                let close = line.rfind('}').unwrap();
                (&line[..open], parse_labels(&line[open + 1..close]))
            }
            None => (line.split_whitespace().next().unwrap(), BTreeMap::new()),
        };
        let (kind, base) = by_series
            .get(name)
            .cloned()
            .unwrap_or((Kind::Untyped, name.to_string()));
        let series = catalog.entry(name.to_string()).or_insert(Series {
            kind,
            base,
            labels: Some(BTreeSet::new()),
            samples: Vec::new(),
        });
        series
            .labels
            .as_mut()
            .unwrap()
            .extend(labels.keys().cloned());
        series.samples.push(labels);
    }
    catalog
}

/// What meshbridge's registry holds: every metric of `Metrics::new()`, each family with one
/// child (of its typed label set) so that it is listed. A family missing here is missing from
/// the catalog: add it.
fn registered_metrics() -> String {
    use meshbridge::metrics::label::*;
    let m = meshbridge::metrics::Metrics::new();
    let (dc, source, peer) = (
        "dc1".to_string(),
        "config".to_string(),
        "http://peer".to_string(),
    );
    let _ = m
        .consul_requests
        .get_or_create(&DcResult { dc, result: "ok" });
    let source = Source { source };
    let _ = m.source_synced.get_or_create(&source);
    let _ = m.source_staleness_seconds.get_or_create(&source);
    let _ = m.source_errors.get_or_create(&source);
    let _ = m.source_sync_seconds.get_or_create(&source);
    let _ = m.index_objects.get_or_create(&source);
    let _ = m.peer_agree.get_or_create(&Peer { peer });
    let _ = m.tasks_ended.get_or_create(&Task { task: "publisher" });
    let load = ServiceOrigin {
        service: "orders".to_string(),
        origin: "consul".to_string(),
        traffic: "live",
    };
    let _ = m.load_requests.get_or_create(&load);
    let _ = m.load_errors.get_or_create(&load);
    // The other families' series are created by `Metrics::new()` itself.
    m.render()
}

/// meshbridge's series as its registry declares them (its `# TYPE` lines), with the labels of
/// [`MESHBRIDGE_LABELS`].
fn declared_meshbridge_catalog() -> Catalog {
    let text = registered_metrics();
    let declared: BTreeMap<&str, &[&str]> = MESHBRIDGE_LABELS.iter().copied().collect();
    // The table is what the dashboards rely on; the code's typed label sets must agree.
    for (name, series) in scraped_catalog(&text) {
        let mut in_code = series.labels.unwrap_or_default();
        in_code.remove("le");
        let table: BTreeSet<String> = declared
            .get(series.base.as_str())
            .map(|l| l.iter().map(|x| x.to_string()).collect())
            .unwrap_or_default();
        assert_eq!(
            in_code, table,
            "{name}: the code's label set differs from MESHBRIDGE_LABELS"
        );
    }
    let mut catalog = Catalog::new();
    for (family, kind) in family_types(&text) {
        for (name, k, base) in family_series(&family, &kind) {
            let labels = declared.get(base.as_str()).map(|labels| {
                let mut set: BTreeSet<String> = labels.iter().map(|l| l.to_string()).collect();
                if name.ends_with("_bucket") {
                    set.insert("le".to_string());
                }
                set
            });
            catalog.insert(
                name,
                Series {
                    kind: k,
                    base,
                    labels,
                    samples: Vec::new(),
                },
            );
        }
    }
    catalog
}

/// Whether one sample satisfies a matcher (PromQL regexes are anchored).
fn matches(sample: &BTreeMap<String, String>, m: &Matcher) -> bool {
    let value = sample.get(&m.label).map(String::as_str).unwrap_or("");
    let regex = || regex::Regex::new(&format!("^(?:{})$", m.value)).unwrap();
    match m.op.as_str() {
        "=" => value == m.value,
        "!=" => value != m.value,
        "=~" => regex().is_match(value),
        "!~" => !regex().is_match(value),
        other => panic!("unknown matcher {other}"),
    }
}

/// Substitutes the dashboards' variables with a value each (target labels are not checked).
fn substitute(value: &str, service: &str) -> String {
    value
        .replace("${service:regex}", &regex::escape(service))
        .replace("${service}", service)
        .replace("$service", service)
}

/// How queries are checked against scraped samples.
struct Live<'a> {
    /// Values of `$service` to try: each selector must match a sample for one of them
    /// (matchers on target labels aside).
    services: &'a [&'a str],
    /// Each `!=` / `!~` matcher must also exclude some sample (else it is a typo that
    /// excludes nothing): the scrape holds every value the dashboards exclude.
    negative_matchers_exclude: bool,
}

/// Everything wrong with the queries that read `prefix` metrics, checked against `catalog`,
/// and the metrics they read.
fn check_queries(
    dashboards: &BTreeMap<String, Value>,
    prefix: &str,
    catalog: &Catalog,
    live: Option<&Live<'_>>,
) -> (Vec<String>, BTreeSet<String>) {
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for q in panel_queries(dashboards) {
        let a = analyse(&q.expr);
        if !a.selectors.iter().any(|s| s.metric.starts_with(prefix)) {
            continue;
        }
        let mut available: BTreeSet<String> = TARGET_LABELS.iter().map(|l| l.to_string()).collect();
        for s in &a.selectors {
            assert!(
                s.metric.starts_with("meshbridge_") || s.metric.starts_with("envoy_"),
                "{}: {} is neither meshbridge's nor Envoy's",
                q.place,
                s.metric
            );
            if !s.metric.starts_with(prefix) {
                continue;
            }
            used.insert(s.metric.clone());
            let Some(series) = catalog.get(&s.metric) else {
                problems.push(format!(
                    "{}: no series {} (a meshbridge family must be touched in registered_metrics())",
                    q.place, s.metric
                ));
                continue;
            };
            let Some(labels) = &series.labels else {
                problems.push(format!(
                    "{}: the labels of {} are not declared in MESHBRIDGE_LABELS",
                    q.place, series.base
                ));
                continue;
            };
            available.extend(labels.iter().cloned());
            for m in &s.matchers {
                if !labels.contains(&m.label) && !TARGET_LABELS.contains(&m.label.as_str()) {
                    problems.push(format!(
                        "{}: {} has no label {} (it has {labels:?})",
                        q.place, s.metric, m.label
                    ));
                }
            }
            match (series.kind, s.in_counter_function) {
                (Kind::Counter | Kind::Histogram, false) => problems.push(format!(
                    "{}: {} is a counter, read it through rate() or increase()",
                    q.place, s.metric
                )),
                (Kind::Gauge, true) => problems.push(format!(
                    "{}: {} is a gauge, rate() or increase() of it means nothing",
                    q.place, s.metric
                )),
                _ => {}
            }
            if let Some(live) = live {
                let checked: Vec<&Matcher> = s
                    .matchers
                    .iter()
                    .filter(|m| !TARGET_LABELS.contains(&m.label.as_str()))
                    .collect();
                let for_service = |m: &Matcher, service: &str| Matcher {
                    value: substitute(&m.value, service),
                    ..m.clone()
                };
                let found = live.services.iter().any(|service| {
                    series.samples.iter().any(|sample| {
                        checked
                            .iter()
                            .all(|m| matches(sample, &for_service(m, service)))
                    })
                });
                if !found {
                    problems.push(format!(
                        "{}: no sample of {} matches {:?} for $service in {:?}",
                        q.place, s.metric, s.matchers, live.services
                    ));
                }
                for m in checked.iter().filter(|m| m.op.starts_with('!')) {
                    let excludes = live.services.iter().any(|service| {
                        series
                            .samples
                            .iter()
                            .any(|sample| !matches(sample, &for_service(m, service)))
                    });
                    if live.negative_matchers_exclude && !excludes {
                        problems.push(format!(
                            "{}: {}{}{:?} excludes no sample of {}",
                            q.place, m.label, m.op, m.value, s.metric
                        ));
                    }
                }
            }
        }
        for label in a.by.iter().chain(&a.other_grouping) {
            if !available.contains(label) {
                problems.push(format!(
                    "{}: groups by {label}, which none of its metrics carries",
                    q.place
                ));
            }
        }
        let shown = if a.by.is_empty() { &available } else { &a.by };
        for label in legend_labels(&q.legend) {
            if !shown.contains(&label) && !TARGET_LABELS.contains(&label.as_str()) {
                problems.push(format!(
                    "{}: the legend shows {label}, which the result does not carry",
                    q.place
                ));
            }
        }
    }
    for (place, metric, label) in variable_queries(dashboards) {
        if !metric.starts_with(prefix) {
            continue;
        }
        used.insert(metric.clone());
        match catalog.get(&metric).map(|s| &s.labels) {
            None => problems.push(format!("{place}: no series {metric}")),
            Some(None) => problems.push(format!("{place}: labels of {metric} not declared")),
            Some(Some(labels)) => {
                if !labels.contains(&label) && !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!("{place}: {metric} has no label {label}"));
                }
            }
        }
    }
    (problems, used)
}

// ---------------------------------------------------------------------------------------
// The dashboards' structure

/// Panel types the dashboards use (all built into Grafana).
const PANEL_TYPES: &[&str] = &[
    "row",
    "stat",
    "timeseries",
    "table",
    "text",
    "state-timeline",
];

#[test]
fn every_dashboard_is_grafana_dashboard_json() {
    let dashboards = dashboards();
    let mut uids = BTreeSet::new();
    for (file, d) in &dashboards {
        let uid = d["uid"].as_str().unwrap();
        assert_eq!(
            Some(uid),
            file.strip_suffix(".json"),
            "{file}: a stable uid, the file's name"
        );
        assert!(
            uid.len() <= 40,
            "{file}: Grafana uids are at most 40 characters"
        );
        assert!(uids.insert(uid.to_string()), "{file}: uid {uid} used twice");
        assert!(
            d["title"]
                .as_str()
                .is_some_and(|t| t.starts_with("meshbridge")),
            "{file}"
        );
        let schema = d["schemaVersion"].as_u64().unwrap();
        assert!(
            (36..=41).contains(&schema),
            "{file}: schemaVersion {schema}"
        );
        assert!(
            d["id"].is_null(),
            "{file}: a provisioned dashboard has no id"
        );
        assert!(d["tags"].as_array().unwrap().contains(&"meshbridge".into()));

        // Variables: a Prometheus data source, then queries on it.
        let variables = d["templating"]["list"].as_array().unwrap();
        let datasource = &variables[0];
        assert_eq!(datasource["name"], "datasource", "{file}");
        assert_eq!(datasource["type"], "datasource", "{file}");
        assert_eq!(datasource["query"], "prometheus", "{file}");
        let mut defined: BTreeSet<String> =
            GRAFANA_VARIABLES.iter().map(|v| v.to_string()).collect();
        for v in variables {
            assert!(
                defined.insert(v["name"].as_str().unwrap().to_string()),
                "{file}: variable {} twice",
                v["name"]
            );
            if v["type"] == "query" {
                assert_eq!(v["datasource"]["uid"], "${datasource}", "{file}: {v}");
                assert_eq!(v["definition"], v["query"]["query"], "{file}: {v}");
            }
        }
        let expected = if uid == "meshbridge-overview" {
            "instance"
        } else {
            "service"
        };
        assert!(
            defined.contains(expected),
            "{file}: no ${expected} variable"
        );

        // Panels: unique ids, on the 24-column grid, not overlapping.
        let panels = d["panels"].as_array().unwrap();
        assert!(panels.len() > 5, "{file}");
        let mut ids = BTreeSet::new();
        let mut boxes: Vec<(u64, u64, u64, u64, String)> = Vec::new();
        for p in panels {
            let title = p["title"].as_str().unwrap().to_string();
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{file}: {title}: no id"));
            assert!(ids.insert(id), "{file}: panel id {id} used twice ({title})");
            let ty = p["type"].as_str().unwrap();
            assert!(PANEL_TYPES.contains(&ty), "{file}: {title}: type {ty}");
            let g = &p["gridPos"];
            let [x, y, w, h] = ["x", "y", "w", "h"].map(|k| {
                g[k].as_u64()
                    .unwrap_or_else(|| panic!("{file}: {title}: gridPos.{k}"))
            });
            assert!(w >= 1 && h >= 1 && x + w <= 24, "{file}: {title}: {g}");
            for (bx, by, bw, bh, other) in &boxes {
                let apart = x + w <= *bx || bx + bw <= x || y + h <= *by || by + bh <= y;
                assert!(apart, "{file}: {title} overlaps {other}");
            }
            boxes.push((x, y, w, h, title.clone()));
            for text in [&p["title"], &p["description"]] {
                for v in variables_in(text.as_str().unwrap_or_default()) {
                    assert!(defined.contains(&v), "{file}: {title}: ${v} is not defined");
                }
            }
            if ty == "row" {
                assert!(p.get("targets").is_none(), "{file}: row {title}");
                assert_eq!(
                    p["collapsed"], false,
                    "{file}: row {title}: its panels follow it"
                );
                continue;
            }
            assert_eq!(
                p["datasource"],
                json!({"type": "prometheus", "uid": "${datasource}"}),
                "{file}: {title}"
            );
            let targets = p["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{file}: {title}"));
            assert!(!targets.is_empty(), "{file}: {title}: no query");
            let mut ref_ids = BTreeSet::new();
            for t in targets {
                let expr = t["expr"].as_str().unwrap_or_default();
                assert!(
                    !expr.trim().is_empty(),
                    "{file}: {title}: a target without expr"
                );
                let ref_id = t["refId"].as_str().unwrap();
                assert!(
                    ref_ids.insert(ref_id),
                    "{file}: {title}: refId {ref_id} twice"
                );
                assert_eq!(t["datasource"], p["datasource"], "{file}: {title}");
                for v in variables_in(expr) {
                    assert!(defined.contains(&v), "{file}: {title}: ${v} is not defined");
                }
                // Parses, names its metrics.
                assert!(
                    !analyse(expr).selectors.is_empty(),
                    "{file}: {title}: {expr}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// meshbridge's metrics

#[test]
fn every_meshbridge_metric_the_dashboards_query_is_registered_with_those_labels() {
    let dashboards = dashboards();
    let catalog = declared_meshbridge_catalog();
    // The table of labels names only registered metrics.
    let bases: BTreeSet<&str> = catalog.values().map(|s| s.base.as_str()).collect();
    for (name, _) in MESHBRIDGE_LABELS {
        assert!(
            bases.contains(name),
            "MESHBRIDGE_LABELS names {name}, which Metrics::new() does not register: {bases:?}"
        );
    }
    let (problems, used) = check_queries(&dashboards, "meshbridge_", &catalog, None);
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // The overview reads the metrics it is about.
    for metric in [
        "meshbridge_xds_streams",
        "meshbridge_xds_subscriptions",
        "meshbridge_xds_responses_total",
        "meshbridge_snapshot_group_pushes_total",
        "meshbridge_xds_sent_bytes_total",
        "meshbridge_xds_ack_seconds_bucket",
        "meshbridge_snapshot_build_seconds_bucket",
        "meshbridge_snapshot_group_build_seconds_bucket",
        "meshbridge_debounce_batches_total",
        "meshbridge_xds_nacks_total",
        "meshbridge_source_synced",
        "meshbridge_source_staleness_seconds",
        "meshbridge_source_errors_total",
        "meshbridge_source_sync_seconds_bucket",
        "meshbridge_consul_requests_total",
        "meshbridge_services",
        "meshbridge_endpoints",
        "meshbridge_index_objects",
        "meshbridge_webhook_requests_total",
        "meshbridge_webhook_seconds_bucket",
        "meshbridge_consul_registrations_total",
        "meshbridge_leader",
        "meshbridge_peer_agree",
        "meshbridge_build_info",
    ] {
        assert!(used.contains(metric), "no panel shows {metric}");
    }
}

// ---------------------------------------------------------------------------------------
// Envoy's metrics

/// `/stats/prometheus` of an Envoy.
async fn envoy_scrape(admin: SocketAddr) -> String {
    let r = http_get(admin, "localhost", "/stats/prometheus", &[])
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

/// A counter's value in a scrape, for the sample with exactly these labels.
fn sample_value(scrape: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let line = scrape.lines().find(|l| {
        l.starts_with(&format!("{name}{{"))
            && l.find('{').zip(l.rfind('}')).is_some_and(|(o, c)| {
                let found = parse_labels(&l[o + 1..c]);
                found.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| found.get(*k).map(String::as_str) == Some(v))
            })
    })?;
    line.rsplit(' ').next()?.parse().ok()
}

/// A static Envoy shaped like a meshbridge proxy: an egress routing to the service cluster
/// `orders` (and `orders|canary` for `x-canary`), whose endpoint is this Envoy's own ingress
/// for `orders` (`/fail` answers 503): RBAC enforced, stats prefixed `<target>.` as meshbridge
/// writes them. A second ingress, for `billing`, runs its rules in log mode (shadow rules).
fn static_bootstrap(admin: u16, egress: u16, orders: u16, billing: u16) -> String {
    let cluster = names::service_cluster("orders");
    let canary = names::canary_cluster("orders");
    let hcm = "envoy.filters.network.http_connection_manager";
    let hcm_type = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
    let router = "{name: envoy.filters.http.router, typed_config: {'@type': type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}";
    let rbac_type = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
    let ingress = names::INGRESS_LISTENER;
    let egress_name = names::EGRESS_LISTENER;
    let ingress_listener = |name: &str, port: u16, rbac: String| {
        format!(
            "
  - name: {ingress}-{name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
    - filters:
      - name: {hcm}
        typed_config:
          '@type': {hcm_type}
          stat_prefix: {ingress}
          route_config:
            virtual_hosts:
            - name: local
              domains: ['*']
              routes:
              - {{match: {{path: /fail}}, direct_response: {{status: 503, body: {{inline_string: failed}}}}}}
              - {{match: {{prefix: /}}, direct_response: {{status: 200, body: {{inline_string: ok}}}}}}
          http_filters:
          - name: envoy.filters.http.rbac
            typed_config: {rbac}
          - {router}"
        )
    };
    let policy = "{action: ALLOW, policies: {rule-0: {permissions: [{url_path: {path: {prefix: /}}}], principals: [{any: true}]}}}";
    let cluster_yaml = |name: &str| {
        format!(
            "
  - name: '{name}'
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: '{name}'
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {orders}}}}}}}}}]}}]"
        )
    };
    format!(
        "admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: {egress_name}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {egress}}}}}
    filter_chains:
    - filters:
      - name: {hcm}
        typed_config:
          '@type': {hcm_type}
          stat_prefix: {egress_name}
          route_config:
            virtual_hosts:
            - name: orders
              domains: ['*']
              routes:
              - {{match: {{prefix: /, headers: [{{name: x-canary, present_match: true}}]}}, route: {{cluster: '{canary}'}}}}
              - {{match: {{prefix: /}}, route: {{cluster: '{cluster}'}}}}
          http_filters:
          - {router}
{}
{}
  clusters:
{}
{}
",
        ingress_listener(
            "orders",
            orders,
            format!("{{'@type': {rbac_type}, rules_stat_prefix: orders., rules: {policy}}}")
        ),
        ingress_listener(
            "billing",
            billing,
            format!(
                "{{'@type': {rbac_type}, shadow_rules_stat_prefix: billing., shadow_rules: {policy}}}"
            )
        ),
        cluster_yaml(&cluster),
        cluster_yaml(&canary),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_envoy_metric_the_dashboards_query_is_exported_by_a_real_envoy() {
    let [admin, egress, orders, billing] = [(); 4].map(|_| free_port());
    let envoy = Envoy::start_static(
        "dashboards",
        &static_bootstrap(admin, egress, orders, billing),
        admin,
    )
    .await;
    let egress_addr = SocketAddr::from(([127, 0, 0, 1], egress));
    for headers in [&[][..], &[("x-canary", "1")][..], &[][..]] {
        let r = eventually(LIMIT, "a call through the static Envoy", || async {
            http_get(egress_addr, "orders", "/", headers)
                .await
                .ok()
                .filter(|r| r.status == 200)
        })
        .await;
        assert_eq!(r.body, "ok");
    }
    // A 5xx, which the success rate excludes.
    let failed = http_get(egress_addr, "orders", "/fail", &[]).await.unwrap();
    assert_eq!(failed.status, 503, "{}", failed.body);
    let billing_addr = SocketAddr::from(([127, 0, 0, 1], billing));
    let r = http_get(billing_addr, "billing", "/", &[]).await.unwrap();
    assert_eq!(r.status, 200);

    let cluster = names::service_cluster("orders");
    let canary = names::canary_cluster("orders");
    let scrape = eventually(LIMIT, "the requests in Envoy's stats", || async {
        let scrape = envoy_scrape(envoy.admin_addr()).await;
        let counted = |c: &str| {
            sample_value(
                &scrape,
                "envoy_cluster_upstream_rq_total",
                &[("envoy_cluster_name", c)],
            )
            .is_some_and(|v| v >= 1.0)
        };
        (counted(&cluster) && counted(&canary)).then_some(scrape)
    })
    .await;
    assert!(
        sample_value(
            &scrape,
            "envoy_http_rbac_allowed",
            &[
                ("envoy_rbac_http_prefix", "orders"),
                ("envoy_http_conn_manager_prefix", names::INGRESS_LISTENER)
            ]
        )
        .is_some_and(|v| v >= 3.0),
        "the RBAC decisions are counted per target:\n{}",
        scrape
            .lines()
            .filter(|l| l.contains("rbac"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    let catalog = scraped_catalog(&scrape);
    let live = Live {
        services: &["orders", "billing"],
        negative_matchers_exclude: true,
    };
    let (problems, used) = check_queries(&dashboards(), "envoy_", &catalog, Some(&live));
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    // A service's traffic is its cluster's and its canary cluster's: every regex on the
    // cluster name selects both, named as meshbridge names them; an exact one the first.
    for q in panel_queries(&dashboards()) {
        for s in analyse(&q.expr).selectors {
            for m in s
                .matchers
                .iter()
                .filter(|m| m.label == "envoy_cluster_name")
            {
                let m = Matcher {
                    value: substitute(&m.value, "orders"),
                    ..m.clone()
                };
                let selects = |name: &str| {
                    matches(
                        &BTreeMap::from([("envoy_cluster_name".to_string(), name.to_string())]),
                        &m,
                    )
                };
                assert!(selects(&cluster), "{}: {m:?}", q.place);
                assert!(
                    selects(&canary) == (m.op == "=~"),
                    "{}: {m:?} and {canary}",
                    q.place
                );
                assert!(!selects(names::LOCAL_APP_CLUSTER), "{}: {m:?}", q.place);
                assert!(!selects("orders-v2"), "{}: {m:?}", q.place);
            }
        }
    }
    for metric in [
        "envoy_cluster_upstream_rq_total",
        "envoy_cluster_upstream_rq_xx",
        "envoy_cluster_upstream_rq_time_bucket",
        "envoy_cluster_membership_healthy",
        "envoy_cluster_upstream_cx_active",
        "envoy_http_rbac_allowed",
        "envoy_http_rbac_denied",
        "envoy_http_rbac_shadow_denied",
    ] {
        assert!(used.contains(metric), "no panel shows {metric}");
    }
}

// ---------------------------------------------------------------------------------------
// A running mesh

/// frontend calls orders (one canary instance, every call allowed by an enforced rule) and
/// billing (a rule in log mode that allows nobody).
fn mesh(orders_ingress: u16, billing_ingress: u16) -> String {
    let frontend = MeshService::build("frontend")
        .dependency("orders")
        .dependency("billing");
    let orders =
        MeshService::build("orders").tagged_endpoint("127.0.0.1", orders_ingress, &["canary"]);
    let billing = MeshService::build("billing").endpoint("127.0.0.1", billing_ingress);
    let orders_rule = AccessRule::build("orders")
        .target("orders")
        .action("deny")
        .allow_with(json!({"from": ["*"], "paths": [{"prefix": "/"}]}));
    let billing_rule = AccessRule::build("billing")
        .target("billing")
        .action("log")
        .allow(&["nobody"]);
    manifests(&[&frontend, &orders, &billing, &orders_rule, &billing_rule])
}

/// The real binary with real Envoys (a caller, `orders` with an enforced AccessRule, `billing`
/// with one in log mode): every meshbridge metric it has samples of carries exactly the labels
/// [`MESHBRIDGE_LABELS`] declares, and the dashboards' Envoy queries select the series of the
/// Envoys meshbridge configured, named as meshbridge names them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_mesh_exports_what_the_dashboards_query() {
    let orders_app = Backend::start("orders", "a").await;
    let billing_app = Backend::start("billing", "a").await;
    let (orders_ingress, billing_ingress) = (free_port(), free_port());
    let cp = ControlPlane::start(&mesh(orders_ingress, billing_ingress), &[]).await;
    let callee = |service: &str, port: u16, app: &Backend| EnvoyOptions {
        service: service.into(),
        ingress_port: Some(port),
        app_port: Some(app.port),
        ..Default::default()
    };
    let orders = Envoy::start(&cp, callee("orders", orders_ingress, &orders_app)).await;
    let billing = Envoy::start(&cp, callee("billing", billing_ingress, &billing_app)).await;
    let frontend = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "frontend".into(),
            egress: true,
            dependencies: vec!["orders".into(), "billing".into()],
            ..Default::default()
        },
    )
    .await;
    for host in ["orders", "billing"] {
        let r = frontend
            .wait_call(host, &format!("{host} reached"), |r| r.status == 200)
            .await;
        assert!(
            r.body.starts_with(&format!("hello from {host}")),
            "{}",
            r.body
        );
    }
    let canary = http_get(frontend.egress_addr(), "orders", "/", &[("x-canary", "1")])
        .await
        .unwrap();
    assert_eq!(canary.status, 200, "{}", canary.body);
    // A manifest meshbridge rejects (its last good state stays), for the error metrics.
    cp.write_file(
        "broken.yaml",
        "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: broken}\nspec: {endpoints: [{address: 127.0.0.1, port: 70000}]}\n",
    );

    // meshbridge: every type ACKed, the broken file counted.
    let metrics = eventually(
        LIMIT,
        "ACKs of every type and the rejected file",
        || async {
            let text = cp.metrics().await;
            // Types some proxy ACKed (every series exists from the start, at zero); the
            // proxies here hold no certificate, so they ask for no secret (sds).
            let acked: BTreeSet<String> = text
                .lines()
                .filter(|l| l.starts_with("meshbridge_xds_acks_total{"))
                .filter(|l| {
                    l.rsplit(' ')
                        .next()
                        .and_then(|v| v.parse::<f64>().ok())
                        .is_some_and(|v| v > 0.0)
                })
                .filter_map(|l| {
                    let rest = &l[l.find("type=\"")? + 6..];
                    Some(rest[..rest.find('"')?].to_string())
                })
                .collect();
            let rejected = text.lines().any(|l| l == "meshbridge_config_errors 1");
            let want = ["cds", "eds", "lds", "rds"].map(String::from);
            (want.iter().all(|t| acked.contains(t)) && rejected).then_some(text)
        },
    )
    .await;
    let live = scraped_catalog(&metrics);
    let declared: BTreeMap<&str, &[&str]> = MESHBRIDGE_LABELS.iter().copied().collect();
    let mut problems = Vec::new();
    let mut confirmed = BTreeSet::new();
    for (name, series) in &live {
        let Some(labels) = declared.get(series.base.as_str()) else {
            continue;
        };
        let declared: BTreeSet<&str> = labels.iter().copied().collect();
        for sample in &series.samples {
            let found: BTreeSet<&str> = sample
                .keys()
                .map(String::as_str)
                .filter(|k| *k != "le")
                .collect();
            if found != declared {
                problems.push(format!("{name}: labels {found:?}, declared {declared:?}"));
            }
        }
        confirmed.insert(series.base.clone());
    }
    assert!(problems.is_empty(), "{}\n{metrics}", problems.join("\n"));
    for must in [
        "meshbridge_xds_streams",
        "meshbridge_xds_responses_total",
        "meshbridge_xds_acks_total",
        "meshbridge_services",
        "meshbridge_leader",
    ] {
        assert!(confirmed.contains(must), "{must} has no sample:\n{metrics}");
    }
    let unconfirmed: Vec<&str> = MESHBRIDGE_LABELS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| !confirmed.contains(*n))
        .collect();
    eprintln!(
        "labels confirmed by the running mesh: {confirmed:?}; declared only: {unconfirmed:?}"
    );

    // Envoy: the dashboards' selectors find the series of the Envoys meshbridge configured.
    let mut scrape = String::new();
    for envoy in [&frontend, &orders, &billing] {
        scrape.push_str(&envoy_scrape(envoy.admin_addr()).await);
    }
    // The apps answer 200 only: no 5xx to exclude here.
    let live = Live {
        services: &["orders", "billing"],
        negative_matchers_exclude: false,
    };
    let (problems, _) = check_queries(
        &dashboards(),
        "envoy_",
        &scraped_catalog(&scrape),
        Some(&live),
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
