//! lease: workers take a shared lease, work, and write the job's output; now and then one
//! pauses (a GC pause) past the lease's expiry, and another takes the lease meanwhile.
//! Naive: a lock record (`get lock` → `put lock {holder, expires_at_ms}` by the worker's own
//! clock) and a plain `put data/job`. Guarded: `acquire` (a fencing token), and a write whose
//! act requires `lease {name, token}`: a stale holder is refused.
//! Invariant: no write commits after another worker acquired the lease since the writer did.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gapguard_api::{AcquireRequest, ActRequest, Condition, LeaseCondition, LeaseReleaseRequest, Op, PutOp};
use rand::Rng as _;
use serde_json::json;

use super::{int, spawn_all};
use crate::env::{backoff, sleep, Env};
use crate::history::{OpRecord, Outcome};
use crate::judge::{superseded_between, writes, Judgement, Violation};
use crate::{GamedayError, Mode};

const LEASE: &str = "job-lock";
const LOCK_KEY: &str = "lock/job-lock";
const DATA_KEY: &str = "data/job";
/// Probability that a worker pauses past its lease.
const PAUSE_PROBABILITY: f64 = 0.3;

fn lease_ttl_ms(env: &Env) -> u64 {
    (env.delay.mean_ms() * 3.0).max(100.0) as u64
}

fn wall_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default()
}

pub async fn run(env: Arc<Env>) -> Result<(), GamedayError> {
    let workers = env.actors.clamp(2, 4);
    spawn_all(&env, workers, worker).await
}

struct Hold {
    revision: u64,
    token: u64,
    correlation_id: String,
}

async fn worker(env: Arc<Env>, idx: usize) {
    let mut me = env.actor(format!("worker-{idx}"), idx as u64);
    let ttl_ms = lease_ttl_ms(&env);
    while env.running() {
        let delay = env.delay.sample(&mut me.rng);
        let pause = me.rng.gen_bool(PAUSE_PROBABILITY);
        let pause_factor: f64 = me.rng.gen_range(1.5..2.5);
        let work = if pause { Duration::from_secs_f64(ttl_ms as f64 * pause_factor / 1000.0) } else { delay };
        let corr = me.next_correlation_id(&env);
        let actor = me.name.as_str();
        let hold = match acquire(&env, actor, &format!("{corr}.acquire"), ttl_ms).await {
            Ok(Some(hold)) => hold,
            Ok(None) => {
                sleep(Duration::from_millis(ttl_ms / 4)).await;
                continue;
            }
            Err(()) => {
                backoff().await;
                continue;
            }
        };
        let mut op = OpRecord::new(actor, "write", corr.clone());
        op.check_at_ms = Some(env.now_ms());
        op.checked = json!({ "acquired_at": hold.revision, "token": hold.token, "acquire": hold.correlation_id, "paused": pause });
        sleep(work).await;
        op.use_at_ms = Some(env.now_ms());
        let value = json!({ "writer": actor, "token": hold.token });
        op.written = json!({ "key": DATA_KEY, "value": value });
        let opts = env.opts(&corr);
        let result = match env.mode {
            Mode::Naive => env.client.put(&env.ns, DATA_KEY, &value, &opts).await.map(|done| done.value.revision),
            Mode::Guarded => {
                let act = ActRequest {
                    ticket: None,
                    conditions: vec![Condition::Lease(LeaseCondition { name: LEASE.into(), token: hold.token })],
                    ops: vec![Op::Put(PutOp { key: DATA_KEY.into(), value })],
                    flow: Some("gameday-lease".into()),
                };
                env.client.act(&env.ns, &act, &opts).await.map(|done| done.value.revision)
            }
        };
        op.outcome = Outcome::of_write(result);
        env.record(op);
        release(&env, actor, &hold, &format!("{corr}.release")).await;
    }
}

