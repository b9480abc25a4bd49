//! A fault-injecting TCP proxy, after Toxiproxy's model
//! (<https://github.com/Shopify/toxiproxy>): a proxy on `127.0.0.1:0` forwards every
//! connection to one upstream address, and a test sets faults ("toxics") per direction —
//! upstream is client → server, downstream is server → client — at run time; a change applies
//! to live connections as well as new ones. One fault per direction at a time.
//!
//! Differences from Toxiproxy: a [`Fault::Timeout`] holds the data back instead of discarding
//! it, so once cleared the connection carries on as a TCP connection does after a partition
//! heals; [`Fault::ResetPeer`] resets the connection at once (both of its sockets), live
//! ones included.
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at a time (more are closed at once),
//! buffers of [`BUFFER`] bytes, upstream connects bounded by [`CONNECT_TIMEOUT`]; every task
//! ends when the [`FaultProxy`] is dropped.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// Most connections open at once; more are closed as soon as accepted.
pub const MAX_CONNECTIONS: usize = 256;
/// Bytes read from one side before they are written to the other.
pub const BUFFER: usize = 16 * 1024;
/// How long a connection to the upstream may take before the client's is closed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Which way data flows through the proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Client → server.
    Upstream,
    /// Server → client.
    Downstream,
}

impl Direction {
    fn index(self) -> usize {
        match self {
            Direction::Upstream => 0,
            Direction::Downstream => 1,
        }
    }
}

/// What happens to the data of one direction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Every chunk is delayed by `latency` ± up to `jitter`.
    Latency { latency: Duration, jitter: Duration },
    /// At most `bytes_per_sec` bytes a second.
    Bandwidth { bytes_per_sec: u64 },
    /// Every chunk is written in pieces of at most `size` bytes, `delay` apart.
    Slicer { size: usize, delay: Duration },
    /// Nothing gets through; the connection is closed after the duration, or held until the
    /// fault is cleared when it is zero (a black hole).
    Timeout(Duration),
    /// Connections are reset (RST, `SO_LINGER` 0) at once, new ones as soon as accepted.
    ResetPeer,
    /// The connection is closed once this many bytes went this way (counted from its start).
    LimitData(u64),
}

/// Counters of the proxy.
#[derive(Default)]
struct Counters {
    accepted: AtomicU64,
    open: AtomicUsize,
    bytes: [AtomicU64; 2],
}

/// What the acceptor task is asked to do; it answers once done.
enum Command {
    Enable(oneshot::Sender<()>),
    Disable(oneshot::Sender<()>),
    CutAll(oneshot::Sender<()>),
}

/// How a connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Both sides finished (end of stream both ways).
    Eof,
    /// Closed by the proxy (cut, timeout, data limit) or after a socket error.
    Close,
    /// Reset by the proxy.
    Reset,
}

