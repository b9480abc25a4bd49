//! `meshbridge bootstrap`: the Envoy bootstrap of a legacy host (VM, Mesos task).
//!
//! The bootstrap only tells Envoy who it is (node metadata) and where the control plane is
//! (ADS over gRPC); everything else arrives over xDS. With TLS files, it also declares the
//! static secrets `server_cert` and `validation_context` the host's certificates live in (used
//! by the connection to the control plane with `--xds-tls`), and names the files in the node
//! metadata (`tls: true`, `tls_cert`, `tls_key`, `tls_ca`): the control plane configures mutual
//! TLS only on proxies that can do it, and sends the proxy its secrets over SDS as those paths,
//! which Envoy re-reads whenever the files are replaced (renamed into place), so a deployment
//! system rotates a certificate without restarting Envoy.
//!
//! It also owns the drain sequence a proxy runs before it is stopped ([`drain_script`]): the
//! preStop hook of injected sidecars, and what `meshbridge bootstrap --help` tells a legacy
//! host's operator to run before stopping Envoy.

use std::path::PathBuf;

use serde_json::{Value, json};

/// Everything a bootstrap is built from.
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct BootstrapOptions {
    /// Service this Envoy runs beside (node metadata `service_name`, node cluster).
    #[arg(long)]
    pub service: String,
    /// Unique id of this Envoy (node id).
    #[arg(long)]
    pub node_id: String,
    /// Control plane address, HOST:PORT; several separated by commas (HOST:PORT,HOST:PORT)
    /// reach several replicas: Envoy keeps one ADS stream to one of them and moves to another
    /// when that one goes away.
    #[arg(long)]
    pub xds_addr: String,
    /// Port of the ingress listener (callers of this service connect here).
    #[arg(long)]
    pub ingress_port: Option<u16>,
    /// Port the local application listens on (127.0.0.1).
    #[arg(long)]
    pub app_port: Option<u16>,
    /// Port of the egress listener on 127.0.0.1 (the application calls dependencies here).
    #[arg(long)]
    pub egress_port: Option<u16>,
    /// Port of Envoy's admin interface on 127.0.0.1.
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
    /// Port of a listener on all addresses that answers only `GET /ready` from Envoy's admin
    /// interface (for a kubelet readiness probe; the admin interface stays on 127.0.0.1).
    #[arg(long)]
    pub ready_port: Option<u16>,
    /// Port of a listener on all addresses through which the control plane reads this
    /// Envoy's config dump, stats, clusters and server info and changes its log level; every
    /// other admin path is refused (403). Announced as node metadata `diagnostics_port`.
    #[arg(long, requires = "diagnostics_allow")]
    pub diagnostics_port: Option<u16>,
    /// Address range (CIDR) allowed to use the diagnostics listener: the control plane's, and
    /// a metrics scraper's; repeatable. Anything else gets 403.
    #[arg(long = "diagnostics-allow", value_name = "CIDR")]
    pub diagnostics_allow: Vec<String>,
    /// A dependency: service name, "*" (where allowed) or `https://host[:port]`; repeatable.
    #[arg(long = "dependency")]
    pub dependencies: Vec<String>,
    /// A further named port of the service this host serves, `NAME=INGRESS:APP`
    /// (`admin=15100:8081`): Envoy listens on INGRESS for callers of `SERVICE:NAME` and
    /// forwards to the application on 127.0.0.1:APP, under the service's AccessRules;
    /// repeatable, at most 16. Register the host's INGRESS port in Consul as the instance
    /// meta `meshbridge-port-NAME`.
    #[arg(long = "port", value_name = "NAME=INGRESS:APP")]
    pub ports: Vec<String>,
    /// Use incremental (delta) xDS instead of state-of-the-world.
    #[arg(long)]
    pub delta: bool,
    /// Certificate chain of this host (PEM); declares the static secret `server_cert`.
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// Private key of this host (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// CA bundle that verifies peers (PEM); declares the static secret `validation_context`.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
    /// Reach the control plane over mutual TLS with the same files: this host's certificate
    /// proves its service to meshbridge (`run --xds-client-auth`), and meshbridge's
    /// certificate must chain to `--tls-ca`.
    #[arg(long, requires = "tls_cert")]
    pub xds_tls: bool,
    /// With `--xds-tls`, a name meshbridge's certificate must carry (repeatable; any one
    /// suffices): `spiffe://…` a URI SAN, an IP address an IP SAN, anything else a DNS SAN.
    /// Default: the hosts of `--xds-addr`, as HTTPS checks a server's name, so a host
    /// certificate of the same CA cannot stand in for the control plane.
    #[arg(long = "xds-server-san", requires = "xds_tls")]
    pub xds_server_sans: Vec<String>,
}

