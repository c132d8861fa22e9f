//! A small TCP proxy between the actors and the server, with faults in the spirit of
//! Toxiproxy's toxics: `latency` (each chunk delayed, both ways), `reset_peer` (a request is
//! forwarded, then the client's connection is reset before the answer reaches it: a lost
//! response) and `timeout` (a request is held, never forwarded, and the connection closed
//! after a while). Its upstream can be switched, which is how actors follow an embedded server
//! that was killed and restarted on another port.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};

use crate::delay::parse_ms;
use crate::GamedayError;

/// Bytes read at a time; one HTTP/1.1 request of an actor fits in one chunk.
const CHUNK_BYTES: usize = 64 * 1024;

/// The toxics of the proxy (`--net latency=20ms,jitter=5ms,reset=0.02,timeout=0.01`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct NetworkFaults {
    /// Added to every chunk, both ways, in ms.
    pub latency_ms: f64,
    /// Up to this much more (uniform), in ms.
    pub jitter_ms: f64,
    /// Probability that a request is forwarded and its connection then reset before the
    /// answer gets back.
    pub reset_probability: f64,
    /// Probability that a request is held and its connection closed after `timeout_ms`.
    pub timeout_probability: f64,
    /// How long a held request waits before its connection is closed, in ms.
    pub timeout_ms: f64,
}

impl NetworkFaults {
    /// Whether any toxic is on.
    pub fn any(&self) -> bool {
        self.latency_ms > 0.0 || self.jitter_ms > 0.0 || self.reset_probability > 0.0 || self.timeout_probability > 0.0
    }
}

impl FromStr for NetworkFaults {
    type Err = GamedayError;

    fn from_str(spec: &str) -> Result<Self, Self::Err> {
        let invalid = |reason: String| GamedayError::InvalidNetwork { spec: spec.to_owned(), reason };
        let mut faults = Self { timeout_ms: 500.0, ..Self::default() };
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, value) = part.split_once('=').ok_or_else(|| invalid(format!("{part:?} is not NAME=VALUE")))?;
            let probability = |value: &str| match value.trim().parse::<f64>() {
                Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
                _ => Err(invalid(format!("{name}: {value:?} is not a probability between 0 and 1"))),
            };
            match name.trim() {
                "latency" => faults.latency_ms = parse_ms(value).map_err(invalid)?,
                "jitter" => faults.jitter_ms = parse_ms(value).map_err(invalid)?,
                "reset" => faults.reset_probability = probability(value)?,
                "timeout" => faults.timeout_probability = probability(value)?,
                "timeout_after" => faults.timeout_ms = parse_ms(value).map_err(invalid)?,
                other => {
                    return Err(invalid(format!(
                        "unknown toxic {other:?} (latency, jitter, reset, timeout, timeout_after)"
                    )))
                }
            }
        }
        Ok(faults)
    }
}

impl fmt::Display for NetworkFaults {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "latency={}ms,jitter={}ms,reset={},timeout={},timeout_after={}ms",
            self.latency_ms, self.jitter_ms, self.reset_probability, self.timeout_probability, self.timeout_ms
        )
    }
}

/// What the proxy did, for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStats {
    /// Connections accepted.
    pub connections: u64,
    /// Requests forwarded whose connection was then reset (responses lost).
    pub resets: u64,
    /// Requests held and dropped.
    pub timeouts: u64,
    /// Connections that could not reach the upstream (the server was down).
    pub upstream_refused: u64,
}

#[derive(Debug, Default)]
struct Counters {
    connections: AtomicU64,
    resets: AtomicU64,
    timeouts: AtomicU64,
    upstream_refused: AtomicU64,
}

