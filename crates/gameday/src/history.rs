//! The recorded history of a run: one [`OpRecord`] per operation of every actor (what it
//! checked, when, what it wrote, when, and what came of it), and the resolution of outcomes
//! the actor could not know (a connection that broke mid-request) from the server's audit log.

use std::collections::HashMap;
use std::sync::Mutex;

use gapguard_client::{AuditQuery, Client, ClientError};
use serde::Serialize;
use serde_json::Value;

/// Audit events fetched per page when resolving outcomes.
const AUDIT_PAGE_EVENTS: usize = 5_000;

/// What came of one operation.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Outcome {
    /// Its write was applied at this revision (`resolved`: learned from the audit log after
    /// the answer was lost).
    Committed {
        /// The revision of its (last) write.
        revision: u64,
        /// Whether the actor never saw the answer and the audit log told.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        resolved: bool,
    },
    /// An idempotent replay: the stored answer of an earlier attempt, no new effect.
    Replayed {
        /// The revision of the first attempt's write.
        revision: u64,
    },
    /// Refused, by the server (its error code) or by the actor's own check
    /// (`out_of_stock`, `not_permitted`…): nothing written.
    Refused {
        /// The reason.
        reason: String,
    },
    /// The actor crashed mid-way (a scheduled fault) after writing part of its work.
    Crashed {
        /// The revision of the last write it made before crashing.
        revision: Option<u64>,
    },
    /// No answer (the connection failed or the server was down), and the audit log shows no
    /// write with its correlation id: nothing was applied.
    Failed {
        /// The transport error.
        error: String,
    },
}

impl Outcome {
    /// The revision of an applied write.
    pub fn committed_revision(&self) -> Option<u64> {
        match self {
            Self::Committed { revision, .. } => Some(*revision),
            _ => None,
        }
    }

    /// The outcome of a write: committed at its revision, or [`Outcome::from_error`].
    pub fn of_write(result: Result<u64, ClientError>) -> Self {
        match result {
            Ok(revision) => Self::Committed { revision, resolved: false },
            Err(e) => Self::from_error(&e),
        }
    }

    /// Whether the request failed (no answer, or not one the server gave on purpose).
    pub fn is_failed(&self) -> bool {
        matches!(self, Self::Failed { .. })
    }

    /// The outcome of a failed request: a refusal with the server's code, or a failure.
    pub fn from_error(error: &ClientError) -> Self {
        match error.code() {
            Some(code) => Self::Refused { reason: code.to_owned() },
            None => Self::Failed { error: error.to_string() },
        }
    }
}

/// One operation of one actor.
#[derive(Clone, Debug, Serialize)]
pub struct OpRecord {
    /// Who (`buyer-3`, `admin`…).
    pub actor: String,
    /// What kind of operation (`buy`, `restock`, `revoke`…). Only the scenario's main kind
    /// counts as "attempted" in the report; the others are the adversaries' and helpers'.
    pub kind: &'static str,
    /// Sent as `X-Correlation-Id` with its writes.
    pub correlation_id: String,
    /// When its check answered, ms since the run started.
    pub check_at_ms: Option<f64>,
    /// When its use was sent, ms since the run started.
    pub use_at_ms: Option<f64>,
    /// What it checked (the value and version it saw, the ticket's conditions…).
    pub checked: Value,
    /// What it wrote.
    pub written: Value,
    /// What came of it.
    pub outcome: Outcome,
}

impl OpRecord {
    /// A record of `kind` by `actor` with nothing checked or written yet.
    pub fn new(actor: &str, kind: &'static str, correlation_id: String) -> Self {
        Self {
            actor: actor.to_owned(),
            kind,
            correlation_id,
            check_at_ms: None,
            use_at_ms: None,
            checked: Value::Null,
            written: Value::Null,
            outcome: Outcome::Failed { error: "not run".into() },
        }
    }

    /// The check-to-use gap in ms, if the operation got as far as its use.
    pub fn check_to_use_ms(&self) -> Option<f64> {
        Some(self.use_at_ms? - self.check_at_ms?).map(|gap| gap.max(0.0))
    }
}

/// The history of one run, shared by its actors.
#[derive(Debug, Default)]
pub struct History {
    ops: Mutex<Vec<OpRecord>>,
}

impl History {
    /// Appends one operation.
    pub fn record(&self, op: OpRecord) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// Takes every operation recorded so far, in the order they were recorded.
    pub fn take(&self) -> Vec<OpRecord> {
        std::mem::take(&mut *self.ops.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// How many operations are recorded.
    pub fn len(&self) -> usize {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether nothing is recorded yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Turns the `Failed` outcomes (no answer) into `Committed { resolved: true }` where the audit
/// log of `ns` shows a committed write with the operation's correlation id; returns how many
/// were resolved so.
pub async fn resolve_from_audit(client: &Client, ns: &str, ops: &mut [OpRecord]) -> Result<usize, ClientError> {
    if !ops.iter().any(|op| matches!(op.outcome, Outcome::Failed { .. })) {
        return Ok(0);
    }
    let mut committed: HashMap<String, u64> = HashMap::new();
    let mut after_seq = None;
    loop {
        let query = AuditQuery { after_seq, limit: Some(AUDIT_PAGE_EVENTS), ..AuditQuery::default() };
        let page = client.audit(ns, &query).await?;
        for event in &page.events {
            if event.outcome == "committed" {
                if let Some(id) = &event.correlation_id {
                    let revision = committed.entry(id.clone()).or_default();
                    *revision = (*revision).max(event.revision);
                }
            }
        }
        match (page.next_after_seq, page.events.last()) {
            (Some(next), _) => after_seq = Some(next),
            (None, Some(last)) if page.events.len() == AUDIT_PAGE_EVENTS => after_seq = Some(last.seq),
            _ => break,
        }
    }
    let mut resolved = 0;
    for op in ops.iter_mut() {
        if let Outcome::Failed { .. } = op.outcome {
            if let Some(&revision) = committed.get(&op.correlation_id) {
                op.outcome = Outcome::Committed { revision, resolved: true };
                resolved += 1;
            }
        }
    }
    Ok(resolved)
}
