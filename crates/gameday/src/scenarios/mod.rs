//! The scenarios: each module has its setup and actors (`run`, both modes) and its check
//! phase (`judge`, on the recorded history and the final state).

mod cache;
mod deploy;
mod inventory;
mod lease;
mod quota;
mod retry;
mod revocation;

use std::future::Future;
use std::sync::Arc;

use serde_json::Value;

use crate::env::Env;
use crate::history::OpRecord;
use crate::judge::Judgement;
use crate::{GamedayError, Scenario};

/// Runs the scenario's setup, its actors until the deadline, and whatever must settle before
/// judging (the quota's reconciler).
pub async fn run(env: Arc<Env>) -> Result<(), GamedayError> {
    match env.scenario {
        Scenario::Inventory => inventory::run(env).await,
        Scenario::Quota => quota::run(env).await,
        Scenario::Revocation => revocation::run(env).await,
        Scenario::Lease => lease::run(env).await,
        Scenario::Retry => retry::run(env).await,
        Scenario::Cache => cache::run(env).await,
        Scenario::Deploy => deploy::run(env).await,
    }
}

/// Judges the invariant on the history (outcomes resolved) and the final state.
pub async fn judge(env: &Env, ops: &[OpRecord]) -> Result<Judgement, GamedayError> {
    match env.scenario {
        Scenario::Inventory => inventory::judge(env, ops).await,
        Scenario::Quota => quota::judge(env, ops).await,
        Scenario::Revocation => revocation::judge(env, ops).await,
        Scenario::Lease => lease::judge(env, ops).await,
        Scenario::Retry => retry::judge(env, ops).await,
        Scenario::Cache => cache::judge(env, ops).await,
        Scenario::Deploy => deploy::judge(env, ops).await,
    }
}

/// The kinds of operation that are the scenario's main flow (counted as attempted).
pub fn main_kinds(scenario: Scenario) -> &'static [&'static str] {
    match scenario {
        Scenario::Inventory => &["buy"],
        Scenario::Quota => &["provision"],
        Scenario::Revocation => &["export"],
        Scenario::Lease => &["write"],
        Scenario::Retry => &["deposit", "set"],
        Scenario::Cache => &["act"],
        Scenario::Deploy => &["deploy"],
    }
}

/// Runs `actor(env, idx)` for `idx` in `0..n` concurrently and waits for all of them.
pub async fn spawn_all<F, Fut>(env: &Arc<Env>, n: usize, actor: F) -> Result<(), GamedayError>
where
    F: Fn(Arc<Env>, usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut tasks = tokio::task::JoinSet::new();
    for idx in 0..n {
        tasks.spawn(actor(env.clone(), idx));
    }
    while let Some(done) = tasks.join_next().await {
        done.map_err(|e| panicked("an actor", e))?;
    }
    Ok(())
}

/// Waits for a scenario's helper task (the restocker, the admin…); `who` names it if it panicked.
pub async fn joined(task: tokio::task::JoinHandle<()>, who: &str) -> Result<(), GamedayError> {
    task.await.map_err(|e| panicked(who, e))
}

fn panicked(who: &str, e: tokio::task::JoinError) -> GamedayError {
    GamedayError::io(format!("{who} panicked"), std::io::Error::other(e.to_string()))
}

/// A JSON number as an i64 (absent or not a number: 0).
pub fn int(value: &Value) -> i64 {
    value.as_i64().or_else(|| value.as_f64().map(|f| f as i64)).unwrap_or(0)
}
