//! `gapguard gameday`: race scenarios that show time-of-check-to-time-of-use bugs happening
//! and gapguard closing them.
//!
//! Each [`Scenario`] runs twice against a real gapguard with the same actors and the same
//! seeded fault schedule: **naive** (plain `kv` reads, then plain writes: the check-then-act a
//! typical service does) and **guarded** (the gapguard primitive made for that flow). Every
//! operation is recorded ([`history`]); after the run the scenario's invariant is judged on
//! that history (with outcomes the actors never saw resolved from the audit log) and on the
//! final state read back from the server. A gameday passes when every naive run violates its
//! invariant (it shows the race is real) and no guarded run does.
//!
//! Workloads follow FoundationDB's shape: setup, run, check. Faults come from a schedule
//! seeded by [`Config::seed`]: the delay between check and use ([`DelayDist`]), adversary
//! actors that change what was checked, `kill -9` and restart of the embedded server
//! ([`EmbeddedServer`]), and latency, resets and timeouts in a TCP [`Proxy`] between the actors
//! and the server.
//!
//! ```no_run
//! # async fn demo() -> Result<(), gapguard_gameday::GamedayError> {
//! use gapguard_gameday::{Config, Scenario, Target};
//!
//! let config = Config {
//!     scenarios: Scenario::ALL.to_vec(),
//!     target: Target::Embedded { binary: "target/debug/gapguard".into() },
//!     ..Config::default()
//! };
//! let report = gapguard_gameday::run(&config, &gapguard_gameday::indicatif::MultiProgress::new()).await?;
//! print!("{}", report.table());
//! assert!(report.verdict.passed, "{:?}", report.verdict.problems);
//! # Ok(()) }
//! ```

mod delay;
mod env;
mod error;
pub mod history;
mod judge;
mod proxy;
pub mod report;
mod run;
mod scenarios;
mod server;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

pub use delay::{parse_ms, DelayDist, DELAY_MS_MAX};
pub use error::GamedayError;
pub use indicatif;
pub use proxy::{NetworkFaults, Proxy, ProxyStats};
pub use report::Report;
pub use run::run;
pub use server::{EmbeddedServer, Restart};

/// The most actors a scenario may run (each is a task with its own connections).
pub const ACTORS_MAX: usize = 256;
/// The longest run of one mode of one scenario.
pub const DURATION_MAX: Duration = Duration::from_secs(3600);
/// The most `kill -9` restarts per run.
pub const CRASHES_MAX: u32 = 20;

/// A race scenario.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// Buyers check stock, then buy. Invariant: units sold ≤ units supplied.
    Inventory,
    /// Tenants check quota, then provision in several steps that sometimes crash. Invariants:
    /// never over quota; every half-built resource is found and cleaned up.
    Quota,
    /// Jobs authorized at enqueue run later while an admin revokes. Invariant: no action
    /// after its permission was revoked.
    Revocation,
    /// Workers share a lease; one pauses past its expiry, then writes. Invariant: no write
    /// from a stale holder.
    Lease,
    /// Clients retry requests whose answers were lost; old retries arrive after newer
    /// requests. Invariants: each effect once; no older request overwrites a newer one.
    Retry,
    /// Services decide from a cached flag while it changes. Invariant: no act based on a
    /// value already superseded when the act happened.
    Cache,
    /// A pipeline's preflight passes, the environment drifts before the deploy. Invariant: no
    /// deploy onto a state other than the one checked.
    Deploy,
}

impl Scenario {
    /// Every scenario, in the order `all` runs them.
    pub const ALL: [Scenario; 7] =
        [Self::Inventory, Self::Quota, Self::Revocation, Self::Lease, Self::Retry, Self::Cache, Self::Deploy];

    /// Its name on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Inventory => "inventory",
            Self::Quota => "quota",
            Self::Revocation => "revocation",
            Self::Lease => "lease",
            Self::Retry => "retry",
            Self::Cache => "cache",
            Self::Deploy => "deploy",
        }
    }

    /// Every name.
    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|s| s.name()).collect()
    }

    /// The invariant it judges, for a person.
    pub fn invariant(self) -> &'static str {
        match self {
            Self::Inventory => "units sold <= units supplied",
            Self::Quota => "never over quota, and no half-built resource left behind",
            Self::Revocation => "no action after the permission was revoked",
            Self::Lease => "no write from a holder whose lease was taken over",
            Self::Retry => "each effect once, and no older request overwrites a newer one",
            Self::Cache => "no act based on a flag value already superseded at act time",
            Self::Deploy => "no deploy onto a state other than the one checked",
        }
    }

    /// What the guarded mode uses.
    pub fn guard(self) -> &'static str {
        match self {
            Self::Inventory => "check ticket (stock >= 1) presented at the buy",
            Self::Quota => "reservation with TTL, orphan reconciliation, compensation",
            Self::Revocation => "`permitted` ticket re-validated at use",
            Self::Lease => "lease fencing token as a condition of the write",
            Self::Retry => "Idempotency-Key + version condition",
            Self::Cache => "watch-driven invalidation + version condition at act",
            Self::Deploy => "lease on the environment + version-conditioned deploy",
        }
    }

    /// Parses `all` or a comma-separated list of names.
    pub fn parse_list(text: &str) -> Result<Vec<Scenario>, GamedayError> {
        let mut scenarios = Vec::new();
        for name in text.split(',').map(str::trim) {
            if name == "all" {
                scenarios.extend(Self::ALL);
            } else {
                scenarios.push(name.parse()?);
            }
        }
        let mut seen = std::collections::HashSet::new();
        scenarios.retain(|s| seen.insert(*s));
        Ok(scenarios)
    }
}

