//! gapguard's imperative shell around the pure core: it owns the storage backend, the clock,
//! id generation, the ticket signing key, the single writer with group commit, and pruning.
//!
//! Reads and checks are served from an immutable [`Snapshot`] that the writer publishes only
//! after a batch is durable, so they never wait for the writer and never see a write a crash
//! could take back. Writes go through one writer thread that batches concurrent requests into
//! one storage transaction (one fsync) and answers each only after that batch is durable.

mod audit;
mod clock;
mod feed;
mod observe;
mod snapshot;
mod writer;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use gapguard_core::primitives;
use gapguard_core::ticket::{sign, verify};
use gapguard_core::{
    idempotency, CheckOutcome, CheckRequest, Condition, ConditionFailure, IdempotencyDecision, Limits, Meta, NsKey,
    Outcome, Record, Revision, TicketError, VerifiedTicket, WriteRequest,
};
use gapguard_store::{Batch, IdempotencyKey, Storage, StoreError};
use tokio::sync::{mpsc, oneshot};

pub use audit::{AuditPage, AuditQuery, AuditVerification, StoredAuditEvent};
pub use clock::{Clock, ManualClock, SystemClock};
pub use feed::{Change, Compacted, Subscription, FEED_WINDOW_BYTES, FEED_WINDOW_CHANGES};
pub use observe::{NoObserver, Observer};
pub use snapshot::Snapshot;
pub use writer::BATCH_LINGER_TARGET_MAX;
use writer::{Job, Writer};

/// How long an idempotency key stays claimed in a shared backend by a node that crashed while
/// handling it (a node that finishes releases it at once).
pub const IDEMPOTENCY_CLAIM_MS: u64 = 30_000;

/// How many times, at most, a shared backend's batch is run when its transaction keeps losing
/// races (serialization failures, deadlocks), with a growing pause between runs; then its
/// requests are answered `unavailable`.
pub const MAX_BATCH_ATTEMPTS: u32 = 8;

/// Configuration of the engine.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Request limits (ticket TTLs, idempotency retention…).
    pub limits: Limits,
    /// Most write requests in one batch (one storage transaction).
    pub max_batch: usize,
    /// How often the reconciler runs: expiring reservations and leases past their deadline,
    /// pruning used-ticket markers and idempotency records past theirs.
    pub prune_interval: Duration,
    /// Told about checks, writes and commits (the server's metrics).
    pub observer: Arc<dyn Observer>,
    /// How long the writer polls for the next write before it sleeps, after a batch of one
    /// request. Waking a sleeping thread on a virtual machine costs tens to a hundred
    /// microseconds (the idle vCPU halts, and the wake-up goes through the hypervisor): a
    /// large share of a durable write's round trip when writes come one at a time (puts at
    /// one connection, measured: 3,000/s sleeping at once, 4,400/s polling 250 µs). After a
    /// batch of several the writer sleeps at once: under concurrent load the polling took CPU
    /// from the request threads (puts at 16 connections: 21–25k/s polling after every batch,
    /// 25.6–26.5k/s not polling). Zero: never poll.
    pub spin_before_sleep: Duration,
    /// How long the writer may wait, once the queue has run dry, for a batch to grow as
    /// large as the one before it, or to [`BATCH_LINGER_TARGET_MAX`] requests if that was
    /// larger (only after a batch of several: a lone write never waits). Each batch costs the
    /// writer a write and an fsync, two device requests whose system calls, hypervisor exits
    /// and wake-ups cost far more CPU than the requests' own work; on two cores shared with
    /// the clients, fewer and larger batches leave more CPU to the request threads. Measured
    /// in alternated runs at 16 connections, 30 µs against none: reserve→commit pairs
    /// 9.0–10.7k/s against 8.4–8.7k/s, 8.4–9.1k against 7.5–7.9k (three rounds each),
    /// 8.1–9.9k against 7.5–8.0k (four); puts from within the noise to 18 % more; the
    /// decrement and check→act within the noise. At 64 connections (puts and reserve→commit)
    /// within the noise, once batches stopped waiting for more than 8 (waiting for the last
    /// batch's 15 to 20 cost puts 10 %). Zero: never wait.
    pub batch_linger: Duration,
    /// How long a write that is the only one awaiting the writer polls for its answer on the
    /// calling thread, yielding the CPU between polls, before it waits to be woken. Waking
    /// the request's thread costs what waking the writer does (see `spin_before_sleep`), a
    /// second time per write. The poll stops as soon as another write is sent (under
    /// concurrent load every write waits as before), so it only serves clients that write
    /// one at a time, at the price of the calling thread's CPU while it polls. Measured in
    /// alternated runs, 300 µs against none: puts at one connection 5.8–7.3k/s against
    /// 4.3–5.2k/s; at 16 and 64 connections, and the decrement, check→act and
    /// reserve→commit, within the noise. Where an fsync takes longer than the limit, a lone
    /// write spends the limit polling for nothing. It does nothing over a shared backend
    /// (PostgreSQL, whose writes do not go through the writer thread), nor when the engine is
    /// opened outside a multi-threaded Tokio runtime of two workers or more (a poll would
    /// stall the only worker). Zero: never poll.
    pub answer_poll: Duration,
    /// Most bytes of changes (keys and values) the change feed keeps for watchers that resume
    /// from an earlier revision, besides its cap of [`FEED_WINDOW_CHANGES`] changes; a watch
    /// from before what is kept is answered `compacted`.
    pub watch_history_bytes: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            max_batch: 1024,
            prune_interval: Duration::from_millis(250),
            observer: Arc::new(NoObserver),
            spin_before_sleep: Duration::ZERO,
            batch_linger: Duration::ZERO,
            answer_poll: Duration::ZERO,
            watch_history_bytes: FEED_WINDOW_BYTES,
        }
    }
}

