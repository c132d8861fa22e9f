//! The change feed: every committed change in revision order, kept in memory for resuming
//! watchers (a bounded window) and broadcast live as each batch becomes durable.
//!
//! History before the window — and before the last start, since the feed is not persisted —
//! is compacted: a watcher asking for it is told so and resumes from a fresh read.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use gapguard_core::{Entry, NsKey, Revision};
use tokio::sync::broadcast;

/// Changes kept for watchers that resume from an earlier revision.
pub const FEED_WINDOW_CHANGES: usize = 100_000;
/// Bytes of changes (keys and values, as JSON) kept for them by default: the bound that bites
/// when values are large (100,000 values of 256 KiB would be 25 GiB).
pub const FEED_WINDOW_BYTES: usize = 64 * 1024 * 1024;
/// Batches a live watcher may fall behind before it is cut off (and told to resume).
const LIVE_BATCHES_MAX: usize = 4096;

/// One committed change of one key.
#[derive(Clone, Debug, PartialEq)]
pub struct Change {
    /// The revision of the request that made it.
    pub revision: Revision,
    /// The key (internal keys included).
    pub key: Arc<NsKey>,
    /// The key's entry after it (a tombstone for a delete).
    pub entry: Arc<Entry>,
    /// A slot for the server: the change as watchers are sent it, rendered by the first watch
    /// stream that sends it and shared by the others, so that a change fanned out to many
    /// streams is serialized once (each stream still copies the text into its own buffer).
    /// The engine never reads it.
    pub rendered: std::sync::OnceLock<Arc<str>>,
    /// [`Change::approx_bytes`], sized once when the change is made.
    bytes: usize,
}

struct Window {
    changes: VecDeque<Arc<Change>>,
    /// The sum of their sizes ([`Change::approx_bytes`]).
    bytes: usize,
    /// Every change at or after this revision is in `changes`.
    first_revision: Revision,
}

/// The feed.
pub struct Feed {
    window: Mutex<Window>,
    /// Most changes kept ([`FEED_WINDOW_CHANGES`] in production).
    window_changes_max: usize,
    /// Most bytes of changes kept (`watch_history_bytes`; [`FEED_WINDOW_BYTES`] by default).
    /// The newest revision is kept whole whatever its size.
    window_bytes_max: usize,
    live: broadcast::Sender<Arc<Vec<Arc<Change>>>>,
    /// The first revision after the last [`Feed::reset`] (0: never reset), shared with every
    /// subscription.
    reset_to: Arc<AtomicU64>,
}

/// The history asked for is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("history before revision {first_available} is compacted")]
pub struct Compacted {
    /// The oldest revision a watch can start from.
    pub first_available: Revision,
}

/// A new watcher's start: the backlog from its revision, then the live batches.
pub struct Subscription {
    /// Changes from the requested revision up to now.
    pub backlog: Vec<Arc<Change>>,
    /// Every later batch, as it becomes durable. An empty batch means the feed was reset
    /// ([`Feed::reset`]): changes may be missing from here on, and `reset_to` says from which
    /// revision history is whole again.
    pub live: broadcast::Receiver<Arc<Vec<Arc<Change>>>>,
    /// See `live`.
    pub reset_to: Arc<AtomicU64>,
}

impl Change {
    /// A change, not rendered yet.
    pub fn new(revision: Revision, key: Arc<NsKey>, entry: Arc<Entry>) -> Self {
        let value = entry.record.as_ref().map_or(0, |r| json_bytes(&r.value));
        let changed_by = entry.changed_by.as_ref().map_or(0, String::len);
        let bytes = 128 + key.ns.len() + key.key.len() + changed_by + 2 * value;
        Self { revision, key, entry, rendered: std::sync::OnceLock::new(), bytes }
    }

    /// About the memory the change holds: its key, and its value twice over as JSON text
    /// would be (once parsed, once as [`Change::rendered`] once a watcher sent it), plus a fixed
    /// overhead. An estimate: a parsed value's nodes take more than their text.
    pub fn approx_bytes(&self) -> usize {
        self.bytes
    }
}

/// The length of `value` as compact JSON text, about (numbers count 8).
fn json_bytes(value: &serde_json::Value) -> usize {
    use serde_json::Value;
    match value {
        Value::Null | Value::Bool(_) => 5,
        Value::Number(_) => 8,
        Value::String(s) => s.len() + 2,
        Value::Array(items) => 2 + items.iter().map(|v| json_bytes(v) + 1).sum::<usize>(),
        Value::Object(fields) => 2 + fields.iter().map(|(k, v)| k.len() + 4 + json_bytes(v)).sum::<usize>(),
    }
}

