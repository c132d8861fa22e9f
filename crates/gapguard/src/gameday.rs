//! `gapguard gameday`: the command line of the race scenarios of `gapguard_gameday` — flags to
//! a `Config`, the progress bars, the table on stdout, the JSON and HTML reports, and the exit
//! code of the verdict.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use gapguard_gameday::indicatif::{MultiProgress, ProgressDrawTarget};
use gapguard_gameday::{Config, DelayDist, GamedayError, NetworkFaults, Scenario, Target};

use crate::failure::{self, Failure};

/// The run time per mode of `--quick`, in seconds.
const QUICK_DURATION_S: f64 = 1.0;

/// `gapguard gameday`.
#[derive(Debug, Args)]
pub struct GamedayArgs {
    /// Scenarios: `all`, or a comma-separated list of inventory, quota, revocation, lease, retry, cache, deploy.
    #[arg(long, value_name = "NAME", default_value = "all", value_parser = parse_scenarios)]
    pub scenario: ScenarioList,
    /// Concurrent actors per run (buyers, tenants, workers…; adversaries come on top).
    #[arg(long, value_name = "N", default_value_t = 8)]
    pub actors: usize,
    /// Seconds each mode of each scenario runs.
    #[arg(long, value_name = "S", default_value_t = 5.0)]
    pub duration: f64,
    /// A short run (1 s per mode), for a smoke test or CI.
    #[arg(long, conflicts_with = "duration")]
    pub quick: bool,
    /// Delay between check and use: `20ms`, `fixed:20ms`, `uniform:5ms..80ms`, `exp:30ms`.
    #[arg(long, value_name = "DIST", default_value = "uniform:10ms..60ms", value_parser = parse_delay)]
    pub delay: DelayDist,
    /// Seed of the fault schedule: delays, amounts, actor choices, crash times, toxics.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// `kill -9` and restart the embedded server this many times per run.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub crashes: u32,
    /// Network faults between actors and server: `latency=20ms,jitter=5ms,reset=0.02,timeout=0.01,timeout_after=500ms`.
    #[arg(long, value_name = "TOXICS", value_parser = parse_network)]
    pub net: Option<NetworkFaults>,
    /// Write the JSON report here.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Write the HTML report (table and charts, one self-contained file) here.
    #[arg(long, value_name = "FILE")]
    pub html: Option<PathBuf>,
    /// Draw no progress bars (they are drawn only when stderr is a terminal anyway).
    #[arg(long)]
    pub no_progress: bool,
}

/// The scenarios of `--scenario`.
#[derive(Clone, Debug)]
pub struct ScenarioList(pub Vec<Scenario>);

fn parse_scenarios(text: &str) -> Result<ScenarioList, GamedayError> {
    Scenario::parse_list(text).map(ScenarioList)
}

fn parse_delay(text: &str) -> Result<DelayDist, GamedayError> {
    text.parse()
}

fn parse_network(text: &str) -> Result<NetworkFaults, GamedayError> {
    text.parse()
}

/// Runs the gameday. `url` is the global `--url` when it was given (flag or `GAPGUARD_URL`);
/// without it the embedded server is this binary, started on a temp dir.
pub async fn run(args: &GamedayArgs, url: Option<&str>, api_key: Option<&str>) -> anyhow::Result<()> {
    let duration_s = if args.quick { QUICK_DURATION_S } else { args.duration };
    if !duration_s.is_finite() || duration_s <= 0.0 {
        return Err(Failure::usage(format!("--duration must be a positive number of seconds, not {duration_s}")).into());
    }
    let target = match url {
        Some(url) => Target::Url { url: url.to_owned(), api_key: api_key.map(str::to_owned) },
        None => Target::Embedded {
            binary: std::env::current_exe().context("cannot find this gapguard binary to start the embedded server")?,
        },
    };
    let config = Config {
        scenarios: args.scenario.0.clone(),
        actors: args.actors,
        duration: Duration::from_secs_f64(duration_s.min(1e6)),
        delay: args.delay,
        seed: args.seed,
        target,
        crashes: args.crashes,
        network: args.net,
    };
    let progress = if args.no_progress {
        MultiProgress::with_draw_target(ProgressDrawTarget::hidden())
    } else {
        MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
    };
    let report = match gapguard_gameday::run(&config, &progress).await {
        Ok(report) => report,
        Err(e) if e.is_usage() => return Err(Failure::usage(e.to_string()).into()),
        Err(e) => return Err(e.into()),
    };
    if let Some(path) = &args.report {
        std::fs::write(path, report.to_json()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if let Some(path) = &args.html {
        std::fs::write(path, report.to_html()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    print!("{}", report.table());
    if !report.verdict.passed {
        return Err(Failure { code: failure::GAMEDAY_FAILED, message: report.verdict.problems.join("; ") }.into());
    }
    Ok(())
}
