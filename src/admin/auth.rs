//! Who may use the admin API. Without `--admin-token-file` or `--admin-kubernetes-auth`
//! anyone who reaches the port may (README: bind it to loopback or the pod IP). With either,
//! every `/api` call needs `Authorization: Bearer TOKEN`; `/healthz`, `/readyz`, the UI's
//! static files and (unless `--admin-metrics-auth`) `/metrics` stay open.
//! - A token file has one line per token, `TOKEN [USER] [read]`: `read` tokens may not
//!   change anything (`POST`), and `USER` is who the audit names (else `token:<line>`). The
//!   file is re-read when it changes; a file that no longer reads keeps the tokens last read.
//! - In a cluster, tokens not in the file are checked with the Kubernetes API (TokenReview,
//!   then SubjectAccessReview per call: [`super::kube_auth`]); the audit names the user the
//!   API server authenticated.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AdminState;
use super::changes::AuditEntry;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// Who the audit names.
    pub user: String,
    /// Whether it may change things (`POST`), not only read.
    pub write: bool,
}

/// Bearer tokens from a file, re-read when it changes.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    cached: Mutex<(Option<Stamp>, Tokens)>,
}

/// A file's length and modification time.
type Stamp = (u64, SystemTime);

/// Tokens and whom they name.
type Tokens = Vec<(String, Principal)>;

/// Why a token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// A line's token is too short to be a secret.
    #[error("line {0}: a token must be at least 16 characters")]
    ShortToken(usize),
    /// A line's third word is not `read`.
    #[error("line {line}: {word:?}: the third word may only be `read`")]
    ThirdWord {
        /// The line (from 1).
        line: usize,
        /// The word found.
        word: String,
    },
    /// No line holds a token.
    #[error("no token in the file")]
    Empty,
    /// The file cannot be read.
    #[error("{0}")]
    Read(#[from] std::io::Error),
    /// One of the above, in a named file.
    #[error("{}: {error}", path.display())]
    In {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong with it.
        error: Box<TokenFileError>,
    },
}

/// Parses a token file: `TOKEN [USER] [read]` per line, `#` comments and blank lines skipped.
pub fn parse_tokens(text: &str) -> Result<Tokens, TokenFileError> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let token = words.next().unwrap_or_default();
        if token.len() < 16 {
            return Err(TokenFileError::ShortToken(i + 1));
        }
        let user = words
            .next()
            .map_or_else(|| format!("token:{}", i + 1), str::to_string);
        let write = match words.next() {
            None => true,
            Some("read") => false,
            Some(other) => {
                return Err(TokenFileError::ThirdWord {
                    line: i + 1,
                    word: other.to_string(),
                });
            }
        };
        out.push((token.to_string(), Principal { user, write }));
    }
    if out.is_empty() {
        return Err(TokenFileError::Empty);
    }
    Ok(out)
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Compares without stopping at the first difference (no timing hint about the token).
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl TokenFile {
    /// Reads `path`; fails naming it and the line at fault.
    pub fn new(path: &Path) -> Result<Self, TokenFileError> {
        let in_file = |error| TokenFileError::In {
            path: path.to_path_buf(),
            error: Box::new(error),
        };
        let text = std::fs::read_to_string(path).map_err(|e| in_file(e.into()))?;
        let tokens = parse_tokens(&text).map_err(in_file)?;
        Ok(TokenFile {
            path: path.to_path_buf(),
            cached: Mutex::new((stamp(path), tokens)),
        })
    }

    /// The file's first token (for calls to peer replicas, which share the file).
    pub fn first_token(&self) -> Option<String> {
        let cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        cached.1.first().map(|(t, _)| t.clone())
    }

    /// The caller `token` names, reading the file again first if it changed.
    pub fn principal(&self, token: &str) -> Option<Principal> {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        let now = stamp(&self.path);
        if now != cached.0 {
            match std::fs::read_to_string(&self.path)
                .map_err(TokenFileError::from)
                .and_then(|t| parse_tokens(&t))
            {
                Ok(tokens) => *cached = (now, tokens),
                Err(e) => {
                    tracing::warn!(file = %self.path.display(), error = %e, "admin token file not re-read; the tokens last read stay");
                    cached.0 = now;
                }
            }
        }
        cached
            .1
            .iter()
            .find(|(t, _)| same(t.as_bytes(), token.as_bytes()))
            .map(|(_, p)| p.clone())
    }
}

