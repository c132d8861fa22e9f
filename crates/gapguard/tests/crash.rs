//! Crash tests: `kill -9` the real binary under 16 concurrent writers, restart it on the same
//! data directory, and check that every acknowledged write survived and the audit chain holds.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::{Http, Server};

const WRITERS: usize = 16;

/// Each writer puts 1, 2, 3… to its own key and remembers the last value acknowledged.
async fn writer(http: Arc<Http>, id: usize, start: i64, stop: Arc<AtomicBool>) -> (i64, i64) {
    let (mut acked, mut attempted) = (start, start);
    while !stop.load(Ordering::Relaxed) {
        attempted += 1;
        // Every other write goes through an act, so both write paths are covered.
        let reply = if attempted % 2 == 0 {
            http.send("PUT", &format!("/v1/ns/crash/kv/w{id}"), Some(&json!({"value": attempted})), &[]).await
        } else {
            let act = json!({"conditions": [{"version": {"key": format!("w{id}"), "is": attempted - 1}}],
                             "ops": [{"put": {"key": format!("w{id}"), "value": attempted}}]});
            http.send("POST", "/v1/ns/crash/act", Some(&act), &[]).await
        };
        match reply.status {
            200 => acked = attempted,
            0 => break, // connection gone: the server was killed
            other => panic!("writer {id} got {other}: {:?}", reply.body),
        }
    }
    (acked, attempted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(dir.path());
    let mut floor = [0i64; WRITERS];
    for round in 0..3 {
        let http = Arc::new(Http::new(&server).tolerant());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks: Vec<_> =
            (0..WRITERS).map(|id| tokio::spawn(writer(http.clone(), id, floor[id], stop.clone()))).collect();
        tokio::time::sleep(Duration::from_millis(400 + 150 * round)).await;
        server = server.crash_and_restart();
        stop.store(true, Ordering::Relaxed);
        let http = Http::new(&server);
        let mut total_acked = 0;
        for (id, task) in tasks.into_iter().enumerate() {
            let (acked, attempted) = task.await.unwrap();
            total_acked += acked - floor[id];
            let got = http.get(&format!("/v1/ns/crash/kv/w{id}")).await;
            let value = if got.status == 404 { 0 } else { got.body["value"].as_i64().unwrap() };
            assert!(value >= acked, "round {round}: writer {id} had {acked} acknowledged, the store has {value}");
            assert!(value <= attempted, "round {round}: writer {id} has {value}, never written");
            if value > 0 {
                assert_eq!(got.body["version"].as_i64().unwrap(), value, "one version per write");
            }
            floor[id] = value;
        }
        assert!(total_acked > 0, "round {round}: no write was acknowledged before the kill");
        let verify = http.get("/v1/audit/verify").await;
        assert_eq!(verify.body["ok"], true, "round {round}: {:?}", verify.body);
        // The restarted server accepts writes that continue the chain.
        let next = floor[0] + 1;
        assert_eq!(http.put("/v1/ns/crash/kv/w0", json!({"value": next})).await.status, 200);
        floor[0] = next;
        assert_eq!(http.get("/v1/audit/verify").await.body["ok"], true);
    }
}
