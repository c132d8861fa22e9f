//! The embedded backend: one redb file, one write transaction per batch, fsynced on commit.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use gapguard_core::{Entry, IdempotencyRecord, NsKey, SealedEvent, TicketId};
use redb::{Database, Durability, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::{Batch, IdempotencyKey, Recovered, Storage, StoreError};

/// `(namespace, key)` → JSON of [`Entry`].
const ENTRIES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("entries");
/// Sequence number → 32-byte hash followed by the event body.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Ticket id → the ticket's expiry (ms).
const USED_TICKETS: TableDefinition<&[u8], u64> = TableDefinition::new("used_tickets");
/// `(namespace, scope, key)` → JSON of [`IdempotencyRecord`].
const IDEMPOTENCY: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("idempotency");
/// Named singletons: `revision` (u64 LE), `ticket_key`, `format`.
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// The on-disk format this code writes; a file with another is refused.
const FORMAT: &[u8] = b"gapguard-embedded-1";

/// The embedded backend over one redb file.
pub struct EmbeddedStore {
    db: Database,
    durability: Durability,
}

fn engine<E: std::fmt::Display>(e: E) -> StoreError {
    StoreError::Engine(e.to_string())
}

fn corrupt(what: &'static str) -> impl Fn(serde_json::Error) -> StoreError {
    move |e| StoreError::Corrupt { what, detail: e.to_string() }
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, as `dir/gapguard.redb`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, true)
    }

    /// Opens the store; with `fsync == false` commits are not fsynced (faster, and a crash may
    /// lose acknowledged writes: only for users who configured it explicitly).
    pub fn open_with(dir: &Path, fsync: bool) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Engine(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join("gapguard.redb");
        let db =
            Database::create(&path).map_err(|e| StoreError::Engine(format!("cannot open {}: {e}", path.display())))?;
        let durability = if fsync { Durability::Immediate } else { Durability::Eventual };
        let store = Self { db, durability };
        store.init()?;
        Ok(store)
    }

    fn init(&self) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(engine)?;
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
}

fn split_audit(seq: u64, bytes: &[u8]) -> Result<SealedEvent, StoreError> {
    if bytes.len() < 32 {
        return Err(StoreError::Corrupt { what: "audit", detail: format!("event {seq} is {} bytes", bytes.len()) });
    }
    let mut hash = [0u8; 32];
    hash.copy_from_slice(&bytes[..32]);
    Ok(SealedEvent { seq, body: bytes[32..].to_vec(), hash })
}

