//! AdmissionReview handling (pure): a request body in, an HTTP status and body out.
//!
//! Follows `admission.k8s.io/v1`
//! (<https://kubernetes.io/docs/reference/access-authn-authz/extensible-admission-controllers/#request>):
//! the response echoes `request.uid`; a mutation is a base64 JSON Patch with
//! `patchType: JSONPatch`; a refusal carries a `status` with code and message; `warnings`
//! reach the user (`kubectl` prints them). A body that is not an AdmissionReview gets HTTP 400
//! naming the problem (the API server then applies the webhook's `failurePolicy`).

use std::collections::BTreeMap;

use base64::Engine;
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use super::inject::{self, InjectSettings, Outcome};
use crate::api::annotations::INJECT;
use crate::api::{AccessRule, MeshService};
use crate::index::convert;

/// An HTTP answer: status code and JSON body.
pub type Answer = (u16, Value);

fn review(response: Value) -> Answer {
    (
        200,
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
    )
}

fn malformed(message: String) -> Answer {
    (400, json!({"error": message}))
}

/// The `request` of an AdmissionReview, or why the body is not one.
fn parse_request(body: &[u8]) -> Result<Value, String> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| format!("request body is not JSON: {e}"))?;
    let (api_version, kind) = (
        v["apiVersion"].as_str().unwrap_or(""),
        v["kind"].as_str().unwrap_or(""),
    );
    if (api_version, kind) != ("admission.k8s.io/v1", "AdmissionReview") {
        return Err(format!(
            "expected an admission.k8s.io/v1 AdmissionReview, got apiVersion {api_version:?} kind {kind:?}"
        ));
    }
    let request = v
        .get("request")
        .filter(|r| r.is_object())
        .ok_or("the AdmissionReview has no request")?;
    if request["uid"].as_str().is_none_or(str::is_empty) {
        return Err("request.uid is missing".to_string());
    }
    Ok(request.clone())
}

fn allowed(uid: &Value, warnings: Vec<String>) -> Value {
    let mut r = json!({"uid": uid, "allowed": true});
    if !warnings.is_empty() {
        r["warnings"] = json!(warnings);
    }
    r
}

fn denied(uid: &Value, code: u16, reason: &str, message: String) -> Value {
    json!({
        "uid": uid,
        "allowed": false,
        "status": {"code": code, "reason": reason, "message": message},
    })
}

/// What the cluster says of a pod.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodContext {
    /// Its namespace's labels (`None`: the namespace is unknown).
    pub namespace_labels: Option<BTreeMap<String, String>>,
    /// The mesh-wide name of the MeshService selecting it, if one does.
    pub service: Option<String>,
}

/// What the injection webhook needs to know.
pub struct InjectContext<'a> {
    /// Sidecar settings.
    pub settings: &'a InjectSettings,
    /// Looks a pod up by namespace and labels (a read of the Kubernetes source's store).
    pub lookup: &'a dyn Fn(&str, &BTreeMap<String, String>) -> PodContext,
    /// Refuse a pod that cannot be injected rather than admit it without a sidecar.
    pub fail_closed: bool,
}

