//! Prometheus rules and Grafana dashboards for the flows' SLOs, generated from the config
//! (`gapguard rules`). Pure functions: flows in, file contents out; the CLI writes them.
//!
//! Two SLIs per flow, each over the windows 5m, 30m, 1h, 6h and 3d, summed over namespaces:
//!
//! - **correctness** — the fraction of acts whose check still held at use:
//!   `1 − rate(gapguard_acts_total{result="stale_check"}) / rate(gapguard_acts_total{result=~"committed|stale_check"})`.
//!   Acts refused for other reasons (`condition_failed` on the act's own conditions,
//!   `ticket_expired`, `ticket_used`, `insufficient`, …) are in neither numerator nor
//!   denominator: they say nothing about whether a check went stale. Objective: the flow's
//!   `correctness_objective`.
//! - **latency** — the fraction of check-to-use gaps (`gapguard_check_to_use_seconds`, every
//!   outcome) no longer than the flow's `check_to_use_p99_ms`, read from the histogram's `le`
//!   bucket at that bound. "p99 ≤ X" makes the objective 0.99. The histogram's buckets must
//!   contain every objective: [`check_to_use_buckets_seconds`] is the one list both the
//!   metrics and these rules use.
//!
//! Burn rate = error ratio / (1 − objective). Alerts follow the SRE workbook's multiwindow,
//! multi-burn-rate recipe: page when 14.4× over 1h and 5m, or 6× over 6h and 30m; ticket when
//! 1× over 3d and 6h. A flow without objectives gets no rules.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use serde_json::{json, Value};

use crate::config::FlowConfig;

/// The check-to-use histogram (seconds).
pub const CHECK_TO_USE_SECONDS: &str = "gapguard_check_to_use_seconds";
/// Acts by flow and result.
pub const ACTS_TOTAL: &str = "gapguard_acts_total";

/// Bucket bounds (seconds) of `gapguard_check_to_use_seconds` before the configured objectives
/// are added: 1 ms to 1 h (the longest ticket TTL).
pub const CHECK_TO_USE_BASE_BUCKETS_SECONDS: [f64; 18] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

/// Windows of every SLI, shortest first (Prometheus durations).
pub const WINDOWS: [&str; 5] = ["5m", "30m", "1h", "6h", "3d"];

/// The latency objective implied by "p99": the fraction of gaps within the bound.
pub const LATENCY_OBJECTIVE: f64 = 0.99;

/// One alert condition of the workbook: burn rate over both windows above `factor`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BurnRateWindow {
    /// Burn-rate threshold (multiple of the error budget's even spend).
    pub factor: f64,
    /// The long window (what the alert measures).
    pub long: &'static str,
    /// The short window (makes the alert reset soon after the problem stops).
    pub short: &'static str,
}

/// Page: 2 % of a 30-day budget in 1 h, or 5 % in 6 h.
pub const PAGE_WINDOWS: [BurnRateWindow; 2] = [
    BurnRateWindow { factor: 14.4, long: "1h", short: "5m" },
    BurnRateWindow { factor: 6.0, long: "6h", short: "30m" },
];
/// Ticket: 10 % of a 30-day budget in 3 days.
pub const TICKET_WINDOWS: [BurnRateWindow; 1] = [BurnRateWindow { factor: 1.0, long: "3d", short: "6h" }];

/// Options of the generated files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// Where the runbook lives; each alert's `runbook_url` is this plus `#<alert name, lowercase>`.
    pub runbook_base: String,
}

impl Default for Options {
    fn default() -> Self {
        Self { runbook_base: "docs/operations.md".into() }
    }
}

/// One generated file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GeneratedFile {
    /// Path relative to the output directory (`/`-separated).
    pub path: &'static str,
    /// Its contents.
    pub contents: String,
}

/// Flows whose objectives cannot be turned into rules.
#[derive(Debug, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum RulesError {
    /// An objective out of range.
    #[error("flow {flow:?}: {message}")]
    Objective {
        /// The flow.
        flow: String,
        /// What is wrong.
        message: String,
    },
    /// Two `[[flow]]` entries with one name (their rules would record the same series).
    #[error("flow {0:?} appears twice")]
    DuplicateFlow(String),
}

/// The bucket bounds (seconds) the metrics should give `gapguard_check_to_use_seconds`: the
/// base buckets plus every flow's latency objective, so that the `le` bucket at the objective
/// exists exactly. Sorted, without duplicates.
pub fn check_to_use_buckets_seconds(flows: &[FlowConfig]) -> Vec<f64> {
    let mut bounds: Vec<f64> = CHECK_TO_USE_BASE_BUCKETS_SECONDS.to_vec();
    bounds.extend(flows.iter().filter_map(|f| f.check_to_use_p99_ms).map(ms_to_seconds));
    bounds.sort_by(f64::total_cmp);
    bounds.dedup();
    bounds
}

/// Every file of `gapguard rules`: `gapguard-rules.yml` and the three dashboards.
pub fn generate(flows: &[FlowConfig], options: &Options) -> Result<Vec<GeneratedFile>, RulesError> {
    let groups = rule_groups(flows, options)?;
    let mut files = vec![GeneratedFile { path: "gapguard-rules.yml", contents: render_yaml(&groups) }];
    for (path, dashboard) in dashboards(flows) {
        let contents = serde_json::to_string_pretty(&dashboard).expect("a JSON value serializes") + "\n";
        files.push(GeneratedFile { path, contents });
    }
    Ok(files)
}

/// A recording or alerting rule.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    /// `record` or `alert`.
    pub kind: RuleKind,
    /// The name recorded, or the alert's name.
    pub name: String,
    /// PromQL.
    pub expr: String,
    /// Labels added to the result, in order.
    pub labels: Vec<(String, String)>,
    /// Alert annotations, in order (empty for recording rules).
    pub annotations: Vec<(String, String)>,
}

