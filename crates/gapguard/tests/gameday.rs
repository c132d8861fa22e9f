//! `gapguard gameday` against the real binary: every scenario breaks naive and holds guarded,
//! the JSON report says what the table says, the crash fault really kills and restarts the
//! server (and the guarded invariants hold across it), network faults are injected, a running
//! server can be played against with `--url`, and bad input is a usage error.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Output};

use serde_json::Value;
use support::Server;

/// Runs `gapguard gameday ARGS --report FILE` and returns its output and the JSON report.
fn gameday(args: &[&str]) -> (Output, Value) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let report = dir.path().join("report.json");
    let html = dir.path().join("report.html");
    let output = Command::new(env!("CARGO_BIN_EXE_gapguard"))
        .arg("gameday")
        .args(args)
        .arg("--report")
        .arg(&report)
        .arg("--html")
        .arg(&html)
        .env_remove("GAPGUARD_URL")
        .output()
        .expect("run gapguard gameday");
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = std::fs::read_to_string(&report)
        .unwrap_or_else(|e| panic!("no JSON report ({e}); exit {:?}, stderr: {stderr}", output.status.code()));
    let page = std::fs::read_to_string(&html).expect("an HTML report");
    assert!(page.starts_with("<!DOCTYPE html>") && page.contains("<svg"), "the HTML report has its charts");
    assert!(!page.contains("http://") || page.contains("xmlns=\"http://www.w3.org/2000/svg\""), "no external resource");
    (output, serde_json::from_str(&text).expect("the report is JSON"))
}

/// The rows of the printed table: (scenario, mode) → the columns after them.
fn table(stdout: &str) -> BTreeMap<(String, String), Vec<String>> {
    let mut lines = stdout.lines();
    let header = lines.next().expect("a header line");
    assert!(header.starts_with("scenario") && header.contains("violations"), "header: {header}");
    lines
        .take_while(|line| !line.trim().is_empty())
        .map(|line| {
            let mut words = line.split_whitespace().map(str::to_owned);
            let key = (words.next().unwrap(), words.next().unwrap());
            (key, words.collect())
        })
        .collect()
}

fn refused_summary(run: &Value) -> String {
    let refused = run["refused"].as_object().expect("refused is an object");
    if refused.is_empty() {
        return "-".into();
    }
    refused.iter().map(|(reason, n)| format!("{reason}={n}")).collect::<Vec<_>>().join(", ")
}

/// Each scenario's naive run violated its invariant and its guarded run did not, and every
/// number of the table is the JSON report's.
fn assert_proved_and_table_matches(output: &Output, report: &Value, scenarios: &[&str]) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let rows = table(&stdout);
    let reported: Vec<&str> =
        report["scenarios"].as_array().unwrap().iter().map(|s| s["scenario"].as_str().unwrap()).collect();
    assert_eq!(reported, scenarios, "stdout:\n{stdout}");
    assert_eq!(rows.len(), scenarios.len() * 2, "stdout:\n{stdout}");
    for scenario in report["scenarios"].as_array().unwrap() {
        let name = scenario["scenario"].as_str().unwrap();
        for mode in ["naive", "guarded"] {
            let run = &scenario[mode];
            let violations = run["violations"].as_u64().unwrap();
            match mode {
                "naive" => assert!(violations > 0, "{name} naive showed no violation:\n{stdout}\n{stderr}"),
                _ => {
                    assert_eq!(violations, 0, "{name} guarded violated its invariant: {:#}\n{stdout}", run["examples"])
                }
            }
            assert!(run["attempted"].as_u64().unwrap() > 0, "{name} {mode} attempted nothing");
            let row = &rows[&(name.to_owned(), mode.to_owned())];
            let expected = [
                run["attempted"].to_string(),
                run["committed"].to_string(),
                run["violations"].to_string(),
                format!("{:.1}", run["check_to_use_ms"]["p50"].as_f64().unwrap()),
                format!("{:.1}", run["check_to_use_ms"]["p99"].as_f64().unwrap()),
            ];
            assert_eq!(row[..5], expected, "{name} {mode}: table {row:?} vs JSON");
            assert_eq!(row[5..].join(" "), refused_summary(run), "{name} {mode}: refusals");
            if violations > 0 {
                let first = &run["examples"][0]["correlation_id"];
                assert!(stdout.contains(&format!("{name} {mode}: {}", first.as_str().unwrap())), "examples printed");
            }
        }
    }
    assert_eq!(report["verdict"]["passed"], true);
    assert!(stdout.contains("verdict: PASS"), "{stdout}");
    assert_eq!(output.status.code(), Some(0), "stderr: {stderr}");
}

