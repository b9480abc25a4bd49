//! A small fake xDS client for in-process ADS protocol tests.
//!
//! [`TestServer`] serves meshbridge's ADS service on 127.0.0.1 (an ephemeral port) over
//! real gRPC; [`SotwStream`] and [`DeltaStream`] play a proxy: they send requests through
//! an mpsc channel and receive responses with every wait bounded by [`WAIT`], so a
//! protocol bug fails a test instead of hanging it.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use envoy_types::pb::envoy::config::cluster::v3::Cluster;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment;
use envoy_types::pb::envoy::config::listener::v3::Listener;
use envoy_types::pb::envoy::config::route::v3::RouteConfiguration;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, DiscoveryRequest, DiscoveryResponse,
    aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
};
use envoy_types::pb::google::protobuf::{Any, ListValue, Struct, Value, value::Kind};
use envoy_types::pb::google::rpc::Status as RpcStatus;
use meshbridge::index::Index;
use meshbridge::metrics::Metrics;
use meshbridge::model::{MeshSettings, MeshState};
use meshbridge::xds::cache::SnapshotCache;
use meshbridge::xds::registry::{ProxyRegistry, TypeStatus};
use meshbridge::xds::{AdsService, XdsContext, XdsLimits};
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Status, Streaming};

/// Upper bound of every wait for something that should happen.
pub const WAIT: Duration = Duration::from_secs(5);
/// How long to listen for something that should not happen.
pub const QUIET: Duration = Duration::from_millis(500);

/// CDS type URL.
pub const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
/// EDS type URL.
pub const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
/// LDS type URL.
pub const LDS: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
/// RDS type URL.
pub const RDS: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";

/// Short name of a type URL, for readable assertions.
pub fn short(type_url: &str) -> &'static str {
    match type_url {
        CDS => "CDS",
        EDS => "EDS",
        LDS => "LDS",
        RDS => "RDS",
        _ => "?",
    }
}

/// Bounds a future by [`WAIT`], panicking with `what` when it does not finish.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {WAIT:?} waiting for {what}"),
    }
}

/// Polls `cond` until it holds, panicking after [`WAIT`].
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    within(what, async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
}

/// The mesh state of one manifest file.
pub fn mesh_state(yaml: &str) -> MeshState {
    let objects = match meshbridge::sources::files::parse_manifests("mesh.yaml", yaml) {
        Ok(o) => o,
        Err(errors) => panic!("bad test manifests: {errors:?}"),
    };
    let mut index = Index::new();
    index.apply("config", "mesh.yaml", objects);
    index.state()
}

/// meshbridge's ADS service on an ephemeral local port.
pub struct TestServer {
    /// Snapshots per group.
    pub cache: Arc<SnapshotCache>,
    /// Connected streams.
    pub registry: Arc<ProxyRegistry>,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its metrics.
    pub metrics: Arc<Metrics>,
    task: JoinHandle<()>,
}

impl TestServer {
    /// Starts a server over an empty mesh.
    pub async fn start() -> Self {
        Self::start_with_limits(XdsLimits::default()).await
    }

