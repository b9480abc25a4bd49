//! ADS protocol tests: a fake proxy talks SotW and delta xDS to meshbridge over real gRPC
//! on 127.0.0.1. Every wait is bounded (see `support::ads_client::WAIT` and `QUIET`).

use crate::support;

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use meshbridge::xds::XdsLimits;
use serde_json::json;
use support::ads_client::*;
use support::fixtures::{Fixture, MeshService, manifests};
use tonic::Code;

/// The frontend's node: every port set, depending on `orders`.
fn frontend(id: &str) -> NodeBuilder {
    NodeBuilder::new(id, "frontend").dependencies(&["orders"])
}

/// Manifests of a mesh of frontend, orders and (optionally) billing and payments.
struct Mesh<'a> {
    /// Dependencies the frontend MeshService declares.
    frontend_deps: &'a [&'a str],
    /// Ports of the orders endpoints.
    orders_ports: &'a [u16],
    /// Ports of the billing endpoints; `None`: no billing service.
    billing_ports: Option<&'a [u16]>,
    /// Whether a payments service exists.
    payments: bool,
}

const BASE: Mesh<'static> = Mesh {
    frontend_deps: &["orders"],
    orders_ports: &[18181],
    billing_ports: Some(&[18083]),
    payments: false,
};

impl Mesh<'_> {
    fn yaml(&self) -> String {
        let frontend = self.frontend_deps.iter().fold(
            MeshService::build("frontend").set("dependencies", json!([])),
            |m, d| m.dependency_with(json!({"service": d, "timeout": "2s"})),
        );
        let service =
            |name: &str, ports: &[u16]| MeshService::build(name).endpoints("127.0.0.1", ports);
        let mut docs = vec![frontend, service("orders", self.orders_ports)];
        if let Some(ports) = self.billing_ports {
            docs.push(service("billing", ports));
        }
        if self.payments {
            docs.push(service("payments", &[18090]));
        }
        let docs: Vec<&dyn Fixture> = docs.iter().map(|d| d as &dyn Fixture).collect();
        manifests(&docs)
    }
}

/// [`BASE`] with a second orders endpoint.
const ORDERS_SCALED: Mesh<'static> = Mesh {
    orders_ports: &[18181, 18182],
    ..BASE
};

/// [`BASE`] with the frontend depending on billing too.
const BILLING_NEEDED: Mesh<'static> = Mesh {
    frontend_deps: &["orders", "billing"],
    ..BASE
};

/// [`BILLING_NEEDED`] with a second orders endpoint.
const BILLING_NEEDED_ORDERS_SCALED: Mesh<'static> = Mesh {
    orders_ports: &[18181, 18182],
    ..BILLING_NEEDED
};

/// [`BASE`] without the billing service.
const NO_BILLING: Mesh<'static> = Mesh {
    billing_ports: None,
    ..BASE
};

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| n.to_string()).collect()
}

async fn server(mesh: &Mesh<'_>) -> TestServer {
    TestServer::with_mesh(&mesh.yaml()).await
}

/// Waits until the registry shows `type_url` of `node` acknowledged at `version`.
async fn acked(server: &TestServer, node: &str, type_url: &str, version: &str) {
    eventually(
        &format!("{node} to ACK {} {version}", short(type_url)),
        || {
            server
                .type_status(node, type_url)
                .is_some_and(|s| s.acked.as_deref() == Some(version) && s.nack.is_none())
        },
    )
    .await;
}

/// A frontend node that also depends on billing.
fn frontend_with_billing(id: &str) -> Node {
    NodeBuilder::new(id, "frontend")
        .dependencies(&["orders", "billing"])
        .build()
}

/// Closes the only stream of `server` and waits until the registry has forgotten it.
async fn close_only_stream<Req: AdsRequest>(server: &TestServer, stream: AdsStream<Req>) {
    stream.close();
    eventually("the first stream to go", || server.registry.is_empty()).await;
}

/// Asserts that a stream was refused with `code` and a message containing `fragment`.
fn assert_refused(status: &tonic::Status, code: Code, fragment: &str) {
    assert_eq!(status.code(), code, "{status:?}");
    assert!(status.message().contains(fragment), "{status:?}");
}

/// Opens a delta stream of a frontend depending on orders and billing and subscribes to
/// every cluster, checking all three arrive; returns the stream and the ACKed response.
async fn delta_with_all_clusters(server: &TestServer) -> (DeltaStream, DeltaDiscoveryResponse) {
    let mut d = DeltaStream::open(server, frontend_with_billing("fe-d")).await;
    let cds = d.subscribe(CDS, &[]).await;
    assert_eq!(delta_names(&cds), set(&["billing", "local|app", "orders"]));
    (d, cds)
}

