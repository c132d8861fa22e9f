//! A minimal HTTP/1.1 keep-alive connection: one per load task, requests strictly
//! back-to-back (no pipelining), each written with one `write` from a reused buffer and its
//! response read into a reused buffer. The counterpart of the bench's RESP client for Redis:
//! the load generator shares the two cores with the server it measures, so it should cost as
//! little as the peers' clients do (hyper's client took about a third of the CPU of a check
//! round trip). The server side is untouched: gapguard parses every request with hyper.
//!
//! Responses are read by `Content-Length` or `Transfer-Encoding: chunked`; anything else
//! (a response with neither, an HTTP version other than 1.x, an upgrade) is an error.

use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use bytes::{Buf, Bytes, BytesMut};
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode, Uri};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Most response headers the client parses.
const MAX_HEADERS: usize = 32;
/// Largest response head accepted, in bytes.
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// One open HTTP/1.1 connection to a server.
pub struct HttpConn {
    stream: TcpStream,
    /// `Host: …\r\n` and, when the server needs an API key, `Authorization: …\r\n`: the
    /// header lines every request carries, built once.
    fixed_headers: Vec<u8>,
    /// The request being written.
    out: Vec<u8>,
    /// Bytes read and not yet consumed.
    inbuf: BytesMut,
}

impl HttpConn {
    /// Opens a connection to `addr` with `TCP_NODELAY`. Every request carries `auth`, when
    /// given, as its `Authorization` header.
    pub async fn connect(addr: SocketAddr, auth: Option<HeaderValue>) -> Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let mut fixed_headers = format!("host: {addr}\r\n").into_bytes();
        if let Some(auth) = auth {
            fixed_headers.extend_from_slice(b"authorization: ");
            fixed_headers.extend_from_slice(auth.as_bytes());
            fixed_headers.extend_from_slice(b"\r\n");
        }
        Ok(HttpConn { stream, fixed_headers, out: Vec::with_capacity(512), inbuf: BytesMut::with_capacity(4096) })
    }

    /// Sends one request and reads the whole response. `body`, when given, is sent as JSON.
    pub async fn request(&mut self, method: Method, uri: &Uri, body: Option<Bytes>) -> Result<(StatusCode, Bytes)> {
        let target = uri.path_and_query().map_or("/", |p| p.as_str());
        self.out.clear();
        // Writing to a Vec cannot fail.
        let _ = write!(self.out, "{method} {target} HTTP/1.1\r\n");
        self.out.extend_from_slice(&self.fixed_headers);
        match &body {
            Some(body) => {
                let _ = write!(self.out, "content-type: application/json\r\ncontent-length: {}\r\n\r\n", body.len());
                self.out.extend_from_slice(body);
            }
            None => self.out.extend_from_slice(b"\r\n"),
        }
        self.stream.write_all(&self.out).await.with_context(|| format!("HTTP request to {target}"))?;
        self.read_response().await.with_context(|| format!("HTTP response to {method} {target}"))
    }

    /// Reads one response: its head, then its body by length or by chunks.
    async fn read_response(&mut self) -> Result<(StatusCode, Bytes)> {
        let (status, head_len, framing) = loop {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut response = httparse::Response::new(&mut headers);
            match response.parse(&self.inbuf).context("malformed response head")? {
                httparse::Status::Complete(head_len) if head_len > MAX_HEAD_BYTES => {
                    bail!("response head of {head_len} bytes, longer than {MAX_HEAD_BYTES}")
                }
                httparse::Status::Complete(head_len) => {
                    let status = StatusCode::from_u16(response.code.context("no status code")?)?;
                    break (status, head_len, Framing::of(response.headers)?);
                }
                httparse::Status::Partial if self.inbuf.len() > MAX_HEAD_BYTES => {
                    bail!("response head longer than {MAX_HEAD_BYTES} bytes")
                }
                httparse::Status::Partial => self.fill().await?,
            }
        };
        self.inbuf.advance(head_len);
        let body = match framing {
            Framing::Length(len) => {
                while self.inbuf.len() < len {
                    self.fill().await?;
                }
                self.inbuf.split_to(len).freeze()
            }
            Framing::Chunked => self.read_chunked().await?,
        };
        Ok((status, body))
    }

    /// Reads a chunked body (trailers are skipped).
    async fn read_chunked(&mut self) -> Result<Bytes> {
        let mut body = BytesMut::new();
        loop {
            let line = self.line().await?;
            let size = std::str::from_utf8(&line).ok().and_then(|l| l.split(';').next());
            let size = size.and_then(|s| usize::from_str_radix(s.trim(), 16).ok()).context("bad chunk size line")?;
            if size == 0 {
                // Trailers, up to the empty line.
                while !self.line().await?.is_empty() {}
                return Ok(body.freeze());
            }
            while self.inbuf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.inbuf[..size]);
            if &self.inbuf[size..size + 2] != b"\r\n" {
                bail!("chunk not followed by CRLF");
            }
            self.inbuf.advance(size + 2);
        }
    }

    /// One CRLF-terminated line, without its CRLF.
    async fn line(&mut self) -> Result<BytesMut> {
        loop {
            if let Some(at) = self.inbuf.windows(2).position(|w| w == b"\r\n") {
                let line = self.inbuf.split_to(at);
                self.inbuf.advance(2);
                return Ok(line);
            }
            self.fill().await?;
        }
    }

    /// Reads more bytes; the server closing the connection is an error.
    async fn fill(&mut self) -> Result<()> {
        self.inbuf.reserve(4096);
        if self.stream.read_buf(&mut self.inbuf).await? == 0 {
            bail!("the server closed the connection");
        }
        Ok(())
    }
}