#[test]
fn every_scenario_breaks_naive_and_holds_guarded_and_the_json_matches_the_table() {
    let (output, report) = gameday(&["--quick", "--seed", "7"]);
    let all = ["inventory", "quota", "revocation", "lease", "retry", "cache", "deploy"];
    assert_proved_and_table_matches(&output, &report, &all);
    assert_eq!(report["seed"], 7);
    assert_eq!(report["duration_s"], 1.0);
    // The quota scenario crashed provisioners and the guarded reconciler cleaned up after them.
    let quota = &report["scenarios"][1];
    assert!(quota["naive"]["crashed"].as_u64().unwrap() > 0, "{:#}", quota["naive"]);
    for tenant in quota["guarded"]["final_state"].as_object().unwrap().values() {
        assert_eq!(tenant["building"], 0, "{tenant}");
        assert_eq!(tenant["pool"]["reserved"], 0, "{tenant}");
    }
}

#[test]
fn the_crash_fault_kills_and_restarts_the_server_and_guarded_invariants_hold_across_it() {
    let scenarios = ["inventory", "quota", "lease"];
    let (output, report) = gameday(&["--scenario", "inventory,quota,lease", "--duration", "2", "--crashes", "2"]);
    assert_proved_and_table_matches(&output, &report, &scenarios);
    assert_eq!(report["crashes_per_run"], 2);
    let mut pids = Vec::new();
    for scenario in report["scenarios"].as_array().unwrap() {
        for mode in ["naive", "guarded"] {
            let restarts = scenario[mode]["restarts"].as_array().unwrap();
            assert_eq!(restarts.len(), 2, "{} {mode}: {restarts:?}", scenario["scenario"]);
            for restart in restarts {
                let killed = restart["killed_pid"].as_u64().expect("a killed pid");
                let started = restart["started_pid"].as_u64().expect("a started pid");
                assert_ne!(killed, started);
                // The printed report names the same restart, for a person.
                let line = format!("pid {killed} -> {started} in ");
                assert!(String::from_utf8_lossy(&output.stdout).contains(&line), "no {line:?} in the text report");
                pids.extend([killed, started]);
                // SIGKILL: the process is gone (and reaped), not merely disconnected.
                assert!(!std::path::Path::new(&format!("/proc/{killed}")).exists(), "pid {killed} still exists");
            }
        }
    }
    // Every restart's new server is the one the next crash kills: one chain of processes.
    for pair in pids[1..].chunks(2).filter(|p| p.len() == 2) {
        assert_eq!(pair[0], pair[1], "the restarted server is the next one killed: {pids:?}");
    }
}

#[test]
fn network_faults_lose_answers_and_the_guarded_runs_still_hold() {
    let (output, report) = gameday(&[
        "--scenario",
        "retry,deploy",
        "--quick",
        "--net",
        "latency=1ms,jitter=2ms,reset=0.05,timeout=0.02,timeout_after=100ms",
    ]);
    assert_proved_and_table_matches(&output, &report, &["retry", "deploy"]);
    let mut resets = 0;
    for scenario in report["scenarios"].as_array().unwrap() {
        for mode in ["naive", "guarded"] {
            let network = &scenario[mode]["network"];
            assert!(network["connections"].as_u64().unwrap() > 0, "{network}");
            resets += network["resets"].as_u64().unwrap() + network["timeouts"].as_u64().unwrap();
        }
    }
    assert!(resets > 0, "the proxy dropped nothing: {report:#}");
    assert!(report["network"].as_str().unwrap().contains("reset=0.05"));
}

#[test]
fn a_running_server_can_be_played_against_with_url() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path());
    let (output, report) = gameday(&["--url", &server.url, "--scenario", "lease,cache", "--quick", "--actors", "4"]);
    assert_proved_and_table_matches(&output, &report, &["lease", "cache"]);
    assert_eq!(report["target"], server.url.as_str());
}

#[test]
fn an_unreachable_url_fails_at_once_saying_so() {
    // Nothing listens on the discard port: the connection is refused at once.
    let started = std::time::Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_gapguard"))
        .args(["gameday", "--url", "http://127.0.0.1:9", "--quick"])
        .env_remove("GAPGUARD_URL")
        .output()
        .expect("run gapguard gameday");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("reaching http://127.0.0.1:9"), "{stderr}");
    // Before any scenario's setup and its retries (which took 30 s).
    assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
}

#[test]
fn bad_input_is_a_usage_error_with_a_clear_message() {
    for (args, needle) in [
        (&["--scenario", "oversell"][..], "unknown scenario \"oversell\""),
        (&["--delay", "gauss:20ms"][..], "unknown distribution"),
        (&["--delay", "20"][..], "needs a unit"),
        (&["--net", "reset=2"][..], "probability"),
        (&["--actors", "0"][..], "actors must be 1 to"),
        (&["--url", "http://127.0.0.1:9", "--crashes", "1"][..], "crash faults need the embedded server"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_gapguard"))
            .arg("gameday")
            .args(args)
            .env_remove("GAPGUARD_URL")
            .output()
            .expect("run gapguard gameday");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
}
