//! quota: tenants check their quota, then provision a VM in steps (record it as building,
//! count it, mark it ready); some provisioners crash after the first step.
//! Naive: `get used` → wait → `put vm building` → `put used = seen + n` → `put vm ready`; a
//! crash leaves the VM half-built and nobody knows. Guarded: a reservation of the tenant's
//! pool with a TTL (`context` names the VM) → wait → create the VM record if absent → one act
//! that marks it ready and commits the reservation; a crash lets the reservation expire into an
//! orphan, and a reconciler marks the VM reclaimed and resolves the orphan; a commit refused
//! because the reservation expired is compensated by the provisioner itself.
//! Invariants: per tenant, the VMs not reclaimed never need more than the quota; no VM is left
//! half-built at the end.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gapguard_api::{ActRequest, Condition, Op, PoolRequest, PutOp, ReservationRef, ReserveRequest, ResolveRequest};
use rand::Rng as _;
use serde_json::json;

use super::{int, joined, spawn_all};
use crate::env::{backoff, sleep, Env};
use crate::history::{OpRecord, Outcome};
use crate::judge::{Judgement, Violation};
use crate::{GamedayError, Mode};

const TENANTS: usize = 2;
/// Probability that a provisioner crashes after its first step.
const CRASH_PROBABILITY: f64 = 0.15;
const VMS: &str = "vm/";
/// How long the guarded run waits, after its actors stopped, for reservations to expire and
/// their orphans to be reconciled.
const SETTLE_MS_MAX: u64 = 10_000;

fn capacity(env: &Env) -> u64 {
    (env.actors as u64 * 2).max(6)
}

fn tenant(idx: usize) -> String {
    format!("tenant-{idx}")
}

fn pool(tenant: &str) -> String {
    format!("quota-{tenant}")
}

fn used_key(tenant: &str) -> String {
    format!("quota/{tenant}/used")
}

fn reservation_ttl_ms(env: &Env) -> u64 {
    (env.delay.mean_ms() * 4.0).max(200.0) as u64
}

pub async fn run(env: Arc<Env>) -> Result<(), GamedayError> {
    for tenant_idx in 0..TENANTS {
        let tenant = tenant(tenant_idx);
        let corr = env.correlation_id("setup", tenant_idx as u64);
        let opts = env.opts(&corr);
        match env.mode {
            Mode::Naive => {
                let (key, zero) = (used_key(&tenant), json!(0));
                env.retrying("set the used counter", || env.client.put(&env.ns, &key, &zero, &opts)).await?;
            }
            Mode::Guarded => {
                let request = PoolRequest { capacity: capacity(&env) };
                let pool = pool(&tenant);
                env.retrying("create the quota pool", || env.client.set_pool(&env.ns, &pool, &request, &opts)).await?;
            }
        }
    }
    let reconciler = (env.mode == Mode::Guarded).then(|| tokio::spawn(reconciler(env.clone())));
    spawn_all(&env, env.actors, provisioner).await?;
    if let Some(reconciler) = reconciler {
        joined(reconciler, "the reconciler").await?;
    }
    Ok(())
}

async fn provisioner(env: Arc<Env>, idx: usize) {
    let mut me = env.actor(format!("provisioner-{idx}"), idx as u64);
    while env.running() {
        let delay = env.delay.sample(&mut me.rng);
        let tenant = tenant(me.rng.gen_range(0..TENANTS));
        let amount: u64 = me.rng.gen_range(1..=3);
        let crash = me.rng.gen_bool(CRASH_PROBABILITY);
        let corr = me.next_correlation_id(&env);
        let mut op = OpRecord::new(&me.name, "provision", corr);
        let turned_away = match env.mode {
            Mode::Naive => naive(&env, &mut op, &tenant, amount, crash, delay).await,
            Mode::Guarded => guarded(&env, &mut op, &tenant, amount, crash, delay).await,
        };
        let failed = op.outcome.is_failed();
        env.record(op);
        if failed {
            backoff().await;
        } else if turned_away {
            sleep(delay).await;
        }
    }
}

fn vm_key(tenant: &str, correlation_id: &str) -> String {
    format!("{VMS}{tenant}/{correlation_id}")
}

