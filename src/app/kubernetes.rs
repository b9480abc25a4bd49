//! The Kubernetes side of a run: the watchers that feed the index and the store, the
//! leader lease, the status writer (while leading), the webhook's self-managed certificate
//! and the registration of Kubernetes instances into Consul.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::StreamExt;
use kube::Client;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::Instrument as _;
use tracing::info;

use super::ControlPlane;
use crate::config::RunConfig;
use crate::sources::consul::ConsulClient;
use crate::sources::kube::{KubeContext, KubeStore, ObjectKey};
use crate::status::reconcile::StatusContext;
use crate::webhook::server::ReloadingCert;

/// What the Kubernetes parts share with the rest of a run.
pub(super) struct Kubernetes {
    /// What the watchers have seen (the webhook reads pods' services from it).
    pub store: Arc<Mutex<KubeStore>>,
    /// True once every watcher has listed once.
    pub synced: watch::Receiver<bool>,
    /// Moves with every store change.
    epoch: watch::Receiver<u64>,
    /// Whether this replica leads.
    leader: watch::Receiver<bool>,
    /// Consul registration problems by MeshService, shown in its status.
    registration_errors: Option<watch::Sender<BTreeMap<ObjectKey, String>>>,
    /// The lease loop; it releases the Lease when `stop` turns true.
    pub lease: JoinHandle<()>,
}

impl Kubernetes {
    /// Starts the watchers, the lease and the status writer. `namespace_labels_too`: the
    /// webhook needs namespace labels.
    pub(super) fn spawn(
        client: &Client,
        cp: &ControlPlane,
        config: &RunConfig,
        namespace_labels_too: bool,
        stop: watch::Receiver<bool>,
    ) -> Self {
        let (leader_tx, leader) = watch::channel(false);
        let store = Arc::new(Mutex::new(KubeStore::new()));
        let (epoch_tx, epoch) = watch::channel(0u64);
        let (synced_tx, synced) = watch::channel(false);
        let (registration_errors, registration_errors_rx) = watch::channel(BTreeMap::new());
        cp.sources
            .register(crate::sources::kube::SOURCE, "kubernetes");
        let ctx = KubeContext {
            index: cp.index.clone(),
            statuses: cp.sources.clone(),
            store: store.clone(),
            store_epoch: epoch_tx,
            synced: synced_tx,
            metrics: cp.metrics.clone(),
        };
        cp.tasks.spawn(
            super::supervise::task::KUBERNETES_WATCHERS,
            crate::sources::kube::run(
                client.clone(),
                config.namespaces.clone(),
                namespace_labels_too,
                ctx,
            )
            .instrument(tracing::info_span!("source", kind = "kubernetes")),
        );
        let lease = config.lease.clone();
        {
            let (metrics, mut leader) = (cp.metrics.clone(), leader.clone());
            tokio::spawn(async move {
                while leader.changed().await.is_ok() {
                    metrics.leader.set(i64::from(*leader.borrow_and_update()));
                }
            });
        }
        let lease = cp.tasks.spawn(
            super::supervise::task::LEASE,
            crate::status::lease::run(client.clone(), lease, leader_tx, stop),
        );
        let status = Arc::new(StatusContext::new(
            client.clone(),
            store.clone(),
            cp.published_view.subscribe(),
            registration_errors_rx,
            cp.metrics.clone(),
            cp.load.clone(),
            &config.identity,
        ));
        cp.tasks.spawn(
            super::supervise::task::STATUS_WRITER,
            run_status(
                status,
                config.namespaces.clone(),
                epoch.clone(),
                leader.clone(),
                cp.ready.clone(),
            ),
        );
        Kubernetes {
            store,
            synced,
            epoch,
            leader,
            registration_errors: Some(registration_errors),
            lease,
        }
    }

    /// Registers Kubernetes instances into Consul on node `--consul-sync-node` while this
    /// replica leads (once).
    pub(super) fn spawn_consul_registration(
        &mut self,
        client: ConsulClient,
        settings: crate::consul_sync::SyncSettings,
        cp: &ControlPlane,
    ) {
        let Some(errors) = self.registration_errors.take() else {
            return;
        };
        let sync = crate::consul_sync::SyncContext {
            store: self.store.clone(),
            epoch: self.epoch.clone(),
            synced: self.synced.clone(),
            leader: self.leader.clone(),
            errors,
            metrics: cp.metrics.clone(),
            index: cp.index.clone(),
        };
        cp.tasks.spawn(
            super::supervise::task::CONSUL_REGISTRATION,
            crate::consul_sync::run(client, settings, sync),
        );
    }
}

/// Keeps the webhook's certificate in a Secret and its CA bundle in the webhook
/// configurations (`--webhook-self-managed`).
pub(super) fn spawn_webhook_certificate(
    client: &Client,
    self_managed: crate::webhook::certs::SelfManaged,
    cert: Arc<ReloadingCert>,
    stop: watch::Receiver<bool>,
) {
    tokio::spawn(crate::webhook::certs::run(
        client.clone(),
        self_managed,
        cert,
        stop,
    ));
}

/// Runs the status reconcilers while this replica leads (one pair per watched namespace),
/// once the control plane is ready.
async fn run_status(
    ctx: Arc<StatusContext>,
    namespaces: Vec<String>,
    epoch: watch::Receiver<u64>,
    mut leader: watch::Receiver<bool>,
    ready: Arc<AtomicBool>,
) {
    // Status describes the model: none is written before the first complete one is
    // published (no "0 instances" flash while the sources are still listing).
    while !ready.load(Ordering::Acquire) {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let scopes: Vec<Option<String>> = if namespaces.is_empty() {
        vec![None]
    } else {
        namespaces.into_iter().map(Some).collect()
    };
    loop {
        if leader.wait_for(|l| *l).await.is_err() {
            return;
        }
        info!("leading: writing MeshService and AccessRule status");
        let runs = scopes.iter().map(|scope| {
            let (epoch, published, errors) = (
                epoch.clone(),
                ctx.published.clone(),
                ctx.registration_errors.clone(),
            );
            let trigger = move || {
                use tokio_stream::wrappers::WatchStream;
                futures::stream::select_all([
                    WatchStream::from_changes(epoch.clone()).map(|_| ()).boxed(),
                    WatchStream::from_changes(published.clone())
                        .map(|_| ())
                        .boxed(),
                    WatchStream::from_changes(errors.clone())
                        .map(|_| ())
                        .boxed(),
                ])
            };
            let mut lost = leader.clone();
            let stop = async move {
                let _ = lost.wait_for(|l| !*l).await;
            };
            crate::status::reconcile::run(ctx.clone(), scope.clone(), trigger, stop)
        });
        futures::future::join_all(runs).await;
        info!("not leading: status writes stopped");
    }
}
