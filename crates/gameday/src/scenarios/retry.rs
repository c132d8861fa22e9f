//! retry: each client sends deposits and profile updates; some answers are lost (the client
//! hears nothing back), so it retries later, after it has already sent newer requests.
//! Naive: a deposit is `get balance` → `put balance + n`, an update a plain `put profile`, and
//! a retry does it again. Guarded: every request carries an `Idempotency-Key` (a retry replays
//! the first answer), a deposit is an `add` op, and an update is conditioned on the profile's
//! version the client read before sending it (an old retry no longer matches).
//! Invariants: each deposit takes effect once; no profile update is overwritten by an older one.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use gapguard_api::{ActRequest, AddOp, Condition, Op, PutOp, VersionCondition};
use gapguard_client::RequestOptions;
use rand::Rng as _;
use serde_json::json;

use super::{int, spawn_all};
use crate::env::{backoff, sleep, Env};
use crate::history::{OpRecord, Outcome};
use crate::judge::{Judgement, Violation};
use crate::{GamedayError, Mode};

/// Probability that the answer to a request is lost (the client retries it later).
const LOST_PROBABILITY: f64 = 0.35;

fn balance_key(client: &str) -> String {
    format!("acct/{client}/balance")
}

fn profile_key(client: &str) -> String {
    format!("acct/{client}/profile")
}

pub async fn run(env: Arc<Env>) -> Result<(), GamedayError> {
    spawn_all(&env, env.actors, client).await
}

/// One logical request, as sent (and re-sent) by a client.
#[derive(Clone)]
enum Request {
    /// Add `amount` to the balance.
    Deposit { amount: i64 },
    /// Set the profile to `seq`; guarded, only if it is still at `version`.
    Set { seq: u64, version: u64 },
}

async fn client(env: Arc<Env>, idx: usize) {
    let client = format!("client-{idx}");
    let mut rng = env.rng(idx as u64);
    let mut retries = tokio::task::JoinSet::new();
    let mut seq = 0;
    while env.running() {
        let delay = env.delay.sample(&mut rng);
        let deposit = rng.gen_bool(0.5);
        let amount: i64 = rng.gen_range(1..=9);
        let lost = rng.gen_bool(LOST_PROBABILITY);
        let think = delay / 4;
        let logical = env.correlation_id(&client, seq);
        seq += 1;
        let kind = if deposit { "deposit" } else { "set" };
        let mut op = OpRecord::new(&client, kind, logical.clone());
        // What the request is based on: nothing for a deposit; the profile's version for an update.
        let request = if deposit {
            Request::Deposit { amount }
        } else {
            let version = match env.client.get(&env.ns, &profile_key(&client)).await {
                Ok(record) => record.version,
                Err(e) if e.code() == Some("not_found") => 0,
                Err(e) => {
                    op.outcome = Outcome::from_error(&e);
                    env.record(op);
                    backoff().await;
                    continue;
                }
            };
            Request::Set { seq, version }
        };
        let check_at_ms = env.now_ms();
        op.check_at_ms = Some(check_at_ms);
        op.checked = json!({ "logical": logical });
        attempt(&env, &mut op, &client, &request, &logical).await;
        let no_answer = matches!(op.outcome, Outcome::Failed { .. });
        env.record(op);
        if lost || no_answer {
            let env = env.clone();
            let client = client.clone();
            retries.spawn(async move {
                sleep(delay).await;
                let mut retry = OpRecord::new(&client, "retry", format!("{logical}.retry"));
                retry.check_at_ms = Some(check_at_ms);
                retry.checked = json!({ "logical": logical, "of": kind });
                attempt(&env, &mut retry, &client, &request, &logical).await;
                env.record(retry);
            });
        }
        if no_answer {
            backoff().await;
        }
        sleep(think).await;
    }
    while retries.join_next().await.is_some() {}
}

