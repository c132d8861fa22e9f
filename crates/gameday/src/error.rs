//! What can stop a gameday: bad input, a server that cannot be started or reached, a scenario
//! whose setup or judging failed. Violations of an invariant are not errors: they are results.

use std::path::PathBuf;

/// Why a gameday could not run (or could not finish) a scenario.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GamedayError {
    /// A delay distribution that does not parse (`--delay`).
    #[error("invalid delay {spec:?}: {reason} (expected e.g. `20ms`, `fixed:20ms`, `uniform:5ms..80ms`, `exp:30ms`)")]
    InvalidDelay {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A scenario name that is not one of [`crate::Scenario::ALL`].
    #[error("unknown scenario {name:?} (one of: all, {})", crate::Scenario::names().join(", "))]
    UnknownScenario {
        /// The name as given.
        name: String,
    },
    /// A network fault spec that does not parse (`--net`).
    #[error(
        "invalid network faults {spec:?}: {reason} (expected e.g. `latency=20ms,jitter=5ms,reset=0.02,timeout=0.01`)"
    )]
    InvalidNetwork {
        /// The spec as given.
        spec: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration that cannot be run (zero actors, crashes against `--url`…).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The embedded server could not be started or restarted.
    #[error("cannot start the embedded gapguard ({binary}): {reason}")]
    Server {
        /// The binary that was run.
        binary: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A request of a scenario's setup or final read failed (the runs themselves record
    /// failed requests instead of stopping).
    #[error("{scenario}: {what}: {source}")]
    Client {
        /// The scenario.
        scenario: String,
        /// What was being done.
        what: String,
        /// The client's error (boxed: it is large, and errors are rare).
        #[source]
        source: Box<gapguard_client::ClientError>,
    },
    /// Local I/O: the temp directory, the proxy's socket, a report file.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl GamedayError {
    /// Whether the error is the user's input (a usage error, exit code 2 in the CLI).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::InvalidDelay { .. }
                | Self::UnknownScenario { .. }
                | Self::InvalidNetwork { .. }
                | Self::InvalidConfig(_)
        )
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io { what: what.into(), source }
    }
}
