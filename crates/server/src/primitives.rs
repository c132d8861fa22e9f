//! Routes of the coordination primitives: pools and reservations, leases, grants, orphans, and
//! the watch stream. Each mutating route is one op through the same writer as every act, so
//! it is atomic, durable, audited, idempotent under `Idempotency-Key`, and seen by watchers.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use bytes::Bytes;
use futures_util::stream::{self, Stream, StreamExt};
use gapguard_api as api;
use gapguard_core::primitives::{self, Grant, Lease, Orphan, OrphanKind, Pool, Reservation, ReservationState};
use gapguard_core::{AuditKind, Op, OpResult, Outcome, WriteRequest};
use gapguard_engine::Change;
use serde::Deserialize;
use tokio::sync::broadcast;
use utoipa::IntoParams;

use crate::convert;
use crate::error::ApiError;
use crate::extract::{decode, ApiPath, ApiQuery, Correlation, JsonBody};
use crate::routes::{idempotency, write_with, AppState};

/// Everything a single-op route needs from its request.
struct Call<'a> {
    state: &'a AppState,
    ns: String,
    correlation: Correlation,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    raw: Bytes,
}

impl Call<'_> {
    async fn run(
        self,
        op: Op,
        kind: AuditKind,
        render: impl FnOnce(Outcome, &str) -> Response,
    ) -> Result<Response, ApiError> {
        let claim =
            idempotency(&self.correlation, &self.headers, &self.ns, &self.method, &self.uri, &self.raw, self.state)?;
        // Every primitive's write is a mutation of its resource (a revocation: `revoke`), which
        // a trace reader looks for inside a check-to-use window.
        let role = if matches!(op, Op::Revoke { .. }) { "revoke" } else { "mutate" };
        let resources = (!tracing::Span::current().is_disabled()).then(|| crate::otel::resource_keys([], [&op]));
        let trace = |span: &tracing::Span, _: Option<&Outcome>| {
            crate::otel::set_toctou(span, role, resources.as_deref().unwrap_or_default(), None);
        };
        let ns = self.ns.clone();
        let request = WriteRequest::Single { ns: self.ns, op, kind };
        write_with(self.state, request, self.correlation, claim, trace, |outcome| match outcome {
            // One op: its position means nothing to the caller.
            Outcome::Refused(gapguard_core::Refusal::OpFailed { error, .. }) => {
                convert::op_error(error).into_response()
            }
            Outcome::Refused(_) => convert::outcome(outcome, &ns, ""),
            other => render(other, &ns),
        })
        .await
    }
}

fn applied(outcome: Outcome, ns: &str) -> Response {
    convert::outcome(outcome, ns, "")
}

fn pool_response(name: String, pool: &Pool, revision: u64) -> api::PoolResponse {
    api::PoolResponse {
        pool: name,
        capacity: pool.capacity,
        used: pool.used,
        reserved: pool.reserved,
        available: pool.available(),
        revision,
    }
}

fn lease_response(name: String, lease: &Lease, now_ms: u64, revision: u64) -> api::LeaseResponse {
    let held = lease.live_holder(now_ms).is_some();
    api::LeaseResponse {
        name,
        holder: if held { lease.holder.clone() } else { None },
        token: lease.token,
        held,
        expires_at: held.then(|| convert::rfc3339(lease.expires_at_ms)),
        expires_at_ms: held.then_some(lease.expires_at_ms),
        revision,
    }
}

/// An optional JSON body: empty means the default.
fn optional_body<T: serde::de::DeserializeOwned + Default>(raw: &[u8]) -> Result<T, ApiError> {
    if raw.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        decode(raw)
    }
}