/// A frontend's delta stream that got the clusters and the orders assignment and closed:
/// the two responses it ACKed.
async fn delta_session_then_close(
    server: &TestServer,
) -> (DeltaDiscoveryResponse, DeltaDiscoveryResponse) {
    let mut d1 = DeltaStream::open(server, frontend("fe-d").build()).await;
    let cds = d1.subscribe(CDS, &[]).await;
    let eds = d1.subscribe(EDS, &["orders"]).await;
    close_only_stream(server, d1).await;
    (cds, eds)
}

/// A frontend's new delta stream resubscribing to every cluster and to the orders
/// assignment, reporting the resource versions it has.
async fn delta_resume(
    server: &TestServer,
    clusters: BTreeMap<String, String>,
    assignments: BTreeMap<String, String>,
) -> DeltaStream {
    let mut d2 = DeltaStream::open(server, frontend("fe-d").build()).await;
    d2.send(DeltaDiscoveryRequest {
        initial_resource_versions: clusters.into_iter().collect(),
        ..delta_request(CDS, &[], &[], "")
    })
    .await;
    d2.send(DeltaDiscoveryRequest {
        initial_resource_versions: assignments.into_iter().collect(),
        ..delta_request(EDS, &["orders"], &[], "")
    })
    .await;
    d2
}

#[tokio::test]
async fn sotw_handshake_then_pushes_in_cds_eds_lds_rds_order() {
    let server = server(&BASE).await;
    let mut s = SotwStream::open(&server, frontend("fe-1").build()).await;

    s.request(CDS, &[], "", "").await;
    let cds = s.recv_type(CDS).await;
    assert_eq!(cluster_names(&cds), set(&["local|app", "orders"]));
    assert!(!cds.version_info.is_empty() && !cds.nonce.is_empty());
    assert_eq!(
        cds.control_plane.as_ref().map(|c| c.identifier.as_str()),
        Some("meshbridge-test")
    );
    s.ack(&cds).await;
    s.expect_silence("after the CDS ACK").await;
    acked(&server, "fe-1", CDS, &cds.version_info).await;

    s.request(EDS, &["orders"], "", "").await;
    let eds = s.recv_type(EDS).await;
    let cla = assignments(&eds);
    assert_eq!(
        cla.keys().cloned().collect::<BTreeSet<_>>(),
        set(&["orders"])
    );
    assert_eq!(endpoint_count(&cla["orders"]), 1);
    s.ack(&eds).await;

    s.request(LDS, &[], "", "").await;
    let lds = s.recv_type(LDS).await;
    assert_eq!(listener_names(&lds), set(&["egress", "ingress"]));
    s.ack(&lds).await;

    s.request(RDS, &["egress", "ingress"], "", "").await;
    let rds = s.recv_type(RDS).await;
    assert_eq!(
        routes(&rds).keys().cloned().collect::<BTreeSet<_>>(),
        set(&["egress", "ingress"])
    );
    s.ack(&rds).await;
    for (t, r) in [(EDS, &eds), (LDS, &lds), (RDS, &rds)] {
        acked(&server, "fe-1", t, &r.version_info).await;
    }
    // Nonces are distinct per response.
    let nonces: BTreeSet<&str> = [&cds, &eds, &lds, &rds]
        .iter()
        .map(|r| r.nonce.as_str())
        .collect();
    assert_eq!(nonces.len(), 4);

    // Only endpoints change: EDS alone.
    server.update(&ORDERS_SCALED.yaml());
    let eds2 = s.recv_type(EDS).await;
    assert_ne!(eds2.version_info, eds.version_info);
    assert_eq!(endpoint_count(&assignments(&eds2)["orders"]), 2);
    s.ack(&eds2).await;
    s.expect_silence("only endpoints changed").await;
    acked(&server, "fe-1", EDS, &eds2.version_info).await;

    // A new dependency: clusters and routes change, listeners do not. EDS follows CDS even
    // though the subscribed assignments did not change.
    server.update(&BILLING_NEEDED_ORDERS_SCALED.yaml());
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(s.recv().await);
    }
    let order: Vec<&str> = got.iter().map(|r| short(&r.type_url)).collect();
    assert_eq!(order, ["CDS", "EDS", "RDS"]);
    let (cds3, eds3, rds3) = (&got[0], &got[1], &got[2]);
    assert_eq!(
        cluster_names(cds3),
        set(&["billing", "local|app", "orders"])
    );
    assert_ne!(cds3.version_info, cds.version_info);
    assert_eq!(
        eds3.version_info, eds2.version_info,
        "EDS is resent unchanged after a CDS change"
    );
    assert_ne!(eds3.nonce, eds2.nonce);
    assert_eq!(assignments(eds3).len(), 1);
    let egress = &routes(rds3)["egress"];
    assert!(
        egress.virtual_hosts.iter().any(|v| v.name == "billing"),
        "egress routes name billing: {:?}",
        egress
            .virtual_hosts
            .iter()
            .map(|v| &v.name)
            .collect::<Vec<_>>()
    );
    for r in &got {
        s.ack(r).await;
    }
    // The proxy asks for the new cluster's assignment.
    s.request(EDS, &["billing", "orders"], &eds3.version_info, &eds3.nonce)
        .await;
    let eds4 = s.recv_type(EDS).await;
    assert_eq!(
        assignments(&eds4).keys().cloned().collect::<BTreeSet<_>>(),
        set(&["billing", "orders"])
    );
    s.ack(&eds4).await;
    s.expect_silence("everything acknowledged, no LDS change")
        .await;
}

