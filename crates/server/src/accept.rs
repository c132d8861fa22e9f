//! The accept loop of `serve`: TCP connections, TLS when configured, served as HTTP/1.1 by
//! hyper with a header read timeout, and a graceful shutdown that lets requests in progress
//! finish.
//!
//! `axum::serve` does not expose hyper's header read timeout, hence this loop. It speaks
//! HTTP/1.1 only: the header read timeout is an HTTP/1 setting, and HTTP/2 would need its own
//! defences against slow clients.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::pin;
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;

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

/// How connections are served.
pub(crate) struct ConnectionConfig {
    /// TLS, when configured.
    pub tls: Option<TlsAcceptor>,
    /// How long a client may take to send a request's headers (and, with TLS, to complete
    /// the handshake). An idle keep-alive connection is closed after it too.
    pub header_read_timeout: Duration,
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting, lets each
/// connection finish the request it is serving, and returns once every connection is closed.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    config: ConnectionConfig,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new()).header_read_timeout(config.header_read_timeout);
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
        let _ = tcp.set_nodelay(true);
        let connection = Connection {
            router: router.clone(),
            http: http.clone(),
            tls: config.tls.clone(),
            header_read_timeout: config.header_read_timeout,
            stop: stop_rx.clone(),
            peer,
        };
        tokio::spawn(connection.run(tcp));
    }
    drop(listener);
    drop(stop_rx);
    let _ = stop.send(true);
    stop.closed().await;
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
    router: Router,
    http: http1::Builder,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
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
        let Self { router, http, mut stop, peer, .. } = self;
        let mut conn = pin!(http.serve_connection(io, TowerToHyperService::new(router)));
        let result = tokio::select! {
            result = conn.as_mut() => result,
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
    if tcp.write_all(PLAIN_HTTP_ANSWER.as_bytes()).await.is_err() || tcp.shutdown().await.is_err() {
        return;
    }
    let drain = async { while matches!(tcp.read(&mut buf).await, Ok(n) if n > 0) {} };
    let _ = tokio::time::timeout(Duration::from_millis(PLAIN_LINGER_MS), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plain_http_answer_has_the_right_content_length() {
        let (head, body) = PLAIN_HTTP_ANSWER.split_once("\r\n\r\n").unwrap();
        assert!(head.contains(&format!("content-length: {}", body.len())), "{head:?} vs {} bytes", body.len());
        let body: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(body["error"], gapguard_api::codes::INVALID_REQUEST);
    }
}
