//! `/metrics`: the gap and everything around it as Prometheus metrics (DESIGN §4), in the
//! OpenMetrics text format of the `prometheus-client` crate.
//!
//! The engine reports checks, writes and commits through its [`Observer`] hook; this module
//! turns them into counters and histograms, adds the HTTP metrics (a middleware keyed by the
//! matched route), and reads the orphan gauge from the snapshot at scrape time. Label values
//! are bounded: namespaces and flows are named only if the config names them, else `other`.
//! `docs/metrics.md` lists every metric.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use gapguard_core::{Condition, ConditionFailure, Op, OpError, OpResult, Outcome, Refusal, WriteRequest};
use gapguard_engine::Observer;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::error::ApiError;
use crate::routes::AppState;
use crate::slo::Slos;

/// The label value of every namespace and flow the config does not name.
pub const OTHER: &str = "other";

/// The route label of requests no route matched.
pub const UNMATCHED: &str = "unmatched";

/// Which namespaces and flows get a label of their own.
#[derive(Clone, Debug, Default)]
pub struct LabelNames {
    /// Namespaces named in the config (`metrics_namespaces`).
    pub namespaces: HashSet<String>,
    /// Flows named in the config (`[[flow]]` names).
    pub flows: HashSet<String>,
    /// Bucket boundaries of `gapguard_check_to_use_seconds` (see
    /// [`crate::rules::check_to_use_buckets_seconds`]; empty: the base list).
    pub check_to_use_buckets: Vec<f64>,
    /// The flows whose SLIs `GET /v1/slo` computes (those with an objective; the others are
    /// ignored).
    pub slo_flows: Vec<crate::config::FlowConfig>,
}

impl LabelNames {
    fn namespace(&self, ns: &str) -> String {
        if self.namespaces.contains(ns) {
            ns.to_owned()
        } else {
            OTHER.to_owned()
        }
    }

