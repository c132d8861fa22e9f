//! Ops: the writes an act or a txn applies, all or nothing.

use serde::{Deserialize, Serialize};
use serde_json::{Number, Value};

use crate::condition::json_kind;
use crate::primitives::{self, Grant, Lease, Orphan, OrphanKind, Pool, Reservation, ReservationState};
use crate::state::{Entry, NsKey, Revision};

/// One write inside a request. Keys are namespace-relative.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// Sets the key to a value.
    Put {
        /// The key.
        key: String,
        /// The new value.
        value: Value,
    },
    /// Deletes the key; a no-op (`deleted: false`) if it is absent.
    Delete {
        /// The key.
        key: String,
    },
    /// Adds `by` to the key's number; an absent key counts as 0.
    Add {
        /// The key.
        key: String,
        /// The amount (negative to subtract).
        by: Number,
    },
    /// Holds `amount` of a pool until `ttl_ms` from now.
    Reserve {
        /// The pool.
        pool: String,
        /// The amount (at least 1).
        amount: u64,
        /// How long to hold it.
        ttl_ms: u64,
        /// What the caller is about to build.
        context: Option<Value>,
    },
    /// Consumes a held reservation.
    Commit {
        /// Its id.
        reservation: String,
    },
    /// Gives a held reservation back to its pool.
    Release {
        /// Its id.
        reservation: String,
    },
    /// Creates or resizes a pool (never below `used + reserved`).
    SetCapacity {
        /// The pool.
        pool: String,
        /// The new capacity.
        capacity: u64,
    },
    /// Grants a permission.
    Grant {
        /// Who.
        subject: String,
        /// May do what.
        action: String,
        /// To what.
        resource: String,
    },
    /// Revokes a permission (a no-op if not granted).
    Revoke {
        /// Who.
        subject: String,
        /// May do what.
        action: String,
        /// To what.
        resource: String,
    },
    /// Acquires a lease, issuing the next fencing token.
    Acquire {
        /// The lease.
        name: String,
        /// Who takes it.
        holder: String,
        /// For how long.
        ttl_ms: u64,
    },
    /// Extends a lease held under `token`.
    Renew {
        /// The lease.
        name: String,
        /// The holder's token.
        token: u64,
        /// The new TTL from now (default: the acquisition's).
        ttl_ms: Option<u64>,
    },
    /// Gives up a lease held under `token`.
    Yield {
        /// The lease.
        name: String,
        /// The holder's token.
        token: u64,
    },
    /// Marks an orphan compensated.
    Resolve {
        /// The orphan's id.
        orphan: String,
        /// What was done about it.
        note: Option<String>,
    },
    /// The reconciler: expires a held reservation past its deadline (a no-op otherwise).
    ExpireReservation {
        /// Its id.
        reservation: String,
    },
    /// The reconciler: expires a held lease past its deadline (a no-op otherwise).
    ExpireLease {
        /// The lease.
        name: String,
    },
}

impl Op {
    /// The namespace-relative key the op writes first. A reserve also writes the reservation
    /// it creates, a commit, release or expiry of a reservation also writes its pool (see
    /// [`Op::reservation`]), and expiries create an orphan: keys that did not exist before the
    /// request, so no other request can hold them.
    pub fn key(&self) -> std::borrow::Cow<'_, str> {
        match self {
            Op::Put { key, .. } | Op::Delete { key } | Op::Add { key, .. } => key.into(),
            Op::Reserve { pool, .. } | Op::SetCapacity { pool, .. } => primitives::pool_key(pool).into(),
            Op::Commit { reservation } | Op::Release { reservation } | Op::ExpireReservation { reservation } => {
                primitives::reservation_key(reservation).into()
            }
            Op::Grant { subject, action, resource } | Op::Revoke { subject, action, resource } => {
                primitives::grant_key(subject, action, resource).into()
            }
            Op::Acquire { name, .. } | Op::Renew { name, .. } | Op::Yield { name, .. } | Op::ExpireLease { name } => {
                primitives::lease_key(name).into()
            }
            Op::Resolve { orphan, .. } => primitives::orphan_key(orphan).into(),
        }
    }

    /// For ops on an existing reservation: its id. Its record names the pool the op also
    /// writes; a reservation's pool never changes, so a backend may read it without a lock to
    /// learn the full key set, then lock both in key order.
    pub fn reservation(&self) -> Option<&str> {
        match self {
            Op::Commit { reservation } | Op::Release { reservation } | Op::ExpireReservation { reservation } => {
                Some(reservation)
            }
            _ => None,
        }
    }
}

