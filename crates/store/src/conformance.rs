//! The conformance suite: what every [`Storage`] backend must do, as one function per property.
//!
//! A backend's tests call [`run_all`] with a function that opens the backend on a directory
//! (a database backend may use the directory only as a name and keep its state elsewhere, as
//! long as opening the same directory again sees the same state).

use std::collections::BTreeSet;
use std::path::Path;

use gapguard_core::audit::{seal, ChainVerifier, GENESIS};
use gapguard_core::{AuditEvent, AuditKind, Entry, IdempotencyRecord, NsKey, Outcome, Record, SealedEvent};
use serde_json::json;

use crate::{Batch, IdempotencyKey, Storage};

/// Runs every check of the suite, each on a fresh directory.
pub fn run_all<S: Storage>(open: impl Fn(&Path) -> S) {
    let checks: [(&str, Check<S>); 8] = [
        ("new store recovers empty", new_store_is_empty),
        ("a committed batch is recovered whole after reopening", batch_survives_reopen),
        ("load_keys returns exactly the named keys", load_keys_is_exact),
        ("tombstones and pruning", tombstones_and_pruning),
        ("audit range pages in sequence order", audit_pages_in_order),
        ("audit range over many events", audit_range_over_many_events),
        ("forgotten keys are gone, and may be written again", forgotten_keys_are_gone),
        ("a batch that breaks the audit sequence is refused whole", broken_batch_changes_nothing),
    ];
    for (name, check) in checks {
        eprintln!("conformance: {name}");
        check(&|p: &Path| open(p));
    }
}

/// One property of the suite, given a way to open the backend on a directory.
type Check<S> = fn(&dyn Fn(&Path) -> S);

fn entry(value: serde_json::Value, revision: u64) -> Entry {
    Entry {
        record: Some(Record { value, version: 1, create_revision: revision, mod_revision: revision }),
        changed_by: Some(format!("corr-{revision}")),
        changed_at: revision,
    }
}

fn events(from_seq: u64, n: u64, prev: [u8; 32]) -> Vec<SealedEvent> {
    let mut prev = prev;
    (from_seq..from_seq + n)
        .map(|seq| {
            let event = AuditEvent {
                revision: seq,
                at_ms: seq * 10,
                ns: "ns".into(),
                kind: AuditKind::Put,
                outcome: "committed".into(),
                reason: None,
                keys: vec![format!("k{seq}")],
                api_key_id: None,
                correlation_id: Some(format!("corr-{seq}")),
                flow: None,
                check: None,
                detail: None,
            };
            let sealed = seal(seq, &prev, &event);
            prev = sealed.hash;
            sealed
        })
        .collect()
}

fn temp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

fn new_store_is_empty<S: Storage>(open: &dyn Fn(&Path) -> S) {
    let dir = temp();
    let store = open(dir.path());
    let r = store.recover().expect("recover");
    assert_eq!(r.revision, 0);
    assert!(r.entries.is_empty() && r.used_tickets.is_empty() && r.idempotency.is_empty());
    assert_eq!(r.audit_head, None);
    assert_eq!(r.ticket_key, None);
}

fn batch_survives_reopen<S: Storage>(open: &dyn Fn(&Path) -> S) {
    let dir = temp();
    let audit = events(1, 3, GENESIS);
    let head = (3, audit[2].hash);
    let idem_key = IdempotencyKey { ns: "ns".into(), scope: "".into(), key: "retry-1".into() };
    let idem = IdempotencyRecord { fingerprint: [9; 32], outcome: Outcome::Deleted { revision: 3 }, expires_at_ms: 99 };
    let batch = Batch {
        revision: 3,
        entries: Batch::share_entries([
            (NsKey::new("ns", "a"), entry(json!({"x": [1, 2]}), 1)),
            (NsKey::new("ns", "b"), entry(json!(7), 2)),
        ]),
        audit,
        used_tickets: vec![([1; 16], 500)],
        idempotency: vec![(idem_key.clone(), idem.clone())],
        ticket_key: Some(vec![42; 32]),
        ..Batch::default()
    };
    {
        let store = open(dir.path());
        store.commit(batch.clone()).expect("commit");
    }
    let store = open(dir.path());
    let r = store.recover().expect("recover");
    assert_eq!(r.revision, 3);
    assert_eq!(Batch::share_entries(r.entries), batch.entries);
    assert_eq!(r.used_tickets, vec![([1; 16], 500)]);
    assert_eq!(r.idempotency, vec![(idem_key, idem)]);
    assert_eq!(r.audit_head, Some(head));
    assert_eq!(r.ticket_key, Some(vec![42; 32]));
    let mut verifier = ChainVerifier::default();
    for e in store.audit_range(1, 100).expect("audit") {
        verifier.push(&e).expect("stored chain verifies");
    }
    assert_eq!(verifier.events(), 3);
}

fn load_keys_is_exact<S: Storage>(open: &dyn Fn(&Path) -> S) {
    let dir = temp();
    let store = open(dir.path());
    let entries: Vec<_> = ["a", "b", "c"].iter().map(|k| (NsKey::new("ns", *k), entry(json!(k), 1))).collect();
    let other_ns = (NsKey::new("other", "a"), entry(json!("elsewhere"), 1));
    let mut all = entries.clone();
    all.push(other_ns);
    store.commit(Batch { revision: 1, entries: Batch::share_entries(all), ..Batch::default() }).expect("commit");
    let wanted: BTreeSet<NsKey> = [NsKey::new("ns", "a"), NsKey::new("ns", "c"), NsKey::new("ns", "zz")].into();
    let got = store.load_keys(&wanted).expect("load");
    assert_eq!(got.keys().cloned().collect::<Vec<_>>(), vec![NsKey::new("ns", "a"), NsKey::new("ns", "c")]);
    assert_eq!(got[&NsKey::new("ns", "a")], entries[0].1);
}

