//! The results: per scenario and mode, operations attempted and committed, violations with
//! their first examples, refusals by reason, the check-to-use gap; rendered as a table for the
//! terminal, JSON and a self-contained HTML page with inline SVG charts.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;
use serde_json::Value;

use crate::history::{OpRecord, Outcome};
use crate::judge::{Judgement, Violation};
use crate::proxy::ProxyStats;
use crate::{Mode, Scenario};

/// Violations quoted per run.
pub const EXAMPLES_MAX: usize = 5;

/// The whole gameday.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The seed of every random choice.
    pub seed: u64,
    /// Main actors per run.
    pub actors: usize,
    /// Seconds each mode of each scenario ran.
    pub duration_s: f64,
    /// The delay distribution between check and use.
    pub delay: String,
    /// `embedded` or the URL played against.
    pub target: String,
    /// `kill -9` restarts per run.
    pub crashes_per_run: u32,
    /// The proxy's toxics, if any.
    pub network: Option<String>,
    /// One entry per scenario, in the order run.
    pub scenarios: Vec<ScenarioReport>,
    /// Whether the gameday passed.
    pub verdict: Verdict,
}

/// The verdict of the gameday: every naive run violated its invariant and no guarded run did.
#[derive(Clone, Debug, Serialize)]
pub struct Verdict {
    /// True when nothing below is wrong.
    pub passed: bool,
    /// Each guarded run that violated its invariant, and each naive run that proved nothing.
    pub problems: Vec<String>,
}

/// One scenario, both modes.
#[derive(Clone, Debug, Serialize)]
pub struct ScenarioReport {
    /// The scenario.
    pub scenario: Scenario,
    /// Its invariant.
    pub invariant: &'static str,
    /// What the guarded mode uses.
    pub guard: &'static str,
    /// The naive run.
    pub naive: ModeReport,
    /// The guarded run.
    pub guarded: ModeReport,
}

/// One run of one scenario.
#[derive(Clone, Debug, Serialize)]
pub struct ModeReport {
    /// The mode.
    pub mode: Mode,
    /// The namespace it ran in (its audit log is there to read).
    pub namespace: String,
    /// Main operations started (buys, provisions, exports…).
    pub attempted: u64,
    /// Main operations whose write was applied.
    pub committed: u64,
    /// Invariant violations found.
    pub violations: u64,
    /// The first few, with the correlation id of the operation at fault.
    pub examples: Vec<Violation>,
    /// Main operations refused, by reason (the server's code, or the actor's own check).
    pub refused: BTreeMap<String, u64>,
    /// Main operations that crashed mid-way (a scheduled fault).
    pub crashed: u64,
    /// Main operations that got no answer and were not applied.
    pub failed: u64,
    /// Operations whose answer was lost but that the audit log shows applied.
    pub resolved_from_audit: u64,
    /// The gap between check and use of main operations that got as far as their use.
    pub check_to_use_ms: Latency,
    /// Every operation recorded (adversaries and helpers included).
    pub history_ops: u64,
    /// `kill -9` restarts of the embedded server during the run.
    pub restarts: Vec<RestartReport>,
    /// What the proxy did, when it had toxics.
    pub network: Option<ProxyStats>,
    /// The final state read back from the server, as the scenario summarises it.
    pub final_state: Value,
    /// Observations that are not violations.
    pub notes: Vec<String>,
}

/// A latency distribution, in ms.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// One crash fault.
#[derive(Clone, Debug, Serialize)]
pub struct RestartReport {
    /// When the kill happened, ms since the run started.
    pub at_ms: f64,
    /// The pid that got SIGKILL.
    pub killed_pid: Option<u32>,
    /// The pid of the restarted server.
    pub started_pid: Option<u32>,
    /// From the kill to the new server listening.
    pub restart_ms: f64,
}

impl Latency {
    /// The distribution of `samples_ms` (hdrhistogram, microsecond resolution, 3 significant digits).
    pub fn of(samples_ms: impl IntoIterator<Item = f64>) -> Self {
        let mut histogram =
            hdrhistogram::Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds");
        for ms in samples_ms {
            histogram.saturating_record((ms * 1000.0).round().max(1.0) as u64);
        }
        if histogram.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| (us as f64 / 10.0).round() / 100.0;
        Self {
            count: histogram.len(),
            p50: ms(histogram.value_at_quantile(0.5)),
            p99: ms(histogram.value_at_quantile(0.99)),
            max: ms(histogram.max()),
        }
    }
}

