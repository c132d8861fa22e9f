//! Black-box tests of the guard's flows over HTTP, against the real binary: the ticket flow and
//! each way an act is refused, txn branches, idempotency, listing, audit and its verification.

mod support;

use serde_json::{json, Value};
use support::{Http, Server};

#[tokio::test]
async fn check_then_act_commits_and_reports_the_gap() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    assert_eq!(http.put("/v1/ns/shop/kv/stock/sku-1", json!({"value": 3})).await.status, 200);
    let check = http
        .post("/v1/ns/shop/check", json!({"conditions": [{"compare": {"key": "stock/sku-1", "op": ">=", "value": 1}}]}))
        .await;
    assert_eq!(check.status, 200, "{:?}", check.body);
    assert_eq!(check.body["revision"], 1);
    let ticket = check.body["ticket"].as_str().unwrap();
    let act = http
        .post("/v1/ns/shop/act", json!({"ticket": ticket, "ops": [{"add": {"key": "stock/sku-1", "by": -1}}]}))
        .await;
    assert_eq!(act.status, 200, "{:?}", act.body);
    assert_eq!(act.body["revision"], 2);
    assert_eq!(act.body["results"][0], json!({"op": "add", "key": "stock/sku-1", "value": 2, "version": 2}));
    assert!(act.body["check_to_use_ms"].as_u64().is_some());
    let reused = http
        .post("/v1/ns/shop/act", json!({"ticket": ticket, "ops": [{"add": {"key": "stock/sku-1", "by": -1}}]}))
        .await;
    assert_eq!((reused.status, reused.body["error"].as_str()), (409, Some("ticket_used")));
    assert_eq!(http.get("/v1/ns/shop/kv/stock/sku-1").await.body["value"], 2);
}

#[tokio::test]
async fn an_act_is_refused_when_a_checked_key_changed_naming_the_change() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    http.put("/v1/ns/shop/kv/flags/checkout", json!({"value": true})).await;
    let check = http
        .post("/v1/ns/shop/check", json!({"conditions": [{"equals": {"key": "flags/checkout", "value": true}}]}))
        .await;
    let ticket = check.body["ticket"].as_str().unwrap().to_owned();
    let change = http
        .send(
            "PUT",
            "/v1/ns/shop/kv/flags/checkout",
            Some(&json!({"value": false})),
            &[("x-correlation-id", "ops-toggle-7")],
        )
        .await;
    assert_eq!(change.status, 200);
    let act = http
        .post("/v1/ns/shop/act", json!({"ticket": ticket, "ops": [{"put": {"key": "orders/1", "value": "placed"}}]}))
        .await;
    assert_eq!(act.status, 409, "{:?}", act.body);
    assert_eq!(act.body["error"], "stale_check");
    let changed = &act.body["changed"][0];
    assert_eq!(changed["index"], 0);
    assert_eq!(changed["condition"], json!({"equals": {"key": "flags/checkout", "value": true}}));
    assert_eq!(changed["actual"], false);
    assert_eq!(changed["changed_at_revision"], change.body["revision"]);
    assert_eq!(changed["changed_by"], "ops-toggle-7");
    assert!(act.body["message"].as_str().unwrap().contains("ops-toggle-7"));
    assert_eq!(http.get("/v1/ns/shop/kv/orders/1").await.status, 404, "the refused act wrote nothing");
}

