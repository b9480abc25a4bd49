//! The reliability suite: every failure a production mesh meets, survived with nothing lost.
//!
//! Every scenario runs the real `meshbridge` binary (one process per replica) and a real
//! Envoy bootstrapped by `meshbridge bootstrap`, with requests flowing through that Envoy for
//! the whole scenario: every request's result is recorded, and each test states which
//! requests may fail (none, in every scenario here: Envoy keeps its last configuration while
//! it has no control plane, and meshbridge keeps the last known state while a source fails)
//! and prints the first failures with their reasons if any does. After the fault, each test
//! makes a change and waits for Envoy to route by it, so "still serving" cannot hide "no
//! longer configured".
//!
//! - `control_plane`: meshbridge killed and restarted, one of two replicas killed, a rolling
//!   restart, the Envoy–meshbridge link cut, slow and blackholed;
//! - `consul`: the agent down or slow, no leader, rate-limited, every datacenter down, one cut
//!   off, back with a lower index;
//! - `kube`: the Kubernetes API down, slow, and its watches cut, under two replicas;
//! - `churn`: 1,000 instance changes in a minute across 50 services;
//! - `disk`: a full disk for the log and a read-only manifest directory.
//!
//! Network faults come from [`crate::support::faults::FaultProxy`], whose own behaviour
//! `faults` checks. Recovery times are printed (`--nocapture` shows them) but only bounded
//! functionally: each bound is a constant next to the reason for it.

mod churn;
mod consul;
mod control_plane;
mod disk;
mod faults;
mod kube;
