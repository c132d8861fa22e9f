//! The single writer: batches concurrent write requests into one storage transaction (group
//! commit), publishes the new snapshot once it is durable, then answers every request in it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;
use gapguard_core::audit::{seal, GENESIS};
use gapguard_core::primitives::{
    self, deadline_of, lifecycle, retention, retention_of, Lease, Lifecycle, Reservation, ReservationState,
};
use gapguard_core::{
    idempotency, AuditEvent, AuditKind, IdempotencyDecision, IdempotencyRecord, Meta, NsKey, Op, Outcome, WriteRequest,
};
use gapguard_store::{Batch, IdempotencyKey, Recovered, Storage};
use tokio::sync::{mpsc, oneshot};

mod shared;

use crate::clock::DbClock;
use crate::feed::{Change, Feed};
use crate::{Clock, EngineConfig, EngineError, IdempotencyClaim, RequestContext, Snapshot, WriteResult};

/// The writer's answer to one write request.
pub(crate) struct Answer {
    /// What the caller gets.
    pub result: WriteResult,
    /// The request and when it was evaluated, handed back so that the caller's task (not the
    /// writer) reports it to the observer; `None` for a replay.
    pub evaluated: Option<(WriteRequest, u64)>,
}

/// Work for the writer.
pub(crate) enum Job {
    /// A write request to apply and answer.
    Write {
        request: WriteRequest,
        ctx: RequestContext,
        idempotency: Option<IdempotencyClaim>,
        reply: oneshot::Sender<Result<Answer, EngineError>>,
    },
    /// An audit event with no state change (a denied check), recorded with the next commit.
    Audit(AuditEvent),
    /// Drop expired used-ticket markers and idempotency records.
    Prune,
    /// Bring the node's replica up to date with a shared backend, then answer (a read that
    /// must see every write any node acknowledged before it began); `None`: just sync (another
    /// node committed something).
    Sync(Option<oneshot::Sender<Result<(), EngineError>>>),
    /// Finish the jobs before this one and exit (the engine is being dropped).
    Stop,
}

/// What the rest of the engine may read about the writer.
#[derive(Clone, Default)]
pub(crate) struct Status {
    failure: Arc<Mutex<Option<String>>>,
    /// Set with `failure`, read without its lock: every check asks.
    failed: Arc<std::sync::atomic::AtomicBool>,
    audit_head_seq: Arc<AtomicU64>,
}

impl Status {
    pub(crate) fn failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.failure.lock().expect("status lock").clone()
    }
    /// Sequence number of the last durable audit event.
    pub(crate) fn audit_head_seq(&self) -> u64 {
        self.audit_head_seq.load(Ordering::Acquire)
    }
}

pub(crate) struct Writer {
    state: Snapshot,
    audit_seq: u64,
    audit_head: [u8; 32],
    /// Expiry index of used-ticket markers and idempotency records, for pruning in order.
    ticket_expiry: BTreeSet<(u64, [u8; 16])>,
    idempotency_expiry: BTreeSet<(u64, IdempotencyKey)>,
    /// Deadlines of held reservations and leases, for the reconciler (stale ones are skipped).
    deadlines: BTreeSet<(u64, Arc<NsKey>)>,
    /// When entries may be forgotten: `(at_ms, key, changed_at)`; the entry must still be the
    /// one indexed (same `changed_at`) and still forgettable then.
    compaction: BTreeSet<(u64, Arc<NsKey>, u64)>,
    feed: Arc<Feed>,
    store: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    status: Status,
    /// A shared backend: where this node's replica stands in its change log, and the clock
    /// that follows the database's.
    cursor: u64,
    db_clock: Option<Arc<DbClock>>,
    /// Whether the last shared batch failed (to log an outage once).
    shared_failing: bool,
}

type Reply = (oneshot::Sender<Result<Answer, EngineError>>, Result<Answer, EngineError>);