/// What one op did.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpResult {
    /// A put: the key's new version.
    Put {
        /// The key.
        key: String,
        /// Its version after the put.
        version: u64,
    },
    /// A delete: whether there was something to delete.
    Delete {
        /// The key.
        key: String,
        /// `false` if the key was already absent.
        deleted: bool,
    },
    /// An add: the key's new value.
    Add {
        /// The key.
        key: String,
        /// The value after the add.
        value: Number,
        /// Its version after the add.
        version: u64,
    },
    /// A reservation was made.
    Reserve {
        /// Its id.
        reservation: String,
        /// The pool.
        pool: String,
        /// The amount.
        amount: u64,
        /// Its deadline.
        expires_at_ms: u64,
    },
    /// A reservation was committed.
    Commit {
        /// Its id.
        reservation: String,
        /// The pool after it.
        pool: PoolState,
    },
    /// A reservation was released.
    Release {
        /// Its id.
        reservation: String,
        /// The pool after it.
        pool: PoolState,
    },
    /// A pool's capacity was set.
    SetCapacity {
        /// The pool after it.
        pool: PoolState,
    },
    /// A grant exists now.
    Grant {
        /// Whether it existed already.
        existed: bool,
    },
    /// A grant is gone now.
    Revoke {
        /// Whether it existed.
        existed: bool,
    },
    /// A lease was acquired, renewed or yielded.
    Lease {
        /// The lease.
        name: String,
        /// The holder (`None` once yielded).
        holder: Option<String>,
        /// The fencing token of the hold.
        token: u64,
        /// When the hold expires (0 once yielded).
        expires_at_ms: u64,
    },
    /// An orphan was marked compensated.
    Resolve {
        /// Its id.
        orphan: String,
    },
    /// The reconciler expired something (`orphan` is the orphan it recorded), or found
    /// nothing to do (`orphan` is `None`).
    Expire {
        /// The orphan recorded.
        orphan: Option<String>,
    },
}

/// A pool's counters as an op result reports them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolState {
    /// The pool.
    pub pool: String,
    /// Its capacity.
    pub capacity: u64,
    /// Committed.
    pub used: u64,
    /// Held.
    pub reserved: u64,
}

impl PoolState {
    fn of(name: &str, pool: &Pool) -> Self {
        Self { pool: name.to_owned(), capacity: pool.capacity, used: pool.used, reserved: pool.reserved }
    }
}

