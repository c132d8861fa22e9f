//! The routes of API v1 and the router that serves them.

use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use gapguard_api as api;
use gapguard_core::{Act, TicketClaims, Txn, WriteRequest};
use gapguard_engine::{AuditQuery, Engine, EngineError, IdempotencyClaim, RequestContext};
use gapguard_store::IdempotencyKey;
use serde::Deserialize;
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::{IntoParams, OpenApi};

use std::sync::Arc;

use crate::auth::Keys;
use crate::convert;
use crate::error::ApiError;
use crate::extract::{envelope, ApiPath, ApiQuery, Correlation, JsonBody};
use crate::metrics::{self, LabelNames, Metrics};
use crate::openapi::Completion;
use crate::otel;
use crate::primitives;

/// What every handler shares: one reference-counted pointer, because every middleware layer
/// and handler of every request clones it (one atomic increment and decrement each, instead of
/// one per field, on counters both cores touch).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl AppState {
    /// The state of a router.
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// The fields of [`AppState`].
pub struct Shared {
    /// The guard engine.
    pub engine: Engine,
    /// The API keys (none: authentication off).
    pub keys: Arc<Keys>,
    /// The Prometheus metrics (also the engine's observer, when the server opened it).
    pub metrics: Arc<Metrics>,
    /// Becomes true when the server shuts down: long-lived responses (watch streams) end.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// A permit per open watch stream (`max_watches`): past it, a new watch answers `503`.
    pub watches: Arc<tokio::sync::Semaphore>,
}

/// Watch streams open at once by default (`max_watches`). A watcher that does not read holds
/// its stream's buffers (measured: about 330 KB each while its socket is full).
pub const DEFAULT_MAX_WATCHES: usize = 1024;

/// The router of API v1 over an engine (tests drive it without a socket). Its `/metrics`
/// has the HTTP metrics only: the engine's are there when the engine was opened with the
/// router's [`Metrics`] as its observer, as [`app_with_shutdown`]'s caller `serve` does.
pub fn app(engine: Engine) -> Router {
    // Nothing will signal it: the sender is dropped, which watchers read as "never".
    let (_, shutdown) = tokio::sync::watch::channel(false);
    app_with_shutdown(engine, Keys::default(), Arc::new(Metrics::new(LabelNames::default())), shutdown)
}

/// The router, with a signal that ends long-lived responses (watch streams) so that a
/// graceful shutdown does not wait for watchers forever.
pub fn app_with_shutdown(
    engine: Engine,
    keys: Keys,
    metrics: Arc<Metrics>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Router {
    let watches = Arc::new(tokio::sync::Semaphore::new(DEFAULT_MAX_WATCHES));
    router(AppState::new(Shared { engine, keys: Arc::new(keys), metrics, shutdown, watches }))
}

/// The templates of the routes that [`crate::hot`] also serves without the router.
pub(crate) mod route {
    /// `GET` and `PUT` (and `DELETE`) of one key.
    pub const KV_KEY: &str = "/v1/ns/{ns}/kv/{*key}";
    /// `POST`: a check.
    pub const CHECK: &str = "/v1/ns/{ns}/check";
    /// `POST`: an act.
    pub const ACT: &str = "/v1/ns/{ns}/act";
    /// `POST`: a reservation from a pool.
    pub const RESERVE: &str = "/v1/ns/{ns}/pools/{pool}/reserve";
    /// `POST`: a reservation's commit.
    pub const COMMIT: &str = "/v1/ns/{ns}/reservations/{id}/commit";
}

/// The router of API v1 over `state`.
pub(crate) fn router(state: AppState) -> Router {
    let router = Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics::scrape))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/ns/{ns}/kv", get(list_kv))
        .route(route::KV_KEY, get(get_kv).put(put_kv).delete(delete_kv))
        .route(route::CHECK, post(check))
        .route(route::ACT, post(act))
        .route("/v1/ns/{ns}/txn", post(txn))
        .route("/v1/ns/{ns}/audit", get(audit))
        .route("/v1/audit/verify", get(audit_verify))
        .route("/v1/slo", get(slo))
        .route("/v1/ns/{ns}/pools/{pool}", get(primitives::get_pool).put(primitives::set_pool))
        .route(route::RESERVE, post(primitives::reserve))
        .route("/v1/ns/{ns}/reservations/{id}", get(primitives::get_reservation))
        .route(route::COMMIT, post(primitives::commit))
        .route("/v1/ns/{ns}/reservations/{id}/release", post(primitives::release))
        .route("/v1/ns/{ns}/leases/{name}", get(primitives::get_lease))
        .route("/v1/ns/{ns}/leases/{name}/acquire", post(primitives::acquire))
        .route("/v1/ns/{ns}/leases/{name}/renew", post(primitives::renew))
        .route("/v1/ns/{ns}/leases/{name}/release", post(primitives::release_lease))
        .route("/v1/ns/{ns}/grants", get(primitives::list_grants).post(primitives::grant))
        .route("/v1/ns/{ns}/grants/revoke", post(primitives::revoke))
        .route("/v1/ns/{ns}/orphans", get(primitives::list_orphans))
        .route("/v1/ns/{ns}/orphans/{id}/resolve", post(primitives::resolve_orphan))
        .route("/v1/ns/{ns}/watch", get(primitives::watch))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    router
        .layer(axum::middleware::from_fn_with_state(state.clone(), envelope))
        .layer(CatchPanicLayer::custom(|_: Box<dyn std::any::Any + Send>| panicked()))
        .with_state(state)
}

