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
//! txn) take [`RequestOptions`] and return a [`Response`] that says whether the answer was an
//! idempotent replay. Reads return their value directly. Every error is a [`ClientError`].
//! Headers every request should carry (an `Authorization` key, a correlation id for a whole
//! session) go on the `reqwest::Client` given to [`Client::with_http`] as default headers.

mod error;
mod path;

use std::time::Duration;

use gapguard_api::{
    ActRequest, ActResponse, AuditResponse, CheckRequest, CheckResponse, DeleteResponse, ErrorBody, HealthResponse,
    KeyValue, ListResponse, PutRequest, PutResponse, TxnRequest, TxnResponse, VerifyResponse,
};
use reqwest::header::HeaderValue;
use reqwest::{RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

pub use error::ClientError;
/// The reqwest this client is built on, for [`Client::with_http`].
pub use reqwest;

/// The header that carries an idempotency key.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// The header that carries a correlation id (echoed by the server, stored in the audit log).
pub const CORRELATION_ID_HEADER: &str = "x-correlation-id";
/// The response header that marks an idempotent replay (`true`).
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";

/// How long [`Client::new`] waits for a TCP connection before giving up.
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

/// Query of a listing.
#[derive(Serialize)]
struct ListQuery<'a> {
    #[serde(skip_serializing_if = "str::is_empty")]
    prefix: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    limit: Option<usize>,
}

impl Client {
    /// A client of the server at `base_url` (e.g. `http://127.0.0.1:7700`; a path prefix is
    /// kept, a trailing `/` is not), with a connect timeout of [`CONNECT_TIMEOUT_MS`] and no
    /// overall timeout.
    pub fn new(base_url: &str) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
            .build()
            .map_err(|e| ClientError::transport(base_url, e))?;
        Self::with_http(http, base_url)
    }

    /// A client that sends its requests with `http`: use it for timeouts, proxies, TLS or
    /// default headers (e.g. `Authorization`).
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
        let url = self.ns_url(ns, "/kv")?;
        let request = self.http.get(&url).query(&ListQuery { prefix, limit });
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
fn quote(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "(empty)".into();
    }
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(BODY_QUOTE_BYTES_MAX)]);
    let ellipsis = if bytes.len() > BODY_QUOTE_BYTES_MAX { "…" } else { "" };
    format!("{:?}{ellipsis}", text.trim())
}
