//! `gapguard rules` as a user runs it: the real binary writes the files, the real `promtool`
//! (Debian package `prometheus`) checks the rules and runs unit tests of them on synthetic
//! series, and the dashboards parse as JSON.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const CONFIG: &str = r#"
[[flow]]
name = "checkout"
check_to_use_p99_ms = 500
correctness_objective = 0.9999

[[flow]]
name = "provision-vm"
check_to_use_p99_ms = 2000

[[flow]]
name = "plain"
"#;

/// Runs `gapguard rules` on [`CONFIG`] into `out`.
fn generate(out: &Path) {
    let config = out.join("gapguard.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_gapguard"))
        .args(["rules", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run gapguard rules");
    assert!(output.status.success(), "gapguard rules failed: {}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 4, "one line per file written: {stdout}");
}

/// Runs `promtool ARGS` in `dir`; panics with how to install it if it is missing.
fn promtool(dir: &Path, args: &[&str]) -> String {
    let output = match Command::new("promtool").args(args).current_dir(dir).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed, and this test needs the real one: install the Prometheus tools \
             (`sudo apt-get install prometheus` on Debian/Ubuntu, which provides /usr/bin/promtool; \
             scripts/test.sh does it when run as root)"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "promtool {} failed:\n{text}", args.join(" "));
    text
}

#[test]
fn promtool_accepts_the_generated_rules() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path());
    let text = promtool(dir.path(), &["check", "rules", "gapguard-rules.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
}

#[test]
fn the_dashboards_are_json_grafana_can_import() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path());
    for name in ["executive", "oncall", "debug"] {
        let path = dir.path().join(format!("dashboards/gapguard-{name}.json"));
        let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap())
            .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
        assert_eq!(dashboard["uid"], format!("gapguard-{name}"));
        assert!(!dashboard["panels"].as_array().unwrap().is_empty());
        let flows = dashboard["templating"]["list"][1]["query"].as_str().unwrap();
        assert_eq!(flows, "checkout,provision-vm,plain,other", "the configured flows are the choices");
    }
}

/// Unit tests of the rules on synthetic series (`promtool test rules`): the recorded SLIs
/// have the values the definitions give, and the page alerts fire when, and only when, the
/// burn rate is over 14.4.
#[test]
fn the_rules_record_the_slis_and_page_on_a_fast_burn() {
    let dir = tempfile::tempdir().unwrap();
    generate(dir.path());
    // Every minute: checkout commits 10 acts and finds 10 checks stale (error ratio 0.5);
    // its gaps: 8 of 10 within 0.5 s (latency error ratio 0.2 > 14.4 × 0.01). provision-vm's
    // gaps are all within 2 s (le spelled `2.0`, as prometheus-client does), and it has no
    // correctness objective.
    let tests = r#"
rule_files: [gapguard-rules.yml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'gapguard_acts_total{namespace="shop",flow="checkout",result="committed"}'
        values: '0+10x90'
      - series: 'gapguard_acts_total{namespace="shop",flow="checkout",result="stale_check"}'
        values: '0+10x90'
      - series: 'gapguard_acts_total{namespace="shop",flow="checkout",result="condition_failed"}'
        values: '0+1000x90'
      - series: 'gapguard_check_to_use_seconds_bucket{namespace="shop",flow="checkout",outcome="committed",le="0.5"}'
        values: '0+8x90'
      - series: 'gapguard_check_to_use_seconds_bucket{namespace="shop",flow="checkout",outcome="committed",le="+Inf"}'
        values: '0+10x90'
      - series: 'gapguard_check_to_use_seconds_count{namespace="shop",flow="checkout",outcome="committed"}'
        values: '0+10x90'
      - series: 'gapguard_check_to_use_seconds_bucket{namespace="shop",flow="provision-vm",outcome="committed",le="2.0"}'
        values: '0+5x90'
      - series: 'gapguard_check_to_use_seconds_count{namespace="shop",flow="provision-vm",outcome="committed"}'
        values: '0+5x90'
    promql_expr_test:
      - expr: flow:gapguard_correctness_sli:rate5m
        eval_time: 30m
        exp_samples:
          - labels: 'flow:gapguard_correctness_sli:rate5m{flow="checkout"}'
            value: 0.5
      - expr: flow:gapguard_latency_sli:rate1h
        eval_time: 80m
        exp_samples:
          - labels: 'flow:gapguard_latency_sli:rate1h{flow="checkout"}'
            value: 0.8
          - labels: 'flow:gapguard_latency_sli:rate1h{flow="provision-vm"}'
            value: 1
      - expr: ALERTS{alertstate="firing",severity="page"}
        eval_time: 80m
        exp_samples:
          - labels: 'ALERTS{alertname="GapguardFlowCorrectnessBurnRatePage",alertstate="firing",flow="checkout",severity="page",slo="correctness"}'
            value: 1
          - labels: 'ALERTS{alertname="GapguardFlowLatencyBurnRatePage",alertstate="firing",flow="checkout",severity="page",slo="latency"}'
            value: 1
  # Healthy: no stale checks, every gap within its bound; many refusals for other reasons
  # (not part of the correctness SLI). Nothing fires.
  - interval: 1m
    input_series:
      - series: 'gapguard_acts_total{namespace="shop",flow="checkout",result="committed"}'
        values: '0+10x90'
      - series: 'gapguard_acts_total{namespace="shop",flow="checkout",result="ticket_expired"}'
        values: '0+1000x90'
      - series: 'gapguard_check_to_use_seconds_bucket{namespace="shop",flow="checkout",outcome="committed",le="0.5"}'
        values: '0+10x90'
      - series: 'gapguard_check_to_use_seconds_count{namespace="shop",flow="checkout",outcome="committed"}'
        values: '0+10x90'
    promql_expr_test:
      - expr: flow:gapguard_correctness_sli:rate1h
        eval_time: 80m
        exp_samples:
          - labels: 'flow:gapguard_correctness_sli:rate1h{flow="checkout"}'
            value: 1
      - expr: ALERTS
        eval_time: 80m
        exp_samples: []
"#;
    std::fs::write(dir.path().join("gapguard-rules.test.yml"), tests).unwrap();
    let text = promtool(dir.path(), &["test", "rules", "gapguard-rules.test.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
}
