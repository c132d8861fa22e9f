//! Traces: the request span (its parent from an incoming W3C `traceparent`), the `toctou.*`
//! attributes of DESIGN §4 on check, act, write and revocation spans, and the exporters: an
//! OTLP JSON Lines file (the format of the OpenTelemetry collector's file exporter: one
//! `TracesData` object per line) and OTLP/HTTP with protobuf (`opentelemetry-otlp`).

use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
use gapguard_core::{Condition, ConditionFailure, NsKey, Outcome, Refusal, Revision};
use gapguard_engine::Snapshot;
use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, KeyValue, Value};
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use serde_json::{json, Value as Json};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The attribute of the link from a use span to its check span.
pub const LINK_ATTRIBUTE: &str = "toctou.link";

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// Makes the W3C `traceparent` (and `tracestate`) of `headers`, if valid, the parent of `span`.
/// Without the OpenTelemetry layer installed this does nothing.
pub fn set_remote_parent(span: &tracing::Span, headers: &HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
}

/// The (trace id, span id) of `span` in lowercase hex, if it is exported.
pub fn ids(span: &tracing::Span) -> Option<Box<(String, String)>> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| Box::new((sc.trace_id().to_string(), sc.span_id().to_string())))
}

/// Links `span` to the check span whose ids a ticket carries, with `toctou.link = "check"`.
pub fn link_to_check(span: &tracing::Span, trace_id: &str, span_id: &str) {
    let (Ok(trace_id), Ok(span_id)) = (TraceId::from_hex(trace_id), SpanId::from_hex(span_id)) else { return };
    let check = SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, true, TraceState::default());
    span.add_link_with_attributes(check, vec![KeyValue::new(LINK_ATTRIBUTE, "check")]);
}

/// A resource a check or act concerns: the key it reads (internal for primitives) and how a
/// span names it (`toctou.resource.key`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceKey {
    /// The namespace-relative key as stored.
    pub key: String,
    /// The key as users write it (a primitive's internal key is shown by its name).
    pub display: String,
}

impl ResourceKey {
    /// A user key (its display name is itself).
    pub fn user(key: &str) -> Self {
        Self { key: key.to_owned(), display: key.to_owned() }
    }
}

/// Sets `toctou.role`, `toctou.resource.key` (the display keys, comma-separated) and
/// `toctou.flow` on a span. Spans that are not exported cost nothing here.
pub fn set_toctou(span: &tracing::Span, role: &'static str, resources: &[ResourceKey], flow: Option<&str>) {
    if span.is_disabled() {
        return;
    }
    span.set_attribute("toctou.role", role);
    match resources {
        [] => {}
        [one] => span.set_attribute("toctou.resource.key", one.display.clone()),
        many => span.set_attribute(
            "toctou.resource.key",
            many.iter().map(|r| r.display.as_str()).collect::<Vec<_>>().join(","),
        ),
    }
    if let Some(flow) = flow {
        span.set_attribute("toctou.flow", flow.to_owned());
    }
}

/// The attribute that marks the span of an idempotent replay, which applied nothing and so
/// carries no `toctou.*` attributes (see `routes::write_with`).
pub const REPLAY_ATTRIBUTE: &str = "gapguard.idempotent_replay";

/// Marks `span` as an idempotent replay's ([`REPLAY_ATTRIBUTE`]).
pub fn mark_replay(span: &tracing::Span) {
    span.set_attribute(REPLAY_ATTRIBUTE, true);
}

/// Sets `toctou.role = mutate` and the resources on `span`.
pub fn set_mutate(span: &tracing::Span, resources: &[ResourceKey]) {
    set_toctou(span, "mutate", resources, None);
}

/// Sets `toctou.resource.version`, the version each resource had when the request was
/// evaluated (0: absent): an integer for one resource, an array of integers in the order of
/// `toctou.resource.key` for several. Left out when a version is not known exactly (the key
/// changed again before it could be read back).
pub fn set_versions(span: &tracing::Span, versions: &[Option<u64>]) {
    let as_i64 = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    match versions {
        [] => {}
        [Some(v)] => span.set_attribute("toctou.resource.version", as_i64(*v)),
        many if many.len() > 1 && many.iter().all(Option::is_some) => span.set_attribute(
            "toctou.resource.version",
            Value::Array(Array::I64(many.iter().flatten().map(|v| as_i64(*v)).collect())),
        ),
        _ => {}
    }
}