#[tokio::test]
async fn sotw_nack_is_recorded_and_not_answered_with_the_same_version() {
    let server = server(&BASE).await;
    let mut s = SotwStream::open(&server, frontend("fe-1").build()).await;
    let cds1 = s.subscribe(CDS, &[]).await;
    acked(&server, "fe-1", CDS, &cds1.version_info).await;

    server.update(&BILLING_NEEDED.yaml());
    let cds2 = s.recv_type(CDS).await;
    assert_ne!(cds2.version_info, cds1.version_info);

    let message = "cluster billing: rejected by the test";
    s.nack(&cds2, &cds1.version_info, message).await;
    s.expect_silence("a NACK is not answered with the same version")
        .await;
    eventually("the registry to show the NACK", || {
        server
            .type_status("fe-1", CDS)
            .is_some_and(|t| t.nack.as_deref() == Some(message))
    })
    .await;
    let status = server.type_status("fe-1", CDS).unwrap();
    assert_eq!(status.acked.as_deref(), Some(cds1.version_info.as_str()));
    assert_eq!(status.sent.as_deref(), Some(cds2.version_info.as_str()));

    // A state change that leaves the clusters as they were NACKed: still nothing.
    server.update(&BILLING_NEEDED_ORDERS_SCALED.yaml());
    s.expect_silence("clusters unchanged since the NACK").await;

    // A real change of the clusters produces a new version.
    server.update(
        &Mesh {
            frontend_deps: &["orders", "billing", "payments"],
            payments: true,
            ..BASE
        }
        .yaml(),
    );
    let cds3 = s.recv_type(CDS).await;
    assert!(cluster_names(&cds3).contains("payments"));
    assert_ne!(cds3.version_info, cds2.version_info);
    assert_ne!(cds3.nonce, cds2.nonce);
    s.ack(&cds3).await;
    // The ACK clears the NACK.
    acked(&server, "fe-1", CDS, &cds3.version_info).await;
}

#[tokio::test]
async fn sotw_stale_nonce_is_ignored() {
    let server = server(&BASE).await;
    let mut s = SotwStream::open(&server, frontend("fe-1").build()).await;
    s.subscribe(CDS, &[]).await;
    let eds1 = s.subscribe(EDS, &["orders"]).await;
    acked(&server, "fe-1", EDS, &eds1.version_info).await;

    server.update(&ORDERS_SCALED.yaml());
    let eds2 = s.recv_type(EDS).await;

    // Answers eds1, which is no longer the latest: ignored even though it adds a name.
    s.request(EDS, &["billing", "orders"], &eds1.version_info, &eds1.nonce)
        .await;
    s.expect_silence("a request with a stale nonce").await;
    let status = server.type_status("fe-1", EDS).unwrap();
    assert_eq!(status.acked.as_deref(), Some(eds1.version_info.as_str()));

    // The same request answering eds2 is honoured.
    s.request(EDS, &["billing", "orders"], &eds2.version_info, &eds2.nonce)
        .await;
    let eds3 = s.recv_type(EDS).await;
    assert_eq!(
        assignments(&eds3).keys().cloned().collect::<BTreeSet<_>>(),
        set(&["billing", "orders"])
    );
}