/// The answer to a request whose handler panicked.
pub(crate) fn panicked() -> Response {
    ApiError::internal(&"a request handler panicked").into_response()
}

async fn not_found(uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        api::codes::NO_ROUTE,
        format!("no route for {}; see /v1/openapi.json", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        api::codes::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on {}", uri.path()),
    )
}

pub(crate) fn engine_error(e: EngineError) -> ApiError {
    match e {
        EngineError::IdempotencyConflict => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            api::codes::IDEMPOTENCY_KEY_REUSED,
            "this Idempotency-Key was already used with a different request; use a new key for a new request",
        ),
        EngineError::IdempotencyInProgress => ApiError::new(
            StatusCode::CONFLICT,
            api::codes::IDEMPOTENCY_IN_PROGRESS,
            "a request with this Idempotency-Key is still in flight; retry after it completes",
        ),
        EngineError::Unavailable(why) => ApiError::unavailable(format!("the store is not accepting writes: {why}")),
        other => ApiError::internal(&other),
    }
}

/// Waits until this node has every write any node acknowledged before the request began (a
/// no-op over the embedded store; over PostgreSQL one read of the change log).
pub(crate) async fn fresh(state: &AppState) -> Result<(), ApiError> {
    state.engine.fresh().await.map_err(|e| match e {
        EngineError::Unavailable(why) => ApiError::unavailable(format!("cannot read the current state: {why}")),
        other => engine_error(other),
    })
}

pub(crate) fn context(correlation: Correlation) -> RequestContext {
    RequestContext { correlation_id: Some(correlation.id), api_key_id: correlation.api_key, trace: None }
}

/// The `Idempotency-Key` of a mutating request, bound to the request's fingerprint.
pub(crate) fn idempotency(
    correlation: &Correlation,
    headers: &HeaderMap,
    ns: &str,
    method: &Method,
    uri: &Uri,
    raw: &[u8],
    state: &AppState,
) -> Result<Option<IdempotencyClaim>, ApiError> {
    let mut given = headers.get_all("idempotency-key").iter();
    let Some(value) = given.next() else { return Ok(None) };
    if given.next().is_some() {
        // Which one would a retry send? Neither can be trusted to be the key of this write.
        return Err(ApiError::invalid("Idempotency-Key", "given more than once: send one key per request"));
    }
    let max = state.engine.limits().max_idempotency_key_bytes;
    let key = value.to_str().ok().filter(|k| !k.is_empty() && k.bytes().all(|b| b.is_ascii_graphic()));
    let Some(key) = key else {
        return Err(ApiError::invalid("Idempotency-Key", "must be 1 or more visible ASCII characters"));
    };
    if key.len() > max {
        return Err(ApiError::invalid(
            "Idempotency-Key",
            format!("is {} bytes, longer than the limit of {max}", key.len()),
        ));
    }
    // The path as the router reads it: the same request with its path encoded differently
    // (`/shop/` or `/sh%6Fp/`) is the same request.
    let path: std::borrow::Cow<[u8]> = percent_encoding::percent_decode_str(uri.path()).into();
    let mut hasher = blake3::Hasher::new();
    hasher.update(method.as_str().as_bytes()).update(b"\n").update(&path).update(b"\n").update(raw);
    Ok(Some(IdempotencyClaim {
        // Scoped to the API key: one tenant cannot replay another's key to read its response.
        key: IdempotencyKey {
            ns: ns.to_owned(),
            scope: correlation.api_key.clone().unwrap_or_default(),
            key: key.to_owned(),
        },
        fingerprint: *hasher.finalize().as_bytes(),
    }))
}

