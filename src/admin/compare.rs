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
use serde_json::{Value, json};

use super::{AdminState, service_detail, state_detail};
use crate::metrics::labels;
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

/// The peers' admin URLs now.
pub async fn peer_urls(settings: &PeerSettings) -> (Vec<String>, Option<String>) {
    let mut urls: BTreeSet<String> = settings
        .urls
        .iter()
        .map(|u| u.trim_end_matches('/').to_string())
        .collect();
    let mut error = None;
    if let Some(dns) = &settings.dns {
        match tokio::net::lookup_host(dns.as_str()).await {
            Ok(addrs) => urls.extend(addrs.map(|a| format!("http://{a}"))),
            Err(e) => error = Some(format!("--peers-dns {dns}: {e}")),
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
pub fn diff_digests(here: &Value, there: &Value) -> DigestDiff {
    let empty = serde_json::Map::new();
    let h = here.as_object().unwrap_or(&empty);
    let t = there.as_object().unwrap_or(&empty);
    DigestDiff {
        only_here: h.keys().filter(|k| !t.contains_key(*k)).cloned().collect(),
        only_there: t.keys().filter(|k| !h.contains_key(*k)).cloned().collect(),
        changed: h
            .iter()
            .filter(|(k, v)| t.get(*k).is_some_and(|o| o != *v))
            .map(|(k, _)| k.clone())
            .collect(),
    }
}

fn instances_by_key(service: &Value) -> BTreeMap<String, &Value> {
    service
        .get("instances")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|i| {
                    let key = format!(
                        "{}:{}",
                        i.get("address").and_then(Value::as_str).unwrap_or("?"),
                        i.get("port").and_then(Value::as_u64).unwrap_or(0)
                    );
                    (key, i)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// How one service differs between two `/api/services/{name}` answers (pure).
pub fn diff_service(name: &str, here: &Value, there: &Value) -> Value {
    let mut fields = Vec::new();
    for field in ["declared", "mtls", "dependencies"] {
        if here.get(field) != there.get(field) {
            fields.push(field.to_string());
        }
    }
    let (h, t) = (instances_by_key(here), instances_by_key(there));
    for (key, hi) in &h {
        let Some(ti) = t.get(key) else { continue };
        for field in ["origin", "datacenter", "tags", "weight", "healthy"] {
            if hi.get(field) != ti.get(field) {
                fields.push(format!("instances[{key}].{field}"));
            }
        }
    }
    json!({
        "name": name,
        "instances_only_here": h.keys().filter(|k| !t.contains_key(*k)).collect::<Vec<_>>(),
        "instances_only_there": t.keys().filter(|k| !h.contains_key(*k)).collect::<Vec<_>>(),
        "fields": fields,
    })
}

async fn get_json(s: &AdminState, url: &str) -> Result<Value, String> {
    let resp = s
        .http
        .get(url)
        .timeout(s.diagnostics_timeout)
        .send()
        .await
        .map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status();
    if !status.is_success() {
        return Err(format!("{url}: answered {status}"));
    }
    resp.json::<Value>()
        .await
        .map_err(|e| format!("{url}: not JSON: {e}"))
}

/// Compares this instance's state with one peer's.
pub async fn compare_peer(s: &AdminState, state: &MeshState, here: &Value, peer: &str) -> Value {
    let there = match get_json(s, &format!("{peer}/api/state?detail=true")).await {
        Ok(v) => v,
        Err(e) => {
            return json!({"peer": peer, "digest": null, "agree": false, "error": e, "differences": null});
        }
    };
    if there.get("instance") == here.get("instance") {
        return json!({"peer": peer, "self": true});
    }
    let digest = there.get("digest").cloned().unwrap_or(Value::Null);
    let agree = digest == here["digest"];
    let services = diff_digests(&here["service_digests"], &there["service_digests"]);
    let access = diff_digests(&here["access_digests"], &there["access_digests"]);
    let mut changed = Vec::new();
    let mut error = None;
    for name in services.changed.iter().take(DETAILED_SERVICES) {
        let ours = service_detail(s, state, name).unwrap_or(Value::Null);
        match get_json(s, &format!("{peer}/api/services/{name}")).await {
            Ok(theirs) => changed.push(diff_service(name, &ours, &theirs)),
            Err(e) => {
                error = Some(e);
                changed.push(json!({"name": name, "instances_only_here": [], "instances_only_there": [], "fields": []}));
            }
        }
    }
    for name in services.changed.iter().skip(DETAILED_SERVICES) {
        changed.push(json!({"name": name, "instances_only_here": [], "instances_only_there": [], "fields": []}));
    }
    json!({
        "peer": peer,
        "digest": digest,
        "agree": agree,
        "error": error,
        "differences": {
            "services_only_here": services.only_here,
            "services_only_there": services.only_there,
            "services_changed": changed,
            "access_only_here": access.only_here,
            "access_only_there": access.only_there,
            "access_changed": access.changed,
        }
    })
}

/// Compares with every peer; sets `meshbridge_peer_agree`.
pub async fn compare_all(s: &AdminState) -> Value {
    let state = s.cache.state();
    let here = state_detail(&state, &s.peers.instance);
    let (urls, dns_error) = peer_urls(&s.peers).await;
    let mut peers = Vec::new();
    for url in &urls {
        let result = compare_peer(s, &state, &here, url).await;
        if result.get("self").is_some() {
            continue;
        }
        let agree = result["agree"].as_bool().unwrap_or(false);
        s.metrics
            .peer_agree
            .get_or_create(&labels(&[("peer", url)]))
            .set(i64::from(agree));
        if !agree {
            tracing::warn!(peer = %url, error = ?result["error"].as_str(), "a peer meshbridge instance disagrees with this one");
        }
        peers.push(result);
    }
    let configured = !s.peers.urls.is_empty() || s.peers.dns.is_some();
    let agree = configured.then(|| {
        dns_error.is_none() && peers.iter().all(|p| p["agree"].as_bool().unwrap_or(false))
    });
    json!({
        "self": {"digest": here["digest"], "instance": s.peers.instance},
        "agree": agree,
        "error": dns_error,
        "peers": peers,
    })
}

/// `GET /api/compare`.
pub async fn compare(State(s): State<AdminState>) -> Json<Value> {
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

    #[test]
    fn digests_split_into_only_here_only_there_and_changed() {
        let d = diff_digests(
            &json!({"a": "1", "b": "2", "c": "3"}),
            &json!({"b": "2", "c": "4", "d": "5"}),
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
        let d = diff_service("orders", &here, &there);
        assert_eq!(d["instances_only_here"], json!(["10.0.0.2:80"]));
        assert_eq!(d["instances_only_there"], json!(["10.0.0.3:80"]));
        assert_eq!(
            d["fields"],
            json!(["mtls", "instances[10.0.0.1:80].healthy"])
        );
    }
}
