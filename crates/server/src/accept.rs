//! The accept loop of `serve`: TCP connections, TLS when configured, served as HTTP/1.1 by
//! hyper, a watchdog that enforces the header read timeout and the request deadline without a
//! timer per request, and a graceful shutdown that lets requests in progress finish.
//!
//! `axum::serve` does not expose hyper's header read timeout, hence this loop. It speaks
//! HTTP/1.1 only: the header read timeout is an HTTP/1 setting, and HTTP/2 would need its own
//! defences against slow clients.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use axum::Router;
use hyper::body::Body as _;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use crate::hot::{Hot, Route};

/// The first byte of a TLS handshake record; anything else on a TLS port is not TLS.
const TLS_HANDSHAKE_RECORD: u8 = 0x16;
/// Bytes of a plain-HTTP request read (and discarded) before it is answered `400`.
const PLAIN_REQUEST_BYTES_MAX: usize = 16 * 1024;
/// How long a refused plain-HTTP client gets to read the answer before the socket closes.
const PLAIN_LINGER_MS: u64 = 1_000;

/// The answer to a plain-HTTP request on a TLS port. It is written in clear text, so it says
/// nothing but that.
const PLAIN_HTTP_ANSWER: &str = concat!(
    "HTTP/1.1 400 Bad Request\r\n",
    "content-type: application/json\r\n",
    "connection: close\r\n",
    "content-length: 90\r\n",
    "\r\n",
    r#"{"error":"invalid_request","message":"this port speaks HTTPS (TLS): use an https:// URL"}"#,
    "\n",
);

/// The answer to a connection past `max_connections` on a plain-HTTP port, written as it is
/// accepted (before any request is read), and the connection closed.
const OVER_CAPACITY_ANSWER: &str = concat!(
    "HTTP/1.1 503 Service Unavailable\r\n",
    "content-type: application/json\r\n",
    "retry-after: 1\r\n",
    "connection: close\r\n",
    "content-length: 99\r\n",
    "\r\n",
    r#"{"error":"unavailable","message":"too many connections open (max_connections): retry in a moment"}"#,
    "\n",
);

/// File descriptors kept out of the connections' reach: the store's files, its checkpoints
/// and spares, the database and span exporter's connections, the log. Without them, a flood
/// of connections made the store fail to open its next log segment, and writes stopped until
/// a restart (found by the robustness audit).
pub(crate) const RESERVED_FDS: u64 = 128;

/// The default bound's ceiling: the hard open-file limit is often 2^19 or 2^20, and each idle
/// connection costs memory (hyper's buffers) and a place the watchdog sweeps.
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 16_384;

/// Connections of the metrics listener (`metrics_listen`), kept apart from the API's: a flood
/// of the API port must not stop the scrapes.
pub(crate) const METRICS_MAX_CONNECTIONS: usize = 64;

/// Refused connections of one listener lingering at once to deliver their `503` (past it,
/// closed at once). Each holds a descriptor while it lingers: a listener takes its places and
/// these ([`descriptors_of_listener`]).
pub(crate) const REFUSALS_LINGERING_MAX: usize = 32;

/// The descriptors a listener of `places` connections may hold at once: its connections and its
/// lingering refusals. (Counting only the places let a storm of refusals on two listeners eat
/// the store's reserve, and a log rotation failed: found by the second robustness audit.)
pub(crate) fn descriptors_of_listener(places: usize) -> usize {
    places + REFUSALS_LINGERING_MAX
}

/// How long a refused connection lingers: long enough for the client to read the `503`
/// rather than be reset because its request went unread.
const REFUSAL_LINGER_MS: u64 = 200;

/// The connections open on one listener (the API's, or the metrics'), and their bound.
pub(crate) struct ConnectionBudget {
    open: AtomicUsize,
    max: usize,
    /// Refused connections still lingering ([`REFUSALS_LINGERING_MAX`]).
    lingering: Arc<AtomicUsize>,
    /// When a refusal was last logged: at most one line every 10 s.
    logged: Mutex<Option<Instant>>,
}

