//! `GET /api/migration`: the migration board — every service with where it runs (Consul or
//! static hosts, pods, both), its instances, mTLS coverage and live traffic share by origin
//! over the last minute of load reports, its migration and plan, and the dependency edges of
//! the mesh. One call gives the web UI's board page everything it draws.
//!
//! Built here from the model, the load book's window and the plans' status (pure); a
//! service's further ports (`NAME:PORT`) are counted with the service.

use std::collections::{BTreeMap, BTreeSet};

use axum::Json;
use axum::extract::State;

use super::AdminState;
use super::views::{
    BoardEdge, BoardOrigin, BoardService, BoardSummary, BoardView, MigrationView, PlanView,
};
use crate::load::{LoadCounts, LoadKey};
use crate::model::{MeshSettings, MeshState, Origin, access_target};

/// Most dependency edges the board lists (a `"*"` dependency of a gateway alone gives one per
/// service); beyond, `edges_left_out` counts the dependencies not listed (a pair reached
/// twice, e.g. through a service and its port, counts twice there).
pub const MAX_EDGES: usize = 10_000;

/// How long the board's traffic figures cover.
pub const WINDOW_SECONDS: u64 = 60;

/// Where a service runs, from the origins of its instances: `hosts` (Consul or static
/// endpoints: VMs, Mesos), `pods`, `both`, or `none`.
pub fn runs_on<'a>(origins: impl IntoIterator<Item = &'a Origin>) -> &'static str {
    let (mut hosts, mut pods) = (false, false);
    for o in origins {
        match o {
            Origin::Kubernetes => pods = true,
            Origin::Consul | Origin::Config => hosts = true,
        }
    }
    match (hosts, pods) {
        (true, true) => "both",
        (true, false) => "hosts",
        (false, true) => "pods",
        (false, false) => "none",
    }
}

/// A service's migration as the API shows it, with its plan's progress and standing order.
pub fn migration_view(
    m: &crate::model::Migration,
    (plan, order): (Option<PlanView>, Option<String>),
) -> MigrationView {
    MigrationView {
        to: m.to.to_string(),
        weight: m.weight,
        mirror: m.mirror,
        steps: m.steps.clone(),
        plan,
        order,
    }
}

/// The board: `load` holds the last minute's sums for every service (by key), `plans` the
/// progress and standing order of a service's plan.
pub fn board_view(
    state: &MeshState,
    settings: &MeshSettings,
    load: &BTreeMap<LoadKey, LoadCounts>,
    interval_seconds: f64,
    plans: impl Fn(&str) -> (Option<PlanView>, Option<String>),
) -> BoardView {
    // Live and mirrored traffic per (base service, origin).
    let mut live: BTreeMap<&str, BTreeMap<Origin, LoadCounts>> = BTreeMap::new();
    let mut mirrored: BTreeMap<&str, LoadCounts> = BTreeMap::new();
    for (k, c) in load {
        let base = access_target(&k.service);
        if k.mirror {
            mirrored.entry(base).or_default().add(c);
        } else {
            let by_origin = live.entry(base).or_default();
            by_origin.entry(k.origin).or_default().add(c);
        }
    }
    let no_traffic = BTreeMap::new();
    let mut services = Vec::new();
    let mut summary = BoardSummary::default();
    for s in state
        .services
        .values()
        .filter(|s| access_target(&s.name) == s.name)
    {
        let mut origins: BTreeMap<Origin, BoardOrigin> = BTreeMap::new();
        for e in &s.endpoints {
            let o = origins.entry(e.origin).or_default();
            o.instances += 1;
            o.healthy += usize::from(e.healthy);
            o.mtls += usize::from(crate::translate::clusters::calls_need_tls(s, e));
        }
        let traffic = live.get(s.name.as_str()).unwrap_or(&no_traffic);
        let total_live: u64 = traffic.values().map(|c| c.requests).sum();
        for (origin, c) in traffic {
            let o = origins.entry(*origin).or_default();
            o.requests = c.requests;
            o.successes = c.successes;
            o.errors = c.errors;
            o.error_rate = c.error_rate();
            o.share = (total_live > 0).then(|| c.requests as f64 / total_live as f64);
        }
        let runs = runs_on(
            origins
                .iter()
                .filter(|(_, o)| o.instances > 0)
                .map(|(k, _)| k),
        );
        summary.count(runs, s.migration.is_some(), origins.values());
        services.push(BoardService {
            migration: s
                .migration
                .as_ref()
                .map(|m| migration_view(m, plans(&s.name))),
            mirror: mirrored.get(s.name.as_str()).map(|c| BoardOrigin {
                requests: c.requests,
                successes: c.successes,
                errors: c.errors,
                error_rate: c.error_rate(),
                ..Default::default()
            }),
            mtls: super::mtls_name(s.mtls).to_string(),
            name: s.name.clone(),
            origins: origins
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            runs_on: runs.to_string(),
        });
    }
    let (edges, edges_left_out) = edges(state, settings);
    BoardView {
        edges,
        edges_left_out,
        interval_seconds,
        services,
        summary,
        window_seconds: WINDOW_SECONDS,
    }
}

