//! revocation: workers run export jobs that were authorized when they were enqueued; an admin
//! revokes a subject's permission for a while, then grants it again.
//! Naive: `get acl/SUBJECT` at enqueue → the queue's wait → `put exports/ID`. Guarded: a check
//! of `permitted(subject, export, report:q3)` at enqueue, whose ticket the export's act
//! presents: the permission is evaluated again at use.
//! Invariant: no export commits while its subject's permission is revoked (judged by revision:
//! the last grant or revoke of the subject before the export's revision must be a grant).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gapguard_api::{ActRequest, CheckRequest, Condition, GrantTuple, Op, PutOp};
use gapguard_client::ClientError;
use rand::Rng as _;
use serde_json::json;

use super::{joined, spawn_all};
use crate::env::{backoff, sleep, Env};
use crate::history::{OpRecord, Outcome};
use crate::judge::{Judgement, Violation};
use crate::{GamedayError, Mode};

const SUBJECTS: usize = 4;
const ACTION: &str = "export";
const RESOURCE: &str = "report:q3";
const ADMIN_STREAM: u64 = 1_000;

fn subject(idx: usize) -> String {
    format!("user:s{idx}")
}

fn tuple(subject: &str) -> GrantTuple {
    GrantTuple { subject: subject.to_owned(), action: ACTION.into(), resource: RESOURCE.into() }
}

fn acl_key(subject: &str) -> String {
    format!("acl/{subject}")
}

pub async fn run(env: Arc<Env>) -> Result<(), GamedayError> {
    for subject_idx in 0..SUBJECTS {
        let corr = env.correlation_id("setup", subject_idx as u64);
        if !set_recorded(&env, "setup", &subject(subject_idx), true, &corr).await {
            return Err(GamedayError::InvalidConfig(format!("{}: could not grant the initial permissions", env.ns)));
        }
    }
    let admin = tokio::spawn(admin(env.clone()));
    spawn_all(&env, env.actors, worker).await?;
    joined(admin, "the admin").await?;
    Ok(())
}

/// Grants (`permitted: true`) or revokes a subject's permission, once; returns the revision.
async fn set(env: &Env, subject: &str, permitted: bool, correlation_id: &str) -> Result<u64, ClientError> {
    let opts = env.opts(correlation_id);
    let done = match env.mode {
        Mode::Naive => env.client.put(&env.ns, &acl_key(subject), &json!(permitted), &opts).await?.value.revision,
        Mode::Guarded if permitted => env.client.grant(&env.ns, &tuple(subject), &opts).await?.value.revision,
        Mode::Guarded => env.client.revoke(&env.ns, &tuple(subject), &opts).await?.value.revision,
    };
    Ok(done)
}

/// Grants or revokes until the server answers (for up to 30 s), recording every attempt under
/// its own correlation id: an attempt whose answer was lost may still have been applied, and
/// the audit log then gives its revision (a retry must not stand in for it, or the timeline
/// of the subject's permission would be wrong). Returns whether it was applied.
async fn set_recorded(env: &Env, actor: &str, subject: &str, permitted: bool, correlation_id: &str) -> bool {
    let kind = if permitted { "grant" } else { "revoke" };
    let give_up = std::time::Instant::now() + Duration::from_secs(30);
    for attempt_idx in 0.. {
        let corr =
            if attempt_idx == 0 { correlation_id.to_owned() } else { format!("{correlation_id}.r{attempt_idx}") };
        let mut op = OpRecord::new(actor, kind, corr.clone());
        op.written = json!({ "subject": subject });
        op.outcome = Outcome::of_write(set(env, subject, permitted, &corr).await);
        let outcome = op.outcome.clone();
        env.record(op);
        match outcome {
            Outcome::Failed { .. } if std::time::Instant::now() < give_up => backoff().await,
            Outcome::Committed { .. } => return true,
            _ => return false,
        }
    }
    false
}

/// Revokes a random subject for two mean delays, grants it again, waits one mean delay.
async fn admin(env: Arc<Env>) {
    let mut me = env.actor("admin", ADMIN_STREAM);
    let gap = env.mean_delay(10.0);
    while env.running() {
        sleep(gap).await;
        let subject = subject(me.rng.gen_range(0..SUBJECTS));
        for (permitted, hold) in [(false, gap * 2), (true, Duration::ZERO)] {
            let corr = me.next_correlation_id(&env);
            set_recorded(&env, &me.name, &subject, permitted, &corr).await;
            sleep(hold).await;
        }
    }
}

