//! The guard's state as core sees it: namespaced keys, records and the view a backend lends.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The global, strictly increasing revision. Every committed write request gets its own.
pub type Revision = u64;

/// A key inside a namespace. Ordered by namespace, then key, so a backend that loads a
/// request's key set in this order takes its row locks in one global order (no deadlocks).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NsKey {
    /// The namespace (tenant).
    pub ns: String,
    /// The key inside the namespace.
    pub key: String,
}

impl NsKey {
    /// Builds a namespaced key.
    pub fn new(ns: impl Into<String>, key: impl Into<String>) -> Self {
        Self { ns: ns.into(), key: key.into() }
    }
}

/// A live key's value and its history counters (etcd's meaning).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Any JSON value.
    pub value: Value,
    /// Writes to this key since it was (re)created; starts at 1.
    pub version: u64,
    /// The revision that created the key.
    pub create_revision: Revision,
    /// The revision of the last write to the key.
    pub mod_revision: Revision,
}

/// What the store keeps for a key: the live record, or a tombstone after a delete, plus who
/// changed it last. The last change is kept for tombstones too, so that a refused act can
/// name the revision and correlation id of the delete that broke its check.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// The live record; `None` once deleted.
    pub record: Option<Record>,
    /// Correlation id of the request that made the last change, if it had one.
    pub changed_by: Option<String>,
    /// Revision of the last change (a write or the delete).
    pub changed_at: Revision,
}

/// Read access to the state a request needs. A backend implements it over memory (embedded)
/// or over the rows it locked for the request (a database).
pub trait StateView {
    /// The last committed revision this view reflects.
    fn revision(&self) -> Revision;
    /// The entry of a key, live or tombstone; `None` if the key was never written (or its
    /// tombstone was compacted).
    fn entry(&self, key: &NsKey) -> Option<&Entry>;
    /// Whether a ticket with this id already served an act.
    fn ticket_used(&self, id: &crate::TicketId) -> bool;
}