impl BoardSummary {
    /// Counts one service that runs on `runs`, with instances by origin `origins`.
    fn count<'a>(
        &mut self,
        runs: &str,
        migrating: bool,
        origins: impl Iterator<Item = &'a BoardOrigin>,
    ) {
        self.services += 1;
        match runs {
            "hosts" => self.hosts += 1,
            "pods" => self.pods += 1,
            "both" => self.both += 1,
            _ => self.none += 1,
        }
        self.migrating += usize::from(migrating);
        for o in origins {
            self.instances += o.instances;
            self.mtls_instances += o.mtls;
        }
    }
}

/// Who calls whom, between services of the mesh (a port's dependency counts as one on its
/// service), as translation expands dependencies; at most [`MAX_EDGES`], and how many more.
fn edges(state: &MeshState, settings: &MeshSettings) -> (Vec<BoardEdge>, usize) {
    // Bounded while built: several `"*"` callers of a large mesh would otherwise hold
    // callers × services pairs at once.
    let mut set: BTreeSet<(&str, &str)> = BTreeSet::new();
    let mut left_out = 0;
    for s in state.services.values() {
        let from = access_target(&s.name);
        let allowed = settings.wildcard_allowed(&s.name);
        for d in &s.dependencies {
            for t in state.services_reached(&d.target, allowed) {
                let to = access_target(t);
                if to == from || !state.services.contains_key(to) || set.contains(&(from, to)) {
                    continue;
                }
                if set.len() < MAX_EDGES {
                    set.insert((from, to));
                } else {
                    left_out += 1;
                }
            }
        }
    }
    let edges = set
        .into_iter()
        .map(|(from, to)| BoardEdge {
            from: from.to_string(),
            to: to.to_string(),
        })
        .collect();
    (edges, left_out)
}

