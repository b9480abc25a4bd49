//! The ADS server: state-of-the-world and delta xDS on one gRPC port.
//!
//! Each stream runs in its own task: it parses the node from the first request (refusing a
//! node without `service_name` with `INVALID_ARGUMENT`), subscribes to its group's snapshot
//! in the [`cache::SnapshotCache`], and lets the pure protocol state ([`sotw::SotwState`],
//! [`delta::DeltaState`]) decide what to send. The server never builds resources.

pub mod cache;
pub mod delta;
pub mod node;
pub mod registry;
pub mod sotw;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_server::{
        AggregatedDiscoveryService, AggregatedDiscoveryServiceServer,
    },
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics::{Metrics, labels};
use crate::snapshot::{ResourceType, Snapshot};
use cache::SnapshotCache;
use registry::{ProxyRegistry, ProxyStatus};
use sotw::RequestKind;

/// What every stream shares.
pub struct XdsContext {
    /// Snapshots per group.
    pub cache: Arc<SnapshotCache>,
    /// Connected streams.
    pub registry: Arc<ProxyRegistry>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Identifies this instance in responses (`control_plane.identifier`).
    pub control_plane: String,
}

/// The tonic service.
#[derive(Clone)]
pub struct AdsService {
    ctx: Arc<XdsContext>,
}

impl AdsService {
    /// A service over `ctx`.
    pub fn new(ctx: Arc<XdsContext>) -> Self {
        AdsService { ctx }
    }

    /// The gRPC server wrapper, accepting large config pushes.
    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<Self> {
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(64 * 1024 * 1024)
            .max_encoding_message_size(256 * 1024 * 1024)
    }
}

/// One protocol variant (SotW or delta) as the stream driver sees it.
trait Protocol: Send + 'static {
    type Req: Send + 'static;
    type Resp: Send + 'static;
    const MODE: &'static str;
    fn node(req: &Self::Req) -> Option<&Node>;
    fn type_url(req: &Self::Req) -> &str;
    fn on_request(&mut self, req: &Self::Req, snap: &Snapshot) -> (RequestKind, Vec<Self::Resp>);
    fn on_snapshot(&mut self, snap: &Snapshot) -> Vec<Self::Resp>;
    /// `(type_url, version, nonce, encoded bytes)` of a response.
    fn describe(resp: &Self::Resp) -> (&str, &str, &str, usize);
}

impl Protocol for sotw::SotwState {
    type Req = DiscoveryRequest;
    type Resp = DiscoveryResponse;
    const MODE: &'static str = "sotw";
    fn node(req: &Self::Req) -> Option<&Node> {
        req.node.as_ref()
    }
    fn type_url(req: &Self::Req) -> &str {
        &req.type_url
    }
    fn on_request(&mut self, req: &Self::Req, snap: &Snapshot) -> (RequestKind, Vec<Self::Resp>) {
        sotw::SotwState::on_request(self, req, snap)
    }
    fn on_snapshot(&mut self, snap: &Snapshot) -> Vec<Self::Resp> {
        sotw::SotwState::on_snapshot(self, snap)
    }
    fn describe(r: &Self::Resp) -> (&str, &str, &str, usize) {
        let bytes = r.resources.iter().map(|a| a.value.len()).sum();
        (&r.type_url, &r.version_info, &r.nonce, bytes)
    }
}

impl Protocol for delta::DeltaState {
    type Req = DeltaDiscoveryRequest;
    type Resp = DeltaDiscoveryResponse;
    const MODE: &'static str = "delta";
    fn node(req: &Self::Req) -> Option<&Node> {
        req.node.as_ref()
    }
    fn type_url(req: &Self::Req) -> &str {
        &req.type_url
    }
    fn on_request(&mut self, req: &Self::Req, snap: &Snapshot) -> (RequestKind, Vec<Self::Resp>) {
        delta::DeltaState::on_request(self, req, snap)
    }
    fn on_snapshot(&mut self, snap: &Snapshot) -> Vec<Self::Resp> {
        delta::DeltaState::on_snapshot(self, snap)
    }
    fn describe(r: &Self::Resp) -> (&str, &str, &str, usize) {
        let bytes = r
            .resources
            .iter()
            .filter_map(|x| x.resource.as_ref())
            .map(|a| a.value.len())
            .sum();
        (&r.type_url, &r.system_version_info, &r.nonce, bytes)
    }
}

