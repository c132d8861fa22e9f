//! The wire types of gapguard's HTTP API v1: the JSON bodies of every route, shared by the
//! server (which decodes requests and encodes responses) and the Rust client, with their
//! OpenAPI schemas.
//!
//! Request types reject unknown fields. Numbers of milliseconds carry `_ms`; instants are
//! given twice, as RFC 3339 (`expires_at`) and as milliseconds since the Unix epoch
//! (`expires_at_ms`).

use serde::{Deserialize, Serialize};
use serde_json::{Map, Number, Value};
use utoipa::ToSchema;

/// A numeric comparison operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub enum CompareOp {
    /// Equal.
    #[serde(rename = "==")]
    Eq,
    /// Not equal.
    #[serde(rename = "!=")]
    Ne,
    /// Less than.
    #[serde(rename = "<")]
    Lt,
    /// Less than or equal.
    #[serde(rename = "<=")]
    Le,
    /// Greater than.
    #[serde(rename = ">")]
    Gt,
    /// Greater than or equal.
    #[serde(rename = ">=")]
    Ge,
}

/// `{"key", "value"}` of an `equals` condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EqualsCondition {
    /// The key.
    pub key: String,
    /// The expected JSON value.
    pub value: Value,
}

/// `{"key", "is"}` of a `version` condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VersionCondition {
    /// The key.
    pub key: String,
    /// The expected version (0 = absent).
    pub is: u64,
}

/// `{"key", "op", "value"}` of a `compare` condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompareCondition {
    /// The key.
    pub key: String,
    /// The operator.
    pub op: CompareOp,
    /// The number to compare the key's value with.
    #[schema(value_type = f64)]
    pub value: Number,
}

/// A predicate evaluated atomically against the current state, e.g. `{"exists": "orders/42"}`
/// or `{"compare": {"key": "stock/sku-1", "op": ">=", "value": 1}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// The key holds a value.
    Exists(String),
    /// The key holds no value.
    Absent(String),
    /// The key's value equals a JSON value.
    Equals(EqualsCondition),
    /// The key's version is exactly this.
    Version(VersionCondition),
    /// The key's value is a number that compares as given.
    Compare(CompareCondition),
}

/// `{"key", "value"}` of a `put` op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutOp {
    /// The key.
    pub key: String,
    /// The new value.
    pub value: Value,
}

/// `{"key"}` of a `delete` op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteOp {
    /// The key.
    pub key: String,
}

/// `{"key", "by"}` of an `add` op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AddOp {
    /// The key (an absent key counts as 0).
    pub key: String,
    /// The amount, negative to subtract.
    #[schema(value_type = f64)]
    pub by: Number,
}

/// A write applied by an act or a txn, e.g. `{"add": {"key": "stock/sku-1", "by": -1}}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Set a key.
    Put(PutOp),
    /// Delete a key (no-op if absent).
    Delete(DeleteOp),
    /// Add to a key's number.
    Add(AddOp),
}

/// Body of `PUT /v1/ns/{ns}/kv/{key}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PutRequest {
    /// Any JSON value.
    pub value: Value,
}

/// Answer of a put.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PutResponse {
    /// The revision of the put.
    pub revision: u64,
    /// The key's version after it.
    pub version: u64,
}

/// Answer of a delete.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DeleteResponse {
    /// The revision of the delete.
    pub revision: u64,
}

/// A key and its record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// Its value.
    pub value: Value,
    /// Writes since it was created (from 1).
    pub version: u64,
    /// The revision that created it.
    pub create_revision: u64,
    /// The revision of its last write.
    pub mod_revision: u64,
}

/// Answer of a prefix listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ListResponse {
    /// Live keys, in key order.
    pub items: Vec<KeyValue>,
    /// The revision the listing reflects.
    pub revision: u64,
}

/// Body of `POST /v1/ns/{ns}/check`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// The conditions (1 to 128).
    pub conditions: Vec<Condition>,
    /// Ticket lifetime (default 30000; 1 ms to 1 h unless configured otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// The flow this check belongs to (labels metrics and SLOs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
}

