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

/// `{"name", "token"}` of a `lease` condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseCondition {
    /// The lease.
    pub name: String,
    /// The fencing token the caller holds.
    pub token: u64,
}

/// `{"pool", "amount"}` of an `available` condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AvailableCondition {
    /// The pool.
    pub pool: String,
    /// The amount that must be available.
    pub amount: u64,
}

/// A permission tuple: `{"subject", "action", "resource"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GrantTuple {
    /// Who, e.g. `user:alice`.
    pub subject: String,
    /// May do what, e.g. `read`.
    pub action: String,
    /// To what, e.g. `doc:9`.
    pub resource: String,
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
    /// The lease is held, unexpired, under this fencing token.
    Lease(LeaseCondition),
    /// The pool has at least this much available.
    Available(AvailableCondition),
    /// The grant exists (revocation takes effect for every act after it).
    Permitted(GrantTuple),
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

/// `{"pool", "amount", "ttl_ms", "context"?}` of a `reserve` op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveOp {
    /// The pool.
    pub pool: String,
    /// The amount (at least 1).
    pub amount: u64,
    /// How long to hold it (1 ms to 24 h).
    pub ttl_ms: u64,
    /// What the caller is about to build, returned with the reservation and its orphan.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
}

/// `{"reservation"}` of a `commit` or `release` op.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReservationRef {
    /// The reservation's id.
    pub reservation: String,
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
    /// Hold an amount of a pool.
    Reserve(ReserveOp),
    /// Consume a held reservation.
    Commit(ReservationRef),
    /// Give a held reservation back.
    Release(ReservationRef),
    /// Grant a permission.
    Grant(GrantTuple),
    /// Revoke a permission.
    Revoke(GrantTuple),
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
    /// Whether more keys match past the last one here (as etcd's `more`): ask again with
    /// `after` set to the last key for the next page.
    #[serde(default)]
    pub more: bool,
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

/// An optional field that may be left out but not given as `null` (with `#[serde(default)]`).
fn not_null<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Body of `POST /v1/ns/{ns}/act`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActRequest {
    /// The ticket of an earlier check; its conditions are re-evaluated now. Absent for an act
    /// on its own conditions only; `null` is refused, not taken for absent: a caller whose
    /// ticket variable came out empty must not lose its guard silently.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "not_null")]
    #[schema(nullable = false)]
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
    /// A reservation made.
    Reserve {
        /// Its id.
        reservation: String,
        /// The pool.
        pool: String,
        /// The amount.
        amount: u64,
        /// Its deadline (RFC 3339).
        expires_at: String,
        /// Its deadline (ms since the Unix epoch).
        expires_at_ms: u64,
    },
    /// A reservation committed.
    Commit {
        /// Its id.
        reservation: String,
        /// The pool after it.
        pool: PoolCounters,
    },
    /// A reservation released.
    Release {
        /// Its id.
        reservation: String,
        /// The pool after it.
        pool: PoolCounters,
    },
    /// A pool's capacity set.
    SetCapacity {
        /// The pool after it.
        pool: PoolCounters,
    },
    /// A grant made.
    Grant {
        /// Whether it existed already.
        existed: bool,
    },
    /// A grant revoked.
    Revoke {
        /// Whether it existed.
        existed: bool,
    },
    /// A lease acquired, renewed or released.
    Lease {
        /// The lease.
        name: String,
        /// The holder (absent once released).
        holder: Option<String>,
        /// The fencing token of the hold.
        token: u64,
        /// When the hold expires (ms since the Unix epoch; 0 once released).
        expires_at_ms: u64,
    },
    /// An orphan resolved.
    Resolve {
        /// Its id.
        orphan: String,
    },
    /// An expiry by the reconciler.
    Expire {
        /// The orphan it recorded, if anything was due.
        orphan: Option<String>,
    },
}

/// A pool's counters inside an op result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolCounters {
    /// The pool.
    pub pool: String,
    /// Total amount.
    pub capacity: u64,
    /// Committed.
    pub used: u64,
    /// Held.
    pub reserved: u64,
}

/// Body of `PUT /v1/ns/{ns}/pools/{pool}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolRequest {
    /// The capacity (refused below `used + reserved`).
    pub capacity: u64,
}

/// Body of `POST /v1/ns/{ns}/pools/{pool}/reserve`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveRequest {
    /// The amount (at least 1).
    pub amount: u64,
    /// How long to hold it (1 ms to 24 h).
    pub ttl_ms: u64,
    /// What the caller is about to build.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
}

