//! Storage for gapguard: the [`Storage`] trait, the embedded [`redb`](embedded) backend, and the
//! [`conformance`] suite that every backend passes.
//!
//! A backend persists what core produced: state entries, the revision, sealed audit events,
//! used-ticket markers and idempotency records. One [`Batch`] is one storage transaction:
//! all of it is durable when [`Storage::commit`] returns, or none of it is.

use std::collections::{BTreeMap, BTreeSet};

use gapguard_core::{Entry, IdempotencyRecord, NsKey, Revision, SealedEvent, TicketId};

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod embedded;

pub use embedded::EmbeddedStore;

/// Where an idempotency record lives: its namespace, the caller's scope (the API key id, or
/// empty without authentication) and the client's key.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct IdempotencyKey {
    /// Namespace of the request.
    pub ns: String,
    /// Who sent it (API key id), so one tenant cannot replay another's key.
    pub scope: String,
    /// The `Idempotency-Key` header.
    pub key: String,
}

/// Everything a backend keeps, as read back at start-up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Recovered {
    /// The last committed revision (0 for a new store).
    pub revision: Revision,
    /// Every key's entry, tombstones included.
    pub entries: Vec<(NsKey, Entry)>,
    /// Used-ticket markers with the ticket's expiry.
    pub used_tickets: Vec<(TicketId, u64)>,
    /// Stored first responses.
    pub idempotency: Vec<(IdempotencyKey, IdempotencyRecord)>,
    /// Sequence number and hash of the last audit event.
    pub audit_head: Option<(u64, [u8; 32])>,
    /// The ticket signing key, once generated.
    pub ticket_key: Option<Vec<u8>>,
}

/// One storage transaction's worth of changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// The revision after this batch (unchanged if nothing in it committed a revision).
    pub revision: Revision,
    /// New entries (later ones for the same key win).
    pub entries: Vec<(NsKey, Entry)>,
    /// Sealed audit events, in sequence order, continuing the stored chain.
    pub audit: Vec<SealedEvent>,
    /// Tickets used by acts in this batch.
    pub used_tickets: Vec<(TicketId, u64)>,
    /// Idempotency records to store.
    pub idempotency: Vec<(IdempotencyKey, IdempotencyRecord)>,
    /// Expired ticket markers to drop.
    pub prune_tickets: Vec<TicketId>,
    /// Expired idempotency records to drop.
    pub prune_idempotency: Vec<IdempotencyKey>,
    /// Keys to forget entirely (compaction of old tombstones and resolved primitives). Applied
    /// before the batch's `entries`.
    pub forget_entries: Vec<NsKey>,
    /// The ticket key, when it is first generated.
    pub ticket_key: Option<Vec<u8>>,
}

/// Errors of a storage backend.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The underlying engine failed (I/O, corruption, full disk…).
    #[error("storage engine: {0}")]
    Engine(String),
    /// Stored bytes did not decode: corruption or a format we do not know.
    #[error("stored data does not decode ({what}): {detail}")]
    Corrupt {
        /// Which table or record.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// The batch does not continue the stored state (a bug in the caller).
    #[error("batch rejected: {0}")]
    Invalid(String),
}

/// A durable home for the guard's state. Implementations must make each [`Batch`] atomic and
/// durable (fsynced, unless the operator configured otherwise) before `commit` returns.
pub trait Storage: Send + Sync + 'static {
    /// Reads back everything kept, for start-up.
    fn recover(&self) -> Result<Recovered, StoreError>;
    /// Applies one batch atomically and durably.
    fn commit(&self, batch: Batch) -> Result<(), StoreError>;
    /// The stored entries of exactly these keys (absent keys are left out). A database backend
    /// loads a request's key set this way, in key order.
    fn load_keys(&self, keys: &BTreeSet<NsKey>) -> Result<BTreeMap<NsKey, Entry>, StoreError>;
    /// Up to `limit` audit events with sequence numbers from `from_seq`, in order.
    fn audit_range(&self, from_seq: u64, limit: usize) -> Result<Vec<SealedEvent>, StoreError>;
}