/// The proxy; see the module documentation.
pub struct FaultProxy {
    addr: SocketAddr,
    faults: Arc<[watch::Sender<Option<Fault>>; 2]>,
    counters: Arc<Counters>,
    commands: mpsc::Sender<Command>,
    acceptor: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0`, forwarding to `upstream`, with no fault.
    pub async fn start(upstream: SocketAddr) -> FaultProxy {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
        let addr = listener.local_addr().unwrap();
        let faults = Arc::new([watch::channel(None).0, watch::channel(None).0]);
        let counters = Arc::new(Counters::default());
        let (commands, received) = mpsc::channel(8);
        let acceptor = tokio::spawn(
            Acceptor {
                addr,
                upstream,
                listener: Some(listener),
                faults: faults.clone(),
                counters: counters.clone(),
                cut: watch::channel(0).0,
                permits: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            }
            .run(received),
        );
        FaultProxy {
            addr,
            faults,
            counters,
            commands,
            acceptor,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the fault of `direction`, replacing the one it had.
    pub fn set(&self, direction: Direction, fault: Fault) {
        self.faults[direction.index()].send_replace(Some(fault));
    }

    /// Removes the fault of `direction`.
    pub fn clear(&self, direction: Direction) {
        self.faults[direction.index()].send_replace(None);
    }

    /// Sets `fault` both ways.
    pub fn set_both(&self, fault: Fault) {
        self.set(Direction::Upstream, fault.clone());
        self.set(Direction::Downstream, fault);
    }

    /// Removes the faults of both directions.
    pub fn clear_all(&self) {
        self.clear(Direction::Upstream);
        self.clear(Direction::Downstream);
    }

    /// Stops listening (new connections are refused) and closes every live connection.
    pub async fn disable(&self) {
        self.command(Command::Disable).await;
    }

    /// Listens again on the same address.
    pub async fn enable(&self) {
        self.command(Command::Enable).await;
    }

    /// Closes every live connection; new ones are still accepted.
    pub async fn cut_all(&self) {
        self.command(Command::CutAll).await;
    }

    async fn command(&self, make: fn(oneshot::Sender<()>) -> Command) {
        let (done, wait) = oneshot::channel();
        self.commands.send(make(done)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("the fault proxy did not answer within 10 s")
            .unwrap();
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Relaxed)
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.counters.open.load(Relaxed)
    }

    /// Bytes forwarded so far in `direction`.
    pub fn bytes(&self, direction: Direction) -> u64 {
        self.counters.bytes[direction.index()].load(Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        // The acceptor owns the listener and the signal every connection ends on.
        self.acceptor.abort();
    }
}

/// A listener on `addr` that can be bound again on the same port after [`FaultProxy::disable`].
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(128)
}

/// The task that owns the listener; connections end when it does (their `cut` signal closes).
struct Acceptor {
    addr: SocketAddr,
    upstream: SocketAddr,
    listener: Option<TcpListener>,
    faults: Arc<[watch::Sender<Option<Fault>>; 2]>,
    counters: Arc<Counters>,
    cut: watch::Sender<u64>,
    permits: Arc<tokio::sync::Semaphore>,
}

impl Acceptor {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        loop {
            let accept = async {
                match &self.listener {
                    Some(l) => l.accept().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                command = commands.recv() => match command {
                    None => return,
                    Some(Command::Disable(done)) => {
                        self.listener = None;
                        self.cut.send_modify(|g| *g += 1);
                        let _ = done.send(());
                    }
                    Some(Command::Enable(done)) => {
                        if self.listener.is_none() {
                            self.listener = Some(bind(self.addr).unwrap());
                        }
                        let _ = done.send(());
                    }
                    Some(Command::CutAll(done)) => {
                        self.cut.send_modify(|g| *g += 1);
                        let _ = done.send(());
                    }
                },
                accepted = accept => match accepted {
                    Ok((client, _)) => self.admit(client),
                    // Out of descriptors, or the like: try again shortly.
                    Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                },
            }
        }
    }

    fn admit(&self, client: TcpStream) {
        self.counters.accepted.fetch_add(1, Relaxed);
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return; // over the limit: closed at once
        };
        let connection = Connection {
            upstream: self.upstream,
            faults: [self.faults[0].subscribe(), self.faults[1].subscribe()],
            counters: self.counters.clone(),
            cut: self.cut.subscribe(),
        };
        self.counters.open.fetch_add(1, Relaxed);
        tokio::spawn(async move {
            connection.run(client).await;
            drop(permit);
        });
    }
}

/// One client connection and its upstream connection.
struct Connection {
    upstream: SocketAddr,
    faults: [watch::Receiver<Option<Fault>>; 2],
    counters: Arc<Counters>,
    cut: watch::Receiver<u64>,
}

impl Connection {
    async fn run(mut self, client: TcpStream) {
        let counters = self.counters.clone();
        self.forward(client).await;
        counters.open.fetch_sub(1, Relaxed);
    }

    async fn forward(&mut self, client: TcpStream) {
        let upstream = tokio::select! {
            connected = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.upstream)) => {
                match connected {
                    Ok(Ok(s)) => s,
                    _ => return,
                }
            }
            _ = self.cut.changed() => return,
        };
        let (mut client_read, mut client_write) = client.into_split();
        let (mut upstream_read, mut upstream_write) = upstream.into_split();
        let [up_faults, down_faults] = &mut self.faults;
        let end = {
            let up = pump(
                &mut client_read,
                &mut upstream_write,
                up_faults,
                &self.counters.bytes[0],
            );
            let down = pump(
                &mut upstream_read,
                &mut client_write,
                down_faults,
                &self.counters.bytes[1],
            );
            tokio::pin!(up, down);
            let (mut up_done, mut down_done) = (false, false);
            loop {
                tokio::select! {
                    end = &mut up, if !up_done => {
                        up_done = true;
                        if end != End::Eof { break end; }
                    }
                    end = &mut down, if !down_done => {
                        down_done = true;
                        if end != End::Eof { break end; }
                    }
                    _ = self.cut.changed() => break End::Close,
                }
                if up_done && down_done {
                    break End::Eof;
                }
            }
        };
        // Whole sockets again: dropping a write half alone would send FIN before a reset.
        let (Ok(client), Ok(upstream)) = (
            client_read.reunite(client_write),
            upstream_read.reunite(upstream_write),
        ) else {
            return;
        };
        if end == End::Reset {
            let _ = client.set_zero_linger();
            let _ = upstream.set_zero_linger();
        }
    }
}

/// Forwards `src` to `dst` under the faults of this direction until the end of the stream, an
/// error, or a fault that ends the connection.
async fn pump(
    src: &mut OwnedReadHalf,
    dst: &mut OwnedWriteHalf,
    faults: &mut watch::Receiver<Option<Fault>>,
    bytes: &AtomicU64,
) -> End {
    let mut buf = vec![0u8; BUFFER];
    let mut sent: u64 = 0;
    loop {
        if let Some(end) = hold(faults).await {
            return end;
        }
        let n = tokio::select! {
            read = src.read(&mut buf) => match read {
                Ok(0) => {
                    let _ = dst.shutdown().await;
                    return End::Eof;
                }
                Ok(n) => n,
                Err(_) => return End::Close,
            },
            // A reset or a black hole applies to a connection waiting for data too; no more
            // faults means the proxy is gone.
            changed = faults.changed() => match changed {
                Ok(()) => continue,
                Err(_) => return End::Close,
            },
        };
        // A fault set while reading applies to what was read.
        if let Some(end) = hold(faults).await {
            return end;
        }
        let fault = faults.borrow_and_update().clone();
        let (written, end) = deliver(&buf[..n], dst, fault.as_ref(), sent).await;
        sent += written as u64;
        bytes.fetch_add(written as u64, Relaxed);
        if let Some(end) = end {
            return end;
        }
    }
}

/// Waits while this direction is a black hole; `Some` when the connection must end (reset, or
/// a timeout that elapsed).
async fn hold(faults: &mut watch::Receiver<Option<Fault>>) -> Option<End> {
    let mut deadline: Option<Instant> = None;
    loop {
        let fault = faults.borrow_and_update().clone();
        match fault {
            Some(Fault::ResetPeer) => return Some(End::Reset),
            Some(Fault::Timeout(after)) => {
                let deadline = *deadline.get_or_insert_with(|| Instant::now() + after);
                let close = async {
                    if after.is_zero() {
                        std::future::pending::<()>().await;
                    }
                    tokio::time::sleep_until(deadline).await;
                };
                tokio::select! {
                    changed = faults.changed() => {
                        if changed.is_err() {
                            return Some(End::Close); // the proxy is gone
                        }
                    }
                    () = close => return Some(End::Close),
                }
            }
            _ => return None,
        }
    }
}

/// Writes `data` under `fault`; returns the bytes written and, when the connection must end
/// (write error, data limit reached), how.
async fn deliver(
    data: &[u8],
    dst: &mut OwnedWriteHalf,
    fault: Option<&Fault>,
    sent: u64,
) -> (usize, Option<End>) {
    match fault {
        Some(Fault::Latency { latency, jitter }) => {
            tokio::time::sleep(jittered(*latency, *jitter)).await;
        }
        Some(Fault::Bandwidth { bytes_per_sec }) => {
            let rate = (*bytes_per_sec).max(1);
            let piece = usize::try_from(rate / 10)
                .unwrap_or(BUFFER)
                .clamp(1, BUFFER);
            let mut written = 0;
            for chunk in data.chunks(piece) {
                if !write(dst, chunk).await {
                    return (written, Some(End::Close));
                }
                written += chunk.len();
                let secs = chunk.len() as f64 / rate as f64;
                tokio::time::sleep(Duration::from_secs_f64(secs)).await;
            }
            return (written, None);
        }
        Some(Fault::Slicer { size, delay }) => {
            let mut written = 0;
            for chunk in data.chunks((*size).max(1)) {
                if !write(dst, chunk).await {
                    return (written, Some(End::Close));
                }
                written += chunk.len();
                tokio::time::sleep(*delay).await;
            }
            return (written, None);
        }
        Some(Fault::LimitData(limit)) => {
            let room = usize::try_from(limit.saturating_sub(sent)).unwrap_or(usize::MAX);
            let piece = &data[..data.len().min(room)];
            let ok = write(dst, piece).await;
            let done = !ok || piece.len() == room;
            return (piece.len(), done.then_some(End::Close));
        }
        Some(Fault::Timeout(_) | Fault::ResetPeer) | None => {}
    }
    if write(dst, data).await {
        (data.len(), None)
    } else {
        (0, Some(End::Close))
    }
}

/// Whether `piece` was written whole.
async fn write(dst: &mut OwnedWriteHalf, piece: &[u8]) -> bool {
    dst.write_all(piece).await.is_ok()
}

/// `latency` moved by a pseudo-random amount of at most `jitter` either way (not below zero).
fn jittered(latency: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return latency;
    }
    static STATE: AtomicU64 = AtomicU64::new(0x9E37_79B9_7F4A_7C15);
    // xorshift64: enough to spread delays; no need for a random number crate.
    let mut x = STATE.load(Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    STATE.store(x, Relaxed);
    let span = jitter.as_nanos().saturating_mul(2).max(1);
    let offset = u128::from(x) % (span + 1);
    let nanos = (latency.as_nanos() + offset).saturating_sub(jitter.as_nanos());
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}