/// The method, URI, headers (for the idempotency claim) and raw body of a write whose body is
/// none or `{}` (a key's delete, a reservation's commit or release): anything else is refused
/// as a mistake worth telling (such bodies were once ignored).
pub(crate) async fn empty_body(
    state: &AppState,
    req: axum::extract::Request,
) -> Result<(axum::http::Method, axum::http::Uri, axum::http::HeaderMap, Bytes), ApiError> {
    let (method, uri, headers) = (req.method().clone(), req.uri().clone(), req.headers().clone());
    let raw = raw_body(state, req).await?;
    let api::EmptyRequest {} = optional_body(&raw)?;
    Ok((method, uri, headers, raw))
}

/// Reads the raw body of a route whose body is optional (or absent), within the limit.
async fn raw_body(state: &AppState, req: axum::extract::Request) -> Result<Bytes, ApiError> {
    let waiting = crate::extract::expects_continue(req.headers());
    crate::extract::read_body(req.into_body(), waiting, state.engine.limits().max_body_bytes).await
}

macro_rules! call {
    ($state:expr, $ns:expr, $corr:expr, $method:expr, $uri:expr, $headers:expr, $raw:expr) => {
        Call { state: &$state, ns: $ns, correlation: $corr, method: $method, uri: $uri, headers: $headers, raw: $raw }
    };
}

#[utoipa::path(put, path = "/v1/ns/{ns}/pools/{pool}", request_body = api::PoolRequest,
    params(("ns" = String, Path), ("pool" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = api::PoolResponse), (status = 409, body = api::ErrorBody, description = "capacity_too_low")))]
pub(crate) async fn set_pool(
    State(state): State<AppState>,
    ApiPath((ns, pool)): ApiPath<(String, String)>,
    Extension(correlation): Extension<Correlation>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody<api::PoolRequest>,
) -> Result<Response, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::name(&pool, "pool", limits)?;
    let op = Op::SetCapacity { pool, capacity: body.value.capacity };
    call!(state, ns, correlation, method, uri, headers, body.raw)
        .run(op, AuditKind::Pool, |outcome, ns| match outcome {
            Outcome::Applied { revision, result: OpResult::SetCapacity { pool } } => {
                let counters = Pool { capacity: pool.capacity, used: pool.used, reserved: pool.reserved };
                Json(pool_response(pool.pool, &counters, revision)).into_response()
            }
            other => applied(other, ns),
        })
        .await
}

#[utoipa::path(get, path = "/v1/ns/{ns}/pools/{pool}", params(("ns" = String, Path), ("pool" = String, Path)),
    responses((status = 200, body = api::PoolResponse), (status = 404, body = api::ErrorBody, description = "pool_not_found")))]
pub(crate) async fn get_pool(
    State(state): State<AppState>,
    ApiPath((ns, pool)): ApiPath<(String, String)>,
) -> Result<Json<api::PoolResponse>, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::name(&pool, "pool", limits)?;
    crate::routes::fresh(&state).await?;
    let snap = state.engine.snapshot();
    let key = gapguard_core::NsKey::new(ns.as_str(), primitives::pool_key(&pool));
    let counters: Pool = primitives::decode(&key, snap.entries.get(&key).map(|e| &**e))
        .ok_or_else(|| convert::op_error(gapguard_core::OpError::PoolNotFound { pool: pool.clone() }))?;
    Ok(Json(pool_response(pool, &counters, snap.revision)))
}

#[utoipa::path(post, path = "/v1/ns/{ns}/pools/{pool}/reserve", request_body = api::ReserveRequest,
    params(("ns" = String, Path), ("pool" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = api::ReserveResponse), (status = 409, body = api::ErrorBody, description = "insufficient (with `available`)"),
        (status = 404, body = api::ErrorBody, description = "pool_not_found")))]
pub(crate) async fn reserve(
    State(state): State<AppState>,
    ApiPath((ns, pool)): ApiPath<(String, String)>,
    Extension(correlation): Extension<Correlation>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody<api::ReserveRequest>,
) -> Result<Response, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    let r = body.value;
    let op = convert::reserve(pool, r.amount, r.ttl_ms, r.context, "", body.raw.len(), limits)?;
    call!(state, ns, correlation, method, uri, headers, body.raw)
        .run(op, AuditKind::Reservation, |outcome, ns| match outcome {
            Outcome::Applied { revision, result: OpResult::Reserve { reservation, pool, amount, expires_at_ms } } => {
                let expires_at = convert::rfc3339(expires_at_ms);
                Json(api::ReserveResponse { reservation, pool, amount, expires_at, expires_at_ms, revision })
                    .into_response()
            }
            other => applied(other, ns),
        })
        .await
}

