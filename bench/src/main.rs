//! `gapguard-bench`: starts gapguard, etcd, Redis and PostgreSQL on loopback, drives the same
//! workloads against each with keep-alive connections (and gapguard's PostgreSQL backend
//! against pgbench on the same PostgreSQL), and prints figures, ratios and targets.
//!
//! Exit status: 0 when every no-oversell verification passed, 1 when one failed, 2 on an
//! error that stopped the run, 130 when interrupted. Targets not met do not change it.

mod cpu;
mod etcd;
mod gapguard;
mod gapguard_pg;
mod http;
mod obs;
mod overhead;
mod pgbench;
mod postgres;
mod procs;
mod redis;
mod report;
mod resp;
mod runner;
mod suite;
mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;

use crate::report::Report;
use crate::suite::{Plan, Sut};
use crate::workload::{System, SystemArg, Workload};

/// Side-by-side benchmark of gapguard against etcd, Redis (appendfsync always) and PostgreSQL
/// 15 (fsync and synchronous_commit on), all started by the bench on loopback in temp dirs
/// and stopped at the end.
#[derive(Debug, Parser)]
#[command(name = "gapguard-bench", version)]
struct Cli {
    /// Seconds measured per workload, system and connection count (after the warm-up).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    seconds: u64,

    /// Warm-up before each measured window, in milliseconds.
    #[arg(long, default_value_t = 1000)]
    warmup_ms: u64,

    /// Timed runs per workload, system and connection count, the systems taking turns round
    /// by round (so that a slow spell of the machine falls on all of them). Each system's
    /// median run is reported (the lower middle one for an even count), with every round's
    /// figure; the ratios and targets use the medians.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=9))]
    rounds: u64,

    /// Run only these workloads (comma-separated; default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Workload>,

    /// Run only at these connection counts (comma-separated, among 1, 16 and 64; default:
    /// every count each workload runs at). The no-oversell verification runs are skipped
    /// when their count (the workload's first) is left out.
    #[arg(long, value_delimiter = ',', value_parser = parse_connections)]
    connections: Vec<usize>,

    /// Systems to run (comma-separated). PostgreSQL runs only the `reserve` workload, Redis
    /// every workload but `reserve`; gapguard-pg (gapguard on PostgreSQL with 1 node and with
    /// 3 nodes; gapguard-pg1, gapguard-pg3: one of them) and pgbench run `puts`, `decrement`
    /// and `reserve`, all on the one PostgreSQL the bench starts.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "gapguard,etcd,redis,postgres,gapguard-pg,pgbench")]
    systems: Vec<SystemArg>,

    /// Also write every figure, verification and target as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,

    /// The gapguard binary [default: target/release/gapguard in the workspace].
    #[arg(long)]
    gapguard: Option<PathBuf>,

    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,

    /// The redis-server binary.
    #[arg(long, default_value = "redis-server")]
    redis_server: PathBuf,

    /// The directory of PostgreSQL 15's binaries (postgres, initdb, pg_ctl, pgbench).
    #[arg(long, default_value = "/usr/lib/postgresql/15/bin")]
    pg_bin: PathBuf,

    /// Where the servers' temp dirs go (data and logs; must be a real disk, not tmpfs,
    /// for the durable figures to mean anything) [default: the system temp dir].
    #[arg(long)]
    tmpdir: Option<PathBuf>,

    /// Stock at the start of each timed contended run; must not run out during it.
    #[arg(long, default_value_t = 10_000_000)]
    stock: i64,

    /// Stock of the no-oversell verification runs, which go until it is exhausted.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(i64).range(1..))]
    verify_stock: i64,

    /// Run gapguard with authentication: a config with one API key (id `bench`, a random
    /// secret, admin of namespace `bench`), presented by every request.
    #[arg(long)]
    auth: bool,

    /// Instead of the comparison, measure what authentication costs gapguard: durable puts
    /// (x16, x64) and checks (x16) on a server without API keys and on one with a key, each
    /// case in the order no auth, auth, auth, no auth; prints each variant's ops/s and the
    /// overhead against the target (under 5 %).
    #[arg(long, conflicts_with_all = ["auth", "only", "systems", "connections"])]
    auth_overhead: bool,