/// Returns whether the tenant was turned away (over quota).
async fn naive(env: &Env, op: &mut OpRecord, tenant: &str, amount: u64, crash: bool, delay: Duration) -> bool {
    let used = match env.client.get(&env.ns, &used_key(tenant)).await {
        Ok(record) => int(&record.value) as u64,
        Err(e) => {
            op.outcome = Outcome::from_error(&e);
            return false;
        }
    };
    op.check_at_ms = Some(env.now_ms());
    op.checked = json!({ "tenant": tenant, "used": used, "capacity": capacity(env), "amount": amount });
    if used + amount > capacity(env) {
        op.outcome = Outcome::Refused { reason: "over_quota".into() };
        return true;
    }
    sleep(delay).await;
    op.use_at_ms = Some(env.now_ms());
    let vm = vm_key(tenant, &op.correlation_id);
    op.written = json!({ "vm": vm, "amount": amount, "used": used + amount });
    let opts = env.opts(&op.correlation_id);
    let build_opts = env.opts(&format!("{}.build", op.correlation_id));
    let count_opts = env.opts(&format!("{}.count", op.correlation_id));
    let building =
        match env.client.put(&env.ns, &vm, &json!({ "state": "building", "amount": amount }), &build_opts).await {
            Ok(done) => done.value.revision,
            Err(e) => {
                op.outcome = Outcome::from_error(&e);
                return false;
            }
        };
    if crash {
        op.outcome = Outcome::Crashed { revision: Some(building) };
        return false;
    }
    if let Err(e) = env.client.put(&env.ns, &used_key(tenant), &json!(used + amount), &count_opts).await {
        op.outcome = Outcome::from_error(&e);
        return false;
    }
    op.outcome = match env.client.put(&env.ns, &vm, &json!({ "state": "ready", "amount": amount }), &opts).await {
        Ok(done) => Outcome::Committed { revision: done.value.revision, resolved: false },
        Err(e) => Outcome::from_error(&e),
    };
    false
}

async fn guarded(env: &Env, op: &mut OpRecord, tenant: &str, amount: u64, crash: bool, delay: Duration) -> bool {
    let vm = vm_key(tenant, &op.correlation_id);
    let opts = env.opts(&op.correlation_id);
    let request = ReserveRequest { amount, ttl_ms: reservation_ttl_ms(env), context: Some(json!({ "vm": vm })) };
    let reserve_opts = env.opts(&format!("{}.reserve", op.correlation_id));
    let reservation = match env.client.reserve(&env.ns, &pool(tenant), &request, &reserve_opts).await {
        Ok(held) => held.value.reservation,
        Err(e) => {
            op.check_at_ms = Some(env.now_ms());
            op.outcome = Outcome::from_error(&e);
            return e.code().is_some();
        }
    };
    op.check_at_ms = Some(env.now_ms());
    op.checked = json!({ "tenant": tenant, "reservation": reservation, "amount": amount });
    sleep(delay).await;
    op.use_at_ms = Some(env.now_ms());
    op.written = json!({ "vm": vm, "amount": amount, "commit": reservation });
    // The record is created only if absent: a VM the reconciler already reclaimed stays so.
    let create = ActRequest {
        ticket: None,
        conditions: vec![Condition::Absent(vm.clone())],
        ops: vec![Op::Put(PutOp { key: vm.clone(), value: json!({ "state": "building", "amount": amount }) })],
        flow: Some("gameday-quota".into()),
    };
    let building = match env.client.act(&env.ns, &create, &env.opts(&format!("{}.build", op.correlation_id))).await {
        Ok(done) => done.value.revision,
        Err(e) => {
            op.outcome = Outcome::from_error(&e);
            return false;
        }
    };
    if crash {
        op.outcome = Outcome::Crashed { revision: Some(building) };
        return false;
    }
    let finish = ActRequest {
        ticket: None,
        conditions: vec![],
        ops: vec![
            Op::Put(PutOp { key: vm.clone(), value: json!({ "state": "ready", "amount": amount }) }),
            Op::Commit(ReservationRef { reservation }),
        ],
        flow: Some("gameday-quota".into()),
    };
    op.outcome = match env.client.act(&env.ns, &finish, &opts).await {
        Ok(done) => Outcome::Committed { revision: done.value.revision, resolved: false },
        Err(e) => {
            let outcome = Outcome::from_error(&e);
            if e.code().is_some() {
                // The reservation expired while we built: give the VM back ourselves.
                compensate(env, &op.actor, &vm, &format!("{}.compensate", op.correlation_id)).await;
            }
            outcome
        }
    };
    false
}

async fn compensate(env: &Env, actor: &str, vm: &str, correlation_id: &str) {
    let mut op = OpRecord::new(actor, "compensate", correlation_id.to_owned());
    op.written = json!({ "vm": vm, "state": "reclaimed" });
    let put = Op::Put(PutOp { key: vm.to_owned(), value: json!({ "state": "reclaimed" }) });
    let act = ActRequest { ticket: None, conditions: vec![], ops: vec![put], flow: None };
    op.outcome = match env.client.act(&env.ns, &act, &env.opts(correlation_id)).await {
        Ok(done) => Outcome::Committed { revision: done.value.revision, resolved: false },
        Err(e) => Outcome::from_error(&e),
    };
    env.record(op);
}

