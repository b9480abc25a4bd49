//! Bootstraps for Envoys the tests configure by hand, with no control plane (a TLS
//! terminator in front of a fake, a listener checking the test kit's TLS client): the
//! pieces are built as JSON, which Envoy reads as YAML, and given to
//! [`super::Envoy::start_static`].

use std::path::Path;

use serde_json::{Value, json};

const HCM: &str = "envoy.filters.network.http_connection_manager";
const HCM_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager";
const ROUTER_TYPE: &str = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router";
const DOWNSTREAM_TLS_TYPE: &str =
    "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext";
const STDOUT_LOG_TYPE: &str =
    "type.googleapis.com/envoy.extensions.access_loggers.stream.v3.StdoutAccessLog";

/// `address:port` as Envoy writes a socket address.
pub fn socket_address(address: &str, port: u16) -> Value {
    json!({"socket_address": {"address": address, "port_value": port}})
}

/// The whole bootstrap: an admin listener on 127.0.0.1:`admin_port`, `listeners` and
/// `clusters`.
pub fn bootstrap(admin_port: u16, listeners: Vec<Value>, clusters: Vec<Value>) -> String {
    json!({
        "admin": {"address": socket_address("127.0.0.1", admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    })
    .to_string()
}

/// A listener `name` on `address:port` whose one filter chain runs `hcm`, behind `tls`
/// when given (see [`downstream_tls`]).
pub fn listener(name: &str, address: &str, port: u16, tls: Option<Value>, hcm: Value) -> Value {
    let mut chain = json!({"filters": [hcm]});
    if let Some(tls) = tls {
        chain["transport_socket"] = tls;
    }
    json!({
        "name": name,
        "address": socket_address(address, port),
        "filter_chains": [chain],
    })
}

/// A TLS transport socket serving `cert`/`key`; with `client_ca`, clients must present a
/// certificate that CA signed.
pub fn downstream_tls(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Value {
    let mut context = json!({
        "tls_certificates": [{
            "certificate_chain": {"filename": cert},
            "private_key": {"filename": key},
        }],
    });
    let mut config = json!({"@type": DOWNSTREAM_TLS_TYPE});
    if let Some(ca) = client_ca {
        context["validation_context"] = json!({"trusted_ca": {"filename": ca}});
        config["require_client_certificate"] = json!(true);
    }
    config["common_tls_context"] = context;
    json!({"name": "envoy.transport_sockets.tls", "typed_config": config})
}

/// An HTTP connection manager with the router as its only HTTP filter, routing every host
/// and path by `route` (a route entry without its `match`).
pub fn http_connection_manager(stat_prefix: &str, route: Value) -> Value {
    let mut route = route;
    route["match"] = json!({"prefix": "/"});
    json!({
        "name": HCM,
        "typed_config": {
            "@type": HCM_TYPE,
            "stat_prefix": stat_prefix,
            "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": ROUTER_TYPE}}],
            "route_config": {
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}],
            },
        },
    })
}

/// `hcm` logging each request to stdout as one JSON object with `fields` (name → Envoy
/// format string), where `Envoy::access_log_entries` reads them.
pub fn with_access_log(mut hcm: Value, fields: Value) -> Value {
    hcm["typed_config"]["access_log"] = json!([{
        "name": "envoy.access_loggers.stdout",
        "typed_config": {
            "@type": STDOUT_LOG_TYPE,
            "log_format": {"json_format": fields},
        },
    }]);
    hcm
}

/// A cluster `name` of the one address 127.0.0.1:`port`.
pub fn static_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address("127.0.0.1", port)}}]}],
        },
    })
}
