//! Engine tests over the real embedded store: group commit, durability order, recovery,
//! tickets with a manual clock, idempotency, pruning and storage failure.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gapguard_core::{Act, CompareOp, Condition, Entry, NsKey, Op, Outcome, Refusal, SealedEvent, WriteRequest};
use gapguard_engine::{AuditQuery, Engine, EngineConfig, EngineError, IdempotencyClaim, ManualClock, RequestContext};
use gapguard_store::{Batch, EmbeddedStore, IdempotencyKey, Recovered, Storage, StoreError};
use serde_json::json;

/// The real embedded store, counting commits and failing them on demand (fault injection).
struct Instrumented {
    inner: EmbeddedStore,
    commits: AtomicUsize,
    fail: AtomicBool,
    /// While true, commits wait (a slow disk), so requests stay in flight.
    stall: AtomicBool,
}

impl Storage for Instrumented {
    fn recover(&self) -> Result<Recovered, StoreError> {
        self.inner.recover()
    }
    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        while self.stall.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Engine("injected fsync failure".into()));
        }
        self.commits.fetch_add(1, Ordering::SeqCst);
        self.inner.commit(batch)
    }
    fn load_keys(&self, keys: &BTreeSet<NsKey>) -> Result<BTreeMap<NsKey, Entry>, StoreError> {
        self.inner.load_keys(keys)
    }
    fn audit_range(&self, from_seq: u64, limit: usize) -> Result<Vec<SealedEvent>, StoreError> {
        self.inner.audit_range(from_seq, limit)
    }
}

fn open(dir: &std::path::Path, clock: Arc<ManualClock>) -> (Engine, Arc<Instrumented>) {
    open_with(dir, clock, EngineConfig { prune_interval: Duration::from_millis(20), ..EngineConfig::default() })
}

fn open_with(dir: &std::path::Path, clock: Arc<ManualClock>, config: EngineConfig) -> (Engine, Arc<Instrumented>) {
    let store = Arc::new(Instrumented {
        inner: EmbeddedStore::open(dir).unwrap(),
        commits: AtomicUsize::new(0),
        fail: AtomicBool::new(false),
        stall: AtomicBool::new(false),
    });
    (Engine::open(store.clone(), clock, config).unwrap(), store)
}

fn put(key: &str, value: serde_json::Value) -> WriteRequest {
    WriteRequest::Put { ns: "ns".into(), key: key.into(), value }
}

fn ctx(corr: &str) -> RequestContext {
    RequestContext { correlation_id: Some(corr.into()), api_key_id: None, trace: None }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_commits_and_are_visible_once_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, store) = open(dir.path(), Arc::new(ManualClock::new(1_000)));
    let commits_before = store.commits.load(Ordering::SeqCst);
    let mut tasks = Vec::new();
    for i in 0..200 {
        let engine = engine.clone();
        tasks.push(tokio::spawn(async move {
            let result = engine.write(put(&format!("k{i}"), json!(i)), ctx("c"), None).await.unwrap();
            // Acknowledged means durable and visible to any read that starts now.
            let (record, _) = engine.get("ns", &format!("k{i}"));
            assert_eq!(record.unwrap().value, json!(i));
            result.outcome
        }));
    }
    let mut revisions = BTreeSet::new();
    for t in tasks {
        let Outcome::Put { revision, .. } = t.await.unwrap() else { panic!() };
        assert!(revisions.insert(revision), "revision {revision} given twice");
    }
    assert_eq!(revisions, (1..=200).collect());
    let commits = store.commits.load(Ordering::SeqCst) - commits_before;
    assert!(commits < 200, "200 concurrent writes took {commits} commits: no group commit");
}

