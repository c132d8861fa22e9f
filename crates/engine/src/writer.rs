//! The single writer: batches concurrent write requests into one storage transaction (group
//! commit), publishes the new snapshot once it is durable, then answers every request in it.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use gapguard_core::audit::{seal, GENESIS};
use gapguard_core::{idempotency, AuditEvent, IdempotencyDecision, IdempotencyRecord, Meta, WriteRequest};
use gapguard_store::{Batch, IdempotencyKey, Recovered, Storage};
use tokio::sync::{mpsc, oneshot};

use crate::{Clock, EngineConfig, EngineError, IdempotencyClaim, RequestContext, Snapshot, WriteResult};

/// Work for the writer.
pub(crate) enum Job {
    /// A write request to apply and answer.
    Write {
        request: WriteRequest,
        ctx: RequestContext,
        idempotency: Option<IdempotencyClaim>,
        reply: oneshot::Sender<Result<WriteResult, EngineError>>,
    },
    /// An audit event with no state change (a denied check), recorded with the next commit.
    Audit(AuditEvent),
    /// Drop expired used-ticket markers and idempotency records.
    Prune,
    /// Finish the jobs before this one and exit (the engine is being dropped).
    Stop,
}

/// What the rest of the engine may read about the writer.
#[derive(Clone, Default)]
pub(crate) struct Status {
    failure: Arc<Mutex<Option<String>>>,
    audit_head_seq: Arc<AtomicU64>,
}

