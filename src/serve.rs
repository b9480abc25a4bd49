//! HTTP/1 serving with the bounds every meshbridge HTTP port needs: at most so many open
//! connections (one more is closed at once), a time limit for the request head (a client
//! that trickles its headers is cut off), optionally one for the whole request, and TLS when
//! given an acceptor. Each request carries `ConnectInfo<SocketAddr>` of its peer.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tracing::warn;

/// The bounds of one server.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Connections open at once, at most.
    pub max_connections: usize,
    /// Time to receive a request's head (and, with TLS, to finish the handshake).
    pub header_timeout: Duration,
    /// Time for a whole request, body and answer included (none: unbounded, for
    /// long-running calls that bound themselves).
    pub request_timeout: Option<Duration>,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_connections: 512,
            header_timeout: Duration::from_secs(10),
            request_timeout: None,
        }
    }
}

/// Serves `router` on `listener` (over TLS with `tls`) until `stop` turns true, then lets
/// open connections finish their requests and returns once they are closed (the caller
/// bounds that wait). `name` names the server in logs.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    limits: HttpLimits,
    mut stop: watch::Receiver<bool>,
) {
    let router = match limits.request_timeout {
        Some(limit) => router.layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| async move {
                match tokio::time::timeout(limit, next.run(req)).await {
                    Ok(r) => r,
                    Err(_) => (
                        StatusCode::REQUEST_TIMEOUT,
                        format!("request not completed within {} ms", limit.as_millis()),
                    )
                        .into_response(),
                }
            },
        )),
        None => router,
    };
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(server = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = async { let _ = stop.wait_for(|s| *s).await; } => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!(
                server = name,
                max = limits.max_connections,
                "connection refused: too many open connections"
            );
            drop(tcp);
            continue;
        };
        let service = router.clone().layer(axum::Extension(ConnectInfo(peer)));
        let (tls, limits, mut stop) = (tls.clone(), limits.clone(), stop.clone());
        connections.spawn(async move {
            let _permit = permit;
            let service = hyper_util::service::TowerToHyperService::new(service);
            let builder = {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(limits.header_timeout);
                b
            };
            match tls {
                Some(acceptor) => {
                    let Ok(Ok(stream)) =
                        tokio::time::timeout(limits.header_timeout, acceptor.accept(tcp)).await
                    else {
                        return;
                    };
                    let conn =
                        builder.serve_connection(hyper_util::rt::TokioIo::new(stream), service);
                    drain_on_stop(conn, &mut stop).await;
                }
                None => {
                    let conn = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
                    drain_on_stop(conn, &mut stop).await;
                }
            }
        });
    }
    while connections.join_next().await.is_some() {}
}

/// Serves one connection; when `stop` turns true, finishes the request in progress and
/// closes.
async fn drain_on_stop<I, S>(
    conn: hyper::server::conn::http1::Connection<I, S>,
    stop: &mut watch::Receiver<bool>,
) where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = async { let _ = stop.wait_for(|s| *s).await; } => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: HttpLimits) -> (SocketAddr, watch::Sender<bool>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = Router::new()
            .route(
                "/",
                axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                    format!("hello {}", peer.ip())
                }),
            )
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    "late"
                }),
            );
        let (tx, rx) = watch::channel(false);
        tokio::spawn(serve("test", listener, router, None, limits, rx));
        (addr, tx)
    }

    /// Reads until the server closes the connection (at most 5 s); what it sent.
    async fn read_to_close(s: &mut tokio::net::TcpStream) -> String {
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    #[tokio::test]
    async fn a_client_trickling_its_headers_is_cut_off() {
        let (addr, _stop) = start(HttpLimits {
            header_timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
        let started = std::time::Instant::now();
        let answer = read_to_close(&mut s).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the half-sent request was kept open"
        );
        assert!(!answer.contains("hello"), "{answer}");
        // A complete request on a new connection is served, with its peer.
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert!(read_to_close(&mut s).await.contains("hello 127.0.0.1"));
    }

    #[tokio::test]
    async fn connections_beyond_the_cap_are_closed_at_once_and_the_others_served() {
        let (addr, _stop) = start(HttpLimits {
            max_connections: 2,
            ..Default::default()
        })
        .await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            // Complete and answered: the connection is open and counted.
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut buf = [0u8; 256];
            let n = s.read(&mut buf).await.unwrap();
            assert!(String::from_utf8_lossy(&buf[..n]).contains("200 OK"));
            held.push(s);
        }
        let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
        let _ = third
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await;
        assert_eq!(
            read_to_close(&mut third).await,
            "",
            "a third connection was served"
        );
        drop(held);
        // Capacity comes back once they close.
        let mut ok = None;
        for _ in 0..50 {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            let _ = s
                .write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let answer = read_to_close(&mut s).await;
            if answer.contains("hello") {
                ok = Some(answer);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(ok.is_some(), "capacity did not come back");
    }

    #[tokio::test]
    async fn a_request_over_its_time_limit_is_answered_408() {
        let (addr, _stop) = start(HttpLimits {
            request_timeout: Some(Duration::from_millis(200)),
            ..Default::default()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let answer = read_to_close(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
}
