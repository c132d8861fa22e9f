//! What a run found — figures, verifications and targets — as printed tables and as JSON.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::gapguard::{CommitStats, PoolLevel};
use crate::runner::Tally;
use crate::workload::{System, Workload};

/// The figures of one workload on one system at one connection count.
#[derive(Debug, Serialize)]
pub struct RunResult {
    /// The workload.
    pub workload: Workload,
    /// The system it ran on.
    pub system: System,
    /// What one operation is on that system.
    pub operation: &'static str,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// Length of the measured window, in seconds.
    pub seconds: f64,
    /// Successful operations completed in the window (for contended workloads: decrements).
    pub ops: u64,
    /// Attempts those operations made (the excess over `ops` are conflicts).
    pub attempts: u64,
    /// Successful operations per second.
    pub ops_per_s: f64,
    /// Attempts per second.
    pub attempts_per_s: f64,
    /// Share of attempts lost to a conflict, in percent.
    pub conflict_pct: f64,
    /// Median latency of a successful operation (retries included), in milliseconds.
    pub p50_ms: f64,
    /// 99th percentile latency, in milliseconds.
    pub p99_ms: f64,
    /// Slowest operation, in milliseconds.
    pub max_ms: f64,
    /// Connections that stopped on an error.
    pub errors: u64,
    /// The first error, if any.
    pub first_error: Option<String>,
    /// Whether the stock ran out during a timed contended run (figures then undercount).
    pub stock_ran_out: bool,
    /// CPU time the server process used (every thread, user and system) per successful
    /// operation, over the whole run (warm-up included); for the systems that are one process.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_us_per_op: Option<f64>,
    /// gapguard on PostgreSQL: the nodes' group commits over the whole run (warm-up included).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commits: Option<CommitStats>,
    /// With `--rounds`: the successful ops/s of every round, in the order they ran (this
    /// result is their median run).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rounds_ops_per_s: Vec<f64>,
}

impl RunResult {
    /// The figures of a finished timed run.
    pub fn new(workload: Workload, system: System, connections: usize, tally: &Tally) -> Self {
        RunResult {
            workload,
            system,
            operation: system.operation(workload),
            connections,
            seconds: tally.seconds,
            ops: tally.ops,
            attempts: tally.attempts,
            ops_per_s: tally.ops_per_s(),
            attempts_per_s: tally.attempts_per_s(),
            conflict_pct: tally.conflict_pct(),
            p50_ms: tally.latency_ms(0.5),
            p99_ms: tally.latency_ms(0.99),
            max_ms: tally.latency_us.max() as f64 / 1000.0,
            errors: tally.errors,
            first_error: tally.first_error.clone(),
            stock_ran_out: tally.exhausted > 0,
            server_cpu_us_per_op: None,
            commits: None,
            rounds_ops_per_s: Vec::new(),
        }
    }

    /// The result to report of the rounds of one system, workload and connection count: the
    /// first round with errors, so that they show (a clean median would hide them), else the
    /// median by successful ops/s (the lower middle one for an even count); with every
    /// round's ops/s when there were several. `None` for no rounds.
    pub fn median_of(mut runs: Vec<RunResult>) -> Option<Self> {
        let all: Vec<f64> = runs.iter().map(|r| r.ops_per_s).collect();
        let pick = match runs.iter().position(|r| r.errors > 0) {
            Some(failed) => failed,
            None => {
                let mut order: Vec<usize> = (0..runs.len()).collect();
                order.sort_by(|&a, &b| runs[a].ops_per_s.total_cmp(&runs[b].ops_per_s));
                *order.get(order.len().checked_sub(1)? / 2)?
            }
        };
        let mut result = runs.swap_remove(pick);
        if all.len() > 1 {
            result.rounds_ops_per_s = all;
        }
        Some(result)
    }

    /// A run that could not even start (its set-up failed).
    pub fn failed(workload: Workload, system: System, connections: usize, error: &anyhow::Error) -> Self {
        RunResult {
            workload,
            system,
            operation: system.operation(workload),
            connections,
            seconds: 0.0,
            ops: 0,
            attempts: 0,
            ops_per_s: 0.0,
            attempts_per_s: 0.0,
            conflict_pct: 0.0,
            p50_ms: 0.0,
            p99_ms: 0.0,
            max_ms: 0.0,
            errors: 1,
            first_error: Some(format!("{error:#}")),
            stock_ran_out: false,
            server_cpu_us_per_op: None,
            commits: None,
            rounds_ops_per_s: Vec::new(),
        }
    }
}