#[utoipa::path(get, path = "/v1/ns/{ns}/reservations/{id}", params(("ns" = String, Path), ("id" = String, Path)),
    responses((status = 200, body = api::ReservationResponse), (status = 404, body = api::ErrorBody)))]
pub(crate) async fn get_reservation(
    State(state): State<AppState>,
    ApiPath((ns, id)): ApiPath<(String, String)>,
) -> Result<Json<api::ReservationResponse>, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::name(&id, "reservation", limits)?;
    crate::routes::fresh(&state).await?;
    let r: Reservation = state
        .engine
        .primitive(&ns, &primitives::reservation_key(&id))
        .ok_or_else(|| convert::op_error(gapguard_core::OpError::ReservationNotFound { reservation: id.clone() }))?;
    let state_name = match r.state {
        ReservationState::Held => "held",
        ReservationState::Committed => "committed",
        ReservationState::Released => "released",
        ReservationState::Expired => "expired",
    };
    Ok(Json(api::ReservationResponse {
        reservation: id,
        pool: r.pool,
        amount: r.amount,
        state: state_name.into(),
        expires_at: convert::rfc3339(r.expires_at_ms),
        expires_at_ms: r.expires_at_ms,
        context: r.context,
    }))
}

async fn resolve_reservation(
    state: AppState,
    ns: String,
    id: String,
    correlation: Correlation,
    req: axum::extract::Request,
    commit: bool,
) -> Result<Response, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::name(&id, "reservation", limits)?;
    let (method, uri, headers, raw) = empty_body(&state, req).await?;
    let op = if commit { Op::Commit { reservation: id } } else { Op::Release { reservation: id } };
    call!(state, ns, correlation, method, uri, headers, raw).run(op, AuditKind::Reservation, applied).await
}

#[utoipa::path(post, path = "/v1/ns/{ns}/reservations/{id}/commit", request_body = Option<api::EmptyRequest>,
    params(("ns" = String, Path), ("id" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = api::AppliedResponse), (status = 410, body = api::ErrorBody, description = "reservation_expired"),
        (status = 409, body = api::ErrorBody, description = "reservation_released, reservation_committed"), (status = 404, body = api::ErrorBody)))]
pub(crate) async fn commit(
    State(state): State<AppState>,
    ApiPath((ns, id)): ApiPath<(String, String)>,
    Extension(correlation): Extension<Correlation>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    resolve_reservation(state, ns, id, correlation, req, true).await
}

#[utoipa::path(post, path = "/v1/ns/{ns}/reservations/{id}/release", request_body = Option<api::EmptyRequest>,
    params(("ns" = String, Path), ("id" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = api::AppliedResponse), (status = 410, body = api::ErrorBody, description = "reservation_expired"),
        (status = 409, body = api::ErrorBody, description = "reservation_committed, reservation_released"), (status = 404, body = api::ErrorBody)))]
pub(crate) async fn release(
    State(state): State<AppState>,
    ApiPath((ns, id)): ApiPath<(String, String)>,
    Extension(correlation): Extension<Correlation>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    resolve_reservation(state, ns, id, correlation, req, false).await
}

fn lease_op_response(outcome: Outcome, ns: &str) -> Response {
    match outcome {
        Outcome::Applied { revision, result: OpResult::Lease { name, holder, token, expires_at_ms } } => {
            let held = holder.is_some();
            Json(api::LeaseResponse {
                name,
                holder,
                token,
                held,
                expires_at: held.then(|| convert::rfc3339(expires_at_ms)),
                expires_at_ms: held.then_some(expires_at_ms),
                revision,
            })
            .into_response()
        }
        other => applied(other, ns),
    }
}

