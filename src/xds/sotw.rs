//! State-of-the-world protocol state of one stream: subscriptions, nonces, ACK/NACK.
//!
//! Pure: requests and snapshots in, responses out. The driver in the xDS server (`super`) only
//! moves messages. Rules (xDS protocol, "ACK/NACK and resource type instance version"):
//! - a request whose `response_nonce` is not the last one sent for its type is stale and
//!   changes nothing;
//! - a NACK (`error_detail`) is recorded and never answered with the same resources again:
//!   only a new snapshot or a new subscription produces a response;
//! - a response goes out when the subscribed resources' version differs from the version
//!   last sent, the subscription changed, or clusters changed (then EDS is resent, so no
//!   cluster is left warming);
//! - EDS requests for unknown clusters get an empty assignment.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::ControlPlane;
use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};

use crate::snapshot::{self, Resource, ResourceMap, ResourceType, Snapshot};
use crate::translate::clusters::empty_assignment;

/// What happened to a request, for the registry, logs and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// The first request for a type on this stream.
    Initial,
    /// Acknowledges the version sent.
    Ack(String),
    /// Rejects the version sent.
    Nack {
        /// The version rejected.
        version: String,
        /// Envoy's error message.
        message: String,
    },
    /// Answers a response that is not the latest one; ignored.
    Stale,
    /// Delta only: a later request answering no response (empty `response_nonce`), which
    /// only changes the subscription; neither an ACK nor a NACK.
    SubscriptionChange,
    /// A type meshbridge does not serve; ignored.
    UnknownType,
}

#[derive(Debug, Default)]
struct TypeState {
    /// `None`: wildcard.
    names: Option<BTreeSet<String>>,
    nonce: String,
    sent_version: Option<String>,
    requested: bool,
    force: bool,
    /// The resources the last response was computed from: the same map again (and the same
    /// subscription) gives the same response, so nothing is computed.
    seen: Option<Arc<ResourceMap>>,
}

/// The protocol state of one SotW stream.
#[derive(Debug)]
pub struct SotwState {
    types: BTreeMap<ResourceType, TypeState>,
    nonce_counter: u64,
    control_plane: String,
}

impl SotwState {
    /// A new stream; `control_plane` identifies this meshbridge instance in responses.
    pub fn new(control_plane: String) -> Self {
        SotwState {
            types: BTreeMap::new(),
            nonce_counter: 0,
            control_plane,
        }
    }

    /// Handles a request; returns what it was and the responses to send.
    pub fn on_request(
        &mut self,
        req: &DiscoveryRequest,
        snap: &Snapshot,
    ) -> (RequestKind, Vec<DiscoveryResponse>) {
        let Some(t) = ResourceType::from_type_url(&req.type_url) else {
            return (RequestKind::UnknownType, Vec::new());
        };
        let st = self.types.entry(t).or_default();
        let kind = if !st.requested {
            RequestKind::Initial
        } else if req.response_nonce != st.nonce {
            return (RequestKind::Stale, Vec::new());
        } else if let Some(err) = &req.error_detail {
            RequestKind::Nack {
                version: st.sent_version.clone().unwrap_or_default(),
                message: err.message.clone(),
            }
        } else {
            RequestKind::Ack(req.version_info.clone())
        };
        let names: Option<BTreeSet<String>> = if (req.resource_names.is_empty()
            && t.wildcard_by_default())
            || req.resource_names.iter().any(|n| n == "*")
        {
            None
        } else {
            Some(req.resource_names.iter().cloned().collect())
        };
        let names_changed = st.names != names;
        st.names = names;
        if names_changed {
            st.seen = None;
        }
        if kind == RequestKind::Initial {
            st.requested = true;
            // A reconnecting proxy tells what it has; it needs nothing if that is current.
            if !req.version_info.is_empty() {
                st.sent_version = Some(req.version_info.clone());
            }
        }
        let mut out = Vec::new();
        if names_changed || kind == RequestKind::Initial {
            st.force |= names_changed && kind != RequestKind::Initial;
            out.extend(self.respond(t, snap));
            if t == ResourceType::Cluster && !out.is_empty() {
                self.force(ResourceType::Endpoint);
                out.extend(self.respond(ResourceType::Endpoint, snap));
            }
        }
        (kind, out)
    }

