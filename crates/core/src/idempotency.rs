//! Idempotency records: the first response to a request, stored atomically with its effect.

use serde::{Deserialize, Serialize};

use crate::apply::Outcome;

/// The stored first response under one idempotency key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// BLAKE3 of the request (method, route and body) that first used the key.
    pub fingerprint: [u8; 32],
    /// What that request got; a replay answers it again.
    pub outcome: Outcome,
    /// When the record may be pruned.
    pub expires_at_ms: u64,
}

/// What to do with a request that carries an idempotency key.
#[derive(Clone, Debug, PartialEq)]
pub enum IdempotencyDecision<'a> {
    /// No live record: execute it (and store its outcome).
    Execute,
    /// The same request ran before: answer its stored outcome.
    Replay(&'a Outcome),
    /// Another request used this key: refuse it.
    Conflict,
}

/// Decides a request with `fingerprint` at `now_ms` against the record stored under its key.
pub fn decide<'a>(
    record: Option<&'a IdempotencyRecord>,
    fingerprint: &[u8; 32],
    now_ms: u64,
) -> IdempotencyDecision<'a> {
    match record {
        Some(r) if r.expires_at_ms > now_ms => {
            if r.fingerprint == *fingerprint {
                IdempotencyDecision::Replay(&r.outcome)
            } else {
                IdempotencyDecision::Conflict
            }
        }
        _ => IdempotencyDecision::Execute,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_conflict_and_expiry() {
        let record = IdempotencyRecord { fingerprint: [1; 32], outcome: Outcome::NotFound, expires_at_ms: 100 };
        assert_eq!(decide(Some(&record), &[1; 32], 99), IdempotencyDecision::Replay(&Outcome::NotFound));
        assert_eq!(decide(Some(&record), &[2; 32], 99), IdempotencyDecision::Conflict);
        assert_eq!(decide(Some(&record), &[2; 32], 100), IdempotencyDecision::Execute);
        assert_eq!(decide(None, &[1; 32], 0), IdempotencyDecision::Execute);
    }
}
