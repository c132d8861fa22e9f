//! The coordination primitives' state — leases, pools, reservations, grants and orphans — and
//! where it lives in the key space.
//!
//! Each primitive is an ordinary versioned record under an internal key that starts with
//! [`INTERNAL`] (U+0001), a character no user key may contain. So they share everything keys
//! have: revisions, atomic multi-key requests, tombstones that name who changed them last
//! (a revoked grant names its revocation), durability, the audit log and the change feed.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::state::{Entry, NsKey};

/// The first character of every internal key.
pub const INTERNAL: char = '\u{1}';

/// Whether a (namespace-relative) key is internal.
pub fn is_internal(key: &str) -> bool {
    key.starts_with(INTERNAL)
}

/// The internal key of a lease.
pub fn lease_key(name: &str) -> String {
    format!("{INTERNAL}lease/{name}")
}

/// The internal key of a pool.
pub fn pool_key(pool: &str) -> String {
    format!("{INTERNAL}pool/{pool}")
}

/// The internal key of a reservation.
pub fn reservation_key(id: &str) -> String {
    format!("{INTERNAL}rsv/{id}")
}

/// The internal key of a grant; the parts are separated by U+0000, which no part may contain.
pub fn grant_key(subject: &str, action: &str, resource: &str) -> String {
    format!("{INTERNAL}grant/{subject}\u{0}{action}\u{0}{resource}")
}

/// The internal key of an orphan.
pub fn orphan_key(id: &str) -> String {
    format!("{INTERNAL}orphan/{id}")
}

/// Prefix of every key of one kind (`"lease/"`, `"pool/"`, `"rsv/"`, `"grant/"`, `"orphan/"`).
pub fn kind_prefix(kind: &str) -> String {
    format!("{INTERNAL}{kind}")
}

/// How a key is shown in audit events and the change feed: user keys as they are, internal
/// keys as `lease:NAME`, `pool:NAME`, `reservation:ID`, `grant:SUBJECT|ACTION|RESOURCE` (see
/// [`describe_internal`] for the escaping) or `orphan:ID`.
pub fn display_key(key: &str) -> std::borrow::Cow<'_, str> {
    match describe_internal(key) {
        Some((kind, name)) => format!("{kind}:{name}").into(),
        None => key.into(),
    }
}

/// The kind (`lease`, `pool`, `reservation`, `grant` or `orphan`) and the name of an internal
/// key, as users see them (a grant's parts joined by `|`, a `|` or `\` within a part escaped
/// by a `\`, so that two grants never show alike); `None` for a user key.
pub fn describe_internal(key: &str) -> Option<(&'static str, String)> {
    let rest = key.strip_prefix(INTERNAL)?;
    let (kind, name) = rest.split_once('/')?;
    let kind = match kind {
        "lease" => "lease",
        "pool" => "pool",
        "rsv" => "reservation",
        "grant" => "grant",
        "orphan" => "orphan",
        _ => return None,
    };
    if kind != "grant" {
        return Some((kind, name.to_owned()));
    }
    let parts: Vec<String> = name.split('\u{0}').map(|part| part.replace('\\', "\\\\").replace('|', "\\|")).collect();
    Some((kind, parts.join("|")))
}

/// The id of the `idx`-th object a request creates at `revision`: unique, deterministic.
pub fn object_id(prefix: &str, revision: u64, idx: usize) -> String {
    format!("{prefix}_{revision:x}_{idx}")
}

/// A lease: who holds it, until when, and the last fencing token issued for it. The record is
/// never deleted, so the token keeps growing across releases, expiries and restarts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// The current holder, if held (it may have expired: check `expires_at_ms`).
    pub holder: Option<String>,
    /// The last fencing token issued (0: never acquired).
    pub token: u64,
    /// When the current hold expires.
    pub expires_at_ms: u64,
    /// The TTL of the current hold (renewals reuse it by default).
    pub ttl_ms: u64,
}

impl Lease {
    /// The holder, if the lease is held and not expired at `now_ms`.
    pub fn live_holder(&self, now_ms: u64) -> Option<&str> {
        self.holder.as_deref().filter(|_| now_ms < self.expires_at_ms)
    }
}

/// A counted resource.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    /// Total amount.
    pub capacity: u64,
    /// Consumed by committed reservations.
    pub used: u64,
    /// Held by live reservations.
    pub reserved: u64,
}

impl Pool {
    /// What can still be reserved.
    pub fn available(&self) -> u64 {
        self.capacity - self.used - self.reserved
    }

    /// The pool invariant, asserted after every change: `used + reserved <= capacity`.
    pub fn assert_invariant(&self) {
        assert!(
            self.used.checked_add(self.reserved).is_some_and(|sum| sum <= self.capacity),
            "pool invariant broken: used {} + reserved {} > capacity {}",
            self.used,
            self.reserved,
            self.capacity
        );
    }
}

/// Where a reservation stands. It leaves `Held` at most once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReservationState {
    /// Holding its amount.
    Held,
    /// Consumed.
    Committed,
    /// Given back by its owner.
    Released,
    /// Given back by the reconciler at its deadline.
    Expired,
}

/// An amount held from a pool until a deadline.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Reservation {
    /// The pool.
    pub pool: String,
    /// The amount.
    pub amount: u64,
    /// The deadline: from then on it cannot be committed.
    pub expires_at_ms: u64,
    /// Where it stands.
    pub state: ReservationState,
    /// What the caller was about to build.
    pub context: Option<Value>,
}

