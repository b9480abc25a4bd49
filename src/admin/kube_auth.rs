//! Admin API callers checked by the Kubernetes API, the way kube-rbac-proxy and
//! metrics-server protect their endpoints (`--admin-kubernetes-auth`):
//! - the bearer token is authenticated with a `TokenReview`
//!   (<https://kubernetes.io/docs/reference/kubernetes-api/authentication-resources/token-review-v1/>);
//! - the call is authorized with a `SubjectAccessReview` on the request's *non-resource*
//!   path and a verb from the method (`GET`/`HEAD` → `get`, `POST` → `create`, as
//!   kube-rbac-proxy maps them), so ordinary RBAC grants it:
//!   `nonResourceURLs: ["/api/*"], verbs: ["get"]` to read, plus `create` on
//!   `/api/proxies/*` to change a proxy's log level
//!   (<https://kubernetes.io/docs/reference/access-authn-authz/rbac/#role-examples>).
//!
//! Answers are cached briefly ([`USER_TTL`], [`DECISION_TTL`]; refusals for less), at most
//! [`CACHE_CAP`] entries each, so a busy UI costs the API server a few calls a minute and a
//! revoked token or binding stops working within a minute. At most [`MAX_IN_FLIGHT`] reviews
//! run at once, each within [`REVIEW_TIMEOUT`]; beyond, callers get 503.

use std::collections::HashMap;
use std::hash::Hash;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    NonResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};

/// How long an authenticated token's user is reused.
pub const USER_TTL: Duration = Duration::from_secs(30);
/// How long an allowed call's decision is reused.
pub const DECISION_TTL: Duration = Duration::from_secs(30);
/// How long a refusal (unknown token, denied call) is reused.
pub const REFUSAL_TTL: Duration = Duration::from_secs(5);
/// Entries kept in each cache at most.
pub const CACHE_CAP: usize = 4096;
/// Reviews in flight at most: callers beyond (say, someone sending random tokens) get 503
/// rather than making this server flood the API server.
pub const MAX_IN_FLIGHT: usize = 16;
/// Time limit of one review.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Where a pod's ServiceAccount token is mounted (sent to peer replicas).
pub const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// A user as the Kubernetes API authenticated it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeUser {
    /// `status.user.username`.
    pub name: String,
    /// `status.user.uid`.
    pub uid: Option<String>,
    /// `status.user.groups`.
    pub groups: Vec<String>,
}

/// What the Kubernetes API said about a call.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Allowed.
    Allow,
    /// Denied, with the authorizer's reason (may be empty).
    Deny(String),
}

/// A map whose entries expire, bounded: when full, expired entries go first, then all.
#[derive(Debug)]
pub struct TtlCache<K, V> {
    entries: HashMap<K, (Instant, V)>,
    cap: usize,
}

impl<K: Eq + Hash, V: Clone> TtlCache<K, V> {
    /// An empty cache of at most `cap` entries.
    pub fn new(cap: usize) -> Self {
        TtlCache {
            entries: HashMap::new(),
            cap,
        }
    }

    /// The value for `key` if it has not expired at `now`.
    pub fn get(&self, key: &K, now: Instant) -> Option<V> {
        self.entries
            .get(key)
            .filter(|(until, _)| *until > now)
            .map(|(_, v)| v.clone())
    }

    /// Keeps `value` until `now + ttl`.
    pub fn put(&mut self, key: K, value: V, now: Instant, ttl: Duration) {
        if self.entries.len() >= self.cap && !self.entries.contains_key(&key) {
            self.entries.retain(|_, (until, _)| *until > now);
            if self.entries.len() >= self.cap {
                self.entries.clear();
            }
        }
        self.entries.insert(key, (now + ttl, value));
    }