/// Sets `toctou.authz.decision` (`allow` | `deny`) and `enduser.id` (the subject of the first
/// `permitted` condition) when the request had a `permitted` condition that was evaluated.
pub fn set_authz(span: &tracing::Span, decision: Option<bool>, subject: Option<&str>) {
    if let Some(allowed) = decision {
        span.set_attribute("toctou.authz.decision", if allowed { "allow" } else { "deny" });
        if let Some(subject) = subject {
            span.set_attribute("enduser.id", subject.to_owned());
        }
    }
}

/// The subject of the first `permitted` condition, if there is one.
pub fn permitted_subject<'a>(conditions: impl IntoIterator<Item = &'a Condition>) -> Option<&'a str> {
    conditions.into_iter().find_map(|c| match c {
        Condition::Permitted { subject, .. } => Some(subject.as_str()),
        _ => None,
    })
}

fn has_permitted<'a>(conditions: impl IntoIterator<Item = &'a Condition>) -> bool {
    permitted_subject(conditions).is_some()
}

/// The authorization decision of a check: `None` without a `permitted` condition, else
/// whether every `permitted` condition held (`failed`: the conditions that did not hold).
pub fn check_decision(conditions: &[Condition], failed: &[ConditionFailure]) -> Option<bool> {
    has_permitted(conditions).then(|| !has_permitted(failed.iter().map(|f| &f.condition)))
}

/// The authorization decision of an act, from its outcome: `None` when it has no `permitted`
/// condition or when that condition was not evaluated (refused before it: an expired or used
/// ticket, or a stale ticket when the `permitted` condition is among the act's own).
pub fn act_decision(ticket: &[Condition], own: &[Condition], outcome: &Outcome) -> Option<bool> {
    let (in_ticket, in_own) = (has_permitted(ticket), has_permitted(own));
    if !in_ticket && !in_own {
        return None;
    }
    let denied = |failed: &[ConditionFailure]| has_permitted(failed.iter().map(|f| &f.condition));
    match outcome {
        Outcome::Acted { .. } | Outcome::Refused(Refusal::OpFailed { .. }) => Some(true),
        Outcome::Refused(Refusal::StaleCheck { changed }) if denied(changed) => Some(false),
        // The ticket's conditions all held or a non-permitted one failed; the act's own were
        // not evaluated.
        Outcome::Refused(Refusal::StaleCheck { .. }) => in_ticket.then_some(true),
        Outcome::Refused(Refusal::ConditionFailed { failed }) => Some(!denied(failed)),
        _ => None,
    }
}

/// The version of each resource as of revision `at` (0: absent), read from `snapshot`, a
/// state at or after `at`: known when the key has not changed since `at`, or, for a key that
/// the committed write at `written_at` changed, derived from what that write did (a put on a
/// live key bumps its version by one; a key it created was absent), unless that write changed
/// it more than once (`rewritten`: see [`rewritten`]).
pub fn versions_seen(
    snapshot: &Snapshot,
    ns: &str,
    resources: &[ResourceKey],
    at: Revision,
    written_at: Option<Revision>,
    rewritten: &std::collections::BTreeSet<String>,
) -> Vec<Option<u64>> {
    resources
        .iter()
        .map(|resource| {
            // No entry: never written (a tombstone is compacted only long after any request
            // that could have seen the key live).
            let Some(entry) = snapshot.entries.get(&NsKey::new(ns, resource.key.as_str())) else { return Some(0) };
            if entry.changed_at <= at {
                return Some(entry.record.as_ref().map_or(0, |r| r.version));
            }
            match (&entry.record, written_at) {
                // Written twice or more by the request (a put then an add, a delete then a
                // put): what it was before cannot be read back from what it is after.
                (_, Some(w))
                    if entry.changed_at == w
                        && rewritten.iter().any(|r| {
                            *r == resource.key || (r.ends_with('/') && resource.key.starts_with(r.as_str()))
                        }) =>
                {
                    None
                }
                (Some(r), Some(w)) if entry.changed_at == w && r.create_revision == w => Some(0),
                (Some(r), Some(w)) if entry.changed_at == w => Some(r.version - 1),
                _ => None,
            }
        })
        .collect()
}

/// The keys that more than one of `ops` writes. A reservation's commit or release writes its
/// pool too, which its op does not name: with two or more ops on reservations or pools, every
/// pool counts as rewritten (the set holds the pools' key prefix, which ends in `/`).
pub fn rewritten(ops: &[gapguard_core::Op]) -> std::collections::BTreeSet<String> {
    use gapguard_core::Op;
    let mut seen = std::collections::BTreeSet::new();
    let mut twice: std::collections::BTreeSet<String> =
        ops.iter().map(|op| op.key().into_owned()).filter(|key| !seen.insert(key.clone())).collect();
    let on_pools = ops.iter().filter(|op| matches!(op, Op::Reserve { .. } | Op::Commit { .. } | Op::Release { .. }));
    if on_pools.count() >= 2 {
        twice.insert(gapguard_core::primitives::kind_prefix("pool/"));
    }
    twice
}

