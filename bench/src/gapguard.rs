//! gapguard's side of every workload, over its HTTP API (namespace `bench`).

use std::borrow::Cow;
use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hyper::header::HeaderValue;
use hyper::{Method, StatusCode, Uri};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

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
/// One reservation of one unit, held for a minute (far longer than any pair takes).
const RESERVE_BODY: &[u8] = br#"{"amount":1,"ttl_ms":60000}"#;
/// The body of a commit (it takes none; an empty object is accepted too).
const COMMIT_BODY: &[u8] = b"{}";

/// The API key the bench presents when gapguard runs with authentication: id `bench`, a
/// random secret, admin of namespace `bench` (admin because the bench sets pool capacities).
#[derive(Clone)]
pub struct ApiKey {
    /// SHA-256 of the secret, lowercase hex, as the config holds it.
    secret_sha256: String,
    /// `Bearer <secret>`, built once and marked sensitive.
    header: HeaderValue,
}

impl ApiKey {
    /// The key's id, recorded in gapguard's audit events.
    pub const ID: &'static str = "bench";

    /// A key with a fresh random secret (256 bits).
    pub fn random() -> Self {
        let secret = format!("ggbench_{}", hex(&rand::random::<[u8; 32]>()));
        let secret_sha256 = hex(&Sha256::digest(secret.as_bytes()));
        // Leaked once per server, so that the header every request clones is a pointer to
        // static bytes (no allocation, no reference count).
        let value: &'static str = Box::leak(format!("Bearer {secret}").into_boxed_str());
        let mut header = HeaderValue::from_static(value);
        header.set_sensitive(true);
        ApiKey { secret_sha256, header }
    }

    /// The config file that makes gapguard require this key.
    pub fn config_toml(&self) -> String {
        format!(
            "[[api_key]]\nid = \"{}\"\nsecret_sha256 = \"{}\"\nnamespaces = [\"bench\"]\nrole = \"admin\"\n",
            Self::ID,
            self.secret_sha256
        )
    }

    /// The `Authorization` header value.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }
}

/// `bytes` as lowercase hex.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A running gapguard server, or several nodes serving one database.
pub struct Gapguard {
    /// Every node's address; load connections are spread over them round-robin, set-up
    /// and read-back requests go to the first.
    addrs: Vec<SocketAddr>,
    /// `Authorization` of every request, when the server runs with an API key.
    auth: Option<HeaderValue>,
    /// Which hot pool the `reserve` workload uses now: `hot-{n}`. A pool's `used` only
    /// grows, so each run that sets the stock starts a fresh pool (0 until the first).
    pool: AtomicU64,
}

/// A pool as `GET /v1/ns/{ns}/pools/{pool}` shows it.
#[derive(Clone, Copy, Debug, Deserialize, Serialize)]
pub struct PoolLevel {
    /// Units the pool holds in all.
    pub capacity: i64,
    /// Units consumed by committed reservations.
    pub used: i64,
    /// Units held by reservations neither committed nor released.
    pub reserved: i64,
    /// Units free to reserve.
    pub available: i64,
}

/// The group commits of a run, summed over every node from its `/metrics`
/// (`gapguard_commit_batch_size` and `gapguard_commit_seconds`, since the node started).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct CommitStats {
    /// Group commits (batch transactions).
    pub batches: u64,
    /// Write requests they carried.
    pub requests: f64,
    /// Time from the start of each batch's transaction to its commit, summed, in seconds
    /// (on the PostgreSQL backend: how long the counter row stayed locked).
    pub seconds: f64,
}

impl CommitStats {
    /// Write requests per group commit.
    pub fn mean_batch(&self) -> f64 {
        self.requests / self.batches.max(1) as f64
    }

    /// Mean time of one group commit, in milliseconds.
    pub fn mean_commit_ms(&self) -> f64 {
        1000.0 * self.seconds / self.batches.max(1) as f64
    }

    /// Adds the `_sum` and `_count` samples of a Prometheus text exposition.
    fn add_exposition(&mut self, text: &str) -> Result<()> {
        for line in text.lines() {
            let Some((name, value)) = line.split_once(' ') else { continue };
            let value = || value.trim().parse::<f64>().with_context(|| format!("bad sample {line:?}"));
            match name {
                "gapguard_commit_batch_size_sum" => self.requests += value()?,
                "gapguard_commit_batch_size_count" => self.batches += value()? as u64,
                "gapguard_commit_seconds_sum" => self.seconds += value()?,
                _ => {}
            }
        }
        Ok(())
    }
}

