//! The edge between the wire and the core: decoded requests are checked against the limits
//! and turned into core types; core outcomes become responses. Only this module (and the
//! routes) know both sides.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use gapguard_api as api;
use gapguard_core as core;
use gapguard_core::{Limits, Outcome, Refusal};
use serde_json::Value;

use crate::error::ApiError;

/// Formats ms since the Unix epoch as RFC 3339 with milliseconds.
pub fn rfc3339(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
    humantime::format_rfc3339_millis(t).to_string()
}

/// A namespace name: 1 to `max_namespace_bytes` of `[A-Za-z0-9._-]`.
pub fn namespace(ns: &str, limits: &Limits) -> Result<(), ApiError> {
    let ok_chars = ns.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ns.is_empty() || !ok_chars {
        return Err(ApiError::invalid("namespace", format!("{ns:?} must be 1 or more of A-Z a-z 0-9 . _ -")));
    }
    if ns == "." || ns == ".." {
        // As a key's segments: a URL path cannot carry them as they are (clients resolve them).
        return Err(ApiError::invalid("namespace", format!("{ns:?} cannot be a namespace: a URL cannot name it")));
    }
    if ns.len() > limits.max_namespace_bytes {
        return Err(ApiError::invalid("namespace", format!("longer than {} bytes", limits.max_namespace_bytes)));
    }
    Ok(())
}

/// A key: 1 to `max_key_bytes` bytes of UTF-8 without control characters or `.`/`..` segments.
pub fn key(key: &str, field: &str, limits: &Limits) -> Result<(), ApiError> {
    if key.is_empty() {
        return Err(ApiError::invalid(field, "key is empty"));
    }
    if key.len() > limits.max_key_bytes {
        return Err(ApiError::invalid(
            field,
            format!("key is {} bytes, longer than the limit of {}", key.len(), limits.max_key_bytes),
        ));
    }
    if key.chars().any(char::is_control) {
        return Err(ApiError::invalid(field, "key contains a control character"));
    }
    // A URL cannot address such a key: clients resolve dot segments before sending.
    if key.split('/').any(|segment| segment == "." || segment == "..") {
        return Err(ApiError::invalid(field, "key has a `.` or `..` segment, which no URL can address"));
    }
    Ok(())
}

/// A value no larger than `max_value_bytes` in compact JSON. `raw_len` (the body's size) is
/// an upper bound that spares measuring most values.
pub fn value(value: &Value, field: &str, raw_len: usize, limits: &Limits) -> Result<(), ApiError> {
    if raw_len <= limits.max_value_bytes {
        return Ok(());
    }
    let size = serde_json::to_vec(value).map_or(usize::MAX, |v| v.len());
    if size > limits.max_value_bytes {
        return Err(ApiError::invalid(
            field,
            format!("value is {size} bytes of JSON, larger than the limit of {}", limits.max_value_bytes),
        ));
    }
    Ok(())
}

/// An optional flow name.
pub fn flow(flow: &Option<String>, limits: &Limits) -> Result<(), ApiError> {
    match flow {
        Some(f) if f.is_empty() || f.len() > limits.max_flow_bytes => {
            Err(ApiError::invalid("flow", format!("must be 1 to {} bytes", limits.max_flow_bytes)))
        }
        _ => Ok(()),
    }
}