    /// Forgets which resources each response was last computed from, so the next snapshot is
    /// selected and versioned anew (what skipping an unchanged map must equal; for tests).
    #[doc(hidden)]
    pub fn forget_compared(&mut self) {
        for st in self.types.values_mut() {
            st.seen = None;
        }
    }

    /// Resource names the proxy asked for by name, over all types (a wildcard counts none).
    pub fn subscribed(&self) -> usize {
        self.types
            .values()
            .map(|t| t.names.as_ref().map_or(0, BTreeSet::len))
            .sum()
    }

    /// Handles a new snapshot: responses for every requested type that changed, in order
    /// CDS, EDS, LDS, RDS.
    pub fn on_snapshot(&mut self, snap: &Snapshot) -> Vec<DiscoveryResponse> {
        let mut out = Vec::new();
        for t in ResourceType::ALL {
            let sent = self.respond(t, snap);
            if t == ResourceType::Cluster && sent.is_some() {
                self.force(ResourceType::Endpoint);
            }
            out.extend(sent);
        }
        out
    }

    /// Makes the next response of `t` go out even if its version is current — also when
    /// `t` is not requested yet: a reconnecting proxy reports the EDS version it has
    /// right after CDS, and clusters that response recreated still need EDS.
    fn force(&mut self, t: ResourceType) {
        self.types.entry(t).or_default().force = true;
    }

    /// The response for type `t` if the proxy asked for it and it is not already current.
    fn respond(&mut self, t: ResourceType, snap: &Snapshot) -> Option<DiscoveryResponse> {
        let st = self.types.get_mut(&t)?;
        if !st.requested {
            return None;
        }
        let shared = snap.resources_shared(t);
        if !st.force && st.seen.as_ref().is_some_and(|m| Arc::ptr_eq(m, shared)) {
            return None;
        }
        st.seen = Some(shared.clone());
        let all = snap.resources(t);
        // Names that are exactly the snapshot's (Envoy asks EDS for every cluster it has)
        // select everything, like a wildcard: no lookups, and the snapshot's version.
        let names = st
            .names
            .as_ref()
            .filter(|names| names.len() != all.len() || !names.iter().eq(all.keys()));
        let resources = select(t, names, snap);
        let version = match names {
            // Everything of the type: the snapshot's own version of it.
            None => snap.version(t).to_string(),
            Some(_) => snapshot::resources_version(resources.iter().map(|r| &**r)),
        };
        if st.sent_version.as_deref() == Some(version.as_str()) && !st.force {
            return None;
        }
        self.nonce_counter += 1;
        st.nonce = self.nonce_counter.to_string();
        st.sent_version = Some(version.clone());
        st.force = false;
        Some(DiscoveryResponse {
            version_info: version,
            resources: resources.iter().map(|r| r.body.clone()).collect(),
            type_url: t.type_url().to_string(),
            nonce: st.nonce.clone(),
            control_plane: Some(ControlPlane {
                identifier: self.control_plane.clone(),
            }),
            ..Default::default()
        })
    }
}

/// The resources of type `t` a subscription selects; unknown EDS names get an empty
/// assignment, unknown names of other types are left out.
pub fn select(
    t: ResourceType,
    names: Option<&BTreeSet<String>>,
    snap: &Snapshot,
) -> Vec<Arc<Resource>> {
    let all = snap.resources(t);
    match names {
        None => all.values().cloned().collect(),
        Some(names) => names
            .iter()
            .filter_map(|n| match all.get(n) {
                Some(r) => Some(r.clone()),
                None if t == ResourceType::Endpoint => {
                    Some(snapshot::encode(n, &empty_assignment(n)))
                }
                None => None,
            })
            .collect(),
    }
}