impl Writer {
    pub(crate) fn new(
        recovered: Recovered,
        store: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
        feed: Arc<Feed>,
        db_clock: Option<Arc<DbClock>>,
    ) -> (Snapshot, Self) {
        let cursor = recovered.cursor;
        let mut state = Snapshot { revision: recovered.revision, ..Snapshot::default() };
        let mut ticket_expiry = BTreeSet::new();
        let mut idempotency_expiry = BTreeSet::new();
        let entries = Batch::share_entries(recovered.entries);
        let deadlines = entries.iter().filter_map(|(k, e)| deadline_of(k, e).map(|d| (d, k.clone()))).collect();
        // When they were resolved is not stored: retention counts from this start.
        let started_ms = clock.now_ms();
        let compaction = entries
            .iter()
            .filter_map(|(k, e)| retention_of(k, e, &config.limits).map(|r| (started_ms + r, k.clone(), e.changed_at)))
            .collect();
        state.entries = entries.into_iter().collect();
        for (id, expires) in recovered.used_tickets {
            state.used_tickets.insert(id, expires);
            ticket_expiry.insert((expires, id));
        }
        for (key, record) in recovered.idempotency {
            idempotency_expiry.insert((record.expires_at_ms, key.clone()));
            state.idempotency.insert(Arc::new(key), Arc::new(record));
        }
        let (audit_seq, audit_head) = recovered.audit_head.unwrap_or((0, GENESIS));
        let status = Status::default();
        status.audit_head_seq.store(audit_seq, Ordering::Release);
        let writer = Self {
            state: state.clone(),
            audit_seq,
            audit_head,
            ticket_expiry,
            idempotency_expiry,
            deadlines,
            compaction,
            feed,
            store,
            clock,
            config,
            status,
            cursor,
            db_clock,
            shared_failing: false,
        };
        (state, writer)
    }

    pub(crate) fn status(&self) -> Status {
        self.status.clone()
    }

    /// Runs until every sender is gone, or a storage failure stops it.
    pub(crate) fn run(mut self, mut jobs: mpsc::UnboundedReceiver<Job>, published: Arc<ArcSwap<Snapshot>>) {
        let mut batch_jobs = Vec::with_capacity(self.config.max_batch);
        let mut stopping = false;
        // Only a lone request polls: see `EngineConfig::spin_before_sleep`.
        let mut spin = self.config.spin_before_sleep;
        // The size of the last batch: the next one may wait to be as large (`batch_linger`).
        let mut last_len = 0;
        while let Some(first) = next_job(&mut jobs, spin) {
            batch_jobs.push(first);
            let target = match last_len {
                0 | 1 => 0,
                n => n.min(BATCH_LINGER_TARGET_MAX).min(self.config.max_batch),
            };
            gather(&mut jobs, &mut batch_jobs, self.config.max_batch, target, self.config.batch_linger);
            last_len = batch_jobs.len();
            spin = match batch_jobs.len() {
                1 => self.config.spin_before_sleep,
                _ => std::time::Duration::ZERO,
            };
            if let Some(at) = batch_jobs.iter().position(|job| matches!(job, Job::Stop)) {
                batch_jobs.truncate(at);
                stopping = true;
            }
            if self.db_clock.is_some() {
                // A shared backend: a failed transaction was rolled back, so the node answers
                // `unavailable` and carries on (the database may come back).
                self.commit_shared(&mut batch_jobs, &published);
                if stopping {
                    return;
                }
                continue;
            }
            if let Err(failure) = self.commit_batch(&mut batch_jobs, &published) {
                tracing::error!(error = %failure, "storage commit failed; the writer stops, restart to recover");
                *self.status.failure.lock().expect("status lock") = Some(failure.clone());
                self.status.failed.store(true, Ordering::Release);
                // Fail everything still queued; the channel closes when `jobs` drops.
                jobs.close();
                while let Ok(job) = jobs.try_recv() {
                    if let Job::Write { reply, .. } = job {
                        let _ = reply.send(Err(EngineError::Unavailable(failure.clone())));
                    }
                }
                return;
            }
            if stopping {
                return;
            }
        }
    }

