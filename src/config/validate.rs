//! The rules of `meshbridge run`'s flags, in six groups checked in a fixed order (the first
//! rule broken is the one reported), and the typed [`RunConfig`] built from flags that pass.

use std::net::SocketAddr;
use std::time::Duration;

use super::{
    AdminConfig, ConfigError, ConsulConfig, Environment, KubeMode, KubeSource, Listen, RunArgs,
    RunConfig, WebhookCertificate, WebhookConfig, XdsConfig, XdsTlsFiles,
};
use crate::model::MeshSettings;
use crate::sources::consul::HealthPolicy;

impl RunArgs {
    /// Validates the flags and resolves what depends on `env` (namespaces, identity, the
    /// Kubernetes client's origin).
    pub fn validate(self, env: &Environment) -> Result<RunConfig, ConfigError> {
        self.check_sources()?;
        self.check_kubernetes()?;
        self.check_timing()?;
        self.check_globs()?;
        self.check_admin()?;
        self.check_xds()?;
        Ok(self.into_config(env))
    }

    /// The typed configuration of flags that passed every rule.
    fn into_config(self, env: &Environment) -> RunConfig {
        let namespace = env
            .pod_namespace
            .clone()
            .unwrap_or_else(|| "meshbridge".into());
        let identity = self.identity.clone().unwrap_or_else(|| {
            let name = env.pod_name.as_deref().unwrap_or(env.hostname());
            format!("{name}_{}", std::process::id())
        });
        let ms = Duration::from_millis;
        RunConfig {
            settings: MeshSettings {
                allow_wildcard: self.allow_wildcard.clone(),
                datacenters: self.consul_datacenters.clone(),
                trust_domain: self.trust_domain.clone(),
                external_ca_file: Some(self.external_ca_file.clone()),
                default_deny: self.default_deny,
                source_ip_identity: self.source_ip_identity,
                identity_header_from: self.identity_header_from.clone(),
                consul_domain: dns_domain(&self.consul_domain),
                cluster_domain: dns_domain(&self.cluster_domain),
            },
            kube: match (self.kube, env.in_cluster, &env.kubeconfig) {
                (KubeMode::Off, _, _) | (KubeMode::Auto, false, None) => KubeSource::Off,
                (KubeMode::Auto, true, _) => KubeSource::InCluster,
                (KubeMode::Auto, false, Some(file)) => KubeSource::Kubeconfig(file.clone()),
            },
            namespaces: self.namespaces.clone(),
            lease: crate::status::lease::LeaseSettings {
                // Out of a pod, `default` rather than `meshbridge`: where a Lease of an
                // operator run from a workstation has always been (the tests pin it).
                namespace: self
                    .leader_election_namespace
                    .clone()
                    .or_else(|| env.pod_namespace.clone())
                    .unwrap_or_else(|| "default".into()),
                name: self.leader_election_name.clone(),
                identity: identity.clone(),
                duration: Duration::from_secs(self.lease_duration),
            },
            config_dir: self.config_dir.clone().map(|d| (d, ms(self.config_poll))),
            consul: self.consul_config(),
            consul_owners: self.consul_services_owned_by.clone(),
            consul_sync: crate::consul_sync::SyncSettings {
                node: self.consul_sync_node.clone(),
                resync: Duration::from_secs(self.consul_sync_resync),
            },
            debounce: ms(self.debounce),
            drain: ms(self.drain),
            listen: Listen {
                xds: self.xds_addr,
                admin: self.admin_addr,
                admin_local: self.admin_local_addr,
                webhook: self.webhook_addr,
            },
            xds: self.xds_config(),
            admin: self.admin_config(&identity),
            webhook: self.webhook_config(&namespace),
            hostname: env.hostname().to_string(),
            identity,
            namespace,
        }
    }

    fn consul_config(&self) -> Option<ConsulConfig> {
        let addr = self.consul_addr.clone()?;
        Some(ConsulConfig {
            settings: crate::sources::consul::ConsulSettings {
                addr,
                datacenters: self.consul_datacenters.clone(),
                token_file: self.consul_token_file.clone(),
                ca_file: self.consul_ca_file.clone(),
                health: if self.consul_include_warning {
                    HealthPolicy::PassingAndWarning
                } else {
                    HealthPolicy::PassingOnly
                },
                wait: Duration::from_millis(self.consul_wait),
                max_connections: self.consul_max_connections,
            },
            flap_hold: Duration::from_millis(self.consul_flap_hold),
            confirm_removal: Duration::from_millis(self.consul_confirm_removal),
        })
    }

