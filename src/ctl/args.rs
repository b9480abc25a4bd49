//! The command line of `meshbridge ctl`: its global options (where the admin API is, the
//! output format, the token file) and one subcommand per view, as clap parses them.

use clap::{Args, Subcommand, ValueEnum};
use reqwest::Url;

/// Where `ctl` finds the admin API unless `--admin` or `MESHBRIDGE_ADMIN` says otherwise.
pub const DEFAULT_ADMIN: &str = "http://127.0.0.1:9090";

/// Envoy log levels the admin API accepts.
pub const LOG_LEVELS: [&str; 7] = [
    "trace", "debug", "info", "warning", "error", "critical", "off",
];

/// `meshbridge ctl`.
#[derive(Args, Debug, Clone)]
pub struct CtlArgs {
    /// Admin API of a running `meshbridge run` (its --admin-addr); `host:port` means http.
    #[arg(
        long,
        env = "MESHBRIDGE_ADMIN",
        default_value = DEFAULT_ADMIN,
        value_parser = parse_admin,
        global = true
    )]
    pub admin: Url,
    /// Output format: aligned tables for people, or the API's JSON (pretty-printed).
    #[arg(short = 'o', long, value_enum, default_value_t = Output::Table, global = true)]
    pub output: Output,
    /// File whose first word is a bearer token of the admin API (`run --admin-token-file`).
    #[arg(long, env = "MESHBRIDGE_TOKEN_FILE", global = true)]
    pub token_file: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

/// Output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned human-readable tables.
    Table,
    /// The API's JSON, pretty-printed, content unchanged.
    Json,
}

/// What to show.
#[derive(Subcommand, Debug, Clone, PartialEq, Eq)]
pub enum CtlCommand {
    /// Services of the model; with NAME, that service's instances, dependents and access rule.
    Services {
        /// One service.
        name: Option<String>,
    },
    /// Connected proxies: mode, connection age, versions sent and ACKed per type.
    Proxies,
    /// One proxy: status, versions, last NACK, resource names, warnings.
    Proxy {
        /// Its node id.
        node: String,
    },
    /// The proxy's Envoy /config_dump, as Envoy answers it.
    ConfigDump {
        /// Node id of the proxy.
        node: String,
        /// Only this resource type, e.g. dynamic_active_clusters.
        #[arg(long)]
        resource: Option<String>,
        /// Include endpoints (EDS).
        #[arg(long)]
        include_eds: bool,
    },
    /// The proxy's Envoy /stats, as Envoy answers them.
    Stats {
        /// Node id of the proxy.
        node: String,
        /// Only stats whose name matches this regular expression.
        #[arg(long)]
        filter: Option<String>,
    },
    /// Set the log level of the proxy's Envoy (all loggers, or --logger).
    LogLevel {
        /// Node id of the proxy.
        node: String,
        /// The level.
        #[arg(value_parser = LOG_LEVELS)]
        level: String,
        /// Only this Envoy logger, e.g. `http`.
        #[arg(long)]
        logger: Option<String>,
    },
    /// This instance's state digest against its peers', and where they differ.
    Compare,
    /// Sources (config directory, Consul, Kubernetes): synced, staleness, errors.
    Sources,
    /// Recent model changes and the rebuilds and pushes they caused, newest first.
    Changes,
    /// What meshbridge sent the proxy against what its Envoy holds, per type (exit 0 either
    /// way: a report, not a check).
    Diff {
        /// Node id of the proxy.
        node: String,
    },
    /// The proxy's Envoy /clusters (clusters, their hosts and host stats), as Envoy answers.
    Clusters {
        /// Node id of the proxy.
        node: String,
    },
    /// Actions taken through the admin API (log levels, migration orders), newest first.
    Audit,
    /// How long a service's instances take to answer (p50, p90, p99), live and mirrored, as
    /// its callers' Envoys measured it.
    Latency {
        /// The service.
        name: String,
    },
    /// Give an order on a service's migration plan (spec.migration.steps): `pause` holds
    /// the step, `resume` goes on (a rolled-back plan from its first step), `rollback`
    /// sends nothing to the new origin, `promote` completes the plan. Written as the
    /// MeshService's annotation meshbridge.io/migration, carried out by the leader; audited.
    Migrate {
        /// The service.
        name: String,
        /// The order.
        #[arg(value_parser = crate::admin::migrate::ORDERS)]
        order: String,
    },
}

/// Parses `--admin`: an http(s) URL, or `host:port` meaning `http://host:port`.
pub fn parse_admin(s: &str) -> Result<Url, String> {
    let text = s.trim();
    let with_scheme = if text.contains("://") {
        text.to_string()
    } else {
        format!("http://{text}")
    };
    let url = Url::parse(&with_scheme).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?}: only http and https are supported"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} names no host"));
    }
    Ok(url)
}

#[cfg(test)]
pub(crate) mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    pub(crate) fn parse(args: &[&str]) -> CtlArgs {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            ctl: CtlArgs,
        }
        use clap::Parser as _;
        let mut argv = vec!["ctl"];
        argv.extend_from_slice(args);
        P::try_parse_from(argv).unwrap().ctl
    }

    #[test]
    fn admin_urls() {
        assert_eq!(
            parse_admin("127.0.0.1:9090").unwrap().as_str(),
            "http://127.0.0.1:9090/"
        );
        assert_eq!(
            parse_admin("localhost:9090").unwrap().as_str(),
            "http://localhost:9090/"
        );
        assert!(parse_admin("ftp://x").is_err());
        assert!(parse_admin("http://").is_err());
        let a = parse(&["proxies"]);
        assert_eq!(a.admin.as_str(), "http://127.0.0.1:9090/");
        assert_eq!(a.output, Output::Table);
    }

    #[test]
    fn bad_usage_is_refused_by_clap() {
        #[derive(clap::Parser, Debug)]
        struct P {
            #[command(flatten)]
            ctl: CtlArgs,
        }
        use clap::Parser as _;
        assert!(P::try_parse_from(["ctl", "log-level", "n", "loud"]).is_err());
        assert!(P::try_parse_from(["ctl", "-o", "yaml", "proxies"]).is_err());
        assert!(P::try_parse_from(["ctl", "--admin", "ftp://x", "proxies"]).is_err());
        assert!(P::try_parse_from(["ctl", "proxy"]).is_err());
        assert!(P::try_parse_from(["ctl", "diff"]).is_err());
        assert!(P::try_parse_from(["ctl", "clusters"]).is_err());
        assert!(P::try_parse_from(["ctl", "audit", "n"]).is_err());
        assert!(P::try_parse_from(["ctl", "migrate", "billing", "faster"]).is_err());
        assert!(P::try_parse_from(["ctl", "migrate", "billing"]).is_err());
    }
}