/// A connection's place in the budget, given back when the connection ends.
struct Place(Arc<ConnectionBudget>);

impl Drop for Place {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl ConnectionBudget {
    /// A budget of `max` connections (at least 1).
    pub(crate) fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            max: max.max(1),
            lingering: Arc::new(AtomicUsize::new(0)),
            logged: Mutex::new(None),
        })
    }

    /// The bound.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    fn take(self: &Arc<Self>) -> Option<Place> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(Place(Arc::clone(self)))
    }

    /// Refuses `tcp`: a `503` on a plain-HTTP port (a TLS port cannot say anything before
    /// its handshake), then closes it. The connection lingers a moment, reading what the
    /// client sent: closing with its request unread would reset the connection, and the
    /// client might never see the answer. At most [`REFUSALS_LINGERING_MAX`] linger at once;
    /// past that they are closed at once.
    fn refuse(&self, tcp: TcpStream, tls: bool) {
        let lingering = Arc::clone(&self.lingering);
        if tls {
            drop(tcp);
        } else if lingering.fetch_add(1, Ordering::Relaxed) < REFUSALS_LINGERING_MAX {
            tokio::spawn(async move {
                let mut tcp = tcp;
                let linger = Duration::from_millis(REFUSAL_LINGER_MS);
                let _ = tokio::time::timeout(linger, answer_and_drain(&mut tcp, OVER_CAPACITY_ANSWER, linger)).await;
                drop(tcp);
                lingering.fetch_sub(1, Ordering::Relaxed);
            });
        } else {
            lingering.fetch_sub(1, Ordering::Relaxed);
            // Too many lingering: the answer if the socket takes it at once, then the close.
            let _ = tcp.try_write(OVER_CAPACITY_ANSWER.as_bytes());
        }
        let mut logged = self.logged.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if logged.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
            *logged = Some(Instant::now());
            tracing::warn!(
                max_connections = self.max,
                "connections at max_connections: refusing new ones until some close"
            );
        }
    }
}

/// The process's open-file limits (`RLIMIT_NOFILE`), if they can be read.
fn nofile() -> Option<libc::rlimit> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `getrlimit` writes the limit into the struct it is given, nothing else.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}

/// The open-file limit of the process (soft), if it can be read and is not infinite.
pub(crate) fn open_file_limit() -> Option<u64> {
    nofile().map(|l| l.rlim_cur).filter(|&soft| soft != libc::RLIM_INFINITY)
}

/// Raises the soft open-file limit to the hard one (as Go's runtime and most servers do: the
/// soft default of 1,024 is a leftover of `select`), and returns the soft limit now in force.
pub fn raise_open_file_limit() -> Option<u64> {
    if let Some(limit) = nofile().filter(|l| l.rlim_cur < l.rlim_max) {
        let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
        // SAFETY: `setrlimit` reads the struct it is given, nothing else.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
            tracing::debug!("could not raise the open-file limit to {}", limit.rlim_max);
        }
    }
    open_file_limit()
}

/// `max_connections`: the configured bound, or the open-file limit less [`RESERVED_FDS`] and
/// `kept_apart` (the descriptors of the API listener's lingering refusals and of the metrics
/// listener), at most [`DEFAULT_MAX_CONNECTIONS`]; never more than the limit allows (a
/// configured bound above it is lowered, with a warning). With no limit to read, the default
/// is [`DEFAULT_MAX_CONNECTIONS`].
pub(crate) fn max_connections(configured: Option<usize>, open_files: Option<u64>, kept_apart: usize) -> usize {
    let reserved = RESERVED_FDS.saturating_add(kept_apart as u64);
    let allowed = open_files.map(|n| usize::try_from(n.saturating_sub(reserved)).unwrap_or(usize::MAX).max(1));
    match (configured, allowed) {
        (Some(n), Some(allowed)) if n > allowed => {
            tracing::warn!(
                "max_connections = {n} is more than the open-file limit allows ({allowed}, after {RESERVED_FDS} \
                 kept for the store); using {allowed}: raise the limit (ulimit -n, LimitNOFILE=) to allow more"
            );
            allowed
        }
        (Some(n), _) => n,
        (None, Some(allowed)) => allowed.min(DEFAULT_MAX_CONNECTIONS),
        (None, None) => DEFAULT_MAX_CONNECTIONS,
    }
}