/// What a run produced, to be made into a [`ModeReport`].
pub(crate) struct RunResult {
    pub mode: Mode,
    pub namespace: String,
    pub ops: Vec<OpRecord>,
    pub main_kinds: &'static [&'static str],
    pub resolved_from_audit: usize,
    pub judgement: Judgement,
    pub restarts: Vec<RestartReport>,
    pub network: Option<ProxyStats>,
}

impl ModeReport {
    pub(crate) fn build(run: RunResult) -> Self {
        let main: Vec<&OpRecord> = run.ops.iter().filter(|op| run.main_kinds.contains(&op.kind)).collect();
        let mut refused = BTreeMap::new();
        let (mut committed, mut crashed, mut failed) = (0, 0, 0);
        for op in &main {
            match &op.outcome {
                Outcome::Committed { .. } | Outcome::Replayed { .. } => committed += 1,
                Outcome::Refused { reason } => *refused.entry(reason.clone()).or_insert(0) += 1,
                Outcome::Crashed { .. } => crashed += 1,
                Outcome::Failed { .. } => failed += 1,
            }
        }
        Self {
            mode: run.mode,
            namespace: run.namespace,
            attempted: main.len() as u64,
            committed,
            violations: run.judgement.violations.len() as u64,
            examples: run.judgement.violations.iter().take(EXAMPLES_MAX).cloned().collect(),
            refused,
            crashed,
            failed,
            resolved_from_audit: run.resolved_from_audit as u64,
            // A retry's gap runs from its request's check to the retry's use.
            check_to_use_ms: Latency::of(
                run.ops
                    .iter()
                    .filter(|op| run.main_kinds.contains(&op.kind) || op.kind == "retry")
                    .filter_map(|op| op.check_to_use_ms()),
            ),
            history_ops: run.ops.len() as u64,
            restarts: run.restarts,
            network: run.network,
            final_state: run.judgement.final_state,
            notes: run.judgement.notes,
        }
    }

    /// Refusals as `reason=n, …` (`-` when none).
    pub fn refused_summary(&self) -> String {
        if self.refused.is_empty() {
            return "-".into();
        }
        self.refused.iter().map(|(reason, n)| format!("{reason}={n}")).collect::<Vec<_>>().join(", ")
    }
}

impl Report {
    /// Builds the verdict from the scenarios: a guarded violation fails the gameday, and so
    /// does a naive run without one (it proved nothing).
    pub fn judge(&mut self) {
        let mut problems = Vec::new();
        for scenario in &self.scenarios {
            if scenario.guarded.violations > 0 {
                problems.push(format!(
                    "{}: the guarded run violated its invariant {} times ({})",
                    scenario.scenario, scenario.guarded.violations, scenario.invariant
                ));
            }
            if scenario.naive.violations == 0 {
                problems.push(format!(
                    "{}: the naive run showed no violation, so it proves nothing here; try a larger --delay or more --actors",
                    scenario.scenario
                ));
            }
        }
        self.verdict = Verdict { passed: problems.is_empty(), problems };
    }

