//! deploy: pipelines run a preflight check of the environment, wait (build, approval), then
//! deploy; meanwhile config changes land on the environment and other pipelines deploy.
//! Naive: `get env/prod` → wait → `put env/prod`. Guarded: a lease on the environment (one
//! pipeline at a time), the preflight read, and a deploy act conditioned on the lease's fencing
//! token and on the environment's version the preflight saw.
//! Invariant: no deploy commits onto a state other than the one its preflight checked (no
//! write to the environment between the preflight's revision and the deploy's).

use std::sync::Arc;

use gapguard_api::{
    AcquireRequest, ActRequest, Condition, LeaseCondition, LeaseReleaseRequest, Op, PutOp, VersionCondition,
};
use serde_json::json;

use super::{joined, spawn_all};
use crate::env::{backoff, sleep, Env};
use crate::history::{OpRecord, Outcome};
use crate::judge::{superseded_between, writes, Judgement, Violation};
use crate::{GamedayError, Mode};

const ENV_KEY: &str = "env/prod";
const LEASE: &str = "deploy-prod";

fn lease_ttl_ms(env: &Env) -> u64 {
    (env.delay.mean_ms() * 6.0).max(200.0) as u64
}

pub async fn run(env: Arc<Env>) -> Result<(), GamedayError> {
    let first = json!({ "release": "r-0", "config": 0 });
    env.seed("config", "drift", ENV_KEY, first, "create the environment").await?;
    let drifter = tokio::spawn(drifter(env.clone()));
    spawn_all(&env, env.actors, pipeline).await?;
    joined(drifter, "the drifter").await?;
    Ok(())
}

/// A config change every three mean delays: a plain read and write (in both modes: drift comes
/// from outside the pipelines).
async fn drifter(env: Arc<Env>) {
    let interval = env.mean_delay(12.5) * 3;
    let mut n = 1;
    while env.running() {
        sleep(interval).await;
        let corr = env.correlation_id("config", n);
        let mut op = OpRecord::new("config", "drift", corr.clone());
        op.outcome = match env.client.get(&env.ns, ENV_KEY).await {
            Ok(record) => {
                let mut value = record.value;
                value["config"] = json!(n);
                op.written = value.clone();
                match env.client.put(&env.ns, ENV_KEY, &value, &env.opts(&corr)).await {
                    Ok(done) => Outcome::Committed { revision: done.value.revision, resolved: false },
                    Err(e) => Outcome::from_error(&e),
                }
            }
            Err(e) => Outcome::from_error(&e),
        };
        env.record(op);
        n += 1;
    }
}

async fn pipeline(env: Arc<Env>, idx: usize) {
    let mut me = env.actor(format!("pipeline-{idx}"), idx as u64);
    while env.running() {
        let delay = env.delay.sample(&mut me.rng);
        let corr = me.next_correlation_id(&env);
        let opts = env.opts(&corr);
        let mut op = OpRecord::new(&me.name, "deploy", corr.clone());
        let token = match env.mode {
            Mode::Naive => None,
            Mode::Guarded => {
                let request = AcquireRequest { holder: me.name.clone(), ttl_ms: lease_ttl_ms(&env) };
                let acquire = env.opts(&format!("{corr}.acquire"));
                match env.client.acquire_lease(&env.ns, LEASE, &request, &acquire).await {
                    Ok(held) => Some(held.value.token),
                    Err(e) => {
                        let waiting = e.code() == Some("lease_held");
                        if !waiting {
                            op.outcome = Outcome::from_error(&e);
                            env.record(op);
                            backoff().await;
                        }
                        // A pipeline waiting for the environment is not a deploy attempt yet.
                        sleep(delay / 2).await;
                        continue;
                    }
                }
            }
        };
        // Preflight.
        let preflight = match env.client.get(&env.ns, ENV_KEY).await {
            Ok(record) => record,
            Err(e) => {
                op.outcome = Outcome::from_error(&e);
                env.record(op);
                backoff().await;
                continue;
            }
        };
        op.check_at_ms = Some(env.now_ms());
        op.checked =
            json!({ "state": preflight.value, "version": preflight.version, "mod_revision": preflight.mod_revision });
        // Build, approval.
        sleep(delay).await;
        let release = json!({ "release": corr, "config": preflight.value["config"] });
        op.use_at_ms = Some(env.now_ms());
        op.written = release.clone();
        let result = match token {
            None => env.client.put(&env.ns, ENV_KEY, &release, &opts).await.map(|d| d.value.revision),
            Some(token) => {
                let act = ActRequest {
                    ticket: None,
                    conditions: vec![
                        Condition::Lease(LeaseCondition { name: LEASE.into(), token }),
                        Condition::Version(VersionCondition { key: ENV_KEY.into(), is: preflight.version }),
                    ],
                    ops: vec![Op::Put(PutOp { key: ENV_KEY.into(), value: release })],
                    flow: Some("gameday-deploy".into()),
                };
                env.client.act(&env.ns, &act, &opts).await.map(|d| d.value.revision)
            }
        };
        op.outcome = Outcome::of_write(result);
        let failed = op.outcome.is_failed();
        env.record(op);
        if let Some(token) = token {
            let release = env.opts(&format!("{corr}.release"));
            let _ = env.client.release_lease(&env.ns, LEASE, &LeaseReleaseRequest { token }, &release).await;
        }
        if failed {
            backoff().await;
        }
    }
}

pub async fn judge(env: &Env, ops: &[OpRecord]) -> Result<Judgement, GamedayError> {
    let env_writes = writes(ops, &["deploy", "drift"]);
    let mut judgement = Judgement::default();
    let mut deploys: Vec<&OpRecord> =
        ops.iter().filter(|op| op.kind == "deploy" && op.outcome.committed_revision().is_some()).collect();
    deploys.sort_by_key(|op| op.outcome.committed_revision());
    for op in &deploys {
        let deployed_at = op.outcome.committed_revision().unwrap_or_default();
        let checked_at = op.checked["mod_revision"].as_u64().unwrap_or_default();
        if let Some(drift) = superseded_between(&env_writes, checked_at, deployed_at, &op.correlation_id) {
            judgement.violations.push(Violation {
                correlation_id: op.correlation_id.clone(),
                what: format!(
                    "deployed at revision {deployed_at} onto a state changed at {} ({}) after its preflight at {checked_at}",
                    drift.revision, drift.correlation_id
                ),
            });
        }
    }
    let state = env.retrying("read the environment", || env.client.get(&env.ns, ENV_KEY)).await?;
    let drifts = env_writes.len().saturating_sub(deploys.len());
    judgement.final_state = json!({ "env": state.value, "deploys": deploys.len(), "config_changes": drifts });
    Ok(judgement)
}
