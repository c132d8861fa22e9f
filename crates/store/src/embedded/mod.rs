//! The embedded backend: a write-ahead log for durability, checkpointed into one redb file.
//!
//! [`Storage::commit`] appends the batch to the log as one record and fsyncs it: one write and
//! one `fdatasync` per batch, whatever its size. A checkpointer thread folds logged batches into
//! the redb file every [`CHECKPOINT_INTERVAL`] in one redb transaction (durable before the log
//! segments it covers are deleted), so the file holds the state, the audit chain, used-ticket
//! markers and idempotency records, and start-up reads the file and replays the log after it.
//!
//! Why not one redb transaction per batch: redb's commit costs about 230 µs plus 19 µs per
//! written row on this class of machine (measured; most of it page copy-on-write and checksums,
//! not the fsync), which caps group commit far below the throughput we aim for. A logged batch
//! costs one fsync plus its encoding.

mod codec;
mod wal;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use gapguard_core::{Entry, IdempotencyRecord, NsKey, SealedEvent, TicketId};
use redb::{Database, Durability, ReadableTable, TableDefinition};

use crate::{Batch, IdempotencyKey, Recovered, Storage, StoreError};
use wal::{SegmentState, Wal};

/// How often logged batches are folded into the redb file. Each checkpoint is a redb commit
/// whose fsyncs share the disk with the log's: once a second rather than five times took
/// reserve→commit pairs at 16 connections from 8.6–8.8k to 9.2k/s and check→act's p99 from
/// 3.9–5.0 to 3.2–4.1 ms (alternated runs). Start-up replays at most this much log.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_millis(1000);

/// `(namespace, key)` → JSON of [`Entry`].
const ENTRIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entries");
/// Audit events in chunks (one row per chunk of up to [`AUDIT_CHUNK_EVENTS`]): the first
/// event's sequence number → for each event, `[seq: u64][hash: 32 bytes][len: u32][body]`.
/// A row per event cost the checkpointer about 10 µs each; a chunk costs about the same.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit_chunks");
/// Most events in one audit chunk.
const AUDIT_CHUNK_EVENTS: usize = 256;
/// Ticket id → the ticket's expiry (ms).
const USED_TICKETS: TableDefinition<&[u8], u64> = TableDefinition::new("used_tickets");
/// `(namespace, scope, key)` → JSON of [`IdempotencyRecord`].
const IDEMPOTENCY: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("idempotency");
/// Named singletons: `revision` and `checkpoint_lsn` (u64 LE), `ticket_key`, `format`.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The on-disk format this code writes; a file with another is refused.
const FORMAT: &[u8] = b"gapguard-embedded-3";

fn engine<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Engine(e.to_string())
}

fn corrupt(what: &'static str) -> impl Fn(serde_json::Error) -> StoreError {
    move |e| StoreError::Corrupt { what, detail: e.to_string() }
}

/// Batches durable in the log but not yet in the redb file, oldest first.
type Pending = VecDeque<(u64, Arc<Batch>)>;

/// What the log appender checks each batch against.
struct Appender {
    wal: Wal,
    revision: u64,
    next_audit_seq: u64,
}

struct Shared {
    db: Database,
    wal_dir: PathBuf,
    appender: Mutex<Appender>,
    pending: Mutex<Pending>,
    /// Readers that combine `pending` with the file hold it shared; a checkpoint holds it
    /// exclusively while it moves batches from one to the other.
    checkpoint: RwLock<()>,
    /// Held by a checkpoint from start to end: the periodic one and [`EmbeddedStore::checkpoint`]
    /// never run together (only one thread at a time retires log segments and makes spares).
    checkpointing: Mutex<()>,
    /// The open log segment, as the checkpointer needs to know it ([`Wal::prepare_spare`]).
    segments: Arc<SegmentState>,
    stop: Mutex<bool>,
    wake: Condvar,
    /// Set when a checkpoint failed: the store refuses further commits.
    failure: Mutex<Option<String>>,
}

/// The embedded backend: a write-ahead log in `DIR/wal/` over one redb file `DIR/gapguard.redb`.
pub struct EmbeddedStore {
    shared: Arc<Shared>,
    checkpointer: Option<JoinHandle<()>>,
}

