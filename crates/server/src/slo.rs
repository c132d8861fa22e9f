//! `GET /v1/slo`: each flow's SLIs, burn rates and alert decisions, computed in the server from
//! its own observations — the same definitions as the generated Prometheus rules
//! ([`crate::rules`]), so that the server and Prometheus agree.
//!
//! Per flow with an objective, four counters (committed acts, stale_check acts, gaps, gaps
//! within `check_to_use_p99_ms`) are kept in two bounded rings of per-interval buckets:
//!
//! - **fine**: 10 s buckets spanning 6 h (2,162 buckets), for the 5m, 30m, 1h and 6h windows;
//! - **coarse**: 5 min buckets spanning 3 d (866 buckets), for the 3d window.
//!
//! About 120 KB per flow, whatever the traffic. Recording an event is an atomic add into the
//! current bucket of each ring (a bucket that starts a new interval is first cleared, under a
//! lock taken once per interval). Times are the engine clock's (`Engine::now_ms`; the
//! observer's `now_ms` of each write), milliseconds since the Unix epoch.
//!
//! **Window arithmetic.** With buckets of `b` ms, an event at `t` falls in bucket `⌊t/b⌋`, and
//! the window of `w` ms at `now` is the `w/b` buckets ending with the current one:
//! `⌊t/b⌋ > ⌊now/b⌋ − w/b`. So a window covers between `w − b` and `w` of the past (the 5m
//! window, between 4m50s and 5m; the 3d window, between 3d − 5m and 3d).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use gapguard_api as api;

use crate::config::FlowConfig;
use crate::rules::{self, BurnRateWindow, Sli, LATENCY_OBJECTIVE, PAGE_WINDOWS, TICKET_WINDOWS, WINDOWS};

const MINUTE_MS: u64 = 60_000;
const HOUR_MS: u64 = 60 * MINUTE_MS;
const DAY_MS: u64 = 24 * HOUR_MS;

/// Bucket width of the fine ring.
pub const FINE_BUCKET_MS: u64 = 10_000;
/// Longest window the fine ring serves.
pub const FINE_SPAN_MS: u64 = 6 * HOUR_MS;
/// Bucket width of the coarse ring.
pub const COARSE_BUCKET_MS: u64 = 5 * MINUTE_MS;
/// Longest window the coarse ring serves.
pub const COARSE_SPAN_MS: u64 = 3 * DAY_MS;

/// A window's length in ms, from its Prometheus duration (`5m`, `1h`, `3d`, …).
pub fn window_ms(window: &str) -> u64 {
    let (n, unit) = window.split_at(window.len() - 1);
    let n: u64 = n.parse().expect("a window is a number and a unit");
    n * match unit {
        "s" => 1000,
        "m" => MINUTE_MS,
        "h" => HOUR_MS,
        "d" => DAY_MS,
        other => panic!("unknown window unit {other:?}"),
    }
}

/// The four counts of a flow, over some span of time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// Acts committed.
    pub committed: u64,
    /// Acts refused `stale_check`.
    pub stale_check: u64,
    /// Check-to-use gaps (acts that presented a ticket, any outcome).
    pub gaps: u64,
    /// Of those, gaps no longer than the flow's `check_to_use_p99_ms`.
    pub gaps_within: u64,
}

impl Counts {
    fn as_array(self) -> [u64; 4] {
        [self.committed, self.stale_check, self.gaps, self.gaps_within]
    }

    fn from_array(a: [u64; 4]) -> Self {
        Self { committed: a[0], stale_check: a[1], gaps: a[2], gaps_within: a[3] }
    }

    /// The acts of the correctness SLI.
    pub fn acts(self) -> u64 {
        self.committed + self.stale_check
    }

    /// stale_check ÷ (committed + stale_check); `None` without such acts.
    pub fn correctness_error_ratio(self) -> Option<f64> {
        (self.acts() > 0).then(|| self.stale_check as f64 / self.acts() as f64)
    }

    /// 1 − within ÷ gaps (as the rules compute it); `None` without gaps.
    pub fn latency_error_ratio(self) -> Option<f64> {
        (self.gaps > 0).then(|| 1.0 - self.gaps_within as f64 / self.gaps as f64)
    }
}