#[tokio::test]
async fn expired_tampered_and_foreign_tickets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    let ops = json!([{"put": {"key": "x", "value": 1}}]);
    let short = http.post("/v1/ns/a/check", json!({"conditions": [{"absent": "x"}], "ttl_ms": 1})).await;
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let expired = http.post("/v1/ns/a/act", json!({"ticket": short.body["ticket"], "ops": ops})).await;
    assert_eq!((expired.status, expired.body["error"].as_str()), (410, Some("ticket_expired")), "{:?}", expired.body);

    let good = http.post("/v1/ns/a/check", json!({"conditions": [{"absent": "x"}]})).await;
    let ticket = good.body["ticket"].as_str().unwrap();
    // Flip one character of the claims part.
    let mut tampered = ticket.to_owned().into_bytes();
    tampered[10] = if tampered[10] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let refused = http.post("/v1/ns/a/act", json!({"ticket": tampered, "ops": ops})).await;
    assert_eq!((refused.status, refused.body["error"].as_str()), (400, Some("invalid_ticket")));
    let foreign = http.post("/v1/ns/b/act", json!({"ticket": ticket, "ops": ops})).await;
    assert_eq!((foreign.status, foreign.body["error"].as_str()), (400, Some("invalid_ticket")));
    assert!(foreign.body["message"].as_str().unwrap().contains("\"a\""));
    assert_eq!(http.get("/v1/ns/b/kv/x").await.status, 404);
    // The genuine ticket still works in its own namespace.
    assert_eq!(http.post("/v1/ns/a/act", json!({"ticket": ticket, "ops": ops})).await.status, 200);

    // A null ticket is not "no ticket": an act with nothing to hold would have applied its ops
    // unguarded (stock 0 taken to -1).
    assert_eq!(http.put("/v1/ns/a/kv/stock", json!({"value": 0})).await.status, 200);
    let null = json!({"ticket": null, "ops": [{"add": {"key": "stock", "by": -1}}]});
    let refused = http.post("/v1/ns/a/act", null).await;
    assert_eq!((refused.status, refused.body["error"].as_str()), (400, Some("invalid_request")), "{:?}", refused.body);
    assert_eq!(refused.body["field"], "ticket", "{:?}", refused.body);
    assert_eq!(http.get("/v1/ns/a/kv/stock").await.body["value"], 0, "nothing applied");
}

#[tokio::test]
async fn a_failing_check_answers_412_with_what_was_found() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    http.put("/v1/ns/q/kv/stock", json!({"value": "seven"})).await;
    let r = http
        .post(
            "/v1/ns/q/check",
            json!({"conditions": [{"exists": "stock"}, {"compare": {"key": "stock", "op": ">=", "value": 1}}]}),
        )
        .await;
    assert_eq!((r.status, r.body["error"].as_str()), (412, Some("check_failed")));
    let failed = r.body["failed"].as_array().unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["index"], 1);
    assert_eq!(failed[0]["actual"], "seven");
    assert!(failed[0]["reason"].as_str().unwrap().contains("not a number"));
}

#[tokio::test]
async fn txn_runs_its_else_branch_when_the_condition_fails() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    http.put("/v1/ns/t/kv/acct/7", json!({"value": {"balance": 10}})).await;
    let txn = json!({
        "if": [{"version": {"key": "acct/7", "is": 5}}],
        "then": [{"put": {"key": "acct/7", "value": {"balance": 0}}}],
        "else": [{"put": {"key": "conflicts/acct-7", "value": true}}]
    });
    let r = http.post("/v1/ns/t/txn", txn).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.body["succeeded"], false);
    assert_eq!(r.body["revision"], 2);
    assert_eq!(http.get("/v1/ns/t/kv/conflicts/acct-7").await.body["value"], true);
    assert_eq!(http.get("/v1/ns/t/kv/acct/7").await.body["value"], json!({"balance": 10}));
    let then = json!({"if": [{"version": {"key": "acct/7", "is": 1}}], "then": [{"delete": {"key": "acct/7"}}]});
    let r = http.post("/v1/ns/t/txn", then).await;
    assert_eq!((r.body["succeeded"].as_bool(), r.body["revision"].as_u64()), (Some(true), Some(3)));
    assert_eq!(http.get("/v1/ns/t/kv/acct/7").await.status, 404);
    // A branch with no ops changes nothing: the revision stays, as in etcd, and the audit
    // event, committed at the revision the txn saw, says so rather than pass for the write
    // that made it.
    let idle = json!({"if": [{"exists": "acct/7"}], "then": [{"put": {"key": "x", "value": 1}}]});
    let r = http.post("/v1/ns/t/txn", idle).await;
    assert_eq!((r.body["succeeded"].as_bool(), r.body["revision"].as_u64()), (Some(false), Some(3)));
    let events = http.get("/v1/ns/t/audit?newest=true&limit=2").await.body["events"].clone();
    let (write, idle) = (&events[0], &events[1]);
    assert_eq!(
        (&write["revision"], &write["outcome"], &write["detail"]),
        (&json!(3), &json!("committed"), &Value::Null)
    );
    assert_eq!((&idle["revision"], &idle["outcome"]), (&json!(3), &json!("committed")));
    assert!(idle["detail"].as_str().unwrap().contains("changed nothing"), "{idle}");
    // So do a grant that exists already and an act whose one op deletes an absent key.
    let grant = json!({"subject": "user:eve", "action": "read", "resource": "doc:1"});
    assert_eq!(http.post("/v1/ns/t/grants", grant.clone()).await.body["revision"], 4);
    assert_eq!(http.post("/v1/ns/t/grants", grant).await.body["revision"], 4);
    let act = http.post("/v1/ns/t/act", json!({"ops": [{"delete": {"key": "never/was"}}]})).await;
    assert_eq!((act.status, &act.body["revision"]), (200, &json!(4)));
    let events = http.get("/v1/ns/t/audit?newest=true&limit=3").await.body["events"].clone();
    let details: Vec<bool> =
        (0..3).map(|i| events[i]["detail"].as_str().is_some_and(|d| d.contains("changed nothing"))).collect();
    assert_eq!(details, [false, true, true], "{events}");
}

