//! Named ports: a service serving more than one port (an API port and an admin port, as JVM
//! services commonly do).
//!
//! A service's first port is the service itself. Each further port `NAME` of service `S` is a
//! service of its own in the mesh state, named `S:NAME` (a *port service*): its own instances
//! (the same hosts, on that port), its own cluster and protocol, reached by callers that
//! depend on `S:NAME`, and guarded by the AccessRules that target `S`. Service names cannot
//! contain `:`, so the two never collide.

use serde::Serialize;

use super::AppProtocol;

/// Separates a service from one of its port names: `orders:admin`.
pub const PORT_SEPARATOR: char = ':';

/// Most named ports a service, an instance or a proxy may have besides its first.
pub const MAX_NAMED_PORTS: usize = 16;

/// Whether `name` is a valid port name: what Kubernetes takes for a container port's name
/// (IANA service name: 1–15 lower-case letters, digits and `-`, at least one letter, no `-`
/// at either end nor twice in a row).
pub fn valid_port_name(name: &str) -> bool {
    let b = name.as_bytes();
    (1..=15).contains(&b.len())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(u8::is_ascii_lowercase)
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--")
}

/// The name of port `port` of `service`: `service:port`.
pub fn port_service(service: &str, port: &str) -> String {
    format!("{service}{PORT_SEPARATOR}{port}")
}

/// Splits a port service's name into its service and port name; a plain service name has no
/// port.
pub fn split_port_service(name: &str) -> (&str, Option<&str>) {
    match name.split_once(PORT_SEPARATOR) {
        Some((service, port)) => (service, Some(port)),
        None => (name, None),
    }
}

/// The service whose AccessRules guard `name`: the service itself, or for a port service the
/// service it is a port of.
pub fn access_target(name: &str) -> &str {
    split_port_service(name).0
}

/// A further port a MeshService declares (`spec.ports[1..]`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct NamedPort {
    /// Its name (`spec.ports[].name`).
    pub name: String,
    /// The port callers use (`port`): where a caller's proxy listens for a `tcp` port.
    pub port: u16,
    /// The port the application listens on (`targetPort`, default `port`): what a pod
    /// without a sidecar is reached on.
    pub target_port: u16,
    /// What it speaks.
    pub protocol: AppProtocol,
}

/// Where a proxy serves one named port of its service: its own ingress listener, in front of
/// the application's port (node metadata `ports`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct PortBinding {
    /// The port of the proxy's listener for it (what instances register).
    pub ingress_port: u16,
    /// The application's port.
    pub app_port: u16,
}

impl PortBinding {
    /// Parses `NAME=INGRESS:APP` (`admin=15100:8081`): the form of node metadata `ports`,
    /// `meshbridge bootstrap --port` and the pod annotation `meshbridge.io/ports`.
    pub fn parse(text: &str) -> Result<(String, PortBinding), String> {
        let bad = || format!("{text:?} is not NAME=INGRESS_PORT:APP_PORT (e.g. admin=15100:8081)");
        let (name, ports) = text.trim().split_once('=').ok_or_else(bad)?;
        let (ingress, app) = ports.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.trim().parse::<u16>().ok().filter(|p| *p > 0);
        let (Some(ingress_port), Some(app_port)) = (port(ingress), port(app)) else {
            return Err(bad());
        };
        let name = name.trim();
        if !valid_port_name(name) {
            return Err(format!(
                "{text:?}: {name:?} is not a port name (1-15 lower-case letters, digits and '-', with a letter)"
            ));
        }
        Ok((
            name.to_string(),
            PortBinding {
                ingress_port,
                app_port,
            },
        ))
    }

    /// Parses a list of bindings (at most [`MAX_NAMED_PORTS`], each name once).
    pub fn parse_all<'a>(
        items: impl IntoIterator<Item = &'a str>,
    ) -> Result<std::collections::BTreeMap<String, PortBinding>, String> {
        let mut out = std::collections::BTreeMap::new();
        for item in items {
            let (name, binding) = Self::parse(item)?;
            if out.insert(name.clone(), binding).is_some() {
                return Err(format!("port {name:?} is named twice"));
            }
            if out.len() > MAX_NAMED_PORTS {
                return Err(format!("more than {MAX_NAMED_PORTS} ports"));
            }
        }
        Ok(out)
    }

    /// `NAME=INGRESS:APP`, what [`Self::parse`] reads.
    pub fn format(name: &str, binding: &PortBinding) -> String {
        format!("{name}={}:{}", binding.ingress_port, binding.app_port)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_parse_and_name_the_problem() {
        let (name, b) = PortBinding::parse(" admin=15100:8081 ").unwrap();
        assert_eq!(name, "admin");
        assert_eq!((b.ingress_port, b.app_port), (15100, 8081));
        assert_eq!(PortBinding::format(&name, &b), "admin=15100:8081");
        for bad in [
            "admin",
            "admin=15100",
            "admin=0:1",
            "Admin=1:2",
            "=1:2",
            "a=1:x",
        ] {
            let e = PortBinding::parse(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert!(
            PortBinding::parse_all(["a=1:2", "a=3:4"])
                .unwrap_err()
                .contains("twice")
        );
        let many: Vec<String> = (0..17).map(|i| format!("p{i}={}:1", i + 1)).collect();
        assert!(PortBinding::parse_all(many.iter().map(String::as_str)).is_err());
    }

    #[test]
    fn port_names_follow_kubernetes() {
        for good in ["admin", "http-2", "a", "metrics9", "abcdefghijklmno"] {
            assert!(valid_port_name(good), "{good}");
        }
        for bad in [
            "",
            "Admin",
            "-admin",
            "admin-",
            "ad--min",
            "8080",
            "abcdefghijklmnop",
            "a:b",
            "a.b",
        ] {
            assert!(!valid_port_name(bad), "{bad}");
        }
    }

    #[test]
    fn port_services_split_back() {
        let name = port_service("orders", "admin");
        assert_eq!(name, "orders:admin");
        assert_eq!(split_port_service(&name), ("orders", Some("admin")));
        assert_eq!(split_port_service("orders"), ("orders", None));
        assert_eq!(access_target(&name), "orders");
    }
}
