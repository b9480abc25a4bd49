//! `ctl services` and `ctl services NAME`: the services of the model, and one service with
//! its instances, dependents and access policy.

use std::fmt::Write as _;

use super::access::render_access;
use super::{Table, fields, indent, list, opt, yes_no};
use crate::admin::views::{BucketView, InstanceView, RateLimitView, ServiceDetail, ServiceView};

/// `ctl services`: one line per service.
pub fn render_services(services: &[ServiceView]) -> String {
    if services.is_empty() {
        return "no services\n".into();
    }
    let mut t = Table::new(&["NAME", "INSTANCES", "ORIGINS", "MTLS", "DEPENDENTS"]);
    for s in services {
        let healthy = s.instances.iter().filter(|i| i.healthy).count();
        let mut origins: Vec<&str> = s.instances.iter().map(|i| i.origin.as_str()).collect();
        origins.sort_unstable();
        origins.dedup();
        t.row(vec![
            s.name.clone(),
            format!("{healthy}/{}", s.instances.len()),
            if origins.is_empty() {
                "-".into()
            } else {
                origins.join(",")
            },
            super::text(&s.mtls),
            list(&s.dependents),
        ]);
    }
    t.render()
}

/// `address:port`, with brackets around an IPv6 address.
fn host_port(i: &InstanceView) -> String {
    if i.address.contains(':') {
        format!("[{}]:{}", i.address, i.port)
    } else {
        format!("{}:{}", i.address, i.port)
    }
}

/// `ctl services NAME`.
/// A service's rate limits in words: each path's bucket, then the service's, per proxy.
fn rate_limit(r: Option<&RateLimitView>) -> String {
    let Some(r) = r else {
        return "none".into();
    };
    let bucket = |b: &BucketView| format!("{} per {} (burst {})", b.requests, b.per, b.burst);
    let mut parts: Vec<String> = r
        .paths
        .iter()
        .map(|p| format!("{}: {}", super::text(&p.prefix), bucket(&p.bucket)))
        .collect();
    if let Some(s) = &r.service {
        parts.push(format!("otherwise {}", bucket(s)));
    }
    format!("{} per proxy", parts.join("; "))
}

pub fn render_service(v: &ServiceDetail) -> String {
    let origins: Vec<String> = v
        .origins
        .iter()
        .map(|(o, c)| format!("{o} {}/{} healthy", c.healthy, c.total))
        .collect();
    let protocol = [
        Some(super::text(if v.protocol.is_empty() {
            "http"
        } else {
            &v.protocol
        })),
        v.port.map(|p| format!("port {p}")),
        v.preserve_header_case
            .then(|| "header case kept".to_string()),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ");
    let mut pairs = vec![
        ("service", super::text(&v.name)),
        ("declared", yes_no(v.declared)),
        ("mtls", super::text(&v.mtls)),
        ("protocol", protocol),
        ("rate limit", rate_limit(v.rate_limit.as_ref())),
        (
            "ports",
            list(
                &v.ports
                    .iter()
                    .map(|p| format!("{}:{} {} port {}", v.name, p.name, p.protocol, p.port))
                    .collect::<Vec<_>>(),
            ),
        ),
        ("dependencies", list(&v.dependencies)),
        ("origins", list(&origins)),
    ];
    if let Some(m) = &v.migration {
        pairs.push(("migration", super::migration_summary(m)));
    }
    let mut out = fields(&pairs);
    out.push_str(&instances(&v.instances));

    let proxies = &v.dependents.proxies;
    let _ = write!(
        out,
        "\ndependents:\n  services: {}\n",
        list(&v.dependents.services)
    );
    if proxies.is_empty() {
        out.push_str("  proxies:  none connected\n");
    } else {
        let mut t = Table::new(&["NODE", "SERVICE", "GROUP", "MODE"]);
        for p in proxies {
            t.row(vec![
                super::text(&p.node),
                super::text(&p.service),
                super::text(&p.group),
                super::text(&p.mode),
            ]);
        }
        let _ = writeln!(out, "  proxies ({}):", proxies.len());
        out.push_str(&indent(&t.render(), "    "));
    }

    out.push('\n');
    out.push_str(&render_access(v.access.as_ref()));
    out
}

/// The instances table of a service.
fn instances(instances: &[InstanceView]) -> String {
    if instances.is_empty() {
        return "\ninstances: none\n".into();
    }
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
            super::text(&i.origin),
            host_port(i),
            opt(&i.datacenter),
            list(&i.tags),
            i.weight.to_string(),
            yes_no(i.healthy),
        ]);
    }
    format!(
        "\ninstances ({}):\n{}",
        instances.len(),
        indent(&t.render(), "  ")
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::ctl::render::tests::view;
    use serde_json::{Value, json};

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
            render_services(&view::<Vec<_>>(services())),
            "NAME     INSTANCES  ORIGINS            MTLS      DEPENDENTS\n\
             billing  0/0        -                  disabled  -\n\
             orders   1/2        consul,kubernetes  strict    frontend\n"
        );
        assert_eq!(render_services(&[]), "no services\n");
    }

    #[test]
    fn one_service() {
        let mut s = services()[1].clone();
        s["origins"] = json!({"consul": {"total": 1, "healthy": 1},
                              "kubernetes": {"total": 1, "healthy": 0}});
        s["dependents"] = json!({"services": ["frontend"], "proxies": [
            {"node": "frontend-1", "service": "frontend", "group": "g1", "mode": "delta",
             "reaches": true}]});
        s["access"] = json!({"target": "orders", "action": "deny", "sources": ["mesh.yaml#4"],
            "rules": [{"from": [{"service": "frontend"}, "any"], "paths": [{"prefix": "/hello"}],
                       "methods": ["GET"]}],
            "resolved_callers": ["frontend"], "unknown_callers": ["ghost"], "target_known": true});
        s["protocol"] = json!("grpc");
        s["port"] = json!(9090);
        s["rate_limit"] = json!({"service": {"requests": 100, "per": "1s", "burst": 200},
            "paths": [{"prefix": "/export", "bucket": {"requests": 1, "per": "1m", "burst": 1}}]});
        s["ports"] = json!([{"name": "admin", "port": 9091, "target_port": 8081, "protocol": "http"},
                            {"name": "db", "port": 5432, "target_port": 5432, "protocol": "tcp"}]);
        let out = render_service(&view(s.clone()));
        let expected = "\
service:       orders
declared:      yes
mtls:          strict
protocol:      grpc, port 9090
rate limit:    /export: 1 per 1m (burst 1); otherwise 100 per 1s (burst 200) per proxy
ports:         orders:admin http port 9091, orders:db tcp port 5432
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
        let out = render_service(&view(s.clone()));
        assert!(
            out.contains("access: no AccessRule targets this service"),
            "{out}"
        );
        assert!(out.contains("proxies:  none connected"), "{out}");
    }
}