#[tokio::test]
async fn sotw_reconnect_with_acked_version_gets_nothing_until_a_change() {
    let server = server(&BASE).await;
    let mut s1 = SotwStream::open(&server, frontend("fe-1").build()).await;
    let cds1 = s1.subscribe(CDS, &[]).await;
    acked(&server, "fe-1", CDS, &cds1.version_info).await;
    close_only_stream(&server, s1).await;

    let mut s2 = SotwStream::open(&server, frontend("fe-1").build()).await;
    s2.request(CDS, &[], &cds1.version_info, "").await;
    s2.expect_silence("the proxy already has the current clusters")
        .await;

    server.update(&BILLING_NEEDED.yaml());
    let cds2 = s2.recv_type(CDS).await;
    assert_ne!(cds2.version_info, cds1.version_info);
    assert_eq!(
        cluster_names(&cds2),
        set(&["billing", "local|app", "orders"])
    );
}

#[tokio::test]
async fn sotw_reconnect_after_cluster_change_resends_eds() {
    let server = server(&BASE).await;
    let mut s1 = SotwStream::open(&server, frontend("fe-1").build()).await;
    let cds1 = s1.subscribe(CDS, &[]).await;
    let eds1 = s1.subscribe(EDS, &["orders"]).await;
    acked(&server, "fe-1", EDS, &eds1.version_info).await;
    close_only_stream(&server, s1).await;

    // Clusters change while the proxy is away; its assignments do not.
    server.update(&BILLING_NEEDED.yaml());

    // Envoy resubscribes to everything at once, reporting what it has.
    let mut s2 = SotwStream::open(&server, frontend("fe-1").build()).await;
    s2.request(CDS, &[], &cds1.version_info, "").await;
    s2.request(EDS, &["orders"], &eds1.version_info, "").await;
    let cds2 = s2.recv_type(CDS).await;
    assert!(cluster_names(&cds2).contains("billing"));
    // The clusters the CDS response (re)creates warm until EDS arrives: it must come even
    // though the proxy reported the current EDS version.
    let eds2 = s2.recv_type(EDS).await;
    assert_eq!(eds2.version_info, eds1.version_info);
    assert_eq!(assignments(&eds2).len(), 1);
}

#[tokio::test]
async fn sotw_eds_for_unknown_cluster_gets_empty_assignment() {
    let server = server(&BASE).await;
    let mut s = SotwStream::open(&server, frontend("fe-1").build()).await;
    s.request(EDS, &["no-such-cluster", "orders"], "", "").await;
    let eds = s.recv_type(EDS).await;
    assert_eq!(eds.resources.len(), 2);
    let cla = assignments(&eds);
    let empty = &cla["no-such-cluster"];
    assert_eq!(empty.cluster_name, "no-such-cluster");
    assert_eq!(endpoint_count(empty), 0);
    assert_eq!(endpoint_count(&cla["orders"]), 1);
}

#[tokio::test]
async fn delta_wildcard_cds_and_eds_subscriptions() {
    let server = server(&BASE).await;
    let (mut d, cds) = delta_with_all_clusters(&server).await;
    assert!(cds.removed_resources.is_empty());
    d.expect_silence("after the CDS ACK").await;

    d.send(delta_request(EDS, &["orders"], &[], "")).await;
    let eds = d.recv_type(EDS).await;
    assert_eq!(delta_names(&eds), set(&["orders"]));
    d.ack(&eds).await;

    // Both services change; only the subscribed one is sent.
    server.update(
        &Mesh {
            orders_ports: &[18181, 18182],
            billing_ports: Some(&[18083, 18084]),
            ..BASE
        }
        .yaml(),
    );
    let eds2 = d.recv_type(EDS).await;
    assert_eq!(delta_names(&eds2), set(&["orders"]));
    let body = eds2.resources[0].resource.as_ref().unwrap();
    assert_eq!(
        endpoint_count(&decode::<
            envoy_types::pb::envoy::config::endpoint::v3::ClusterLoadAssignment,
        >(body)),
        2
    );
    assert_ne!(eds2.resources[0].version, eds.resources[0].version);
    d.ack(&eds2).await;
    d.expect_silence("nothing else subscribed changed").await;

    // Subscribing another name sends just that one.
    d.send(delta_request(EDS, &["billing"], &[], &eds2.nonce))
        .await;
    let eds3 = d.recv_type(EDS).await;
    assert_eq!(delta_names(&eds3), set(&["billing"]));
    let body = eds3.resources[0].resource.as_ref().unwrap();
    assert_eq!(
        endpoint_count(&decode(body)),
        2,
        "billing's real assignment"
    );
    d.ack(&eds3).await;

    // Unsubscribing sends nothing, and later changes of that name are not sent.
    d.send(delta_request(EDS, &[], &["orders"], &eds3.nonce))
        .await;
    d.expect_silence("an unsubscribe needs no response").await;
    server.update(
        &Mesh {
            orders_ports: &[18181],
            billing_ports: Some(&[18083, 18084]),
            ..BASE
        }
        .yaml(),
    );
    d.expect_silence("orders is no longer subscribed").await;

    // A change of a still-subscribed name is.
    server.update(
        &Mesh {
            orders_ports: &[18181],
            billing_ports: Some(&[18083]),
            ..BASE
        }
        .yaml(),
    );
    let eds4 = d.recv_type(EDS).await;
    assert_eq!(delta_names(&eds4), set(&["billing"]));
}

