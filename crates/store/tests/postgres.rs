//! The storage conformance suite against the PostgreSQL backend, on a real PostgreSQL 15 that
//! the test starts itself (see `gapguard-testkit`), plus what only a shared backend does.

use std::collections::BTreeSet;
use std::path::Path;

use gapguard_core::{Entry, NsKey, Record};
use gapguard_store::{Batch, LockRequest, PgOptions, PgStore, SharedStorage, Storage, StoreError};
use gapguard_testkit::Postgres;
use serde_json::json;

/// A schema per directory: opening the same directory again opens the same tables.
fn schema_of(dir: &Path) -> String {
    let name: String =
        dir.file_name().expect("a name").to_string_lossy().chars().filter(|c| c.is_ascii_alphanumeric()).collect();
    format!("t_{}", name.to_ascii_lowercase())
}

fn open(url: &str, schema: &str) -> PgStore {
    PgStore::connect(url, PgOptions { schema: Some(schema.into()), ..PgOptions::default() }).expect("connect")
}

fn entry(value: serde_json::Value, revision: u64) -> Entry {
    Entry {
        record: Some(Record { value, version: 1, create_revision: revision, mod_revision: revision }),
        changed_by: None,
        changed_at: revision,
    }
}

#[test]
fn postgres_backend_passes_the_conformance_suite_and_shares_state() {
    let pg = Postgres::start();
    let url = pg.url("postgres");
    gapguard_store::conformance::run_all(|dir| open(&url, &schema_of(dir)));

    // Two stores over one schema: what one commits, the other's change log shows, in order.
    let a = open(&url, "shared_two");
    let b = open(&url, "shared_two");
    let start = b.changes_since(0).expect("changes");
    assert_eq!(start.changes.len(), 0);
    let k = NsKey::new("ns", "k");
    let locked = a.begin(&LockRequest { keys: BTreeSet::from([k.clone()]), ..LockRequest::default() }).expect("begin");
    assert_eq!(locked.revision, 0);
    assert!(locked.entries.is_empty());
    a.commit(Batch {
        revision: 1,
        entries: Batch::share_entries([(k.clone(), entry(json!(1), 1))]),
        ..Batch::default()
    })
    .expect("commit");
    b.commit(Batch {
        revision: 2,
        entries: Batch::share_entries([(k.clone(), entry(json!(2), 2))]),
        ..Batch::default()
    })
    .expect("commit");
    let seen = a.changes_since(start.cursor).expect("changes");
    assert_eq!(seen.revision, 2);
    let values: Vec<_> = seen.changes.iter().map(|(rev, key, e)| (*rev, key.clone(), e.clone())).collect();
    assert_eq!(values, vec![(1, k.clone(), Some(entry(json!(1), 1))), (2, k.clone(), Some(entry(json!(2), 2)))]);
    assert_eq!(a.changes_since(seen.cursor).expect("changes").changes.len(), 0);

    // A batch behind the stored revision is refused whole.
    let err = a.commit(Batch {
        revision: 1,
        entries: Batch::share_entries([(k.clone(), entry(json!(9), 1))]),
        ..Batch::default()
    });
    assert!(matches!(err, Err(StoreError::Invalid(_))), "{err:?}");
    assert_eq!(b.recover().expect("recover").entries, vec![(k.clone(), entry(json!(2), 2))]);

    // An idempotency key claimed on one node is refused on the other until released.
    let key = gapguard_store::IdempotencyKey { ns: "ns".into(), scope: String::new(), key: "abc".into() };
    assert!(a.claim_idempotency(&key, 60_000).expect("claim"));
    assert!(!b.claim_idempotency(&key, 60_000).expect("claim"));
    a.release_claim(&key);
    assert!(b.claim_idempotency(&key, 60_000).expect("claim"));
    a.ping().expect("ping");

    // A claim whose node vanished lapses after its TTL, and not before.
    let orphaned = gapguard_store::IdempotencyKey { ns: "ns".into(), scope: String::new(), key: "lost".into() };
    assert!(a.claim_idempotency(&orphaned, 400).expect("claim"));
    assert!(!b.claim_idempotency(&orphaned, 400).expect("claim"), "still held within its TTL");
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert!(b.claim_idempotency(&orphaned, 400).expect("claim"), "free once its TTL passed");
    // The first node releasing its lapsed claim late must not free the second's claim.
    a.release_claim(&orphaned);
    assert!(!a.claim_idempotency(&orphaned, 400).expect("claim"), "b's claim was released by a");
}

#[test]
fn the_change_log_keeps_its_newest_changes_and_refuses_a_cursor_before_them() {
    let pg = Postgres::start();
    let url = pg.url("postgres");
    let options = PgOptions { schema: Some("kept".into()), changes_kept: 3, ..PgOptions::default() };
    let store = PgStore::connect(&url, options).expect("connect");
    for rev in 1..=5 {
        let k = NsKey::new("ns", format!("k{rev}"));
        store
            .commit(Batch {
                revision: rev,
                entries: Batch::share_entries([(k, entry(json!(rev), rev))]),
                ..Batch::default()
            })
            .unwrap();
    }
    let all = store.changes_since(0).expect("changes");
    assert_eq!(all.changes.len(), 5);
    store.commit(Batch { revision: 5, prune_expired: true, ..Batch::default() }).expect("prune");
    let oldest_kept = all.cursor - 2;
    // At the limit: a cursor just before the oldest change kept reads the three kept.
    let kept = store.changes_since(oldest_kept - 1).expect("a cursor at the limit");
    let revisions: Vec<u64> = kept.changes.iter().map(|(rev, _, _)| *rev).collect();
    assert_eq!(revisions, vec![3, 4, 5]);
    // One past: the change after that cursor is gone, so the caller must reload.
    let err = store.changes_since(oldest_kept - 2);
    assert!(matches!(err, Err(StoreError::Invalid(_))), "{err:?}");
}

#[test]
fn a_newer_schema_is_refused_with_a_clear_message() {
    let pg = Postgres::start();
    let url = pg.url("postgres");
    drop(open(&url, "public"));
    pg.psql("postgres", "UPDATE gg_schema SET version = 99");
    let err = PgStore::connect(&url, PgOptions::default()).err().expect("a newer schema is refused");
    let message = err.to_string();
    assert!(message.contains("version 99") && message.contains("newer"), "{message}");
}

#[test]
fn an_unreachable_database_is_unavailable_not_a_panic() {
    let port = gapguard_testkit::free_port();
    let err = PgStore::connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres"), PgOptions::default())
        .err()
        .expect("nothing listens there");
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
}

/// A claim whose release failed while the database was away is released once it is back,
/// not left to lapse: a retry of the request is not told "in progress" for the claim's life.
#[test]
fn a_claim_whose_release_failed_in_an_outage_is_released_once_the_database_is_back() {
    let mut pg = Postgres::start();
    let url = pg.url("postgres");
    let (a, b) = (open(&url, "released_late"), open(&url, "released_late"));
    let key = gapguard_store::IdempotencyKey { ns: "ns".into(), scope: String::new(), key: "outage".into() };
    assert!(a.claim_idempotency(&key, 60_000).expect("claim"));
    pg.stop();
    a.release_claim(&key);
    pg.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        if let Ok(true) = b.claim_idempotency(&key, 60_000) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the claim was not released within 20 s of the restart");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