#[tonic::async_trait]
impl AggregatedDiscoveryService for AdsService {
    type StreamAggregatedResourcesStream = ReceiverStream<Result<DiscoveryResponse, Status>>;
    type DeltaAggregatedResourcesStream = ReceiverStream<Result<DeltaDiscoveryResponse, Status>>;

    async fn stream_aggregated_resources(
        &self,
        request: Request<Streaming<DiscoveryRequest>>,
    ) -> Result<Response<Self::StreamAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let proto = sotw::SotwState::new(self.ctx.control_plane.clone());
        Ok(Response::new(spawn_stream(
            self.ctx.clone(),
            proto,
            request.into_inner(),
            peer,
        )))
    }

    async fn delta_aggregated_resources(
        &self,
        request: Request<Streaming<DeltaDiscoveryRequest>>,
    ) -> Result<Response<Self::DeltaAggregatedResourcesStream>, Status> {
        let peer = request.remote_addr();
        let proto = delta::DeltaState::new(self.ctx.control_plane.clone());
        Ok(Response::new(spawn_stream(
            self.ctx.clone(),
            proto,
            request.into_inner(),
            peer,
        )))
    }
}

fn spawn_stream<P: Protocol>(
    ctx: Arc<XdsContext>,
    proto: P,
    inbound: Streaming<P::Req>,
    peer: Option<SocketAddr>,
) -> ReceiverStream<Result<P::Resp, Status>>
where
    Streaming<P::Req>: futures::Stream<Item = Result<P::Req, Status>> + Unpin + Send,
    P::Req: prost::Message + Default,
{
    let (tx, rx) = mpsc::channel(16);
    let span = info_span!("xds", mode = P::MODE, node = tracing::field::Empty, peer = ?peer);
    tokio::spawn(drive(ctx, proto, inbound, tx, peer).instrument(span));
    ReceiverStream::new(rx)
}

/// Unsubscribes and unregisters a stream however its task ends.
struct StreamGuard {
    ctx: Arc<XdsContext>,
    group: crate::model::ProxyGroup,
    id: u64,
    mode: &'static str,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.ctx.cache.unsubscribe(&self.group);
        if let Some(status) = self.ctx.registry.unregister(self.id) {
            for (type_url, t) in &status.types {
                if t.subscribed {
                    self.ctx
                        .metrics
                        .xds_subscriptions
                        .get_or_create(&labels(&[
                            ("type", short_type(type_url)),
                            ("mode", self.mode),
                        ]))
                        .dec();
                }
            }
        }
        self.ctx
            .metrics
            .xds_streams
            .get_or_create(&labels(&[("mode", self.mode)]))
            .dec();
        self.ctx
            .metrics
            .snapshot_groups
            .set(self.ctx.cache.group_count() as i64);
    }
}

