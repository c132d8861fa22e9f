//! Every limit of DESIGN §5 at the limit and one past it, and malformed input, driven through
//! the real router over a real engine and redb file: each bad request gets its documented
//! status and code, and changes nothing.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use gapguard_engine::{Engine, EngineConfig, SystemClock};
use gapguard_store::EmbeddedStore;
use serde_json::{json, Value};
use tower::ServiceExt;

struct Guard {
    app: axum::Router,
    engine: Engine,
    _dir: tempfile::TempDir,
}

fn guard() -> Guard {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path()).unwrap();
    let engine = Engine::open(Arc::new(store), Arc::new(SystemClock::default()), EngineConfig::default()).unwrap();
    Guard { app: gapguard_server::app(engine.clone()), engine, _dir: dir }
}

impl Guard {
    async fn call(
        &self,
        method: &str,
        uri: &str,
        body: impl Into<Body>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Value) {
        let mut req = Request::builder().method(method).uri(uri).header("content-type", "application/json");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let response = self.app.clone().oneshot(req.body(body.into()).unwrap()).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let json =
            serde_json::from_slice(&bytes).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(&bytes)));
        (status, json)
    }

    async fn json(&self, method: &str, uri: &str, body: Value) -> (StatusCode, Value) {
        self.call(method, uri, body.to_string(), &[]).await
    }

    fn revision(&self) -> u64 {
        self.engine.snapshot().revision
    }

    /// Asserts a 400 `invalid_request` naming `field`, and that nothing was written.
    async fn assert_invalid(&self, method: &str, uri: &str, body: Value, field: &str) {
        let before = self.revision();
        let (status, err) = self.json(method, uri, body).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
        assert_eq!(err["error"], "invalid_request", "{err}");
        assert_eq!(err["field"], field, "{err}");
        assert!(err["message"].as_str().unwrap().len() > field.len(), "{err}");
        assert_eq!(self.revision(), before, "a refused request wrote something");
    }
}

fn stock_conditions(n: usize) -> Value {
    Value::Array((0..n).map(|i| json!({"exists": format!("k{i}")})).collect())
}

fn put_ops(n: usize) -> Value {
    Value::Array((0..n).map(|i| json!({"put": {"key": format!("k{i}"), "value": i}})).collect())
}

#[tokio::test]
async fn key_length_limit() {
    let g = guard();
    let at = "k".repeat(512);
    let (status, _) = g.json("PUT", &format!("/v1/ns/n/kv/{at}"), json!({"value": 1})).await;
    assert_eq!(status, StatusCode::OK);
    g.assert_invalid("PUT", &format!("/v1/ns/n/kv/{at}x"), json!({"value": 1}), "key").await;
    let ops = json!([{"put": {"key": format!("{at}x"), "value": 1}}]);
    g.assert_invalid("POST", "/v1/ns/n/act", json!({"ops": ops}), "ops[0].key").await;
}

