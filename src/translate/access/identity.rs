//! Identity: the Lua filter that names the caller (see [`super`]).

use envoy_types::pb::envoy::config::core::v3::{DataSource, data_source::Specifier};
use envoy_types::pb::envoy::extensions::filters::http::lua::v3::Lua;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    HttpFilter, http_filter::ConfigType as HttpFilterConfig,
};
use envoy_types::util::pack_any;

use crate::model::MeshSettings;

use crate::translate::names;

use super::rbac::CallerAddresses;

fn lua_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\{}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A glob as an anchored Lua pattern.
fn lua_pattern(glob: &str) -> String {
    let mut out = String::from("^");
    for c in glob.chars() {
        match c {
            '*' => out.push_str("[^/,]*"),
            '^' | '$' | '(' | ')' | '%' | '.' | '[' | ']' | '+' | '-' | '?' => {
                out.push('%');
                out.push(c);
            }
            c => out.push(c),
        }
    }
    out.push('$');
    out
}

/// The identity filter's program, after the tables [`identity_script`] writes before it
/// (`prefix`, `by_ip`, `trusted`).
const IDENTITY_LUA: &str = include_str!("identity.lua");

/// The Lua source of the identity filter of `target`.
pub fn identity_script(settings: &MeshSettings, addresses: &CallerAddresses<'_>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    s.push_str("-- meshbridge: who is calling (see the translate::access module)\n");
    s.push_str(&format!(
        "local prefix = {}\n",
        lua_string(&names::spiffe_prefix(&settings.trust_domain))
    ));
    s.push_str("local by_ip = {\n");
    for (ip, services) in &addresses.by_ip {
        let joined: Vec<&str> = services.iter().copied().collect();
        // An IP needs no escaping.
        let _ = writeln!(s, "  [\"{ip}\"] = {},", lua_string(&joined.join(",")));
    }
    s.push_str("}\nlocal trusted = {");
    for glob in &settings.identity_header_from {
        s.push_str(&lua_string(&lua_pattern(glob)));
        s.push_str(", ");
    }
    s.push_str("}\n");
    // The program itself; its two names are checked against `names` by a unit test.
    s.push_str(IDENTITY_LUA);
    s
}

pub(super) fn identity_filter(
    settings: &MeshSettings,
    addresses: &CallerAddresses<'_>,
) -> HttpFilter {
    let lua = Lua {
        default_source_code: Some(DataSource {
            specifier: Some(Specifier::InlineString(identity_script(
                settings, addresses,
            ))),
            ..Default::default()
        }),
        ..Default::default()
    };
    HttpFilter {
        name: "envoy.filters.http.lua".to_string(),
        config_type: Some(HttpFilterConfig::TypedConfig(pack_any(lua))),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_program_uses_the_header_and_metadata_names_of_the_mesh() {
        let header = format!("local header = {}\n", lua_string(names::IDENTITY_HEADER));
        assert!(IDENTITY_LUA.contains(&header), "{IDENTITY_LUA}");
        let namespace = lua_string(names::IDENTITY_METADATA);
        assert_eq!(
            IDENTITY_LUA
                .matches(&format!("meta:set({namespace}, "))
                .count(),
            2,
            "{IDENTITY_LUA}"
        );
    }

    #[test]
    fn globs_become_anchored_lua_patterns_and_strings_are_escaped() {
        assert_eq!(lua_pattern("gw-*"), "^gw%-[^/,]*$");
        assert_eq!(lua_pattern("a.b"), "^a%.b$");
        assert_eq!(lua_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\n\"");
    }
}
