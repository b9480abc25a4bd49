//! Translate + encode for 1,000 services × 5 endpoints and 500 distinct proxy groups (10%
//! with `"*"`), against the floor: encoding the same resources once, without translating;
//! and what one endpoint change costs the snapshot cache with 5,000 groups connected.
// A bench reads its knobs from the environment and runs one scenario top to bottom.
#![allow(clippy::too_many_lines, clippy::disallowed_methods)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

use meshbridge::model::MeshSettings;
use meshbridge::snapshot;
use meshbridge::translate;
use meshbridge::xds::cache::SnapshotCache;

#[path = "support/mesh_gen.rs"]
mod mesh_gen;

const SERVICES: usize = 1000;
const INSTANCES: usize = 5;
const GROUPS: usize = 500;

fn bench(c: &mut Criterion) {
    let index = mesh_gen::index(SERVICES, INSTANCES);
    let state = index.state();
    let settings = MeshSettings {
        allow_wildcard: vec!["*".into()],
        datacenters: vec!["dc1".into(), "dc2".into()],
        trust_domain: "mesh.local".into(),
        external_ca_file: None,
        source_ip_identity: true,
        ..Default::default()
    };
    let groups = mesh_gen::groups(SERVICES, GROUPS);

    let mut g = c.benchmark_group("mesh_1000x5_groups_500");
    g.sample_size(10);
    g.bench_function("translate_and_encode", |b| {
        b.iter(|| {
            let mesh = snapshot::encode_mesh(&translate::mesh_resources(&state, &settings));
            let mut resources = 0;
            for group in &groups {
                let r = translate::group_resources(&state, &settings, group);
                let snap = snapshot::build(&mesh, &r).unwrap_or_else(|e| panic!("{e}"));
                resources += snap.len();
            }
            black_box(resources)
        })
    });

    // The floor: the same resources, already translated, encoded once each.
    let mesh_resources = translate::mesh_resources(&state, &settings);
    let group_resources: Vec<_> = groups
        .iter()
        .map(|g| translate::group_resources(&state, &settings, g))
        .collect();
    g.bench_function("encode_only_floor", |b| {
        b.iter(|| {
            let mesh = snapshot::encode_mesh(&mesh_resources);
            let mut n = mesh.clusters.len() + mesh.assignments.len();
            for r in &group_resources {
                for l in &r.listeners {
                    n += snapshot::encode(&l.name, l).body.value.len();
                }
                for rc in &r.routes {
                    n += snapshot::encode(&rc.name, rc).body.value.len();
                }
                for cl in &r.clusters {
                    n += snapshot::encode(&cl.name, cl).body.value.len();
                }
            }
            black_box(n)
        })
    });
    g.bench_function("translate_only_no_encode", |b| {
        b.iter(|| {
            let mesh = translate::mesh_resources(&state, &settings);
            let n: usize = groups
                .iter()
                .map(|g| {
                    translate::group_resources(&state, &settings, g)
                        .routes
                        .len()
                })
                .sum();
            black_box((mesh.clusters.len(), n))
        })
    });
    g.finish();

    let mut one = c.benchmark_group("single_change");
    one.sample_size(10);
    one.bench_function("index_build_state", |b| {
        b.iter(|| black_box(index.state().services.len()))
    });

    // One endpoint of one service moves, with 5,000 distinct groups connected (10% on "*"):
    // the cache rebuilds the groups that read that service, not the other thousands.
    let cache = SnapshotCache::new(settings.clone());
    let many = mesh_gen::groups(SERVICES, 5000);
    let _streams: Vec<_> = many.iter().map(|g| cache.subscribe(g)).collect();
    cache.update(state.clone());
    let mut moved = state.clone();
    let changed = mesh_gen::service(500);
    if let Some(s) = moved.services.get_mut(&changed) {
        s.endpoints[0].port += 1;
    }
    let states = [moved, state.clone()];
    let reads = many
        .iter()
        .filter(|g| {
            translate::group_reads(&state, &settings, g)
                .affected_by([&changed].into_iter(), std::iter::empty())
        })
        .count();
    let before = cache.builds_total();
    let report = cache.update(states[0].clone());
    eprintln!(
        "one endpoint of {changed} changed with {} groups connected: {} groups read it, {} built, {} pushed ({} builds counted)",
        report.connected,
        reads,
        report.groups,
        report.changed,
        cache.builds_total() - before,
    );
    cache.update(states[1].clone());
    let mut i = 0;
    one.bench_function("one_endpoint_5000_groups", |b| {
        b.iter(|| {
            i += 1;
            black_box(cache.update(states[i % 2].clone()).changed)
        })
    });

    // The side-by-side harness's population (every wildcard group shares one route): one
    // endpoint of svc-0 moves with 5,000 proxies' groups connected.
    let (index, groups) = mesh_gen::harness_population(SERVICES, 5000);
    let state = index.state();
    let cache = SnapshotCache::new(MeshSettings {
        allow_wildcard: vec!["*".into()],
        trust_domain: "mesh.local".into(),
        ..Default::default()
    });
    cache.update(state.clone());
    let _streams: Vec<_> = groups.iter().map(|g| cache.subscribe(g)).collect();
    let mut moved = state.clone();
    if let Some(s) = moved.services.get_mut("svc-0") {
        s.endpoints[0].port += 1;
    }
    let states = [moved, state];
    let report = cache.update(states[0].clone());
    eprintln!(
        "harness population: one endpoint of svc-0 changed with {} groups connected: {} built, {} pushed",
        report.connected, report.groups, report.changed,
    );
    cache.update(states[1].clone());
    let mut i = 0;
    one.bench_function("one_endpoint_harness_population_5000", |b| {
        b.iter(|| {
            i += 1;
            black_box(cache.update(states[i % 2].clone()).changed)
        })
    });
    one.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
