//! Comparing meshbridge instances: do the replicas serving xDS agree on the model?
//!
//! Each instance publishes a digest of its whole model and one per service and per access
//! target (`/api/state?detail=true`). Comparing digests finds the services that differ; for
//! those, the peer's `/api/services/{name}` says which instances and fields differ. Peers come
//! from `--peer URL` and from `--peers-dns HOST:PORT` (every address of a headless Service),
//! never from the request, so the admin API cannot be used to reach arbitrary addresses.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use axum::Json;
use axum::extract::State;
use futures::{StreamExt, stream};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::de::DeserializeOwned;

use super::views::{
    CompareView, Differences, InstanceView, PeerComparison, SelfDigest, ServiceDetail,
    ServiceDifference, StateView,
};
use super::{AdminState, service_detail, state_detail};
use crate::metrics::label;
use crate::model::MeshState;

/// Where the peers are.
#[derive(Clone, Debug, Default)]
pub struct PeerSettings {
    /// Admin URLs given with `--peer`.
    pub urls: Vec<String>,
    /// `HOST:PORT` whose addresses are the instances' admin addresses.
    pub dns: Option<String>,
    /// This instance's id (`/api/state` `instance`), to skip itself among DNS answers.
    pub instance: String,
}

/// How many differing services are examined instance by instance.
const DETAILED_SERVICES: usize = 50;

/// How many `/api/services/{name}` requests go to one peer at a time.
const DETAIL_CONCURRENCY: usize = 8;

/// How many peers are compared at a time.
const PEER_CONCURRENCY: usize = 8;

/// The largest answer read from a peer.
const MAX_PEER_BODY: usize = 32 * 1024 * 1024;

/// The whole comparison's time limit, in request time limits.
const OVERALL_LIMIT_FACTOR: u32 = 4;

/// The peers' admin URLs now; the DNS lookup is bounded by `timeout`.
pub async fn peer_urls(
    settings: &PeerSettings,
    timeout: Duration,
) -> (Vec<String>, Option<String>) {
    let mut urls: BTreeSet<String> = settings
        .urls
        .iter()
        .map(|u| u.trim_end_matches('/').to_string())
        .collect();
    let mut error = None;
    if let Some(dns) = &settings.dns {
        match tokio::time::timeout(timeout, tokio::net::lookup_host(dns.as_str())).await {
            Ok(Ok(addrs)) => urls.extend(addrs.map(|a| format!("http://{a}"))),
            Ok(Err(e)) => error = Some(format!("--peers-dns {dns}: {e}")),
            Err(_) => error = Some(format!("--peers-dns {dns}: no answer within {timeout:?}")),
        }
    }
    (urls.into_iter().collect(), error)
}

/// Sets of names that differ between two digest maps (pure).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DigestDiff {
    /// Names only here.
    pub only_here: Vec<String>,
    /// Names only there.
    pub only_there: Vec<String>,
    /// Names on both sides with different digests.
    pub changed: Vec<String>,
}

/// Compares `{name: digest}` maps.
pub fn diff_digests(
    here: &BTreeMap<String, String>,
    there: &BTreeMap<String, String>,
) -> DigestDiff {
    DigestDiff {
        only_here: here
            .keys()
            .filter(|k| !there.contains_key(*k))
            .cloned()
            .collect(),
        only_there: there
            .keys()
            .filter(|k| !here.contains_key(*k))
            .cloned()
            .collect(),
        changed: here
            .iter()
            .filter(|(k, v)| there.get(*k).is_some_and(|o| o != *v))
            .map(|(k, _)| k.clone())
            .collect(),
    }
}

fn instances_by_key(service: &ServiceDetail) -> BTreeMap<String, &InstanceView> {
    service
        .instances
        .iter()
        .map(|i| (format!("{}:{}", i.address, i.port), i))
        .collect()
}

