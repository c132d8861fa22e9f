//! Concurrency against the real binary, through the Rust client: many clients racing
//! check→act on one hot key never oversell, and exactly the stock is sold.

mod support;

use gapguard_api::{ActRequest, AddOp, CheckRequest, CompareCondition, CompareOp, Condition, Op};
use gapguard_client::{Client, RequestOptions};
use serde_json::json;
use support::{Http, Server};

fn in_stock() -> CheckRequest {
    let condition = CompareCondition { key: "stock".into(), op: CompareOp::Ge, value: 1.into() };
    CheckRequest { conditions: vec![Condition::Compare(condition)], ttl_ms: None, flow: Some("checkout".into()) }
}

fn sell_one(ticket: String) -> ActRequest {
    ActRequest {
        ticket: Some(ticket),
        conditions: vec![],
        ops: vec![Op::Add(AddOp { key: "stock".into(), by: (-1).into() })],
        flow: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn thirty_two_clients_check_then_act_sell_exactly_the_stock() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let client = Client::new(&server.url).unwrap();
    let none = RequestOptions::default();
    client.put("shop", "stock", &json!(50), &none).await.unwrap();
    let mut clients = Vec::new();
    for _ in 0..32 {
        let client = client.clone();
        clients.push(tokio::spawn(async move {
            let none = RequestOptions::default();
            let (mut sold, mut stale) = (0u32, 0u32);
            loop {
                let ticket = match client.check("shop", &in_stock(), &none).await {
                    Ok(r) => r.value.ticket,
                    Err(e) if e.code() == Some("check_failed") => return (sold, stale),
                    Err(e) => panic!("check failed unexpectedly: {e}"),
                };
                match client.act("shop", &sell_one(ticket), &none).await {
                    Ok(r) => {
                        let left = match &r.value.results[0] {
                            gapguard_api::OpResult::Add { value, .. } => value.as_i64().unwrap(),
                            other => panic!("unexpected result {other:?}"),
                        };
                        assert!(left >= 0, "stock went below zero: {left}");
                        sold += 1;
                    }
                    Err(e) if e.code() == Some("stale_check") => stale += 1,
                    Err(e) => panic!("act failed unexpectedly: {e}"),
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
    assert_eq!(client.get("shop", "stock").await.unwrap().value, json!(0));
    // The audit log agrees: 50 committed acts, and one refusal per stale check.
    let audit = Http::new(&server).get("/v1/ns/shop/audit?key=stock&limit=10000").await;
    let events = audit.body["events"].as_array().unwrap();
    let committed_acts = events.iter().filter(|e| e["kind"] == "act" && e["outcome"] == "committed").count();
    let refused_acts = events.iter().filter(|e| e["kind"] == "act" && e["reason"] == "stale_check").count();
    assert_eq!(committed_acts, 50);
    assert_eq!(refused_acts as u32, stale);
    assert!(events.iter().filter(|e| e["kind"] == "act").all(|e| e["flow"] == "checkout"), "the ticket's flow is kept");
}