/// The user's cleanup job: every 100 ms, reclaims the VM of each unresolved orphan and
/// resolves it. After the actors stop, it keeps going until no reservation is held and no
/// orphan is left (or [`SETTLE_MS_MAX`]).
async fn reconciler(env: Arc<Env>) {
    let mut op_idx = 0;
    let mut settle_deadline = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let orphans = match env.client.list_orphans(&env.ns, false).await {
            Ok(orphans) => orphans.items,
            Err(_) => continue,
        };
        for orphan in &orphans {
            let Some(vm) = orphan.context.as_ref().and_then(|c| c["vm"].as_str()).map(str::to_owned) else { continue };
            let corr = env.correlation_id("reconciler", op_idx);
            op_idx += 1;
            compensate(&env, "reconciler", &vm, &corr).await;
            let note = ResolveRequest { note: Some(format!("reclaimed {vm}")) };
            let _ = env.client.resolve_orphan(&env.ns, &orphan.id, &note, &env.opts(&corr)).await;
        }
        if env.running() {
            continue;
        }
        let deadline = *settle_deadline.get_or_insert_with(|| Instant::now() + Duration::from_millis(SETTLE_MS_MAX));
        if orphans.is_empty() && nothing_held(&env).await || Instant::now() > deadline {
            return;
        }
    }
}

async fn nothing_held(env: &Env) -> bool {
    for tenant_idx in 0..TENANTS {
        match env.client.get_pool(&env.ns, &pool(&tenant(tenant_idx))).await {
            Ok(counters) if counters.reserved == 0 => {}
            _ => return false,
        }
    }
    true
}

pub async fn judge(env: &Env, ops: &[OpRecord]) -> Result<Judgement, GamedayError> {
    let vms = env.retrying("list the VMs", || env.client.list(&env.ns, VMS, Some(10_000))).await?;
    let mut judgement = Judgement::default();
    let mut by_tenant: BTreeMap<String, Vec<_>> = BTreeMap::new();
    for item in &vms.items {
        let rest = item.key.trim_start_matches(VMS);
        let (tenant, correlation_id) = rest.split_once('/').unwrap_or((rest, ""));
        by_tenant.entry(tenant.to_owned()).or_default().push((item.create_revision, correlation_id.to_owned(), item));
    }
    let mut summary = serde_json::Map::new();
    for (tenant, mut items) in by_tenant {
        items.sort_by_key(|(revision, ..)| *revision);
        let (mut held, mut ready, mut building, mut reclaimed) = (0u64, 0u64, 0u64, 0u64);
        for (_, correlation_id, item) in &items {
            let amount = int(&item.value["amount"]) as u64;
            match item.value["state"].as_str() {
                Some("reclaimed") => {
                    reclaimed += 1;
                    continue;
                }
                Some("building") => {
                    building += 1;
                    judgement.violations.push(Violation {
                        correlation_id: correlation_id.clone(),
                        what: format!("{} left half-built ({amount} of {tenant}'s quota)", item.key),
                    });
                }
                _ => ready += amount,
            }
            held += amount;
            if held > capacity(env) {
                judgement.violations.push(Violation {
                    correlation_id: correlation_id.clone(),
                    what: format!("{tenant} at {held} of its quota {} with {}", capacity(env), item.key),
                });
            }
        }
        let mut tenant_summary =
            json!({ "capacity": capacity(env), "ready": ready, "building": building, "reclaimed": reclaimed });
        if env.mode == Mode::Guarded {
            let pool = pool(&tenant);
            let counters = env.retrying("read the pool", || env.client.get_pool(&env.ns, &pool)).await?;
            tenant_summary["pool"] = json!({ "used": counters.used, "reserved": counters.reserved });
            if counters.used != ready {
                judgement.violations.push(Violation {
                    correlation_id: String::new(),
                    what: format!("{tenant}: ready VMs need {ready}, the pool has {} used", counters.used),
                });
            }
        }
        summary.insert(tenant, tenant_summary);
    }
    let crashed = ops.iter().filter(|op| matches!(op.outcome, Outcome::Crashed { .. })).count();
    let compensations =
        ops.iter().filter(|op| op.kind == "compensate" && op.outcome.committed_revision().is_some()).count();
    judgement.notes.push(format!("{crashed} provisioners crashed mid-way; {compensations} VMs reclaimed"));
    judgement.final_state = serde_json::Value::Object(summary);
    Ok(judgement)
}