/// Envoy `SubjectAltNameMatcher`s for the names the control plane's certificate must carry.
fn server_san_matchers(names: &[String]) -> Vec<Value> {
    names
        .iter()
        .map(|name| {
            let san_type = if name.starts_with("spiffe://") {
                "URI"
            } else if name.parse::<std::net::IpAddr>().is_ok() {
                "IP_ADDRESS"
            } else {
                "DNS"
            };
            json!({"san_type": san_type, "matcher": {"exact": name}})
        })
        .collect()
}

/// A bootstrap option that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BootstrapError {
    /// An entry of `--xds-addr` is not HOST:PORT.
    #[error("--xds-addr {0:?} must be HOST:PORT")]
    BadXdsAddr(String),
    /// A dependency that does not parse.
    #[error("--dependency {0:?}: {1}")]
    BadDependency(String, String),
    /// A service name that is not valid.
    #[error("--service {0:?} is not a valid service name")]
    BadService(String),
    /// A further port that does not parse.
    #[error("--port: {0}")]
    BadPort(String),
    /// An empty node id.
    #[error("--node-id must not be empty")]
    EmptyNodeId,
    /// A diagnostics listener open to everyone, or an address range that does not parse.
    #[error("--diagnostics-allow {0:?}: {1}")]
    BadDiagnosticsAllow(String, String),
    /// `--xds-tls` without the host's certificate files.
    #[error(
        "--xds-tls needs --tls-cert, --tls-key and --tls-ca: the host's certificate proves its service to the control plane"
    )]
    XdsTlsWithoutFiles,
}

/// Parses `ADDRESS/LEN` (or a bare address: one host) into Envoy's CidrRange JSON.
pub fn cidr_range(text: &str) -> Result<Value, BootstrapError> {
    let bad = |why: &str| BootstrapError::BadDiagnosticsAllow(text.to_string(), why.to_string());
    let (addr, len) = match text.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (text, None),
    };
    let ip: std::net::IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| bad("not an IP address or CIDR"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len: u32 = match len {
        Some(l) => l
            .trim()
            .parse()
            .map_err(|_| bad("the prefix length is not a number"))?,
        None => max,
    };
    if len > max {
        return Err(bad("the prefix length is too long for the address"));
    }
    Ok(json!({"address_prefix": ip.to_string(), "prefix_len": len}))
}

/// The entries of `--xds-addr` (`HOST:PORT`, several separated by commas) as host (without
/// the brackets of an IPv6 address) and port; the first entry that is not `HOST:PORT` is the
/// error.
fn xds_addrs(text: &str) -> Result<Vec<(String, u16)>, BootstrapError> {
    text.split(',')
        .map(|entry| {
            let entry = entry.trim();
            entry
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h.trim_matches(['[', ']']), p.parse::<u16>().ok()?)))
                .filter(|(h, p)| !h.is_empty() && *p > 0)
                .map(|(h, p)| (h.to_string(), p))
                .ok_or_else(|| BootstrapError::BadXdsAddr(entry.to_string()))
        })
        .collect()
}

/// Largest RE2 program (path rules of AccessRules) the proxies accept.
pub const RE2_MAX_PROGRAM_SIZE: u32 = 1000;

/// Name of the static cluster pointing at the control plane.
pub const XDS_CLUSTER: &str = "meshbridge_xds";