/// How connections are served.
pub(crate) struct ConnectionConfig {
    /// TLS, when configured.
    pub tls: Option<TlsAcceptor>,
    /// How long a client may take to send a request's headers (and, with TLS, to complete
    /// the handshake). An idle keep-alive connection is closed after it too.
    pub header_read_timeout: Duration,
    /// How long a request may take, enforced by `load::layer` with the connection's clock.
    pub request_timeout: Duration,
    /// The bound on the listener's open connections.
    pub budget: Arc<ConnectionBudget>,
}

/// Serves `router` on `listener` (and `hot`, the routes it serves without the router, when
/// given) until `shutdown` completes, then stops accepting, lets each connection finish the
/// request it is serving, and returns once every connection is closed.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    hot: Option<Arc<Hot>>,
    config: ConnectionConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    // No hyper timer: the watchdog enforces the header read timeout (see [`Watchdog`]).
    let http = http1::Builder::new();
    let watchdog = Watchdog::new(config.header_read_timeout, config.request_timeout);
    let sweeper = tokio::spawn(Arc::clone(&watchdog).sweep());
    // Every connection task holds a receiver; `closed()` below waits for the last one.
    let (stop, stop_rx) = watch::channel(false);
    let mut shutdown = pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Some(place) = config.budget.take() else {
            config.budget.refuse(tcp, config.tls.is_some());
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            _place: place,
            router: router.clone(),
            hot: hot.clone(),
            http: http.clone(),
            tls: config.tls.clone(),
            header_read_timeout: config.header_read_timeout,
            clock: watchdog.register(),
            stop: stop_rx.clone(),
            peer,
        };
        tokio::spawn(connection.run(tcp));
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop.send(true);
    stop.closed().await;
    sweeper.abort();
    Ok(())
}

