//! gapguard's side of every workload, over its HTTP API (namespace `bench`).

use std::borrow::Cow;
use std::io::Write as _;
use std::net::SocketAddr;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hyper::{Method, StatusCode, Uri};
use serde::Deserialize;

use crate::http::HttpConn;
use crate::runner::{Outcome, Worker};
use crate::workload::Workload;

const CHECK_PATH: &str = "/v1/ns/bench/check";
const ACT_PATH: &str = "/v1/ns/bench/act";
const STOCK_PATH: &str = "/v1/ns/bench/kv/stock";

/// The check every check-based workload makes.
const CHECK_BODY: &[u8] = br#"{"conditions":[{"compare":{"key":"stock","op":">=","value":1}}]}"#;
/// The single-request conditional decrement.
const ACT_BODY: &[u8] =
    br#"{"conditions":[{"compare":{"key":"stock","op":">=","value":1}}],"ops":[{"add":{"key":"stock","by":-1}}]}"#;
/// The act that follows a check: everything after the ticket string.
const ACT_WITH_TICKET_TAIL: &[u8] = br#","ops":[{"add":{"key":"stock","by":-1}}]}"#;

/// A running gapguard server.
pub struct Gapguard {
    addr: SocketAddr,
}

/// The part of a 200 answer to a check that the bench uses.
#[derive(Deserialize)]
struct CheckOk<'a> {
    #[serde(borrow)]
    ticket: Cow<'a, str>,
}

/// The part of an error answer that the bench uses.
#[derive(Deserialize)]
struct ErrorBody<'a> {
    #[serde(borrow)]
    error: Cow<'a, str>,
}

/// The part of a `GET …/kv/{key}` answer that the bench uses.
#[derive(Deserialize)]
struct Record {
    value: serde_json::Value,
}