/// Builds the bootstrap as a JSON value.
#[allow(clippy::too_many_lines)] // the bootstrap document in Envoy's field order, one block per top-level field.
pub fn bootstrap(o: &BootstrapOptions) -> Result<Value, BootstrapError> {
    if !crate::model::valid_service_name(&o.service) {
        return Err(BootstrapError::BadService(o.service.clone()));
    }
    if o.node_id.trim().is_empty() {
        return Err(BootstrapError::EmptyNodeId);
    }
    let xds = xds_addrs(&o.xds_addr)?;
    for d in &o.dependencies {
        d.parse::<crate::model::DependencyTarget>()
            .map_err(|e| BootstrapError::BadDependency(d.clone(), e.to_string()))?;
    }
    let mut metadata = serde_json::Map::new();
    metadata.insert("service_name".into(), json!(o.service));
    for (key, value) in [
        ("ingress_port", o.ingress_port),
        ("app_port", o.app_port),
        ("egress_port", o.egress_port),
        ("admin_port", Some(o.admin_port)),
        ("diagnostics_port", o.diagnostics_port),
    ] {
        if let Some(v) = value {
            metadata.insert(key.into(), json!(v));
        }
    }
    metadata.insert("dependencies".into(), json!(o.dependencies));
    if !o.ports.is_empty() {
        let ports = crate::model::PortBinding::parse_all(o.ports.iter().map(String::as_str))
            .map_err(BootstrapError::BadPort)?;
        let ports: Vec<String> = ports
            .iter()
            .map(|(name, b)| crate::model::PortBinding::format(name, b))
            .collect();
        metadata.insert("ports".into(), json!(ports));
    }
    if let (Some(cert), Some(key), Some(ca)) = (&o.tls_cert, &o.tls_key, &o.tls_ca) {
        // The control plane hands these paths back to this proxy as its SDS secrets, which
        // Envoy re-reads when the files are replaced: rotation without a restart.
        metadata.insert("tls".into(), json!(true));
        for (key, path) in [("tls_cert", cert), ("tls_key", key), ("tls_ca", ca)] {
            metadata.insert(key.into(), json!(path.display().to_string()));
        }
    }
    let is_ip = xds
        .iter()
        .all(|(h, _)| h.parse::<std::net::IpAddr>().is_ok());
    let xds_endpoints: Vec<Value> = xds
        .iter()
        .map(|(host, port)| {
            json!({"endpoint": {"address": {
                "socket_address": {"address": host, "port_value": port}
            }}})
        })
        .collect();
    let mut bootstrap = json!({
        "node": {"id": o.node_id, "cluster": o.service, "metadata": metadata},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": o.admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": if o.delta { "DELTA_GRPC" } else { "GRPC" },
                "transport_api_version": "V3",
                "set_node_on_first_message_only": true,
                "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]
            },
            "cds_config": {"ads": {}, "resource_api_version": "V3"},
            "lds_config": {"ads": {}, "resource_api_version": "V3"}
        },
        // What this proxy sees of the services it calls (requests, errors by locality:
        // datacenter and origin), reported to the control plane at the interval it asks.
        "cluster_manager": {"load_stats_config": {
            "api_type": "GRPC",
            "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": XDS_CLUSTER}}]
        }},
        "static_resources": {
            "clusters": [{
                "name": XDS_CLUSTER,
                "type": if is_ip { "STATIC" } else { "STRICT_DNS" },
                "connect_timeout": "1s",
                "typed_extension_protocol_options": {
                    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                        "explicit_http_config": {"http2_protocol_options": {
                            "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                        }}
                    }
                },
                "load_assignment": {
                    "cluster_name": XDS_CLUSTER,
                    "endpoints": [{"lb_endpoints": xds_endpoints}]
                }
            }]
        }
    });
    // Envoy refuses a regular expression whose RE2 program is larger than 100 by default,
    // which a path rule like `/orders/[a-z0-9-]{1,36}/items` already is; a refused listener
    // would leave the previous one (and its access rules) in force. The admin layer keeps
    // `/runtime_modify` working.
    bootstrap["layered_runtime"] = json!({"layers": [
        {"name": "meshbridge", "static_layer": {
            "re2.max_program_size.error_level": RE2_MAX_PROGRAM_SIZE,
            "re2.max_program_size.warn_level": RE2_MAX_PROGRAM_SIZE
        }},
        {"name": "admin", "admin_layer": {}}
    ]});
    let mut admin_views = Vec::new();
    if let Some(port) = o.ready_port {
        admin_views.push(admin_view_listener(
            "meshbridge_ready",
            port,
            &READY_ROUTES,
            404,
        ));
    }
    if let Some(port) = o.diagnostics_port {
        if o.diagnostics_allow.is_empty() {
            return Err(BootstrapError::BadDiagnosticsAllow(
                String::new(),
                "--diagnostics-port needs at least one range: who may read this Envoy's configuration and change its log level".into(),
            ));
        }
        let ranges = o
            .diagnostics_allow
            .iter()
            .map(|c| cidr_range(c))
            .collect::<Result<Vec<_>, _>>()?;
        let mut listener =
            admin_view_listener("meshbridge_diagnostics", port, &DIAGNOSTICS_ROUTES, 403);
        restrict_to(&mut listener, &ranges);
        admin_views.push(listener);
    }
    if !admin_views.is_empty() {
        bootstrap["static_resources"]["listeners"] = Value::Array(admin_views);
        if let Some(clusters) = bootstrap["static_resources"]["clusters"].as_array_mut() {
            clusters.push(admin_cluster(o.admin_port));
        }
    }
    if o.xds_tls {
        if o.tls_cert.is_none() {
            return Err(BootstrapError::XdsTlsWithoutFiles);
        }
        // The static secrets below, referenced by name; a server name only for a host name
        // (an address is not a valid SNI). The CA alone would accept any certificate it
        // signed, every service's included: the control plane's must also carry its name.
        // Several replicas: any of their hosts is a name the control plane may carry; the
        // server name is sent only when every address names the same host.
        let mut hosts: Vec<String> = Vec::new();
        for (h, _) in &xds {
            if !hosts.contains(h) {
                hosts.push(h.clone());
            }
        }
        let sni = match hosts.as_slice() {
            [one] if one.parse::<std::net::IpAddr>().is_err() => one.clone(),
            _ => String::new(),
        };
        let sans = if o.xds_server_sans.is_empty() {
            hosts
        } else {
            o.xds_server_sans.clone()
        };
        bootstrap["static_resources"]["clusters"][0]["transport_socket"] = json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": sni,
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificate_sds_secret_configs": [{"name": "server_cert"}],
                    "combined_validation_context": {
                        "default_validation_context": {
                            "match_typed_subject_alt_names": server_san_matchers(&sans)
                        },
                        "validation_context_sds_secret_config": {"name": "validation_context"}
                    }
                }
            }
        });
    }
    if let (Some(cert), Some(key), Some(ca)) = (&o.tls_cert, &o.tls_key, &o.tls_ca) {
        bootstrap["static_resources"]["secrets"] = json!([
            {"name": "server_cert", "tls_certificate": {
                "certificate_chain": {"filename": cert.display().to_string()},
                "private_key": {"filename": key.display().to_string()}
            }},
            {"name": "validation_context", "validation_context": {
                "trusted_ca": {"filename": ca.display().to_string()}
            }}
        ]);
    }
    Ok(bootstrap)
}