/// Whether a [`Rule`] records a series or raises an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleKind {
    /// A recording rule.
    Record,
    /// An alerting rule.
    Alert,
}

/// A rule group: one per flow with objectives.
#[derive(Clone, Debug, PartialEq)]
pub struct RuleGroup {
    /// `gapguard-flow-<name>`.
    pub name: String,
    /// Recording rules first (alerts read them).
    pub rules: Vec<Rule>,
}

/// Which SLI a rule is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Sli {
    /// Acts whose check still held.
    Correctness,
    /// Gaps within the latency objective.
    Latency,
}

impl Sli {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Sli::Correctness => "correctness",
            Sli::Latency => "latency",
        }
    }

    fn title(self) -> &'static str {
        match self {
            Sli::Correctness => "Correctness",
            Sli::Latency => "Latency",
        }
    }
}

/// `flow:gapguard_<sli>_<what>:rate<window>`, the name of a recording rule.
pub fn recorded(sli: &str, what: &str, window: &str) -> String {
    format!("flow:gapguard_{sli}_{what}:rate{window}")
}

/// The name of an alert: `GapguardFlow<Sli>BurnRate<Page|Ticket>`.
pub(crate) fn alert_name(sli: Sli, page: bool) -> String {
    format!("GapguardFlow{}BurnRate{}", sli.title(), if page { "Page" } else { "Ticket" })
}

/// The flows' objectives as the rules, the server's SLO report and the config read them: names
/// not empty and unique, `correctness_objective` strictly between 0 and 1, a latency objective
/// of at least 1 ms.
pub fn validate_flows(flows: &[FlowConfig]) -> Result<(), RulesError> {
    let mut seen = BTreeSet::new();
    for flow in flows {
        let invalid = |message: &str| RulesError::Objective { flow: flow.name.clone(), message: message.into() };
        if flow.name.is_empty() {
            return Err(invalid("name must not be empty"));
        }
        if !seen.insert(flow.name.as_str()) {
            return Err(RulesError::DuplicateFlow(flow.name.clone()));
        }
        if let Some(objective) = flow.correctness_objective.filter(|o| !(*o > 0.0 && *o < 1.0)) {
            return Err(invalid(&format!(
                "correctness_objective = {objective} must be between 0 and 1, exclusive (0.9999 is 99.99 %)"
            )));
        }
        if flow.check_to_use_p99_ms == Some(0) {
            return Err(invalid("check_to_use_p99_ms must be at least 1"));
        }
    }
    Ok(())
}

/// The rule groups of `gapguard-rules.yml`.
pub fn rule_groups(flows: &[FlowConfig], options: &Options) -> Result<Vec<RuleGroup>, RulesError> {
    validate_flows(flows)?;
    let mut groups = Vec::new();
    for flow in flows {
        let mut rules = Vec::new();
        if let Some(objective) = flow.correctness_objective {
            let selector = |result: &str| format!("{ACTS_TOTAL}{{flow={},result{result}}}", promql_str(&flow.name));
            let error_ratio = |w: &str| {
                // `or 0 * total`: a counter is exported from its first increment, so a flow that
                // never saw a stale check has no such series, and its SLI must still be 1, not absent.
                let stale = format!("sum by (flow) (rate({}[{w}]))", selector("=\"stale_check\""));
                let total = format!("sum by (flow) (rate({}[{w}]))", selector("=~\"committed|stale_check\""));
                format!("(\n  {stale}\n  or\n  0 * {total}\n)\n/\n{total}")
            };
            rules.extend(sli_rules(flow, Sli::Correctness, objective, error_ratio, options));
        }
        if let Some(ms) = flow.check_to_use_p99_ms {
            let seconds = ms_to_seconds(ms);
            let name = promql_str(&flow.name);
            let error_ratio = |w: &str| {
                format!(
                    "1 - (\n  sum by (flow) (rate({CHECK_TO_USE_SECONDS}_bucket{{flow={name},{}}}[{w}]))\n  /\n  \
                     sum by (flow) (rate({CHECK_TO_USE_SECONDS}_count{{flow={name}}}[{w}]))\n)",
                    le_matcher(seconds)
                )
            };
            rules.extend(sli_rules(flow, Sli::Latency, LATENCY_OBJECTIVE, error_ratio, options));
            rules.push(Rule {
                kind: RuleKind::Record,
                name: "flow:gapguard_latency_threshold:seconds".into(),
                expr: format!("vector({seconds})"),
                labels: vec![("flow".into(), flow.name.clone())],
                annotations: vec![],
            });
        }
        if !rules.is_empty() {
            // Recording rules first: a group evaluates its rules in order, so alerts read this round's values.
            rules.sort_by_key(|r| r.kind == RuleKind::Alert);
            groups.push(RuleGroup { name: format!("gapguard-flow-{}", flow.name), rules });
        }
    }
    Ok(groups)
}

