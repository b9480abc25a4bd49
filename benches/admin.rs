//! What the admin API costs on a large mesh: 1,000 services × 5 instances, 500 proxy groups
//! and 5,000 connected proxies. The views are what the UI and `meshbridge ctl` fetch:
//! the services list, one service's page (which scans every connected proxy's snapshot for
//! dependents), the per-service digests a peer comparison reads, the migration board, and
//! `/metrics`.
// A bench reads its knobs from the environment and runs one scenario top to bottom.
#![allow(clippy::too_many_lines, clippy::disallowed_methods)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};

use meshbridge::admin::{self, AdminState};
use meshbridge::load::{LoadCounts, LoadKey};
use meshbridge::metrics::Metrics;
use meshbridge::model::{MeshSettings, Origin};
use meshbridge::sources::SourceStatuses;
use meshbridge::xds::cache::SnapshotCache;
use meshbridge::xds::registry::{ProxyRegistry, ProxyStatus};

#[path = "support/mesh_gen.rs"]
mod mesh_gen;

const SERVICES: usize = 1000;
const INSTANCES: usize = 5;
const GROUPS: usize = 500;
const PROXIES: usize = 5000;

fn bench(c: &mut Criterion) {
    let state = mesh_gen::index(SERVICES, INSTANCES).state();
    let settings = MeshSettings {
        allow_wildcard: vec!["*".into()],
        trust_domain: "mesh.local".into(),
        ..Default::default()
    };
    let cache = Arc::new(SnapshotCache::new(settings.clone()));
    let groups = mesh_gen::groups(SERVICES, GROUPS);
    // Streams subscribe before the state arrives, as proxies connected to a running
    // control plane would; the update then builds every group once.
    let _subscriptions: Vec<_> = groups.iter().map(|g| cache.subscribe(g)).collect();
    cache.update(state.clone());
    let registry = Arc::new(ProxyRegistry::default());
    for i in 0..PROXIES {
        let group = &groups[i % GROUPS];
        registry.register(ProxyStatus {
            node: format!("{}-{i}", group.service),
            service: group.service.clone(),
            group: group.id(),
            mode: "sotw",
            peer: Some(format!("10.0.{}.{}:40000", i / 250, i % 250)),
            identity: None,
            admin_port: Some(9901),
            diagnostics_port: None,
            admin: Some(format!("10.0.{}.{}:9901", i / 250, i % 250)),
            connected_at: 1_700_000_000,
            types: Default::default(),
            group_key: group.clone(),
        });
    }
    let metrics = Arc::new(Metrics::new());
    let s = AdminState::new(
        cache.clone(),
        registry,
        Arc::new(SourceStatuses::default()),
        metrics.clone(),
    );
    // The shared dependency every group calls: the widest dependents scan.
    let shared = mesh_gen::service(0);
    let detail = admin::service_detail(&s, &state, &shared);
    let dependents = detail.as_ref().map_or(0, |d| d.dependents.proxies.len());
    assert_eq!(
        dependents,
        PROXIES - PROXIES / GROUPS,
        "every proxy but {shared}'s own calls {shared}"
    );

    let mut g = c.benchmark_group("admin_1000x5_proxies_5000");
    g.sample_size(20);
    g.bench_function("services_list_json", |b| {
        b.iter(|| {
            let v = admin::services_view(&state, &settings);
            black_box(serde_json::to_vec(&v).map_or(0, |b| b.len()))
        })
    });
    g.bench_function("service_page_json_5000_dependent_proxies", |b| {
        b.iter(|| {
            let v = admin::service_detail(&s, &state, &shared);
            black_box(serde_json::to_vec(&v).map_or(0, |b| b.len()))
        })
    });
    g.bench_function("state_detail_digests", |b| {
        b.iter(|| {
            let v = admin::state_detail(&state, "bench");
            black_box(serde_json::to_vec(&v).map_or(0, |b| b.len()))
        })
    });
    g.bench_function("proxies_list_json", |b| {
        b.iter(|| {
            let list: Vec<admin::views::ProxyView> =
                s.registry.list().iter().map(Into::into).collect();
            black_box(serde_json::to_vec(&list).map_or(0, |b| b.len()))
        })
    });
    // The migration board: every service with a minute of load reports from two origins.
    let load: BTreeMap<LoadKey, LoadCounts> = (0..SERVICES)
        .flat_map(|i| {
            [Origin::Consul, Origin::Kubernetes].map(|origin| {
                let key = LoadKey {
                    service: mesh_gen::service(i),
                    origin,
                    datacenter: String::new(),
                    mirror: false,
                };
                let counts = LoadCounts {
                    requests: 100,
                    successes: 99,
                    errors: 1,
                    failed_connections: 0,
                };
                (key, counts)
            })
        })
        .collect();
    let board = || admin::board::board_view(&state, &settings, &load, 10.0, |_| (None, None));
    g.bench_function("migration_board_json", |b| {
        b.iter(|| black_box(serde_json::to_vec(&board()).map_or(0, |b| b.len())))
    });
    g.bench_function("metrics_render", |b| {
        b.iter(|| black_box(metrics.render().len()))
    });
    g.finish();
    let sizes = [
        (
            "services list",
            serde_json::to_vec(&admin::services_view(&state, &settings)).map_or(0, |b| b.len()),
        ),
        (
            "service page",
            serde_json::to_vec(&detail).map_or(0, |b| b.len()),
        ),
        (
            "migration board",
            serde_json::to_vec(&board()).map_or(0, |b| b.len()),
        ),
        (
            "state detail",
            serde_json::to_vec(&admin::state_detail(&state, "bench")).map_or(0, |b| b.len()),
        ),
    ];
    for (what, bytes) in sizes {
        println!("{what}: {} KiB of JSON", bytes / 1024);
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