impl Storage for EmbeddedStore {
    fn recover(&self) -> Result<Recovered, StoreError> {
        let tx = self.db.begin_read().map_err(engine)?;
        let mut out = Recovered::default();
        let meta = tx.open_table(META).map_err(engine)?;
        if let Some(v) = meta.get("revision").map_err(engine)? {
            let bytes: [u8; 8] = v
                .value()
                .try_into()
                .map_err(|_| StoreError::Corrupt { what: "meta.revision", detail: "not 8 bytes".into() })?;
            out.revision = u64::from_le_bytes(bytes);
        }
        out.ticket_key = meta.get("ticket_key").map_err(engine)?.map(|v| v.value().to_vec());
        let entries = tx.open_table(ENTRIES).map_err(engine)?;
        out.entries.reserve(entries.len().map_err(engine)? as usize);
        for row in entries.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let (ns, key) = k.value();
            let entry: Entry = serde_json::from_slice(v.value()).map_err(corrupt("entries"))?;
            out.entries.push((NsKey::new(ns, key), entry));
        }
        for row in tx.open_table(USED_TICKETS).map_err(engine)?.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let id: TicketId = k.value().try_into().map_err(|_| StoreError::Corrupt {
                what: "used_tickets",
                detail: "ticket id is not 16 bytes".into(),
            })?;
            out.used_tickets.push((id, v.value()));
        }
        for row in tx.open_table(IDEMPOTENCY).map_err(engine)?.iter().map_err(engine)? {
            let (k, v) = row.map_err(engine)?;
            let (ns, scope, key) = k.value();
            let record: IdempotencyRecord = serde_json::from_slice(v.value()).map_err(corrupt("idempotency"))?;
            out.idempotency.push((IdempotencyKey { ns: ns.into(), scope: scope.into(), key: key.into() }, record));
        }
        if let Some(row) = tx.open_table(AUDIT).map_err(engine)?.last().map_err(engine)? {
            let event = split_audit(row.0.value(), row.1.value())?;
            out.audit_head = Some((event.seq, event.hash));
        }
        Ok(out)
    }

    fn commit(&self, batch: &Batch) -> Result<(), StoreError> {
        let mut tx = self.db.begin_write().map_err(engine)?;
        tx.set_durability(self.durability);
        {
            let mut meta = tx.open_table(META).map_err(engine)?;
            let stored = meta.get("revision").map_err(engine)?.map(|v| v.value().to_vec());
            let stored = stored.and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
            if batch.revision < stored {
                return Err(StoreError::Invalid(format!("revision {} would go back from {stored}", batch.revision)));
            }
            meta.insert("revision", batch.revision.to_le_bytes().as_slice()).map_err(engine)?;
            if let Some(key) = &batch.ticket_key {
                meta.insert("ticket_key", key.as_slice()).map_err(engine)?;
            }
            let mut entries = tx.open_table(ENTRIES).map_err(engine)?;
            for (k, e) in &batch.entries {
                let bytes = serde_json::to_vec(e).expect("entries always serialize");
                entries.insert((k.ns.as_str(), k.key.as_str()), bytes.as_slice()).map_err(engine)?;
            }
            let mut audit = tx.open_table(AUDIT).map_err(engine)?;
            let next = audit.last().map_err(engine)?.map_or(1, |(k, _)| k.value() + 1);
            let mut row = Vec::new();
            for (expected, event) in (next..).zip(&batch.audit) {
                if event.seq != expected {
                    return Err(StoreError::Invalid(format!("audit event {} where {expected} was next", event.seq)));
                }
                row.clear();
                row.extend_from_slice(&event.hash);
                row.extend_from_slice(&event.body);
                audit.insert(event.seq, row.as_slice()).map_err(engine)?;
            }
            let mut used = tx.open_table(USED_TICKETS).map_err(engine)?;
            for (id, expires) in &batch.used_tickets {
                used.insert(id.as_slice(), *expires).map_err(engine)?;
            }
            for id in &batch.prune_tickets {
                used.remove(id.as_slice()).map_err(engine)?;
            }
            let mut idem = tx.open_table(IDEMPOTENCY).map_err(engine)?;
            for (k, record) in &batch.idempotency {
                let bytes = serde_json::to_vec(record).expect("idempotency records always serialize");
                idem.insert((k.ns.as_str(), k.scope.as_str(), k.key.as_str()), bytes.as_slice()).map_err(engine)?;
            }
            for k in &batch.prune_idempotency {
                idem.remove((k.ns.as_str(), k.scope.as_str(), k.key.as_str())).map_err(engine)?;
            }
        }
        tx.commit().map_err(engine)
    }

    fn load_keys(&self, keys: &BTreeSet<NsKey>) -> Result<BTreeMap<NsKey, Entry>, StoreError> {
        let tx = self.db.begin_read().map_err(engine)?;
        let table = tx.open_table(ENTRIES).map_err(engine)?;
        let mut out = BTreeMap::new();
        for k in keys {
            if let Some(v) = table.get((k.ns.as_str(), k.key.as_str())).map_err(engine)? {
                let entry: Entry = serde_json::from_slice(v.value()).map_err(corrupt("entries"))?;
                out.insert(k.clone(), entry);
            }
        }
        Ok(out)
    }

    fn audit_range(&self, from_seq: u64, limit: usize) -> Result<Vec<SealedEvent>, StoreError> {
        let tx = self.db.begin_read().map_err(engine)?;
        let table = tx.open_table(AUDIT).map_err(engine)?;
        let mut out = Vec::with_capacity(limit.min(1024));
        for row in table.range(from_seq..).map_err(engine)?.take(limit) {
            let (k, v) = row.map_err(engine)?;
            out.push(split_audit(k.value(), v.value())?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn embedded_store_passes_the_conformance_suite() {
        crate::conformance::run_all(|dir| crate::EmbeddedStore::open(dir).expect("open embedded store"));
    }
}
