//! cache: services decide from a cached feature flag while an operator flips it.
//! Naive: each service caches the flag (`get`, kept for four mean delays) and acts (`put
//! actions/ID`) on what it cached. Guarded: each service's cache is kept current by a watch of
//! the flag (invalidated on every change, re-read after a broken stream), and the act is
//! conditioned on the flag's version the decision was based on.
//! Invariant: no act commits after the flag value it was based on was superseded (judged by
//! revision: no flag write between the revision the decision saw and the act's).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use gapguard_api::{ActRequest, Condition, Op, PutOp, VersionCondition};
use gapguard_client::{WatchMessage, WatchQuery};
use serde_json::{json, Value};

use super::{joined, spawn_all};
use crate::env::{backoff, sleep, Env};
use crate::history::{OpRecord, Outcome};
use crate::judge::{superseded_between, writes, Judgement, Violation};
use crate::{GamedayError, Mode};

const FLAG: &str = "flags/checkout";

/// What a service knows of the flag.
#[derive(Clone, Debug)]
struct Cached {
    value: Value,
    version: u64,
    mod_revision: u64,
    fetched: Instant,
}

pub async fn run(env: Arc<Env>) -> Result<(), GamedayError> {
    env.seed("operator", "flip", FLAG, json!({ "on": true, "n": 0 }), "set the flag").await?;
    let operator = tokio::spawn(operator(env.clone()));
    spawn_all(&env, env.actors, service).await?;
    joined(operator, "the operator").await?;
    Ok(())
}

/// Flips the flag every two mean delays (plain puts: the operator is the same in both modes).
async fn operator(env: Arc<Env>) {
    let interval = env.mean_delay(12.5) * 2;
    let mut n = 1;
    while env.running() {
        sleep(interval).await;
        let corr = env.correlation_id("operator", n);
        let value = json!({ "on": n % 2 == 0, "n": n });
        let mut op = OpRecord::new("operator", "flip", corr.clone());
        op.written = value.clone();
        op.outcome = match env.client.put(&env.ns, FLAG, &value, &env.opts(&corr)).await {
            Ok(done) => Outcome::Committed { revision: done.value.revision, resolved: false },
            Err(e) => Outcome::from_error(&e),
        };
        env.record(op);
        n += 1;
    }
}

async fn read(env: &Env) -> Option<Cached> {
    let record = env.client.get(&env.ns, FLAG).await.ok()?;
    Some(Cached {
        value: record.value,
        version: record.version,
        mod_revision: record.mod_revision,
        fetched: Instant::now(),
    })
}

/// Keeps `cache` current from a watch of the flag until the run ends; a broken stream empties
/// the cache (the service reads the flag itself) until the watch is back.
async fn watcher(env: Arc<Env>, cache: Arc<Mutex<Option<Cached>>>) {
    let deadline = tokio::time::Instant::from_std(env.deadline);
    while env.running() {
        let Some(current) = read(&env).await else {
            backoff().await;
            continue;
        };
        let from_revision = current.mod_revision + 1;
        *cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(current);
        let query =
            WatchQuery { prefix: Some(FLAG.into()), from_revision: Some(from_revision), types: vec!["kv".into()] };
        let mut stream = match env.watch_client.watch(&env.ns, &query).await {
            Ok(stream) => stream,
            Err(_) => {
                *cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
                backoff().await;
                continue;
            }
        };
        loop {
            let message = tokio::select! {
                message = stream.next() => message,
                _ = tokio::time::sleep_until(deadline) => return,
            };
            match message {
                Some(Ok(WatchMessage::Change(change))) if change.key == FLAG => {
                    *cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(Cached {
                        value: change.value,
                        version: change.version,
                        mod_revision: change.revision,
                        fetched: Instant::now(),
                    });
                }
                Some(Ok(WatchMessage::Change(_))) => {}
                _ => {
                    *cache.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    break;
                }
            }
        }
    }
}

async fn service(env: Arc<Env>, idx: usize) {
    let mut me = env.actor(format!("service-{idx}"), idx as u64);
    let cache: Arc<Mutex<Option<Cached>>> = Arc::new(Mutex::new(None));
    let watcher = (env.mode == Mode::Guarded).then(|| tokio::spawn(watcher(env.clone(), cache.clone())));
    let cache_ttl = env.mean_delay(12.5) * 4;
    while env.running() {
        let delay = env.delay.sample(&mut me.rng);
        let corr = me.next_correlation_id(&env);
        let cached = cache.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let fresh = match (env.mode, cached) {
            (Mode::Naive, Some(c)) if c.fetched.elapsed() < cache_ttl => Some(c),
            (Mode::Guarded, Some(c)) => Some(c),
            _ => read(&env).await,
        };
        let Some(decision) = fresh else {
            backoff().await;
            continue;
        };
        if env.mode == Mode::Naive {
            *cache.lock().unwrap_or_else(|e| e.into_inner()) = Some(decision.clone());
        }
        let mut op = OpRecord::new(&me.name, "act", corr.clone());
        op.check_at_ms = Some(env.now_ms());
        op.checked =
            json!({ "flag": decision.value, "version": decision.version, "mod_revision": decision.mod_revision });
        sleep(delay).await;
        let variant = if decision.value["on"] == json!(true) { "new-checkout" } else { "legacy-checkout" };
        let key = format!("actions/{corr}");
        let value = json!({ "variant": variant, "flag_n": decision.value["n"] });
        op.use_at_ms = Some(env.now_ms());
        op.written = json!({ "key": key, "variant": variant });
        let opts = env.opts(&corr);
        let result = match env.mode {
            Mode::Naive => env.client.put(&env.ns, &key, &value, &opts).await.map(|d| d.value.revision),
            Mode::Guarded => {
                let act = ActRequest {
                    ticket: None,
                    conditions: vec![Condition::Version(VersionCondition { key: FLAG.into(), is: decision.version })],
                    ops: vec![Op::Put(PutOp { key, value })],
                    flow: Some("gameday-cache".into()),
                };
                env.client.act(&env.ns, &act, &opts).await.map(|d| d.value.revision)
            }
        };
        op.outcome = Outcome::of_write(result);
        env.record_or_back_off(op).await;
    }
    if let Some(watcher) = watcher {
        watcher.abort();
    }
}

pub async fn judge(env: &Env, ops: &[OpRecord]) -> Result<Judgement, GamedayError> {
    let flips = writes(ops, &["flip"]);
    let mut judgement = Judgement::default();
    let mut acts: Vec<&OpRecord> =
        ops.iter().filter(|op| op.kind == "act" && op.outcome.committed_revision().is_some()).collect();
    acts.sort_by_key(|op| op.outcome.committed_revision());
    for op in &acts {
        let acted_at = op.outcome.committed_revision().unwrap_or_default();
        let based_on = op.checked["mod_revision"].as_u64().unwrap_or_default();
        if let Some(flip) = superseded_between(&flips, based_on, acted_at, &op.correlation_id) {
            judgement.violations.push(Violation {
                correlation_id: op.correlation_id.clone(),
                what: format!(
                    "acted at revision {acted_at} on the flag of revision {based_on}, superseded at {} ({})",
                    flip.revision, flip.correlation_id
                ),
            });
        }
    }
    let flag = env.retrying("read the flag", || env.client.get(&env.ns, FLAG)).await?;
    judgement.final_state = json!({ "flag": flag.value, "flips": flips.len(), "acts": acts.len() });
    Ok(judgement)
}
