//! Black-box tests of `/metrics`: drive exact traffic at the real binary, scrape, parse the
//! text format and assert that every metric of DESIGN §4 moved by exactly what was driven.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Http, Server};

const CONFIG: &str = r#"
metrics_namespaces = ["shop"]

[[flow]]
name = "checkout"
check_to_use_p99_ms = 500
correctness_objective = 0.9999
"#;

/// One scrape: every sample by metric name and its label set.
#[derive(Debug, Default)]
struct Scrape {
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
}

impl Scrape {
    /// Parses the text format: `name value` or `name{k="v",…} value`; comments and blank
    /// lines skipped. Label values are read as quoted strings with escapes, so a route such as
    /// `/v1/ns/{ns}/kv/{*key}` inside them does not confuse the parser.
    fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')) {
            let name_end = line.find(['{', ' ']).unwrap_or_else(|| panic!("no value in {line:?}"));
            let name = line[..name_end].to_owned();
            let mut labels = BTreeMap::new();
            let mut rest = &line[name_end..];
            if let Some(after_brace) = rest.strip_prefix('{') {
                let mut chars = after_brace.char_indices();
                let consumed;
                loop {
                    let mut key = String::new();
                    let mut next = chars.next();
                    if let Some((i, '}')) = next {
                        consumed = i + 1;
                        break;
                    }
                    while let Some((_, c)) = next {
                        if c == '=' {
                            break;
                        }
                        key.push(c);
                        next = chars.next();
                    }
                    assert_eq!(chars.next().map(|(_, c)| c), Some('"'), "label {key} of {line:?} is not quoted");
                    let mut value = String::new();
                    loop {
                        match chars.next().unwrap_or_else(|| panic!("unterminated label value in {line:?}")) {
                            (_, '\\') => match chars.next().map(|(_, c)| c) {
                                Some('n') => value.push('\n'),
                                Some(c) => value.push(c),
                                None => panic!("dangling escape in {line:?}"),
                            },
                            (_, '"') => break,
                            (_, c) => value.push(c),
                        }
                    }
                    assert!(labels.insert(key, value).is_none(), "a label twice in {line:?}");
                    match chars.next() {
                        Some((_, ',')) => continue,
                        Some((i, '}')) => {
                            consumed = i + 1;
                            break;
                        }
                        other => panic!("unexpected {other:?} after a label in {line:?}"),
                    }
                }
                rest = &after_brace[consumed..];
            }
            let value = rest.trim();
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("bad value {value:?} in {line:?}"));
            assert!(samples.insert((name, labels), value).is_none(), "duplicate sample {line:?}");
        }
        Self { samples }
    }

    /// A sample's value; 0 if the series does not exist (yet).
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.samples.get(&(name.to_owned(), labels)).copied().unwrap_or(0.0)
    }

    /// Every label set of a metric.
    fn series(&self, name: &str) -> Vec<&BTreeMap<String, String>> {
        self.samples.keys().filter(|(n, _)| n == name).map(|(_, l)| l).collect()
    }
}

async fn scrape(server: &Server) -> Scrape {
    let response = reqwest::get(format!("{}/metrics", server.url)).await.expect("scrape /metrics");
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("application/openmetrics-text"), "{content_type}");
    Scrape::parse(&response.text().await.unwrap())
}

/// A series' expected change: metric name, label set, delta.
type Expected<'a> = (&'a str, &'a [(&'a str, &'a str)], f64);