/// Answer of a reserve.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReserveResponse {
    /// The reservation's id.
    pub reservation: String,
    /// The pool.
    pub pool: String,
    /// The amount.
    pub amount: u64,
    /// Its deadline (RFC 3339).
    pub expires_at: String,
    /// Its deadline (ms since the Unix epoch).
    pub expires_at_ms: u64,
    /// The revision of the reserve.
    pub revision: u64,
}

/// A reservation as read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ReservationResponse {
    /// Its id.
    pub reservation: String,
    /// The pool.
    pub pool: String,
    /// The amount.
    pub amount: u64,
    /// `held`, `committed`, `released` or `expired`.
    pub state: String,
    /// Its deadline (RFC 3339).
    pub expires_at: String,
    /// Its deadline (ms since the Unix epoch).
    pub expires_at_ms: u64,
    /// What the caller was about to build.
    pub context: Option<Value>,
}

/// Body of a lease acquisition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AcquireRequest {
    /// Who takes the lease.
    pub holder: String,
    /// For how long (1 ms to 24 h).
    pub ttl_ms: u64,
}

/// Body of a lease renewal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    /// The holder's fencing token.
    pub token: u64,
    /// The new TTL from now (default: the acquisition's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
}

/// Body of a lease release.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LeaseReleaseRequest {
    /// The holder's fencing token.
    pub token: u64,
}

/// A lease as acquired, renewed or read.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LeaseResponse {
    /// The lease.
    pub name: String,
    /// Its holder, while held.
    pub holder: Option<String>,
    /// The fencing token of the current (or last) hold; 0 if never acquired.
    pub token: u64,
    /// Whether it is held now.
    pub held: bool,
    /// When the hold expires (RFC 3339), while held.
    pub expires_at: Option<String>,
    /// When the hold expires (ms since the Unix epoch), while held.
    pub expires_at_ms: Option<u64>,
    /// The revision of the change (or, for a read, the revision read at).
    pub revision: u64,
}

/// Answer of a grant listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct GrantsResponse {
    /// The grants, in key order, at most `max_list_limit` (10,000).
    pub items: Vec<GrantTuple>,
    /// Whether more grants match than are listed: narrow by `subject` or `resource`.
    #[serde(default)]
    pub more: bool,
    /// The revision read at.
    pub revision: u64,
}

/// Body of a reservation's commit or release: nothing, or `{}` (any field is refused).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EmptyRequest {}

/// Body of an orphan resolution.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// What was done about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Something that expired unfinished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrphanItem {
    /// The orphan's id (for `POST …/orphans/{id}/resolve`).
    pub id: String,
    /// `reservation` or `lease`.
    pub kind: String,
    /// The reservation that expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservation: Option<String>,
    /// Its pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Its amount.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<u64>,
    /// Its context: what the caller was building.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<Value>,
    /// The lease that expired while held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// Who held it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder: Option<String>,
    /// The token of that hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    /// When it expired (RFC 3339).
    pub expired_at: String,
    /// When it expired (ms since the Unix epoch).
    pub expired_at_ms: u64,
    /// Whether it was marked compensated.
    pub resolved: bool,
    /// The note given then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Answer of an orphan listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct OrphansResponse {
    /// The orphans, oldest first, at most `max_list_limit` (10,000).
    pub items: Vec<OrphanItem>,
    /// Whether more orphans match than are listed (the newest are left out): resolve some.
    #[serde(default)]
    pub more: bool,
    /// The revision read at.
    pub revision: u64,
}

/// One event of `GET /v1/ns/{ns}/watch` (the `data` of an SSE `change` event; its SSE `id`
/// is the revision, so `Last-Event-ID` resumes after it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct WatchEvent {
    /// The revision of the change.
    pub revision: u64,
    /// `kv`, `lease`, `pool`, `reservation`, `grant` or `orphan`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The key (for primitives: the lease, pool or orphan name, reservation id, or
    /// `subject|action|resource`).
    pub key: String,
    /// The value after the change (`null` once deleted).
    pub value: Value,
    /// The version after the change (0 once deleted).
    pub version: u64,
    /// Whether the change was a delete (or a revocation).
    pub deleted: bool,
}

/// A pool and its counters, as set or read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PoolResponse {
    /// The pool.
    pub pool: String,
    /// Total amount.
    pub capacity: u64,
    /// Consumed by committed reservations.
    pub used: u64,
    /// Held by live reservations.
    pub reserved: u64,
    /// `capacity - used - reserved`.
    pub available: u64,
    /// The revision of the change (or, for a read, the revision read at).
    pub revision: u64,
}