/// `GET /api/migration`.
pub async fn board(State(s): State<AdminState>) -> Json<BoardView> {
    let state = s.cache.state();
    let load = s.load.window(WINDOW_SECONDS, |_| true);
    let plans = |name: &str| {
        s.orders
            .as_ref()
            .map(|o| o.plan_of(name))
            .unwrap_or_default()
    };
    Json(board_view(
        &state,
        s.cache.settings(),
        &load,
        s.load.interval.as_secs_f64(),
        plans,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> MeshState {
        let yaml = "apiVersion: meshbridge.io/v1alpha1
kind: MeshService
metadata: {name: gateway}
spec:
  dependencies: [{service: \"*\"}]
---
apiVersion: meshbridge.io/v1alpha1
kind: MeshService
metadata: {name: orders}
spec:
  mtls: permissive
  dependencies: [{service: billing}, {service: \"billing:admin\"}, {service: ghost}]
  migration: {to: config, weight: 25, mirror: 10}
  endpoints:
    - {address: 10.0.0.1, port: 80, tags: [mtls]}
    - {address: 10.0.0.2, port: 80}
---
apiVersion: meshbridge.io/v1alpha1
kind: MeshService
metadata: {name: billing}
spec:
  mtls: strict
  ports: [{port: 80}, {name: admin, port: 81}]
  endpoints: [{address: 10.0.0.3, port: 80, ports: {admin: 81}}]
";
        let mut index = crate::index::Index::new();
        index.apply(
            "config",
            "mesh.yaml",
            crate::sources::files::parse_manifests("mesh.yaml", yaml)
                .unwrap_or_else(|e| panic!("{e:?}")),
        );
        index.state()
    }

    fn key(service: &str, origin: Origin, mirror: bool) -> LoadKey {
        LoadKey {
            service: service.into(),
            origin,
            datacenter: String::new(),
            mirror,
        }
    }

    #[test]
    fn the_board_shows_where_services_run_their_traffic_share_and_who_calls_whom() {
        let state = state();
        let settings = MeshSettings {
            allow_wildcard: vec!["gateway".into()],
            ..Default::default()
        };
        let counts = |requests, errors| LoadCounts {
            requests,
            successes: requests - errors,
            errors,
            failed_connections: 0,
        };
        let load = BTreeMap::from([
            (key("orders", Origin::Config, false), counts(30, 3)),
            (key("orders", Origin::Consul, false), counts(90, 0)),
            (key("orders", Origin::Config, true), counts(12, 1)),
            (key("billing", Origin::Config, false), counts(5, 0)),
            (key("billing:admin", Origin::Config, false), counts(5, 5)),
        ]);
        let v = board_view(&state, &settings, &load, 10.0, |_| (None, None));
        let names: Vec<&str> = v.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            names,
            ["billing", "gateway", "orders"],
            "ports are not services here"
        );
        let orders = &v.services[2];
        assert_eq!(orders.runs_on, "hosts");
        let config = &orders.origins["config"];
        assert_eq!((config.instances, config.mtls), (2, 1));
        assert_eq!(config.share, Some(0.25));
        assert_eq!(config.error_rate, Some(0.1));
        // Traffic to an origin without instances (they left within the minute) still shows.
        assert_eq!(orders.origins["consul"].instances, 0);
        assert_eq!(orders.origins["consul"].share, Some(0.75));
        assert_eq!(orders.mirror.as_ref().map(|m| m.requests), Some(12));
        assert_eq!(orders.migration.as_ref().map(|m| m.weight), Some(25));
        // A port's traffic counts with its service.
        let billing = &v.services[0];
        assert_eq!(billing.origins["config"].requests, 10);
        assert_eq!(billing.origins["config"].mtls, 1, "strict: every instance");
        assert_eq!(v.services[1].runs_on, "none");
        let edges: Vec<(&str, &str)> = v
            .edges
            .iter()
            .map(|e| (e.from.as_str(), e.to.as_str()))
            .collect();
        assert_eq!(
            edges,
            [
                ("gateway", "billing"),
                ("gateway", "orders"),
                ("orders", "billing")
            ],
            "one edge per pair, none to itself or to an unknown service"
        );
        assert_eq!(
            (v.summary.services, v.summary.hosts, v.summary.none),
            (3, 2, 1)
        );
        assert_eq!((v.summary.instances, v.summary.mtls_instances), (3, 2));
        assert_eq!(runs_on(&[Origin::Consul, Origin::Kubernetes]), "both");
        assert_eq!(runs_on(&[Origin::Kubernetes]), "pods");
    }

    #[test]
    fn edges_stop_at_the_bound_and_say_how_many_more() {
        // 101 services that each call every other: 10,100 edges.
        let yaml: String = (0..101)
            .map(|i| {
                format!(
                    "---\napiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {{name: s{i}}}\nspec: {{dependencies: [{{service: \"*\"}}]}}\n"
                )
            })
            .collect();
        let mut index = crate::index::Index::new();
        index.apply(
            "config",
            "mesh.yaml",
            crate::sources::files::parse_manifests("mesh.yaml", &yaml)
                .unwrap_or_else(|e| panic!("{e:?}")),
        );
        let settings = MeshSettings {
            allow_wildcard: vec!["*".into()],
            ..Default::default()
        };
        let v = board_view(&index.state(), &settings, &BTreeMap::new(), 10.0, |_| {
            (None, None)
        });
        assert_eq!((v.edges.len(), v.edges_left_out), (MAX_EDGES, 100));
    }
}