    /// A request without a flow counts as `other` too.
    fn flow(&self, flow: Option<&str>) -> String {
        match flow {
            Some(f) if self.flows.contains(f) => f.to_owned(),
            _ => OTHER.to_owned(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    namespace: String,
    flow: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GapLabels {
    namespace: String,
    flow: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReservationLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    route: String,
    method: String,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpRouteLabels {
    route: String,
    method: String,
}

/// Builds each labelled histogram of a family with the same buckets.
#[derive(Clone)]
struct Buckets(std::sync::Arc<[f64]>);

impl MetricConstructor<Histogram> for Buckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(self.0.iter().copied())
    }
}

/// HTTP request latency, in seconds.
const HTTP_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// Every metric the server exports.
pub struct Metrics {
    registry: Registry,
    names: LabelNames,
    slos: Slos,
    check_to_use: Family<GapLabels, Histogram, Buckets>,
    checks: Family<ResultLabels, Counter>,
    acts: Family<ResultLabels, Counter>,
    authz_mismatch: Counter,
    revoked_use_attempts: Counter,
    reservations: Family<ReservationLabels, Counter>,
    orphans: Family<KindLabels, Gauge>,
    compensations: Counter,
    idempotent_replays: Counter,
    idempotency_conflicts: Counter,
    fencing_rejections: Counter,
    storage_retries: Counter,
    commit_batch_size: Histogram,
    commit_seconds: Histogram,
    http_requests: Family<HttpLabels, Counter>,
    http_request_seconds: Family<HttpRouteLabels, Histogram, Buckets>,
    /// Off (`metrics = false`): nothing is recorded and `/metrics` answers 404.
    enabled: bool,
    /// Where `/metrics` is served when it has a listener of its own (`metrics_listen`).
    listener: Option<std::net::SocketAddr>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").field("names", &self.names).finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric. Counters are registered without `_total`: the OpenMetrics
    /// encoder appends it.
    pub fn new(names: LabelNames) -> Self {
        let mut registry = Registry::default();
        let gap_buckets = if names.check_to_use_buckets.is_empty() {
            crate::rules::check_to_use_buckets_seconds(&[])
        } else {
            names.check_to_use_buckets.clone()
        };
        let check_to_use = Family::new_with_constructor(Buckets(gap_buckets.into()));
        registry.register(
            "gapguard_check_to_use_seconds",
            "Time from a ticket's check to the act presenting it, by the act's outcome",
            check_to_use.clone(),
        );
        let checks = Family::default();
        registry.register("gapguard_checks", "Checks, by result (passed, check_failed)", checks.clone());
        let acts = Family::default();
        registry.register("gapguard_acts", "Acts, by result (committed or the refusal's error code)", acts.clone());
        let authz_mismatch = Counter::default();
        registry.register(
            "gapguard_authz_mismatch",
            "Acts whose ticket's permitted condition held at check but not at use",
            authz_mismatch.clone(),
        );
        let revoked_use_attempts = Counter::default();
        registry.register(
            "gapguard_revoked_use_attempts",
            "Checks and acts refused because a permitted condition did not hold",
            revoked_use_attempts.clone(),
        );
        let reservations = Family::default();
        registry.register("gapguard_reservations", "Reservation changes and refusals, by result", reservations.clone());
        let orphans = Family::default();
        registry.register("gapguard_orphans", "Unresolved orphans, by kind", orphans.clone());
        let compensations = Counter::default();
        registry.register("gapguard_compensations", "Orphans marked compensated", compensations.clone());
        let idempotent_replays = Counter::default();
        registry.register(
            "gapguard_idempotent_replays",
            "Requests answered with the stored response of their Idempotency-Key",
            idempotent_replays.clone(),
        );
        let idempotency_conflicts = Counter::default();
        registry.register(
            "gapguard_idempotency_conflicts",
            "Requests refused because their Idempotency-Key was used with a different request",
            idempotency_conflicts.clone(),
        );
        let storage_retries = Counter::default();
        registry.register(
            "gapguard_storage_retries",
            "Batches run again after losing a race in a shared database (serialization failure or deadlock)",
            storage_retries.clone(),
        );
        let fencing_rejections = Counter::default();
        registry.register(
            "gapguard_fencing_rejections",
            "Requests refused for a stale fencing token (lease_lost, or a failed lease condition)",
            fencing_rejections.clone(),
        );
        let commit_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 11));
        registry.register("gapguard_commit_batch_size", "Write requests per group commit", commit_batch_size.clone());
        let commit_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 16));
        registry.register(
            "gapguard_commit_seconds",
            "Time of one group commit to storage (write and fsync)",
            commit_seconds.clone(),
        );
        let http_requests = Family::default();
        registry.register(
            "gapguard_http_requests",
            "HTTP requests, by matched route, method and status",
            http_requests.clone(),
        );
        let http_request_seconds = Family::new_with_constructor(Buckets(HTTP_BUCKETS.into()));
        registry.register(
            "gapguard_http_request_seconds",
            "Time to answer an HTTP request (to the response head), by matched route and method",
            http_request_seconds.clone(),
        );
        Self {
            registry,
            slos: Slos::new(&names.slo_flows),
            names,
            check_to_use,
            checks,
            acts,
            authz_mismatch,
            revoked_use_attempts,
            reservations,
            orphans,
            compensations,
            idempotent_replays,
            idempotency_conflicts,
            fencing_rejections,
            storage_retries,
            commit_batch_size,
            commit_seconds,
            http_requests,
            http_request_seconds,
            enabled: true,
            listener: None,
        }
    }

    /// Metrics that are off (`metrics = false`): the engine is given no observer, the HTTP
    /// middleware is not installed, and `/metrics` answers 404.
    pub fn off() -> Self {
        Self { enabled: false, ..Self::new(LabelNames::default()) }
    }

    /// Whether metrics are recorded and served.
    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    /// Records that `/metrics` is served on a listener of its own at `addr`: the API
    /// listener's `/metrics` then answers 404, naming it.
    pub fn served_on(mut self, addr: std::net::SocketAddr) -> Self {
        self.listener = Some(addr);
        self
    }

    /// An act refused before it reached the engine because its ticket's signature is bad
    /// (`invalid_ticket`): no claims, so no gap to observe.
    pub(crate) fn act_rejected(&self, ns: &str, flow: Option<&str>, result: &'static str) {
        let labels = ResultLabels { namespace: self.names.namespace(ns), flow: self.names.flow(flow), result };
        self.acts.get_or_create(&labels).inc();
    }

    /// The metrics in the OpenMetrics text format, with the orphan gauge set from `orphans`.
    fn render(&self, orphans: gapguard_engine::OrphanCounts) -> Result<String, std::fmt::Error> {
        self.orphans.get_or_create(&KindLabels { kind: "reservation" }).set(gauge(orphans.reservations));
        self.orphans.get_or_create(&KindLabels { kind: "lease" }).set(gauge(orphans.leases));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry)?;
        Ok(text)
    }

    /// Counts what a refusal says about permissions and fencing.
    fn refusal(&self, refusal: &Refusal) {
        match refusal {
            Refusal::StaleCheck { changed } => self.failures(changed, true),
            Refusal::ConditionFailed { failed } => self.failures(failed, false),
            Refusal::OpFailed { error, .. } => self.op_error(error),
            _ => {}
        }
    }

    /// Failed conditions of a check (`stale`: of a ticket, at use) or of an act's own.
    fn failures(&self, failures: &[ConditionFailure], stale: bool) {
        if failures.iter().any(|f| matches!(f.condition, Condition::Permitted { .. })) {
            self.revoked_use_attempts.inc();
            if stale {
                self.authz_mismatch.inc();
            }
        }
        if failures.iter().any(|f| matches!(f.condition, Condition::Lease { .. })) {
            self.fencing_rejections.inc();
        }
    }

    fn op_error(&self, error: &OpError) {
        match error {
            OpError::LeaseLost { .. } => self.fencing_rejections.inc(),
            OpError::Insufficient { .. }
            | OpError::ReservationNotFound { .. }
            | OpError::ReservationCommitted { .. }
            | OpError::ReservationReleased { .. }
            | OpError::ReservationExpired { .. } => self.reservation(error.code()),
            _ => 0,
        };
    }

    fn reservation(&self, result: &'static str) -> u64 {
        self.reservations.get_or_create(&ReservationLabels { result }).inc()
    }

    /// Counts what committed ops did to reservations and orphans.
    fn op_results<'r>(&self, results: impl IntoIterator<Item = &'r OpResult>, request: &WriteRequest) {
        for result in results {
            match result {
                OpResult::Reserve { .. } => self.reservation("reserved"),
                OpResult::Commit { .. } => self.reservation("committed"),
                OpResult::Release { .. } => self.reservation("released"),
                OpResult::Resolve { .. } => self.compensations.inc(),
                OpResult::Expire { orphan: Some(_) } => match request {
                    WriteRequest::Single { op: Op::ExpireReservation { .. }, .. } => self.reservation("expired"),
                    _ => 0,
                },
                _ => 0,
            };
        }
    }

    /// The report of `GET /v1/slo` at `now_ms` (the engine clock).
    pub fn slo_report(&self, now_ms: u64) -> gapguard_api::SloResponse {
        self.slos.report(now_ms)
    }

    fn act(&self, act: &gapguard_core::Act, outcome: &Outcome, now_ms: u64) {
        let claims = act.ticket.as_ref().map(|t| t.claims());
        let raw_flow = act.flow.as_deref().or_else(|| claims.and_then(|c| c.flow.as_deref()));
        let (namespace, flow) = (self.names.namespace(&act.ns), self.names.flow(raw_flow));
        let result = match outcome {
            Outcome::Refused(refusal) => refusal.code(),
            _ => "committed",
        };
        let gap_ms = claims.map(|claims| match outcome {
            Outcome::Acted { check_to_use_ms: Some(ms), .. } => *ms,
            _ => now_ms.saturating_sub(claims.issued_at_ms),
        });
        if let Some(gap_ms) = gap_ms {
            let labels = GapLabels { namespace: namespace.clone(), flow: flow.clone(), outcome: result };
            self.check_to_use.get_or_create(&labels).observe(gap_ms as f64 / 1000.0);
        }
        self.slos.record_act(raw_flow, now_ms, result, gap_ms);
        self.acts.get_or_create(&ResultLabels { namespace, flow, result }).inc();
    }
}