/// Runs a write through the engine and renders its outcome.
async fn write(
    state: &AppState,
    request: WriteRequest,
    correlation: Correlation,
    claim: Option<IdempotencyClaim>,
    subject: &str,
    trace: impl FnOnce(&tracing::Span, Option<&gapguard_core::Outcome>),
) -> Result<Response, ApiError> {
    let ns = request.ns().to_owned();
    write_with(state, request, correlation, claim, trace, |outcome| convert::outcome(outcome, &ns, subject)).await
}

/// Runs a write through the engine and renders its outcome with `render` (a pure function of
/// the outcome, so that an idempotent replay answers exactly what the first request got).
///
/// `trace` sets the request span's `toctou.*` attributes: from the outcome when the write was
/// applied now, and without one (`None`) when the request was dropped while its write was with
/// the engine (past its deadline, answered `503 outcome_unknown`: it may have applied, so it
/// is traced as a mutation or use that may have happened). It does not run for a write that
/// failed, which applied nothing, nor for an idempotent replay, which applied nothing either
/// and is no check's use and no mutation inside anyone's window: that span gets
/// `gapguard.idempotent_replay = true` and no `toctou.*` attributes.
pub(crate) async fn write_with<T: FnOnce(&tracing::Span, Option<&gapguard_core::Outcome>)>(
    state: &AppState,
    request: WriteRequest,
    correlation: Correlation,
    claim: Option<IdempotencyClaim>,
    trace: T,
    render: impl FnOnce(gapguard_core::Outcome) -> Response,
) -> Result<Response, ApiError> {
    let span = tracing::Span::current();
    let mut pending = TraceIfDropped { trace: (!span.is_disabled()).then_some(trace), span };
    let result = state.engine.write(request, context(correlation), claim).await;
    // Answered: the outcome decides.
    let trace = pending.trace.take();
    let result = result.map_err(engine_error)?;
    if let Some(trace) = trace {
        if result.replayed {
            otel::mark_replay(&pending.span);
        } else {
            trace(&pending.span, Some(&result.outcome));
        }
    }
    let mut response = render(result.outcome);
    if result.replayed {
        response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    Ok(response)
}

/// Runs a write's `trace` without an outcome if the request is dropped before the engine
/// answered (see [`write_with`]).
struct TraceIfDropped<T: FnOnce(&tracing::Span, Option<&gapguard_core::Outcome>)> {
    trace: Option<T>,
    span: tracing::Span,
}

impl<T: FnOnce(&tracing::Span, Option<&gapguard_core::Outcome>)> Drop for TraceIfDropped<T> {
    fn drop(&mut self) {
        if let Some(trace) = self.trace.take() {
            trace(&self.span, None);
        }
    }
}

#[utoipa::path(get, path = "/healthz", responses(
    (status = 200, body = api::HealthResponse), (status = 503, body = api::HealthResponse, description = "the store failed")))]
pub(crate) async fn healthz(State(state): State<AppState>) -> Response {
    let revision = state.engine.snapshot().revision;
    match state.engine.writer_failure() {
        None => Json(api::HealthResponse { status: "ok".into(), revision }).into_response(),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, Json(api::HealthResponse { status: "failing".into(), revision }))
            .into_response(),
    }
}

/// Readiness: whether this node can serve requests now. Over PostgreSQL it asks the database,
/// so a load balancer takes a node that lost it out of rotation; `/healthz` stays `ok` while
/// the process is sound (the node recovers by itself when the database returns).
#[utoipa::path(get, path = "/readyz", responses(
    (status = 200, body = api::HealthResponse), (status = 503, body = api::ErrorBody, description = "the store or database cannot be reached")))]
async fn readyz(State(state): State<AppState>) -> Response {
    match state.engine.ready().await {
        Ok(()) => Json(api::HealthResponse { status: "ready".into(), revision: state.engine.snapshot().revision })
            .into_response(),
        Err(why) => ApiError::unavailable(format!("not ready: {why}")).into_response(),
    }
}

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