    /// Entries held (expired ones included until they are pushed out).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The SubjectAccessReview verb of an HTTP method (kube-rbac-proxy's mapping).
pub fn verb_of(method: &axum::http::Method) -> String {
    use axum::http::Method;
    match *method {
        Method::GET | Method::HEAD => "get",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => return method.as_str().to_ascii_lowercase(),
    }
    .to_string()
}

/// Authenticates and authorizes admin callers through the Kubernetes API.
pub struct KubeAuth {
    client: kube::Client,
    own_token: PathBuf,
    permits: tokio::sync::Semaphore,
    users: Mutex<TtlCache<String, Option<KubeUser>>>,
    decisions: Mutex<TtlCache<(String, String, String), Decision>>,
}

impl std::fmt::Debug for KubeAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeAuth")
            .field("own_token", &self.own_token)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Why the API server could not be asked (the caller gets 503, never a pass).
#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// [`MAX_IN_FLIGHT`] reviews are already waiting.
    #[error("{0}: {MAX_IN_FLIGHT} reviews already in flight")]
    Busy(&'static str),
    /// No answer within [`REVIEW_TIMEOUT`].
    #[error("{0}: no answer within {REVIEW_TIMEOUT:?}")]
    Timeout(&'static str),
    /// The API server refused or could not be reached.
    #[error("{0}: {1}")]
    Api(&'static str, kube::Error),
}

impl KubeAuth {
    /// Reviews with `client`; `own_token` is the file of this pod's ServiceAccount token,
    /// which it sends to its peer replicas.
    pub fn new(client: kube::Client, own_token: PathBuf) -> Self {
        KubeAuth {
            client,
            own_token,
            permits: tokio::sync::Semaphore::new(MAX_IN_FLIGHT),
            users: Mutex::new(TtlCache::new(CACHE_CAP)),
            decisions: Mutex::new(TtlCache::new(CACHE_CAP)),
        }
    }

    /// This pod's ServiceAccount token, read afresh (the kubelet rotates it).
    pub fn own_token(&self) -> Option<String> {
        let text = std::fs::read_to_string(&self.own_token).ok()?;
        let token = text.trim();
        (!token.is_empty()).then(|| token.to_string())
    }

    /// Runs one review call within [`MAX_IN_FLIGHT`] and [`REVIEW_TIMEOUT`].
    async fn bounded<T>(
        &self,
        what: &'static str,
        call: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, ReviewError> {
        let _permit = self
            .permits
            .try_acquire()
            .map_err(|_| ReviewError::Busy(what))?;
        tokio::time::timeout(REVIEW_TIMEOUT, call)
            .await
            .map_err(|_| ReviewError::Timeout(what))?
            .map_err(|e| ReviewError::Api(what, e))
    }

    /// Who `token` is: `Ok(None)` when the API server does not accept it, `Err` when it
    /// could not be asked.
    pub async fn authenticate(&self, token: &str) -> Result<Option<KubeUser>, ReviewError> {
        if let Some(user) = lock(&self.users).get(&token.to_string(), Instant::now()) {
            return Ok(user);
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: token.to_string(),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let answer = self
            .bounded("TokenReview", async {
                Api::<TokenReview>::all(self.client.clone())
                    .create(&PostParams::default(), &review)
                    .await
            })
            .await?;
        let status = answer.status.unwrap_or_default();
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(u)) => u.username.map(|name| KubeUser {
                name,
                uid: u.uid,
                groups: u.groups.unwrap_or_default(),
            }),
            _ => None,
        };
        let ttl = if user.is_some() {
            USER_TTL
        } else {
            REFUSAL_TTL
        };
        lock(&self.users).put(token.to_string(), user.clone(), Instant::now(), ttl);
        Ok(user)
    }

    /// Whether `user` may `verb` the non-resource `path`; `Err` when the API server could
    /// not be asked.
    pub async fn authorize(
        &self,
        user: &KubeUser,
        verb: &str,
        path: &str,
    ) -> Result<Decision, ReviewError> {
        let key = (user.name.clone(), verb.to_string(), path.to_string());
        if let Some(d) = lock(&self.decisions).get(&key, Instant::now()) {
            return Ok(d);
        }
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.name.clone()),
                uid: user.uid.clone(),
                groups: Some(user.groups.clone()),
                non_resource_attributes: Some(NonResourceAttributes {
                    path: Some(path.to_string()),
                    verb: Some(verb.to_string()),
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let answer = self
            .bounded("SubjectAccessReview", async {
                Api::<SubjectAccessReview>::all(self.client.clone())
                    .create(&PostParams::default(), &review)
                    .await
            })
            .await?;
        let status = answer.status.unwrap_or_default();
        let (decision, ttl) = if status.allowed && status.denied != Some(true) {
            (Decision::Allow, DECISION_TTL)
        } else {
            (
                Decision::Deny(status.reason.unwrap_or_default()),
                REFUSAL_TTL,
            )
        };
        lock(&self.decisions).put(key, decision.clone(), Instant::now(), ttl);
        Ok(decision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_answers_expire_and_the_cache_stays_bounded() {
        let t0 = Instant::now();
        let mut c = TtlCache::new(3);
        c.put("a", 1, t0, Duration::from_secs(10));
        c.put("b", 2, t0, Duration::from_secs(1));
        assert_eq!(c.get(&"a", t0), Some(1));
        assert_eq!(c.get(&"b", t0 + Duration::from_secs(2)), None);
        // Full: the expired entry goes first, the live ones stay.
        c.put("c", 3, t0, Duration::from_secs(10));
        c.put("d", 4, t0 + Duration::from_secs(2), Duration::from_secs(10));
        assert_eq!(c.len(), 3);
        assert_eq!(c.get(&"a", t0 + Duration::from_secs(2)), Some(1));
        // Full of live entries: all go, the new one stays.
        c.put("e", 5, t0 + Duration::from_secs(2), Duration::from_secs(10));
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(&"e", t0 + Duration::from_secs(2)), Some(5));
        // Replacing a key never evicts.
        c.put("e", 6, t0, Duration::from_secs(10));
        assert_eq!(c.get(&"e", t0), Some(6));
    }

    #[test]
    fn verbs_follow_the_method() {
        use axum::http::Method;
        assert_eq!(verb_of(&Method::GET), "get");
        assert_eq!(verb_of(&Method::HEAD), "get");
        assert_eq!(verb_of(&Method::POST), "create");
        assert_eq!(verb_of(&Method::DELETE), "delete");
    }
}