    /// Starts a server over an empty mesh with these limits.
    pub async fn start_with_limits(limits: XdsLimits) -> Self {
        let cache = Arc::new(SnapshotCache::new(MeshSettings::default()));
        let registry = Arc::new(ProxyRegistry::default());
        let metrics = Arc::new(Metrics::new());
        let ctx = Arc::new(XdsContext {
            cache: cache.clone(),
            registry: registry.clone(),
            metrics: metrics.clone(),
            control_plane: "meshbridge-test".to_string(),
            limits,
            client_auth: Default::default(),
            load: Arc::new(meshbridge::xds::lrs::LoadState::new(
                std::time::Duration::from_secs(10),
            )),
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(AdsService::new(ctx).into_server())
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        TestServer {
            cache,
            registry,
            addr,
            metrics,
            task,
        }
    }

    /// Starts a server and installs the mesh state of `yaml`.
    pub async fn with_mesh(yaml: &str) -> Self {
        let server = Self::start().await;
        server.cache.update(mesh_state(yaml));
        server
    }

    /// Installs the mesh state of `yaml`.
    pub fn update(&self, yaml: &str) {
        self.cache.update(mesh_state(yaml));
    }

    /// A gRPC client of the server.
    pub async fn client(&self) -> AggregatedDiscoveryServiceClient<Channel> {
        let endpoint = format!("http://{}", self.addr);
        within(
            "connecting to the ADS server",
            AggregatedDiscoveryServiceClient::connect(endpoint),
        )
        .await
        .unwrap()
    }

    /// The registry status of `type_url` for the stream of `node_id`.
    pub fn type_status(&self, node_id: &str, type_url: &str) -> Option<TypeStatus> {
        self.registry
            .list()
            .into_iter()
            .find(|s| s.node == node_id)
            .and_then(|s| s.types.get(type_url).cloned())
    }

    /// The value of one sample of the rendered metrics, e.g.
    /// `meshbridge_xds_acks_total{type="eds"}`; 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        self.metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' '))
            .map_or(0.0, |v| v.trim().parse().unwrap())
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Builds a node with `service_name` and the usual ports in its metadata.
pub struct NodeBuilder {
    id: String,
    fields: BTreeMap<String, Value>,
}

fn string_value(s: &str) -> Value {
    Value {
        kind: Some(Kind::StringValue(s.to_string())),
    }
}

fn number_value(n: f64) -> Value {
    Value {
        kind: Some(Kind::NumberValue(n)),
    }
}

impl NodeBuilder {
    /// A node of `service` with ingress 15000, app 8080 and egress 15001 and no
    /// dependencies.
    pub fn new(id: &str, service: &str) -> Self {
        NodeBuilder::bare(id)
            .field("service_name", string_value(service))
            .field("ingress_port", number_value(15000.0))
            .field("app_port", number_value(8080.0))
            .field("egress_port", number_value(15001.0))
    }

    /// A node with no metadata at all.
    pub fn bare(id: &str) -> Self {
        NodeBuilder {
            id: id.to_string(),
            fields: BTreeMap::new(),
        }
    }

    /// Sets one metadata field.
    pub fn field(mut self, key: &str, value: Value) -> Self {
        self.fields.insert(key.to_string(), value);
        self
    }

    /// Sets `dependencies`.
    pub fn dependencies(self, deps: &[&str]) -> Self {
        let list = Value {
            kind: Some(Kind::ListValue(ListValue {
                values: deps.iter().map(|d| string_value(d)).collect(),
            })),
        };
        self.field("dependencies", list)
    }

    /// The node.
    pub fn build(self) -> Node {
        Node {
            id: self.id,
            cluster: "test".to_string(),
            metadata: Some(Struct {
                fields: self.fields.into_iter().collect(),
            }),
            ..Default::default()
        }
    }
}

/// A SotW ADS request.
pub fn sotw_request(
    type_url: &str,
    names: &[&str],
    version: &str,
    nonce: &str,
) -> DiscoveryRequest {
    DiscoveryRequest {
        version_info: version.to_string(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        type_url: type_url.to_string(),
        response_nonce: nonce.to_string(),
        ..Default::default()
    }
}

/// A delta ADS request subscribing and unsubscribing names.
pub fn delta_request(
    type_url: &str,
    subscribe: &[&str],
    unsubscribe: &[&str],
    nonce: &str,
) -> DeltaDiscoveryRequest {
    DeltaDiscoveryRequest {
        type_url: type_url.to_string(),
        resource_names_subscribe: subscribe.iter().map(|n| n.to_string()).collect(),
        resource_names_unsubscribe: unsubscribe.iter().map(|n| n.to_string()).collect(),
        response_nonce: nonce.to_string(),
        ..Default::default()
    }
}

/// The NACK detail a fake proxy reports: INVALID_ARGUMENT with `message`.
fn rejection(message: &str) -> RpcStatus {
    RpcStatus {
        code: tonic::Code::InvalidArgument as i32,
        message: message.to_string(),
        details: Vec::new(),
    }
}

/// A request of one ADS variant (SotW or delta): what [`AdsStream`] needs to know of it.
pub trait AdsRequest: Sized + Send + 'static {
    /// The responses of the variant.
    type Response: AdsResponse;
    /// The variant's name in failure messages.
    const VARIANT: &'static str;
    /// Attaches the node (it goes with the first request of a stream).
    fn set_node(&mut self, node: Node);
    /// `(type URL, names)` when the request states the whole subscription of its type
    /// (SotW), so that an ACK can repeat it; `None` when it states changes (delta).
    fn subscription(&self) -> Option<(&str, &[String])>;
    /// Opens the variant's bidirectional ADS call.
    fn open_call(
        client: AggregatedDiscoveryServiceClient<Channel>,
        requests: ReceiverStream<Self>,
    ) -> impl Future<Output = Result<tonic::Response<Streaming<Self::Response>>, Status>>;
}

/// A response of one ADS variant, as failure messages describe it.
pub trait AdsResponse: std::fmt::Debug + Send + 'static {
    /// Its type URL.
    fn type_url(&self) -> &str;
    /// Its identity (version, nonce).
    fn identity(&self) -> String;
    /// What it carries.
    fn contents(&self) -> String;
}

impl AdsRequest for DiscoveryRequest {
    type Response = DiscoveryResponse;
    const VARIANT: &'static str = "SotW";
    fn set_node(&mut self, node: Node) {
        self.node = Some(node);
    }
    fn subscription(&self) -> Option<(&str, &[String])> {
        Some((&self.type_url, &self.resource_names))
    }
    async fn open_call(
        mut client: AggregatedDiscoveryServiceClient<Channel>,
        requests: ReceiverStream<Self>,
    ) -> Result<tonic::Response<Streaming<DiscoveryResponse>>, Status> {
        client.stream_aggregated_resources(requests).await
    }
}

impl AdsResponse for DiscoveryResponse {
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn identity(&self) -> String {
        format!("version {}, nonce {}", self.version_info, self.nonce)
    }
    fn contents(&self) -> String {
        format!(
            "version {}, {} resources",
            self.version_info,
            self.resources.len()
        )
    }
}

impl AdsRequest for DeltaDiscoveryRequest {
    type Response = DeltaDiscoveryResponse;
    const VARIANT: &'static str = "delta";
    fn set_node(&mut self, node: Node) {
        self.node = Some(node);
    }
    fn subscription(&self) -> Option<(&str, &[String])> {
        None
    }
    async fn open_call(
        mut client: AggregatedDiscoveryServiceClient<Channel>,
        requests: ReceiverStream<Self>,
    ) -> Result<tonic::Response<Streaming<DeltaDiscoveryResponse>>, Status> {
        client.delta_aggregated_resources(requests).await
    }
}

impl AdsResponse for DeltaDiscoveryResponse {
    fn type_url(&self) -> &str {
        &self.type_url
    }
    fn identity(&self) -> String {
        format!("nonce {}", self.nonce)
    }
    fn contents(&self) -> String {
        format!(
            "resources {:?}, removed {:?}",
            delta_names(self),
            self.removed_resources
        )
    }
}

/// One fake proxy's ADS stream of either variant: [`SotwStream`] or [`DeltaStream`].
pub struct AdsStream<Req: AdsRequest> {
    node: Option<Node>,
    tx: Option<mpsc::Sender<Req>>,
    rx: Streaming<Req::Response>,
    /// Names last requested per type (SotW), for ACKs.
    names: BTreeMap<String, Vec<String>>,
}

/// One fake proxy's state-of-the-world ADS stream.
pub type SotwStream = AdsStream<DiscoveryRequest>;
/// One fake proxy's delta ADS stream.
pub type DeltaStream = AdsStream<DeltaDiscoveryRequest>;

impl<Req: AdsRequest> AdsStream<Req> {
    /// Opens a stream; `node` goes with the first request.
    pub async fn open(server: &TestServer, node: Node) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let response = within(
            &format!("the {} stream to open", Req::VARIANT),
            Req::open_call(server.client().await, ReceiverStream::new(rx)),
        )
        .await
        .unwrap();
        AdsStream {
            node: Some(node),
            tx: Some(tx),
            rx: response.into_inner(),
            names: BTreeMap::new(),
        }
    }

    /// Sends a request (with the node if it is the first).
    pub async fn send(&mut self, mut req: Req) {
        if let Some(node) = self.node.take() {
            req.set_node(node);
        }
        if let Some((type_url, names)) = req.subscription() {
            self.names.insert(type_url.to_string(), names.to_vec());
        }
        let tx = self.tx.as_ref().expect("request side closed");
        within("the request to be queued", tx.send(req))
            .await
            .unwrap();
    }

    /// Next message of the stream (`None`: the stream ended), bounded by `limit`.
    pub async fn next_within(
        &mut self,
        limit: Duration,
    ) -> Result<Option<Result<Req::Response, Status>>, tokio::time::error::Elapsed> {
        tokio::time::timeout(limit, self.rx.message())
            .await
            .map(|r| r.transpose())
    }

    /// The next response, `expected` in the failure message; panics on an error, the end
    /// of the stream, or after [`WAIT`].
    async fn recv_expected(&mut self, expected: &str) -> Req::Response {
        match self.next_within(WAIT).await {
            Ok(Some(Ok(resp))) => resp,
            Ok(Some(Err(status))) => panic!("stream failed: {status:?}"),
            Ok(None) => panic!("stream ended while a response was expected"),
            Err(_) => panic!("no {expected} within {WAIT:?}"),
        }
    }

    /// The next response; panics on an error, the end of the stream, or after [`WAIT`].
    pub async fn recv(&mut self) -> Req::Response {
        self.recv_expected("response").await
    }

    /// The next response, which must be of `type_url`.
    pub async fn recv_type(&mut self, type_url: &str) -> Req::Response {
        let resp = self
            .recv_expected(&format!("{} response", short(type_url)))
            .await;
        assert_eq!(
            short(resp.type_url()),
            short(type_url),
            "unexpected response type ({})",
            resp.identity()
        );
        resp
    }

    /// The status the stream ends with; panics on a response or after [`WAIT`].
    pub async fn recv_status(&mut self) -> Status {
        match self.next_within(WAIT).await {
            Ok(Some(Err(status))) => status,
            Ok(Some(Ok(resp))) => panic!("expected an error, got a {} response", resp.type_url()),
            Ok(None) => panic!("stream ended without an error status"),
            Err(_) => panic!("no error status within {WAIT:?}"),
        }
    }

    /// The next response within [`QUIET`], if any; panics (naming `while`) when the stream
    /// ends or fails instead.
    async fn recv_quiet(&mut self, while_: &str) -> Option<Req::Response> {
        match self.next_within(QUIET).await {
            Err(_) => None,
            Ok(Some(Ok(resp))) => Some(resp),
            Ok(other) => panic!("{while_}: unexpected end of stream: {other:?}"),
        }
    }

    /// The next response within [`QUIET`], if any.
    pub async fn maybe_recv(&mut self) -> Option<Req::Response> {
        self.recv_quiet("waiting for a possible response").await
    }

    /// Asserts that nothing arrives for [`QUIET`].
    pub async fn expect_silence(&mut self, why: &str) {
        if let Some(resp) = self.recv_quiet(why).await {
            panic!(
                "{why}: unexpected {} response: {}",
                short(resp.type_url()),
                resp.contents()
            );
        }
    }

    /// Closes the request side and drops the response side.
    pub fn close(mut self) {
        self.tx.take();
    }
}

impl AdsStream<DiscoveryRequest> {
    /// Sends a request built from its parts.
    pub async fn request(&mut self, type_url: &str, names: &[&str], version: &str, nonce: &str) {
        self.send(sotw_request(type_url, names, version, nonce))
            .await;
    }