#[utoipa::path(put, path = "/v1/ns/{ns}/kv/{key}", request_body = api::PutRequest,
    params(("ns" = String, Path), ("key" = String, Path, description = "may contain `/`"),
        ("Idempotency-Key" = Option<String>, Header), ("X-Correlation-Id" = Option<String>, Header)),
    responses((status = 200, body = api::PutResponse), (status = 400, body = api::ErrorBody), (status = 413, body = api::ErrorBody)))]
pub(crate) async fn put_kv(
    State(state): State<AppState>,
    ApiPath((ns, key)): ApiPath<(String, String)>,
    Extension(correlation): Extension<Correlation>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody<api::PutRequest>,
) -> Result<Response, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::key(&key, "key", limits)?;
    convert::value(&body.value.value, "value", body.raw.len(), limits)?;
    let claim = idempotency(&correlation, &headers, &ns, &method, &uri, &body.raw, &state)?;
    let request = WriteRequest::Put { ns, key: key.clone(), value: body.value.value };
    write(&state, request, correlation, claim, &key, |span, _| otel::set_mutate(span, &[otel::ResourceKey::user(&key)]))
        .await
}

#[utoipa::path(get, path = "/v1/ns/{ns}/kv/{key}", params(("ns" = String, Path), ("key" = String, Path)),
    responses((status = 200, body = api::KeyValue), (status = 404, body = api::ErrorBody)))]
pub(crate) async fn get_kv(
    State(state): State<AppState>,
    ApiPath((ns, key)): ApiPath<(String, String)>,
) -> Result<Json<api::KeyValue>, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::key(&key, "key", limits)?;
    fresh(&state).await?;
    match state.engine.get(&ns, &key).0 {
        Some(r) => Ok(Json(api::KeyValue {
            key,
            value: r.value,
            version: r.version,
            create_revision: r.create_revision,
            mod_revision: r.mod_revision,
        })),
        None => Err(ApiError::not_found(format!("no key {key:?} in namespace {ns:?}"))),
    }
}

#[utoipa::path(delete, path = "/v1/ns/{ns}/kv/{key}", request_body = Option<api::EmptyRequest>,
    params(("ns" = String, Path), ("key" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = api::DeleteResponse), (status = 404, body = api::ErrorBody)))]
async fn delete_kv(
    State(state): State<AppState>,
    ApiPath((ns, key)): ApiPath<(String, String)>,
    Extension(correlation): Extension<Correlation>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::key(&key, "key", limits)?;
    let (method, uri, headers, raw) = primitives::empty_body(&state, req).await?;
    let claim = idempotency(&correlation, &headers, &ns, &method, &uri, &raw, &state)?;
    let request = WriteRequest::Delete { ns, key: key.clone() };
    write(&state, request, correlation, claim, &key, |span, _| otel::set_mutate(span, &[otel::ResourceKey::user(&key)]))
        .await
}

/// Query of a prefix listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ListParams {
    /// Only keys starting with this (default: all).
    #[serde(default)]
    prefix: String,
    /// Only keys after this one (exclusive): the last key of the previous page, when it said
    /// `more`.
    after: Option<String>,
    /// At most this many items (default 1000, at most 10000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/v1/ns/{ns}/kv", params(("ns" = String, Path), ListParams),
    responses((status = 200, body = api::ListResponse), (status = 400, body = api::ErrorBody)))]
async fn list_kv(
    State(state): State<AppState>,
    ApiPath(ns): ApiPath<String>,
    ApiQuery(params): ApiQuery<ListParams>,
) -> Result<Json<api::ListResponse>, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    let limit = convert::list_limit(params.limit, 1000, limits)?;
    fresh(&state).await?;
    let (items, more, revision) = state.engine.list(&ns, &params.prefix, params.after.as_deref(), limit);
    let items = items
        .into_iter()
        .map(|kv| api::KeyValue {
            key: kv.key,
            value: kv.record.value,
            version: kv.record.version,
            create_revision: kv.record.create_revision,
            mod_revision: kv.record.mod_revision,
        })
        .collect();
    Ok(Json(api::ListResponse { items, more, revision }))
}

#[utoipa::path(post, path = "/v1/ns/{ns}/check", request_body = api::CheckRequest, params(("ns" = String, Path)),
    responses((status = 200, body = api::CheckResponse), (status = 412, body = api::ErrorBody, description = "check_failed, with `failed`"),
        (status = 400, body = api::ErrorBody)))]