/// Answer of a passing check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct CheckResponse {
    /// The opaque, signed, single-use ticket.
    pub ticket: String,
    /// The revision at which the conditions held.
    pub revision: u64,
    /// When the ticket expires (RFC 3339).
    pub expires_at: String,
    /// When the ticket expires (ms since the Unix epoch).
    pub expires_at_ms: u64,
}

/// Body of `POST /v1/ns/{ns}/act`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActRequest {
    /// The ticket of an earlier check; its conditions are re-evaluated now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket: Option<String>,
    /// Conditions of the act itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The writes (1 to 128), applied all or nothing.
    pub ops: Vec<Op>,
    /// The flow (defaults to the ticket's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<String>,
}

/// What one op did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum OpResult {
    /// A put.
    Put {
        /// The key.
        key: String,
        /// Its version after the put.
        version: u64,
    },
    /// A delete.
    Delete {
        /// The key.
        key: String,
        /// False if it was already absent.
        deleted: bool,
    },
    /// An add.
    Add {
        /// The key.
        key: String,
        /// Its value after the add.
        #[schema(value_type = f64)]
        value: Number,
        /// Its version after the add.
        version: u64,
    },
}

/// Answer of a committed act.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ActResponse {
    /// The revision of the act.
    pub revision: u64,
    /// One result per op.
    pub results: Vec<OpResult>,
    /// Time from the ticket's check to this act, when a ticket was presented.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_to_use_ms: Option<u64>,
}

/// Body of `POST /v1/ns/{ns}/txn` (etcd-style).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TxnRequest {
    /// Conditions; all must hold for `then` to run.
    #[serde(rename = "if", default)]
    pub compare: Vec<Condition>,
    /// Ops applied when every condition holds.
    #[serde(rename = "then", default)]
    pub success: Vec<Op>,
    /// Ops applied otherwise.
    #[serde(rename = "else", default)]
    pub failure: Vec<Op>,
}

/// Answer of a txn.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TxnResponse {
    /// Whether `if` held (the `then` branch ran).
    pub succeeded: bool,
    /// Its revision (the current one if the branch that ran had no ops).
    pub revision: u64,
    /// One result per op of the branch that ran.
    pub results: Vec<OpResult>,
}

/// A condition that does not hold, with what was found.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ConditionFailure {
    /// Position of the condition (in the request, or in the ticket's check).
    pub index: usize,
    /// The condition.
    pub condition: Condition,
    /// The key's current value (`null` if absent).
    pub actual: Value,
    /// The key's current version (0 if absent).
    pub actual_version: u64,
    /// Why it does not hold.
    pub reason: String,
    /// The revision of the last change to the key (null if never written).
    pub changed_at_revision: Option<u64>,
    /// The correlation id of that change.
    pub changed_by: Option<String>,
}

/// Every error: a stable code, a message for a person, and details that depend on the code
/// (`failed` for `check_failed`/`condition_failed`, `changed` for `stale_check`, `field` for
/// `invalid_request`…).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// Stable, machine-readable code.
    pub error: String,
    /// What was wrong, for a person.
    pub message: String,
    /// Details.
    #[serde(flatten)]
    pub details: Map<String, Value>,
}

/// The check an act's ticket came from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditCheck {
    /// Revision at which the check held.
    pub revision: u64,
    /// When it ran (ms since the Unix epoch).
    pub issued_at_ms: u64,
    /// Its correlation id.
    pub correlation_id: Option<String>,
}

/// One audit event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditEvent {
    /// Position in the global hash chain (from 1).
    pub seq: u64,
    /// BLAKE3 hash of the event (hex).
    pub hash: String,
    /// Hash of the previous event (hex).
    pub prev: String,
    /// Revision committed (or, for a refusal or denial, the revision evaluated against).
    pub revision: u64,
    /// When (RFC 3339).
    pub at: String,
    /// When (ms since the Unix epoch).
    pub at_ms: u64,
    /// Namespace.
    pub ns: String,
    /// `put`, `delete`, `act`, `txn` or `check`.
    pub kind: String,
    /// `committed`, `refused` or `denied`.
    pub outcome: String,
    /// Error code of a refusal or denial.
    pub reason: Option<String>,
    /// Keys read or written.
    pub keys: Vec<String>,
    /// The API key that made the request.
    pub api_key_id: Option<String>,
    /// The request's correlation id.
    pub correlation_id: Option<String>,
    /// The flow.
    pub flow: Option<String>,
    /// For an act with a ticket: the check.
    pub check: Option<AuditCheck>,
}