    /// Answers `resp` with the names last requested for its type, reporting `version`.
    fn answer(&self, resp: &DiscoveryResponse, version: &str) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: version.to_string(),
            resource_names: self.names.get(&resp.type_url).cloned().unwrap_or_default(),
            type_url: resp.type_url.clone(),
            response_nonce: resp.nonce.clone(),
            ..Default::default()
        }
    }

    /// ACKs `resp` with the names last requested for its type.
    pub async fn ack(&mut self, resp: &DiscoveryResponse) {
        self.send(self.answer(resp, &resp.version_info)).await;
    }

    /// Subscribes to `names` of `type_url` from scratch, waits for the answer and ACKs it.
    pub async fn subscribe(&mut self, type_url: &str, names: &[&str]) -> DiscoveryResponse {
        self.request(type_url, names, "", "").await;
        let resp = self.recv_type(type_url).await;
        self.ack(&resp).await;
        resp
    }

    /// NACKs `resp`, reporting `previous` as the version still in use.
    pub async fn nack(&mut self, resp: &DiscoveryResponse, previous: &str, message: &str) {
        self.send(DiscoveryRequest {
            error_detail: Some(rejection(message)),
            ..self.answer(resp, previous)
        })
        .await;
    }
}

impl AdsStream<DeltaDiscoveryRequest> {
    /// ACKs `resp`.
    pub async fn ack(&mut self, resp: &DeltaDiscoveryResponse) {
        self.send(delta_request(&resp.type_url, &[], &[], &resp.nonce))
            .await;
    }

