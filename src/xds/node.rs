//! Node parsing: what a proxy says about itself becomes its [`ProxyGroup`].

use std::collections::BTreeSet;

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::google::protobuf::{Struct, value::Kind};

use crate::model::{
    CertificateFiles, DependencyTarget, MAX_NAMED_PORTS, PortBinding, ProxyGroup,
    valid_service_name,
};

/// Node metadata key naming the proxy's service (required).
pub const SERVICE_NAME: &str = "service_name";

/// Why a node cannot be served.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NodeError {
    /// The request carried no node (only the first request of a stream must).
    #[error("the first request of a stream must carry a node")]
    MissingNode,
    /// `service_name` is absent or empty.
    #[error("node metadata key 'service_name' is required (the service this proxy runs beside)")]
    MissingServiceName,
    /// `node.id` is longer than [`MAX_NODE_ID`] bytes.
    #[error("node id is {0} bytes long; at most {MAX_NODE_ID}")]
    LongNodeId(usize),
    /// A metadata key has the wrong type or value.
    #[error("node metadata key '{key}': {reason}")]
    BadMetadata {
        /// The key.
        key: &'static str,
        /// What is wrong.
        reason: String,
    },
}

/// The longest node id accepted (a Kubernetes pod name and namespace fit many times).
pub const MAX_NODE_ID: usize = 512;

/// The most dependencies a node may announce.
pub const MAX_DEPENDENCIES: usize = 4096;

/// The longest certificate file path accepted.
pub const MAX_PATH: usize = 4096;

/// Identity of a connected proxy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyIdentity {
    /// `node.id`.
    pub node_id: String,
    /// The group whose snapshot it gets.
    pub group: ProxyGroup,
    /// What the operator should know about its metadata (served anyway).
    pub warning: Option<String>,
}

/// Parses a node into the proxy's identity and group.
pub fn parse_node(node: Option<&Node>) -> Result<ProxyIdentity, NodeError> {
    let node = node.ok_or(NodeError::MissingNode)?;
    if node.id.len() > MAX_NODE_ID {
        return Err(NodeError::LongNodeId(node.id.len()));
    }
    let empty = Struct::default();
    let meta = node.metadata.as_ref().unwrap_or(&empty);
    let service = string(meta, SERVICE_NAME)?
        .filter(|s| !s.is_empty())
        .ok_or(NodeError::MissingServiceName)?;
    if !valid_service_name(&service) {
        return Err(NodeError::BadMetadata {
            key: SERVICE_NAME,
            reason: format!("{service:?} is not a valid service name"),
        });
    }
    let mut dependencies = BTreeSet::new();
    for text in string_list(meta, "dependencies", MAX_DEPENDENCIES)? {
        let target = text
            .parse::<DependencyTarget>()
            .map_err(|e| NodeError::BadMetadata {
                key: "dependencies",
                reason: e.to_string(),
            })?;
        dependencies.insert(target);
    }
    let ports = PortBinding::parse_all(
        string_list(meta, "ports", MAX_NAMED_PORTS)?
            .iter()
            .map(String::as_str),
    )
    .map_err(|reason| NodeError::BadMetadata {
        key: "ports",
        reason,
    })?;
    let tls = flag(meta, "tls")?;
    let files = [
        path(meta, "tls_cert")?,
        path(meta, "tls_key")?,
        path(meta, "tls_ca")?,
    ];
    let (certificate_files, warning) = match files {
        [Some(cert), Some(key), Some(ca)] if tls => (Some(CertificateFiles { cert, key, ca }), None),
        _ if tls => (
            None,
            Some(
                "node metadata tls is true but tls_cert, tls_key and tls_ca do not all name a file (a bootstrap from an older meshbridge?): served without a certificate; regenerate the bootstrap with meshbridge bootstrap --tls-*"
                    .to_string(),
            ),
        ),
        _ => (None, None),
    };
    Ok(ProxyIdentity {
        node_id: node.id.clone(),
        warning,
        group: ProxyGroup {
            service,
            ingress_port: port(meta, "ingress_port")?,
            ingress_host: string(meta, "ingress_host")?.filter(|s| !s.is_empty()),
            app_port: port(meta, "app_port")?,
            egress_port: port(meta, "egress_port")?,
            dependencies,
            ports,
            tls: certificate_files.is_some(),
            certificate_files,
        },
    })
}