/// How admin callers are checked: bearer tokens from a file, the Kubernetes API, or both
/// (the file first). Neither: the API is open to whoever reaches it.
#[derive(Debug, Default)]
pub struct AdminAuth {
    /// `--admin-token-file`.
    pub tokens: Option<TokenFile>,
    /// `--admin-kubernetes-auth`.
    pub kube: Option<super::kube_auth::KubeAuth>,
}

/// Why a call is refused.
#[derive(Debug)]
pub struct Refusal {
    /// 401, 403 or 503 (the Kubernetes API could not be asked).
    pub status: StatusCode,
    /// Said to the caller and the audit.
    pub message: String,
    /// Who the caller was, when the token named someone.
    pub who: Option<String>,
}

fn refuse(status: StatusCode, who: Option<String>, message: impl Into<String>) -> Refusal {
    Refusal {
        status,
        message: message.into(),
        who,
    }
}

/// Request paths longer than this are refused before any review (they would be cache keys).
const MAX_PATH: usize = 2048;

impl AdminAuth {
    /// Whether nobody is checked.
    pub fn is_open(&self) -> bool {
        self.tokens.is_none() && self.kube.is_none()
    }

    /// What this instance sends to its peer replicas: the token file's first token (replicas
    /// share the file), else its own ServiceAccount token.
    pub fn peer_token(&self) -> Option<String> {
        self.tokens
            .as_ref()
            .and_then(TokenFile::first_token)
            .or_else(|| self.kube.as_ref().and_then(|k| k.own_token()))
    }

    /// Who is calling `method path` with `bearer`, and whether they may.
    pub async fn check(
        &self,
        method: &Method,
        path: &str,
        bearer: Option<&str>,
    ) -> Result<Principal, Refusal> {
        let Some(token) = bearer else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                None,
                "authentication required: send Authorization: Bearer <token> (meshbridge ctl --token-file, or the UI's token field)",
            ));
        };
        let reading = *method == Method::GET || *method == Method::HEAD;
        if let Some(p) = self.tokens.as_ref().and_then(|t| t.principal(token)) {
            if !p.write && !reading {
                let message = format!("{} may only read (a `read` token)", p.user);
                return Err(refuse(StatusCode::FORBIDDEN, Some(p.user), message));
            }
            return Ok(p);
        }
        let Some(kube) = &self.kube else {
            return Err(refuse(
                StatusCode::UNAUTHORIZED,
                None,
                "the bearer token is not one of --admin-token-file",
            ));
        };
        if path.len() > MAX_PATH {
            return Err(refuse(
                StatusCode::FORBIDDEN,
                None,
                format!("request path longer than {MAX_PATH} bytes"),
            ));
        }
        let unavailable = |e: super::kube_auth::ReviewError| {
            refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                format!("the Kubernetes API could not check the call: {e}"),
            )
        };
        let user = match kube.authenticate(token).await.map_err(unavailable)? {
            Some(user) => user,
            None => {
                let message = if self.tokens.is_some() {
                    "the bearer token is neither one of --admin-token-file nor accepted by the Kubernetes API (TokenReview)"
                } else {
                    "the Kubernetes API does not accept the bearer token (TokenReview)"
                };
                return Err(refuse(StatusCode::UNAUTHORIZED, None, message));
            }
        };
        let verb = super::kube_auth::verb_of(method);
        match kube
            .authorize(&user, &verb, path)
            .await
            .map_err(|e| Refusal {
                who: Some(user.name.clone()),
                ..unavailable(e)
            })? {
            super::kube_auth::Decision::Allow => Ok(Principal {
                user: user.name,
                write: true,
            }),
            super::kube_auth::Decision::Deny(reason) => {
                let because = if reason.is_empty() {
                    String::new()
                } else {
                    format!(": {reason}")
                };
                let message = format!(
                    "{} may not {verb} {path} (SubjectAccessReview{because}); grant it nonResourceURLs [\"{path}\"] verbs [\"{verb}\"], e.g. with the chart's ClusterRoles",
                    user.name
                );
                Err(refuse(StatusCode::FORBIDDEN, Some(user.name), message))
            }
        }
    }
}