#[utoipa::path(post, path = "/v1/ns/{ns}/leases/{name}/acquire", request_body = api::AcquireRequest,
    params(("ns" = String, Path), ("name" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = api::LeaseResponse), (status = 409, body = api::ErrorBody, description = "lease_held (with `holder`, `expires_at`)")))]
pub(crate) async fn acquire(
    State(state): State<AppState>,
    ApiPath((ns, name)): ApiPath<(String, String)>,
    Extension(correlation): Extension<Correlation>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody<api::AcquireRequest>,
) -> Result<Response, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::name(&name, "lease", limits)?;
    convert::name(&body.value.holder, "holder", limits)?;
    let ttl_ms = convert::hold_ttl_ms(body.value.ttl_ms, "ttl_ms", limits)?;
    let op = Op::Acquire { name, holder: body.value.holder, ttl_ms };
    call!(state, ns, correlation, method, uri, headers, body.raw).run(op, AuditKind::Lease, lease_op_response).await
}

#[utoipa::path(post, path = "/v1/ns/{ns}/leases/{name}/renew", request_body = api::RenewRequest,
    params(("ns" = String, Path), ("name" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = api::LeaseResponse), (status = 409, body = api::ErrorBody, description = "lease_lost")))]
pub(crate) async fn renew(
    State(state): State<AppState>,
    ApiPath((ns, name)): ApiPath<(String, String)>,
    Extension(correlation): Extension<Correlation>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody<api::RenewRequest>,
) -> Result<Response, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::name(&name, "lease", limits)?;
    let ttl_ms = body.value.ttl_ms.map(|t| convert::hold_ttl_ms(t, "ttl_ms", limits)).transpose()?;
    let op = Op::Renew { name, token: body.value.token, ttl_ms };
    call!(state, ns, correlation, method, uri, headers, body.raw).run(op, AuditKind::Lease, lease_op_response).await
}

#[utoipa::path(post, path = "/v1/ns/{ns}/leases/{name}/release", request_body = api::LeaseReleaseRequest,
    params(("ns" = String, Path), ("name" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = api::LeaseResponse), (status = 409, body = api::ErrorBody, description = "lease_lost")))]
pub(crate) async fn release_lease(
    State(state): State<AppState>,
    ApiPath((ns, name)): ApiPath<(String, String)>,
    Extension(correlation): Extension<Correlation>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody<api::LeaseReleaseRequest>,
) -> Result<Response, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::name(&name, "lease", limits)?;
    let op = Op::Yield { name, token: body.value.token };
    call!(state, ns, correlation, method, uri, headers, body.raw).run(op, AuditKind::Lease, lease_op_response).await
}

#[utoipa::path(get, path = "/v1/ns/{ns}/leases/{name}", params(("ns" = String, Path), ("name" = String, Path)),
    responses((status = 200, body = api::LeaseResponse)))]
pub(crate) async fn get_lease(
    State(state): State<AppState>,
    ApiPath((ns, name)): ApiPath<(String, String)>,
) -> Result<Json<api::LeaseResponse>, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::name(&name, "lease", limits)?;
    crate::routes::fresh(&state).await?;
    let snap = state.engine.snapshot();
    let key = gapguard_core::NsKey::new(ns.as_str(), primitives::lease_key(&name));
    let lease: Lease = primitives::decode(&key, snap.entries.get(&key).map(|e| &**e)).unwrap_or_default();
    Ok(Json(lease_response(name, &lease, state.engine.now_ms(), snap.revision)))
}

/// A grant or a revocation: one op on the grant's key.
async fn grant_op(call: Call<'_>, g: api::GrantTuple, revoke: bool) -> Result<Response, ApiError> {
    let limits = call.state.engine.limits();
    convert::namespace(&call.ns, limits)?;
    convert::grant(&g, "body", limits)?;
    let api::GrantTuple { subject, action, resource } = g;
    let op = if revoke { Op::Revoke { subject, action, resource } } else { Op::Grant { subject, action, resource } };
    call.run(op, AuditKind::Grant, applied).await
}

