//! The entry points the fuzz targets (`fuzz/`, `make fuzz`) drive, one per parser of outside
//! input. Each takes arbitrary bytes and must return without panicking, whatever they are;
//! `tests/fuzz_corpora.rs` replays the committed corpora through the same functions in
//! `make test`.

use prost::Message;

/// An xDS node, as the first request of a stream carries it.
pub fn node_metadata(data: &[u8]) {
    if let Ok(node) = envoy_types::pb::envoy::config::core::v3::Node::decode(data) {
        let _ = crate::xds::node::parse_node(Some(&node));
        let _ = crate::xds::node::admin_port(&node);
        let _ = crate::xds::node::diagnostics_port(&node);
    }
}

/// Consul answers: `/v1/health/service/<name>` and `/v1/health/state/any`.
pub fn consul(data: &[u8]) {
    use crate::sources::consul::{HealthPolicy, parse_checks, parse_health};
    let _ = parse_health(
        data,
        "dc1",
        HealthPolicy::PassingOnly,
        Some("meshbridge-k8s"),
    );
    let _ = parse_health(data, "dc1", HealthPolicy::PassingAndWarning, None);
    let _ = parse_checks(data);
}

/// MeshService and AccessRule manifests, through the one validation path.
pub fn manifests(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::sources::files::parse_manifests("fuzz.yaml", text);
    }
}

/// AdmissionReview bodies to the validating and mutating webhooks.
pub fn admission(data: &[u8]) {
    let declared_in = |_: &str| vec!["shop".to_string()];
    let consul_claim = |service: &str, _: &str| (service == "legacy").then(String::new);
    let ownership = crate::webhook::admission::Ownership {
        declared_in: &declared_in,
        consul_claim: &consul_claim,
    };
    let _ = crate::webhook::admission::review_validate(data, &ownership);
    let settings = crate::webhook::InjectSettings::default();
    let lookup = |_: &str, _: &std::collections::BTreeMap<String, String>| {
        crate::webhook::admission::PodContext {
            namespace_labels: Some(std::collections::BTreeMap::from([(
                crate::api::annotations::INJECT.to_string(),
                "enabled".to_string(),
            )])),
            service: None,
        }
    };
    let ctx = crate::webhook::admission::InjectContext {
        settings: &settings,
        lookup: &lookup,
        fail_closed: false,
    };
    let _ = crate::webhook::admission::review_inject(data, &ctx);
}

/// Caller globs (`from: ["admin-*"]`) against service names: the glob, a zero byte, the name.
pub fn globs(data: &[u8]) {
    let (glob, name) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &b""[..]),
    };
    if let (Ok(glob), Ok(name)) = (std::str::from_utf8(glob), std::str::from_utf8(name)) {
        let _ = crate::model::glob_match(glob, name);
    }
}