    /// Instead of the comparison, measure what metrics and tracing cost gapguard: durable
    /// puts (x16, x64) and checks (x16) on four servers in one run: metrics and tracing off
    /// (`metrics = false`), metrics on (the default), and metrics on with request spans
    /// exported over OTLP/HTTP to a sink in this process, one trace in ten and every one;
    /// rounds ordered off, metrics, +otlp 10%, metrics+otlp, then backwards; prints each
    /// variant's ops/s and overhead against the criterion (under 10 %).
    #[arg(long, conflicts_with_all = ["auth", "auth_overhead", "only", "systems", "connections"])]
    obs_overhead: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the tokio runtime: {e}");
            return ExitCode::from(2);
        }
    };
    // The servers are spawned on this (the main) thread, inside `run`; when a signal wins
    // the race, `run` is dropped here and the guards it holds stop every server.
    runtime.block_on(async {
        tokio::select! {
            outcome = run(&cli) => match outcome {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::from(1),
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            },
            signal = shutdown_signal() => {
                eprintln!("interrupted ({signal}): stopping the servers");
                ExitCode::from(130)
            }
        }
    })
}

/// Resolves on Ctrl-C (SIGINT) or SIGTERM, naming which.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "SIGINT";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

/// Starts the servers, runs the plan, prints and writes the report. `Ok(false)` when a
/// verification failed.
async fn run(cli: &Cli) -> Result<bool> {
    if cli.auth_overhead {
        return run_auth_overhead(cli).await;
    }
    if cli.obs_overhead {
        return run_obs_overhead(cli).await;
    }
    let workloads = selected(&cli.only, &Workload::ALL);
    let chosen_args: Vec<System> = cli.systems.iter().flat_map(|arg| arg.systems().iter().copied()).collect();
    let chosen = selected(&chosen_args, &System::ALL);
    if chosen.is_empty() {
        bail!("--systems names no system");
    }
    // A system that runs none of the chosen workloads is not even started.
    let systems: Vec<System> = chosen.iter().copied().filter(|s| workloads.iter().any(|&w| s.supports(w))).collect();
    if systems.is_empty() {
        let names: Vec<&str> = chosen.iter().map(|s| s.name()).collect();
        bail!("none of --systems {} runs any of the chosen workloads", names.join(","));
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the bench; build it with --release");
    }
    let gapguard_bin =
        match systems.iter().any(|s| matches!(s, System::Gapguard | System::GapguardPg1 | System::GapguardPg3)) {
            true => Some(gapguard_binary(cli.gapguard.as_deref())?),
            false => None,
        };
    let base = cli.tmpdir.clone().unwrap_or_else(std::env::temp_dir);

    let mut versions = BTreeMap::new();
    // Held until the end of this function: dropping a server stops it.
    let mut servers = Vec::new();
    let mut suts = Vec::new();
    // The single-process servers, whose CPU time per operation the tables show.
    let mut pids = Vec::new();
    // One PostgreSQL for every system that needs one: the same server and settings for
    // the bench's own driver, gapguard's PostgreSQL backend and pgbench.
    let pg_addr = match systems.iter().any(|s| s.needs_postgres()) {
        true => {
            let server = procs::start_postgres(&cli.pg_bin, &base).await?;
            if let Some(v) = procs::version(&cli.pg_bin.join("postgres")) {
                versions.insert("postgres", v);
            }
            eprintln!("postgres listening on {}", server.addr);
            let addr = server.addr;
            servers.push(server);
            Some(addr)
        }
        false => None,
    };
    for &system in &systems {
        let (server, sut) = match system {
            System::Gapguard => {
                let bin = gapguard_bin.as_deref().context("gapguard binary")?;
                let key = cli.auth.then(gapguard::ApiKey::random);
                let server = procs::start_gapguard(bin, &base, key.as_ref(), None).await?;
                let sut = Sut::Gapguard(gapguard::Gapguard::new(server.addr, key.as_ref()));
                (server, sut)
            }
            System::Etcd => {
                if let Some(v) = procs::version(&cli.etcd) {
                    versions.insert("etcd", v);
                }
                let server = procs::start_etcd(&cli.etcd, &base).await?;
                let sut = Sut::Etcd(etcd::Etcd::new(server.addr));
                (server, sut)
            }
            System::Redis => {
                if let Some(v) = procs::version(&cli.redis_server) {
                    versions.insert("redis", v);
                }
                let server = procs::start_redis(&cli.redis_server, &base).await?;
                let sut = Sut::Redis(redis::Redis::new(server.addr));
                (server, sut)
            }
            System::Postgres => {
                suts.push(Sut::Postgres(postgres::Postgres::new(pg_addr.context("PostgreSQL")?)));
                continue;
            }
            System::GapguardPg1 | System::GapguardPg3 => {
                let bin = gapguard_bin.as_deref().context("gapguard binary")?;
                let n_nodes = system.pg_nodes().context("node count")?;
                let pg = pg_addr.context("PostgreSQL")?;
                let key = cli.auth.then(gapguard::ApiKey::random);
                suts.push(Sut::GapguardPg(Box::new(gapguard_pg::GapguardPg::new(bin, &base, pg, n_nodes, key))));
                continue;
            }
            System::Pgbench => {
                let pgbench = pgbench::Pgbench::new(&cli.pg_bin, &base, pg_addr.context("PostgreSQL")?)?;
                if let Some(v) = procs::version(pgbench.bin()) {
                    versions.insert("pgbench", v);
                }
                suts.push(Sut::Pgbench(pgbench));
                continue;
            }
        };
        eprintln!("{} listening on {}", system.name(), server.addr);
        pids.push((system, server.pid()));
        servers.push(server);
        suts.push(sut);
    }

    let plan = Plan {
        workloads: workloads.clone(),
        warmup: Duration::from_millis(cli.warmup_ms),
        measure: Duration::from_secs(cli.seconds),
        stock: cli.stock,
        verify_stock: cli.verify_stock,
        connections: cli.connections.clone(),
        pids,
        rounds: cli.rounds as usize,
    };
    let findings = suite::run(&suts, &plan).await;
    // gapguard-pg's nodes stop before the PostgreSQL under them.
    for sut in &suts {
        sut.stop().await;
    }
    drop(suts);
    for server in &mut servers {
        if let Err(e) = server.check_alive() {
            eprintln!("warning: {e:#}");
        }
    }
    eprintln!("stopping the servers");
    drop(servers);

    println!("gapguard-bench: {} s per run after {} ms warm-up", cli.seconds, cli.warmup_ms);
    if cli.rounds > 1 {
        println!("  {} rounds, the systems taking turns; each row is the system's median run", cli.rounds);
    }
    let gapguard_auth =
        cli.auth && systems.iter().any(|s| matches!(s, System::Gapguard | System::GapguardPg1 | System::GapguardPg3));
    if gapguard_auth {
        println!("  gapguard: with authentication (API key {:?}, role admin, namespace bench)", gapguard::ApiKey::ID);
    }
    for (name, version) in &versions {
        println!("  {name}: {version}");
    }
    for &workload in &workloads {
        report::print_workload(workload, &findings.results);
    }
    let targets = report::targets(&findings.results);
    report::print_targets(&targets);
    report::print_verifications(&findings.verifications);
    let passed = findings.verifications.iter().all(|v| v.pass);
    if !findings.verifications.is_empty() {
        println!();
        println!("verification: {}", if passed { "PASS" } else { "FAIL" });
    }

    if let Some(path) = &cli.json {
        let report = Report {
            seconds: plan.measure.as_secs_f64(),
            warmup_seconds: plan.warmup.as_secs_f64(),
            gapguard_auth,
            versions,
            results: &findings.results,
            verifications: &findings.verifications,
            targets: &targets,
            verification_passed: passed,
        };
        write_json(path, &report)?;
    }
    Ok(passed)
}

