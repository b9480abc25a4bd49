//! The HTTP client of one Consul agent: bounded requests (a semaphore of
//! `max_connections` permits), the ACL token re-read from its file, no redirects, capped
//! bodies, and the blocking-query index rules.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::Semaphore;

use super::wire::HealthPolicy;

/// Why a Consul request failed.
#[derive(Debug, thiserror::Error)]
pub enum ConsulError {
    /// Transport error or timeout.
    #[error("request to {url} failed: {}", root_cause(.source))]
    Transport {
        /// The URL.
        url: String,
        /// The cause.
        source: reqwest::Error,
    },
    /// A non-200 status.
    #[error("{url} answered {status}: {body}")]
    Status {
        /// The URL.
        url: String,
        /// HTTP status.
        status: u16,
        /// Body (shortened).
        body: String,
    },
    /// A body that is not the documented JSON.
    #[error("{url} returned malformed JSON: {source}")]
    Malformed {
        /// The URL.
        url: String,
        /// The cause.
        source: serde_json::Error,
    },
    /// The ACL token file cannot be read.
    #[error("--consul-token-file {path}: {source}")]
    Token {
        /// The file.
        path: String,
        /// The cause.
        source: std::io::Error,
    },
    /// A body beyond [`MAX_BODY`].
    #[error("{url} answered more than {} MiB; refused (the last known state stays)", MAX_BODY >> 20)]
    TooLarge {
        /// The URL.
        url: String,
    },
    /// A bad flag value.
    #[error("{0}")]
    Config(String),
}

/// What went wrong at the bottom of a transport error (`Connection refused`, `timed out`),
/// rather than the client's "error sending request for url (...)", which repeats the URL.
fn root_cause(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        return "timed out".to_string();
    }
    let mut cause: &dyn std::error::Error = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

/// The largest Consul answer read (`/v1/health/state/any` of a datacenter with 100,000
/// instances is some 50 MiB).
pub const MAX_BODY: usize = 128 << 20;

/// The next index to block on, after a response carried `returned` (blocking-query rules:
/// reset to 0 when the index goes backwards; never block on an index below 1).
pub fn next_index(previous: u64, returned: u64) -> u64 {
    if returned < previous {
        0
    } else {
        returned.max(1)
    }
}

/// Backoff after `failures` consecutive errors: 250 ms doubling, capped at 5 s (a local
/// agent that recovers is followed within seconds; a dead one costs a request every 5 s).
pub fn backoff(failures: u32) -> Duration {
    let ms = 250u64.saturating_mul(1 << failures.saturating_sub(1).min(7));
    Duration::from_millis(ms.min(5_000))
}

/// Settings of the Consul source.
#[derive(Clone, Debug)]
pub struct ConsulSettings {
    /// Base URL, e.g. `http://127.0.0.1:8500`.
    pub addr: String,
    /// Datacenters to watch; empty: the agent's own.
    pub datacenters: Vec<String>,
    /// ACL token file, re-read when it changes.
    pub token_file: Option<PathBuf>,
    /// CA bundle for an `https://` agent.
    pub ca_file: Option<PathBuf>,
    /// Which instances receive traffic.
    pub health: HealthPolicy,
    /// Blocking query wait.
    pub wait: Duration,
    /// Most requests in flight to the agent (so most open connections).
    pub max_connections: usize,
}

/// The ACL token, re-read when its file changes.
struct Token {
    path: Option<PathBuf>,
    cached: Mutex<Option<(SystemTime, String)>>,
}

impl Token {
    fn current(&self) -> Result<Option<String>, ConsulError> {
        let Some(path) = &self.path else {
            return Ok(None);
        };
        let err = |source| ConsulError::Token {
            path: path.display().to_string(),
            source,
        };
        let modified = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .map_err(err)?;
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, token)) = cached.as_ref()
            && *at == modified
        {
            return Ok(Some(token.clone()));
        }
        let token = std::fs::read_to_string(path)
            .map_err(err)?
            .trim()
            .to_string();
        *cached = Some((modified, token.clone()));
        Ok(Some(token))
    }
}

/// A Consul HTTP client bounded to `max_connections` requests in flight.
#[derive(Clone)]
pub struct ConsulClient {
    http: reqwest::Client,
    base: String,
    token: Arc<Token>,
    permits: Arc<Semaphore>,
    wait: Duration,
}