/// Unresolved orphans, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrphanCounts {
    /// Reservations that expired while held.
    pub reservations: u64,
    /// Leases that expired while held.
    pub leases: u64,
}

/// Who is asking, for the audit log.
#[derive(Clone, Debug, Default)]
pub struct RequestContext {
    /// Correlation id (from `X-Correlation-Id` or `traceparent`).
    pub correlation_id: Option<String>,
    /// The API key that made the request.
    pub api_key_id: Option<String>,
    /// The request span's (trace id, span id) in lowercase hex, if traced: a check's ticket
    /// carries them so the act's span can link to the check's. Boxed: the context rides in
    /// every write job, untraced ones included.
    pub trace: Option<Box<(String, String)>>,
}

/// An `Idempotency-Key` with the fingerprint of the request that carries it.
#[derive(Clone, Debug)]
pub struct IdempotencyClaim {
    /// Where the record lives.
    pub key: IdempotencyKey,
    /// BLAKE3 of the request (method, route, body).
    pub fingerprint: [u8; 32],
}

/// The answer to a write request.
#[derive(Clone, Debug, PartialEq)]
pub struct WriteResult {
    /// What happened.
    pub outcome: Outcome,
    /// Whether this is the stored answer of an earlier identical request.
    pub replayed: bool,
}

/// An issued ticket.
#[derive(Clone, Debug, PartialEq)]
pub struct IssuedTicket {
    /// The opaque, signed ticket.
    pub ticket: String,
    /// The revision at which the conditions held.
    pub revision: Revision,
    /// When it expires (ms since the Unix epoch).
    pub expires_at_ms: u64,
}

/// A live key as read.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyValue {
    /// The namespace-relative key.
    pub key: String,
    /// Its record.
    pub record: Record,
}

/// Errors of the engine (user errors are [`Outcome::Refused`], not these).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// Another request used this idempotency key.
    #[error("idempotency key was already used with a different request")]
    IdempotencyConflict,
    /// A request with this idempotency key is still being processed.
    #[error("a request with this idempotency key is still in flight")]
    IdempotencyInProgress,
    /// The writer stopped after a storage failure; restart the server to recover.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// The storage backend failed.
    #[error(transparent)]
    Storage(#[from] StoreError),
}