impl Gapguard {
    /// A handle on the server listening at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Gapguard { addr }
    }

    /// Succeeds when `GET /healthz` answers 200.
    pub async fn probe(addr: SocketAddr) -> Result<()> {
        let mut conn = HttpConn::connect(addr).await?;
        let (status, body) = conn.request(Method::GET, &Uri::from_static("/healthz"), None).await?;
        expect(status, StatusCode::OK, &body, "GET /healthz")
    }

    /// Sets the hot key `stock` to `n`.
    pub async fn set_stock(&self, n: i64) -> Result<()> {
        let mut conn = HttpConn::connect(self.addr).await?;
        let body = Bytes::from(format!(r#"{{"value":{n}}}"#));
        let (status, body) = conn.request(Method::PUT, &Uri::from_static(STOCK_PATH), Some(body)).await?;
        expect(status, StatusCode::OK, &body, "PUT stock")
    }

    /// Reads the hot key `stock`.
    pub async fn read_stock(&self) -> Result<i64> {
        let mut conn = HttpConn::connect(self.addr).await?;
        let (status, body) = conn.request(Method::GET, &Uri::from_static(STOCK_PATH), None).await?;
        expect(status, StatusCode::OK, &body, "GET stock")?;
        let record: Record = serde_json::from_slice(&body).context("GET stock: bad JSON")?;
        json_integer(&record.value).with_context(|| format!("GET stock: value {} is not an integer", record.value))
    }

    /// Opens `connections` keep-alive connections, each ready to run `workload`.
    pub async fn workers(&self, workload: Workload, connections: usize) -> Result<Vec<GapguardWorker>> {
        let mut workers = Vec::with_capacity(connections);
        for index in 0..connections {
            let key_uri: Uri = format!("/v1/ns/bench/kv/k{index}").parse()?;
            workers.push(GapguardWorker {
                conn: HttpConn::connect(self.addr).await?,
                workload,
                key_uri,
                check_uri: Uri::from_static(CHECK_PATH),
                act_uri: Uri::from_static(ACT_PATH),
                n: 0,
                buf: Vec::with_capacity(512),
            });
        }
        Ok(workers)
    }
}

/// One connection's load against gapguard.
pub struct GapguardWorker {
    conn: HttpConn,
    workload: Workload,
    key_uri: Uri,
    check_uri: Uri,
    act_uri: Uri,
    /// The next value this connection puts.
    n: u64,
    /// Scratch space for request bodies that change.
    buf: Vec<u8>,
}

impl Worker for GapguardWorker {
    async fn op(&mut self) -> Result<Outcome> {
        match self.workload {
            Workload::Puts => self.put().await,
            Workload::Checks => self.check_only().await,
            Workload::Decrement => self.conditional_decrement().await,
            Workload::CheckAct => self.check_then_act().await,
        }
    }
}

impl GapguardWorker {
    async fn put(&mut self) -> Result<Outcome> {
        self.n += 1;
        self.buf.clear();
        write!(self.buf, r#"{{"value":{}}}"#, self.n)?;
        let body = Bytes::copy_from_slice(&self.buf);
        let (status, body) = self.conn.request(Method::PUT, &self.key_uri, Some(body)).await?;
        expect(status, StatusCode::OK, &body, "PUT")?;
        Ok(Outcome::Done { attempts: 1 })
    }

    async fn check_only(&mut self) -> Result<Outcome> {
        let (status, body) =
            self.conn.request(Method::POST, &self.check_uri, Some(Bytes::from_static(CHECK_BODY))).await?;
        match status {
            StatusCode::OK => Ok(Outcome::Done { attempts: 1 }),
            StatusCode::PRECONDITION_FAILED => Ok(Outcome::Exhausted { attempts: 0 }),
            _ => unexpected(status, &body, "check"),
        }
    }

    async fn conditional_decrement(&mut self) -> Result<Outcome> {
        let (status, body) = self.conn.request(Method::POST, &self.act_uri, Some(Bytes::from_static(ACT_BODY))).await?;
        match status {
            StatusCode::OK => Ok(Outcome::Done { attempts: 1 }),
            StatusCode::CONFLICT if error_code(&body) == Some("condition_failed") => {
                Ok(Outcome::Exhausted { attempts: 1 })
            }
            _ => unexpected(status, &body, "act"),
        }
    }

    async fn check_then_act(&mut self) -> Result<Outcome> {
        let mut attempts = 0;
        loop {
            let (status, body) =
                self.conn.request(Method::POST, &self.check_uri, Some(Bytes::from_static(CHECK_BODY))).await?;
            match status {
                StatusCode::OK => {}
                StatusCode::PRECONDITION_FAILED => return Ok(Outcome::Exhausted { attempts }),
                _ => return unexpected(status, &body, "check"),
            }
            let ok: CheckOk<'_> = serde_json::from_slice(&body).context("check: bad JSON")?;
            self.buf.clear();
            self.buf.extend_from_slice(br#"{"ticket":"#);
            serde_json::to_writer(&mut self.buf, ok.ticket.as_ref())?;
            self.buf.extend_from_slice(ACT_WITH_TICKET_TAIL);
            let act = Bytes::copy_from_slice(&self.buf);
            attempts += 1;
            let (status, body) = self.conn.request(Method::POST, &self.act_uri, Some(act)).await?;
            match status {
                StatusCode::OK => return Ok(Outcome::Done { attempts }),
                StatusCode::CONFLICT if error_code(&body) == Some("stale_check") => continue,
                _ => return unexpected(status, &body, "act with ticket"),
            }
        }
    }
}

/// The `error` code of an error answer, if it has one.
fn error_code(body: &[u8]) -> Option<&str> {
    match serde_json::from_slice::<ErrorBody<'_>>(body).ok()?.error {
        Cow::Borrowed(code) => Some(code),
        // An escaped code is not one of ours.
        Cow::Owned(_) => None,
    }
}

/// A JSON number that is a whole number, as `i64`.
fn json_integer(value: &serde_json::Value) -> Option<i64> {
    if let Some(n) = value.as_i64() {
        return Some(n);
    }
    let f = value.as_f64()?;
    (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
}

fn expect(status: StatusCode, want: StatusCode, body: &[u8], what: &str) -> Result<()> {
    if status == want {
        Ok(())
    } else {
        unexpected(status, body, what).map(|_| ())
    }
}

fn unexpected(status: StatusCode, body: &[u8], what: &str) -> Result<Outcome> {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]);
    bail!("gapguard {what}: unexpected {status}: {text}")
}
