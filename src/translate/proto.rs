//! Small protobuf builders every part of `translate` uses.

use std::time::Duration as StdDuration;

use envoy_types::pb::envoy::config::core::v3::{
    Address, AggregatedConfigSource, ApiVersion, ConfigSource, SocketAddress, address,
    config_source::ConfigSourceSpecifier, socket_address::PortSpecifier,
};
use envoy_types::pb::google::protobuf::Duration;

/// Converts a std duration to the protobuf one, saturating at the largest one protobuf
/// allows (validation keeps manifest durations far below it).
pub(crate) fn proto_duration(d: StdDuration) -> Duration {
    const MAX_SECONDS: i64 = 315_576_000_000;
    match i64::try_from(d.as_secs()) {
        Ok(seconds) if seconds <= MAX_SECONDS => Duration {
            seconds,
            nanos: d.subsec_nanos() as i32,
        },
        _ => Duration {
            seconds: MAX_SECONDS,
            nanos: 0,
        },
    }
}

/// A config source pointing at the ADS stream the proxy already has.
pub(crate) fn ads_config_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        ..Default::default()
    }
}

/// A TCP socket address.
pub(crate) fn socket_address(host: &str, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: host.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(u32::from(port))),
            ..Default::default()
        })),
    }
}

/// HTTP/1 options that keep header names' case as received (Envoy's `preserve_case` stateful
/// formatter): a codec with them remembers the case it read and writes it back out.
pub fn preserve_case_http1() -> envoy_types::pb::envoy::config::core::v3::Http1ProtocolOptions {
    use envoy_types::pb::envoy::config::core::v3::{
        Http1ProtocolOptions, TypedExtensionConfig,
        http1_protocol_options::{HeaderKeyFormat, header_key_format::HeaderFormat},
    };
    use envoy_types::pb::envoy::extensions::http::header_formatters::preserve_case::v3::PreserveCaseFormatterConfig;
    Http1ProtocolOptions {
        header_key_format: Some(HeaderKeyFormat {
            header_format: Some(HeaderFormat::StatefulFormatter(TypedExtensionConfig {
                name: "envoy.http.stateful_header_formatters.preserve_case".to_string(),
                typed_config: Some(envoy_types::util::pack_any(
                    PreserveCaseFormatterConfig::default(),
                )),
            })),
        }),
        ..Default::default()
    }
}
