//! Audit events and their BLAKE3 hash chain.
//!
//! Each event is sealed as `hash = BLAKE3(body)` where the body is the event's JSON encoding
//! including its sequence number and the previous event's hash. Storage keeps the body bytes
//! exactly as hashed, so verification never depends on re-encoding. Changing, dropping or
//! reordering any stored event breaks the chain at that point; truncating the tail does not,
//! which is why verification reports the head hash for the operator to anchor elsewhere.

use serde::{Deserialize, Serialize};

use crate::state::Revision;

/// What kind of request an audit event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A plain put.
    Put,
    /// A plain delete.
    Delete,
    /// An act (ticket and/or conditions, plus ops).
    Act,
    /// An etcd-style txn.
    Txn,
    /// A check that was denied (passing checks write nothing).
    Check,
    /// A lease acquisition, renewal or release.
    Lease,
    /// A pool's capacity set.
    Pool,
    /// A reservation made, committed or released.
    Reservation,
    /// A grant or revocation.
    Grant,
    /// An orphan resolved.
    Orphan,
    /// The reconciler expiring a reservation or a lease.
    Expire,
}

/// The check whose ticket an act presented.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRef {
    /// Revision at which the check's conditions held.
    pub revision: Revision,
    /// When the check ran.
    pub issued_at_ms: u64,
    /// The check's correlation id.
    pub correlation_id: Option<String>,
}

/// One audit event, as core produces it (before sealing).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// The revision the request committed at; for a refusal or denial, the revision it was
    /// evaluated against.
    pub revision: Revision,
    /// When it happened (server clock, ms since the Unix epoch).
    pub at_ms: u64,
    /// Namespace.
    pub ns: String,
    /// Request kind.
    pub kind: AuditKind,
    /// `committed`, `refused` (an act or delete that was not applied) or `denied` (a check).
    pub outcome: String,
    /// The stable error code of a refusal or denial.
    pub reason: Option<String>,
    /// The namespace-relative keys the request read or wrote, sorted, without duplicates.
    pub keys: Vec<String>,
    /// The API key that made the request, when authentication is on.
    pub api_key_id: Option<String>,
    /// The request's correlation id.
    pub correlation_id: Option<String>,
    /// The flow the request named.
    pub flow: Option<String>,
    /// For an act that presented a ticket: the check it came from.
    pub check: Option<CheckRef>,
    /// For a refusal or denial: what did not hold, and which revision (and correlation id)
    /// changed it, for a person; for a committed request that changed nothing,
    /// the text of `apply::UNCHANGED`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A sealed event as stored: its body bytes (exactly what was hashed) and the hash.
#[derive(Clone, Debug, PartialEq)]
pub struct SealedEvent {
    /// Position in the global chain, from 1.
    pub seq: u64,
    /// JSON body: `{"seq", "prev", "event"}`.
    pub body: Vec<u8>,
    /// BLAKE3 of `body`.
    pub hash: [u8; 32],
}

#[derive(Serialize, Deserialize)]
struct Body<E> {
    seq: u64,
    prev: String,
    event: E,
}

/// The hash that precedes the first event.
pub const GENESIS: [u8; 32] = [0; 32];

/// The room a sealed body starts with: an event of a few keys with a correlation id takes
/// about 300 bytes.
const BODY_CAPACITY: usize = 512;

/// Seals `event` as number `seq` after the event whose hash is `prev`.
pub fn seal(seq: u64, prev: &[u8; 32], event: &AuditEvent) -> SealedEvent {
    let body = Body { seq, prev: hex(prev), event };
    // Sized for a typical event once, rather than grown from empty a handful of times.
    let mut bytes = Vec::with_capacity(BODY_CAPACITY);
    serde_json::to_writer(&mut bytes, &body).expect("audit events always serialize");
    let body = bytes;
    let hash = *blake3::hash(&body).as_bytes();
    SealedEvent { seq, body, hash }
}