/// One interval's counters. `epoch` is the bucket number plus one (0: never used).
#[derive(Default)]
struct Slot {
    epoch: AtomicU64,
    counts: [AtomicU64; 4],
}

/// A ring of per-interval buckets: bounded memory for windows up to its span.
pub struct Ring {
    bucket_ms: u64,
    slots: Box<[Slot]>,
    /// Taken only to clear a bucket for a new interval.
    rotate: Mutex<()>,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("bucket_ms", &self.bucket_ms).field("slots", &self.slots.len()).finish()
    }
}

impl Ring {
    /// A ring of `bucket_ms` buckets serving windows up to `span_ms` (a multiple of it). It has
    /// two buckets beyond the span, so that an event of the next interval, recorded while a
    /// reader sums, never clears a bucket the reader's window still covers.
    pub fn new(bucket_ms: u64, span_ms: u64) -> Self {
        assert!(bucket_ms > 0 && span_ms.is_multiple_of(bucket_ms), "the span is a whole number of buckets");
        let n = usize::try_from(span_ms / bucket_ms).expect("a bounded ring") + 2;
        Self { bucket_ms, slots: (0..n).map(|_| Slot::default()).collect(), rotate: Mutex::new(()) }
    }

    /// The longest window it serves.
    pub fn span_ms(&self) -> u64 {
        (self.slots.len() as u64 - 2) * self.bucket_ms
    }

    fn slot(&self, bucket: u64) -> &Slot {
        &self.slots[(bucket % self.slots.len() as u64) as usize]
    }

