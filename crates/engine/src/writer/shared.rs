//! The writer over a shared backend (several nodes over one PostgreSQL).
//!
//! Each batch is one database transaction: [`SharedStorage::begin`] locks the counter row and
//! the batch's keys and reads them fresh, core applies the requests on the node's replica
//! overlaid with those fresh rows (core reads nothing outside a request's key set), and
//! [`Storage::commit`] writes the delta, the audit events and the revision, and commits. A
//! lost race (serialization failure, deadlock) runs the batch again, a bounded number of
//! times; a database that cannot be reached answers every request of the batch
//! `unavailable`, and the writer carries on: the next batch reconnects.
//!
//! The replica is never updated from a batch directly: after each batch (and whenever asked,
//! or woken by another node's notification) the writer reads the change log from where the
//! replica stands and applies it, so every node sees every node's changes in commit order,
//! and publishes the result as the snapshot readers see.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use gapguard_core::audit::GENESIS;
use gapguard_core::{AuditKind, NsKey, WriteRequest};
use gapguard_store::{LockRequest, SharedStorage, StoreError};
use tokio::sync::oneshot;

use super::{due, Answer, Draft, Job, Writer};
use crate::feed::Change;
use crate::{EngineError, RequestContext, Snapshot};

use crate::MAX_BATCH_ATTEMPTS as MAX_ATTEMPTS;

/// Most expiries the reconciler takes on per batch.
const DUE_PER_BATCH: usize = 256;

/// What a batch's transaction produced, once committed.
struct Done {
    answers: Vec<Option<Result<Answer, EngineError>>>,
    expired: Vec<(WriteRequest, gapguard_core::Outcome)>,
    now_ms: u64,
    n_written: usize,
    /// The batch's own changes, its revision and audit head, for the replica when no other
    /// node committed in between (see `Writer::publish_own`).
    changes: Vec<Change>,
    revision: gapguard_core::Revision,
    audit_seq: u64,
    pruned: bool,
}

impl Writer {
    /// Runs one batch over the shared backend, then syncs the replica, then answers.
    pub(super) fn commit_shared(&mut self, jobs: &mut Vec<Job>, published: &ArcSwap<Snapshot>) {
        let store = self.store.clone();
        let shared = store.shared().expect("a shared backend");
        let mut syncs: Vec<oneshot::Sender<Result<(), EngineError>>> = Vec::new();
        let mut work = Vec::with_capacity(jobs.len());
        for job in jobs.drain(..) {
            match job {
                Job::Sync(reply) => syncs.extend(reply),
                Job::Stop => unreachable!("the run loop strips Stop"),
                other => work.push(other),
            }
        }
        let mut answers: Vec<Option<Result<Answer, EngineError>>> = Vec::new();
        // Whether the replica must be read back from the change log after this batch.
        let mut must_sync = !syncs.is_empty() || work.is_empty();
        if !work.is_empty() {
            let started = Instant::now();
            let mut attempt = 0;
            let result = loop {
                match self.try_batch(&work, shared) {
                    Ok(done) => break Ok(done),
                    Err(StoreError::Conflict(e)) if attempt + 1 < MAX_ATTEMPTS => {
                        shared.rollback();
                        attempt += 1;
                        self.config.observer.storage_retried();
                        tracing::debug!(error = %e, attempt, "batch lost a race; running it again");
                        std::thread::sleep(Duration::from_millis(1 << attempt.min(6)));
                    }
                    Err(e) => {
                        shared.rollback();
                        break Err(e);
                    }
                }
            };
            match result {
                Ok(mut done) => {
                    if std::mem::take(&mut self.shared_failing) {
                        tracing::info!("the shared store is back");
                    }
                    self.config.observer.committed(done.n_written, started.elapsed());
                    for (request, outcome) in &done.expired {
                        self.config.observer.written(request, outcome, done.now_ms);
                    }
                    let published_own = self.publish_own(&mut done, shared.last_changes(), published);
                    must_sync |= done.pruned || (!published_own && !done.changes.is_empty());
                    answers = done.answers;
                }
                Err(e) => {
                    // Once per outage, not once per batch.
                    if !self.shared_failing {
                        tracing::warn!(error = %e, "the shared store failed; requests are answered unavailable until it is back");
                    }
                    self.shared_failing = true;
                    let failure = e.to_string();
                    answers = work.iter().map(|_| Some(Err(EngineError::Unavailable(failure.clone())))).collect();
                    must_sync = true;
                }
            }
        }
        // Publish what is committed (this batch's and every other node's) before answering,
        // so that a read that starts after an answer sees it.
        let synced = match must_sync {
            true => self.sync(shared, published).map_err(|e| EngineError::Unavailable(e.to_string())),
            false => Ok(()),
        };
        for (job, answer) in work.into_iter().zip(answers) {
            if let (Job::Write { reply, .. }, Some(answer)) = (job, answer) {
                let _ = reply.send(answer);
            }
        }
        for reply in syncs {
            let _ = reply.send(match &synced {
                Ok(()) => Ok(()),
                Err(e) => Err(EngineError::Unavailable(e.to_string())),
            });
        }
    }