    fn xds_config(&self) -> XdsConfig {
        let tls = match (&self.xds_tls_cert, &self.xds_tls_key) {
            (Some(cert), Some(key)) => Some(XdsTlsFiles {
                cert: cert.clone(),
                key: key.clone(),
                client_ca: self.xds_client_ca.clone(),
            }),
            _ => None,
        };
        XdsConfig {
            tls,
            client_auth: self.xds_client_auth,
            limits: crate::xds::XdsLimits {
                max_streams: self.xds_max_streams,
                max_groups: self.xds_max_groups,
                max_names: self.xds_max_names,
                max_request_bytes: self.xds_max_request_bytes,
                first_request_timeout: Duration::from_millis(self.xds_first_request_timeout),
            },
            load_report_interval: Duration::from_millis(self.load_report_interval),
            max_streams_per_connection: self.xds_max_streams_per_connection,
        }
    }

    fn admin_config(&self, identity: &str) -> AdminConfig {
        AdminConfig {
            token_file: self.admin_token_file.clone(),
            kubernetes_auth: self.admin_kubernetes_auth,
            metrics_auth: self.admin_metrics_auth,
            diagnostics_timeout: Duration::from_millis(self.diagnostics_timeout),
            peers: crate::admin::compare::PeerSettings {
                urls: self.peers.clone(),
                dns: self.peers_dns.clone(),
                instance: identity.to_string(),
            },
            peer_check_interval: (self.peer_check_interval > 0)
                .then(|| Duration::from_secs(self.peer_check_interval)),
        }
    }

    fn webhook_config(&self, namespace: &str) -> WebhookConfig {
        use crate::webhook::certs::SelfManaged;
        let certificate = match (&self.webhook_cert_dir, self.webhook_self_managed) {
            (Some(dir), _) => Some(WebhookCertificate::Dir(dir.clone())),
            (None, true) => Some(WebhookCertificate::SelfManaged(SelfManaged {
                namespace: namespace.to_string(),
                secret: self.webhook_secret.clone(),
                dns_names: SelfManaged::service_names(&self.webhook_service, namespace),
                mutating: self.webhook_mutating_configuration.clone(),
                validating: self.webhook_validating_configuration.clone(),
            })),
            (None, false) => None,
        };
        let inject = crate::webhook::InjectSettings {
            image: self.sidecar_image.clone(),
            init_image: self.sidecar_init_image.clone(),
            xds_addr: self
                .sidecar_xds_addr
                .clone()
                .unwrap_or_else(|| format!("meshbridge-xds.{namespace}.svc:18000")),
            log_level: self.sidecar_log_level.clone(),
            native_sidecar: !self.no_native_sidecar,
            cpu: self.sidecar_cpu.clone(),
            memory: self.sidecar_memory.clone(),
            memory_limit: self.sidecar_memory_limit.clone(),
            ingress_port: self.sidecar_ingress_port,
            egress_port: self.sidecar_egress_port,
            admin_port: self.sidecar_admin_port,
            ready_port: self.sidecar_ready_port,
            diagnostics_port: (self.sidecar_diagnostics_port != 0)
                .then_some(self.sidecar_diagnostics_port),
            diagnostics_allow: self.sidecar_diagnostics_allow.clone(),
            tls_secret: self.sidecar_tls_secret.clone(),
            xds_tls: self.sidecar_xds_tls,
            drain_seconds: self.sidecar_drain_seconds,
        };
        WebhookConfig {
            certificate,
            inject,
            fail_closed: self.inject_fail_closed,
        }
    }

