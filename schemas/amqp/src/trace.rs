//! Traces across services: the W3C trace context (`traceparent`, `tracestate`) carried in AMQP
//! headers, and the OTLP export of spans.
//!
//! Export is off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`)
//! is set; then every process exports its spans over OTLP/HTTP with JSON bodies, named by
//! `OTEL_SERVICE_NAME` or its own service name. With export off no span has a context, so no
//! header is written and nothing is exported: the hot path pays for a disabled span only.

use std::collections::HashMap;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::registry::LookupSpan;

/// The W3C header naming the trace and the parent span.
pub const TRACEPARENT: &str = saga_schemas::amqp::TRACE_HEADERS[0];
/// The W3C header of vendor-specific trace state, passed along unchanged.
pub const TRACESTATE: &str = saga_schemas::amqp::TRACE_HEADERS[1];

const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether spans are exported (an OTLP endpoint is configured and the layer installed).
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The OTLP layer for `service` when an endpoint is configured, else `None` (export off).
/// Call [`shutdown`] before the process exits so the last spans are sent.
pub fn otlp_layer<S>(service: &str) -> Result<Option<Box<dyn Layer<S> + Send + Sync>>, String>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a> + Send + Sync,
{
    let configured = ENDPOINT_VARS
        .iter()
        .any(|var| std::env::var(var).is_ok_and(|v| !v.trim().is_empty()));
    if !configured {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(opentelemetry_otlp::Protocol::HttpJson)
        .build()
        .map_err(|e| format!("the OTLP exporter: {e}"))?;
    let name = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|n| !n.trim().is_empty())
        .unwrap_or_else(|| service.to_owned());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(name)
                .build(),
        )
        .build();
    let tracer = provider.tracer("saga");
    if PROVIDER.set(provider).is_err() {
        return Err("the OTLP exporter is already installed".into());
    }
    ENABLED.store(true, Ordering::Relaxed);
    Ok(Some(
        tracing_opentelemetry::layer().with_tracer(tracer).boxed(),
    ))
}

/// Sends the spans not exported yet and stops the exporter (nothing when export is off).
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && let Err(error) = provider.shutdown()
    {
        eprintln!("the OTLP exporter did not shut down cleanly: {error}");
    }
}

/// `span`'s trace context as W3C headers; none when the span is not exported.
pub fn context_headers(span: &tracing::Span) -> Vec<(&'static str, String)> {
    if !enabled() {
        return Vec::new();
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&span.context(), &mut carrier);
    [TRACEPARENT, TRACESTATE]
        .into_iter()
        .filter_map(|key| carrier.remove(key).map(|value| (key, value)))
        .collect()
}

/// A W3C trace context as it came in: the `traceparent`, with its `tracestate` when there was
/// one (vendors' entries, which every hop must pass on unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub parent: String,
    pub state: Option<String>,
}

impl TraceContext {
    /// The context in headers read by `header`; `None` without a `traceparent`.
    pub fn from_headers<'a>(header: impl Fn(&str) -> Option<&'a str>) -> Option<Self> {
        Some(TraceContext {
            parent: header(TRACEPARENT)?.to_owned(),
            state: header(TRACESTATE).map(str::to_owned),
        })
    }

    /// The context of a delivery's headers.
    pub fn of_delivery(delivery: &lapin::message::Delivery) -> Option<Self> {
        Self::from_headers(|key| crate::header_str(delivery, key))
    }

    /// `span`'s own context (see [`context_headers`]): what its children and the messages
    /// sent in it carry.
    pub fn of_span(span: &tracing::Span) -> Option<Self> {
        let headers = context_headers(span);
        Self::from_headers(|key| {
            headers
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_str())
        })
    }
}

/// [`set_parent`] with a [`TraceContext`].
pub fn set_parent_context(span: &tracing::Span, context: Option<&TraceContext>) {
    set_parent(
        span,
        context.map(|c| c.parent.as_str()),
        context.and_then(|c| c.state.as_deref()),
    );
}

/// Makes the context of `traceparent` (with its `tracestate`) the parent of `span`, and
/// records the trace id in the span's `trace_id` field when it has one. A missing or
/// malformed `traceparent` leaves the span a root of a trace of its own.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>, tracestate: Option<&str>) {
    if !enabled() {
        return;
    }
    if let Some(traceparent) = traceparent {
        let mut carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
        if let Some(state) = tracestate {
            carrier.insert(TRACESTATE.to_owned(), state.to_owned());
        }
        let parent = TraceContextPropagator::new().extract(&carrier);
        if parent.span().span_context().is_valid() {
            let _ = span.set_parent(parent);
        }
    }
    record_trace_id(span);
}

/// Records `span`'s trace id in its `trace_id` field (declared `tracing::field::Empty`), so
/// that every log line inside it carries the trace id next to the saga id.
fn record_trace_id(span: &tracing::Span) {
    if !enabled() {
        return;
    }
    let context = span.context();
    let span_context = context.span().span_context().clone();
    if span_context.is_valid() {
        span.record("trace_id", tracing::field::display(span_context.trace_id()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn with_export_off_no_header_is_written_and_nothing_fails() {
        let span = tracing::info_span!("work", trace_id = tracing::field::Empty);
        set_parent(
            &span,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
            None,
        );
        assert!(context_headers(&span).is_empty());
    }
}