/// Conditions: at most `max_conditions` (and at least `min`), each with a valid key.
pub fn conditions(
    list: Vec<api::Condition>,
    field: &str,
    min: usize,
    raw_len: usize,
    limits: &Limits,
) -> Result<Vec<core::Condition>, ApiError> {
    if list.len() < min {
        return Err(ApiError::invalid(field, format!("needs at least {min} condition")));
    }
    if list.len() > limits.max_conditions {
        return Err(ApiError::invalid(
            field,
            format!("{} conditions, more than the limit of {}", list.len(), limits.max_conditions),
        ));
    }
    list.into_iter()
        .enumerate()
        .map(|(idx, c)| {
            let at = |name: &str| format!("{field}[{idx}].{name}");
            let c = match c {
                api::Condition::Exists(k) => core::Condition::Exists(k),
                api::Condition::Absent(k) => core::Condition::Absent(k),
                api::Condition::Equals(e) => {
                    value(&e.value, &at("equals.value"), raw_len, limits)?;
                    core::Condition::Equals { key: e.key, value: e.value }
                }
                api::Condition::Version(v) => core::Condition::Version { key: v.key, is: v.is },
                api::Condition::Compare(c) => {
                    core::Condition::Compare { key: c.key, op: compare_op(c.op), value: c.value }
                }
                api::Condition::Lease(l) => {
                    name(&l.name, &at("lease.name"), limits)?;
                    return Ok(core::Condition::Lease { name: l.name, token: l.token });
                }
                api::Condition::Available(a) => {
                    name(&a.pool, &at("available.pool"), limits)?;
                    return Ok(core::Condition::Available { pool: a.pool, amount: a.amount });
                }
                api::Condition::Permitted(g) => {
                    grant(&g, &at("permitted"), limits)?;
                    return Ok(core::Condition::Permitted {
                        subject: g.subject,
                        action: g.action,
                        resource: g.resource,
                    });
                }
            };
            key(&c.key(), &format!("{field}[{idx}].key"), limits)?;
            Ok(c)
        })
        .collect()
}

fn compare_op(op: api::CompareOp) -> core::CompareOp {
    match op {
        api::CompareOp::Eq => core::CompareOp::Eq,
        api::CompareOp::Ne => core::CompareOp::Ne,
        api::CompareOp::Lt => core::CompareOp::Lt,
        api::CompareOp::Le => core::CompareOp::Le,
        api::CompareOp::Gt => core::CompareOp::Gt,
        api::CompareOp::Ge => core::CompareOp::Ge,
    }
}

fn compare_op_wire(op: core::CompareOp) -> api::CompareOp {
    match op {
        core::CompareOp::Eq => api::CompareOp::Eq,
        core::CompareOp::Ne => api::CompareOp::Ne,
        core::CompareOp::Lt => api::CompareOp::Lt,
        core::CompareOp::Le => api::CompareOp::Le,
        core::CompareOp::Gt => api::CompareOp::Gt,
        core::CompareOp::Ge => api::CompareOp::Ge,
    }
}

/// Ops: between `min` and `max_ops`, each with a valid key and value.
pub fn ops(
    list: Vec<api::Op>,
    field: &str,
    min: usize,
    raw_len: usize,
    limits: &Limits,
) -> Result<Vec<core::Op>, ApiError> {
    if list.len() < min {
        return Err(ApiError::invalid(field, format!("needs at least {min} op")));
    }
    if list.len() > limits.max_ops {
        return Err(ApiError::invalid(field, format!("{} ops, more than the limit of {}", list.len(), limits.max_ops)));
    }
    list.into_iter()
        .enumerate()
        .map(|(idx, op)| {
            let op = match op {
                api::Op::Put(p) => {
                    value(&p.value, &format!("{field}[{idx}].put.value"), raw_len, limits)?;
                    core::Op::Put { key: p.key, value: p.value }
                }
                api::Op::Delete(d) => core::Op::Delete { key: d.key },
                api::Op::Add(a) => core::Op::Add { key: a.key, by: a.by },
                api::Op::Reserve(r) => {
                    let at = format!("{field}[{idx}].reserve");
                    return reserve(r.pool, r.amount, r.ttl_ms, r.context, &at, raw_len, limits);
                }
                api::Op::Commit(r) => {
                    name(&r.reservation, &format!("{field}[{idx}].commit.reservation"), limits)?;
                    return Ok(core::Op::Commit { reservation: r.reservation });
                }
                api::Op::Release(r) => {
                    name(&r.reservation, &format!("{field}[{idx}].release.reservation"), limits)?;
                    return Ok(core::Op::Release { reservation: r.reservation });
                }
                api::Op::Grant(g) => {
                    grant(&g, &format!("{field}[{idx}].grant"), limits)?;
                    return Ok(core::Op::Grant { subject: g.subject, action: g.action, resource: g.resource });
                }
                api::Op::Revoke(g) => {
                    grant(&g, &format!("{field}[{idx}].revoke"), limits)?;
                    return Ok(core::Op::Revoke { subject: g.subject, action: g.action, resource: g.resource });
                }
            };
            key(&op.key(), &format!("{field}[{idx}].key"), limits)?;
            Ok(op)
        })
        .collect()
}

