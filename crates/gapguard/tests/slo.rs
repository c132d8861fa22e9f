//! `GET /v1/slo` against the real binary: a flow driven into a fast burn (half its acts find
//! their check stale, against an objective of 0.99) pages; a healthy flow fires nothing; and
//! the route needs a key when keys are configured.

mod support;

use std::time::{Duration, Instant};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use support::{Http, Server};

const CONFIG: &str = r#"
[[flow]]
name = "checkout"
check_to_use_p99_ms = 500
correctness_objective = 0.99

[[flow]]
name = "refund"
check_to_use_p99_ms = 60000
correctness_objective = 0.99

[[flow]]
name = "plain"
"#;

async fn ticket(http: &Http, flow: &str, conditions: Value) -> String {
    let r = http.post("/v1/ns/shop/check", json!({"conditions": conditions, "ttl_ms": 60_000, "flow": flow})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["ticket"].as_str().unwrap().to_owned()
}

async fn act(http: &Http, ticket: &str) -> (u16, String) {
    let r = http.post("/v1/ns/shop/act", json!({"ticket": ticket, "ops": [{"put": {"key": "log", "value": 1}}]})).await;
    (r.status, r.body["error"].as_str().unwrap_or("").to_owned())
}

fn flow<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["flows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["flow"] == name)
        .unwrap_or_else(|| panic!("flow {name} not in {report}"))
}

/// `(alert name, long window)` of every firing alert condition of a flow.
fn firing(flow: &Value) -> Vec<(String, String)> {
    flow["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["firing"] == true)
        .map(|a| (a["name"].as_str().unwrap().to_owned(), a["long_window"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test]
async fn a_fast_burn_pages_and_a_healthy_flow_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(dir.path(), CONFIG);
    let http = Http::new(&server);

    // Before any traffic: every configured flow with an objective, SLIs null, nothing firing.
    let r = http.get("/v1/slo").await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let names: Vec<&str> = r.body["flows"].as_array().unwrap().iter().map(|f| f["flow"].as_str().unwrap()).collect();
    assert_eq!(names, ["checkout", "refund"], "flows without objectives are not reported");
    let checkout = flow(&r.body, "checkout");
    assert_eq!(checkout["objectives"], json!({"correctness": 0.99, "check_to_use_p99_ms": 500}));
    for w in ["5m", "30m", "1h", "6h", "3d"] {
        let window = &checkout["windows"][w];
        assert_eq!(window["correctness_sli"], Value::Null, "{w}");
        assert_eq!(window["latency_sli"], Value::Null, "{w}");
        assert_eq!(window["acts"], 0, "{w}");
    }
    assert_eq!(checkout["alerts"].as_array().unwrap().len(), 6);
    assert!(firing(checkout).is_empty());

    assert_eq!(http.put("/v1/ns/shop/kv/price", json!({"value": 10})).await.status, 200);
    assert_eq!(http.put("/v1/ns/shop/kv/fixed", json!({"value": true})).await.status, 200);
    let price_is_10 = json!([{"equals": {"key": "price", "value": 10}}]);
    let fixed = json!([{"equals": {"key": "fixed", "value": true}}]);

    // checkout: 10 tickets go stale (the price changes under them), 10 commit.
    let mut stale_tickets = Vec::new();
    for _ in 0..10 {
        stale_tickets.push(ticket(&http, "checkout", price_is_10.clone()).await);
    }
    let plain = ticket(&http, "plain", price_is_10.clone()).await;
    assert_eq!(http.put("/v1/ns/shop/kv/price", json!({"value": 11})).await.status, 200);
    for t in &stale_tickets {
        assert_eq!(act(&http, t).await, (409, "stale_check".to_owned()));
    }
    for _ in 0..10 {
        let t = ticket(&http, "checkout", fixed.clone()).await;
        assert_eq!(act(&http, &t).await.0, 200);
    }
    // refund: 20 acts, all committed. plain (no objectives) has stale checks that count nowhere.
    for _ in 0..20 {
        let t = ticket(&http, "refund", fixed.clone()).await;
        assert_eq!(act(&http, &t).await.0, 200);
    }
    assert_eq!(act(&http, &plain).await, (409, "stale_check".to_owned()));
    // A refusal for another reason (the ticket was used) is in neither side of the SLI.
    let t = ticket(&http, "refund", fixed.clone()).await;
    assert_eq!(act(&http, &t).await.0, 200);
    assert_eq!(act(&http, &t).await, (409, "ticket_used".to_owned()));

    // Acts are reported once durable, before their response; poll all the same (bounded).
    let deadline = Instant::now() + Duration::from_secs(10);
    let report = loop {
        let r = http.get("/v1/slo").await;
        assert_eq!(r.status, 200, "{:?}", r.body);
        if flow(&r.body, "checkout")["windows"]["5m"]["acts"] == 20
            && flow(&r.body, "refund")["windows"]["5m"]["acts"] == 21
        {
            break r.body;
        }
        assert!(Instant::now() < deadline, "/v1/slo did not count the acts within 10 s: {}", r.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let checkout = flow(&report, "checkout");
    for w in ["5m", "30m", "1h", "6h", "3d"] {
        let window = &checkout["windows"][w];
        assert_eq!(window["acts"], 20, "{w}");
        assert_eq!(window["gaps"], 20, "{w}");
        assert_eq!(window["correctness_sli"], 0.5, "{w}");
        // 0.5 / (1 − 0.99) = 50 (to float precision).
        let burn = window["correctness_burn_rate"].as_f64().unwrap();
        assert!((burn - 50.0).abs() < 1e-6, "{w}: {burn}");
        // Every gap took far less than 500 ms.
        assert_eq!(window["latency_sli"], 1.0, "{w}");
        assert_eq!(window["latency_burn_rate"], 0.0, "{w}");
    }
    let expected: Vec<(String, String)> = [
        ("GapguardFlowCorrectnessBurnRatePage", "1h"),
        ("GapguardFlowCorrectnessBurnRatePage", "6h"),
        ("GapguardFlowCorrectnessBurnRateTicket", "3d"),
    ]
    .iter()
    .map(|(a, w)| (a.to_string(), w.to_string()))
    .collect();
    assert_eq!(firing(checkout), expected, "{checkout}");
    let page = &checkout["alerts"][0];
    assert_eq!(
        *page,
        json!({"name": "GapguardFlowCorrectnessBurnRatePage", "severity": "page", "slo": "correctness",
               "firing": true, "long_window": "1h", "short_window": "5m", "factor": 14.4})
    );

    let refund = flow(&report, "refund");
    assert_eq!(refund["windows"]["1h"]["correctness_sli"], 1.0);
    assert_eq!(refund["windows"]["1h"]["correctness_burn_rate"], 0.0);
    assert_eq!(refund["windows"]["1h"]["gaps"], 22, "the used ticket's gap counts in the latency SLI");
    assert!(firing(refund).is_empty(), "{refund}");
}

#[tokio::test]
async fn the_route_needs_a_key_when_keys_are_configured() {
    let secret = "slo-reader-secret-0123456789";
    let sha: String = Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let config = format!(
        "{CONFIG}\n[[api_key]]\nid = \"reader\"\nsecret_sha256 = \"{sha}\"\nnamespaces = [\"elsewhere\"]\nrole = \"read\"\n"
    );
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(dir.path(), &config);
    let http = Http::new(&server);
    assert_eq!(http.get("/v1/slo").await.status, 401);
    let auth = format!("Bearer {secret}");
    let r = http.send("GET", "/v1/slo", None, &[("authorization", &auth)]).await;
    assert_eq!(r.status, 200, "a read key of any namespace: {:?}", r.body);
    assert_eq!(r.body["flows"].as_array().unwrap().len(), 2);
}