fn u64_meta(meta: &impl ReadableTable<&'static str, &'static [u8]>, name: &str) -> Result<u64, StoreError> {
    match meta.get(name).map_err(engine)? {
        None => Ok(0),
        Some(v) => {
            let bytes: [u8; 8] = v
                .value()
                .try_into()
                .map_err(|_| StoreError::Corrupt { what: "meta", detail: format!("{name} is not 8 bytes") })?;
            Ok(u64::from_le_bytes(bytes))
        }
    }
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, fsyncing every commit.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, true)
    }

    /// Opens the store; with `fsync == false` commits are not fsynced (faster, and a crash of
    /// the machine may lose acknowledged writes: only for users who configured it explicitly).
    pub fn open_with(dir: &Path, fsync: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Engine(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("gapguard.redb");
        // redb asserts some of what it reads of the file (a file shorter than its header says
        // panics): a damaged file is an error to report, not a crash. The panic hook is
        // silenced meanwhile, so that the error alone is printed (the store opens once, at
        // start, before the server runs anything else).
        let hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let opened = std::panic::catch_unwind(|| Database::create(&path));
        std::panic::set_hook(hook);
        let opened = opened.map_err(|panic| {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a check of its format failed".into());
            StoreError::Engine(format!(
                "cannot open {}: the file is damaged ({what}); restore it from a backup",
                path.display()
            ))
        })?;
        let db = opened.map_err(|e| StoreError::Engine(format!("cannot open {}: {e}", path.display())))?;
        init(&db)?;
        let checkpoint_lsn = {
            let tx = db.begin_read().map_err(engine)?;
            u64_meta(&tx.open_table(META).map_err(engine)?, "checkpoint_lsn")?
        };
        let wal_dir = dir.join("wal");
        let (wal, records) = Wal::open(&wal_dir, checkpoint_lsn, fsync)?;
        let pending: Pending = records.into_iter().map(|(lsn, b)| (lsn, Arc::new(b))).collect();
        let segments = wal.state();
        let shared = Arc::new(Shared {
            db,
            wal_dir,
            appender: Mutex::new(Appender { wal, revision: 0, next_audit_seq: 1 }),
            pending: Mutex::new(pending),
            checkpoint: RwLock::new(()),
            checkpointing: Mutex::new(()),
            segments,
            stop: Mutex::new(false),
            wake: Condvar::new(),
            failure: Mutex::new(None),
        });
        let recovered = shared.recover()?;
        {
            let mut appender = shared.appender.lock().expect("appender lock");
            appender.revision = recovered.revision;
            appender.next_audit_seq = recovered.audit_head.map_or(1, |(seq, _)| seq + 1);
        }
        let worker = shared.clone();
        let checkpointer = std::thread::Builder::new()
            .name("gapguard-checkpoint".into())
            .spawn(move || worker.run_checkpointer())
            .map_err(|e| StoreError::Engine(format!("cannot start the checkpointer: {e}")))?;
        Ok(Self { shared, checkpointer: Some(checkpointer) })
    }

    /// Folds every logged batch into the redb file now (also done periodically and on drop).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.shared.checkpoint_once()
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        *self.shared.stop.lock().expect("stop lock") = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.checkpointer.take() {
            let _ = t.join();
        }
    }
}

fn init(db: &Database) -> Result<(), StoreError> {
    let mut tx = db.begin_write().map_err(engine)?;
    tx.set_durability(Durability::Immediate);
    {
        tx.open_table(ENTRIES).map_err(engine)?;
        tx.open_table(AUDIT).map_err(engine)?;
        tx.open_table(USED_TICKETS).map_err(engine)?;
        tx.open_table(IDEMPOTENCY).map_err(engine)?;
        let mut meta = tx.open_table(META).map_err(engine)?;
        let format = meta.get("format").map_err(engine)?.map(|v| v.value().to_vec());
        match format {
            None => {
                meta.insert("format", FORMAT).map_err(engine)?;
            }
            Some(f) if f == FORMAT => {}
            Some(f) => {
                return Err(StoreError::Invalid(format!(
                    "data file has format {:?}, this gapguard reads {:?}",
                    String::from_utf8_lossy(&f),
                    String::from_utf8_lossy(FORMAT)
                )))
            }
        }
    }
    tx.commit().map_err(engine)
}

fn encode_chunk(events: &[&SealedEvent]) -> Vec<u8> {
    let mut out = Vec::with_capacity(events.iter().map(|e| 44 + e.body.len()).sum());
    for e in events {
        out.extend_from_slice(&e.seq.to_le_bytes());
        out.extend_from_slice(&e.hash);
        out.extend_from_slice(&u32::try_from(e.body.len()).expect("an audit event is under 4 GiB").to_le_bytes());
        out.extend_from_slice(&e.body);
    }
    out
}

