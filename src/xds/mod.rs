//! The ADS server: state-of-the-world and delta xDS on one gRPC port.
//!
//! Each stream runs in its own task: it parses the node from the first request (refusing a
//! node without `service_name` with `INVALID_ARGUMENT`), subscribes to its group's snapshot
//! in the [`cache::SnapshotCache`], and lets the pure protocol state ([`sotw::SotwState`],
//! [`delta::DeltaState`]) decide what to send. The server never builds resources.

pub mod cache;
pub mod conn;
pub mod delta;
pub mod lrs;
pub mod node;
pub mod registry;
pub mod sotw;

use std::sync::Arc;

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

use crate::metrics::{Metrics, label};
use crate::snapshot::{ResourceType, Snapshot};
use cache::SnapshotCache;
pub use conn::PeerInfo;
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
    /// What one client can make the server hold.
    pub limits: XdsLimits,
    /// What a stream's client certificate must prove.
    pub client_auth: ClientAuth,
    /// Where load reports go.
    pub load: Arc<lrs::LoadState>,
}

/// Bounds on what clients can make the server hold (each a `run` flag). xDS clients name
/// themselves, so without them any client could open streams, groups (each with its own
/// snapshot) and subscriptions without end.
#[derive(Clone, Debug)]
pub struct XdsLimits {
    /// Streams served at once.
    pub max_streams: usize,
    /// Distinct proxy groups served at once.
    pub max_groups: usize,
    /// Resource names one stream may subscribe to, over all types.
    pub max_names: usize,
    /// Largest request accepted, in bytes.
    pub max_request_bytes: usize,
    /// Time a stream has to send its first request.
    pub first_request_timeout: std::time::Duration,
}

