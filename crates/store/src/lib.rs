//! Storage for gapguard: the [`Storage`] trait, the embedded [`redb`](embedded) backend, and the
//! [`conformance`] suite that every backend passes.
//!
//! A backend persists what core produced: state entries, the revision, sealed audit events,
//! used-ticket markers and idempotency records. One [`Batch`] is one storage transaction:
//! all of it is durable when [`Storage::commit`] returns, or none of it is.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use gapguard_core::{Entry, IdempotencyRecord, NsKey, Revision, SealedEvent, TicketId};

#[cfg(feature = "conformance")]
pub mod conformance;
pub mod embedded;
pub mod postgres;

pub use embedded::EmbeddedStore;
pub use postgres::{PgOptions, PgStore};

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
    /// Where a shared backend's change log stood when this was read (see
    /// [`SharedStorage::changes_since`]); 0 for a backend with one writer.
    pub cursor: u64,
}

/// One storage transaction's worth of changes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Batch {
    /// The revision after this batch (unchanged if nothing in it committed a revision).
    pub revision: Revision,
    /// New entries (later ones for the same key win). Shared with the writer's state and
    /// change feed: a batch holds the same allocations, not copies.
    pub entries: Vec<(Arc<NsKey>, Arc<Entry>)>,
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
    /// A shared backend: drop used-ticket markers, idempotency records and forgettable entries
    /// whose time has come by the transaction's clock (a single-writer backend gets explicit
    /// lists in the fields above instead).
    pub prune_expired: bool,
    /// A shared backend: idempotency keys this node claimed for the requests of the batch, to
    /// release (see [`SharedStorage::claim_idempotency`]).
    pub release_claims: Vec<IdempotencyKey>,
}

impl Batch {
    /// Owned entries as a batch (and the engine's state) holds them: each key and entry one
    /// shared allocation.
    pub fn share_entries(entries: impl IntoIterator<Item = (NsKey, Entry)>) -> Vec<(Arc<NsKey>, Arc<Entry>)> {
        entries.into_iter().map(|(k, e)| (Arc::new(k), Arc::new(e))).collect()
    }
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
    /// The backend cannot be reached (a database down or a connection cut). Nothing of the
    /// transaction was applied, or — when the connection broke during the commit itself — its
    /// fate is unknown; the backend reconnects by itself on the next call.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The transaction lost a race with another writer (a serialization failure or a
    /// deadlock) and was rolled back: running it again is safe.
    #[error("storage conflict, retry: {0}")]
    Conflict(String),
    /// The database's schema is newer than this build knows, or otherwise unusable.
    #[error("{0}")]
    Schema(String),
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
    /// The backend's shared-writer side, if several processes write to it (a database that
    /// several gapguard nodes serve); `None` for a backend with a single writer.
    fn shared(&self) -> Option<&dyn SharedStorage> {
        None
    }
}

/// What a write batch's transaction locks and reads fresh before core applies it, on a
/// backend that other nodes write too.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LockRequest {
    /// Every key the batch's requests name, locked in key order.
    pub keys: BTreeSet<NsKey>,
    /// Tickets presented by the batch's acts: which of them are already used.
    pub tickets: Vec<TicketId>,
    /// Idempotency records the batch's requests carry keys for.
    pub idempotency: Vec<IdempotencyKey>,
    /// Look for at most this many reservations and leases past their deadline (the
    /// reconciler); 0 for none.
    pub due_limit: usize,
}

/// What [`SharedStorage::begin`] read under its locks.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Locked {
    /// The last committed revision.
    pub revision: Revision,
    /// Sequence number and hash of the last audit event.
    pub audit_head: Option<(u64, [u8; 32])>,
    /// The database's clock (ms since the Unix epoch), read after the locks were taken: the
    /// time every node judges TTLs by.
    pub now_ms: u64,
    /// The entries of the requested keys that exist (tombstones included).
    pub entries: BTreeMap<NsKey, Entry>,
    /// The requested tickets that were already used, with their expiry.
    pub used_tickets: Vec<(TicketId, u64)>,
    /// The requested idempotency records that exist.
    pub idempotency: Vec<(IdempotencyKey, IdempotencyRecord)>,
    /// Held reservations and leases whose deadline has passed, locked (rows another node has
    /// locked are skipped: it is expiring them).
    pub due: Vec<(NsKey, Entry)>,
}

/// Changes read from a shared backend's change log, for a node's in-memory replica.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    /// Where the log stands after these changes (pass it to the next call).
    pub cursor: u64,
    /// The last committed revision, as of the same instant.
    pub revision: Revision,
    /// The database's clock when read (ms since the Unix epoch).
    pub now_ms: u64,
    /// Sequence number of the last audit event, as of the same instant.
    pub audit_seq: u64,
    /// Each change in commit order: its revision, its key, and the new entry (`None`: the key
    /// was forgotten by compaction; not a change a watcher sees).
    pub changes: Vec<(Revision, NsKey, Option<Entry>)>,
}

/// The extra half of a backend that several nodes write at once (PostgreSQL). A node's writer
/// runs each batch as [`begin`](SharedStorage::begin), then core, then
/// [`Storage::commit`] (or [`rollback`](SharedStorage::rollback)), and keeps its in-memory
/// replica current with [`changes_since`](SharedStorage::changes_since).
pub trait SharedStorage: Send + Sync {
    /// Opens the batch's transaction: locks the global counter row, then the requested keys
    /// in key order, and reads what core needs, fresh.
    fn begin(&self, lock: &LockRequest) -> Result<Locked, StoreError>;
    /// Locks and reads more keys inside the open transaction (a reservation's pool, learnt
    /// from the reservation read by `begin`).
    fn lock_more(&self, keys: &BTreeSet<NsKey>) -> Result<BTreeMap<NsKey, Entry>, StoreError>;
    /// Abandons the open transaction, if any.
    fn rollback(&self);
    /// The changes committed after `cursor` (0: from the start of the kept log). `Err` with
    /// [`StoreError::Invalid`] when the log no longer goes back that far: recover instead.
    fn changes_since(&self, cursor: u64) -> Result<Changes, StoreError>;
    /// Marks an idempotency key as in flight on this node for `ttl_ms` (or until the batch
    /// that handles it releases it). `false`: another node holds it.
    fn claim_idempotency(&self, key: &IdempotencyKey, ttl_ms: u64) -> Result<bool, StoreError>;
    /// Releases a claim outside a batch (the request failed before reaching one).
    fn release_claim(&self, key: &IdempotencyKey);
    /// Calls `wake` whenever another node may have committed something (a database
    /// notification); best effort, the caller polls too.
    fn subscribe(&self, wake: Box<dyn Fn() + Send + Sync>);
    /// The first and last change-log positions the last successful [`Storage::commit`] took
    /// (`None`: it logged no change). When the first follows the caller's cursor, no other
    /// node committed a change in between, and the caller may apply its own batch's changes
    /// to its replica instead of reading them back.
    fn last_changes(&self) -> Option<(u64, u64)>;
    /// Whether the database answers now.
    fn ping(&self) -> Result<(), StoreError>;
}
