//! `meshbridge demo`: a local mesh with real Envoys, no cluster needed.
//!
//! Starts the control plane on `examples/demo/` manifests, three tiny HTTP applications
//! (orders v1, orders v2 as canary, billing) and real Envoys for a legacy `frontend` and the
//! two orders instances, checks that traffic flows, and prints curl commands to try.
//!
//! Like hosts whose deployment system hands them certificates, every demo Envoy gets one for
//! its service's SPIFFE identity, from a CA made for the run: orders accepts only mutual TLS,
//! and its AccessRule lets frontend call `GET /hello` and nothing else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};

use crate::bootstrap::{BootstrapOptions, bootstrap_yaml};
use crate::config::{KubeMode, RunArgs};

/// Flags of `meshbridge demo`.
#[derive(Clone, Debug, clap::Args)]
pub struct DemoArgs {
    /// Directory with the demo manifests.
    #[arg(long, default_value = "examples/demo")]
    pub config_dir: PathBuf,
    /// Envoy binary (default: .venv/bin/envoy, else `envoy` on PATH).
    #[arg(long, env = "ENVOY_BIN")]
    pub envoy: Option<PathBuf>,
    /// Check that traffic flows, print the result and exit (non-interactive).
    #[arg(long)]
    pub check: bool,
}

/// Fixed demo ports (the manifests in examples/demo name them).
const XDS: u16 = 18000;
const ADMIN: u16 = 19090;
const FRONTEND_EGRESS: u16 = 10000;
const APPS: [(&str, &str, u16, Option<u16>); 3] = [
    // (service, instance, app port, Envoy ingress port)
    ("orders", "v1", 18081, Some(18181)),
    ("orders", "v2-canary", 18082, Some(18182)),
    ("billing", "v1", 18083, None),
];

/// A tiny HTTP application answering with who it is. It echoes the caller identity its
/// proxy asserted (request header `x-client-name`, or any spelling a CGI-style server would
/// read as it, such as `x_client_name`) in the response header `x-client-name-seen`, values
/// joined by `,`, absent when the request had none.
pub async fn serve_app(listener: TcpListener, service: String, instance: String) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let (service, instance) = (service.clone(), instance.clone());
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let body = format!(
                    "hello from {service} {instance}: {} {}\n",
                    req.method(),
                    req.uri().path()
                );
                let names: Vec<String> = req
                    .headers()
                    .iter()
                    .filter(|(k, _)| k.as_str().replace('_', "-") == "x-client-name")
                    .map(|(_, v)| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                async move {
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    if !names.is_empty()
                        && let Ok(value) = hyper::header::HeaderValue::from_str(&names.join(","))
                    {
                        response.headers_mut().insert("x-client-name-seen", value);
                    }
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn find_envoy(explicit: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p);
    }
    let venv = PathBuf::from(".venv/bin/envoy");
    if venv.exists() {
        return Ok(venv);
    }
    // The demo looks Envoy up as a shell would; it is not `run`, whose environment is read
    // in one place.
    #[allow(clippy::disallowed_methods)]
    let path = std::env::var_os("PATH");
    if let Some(paths) = path {
        for dir in std::env::split_paths(&paths) {
            let p = dir.join("envoy");
            if p.exists() {
                return Ok(p);
            }
        }
    }
    bail!("no Envoy found: run `make demo` (it installs Envoy into .venv) or pass --envoy")
}

/// Writes a CA (`ca.pem`) and, for each service, a certificate for its SPIFFE id signed by it
/// (`<service>.pem`, `<service>.key`), as a deployment system would put them on hosts.
fn write_identities(dir: &Path, services: &[&str], trust_domain: &str) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "meshbridge demo CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    let issuer = Issuer::new(ca_params, ca_key);
    for service in services {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, *service);
        let id = crate::translate::names::spiffe_id(trust_domain, service);
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        std::fs::write(dir.join(format!("{service}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{service}.key")), key.serialize_pem())?;
    }
    Ok(())
}

