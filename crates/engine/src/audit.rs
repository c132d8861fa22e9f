//! Reading the audit log: filtered queries and verification of the hash chain.

use gapguard_core::audit::{decode, hex, ChainVerifier};
use gapguard_core::AuditEvent;
use gapguard_store::Storage;

use crate::EngineError;

/// Events read from storage per round trip.
const PAGE: usize = 1024;

/// A filter over the audit log. Every field narrows the result.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    /// Only this namespace (`None`: all, for operators).
    pub ns: Option<String>,
    /// Only events at or after this revision.
    pub from_revision: u64,
    /// Only events after this sequence number (a paging cursor).
    pub after_seq: u64,
    /// Only events with this correlation id.
    pub correlation_id: Option<String>,
    /// Only events that read or wrote this key.
    pub key: Option<String>,
    /// At most this many events.
    pub limit: usize,
    /// The newest matching events (still returned oldest first), instead of the oldest.
    pub newest: bool,
}

/// One stored audit event with its place in the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredAuditEvent {
    /// Sequence number in the global chain.
    pub seq: u64,
    /// Its hash (hex).
    pub hash: String,
    /// The previous event's hash (hex).
    pub prev: String,
    /// The event.
    pub event: AuditEvent,
}

/// A page of audit events, oldest first.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditPage {
    /// The matching events.
    pub events: Vec<StoredAuditEvent>,
    /// Pass as `after_seq` to continue (the last event's seq), if the page is full.
    pub next_after_seq: Option<u64>,
}

/// The result of verifying the chain.
#[derive(Clone, Debug, PartialEq)]
pub struct AuditVerification {
    /// Whether every event verified.
    pub ok: bool,
    /// Events verified.
    pub events: u64,
    /// Hash of the last verified event (hex): anchor it elsewhere to detect truncation.
    pub head: String,
    /// The first broken event, if any.
    pub error: Option<gapguard_core::ChainError>,
}

/// Whether `e` is one `q` asks for. A correlation id finds a request's own events and the
/// acts that presented a ticket of the check with that id (a passing check writes no event of
/// its own: its act's event names it).
fn matches(q: &AuditQuery, e: &AuditEvent) -> bool {
    let by_correlation = |c: &String| {
        e.correlation_id.as_ref() == Some(c)
            || e.check.as_ref().is_some_and(|check| check.correlation_id.as_ref() == Some(c))
    };
    q.ns.as_ref().is_none_or(|ns| *ns == e.ns)
        && e.revision >= q.from_revision
        && q.correlation_id.as_ref().is_none_or(by_correlation)
        && q.key.as_ref().is_none_or(|k| e.keys.iter().any(|ek| ek == k))
}

fn decode_stored(e: gapguard_core::SealedEvent) -> Result<StoredAuditEvent, EngineError> {
    let (_, prev, event) = decode(&e.body).map_err(|err| {
        EngineError::Storage(gapguard_store::StoreError::Corrupt { what: "audit", detail: err.to_string() })
    })?;
    Ok(StoredAuditEvent { seq: e.seq, hash: hex(&e.hash), prev, event })
}

pub(crate) fn query(store: &dyn Storage, head_seq: u64, q: &AuditQuery) -> Result<AuditPage, EngineError> {
    let mut events = Vec::new();
    if q.limit == 0 {
        return Ok(AuditPage { events, next_after_seq: None });
    }
    if q.newest {
        // Walk back from the head one page at a time.
        let mut hi = head_seq;
        while hi > q.after_seq && events.len() < q.limit {
            let lo = hi.saturating_sub(PAGE as u64 - 1).max(q.after_seq + 1).max(1);
            let page = store.audit_range(lo, (hi - lo + 1) as usize)?;
            for sealed in page.into_iter().rev() {
                let stored = decode_stored(sealed)?;
                if matches(q, &stored.event) {
                    events.push(stored);
                    if events.len() == q.limit {
                        break;
                    }
                }
            }
            hi = lo - 1;
        }
        events.reverse();
        return Ok(AuditPage { events, next_after_seq: None });
    }
    let mut from = q.after_seq + 1;
    loop {
        let page = store.audit_range(from, PAGE)?;
        let n = page.len();
        for sealed in page {
            from = sealed.seq + 1;
            let stored = decode_stored(sealed)?;
            if matches(q, &stored.event) {
                events.push(stored);
                if events.len() == q.limit {
                    let next = events.last().map(|e| e.seq);
                    return Ok(AuditPage { events, next_after_seq: next });
                }
            }
        }
        if n < PAGE {
            return Ok(AuditPage { events, next_after_seq: None });
        }
    }
}

pub(crate) fn verify(store: &dyn Storage) -> Result<AuditVerification, EngineError> {
    let mut verifier = ChainVerifier::default();
    let mut from = 1;
    loop {
        let page = store.audit_range(from, PAGE)?;
        let n = page.len();
        for sealed in &page {
            if let Err(error) = verifier.push(sealed) {
                return Ok(AuditVerification {
                    ok: false,
                    events: verifier.events(),
                    head: hex(&verifier.head()),
                    error: Some(error),
                });
            }
            from = sealed.seq + 1;
        }
        if n < PAGE {
            return Ok(AuditVerification {
                ok: true,
                events: verifier.events(),
                head: hex(&verifier.head()),
                error: None,
            });
        }
    }
}
