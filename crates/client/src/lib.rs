//! An async Rust client for gapguard's HTTP API v1, over reqwest, speaking the wire types of
//! [`gapguard_api`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), gapguard_client::ClientError> {
//! use gapguard_api::{ActRequest, CheckRequest, CompareCondition, CompareOp, Condition, AddOp, Op};
//! use gapguard_client::{Client, RequestOptions};
//!
//! let client = Client::new("http://127.0.0.1:7700")?;
//! let none = RequestOptions::default();
//! client.put("shop", "stock/sku-1", &serde_json::json!(3), &none).await?;
//! let in_stock =
//!     Condition::Compare(CompareCondition { key: "stock/sku-1".into(), op: CompareOp::Ge, value: 1.into() });
//! let check = CheckRequest { conditions: vec![in_stock], ttl_ms: None, flow: Some("checkout".into()) };
//! let ticket = client.check("shop", &check, &none).await?.value.ticket;
//! // ... time passes; the act is applied only if stock is still >= 1 ...
//! let act = ActRequest {
//!     ticket: Some(ticket),
//!     conditions: vec![],
//!     ops: vec![Op::Add(AddOp { key: "stock/sku-1".into(), by: (-1).into() })],
//!     flow: None,
//! };
//! let done = client.act("shop", &act, &RequestOptions::new().idempotency_key("order-42")).await?;
//! println!("committed at revision {} (replay: {})", done.value.revision, done.replayed);
//! # Ok(()) }
//! ```
//!
//! Calls that write (or may be retried with an `Idempotency-Key`: put, delete, check, act,
//! txn, and the pool, reservation, lease, grant and orphan changes) take [`RequestOptions`]
//! and return a [`Response`] that says whether the answer was an idempotent replay. Reads
//! return their value directly. Every error is a [`ClientError`]: match refusals on
//! [`ClientError::code`] (`lease_held`, `insufficient`, `reservation_expired`…).
//!
//! An API key, a private CA for `https://` URLs, and headers every request should carry (a
//! correlation id for a whole session) are set with [`Client::builder`]:
//!
//! ```no_run
//! # fn demo() -> Result<(), gapguard_client::ClientError> {
//! use gapguard_client::Client;
//!
//! let client = Client::builder("https://gapguard.internal:7700")
//!     .api_key(std::env::var("GAPGUARD_API_KEY").unwrap_or_default())
//!     .ca_file("/etc/gapguard/ca.pem")
//!     .build()?;
//! # drop(client); Ok(()) }
//! ```
//!
//! Leases, pools and reservations:
//!
//! ```no_run
//! # async fn demo() -> Result<(), gapguard_client::ClientError> {
//! use gapguard_api::{AcquireRequest, PoolRequest, ReserveRequest};
//! use gapguard_client::{Client, RequestOptions};
//!
//! let client = Client::new("http://127.0.0.1:7700")?;
//! let none = RequestOptions::default();
//! let lease = client.acquire_lease("ops", "migrator", &AcquireRequest { holder: "host-1".into(), ttl_ms: 10_000 }, &none).await?;
//! println!("fencing token {}", lease.value.token);
//!
//! client.set_pool("cloud", "vm-quota", &PoolRequest { capacity: 100 }, &none).await?;
//! let held = client.reserve("cloud", "vm-quota", &ReserveRequest { amount: 4, ttl_ms: 60_000, context: None }, &none).await?;
//! // ... build the VMs; if this process dies, the reservation expires into an orphan ...
//! client.commit_reservation("cloud", &held.value.reservation, &none).await?;
//! # Ok(()) }
//! ```
//!
//! Watching changes ([`Client::watch`]):
//!
//! ```no_run
//! # async fn demo() -> Result<(), gapguard_client::ClientError> {
//! use gapguard_client::{Client, WatchMessage, WatchQuery};
//!
//! let client = Client::new("http://127.0.0.1:7700")?;
//! let query = WatchQuery { prefix: Some("orders/".into()), ..WatchQuery::default() };
//! let mut watch = client.watch("shop", &query).await?;
//! while let Some(message) = watch.next().await {
//!     match message? {
//!         WatchMessage::Change(change) => println!("{} {} at {}", change.kind, change.key, change.revision),
//!         WatchMessage::Compacted { first_available_revision } => println!("history starts at {first_available_revision}"),
//!         WatchMessage::Lagged { resume_from_revision } => println!("too slow; resume from {resume_from_revision}"),
//!     }
//! }
//! # Ok(()) }
//! ```