/// Whether a pod asks for the sidecar: its annotation `meshbridge.io/inject` (`"true"` or
/// `"false"`) wins, else its namespace's label `meshbridge.io/inject=enabled`.
pub fn wants_sidecar(
    annotations: Option<&BTreeMap<String, String>>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> bool {
    match annotations.and_then(|a| a.get(INJECT)).map(|v| v.trim()) {
        Some("true") => true,
        Some(_) => false,
        None => namespace_labels
            .and_then(|l| l.get(INJECT))
            .is_some_and(|v| v == "enabled"),
    }
}

/// The mutating webhook: injects the sidecar into a Pod on CREATE.
pub fn review_inject(body: &[u8], ctx: &InjectContext<'_>) -> Answer {
    let request = match parse_request(body) {
        Ok(r) => r,
        Err(e) => return malformed(e),
    };
    let uid = &request["uid"];
    let kind = &request["kind"];
    if (kind["group"].as_str(), kind["kind"].as_str()) != (Some(""), Some("Pod")) {
        return review(allowed(
            uid,
            vec![format!(
                "meshbridge injects Pods only; {}/{} admitted unchanged",
                kind["group"].as_str().unwrap_or("?"),
                kind["kind"].as_str().unwrap_or("?")
            )],
        ));
    }
    if request["operation"] != "CREATE" {
        return review(allowed(uid, vec![]));
    }
    let object = &request["object"];
    // Decided from the raw annotations first: a pod that does not ask for the sidecar is
    // admitted whatever else it carries.
    let annotations: Option<BTreeMap<String, String>> =
        serde_json::from_value(object["metadata"]["annotations"].clone()).ok();
    let namespace = request["namespace"]
        .as_str()
        .or(object["metadata"]["namespace"].as_str())
        .unwrap_or("");
    let labels: BTreeMap<String, String> =
        serde_json::from_value(object["metadata"]["labels"].clone()).unwrap_or_default();
    let PodContext {
        namespace_labels,
        service,
    } = (ctx.lookup)(namespace, &labels);
    if !wants_sidecar(annotations.as_ref(), namespace_labels.as_ref()) {
        return review(allowed(uid, vec![]));
    }
    let parsed: Result<(ObjectMeta, PodSpec), String> = (|| {
        let meta = serde_json::from_value(object["metadata"].clone())
            .map_err(|e| format!("request.object.metadata: {e}"))?;
        let spec = serde_json::from_value(object["spec"].clone())
            .map_err(|e| format!("request.object.spec: {e}"))?;
        Ok((meta, spec))
    })();
    let (mut meta, mut spec) = match parsed {
        Ok(p) => p,
        Err(e) => return malformed(e),
    };
    match inject::inject(&mut meta, &mut spec, ctx.settings, service.as_deref()) {
        Ok(Outcome::Injected) => {
            let mut after = object.clone();
            // Serializing Kubernetes types cannot fail.
            after["metadata"] = serde_json::to_value(&meta).unwrap_or_default();
            after["spec"] = serde_json::to_value(&spec).unwrap_or_default();
            let patch = inject::json_patch(object, &after);
            let encoded = base64::engine::general_purpose::STANDARD
                .encode(serde_json::to_vec(&patch).unwrap_or_default());
            let mut r = allowed(uid, vec![]);
            r["patchType"] = json!("JSONPatch");
            r["patch"] = json!(encoded);
            review(r)
        }
        Ok(Outcome::Unchanged(_)) => review(allowed(uid, vec![])),
        Err(e) if ctx.fail_closed => review(denied(
            uid,
            400,
            "BadRequest",
            format!("meshbridge cannot inject the sidecar: {e}"),
        )),
        Err(e) => review(allowed(
            uid,
            vec![format!(
                "meshbridge did not inject the sidecar: {e}; the pod runs without it"
            )],
        )),
    }
}

/// What the validating webhook asks about who owns a service.
pub struct Ownership<'a> {
    /// The namespaces whose MeshServices declare a service.
    pub declared_in: &'a dyn Fn(&str) -> Vec<String>,
    /// Why a MeshService of a namespace may not declare a service (Consul's), if it may not.
    pub consul_claim: &'a dyn Fn(&str, &str) -> Option<String>,
}