    /// Adds `counts` at `at_ms`. An event older than the ring's span (its bucket already
    /// reused) is dropped.
    pub fn add(&self, at_ms: u64, counts: Counts) {
        let bucket = at_ms / self.bucket_ms;
        let slot = self.slot(bucket);
        let want = bucket + 1;
        let epoch = slot.epoch.load(Ordering::Acquire);
        if epoch != want {
            if epoch > want {
                return;
            }
            let _guard = self.rotate.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let epoch = slot.epoch.load(Ordering::Acquire);
            if epoch > want {
                return;
            }
            if epoch < want {
                for c in &slot.counts {
                    c.store(0, Ordering::Relaxed);
                }
                slot.epoch.store(want, Ordering::Release);
            }
        }
        for (c, n) in slot.counts.iter().zip(counts.as_array()) {
            if n > 0 {
                c.fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// The sum over the window of `window_ms` (at most the span) at `now_ms`: the
    /// `window_ms / bucket_ms` buckets ending with the current one.
    pub fn sum(&self, now_ms: u64, window_ms: u64) -> Counts {
        debug_assert!(window_ms <= self.span_ms(), "window beyond the ring's span");
        let current = now_ms / self.bucket_ms;
        let n = (window_ms / self.bucket_ms).min(current + 1);
        let mut total = [0u64; 4];
        for bucket in (current + 1 - n)..=current {
            let slot = self.slot(bucket);
            let want = bucket + 1;
            if slot.epoch.load(Ordering::Acquire) != want {
                continue;
            }
            let counts: [u64; 4] = std::array::from_fn(|i| slot.counts[i].load(Ordering::Relaxed));
            // Cleared for a newer interval while we read: not in the window any more.
            if slot.epoch.load(Ordering::Acquire) != want {
                continue;
            }
            for (t, c) in total.iter_mut().zip(counts) {
                *t += c;
            }
        }
        Counts::from_array(total)
    }
}

/// One flow's rings and objectives.
#[derive(Debug)]
pub struct FlowSlo {
    config: FlowConfig,
    fine: Ring,
    coarse: Ring,
}

impl FlowSlo {
    /// Empty rings for `config`.
    pub fn new(config: FlowConfig) -> Self {
        Self {
            config,
            fine: Ring::new(FINE_BUCKET_MS, FINE_SPAN_MS),
            coarse: Ring::new(COARSE_BUCKET_MS, COARSE_SPAN_MS),
        }
    }

    /// Records an act of this flow evaluated at `at_ms`: its result (`committed`, or the
    /// refusal's code) and, when it presented a ticket, its check-to-use gap.
    pub fn record_act(&self, at_ms: u64, result: &str, gap_ms: Option<u64>) {
        let mut counts = Counts::default();
        match result {
            "committed" => counts.committed = 1,
            "stale_check" => counts.stale_check = 1,
            _ => {}
        }
        if let Some(gap) = gap_ms {
            counts.gaps = 1;
            counts.gaps_within = u64::from(self.config.check_to_use_p99_ms.is_some_and(|bound| gap <= bound));
        }
        if counts == Counts::default() {
            return;
        }
        self.fine.add(at_ms, counts);
        self.coarse.add(at_ms, counts);
    }

    /// The counts over `window` (`5m` … `3d`) at `now_ms`.
    pub fn counts(&self, now_ms: u64, window: &str) -> Counts {
        let ms = window_ms(window);
        if ms <= self.fine.span_ms() {
            self.fine.sum(now_ms, ms)
        } else {
            self.coarse.sum(now_ms, ms)
        }
    }

    /// The flow's report at `now_ms`.
    pub fn report(&self, now_ms: u64) -> api::FlowSlo {
        report(&self.config, |w| self.counts(now_ms, w))
    }
}

/// Error ratio ÷ (1 − objective).
pub fn burn_rate(error_ratio: f64, objective: f64) -> f64 {
    error_ratio / (1.0 - objective)
}

/// Whether an alert condition holds: the error ratio over both windows above `factor` times
/// the error budget, exactly as the generated rules compare (`ratio > factor * (1 - objective)`).
/// A window without events never fires (Prometheus' ratio is NaN there).
pub fn fires(long: Option<f64>, short: Option<f64>, factor: f64, objective: f64) -> bool {
    let threshold = factor * (1.0 - objective);
    matches!((long, short), (Some(l), Some(s)) if l > threshold && s > threshold)
}

/// Builds a flow's report from its counts per window (`counts("5m")`, …).
pub fn report(config: &FlowConfig, counts: impl Fn(&str) -> Counts) -> api::FlowSlo {
    let by_window: Vec<(&str, Counts)> = WINDOWS.iter().map(|w| (*w, counts(w))).collect();
    let at = |w: &str| by_window.iter().find(|(name, _)| *name == w).map(|(_, c)| *c).expect("a known window");
    let has_latency = config.check_to_use_p99_ms.is_some();
    let error = |sli: Sli, c: Counts| match sli {
        Sli::Correctness => c.correctness_error_ratio(),
        Sli::Latency => c.latency_error_ratio().filter(|_| has_latency),
    };
    let objective = |sli: Sli| match sli {
        Sli::Correctness => config.correctness_objective,
        Sli::Latency => has_latency.then_some(LATENCY_OBJECTIVE),
    };
    let window = |c: Counts| {
        let burn = |sli: Sli| Some(burn_rate(error(sli, c)?, objective(sli)?));
        api::SloWindow {
            correctness_sli: error(Sli::Correctness, c).map(|e| 1.0 - e),
            latency_sli: error(Sli::Latency, c).map(|e| 1.0 - e),
            correctness_burn_rate: burn(Sli::Correctness),
            latency_burn_rate: burn(Sli::Latency),
            acts: c.acts(),
            gaps: c.gaps,
        }
    };
    let mut alerts = Vec::new();
    for sli in [Sli::Correctness, Sli::Latency] {
        let Some(obj) = objective(sli) else { continue };
        for page in [true, false] {
            let windows: &[BurnRateWindow] = if page { &PAGE_WINDOWS } else { &TICKET_WINDOWS };
            for b in windows {
                alerts.push(api::SloAlert {
                    name: rules::alert_name(sli, page),
                    severity: if page { "page" } else { "ticket" }.into(),
                    slo: sli.name().into(),
                    firing: fires(error(sli, at(b.long)), error(sli, at(b.short)), b.factor, obj),
                    long_window: b.long.into(),
                    short_window: b.short.into(),
                    factor: b.factor,
                });
            }
        }
    }
    api::FlowSlo {
        flow: config.name.clone(),
        objectives: api::SloObjectives {
            correctness: config.correctness_objective,
            check_to_use_p99_ms: config.check_to_use_p99_ms,
        },
        windows: api::SloWindows {
            m5: window(at("5m")),
            m30: window(at("30m")),
            h1: window(at("1h")),
            h6: window(at("6h")),
            d3: window(at("3d")),
        },
        alerts,
    }
}

/// The SLO state of every configured flow with an objective.
#[derive(Debug, Default)]
pub struct Slos {
    /// In the config's order.
    flows: Vec<FlowSlo>,
    /// Flow name → index in `flows`.
    index: HashMap<String, usize>,
}

impl Slos {
    /// Rings for each flow of `flows` with an objective (a repeated name: the first).
    pub fn new(flows: &[FlowConfig]) -> Self {
        let mut slos = Self::default();
        for flow in flows {
            let has_objective = flow.correctness_objective.is_some() || flow.check_to_use_p99_ms.is_some();
            if has_objective && !slos.index.contains_key(&flow.name) {
                slos.index.insert(flow.name.clone(), slos.flows.len());
                slos.flows.push(FlowSlo::new(flow.clone()));
            }
        }
        slos
    }

    /// Records an act (see [`FlowSlo::record_act`]) if its flow has objectives.
    pub fn record_act(&self, flow: Option<&str>, at_ms: u64, result: &str, gap_ms: Option<u64>) {
        if let Some(&i) = flow.and_then(|f| self.index.get(f)) {
            self.flows[i].record_act(at_ms, result, gap_ms);
        }
    }

    /// The report of `GET /v1/slo` at `now_ms`.
    pub fn report(&self, now_ms: u64) -> api::SloResponse {
        api::SloResponse { flows: self.flows.iter().map(|f| f.report(now_ms)).collect() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_100_000; // a multiple of 10 s and of 5 min

    fn flow(correctness: Option<f64>, p99_ms: Option<u64>) -> FlowConfig {
        FlowConfig { name: "checkout".into(), check_to_use_p99_ms: p99_ms, correctness_objective: correctness }
    }

    fn committed(n: u64) -> Counts {
        Counts { committed: n, ..Counts::default() }
    }

    #[test]
    fn windows_parse() {
        assert_eq!(WINDOWS.map(window_ms), [300_000, 1_800_000, 3_600_000, 21_600_000, 259_200_000]);
        assert_eq!(T0 % COARSE_BUCKET_MS, 0);
    }

    #[test]
    fn an_event_is_in_a_window_exactly_while_its_bucket_is() {
        let ring = Ring::new(FINE_BUCKET_MS, FINE_SPAN_MS);
        let five_min = window_ms("5m");
        // At the start of a bucket and at its last millisecond.
        ring.add(T0, committed(1));
        ring.add(T0 + 9_999, committed(10));
        ring.add(T0 + 10_000, committed(100));
        assert_eq!(ring.sum(T0 - 1, five_min).committed, 0, "a later bucket is not in the window yet");
        assert_eq!(ring.sum(T0, five_min).committed, 11, "the bucket is the unit");
        assert_eq!(ring.sum(T0 + 9_999, five_min).committed, 11);
        assert_eq!(ring.sum(T0 + 10_000, five_min).committed, 111);
        // The 5m window is the 30 buckets ending with the current one: T0's bucket is in it
        // up to T0 + 5m − 1 ms, and out from T0 + 5m.
        assert_eq!(ring.sum(T0 + five_min - 1, five_min).committed, 111);
        assert_eq!(ring.sum(T0 + five_min, five_min).committed, 100);
        assert_eq!(ring.sum(T0 + five_min + 9_999, five_min).committed, 100);
        assert_eq!(ring.sum(T0 + five_min + 10_000, five_min).committed, 0);
        // The same events in the longer windows.
        assert_eq!(ring.sum(T0 + five_min + 10_000, window_ms("30m")).committed, 111);
        assert_eq!(ring.sum(T0 + FINE_SPAN_MS - 1, FINE_SPAN_MS).committed, 111);
        assert_eq!(ring.sum(T0 + FINE_SPAN_MS, FINE_SPAN_MS).committed, 100);
    }

    #[test]
    fn a_reused_bucket_forgets_its_old_interval_and_old_events_are_dropped() {
        let ring = Ring::new(FINE_BUCKET_MS, 60_000); // 6 buckets + 2
        ring.add(T0, committed(5));
        let lap = 8 * FINE_BUCKET_MS; // the same slot, one lap later
        ring.add(T0 + lap, Counts { stale_check: 1, ..Counts::default() });
        assert_eq!(ring.sum(T0 + lap, 60_000), Counts { stale_check: 1, ..Counts::default() });
        // An event of the interval the slot held before: too old to keep.
        ring.add(T0 + 1, committed(7));
        assert_eq!(ring.sum(T0 + lap, 60_000).committed, 0);
        assert_eq!(ring.sum(T0, 60_000).committed, 0, "T0's bucket now holds a later interval");
    }

    #[test]
    fn the_3d_window_uses_5_minute_buckets() {
        let slo = FlowSlo::new(flow(Some(0.99), Some(500)));
        slo.record_act(T0, "committed", Some(400));
        slo.record_act(T0 + 299_999, "stale_check", Some(501));
        slo.record_act(T0 + 300_000, "ticket_expired", Some(500));
        let three_days = window_ms("3d");
        let at = |now: u64, w: &str| slo.counts(now, w);
        assert_eq!(at(T0 + 300_000, "3d"), Counts { committed: 1, stale_check: 1, gaps: 3, gaps_within: 2 });
        assert_eq!(at(T0 + three_days - 1, "3d").gaps, 3);
        assert_eq!(at(T0 + three_days, "3d").gaps, 1, "T0's 5-minute bucket left the window");
        assert_eq!(at(T0 + three_days + 300_000, "3d").gaps, 0);
        // The 6h window, from the fine ring, dropped them long before.
        assert_eq!(at(T0 + FINE_SPAN_MS + 300_000, "6h").gaps, 0);
        assert_eq!(at(T0 + FINE_SPAN_MS + 300_000, "3d").gaps, 3);
    }

    #[test]
    fn sli_and_burn_rate_by_hand() {
        let config = flow(Some(0.999), Some(500));
        // 1000 acts, 4 stale: error 0.004, burn 0.004 / 0.001 = 4. 200 gaps, 190 within:
        // error 0.05, burn 0.05 / 0.01 = 5.
        let c = Counts { committed: 996, stale_check: 4, gaps: 200, gaps_within: 190 };
        let r = report(&config, |_| c);
        let w = &r.windows.m5;
        assert_eq!(w.acts, 1000);
        assert_eq!(w.gaps, 200);
        assert!((w.correctness_sli.unwrap() - 0.996).abs() < 1e-12);
        assert!((w.correctness_burn_rate.unwrap() - 4.0).abs() < 1e-9);
        assert!((w.latency_sli.unwrap() - 0.95).abs() < 1e-12);
        assert!((w.latency_burn_rate.unwrap() - 5.0).abs() < 1e-9);
        // Burn 4 and 5: only the ticket alerts (1×) fire.
        let firing: Vec<(&str, &str)> =
            r.alerts.iter().filter(|a| a.firing).map(|a| (a.name.as_str(), a.long_window.as_str())).collect();
        assert_eq!(
            firing,
            [("GapguardFlowCorrectnessBurnRateTicket", "3d"), ("GapguardFlowLatencyBurnRateTicket", "3d")]
        );
        assert_eq!(r.alerts.len(), 6);
    }

    #[test]
    fn no_events_means_null_slis_and_nothing_fires() {
        let r = report(&flow(Some(0.9999), None), |_| Counts::default());
        let w = &r.windows.d3;
        assert_eq!(
            (w.correctness_sli, w.latency_sli, w.correctness_burn_rate, w.latency_burn_rate),
            (None, None, None, None)
        );
        assert_eq!(r.alerts.len(), 3, "no latency objective, no latency alerts");
        assert!(r.alerts.iter().all(|a| !a.firing && a.slo == "correctness"));
        // Gaps without a latency objective: no latency SLI either.
        let r = report(&flow(Some(0.9999), None), |_| Counts { gaps: 5, gaps_within: 0, ..Counts::default() });
        assert_eq!(r.windows.m5.latency_sli, None);
    }

    /// Objective 0.99: the 14.4× page threshold is an error ratio of 0.144, so 144 stale in
    /// 1000 acts is at it (not firing, as the rules' `>`), 143 below, 145 above.
    #[test]
    fn the_page_fires_above_its_threshold_over_both_windows() {
        let config = flow(Some(0.99), None);
        let page_1h = |long_stale: u64, short_stale: u64| {
            let r = report(&config, |w| match w {
                "1h" => Counts { committed: 1000 - long_stale, stale_check: long_stale, ..Counts::default() },
                "5m" => Counts { committed: 1000 - short_stale, stale_check: short_stale, ..Counts::default() },
                _ => committed(1000),
            });
            let alert = r.alerts.iter().find(|a| a.long_window == "1h").unwrap();
            assert_eq!(
                (alert.name.as_str(), alert.severity.as_str(), alert.factor),
                ("GapguardFlowCorrectnessBurnRatePage", "page", 14.4)
            );
            alert.firing
        };
        assert!(!page_1h(143, 143));
        assert!(!page_1h(144, 144));
        assert!(page_1h(145, 145));
        assert!(!page_1h(145, 144), "the short window must be over too");
        assert!(!page_1h(144, 145), "the long window must be over too");
        assert!(page_1h(1000, 145));
    }

    #[test]
    fn the_slow_page_and_the_ticket_at_their_thresholds() {
        // 6× with objective 0.99: error ratio 0.06. 1× : 0.01.
        assert!(!fires(Some(0.059), Some(0.059), 6.0, 0.99));
        assert!(!fires(Some(0.06), Some(0.06), 6.0, 0.99));
        assert!(fires(Some(0.061), Some(0.061), 6.0, 0.99));
        assert!(!fires(Some(0.0099), Some(0.5), 1.0, 0.99));
        assert!(fires(Some(0.0101), Some(0.0101), 1.0, 0.99));
        assert!(!fires(Some(0.5), None, 1.0, 0.99), "no events in the short window");
        // Through the report: 61 stale in 1000 over 6h and 30m fires the slow page only.
        let config = flow(Some(0.99), None);
        let r = report(&config, |w| match w {
            "6h" | "30m" => Counts { committed: 939, stale_check: 61, ..Counts::default() },
            _ => committed(1000),
        });
        let firing: Vec<&str> = r.alerts.iter().filter(|a| a.firing).map(|a| a.long_window.as_str()).collect();
        assert_eq!(firing, ["6h"]);
        assert!((r.windows.h6.correctness_burn_rate.unwrap() - 6.1).abs() < 1e-9);
    }

    #[test]
    fn the_latency_sli_counts_gaps_at_the_bound_as_within() {
        let slo = FlowSlo::new(flow(None, Some(500)));
        for gap in [0, 499, 500, 501] {
            slo.record_act(T0, "condition_failed", Some(gap));
        }
        slo.record_act(T0, "committed", None); // no ticket: no gap
        assert_eq!(slo.counts(T0, "5m"), Counts { committed: 1, stale_check: 0, gaps: 4, gaps_within: 3 });
        let r = slo.report(T0);
        assert_eq!(r.windows.m5.latency_sli, Some(0.75));
        assert_eq!(r.windows.m5.correctness_sli, Some(1.0));
        assert_eq!(r.windows.m5.correctness_burn_rate, None, "no correctness objective");
        assert_eq!(r.alerts.len(), 3);
    }

    #[test]
    fn only_flows_with_objectives_are_reported() {
        let flows = [
            FlowConfig { name: "plain".into(), check_to_use_p99_ms: None, correctness_objective: None },
            flow(Some(0.99), Some(500)),
        ];
        let slos = Slos::new(&flows);
        slos.record_act(Some("checkout"), T0, "stale_check", Some(10));
        slos.record_act(Some("plain"), T0, "stale_check", Some(10));
        slos.record_act(None, T0, "stale_check", Some(10));
        let r = slos.report(T0);
        assert_eq!(r.flows.len(), 1);
        assert_eq!(r.flows[0].flow, "checkout");
        assert_eq!(r.flows[0].windows.m5.acts, 1);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["flows"][0]["windows"]["5m"]["correctness_sli"], 0.0);
        assert_eq!(json["flows"][0]["objectives"]["check_to_use_p99_ms"], 500);
        assert!(json["flows"][0]["windows"]["3d"].is_object());
    }
}