/// The recording rules (error ratio, SLI and burn rate per window, and the objective) and the
/// two alerts of one SLI of one flow.
fn sli_rules(
    flow: &FlowConfig,
    sli: Sli,
    objective: f64,
    error_ratio: impl Fn(&str) -> String,
    options: &Options,
) -> Vec<Rule> {
    let s = sli.name();
    let flow_label = || vec![("flow".to_owned(), flow.name.clone())];
    let record = |name: String, expr: String| Rule {
        kind: RuleKind::Record,
        name,
        expr,
        labels: flow_label(),
        annotations: vec![],
    };
    let sel = format!("{{flow={}}}", promql_str(&flow.name));
    let mut rules = Vec::new();
    for w in WINDOWS {
        rules.push(record(recorded(s, "error_ratio", w), error_ratio(w)));
        rules.push(record(recorded(s, "sli", w), format!("1 - {}{sel}", recorded(s, "error_ratio", w))));
        rules.push(record(
            recorded(s, "burn_rate", w),
            format!("{}{sel} / (1 - {objective})", recorded(s, "error_ratio", w)),
        ));
    }
    rules.push(record(format!("flow:gapguard_{s}_objective:ratio"), format!("vector({objective})")));
    for page in [true, false] {
        let windows: &[BurnRateWindow] = if page { &PAGE_WINDOWS } else { &TICKET_WINDOWS };
        let expr = windows
            .iter()
            .map(|b| {
                let over =
                    |w: &str| format!("{}{sel} > ({} * (1 - {objective}))", recorded(s, "error_ratio", w), b.factor);
                format!("(\n  {}\nand\n  {}\n)", over(b.long), over(b.short))
            })
            .collect::<Vec<_>>()
            .join("\nor\n");
        let name = alert_name(sli, page);
        let spans =
            windows.iter().map(|b| format!("{}× over {} and {}", b.factor, b.long, b.short)).collect::<Vec<_>>();
        let what = match sli {
            Sli::Correctness => "acts found their check stale",
            Sli::Latency => "check-to-use gaps exceeded the latency objective",
        };
        let runbook_url = format!("{}#{}", options.runbook_base, name.to_lowercase());
        rules.push(Rule {
            kind: RuleKind::Alert,
            name,
            expr,
            labels: vec![
                ("severity".into(), if page { "page" } else { "ticket" }.into()),
                ("flow".into(), flow.name.clone()),
                ("slo".into(), s.into()),
            ],
            annotations: vec![
                (
                    "summary".into(),
                    format!(
                        "Flow {} is burning its {s} error budget {} ({what}).",
                        flow.name,
                        spans.join(", or ")
                    ),
                ),
                (
                    "description".into(),
                    format!(
                        "{s} objective {objective}; error ratio over the long window: {{{{ $value | humanizePercentage }}}}. \
                         Find the refused acts in the audit log by correlation id and follow the runbook."
                    ),
                ),
                ("runbook_url".into(), runbook_url),
            ],
        });
    }
    rules
}

/// Renders the groups as the YAML Prometheus reads. Strings are double-quoted with JSON
/// escapes, which YAML accepts as they are.
pub fn render_yaml(groups: &[RuleGroup]) -> String {
    let q = |s: &str| serde_json::to_string(s).expect("a string serializes");
    let mut out = String::from(
        "# Generated by `gapguard rules` from the [[flow]] objectives of the gapguard config; regenerate\n\
         # rather than edit. SLIs, burn rates and alerts: see docs/operations.md.\n",
    );
    if groups.is_empty() {
        out.push_str("groups: []\n");
        return out;
    }
    out.push_str("groups:\n");
    for group in groups {
        let _ = writeln!(out, "  - name: {}\n    rules:", q(&group.name));
        for rule in &group.rules {
            let key = match rule.kind {
                RuleKind::Record => "record",
                RuleKind::Alert => "alert",
            };
            let _ = writeln!(out, "      - {key}: {}", q(&rule.name));
            // Multi-line PromQL reads best as a literal block; anything YAML could misread is quoted.
            let literal_ok = rule.expr.contains('\n')
                && !rule.expr.starts_with(' ')
                && rule.expr.lines().all(|l| !l.ends_with(' ') && !l.contains('\t') && !l.is_empty());
            if literal_ok {
                let _ = writeln!(out, "        expr: |-");
                for line in rule.expr.lines() {
                    let _ = writeln!(out, "          {line}");
                }
            } else {
                let _ = writeln!(out, "        expr: {}", q(&rule.expr));
            }
            for (title, pairs) in [("labels", &rule.labels), ("annotations", &rule.annotations)] {
                if !pairs.is_empty() {
                    let _ = writeln!(out, "        {title}:");
                    for (k, v) in pairs {
                        let _ = writeln!(out, "          {k}: {}", q(v));
                    }
                }
            }
        }
    }
    out
}

fn ms_to_seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

/// A PromQL string literal (Go syntax, which JSON's escapes are a subset of).
fn promql_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serializes")
}

/// Matches the `le` label of one bucket bound. Exporters spell whole numbers differently
/// (`1` from Go clients, `1.0` from prometheus-client and Prometheus 3), so those match both.
fn le_matcher(seconds: f64) -> String {
    if seconds.fract() == 0.0 {
        format!("le=~\"{seconds}(\\\\.0)?\"")
    } else {
        format!("le=\"{seconds}\"")
    }
}

/// The three dashboards, by path.
pub fn dashboards(flows: &[FlowConfig]) -> Vec<(&'static str, Value)> {
    vec![
        ("dashboards/gapguard-executive.json", executive(flows)),
        ("dashboards/gapguard-oncall.json", oncall(flows)),
        ("dashboards/gapguard-debug.json", debug(flows)),
    ]
}

const DS: &str = "${datasource}";

fn datasource() -> Value {
    json!({"type": "prometheus", "uid": DS})
}

fn target(expr: &str, legend: &str) -> Value {
    json!({"datasource": datasource(), "expr": expr, "legendFormat": legend, "refId": "A"})
}

/// Panels built in reading order; ids and grid positions are assigned as they are added.
struct Panels {
    panels: Vec<Value>,
    x: u32,
    y: u32,
    row_h: u32,
}

impl Panels {
    fn new() -> Self {
        Self { panels: Vec::new(), x: 0, y: 0, row_h: 0 }
    }

    fn add(&mut self, w: u32, h: u32, mut panel: Value) {
        if self.x + w > 24 {
            self.x = 0;
            self.y += self.row_h;
            self.row_h = 0;
        }
        panel["id"] = json!(self.panels.len() + 1);
        panel["gridPos"] = json!({"x": self.x, "y": self.y, "w": w, "h": h});
        self.x += w;
        self.row_h = self.row_h.max(h);
        self.panels.push(panel);
    }

