//! End to end: `CONNECT` through the egress listener of a real Envoy (what an application
//! with `HTTPS_PROXY=http://127.0.0.1:EGRESS` sends) to a local TLS server declared as an
//! external `https://` domain; the client's TLS runs end to end through the tunnel. A
//! `CONNECT` to anything else is refused.

use crate::support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use support::fixtures::{Fixture, MeshService, manifests};
use support::{Backend, ControlPlane, Envoy, EnvoyOptions, eventually};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// An HTTPS server on 127.0.0.1 presenting `{name}.pem` (for `localhost`), answering every
/// request `hello over tls: METHOD PATH`; counts the TLS sessions it completed.
struct TlsServer {
    port: u16,
    sessions: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl TlsServer {
    async fn start(dir: &Path, name: &str) -> TlsServer {
        let chain = CertificateDer::pem_file_iter(dir.join(format!("{name}.pem")))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sessions = Arc::new(AtomicUsize::new(0));
        let counted = sessions.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    counted.fetch_add(1, Ordering::SeqCst);
                    let Ok(head) = read_head(&mut tls).await else {
                        return;
                    };
                    let line = head.lines().next().unwrap_or_default();
                    let mut parts = line.split(' ');
                    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
                    let body = format!("hello over tls: {method} {path}\n");
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = tls.write_all(response.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        TlsServer {
            port,
            sessions,
            task,
        }
    }

    fn sessions(&self) -> usize {
        self.sessions.load(Ordering::SeqCst)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads a request or response head, byte by byte so that nothing after it (the tunnel's
/// first bytes) is consumed.
async fn read_head<S: AsyncRead + Unpin>(stream: &mut S) -> std::io::Result<String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        if stream.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("head too long"));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// A `CONNECT` answer: the status, the `x-meshbridge-reason` header, and the stream (the
/// tunnel after a 200).
struct Connected {
    status: u16,
    reason: Option<String>,
    stream: TcpStream,
}

/// Sends `CONNECT authority` to the egress listener and reads the answer's head.
async fn connect(envoy: &Envoy, authority: &str) -> std::io::Result<Connected> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut stream = TcpStream::connect(envoy.egress_addr()).await?;
        stream
            .write_all(
                format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes(),
            )
            .await?;
        let head = read_head(&mut stream).await?;
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad answer {head:?}")))?;
        let reason = head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("x-meshbridge-reason")
                .then(|| v.trim().to_string())
        });
        Ok(Connected {
            status,
            reason,
            stream,
        })
    })
    .await
    .unwrap_or_else(|_| Err(std::io::Error::other("CONNECT timed out")))
}

/// The rest of a refused `CONNECT`'s answer (its body), read until Envoy closes.
async fn body_of(mut refused: Connected) -> String {
    let mut body = Vec::new();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        refused.stream.read_to_end(&mut body),
    )
    .await;
    String::from_utf8_lossy(&body).into_owned()
}

/// A GET for `path` over TLS inside `tunnel`, verifying the server's certificate for
/// `localhost` against `ca` only; the whole answer.
async fn get_over_tls<S>(tunnel: S, ca: &Path, path: &str) -> String
where
    S: AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut tls = connector
            .connect(ServerName::try_from("localhost").unwrap(), tunnel)
            .await
            .expect("TLS handshake with the server through the tunnel");
        tls.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
        let mut answer = Vec::new();
        // The server closes after answering (with or without close_notify).
        let _ = tls.read_to_end(&mut answer).await;
        String::from_utf8_lossy(&answer).into_owned()
    })
    .await
    .expect("no answer through the tunnel")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_tunnels_to_a_declared_https_domain_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    support::issue_cert(dir.path(), "ext", "DNS:localhost");
    let ca = dir.path().join("ext-ca.pem");
    let server = TlsServer::start(dir.path(), "ext").await;
    let orders = Backend::start("orders", "a").await;
    let other_port = support::free_port();

    let frontend = MeshService::build("frontend")
        .domain(&format!("https://localhost:{}", server.port))
        .domain("http://legacy.example.com:8080")
        .dependency("orders");
    let orders_service = MeshService::build("orders").endpoint("127.0.0.1", orders.port);
    let docs: Vec<&dyn Fixture> = vec![&frontend, &orders_service];
    // The proxies trust the test CA for the https domain (the plain-HTTP path below).
    let cp = ControlPlane::start(
        &manifests(&docs),
        &["--external-ca-file", ca.to_str().unwrap()],
    )
    .await;
    let envoy = Envoy::start(
        &cp,
        EnvoyOptions {
            service: "frontend".into(),
            egress: true,
            ..Default::default()
        },
    )
    .await;

    // A tunnel: 200, then the client's own TLS with the server, certificate verified
    // against the test CA (Envoy originating TLS inside would break this handshake).
    let authority = format!("localhost:{}", server.port);
    let tunnel = eventually(Duration::from_secs(20), "CONNECT answered 200", || async {
        connect(&envoy, &authority)
            .await
            .ok()
            .filter(|c| c.status == 200)
    })
    .await;
    let answer = get_over_tls(tunnel.stream, &ca, "/through-the-tunnel").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.contains("hello over tls: GET /through-the-tunnel"),
        "{answer}"
    );
    assert_eq!(server.sessions(), 1);

    // The host in any case names the same domain.
    let upper = connect(&envoy, &format!("LOCALHOST:{}", server.port))
        .await
        .unwrap();
    assert_eq!(upper.status, 200);
    let answer = get_over_tls(upper.stream, &ca, "/upper").await;
    assert!(answer.contains("hello over tls: GET /upper"), "{answer}");

    // Plain HTTP to the same domain still works: Envoy originates the TLS then.
    let plain = envoy.call(&authority, "/plain").await.unwrap();
    assert_eq!(plain.status, 200, "{}", plain.body);
    assert_eq!(plain.body, "hello over tls: GET /plain\n");
    let sessions = server.sessions();

    // Refused: an undeclared host (whatever its port), the declared host at another port,
    // an http:// domain, a mesh service. None reaches anything.
    for (authority, reason) in [
        ("undeclared.example.com:443", "undeclared-dependency"),
        ("127.0.0.1:443", "undeclared-dependency"),
        (&format!("localhost:{other_port}"), "undeclared-tunnel"),
        ("legacy.example.com:8080", "undeclared-tunnel"),
        ("orders:8080", "undeclared-tunnel"),
    ] {
        let refused = connect(&envoy, authority).await.unwrap();
        assert_eq!(refused.status, 403, "CONNECT {authority}");
        assert_eq!(
            refused.reason.as_deref(),
            Some(reason),
            "CONNECT {authority}"
        );
        let body = body_of(refused).await;
        assert!(
            body.starts_with("meshbridge: "),
            "CONNECT {authority}: {body}"
        );
        if reason == "undeclared-dependency" {
            // Names what may be tunnelled.
            assert!(
                body.contains(&format!("[{}]", authority_of(server.port))),
                "{body}"
            );
        }
    }
    assert_eq!(
        server.sessions(),
        sessions,
        "a refused CONNECT reached the server"
    );

    // A real client: curl with HTTPS_PROXY semantics, when it is installed.
    if let Ok(out) = std::process::Command::new("curl")
        .args(["--silent", "--show-error", "--max-time", "10"])
        .args(["--proxy", &format!("http://{}", envoy.egress_addr())])
        .arg("--cacert")
        .arg(&ca)
        .arg(format!("https://localhost:{}/curl", server.port))
        .output()
    {
        assert!(
            out.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "hello over tls: GET /curl\n"
        );
    }
}

