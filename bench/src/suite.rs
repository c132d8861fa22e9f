//! The run itself: every selected workload on every selected system, the timed runs and
//! then, for contended workloads, the no-oversell verification.

use std::time::Duration;

use anyhow::{Context, Result};

use crate::etcd::Etcd;
use crate::gapguard::Gapguard;
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
}

impl Sut {
    /// Which system this is.
    pub fn system(&self) -> System {
        match self {
            Sut::Gapguard(_) => System::Gapguard,
            Sut::Etcd(_) => System::Etcd,
            Sut::Redis(_) => System::Redis,
        }
    }

    async fn set_stock(&self, n: i64) -> Result<()> {
        match self {
            Sut::Gapguard(s) => s.set_stock(n).await,
            Sut::Etcd(s) => s.set_stock(n).await,
            Sut::Redis(s) => s.set_stock(n).await,
        }
        .context("setting stock")
    }

    async fn read_stock(&self) -> Result<i64> {
        match self {
            Sut::Gapguard(s) => s.read_stock().await,
            Sut::Etcd(s) => s.read_stock().await,
            Sut::Redis(s) => s.read_stock().await,
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
        for &connections in workload.connections() {
            for sut in suts {
                let system = sut.system();
                eprintln!(
                    "running {} x{connections} on {} ({:.0} s + {:.0} s warm-up)",
                    workload.name(),
                    system.name(),
                    plan.measure.as_secs_f64(),
                    plan.warmup.as_secs_f64()
                );
                match timed(sut, workload, connections, plan).await {
                    Ok((result, accounting)) => {
                        findings.results.push(result);
                        findings.verifications.extend(accounting);
                    }
                    Err(e) => findings.results.push(RunResult::failed(workload, system, connections, &e)),
                }
            }
        }
        if workload.contended() {
            for sut in suts {
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
    let uses_stock = workload.contended() || workload == Workload::Checks;
    if uses_stock {
        sut.set_stock(plan.stock).await?;
    }
    let tally = sut.drive(workload, connections, Some((plan.warmup, plan.measure))).await?;
    let result = RunResult::new(workload, sut.system(), connections, &tally);
    if !workload.contended() {
        return Ok((result, None));
    }
    let expected = plan.stock - i64::try_from(tally.all_successes)?;
    let final_stock = sut.read_stock().await;
    let detail = match &final_stock {
        Err(e) => Some(format!("{e:#}")),
        Ok(_) if tally.errors > 0 => {
            Some(format!("{} connection(s) failed: outcome of their last request unknown", tally.errors))
        }
        Ok(n) if *n != expected => Some(format!("expected final stock {expected}")),
        Ok(_) => None,
    };
    let verification = Verification {
        workload,
        system: sut.system(),
        kind: "timed-accounting",
        initial_stock: plan.stock,
        successes: tally.all_successes,
        final_stock: final_stock.ok(),
        pass: detail.is_none(),
        detail,
    };
    Ok((result, Some(verification)))
}

/// Sets a small stock, runs until every connection has seen it exhausted, and checks that
/// the successes equal the stock and the stock ends at zero.
async fn exhaust(sut: &Sut, workload: Workload, connections: usize, stock: i64) -> Verification {
    let outcome = async {
        sut.set_stock(stock).await?;
        let tally = sut.drive(workload, connections, None).await?;
        let final_stock = sut.read_stock().await?;
        anyhow::Ok((tally, final_stock))
    }
    .await;
    let (successes, final_stock, detail) = match outcome {
        Err(e) => (0, None, Some(format!("{e:#}"))),
        Ok((tally, final_stock)) => {
            let successes = tally.all_successes;
            let detail = if let Some(error) = &tally.first_error {
                Some(format!("{} connection(s) failed: {error}", tally.errors))
            } else if tally.cut_off > 0 {
                Some(format!("stock not exhausted within {VERIFY_LIMIT:?}"))
            } else if i64::try_from(successes).ok() != Some(stock) {
                Some(format!("{successes} decrements of a stock of {stock}"))
            } else if final_stock != 0 {
                Some(format!("final stock {final_stock}, expected 0"))
            } else {
                None
            };
            (successes, Some(final_stock), detail)
        }
    };
    Verification {
        workload,
        system: sut.system(),
        kind: "exhaust",
        initial_stock: stock,
        successes,
        final_stock,
        pass: detail.is_none(),
        detail,
    }
}