/// The bootstrap TLS options of `service`'s certificate in `dir`.
fn identity(dir: &Path, service: &str) -> (Option<PathBuf>, Option<PathBuf>, Option<PathBuf>) {
    (
        Some(dir.join(format!("{service}.pem"))),
        Some(dir.join(format!("{service}.key"))),
        Some(dir.join("ca.pem")),
    )
}

fn spawn_envoy(envoy: &Path, dir: &Path, opts: &BootstrapOptions) -> anyhow::Result<Child> {
    let file = dir.join(format!("{}.yaml", opts.node_id));
    std::fs::write(&file, bootstrap_yaml(opts)?)?;
    let log = std::fs::File::create(dir.join(format!("{}.log", opts.node_id)))?;
    // Standard output carries the JSON access log of the ingress listener.
    let access = std::fs::File::create(dir.join(format!("{}.access.log", opts.node_id)))?;
    Command::new(envoy)
        .arg("-c")
        .arg(&file)
        .args(["--disable-hot-restart", "--log-level", "warn"])
        .stdout(access)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", envoy.display()))
}

async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    canary: bool,
) -> anyhow::Result<(u16, String)> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder().uri(path).header("host", host);
    if canary {
        req = req.header("x-canary", "1");
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::new()))?)
        .await?;
    let status = resp.status().as_u16();
    let body = http_body_util::BodyExt::collect(resp.into_body())
        .await?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// The demo's control plane: `run`'s defaults, on loopback, with only the config directory
/// as a source and short timings. (Spelled out rather than parsed, so that no
/// `MESHBRIDGE_*` variable of the shell changes the demo.)
fn control_plane_args(config_dir: &Path) -> RunArgs {
    RunArgs {
        kube: KubeMode::Off,
        namespaces: vec![],
        leader_election_namespace: None,
        leader_election_name: "meshbridge-leader".into(),
        lease_duration: 15,
        identity: None,
        consul_sync_node: "meshbridge-k8s".into(),
        consul_sync_resync: 60,
        drain: 1000,
        config_dir: Some(config_dir.to_path_buf()),
        config_poll: 500,
        consul_addr: None,
        consul_datacenters: vec![],
        consul_domain: "consul".into(),
        cluster_domain: "cluster.local".into(),
        consul_token_file: None,
        consul_ca_file: None,
        consul_include_warning: false,
        consul_max_connections: 64,
        consul_wait: 55_000,
        consul_flap_hold: 1000,
        consul_confirm_removal: 30_000,
        consul_services_owned_by: vec![],
        xds_addr: SocketAddr::from(([127, 0, 0, 1], XDS)),
        admin_addr: SocketAddr::from(([127, 0, 0, 1], ADMIN)),
        admin_local_addr: None,
        webhook_addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        webhook_cert_dir: None,
        webhook_self_managed: false,
        webhook_secret: "meshbridge-webhook-tls".into(),
        webhook_service: "meshbridge-webhook".into(),
        webhook_mutating_configuration: "meshbridge-inject".into(),
        webhook_validating_configuration: "meshbridge-validate".into(),
        inject_fail_closed: false,
        sidecar_image: "envoyproxy/envoy:v1.40.0".into(),
        sidecar_init_image: "ghcr.io/meshbridge/proxy-init:0.1.0".into(),
        sidecar_xds_addr: None,
        sidecar_log_level: "info".into(),
        no_native_sidecar: false,
        sidecar_tls_secret: None,
        sidecar_xds_tls: false,
        default_deny: false,
        source_ip_identity: false,
        identity_header_from: vec![],
        sidecar_cpu: "100m".into(),
        sidecar_memory: "128Mi".into(),
        sidecar_memory_limit: "256Mi".into(),
        sidecar_ingress_port: crate::api::DEFAULT_INGRESS_PORT,
        sidecar_egress_port: 15001,
        sidecar_admin_port: 15000,
        sidecar_ready_port: 15021,
        sidecar_drain_seconds: crate::bootstrap::DEFAULT_DRAIN_SECONDS,
        sidecar_diagnostics_port: 0,
        sidecar_diagnostics_allow: vec![],
        trust_domain: "mesh.local".into(),
        debounce: 100,
        allow_wildcard: vec![],
        peers: vec![],
        peers_dns: None,
        peer_check_interval: 0,
        diagnostics_timeout: 5000,
        admin_token_file: None,
        admin_metrics_auth: false,
        admin_kubernetes_auth: false,
        xds_tls_cert: None,
        xds_tls_key: None,
        xds_client_ca: None,
        xds_client_auth: crate::xds::ClientAuth::None,
        xds_max_streams: 20_000,
        xds_max_streams_per_connection: 256,
        xds_max_groups: 10_000,
        xds_max_names: 20_000,
        xds_max_request_bytes: 4 << 20,
        xds_first_request_timeout: 10_000,
        load_report_interval: 10_000,
        external_ca_file: crate::model::DEFAULT_EXTERNAL_CA_FILE.into(),
    }
}

