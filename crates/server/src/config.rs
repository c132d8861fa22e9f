//! The server's configuration: a TOML file, with command-line flags layered on top.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use gapguard_core::Limits;
use serde::Deserialize;

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Default data directory.
pub const DEFAULT_DATA: &str = "./gapguard-data";

/// Everything `gapguard serve` needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Where to listen (`127.0.0.1:0` picks a free port).
    pub listen: SocketAddr,
    /// Directory of the embedded store.
    pub data: PathBuf,
    /// A PostgreSQL URL (`postgres://USER@HOST:PORT/DB`): serve over that database instead of
    /// the embedded store, as one of any number of stateless nodes (`docs/deploy.md`).
    pub backend: Option<String>,
    /// Whether commits are fsynced. Turning it off acknowledges writes a crash can lose.
    pub fsync: bool,
    /// Request limits.
    pub limits: Limits,
    /// Flows named in the config (they get their own metrics label).
    pub flows: Vec<FlowConfig>,
    /// Namespaces that get their own `namespace` label in the metrics; every other one is
    /// `other` (bounded cardinality).
    pub metrics_namespaces: Vec<String>,
    /// API keys; with none, the server serves without authentication, and only on loopback.
    pub api_keys: Vec<ApiKeyConfig>,
    /// Whether `/metrics` needs an API key (default: no, so Prometheus scrapes without one).
    pub metrics_require_key: bool,
    /// PEM certificate chain for TLS (with `tls_key`).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS (with `tls_cert`).
    pub tls_key: Option<PathBuf>,
    /// Most requests served at once; past it, `503` with `Retry-After`.
    pub max_in_flight: usize,
    /// Most bytes of changes the change feed keeps for watches that resume from an earlier
    /// revision (besides its 100,000 changes); default 64 MiB.
    pub watch_history_bytes: usize,
    /// Most watch streams open at once; past it a new watch answers `503` (default 1,024).
    pub max_watches: usize,
    /// Most connections open at once on the API listener (the metrics listener has its own 64);
    /// past it a new connection is answered `503` and closed. Default (`None`): what the
    /// open-file limit leaves after what the store and the listeners keep, at most 16,384; a
    /// configured value cannot exceed that either.
    pub max_connections: Option<usize>,
    /// How long a client may take to send a request's headers.
    pub header_read_timeout_ms: u64,
    /// How long a request may take as a whole, body included (watch streams excepted).
    pub request_timeout_ms: u64,
    /// Where finished spans are appended as OTLP JSON Lines (none: spans are not exported).
    pub trace_file: Option<PathBuf>,
    /// Where finished spans are sent over OTLP/HTTP (protobuf): the full URL of the traces
    /// endpoint, `…/v1/traces` (see [`otlp_traces_url`]); none: not sent.
    pub otlp_traces_url: Option<String>,
    /// A listener of its own for `/metrics` (and `/healthz`); when set, the API listener no
    /// longer serves `/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// How long the store's writer polls for work before it sleeps, in microseconds (0: it
    /// sleeps at once). See [`gapguard_engine::EngineConfig::spin_before_sleep`].
    pub writer_spin_us: u64,
    /// How long the writer may wait for a batch to grow as large as the last one (up to 8
    /// requests), in microseconds (0: never). See
    /// [`gapguard_engine::EngineConfig::batch_linger`].
    pub writer_linger_us: u64,
    /// How long a write alone in flight polls for its answer on its request thread, in
    /// microseconds (0: it waits to be woken). See
    /// [`gapguard_engine::EngineConfig::answer_poll`].
    pub answer_poll_us: u64,
    /// Whether metrics are recorded and served (default: yes). Off, `/metrics` answers 404
    /// and `/v1/slo` counts nothing: for measuring what the metrics cost.
    pub metrics: bool,
}

