//! A Consul-backed mesh for the end-to-end tests, started in one call: app backends, the
//! Consul fake with their instances registered, the real `meshbridge` watching it, and (when
//! asked) the legacy `frontend` proxy whose calls the tests follow.

use std::sync::Arc;

use super::consul_fake::{FakeConsul, Instance};
use super::faults::FaultProxy;
use super::fixtures::{Fixture, MeshService};
use super::{Backend, ControlPlane, Envoy, EnvoyOptions};

/// Blocking-query wait meshbridge is started with (`--consul-wait`, ms).
const CONSUL_WAIT_MS: &str = "2000";

/// The manifest every Consul mesh starts from: a legacy frontend calling `orders` (known only
/// to Consul) and whatever its proxy adds.
pub fn frontend_manifest() -> String {
    MeshService::build("frontend").dependency("orders").yaml()
}

/// Work done on the fake once it is up, before anything is registered.
type Setup = Box<dyn FnOnce(&FakeConsul) + Send>;

/// One instance put into the fake before meshbridge starts.
enum Registration {
    /// The backend `service`/`name` registered as `id`, shaped by `shape`.
    Backend {
        dc: String,
        service: String,
        name: String,
        id: String,
        shape: Box<dyn FnOnce(Instance) -> Instance + Send>,
    },
    /// An instance with no backend behind it.
    Bare { dc: String, instance: Instance },
}

/// What [`ConsulMesh::build`] starts; see its methods.
pub struct ConsulMeshBuilder {
    datacenter: String,
    backends: Vec<(String, String)>,
    registrations: Vec<Registration>,
    setup: Vec<Setup>,
    args: Vec<String>,
    proxy: Option<Vec<String>>,
    wait_ms: String,
    faults: bool,
}

impl ConsulMeshBuilder {
    /// Starts a backend answering `<service> <name>`, not registered.
    pub fn backend(mut self, service: &str, name: &str) -> Self {
        let key = (service.to_string(), name.to_string());
        if !self.backends.contains(&key) {
            self.backends.push(key);
        }
        self
    }

    /// Starts the backend `service`/`name` and registers it in `dc` as instance `id`.
    pub fn register(self, dc: &str, service: &str, name: &str, id: &str) -> Self {
        self.register_with(dc, service, name, id, |i| i)
    }

    /// [`ConsulMeshBuilder::register`] with the instance shaped by `shape` (tags, weight).
    pub fn register_with(
        mut self,
        dc: &str,
        service: &str,
        name: &str,
        id: &str,
        shape: impl FnOnce(Instance) -> Instance + Send + 'static,
    ) -> Self {
        self = self.backend(service, name);
        self.registrations.push(Registration::Backend {
            dc: dc.into(),
            service: service.into(),
            name: name.into(),
            id: id.into(),
            shape: Box::new(shape),
        });
        self
    }

    /// Registers `instance` in `dc` with no backend behind it.
    pub fn instance(mut self, dc: &str, instance: Instance) -> Self {
        self.registrations.push(Registration::Bare {
            dc: dc.into(),
            instance,
        });
        self
    }

    /// Runs `f` on the fake once it is up, before anything is registered.
    pub fn setup(mut self, f: impl FnOnce(&FakeConsul) + Send + 'static) -> Self {
        self.setup.push(Box::new(f));
        self
    }

    /// Starts meshbridge with `--consul-wait ms` instead of the harness's short wait.
    pub fn consul_wait(mut self, ms: u64) -> Self {
        self.wait_ms = ms.to_string();
        self
    }

    /// Passes `args` to meshbridge after the Consul address and wait.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Puts a [`FaultProxy`] between meshbridge and the fake ([`ConsulMesh::faults`]).
    pub fn through_faults(mut self) -> Self {
        self.faults = true;
        self
    }

    /// Starts the frontend proxy (egress on), adding `dependencies` to what it declares.
    pub fn proxy(mut self, dependencies: &[&str]) -> Self {
        self.proxy = Some(dependencies.iter().map(|d| d.to_string()).collect());
        self
    }