#[tokio::test]
async fn state_and_audit_chain_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000));
    {
        let (engine, _) = open(dir.path(), clock.clone());
        engine.write(put("a", json!(1)), ctx("c1"), None).await.unwrap();
        engine.write(put("a", json!(2)), ctx("c2"), None).await.unwrap();
        engine.write(WriteRequest::Delete { ns: "ns".into(), key: "b".into() }, ctx("c3"), None).await.unwrap();
    }
    let (engine, _) = open(dir.path(), clock);
    let (record, revision) = engine.get("ns", "a");
    let record = record.unwrap();
    assert_eq!((record.value, record.version, record.create_revision, record.mod_revision), (json!(2), 2, 1, 2));
    assert_eq!(revision, 2);
    let verification = engine.verify_audit().unwrap();
    assert!(verification.ok);
    assert_eq!(verification.events, 3, "two puts and one refused delete");
    // The chain continues across the restart.
    engine.write(put("c", json!(3)), ctx("c4"), None).await.unwrap();
    assert_eq!(engine.verify_audit().unwrap().events, 4);
    let page =
        engine.audit(&AuditQuery { correlation_id: Some("c2".into()), limit: 10, ..AuditQuery::default() }).unwrap();
    assert_eq!(page.events.len(), 1);
    assert_eq!(page.events[0].event.revision, 2);
}

fn stock_ge(n: i64) -> Vec<Condition> {
    vec![Condition::Compare { key: "stock".into(), op: CompareOp::Ge, value: n.into() }]
}

fn use_ticket(engine: &Engine, ticket: &str) -> WriteRequest {
    WriteRequest::Act(Act {
        ns: "ns".into(),
        ticket: Some(engine.verify_ticket(ticket).unwrap()),
        conditions: vec![],
        ops: vec![Op::Add { key: "stock".into(), by: (-1).into() }],
        flow: None,
    })
}

#[tokio::test]
async fn tickets_are_single_use_expire_and_their_markers_are_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(10_000));
    let (engine, _) = open(dir.path(), clock.clone());
    engine.write(put("stock", json!(5)), ctx("setup"), None).await.unwrap();
    let ticket = engine.check("ns", stock_ge(1), 1_000, None, &ctx("check-1")).unwrap();
    clock.advance(250);
    let first = engine.write(use_ticket(&engine, &ticket.ticket), ctx("act-1"), None).await.unwrap();
    let Outcome::Acted { check_to_use_ms, .. } = first.outcome else { panic!("{first:?}") };
    assert_eq!(check_to_use_ms, Some(250));
    let again = engine.write(use_ticket(&engine, &ticket.ticket), ctx("act-2"), None).await.unwrap();
    assert_eq!(again.outcome, Outcome::Refused(Refusal::TicketUsed));
    assert_eq!(engine.snapshot().used_tickets.len(), 1);
    // Past the ticket's expiry the marker is pruned, and the ticket is refused as expired.
    clock.advance(1_000);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !engine.snapshot().used_tickets.is_empty() {
        assert!(std::time::Instant::now() < deadline, "used-ticket marker never pruned");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let late = engine.write(use_ticket(&engine, &ticket.ticket), ctx("act-3"), None).await.unwrap();
    assert!(matches!(late.outcome, Outcome::Refused(Refusal::TicketExpired { .. })), "{late:?}");
    assert_eq!(engine.get("ns", "stock").0.unwrap().value, json!(4));
}