/// Answer of an audit query.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AuditResponse {
    /// Matching events, oldest first.
    pub events: Vec<AuditEvent>,
    /// Pass as `after_seq` for the next page (absent on the last page).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after_seq: Option<u64>,
}

/// Where the chain broke.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ChainBreak {
    /// The first event that does not verify.
    pub seq: u64,
    /// Why.
    pub reason: String,
}

/// Answer of `GET /v1/audit/verify`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct VerifyResponse {
    /// Whether the whole chain verified.
    pub ok: bool,
    /// Events verified.
    pub events: u64,
    /// Hash of the last verified event (hex).
    pub head: String,
    /// The first broken event, when `ok` is false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken: Option<ChainBreak>,
}

/// Answer of `GET /healthz`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HealthResponse {
    /// `ok`, or `failing` when the store stopped accepting writes.
    pub status: String,
    /// The last committed revision.
    pub revision: u64,
}

/// Stable error codes.
pub mod codes {
    /// Malformed JSON, an unknown field, a value out of range or over a limit.
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// The body is larger than the configured limit.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// No such key or route.
    pub const NOT_FOUND: &str = "not_found";
    /// A check's conditions do not hold.
    pub const CHECK_FAILED: &str = "check_failed";
    /// A ticket's condition no longer holds at use.
    pub const STALE_CHECK: &str = "stale_check";
    /// An act's or txn's own condition does not hold.
    pub const CONDITION_FAILED: &str = "condition_failed";
    /// The ticket already served an act.
    pub const TICKET_USED: &str = "ticket_used";
    /// The ticket's TTL ran out.
    pub const TICKET_EXPIRED: &str = "ticket_expired";
    /// Bad signature, malformed, or issued in another namespace.
    pub const INVALID_TICKET: &str = "invalid_ticket";
    /// The same idempotency key with a different request.
    pub const IDEMPOTENCY_KEY_REUSED: &str = "idempotency_key_reused";
    /// A request with this idempotency key is still being processed.
    pub const IDEMPOTENCY_IN_PROGRESS: &str = "idempotency_in_progress";
    /// The store cannot accept writes now.
    pub const UNAVAILABLE: &str = "unavailable";
    /// The method is not allowed on this route.
    pub const METHOD_NOT_ALLOWED: &str = "method_not_allowed";
    /// A bug on our side (logged).
    pub const INTERNAL: &str = "internal";
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn conditions_and_ops_read_the_design_document_json() {
        let body = json!({
            "conditions": [
                {"exists": "orders/42"}, {"absent": "orders/42"},
                {"equals": {"key": "flags/checkout", "value": true}},
                {"version": {"key": "acct/7", "is": 3}},
                {"compare": {"key": "stock/sku-1", "op": ">=", "value": 1}}
            ],
            "ops": [
                {"put": {"key": "k", "value": {"any": "json"}}},
                {"delete": {"key": "k"}},
                {"add": {"key": "stock/sku-1", "by": -1}}
            ]
        });
        let act: ActRequest = serde_json::from_value(body.clone()).unwrap();
        assert_eq!(act.conditions.len(), 5);
        assert_eq!(act.ops[2], Op::Add(AddOp { key: "stock/sku-1".into(), by: (-1).into() }));
        assert_eq!(serde_json::to_value(&act).unwrap(), body);
    }

    #[test]
    fn unknown_fields_are_refused_inside_conditions_and_ops() {
        let bad = json!({"ops": [{"put": {"key": "k", "value": 1, "ttl": 5}}]});
        assert!(serde_json::from_value::<ActRequest>(bad).unwrap_err().to_string().contains("unknown field `ttl`"));
        let bad = json!({"conditions": [{"compare": {"key": "k", "op": ">=", "value": 1, "x": 0}}]});
        assert!(serde_json::from_value::<CheckRequest>(bad).is_err());
        let bad = json!({"conditions": [], "tll_ms": 5});
        assert!(serde_json::from_value::<CheckRequest>(bad).is_err());
    }
}
