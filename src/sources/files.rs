//! The `--config-dir` source: MeshService and AccessRule manifests in a directory.
//!
//! Changes arrive by file-system notification (inotify on Linux): a file renamed into place
//! or closed after writing is read at once, anything else (a ConfigMap mount swapping its
//! `..data` symlink, a file still open for writing) once it has been left alone for
//! [`SETTLE`]. The directory is also rescanned every `poll` interval, for file systems that
//! send no notifications and in case the watch cannot be set up (inotify limits). A scan
//! only stats files whose stamp (inode, size, change time) is unchanged; a file is read when
//! its stamp moved and parsed only when its bytes changed. A file with any bad document is rejected as a whole: its last good
//! objects stay in force and the error — file, document, line and field — is logged and
//! shown in `/api/sources`. A removed file removes its objects.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;

use crate::api::{AccessRule, MeshService};
use crate::index::{IndexObject, convert};

use super::SourceStatuses;

/// Index source name of manifests.
pub const SOURCE: &str = "config";

/// One problem in a manifest file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    /// The file.
    pub file: String,
    /// 1-based document number within the file.
    pub document: usize,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// `Kind name` of the document, when it got that far.
    pub object: Option<String>,
    /// The field, e.g. `spec.ports[0].port`.
    pub field: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        write!(f, ": document {}", self.document)?;
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Splits a multi-document YAML text into `(first line number, text)` per document.
fn split_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = Vec::new();
    let mut current = String::new();
    let mut start = 1;
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") || line == "..." {
            docs.push((start, std::mem::take(&mut current)));
            start = i + 2;
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    docs.push((start, current));
    docs.into_iter()
        .filter(|(_, d)| {
            d.lines()
                .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        })
        .collect()
}

/// Parses the manifests of one file into index objects.
pub fn parse_manifests(file: &str, text: &str) -> Result<Vec<IndexObject>, Vec<ManifestError>> {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (n, (first_line, doc)) in split_documents(text).into_iter().enumerate() {
        match parse_document(file, n + 1, first_line, &doc) {
            Ok(o) => objects.push(o),
            Err(e) => errors.push(e),
        }
    }
    if errors.is_empty() {
        Ok(objects)
    } else {
        Err(errors)
    }
}

fn parse_document(
    file: &str,
    document: usize,
    first_line: usize,
    doc: &str,
) -> Result<IndexObject, ManifestError> {
    let error =
        |line: Option<usize>, object: Option<String>, field: Option<String>, message: String| {
            ManifestError {
                file: file.to_string(),
                document,
                line,
                object,
                field,
                message,
            }
        };
    let value: serde_norway::Value = serde_norway::from_str(doc).map_err(|e| {
        let line = e.location().map(|l| first_line + l.line() - 1);
        error(line, None, None, format!("invalid YAML: {e}"))
    })?;
    let text_field = |key: &str| value.get(key).and_then(|v| v.as_str()).map(str::to_string);
    let api_version = text_field("apiVersion");
    let kind = text_field("kind");
    let name = value
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let object = kind
        .as_ref()
        .map(|k| format!("{k} {}", name.as_deref().unwrap_or("<unnamed>")));
    let expected = format!("{}/{}", crate::api::GROUP, crate::api::VERSION);
    if api_version.as_deref() != Some(expected.as_str()) {
        return Err(error(
            Some(first_line),
            object,
            Some("apiVersion".into()),
            format!(
                "expected {expected:?}, found {:?}",
                api_version.unwrap_or_default()
            ),
        ));
    }
    // Zero-padded so that document 10 sorts after document 2 when claims compete.
    let precedence = format!("{file}#{document:06}");
    let label = format!("{file}#{document}");
    match kind.as_deref() {
        Some("MeshService") => {
            let obj: MeshService = typed(doc, first_line)
                .map_err(|(line, field, msg)| error(line, object.clone(), field, msg))?;
            // A plan's progress lives in the MeshService's status, which only a Kubernetes
            // object has: here it would never start.
            let plan = obj
                .spec
                .migration
                .as_ref()
                .is_some_and(|m| !m.steps.is_empty())
                .then(|| convert::FieldError {
                    field: "spec.migration.steps".into(),
                    message: "a plan needs its MeshService in Kubernetes (the status records its progress); in a manifest directory set spec.migration.weight by hand".into(),
                });
            convert::mesh_service(&obj, precedence)
                .and_then(|d| match plan.clone() {
                    Some(e) => Err(vec![e]),
                    None => Ok(d),
                })
                .map(IndexObject::Service)
                .map_err(|mut errs| {
                    if let Some(e) = plan.filter(|e| !errs.contains(e)) {
                        errs.push(e);
                    }
                    field_errors(&error, object.clone(), errs, doc, first_line)
                })
        }
        Some("AccessRule") => {
            let obj: AccessRule = typed(doc, first_line)
                .map_err(|(line, field, msg)| error(line, object.clone(), field, msg))?;
            convert::access_rule(&obj, label)
                .map(IndexObject::Access)
                .map_err(|errs| field_errors(&error, object.clone(), errs, doc, first_line))
        }
        other => Err(error(
            Some(first_line),
            object,
            Some("kind".into()),
            format!(
                "expected MeshService or AccessRule, found {:?}",
                other.unwrap_or_default()
            ),
        )),
    }
}

