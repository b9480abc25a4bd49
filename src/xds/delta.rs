//! Incremental (delta) protocol state of one stream.
//!
//! Pure: requests and snapshots in, responses out. Per type it tracks the subscription
//! (wildcard and/or names) and the version of every resource the proxy has, so a response
//! carries only what changed and names what was removed. After a NACK the versions sent are
//! kept as "known", so the same resources are not sent again in a loop; a new snapshot or
//! subscription produces the next response. Subscribed EDS names without a cluster get an
//! empty assignment; when a cluster changes, its assignment is sent again so that Envoy
//! never leaves it warming.
//!
//! ACK/NACK: a request answering the last nonce sent for its type ACKs or NACKs that
//! response; one answering an older nonce is stale (a NACK too: it does not touch the state
//! of the latest response); a later request with no nonce only changes the subscription.
//! Subscription changes apply whatever the request's kind.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource as DeltaResource,
};

use std::sync::Arc;

use crate::snapshot::{self, ResourceMap, ResourceType, Snapshot};
use crate::translate::clusters::empty_assignment;
use crate::translate::names::cluster_assignment;

use super::sotw::RequestKind;

#[derive(Debug, Default)]
struct TypeState {
    wildcard: bool,
    names: BTreeSet<String>,
    /// Resource name → version the proxy has (or was last sent).
    known: BTreeMap<String, String>,
    nonce: String,
    requested: bool,
    /// Names to send even if the proxy reports them current in its first request (their
    /// cluster changed before this type was requested).
    resend: BTreeSet<String>,
    /// The resources `known` was last compared with: while the snapshot has the same map and
    /// nothing else moved `known` or the subscription, there is nothing to send.
    seen: Option<Arc<ResourceMap>>,
}

/// The protocol state of one delta stream.
#[derive(Debug)]
pub struct DeltaState {
    types: BTreeMap<ResourceType, TypeState>,
    nonce_counter: u64,
    control_plane: String,
}

/// Version marking an empty assignment sent for an unknown EDS name.
const EMPTY_VERSION: &str = "empty";

impl DeltaState {
    /// A new stream; `control_plane` identifies this meshbridge instance in responses.
    pub fn new(control_plane: String) -> Self {
        DeltaState {
            types: BTreeMap::new(),
            nonce_counter: 0,
            control_plane,
        }
    }