    /// Applies a batch on a copy of the state, commits it, and only then publishes and replies.
    /// On a storage error nothing is published and every request in the batch is failed: a
    /// failed fsync leaves the file's state unknown, so the writer stops rather than guess.
    fn commit_batch(&mut self, jobs: &mut Vec<Job>, published: &ArcSwap<Snapshot>) -> Result<(), String> {
        let now_ms = self.clock.now_ms();
        let mut draft = Draft::new(self.state.clone(), self.audit_seq, self.audit_head, jobs.len());
        let mut replies: Vec<Reply> = Vec::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            match job {
                Job::Write { request, ctx, idempotency: claim, reply } => {
                    let answer = self.apply_write(&mut draft, &request, ctx, claim, now_ms).map(|result| {
                        let evaluated = (!result.replayed).then_some((request, now_ms));
                        Answer { result, evaluated }
                    });
                    replies.push((reply, answer));
                }
                Job::Audit(event) => draft.seal(&event),
                Job::Prune => self.prune(now_ms, &mut draft),
                Job::Sync(reply) => {
                    // One writer: the published snapshot is the whole truth already.
                    if let Some(reply) = reply {
                        let _ = reply.send(Ok(()));
                    }
                }
                Job::Stop => unreachable!("the run loop strips Stop"),
            }
        }
        let batch = &draft.batch;
        let nothing_to_write = batch.audit.is_empty()
            && batch.prune_tickets.is_empty()
            && batch.prune_idempotency.is_empty()
            && batch.forget_entries.is_empty()
            && batch.idempotency.is_empty();
        if nothing_to_write {
            // Only replays and conflicts: they read durable state, so answer at once.
            for (reply, result) in replies {
                let _ = reply.send(result);
            }
            return Ok(());
        }
        assert!(draft.working.revision >= self.state.revision, "revisions never go back");
        draft.batch.revision = draft.working.revision;
        let started = Instant::now();
        if let Err(e) = self.store.commit(draft.batch) {
            let failure = e.to_string();
            for (reply, _) in replies {
                let _ = reply.send(Err(EngineError::Unavailable(failure.clone())));
            }
            return Err(failure);
        }
        let observer = &self.config.observer;
        observer.committed(draft.n_written, started.elapsed());
        // Durable: publish, then answer, so that a reader that starts after an answer sees it.
        self.audit_seq = draft.seq;
        self.audit_head = draft.head;
        self.status.audit_head_seq.store(draft.seq, Ordering::Release);
        self.ticket_expiry.extend(draft.ticket_expiry);
        self.idempotency_expiry.extend(draft.idempotency_expiry);
        self.deadlines.extend(draft.deadlines);
        for (life, key, changed_at) in draft.forgettable {
            if let Some(kept_ms) = retention(life, &self.config.limits) {
                self.compaction.insert((now_ms.saturating_add(kept_ms), key, changed_at));
            }
        }
        self.state = draft.working;
        published.store(Arc::new(self.state.clone()));
        self.feed.publish(draft.changes);
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        // Requests' own writes are reported by their callers' tasks (see `Answer`): only the
        // reconciler's are reported here, off the requests' path.
        for (request, outcome) in &draft.expired {
            observer.written(request, outcome, now_ms);
        }
        Ok(())
    }

    /// Applies one write request to the draft, with its idempotency claim: a replay or a
    /// conflict of a stored record, or the request's outcome (recorded under the claim).
    fn apply_write(
        &self,
        draft: &mut Draft,
        request: &WriteRequest,
        ctx: RequestContext,
        claim: Option<IdempotencyClaim>,
        now_ms: u64,
    ) -> Result<WriteResult, EngineError> {
        if let Some(claim) = &claim {
            let stored = draft.working.idempotency.get(&claim.key).map(|r| &**r);
            match idempotency::decide(stored, &claim.fingerprint, now_ms) {
                IdempotencyDecision::Replay(outcome) => {
                    self.config.observer.replayed();
                    return Ok(WriteResult { outcome: outcome.clone(), replayed: true });
                }
                IdempotencyDecision::Conflict => {
                    self.config.observer.idempotency_conflict();
                    return Err(EngineError::IdempotencyConflict);
                }
                IdempotencyDecision::Execute => {}
            }
        }
        let outcome = draft.apply(request, ctx, now_ms);
        if let Some(claim) = claim {
            let record = IdempotencyRecord {
                fingerprint: claim.fingerprint,
                outcome: outcome.clone(),
                expires_at_ms: now_ms.saturating_add(self.config.limits.idempotency_retention_ms),
            };
            draft.idempotency_expiry.push((record.expires_at_ms, claim.key.clone()));
            draft.batch.idempotency.push((claim.key.clone(), record.clone()));
            draft.working.idempotency.insert(Arc::new(claim.key), Arc::new(record));
        }
        Ok(WriteResult { outcome, replayed: false })
    }

    fn prune(&mut self, now_ms: u64, draft: &mut Draft) {
        while let Some(&(expires, id)) = self.ticket_expiry.first() {
            if expires > now_ms {
                break;
            }
            self.ticket_expiry.pop_first();
            if draft.working.used_tickets.get(&id) == Some(&expires) {
                draft.working.used_tickets.remove(&id);
                draft.batch.prune_tickets.push(id);
            }
        }
        while let Some((expires, _)) = self.idempotency_expiry.first() {
            if *expires > now_ms {
                break;
            }
            let (expires, key) = self.idempotency_expiry.pop_first().expect("first exists");
            // A newer record under the same key (after expiry) has a later expiry; keep it.
            if draft.working.idempotency.get(&key).is_some_and(|r| r.expires_at_ms == expires) {
                draft.working.idempotency.remove(&key);
                draft.batch.prune_idempotency.push(key);
            }
        }
        // Compaction: old tombstones and resolved reservations and orphans are forgotten.
        while let Some((at_ms, _, _)) = self.compaction.first() {
            if *at_ms > now_ms {
                break;
            }
            let (_, key, changed_at) = self.compaction.pop_first().expect("first exists");
            let still =
                draft.working.entries.get(&key).is_some_and(|e| {
                    e.changed_at == changed_at && retention_of(&key, e, &self.config.limits).is_some()
                });
            if still {
                draft.working.entries.remove(&key);
                draft.batch.forget_entries.push(Arc::unwrap_or_clone(key));
            }
        }
        // The reconciler: every reservation or lease whose deadline passed while held is
        // expired by its own request (its own revision, audit event and orphan).
        while let Some((deadline, _)) = self.deadlines.first() {
            if *deadline > now_ms {
                break;
            }
            let (_, key) = self.deadlines.pop_first().expect("first exists");
            let Some(op) = due(&draft.working, &key, now_ms) else { continue };
            let ctx = RequestContext { correlation_id: Some("reconciler".into()), api_key_id: None, trace: None };
            let request = WriteRequest::Single { ns: key.ns.clone(), op, kind: AuditKind::Expire };
            let outcome = draft.apply(&request, ctx, now_ms);
            draft.expired.push((request, outcome));
        }
    }
}