/// Why spans cannot be exported where the config says.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExportError {
    /// The trace file cannot be opened for appending.
    #[error("cannot open the trace file {path}: {source}")]
    TraceFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The OTLP exporter cannot be built.
    #[error("cannot export spans to {url}: {message}")]
    Otlp {
        /// The traces URL.
        url: String,
        /// Why.
        message: String,
    },
}

/// The tracer provider of `serve`: finished spans go, in batches from the SDK's own thread
/// (never on a request's path), to the OTLP JSON Lines file and/or over OTLP/HTTP (protobuf)
/// to `otlp_traces_url` (see [`crate::config::otlp_traces_url`]). `None` when neither is
/// configured: request spans are then not even created. Call its `shutdown` on exit to flush.
pub fn tracer_provider(
    trace_file: Option<&Path>,
    otlp_traces_url: Option<&str>,
) -> Result<Option<SdkTracerProvider>, ExportError> {
    if trace_file.is_none() && otlp_traces_url.is_none() {
        return Ok(None);
    }
    let resource = service_resource();
    let mut builder = SdkTracerProvider::builder().with_resource(resource.clone());
    if let Some(path) = trace_file {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| ExportError::TraceFile { path: path.to_owned(), source })?;
        builder = builder.with_batch_exporter(JsonLinesExporter { file: Mutex::new(file), resource });
    }
    if let Some(url) = otlp_traces_url {
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(url)
            .build()
            .map_err(|e| ExportError::Otlp { url: url.to_owned(), message: e.to_string() })?;
        builder = builder.with_batch_exporter(exporter);
    }
    Ok(Some(builder.build()))
}

fn service_resource() -> Resource {
    Resource::builder_empty().with_service_name("gapguard").build()
}

/// Writes each exported batch as one OTLP/JSON `TracesData` line.
#[derive(Debug)]
pub struct JsonLinesExporter {
    file: Mutex<File>,
    resource: Resource,
}

impl SpanExporter for JsonLinesExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if batch.is_empty() {
            return Ok(());
        }
        let mut line = serde_json::to_vec(&traces_data(&self.resource, &batch))
            .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?;
        line.push(b'\n');
        let mut file = self.file.lock().map_err(|_| OTelSdkError::InternalFailure("poisoned".into()))?;
        file.write_all(&line).and_then(|()| file.flush()).map_err(|e| OTelSdkError::InternalFailure(e.to_string()))
    }

    fn shutdown_with_timeout(&self, _timeout: std::time::Duration) -> OTelSdkResult {
        let file = self.file.lock().map_err(|_| OTelSdkError::InternalFailure("poisoned".into()))?;
        file.sync_data().map_err(|e| OTelSdkError::InternalFailure(e.to_string()))
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.resource = resource.clone();
    }
}

/// The OTLP/JSON `TracesData` of a batch: ids in hex, times as decimal strings, spans grouped
/// by instrumentation scope.
pub fn traces_data(resource: &Resource, batch: &[SpanData]) -> Json {
    let mut scopes: Vec<(&opentelemetry::InstrumentationScope, Vec<Json>)> = Vec::new();
    for span in batch {
        let json = span_json(span);
        match scopes.iter_mut().find(|(scope, _)| *scope == &span.instrumentation_scope) {
            Some((_, spans)) => spans.push(json),
            None => scopes.push((&span.instrumentation_scope, vec![json])),
        }
    }
    let scope_spans: Vec<Json> = scopes
        .into_iter()
        .map(|(scope, spans)| {
            let mut s = json!({"name": scope.name()});
            if let Some(version) = scope.version() {
                s["version"] = json!(version);
            }
            json!({"scope": s, "spans": spans})
        })
        .collect();
    let resource_attributes: Vec<Json> = resource.iter().map(|(k, v)| attribute(k.as_str(), v)).collect();
    json!({"resourceSpans": [{"resource": {"attributes": resource_attributes}, "scopeSpans": scope_spans}]})
}