/// Sends `request` once, recording what it wrote and what came of it in `op`.
async fn attempt(env: &Env, op: &mut OpRecord, client: &str, request: &Request, logical: &str) {
    op.use_at_ms = Some(env.now_ms());
    let mut opts = env.opts(&op.correlation_id);
    let result = match (env.mode, request) {
        (Mode::Naive, Request::Deposit { amount }) => {
            // The naive deposit's check is its read of the balance, its use the put of the sum:
            // the gap runs from the one to the other (both stamped before the read, it was 0).
            if op.kind != "retry" {
                op.check_at_ms = Some(env.now_ms());
            }
            let balance = match env.client.get(&env.ns, &balance_key(client)).await {
                Ok(record) => int(&record.value),
                Err(e) if e.code() == Some("not_found") => 0,
                Err(e) => {
                    op.outcome = Outcome::from_error(&e);
                    return;
                }
            };
            op.use_at_ms = Some(env.now_ms());
            op.written = json!({ "deposit": amount, "balance": balance + amount });
            env.client
                .put(&env.ns, &balance_key(client), &json!(balance + amount), &opts)
                .await
                .map(|d| (d.value.revision, d.replayed))
        }
        (Mode::Naive, Request::Set { seq, .. }) => {
            op.written = json!({ "seq": seq });
            env.client
                .put(&env.ns, &profile_key(client), &json!({ "seq": seq }), &opts)
                .await
                .map(|d| (d.value.revision, d.replayed))
        }
        (Mode::Guarded, request) => {
            // Scoped by the namespace so a rerun against the same server never meets an old key.
            opts = RequestOptions { idempotency_key: Some(format!("{}/{logical}", env.ns)), ..opts };
            let (conditions, op_json, write) = match request {
                Request::Deposit { amount } => (
                    vec![],
                    json!({ "deposit": amount }),
                    Op::Add(AddOp { key: balance_key(client), by: (*amount).into() }),
                ),
                Request::Set { seq, version } => (
                    vec![Condition::Version(VersionCondition { key: profile_key(client), is: *version })],
                    json!({ "seq": seq, "if_version": version }),
                    Op::Put(PutOp { key: profile_key(client), value: json!({ "seq": seq }) }),
                ),
            };
            op.written = op_json;
            let act = ActRequest { ticket: None, conditions, ops: vec![write], flow: Some("gameday-retry".into()) };
            env.client.act(&env.ns, &act, &opts).await.map(|d| (d.value.revision, d.replayed))
        }
    };
    op.outcome = match result {
        Ok((revision, true)) => Outcome::Replayed { revision },
        Ok((revision, false)) => Outcome::Committed { revision, resolved: false },
        Err(e) => Outcome::from_error(&e),
    };
}

pub async fn judge(env: &Env, ops: &[OpRecord]) -> Result<Judgement, GamedayError> {
    let mut judgement = Judgement::default();
    // Effects per logical request: committed attempts that were not replays.
    let mut effects: BTreeMap<&str, Vec<&OpRecord>> = BTreeMap::new();
    let mut kinds: HashMap<&str, &str> = HashMap::new();
    for op in ops {
        let Some(logical) = op.checked["logical"].as_str() else { continue };
        if op.kind != "retry" {
            kinds.insert(logical, op.kind);
        }
        if op.outcome.committed_revision().is_some() {
            effects.entry(logical).or_default().push(op);
        }
    }
    let mut expected: BTreeMap<&str, i64> = BTreeMap::new();
    for (logical, attempts) in &effects {
        if kinds.get(logical) == Some(&"deposit") {
            *expected.entry(attempts[0].actor.as_str()).or_default() += int(&attempts[0].written["deposit"]);
            for extra in &attempts[1..] {
                judgement.violations.push(Violation {
                    correlation_id: extra.correlation_id.clone(),
                    what: format!("deposit {logical} took effect {} times", attempts.len()),
                });
            }
        }
    }
    // Profile updates per client in commit order: none may carry an older seq than one before it.
    let mut sets: BTreeMap<&str, Vec<(u64, u64, &str)>> = BTreeMap::new();
    for op in ops {
        let is_set = op.kind == "set" || op.checked["of"] == json!("set");
        if let (true, Some(revision)) = (is_set, op.outcome.committed_revision()) {
            let seq = op.written["seq"].as_u64().unwrap_or_default();
            sets.entry(op.actor.as_str()).or_default().push((revision, seq, &op.correlation_id));
        }
    }
    for writes in sets.values_mut() {
        writes.sort();
        let mut newest = 0;
        for &(revision, seq, correlation_id) in writes.iter() {
            if seq < newest {
                judgement.violations.push(Violation {
                    correlation_id: correlation_id.to_owned(),
                    what: format!("update {seq} overwrote the newer update {newest} at revision {revision}"),
                });
            }
            newest = newest.max(seq);
        }
    }
    judgement.violations.sort_by(|a, b| a.correlation_id.cmp(&b.correlation_id));
    let accounts = env.retrying("list the accounts", || env.client.list(&env.ns, "acct/", Some(10_000))).await?;
    let mut mismatched = Vec::new();
    for item in accounts.items.iter().filter(|i| i.key.ends_with("/balance")) {
        let client = item.key.trim_start_matches("acct/").trim_end_matches("/balance");
        let want = expected.get(client).copied().unwrap_or_default();
        if int(&item.value) != want {
            mismatched.push(format!("{client}: balance {} but deposits {want}", int(&item.value)));
        }
    }
    if !mismatched.is_empty() {
        let what = format!("{} balances disagree with the deposits made: {}", mismatched.len(), mismatched.join("; "));
        match env.mode {
            Mode::Naive => judgement.notes.push(what),
            Mode::Guarded => judgement.violations.push(Violation { correlation_id: String::new(), what }),
        }
    }
    let retried = ops.iter().filter(|op| op.kind == "retry").count();
    let replayed = ops.iter().filter(|op| matches!(op.outcome, Outcome::Replayed { .. })).count();
    judgement.final_state = json!({ "accounts": accounts.items.len() / 2, "retries": retried, "replayed": replayed });
    Ok(judgement)
}