/// How a response's body is delimited.
#[derive(Debug, PartialEq, Eq)]
enum Framing {
    Length(usize),
    Chunked,
}

impl Framing {
    fn of(headers: &[httparse::Header<'_>]) -> Result<Self> {
        for header in headers {
            if header.name.eq_ignore_ascii_case("content-length") {
                let len = std::str::from_utf8(header.value).ok().and_then(|v| v.trim().parse().ok());
                return Ok(Framing::Length(len.context("bad Content-Length")?));
            }
            if header.name.eq_ignore_ascii_case("transfer-encoding") {
                if header.value.eq_ignore_ascii_case(b"chunked") {
                    return Ok(Framing::Chunked);
                }
                bail!("unsupported Transfer-Encoding {:?}", String::from_utf8_lossy(header.value));
            }
        }
        bail!("response without Content-Length or chunked encoding")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that reads one request head and answers `response` in two writes.
    async fn serve_once(response: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            let (a, b) = response.split_at(response.len() / 2);
            socket.write_all(a).await.unwrap();
            socket.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            socket.write_all(b).await.unwrap();
            request
        });
        (addr, task)
    }

    #[tokio::test]
    async fn reads_a_length_delimited_response_split_across_reads() {
        let (addr, server) = serve_once(b"HTTP/1.1 409 Conflict\r\ncontent-length: 11\r\n\r\n{\"a\":\"bc\"}\n").await;
        let mut conn = HttpConn::connect(addr, Some(HeaderValue::from_static("Bearer s"))).await.unwrap();
        let body = Bytes::from_static(b"{\"x\":1}");
        let (status, got) = conn.request(Method::POST, &Uri::from_static("/v1/p?q=1"), Some(body)).await.unwrap();
        assert_eq!((status, &got[..]), (StatusCode::CONFLICT, &b"{\"a\":\"bc\"}\n"[..]));
        let request = String::from_utf8(server.await.unwrap()).unwrap();
        assert!(request.starts_with("POST /v1/p?q=1 HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("authorization: Bearer s\r\n") && request.contains("content-length: 7\r\n"));
    }

    #[tokio::test]
    async fn reads_a_chunked_response() {
        let (addr, _server) = serve_once(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\na;x=y\r\n0123456789\r\n0\r\n\r\n",
        )
        .await;
        let mut conn = HttpConn::connect(addr, None).await.unwrap();
        let (status, got) = conn.request(Method::GET, &Uri::from_static("/metrics"), None).await.unwrap();
        assert_eq!((status, &got[..]), (StatusCode::OK, &b"abc0123456789"[..]));
    }

    /// A response whose head is `head_bytes` long (padded with one header), body "ok".
    fn response_with_head_of(head_bytes: usize) -> &'static [u8] {
        let start = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-pad: ";
        let pad = head_bytes - start.len() - "\r\n\r\n".len();
        let text = format!("{start}{}\r\n\r\nok", "a".repeat(pad));
        Box::leak(text.into_bytes().into_boxed_slice())
    }

    #[tokio::test]
    async fn a_response_head_is_read_up_to_the_limit_and_refused_past_it() {
        let (addr, _server) = serve_once(response_with_head_of(MAX_HEAD_BYTES)).await;
        let mut conn = HttpConn::connect(addr, None).await.unwrap();
        let (status, body) = conn.request(Method::GET, &Uri::from_static("/"), None).await.unwrap();
        assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok"[..]));
        let (addr, _server) = serve_once(response_with_head_of(MAX_HEAD_BYTES + 1)).await;
        let mut conn = HttpConn::connect(addr, None).await.unwrap();
        let err = conn.request(Method::GET, &Uri::from_static("/"), None).await.unwrap_err();
        assert!(format!("{err:#}").contains("longer than"), "{err:#}");
    }

    #[tokio::test]
    async fn a_response_without_framing_or_a_closed_connection_is_an_error() {
        let (addr, _server) = serve_once(b"HTTP/1.1 200 OK\r\nx: y\r\n\r\n").await;
        let mut conn = HttpConn::connect(addr, None).await.unwrap();
        let err = conn.request(Method::GET, &Uri::from_static("/"), None).await.unwrap_err();
        assert!(format!("{err:#}").contains("without Content-Length"), "{err:#}");
        let (addr, _server) = serve_once(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc").await;
        let mut conn = HttpConn::connect(addr, None).await.unwrap();
        let err = conn.request(Method::GET, &Uri::from_static("/"), None).await.unwrap_err();
        assert!(format!("{err:#}").contains("closed the connection"), "{err:#}");
    }
}