/// The validating webhook: runs the index's own validation on MeshServices and AccessRules,
/// so what is admitted is what meshbridge can use. An AccessRule whose target is declared
/// only in other namespaces would be ignored (`ForeignTarget`), and a MeshService declaring
/// a Consul service from a namespace that does not own Consul's services would not be used
/// (`ConsulService`): both are refused.
pub fn review_validate(body: &[u8], ownership: &Ownership<'_>) -> Answer {
    let request = match parse_request(body) {
        Ok(r) => r,
        Err(e) => return malformed(e),
    };
    let uid = &request["uid"];
    if request["operation"] == "DELETE" {
        return review(allowed(uid, vec![]));
    }
    let kind = request["kind"]["kind"].as_str().unwrap_or("");
    let object = &request["object"];
    let namespace = request["namespace"].as_str().unwrap_or("");
    let name = format!(
        "{namespace}/{}",
        object["metadata"]["name"].as_str().unwrap_or("")
    );
    let errors: Vec<String> = match kind {
        "MeshService" => match serde_path_to_error::deserialize::<_, MeshService>(object.clone()) {
            Err(e) => vec![format!("{}: {}", e.path(), e.inner())],
            Ok(o) => {
                let mut errors: Vec<String> = convert::mesh_service(&o, String::new())
                    .err()
                    .unwrap_or_default()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                if let Some(service) = convert::service_name(&o)
                    && let Some(why) = (ownership.consul_claim)(&service, namespace)
                {
                    let field = if o.spec.service_name.is_some() {
                        "spec.serviceName"
                    } else {
                        "metadata.name"
                    };
                    errors.push(format!("{field}: {why}"));
                }
                errors
            }
        },
        "AccessRule" => match serde_path_to_error::deserialize::<_, AccessRule>(object.clone()) {
            Err(e) => vec![format!("{}: {}", e.path(), e.inner())],
            Ok(o) => {
                let mut errors: Vec<String> = convert::access_rule(&o, name.clone())
                    .err()
                    .unwrap_or_default()
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                let owners = (ownership.declared_in)(o.spec.target.trim());
                if !owners.is_empty() && !owners.iter().any(|n| n == namespace) {
                    errors.push(format!(
                        "spec.target: service {:?} is declared by a MeshService in namespace {}; an AccessRule protects only a service of its own namespace (it would be ignored)",
                        o.spec.target.trim(),
                        owners.join(", ")
                    ));
                }
                errors
            }
        },
        other => {
            return review(allowed(
                uid,
                vec![format!(
                    "meshbridge validates MeshServices and AccessRules only; {other} admitted"
                )],
            ));
        }
    };
    if errors.is_empty() {
        review(allowed(uid, vec![]))
    } else {
        review(denied(
            uid,
            422,
            "Invalid",
            format!("{kind} {name} is invalid: {}", errors.join("; ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A CREATE review of a meshbridge.io object of `kind` in `namespace`.
    fn review_of(kind: &str, namespace: &str, name: &str, spec: serde_json::Value) -> Vec<u8> {
        json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u1",
                "operation": "CREATE",
                "namespace": namespace,
                "kind": {"group": "meshbridge.io", "version": "v1alpha1", "kind": kind},
                "object": {
                    "apiVersion": "meshbridge.io/v1alpha1",
                    "kind": kind,
                    "metadata": {"name": name, "namespace": namespace},
                    "spec": spec
                }
            }
        })
        .to_string()
        .into_bytes()
    }

    fn rule_review(namespace: &str, target: &str) -> Vec<u8> {
        review_of(
            "AccessRule",
            namespace,
            "r",
            json!({"target": target, "rules": [{"from": ["*"]}]}),
        )
    }

    /// `payments` is declared in `shop`; Consul knows `legacy`, which only `platform` may
    /// declare.
    fn with_ownership<T>(f: impl FnOnce(&Ownership<'_>) -> T) -> T {
        let declared_in = |s: &str| {
            if s == "payments" {
                vec!["shop".to_string()]
            } else {
                Vec::new()
            }
        };
        let consul_claim = |service: &str, namespace: &str| {
            (service == "legacy" && namespace != "platform")
                .then(|| "service \"legacy\" is a Consul service".to_string())
        };
        f(&Ownership {
            declared_in: &declared_in,
            consul_claim: &consul_claim,
        })
    }

    fn service_review(namespace: &str, name: &str, spec: serde_json::Value) -> Vec<u8> {
        review_of("MeshService", namespace, name, spec)
    }

    #[test]
    fn a_mesh_service_declaring_a_consul_service_from_another_namespace_is_refused_at_apply() {
        with_ownership(|o| {
            let (_, answer) = review_validate(&service_review("tenant", "legacy", json!({})), o);
            let message = answer["response"]["status"]["message"]
                .as_str()
                .unwrap_or("");
            assert_eq!(answer["response"]["allowed"], false, "{answer}");
            assert!(
                message.contains("metadata.name: service \"legacy\""),
                "{message}"
            );
            // Through spec.serviceName too, naming that field.
            let (_, answer) = review_validate(
                &service_review("tenant", "x", json!({"serviceName": "legacy"})),
                o,
            );
            let message = answer["response"]["status"]["message"]
                .as_str()
                .unwrap_or("");
            assert!(message.contains("spec.serviceName: "), "{answer}");
            for (namespace, name) in [("platform", "legacy"), ("tenant", "orders")] {
                let (_, answer) = review_validate(&service_review(namespace, name, json!({})), o);
                assert_eq!(answer["response"]["allowed"], true, "{answer}");
            }
        });
    }

    #[test]
    fn an_access_rule_for_another_namespaces_service_is_refused_at_apply() {
        with_ownership(|o| {
            let (_, answer) = review_validate(&rule_review("tenant", "payments"), o);
            let response = &answer["response"];
            assert_eq!(response["allowed"], false, "{answer}");
            let message = response["status"]["message"].as_str().unwrap();
            assert!(
                message.contains("declared by a MeshService in namespace shop"),
                "{message}"
            );
            for (namespace, target) in [("shop", "payments"), ("tenant", "unknown")] {
                let (_, answer) = review_validate(&rule_review(namespace, target), o);
                assert_eq!(answer["response"]["allowed"], true, "{answer}");
            }
        });
    }
}