/// The demo's Envoys: frontend (egress only) and one beside each app instance with an
/// ingress, each with its certificate.
fn spawn_envoys(envoy: &Path, dir: &Path, xds_addr: &str) -> anyhow::Result<Vec<Child>> {
    write_identities(dir, &["frontend", "orders"], "mesh.local")?;
    let mut envoys = Vec::new();
    let (tls_cert, tls_key, tls_ca) = identity(dir, "frontend");
    envoys.push(spawn_envoy(
        envoy,
        dir,
        &BootstrapOptions {
            service: "frontend".into(),
            node_id: "frontend-1".into(),
            xds_addr: xds_addr.to_string(),
            egress_port: Some(FRONTEND_EGRESS),
            admin_port: 19901,
            tls_cert,
            tls_key,
            tls_ca,
            ..Default::default()
        },
    )?);
    for (i, (service, instance, app_port, ingress)) in APPS.iter().enumerate() {
        if let Some(ingress) = ingress {
            let (tls_cert, tls_key, tls_ca) = identity(dir, service);
            envoys.push(spawn_envoy(
                envoy,
                dir,
                &BootstrapOptions {
                    service: service.to_string(),
                    node_id: format!("{service}-{instance}"),
                    xds_addr: xds_addr.to_string(),
                    ingress_port: Some(*ingress),
                    app_port: Some(*app_port),
                    admin_port: 19902 + i as u16,
                    tls_cert,
                    tls_key,
                    tls_ca,
                    ..Default::default()
                },
            )?);
        }
    }
    Ok(envoys)
}

