//! Synthetic meshes for the benchmarks: `services` services with `instances` endpoints
//! each, every service depending on a few others, as MeshService manifests; every third
//! service `strict` mTLS, and every service protected by an AccessRule naming its callers
//! (half by name, some by glob, plus `"*"` on a health path).
#![allow(dead_code)]

use std::collections::BTreeSet;

use meshbridge::model::{DependencyTarget, ProxyGroup};

/// Name of service `i`.
pub fn service(i: usize) -> String {
    format!("svc-{i:04}")
}

/// Deterministic pseudo-random numbers (xorshift), so runs are comparable.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.max(1))
    }
    pub fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Manifests of the whole mesh, one multi-document YAML text.
pub fn manifests(services: usize, instances: usize) -> String {
    let mut rng = Rng::new(7);
    let mut out = String::new();
    for i in 0..services {
        let mtls = if i % 3 == 0 { "strict" } else { "permissive" };
        out.push_str(&format!(
            "---\napiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {{name: {}}}\nspec:\n  mtls: {mtls}\n  endpoints:\n",
            service(i)
        ));
        for j in 0..instances {
            let canary = if j == 0 && i % 10 == 0 {
                ", tags: [canary]"
            } else {
                ""
            };
            let dc = if j % 5 == 4 {
                ", datacenter: dc2"
            } else {
                ", datacenter: dc1"
            };
            out.push_str(&format!(
                "    - {{address: 10.{}.{}.{}, port: {}{canary}{dc}, weight: {}}}\n",
                i / 250,
                i % 250,
                j + 1,
                31000 + j,
                1 + rng.next(10)
            ));
        }
        out.push_str("  dependencies:\n");
        let deps: BTreeSet<usize> = (0..3).map(|_| rng.next(services)).collect();
        for d in deps {
            out.push_str(&format!(
                "    - service: {}\n      timeout: 2s\n",
                service(d)
            ));
        }
        out.push_str(&format!(
            "---\napiVersion: meshbridge.io/v1alpha1\nkind: AccessRule\nmetadata: {{name: {name}}}\nspec:\n  target: {name}\n  action: {}\n  rules:\n    - from: [{}, {}, \"svc-00*\"]\n      paths: [{{prefix: /api/}}]\n      methods: [GET, POST]\n    - from: [\"*\"]\n      paths: [{{exact: /health}}]\n",
            if i % 4 == 0 { "log" } else { "deny" },
            service(rng.next(services)),
            service(rng.next(services)),
            name = service(i),
        ));
    }
    out
}

/// The index holding [`manifests`], as a config directory fills it.
pub fn index(services: usize, instances: usize) -> meshbridge::index::Index {
    let objects =
        meshbridge::sources::files::parse_manifests("bench.yaml", &manifests(services, instances))
            .unwrap_or_else(|e| panic!("generated manifests are valid: {e:?}"));
    let mut index = meshbridge::index::Index::new();
    index.apply("config", "bench.yaml", objects);
    index
}

/// `groups` distinct proxy groups, one in ten depending on `"*"`.
pub fn groups(services: usize, groups: usize) -> Vec<ProxyGroup> {
    let mut rng = Rng::new(11);
    (0..groups)
        .map(|g| {
            // Every group calls svc-0000 (a shared dependency, like an auth service).
            let mut dependencies = BTreeSet::from([DependencyTarget::Service(service(0))]);
            if g % 10 == 0 {
                dependencies.insert(DependencyTarget::All);
            }
            for _ in 0..2 {
                dependencies.insert(DependencyTarget::Service(service(rng.next(services))));
            }
            ProxyGroup {
                service: service(g % services),
                ingress_port: Some(15000),
                ingress_host: None,
                app_port: Some(8080 + (g / services) as u16),
                egress_port: Some(15001),
                dependencies,
                ports: Default::default(),
                tls: g % 2 == 0,
                // Proxies of a fleet keep their certificates at the same paths.
                certificate_files: (g % 2 == 0).then(|| meshbridge::model::CertificateFiles {
                    cert: "/etc/meshbridge/tls/tls.crt".into(),
                    key: "/etc/meshbridge/tls/tls.key".into(),
                    ca: "/etc/meshbridge/tls/ca.crt".into(),
                }),
            }
        })
        .collect()
}

/// The side-by-side harness's population: `services` services `svc-<i>` with 5 instances and
/// no dependencies of their own, and `proxies` proxies of service `svc-<p mod services>`, one
/// in ten on `"*"`, the others on 5 random services. Returns the index and the groups.
pub fn harness_population(
    services: usize,
    proxies: usize,
) -> (meshbridge::index::Index, Vec<ProxyGroup>) {
    let mut text = String::new();
    for i in 0..services {
        text.push_str(&format!(
            "---\napiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {{name: svc-{i}}}\nspec:\n  endpoints:\n"
        ));
        for j in 0..5 {
            text.push_str(&format!(
                "    - {{address: 10.{}.{}.{}, port: 8080, weight: 1}}\n",
                (i >> 8) & 255,
                i & 255,
                j + 1
            ));
        }
    }
    let objects = meshbridge::sources::files::parse_manifests("harness.yaml", &text)
        .unwrap_or_else(|e| panic!("generated manifests are valid: {e:?}"));
    let mut index = meshbridge::index::Index::new();
    index.apply("config", "harness.yaml", objects);
    let mut rng = Rng::new(42);
    let groups = (0..proxies)
        .map(|p| ProxyGroup {
            service: format!("svc-{}", p % services),
            ingress_port: Some(15006),
            ingress_host: None,
            app_port: Some(8080),
            egress_port: Some(15001),
            dependencies: if rng.next(10) == 0 {
                BTreeSet::from([DependencyTarget::All])
            } else {
                (0..5)
                    .map(|_| DependencyTarget::Service(format!("svc-{}", rng.next(services))))
                    .collect()
            },
            ports: Default::default(),
            tls: false,
            certificate_files: None,
        })
        .collect();
    (index, groups)
}