/// One no-oversell check of a contended workload on one system.
#[derive(Debug, Serialize)]
pub struct Verification {
    /// The workload.
    pub workload: Workload,
    /// The system.
    pub system: System,
    /// `exhaust` (small stock, run until gone) or `timed-accounting` (the timed run's
    /// successes must account exactly for the stock consumed).
    pub kind: &'static str,
    /// Stock at the start.
    pub initial_stock: i64,
    /// Successful decrements (for `reserve`: committed pairs) the clients saw.
    pub successes: u64,
    /// Stock read back at the end, if it could be read (for gapguard's `reserve`: the
    /// pool's `available`).
    pub final_stock: Option<i64>,
    /// gapguard's `reserve`: the whole pool read back at the end (`used` must equal
    /// `successes`, `reserved` must be 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<PoolLevel>,
    /// Whether the check held.
    pub pass: bool,
    /// What was wrong, when it failed.
    pub detail: Option<String>,
}

/// One target of the product, and whether this run met it.
#[derive(Debug, Serialize)]
pub struct TargetCheck {
    /// What the target says.
    pub target: String,
    /// The measured ratio (`x`), latency (`ms`) or overhead (`%`), when both sides were
    /// measured.
    pub measured: Option<f64>,
    /// `x` for a ratio, `ms` for a latency, `%` for an overhead.
    pub unit: &'static str,
    /// Whether it was met; `None` when not measured, or when a run it rests on had errors.
    pub met: Option<bool>,
    /// Why `met` is `None`.
    pub note: Option<String>,
}

/// Everything a run wrote to `--json`.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// Measured seconds per run.
    pub seconds: f64,
    /// Warm-up seconds before each measured window.
    pub warmup_seconds: f64,
    /// Whether gapguard ran with authentication (`--auth`: one API key, presented by
    /// every request).
    pub gapguard_auth: bool,
    /// `--version` of each system's binary, where it answers.
    pub versions: BTreeMap<&'static str, String>,
    /// Every timed run.
    pub results: &'a [RunResult],
    /// Every no-oversell check.
    pub verifications: &'a [Verification],
    /// Every target.
    pub targets: &'a [TargetCheck],
    /// Whether every verification passed.
    pub verification_passed: bool,
}

/// Looks up the run of `workload` on `system` at `connections`.
fn find(results: &[RunResult], workload: Workload, system: System, connections: usize) -> Option<&RunResult> {
    results.iter().find(|r| r.workload == workload && r.system == system && r.connections == connections)
}

/// The comparisons printed under each workload's table: (ours, peer).
const COMPARISONS: [(System, System); 6] = [
    (System::Gapguard, System::Etcd),
    (System::Gapguard, System::Redis),
    (System::Gapguard, System::Postgres),
    (System::GapguardPg1, System::Pgbench),
    (System::GapguardPg3, System::Pgbench),
    // What the two extra nodes bring (or cost) over one.
    (System::GapguardPg3, System::GapguardPg1),
];

/// `ours`' successful ops/s over `peer`'s, for the same workload and connections; `None`
/// unless both ran cleanly.
fn ratio(results: &[RunResult], workload: Workload, ours: System, peer: System, connections: usize) -> Option<f64> {
    let ours = find(results, workload, ours, connections)?;
    let theirs = find(results, workload, peer, connections)?;
    let clean = ours.errors == 0 && theirs.errors == 0 && theirs.ops_per_s > 0.0;
    clean.then(|| ours.ops_per_s / theirs.ops_per_s)
}

/// The server CPU per operation, as the tables print it (blank for multi-process systems).
fn cpu_column(r: &RunResult) -> String {
    r.server_cpu_us_per_op.map_or_else(String::new, |us| format!("{us:.1}"))
}