/// The OTLP/HTTP traces URL of an OTLP endpoint given as the collector's base URL
/// (`http://HOST:4318`, spans go to `http://HOST:4318/v1/traces`) or as the traces URL itself
/// (ending in `/v1/traces`). Only `http://` is accepted: the exporter has no TLS stack (send to
/// a local collector, which forwards over TLS). The error says what is wrong, for a person.
pub fn otlp_traces_url(endpoint: &str) -> Result<String, String> {
    const EXAMPLE: &str = "a URL such as http://127.0.0.1:4318";
    let uri: axum::http::Uri =
        endpoint.parse().map_err(|e| format!("OTLP endpoint {endpoint:?} is not {EXAMPLE} ({e})"))?;
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => {
            return Err(format!(
                "OTLP endpoint {endpoint:?}: https is not supported; send to a collector over http (e.g. one on \
                 loopback) and let it forward over TLS"
            ))
        }
        _ => return Err(format!("OTLP endpoint {endpoint:?} is not {EXAMPLE} (it needs the http:// scheme)")),
    }
    let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
        return Err(format!("OTLP endpoint {endpoint:?} has no host; expected {EXAMPLE}"));
    };
    if uri.query().is_some() {
        return Err(format!("OTLP endpoint {endpoint:?} must not have a query string"));
    }
    let path = uri.path().trim_end_matches('/');
    let path = if path.ends_with("/v1/traces") { path.to_owned() } else { format!("{path}/v1/traces") };
    Ok(format!("http://{authority}{path}"))
}

/// Who may call, where, and what: one `[[api_key]]` of the config file.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// A name for the key (recorded in every audit event it causes).
    pub id: String,
    /// Lowercase hex SHA-256 of the secret; the secret itself is never stored.
    pub secret_sha256: String,
    /// Namespaces it may use (`"*"`: all).
    pub namespaces: Vec<String>,
    /// `read`, `write` or `admin`.
    pub role: Role,
}

/// What a key may do; each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads, checks, watch, audit.
    Read,
    /// Plus acts, txns, puts, deletes, reservations, leases.
    Write,
    /// Plus grants, pool capacities, orphan resolution, audit verification.
    Admin,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("default listen address parses"),
            data: PathBuf::from(DEFAULT_DATA),
            backend: None,
            fsync: true,
            limits: Limits::default(),
            flows: Vec::new(),
            metrics_namespaces: Vec::new(),
            api_keys: Vec::new(),
            metrics_require_key: false,
            tls_cert: None,
            tls_key: None,
            max_in_flight: 1024,
            max_connections: None,
            max_watches: crate::routes::DEFAULT_MAX_WATCHES,
            watch_history_bytes: gapguard_engine::FEED_WINDOW_BYTES,
            header_read_timeout_ms: 10_000,
            request_timeout_ms: 30_000,
            trace_file: None,
            otlp_traces_url: None,
            metrics_listen: None,
            metrics: true,
            writer_spin_us: 250,
            writer_linger_us: 30,
            answer_poll_us: 300,
        }
    }
}

/// A named check→act path and its objectives.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowConfig {
    /// The flow's name, as requests give it.
    pub name: String,
    /// Latency objective for the gap (p99, ms).
    pub check_to_use_p99_ms: Option<u64>,
    /// Fraction of acts whose check still held at use.
    pub correctness_objective: Option<f64>,
}

/// The config file as written (every field optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    data: Option<PathBuf>,
    backend: Option<String>,
    fsync: Option<bool>,
    #[serde(default)]
    limits: LimitsFile,
    #[serde(default)]
    flow: Vec<FlowConfig>,
    #[serde(default)]
    metrics_namespaces: Vec<String>,
    #[serde(default)]
    api_key: Vec<ApiKeyConfig>,
    metrics_require_key: Option<bool>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_in_flight: Option<usize>,
    max_connections: Option<usize>,
    max_watches: Option<usize>,
    watch_history_bytes: Option<usize>,
    header_read_timeout_ms: Option<u64>,
    request_timeout_ms: Option<u64>,
    trace_file: Option<PathBuf>,
    otlp_endpoint: Option<String>,
    metrics_listen: Option<String>,
    metrics: Option<bool>,
    writer_spin_us: Option<u64>,
    writer_linger_us: Option<u64>,
    answer_poll_us: Option<u64>,
}

/// `[limits]`: each overrides one default of DESIGN §5.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_body_bytes: Option<usize>,
    max_key_bytes: Option<usize>,
    max_value_bytes: Option<usize>,
    max_conditions: Option<usize>,
    max_ops: Option<usize>,
    ticket_ttl_ms_min: Option<u64>,
    ticket_ttl_ms_max: Option<u64>,
    ticket_ttl_ms_default: Option<u64>,
    idempotency_retention_ms: Option<u64>,
    resolved_retention_ms: Option<u64>,
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped fields.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the field).
        message: String,
    },
    /// A value is out of range.
    #[error("config: {0}")]
    Invalid(String),
}

