//! Custom resource types (`meshbridge.io/v1alpha1`): the user-facing API.
//!
//! These types only describe the wire format; turning them into the domain model (and
//! validating what the schema cannot express) happens in [`crate::index::convert`], the one
//! validation path shared by every source.

pub mod access_rule;
pub mod annotations;
pub mod mesh_service;

pub use access_rule::{AccessRule, AccessRuleSpec};
pub use mesh_service::{MeshService, MeshServiceSpec};

use kube::CustomResourceExt;

/// API group of every meshbridge resource.
pub const GROUP: &str = "meshbridge.io";
/// API version of every meshbridge resource.
pub const VERSION: &str = "v1alpha1";

/// The CustomResourceDefinitions as `(file name, YAML)` pairs, sorted by file name.
///
/// `crds/` holds exactly these files; `meshbridge crds` prints them joined by `---`.
pub fn crd_documents() -> Vec<(&'static str, String)> {
    vec![
        ("accessrules.yaml", to_yaml(&AccessRule::crd())),
        ("meshservices.yaml", to_yaml(&MeshService::crd())),
    ]
}

/// Every CRD in one multi-document YAML stream (what `meshbridge crds` prints).
pub fn crds_yaml() -> String {
    crd_documents()
        .into_iter()
        .map(|(_, y)| y)
        .collect::<Vec<_>>()
        .join("---\n")
}

fn to_yaml<T: serde::Serialize>(value: &T) -> String {
    // Serializing a CRD (plain maps, strings and numbers) cannot fail.
    serde_norway::to_string(value).unwrap_or_else(|e| panic!("CRD serializes to YAML: {e}"))
}

/// Name of the sidecar container the injector adds; a pod carrying it is reached through its
/// Envoy ingress port.
pub const SIDECAR_CONTAINER: &str = "meshbridge-proxy";
/// Ingress port of an injected sidecar unless the pod says otherwise.
pub const DEFAULT_INGRESS_PORT: u16 = 15006;