fn decode_chunk(first_seq: u64, mut bytes: &[u8]) -> Result<Vec<SealedEvent>, StoreError> {
    let bad = |detail: String| StoreError::Corrupt { what: "audit", detail };
    let mut out = Vec::new();
    while !bytes.is_empty() {
        if bytes.len() < 44 {
            return Err(bad(format!("chunk {first_seq} ends in a partial event header")));
        }
        let seq = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        let hash: [u8; 32] = bytes[8..40].try_into().expect("32 bytes");
        let len = u32::from_le_bytes(bytes[40..44].try_into().expect("4 bytes")) as usize;
        let body = bytes.get(44..44 + len).ok_or_else(|| bad(format!("event {seq} is cut short")))?;
        out.push(SealedEvent { seq, hash, body: body.to_vec() });
        bytes = &bytes[44 + len..];
    }
    if out.first().map(|e| e.seq) != Some(first_seq) {
        return Err(bad(format!("chunk {first_seq} does not start with its event")));
    }
    Ok(out)
}

/// Logged batches merged in order: what they leave behind, ready to write into the file or
/// onto recovered state. Within a batch, prunes apply before inserts: a prune only ever removes
/// a record older than the batch (the writer checks its expiry), never one the batch adds.
/// It borrows from the batches: a hot key written by every batch is looked at each time but
/// copied only once, when it is written out.
#[derive(Default)]
struct Fold<'a> {
    revision: u64,
    ticket_key: Option<&'a [u8]>,
    /// `None`: forget the key.
    entries: BTreeMap<&'a NsKey, Option<&'a Entry>>,
    audit: Vec<&'a SealedEvent>,
    tickets: HashMap<TicketId, Option<u64>>,
    idempotency: BTreeMap<&'a IdempotencyKey, Option<&'a IdempotencyRecord>>,
}

impl<'a> Fold<'a> {
    fn add(&mut self, b: &'a Batch) {
        self.revision = self.revision.max(b.revision);
        if let Some(key) = &b.ticket_key {
            self.ticket_key = Some(key);
        }
        for id in &b.prune_tickets {
            self.tickets.insert(*id, None);
        }
        for k in &b.prune_idempotency {
            self.idempotency.insert(k, None);
        }
        for k in &b.forget_entries {
            self.entries.insert(k, None);
        }
        for (k, e) in &b.entries {
            self.entries.insert(k, Some(e));
        }
        self.audit.extend(&b.audit);
        for (id, expires) in &b.used_tickets {
            self.tickets.insert(*id, Some(*expires));
        }
        for (k, r) in &b.idempotency {
            self.idempotency.insert(k, Some(r));
        }
    }
}

impl Shared {
    fn pending_batches(&self) -> Vec<(u64, Arc<Batch>)> {
        self.pending.lock().expect("pending lock").iter().cloned().collect()
    }