/// A count as a gauge value (saturating: no namespace holds 2^63 orphans).
fn gauge(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Observer for Metrics {
    fn checked(&self, ns: &str, flow: Option<&str>, failed: &[ConditionFailure]) {
        let result = if failed.is_empty() { "passed" } else { "check_failed" };
        let labels = ResultLabels { namespace: self.names.namespace(ns), flow: self.names.flow(flow), result };
        self.checks.get_or_create(&labels).inc();
        self.failures(failed, false);
    }

    fn written(&self, request: &WriteRequest, outcome: &Outcome, now_ms: u64) {
        if let WriteRequest::Act(act) = request {
            self.act(act, outcome, now_ms);
        }
        match outcome {
            Outcome::Refused(refusal) => self.refusal(refusal),
            Outcome::Acted { results, .. } | Outcome::Txn { results, .. } => self.op_results(results, request),
            Outcome::Applied { result, .. } => self.op_results([result], request),
            _ => {}
        }
    }

    fn replayed(&self) {
        self.idempotent_replays.inc();
    }

    fn idempotency_conflict(&self) {
        self.idempotency_conflicts.inc();
    }

    fn committed(&self, n_requests: usize, elapsed: Duration) {
        self.commit_batch_size.observe(n_requests as f64);
        self.commit_seconds.observe(elapsed.as_secs_f64());
    }

    fn storage_retried(&self) {
        self.storage_retries.inc();
    }
}

/// A method's label: the standard ones by name, anything else `other` (bounded).
fn method_label(method: &Method) -> &'static str {
    match method.as_str() {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        _ => OTHER,
    }
}