/// Answer of an op-level lease, reservation, grant or orphan route.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct AppliedResponse {
    /// The revision of the change (the current one if nothing changed).
    pub revision: u64,
    /// What the op did.
    pub result: OpResult,
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
    /// For a refusal or denial: what did not hold and which change broke it; for a committed
    /// request that changed nothing, that it did not move the revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
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

/// Answer of `GET /v1/slo`: every configured flow with an objective, its SLIs and burn rates
/// over the SRE workbook's windows, and whether each burn-rate alert would fire.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SloResponse {
    /// In the config's order.
    pub flows: Vec<FlowSlo>,
}

/// One flow's SLOs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FlowSlo {
    /// The flow's name.
    pub flow: String,
    /// Its objectives, as configured.
    pub objectives: SloObjectives,
    /// SLIs and burn rates per window.
    pub windows: SloWindows,
    /// Each burn-rate condition of each alert the generated rules raise (a page alert has two).
    pub alerts: Vec<SloAlert>,
}

/// A flow's objectives (`null`: not configured).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SloObjectives {
    /// Fraction of acts whose check still held at use (`correctness_objective`).
    pub correctness: Option<f64>,
    /// Latency objective of the gap: 99 % of gaps within this many ms (`check_to_use_p99_ms`).
    pub check_to_use_p99_ms: Option<u64>,
}

/// The windows of every SLI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SloWindows {
    /// The last 5 minutes.
    #[serde(rename = "5m")]
    pub m5: SloWindow,
    /// The last 30 minutes.
    #[serde(rename = "30m")]
    pub m30: SloWindow,
    /// The last hour.
    #[serde(rename = "1h")]
    pub h1: SloWindow,
    /// The last 6 hours.
    #[serde(rename = "6h")]
    pub h6: SloWindow,
    /// The last 3 days.
    #[serde(rename = "3d")]
    pub d3: SloWindow,
}

/// SLIs and burn rates over one window. An SLI is `null` when the window has no events (or
/// the flow lacks what it needs: a latency SLI needs `check_to_use_p99_ms`); a burn rate is
/// `null` when its SLI is, or the flow has no objective for it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SloWindow {
    /// 1 − stale_check ÷ (committed + stale_check) acts.
    pub correctness_sli: Option<f64>,
    /// Fraction of check-to-use gaps no longer than `check_to_use_p99_ms`.
    pub latency_sli: Option<f64>,
    /// (1 − correctness SLI) ÷ (1 − correctness objective).
    pub correctness_burn_rate: Option<f64>,
    /// (1 − latency SLI) ÷ (1 − 0.99).
    pub latency_burn_rate: Option<f64>,
    /// Acts in the correctness SLI: committed plus stale_check.
    pub acts: u64,
    /// Check-to-use gaps observed (acts that presented a ticket, any outcome).
    pub gaps: u64,
}

/// One burn-rate condition of an alert: it holds when the burn rate exceeds `factor` over both
/// windows.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SloAlert {
    /// The Prometheus alert's name (`GapguardFlowCorrectnessBurnRatePage`, …).
    pub name: String,
    /// `page` or `ticket`.
    pub severity: String,
    /// `correctness` or `latency`.
    pub slo: String,
    /// Whether the condition holds now.
    pub firing: bool,
    /// The long window (`1h`, `6h`, `3d`).
    pub long_window: String,
    /// The short window (`5m`, `30m`, `6h`).
    pub short_window: String,
    /// The burn-rate threshold.
    pub factor: f64,
}

/// Stable error codes.
pub mod codes {
    /// Malformed JSON, an unknown field, a value out of range or over a limit.
    pub const INVALID_REQUEST: &str = "invalid_request";
    /// The body is larger than the configured limit.
    pub const PAYLOAD_TOO_LARGE: &str = "payload_too_large";
    /// No such key (or pool, reservation, lease, orphan: their own codes say which).
    pub const NOT_FOUND: &str = "not_found";
    /// No such route: the path is none of the API's (a wrong base URL, say).
    pub const NO_ROUTE: &str = "no_route";
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
    /// The server cannot take the request now (answered with `Retry-After`): too many requests
    /// are in flight (nothing was done), a read or check ran out of time (nothing changed), or
    /// the store failed (a write's commit may or may not be durable: retry it with the same
    /// `Idempotency-Key`).
    pub const UNAVAILABLE: &str = "unavailable";
    /// The request ran out of time after its body was read (503, with `Retry-After`): it may
    /// or may not have taken effect. Retry it with the same `Idempotency-Key`: the retry
    /// answers what the first did, or does it once.
    pub const OUTCOME_UNKNOWN: &str = "outcome_unknown";
    /// The client did not send the whole request (its body) within the request timeout.
    pub const REQUEST_TIMEOUT: &str = "request_timeout";
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
