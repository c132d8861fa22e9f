//! Property test: `apply` and `check` against a deliberately simple reference model, with
//! simulated time. Any failing case is shrunk and replayable from proptest's seed.

use std::collections::{BTreeMap, BTreeSet};

use gapguard_core::ticket::{sign, verify};
use gapguard_core::{
    apply, check, Act, CheckOutcome, CheckRequest, CompareOp, Condition, Entry, Meta, NsKey, Op, Outcome, Refusal,
    Revision, StateView, TicketClaims, TicketId, Txn, WriteRequest,
};
use proptest::prelude::*;
use serde_json::{json, Value};

const NS: &str = "ns";
const KEY: &[u8] = b"simulation-key";

/// The system under test's state: what a backend would hold.
#[derive(Default)]
struct Store {
    entries: BTreeMap<NsKey, Entry>,
    revision: Revision,
    used: BTreeSet<TicketId>,
}

impl StateView for Store {
    fn revision(&self) -> Revision {
        self.revision
    }
    fn entry(&self, key: &NsKey) -> Option<&Entry> {
        self.entries.get(key)
    }
    fn ticket_used(&self, id: &TicketId) -> bool {
        self.used.contains(id)
    }
}

/// The model: integers and versions only, written the obvious way.
#[derive(Default, Debug)]
struct Model {
    values: BTreeMap<String, (i64, u64)>,
    revision: u64,
}

#[derive(Clone, Debug)]
enum Cmd {
    Put(u8, i64),
    Delete(u8),
    Add(u8, i64),
    Decrement(u8),
    Txn { key: u8, version: u64, value: i64 },
    Check { key: u8, min: i64, ttl_ms: u64 },
    UseTicket { idx: usize, key: u8 },
    Advance(u64),
}

fn cmd() -> impl Strategy<Value = Cmd> {
    prop_oneof![
        (0..4u8, -3..6i64).prop_map(|(k, v)| Cmd::Put(k, v)),
        (0..4u8).prop_map(Cmd::Delete),
        (0..4u8, -3..4i64).prop_map(|(k, v)| Cmd::Add(k, v)),
        (0..4u8).prop_map(Cmd::Decrement),
        (0..4u8, 0..4u64, -3..6i64).prop_map(|(key, version, value)| Cmd::Txn { key, version, value }),
        (0..4u8, -1..3i64, 1..50u64).prop_map(|(key, min, ttl_ms)| Cmd::Check { key, min, ttl_ms }),
        (0..8usize, 0..4u8).prop_map(|(idx, key)| Cmd::UseTicket { idx, key }),
        (0..30u64).prop_map(Cmd::Advance),
    ]
}

fn key(k: u8) -> String {
    format!("k{k}")
}

struct Sim {
    store: Store,
    model: Model,
    now_ms: u64,
    tickets: Vec<(String, TicketClaims)>,
    next_ticket: u8,
}

impl Sim {
    fn meta(&self) -> Meta {
        Meta {
            now_ms: self.now_ms,
            revision: self.store.revision + 1,
            correlation_id: Some(format!("c{}", self.now_ms)),
            api_key_id: None,
        }
    }

    fn write(&mut self, request: WriteRequest) -> Outcome {
        let meta = self.meta();
        let applied = apply(&self.store, &request, &meta);
        // The request named its keys up front; it may touch no others.
        let named = request.keys(&self.store);
        for (k, _) in &applied.changes {
            assert!(named.contains(k), "{k:?} written but not named");
        }
        assert_eq!(
            applied.audit.outcome == "committed",
            applied.committed || matches!(applied.outcome, Outcome::Txn { .. })
        );
        if applied.committed {
            self.store.revision = meta.revision;
            self.model.revision += 1;
        }
        for (k, e) in applied.changes {
            self.store.entries.insert(k, e);
        }
        if let Some((id, _)) = applied.used_ticket {
            assert!(self.store.used.insert(id), "a ticket was used twice");
        }
        applied.outcome
    }