#[utoipa::path(post, path = "/v1/ns/{ns}/grants", request_body = api::GrantTuple,
    params(("ns" = String, Path), ("Idempotency-Key" = Option<String>, Header)), responses((status = 200, body = api::AppliedResponse)))]
pub(crate) async fn grant(
    State(state): State<AppState>,
    ApiPath(ns): ApiPath<String>,
    Extension(correlation): Extension<Correlation>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody<api::GrantTuple>,
) -> Result<Response, ApiError> {
    grant_op(call!(state, ns, correlation, method, uri, headers, body.raw), body.value, false).await
}

#[utoipa::path(post, path = "/v1/ns/{ns}/grants/revoke", request_body = api::GrantTuple,
    params(("ns" = String, Path), ("Idempotency-Key" = Option<String>, Header)), responses((status = 200, body = api::AppliedResponse)))]
pub(crate) async fn revoke(
    State(state): State<AppState>,
    ApiPath(ns): ApiPath<String>,
    Extension(correlation): Extension<Correlation>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: JsonBody<api::GrantTuple>,
) -> Result<Response, ApiError> {
    grant_op(call!(state, ns, correlation, method, uri, headers, body.raw), body.value, true).await
}

/// Query of a grant listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct GrantParams {
    /// Only grants to this subject.
    subject: Option<String>,
    /// Only grants on this resource.
    resource: Option<String>,
}

#[utoipa::path(get, path = "/v1/ns/{ns}/grants", params(("ns" = String, Path), GrantParams),
    responses((status = 200, body = api::GrantsResponse)))]
pub(crate) async fn list_grants(
    State(state): State<AppState>,
    ApiPath(ns): ApiPath<String>,
    ApiQuery(params): ApiQuery<GrantParams>,
) -> Result<Json<api::GrantsResponse>, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    crate::routes::fresh(&state).await?;
    let revision = state.engine.snapshot().revision;
    let grants = state
        .engine
        .primitives::<Grant>(&ns, "grant/", usize::MAX)
        .into_iter()
        .map(|(_, g)| g)
        .filter(|g| params.subject.as_ref().is_none_or(|s| *s == g.subject))
        .filter(|g| params.resource.as_ref().is_none_or(|r| *r == g.resource))
        .map(|g| api::GrantTuple { subject: g.subject, action: g.action, resource: g.resource });
    let (items, more) = gapguard_engine::first_page(grants, limits.max_list_limit);
    Ok(Json(api::GrantsResponse { items, more, revision }))
}

/// Query of an orphan listing.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct OrphanParams {
    /// Include resolved orphans too.
    all: Option<bool>,
}

fn orphan_item(id: String, o: Orphan) -> api::OrphanItem {
    let mut item = api::OrphanItem {
        id,
        kind: String::new(),
        reservation: None,
        pool: None,
        amount: None,
        context: None,
        lease: None,
        holder: None,
        token: None,
        expired_at: convert::rfc3339(o.expired_at_ms),
        expired_at_ms: o.expired_at_ms,
        resolved: o.resolved,
        note: o.note,
    };
    match o.kind {
        OrphanKind::Reservation { reservation, pool, amount, context } => {
            item.kind = "reservation".into();
            (item.reservation, item.pool, item.amount, item.context) =
                (Some(reservation), Some(pool), Some(amount), context);
        }
        OrphanKind::Lease { lease, holder, token } => {
            item.kind = "lease".into();
            (item.lease, item.holder, item.token) = (Some(lease), Some(holder), Some(token));
        }
    }
    item
}

#[utoipa::path(get, path = "/v1/ns/{ns}/orphans", params(("ns" = String, Path), OrphanParams),
    responses((status = 200, body = api::OrphansResponse)))]
