//! The ingress access log: one JSON line per request on the proxy's standard output.

use std::collections::HashMap;

use envoy_types::pb::envoy::config::accesslog::v3::{AccessLog, access_log};
use envoy_types::pb::envoy::config::core::v3::{
    SubstitutionFormatString, substitution_format_string::Format,
};
use envoy_types::pb::envoy::extensions::access_loggers::stream::v3::{
    StdoutAccessLog, stdout_access_log::AccessLogFormat,
};
use envoy_types::pb::google::protobuf::{Any, Struct, Value, value::Kind};
use prost::{Message, Name};

use crate::translate::names;

/// The fields of an ingress access log line, in name order.
pub fn access_log_fields(target: &str, rbac_mode: &str) -> Vec<(&'static str, String)> {
    let rbac = |key: &str| format!("%DYNAMIC_METADATA(envoy.filters.http.rbac:{target}.{key})%");
    let identity = |key: &str| format!("%DYNAMIC_METADATA({}:{key})%", names::IDENTITY_METADATA);
    vec![
        ("caller", identity("caller")),
        ("details", "%RESPONSE_CODE_DETAILS%".to_string()),
        ("duration_ms", "%DURATION%".to_string()),
        ("identity", identity("identity")),
        ("method", "%REQ(:METHOD)%".to_string()),
        ("path", "%REQ(:PATH)%".to_string()),
        ("peer_uri_san", "%DOWNSTREAM_PEER_URI_SAN%".to_string()),
        ("rbac_mode", rbac_mode.to_string()),
        ("rbac_shadow", rbac("shadow_engine_result")),
        (
            "source_address",
            "%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%".to_string(),
        ),
        ("start_time", "%START_TIME%".to_string()),
        ("status", "%RESPONSE_CODE%".to_string()),
        ("target", target.to_string()),
    ]
}

/// JSON access log on standard output. The JSON format is a `Struct` (a map); like
/// [`encode_rbac`], each field is written as its own message so that the bytes are stable.
pub(super) fn access_log(target: &str, rbac_mode: &str) -> AccessLog {
    let mut value = Vec::new();
    for (key, format) in access_log_fields(target, rbac_mode) {
        let one = StdoutAccessLog {
            access_log_format: Some(AccessLogFormat::LogFormat(SubstitutionFormatString {
                format: Some(Format::JsonFormat(Struct {
                    fields: HashMap::from([(
                        key.to_string(),
                        Value {
                            kind: Some(Kind::StringValue(format)),
                        },
                    )]),
                })),
                ..Default::default()
            })),
        };
        value.extend(one.encode_to_vec());
    }
    AccessLog {
        name: "envoy.access_loggers.stdout".to_string(),
        config_type: Some(access_log::ConfigType::TypedConfig(Any {
            type_url: StdoutAccessLog::type_url(),
            value,
        })),
        ..Default::default()
    }
}