    /// Subscribes to `names` of `type_url` (none: the wildcard), waits for the answer and
    /// ACKs it.
    pub async fn subscribe(&mut self, type_url: &str, names: &[&str]) -> DeltaDiscoveryResponse {
        self.send(delta_request(type_url, names, &[], "")).await;
        let resp = self.recv_type(type_url).await;
        self.ack(&resp).await;
        resp
    }

    /// NACKs `resp` with `message`.
    pub async fn nack(&mut self, resp: &DeltaDiscoveryResponse, message: &str) {
        self.send(DeltaDiscoveryRequest {
            error_detail: Some(rejection(message)),
            ..delta_request(&resp.type_url, &[], &[], &resp.nonce)
        })
        .await;
    }
}

/// Decodes one resource, checking its type URL.
pub fn decode<M: Message + Default + prost::Name>(any: &Any) -> M {
    assert_eq!(
        any.type_url,
        M::type_url(),
        "resource of an unexpected type"
    );
    M::decode(any.value.as_slice()).unwrap()
}

/// Cluster names of a CDS response.
pub fn cluster_names(resp: &DiscoveryResponse) -> BTreeSet<String> {
    resp.resources
        .iter()
        .map(|a| decode::<Cluster>(a).name)
        .collect()
}

/// Assignments of an EDS response by cluster name.
pub fn assignments(resp: &DiscoveryResponse) -> BTreeMap<String, ClusterLoadAssignment> {
    resp.resources
        .iter()
        .map(|a| {
            let cla = decode::<ClusterLoadAssignment>(a);
            (cla.cluster_name.clone(), cla)
        })
        .collect()
}