fn field_errors(
    error: &impl Fn(Option<usize>, Option<String>, Option<String>, String) -> ManifestError,
    object: Option<String>,
    errs: Vec<convert::FieldError>,
    doc: &str,
    first_line: usize,
) -> ManifestError {
    let first = errs.first().map(|e| e.field.clone());
    let line = first
        .as_deref()
        .and_then(|f| locate_field(doc, f))
        .map(|l| first_line + l);
    let message = errs
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    let mut e = error(line, object, None, message);
    if errs.len() == 1 {
        e.field = first;
        e.message = errs[0].message.clone();
    }
    e
}

/// Finds the line (0-based, within `doc`) of a field path such as `spec.ports[1].port`, for
/// errors found after parsing. Follows block and flow YAML the way manifests are written;
/// `None` when unsure.
pub fn locate_field(doc: &str, field: &str) -> Option<usize> {
    let lines: Vec<&str> = doc.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let mut pos = 0usize;
    let mut parent: Option<usize> = None; // indentation of the current node
    let mut same_line_ok = false;
    for token in field.split('.').flat_map(|part| {
        let mut out = Vec::new();
        let mut rest = part;
        if let Some(i) = rest.find('[') {
            out.push(rest[..i].to_string());
            rest = &rest[i..];
            while let Some(end) = rest.find(']') {
                out.push(rest[..=end].to_string());
                rest = &rest[end + 1..];
            }
        } else {
            out.push(rest.to_string());
        }
        out.into_iter().filter(|t| !t.is_empty())
    }) {
        if let Some(n) = token.strip_prefix('[').and_then(|t| t.strip_suffix(']')) {
            let n: usize = n.parse().ok()?;
            let line = lines[pos];
            if line.contains('[') {
                // `key: [a, b]`: the item is on this line.
                same_line_ok = true;
                continue;
            }
            let mut count = 0;
            let mut item_indent = None;
            let mut found = None;
            for (i, l) in lines.iter().enumerate().skip(pos + 1) {
                let t = l.trim_start();
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                if parent.is_some_and(|p| indent(l) < p) {
                    break;
                }
                if t.starts_with("- ") || t == "-" {
                    let ind = indent(l);
                    if *item_indent.get_or_insert(ind) == ind {
                        if count == n {
                            found = Some(i);
                            break;
                        }
                        count += 1;
                    }
                }
            }
            pos = found?;
            parent = Some(indent(lines[pos]));
            same_line_ok = true;
        } else {
            let key = format!("{token}:");
            let mut found = None;
            let start = if same_line_ok || lines[pos].contains('{') {
                pos
            } else {
                pos + usize::from(parent.is_some())
            };
            for (i, l) in lines.iter().enumerate().skip(start) {
                let t = l.trim_start().trim_start_matches("- ");
                if i > pos && parent.is_some_and(|p| indent(l) <= p) && !t.is_empty() {
                    break;
                }
                let flow_hit = l.contains(&format!("{{{key}"))
                    || l.contains(&format!(", {key}"))
                    || l.contains(&format!("{{ {key}"));
                if t.starts_with(&key) || flow_hit {
                    found = Some(i);
                    break;
                }
            }
            pos = found?;
            parent = Some(indent(lines[pos]));
            same_line_ok = false;
        }
    }
    Some(pos)
}

