//! Black-box test of the trace file: a check under an incoming `traceparent`, then an act with
//! its ticket; after SIGTERM the file holds both spans as OTLP JSON Lines, the check's parent
//! is the caller's span, both carry the `toctou.*` attributes, and the act links to the check.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::{Http, Server};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// Every span of every `TracesData` line of the file.
fn spans(text: &str) -> Vec<Value> {
    let mut spans = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let data: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("line {line:?} is not JSON: {e}"));
        for resource in data["resourceSpans"].as_array().expect("resourceSpans") {
            for scope in resource["scopeSpans"].as_array().expect("scopeSpans") {
                spans.extend(scope["spans"].as_array().expect("spans").iter().cloned());
            }
        }
    }
    spans
}

/// The string value of attribute `key` in an OTLP attribute list.
fn attr<'a>(attributes: &'a Value, key: &str) -> Option<&'a str> {
    value_of(attributes, key)?["stringValue"].as_str()
}

/// The OTLP value (`{"intValue": …}`, `{"boolValue": …}`…) of attribute `key`.
fn value_of<'a>(attributes: &'a Value, key: &str) -> Option<&'a Value> {
    Some(&attributes.as_array()?.iter().find(|a| a["key"] == key)?["value"])
}

fn with_role<'a>(spans: &'a [Value], role: &str) -> &'a Value {
    let found: Vec<&Value> = spans.iter().filter(|s| attr(&s["attributes"], "toctou.role") == Some(role)).collect();
    assert_eq!(found.len(), 1, "expected one span with toctou.role={role}, got {found:#?}");
    found[0]
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A server writing its spans to a trace file in `dir`.
struct Traced {
    server: Server,
    file: std::path::PathBuf,
}

impl Traced {
    fn start(dir: &std::path::Path) -> Self {
        let file = dir.join("traces.jsonl");
        let server =
            Server::start_with(&dir.join("data"), &["--trace-file", file.to_str().expect("a UTF-8 temp path")]);
        Self { server, file }
    }

    /// Stops the server with SIGTERM, which must flush the batched spans, and reads them.
    fn spans(self) -> Vec<Value> {
        assert!(self.server.terminate_within(Duration::from_secs(10)).success());
        spans(&std::fs::read_to_string(&self.file).expect("the trace file exists"))
    }
}

#[tokio::test]
async fn an_act_span_links_to_its_check_span_with_toctou_attributes() {
    let dir = tempfile::tempdir().unwrap();
    let traced = Traced::start(dir.path());
    let http = Http::new(&traced.server);
    assert_eq!(http.put("/v1/ns/shop/kv/stock", json!({"value": 5})).await.status, 200);

    let traceparent = format!("00-{TRACE_ID}-{PARENT_SPAN_ID}-01");
    let check = json!({"conditions": [{"compare": {"key": "stock", "op": ">=", "value": 1}}], "flow": "checkout"});
    let r = http.send("POST", "/v1/ns/shop/check", Some(&check), &[("traceparent", &traceparent)]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let ticket = r.body["ticket"].as_str().unwrap().to_owned();
    // The act comes in another trace: only the link ties it to the check.
    let act = json!({"ticket": ticket, "ops": [{"put": {"key": "order/1", "value": true}}]});
    let r = http.post("/v1/ns/shop/act", act).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let spans = traced.spans();
    assert!(spans.len() >= 3, "put, check and act spans expected, got {spans:#?}");

    let check = with_role(&spans, "check");
    assert_eq!(check["traceId"], TRACE_ID, "the check joins the caller's trace");
    assert_eq!(check["parentSpanId"], PARENT_SPAN_ID, "the caller's span is the check's parent");
    assert!(is_hex(check["spanId"].as_str().unwrap(), 16));
    assert_eq!(check["name"], "POST /v1/ns/{ns}/check");
    assert_eq!(attr(&check["attributes"], "toctou.resource.key"), Some("stock"));
    assert_eq!(attr(&check["attributes"], "toctou.flow"), Some("checkout"));
    let start: u128 = check["startTimeUnixNano"].as_str().unwrap().parse().unwrap();
    let end: u128 = check["endTimeUnixNano"].as_str().unwrap().parse().unwrap();
    assert!(start > 0 && start <= end);

    let act = with_role(&spans, "use");
    assert_eq!(attr(&act["attributes"], "toctou.resource.key"), Some("stock"), "the checked resource");
    assert_eq!(attr(&act["attributes"], "toctou.flow"), Some("checkout"), "the ticket's flow");
    assert_ne!(act["traceId"], TRACE_ID, "the act had no traceparent: a trace of its own");
    assert!(act.get("parentSpanId").is_none(), "the act span is a root: {act}");
    let links = act["links"].as_array().expect("the act span has links");
    assert_eq!(links.len(), 1, "{links:?}");
    assert_eq!(links[0]["traceId"], check["traceId"]);
    assert_eq!(links[0]["spanId"], check["spanId"]);
    assert_eq!(attr(&links[0]["attributes"], "toctou.link"), Some("check"));

    // The put is traced too, as a mutation of its key (what `gapguard analyze` looks for inside
    // a check-to-use window).
    let put = spans.iter().find(|s| s["name"] == "PUT /v1/ns/{ns}/kv/{*key}").expect("the put span");
    assert_eq!(attr(&put["attributes"], "toctou.role"), Some("mutate"));
    assert_eq!(attr(&put["attributes"], "toctou.resource.key"), Some("stock"));
    let status = value_of(&put["attributes"], "http.response.status_code");
    assert_eq!(status, Some(&json!({"intValue": "200"})), "the status, an integer as the conventions say");
    // The version each span saw: an integer attribute (OTLP/JSON: a decimal string).
    let version =
        |span: &Value| value_of(&span["attributes"], "toctou.resource.version").map(|v| v["intValue"].clone());
    assert_eq!(version(check), Some(json!("1")), "the check saw the stock as put once");
    assert_eq!(version(act), Some(json!("1")), "so did the act, which did not change it");
}

/// An act that writes its checked key twice (version 1 -> 3) saw version 1, which the state
/// after it cannot tell: its span leaves the version out rather than report 2, a write between
/// check and use that never happened.
#[tokio::test]
async fn a_use_span_leaves_out_the_version_of_a_key_its_act_wrote_twice() {
    let dir = tempfile::tempdir().unwrap();
    let traced = Traced::start(dir.path());
    let http = Http::new(&traced.server);
    assert_eq!(http.put("/v1/ns/shop/kv/z", json!({"value": 1})).await.status, 200);
    let r = http.post("/v1/ns/shop/check", json!({"conditions": [{"exists": "z"}]})).await;
    let ops = json!([{"put": {"key": "z", "value": 5}}, {"add": {"key": "z", "by": 1}}]);
    assert_eq!(http.post("/v1/ns/shop/act", json!({"ticket": r.body["ticket"], "ops": ops})).await.status, 200);
    // A txn mutates what it writes, not what its `if` reads.
    let txn = json!({"if": [{"exists": "z"}], "then": [{"put": {"key": "y", "value": 1}}]});
    assert_eq!(http.post("/v1/ns/shop/txn", txn).await.status, 200);
    let spans = traced.spans();
    let has_version = |span: &Value| value_of(&span["attributes"], "toctou.resource.version").is_some();
    assert!(has_version(with_role(&spans, "check")), "the check's version is known");
    let act = with_role(&spans, "use");
    assert_eq!(attr(&act["attributes"], "toctou.resource.key"), Some("z"));
    assert!(!has_version(act), "written twice by the act: {act}");
    let txn = spans.iter().find(|s| s["name"] == "POST /v1/ns/{ns}/txn").expect("the txn span");
    assert_eq!(attr(&txn["attributes"], "toctou.role"), Some("mutate"));
    assert_eq!(attr(&txn["attributes"], "toctou.resource.key"), Some("y"));
}

#[tokio::test]
async fn the_trace_file_can_come_from_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let trace_file = dir.path().join("from-config.jsonl");
    let config = format!("trace_file = {:?}\n", trace_file.to_str().unwrap());
    let server = Server::start_with_config(&dir.path().join("data"), &config);
    let http = Http::new(&server);
    assert_eq!(http.get("/healthz").await.status, 200);
    assert!(server.terminate_within(Duration::from_secs(10)).success());
    let spans = spans(&std::fs::read_to_string(&trace_file).expect("the trace file exists"));
    assert!(spans.iter().any(|s| s["name"] == "GET /healthz"), "{spans:#?}");
}