/// A permission tuple.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    /// Who.
    pub subject: String,
    /// May do what.
    pub action: String,
    /// To what.
    pub resource: String,
}

/// What expired unfinished: the user's cleanup job's to-do list.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum OrphanKind {
    /// A reservation that reached its deadline while held.
    Reservation {
        /// Its id.
        reservation: String,
        /// Its pool.
        pool: String,
        /// Its amount.
        amount: u64,
        /// Its context.
        context: Option<Value>,
    },
    /// A lease that expired while held.
    Lease {
        /// Its name.
        lease: String,
        /// Who held it.
        holder: String,
        /// The token of that hold.
        token: u64,
    },
}

/// An orphan record.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Orphan {
    /// What expired.
    #[serde(flatten)]
    pub kind: OrphanKind,
    /// When it expired.
    pub expired_at_ms: u64,
    /// Whether the user's job marked it compensated.
    pub resolved: bool,
    /// The note given when resolving.
    pub note: Option<String>,
    /// When it was resolved.
    pub resolved_at_ms: Option<u64>,
}

/// Decodes a primitive from its record; `None` if absent. A record that does not decode is a
/// bug (only core writes internal keys), so it panics with the key.
pub fn decode<T: serde::de::DeserializeOwned>(key: &NsKey, entry: Option<&Entry>) -> Option<T> {
    let record = entry?.record.as_ref()?;
    // Deserialize from a borrow of the value: no copy of the JSON tree.
    Some(T::deserialize(&record.value).unwrap_or_else(|e| panic!("internal record {key:?} does not decode: {e}")))
}

/// Encodes a primitive as a record value.
pub fn encode<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("primitives always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_keys_are_shown_by_kind_and_name() {
        assert_eq!(display_key(&lease_key("migrator")), "lease:migrator");
        assert_eq!(display_key(&reservation_key("rsv_a_0")), "reservation:rsv_a_0");
        assert_eq!(display_key(&grant_key("user:alice", "read", "doc:9")), "grant:user:alice|read|doc:9");
        // Parts holding the separator (or the escape) still show apart.
        let (one, other) = (grant_key("a|b", "export", "r"), grant_key("a", "b|export", "r"));
        assert_eq!(
            (display_key(&one).as_ref(), display_key(&other).as_ref()),
            (r"grant:a\|b|export|r", r"grant:a|b\|export|r")
        );
        assert_eq!(display_key(&grant_key(r"a\", "x", "y")), r"grant:a\\|x|y");
        assert_eq!(display_key("orders/42"), "orders/42");
        assert_eq!(describe_internal(&pool_key("vms")), Some(("pool", "vms".to_owned())));
        assert_eq!(describe_internal("\u{1}unknown/x"), None);
        assert!(is_internal(&orphan_key("o")) && !is_internal("o"));
    }
}

/// What a backend must remember about a changed entry, read with one decode: a deadline to
/// expire it at (a held reservation or lease), or that it may be forgotten after a retention
/// (see [`retention_of`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Nothing to remember (a live key, a pool, a lease not held, an open orphan).
    Nothing,
    /// Held until this instant; the reconciler expires it then.
    Deadline(u64),
    /// A tombstone: kept as long as a ticket from before the delete can be presented.
    Tombstone,
    /// A resolved reservation or orphan: kept for `resolved_retention_ms`.
    Resolved,
}

pub fn lifecycle(key: &NsKey, entry: &Entry) -> Lifecycle {
    if entry.record.is_none() {
        return Lifecycle::Tombstone;
    }
    let Some(name) = key.key.strip_prefix(INTERNAL) else { return Lifecycle::Nothing };
    if name.starts_with("rsv/") {
        match decode::<Reservation>(key, Some(entry)) {
            Some(r) if r.state == ReservationState::Held => Lifecycle::Deadline(r.expires_at_ms),
            Some(_) => Lifecycle::Resolved,
            None => Lifecycle::Nothing,
        }
    } else if name.starts_with("lease/") {
        match decode::<Lease>(key, Some(entry)) {
            Some(lease) if lease.holder.is_some() => Lifecycle::Deadline(lease.expires_at_ms),
            _ => Lifecycle::Nothing,
        }
    } else if name.starts_with("orphan/") {
        match decode::<Orphan>(key, Some(entry)) {
            Some(o) if o.resolved => Lifecycle::Resolved,
            _ => Lifecycle::Nothing,
        }
    } else {
        Lifecycle::Nothing
    }
}

/// How long an entry in this lifecycle is kept before it may be forgotten, if it may be: a
/// tombstone as long as a ticket can live (a refused act names the delete that broke its check
/// only while a ticket from before it can still be presented); a resolved reservation or orphan
/// for `resolved_retention_ms`. Leases (their token history) and pools are never forgotten.
pub fn retention(life: Lifecycle, limits: &crate::Limits) -> Option<u64> {
    match life {
        Lifecycle::Tombstone => Some(limits.ticket_ttl_ms_max),
        Lifecycle::Resolved => Some(limits.resolved_retention_ms),
        Lifecycle::Nothing | Lifecycle::Deadline(_) => None,
    }
}

/// [`retention`] of an entry.
pub fn retention_of(key: &NsKey, entry: &Entry, limits: &crate::Limits) -> Option<u64> {
    retention(lifecycle(key, entry), limits)
}

/// The deadline to watch for an entry: a held reservation's or a held lease's expiry.
pub fn deadline_of(key: &NsKey, entry: &Entry) -> Option<u64> {
    match lifecycle(key, entry) {
        Lifecycle::Deadline(at_ms) => Some(at_ms),
        _ => None,
    }
}
