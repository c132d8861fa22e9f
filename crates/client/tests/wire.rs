//! The client against a canned HTTP server: what goes on the wire (method, path, query,
//! headers, body) and how each kind of answer is decoded, without a real gapguard server.

use std::sync::{Arc, Mutex};

use gapguard_api::{
    ActRequest, AddOp, CheckRequest, CompareCondition, CompareOp, Condition, Op, PutResponse, TxnRequest,
};
use gapguard_client::{AuditQuery, Client, ClientError, RequestOptions};
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
                    break;
                }
                let (name, value) = line.split_once(':').unwrap();
                request.headers.push((name.trim().to_lowercase(), value.trim().to_owned()));
            }
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
        ("200 OK", vec![JSON], r#"{"events":[]}"#),
        ("200 OK", vec![JSON], r#"{"events":[],"next_after_seq":9}"#),
    ])
    .await;
    let client = Client::new(&base).unwrap();
    client.list("shop", "", None).await.unwrap();
    client.list("shop", "orders/&x", Some(5)).await.unwrap();
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
