//! `apply` and `check`: the guard's state transitions, as pure functions.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::audit::{AuditEvent, AuditKind, CheckRef};
use crate::condition::{evaluate_all, Condition, ConditionFailure};
use crate::op::{apply_op, Op, OpCtx, OpError, OpResult, Workspace};
use crate::primitives::{self, Reservation};
use crate::state::{Entry, NsKey, Record, Revision, StateView};
use crate::ticket::{TicketClaims, TicketId, VerifiedTicket};

/// What the caller supplies besides the request: the inputs core may not produce itself.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    /// The current time (ms since the Unix epoch) on the clock the backend trusts.
    pub now_ms: u64,
    /// The revision this request gets if it commits; must exceed the view's revision.
    pub revision: Revision,
    /// The request's correlation id.
    pub correlation_id: Option<String>,
    /// The API key that made it.
    pub api_key_id: Option<String>,
}

/// An act: a ticket and/or its own conditions, plus ops applied all-or-nothing.
#[derive(Clone, Debug, PartialEq)]
pub struct Act {
    /// Namespace.
    pub ns: String,
    /// The ticket of an earlier check, already signature-verified.
    pub ticket: Option<VerifiedTicket>,
    /// Conditions of the act itself.
    pub conditions: Vec<Condition>,
    /// The writes.
    pub ops: Vec<Op>,
    /// The flow this act belongs to (defaults to the ticket's).
    pub flow: Option<String>,
}

/// An etcd-style transaction: if every condition holds, `success` ops, else `failure` ops.
#[derive(Clone, Debug, PartialEq)]
pub struct Txn {
    /// Namespace.
    pub ns: String,
    /// The `if` conditions.
    pub compare: Vec<Condition>,
    /// The `then` ops.
    pub success: Vec<Op>,
    /// The `else` ops.
    pub failure: Vec<Op>,
}

/// A write request. Every request names its keys up front ([`WriteRequest::keys`]).
#[derive(Clone, Debug, PartialEq)]
pub enum WriteRequest {
    /// Put one key.
    Put {
        /// Namespace.
        ns: String,
        /// Key.
        key: String,
        /// New value.
        value: Value,
    },
    /// Delete one key (refused with `NotFound` if absent).
    Delete {
        /// Namespace.
        ns: String,
        /// Key.
        key: String,
    },
    /// An act.
    Act(Act),
    /// A txn.
    Txn(Txn),
    /// One op on its own, from a primitive's route (lease, pool, reservation, grant, orphan)
    /// or the reconciler; audited as `kind`.
    Single {
        /// Namespace.
        ns: String,
        /// The op.
        op: Op,
        /// How the audit log names it.
        kind: AuditKind,
    },
}

impl WriteRequest {
    /// The namespace the request writes in.
    pub fn ns(&self) -> &str {
        match self {
            WriteRequest::Put { ns, .. } | WriteRequest::Delete { ns, .. } | WriteRequest::Single { ns, .. } => ns,
            WriteRequest::Act(act) => &act.ns,
            WriteRequest::Txn(txn) => &txn.ns,
        }
    }

    /// Every key the request reads or writes, sorted: a backend loads (and locks) exactly these.
    /// Ops on a reservation also write its pool, which the reservation's record names: the
    /// view resolves it (a reservation's pool never changes, so an unlocked read is enough).
    /// Keys the request creates (new reservations and orphans) are not listed: no other
    /// request can know them yet.
    pub fn keys(&self, view: &impl StateView) -> BTreeSet<NsKey> {
        let ns = self.ns();
        let mut keys: BTreeSet<NsKey> = BTreeSet::new();
        let add_op = |keys: &mut BTreeSet<NsKey>, op: &Op| {
            keys.insert(NsKey::new(ns, op.key()));
            if let Some(id) = op.reservation() {
                let key = NsKey::new(ns, primitives::reservation_key(id));
                if let Some(r) = primitives::decode::<Reservation>(&key, view.entry(&key)) {
                    keys.insert(NsKey::new(ns, primitives::pool_key(&r.pool)));
                }
            }
        };
        match self {
            WriteRequest::Put { key, .. } | WriteRequest::Delete { key, .. } => {
                keys.insert(NsKey::new(ns, key.as_str()));
            }
            WriteRequest::Single { op, .. } => add_op(&mut keys, op),
            WriteRequest::Act(act) => {
                let ticket_conditions = act.ticket.iter().flat_map(|t| t.claims().conditions.iter());
                for c in ticket_conditions.chain(&act.conditions) {
                    keys.insert(NsKey::new(ns, c.key()));
                }
                act.ops.iter().for_each(|op| add_op(&mut keys, op));
            }
            WriteRequest::Txn(txn) => {
                for c in &txn.compare {
                    keys.insert(NsKey::new(ns, c.key()));
                }
                txn.success.iter().chain(&txn.failure).for_each(|op| add_op(&mut keys, op));
            }
        }
        keys
    }
}