#[tokio::test]
async fn delta_removed_service_is_named_in_removed_resources() {
    let server = server(&BASE).await;
    let (mut d, cds) = delta_with_all_clusters(&server).await;

    server.update(&NO_BILLING.yaml());
    let cds2 = d.recv_type(CDS).await;
    assert_eq!(cds2.removed_resources, vec!["billing".to_string()]);
    assert!(
        cds2.resources.is_empty(),
        "unchanged clusters are not resent: {:?}",
        delta_names(&cds2)
    );
    assert_ne!(cds2.system_version_info, cds.system_version_info);
    d.ack(&cds2).await;
    d.expect_silence("everything acknowledged").await;
}

#[tokio::test]
async fn delta_unsubscribing_the_wildcard_stops_unnamed_resources() {
    let server = server(&BASE).await;
    let (mut d, cds) = delta_with_all_clusters(&server).await;

    // From "everything" to just orders: the proxy already has it.
    d.send(delta_request(CDS, &["orders"], &["*"], &cds.nonce))
        .await;
    d.expect_silence("orders is current").await;

    // billing is no longer subscribed: its removal is none of the proxy's business.
    server.update(&NO_BILLING.yaml());
    d.expect_silence("billing is not subscribed any more").await;

    // Subscribing to the wildcard again brings back what the proxy lacks.
    d.send(delta_request(CDS, &["*"], &[], &cds.nonce)).await;
    let cds2 = d.recv_type(CDS).await;
    assert_eq!(delta_names(&cds2), set(&["local|app"]));
    assert!(cds2.removed_resources.is_empty());
}

#[tokio::test]
async fn delta_reconnect_with_current_versions_resends_nothing() {
    let server = server(&BASE).await;
    let (cds, eds) = delta_session_then_close(&server).await;

    let mut d2 = delta_resume(&server, delta_versions(&cds), delta_versions(&eds)).await;
    while let Some(resp) = d2.maybe_recv().await {
        assert!(
            resp.resources.is_empty() && resp.removed_resources.is_empty(),
            "{} resent after a reconnect with current versions: {:?} removed {:?}",
            short(&resp.type_url),
            delta_names(&resp),
            resp.removed_resources
        );
        d2.ack(&resp).await;
    }

    // The new stream still follows changes.
    server.update(&ORDERS_SCALED.yaml());
    let eds2 = d2.recv_type(EDS).await;
    assert_eq!(delta_names(&eds2), set(&["orders"]));
    assert_ne!(eds2.resources[0].version, eds.resources[0].version);
}

#[tokio::test]
async fn delta_reconnect_with_an_old_cluster_resends_its_assignment() {
    let server = server(&BASE).await;
    let (cds, eds) = delta_session_then_close(&server).await;

    // The proxy comes back with an outdated orders cluster and a current assignment.
    let mut clusters = delta_versions(&cds);
    clusters.insert("orders".to_string(), "outdated".to_string());
    let mut d2 = delta_resume(&server, clusters, delta_versions(&eds)).await;
    let cds2 = d2.recv_type(CDS).await;
    assert_eq!(delta_names(&cds2), set(&["orders"]));
    // The updated cluster warms until its assignment arrives.
    let eds2 = d2.recv_type(EDS).await;
    assert_eq!(delta_names(&eds2), set(&["orders"]));
}

