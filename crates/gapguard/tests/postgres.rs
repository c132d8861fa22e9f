//! Several gapguard nodes over one real PostgreSQL (started by the test, see
//! `gapguard-testkit`): one consistent state whichever node a client talks to.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use gapguard_testkit::Postgres;
use serde_json::{json, Value};
use support::{sse_events, Http, Server};

/// A PostgreSQL with a fresh database, and `n` nodes over it.
fn cluster(n: usize) -> (Postgres, String, Vec<Server>) {
    let pg = Postgres::start();
    let url = pg.create_database("gapguard");
    let nodes = (0..n).map(|_| Server::start_backend(&url)).collect();
    (pg, url, nodes)
}

fn check_stock() -> Value {
    json!({"conditions": [{"compare": {"key": "stock", "op": ">=", "value": 1}}]})
}

fn sell(ticket: &Value) -> Value {
    json!({"ticket": ticket, "ops": [{"add": {"key": "stock", "by": -1}}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forty_eight_clients_over_three_nodes_sell_exactly_the_stock() {
    let (_pg, _url, nodes) = cluster(3);
    let https: Vec<Arc<Http>> = nodes.iter().map(|n| Arc::new(Http::new(n))).collect();
    assert_eq!(https[0].put("/v1/ns/shop/kv/stock", json!({"value": 100})).await.status, 200);
    let tasks: Vec<_> = (0..48)
        .map(|i| {
            let http = https[i % 3].clone();
            tokio::spawn(async move {
                let (mut sold, mut stale) = (0u32, 0u32);
                loop {
                    let check = http.post("/v1/ns/shop/check", check_stock()).await;
                    match (check.status, check.body["error"].as_str()) {
                        (200, _) => {}
                        (412, Some("check_failed")) => return (sold, stale),
                        other => panic!("check answered {other:?}: {:?}", check.body),
                    }
                    let act = http.post("/v1/ns/shop/act", sell(&check.body["ticket"])).await;
                    match (act.status, act.body["error"].as_str()) {
                        (200, _) => {
                            assert!(act.body["results"][0]["value"].as_i64().unwrap() >= 0);
                            sold += 1;
                        }
                        (409, Some("stale_check")) => stale += 1,
                        other => panic!("act answered {other:?}: {:?}", act.body),
                    }
                }
            })
        })
        .collect();
    let (mut sold, mut stale) = (0, 0);
    for t in tasks {
        let (s, st) = t.await.unwrap();
        sold += s;
        stale += st;
    }
    assert_eq!(sold, 100, "exactly the stock is sold ({stale} acts were refused as stale)");
    for http in &https {
        assert_eq!(http.get("/v1/ns/shop/kv/stock").await.body["value"], 0, "every node reads the same stock");
    }
    // One audit chain, whichever node verifies it.
    let verify = https[2].get("/v1/audit/verify").await;
    assert_eq!((verify.status, verify.body["ok"].as_bool()), (200, Some(true)), "{:?}", verify.body);
    assert!(verify.body["events"].as_u64().unwrap() >= 101);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_reservers_over_three_nodes_commit_exactly_the_capacity() {
    let (_pg, _url, nodes) = cluster(3);
    let https: Vec<Arc<Http>> = nodes.iter().map(|n| Arc::new(Http::new(n))).collect();
    assert_eq!(https[1].put("/v1/ns/q/pools/vm", json!({"capacity": 100})).await.status, 200);
    let total = support::reserve_and_commit_until_full(&https, "q", "vm", 64).await;
    assert_eq!(total, 100);
    let pool = https[0].get("/v1/ns/q/pools/vm").await.body;
    assert_eq!((pool["used"].as_u64(), pool["reserved"].as_u64()), (Some(100), Some(0)), "{pool:?}");
}

#[tokio::test]
async fn tickets_leases_idempotency_and_watch_span_nodes() {
    let (_pg, _url, nodes) = cluster(3);
    let (a, b, c) = (Http::new(&nodes[0]), Http::new(&nodes[1]), Http::new(&nodes[2]));
    a.put("/v1/ns/shop/kv/stock", json!({"value": 5})).await;

    // A ticket issued by A is honoured once by B, and refused on C after.
    let check = a.post("/v1/ns/shop/check", check_stock()).await;
    assert_eq!(check.status, 200, "{:?}", check.body);
    let first = b.post("/v1/ns/shop/act", sell(&check.body["ticket"])).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let again = c.post("/v1/ns/shop/act", sell(&check.body["ticket"])).await;
    assert_eq!((again.status, again.body["error"].as_str()), (409, Some("ticket_used")), "{:?}", again.body);
    assert_eq!(c.get("/v1/ns/shop/kv/stock").await.body["value"], 4);

    // Fencing tokens grow across nodes.
    let t1 = a.post("/v1/ns/ops/leases/job/acquire", json!({"holder": "x", "ttl_ms": 60000})).await;
    let t1 = t1.body["token"].as_u64().expect("a token");
    assert_eq!(a.post("/v1/ns/ops/leases/job/release", json!({"token": t1})).await.status, 200);
    let t2 = b.post("/v1/ns/ops/leases/job/acquire", json!({"holder": "y", "ttl_ms": 60000})).await;
    let t2 = t2.body["token"].as_u64().expect("a token");
    assert!(t2 > t1, "token through B ({t2}) must exceed the earlier one through A ({t1})");
    let stale =
        json!({"conditions": [{"lease": {"name": "job", "token": t1}}], "ops": [{"put": {"key": "out", "value": 1}}]});
    let fenced = c.post("/v1/ns/ops/act", stale).await;
    assert_eq!(fenced.status, 409, "{:?}", fenced.body);

    // One idempotency key sent to every node at once: one effect, one answer.
    let sends = [&a, &b, &c].map(|http| {
        let body = json!({"value": "paid"});
        async move { http.send("PUT", "/v1/ns/pay/kv/order-1", Some(&body), &[("idempotency-key", "pay-1")]).await }
    });
    let [ra, rb, rc] = sends;
    let replies = tokio::join!(ra, rb, rc);
    let replies = [replies.0, replies.1, replies.2];
    let mut revisions = Vec::new();
    for r in &replies {
        match (r.status, r.body["error"].as_str()) {
            (200, _) => revisions.push(r.body["revision"].as_u64().unwrap()),
            (409, Some("idempotency_in_progress")) => {}
            other => panic!("idempotent put answered {other:?}: {:?}", r.body),
        }
    }
    assert!(!revisions.is_empty() && revisions.iter().all(|r| *r == revisions[0]), "{replies:?}");
    let replay =
        c.send("PUT", "/v1/ns/pay/kv/order-1", Some(&json!({"value": "paid"})), &[("idempotency-key", "pay-1")]).await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body["revision"].as_u64(), Some(revisions[0]));
    assert_eq!(c.get("/v1/ns/pay/kv/order-1").await.body["version"], 1, "one effect");

    // A watch on C sees changes made through A and B, in revision order.
    let url = format!("{}/v1/ns/w/watch?prefix=cfg/", nodes[2].url);
    let live = tokio::spawn(async move { sse_events(&url, 4).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..4 {
        let via = if i % 2 == 0 { &a } else { &b };
        assert_eq!(via.put(&format!("/v1/ns/w/kv/cfg/{i}"), json!({"value": i})).await.status, 200);
    }
    let events = live.await.unwrap();
    let keys: Vec<&str> = events.iter().map(|(_, e)| e["data"]["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["cfg/0", "cfg/1", "cfg/2", "cfg/3"]);
    let revisions: Vec<u64> = events.iter().map(|(_, e)| e["data"]["revision"].as_u64().unwrap()).collect();
    assert!(revisions.windows(2).all(|w| w[0] < w[1]), "{revisions:?}");
}

#[tokio::test]
async fn expired_reservations_become_one_orphan_each_with_every_node_reconciling() {
    let (_pg, _url, nodes) = cluster(3);
    let a = Http::new(&nodes[0]);
    // Three hundred expiries, every node reconciling at once.
    const N: usize = 300;
    a.put("/v1/ns/q/pools/ips", json!({"capacity": N})).await;
    for i in 0..N {
        let via = Http::new(&nodes[i % 3]);
        let r = via.post("/v1/ns/q/pools/ips/reserve", json!({"amount": 1, "ttl_ms": 200, "context": {"i": i}})).await;
        assert_eq!(r.status, 200, "{:?}", r.body);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pool = a.get("/v1/ns/q/pools/ips").await.body;
        if pool["reserved"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "reservations not expired in time: {pool:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let orphans = Http::new(&nodes[2]).get("/v1/ns/q/orphans").await.body;
    let items = orphans["items"].as_array().expect("items");
    assert_eq!(items.len(), N, "each expiry handled exactly once: {orphans:?}");
    let mut contexts: Vec<i64> = items.iter().map(|o| o["context"]["i"].as_i64().unwrap()).collect();
    contexts.sort();
    assert_eq!(contexts, (0..N as i64).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_under_load_loses_no_acknowledged_write_and_the_others_carry_on() {
    let (_pg, url, mut nodes) = cluster(3);
    let victim = nodes.remove(0);
    let survivors: Vec<Arc<Http>> = nodes.iter().map(|n| Arc::new(Http::new(n))).collect();
    let victim_http = Arc::new(Http::new(&victim).tolerant());
    let writers: Vec<_> = (0..6)
        .map(|w| {
            let http = if w < 2 { victim_http.clone() } else { survivors[w % 2].clone() };
            tokio::spawn(async move {
                let mut acked = Vec::new();
                let started = Instant::now();
                let mut i = 0;
                while started.elapsed() < Duration::from_millis(1500) {
                    let r = http.put(&format!("/v1/ns/k/kv/w{w}/{i}"), json!({"value": i})).await;
                    if r.status == 200 {
                        acked.push(format!("w{w}/{i}"));
                    } else if w >= 2 {
                        panic!("a survivor answered {}: {:?}", r.status, r.body);
                    }
                    i += 1;
                }
                acked
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    victim.kill9();
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    let fresh = Server::start_backend(&url);
    let check = Http::new(&fresh);
    for key in &acked {
        assert_eq!(check.get(&format!("/v1/ns/k/kv/{key}")).await.status, 200, "acknowledged write {key} lost");
    }
    assert!(acked.len() > 50, "too little load to mean anything: {}", acked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_down_under_load_means_503_then_the_nodes_recover_without_a_restart() {
    let (mut pg, _url, nodes) = cluster(2);
    let https: Vec<Arc<Http>> = nodes.iter().map(|n| Arc::new(Http::new(n))).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Writers on both nodes throughout: before, during and after the outage.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (http, stop) = (https[w % 2].clone(), stop.clone());
            tokio::spawn(async move {
                let (mut acked, mut refused, mut i) = (Vec::new(), 0u32, 0u32);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = format!("w{w}/{i}");
                    let r = http.put(&format!("/v1/ns/k/kv/{key}"), json!({"value": i})).await;
                    match r.status {
                        200 => acked.push(key),
                        503 => {
                            assert_eq!(r.header("retry-after"), Some("1"));
                            refused += 1;
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        other => panic!("a write answered {other}: {:?}", r.body),
                    }
                    i += 1;
                }
                (acked, refused)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    pg.stop();
    let down = https[0].put("/v1/ns/k/kv/during", json!({"value": 1})).await;
    assert_eq!(down.status, 503, "{:?}", down.body);
    assert!(down.body["message"].as_str().unwrap().contains("unavailable"), "{:?}", down.body);
    let read = https[1].get("/v1/ns/k/kv/w0/0").await;
    assert_eq!(read.status, 503, "{:?}", read.body);
    assert_eq!(https[0].get("/healthz").await.status, 200, "healthz stays up");
    let ready = https[0].get("/readyz").await;
    assert_eq!(ready.status, 503, "{:?}", ready.body);
    assert!(ready.body["message"].as_str().unwrap().contains("database"), "{:?}", ready.body);
    // The CLI tells the two apart: `health` ok (exit 0), `health --ready` not (exit 6).
    let health = |extra: &'static [&'static str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gapguard"))
            .args(["--url", nodes[0].url.as_str(), "health"])
            .args(extra)
            .output()
            .expect("run gapguard health");
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    assert_eq!(health(&[]).0, Some(0));
    let (code, stderr) = health(&["--ready"]);
    assert_eq!(code, Some(6), "{stderr}");
    assert!(stderr.contains("not ready") && stderr.contains("database"), "{stderr}");
    tokio::time::sleep(Duration::from_millis(500)).await;

    pg.restart();
    let deadline = Instant::now() + Duration::from_secs(20);
    while https[0].get("/readyz").await.status != 200 || https[1].get("/readyz").await.status != 200 {
        assert!(Instant::now() < deadline, "the nodes did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(health(&["--ready"]).0, Some(0), "ready again");
    tokio::time::sleep(Duration::from_millis(700)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut acked, mut refused) = (Vec::new(), 0);
    for w in writers {
        let (a, r) = w.await.unwrap();
        acked.extend(a);
        refused += r;
    }
    assert!(refused > 0, "the writers never saw the outage");
    for key in &acked {
        assert_eq!(https[1].get(&format!("/v1/ns/k/kv/{key}")).await.status, 200, "acknowledged write {key} lost");
    }
    assert_eq!(https[1].get("/v1/ns/k/kv/during").await.status, 404, "a refused write left nothing");
    eprintln!("{} writes acknowledged, {refused} answered 503 during the outage", acked.len());
}

/// `gapguard serve --backend URL`, expected to refuse to start; its stderr.
fn refused(url: &str) -> String {
    Server::refused_start_with(&[std::ffi::OsStr::new("--backend"), std::ffi::OsStr::new(url)])
}

#[test]
fn a_bad_url_an_absent_database_and_a_newer_schema_stop_the_start_with_a_message() {
    let err = refused("mysql://nope");
    assert!(err.contains("invalid PostgreSQL URL"), "{err}");

    let pg = Postgres::start();
    let with_password = format!("postgres://postgres:SECRET@127.0.0.1:{}/no_such_db", pg.port());
    let err = refused(&with_password);
    assert!(err.contains("no_such_db") && err.contains("does not exist"), "{err}");
    assert!(err.contains("postgres:***@") && !err.contains("SECRET"), "the password is not shown: {err}");

    let url = pg.create_database("newer");
    drop(Server::start_backend(&url));
    pg.psql("newer", "UPDATE gg_schema SET version = 99");
    let err = refused(&url);
    assert!(err.contains("schema is version 99") && err.contains("newer than this gapguard"), "{err}");
}

#[test]
fn gameday_against_two_nodes_over_postgres_breaks_naive_and_holds_guarded() {
    let (_pg, _url, nodes) = cluster(2);
    let report = tempfile::NamedTempFile::new().unwrap();
    // Half the scenarios through each node: both serve one state.
    for (node, scenarios) in nodes.iter().zip(["inventory,quota,revocation", "lease,retry,cache,deploy"]) {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_gapguard"))
            .args(["--url", &node.url, "gameday", "--quick", "--no-progress", "--seed", "11", "--scenario", scenarios])
            .arg("--report")
            .arg(report.path())
            .output()
            .expect("run gapguard gameday");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "gameday failed over PostgreSQL:\n{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: Value = serde_json::from_slice(&std::fs::read(report.path()).unwrap()).unwrap();
        let runs = json["scenarios"].as_array().expect("scenarios in the report");
        assert_eq!(runs.len(), scenarios.split(',').count(), "{json}");
        for run in runs {
            let violations = |mode: &str| run[mode]["violations"].as_u64().unwrap_or_else(|| panic!("{run}"));
            assert!(violations("naive") > 0 && violations("guarded") == 0, "{run}");
        }
    }
}