/// Listener names of an LDS response.
pub fn listener_names(resp: &DiscoveryResponse) -> BTreeSet<String> {
    resp.resources
        .iter()
        .map(|a| decode::<Listener>(a).name)
        .collect()
}

/// Route configurations of an RDS response by name.
pub fn routes(resp: &DiscoveryResponse) -> BTreeMap<String, RouteConfiguration> {
    resp.resources
        .iter()
        .map(|a| {
            let r = decode::<RouteConfiguration>(a);
            (r.name.clone(), r)
        })
        .collect()
}

/// Number of endpoints of an assignment.
pub fn endpoint_count(cla: &ClusterLoadAssignment) -> usize {
    cla.endpoints.iter().map(|l| l.lb_endpoints.len()).sum()
}

/// Names of the resources of a delta response (checking that each body decodes as its
/// type and carries the same name).
pub fn delta_names(resp: &DeltaDiscoveryResponse) -> BTreeSet<String> {
    resp.resources
        .iter()
        .map(|r| {
            let body = r.resource.as_ref().expect("delta resource without a body");
            let name = match resp.type_url.as_str() {
                CDS => decode::<Cluster>(body).name,
                EDS => decode::<ClusterLoadAssignment>(body).cluster_name,
                LDS => decode::<Listener>(body).name,
                RDS => decode::<RouteConfiguration>(body).name,
                other => panic!("unexpected type {other}"),
            };
            assert_eq!(name, r.name, "delta resource name differs from its body");
            r.name.clone()
        })
        .collect()
}

/// Name → version of the resources of a delta response.
pub fn delta_versions(resp: &DeltaDiscoveryResponse) -> BTreeMap<String, String> {
    resp.resources
        .iter()
        .map(|r| (r.name.clone(), r.version.clone()))
        .collect()
}