pub(crate) async fn check(
    State(state): State<AppState>,
    ApiPath(ns): ApiPath<String>,
    Extension(correlation): Extension<Correlation>,
    body: JsonBody<api::CheckRequest>,
) -> Result<Json<api::CheckResponse>, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    let request = body.value;
    let conditions = convert::conditions(request.conditions, "conditions", 1, body.raw.len(), limits)?;
    let ttl_ms = convert::ttl_ms(request.ttl_ms, limits)?;
    convert::flow(&request.flow, limits)?;
    fresh(&state).await?;
    // The store has stopped taking writes: no act could use a ticket, so none is issued.
    if let Some(why) = state.engine.writer_failure() {
        return Err(ApiError::unavailable(format!(
            "the store is not accepting writes, so no act could use a ticket: {why}"
        )));
    }
    let span = tracing::Span::current();
    // Spans that are not exported cost nothing: no attributes, no ids, no copies of conditions.
    let traced = (!span.is_disabled()).then(|| {
        let resources = otel::resource_keys(&conditions, []);
        otel::set_toctou(&span, "check", &resources, request.flow.as_deref());
        (resources, conditions.clone())
    });
    // The ticket carries this span's ids, so the act's span can link to it.
    let trace = if traced.is_some() { otel::ids(&span) } else { None };
    let context = RequestContext { trace, ..context(correlation) };
    let checked = state.engine.check(&ns, conditions, ttl_ms, request.flow, &context);
    if let Some((resources, conditions)) = traced {
        let failed = checked.as_ref().err().map_or(&[][..], Vec::as_slice);
        otel::set_authz(&span, otel::check_decision(&conditions, failed), otel::permitted_subject(&conditions));
        if let Ok(issued) = &checked {
            // The versions the check saw: those of the state at its revision.
            let seen = otel::versions_seen(
                &state.engine.snapshot(),
                &ns,
                &resources,
                issued.revision,
                None,
                &Default::default(),
            );
            otel::set_versions(&span, &seen);
        }
    }
    let issued = checked.map_err(convert::check_failed)?;
    Ok(Json(api::CheckResponse {
        ticket: issued.ticket,
        revision: issued.revision,
        expires_at: convert::rfc3339(issued.expires_at_ms),
        expires_at_ms: issued.expires_at_ms,
    }))
}

#[utoipa::path(post, path = "/v1/ns/{ns}/act", request_body = api::ActRequest,
    params(("ns" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = api::ActResponse),
        (status = 409, body = api::ErrorBody, description = "stale_check (with `changed`), condition_failed (with `failed`), ticket_used, not_a_number, overflow"),
        (status = 410, body = api::ErrorBody, description = "ticket_expired"),
        (status = 400, body = api::ErrorBody, description = "invalid_request, invalid_ticket")))]