#[tokio::test]
async fn node_without_service_name_is_refused_and_others_keep_going() {
    let server = server(&BASE).await;
    let mut good = SotwStream::open(&server, frontend("fe-1").build()).await;
    good.subscribe(CDS, &[]).await;

    let bad_node = NodeBuilder::bare("bad-1")
        .field(
            "egress_port",
            envoy_types::pb::google::protobuf::Value {
                kind: Some(envoy_types::pb::google::protobuf::value::Kind::NumberValue(
                    15001.0,
                )),
            },
        )
        .build();
    let mut bad = SotwStream::open(&server, bad_node.clone()).await;
    bad.request(CDS, &[], "", "").await;
    let status = bad.recv_status().await;
    assert_refused(&status, Code::InvalidArgument, "service_name");

    let mut bad_delta = DeltaStream::open(&server, bad_node).await;
    bad_delta.send(delta_request(CDS, &[], &[], "")).await;
    let status = bad_delta.recv_status().await;
    assert_refused(&status, Code::InvalidArgument, "service_name");

    assert_eq!(
        server.registry.len(),
        1,
        "refused streams are not registered"
    );
    assert_eq!(server.cache.group_count(), 1);

    server.update(&BILLING_NEEDED.yaml());
    let cds2 = good.recv_type(CDS).await;
    assert!(cluster_names(&cds2).contains("billing"));
}

#[tokio::test]
async fn streams_of_one_group_share_it_and_it_goes_with_the_last() {
    let server = server(&BASE).await;
    let mut streams = Vec::new();
    let mut versions = BTreeSet::new();
    for i in 1..=3 {
        let mut s = SotwStream::open(&server, frontend(&format!("fe-{i}")).build()).await;
        s.request(CDS, &[], "", "").await;
        let cds = s.recv_type(CDS).await;
        versions.insert(cds.version_info.clone());
        s.ack(&cds).await;
        streams.push(s);
    }
    assert_eq!(versions.len(), 1, "one group, one version");
    assert_eq!(server.cache.group_count(), 1);
    assert_eq!(server.registry.len(), 3);

    // Another group (different ports) is counted apart.
    let other = NodeBuilder::new("be-1", "orders").build();
    let mut o = SotwStream::open(&server, other).await;
    o.request(CDS, &[], "", "").await;
    let ocds = o.recv_type(CDS).await;
    assert_eq!(cluster_names(&ocds), set(&["local|app"]));
    assert_eq!(server.cache.group_count(), 2);
    o.close();
    eventually("the other group to go", || server.cache.group_count() == 1).await;

    // One update reaches every stream of the group.
    server.update(&BILLING_NEEDED.yaml());
    let mut versions = BTreeSet::new();
    for s in &mut streams {
        versions.insert(s.recv_type(CDS).await.version_info);
    }
    assert_eq!(versions.len(), 1);

    // Closing two keeps the group; closing the last drops it.
    let last = streams.pop().unwrap();
    for s in streams {
        s.close();
    }
    eventually("two streams to go", || server.registry.len() == 1).await;
    assert_eq!(server.cache.group_count(), 1);
    last.close();
    eventually("the group to go with its last stream", || {
        server.cache.group_count() == 0
    })
    .await;
    assert!(server.registry.is_empty());
}

/// Subscribes to CDS and to the `orders` assignment, ACKing both.
async fn subscribe_orders(s: &mut SotwStream) {
    s.subscribe(CDS, &[]).await;
    s.subscribe(EDS, &["orders"]).await;
}

#[tokio::test]
async fn a_stream_that_stops_reading_does_not_hold_up_the_others() {
    let ports: Vec<u16> = (20000..20300).collect();
    let server = server(&Mesh {
        orders_ports: &ports,
        ..BASE
    })
    .await;
    // Same group: the slow one subscribes, then never reads again.
    let mut slow = SotwStream::open(&server, frontend("slow").build()).await;
    subscribe_orders(&mut slow).await;
    let mut fast = SotwStream::open(&server, frontend("fast").build()).await;
    subscribe_orders(&mut fast).await;

    // 300 updates of a 300-endpoint assignment: far more than the slow stream's buffers.
    let mut last = String::new();
    for i in 0..300u16 {
        let shifted: Vec<u16> = ports.iter().map(|p| p + i + 1).collect();
        server.update(
            &Mesh {
                orders_ports: &shifted,
                ..BASE
            }
            .yaml(),
        );
        // The fast stream keeps up with each one.
        let eds = fast.recv_type(EDS).await;
        let got = assignments(&eds);
        assert_eq!(got["orders"].endpoints[0].lb_endpoints.len(), 300);
        fast.ack(&eds).await;
        last = eds.version_info;
    }
    assert!(!last.is_empty());
    acked(&server, "fast", EDS, &last).await;
    assert_eq!(
        server.registry.len(),
        2,
        "the slow stream is still connected"
    );
    slow.close();
}