impl Config {
    /// The safe default: without API keys, anyone who can connect can do anything, so the
    /// server only binds loopback. Returns why not otherwise.
    pub fn check_safe_bind(&self) -> Result<(), String> {
        if self.api_keys.is_empty() && !self.listen.ip().is_loopback() {
            return Err(format!(
                "refusing to listen on {} without API keys: anyone who can reach it could read and write \
                 everything. Add [[api_key]] entries to the config (gapguard keys new prints one), or listen \
                 on a loopback address such as 127.0.0.1",
                self.listen
            ));
        }
        // The same rule for the metrics listener: without keys, nothing leaves loopback.
        if let Some(addr) = self.metrics_listen.filter(|a| self.api_keys.is_empty() && !a.ip().is_loopback()) {
            return Err(format!(
                "refusing to serve metrics on {addr} without API keys: without [[api_key]] entries gapguard \
                 listens on loopback addresses only (such as 127.0.0.1)"
            ));
        }
        Ok(())
    }

    /// Reads a config file; `None` gives the defaults.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let Some(path) = path else { return Ok(Self::default()) };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse { path: path.into(), message },
            other => other,
        })
    }

    /// Parses the TOML text of a config file.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let file: File =
            toml::from_str(text).map_err(|e| ConfigError::Parse { path: PathBuf::new(), message: e.to_string() })?;
        let mut config = Config::default();
        if let Some(listen) = file.listen {
            config.listen = listen
                .parse()
                .map_err(|e| ConfigError::Invalid(format!("listen = {listen:?} is not ADDR:PORT ({e})")))?;
        }
        if file.data.is_some() && file.backend.is_some() {
            // One would be ignored, silently: say which store the file means.
            return Err(ConfigError::Invalid(
                "data and backend exclude each other: data is the embedded store's directory, backend a \
                 PostgreSQL URL to serve over instead; keep one"
                    .into(),
            ));
        }
        if let Some(data) = file.data {
            config.data = data;
        }
        if let Some(backend) = file.backend {
            config.backend = Some(backend);
        }
        if let Some(fsync) = file.fsync {
            config.fsync = fsync;
        }
        let l = &mut config.limits;
        let f = file.limits;
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = f.$field { l.$field = v; } )* };
        }
        set!(
            max_body_bytes,
            max_key_bytes,
            max_value_bytes,
            max_conditions,
            max_ops,
            ticket_ttl_ms_min,
            ticket_ttl_ms_max,
            ticket_ttl_ms_default,
            idempotency_retention_ms,
            resolved_retention_ms
        );
        if l.ticket_ttl_ms_min == 0 || l.ticket_ttl_ms_min > l.ticket_ttl_ms_max {
            return Err(ConfigError::Invalid("limits: need 1 <= ticket_ttl_ms_min <= ticket_ttl_ms_max".into()));
        }
        if !(l.ticket_ttl_ms_min..=l.ticket_ttl_ms_max).contains(&l.ticket_ttl_ms_default) {
            return Err(ConfigError::Invalid("limits: ticket_ttl_ms_default is outside [min, max]".into()));
        }
        if l.max_body_bytes == 0 || l.max_key_bytes == 0 || l.max_conditions == 0 || l.max_ops == 0 {
            return Err(ConfigError::Invalid("limits: sizes and counts must be at least 1".into()));
        }
        crate::rules::validate_flows(&file.flow).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        config.flows = file.flow;
        config.metrics_namespaces = file.metrics_namespaces;
        for key in &file.api_key {
            let hex_ok = key.secret_sha256.len() == 64 && key.secret_sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex_ok {
                return Err(ConfigError::Invalid(format!(
                    "api_key {:?}: secret_sha256 must be 64 hex digits (gapguard keys new prints one)",
                    key.id
                )));
            }
            if key.id.is_empty() || key.namespaces.is_empty() {
                return Err(ConfigError::Invalid("api_key: id and namespaces must not be empty".into()));
            }
            // A namespace no request can name would grant nothing, silently.
            for ns in key.namespaces.iter().filter(|ns| *ns != "*") {
                if let Err(e) = crate::convert::namespace(ns, &config.limits) {
                    return Err(ConfigError::Invalid(format!("api_key {:?}: {}", key.id, e.message)));
                }
            }
        }
        let mut ids: Vec<&str> = file.api_key.iter().map(|k| k.id.as_str()).collect();
        ids.sort_unstable();
        if let Some(dup) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid(format!("api_key id {:?} appears twice", dup[0])));
        }
        // One secret, one key: else the secret would act as whichever key the lookup met first.
        for (i, key) in file.api_key.iter().enumerate() {
            let hash = key.secret_sha256.to_ascii_lowercase();
            if let Some(other) = file.api_key[..i].iter().find(|k| k.secret_sha256.to_ascii_lowercase() == hash) {
                return Err(ConfigError::Invalid(format!(
                    "api_key {:?} has the same secret_sha256 as {:?}: give each key its own secret",
                    key.id, other.id
                )));
            }
        }
        config.api_keys = file.api_key;
        config.metrics_require_key = file.metrics_require_key.unwrap_or(false);
        if file.tls_cert.is_some() != file.tls_key.is_some() {
            return Err(ConfigError::Invalid("tls_cert and tls_key go together".into()));
        }
        config.tls_cert = file.tls_cert;
        config.tls_key = file.tls_key;
        config.max_in_flight = at_least_one("max_in_flight", file.max_in_flight)?.unwrap_or(config.max_in_flight);
        config.max_connections = at_least_one("max_connections", file.max_connections)?;
        config.max_watches = at_least_one("max_watches", file.max_watches)?.unwrap_or(config.max_watches);
        config.watch_history_bytes =
            at_least_one("watch_history_bytes", file.watch_history_bytes)?.unwrap_or(config.watch_history_bytes);
        config.header_read_timeout_ms = at_least_one("header_read_timeout_ms", file.header_read_timeout_ms)?
            .unwrap_or(config.header_read_timeout_ms);
        config.trace_file = file.trace_file;
        if let Some(endpoint) = file.otlp_endpoint {
            config.otlp_traces_url = Some(otlp_traces_url(&endpoint).map_err(ConfigError::Invalid)?);
        }
        if let Some(addr) = file.metrics_listen {
            config.metrics_listen = Some(
                addr.parse()
                    .map_err(|e| ConfigError::Invalid(format!("metrics_listen = {addr:?} is not ADDR:PORT ({e})")))?,
            );
        }
        config.metrics = file.metrics.unwrap_or(true);
        let writer_us = |name: &str, us: Option<u64>, default: u64| match us {
            Some(us) if us > 10_000 => {
                Err(ConfigError::Invalid(format!("{name} = {us} is above the limit of 10000 (10 ms); 0 turns it off")))
            }
            us => Ok(us.unwrap_or(default)),
        };
        config.writer_spin_us = writer_us("writer_spin_us", file.writer_spin_us, config.writer_spin_us)?;
        config.writer_linger_us = writer_us("writer_linger_us", file.writer_linger_us, config.writer_linger_us)?;
        config.answer_poll_us = writer_us("answer_poll_us", file.answer_poll_us, config.answer_poll_us)?;
        config.request_timeout_ms =
            at_least_one("request_timeout_ms", file.request_timeout_ms)?.unwrap_or(config.request_timeout_ms);
        Ok(config)
    }
}