fn span_json(span: &SpanData) -> Json {
    let sc = &span.span_context;
    let mut out = json!({
        "traceId": sc.trace_id().to_string(),
        "spanId": sc.span_id().to_string(),
        "name": span.name,
        "kind": kind(&span.span_kind),
        "startTimeUnixNano": nanos(span.start_time).to_string(),
        "endTimeUnixNano": nanos(span.end_time).to_string(),
        "attributes": span.attributes.iter().map(|kv| attribute(kv.key.as_str(), &kv.value)).collect::<Vec<_>>(),
    });
    if span.parent_span_id != SpanId::INVALID {
        out["parentSpanId"] = json!(span.parent_span_id.to_string());
    }
    let state = sc.trace_state().header();
    if !state.is_empty() {
        out["traceState"] = json!(state);
    }
    if !span.links.is_empty() {
        let links: Vec<Json> = span
            .links
            .iter()
            .map(|link| {
                json!({
                    "traceId": link.span_context.trace_id().to_string(),
                    "spanId": link.span_context.span_id().to_string(),
                    "attributes": link.attributes.iter().map(|kv| attribute(kv.key.as_str(), &kv.value)).collect::<Vec<_>>(),
                })
            })
            .collect();
        out["links"] = json!(links);
    }
    if !span.events.is_empty() {
        let events: Vec<Json> = span
            .events
            .iter()
            .map(|e| {
                json!({
                    "timeUnixNano": nanos(e.timestamp).to_string(),
                    "name": e.name,
                    "attributes": e.attributes.iter().map(|kv| attribute(kv.key.as_str(), &kv.value)).collect::<Vec<_>>(),
                })
            })
            .collect();
        out["events"] = json!(events);
    }
    match &span.status {
        Status::Unset => {}
        Status::Ok => out["status"] = json!({"code": 1}),
        Status::Error { description } => out["status"] = json!({"code": 2, "message": description}),
    }
    out
}

/// OTLP `SpanKind` numbers.
fn kind(kind: &SpanKind) -> u8 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

fn nanos(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

fn attribute(key: &str, value: &Value) -> Json {
    json!({"key": key, "value": any_value(value)})
}

fn any_value(value: &Value) -> Json {
    match value {
        Value::Bool(b) => json!({"boolValue": b}),
        // OTLP/JSON encodes 64-bit integers as strings.
        Value::I64(i) => json!({"intValue": i.to_string()}),
        Value::F64(f) => json!({"doubleValue": f}),
        Value::String(s) => json!({"stringValue": s.as_str()}),
        Value::Array(a) => {
            let values: Vec<Json> = match a {
                Array::Bool(v) => v.iter().map(|b| json!({"boolValue": b})).collect(),
                Array::I64(v) => v.iter().map(|i| json!({"intValue": i.to_string()})).collect(),
                Array::F64(v) => v.iter().map(|f| json!({"doubleValue": f})).collect(),
                Array::String(v) => v.iter().map(|s| json!({"stringValue": s.as_str()})).collect(),
                _ => Vec::new(),
            };
            json!({"arrayValue": {"values": values}})
        }
        other => json!({"stringValue": other.to_string()}),
    }
}

/// The resources of conditions (or, without conditions, of ops), in order, without repeats:
/// what a span's `toctou.resource.*` attributes describe.
pub fn resource_keys<'a>(
    conditions: impl IntoIterator<Item = &'a Condition>,
    ops: impl IntoIterator<Item = &'a gapguard_core::Op>,
) -> Vec<ResourceKey> {
    fn push(resources: &mut Vec<ResourceKey>, key: std::borrow::Cow<'_, str>) {
        if !resources.iter().any(|r| r.key == *key) {
            let display = gapguard_core::primitives::display_key(&key).into_owned();
            resources.push(ResourceKey { key: key.into_owned(), display });
        }
    }
    let mut resources = Vec::new();
    conditions.into_iter().for_each(|c| push(&mut resources, c.key()));
    if resources.is_empty() {
        ops.into_iter().for_each(|o| push(&mut resources, o.key()));
    }
    resources
}

#[cfg(test)]
mod tests {
    use super::*;
    use gapguard_core::Op;

    #[test]
    fn keys_written_twice_and_pools_under_two_reservation_ops_count_as_rewritten() {
        let put = |key: &str| Op::Put { key: key.into(), value: serde_json::json!(1) };
        let commit = |id: &str| Op::Commit { reservation: id.into() };
        assert!(rewritten(&[put("a"), put("b")]).is_empty());
        assert_eq!(rewritten(&[put("a"), put("b"), put("a")]).into_iter().collect::<Vec<_>>(), ["a"]);
        let pools = rewritten(&[commit("r1"), commit("r2")]);
        assert!(pools.contains(&gapguard_core::primitives::kind_prefix("pool/")), "{pools:?}");
        assert!(rewritten(&[commit("r1"), put("a")]).is_empty());
    }
}