/// The largest batch size a batch waits for ([`EngineConfig::batch_linger`]): the cost of a
/// batch is shared by its requests, so one more request saves much in a small batch and
/// little in a large one, where waiting for it only burns CPU (puts at 64 connections, whose
/// batches hold 15 to 20, were 10 % slower waiting for the last batch's size).
pub const BATCH_LINGER_TARGET_MAX: usize = 8;

/// Takes the queued jobs into `batch`, up to `max` in all; then, while it holds fewer than
/// `target`, polls for more until `linger` has passed since the queue first ran dry (the
/// clock is read only then: a batch that needs no wait costs no clock read).
fn gather(
    jobs: &mut mpsc::UnboundedReceiver<Job>,
    batch: &mut Vec<Job>,
    max: usize,
    target: usize,
    linger: std::time::Duration,
) {
    let mut dry_since = None;
    while batch.len() < max {
        match jobs.try_recv() {
            Ok(job) => batch.push(job),
            Err(mpsc::error::TryRecvError::Empty)
                if batch.len() < target && dry_since.get_or_insert_with(Instant::now).elapsed() < linger =>
            {
                std::hint::spin_loop();
            }
            Err(_) => return,
        }
    }
}

/// The next job: polled for `spin` (see [`EngineConfig::spin_before_sleep`]), then waited
/// for; `None` once every sender is gone.
fn next_job(jobs: &mut mpsc::UnboundedReceiver<Job>, spin: std::time::Duration) -> Option<Job> {
    let started = Instant::now();
    loop {
        match jobs.try_recv() {
            Ok(job) => return Some(job),
            Err(mpsc::error::TryRecvError::Disconnected) => return None,
            Err(mpsc::error::TryRecvError::Empty) if started.elapsed() < spin => {
                std::hint::spin_loop();
            }
            Err(mpsc::error::TryRecvError::Empty) => return jobs.blocking_recv(),
        }
    }
}