/// Deserializes a document, reporting the line and field path of the first problem.
fn typed<T: DeserializeOwned>(
    doc: &str,
    first_line: usize,
) -> Result<T, (Option<usize>, Option<String>, String)> {
    let de = serde_norway::Deserializer::from_str(doc);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let line = inner.location().map(|l| first_line + l.line() - 1);
        let message = inner.to_string();
        // serde_norway appends " at line X column Y"; the line is reported separately.
        let message = message
            .split(" at line ")
            .next()
            .unwrap_or(&message)
            .to_string();
        (line, (path != ".").then_some(path), message)
    })
}

/// Lists manifest files under `dir` (`.yaml`/`.yml`, hidden entries skipped, at most four
/// levels deep), sorted.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, depth: usize, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
                continue;
            }
            let path = entry.path();
            let meta = std::fs::metadata(&path)?;
            if meta.is_dir() {
                if depth < 4 {
                    walk(&path, depth + 1, out)?;
                }
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out)?;
    out.sort();
    Ok(out)
}

/// Whether a file changed in the last [`SETTLE`], so it may be half written.
fn recently_modified(meta: &std::fs::Metadata) -> bool {
    meta.modified()
        .ok()
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .is_some_and(|age| age < SETTLE)
}

/// Whether a file's data or metadata changed in the last [`SETTLE`] (change time).
fn recently_changed(meta: &std::fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    let changed = UNIX_EPOCH + Duration::new(meta.ctime().max(0) as u64, meta.ctime_nsec() as u32);
    SystemTime::now()
        .duration_since(changed)
        .map_or(true, |age| age < SETTLE)
}

/// How long a file must be left alone before it is read, unless a notification said its
/// writer is done with it.
pub const SETTLE: Duration = Duration::from_millis(50);

/// At most this many paths are remembered as "written completely" between two scans; beyond
/// that they are read after [`SETTLE`] like any other.
const MAX_COMPLETE_HINTS: usize = 10_000;

struct FileState {
    hash: u64,
    stamp: Option<FileStamp>,
    errors: Vec<ManifestError>,
}

/// What tells that a file may have changed without reading it: device, inode, size,
/// modification and change time (of the file a symlink points to).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        use std::os::unix::fs::MetadataExt;
        FileStamp {
            dev: meta.dev(),
            ino: meta.ino(),
            len: meta.len(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// The `--config-dir` source.
pub struct ConfigDirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    name: String,
    empty_once: bool,
}

/// What one scan changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanReport {
    /// Whether the index changed.
    pub changed: bool,
    /// Files currently rejected.
    pub bad_files: usize,
    /// Files left for a later scan because they may still be being written.
    pub deferred: usize,
}

impl ConfigDirSource {
    /// A source reading `dir`.
    pub fn new(dir: PathBuf) -> Self {
        let name = format!("{SOURCE}:{}", dir.display());
        ConfigDirSource {
            dir,
            files: BTreeMap::new(),
            name,
            empty_once: false,
        }
    }

    /// The source's name in `/api/sources`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every error of the files currently rejected, in file order.
    pub fn errors(&self) -> Vec<&ManifestError> {
        self.files.values().flat_map(|f| f.errors.iter()).collect()
    }

    /// Counts a file not read in this scan as still there, so what it had stays in force.
    fn keep_last_good(&self, seen: &mut HashSet<PathBuf>, path: PathBuf) {
        if self.files.contains_key(&path) {
            seen.insert(path);
        }
    }

    /// Reads the directory once and applies what changed to the index.
    pub fn scan(&mut self, index: &super::IndexHandle, statuses: &SourceStatuses) -> ScanReport {
        self.scan_with(index, statuses, &HashSet::new())
    }