mod error;
mod path;
mod sse;
mod watch;

use std::path::{Path, PathBuf};
use std::time::Duration;

use gapguard_api::{
    AcquireRequest, ActRequest, ActResponse, AppliedResponse, AuditResponse, CheckRequest, CheckResponse,
    DeleteResponse, ErrorBody, GrantTuple, GrantsResponse, HealthResponse, KeyValue, LeaseReleaseRequest,
    LeaseResponse, ListResponse, OrphansResponse, PoolRequest, PoolResponse, PutRequest, PutResponse, RenewRequest,
    ReservationResponse, ReserveRequest, ReserveResponse, ResolveRequest, TxnRequest, TxnResponse, VerifyResponse,
};
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

pub use error::ClientError;
/// The reqwest this client is built on, for [`Client::with_http`].
pub use reqwest;
pub use watch::{WatchMessage, WatchQuery, WatchStream, WATCH_TYPES};

/// The header that carries an idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The header that carries a correlation id (echoed by the server, stored in the audit log).
pub const CORRELATION_ID_HEADER: &str = "x-correlation-id";
/// The response header that marks an idempotent replay (`true`).
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";

/// How long [`Client::new`] and [`ClientBuilder`] wait for a TCP connection before giving up.
pub const CONNECT_TIMEOUT_MS: u64 = 5_000;

/// Bytes of an undecodable body quoted in a [`ClientError::Decode`].
const BODY_QUOTE_BYTES_MAX: usize = 200;

/// A client of one gapguard server. Cheap to clone (the connection pool is shared).
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    /// The base URL without a trailing `/`, e.g. `http://127.0.0.1:7700`.
    base: String,
}

/// Per-request headers of a call that writes.
///
/// ```
/// let options = gapguard_client::RequestOptions::new().idempotency_key("order-42").correlation_id("req-7");
/// assert_eq!(options.idempotency_key.as_deref(), Some("order-42"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestOptions {
    /// `Idempotency-Key`: a retry with the same key and request gets the first answer again
    /// (with [`Response::replayed`] set); the same key with another request is refused
    /// (`422 idempotency_key_reused`).
    pub idempotency_key: Option<String>,
    /// `X-Correlation-Id`: ties the request to the caller's logs and traces; stored in the
    /// audit log. The server makes one up when it is absent.
    pub correlation_id: Option<String>,
}

impl RequestOptions {
    /// No options.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the `Idempotency-Key`.
    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    /// Sets the `X-Correlation-Id`.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.correlation_id = Some(id.into());
        self
    }

    fn apply(&self, mut request: RequestBuilder) -> Result<RequestBuilder, ClientError> {
        for (name, value) in
            [(IDEMPOTENCY_KEY_HEADER, &self.idempotency_key), (CORRELATION_ID_HEADER, &self.correlation_id)]
        {
            if let Some(value) = value {
                let value = HeaderValue::from_str(value).map_err(|_| ClientError::InvalidArgument {
                    message: format!("{name} {value:?} is not a valid header value"),
                })?;
                request = request.header(name, value);
            }
        }
        Ok(request)
    }
}

/// The answer to a call that writes, with what the response headers said about it.
#[derive(Clone, Debug, PartialEq)]
pub struct Response<T> {
    /// The decoded body.
    pub value: T,
    /// Whether this is the stored answer to an earlier request with the same
    /// `Idempotency-Key` (`Idempotent-Replayed: true`) rather than a new effect.
    pub replayed: bool,
    /// The correlation id the server recorded for the request (echoed `X-Correlation-Id`).
    pub correlation_id: Option<String>,
}