    fn recover(&self) -> Result<Recovered, StoreError> {
        let guard = self.checkpoint.read().expect("checkpoint lock");
        let pending = self.pending_batches();
        let tx = self.db.begin_read().map_err(engine)?;
        drop(guard);
        let meta = tx.open_table(META).map_err(engine)?;
        let mut fold = Fold { revision: u64_meta(&meta, "revision")?, ..Fold::default() };
        let stored_key = meta.get("ticket_key").map_err(engine)?.map(|v| v.value().to_vec());
        let mut entries = BTreeMap::new();
        for row in tx.open_table(ENTRIES).map_err(engine)?.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let (ns, key) = k.value();
            let entry: Entry = serde_json::from_slice(v.value()).map_err(corrupt("entries"))?;
            entries.insert(NsKey::new(ns, key), entry);
        }
        let mut tickets = BTreeMap::new();
        for row in tx.open_table(USED_TICKETS).map_err(engine)?.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let id: TicketId = k.value().try_into().map_err(|_| StoreError::Corrupt {
                what: "used_tickets",
                detail: "ticket id is not 16 bytes".into(),
            })?;
            tickets.insert(id, v.value());
        }
        let mut idempotency = BTreeMap::new();
        for row in tx.open_table(IDEMPOTENCY).map_err(engine)?.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let (ns, scope, key) = k.value();
            let record: IdempotencyRecord = serde_json::from_slice(v.value()).map_err(corrupt("idempotency"))?;
            idempotency.insert(IdempotencyKey { ns: ns.into(), scope: scope.into(), key: key.into() }, record);
        }
        let mut audit_head = match tx.open_table(AUDIT).map_err(engine)?.last().map_err(engine)? {
            Some(row) => decode_chunk(row.0.value(), row.1.value())?.last().map(|e| (e.seq, e.hash)),
            None => None,
        };
        for (_, b) in &pending {
            fold.add(b);
        }
        for (k, change) in fold.entries {
            match change {
                Some(e) => entries.insert(k.clone(), e.clone()),
                None => entries.remove(k),
            };
        }
        for (id, change) in fold.tickets {
            match change {
                Some(expires) => tickets.insert(id, expires),
                None => tickets.remove(&id),
            };
        }
        for (k, change) in fold.idempotency {
            match change {
                Some(r) => idempotency.insert(k.clone(), r.clone()),
                None => idempotency.remove(k),
            };
        }
        if let Some(last) = fold.audit.last() {
            audit_head = Some((last.seq, last.hash));
        }
        Ok(Recovered {
            revision: fold.revision,
            entries: entries.into_iter().collect(),
            used_tickets: tickets.into_iter().collect(),
            idempotency: idempotency.into_iter().collect(),
            audit_head,
            ticket_key: fold.ticket_key.map(<[u8]>::to_vec).or(stored_key),
            cursor: 0,
        })
    }

    /// Folds every batch logged so far into the file, durably, then forgets them and deletes
    /// the log segments they filled.
    fn checkpoint_once(&self) -> Result<(), StoreError> {
        let _one_at_a_time = self.checkpointing.lock().expect("checkpointing lock");
        let batches = self.pending_batches();
        let Some(&(last_lsn, _)) = batches.last() else { return Ok(()) };
        let mut fold = Fold::default();
        for (_, b) in &batches {
            fold.add(b);
        }
        let mut tx = self.db.begin_write().map_err(engine)?;
        tx.set_durability(Durability::Immediate);
        {
            let mut meta = tx.open_table(META).map_err(engine)?;
            let revision = u64_meta(&meta, "revision")?.max(fold.revision);
            meta.insert("revision", revision.to_le_bytes().as_slice()).map_err(engine)?;
            meta.insert("checkpoint_lsn", last_lsn.to_le_bytes().as_slice()).map_err(engine)?;
            if let Some(key) = &fold.ticket_key {
                meta.insert("ticket_key", *key).map_err(engine)?;
            }
            let mut entries = tx.open_table(ENTRIES).map_err(engine)?;
            for (k, change) in &fold.entries {
                let key = (k.ns.as_str(), k.key.as_str());
                match change {
                    Some(e) => {
                        let bytes = serde_json::to_vec(e).expect("entries always serialize");
                        entries.insert(key, bytes.as_slice()).map(drop)
                    }
                    None => entries.remove(key).map(drop),
                }
                .map_err(engine)?;
            }
            let mut audit = tx.open_table(AUDIT).map_err(engine)?;
            for chunk in fold.audit.chunks(AUDIT_CHUNK_EVENTS) {
                audit.insert(chunk[0].seq, encode_chunk(chunk).as_slice()).map_err(engine)?;
            }
            let mut used = tx.open_table(USED_TICKETS).map_err(engine)?;
            for (id, change) in &fold.tickets {
                match change {
                    Some(expires) => used.insert(id.as_slice(), *expires).map(drop),
                    None => used.remove(id.as_slice()).map(drop),
                }
                .map_err(engine)?;
            }
            let mut idem = tx.open_table(IDEMPOTENCY).map_err(engine)?;
            for (k, change) in &fold.idempotency {
                let key = (k.ns.as_str(), k.scope.as_str(), k.key.as_str());
                match change {
                    Some(r) => {
                        let bytes = serde_json::to_vec(r).expect("idempotency records always serialize");
                        idem.insert(key, bytes.as_slice()).map(drop)
                    }
                    None => idem.remove(key).map(drop),
                }
                .map_err(engine)?;
            }
        }
        {
            // Readers see either the batches in `pending` or in the file, never neither.
            let _guard = self.checkpoint.write().expect("checkpoint lock");
            tx.commit().map_err(engine)?;
            let mut pending = self.pending.lock().expect("pending lock");
            while pending.front().is_some_and(|(lsn, _)| *lsn <= last_lsn) {
                pending.pop_front();
            }
        }
        // The checkpoint is done once the file holds the batches. Deleting the segments it made
        // obsolete can wait: a start replays only what is after `checkpoint_lsn`, and the next
        // checkpoint retires them too. (Out of file descriptors, listing the log's directory
        // failed, and this used to stop every write until a restart.)
        if let Err(e) = Wal::retire_through(&self.wal_dir, last_lsn, &self.segments) {
            eprintln!("gapguard-store: cannot retire the log segments before LSN {last_lsn} (will retry): {e}");
        }
        Ok(())
    }

    /// A checkpoint, then a spare log segment if the open one is half full and none is ready.
    /// Failing to make the spare is not the checkpoint failing: the next segment is then
    /// `fallocate`d at rotation, as without spares.
    fn checkpoint_and_prepare(&self) -> Result<(), StoreError> {
        self.checkpoint_once()?;
        let _one_at_a_time = self.checkpointing.lock().expect("checkpointing lock");
        if let Err(e) = Wal::prepare_spare(&self.wal_dir, &self.segments) {
            eprintln!("gapguard-store: cannot prepare the next log segment (will retry): {e}");
        }
        Ok(())
    }

    fn run_checkpointer(&self) {
        loop {
            let stopping = {
                let stop = self.stop.lock().expect("stop lock");
                let (stop, _) = self.wake.wait_timeout(stop, CHECKPOINT_INTERVAL).expect("stop lock");
                *stop
            };
            if let Err(e) = self.checkpoint_and_prepare() {
                // The log still holds every batch; refusing further commits keeps it that way
                // until an operator looks (restart replays the log).
                let message = format!("checkpoint failed: {e}");
                eprintln!("gapguard-store: {message}");
                *self.failure.lock().expect("failure lock") = Some(message);
                return;
            }
            if stopping {
                return;
            }
        }
    }
}

