//! Trace context across processes: with the `otel` feature, sending injects the current span's W3C
//! `traceparent`/`tracestate` into the signature's `Headers`, and the worker makes the `task` span a child
//! of it, so a trace shows sender → worker → chain steps → chord callback as one tree (the spans reach
//! OpenTelemetry through a `tracing-opentelemetry` layer the application installs).
//!
//! Headers we do not understand (Go's `uber-trace-id`, say) are kept as they are. Without the feature, or
//! without an OpenTelemetry layer, nothing is written.

use crate::wire::signature::Headers;

/// Writes the current span's trace context into `headers`.
#[cfg(feature = "otel")]
pub(crate) fn inject(headers: &mut Headers) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return;
    }
    opentelemetry_sdk::propagation::TraceContextPropagator::new()
        .inject_context(&context, &mut Injector(headers));
}

/// Without the `otel` feature there is no trace context to write.
#[cfg(not(feature = "otel"))]
pub(crate) fn inject(_headers: &mut Headers) {}

/// Makes `span` a child of the trace context found in `headers`, if any.
#[cfg(feature = "otel")]
pub(crate) fn adopt_parent(span: &tracing::Span, headers: Option<&Headers>) {
    use opentelemetry::propagation::TextMapPropagator;
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    let Some(headers) = headers else { return };
    let context =
        opentelemetry_sdk::propagation::TraceContextPropagator::new().extract(&Extractor(headers));
    if context.span().span_context().is_valid() {
        // The span exists only to be a child; an error here means no OpenTelemetry layer is installed.
        let _ = span.set_parent(context);
    }
}

/// Without the `otel` feature the span keeps its local parent.
#[cfg(not(feature = "otel"))]
pub(crate) fn adopt_parent(_span: &tracing::Span, _headers: Option<&Headers>) {}

#[cfg(feature = "otel")]
struct Injector<'a>(&'a mut Headers);

#[cfg(feature = "otel")]
impl opentelemetry::propagation::Injector for Injector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value.into());
    }
}

#[cfg(feature = "otel")]
struct Extractor<'a>(&'a Headers);

#[cfg(feature = "otel")]
impl opentelemetry::propagation::Extractor for Extractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}
