//! The client against a canned HTTP server: what goes on the wire (method, path, query,
//! headers, body) and how each kind of answer is decoded, without a real gapguard server.

use std::sync::{Arc, Mutex};

use std::time::Duration;

use gapguard_api::{
    AcquireRequest, ActRequest, AddOp, CheckRequest, CompareCondition, CompareOp, Condition, GrantTuple,
    LeaseReleaseRequest, Op, OpResult, PoolRequest, PutResponse, RenewRequest, ReserveRequest, ResolveRequest,
    TxnRequest,
};
use gapguard_client::{AuditQuery, Client, ClientError, GrantsQuery, RequestOptions, WatchMessage, WatchQuery};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One request as the server received it.
#[derive(Debug, Default, Clone)]
struct Seen {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: String,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// A canned response: status line, extra headers, body.
type Canned = (&'static str, Vec<(&'static str, &'static str)>, &'static str);

/// Reads a request line and headers (not the body).
async fn read_head<R: tokio::io::AsyncBufRead + Unpin>(reader: &mut R) -> Seen {
    let mut line = String::new();
    reader.read_line(&mut line).await.unwrap();
    let mut parts = line.split_whitespace();
    let mut request =
        Seen { method: parts.next().unwrap().into(), target: parts.next().unwrap().into(), ..Seen::default() };
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await.unwrap();
        let line = line.trim_end();
        if line.is_empty() {
            return request;
        }
        let (name, value) = line.split_once(':').unwrap();
        request.headers.push((name.trim().to_lowercase(), value.trim().to_owned()));
    }
}

/// Serves one canned response (`status line`, extra headers, body) per connection, in order,
/// recording each request.
async fn canned(responses: Vec<Canned>) -> (String, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        for (status, headers, body) in responses {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut reader = BufReader::new(read);
            let mut request = read_head(&mut reader).await;
            let length: usize = request.header("content-length").map_or(0, |v| v.parse().unwrap());
            let mut received = vec![0; length];
            reader.read_exact(&mut received).await.unwrap();
            request.body = String::from_utf8(received).unwrap();
            log.lock().unwrap().push(request);
            let mut response = format!("HTTP/1.1 {status}\r\nconnection: close\r\ncontent-length: {}\r\n", body.len());
            for (name, value) in headers {
                response.push_str(&format!("{name}: {value}\r\n"));
            }
            response.push_str("\r\n");
            response.push_str(body);
            write.write_all(response.as_bytes()).await.unwrap();
            write.shutdown().await.unwrap();
        }
    });
    (base, seen)
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
async fn put_encodes_the_key_path_sends_the_headers_and_reports_a_replay() {
    let (base, seen) = canned(vec![(
        "200 OK",
        vec![JSON, ("idempotent-replayed", "true"), ("x-correlation-id", "corr-1")],
        r#"{"revision":7,"version":2}"#,
    )])
    .await;
    let client = Client::new(&base).unwrap();
    let options = RequestOptions::new().idempotency_key("idem-1").correlation_id("corr-1");
    let response = client.put("shop", "orders/4 2?x", &json!({"n": 1}), &options).await.unwrap();
    assert_eq!(response.value, PutResponse { revision: 7, version: 2 });
    assert!(response.replayed);
    assert_eq!(response.correlation_id.as_deref(), Some("corr-1"));
    let seen = seen.lock().unwrap()[0].clone();
    assert_eq!((seen.method.as_str(), seen.target.as_str()), ("PUT", "/v1/ns/shop/kv/orders/4%202%3Fx"));
    assert_eq!(seen.header("idempotency-key"), Some("idem-1"));
    assert_eq!(seen.header("x-correlation-id"), Some("corr-1"));
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.json(), json!({"value": {"n": 1}}));
}