/// `GET /metrics` on the API listener: the metrics, unless they are off or served on a
/// listener of their own.
pub(crate) async fn scrape(State(state): State<AppState>) -> Response {
    if !state.metrics.enabled {
        return ApiError::not_found("metrics are off (metrics = false in the config)").into_response();
    }
    if let Some(addr) = state.metrics.listener {
        return ApiError::not_found(format!("metrics are served on their own listener, http://{addr}/metrics"))
            .into_response();
    }
    render_response(&state)
}

/// The router of the metrics listener (`metrics_listen`): `GET /metrics` (needing a key only
/// if `metrics_require_key` says so) and `GET /healthz`.
pub(crate) fn router(state: AppState) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/metrics", get(|State(state): State<AppState>| async move { render_response(&state) }))
        .route("/healthz", get(crate::routes::healthz))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), crate::auth::authorize))
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::new(
                StatusCode::NOT_FOUND,
                gapguard_api::codes::NO_ROUTE,
                format!("no route for {} on the metrics listener; see /metrics", uri.path()),
            )
        })
        .with_state(state)
}

fn render_response(state: &AppState) -> Response {
    match state.metrics.render(state.engine.orphan_counts()) {
        Ok(text) => {
            let content_type = HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8");
            ([(header::CONTENT_TYPE, content_type)], text).into_response()
        }
        Err(e) => ApiError::internal(&e).into_response(),
    }
}

impl Metrics {
    /// Counts a request by its matched route's template (`unmatched` for the fallback), method
    /// and status, and records its time from `started` to its response head.
    pub(crate) fn track(&self, route: Option<&str>, method: &Method, started: Instant, status: StatusCode) {
        let route = route.unwrap_or(UNMATCHED).to_owned();
        let labels = HttpRouteLabels { route, method: method_label(method).to_owned() };
        self.http_request_seconds.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
        let status = status.as_u16();
        self.http_requests.get_or_create(&HttpLabels { route: labels.route, method: labels.method, status }).inc();
    }
}