impl fmt::Display for Scenario {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Scenario {
    type Err = GamedayError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|s| s.name() == name)
            .ok_or_else(|| GamedayError::UnknownScenario { name: name.to_owned() })
    }
}

/// How a scenario's actors go from check to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Plain reads, then plain writes (`kv get`, `kv put`, no conditions).
    Naive,
    /// The gapguard primitive made for the flow.
    Guarded,
}

impl Mode {
    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Naive => "naive",
            Self::Guarded => "guarded",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which server the gameday plays against.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Starts this gapguard binary on a temp dir (`serve --data TMPDIR --listen 127.0.0.1:0`)
    /// and stops it at the end; crash faults are possible.
    Embedded {
        /// The gapguard binary.
        binary: PathBuf,
    },
    /// A running server; every scenario uses fresh namespaces (`gd-…`) on it.
    Url {
        /// Its base URL.
        url: String,
        /// An API key with write access to `gd-*` namespaces, if the server needs one.
        api_key: Option<String>,
    },
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// Concurrent actors per run (buyers, tenants, workers…; adversaries come on top).
    pub actors: usize,
    /// How long each mode of each scenario runs.
    pub duration: Duration,
    /// The delay between check and use.
    pub delay: DelayDist,
    /// Seeds every random choice: delays, amounts, actor choices, crash times, toxics.
    pub seed: u64,
    /// The server.
    pub target: Target,
    /// `kill -9` and restart of the embedded server, this many times per run (0: none).
    pub crashes: u32,
    /// Toxics of the proxy between actors and server (`None`: no proxy toxics).
    pub network: Option<NetworkFaults>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            scenarios: Scenario::ALL.to_vec(),
            actors: 8,
            duration: Duration::from_secs(5),
            delay: DelayDist::default(),
            seed: 1,
            target: Target::Embedded { binary: PathBuf::from("gapguard") },
            crashes: 0,
            network: None,
        }
    }
}

impl Config {
    /// Checks the limits: actors 1..=[`ACTORS_MAX`], a duration of 100 ms up to
    /// [`DURATION_MAX`], crashes up to [`CRASHES_MAX`] and only against the embedded server.
    pub fn validate(&self) -> Result<(), GamedayError> {
        let invalid = |message: String| Err(GamedayError::InvalidConfig(message));
        if self.scenarios.is_empty() {
            return invalid("no scenario to run".into());
        }
        if !(1..=ACTORS_MAX).contains(&self.actors) {
            return invalid(format!("actors must be 1 to {ACTORS_MAX}, not {}", self.actors));
        }
        if self.duration < Duration::from_millis(100) || self.duration > DURATION_MAX {
            return invalid(format!("duration must be 0.1 s to {} s", DURATION_MAX.as_secs()));
        }
        if self.crashes > CRASHES_MAX {
            return invalid(format!("crashes must be at most {CRASHES_MAX} per run, not {}", self.crashes));
        }
        if self.crashes > 0 && matches!(self.target, Target::Url { .. }) {
            return invalid("crash faults need the embedded server (they kill -9 it): drop --url or --crashes".into());
        }
        if let (Some(net), Target::Url { url, .. }) = (&self.network, &self.target) {
            if net.any() && !url.starts_with("http://") {
                return invalid(
                    "network faults against --url need an http:// URL (the proxy does not speak TLS)".into(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scenario_lists_parse_in_order_without_repeats() {
        assert_eq!(Scenario::parse_list("all").unwrap(), Scenario::ALL.to_vec());
        assert_eq!(Scenario::parse_list("lease, quota,lease").unwrap(), vec![Scenario::Lease, Scenario::Quota]);
        let err = Scenario::parse_list("lease,oversell").unwrap_err();
        assert!(err.is_usage());
        assert!(err.to_string().contains("unknown scenario \"oversell\" (one of: all, inventory, quota"), "{err}");
    }

    #[test]
    fn configs_out_of_bounds_are_refused() {
        let ok = Config::default();
        ok.validate().unwrap();
        let url = Target::Url { url: "https://gapguard.internal".into(), api_key: None };
        for (config, needle) in [
            (Config { actors: 0, ..ok.clone() }, "actors"),
            (Config { actors: ACTORS_MAX + 1, ..ok.clone() }, "actors"),
            (Config { duration: Duration::from_millis(99), ..ok.clone() }, "duration"),
            (Config { crashes: CRASHES_MAX + 1, ..ok.clone() }, "crashes"),
            (Config { crashes: 1, target: url.clone(), ..ok.clone() }, "embedded server"),
            (Config { network: Some("reset=0.1".parse().unwrap()), target: url, ..ok.clone() }, "http://"),
            (Config { scenarios: vec![], ..ok.clone() }, "no scenario"),
        ] {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{needle}: {err}");
        }
        Config { actors: ACTORS_MAX, crashes: CRASHES_MAX, ..ok }.validate().unwrap();
    }
}