/// Asserts that each `(name, labels)` moved from `before` to `after` by exactly `delta`.
fn assert_moved(before: &Scrape, after: &Scrape, expected: &[Expected<'_>]) {
    let mut wrong = Vec::new();
    for (name, labels, delta) in expected {
        let moved = after.get(name, labels) - before.get(name, labels);
        if (moved - delta).abs() > 1e-9 {
            wrong.push(format!("{name}{labels:?}: moved by {moved}, expected {delta}"));
        }
    }
    assert!(wrong.is_empty(), "metrics that moved wrongly:\n{}", wrong.join("\n"));
}

async fn ticket(http: &Http, conditions: Value, ttl_ms: u64) -> String {
    let r =
        http.post("/v1/ns/shop/check", json!({"conditions": conditions, "ttl_ms": ttl_ms, "flow": "checkout"})).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    r.body["ticket"].as_str().unwrap().to_owned()
}

async fn act(http: &Http, ticket: &str, key: &str) -> (u16, String) {
    let r =
        http.post("/v1/ns/shop/act", json!({"ticket": ticket, "ops": [{"put": {"key": key, "value": true}}]})).await;
    (r.status, r.body["error"].as_str().unwrap_or("").to_owned())
}

async fn wait_for(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done().await {
        assert!(Instant::now() < deadline, "{what} did not happen within 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn every_metric_moves_by_exactly_the_traffic_driven() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(dir.path(), CONFIG);
    let http = Http::new(&server);
    let before = scrape(&server).await;
    // Write requests that reach the writer (committed or refused): the batch sizes sum to it.
    let mut writes = 0.0;

    let stock = json!([{"compare": {"key": "stock", "op": ">=", "value": 1}}]);
    assert_eq!(http.put("/v1/ns/shop/kv/stock", json!({"value": 5})).await.status, 200);
    let alice = json!({"subject": "user:alice", "action": "read", "resource": "doc:9"});
    assert_eq!(http.post("/v1/ns/shop/grants", alice.clone()).await.status, 200);
    writes += 2.0;

    // 3 passing checks, 2 failing ones; 2 of the tickets are used at once.
    let t1 = ticket(&http, stock.clone(), 30_000).await;
    let t2 = ticket(&http, stock.clone(), 30_000).await;
    let t3 = ticket(&http, stock.clone(), 30_000).await;
    for _ in 0..2 {
        let r =
            http.post("/v1/ns/shop/check", json!({"conditions": [{"exists": "missing"}], "flow": "checkout"})).await;
        assert_eq!(r.status, 412);
    }
    assert_eq!(act(&http, &t1, "orders/1").await, (200, String::new()));
    assert_eq!(act(&http, &t2, "orders/2").await, (200, String::new()));
    writes += 2.0;

    // A stale check: the stock runs out between check and act.
    assert_eq!(http.put("/v1/ns/shop/kv/stock", json!({"value": 0})).await.status, 200);
    assert_eq!(act(&http, &t3, "orders/3").await, (409, "stale_check".into()));
    writes += 2.0;

    // A revocation between check and act (an authorization mismatch), then a check on it.
    let permitted = json!([{"permitted": alice.clone()}]);
    let t4 = ticket(&http, permitted.clone(), 30_000).await;
    assert_eq!(http.post("/v1/ns/shop/grants/revoke", alice.clone()).await.status, 200);
    assert_eq!(act(&http, &t4, "reads/1").await, (409, "stale_check".into()));
    let denied = http.post("/v1/ns/shop/check", json!({"conditions": permitted, "flow": "checkout"})).await;
    assert_eq!(denied.status, 412);
    writes += 2.0;

    // An expired ticket, a used one, and one with a bad signature (refused before the engine).
    let t5 = ticket(&http, json!([{"exists": "orders/1"}]), 1).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(act(&http, &t5, "orders/5").await, (410, "ticket_expired".into()));
    assert_eq!(act(&http, &t1, "orders/1b").await, (409, "ticket_used".into()));
    writes += 2.0;
    let bad = http
        .post(
            "/v1/ns/shop/act",
            json!({"ticket": "not-a-ticket", "ops": [{"delete": {"key": "x"}}], "flow": "checkout"}),
        )
        .await;
    assert_eq!((bad.status, bad.body["error"].as_str()), (400, Some("invalid_ticket")));

    // An idempotent replay and a key conflict.
    let key = [("idempotency-key", "pay-1")];
    let first = http.send("PUT", "/v1/ns/shop/kv/pay", Some(&json!({"value": 1})), &key).await;
    let replay = http.send("PUT", "/v1/ns/shop/kv/pay", Some(&json!({"value": 1})), &key).await;
    assert_eq!((first.status, replay.status, replay.header("idempotent-replayed")), (200, 200, Some("true")));
    let conflict = http.send("PUT", "/v1/ns/shop/kv/pay", Some(&json!({"value": 2})), &key).await;
    assert_eq!(conflict.status, 422);
    writes += 1.0;

    // Reservations: one committed, one released, one expired (then committed too late and its
    // orphan compensated), one refused as insufficient.
    assert_eq!(http.put("/v1/ns/shop/pools/vm", json!({"capacity": 10})).await.status, 200);
    let reserve = |amount: u64, ttl_ms: u64| {
        let http = &http;
        async move { http.post("/v1/ns/shop/pools/vm/reserve", json!({"amount": amount, "ttl_ms": ttl_ms})).await }
    };
    let a = reserve(4, 60_000).await.body["reservation"].as_str().unwrap().to_owned();
    assert_eq!(http.send("POST", &format!("/v1/ns/shop/reservations/{a}/commit"), None, &[]).await.status, 200);
    let b = reserve(2, 60_000).await.body["reservation"].as_str().unwrap().to_owned();
    assert_eq!(http.send("POST", &format!("/v1/ns/shop/reservations/{b}/release"), None, &[]).await.status, 200);
    let c = reserve(1, 50).await.body["reservation"].as_str().unwrap().to_owned();
    assert_eq!(reserve(100, 60_000).await.status, 409);
    writes += 7.0;
    wait_for("the reconciler's expiry", async || {
        http.get(&format!("/v1/ns/shop/reservations/{c}")).await.body["state"] == "expired"
    })
    .await;
    writes += 1.0;
    let late = http.send("POST", &format!("/v1/ns/shop/reservations/{c}/commit"), None, &[]).await;
    assert_eq!(late.status, 410);
    writes += 1.0;
    let mid = scrape(&server).await;
    assert_eq!(mid.get("gapguard_orphans", &[("kind", "reservation")]), 1.0);
    let orphans = http.get("/v1/ns/shop/orphans").await.body;
    let orphan = orphans["items"][0]["id"].as_str().unwrap();
    assert_eq!(http.post(&format!("/v1/ns/shop/orphans/{orphan}/resolve"), json!({})).await.status, 200);
    writes += 1.0;

    // A stale lease token, twice: a renewal and an act fenced by a lease condition.
    let lease = http.post("/v1/ns/shop/leases/migrator/acquire", json!({"holder": "w", "ttl_ms": 60_000})).await;
    let stale_token = lease.body["token"].as_u64().unwrap() + 100;
    let renew = http.post("/v1/ns/shop/leases/migrator/renew", json!({"token": stale_token})).await;
    assert_eq!((renew.status, renew.body["error"].as_str()), (409, Some("lease_lost")));
    let fenced = json!({"conditions": [{"lease": {"name": "migrator", "token": stale_token}}],
                        "ops": [{"put": {"key": "schema", "value": 2}}]});
    assert_eq!(http.post("/v1/ns/shop/act", fenced).await.status, 409);
    writes += 3.0;
    assert_eq!(http.get("/nowhere").await.status, 404);

    let after = scrape(&server).await;
    let shop_checkout = |result: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![("namespace", "shop"), ("flow", "checkout"), ("result", result)]
    };
    let gap = |outcome: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![("namespace", "shop"), ("flow", "checkout"), ("outcome", outcome)]
    };
    let (passed, check_failed) = (shop_checkout("passed"), shop_checkout("check_failed"));
    let (committed, stale, expired, used, invalid) = (
        shop_checkout("committed"),
        shop_checkout("stale_check"),
        shop_checkout("ticket_expired"),
        shop_checkout("ticket_used"),
        shop_checkout("invalid_ticket"),
    );
    let (gap_committed, gap_stale, gap_expired, gap_used) =
        (gap("committed"), gap("stale_check"), gap("ticket_expired"), gap("ticket_used"));
    let fenced_act = [("namespace", "shop"), ("flow", "other"), ("result", "condition_failed")];
    let http_route = |route: &'static str, method: &'static str, status: &'static str| {
        vec![("route", route), ("method", method), ("status", status)]
    };
    let (act_200, act_409, act_410, act_400) = (
        http_route("/v1/ns/{ns}/act", "POST", "200"),
        http_route("/v1/ns/{ns}/act", "POST", "409"),
        http_route("/v1/ns/{ns}/act", "POST", "410"),
        http_route("/v1/ns/{ns}/act", "POST", "400"),
    );
    let (check_200, check_412, put_200, put_422, unmatched) = (
        http_route("/v1/ns/{ns}/check", "POST", "200"),
        http_route("/v1/ns/{ns}/check", "POST", "412"),
        http_route("/v1/ns/{ns}/kv/{*key}", "PUT", "200"),
        http_route("/v1/ns/{ns}/kv/{*key}", "PUT", "422"),
        http_route("unmatched", "GET", "404"),
    );
    assert_moved(
        &before,
        &after,
        &[
            ("gapguard_checks_total", &passed, 5.0),
            ("gapguard_checks_total", &check_failed, 3.0),
            ("gapguard_acts_total", &committed, 2.0),
            ("gapguard_acts_total", &stale, 2.0),
            ("gapguard_acts_total", &expired, 1.0),
            ("gapguard_acts_total", &used, 1.0),
            ("gapguard_acts_total", &invalid, 1.0),
            ("gapguard_acts_total", &fenced_act, 1.0),
            ("gapguard_check_to_use_seconds_count", &gap_committed, 2.0),
            ("gapguard_check_to_use_seconds_count", &gap_stale, 2.0),
            ("gapguard_check_to_use_seconds_count", &gap_expired, 1.0),
            ("gapguard_check_to_use_seconds_count", &gap_used, 1.0),
            ("gapguard_authz_mismatch_total", &[], 1.0),
            ("gapguard_revoked_use_attempts_total", &[], 2.0),
            ("gapguard_fencing_rejections_total", &[], 2.0),
            ("gapguard_idempotent_replays_total", &[], 1.0),
            ("gapguard_idempotency_conflicts_total", &[], 1.0),
            ("gapguard_reservations_total", &[("result", "reserved")], 3.0),
            ("gapguard_reservations_total", &[("result", "committed")], 1.0),
            ("gapguard_reservations_total", &[("result", "released")], 1.0),
            ("gapguard_reservations_total", &[("result", "expired")], 1.0),
            ("gapguard_reservations_total", &[("result", "insufficient")], 1.0),
            ("gapguard_reservations_total", &[("result", "reservation_expired")], 1.0),
            ("gapguard_compensations_total", &[], 1.0),
            ("gapguard_orphans", &[("kind", "reservation")], 0.0),
            ("gapguard_orphans", &[("kind", "lease")], 0.0),
            ("gapguard_commit_batch_size_sum", &[], writes),
            ("gapguard_http_requests_total", &act_200, 2.0),
            ("gapguard_http_requests_total", &act_409, 4.0),
            ("gapguard_http_requests_total", &act_410, 1.0),
            ("gapguard_http_requests_total", &act_400, 1.0),
            ("gapguard_http_requests_total", &check_200, 5.0),
            ("gapguard_http_requests_total", &check_412, 3.0),
            ("gapguard_http_requests_total", &put_200, 4.0),
            ("gapguard_http_requests_total", &put_422, 1.0),
            ("gapguard_http_requests_total", &unmatched, 1.0),
            ("gapguard_http_request_seconds_count", &[("route", "/v1/ns/{ns}/act"), ("method", "POST")], 8.0),
            ("gapguard_http_request_seconds_count", &[("route", "/v1/ns/{ns}/check"), ("method", "POST")], 8.0),
        ],
    );
    // The expired ticket waited at least its 1 ms TTL; every histogram's +Inf bucket is its count.
    assert!(after.get("gapguard_check_to_use_seconds_sum", &gap_expired) >= 0.001);
    for labels in [&gap_committed, &gap_stale, &gap_expired, &gap_used] {
        let mut inf = labels.clone();
        inf.push(("le", "+Inf"));
        let count = after.get("gapguard_check_to_use_seconds_count", labels);
        assert_eq!(after.get("gapguard_check_to_use_seconds_bucket", &inf), count, "{labels:?}");
    }
    // Every commit is timed and sized: the two histograms count the same commits.
    let commits = after.get("gapguard_commit_seconds_count", &[]) - before.get("gapguard_commit_seconds_count", &[]);
    let sized =
        after.get("gapguard_commit_batch_size_count", &[]) - before.get("gapguard_commit_batch_size_count", &[]);
    assert!(commits >= 1.0 && commits == sized, "{commits} commits timed, {sized} sized");
    assert!(after.get("gapguard_commit_seconds_sum", &[]) > before.get("gapguard_commit_seconds_sum", &[]));
}

