//! Ownership of the long-lived tasks: every source watcher, the publisher, the servers, the
//! Lease and the status writer is spawned through [`Supervisor::spawn`]. None of them ends
//! before shutdown by design, so one that ends (returns or panics) means the process no
//! longer follows its sources or serves what it should: the run logs which task and why,
//! counts it, turns `/readyz` down and exits 1, and Kubernetes restarts the pod. A live
//! process that silently stopped following its sources is the outcome this rules out.

use std::future::Future;
use std::panic::AssertUnwindSafe;

use futures::FutureExt as _;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;

/// The supervised tasks' names: the `task` label of `meshbridge_tasks_ended_total`.
pub mod task {
    /// `config directory`.
    pub const CONFIG_DIRECTORY: &str = "config directory";
    /// `consul datacenter watch`.
    pub const CONSUL_DATACENTER: &str = "consul datacenter watch";
    /// `kubernetes watchers`.
    pub const KUBERNETES_WATCHERS: &str = "kubernetes watchers";
    /// `lease`.
    pub const LEASE: &str = "lease";
    /// `status writer`.
    pub const STATUS_WRITER: &str = "status writer";
    /// `consul registration`.
    pub const CONSUL_REGISTRATION: &str = "consul registration";
    /// `publisher`.
    pub const PUBLISHER: &str = "publisher";
    /// `xds server`.
    pub const XDS_SERVER: &str = "xds server";
    /// `admin server`.
    pub const ADMIN_SERVER: &str = "admin server";
    /// `admin server (local)`.
    pub const ADMIN_SERVER_LOCAL: &str = "admin server (local)";
    /// `webhook server`.
    pub const WEBHOOK_SERVER: &str = "webhook server";
    /// Every name, for the metric's series at zero.
    pub const ALL: [&str; 11] = [
        CONFIG_DIRECTORY,
        CONSUL_DATACENTER,
        KUBERNETES_WATCHERS,
        LEASE,
        STATUS_WRITER,
        CONSUL_REGISTRATION,
        PUBLISHER,
        XDS_SERVER,
        ADMIN_SERVER,
        ADMIN_SERVER_LOCAL,
        WEBHOOK_SERVER,
    ];
}

/// A supervised task that ended.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("background task {task} {cause}")]
pub struct TaskEnded {
    /// The task's name.
    pub task: &'static str,
    /// `returned`, or `panicked: MESSAGE`.
    pub cause: String,
}

/// Spawns and watches the long-lived tasks of a run.
pub struct Supervisor {
    tx: mpsc::UnboundedSender<TaskEnded>,
    rx: Mutex<mpsc::UnboundedReceiver<TaskEnded>>,
}

impl Default for Supervisor {
    fn default() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        Supervisor {
            tx,
            rx: Mutex::new(rx),
        }
    }
}

impl Supervisor {
    /// Spawns `task` named `name`; its end, whatever the cause, is reported to
    /// [`Self::ended`]. The handle completes when the task does.
    pub fn spawn<F>(&self, name: &'static str, task: F) -> JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let cause = match AssertUnwindSafe(task).catch_unwind().await {
                Ok(()) => "returned".to_string(),
                Err(panic) => format!("panicked: {}", panic_message(panic.as_ref())),
            };
            let _ = tx.send(TaskEnded { task: name, cause });
        })
    }

    /// The next supervised task to end (pending while all run).
    pub async fn ended(&self) -> TaskEnded {
        match self.rx.lock().await.recv().await {
            Some(end) => end,
            // The sender lives as long as `self`.
            None => std::future::pending().await,
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_task_that_panics_or_returns_is_reported_by_name() {
        let s = Supervisor::default();
        let _running = s.spawn("forever", std::future::pending());
        let handle = s.spawn("consul dc1", async { panic!("index out of range") });
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), s.ended())
            .await
            .unwrap();
        assert_eq!(
            end,
            TaskEnded {
                task: "consul dc1",
                cause: "panicked: index out of range".into()
            }
        );
        assert!(handle.await.is_ok(), "the panic is caught and reported");
        s.spawn("publisher", async {});
        let end = tokio::time::timeout(std::time::Duration::from_secs(5), s.ended())
            .await
            .unwrap();
        assert_eq!(end.to_string(), "background task publisher returned");
        // The task still running is not reported.
        let quiet = tokio::time::timeout(std::time::Duration::from_millis(100), s.ended()).await;
        assert!(quiet.is_err());
    }
}
