//! Kubernetes instances → Consul registrations, so legacy callers that resolve through Consul
//! find pods.
//!
//! Like consul-k8s's catalog sync, pods are registered with the catalog API under one
//! synthetic node (`--consul-sync-node`, node meta `external-source=kubernetes`), each with
//! the port legacy callers must use (the sidecar's ingress port when injected), the tag `k8s`
//! plus the MeshService's `spec.consul.tags`, and meta naming the namespace and pod.
//!
//! The failures to avoid (consul-k8s#280, #319, #4714) shape the loop:
//! - only what meshbridge registered (meta `managed-by=meshbridge` on its node) is ever
//!   deregistered;
//! - nothing is done before the Kubernetes source has listed everything once, and a pass
//!   first reads what Consul already has, so a restart re-registers nothing and deregisters
//!   nothing that is still there — no deregister-then-register flap;
//! - identical registrations are not rewritten;
//! - a periodic full pass re-reads Consul and repairs drift (someone deleted a registration);
//! - only the leader writes.
//!
//! [`plan`] is pure; [`run`] is the IO loop.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::sources::consul::{ConsulClient, ConsulError, PORT_META_PREFIX, backoff};
use crate::sources::kube::store::{KubeStore, ObjectKey, PodInstance};

/// Meta key and value marking registrations meshbridge owns.
pub const MANAGED_BY: (&str, &str) = ("managed-by", "meshbridge");
/// Tag every Kubernetes instance carries in Consul.
pub const K8S_TAG: &str = "k8s";

/// One service instance on meshbridge's Consul node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// `Service.ID`, unique on the node.
    pub id: String,
    /// Service name.
    pub service: String,
    /// Pod IP.
    pub address: String,
    /// Port callers use.
    pub port: u16,
    /// Tags, sorted.
    pub tags: Vec<String>,
    /// Meta.
    pub meta: BTreeMap<String, String>,
    /// The MeshService that asked for it (not sent to Consul).
    pub owner: Option<ObjectKey>,
}

impl Registration {
    fn same_as(&self, other: &Registration) -> bool {
        (
            &self.service,
            &self.address,
            self.port,
            &self.tags,
            &self.meta,
        ) == (
            &other.service,
            &other.address,
            other.port,
            &other.tags,
            &other.meta,
        )
    }
}

/// The registrations the pods ask for, by id.
pub fn desired(instances: &[PodInstance]) -> BTreeMap<String, Registration> {
    instances
        .iter()
        .map(|i| {
            // Service names cannot contain ':', namespaces and pod names neither: unambiguous.
            let id = format!("{}:{}:{}", i.service, i.namespace, i.pod);
            let mut tags: BTreeSet<String> = i.tags.clone();
            tags.insert(K8S_TAG.to_string());
            let mut meta = BTreeMap::from([
                (MANAGED_BY.0.to_string(), MANAGED_BY.1.to_string()),
                ("external-source".to_string(), "kubernetes".to_string()),
                ("k8s-namespace".to_string(), i.namespace.clone()),
                ("k8s-pod".to_string(), i.pod.clone()),
            ]);
            // Consul has one port per registration: the further ports go in meta, as
            // meshbridge reads them from legacy hosts' registrations.
            for (name, port) in &i.ports {
                meta.insert(format!("{PORT_META_PREFIX}{name}"), port.to_string());
            }
            let r = Registration {
                id: id.clone(),
                service: i.service.clone(),
                address: i.address.clone(),
                port: i.port,
                tags: tags.into_iter().collect(),
                meta,
                owner: Some(i.owner.clone()),
            };
            (id, r)
        })
        .collect()
}

/// What to write to Consul.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Missing or different registrations.
    pub register: Vec<Registration>,
    /// Ids of meshbridge's registrations nobody asks for any more.
    pub deregister: Vec<String>,
}

impl Plan {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.register.is_empty() && self.deregister.is_empty()
    }
}

