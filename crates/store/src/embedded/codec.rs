//! The binary encoding of a [`Batch`] as one write-ahead-log record.
//!
//! Fixed-width integers are little-endian; byte strings are a `u32` length then the bytes.
//! State entries and idempotency records are carried as their JSON (the same bytes the redb
//! tables hold); audit events as their sealed body and hash.

use std::sync::Arc;

use gapguard_core::{Entry, IdempotencyRecord, NsKey, SealedEvent};

use crate::{Batch, IdempotencyKey, StoreError};

/// The record format; bumped on any change.
const VERSION: u8 = 2;

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_u32(out, u32::try_from(b.len()).expect("a field of a batch is under 4 GiB"));
    out.extend_from_slice(b);
}

fn put_count(out: &mut Vec<u8>, n: usize) {
    put_u32(out, u32::try_from(n).expect("a batch has under 4G items"));
}

/// Appends the encoding of `batch` (with its log sequence number) to `out`.
/// The LSN an encoded record's payload starts with, if it starts as this format's do: a cheap
/// test before a checksum, for the log's scan past a bad record.
pub(crate) fn peek_lsn(payload: &[u8]) -> Option<u64> {
    match payload.split_first()? {
        (&VERSION, rest) => Some(u64::from_le_bytes(rest.get(..8)?.try_into().ok()?)),
        _ => None,
    }
}

pub(crate) fn encode(lsn: u64, batch: &Batch, out: &mut Vec<u8>) {
    out.push(VERSION);
    put_u64(out, lsn);
    put_u64(out, batch.revision);
    match &batch.ticket_key {
        Some(key) => {
            out.push(1);
            put_bytes(out, key);
        }
        None => out.push(0),
    }
    put_count(out, batch.entries.len());
    for (k, e) in &batch.entries {
        put_bytes(out, k.ns.as_bytes());
        put_bytes(out, k.key.as_bytes());
        put_bytes(out, &serde_json::to_vec(e).expect("entries always serialize"));
    }
    put_count(out, batch.audit.len());
    for e in &batch.audit {
        put_u64(out, e.seq);
        out.extend_from_slice(&e.hash);
        put_bytes(out, &e.body);
    }
    put_count(out, batch.used_tickets.len());
    for (id, expires) in &batch.used_tickets {
        out.extend_from_slice(id);
        put_u64(out, *expires);
    }
    put_count(out, batch.idempotency.len());
    for (k, r) in &batch.idempotency {
        put_idem_key(out, k);
        put_bytes(out, &serde_json::to_vec(r).expect("idempotency records always serialize"));
    }
    put_count(out, batch.prune_tickets.len());
    for id in &batch.prune_tickets {
        out.extend_from_slice(id);
    }
    put_count(out, batch.prune_idempotency.len());
    for k in &batch.prune_idempotency {
        put_idem_key(out, k);
    }
    put_count(out, batch.forget_entries.len());
    for k in &batch.forget_entries {
        put_bytes(out, k.ns.as_bytes());
        put_bytes(out, k.key.as_bytes());
    }
}

fn put_idem_key(out: &mut Vec<u8>, k: &IdempotencyKey) {
    put_bytes(out, k.ns.as_bytes());
    put_bytes(out, k.scope.as_bytes());
    put_bytes(out, k.key.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

fn bad(detail: impl Into<String>) -> StoreError {
    StoreError::Corrupt { what: "wal record", detail: detail.into() }
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StoreError> {
        if self.buf.len() < n {
            return Err(bad(format!("truncated: wanted {n} bytes, {} left", self.buf.len())));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, StoreError> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64, StoreError> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn bytes(&mut self) -> Result<&'a [u8], StoreError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, StoreError> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| bad("a string is not UTF-8"))
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], StoreError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }
    fn count(&mut self) -> Result<usize, StoreError> {
        let n = self.u32()? as usize;
        // Every item takes at least one byte: a count past the bytes left is corruption, and
        // must not turn into a huge allocation.
        if n > self.buf.len() {
            return Err(bad(format!("count {n} exceeds the {} bytes left", self.buf.len())));
        }
        Ok(n)
    }
    fn idem_key(&mut self) -> Result<IdempotencyKey, StoreError> {
        Ok(IdempotencyKey { ns: self.string()?, scope: self.string()?, key: self.string()? })
    }
}

/// Decodes one record into its log sequence number and batch.
pub(crate) fn decode(buf: &[u8]) -> Result<(u64, Batch), StoreError> {
    let mut r = Reader { buf };
    let version = r.u8()?;
    if version != VERSION {
        return Err(bad(format!("record format {version}, this gapguard reads {VERSION}")));
    }
    let lsn = r.u64()?;
    let mut batch = Batch { revision: r.u64()?, ..Batch::default() };
    if r.u8()? == 1 {
        batch.ticket_key = Some(r.bytes()?.to_vec());
    }
    let json = |what: &'static str| move |e: serde_json::Error| StoreError::Corrupt { what, detail: e.to_string() };
    for _ in 0..r.count()? {
        let key = NsKey { ns: r.string()?, key: r.string()? };
        let entry: Entry = serde_json::from_slice(r.bytes()?).map_err(json("wal entry"))?;
        batch.entries.push((Arc::new(key), Arc::new(entry)));
    }
    for _ in 0..r.count()? {
        let seq = r.u64()?;
        let hash = r.array::<32>()?;
        batch.audit.push(SealedEvent { seq, hash, body: r.bytes()?.to_vec() });
    }
    for _ in 0..r.count()? {
        let id = r.array::<16>()?;
        batch.used_tickets.push((id, r.u64()?));
    }
    for _ in 0..r.count()? {
        let key = r.idem_key()?;
        let record: IdempotencyRecord = serde_json::from_slice(r.bytes()?).map_err(json("wal idempotency"))?;
        batch.idempotency.push((key, record));
    }
    for _ in 0..r.count()? {
        batch.prune_tickets.push(r.array::<16>()?);
    }
    for _ in 0..r.count()? {
        batch.prune_idempotency.push(r.idem_key()?);
    }
    for _ in 0..r.count()? {
        batch.forget_entries.push(NsKey { ns: r.string()?, key: r.string()? });
    }
    if !r.buf.is_empty() {
        return Err(bad(format!("{} bytes after the record", r.buf.len())));
    }
    Ok((lsn, batch))
}
