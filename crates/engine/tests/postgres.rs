//! The engine over the PostgreSQL backend (a real PostgreSQL 15 the test starts): nodes whose
//! clocks disagree by hours judge tickets by the database's clock alike.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gapguard_core::{Act, Condition, Op, Outcome, Refusal, WriteRequest};
use gapguard_engine::{Engine, EngineConfig, ManualClock, RequestContext, SystemClock, MAX_BATCH_ATTEMPTS};
use gapguard_store::{PgOptions, PgStore};
use gapguard_testkit::Postgres;
use serde_json::json;

const HOUR_MS: u64 = 3_600_000;

fn real_now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

fn node(url: &str, clock: Arc<dyn gapguard_engine::Clock>) -> Engine {
    let store = PgStore::connect(url, PgOptions::default()).expect("connect");
    Engine::open(Arc::new(store), clock, EngineConfig::default()).expect("open")
}

fn act(engine: &Engine, ticket: &str) -> WriteRequest {
    WriteRequest::Act(Act {
        ns: "ns".into(),
        ticket: Some(engine.verify_ticket(ticket).expect("a valid ticket")),
        conditions: vec![],
        ops: vec![Op::Put { key: "done".into(), value: json!(true) }],
        flow: None,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_with_skewed_clocks_judge_tickets_by_the_database_clock() {
    let pg = Postgres::start();
    let url = pg.create_database("skew");
    let honest = node(&url, Arc::new(SystemClock::default()));
    let ahead = node(&url, Arc::new(ManualClock::new(real_now_ms() + HOUR_MS)));
    let behind = node(&url, Arc::new(ManualClock::new(real_now_ms() - HOUR_MS)));
    for engine in [&honest, &ahead, &behind] {
        let skew = engine.now_ms().abs_diff(real_now_ms());
        assert!(skew < 2_000, "a node's time is the database's, not its own clock's: off by {skew} ms");
    }
    let ctx = RequestContext::default();
    let absent = vec![Condition::Absent("x".into())];

    // A ticket issued by the node an hour ahead, presented to the node an hour behind at once:
    // still valid (by the database's clock it has a second to live).
    let ticket = ahead.check("ns", absent.clone(), 1_000, None, &ctx).expect("check passes");
    let lives = ticket.expires_at_ms.abs_diff(real_now_ms() + 1_000);
    assert!(lives < 2_000, "expiry is database time + TTL, off by {lives} ms");
    let result = behind.write(act(&behind, &ticket.ticket), ctx.clone(), None).await.expect("write");
    assert!(matches!(result.outcome, Outcome::Acted { .. }), "{:?}", result.outcome);

    // And one presented after its TTL is expired, though the acting node's clock is an hour
    // behind.
    let ticket = ahead.check("ns", absent, 1_000, None, &ctx).expect("check passes");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let result = behind.write(act(&behind, &ticket.ticket), ctx, None).await.expect("write");
    assert!(matches!(result.outcome, Outcome::Refused(Refusal::TicketExpired { .. })), "{:?}", result.outcome);
}

#[derive(Default)]
struct CountsRetries(AtomicUsize);

impl gapguard_engine::Observer for CountsRetries {
    fn storage_retried(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_loses_a_race_runs_again_and_counts_it() {
    let pg = Postgres::start();
    let url = pg.create_database("races");
    let store = Arc::new(Faulty::new(&url, false));
    let retries = Arc::new(CountsRetries::default());
    // No reconciler batches in between: they would take some of the injected losses.
    let config = EngineConfig {
        observer: retries.clone(),
        prune_interval: Duration::from_secs(3600),
        ..EngineConfig::default()
    };
    let engine = Engine::open(store.clone(), Arc::new(SystemClock::default()), config).expect("open");
    let put = |v: i64| WriteRequest::Put { ns: "ns".into(), key: "k".into(), value: json!(v) };
    let bound = MAX_BATCH_ATTEMPTS as usize;
    // At the bound: the last attempt allowed succeeds.
    store.losses.store(bound - 1, Ordering::SeqCst);
    let result = engine.write(put(1), RequestContext::default(), None).await.expect("the write succeeds");
    assert!(matches!(result.outcome, Outcome::Put { version: 1, .. }), "{:?}", result.outcome);
    assert_eq!(retries.0.load(Ordering::SeqCst), bound - 1);
    // One past: the requests are answered unavailable and nothing is applied.
    store.losses.store(bound, Ordering::SeqCst);
    let err = engine.write(put(2), RequestContext::default(), None).await.expect_err("gives up");
    assert!(matches!(err, gapguard_engine::EngineError::Unavailable(_)), "{err:?}");
    store.losses.store(0, Ordering::SeqCst);
    engine.fresh().await.expect("fresh");
    assert_eq!(engine.get("ns", "k").0.expect("the key").value, json!(1), "the refused write left nothing");
}

/// The real PostgreSQL store with faults a test sets: its next `losses` commits lose a race
/// (as a serialization failure would make them), and, when `deaf`, it hears no notifications,
/// so that (with the reconciler's tick set an hour apart) the node's replica moves only when
/// its own batches run, and a test can put it behind the other nodes at will.
struct Faulty {
    inner: PgStore,
    losses: AtomicUsize,
    deaf: bool,
}

impl Faulty {
    fn new(url: &str, deaf: bool) -> Self {
        Self { inner: PgStore::connect(url, PgOptions::default()).expect("connect"), losses: AtomicUsize::new(0), deaf }
    }
}

impl gapguard_store::Storage for Faulty {
    fn recover(&self) -> Result<gapguard_store::Recovered, gapguard_store::StoreError> {
        self.inner.recover()
    }
    fn commit(&self, batch: gapguard_store::Batch) -> Result<(), gapguard_store::StoreError> {
        if self.losses.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(gapguard_store::StoreError::Conflict("injected serialization failure".into()));
        }
        self.inner.commit(batch)
    }
    fn load_keys(
        &self,
        keys: &std::collections::BTreeSet<gapguard_core::NsKey>,
    ) -> Result<std::collections::BTreeMap<gapguard_core::NsKey, gapguard_core::Entry>, gapguard_store::StoreError>
    {
        self.inner.load_keys(keys)
    }
    fn audit_range(
        &self,
        from_seq: u64,
        limit: usize,
    ) -> Result<Vec<gapguard_core::SealedEvent>, gapguard_store::StoreError> {
        self.inner.audit_range(from_seq, limit)
    }
    fn shared(&self) -> Option<&dyn gapguard_store::SharedStorage> {
        Some(self)
    }
}

impl gapguard_store::SharedStorage for Faulty {
    fn begin(&self, lock: &gapguard_store::LockRequest) -> Result<gapguard_store::Locked, gapguard_store::StoreError> {
        self.inner.begin(lock)
    }
    fn lock_more(
        &self,
        keys: &std::collections::BTreeSet<gapguard_core::NsKey>,
    ) -> Result<std::collections::BTreeMap<gapguard_core::NsKey, gapguard_core::Entry>, gapguard_store::StoreError>
    {
        self.inner.lock_more(keys)
    }
    fn rollback(&self) {
        self.inner.rollback()
    }
    fn changes_since(&self, cursor: u64) -> Result<gapguard_store::Changes, gapguard_store::StoreError> {
        self.inner.changes_since(cursor)
    }
    fn claim_idempotency(
        &self,
        key: &gapguard_store::IdempotencyKey,
        ttl_ms: u64,
    ) -> Result<bool, gapguard_store::StoreError> {
        self.inner.claim_idempotency(key, ttl_ms)
    }
    fn release_claim(&self, key: &gapguard_store::IdempotencyKey) {
        self.inner.release_claim(key)
    }
    fn subscribe(&self, wake: Box<dyn Fn() + Send + Sync>) {
        if !self.deaf {
            self.inner.subscribe(wake)
        }
    }
    fn last_changes(&self) -> Option<(u64, u64)> {
        self.inner.last_changes()
    }
    fn ping(&self) -> Result<(), gapguard_store::StoreError> {
        self.inner.ping()
    }
}

fn deaf_node(url: &str) -> Engine {
    let store = Faulty::new(url, true);
    let config = EngineConfig { prune_interval: Duration::from_secs(3600), ..EngineConfig::default() };
    Engine::open(Arc::new(store), Arc::new(SystemClock::default()), config).expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answers_a_write_only_once_its_replica_holds_every_earlier_write_of_every_node() {
    let pg = Postgres::start();
    let url = pg.create_database("replicas");
    let a = deaf_node(&url);
    let b = deaf_node(&url);
    let ctx = RequestContext::default();
    let put = |key: &str, v: i64| WriteRequest::Put { ns: "ns".into(), key: key.into(), value: json!(v) };
    // Runs of writes on one node, then the other, neither hearing of the other's: a node may
    // publish its own batch directly only when nothing else was logged since its replica's
    // cursor; after another node's writes it must read them back before answering.
    let plan = [(&a, 3), (&b, 2), (&a, 1), (&b, 4), (&a, 2)];
    let mut n = 0;
    for (writer, runs) in plan {
        for _ in 0..runs {
            writer.write(put(&format!("k{n}"), n), ctx.clone(), None).await.expect("write");
            n += 1;
            for j in 0..n {
                let got = writer.get("ns", &format!("k{j}")).0.map(|r| r.value);
                assert_eq!(got, Some(json!(j)), "after write {}, the writing node lacks k{j}", n - 1);
            }
            assert_eq!(writer.snapshot().revision, n as u64);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_further_behind_than_the_kept_change_log_reloads_the_whole_state() {
    let pg = Postgres::start();
    let url = pg.create_database("behind");
    let behind = deaf_node(&url);
    let options = PgOptions { changes_kept: 5, ..PgOptions::default() };
    let config = EngineConfig { prune_interval: Duration::from_millis(50), ..EngineConfig::default() };
    let store = PgStore::connect(&url, options).expect("connect");
    let writer = Engine::open(Arc::new(store), Arc::new(SystemClock::default()), config).expect("open");
    let put = |key: String, v: i64| WriteRequest::Put { ns: "ns".into(), key, value: json!(v) };
    // A watch open on the node that falls behind, from its start.
    let mut watch = behind.watch(1).expect("a watch from the start");
    for i in 0..20 {
        writer.write(put(format!("k{i}"), i), RequestContext::default(), None).await.expect("write");
    }
    // The writer's reconciler prunes the log down to its last five changes.
    tokio::time::sleep(Duration::from_millis(400)).await;
    behind.fresh().await.expect("a node past the log's start reloads instead of failing");
    assert_eq!(behind.snapshot().revision, 20);
    // The changes it skipped are in no feed: its watch is told (an empty batch: the reset),
    // and a watch from before the reload is compacted.
    let told = tokio::time::timeout(Duration::from_secs(5), watch.live.recv()).await.expect("in time").expect("open");
    assert!(told.is_empty(), "the first thing the watch hears is the reset, not a batch past a gap: {told:?}");
    assert_eq!(watch.reset_to.load(std::sync::atomic::Ordering::Acquire), 21);
    assert_eq!(behind.watch(2).err().map(|c| c.first_available), Some(21));
    for i in 0..20 {
        assert_eq!(behind.get("ns", &format!("k{i}")).0.map(|r| r.value), Some(json!(i)), "k{i}");
    }
}