impl Feed {
    /// A feed whose history starts after `revision`, keeping at most [`FEED_WINDOW_CHANGES`]
    /// changes and `window_bytes_max` bytes of them.
    pub(crate) fn new(revision: Revision, window_bytes_max: usize) -> Self {
        Self::with_window(revision, FEED_WINDOW_CHANGES, window_bytes_max)
    }

    /// A feed keeping at most `window_changes_max` changes and `window_bytes_max` bytes.
    fn with_window(revision: Revision, window_changes_max: usize, window_bytes_max: usize) -> Self {
        let (live, _) = broadcast::channel(LIVE_BATCHES_MAX);
        let window = Mutex::new(Window { changes: VecDeque::new(), bytes: 0, first_revision: revision + 1 });
        Self { window, window_changes_max, window_bytes_max, live, reset_to: Arc::new(AtomicU64::new(0)) }
    }

    /// Forgets the history: the node's state was reloaded whole at `revision` (it fell behind a
    /// shared change log), so the changes between what watchers saw and `revision` are not in
    /// the feed. A watch from before `revision + 1` is answered `compacted`, and every live
    /// watcher is sent an empty batch, which tells it the same.
    pub(crate) fn reset(&self, revision: Revision) {
        let mut window = self.window.lock().expect("feed lock");
        window.changes.clear();
        window.bytes = 0;
        window.first_revision = revision + 1;
        self.reset_to.store(revision + 1, Ordering::Release);
        let _ = self.live.send(Arc::new(Vec::new()));
    }

    /// Appends a durable batch's changes (in revision order) and wakes the watchers.
    pub(crate) fn publish(&self, changes: Vec<Change>) {
        if changes.is_empty() {
            return;
        }
        let changes: Vec<Arc<Change>> = changes.into_iter().map(Arc::new).collect();
        let newest = changes.last().expect("non-empty").revision;
        let mut window = self.window.lock().expect("feed lock");
        window.bytes += changes.iter().map(|c| c.bytes).sum::<usize>();
        window.changes.extend(changes.iter().cloned());
        while window.changes.len() > self.window_changes_max
            || (window.bytes > self.window_bytes_max && window.changes.front().is_some_and(|c| c.revision < newest))
        {
            let evicted = window.changes.pop_front().expect("non-empty");
            window.bytes -= evicted.bytes;
            window.first_revision = evicted.revision + 1;
        }
        // Keep only whole revisions.
        while window.changes.front().is_some_and(|c| c.revision < window.first_revision) {
            let evicted = window.changes.pop_front().expect("non-empty");
            window.bytes -= evicted.bytes;
        }
        // Sent under the lock, so a subscriber sees each batch exactly once: in its backlog
        // or live.
        let _ = self.live.send(Arc::new(changes));
    }

