//! `http-floor`: the cost of the HTTP/1.1 and JSON exchange alone, as a reference point for
//! the bench's `puts` workload.
//!
//! It takes the command line the bench gives gapguard (`serve --listen 127.0.0.1:0 …`, every
//! other argument ignored), prints `listening on ADDR` first, and serves every request as
//! gapguard serves a put, less the put itself: the same runtime (Tokio's multi-threaded
//! scheduler, a worker per CPU), allocator (mimalloc), HTTP stack (hyper's HTTP/1.1 server,
//! `TCP_NODELAY`), the body read whole and parsed as JSON, and an answer of the same headers
//! and size as a put's (`{"revision":N,"version":1}`). It stores nothing and syncs nothing. Run
//! the bench against it in gapguard's place:
//!
//! ```sh
//! cargo build --release -p gapguard-bench
//! target/release/gapguard-bench --only puts --systems gapguard,redis \
//!     --gapguard target/release/http-floor
//! ```
//!
//! The `gapguard` rows are then this floor: what any server on this stack spends per request
//! before it does any work, on the same machine and load generator as the peers.
//!
//! Started under a name ending in `-raw` (`ln -s http-floor target/release/http-floor-raw`),
//! it serves without hyper: a task per connection parses each request head with `httparse`,
//! reads the body by its `Content-Length` and writes a prepared answer with one `write`, the
//! least any HTTP/1.1 server on Tokio can do. A chunked body or an `Expect` header closes the
//! connection: it serves the bench's load generator and little more.
//! The two floors, side by side, tell what hyper costs of the exchange.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A correlation id of the length gapguard's answers carry.
const RAW_CORRELATION_ID: &str = "00000000000000000000000000000000";
const CORRELATION_ID: HeaderValue = HeaderValue::from_static(RAW_CORRELATION_ID);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) != Some("serve") {
        bail!("usage: http-floor serve [--listen ADDR] [any other gapguard serve argument, ignored]");
    }
    let listen =
        args.iter().position(|a| a == "--listen").and_then(|i| args.get(i + 1)).map_or("127.0.0.1:0", String::as_str);
    let listener = tokio::net::TcpListener::bind(listen).await.with_context(|| format!("binding {listen}"))?;
    println!("listening on {}", listener.local_addr()?);
    let raw = std::env::args().next().is_some_and(|name| name.ends_with("-raw"));
    let revision = Arc::new(AtomicU64::new(0));
    loop {
        let (tcp, _) = listener.accept().await.context("accepting")?;
        let _ = tcp.set_nodelay(true);
        let revision = revision.clone();
        if raw {
            tokio::spawn(raw_connection(tcp, revision));
            continue;
        }
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| answer(request, revision.clone()));
            let io = hyper_util::rt::TokioIo::new(tcp);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}

/// Reads and parses the body, then answers as a put does (400 for a body that is not JSON);
/// a `GET` gets `{}`.
async fn answer(
    request: Request<hyper::body::Incoming>,
    revision: Arc<AtomicU64>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    if request.method() == hyper::Method::GET {
        // `/healthz`, and any other read: nothing to parse, no revision taken.
        return Ok(reply(StatusCode::OK, Bytes::from_static(b"{}")));
    }
    let body = match request.into_body().collect().await {
        Ok(body) => body.to_bytes(),
        Err(_) => return Ok(reply(StatusCode::BAD_REQUEST, Bytes::from_static(b"{}"))),
    };
    if !body.is_empty() && serde_json::from_slice::<serde_json::Value>(&body).is_err() {
        return Ok(reply(StatusCode::BAD_REQUEST, Bytes::from_static(b"{}")));
    }
    let revision = revision.fetch_add(1, Ordering::Relaxed) + 1;
    Ok(reply(StatusCode::OK, Bytes::from(format!(r#"{{"revision":{revision},"version":1}}"#))))
}

fn reply(status: StatusCode, body: Bytes) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    headers.insert("x-correlation-id", CORRELATION_ID);
    response
}

/// Serves one connection without hyper (see the module's doc): requests strictly one after
/// another, each answered as [`answer`] does. Returns when the peer closes or sends anything
/// it does not serve.
async fn raw_connection(mut tcp: tokio::net::TcpStream, revision: Arc<AtomicU64>) {
    use std::io::Write as _;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut inbuf = bytes::BytesMut::with_capacity(4096);
    let mut out = Vec::with_capacity(256);
    loop {
        // The head, then the body by its length.
        let (head_len, body_len, is_get) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut request = httparse::Request::new(&mut headers);
            match request.parse(&inbuf) {
                Ok(httparse::Status::Complete(head_len)) => {
                    let unserved = ["transfer-encoding", "expect"];
                    if request.headers.iter().any(|h| unserved.iter().any(|u| h.name.eq_ignore_ascii_case(u))) {
                        return;
                    }
                    let length = request.headers.iter().find(|h| h.name.eq_ignore_ascii_case("content-length"));
                    let body_len = match length.map(|h| std::str::from_utf8(h.value).ok().and_then(|v| v.parse().ok()))
                    {
                        None => 0,
                        // gapguard's body limit: a larger body is not read.
                        Some(Some(n)) if n <= 1 << 20 => n,
                        Some(_) => return,
                    };
                    break (head_len, body_len, request.method == Some("GET"));
                }
                Ok(httparse::Status::Partial) => {}
                Err(_) => return,
            }
            if matches!(tcp.read_buf(&mut inbuf).await, Ok(0) | Err(_)) {
                return;
            }
        };
        while inbuf.len() < head_len + body_len {
            if matches!(tcp.read_buf(&mut inbuf).await, Ok(0) | Err(_)) {
                return;
            }
        }
        let request = inbuf.split_to(head_len + body_len);
        let body = &request[head_len..];
        let (status, text) = if is_get {
            ("200 OK", String::from("{}"))
        } else if !body.is_empty() && serde_json::from_slice::<serde_json::Value>(body).is_err() {
            ("400 Bad Request", String::from("{}"))
        } else {
            let revision = revision.fetch_add(1, Ordering::Relaxed) + 1;
            ("200 OK", format!(r#"{{"revision":{revision},"version":1}}"#))
        };
        out.clear();
        // The headers of hyper's answer: hyper adds `date` (formatted once a second).
        // Writing to a Vec cannot fail.
        let _ = write!(
            out,
            "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nx-correlation-id: {RAW_CORRELATION_ID}\r\n\
             content-length: {}\r\ndate: Fri, 27 Nov 2026 00:00:00 GMT\r\n\r\n{text}",
            text.len()
        );
        if tcp.write_all(&out).await.is_err() {
            return;
        }
    }
}
