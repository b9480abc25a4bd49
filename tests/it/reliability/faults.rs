//! The fault proxy itself: each fault does what the scenarios rely on.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::faults::{Direction, Fault, FaultProxy};

/// Bound of every read and connect of these tests: far above anything the faults add.
const IO_BOUND: Duration = Duration::from_secs(10);

/// A TCP echo server on 127.0.0.1, stopped on drop.
struct Echo {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    async fn start() -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        Echo { addr, task }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    tokio::time::timeout(IO_BOUND, TcpStream::connect(addr))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("connect timed out")))
}

/// Sends `msg` and reads as many bytes back.
async fn echo(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut back = vec![0u8; msg.len()];
    tokio::time::timeout(IO_BOUND, s.read_exact(&mut back))
        .await
        .unwrap_or_else(|_| Err(std::io::Error::other("read timed out")))?;
    Ok(back)
}

/// Reads until the end of the stream or an error; what was read, and how it ended.
async fn read_to_end(s: &mut TcpStream) -> (Vec<u8>, std::io::Result<()>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(IO_BOUND, s.read(&mut buf)).await {
            Err(_) => return (got, Err(std::io::Error::other("read timed out"))),
            Ok(Ok(0)) => return (got, Ok(())),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Ok(Err(e)) => return (got, Err(e)),
        }
    }
}

#[tokio::test]
async fn latency_delays_every_chunk_by_at_least_the_latency() {
    let server = Echo::start().await;
    let proxy = FaultProxy::start(server.addr).await;
    let mut s = connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut s, b"warm").await.unwrap(), b"warm");

    let latency = Duration::from_millis(300);
    proxy.set(
        Direction::Upstream,
        Fault::Latency {
            latency,
            jitter: Duration::ZERO,
        },
    );
    proxy.set(
        Direction::Downstream,
        Fault::Latency {
            latency,
            jitter: Duration::ZERO,
        },
    );
    let started = Instant::now();
    assert_eq!(echo(&mut s, b"ping").await.unwrap(), b"ping");
    let took = started.elapsed();
    // Once each way, on the connection that was open before the fault.
    assert!(took >= latency * 2, "echo took {took:?}");
    assert_eq!(proxy.bytes(Direction::Upstream), 8);
    assert_eq!(proxy.bytes(Direction::Downstream), 8);
}

#[tokio::test]
async fn reset_peer_resets_live_and_new_connections() {
    let server = Echo::start().await;
    let proxy = FaultProxy::start(server.addr).await;
    let mut live = connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut live, b"hi").await.unwrap(), b"hi");

    proxy.set(Direction::Downstream, Fault::ResetPeer);
    let (_, ended) = read_to_end(&mut live).await;
    assert_eq!(
        ended.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset,
        "the live connection"
    );
    let mut new = connect(proxy.addr()).await.unwrap();
    let (got, ended) = read_to_end(&mut new).await;
    assert!(got.is_empty());
    assert_eq!(
        ended.unwrap_err().kind(),
        std::io::ErrorKind::ConnectionReset,
        "a new connection"
    );

    proxy.clear(Direction::Downstream);
    let mut after = connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut after, b"back").await.unwrap(), b"back");
}

#[tokio::test]
async fn disable_refuses_and_cuts_enable_accepts_again() {
    let server = Echo::start().await;
    let proxy = FaultProxy::start(server.addr).await;
    let mut live = connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut live, b"hi").await.unwrap(), b"hi");
    assert_eq!(proxy.open_connections(), 1);

    proxy.disable().await;
    let refused = connect(proxy.addr()).await.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused);
    let (got, _) = read_to_end(&mut live).await;
    assert!(got.is_empty(), "the live connection was cut: {got:?}");

    proxy.enable().await;
    let mut again = connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut again, b"again").await.unwrap(), b"again");
    assert_eq!(
        proxy.accepted(),
        2,
        "the refused connect was never accepted"
    );
}