/// How one service differs between two `/api/services/{name}` answers (pure).
pub fn diff_service(name: &str, here: &ServiceDetail, there: &ServiceDetail) -> ServiceDifference {
    let mut fields = Vec::new();
    let differ = [
        ("declared", here.declared != there.declared),
        ("mtls", here.mtls != there.mtls),
        ("dependencies", here.dependencies != there.dependencies),
    ];
    fields.extend(
        differ
            .iter()
            .filter(|(_, d)| *d)
            .map(|(f, _)| f.to_string()),
    );
    let (h, t) = (instances_by_key(here), instances_by_key(there));
    for (key, hi) in &h {
        let Some(ti) = t.get(key) else { continue };
        let differ = [
            ("origin", hi.origin != ti.origin),
            ("datacenter", hi.datacenter != ti.datacenter),
            ("tags", hi.tags != ti.tags),
            ("weight", hi.weight != ti.weight),
            ("healthy", hi.healthy != ti.healthy),
        ];
        for (field, _) in differ.iter().filter(|(_, d)| *d) {
            fields.push(format!("instances[{key}].{field}"));
        }
    }
    ServiceDifference {
        error: None,
        fields,
        instances_only_here: h.keys().filter(|k| !t.contains_key(*k)).cloned().collect(),
        instances_only_there: t.keys().filter(|k| !h.contains_key(*k)).cloned().collect(),
        name: name.to_string(),
    }
}

/// Why a peer's answer is missing (shown in the comparison; the peer counts as disagreeing).
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    /// The peer's URL does not parse or cannot take a path.
    #[error("{peer}: {reason}")]
    Url {
        /// The peer as configured.
        peer: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The request failed (connection, timeout, a broken body).
    #[error("{url}: {error}")]
    Request {
        /// What was asked.
        url: String,
        /// The failure.
        error: reqwest::Error,
    },
    /// The peer answered with an error status.
    #[error("{url}: answered {status}")]
    Status {
        /// What was asked.
        url: String,
        /// Its answer.
        status: reqwest::StatusCode,
    },
    /// The answer is larger than a comparison reads.
    #[error("{url}: answer larger than {} MiB", MAX_PEER_BODY >> 20)]
    TooLarge {
        /// What was asked.
        url: String,
    },
    /// The answer is not the JSON of the admin API.
    #[error("{url}: not JSON: {error}")]
    NotJson {
        /// What was asked.
        url: String,
        /// The decoding error.
        error: serde_json::Error,
    },
}

/// `{peer}/api/services/{name}`, the name percent-encoded as one path segment.
pub fn service_url(peer: &str, name: &str) -> Result<reqwest::Url, PeerError> {
    let bad = |reason: String| PeerError::Url {
        peer: peer.to_string(),
        reason,
    };
    let mut url = reqwest::Url::parse(peer).map_err(|e| bad(e.to_string()))?;
    url.path_segments_mut()
        .map_err(|()| bad("not a base URL".into()))?
        .pop_if_empty()
        .extend(["api", "services", name]);
    Ok(url)
}

