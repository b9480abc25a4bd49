//! Reliability: the mesh keeps serving while its control plane fails, restarts or loses its
//! network, and follows changes again afterwards.
//!
//! Every scenario runs the real `meshbridge` binary (one process per replica) and a real
//! Envoy bootstrapped by `meshbridge bootstrap`, with requests flowing through that Envoy for
//! the whole scenario ([`crate::support::Traffic`]): every request's result is recorded, and
//! each test states which requests may fail — for the control plane scenarios, none, since
//! Envoy keeps its last configuration while it has no control plane. After the fault, each
//! test writes a manifest change and waits for Envoy to route by it, so "still serving" cannot
//! hide "no longer configured". Network faults between Envoy and the control plane come from
//! [`crate::support::faults::FaultProxy`], whose own behaviour `faults` checks.
//!
//! Recovery times are printed (`--nocapture` shows them) but only bounded functionally: each
//! bound is a constant next to the reason for it.

mod control_plane;
mod faults;
