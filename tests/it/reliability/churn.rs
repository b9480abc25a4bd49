//! Propagation under churn: 1,000 instance changes over 60 s across 50 Consul services while
//! traffic flows to all of them through a real Envoy. No request fails; no request that
//! starts after Envoy has applied an instance's removal reaches that instance; and at the
//! end Envoy's clusters and `/api/services` hold exactly what Consul holds.
//!
//! "Applied" is read from Envoy itself: its admin `/clusters` is polled every 100 ms, and a
//! removal counts as applied from the first poll answered without the instance.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::consul_fake::Instance;
use crate::support::consul_mesh::ConsulMesh;
use crate::support::{Envoy, eventually, http_get};

const SERVICES: usize = 50;
/// Instance slots per service (each with its own backend); at least one is registered at
/// any time, so a service always has somewhere to go.
const SLOTS: usize = 4;
const CHANGES: usize = 1_000;
const CHURN: Duration = Duration::from_secs(60);
/// How long after the churn Envoy and the admin API must hold Consul's final state.
const SETTLE: Duration = Duration::from_secs(20);

fn service(s: usize) -> String {
    format!("svc-{s:02}")
}

fn slot(i: usize) -> String {
    format!("i{i}")
}

fn instance_id(s: usize, i: usize) -> String {
    format!("{}-{}", service(s), slot(i))
}

/// One request of the traffic: when it started, the service called, and which slot answered
/// (or why it failed).
struct Call {
    started: Instant,
    service: usize,
    answer: Result<usize, String>,
}

