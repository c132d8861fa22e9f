//! The run itself: every selected workload on every selected system, the timed runs and
//! then, for contended workloads, the no-oversell verification.

use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::cpu::CpuMeter;
use crate::etcd::Etcd;
use crate::gapguard::{CommitStats, Gapguard, PoolLevel};
use crate::gapguard_pg::GapguardPg;
use crate::pgbench::Pgbench;
use crate::postgres::Postgres;
use crate::redis::Redis;
use crate::report::{RunResult, Verification};
use crate::runner::{self, Tally};
use crate::workload::{System, Workload};

/// How long a verification run may take before it counts as failed.
const VERIFY_LIMIT: Duration = Duration::from_secs(120);

/// A system under test, ready to take load.
pub enum Sut {
    /// gapguard.
    Gapguard(Gapguard),
    /// etcd.
    Etcd(Etcd),
    /// Redis.
    Redis(Redis),
    /// PostgreSQL.
    Postgres(Postgres),
    /// gapguard on PostgreSQL, one or more nodes.
    GapguardPg(Box<GapguardPg>),
    /// PostgreSQL driven by pgbench.
    Pgbench(Pgbench),
}

/// The cluster of a [`Sut::GapguardPg`], as `let` binding `$client: &Gapguard`.
macro_rules! with_cluster {
    ($sut:expr, $client:ident => $body:expr) => {{
        let guard = $sut.cluster().await?;
        let $client = &guard.as_ref().context("gapguard-pg: no cluster")?.client;
        $body
    }};
}

/// The stock read back after a run.
struct Level {
    /// What is left: the hot key, row or the pool's `available`.
    remaining: i64,
    /// The whole pool, for gapguard's `reserve`.
    pool: Option<PoolLevel>,
}

impl Level {
    fn plain(remaining: i64) -> Self {
        Level { remaining, pool: None }
    }
}

impl Sut {
    /// Which system this is.
    pub fn system(&self) -> System {
        match self {
            Sut::Gapguard(_) => System::Gapguard,
            Sut::Etcd(_) => System::Etcd,
            Sut::Redis(_) => System::Redis,
            Sut::Postgres(_) => System::Postgres,
            Sut::GapguardPg(s) if s.n_nodes() == 1 => System::GapguardPg1,
            Sut::GapguardPg(_) => System::GapguardPg3,
            Sut::Pgbench(_) => System::Pgbench,
        }
    }

    /// Gives the next run a clean slate where the system shares state between runs: a fresh
    /// database (and, for gapguard on PostgreSQL, fresh nodes on it).
    async fn fresh(&self) -> Result<()> {
        match self {
            Sut::GapguardPg(s) => s.fresh().await.context("starting a fresh gapguard-pg cluster"),
            Sut::Pgbench(s) => s.fresh().await.context("creating a fresh pgbench database"),
            _ => Ok(()),
        }
    }

    /// Stops whatever the system started for its runs (gapguard-pg's nodes, which must stop
    /// before the PostgreSQL under them).
    pub async fn stop(&self) {
        if let Sut::GapguardPg(s) = self {
            s.stop().await;
        }
    }

    /// Sets the stock `workload` draws on to `n` (for gapguard's `reserve`: a fresh pool of
    /// capacity `n`).
    async fn set_stock(&self, workload: Workload, n: i64) -> Result<()> {
        match self {
            Sut::Gapguard(s) if workload == Workload::Reserve => s.new_pool(n).await,
            Sut::Gapguard(s) => s.set_stock(n).await,
            Sut::Etcd(s) => s.set_stock(n).await,
            Sut::Redis(s) => s.set_stock(n).await,
            Sut::Postgres(s) => s.set_stock(n).await,
            Sut::GapguardPg(s) if workload == Workload::Reserve => with_cluster!(s, c => c.new_pool(n).await),
            Sut::GapguardPg(s) => with_cluster!(s, c => c.set_stock(n).await),
            Sut::Pgbench(s) => s.set_stock(n).await,
        }
        .context("setting stock")
    }

    async fn read_stock(&self, workload: Workload) -> Result<Level> {
        match self {
            Sut::Gapguard(s) if workload == Workload::Reserve => {
                s.read_pool().await.map(|pool| Level { remaining: pool.available, pool: Some(pool) })
            }
            Sut::Gapguard(s) => s.read_stock().await.map(Level::plain),
            Sut::Etcd(s) => s.read_stock().await.map(Level::plain),
            Sut::Redis(s) => s.read_stock().await.map(Level::plain),
            Sut::Postgres(s) => s.read_stock().await.map(Level::plain),
            Sut::GapguardPg(s) if workload == Workload::Reserve => with_cluster!(s, c => c
                .read_pool()
                .await
                .map(|pool| Level { remaining: pool.available, pool: Some(pool) })),
            Sut::GapguardPg(s) => with_cluster!(s, c => c.read_stock().await.map(Level::plain)),
            Sut::Pgbench(s) => s.read_stock().await.map(Level::plain),
        }
        .context("reading stock")
    }