/// Prints one workload's table: a row per system and connection count, then the ratios.
pub fn print_workload(workload: Workload, results: &[RunResult]) {
    let rows: Vec<&RunResult> = results.iter().filter(|r| r.workload == workload).collect();
    if rows.is_empty() {
        return;
    }
    println!();
    println!("== {} ==", workload.title());
    let contended = workload.contended();
    if contended {
        println!(
            "{:>5}  {:<12} {:<44} {:>10} {:>11} {:>9} {:>8} {:>8} {:>6} {:>10}",
            "conns", "system", "operation", "ok/s", "attempts/s", "conflict", "p50 ms", "p99 ms", "errors", "srv µs/op"
        );
    } else {
        println!(
            "{:>5}  {:<12} {:<44} {:>10} {:>8} {:>8} {:>6} {:>10}",
            "conns", "system", "operation", "ops/s", "p50 ms", "p99 ms", "errors", "srv µs/op"
        );
    }
    for &connections in workload.connections() {
        let group: Vec<&&RunResult> = rows.iter().filter(|r| r.connections == connections).collect();
        for r in &group {
            if contended {
                println!(
                    "{:>5}  {:<12} {:<44} {:>10} {:>11} {:>8.1}% {:>8.3} {:>8.3} {:>6} {:>10}",
                    r.connections,
                    r.system.name(),
                    r.operation,
                    thousands(r.ops_per_s),
                    thousands(r.attempts_per_s),
                    r.conflict_pct,
                    r.p50_ms,
                    r.p99_ms,
                    r.errors,
                    cpu_column(r)
                );
            } else {
                println!(
                    "{:>5}  {:<12} {:<44} {:>10} {:>8.3} {:>8.3} {:>6} {:>10}",
                    r.connections,
                    r.system.name(),
                    r.operation,
                    thousands(r.ops_per_s),
                    r.p50_ms,
                    r.p99_ms,
                    r.errors,
                    cpu_column(r)
                );
            }
        }
        let ratios: Vec<String> = COMPARISONS
            .into_iter()
            .filter_map(|(ours, peer)| {
                ratio(results, workload, ours, peer, connections)
                    .map(|x| format!("{}/{} {x:.2}x", ours.name(), peer.name()))
            })
            .collect();
        if !ratios.is_empty() {
            println!("{:>5}  ratios: {}", "", ratios.join(", "));
        }
    }
    for r in &rows {
        if !r.rounds_ops_per_s.is_empty() {
            let rounds: Vec<String> = r.rounds_ops_per_s.iter().map(|&x| thousands(x)).collect();
            println!(
                "  {} x{}: rounds {} ok/s (the median is shown)",
                r.system.name(),
                r.connections,
                rounds.join(", ")
            );
        }
        if let Some(c) = &r.commits {
            println!(
                "  {} x{}: {} group commits, {:.1} writes each, {:.2} ms each from BEGIN to COMMIT",
                r.system.name(),
                r.connections,
                thousands(c.batches as f64),
                c.mean_batch(),
                c.mean_commit_ms()
            );
        }
        if let Some(error) = &r.first_error {
            println!("  ! {} x{}: {error}", r.system.name(), r.connections);
        }
        if r.stock_ran_out {
            println!(
                "  ! {} x{}: the stock ran out during the timed run; raise --stock",
                r.system.name(),
                r.connections
            );
        }
    }
}

/// Checks this run's figures against the product's targets.
pub fn targets(results: &[RunResult]) -> Vec<TargetCheck> {
    let mut checks = Vec::new();
    let mut against_as =
        |target: String, workload: Workload, ours: System, peer: System, connections: usize, at_least: f64| {
            let involved = [ours, peer].map(|s| find(results, workload, s, connections));
            let measured = ratio(results, workload, ours, peer, connections);
            let (met, note) = if involved.iter().any(|r| r.is_some_and(|r| r.errors > 0)) {
                (None, Some("a run it rests on had errors".to_owned()))
            } else {
                match measured {
                    Some(x) => (Some(x >= at_least), None),
                    None => (None, Some("not measured in this run".to_owned())),
                }
            };
            checks.push(TargetCheck { target, measured, unit: "x", met, note });
        };
    let mut against = |target: String, workload: Workload, peer: System, connections: usize, at_least: f64| {
        against_as(target, workload, System::Gapguard, peer, connections, at_least)
    };
    for connections in [16, 64] {
        against(
            format!("durable puts x{connections}: gapguard >= 3x etcd"),
            Workload::Puts,
            System::Etcd,
            connections,
            3.0,
        );
    }
    against(
        "check -> act x16, successful decrements/s: gapguard >= 20x etcd".to_owned(),
        Workload::CheckAct,
        System::Etcd,
        16,
        20.0,
    );
    for connections in [1, 16, 64] {
        against(
            format!("durable puts x{connections}: gapguard >= 1.0x Redis (appendfsync always)"),
            Workload::Puts,
            System::Redis,
            connections,
            1.0,
        );
    }
    against(
        "conditional decrement x16: gapguard >= 1.0x Redis (Lua, appendfsync always)".to_owned(),
        Workload::Decrement,
        System::Redis,
        16,
        1.0,
    );
    for connections in [16, 64] {
        against(
            format!("reserve -> commit x{connections}, pairs/s: gapguard >= 20x etcd (CAS decrement)"),
            Workload::Reserve,
            System::Etcd,
            connections,
            20.0,
        );
        against(
            format!("reserve -> commit x{connections}, pairs/s: gapguard >= 3x PostgreSQL (UPDATE)"),
            Workload::Reserve,
            System::Postgres,
            connections,
            3.0,
        );
    }
    // Issue 6: gapguard on PostgreSQL adds tickets, audit and idempotency to the database's
    // own conditional UPDATE and must keep at least half its throughput.
    for connections in [16, 64] {
        for ours in [System::GapguardPg1, System::GapguardPg3] {
            let nodes = ours.pg_nodes().unwrap_or(0);
            against_as(
                format!(
                    "hot-key decrement x{connections}: gapguard-pg ({nodes} node{}) >= 0.5x pgbench UPDATE",
                    if nodes == 1 { "" } else { "s" }
                ),
                Workload::Decrement,
                ours,
                System::Pgbench,
                connections,
                0.5,
            );
        }
    }
    // The latency target is per request; a reserve -> commit pair is two, so it has none.
    for workload in Workload::ALL.into_iter().filter(|&w| w != Workload::Reserve) {
        let run = find(results, workload, System::Gapguard, 16);
        let (measured, met, note) = match run {
            None => (None, None, Some("not measured in this run".to_owned())),
            Some(r) if r.errors > 0 => (Some(r.p99_ms), None, Some("the run had errors".to_owned())),
            Some(r) => (Some(r.p99_ms), Some(r.p99_ms < 5.0), None),
        };
        checks.push(TargetCheck {
            target: format!("{} x16: gapguard p99 < 5 ms", workload.name()),
            measured,
            unit: "ms",
            met,
            note,
        });
    }
    checks
}

