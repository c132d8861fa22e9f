//! Concurrency against the real binary: many clients racing check→act on one hot key never
//! oversell, and exactly the stock is sold.

mod support;

use std::sync::Arc;

use serde_json::json;
use support::{Http, Server};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_clients_check_then_act_sell_exactly_the_stock() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Arc::new(Http::new(&server));
    assert_eq!(http.put("/v1/ns/shop/kv/stock", json!({"value": 50})).await.status, 200);
    let mut clients = Vec::new();
    for _ in 0..32 {
        let http = http.clone();
        clients.push(tokio::spawn(async move {
            let (mut sold, mut stale) = (0u32, 0u32);
            loop {
                let check = http
                    .post(
                        "/v1/ns/shop/check",
                        json!({"conditions": [{"compare": {"key": "stock", "op": ">=", "value": 1}}]}),
                    )
                    .await;
                match check.status {
                    200 => {}
                    412 => return (sold, stale),
                    other => panic!("check answered {other}: {:?}", check.body),
                }
                let act = http
                    .post(
                        "/v1/ns/shop/act",
                        json!({"ticket": check.body["ticket"], "ops": [{"add": {"key": "stock", "by": -1}}]}),
                    )
                    .await;
                match (act.status, act.body["error"].as_str()) {
                    (200, _) => {
                        let left = act.body["results"][0]["value"].as_i64().unwrap();
                        assert!(left >= 0, "stock went below zero: {left}");
                        sold += 1;
                    }
                    (409, Some("stale_check")) => stale += 1,
                    other => panic!("act answered {other:?}: {:?}", act.body),
                }
            }
        }));
    }
    let (mut sold, mut stale) = (0, 0);
    for c in clients {
        let (s, st) = c.await.unwrap();
        sold += s;
        stale += st;
    }
    assert_eq!(sold, 50, "exactly the stock is sold");
    assert_eq!(http.get("/v1/ns/shop/kv/stock").await.body["value"], 0);
    // The audit log agrees: 50 committed acts, and one refusal per stale check.
    let audit = http.get("/v1/ns/shop/audit?key=stock&limit=10000").await;
    let events = audit.body["events"].as_array().unwrap();
    let committed_acts = events.iter().filter(|e| e["kind"] == "act" && e["outcome"] == "committed").count();
    let refused_acts = events.iter().filter(|e| e["kind"] == "act" && e["reason"] == "stale_check").count();
    assert_eq!(committed_acts, 50);
    assert_eq!(refused_acts as u32, stale);
}
