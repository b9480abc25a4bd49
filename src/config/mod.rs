//! The configuration of `meshbridge run`, read once: the flags ([`RunArgs`], `args.rs`) and
//! the process environment ([`Environment`], the only place `std::env` is read for a run)
//! are checked by [`RunArgs::validate`] (`validate.rs`, one rule per flag, each refusal
//! naming its flag) into a typed [`RunConfig`]: durations as [`Duration`], addresses as
//! [`SocketAddr`], namespaces and identity resolved, and each part's settings in the type
//! that part takes. The rest of the program sees only `RunConfig`.

mod args;
mod validate;

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use args::{KubeMode, RunArgs};
pub use validate::parse_listen_addr;

use crate::admin::compare::PeerSettings;
use crate::consul_sync::SyncSettings;
use crate::model::MeshSettings;
use crate::sources::consul::ConsulSettings;
use crate::status::lease::LeaseSettings;
use crate::webhook::InjectSettings;
use crate::webhook::certs::SelfManaged;
use crate::xds::{ClientAuth, XdsLimits};

/// What a run reads from its environment besides the `MESHBRIDGE_*` flags: where it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Environment {
    /// `POD_NAMESPACE` (the chart sets it from the downward API).
    pub pod_namespace: Option<String>,
    /// `POD_NAME`.
    pub pod_name: Option<String>,
    /// `HOSTNAME`, else `/etc/hostname`.
    pub hostname: Option<String>,
    /// Whether `KUBERNETES_SERVICE_HOST` is set (running in a pod).
    pub in_cluster: bool,
    /// `KUBECONFIG`, when set and not empty.
    pub kubeconfig: Option<OsString>,
}

impl Environment {
    /// Reads the process environment.
    #[allow(clippy::disallowed_methods)] // The one place a run reads its environment.
    pub fn read() -> Self {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Environment {
            pod_namespace: var("POD_NAMESPACE"),
            pod_name: var("POD_NAME"),
            hostname: var("HOSTNAME")
                .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty()),
            in_cluster: std::env::var_os("KUBERNETES_SERVICE_HOST").is_some(),
            kubeconfig: std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()),
        }
    }

    /// The host name, `unknown` when there is none.
    pub fn hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or("unknown")
    }
}

/// Validated run configuration.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// Translation settings.
    pub settings: MeshSettings,
    /// This replica's identity in the Lease, in Events and among peers: `--identity`, else
    /// `POD_NAME` (else the host name) and the process id.
    pub identity: String,
    /// The host name, in the xDS `control_plane` identifier.
    pub hostname: String,
    /// meshbridge's own namespace (`POD_NAMESPACE`, else `meshbridge`, the chart's
    /// namespace): where the self-managed webhook Secret lives and the default sidecar xDS
    /// address points.
    pub namespace: String,
    /// Where the Kubernetes source gets its client.
    pub kube: KubeSource,
    /// Namespaces the Kubernetes source watches (empty: all).
    pub namespaces: Vec<String>,
    /// The leader-election Lease.
    pub lease: LeaseSettings,
    /// The config directory and how often it is rescanned.
    pub config_dir: Option<(PathBuf, Duration)>,
    /// The Consul source, with `--consul-addr`.
    pub consul: Option<ConsulConfig>,
    /// MeshService namespaces that may claim a Consul service name.
    pub consul_owners: Vec<String>,
    /// Registration of Kubernetes instances into Consul.
    pub consul_sync: SyncSettings,
    /// Debounce window of published changes.
    pub debounce: Duration,
    /// How long existing xDS streams are served after SIGTERM.
    pub drain: Duration,
    /// The listen addresses.
    pub listen: Listen,
    /// The xDS server.
    pub xds: XdsConfig,
    /// The admin API.
    pub admin: AdminConfig,
    /// The admission webhook.
    pub webhook: WebhookConfig,
}

/// Where the Kubernetes client comes from (`--kube`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KubeSource {
    /// No Kubernetes source (`--kube off`, or neither in a pod nor `KUBECONFIG` set).
    Off,
    /// The pod's ServiceAccount.
    InCluster,
    /// The kubeconfig file `KUBECONFIG` names.
    Kubeconfig(OsString),
}

/// The Consul source.
#[derive(Clone, Debug)]
pub struct ConsulConfig {
    /// The agent and how it is asked.
    pub settings: ConsulSettings,
    /// How long an instance whose checks failed stays out after they pass again.
    pub flap_hold: Duration,
    /// How long an answer removing most of a datacenter must hold before it applies.
    pub confirm_removal: Duration,
}

/// The listen addresses.
#[derive(Clone, Copy, Debug)]
pub struct Listen {
    /// ADS.
    pub xds: SocketAddr,
    /// The admin API.
    pub admin: SocketAddr,
    /// A second admin listener (`--admin-local-addr`).
    pub admin_local: Option<SocketAddr>,
    /// The admission webhooks.
    pub webhook: SocketAddr,
}

/// The xDS server.
#[derive(Clone, Debug)]
pub struct XdsConfig {
    /// Certificate, key and (optionally) client CA files, with `--xds-tls-cert`.
    pub tls: Option<XdsTlsFiles>,
    /// What a client's certificate must prove.
    pub client_auth: ClientAuth,
    /// Bounds on what clients can make the server hold.
    pub limits: XdsLimits,
    /// HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// How often proxies report their load.
    pub load_report_interval: std::time::Duration,
}

/// The xDS port's certificate files.
#[derive(Clone, Debug)]
pub struct XdsTlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA signing the proxies' certificates.
    pub client_ca: Option<PathBuf>,
}

/// The admin API.
#[derive(Clone, Debug)]
pub struct AdminConfig {
    /// `--admin-token-file`.
    pub token_file: Option<PathBuf>,
    /// Check other tokens with TokenReview / SubjectAccessReview.
    pub kubernetes_auth: bool,
    /// `/metrics` needs a token too.
    pub metrics_auth: bool,
    /// Limit of one request to an Envoy's admin interface or to a peer.
    pub diagnostics_timeout: Duration,
    /// The instances to compare with.
    pub peers: PeerSettings,
    /// Period of background comparisons; `None`: only when asked.
    pub peer_check_interval: Option<Duration>,
}

/// The admission webhook.
#[derive(Clone, Debug)]
pub struct WebhookConfig {
    /// Where its certificate comes from; `None`: the webhook is off.
    pub certificate: Option<WebhookCertificate>,
    /// What injected sidecars look like. `native_sidecar` is what the flags allow; the API
    /// server's version may still rule it out.
    pub inject: InjectSettings,
    /// Refuse a pod the injector cannot handle.
    pub fail_closed: bool,
}

/// Who provides the webhook's serving certificate.
#[derive(Clone, Debug)]
pub enum WebhookCertificate {
    /// `tls.crt` and `tls.key` in a directory (`--webhook-cert-dir`).
    Dir(PathBuf),
    /// meshbridge itself, kept in a Secret (`--webhook-self-managed`).
    SelfManaged(SelfManaged),
}

/// A flag value that cannot work; the message names the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--{flag}: {message}")]
pub struct ConfigError {
    /// The flag, without dashes.
    pub flag: &'static str,
    /// What is wrong.
    pub message: String,
}
