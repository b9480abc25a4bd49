//! The fuzz targets' corpora (`fuzz/corpus/<target>/`), replayed through the same entry
//! points the fuzzers drive (`meshbridge::fuzzing`): every input the fuzzers kept, and every
//! crash they once found (added to the corpus when fixed), must parse or be refused without
//! a panic. `make fuzz` grows the corpora; this runs in `make test` on the stable toolchain.

use std::path::PathBuf;

fn replay(target: &str, run: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    inputs.sort();
    assert!(!inputs.is_empty(), "{}: no corpus", dir.display());
    for input in &inputs {
        let data = std::fs::read(input).unwrap();
        // A panic names the input that caused it.
        let outcome = std::panic::catch_unwind(|| run(&data));
        assert!(outcome.is_ok(), "{} panicked", input.display());
    }
}

#[test]
fn node_metadata_corpus_replays_without_a_panic() {
    replay("node_metadata", meshbridge::fuzzing::node_metadata);
}

#[test]
fn consul_corpus_replays_without_a_panic() {
    replay("consul", meshbridge::fuzzing::consul);
}

#[test]
fn manifests_corpus_replays_without_a_panic() {
    replay("manifests", meshbridge::fuzzing::manifests);
}

#[test]
fn admission_corpus_replays_without_a_panic() {
    replay("admission", meshbridge::fuzzing::admission);
}

#[test]
fn globs_corpus_replays_without_a_panic() {
    replay("globs", meshbridge::fuzzing::globs);
}