/// Each failed condition, with the revision and correlation id of the change that broke it,
/// for a person: `condition 0 on "stock": 0 >= 1 is false, changed at revision 7 by job-3`.
pub fn describe_failures(failures: &[ConditionFailure]) -> String {
    failures
        .iter()
        .map(|f| {
            let key = primitives::display_key(&f.condition.key()).into_owned();
            let changed = match (&f.changed_at_revision, &f.changed_by) {
                (Some(rev), Some(by)) => format!(", changed at revision {rev} by {by}"),
                (Some(rev), None) => format!(", changed at revision {rev}"),
                _ => String::new(),
            };
            format!("condition {} on {key:?}: {}{changed}", f.index, f.reason)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Why a write request was not applied. Nothing of it took effect.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// A condition of the presented ticket no longer holds.
    StaleCheck {
        /// Each ticket condition that no longer holds, with the change that broke it.
        changed: Vec<ConditionFailure>,
    },
    /// A condition of the act or request itself does not hold.
    ConditionFailed {
        /// Each failing condition.
        failed: Vec<ConditionFailure>,
    },
    /// The ticket already served an act.
    TicketUsed,
    /// The ticket's TTL ran out.
    TicketExpired {
        /// When it expired.
        expired_at_ms: u64,
    },
    /// The ticket was issued in another namespace.
    TicketWrongNamespace {
        /// The namespace it was issued in.
        ticket_ns: String,
    },
    /// An op could not be applied.
    OpFailed {
        /// Position of the op.
        index: usize,
        /// Why.
        error: OpError,
    },
}

impl Refusal {
    /// What was refused and why, for a person (and the audit log): each condition that did not
    /// hold, with the revision and correlation id of the change that broke it.
    pub fn describe(&self) -> String {
        match self {
            Refusal::StaleCheck { changed } => {
                format!("the ticket's check no longer holds: {}", describe_failures(changed))
            }
            Refusal::ConditionFailed { failed } => format!("condition failed: {}", describe_failures(failed)),
            Refusal::TicketUsed => "this ticket already served an act".into(),
            Refusal::TicketExpired { expired_at_ms } => format!("the ticket expired at {expired_at_ms} ms"),
            Refusal::TicketWrongNamespace { ticket_ns } => format!("the ticket was issued in namespace {ticket_ns:?}"),
            Refusal::OpFailed { index, error } => format!("ops[{index}]: {error}"),
        }
    }

    /// The stable error code of the API.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::StaleCheck { .. } => "stale_check",
            Refusal::ConditionFailed { .. } => "condition_failed",
            Refusal::TicketUsed => "ticket_used",
            Refusal::TicketExpired { .. } => "ticket_expired",
            Refusal::TicketWrongNamespace { .. } => "invalid_ticket",
            Refusal::OpFailed { error, .. } => error.code(),
        }
    }
}

/// The result of a write request, as the API reports it (and as idempotency stores it).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A put committed.
    Put {
        /// Its revision.
        revision: Revision,
        /// The key's new version.
        version: u64,
    },
    /// A delete committed.
    Deleted {
        /// Its revision.
        revision: Revision,
    },
    /// A delete of an absent key.
    NotFound,
    /// An act committed.
    Acted {
        /// Its revision.
        revision: Revision,
        /// One result per op.
        results: Vec<OpResult>,
        /// Time from the ticket's check to this act, when a ticket was presented.
        check_to_use_ms: Option<u64>,
    },
    /// A single op (a primitive's route, or the reconciler).
    Applied {
        /// The revision it committed at, or the current one if it changed nothing.
        revision: Revision,
        /// What the op did.
        result: OpResult,
    },
    /// A txn ran one of its branches.
    Txn {
        /// Whether the `if` held (the `then` branch ran).
        succeeded: bool,
        /// The revision it committed at, or the current one if its branch had no ops.
        revision: Revision,
        /// One result per op of the branch that ran.
        results: Vec<OpResult>,
    },
    /// Not applied.
    Refused(Refusal),
}