impl<T> Response<T> {
    /// The decoded body, dropping the metadata.
    pub fn into_value(self) -> T {
        self.value
    }
}

/// Where [`ClientBuilder`] takes the CAs it trusts from.
#[derive(Clone, Debug)]
enum CaSource {
    Pem(Vec<u8>),
    File(PathBuf),
}

/// Builds a [`Client`]: an API key, the CAs to trust for `https://`, default headers.
///
/// ```
/// let client = gapguard_client::Client::builder("http://127.0.0.1:7700")
///     .api_key("my-secret")
///     .header("x-correlation-id", "session-7")
///     .build()
///     .unwrap();
/// assert_eq!(client.base_url(), "http://127.0.0.1:7700");
/// assert!(!format!("{client:?}").contains("my-secret"), "the key is never printed");
/// ```
#[derive(Clone)]
#[must_use]
pub struct ClientBuilder {
    base_url: String,
    api_key: Option<String>,
    ca: Option<CaSource>,
    headers: Vec<(String, String)>,
    connect_timeout: Duration,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base_url", &self.base_url)
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .field("ca", &self.ca)
            .field("headers", &self.headers)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

impl ClientBuilder {
    /// Sends `secret` as `Authorization: Bearer <secret>` on every request (marked sensitive,
    /// so it is not logged by reqwest).
    pub fn api_key(mut self, secret: impl Into<String>) -> Self {
        self.api_key = Some(secret.into());
        self
    }

    /// Trusts the CA certificates of `pem` (one or more PEM certificates) for `https://`, and
    /// only them: the built-in public roots are not used, as with `curl --cacert`.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca = Some(CaSource::Pem(pem.into()));
        self
    }

    /// As [`ClientBuilder::ca_pem`], reading the PEM file at `path` when the client is built.
    pub fn ca_file(mut self, path: impl AsRef<Path>) -> Self {
        self.ca = Some(CaSource::File(path.as_ref().to_owned()));
        self
    }

    /// Sends a header on every request (e.g. `x-correlation-id` for a whole session).
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// How long to wait for a TCP connection (default [`CONNECT_TIMEOUT_MS`]).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The client. Fails with [`ClientError::InvalidArgument`] on a malformed base URL, a
    /// header or key that cannot be sent, or a CA file that cannot be read or holds no
    /// certificate.
    pub fn build(self) -> Result<Client, ClientError> {
        let invalid = |message: String| ClientError::InvalidArgument { message };
        let mut headers = HeaderMap::new();
        for (name, value) in &self.headers {
            let header = HeaderName::from_bytes(name.as_bytes()).ok().zip(HeaderValue::from_str(value).ok());
            let (name, value) = header.ok_or_else(|| invalid(format!("header {name}: {value:?} cannot be sent")))?;
            headers.insert(name, value);
        }
        if let Some(secret) = &self.api_key {
            // Never quote the secret in an error.
            let mut value = HeaderValue::from_str(&format!("Bearer {secret}"))
                .ok()
                .filter(|_| !secret.is_empty() && secret.bytes().all(|b| b.is_ascii_graphic()))
                .ok_or_else(|| invalid("the API key must be printable ASCII without spaces".into()))?;
            value.set_sensitive(true);
            headers.insert(AUTHORIZATION, value);
        }
        let mut http = reqwest::Client::builder().connect_timeout(self.connect_timeout).default_headers(headers);
        if let Some(ca) = &self.ca {
            let (pem, origin) = match ca {
                CaSource::Pem(pem) => (pem.clone(), "the CA PEM".to_owned()),
                CaSource::File(path) => {
                    let pem = std::fs::read(path)
                        .map_err(|e| invalid(format!("cannot read CA file {}: {e}", path.display())))?;
                    (pem, format!("CA file {}", path.display()))
                }
            };
            let certificates = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| invalid(format!("{origin} is not a PEM certificate bundle ({e})")))?;
            if certificates.is_empty() {
                return Err(invalid(format!("{origin} holds no `-----BEGIN CERTIFICATE-----` block")));
            }
            http = http.tls_built_in_root_certs(false);
            for certificate in certificates {
                http = http.add_root_certificate(certificate);
            }
        }
        let http = http.build().map_err(|e| ClientError::transport(&self.base_url, e))?;
        Client::with_http(http, &self.base_url)
    }
}