/// A count or duration of the config file, which may be left out but not be 0.
fn at_least_one<T: PartialEq + Default>(field: &str, value: Option<T>) -> Result<Option<T>, ConfigError> {
    match value {
        Some(zero) if zero == T::default() => Err(ConfigError::Invalid(format!("{field} must be at least 1"))),
        other => Ok(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_design_example_parses() {
        let config = Config::parse(
            "listen = \"127.0.0.1:7701\"\ndata = \"./d\"\n[[flow]]\nname = \"checkout\"\ncheck_to_use_p99_ms = 500\ncorrectness_objective = 0.9999\n",
        )
        .unwrap();
        assert_eq!(config.listen.port(), 7701);
        assert_eq!(config.flows[0].name, "checkout");
        assert!(config.fsync);
        assert_eq!(config.backend, None);
    }

    /// Every config block the documentation shows parses, its secret placeholders filled in:
    /// the README's once put a dozen top-level keys under `[limits]`, where no server took them.
    #[test]
    fn the_documented_config_blocks_parse() {
        let docs = [
            ("README.md", include_str!("../../../README.md")),
            ("docs/security.md", include_str!("../../../docs/security.md")),
            ("bench/README.md", include_str!("../../../bench/README.md")),
        ];
        let mut blocks = 0;
        for (doc, text) in docs {
            for block in text.split("```toml\n").skip(1) {
                let block = block.split("```").next().unwrap_or_default();
                let filled: String = block
                    .lines()
                    .map(|line| match line.trim_start().starts_with("secret_sha256") {
                        true => format!("secret_sha256 = \"{}\"\n", "ab".repeat(32)),
                        false => format!("{line}\n"),
                    })
                    .collect();
                if let Err(e) = Config::parse(&filled) {
                    panic!("a config block of {doc} does not parse: {e}\n{block}");
                }
                blocks += 1;
            }
        }
        assert_eq!(blocks, 4, "the blocks of the three documents");
    }

    #[test]
    fn flows_and_keys_that_could_not_mean_what_they_say_are_refused() {
        let flow = |body: &str| Config::parse(&format!("[[flow]]\nname = \"c\"\n{body}")).err().map(|e| e.to_string());
        assert_eq!(flow("correctness_objective = 0.999"), None);
        for bad in ["correctness_objective = 1.5", "correctness_objective = 1.0", "correctness_objective = 0.0"] {
            assert!(flow(bad).is_some_and(|e| e.contains("between 0 and 1")), "{bad}");
        }
        assert!(flow("check_to_use_p99_ms = 0").is_some_and(|e| e.contains("at least 1")));
        assert_eq!(flow("check_to_use_p99_ms = 1"), None, "1 ms, the least, is taken");
        let twice = Config::parse("[[flow]]\nname = \"c\"\n[[flow]]\nname = \"c\"\n").unwrap_err().to_string();
        assert!(twice.contains("appears twice"), "{twice}");
        let key = |id: &str, hash: &str| {
            format!("[[api_key]]\nid = \"{id}\"\nsecret_sha256 = \"{hash}\"\nnamespaces = [\"a\"]\nrole = \"read\"\n")
        };
        let (one, other) = ("ab".repeat(32), "cd".repeat(32));
        assert!(Config::parse(&(key("r", &one) + &key("boss", &other))).is_ok());
        let shared = Config::parse(&(key("r", &one) + &key("boss", &one.to_uppercase()))).unwrap_err().to_string();
        assert!(shared.contains("same secret_sha256"), "{shared}");
        let spaced = key("r", &one).replace("[\"a\"]", "[\"a b\"]");
        let spaced = Config::parse(&spaced).unwrap_err().to_string();
        assert!(spaced.contains("namespace: \"a b\" must be"), "{spaced}");
        assert!(Config::parse(&key("r", &one).replace("[\"a\"]", "[\"*\"]")).is_ok());
        for field in [
            "header_read_timeout_ms",
            "request_timeout_ms",
            "max_in_flight",
            "max_connections",
            "max_watches",
            "watch_history_bytes",
        ] {
            let zero = Config::parse(&format!("{field} = 0\n")).unwrap_err().to_string();
            assert!(zero.contains(field) && zero.contains("at least 1"), "{zero}");
            assert!(Config::parse(&format!("{field} = 1\n")).is_ok(), "{field} = 1, the least, is taken");
        }
        let ones = Config::parse("max_watches = 1\nwatch_history_bytes = 1\nmax_in_flight = 1\n").unwrap();
        assert_eq!((ones.max_watches, ones.watch_history_bytes, ones.max_in_flight), (1, 1, 1));
        assert_eq!(Config::parse("max_connections = 1\n").unwrap().max_connections, Some(1));
        assert_eq!(Config::parse("").unwrap().max_connections, None, "by default, from the open-file limit");
    }

    #[test]
    fn a_backend_url_is_read_from_the_file() {
        let config = Config::parse("backend = \"postgres://gg@db:5432/gapguard\"\n").unwrap();
        assert_eq!(config.backend.as_deref(), Some("postgres://gg@db:5432/gapguard"));
        let both = Config::parse("data = \"./d\"\nbackend = \"postgres://gg@db:5432/gapguard\"\n").unwrap_err();
        assert!(both.to_string().contains("data and backend exclude each other"), "{both}");
    }

    #[test]
    fn unknown_fields_and_bad_ranges_are_named() {
        let err = Config::parse("lissen = \"x\"").unwrap_err().to_string();
        assert!(err.contains("lissen"), "{err}");
        let err = Config::parse("[limits]\nticket_ttl_ms_min = 10\nticket_ttl_ms_max = 5\n").unwrap_err().to_string();
        assert!(err.contains("ticket_ttl_ms_min"), "{err}");
    }

    #[test]
    fn the_writer_spin_and_linger_are_read_and_bounded() {
        let defaults = Config::parse("").unwrap();
        assert_eq!((defaults.writer_spin_us, defaults.writer_linger_us), (250, 30));
        assert_eq!(Config::parse("writer_spin_us = 0").unwrap().writer_spin_us, 0);
        assert_eq!(Config::parse("writer_spin_us = 10000").unwrap().writer_spin_us, 10_000);
        let err = Config::parse("writer_spin_us = 10001").unwrap_err().to_string();
        assert!(err.contains("writer_spin_us = 10001") && err.contains("10000"), "{err}");
        let linger = Config::parse("writer_linger_us = 0\nwriter_spin_us = 7").unwrap();
        assert_eq!((linger.writer_spin_us, linger.writer_linger_us), (7, 0));
        assert_eq!(Config::parse("writer_linger_us = 10000").unwrap().writer_linger_us, 10_000);
        let err = Config::parse("writer_linger_us = 10001").unwrap_err().to_string();
        assert!(err.contains("writer_linger_us = 10001") && err.contains("10000"), "{err}");
        assert_eq!(defaults.answer_poll_us, 300);
        assert_eq!(Config::parse("answer_poll_us = 0").unwrap().answer_poll_us, 0);
        assert_eq!(Config::parse("answer_poll_us = 10000").unwrap().answer_poll_us, 10_000);
        let err = Config::parse("answer_poll_us = 10001").unwrap_err().to_string();
        assert!(err.contains("answer_poll_us = 10001") && err.contains("10000"), "{err}");
    }

    #[test]
    fn otlp_endpoints_become_traces_urls_and_bad_ones_are_refused() {
        let url = |e: &str| otlp_traces_url(e);
        assert_eq!(url("http://127.0.0.1:4318").unwrap(), "http://127.0.0.1:4318/v1/traces");
        assert_eq!(url("http://collector:4318/").unwrap(), "http://collector:4318/v1/traces");
        assert_eq!(url("http://c:4318/otlp/v1/traces").unwrap(), "http://c:4318/otlp/v1/traces");
        assert_eq!(url("http://c/base").unwrap(), "http://c/base/v1/traces");
        for bad in ["", "127.0.0.1:4318", "ftp://c:1", "http://", "http://c:4318/?x=1", "not a url"] {
            assert!(url(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(url("https://c:4318").unwrap_err().contains("https is not supported"));
        let config =
            Config::parse("otlp_endpoint = \"http://127.0.0.1:4318\"\nmetrics_listen = \"127.0.0.1:9100\"\n").unwrap();
        assert_eq!(config.otlp_traces_url.as_deref(), Some("http://127.0.0.1:4318/v1/traces"));
        assert_eq!(config.metrics_listen, Some("127.0.0.1:9100".parse().unwrap()));
        let err = Config::parse("otlp_endpoint = \"udp://x\"").unwrap_err().to_string();
        assert!(err.contains("udp://x"), "{err}");
        assert!(!Config::parse("metrics = false").unwrap().metrics);
    }

    #[test]
    fn without_keys_the_metrics_listener_stays_on_loopback() {
        let config = Config::parse("metrics_listen = \"0.0.0.0:9100\"").unwrap();
        assert!(config.check_safe_bind().unwrap_err().contains("0.0.0.0:9100"));
        let config = Config::parse("metrics_listen = \"127.0.0.1:9100\"").unwrap();
        assert!(config.check_safe_bind().is_ok());
    }
}