async fn get_json<T: DeserializeOwned>(s: &AdminState, url: &str) -> Result<T, PeerError> {
    let mut req = s.http.get(url).timeout(s.diagnostics_timeout);
    // Replicas share the token file (a peer accepts this instance's first token) or the
    // cluster (a peer accepts this pod's ServiceAccount token).
    if let Some(token) = s.auth.peer_token() {
        req = req.bearer_auth(token);
    }
    let request = |error| PeerError::Request {
        url: url.to_string(),
        error,
    };
    let mut resp = req.send().await.map_err(request)?;
    let status = resp.status();
    if !status.is_success() {
        return Err(PeerError::Status {
            url: url.to_string(),
            status,
        });
    }
    let too_large = || PeerError::TooLarge {
        url: url.to_string(),
    };
    if resp
        .content_length()
        .is_some_and(|n| n > MAX_PEER_BODY as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(request)? {
        if body.len() + chunk.len() > MAX_PEER_BODY {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|error| PeerError::NotJson {
        url: url.to_string(),
        error,
    })
}

/// An entry of `services_changed` whose details could not be fetched.
fn undetailed(name: &str, error: &str) -> ServiceDifference {
    ServiceDifference {
        error: Some(error.to_string()),
        name: name.to_string(),
        ..Default::default()
    }
}

/// The `differences` of a peer (pure): `details` are this instance's view and the peer's
/// answer (or the error fetching it) for the first [`DETAILED_SERVICES`] changed services,
/// in order. Returns the first error too.
fn differences(
    services: &DigestDiff,
    access: &DigestDiff,
    details: Vec<(Option<ServiceDetail>, Result<ServiceDetail, String>)>,
) -> (Differences, Option<String>) {
    let mut error = None;
    let changed: Vec<ServiceDifference> = services
        .changed
        .iter()
        .zip(details)
        .map(|(name, (ours, theirs))| match (ours, theirs) {
            (Some(ours), Ok(theirs)) => diff_service(name, &ours, &theirs),
            // Gone here since the digests were taken: every field and instance is theirs.
            (None, Ok(theirs)) => ServiceDifference {
                fields: ["declared", "mtls", "dependencies"]
                    .map(String::from)
                    .into(),
                instances_only_there: instances_by_key(&theirs).into_keys().collect(),
                name: name.clone(),
                ..Default::default()
            },
            (_, Err(e)) => {
                let entry = undetailed(name, &e);
                error.get_or_insert(e);
                entry
            }
        })
        .collect();
    let d = Differences {
        access_changed: access.changed.clone(),
        access_only_here: access.only_here.clone(),
        access_only_there: access.only_there.clone(),
        services_changed: changed,
        services_changed_count: services.changed.len(),
        services_only_here: services.only_here.clone(),
        services_only_there: services.only_there.clone(),
    };
    (d, error)
}

/// A peer compared, or this instance itself found among the peers.
pub enum PeerOutcome {
    /// The peer is this instance (found through DNS).
    Itself,
    /// Another instance.
    Compared(Box<PeerComparison>),
}

/// Compares this instance's state with one peer's.
pub async fn compare_peer(
    s: &AdminState,
    state: &MeshState,
    here: &StateView,
    peer: &str,
) -> PeerOutcome {
    let there: StateView = match get_json(s, &format!("{peer}/api/state?detail=true")).await {
        Ok(v) => v,
        Err(e) => return PeerOutcome::Compared(Box::new(failed(peer, e.to_string()))),
    };
    if there.instance == here.instance {
        return PeerOutcome::Itself;
    }
    let agree = there.digest == here.digest;
    let empty = BTreeMap::new();
    let digests = |v: &Option<BTreeMap<String, String>>| v.as_ref().unwrap_or(&empty).clone();
    let services = diff_digests(
        &digests(&here.service_digests),
        &digests(&there.service_digests),
    );
    let access = diff_digests(
        &digests(&here.access_digests),
        &digests(&there.access_digests),
    );
    let detailed = &services.changed[..services.changed.len().min(DETAILED_SERVICES)];
    let mut theirs: Vec<(usize, Result<ServiceDetail, PeerError>)> =
        stream::iter(detailed.iter().cloned().enumerate())
            .map(|(i, name)| async move {
                let answer = match service_url(peer, &name) {
                    Ok(url) => get_json(s, url.as_str()).await,
                    Err(e) => Err(e),
                };
                (i, answer)
            })
            .buffer_unordered(DETAIL_CONCURRENCY)
            .collect()
            .await;
    theirs.sort_by_key(|(i, _)| *i);
    let details = detailed
        .iter()
        .zip(theirs)
        .map(|(name, (_, t))| {
            let t = t.map_err(|e| e.to_string());
            (service_detail(s, state, name), t)
        })
        .collect();
    let (differences, error) = differences(&services, &access, details);
    PeerOutcome::Compared(Box::new(PeerComparison {
        agree,
        differences: Some(differences),
        digest: Some(there.digest),
        error,
        peer: peer.to_string(),
    }))
}

/// A peer that could not be compared.
fn failed(peer: &str, error: String) -> PeerComparison {
    PeerComparison {
        agree: false,
        differences: None,
        digest: None,
        error: Some(error),
        peer: peer.to_string(),
    }
}

/// Sets `meshbridge_peer_agree` for `current` (peer, agrees) and removes the series of
/// peers in `previous` that are not there any more; `previous` becomes the current peers.
fn update_peer_series(
    family: &Family<label::Peer, Gauge>,
    previous: &mut BTreeSet<String>,
    current: &[(String, bool)],
) {
    let now: BTreeSet<String> = current.iter().map(|(p, _)| p.clone()).collect();
    for (peer, agree) in current {
        family
            .get_or_create(&label::Peer {
                peer: peer.to_string(),
            })
            .set(i64::from(*agree));
    }
    for gone in previous.difference(&now) {
        family.remove(&label::Peer {
            peer: gone.to_string(),
        });
    }
    *previous = now;
}

/// Compares with every peer, within `OVERALL_LIMIT_FACTOR` request time limits; sets
/// `meshbridge_peer_agree`.
pub async fn compare_all(s: &AdminState) -> CompareView {
    let limit = s.diagnostics_timeout * OVERALL_LIMIT_FACTOR;
    let deadline = tokio::time::Instant::now() + limit;
    let state = s.cache.state();
    let here = state_detail(&state, &s.peers.instance);
    let (urls, dns_error) = peer_urls(&s.peers, s.diagnostics_timeout).await;
    let (state, here) = (&state, &here);
    let results: Vec<PeerOutcome> = stream::iter(urls.iter().cloned())
        .map(|url| async move {
            match tokio::time::timeout_at(deadline, compare_peer(s, state, here, &url)).await {
                Ok(v) => v,
                Err(_) => PeerOutcome::Compared(Box::new(failed(
                    &url,
                    format!("{url}: not compared within {limit:?}, the time limit of a comparison"),
                ))),
            }
        })
        .buffered(PEER_CONCURRENCY)
        .collect()
        .await;
    let mut peers = Vec::new();
    let mut series = Vec::new();
    for (url, result) in urls.iter().zip(results) {
        let PeerOutcome::Compared(result) = result else {
            continue;
        };
        series.push((url.clone(), result.agree));
        if !result.agree {
            tracing::warn!(peer = %url, error = ?result.error.as_deref(), "a peer meshbridge instance disagrees with this one");
        }
        peers.push(*result);
    }
    {
        let mut previous = s.peer_series.lock().unwrap_or_else(|e| e.into_inner());
        update_peer_series(&s.metrics.peer_agree, &mut previous, &series);
    }
    let configured = !s.peers.urls.is_empty() || s.peers.dns.is_some();
    let agree = configured.then(|| dns_error.is_none() && peers.iter().all(|p| p.agree));
    CompareView {
        agree,
        error: dns_error,
        peers,
        this: SelfDigest {
            digest: here.digest.clone(),
            instance: s.peers.instance.clone(),
        },
    }
}

/// `GET /api/compare`.
pub async fn compare(State(s): State<AdminState>) -> Json<CompareView> {
    Json(compare_all(&s).await)
}

/// Compares with the peers every `interval`, for the metric and the log.
pub async fn check_periodically(s: AdminState, interval: Duration) {
    if s.peers.urls.is_empty() && s.peers.dns.is_none() {
        return;
    }
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        compare_all(&s).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};
    use std::sync::Arc;

    fn digests(v: Value) -> BTreeMap<String, String> {
        serde_json::from_value(v).unwrap()
    }

    /// A `/api/services/{name}` answer with the fields of `partial`, the others defaulted.
    fn detail(partial: Value) -> ServiceDetail {
        let mut full = json!({"access": null, "declared": true, "dependencies": [],
            "dependents": {"proxies": [], "services": []}, "instances": [],
            "mtls": "disabled", "name": "x", "origins": {}});
        for (k, v) in partial.as_object().unwrap() {
            full[k] = v.clone();
        }
        for i in full["instances"].as_array_mut().unwrap() {
            let defaults = json!({"datacenter": null, "origin": "config", "tags": []});
            for (k, v) in defaults.as_object().unwrap() {
                if i.get(k).is_none() {
                    i[k] = v.clone();
                }
            }
        }
        serde_json::from_value(full).unwrap()
    }

    #[test]
    fn digests_split_into_only_here_only_there_and_changed() {
        let d = diff_digests(
            &digests(json!({"a": "1", "b": "2", "c": "3"})),
            &digests(json!({"b": "2", "c": "4", "d": "5"})),
        );
        assert_eq!(d.only_here, vec!["a"]);
        assert_eq!(d.only_there, vec!["d"]);
        assert_eq!(d.changed, vec!["c"]);
    }

    #[test]
    fn a_service_differs_by_instance_and_by_field() {
        let here = json!({"mtls": "strict", "instances": [
            {"address": "10.0.0.1", "port": 80, "healthy": true, "weight": 1},
            {"address": "10.0.0.2", "port": 80, "healthy": true, "weight": 1}]});
        let there = json!({"mtls": "disabled", "instances": [
            {"address": "10.0.0.1", "port": 80, "healthy": false, "weight": 1},
            {"address": "10.0.0.3", "port": 80, "healthy": true, "weight": 1}]});
        let d =
            serde_json::to_value(diff_service("orders", &detail(here), &detail(there))).unwrap();
        assert_eq!(d["instances_only_here"], json!(["10.0.0.2:80"]));
        assert_eq!(d["instances_only_there"], json!(["10.0.0.3:80"]));
        assert_eq!(
            d["fields"],
            json!(["mtls", "instances[10.0.0.1:80].healthy"])
        );
    }

    #[test]
    fn only_the_detailed_services_are_listed_and_all_are_counted() {
        let changed: Vec<String> = (0..120).map(|i| format!("svc-{i:03}")).collect();
        let services = DigestDiff {
            changed: changed.clone(),
            ..Default::default()
        };
        let access = DigestDiff::default();
        let details = changed
            .iter()
            .take(DETAILED_SERVICES)
            .map(|_| {
                let theirs = detail(json!({"mtls": "disabled"}));
                (Some(detail(json!({"mtls": "strict"}))), Ok(theirs))
            })
            .collect();
        let (d, error) = differences(&services, &access, details);
        let d = serde_json::to_value(d).unwrap();
        assert_eq!(error, None);
        assert_eq!(d["services_changed_count"], json!(120));
        let listed = d["services_changed"].as_array().unwrap();
        assert_eq!(listed.len(), DETAILED_SERVICES);
        for (entry, name) in listed.iter().zip(&changed) {
            assert_eq!(entry["name"], json!(name));
            assert_eq!(entry["fields"], json!(["mtls"]), "no empty placeholder");
        }
    }

    #[test]
    fn a_service_that_could_not_be_fetched_says_why_and_the_first_error_is_the_peers() {
        let services = DigestDiff {
            changed: vec!["a".into(), "b".into(), "c".into()],
            ..Default::default()
        };
        let details = vec![
            (
                Some(detail(json!({}))),
                Err("peer/api/services/a: answered 500".to_string()),
            ),
            (
                Some(detail(json!({"mtls": "strict"}))),
                Ok(detail(json!({"mtls": "strict"}))),
            ),
            (
                Some(detail(json!({}))),
                Err("peer/api/services/c: timed out".to_string()),
            ),
        ];
        let (d, error) = differences(&services, &DigestDiff::default(), details);
        let d = serde_json::to_value(d).unwrap();
        assert_eq!(error.as_deref(), Some("peer/api/services/a: answered 500"));
        assert_eq!(d["services_changed_count"], json!(3));
        let listed = d["services_changed"].as_array().unwrap();
        assert_eq!(listed.len(), 3);
        assert_eq!(
            listed[0]["error"],
            json!("peer/api/services/a: answered 500")
        );
        assert_eq!(listed[1]["fields"], json!([]));
        assert!(listed[1].get("error").is_none());
        assert_eq!(listed[2]["error"], json!("peer/api/services/c: timed out"));
    }

    #[test]
    fn service_names_are_percent_encoded_as_one_segment() {
        assert_eq!(
            service_url("http://10.0.0.1:9901", "orders")
                .unwrap()
                .as_str(),
            "http://10.0.0.1:9901/api/services/orders"
        );
        assert_eq!(
            service_url("http://peer:9901/prefix", "a/b c?d#e%")
                .unwrap()
                .as_str(),
            "http://peer:9901/prefix/api/services/a%2Fb%20c%3Fd%23e%25"
        );
        assert!(service_url("not a url", "orders").is_err());
    }

    #[test]
    fn series_of_peers_that_are_gone_are_removed() {
        let family: Family<label::Peer, Gauge> = Family::default();
        let value = |peer: &str| {
            family
                .get(&label::Peer {
                    peer: peer.to_string(),
                })
                .map(|g| g.get())
        };
        let mut previous = BTreeSet::new();
        update_peer_series(
            &family,
            &mut previous,
            &[("http://a".into(), true), ("http://b".into(), false)],
        );
        assert_eq!(value("http://a"), Some(1));
        assert_eq!(value("http://b"), Some(0));
        update_peer_series(
            &family,
            &mut previous,
            &[("http://b".into(), true), ("http://c".into(), true)],
        );
        assert_eq!(value("http://a"), None);
        assert_eq!(value("http://b"), Some(1));
        assert_eq!(value("http://c"), Some(1));
        assert_eq!(
            previous,
            BTreeSet::from(["http://b".into(), "http://c".into()])
        );
        update_peer_series(&family, &mut previous, &[]);
        assert_eq!(value("http://b"), None);
        assert_eq!(value("http://c"), None);
        assert!(previous.is_empty());
    }

    fn admin_state() -> AdminState {
        AdminState::new(
            Arc::new(crate::xds::cache::SnapshotCache::new(
                crate::model::MeshSettings::default(),
            )),
            Arc::default(),
            Arc::default(),
            Arc::new(crate::metrics::Metrics::new()),
        )
    }

    /// A peer answering every request with an endless chunked body.
    async fn endless_peer() -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = conn.read(&mut buf).await;
                    let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n";
                    if conn.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let chunk = format!("{:x}\r\n{}\r\n", 1 << 20, " ".repeat(1 << 20));
                    while conn.write_all(chunk.as_bytes()).await.is_ok() {}
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_peer_answer_is_size_capped() {
        let peer = endless_peer().await;
        let s = admin_state();
        let e = get_json::<StateView>(&s, &format!("{peer}/api/state?detail=true"))
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains(&peer) && e.contains("larger than 32 MiB"), "{e}");
    }

    /// A peer whose state differs on every service of `names` and which never answers
    /// `/api/services/{name}`.
    async fn slow_detail_peer(names: Vec<String>) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let digests: serde_json::Map<String, Value> =
            names.into_iter().map(|n| (n, json!("theirs"))).collect();
        let state =
            json!({"instance": "peer", "digest": "theirs", "service_digests": digests}).to_string();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let state = state.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    if !buf[..n].starts_with(b"GET /api/state") {
                        // Never answers, keeps the connection open.
                        let _ = conn.read(&mut buf).await;
                        return;
                    }
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{state}",
                        state.len()
                    );
                    let _ = conn.write_all(resp.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn a_comparison_is_bounded_as_a_whole() {
        let names: Vec<String> = (0..DETAILED_SERVICES).map(|i| format!("svc-{i}")).collect();
        let peer = slow_detail_peer(names.clone()).await;
        let mut s = admin_state();
        s.diagnostics_timeout = Duration::from_millis(200);
        s.peers = Arc::new(PeerSettings {
            urls: vec![peer.clone()],
            dns: None,
            instance: "here".into(),
        });
        s.cache.update(MeshState {
            services: names
                .iter()
                .map(|n| {
                    let service = crate::model::Service {
                        name: n.clone(),
                        ..Default::default()
                    };
                    (n.clone(), service)
                })
                .collect(),
            ..Default::default()
        });
        // 50 detail requests, 8 at a time, each timing out after 200 ms: 1.4 s unbounded.
        let started = std::time::Instant::now();
        let v = serde_json::to_value(compare_all(&s).await).unwrap();
        let took = started.elapsed();
        assert!(took < Duration::from_millis(1300), "took {took:?}");
        assert_eq!(v["agree"], json!(false));
        let error = v["peers"][0]["error"].as_str().unwrap();
        assert!(
            error.contains(&peer) && error.contains("not compared within"),
            "{error}"
        );
        assert!(
            s.metrics
                .render()
                .contains(&format!("meshbridge_peer_agree{{peer=\"{peer}\"}} 0")),
        );
    }

    #[tokio::test]
    async fn peer_urls_merge_the_flags_and_the_dns_answers() {
        let settings = PeerSettings {
            urls: vec!["http://x:1/".into()],
            dns: Some("127.0.0.1:9901".into()),
            instance: String::new(),
        };
        let (urls, error) = peer_urls(&settings, Duration::from_secs(5)).await;
        assert_eq!(error, None);
        assert_eq!(urls, ["http://127.0.0.1:9901", "http://x:1"]);
    }
}
