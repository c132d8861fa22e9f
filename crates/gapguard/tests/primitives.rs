//! Black-box tests of the coordination primitives against the real binary: leases and their
//! fencing tokens (across expiry and `kill -9`), pools under 64 racing reservers, expiry into
//! orphans, revocation at use, and the watch stream.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{sse_events, sse_events_with, Http, Server};

#[tokio::test]
async fn leases_are_exclusive_and_tokens_grow_across_expiry_and_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    let a = http.post("/v1/ns/ops/leases/migrator/acquire", json!({"holder": "worker-a", "ttl_ms": 300})).await;
    assert_eq!(a.status, 200, "{:?}", a.body);
    let token_a = a.body["token"].as_u64().unwrap();
    let b = http.post("/v1/ns/ops/leases/migrator/acquire", json!({"holder": "worker-b", "ttl_ms": 300})).await;
    assert_eq!(
        (b.status, b.body["error"].as_str(), b.body["holder"].as_str()),
        (409, Some("lease_held"), Some("worker-a"))
    );
    // worker-a pauses past its expiry (a GC pause); worker-b takes over with a greater token.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let b = http.post("/v1/ns/ops/leases/migrator/acquire", json!({"holder": "worker-b", "ttl_ms": 60000})).await;
    assert_eq!(b.status, 200, "{:?}", b.body);
    let token_b = b.body["token"].as_u64().unwrap();
    assert!(token_b > token_a);
    // The stale holder wakes up: its renewal, its release and its fenced write are refused.
    let renew = http.post("/v1/ns/ops/leases/migrator/renew", json!({"token": token_a})).await;
    assert_eq!((renew.status, renew.body["error"].as_str()), (409, Some("lease_lost")));
    let stale_write = json!({"conditions": [{"lease": {"name": "migrator", "token": token_a}}],
                             "ops": [{"put": {"key": "schema/version", "value": 7}}]});
    let refused = http.post("/v1/ns/ops/act", stale_write).await;
    assert_eq!((refused.status, refused.body["error"].as_str()), (409, Some("condition_failed")), "{:?}", refused.body);
    assert_eq!(http.get("/v1/ns/ops/kv/schema/version").await.status, 404);
    let fenced = json!({"conditions": [{"lease": {"name": "migrator", "token": token_b}}],
                        "ops": [{"put": {"key": "schema/version", "value": 8}}]});
    assert_eq!(http.post("/v1/ns/ops/act", fenced).await.status, 200);
    // The expired hold of worker-a is an orphan for the cleanup job.
    let orphans = http.get("/v1/ns/ops/orphans").await;
    let lease_orphans: Vec<&Value> =
        orphans.body["items"].as_array().unwrap().iter().filter(|o| o["kind"] == "lease").collect();
    assert_eq!(lease_orphans.len(), 1, "{:?}", orphans.body);
    assert_eq!(
        (lease_orphans[0]["holder"].as_str(), lease_orphans[0]["token"].as_u64()),
        (Some("worker-a"), Some(token_a))
    );
    // Tokens keep growing after a crash: release, kill -9, restart, acquire again.
    assert_eq!(http.post("/v1/ns/ops/leases/migrator/release", json!({"token": token_b})).await.status, 200);
    let server = server.crash_and_restart();
    let http = Http::new(&server);
    let c = http.post("/v1/ns/ops/leases/migrator/acquire", json!({"holder": "worker-c", "ttl_ms": 1000})).await;
    assert_eq!(c.status, 200, "{:?}", c.body);
    assert!(c.body["token"].as_u64().unwrap() > token_b, "token went back after a restart: {:?}", c.body);
    let got = http.get("/v1/ns/ops/leases/migrator").await;
    assert_eq!((got.body["held"].as_bool(), got.body["holder"].as_str()), (Some(true), Some("worker-c")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_four_reservers_commit_exactly_the_capacity() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Arc::new(Http::new(&server));
    assert_eq!(http.put("/v1/ns/q/pools/vm-quota", json!({"capacity": 100})).await.status, 200);
    let total = support::reserve_and_commit_until_full(std::slice::from_ref(&http), "q", "vm-quota", 64).await;
    assert_eq!(total, 100);
    let pool = http.get("/v1/ns/q/pools/vm-quota").await.body;
    assert_eq!(
        (pool["used"].as_u64(), pool["reserved"].as_u64(), pool["available"].as_u64()),
        (Some(100), Some(0), Some(0))
    );
    // Capacity cannot drop below what is in use.
    let shrink = http.put("/v1/ns/q/pools/vm-quota", json!({"capacity": 99})).await;
    assert_eq!((shrink.status, shrink.body["error"].as_str()), (409, Some("capacity_too_low")));
}

#[tokio::test]
async fn an_expired_reservation_returns_to_the_pool_as_an_orphan_and_cannot_commit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    http.put("/v1/ns/q/pools/ips", json!({"capacity": 10})).await;
    let r = http
        .post(
            "/v1/ns/q/pools/ips/reserve",
            json!({"amount": 3, "ttl_ms": 200, "context": {"vm": "v-17", "step": "attach-ip"}}),
        )
        .await;
    assert_eq!(r.status, 200);
    let id = r.body["reservation"].as_str().unwrap().to_owned();
    assert_eq!(http.get("/v1/ns/q/pools/ips").await.body["available"], 7);
    let deadline = Instant::now() + Duration::from_millis(200 + 2000);
    loop {
        if http.get("/v1/ns/q/pools/ips").await.body["available"] == 10 {
            break;
        }
        assert!(Instant::now() < deadline, "the reservation was not back in the pool within 2 s of its expiry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let orphans = http.get("/v1/ns/q/orphans").await.body;
    let orphan = &orphans["items"][0];
    assert_eq!(orphan["reservation"], id.as_str());
    assert_eq!(orphan["context"], json!({"vm": "v-17", "step": "attach-ip"}));
    let late = http.send("POST", &format!("/v1/ns/q/reservations/{id}/commit"), None, &[]).await;
    assert_eq!((late.status, late.body["error"].as_str()), (410, Some("reservation_expired")));
    let again = http.send("POST", &format!("/v1/ns/q/reservations/{id}/release"), None, &[]).await;
    assert_eq!(again.status, 410);
    // The cleanup job compensates and marks it resolved; it leaves the list.
    let orphan_id = orphan["id"].as_str().unwrap();
    let resolved = http.post(&format!("/v1/ns/q/orphans/{orphan_id}/resolve"), json!({"note": "ip released"})).await;
    assert_eq!(resolved.status, 200, "{:?}", resolved.body);
    assert!(http.get("/v1/ns/q/orphans").await.body["items"].as_array().unwrap().is_empty());
    let twice = http.post(&format!("/v1/ns/q/orphans/{orphan_id}/resolve"), json!({})).await;
    assert_eq!((twice.status, twice.body["error"].as_str()), (409, Some("orphan_resolved")));
    // Resolving each outcome twice answers its own code.
    let r = http.post("/v1/ns/q/pools/ips/reserve", json!({"amount": 1, "ttl_ms": 60000})).await;
    let id = r.body["reservation"].as_str().unwrap();
    assert_eq!(http.send("POST", &format!("/v1/ns/q/reservations/{id}/release"), None, &[]).await.status, 200);
    let c = http.send("POST", &format!("/v1/ns/q/reservations/{id}/commit"), None, &[]).await;
    assert_eq!((c.status, c.body["error"].as_str()), (409, Some("reservation_released")));
}

#[tokio::test]
async fn a_revocation_between_check_and_act_refuses_the_act_and_is_named_in_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    let alice = json!({"subject": "user:alice", "action": "export", "resource": "report:9"});
    assert_eq!(http.post("/v1/ns/docs/grants", alice.clone()).await.status, 200);
    let check = http.post("/v1/ns/docs/check", json!({"conditions": [{"permitted": alice}]})).await;
    assert_eq!(check.status, 200, "{:?}", check.body);
    let revoke =
        http.send("POST", "/v1/ns/docs/grants/revoke", Some(&alice), &[("x-correlation-id", "offboarding-77")]).await;
    assert_eq!(revoke.status, 200);
    let act = json!({"ticket": check.body["ticket"], "ops": [{"put": {"key": "exports/report-9", "value": "queued"}}]});
    let refused = http.send("POST", "/v1/ns/docs/act", Some(&act), &[("x-correlation-id", "export-job-5")]).await;
    assert_eq!((refused.status, refused.body["error"].as_str()), (409, Some("stale_check")), "{:?}", refused.body);
    assert_eq!(refused.body["changed"][0]["changed_at_revision"], revoke.body["revision"]);
    assert_eq!(refused.body["changed"][0]["changed_by"], "offboarding-77");
    let audit = http.get("/v1/ns/docs/audit?correlation_id=export-job-5").await.body;
    let detail = audit["events"][0]["detail"].as_str().unwrap();
    let revision = revoke.body["revision"].as_u64().unwrap();
    assert!(detail.contains(&format!("changed at revision {revision} by offboarding-77")), "{detail}");
    assert_eq!(http.get("/v1/ns/docs/grants?subject=user:alice").await.body["items"], json!([]));
}

#[tokio::test]
async fn watch_sees_later_puts_and_resumes_without_gaps_or_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    let url = format!("{}/v1/ns/w/watch?prefix=cfg/", server.url);
    let live = tokio::spawn(async move { sse_events(&url, 3).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    for i in 1..=3 {
        http.put(&format!("/v1/ns/w/kv/cfg/{i}"), json!({"value": i})).await;
        http.put("/v1/ns/w/kv/other", json!({"value": i})).await;
    }
    let events = live.await.unwrap();
    let keys: Vec<&str> = events.iter().map(|(_, e)| e["data"]["key"].as_str().unwrap()).collect();
    assert_eq!(keys, ["cfg/1", "cfg/2", "cfg/3"], "only the prefix, in order");
    let revisions: Vec<u64> = events.iter().map(|(_, e)| e["data"]["revision"].as_u64().unwrap()).collect();
    assert_eq!(revisions, [1, 3, 5]);
    // Resume after the first event's revision: exactly the rest, in order, then a new one.
    let resume = format!("{}/v1/ns/w/watch?from_revision={}", server.url, revisions[0] + 1);
    let resumed = tokio::spawn(async move { sse_events(&resume, 6).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    http.put("/v1/ns/w/kv/cfg/4", json!({"value": 4})).await;
    let resumed = resumed.await.unwrap();
    let seen: Vec<u64> = resumed.iter().map(|(id, _)| id.unwrap()).collect();
    assert_eq!(seen, [2, 3, 4, 5, 6, 7], "every revision after 1, once, in order: backlog, then live");
    // An EventSource reconnects to the same URL with the last id it saw: that id wins over
    // the URL's `from_revision`, so the stream resumes instead of replaying.
    let again = format!("{}/v1/ns/w/watch?prefix=cfg/&from_revision=1", server.url);
    let after_5 = sse_events_with(&again, &[("last-event-id", "5")], 1).await;
    assert_eq!((after_5[0].0, &after_5[0].1["data"]["key"]), (Some(7), &json!("cfg/4")));
    // Before the server's start, history is compacted.
    let server = server.crash_and_restart();
    let old = format!("{}/v1/ns/w/watch?from_revision=1", server.url);
    let compacted = sse_events(&old, 1).await;
    assert_eq!(compacted[0].1["event"], "compacted");
    assert_eq!(compacted[0].1["data"]["first_available_revision"], 8);
}

/// Watch history is bounded in bytes too (`watch_history_bytes`): large values push the
/// oldest changes out, and a watch from before what is kept is answered `compacted`.
#[tokio::test]
async fn watch_history_keeps_at_most_its_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(dir.path(), "watch_history_bytes = 200000\n");
    let http = Http::new(&server);
    let big = "x".repeat(30_000);
    for i in 1..=5 {
        assert_eq!(http.put(&format!("/v1/ns/w/kv/big/{i}"), json!({"value": big})).await.status, 200);
    }
    // Each counts about 60 kB (the value twice: parsed and rendered for watchers): three fit
    // in 200 kB, four do not, so revisions 3 to 5 are kept.
    let old = format!("{}/v1/ns/w/watch?from_revision=1", server.url);
    let compacted = sse_events(&old, 1).await;
    assert_eq!(compacted[0].1["event"], "compacted", "{:?}", compacted[0]);
    assert_eq!(compacted[0].1["data"]["first_available_revision"], 3);
    let kept = format!("{}/v1/ns/w/watch?from_revision=3", server.url);
    let events = sse_events(&kept, 3).await;
    let revisions: Vec<Option<u64>> = events.iter().map(|(id, _)| *id).collect();
    assert_eq!(revisions, [Some(3), Some(4), Some(5)]);
}

/// The `data` of the first `change` event of an open watch stream.
async fn first_change(stream: &mut reqwest::Response) -> Value {
    let mut text = String::new();
    loop {
        if let Some(block) = text.split("\n\n").find(|b| b.contains("event: change")) {
            if text.contains(&format!("{block}\n\n")) {
                let data = block.lines().find_map(|l| l.strip_prefix("data: ")).expect("a data line");
                return serde_json::from_str(data).expect("JSON data");
            }
        }
        let chunk = tokio::time::timeout(Duration::from_secs(10), stream.chunk()).await.expect("an event in time");
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap().expect("the stream goes on")));
    }
}

/// Watch streams are bounded (`max_watches`): past it a watch answers `503` with
/// `Retry-After`; once one ends, a new one opens. Watchers of one change all get it whole (it
/// is rendered once and shared).
#[tokio::test]
async fn watch_streams_are_bounded_and_share_what_they_send() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(dir.path(), "max_watches = 2\n");
    let http = Http::new(&server);
    let url = format!("{}/v1/ns/w/watch?from_revision=1", server.url);
    let first = reqwest::get(&url).await.unwrap();
    let mut second = reqwest::get(&url).await.unwrap();
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let refused = http.get("/v1/ns/w/watch").await;
    assert_eq!((refused.status, refused.body["error"].as_str()), (503, Some("unavailable")), "{:?}", refused.body);
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert!(refused.body["message"].as_str().unwrap().contains("max_watches"), "{:?}", refused.body);
    drop(first);
    // The server learns of the closed stream when it next writes to it (a change, or the
    // keep-alive): a put makes it write.
    let value = json!({"nested": {"list": [1, 2, 3]}, "text": "é"});
    assert_eq!(http.put("/v1/ns/w/kv/a", json!({"value": value})).await.status, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut third = loop {
        let r = reqwest::get(&url).await.unwrap();
        if r.status() == 200 {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no place freed for a new watch");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Two watchers of the same change: the same event, whole.
    let (a, b) = (first_change(&mut second).await, first_change(&mut third).await);
    assert_eq!(a, b);
    assert_eq!((a["key"].as_str(), &a["value"]), (Some("a"), &value), "{a}");
}

#[tokio::test]
async fn sigterm_stops_the_server_even_with_a_watch_open() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let url = format!("{}/v1/ns/w/watch", server.url);
    let mut response = reqwest::get(&url).await.unwrap();
    assert_eq!(response.status(), 200);
    let status = tokio::task::spawn_blocking(move || server.terminate_within(Duration::from_secs(5))).await.unwrap();
    assert!(status.success(), "the server exited with {status}");
    // The stream ended cleanly with the server.
    let end = tokio::time::timeout(Duration::from_secs(5), async { while let Ok(Some(_)) = response.chunk().await {} });
    end.await.expect("the watch stream ended");
}

/// A grant listing at `max_list_limit` (10,000) lists everything; one past it says there is
/// more, rather than stopping silently; narrowed by subject, it lists the rest whole.
#[tokio::test]
async fn a_grant_listing_past_its_limit_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    let http = Http::new(&server);
    let grant = |batch: usize, i: usize| json!({"grant": {"subject": format!("user:{batch}"), "action": "read", "resource": format!("doc:{i}")}});
    // 78 × 128 + 16 = 10,000 grants: exactly the limit, all listed, nothing more.
    for batch in 0..79 {
        let ops: Vec<Value> = (0..if batch < 78 { 128 } else { 16 }).map(|i| grant(batch, i)).collect();
        assert_eq!(http.post("/v1/ns/g/act", json!({"ops": ops})).await.status, 200);
    }
    let all = http.get("/v1/ns/g/grants").await;
    assert_eq!((all.body["items"].as_array().unwrap().len(), &all.body["more"]), (10_000, &json!(false)));
    // One past it: still 10,000 listed, and `more` says so.
    assert_eq!(http.post("/v1/ns/g/act", json!({"ops": [grant(79, 0)]})).await.status, 200);
    let all = http.get("/v1/ns/g/grants").await;
    assert_eq!((all.body["items"].as_array().unwrap().len(), &all.body["more"]), (10_000, &json!(true)));
    let one = http.get("/v1/ns/g/grants?subject=user:7").await;
    assert_eq!((one.body["items"].as_array().unwrap().len(), &one.body["more"]), (128, &json!(false)));
}
