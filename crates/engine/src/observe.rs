//! The engine's metrics hook: what it tells an [`Observer`] about checks, writes and group
//! commits. The engine knows nothing of how they are exported; the server turns them into
//! Prometheus metrics.

use std::time::Duration;

use gapguard_core::{ConditionFailure, Outcome, WriteRequest};

/// Receives what the engine did. Every method has a no-op default. Calls come from the
/// request's task (checks, replays, and each write once it is durable) or from the writer
/// thread (group commits, replays and conflicts found in a batch, the reconciler's expiries),
/// so an implementation must be cheap and must not block.
pub trait Observer: Send + Sync {
    /// A check was evaluated; `failed` is empty when it passed.
    fn checked(&self, _ns: &str, _flow: Option<&str>, _failed: &[ConditionFailure]) {}

    /// A write request (a reconciler's expiry included) was evaluated at `now_ms` and its
    /// outcome is durable. Refusals are reported too; nothing is reported for a batch whose
    /// commit failed.
    fn written(&self, _request: &WriteRequest, _outcome: &Outcome, _now_ms: u64) {}

    /// A request under an `Idempotency-Key` was answered with the stored first outcome.
    fn replayed(&self) {}

    /// An `Idempotency-Key` was presented with a request other than the one it first carried.
    fn idempotency_conflict(&self) {}

    /// A batch holding `n_requests` write requests was made durable by one storage commit,
    /// which took `elapsed`. Batches of pruning or denied-check audit events alone report 0.
    fn committed(&self, _n_requests: usize, _elapsed: Duration) {}
    /// A shared backend's transaction lost a race (a serialization failure or a deadlock) and
    /// the batch is being run again.
    fn storage_retried(&self) {}
}

/// The observer of an engine nobody watches.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoObserver;

impl Observer for NoObserver {}

impl std::fmt::Debug for dyn Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Observer")
    }
}
