//! A single keep-alive HTTP/1.1 connection (hyper's low-level client): one per load task,
//! requests strictly back-to-back, no pool.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::{self, SendRequest};
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// One open HTTP/1.1 connection to a server.
pub struct HttpConn {
    sender: SendRequest<Full<Bytes>>,
    host: HeaderValue,
    /// `Authorization` sent with every request, when the server needs an API key (built
    /// once; cloning it copies a pointer to static bytes).
    auth: Option<HeaderValue>,
}

impl HttpConn {
    /// Opens a connection to `addr` (with `TCP_NODELAY`) and spawns its driver task, which
    /// ends when this value is dropped. Every request carries `auth`, when given, as its
    /// `Authorization` header.
    pub async fn connect(addr: SocketAddr, auth: Option<HeaderValue>) -> Result<Self> {
        let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
        stream.set_nodelay(true)?;
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.context("HTTP handshake")?;
        tokio::spawn(async move {
            // The connection ends with an error when the server goes away; the next
            // request on it reports that.
            let _ = conn.await;
        });
        let host = HeaderValue::from_str(&addr.to_string()).context("host header")?;
        Ok(HttpConn { sender, host, auth })
    }

    /// Sends one request and reads the whole response. `body`, when given, is sent as JSON.
    pub async fn request(&mut self, method: Method, uri: &Uri, body: Option<Bytes>) -> Result<(StatusCode, Bytes)> {
        let has_body = body.is_some();
        let mut req = Request::new(Full::new(body.unwrap_or_default()));
        *req.method_mut() = method;
        *req.uri_mut() = uri.clone();
        let headers = req.headers_mut();
        headers.insert(HOST, self.host.clone());
        if let Some(auth) = &self.auth {
            headers.insert(AUTHORIZATION, auth.clone());
        }
        if has_body {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        self.sender.ready().await.context("HTTP connection closed")?;
        let resp = self.sender.send_request(req).await.with_context(|| format!("HTTP request to {uri}"))?;
        let status = resp.status();
        let body = resp.into_body().collect().await.context("reading HTTP response body")?.to_bytes();
        Ok((status, body))
    }
}