#[tokio::test]
async fn a_denied_check_is_audited_with_the_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, _) = open(dir.path(), Arc::new(ManualClock::new(1)));
    let failed = engine.check("ns", stock_ge(1), 1_000, Some("checkout".into()), &ctx("denied-1")).unwrap_err();
    assert_eq!(failed[0].reason, "key is absent");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let q = AuditQuery { correlation_id: Some("denied-1".into()), limit: 5, ..AuditQuery::default() };
        let page = engine.audit(&q).unwrap();
        if let Some(e) = page.events.first() {
            assert_eq!(e.event.outcome, "denied");
            assert_eq!(e.event.flow.as_deref(), Some("checkout"));
            break;
        }
        assert!(std::time::Instant::now() < deadline, "denied check never audited");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn idempotency_replays_refuses_other_requests_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1));
    let claim = |fp: u8| IdempotencyClaim {
        key: IdempotencyKey { ns: "ns".into(), scope: String::new(), key: "pay-1".into() },
        fingerprint: [fp; 32],
    };
    let add = || {
        WriteRequest::Act(Act {
            ns: "ns".into(),
            ticket: None,
            conditions: vec![],
            ops: vec![Op::Add { key: "paid".into(), by: 10.into() }],
            flow: None,
        })
    };
    let first = {
        let (engine, _) = open(dir.path(), clock.clone());
        let first = engine.write(add(), ctx("p1"), Some(claim(1))).await.unwrap();
        let replay = engine.write(add(), ctx("p2"), Some(claim(1))).await.unwrap();
        assert!(replay.replayed && !first.replayed);
        assert_eq!(replay.outcome, first.outcome);
        let err = engine.write(add(), ctx("p3"), Some(claim(2))).await.unwrap_err();
        assert!(matches!(err, EngineError::IdempotencyConflict));
        first
    };
    let (engine, _) = open(dir.path(), clock.clone());
    let replay = engine.write(add(), ctx("p4"), Some(claim(1))).await.unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.outcome, first.outcome);
    assert_eq!(engine.get("ns", "paid").0.unwrap().value, json!(10), "the effect happened once");
    // After retention the key is free again.
    clock.advance(engine.limits().idempotency_retention_ms + 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !engine.snapshot().idempotency.is_empty() {
        assert!(std::time::Instant::now() < deadline, "idempotency record never pruned");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let fresh = engine.write(add(), ctx("p5"), Some(claim(2))).await.unwrap();
    assert!(!fresh.replayed);
    assert_eq!(engine.get("ns", "paid").0.unwrap().value, json!(20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_waits_to_grow_as_large_as_the_last_one_but_a_lone_write_never_waits() {
    let dir = tempfile::tempdir().unwrap();
    let linger = Duration::from_millis(500);
    // No pruning job may join a batch and make up its size.
    let config =
        EngineConfig { batch_linger: linger, prune_interval: Duration::from_secs(3600), ..EngineConfig::default() };
    let (engine, store) = open_with(dir.path(), Arc::new(ManualClock::new(1)), config);
    let write = |key: String| {
        let engine = engine.clone();
        tokio::spawn(async move { engine.write(put(&key, json!(1)), ctx(&key), None).await })
    };
    let write_all = |keys: &[String]| keys.iter().cloned().map(write).collect::<Vec<_>>();
    // A batch of two: two writes queue up behind a stalled commit.
    store.stall.store(true, Ordering::SeqCst);
    let stalled = write("stalled".into());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (x, y) = (write("x".into()), write("y".into()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.stall.store(false, Ordering::SeqCst);
    for task in [stalled, x, y] {
        task.await.unwrap().unwrap();
    }
    let commits = store.commits.load(Ordering::SeqCst);
    // The next batch waits for a second write, up to the linger.
    let first = write("first".into());
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!first.is_finished(), "the batch did not wait to grow");
    let second = write("second".into());
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(store.commits.load(Ordering::SeqCst), commits + 1, "the two writes were not one batch");
    // A write alone waits out the linger (the last batch had two), and makes the last batch one
    // write: the write after it does not wait at all.
    write("alone".into()).await.unwrap().unwrap();
    let started = std::time::Instant::now();
    write("after".into()).await.unwrap().unwrap();
    assert!(started.elapsed() < linger / 2, "a lone write waited {:?}", started.elapsed());

    // After a batch one past the cap, a batch waits for the cap at most.
    let cap = gapguard_engine::BATCH_LINGER_TARGET_MAX;
    let past_cap: Vec<String> = (0..=cap).map(|i| format!("n{i}")).collect();
    store.stall.store(true, Ordering::SeqCst);
    let stalled = write("stalled-again".into());
    tokio::time::sleep(Duration::from_millis(50)).await;
    let queued = write_all(&past_cap);
    tokio::time::sleep(Duration::from_millis(50)).await;
    store.stall.store(false, Ordering::SeqCst);
    stalled.await.unwrap().unwrap();
    for task in queued {
        task.await.unwrap().unwrap();
    }
    let commits = store.commits.load(Ordering::SeqCst);
    let started = std::time::Instant::now();
    let capped = write_all(&past_cap[..cap]);
    for task in capped {
        task.await.unwrap().unwrap();
    }
    assert!(started.elapsed() < linger / 2, "{cap} writes waited {:?} for one more", started.elapsed());
    assert_eq!(store.commits.load(Ordering::SeqCst), commits + 1, "the {cap} were not one batch");
}

#[tokio::test]
async fn a_failed_commit_publishes_nothing_and_stops_the_writer() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, store) = open(dir.path(), Arc::new(ManualClock::new(1)));
    engine.write(put("a", json!(1)), ctx("ok"), None).await.unwrap();
    store.fail.store(true, Ordering::SeqCst);
    let err = engine.write(put("a", json!(2)), ctx("lost"), None).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable(ref m) if m.contains("injected")), "{err:?}");
    assert_eq!(engine.get("ns", "a").0.unwrap().value, json!(1), "an unacknowledged write became visible");
    let err = engine.write(put("b", json!(1)), ctx("after"), None).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable(_)));
    assert!(engine.writer_failure().is_some());
    drop((engine, store));
    let (engine, _) = open(dir.path(), Arc::new(ManualClock::new(1)));
    assert_eq!(engine.get("ns", "a").0.unwrap().value, json!(1));
    assert!(engine.verify_audit().unwrap().ok);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_while_the_first_is_in_flight_is_refused_not_run() {
    let dir = tempfile::tempdir().unwrap();
    let (engine, store) = open(dir.path(), Arc::new(ManualClock::new(1)));
    let claim = IdempotencyClaim {
        key: IdempotencyKey { ns: "ns".into(), scope: String::new(), key: "order-1".into() },
        fingerprint: [5; 32],
    };
    store.stall.store(true, Ordering::SeqCst);
    let first = {
        let (engine, claim) = (engine.clone(), claim.clone());
        tokio::spawn(async move { engine.write(put("order", json!(1)), ctx("first"), Some(claim)).await })
    };
    // Wait until the first request is queued in the writer.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = engine.write(put("order", json!(1)), ctx("second"), Some(claim.clone())).await;
    assert!(matches!(second, Err(EngineError::IdempotencyInProgress)), "{second:?}");
    store.stall.store(false, Ordering::SeqCst);
    let first = first.await.unwrap().unwrap();
    assert!(!first.replayed);
    let third = engine.write(put("order", json!(1)), ctx("third"), Some(claim)).await.unwrap();
    assert!(third.replayed);
    assert_eq!(engine.get("ns", "order").0.unwrap().version, 1, "the put ran once");
}