pub(crate) async fn act(
    State(state): State<AppState>,
    ApiPath(ns): ApiPath<String>,
    Extension(correlation): Extension<Correlation>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody<api::ActRequest>,
) -> Result<Response, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    let raw_len = body.raw.len();
    let request = body.value;
    let conditions = convert::conditions(request.conditions, "conditions", 0, raw_len, limits)?;
    let ops = convert::ops(request.ops, "ops", 1, raw_len, limits)?;
    crate::auth::admit_ops(&state.keys, &correlation, [("ops", &ops[..])])?;
    convert::flow(&request.flow, limits)?;
    let ticket = match &request.ticket {
        Some(t) => Some(state.engine.verify_ticket(t).map_err(|e| {
            state.metrics.act_rejected(&ns, request.flow.as_deref(), api::codes::INVALID_TICKET);
            ApiError::new(StatusCode::BAD_REQUEST, api::codes::INVALID_TICKET, e.to_string()).with("field", "ticket")
        })?),
        None => None,
    };
    let span = tracing::Span::current();
    let claims = ticket.as_ref().map(|t| t.claims());
    let traced = (!span.is_disabled()).then(|| {
        let checked = claims.into_iter().flat_map(|c| &c.conditions);
        let flow = request.flow.as_deref().or(claims.and_then(|c| c.flow.as_deref())).map(str::to_owned);
        let resources = otel::resource_keys(checked.chain(&conditions), &ops);
        let link = match claims {
            Some(TicketClaims { trace_id: Some(trace_id), span_id: Some(span_id), .. }) => {
                Some((trace_id.clone(), span_id.clone()))
            }
            _ => None,
        };
        let ticket_conditions = claims.map(|c| c.conditions.clone()).unwrap_or_default();
        // Where the act is evaluated, the state is at least this new.
        let before = state.engine.snapshot().revision;
        (resources, flow, link, ticket_conditions, conditions.clone(), before, otel::rewritten(&ops))
    });
    let claim = idempotency(&correlation, &headers, &ns, &method, &uri, &body.raw, &state)?;
    let request = WriteRequest::Act(Act { ns: ns.clone(), ticket, conditions, ops, flow: request.flow });
    let trace = |span: &tracing::Span, outcome: Option<&gapguard_core::Outcome>| {
        let Some((resources, flow, link, ticket_conditions, own, before, rewritten)) = traced else { return };
        otel::set_toctou(span, "use", &resources, flow.as_deref());
        if let Some((trace_id, span_id)) = link {
            otel::link_to_check(span, &trace_id, &span_id);
        }
        // Past its deadline the act's fate is unknown: a use that may have happened.
        let Some(outcome) = outcome else { return };
        let decision = otel::act_decision(&ticket_conditions, &own, outcome);
        otel::set_authz(span, decision, otel::permitted_subject(ticket_conditions.iter().chain(&own)));
        let written_at = match outcome {
            gapguard_core::Outcome::Acted { revision, .. } => Some(*revision),
            _ => None,
        };
        // A committed act saw the state just before its own revision; a refused one, some
        // state from `before` on.
        let at = written_at.map_or(before, |w| w - 1);
        let seen = otel::versions_seen(&state.engine.snapshot(), &ns, &resources, at, written_at, &rewritten);
        otel::set_versions(span, &seen);
    };
    write_with(&state, request, correlation, claim, trace, |outcome| convert::outcome(outcome, &ns, "")).await
}

#[utoipa::path(post, path = "/v1/ns/{ns}/txn", request_body = api::TxnRequest,
    params(("ns" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = api::TxnResponse), (status = 409, body = api::ErrorBody, description = "an op failed"),
        (status = 400, body = api::ErrorBody)))]
async fn txn(
    State(state): State<AppState>,
    ApiPath(ns): ApiPath<String>,
    Extension(correlation): Extension<Correlation>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody<api::TxnRequest>,
) -> Result<Response, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    let raw_len = body.raw.len();
    let request = body.value;
    let compare = convert::conditions(request.compare, "if", 0, raw_len, limits)?;
    let success = convert::ops(request.success, "then", 0, raw_len, limits)?;
    let failure = convert::ops(request.failure, "else", 0, raw_len, limits)?;
    crate::auth::admit_ops(&state.keys, &correlation, [("then", &success[..]), ("else", &failure[..])])?;
    let claim = idempotency(&correlation, &headers, &ns, &method, &uri, &body.raw, &state)?;
    // A mutation of what it may write (either branch), not of what its `if` reads.
    let written =
        (!tracing::Span::current().is_disabled()).then(|| otel::resource_keys([], success.iter().chain(&failure)));
    let request = WriteRequest::Txn(Txn { ns, compare, success, failure });
    write(&state, request, correlation, claim, "", |span, _| {
        otel::set_mutate(span, written.as_deref().unwrap_or_default())
    })
    .await
}

/// Query of the audit log.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct AuditParams {
    /// Only events at or after this revision.
    from_revision: Option<u64>,
    /// Only events after this sequence number (paging cursor: `next_after_seq`).
    after_seq: Option<u64>,
    /// Only events with this correlation id, and acts that presented a ticket of the check
    /// with it.
    correlation_id: Option<String>,
    /// Only events that read or wrote this key.
    key: Option<String>,
    /// At most this many events (default 100, at most 10000).
    #[param(minimum = 1, maximum = 10000)]
    limit: Option<usize>,
    /// The newest matching events instead of the oldest (still oldest first).
    newest: Option<bool>,
}

fn audit_event_wire(e: gapguard_engine::StoredAuditEvent) -> api::AuditEvent {
    let kind = serde_json::to_value(e.event.kind).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    api::AuditEvent {
        seq: e.seq,
        hash: e.hash,
        prev: e.prev,
        revision: e.event.revision,
        at: convert::rfc3339(e.event.at_ms),
        at_ms: e.event.at_ms,
        ns: e.event.ns,
        kind,
        outcome: e.event.outcome,
        reason: e.event.reason,
        keys: e.event.keys,
        api_key_id: e.event.api_key_id,
        correlation_id: e.event.correlation_id,
        flow: e.event.flow,
        detail: e.event.detail,
        check: e.event.check.map(|c| api::AuditCheck {
            revision: c.revision,
            issued_at_ms: c.issued_at_ms,
            correlation_id: c.correlation_id,
        }),
    }
}