/// The expiry op for a reservation or lease that is still held past its deadline, if it is.
fn due(state: &Snapshot, key: &NsKey, now_ms: u64) -> Option<Op> {
    let entry = state.entries.get(key).map(|e| &**e);
    let name = key.key.strip_prefix(primitives::INTERNAL)?;
    if let Some(id) = name.strip_prefix("rsv/") {
        let r: Reservation = primitives::decode(key, entry)?;
        (r.state == ReservationState::Held && now_ms >= r.expires_at_ms)
            .then(|| Op::ExpireReservation { reservation: id.to_owned() })
    } else if let Some(lease_name) = name.strip_prefix("lease/") {
        let lease: Lease = primitives::decode(key, entry)?;
        (lease.holder.is_some() && now_ms >= lease.expires_at_ms)
            .then(|| Op::ExpireLease { name: lease_name.to_owned() })
    } else {
        None
    }
}

/// A batch being built: the state after its requests, what to persist, and what to index
/// and publish once it is durable.
struct Draft {
    working: Snapshot,
    batch: Batch,
    seq: u64,
    head: [u8; 32],
    ticket_expiry: Vec<(u64, [u8; 16])>,
    idempotency_expiry: Vec<(u64, IdempotencyKey)>,
    deadlines: Vec<(u64, Arc<NsKey>)>,
    changes: Vec<Change>,
    /// Write requests applied in the batch.
    n_written: usize,
    /// Changed entries that may be forgotten after a retention: `(lifecycle, key, changed_at)`.
    forgettable: Vec<(Lifecycle, Arc<NsKey>, u64)>,
    /// The reconciler's expiries and their outcomes, for the observer once the batch is durable.
    expired: Vec<(WriteRequest, Outcome)>,
}

impl Draft {
    /// A draft for a batch of `jobs` jobs: most write one entry and seal one event each, so
    /// the lists of those are sized for them once rather than grown push by push.
    fn new(working: Snapshot, seq: u64, head: [u8; 32], jobs: usize) -> Self {
        let batch = Batch { entries: Vec::with_capacity(jobs), audit: Vec::with_capacity(jobs), ..Batch::default() };
        Self {
            working,
            batch,
            seq,
            head,
            ticket_expiry: Vec::new(),
            idempotency_expiry: Vec::new(),
            deadlines: Vec::new(),
            changes: Vec::with_capacity(jobs),
            n_written: 0,
            forgettable: Vec::new(),
            expired: Vec::new(),
        }
    }

    fn seal(&mut self, event: &AuditEvent) {
        self.seq += 1;
        let sealed = seal(self.seq, &self.head, event);
        self.head = sealed.hash;
        self.batch.audit.push(sealed);
    }

    /// Applies one request on the working state and records everything it produced.
    fn apply(&mut self, request: &WriteRequest, ctx: RequestContext, now_ms: u64) -> Outcome {
        let meta = Meta {
            now_ms,
            revision: self.working.revision + 1,
            correlation_id: ctx.correlation_id,
            api_key_id: ctx.api_key_id,
        };
        let applied = gapguard_core::apply(&self.working, request, &meta);
        if applied.committed {
            assert!(meta.revision > self.working.revision, "revisions strictly increase");
            self.working.revision = meta.revision;
        }
        for (key, entry) in applied.changes {
            // One allocation each, shared by the state, the batch and the change feed.
            let (key, entry) = (Arc::new(key), Arc::new(entry));
            match lifecycle(&key, &entry) {
                Lifecycle::Deadline(at_ms) => self.deadlines.push((at_ms, key.clone())),
                Lifecycle::Nothing => {}
                life => self.forgettable.push((life, key.clone(), entry.changed_at)),
            }
            self.changes.push(Change::new(meta.revision, key.clone(), entry.clone()));
            self.batch.entries.push((key.clone(), entry.clone()));
            self.working.entries.insert(key, entry);
        }
        if let Some((id, expires)) = applied.used_ticket {
            let fresh = self.working.used_tickets.insert(id, expires).is_none();
            assert!(fresh, "a ticket must serve at most one act");
            self.batch.used_tickets.push((id, expires));
            self.ticket_expiry.push((expires, id));
        }
        self.seal(&applied.audit);
        self.n_written += 1;
        applied.outcome
    }
}