/// A running proxy; it stops when dropped.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    upstream: Arc<RwLock<SocketAddr>>,
    counters: Arc<Counters>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream` with `faults`; each
    /// connection's toxics are drawn from a generator seeded by `seed` and its number.
    pub async fn start(upstream: SocketAddr, faults: NetworkFaults, seed: u64) -> Result<Self, GamedayError> {
        let listener =
            TcpListener::bind("127.0.0.1:0").await.map_err(|e| GamedayError::io("cannot bind the gameday proxy", e))?;
        let addr = listener.local_addr().map_err(|e| GamedayError::io("the proxy's address", e))?;
        let upstream = Arc::new(RwLock::new(upstream));
        let counters = Arc::new(Counters::default());
        let task = tokio::spawn(accept_loop(listener, upstream.clone(), faults, seed, counters.clone()));
        Ok(Self { addr, upstream, counters, task })
    }

    /// Where actors connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sends new connections to `upstream` from now on.
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self.upstream.write().unwrap_or_else(|e| e.into_inner()) = upstream;
    }

    /// What it did so far.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            connections: self.counters.connections.load(Ordering::Relaxed),
            resets: self.counters.resets.load(Ordering::Relaxed),
            timeouts: self.counters.timeouts.load(Ordering::Relaxed),
            upstream_refused: self.counters.upstream_refused.load(Ordering::Relaxed),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept_loop(
    listener: TcpListener,
    upstream: Arc<RwLock<SocketAddr>>,
    faults: NetworkFaults,
    seed: u64,
    counters: Arc<Counters>,
) {
    let mut connection_idx: u64 = 0;
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let Ok((client, _)) = listener.accept().await else { continue };
        connection_idx += 1;
        counters.connections.fetch_add(1, Ordering::Relaxed);
        let target = *upstream.read().unwrap_or_else(|e| e.into_inner());
        let connection_seed = seed ^ connection_idx.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let counters = counters.clone();
        // Finished connections are reaped as new ones come; all are aborted with the proxy.
        while connections.try_join_next().is_some() {}
        connections.spawn(async move {
            let _ = client.set_nodelay(true);
            match TcpStream::connect(target).await {
                Ok(server) => {
                    let _ = server.set_nodelay(true);
                    pipe(client, server, faults, connection_seed, counters).await;
                }
                Err(_) => {
                    counters.upstream_refused.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
    }
}

async fn pipe(client: TcpStream, server: TcpStream, faults: NetworkFaults, seed: u64, counters: Arc<Counters>) {
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    let doomed = Arc::new(AtomicBool::new(false));
    let (up_rng, down_rng) = (ChaCha8Rng::seed_from_u64(seed), ChaCha8Rng::seed_from_u64(!seed));
    let mut up = tokio::spawn(upstream(client_read, server_write, faults, up_rng, doomed.clone(), counters.clone()));
    let mut down = tokio::spawn(downstream(server_read, client_write, faults, down_rng, doomed, counters));
    tokio::select! {
        _ = &mut up => down.abort(),
        _ = &mut down => up.abort(),
    }
}

fn latency(faults: &NetworkFaults, rng: &mut ChaCha8Rng) -> Duration {
    let jitter = if faults.jitter_ms > 0.0 { rng.gen_range(0.0..faults.jitter_ms) } else { 0.0 };
    Duration::from_secs_f64((faults.latency_ms + jitter) / 1000.0)
}

/// Client → server: each chunk (a request) may be delayed, held and dropped (`timeout`), or
/// forwarded with its answer doomed (`reset_peer`).
async fn upstream(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    faults: NetworkFaults,
    mut rng: ChaCha8Rng,
    doomed: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    let mut buf = vec![0; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let roll: f64 = rng.gen();
        let delay = latency(&faults, &mut rng);
        if roll < faults.timeout_probability {
            counters.timeouts.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_secs_f64(faults.timeout_ms / 1000.0)).await;
            return;
        }
        if roll < faults.timeout_probability + faults.reset_probability {
            doomed.store(true, Ordering::SeqCst);
        }
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Server → client: each chunk may be delayed; the answer to a doomed request is dropped and
/// the client's connection reset (SO_LINGER 0, so the close is an RST).
async fn downstream(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    faults: NetworkFaults,
    mut rng: ChaCha8Rng,
    doomed: Arc<AtomicBool>,
    counters: Arc<Counters>,
) {
    let mut buf = vec![0; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if doomed.load(Ordering::SeqCst) {
            counters.resets.fetch_add(1, Ordering::Relaxed);
            // A zero linger makes the close an RST and never blocks (tokio's deprecation is
            // about a non-zero linger blocking the thread on drop).
            #[allow(deprecated)]
            let _ = to.as_ref().set_linger(Some(Duration::ZERO));
            return;
        }
        let delay = latency(&faults, &mut rng);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_named() {
        let faults: NetworkFaults = "latency=20ms, jitter=5ms,reset=0.02,timeout=0.01".parse().unwrap();
        assert_eq!(faults.latency_ms, 20.0);
        assert_eq!(faults.jitter_ms, 5.0);
        assert_eq!(faults.reset_probability, 0.02);
        assert_eq!(faults.timeout_probability, 0.01);
        assert!(faults.any());
        assert_eq!(faults.to_string().parse::<NetworkFaults>().unwrap(), faults);
        for (spec, needle) in [
            ("latency=20", "needs a unit"),
            ("reset=2", "probability"),
            ("drop=0.1", "unknown toxic"),
            ("reset", "NAME=VALUE"),
        ] {
            let err = spec.parse::<NetworkFaults>().unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }

    /// A one-shot echo-like upstream: answers every chunk with `ok:` + the chunk.
    async fn upstream_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0; 1024];
                    while let Ok(n) = socket.read(&mut buf).await {
                        if n == 0 || socket.write_all(&[b"ok:", &buf[..n]].concat()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn latency_delays_and_reset_loses_the_answer_after_forwarding() {
        let upstream = upstream_server().await;
        let faults = NetworkFaults { latency_ms: 30.0, ..NetworkFaults::default() };
        let proxy = Proxy::start(upstream, faults, 1).await.unwrap();
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        let started = std::time::Instant::now();
        socket.write_all(b"hi").await.unwrap();
        let mut buf = [0; 16];
        let n = socket.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ok:hi");
        assert!(started.elapsed() >= Duration::from_millis(60), "30 ms each way: {:?}", started.elapsed());

        let always_reset = NetworkFaults { reset_probability: 1.0, ..NetworkFaults::default() };
        let proxy = Proxy::start(upstream, always_reset, 1).await.unwrap();
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        socket.write_all(b"hi").await.unwrap();
        let read = socket.read(&mut buf).await;
        assert!(matches!(read, Ok(0) | Err(_)), "the answer must not arrive: {read:?}");
        assert_eq!(proxy.stats().resets, 1);
    }

    #[tokio::test]
    async fn timeout_holds_the_request_and_closes() {
        let upstream = upstream_server().await;
        let faults = NetworkFaults { timeout_probability: 1.0, timeout_ms: 50.0, ..NetworkFaults::default() };
        let proxy = Proxy::start(upstream, faults, 1).await.unwrap();
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        let started = std::time::Instant::now();
        socket.write_all(b"hi").await.unwrap();
        let mut buf = [0; 16];
        let read = socket.read(&mut buf).await;
        assert!(matches!(read, Ok(0) | Err(_)), "no answer: {read:?}");
        assert!(started.elapsed() >= Duration::from_millis(50));
        assert_eq!(proxy.stats().timeouts, 1);
    }

    #[tokio::test]
    async fn a_switched_upstream_takes_new_connections() {
        let first = upstream_server().await;
        let proxy = Proxy::start(first, NetworkFaults::default(), 1).await.unwrap();
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        proxy.set_upstream(dead);
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        socket.write_all(b"hi").await.unwrap();
        let mut buf = [0; 16];
        assert!(matches!(socket.read(&mut buf).await, Ok(0) | Err(_)));
        proxy.set_upstream(first);
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        socket.write_all(b"hi").await.unwrap();
        let n = socket.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"ok:hi");
    }
}