    /// The table printed at the end of a gameday (the JSON report has the same numbers).
    pub fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<11} {:<8} {:>9} {:>9} {:>10} {:>9} {:>9}  refused",
            "scenario", "mode", "attempted", "committed", "violations", "p50_ms", "p99_ms"
        );
        for scenario in &self.scenarios {
            for run in [&scenario.naive, &scenario.guarded] {
                let _ = writeln!(
                    out,
                    "{:<11} {:<8} {:>9} {:>9} {:>10} {:>9.1} {:>9.1}  {}",
                    scenario.scenario.name(),
                    run.mode.name(),
                    run.attempted,
                    run.committed,
                    run.violations,
                    run.check_to_use_ms.p50,
                    run.check_to_use_ms.p99,
                    run.refused_summary()
                );
            }
        }
        let _ = writeln!(out);
        for scenario in &self.scenarios {
            for run in [&scenario.naive, &scenario.guarded] {
                for example in &run.examples {
                    let id = if example.correlation_id.is_empty() { "-" } else { &example.correlation_id };
                    let _ = writeln!(out, "  {} {}: {id}: {}", scenario.scenario, run.mode, example.what);
                }
                if !run.restarts.is_empty() {
                    let restarts: Vec<String> = run
                        .restarts
                        .iter()
                        .map(|r| {
                            let pid = |p: Option<u32>| p.map_or_else(|| "?".to_owned(), |p| p.to_string());
                            format!("pid {} -> {} in {:.0} ms", pid(r.killed_pid), pid(r.started_pid), r.restart_ms)
                        })
                        .collect();
                    let _ = writeln!(out, "  {} {}: kill -9: {}", scenario.scenario, run.mode, restarts.join(", "));
                }
            }
        }
        let _ = writeln!(out);
        if self.verdict.passed {
            let _ = writeln!(
                out,
                "verdict: PASS: every naive run broke its invariant, no guarded run did ({} scenarios)",
                self.scenarios.len()
            );
        } else {
            let _ = writeln!(out, "verdict: FAIL");
            for problem in &self.verdict.problems {
                let _ = writeln!(out, "  {problem}");
            }
        }
        out
    }

    /// The JSON report.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serializes")
    }

    /// A self-contained HTML page: the settings, the table, and SVG charts of the
    /// check-to-use gap (p50 and p99) and of the violations, per scenario and mode.
    pub fn to_html(&self) -> String {
        let mut rows = String::new();
        for scenario in &self.scenarios {
            for run in [&scenario.naive, &scenario.guarded] {
                let bad = match run.mode {
                    Mode::Naive => run.violations == 0,
                    Mode::Guarded => run.violations > 0,
                };
                let examples: Vec<String> = run
                    .examples
                    .iter()
                    .map(|v| format!("<code>{}</code> {}", escape(&v.correlation_id), escape(&v.what)))
                    .collect();
                let _ = writeln!(
                    rows,
                    "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{}</td><td>{}</td></tr>",
                    if bad { "bad" } else { "ok" },
                    scenario.scenario,
                    run.mode,
                    run.attempted,
                    run.committed,
                    run.violations,
                    run.check_to_use_ms.p50,
                    run.check_to_use_ms.p99,
                    escape(&run.refused_summary()),
                    examples.join("<br>")
                );
            }
        }
        let latency = self.chart("check-to-use gap (ms): p50 solid, p99 light", |run| {
            (run.check_to_use_ms.p50, run.check_to_use_ms.p99)
        });
        let violations = self.chart("invariant violations", |run| (run.violations as f64, run.violations as f64));
        let verdict = if self.verdict.passed {
            "<p class=\"ok\">PASS: every naive run broke its invariant, no guarded run did.</p>".to_owned()
        } else {
            let problems: Vec<String> =
                self.verdict.problems.iter().map(|p| format!("<li>{}</li>", escape(p))).collect();
            format!("<p class=\"bad\">FAIL</p><ul>{}</ul>", problems.join(""))
        };
        let invariants: Vec<String> = self
            .scenarios
            .iter()
            .map(|s| {
                format!("<li><b>{}</b>: {}; guarded with {}</li>", s.scenario, escape(s.invariant), escape(s.guard))
            })
            .collect();
        format!(
            r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gapguard gameday</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; vertical-align: top; }}
