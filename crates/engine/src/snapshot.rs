//! The immutable, durable state that readers see, shared cheaply between versions.

use std::sync::Arc;

use gapguard_core::{Entry, IdempotencyRecord, NsKey, Revision, StateView, TicketId};
use gapguard_store::IdempotencyKey;

/// A consistent view of the state as of one durable batch. Persistent maps make a copy O(1),
/// so the writer can work on the next version while readers hold this one.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// The last committed revision.
    pub revision: Revision,
    /// Every key's entry (tombstones included).
    pub entries: imbl::OrdMap<NsKey, Entry>,
    /// Used-ticket markers with their ticket's expiry.
    pub used_tickets: imbl::HashMap<TicketId, u64>,
    /// Stored first responses by idempotency key.
    pub idempotency: imbl::HashMap<IdempotencyKey, Arc<IdempotencyRecord>>,
}

impl StateView for Snapshot {
    fn revision(&self) -> Revision {
        self.revision
    }
    fn entry(&self, key: &NsKey) -> Option<&Entry> {
        self.entries.get(key)
    }
    fn ticket_used(&self, id: &TicketId) -> bool {
        self.used_tickets.contains_key(id)
    }
}