    /// One attempt at the batch's transaction. On `Err` the caller rolls back.
    fn try_batch(&mut self, work: &[Job], shared: &dyn SharedStorage) -> Result<Done, StoreError> {
        let mut lock = LockRequest::default();
        let mut prune = false;
        for job in work {
            match job {
                Job::Write { request, idempotency, .. } => {
                    lock.keys.extend(request.keys(&self.state));
                    if let WriteRequest::Act(act) = request {
                        lock.tickets.extend(act.ticket.as_ref().map(|t| t.claims().id));
                    }
                    lock.idempotency.extend(idempotency.as_ref().map(|c| c.key.clone()));
                }
                Job::Prune => prune = true,
                _ => {}
            }
        }
        if prune {
            lock.due_limit = DUE_PER_BATCH;
        }
        let locked = shared.begin(&lock)?;
        let now_ms = locked.now_ms;
        if let Some(clock) = &self.db_clock {
            clock.observe(now_ms);
        }
        let mut working = self.state.clone();
        working.revision = locked.revision;
        overlay(&mut working, &lock.keys, locked.entries);
        for id in &lock.tickets {
            working.used_tickets.remove(id);
        }
        for (id, expires) in locked.used_tickets {
            working.used_tickets.insert(id, expires);
        }
        for key in &lock.idempotency {
            working.idempotency.remove(key);
        }
        for (key, record) in locked.idempotency {
            working.idempotency.insert(Arc::new(key), Arc::new(record));
        }
        let due_keys: BTreeSet<NsKey> = locked.due.iter().map(|(k, _)| k.clone()).collect();
        for (key, entry) in locked.due {
            working.entries.insert(Arc::new(key), Arc::new(entry));
        }
        let ctx = || RequestContext { correlation_id: Some("reconciler".into()), api_key_id: None, trace: None };
        let expiries: Vec<WriteRequest> = due_keys
            .iter()
            .filter_map(|key| {
                let op = due(&working, key, now_ms)?;
                Some(WriteRequest::Single { ns: key.ns.clone(), op, kind: AuditKind::Expire })
            })
            .collect();
        // Keys learnt from the rows just read (a reservation names its pool): lock them too.
        // No other writer holds key locks without the counter row, which this one holds.
        let mut more = BTreeSet::new();
        let requests = work.iter().filter_map(|job| match job {
            Job::Write { request, .. } => Some(request),
            _ => None,
        });
        for request in requests.chain(&expiries) {
            for key in request.keys(&working) {
                if !lock.keys.contains(&key) && !due_keys.contains(&key) {
                    more.insert(key);
                }
            }
        }
        if !more.is_empty() {
            let fresh = shared.lock_more(&more)?;
            overlay(&mut working, &more, fresh);
        }

        let (seq, head) = locked.audit_head.unwrap_or((0, GENESIS));
        let mut draft = Draft::new(working, seq, head, work.len());
        let mut answers = Vec::with_capacity(work.len());
        for job in work {
            match job {
                Job::Write { request, ctx, idempotency, .. } => {
                    if let Some(claim) = idempotency {
                        draft.batch.release_claims.push(claim.key.clone());
                    }
                    let answer =
                        self.apply_write(&mut draft, request, ctx.clone(), idempotency.clone(), now_ms).map(|result| {
                            let evaluated = (!result.replayed).then(|| (request.clone(), now_ms));
                            Answer { result, evaluated }
                        });
                    answers.push(Some(answer));
                }
                Job::Audit(event) => {
                    draft.seal(event);
                    answers.push(None);
                }
                _ => answers.push(None),
            }
        }
        let mut expired = Vec::with_capacity(expiries.len());
        for request in expiries {
            let outcome = draft.apply(&request, ctx(), now_ms);
            expired.push((request, outcome));
        }
        draft.batch.revision = draft.working.revision;
        draft.batch.prune_expired = prune;
        let n_written = draft.n_written;
        self.store.commit(draft.batch)?;
        Ok(Done {
            answers,
            expired,
            now_ms,
            n_written,
            changes: draft.changes,
            revision: draft.working.revision,
            audit_seq: draft.seq,
            pruned: prune,
        })
    }