impl Default for XdsLimits {
    fn default() -> Self {
        XdsLimits {
            max_streams: 20_000,
            max_groups: 10_000,
            max_names: 20_000,
            max_request_bytes: 4 << 20,
            first_request_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// What the xDS server requires of a client certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ClientAuth {
    /// Nothing: a stream is whatever its node says.
    #[default]
    None,
    /// A stream without a certificate, or whose certificate proves another service than
    /// its node's `service_name`, is served and counted.
    Permissive,
    /// Such a stream is refused.
    Strict,
}

/// Names of the limits, as the `limit` label of `meshbridge_xds_limited_total` says them.
pub const LIMITS: [&str; 4] = ["streams", "groups", "names", "first_request"];

/// A client-supplied string made safe for a log line: control characters (newlines
/// included), backslashes and double quotes escaped, at most `max` characters kept (the cut
/// is marked).
pub fn loggable(text: &str, max: usize) -> String {
    let end = text.char_indices().nth(max).map_or(text.len(), |(i, _)| i);
    let mut out = String::with_capacity(end);
    for c in text[..end].chars() {
        match c {
            '\\' | '"' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.extend(c.escape_default()),
            c => out.push(c),
        }
    }
    if end < text.len() {
        out.push_str("…(cut)");
    }
    out
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

    /// The gRPC server wrapper: requests up to the limit, large config pushes.
    pub fn into_server(self) -> AggregatedDiscoveryServiceServer<Self> {
        let max_request = self.ctx.limits.max_request_bytes;
        AggregatedDiscoveryServiceServer::new(self)
            .max_decoding_message_size(max_request)
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
    /// Resource names a request carries.
    fn names_in(req: &Self::Req) -> usize;
    /// Resource names the stream subscribes to, over all types.
    fn subscribed(&self) -> usize;
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
    fn names_in(req: &Self::Req) -> usize {
        req.resource_names.len()
    }
    fn subscribed(&self) -> usize {
        sotw::SotwState::subscribed(self)
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
    fn names_in(req: &Self::Req) -> usize {
        req.resource_names_subscribe.len()
            + req.resource_names_unsubscribe.len()
            + req.initial_resource_versions.len()
    }
    fn subscribed(&self) -> usize {
        delta::DeltaState::subscribed(self)
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
        let peer = peer_info(&request);
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
        let peer = peer_info(&request);
        let proto = delta::DeltaState::new(self.ctx.control_plane.clone());
        Ok(Response::new(spawn_stream(
            self.ctx.clone(),
            proto,
            request.into_inner(),
            peer,
        )))
    }
}

/// What the connection tells about the client: from an [`conn::XdsConn`], else (a plain
/// TCP listener, as in tests) just the address.
fn peer_info<T>(request: &Request<T>) -> PeerInfo {
    request
        .extensions()
        .get::<PeerInfo>()
        .cloned()
        .unwrap_or_else(|| PeerInfo {
            addr: request.remote_addr(),
            ..Default::default()
        })
}

/// Whether a stream's client proved the service its node claims (pure). Returns the result
/// (`verified`, `absent`: no certificate proving a service, `mismatch`: it proves another)
/// and, when the stream must be refused, the status to refuse it with.
pub fn check_identity(
    auth: ClientAuth,
    proven: Option<&str>,
    claimed: &str,
) -> (&'static str, Option<Status>) {
    let result = match proven {
        Some(p) if p == claimed => "verified",
        Some(_) => "mismatch",
        None => "absent",
    };
    let refusal = match (auth, result) {
        (ClientAuth::Strict, "absent") => Some(Status::unauthenticated(format!(
            "a stream for service {claimed:?} needs a client certificate proving it (spiffe://<trust domain>/service/{claimed}); --xds-client-auth is strict"
        ))),
        (ClientAuth::Strict, "mismatch") => Some(Status::permission_denied(format!(
            "the client certificate proves service {:?}, not {claimed:?} named in the node metadata; --xds-client-auth is strict",
            proven.unwrap_or_default()
        ))),
        _ => None,
    };
    (result, refusal)
}

fn spawn_stream<P: Protocol>(
    ctx: Arc<XdsContext>,
    proto: P,
    inbound: Streaming<P::Req>,
    peer: PeerInfo,
) -> ReceiverStream<Result<P::Resp, Status>>
where
    Streaming<P::Req>: futures::Stream<Item = Result<P::Req, Status>> + Unpin + Send,
    P::Req: prost::Message + Default,
{
    let (tx, rx) = mpsc::channel(16);
    let span = info_span!("xds", mode = P::MODE, node = tracing::field::Empty, peer = ?peer.addr);
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
                        .get_or_create(&label::TypeMode {
                            r#type: short_type(type_url),
                            mode: self.mode,
                        })
                        .dec();
                }
            }
        }
        self.ctx
            .metrics
            .xds_streams
            .get_or_create(&label::Mode { mode: self.mode })
            .dec();
        self.ctx
            .metrics
            .snapshot_groups
            .set(self.ctx.cache.group_count() as i64);
    }
}

