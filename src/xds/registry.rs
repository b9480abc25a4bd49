//! What every connected proxy has been sent and has acknowledged, for the admin API.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
    /// When the last response was sent and not yet answered.
    #[serde(skip)]
    pub sent_at: Option<Instant>,
    /// Whether the proxy subscribed to this type.
    #[serde(skip)]
    pub subscribed: bool,
}

impl TypeStatus {
    /// Records a response sent now.
    pub fn sent_now(&mut self, version: String) {
        self.sent = Some(version);
        self.sent_at = Some(Instant::now());
    }

    /// Takes the time since the unanswered response was sent.
    pub fn answered(&mut self) -> Option<Duration> {
        self.sent_at.take().map(|t| t.elapsed())
    }
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
    /// The service the client certificate proved, when the stream came over TLS with one.
    pub identity: Option<String>,
    /// Announced Envoy admin port, when any.
    pub admin_port: Option<u16>,
    /// Announced diagnostics listener port, when any.
    pub diagnostics_port: Option<u16>,
    /// Where meshbridge reaches this proxy's admin interface: the stream's peer address
    /// with the diagnostics port, else with the admin port; none without a peer address or
    /// an announced port.
    pub admin: Option<String>,
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

    /// Forgets a stream and returns what was known of it.
    pub fn unregister(&self, id: u64) -> Option<ProxyStatus> {
        self.lock().remove(&id)
    }

    /// Updates the status of one type of one stream.
    pub fn update<R>(
        &self,
        id: u64,
        type_url: &str,
        f: impl FnOnce(&mut TypeStatus) -> R,
    ) -> Option<R> {
        self.lock()
            .get_mut(&id)
            .map(|s| f(s.types.entry(type_url.to_string()).or_default()))
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

    /// Every connected stream of a node (a reconnecting proxy briefly has two).
    pub fn find_all(&self, node: &str) -> Vec<ProxyStatus> {
        self.lock()
            .values()
            .filter(|s| s.node == node)
            .cloned()
            .collect()
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

/// Where the control plane reaches a proxy's admin interface: the host of the stream's peer
/// address, and the diagnostics port when announced, else the admin port. Only connected
/// proxies have one, so the admin API never reaches an address a caller chose.
pub fn admin_address(
    peer: Option<SocketAddr>,
    admin_port: Option<u16>,
    diagnostics_port: Option<u16>,
) -> Option<SocketAddr> {
    let port = diagnostics_port.or(admin_port)?;
    let ip = peer?.ip();
    // An IPv4 peer seen on a dual-stack socket is reached over IPv4.
    let ip = match ip {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, std::net::IpAddr::V4),
        v4 => v4,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_address_prefers_the_diagnostics_port_and_needs_a_peer() {
        let peer: SocketAddr = "10.0.0.7:41000".parse().unwrap_or_else(|_| unreachable!());
        assert_eq!(
            admin_address(Some(peer), Some(9901), Some(15002)).map(|a| a.to_string()),
            Some("10.0.0.7:15002".to_string())
        );
        assert_eq!(
            admin_address(Some(peer), Some(9901), None).map(|a| a.to_string()),
            Some("10.0.0.7:9901".to_string())
        );
        assert_eq!(admin_address(None, Some(9901), None), None);
        assert_eq!(admin_address(Some(peer), None, None), None);
        let mapped: SocketAddr = "[::ffff:10.0.0.8]:4000"
            .parse()
            .unwrap_or_else(|_| unreachable!());
        assert_eq!(
            admin_address(Some(mapped), Some(9901), None).map(|a| a.to_string()),
            Some("10.0.0.8:9901".to_string())
        );
    }
}
