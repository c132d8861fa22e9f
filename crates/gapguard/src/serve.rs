//! `gapguard serve`: config file and flags, logging, and the server.

use std::io::{IsTerminal as _, Write as _};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::ServeArgs;

/// Loads the config, applies the flags over it, and serves until SIGINT or SIGTERM. The first
/// line on stdout is `listening on ADDR`, printed once the address is bound; logs go to
/// stderr (`RUST_LOG`, default `info`); spans go to the trace file and/or the OTLP endpoint,
/// if set, and are flushed on the way out.
pub async fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let mut config = gapguard_server::Config::load(args.config.as_deref())?;
    if let Some(data) = &args.data {
        config.data = data.clone();
        config.backend = None;
    }
    if let Some(backend) = &args.backend {
        config.backend = Some(backend.clone());
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    if let Some(path) = &args.trace_file {
        config.trace_file = Some(path.clone());
    }
    if let Some(url) = &args.otlp_endpoint {
        config.otlp_traces_url = Some(url.clone());
    }
    if let Some(addr) = args.metrics_listen {
        config.metrics_listen = Some(addr);
    }
    let provider =
        gapguard_server::otel::tracer_provider(config.trace_file.as_deref(), config.otlp_traces_url.as_deref())?;
    init_tracing(provider.as_ref());
    // Connections are bounded by the open-file limit (less what the store keeps): the soft
    // limit's usual 1,024 would be a needlessly low bound.
    if let Some(limit) = gapguard_server::raise_open_file_limit() {
        tracing::debug!(open_file_limit = limit, "open-file limit");
    }
    let served = gapguard_server::serve(config, |addr| {
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop the server; the address is in the log too.
        let _ = writeln!(out, "listening on {addr}").and_then(|()| out.flush());
    })
    .await;
    if let Some(provider) = provider {
        // Exports the spans still batched.
        if let Err(e) = provider.shutdown() {
            tracing::warn!("could not flush the spans still batched: {e}");
        }
    }
    served?;
    Ok(())
}

fn init_tracing(provider: Option<&SdkTracerProvider>) {
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) if std::env::var_os(EnvFilter::DEFAULT_ENV).is_some() => (EnvFilter::new("info"), Some(e)),
        Err(_) => (EnvFilter::new("info"), None),
    };
    let ansi = std::io::stderr().is_terminal();
    // Request spans are for the trace file, not the log: formatting their fields for the log on
    // every request is expensive, and the log has nothing to print for them.
    let filter = filter
        .add_directive(format!("{}=off", gapguard_server::REQUEST_SPAN_TARGET).parse().expect("a valid directive"));
    let logs = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_ansi(ansi).with_filter(filter);
    // RUST_LOG filters the logs only: the request spans are exported whatever it says, and
    // nothing else is (the OTLP exporter's own HTTP client must not trace its exports).
    let request_spans = Targets::new().with_target(gapguard_server::REQUEST_SPAN_TARGET, LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(logs);
    // Without an exporter there is no span layer at all: an absent (`None`) layer declares an
    // interest in every callsite, which made the registry build each request's span for
    // nobody: 15 % of a check's server CPU (30 -> 25.5 µs per check, `perf` and /proc).
    match provider {
        Some(p) => registry
            .with(tracing_opentelemetry::layer().with_tracer(p.tracer("gapguard")).with_filter(request_spans))
            .init(),
        None => registry.init(),
    }
    if let Some(e) = bad_filter {
        tracing::warn!("ignoring RUST_LOG ({e}); logging at info");
    }
}