async fn worker(env: Arc<Env>, idx: usize) {
    let mut me = env.actor(format!("worker-{idx}"), idx as u64);
    while env.running() {
        let delay = env.delay.sample(&mut me.rng);
        let subject = subject(me.rng.gen_range(0..SUBJECTS));
        let corr = me.next_correlation_id(&env);
        let mut op = OpRecord::new(&me.name, "export", corr.clone());
        let opts = env.opts(&corr);
        let export = format!("exports/{corr}");
        // Enqueue: the authorization check.
        let ticket = match env.mode {
            Mode::Naive => match env.client.get(&env.ns, &acl_key(&subject)).await {
                Ok(record) if record.value == json!(true) => Ok(None),
                Ok(_) => Err(Outcome::Refused { reason: "not_permitted".into() }),
                Err(e) => Err(Outcome::from_error(&e)),
            },
            Mode::Guarded => {
                let check = CheckRequest {
                    conditions: vec![Condition::Permitted(tuple(&subject))],
                    ttl_ms: None,
                    flow: Some("gameday-revocation".into()),
                };
                match env.client.check(&env.ns, &check, &opts).await {
                    Ok(answer) => Ok(Some(answer.value.ticket)),
                    Err(e) => Err(Outcome::from_error(&e)),
                }
            }
        };
        op.check_at_ms = Some(env.now_ms());
        op.checked = json!({ "subject": subject, "action": ACTION, "resource": RESOURCE });
        let ticket = match ticket {
            Ok(ticket) => ticket,
            Err(outcome) => {
                let failed = matches!(outcome, Outcome::Failed { .. });
                op.outcome = outcome;
                env.record(op);
                if failed {
                    backoff().await;
                }
                sleep(delay).await;
                continue;
            }
        };
        // The queue.
        sleep(delay).await;
        op.use_at_ms = Some(env.now_ms());
        op.written = json!({ "key": export });
        let value = json!({ "subject": subject, "resource": RESOURCE });
        let result = match ticket {
            None => env.client.put(&env.ns, &export, &value, &opts).await.map(|done| done.value.revision),
            Some(ticket) => {
                let act = ActRequest {
                    ticket: Some(ticket),
                    conditions: vec![],
                    ops: vec![Op::Put(PutOp { key: export.clone(), value })],
                    flow: Some("gameday-revocation".into()),
                };
                env.client.act(&env.ns, &act, &opts).await.map(|done| done.value.revision)
            }
        };
        op.outcome = Outcome::of_write(result);
        env.record_or_back_off(op).await;
    }
}

pub async fn judge(env: &Env, ops: &[OpRecord]) -> Result<Judgement, GamedayError> {
    // Each subject's grants and revocations, by revision.
    let mut timeline: HashMap<String, Vec<(u64, bool, &str)>> = HashMap::new();
    for op in ops.iter().filter(|op| op.kind == "grant" || op.kind == "revoke") {
        if let (Some(revision), Some(subject)) = (op.outcome.committed_revision(), op.written["subject"].as_str()) {
            timeline.entry(subject.to_owned()).or_default().push((revision, op.kind == "grant", &op.correlation_id));
        }
    }
    for events in timeline.values_mut() {
        events.sort_by_key(|(revision, ..)| *revision);
    }
    let mut judgement = Judgement::default();
    let mut exports: Vec<&OpRecord> =
        ops.iter().filter(|op| op.kind == "export" && op.outcome.committed_revision().is_some()).collect();
    exports.sort_by_key(|op| op.outcome.committed_revision());
    for op in &exports {
        let revision = op.outcome.committed_revision().unwrap_or_default();
        let subject = op.checked["subject"].as_str().unwrap_or_default();
        let events = timeline.get(subject).map(Vec::as_slice).unwrap_or_default();
        let before = events.partition_point(|(r, ..)| *r < revision);
        if let Some((revoked_at, false, by)) = before.checked_sub(1).map(|i| events[i]) {
            judgement.violations.push(Violation {
                correlation_id: op.correlation_id.clone(),
                what: format!("{subject} exported at revision {revision}, after its revocation at {revoked_at} ({by})"),
            });
        }
    }
    let exported = env.retrying("list the exports", || env.client.list(&env.ns, "exports/", Some(10_000))).await?;
    let revocations = ops.iter().filter(|op| op.kind == "revoke" && op.outcome.committed_revision().is_some()).count();
    judgement.final_state = json!({ "exports": exported.items.len(), "revocations": revocations });
    if exported.items.len() != exports.len() {
        judgement.notes.push(format!(
            "{} exports in the final state, {} committed in the history",
            exported.items.len(),
            exports.len()
        ));
    }
    Ok(judgement)
}