/// `--auth-overhead`: starts gapguard without and with an API key, runs the cases on both,
/// prints and writes the overhead. A target not met, like a run with errors, does not fail it.
async fn run_auth_overhead(cli: &Cli) -> Result<bool> {
    let (bin, base, plan) = overhead_setup(cli)?;
    let mut servers = overhead::Servers::start(&bin, &base).await?;
    let cases = overhead::run(&servers, &plan).await;
    servers.check_alive();
    eprintln!("stopping the servers");
    drop(servers);

    println!(
        "gapguard-bench --auth-overhead: {} s per run after {} ms warm-up, {} runs per case",
        cli.seconds,
        cli.warmup_ms,
        overhead::ORDER.len()
    );
    if let Some(version) = procs::version(&bin) {
        println!("  gapguard: {version}");
    }
    overhead::print(&cases);
    let targets = overhead::targets(&cases);
    report::print_targets(&targets);

    if let Some(path) = &cli.json {
        let report = overhead::Report {
            seconds: plan.measure.as_secs_f64(),
            warmup_seconds: plan.warmup.as_secs_f64(),
            order: overhead::ORDER,
            api_key_id: gapguard::ApiKey::ID,
            cases: &cases,
            targets: &targets,
        };
        write_json(path, &report)?;
    }
    Ok(true)
}