    /// Opens `connections` connections and runs `workload` on them for warm-up + measure
    /// (`Some`), or until the stock is exhausted (`None`).
    async fn drive(
        &self,
        workload: Workload,
        connections: usize,
        window: Option<(Duration, Duration)>,
    ) -> Result<Tally> {
        macro_rules! go {
            ($workers:expr) => {{
                let workers = $workers.await.context("opening connections")?;
                match window {
                    Some((warmup, measure)) => runner::timed(workers, warmup, measure).await,
                    None => runner::until_exhausted(workers, VERIFY_LIMIT).await,
                }
            }};
        }
        match self {
            Sut::Gapguard(s) => go!(s.workers(workload, connections)),
            Sut::Etcd(s) => go!(s.workers(workload, connections)),
            Sut::Redis(s) => go!(s.workers(workload, connections)),
            Sut::Postgres(s) => go!(s.workers(workload, connections)),
            Sut::GapguardPg(s) => with_cluster!(s, c => go!(c.workers(workload, connections))),
            Sut::Pgbench(s) => match window {
                Some((warmup, measure)) => s.run(workload, connections, warmup, measure).await,
                None => bail!("pgbench runs only timed"),
            },
        }
    }
}

/// What to run.
pub struct Plan {
    /// Workloads, in order.
    pub workloads: Vec<Workload>,
    /// Warm-up before each measured window.
    pub warmup: Duration,
    /// Length of each measured window.
    pub measure: Duration,
    /// Stock at the start of timed contended runs (must not run out).
    pub stock: i64,
    /// Stock of the verification runs, which go until it is gone.
    pub verify_stock: i64,
    /// Only these connection counts (empty: all).
    pub connections: Vec<usize>,
    /// The process of each system that is one process (gapguard embedded, etcd, Redis), for
    /// the server CPU per operation.
    pub pids: Vec<(System, u32)>,
    /// Timed runs of each system per workload and connection count, in turns (at least 1).
    pub rounds: usize,
}

impl Plan {
    /// Whether the plan runs at this connection count.
    pub fn runs_at(&self, connections: usize) -> bool {
        self.connections.is_empty() || self.connections.contains(&connections)
    }
}

/// Everything the run found.
#[derive(Default)]
pub struct Findings {
    /// Every timed run.
    pub results: Vec<RunResult>,
    /// Every no-oversell check.
    pub verifications: Vec<Verification>,
}

/// Runs the plan. A failure of one run is recorded in its result and the rest go on.
pub async fn run(suts: &[Sut], plan: &Plan) -> Findings {
    let mut findings = Findings::default();
    for &workload in &plan.workloads {
        let suts: Vec<&Sut> = suts.iter().filter(|sut| sut.system().supports(workload)).collect();
        for &connections in workload.connections().iter().filter(|&&n| plan.runs_at(n)) {
            let here: Vec<&Sut> =
                suts.iter().copied().filter(|sut| sut.system().connections(workload).contains(&connections)).collect();
            let mut runs: Vec<Vec<RunResult>> = here.iter().map(|_| Vec::new()).collect();
            for round in 1..=plan.rounds {
                for (sut, runs) in here.iter().zip(&mut runs) {
                    let system = sut.system();
                    let of_rounds = match plan.rounds {
                        1 => String::new(),
                        n => format!(", round {round} of {n}"),
                    };
                    eprintln!(
                        "running {} x{connections} on {} ({:.0} s + {:.0} s warm-up{of_rounds})",
                        workload.name(),
                        system.name(),
                        plan.measure.as_secs_f64(),
                        plan.warmup.as_secs_f64()
                    );
                    match timed(sut, workload, connections, plan).await {
                        Ok((result, accounting)) => {
                            runs.push(result);
                            findings.verifications.extend(accounting);
                        }
                        Err(e) => runs.push(RunResult::failed(workload, system, connections, &e)),
                    }
                }
            }
            findings.results.extend(runs.into_iter().filter_map(RunResult::median_of));
        }
        if workload.contended() && plan.runs_at(workload.connections()[0]) {
            for &sut in suts.iter().filter(|sut| sut.system().verifies_exhaustion()) {
                eprintln!(
                    "verifying {} on {}: stock {} until exhausted",
                    workload.name(),
                    sut.system().name(),
                    plan.verify_stock
                );
                let connections = workload.connections()[0];
                findings.verifications.push(exhaust(sut, workload, connections, plan.verify_stock).await);
            }
        }
    }
    findings
}