/// Name of the static cluster pointing at Envoy's own admin interface.
pub const ADMIN_CLUSTER: &str = "meshbridge_admin";

/// What the readiness listener forwards to the admin interface: `GET /ready`.
const READY_ROUTES: [(&str, &str); 1] = [("GET", "/ready")];

/// What the diagnostics listener forwards (method, exact path): read-only views and log
/// level changes. Not `/quitquitquit`, `/drain_listeners`, `/healthcheck/fail`,
/// `/runtime_modify`, `/reset_counters`, `/certs`, … .
const DIAGNOSTICS_ROUTES: [(&str, &str); 7] = [
    ("GET", "/config_dump"),
    ("GET", "/stats"),
    ("GET", "/stats/prometheus"),
    ("GET", "/clusters"),
    ("GET", "/server_info"),
    ("GET", "/ready"),
    ("POST", "/logging"),
];

/// Admits only connections from `ranges` to an admin view listener (RBAC on the direct
/// peer address; anything else gets 403).
fn restrict_to(listener: &mut Value, ranges: &[Value]) {
    let principals: Vec<Value> = ranges
        .iter()
        .map(|r| json!({"direct_remote_ip": r}))
        .collect();
    let rbac = json!({
        "name": "envoy.filters.http.rbac",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
            "rules": {"action": "ALLOW", "policies": {"control-plane": {
                "permissions": [{"any": true}],
                "principals": principals
            }}}
        }
    });
    if let Some(filters) =
        listener["filter_chains"][0]["filters"][0]["typed_config"]["http_filters"].as_array_mut()
    {
        filters.insert(0, rbac);
    }
}

