//! What a scenario's actors share during one run: the client, the namespace, the clock of the
//! run, the seeded generators and the history.

use std::time::{Duration, Instant};

use gapguard_client::{Client, ClientError, RequestOptions};
use indicatif::ProgressBar;
use rand::SeedableRng as _;
use rand_chacha::ChaCha8Rng;

use crate::history::{History, OpRecord};
use crate::{DelayDist, GamedayError, Mode, Scenario};

/// Pause of an actor after a request that failed for want of a server (down, restarting).
pub const BACKOFF_MS: u64 = 50;

/// One run of one scenario in one mode.
#[derive(Debug)]
pub struct Env {
    /// The client every actor uses (with a request timeout).
    pub client: Client,
    /// A client without a request timeout, for watch streams.
    pub watch_client: Client,
    /// The run's own namespace.
    pub ns: String,
    /// The scenario.
    pub scenario: Scenario,
    /// The mode.
    pub mode: Mode,
    /// Main actors.
    pub actors: usize,
    /// The delay between check and use.
    pub delay: DelayDist,
    /// The seed of the gameday.
    pub seed: u64,
    /// When the run started.
    pub started: Instant,
    /// When actors stop starting new operations.
    pub deadline: Instant,
    /// Every operation.
    pub history: History,
    /// The scenario's progress bar (counts main operations).
    pub progress: ProgressBar,
}

impl Env {
    /// The generator of stream `stream` (an actor's index, or an adversary's): seeded by the
    /// gameday's seed, the scenario and the stream, not the mode, so that the naive and the
    /// guarded run draw the same delays, amounts and choices.
    pub fn rng(&self, stream: u64) -> ChaCha8Rng {
        let scenario = Scenario::ALL.iter().position(|s| *s == self.scenario).unwrap_or(0) as u64;
        let mixed = self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ (scenario << 48)
            ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        ChaCha8Rng::seed_from_u64(mixed)
    }

    /// Actor `name`, drawing on random stream `stream`, its operations numbered from 0.
    pub fn actor(&self, name: impl Into<String>, stream: u64) -> Actor {
        Actor { name: name.into(), rng: self.rng(stream), next_op: 0 }
    }

    /// Whether actors may start another operation.
    pub fn running(&self) -> bool {
        Instant::now() < self.deadline
    }

    /// Milliseconds since the run started.
    pub fn now_ms(&self) -> f64 {
        self.started.elapsed().as_secs_f64() * 1000.0
    }

    /// The correlation id of operation `op_idx` of `actor`: `scenario.mode.actor.op_idx`.
    pub fn correlation_id(&self, actor: &str, op_idx: u64) -> String {
        format!("{}.{}.{actor}.{op_idx}", self.scenario, self.mode)
    }

    /// Request options carrying `correlation_id`.
    pub fn opts(&self, correlation_id: &str) -> RequestOptions {
        RequestOptions::new().correlation_id(correlation_id)
    }

    /// Records an operation; main operations advance the progress bar's message.
    pub fn record(&self, op: OpRecord) {
        self.history.record(op);
    }

    /// Records `op`, then backs off if it failed (the server unreachable: do not spin).
    pub async fn record_or_back_off(&self, op: OpRecord) {
        let failed = op.outcome.is_failed();
        self.record(op);
        if failed {
            backoff().await;
        }
    }

    /// The delay the mean of the distribution gives, at least `floor_ms`.
    pub fn mean_delay(&self, floor_ms: f64) -> Duration {
        Duration::from_secs_f64(self.delay.mean_ms().max(floor_ms) / 1000.0)
    }

    /// An error of the setup or the final read.
    pub fn fail(&self, what: impl Into<String>, source: ClientError) -> GamedayError {
        GamedayError::Client {
            scenario: format!("{} ({})", self.scenario, self.mode),
            what: what.into(),
            source: Box::new(source),
        }
    }

    /// Writes a scenario's first value of `key` as `actor`'s operation 0 of `kind` (retrying
    /// until the server answers) and records it in the history.
    pub async fn seed(
        &self,
        actor: &str,
        kind: &'static str,
        key: &str,
        value: serde_json::Value,
        what: &str,
    ) -> Result<(), GamedayError> {
        let corr = self.correlation_id(actor, 0);
        let mut op = OpRecord::new(actor, kind, corr.clone());
        let opts = self.opts(&corr);
        let done = self.retrying(what, || self.client.put(&self.ns, key, &value, &opts)).await?;
        op.written = value;
        op.outcome = crate::history::Outcome::Committed { revision: done.value.revision, resolved: false };
        self.record(op);
        Ok(())
    }

    /// Retries a setup or final request while the server is unreachable (it may be
    /// restarting after a crash fault), for up to 30 s.
    pub async fn retrying<T, F, Fut>(&self, what: &str, mut call: F) -> Result<T, GamedayError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, ClientError>>,
    {
        let give_up = Instant::now() + Duration::from_secs(30);
        loop {
            match call().await {
                Ok(value) => return Ok(value),
                Err(e) if e.code().is_none() && e.status().is_none() && Instant::now() < give_up => {
                    tokio::time::sleep(Duration::from_millis(BACKOFF_MS)).await;
                }
                Err(e) => return Err(self.fail(what, e)),
            }
        }
    }
}

/// Sleeps for `delay`.
pub async fn sleep(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// Pauses after a request that reached no server.
pub async fn backoff() {
    tokio::time::sleep(Duration::from_millis(BACKOFF_MS)).await;
}

/// One actor of a scenario: its name (in the history and in its correlation ids), its own
/// random stream (the same seed gives it the same schedule), and the number of its next
/// operation.
pub struct Actor {
    /// The actor's name.
    pub name: String,
    /// The actor's random stream.
    pub rng: ChaCha8Rng,
    next_op: u64,
}

impl Actor {
    /// The correlation id of the actor's next operation (each call numbers a new one).
    pub fn next_correlation_id(&mut self, env: &Env) -> String {
        let id = env.correlation_id(&self.name, self.next_op);
        self.next_op += 1;
        id
    }
}