#[tokio::test]
async fn value_size_limit() {
    let g = guard();
    // A JSON string of n bytes including its quotes.
    let string_of = |n: usize| Value::String("v".repeat(n - 2));
    let (status, body) = g.json("PUT", "/v1/ns/n/kv/big", json!({"value": string_of(256 * 1024)})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    g.assert_invalid("PUT", "/v1/ns/n/kv/big", json!({"value": string_of(256 * 1024 + 1)}), "value").await;
    let ops = json!([{"put": {"key": "k", "value": string_of(256 * 1024 + 1)}}]);
    g.assert_invalid("POST", "/v1/ns/n/act", json!({"ops": ops}), "ops[0].put.value").await;
}

#[tokio::test]
async fn body_size_limit_answers_413() {
    let g = guard();
    let before = g.revision();
    // 1 MiB + 1 of valid JSON: refused for its size before anything is decoded.
    let mut body = json!({"ops": put_ops(1)}).to_string();
    body.push_str(&" ".repeat(1024 * 1024 + 1 - body.len()));
    let (status, err) = g.call("POST", "/v1/ns/n/act", body.clone(), &[]).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    assert_eq!(err["error"], "payload_too_large");
    assert_eq!((&err["limit_bytes"], &err["field"]), (&json!(1024 * 1024), &json!("body")));
    body.pop();
    let (status, err) = g.call("POST", "/v1/ns/n/act", body, &[]).await;
    assert_eq!(status, StatusCode::OK, "a body of exactly 1 MiB is allowed: {err}");
    assert_eq!(g.revision(), before + 1);
}

#[tokio::test]
async fn conditions_and_ops_count_limits() {
    let g = guard();
    let (status, body) = g.json("POST", "/v1/ns/n/act", json!({"ops": put_ops(128)})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    g.assert_invalid("POST", "/v1/ns/n/act", json!({"ops": put_ops(129)}), "ops").await;
    let (status, body) = g.json("POST", "/v1/ns/n/check", json!({"conditions": stock_conditions(128)})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    g.assert_invalid("POST", "/v1/ns/n/check", json!({"conditions": stock_conditions(129)}), "conditions").await;
    let act = json!({"conditions": stock_conditions(129), "ops": put_ops(1)});
    g.assert_invalid("POST", "/v1/ns/n/act", act, "conditions").await;
    g.assert_invalid("POST", "/v1/ns/n/txn", json!({"if": stock_conditions(129)}), "if").await;
    g.assert_invalid("POST", "/v1/ns/n/txn", json!({"then": put_ops(129)}), "then").await;
    g.assert_invalid("POST", "/v1/ns/n/txn", json!({"else": put_ops(129)}), "else").await;
    g.assert_invalid("POST", "/v1/ns/n/act", json!({"ops": []}), "ops").await;
    g.assert_invalid("POST", "/v1/ns/n/check", json!({"conditions": []}), "conditions").await;
}

#[tokio::test]
async fn ticket_ttl_range() {
    let g = guard();
    let check = |ttl: u64| json!({"conditions": [{"absent": "x"}], "ttl_ms": ttl});
    for ok in [1, 3_600_000] {
        let (status, body) = g.json("POST", "/v1/ns/n/check", check(ok)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    g.assert_invalid("POST", "/v1/ns/n/check", check(0), "ttl_ms").await;
    g.assert_invalid("POST", "/v1/ns/n/check", check(3_600_001), "ttl_ms").await;
    g.assert_invalid("POST", "/v1/ns/n/check", json!({"conditions": [{"absent": "x"}], "ttl_ms": -5}), "ttl_ms").await;
}

#[tokio::test]
async fn idempotency_key_length() {
    let g = guard();
    let at = "i".repeat(255);
    let (status, _) =
        g.call("PUT", "/v1/ns/n/kv/a", json!({"value": 1}).to_string(), &[("idempotency-key", &at)]).await;
    assert_eq!(status, StatusCode::OK);
    let before = g.revision();
    let past = "i".repeat(256);
    let (status, err) =
        g.call("PUT", "/v1/ns/n/kv/a", json!({"value": 1}).to_string(), &[("idempotency-key", &past)]).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{err}");
    assert_eq!(err["field"], "Idempotency-Key");
    assert_eq!(g.revision(), before);
    // Two keys on one request: neither is taken.
    let twice = [("idempotency-key", "k-1"), ("idempotency-key", "k-2")];
    let (status, err) = g.call("PUT", "/v1/ns/n/kv/a", json!({"value": 2}).to_string(), &twice).await;
    assert_eq!((status, &err["field"]), (StatusCode::BAD_REQUEST, &json!("Idempotency-Key")), "{err}");
    assert!(err["message"].as_str().unwrap().contains("more than once"), "{err}");
    assert_eq!(g.revision(), before);
}

#[tokio::test]
async fn malformed_and_unknown_input_is_named() {
    let g = guard();
    g.assert_invalid("PUT", "/v1/ns/n/kv/a", json!({"value": 1, "ttl": 3}), "ttl").await;
    g.assert_invalid("POST", "/v1/ns/n/check", json!({"conditions": [{"exist": "a"}]}), "conditions[0]").await;
    let bad_op = json!({"conditions": [{"compare": {"key": "a", "op": ">=", "value": "1"}}]});
    g.assert_invalid("POST", "/v1/ns/n/check", bad_op, "conditions[0].compare.value").await;
    g.assert_invalid("POST", "/v1/ns/n/act", json!({"ops": [{"add": {"key": "a", "by": 1, "x": 1}}]}), "ops[0].add.x")
        .await;
    g.assert_invalid("POST", "/v1/ns/n/act", json!({"ticket": 5, "ops": put_ops(1)}), "ticket").await;
    g.assert_invalid("PUT", "/v1/ns/bad%20ns/kv/a", json!({"value": 1}), "namespace").await;
    g.assert_invalid("PUT", "/v1/ns/%2e%2e/kv/a", json!({"value": 1}), "namespace").await;
    g.assert_invalid("PUT", "/v1/ns/%2E/kv/a", json!({"value": 1}), "namespace").await;
    let dotted = json!({"ops": [{"put": {"key": "a/../b", "value": 1}}]});
    g.assert_invalid("POST", "/v1/ns/n/act", dotted, "ops[0].key").await;
    for raw in ["{", "not json", "", "[1,2]", "{\"value\": 1} trailing", "{\"value\": 1,}", "{\"value\": 0x10}"] {
        let (status, err) = g.call("PUT", "/v1/ns/n/kv/a", raw, &[]).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{raw:?}: {err}");
        assert_eq!(err["error"], "invalid_request");
        // Where no field can be named, the body is: never `?`.
        assert_eq!(err["field"], "body", "{raw:?}: {err}");
    }
    // Bad syntax inside a field: the field that holds it.
    let (_, err) = g.call("POST", "/v1/ns/n/act", r#"{"ops": [{"put": {"key": "a", "value": 1,}}]}"#, &[]).await;
    assert_eq!(err["field"], "ops[0].put", "{err}");
    // A query's bad or unknown parameter is named, as a body's field is.
    let (status, err) = g.call("GET", "/v1/ns/n/kv?limit=abc", "", &[]).await;
    assert_eq!((status, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("limit")), "{err}");
    let (status, err) = g.call("GET", "/v1/ns/n/audit?colour=red", "", &[]).await;
    assert_eq!((status, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("colour")), "{err}");
    assert!(err["message"].as_str().unwrap().contains("colour"), "{err}");
    // A missing field is named where it is missing, at the top or below.
    g.assert_invalid("PUT", "/v1/ns/n/kv/a", json!({}), "value").await;
    g.assert_invalid("POST", "/v1/ns/n/pools/p/reserve", json!({"ttl_ms": 5}), "amount").await;
    g.assert_invalid("POST", "/v1/ns/n/act", json!({"ops": [{"add": {"key": "a"}}]}), "ops[0].add.by").await;
    let (status, err) = g.call("GET", "/v1/nope", "", &[]).await;
    assert_eq!((status, err["error"].as_str()), (StatusCode::NOT_FOUND, Some("no_route")));
    let (status, err) = g.call("PATCH", "/v1/ns/n/kv/a", "", &[]).await;
    assert_eq!((status, err["error"].as_str()), (StatusCode::METHOD_NOT_ALLOWED, Some("method_not_allowed")));
    let (status, err) =
        g.call("POST", "/v1/ns/n/act", json!({"ticket": "gt1.abc.def", "ops": put_ops(1)}).to_string(), &[]).await;
    assert_eq!((status, err["error"].as_str()), (StatusCode::BAD_REQUEST, Some("invalid_ticket")));
    assert_eq!(g.revision(), 0);
}

#[tokio::test]
async fn keys_may_contain_slashes_and_escapes() {
    let g = guard();
    let (status, _) = g.json("PUT", "/v1/ns/n/kv/orders/42/line%201", json!({"value": {"qty": 2}})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, kv) = g.json("GET", "/v1/ns/n/kv/orders/42/line%201", Value::Null).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(kv["key"], "orders/42/line 1");
    assert_eq!(kv["value"], json!({"qty": 2}));
    let (_, list) = g.json("GET", "/v1/ns/n/kv?prefix=orders/", Value::Null).await;
    assert_eq!(list["items"][0]["key"], "orders/42/line 1");
}

#[tokio::test]
async fn namespace_correlation_id_and_list_limits() {
    let g = guard();
    let ns = "n".repeat(128);
    let (status, body) = g.json("PUT", &format!("/v1/ns/{ns}/kv/a"), json!({"value": 1})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    g.assert_invalid("PUT", &format!("/v1/ns/{ns}n/kv/a"), json!({"value": 1}), "namespace").await;

    let at = "c".repeat(128);
    let (status, _) =
        g.call("PUT", "/v1/ns/n/kv/a", json!({"value": 1}).to_string(), &[("x-correlation-id", &at)]).await;
    assert_eq!(status, StatusCode::OK);
    let before = g.revision();
    let past = "c".repeat(129);
    let (status, err) =
        g.call("PUT", "/v1/ns/n/kv/a", json!({"value": 2}).to_string(), &[("x-correlation-id", &past)]).await;
    assert_eq!((status, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("X-Correlation-Id")));
    assert_eq!(g.revision(), before);

    for (uri, field) in [("/v1/ns/n/kv?limit=", "limit"), ("/v1/ns/n/audit?limit=", "limit")] {
        let (status, body) = g.call("GET", &format!("{uri}10000"), "", &[]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        for bad in ["10001", "0"] {
            let (status, err) = g.call("GET", &format!("{uri}{bad}"), "", &[]).await;
            assert_eq!((status, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some(field)), "{uri}{bad}");
        }
    }
}

#[tokio::test]
async fn primitive_limits_and_bad_input() {
    let g = guard();
    let (status, _) = g.json("PUT", "/v1/ns/n/pools/p", json!({"capacity": 10})).await;
    assert_eq!(status, StatusCode::OK);
    for ok in [1u64, 86_400_000] {
        let (status, body) = g.json("POST", "/v1/ns/n/pools/p/reserve", json!({"amount": 1, "ttl_ms": ok})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let (status, body) =
            g.json("POST", &format!("/v1/ns/n/leases/l{ok}/acquire"), json!({"holder": "h", "ttl_ms": ok})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }
    for bad in [0u64, 86_400_001] {
        g.assert_invalid("POST", "/v1/ns/n/pools/p/reserve", json!({"amount": 1, "ttl_ms": bad}), "ttl_ms").await;
        g.assert_invalid("POST", "/v1/ns/n/leases/x/acquire", json!({"holder": "h", "ttl_ms": bad}), "ttl_ms").await;
    }
    g.assert_invalid("POST", "/v1/ns/n/pools/p/reserve", json!({"amount": 0, "ttl_ms": 5}), "amount").await;
    g.assert_invalid("POST", "/v1/ns/n/pools/p/reserve", json!({"amount": 1, "ttl_ms": 5, "context": [1]}), "context")
        .await;
    g.assert_invalid("POST", "/v1/ns/n/pools/p/reserve", json!({"amount": -1, "ttl_ms": 5}), "amount").await;
    let at = "h".repeat(512);
    let (status, body) = g.json("POST", "/v1/ns/n/leases/y/acquire", json!({"holder": at, "ttl_ms": 5})).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    g.assert_invalid("POST", "/v1/ns/n/leases/z/acquire", json!({"holder": format!("{at}h"), "ttl_ms": 5}), "holder")
        .await;
    let grant = |s: &str| json!({"subject": s, "action": "read", "resource": "doc:1"});
    let (status, _) = g.json("POST", "/v1/ns/n/grants", grant(&"s".repeat(512))).await;
    assert_eq!(status, StatusCode::OK);
    g.assert_invalid("POST", "/v1/ns/n/grants", grant(&"s".repeat(513)), "body.subject").await;
    g.assert_invalid("POST", "/v1/ns/n/grants", grant("a\u{0}b"), "body.subject").await;
    let act = json!({"ops": [{"reserve": {"pool": "p", "amount": 1, "ttl_ms": 0}}]});
    g.assert_invalid("POST", "/v1/ns/n/act", act, "ops[0].reserve.ttl_ms").await;
    g.assert_invalid("GET", "/v1/ns/n/watch?types=kv,bogus", Value::Null, "types").await;

    // A commit or release takes no body, or `{}`; anything else is refused, and the
    // reservation stays held (any body was ignored before).
    let (_, held) = g.json("POST", "/v1/ns/n/pools/p/reserve", json!({"amount": 1, "ttl_ms": 60_000})).await;
    let id = held["reservation"].as_str().expect("a reservation id");
    for action in ["commit", "release"] {
        let uri = format!("/v1/ns/n/reservations/{id}/{action}");
        g.assert_invalid("POST", &uri, json!({"amount": 2}), "amount").await;
        g.assert_invalid("POST", &uri, json!([]), "body").await;
        let (status, err) = g.call("POST", &uri, "garbage", &[]).await;
        assert_eq!((status, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("body")), "{err}");
    }
    let (_, state) = g.json("GET", &format!("/v1/ns/n/reservations/{id}"), Value::Null).await;
    assert_eq!(state["state"], "held", "{state}");
    // So does a key's delete; the key stays.
    let (status, _) = g.json("PUT", "/v1/ns/n/kv/d", json!({"value": 1})).await;
    assert_eq!(status, StatusCode::OK);
    let (status, err) = g.call("DELETE", "/v1/ns/n/kv/d", "garbage", &[]).await;
    assert_eq!((status, err["field"].as_str()), (StatusCode::BAD_REQUEST, Some("body")), "{err}");
    g.assert_invalid("DELETE", "/v1/ns/n/kv/d", json!({"if_version": 1}), "if_version").await;
    let (status, kept) = g.json("GET", "/v1/ns/n/kv/d", Value::Null).await;
    assert_eq!((status, &kept["value"]), (StatusCode::OK, &json!(1)), "a refused delete deleted");
    for body in ["{}", ""] {
        let (status, _) = g.json("PUT", "/v1/ns/n/kv/d", json!({"value": 2})).await;
        assert_eq!(status, StatusCode::OK);
        let (status, done) = g.call("DELETE", "/v1/ns/n/kv/d", body, &[]).await;
        assert_eq!(status, StatusCode::OK, "delete with {body:?}: {done}");
    }
    for (action, body) in [("commit", "{}"), ("release", "")] {
        let (_, held) = g.json("POST", "/v1/ns/n/pools/p/reserve", json!({"amount": 1, "ttl_ms": 60_000})).await;
        let uri = format!("/v1/ns/n/reservations/{}/{action}", held["reservation"].as_str().unwrap());
        let (status, done) = g.call("POST", &uri, body, &[]).await;
        assert_eq!(status, StatusCode::OK, "{action} with {body:?}: {done}");
    }
}