#[tokio::test]
async fn unnamed_namespaces_and_flows_count_as_other() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(dir.path(), CONFIG);
    let http = Http::new(&server);
    let before = scrape(&server).await;
    assert_eq!(http.put("/v1/ns/elsewhere/kv/k", json!({"value": 1})).await.status, 200);
    let checks =
        [("elsewhere", Some("adhoc")), ("elsewhere", Some("checkout")), ("shop", Some("adhoc")), ("shop", None)];
    for (ns, flow) in checks {
        let mut body = json!({"conditions": [{"absent": "k"}]});
        if let Some(flow) = flow {
            body["flow"] = json!(flow);
        }
        assert_eq!(http.post(&format!("/v1/ns/{ns}/check"), body).await.status, if ns == "shop" { 200 } else { 412 });
    }
    let t = http.post("/v1/ns/elsewhere/check", json!({"conditions": [{"exists": "k"}], "flow": "adhoc"})).await;
    let ticket = t.body["ticket"].as_str().unwrap();
    let acted = http.post("/v1/ns/elsewhere/act", json!({"ticket": ticket, "ops": [{"delete": {"key": "k"}}]})).await;
    assert_eq!(acted.status, 200, "{:?}", acted.body);
    let after = scrape(&server).await;
    let labels = |ns: &'static str, flow: &'static str, result: &'static str| {
        vec![("namespace", ns), ("flow", flow), ("result", result)]
    };
    let (a, b, c, d) = (
        labels("other", "other", "check_failed"),
        labels("other", "checkout", "check_failed"),
        labels("shop", "other", "passed"),
        labels("other", "other", "passed"),
    );
    let acts = labels("other", "other", "committed");
    let gap = [("namespace", "other"), ("flow", "other"), ("outcome", "committed")];
    assert_moved(
        &before,
        &after,
        &[
            ("gapguard_checks_total", &a, 1.0),
            ("gapguard_checks_total", &b, 1.0),
            ("gapguard_checks_total", &c, 2.0),
            ("gapguard_checks_total", &d, 1.0),
            ("gapguard_acts_total", &acts, 1.0),
            ("gapguard_check_to_use_seconds_count", &gap, 1.0),
        ],
    );
    // No label anywhere names what the config does not.
    for (name, _) in after.samples.keys() {
        for labels in after.series(name) {
            for value in labels.values() {
                assert!(value != "elsewhere" && value != "adhoc", "{name}{labels:?} leaks an unnamed label value");
            }
        }
    }
}