    /// The sources: the config directory, the Consul agent and its limits.
    fn check_sources(&self) -> Result<(), ConfigError> {
        if let Some(dir) = &self.config_dir
            && !dir.is_dir()
        {
            return Err(ConfigError {
                flag: "config-dir",
                message: format!("{} is not a directory", dir.display()),
            });
        }
        if let Some(addr) = &self.consul_addr
            && !(addr.starts_with("http://") || addr.starts_with("https://"))
        {
            return Err(ConfigError {
                flag: "consul-addr",
                message: format!("{addr:?} must be an http:// or https:// URL"),
            });
        }
        if let Some(ca) = &self.consul_ca_file
            && !ca.is_file()
        {
            return Err(ConfigError {
                flag: "consul-ca-file",
                message: format!("{} is not a file", ca.display()),
            });
        }
        if !(1..=190).contains(&self.consul_max_connections) {
            return Err(ConfigError {
                flag: "consul-max-connections",
                message: format!(
                    "{} is outside 1..=190 (Consul refuses more than 200 per client)",
                    self.consul_max_connections
                ),
            });
        }
        if self.consul_flap_hold > 600_000 {
            return Err(ConfigError {
                flag: "consul-flap-hold",
                message: format!("{} ms is more than 10 minutes", self.consul_flap_hold),
            });
        }
        if !(100..=600_000).contains(&self.consul_wait) {
            return Err(ConfigError {
                flag: "consul-wait",
                message: format!(
                    "{} ms is outside 100..=600000 (Consul caps waits at 10 minutes)",
                    self.consul_wait
                ),
            });
        }
        Ok(())
    }

    /// The Kubernetes side: the webhook certificate, the Lease, the Consul registration.
    fn check_kubernetes(&self) -> Result<(), ConfigError> {
        if self.webhook_self_managed && self.webhook_cert_dir.is_some() {
            return Err(ConfigError {
                flag: "webhook-self-managed",
                message:
                    "and --webhook-cert-dir are exclusive: choose who provides the certificate"
                        .into(),
            });
        }
        if let Some(dir) = &self.webhook_cert_dir {
            for file in ["tls.crt", "tls.key"] {
                if !dir.join(file).is_file() {
                    return Err(ConfigError {
                        flag: "webhook-cert-dir",
                        message: format!("{} has no {file}", dir.display()),
                    });
                }
            }
        }
        if !(1..=3600).contains(&self.lease_duration) {
            return Err(ConfigError {
                flag: "lease-duration",
                message: format!("{} s is outside 1..=3600", self.lease_duration),
            });
        }
        if self.consul_sync_resync == 0 {
            return Err(ConfigError {
                flag: "consul-sync-resync",
                message: "must be at least 1 second".to_string(),
            });
        }
        Ok(())
    }

    /// Timings: drain, debounce and the config poll.
    fn check_timing(&self) -> Result<(), ConfigError> {
        if self.drain > 600_000 {
            return Err(ConfigError {
                flag: "drain",
                message: format!("{} ms is more than 10 minutes", self.drain),
            });
        }
        if self.debounce > 60_000 {
            return Err(ConfigError {
                flag: "debounce",
                message: format!("{} ms is more than a minute", self.debounce),
            });
        }
        if !(10..=600_000).contains(&self.config_poll) {
            return Err(ConfigError {
                flag: "config-poll",
                message: format!("{} ms is outside 10..=600000", self.config_poll),
            });
        }
        Ok(())
    }

