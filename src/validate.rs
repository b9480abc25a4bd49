//! `meshbridge validate -f FILE|DIR|-`: manifests checked as `run` reads them from
//! `--config-dir` (the same files of a directory, the same parser and validation path), for
//! CI pipelines. Every error is reported, each as
//! `FILE:LINE: document N (KIND NAME): FIELD: reason`; the exit code is 0 or 2.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::sources::files::{list_files, parse_manifests};

/// Flags of `meshbridge validate`.
#[derive(Clone, Debug, clap::Args)]
pub struct ValidateArgs {
    /// A manifest file, a directory of them (its `*.yaml` and `*.yml` files, as
    /// `--config-dir` reads them), or `-` for standard input; repeatable.
    #[arg(short = 'f', long = "filename", required = true)]
    pub inputs: Vec<PathBuf>,
}

/// The largest input read, per file (a manifest is text a person wrote).
pub const MAX_INPUT_BYTES: u64 = 16 << 20;

/// What a check found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Files read.
    pub files: usize,
    /// Documents of the files accepted (a file with an error is rejected whole, as `run`
    /// rejects it).
    pub documents: usize,
    /// Every error, in input order.
    pub errors: Vec<String>,
}

/// Checks `inputs`; `stdin` is read for `-`.
pub fn check(inputs: &[PathBuf], mut stdin: impl Read) -> Report {
    let mut report = Report::default();
    for input in inputs {
        if input.as_os_str() == "-" {
            let text = read_bounded(&mut stdin, "-");
            report.add("-", text);
            continue;
        }
        let files = if input.is_dir() {
            match list_files(input) {
                Ok(files) => files,
                Err(e) => {
                    report
                        .errors
                        .push(format!("{}: cannot read directory: {e}", input.display()));
                    continue;
                }
            }
        } else {
            vec![input.clone()]
        };
        for file in files {
            let name = file.display().to_string();
            let text = read_file(&file, &name);
            report.add(&name, text);
        }
    }
    report
}

impl Report {
    fn add(&mut self, name: &str, text: Result<String, String>) {
        self.files += 1;
        match text.map(|t| parse_manifests(name, &t)) {
            Ok(Ok(objects)) => self.documents += objects.len(),
            Ok(Err(errors)) => self.errors.extend(errors.iter().map(ToString::to_string)),
            Err(e) => self.errors.push(e),
        }
    }
}

fn read_file(path: &Path, name: &str) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{name}: cannot read: {e}"))?;
    read_bounded(file, name)
}

fn read_bounded(input: impl Read, name: &str) -> Result<String, String> {
    let mut bytes = Vec::new();
    input
        .take(MAX_INPUT_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{name}: cannot read: {e}"))?;
    if bytes.len() as u64 > MAX_INPUT_BYTES {
        return Err(format!("{name}: larger than {} MiB", MAX_INPUT_BYTES >> 20));
    }
    String::from_utf8(bytes).map_err(|e| format!("{name}: not UTF-8 text: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_error_of_every_input_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let good = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: orders}\nspec:\n  endpoints: [{address: 10.0.0.1, port: 80}]\n";
        std::fs::write(dir.path().join("good.yaml"), good).unwrap();
        let bad = format!(
            "{good}---\napiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {{name: broken}}\nspec:\n  endpoints: [{{address: 10.0.0.1, port: 70000}}]\n"
        );
        std::fs::write(dir.path().join("bad.yaml"), bad).unwrap();
        std::fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        let stdin = "kind: [".as_bytes();
        let inputs = [dir.path().to_path_buf(), PathBuf::from("-")];
        let report = check(&inputs, stdin);
        assert_eq!(report.files, 3, "two manifests of the directory and stdin");
        // A file with an error is rejected whole, as `run` rejects it.
        assert_eq!(report.documents, 1, "good.yaml's document");
        assert_eq!(report.errors.len(), 2, "{:?}", report.errors);
        let bad_file = dir.path().join("bad.yaml").display().to_string();
        assert!(
            report.errors[0].starts_with(&format!(
                "{bad_file}:11: document 2 (MeshService broken): spec.endpoints[0].port"
            )),
            "{}",
            report.errors[0]
        );
        assert!(
            report.errors[1].starts_with("-:2: document 1: invalid YAML"),
            "{}",
            report.errors[1]
        );
    }

    #[test]
    fn inputs_are_bounded_and_missing_ones_named() {
        let big = vec![b'#'; (MAX_INPUT_BYTES + 1) as usize];
        let report = check(&[PathBuf::from("-")], big.as_slice());
        assert_eq!(report.errors, ["-: larger than 16 MiB"]);
        let report = check(&[PathBuf::from("/nonexistent/mesh.yaml")], std::io::empty());
        assert!(
            report.errors[0].starts_with("/nonexistent/mesh.yaml: cannot read"),
            "{:?}",
            report.errors
        );
    }
}