    /// Handles a request; returns what it was and the responses to send.
    pub fn on_request(
        &mut self,
        req: &DeltaDiscoveryRequest,
        snap: &Snapshot,
    ) -> (RequestKind, Vec<DeltaDiscoveryResponse>) {
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            return (RequestKind::UnknownType, Vec::new());
        };
        let st = self.types.entry(t).or_default();
        let kind = if !st.requested {
            st.requested = true;
            st.known = req.initial_resource_versions.clone().into_iter().collect();
            for name in std::mem::take(&mut st.resend) {
                st.known.remove(&name);
            }
            st.wildcard = t.wildcard_by_default() && req.resource_names_subscribe.is_empty();
            RequestKind::Initial
        } else if req.response_nonce.is_empty() {
            // Answers no response: a subscription change (Envoy sends EDS subscriptions
            // this way, often while a response is in flight).
            RequestKind::SubscriptionChange
        } else if req.response_nonce != st.nonce {
            // Answers a response that is not the latest, even if it is a NACK: the state
            // of the latest response is left alone. Its subscription changes still apply.
            RequestKind::Stale
        } else if let Some(err) = &req.error_detail {
            RequestKind::Nack {
                version: req.response_nonce.clone(),
                message: err.message.clone(),
            }
        } else {
            RequestKind::Ack(req.response_nonce.clone())
        };
        let mut subscription_changed = false;
        for name in &req.resource_names_subscribe {
            if name == "*" {
                subscription_changed |= !st.wildcard;
                st.wildcard = true;
            } else {
                subscription_changed |= st.names.insert(name.clone());
            }
        }
        for name in &req.resource_names_unsubscribe {
            if name == "*" {
                subscription_changed |= st.wildcard;
                st.wildcard = false;
                // What only the wildcard selected is no longer the proxy's: forget it, so
                // that neither its changes nor its removal are sent.
                st.known.retain(|n, _| st.names.contains(n));
            } else if st.names.remove(name) {
                subscription_changed = true;
                st.known.remove(name);
            }
        }
        let mut out = Vec::new();
        if kind == RequestKind::Initial || subscription_changed {
            // What the proxy has or wants moved: the next comparison goes name by name. An
            // ACK, NACK or stale answer moves neither (what was sent is already in `known`).
            st.seen = None;
            let always = kind == RequestKind::Initial;
            out.extend(self.respond(t, snap, always));
            if t == ResourceType::Cluster {
                out.extend(self.respond(ResourceType::Endpoint, snap, false));
            }
        }
        (kind, out)
    }

    /// Forgets which resources the proxy's state was last compared with, so the next snapshot
    /// is compared name by name (what the comparison of maps must equal; for tests).
    #[doc(hidden)]
    pub fn forget_compared(&mut self) {
        for st in self.types.values_mut() {
            st.seen = None;
        }
    }

    /// Resource names the proxy subscribed to by name, over all types (a wildcard counts
    /// none).
    pub fn subscribed(&self) -> usize {
        self.types.values().map(|t| t.names.len()).sum()
    }

    /// Handles a new snapshot: responses for every subscribed type that changed, in order
    /// CDS, EDS, LDS, RDS.
    pub fn on_snapshot(&mut self, snap: &Snapshot) -> Vec<DeltaDiscoveryResponse> {
        let mut out = Vec::new();
        for t in ResourceType::ALL {
            out.extend(self.respond(t, snap, false));
        }
        out
    }

    fn respond(
        &mut self,
        t: ResourceType,
        snap: &Snapshot,
        always: bool,
    ) -> Option<DeltaDiscoveryResponse> {
        let st = self.types.get_mut(&t)?;
        if !st.requested {
            return None;
        }
        let shared = snap.resources_shared(t).clone();
        let previous = st.seen.replace(shared.clone()).filter(|_| !always);
        if previous.as_ref().is_some_and(|m| Arc::ptr_eq(m, &shared)) {
            return None;
        }
        let all = &*shared;
        let candidates: BTreeSet<&String> = match &previous {
            // `known` agrees with the previous map for every name of interest: only the
            // names whose resource differs between the two maps can need sending.
            Some(previous) => changed_names(previous, all)
                .filter(|n| {
                    st.names.contains(*n)
                        || st.known.contains_key(*n)
                        || (st.wildcard && all.contains_key(*n))
                })
                .collect(),
            None => {
                let mut c: BTreeSet<&String> = st.names.iter().chain(st.known.keys()).collect();
                if st.wildcard {
                    c.extend(all.keys());
                }
                c
            }
        };
        let mut resources = Vec::new();
        let mut removed = Vec::new();
        let mut updates: Vec<(String, Option<String>)> = Vec::new();
        for name in candidates {
            let known = st.known.get(name).map(String::as_str);
            match all.get(name) {
                Some(r) if known != Some(r.version.as_str()) => {
                    resources.push(DeltaResource {
                        name: r.name.clone(),
                        version: r.version.clone(),
                        resource: Some(r.body.clone()),
                        ..Default::default()
                    });
                    updates.push((name.clone(), Some(r.version.clone())));
                }
                Some(_) => {}
                None if t == ResourceType::Endpoint
                    && st.names.contains(name)
                    && known != Some(EMPTY_VERSION) =>
                {
                    let empty = snapshot::encode(name, &empty_assignment(name));
                    resources.push(DeltaResource {
                        name: name.clone(),
                        version: EMPTY_VERSION.to_string(),
                        resource: Some(empty.body.clone()),
                        ..Default::default()
                    });
                    updates.push((name.clone(), Some(EMPTY_VERSION.to_string())));
                }
                // Subscribed, without a cluster, and already sent empty: nothing to do.
                None if t == ResourceType::Endpoint && st.names.contains(name) => {}
                None if known.is_some() => {
                    removed.push(name.clone());
                    updates.push((name.clone(), None));
                }
                None => {}
            }
        }
        if resources.is_empty() && removed.is_empty() && !always {
            return None;
        }
        for (name, version) in updates {
            match version {
                Some(v) => st.known.insert(name, v),
                None => st.known.remove(&name),
            };
        }
        self.nonce_counter += 1;
        st.nonce = self.nonce_counter.to_string();
        let nonce = st.nonce.clone();
        if t == ResourceType::Cluster {
            // A changed cluster warms until its assignment arrives: send it again (a policy
            // variant's is the shared cluster's, which the proxy may hold already).
            // Also before EDS is requested: a reconnecting proxy reports the assignment
            // versions it has right after CDS.
            let eds = self.types.entry(ResourceType::Endpoint).or_default();
            eds.seen = None;
            for r in &resources {
                let assignment = cluster_assignment(&r.name);
                eds.known.remove(assignment);
                if !eds.requested {
                    eds.resend.insert(assignment.to_string());
                }
            }
        }
        Some(DeltaDiscoveryResponse {
            system_version_info: snap.version(t).to_string(),
            resources,
            type_url: t.type_url().to_string(),
            removed_resources: removed,
            nonce,
            control_plane: Some(ControlPlane {
                identifier: self.control_plane.clone(),
            }),
            ..Default::default()
        })
    }
}

/// Names whose resource differs between two maps (present in one only, or another version).
fn changed_names<'a>(
    old: &'a ResourceMap,
    new: &'a ResourceMap,
) -> impl Iterator<Item = &'a String> {
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    std::iter::from_fn(move || {
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => return None,
                (Some((n, _)), None) => {
                    let n = *n;
                    a.next();
                    return Some(n);
                }
                (None, Some((n, _))) => {
                    let n = *n;
                    b.next();
                    return Some(n);
                }
                (Some((na, ra)), Some((nb, rb))) => match na.cmp(nb) {
                    std::cmp::Ordering::Less => {
                        let n = *na;
                        a.next();
                        return Some(n);
                    }
                    std::cmp::Ordering::Greater => {
                        let n = *nb;
                        b.next();
                        return Some(n);
                    }
                    std::cmp::Ordering::Equal => {
                        let same = Arc::ptr_eq(ra, rb) || ra.version == rb.version;
                        let n = *nb;
                        a.next();
                        b.next();
                        if !same {
                            return Some(n);
                        }
                    }
                },
            }
        }
    })
}
