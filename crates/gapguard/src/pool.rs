//! `gapguard pool set|get`, `gapguard reserve` and `gapguard reservation get|commit|release`:
//! counted resources that never go below zero, held for a TTL and then consumed or given
//! back.

use clap::{Args, Subcommand};
use gapguard_api::{PoolRequest, ReserveRequest};
use serde_json::Value;

use crate::kv::options;
use crate::output::note_replay;
use crate::{Ctx, ReadArgs, WriteArgs};

#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a pool or set its capacity (exit 4 `capacity_too_low` below used + reserved).
    Set {
        /// Namespace.
        ns: String,
        /// Pool name.
        pool: String,
        /// The total amount.
        #[arg(long, value_name = "N")]
        capacity: u64,
        #[command(flatten)]
        request: WriteArgs,
    },
    /// Print a pool's capacity, used, reserved and available amounts (exit 3 if absent).
    Get {
        /// Namespace.
        ns: String,
        /// Pool name.
        pool: String,
        #[command(flatten)]
        request: ReadArgs,
    },
}

impl PoolCommand {
    /// The `--correlation-id` given, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            Self::Set { request, .. } => request.correlation_id.as_deref(),
            Self::Get { request, .. } => request.correlation_id.as_deref(),
        }
    }
}

/// `gapguard reserve`.
#[derive(Debug, Args)]
pub struct ReserveArgs {
    /// Namespace.
    pub ns: String,
    /// Pool name.
    pub pool: String,
    /// The amount to hold (at least 1).
    #[arg(long, value_name = "N")]
    pub amount: u64,
    /// How long to hold it, in ms; unfinished by then, it is released and listed by `orphans list`.
    #[arg(long, value_name = "N")]
    pub ttl_ms: u64,
    /// What you are about to build, as JSON (returned with the reservation and its orphan).
    #[arg(long, value_name = "JSON", value_parser = parse_context)]
    pub context: Option<Value>,
    /// Print only the reservation id, as plain text (for `R=$(gapguard reserve … --id-only)`).
    #[arg(long)]
    pub id_only: bool,
    #[command(flatten)]
    pub request: WriteArgs,
}

#[derive(Debug, Subcommand)]
pub enum ReservationCommand {
    /// Print a reservation: pool, amount, state (held, committed, released, expired), context.
    Get {
        /// Namespace.
        ns: String,
        /// Reservation id (`rsv_…`, printed by `gapguard reserve`).
        id: String,
        #[command(flatten)]
        request: ReadArgs,
    },
    /// Consume a held reservation (exit 4 if it expired, was released or already committed).
    Commit {
        /// Namespace.
        ns: String,
        /// Reservation id.
        id: String,
        #[command(flatten)]
        request: WriteArgs,
    },
    /// Give a held reservation back to its pool (exit 4 if it expired, was committed or already released).
    Release {
        /// Namespace.
        ns: String,
        /// Reservation id.
        id: String,
        #[command(flatten)]
        request: WriteArgs,
    },
}

impl ReservationCommand {
    /// The `--correlation-id` given, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            Self::Get { request, .. } => request.correlation_id.as_deref(),
            Self::Commit { request, .. } | Self::Release { request, .. } => request.correlation_id.as_deref(),
        }
    }
}

fn parse_context(text: &str) -> Result<Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON ({e}); e.g. '{{\"vm\": \"v-1\"}}'"))
}

/// Runs a `pool` subcommand.
pub async fn pool(ctx: &Ctx, command: &PoolCommand) -> anyhow::Result<()> {
    match command {
        PoolCommand::Set { ns, pool, capacity, request } => {
            let response =
                ctx.client.set_pool(ns, pool, &PoolRequest { capacity: *capacity }, &options(request)).await?;
            note_replay(response.replayed);
            ctx.out.json(&response.value)
        }
        PoolCommand::Get { ns, pool, .. } => ctx.out.json(&ctx.client.get_pool(ns, pool).await?),
    }
}

/// Runs `gapguard reserve`.
pub async fn reserve(ctx: &Ctx, args: &ReserveArgs) -> anyhow::Result<()> {
    let body = ReserveRequest { amount: args.amount, ttl_ms: args.ttl_ms, context: args.context.clone() };
    let response = ctx.client.reserve(&args.ns, &args.pool, &body, &options(&args.request)).await?;
    note_replay(response.replayed);
    if args.id_only {
        return ctx.out.line(&response.value.reservation);
    }
    ctx.out.json(&response.value)
}

/// Runs a `reservation` subcommand.
pub async fn reservation(ctx: &Ctx, command: &ReservationCommand) -> anyhow::Result<()> {
    let response = match command {
        ReservationCommand::Get { ns, id, .. } => return ctx.out.json(&ctx.client.get_reservation(ns, id).await?),
        ReservationCommand::Commit { ns, id, request } => {
            ctx.client.commit_reservation(ns, id, &options(request)).await?
        }
        ReservationCommand::Release { ns, id, request } => {
            ctx.client.release_reservation(ns, id, &options(request)).await?
        }
    };
    note_replay(response.replayed);
    ctx.out.json(&response.value)
}
