//! Mutual TLS with the host's certificates.
//!
//! The certificate and the CA bundle never travel over xDS: a proxy's bootstrap declares them
//! as the static secrets [`SERVER_CERT_SECRET`] and [`VALIDATION_SECRET`] (files on the host,
//! see `meshbridge bootstrap --tls-*`), and the contexts built here only name them. Every
//! context also checks the peer's SPIFFE identity: callers must present a
//! `spiffe://<trust-domain>/service/…` certificate, and a caller checks that the callee's is
//! exactly `spiffe://<trust-domain>/service/<callee>`.

use envoy_types::pb::envoy::config::core::v3::{TransportSocket, transport_socket::ConfigType};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig,
    SubjectAltNameMatcher, UpstreamTlsContext,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;

use super::names;

/// Static secret holding the proxy's own certificate chain and key.
pub const SERVER_CERT_SECRET: &str = "server_cert";
/// Static secret holding the CA bundle that verifies peers.
pub const VALIDATION_SECRET: &str = "validation_context";

fn static_secret(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        // No config source: the secret is one of the bootstrap's static secrets.
        sds_config: None,
    }
}

fn common_context(peer: StringMatcher) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![static_secret(SERVER_CERT_SECRET)],
        validation_context_type: Some(ValidationContextType::CombinedValidationContext(
            CombinedCertificateValidationContext {
                default_validation_context: Some(CertificateValidationContext {
                    match_typed_subject_alt_names: vec![SubjectAltNameMatcher {
                        san_type: SanType::Uri as i32,
                        matcher: Some(peer),
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
                validation_context_sds_secret_config: Some(static_secret(VALIDATION_SECRET)),
                ..Default::default()
            },
        )),
        ..Default::default()
    }
}

/// The TLS of an ingress listener: the proxy's certificate, and a client certificate
/// required, signed by the host's CA and naming a service of the trust domain.
pub fn downstream_tls(trust_domain: &str) -> TransportSocket {
    let context = DownstreamTlsContext {
        common_tls_context: Some(common_context(StringMatcher {
            match_pattern: Some(MatchPattern::Prefix(names::spiffe_prefix(trust_domain))),
            ..Default::default()
        })),
        require_client_certificate: Some(BoolValue { value: true }),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_string(),
        config_type: Some(ConfigType::TypedConfig(pack_any(context))),
    }
}

/// The TLS a caller originates towards `service`: its own certificate as client certificate,
/// and the callee's certificate must name exactly that service.
pub fn upstream_tls(trust_domain: &str, service: &str) -> TransportSocket {
    let context = UpstreamTlsContext {
        common_tls_context: Some(common_context(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(names::spiffe_id(trust_domain, service))),
            ..Default::default()
        })),
        sni: service.to_string(),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_string(),
        config_type: Some(ConfigType::TypedConfig(pack_any(context))),
    }
}