/// Filters of an audit query (`GET /v1/ns/{ns}/audit`). Every field set narrows the result;
/// `Default` asks for the oldest events of the namespace, up to the server's default limit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AuditQuery {
    /// Only events at or after this revision.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from_revision: Option<u64>,
    /// Only events after this sequence number: pass the previous page's `next_after_seq`, or
    /// the last `seq` seen when following the log.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after_seq: Option<u64>,
    /// Only events with this correlation id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// Only events that read or wrote this key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// At most this many events (server default 100).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// The newest matching events instead of the oldest (still returned oldest first).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub newest: bool,
}

/// Filters of a grant listing (`GET /v1/ns/{ns}/grants`); `Default` lists every grant of
/// the namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GrantsQuery {
    /// Only grants to this subject (e.g. `user:alice`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    /// Only grants on this resource (e.g. `doc:9`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
}

/// Query of an orphan listing.
#[derive(Serialize)]
struct OrphansQuery {
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    all: bool,
}

/// Query of a listing.
#[derive(Serialize)]
struct ListQuery<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    prefix: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    after: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
}

impl Client {
    /// A client of the server at `base_url` (e.g. `http://127.0.0.1:7700`; a path prefix is
    /// kept, a trailing `/` is not), with a connect timeout of [`CONNECT_TIMEOUT_MS`] and no
    /// overall timeout.
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        Self::builder(base_url).build()
    }

    /// A client of the server at `base_url` with an API key, a CA or default headers; see
    /// [`ClientBuilder`].
    pub fn builder(base_url: &str) -> ClientBuilder {
        ClientBuilder {
            base_url: base_url.to_owned(),
            api_key: None,
            ca: None,
            headers: Vec::new(),
            connect_timeout: Duration::from_millis(CONNECT_TIMEOUT_MS),
        }
    }

    /// A client that sends its requests with `http`: use it for what [`ClientBuilder`] does
    /// not cover (proxies, client certificates, timeouts per request).
    pub fn with_http(http: reqwest::Client, base_url: &str) -> Result<Self, ClientError> {
        let invalid = |why: String| ClientError::InvalidArgument { message: format!("base URL {base_url:?} {why}") };
        let url = reqwest::Url::parse(base_url).map_err(|e| invalid(format!("is not a URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(invalid("must start with http:// or https://".into()));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("must not have a query or fragment".into()));
        }
        let base = url.as_str().trim_end_matches('/').to_owned();
        Ok(Self { http, base })
    }

    /// The base URL requests go to, without a trailing `/`.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// `GET /healthz`. A server whose store failed answers `503` with `status: "failing"`;
    /// that is returned as `Ok` too, so check [`HealthResponse::status`].
    pub async fn health(&self) -> Result<HealthResponse, ClientError> {
        let url = self.url("/healthz");
        let response = self.http.get(&url).send().await.map_err(|e| ClientError::transport(&url, e))?;
        if response.status() == StatusCode::SERVICE_UNAVAILABLE {
            let (status, bytes) = read(&url, response).await?;
            if let Ok(health) = serde_json::from_slice::<HealthResponse>(&bytes) {
                return Ok(health);
            }
            return Err(error_from(&url, status, &bytes));
        }
        Ok(decode(&url, response).await?.value)
    }

    /// `GET /readyz`: whether the server can serve now (over PostgreSQL: whether the database
    /// answers). Not ready is an error: `503 unavailable`, saying why.
    pub async fn ready(&self) -> Result<HealthResponse, ClientError> {
        let url = self.url("/readyz");
        let response = self.http.get(&url).send().await.map_err(|e| ClientError::transport(&url, e))?;
        Ok(decode(&url, response).await?.value)
    }

    /// `PUT /v1/ns/{ns}/kv/{key}`: sets a key unconditionally.
    pub async fn put(
        &self,
        ns: &str,
        key: &str,
        value: &Value,
        options: &RequestOptions,
    ) -> Result<Response<PutResponse>, ClientError> {
        let url = self.kv_url(ns, key)?;
        let request = self.http.put(&url).json(&PutRequest { value: value.clone() });
        self.send(&url, options.apply(request)?).await
    }

    /// `GET /v1/ns/{ns}/kv/{key}`: a key's record; `404 not_found` if it is absent.
    pub async fn get(&self, ns: &str, key: &str) -> Result<KeyValue, ClientError> {
        let url = self.kv_url(ns, key)?;
        Ok(self.send(&url, self.http.get(&url)).await?.value)
    }

    /// `DELETE /v1/ns/{ns}/kv/{key}`: deletes a key; `404 not_found` if it is absent.
    pub async fn delete(
        &self,
        ns: &str,
        key: &str,
        options: &RequestOptions,
    ) -> Result<Response<DeleteResponse>, ClientError> {
        let url = self.kv_url(ns, key)?;
        self.send(&url, options.apply(self.http.delete(&url))?).await
    }

    /// `GET /v1/ns/{ns}/kv?prefix=&limit=`: live keys starting with `prefix` (`""`: all), in
    /// key order, at most `limit` (`None`: the server's default).
    pub async fn list(&self, ns: &str, prefix: &str, limit: Option<usize>) -> Result<ListResponse, ClientError> {
        self.list_after(ns, prefix, None, limit).await
    }

    /// [`Client::list`] from after `after` (exclusive): the next page after one that said
    /// `more`, `after` being its last key.
    pub async fn list_after(
        &self,
        ns: &str,
        prefix: &str,
        after: Option<&str>,
        limit: Option<usize>,
    ) -> Result<ListResponse, ClientError> {
        let url = self.ns_url(ns, "/kv")?;
        let request = self.http.get(&url).query(&ListQuery { prefix, after, limit });
        Ok(self.send(&url, request).await?.value)
    }

    /// `POST /v1/ns/{ns}/check`: evaluates conditions and, if they all hold, returns a ticket;
    /// otherwise `412 check_failed` with `failed` in the error's details.
    pub async fn check(
        &self,
        ns: &str,
        request: &CheckRequest,
        options: &RequestOptions,
    ) -> Result<Response<CheckResponse>, ClientError> {
        let url = self.ns_url(ns, "/check")?;
        self.send(&url, options.apply(self.http.post(&url).json(request))?).await
    }

    /// `POST /v1/ns/{ns}/act`: applies ops if the ticket's conditions (and the act's own)
    /// hold now. Refusals: `409 stale_check` / `condition_failed` / `ticket_used`,
    /// `410 ticket_expired`, `400 invalid_ticket`.
    pub async fn act(
        &self,
        ns: &str,
        request: &ActRequest,
        options: &RequestOptions,
    ) -> Result<Response<ActResponse>, ClientError> {
        let url = self.ns_url(ns, "/act")?;
        self.send(&url, options.apply(self.http.post(&url).json(request))?).await
    }

    /// `POST /v1/ns/{ns}/txn`: etcd-style `if`/`then`/`else`. A false `if` is not an error:
    /// it runs `else` and answers `succeeded: false`.
    pub async fn txn(
        &self,
        ns: &str,
        request: &TxnRequest,
        options: &RequestOptions,
    ) -> Result<Response<TxnResponse>, ClientError> {
        let url = self.ns_url(ns, "/txn")?;
        self.send(&url, options.apply(self.http.post(&url).json(request))?).await
    }

    /// `PUT /v1/ns/{ns}/pools/{pool}`: creates a pool or sets its capacity; `409
    /// capacity_too_low` below what is used and reserved.
    pub async fn set_pool(
        &self,
        ns: &str,
        pool: &str,
        request: &PoolRequest,
        options: &RequestOptions,
    ) -> Result<Response<PoolResponse>, ClientError> {
        let url = self.pool_url(ns, pool, "")?;
        self.send(&url, options.apply(self.http.put(&url).json(request))?).await
    }

    /// `GET /v1/ns/{ns}/pools/{pool}`: a pool's counters; `404 pool_not_found`.
    pub async fn get_pool(&self, ns: &str, pool: &str) -> Result<PoolResponse, ClientError> {
        let url = self.pool_url(ns, pool, "")?;
        Ok(self.send(&url, self.http.get(&url)).await?.value)
    }

    /// `POST /v1/ns/{ns}/pools/{pool}/reserve`: holds an amount of a pool for a TTL. Refusals:
    /// `409 insufficient` (with `available` in the details), `404 pool_not_found`.
    pub async fn reserve(
        &self,
        ns: &str,
        pool: &str,
        request: &ReserveRequest,
        options: &RequestOptions,
    ) -> Result<Response<ReserveResponse>, ClientError> {
        let url = self.pool_url(ns, pool, "/reserve")?;
        self.send(&url, options.apply(self.http.post(&url).json(request))?).await
    }

    /// `GET /v1/ns/{ns}/reservations/{id}`: a reservation and its state; `404
    /// reservation_not_found`.
    pub async fn get_reservation(&self, ns: &str, id: &str) -> Result<ReservationResponse, ClientError> {
        let url = self.reservation_url(ns, id, "")?;
        Ok(self.send(&url, self.http.get(&url)).await?.value)
    }

    /// `POST /v1/ns/{ns}/reservations/{id}/commit`: consumes a held reservation (the result
    /// is [`OpResult::Commit`](gapguard_api::OpResult::Commit)). Refusals: `410
    /// reservation_expired`, `409 reservation_released` / `reservation_committed`, `404`.
    pub async fn commit_reservation(
        &self,
        ns: &str,
        id: &str,
        options: &RequestOptions,
    ) -> Result<Response<AppliedResponse>, ClientError> {
        let url = self.reservation_url(ns, id, "/commit")?;
        self.send(&url, options.apply(self.http.post(&url))?).await
    }

    /// `POST /v1/ns/{ns}/reservations/{id}/release`: gives a held reservation back (the
    /// result is [`OpResult::Release`](gapguard_api::OpResult::Release)). Refusals as for
    /// [`Client::commit_reservation`].
    pub async fn release_reservation(
        &self,
        ns: &str,
        id: &str,
        options: &RequestOptions,
    ) -> Result<Response<AppliedResponse>, ClientError> {
        let url = self.reservation_url(ns, id, "/release")?;
        self.send(&url, options.apply(self.http.post(&url))?).await
    }

    /// `POST /v1/ns/{ns}/leases/{name}/acquire`: takes a lease with a new, larger fencing
    /// token; `409 lease_held` (with `holder` and `expires_at_ms`) while another holds it.
    pub async fn acquire_lease(
        &self,
        ns: &str,
        name: &str,
        request: &AcquireRequest,
        options: &RequestOptions,
    ) -> Result<Response<LeaseResponse>, ClientError> {
        let url = self.lease_url(ns, name, "/acquire")?;
        self.send(&url, options.apply(self.http.post(&url).json(request))?).await
    }

    /// `POST /v1/ns/{ns}/leases/{name}/renew`: extends the hold of `token`; `409 lease_lost`
    /// if it expired or another holds the lease now.
    pub async fn renew_lease(
        &self,
        ns: &str,
        name: &str,
        request: &RenewRequest,
        options: &RequestOptions,
    ) -> Result<Response<LeaseResponse>, ClientError> {
        let url = self.lease_url(ns, name, "/renew")?;
        self.send(&url, options.apply(self.http.post(&url).json(request))?).await
    }

    /// `POST /v1/ns/{ns}/leases/{name}/release`: ends the hold of `token` (the answer has
    /// `held: false`); `409 lease_lost` if it is not the current hold.
    pub async fn release_lease(
        &self,
        ns: &str,
        name: &str,
        request: &LeaseReleaseRequest,
        options: &RequestOptions,
    ) -> Result<Response<LeaseResponse>, ClientError> {
        let url = self.lease_url(ns, name, "/release")?;
        self.send(&url, options.apply(self.http.post(&url).json(request))?).await
    }

    /// `GET /v1/ns/{ns}/leases/{name}`: a lease's holder and token (token 0, `held: false` if
    /// it was never acquired).
    pub async fn get_lease(&self, ns: &str, name: &str) -> Result<LeaseResponse, ClientError> {
        let url = self.lease_url(ns, name, "")?;
        Ok(self.send(&url, self.http.get(&url)).await?.value)
    }

    /// `POST /v1/ns/{ns}/grants`: grants a permission (the result is
    /// [`OpResult::Grant`](gapguard_api::OpResult::Grant), `existed` if it was there already).
    pub async fn grant(
        &self,
        ns: &str,
        grant: &GrantTuple,
        options: &RequestOptions,
    ) -> Result<Response<AppliedResponse>, ClientError> {
        let url = self.ns_url(ns, "/grants")?;
        self.send(&url, options.apply(self.http.post(&url).json(grant))?).await
    }

    /// `POST /v1/ns/{ns}/grants/revoke`: revokes a permission; every act after it is refused
    /// a `permitted` condition on it, even one whose check passed before.
    pub async fn revoke(
        &self,
        ns: &str,
        grant: &GrantTuple,
        options: &RequestOptions,
    ) -> Result<Response<AppliedResponse>, ClientError> {
        let url = self.ns_url(ns, "/grants/revoke")?;
        self.send(&url, options.apply(self.http.post(&url).json(grant))?).await
    }

    /// `GET /v1/ns/{ns}/grants?subject=&resource=`: the grants of a namespace.
    pub async fn list_grants(&self, ns: &str, query: &GrantsQuery) -> Result<GrantsResponse, ClientError> {
        let url = self.ns_url(ns, "/grants")?;
        Ok(self.send(&url, self.http.get(&url).query(query)).await?.value)
    }

    /// `GET /v1/ns/{ns}/orphans?all=`: reservations and leases that expired unfinished, oldest
    /// first; only the unresolved ones unless `all`.
    pub async fn list_orphans(&self, ns: &str, all: bool) -> Result<OrphansResponse, ClientError> {
        let url = self.ns_url(ns, "/orphans")?;
        Ok(self.send(&url, self.http.get(&url).query(&OrphansQuery { all })).await?.value)
    }

    /// `POST /v1/ns/{ns}/orphans/{id}/resolve`: marks an orphan compensated, with an optional
    /// note. Refusals: `404 orphan_not_found`, `409 orphan_resolved`.
    pub async fn resolve_orphan(
        &self,
        ns: &str,
        id: &str,
        request: &ResolveRequest,
        options: &RequestOptions,
    ) -> Result<Response<AppliedResponse>, ClientError> {
        let url = self.ns_url(ns, &format!("/orphans/{}/resolve", path::segment("orphan id", id)?))?;
        self.send(&url, options.apply(self.http.post(&url).json(request))?).await
    }

    /// `GET /v1/ns/{ns}/watch`: opens a watch of the namespace's changes (Server-Sent
    /// Events). An error status (`400 invalid_request` for an unknown type…) is an error
    /// here; what comes after the `200` comes from [`WatchStream::next`].
    pub async fn watch(&self, ns: &str, query: &WatchQuery) -> Result<WatchStream, ClientError> {
        let url = self.ns_url(ns, "/watch")?;
        let request = self.http.get(&url).query(&query.params()).header(ACCEPT, "text/event-stream");
        let response = request.send().await.map_err(|e| ClientError::transport(&url, e))?;
        let event_stream = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().to_ascii_lowercase().starts_with("text/event-stream"));
        if response.status().is_success() && event_stream {
            return Ok(WatchStream::new(url, response));
        }
        let (status, bytes) = read(&url, response).await?;
        if !status.is_success() {
            return Err(error_from(&url, status, &bytes));
        }
        Err(ClientError::Decode {
            url,
            status: status.as_u16(),
            message: format!("not an event stream (text/event-stream): {}", quote(&bytes)),
        })
    }

    /// `GET /v1/ns/{ns}/audit`: audit events of a namespace, oldest first.
    pub async fn audit(&self, ns: &str, query: &AuditQuery) -> Result<AuditResponse, ClientError> {
        let url = self.ns_url(ns, "/audit")?;
        Ok(self.send(&url, self.http.get(&url).query(query)).await?.value)
    }

    /// `GET /v1/audit/verify`: verifies the whole hash chain. A broken chain is `Ok` with
    /// `ok: false` and `broken` set.
    pub async fn audit_verify(&self) -> Result<VerifyResponse, ClientError> {
        let url = self.url("/v1/audit/verify");
        Ok(self.send(&url, self.http.get(&url)).await?.value)
    }

    /// `GET /v1/openapi.json`: the OpenAPI document of the API.
    pub async fn openapi(&self) -> Result<Value, ClientError> {
        let url = self.url("/v1/openapi.json");
        Ok(self.send(&url, self.http.get(&url)).await?.value)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn ns_url(&self, ns: &str, rest: &str) -> Result<String, ClientError> {
        Ok(format!("{}/v1/ns/{}{rest}", self.base, path::namespace_segment(ns)?))
    }

    fn pool_url(&self, ns: &str, pool: &str, rest: &str) -> Result<String, ClientError> {
        self.ns_url(ns, &format!("/pools/{}{rest}", path::segment("pool", pool)?))
    }

    fn reservation_url(&self, ns: &str, id: &str, rest: &str) -> Result<String, ClientError> {
        self.ns_url(ns, &format!("/reservations/{}{rest}", path::segment("reservation id", id)?))
    }

    fn lease_url(&self, ns: &str, name: &str, rest: &str) -> Result<String, ClientError> {
        self.ns_url(ns, &format!("/leases/{}{rest}", path::segment("lease", name)?))
    }

    fn kv_url(&self, ns: &str, key: &str) -> Result<String, ClientError> {
        Ok(format!("{}/v1/ns/{}/kv/{}", self.base, path::namespace_segment(ns)?, path::key_path(key)?))
    }

    async fn send<T: DeserializeOwned>(&self, url: &str, request: RequestBuilder) -> Result<Response<T>, ClientError> {
        let response = request.send().await.map_err(|e| ClientError::transport(url, e))?;
        decode(url, response).await
    }
}

/// Reads a whole response body.
async fn read(url: &str, response: reqwest::Response) -> Result<(StatusCode, Vec<u8>), ClientError> {
    let status = response.status();
    let bytes = response.bytes().await.map_err(|e| ClientError::transport(url, e))?;
    Ok((status, bytes.into()))
}

/// Decodes a success body into `T`, or an error status into [`ClientError::Api`].
async fn decode<T: DeserializeOwned>(url: &str, response: reqwest::Response) -> Result<Response<T>, ClientError> {
    let header = |name: &str| response.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let replayed = header(IDEMPOTENT_REPLAYED_HEADER).is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let correlation_id = header(CORRELATION_ID_HEADER);
    let (status, bytes) = read(url, response).await?;
    if !status.is_success() {
        return Err(error_from(url, status, &bytes));
    }
    let value = serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode {
        url: url.to_owned(),
        status: status.as_u16(),
        message: format!("{e}; body: {}", quote(&bytes)),
    })?;
    Ok(Response { value, replayed, correlation_id })
}

/// The error of an error status: the server's error body, or [`ClientError::Decode`] when
/// the body is not one.
fn error_from(url: &str, status: StatusCode, bytes: &[u8]) -> ClientError {
    match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => ClientError::Api { status: status.as_u16(), body },
        Err(_) => ClientError::Decode {
            url: url.to_owned(),
            status: status.as_u16(),
            message: format!("not a gapguard error body: {}", quote(bytes)),
        },
    }
}

/// The start of a body, for a person.
pub(crate) fn quote(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(empty)".into();
    }
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(BODY_QUOTE_BYTES_MAX)]);
    let ellipsis = if bytes.len() > BODY_QUOTE_BYTES_MAX { "…" } else { "" };
    format!("{:?}{ellipsis}", text.trim())
}