    /// Applies a committed batch's own changes to the replica and publishes it, when the
    /// change log shows that no other node logged a change between the replica's cursor and
    /// this batch (`logged`: the positions the batch took). Saves reading back what the writer
    /// already knows. A batch that also pruned (its forgotten keys are known only to the
    /// database) or that logged nothing is left to [`Writer::sync`]. Returns whether it
    /// published.
    fn publish_own(&mut self, done: &mut Done, logged: Option<(u64, u64)>, published: &ArcSwap<Snapshot>) -> bool {
        let Some((first, last)) = logged else { return false };
        if done.pruned || first != self.cursor + 1 || done.changes.is_empty() {
            return false;
        }
        let changes = std::mem::take(&mut done.changes);
        for change in &changes {
            self.state.entries.insert(change.key.clone(), change.entry.clone());
        }
        self.state.revision = self.state.revision.max(done.revision);
        self.cursor = last;
        self.status.audit_head_seq.fetch_max(done.audit_seq, std::sync::atomic::Ordering::AcqRel);
        published.store(Arc::new(self.state.clone()));
        self.feed.publish(changes);
        true
    }

    /// Brings the replica up to date with the shared backend's change log and publishes it.
    fn sync(&mut self, shared: &dyn SharedStorage, published: &ArcSwap<Snapshot>) -> Result<(), StoreError> {
        let changes = match shared.changes_since(self.cursor) {
            Ok(changes) => changes,
            Err(StoreError::Invalid(why)) => {
                tracing::warn!(%why, "this node fell behind the change log; reloading the whole state");
                let recovered = self.store.recover()?;
                let mut state = Snapshot { revision: recovered.revision, ..Snapshot::default() };
                state.entries = recovered.entries.into_iter().map(|(k, e)| (Arc::new(k), Arc::new(e))).collect();
                self.cursor = recovered.cursor;
                self.state = state;
                // The changes skipped are not in the feed: its watchers must know. Reset before
                // the state is published, so that a watch from the new state's revision is
                // never told `compacted`.
                self.feed.reset(self.state.revision);
                published.store(Arc::new(self.state.clone()));
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if let Some(clock) = &self.db_clock {
            clock.observe(changes.now_ms);
        }
        self.status.audit_head_seq.fetch_max(changes.audit_seq, std::sync::atomic::Ordering::AcqRel);
        if changes.cursor == self.cursor && changes.revision <= self.state.revision {
            return Ok(());
        }
        let mut feed = Vec::with_capacity(changes.changes.len());
        for (revision, key, entry) in changes.changes {
            match entry {
                Some(entry) => {
                    let (key, entry) = (Arc::new(key), Arc::new(entry));
                    feed.push(Change::new(revision, key.clone(), entry.clone()));
                    self.state.entries.insert(key, entry);
                }
                None => {
                    self.state.entries.remove(&key);
                }
            }
        }
        self.state.revision = self.state.revision.max(changes.revision);
        self.cursor = changes.cursor;
        published.store(Arc::new(self.state.clone()));
        self.feed.publish(feed);
        Ok(())
    }
}

/// Puts freshly read rows over the replica: each requested key gets its row, or goes if the
/// database has none (another node forgot it).
fn overlay(
    working: &mut Snapshot,
    keys: &BTreeSet<NsKey>,
    mut fresh: std::collections::BTreeMap<NsKey, gapguard_core::Entry>,
) {
    for key in keys {
        match fresh.remove(key) {
            Some(entry) => {
                working.entries.insert(Arc::new(key.clone()), Arc::new(entry));
            }
            None => {
                working.entries.remove(key);
            }
        }
    }
}