impl Outcome {
    /// The same outcome reporting `revision` (for a request that changed nothing).
    fn at_revision(self, current: Revision) -> Self {
        match self {
            Outcome::Acted { results, check_to_use_ms, .. } => {
                Outcome::Acted { revision: current, results, check_to_use_ms }
            }
            Outcome::Applied { result, .. } => Outcome::Applied { revision: current, result },
            Outcome::Txn { succeeded, results, .. } => Outcome::Txn { succeeded, revision: current, results },
            other => other,
        }
    }
}

/// What `apply` produced: the response, the state delta and the audit event. The backend
/// persists all three in one storage transaction, or none of them.
#[derive(Clone, Debug, PartialEq)]
pub struct Applied {
    /// The response.
    pub outcome: Outcome,
    /// New entries of the keys that changed (tombstones for deletes), in key order.
    pub changes: Vec<(NsKey, Entry)>,
    /// Whether the request consumed `meta.revision` (it changed state).
    pub committed: bool,
    /// A ticket that this act used up, with its expiry (when its marker may be pruned).
    pub used_ticket: Option<(TicketId, u64)>,
    /// The audit event.
    pub audit: AuditEvent,
}

/// The request's writes so far, over the view.
struct Overlay<'v, V> {
    view: &'v V,
    changes: BTreeMap<NsKey, Entry>,
    revision: Revision,
    correlation_id: Option<&'v str>,
}

impl<V: StateView> StateView for Overlay<'_, V> {
    fn revision(&self) -> Revision {
        self.view.revision()
    }
    fn entry(&self, key: &NsKey) -> Option<&Entry> {
        self.changes.get(key).or_else(|| self.view.entry(key))
    }
    fn ticket_used(&self, id: &TicketId) -> bool {
        self.view.ticket_used(id)
    }
}

impl<V: StateView> Workspace for Overlay<'_, V> {
    fn entry(&self, key: &NsKey) -> Option<&Entry> {
        StateView::entry(self, key)
    }

    fn write(&mut self, key: NsKey, value: Value) {
        let record = match StateView::entry(self, &key).and_then(|e| e.record.as_ref()) {
            Some(r) => Record {
                value,
                version: r.version + 1,
                create_revision: r.create_revision,
                mod_revision: self.revision,
            },
            None => Record { value, version: 1, create_revision: self.revision, mod_revision: self.revision },
        };
        let entry = Entry {
            record: Some(record),
            changed_by: self.correlation_id.map(str::to_owned),
            changed_at: self.revision,
        };
        self.changes.insert(key, entry);
    }

    fn remove(&mut self, key: NsKey) -> bool {
        if StateView::entry(self, &key).and_then(|e| e.record.as_ref()).is_none() {
            return false;
        }
        let tombstone =
            Entry { record: None, changed_by: self.correlation_id.map(str::to_owned), changed_at: self.revision };
        self.changes.insert(key, tombstone);
        true
    }
}

/// Applies the ops in order; all or nothing.
fn run_ops<V: StateView>(
    view: &V,
    ns: &str,
    ops: &[Op],
    meta: &Meta,
) -> Result<(BTreeMap<NsKey, Entry>, Vec<OpResult>), Refusal> {
    let mut overlay = Overlay {
        view,
        changes: BTreeMap::new(),
        revision: meta.revision,
        correlation_id: meta.correlation_id.as_deref(),
    };
    let mut results = Vec::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        let ctx = OpCtx { ns, now_ms: meta.now_ms, revision: meta.revision, index };
        let result = apply_op(op, &mut overlay, &ctx).map_err(|error| Refusal::OpFailed { index, error })?;
        results.push(result);
    }
    Ok((overlay.changes, results))
}