    fn model_get(&self, k: &str) -> Option<i64> {
        self.model.values.get(k).map(|v| v.0)
    }

    fn model_write(&mut self, k: &str, value: i64) {
        let version = self.model.values.get(k).map_or(0, |v| v.1) + 1;
        self.model.values.insert(k.to_owned(), (value, version));
    }

    fn run(&mut self, cmd: &Cmd) {
        match cmd.clone() {
            Cmd::Put(k, v) => {
                let out = self.write(WriteRequest::Put { ns: NS.into(), key: key(k), value: json!(v) });
                self.model_write(&key(k), v);
                let version = self.model.values[&key(k)].1;
                assert_eq!(out, Outcome::Put { revision: self.model.revision, version });
            }
            Cmd::Delete(k) => {
                let out = self.write(WriteRequest::Delete { ns: NS.into(), key: key(k) });
                if self.model.values.remove(&key(k)).is_some() {
                    assert_eq!(out, Outcome::Deleted { revision: self.model.revision });
                } else {
                    assert_eq!(out, Outcome::NotFound);
                }
            }
            Cmd::Add(k, by) => {
                let act = Act {
                    ns: NS.into(),
                    ticket: None,
                    conditions: vec![],
                    ops: vec![Op::Add { key: key(k), by: by.into() }],
                    flow: None,
                };
                let out = self.write(WriteRequest::Act(act));
                let value = self.model_get(&key(k)).unwrap_or(0) + by;
                self.model_write(&key(k), value);
                assert!(matches!(out, Outcome::Acted { revision, .. } if revision == self.model.revision), "{out:?}");
            }
            Cmd::Decrement(k) => {
                let act = Act {
                    ns: NS.into(),
                    ticket: None,
                    conditions: vec![Condition::Compare { key: key(k), op: CompareOp::Ge, value: 1.into() }],
                    ops: vec![Op::Add { key: key(k), by: (-1).into() }],
                    flow: None,
                };
                let out = self.write(WriteRequest::Act(act));
                match self.model_get(&key(k)) {
                    Some(v) if v >= 1 => {
                        self.model_write(&key(k), v - 1);
                        assert!(matches!(out, Outcome::Acted { .. }), "{out:?}");
                    }
                    _ => assert!(matches!(out, Outcome::Refused(Refusal::ConditionFailed { .. })), "{out:?}"),
                }
            }
            Cmd::Txn { key: k, version, value } => {
                let txn = Txn {
                    ns: NS.into(),
                    compare: vec![Condition::Version { key: key(k), is: version }],
                    success: vec![Op::Put { key: key(k), value: json!(value) }],
                    failure: vec![],
                };
                let out = self.write(WriteRequest::Txn(txn));
                let current = self.model.values.get(&key(k)).map_or(0, |v| v.1);
                if current == version {
                    self.model_write(&key(k), value);
                    assert!(matches!(out, Outcome::Txn { succeeded: true, .. }), "{out:?}");
                } else {
                    assert_eq!(out, Outcome::Txn { succeeded: false, revision: self.model.revision, results: vec![] });
                }
            }
            Cmd::Check { key: k, min, ttl_ms } => {
                self.next_ticket = self.next_ticket.wrapping_add(1);
                let request = CheckRequest {
                    ns: NS.into(),
                    conditions: vec![Condition::Compare { key: key(k), op: CompareOp::Ge, value: min.into() }],
                    ttl_ms,
                    flow: None,
                    ticket_id: [self.next_ticket; 16],
                };
                let holds = self.model_get(&key(k)).is_some_and(|v| v >= min);
                match check(&self.store, &request, &self.meta()) {
                    CheckOutcome::Passed(claims) => {
                        assert!(holds);
                        assert_eq!(claims.revision, self.model.revision);
                        self.tickets.push((sign(KEY, &claims), claims));
                    }
                    CheckOutcome::Denied { failed, audit } => {
                        assert!(!holds);
                        assert_eq!(failed.len(), 1);
                        assert_eq!(audit.reason.as_deref(), Some("check_failed"));
                    }
                }
            }
            Cmd::UseTicket { idx, key: k } => {
                let Some((ticket, claims)) = self.tickets.get(idx).cloned() else { return };
                let verified = verify(KEY, &ticket).expect("our own ticket verifies");
                let act = Act {
                    ns: NS.into(),
                    ticket: Some(verified),
                    conditions: vec![],
                    ops: vec![Op::Add { key: key(k), by: 1.into() }],
                    flow: None,
                };
                let used_before = self.store.used.contains(&claims.id);
                let out = self.write(WriteRequest::Act(act));
                let Condition::Compare { key: ck, value: min, .. } = &claims.conditions[0] else { unreachable!() };
                let holds = self.model_get(ck).is_some_and(|v| v >= min.as_i64().unwrap());
                if self.now_ms >= claims.expires_at_ms {
                    assert!(matches!(out, Outcome::Refused(Refusal::TicketExpired { .. })), "{out:?}");
                } else if used_before {
                    assert_eq!(out, Outcome::Refused(Refusal::TicketUsed));
                } else if !holds {
                    let Outcome::Refused(Refusal::StaleCheck { changed }) = out else { panic!("{out:?}") };
                    // The refusal names the revision of the last change to the checked key.
                    let entry = self.store.entries.get(&NsKey::new(NS, ck.clone()));
                    assert_eq!(changed[0].changed_at_revision, entry.map(|e| e.changed_at));
                } else {
                    let value = self.model_get(&key(k)).unwrap_or(0) + 1;
                    self.model_write(&key(k), value);
                    let Outcome::Acted { check_to_use_ms, .. } = out else { panic!("{out:?}") };
                    assert_eq!(check_to_use_ms, Some(self.now_ms - claims.issued_at_ms));
                }
            }
            Cmd::Advance(ms) => self.now_ms += ms,
        }
    }

