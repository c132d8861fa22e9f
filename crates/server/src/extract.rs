//! Request decoding: JSON bodies (limit, unknown fields, the path of a bad field), path and
//! query extractors whose rejections are [`ApiError`]s, and the correlation-id middleware.

use std::time::Instant;

use axum::body::Body;
use axum::extract::rejection::RawPathParamsRejection;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, RawPathParams, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use gapguard_api::codes;
use serde::de::DeserializeOwned;
use tracing::Instrument as _;

use crate::error::ApiError;
use crate::routes::AppState;
use crate::strict::Strict;

/// A path extractor that answers `400 invalid_request` in JSON.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

/// A query extractor that answers `400 invalid_request` in JSON naming the parameter (unknown
/// parameters too, where the target type denies them).
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(ApiQuery).map_err(|e| {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            ApiError::invalid(field_of(&path, &message, "query"), message)
        })
    }
}

/// The field an error of serde's is about: the path it stopped at, or, where it stopped at the
/// top (`.`), the field a "missing field" or "unknown field" message names, else `whole`
/// (`body`, `query`). A missing field is named below the path it is missing from.
fn field_of(path: &str, message: &str, whole: &str) -> String {
    // `?` is where the parser was inside something it could not read (a trailing comma, a
    // comment, a cut-off body): the field is what holds it, or the whole body.
    let path = match path.strip_suffix("?").map(|p| p.trim_end_matches('.')) {
        Some("") => ".",
        Some(holder) => holder,
        None => path,
    };
    let named = |prefix: &str| message.strip_prefix(prefix).and_then(|rest| rest.split('`').next());
    match (path, named("missing field `")) {
        (".", Some(missing)) => missing.to_owned(),
        (path, Some(missing)) => format!("{path}.{missing}"),
        (".", None) => named("unknown field `").unwrap_or(whole).to_owned(),
        (path, None) => path.to_owned(),
    }
}

/// A JSON body, decoded strictly, with its raw bytes (for idempotency fingerprints).
pub struct JsonBody<T> {
    /// The decoded body.
    pub value: T,
    /// The bytes as received.
    pub raw: Bytes,
}

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let waiting = expects_continue(req.headers());
        Self::read(req.into_body(), waiting, state.engine.limits().max_body_bytes).await
    }
}

impl<T: DeserializeOwned> JsonBody<T> {
    /// Reads a body of at most `limit` bytes and decodes it (`waiting`: see [`read_body`]).
    pub(crate) async fn read(body: Body, waiting: bool, limit: usize) -> Result<Self, ApiError> {
        let raw = read_body(body, waiting, limit).await?;
        let value = decode(&raw)?;
        Ok(Self { value, raw })
    }
}

/// Whether the client waits for `100 Continue` before it sends its body
/// (`Expect: 100-continue`); hyper sends that when the body is first read.
pub(crate) fn expects_continue(headers: &axum::http::HeaderMap) -> bool {
    headers.get(axum::http::header::EXPECT).is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// A body declared past the limit is still read (and dropped) up to this size before the `413`,
/// so that the client, which is sending it, finishes and reads the answer instead of being
/// reset mid-upload; a larger one is refused at once.
const OVERSIZE_DRAIN_BYTES: usize = 8 * 1024 * 1024;
/// How long that drain may take.
const OVERSIZE_DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads a request body of at most `limit` bytes: past it, `413 payload_too_large`. A body
/// whose `Content-Length` is past it is refused from that length: at once, without a byte read,
/// when the client is `waiting` for `100 Continue` (it is then never told to go on, and need
/// not upload); otherwise once the body, which the client is sending anyway, has been read and
/// dropped (up to [`OVERSIZE_DRAIN_BYTES`] and [`OVERSIZE_DRAIN_WAIT`]), so that the client
/// reads the answer rather than a reset.
pub(crate) async fn read_body(body: Body, waiting: bool, limit: usize) -> Result<Bytes, ApiError> {
    use hyper::body::Body as _;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            codes::PAYLOAD_TOO_LARGE,
            format!("request body is larger than the limit of {limit} bytes"),
        )
        .with("field", "body")
        .with("limit_bytes", limit)
    };
    if body.size_hint().lower() > limit as u64 {
        if !waiting {
            // Past the drain's size it returns at once, the body unread.
            crate::load::drain(body, OVERSIZE_DRAIN_BYTES, OVERSIZE_DRAIN_WAIT).await;
        }
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        let past_limit = std::iter::successors(std::error::Error::source(&e), |e| e.source())
            .any(|cause| cause.is::<http_body_util::LengthLimitError>());
        if past_limit {
            too_large()
        } else {
            ApiError::invalid("body", format!("the request body could not be read: {e}"))
        }
    })
}