impl ConsulClient {
    /// A client for `settings`.
    pub fn new(settings: &ConsulSettings) -> Result<Self, ConsulError> {
        let mut builder = reqwest::Client::builder()
            // A burst (the first full fetch) may use every permit; its connections are kept
            // for reuse rather than closed and reopened (which would briefly exceed the
            // limit on the agent's side), and idle ones close after 30 s.
            .pool_max_idle_per_host(settings.max_connections)
            .pool_idle_timeout(Duration::from_secs(30))
            .connect_timeout(Duration::from_secs(5))
            // The token goes to the configured agent only: a redirect is an error, never
            // followed (it would carry `X-Consul-Token` wherever it points).
            .redirect(reqwest::redirect::Policy::none());
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca).map_err(|e| {
                ConsulError::Config(format!("--consul-ca-file {}: {e}", ca.display()))
            })?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                ConsulError::Config(format!("--consul-ca-file {}: {e}", ca.display()))
            })?;
            builder = builder.add_root_certificate(cert);
        }
        let http = builder
            .build()
            .map_err(|e| ConsulError::Config(format!("Consul client: {e}")))?;
        Ok(ConsulClient {
            http,
            base: settings.addr.trim_end_matches('/').to_string(),
            token: Arc::new(Token {
                path: settings.token_file.clone(),
                cached: Mutex::new(None),
            }),
            permits: Arc::new(Semaphore::new(settings.max_connections.max(1))),
            wait: settings.wait,
        })
    }

    /// A GET; with `index > 0` a blocking query waiting at most `wait` (with jitter).
    /// Returns the `X-Consul-Index` and the body.
    pub async fn get(
        &self,
        path: &str,
        dc: Option<&str>,
        index: u64,
        jitter_seed: u64,
    ) -> Result<(u64, bytes::Bytes), ConsulError> {
        let a = self.get_answer(path, dc, index, jitter_seed).await?;
        Ok((a.index, a.body))
    }

    /// [`Self::get`], also telling whether Consul hid results from this token.
    pub async fn get_answer(
        &self,
        path: &str,
        dc: Option<&str>,
        index: u64,
        jitter_seed: u64,
    ) -> Result<Answer, ConsulError> {
        let mut url = format!("{}{path}", self.base);
        let mut sep = if path.contains('?') { '&' } else { '?' };
        if let Some(dc) = dc {
            url.push_str(&format!("{sep}dc={dc}"));
            sep = '&';
        }
        let wait = self
            .wait
            .mul_f64(0.85 + 0.15 * ((jitter_seed % 1000) as f64 / 1000.0));
        if index > 0 {
            url.push_str(&format!("{sep}index={index}&wait={}ms", wait.as_millis()));
        }
        // Consul adds up to wait/16 of jitter; leave room before giving up.
        let timeout = if index > 0 {
            wait + wait / 16 + Duration::from_secs(5)
        } else {
            Duration::from_secs(10)
        };
        let req = self.http.get(&url).timeout(timeout);
        self.send(req, url).await
    }

    /// Sends a request with the token, within the connection limit. Returns the answer to
    /// a 200; anything else is an error.
    async fn send(
        &self,
        mut req: reqwest::RequestBuilder,
        url: String,
    ) -> Result<Answer, ConsulError> {
        let token = self.token.current()?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| ConsulError::Config("client closed".into()))?;
        if let Some(t) = token {
            req = req.header("X-Consul-Token", t);
        }
        let transport = |source| ConsulError::Transport {
            url: url.clone(),
            source,
        };
        let mut resp = req.send().await.map_err(transport)?;
        let status = resp.status().as_u16();
        let returned = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let acl_filtered = resp
            .headers()
            .get("X-Consul-Results-Filtered-By-ACLs")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"true"));
        let mut body = bytes::BytesMut::new();
        while let Some(chunk) = resp.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_BODY {
                return Err(ConsulError::TooLarge { url });
            }
            body.extend_from_slice(&chunk);
        }
        let body = body.freeze();
        if status != 200 {
            let text = String::from_utf8_lossy(&body);
            return Err(ConsulError::Status {
                url,
                status,
                body: text.chars().take(200).collect(),
            });
        }
        Ok(Answer {
            index: returned,
            body,
            acl_filtered,
        })
    }

    /// A PUT of a JSON body (catalog writes). Returns the response body.
    pub async fn put(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<bytes::Bytes, ConsulError> {
        let url = format!("{}{path}", self.base);
        let req = self
            .http
            .put(&url)
            .timeout(Duration::from_secs(10))
            .json(body);
        Ok(self.send(req, url).await?.body)
    }

    /// The agent's own datacenter (`/v1/agent/self`).
    pub async fn agent_datacenter(&self) -> Result<String, ConsulError> {
        let url = format!("{}/v1/agent/self", self.base);
        let (_, body) = self.get("/v1/agent/self", None, 0, 0).await?;
        let v: serde_json::Value =
            serde_json::from_slice(&body).map_err(|source| ConsulError::Malformed {
                url: url.clone(),
                source,
            })?;
        v["Config"]["Datacenter"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| ConsulError::Config(format!("{url}: no Config.Datacenter")))
    }
}

/// A 200 answer of the agent.
#[derive(Clone, Debug)]
pub struct Answer {
    /// `X-Consul-Index` (0 when absent).
    pub index: u64,
    /// The body.
    pub body: bytes::Bytes,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: Consul left out results this token may not
    /// read (Consul 1.11+), so the answer is not the whole truth.
    pub acl_filtered: bool,
}