    /// [`Self::scan`], reading at once the files in `complete` (their writer is known to be
    /// done: renamed into place or closed after writing) even if they changed just now.
    #[allow(clippy::too_many_lines)] // one directory pass (list, stat, read, parse, apply) over maps the steps share.
    pub fn scan_with(
        &mut self,
        index: &super::IndexHandle,
        statuses: &SourceStatuses,
        complete: &HashSet<PathBuf>,
    ) -> ScanReport {
        let mut report = ScanReport::default();
        let started = std::time::Instant::now();
        let listed = match list_files(&self.dir) {
            Ok(l) => l,
            Err(e) => {
                let msg = format!("{}: cannot read directory: {e}", self.dir.display());
                tracing::warn!(error = %msg, "config-dir scan failed; last good manifests stay in force");
                statuses.update(&self.name, |s| s.error = Some(msg));
                return report;
            }
        };
        if listed.is_empty() && !self.files.is_empty() && !self.empty_once {
            // A directory that suddenly holds nothing is more often a remount or a swap in
            // progress than a wish to empty the mesh: believe it on the second look.
            self.empty_once = true;
            tracing::warn!(dir = %self.dir.display(), "config directory is empty; keeping its manifests until the next scan confirms it");
            return report;
        }
        self.empty_once = false;
        let mut seen: HashSet<PathBuf> = HashSet::new();
        // Files left for the next scan; until the new ones among them are read, the source
        // is not synced.
        let (mut deferred, mut deferred_new) = (0, 0);
        for path in listed {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot stat manifest; keeping its last good state");
                    self.keep_last_good(&mut seen, path);
                    continue;
                }
            };
            // A stamp from a file changed in the last moments is not trusted: file times
            // move in clock ticks of several milliseconds, so a second write of the same size
            // in the same tick would leave it equal (git's "racily clean" entries).
            let stamp = (!recently_changed(&meta)).then(|| FileStamp::of(&meta));
            if stamp.is_some() && self.files.get(&path).is_some_and(|f| f.stamp == stamp) {
                seen.insert(path);
                continue;
            }
            if recently_modified(&meta) && !complete.contains(&path) {
                // Possibly still being written (not every writer renames into place): read it
                // on the next scan, and keep what it had meanwhile.
                deferred += 1;
                if !self.files.contains_key(&path) {
                    deferred_new += 1;
                }
                self.keep_last_good(&mut seen, path);
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "cannot read manifest; keeping its last good state");
                    self.keep_last_good(&mut seen, path);
                    continue;
                }
            };
            seen.insert(path.clone());
            let hash = xxhash_rust::xxh3::xxh3_64(text.as_bytes());
            if let Some(f) = self.files.get_mut(&path)
                && f.hash == hash
            {
                f.stamp = stamp;
                continue;
            }
            let key = path.display().to_string();
            let errors = match parse_manifests(&key, &text) {
                Ok(objects) => {
                    tracing::info!(file = %key, objects = objects.len(), "manifest applied");
                    report.changed |= index.apply(SOURCE, &key, objects);
                    Vec::new()
                }
                Err(errors) => {
                    for e in &errors {
                        tracing::error!(error = %e, "manifest rejected; the file's last good state stays in force");
                    }
                    errors
                }
            };
            self.files.insert(
                path,
                FileState {
                    hash,
                    stamp,
                    errors,
                },
            );
        }
        let gone: Vec<PathBuf> = self
            .files
            .keys()
            .filter(|p| !seen.contains(*p))
            .cloned()
            .collect();
        for path in gone {
            self.files.remove(&path);
            report.changed |= index.delete(SOURCE, &path.display().to_string());
            tracing::info!(file = %path.display(), "manifest file removed");
        }
        let errors: Vec<String> = self
            .files
            .values()
            .flat_map(|f| f.errors.iter().map(ToString::to_string))
            .collect();
        report.bad_files = self.files.values().filter(|f| !f.errors.is_empty()).count();
        let now = super::now_secs();
        statuses.update(&self.name, |s| {
            s.synced |= deferred_new == 0;
            s.last_sync = Some(now);
            s.error = (!errors.is_empty()).then(|| errors.join("\n"));
        });
        statuses.observe_sync(&self.name, started.elapsed());
        report.deferred = deferred;
        report
    }

    /// Watches the directory and scans it on every notification, and every `poll` in any
    /// case, forever, calling `on_change` after each scan.
    pub async fn run(
        mut self,
        poll: Duration,
        index: super::IndexHandle,
        statuses: Arc<SourceStatuses>,
        on_change: impl Fn(&ScanReport) + Send + 'static,
    ) {
        let wake = Arc::new(tokio::sync::Notify::new());
        let complete: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();
        // Dropped (and the watch removed) when the loop ends.
        let _watcher = match watch_directory(&self.dir, wake.clone(), complete.clone()) {
            Ok(w) => {
                tracing::info!(dir = %self.dir.display(), poll_ms = poll.as_millis() as u64, "watching the config directory for changes");
                Some(w)
            }
            Err(e) => {
                tracing::warn!(dir = %self.dir.display(), error = %e, poll_ms = poll.as_millis() as u64, "cannot watch the config directory; scanning it every poll interval only");
                None
            }
        };
        // The first scan (before `run`) may have left files still being written.
        let mut wait = SETTLE.min(poll);
        loop {
            tokio::select! {
                _ = wake.notified() => {}
                _ = tokio::time::sleep(wait) => {}
            }
            let hints = std::mem::take(&mut *complete.lock().unwrap_or_else(|p| p.into_inner()));
            let (source, report) = {
                let index = index.clone();
                let statuses = statuses.clone();
                match tokio::task::spawn_blocking(move || {
                    let r = self.scan_with(&index, &statuses, &hints);
                    (self, r)
                })
                .await
                {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::error!(error = %e, "config-dir scan panicked; source stopped");
                        return;
                    }
                }
            };
            self = source;
            // A file that may still be being written is looked at again once it settled.
            wait = if report.deferred > 0 {
                SETTLE.min(poll)
            } else {
                poll
            };
            on_change(&report);
        }
    }
}

