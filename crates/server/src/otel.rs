//! Traces: the request span (its parent from an incoming W3C `traceparent`), the `toctou.*`
//! attributes of DESIGN §4 on check and act spans, and an OTLP JSON Lines file exporter (the
//! format of the OpenTelemetry collector's file exporter: one `TracesData` object per line).

use std::fs::File;
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::http::HeaderMap;
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

/// Sets the `toctou.*` attributes of a check or use span.
pub fn set_toctou(span: &tracing::Span, role: &'static str, keys: &[String], flow: Option<&str>) {
    span.set_attribute("toctou.role", role);
    if !keys.is_empty() {
        span.set_attribute("toctou.resource.key", keys.join(","));
    }
    if let Some(flow) = flow {
        span.set_attribute("toctou.flow", flow.to_owned());
    }
}

/// A tracer provider that appends finished spans to `path` as OTLP JSON Lines (batched; call
/// its `shutdown` on exit to flush).
pub fn file_provider(path: &Path) -> std::io::Result<SdkTracerProvider> {
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let resource = Resource::builder_empty().with_service_name("gapguard").build();
    let exporter = JsonLinesExporter { file: Mutex::new(file), resource: resource.clone() };
    Ok(SdkTracerProvider::builder().with_resource(resource).with_batch_exporter(exporter).build())
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

/// The display keys of conditions (and then ops), in order, without repeats: a span's
/// `toctou.resource.key`.
pub fn resource_keys<'a>(
    conditions: impl IntoIterator<Item = &'a gapguard_core::Condition>,
    ops: impl IntoIterator<Item = &'a gapguard_core::Op>,
) -> Vec<String> {
    fn push(keys: &mut Vec<String>, key: std::borrow::Cow<'_, str>) {
        let key = gapguard_core::primitives::display_key(&key).into_owned();
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let mut keys = Vec::new();
    conditions.into_iter().for_each(|c| push(&mut keys, c.key()));
    if keys.is_empty() {
        ops.into_iter().for_each(|o| push(&mut keys, o.key()));
    }
    keys
}
