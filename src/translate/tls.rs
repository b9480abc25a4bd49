//! Mutual TLS with the host's certificates.
//!
//! The certificate and the CA bundle never travel over xDS: they are files on the proxy's
//! host, which the proxy names in its node metadata (`tls_cert`, `tls_key`, `tls_ca`, written
//! by `meshbridge bootstrap --tls-*`). meshbridge sends that proxy, and only it, the SDS
//! secrets [`SERVER_CERT_SECRET`] and [`VALIDATION_SECRET`] holding those *paths* and the
//! directories to watch ([`secrets`]); Envoy reads the files itself and reads them again when
//! they are replaced (renamed into place, or a Kubernetes Secret volume's `..data` swapped), so
//! a certificate rotates without a restart. The contexts built here name the secrets (over
//! ADS), identical for every proxy. Every context also checks the peer's SPIFFE identity:
//! callers must present a `spiffe://<trust-domain>/service/…` certificate, and a caller checks
//! that the callee's is exactly `spiffe://<trust-domain>/service/<callee>`.

use envoy_types::pb::envoy::config::core::v3::{
    DataSource, TransportSocket, WatchedDirectory, data_source::Specifier,
    transport_socket::ConfigType,
};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    CertificateValidationContext, CommonTlsContext, DownstreamTlsContext, SdsSecretConfig, Secret,
    SubjectAltNameMatcher, TlsCertificate, UpstreamTlsContext,
    common_tls_context::{CombinedCertificateValidationContext, ValidationContextType},
    secret,
    subject_alt_name_matcher::SanType,
};
use envoy_types::pb::envoy::r#type::matcher::v3::{StringMatcher, string_matcher::MatchPattern};
use envoy_types::pb::google::protobuf::BoolValue;
use envoy_types::util::pack_any;

use super::names;
use crate::model::CertificateFiles;

/// Secret holding the proxy's own certificate chain and key.
pub const SERVER_CERT_SECRET: &str = "server_cert";
/// Secret holding the CA bundle that verifies peers.
pub const VALIDATION_SECRET: &str = "validation_context";

fn ads_secret(name: &str) -> SdsSecretConfig {
    SdsSecretConfig {
        name: name.to_string(),
        sds_config: Some(super::proto::ads_config_source()),
    }
}

/// The SDS secrets of a proxy holding `files`: the paths, and the directory of each to watch
/// (a move into it, as a rename or a Secret volume's `..data` swap makes, reloads them).
pub fn secrets(files: &CertificateFiles) -> Vec<Secret> {
    let file = |path: &str| DataSource {
        specifier: Some(Specifier::Filename(path.to_string())),
        ..Default::default()
    };
    let directory = |path: &str| {
        let parent = std::path::Path::new(path)
            .parent()
            .map(|p| p.to_string_lossy().into_owned())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| ".".to_string());
        Some(WatchedDirectory {
            path: parent,
            ..Default::default()
        })
    };
    vec![
        Secret {
            name: SERVER_CERT_SECRET.to_string(),
            r#type: Some(secret::Type::TlsCertificate(TlsCertificate {
                certificate_chain: Some(file(&files.cert)),
                private_key: Some(file(&files.key)),
                watched_directory: directory(&files.cert),
                ..Default::default()
            })),
        },
        Secret {
            name: VALIDATION_SECRET.to_string(),
            r#type: Some(secret::Type::ValidationContext(
                CertificateValidationContext {
                    trusted_ca: Some(file(&files.ca)),
                    watched_directory: directory(&files.ca),
                    ..Default::default()
                },
            )),
        },
    ]
}

fn common_context(peer: StringMatcher) -> CommonTlsContext {
    CommonTlsContext {
        tls_certificate_sds_secret_configs: vec![ads_secret(SERVER_CERT_SECRET)],
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
                validation_context_sds_secret_config: Some(ads_secret(VALIDATION_SECRET)),
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
/// and the callee's certificate must name exactly that service (for a further port,
/// `NAME:PORT`, the service `NAME`: one identity serves all its ports).
pub fn upstream_tls(trust_domain: &str, service: &str) -> TransportSocket {
    let identity = crate::model::access_target(service);
    let context = UpstreamTlsContext {
        common_tls_context: Some(common_context(StringMatcher {
            match_pattern: Some(MatchPattern::Exact(names::spiffe_id(
                trust_domain,
                identity,
            ))),
            ..Default::default()
        })),
        sni: identity.to_string(),
        ..Default::default()
    };
    TransportSocket {
        name: "envoy.transport_sockets.tls".to_string(),
        config_type: Some(ConfigType::TypedConfig(pack_any(context))),
    }
}