fn tombstones_and_pruning<S: Storage>(open: &dyn Fn(&Path) -> S) {
    let dir = temp();
    let store = open(dir.path());
    let idem_key = IdempotencyKey { ns: "ns".into(), scope: "svc".into(), key: "k".into() };
    let idem = IdempotencyRecord { fingerprint: [1; 32], outcome: Outcome::NotFound, expires_at_ms: 5 };
    store
        .commit(Batch {
            revision: 1,
            entries: Batch::share_entries([(NsKey::new("ns", "a"), entry(json!(1), 1))]),
            used_tickets: vec![([3; 16], 5), ([4; 16], 50)],
            idempotency: vec![(idem_key.clone(), idem)],
            ..Batch::default()
        })
        .expect("commit");
    let tombstone = Entry { record: None, changed_by: Some("deleter".into()), changed_at: 2 };
    store
        .commit(Batch {
            revision: 2,
            entries: Batch::share_entries([(NsKey::new("ns", "a"), tombstone.clone())]),
            prune_tickets: vec![[3; 16]],
            prune_idempotency: vec![idem_key],
            ..Batch::default()
        })
        .expect("commit");
    let r = store.recover().expect("recover");
    assert_eq!(r.entries, vec![(NsKey::new("ns", "a"), tombstone)]);
    assert_eq!(r.used_tickets, vec![([4; 16], 50)]);
    assert!(r.idempotency.is_empty());
    assert_eq!(r.revision, 2);
}

fn audit_pages_in_order<S: Storage>(open: &dyn Fn(&Path) -> S) {
    let dir = temp();
    let store = open(dir.path());
    let first = events(1, 5, GENESIS);
    let second = events(6, 5, first[4].hash);
    store.commit(Batch { revision: 5, audit: first, ..Batch::default() }).expect("commit");
    store.commit(Batch { revision: 10, audit: second.clone(), ..Batch::default() }).expect("commit");
    let page = store.audit_range(4, 3).expect("range");
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![4, 5, 6]);
    assert_eq!(page[2], second[0]);
    assert!(store.audit_range(11, 10).expect("range").is_empty());
}

fn audit_range_over_many_events<S: Storage>(open: &dyn Fn(&Path) -> S) {
    let dir = temp();
    let first = events(1, 600, GENESIS);
    let head = first[599].hash;
    {
        let store = open(dir.path());
        store.commit(Batch { revision: 600, audit: first, ..Batch::default() }).expect("commit");
        store.commit(Batch { revision: 601, audit: events(601, 1, head), ..Batch::default() }).expect("commit");
        let page = store.audit_range(250, 300).expect("range");
        assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), (250..550).collect::<Vec<_>>());
    }
    let store = open(dir.path());
    let tail = store.audit_range(599, 10).expect("range");
    assert_eq!(tail.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![599, 600, 601]);
    assert_eq!(store.recover().expect("recover").audit_head.map(|h| h.0), Some(601));
    let mut verifier = ChainVerifier::default();
    for e in store.audit_range(1, 1000).expect("range") {
        verifier.push(&e).expect("chain verifies");
    }
    assert_eq!(verifier.events(), 601);
}

fn forgotten_keys_are_gone<S: Storage>(open: &dyn Fn(&Path) -> S) {
    let dir = temp();
    let (a, b) = (NsKey::new("ns", "a"), NsKey::new("ns", "b"));
    {
        let store = open(dir.path());
        let entries = vec![(a.clone(), entry(json!(1), 1)), (b.clone(), entry(json!(2), 1))];
        store
            .commit(Batch { revision: 1, entries: Batch::share_entries(entries), ..Batch::default() })
            .expect("commit");
        store.commit(Batch { revision: 1, forget_entries: vec![a.clone()], ..Batch::default() }).expect("commit");
        let keys: BTreeSet<NsKey> = [a.clone(), b.clone()].into();
        assert_eq!(store.load_keys(&keys).expect("load").keys().cloned().collect::<Vec<_>>(), vec![b.clone()]);
        // Forgotten, then written again in one batch: the write wins.
        let again = Batch {
            revision: 2,
            forget_entries: vec![b.clone()],
            entries: Batch::share_entries([(b.clone(), entry(json!(3), 2))]),
            ..Batch::default()
        };
        store.commit(again).expect("commit");
    }
    let store = open(dir.path());
    let r = store.recover().expect("recover");
    assert_eq!(r.entries, vec![(b, entry(json!(3), 2))]);
}

fn broken_batch_changes_nothing<S: Storage>(open: &dyn Fn(&Path) -> S) {
    let dir = temp();
    let store = open(dir.path());
    store.commit(Batch { revision: 1, audit: events(1, 1, GENESIS), ..Batch::default() }).expect("commit");
    // Event 3 where 2 is next: the whole batch, entries included, must be refused.
    let bad = Batch {
        revision: 2,
        entries: Batch::share_entries([(NsKey::new("ns", "x"), entry(json!(1), 2))]),
        audit: events(3, 1, GENESIS),
        ..Batch::default()
    };
    assert!(store.commit(bad).is_err());
    let r = store.recover().expect("recover");
    assert_eq!(r.revision, 1);
    assert!(r.entries.is_empty());
    assert_eq!(r.audit_head.map(|h| h.0), Some(1));
}