/// A listing's `limit` (`default` when not given): 1 to `max_list_limit` (the OpenAPI
/// document's bound on the `limit` parameters, 10,000, is this one's default: keep them alike).
pub fn list_limit(limit: Option<usize>, default: usize, limits: &Limits) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    match (1..=limits.max_list_limit).contains(&limit) {
        true => Ok(limit),
        false => Err(ApiError::invalid("limit", format!("must be 1 to {}", limits.max_list_limit))),
    }
}

/// A name of a pool, lease, reservation, orphan or holder: 1 to `max_name_bytes` bytes
/// without control characters.
pub fn name(name: &str, field: &str, limits: &Limits) -> Result<(), ApiError> {
    if name.is_empty() {
        return Err(ApiError::invalid(field, "is empty"));
    }
    if name.len() > limits.max_name_bytes {
        return Err(ApiError::invalid(
            field,
            format!("is {} bytes, longer than the limit of {}", name.len(), limits.max_name_bytes),
        ));
    }
    if name.chars().any(char::is_control) {
        return Err(ApiError::invalid(field, "contains a control character"));
    }
    Ok(())
}

/// A grant tuple: each part a valid name.
pub fn grant(g: &api::GrantTuple, field: &str, limits: &Limits) -> Result<(), ApiError> {
    name(&g.subject, &format!("{field}.subject"), limits)?;
    name(&g.action, &format!("{field}.action"), limits)?;
    name(&g.resource, &format!("{field}.resource"), limits)
}

/// A reservation or lease TTL within the configured range.
pub fn hold_ttl_ms(ttl: u64, field: &str, limits: &Limits) -> Result<u64, ApiError> {
    if !(limits.hold_ttl_ms_min..=limits.hold_ttl_ms_max).contains(&ttl) {
        return Err(ApiError::invalid(
            field,
            format!("{ttl} is outside the allowed range {}..={} ms", limits.hold_ttl_ms_min, limits.hold_ttl_ms_max),
        ));
    }
    Ok(ttl)
}

/// A reserve op, checked.
pub fn reserve(
    pool: String,
    amount: u64,
    ttl_ms: u64,
    context: Option<Value>,
    field: &str,
    raw_len: usize,
    limits: &Limits,
) -> Result<core::Op, ApiError> {
    let at = |f: &str| if field.is_empty() { f.to_owned() } else { format!("{field}.{f}") };
    name(&pool, &at("pool"), limits)?;
    if amount == 0 {
        return Err(ApiError::invalid(at("amount"), "must be at least 1"));
    }
    hold_ttl_ms(ttl_ms, &at("ttl_ms"), limits)?;
    if let Some(c) = &context {
        if !c.is_object() {
            return Err(ApiError::invalid(at("context"), "must be a JSON object"));
        }
        value(c, &at("context"), raw_len, limits)?;
    }
    Ok(core::Op::Reserve { pool, amount, ttl_ms, context })
}

/// A ticket TTL within the configured range (default when absent).
pub fn ttl_ms(ttl: Option<u64>, limits: &Limits) -> Result<u64, ApiError> {
    let ttl = ttl.unwrap_or(limits.ticket_ttl_ms_default);
    if !(limits.ticket_ttl_ms_min..=limits.ticket_ttl_ms_max).contains(&ttl) {
        return Err(ApiError::invalid(
            "ttl_ms",
            format!(
                "{ttl} is outside the allowed range {}..={} ms",
                limits.ticket_ttl_ms_min, limits.ticket_ttl_ms_max
            ),
        ));
    }
    Ok(ttl)
}