/// `CONNECT authority` over HTTP/2 (prior knowledge, as an HTTP/2 client of the egress
/// listener sends it): the status, and on `200` the tunnel as a byte stream (an in-memory
/// pipe pumped to and from the HTTP/2 stream).
async fn connect_h2(envoy: &Envoy, authority: &str) -> (u16, Option<tokio::io::DuplexStream>) {
    // Status 0: the listener is not there (yet), or does not speak HTTP/2.
    let Ok(tcp) = TcpStream::connect(envoy.egress_addr()).await else {
        return (0, None);
    };
    let Ok((client, connection)) = h2::client::handshake(tcp).await else {
        return (0, None);
    };
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let Ok(mut client) = client.ready().await else {
        return (0, None);
    };
    let request = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority)
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), response)
        .await
        .expect("no answer to CONNECT over HTTP/2")
        .unwrap();
    let status = response.status().as_u16();
    if status != 200 {
        return (status, None);
    }
    let mut recv = response.into_body();
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    let (mut from_client, mut to_client) = tokio::io::split(theirs);
    tokio::spawn(async move {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = send.send_data(bytes::Bytes::new(), true);
                    return;
                }
                Ok(n) => {
                    if send
                        .send_data(bytes::Bytes::copy_from_slice(&buf[..n]), false)
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        while let Some(Ok(chunk)) = recv.data().await {
            let _ = recv.flow_control().release_capacity(chunk.len());
            if to_client.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to_client.shutdown().await;
    });
    (status, Some(ours))
}

/// The same tunnel over HTTP/2: a client speaking HTTP/2 to the egress listener sends
/// `CONNECT` on a stream; the declared domain is tunnelled, an undeclared one refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_over_http2_tunnels_to_a_declared_https_domain() {
    let dir = tempfile::tempdir().unwrap();
    support::issue_cert(dir.path(), "ext", "DNS:localhost");
    let ca = dir.path().join("ext-ca.pem");
    let server = TlsServer::start(dir.path(), "ext").await;
    let frontend =
        MeshService::build("frontend").domain(&format!("https://localhost:{}", server.port));
    let cp = ControlPlane::start(&manifests(&[&frontend]), &[]).await;
    let envoy = Envoy::start(&cp, EnvoyOptions::caller("frontend")).await;
    let authority = authority_of(server.port);
    let tunnel = eventually(Duration::from_secs(20), "CONNECT over HTTP/2", || async {
        match connect_h2(&envoy, &authority).await {
            (200, tunnel) => tunnel,
            _ => None,
        }
    })
    .await;
    let answer = get_over_tls(tunnel, &ca, "/over-h2").await;
    assert!(answer.contains("hello over tls: GET /over-h2"), "{answer}");
    let (status, _) = connect_h2(&envoy, "undeclared.example.com:443").await;
    assert_eq!(status, 403);
}

fn authority_of(port: u16) -> String {
    format!("localhost:{port}")
}