    fn assert_same_state(&self) {
        assert_eq!(self.store.revision, self.model.revision);
        let live: BTreeMap<String, (i64, u64)> = self
            .store
            .entries
            .iter()
            .filter_map(|(k, e)| e.record.as_ref().map(|r| (k.key.clone(), (r.value.as_i64().unwrap(), r.version))))
            .collect();
        assert_eq!(live, self.model.values);
        for e in self.store.entries.values() {
            if let Some(r) = &e.record {
                assert!(r.create_revision <= r.mod_revision && r.mod_revision <= self.store.revision);
                assert_eq!(r.mod_revision, e.changed_at);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    #[test]
    fn apply_matches_the_model(cmds in proptest::collection::vec(cmd(), 1..80)) {
        let mut sim = Sim { store: Store::default(), model: Model::default(), now_ms: 1_000, tickets: vec![], next_ticket: 0 };
        for cmd in &cmds {
            sim.run(cmd);
            sim.assert_same_state();
        }
    }
}

#[test]
fn a_refused_act_changes_nothing_even_after_earlier_ops_applied() {
    let mut store = Store::default();
    let meta = Meta { now_ms: 1, revision: 1, ..Meta::default() };
    let put = WriteRequest::Put { ns: NS.into(), key: "s".into(), value: Value::String("text".into()) };
    let applied = apply(&store, &put, &meta);
    store.entries.extend(applied.changes);
    store.revision = 1;
    let act = Act {
        ns: NS.into(),
        ticket: None,
        conditions: vec![],
        ops: vec![Op::Put { key: "a".into(), value: json!(1) }, Op::Add { key: "s".into(), by: 1.into() }],
        flow: None,
    };
    let applied = apply(&store, &WriteRequest::Act(act), &Meta { now_ms: 2, revision: 2, ..Meta::default() });
    assert!(applied.changes.is_empty());
    assert!(!applied.committed);
    assert!(matches!(applied.outcome, Outcome::Refused(Refusal::OpFailed { index: 1, .. })));
    assert_eq!(applied.audit.reason.as_deref(), Some("not_a_number"));
}