#[tokio::test]
async fn metrics_need_no_api_key_when_keys_are_configured() {
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "{CONFIG}\n[[api_key]]\nid = \"svc\"\nsecret_sha256 = \"{}\"\nnamespaces = [\"shop\"]\nrole = \"write\"\n",
        "0".repeat(64)
    );
    let server = Server::start_with_config(dir.path(), &config);
    let http = Http::new(&server);
    assert_eq!(http.get("/v1/ns/shop/kv/k").await.status, 401);
    let after = scrape(&server).await;
    let unauthorized = [("route", "/v1/ns/{ns}/kv/{*key}"), ("method", "GET"), ("status", "401")];
    assert_eq!(after.get("gapguard_http_requests_total", &unauthorized), 1.0);
}

#[tokio::test]
async fn metrics_need_a_key_when_configured_to() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "metrics-scraper-secret";
    let hash: String = {
        use sha2::Digest;
        sha2::Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    };
    let config = format!(
        "metrics_require_key = true\n{CONFIG}\n[[api_key]]\nid = \"prometheus\"\nsecret_sha256 = \"{hash}\"\nnamespaces = [\"*\"]\nrole = \"read\"\n"
    );
    let server = Server::start_with_config(dir.path(), &config);
    let http = Http::new(&server);
    assert_eq!(http.get("/metrics").await.status, 401);
    let auth = format!("Bearer {secret}");
    let with_key = http.send("GET", "/metrics", None, &[("authorization", &auth)]).await;
    assert_eq!(with_key.status, 200);
    assert_eq!(http.get("/healthz").await.status, 200, "/healthz never needs a key");
}