/// Prints the targets, each marked met / NOT MET / n/a.
pub fn print_targets(targets: &[TargetCheck]) {
    println!();
    println!("== targets ==");
    for t in targets {
        let measured = match (t.measured, t.unit) {
            (Some(v), "ms") => format!("{v:.3} ms"),
            (Some(v), "%") => format!("{v:.1} %"),
            (Some(v), _) => format!("{v:.2}x"),
            (None, _) => "-".to_owned(),
        };
        let verdict = match t.met {
            Some(true) => "met".to_owned(),
            Some(false) => "NOT MET".to_owned(),
            None => format!("n/a ({})", t.note.as_deref().unwrap_or("")),
        };
        println!("  {:<72} {:>10}  {verdict}", t.target, measured);
    }
}

/// Prints every no-oversell check with PASS / FAIL.
pub fn print_verifications(verifications: &[Verification]) {
    if verifications.is_empty() {
        return;
    }
    println!();
    println!("== no-oversell verification ==");
    for v in verifications {
        let final_stock = v.final_stock.map_or_else(|| "?".to_owned(), |n| n.to_string());
        let pool = v.pool.map(|p| format!("  pool used {} reserved {}", p.used, p.reserved)).unwrap_or_default();
        println!(
            "  {:<4} {:<10} {:<12} {:<16} initial {:>10}  {:<10} {:>10}  final {:>10}{pool}{}",
            if v.pass { "PASS" } else { "FAIL" },
            v.workload.name(),
            v.system.name(),
            v.kind,
            v.initial_stock,
            v.workload.unit(),
            v.successes,
            final_stock,
            v.detail.as_ref().map(|d| format!("  ({d})")).unwrap_or_default()
        );
    }
}

/// `12345.6` as `12,346`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{thousands, RunResult};
    use crate::workload::{System, Workload};

    fn run(ops_per_s: f64, errors: u64) -> RunResult {
        let failure = anyhow::anyhow!("refused");
        let mut r = RunResult::failed(Workload::Puts, System::Gapguard, 16, &failure);
        (r.ops_per_s, r.errors) = (ops_per_s, errors);
        r
    }

    #[test]
    fn the_median_round_is_reported_unless_a_round_failed() {
        assert!(RunResult::median_of(Vec::new()).is_none());
        let one = RunResult::median_of(vec![run(5.0, 0)]).unwrap();
        assert_eq!((one.ops_per_s, one.rounds_ops_per_s.len()), (5.0, 0));
        let three = RunResult::median_of(vec![run(30.0, 0), run(10.0, 0), run(20.0, 0)]).unwrap();
        assert_eq!(three.ops_per_s, 20.0);
        assert_eq!(three.rounds_ops_per_s, [30.0, 10.0, 20.0], "every round, in the order run");
        let four = RunResult::median_of(vec![run(40.0, 0), run(10.0, 0), run(30.0, 0), run(20.0, 0)]).unwrap();
        assert_eq!(four.ops_per_s, 20.0, "the lower middle of an even count");
        let failed = RunResult::median_of(vec![run(30.0, 0), run(10.0, 1), run(20.0, 0)]).unwrap();
        assert_eq!((failed.ops_per_s, failed.errors), (10.0, 1), "a failed round shows");
    }

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1000.0), "1,000");
        assert_eq!(thousands(1234567.8), "1,234,568");
    }
}