pub(crate) async fn list_orphans(
    State(state): State<AppState>,
    ApiPath(ns): ApiPath<String>,
    ApiQuery(params): ApiQuery<OrphanParams>,
) -> Result<Json<api::OrphansResponse>, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    let all = params.all.unwrap_or(false);
    crate::routes::fresh(&state).await?;
    let revision = state.engine.snapshot().revision;
    let mut items: Vec<api::OrphanItem> = state
        .engine
        .primitives::<Orphan>(&ns, "orphan/", usize::MAX)
        .into_iter()
        .filter(|(_, o)| all || !o.resolved)
        .map(|(id, o)| orphan_item(id, o))
        .collect();
    items.sort_by_key(|o| o.expired_at_ms);
    let (items, more) = gapguard_engine::first_page(items, limits.max_list_limit);
    Ok(Json(api::OrphansResponse { items, more, revision }))
}

#[utoipa::path(post, path = "/v1/ns/{ns}/orphans/{id}/resolve", request_body = Option<api::ResolveRequest>,
    params(("ns" = String, Path), ("id" = String, Path), ("Idempotency-Key" = Option<String>, Header)),
    responses((status = 200, body = api::AppliedResponse), (status = 404, body = api::ErrorBody), (status = 409, body = api::ErrorBody, description = "orphan_resolved")))]
pub(crate) async fn resolve_orphan(
    State(state): State<AppState>,
    ApiPath((ns, id)): ApiPath<(String, String)>,
    Extension(correlation): Extension<Correlation>,
    req: axum::extract::Request,
) -> Result<Response, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    convert::name(&id, "orphan", limits)?;
    let (method, uri, headers) = (req.method().clone(), req.uri().clone(), req.headers().clone());
    let raw = raw_body(&state, req).await?;
    let body: api::ResolveRequest = optional_body(&raw)?;
    if let Some(note) = &body.note {
        convert::value(&serde_json::Value::String(note.clone()), "note", raw.len(), limits)?;
    }
    let op = Op::Resolve { orphan: id, note: body.note };
    call!(state, ns, correlation, method, uri, headers, raw).run(op, AuditKind::Orphan, applied).await
}

/// Query of a watch.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(crate) struct WatchParams {
    /// Only keys starting with this.
    #[serde(default)]
    prefix: String,
    /// Start at this revision (inclusive); default: only changes after now.
    from_revision: Option<u64>,
    /// Comma-separated subset of `kv,lease,pool,reservation,grant,orphan` (default all).
    types: Option<String>,
}

const WATCH_TYPES: [&str; 6] = ["kv", "lease", "pool", "reservation", "grant", "orphan"];

/// A change as a watcher of `ns` is sent it (an [`api::WatchEvent`] as JSON), if it passes the
/// filter. Rendered once per change, whoever watches it ([`Change::rendered`]).
fn watch_event(change: &Change, ns: &str, prefix: &str, types: &[&str]) -> Option<Arc<str>> {
    if change.key.ns != ns {
        return None;
    }
    let (kind, key) = match primitives::describe_internal(&change.key.key) {
        Some(internal) => internal,
        None if primitives::is_internal(&change.key.key) => return None,
        None => ("kv", change.key.key.clone()),
    };
    if !types.contains(&kind) || !key.starts_with(prefix) {
        return None;
    }
    let rendered = change.rendered.get_or_init(|| {
        let record = change.entry.record.as_ref();
        let event = api::WatchEvent {
            revision: change.revision,
            kind: kind.into(),
            key,
            value: record.map_or(serde_json::Value::Null, |r| r.value.clone()),
            version: record.map_or(0, |r| r.version),
            deleted: record.is_none(),
        };
        Arc::from(serde_json::to_string(&event).expect("watch events serialize"))
    });
    Some(Arc::clone(rendered))
}

fn sse_json(name: &str, data: &impl serde::Serialize) -> Event {
    Event::default().event(name).data(serde_json::to_string(data).expect("watch events serialize"))
}