/// Why an op could not be applied; the whole request is refused.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, thiserror::Error)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OpError {
    /// `add` on a value that is not a number.
    #[error("cannot add to key {key:?}: its value is not a number ({found})")]
    NotANumber {
        /// The key.
        key: String,
        /// The JSON type found.
        found: String,
    },
    /// `add` would leave the range of a 64-bit integer or of finite floats.
    #[error("adding to key {key:?} overflows")]
    Overflow {
        /// The key.
        key: String,
    },
    /// No such pool.
    #[error("no pool {pool:?} (a pool exists once its capacity is set)")]
    PoolNotFound {
        /// The pool.
        pool: String,
    },
    /// The pool has less available than asked.
    #[error("pool {pool:?} has {available} available, {requested} requested")]
    Insufficient {
        /// The pool.
        pool: String,
        /// What it has.
        available: u64,
        /// What was asked.
        requested: u64,
    },
    /// No such reservation.
    #[error("no reservation {reservation:?}")]
    ReservationNotFound {
        /// Its id.
        reservation: String,
    },
    /// Already committed.
    #[error("reservation {reservation:?} was already committed")]
    ReservationCommitted {
        /// Its id.
        reservation: String,
    },
    /// Already released.
    #[error("reservation {reservation:?} was already released")]
    ReservationReleased {
        /// Its id.
        reservation: String,
    },
    /// Past its deadline.
    #[error(
        "reservation {reservation:?} expired at its deadline ({expired_at_ms} ms); its amount is back in the pool"
    )]
    ReservationExpired {
        /// Its id.
        reservation: String,
        /// Its deadline.
        expired_at_ms: u64,
    },
    /// Lowering a capacity below what is in use.
    #[error("pool {pool:?} cannot shrink to {capacity}: {used} used + {reserved} reserved")]
    CapacityTooLow {
        /// The pool.
        pool: String,
        /// The capacity asked.
        capacity: u64,
        /// Committed.
        used: u64,
        /// Held.
        reserved: u64,
    },
    /// Someone else holds the lease.
    #[error("lease {name:?} is held by {holder:?} until {expires_at_ms} ms")]
    LeaseHeld {
        /// The lease.
        name: String,
        /// Its holder.
        holder: String,
        /// Until when.
        expires_at_ms: u64,
    },
    /// The token is not the live hold's: expired, released or superseded.
    #[error("lease {name:?} is not held under token {token} (it expired, was released or was taken over)")]
    LeaseLost {
        /// The lease.
        name: String,
        /// The token presented.
        token: u64,
    },
    /// No such orphan.
    #[error("no orphan {orphan:?}")]
    OrphanNotFound {
        /// Its id.
        orphan: String,
    },
    /// Already resolved.
    #[error("orphan {orphan:?} was already resolved")]
    OrphanResolved {
        /// Its id.
        orphan: String,
    },
}

impl OpError {
    /// The stable error code of the API.
    pub fn code(&self) -> &'static str {
        match self {
            OpError::NotANumber { .. } => "not_a_number",
            OpError::Overflow { .. } => "overflow",
            OpError::PoolNotFound { .. } => "pool_not_found",
            OpError::Insufficient { .. } => "insufficient",
            OpError::ReservationNotFound { .. } => "reservation_not_found",
            OpError::ReservationCommitted { .. } => "reservation_committed",
            OpError::ReservationReleased { .. } => "reservation_released",
            OpError::ReservationExpired { .. } => "reservation_expired",
            OpError::CapacityTooLow { .. } => "capacity_too_low",
            OpError::LeaseHeld { .. } => "lease_held",
            OpError::LeaseLost { .. } => "lease_lost",
            OpError::OrphanNotFound { .. } => "orphan_not_found",
            OpError::OrphanResolved { .. } => "orphan_resolved",
        }
    }
}

/// Where ops read and write: the request's changes over the state, stamping every write with
/// the request's revision and correlation id.
pub(crate) trait Workspace {
    /// The current entry of a key (with this request's earlier writes).
    fn entry(&self, key: &NsKey) -> Option<&Entry>;
    /// Sets a key's value (a new version).
    fn write(&mut self, key: NsKey, value: Value);
    /// Deletes a key (a tombstone); false if it was absent.
    fn remove(&mut self, key: NsKey) -> bool;
}

/// What an op needs besides the workspace.
pub(crate) struct OpCtx<'a> {
    pub ns: &'a str,
    pub now_ms: u64,
    pub revision: Revision,
    /// Position of the op in its request (for ids of what it creates).
    pub index: usize,
}

fn live_version(ws: &impl Workspace, key: &NsKey) -> u64 {
    ws.entry(key).and_then(|e| e.record.as_ref()).map_or(0, |r| r.version)
}

fn pool_of(ws: &impl Workspace, ns: &str, name: &str) -> Result<(NsKey, Pool), OpError> {
    let key = NsKey::new(ns, primitives::pool_key(name));
    let pool =
        primitives::decode::<Pool>(&key, ws.entry(&key)).ok_or_else(|| OpError::PoolNotFound { pool: name.into() })?;
    Ok((key, pool))
}

fn write_pool(ws: &mut impl Workspace, key: NsKey, pool: &Pool) {
    pool.assert_invariant();
    ws.write(key, primitives::encode(pool));
}