/// `(ACKs counted, ACK/NACK latency samples, NACKs counted)` of a type (`cds`, `eds`).
fn ack_metrics(server: &TestServer, short: &str) -> (f64, f64, f64) {
    (
        server.metric(&format!("meshbridge_xds_acks_total{{type=\"{short}\"}}")),
        server.metric(&format!(
            "meshbridge_xds_ack_seconds_count{{type=\"{short}\"}}"
        )),
        server.metric(&format!("meshbridge_xds_nacks_total{{type=\"{short}\"}}")),
    )
}

#[tokio::test]
async fn delta_subscription_change_without_a_nonce_is_neither_an_ack_nor_a_nack() {
    let server = server(&BASE).await;
    let (mut d, _) = delta_with_all_clusters(&server).await;

    d.send(delta_request(EDS, &["orders"], &[], "")).await;
    let eds1 = d.recv_type(EDS).await;
    let message = "orders: rejected by the test";
    d.nack(&eds1, message).await;
    eventually("the registry to show the NACK", || {
        server
            .type_status("fe-d", EDS)
            .is_some_and(|t| t.nack.as_deref() == Some(message))
    })
    .await;

    // A new response is in flight when the proxy subscribes to another name, without a
    // nonce, as Envoy does for EDS.
    server.update(&ORDERS_SCALED.yaml());
    let eds2 = d.recv_type(EDS).await;
    assert_eq!(delta_names(&eds2), set(&["orders"]));
    d.send(delta_request(EDS, &["billing"], &[], "")).await;
    let eds3 = d.recv_type(EDS).await;
    assert_eq!(delta_names(&eds3), set(&["billing"]));
    // The subscription change was recorded before eds3 went out.
    let status = server.type_status("fe-d", EDS).unwrap();
    assert_eq!(
        status.nack.as_deref(),
        Some(message),
        "a subscription change does not clear the NACK"
    );
    assert_eq!(status.acked, None, "a subscription change is no ACK");
    assert_eq!(
        ack_metrics(&server, "eds"),
        (0.0, 1.0, 1.0),
        "no ACK counted, one latency sample: the NACK's"
    );

    // The real ACK of the latest response counts, with its latency.
    d.ack(&eds3).await;
    eventually("the EDS ACK to be recorded", || {
        ack_metrics(&server, "eds") == (1.0, 2.0, 1.0)
    })
    .await;
    let status = server.type_status("fe-d", EDS).unwrap();
    assert_eq!(status.nack, None);
    assert_eq!(
        status.acked.as_deref(),
        Some(eds3.system_version_info.as_str())
    );
    assert_eq!(ack_metrics(&server, "cds"), (1.0, 1.0, 0.0));
}

#[tokio::test]
async fn delta_nack_of_an_older_response_leaves_the_latest_alone() {
    let server = server(&BASE).await;
    let mut d = DeltaStream::open(&server, frontend("fe-d").build()).await;
    d.subscribe(CDS, &[]).await;

    d.send(delta_request(EDS, &["orders"], &[], "")).await;
    let eds1 = d.recv_type(EDS).await;
    server.update(&ORDERS_SCALED.yaml());
    let eds2 = d.recv_type(EDS).await;
    assert_ne!(eds2.nonce, eds1.nonce);

    // The proxy rejects the older response after the newer one went out.
    d.nack(&eds1, "orders: rejected by the test").await;
    // Requests are handled in order: once LDS is answered, the NACK was handled.
    d.send(delta_request(LDS, &[], &[], "")).await;
    let lds = d.recv_type(LDS).await;
    let status = server.type_status("fe-d", EDS).unwrap();
    assert_eq!(status.nack, None, "a stale NACK is not recorded");
    assert_eq!(status.acked, None);
    assert_eq!(
        status.sent.as_deref(),
        Some(eds2.system_version_info.as_str())
    );
    assert_eq!(
        ack_metrics(&server, "eds"),
        (0.0, 0.0, 0.0),
        "a stale NACK is neither counted nor timed"
    );

    // The newer response's ACK still has its latency.
    d.ack(&eds2).await;
    d.ack(&lds).await;
    eventually("the ACKs to be recorded", || {
        ack_metrics(&server, "eds") == (1.0, 1.0, 0.0)
            && ack_metrics(&server, "lds") == (1.0, 1.0, 0.0)
    })
    .await;
    let status = server.type_status("fe-d", EDS).unwrap();
    assert_eq!(
        status.acked.as_deref(),
        Some(eds2.system_version_info.as_str())
    );
    assert_eq!(status.nack, None);
}