    fn graph(&mut self, w: u32, title: &str, unit: &str, description: &str, targets: &[(&str, &str)]) {
        self.add(w, 8, panel("timeseries", title, unit, description, targets));
    }
}

fn panel(kind: &str, title: &str, unit: &str, description: &str, targets: &[(&str, &str)]) -> Value {
    let targets: Vec<Value> = targets
        .iter()
        .enumerate()
        .map(|(i, (expr, legend))| {
            let mut t = target(expr, legend);
            t["refId"] = json!(char::from(b'A' + u8::try_from(i).expect("few targets")).to_string());
            t
        })
        .collect();
    json!({
        "type": kind,
        "title": title,
        "description": description,
        "datasource": datasource(),
        "targets": targets,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"showLegend": true, "displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]}},
    })
}

fn text(title: &str, markdown: &str) -> Value {
    json!({"type": "text", "title": title, "options": {"mode": "markdown", "content": markdown}})
}

/// Template variables: the Prometheus data source, the configured flows (and `other`), the
/// namespaces seen.
fn templating(flows: &[FlowConfig], extra: Vec<Value>) -> Value {
    let mut names: Vec<&str> = flows.iter().map(|f| f.name.as_str()).collect();
    names.push("other");
    let options: Vec<Value> = names.iter().map(|n| json!({"text": n, "value": n, "selected": false})).collect();
    let mut list = vec![
        json!({"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"}),
        json!({
            "name": "flow", "label": "Flow", "type": "custom", "query": names.join(","),
            "multi": true, "includeAll": true, "allValue": ".*",
            "current": {"text": "All", "value": "$__all"}, "options": options,
        }),
        json!({
            "name": "namespace", "label": "Namespace", "type": "query", "datasource": datasource(),
            "query": {"query": format!("label_values({ACTS_TOTAL}, namespace)"), "refId": "namespace"},
            "definition": format!("label_values({ACTS_TOTAL}, namespace)"),
            "multi": true, "includeAll": true, "allValue": ".*", "refresh": 2,
            "current": {"text": "All", "value": "$__all"},
        }),
    ];
    list.extend(extra);
    json!({ "list": list })
}

