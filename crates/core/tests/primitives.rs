//! Property tests of pools, reservations and leases: random interleavings of reserve, commit,
//! release, expiry and capacity changes against a simple model, with simulated time; the pool
//! invariant and fencing-token growth are checked after every step.

use std::collections::BTreeMap;

use gapguard_core::primitives::{self, Lease, Pool};
use gapguard_core::{
    apply, AuditKind, Entry, Meta, NsKey, Op, OpError, OpResult, Outcome, Refusal, Revision, StateView, TicketId,
    WriteRequest,
};
use proptest::prelude::*;

#[derive(Default)]
struct Store {
    entries: BTreeMap<NsKey, Entry>,
    revision: Revision,
}

impl StateView for Store {
    fn revision(&self) -> Revision {
        self.revision
    }
    fn entry(&self, key: &NsKey) -> Option<&Entry> {
        self.entries.get(key)
    }
    fn ticket_used(&self, _: &TicketId) -> bool {
        false
    }
}

impl Store {
    fn run(&mut self, op: Op, now_ms: u64) -> Outcome {
        let request = WriteRequest::Single { ns: "ns".into(), op, kind: AuditKind::Reservation };
        let meta = Meta { now_ms, revision: self.revision + 1, ..Meta::default() };
        let applied = apply(self, &request, &meta);
        if applied.committed {
            self.revision += 1;
        }
        self.entries.extend(applied.changes);
        applied.outcome
    }

    fn pool(&self) -> Option<Pool> {
        let key = NsKey::new("ns", primitives::pool_key("p"));
        primitives::decode(&key, self.entries.get(&key))
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Held,
    Done,
}

/// The model: reservations by id with amount, deadline and whether they are still held.
#[derive(Default, Debug)]
struct Model {
    capacity: Option<u64>,
    used: u64,
    held: BTreeMap<String, (u64, u64, Fate)>,
}

impl Model {
    fn reserved(&self, now_ms: u64, count_expired: bool) -> u64 {
        self.held
            .values()
            .filter(|(_, deadline, f)| *f == Fate::Held && (count_expired || now_ms < *deadline))
            .map(|r| r.0)
            .sum()
    }
}

#[derive(Clone, Debug)]
enum Cmd {
    Capacity(u64),
    Reserve(u64, u64),
    Commit(usize),
    Release(usize),
    Expire(usize),
    Advance(u64),
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        (0..12u64).prop_map(Cmd::Capacity),
        (1..5u64, 1..40u64).prop_map(|(a, t)| Cmd::Reserve(a, t)),
        (0..10usize).prop_map(Cmd::Commit),
        (0..10usize).prop_map(Cmd::Release),
        (0..10usize).prop_map(Cmd::Expire),
        (0..25u64).prop_map(Cmd::Advance),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn pools_match_the_model_and_never_overflow(cmds in proptest::collection::vec(cmd(), 1..80)) {
        let (mut store, mut model, mut now) = (Store::default(), Model::default(), 1_000u64);
        let mut ids: Vec<String> = Vec::new();
        for cmd in cmds {
            match cmd {
                Cmd::Capacity(c) => {
                    let out = store.run(Op::SetCapacity { pool: "p".into(), capacity: c }, now);
                    // Reservations past their deadline but not yet expired still count.
                    let in_use = model.used + model.reserved(now, true);
                    if c >= in_use {
                        prop_assert!(matches!(out, Outcome::Applied { .. }), "{out:?}");
                        model.capacity = Some(c);
                    } else {
                        prop_assert!(matches!(out, Outcome::Refused(Refusal::OpFailed { error: OpError::CapacityTooLow { .. }, .. })), "{out:?}");
                    }
                }
                Cmd::Reserve(amount, ttl) => {
                    let out = store.run(Op::Reserve { pool: "p".into(), amount, ttl_ms: ttl, context: None }, now);
                    match model.capacity {
                        None => prop_assert!(matches!(out, Outcome::Refused(Refusal::OpFailed { error: OpError::PoolNotFound { .. }, .. })), "{:?}", out),
                        Some(cap) if cap - model.used - model.reserved(now, true) >= amount => {
                            let Outcome::Applied { result: OpResult::Reserve { reservation, expires_at_ms, .. }, .. } = out else { panic!("{out:?}") };
                            prop_assert_eq!(expires_at_ms, now + ttl);
                            model.held.insert(reservation.clone(), (amount, now + ttl, Fate::Held));
                            ids.push(reservation);
                        }
                        Some(_) => prop_assert!(matches!(out, Outcome::Refused(Refusal::OpFailed { error: OpError::Insufficient { .. }, .. })), "{out:?}"),
                    }
                }
                Cmd::Commit(i) | Cmd::Release(i) => {
                    let Some(id) = ids.get(i).cloned() else { continue };
                    let commit = matches!(cmd, Cmd::Commit(_));
                    let op = if commit { Op::Commit { reservation: id.clone() } } else { Op::Release { reservation: id.clone() } };
                    let out = store.run(op, now);
                    let (amount, deadline, fate) = model.held[&id];
                    if fate == Fate::Held && now < deadline {
                        prop_assert!(matches!(out, Outcome::Applied { .. }), "{out:?}");
                        if commit {
                            model.used += amount;
                        }
                        model.held.get_mut(&id).unwrap().2 = Fate::Done;
                    } else {
                        // Resolved at most once; past the deadline it is expired (410).
                        prop_assert!(matches!(out, Outcome::Refused(Refusal::OpFailed { .. })), "{out:?}");
                    }
                }
                Cmd::Expire(i) => {
                    let Some(id) = ids.get(i).cloned() else { continue };
                    let out = store.run(Op::ExpireReservation { reservation: id.clone() }, now);
                    let (_, deadline, fate) = model.held[&id];
                    let Outcome::Applied { result: OpResult::Expire { orphan }, .. } = out else { panic!("{out:?}") };
                    if fate == Fate::Held && now >= deadline {
                        prop_assert!(orphan.is_some());
                        model.held.get_mut(&id).unwrap().2 = Fate::Done;
                    } else {
                        prop_assert!(orphan.is_none());
                    }
                }
                Cmd::Advance(ms) => now += ms,
            }
            if let Some(pool) = store.pool() {
                prop_assert!(pool.used + pool.reserved <= pool.capacity);
                prop_assert_eq!(Some(pool.capacity), model.capacity);
                prop_assert_eq!(pool.used, model.used);
                prop_assert_eq!(pool.reserved, model.reserved(now, true));
            }
        }
    }