/// A server over [`BASE`] with these limits.
async fn limited(limits: XdsLimits) -> TestServer {
    let server = TestServer::start_with_limits(limits).await;
    server.update(&BASE.yaml());
    server
}

fn limited_count(server: &TestServer, limit: &str) -> f64 {
    server.metric(&format!(
        "meshbridge_xds_limited_total{{limit=\"{limit}\"}}"
    ))
}

#[tokio::test]
async fn streams_and_groups_beyond_their_limits_are_refused_and_counted() {
    let server = limited(XdsLimits {
        max_streams: 3,
        max_groups: 2,
        ..Default::default()
    })
    .await;
    let mut open = Vec::new();
    for (id, service) in [("fe-1", "frontend"), ("or-1", "orders")] {
        let mut s = SotwStream::open(&server, NodeBuilder::new(id, service).build()).await;
        s.request(CDS, &[], "", "").await;
        s.recv_type(CDS).await;
        open.push(s);
    }
    // A third group: refused, the two others keep theirs.
    let mut third = SotwStream::open(&server, NodeBuilder::new("bi-1", "billing").build()).await;
    third.request(CDS, &[], "", "").await;
    let status = third.recv_status().await;
    assert_refused(&status, Code::ResourceExhausted, "--xds-max-groups");
    assert_eq!(server.cache.group_count(), 2);
    assert_eq!(limited_count(&server, "groups"), 1.0);
    // A stream of a group already served is a third stream: fine.
    let mut same = SotwStream::open(&server, NodeBuilder::new("fe-2", "frontend").build()).await;
    same.request(CDS, &[], "", "").await;
    same.recv_type(CDS).await;
    // A fourth stream: refused, whatever its group.
    let mut fourth = SotwStream::open(&server, NodeBuilder::new("fe-3", "frontend").build()).await;
    fourth.request(CDS, &[], "", "").await;
    let status = fourth.recv_status().await;
    assert_refused(&status, Code::ResourceExhausted, "--xds-max-streams");
    assert_eq!(server.registry.len(), 3);
    assert_eq!(limited_count(&server, "streams"), 1.0);
}

#[tokio::test]
async fn subscriptions_beyond_the_name_limit_end_the_stream() {
    let server = limited(XdsLimits {
        max_names: 3,
        ..Default::default()
    })
    .await;
    // Three names in one request, then a fourth in another type: over, over the stream.
    let mut sotw = SotwStream::open(&server, frontend("fe-1").build()).await;
    sotw.request(EDS, &["orders", "a", "b"], "", "").await;
    sotw.recv_type(EDS).await;
    sotw.request(RDS, &["egress"], "", "").await;
    let status = sotw.recv_status().await;
    assert_refused(
        &status,
        Code::ResourceExhausted,
        "subscribes to 4 resources",
    );
    // One delta request naming too many at once.
    let mut delta = DeltaStream::open(&server, frontend("fe-2").build()).await;
    delta
        .send(delta_request(EDS, &["a", "b", "c", "d"], &[], ""))
        .await;
    let status = delta.recv_status().await;
    assert_refused(&status, Code::ResourceExhausted, "names 4 resources");
    assert_eq!(limited_count(&server, "names"), 2.0);
    assert_eq!(server.registry.len(), 0, "both streams are gone");
}

#[tokio::test]
async fn a_stream_that_sends_nothing_is_closed_after_the_first_request_timeout() {
    let server = limited(XdsLimits {
        first_request_timeout: std::time::Duration::from_millis(200),
        ..Default::default()
    })
    .await;
    let mut silent = SotwStream::open(&server, frontend("fe-1").build()).await;
    let status = silent.recv_status().await;
    assert_refused(&status, Code::DeadlineExceeded, "200 ms");
    assert_eq!(limited_count(&server, "first_request"), 1.0);
}

#[tokio::test]
async fn a_request_over_the_size_limit_is_refused_and_the_server_keeps_serving() {
    let server = limited(XdsLimits {
        max_request_bytes: 64 * 1024,
        ..Default::default()
    })
    .await;
    // A node id of 100 KiB.
    let big = "x".repeat(100 * 1024);
    let mut s = SotwStream::open(&server, NodeBuilder::new(&big, "frontend").build()).await;
    s.request(CDS, &[], "", "").await;
    let status = s.recv_status().await;
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(server.registry.len(), 0);
    let mut ok = SotwStream::open(&server, frontend("fe-1").build()).await;
    ok.request(CDS, &[], "", "").await;
    ok.recv_type(CDS).await;
}