/// An idempotent replay applies nothing: its span is no use of a check and no mutation inside
/// anyone's window, so it carries `gapguard.idempotent_replay` and no `toctou.*` attributes;
/// the first request's span keeps its role.
#[tokio::test]
async fn an_idempotent_replay_is_neither_a_use_nor_a_mutation() {
    let dir = tempfile::tempdir().unwrap();
    let traced = Traced::start(dir.path());
    let http = Http::new(&traced.server);
    let put = json!({"value": 3});
    for _ in 0..2 {
        let r = http.send("PUT", "/v1/ns/shop/kv/stock", Some(&put), &[("idempotency-key", "put-1")]).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let check = http.post("/v1/ns/shop/check", json!({"conditions": [{"exists": "stock"}]})).await;
    let act = json!({"ticket": check.body["ticket"], "ops": [{"add": {"key": "stock", "by": -1}}]});
    let mut replayed = Vec::new();
    for _ in 0..2 {
        let r = http.send("POST", "/v1/ns/shop/act", Some(&act), &[("idempotency-key", "act-1")]).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        replayed.push(r.header("idempotent-replayed").is_some());
    }
    assert_eq!(replayed, [false, true]);
    let spans = traced.spans();
    let is_replay =
        |span: &Value| value_of(&span["attributes"], "gapguard.idempotent_replay") == Some(&json!({"boolValue": true}));
    for name in ["PUT /v1/ns/{ns}/kv/{*key}", "POST /v1/ns/{ns}/act"] {
        let of_route: Vec<&Value> = spans.iter().filter(|s| s["name"] == name).collect();
        assert_eq!(of_route.len(), 2, "{name}: {of_route:#?}");
        let (replays, firsts): (Vec<&Value>, Vec<&Value>) = of_route.into_iter().partition(|s| is_replay(s));
        assert_eq!((replays.len(), firsts.len()), (1, 1), "{name}: one first request, one replay");
        assert!(attr(&firsts[0]["attributes"], "toctou.role").is_some(), "{name}: the first has its role");
        let toctou = replays[0]["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|kv| kv["key"].as_str().is_some_and(|k| k.starts_with("toctou.")));
        assert_eq!(toctou.count(), 0, "{name}: the replay has no toctou attributes: {:#}", replays[0]);
        assert!(
            replays[0].get("links").is_none_or(|l| l.as_array().is_some_and(Vec::is_empty)),
            "no link to the check"
        );
    }
    assert_eq!(with_role(&spans, "use")["name"], "POST /v1/ns/{ns}/act", "one use, the first act");
}