/// A listener on `0.0.0.0:port` forwarding exactly `routes` (method, exact path) to the admin
/// interface; anything else gets `refused`, so the rest of the admin interface is not exposed.
fn admin_view_listener(name: &str, port: u16, routes: &[(&str, &str)], refused: u32) -> Value {
    let router = json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}
    });
    let mut route_list: Vec<Value> = routes
        .iter()
        .map(|(method, path)| {
            json!({"match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": method}}]},
                   "route": {"cluster": ADMIN_CLUSTER}})
        })
        .collect();
    route_list.push(json!({"match": {"prefix": "/"}, "direct_response": {"status": refused}}));
    json!({
        "name": name,
        "address": {"socket_address": {"address": "0.0.0.0", "port_value": port}},
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                // Envoy's admin interface resolves `..` and `//` itself: resolve them here
                // first, so `/stats/../certs` cannot match `/stats`.
                "normalize_path": true,
                "merge_slashes": true,
                "path_with_escaped_slashes_action": "REJECT_REQUEST",
                "route_config": {"virtual_hosts": [{
                    "name": name,
                    "domains": ["*"],
                    "routes": route_list
                }]},
                "http_filters": [router]
            }
        }]}]
    })
}

/// The static cluster pointing at Envoy's own admin interface.
fn admin_cluster(admin_port: u16) -> Value {
    json!({
        "name": ADMIN_CLUSTER,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": ADMIN_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "127.0.0.1", "port_value": admin_port}
            }}}]}]
        }
    })
}

/// Seconds a proxy drains for before it is stopped, unless told otherwise.
pub const DEFAULT_DRAIN_SECONDS: u32 = 5;
/// The longest drain accepted (a pod's `terminationGracePeriodSeconds` must cover it).
pub const MAX_DRAIN_SECONDS: u32 = 300;

/// The drain sequence, as a `bash` script, for the Envoy whose admin interface is on
/// `127.0.0.1:admin_port`; run it before stopping Envoy. It uses bash's `/dev/tcp` (no curl
/// or wget needed, which Envoy's images lack; `sh` is dash there, without `/dev/tcp`):
///
/// 1. `POST /healthcheck/fail`: `/ready` (and the readiness listener) answers 503, and every
///    inbound HTTP connection is closed after its current response (HTTP/1 `Connection:
///    close`, HTTP/2 `GOAWAY`), so callers reconnect, to other instances once they have
///    dropped this one. New connections are still accepted meanwhile: a caller that has not
///    heard yet is still served. Egress listeners are `drain_type: MODIFY_ONLY`, so the
///    application's own calls are not disturbed.
/// 2. `sleep drain_seconds`: in-flight requests finish and the endpoint's removal reaches the
///    callers (the control plane drops a terminating pod at once; a legacy host drops out
///    when its Consul check fails or it is deregistered).
/// 3. `POST /drain_listeners?inboundonly`: the inbound listeners (`traffic_direction:
///    INBOUND`, the ingress) stop accepting connections; the egress stays up for the
///    application until Envoy itself is stopped.
///
/// Envoy's own graceful drain (`/drain_listeners?graceful` with `--drain-time-s`) is not
/// used: `--drain-time-s` is also how long a listener replaced over LDS keeps its
/// connections, and shortening it to a few seconds would cut long requests (WebSockets,
/// streams) on every AccessRule change.
///
/// Each request waits at most 5 s for Envoy's answer; the script prints each answer's status
/// line.
pub fn drain_script(admin_port: u16, drain_seconds: u32) -> String {
    format!(
        "admin() {{ {{ printf 'POST %s HTTP/1.1\\r\\nHost: 127.0.0.1\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n' \"$1\" >&3 && IFS= read -r -t 5 status <&3 && echo \"$1: $status\"; }} 3<>/dev/tcp/127.0.0.1/{admin_port}; }}\n\
         admin /healthcheck/fail\n\
         sleep {drain_seconds}\n\
         admin '/drain_listeners?inboundonly'\n"
    )
}