    /// Subscribes from `from_revision` (inclusive; 0, before the first revision there is, is
    /// the start of history, which is whole while the window starts at revision 1).
    pub fn subscribe(&self, from_revision: Revision) -> Result<Subscription, Compacted> {
        let window = self.window.lock().expect("feed lock");
        if from_revision.max(1) < window.first_revision {
            return Err(Compacted { first_available: window.first_revision });
        }
        let start = window.changes.partition_point(|c| c.revision < from_revision);
        let backlog = window.changes.range(start..).cloned().collect();
        Ok(Subscription { backlog, live: self.live.subscribe(), reset_to: self.reset_to.clone() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(revision: Revision) -> Change {
        Change::new(
            revision,
            Arc::new(NsKey::new("n", "k")),
            Arc::new(Entry { record: None, changed_by: None, changed_at: revision }),
        )
    }

    #[test]
    fn backlog_then_live_without_gaps_or_duplicates() {
        let feed = Feed::new(0, FEED_WINDOW_BYTES);
        feed.publish(vec![change(1), change(2)]);
        feed.publish(vec![change(3)]);
        let mut sub = feed.subscribe(2).unwrap();
        assert_eq!(sub.backlog.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![2, 3]);
        feed.publish(vec![change(4)]);
        assert_eq!(sub.live.try_recv().unwrap()[0].revision, 4);
        assert!(sub.live.try_recv().is_err());
    }

    #[test]
    fn the_window_keeps_its_limit_of_whole_revisions() {
        let feed = Feed::with_window(0, 3, FEED_WINDOW_BYTES);
        feed.publish(vec![change(1), change(2), change(3)]);
        // At the limit: everything from revision 1 is still there.
        assert_eq!(feed.subscribe(1).unwrap().backlog.len(), 3);
        // One past it: revision 1 goes, and the window starts at 2.
        feed.publish(vec![change(4)]);
        assert_eq!(feed.subscribe(1).err(), Some(Compacted { first_available: 2 }));
        assert_eq!(feed.subscribe(2).unwrap().backlog.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![2, 3, 4]);
        // A revision of two changes that no longer fits whole is evicted whole.
        feed.publish(vec![change(5), change(5)]);
        assert_eq!(feed.subscribe(4).unwrap().backlog.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![4, 5, 5]);
        assert_eq!(feed.subscribe(3).err(), Some(Compacted { first_available: 4 }));
        // Evicting one change of revision 5 evicts the other too: no half revision is kept.
        feed.publish(vec![change(6)]);
        feed.publish(vec![change(7)]);
        assert_eq!(feed.subscribe(5).err(), Some(Compacted { first_available: 6 }));
        assert_eq!(feed.subscribe(6).unwrap().backlog.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![6, 7]);
    }

    fn valued(revision: Revision, bytes: usize) -> Change {
        let record = gapguard_core::Record {
            value: serde_json::Value::String("x".repeat(bytes)),
            version: 1,
            create_revision: revision,
            mod_revision: revision,
        };
        let entry = Entry { record: Some(record), changed_by: None, changed_at: revision };
        Change::new(revision, Arc::new(NsKey::new("n", "k")), Arc::new(entry))
    }

    /// Large values: the window keeps at most its bytes (whole revisions, the newest always),
    /// whatever its count of changes allows.
    #[test]
    fn the_window_keeps_its_limit_of_bytes() {
        let one = valued(1, 1000).approx_bytes();
        let feed = Feed::with_window(0, 100, 3 * one);
        feed.publish(vec![valued(1, 1000), valued(2, 1000), valued(3, 1000)]);
        // At the limit: all three kept.
        assert_eq!(feed.subscribe(1).unwrap().backlog.len(), 3);
        // One past it: the oldest goes.
        feed.publish(vec![valued(4, 1000)]);
        assert_eq!(feed.subscribe(1).err(), Some(Compacted { first_available: 2 }));
        assert_eq!(feed.subscribe(2).unwrap().backlog.len(), 3);
        // A revision larger than the whole limit is kept, alone.
        feed.publish(vec![valued(5, 10_000)]);
        assert_eq!(feed.subscribe(4).err(), Some(Compacted { first_available: 5 }));
        assert_eq!(feed.subscribe(5).unwrap().backlog.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![5]);
        assert!(one > 2000 && one < 2300, "a change of a 1,000-byte string counts about twice that: {one}");
    }

    #[test]
    fn history_before_the_start_is_compacted() {
        let feed = Feed::new(10, FEED_WINDOW_BYTES);
        assert_eq!(feed.subscribe(10).err(), Some(Compacted { first_available: 11 }));
        assert_eq!(feed.subscribe(0).err(), Some(Compacted { first_available: 11 }));
        assert!(feed.subscribe(11).unwrap().backlog.is_empty());
    }

    #[test]
    fn a_reset_tells_live_watchers_and_compacts_the_history_before_it() {
        let feed = Feed::new(0, FEED_WINDOW_BYTES);
        feed.publish(vec![change(1), change(2)]);
        let mut sub = feed.subscribe(1).unwrap();
        feed.reset(40);
        let told = sub.live.try_recv().unwrap();
        assert!(told.is_empty(), "live watchers get the empty batch of a reset");
        assert_eq!(sub.reset_to.load(Ordering::Acquire), 41);
        assert_eq!(feed.subscribe(2).err(), Some(Compacted { first_available: 41 }));
        assert!(feed.subscribe(41).unwrap().backlog.is_empty());
        feed.publish(vec![change(41)]);
        assert_eq!(sub.live.try_recv().unwrap()[0].revision, 41);
    }

    #[test]
    fn from_revision_zero_of_a_whole_history_is_its_start() {
        let feed = Feed::new(0, FEED_WINDOW_BYTES);
        assert!(feed.subscribe(0).unwrap().backlog.is_empty(), "nothing was lost on a fresh store");
        feed.publish(vec![change(1), change(2)]);
        assert_eq!(feed.subscribe(0).unwrap().backlog.iter().map(|c| c.revision).collect::<Vec<_>>(), vec![1, 2]);
    }
}