/// Watches `dir` (recursively): every event wakes the scanner, and paths whose writer is
/// done with them (renamed into place, closed after writing) are remembered in `complete`.
fn watch_directory(
    dir: &Path,
    wake: Arc<tokio::sync::Notify>,
    complete: Arc<Mutex<HashSet<PathBuf>>>,
) -> notify::Result<notify::RecommendedWatcher> {
    use notify::Watcher as _;
    use notify::event::{AccessKind, AccessMode, EventKind, ModifyKind, RenameMode};
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let event = match event {
            Ok(e) => e,
            // A rescan finds whatever a lost event was about.
            Err(_) => {
                wake.notify_one();
                return;
            }
        };
        let done = match event.kind {
            // Reading a file or listing the directory (what a scan does) changes nothing:
            // waking on it would scan forever.
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => event.paths.len(),
            EventKind::Access(_) => return,
            // The last path of a rename is where the file now is.
            EventKind::Modify(ModifyKind::Name(RenameMode::To | RenameMode::Both)) => 1,
            _ => 0,
        };
        if done > 0 {
            let mut set = complete.lock().unwrap_or_else(|p| p.into_inner());
            if set.len() < MAX_COMPLETE_HINTS {
                set.extend(event.paths.iter().rev().take(done).cloned());
            }
        }
        wake.notify_one();
    })?;
    watcher.watch(dir, notify::RecursiveMode::Recursive)?;
    Ok(watcher)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORDERS: &str = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: orders}\nspec:\n  endpoints: [{address: 10.0.0.1, port: 80}]\n";

    fn settled_write(path: &Path, text: &str) {
        std::fs::write(path, text).unwrap();
        let past = SystemTime::now() - Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(past)
            .unwrap();
    }

    #[test]
    fn bad_files_keep_their_last_good_state_and_removed_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.yaml");
        settled_write(&file, ORDERS);
        settled_write(
            &dir.path().join("b.yaml"),
            &ORDERS.replace("orders", "billing"),
        );
        let index = crate::sources::IndexHandle::new();
        let statuses = SourceStatuses::default();
        let mut source = ConfigDirSource::new(dir.path().to_path_buf());
        statuses.register(source.name(), "config");
        assert!(source.scan(&index, &statuses).changed);
        assert_eq!(index.read(|i| i.state()).services.len(), 2);

        settled_write(&file, &ORDERS.replace("port: 80", "port: 0"));
        let report = source.scan(&index, &statuses);
        assert_eq!(
            report,
            ScanReport {
                changed: false,
                bad_files: 1,
                deferred: 0,
            }
        );
        let state = index.read(|i| i.state());
        assert_eq!(
            state.services["orders"].endpoints[0].port, 80,
            "last good state in force"
        );
        let error = statuses.list()[0].error.clone().unwrap();
        assert!(
            error.contains("a.yaml:5: document 1 (MeshService orders): spec.endpoints[0].port"),
            "{error}"
        );

        // A host name where an IP address belongs is refused, naming the field.
        settled_write(
            &file,
            &ORDERS
                .replace("port: 80", "port: 81")
                .replace("address: 10.0.0.1", "address: orders.example.internal"),
        );
        assert_eq!(source.scan(&index, &statuses).bad_files, 1);
        let error = statuses.list()[0].error.clone().unwrap();
        assert!(
            error.contains(
                "spec.endpoints[0].address: \"orders.example.internal\" is not an IP address"
            ),
            "{error}"
        );
        assert_eq!(
            index.read(|i| i.state()).services["orders"].endpoints[0].port,
            80,
            "last good state in force"
        );

        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        assert!(source.scan(&index, &statuses).changed);
        assert!(!index.read(|i| i.state()).services.contains_key("billing"));
    }

    #[test]
    fn an_emptied_directory_is_believed_on_the_second_scan() {
        let dir = tempfile::tempdir().unwrap();
        settled_write(&dir.path().join("a.yaml"), ORDERS);
        let index = crate::sources::IndexHandle::new();
        let statuses = SourceStatuses::default();
        let mut source = ConfigDirSource::new(dir.path().to_path_buf());
        source.scan(&index, &statuses);
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        assert!(
            !source.scan(&index, &statuses).changed,
            "first empty scan is not trusted"
        );
        assert_eq!(index.read(|i| i.state()).services.len(), 1);
        assert!(source.scan(&index, &statuses).changed);
        assert!(index.read(|i| i.state()).services.is_empty());
    }

    #[test]
    fn a_plan_in_a_manifest_is_refused_and_a_weight_by_hand_is_taken() {
        let plan = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: orders}\nspec:\n  migration: {to: kubernetes, steps: [5, 50]}\n";
        let errs = parse_manifests("m.yaml", plan).unwrap_err();
        let text = errs[0].to_string();
        assert!(
            text.contains("spec.migration.steps: a plan needs its MeshService in Kubernetes"),
            "{text}"
        );
        let by_hand = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: orders}\nspec:\n  migration: {to: kubernetes, weight: 30}\n";
        assert!(parse_manifests("m.yaml", by_hand).is_ok());
        let both = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: orders}\nspec:\n  migration: {to: kubernetes, weight: 300, steps: [5]}\n";
        let text = parse_manifests("m.yaml", both).unwrap_err()[0].to_string();
        assert!(
            text.contains("spec.migration.weight") && text.contains("spec.migration.steps"),
            "{text}"
        );
    }

    #[test]
    fn splits_documents_with_line_numbers() {
        let docs = split_documents("a: 1\n---\n# only a comment\n---\nb: 2\n");
        assert_eq!(
            docs,
            vec![(1, "a: 1\n".to_string()), (5, "b: 2\n".to_string())]
        );
    }

    #[test]
    fn errors_name_file_document_line_and_field() {
        let text = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: a}\nspec: {}\n---\napiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata:\n  name: orders\nspec:\n  ports:\n    - port: 70000\n";
        let errs = parse_manifests("dir/x.yaml", text).unwrap_err();
        assert_eq!(errs.len(), 1);
        let e = &errs[0];
        assert_eq!(e.document, 2);
        assert_eq!(e.line, Some(12));
        assert_eq!(e.field.as_deref(), Some("spec.ports[0].port"));
        let shown = e.to_string();
        assert!(
            shown
                .starts_with("dir/x.yaml:12: document 2 (MeshService orders): spec.ports[0].port:"),
            "{shown}"
        );
    }

    #[test]
    fn locates_fields_in_block_and_flow_yaml() {
        let doc = "kind: X\nspec:\n  ports:\n    - port: 1\n    - name: b\n      port: 2\n  endpoints:\n    - {address: a, port: 3}\n    - {address: b, port: 4}\n  dependencies:\n    - service: x\n      retries: {attempts: 1, on: [bad]}\n";
        assert_eq!(locate_field(doc, "spec.ports[0].port"), Some(3));
        assert_eq!(locate_field(doc, "spec.ports[1].port"), Some(5));
        assert_eq!(locate_field(doc, "spec.endpoints[1].port"), Some(8));
        assert_eq!(
            locate_field(doc, "spec.dependencies[0].retries.on[0]"),
            Some(11)
        );
        assert_eq!(locate_field(doc, "spec.nothing"), None);
    }

    #[test]
    fn semantic_errors_name_the_field() {
        let text = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: a}\nspec:\n  dependencies:\n    - service: b\n      timeout: soon\n";
        let errs = parse_manifests("x.yaml", text).unwrap_err();
        assert_eq!(
            errs[0].field.as_deref(),
            Some("spec.dependencies[0].timeout"),
            "{}",
            errs[0]
        );
    }

    #[test]
    fn unknown_fields_and_kinds_are_rejected() {
        let text = "apiVersion: meshbridge.io/v1alpha1\nkind: MeshService\nmetadata: {name: a}\nspec:\n  portz: []\n";
        let errs = parse_manifests("x.yaml", text).unwrap_err();
        assert!(errs[0].message.contains("portz"), "{}", errs[0]);
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\n";
        let errs = parse_manifests("x.yaml", text).unwrap_err();
        assert_eq!(errs[0].field.as_deref(), Some("apiVersion"));
    }

    /// Runs the source with a poll interval no test waits for, so only notifications can
    /// deliver a change; returns the index it feeds.
    fn watched(dir: &Path) -> crate::sources::IndexHandle {
        watched_counting(dir).0
    }

    /// [`watched`], also counting the scans.
    fn watched_counting(
        dir: &Path,
    ) -> (
        crate::sources::IndexHandle,
        Arc<std::sync::atomic::AtomicUsize>,
    ) {
        let index = crate::sources::IndexHandle::new();
        let statuses = Arc::new(SourceStatuses::default());
        let source = ConfigDirSource::new(dir.to_path_buf());
        statuses.register(source.name(), "config");
        let scans = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = scans.clone();
        tokio::spawn(source.run(
            Duration::from_secs(3600),
            index.clone(),
            statuses,
            move |_| {
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            },
        ));
        (index, scans)
    }

    #[tokio::test]
    async fn scanning_does_not_wake_the_scanner() {
        // A scan lists the directory and reads files; if those accesses woke the scanner, it
        // would scan forever and burn a core.
        let dir = tempfile::tempdir().unwrap();
        for i in 0..20 {
            std::fs::write(
                dir.path().join(format!("s{i}.yaml")),
                ORDERS.replace("orders", &format!("s{i}")),
            )
            .unwrap();
        }
        let (index, scans) = watched_counting(dir.path());
        for _ in 0..500 {
            if index.read(|i| i.state()).services.len() == 20 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(index.read(|i| i.state()).services.len(), 20);
        let settled = scans.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let later = scans.load(std::sync::atomic::Ordering::SeqCst);
        assert!(
            later <= settled + 1,
            "an idle directory was scanned {} times in 500 ms",
            later - settled
        );
    }

    /// Waits (at most 10 s) until the index says `orders` has an endpoint on `port`.
    async fn wait_for_port(index: &crate::sources::IndexHandle, port: u16) {
        for _ in 0..500 {
            let state = index.read(|i| i.state());
            if state
                .services
                .get("orders")
                .is_some_and(|s| s.endpoints.iter().any(|e| e.port == port))
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("orders never got port {port} without a poll");
    }

    #[tokio::test]
    async fn changes_arrive_by_notification_without_waiting_for_the_poll() {
        let dir = tempfile::tempdir().unwrap();
        let index = watched(dir.path());
        // Let the first (empty) scan and the watch happen.
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Renamed into place, as editors and deployment tools write.
        let tmp = dir.path().join(".orders.yaml.tmp");
        std::fs::write(&tmp, ORDERS).unwrap();
        std::fs::rename(&tmp, dir.path().join("orders.yaml")).unwrap();
        wait_for_port(&index, 80).await;
        // Rewritten in place.
        std::fs::write(
            dir.path().join("orders.yaml"),
            ORDERS.replace("port: 80", "port: 81"),
        )
        .unwrap();
        wait_for_port(&index, 81).await;
    }

    #[tokio::test]
    async fn a_configmap_volume_swapping_its_data_symlink_is_seen() {
        // The kubelet's layout: files are symlinks through `..data`, which is itself a
        // symlink to a timestamped directory, swapped atomically by renaming `..data_tmp`.
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("..2026_12_06_01")).unwrap();
        std::fs::write(root.join("..2026_12_06_01/orders.yaml"), ORDERS).unwrap();
        std::os::unix::fs::symlink("..2026_12_06_01", root.join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/orders.yaml", root.join("orders.yaml")).unwrap();
        let index = watched(root);
        wait_for_port(&index, 80).await;

        std::fs::create_dir(root.join("..2026_12_06_02")).unwrap();
        std::fs::write(
            root.join("..2026_12_06_02/orders.yaml"),
            ORDERS.replace("port: 80", "port: 82"),
        )
        .unwrap();
        std::os::unix::fs::symlink("..2026_12_06_02", root.join("..data_tmp")).unwrap();
        std::fs::rename(root.join("..data_tmp"), root.join("..data")).unwrap();
        std::fs::remove_dir_all(root.join("..2026_12_06_01")).unwrap();
        wait_for_port(&index, 82).await;
    }
}