struct Inner {
    snapshot: Arc<ArcSwap<Snapshot>>,
    jobs: mpsc::UnboundedSender<Job>,
    ticket_key: Vec<u8>,
    store: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    in_flight: Mutex<HashSet<IdempotencyKey>>,
    /// Writes sent to the writer and not answered yet, counted only while
    /// [`EngineConfig::answer_poll`] is on.
    awaiting: AtomicUsize,
    writer: writer::Status,
    feed: Arc<feed::Feed>,
    writer_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// Whether the backend is shared with other nodes (PostgreSQL).
    shared: bool,
}

impl Drop for Inner {
    /// Lets the writer finish what it was given and waits for it, so that the store is
    /// closed (and its file lock released) when the last engine handle is gone.
    fn drop(&mut self) {
        let _ = self.jobs.send(Job::Stop);
        if let Some(thread) = self.writer_thread.lock().expect("writer thread lock").take() {
            let _ = thread.join();
        }
    }
}

/// The guard engine. Cheap to clone; all clones share one writer.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

/// Removes an idempotency key from the in-flight set when the request is done (or dropped).
struct InFlight<'a> {
    set: &'a Mutex<HashSet<IdempotencyKey>>,
    key: IdempotencyKey,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.set.lock().expect("in-flight set lock").remove(&self.key);
    }
}

/// Counts a write as awaiting the writer from its sending until it is answered (or dropped).
/// A request dropped before its answer (past its deadline) stops counting while its job may
/// still be queued: a write sent then may take itself for alone and poll, bounded by
/// [`EngineConfig::answer_poll`].
struct Awaiting<'a> {
    count: &'a AtomicUsize,
    /// Whether no other write was awaiting when this one was sent.
    alone: bool,
}

impl<'a> Awaiting<'a> {
    fn enter(count: &'a AtomicUsize) -> Self {
        Self { count, alone: count.fetch_add(1, Ordering::AcqRel) == 0 }
    }
}

impl Drop for Awaiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether the calling task may hold its thread for a while: only on a multi-threaded Tokio
/// runtime with more than one worker. On a single worker the poll would stall every other
/// task (the accept loop, the other connections) and could never see another write arrive.
/// Asked once, when the engine opens, in the runtime that will serve it.
fn may_block_a_worker() -> bool {
    tokio::runtime::Handle::try_current().is_ok_and(|runtime| {
        runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread && runtime.metrics().num_workers() > 1
    })
}

/// Polls for a write's answer for up to `limit`, yielding the thread between polls, while it
/// is the only write awaiting (`awaiting` at 1): `Some` with the answer (`None` in it if the
/// writer dropped the request), or `None` to wait for it instead: past the limit, or as soon
/// as another write is sent. See [`EngineConfig::answer_poll`].
fn poll_answer<T>(answer: &mut oneshot::Receiver<T>, awaiting: &AtomicUsize, limit: Duration) -> Option<Option<T>> {
    if limit.is_zero() {
        return None;
    }
    let started = std::time::Instant::now();
    loop {
        match answer.try_recv() {
            Ok(answered) => return Some(Some(answered)),
            Err(oneshot::error::TryRecvError::Closed) => return Some(None),
            Err(oneshot::error::TryRecvError::Empty) => {}
        }
        if awaiting.load(Ordering::Acquire) != 1 || started.elapsed() >= limit {
            return None;
        }
        std::thread::yield_now();
    }
}

/// The first `limit` of `items`, and whether there were more (as etcd's `more`): a listing
/// reads one past its limit to know.
pub fn first_page<T>(items: impl IntoIterator<Item = T>, limit: usize) -> (Vec<T>, bool) {
    let mut page: Vec<T> = items.into_iter().take(limit.saturating_add(1)).collect();
    let more = page.len() > limit;
    page.truncate(limit);
    (page, more)
}

