//! `AccessRule`: who may call a service, and what.

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::mesh_service::Condition;

/// Who may call a service (by caller service name or glob), on which paths and methods.
/// Several AccessRules for one target are merged.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "meshbridge.io",
    version = "v1alpha1",
    kind = "AccessRule",
    doc = "Who may call a service, on which paths and methods; several AccessRules for one target are merged.",
    namespaced,
    status = "AccessRuleStatus",
    shortname = "arule",
    printcolumn = r#"{"name":"Target","type":"string","jsonPath":".spec.target"}"#,
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessRuleSpec {
    /// The service these rules protect.
    #[schemars(length(min = 1, max = 253))]
    pub target: String,
    /// What happens to calls no rule allows: `deny` (HTTP 403) or `log` (allowed, logged and
    /// counted as a shadow denial). Default `deny`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action: Option<AccessAction>,
    /// Allowed calls; a call is allowed when any rule matches it.
    #[serde(default)]
    pub rules: Vec<AccessRuleEntry>,
}

/// What happens to calls that no rule allows.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AccessAction {
    /// Refuse with HTTP 403.
    #[default]
    Deny,
    /// Let the call through, log it and count it as a shadow denial.
    Log,
}

/// One allowed combination of callers, paths and methods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AccessRuleEntry {
    /// Caller service names, globs (`admin-*`) or `"*"` for every caller.
    #[schemars(length(min = 1))]
    pub from: Vec<String>,
    /// Paths allowed; empty means every path.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathMatch>,
    /// HTTP methods allowed; empty means every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
}

/// A path matcher: exactly one of `exact`, `prefix` or `regex` (RE2 syntax).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathMatch {
    /// The whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<String>,
    /// A path prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// An RE2 regular expression matching the whole path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regex: Option<String>,
}

/// Observed state of an AccessRule.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AccessRuleStatus {
    /// Generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// `Ready`, and `Degraded` when something is wrong.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Callers named by the rules that resolved to known services.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved_callers: Vec<String>,
    /// Callers named by the rules that match no known service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unknown_callers: Vec<String>,
}