#[utoipa::path(get, path = "/v1/ns/{ns}/audit", params(("ns" = String, Path), AuditParams),
    responses((status = 200, body = api::AuditResponse), (status = 400, body = api::ErrorBody)))]
async fn audit(
    State(state): State<AppState>,
    ApiPath(ns): ApiPath<String>,
    ApiQuery(params): ApiQuery<AuditParams>,
) -> Result<Json<api::AuditResponse>, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    let limit = convert::list_limit(params.limit, 100, limits)?;
    let query = AuditQuery {
        ns: Some(ns),
        from_revision: params.from_revision.unwrap_or(0),
        after_seq: params.after_seq.unwrap_or(0),
        correlation_id: params.correlation_id,
        key: params.key,
        limit,
        newest: params.newest.unwrap_or(false),
    };
    fresh(&state).await?;
    let engine = state.engine.clone();
    let page = tokio::task::spawn_blocking(move || engine.audit(&query))
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(engine_error)?;
    let events = page.events.into_iter().map(audit_event_wire).collect();
    Ok(Json(api::AuditResponse { events, next_after_seq: page.next_after_seq }))
}

#[utoipa::path(get, path = "/v1/audit/verify", responses((status = 200, body = api::VerifyResponse)))]
async fn audit_verify(State(state): State<AppState>) -> Result<Json<api::VerifyResponse>, ApiError> {
    let engine = state.engine.clone();
    let v = tokio::task::spawn_blocking(move || engine.verify_audit())
        .await
        .map_err(|e| ApiError::internal(&e))?
        .map_err(engine_error)?;
    Ok(Json(api::VerifyResponse {
        ok: v.ok,
        events: v.events,
        head: v.head,
        broken: v.error.map(|e| api::ChainBreak { seq: e.seq, reason: e.reason }),
    }))
}

#[utoipa::path(get, path = "/v1/slo", responses((status = 200, body = api::SloResponse,
    description = "per configured flow with an objective: SLIs and burn rates over 5m, 30m, 1h, 6h and 3d (engine clock), and whether each burn-rate alert would fire")))]
async fn slo(State(state): State<AppState>) -> Json<api::SloResponse> {
    Json(state.metrics.slo_report(state.engine.now_ms()))
}

/// The OpenAPI document of API v1.
#[derive(OpenApi)]
#[openapi(
    info(title = "gapguard", description = "The guard that closes the gap between time of check and time of use."),
    modifiers(&Completion),
    paths(
        healthz,
        readyz,
        put_kv,
        get_kv,
        delete_kv,
        list_kv,
        check,
        act,
        txn,
        audit,
        audit_verify,
        slo,
        primitives::set_pool,
        primitives::get_pool,
        primitives::reserve,
        primitives::get_reservation,
        primitives::commit,
        primitives::release,
        primitives::acquire,
        primitives::renew,
        primitives::release_lease,
        primitives::get_lease,
        primitives::grant,
        primitives::revoke,
        primitives::list_grants,
        primitives::list_orphans,
        primitives::resolve_orphan,
        primitives::watch
    )
)]
pub struct ApiDoc;

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A request dropped while its write is with the engine (past its deadline) still gets its
    /// `toctou.*` attributes, without an outcome; one that was answered, only from the answer.
    #[test]
    fn a_write_dropped_before_its_answer_is_traced_without_an_outcome() {
        let called = Cell::new(None);
        let pending = TraceIfDropped {
            trace: Some(|_: &tracing::Span, o: Option<&gapguard_core::Outcome>| called.set(Some(o.is_some()))),
            span: tracing::Span::none(),
        };
        drop(pending);
        assert_eq!(called.get(), Some(false), "dropped: traced with no outcome");

        let called = Cell::new(None);
        let mut pending = TraceIfDropped {
            trace: Some(|_: &tracing::Span, o: Option<&gapguard_core::Outcome>| called.set(Some(o.is_some()))),
            span: tracing::Span::none(),
        };
        assert!(pending.trace.take().is_some());
        drop(pending);
        assert_eq!(called.get(), None, "answered: not traced on drop");
    }
}