/// One timed run; for contended workloads, also checks that the stock consumed equals the
/// successes the clients saw.
async fn timed(
    sut: &Sut,
    workload: Workload,
    connections: usize,
    plan: &Plan,
) -> Result<(RunResult, Option<Verification>)> {
    let pid = plan.pids.iter().find(|(system, _)| *system == sut.system()).map(|&(_, pid)| pid);
    let meter = pid.and_then(CpuMeter::start);
    let tally = timed_tally(sut, workload, connections, plan).await?;
    let mut result = RunResult::new(workload, sut.system(), connections, &tally);
    // Over the whole run, warm-up included, like `all_successes`.
    result.server_cpu_us_per_op = meter.and_then(|m| m.us_per_op(tally.all_successes));
    if let Sut::GapguardPg(s) = sut {
        let stats: Result<CommitStats> = async { with_cluster!(s, c => c.commit_stats().await) }.await;
        match stats {
            Ok(stats) => result.commits = Some(stats),
            Err(e) => eprintln!("warning: {} x{connections}: no commit figures: {e:#}", sut.system().name()),
        }
    }
    if !workload.contended() {
        return Ok((result, None));
    }
    let expected = plan.stock - i64::try_from(tally.all_successes)?;
    let level = sut.read_stock(workload).await;
    let detail = match &level {
        Err(e) => Some(format!("{e:#}")),
        Ok(_) if tally.errors > 0 => {
            Some(format!("{} connection(s) failed: outcome of their last request unknown", tally.errors))
        }
        Ok(level) if level.remaining != expected => Some(format!("expected final stock {expected}")),
        Ok(level) => level.pool.and_then(|pool| pool_problem(&pool, plan.stock, tally.all_successes)),
    };
    let level = level.ok();
    let verification = Verification {
        workload,
        system: sut.system(),
        kind: "timed-accounting",
        initial_stock: plan.stock,
        successes: tally.all_successes,
        final_stock: level.as_ref().map(|l| l.remaining),
        pool: level.and_then(|l| l.pool),
        pass: detail.is_none(),
        detail,
    };
    Ok((result, Some(verification)))
}

/// One timed run (warm-up, then the measured window), after setting the stock to
/// `plan.stock` when `workload` draws on it; its raw tally.
pub async fn timed_tally(sut: &Sut, workload: Workload, connections: usize, plan: &Plan) -> Result<Tally> {
    sut.fresh().await?;
    if workload.contended() || workload == Workload::Checks {
        sut.set_stock(workload, plan.stock).await?;
    }
    sut.drive(workload, connections, Some((plan.warmup, plan.measure))).await
}

/// Sets a small stock, runs until every connection has seen it exhausted, and checks that
/// the successes equal the stock and the stock ends at zero.
async fn exhaust(sut: &Sut, workload: Workload, connections: usize, stock: i64) -> Verification {
    let outcome = async {
        sut.set_stock(workload, stock).await?;
        let tally = sut.drive(workload, connections, None).await?;
        let level = sut.read_stock(workload).await?;
        anyhow::Ok((tally, level))
    }
    .await;
    let (successes, level, detail) = match outcome {
        Err(e) => (0, None, Some(format!("{e:#}"))),
        Ok((tally, level)) => {
            let successes = tally.all_successes;
            let detail = if let Some(error) = &tally.first_error {
                Some(format!("{} connection(s) failed: {error}", tally.errors))
            } else if tally.cut_off > 0 {
                Some(format!("stock not exhausted within {VERIFY_LIMIT:?}"))
            } else if i64::try_from(successes).ok() != Some(stock) {
                Some(format!("{successes} {} of a stock of {stock}", workload.unit()))
            } else if level.remaining != 0 {
                Some(format!("final stock {}, expected 0", level.remaining))
            } else {
                level.pool.and_then(|pool| pool_problem(&pool, stock, successes))
            };
            (successes, Some(level), detail)
        }
    };
    Verification {
        workload,
        system: sut.system(),
        kind: "exhaust",
        initial_stock: stock,
        successes,
        final_stock: level.as_ref().map(|l| l.remaining),
        pool: level.and_then(|l| l.pool),
        pass: detail.is_none(),
        detail,
    }
}

/// What is wrong with a pool of `capacity` read back after the clients saw `successes`
/// committed pairs: every commit must show as used, nothing may be left reserved, and the
/// capacity must be the one set.
fn pool_problem(pool: &PoolLevel, capacity: i64, successes: u64) -> Option<String> {
    if pool.capacity != capacity {
        Some(format!("pool capacity {}, expected {capacity}", pool.capacity))
    } else if u64::try_from(pool.used).ok() != Some(successes) {
        Some(format!("pool used {}, expected {successes} (the commits the clients saw)", pool.used))
    } else if pool.reserved != 0 {
        Some(format!("pool reserved {}, expected 0", pool.reserved))
    } else if pool.available != capacity - pool.used - pool.reserved {
        Some(format!("pool available {}, expected capacity - used - reserved", pool.available))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(connections: Vec<usize>) -> Plan {
        Plan {
            workloads: vec![Workload::Puts],
            warmup: Duration::ZERO,
            measure: Duration::from_secs(1),
            stock: 1,
            verify_stock: 1,
            connections,
            pids: Vec::new(),
            rounds: 1,
        }
    }

    #[test]
    fn a_plan_runs_at_the_chosen_counts_or_at_all() {
        assert!([1, 16, 64].iter().all(|&n| plan(Vec::new()).runs_at(n)));
        let chosen = plan(vec![16, 64]);
        assert!(!chosen.runs_at(1) && chosen.runs_at(16) && chosen.runs_at(64));
    }
}
