//! meshbridge: one control plane for a service mesh spanning Kubernetes pods and legacy
//! hosts whose services live in Consul.
//!
//! ```text
//!  flags + environment ──► config (read once, validated) ──► RunConfig ──► app (wiring, start/stop)
//!
//!  Consul catalog ──blocking queries──┐
//!  Kubernetes: MeshService, AccessRule,├─► index ──debounced change──► translate ──► snapshot cache ──► ADS (SotW + Delta) ──► Envoys
//!    Pods ──watchers───────────────────┤   (sync,     (one state per      (pure: model +    (per proxy group,     gRPC, tonic
//!  --config-dir manifests ──file watch─┘    pure)      window)             group → Envoy)    versioned per
//!                                                                                            resource)
//!  Pod CREATE ──► webhook ──► inject (pure: pod template → sidecar, over api::annotations)
//!  published state ──► status (leader), consul_sync (leader: pods → Consul)
//!  index, cache, streams ──► admin (typed views: admin::views) ──► HTTP JSON ──► UI, ctl
//!  every component ──► metrics (typed label sets) ──► /metrics
//! ```
//!
//! Pure core ([`model`], [`index`], [`translate`], [`snapshot`], [`webhook::inject`],
//! [`webhook::admission`], the Consul watch state machine and flap damper in
//! [`sources::consul`]) and a thin IO shell ([`sources`], [`xds`], [`admin`], [`app`],
//! [`ctl`]). A module depends only on those before it: `model` ← `translate` ← `snapshot` ←
//! `xds`; `api` ← `index` ← `sources`; `admin::views` ← `admin`, `ctl`; `config` ← `app`.
//! Nothing but `config` reads the process environment (a lint enforces it), and no function
//! is longer than 100 lines without a reason written next to it.

pub mod admin;
pub mod api;
pub mod app;
pub mod bootstrap;
pub mod config;
pub mod consul_sync;
pub mod ctl;
pub mod demo;
#[doc(hidden)]
pub mod fuzzing;
pub mod index;
pub mod load;
pub mod metrics;
pub mod model;
pub mod serve;
pub mod snapshot;
pub mod sources;
pub mod status;
pub mod tls;
pub mod translate;
pub mod validate;
pub mod webhook;
pub mod xds;
