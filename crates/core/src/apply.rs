//! `apply` and `check`: the guard's state transitions, as pure functions.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::audit::{AuditEvent, AuditKind, CheckRef};
use crate::condition::{evaluate_all, Condition, ConditionFailure};
use crate::op::{apply_op, Op, OpError, OpResult};
use crate::state::{Entry, NsKey, Revision, StateView};
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
}

impl WriteRequest {
    /// The namespace the request writes in.
    pub fn ns(&self) -> &str {
        match self {
            WriteRequest::Put { ns, .. } | WriteRequest::Delete { ns, .. } => ns,
            WriteRequest::Act(act) => &act.ns,
            WriteRequest::Txn(txn) => &txn.ns,
        }
    }

    /// Every key the request reads or writes, sorted: a backend loads (and locks) exactly these.
    pub fn keys(&self) -> BTreeSet<NsKey> {
        let ns = self.ns();
        let mut keys: BTreeSet<NsKey> = BTreeSet::new();
        let mut add = |key: &str| {
            keys.insert(NsKey::new(ns, key));
        };
        match self {
            WriteRequest::Put { key, .. } | WriteRequest::Delete { key, .. } => add(key),
            WriteRequest::Act(act) => {
                let ticket_conditions = act.ticket.iter().flat_map(|t| t.claims().conditions.iter());
                ticket_conditions.chain(&act.conditions).for_each(|c| add(c.key()));
                act.ops.iter().for_each(|op| add(op.key()));
            }
            WriteRequest::Txn(txn) => {
                txn.compare.iter().for_each(|c| add(c.key()));
                txn.success.iter().chain(&txn.failure).for_each(|op| add(op.key()));
            }
        }
        keys
    }
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

/// Applies the ops in order; all or nothing.
fn run_ops<V: StateView>(
    view: &V,
    ns: &str,
    ops: &[Op],
    meta: &Meta,
) -> Result<(BTreeMap<NsKey, Entry>, Vec<OpResult>), Refusal> {
    let mut overlay = Overlay { view, changes: BTreeMap::new() };
    let mut results = Vec::with_capacity(ops.len());
    for (index, op) in ops.iter().enumerate() {
        let key = NsKey::new(ns, op.key());
        let (entry, result) = apply_op(op, overlay.entry(&key), meta.revision, meta.correlation_id.as_deref())
            .map_err(|error| Refusal::OpFailed { index, error })?;
        if let Some(entry) = entry {
            overlay.changes.insert(key, entry);
        }
        results.push(result);
    }
    Ok((overlay.changes, results))
}

/// Applies one write request to the state seen through `view`.
///
/// Pure: the same view, request and meta always give the same result.
pub fn apply(view: &impl StateView, request: &WriteRequest, meta: &Meta) -> Applied {
    assert!(meta.revision > view.revision(), "revisions must strictly increase");
    let keys: Vec<String> = request.keys().into_iter().map(|k| k.key).collect();
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
        WriteRequest::Txn(txn) => {
            audit.kind = AuditKind::Txn;
            let succeeded = evaluate_all(view, &txn.ns, &txn.compare).is_empty();
            let branch = if succeeded { &txn.success } else { &txn.failure };
            if branch.is_empty() {
                // Nothing to write: like etcd, the revision does not move.
                audit.outcome = "committed".into();
                let outcome = Outcome::Txn { succeeded, revision: view.revision(), results: Vec::new() };
                return Applied { outcome, changes: Vec::new(), committed: false, used_ticket: None, audit };
            }
            run_ops(view, &txn.ns, branch, meta)
                .map(|(changes, results)| (changes, Outcome::Txn { succeeded, revision: meta.revision, results }))
        }
    };
    match result {
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
            refused_with(audit, Outcome::Refused(refusal))
        }
    }
}

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
        let changed = evaluate_all(view, &act.ns, &claims.conditions);
        if !changed.is_empty() {
            return Err(Refusal::StaleCheck { changed });
        }
        check_to_use_ms = Some(meta.now_ms.saturating_sub(claims.issued_at_ms));
        used = Some((claims.id, claims.expires_at_ms));
    }
    let failed = evaluate_all(view, &act.ns, &act.conditions);
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
    let failed = evaluate_all(view, &request.ns, &request.conditions);
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
        });
    }
    let keys: BTreeSet<String> = request.conditions.iter().map(|c| c.key().to_owned()).collect();
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
    };
    CheckOutcome::Denied { failed, audit }
}