/// Decodes a JSON object strictly, naming the path of the first bad field. Every request body
/// of the API is an object, and so is every struct in it: serde would also read a struct from
/// an array of its fields in order (`[1]` as `{"value": 1}`, `{"add": ["k", 5]}` as an add of
/// 5 to `k`), which is refused here, at the top level and, through [`Strict`], at every depth.
pub fn decode<T: DeserializeOwned>(raw: &[u8]) -> Result<T, ApiError> {
    match raw.iter().find(|b| !b.is_ascii_whitespace()) {
        None => return Err(ApiError::invalid("body", "the body is empty; expected a JSON object")),
        Some(b'{') => {}
        Some(_) => return Err(ApiError::invalid("body", "expected a JSON object")),
    }
    let mut de = serde_json::Deserializer::from_slice(raw);
    // Tracking the path of every field costs on every request; it is only needed to name the
    // bad one, so a body that fails is decoded a second time, with tracking, for the error.
    let value = match T::deserialize(Strict(&mut de)) {
        Ok(value) => value,
        Err(_) => return Err(bad_field::<T>(raw)),
    };
    de.end().map_err(|e| ApiError::invalid("body", format!("trailing characters after the JSON value ({e})")))?;
    Ok(value)
}

/// The error of a body that does not decode as `T`, naming the path of the first bad field.
fn bad_field<T: DeserializeOwned>(raw: &[u8]) -> ApiError {
    let mut de = serde_json::Deserializer::from_slice(raw);
    match serde_path_to_error::deserialize::<_, T>(Strict(&mut de)) {
        Err(e) => {
            let path = e.path().to_string();
            let message = e.into_inner().to_string();
            ApiError::invalid(field_of(&path, &message, "body"), message)
        }
        // Decoding is deterministic: this is unreachable, but an answer beats a panic.
        Ok(_) => ApiError::invalid("body", "the body could not be decoded"),
    }
}

/// The target of the per-request span. Logs leave it out (see the binary's subscriber): a
/// span enabled for the log formatter has its fields formatted on every request, which cost
/// about a quarter of the check throughput when measured.
pub const REQUEST_SPAN_TARGET: &str = "gapguard::request";

/// The request's correlation id: `X-Correlation-Id` if given, else the trace id of a valid
/// W3C `traceparent`, else a fresh random id. Echoed on the response.
#[derive(Clone, Debug)]
pub struct Correlation {
    /// The correlation id.
    pub id: String,
    /// The API key that made the request (set by the auth middleware).
    pub api_key: Option<String>,
    /// That key's role; `None` when authentication is off (everything is allowed).
    pub role: Option<crate::config::Role>,
}

const CORRELATION_HEADER: &str = "x-correlation-id";

/// The middleware around every route of the API, in this order: establishes the correlation
/// id and echoes it (and `traceparent`), opens the request's span, counts and times the request
/// in the metrics (when they are on), and authenticates it ([`crate::auth::admit`]).
///
/// One layer rather than three: each `from_fn` layer costs every request a clone of the state,
/// a clone of the inner service and a boxed future. Merging these three (and the two load
/// layers into one) took a check's server CPU from 23.2 to 20.1 µs.
pub async fn envelope(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    params: Result<RawPathParams, RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    let route = matched.as_ref().map(MatchedPath::as_str);
    enveloped(&state, route, ns_param(&params), req, |req| next.run(req)).await
}

/// The decoded `{ns}` of a matched route's path, if it has one.
pub(crate) fn ns_param(params: &Result<RawPathParams, RawPathParamsRejection>) -> Option<&str> {
    params.as_ref().ok()?.iter().find(|(name, _)| *name == "ns").map(|(_, value)| value)
}

/// What [`envelope`] does, for a request to `route` (the matched route's template; `None`:
/// unmatched) in namespace `ns` (the route's decoded `{ns}`), which `serve` answers when
/// admitted. The router's middleware and the hot routes ([`crate::hot`]) both go through it.
pub(crate) async fn enveloped<F, Fut>(
    state: &AppState,
    route: Option<&str>,
    ns: Option<&str>,
    mut req: Request,
    serve: F,
) -> Response
where
    F: FnOnce(Request) -> Fut,
    Fut: std::future::Future<Output = Response>,
{
    let limit = state.engine.limits().max_correlation_id_bytes;
    let id = match correlation_id(req.headers(), limit) {
        Ok(id) => id,
        Err(e) => return e.into_response(),
    };
    // Echoed only when valid: one that is not is ignored (W3C Trace Context), not repeated.
    let traceparent =
        req.headers().get("traceparent").filter(|tp| tp.to_str().ok().and_then(trace_id).is_some()).cloned();
    // The server span of the request; check and act name their role on it (`toctou.*`).
    let span = tracing::info_span!(
        target: REQUEST_SPAN_TARGET,
        "request",
        otel.name = %format_args!("{} {}", req.method(), route.unwrap_or("")),
        otel.kind = "server",
        http.request.method = %req.method(),
        http.route = route,
        url.path = %req.uri().path(),
        correlation_id = %id,
        http.response.status_code = tracing::field::Empty,
    );
    crate::otel::set_remote_parent(&span, req.headers());
    req.extensions_mut().insert(Correlation { id: id.clone(), api_key: None, role: None });
    let tracked = state.metrics.is_enabled().then(|| (Instant::now(), req.method().clone()));
    let admitted = crate::auth::admit(&state.keys, route, ns, &mut req);
    let mut response = match admitted {
        Ok(()) => serve(req).instrument(span.clone()).await,
        Err(refused) => *refused,
    };
    if let Some((started, method)) = tracked {
        state.metrics.track(route, &method, started, response.status());
    }
    // An `i64`: tracing-opentelemetry has no `u64` recorder and would write a `u16` as a
    // string, where the semantic conventions want an integer.
    span.record("http.response.status_code", i64::from(response.status().as_u16()));
    let headers = response.headers_mut();
    if let Ok(value) = HeaderValue::from_str(&id) {
        headers.insert(CORRELATION_HEADER, value);
    }
    if let Some(tp) = traceparent {
        headers.insert("traceparent", tp);
    }
    response
}