/// What `meshbridge bootstrap --help` says about stopping a legacy host's Envoy.
pub const DRAIN_HELP: &str = "\
Stopping Envoy without losing requests (ADMIN is --admin-port, N the drain seconds, e.g. 5):
  curl -s -X POST http://127.0.0.1:ADMIN/healthcheck/fail
  sleep N
  curl -s -X POST 'http://127.0.0.1:ADMIN/drain_listeners?inboundonly'
  kill -TERM <envoy>
The first request makes /ready answer 503 and closes inbound connections after their current
request; during the sleep in-flight requests finish and callers drop this host, which they do
once its Consul check fails (point the check at --ready-port's /ready) or it is deregistered,
so N must cover the check's interval; the second stops inbound listeners. Injected sidecars run
the same sequence as their preStop hook.";

/// The bootstrap as YAML.
pub fn bootstrap_yaml(o: &BootstrapOptions) -> Result<String, BootstrapError> {
    let value = bootstrap(o)?;
    Ok(serde_norway::to_string(&value).unwrap_or_else(|e| format!("# cannot render: {e}\n")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(xds_addr: &str) -> BootstrapOptions {
        BootstrapOptions {
            service: "frontend".into(),
            node_id: "frontend-1".into(),
            xds_addr: xds_addr.into(),
            admin_port: 9901,
            ..Default::default()
        }
    }

    fn xds_cluster(o: &BootstrapOptions) -> Value {
        bootstrap(o).unwrap()["static_resources"]["clusters"][0].clone()
    }

    #[test]
    fn one_control_plane_is_one_endpoint() {
        let cluster = xds_cluster(&options("[::1]:18000"));
        assert_eq!(cluster["type"], "STATIC");
        assert_eq!(
            cluster["load_assignment"]["endpoints"],
            json!([{"lb_endpoints": [{"endpoint": {"address": {
                "socket_address": {"address": "::1", "port_value": 18000}
            }}}]}])
        );
    }

    #[test]
    fn several_control_planes_are_one_endpoint_each_in_order() {
        let cluster = xds_cluster(&options("10.0.0.1:18000, meshbridge-b:18001"));
        // One name among the addresses: Envoy resolves them all.
        assert_eq!(cluster["type"], "STRICT_DNS");
        let endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["endpoint"]["address"]["socket_address"].clone())
            .collect::<Vec<_>>();
        assert_eq!(
            endpoints,
            vec![
                json!({"address": "10.0.0.1", "port_value": 18000}),
                json!({"address": "meshbridge-b", "port_value": 18001}),
            ]
        );
    }

    #[test]
    fn a_bad_entry_among_several_is_named() {
        for (text, bad) in [
            ("10.0.0.1:18000,nohostport", "nohostport"),
            ("10.0.0.1:18000,", ""),
            ("h:0,10.0.0.1:18000", "h:0"),
            (":18000", ":18000"),
        ] {
            assert_eq!(
                bootstrap(&options(text)),
                Err(BootstrapError::BadXdsAddr(bad.into())),
                "{text}"
            );
        }
    }

    #[test]
    fn xds_tls_with_several_hosts_accepts_any_of_them_and_sends_no_server_name() {
        let mut o = options("meshbridge-a:18000,meshbridge-b:18000");
        o.tls_cert = Some("/c.pem".into());
        o.tls_key = Some("/c.key".into());
        o.tls_ca = Some("/ca.pem".into());
        o.xds_tls = true;
        let tls = &xds_cluster(&o)["transport_socket"]["typed_config"];
        assert_eq!(tls["sni"], "");
        assert_eq!(
            tls["common_tls_context"]["combined_validation_context"]["default_validation_context"]
                ["match_typed_subject_alt_names"],
            json!([
                {"san_type": "DNS", "matcher": {"exact": "meshbridge-a"}},
                {"san_type": "DNS", "matcher": {"exact": "meshbridge-b"}}
            ])
        );
        // One host behind several ports: its name is still sent.
        o.xds_addr = "meshbridge:18000,meshbridge:18001".into();
        assert_eq!(
            xds_cluster(&o)["transport_socket"]["typed_config"]["sni"],
            "meshbridge"
        );
    }
}