impl Storage for EmbeddedStore {
    fn recover(&self) -> Result<Recovered, StoreError> {
        self.shared.recover()
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let shared = &self.shared;
        if let Some(failure) = shared.failure.lock().expect("failure lock").clone() {
            return Err(StoreError::Engine(failure));
        }
        let mut appender = shared.appender.lock().expect("appender lock");
        if batch.revision < appender.revision {
            return Err(StoreError::Invalid(format!(
                "revision {} would go back from {}",
                batch.revision, appender.revision
            )));
        }
        for (expected, event) in (appender.next_audit_seq..).zip(&batch.audit) {
            if event.seq != expected {
                return Err(StoreError::Invalid(format!("audit event {} where {expected} was next", event.seq)));
            }
        }
        let lsn = match appender.wal.append(&batch) {
            Ok(lsn) => lsn,
            Err(e) => {
                // After a failed write or fsync the log's tail is unknown: stop here.
                *shared.failure.lock().expect("failure lock") = Some(e.to_string());
                return Err(e);
            }
        };
        appender.revision = batch.revision;
        appender.next_audit_seq += batch.audit.len() as u64;
        // Pushed while the appender is held, so `pending` stays in LSN order.
        shared.pending.lock().expect("pending lock").push_back((lsn, Arc::new(batch)));
        Ok(())
    }

    fn load_keys(&self, keys: &BTreeSet<NsKey>) -> Result<BTreeMap<NsKey, Entry>, StoreError> {
        let guard = self.shared.checkpoint.read().expect("checkpoint lock");
        let pending = self.shared.pending_batches();
        let tx = self.shared.db.begin_read().map_err(engine)?;
        drop(guard);
        let table = tx.open_table(ENTRIES).map_err(engine)?;
        let mut out = BTreeMap::new();
        for k in keys {
            if let Some(v) = table.get((k.ns.as_str(), k.key.as_str())).map_err(engine)? {
                let entry: Entry = serde_json::from_slice(v.value()).map_err(corrupt("entries"))?;
                out.insert(k.clone(), entry);
            }
        }
        for (_, b) in &pending {
            for k in &b.forget_entries {
                out.remove(k);
            }
            for (k, e) in &b.entries {
                if keys.contains(k) {
                    out.insert(NsKey::clone(k), Entry::clone(e));
                }
            }
        }
        Ok(out)
    }