impl Engine {
    /// Opens the engine over a backend: recovers its state, generates the ticket key on first
    /// start, starts the writer thread and the pruning task (which needs a Tokio runtime).
    pub fn open(store: Arc<dyn Storage>, clock: Arc<dyn Clock>, mut config: EngineConfig) -> Result<Self, EngineError> {
        let mut recovered = store.recover()?;
        let ticket_key = match &recovered.ticket_key {
            Some(key) => key.clone(),
            None => {
                let key: [u8; 32] = rand::random();
                store.commit(Batch {
                    revision: recovered.revision,
                    ticket_key: Some(key.to_vec()),
                    ..Batch::default()
                })?;
                // A shared backend keeps the first key committed (another node may have
                // started at the same time): read back the one every node will use.
                recovered = store.recover()?;
                recovered
                    .ticket_key
                    .clone()
                    .ok_or_else(|| EngineError::Unavailable("the ticket key was not stored".into()))?
            }
        };
        tracing::info!(
            revision = recovered.revision,
            keys = recovered.entries.len(),
            audit_events = recovered.audit_head.map_or(0, |h| h.0),
            "recovered state"
        );
        let shared = store.shared().is_some();
        if !may_block_a_worker() {
            config.answer_poll = Duration::ZERO;
        }
        // Over a shared backend, time is the database's, and idempotency records and used
        // tickets are read fresh by each batch (the replica holds only entries).
        let db_clock = shared.then(|| Arc::new(clock::DbClock::new(clock.clone())));
        let clock: Arc<dyn Clock> = match &db_clock {
            Some(db) => db.clone(),
            None => clock,
        };
        if let (Some(shared), Some(db)) = (store.shared(), &db_clock) {
            // Checks must not run on this machine's clock before the first batch reads the
            // database's: read it now.
            db.observe(shared.changes_since(recovered.cursor)?.now_ms);
        }
        if shared {
            recovered.used_tickets.clear();
            recovered.idempotency.clear();
        }
        let feed = Arc::new(feed::Feed::new(recovered.revision, config.watch_history_bytes));
        let (snapshot, writer) =
            Writer::new(recovered, store.clone(), clock.clone(), config.clone(), feed.clone(), db_clock);
        let snapshot = Arc::new(ArcSwap::from_pointee(snapshot));
        let status = writer.status();
        let (jobs, rx) = mpsc::unbounded_channel();
        let published = snapshot.clone();
        let writer_thread = std::thread::Builder::new()
            .name("gapguard-writer".into())
            .spawn(move || writer.run(rx, published))
            .map_err(|e| EngineError::Unavailable(format!("cannot start the writer thread: {e}")))?;
        if let Some(shared) = store.shared() {
            // Another node committed: sync the replica now rather than at the next tick.
            let weak = jobs.downgrade();
            shared.subscribe(Box::new(move || {
                if let Some(jobs) = weak.upgrade() {
                    let _ = jobs.send(Job::Sync(None));
                }
            }));
        }
        let weak = jobs.downgrade();
        let interval = config.prune_interval;
        tokio::spawn(async move {
            // The first tick one interval after the start (recovery has just run), not at once.
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(jobs) = weak.upgrade() else { break };
                if jobs.send(Job::Prune).is_err() {
                    break;
                }
            }
        });
        let inner = Inner {
            snapshot,
            jobs,
            ticket_key,
            store,
            clock,
            config,
            in_flight: Mutex::new(HashSet::new()),
            awaiting: AtomicUsize::new(0),
            writer: status,
            feed,
            writer_thread: Mutex::new(Some(writer_thread)),
            shared,
        };
        Ok(Self { inner: Arc::new(inner) })
    }

    /// Waits until this node's snapshot holds every write acknowledged by any node before the
    /// call: immediate with a single-writer backend (its snapshot is the whole truth); over a
    /// shared backend, one read of the database's change log (batched with other readers').
    /// Reads and checks call it first, so they are linearizable across nodes.
    pub async fn fresh(&self) -> Result<(), EngineError> {
        if !self.inner.shared {
            return Ok(());
        }
        let (reply, answer) = oneshot::channel();
        if self.inner.jobs.send(Job::Sync(Some(reply))).is_err() {
            return Err(self.unavailable());
        }
        answer.await.unwrap_or_else(|_| Err(self.unavailable()))
    }

    /// Whether the node can serve: the writer is running and, over a shared backend, the
    /// database answers. The error says what is wrong, for `/readyz`.
    pub async fn ready(&self) -> Result<(), String> {
        if let Some(failure) = self.writer_failure() {
            return Err(failure);
        }
        if self.inner.shared {
            let store = self.inner.store.clone();
            let ping = tokio::task::spawn_blocking(move || store.shared().map_or(Ok(()), |s| s.ping()))
                .await
                .map_err(|e| format!("readiness probe failed: {e}"))?;
            ping.map_err(|e| format!("the database: {e}"))?;
        }
        Ok(())
    }

    /// Whether the backend is shared with other nodes.
    pub fn is_shared(&self) -> bool {
        self.inner.shared
    }

    /// The latest durable snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.inner.snapshot.load_full()
    }

    /// The limits in force.
    pub fn limits(&self) -> &Limits {
        &self.inner.config.limits
    }

    /// The current time on the engine's clock (ms since the Unix epoch).
    pub fn now_ms(&self) -> u64 {
        self.inner.clock.now_ms()
    }

    /// Reads one live key.
    pub fn get(&self, ns: &str, key: &str) -> (Option<Record>, Revision) {
        let snap = self.inner.snapshot.load();
        let record = snap.entries.get(&NsKey::new(ns, key)).and_then(|e| e.record.clone());
        (record, snap.revision)
    }

    /// Lists live keys of a namespace starting with `prefix` (and after `after`, exclusive),
    /// in key order, at most `limit`; `true` if more match past the last one returned.
    pub fn list(&self, ns: &str, prefix: &str, after: Option<&str>, limit: usize) -> (Vec<KeyValue>, bool, Revision) {
        let snap = self.inner.snapshot.load();
        let start = match after {
            Some(after) if after > prefix => NsKey::new(ns, after),
            _ => NsKey::new(ns, prefix),
        };
        let matching = snap
            .entries
            .range(start..)
            .take_while(|(k, _)| k.ns == ns && k.key.starts_with(prefix))
            .filter(|(k, _)| after.is_none_or(|after| k.key.as_str() > after) && !primitives::is_internal(&k.key))
            .filter_map(|(k, e)| e.record.as_ref().map(|r| KeyValue { key: k.key.clone(), record: r.clone() }));
        let (items, more) = first_page(matching, limit);
        (items, more, snap.revision)
    }

    /// Reads a primitive's record (a lease, pool, reservation or orphan) by its internal key.
    pub fn primitive<T: serde::de::DeserializeOwned>(&self, ns: &str, internal_key: &str) -> Option<T> {
        let snap = self.inner.snapshot.load();
        let key = NsKey::new(ns, internal_key);
        primitives::decode(&key, snap.entries.get(&key).map(|e| &**e))
    }

    /// Every live primitive of one kind in a namespace (`kind`: `"lease/"`, `"pool/"`,
    /// `"rsv/"`, `"grant/"`, `"orphan/"`), with its name, in key order, at most `limit`.
    pub fn primitives<T: serde::de::DeserializeOwned>(&self, ns: &str, kind: &str, limit: usize) -> Vec<(String, T)> {
        let snap = self.inner.snapshot.load();
        let prefix = primitives::kind_prefix(kind);
        snap.entries
            .range(NsKey::new(ns, prefix.as_str())..)
            .take_while(|(k, _)| k.ns == ns && k.key.starts_with(&prefix))
            .filter_map(|(k, e)| {
                let value: T = primitives::decode(k, Some(&**e))?;
                Some((k.key[prefix.len()..].to_owned(), value))
            })
            .take(limit)
            .collect()
    }

    /// Counts the unresolved orphans of every namespace. Seeks from one namespace's orphans
    /// to the next, so it costs a lookup per namespace plus one step per orphan, not a scan of
    /// every key.
    pub fn orphan_counts(&self) -> OrphanCounts {
        let snap = self.inner.snapshot.load();
        let prefix = primitives::kind_prefix("orphan/");
        let mut counts = OrphanCounts::default();
        let mut next_ns = String::new();
        while let Some((first, _)) = snap.entries.range(NsKey::new(next_ns.as_str(), "")..).next() {
            let ns = first.ns.clone();
            let orphans = snap
                .entries
                .range(NsKey::new(ns.as_str(), prefix.as_str())..)
                .take_while(|(k, _)| k.ns == ns && k.key.starts_with(&prefix));
            for (key, entry) in orphans {
                match primitives::decode::<primitives::Orphan>(key, Some(&**entry)) {
                    Some(o) if !o.resolved => match o.kind {
                        primitives::OrphanKind::Reservation { .. } => counts.reservations += 1,
                        primitives::OrphanKind::Lease { .. } => counts.leases += 1,
                    },
                    _ => {}
                }
            }
            // The least namespace after `ns`: `ns` followed by the least character.
            next_ns = format!("{ns}\u{0}");
        }
        counts
    }

    /// Starts a watch from `from_revision` (inclusive): the changes since, then live ones.
    pub fn watch(&self, from_revision: Revision) -> Result<Subscription, Compacted> {
        self.inner.feed.subscribe(from_revision)
    }

    /// Runs a check against the latest durable state. On success returns a signed ticket; on
    /// failure the failing conditions (the denial is audited with the next commit, without
    /// waiting for it).
    pub fn check(
        &self,
        ns: &str,
        conditions: Vec<Condition>,
        ttl_ms: u64,
        flow: Option<String>,
        ctx: &RequestContext,
    ) -> Result<IssuedTicket, Vec<ConditionFailure>> {
        let snap = self.inner.snapshot.load();
        let request = CheckRequest { ns: ns.to_owned(), conditions, ttl_ms, flow, ticket_id: rand::random() };
        let meta = Meta {
            now_ms: self.inner.clock.now_ms(),
            revision: snap.revision + 1,
            correlation_id: ctx.correlation_id.clone(),
            api_key_id: ctx.api_key_id.clone(),
        };
        let outcome = gapguard_core::check(&**snap, &request, &meta);
        let failed: &[ConditionFailure] = match &outcome {
            CheckOutcome::Passed(_) => &[],
            CheckOutcome::Denied { failed, .. } => failed,
        };
        self.inner.config.observer.checked(ns, request.flow.as_deref(), failed);
        match outcome {
            CheckOutcome::Passed(mut claims) => {
                if let Some((trace_id, span_id)) = ctx.trace.as_deref() {
                    claims.trace_id = Some(trace_id.clone());
                    claims.span_id = Some(span_id.clone());
                }
                Ok(IssuedTicket {
                    ticket: sign(&self.inner.ticket_key, &claims),
                    revision: claims.revision,
                    expires_at_ms: claims.expires_at_ms,
                })
            }
            CheckOutcome::Denied { failed, audit } => {
                // Best effort by design: if the writer is gone the server is failing anyway.
                let _ = self.inner.jobs.send(Job::Audit(audit));
                Err(failed)
            }
        }
    }

    /// Verifies a presented ticket's signature.
    pub fn verify_ticket(&self, ticket: &str) -> Result<VerifiedTicket, TicketError> {
        verify(&self.inner.ticket_key, ticket)
    }

    /// Applies a write request, durably, once. With an idempotency claim, a repeat of the same
    /// request answers the stored outcome; another request under the same key is refused.
    pub async fn write(
        &self,
        request: WriteRequest,
        ctx: RequestContext,
        idempotency: Option<IdempotencyClaim>,
    ) -> Result<WriteResult, EngineError> {
        if self.inner.shared {
            return self.write_shared(request, ctx, idempotency).await;
        }
        let _in_flight = match &idempotency {
            Some(claim) => {
                let snap = self.inner.snapshot.load();
                let now_ms = self.inner.clock.now_ms();
                match idempotency::decide(snap.idempotency.get(&claim.key).map(|r| &**r), &claim.fingerprint, now_ms) {
                    IdempotencyDecision::Replay(outcome) => {
                        self.inner.config.observer.replayed();
                        return Ok(WriteResult { outcome: outcome.clone(), replayed: true });
                    }
                    IdempotencyDecision::Conflict => {
                        self.inner.config.observer.idempotency_conflict();
                        return Err(EngineError::IdempotencyConflict);
                    }
                    IdempotencyDecision::Execute => {}
                }
                let mut set = self.inner.in_flight.lock().expect("in-flight set lock");
                if !set.insert(claim.key.clone()) {
                    return Err(EngineError::IdempotencyInProgress);
                }
                Some(InFlight { set: &self.inner.in_flight, key: claim.key.clone() })
            }
            None => None,
        };
        let (reply, mut answer) = oneshot::channel();
        let job = Job::Write { request, ctx, idempotency, reply };
        // Counted only where a lone write may poll: the count is a shared atomic, and every
        // write goes through here.
        let poll = self.inner.config.answer_poll;
        let awaiting = (!poll.is_zero()).then(|| Awaiting::enter(&self.inner.awaiting));
        if self.inner.jobs.send(job).is_err() {
            return Err(self.unavailable());
        }
        let polled = match &awaiting {
            Some(awaiting) if awaiting.alone => poll_answer(&mut answer, &self.inner.awaiting, poll),
            _ => None,
        };
        let answer = match polled {
            Some(answered) => answered,
            None => (&mut answer).await.ok(),
        };
        drop(awaiting);
        let answer = answer.unwrap_or_else(|| Err(self.unavailable()))?;
        if let Some((request, evaluated_at_ms)) = &answer.evaluated {
            // Durable by now; reported here so that the writer thread does not do it.
            self.inner.config.observer.written(request, &answer.result.outcome, *evaluated_at_ms);
        }
        Ok(answer.result)
    }

    /// [`Engine::write`] over a shared backend: the idempotency key is claimed in the database
    /// (so a duplicate in flight on another node answers `in progress`), and the stored record
    /// is read fresh by the batch.
    async fn write_shared(
        &self,
        request: WriteRequest,
        ctx: RequestContext,
        idempotency: Option<IdempotencyClaim>,
    ) -> Result<WriteResult, EngineError> {
        let _in_flight = match &idempotency {
            Some(claim) => {
                {
                    let mut set = self.inner.in_flight.lock().expect("in-flight set lock");
                    if !set.insert(claim.key.clone()) {
                        return Err(EngineError::IdempotencyInProgress);
                    }
                }
                let guard = InFlight { set: &self.inner.in_flight, key: claim.key.clone() };
                let store = self.inner.store.clone();
                let key = claim.key.clone();
                let claimed = tokio::task::spawn_blocking(move || {
                    store.shared().expect("shared").claim_idempotency(&key, IDEMPOTENCY_CLAIM_MS)
                })
                .await
                .map_err(|e| EngineError::Unavailable(e.to_string()))?
                .map_err(|e| EngineError::Unavailable(e.to_string()))?;
                if !claimed {
                    return Err(EngineError::IdempotencyInProgress);
                }
                Some(guard)
            }
            None => None,
        };
        let claim_key = idempotency.as_ref().map(|c| c.key.clone());
        let (reply, answer) = oneshot::channel();
        let job = Job::Write { request, ctx, idempotency, reply };
        let answer = if self.inner.jobs.send(job).is_err() {
            Err(self.unavailable())
        } else {
            answer.await.unwrap_or_else(|_| Err(self.unavailable()))
        };
        if let (Err(EngineError::Unavailable(_)), Some(key)) = (&answer, claim_key) {
            // The batch was rolled back with its release of the claim: release it here.
            let store = self.inner.store.clone();
            tokio::task::spawn_blocking(move || store.shared().expect("shared").release_claim(&key));
        }
        let answer = answer?;
        if let Some((request, evaluated_at_ms)) = &answer.evaluated {
            self.inner.config.observer.written(request, &answer.result.outcome, *evaluated_at_ms);
        }
        Ok(answer.result)
    }

    fn unavailable(&self) -> EngineError {
        EngineError::Unavailable(self.inner.writer.failure().unwrap_or_else(|| "the writer stopped".into()))
    }

    /// Whether the writer is healthy (it stops for good after a storage failure).
    pub fn writer_failure(&self) -> Option<String> {
        self.inner.writer.failure()
    }

    /// Queries the audit log.
    pub fn audit(&self, query: &AuditQuery) -> Result<AuditPage, EngineError> {
        audit::query(&*self.inner.store, self.inner.writer.audit_head_seq(), query)
    }

    /// Verifies the whole audit hash chain.
    pub fn verify_audit(&self) -> Result<AuditVerification, EngineError> {
        audit::verify(&*self.inner.store)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    const LONG: Duration = Duration::from_secs(10);

    #[test]
    fn only_a_multi_threaded_runtime_of_two_workers_or_more_may_be_blocked() {
        assert!(!may_block_a_worker(), "outside a runtime");
        let current = tokio::runtime::Builder::new_current_thread().build().unwrap();
        assert!(!current.block_on(async { may_block_a_worker() }));
        let multi = |workers| tokio::runtime::Builder::new_multi_thread().worker_threads(workers).build().unwrap();
        assert!(!multi(1).block_on(async { may_block_a_worker() }));
        assert!(multi(2).block_on(async { may_block_a_worker() }));
    }

    #[test]
    fn a_lone_write_polls_until_its_answer_arrives() {
        let awaiting = AtomicUsize::new(0);
        let alone = Awaiting::enter(&awaiting);
        assert!(alone.alone);
        let (reply, mut answer) = oneshot::channel();
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            reply.send(7).unwrap();
        });
        let started = Instant::now();
        assert_eq!(poll_answer(&mut answer, &awaiting, LONG), Some(Some(7)));
        assert!(started.elapsed() >= Duration::from_millis(5) && started.elapsed() < LONG);
        writer.join().unwrap();
    }

    #[test]
    fn polling_stops_at_its_limit_when_the_writer_drops_the_request_and_when_another_write_is_sent() {
        let awaiting = AtomicUsize::new(0);
        let first = Awaiting::enter(&awaiting);
        let (_reply, mut answer) = oneshot::channel::<u8>();
        let started = Instant::now();
        assert_eq!(poll_answer(&mut answer, &awaiting, Duration::from_millis(20)), None);
        assert!(started.elapsed() >= Duration::from_millis(20), "gave up after {:?}", started.elapsed());
        assert_eq!(poll_answer(&mut answer, &awaiting, Duration::ZERO), None, "zero: no polling");

        let (reply, mut answer) = oneshot::channel::<u8>();
        drop(reply);
        assert_eq!(poll_answer(&mut answer, &awaiting, LONG), Some(None));

        // Another write is sent while the first polls: the first stops polling at once.
        let (_reply, mut answer) = oneshot::channel::<u8>();
        let started = Instant::now();
        std::thread::scope(|scope| {
            scope.spawn(|| {
                std::thread::sleep(Duration::from_millis(5));
                let second = Awaiting::enter(&awaiting);
                assert!(!second.alone, "the first is still awaiting");
                std::thread::sleep(Duration::from_secs(1));
            });
            assert_eq!(poll_answer(&mut answer, &awaiting, LONG), None);
            assert!(started.elapsed() < Duration::from_secs(5), "polled for {:?}", started.elapsed());
        });
        drop(first);
        assert_eq!(awaiting.load(Ordering::Acquire), 0, "every write that left is no longer counted");
        assert!(Awaiting::enter(&awaiting).alone);
    }

    #[test]
    fn a_first_page_says_whether_more_follow() {
        assert_eq!(first_page(1..=3, 3), (vec![1, 2, 3], false), "exactly the limit: no more");
        assert_eq!(first_page(1..=4, 3), (vec![1, 2, 3], true), "one past it: more");
        assert_eq!(first_page(1..=2, 3), (vec![1, 2], false));
    }
}