    #[test]
    fn fencing_tokens_strictly_grow_and_stale_holders_are_refused(steps in proptest::collection::vec((0..4u8, 0..30u64), 1..60)) {
        let (mut store, mut now, mut last_token) = (Store::default(), 1_000u64, 0u64);
        let mut held: Option<(u64, u64)> = None; // (token, expires)
        for (action, arg) in steps {
            match action {
                0 => {
                    let out = store.run(Op::Acquire { name: "l".into(), holder: format!("w{arg}"), ttl_ms: arg + 1 }, now);
                    match held {
                        Some((_, expires)) if now < expires => prop_assert!(matches!(out, Outcome::Refused(Refusal::OpFailed { error: OpError::LeaseHeld { .. }, .. })), "{:?}", out),
                        _ => {
                            let Outcome::Applied { result: OpResult::Lease { token, expires_at_ms, .. }, .. } = out else { panic!("{out:?}") };
                            prop_assert!(token > last_token, "token {} after {}", token, last_token);
                            last_token = token;
                            held = Some((token, expires_at_ms));
                        }
                    }
                }
                1 | 2 => {
                    // Renew or yield with the newest token or a stale one.
                    let token = if arg % 2 == 0 { last_token } else { last_token.saturating_sub(1) };
                    let op = if action == 1 { Op::Renew { name: "l".into(), token, ttl_ms: Some(10) } } else { Op::Yield { name: "l".into(), token } };
                    let out = store.run(op, now);
                    let live = held.is_some_and(|(t, e)| t == token && now < e);
                    if live {
                        let Outcome::Applied { result: OpResult::Lease { expires_at_ms, .. }, .. } = out else { panic!("{out:?}") };
                        held = if action == 1 { Some((token, expires_at_ms)) } else { None };
                    } else {
                        prop_assert!(matches!(out, Outcome::Refused(Refusal::OpFailed { error: OpError::LeaseLost { .. }, .. })), "{out:?}");
                    }
                }
                _ => now += arg,
            }
            let key = NsKey::new("ns", primitives::lease_key("l"));
            let lease: Lease = primitives::decode(&key, store.entries.get(&key)).unwrap_or_default();
            prop_assert_eq!(lease.token, last_token);
        }
    }
}