fn correlation_id(headers: &HeaderMap, limit: usize) -> Result<String, ApiError> {
    if let Some(value) = headers.get(CORRELATION_HEADER) {
        let text = value.to_str().ok().filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()));
        let Some(text) = text else {
            return Err(ApiError::invalid("X-Correlation-Id", "must be 1 or more visible ASCII characters"));
        };
        if text.len() > limit {
            return Err(ApiError::invalid("X-Correlation-Id", format!("longer than {limit} bytes")));
        }
        return Ok(text.to_owned());
    }
    if let Some(trace_id) = headers.get("traceparent").and_then(|v| v.to_str().ok()).and_then(trace_id) {
        return Ok(trace_id.to_owned());
    }
    let random: [u8; 16] = rand::random();
    Ok(gapguard_core::audit::hex(&random))
}

/// The trace id of a valid W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), if it is one.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    let mut parts = traceparent.split('-');
    let (version, trace, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(parent, 16)
        && parent.bytes().any(|b| b != b'0')
        && hex(flags, 2)
        && (version != "00" || parts.next().is_none());
    valid.then_some(trace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_trace_ids() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"), None);
        assert_eq!(trace_id("garbage"), None);
    }

    #[test]
    fn bad_fields_are_named_by_path() {
        let err =
            decode::<gapguard_api::CheckRequest>(br#"{"conditions":[{"compare":{"key":"k","op":"=>","value":1}}]}"#)
                .unwrap_err();
        assert_eq!(err.details["field"], "conditions[0].compare.op");
        let err = decode::<gapguard_api::PutRequest>(b"").unwrap_err();
        assert_eq!(err.details["field"], "body");
        let err = decode::<gapguard_api::PutRequest>(br#"{"value":1} x"#).unwrap_err();
        assert!(err.message.contains("trailing"), "{}", err.message);
        // A struct from an array of its fields, as serde allows, is not an object.
        let err = decode::<gapguard_api::PutRequest>(b" [1]").unwrap_err();
        assert_eq!(
            (err.details["field"].as_str(), err.message.as_str()),
            (Some("body"), "body: expected a JSON object")
        );
        assert_eq!(decode::<gapguard_api::PutRequest>(b" {\"value\": [1]}").unwrap().value, serde_json::json!([1]));
    }

    #[test]
    fn nested_structs_given_as_arrays_are_refused_by_path() {
        // Each was accepted, and its op committed, before `Strict` (found by tests/bad_input.rs):
        // the order of the fields decided the meaning.
        for (body, field) in [
            (r#"{"then":[{"add":["counter",5]}]}"#, "then[0].add"),
            (r#"{"if":[{"compare":["stock",">=",1]}],"then":[{"delete":{"key":"d"}}]}"#, "if[0].compare"),
            (r#"{"if":[{"available":["quota",1]}]}"#, "if[0].available"),
            (r#"{"then":[{"reserve":["quota",3600000,1]}]}"#, "then[0].reserve"),
            (r#"{"else":[{"grant":["user:eve","admin","doc:*"]}]}"#, "else[0].grant"),
        ] {
            let err = decode::<gapguard_api::TxnRequest>(body.as_bytes()).unwrap_err();
            assert_eq!(err.details["field"], field, "{body}: {}", err.message);
            assert!(err.message.contains("invalid type: sequence, expected struct"), "{body}: {}", err.message);
        }
        // The same bodies with objects decode.
        let txn: gapguard_api::TxnRequest = decode(
            br#"{"if":[{"compare":{"key":"stock","op":">=","value":1}}],"then":[{"add":{"key":"counter","by":5}}]}"#,
        )
        .unwrap();
        assert_eq!((txn.compare.len(), txn.success.len()), (1, 1));
    }
}