async fn drive<P: Protocol>(
    ctx: Arc<XdsContext>,
    mut proto: P,
    mut inbound: Streaming<P::Req>,
    tx: mpsc::Sender<Result<P::Resp, Status>>,
    peer: Option<SocketAddr>,
) where
    Streaming<P::Req>: futures::Stream<Item = Result<P::Req, Status>> + Unpin + Send,
    P::Req: prost::Message + Default,
{
    let first = match inbound.next().await {
        Some(Ok(r)) => r,
        _ => return,
    };
    let identity = match node::parse_node(P::node(&first)) {
        Ok(i) => i,
        Err(e) => {
            ctx.metrics.xds_refused.inc();
            let node_id = P::node(&first).map(|n| n.id.clone()).unwrap_or_default();
            warn!(node = %node_id, error = %e, "refusing xDS stream");
            let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
            return;
        }
    };
    tracing::Span::current().record("node", identity.node_id.as_str());
    let mut snapshots = ctx.cache.subscribe(&identity.group);
    let connected_at = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let admin_port = P::node(&first).and_then(node::admin_port);
    let diagnostics_port = P::node(&first).and_then(node::diagnostics_port);
    let id = ctx.registry.register(ProxyStatus {
        node: identity.node_id.clone(),
        service: identity.group.service.clone(),
        group: identity.group.id(),
        mode: P::MODE,
        peer: peer.map(|p| p.to_string()),
        admin_port,
        diagnostics_port,
        admin: registry::admin_address(peer, admin_port, diagnostics_port).map(|a| a.to_string()),
        connected_at,
        types: Default::default(),
        group_key: identity.group.clone(),
    });
    let _guard = StreamGuard {
        ctx: ctx.clone(),
        group: identity.group.clone(),
        id,
        mode: P::MODE,
    };
    ctx.metrics
        .xds_streams
        .get_or_create(&labels(&[("mode", P::MODE)]))
        .inc();
    ctx.metrics
        .snapshot_groups
        .set(ctx.cache.group_count() as i64);
    info!(group = %identity.group.id(), "proxy connected");
    let mut snap = snapshots.borrow_and_update().clone();
    let mut pending = Some(first);
    loop {
        let responses = if let Some(req) = pending.take() {
            let (kind, responses) = proto.on_request(&req, &snap);
            record_request(&ctx, id, P::type_url(&req), P::MODE, &kind);
            responses
        } else {
            tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(req)) => { pending = Some(req); continue; }
                    Some(Err(status)) => { debug!(%status, "stream ended with error"); return; }
                    None => { info!("proxy disconnected"); return; }
                },
                changed = snapshots.changed() => {
                    if changed.is_err() { return; }
                    snap = snapshots.borrow_and_update().clone();
                    proto.on_snapshot(&snap)
                }
            }
        };
        for resp in responses {
            let (type_url, version, nonce, bytes) = P::describe(&resp);
            debug!(type_url, version, nonce, bytes, "sending");
            let short = short_type(type_url);
            ctx.metrics
                .xds_responses
                .get_or_create(&labels(&[("type", short), ("mode", P::MODE)]))
                .inc();
            ctx.metrics
                .xds_bytes
                .get_or_create(&labels(&[("type", short)]))
                .inc_by(bytes as u64);
            let version = version.to_string();
            ctx.registry.update(id, type_url, |s| s.sent_now(version));
            if tx.send(Ok(resp)).await.is_err() {
                return;
            }
        }
    }
}

fn short_type(type_url: &str) -> &'static str {
    match ResourceType::from_type_url(type_url) {
        Some(ResourceType::Cluster) => "cds",
        Some(ResourceType::Endpoint) => "eds",
        Some(ResourceType::Listener) => "lds",
        Some(ResourceType::Route) => "rds",
        None => "other",
    }
}

fn record_request(
    ctx: &XdsContext,
    id: u64,
    type_url: &str,
    mode: &'static str,
    kind: &RequestKind,
) {
    let short = short_type(type_url);
    let observe_latency = |latency: Option<Option<std::time::Duration>>| {
        if let Some(Some(d)) = latency {
            ctx.metrics
                .xds_ack_seconds
                .get_or_create(&labels(&[("type", short)]))
                .observe(d.as_secs_f64());
        }
    };
    match kind {
        RequestKind::Ack(version) => {
            ctx.metrics
                .xds_acks
                .get_or_create(&labels(&[("type", short)]))
                .inc();
            observe_latency(ctx.registry.update(id, type_url, |s| {
                if !version.is_empty() {
                    s.acked = s.sent.clone();
                }
                s.nack = None;
                s.answered()
            }));
        }
        RequestKind::Nack { version, message } => {
            ctx.metrics
                .xds_nacks
                .get_or_create(&labels(&[("type", short)]))
                .inc();
            warn!(type_url, version, error = %message, "proxy rejected configuration (NACK)");
            let message = message.clone();
            observe_latency(ctx.registry.update(id, type_url, |s| {
                s.nack = Some(message);
                s.answered()
            }));
        }
        RequestKind::Stale => debug!(type_url, "stale request ignored"),
        RequestKind::SubscriptionChange => debug!(type_url, "subscription changed"),
        RequestKind::UnknownType => {
            debug!(type_url, "request for a type meshbridge does not serve")
        }
        RequestKind::Initial => {
            debug!(type_url, "subscribed");
            let first = ctx.registry.update(id, type_url, |s| {
                !std::mem::replace(&mut s.subscribed, true)
            });
            if first == Some(true) {
                ctx.metrics
                    .xds_subscriptions
                    .get_or_create(&labels(&[("type", short), ("mode", mode)]))
                    .inc();
            }
        }
    }
}