fn dashboard(uid: &str, title: &str, description: &str, templating: Value, panels: Panels) -> Value {
    let link = |uid: &str, title: &str| json!({"type": "link", "title": title, "url": format!("/d/{uid}"), "keepTime": true, "includeVars": true, "targetBlank": false});
    json!({
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["gapguard", "generated"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": true,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": templating,
        "annotations": {"list": []},
        "links": [
            link("gapguard-executive", "Executive"),
            link("gapguard-oncall", "On-call"),
            link("gapguard-debug", "Debug"),
        ],
        "panels": panels.panels,
    })
}

fn executive(flows: &[FlowConfig]) -> Value {
    let mut p = Panels::new();
    let f = "{flow=~\"$flow\"}";
    p.add(
        12,
        6,
        panel(
            "stat",
            "Correctness SLI, 3 days",
            "percentunit",
            "Fraction of acts whose check still held at use (1 − stale_check / (committed + stale_check)).",
            &[(&format!("{}{f}", recorded("correctness", "sli", "3d")), "{{flow}}")],
        ),
    );
    p.add(
        12,
        6,
        panel(
            "stat",
            "Latency SLI, 3 days",
            "percentunit",
            "Fraction of check-to-use gaps within the flow's check_to_use_p99_ms (objective 99 %).",
            &[(&format!("{}{f}", recorded("latency", "sli", "3d")), "{{flow}}")],
        ),
    );
    p.graph(
        12,
        "Correctness SLI (1h) and objective",
        "percentunit",
        "Per flow, against its correctness_objective.",
        &[
            (&format!("{}{f}", recorded("correctness", "sli", "1h")), "{{flow}}"),
            (&format!("flow:gapguard_correctness_objective:ratio{f}"), "{{flow}} objective"),
        ],
    );
    p.graph(
        12,
        "Latency SLI (1h) and objective",
        "percentunit",
        "Per flow: fraction of gaps within the latency objective.",
        &[
            (&format!("{}{f}", recorded("latency", "sli", "1h")), "{{flow}}"),
            (&format!("flow:gapguard_latency_objective:ratio{f}"), "{{flow}} objective"),
        ],
    );
    p.graph(
        12,
        "Budget headroom at the 3-day burn rate (1 − burn rate)",
        "percentunit",
        "Not the budget left: 1 − the burn rate over 3 days. 100 %: nothing spent; 0: spending exactly as fast \
         as the objective allows; below 0: faster, and the budget runs out before its window ends.",
        &[
            (&format!("1 - {}{f}", recorded("correctness", "burn_rate", "3d")), "{{flow}} correctness"),
            (&format!("1 - {}{f}", recorded("latency", "burn_rate", "3d")), "{{flow}} latency"),
        ],
    );
    p.graph(
        12,
        "Mismatch trend",
        "short",
        "Per hour: acts whose check had gone stale, and acts whose permission was revoked between check and use.",
        &[
            (
                &format!("sum by (flow) (increase({ACTS_TOTAL}{{flow=~\"$flow\",namespace=~\"$namespace\",result=\"stale_check\"}}[1h]))"),
                "{{flow}} stale checks",
            ),
            ("sum(increase(gapguard_authz_mismatch_total[1h]))", "authorization mismatches"),
        ],
    );
    dashboard(
        "gapguard-executive",
        "gapguard — executive",
        "SLO compliance per flow and the trend of check/use mismatches. Generated by `gapguard rules`.",
        templating(flows, vec![]),
        p,
    )
}

fn oncall(flows: &[FlowConfig]) -> Value {
    let mut p = Panels::new();
    let sel = "flow=~\"$flow\",namespace=~\"$namespace\"";
    let mut heatmap = panel(
        "heatmap",
        "Check-to-use latency — $flow",
        "s",
        "Distribution of the gap between a check and the act that presents its ticket, one panel per flow.",
        &[(
            &format!("sum by (le) (rate({CHECK_TO_USE_SECONDS}_bucket{{flow=~\"$flow\",namespace=~\"$namespace\"}}[$__rate_interval]))"),
            "{{le}}",
        )],
    );
    heatmap["targets"][0]["format"] = json!("heatmap");
    heatmap["repeat"] = json!("flow");
    heatmap["repeatDirection"] = json!("h");
    heatmap["maxPerRow"] = json!(3);
    heatmap["options"] = json!({"calculate": false, "yAxis": {"unit": "s"}, "color": {"scheme": "Oranges", "mode": "scheme"}, "cellGap": 1});
    p.add(24, 9, heatmap);
    p.graph(
        12,
        "Check-to-use p99",
        "s",
        "99th percentile of the gap per flow; compare with the flow's check_to_use_p99_ms.",
        &[
            (
                &format!("histogram_quantile(0.99, sum by (flow, le) (rate({CHECK_TO_USE_SECONDS}_bucket{{{sel}}}[$__rate_interval])))"),
                "{{flow}} p99",
            ),
            ("flow:gapguard_latency_threshold:seconds{flow=~\"$flow\"}", "{{flow}} objective"),
        ],
    );
    p.graph(
        12,
        "Conditional failures",
        "reqps",
        "Acts refused because what was checked no longer held, or the ticket could not be used.",
        &[(
            &format!(
                "sum by (flow, result) (rate({ACTS_TOTAL}{{{sel},result=~\"stale_check|condition_failed|ticket_expired|ticket_used\"}}[$__rate_interval]))"
            ),
            "{{flow}} {{result}}",
        )],
    );
    p.graph(
        8,
        "Orphans",
        "short",
        "Reservations and leases that expired unfinished and await the user's cleanup (`gapguard orphans list NS`). \
         Every node over one PostgreSQL counts the same orphans: the panel takes the max, not the sum.",
        &[("max by (kind) (gapguard_orphans)", "{{kind}}")],
    );
    p.graph(
        8,
        "Revoked-use attempts and authorization mismatches",
        "reqps",
        "Acts presenting a permission revoked after its check.",
        &[
            ("sum(rate(gapguard_revoked_use_attempts_total[$__rate_interval]))", "revoked-use attempts"),
            ("sum(rate(gapguard_authz_mismatch_total[$__rate_interval]))", "authorization mismatches"),
        ],
    );
    p.graph(
        8,
        "Burn rates (1h)",
        "short",
        "Error-budget burn per flow over 1 hour; the page threshold is 14.4.",
        &[
            ("flow:gapguard_correctness_burn_rate:rate1h{flow=~\"$flow\"}", "{{flow}} correctness"),
            ("flow:gapguard_latency_burn_rate:rate1h{flow=~\"$flow\"}", "{{flow}} latency"),
        ],
    );
    p.graph(
        12,
        "Compensations and fencing rejections",
        "reqps",
        "Orphans resolved by the user's cleanup, and writes refused for a stale fencing token.",
        &[
            ("sum(rate(gapguard_compensations_total[$__rate_interval]))", "compensations"),
            ("sum(rate(gapguard_fencing_rejections_total[$__rate_interval]))", "fencing rejections"),
        ],
    );
    p.graph(
        12,
        "HTTP errors",
        "reqps",
        "Responses with status 4xx or 5xx by matched route.",
        &[(
            "sum by (route, status) (rate(gapguard_http_requests_total{status=~\"4..|5..\"}[$__rate_interval]))",
            "{{route}} {{status}}",
        )],
    );
    dashboard(
        "gapguard-oncall",
        "gapguard — on-call",
        "The gap and its failures, per flow. Generated by `gapguard rules`.",
        templating(flows, vec![]),
        p,
    )
}

fn debug(flows: &[FlowConfig]) -> Value {
    let mut p = Panels::new();
    let sel = "flow=~\"$flow\",namespace=~\"$namespace\"";
    p.add(
        24,
        7,
        text(
            "Drill down by correlation id",
            "Set **correlation_id** (the `X-Correlation-Id` or `traceparent` trace id of the request) and **gapguard_url** above.\n\n\
             * Audit events of the request and of the check whose ticket it presented: \
             [${gapguard_url}/v1/ns/${namespace}/audit?correlation_id=${correlation_id}](${gapguard_url}/v1/ns/${namespace}/audit?correlation_id=${correlation_id}) \
             (needs an API key with `read` on the namespace: `curl -H 'Authorization: Bearer …' …`)\n\
             * From a shell: `gapguard audit tail ${namespace} --correlation-id ${correlation_id}`\n\
             * Expired reservations and leases: `gapguard orphans list ${namespace}`\n\n\
             What each alert means and what to do: `docs/operations.md` of the gapguard repository.",
        ),
    );
    p.graph(
        12,
        "Refusal reasons (acts)",
        "reqps",
        "Acts not committed, by result.",
        &[(
            &format!("sum by (result) (rate({ACTS_TOTAL}{{{sel},result!=\"committed\"}}[$__rate_interval]))"),
            "{{result}}",
        )],
    );
    p.graph(
        12,
        "Checks by result",
        "reqps",
        "Checks that passed and that failed, by flow.",
        &[(
            &format!("sum by (flow, result) (rate(gapguard_checks_total{{{sel}}}[$__rate_interval]))"),
            "{{flow}} {{result}}",
        )],
    );
    p.graph(
        12,
        "Reservations, idempotency, fencing",
        "reqps",
        "Reservations by result; idempotent replays and key conflicts; stale fencing tokens refused.",
        &[
            ("sum by (result) (rate(gapguard_reservations_total[$__rate_interval]))", "reservation {{result}}"),
            ("sum(rate(gapguard_idempotent_replays_total[$__rate_interval]))", "idempotent replays"),
            ("sum(rate(gapguard_idempotency_conflicts_total[$__rate_interval]))", "idempotency conflicts"),
            ("sum(rate(gapguard_fencing_rejections_total[$__rate_interval]))", "fencing rejections"),
        ],
    );
    p.graph(
        12,
        "Commit latency (fsync)",
        "s",
        "Group-commit latency quantiles.",
        &[
            ("histogram_quantile(0.5, sum by (le) (rate(gapguard_commit_seconds_bucket[$__rate_interval])))", "p50"),
            ("histogram_quantile(0.99, sum by (le) (rate(gapguard_commit_seconds_bucket[$__rate_interval])))", "p99"),
        ],
    );
    p.graph(
        12,
        "Commit batch size",
        "short",
        "Write requests per group commit.",
        &[
            ("histogram_quantile(0.5, sum by (le) (rate(gapguard_commit_batch_size_bucket[$__rate_interval])))", "p50"),
            ("histogram_quantile(0.99, sum by (le) (rate(gapguard_commit_batch_size_bucket[$__rate_interval])))", "p99"),
            (
                "sum(rate(gapguard_commit_batch_size_sum[$__rate_interval])) / sum(rate(gapguard_commit_batch_size_count[$__rate_interval]))",
                "mean",
            ),
        ],
    );
    p.graph(
        12,
        "HTTP latency p99 by route",
        "s",
        "By matched route and method.",
        &[(
            "histogram_quantile(0.99, sum by (route, method, le) (rate(gapguard_http_request_seconds_bucket[$__rate_interval])))",
            "{{method}} {{route}}",
        )],
    );
    let extra = vec![
        json!({"name": "correlation_id", "label": "Correlation id", "type": "textbox", "query": "", "current": {"text": "", "value": ""}}),
        json!({
            "name": "gapguard_url", "label": "gapguard URL", "type": "textbox", "query": "http://127.0.0.1:7700",
            "current": {"text": "http://127.0.0.1:7700", "value": "http://127.0.0.1:7700"},
        }),
    ];
    dashboard(
        "gapguard-debug",
        "gapguard — debug",
        "Why requests were refused, commit latency, and the audit trail of one correlation id. Generated by `gapguard rules`.",
        templating(flows, extra),
        p,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(name: &str, p99_ms: Option<u64>, objective: Option<f64>) -> FlowConfig {
        FlowConfig { name: name.into(), check_to_use_p99_ms: p99_ms, correctness_objective: objective }
    }

    fn alert<'a>(groups: &'a [RuleGroup], name: &str) -> &'a Rule {
        groups.iter().flat_map(|g| &g.rules).find(|r| r.kind == RuleKind::Alert && r.name == name).unwrap()
    }

    #[test]
    fn correctness_alerts_use_the_workbook_factors_times_the_error_budget() {
        let groups = rule_groups(&[flow("checkout", None, Some(0.9999))], &Options::default()).unwrap();
        let page = alert(&groups, "GapguardFlowCorrectnessBurnRatePage");
        for (factor, long, short) in [("14.4", "1h", "5m"), ("6", "6h", "30m")] {
            for w in [long, short] {
                let want = format!(
                    "flow:gapguard_correctness_error_ratio:rate{w}{{flow=\"checkout\"}} > ({factor} * (1 - 0.9999))"
                );
                assert!(page.expr.contains(&want), "missing {want} in {}", page.expr);
            }
        }
        assert_eq!(
            (page.expr.matches("\nand\n").count(), page.expr.matches("\nor\n").count()),
            (2, 1),
            "{}",
            page.expr
        );
        assert!(page.labels.contains(&("severity".into(), "page".into())));
        assert!(page.labels.contains(&("flow".into(), "checkout".into())));
        let runbook = page.annotations.iter().find(|(k, _)| k == "runbook_url").unwrap();
        assert_eq!(runbook.1, "docs/operations.md#gapguardflowcorrectnessburnratepage");

        let ticket = alert(&groups, "GapguardFlowCorrectnessBurnRateTicket");
        assert!(ticket.expr.contains("rate3d{flow=\"checkout\"} > (1 * (1 - 0.9999))"), "{}", ticket.expr);
        assert!(ticket.expr.contains("rate6h{flow=\"checkout\"} > (1 * (1 - 0.9999))"), "{}", ticket.expr);
        assert!(ticket.labels.contains(&("severity".into(), "ticket".into())));
        // No latency objective, no latency rules.
        assert!(groups[0].rules.iter().all(|r| !r.name.contains("latency") && !r.name.contains("Latency")));
    }

    #[test]
    fn the_correctness_sli_divides_stale_checks_by_committed_and_stale_acts() {
        let groups = rule_groups(&[flow("checkout", None, Some(0.999))], &Options::default()).unwrap();
        let ratio = groups[0].rules.iter().find(|r| r.name == "flow:gapguard_correctness_error_ratio:rate30m").unwrap();
        assert_eq!(
            ratio.expr,
            "(\n  sum by (flow) (rate(gapguard_acts_total{flow=\"checkout\",result=\"stale_check\"}[30m]))\n  or\n  \
             0 * sum by (flow) (rate(gapguard_acts_total{flow=\"checkout\",result=~\"committed|stale_check\"}[30m]))\n)\n/\n\
             sum by (flow) (rate(gapguard_acts_total{flow=\"checkout\",result=~\"committed|stale_check\"}[30m]))"
        );
        let burn = groups[0].rules.iter().find(|r| r.name == "flow:gapguard_correctness_burn_rate:rate30m").unwrap();
        assert_eq!(burn.expr, "flow:gapguard_correctness_error_ratio:rate30m{flow=\"checkout\"} / (1 - 0.999)");
        for w in WINDOWS {
            for what in ["error_ratio", "sli", "burn_rate"] {
                let name = recorded("correctness", what, w);
                assert_eq!(groups[0].rules.iter().filter(|r| r.name == name).count(), 1, "{name}");
            }
        }
    }

    #[test]
    fn the_latency_sli_reads_the_bucket_at_the_objective() {
        let groups =
            rule_groups(&[flow("vm", Some(250), None), flow("big", Some(2000), None)], &Options::default()).unwrap();
        let ratio = |g: &RuleGroup| {
            g.rules.iter().find(|r| r.name == "flow:gapguard_latency_error_ratio:rate1h").unwrap().expr.clone()
        };
        assert!(ratio(&groups[0]).contains("gapguard_check_to_use_seconds_bucket{flow=\"vm\",le=\"0.25\"}[1h]"));
        assert!(ratio(&groups[0]).contains("gapguard_check_to_use_seconds_count{flow=\"vm\"}[1h]"));
        // Whole seconds: `2` (Go clients) or `2.0` (prometheus-client, Prometheus 3).
        assert!(ratio(&groups[1]).contains(r#"le=~"2(\\.0)?""#), "{}", ratio(&groups[1]));
        let page = alert(&groups, "GapguardFlowLatencyBurnRatePage");
        assert!(page.expr.contains("rate1h{flow=\"vm\"} > (14.4 * (1 - 0.99))"), "{}", page.expr);
    }

    #[test]
    fn the_buckets_contain_every_objective_once() {
        let flows = [flow("a", Some(500), None), flow("b", Some(1234), None), flow("c", None, Some(0.9))];
        let buckets = check_to_use_buckets_seconds(&flows);
        assert!(buckets.contains(&1.234) && buckets.contains(&0.5));
        assert_eq!(buckets.len(), CHECK_TO_USE_BASE_BUCKETS_SECONDS.len() + 1);
        assert!(buckets.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn flows_without_objectives_get_no_rules() {
        let groups = rule_groups(&[flow("plain", None, None)], &Options::default()).unwrap();
        assert!(groups.is_empty());
        assert_eq!(render_yaml(&groups).lines().last(), Some("groups: []"));
    }

    #[test]
    fn objectives_out_of_range_and_duplicate_flows_are_refused_by_name() {
        for objective in [0.0, 1.0, 1.5, -0.1, f64::NAN] {
            let err = rule_groups(&[flow("x", None, Some(objective))], &Options::default()).unwrap_err();
            assert!(matches!(&err, RulesError::Objective { flow, .. } if flow == "x"), "{err}");
        }
        let err = rule_groups(&[flow("x", Some(0), None)], &Options::default()).unwrap_err();
        assert!(err.to_string().contains("check_to_use_p99_ms"), "{err}");
        let err = rule_groups(&[flow("x", None, None), flow("x", None, None)], &Options::default()).unwrap_err();
        assert_eq!(err, RulesError::DuplicateFlow("x".into()));
    }

    #[test]
    fn flow_names_are_escaped_in_promql_and_yaml() {
        let groups = rule_groups(&[flow("we\"ird\\", None, Some(0.99))], &Options::default()).unwrap();
        let yaml = render_yaml(&groups);
        assert!(groups[0].rules[0].expr.contains(r#"flow="we\"ird\\""#), "{}", groups[0].rules[0].expr);
        assert!(yaml.contains(r#"flow="we\"ird\\""#), "{yaml}");
        assert!(yaml.contains(r#"flow=\"we\\\"ird\\\\\""#), "{yaml}");
    }

    #[test]
    fn the_runbook_base_is_configurable() {
        let options = Options { runbook_base: "https://wiki/ops".into() };
        let groups = rule_groups(&[flow("f", Some(100), None)], &options).unwrap();
        let page = alert(&groups, "GapguardFlowLatencyBurnRatePage");
        assert!(page
            .annotations
            .contains(&("runbook_url".into(), "https://wiki/ops#gapguardflowlatencyburnratepage".into())));
    }

    /// DESIGN §4's metrics; histograms also expose `_bucket`, `_sum` and `_count`.
    const KNOWN_METRICS: [&str; 15] = [
        "gapguard_check_to_use_seconds",
        "gapguard_checks_total",
        "gapguard_acts_total",
        "gapguard_authz_mismatch_total",
        "gapguard_revoked_use_attempts_total",
        "gapguard_reservations_total",
        "gapguard_orphans",
        "gapguard_compensations_total",
        "gapguard_idempotent_replays_total",
        "gapguard_idempotency_conflicts_total",
        "gapguard_fencing_rejections_total",
        "gapguard_commit_batch_size",
        "gapguard_commit_seconds",
        "gapguard_http_requests_total",
        "gapguard_http_request_seconds",
    ];
    const HISTOGRAMS: [&str; 4] = [
        "gapguard_check_to_use_seconds",
        "gapguard_commit_batch_size",
        "gapguard_commit_seconds",
        "gapguard_http_request_seconds",
    ];

    /// The metric names an expression selects: identifiers outside string literals, label
    /// matchers (`{…}`), ranges (`[…]`) and grouping clauses that are not followed by `(`
    /// (functions, aggregations) and are not keywords or Grafana variables.
    fn metric_names(expr: &str) -> Vec<String> {
        // Binary operators, and aggregations (which may put `by (…)` before their `(`).
        const KEYWORDS: [&str; 16] = [
            "and",
            "or",
            "unless",
            "bool",
            "sum",
            "avg",
            "min",
            "max",
            "count",
            "group",
            "stddev",
            "stdvar",
            "topk",
            "bottomk",
            "quantile",
            "count_values",
        ];
        let chars: Vec<char> = expr.chars().collect();
        let mut names = Vec::new();
        let mut i = 0;
        let mut skip_parens = false;
        while i < chars.len() {
            let c = chars[i];
            if c == '"' {
                i += 1;
                while chars[i] != '"' {
                    i += if chars[i] == '\\' { 2 } else { 1 };
                }
                i += 1;
            } else if c == '{' || c == '[' {
                let close = if c == '{' { '}' } else { ']' };
                while chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while chars[i] != '"' {
                            i += if chars[i] == '\\' { 2 } else { 1 };
                        }
                    }
                    i += 1;
                }
                i += 1;
            } else if c == '(' && skip_parens {
                while chars[i] != ')' {
                    i += 1;
                }
                skip_parens = false;
                i += 1;
            } else if c == '$' {
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            } else if c.is_alphabetic() || c == '_' || c == ':' {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_' || chars[i] == ':') {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j] == ' ' {
                    j += 1;
                }
                let is_call = j < chars.len() && chars[j] == '(';
                if ["by", "without", "on", "ignoring", "group_left", "group_right"].contains(&word.as_str()) {
                    skip_parens = true;
                } else if !is_call && !KEYWORDS.contains(&word.as_str()) {
                    names.push(word);
                }
            } else if c.is_ascii_digit() {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            } else {
                i += 1;
            }
        }
        names
    }

    fn is_known(name: &str, recorded_names: &BTreeSet<String>) -> bool {
        if recorded_names.contains(name) || KNOWN_METRICS.contains(&name) {
            return true;
        }
        ["_bucket", "_sum", "_count"]
            .iter()
            .any(|suffix| name.strip_suffix(suffix).is_some_and(|base| HISTOGRAMS.contains(&base)))
    }

    fn exprs_of(value: &Value, out: &mut Vec<String>) {
        match value {
            Value::Object(map) => {
                for (k, v) in map {
                    match (k.as_str(), v) {
                        ("expr", Value::String(s)) => out.push(s.clone()),
                        ("query", Value::String(s)) if s.starts_with("label_values(") => {
                            out.push(s["label_values(".len()..s.find(',').unwrap()].to_owned())
                        }
                        _ => exprs_of(v, out),
                    }
                }
            }
            Value::Array(items) => items.iter().for_each(|v| exprs_of(v, out)),
            _ => {}
        }
    }

    #[test]
    fn the_name_scanner_finds_metrics_and_nothing_else() {
        let names = metric_names(
            "histogram_quantile(0.99, sum by (flow, le) (rate(a_bucket{x=\"y{\"}[5m]))) / on (flow) b:c:d{flow=~\"$flow\"} > (14.4 * (1 - 0.9999)) and vector(1)",
        );
        assert_eq!(names, ["a_bucket", "b:c:d"]);
    }

    #[test]
    fn every_query_names_a_metric_the_server_exports_or_a_generated_rule() {
        let flows =
            [flow("checkout", Some(500), Some(0.9999)), flow("vm", Some(1000), None), flow("plain", None, None)];
        let groups = rule_groups(&flows, &Options::default()).unwrap();
        let recorded_names: BTreeSet<String> = groups
            .iter()
            .flat_map(|g| &g.rules)
            .filter(|r| r.kind == RuleKind::Record)
            .map(|r| r.name.clone())
            .collect();
        let mut exprs: Vec<String> = groups.iter().flat_map(|g| &g.rules).map(|r| r.expr.clone()).collect();
        let n_rule_exprs = exprs.len();
        for (_, dashboard) in dashboards(&flows) {
            exprs_of(&dashboard, &mut exprs);
        }
        assert!(exprs.len() > n_rule_exprs + 20, "the dashboards have queries");
        let mut used = BTreeSet::new();
        for expr in &exprs {
            for name in metric_names(expr) {
                assert!(is_known(&name, &recorded_names), "{name:?} in {expr:?} is neither exported nor recorded");
                used.insert(name);
            }
        }
        // Every exported metric shows up somewhere.
        for metric in KNOWN_METRICS {
            assert!(used.iter().any(|u| u.starts_with(metric)), "{metric} is on no dashboard");
        }
    }

    #[test]
    fn dashboards_are_json_with_unique_panel_ids_and_the_audit_drill_down() {
        let flows = [flow("checkout", Some(500), Some(0.9999))];
        let files = generate(&flows, &Options::default()).unwrap();
        let paths: Vec<&str> = files.iter().map(|f| f.path).collect();
        assert_eq!(
            paths,
            [
                "gapguard-rules.yml",
                "dashboards/gapguard-executive.json",
                "dashboards/gapguard-oncall.json",
                "dashboards/gapguard-debug.json"
            ]
        );
        for file in &files[1..] {
            let dashboard: Value = serde_json::from_str(&file.contents).unwrap();
            let ids: BTreeSet<u64> =
                dashboard["panels"].as_array().unwrap().iter().map(|p| p["id"].as_u64().unwrap()).collect();
            assert_eq!(ids.len(), dashboard["panels"].as_array().unwrap().len(), "{}", file.path);
            assert!(dashboard["uid"].as_str().unwrap().starts_with("gapguard-"));
        }
        assert!(files[3].contents.contains("/v1/ns/${namespace}/audit?correlation_id=${correlation_id}"));
        assert!(files[3].contents.contains("gapguard audit tail ${namespace} --correlation-id ${correlation_id}"));
        assert!(files[2].contents.contains("\"repeat\": \"flow\""));
    }
}
