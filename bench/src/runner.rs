//! The load loop: one task per connection doing operations back-to-back, tallied per task
//! (no shared counters, no printing) and merged at the end.

use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;

/// Highest latency the histograms hold, in microseconds (longer ones saturate).
const MAX_LATENCY_US: u64 = 60_000_000;

/// What one logical operation came to.
#[derive(Clone, Copy, Debug)]
pub enum Outcome {
    /// The operation succeeded after `attempts` tries (1 unless it had to retry a conflict).
    Done {
        /// Conditional writes (or requests) tried, the successful one included.
        attempts: u32,
    },
    /// The hot key's stock is gone: this connection stops.
    Exhausted {
        /// Tries that failed before the exhaustion was seen.
        attempts: u32,
    },
}

/// One connection's worth of load: a keep-alive connection and whatever it needs to
/// build its requests. `op` runs one logical operation, retries included.
pub trait Worker: Send + 'static {
    /// Runs one operation. An error stops this connection and is reported.
    fn op(&mut self) -> impl Future<Output = Result<Outcome>> + Send;
}

/// The merged tally of a run.
#[derive(Debug)]
pub struct Tally {
    /// Length of the measured window, in seconds.
    pub seconds: f64,
    /// Operations that completed inside the measured window.
    pub ops: u64,
    /// Attempts made by those operations (≥ `ops`; the excess are conflicts).
    pub attempts: u64,
    /// Every successful operation of the run, warm-up and tail included (for stock accounting).
    pub all_successes: u64,
    /// Attempts of every operation of the run, warm-up and tail included.
    pub all_attempts: u64,
    /// Connections that stopped on an error.
    pub errors: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    /// Connections that stopped because the stock was exhausted.
    pub exhausted: u64,
    /// Connections that were still going when the run's deadline came.
    pub cut_off: u64,
    /// Latency of each operation completed in the window, in microseconds.
    pub latency_us: Histogram<u64>,
}

impl Tally {
    /// An empty tally of a measured window `seconds` long.
    pub fn new(seconds: f64) -> Self {
        Tally {
            seconds,
            ops: 0,
            attempts: 0,
            all_successes: 0,
            all_attempts: 0,
            errors: 0,
            first_error: None,
            exhausted: 0,
            cut_off: 0,
            latency_us: new_histogram(),
        }
    }

    fn merge(&mut self, other: Tally) {
        self.ops += other.ops;
        self.attempts += other.attempts;
        self.all_successes += other.all_successes;
        self.all_attempts += other.all_attempts;
        self.errors += other.errors;
        self.exhausted += other.exhausted;
        self.cut_off += other.cut_off;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latency_us.add(&other.latency_us);
    }

    /// Operations per second inside the measured window.
    pub fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.seconds
    }

    /// Attempts per second inside the measured window.
    pub fn attempts_per_s(&self) -> f64 {
        self.attempts as f64 / self.seconds
    }

    /// Share of attempts that failed on a conflict, in percent.
    pub fn conflict_pct(&self) -> f64 {
        if self.attempts == 0 {
            0.0
        } else {
            100.0 * (self.attempts - self.ops) as f64 / self.attempts as f64
        }
    }

    /// The latency at `quantile` (0..=1), in milliseconds.
    pub fn latency_ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Runs `workers` for `warmup` then `measure`, counting only operations that complete
/// inside the measured window. Each worker stops early on an error or when its stock runs out.
pub async fn timed<W: Worker>(workers: Vec<W>, warmup: Duration, measure: Duration) -> Result<Tally> {
    let start = Instant::now();
    drive_all(workers, start + warmup, start + warmup + measure).await
}

/// Runs `workers` until every one of them has seen the stock exhausted (or failed), or
/// until `limit` has passed; every operation counts.
pub async fn until_exhausted<W: Worker>(workers: Vec<W>, limit: Duration) -> Result<Tally> {
    let start = Instant::now();
    drive_all(workers, start, start + limit).await
}

async fn drive_all<W: Worker>(workers: Vec<W>, from: Instant, until: Instant) -> Result<Tally> {
    let handles: Vec<_> = workers.into_iter().map(|worker| tokio::spawn(drive(worker, from, until))).collect();
    let mut total = Tally::new(until.saturating_duration_since(from).as_secs_f64());
    for handle in handles {
        total.merge(handle.await.context("a load task panicked")?);
    }
    Ok(total)
}

/// One connection's loop: back-to-back operations until `until`, an error or exhaustion.
async fn drive<W: Worker>(mut worker: W, from: Instant, until: Instant) -> Tally {
    let mut tally = Tally::new(0.0);
    loop {
        let t0 = Instant::now();
        if t0 >= until {
            tally.cut_off += 1;
            break;
        }
        match worker.op().await {
            Ok(Outcome::Done { attempts }) => {
                let t1 = Instant::now();
                tally.all_successes += 1;
                tally.all_attempts += u64::from(attempts);
                if t1 >= from && t1 < until {
                    tally.ops += 1;
                    tally.attempts += u64::from(attempts);
                    let us = u64::try_from(t1.duration_since(t0).as_micros()).unwrap_or(u64::MAX);
                    tally.latency_us.saturating_record(us.max(1));
                }
            }
            Ok(Outcome::Exhausted { attempts }) => {
                tally.all_attempts += u64::from(attempts);
                tally.exhausted += 1;
                break;
            }
            Err(e) => {
                tally.errors += 1;
                tally.first_error = Some(format!("{e:#}"));
                break;
            }
        }
    }
    tally
}