/// A core condition as the API writes it.
pub fn condition_wire(c: &core::Condition) -> api::Condition {
    match c.clone() {
        core::Condition::Exists(k) => api::Condition::Exists(k),
        core::Condition::Absent(k) => api::Condition::Absent(k),
        core::Condition::Equals { key, value } => api::Condition::Equals(api::EqualsCondition { key, value }),
        core::Condition::Version { key, is } => api::Condition::Version(api::VersionCondition { key, is }),
        core::Condition::Compare { key, op, value } => {
            api::Condition::Compare(api::CompareCondition { key, op: compare_op_wire(op), value })
        }
        core::Condition::Lease { name, token } => api::Condition::Lease(api::LeaseCondition { name, token }),
        core::Condition::Available { pool, amount } => {
            api::Condition::Available(api::AvailableCondition { pool, amount })
        }
        core::Condition::Permitted { subject, action, resource } => {
            api::Condition::Permitted(api::GrantTuple { subject, action, resource })
        }
    }
}

/// A condition failure as the API writes it.
pub fn failure_wire(f: core::ConditionFailure) -> api::ConditionFailure {
    api::ConditionFailure {
        index: f.index,
        condition: condition_wire(&f.condition),
        actual: f.actual,
        actual_version: f.actual_version,
        reason: f.reason,
        changed_at_revision: f.changed_at_revision,
        changed_by: f.changed_by,
    }
}

fn failures_json(failures: Vec<core::ConditionFailure>) -> Value {
    serde_json::to_value(failures.into_iter().map(failure_wire).collect::<Vec<_>>()).expect("failures serialize")
}

/// `412 check_failed` for a denied check.
pub fn check_failed(failures: Vec<core::ConditionFailure>) -> ApiError {
    let message = format!("check failed: {}", core::describe_failures(&failures));
    ApiError::new(StatusCode::PRECONDITION_FAILED, api::codes::CHECK_FAILED, message)
        .with("failed", failures_json(failures))
}

/// The documented error of a refusal.
pub fn refusal(refusal: Refusal, ns: &str) -> ApiError {
    match refusal {
        Refusal::StaleCheck { changed } => {
            let message = format!("the ticket's check no longer holds: {}", core::describe_failures(&changed));
            ApiError::new(StatusCode::CONFLICT, api::codes::STALE_CHECK, message)
                .with("changed", failures_json(changed))
        }
        Refusal::ConditionFailed { failed } => {
            let message = format!("condition failed: {}", core::describe_failures(&failed));
            ApiError::new(StatusCode::CONFLICT, api::codes::CONDITION_FAILED, message)
                .with("failed", failures_json(failed))
        }
        Refusal::TicketUsed => ApiError::new(
            StatusCode::CONFLICT,
            api::codes::TICKET_USED,
            "this ticket already served an act; run the check again for a new ticket",
        ),
        Refusal::TicketExpired { expired_at_ms } => ApiError::new(
            StatusCode::GONE,
            api::codes::TICKET_EXPIRED,
            format!(
                "the ticket expired at {}; run the check again (or ask for a longer ttl_ms)",
                rfc3339(expired_at_ms)
            ),
        )
        .with("expired_at", rfc3339(expired_at_ms))
        .with("expired_at_ms", expired_at_ms),
        Refusal::TicketWrongNamespace { ticket_ns } => ApiError::new(
            StatusCode::BAD_REQUEST,
            api::codes::INVALID_TICKET,
            format!("the ticket was issued in namespace {ticket_ns:?}, not {ns:?}"),
        )
        .with("field", "ticket"),
        Refusal::OpFailed { index, error } => op_error(error).with("index", index),
    }
}

