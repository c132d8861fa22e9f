//! Black-box test of OTLP export: the real `gapguard` binary with `--otlp-endpoint` sends its
//! request spans over OTLP/HTTP (protobuf) to a receiver started by the test on loopback.
//!
//! There is no OpenTelemetry Collector package on this machine, so the receiver is a small
//! axum server in the test that decodes each `POST /v1/traces` body as the protobuf
//! `ExportTraceServiceRequest` of OTLP with the `opentelemetry-proto` crate, as a collector
//! would, and answers `200` with an empty `ExportTraceServiceResponse`.

mod support;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;
use support::{Http, Server};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// What the receiver got: every span of every export request, and the content types.
#[derive(Default)]
struct Received {
    spans: Vec<Span>,
    service_names: Vec<String>,
    content_types: Vec<String>,
}

/// Starts the OTLP/HTTP receiver on a free loopback port; returns its base URL.
async fn receiver(received: Arc<Mutex<Received>>) -> String {
    async fn traces(
        State(received): State<Arc<Mutex<Received>>>,
        headers: axum::http::HeaderMap,
        body: Bytes,
    ) -> (StatusCode, [(header::HeaderName, &'static str); 1], Vec<u8>) {
        let request = match ExportTraceServiceRequest::decode(body) {
            Ok(request) => request,
            Err(e) => panic!("the body is not an ExportTraceServiceRequest: {e}"),
        };
        let mut received = received.lock().unwrap();
        let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        received.content_types.push(content_type.to_owned());
        for resource_spans in request.resource_spans {
            let resource_attributes = resource_spans.resource.map(|r| r.attributes).unwrap_or_default();
            if let Some(name) = string_attr(&resource_attributes, "service.name") {
                received.service_names.push(name.to_owned());
            }
            for scope_spans in resource_spans.scope_spans {
                received.spans.extend(scope_spans.spans);
            }
        }
        let response = ExportTraceServiceResponse::default().encode_to_vec();
        (StatusCode::OK, [(header::CONTENT_TYPE, "application/x-protobuf")], response)
    }
    let app = Router::new().route("/v1/traces", post(traces)).with_state(received);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a AnyValue> {
    attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?.value.as_ref()
}

fn string_attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    match attr(attributes, key)? {
        AnyValue::StringValue(s) => Some(s),
        _ => None,
    }
}

/// `toctou.resource.version` as a list: one integer, or an array of them.
fn versions(span: &Span) -> Option<Vec<i64>> {
    match attr(&span.attributes, "toctou.resource.version")? {
        AnyValue::IntValue(v) => Some(vec![*v]),
        AnyValue::ArrayValue(a) => a
            .values
            .iter()
            .map(|v| match v.value {
                Some(AnyValue::IntValue(i)) => Some(i),
                _ => None,
            })
            .collect(),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn named<'a>(spans: &'a [Span], name: &str) -> Vec<&'a Span> {
    spans.iter().filter(|s| s.name == name).collect()
}

// Multi-threaded: the receiver must keep answering while the test thread waits for the server
// to exit (it flushes its last spans then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_spans_reach_an_otlp_receiver_with_links_parents_and_toctou_attributes() {
    let received = Arc::new(Mutex::new(Received::default()));
    let endpoint = receiver(Arc::clone(&received)).await;
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with(&dir.path().join("data"), &["--otlp-endpoint", &endpoint]);
    let http = Http::new(&server);

    assert_eq!(http.put("/v1/ns/shop/kv/stock", json!({"value": 5})).await.status, 200);
    let tuple = json!({"subject": "user:alice", "action": "buy", "resource": "sku-1"});
    assert_eq!(http.post("/v1/ns/shop/grants", tuple.clone()).await.status, 200);

    // The check joins the caller's trace; the act comes in a trace of its own.
    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    let check = json!({
        "conditions": [
            {"compare": {"key": "stock", "op": ">=", "value": 1}},
            {"permitted": {"subject": "user:alice", "action": "buy", "resource": "sku-1"}}
        ],
        "flow": "checkout"
    });
    let r = http.send("POST", "/v1/ns/shop/check", Some(&check), &[("traceparent", &traceparent)]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let act = json!({"ticket": r.body["ticket"], "ops": [{"add": {"key": "stock", "by": -1}}]});
    let r = http.post("/v1/ns/shop/act", act).await;
    assert_eq!(r.status, 200, "{:?}", r.body);

    // A second ticket, then a revocation in its window: the act is refused, permission denied.
    let r = http.post("/v1/ns/shop/check", check.clone()).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let stale_ticket = r.body["ticket"].clone();
    assert_eq!(http.post("/v1/ns/shop/grants/revoke", tuple).await.status, 200);
    let act = json!({"ticket": stale_ticket, "ops": [{"add": {"key": "stock", "by": -1}}]});
    let r = http.post("/v1/ns/shop/act", act).await;
    assert_eq!((r.status, r.body["error"].as_str()), (409, Some("stale_check")), "{:?}", r.body);

    // The batch exporter sends on its own schedule; SIGTERM flushes what is left.
    assert!(server.terminate_within(Duration::from_secs(20)).success());
    let received = received.lock().unwrap();
    assert!(received.content_types.iter().all(|t| t == "application/x-protobuf"), "{:?}", received.content_types);
    assert!(
        received.service_names.iter().all(|n| n == "gapguard") && !received.service_names.is_empty(),
        "service names {:?}, {} spans",
        received.service_names,
        received.spans.len()
    );
    let spans = &received.spans;

    let checks = named(spans, "POST /v1/ns/{ns}/check");
    assert_eq!(checks.len(), 2, "{spans:#?}");
    let check = *checks.iter().find(|s| hex(&s.trace_id) == TRACE_ID).expect("the check in the caller's trace");
    assert_eq!(hex(&check.parent_span_id), PARENT_SPAN_ID, "the incoming traceparent is the check's parent");
    assert_eq!(check.kind, 2, "SPAN_KIND_SERVER");
    assert_eq!(string_attr(&check.attributes, "toctou.role"), Some("check"));
    assert_eq!(string_attr(&check.attributes, "toctou.flow"), Some("checkout"));
    let keys = string_attr(&check.attributes, "toctou.resource.key").expect("toctou.resource.key");
    assert_eq!(keys, "stock,grant:user:alice|buy|sku-1", "the checked resources, in order");
    assert_eq!(versions(check), Some(vec![1, 1]), "stock put once, grant made once");
    assert_eq!(string_attr(&check.attributes, "toctou.authz.decision"), Some("allow"));
    assert_eq!(string_attr(&check.attributes, "enduser.id"), Some("user:alice"));

    let acts = named(spans, "POST /v1/ns/{ns}/act");
    assert_eq!(acts.len(), 2, "{spans:#?}");
    let committed = *acts.iter().find(|s| versions(s).is_some_and(|v| v == [1, 1])).expect("the committed act");
    assert_ne!(hex(&committed.trace_id), TRACE_ID, "the act had no traceparent: a trace of its own");
    assert!(committed.parent_span_id.is_empty(), "the act span is a root");
    assert_eq!(string_attr(&committed.attributes, "toctou.role"), Some("use"));
    assert_eq!(string_attr(&committed.attributes, "toctou.flow"), Some("checkout"), "the ticket's flow");
    assert_eq!(string_attr(&committed.attributes, "toctou.resource.key"), Some(keys));
    assert_eq!(string_attr(&committed.attributes, "toctou.authz.decision"), Some("allow"));
    assert_eq!(committed.links.len(), 1, "{:?}", committed.links);
    let link = &committed.links[0];
    assert_eq!((hex(&link.trace_id), hex(&link.span_id)), (TRACE_ID.to_owned(), hex(&check.span_id)));
    assert_eq!(string_attr(&link.attributes, "toctou.link"), Some("check"));

    let refused = *acts.iter().find(|s| !std::ptr::eq(**s, committed)).unwrap();
    assert_eq!(string_attr(&refused.attributes, "toctou.authz.decision"), Some("deny"), "revoked in the window");
    assert_eq!(versions(refused), Some(vec![2, 0]), "stock after one sale; the grant revoked (absent)");
    let second_check = *checks.iter().find(|s| !std::ptr::eq(**s, check)).unwrap();
    assert_eq!(hex(&refused.links[0].span_id), hex(&second_check.span_id), "linked to its own check");

    let revoke = named(spans, "POST /v1/ns/{ns}/grants/revoke");
    assert_eq!(revoke.len(), 1, "{spans:#?}");
    assert_eq!(string_attr(&revoke[0].attributes, "toctou.role"), Some("revoke"));
    assert_eq!(string_attr(&revoke[0].attributes, "toctou.resource.key"), Some("grant:user:alice|buy|sku-1"));
    let put = named(spans, "PUT /v1/ns/{ns}/kv/{*key}");
    assert_eq!(string_attr(&put[0].attributes, "toctou.role"), Some("mutate"));
    assert_eq!(string_attr(&put[0].attributes, "toctou.resource.key"), Some("stock"));
    // A grant is a mutation of the grant, as every primitive's write is of its resource.
    let grant = named(spans, "POST /v1/ns/{ns}/grants");
    assert_eq!(string_attr(&grant[0].attributes, "toctou.role"), Some("mutate"));
    assert_eq!(string_attr(&grant[0].attributes, "toctou.resource.key"), Some("grant:user:alice|buy|sku-1"));
}

/// Runs `gapguard serve` with `args`, expecting it to refuse to start: its exit code and stderr.
fn refused(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_gapguard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(dir.path().join("data"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run gapguard serve");
    assert!(!String::from_utf8_lossy(&output.stdout).contains("listening on"), "it started");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn a_malformed_otlp_endpoint_is_refused_with_exit_code_2() {
    for (endpoint, says) in [
        ("localhost:4318", "http://"),
        ("http://", "http://"),
        ("https://collector:4318", "https is not supported"),
        ("not a url", "not a url"),
    ] {
        let (code, stderr) = refused(&["--otlp-endpoint", endpoint]);
        assert_eq!(code, Some(2), "{endpoint:?}: {stderr}");
        assert!(stderr.contains("--otlp-endpoint") && stderr.contains(says), "{endpoint:?}: {stderr}");
    }
    let config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(config.path(), "otlp_endpoint = \"udp://collector:4318\"\n").unwrap();
    let (code, stderr) = refused(&["--config", config.path().to_str().unwrap()]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("udp://collector:4318"), "{stderr}");
}
