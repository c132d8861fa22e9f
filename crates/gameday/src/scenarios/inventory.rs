//! inventory: buyers check the stock, then buy; a restocker adds stock now and then.
//! Naive: `get stock` → wait → `put stock = seen - 1` and `put orders/ID`. Guarded: a ticket
//! for `stock >= 1`, presented by the act that decrements the stock and writes the order.
//! Invariant: units sold (orders in the final state) ≤ units supplied (initial + restocked).

use std::sync::Arc;
use std::time::Duration;

use gapguard_api::{ActRequest, AddOp, CheckRequest, CompareCondition, CompareOp, Condition, Op, PutOp};
use rand::Rng as _;
use serde_json::{json, Value};

use super::{int, joined, spawn_all};
use crate::env::{sleep, Env};
use crate::history::{OpRecord, Outcome};
use crate::judge::{Judgement, Violation};
use crate::{GamedayError, Mode};

const STOCK: &str = "stock/sku-1";
const ORDERS: &str = "orders/";
/// The restocker's stream (actors use 0..actors).
const RESTOCKER_STREAM: u64 = 1_000;

fn initial_stock(env: &Env) -> i64 {
    (env.actors as i64 * 2).max(8)
}

pub async fn run(env: Arc<Env>) -> Result<(), GamedayError> {
    let initial = initial_stock(&env);
    let corr = env.correlation_id("setup", 0);
    let (opts, value) = (env.opts(&corr), json!(initial));
    env.retrying("set the initial stock", || env.client.put(&env.ns, STOCK, &value, &opts)).await?;
    let restocker = tokio::spawn(restocker(env.clone()));
    spawn_all(&env, env.actors, buyer).await?;
    joined(restocker, "the restocker").await?;
    Ok(())
}

async fn buyer(env: Arc<Env>, idx: usize) {
    let mut me = env.actor(format!("buyer-{idx}"), idx as u64);
    while env.running() {
        let delay = env.delay.sample(&mut me.rng);
        let corr = me.next_correlation_id(&env);
        let mut op = OpRecord::new(&me.name, "buy", corr.clone());
        let pause = match env.mode {
            Mode::Naive => naive_buy(&env, &mut op, delay).await,
            Mode::Guarded => guarded_buy(&env, &mut op, delay).await,
        };
        env.record_or_back_off(op).await;
        sleep(pause).await;
    }
}

/// Returns how long to wait before the next purchase (a buyer turned away comes back later).
async fn naive_buy(env: &Env, op: &mut OpRecord, delay: Duration) -> Duration {
    let seen = match env.client.get(&env.ns, STOCK).await {
        Ok(record) => int(&record.value),
        Err(e) if e.code() == Some("not_found") => 0,
        Err(e) => {
            op.outcome = Outcome::from_error(&e);
            return Duration::ZERO;
        }
    };
    op.check_at_ms = Some(env.now_ms());
    op.checked = json!({ "stock": seen });
    if seen < 1 {
        op.outcome = Outcome::Refused { reason: "out_of_stock".into() };
        return delay;
    }
    sleep(delay).await;
    op.use_at_ms = Some(env.now_ms());
    op.written = json!({ "stock": seen - 1, "order": format!("{ORDERS}{}", op.correlation_id) });
    let opts = env.opts(&op.correlation_id);
    let stock_opts = env.opts(&format!("{}.stock", op.correlation_id));
    if let Err(e) = env.client.put(&env.ns, STOCK, &json!(seen - 1), &stock_opts).await {
        op.outcome = Outcome::from_error(&e);
        return Duration::ZERO;
    }
    let order = format!("{ORDERS}{}", op.correlation_id);
    op.outcome = match env.client.put(&env.ns, &order, &json!({ "buyer": op.actor, "seen": seen }), &opts).await {
        Ok(done) => Outcome::Committed { revision: done.value.revision, resolved: false },
        Err(e) => Outcome::from_error(&e),
    };
    Duration::ZERO
}

async fn guarded_buy(env: &Env, op: &mut OpRecord, delay: Duration) -> Duration {
    let in_stock = Condition::Compare(CompareCondition { key: STOCK.into(), op: CompareOp::Ge, value: 1.into() });
    let check = CheckRequest { conditions: vec![in_stock], ttl_ms: None, flow: Some("gameday-inventory".into()) };
    let opts = env.opts(&op.correlation_id);
    let ticket = match env.client.check(&env.ns, &check, &opts).await {
        Ok(answer) => answer.value,
        Err(e) => {
            op.check_at_ms = Some(env.now_ms());
            op.outcome = Outcome::from_error(&e);
            return if e.code().is_some() { delay } else { Duration::ZERO };
        }
    };
    op.check_at_ms = Some(env.now_ms());
    op.checked = json!({ "condition": "stock >= 1", "at_revision": ticket.revision });
    sleep(delay).await;
    let order = format!("{ORDERS}{}", op.correlation_id);
    let act = ActRequest {
        ticket: Some(ticket.ticket),
        conditions: vec![],
        ops: vec![
            Op::Add(AddOp { key: STOCK.into(), by: (-1).into() }),
            Op::Put(PutOp { key: order.clone(), value: json!({ "buyer": op.actor }) }),
        ],
        flow: Some("gameday-inventory".into()),
    };
    op.use_at_ms = Some(env.now_ms());
    op.written = json!({ "stock": "-1", "order": order });
    op.outcome = match env.client.act(&env.ns, &act, &opts).await {
        Ok(done) => Outcome::Committed { revision: done.value.revision, resolved: false },
        Err(e) => Outcome::from_error(&e),
    };
    Duration::ZERO
}