/// `--obs-overhead`: starts gapguard with metrics and tracing off, on, and exporting spans,
/// runs the cases on each, prints and writes the overheads. A criterion not met, like a run with
/// errors, does not fail it.
async fn run_obs_overhead(cli: &Cli) -> Result<bool> {
    let (bin, base, plan) = overhead_setup(cli)?;
    let mut servers = obs::Servers::start(&bin, &base).await?;
    let cases = obs::run(&servers, &plan).await;
    servers.check_alive();
    eprintln!("stopping the servers");
    let sink = servers.sink.received();
    drop(servers);

    println!(
        "gapguard-bench --obs-overhead: {} s per run after {} ms warm-up, {} runs per case",
        cli.seconds,
        cli.warmup_ms,
        obs::ORDER.len()
    );
    if let Some(version) = procs::version(&bin) {
        println!("  gapguard: {version}");
    }
    obs::print(&cases, sink);
    let targets = obs::targets(&cases);
    report::print_targets(&targets);

    if let Some(path) = &cli.json {
        let report = obs::Report {
            seconds: plan.measure.as_secs_f64(),
            warmup_seconds: plan.warmup.as_secs_f64(),
            order: obs::ORDER,
            otlp_sink_requests: sink.0,
            otlp_sink_bytes: sink.1,
            cases: &cases,
            targets: &targets,
        };
        write_json(path, &report)?;
    }
    Ok(true)
}

/// What `--auth-overhead` and `--obs-overhead` share: the gapguard binary, the temp base and
/// the plan (puts and checks), with a warning for a debug build of the bench.
fn overhead_setup(cli: &Cli) -> Result<(PathBuf, PathBuf, Plan)> {
    if cfg!(debug_assertions) {
        eprintln!("warning: this is a debug build of the bench; build it with --release");
    }
    let bin = gapguard_binary(cli.gapguard.as_deref())?;
    let base = cli.tmpdir.clone().unwrap_or_else(std::env::temp_dir);
    let plan = Plan {
        workloads: vec![Workload::Puts, Workload::Checks],
        warmup: Duration::from_millis(cli.warmup_ms),
        measure: Duration::from_secs(cli.seconds),
        stock: cli.stock,
        verify_stock: cli.verify_stock,
        connections: Vec::new(),
        pids: Vec::new(),
        rounds: 1,
    };
    Ok((bin, base, plan))
}

/// Writes `report` to `path` as pretty JSON (`--json`).
fn write_json(path: &Path, report: &impl serde::Serialize) -> Result<()> {
    let file = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    serde_json::to_writer_pretty(std::io::BufWriter::new(file), report)
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("wrote {}", path.display());
    Ok(())
}

/// The chosen items in canonical order, without duplicates; all of `all` when none chosen.
fn selected<T: Copy + Ord>(chosen: &[T], all: &[T]) -> Vec<T> {
    if chosen.is_empty() {
        return all.to_vec();
    }
    let mut items = chosen.to_vec();
    items.sort();
    items.dedup();
    items
}

/// The gapguard binary: `--gapguard`, else `target/release/gapguard` in the workspace (or
/// beside this binary when it is itself a release build elsewhere).
fn gapguard_binary(arg: Option<&Path>) -> Result<PathBuf> {
    if let Some(path) = arg {
        if path.is_file() {
            return Ok(path.to_owned());
        }
        bail!("--gapguard {}: no such file", path.display());
    }
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let workspace = manifest_dir.parent().unwrap_or(manifest_dir);
    let mut candidates = vec![workspace.join("target/release/gapguard")];
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent().filter(|d| d.ends_with("release")) {
            candidates.push(dir.join("gapguard"));
        }
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    bail!(
        "no gapguard binary (looked at {}).\n  Build it with `cargo build --release -p gapguard`, \
         pass --gapguard PATH, or leave it out with --systems etcd,redis,postgres",
        looked.join(", ")
    )
}

/// A `--connections` value: one of the counts some workload runs at.
fn parse_connections(value: &str) -> Result<usize, String> {
    match value.trim().parse::<usize>() {
        Ok(n @ (1 | 16 | 64)) => Ok(n),
        _ => Err(format!("`{value}` is not a connection count the bench runs at (1, 16 or 64)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_the_counts_the_workloads_run_at() {
        let cli = Cli::try_parse_from(["gapguard-bench", "--connections", "16,64"]).expect("parses");
        assert_eq!(cli.connections, vec![16, 64]);
        for bad in ["2", "0", "x", "16,65"] {
            let err = Cli::try_parse_from(["gapguard-bench", "--connections", bad]).expect_err(bad);
            assert!(err.to_string().contains("1, 16 or 64"), "{bad}: {err}");
        }
        assert!(Cli::try_parse_from(["gapguard-bench", "--connections", "16", "--auth-overhead"]).is_err());
    }
}