#[tokio::test]
async fn cut_all_closes_live_connections_and_keeps_accepting() {
    let server = Echo::start().await;
    let proxy = FaultProxy::start(server.addr).await;
    let mut live = connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut live, b"hi").await.unwrap(), b"hi");

    proxy.cut_all().await;
    let (got, _) = read_to_end(&mut live).await;
    assert!(got.is_empty(), "{got:?}");
    let mut new = connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut new, b"new").await.unwrap(), b"new");
}

#[tokio::test]
async fn limit_data_closes_after_that_many_bytes() {
    let server = Echo::start().await;
    let proxy = FaultProxy::start(server.addr).await;
    proxy.set(Direction::Downstream, Fault::LimitData(10));
    let mut s = connect(proxy.addr()).await.unwrap();
    s.write_all(&[7u8; 100]).await.unwrap();
    let (got, _) = read_to_end(&mut s).await;
    assert_eq!(got, vec![7u8; 10]);
}

#[tokio::test]
async fn a_black_hole_holds_data_until_cleared_then_delivers_it() {
    let server = Echo::start().await;
    let proxy = FaultProxy::start(server.addr).await;
    let mut s = connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut s, b"hi").await.unwrap(), b"hi");

    proxy.set(Direction::Upstream, Fault::Timeout(Duration::ZERO));
    s.write_all(b"held").await.unwrap();
    let mut buf = [0u8; 4];
    let nothing = tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf)).await;
    assert!(
        nothing.is_err(),
        "data went through a black hole: {nothing:?}"
    );

    proxy.clear(Direction::Upstream);
    tokio::time::timeout(IO_BOUND, s.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"held");
}

#[tokio::test]
async fn a_timeout_closes_the_connection_after_it_elapses() {
    let server = Echo::start().await;
    let proxy = FaultProxy::start(server.addr).await;
    let after = Duration::from_millis(300);
    proxy.set(Direction::Upstream, Fault::Timeout(after));
    let started = Instant::now();
    let mut s = connect(proxy.addr()).await.unwrap();
    s.write_all(b"lost").await.unwrap();
    let (got, _) = read_to_end(&mut s).await;
    assert!(got.is_empty(), "{got:?}");
    assert!(
        started.elapsed() >= after,
        "closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn slicer_and_bandwidth_deliver_everything_in_order() {
    let server = Echo::start().await;
    let proxy = FaultProxy::start(server.addr).await;
    proxy.set(
        Direction::Upstream,
        Fault::Slicer {
            size: 3,
            delay: Duration::from_millis(1),
        },
    );
    proxy.set(
        Direction::Downstream,
        Fault::Bandwidth {
            bytes_per_sec: 2000,
        },
    );
    let msg: Vec<u8> = (0..200u8).collect();
    let mut s = connect(proxy.addr()).await.unwrap();
    let started = Instant::now();
    assert_eq!(echo(&mut s, &msg).await.unwrap(), msg);
    // 200 bytes at 2,000 bytes a second take at least a tenth of a second.
    assert!(started.elapsed() >= Duration::from_millis(100));
}

#[tokio::test]
async fn dropping_the_proxy_closes_its_connections() {
    let server = Echo::start().await;
    let proxy = FaultProxy::start(server.addr).await;
    let mut idle = connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut idle, b"hi").await.unwrap(), b"hi");
    let mut held = connect(proxy.addr()).await.unwrap();
    assert_eq!(echo(&mut held, b"hi").await.unwrap(), b"hi");
    proxy.set(Direction::Downstream, Fault::Timeout(Duration::ZERO));
    held.write_all(b"held").await.unwrap();
    let addr = proxy.addr();

    drop(proxy);
    for s in [&mut idle, &mut held] {
        let (got, ended) = read_to_end(s).await;
        assert!(got.is_empty(), "{got:?}");
        let timed_out = ended.is_err_and(|e| e.to_string() == "read timed out");
        assert!(!timed_out, "a connection outlived the proxy");
    }
    assert!(connect(addr).await.is_err(), "the proxy still listens");
}