#[tokio::test]
async fn the_reconciler_expires_held_reservations_into_orphans_even_after_a_restart() {
    use gapguard_core::primitives::{self, Orphan, OrphanKind, Pool};
    use gapguard_core::{AuditKind, OpError, OpResult};
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000));
    let single = |op: Op| WriteRequest::Single { ns: "ns".into(), op, kind: AuditKind::Reservation };
    let id = {
        let (engine, _) = open(dir.path(), clock.clone());
        engine.write(single(Op::SetCapacity { pool: "vms".into(), capacity: 10 }), ctx("admin"), None).await.unwrap();
        let reserve = Op::Reserve { pool: "vms".into(), amount: 4, ttl_ms: 100, context: Some(json!({"vm": "v-1"})) };
        let out = engine.write(single(reserve), ctx("provisioner"), None).await.unwrap().outcome;
        let Outcome::Applied { result: OpResult::Reserve { reservation, .. }, .. } = out else { panic!("{out:?}") };
        reservation
    };
    // Restarted before the deadline: the reconciler must find the reservation again.
    let (engine, _) = open(dir.path(), clock.clone());
    clock.advance(100);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let pool: Pool = engine.primitive("ns", &primitives::pool_key("vms")).unwrap();
        if pool.reserved == 0 {
            assert_eq!(pool.available(), 10);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the reservation never expired");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let orphans: Vec<(String, Orphan)> = engine.primitives("ns", "orphan/", 10);
    assert_eq!(orphans.len(), 1);
    let OrphanKind::Reservation { reservation, context, amount, .. } = &orphans[0].1.kind else { panic!() };
    assert_eq!((reservation, amount, context), (&id, &4, &Some(json!({"vm": "v-1"}))));
    let late = engine.write(single(Op::Commit { reservation: id }), ctx("late"), None).await.unwrap().outcome;
    assert!(
        matches!(late, Outcome::Refused(Refusal::OpFailed { error: OpError::ReservationExpired { .. }, .. })),
        "{late:?}"
    );
    let expiry = engine
        .audit(&AuditQuery { correlation_id: Some("reconciler".into()), limit: 5, ..AuditQuery::default() })
        .unwrap();
    assert_eq!(expiry.events.len(), 1);
    assert_eq!(expiry.events[0].event.kind, AuditKind::Expire);
}

