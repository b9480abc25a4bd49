//! The shape of the crate, checked: the pure core does no IO and reads no clock or
//! environment (it is given the time), and a module of the core uses only the modules
//! before it (`model` ← `translate` ← `snapshot`; `api`, `model` ← `index`). Clippy's
//! `disallowed-methods` (clippy.toml) cannot be scoped to a module, so this reads the code.

use std::path::{Path, PathBuf};

/// Files of the pure core, relative to `src/`: directories are taken whole.
const PURE_CORE: &[&str] = &[
    "model",
    "index",
    "load",
    "translate",
    "snapshot",
    "webhook/inject",
    "webhook/admission.rs",
    "sources/consul/watch.rs",
    "sources/consul/damper.rs",
    "sources/consul/removal.rs",
    "sources/consul/wire.rs",
];

/// What the pure core may not name: clocks, the environment, files, sockets, runtimes,
/// clients.
const IO: &[&str] = &[
    "Instant::now",
    "SystemTime::now",
    "Timestamp::now",
    "std::env::",
    "std::fs::",
    "std::net::TcpStream",
    "tokio::",
    "reqwest::",
    "kube::Client",
    "kube::Api",
    "tonic::transport",
];

/// For a directory of the core, the modules it may not use.
const LAYERS: &[(&str, &[&str])] = &[
    (
        "model",
        &[
            "index",
            "translate",
            "snapshot",
            "xds",
            "sources",
            "admin",
            "app",
            "webhook",
            "status",
        ],
    ),
    (
        "translate",
        &[
            "index", "snapshot", "xds", "sources", "admin", "app", "status",
        ],
    ),
    (
        "snapshot",
        &["index", "xds", "sources", "admin", "app", "status"],
    ),
    (
        "index",
        &["translate", "snapshot", "xds", "admin", "app", "status"],
    ),
    (
        "load",
        &[
            "index", "snapshot", "xds", "sources", "admin", "app", "status",
        ],
    ),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(path).unwrap() {
        out.extend(rust_files(&entry.unwrap().path()));
    }
    out.retain(|p| p.extension().is_some_and(|e| e == "rs"));
    out.sort();
    out
}

/// The crate modules a file's code names: `crate::x::…`, `crate::x;` and the first segments
/// of `crate::{x::…, y}`.
fn crate_modules(code: &str) -> std::collections::BTreeSet<String> {
    let path = regex::Regex::new(r"crate::([a-z_]+)\b").unwrap();
    let group = regex::Regex::new(r"crate::\{([^}]*)\}").unwrap();
    let mut out: std::collections::BTreeSet<String> =
        path.captures_iter(code).map(|c| c[1].to_string()).collect();
    for c in group.captures_iter(code) {
        for item in c[1].split(',') {
            let first = item.trim().split("::").next().unwrap_or_default();
            if !first.is_empty() {
                out.insert(first.to_string());
            }
        }
    }
    out
}

/// A file's code: without its test module (`#[cfg(test)]` to the end, as every file here
/// places it) and without comments.
fn code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    let text = text.split("#[cfg(test)]").next().unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn the_pure_core_does_no_io_and_reads_no_clock() {
    let mut found = Vec::new();
    for part in PURE_CORE {
        let files = rust_files(&src().join(part));
        assert!(
            !files.is_empty(),
            "src/{part} has no Rust file: update PURE_CORE"
        );
        for file in files {
            let code = code(&file);
            for name in IO {
                if code.contains(name) {
                    found.push(format!("{}: {name}", file.display()));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "IO in the pure core:\n{}",
        found.join("\n")
    );
}

#[test]
fn a_core_module_uses_only_the_modules_before_it() {
    let mut found = Vec::new();
    for (module, forbidden) in LAYERS {
        for file in rust_files(&src().join(module)) {
            let used = crate_modules(&code(&file));
            for other in *forbidden {
                if used.contains(*other) {
                    found.push(format!("{}: crate::{other}", file.display()));
                }
            }
        }
    }
    assert!(found.is_empty(), "layering broken:\n{}", found.join("\n"));
}