/// The documented error of an op that could not be applied, with its details.
pub fn op_error(error: core::OpError) -> ApiError {
    use core::OpError as E;
    let code = error.code();
    // Instants in messages are for people: RFC 3339, not epoch milliseconds.
    let message = match &error {
        E::LeaseHeld { name, holder, expires_at_ms } => {
            format!("lease {name:?} is held by {holder:?} until {}", rfc3339(*expires_at_ms))
        }
        E::ReservationExpired { reservation, expired_at_ms } => format!(
            "reservation {reservation:?} expired at its deadline {}; its amount is back in the pool",
            rfc3339(*expired_at_ms)
        ),
        other => other.to_string(),
    };
    let status = match &error {
        E::PoolNotFound { .. } | E::ReservationNotFound { .. } | E::OrphanNotFound { .. } => StatusCode::NOT_FOUND,
        E::ReservationExpired { .. } => StatusCode::GONE,
        _ => StatusCode::CONFLICT,
    };
    let mut err = ApiError::new(status, code, message);
    match error {
        E::Insufficient { available, requested, .. } => {
            err = err.with("available", available).with("requested", requested);
        }
        E::CapacityTooLow { used, reserved, .. } => err = err.with("used", used).with("reserved", reserved),
        E::LeaseHeld { holder, expires_at_ms, .. } => {
            err = err
                .with("holder", holder)
                .with("expires_at", rfc3339(expires_at_ms))
                .with("expires_at_ms", expires_at_ms);
        }
        E::ReservationExpired { expired_at_ms, .. } => {
            err = err.with("expired_at", rfc3339(expired_at_ms)).with("expired_at_ms", expired_at_ms);
        }
        _ => {}
    }
    err
}

fn pool_counters(p: core::op::PoolState) -> api::PoolCounters {
    api::PoolCounters { pool: p.pool, capacity: p.capacity, used: p.used, reserved: p.reserved }
}

/// An op result as the API writes it.
pub fn op_result_wire(r: core::OpResult) -> api::OpResult {
    match r {
        core::OpResult::Put { key, version } => api::OpResult::Put { key, version },
        core::OpResult::Delete { key, deleted } => api::OpResult::Delete { key, deleted },
        core::OpResult::Add { key, value, version } => api::OpResult::Add { key, value, version },
        core::OpResult::Reserve { reservation, pool, amount, expires_at_ms } => {
            api::OpResult::Reserve { reservation, pool, amount, expires_at: rfc3339(expires_at_ms), expires_at_ms }
        }
        core::OpResult::Commit { reservation, pool } => {
            api::OpResult::Commit { reservation, pool: pool_counters(pool) }
        }
        core::OpResult::Release { reservation, pool } => {
            api::OpResult::Release { reservation, pool: pool_counters(pool) }
        }
        core::OpResult::SetCapacity { pool } => api::OpResult::SetCapacity { pool: pool_counters(pool) },
        core::OpResult::Grant { existed } => api::OpResult::Grant { existed },
        core::OpResult::Revoke { existed } => api::OpResult::Revoke { existed },
        core::OpResult::Lease { name, holder, token, expires_at_ms } => {
            api::OpResult::Lease { name, holder, token, expires_at_ms }
        }
        core::OpResult::Resolve { orphan } => api::OpResult::Resolve { orphan },
        core::OpResult::Expire { orphan } => api::OpResult::Expire { orphan },
    }
}

/// The response to a write's outcome. `subject` names the key for a 404.
pub fn outcome(outcome: Outcome, ns: &str, subject: &str) -> Response {
    match outcome {
        Outcome::Put { revision, version } => Json(api::PutResponse { revision, version }).into_response(),
        Outcome::Deleted { revision } => Json(api::DeleteResponse { revision }).into_response(),
        Outcome::NotFound => ApiError::not_found(format!("no key {subject:?} in namespace {ns:?}")).into_response(),
        Outcome::Acted { revision, results, check_to_use_ms } => {
            let results = results.into_iter().map(op_result_wire).collect();
            Json(api::ActResponse { revision, results, check_to_use_ms }).into_response()
        }
        Outcome::Txn { succeeded, revision, results } => {
            let results = results.into_iter().map(op_result_wire).collect();
            Json(api::TxnResponse { succeeded, revision, results }).into_response()
        }
        Outcome::Applied { revision, result } => {
            Json(api::AppliedResponse { revision, result: op_result_wire(result) }).into_response()
        }
        Outcome::Refused(r) => refusal(r, ns).into_response(),
    }
}