    /// Service globs (`--allow-wildcard`, `--identity-header-from`) and DNS domains
    /// (`--consul-domain`, `--cluster-domain`).
    fn check_globs(&self) -> Result<(), ConfigError> {
        for (flag, globs) in [
            ("allow-wildcard", &self.allow_wildcard),
            ("identity-header-from", &self.identity_header_from),
        ] {
            for g in globs {
                if g.is_empty() || !crate::model::valid_service_name(&g.replace('*', "x")) {
                    return Err(ConfigError {
                        flag,
                        message: format!("{g:?} is not a service name or glob"),
                    });
                }
            }
        }
        for (flag, text) in [
            ("consul-domain", &self.consul_domain),
            ("cluster-domain", &self.cluster_domain),
        ] {
            let valid = dns_domain(text).is_none_or(|d| {
                d.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                })
            });
            if !valid {
                return Err(ConfigError {
                    flag,
                    message: format!(
                        "{text:?} is not a DNS domain (labels of letters, digits and -)"
                    ),
                });
            }
        }
        Ok(())
    }

    /// The admin API: peers and the sidecars' diagnostics.
    fn check_admin(&self) -> Result<(), ConfigError> {
        for peer in &self.peers {
            let ok = reqwest::Url::parse(peer)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !ok {
                return Err(ConfigError {
                    flag: "peer",
                    message: format!("{peer:?} is not an http:// or https:// URL"),
                });
            }
        }
        if let Some(dns) = &self.peers_dns {
            let port = dns.rsplit_once(':').and_then(|(h, p)| {
                (!h.is_empty()).then_some(())?;
                p.parse::<u16>().ok()
            });
            if port.is_none() {
                return Err(ConfigError {
                    flag: "peers-dns",
                    message: format!("{dns:?} is not HOST:PORT"),
                });
            }
        }
        for cidr in &self.sidecar_diagnostics_allow {
            if let Err(e) = crate::bootstrap::cidr_range(cidr) {
                return Err(ConfigError {
                    flag: "sidecar-diagnostics-allow",
                    message: e.to_string(),
                });
            }
        }
        if self.sidecar_diagnostics_port != 0 && self.sidecar_diagnostics_allow.is_empty() {
            return Err(ConfigError {
                flag: "sidecar-diagnostics-port",
                message: "needs --sidecar-diagnostics-allow CIDR: who may read the sidecars' configuration and change their log level".into(),
            });
        }
        if !(100..=120_000).contains(&self.diagnostics_timeout) {
            return Err(ConfigError {
                flag: "diagnostics-timeout",
                message: format!("{} ms is outside 100..=120000", self.diagnostics_timeout),
            });
        }
        Ok(())
    }

    /// The xDS server: TLS, limits, and the trust domain its identities live in.
    fn check_xds(&self) -> Result<(), ConfigError> {
        if self.xds_client_ca.is_some() && self.xds_tls_cert.is_none() {
            return Err(ConfigError {
                flag: "xds-client-ca",
                message:
                    "needs --xds-tls-cert and --xds-tls-key: client certificates travel over TLS"
                        .into(),
            });
        }
        if self.xds_client_auth != crate::xds::ClientAuth::None && self.xds_client_ca.is_none() {
            return Err(ConfigError {
                flag: "xds-client-auth",
                message: "needs --xds-client-ca (and --xds-tls-cert/--xds-tls-key): the CA that signs the proxies' certificates".into(),
            });
        }
        for (flag, value) in [
            ("xds-max-streams", self.xds_max_streams),
            (
                "xds-max-streams-per-connection",
                self.xds_max_streams_per_connection as usize,
            ),
            ("xds-max-groups", self.xds_max_groups),
            ("xds-max-names", self.xds_max_names),
        ] {
            if value == 0 {
                return Err(ConfigError {
                    flag,
                    message: "must be at least 1".into(),
                });
            }
        }
        if !(4096..=(256 << 20)).contains(&self.xds_max_request_bytes) {
            return Err(ConfigError {
                flag: "xds-max-request-bytes",
                message: format!(
                    "{} is outside 4096..={}",
                    self.xds_max_request_bytes,
                    256 << 20
                ),
            });
        }
        if !(100..=600_000).contains(&self.xds_first_request_timeout) {
            return Err(ConfigError {
                flag: "xds-first-request-timeout",
                message: format!(
                    "{} ms is outside 100..=600000",
                    self.xds_first_request_timeout
                ),
            });
        }
        if !(500..=600_000).contains(&self.load_report_interval) {
            return Err(ConfigError {
                flag: "load-report-interval",
                message: format!("{} ms is outside 500..=600000", self.load_report_interval),
            });
        }
        if self.trust_domain.is_empty() || self.trust_domain.contains(['/', ':']) {
            return Err(ConfigError {
                flag: "trust-domain",
                message: format!("{:?} is not a trust domain", self.trust_domain),
            });
        }
        Ok(())
    }
}

/// `IP:PORT`, with an IPv6 address in brackets or, as a pod IP expands to, bare
/// (`fd00::1:9090`: the port is after the last colon).
pub fn parse_listen_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let (ip, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("{text:?}: expected IP:PORT"))?;
    let ip: std::net::IpAddr = ip
        .parse()
        .map_err(|e| format!("{text:?}: {ip:?} is not an IP address ({e})"))?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("{text:?}: {port:?} is not a port ({e})"))?;
    Ok(SocketAddr::new(ip, port))
}

