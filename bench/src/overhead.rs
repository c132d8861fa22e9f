//! `--auth-overhead`: the throughput cost of API key authentication on gapguard (issue 7's
//! target: under 5 %).
//!
//! Two gapguard servers, each in its own temp dir: one without API keys, one with the
//! bench's key (every request then presents it). Each case (durable puts at 16 and 64
//! connections, checks at 16) runs four times, in the order no auth, auth, auth, no auth, so
//! that a linear drift of the machine over those four runs weighs on both sides alike and
//! each server has done the same amount of earlier work when its turn comes. A variant's
//! ops/s is the mean of its two rounds; the overhead is `1 - auth / no-auth`.

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::gapguard::{ApiKey, Gapguard};
use crate::procs::{self, Server};
use crate::report::{thousands, TargetCheck};
use crate::runner::Tally;
use crate::suite::{self, Plan, Sut};
use crate::workload::{System, Workload};

/// The target: authentication costs less than this share of throughput, in percent.
pub const TARGET_PCT: f64 = 5.0;

/// What is measured: workload and connection count.
const CASES: [(Workload, usize); 3] = [(Workload::Puts, 16), (Workload::Puts, 64), (Workload::Checks, 16)];

/// Which variant each round of a case runs on, in order.
pub const ORDER: [Variant; 4] = [Variant::NoAuth, Variant::Auth, Variant::Auth, Variant::NoAuth];

/// gapguard without or with authentication.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// No `[[api_key]]` configured: authentication is off.
    NoAuth,
    /// One `[[api_key]]`; every request sends `Authorization: Bearer <secret>`.
    Auth,
    /// `--obs-overhead`: metrics off, no span exporter.
    ObsOff,
    /// `--obs-overhead`: metrics on (the default), no span exporter.
    Metrics,
    /// `--obs-overhead`: metrics on, spans exported over OTLP/HTTP to a sink.
    MetricsOtlp,
    /// `--obs-overhead`: as `MetricsOtlp`, one trace in ten sampled (`OTEL_TRACES_SAMPLER`).
    MetricsOtlpSampled,
}

impl Variant {
    /// The name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Variant::NoAuth => "no auth",
            Variant::Auth => "auth",
            Variant::ObsOff => "off",
            Variant::Metrics => "metrics",
            Variant::MetricsOtlp => "metrics+otlp",
            Variant::MetricsOtlpSampled => "+otlp 10%",
        }
    }
}

/// One round of one case on one variant.
#[derive(Debug, Serialize)]
pub struct Round {
    /// Its place in the case's run order, from 1.
    pub round: usize,
    /// Successful operations per second in its measured window.
    pub ops_per_s: f64,
    /// Median latency, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, in milliseconds.
    pub p99_ms: f64,
    /// Connections that stopped on an error (1 when the run could not start).
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
}

/// One variant's figures for one case: both its rounds, and them together.
#[derive(Debug, Serialize)]
pub struct VariantFigures {
    /// Which variant.
    pub variant: Variant,
    /// Its rounds, in run order.
    pub rounds: Vec<Round>,
    /// Successful operations per second over both rounds (their mean: the windows are equal).
    pub ops_per_s: f64,
    /// The gap between its two rounds' ops/s over their mean, in percent: how much the
    /// same server moved between two runs of the same case.
    pub spread_pct: f64,
    /// Median latency over both rounds' operations, in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency over both rounds' operations, in milliseconds.
    pub p99_ms: f64,
    /// Errors over both rounds.
    pub errors: u64,
}

/// One case: a workload at a connection count, on both variants.
#[derive(Debug, Serialize)]
pub struct Case {
    /// The workload.
    pub workload: Workload,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// What one operation is.
    pub operation: &'static str,
    /// Without authentication.
    pub no_auth: VariantFigures,
    /// With authentication.
    pub auth: VariantFigures,
    /// `1 - auth ops/s / no-auth ops/s`, in percent; `None` when a run had errors.
    pub overhead_pct: Option<f64>,
}

/// Everything `--auth-overhead` wrote to `--json`.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// Measured seconds per run.
    pub seconds: f64,
    /// Warm-up seconds before each measured window.
    pub warmup_seconds: f64,
    /// The variant of each round of a case, in run order.
    pub order: [Variant; 4],
    /// The id of the API key of the `auth` variant (role admin, namespace `bench`).
    pub api_key_id: &'static str,
    /// Every case.
    pub cases: &'a [Case],
    /// The overhead target, per case.
    pub targets: &'a [TargetCheck],
}