/// Errors of `accept` that concern one connection are skipped; others (too many open files)
/// are logged and retried after a pause, as `axum::serve` does.
async fn accept_failed(e: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    if matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "cannot accept connections; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// One accepted connection.
struct Connection {
    /// Held as long as the connection is open.
    _place: Place,
    router: Router,
    hot: Option<Arc<Hot>>,
    http: http1::Builder,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
    clock: Arc<ConnectionClock>,
    stop: watch::Receiver<bool>,
    peer: SocketAddr,
}

impl Connection {
    async fn run(mut self, tcp: TcpStream) {
        let Some(tls) = self.tls.take() else {
            return self.serve_http(TokioIo::new(tcp)).await;
        };
        let deadline = Instant::now() + self.header_read_timeout;
        let mut stop = self.stop.clone();
        let handshake = async {
            let mut first = [0u8; 1];
            match tcp.peek(&mut first).await {
                Ok(1) if first[0] != TLS_HANDSHAKE_RECORD => {
                    refuse_plain_http(tcp, deadline).await;
                    None
                }
                Ok(1) => match tls.accept(tcp).await {
                    Ok(stream) => Some(stream),
                    Err(e) => {
                        tracing::debug!(peer = %self.peer, error = %e, "TLS handshake failed");
                        None
                    }
                },
                _ => None,
            }
        };
        let stream = tokio::select! {
            done = tokio::time::timeout_at(deadline, handshake) => match done {
                Ok(Some(stream)) => stream,
                Ok(None) => return,
                Err(_) => {
                    tracing::debug!(peer = %self.peer, "TLS handshake timed out");
                    return;
                }
            },
            () = stopped(&mut stop) => return,
        };
        self.serve_http(TokioIo::new(stream)).await;
    }

    async fn serve_http<I>(self, io: I)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        // `_place` bound here: it is the connection's place in the budget until this returns.
        let Self { router, hot, http, mut stop, peer, clock, _place, .. } = self;
        // The connection's clock goes with each request (for its deadline in `load::layer`)
        // and learns when a head arrived and when its answer is out.
        let service = hyper::service::service_fn({
            let clock = Arc::clone(&clock);
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                clock.head_received();
                request.extensions_mut().insert(Arc::clone(&clock));
                let route = hot.as_ref().and_then(|_| Route::recognise(request.method(), request.uri().path()));
                let (router, hot, clock) = (router.clone(), hot.clone(), Arc::clone(&clock));
                async move {
                    let response = match (hot, route) {
                        (Some(hot), Some(route)) => hot.serve(route, request.map(Body::new)).await,
                        _ => match router.oneshot(request).await {
                            Ok(response) => response,
                            Err(never) => match never {},
                        },
                    };
                    Ok::<_, Infallible>(clock.answered(response))
                }
            }
        });
        // Waiting for the first head starts once the connection is served (after TLS).
        clock.waiting_from_now();
        let mut conn = pin!(http.serve_connection(io, service));
        let result = tokio::select! {
            result = conn.as_mut() => result,
            () = clock.close.notified() => {
                tracing::debug!(%peer, "header read timeout: closing the connection");
                return;
            }
            () = stopped(&mut stop) => {
                // Finish the request in progress (if any), then close.
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        if let Err(e) = result {
            // Header read timeouts, clients that hang up: the client's business, not an error.
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// What is left of the connection's header read deadline and request deadline: a coarse clock
/// and a sweeper task, instead of timers armed and cancelled for every request.
///
/// hyper's `header_read_timeout` and a `tokio::time::timeout` around each request put two
/// entries into Tokio's timer wheel per request (each a lock on the shared wheel and an
/// allocation); measured, each cost several percent of throughput. Here a request only stores
/// two timestamps read from a clock the sweeper advances, and the sweeper, every `tick`, closes
/// connections that have waited too long for a request's head and tells requests past their
/// deadline to give up. A deadline fires between its timeout and its timeout plus two ticks.
pub(crate) struct Watchdog {
    epoch: Instant,
    /// Milliseconds since `epoch`, advanced by the sweeper every tick.
    now_ms: AtomicU64,
    tick: Duration,
    header_read_timeout: Duration,
    request_timeout: Duration,
    connections: Mutex<Vec<Weak<ConnectionClock>>>,
}

/// "No time": not waiting for a head, or no request in progress.
const NONE_MS: u64 = u64::MAX;
/// A response body of at most this many bytes (known in advance) is written at once, so the
/// connection is waiting for the next head as soon as the response head is out. Larger or
/// streamed bodies (watch streams) keep the connection busy until they end.
const SMALL_BODY_BYTES: u64 = 64 * 1024;

impl Watchdog {
    /// A watchdog whose tick is a sixteenth of the shorter timeout (5 ms to 500 ms).
    pub(crate) fn new(header_read_timeout: Duration, request_timeout: Duration) -> Arc<Self> {
        let tick =
            (header_read_timeout.min(request_timeout) / 16).clamp(Duration::from_millis(5), Duration::from_millis(500));
        Arc::new(Self {
            epoch: Instant::now(),
            now_ms: AtomicU64::new(0),
            tick,
            header_read_timeout,
            request_timeout,
            connections: Mutex::new(Vec::new()),
        })
    }

    /// A clock for a new connection, waiting for its first request head from now.
    fn register(self: &Arc<Self>) -> Arc<ConnectionClock> {
        let clock = Arc::new(ConnectionClock {
            watchdog: Arc::clone(self),
            waiting_since_ms: AtomicU64::new(self.now_ms.load(Ordering::Relaxed)),
            request_since_ms: AtomicU64::new(NONE_MS),
            close: Notify::new(),
            expired: Notify::new(),
        });
        self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Arc::downgrade(&clock));
        clock
    }

    /// Advances the clock every tick and enforces the deadlines, until dropped (aborted).
    async fn sweep(self: Arc<Self>) {
        let mut ticks = tokio::time::interval(self.tick);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        // The clock a timestamp was read from may be a tick behind: wait one tick more.
        let header_limit_ms = ms(self.header_read_timeout + self.tick);
        let request_limit_ms = ms(self.request_timeout + self.tick);
        loop {
            ticks.tick().await;
            let now = ms(self.epoch.elapsed());
            self.now_ms.store(now, Ordering::Relaxed);
            let mut connections = self.connections.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            connections.retain(|weak| {
                let Some(clock) = weak.upgrade() else { return false };
                let waiting = clock.waiting_since_ms.load(Ordering::Relaxed);
                if waiting != NONE_MS && now.saturating_sub(waiting) >= header_limit_ms {
                    clock.close.notify_one();
                }
                let request = clock.request_since_ms.load(Ordering::Relaxed);
                if request != NONE_MS && now.saturating_sub(request) >= request_limit_ms {
                    clock.expired.notify_waiters();
                }
                true
            });
        }
    }
}

/// The deadlines of one connection, shared by its task, its requests (as a request
/// extension, for `load::layer`) and the sweeper.
pub(crate) struct ConnectionClock {
    watchdog: Arc<Watchdog>,
    /// When the connection began waiting for a request head (`NONE_MS` while serving one).
    waiting_since_ms: AtomicU64,
    /// When the request in progress began its deadline (`NONE_MS` if none, or exempt).
    request_since_ms: AtomicU64,
    /// Notified (with a permit) when the header read timeout passed: the connection closes.
    close: Notify,
    /// Notified (waiters only) while the request in progress is past its deadline.
    expired: Notify,
}

impl ConnectionClock {
    fn now_ms(&self) -> u64 {
        self.watchdog.now_ms.load(Ordering::Relaxed)
    }

    /// Starts the deadline of the request in progress; the returned future completes once it
    /// is past. Dropping the guard ends the deadline.
    pub(crate) fn start_request(self: &Arc<Self>) -> RequestDeadline {
        RequestDeadline { clock: Arc::clone(self) }
    }

    /// A request head arrived: the connection is no longer waiting for one.
    fn head_received(&self) {
        self.waiting_since_ms.store(NONE_MS, Ordering::Relaxed);
    }

    fn waiting_from_now(&self) {
        self.waiting_since_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The response is ready: the connection waits for the next head once its body is out
    /// (at once for a small body, else when the body ends or is dropped).
    fn answered(self: &Arc<Self>, response: Response) -> Response {
        if response.body().size_hint().exact().is_some_and(|n| n <= SMALL_BODY_BYTES) {
            self.waiting_from_now();
            return response;
        }
        let clock = Arc::clone(self);
        response.map(|inner| Body::new(AnswerBody { inner, clock: Some(clock) }))
    }
}

/// The deadline of one request (see [`ConnectionClock::start_request`]).
pub(crate) struct RequestDeadline {
    clock: Arc<ConnectionClock>,
}

impl RequestDeadline {
    /// Completes once the request is past its deadline. Call [`Self::arm`] on the pinned
    /// future before the request runs, so that no notification is missed.
    pub(crate) fn expired(&self) -> tokio::sync::futures::Notified<'_> {
        self.clock.expired.notified()
    }

    /// Starts the clock (after the `expired` future was enabled).
    pub(crate) fn arm(&self) {
        self.clock.request_since_ms.store(self.clock.now_ms(), Ordering::Relaxed);
    }
}

impl Drop for RequestDeadline {
    fn drop(&mut self) {
        self.clock.request_since_ms.store(NONE_MS, Ordering::Relaxed);
    }
}

/// A response body that marks its connection as waiting for the next head when it ends.
struct AnswerBody {
    inner: Body,
    clock: Option<Arc<ConnectionClock>>,
}

impl AnswerBody {
    fn done(&mut self) {
        if let Some(clock) = self.clock.take() {
            clock.waiting_from_now();
        }
    }
}

impl hyper::body::Body for AnswerBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<bytes::Bytes>, axum::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, std::task::Poll::Ready(None)) {
            self.done();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AnswerBody {
    fn drop(&mut self) {
        self.done();
    }
}

/// Completes when the server stops (or is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`: drop it here, not in the caller's future.
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Answers a plain-HTTP request on a TLS port with `400` in clear text. The request is read
/// first (up to the end of its headers), and the socket lingers briefly after the answer, so
/// that the client reads the answer instead of a connection reset.
async fn refuse_plain_http(mut tcp: TcpStream, deadline: Instant) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let read_head = async {
        while seen.len() < PLAIN_REQUEST_BYTES_MAX && !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return false,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
        true
    };
    if !matches!(tokio::time::timeout_at(deadline, read_head).await, Ok(true)) {
        return;
    }
    let _ = answer_and_drain(&mut tcp, PLAIN_HTTP_ANSWER, Duration::from_millis(PLAIN_LINGER_MS)).await;
}

/// Writes `answer`, shuts the write side, and reads (and drops) what the client still sends
/// for up to `linger`, so that the client reads the answer before the close rather than a
/// reset for an unread request.
async fn answer_and_drain(tcp: &mut TcpStream, answer: &str, linger: Duration) -> std::io::Result<()> {
    tcp.write_all(answer.as_bytes()).await?;
    tcp.shutdown().await?;
    let mut buf = [0u8; 4096];
    let drain = async { while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(linger, drain).await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed answer's `content-length` is its body's (a wrong one would hang or cut clients),
    /// and its body is the API's JSON error with `code`.
    fn assert_well_formed(answer: &str, code: &str) {
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head:?} vs {} bytes", body.len());
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], code);
    }

    #[test]
    fn the_fixed_answers_are_well_formed() {
        assert_well_formed(PLAIN_HTTP_ANSWER, gapguard_api::codes::INVALID_REQUEST);
        assert_well_formed(OVER_CAPACITY_ANSWER, gapguard_api::codes::UNAVAILABLE);
    }

    #[test]
    fn max_connections_stays_below_the_open_file_limit() {
        assert_eq!(max_connections(None, Some(1024), 0), 1024 - RESERVED_FDS as usize);
        assert_eq!(max_connections(None, Some(1024), 64), 1024 - 64 - RESERVED_FDS as usize, "less what is kept apart");
        // Serve's arithmetic: the API's refusals, and the metrics listener whole.
        let kept = REFUSALS_LINGERING_MAX + descriptors_of_listener(METRICS_MAX_CONNECTIONS);
        let places = max_connections(None, Some(512), kept);
        assert_eq!(descriptors_of_listener(places) + descriptors_of_listener(METRICS_MAX_CONNECTIONS), 512 - 128);
        assert_eq!(max_connections(Some(100), Some(1024), 0), 100, "a lower bound is kept");
        // At what the limit allows, and one past it.
        assert_eq!(max_connections(Some(896), Some(1024), 0), 896, "the most the limit allows is kept");
        assert_eq!(max_connections(Some(897), Some(1024), 0), 896, "one more is lowered");
        assert_eq!(max_connections(Some(5000), Some(1024), 0), 896, "a higher one is lowered");
        assert_eq!(max_connections(None, Some(100), 0), 1, "at least one");
        assert_eq!(max_connections(Some(7), None, 0), 7);
        // The default's ceiling, reached exactly and not passed.
        let at_ceiling = DEFAULT_MAX_CONNECTIONS as u64 + RESERVED_FDS;
        assert_eq!(max_connections(None, Some(at_ceiling), 0), DEFAULT_MAX_CONNECTIONS);
        assert_eq!(max_connections(None, Some(at_ceiling - 1), 0), DEFAULT_MAX_CONNECTIONS - 1);
        assert_eq!(max_connections(None, Some(1 << 20), 0), DEFAULT_MAX_CONNECTIONS, "the default's ceiling");
        assert_eq!(max_connections(Some(100_000), Some(1 << 20), 0), 100_000, "a configured bound may pass it");
        assert_eq!(max_connections(None, None, 0), DEFAULT_MAX_CONNECTIONS);
    }
}