/// Takes the lease: `Ok(None)` if another holds it, `Err` if the server could not be reached.
async fn acquire(env: &Env, actor: &str, correlation_id: &str, ttl_ms: u64) -> Result<Option<Hold>, ()> {
    let opts = env.opts(correlation_id);
    let mut op = OpRecord::new(actor, "acquire", correlation_id.to_owned());
    let hold = match env.mode {
        Mode::Naive => {
            let current = match env.client.get(&env.ns, LOCK_KEY).await {
                Ok(record) => Some(record.value),
                Err(e) if e.code() == Some("not_found") => None,
                Err(_) => return Err(()),
            };
            let held_by_other = current.as_ref().is_some_and(|lock| {
                lock["holder"].as_str().is_some_and(|h| h != actor) && int(&lock["expires_at_ms"]) as u64 > wall_ms()
            });
            if held_by_other {
                return Ok(None);
            }
            let lock = json!({ "holder": actor, "expires_at_ms": wall_ms() + ttl_ms });
            op.written = lock.clone();
            match env.client.put(&env.ns, LOCK_KEY, &lock, &opts).await {
                Ok(done) => Hold { revision: done.value.revision, token: 0, correlation_id: correlation_id.to_owned() },
                Err(e) => {
                    op.outcome = Outcome::from_error(&e);
                    env.record(op);
                    return Err(());
                }
            }
        }
        Mode::Guarded => {
            let request = AcquireRequest { holder: actor.to_owned(), ttl_ms };
            match env.client.acquire_lease(&env.ns, LEASE, &request, &opts).await {
                Ok(done) => Hold {
                    revision: done.value.revision,
                    token: done.value.token,
                    correlation_id: correlation_id.to_owned(),
                },
                Err(e) if e.code() == Some("lease_held") => return Ok(None),
                Err(e) => {
                    op.outcome = Outcome::from_error(&e);
                    env.record(op);
                    return Err(());
                }
            }
        }
    };
    op.written = json!({ "token": hold.token });
    op.outcome = Outcome::Committed { revision: hold.revision, resolved: false };
    env.record(op);
    Ok(Some(hold))
}

async fn release(env: &Env, actor: &str, hold: &Hold, correlation_id: &str) {
    let opts = env.opts(correlation_id);
    match env.mode {
        Mode::Naive => {
            if let Ok(lock) = env.client.get(&env.ns, LOCK_KEY).await {
                if lock.value["holder"].as_str() == Some(actor) {
                    let _ =
                        env.client.put(&env.ns, LOCK_KEY, &json!({ "holder": null, "expires_at_ms": 0 }), &opts).await;
                }
            }
        }
        Mode::Guarded => {
            let request = LeaseReleaseRequest { token: hold.token };
            let _ = env.client.release_lease(&env.ns, LEASE, &request, &opts).await;
        }
    }
}

pub async fn judge(env: &Env, ops: &[OpRecord]) -> Result<Judgement, GamedayError> {
    let acquisitions = writes(ops, &["acquire"]);
    let mut judgement = Judgement::default();
    let mut committed: Vec<&OpRecord> =
        ops.iter().filter(|op| op.kind == "write" && op.outcome.committed_revision().is_some()).collect();
    committed.sort_by_key(|op| op.outcome.committed_revision());
    for op in &committed {
        let written_at = op.outcome.committed_revision().unwrap_or_default();
        let acquired_at = op.checked["acquired_at"].as_u64().unwrap_or_default();
        let own = op.checked["acquire"].as_str().unwrap_or_default();
        if let Some(takeover) = superseded_between(&acquisitions, acquired_at, written_at, own) {
            judgement.violations.push(Violation {
                correlation_id: op.correlation_id.clone(),
                what: format!(
                    "stale holder wrote at revision {written_at}: its lease (revision {acquired_at}) was taken over at {} by {}",
                    takeover.revision, takeover.correlation_id
                ),
            });
        }
    }
    let paused = committed.iter().filter(|op| op.checked["paused"] == json!(true)).count();
    let data = env.retrying("read the job's output", || env.client.get(&env.ns, DATA_KEY)).await.ok();
    judgement.final_state = json!({
        "writes": committed.len(),
        "acquisitions": acquisitions.len(),
        "data": data.map(|d| d.value),
    });
    judgement.notes.push(format!("{paused} committed writes came after a pause past the lease's TTL"));
    Ok(judgement)
}