/// Adds 2 to 5 units every 8 mean delays (at least 100 ms): naive with a read and a write,
/// guarded with an `add` op.
async fn restocker(env: Arc<Env>) {
    let mut me = env.actor("restocker", RESTOCKER_STREAM);
    let interval = env.mean_delay(12.5) * 8;
    loop {
        sleep(interval).await;
        if !env.running() {
            return;
        }
        let amount: i64 = me.rng.gen_range(2..=5);
        let corr = me.next_correlation_id(&env);
        let mut op = OpRecord::new(&me.name, "restock", corr.clone());
        op.written = json!({ "add": amount });
        let opts = env.opts(&corr);
        op.outcome = match env.mode {
            Mode::Naive => match env.client.get(&env.ns, STOCK).await {
                Ok(record) => match env.client.put(&env.ns, STOCK, &json!(int(&record.value) + amount), &opts).await {
                    Ok(done) => Outcome::Committed { revision: done.value.revision, resolved: false },
                    Err(e) => Outcome::from_error(&e),
                },
                Err(e) => Outcome::from_error(&e),
            },
            Mode::Guarded => {
                let add = Op::Add(AddOp { key: STOCK.into(), by: amount.into() });
                let act = ActRequest { ticket: None, conditions: vec![], ops: vec![add], flow: None };
                match env.client.act(&env.ns, &act, &opts).await {
                    Ok(done) => Outcome::Committed { revision: done.value.revision, resolved: false },
                    Err(e) => Outcome::from_error(&e),
                }
            }
        };
        env.record(op);
    }
}

pub async fn judge(env: &Env, ops: &[OpRecord]) -> Result<Judgement, GamedayError> {
    let restocked: i64 = ops
        .iter()
        .filter(|op| op.kind == "restock" && op.outcome.committed_revision().is_some())
        .map(|op| int(&op.written["add"]))
        .sum();
    let supplied = initial_stock(env) + restocked;
    let orders = env.retrying("list the orders", || env.client.list(&env.ns, ORDERS, Some(10_000))).await?;
    let sold = orders.items.len() as i64;
    let stock = match env.client.get(&env.ns, STOCK).await {
        Ok(record) => record.value,
        Err(e) => return Err(env.fail("read the final stock", e)),
    };
    let mut buys: Vec<&OpRecord> =
        ops.iter().filter(|op| op.kind == "buy" && op.outcome.committed_revision().is_some()).collect();
    buys.sort_by_key(|op| op.outcome.committed_revision());
    let mut judgement = Judgement {
        final_state: json!({ "supplied": supplied, "sold": sold, "stock": stock, "committed_buys": buys.len() }),
        ..Judgement::default()
    };
    if sold > supplied {
        // One violation per unit past the supply; the buys committed last are the oversold
        // ones (orders the history cannot name still count, without an id).
        let oversold = (sold - supplied) as usize;
        let named: Vec<&&OpRecord> = buys.iter().skip(supplied.max(0) as usize).take(oversold).collect();
        for (unit_idx, op) in named.iter().enumerate() {
            judgement.violations.push(Violation {
                correlation_id: op.correlation_id.clone(),
                what: format!(
                    "unit {} sold of {supplied} supplied (checked {})",
                    supplied as usize + unit_idx + 1,
                    op.checked
                ),
            });
        }
        for unit_idx in named.len()..oversold {
            judgement.violations.push(Violation {
                correlation_id: String::new(),
                what: format!("unit {} sold of {supplied} supplied", supplied as usize + unit_idx + 1),
            });
        }
    }
    if sold != buys.len() as i64 {
        judgement.notes.push(format!("{sold} orders in the final state, {} buys committed in the history", buys.len()));
    }
    let counter = int(&stock);
    if counter != supplied - sold {
        let what = format!("the stock counter reads {counter}, but supplied - sold = {}", supplied - sold);
        match env.mode {
            // Lost updates of the counter are the naive flow's bug, already counted as oversold units.
            Mode::Naive => judgement.notes.push(what),
            Mode::Guarded => judgement.violations.push(Violation { correlation_id: String::new(), what }),
        }
    }
    if matches!(stock, Value::Number(_)) && counter < 0 {
        judgement.notes.push(format!("the stock went negative: {counter}"));
    }
    Ok(judgement)
}