type Live = broadcast::Receiver<Arc<Vec<Arc<Change>>>>;

#[utoipa::path(get, path = "/v1/ns/{ns}/watch", params(("ns" = String, Path), WatchParams, ("Last-Event-ID" = Option<String>, Header)),
    responses((status = 200, body = String, content_type = "text/event-stream", description = "`change` events (data: WatchEvent, id: revision), then `compacted` or `lagged` when the stream must be resumed")))]
pub(crate) async fn watch(
    State(state): State<AppState>,
    ApiPath(ns): ApiPath<String>,
    ApiQuery(params): ApiQuery<WatchParams>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let limits = state.engine.limits();
    convert::namespace(&ns, limits)?;
    let types: Vec<&'static str> = match &params.types {
        None => WATCH_TYPES.to_vec(),
        Some(list) => {
            list.split(',')
                .map(|t| {
                    WATCH_TYPES.iter().find(|known| **known == t.trim()).copied().ok_or_else(|| {
                        ApiError::invalid("types", format!("{t:?} is not one of {}", WATCH_TYPES.join(",")))
                    })
                })
                .collect::<Result<_, _>>()?
        }
    };
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::invalid("Last-Event-ID", "must be a revision number"))?,
        ),
    };
    // Held by the stream until it ends.
    let permit = Arc::clone(&state.watches).try_acquire_owned().map_err(|_| {
        ApiError::unavailable(
            "as many watch streams are open as this server keeps (max_watches): retry after the Retry-After delay",
        )
    })?;
    crate::routes::fresh(&state).await?;
    // `Last-Event-ID` wins: an `EventSource` reconnects to the same URL (its `from_revision`
    // included) with the last id it saw, and must resume there, not replay.
    let from =
        last_event_id.map(|id| id + 1).or(params.from_revision).unwrap_or_else(|| state.engine.snapshot().revision + 1);
    let (prefix, filter_ns) = (params.prefix, ns);
    let filter = move |c: &Change| watch_event(c, &filter_ns, &prefix, &types);
    let events: std::pin::Pin<Box<dyn Stream<Item = Event> + Send>> = match state.engine.watch(from) {
        Err(compacted) => Box::pin(stream::once(async move { compacted_event(compacted.first_available) })),
        Ok(sub) => {
            let backlog: VecDeque<Arc<Change>> = sub.backlog.into_iter().collect();
            let last = from.saturating_sub(1);
            Box::pin(live_events(backlog, sub.live, sub.reset_to, last, filter))
        }
    };
    let mut shutdown = state.shutdown.clone();
    let stopped = async move {
        if shutdown.wait_for(|stop| *stop).await.is_err() {
            // No one can signal a shutdown any more (a router without a server).
            std::future::pending::<()>().await;
        }
    };
    let events = events.take_until(stopped).map(move |event| {
        let _open = &permit;
        event
    });
    Ok(Sse::new(events.map(Ok)).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// The `compacted` event: history before `first_available` is gone (or, on a live stream, no
/// longer whole). The way back is a fresh read, then a watch from just after its revision.
fn compacted_event(first_available: u64) -> Event {
    let data = serde_json::json!({
        "error": "compacted",
        "message": format!(
            "history before revision {first_available} is gone; read the current state, then watch from \
             the revision that read answered plus 1"
        ),
        "first_available_revision": first_available,
    });
    sse_json("compacted", &data)
}

/// The backlog, then each live batch; a watcher that falls too far behind is told where to
/// resume and the stream ends.
fn live_events(
    backlog: VecDeque<Arc<Change>>,
    live: Live,
    reset_to: Arc<std::sync::atomic::AtomicU64>,
    last_revision: u64,
    filter: impl Fn(&Change) -> Option<Arc<str>> + Send + 'static,
) -> impl Stream<Item = Event> + Send {
    struct St<F> {
        pending: VecDeque<Arc<Change>>,
        live: Option<Live>,
        reset_to: Arc<std::sync::atomic::AtomicU64>,
        last_revision: u64,
        filter: F,
    }
    let st = St { pending: backlog, live: Some(live), reset_to, last_revision, filter };
    stream::unfold(st, |mut st| async move {
        loop {
            while let Some(change) = st.pending.pop_front() {
                st.last_revision = change.revision;
                if let Some(event) = (st.filter)(&change) {
                    // The SSE id (what `Last-Event-ID` resumes after) goes on the last event of
                    // a revision only, so a resume never skips the rest of a revision. A batch
                    // holds whole revisions, so looking ahead in `pending` is enough.
                    let more_of_revision = st
                        .pending
                        .iter()
                        .take_while(|c| c.revision == change.revision)
                        .any(|c| (st.filter)(c).is_some());
                    let mut sse = Event::default().event("change").data(&*event);
                    if !more_of_revision {
                        sse = sse.id(change.revision.to_string());
                    }
                    return Some((sse, st));
                }
            }
            let live = st.live.as_mut()?;
            match live.recv().await {
                Ok(batch) if batch.is_empty() => {
                    // The feed was reset: changes after `last_revision` may be missing.
                    st.live = None;
                    let first = st.reset_to.load(std::sync::atomic::Ordering::Acquire);
                    return Some((compacted_event(first), st));
                }
                Ok(batch) => st.pending.extend(batch.iter().cloned()),
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    st.live = None;
                    let data = serde_json::json!({
                        "error": "lagged",
                        "message": "this watcher fell behind; resume with from_revision",
                        "resume_from_revision": st.last_revision + 1,
                    });
                    return Some((sse_json("lagged", &data), st));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::atomic::{AtomicU64, Ordering};

    /// A change is rendered once: every watcher it passes the filter of shares the same text;
    /// one whose filter it fails gets nothing.
    #[test]
    fn a_change_is_rendered_once_for_all_its_watchers() {
        let record =
            gapguard_core::Record { value: json!({"a": [1, 2]}), version: 2, create_revision: 3, mod_revision: 7 };
        let entry = gapguard_core::Entry { record: Some(record), changed_by: None, changed_at: 7 };
        let change = Change::new(7, Arc::new(gapguard_core::NsKey::new("n", "cfg/x")), Arc::new(entry));
        let one = watch_event(&change, "n", "cfg/", &WATCH_TYPES).expect("passes");
        let other = watch_event(&change, "n", "", &["kv"]).expect("passes");
        assert!(Arc::ptr_eq(&one, &other), "rendered twice");
        let event: api::WatchEvent = serde_json::from_str(&one).unwrap();
        assert_eq!(
            (event.revision, event.key.as_str(), event.version, event.value),
            (7, "cfg/x", 2, json!({"a": [1, 2]}))
        );
        assert!(watch_event(&change, "other", "", &WATCH_TYPES).is_none());
        assert!(watch_event(&change, "n", "zz", &WATCH_TYPES).is_none());
    }

    /// A feed reset (a node that reloaded its state) ends a live watch with `compacted`, from
    /// the revision history is whole again: the watcher must not miss changes silently.
    #[tokio::test]
    async fn a_reset_feed_ends_a_live_watch_with_compacted() {
        let (tx, rx) = broadcast::channel(4);
        let reset_to = Arc::new(AtomicU64::new(0));
        let events = live_events(VecDeque::new(), rx, reset_to.clone(), 5, |_: &Change| None);
        reset_to.store(41, Ordering::Release);
        tx.send(Arc::new(Vec::new())).unwrap();
        let body = Sse::new(events.map(Ok::<_, Infallible>)).into_response().into_body();
        let read = tokio::time::timeout(Duration::from_secs(5), axum::body::to_bytes(body, 1 << 20)).await;
        let text = String::from_utf8(read.expect("the stream ends").unwrap().to_vec()).unwrap();
        assert!(text.contains("event: compacted"), "{text}");
        assert!(text.contains("\"first_available_revision\":41"), "{text}");
    }
}
