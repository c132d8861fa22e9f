//! A store that failed a commit stops taking writes; checks stop too, since no act could use
//! their tickets. Reads of what was committed go on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gapguard_core::{Entry, NsKey, SealedEvent};
use gapguard_engine::{Engine, EngineConfig, SystemClock};
use gapguard_store::{Batch, EmbeddedStore, Recovered, Storage, StoreError};
use serde_json::{json, Value};
use tower::ServiceExt as _;

/// The embedded store, whose commits fail once `fail` is set (as on a full disk).
struct Failing {
    store: EmbeddedStore,
    fail: Arc<AtomicBool>,
}

impl Storage for Failing {
    fn recover(&self) -> Result<Recovered, StoreError> {
        self.store.recover()
    }
    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(StoreError::Engine("No space left on device (injected)".into()));
        }
        self.store.commit(batch)
    }
    fn load_keys(&self, keys: &BTreeSet<NsKey>) -> Result<BTreeMap<NsKey, Entry>, StoreError> {
        self.store.load_keys(keys)
    }
    fn audit_range(&self, from_seq: u64, limit: usize) -> Result<Vec<SealedEvent>, StoreError> {
        self.store.audit_range(from_seq, limit)
    }
}

async fn call(app: &axum::Router, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
}

#[tokio::test]
async fn after_a_failed_commit_writes_and_checks_answer_503_and_reads_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let fail = Arc::new(AtomicBool::new(false));
    let store = Failing { store: EmbeddedStore::open(dir.path()).unwrap(), fail: Arc::clone(&fail) };
    let engine = Engine::open(Arc::new(store), Arc::new(SystemClock::default()), EngineConfig::default()).unwrap();
    let app = gapguard_server::app(engine);
    assert_eq!(call(&app, "PUT", "/v1/ns/n/kv/stock", json!({"value": 3})).await.0, StatusCode::OK);
    let check = json!({"conditions": [{"compare": {"key": "stock", "op": ">=", "value": 1}}]});
    assert_eq!(call(&app, "POST", "/v1/ns/n/check", check.clone()).await.0, StatusCode::OK);

    fail.store(true, Ordering::SeqCst);
    let (status, err) = call(&app, "PUT", "/v1/ns/n/kv/stock", json!({"value": 2})).await;
    assert_eq!((status, err["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")), "{err}");
    let (status, err) = call(&app, "POST", "/v1/ns/n/check", check).await;
    assert_eq!((status, err["error"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("unavailable")), "{err}");
    assert!(err["message"].as_str().unwrap().contains("no act could use a ticket"), "{err}");
    let (status, record) = call(&app, "GET", "/v1/ns/n/kv/stock", Value::Null).await;
    assert_eq!((status, &record["value"]), (StatusCode::OK, &json!(3)), "{record}");
    let (status, health) = call(&app, "GET", "/healthz", Value::Null).await;
    assert_eq!((status, health["status"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("failing")));
}