/// The two servers, started; dropping it stops them.
pub struct Servers {
    servers: Vec<Server>,
    no_auth: Sut,
    auth: Sut,
}

impl Servers {
    /// Starts gapguard twice, each in its own temp dir under `base`: without API keys, and
    /// with one random key.
    pub async fn start(bin: &Path, base: &Path) -> Result<Self> {
        let plain = procs::start_gapguard(bin, base, None, None).await?;
        eprintln!("gapguard (no auth) listening on {}", plain.addr);
        let key = ApiKey::random();
        let keyed = procs::start_gapguard(bin, base, Some(&key), None).await?;
        eprintln!("gapguard (auth: API key {:?}) listening on {}", ApiKey::ID, keyed.addr);
        let no_auth = Sut::Gapguard(Gapguard::new(plain.addr, None));
        let auth = Sut::Gapguard(Gapguard::new(keyed.addr, Some(&key)));
        Ok(Servers { servers: vec![plain, keyed], no_auth, auth })
    }

    /// Warns about a server that died during the run.
    pub fn check_alive(&mut self) {
        for server in &mut self.servers {
            if let Err(e) = server.check_alive() {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

/// Runs every case in the order [`ORDER`] and returns the figures.
pub async fn run(servers: &Servers, plan: &Plan) -> Vec<Case> {
    let mut cases = Vec::new();
    for (workload, connections) in CASES {
        let sut = |variant| match variant {
            Variant::Auth => &servers.auth,
            _ => &servers.no_auth,
        };
        let mut figures = rounds(&[Variant::NoAuth, Variant::Auth], &ORDER, sut, workload, connections, plan).await;
        let auth = figures.pop().expect("two variants");
        let no_auth = figures.pop().expect("two variants");
        let overhead_pct = overhead_pct(&no_auth, &auth);
        cases.push(Case {
            workload,
            connections,
            operation: System::Gapguard.operation(workload),
            no_auth,
            auth,
            overhead_pct,
        });
    }
    cases
}

/// Runs one case's rounds in `order` (each round on the server `sut` gives for its variant)
/// and returns the figures of each of `variants`, in that order.
pub async fn rounds<'a>(
    variants: &[Variant],
    order: &[Variant],
    sut: impl Fn(Variant) -> &'a Sut,
    workload: Workload,
    connections: usize,
    plan: &Plan,
) -> Vec<VariantFigures> {
    let mut runs: Vec<(Variant, Vec<TimedRound>)> = variants.iter().map(|v| (*v, Vec::new())).collect();
    for (index, variant) in order.iter().copied().enumerate() {
        let round = index + 1;
        eprintln!(
            "running {} x{connections} on gapguard ({}), round {round} of {} ({:.0} s + {:.0} s warm-up)",
            workload.name(),
            variant.name(),
            order.len(),
            plan.measure.as_secs_f64(),
            plan.warmup.as_secs_f64()
        );
        let tally = suite::timed_tally(sut(variant), workload, connections, plan).await;
        runs.iter_mut().find(|(v, _)| *v == variant).expect("a known variant").1.push((round, tally));
    }
    runs.into_iter().map(|(v, rounds)| figures(v, rounds)).collect()
}

/// `1 - variant ops/s / base ops/s`, in percent; `None` when a run had errors.
pub fn overhead_pct(base: &VariantFigures, variant: &VariantFigures) -> Option<f64> {
    let clean = base.errors == 0 && variant.errors == 0 && base.ops_per_s > 0.0;
    clean.then(|| 100.0 * (1.0 - variant.ops_per_s / base.ops_per_s))
}

/// A round's place in its case's order, and its tally (or the error that stopped it).
pub type TimedRound = (usize, Result<Tally>);

/// A variant's figures from its rounds' tallies (or the error that stopped a round).
pub fn figures(variant: Variant, runs: Vec<TimedRound>) -> VariantFigures {
    let mut rounds = Vec::new();
    let mut merged: Option<Tally> = None;
    let (mut ops, mut seconds) = (0u64, 0.0);
    for (round, outcome) in runs {
        match outcome {
            Ok(tally) => {
                rounds.push(Round {
                    round,
                    ops_per_s: tally.ops_per_s(),
                    p50_ms: tally.latency_ms(0.5),
                    p99_ms: tally.latency_ms(0.99),
                    errors: tally.errors,
                    first_error: tally.first_error.clone(),
                });
                ops += tally.ops;
                seconds += tally.seconds;
                match &mut merged {
                    Some(m) => {
                        // Same bounds on both sides, so adding cannot fail.
                        let _ = m.latency_us.add(&tally.latency_us);
                    }
                    None => merged = Some(tally),
                }
            }
            Err(e) => rounds.push(Round {
                round,
                ops_per_s: 0.0,
                p50_ms: 0.0,
                p99_ms: 0.0,
                errors: 1,
                first_error: Some(format!("{e:#}")),
            }),
        }
    }
    let ops_per_s = if seconds > 0.0 { ops as f64 / seconds } else { 0.0 };
    let (lo, hi) =
        rounds.iter().fold((f64::INFINITY, 0.0f64), |(lo, hi), r| (lo.min(r.ops_per_s), hi.max(r.ops_per_s)));
    let spread_pct = if ops_per_s > 0.0 { 100.0 * (hi - lo) / ops_per_s } else { 0.0 };
    VariantFigures {
        variant,
        ops_per_s,
        spread_pct,
        p50_ms: merged.as_ref().map_or(0.0, |t| t.latency_ms(0.5)),
        p99_ms: merged.as_ref().map_or(0.0, |t| t.latency_ms(0.99)),
        errors: rounds.iter().map(|r| r.errors).sum(),
        rounds,
    }
}

/// The overhead target, checked per case.
pub fn targets(cases: &[Case]) -> Vec<TargetCheck> {
    cases
        .iter()
        .map(|case| {
            let note = case.overhead_pct.is_none().then(|| "a run it rests on had errors".to_owned());
            TargetCheck {
                target: format!(
                    "auth overhead, {} x{}: 1 - auth/no-auth ops/s < {TARGET_PCT} %",
                    case.workload.name(),
                    case.connections
                ),
                measured: case.overhead_pct,
                unit: "%",
                met: case.overhead_pct.map(|pct| pct < TARGET_PCT),
                note,
            }
        })
        .collect()
}

/// Prints one case's table: a row per variant with its rounds, their mean, spread and
/// latencies (the variant column as wide as the longest name). `--obs-overhead` prints its
/// cases with it too.
pub fn print_variants(variants: &[&VariantFigures]) {
    let w = variants.iter().map(|v| v.variant.name().len()).max().unwrap_or(0).max("variant".len());
    println!(
        "    {:<w$} {:<26} {:>10} {:>7} {:>8} {:>8} {:>6}",
        "variant", "ops/s by round", "ops/s", "spread", "p50 ms", "p99 ms", "errors"
    );
    for v in variants {
        let rounds: Vec<String> = v.rounds.iter().map(|r| format!("#{} {}", r.round, thousands(r.ops_per_s))).collect();
        println!(
            "    {:<w$} {:<26} {:>10} {:>6.1}% {:>8.3} {:>8.3} {:>6}",
            v.variant.name(),
            rounds.join("  "),
            thousands(v.ops_per_s),
            v.spread_pct,
            v.p50_ms,
            v.p99_ms,
            v.errors
        );
    }
}

/// Prints the cases: each variant's rounds and mean, then the overhead.
pub fn print(cases: &[Case]) {
    println!();
    println!("== authentication overhead: gapguard without API keys vs with one ==");
    let order: Vec<&str> = ORDER.iter().map(|v| v.name()).collect();
    println!("rounds of each case run in the order: {}", order.join(", "));
    println!("ops/s: mean of a variant's two rounds; spread: gap between those two rounds / their mean");
    println!("overhead = 1 - (auth ops/s / no-auth ops/s)");
    for case in cases {
        println!();
        println!("  {} x{}: {}", case.workload.name(), case.connections, case.operation);
        print_variants(&[&case.no_auth, &case.auth]);
        match case.overhead_pct {
            Some(pct) => println!(
                "    overhead {pct:.1} %  (target < {TARGET_PCT} %: {})",
                if pct < TARGET_PCT { "met" } else { "NOT MET" }
            ),
            None => println!("    overhead n/a (a run had errors)"),
        }
        for r in case.no_auth.rounds.iter().chain(&case.auth.rounds) {
            if let Some(error) = &r.first_error {
                println!("  ! round {}: {error}", r.round);
            }
        }
    }
}