impl Status {
    pub(crate) fn failure(&self) -> Option<String> {
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
    store: Arc<dyn Storage>,
    clock: Arc<dyn Clock>,
    config: EngineConfig,
    status: Status,
}

type Reply = (oneshot::Sender<Result<WriteResult, EngineError>>, Result<WriteResult, EngineError>);

impl Writer {
    pub(crate) fn new(
        recovered: Recovered,
        store: Arc<dyn Storage>,
        clock: Arc<dyn Clock>,
        config: EngineConfig,
    ) -> (Snapshot, Self) {
        let mut state = Snapshot { revision: recovered.revision, ..Snapshot::default() };
        let mut ticket_expiry = BTreeSet::new();
        let mut idempotency_expiry = BTreeSet::new();
        state.entries = recovered.entries.into_iter().collect();
        for (id, expires) in recovered.used_tickets {
            state.used_tickets.insert(id, expires);
            ticket_expiry.insert((expires, id));
        }
        for (key, record) in recovered.idempotency {
            idempotency_expiry.insert((record.expires_at_ms, key.clone()));
            state.idempotency.insert(key, Arc::new(record));
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
            store,
            clock,
            config,
            status,
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
        while let Some(first) = jobs.blocking_recv() {
            batch_jobs.push(first);
            while batch_jobs.len() < self.config.max_batch {
                match jobs.try_recv() {
                    Ok(job) => batch_jobs.push(job),
                    Err(_) => break,
                }
            }
            if let Some(at) = batch_jobs.iter().position(|job| matches!(job, Job::Stop)) {
                batch_jobs.truncate(at);
                stopping = true;
            }
            if let Err(failure) = self.commit_batch(&mut batch_jobs, &published) {
                tracing::error!(error = %failure, "storage commit failed; the writer stops, restart to recover");
                *self.status.failure.lock().expect("status lock") = Some(failure.clone());
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
        let mut working = self.state.clone();
        let mut batch = Batch::default();
        let mut replies: Vec<Reply> = Vec::with_capacity(jobs.len());
        let (mut seq, mut head) = (self.audit_seq, self.audit_head);
        let mut seal_event = |batch: &mut Batch, event: &AuditEvent| {
            seq += 1;
            let sealed = seal(seq, &head, event);
            head = sealed.hash;
            batch.audit.push(sealed);
        };
        let mut new_ticket_expiry = Vec::new();
        let mut new_idempotency_expiry = Vec::new();
        for job in jobs.drain(..) {
            match job {
                Job::Write { request, ctx, idempotency: claim, reply } => {
                    if let Some(claim) = &claim {
                        let stored = working.idempotency.get(&claim.key).map(|r| &**r);
                        match idempotency::decide(stored, &claim.fingerprint, now_ms) {
                            IdempotencyDecision::Replay(outcome) => {
                                let result = WriteResult { outcome: outcome.clone(), replayed: true };
                                replies.push((reply, Ok(result)));
                                continue;
                            }
                            IdempotencyDecision::Conflict => {
                                replies.push((reply, Err(EngineError::IdempotencyConflict)));
                                continue;
                            }
                            IdempotencyDecision::Execute => {}
                        }
                    }
                    let meta = Meta {
                        now_ms,
                        revision: working.revision + 1,
                        correlation_id: ctx.correlation_id,
                        api_key_id: ctx.api_key_id,
                    };
                    let applied = gapguard_core::apply(&working, &request, &meta);
                    if applied.committed {
                        working.revision = meta.revision;
                    }
                    for (key, entry) in applied.changes {
                        batch.entries.push((key.clone(), entry.clone()));
                        working.entries.insert(key, entry);
                    }
                    if let Some((id, expires)) = applied.used_ticket {
                        let fresh = working.used_tickets.insert(id, expires).is_none();
                        assert!(fresh, "a ticket must serve at most one act");
                        batch.used_tickets.push((id, expires));
                        new_ticket_expiry.push((expires, id));
                    }
                    seal_event(&mut batch, &applied.audit);
                    if let Some(claim) = claim {
                        let record = IdempotencyRecord {
                            fingerprint: claim.fingerprint,
                            outcome: applied.outcome.clone(),
                            expires_at_ms: now_ms.saturating_add(self.config.limits.idempotency_retention_ms),
                        };
                        new_idempotency_expiry.push((record.expires_at_ms, claim.key.clone()));
                        batch.idempotency.push((claim.key.clone(), record.clone()));
                        working.idempotency.insert(claim.key, Arc::new(record));
                    }
                    replies.push((reply, Ok(WriteResult { outcome: applied.outcome, replayed: false })));
                }
                Job::Audit(event) => seal_event(&mut batch, &event),
                Job::Prune => self.prune(now_ms, &mut working, &mut batch),
                Job::Stop => unreachable!("the run loop strips Stop"),
            }
        }
        let nothing_to_write = batch.audit.is_empty()
            && batch.prune_tickets.is_empty()
            && batch.prune_idempotency.is_empty()
            && batch.idempotency.is_empty();
        if nothing_to_write {
            // Only replays and conflicts: they read durable state, so answer at once.
            for (reply, result) in replies {
                let _ = reply.send(result);
            }
            return Ok(());
        }
        assert!(working.revision >= self.state.revision, "revisions never go back");
        batch.revision = working.revision;
        if let Err(e) = self.store.commit(batch) {
            let failure = e.to_string();
            for (reply, _) in replies {
                let _ = reply.send(Err(EngineError::Unavailable(failure.clone())));
            }
            return Err(failure);
        }
        // Durable: publish, then answer, so that a reader that starts after an answer sees it.
        self.audit_seq = seq;
        self.audit_head = head;
        self.status.audit_head_seq.store(seq, Ordering::Release);
        self.ticket_expiry.extend(new_ticket_expiry);
        self.idempotency_expiry.extend(new_idempotency_expiry);
        self.state = working;
        published.store(Arc::new(self.state.clone()));
        for (reply, result) in replies {
            let _ = reply.send(result);
        }
        Ok(())
    }

    fn prune(&mut self, now_ms: u64, working: &mut Snapshot, batch: &mut Batch) {
        while let Some(&(expires, id)) = self.ticket_expiry.first() {
            if expires > now_ms {
                break;
            }
            self.ticket_expiry.pop_first();
            if working.used_tickets.get(&id) == Some(&expires) {
                working.used_tickets.remove(&id);
                batch.prune_tickets.push(id);
            }
        }
        while let Some((expires, _)) = self.idempotency_expiry.first() {
            if *expires > now_ms {
                break;
            }
            let (expires, key) = self.idempotency_expiry.pop_first().expect("first exists");
            // A newer record under the same key (after expiry) has a later expiry; keep it.
            if working.idempotency.get(&key).is_some_and(|r| r.expires_at_ms == expires) {
                working.idempotency.remove(&key);
                batch.prune_idempotency.push(key);
            }
        }
    }
}
