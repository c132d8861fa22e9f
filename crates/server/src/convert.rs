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
            };
            key(c.key(), &format!("{field}[{idx}].key"), limits)?;
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
            };
            key(op.key(), &format!("{field}[{idx}].key"), limits)?;
            Ok(op)
        })
        .collect()
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

fn describe(failures: &[core::ConditionFailure]) -> String {
    failures
        .iter()
        .map(|f| {
            let changed = match (&f.changed_at_revision, &f.changed_by) {
                (Some(rev), Some(by)) => format!(", changed at revision {rev} by {by}"),
                (Some(rev), None) => format!(", changed at revision {rev}"),
                _ => String::new(),
            };
            format!("condition {} on {:?}: {}{changed}", f.index, f.condition.key(), f.reason)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// `412 check_failed` for a denied check.
pub fn check_failed(failures: Vec<core::ConditionFailure>) -> ApiError {
    let message = format!("check failed: {}", describe(&failures));
    ApiError::new(StatusCode::PRECONDITION_FAILED, api::codes::CHECK_FAILED, message)
        .with("failed", failures_json(failures))
}

/// The documented error of a refusal.
pub fn refusal(refusal: Refusal, ns: &str) -> ApiError {
    match refusal {
        Refusal::StaleCheck { changed } => {
            let message = format!("the ticket's check no longer holds: {}", describe(&changed));
            ApiError::new(StatusCode::CONFLICT, api::codes::STALE_CHECK, message)
                .with("changed", failures_json(changed))
        }
        Refusal::ConditionFailed { failed } => {
            let message = format!("condition failed: {}", describe(&failed));
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
        Refusal::OpFailed { index, error } => {
            let code = error.code();
            ApiError::new(StatusCode::CONFLICT, code, format!("ops[{index}]: {error}")).with("index", index)
        }
    }
}

fn op_result_wire(r: core::OpResult) -> api::OpResult {
    match r {
        core::OpResult::Put { key, version } => api::OpResult::Put { key, version },
        core::OpResult::Delete { key, deleted } => api::OpResult::Delete { key, deleted },
        core::OpResult::Add { key, value, version } => api::OpResult::Add { key, value, version },
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
        Outcome::Refused(r) => refusal(r, ns).into_response(),
    }
}