/// Applies one write request to the state seen through `view`.
///
/// Pure: the same view, request and meta always give the same result.
pub fn apply(view: &impl StateView, request: &WriteRequest, meta: &Meta) -> Applied {
    assert!(meta.revision > view.revision(), "revisions must strictly increase");
    let keys: Vec<String> =
        request.keys(view).into_iter().map(|k| primitives::display_key(&k.key).into_owned()).collect();
    let mut audit = AuditEvent {
        revision: view.revision(),
        at_ms: meta.now_ms,
        ns: request.ns().to_owned(),
        kind: AuditKind::Put,
        outcome: "refused".into(),
        reason: None,
        keys,
        api_key_id: meta.api_key_id.clone(),
        correlation_id: meta.correlation_id.clone(),
        flow: None,
        check: None,
        detail: None,
    };
    let mut used_ticket = None;
    let result: Result<(BTreeMap<NsKey, Entry>, Outcome), Refusal> = match request {
        WriteRequest::Put { ns, key, value } => {
            audit.kind = AuditKind::Put;
            let op = Op::Put { key: key.clone(), value: value.clone() };
            run_ops(view, ns, std::slice::from_ref(&op), meta).map(|(changes, results)| {
                let version = match results.first() {
                    Some(OpResult::Put { version, .. }) => *version,
                    _ => unreachable!("a put yields a put result"),
                };
                (changes, Outcome::Put { revision: meta.revision, version })
            })
        }
        WriteRequest::Delete { ns, key } => {
            audit.kind = AuditKind::Delete;
            let op = Op::Delete { key: key.clone() };
            match run_ops(view, ns, std::slice::from_ref(&op), meta) {
                Ok((changes, _)) if changes.is_empty() => {
                    audit.reason = Some("not_found".into());
                    return refused_with(audit, Outcome::NotFound);
                }
                Ok((changes, _)) => Ok((changes, Outcome::Deleted { revision: meta.revision })),
                Err(refusal) => Err(refusal),
            }
        }
        WriteRequest::Act(act) => {
            audit.kind = AuditKind::Act;
            audit.flow = act.flow.clone().or_else(|| act.ticket.as_ref().and_then(|t| t.claims().flow.clone()));
            if let Some(ticket) = &act.ticket {
                let claims = ticket.claims();
                audit.check = Some(CheckRef {
                    revision: claims.revision,
                    issued_at_ms: claims.issued_at_ms,
                    correlation_id: claims.correlation_id.clone(),
                });
            }
            apply_act(view, act, meta).map(|(changes, outcome, used)| {
                used_ticket = used;
                (changes, outcome)
            })
        }
        WriteRequest::Single { ns, op, kind } => {
            audit.kind = *kind;
            run_ops(view, ns, std::slice::from_ref(op), meta).map(|(changes, mut results)| {
                let result = results.pop().expect("one op, one result");
                (changes, Outcome::Applied { revision: meta.revision, result })
            })
        }
        WriteRequest::Txn(txn) => {
            audit.kind = AuditKind::Txn;
            let succeeded = evaluate_all(view, &txn.ns, &txn.compare, meta.now_ms).is_empty();
            let branch = if succeeded { &txn.success } else { &txn.failure };
            if branch.is_empty() {
                // Nothing to write: like etcd, the revision does not move.
                audit.outcome = "committed".into();
                audit.detail = Some(UNCHANGED.into());
                let outcome = Outcome::Txn { succeeded, revision: view.revision(), results: Vec::new() };
                return Applied { outcome, changes: Vec::new(), committed: false, used_ticket: None, audit };
            }
            run_ops(view, &txn.ns, branch, meta)
                .map(|(changes, results)| (changes, Outcome::Txn { succeeded, revision: meta.revision, results }))
        }
    };
    match result {
        Ok((changes, outcome)) if changes.is_empty() => {
            // Nothing changed (a grant that existed, an expiry with nothing due, a delete op of
            // an absent key): like etcd, the revision does not move.
            audit.revision = view.revision();
            audit.outcome = "committed".into();
            audit.detail = Some(UNCHANGED.into());
            let outcome = outcome.at_revision(view.revision());
            Applied { outcome, changes: Vec::new(), committed: false, used_ticket, audit }
        }
        Ok((changes, outcome)) => {
            for (key, entry) in &changes {
                assert_eq!(entry.changed_at, meta.revision, "change to {key:?} not stamped with its revision");
            }
            audit.revision = meta.revision;
            audit.outcome = "committed".into();
            Applied { outcome, changes: changes.into_iter().collect(), committed: true, used_ticket, audit }
        }
        Err(refusal) => {
            audit.reason = Some(refusal.code().into());
            audit.detail = Some(refusal.describe());
            refused_with(audit, Outcome::Refused(refusal))
        }
    }
}