/// Decodes a stored body into `(seq, prev hash hex, event)`.
pub fn decode(body: &[u8]) -> Result<(u64, String, AuditEvent), serde_json::Error> {
    let body: Body<AuditEvent> = serde_json::from_slice(body)?;
    Ok((body.seq, body.prev, body.event))
}

/// Where and why a chain fails to verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("audit chain broken at event {seq}: {reason}")]
pub struct ChainError {
    /// The first event that does not verify.
    pub seq: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// Verifies the chain incrementally: feed events in order with [`ChainVerifier::push`].
#[derive(Debug)]
pub struct ChainVerifier {
    prev: [u8; 32],
    next_seq: u64,
}

impl Default for ChainVerifier {
    fn default() -> Self {
        Self { prev: GENESIS, next_seq: 1 }
    }
}

impl ChainVerifier {
    /// Checks the next stored event: its hash, its sequence number and its link.
    pub fn push(&mut self, event: &SealedEvent) -> Result<(), ChainError> {
        let fail = |reason: String| ChainError { seq: event.seq, reason };
        if *blake3::hash(&event.body).as_bytes() != event.hash {
            return Err(fail("body does not match its hash (event altered)".into()));
        }
        let (seq, prev, _) = decode(&event.body).map_err(|e| fail(format!("body does not decode: {e}")))?;
        if seq != event.seq || seq != self.next_seq {
            return Err(fail(format!("sequence {seq} where {} was expected (event missing or moved)", self.next_seq)));
        }
        if prev != hex(&self.prev) {
            return Err(fail("previous-hash link does not match (event missing, moved or replaced)".into()));
        }
        self.prev = event.hash;
        self.next_seq += 1;
        Ok(())
    }

    /// Events verified so far.
    pub fn events(&self) -> u64 {
        self.next_seq - 1
    }

    /// Hash of the last verified event (the genesis hash if none).
    pub fn head(&self) -> [u8; 32] {
        self.prev
    }
}

/// Lowercase hex of a hash.
pub fn hex(bytes: &[u8]) -> String {
    // A table instead of `format!` per byte: this runs for every audit event on the writer.
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(DIGITS[usize::from(b >> 4)] as char);
        out.push(DIGITS[usize::from(b & 0x0f)] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(revision: u64) -> AuditEvent {
        AuditEvent {
            revision,
            at_ms: 5,
            ns: "n".into(),
            kind: AuditKind::Put,
            outcome: "committed".into(),
            reason: None,
            keys: vec!["k".into()],
            api_key_id: None,
            correlation_id: Some("c".into()),
            flow: None,
            check: None,
            detail: None,
        }
    }

    fn chain(n: u64) -> Vec<SealedEvent> {
        let mut prev = GENESIS;
        (1..=n)
            .map(|seq| {
                let sealed = seal(seq, &prev, &event(seq));
                prev = sealed.hash;
                sealed
            })
            .collect()
    }

    fn verify(events: &[SealedEvent]) -> Result<u64, ChainError> {
        let mut v = ChainVerifier::default();
        for e in events {
            v.push(e)?;
        }
        Ok(v.events())
    }

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa0, 0xff]), "000fa0ff");
        assert_eq!(hex(&[]), "");
    }

    #[test]
    fn an_intact_chain_verifies() {
        assert_eq!(verify(&chain(5)), Ok(5));
    }

    #[test]
    fn an_altered_body_is_caught_at_its_event() {
        let mut events = chain(5);
        let text = String::from_utf8(events[2].body.clone()).unwrap().replace("committed", "refused__");
        events[2].body = text.into_bytes();
        assert_eq!(verify(&events).unwrap_err().seq, 3);
    }

    #[test]
    fn a_rehashed_altered_event_breaks_the_next_link() {
        let mut events = chain(5);
        let mut altered = event(3);
        altered.ns = "other".into();
        events[2] = seal(3, &events[1].hash, &altered);
        assert_eq!(verify(&events).unwrap_err().seq, 4);
    }

    #[test]
    fn a_dropped_event_is_caught() {
        let mut events = chain(5);
        events.remove(1);
        assert_eq!(verify(&events).unwrap_err().seq, 3);
    }
}