/// A list of strings (or one comma-separated string) of at most `max` non-blank items.
fn string_list(meta: &Struct, key: &'static str, max: usize) -> Result<Vec<String>, NodeError> {
    let bad = |reason: String| NodeError::BadMetadata { key, reason };
    let items: Vec<String> = match meta.fields.get(key).and_then(|v| v.kind.as_ref()) {
        None | Some(Kind::NullValue(_)) => Vec::new(),
        Some(Kind::StringValue(s)) => s.split(',').map(str::to_string).collect(),
        Some(Kind::ListValue(list)) => list
            .values
            .iter()
            .map(|v| match &v.kind {
                Some(Kind::StringValue(text)) => Ok(text.clone()),
                _ => Err(bad("expected a list of strings".into())),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("expected a list of strings".into())),
    };
    if items.len() > max {
        return Err(bad(format!("{} entries; at most {max}", items.len())));
    }
    Ok(items
        .into_iter()
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
        .collect())
}

/// A file path the proxy names: at most [`MAX_PATH`] bytes, no control characters.
fn path(meta: &Struct, key: &'static str) -> Result<Option<String>, NodeError> {
    let Some(p) = string(meta, key)?.filter(|p| !p.is_empty()) else {
        return Ok(None);
    };
    if p.len() > MAX_PATH || p.chars().any(char::is_control) {
        return Err(NodeError::BadMetadata {
            key,
            reason: format!("not a file path (at most {MAX_PATH} bytes, no control characters)"),
        });
    }
    Ok(Some(p))
}

/// The admin port a proxy announced, if any.
pub fn admin_port(node: &Node) -> Option<u16> {
    node.metadata
        .as_ref()
        .and_then(|m| port(m, "admin_port").ok().flatten())
}

/// The announced port of the proxy's diagnostics listener (a restricted view of its admin
/// interface reachable from the control plane), if any.
pub fn diagnostics_port(node: &Node) -> Option<u16> {
    node.metadata
        .as_ref()
        .and_then(|m| port(m, "diagnostics_port").ok().flatten())
}

fn string(meta: &Struct, key: &'static str) -> Result<Option<String>, NodeError> {
    match meta.fields.get(key).and_then(|v| v.kind.as_ref()) {
        None | Some(Kind::NullValue(_)) => Ok(None),
        Some(Kind::StringValue(s)) => Ok(Some(s.trim().to_string())),
        Some(_) => Err(NodeError::BadMetadata {
            key,
            reason: "expected a string".into(),
        }),
    }
}

fn flag(meta: &Struct, key: &'static str) -> Result<bool, NodeError> {
    match meta.fields.get(key).and_then(|v| v.kind.as_ref()) {
        None | Some(Kind::NullValue(_)) => Ok(false),
        Some(Kind::BoolValue(b)) => Ok(*b),
        Some(Kind::StringValue(s)) => match s.trim() {
            "true" => Ok(true),
            "false" | "" => Ok(false),
            other => Err(NodeError::BadMetadata {
                key,
                reason: format!("{other:?} is not true or false"),
            }),
        },
        Some(_) => Err(NodeError::BadMetadata {
            key,
            reason: "expected true or false".into(),
        }),
    }
}

fn port(meta: &Struct, key: &'static str) -> Result<Option<u16>, NodeError> {
    let bad = |reason: String| NodeError::BadMetadata { key, reason };
    match meta.fields.get(key).and_then(|v| v.kind.as_ref()) {
        None | Some(Kind::NullValue(_)) => Ok(None),
        Some(Kind::NumberValue(n)) => {
            if n.fract() == 0.0 && *n >= 1.0 && *n <= 65535.0 {
                Ok(Some(*n as u16))
            } else {
                Err(bad(format!("{n} is not a port (1-65535)")))
            }
        }
        Some(Kind::StringValue(s)) => s
            .trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .map(Some)
            .ok_or_else(|| bad(format!("{s:?} is not a port (1-65535)"))),
        Some(_) => Err(bad("expected a number".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::google::protobuf::{ListValue, Value};

    #[test]
    fn long_node_ids_and_huge_dependency_lists_are_refused() {
        let service = ("service_name", Kind::StringValue("web".into()));
        let mut n = node(std::slice::from_ref(&service));
        n.id = "x".repeat(MAX_NODE_ID + 1);
        let e = parse_node(Some(&n)).unwrap_err().to_string();
        assert!(e.contains("513 bytes long; at most 512"), "{e}");
        n.id = "x".repeat(MAX_NODE_ID);
        assert!(parse_node(Some(&n)).is_ok());
        let many = Kind::ListValue(ListValue {
            values: (0..=MAX_DEPENDENCIES)
                .map(|i| Value {
                    kind: Some(Kind::StringValue(format!("s{i}"))),
                })
                .collect(),
        });
        let e = parse_node(Some(&node(&[service, ("dependencies", many)])))
            .unwrap_err()
            .to_string();
        assert!(e.contains("4097 entries"), "{e}");
    }

    fn node(fields: &[(&str, Kind)]) -> Node {
        Node {
            id: "n1".into(),
            metadata: Some(Struct {
                fields: fields
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.to_string(),
                            Value {
                                kind: Some(v.clone()),
                            },
                        )
                    })
                    .collect(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_certificate_is_its_three_files_and_tls_without_them_is_served_without_one() {
        let service = (SERVICE_NAME, Kind::StringValue("web".into()));
        let tls = ("tls", Kind::BoolValue(true));
        let file = |k: &'static str, v: &str| (k, Kind::StringValue(v.into()));
        let id = parse_node(Some(&node(&[
            service.clone(),
            tls.clone(),
            file("tls_cert", "/tls/tls.crt"),
            file("tls_key", "/tls/tls.key"),
            file("tls_ca", "/tls/ca.crt"),
        ])))
        .unwrap();
        assert!(id.group.tls);
        assert_eq!(
            id.group.certificate_files.unwrap().key,
            "/tls/tls.key".to_string()
        );
        assert_eq!(id.warning, None);

        // An older bootstrap: `tls` alone.
        let id = parse_node(Some(&node(&[service.clone(), tls.clone()]))).unwrap();
        assert!(!id.group.tls);
        assert!(id.warning.unwrap().contains("regenerate the bootstrap"));

        let e = parse_node(Some(&node(&[
            service,
            tls,
            file("tls_cert", "/tls/tls.crt\n/etc/shadow"),
        ])))
        .unwrap_err();
        assert!(e.to_string().contains("'tls_cert': not a file path"), "{e}");
    }

    #[test]
    fn missing_service_name_names_the_key() {
        let err = parse_node(Some(&node(&[]))).unwrap_err();
        assert_eq!(err, NodeError::MissingServiceName);
        assert!(err.to_string().contains("service_name"));
    }

    #[test]
    fn parses_ports_and_dependencies() {
        let id = parse_node(Some(&node(&[
            (SERVICE_NAME, Kind::StringValue("frontend".into())),
            ("egress_port", Kind::NumberValue(15001.0)),
            ("app_port", Kind::StringValue("8080".into())),
            (
                "dependencies",
                Kind::ListValue(ListValue {
                    values: vec![
                        Value {
                            kind: Some(Kind::StringValue("orders".into())),
                        },
                        Value {
                            kind: Some(Kind::StringValue("https://api.example.com".into())),
                        },
                    ],
                }),
            ),
        ])))
        .unwrap();
        assert_eq!(id.group.egress_port, Some(15001));
        assert_eq!(id.group.app_port, Some(8080));
        assert_eq!(id.group.dependencies.len(), 2);
    }

    #[test]
    fn further_ports_are_bindings_and_bad_ones_are_named() {
        let list = |items: &[&str]| {
            Kind::ListValue(ListValue {
                values: items
                    .iter()
                    .map(|i| Value {
                        kind: Some(Kind::StringValue(i.to_string())),
                    })
                    .collect(),
            })
        };
        let id = parse_node(Some(&node(&[
            ("service_name", Kind::StringValue("orders".into())),
            ("ports", list(&["admin=15100:8081", "db=15101:5432"])),
        ])))
        .unwrap();
        assert_eq!(
            id.group.ports["admin"],
            PortBinding {
                ingress_port: 15100,
                app_port: 8081
            }
        );
        assert_eq!(id.group.ports.len(), 2);
        let err = parse_node(Some(&node(&[
            ("service_name", Kind::StringValue("orders".into())),
            ("ports", list(&["admin=15100"])),
        ])))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("ports") && err.contains("admin=15100"),
            "{err}"
        );
        let many: Vec<String> = (0..17).map(|i| format!("p{i}=1{i:04}:80")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(
            parse_node(Some(&node(&[
                ("service_name", Kind::StringValue("orders".into())),
                ("ports", list(&many)),
            ])))
            .is_err()
        );
    }

    #[test]
    fn rejects_bad_ports() {
        let err = parse_node(Some(&node(&[
            (SERVICE_NAME, Kind::StringValue("a".into())),
            ("egress_port", Kind::NumberValue(70000.0)),
        ])))
        .unwrap_err();
        assert!(err.to_string().contains("egress_port"), "{err}");
    }
}