/// Calls every service in turn through `envoy` until `stop`, recording each call.
fn traffic(envoy: Arc<Envoy>, stop: Arc<Mutex<bool>>) -> tokio::task::JoinHandle<Vec<Call>> {
    tokio::spawn(async move {
        let mut calls = Vec::new();
        let mut s = 0;
        while !*stop.lock().unwrap() {
            let started = Instant::now();
            let answer = match envoy.call(&service(s), "/").await {
                Ok(r) if r.status == 200 => (0..SLOTS)
                    .find(|i| r.body.contains(&format!("{} {}", service(s), slot(*i))))
                    .ok_or_else(|| format!("answered by an unknown instance: {}", r.body)),
                Ok(r) => Err(format!("{} {}", r.status, r.body.trim())),
                Err(e) => Err(e.to_string()),
            };
            calls.push(Call {
                started,
                service: s,
                answer,
            });
            s = (s + 1) % SERVICES;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        calls
    })
}

/// Envoy's view: cluster → ports of its hosts.
type EnvoyView = BTreeMap<String, BTreeSet<u16>>;

async fn envoy_view(envoy: &Envoy) -> Option<EnvoyView> {
    let r = http_get(envoy.admin_addr(), "admin", "/clusters?format=json", &[])
        .await
        .ok()?;
    let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
    let mut out = EnvoyView::new();
    for c in v["cluster_statuses"].as_array()? {
        let ports = c["host_statuses"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["address"]["socket_address"]["port_value"].as_u64())
            .map(|p| p as u16)
            .collect();
        out.insert(c["name"].as_str()?.to_string(), ports);
    }
    Some(out)
}

/// Polls Envoy's clusters every 100 ms until `stop`; each view with the time it was answered.
fn watch_envoy(
    envoy: Arc<Envoy>,
    stop: Arc<Mutex<bool>>,
) -> tokio::task::JoinHandle<Vec<(Instant, EnvoyView)>> {
    tokio::spawn(async move {
        let mut views = Vec::new();
        while !*stop.lock().unwrap() {
            if let Some(view) = envoy_view(&envoy).await {
                views.push((Instant::now(), view));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        views
    })
}

/// What the test did to Consul: per (service, slot), the times it was registered and
/// deregistered, in order.
#[derive(Default)]
struct Changes {
    registered: BTreeMap<(usize, usize), bool>,
    removals: Vec<(usize, usize, Instant)>,
    additions: Vec<(usize, usize, Instant)>,
}

impl Changes {
    fn count(&self, s: usize) -> usize {
        (0..SLOTS)
            .filter(|i| self.registered.get(&(s, *i)) == Some(&true))
            .count()
    }

    /// Change `k`: slot `(k / SERVICES) % SLOTS` of service `k % SERVICES` is toggled,
    /// unless that would leave the service without an instance (then the next slot joins).
    fn apply(&mut self, k: usize, mesh: &ConsulMesh) {
        let s = k % SERVICES;
        let mut i = (k / SERVICES) % SLOTS;
        let on = self.registered.get(&(s, i)) == Some(&true);
        if on && self.count(s) == 1 {
            i = (i + 1) % SLOTS;
        }
        let on = self.registered.get(&(s, i)) == Some(&true);
        if on {
            mesh.consul.deregister("dc1", &instance_id(s, i));
            self.removals.push((s, i, Instant::now()));
        } else {
            mesh.consul.register(
                "dc1",
                Instance::new(
                    &service(s),
                    &instance_id(s, i),
                    "127.0.0.1",
                    mesh.port(&service(s), &slot(i)),
                ),
            );
            self.additions.push((s, i, Instant::now()));
        }
        self.registered.insert((s, i), !on);
    }
}

/// Calls answered by an instance after Envoy had applied its removal (and before it was
/// registered again).
fn late_calls(
    mesh: &ConsulMesh,
    changes: &Changes,
    views: &[(Instant, EnvoyView)],
    calls: &[Call],
) -> Vec<String> {
    let mut late = Vec::new();
    for (s, i, removed) in &changes.removals {
        let port = mesh.port(&service(*s), &slot(*i));
        let Some((applied, _)) = views.iter().find(|(at, view)| {
            at > removed
                && !view
                    .get(&service(*s))
                    .is_some_and(|ports| ports.contains(&port))
        }) else {
            continue;
        };
        let back = changes
            .additions
            .iter()
            .filter(|(s2, i2, at)| s2 == s && i2 == i && at > removed)
            .map(|(_, _, at)| *at)
            .min();
        late.extend(
            calls
                .iter()
                .filter(|c| {
                    c.service == *s
                        && c.answer == Ok(*i)
                        && c.started > *applied
                        && back.is_none_or(|b| c.started < b)
                })
                .map(|c| {
                    format!(
                        "{} answered {:?} after Envoy applied its removal",
                        instance_id(*s, *i),
                        c.started - *applied
                    )
                }),
        );
    }
    late
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_changes_in_a_minute_with_traffic_flowing() {
    let names: Vec<String> = (0..SERVICES).map(service).collect();
    let deps: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut builder = ConsulMesh::build("dc1");
    for s in 0..SERVICES {
        for i in 0..SLOTS {
            builder = builder.backend(&service(s), &slot(i));
        }
        // Two of four slots registered at the start.
        for i in 0..2 {
            builder = builder.register("dc1", &service(s), &slot(i), &instance_id(s, i));
        }
    }
    let mesh = builder.proxy(&deps).start().await;
    let envoy = mesh.envoy().clone();
    eventually(Duration::from_secs(30), "every service routed", || async {
        let view = envoy_view(&envoy).await?;
        (0..SERVICES)
            .all(|s| view.get(&service(s)).is_some_and(|p| p.len() == 2))
            .then_some(())
    })
    .await;
    let mut changes = Changes::default();
    for s in 0..SERVICES {
        for i in 0..2 {
            changes.registered.insert((s, i), true);
        }
    }

    let stop = Arc::new(Mutex::new(false));
    let calls = traffic(envoy.clone(), stop.clone());
    let views = watch_envoy(envoy.clone(), stop.clone());
    let started = Instant::now();
    for k in 0..CHANGES {
        tokio::time::sleep_until((started + CHURN * k as u32 / CHANGES as u32).into()).await;
        changes.apply(k, &mesh);
    }
    eprintln!("{CHANGES} changes made in {:?}", started.elapsed());

    // Consul's final state reaches Envoy and the admin API.
    let want: EnvoyView = (0..SERVICES)
        .map(|s| {
            let ports = (0..SLOTS)
                .filter(|i| changes.registered.get(&(s, *i)) == Some(&true))
                .map(|i| mesh.port(&service(s), &slot(i)))
                .collect();
            (service(s), ports)
        })
        .collect();
    let done = Instant::now();
    eventually(SETTLE, "Envoy holds Consul's final state", || async {
        let view = envoy_view(&envoy).await?;
        want.iter()
            .all(|(c, ports)| view.get(c) == Some(ports))
            .then_some(())
    })
    .await;
    eprintln!(
        "final state in Envoy {:?} after the last change",
        done.elapsed()
    );
    let services = mesh.cp.admin_json("/api/services").await;
    for (name, ports) in &want {
        let shown: BTreeSet<u16> = services
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name.as_str())
            .and_then(|v| v["instances"].as_array())
            .into_iter()
            .flatten()
            .filter_map(|i| i["port"].as_u64().map(|p| p as u16))
            .collect();
        assert_eq!(&shown, ports, "{name} in /api/services");
    }

    *stop.lock().unwrap() = true;
    let calls = calls.await.unwrap();
    let views = views.await.unwrap();
    let failed: Vec<&String> = calls
        .iter()
        .filter_map(|c| c.answer.as_ref().err())
        .collect();
    assert!(calls.len() > 1_000, "only {} calls", calls.len());
    assert!(
        failed.is_empty(),
        "{} of {} calls failed: {:?}",
        failed.len(),
        calls.len(),
        &failed[..failed.len().min(10)]
    );
    let mut applied: Vec<Duration> = changes
        .removals
        .iter()
        .filter_map(|(s, i, removed)| {
            let port = mesh.port(&service(*s), &slot(*i));
            views
                .iter()
                .find(|(at, view)| {
                    at > removed && !view.get(&service(*s)).is_some_and(|p| p.contains(&port))
                })
                .map(|(at, _)| *at - *removed)
        })
        .collect();
    applied.sort();
    if !applied.is_empty() {
        eprintln!(
            "removal applied by Envoy (100 ms polls): p50 {:?}, p99 {:?}, max {:?}",
            applied[applied.len() / 2],
            applied[applied.len() * 99 / 100],
            applied[applied.len() - 1]
        );
    }
    let late = late_calls(&mesh, &changes, &views, &calls);
    assert!(
        late.is_empty(),
        "{} late calls: {:?}",
        late.len(),
        &late[..late.len().min(10)]
    );
    eprintln!(
        "{} calls, none failed; {} removals, {} additions; {} views of Envoy",
        calls.len(),
        changes.removals.len(),
        changes.additions.len(),
        views.len()
    );
}
