//! What every connected proxy has been sent and has acknowledged, for the admin API.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde::Serialize;

use crate::model::ProxyGroup;

/// Per type URL: the last version sent, the last version ACKed, the last NACK message.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TypeStatus {
    /// Version of the last response sent.
    pub sent: Option<String>,
    /// Version the proxy last acknowledged.
    pub acked: Option<String>,
    /// Error detail of the last NACK, cleared by a later ACK.
    pub nack: Option<String>,
}

/// One connected stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProxyStatus {
    /// `node.id`.
    pub node: String,
    /// The proxy's service.
    pub service: String,
    /// Its group id.
    pub group: String,
    /// `sotw` or `delta`.
    pub mode: &'static str,
    /// Peer address of the stream, when known.
    pub peer: Option<String>,
    /// Announced Envoy admin port, when any.
    pub admin_port: Option<u16>,
    /// Seconds since the Unix epoch when the stream started.
    pub connected_at: u64,
    /// By type URL.
    pub types: BTreeMap<String, TypeStatus>,
    /// The group itself, to find its snapshot.
    #[serde(skip)]
    pub group_key: ProxyGroup,
}

/// The registry of connected streams.
#[derive(Default)]
pub struct ProxyRegistry {
    next_id: AtomicU64,
    streams: Mutex<BTreeMap<u64, ProxyStatus>>,
}

impl ProxyRegistry {
    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, ProxyStatus>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a stream and returns its id.
    pub fn register(&self, status: ProxyStatus) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, status);
        id
    }

    /// Forgets a stream.
    pub fn unregister(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Updates the status of one type of one stream.
    pub fn update(&self, id: u64, type_url: &str, f: impl FnOnce(&mut TypeStatus)) {
        if let Some(s) = self.lock().get_mut(&id) {
            f(s.types.entry(type_url.to_string()).or_default());
        }
    }

    /// Every connected stream, sorted by node id.
    pub fn list(&self) -> Vec<ProxyStatus> {
        let mut all: Vec<ProxyStatus> = self.lock().values().cloned().collect();
        all.sort_by(|a, b| {
            a.node
                .cmp(&b.node)
                .then(a.connected_at.cmp(&b.connected_at))
        });
        all
    }

    /// The newest stream of a node, with its group.
    pub fn find(&self, node: &str) -> Option<(ProxyStatus, ProxyGroup)> {
        self.lock()
            .values()
            .filter(|s| s.node == node)
            .max_by_key(|s| s.connected_at)
            .map(|s| (s.clone(), s.group_key.clone()))
    }

    /// Number of connected streams.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no stream is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