/// Compares what is wanted with what meshbridge's node has. Registrations on the node that
/// meshbridge does not own are left alone.
pub fn plan(
    desired: &BTreeMap<String, Registration>,
    existing: &BTreeMap<String, Registration>,
) -> Plan {
    let register = desired
        .values()
        .filter(|d| existing.get(&d.id).is_none_or(|e| !e.same_as(d)))
        .cloned()
        .collect();
    let deregister = existing
        .values()
        .filter(|e| e.meta.get(MANAGED_BY.0).map(String::as_str) == Some(MANAGED_BY.1))
        .filter(|e| !desired.contains_key(&e.id))
        .map(|e| e.id.clone())
        .collect();
    Plan {
        register,
        deregister,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeServices {
    #[serde(default)]
    services: Option<Vec<NodeService>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct NodeService {
    #[serde(rename = "ID")]
    id: String,
    service: String,
    #[serde(default)]
    address: String,
    #[serde(default)]
    port: u16,
    #[serde(default)]
    tags: Option<Vec<String>>,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
}

/// Parses `/v1/catalog/node-services/:node` (`null` for an unknown node).
pub fn parse_node_services(
    body: &[u8],
) -> Result<BTreeMap<String, Registration>, serde_json::Error> {
    let parsed: Option<NodeServices> = serde_json::from_slice(body)?;
    Ok(parsed
        .and_then(|n| n.services)
        .unwrap_or_default()
        .into_iter()
        .map(|s| {
            let mut tags = s.tags.unwrap_or_default();
            tags.sort();
            tags.dedup();
            let r = Registration {
                id: s.id.clone(),
                service: s.service,
                address: s.address,
                port: s.port,
                tags,
                meta: s.meta.unwrap_or_default(),
                owner: None,
            };
            (s.id, r)
        })
        .collect())
}

/// Settings of the registration loop.
#[derive(Clone, Debug)]
pub struct SyncSettings {
    /// The synthetic Consul node Kubernetes instances are registered on.
    pub node: String,
    /// Full pass period (re-reads Consul, repairs drift).
    pub resync: Duration,
}

/// What the registration loop reads and reports.
pub struct SyncContext {
    /// What the Kubernetes source has seen.
    pub store: Arc<Mutex<KubeStore>>,
    /// Moves on every store change.
    pub epoch: watch::Receiver<u64>,
    /// True once the Kubernetes source listed everything.
    pub synced: watch::Receiver<bool>,
    /// True while this replica leads.
    pub leader: watch::Receiver<bool>,
    /// Registration problems by MeshService (shown in its status).
    pub errors: watch::Sender<BTreeMap<ObjectKey, String>>,
    /// Metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The index: a MeshService whose namespace may not declare a Consul service registers
    /// nothing under its name.
    pub index: crate::sources::IndexHandle,
}

/// `instances` without those of MeshServices that may not declare a service Consul knows.
fn claimable(index: &crate::sources::IndexHandle, instances: Vec<PodInstance>) -> Vec<PodInstance> {
    index.read(|i| {
        let consul = i.consul_services();
        instances
            .into_iter()
            .filter(|p| {
                !consul.contains(p.service.as_str()) || i.may_claim_consul(&p.owner.namespace)
            })
            .collect()
    })
}

fn count(ctx: &SyncContext, operation: &'static str, ok: bool) {
    let result = if ok { "ok" } else { "error" };
    ctx.metrics
        .consul_registrations
        .get_or_create(&crate::metrics::label::OperationResult { operation, result })
        .inc();
}

async fn read_existing(
    client: &ConsulClient,
    node: &str,
) -> Result<BTreeMap<String, Registration>, ConsulError> {
    let path = format!("/v1/catalog/node-services/{node}");
    let (_, body) = client.get(&path, None, 0, 0).await?;
    parse_node_services(&body).map_err(|source| ConsulError::Malformed { url: path, source })
}

/// Applies a plan, keeping `existing` equal to what Consul now has. Returns the problems by
/// owning MeshService.
async fn apply(
    client: &ConsulClient,
    settings: &SyncSettings,
    ctx: &SyncContext,
    plan: Plan,
    existing: &mut BTreeMap<String, Registration>,
) -> BTreeMap<ObjectKey, String> {
    let mut problems = BTreeMap::new();
    // Only the leader writes: a replica that lost the Lease mid-pass stops at once, so it
    // never acts on a stale plan next to the new leader.
    let leading = || *ctx.leader.borrow();
    for r in plan.register {
        if !leading() {
            return problems;
        }
        let body = json!({
            "Node": settings.node,
            "Address": "127.0.0.1",
            "NodeMeta": {"external-source": "kubernetes", MANAGED_BY.0: MANAGED_BY.1},
            "Service": {
                "ID": r.id,
                "Service": r.service,
                "Address": r.address,
                "Port": r.port,
                "Tags": r.tags,
                "Meta": r.meta,
            },
        });
        match client.put("/v1/catalog/register", &body).await {
            Ok(_) => {
                count(ctx, "register", true);
                existing.insert(r.id.clone(), r);
            }
            Err(e) => {
                count(ctx, "register", false);
                warn!(error = %e, id = %r.id, "cannot register a Kubernetes instance in Consul");
                if let Some(owner) = r.owner {
                    problems.insert(owner, e.to_string());
                }
            }
        }
    }
    for id in plan.deregister {
        if !leading() {
            return problems;
        }
        let body = json!({"Node": settings.node, "ServiceID": id});
        match client.put("/v1/catalog/deregister", &body).await {
            Ok(_) => {
                count(ctx, "deregister", true);
                existing.remove(&id);
            }
            Err(e) => {
                count(ctx, "deregister", false);
                warn!(error = %e, id = %id, "cannot deregister a Kubernetes instance from Consul");
            }
        }
    }
    problems
}

/// Registers Kubernetes instances into Consul while this replica leads, until the process
/// ends.
pub async fn run(client: ConsulClient, settings: SyncSettings, mut ctx: SyncContext) {
    let mut failures = 0;
    loop {
        if ctx.synced.wait_for(|s| *s).await.is_err() || ctx.leader.wait_for(|l| *l).await.is_err()
        {
            return;
        }
        // A full pass: read what Consul has, then follow the store until the next resync.
        let mut existing = match read_existing(&client, &settings.node).await {
            Ok(e) => {
                failures = 0;
                e
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, "cannot read meshbridge's registrations from Consul; retrying");
                tokio::time::sleep(backoff(failures)).await;
                continue;
            }
        };
        let resync = tokio::time::sleep(settings.resync);
        tokio::pin!(resync);
        loop {
            ctx.epoch.borrow_and_update();
            let instances = ctx
                .store
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .consul_instances();
            let wanted = desired(&claimable(&ctx.index, instances));
            let p = plan(&wanted, &existing);
            if !p.is_empty() {
                info!(
                    register = p.register.len(),
                    deregister = p.deregister.len(),
                    "syncing Kubernetes instances into Consul"
                );
            }
            let problems = apply(&client, &settings, &ctx, p, &mut existing).await;
            let failed = !problems.is_empty();
            ctx.errors.send_if_modified(|e| {
                let changed = *e != problems;
                *e = problems;
                changed
            });
            tokio::select! {
                _ = ctx.epoch.changed() => {
                    // Let a burst of pod changes settle into one pass.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ = &mut resync => break,
                _ = async { let _ = ctx.leader.wait_for(|l| !*l).await; } => break,
                _ = tokio::time::sleep(Duration::from_secs(5)), if failed => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(pod: &str, ip: &str) -> PodInstance {
        PodInstance {
            service: "orders".into(),
            namespace: "shop".into(),
            pod: pod.into(),
            address: ip.into(),
            port: 15006,
            tags: BTreeSet::from(["blue".to_string()]),
            ports: BTreeMap::from([("admin".to_string(), 15100)]),
            owner: ObjectKey {
                namespace: "shop".into(),
                name: "orders".into(),
            },
        }
    }

    #[test]
    fn registrations_carry_the_k8s_tag_and_pod_meta() {
        let d = desired(&[instance("orders-1", "10.0.0.1")]);
        let r = &d["orders:shop:orders-1"];
        assert_eq!(r.tags, vec!["blue".to_string(), "k8s".to_string()]);
        assert_eq!(r.meta["k8s-pod"], "orders-1");
        assert_eq!(r.meta["k8s-namespace"], "shop");
        assert_eq!(r.meta[MANAGED_BY.0], MANAGED_BY.1);
        // Its further port, where meshbridge reads a legacy host's.
        assert_eq!(r.meta["meshbridge-port-admin"], "15100");
    }

    #[test]
    fn what_consul_already_has_is_not_rewritten_and_foreign_entries_stay() {
        let wanted = desired(&[
            instance("orders-1", "10.0.0.1"),
            instance("orders-2", "10.0.0.2"),
        ]);
        let mut existing = wanted.clone();
        for r in existing.values_mut() {
            r.owner = None;
        }
        assert!(
            plan(&wanted, &existing).is_empty(),
            "a restart must not flap"
        );
        // Someone else's entry on the node and a stale one of ours.
        let mut foreign = wanted["orders:shop:orders-1"].clone();
        foreign.id = "hand-made".into();
        foreign.meta.clear();
        existing.insert(foreign.id.clone(), foreign);
        let mut stale = wanted["orders:shop:orders-1"].clone();
        stale.id = "orders:shop:orders-0".into();
        existing.insert(stale.id.clone(), stale);
        // A changed address is re-registered.
        existing.get_mut("orders:shop:orders-2").unwrap().address = "10.0.0.9".into();
        let p = plan(&wanted, &existing);
        assert_eq!(p.deregister, vec!["orders:shop:orders-0".to_string()]);
        assert_eq!(p.register.len(), 1);
        assert_eq!(p.register[0].address, "10.0.0.2");
    }

    #[test]
    fn node_services_parse_including_an_unknown_node() {
        assert!(parse_node_services(b"null").unwrap().is_empty());
        let body = br#"{"Node":{"Node":"k8s"},"Services":[{"ID":"a","Service":"orders","Address":"10.0.0.1","Port":15006,"Tags":["k8s","blue"],"Meta":{"managed-by":"meshbridge"}}]}"#;
        let parsed = parse_node_services(body).unwrap();
        assert_eq!(
            parsed["a"].tags,
            vec!["blue".to_string(), "k8s".to_string()]
        );
        assert!(parse_node_services(b"{").is_err());
    }
}