/// Runs the demo until Ctrl-C (or, with `--check`, until traffic is verified).
#[allow(clippy::too_many_lines)] // Most of it is the one message telling what runs and what to try.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    if !args.config_dir.is_dir() {
        bail!(
            "{} not found: run the demo from the repository root",
            args.config_dir.display()
        );
    }
    let envoy = find_envoy(args.envoy.clone())?;
    let dir = std::env::temp_dir().join(format!("meshbridge-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    for (service, instance, port, _) in APPS {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .await
            .with_context(|| format!("port {port} for {service} {instance} is taken"))?;
        tokio::spawn(serve_app(listener, service.into(), instance.into()));
    }

    let run_args = control_plane_args(&args.config_dir);
    let config = run_args.validate(&crate::config::Environment::read())?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (bound_tx, bound_rx) = tokio::sync::oneshot::channel();
    let control_plane = tokio::spawn(crate::app::run(
        config,
        async {
            let _ = stop_rx.await;
        },
        Some(bound_tx),
    ));
    let bound = bound_rx.await.context("control plane failed to start")?;

    let xds_addr = bound.xds.to_string();
    let envoys = spawn_envoys(&envoy, &dir, &xds_addr)?;

    let egress = SocketAddr::from(([127, 0, 0, 1], FRONTEND_EGRESS));
    let mut routed = None;
    for _ in 0..100 {
        if let Ok((200, body)) = get(egress, "orders", "/hello", true).await
            && body.contains("canary")
        {
            routed = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let Some(canary_body) = routed else {
        bail!(
            "traffic did not flow within 20 s; Envoy logs are in {}",
            dir.display()
        );
    };
    let (_, plain) = get(egress, "orders", "/hello", false).await?;
    let (refused_status, refused_body) = get(egress, "billing", "/", false).await?;
    let (denied_status, denied_body) = get(egress, "orders", "/admin", false).await?;
    let plaintext = match get(
        SocketAddr::from(([127, 0, 0, 1], 18181)),
        "orders",
        "/hello",
        false,
    )
    .await
    {
        Ok((status, _)) => format!("answered {status}"),
        Err(_) => "refused (no certificate)".to_string(),
    };
    println!(
        "\nmeshbridge demo is running: control plane xDS {xds_addr}, admin http://{}\n\
         Envoys: frontend (egress 127.0.0.1:{FRONTEND_EGRESS}), orders v1 (127.0.0.1:18181), orders v2 canary (127.0.0.1:18182); logs in {}\n\n\
         Checked just now:\n  orders            -> {}  orders with x-canary -> {}  billing (undeclared) -> {refused_status} {}\n\
         \x20 orders /admin (outside its AccessRule) -> {denied_status} {}\n\
         \x20 plaintext straight to orders' ingress (it is strict mTLS) -> {plaintext}\n\
         Try it:\n\
         \x20 curl -s -H 'Host: orders' http://127.0.0.1:{FRONTEND_EGRESS}/hello                # round robin over v1 and v2\n\
         \x20 curl -s -H 'Host: orders' -H 'x-canary: 1' http://127.0.0.1:{FRONTEND_EGRESS}/hello # the canary\n\
         \x20 curl -si -H 'Host: billing' http://127.0.0.1:{FRONTEND_EGRESS}/                    # refused: not a dependency of frontend\n\
         \x20 curl -si -H 'Host: orders' http://127.0.0.1:{FRONTEND_EGRESS}/hello | grep x-client-name-seen # orders saw frontend, over mTLS\n\
         \x20 curl -si -H 'Host: orders' http://127.0.0.1:{FRONTEND_EGRESS}/admin               # 403: the AccessRule allows GET /hello only\n\
         \x20 curl -s http://{}/api/access                                            # AccessRules as enforced\n\
         \x20 curl -s http://{}/api/services                                          # the model\n\
         \x20 curl -s http://{}/api/proxies                                           # connected Envoys\n\
         Operate it:\n\
         \x20 open http://{}/ in a browser                              # services, proxies, Envoy diagnostics, sources, changes\n\
         \x20 meshbridge ctl --admin {} services orders                # its instances and who calls it\n\
         \x20 meshbridge ctl --admin {} config-dump frontend-1 | head  # Envoy's own config, through meshbridge\n\
         \x20 meshbridge ctl --admin {} log-level orders-v1 debug      # audited: see `meshbridge ctl audit`\n\
         Edit {} (e.g. add billing to frontend's dependencies) and the Envoys follow within a second.\n\
         Ctrl-C stops everything.",
        bound.admin,
        dir.display(),
        plain.trim(),
        canary_body.trim(),
        refused_body.trim(),
        denied_body.trim(),
        bound.admin,
        bound.admin,
        bound.admin,
        bound.admin,
        bound.admin,
        bound.admin,
        bound.admin,
        args.config_dir.join("mesh.yaml").display(),
    );
    if !args.check {
        crate::app::shutdown_signal().await;
    }
    drop(envoys);
    let _ = stop_tx.send(());
    let _ = control_plane.await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
