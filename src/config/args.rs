//! `meshbridge run` flags as clap parses them (each also an environment variable
//! `MESHBRIDGE_<FLAG>`). Nothing outside `config` reads them: [`RunArgs::validate`] turns
//! them into a [`super::RunConfig`].

use std::net::SocketAddr;
use std::path::PathBuf;

use super::parse_listen_addr;

/// Kubernetes source mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum KubeMode {
    /// In-cluster config or `KUBECONFIG`, when either is present.
    Auto,
    /// No Kubernetes source.
    Off,
}

/// Flags of `meshbridge run`.
#[derive(Clone, Debug, clap::Args)]
pub struct RunArgs {
    /// Kubernetes source: `auto` uses in-cluster config or KUBECONFIG; `off` disables it.
    #[arg(long, env = "MESHBRIDGE_KUBE", value_enum, default_value = "auto")]
    pub kube: KubeMode,
    /// Namespaces the Kubernetes source watches; repeatable; default: all.
    #[arg(
        long = "namespace",
        env = "MESHBRIDGE_NAMESPACE",
        value_delimiter = ','
    )]
    pub namespaces: Vec<String>,
    /// Namespace of the leader-election Lease (default: the pod's namespace from
    /// POD_NAMESPACE, else `default`).
    #[arg(long, env = "MESHBRIDGE_LEADER_ELECTION_NAMESPACE")]
    pub leader_election_namespace: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "MESHBRIDGE_LEADER_ELECTION_NAME",
        default_value = "meshbridge-leader"
    )]
    pub leader_election_name: String,
    /// Lease duration in seconds: a leader that stops renewing is replaced this long after
    /// its last renewal.
    #[arg(long, env = "MESHBRIDGE_LEASE_DURATION", default_value_t = 15)]
    pub lease_duration: u64,
    /// This replica's identity in the Lease and in Events (default: POD_NAME, else the host
    /// name, plus the process id).
    #[arg(long, env = "MESHBRIDGE_IDENTITY")]
    pub identity: Option<String>,
    /// Consul node that Kubernetes instances are registered on (MeshServices with
    /// `spec.consul.register`); use one name per cluster.
    #[arg(
        long,
        env = "MESHBRIDGE_CONSUL_SYNC_NODE",
        default_value = "meshbridge-k8s"
    )]
    pub consul_sync_node: String,
    /// Seconds between full passes of the Consul registration (re-reads Consul, repairs drift).
    #[arg(long, env = "MESHBRIDGE_CONSUL_SYNC_RESYNC", default_value_t = 60)]
    pub consul_sync_resync: u64,
    /// On SIGTERM, how long existing xDS streams keep being served (new ones are refused and
    /// `/readyz` fails) before the process exits, in milliseconds.
    #[arg(long, env = "MESHBRIDGE_DRAIN", default_value_t = 5000)]
    pub drain: u64,
    /// Directory of MeshService / AccessRule manifests (YAML, the CRD schema), re-read on
    /// change: the standalone source, usable with or without Kubernetes.
    #[arg(long, env = "MESHBRIDGE_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// How often the config directory is rescanned in full, in milliseconds. Changes arrive
    /// by file-system notification at once; the rescan is the fallback for file systems that
    /// send none (a rescan only stats files that did not change).
    #[arg(long, env = "MESHBRIDGE_CONFIG_POLL", default_value_t = 5000)]
    pub config_poll: u64,
    /// Consul HTTP API, e.g. http://127.0.0.1:8500.
    #[arg(long, env = "MESHBRIDGE_CONSUL_ADDR")]
    pub consul_addr: Option<String>,
    /// Consul datacenter; repeatable; the first is the local one (priority 0), the others
    /// get priority 1, 2, … in order. Also orders the `datacenter` of manifest endpoints.
    #[arg(
        long = "consul-datacenter",
        env = "MESHBRIDGE_CONSUL_DATACENTER",
        value_delimiter = ','
    )]
    pub consul_datacenters: Vec<String>,
    /// File holding the Consul ACL token (sent as X-Consul-Token).
    #[arg(long, env = "MESHBRIDGE_CONSUL_TOKEN_FILE")]
    pub consul_token_file: Option<PathBuf>,
    /// CA bundle verifying an https:// Consul agent.
    #[arg(long, env = "MESHBRIDGE_CONSUL_CA_FILE")]
    pub consul_ca_file: Option<PathBuf>,
    /// Also send traffic to Consul instances whose checks are in `warning` (default: passing only).
    #[arg(long, env = "MESHBRIDGE_CONSUL_INCLUDE_WARNING")]
    pub consul_include_warning: bool,
    /// Most requests in flight to the Consul agent, hence most open connections (Consul's
    /// default per-client limit is 200).
    #[arg(long, env = "MESHBRIDGE_CONSUL_MAX_CONNECTIONS", default_value_t = 64)]
    pub consul_max_connections: usize,
    /// Blocking-query wait in milliseconds (each watch adds up to 15% jitter below it).
    #[arg(long, env = "MESHBRIDGE_CONSUL_WAIT", default_value_t = 55_000)]
    pub consul_wait: u64,
    /// Flap damping in milliseconds: a Consul instance whose checks failed less than this
    /// long ago stays out of rotation even if they pass again (0: off).
    #[arg(long, env = "MESHBRIDGE_CONSUL_FLAP_HOLD", default_value_t = 1000)]
    pub consul_flap_hold: u64,
    /// Namespaces that own Consul's services; repeatable. Their MeshServices may declare a
    /// service Consul knows (others' are not used), and their AccessRules may protect
    /// services no namespace declares (those only Consul knows, and those of the operator's
    /// manifests). An AccessRule from any other namespace protects only services declared in
    /// its own namespace.
    #[arg(
        long = "consul-services-owned-by",
        env = "MESHBRIDGE_CONSUL_SERVICES_OWNED_BY",
        value_delimiter = ','
    )]
    pub consul_services_owned_by: Vec<String>,
    /// A Consul catalog answer removing more than half of a datacenter's services at once is
    /// applied only once the same answer has held this long, in ms (the last known services
    /// stay meanwhile).
    #[arg(
        long,
        env = "MESHBRIDGE_CONSUL_CONFIRM_REMOVAL",
        default_value_t = 30_000
    )]
    pub consul_confirm_removal: u64,
    /// gRPC ADS address (state-of-the-world and delta xDS).
    #[arg(long, env = "MESHBRIDGE_XDS_ADDR", default_value = "0.0.0.0:18000")]
    pub xds_addr: SocketAddr,
    /// Admin API, /metrics, /healthz, /readyz (`IP:PORT`; an IPv6 address may go without
    /// brackets, as `$(POD_IP):9090` expands to on an IPv6 cluster).
    #[arg(long, env = "MESHBRIDGE_ADMIN_ADDR", default_value = "0.0.0.0:9090", value_parser = parse_listen_addr)]
    pub admin_addr: SocketAddr,
    /// A second listener of the admin API, e.g. `127.0.0.1:9090` when `--admin-addr` is the
    /// pod IP, so that `kubectl port-forward` (which connects to the pod's loopback) works.
    #[arg(long, env = "MESHBRIDGE_ADMIN_LOCAL_ADDR", value_parser = parse_listen_addr)]
    pub admin_local_addr: Option<SocketAddr>,
    /// Admission webhooks (HTTPS).
    #[arg(long, env = "MESHBRIDGE_WEBHOOK_ADDR", default_value = "0.0.0.0:9443")]
    pub webhook_addr: SocketAddr,
    /// Directory with tls.crt and tls.key for the webhook.
    #[arg(long, env = "MESHBRIDGE_WEBHOOK_CERT_DIR")]
    pub webhook_cert_dir: Option<PathBuf>,
    /// Generate and manage the webhook's CA and serving certificate.
    #[arg(long, env = "MESHBRIDGE_WEBHOOK_SELF_MANAGED")]
    pub webhook_self_managed: bool,
    /// With --webhook-self-managed: the Secret (in this pod's namespace) holding the CA and
    /// serving certificate.
    #[arg(
        long,
        env = "MESHBRIDGE_WEBHOOK_SECRET",
        default_value = "meshbridge-webhook-tls"
    )]
    pub webhook_secret: String,
    /// With --webhook-self-managed: the webhook Service (the certificate is for
    /// `<service>.<namespace>.svc`).
    #[arg(
        long,
        env = "MESHBRIDGE_WEBHOOK_SERVICE",
        default_value = "meshbridge-webhook"
    )]
    pub webhook_service: String,
    /// With --webhook-self-managed: the MutatingWebhookConfiguration whose caBundle is set.
    #[arg(
        long,
        env = "MESHBRIDGE_WEBHOOK_MUTATING_CONFIGURATION",
        default_value = "meshbridge-inject"
    )]
    pub webhook_mutating_configuration: String,
    /// With --webhook-self-managed: the ValidatingWebhookConfiguration whose caBundle is set.
    #[arg(
        long,
        env = "MESHBRIDGE_WEBHOOK_VALIDATING_CONFIGURATION",
        default_value = "meshbridge-validate"
    )]
    pub webhook_validating_configuration: String,
    /// Refuse a pod the injector cannot handle (bad annotations) instead of admitting it
    /// without a sidecar and a warning.
    #[arg(long, env = "MESHBRIDGE_INJECT_FAIL_CLOSED")]
    pub inject_fail_closed: bool,
    /// Envoy image of injected sidecars.
    #[arg(
        long,
        env = "MESHBRIDGE_SIDECAR_IMAGE",
        default_value = "envoyproxy/envoy:v1.40.0"
    )]
    pub sidecar_image: String,
    /// Image of the iptables init container (pods asking for transparent mode).
    #[arg(
        long,
        env = "MESHBRIDGE_SIDECAR_INIT_IMAGE",
        default_value = "ghcr.io/meshbridge/proxy-init:0.1.0"
    )]
    pub sidecar_init_image: String,
    /// Where injected sidecars reach this control plane's ADS, HOST:PORT (default
    /// `meshbridge-xds.<POD_NAMESPACE>.svc:18000`).
    #[arg(long, env = "MESHBRIDGE_SIDECAR_XDS_ADDR")]
    pub sidecar_xds_addr: Option<String>,
    /// Envoy log level of injected sidecars (a pod may override it by annotation).
    #[arg(long, env = "MESHBRIDGE_SIDECAR_LOG_LEVEL", default_value = "info")]
    pub sidecar_log_level: String,
    /// CPU request of injected sidecars.
    #[arg(long, env = "MESHBRIDGE_SIDECAR_CPU", default_value = "100m")]
    pub sidecar_cpu: String,
    /// Memory request of injected sidecars.
    #[arg(long, env = "MESHBRIDGE_SIDECAR_MEMORY", default_value = "128Mi")]
    pub sidecar_memory: String,
    /// Memory limit of injected sidecars.
    #[arg(long, env = "MESHBRIDGE_SIDECAR_MEMORY_LIMIT", default_value = "256Mi")]
    pub sidecar_memory_limit: String,
    /// Ingress port of injected sidecars (a pod may override it by annotation).
    #[arg(long, env = "MESHBRIDGE_SIDECAR_INGRESS_PORT", default_value_t = crate::api::DEFAULT_INGRESS_PORT)]
    pub sidecar_ingress_port: u16,
    /// Egress port of injected sidecars (a pod may override it by annotation).
    #[arg(long, env = "MESHBRIDGE_SIDECAR_EGRESS_PORT", default_value_t = 15001)]
    pub sidecar_egress_port: u16,
    /// Envoy admin port of injected sidecars (127.0.0.1 only).
    #[arg(long, env = "MESHBRIDGE_SIDECAR_ADMIN_PORT", default_value_t = 15000)]
    pub sidecar_admin_port: u16,
    /// Port of injected sidecars' readiness listener (`GET /ready` only).
    #[arg(long, env = "MESHBRIDGE_SIDECAR_READY_PORT", default_value_t = 15021)]
    pub sidecar_ready_port: u16,
    /// Port of injected sidecars' diagnostics listener (e.g. 15002), through which this
    /// control plane reads their config dump, stats and clusters and changes their log level
    /// (the rest of Envoy's admin interface stays on 127.0.0.1); 0: none. Needs
    /// --sidecar-diagnostics-allow.
    #[arg(long, env = "MESHBRIDGE_SIDECAR_DIAGNOSTICS_PORT", default_value_t = 0)]
    pub sidecar_diagnostics_port: u16,
    /// Address range (CIDR) allowed to use the sidecars' diagnostics listener: where the
    /// control plane's pods (and a metrics scraper) run; repeatable.
    #[arg(
        long = "sidecar-diagnostics-allow",
        env = "MESHBRIDGE_SIDECAR_DIAGNOSTICS_ALLOW",
        value_delimiter = ','
    )]
    pub sidecar_diagnostics_allow: Vec<String>,
    /// Inject the sidecar as a regular container rather than a native sidecar init container
    /// (chosen by itself on clusters before Kubernetes 1.29, from the API server's version).
    #[arg(long, env = "MESHBRIDGE_NO_NATIVE_SIDECAR")]
    pub no_native_sidecar: bool,
    /// Secret holding injected sidecars' certificates (`tls.crt`, `tls.key`, `ca.crt`);
    /// `{service}` stands for the pod's service. A pod may name its own by annotation
    /// `meshbridge.io/tls-secret`. Without either, sidecars get no certificate.
    #[arg(long, env = "MESHBRIDGE_SIDECAR_TLS_SECRET")]
    pub sidecar_tls_secret: Option<String>,
    /// Injected sidecars with a certificate reach the control plane over mutual TLS with it
    /// (the xDS port then needs `--xds-tls-cert`; `--xds-client-auth` checks them).
    #[arg(long, env = "MESHBRIDGE_SIDECAR_XDS_TLS")]
    pub sidecar_xds_tls: bool,
    /// Seconds injected sidecars drain for when their pod stops (a preStop hook failing
    /// readiness, letting in-flight requests finish, then closing the inbound listeners),
    /// 0–300; 0: no drain. A pod may override it by annotation `meshbridge.io/drain-seconds`.
    #[arg(
        long,
        env = "MESHBRIDGE_SIDECAR_DRAIN_SECONDS",
        default_value_t = crate::bootstrap::DEFAULT_DRAIN_SECONDS,
        value_parser = clap::value_parser!(u32).range(0..=i64::from(crate::bootstrap::MAX_DRAIN_SECONDS))
    )]
    pub sidecar_drain_seconds: u32,
    /// Consul's DNS domain: every service also answers to `NAME.service.DOMAIN` and
    /// `NAME.service.DC.DOMAIN` (the names Consul DNS users have in their configs); empty:
    /// off.
    #[arg(long, env = "MESHBRIDGE_CONSUL_DOMAIN", default_value = "consul")]
    pub consul_domain: String,
    /// The Kubernetes cluster domain: a service declared in namespace NS also answers to
    /// `NAME.NS`, `NAME.NS.svc` and `NAME.NS.svc.DOMAIN`; empty: off.
    #[arg(
        long,
        env = "MESHBRIDGE_CLUSTER_DOMAIN",
        default_value = "cluster.local"
    )]
    pub cluster_domain: String,
    /// SPIFFE trust domain of service identities.
    #[arg(long, env = "MESHBRIDGE_TRUST_DOMAIN", default_value = "mesh.local")]
    pub trust_domain: String,
    /// A service that no AccessRule targets refuses every call (default: it accepts every
    /// call until an AccessRule names its callers).
    #[arg(long, env = "MESHBRIDGE_DEFAULT_DENY")]
    pub default_deny: bool,
    /// Identify callers without a certificate by their source IP, matched against the
    /// addresses of known instances (legacy hosts without certificates). Weaker than mTLS:
    /// every process that can send from that address is taken for that service.
    #[arg(long, env = "MESHBRIDGE_SOURCE_IP_IDENTITY")]
    pub source_ip_identity: bool,
    /// Services (globs allowed, repeatable) whose proxies, proven by their certificate, may
    /// assert the caller in the `x-client-name` header, e.g. an edge gateway that authenticates
    /// its callers itself; from anyone else that header is removed.
    #[arg(
        long = "identity-header-from",
        env = "MESHBRIDGE_IDENTITY_HEADER_FROM",
        value_delimiter = ','
    )]
    pub identity_header_from: Vec<String>,
    /// Changes arriving within this many milliseconds of the first one of a batch are pushed
    /// together, at most this long after that first change.
    #[arg(long, env = "MESHBRIDGE_DEBOUNCE", default_value_t = 100)]
    pub debounce: u64,
    /// CA bundle on the proxies' hosts that verifies external https:// dependencies
    /// (RHEL-based hosts: /etc/pki/tls/certs/ca-bundle.crt).
    #[arg(long, env = "MESHBRIDGE_EXTERNAL_CA_FILE", default_value = crate::model::DEFAULT_EXTERNAL_CA_FILE)]
    pub external_ca_file: String,
    /// Services whose proxies may depend on "*" (every service); globs allowed, repeatable.
    /// A "*" dependency of any other service is ignored and reported in /api/snapshot.
    #[arg(
        long = "allow-wildcard",
        env = "MESHBRIDGE_ALLOW_WILDCARD",
        value_delimiter = ','
    )]
    pub allow_wildcard: Vec<String>,
    /// Admin URL of another meshbridge instance to compare with (`/api/compare`), e.g.
    /// `http://10.0.0.5:9090`; repeatable.
    #[arg(long = "peer", env = "MESHBRIDGE_PEERS", value_delimiter = ',')]
    pub peers: Vec<String>,
    /// HOST:PORT whose DNS name lists every meshbridge instance's admin address (a headless
    /// Service); every address but this instance's own is a peer.
    #[arg(long, env = "MESHBRIDGE_PEERS_DNS")]
    pub peers_dns: Option<String>,
    /// Seconds between background comparisons with the peers (`meshbridge_peer_agree`);
    /// 0 compares only when asked.
    #[arg(long, env = "MESHBRIDGE_PEER_CHECK_INTERVAL", default_value_t = 60)]
    pub peer_check_interval: u64,
    /// Time limit for one request to an Envoy's admin interface or to a peer, in ms.
    #[arg(long, env = "MESHBRIDGE_DIAGNOSTICS_TIMEOUT", default_value_t = 5000)]
    pub diagnostics_timeout: u64,
    /// The xDS server's certificate chain (PEM), re-read when it changes; with
    /// `--xds-tls-key`, xDS is served over TLS only.
    #[arg(long, env = "MESHBRIDGE_XDS_TLS_CERT", requires = "xds_tls_key")]
    pub xds_tls_cert: Option<PathBuf>,
    /// The xDS server's private key (PEM).
    #[arg(long, env = "MESHBRIDGE_XDS_TLS_KEY", requires = "xds_tls_cert")]
    pub xds_tls_key: Option<PathBuf>,
    /// CA (PEM) that signs the proxies' certificates (the data plane's host certificates).
    #[arg(long, env = "MESHBRIDGE_XDS_CLIENT_CA")]
    pub xds_client_ca: Option<PathBuf>,
    /// `strict`: a stream without a client certificate, or whose certificate's service
    /// (`spiffe://<trust domain>/service/<name>`) differs from its `service_name`, is refused;
    /// `permissive`: served and counted; `none`: not checked.
    #[arg(long, env = "MESHBRIDGE_XDS_CLIENT_AUTH", value_enum, default_value_t = crate::xds::ClientAuth::None)]
    pub xds_client_auth: crate::xds::ClientAuth,
    /// Bearer tokens the admin API accepts, one per line (`TOKEN [USER] [read]`), re-read
    /// when the file changes; without it the admin API is open to whoever reaches it.
    #[arg(long, env = "MESHBRIDGE_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// Bearer tokens not in `--admin-token-file` are checked with the Kubernetes API
    /// (TokenReview) and each call authorized with a SubjectAccessReview on its path (verb
    /// `get` to read, `create` to change); needs the Kubernetes client (`--kube auto`).
    #[arg(long, env = "MESHBRIDGE_ADMIN_KUBERNETES_AUTH")]
    pub admin_kubernetes_auth: bool,
    /// With `--admin-token-file` or `--admin-kubernetes-auth`, `/metrics` needs a token too
    /// (default: open to scrapers).
    #[arg(long, env = "MESHBRIDGE_ADMIN_METRICS_AUTH")]
    pub admin_metrics_auth: bool,
    /// xDS streams served at once, at most (beyond: RESOURCE_EXHAUSTED).
    #[arg(long, env = "MESHBRIDGE_XDS_MAX_STREAMS", default_value_t = 20_000)]
    pub xds_max_streams: usize,
    /// xDS streams one HTTP/2 connection may carry at once (Envoy opens one).
    #[arg(
        long,
        env = "MESHBRIDGE_XDS_MAX_STREAMS_PER_CONNECTION",
        default_value_t = 256
    )]
    pub xds_max_streams_per_connection: u32,
    /// Distinct proxy groups (service, ports, dependencies) served at once, at most: each
    /// has its own snapshot.
    #[arg(long, env = "MESHBRIDGE_XDS_MAX_GROUPS", default_value_t = 10_000)]
    pub xds_max_groups: usize,
    /// Resource names one stream may subscribe to, over all types, at most.
    #[arg(long, env = "MESHBRIDGE_XDS_MAX_NAMES", default_value_t = 20_000)]
    pub xds_max_names: usize,
    /// Largest xDS request accepted, in bytes.
    #[arg(long, env = "MESHBRIDGE_XDS_MAX_REQUEST_BYTES", default_value_t = 4 << 20)]
    pub xds_max_request_bytes: usize,
    /// Time a new stream has to send its first request, in ms.
    #[arg(
        long,
        env = "MESHBRIDGE_XDS_FIRST_REQUEST_TIMEOUT",
        default_value_t = 10_000
    )]
    pub xds_first_request_timeout: u64,
    /// How often proxies report the load they see (LRS), in ms: the resolution of
    /// `/api/services/NAME` `load` and of a migration's checks.
    #[arg(
        long,
        env = "MESHBRIDGE_LOAD_REPORT_INTERVAL",
        default_value_t = 10_000
    )]
    pub load_report_interval: u64,
}