fn reservation_of(ws: &impl Workspace, ns: &str, id: &str) -> Result<(NsKey, Reservation), OpError> {
    let key = NsKey::new(ns, primitives::reservation_key(id));
    let r = primitives::decode::<Reservation>(&key, ws.entry(&key))
        .ok_or_else(|| OpError::ReservationNotFound { reservation: id.into() })?;
    Ok((key, r))
}

/// A held reservation that may be resolved now, or the error its state calls for.
fn resolvable(id: &str, r: &Reservation, now_ms: u64) -> Result<(), OpError> {
    let reservation = id.to_owned();
    match r.state {
        ReservationState::Committed => Err(OpError::ReservationCommitted { reservation }),
        ReservationState::Released => Err(OpError::ReservationReleased { reservation }),
        ReservationState::Expired => Err(OpError::ReservationExpired { reservation, expired_at_ms: r.expires_at_ms }),
        ReservationState::Held if now_ms >= r.expires_at_ms => {
            Err(OpError::ReservationExpired { reservation, expired_at_ms: r.expires_at_ms })
        }
        ReservationState::Held => Ok(()),
    }
}

fn record_orphan(ws: &mut impl Workspace, ctx: &OpCtx<'_>, kind: OrphanKind, expired_at_ms: u64) -> String {
    let id = primitives::object_id("orph", ctx.revision, ctx.index);
    let orphan = Orphan { kind, expired_at_ms, resolved: false, note: None, resolved_at_ms: None };
    ws.write(NsKey::new(ctx.ns, primitives::orphan_key(&id)), primitives::encode(&orphan));
    id
}