/// The audit detail of a committed request that changed nothing (a txn whose branch has no
/// ops, a grant that existed, a delete op of an absent key): its event carries the revision it
/// was evaluated at, which an earlier event carries too.
pub const UNCHANGED: &str = "changed nothing: the revision did not move (as in etcd); this is the revision it saw";

fn refused_with(audit: AuditEvent, outcome: Outcome) -> Applied {
    Applied { outcome, changes: Vec::new(), committed: false, used_ticket: None, audit }
}

type ActResult = (BTreeMap<NsKey, Entry>, Outcome, Option<(TicketId, u64)>);

fn apply_act(view: &impl StateView, act: &Act, meta: &Meta) -> Result<ActResult, Refusal> {
    let mut check_to_use_ms = None;
    let mut used = None;
    if let Some(ticket) = &act.ticket {
        let claims = ticket.claims();
        if claims.ns != act.ns {
            return Err(Refusal::TicketWrongNamespace { ticket_ns: claims.ns.clone() });
        }
        if meta.now_ms >= claims.expires_at_ms {
            return Err(Refusal::TicketExpired { expired_at_ms: claims.expires_at_ms });
        }
        if view.ticket_used(&claims.id) {
            return Err(Refusal::TicketUsed);
        }
        let changed = evaluate_all(view, &act.ns, &claims.conditions, meta.now_ms);
        if !changed.is_empty() {
            return Err(Refusal::StaleCheck { changed });
        }
        check_to_use_ms = Some(meta.now_ms.saturating_sub(claims.issued_at_ms));
        used = Some((claims.id, claims.expires_at_ms));
    }
    let failed = evaluate_all(view, &act.ns, &act.conditions, meta.now_ms);
    if !failed.is_empty() {
        return Err(Refusal::ConditionFailed { failed });
    }
    let (changes, results) = run_ops(view, &act.ns, &act.ops, meta)?;
    Ok((changes, Outcome::Acted { revision: meta.revision, results, check_to_use_ms }, used))
}

/// A check: conditions to evaluate now, and the ticket to issue if they hold.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckRequest {
    /// Namespace.
    pub ns: String,
    /// The conditions.
    pub conditions: Vec<Condition>,
    /// How long the ticket is valid.
    pub ttl_ms: u64,
    /// The flow it belongs to.
    pub flow: Option<String>,
    /// The id the ticket gets (random, from the engine).
    pub ticket_id: TicketId,
}

/// The result of a check: the claims to sign, or the failures and the audit event recording
/// the denial.
#[derive(Clone, Debug, PartialEq)]
pub enum CheckOutcome {
    /// Every condition held.
    Passed(TicketClaims),
    /// Some did not.
    Denied {
        /// The failing conditions.
        failed: Vec<ConditionFailure>,
        /// The audit event to record.
        audit: AuditEvent,
    },
}

/// Evaluates a check. Read-only: it changes nothing (`meta.revision` is ignored).
pub fn check(view: &impl StateView, request: &CheckRequest, meta: &Meta) -> CheckOutcome {
    let failed = evaluate_all(view, &request.ns, &request.conditions, meta.now_ms);
    if failed.is_empty() {
        return CheckOutcome::Passed(TicketClaims {
            id: request.ticket_id,
            ns: request.ns.clone(),
            conditions: request.conditions.clone(),
            revision: view.revision(),
            issued_at_ms: meta.now_ms,
            expires_at_ms: meta.now_ms.saturating_add(request.ttl_ms),
            flow: request.flow.clone(),
            correlation_id: meta.correlation_id.clone(),
            trace_id: None,
            span_id: None,
        });
    }
    let keys: BTreeSet<String> =
        request.conditions.iter().map(|c| primitives::display_key(&c.key()).into_owned()).collect();
    let audit = AuditEvent {
        revision: view.revision(),
        at_ms: meta.now_ms,
        ns: request.ns.clone(),
        kind: AuditKind::Check,
        outcome: "denied".into(),
        reason: Some("check_failed".into()),
        keys: keys.into_iter().collect(),
        api_key_id: meta.api_key_id.clone(),
        correlation_id: meta.correlation_id.clone(),
        flow: request.flow.clone(),
        check: None,
        detail: Some(format!("check failed: {}", describe_failures(&failed))),
    };
    CheckOutcome::Denied { failed, audit }
}
