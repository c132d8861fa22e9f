//! gapguard's HTTP server (API v1): axum routes over the engine, request decoding and limits,
//! idempotency and correlation headers, the OpenAPI document, and `serve`: the accept loop
//! (`accept`), TLS (`tls`) and the limits under load (`load`).

mod accept;
pub use accept::raise_open_file_limit;
mod auth;
pub mod config;
mod convert;
pub mod error;
mod extract;
mod hot;
mod load;
pub mod metrics;
mod openapi;
pub mod otel;
mod primitives;
pub mod routes;
pub mod rules;
mod slo;
mod strict;
mod tls;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gapguard_engine::{Engine, EngineConfig, SystemClock};
use gapguard_store::{EmbeddedStore, PgOptions, PgStore, Storage};

pub use extract::REQUEST_SPAN_TARGET;
pub use metrics::{LabelNames, Metrics};
pub use routes::{app, ApiDoc};

pub use config::{ApiKeyConfig, Config, ConfigError, FlowConfig, Role};
pub use tls::TlsError;

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The listen address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The store cannot be opened or recovered.
    #[error("cannot open the store in {dir}: {message}")]
    Store {
        /// The data directory.
        dir: std::path::PathBuf,
        /// Why.
        message: String,
    },
    /// The PostgreSQL backend cannot be used.
    #[error("cannot use the PostgreSQL backend {url}: {message}")]
    Backend {
        /// The URL, without its password.
        url: String,
        /// Why.
        message: String,
    },
    /// Asked to serve without API keys on an address other than loopback.
    #[error("{0}")]
    Insecure(String),
    /// The TLS certificate or key cannot be used.
    #[error("{0}")]
    Tls(#[from] TlsError),
    /// The HTTP server failed.
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

/// Loads the TLS files (if configured), opens the store, binds `config.listen` (and
/// `config.metrics_listen`, which then serves `/metrics` and `/healthz` instead of the API
/// listener), calls `on_bound` with the API's bound address (before serving), and serves until
/// SIGINT or SIGTERM, over HTTPS when `tls_cert` and `tls_key` are set, within the config's
/// in-flight bound and timeouts.
pub async fn serve(config: Config, on_bound: impl FnOnce(SocketAddr) + Send) -> Result<(), ServeError> {
    config.check_safe_bind().map_err(ServeError::Insecure)?;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
        _ => None,
    };
    let store_error = |message: String| match &config.backend {
        Some(url) => ServeError::Backend { url: redact(url), message },
        None => ServeError::Store { dir: config.data.clone(), message },
    };
    let store: Arc<dyn Storage> = match &config.backend {
        Some(url) => {
            let options = PgOptions { limits: config.limits.clone(), ..PgOptions::default() };
            let url = url.clone();
            let store = tokio::task::spawn_blocking(move || PgStore::connect(&url, options))
                .await
                .map_err(|e| store_error(e.to_string()))?
                .map_err(|e| store_error(e.to_string()))?;
            Arc::new(store)
        }
        None => {
            let store = EmbeddedStore::open_with(&config.data, config.fsync).map_err(|e| store_error(e.to_string()))?;
            if !config.fsync {
                tracing::warn!("fsync is off: acknowledged writes can be lost in a crash");
            }
            Arc::new(store)
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| ServeError::Bind { addr: config.listen, source })?;
    let metrics_listener = match config.metrics_listen {
        Some(addr) => {
            Some(tokio::net::TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr, source })?)
        }
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().map(tokio::net::TcpListener::local_addr).transpose()?;
    let metrics = match config.metrics {
        true => Metrics::new(LabelNames {
            namespaces: config.metrics_namespaces.iter().cloned().collect(),
            flows: config.flows.iter().map(|f| f.name.clone()).collect(),
            // Every flow's latency objective is a bucket boundary, so its SLI can be read exactly.
            check_to_use_buckets: rules::check_to_use_buckets_seconds(&config.flows),
            slo_flows: config.flows.clone(),
        }),
        false => Metrics::off(),
    };
    let metrics = Arc::new(match metrics_addr {
        Some(addr) => metrics.served_on(addr),
        None => metrics,
    });
    let observer: Arc<dyn gapguard_engine::Observer> = match config.metrics {
        true => metrics.clone(),
        false => Arc::new(gapguard_engine::NoObserver),
    };
    let engine_config = EngineConfig {
        limits: config.limits.clone(),
        observer,
        spin_before_sleep: Duration::from_micros(config.writer_spin_us),
        batch_linger: Duration::from_micros(config.writer_linger_us),
        watch_history_bytes: config.watch_history_bytes,
        answer_poll: Duration::from_micros(config.answer_poll_us),
        ..EngineConfig::default()
    };
    // Recovery blocks, before anything else runs on the runtime.
    let engine =
        Engine::open(store, Arc::new(SystemClock::default()), engine_config).map_err(|e| store_error(e.to_string()))?;
    let addr = listener.local_addr()?;
    // Handlers in place before anyone learns the address: a SIGTERM right after the first
    // answer must stop the server gracefully, not kill it.
    let signalled = shutdown_signal()?;
    on_bound(addr);
    match &config.backend {
        Some(url) => {
            tracing::info!(%addr, backend = %redact(url), tls = tls.is_some(), metrics = ?metrics_addr, "serving")
        }
        None => {
            tracing::info!(%addr, data = %config.data.display(), tls = tls.is_some(), metrics = ?metrics_addr, "serving")
        }
    }
    let (stop_streams, streams_stop) = tokio::sync::watch::channel(false);
    let keys = auth::Keys::new(&config.api_keys).with_metrics_needing_a_key(config.metrics_require_key);
    let state = routes::AppState::new(routes::Shared {
        engine: engine.clone(),
        keys: Arc::new(keys),
        metrics,
        shutdown: streams_stop,
        watches: Arc::new(tokio::sync::Semaphore::new(config.max_watches)),
    });
    let (stop_all, stopped) = tokio::sync::watch::channel(false);
    let signal = async move {
        signalled.await;
        // End the watch streams, or graceful shutdown would wait for them forever.
        let _ = stop_streams.send(true);
        let _ = stop_all.send(true);
    };
    let request_timeout = Duration::from_millis(config.request_timeout_ms);
    let slots = load::Slots::new(load::LoadLimits { max_in_flight: config.max_in_flight, request_timeout });
    let header_read_timeout = Duration::from_millis(config.header_read_timeout_ms);
    // The metrics listener has places of its own, out of the API's reach; every listener's
    // lingering refusals hold descriptors too.
    let metrics_descriptors =
        if metrics_listener.is_some() { accept::descriptors_of_listener(accept::METRICS_MAX_CONNECTIONS) } else { 0 };
    let budget = accept::ConnectionBudget::new(accept::max_connections(
        config.max_connections,
        accept::open_file_limit(),
        accept::REFUSALS_LINGERING_MAX + metrics_descriptors,
    ));
    tracing::info!(
        max_connections = budget.max(),
        max_in_flight = config.max_in_flight,
        max_watches = config.max_watches,
        "bounds under load"
    );
    let metrics_server = metrics_listener.map(|listener| {
        let connections = accept::ConnectionConfig {
            tls: tls.clone(),
            header_read_timeout,
            request_timeout,
            budget: accept::ConnectionBudget::new(accept::METRICS_MAX_CONNECTIONS),
        };
        let mut stopped = stopped.clone();
        let stop = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        tokio::spawn(accept::serve(listener, metrics::router(state.clone()), None, connections, stop))
    });
    let connections = accept::ConnectionConfig { tls, header_read_timeout, request_timeout, budget };
    let router = load::layer(routes::router(state.clone()), Arc::clone(&slots));
    let hot = hot::Hot::new(state, slots);
    let served = accept::serve(listener, router, Some(hot), connections, signal).await;
    if let Some(metrics_server) = metrics_server {
        // It stops on the same signal; a scrape in progress finishes first.
        let _ = metrics_server.await;
    }
    served?;
    tracing::info!("stopped accepting requests; closing the store");
    drop(engine);
    Ok(())
}

/// A database URL with its password hidden, for messages and logs.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// Registers SIGINT and SIGTERM handlers now, and resolves when either arrives.
fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        Ok(async move {
            tokio::select! { _ = interrupt.recv() => {}, _ = terminate.recv() => {} }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            let _ = tokio::signal::ctrl_c().await;
        })
    }
}