/// Applies `op` in the workspace. On error the caller discards the whole workspace.
pub(crate) fn apply_op(op: &Op, ws: &mut impl Workspace, ctx: &OpCtx<'_>) -> Result<OpResult, OpError> {
    let ns = ctx.ns;
    match op {
        Op::Put { key, value } => {
            let k = NsKey::new(ns, key.clone());
            ws.write(k.clone(), value.clone());
            Ok(OpResult::Put { key: key.clone(), version: live_version(ws, &k) })
        }
        Op::Delete { key } => {
            let deleted = ws.remove(NsKey::new(ns, key.clone()));
            Ok(OpResult::Delete { key: key.clone(), deleted })
        }
        Op::Add { key, by } => {
            let k = NsKey::new(ns, key.clone());
            let base = match ws.entry(&k).and_then(|e| e.record.as_ref()).map(|r| &r.value) {
                None => Number::from(0),
                Some(Value::Number(n)) => n.clone(),
                Some(other) => {
                    return Err(OpError::NotANumber { key: key.clone(), found: json_kind(other).to_owned() });
                }
            };
            let sum = add_numbers(&base, by).ok_or_else(|| OpError::Overflow { key: key.clone() })?;
            ws.write(k.clone(), Value::Number(sum.clone()));
            Ok(OpResult::Add { key: key.clone(), value: sum, version: live_version(ws, &k) })
        }
        Op::Reserve { pool: name, amount, ttl_ms, context } => {
            let (pool_key, mut pool) = pool_of(ws, ns, name)?;
            if *amount > pool.available() {
                return Err(OpError::Insufficient {
                    pool: name.clone(),
                    available: pool.available(),
                    requested: *amount,
                });
            }
            pool.reserved += amount;
            write_pool(ws, pool_key, &pool);
            let id = primitives::object_id("rsv", ctx.revision, ctx.index);
            let expires_at_ms = ctx.now_ms.saturating_add(*ttl_ms);
            let r = Reservation {
                pool: name.clone(),
                amount: *amount,
                expires_at_ms,
                state: ReservationState::Held,
                context: context.clone(),
            };
            ws.write(NsKey::new(ns, primitives::reservation_key(&id)), primitives::encode(&r));
            Ok(OpResult::Reserve { reservation: id, pool: name.clone(), amount: *amount, expires_at_ms })
        }
        Op::Commit { reservation: id } | Op::Release { reservation: id } => {
            let (key, mut r) = reservation_of(ws, ns, id)?;
            resolvable(id, &r, ctx.now_ms)?;
            let (pool_key, mut pool) = pool_of(ws, ns, &r.pool)?;
            pool.reserved -= r.amount;
            let committing = matches!(op, Op::Commit { .. });
            if committing {
                pool.used += r.amount;
                r.state = ReservationState::Committed;
            } else {
                r.state = ReservationState::Released;
            }
            write_pool(ws, pool_key, &pool);
            ws.write(key, primitives::encode(&r));
            let state = PoolState::of(&r.pool, &pool);
            Ok(if committing {
                OpResult::Commit { reservation: id.clone(), pool: state }
            } else {
                OpResult::Release { reservation: id.clone(), pool: state }
            })
        }
        Op::SetCapacity { pool: name, capacity } => {
            let key = NsKey::new(ns, primitives::pool_key(name));
            let mut pool = primitives::decode::<Pool>(&key, ws.entry(&key)).unwrap_or_default();
            if *capacity < pool.used + pool.reserved {
                return Err(OpError::CapacityTooLow {
                    pool: name.clone(),
                    capacity: *capacity,
                    used: pool.used,
                    reserved: pool.reserved,
                });
            }
            pool.capacity = *capacity;
            write_pool(ws, key, &pool);
            Ok(OpResult::SetCapacity { pool: PoolState::of(name, &pool) })
        }
        Op::Grant { subject, action, resource } => {
            let key = NsKey::new(ns, primitives::grant_key(subject, action, resource));
            let existed = live_version(ws, &key) > 0;
            if !existed {
                let grant = Grant { subject: subject.clone(), action: action.clone(), resource: resource.clone() };
                ws.write(key, primitives::encode(&grant));
            }
            Ok(OpResult::Grant { existed })
        }
        Op::Revoke { subject, action, resource } => {
            let existed = ws.remove(NsKey::new(ns, primitives::grant_key(subject, action, resource)));
            Ok(OpResult::Revoke { existed })
        }
        Op::Acquire { name, holder, ttl_ms } => {
            let key = NsKey::new(ns, primitives::lease_key(name));
            let mut lease: Lease = primitives::decode(&key, ws.entry(&key)).unwrap_or_default();
            if let Some(current) = lease.live_holder(ctx.now_ms) {
                return Err(OpError::LeaseHeld {
                    name: name.clone(),
                    holder: current.to_owned(),
                    expires_at_ms: lease.expires_at_ms,
                });
            }
            if let Some(previous) = lease.holder.take() {
                // It expired while held and the reconciler has not recorded it yet.
                let kind = OrphanKind::Lease { lease: name.clone(), holder: previous, token: lease.token };
                record_orphan(ws, ctx, kind, lease.expires_at_ms);
            }
            let token = lease.token.checked_add(1).expect("fencing tokens do not run out");
            assert!(token > lease.token, "fencing tokens strictly grow");
            lease = Lease {
                holder: Some(holder.clone()),
                token,
                expires_at_ms: ctx.now_ms.saturating_add(*ttl_ms),
                ttl_ms: *ttl_ms,
            };
            ws.write(key, primitives::encode(&lease));
            Ok(OpResult::Lease {
                name: name.clone(),
                holder: lease.holder.clone(),
                token,
                expires_at_ms: lease.expires_at_ms,
            })
        }
        Op::Renew { name, token, ttl_ms } => {
            let (key, mut lease) = live_lease(ws, ns, name, *token, ctx.now_ms)?;
            lease.ttl_ms = ttl_ms.unwrap_or(lease.ttl_ms);
            lease.expires_at_ms = ctx.now_ms.saturating_add(lease.ttl_ms);
            ws.write(key, primitives::encode(&lease));
            Ok(OpResult::Lease {
                name: name.clone(),
                holder: lease.holder.clone(),
                token: *token,
                expires_at_ms: lease.expires_at_ms,
            })
        }
        Op::Yield { name, token } => {
            let (key, mut lease) = live_lease(ws, ns, name, *token, ctx.now_ms)?;
            lease.holder = None;
            lease.expires_at_ms = 0;
            ws.write(key, primitives::encode(&lease));
            Ok(OpResult::Lease { name: name.clone(), holder: None, token: *token, expires_at_ms: 0 })
        }
        Op::Resolve { orphan: id, note } => {
            let key = NsKey::new(ns, primitives::orphan_key(id));
            let mut orphan: Orphan = primitives::decode(&key, ws.entry(&key))
                .ok_or_else(|| OpError::OrphanNotFound { orphan: id.clone() })?;
            if orphan.resolved {
                return Err(OpError::OrphanResolved { orphan: id.clone() });
            }
            orphan.resolved = true;
            orphan.note = note.clone();
            orphan.resolved_at_ms = Some(ctx.now_ms);
            ws.write(key, primitives::encode(&orphan));
            Ok(OpResult::Resolve { orphan: id.clone() })
        }
        Op::ExpireReservation { reservation: id } => {
            let Ok((key, mut r)) = reservation_of(ws, ns, id) else { return Ok(OpResult::Expire { orphan: None }) };
            if r.state != ReservationState::Held || ctx.now_ms < r.expires_at_ms {
                return Ok(OpResult::Expire { orphan: None });
            }
            let (pool_key, mut pool) = pool_of(ws, ns, &r.pool)?;
            pool.reserved -= r.amount;
            write_pool(ws, pool_key, &pool);
            r.state = ReservationState::Expired;
            ws.write(key, primitives::encode(&r));
            let kind = OrphanKind::Reservation {
                reservation: id.clone(),
                pool: r.pool.clone(),
                amount: r.amount,
                context: r.context.clone(),
            };
            Ok(OpResult::Expire { orphan: Some(record_orphan(ws, ctx, kind, r.expires_at_ms)) })
        }
        Op::ExpireLease { name } => {
            let key = NsKey::new(ns, primitives::lease_key(name));
            let Some(mut lease) = primitives::decode::<Lease>(&key, ws.entry(&key)) else {
                return Ok(OpResult::Expire { orphan: None });
            };
            let expired = lease.holder.is_some() && ctx.now_ms >= lease.expires_at_ms;
            if !expired {
                return Ok(OpResult::Expire { orphan: None });
            }
            let holder = lease.holder.take().expect("checked above");
            ws.write(key, primitives::encode(&lease));
            let kind = OrphanKind::Lease { lease: name.clone(), holder, token: lease.token };
            Ok(OpResult::Expire { orphan: Some(record_orphan(ws, ctx, kind, lease.expires_at_ms)) })
        }
    }
}