#[tokio::test]
async fn idempotency_key_replays_and_refuses_a_different_request() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    let charge = json!({"ops": [{"add": {"key": "charged/cust-1", "by": 25}}]});
    let key = [("idempotency-key", "charge-8431")];
    let first = http.send("POST", "/v1/ns/pay/act", Some(&charge), &key).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.header("idempotent-replayed"), None);
    let replay = http.send("POST", "/v1/ns/pay/act", Some(&charge), &key).await;
    assert_eq!(replay.status, 200);
    assert_eq!(replay.header("idempotent-replayed"), Some("true"));
    assert_eq!(replay.body, first.body);
    let other = json!({"ops": [{"add": {"key": "charged/cust-1", "by": 99}}]});
    let conflict = http.send("POST", "/v1/ns/pay/act", Some(&other), &key).await;
    assert_eq!((conflict.status, conflict.body["error"].as_str()), (422, Some("idempotency_key_reused")));
    assert_eq!(http.get("/v1/ns/pay/kv/charged/cust-1").await.body["value"], 25, "charged once");
}

#[tokio::test]
async fn prefix_listing_is_ordered_bounded_and_namespaced() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    for k in ["orders/3", "orders/1", "orders/2", "ordersx", "users/1"] {
        http.put(&format!("/v1/ns/l/kv/{k}"), json!({"value": k})).await;
    }
    http.put("/v1/ns/other/kv/orders/9", json!({"value": 9})).await;
    http.send("DELETE", "/v1/ns/l/kv/orders/2", None, &[]).await;
    let r = http.get("/v1/ns/l/kv?prefix=orders/").await;
    let keys: Vec<_> =
        r.body["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap().to_owned()).collect();
    assert_eq!(keys, ["orders/1", "orders/3"]);
    assert_eq!(r.body["revision"], 7);
    let r = http.get("/v1/ns/l/kv?prefix=orders&limit=2").await;
    assert_eq!(r.body["items"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn audit_finds_events_by_correlation_id_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let check = http
        .send("POST", "/v1/ns/au/check", Some(&json!({"conditions": [{"absent": "job/1"}]})), &[("traceparent", tp)])
        .await;
    assert_eq!(check.header("traceparent"), Some(tp));
    assert_eq!(check.header("x-correlation-id"), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
    // One that is not a traceparent is ignored: not echoed, not the correlation id.
    let garbage = http.send("GET", "/v1/ns/au/kv/none", None, &[("traceparent", "garbage")]).await;
    assert_eq!((garbage.status, garbage.header("traceparent")), (404, None));
    assert_eq!(garbage.header("x-correlation-id").map(str::len), Some(32));
    let act = http
        .send(
            "POST",
            "/v1/ns/au/act",
            Some(&json!({"ticket": check.body["ticket"], "ops": [{"put": {"key": "job/1", "value": "run"}}]})),
            &[("x-correlation-id", "worker-42")],
        )
        .await;
    assert_eq!(act.status, 200);
    assert_eq!(act.header("x-correlation-id"), Some("worker-42"));
    http.send("PUT", "/v1/ns/au/kv/unrelated", Some(&json!({"value": 1})), &[("x-correlation-id", "noise")]).await;
    let r = http.get("/v1/ns/au/audit?correlation_id=worker-42").await;
    let events = r.body["events"].as_array().unwrap();
    assert_eq!(events.len(), 1, "{:?}", r.body);
    assert_eq!(events[0]["kind"], "act");
    assert_eq!(events[0]["outcome"], "committed");
    assert_eq!(events[0]["keys"], json!(["job/1"]));
    assert_eq!(events[0]["check"]["correlation_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(events[0]["check"]["revision"], 0);
    // The check's own id finds the act that used its ticket (a passing check has no event).
    let by_check = http.get("/v1/ns/au/audit?correlation_id=4bf92f3577b34da6a3ce929d0e0e4736").await;
    assert_eq!(by_check.body["events"], r.body["events"], "{:?}", by_check.body);
    let by_key = http.get("/v1/ns/au/audit?key=unrelated").await;
    assert_eq!(by_key.body["events"].as_array().unwrap().len(), 1);
    let v = http.get("/v1/audit/verify").await;
    assert_eq!(v.status, 200);
    assert_eq!(v.body["ok"], true);
    assert_eq!(v.body["events"], 2);
    assert_eq!(v.body["head"], by_key.body["events"][0]["hash"]);
}

#[tokio::test]
async fn health_and_openapi_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    let h = http.get("/healthz").await;
    assert_eq!((h.status, h.body["status"].as_str()), (200, Some("ok")));
    let doc = http.get("/v1/openapi.json").await;
    assert_eq!(doc.status, 200);
    for path in ["/v1/ns/{ns}/check", "/v1/ns/{ns}/act", "/v1/ns/{ns}/txn", "/v1/ns/{ns}/kv/{key}", "/v1/audit/verify"]
    {
        assert!(doc.body["paths"][path].is_object(), "{path} missing from the OpenAPI document");
    }
    assert!(doc.body["paths"]["/metrics"]["get"].is_object(), "/metrics missing from the OpenAPI document");
    assert_eq!(doc.body["components"]["securitySchemes"]["api_key"]["scheme"], "bearer");
    let mut operations = 0;
    for (path, item) in doc.body["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations += 1;
            let at = format!("{} {path}", method.to_uppercase());
            let params = op["parameters"].as_array().cloned().unwrap_or_default();
            for p in &params {
                let name = p["name"].as_str().unwrap();
                // A parameter in the path is one of its `{…}`; any other is optional.
                match p["in"].as_str().unwrap() {
                    "path" => assert!(path.contains(&format!("{{{name}}}")), "{at}: `{name}` is not in the path"),
                    _ => assert_eq!(p["required"], false, "{at}: `{name}` is required"),
                }
            }
            for segment in path.split('/').filter(|s| s.starts_with('{')) {
                let name = segment.trim_matches(|c| c == '{' || c == '}');
                assert!(params.iter().any(|p| p["name"] == name && p["in"] == "path"), "{at}: `{name}` undeclared");
            }
            // What the server answers to requests every route refuses, the document lists.
            let concrete = path
                .replace("{ns}", "shop")
                .replace("{key}", "k")
                .replace("{pool}", "p")
                .replace("{id}", "x")
                .replace("{name}", "l");
            let documented = |status: u16| !op["responses"][status.to_string()].is_null();
            let verb = method.to_uppercase();
            let bad_id = http.send(&verb, &concrete, None, &[("x-correlation-id", "has space")]).await;
            assert!(documented(bad_id.status), "{at}: answers {} to a bad X-Correlation-Id", bad_id.status);
            // The header it refused, and the trace context it also reads, the document declares.
            assert_eq!(bad_id.status, 400, "{at}");
            for header in ["X-Correlation-Id", "traceparent"] {
                assert!(
                    params.iter().any(|p| p["name"] == header && p["in"] == "header"),
                    "{at}: `{header}` undeclared"
                );
            }
            if method != "get" && path != "/metrics" {
                let huge = Value::String("x".repeat(1024 * 1024));
                let too_big = http.send(&verb, &concrete, Some(&huge), &[]).await;
                assert!(documented(too_big.status), "{at}: answers {} to a body past the limit", too_big.status);
            }
        }
    }
    assert!(operations > 25, "{operations} operations");
    // A documented query parameter is read from the query: the kv listing's `limit` below its
    // documented minimum is refused as the document says.
    let list = &doc.body["paths"]["/v1/ns/{ns}/kv"]["get"]["parameters"];
    let limit = list.as_array().unwrap().iter().find(|p| p["name"] == "limit").unwrap();
    assert_eq!((limit["in"].as_str(), limit["schema"]["minimum"].as_u64()), (Some("query"), Some(1)));
    assert_eq!(http.get("/v1/ns/shop/kv?limit=0").await.status, 400);
    assert_eq!(http.get("/v1/ns/shop/kv?limit=1").await.status, 200);
}

/// A prefix listing pages: `more` says whether keys match past the page, `after` the last key
/// of a page starts the next one, and keys outside the prefix never appear.
#[tokio::test]
async fn a_listing_pages_with_more_and_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    for key in ["a", "item/", "item0", "itemz"] {
        assert_eq!(http.put(&format!("/v1/ns/shop/kv/{key}"), json!({"value": 0})).await.status, 200);
    }
    let mut expected: Vec<String> = (0..25).map(|i| format!("item/{i:02}")).collect();
    for key in &expected {
        assert_eq!(http.put(&format!("/v1/ns/shop/kv/{key}"), json!({"value": key})).await.status, 200);
    }
    expected.insert(0, "item/".into());
    let (mut seen, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let query = after.as_ref().map(|a| format!("&after={a}")).unwrap_or_default();
        let page = http.get(&format!("/v1/ns/shop/kv?prefix=item/&limit=10{query}")).await;
        assert_eq!(page.status, 200, "{:?}", page.body);
        let items: Vec<String> =
            page.body["items"].as_array().unwrap().iter().map(|i| i["key"].as_str().unwrap().to_owned()).collect();
        pages += 1;
        seen.extend(items.iter().cloned());
        if page.body["more"] == false {
            assert_eq!(items.len(), 6, "the last page holds the rest");
            break;
        }
        assert_eq!((items.len(), &page.body["more"]), (10, &json!(true)));
        after = items.last().cloned();
    }
    assert_eq!((seen, pages), (expected, 3));
    // A page that ends exactly at the last key says no more; `after` past every key, or before
    // the prefix, behaves as a bound, not an error.
    let whole = http.get("/v1/ns/shop/kv?prefix=item/&limit=26").await;
    assert_eq!((whole.body["items"].as_array().unwrap().len(), &whole.body["more"]), (26, &json!(false)));
    let past = http.get("/v1/ns/shop/kv?prefix=item/&after=item/99").await;
    assert_eq!((past.body["items"].as_array().unwrap().len(), &past.body["more"]), (0, &json!(false)));
    let before = http.get("/v1/ns/shop/kv?prefix=item/&after=a&limit=1").await;
    assert_eq!((&before.body["items"][0]["key"], &before.body["more"]), (&json!("item/"), &json!(true)));
}

/// The hot routes (a key's GET and PUT, check, act, reserve, commit) are served without the
/// router when their path needs no decoding; with the namespace percent-encoded, the same
/// requests go through the router. Both ways must answer alike, and count in the metrics under
/// the same route.
#[tokio::test]
async fn the_hot_routes_answer_as_the_router_does() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    let over_limit = json!({"value": "x".repeat(1024 * 1024)});
    // (method, path after the namespace, body, headers, the status both ways answer)
    type Case<'a> = (&'a str, &'a str, Option<serde_json::Value>, Vec<(&'a str, &'a str)>, u16);
    let cases: Vec<Case> = vec![
        ("PUT", "kv/a", Some(json!({"value": 1, "extra": 2})), vec![], 400),
        ("PUT", "kv/a", Some(json!([1])), vec![], 400),
        ("PUT", "kv/a", Some(over_limit), vec![], 413),
        ("PUT", "kv/a", Some(json!({"value": 1})), vec![("x-correlation-id", "not visible")], 400),
        ("GET", "kv/missing", None, vec![], 404),
        ("POST", "check", Some(json!({"conditions": [{"exists": "missing"}]})), vec![], 412),
        ("POST", "check", Some(json!({"conditions": []})), vec![], 400),
        ("POST", "act", Some(json!({"ticket": "gt1.forged.x", "ops": [{"add": {"key": "n", "by": 1}}]})), vec![], 400),
        (
            "POST",
            "act",
            Some(json!({"conditions": [{"exists": "missing"}], "ops": [{"add": {"key": "n", "by": 1}}]})),
            vec![],
            409,
        ),
        ("POST", "pools/none/reserve", Some(json!({"amount": 1, "ttl_ms": 1000})), vec![], 404),
        ("POST", "reservations/rsv_9_9/commit", None, vec![], 404),
    ];
    for (method, route, body, headers, status) in &cases {
        let hot = http.send(method, &format!("/v1/ns/shop/{route}"), body.as_ref(), headers).await;
        let routed = http.send(method, &format!("/v1/ns/sh%6Fp/{route}"), body.as_ref(), headers).await;
        assert_eq!(hot.status, *status, "{method} {route} {headers:?}: {:?}", hot.body);
        assert_eq!((routed.status, &routed.body), (hot.status, &hot.body), "{method} {route}");
        let echoed = headers.is_empty();
        assert_eq!(hot.header("x-correlation-id").is_some(), echoed, "{method} {route}");
        assert_eq!(routed.header("x-correlation-id").is_some(), echoed, "{method} {route}");
    }
    // The error of the oversize body names the limit.
    assert_eq!(
        http.put("/v1/ns/shop/kv/a", json!({"value": "x".repeat(1024 * 1024)})).await.body["limit_bytes"],
        1024 * 1024
    );

    // Writes both ways, each echoing the caller's correlation id; the second sees the first.
    let id = [("x-correlation-id", "both-ways-1")];
    let first = http.send("PUT", "/v1/ns/shop/kv/n", Some(&json!({"value": 1})), &id).await;
    assert_eq!((first.status, first.body["version"].as_u64()), (200, Some(1)), "{:?}", first.body);
    assert_eq!(first.header("x-correlation-id"), Some("both-ways-1"));
    let second = http.send("PUT", "/v1/ns/sh%6Fp/kv/n", Some(&json!({"value": 2})), &id).await;
    assert_eq!((second.status, second.body["version"].as_u64()), (200, Some(2)), "{:?}", second.body);
    assert_eq!(second.header("x-correlation-id"), Some("both-ways-1"));
    // An idempotent retry is the same request whichever way its path is encoded.
    let key = [("idempotency-key", "both-ways-put")];
    let first = http.send("PUT", "/v1/ns/shop/kv/m", Some(&json!({"value": 1})), &key).await;
    let retry = http.send("PUT", "/v1/ns/sh%6Fp/kv/m", Some(&json!({"value": 1})), &key).await;
    assert_eq!((first.status, retry.status, retry.header("idempotent-replayed")), (200, 200, Some("true")));
    assert_eq!(retry.body, first.body);
    let read = [http.get("/v1/ns/shop/kv/n").await, http.get("/v1/ns/sh%6Fp/kv/n").await];
    assert_eq!(read[0].body, read[1].body);
    assert_eq!(read[0].body["value"], 2);

    // A reservation taken one way is committed the other.
    http.put("/v1/ns/shop/pools/p", json!({"capacity": 2})).await;
    let reserved = http.post("/v1/ns/shop/pools/p/reserve", json!({"amount": 1, "ttl_ms": 60000})).await;
    assert_eq!(reserved.status, 200, "{:?}", reserved.body);
    let id = reserved.body["reservation"].as_str().unwrap();
    let commit = http.send("POST", &format!("/v1/ns/sh%6Fp/reservations/{id}/commit"), None, &[]).await;
    assert_eq!(commit.status, 200, "{:?}", commit.body);
    let again = http.send("POST", &format!("/v1/ns/shop/reservations/{id}/commit"), None, &[]).await;
    assert_eq!((again.status, again.body["error"].as_str()), (409, Some("reservation_committed")), "{:?}", again.body);

    // Every request of a pair was counted under the route's template, once each way.
    let metrics = reqwest::get(format!("{}/metrics", server.url)).await.unwrap().text().await.unwrap();
    let count = |route: &str, method: &str, status: u16| {
        let series =
            format!("gapguard_http_requests_total{{route=\"{route}\",method=\"{method}\",status=\"{status}\"}} ");
        metrics.lines().find_map(|l| l.strip_prefix(series.as_str())).map(|v| v.trim().parse::<f64>().unwrap())
    };
    assert_eq!(count("/v1/ns/{ns}/check", "POST", 412), Some(2.0), "{metrics}");
    assert_eq!(count("/v1/ns/{ns}/check", "POST", 400), Some(2.0));
    assert_eq!(count("/v1/ns/{ns}/act", "POST", 409), Some(2.0));
    assert_eq!(count("/v1/ns/{ns}/kv/{*key}", "GET", 404), Some(2.0));
    assert_eq!(count("/v1/ns/{ns}/kv/{*key}", "PUT", 413), Some(3.0));
    assert_eq!(count("/v1/ns/{ns}/pools/{pool}/reserve", "POST", 404), Some(2.0));
    assert_eq!(count("/v1/ns/{ns}/reservations/{id}/commit", "POST", 200), Some(1.0));
    assert_eq!(count("/v1/ns/{ns}/reservations/{id}/commit", "POST", 409), Some(1.0));
}
