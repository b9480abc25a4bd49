//! Every `meshbridge.io/*` annotation and label key meshbridge reads or writes, and the
//! parsers of their values (one place, so that the injector, the Kubernetes source and the
//! webhook read a key the same way).

use std::collections::BTreeMap;

/// Pod annotation asking for (`"true"`) or refusing (`"false"`) the sidecar; as a namespace
/// label (`enabled`), opts every pod of the namespace in.
pub const INJECT: &str = "meshbridge.io/inject";
/// Pod annotation meshbridge sets on an injected pod (the sidecar image).
pub const INJECTED: &str = "meshbridge.io/injected";
/// Label an injected pod carries (value `injected`).
pub const SIDECAR_LABEL: &str = "meshbridge.io/sidecar";
/// Pod annotation: the sidecar's ingress port (set by the injector;
/// [`super::DEFAULT_INGRESS_PORT`] when absent).
pub const INGRESS_PORT: &str = "meshbridge.io/ingress-port";
/// Pod annotation: comma-separated instance tags (`canary`, `weight:N`, `mtls`, …), with the
/// meaning Consul tags have.
pub const TAGS: &str = "meshbridge.io/tags";
/// Pod annotation: the Secret (`tls.crt`, `tls.key`, `ca.crt`) mounted into the sidecar for
/// its mesh identity. On a pod it asks for that Secret (`""`: no TLS for this pod); the
/// injector records the Secret it actually mounted, so an injected pod carrying a non-empty
/// value has a proxy that holds certificates (its endpoints get the `mtls` tag).
pub const TLS_SECRET: &str = "meshbridge.io/tls-secret";
/// Pod annotation: the mesh service of the pod, when no MeshService selects it.
pub const SERVICE: &str = "meshbridge.io/service";
/// Pod annotation: the sidecar's egress port.
pub const EGRESS_PORT: &str = "meshbridge.io/egress-port";
/// Pod annotation: the sidecar's listeners for the pod's further named ports,
/// `NAME=INGRESS:APP` comma-separated (`admin=15100:8081`). Set by the injector from the
/// containers' named ports unless the pod sets it; a MeshService port of the same name is
/// reached on the pod's `INGRESS` port.
pub const PORTS: &str = "meshbridge.io/ports";
/// Pod annotation: the application's port behind the ingress.
pub const APP_PORT: &str = "meshbridge.io/app-port";
/// Pod annotation: the sidecar's log level.
pub const LOG_LEVEL: &str = "meshbridge.io/log-level";
/// Pod annotation: comma-separated dependencies, when no MeshService declares them.
pub const DEPENDENCIES: &str = "meshbridge.io/dependencies";
/// Pod annotations: the sidecar's resource requests and limits.
pub const PROXY_CPU: &str = "meshbridge.io/proxy-cpu";
/// See [`PROXY_CPU`].
pub const PROXY_CPU_LIMIT: &str = "meshbridge.io/proxy-cpu-limit";
/// See [`PROXY_CPU`].
pub const PROXY_MEMORY: &str = "meshbridge.io/proxy-memory";
/// See [`PROXY_CPU`].
pub const PROXY_MEMORY_LIMIT: &str = "meshbridge.io/proxy-memory-limit";
/// Pod annotation: `"false"` keeps `HTTP_PROXY` out of the application's environment.
pub const HTTP_PROXY: &str = "meshbridge.io/http-proxy";
/// Pod annotation: `"true"` redirects the pod's traffic through the sidecar with iptables.
pub const TRANSPARENT: &str = "meshbridge.io/transparent";
/// Pod annotation: seconds the sidecar drains for when the pod stops (its preStop hook);
/// `0`: no drain.
pub const DRAIN_SECONDS: &str = "meshbridge.io/drain-seconds";
/// MeshService annotation: an operator's standing order to its migration plan — `pause`,
/// `rollback`, `promote` or `resume@<time>` (see [`crate::model::Operator`]).
pub const MIGRATION: &str = "meshbridge.io/migration";
/// Annotation on the webhook's certificate Secret: when the certificate expires (RFC 3339).
pub const NOT_AFTER: &str = "meshbridge.io/not-after";
/// Annotation on the webhook's certificate Secret: the DNS names it is for.
pub const DNS_NAMES: &str = "meshbridge.io/dns-names";

/// The value of `key` in `annotations`, trimmed; `None` when absent or blank.
pub fn value<'a>(annotations: Option<&'a BTreeMap<String, String>>, key: &str) -> Option<&'a str> {
    annotations?
        .get(key)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
}

/// A port: a number in 1..=65535.
pub fn port(value: &str) -> Result<u16, String> {
    value
        .trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{value:?} is not a port"))
}

/// A comma-separated list, items trimmed, empty ones left out.
pub fn list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|v| !v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_trimmed_and_blank_is_absent() {
        let a = BTreeMap::from([
            (TAGS.to_string(), " canary, weight:5,, ".to_string()),
            (APP_PORT.to_string(), "  ".to_string()),
        ]);
        let tags: Vec<&str> = list(value(Some(&a), TAGS).unwrap()).collect();
        assert_eq!(tags, ["canary", "weight:5"]);
        assert_eq!(value(Some(&a), APP_PORT), None);
        assert_eq!(value(None, TAGS), None);
        assert_eq!(port(" 8080"), Ok(8080));
        assert!(port("0").unwrap_err().contains("not a port"));
        assert!(port("http").is_err());
    }
}