/// Paths served to anyone: probes, the UI's static files, and `/metrics` unless it is
/// protected too.
fn open_path(path: &str, metrics_open: bool) -> bool {
    matches!(
        path,
        "/healthz" | "/readyz" | "/" | "/ui/app.js" | "/ui/app.css"
    ) || (metrics_open && path == "/metrics")
}

/// The middleware: lets open paths through, else authenticates and authorizes the caller,
/// and hands the [`Principal`] to the handlers. Refusals are audited.
pub async fn require(State(s): State<AdminState>, mut req: Request, next: Next) -> Response {
    if s.auth.is_open() || open_path(req.uri().path(), !s.metrics_auth) {
        return next.run(req).await;
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let refusal = match s.auth.check(req.method(), req.uri().path(), bearer).await {
        Ok(p) => {
            req.extensions_mut().insert(p);
            return next.run(req).await;
        }
        Err(r) => r,
    };
    let from = req
        .extensions()
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.to_string());
    let status = refusal.status;
    let entry = AuditEntry {
        at: crate::sources::now_secs(),
        who: refusal.who,
        from,
        action: "admin-call".into(),
        node: String::new(),
        detail: crate::xds::loggable(&format!("{} {}", req.method(), req.uri().path()), 512),
        result: crate::xds::loggable(&format!("{}: {}", status.as_u16(), refusal.message), 1024),
        service: None,
    };
    tracing::info!(target: "meshbridge::audit", who = ?entry.who, from = ?entry.from, detail = %entry.detail, result = %entry.result, "admin call refused");
    s.audit.push(entry);
    let mut r = (status, axum::Json(json!({"error": refusal.message}))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"meshbridge\""),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lines_name_users_and_read_only_tokens() {
        let t = parse_tokens(
            "# operators\n0123456789abcdef alice\n\nfedcba9876543210 grafana read\n1111222233334444\n",
        )
        .unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            t[0].1,
            Principal {
                user: "alice".into(),
                write: true
            }
        );
        assert!(!t[1].1.write);
        assert_eq!(t[2].1.user, "token:5");
        assert!(
            parse_tokens("short")
                .unwrap_err()
                .to_string()
                .contains("line 1")
        );
        assert!(
            parse_tokens("0123456789abcdef bob admin")
                .unwrap_err()
                .to_string()
                .contains("`read`")
        );
        assert!(parse_tokens("# nothing\n").is_err());
    }

    #[test]
    fn the_file_is_re_read_when_it_changes_and_a_broken_one_keeps_the_last_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "0123456789abcdef alice\n").unwrap();
        let f = TokenFile::new(&path).unwrap();
        assert_eq!(f.principal("0123456789abcdef").unwrap().user, "alice");
        assert!(f.principal("0123456789abcdeX").is_none());
        std::fs::write(&path, "fedcba9876543210 bob with-more-bytes-now\n").ok();
        // An invalid file (third word) keeps alice.
        assert!(f.principal("0123456789abcdef").is_some());
        std::fs::write(&path, "fedcba9876543210 bob\n").unwrap();
        assert_eq!(f.principal("fedcba9876543210").unwrap().user, "bob");
        assert!(f.principal("0123456789abcdef").is_none());
    }
}