#[tokio::test]
async fn old_tombstones_and_resolved_reservations_are_forgotten_and_stay_forgotten() {
    use gapguard_core::primitives;
    use gapguard_core::{AuditKind, OpResult};
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(1_000));
    let single = |op: Op| WriteRequest::Single { ns: "ns".into(), op, kind: AuditKind::Reservation };
    let (engine, store) = open(dir.path(), clock.clone());
    engine.write(put("gone", json!(1)), ctx("c"), None).await.unwrap();
    engine.write(WriteRequest::Delete { ns: "ns".into(), key: "gone".into() }, ctx("deleter"), None).await.unwrap();
    engine.write(single(Op::SetCapacity { pool: "p".into(), capacity: 5 }), ctx("c"), None).await.unwrap();
    let out = engine
        .write(single(Op::Reserve { pool: "p".into(), amount: 1, ttl_ms: 60_000, context: None }), ctx("c"), None)
        .await
        .unwrap()
        .outcome;
    let Outcome::Applied { result: OpResult::Reserve { reservation, .. }, .. } = out else { panic!("{out:?}") };
    engine.write(single(Op::Commit { reservation: reservation.clone() }), ctx("c"), None).await.unwrap();
    let tombstone = NsKey::new("ns", "gone");
    let rsv_key = NsKey::new("ns", primitives::reservation_key(&reservation));
    // Within the retention both are kept: the tombstone names its delete.
    assert_eq!(engine.snapshot().entries.get(&tombstone).unwrap().changed_by.as_deref(), Some("deleter"));
    let wait_until = |what: &'static str, gone: Box<dyn Fn(&Engine) -> bool>| {
        let engine = engine.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            while !gone(&engine) {
                assert!(std::time::Instant::now() < deadline, "{what} was never forgotten");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    clock.advance(engine.limits().ticket_ttl_ms_max + 1);
    let t = tombstone.clone();
    wait_until("the tombstone", Box::new(move |e: &Engine| e.snapshot().entries.get(&t).is_none())).await;
    assert!(engine.snapshot().entries.get(&rsv_key).is_some(), "a resolved reservation is kept for its retention");
    clock.advance(engine.limits().resolved_retention_ms);
    let r = rsv_key.clone();
    wait_until("the committed reservation", Box::new(move |e: &Engine| e.snapshot().entries.get(&r).is_none())).await;
    // The pool (and its counters) is never forgotten, and a late commit answers not found.
    let pool: primitives::Pool = engine.primitive("ns", &primitives::pool_key("p")).unwrap();
    assert_eq!((pool.used, pool.reserved), (1, 0));
    let late = engine.write(single(Op::Commit { reservation }), ctx("late"), None).await.unwrap().outcome;
    assert!(
        matches!(
            late,
            Outcome::Refused(Refusal::OpFailed { error: gapguard_core::OpError::ReservationNotFound { .. }, .. })
        ),
        "{late:?}"
    );
    drop((engine, store));
    let (engine, _) = open(dir.path(), clock);
    assert!(engine.snapshot().entries.get(&tombstone).is_none() && engine.snapshot().entries.get(&rsv_key).is_none());
    assert!(engine.verify_audit().unwrap().ok);
}