/// The part of a 200 answer to a reserve that the bench uses.
#[derive(Deserialize)]
struct ReserveOk<'a> {
    #[serde(borrow)]
    reservation: Cow<'a, str>,
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
    /// A handle on the server listening at `addr`; every request presents `key`, when given.
    pub fn new(addr: SocketAddr, key: Option<&ApiKey>) -> Self {
        Self::cluster(vec![addr], key)
    }

    /// A handle on the nodes listening at `addrs` (at least one), all serving the same data.
    pub fn cluster(addrs: Vec<SocketAddr>, key: Option<&ApiKey>) -> Self {
        assert!(!addrs.is_empty(), "a gapguard cluster has at least one node");
        Gapguard { addrs, auth: key.map(|k| k.header().clone()), pool: AtomicU64::new(0) }
    }

    /// Opens a connection to the first node whose requests carry the API key, if any.
    async fn connect(&self) -> Result<HttpConn> {
        self.connect_to(0).await
    }

    /// Opens a connection to node `node_idx % n_nodes`.
    async fn connect_to(&self, node_idx: usize) -> Result<HttpConn> {
        HttpConn::connect(self.addrs[node_idx % self.addrs.len()], self.auth.clone()).await
    }

    /// The path of the hot pool the `reserve` workload uses now.
    fn pool_path(&self) -> String {
        format!("/v1/ns/bench/pools/hot-{}", self.pool.load(Ordering::Relaxed))
    }

    /// Creates a fresh hot pool of `capacity` units (used 0, reserved 0) for the next run.
    pub async fn new_pool(&self, capacity: i64) -> Result<()> {
        self.pool.fetch_add(1, Ordering::Relaxed);
        let path = self.pool_path();
        let mut conn = self.connect().await?;
        let body = Bytes::from(format!(r#"{{"capacity":{capacity}}}"#));
        let (status, body) = conn.request(Method::PUT, &path.parse()?, Some(body)).await?;
        expect(status, StatusCode::OK, &body, &format!("PUT {path}"))
    }

    /// Reads the hot pool.
    pub async fn read_pool(&self) -> Result<PoolLevel> {
        let path = self.pool_path();
        let mut conn = self.connect().await?;
        let (status, body) = conn.request(Method::GET, &path.parse()?, None).await?;
        expect(status, StatusCode::OK, &body, &format!("GET {path}"))?;
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: bad JSON"))
    }

    /// Every node's group commits so far, from `GET /metrics`.
    pub async fn commit_stats(&self) -> Result<CommitStats> {
        let mut stats = CommitStats::default();
        for node_idx in 0..self.addrs.len() {
            let mut conn = self.connect_to(node_idx).await?;
            let (status, body) = conn.request(Method::GET, &Uri::from_static("/metrics"), None).await?;
            expect(status, StatusCode::OK, &body, "GET /metrics")?;
            stats.add_exposition(&String::from_utf8_lossy(&body))?;
        }
        Ok(stats)
    }

    /// Succeeds when `GET /healthz` answers 200.
    pub async fn probe(addr: SocketAddr) -> Result<()> {
        let mut conn = HttpConn::connect(addr, None).await?;
        let (status, body) = conn.request(Method::GET, &Uri::from_static("/healthz"), None).await?;
        expect(status, StatusCode::OK, &body, "GET /healthz")
    }

    /// Fails unless the server at `addr` refuses a request without a key (`401`) and
    /// serves it with `key`: proof that the runs "with auth" really authenticate.
    pub async fn check_auth(addr: SocketAddr, key: &ApiKey) -> Result<()> {
        let uri = Uri::from_static(STOCK_PATH);
        let mut conn = HttpConn::connect(addr, None).await?;
        let (status, body) = conn.request(Method::GET, &uri, None).await?;
        expect(status, StatusCode::UNAUTHORIZED, &body, "GET stock without an API key")?;
        let mut conn = HttpConn::connect(addr, Some(key.header().clone())).await?;
        let (status, body) = conn.request(Method::GET, &uri, None).await?;
        if status == StatusCode::OK || status == StatusCode::NOT_FOUND {
            Ok(())
        } else {
            unexpected(status, &body, "GET stock with the bench's API key").map(|_| ())
        }
    }

    /// Sets the hot key `stock` to `n`.
    pub async fn set_stock(&self, n: i64) -> Result<()> {
        let mut conn = self.connect().await?;
        let body = Bytes::from(format!(r#"{{"value":{n}}}"#));
        let (status, body) = conn.request(Method::PUT, &Uri::from_static(STOCK_PATH), Some(body)).await?;
        expect(status, StatusCode::OK, &body, "PUT stock")
    }

    /// Reads the hot key `stock`.
    pub async fn read_stock(&self) -> Result<i64> {
        let mut conn = self.connect().await?;
        let (status, body) = conn.request(Method::GET, &Uri::from_static(STOCK_PATH), None).await?;
        expect(status, StatusCode::OK, &body, "GET stock")?;
        let record: Record = serde_json::from_slice(&body).context("GET stock: bad JSON")?;
        json_integer(&record.value).with_context(|| format!("GET stock: value {} is not an integer", record.value))
    }

    /// Opens `connections` keep-alive connections, each ready to run `workload`; connection
    /// `i` goes to node `i % n_nodes`.
    pub async fn workers(&self, workload: Workload, connections: usize) -> Result<Vec<GapguardWorker>> {
        let mut workers = Vec::with_capacity(connections);
        let reserve_uri: Uri = format!("{}/reserve", self.pool_path()).parse()?;
        for index in 0..connections {
            let key_uri: Uri = format!("/v1/ns/bench/kv/k{index}").parse()?;
            workers.push(GapguardWorker {
                conn: self.connect_to(index).await?,
                workload,
                key_uri,
                check_uri: Uri::from_static(CHECK_PATH),
                act_uri: Uri::from_static(ACT_PATH),
                reserve_uri: reserve_uri.clone(),
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
    /// `POST …/pools/hot-{n}/reserve`.
    reserve_uri: Uri,
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
            Workload::Reserve => self.reserve_then_commit().await,
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

impl GapguardWorker {
    /// Reserves one unit of the hot pool, then commits that reservation. Nobody releases
    /// in this workload, so a 409 `insufficient` means the pool is exhausted for good.
    async fn reserve_then_commit(&mut self) -> Result<Outcome> {
        let (status, body) =
            self.conn.request(Method::POST, &self.reserve_uri, Some(Bytes::from_static(RESERVE_BODY))).await?;
        match status {
            StatusCode::OK => {}
            StatusCode::CONFLICT if error_code(&body) == Some("insufficient") => {
                return Ok(Outcome::Exhausted { attempts: 1 })
            }
            _ => return unexpected(status, &body, "reserve"),
        }
        let ok: ReserveOk<'_> = serde_json::from_slice(&body).context("reserve: bad JSON")?;
        self.buf.clear();
        self.buf.extend_from_slice(b"/v1/ns/bench/reservations/");
        percent_encode_segment(&ok.reservation, &mut self.buf);
        self.buf.extend_from_slice(b"/commit");
        let commit_uri =
            Uri::try_from(self.buf.as_slice()).with_context(|| format!("reservation id {:?}", ok.reservation))?;
        let (status, body) =
            self.conn.request(Method::POST, &commit_uri, Some(Bytes::from_static(COMMIT_BODY))).await?;
        expect(status, StatusCode::OK, &body, "commit")?;
        Ok(Outcome::Done { attempts: 1 })
    }
}

/// Appends `segment` to `out` as one URI path segment: unreserved characters as they
/// are, every other byte as `%XX`.
fn percent_encode_segment(segment: &str, out: &mut Vec<u8>) {
    for &b in segment.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b);
        } else {
            write!(out, "%{b:02X}").expect("writing to a Vec cannot fail");
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

#[cfg(test)]
mod tests {
    use super::{hex, percent_encode_segment, ApiKey, CommitStats};
    use sha2::{Digest, Sha256};

    #[test]
    fn the_config_holds_the_hash_of_the_secret_the_header_presents() {
        let key = ApiKey::random();
        let header = key.header().to_str().unwrap();
        let secret = header.strip_prefix("Bearer ").unwrap();
        assert!(key.header().is_sensitive());
        let config = key.config_toml();
        assert!(config.contains(&format!("secret_sha256 = \"{}\"\n", hex(&Sha256::digest(secret.as_bytes())))));
        assert!(config.contains("id = \"bench\"\n") && config.contains("role = \"admin\"\n"));
        assert!(config.contains("namespaces = [\"bench\"]\n"));
        assert_ne!(ApiKey::random().secret_sha256, key.secret_sha256);
    }

    #[test]
    fn commit_stats_sum_the_histograms_of_every_node() {
        let text = "# TYPE gapguard_commit_batch_size histogram\ngapguard_commit_batch_size_sum 120.0\n\
                    gapguard_commit_batch_size_count 10\ngapguard_commit_batch_size_bucket{le=\"1.0\"} 0\n\
                    gapguard_commit_seconds_sum 0.02\ngapguard_commit_seconds_count 10\n";
        let mut stats = CommitStats::default();
        stats.add_exposition(text).unwrap();
        stats.add_exposition(text).unwrap();
        assert_eq!((stats.batches, stats.requests), (20, 240.0));
        assert!((stats.mean_batch() - 12.0).abs() < 1e-9 && (stats.mean_commit_ms() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn reservation_ids_become_one_path_segment() {
        let mut out = Vec::new();
        percent_encode_segment("rsv_AZ09-._~", &mut out);
        assert_eq!(out, b"rsv_AZ09-._~");
        out.clear();
        percent_encode_segment("a/b c%", &mut out);
        assert_eq!(out, b"a%2Fb%20c%25");
    }
}
