//! The sources a run was given, each started with the index handle it feeds: the config
//! directory (first scan before anything is served) and Consul (one watcher per datacenter).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use tracing::warn;

use super::ControlPlane;
use crate::config::ConsulConfig;
use crate::sources::consul::{ConsulClient, ConsulContext, watch_datacenter};
use crate::sources::files::ConfigDirSource;
use tracing::Instrument as _;

/// How many times the first scan waits [`crate::sources::files::SETTLE`] for files still
/// being written (2 s at most).
const FIRST_SCAN_SETTLES: usize = 40;

/// Scans `dir` once (so the first published state has its manifests), then watches it.
pub(super) async fn spawn_config_dir(
    cp: &ControlPlane,
    dir: &Path,
    poll: std::time::Duration,
) -> anyhow::Result<()> {
    let mut source = ConfigDirSource::new(dir.to_path_buf());
    cp.sources.register(source.name(), "config");
    let (index, sources) = (cp.index.clone(), cp.sources.clone());
    let (source, report) = tokio::task::spawn_blocking(move || {
        // Files written in the last moments are left for a later scan (they may still be
        // being written); the first state waits for them, within a bound.
        let mut r = source.scan(&index, &sources);
        for _ in 0..FIRST_SCAN_SETTLES {
            if r.deferred == 0 {
                break;
            }
            std::thread::sleep(crate::sources::files::SETTLE);
            r = source.scan(&index, &sources);
        }
        (source, r)
    })
    .await
    .context("first scan of --config-dir")?;
    // At start there is no last good state to keep: a run without a file's services would
    // take them from every proxy that connects, so a bad manifest stops the start (exit 2).
    // Later, a bad file keeps its last good state instead.
    if report.bad_files > 0 {
        let errors: Vec<String> = source.errors().iter().map(ToString::to_string).collect();
        return Err(super::BadConfig(format!(
            "--config-dir {}: {} manifest file(s) rejected:\n{}",
            dir.display(),
            report.bad_files,
            errors.join("\n")
        ))
        .into());
    }
    cp.metrics.config_errors.set(report.bad_files as i64);
    let metrics = cp.metrics.clone();
    let span = tracing::info_span!("source", kind = "config", dir = %dir.display());
    cp.tasks.spawn(
        super::supervise::task::CONFIG_DIRECTORY,
        source
            .run(poll, cp.index.clone(), cp.sources.clone(), move |report| {
                metrics.config_errors.set(report.bad_files as i64);
            })
            .instrument(span),
    );
    Ok(())
}

/// Watches every configured datacenter (or the agent's own, once learnt). `own_node` is the
/// node Kubernetes instances are registered on, whose instances are not read back.
pub(super) fn spawn_consul(
    cp: &ControlPlane,
    config: &ConsulConfig,
    client: ConsulClient,
    own_node: Option<String>,
) {
    let settings = config.settings.clone();
    let ctx = ConsulContext {
        index: cp.index.clone(),
        statuses: cp.sources.clone(),
        metrics: cp.metrics.clone(),
        health: settings.health,
        flap_hold: config.flap_hold,
        own_node,
        confirm_removal: config.confirm_removal,
    };
    // Registered before any request, so /readyz waits for every datacenter.
    let pending = "consul:(agent datacenter)";
    if settings.datacenters.is_empty() {
        cp.sources.register(pending, "consul");
    }
    for dc in &settings.datacenters {
        cp.sources
            .register(&crate::sources::consul::source_name(dc), "consul");
    }
    let (sources, tasks): (Arc<_>, Arc<_>) = (cp.sources.clone(), cp.tasks.clone());
    // Ends once the datacenters are known and their watches started (not supervised).
    tokio::spawn(async move {
        let mut datacenters = settings.datacenters.clone();
        let mut failures = 0;
        while datacenters.is_empty() {
            match client.agent_datacenter().await {
                Ok(dc) => {
                    sources.register(&crate::sources::consul::source_name(&dc), "consul");
                    sources.remove(pending);
                    datacenters.push(dc);
                }
                Err(e) => {
                    failures += 1;
                    warn!(error = %e, "cannot learn the Consul agent's datacenter; retrying");
                    sources.update(pending, |s| s.error = Some(e.to_string()));
                    tokio::time::sleep(crate::sources::consul::backoff(failures)).await;
                }
            }
        }
        for dc in datacenters {
            let span = tracing::info_span!("source", kind = "consul", dc = %dc);
            tasks.spawn(
                super::supervise::task::CONSUL_DATACENTER,
                watch_datacenter(client.clone(), dc, ctx.clone()).instrument(span),
            );
        }
    });
}
