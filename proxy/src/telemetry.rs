//! Traces over OTLP (issue 20): the `tracing` spans of a request, exported
//! by `tracing-opentelemetry` and the OpenTelemetry SDK's batch exporter
//! (OTLP over HTTP, protobuf). The standard `OTEL_*` variables configure it
//! beside the `telemetry` section, and win over it.
//!
//! A client's W3C `traceparent` is continued ([`continue_trace`]); each
//! upstream request carries its own span's ([`inject`]). While traces are
//! off, [`on`] is false and the spans only traces need are not made.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use http::HeaderMap;
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{HeaderExtractor, HeaderInjector};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use serde::Deserialize;

static ON: AtomicBool = AtomicBool::new(false);

/// The exporter, for [`flush`].
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Whether traces are exported: spans made only for them are skipped
/// otherwise.
pub fn on() -> bool {
    ON.load(Ordering::Relaxed)
}

/// `telemetry`: where traces go and how many. The standard `OTEL_*`
/// variables (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `..._HEADERS`,
/// `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, ...) override it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The OTLP/HTTP traces endpoint, e.g. `http://127.0.0.1:4318/v1/traces`.
    pub endpoint: Option<String>,
    /// `service.name` of the traces.
    pub service_name: String,
    /// The share of traces kept, 0 to 1, for requests that do not come
    /// with a sampled `traceparent` (a parent's choice is followed).
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            endpoint: None,
            service_name: "ratatosk".into(),
            sample_ratio: 1.0,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("telemetry: cannot build the OTLP exporter: {0}")]
pub struct TelemetryError(String);

/// Sends the spans not yet exported (at shutdown: the process ends
/// without dropping the exporter). Blocks for at most the exporter's
/// timeout.
pub fn flush() {
    if let Some(provider) = PROVIDER.get()
        && let Err(e) = provider.force_flush()
    {
        tracing::warn!(error = %e, "telemetry: the last traces were not all sent");
    }
}

/// Whether the environment asks for traces (an OTLP endpoint, and the SDK
/// not disabled).
#[cfg(test)]
fn wanted_by_env(var: &dyn Fn(&str) -> Option<String>) -> bool {
    !disabled_by_env(var) && endpoint_in_env(var)
}

/// `OTEL_SDK_DISABLED=true`.
fn disabled_by_env(var: &dyn Fn(&str) -> Option<String>) -> bool {
    var("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
}

/// Whether the environment names an OTLP endpoint.
fn endpoint_in_env(var: &dyn Fn(&str) -> Option<String>) -> bool {
    let set = |name: &str| var(name).is_some_and(|v| !v.trim().is_empty());
    set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
}

/// The exporter and its tracing layer, if the config or the environment
/// asks for traces.
#[allow(clippy::type_complexity)]
pub fn start<S>(
    config: Option<&TelemetryConfig>,
) -> Result<
    Option<tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>>,
    TelemetryError,
>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    // An empty variable counts as unset.
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    let from_env = endpoint_in_env(&env);
    if disabled_by_env(&env) || (config.is_none() && !from_env) {
        return Ok(None);
    }
    let defaults = TelemetryConfig::default();
    let config = config.unwrap_or(&defaults);
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    // The variables win: the endpoint of the file only when none is set.
    if !from_env && let Some(endpoint) = &config.endpoint {
        use opentelemetry_otlp::WithExportConfig as _;
        exporter = exporter.with_endpoint(endpoint.clone());
    }
    let exporter = exporter
        .build()
        .map_err(|e| TelemetryError(e.to_string()))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if env("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(config.service_name.clone());
    }
    let mut provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build());
    if env("OTEL_TRACES_SAMPLER").is_none() {
        provider = provider.with_sampler(Sampler::ParentBased(Box::new(
            Sampler::TraceIdRatioBased(config.sample_ratio),
        )));
    }
    let provider = provider.build();
    let tracer = provider.tracer("ratatosk");
    let _ = PROVIDER.set(provider);
    ON.store(true, Ordering::Relaxed);
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false);
    Ok(Some(layer))
}

/// `make()`'s span while traces are on, else none (nothing is made).
pub fn span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if on() { make() } else { tracing::Span::none() }
}

/// A span of one Redis operation `op` (Redis mode).
pub fn redis(op: &'static str) -> tracing::Span {
    span(|| {
        tracing::info_span!(
            "redis",
            otel.name = op,
            otel.kind = "client",
            db.system.name = "redis"
        )
    })
}

/// Makes `span` a child of the client's `traceparent`, if it sent one.
pub fn continue_trace(span: &tracing::Span, headers: &HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
    let _ = span.set_parent(parent);
}

/// Puts the current span's `traceparent` (and `tracestate`) in `headers`,
/// in place of any the client sent.
pub fn inject(headers: &mut HeaderMap) {
    let cx = tracing::Span::current().context();
    TraceContextPropagator::new().inject_context(&cx, &mut HeaderInjector(headers));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_environment_turns_traces_on_unless_the_sdk_is_disabled() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                vars.iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| v.to_string())
            }
        };
        assert!(!wanted_by_env(&env(&[])));
        assert!(wanted_by_env(&env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://127.0.0.1:4318"
        )])));
        assert!(wanted_by_env(&env(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://x/v1/traces"
        )])));
        assert!(!wanted_by_env(&env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            " "
        )])));
        assert!(!wanted_by_env(&env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318"),
            ("OTEL_SDK_DISABLED", "TRUE"),
        ])));
    }
}
