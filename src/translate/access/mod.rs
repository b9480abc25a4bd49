//! The ingress listener: who is calling, whether they may, and a record of it.
//!
//! Three pieces, in the order a request meets them (the rate limits of
//! [`crate::translate::rate_limit`] come after them, before the router):
//!
//! 1. **Transport**: by the service's `mtls` mode and whether the proxy holds a certificate,
//!    plaintext, mutual TLS, or both (a TLS inspector picks the filter chain).
//! 2. **Identity** (a small Lua filter): the caller is the service named by its certificate's
//!    SPIFFE id; without a certificate, with `--source-ip-identity`, the service whose instance
//!    has the connection's source address; a peer whose certificate names a service allowed by
//!    `--identity-header-from` may assert it in `x-client-name`. Every other incoming spelling
//!    of `x-client-name` is removed, and the identity found is set in its place for the
//!    application and recorded for the access log. Paths are normalized before anything looks
//!    at them.
//! 3. **Authorization** (Envoy RBAC, built by [`rbac_config`]): the target's merged
//!    AccessRules as ALLOW policies. Principals are matched on what the connection proves
//!    (certificate SAN, source address of a connection without certificate), never on the
//!    header the identity filter wrote, except for a trusted peer's assertion. `deny`
//!    enforces; `log` runs the same policies as shadow rules, so the call passes and is counted
//!    as a shadow denial (enforced anyway under `--default-deny`).
//!
//! Every request is logged as one JSON line on the proxy's standard output, with the caller,
//! how it was identified and the RBAC outcome; Envoy counts decisions per target in
//! `http.ingress.rbac.<target>.{allowed,denied,shadow_allowed,shadow_denied}`.

mod identity;
mod ingress;
mod log;
mod rbac;

pub use identity::identity_script;
pub use ingress::{Ingress, IngressTransport, ingress, ingress_transport};
pub use log::access_log_fields;
pub use rbac::{CallerAddresses, encode_rbac, rbac_config};