fn live_lease(ws: &impl Workspace, ns: &str, name: &str, token: u64, now_ms: u64) -> Result<(NsKey, Lease), OpError> {
    let key = NsKey::new(ns, primitives::lease_key(name));
    let lease: Lease = primitives::decode(&key, ws.entry(&key)).unwrap_or_default();
    if lease.live_holder(now_ms).is_none() || lease.token != token {
        return Err(OpError::LeaseLost { name: name.to_owned(), token });
    }
    Ok((key, lease))
}

/// Adds two JSON numbers: exactly for integers (checked), as finite `f64` otherwise.
pub fn add_numbers(a: &Number, b: &Number) -> Option<Number> {
    let int = |n: &Number| n.as_i64().map(i128::from).or_else(|| n.as_u64().map(i128::from));
    if let (Some(a), Some(b)) = (int(a), int(b)) {
        let sum = a + b; // cannot overflow: both fit in 65 bits
        return i64::try_from(sum).map(Number::from).or_else(|_| u64::try_from(sum).map(Number::from)).ok();
    }
    Number::from_f64(a.as_f64()? + b.as_f64()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_is_exact_for_integers_and_checked() {
        assert_eq!(add_numbers(&5.into(), &(-1).into()), Some(4.into()));
        assert_eq!(add_numbers(&i64::MAX.into(), &1.into()), Some(Number::from(i64::MAX as u64 + 1)));
        assert_eq!(add_numbers(&u64::MAX.into(), &1.into()), None);
        assert_eq!(add_numbers(&i64::MIN.into(), &(-1).into()), None);
        let half = Number::from_f64(0.5).unwrap();
        assert_eq!(add_numbers(&1.into(), &half), Number::from_f64(1.5));
        assert_eq!(add_numbers(&Number::from_f64(f64::MAX).unwrap(), &Number::from_f64(f64::MAX).unwrap()), None);
    }
}