    fn audit_range(&self, from_seq: u64, limit: usize) -> Result<Vec<SealedEvent>, StoreError> {
        let guard = self.shared.checkpoint.read().expect("checkpoint lock");
        let pending = self.shared.pending_batches();
        let tx = self.shared.db.begin_read().map_err(engine)?;
        drop(guard);
        let table = tx.open_table(AUDIT).map_err(engine)?;
        let mut out = Vec::with_capacity(limit.min(1024));
        // Start at the chunk that holds `from_seq` (the last one starting at or before it).
        let start = match table.range(..=from_seq).map_err(engine)?.next_back() {
            Some(row) => row.map_err(engine)?.0.value(),
            None => from_seq,
        };
        'chunks: for row in table.range(start..).map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            for event in decode_chunk(k.value(), v.value())? {
                if out.len() == limit {
                    break 'chunks;
                }
                if event.seq >= from_seq {
                    out.push(event);
                }
            }
        }
        let mut next = out.last().map_or(from_seq, |e| e.seq + 1);
        for event in pending.iter().flat_map(|(_, b)| b.audit.iter()) {
            if out.len() == limit {
                break;
            }
            if event.seq >= next {
                out.push(event.clone());
                next = event.seq + 1;
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use crate::{Batch, Storage as _};
    use gapguard_core::{Entry, NsKey};

    fn batch(revision: u64) -> Batch {
        let entry = Entry { record: None, changed_by: Some(format!("c{revision}")), changed_at: revision };
        Batch {
            revision,
            entries: Batch::share_entries([(NsKey::new("ns", format!("k{revision}")), entry)]),
            ..Batch::default()
        }
    }

    /// A redb file cut short makes redb panic on open; the store reports it as an error.
    #[test]
    fn a_truncated_redb_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::EmbeddedStore::open(dir.path()).unwrap();
        store.commit(batch(1)).unwrap();
        store.checkpoint().unwrap();
        drop(store);
        let file = dir.path().join("gapguard.redb");
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len / 2).unwrap();
        let Err(refused) = crate::EmbeddedStore::open(dir.path()) else { panic!("a damaged file opened") };
        assert!(refused.to_string().contains("gapguard.redb"), "{refused}");
    }

    /// Retiring obsolete log segments can fail (out of file descriptors, listing the log's
    /// directory did): the checkpoint is done all the same, commits go on, and a later
    /// checkpoint retires them.
    #[test]
    fn a_checkpoint_that_cannot_retire_segments_stops_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::EmbeddedStore::open(dir.path()).unwrap();
        store.commit(batch(1)).unwrap();
        // The log's directory away: its open segment is still written, but cannot be listed.
        let (wal, away) = (dir.path().join("wal"), dir.path().join("wal-away"));
        std::fs::rename(&wal, &away).unwrap();
        store.checkpoint().expect("the checkpoint itself succeeds");
        store.commit(batch(2)).expect("commits go on");
        std::fs::rename(&away, &wal).unwrap();
        store.checkpoint().unwrap();
        store.commit(batch(3)).unwrap();
        drop(store);
        let reopened = crate::EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(reopened.recover().unwrap().revision, 3, "every commit is there after a restart");
    }

    #[test]
    fn embedded_store_passes_the_conformance_suite() {
        crate::conformance::run_all(|dir| crate::EmbeddedStore::open(dir).expect("open embedded store"));
    }

    #[test]
    fn embedded_store_passes_the_conformance_suite_with_checkpoints_after_every_commit() {
        crate::conformance::run_all(|dir| CheckpointEveryCommit(crate::EmbeddedStore::open(dir).expect("open")));
    }

    /// The same store, checkpointing synchronously after each commit, so that the suite also
    /// runs against state read back from the redb file rather than the log.
    struct CheckpointEveryCommit(crate::EmbeddedStore);

    impl crate::Storage for CheckpointEveryCommit {
        fn recover(&self) -> Result<crate::Recovered, crate::StoreError> {
            self.0.recover()
        }
        fn commit(&self, batch: crate::Batch) -> Result<(), crate::StoreError> {
            self.0.commit(batch)?;
            self.0.checkpoint()
        }
        fn load_keys(
            &self,
            keys: &std::collections::BTreeSet<gapguard_core::NsKey>,
        ) -> Result<std::collections::BTreeMap<gapguard_core::NsKey, gapguard_core::Entry>, crate::StoreError> {
            self.0.load_keys(keys)
        }
        fn audit_range(
            &self,
            from_seq: u64,
            limit: usize,
        ) -> Result<Vec<gapguard_core::SealedEvent>, crate::StoreError> {
            self.0.audit_range(from_seq, limit)
        }
    }
}
