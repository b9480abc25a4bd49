//! Access policies: who may call a service, on which paths and methods.
//!
//! The index turns AccessRule resources into these; enforcement on the ingress listener is
//! built from them by translation.

use serde::Serialize;

/// What happens to calls no rule allows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AccessAction {
    /// Refuse with HTTP 403.
    #[default]
    Deny,
    /// Allow, but log and count as a shadow denial.
    Log,
}

/// Callers a rule names.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallerMatch {
    /// Every caller.
    Any,
    /// A service name or a glob over service names.
    Service(String),
}

/// A path matcher.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// A path prefix.
    Prefix(String),
    /// An RE2 regular expression over the whole path.
    Regex(String),
}

/// One allowed combination of callers, paths and methods.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct AccessRuleSet {
    /// Who.
    pub from: Vec<CallerMatch>,
    /// Which paths (empty: all).
    pub paths: Vec<PathMatch>,
    /// Which methods, upper case (empty: all).
    pub methods: Vec<String>,
}

/// The merged access policy of one target service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AccessPolicy {
    /// The protected service.
    pub target: String,
    /// `Deny` if any contributing rule denies, else `Log`.
    pub action: AccessAction,
    /// Allowed calls, sorted and deduplicated.
    pub rules: Vec<AccessRuleSet>,
    /// The resources this policy was merged from (`namespace/name` or `file#doc`).
    pub sources: Vec<String>,
}

impl AccessPolicy {
    /// The callers its rules name, as written (`"*"` for every caller).
    pub fn caller_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().flat_map(|r| {
            r.from.iter().map(|c| match c {
                CallerMatch::Any => "*",
                CallerMatch::Service(s) => s.as_str(),
            })
        })
    }
}