    /// Starts everything in order: backends, the fake and its instances, meshbridge (ready),
    /// then the proxy.
    pub async fn start(self) -> ConsulMesh {
        let mut backends = Vec::new();
        for (service, name) in &self.backends {
            backends.push((
                service.clone(),
                name.clone(),
                Backend::start(service, name).await,
            ));
        }
        let consul = FakeConsul::start(&self.datacenter).await;
        for f in self.setup {
            f(&consul);
        }
        let port = |service: &str, name: &str| {
            backends
                .iter()
                .find(|(s, n, _)| s == service && n == name)
                .map(|(_, _, b)| b.port)
                .unwrap()
        };
        for registration in self.registrations {
            match registration {
                Registration::Backend {
                    dc,
                    service,
                    name,
                    id,
                    shape,
                } => consul.register(
                    &dc,
                    shape(Instance::new(
                        &service,
                        &id,
                        "127.0.0.1",
                        port(&service, &name),
                    )),
                ),
                Registration::Bare { dc, instance } => consul.register(&dc, instance),
            }
        }
        let faults = match self.faults {
            true => {
                let addr = consul.url().trim_start_matches("http://").parse().unwrap();
                Some(FaultProxy::start(addr).await)
            }
            false => None,
        };
        let url = match &faults {
            Some(f) => format!("http://{}", f.addr()),
            None => consul.url(),
        };
        let mut args = vec![
            "--consul-addr",
            url.as_str(),
            "--consul-wait",
            self.wait_ms.as_str(),
        ];
        args.extend(self.args.iter().map(String::as_str));
        let cp = ControlPlane::start(&frontend_manifest(), &args).await;
        let envoy = match self.proxy {
            Some(dependencies) => Some(Arc::new(
                Envoy::start(
                    &cp,
                    EnvoyOptions {
                        service: "frontend".into(),
                        egress: true,
                        dependencies,
                        ..Default::default()
                    },
                )
                .await,
            )),
            None => None,
        };
        ConsulMesh {
            consul,
            cp,
            envoy,
            backends,
            faults,
        }
    }
}

/// A running Consul mesh. Everything stops on drop.
pub struct ConsulMesh {
    /// The Consul fake.
    pub consul: FakeConsul,
    /// meshbridge, watching `consul`.
    pub cp: ControlPlane,
    envoy: Option<Arc<Envoy>>,
    backends: Vec<(String, String, Backend)>,
    faults: Option<FaultProxy>,
}

impl ConsulMesh {
    /// A mesh whose Consul agent is in `datacenter`.
    pub fn build(datacenter: &str) -> ConsulMeshBuilder {
        ConsulMeshBuilder {
            datacenter: datacenter.into(),
            backends: Vec::new(),
            registrations: Vec::new(),
            setup: Vec::new(),
            args: Vec::new(),
            proxy: None,
            wait_ms: CONSUL_WAIT_MS.to_string(),
            faults: false,
        }
    }

    /// The frontend proxy; the mesh must have been built with [`ConsulMeshBuilder::proxy`].
    pub fn envoy(&self) -> &Arc<Envoy> {
        self.envoy.as_ref().expect("built without .proxy()")
    }

    /// The fault proxy between meshbridge and Consul; the mesh must have been built with
    /// [`ConsulMeshBuilder::through_faults`].
    pub fn faults(&self) -> &FaultProxy {
        self.faults
            .as_ref()
            .expect("built without .through_faults()")
    }

    /// The port of the backend `service`/`name`.
    pub fn port(&self, service: &str, name: &str) -> u16 {
        self.backends
            .iter()
            .find(|(s, n, _)| s == service && n == name)
            .map(|(_, _, b)| b.port)
            .unwrap_or_else(|| panic!("no backend {service} {name}"))
    }

    /// Registers the backend `service`/`name` in `dc` as instance `id`.
    pub fn register(&self, dc: &str, service: &str, name: &str, id: &str) {
        self.consul.register(
            dc,
            Instance::new(service, id, "127.0.0.1", self.port(service, name)),
        );
    }

    /// Waits until the proxy's calls to `orders` succeed.
    pub async fn wait_orders_routed(&self) {
        self.envoy()
            .wait_call("orders", "orders routed", |r| r.status == 200)
            .await;
    }

    /// Waits until the proxy's calls to `orders` are answered by the backend `orders`/`name`.
    pub async fn wait_orders_from(&self, name: &str, what: &str) {
        let body = format!("orders {name}");
        self.envoy()
            .wait_call("orders", what, |r| r.body.contains(&body))
            .await;
    }

    /// Asserts that `calls` calls in a row to `orders` are answered by the backend
    /// `orders`/`name`.
    pub async fn assert_orders_from(&self, name: &str, calls: usize) {
        let body = format!("orders {name}");
        for _ in 0..calls {
            let r = self.envoy().call("orders", "/").await.unwrap();
            assert!(r.body.contains(&body), "{}", r.body);
        }
    }

    /// `service` as `/api/services` shows it.
    pub async fn service(&self, service: &str) -> serde_json::Value {
        self::service(&self.cp, service).await
    }

    /// Waits until `/api/services` lists `service`.
    pub async fn wait_service(&self, service: &str, what: &str) {
        super::eventually(std::time::Duration::from_secs(20), what, || async {
            let services = self.cp.admin_json("/api/services").await;
            services
                .as_array()?
                .iter()
                .any(|s| s["name"] == service)
                .then_some(())
        })
        .await;
    }
}

/// `service` as `cp`'s `/api/services` shows it.
pub async fn service(cp: &ControlPlane, service: &str) -> serde_json::Value {
    let services = cp.admin_json("/api/services").await;
    services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == service)
        .cloned()
        .unwrap_or_else(|| panic!("no {service} in {services}"))
}
