//! Clocks: the engine's only source of time, so tests and simulations can control it.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock milliseconds that never goes backwards.
pub trait Clock: Send + Sync + 'static {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock, clamped so that it never goes backwards (NTP steps are absorbed).
#[derive(Debug, Default)]
pub struct SystemClock {
    last_ms: AtomicU64,
}

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        let prev = self.last_ms.fetch_max(now, Ordering::AcqRel);
        prev.max(now)
    }
}

/// A clock that moves only when told to (tests, simulations).
#[derive(Debug, Default)]
pub struct ManualClock {
    now_ms: AtomicU64,
}

impl ManualClock {
    /// A clock at `now_ms`.
    pub fn new(now_ms: u64) -> Self {
        Self { now_ms: AtomicU64::new(now_ms) }
    }

    /// Moves the clock forward.
    pub fn advance(&self, ms: u64) {
        self.now_ms.fetch_add(ms, Ordering::AcqRel);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.now_ms.load(Ordering::Acquire)
    }
}

/// The database's clock as a node sees it: a local clock plus the offset last measured against
/// the database (each batch's transaction and each replica sync read the database's time), so
/// that nodes with skewed clocks judge TTLs alike. Writes use the database's time itself; this
/// serves checks, which do not go to the database.
pub(crate) struct DbClock {
    local: Arc<dyn Clock>,
    offset_ms: AtomicI64,
    /// Never go backwards, whatever the offset does.
    last_ms: AtomicU64,
}

impl DbClock {
    pub(crate) fn new(local: Arc<dyn Clock>) -> Self {
        Self { local, offset_ms: AtomicI64::new(0), last_ms: AtomicU64::new(0) }
    }

    /// Records the database's time as just read.
    pub(crate) fn observe(&self, db_now_ms: u64) {
        let local = self.local.now_ms() as i64;
        self.offset_ms.store(db_now_ms as i64 - local, Ordering::Release);
        self.last_ms.fetch_max(db_now_ms, Ordering::AcqRel);
    }
}

impl Clock for DbClock {
    fn now_ms(&self) -> u64 {
        let now = (self.local.now_ms() as i64 + self.offset_ms.load(Ordering::Acquire)).max(0) as u64;
        self.last_ms.fetch_max(now, Ordering::AcqRel).max(now)
    }
}