td:nth-child(-n+2), td:last-child, td:nth-last-child(2) {{ text-align: left; }}
tr.bad td {{ background: #fde2e2; }}
p.ok {{ color: #17662a; font-weight: bold; }} p.bad {{ color: #a11; font-weight: bold; }}
code {{ font-size: 12px; }} svg {{ margin: 1em 0; }}
</style></head><body>
<h1>gapguard gameday</h1>
<p>seed {seed}, {actors} actors, {duration} s per run, delay {delay}, target {target}, kill -9 per run: {crashes}, network: {network}</p>
{verdict}
<ul>{invariants}</ul>
<table><tr><th>scenario</th><th>mode</th><th>attempted</th><th>committed</th><th>violations</th><th>p50 ms</th><th>p99 ms</th><th>refused</th><th>first violations</th></tr>
{rows}</table>
{latency}
{violations}
</body></html>
"#,
            seed = self.seed,
            actors = self.actors,
            duration = self.duration_s,
            delay = escape(&self.delay),
            target = escape(&self.target),
            crashes = self.crashes_per_run,
            network = escape(self.network.as_deref().unwrap_or("none")),
            invariants = invariants.join(""),
        )
    }

    /// A grouped bar chart: per scenario, a naive (red) and a guarded (green) bar; `value`
    /// gives the solid and the light (taller) height of a run's bar.
    fn chart(&self, title: &str, value: impl Fn(&ModeReport) -> (f64, f64)) -> String {
        const WIDTH: f64 = 760.0;
        const HEIGHT: f64 = 220.0;
        const LEFT: f64 = 50.0;
        const BOTTOM: f64 = 30.0;
        let max = self
            .scenarios
            .iter()
            .flat_map(|s| [value(&s.naive).1, value(&s.guarded).1])
            .fold(0.0_f64, f64::max)
            .max(1.0);
        let group = (WIDTH - LEFT) / self.scenarios.len().max(1) as f64;
        let bar = group * 0.35;
        let scale = |v: f64| v / max * (HEIGHT - BOTTOM - 20.0);
        let mut svg = format!(
            "<h2>{}</h2>\n<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" font-size=\"11\">\n",
            escape(title)
        );
        let base = HEIGHT - BOTTOM;
        let _ = writeln!(svg, "<line x1=\"{LEFT}\" y1=\"{base}\" x2=\"{WIDTH}\" y2=\"{base}\" stroke=\"#888\"/>");
        let _ = writeln!(svg, "<text x=\"4\" y=\"20\">{}</text>", fmt_number(max));
        for (idx, scenario) in self.scenarios.iter().enumerate() {
            let x0 = LEFT + idx as f64 * group + group * 0.1;
            for (slot, run, color, light) in
                [(0.0, &scenario.naive, "#c0392b", "#f1a9a0"), (1.0, &scenario.guarded, "#1e8449", "#a9dfbf")]
            {
                let (solid, tall) = value(run);
                let x = x0 + slot * bar;
                for (height, fill) in [(scale(tall), light), (scale(solid), color)] {
                    let _ = writeln!(
                        svg,
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{height:.1}\" fill=\"{fill}\"><title>{} {}: {}</title></rect>",
                        base - height,
                        bar * 0.9,
                        scenario.scenario,
                        run.mode,
                        fmt_number(tall)
                    );
                }
                let _ = writeln!(
                    svg,
                    "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                    x + bar * 0.45,
                    base - scale(tall) - 3.0,
                    fmt_number(tall)
                );
            }
            let _ = writeln!(
                svg,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
                x0 + bar,
                HEIGHT - 10.0,
                scenario.scenario
            );
        }
        let _ = writeln!(
            svg,
            "<rect x=\"{}\" y=\"4\" width=\"10\" height=\"10\" fill=\"#c0392b\"/><text x=\"{}\" y=\"13\">naive</text><rect x=\"{}\" y=\"4\" width=\"10\" height=\"10\" fill=\"#1e8449\"/><text x=\"{}\" y=\"13\">guarded</text>",
            WIDTH - 140.0,
            WIDTH - 126.0,
            WIDTH - 80.0,
            WIDTH - 66.0
        );
        svg.push_str("</svg>\n");
        svg
    }
}

fn fmt_number(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.1}")
    }
}

/// Escapes text for HTML.
fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_percentiles_are_in_ms() {
        let latency = Latency::of((1..=100).map(f64::from));
        assert_eq!(latency.count, 100);
        assert!((latency.p50 - 50.0).abs() < 0.1, "{latency:?}");
        assert!((latency.p99 - 99.0).abs() < 0.1, "{latency:?}");
        assert_eq!(Latency::of([]), Latency::default());
    }

    #[test]
    fn html_is_escaped() {
        assert_eq!(escape("<a href=\"x\">&</a>"), "&lt;a href=&quot;x&quot;&gt;&amp;&lt;/a&gt;");
    }
}