#[allow(clippy::too_many_lines)] // the stream's one select loop; its arms share the stream's state (pending requests, versions, subscriptions).
async fn drive<P: Protocol>(
    ctx: Arc<XdsContext>,
    mut proto: P,
    mut inbound: Streaming<P::Req>,
    tx: mpsc::Sender<Result<P::Resp, Status>>,
    peer_info: PeerInfo,
) where
    Streaming<P::Req>: futures::Stream<Item = Result<P::Req, Status>> + Unpin + Send,
    P::Req: prost::Message + Default,
{
    let limits = &ctx.limits;
    let first = match tokio::time::timeout(limits.first_request_timeout, inbound.next()).await {
        Ok(Some(Ok(r))) => r,
        // A request that cannot be read (over the size limit, not protobuf): the client
        // learns why.
        Ok(Some(Err(status))) => {
            debug!(%status, "first request unreadable");
            let _ = tx.send(Err(status)).await;
            return;
        }
        Ok(None) => return,
        Err(_) => {
            let message = format!(
                "no request within {} ms of opening the stream",
                limits.first_request_timeout.as_millis()
            );
            refuse(
                &ctx,
                &tx,
                "first_request",
                Status::deadline_exceeded(message),
            )
            .await;
            return;
        }
    };
    let identity = match node::parse_node(P::node(&first)) {
        Ok(i) => i,
        Err(e) => {
            ctx.metrics.xds_refused.inc();
            let node_id = P::node(&first).map(|n| n.id.as_str()).unwrap_or_default();
            warn!(node = %loggable(node_id, 256), error = %loggable(&e.to_string(), 512), "refusing xDS stream");
            let _ = tx.send(Err(Status::invalid_argument(e.to_string()))).await;
            return;
        }
    };
    if ctx.client_auth != ClientAuth::None {
        let (result, refusal) = check_identity(
            ctx.client_auth,
            peer_info.service.as_deref(),
            &identity.group.service,
        );
        ctx.metrics
            .xds_identity
            .get_or_create(&label::Outcome { result })
            .inc();
        if result != "verified"
            && ctx
                .metrics
                .log_allowed(result, std::time::Duration::from_secs(60))
        {
            warn!(
                node = %loggable(&identity.node_id, 256),
                service = %identity.group.service,
                proven = ?peer_info.service,
                peer = ?peer_info.addr,
                result,
                refused = refusal.is_some(),
                "xDS client identity not proven (logged once a minute per result; meshbridge_xds_identity_total counts them all)"
            );
        }
        if let Some(status) = refusal {
            let _ = tx.send(Err(status)).await;
            return;
        }
    }
    if ctx.registry.len() >= limits.max_streams {
        let message = format!(
            "this control plane serves {} streams at most (--xds-max-streams)",
            limits.max_streams
        );
        refuse(&ctx, &tx, "streams", Status::resource_exhausted(message)).await;
        return;
    }
    if !ctx.cache.has_group(&identity.group) && ctx.cache.group_count() >= limits.max_groups {
        let message = format!(
            "this control plane serves {} distinct proxy groups at most (--xds-max-groups)",
            limits.max_groups
        );
        refuse(&ctx, &tx, "groups", Status::resource_exhausted(message)).await;
        return;
    }
    tracing::Span::current().record("node", loggable(&identity.node_id, 256).as_str());
    let mut snapshots = ctx.cache.subscribe(&identity.group);
    let connected_at = crate::sources::now_secs();
    let admin_port = P::node(&first).and_then(node::admin_port);
    let diagnostics_port = P::node(&first).and_then(node::diagnostics_port);
    let id = ctx.registry.register(ProxyStatus {
        node: identity.node_id.clone(),
        service: identity.group.service.clone(),
        group: identity.group.id(),
        mode: P::MODE,
        peer: peer_info.addr.map(|p| p.to_string()),
        identity: peer_info.service.clone(),
        admin_port,
        diagnostics_port,
        admin: registry::admin_address(peer_info.addr, admin_port, diagnostics_port)
            .map(|a| a.to_string()),
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
        .get_or_create(&label::Mode { mode: P::MODE })
        .inc();
    ctx.metrics
        .snapshot_groups
        .set(ctx.cache.group_count() as i64);
    info!(group = %identity.group.id(), "proxy connected");
    if let Some(w) = &identity.warning {
        warn!(group = %identity.group.id(), "{w}");
    }
    let mut snap = snapshots.borrow_and_update().clone();
    let mut pending = Some(first);
    loop {
        let responses = if let Some(req) = pending.take() {
            if P::names_in(&req) > limits.max_names {
                let message = format!(
                    "a request names {} resources; at most {} (--xds-max-names)",
                    P::names_in(&req),
                    limits.max_names
                );
                refuse(&ctx, &tx, "names", Status::resource_exhausted(message)).await;
                return;
            }
            let (kind, responses) = proto.on_request(&req, &snap);
            if proto.subscribed() > limits.max_names {
                let message = format!(
                    "the stream subscribes to {} resources; at most {} (--xds-max-names)",
                    proto.subscribed(),
                    limits.max_names
                );
                refuse(&ctx, &tx, "names", Status::resource_exhausted(message)).await;
                return;
            }
            record_request(&ctx, id, P::type_url(&req), P::MODE, &kind);
            responses
        } else {
            tokio::select! {
                msg = inbound.next() => match msg {
                    Some(Ok(req)) => { pending = Some(req); continue; }
                    Some(Err(status)) => {
                        debug!(%status, "stream ended with error");
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
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
                .get_or_create(&label::TypeMode {
                    r#type: short,
                    mode: P::MODE,
                })
                .inc();
            ctx.metrics
                .xds_bytes
                .get_or_create(&label::Type { r#type: short })
                .inc_by(bytes as u64);
            let version = version.to_string();
            ctx.registry.update(id, type_url, |s| s.sent_now(version));
            if tx.send(Ok(resp)).await.is_err() {
                return;
            }
        }
    }
}

/// Ends a stream over a limit: the client gets `status`, the refusal is counted, and
/// logged at most once a minute per limit (a client retrying in a loop must not flood the
/// log).
async fn refuse<R>(
    ctx: &XdsContext,
    tx: &mpsc::Sender<Result<R, Status>>,
    limit: &'static str,
    status: Status,
) {
    ctx.metrics
        .xds_limited
        .get_or_create(&label::Limit { limit })
        .inc();
    if ctx
        .metrics
        .log_allowed(limit, std::time::Duration::from_secs(60))
    {
        warn!(limit, reason = %status.message(), "xDS stream refused (logged once a minute per limit; meshbridge_xds_limited_total counts them all)");
    }
    let _ = tx.send(Err(status)).await;
}

fn short_type(type_url: &str) -> &'static str {
    ResourceType::from_type_url(type_url).map_or("other", ResourceType::short_name)
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
                .get_or_create(&label::Type { r#type: short })
                .observe(d.as_secs_f64());
        }
    };
    match kind {
        RequestKind::Ack(version) => {
            ctx.metrics
                .xds_acks
                .get_or_create(&label::Type { r#type: short })
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
                .get_or_create(&label::Type { r#type: short })
                .inc();
            warn!(type_url = %loggable(type_url, 128), version = %loggable(version, 64), error = %loggable(message, 1024), "proxy rejected configuration (NACK)");
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
                    .get_or_create(&label::TypeMode {
                        r#type: short,
                        mode,
                    })
                    .inc();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{ClientAuth, check_identity, loggable};

    #[test]
    fn strict_refuses_what_permissive_counts() {
        assert_eq!(
            check_identity(ClientAuth::Strict, Some("web"), "web").0,
            "verified"
        );
        assert!(
            check_identity(ClientAuth::Strict, Some("web"), "web")
                .1
                .is_none()
        );
        let (result, refusal) = check_identity(ClientAuth::Strict, Some("billing"), "web");
        assert_eq!(result, "mismatch");
        let status = refusal.unwrap();
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status
                .message()
                .contains("proves service \"billing\", not \"web\"")
        );
        let (result, refusal) = check_identity(ClientAuth::Strict, None, "web");
        assert_eq!(result, "absent");
        assert_eq!(refusal.unwrap().code(), tonic::Code::Unauthenticated);
        for proven in [None, Some("billing")] {
            assert!(
                check_identity(ClientAuth::Permissive, proven, "web")
                    .1
                    .is_none()
            );
        }
    }

    #[test]
    fn client_strings_are_escaped_and_cut_before_they_reach_a_log_line() {
        // A forged second log line stays on the first, quoted.
        let forged = "n1\n2026-12-06T00:00:00Z  INFO meshbridge::audit: level changed";
        let out = loggable(forged, 256);
        assert!(!out.contains('\n'), "{out}");
        assert!(out.starts_with("n1\\n2026"), "{out}");
        assert_eq!(
            loggable(&"x".repeat(5_000_000), 256).len(),
            256 + "…(cut)".len()
        );
        assert_eq!(loggable("plain-node.ns", 256), "plain-node.ns");
        assert_eq!(loggable("key 'service_name'", 256), "key 'service_name'");
    }
}
