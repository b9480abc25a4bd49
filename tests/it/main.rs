//! meshbridge's integration and end-to-end tests, one test binary: every file here is one
//! area (its doc says what it covers); `support` is the one kit they share — the real
//! `meshbridge` binary and real Envoys, the Consul and Kubernetes API fakes, the Helm
//! renderer, an in-process ADS client and the manifest fixtures. One binary links the crate
//! and its dependencies once instead of once per file.
// A test is a scenario read top to bottom, and it reads its environment (ENVOY_BIN, tools)
// where it needs it: the program's limits on function length and environment reads do not
// apply here.
#![allow(
    clippy::unwrap_used,
    clippy::too_many_lines,
    clippy::disallowed_methods
)]

mod support;

mod access_e2e;
mod admin_e2e;
mod ads_protocol;
mod cert_rotation_e2e;
mod chart;
mod connect_e2e;
mod consul_e2e;
mod consul_fake;
mod crds_and_bootstrap;
mod ctl;
mod dashboards;
mod drain_e2e;
mod e2e;
mod fuzz_corpora;
mod inject;
mod inject_e2e;
mod kube_e2e;
mod kube_fake;
mod layering;
mod manifests_cli;
mod migration_e2e;
mod passive_health_e2e;
mod properties;
mod protocols_e2e;
mod rate_limit_e2e;
mod reliability;
mod translate_snapshots;
mod ui_e2e;
mod webhook;
mod xds_identity_e2e;