/// A DNS domain flag as given (lower case, without surrounding dots); empty: off.
fn dns_domain(text: &str) -> Option<String> {
    let domain = text.trim().trim_matches('.').to_ascii_lowercase();
    (!domain.is_empty()).then_some(domain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser)]
    struct Run {
        #[command(flatten)]
        args: RunArgs,
    }

    /// `meshbridge run` with `flags`, validated in an empty environment; the process
    /// environment is not read for flags the test gives.
    fn run(flags: &[&str]) -> Result<RunConfig, ConfigError> {
        run_in(flags, &Environment::default())
    }

    /// `meshbridge run` with `flags` in the environment `env`.
    fn run_in(flags: &[&str], env: &Environment) -> Result<RunConfig, ConfigError> {
        use clap::Parser as _;
        let argv = std::iter::once("run").chain(flags.iter().copied());
        Run::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{flags:?}: {e}"))
            .args
            .validate(env)
    }

    #[test]
    fn dns_domains_default_on_can_be_turned_off_and_must_be_domains() {
        let c = run(&[]).unwrap();
        assert_eq!(c.settings.consul_domain.as_deref(), Some("consul"));
        assert_eq!(c.settings.cluster_domain.as_deref(), Some("cluster.local"));
        let c = run(&["--consul-domain", ".Example.COM.", "--cluster-domain", ""]).unwrap();
        assert_eq!(c.settings.consul_domain.as_deref(), Some("example.com"));
        assert_eq!(c.settings.cluster_domain, None);
        for (flag, bad) in [("--consul-domain", "a b"), ("--cluster-domain", "x..y")] {
            let e = run(&[flag, bad]).unwrap_err();
            assert_eq!(format!("--{}", e.flag), flag);
            assert!(e.message.contains("not a DNS domain"), "{}", e.message);
        }
    }

    #[test]
    fn the_environment_decides_namespaces_identity_and_the_kubernetes_client() {
        // Out of a pod: the webhook's namespace is the chart's, the Lease's `default`, the
        // identity the host's, and no Kubernetes client without KUBECONFIG.
        let bare = Environment {
            hostname: Some("laptop".into()),
            ..Environment::default()
        };
        let c = run_in(&[], &bare).unwrap();
        assert_eq!(c.namespace, "meshbridge");
        assert_eq!(c.lease.namespace, "default");
        assert!(c.identity.starts_with("laptop_"), "{}", c.identity);
        assert_eq!(c.kube, KubeSource::Off);
        let inject = &c.webhook.inject;
        assert_eq!(inject.xds_addr, "meshbridge-xds.meshbridge.svc:18000");

        // In a pod: both namespaces are the pod's, the identity its name; in-cluster client.
        let pod = Environment {
            pod_namespace: Some("mesh-system".into()),
            pod_name: Some("meshbridge-0".into()),
            hostname: Some("meshbridge-0".into()),
            in_cluster: true,
            kubeconfig: Some("/ignored".into()),
        };
        let c = run_in(&["--webhook-self-managed"], &pod).unwrap();
        assert_eq!(c.namespace, "mesh-system");
        assert_eq!(c.lease.namespace, "mesh-system");
        assert!(c.identity.starts_with("meshbridge-0_"), "{}", c.identity);
        assert_eq!(c.kube, KubeSource::InCluster);
        assert_eq!(
            c.webhook.inject.xds_addr,
            "meshbridge-xds.mesh-system.svc:18000"
        );
        match &c.webhook.certificate {
            Some(WebhookCertificate::SelfManaged(s)) => {
                assert_eq!(s.namespace, "mesh-system");
                assert_eq!(s.dns_names[0], "meshbridge-webhook.mesh-system.svc");
            }
            other => panic!("{other:?}"),
        }

        // Flags win over the environment; `--kube off` ignores it.
        let c = run_in(
            &[
                "--leader-election-namespace",
                "leases",
                "--identity",
                "me",
                "--kube",
                "off",
            ],
            &pod,
        )
        .unwrap();
        assert_eq!(c.lease.namespace, "leases");
        assert_eq!(
            (c.identity.as_str(), c.lease.identity.as_str()),
            ("me", "me")
        );
        assert_eq!(c.kube, KubeSource::Off);

        // A workstation with KUBECONFIG.
        let laptop = Environment {
            kubeconfig: Some("/home/me/.kube/config".into()),
            ..bare
        };
        assert_eq!(
            run_in(&[], &laptop).unwrap().kube,
            KubeSource::Kubeconfig("/home/me/.kube/config".into())
        );
    }

    #[test]
    fn every_rule_names_the_flag_it_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, "x").unwrap();
        let (dir_s, file_s) = (dir.path().to_str().unwrap(), file.to_str().unwrap());
        let cases: &[(&[&str], &str)] = &[
            (&["--config-dir", file_s], "config-dir"),
            (&["--consul-addr", "consul:8500"], "consul-addr"),
            (&["--consul-ca-file", dir_s], "consul-ca-file"),
            (&["--consul-max-connections", "0"], "consul-max-connections"),
            (
                &["--consul-max-connections", "191"],
                "consul-max-connections",
            ),
            (&["--consul-flap-hold", "600001"], "consul-flap-hold"),
            (&["--consul-wait", "99"], "consul-wait"),
            (
                &["--webhook-self-managed", "--webhook-cert-dir", dir_s],
                "webhook-self-managed",
            ),
            (&["--webhook-cert-dir", dir_s], "webhook-cert-dir"),
            (&["--lease-duration", "0"], "lease-duration"),
            (&["--consul-sync-resync", "0"], "consul-sync-resync"),
            (&["--drain", "600001"], "drain"),
            (&["--debounce", "60001"], "debounce"),
            (&["--config-poll", "9"], "config-poll"),
            (&["--allow-wildcard", "Not A Name"], "allow-wildcard"),
            (&["--identity-header-from", ""], "identity-header-from"),
            (&["--peer", "ftp://peer"], "peer"),
            (&["--peers-dns", "peers.svc"], "peers-dns"),
            (
                &["--sidecar-diagnostics-allow", "nonsense"],
                "sidecar-diagnostics-allow",
            ),
            (
                &["--sidecar-diagnostics-port", "15002"],
                "sidecar-diagnostics-port",
            ),
            (&["--diagnostics-timeout", "99"], "diagnostics-timeout"),
            (&["--xds-client-ca", file_s], "xds-client-ca"),
            (&["--xds-client-auth", "strict"], "xds-client-auth"),
            (&["--xds-max-streams", "0"], "xds-max-streams"),
            (
                &["--xds-max-streams-per-connection", "0"],
                "xds-max-streams-per-connection",
            ),
            (&["--xds-max-groups", "0"], "xds-max-groups"),
            (&["--xds-max-names", "0"], "xds-max-names"),
            (
                &["--xds-max-request-bytes", "4095"],
                "xds-max-request-bytes",
            ),
            (
                &["--xds-first-request-timeout", "99"],
                "xds-first-request-timeout",
            ),
            (&["--trust-domain", "spiffe://x"], "trust-domain"),
        ];
        for (flags, flag) in cases {
            match run(flags) {
                Err(e) => assert_eq!(e.flag, *flag, "{flags:?}: {}", e.message),
                Ok(_) => panic!("{flags:?} was accepted"),
            }
        }
    }

    #[test]
    fn good_flags_become_typed_settings() {
        let config = run(&[
            "--debounce",
            "250",
            "--xds-first-request-timeout",
            "2000",
            "--allow-wildcard",
            "gateway-*",
            "--trust-domain",
            "mesh.example",
        ])
        .unwrap();
        assert_eq!(config.debounce, Duration::from_millis(250));
        assert_eq!(
            config.xds.limits.first_request_timeout,
            Duration::from_secs(2)
        );
        assert_eq!(config.settings.allow_wildcard, ["gateway-*"]);
        assert_eq!(config.settings.trust_domain, "mesh.example");
        assert!(run(&[]).is_ok(), "the defaults are valid");
    }

    #[test]
    fn listen_addresses_take_pod_ips_of_either_family() {
        assert_eq!(
            parse_listen_addr("10.1.2.3:9090").unwrap(),
            "10.1.2.3:9090".parse().unwrap()
        );
        assert_eq!(
            parse_listen_addr("fd00::1:9090").unwrap(),
            "[fd00::1]:9090".parse().unwrap()
        );
        assert_eq!(
            parse_listen_addr("[fd00::1]:9090").unwrap(),
            "[fd00::1]:9090".parse().unwrap()
        );
        assert!(
            parse_listen_addr(":9090")
                .unwrap_err()
                .contains("not an IP")
        );
        assert!(
            parse_listen_addr("10.1.2.3:http")
                .unwrap_err()
                .contains("not a port")
        );
        assert!(
            parse_listen_addr("$(POD_IP)")
                .unwrap_err()
                .contains("IP:PORT")
        );
    }
}