#[tokio::test]
async fn an_answer_without_the_replay_header_is_not_a_replay() {
    let (base, _) = canned(vec![("200 OK", vec![JSON], r#"{"revision":8}"#)]).await;
    let client = Client::new(&base).unwrap();
    let response = client.delete("shop", "k", &RequestOptions::default()).await.unwrap();
    assert_eq!(response.value.revision, 8);
    assert!(!response.replayed);
    assert_eq!(response.correlation_id, None);
}

#[tokio::test]
async fn an_error_status_with_an_error_body_is_an_api_error_with_its_details() {
    let body = r#"{"error":"stale_check","message":"ticket condition 0 no longer holds","changed":[{"index":0}]}"#;
    let (base, seen) = canned(vec![("409 Conflict", vec![JSON], body)]).await;
    let client = Client::new(&base).unwrap();
    let act = ActRequest {
        ticket: Some("t".into()),
        conditions: vec![],
        ops: vec![Op::Add(AddOp { key: "stock/a".into(), by: (-1).into() })],
        flow: None,
    };
    let err = client.act("shop", &act, &RequestOptions::default()).await.unwrap_err();
    assert_eq!(err.status(), Some(409));
    assert_eq!(err.code(), Some("stale_check"));
    assert_eq!(err.to_string(), "stale_check: ticket condition 0 no longer holds");
    let ClientError::Api { body, .. } = err else { panic!("not an API error") };
    assert_eq!(body.details["changed"], json!([{"index": 0}]));
    let seen = seen.lock().unwrap()[0].clone();
    assert_eq!((seen.method.as_str(), seen.target.as_str()), ("POST", "/v1/ns/shop/act"));
    assert_eq!(seen.json(), json!({"ticket": "t", "ops": [{"add": {"key": "stock/a", "by": -1}}]}));
}

#[tokio::test]
async fn an_error_status_without_an_error_body_is_a_decode_error_quoting_the_body() {
    let (base, _) =
        canned(vec![("502 Bad Gateway", vec![("content-type", "text/html")], "<h1>bad gateway</h1>")]).await;
    let client = Client::new(&base).unwrap();
    let err = client.get("shop", "k").await.unwrap_err();
    assert!(matches!(err, ClientError::Decode { status: 502, .. }), "{err:?}");
    assert!(err.to_string().contains("bad gateway"), "{err}");
}

#[tokio::test]
async fn a_success_body_of_the_wrong_shape_is_a_decode_error() {
    let (base, _) = canned(vec![("200 OK", vec![JSON], r#"{"revision":"seven"}"#)]).await;
    let client = Client::new(&base).unwrap();
    let err = client.delete("shop", "k", &RequestOptions::default()).await.unwrap_err();
    assert!(matches!(err, ClientError::Decode { status: 200, .. }), "{err:?}");
    assert!(err.to_string().contains("/v1/ns/shop/kv/k"), "{err}");
}

#[tokio::test]
async fn a_refused_connection_is_a_transport_error_naming_the_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let err = client.health().await.unwrap_err();
    assert!(err.is_connect(), "{err:?}");
    assert!(
        err.to_string().starts_with(&format!("cannot reach gapguard at http://127.0.0.1:{port}/healthz: ")),
        "{err}"
    );
}

#[tokio::test]
async fn list_and_audit_send_only_the_query_parameters_given() {
    let (base, seen) = canned(vec![
        ("200 OK", vec![JSON], r#"{"items":[],"revision":1}"#),
        ("200 OK", vec![JSON], r#"{"items":[],"revision":1}"#),
        ("200 OK", vec![JSON], r#"{"items":[],"more":true,"revision":1}"#),
        ("200 OK", vec![JSON], r#"{"events":[]}"#),
        ("200 OK", vec![JSON], r#"{"events":[],"next_after_seq":9}"#),
    ])
    .await;
    let client = Client::new(&base).unwrap();
    client.list("shop", "", None).await.unwrap();
    client.list("shop", "orders/&x", Some(5)).await.unwrap();
    assert!(client.list_after("shop", "o", Some("o/9 z"), None).await.unwrap().more);
    client.audit("shop", &AuditQuery::default()).await.unwrap();
    let query = AuditQuery {
        after_seq: Some(3),
        key: Some("a b".into()),
        limit: Some(10),
        newest: true,
        ..AuditQuery::default()
    };
    assert_eq!(client.audit("shop", &query).await.unwrap().next_after_seq, Some(9));
    let targets: Vec<String> = seen.lock().unwrap().iter().map(|s| s.target.clone()).collect();
    assert_eq!(
        targets,
        [
            "/v1/ns/shop/kv",
            "/v1/ns/shop/kv?prefix=orders%2F%26x&limit=5",
            "/v1/ns/shop/kv?prefix=o&after=o%2F9+z",
            "/v1/ns/shop/audit",
            "/v1/ns/shop/audit?after_seq=3&key=a+b&limit=10&newest=true",
        ]
    );
}

#[tokio::test]
async fn check_and_txn_post_their_bodies() {
    let (base, seen) = canned(vec![
        ("200 OK", vec![JSON], r#"{"ticket":"T","revision":3,"expires_at":"2030-01-01T00:00:00Z","expires_at_ms":1}"#),
        ("200 OK", vec![JSON], r#"{"succeeded":false,"revision":3,"results":[]}"#),
    ])
    .await;
    let client = Client::new(&format!("{base}/")).unwrap();
    let cond = Condition::Compare(CompareCondition { key: "s".into(), op: CompareOp::Ge, value: 1.into() });
    let check = CheckRequest { conditions: vec![cond.clone()], ttl_ms: Some(500), flow: None };
    assert_eq!(client.check("shop", &check, &RequestOptions::default()).await.unwrap().value.ticket, "T");
    let txn = TxnRequest { compare: vec![cond], success: vec![], failure: vec![] };
    assert!(!client.txn("shop", &txn, &RequestOptions::default()).await.unwrap().value.succeeded);
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen[0].target, "/v1/ns/shop/check");
    assert_eq!(
        seen[0].json(),
        json!({"conditions": [{"compare": {"key": "s", "op": ">=", "value": 1}}], "ttl_ms": 500})
    );
    assert_eq!(seen[1].target, "/v1/ns/shop/txn");
    assert_eq!(seen[1].json()["if"][0]["compare"]["key"], "s");
}

#[tokio::test]
async fn a_failing_health_check_is_an_answer_not_an_error() {
    let (base, _) = canned(vec![("503 Service Unavailable", vec![JSON], r#"{"status":"failing","revision":4}"#)]).await;
    let health = Client::new(&base).unwrap().health().await.unwrap();
    assert_eq!((health.status.as_str(), health.revision), ("failing", 4));
}

#[test]
fn base_urls_are_checked_and_normalised() {
    assert_eq!(Client::new("http://127.0.0.1:7700/").unwrap().base_url(), "http://127.0.0.1:7700");
    assert_eq!(Client::new("http://h:1/prefix/").unwrap().base_url(), "http://h:1/prefix");
    for bad in ["127.0.0.1:7700", "ftp://h/", "http://h/?q=1", "not a url"] {
        assert!(matches!(Client::new(bad), Err(ClientError::InvalidArgument { .. })), "{bad}");
    }
}

#[tokio::test]
async fn invalid_header_values_and_keys_are_refused_before_sending() {
    let client = Client::new("http://127.0.0.1:9").unwrap();
    let options = RequestOptions::new().correlation_id("a\nb");
    let err = client.delete("shop", "k", &options).await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidArgument { .. }), "{err:?}");
    let err = client.get("shop", "a/../b").await.unwrap_err();
    assert!(matches!(err, ClientError::InvalidArgument { .. }), "{err:?}");
}

const POOL: &str = r#"{"pool":"vm quota","capacity":10,"used":0,"reserved":4,"available":6,"revision":5}"#;
const LEASE: &str = r#"{"name":"mig/1","holder":"h1","token":3,"held":true,"expires_at":"2030-01-01T00:00:00Z","expires_at_ms":1,"revision":6}"#;
const COMMITTED: &str = r#"{"revision":7,"result":{"op":"commit","reservation":"rsv_1","pool":{"pool":"p","capacity":10,"used":4,"reserved":0}}}"#;

#[tokio::test]
async fn pool_reservation_and_lease_calls_use_their_routes_bodies_and_headers() {
    let (base, seen) = canned(vec![
        ("200 OK", vec![JSON, ("idempotent-replayed", "true")], POOL),
        ("200 OK", vec![JSON], POOL),
        (
            "200 OK",
            vec![JSON],
            r#"{"reservation":"rsv_1","pool":"vm quota","amount":4,"expires_at":"2030-01-01T00:00:00Z","expires_at_ms":1,"revision":6}"#,
        ),
        (
            "200 OK",
            vec![JSON],
            r#"{"reservation":"rsv_1","pool":"p","amount":4,"state":"held","expires_at":"x","expires_at_ms":1,"context":{"vm":"v-1"}}"#,
        ),
        ("200 OK", vec![JSON], COMMITTED),
        ("200 OK", vec![JSON], COMMITTED.replace("commit", "release").leak()),
        ("200 OK", vec![JSON], LEASE),
        ("200 OK", vec![JSON], LEASE),
        ("200 OK", vec![JSON], LEASE),
        ("200 OK", vec![JSON], LEASE),
    ])
    .await;
    let client = Client::new(&base).unwrap();
    let idem = RequestOptions::new().idempotency_key("i-1").correlation_id("c-1");
    let none = RequestOptions::default();
    let set = client.set_pool("shop", "vm quota", &PoolRequest { capacity: 10 }, &idem).await.unwrap();
    assert!(set.replayed);
    assert_eq!(set.value.available, 6);
    assert_eq!(client.get_pool("shop", "vm quota").await.unwrap().reserved, 4);
    let reserve = ReserveRequest { amount: 4, ttl_ms: 60_000, context: Some(json!({"vm": "v-1"})) };
    assert_eq!(client.reserve("shop", "vm quota", &reserve, &none).await.unwrap().value.reservation, "rsv_1");
    assert_eq!(client.get_reservation("shop", "rsv_1").await.unwrap().state, "held");
    let committed = client.commit_reservation("shop", "rsv_1", &idem).await.unwrap().value;
    assert!(matches!(committed.result, OpResult::Commit { ref pool, .. } if pool.used == 4), "{committed:?}");
    let released = client.release_reservation("shop", "rsv_1", &none).await.unwrap().value;
    assert!(matches!(released.result, OpResult::Release { .. }), "{released:?}");
    let acquire = AcquireRequest { holder: "h1".into(), ttl_ms: 1000 };
    assert_eq!(client.acquire_lease("shop", "mig/1", &acquire, &idem).await.unwrap().value.token, 3);
    client.renew_lease("shop", "mig/1", &RenewRequest { token: 3, ttl_ms: None }, &none).await.unwrap();
    client.release_lease("shop", "mig/1", &LeaseReleaseRequest { token: 3 }, &none).await.unwrap();
    assert!(client.get_lease("shop", "mig/1").await.unwrap().held);

    let seen = seen.lock().unwrap().clone();
    let routes: Vec<(&str, &str)> = seen.iter().map(|s| (s.method.as_str(), s.target.as_str())).collect();
    assert_eq!(
        routes,
        [
            ("PUT", "/v1/ns/shop/pools/vm%20quota"),
            ("GET", "/v1/ns/shop/pools/vm%20quota"),
            ("POST", "/v1/ns/shop/pools/vm%20quota/reserve"),
            ("GET", "/v1/ns/shop/reservations/rsv_1"),
            ("POST", "/v1/ns/shop/reservations/rsv_1/commit"),
            ("POST", "/v1/ns/shop/reservations/rsv_1/release"),
            ("POST", "/v1/ns/shop/leases/mig%2F1/acquire"),
            ("POST", "/v1/ns/shop/leases/mig%2F1/renew"),
            ("POST", "/v1/ns/shop/leases/mig%2F1/release"),
            ("GET", "/v1/ns/shop/leases/mig%2F1"),
        ]
    );
    assert_eq!(seen[0].json(), json!({"capacity": 10}));
    assert_eq!((seen[0].header("idempotency-key"), seen[0].header("x-correlation-id")), (Some("i-1"), Some("c-1")));
    assert_eq!(seen[2].json(), json!({"amount": 4, "ttl_ms": 60000, "context": {"vm": "v-1"}}));
    assert_eq!(seen[4].header("idempotency-key"), Some("i-1"));
    assert_eq!((seen[4].body.as_str(), seen[5].body.as_str()), ("", ""), "commit and release have no body");
    assert_eq!(seen[6].json(), json!({"holder": "h1", "ttl_ms": 1000}));
    assert_eq!(seen[7].json(), json!({"token": 3}));
    assert_eq!(seen[8].json(), json!({"token": 3}));
}

#[tokio::test]
async fn grant_and_orphan_calls_use_their_routes_bodies_and_queries() {
    let grant_applied = r#"{"revision":3,"result":{"op":"grant","existed":false}}"#;
    let (base, seen) = canned(vec![
        ("200 OK", vec![JSON], grant_applied),
        ("200 OK", vec![JSON], r#"{"revision":4,"result":{"op":"revoke","existed":true}}"#),
        ("200 OK", vec![JSON], r#"{"items":[],"revision":4}"#),
        (
            "200 OK",
            vec![JSON],
            r#"{"items":[{"subject":"user:alice","action":"read","resource":"doc:9"}],"revision":4}"#,
        ),
        ("200 OK", vec![JSON], r#"{"items":[],"revision":4}"#),
        (
            "200 OK",
            vec![JSON],
            r#"{"items":[{"id":"orp_1","kind":"reservation","reservation":"rsv_1","pool":"p","amount":2,"expired_at":"x","expired_at_ms":1,"resolved":true,"note":"deleted vm"}],"revision":4}"#,
        ),
        ("200 OK", vec![JSON], r#"{"revision":5,"result":{"op":"resolve","orphan":"orp_1"}}"#),
        ("200 OK", vec![JSON], r#"{"revision":6,"result":{"op":"resolve","orphan":"orp 2"}}"#),
    ])
    .await;
    let client = Client::new(&base).unwrap();
    let none = RequestOptions::default();
    let tuple = GrantTuple { subject: "user:alice".into(), action: "read".into(), resource: "doc:9".into() };
    let granted = client.grant("shop", &tuple, &RequestOptions::new().idempotency_key("g-1")).await.unwrap();
    assert_eq!(granted.value.result, OpResult::Grant { existed: false });
    assert_eq!(client.revoke("shop", &tuple, &none).await.unwrap().value.result, OpResult::Revoke { existed: true });
    client.list_grants("shop", &GrantsQuery::default()).await.unwrap();
    let query = GrantsQuery { subject: Some("user:alice".into()), resource: Some("doc:9".into()) };
    assert_eq!(client.list_grants("shop", &query).await.unwrap().items, std::slice::from_ref(&tuple));
    client.list_orphans("shop", false).await.unwrap();
    let orphans = client.list_orphans("shop", true).await.unwrap();
    assert_eq!((orphans.items[0].id.as_str(), orphans.items[0].note.as_deref()), ("orp_1", Some("deleted vm")));
    let note = ResolveRequest { note: Some("deleted vm".into()) };
    client.resolve_orphan("shop", "orp_1", &note, &none).await.unwrap();
    client.resolve_orphan("shop", "orp 2", &ResolveRequest::default(), &none).await.unwrap();

    let seen = seen.lock().unwrap().clone();
    let routes: Vec<(&str, &str)> = seen.iter().map(|s| (s.method.as_str(), s.target.as_str())).collect();
    assert_eq!(
        routes,
        [
            ("POST", "/v1/ns/shop/grants"),
            ("POST", "/v1/ns/shop/grants/revoke"),
            ("GET", "/v1/ns/shop/grants"),
            ("GET", "/v1/ns/shop/grants?subject=user%3Aalice&resource=doc%3A9"),
            ("GET", "/v1/ns/shop/orphans"),
            ("GET", "/v1/ns/shop/orphans?all=true"),
            ("POST", "/v1/ns/shop/orphans/orp_1/resolve"),
            ("POST", "/v1/ns/shop/orphans/orp%202/resolve"),
        ]
    );
    let tuple_json = json!({"subject": "user:alice", "action": "read", "resource": "doc:9"});
    assert_eq!((seen[0].json(), seen[1].json()), (tuple_json.clone(), tuple_json));
    assert_eq!(seen[0].header("idempotency-key"), Some("g-1"));
    assert_eq!(seen[6].json(), json!({"note": "deleted vm"}));
    assert_eq!(seen[7].json(), json!({}));
}

#[tokio::test]
async fn refusals_of_the_new_routes_are_api_errors_with_their_details() {
    let (base, _) = canned(vec![
        (
            "409 Conflict",
            vec![JSON],
            r#"{"error":"lease_held","message":"held by h1","holder":"h1","expires_at_ms":9}"#,
        ),
        ("409 Conflict", vec![JSON], r#"{"error":"insufficient","message":"only 2 available","available":2}"#),
        ("410 Gone", vec![JSON], r#"{"error":"reservation_expired","message":"expired"}"#),
    ])
    .await;
    let client = Client::new(&base).unwrap();
    let none = RequestOptions::default();
    let acquire = AcquireRequest { holder: "h2".into(), ttl_ms: 1000 };
    let err = client.acquire_lease("shop", "m", &acquire, &none).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(409), Some("lease_held")));
    let ClientError::Api { body, .. } = err else { panic!("not an API error") };
    assert_eq!(body.details["holder"], "h1");
    let reserve = ReserveRequest { amount: 5, ttl_ms: 1000, context: None };
    let err = client.reserve("shop", "p", &reserve, &none).await.unwrap_err();
    assert_eq!(err.code(), Some("insufficient"));
    let err = client.commit_reservation("shop", "rsv_1", &none).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(410), Some("reservation_expired")));
    for bad in ["", ".", ".."] {
        let err = client.get_pool("shop", bad).await.unwrap_err();
        assert!(matches!(err, ClientError::InvalidArgument { .. }), "{bad:?}: {err:?}");
    }
}

/// Serves one streamed response: the head, then each piece of the body flushed on its own
/// after a pause (so the client reads it in separate chunks), then closes. Returns the base
/// URL and the request as received.
async fn streaming(head: &'static str, pieces: Vec<&'static str>) -> (String, tokio::sync::oneshot::Receiver<Seen>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let request = read_head(&mut reader).await;
        let _ = tx.send(request);
        write.write_all(format!("HTTP/1.1 {head}\r\nconnection: close\r\n\r\n").as_bytes()).await.unwrap();
        for piece in pieces {
            write.write_all(piece.as_bytes()).await.unwrap();
            write.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let _ = write.shutdown().await;
    });
    (base, rx)
}

const EVENT_STREAM: &str = "200 OK\r\ncontent-type: text/event-stream";

#[tokio::test]
async fn a_watch_parses_change_events_cut_anywhere_and_skips_comments_and_unknown_events() {
    let (base, request) = streaming(
        EVENT_STREAM,
        vec![
            ": connected\n\n",
            "event: change\nid: 7\ndata: {\"revision\":7,\"type\":\"kv\",\"key\":\"orders/1\",",
            "\"value\":{\"n\":1},\"version\":1,\"deleted\":false}\n",
            "\nevent: heartbeat\ndata: {}\n\nevent: chan",
            "ge\r\nid: 8\r\ndata: {\"revision\":8,\"type\":\"grant\",\"key\":\"u|r|d\",\"value\":null,\"version\":0,\"deleted\":true}\r\n\r\n",
        ],
    )
    .await;
    let client = Client::new(&base).unwrap();
    let query =
        WatchQuery { prefix: Some("orders/".into()), from_revision: Some(3), types: vec!["kv".into(), "grant".into()] };
    let mut watch = client.watch("shop", &query).await.unwrap();
    let request = request.await.unwrap();
    assert_eq!(request.target, "/v1/ns/shop/watch?prefix=orders%2F&from_revision=3&types=kv%2Cgrant");
    assert_eq!(request.header("accept"), Some("text/event-stream"));
    let Some(Ok(WatchMessage::Change(first))) = watch.next().await else { panic!("no first change") };
    assert_eq!((first.revision, first.kind.as_str(), first.key.as_str()), (7, "kv", "orders/1"));
    assert_eq!((first.value.clone(), first.version, first.deleted), (json!({"n": 1}), 1, false));
    assert_eq!(watch.last_revision(), Some(7));
    let Some(Ok(WatchMessage::Change(second))) = watch.next().await else { panic!("no second change") };
    assert_eq!((second.revision, second.kind.as_str(), second.deleted), (8, "grant", true));
    assert!(watch.next().await.is_none(), "the server closed the stream");
    assert!(watch.next().await.is_none());
    assert_eq!(watch.last_revision(), Some(8));
}

#[tokio::test]
async fn a_watch_with_no_filters_sends_no_query_and_compacted_ends_the_stream() {
    let (base, request) = streaming(
        EVENT_STREAM,
        vec![
            "event: compacted\ndata: {\"error\":\"compacted\",\"message\":\"gone\",\"first_available_revision\":40}\n\n",
            "event: change\ndata: {\"revision\":41,\"type\":\"kv\",\"key\":\"k\",\"value\":1,\"version\":1,\"deleted\":false}\n\n",
        ],
    )
    .await;
    let mut watch = Client::new(&base).unwrap().watch("shop", &WatchQuery::default()).await.unwrap();
    assert_eq!(request.await.unwrap().target, "/v1/ns/shop/watch");
    let message = watch.next().await.unwrap().unwrap();
    assert_eq!(message, WatchMessage::Compacted { first_available_revision: 40 });
    assert!(watch.next().await.is_none(), "nothing after compacted");
}

#[tokio::test]
async fn lagged_ends_the_stream_with_where_to_resume() {
    let (base, _) = streaming(
        EVENT_STREAM,
        vec!["event: lagged\ndata: {\"error\":\"lagged\",\"message\":\"too slow\",\"resume_from_revision\":12}\n\n"],
    )
    .await;
    let mut watch = Client::new(&base).unwrap().watch("shop", &WatchQuery::default()).await.unwrap();
    assert_eq!(watch.next().await.unwrap().unwrap(), WatchMessage::Lagged { resume_from_revision: 12 });
    assert!(watch.next().await.is_none());
}

#[tokio::test]
async fn next_is_cancel_safe() {
    let (base, _) = streaming(
        EVENT_STREAM,
        vec![
            "event: change\ndata: {\"revision\":1,\"type\":\"kv\",\"key\":\"k\",",
            "\"value\":1,\"version\":1,\"deleted\":false}\n\n",
        ],
    )
    .await;
    let mut watch = Client::new(&base).unwrap().watch("shop", &WatchQuery::default()).await.unwrap();
    // Give up waiting several times while the event is only half there.
    let mut gave_up = 0;
    let message = loop {
        match tokio::time::timeout(Duration::from_millis(2), watch.next()).await {
            Ok(message) => break message,
            Err(_) => gave_up += 1,
        }
    };
    assert!(gave_up > 0);
    assert!(matches!(message, Some(Ok(WatchMessage::Change(ref c))) if c.revision == 1), "{message:?}");
}

#[tokio::test]
async fn a_change_that_does_not_decode_is_a_decode_error_and_ends_the_stream() {
    let (base, _) = streaming(EVENT_STREAM, vec!["event: change\ndata: {\"revision\":\"x\"}\n\n"]).await;
    let mut watch = Client::new(&base).unwrap().watch("shop", &WatchQuery::default()).await.unwrap();
    let err = watch.next().await.unwrap().unwrap_err();
    assert!(matches!(err, ClientError::Decode { status: 200, .. }), "{err:?}");
    assert!(err.to_string().contains("`change` event"), "{err}");
    assert!(watch.next().await.is_none());
}

#[tokio::test]
async fn a_watch_refused_or_answered_with_something_else_is_an_error() {
    let (base, _) = canned(vec![
        ("400 Bad Request", vec![JSON], r#"{"error":"invalid_request","message":"types: unknown type `kvv`"}"#),
        ("200 OK", vec![JSON], r#"{"items":[]}"#),
    ])
    .await;
    let client = Client::new(&base).unwrap();
    let query = WatchQuery { types: vec!["kvv".into()], ..WatchQuery::default() };
    let err = client.watch("shop", &query).await.unwrap_err();
    assert_eq!((err.status(), err.code()), (Some(400), Some("invalid_request")));
    let err = client.watch("shop", &WatchQuery::default()).await.unwrap_err();
    assert!(matches!(err, ClientError::Decode { status: 200, .. }), "{err:?}");
    assert!(err.to_string().contains("not an event stream"), "{err}");
}

#[tokio::test]
async fn last_revision_counts_only_revisions_returned_whole() {
    let change = |revision: u64, key: &str, id: bool| -> &'static str {
        let id = if id { format!("id: {revision}\n") } else { String::new() };
        format!(
            "event: change\n{id}data: {{\"revision\":{revision},\"type\":\"kv\",\"key\":\"{key}\",\"value\":1,\
             \"version\":1,\"deleted\":false}}\n\n"
        )
        .leak()
    };
    // Revision 5 writes a and b (the id is on its last change), then revision 6 writes c and d.
    let (base, _) = streaming(
        EVENT_STREAM,
        vec![change(5, "a", false), change(5, "b", true), change(6, "c", false), change(6, "d", true)],
    )
    .await;
    let mut watch = Client::new(&base).unwrap().watch("shop", &WatchQuery::default()).await.unwrap();
    let mut seen = Vec::new();
    while let Some(message) = watch.next().await {
        let Ok(WatchMessage::Change(change)) = message else { panic!("{message:?}") };
        seen.push((change.key, watch.last_revision()));
    }
    let expected = [("a", None), ("b", Some(5)), ("c", Some(5)), ("d", Some(6))];
    assert_eq!(seen, expected.map(|(k, r)| (k.to_owned(), r)));
}

#[tokio::test]
async fn the_builder_sends_the_api_key_as_a_bearer_token_and_default_headers_on_every_request() {
    let ok = ("200 OK", vec![("content-type", "application/json")], r#"{"status":"ok","revision":3}"#);
    let (base, seen) = canned(vec![ok.clone(), ok]).await;
    let client = Client::builder(&base).api_key("s3cret-key").header("x-correlation-id", "session-7").build().unwrap();
    client.health().await.unwrap();
    client.health().await.unwrap();
    let seen = seen.lock().unwrap();
    for request in seen.iter() {
        assert_eq!(request.header("authorization"), Some("Bearer s3cret-key"));
        assert_eq!(request.header("x-correlation-id"), Some("session-7"));
    }
    assert_eq!(seen.len(), 2);
}

#[test]
fn the_builder_refuses_unsendable_keys_and_unusable_ca_files_without_quoting_the_key() {
    let err = Client::builder("http://127.0.0.1:1").api_key("two words\n").build().unwrap_err();
    assert!(matches!(err, ClientError::InvalidArgument { .. }), "{err:?}");
    assert!(!err.to_string().contains("two words"), "{err}");
    assert!(!format!("{:?}", Client::builder("http://h").api_key("s3cret-key")).contains("s3cret-key"));

    let err = Client::builder("https://h").ca_file("/nonexistent/ca.pem").build().unwrap_err();
    assert!(err.to_string().contains("cannot read CA file /nonexistent/ca.pem"), "{err}");
    let err = Client::builder("https://h").ca_pem("not a certificate").build().unwrap_err();
    assert!(err.to_string().contains("holds no `-----BEGIN CERTIFICATE-----` block"), "{err}");
    let err = Client::builder("ftp://h").build().unwrap_err();
    assert!(err.to_string().contains("must start with http:// or https://"), "{err}");
}
