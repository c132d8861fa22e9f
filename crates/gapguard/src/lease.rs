//! `gapguard lease acquire|renew|release|get`: named, exclusive, TTL-bound rights with fencing
//! tokens.

use clap::Subcommand;
use gapguard_api::{AcquireRequest, LeaseReleaseRequest, RenewRequest};

use crate::kv::options;
use crate::output::note_replay;
use crate::{Ctx, ReadArgs, WriteArgs};

#[derive(Debug, Subcommand)]
pub enum LeaseCommand {
    /// Take a lease; prints its new fencing token (exit 4 `lease_held` while another holds it).
    Acquire {
        /// Namespace.
        ns: String,
        /// Lease name.
        name: String,
        /// Who takes it (shown to others while held).
        #[arg(long, value_name = "H")]
        holder: String,
        /// How long the hold lasts unless renewed, in ms.
        #[arg(long, value_name = "N")]
        ttl_ms: u64,
        /// Print only the fencing token, as plain text (for `T=$(gapguard lease acquire … --token-only)`).
        #[arg(long)]
        token_only: bool,
        #[command(flatten)]
        request: WriteArgs,
    },
    /// Extend a hold (exit 4 `lease_lost` if it expired or another holds the lease now).
    Renew {
        /// Namespace.
        ns: String,
        /// Lease name.
        name: String,
        /// The fencing token of the hold.
        #[arg(long, value_name = "N")]
        token: u64,
        /// The new TTL from now, in ms [default: the acquisition's].
        #[arg(long, value_name = "N")]
        ttl_ms: Option<u64>,
        #[command(flatten)]
        request: WriteArgs,
    },
    /// End a hold (exit 4 `lease_lost` if it is not the current one).
    Release {
        /// Namespace.
        ns: String,
        /// Lease name.
        name: String,
        /// The fencing token of the hold.
        #[arg(long, value_name = "N")]
        token: u64,
        #[command(flatten)]
        request: WriteArgs,
    },
    /// Print a lease's holder, token and expiry (token 0, `held: false` if never acquired).
    Get {
        /// Namespace.
        ns: String,
        /// Lease name.
        name: String,
        #[command(flatten)]
        request: ReadArgs,
    },
}

impl LeaseCommand {
    /// The `--correlation-id` given, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            Self::Acquire { request, .. } | Self::Renew { request, .. } | Self::Release { request, .. } => {
                request.correlation_id.as_deref()
            }
            Self::Get { request, .. } => request.correlation_id.as_deref(),
        }
    }
}

/// Runs a `lease` subcommand.
pub async fn run(ctx: &Ctx, command: &LeaseCommand) -> anyhow::Result<()> {
    let response = match command {
        LeaseCommand::Acquire { ns, name, holder, ttl_ms, token_only, request } => {
            let body = AcquireRequest { holder: holder.clone(), ttl_ms: *ttl_ms };
            let response = ctx.client.acquire_lease(ns, name, &body, &options(request)).await?;
            if *token_only {
                note_replay(response.replayed);
                return ctx.out.line(&response.value.token.to_string());
            }
            response
        }
        LeaseCommand::Renew { ns, name, token, ttl_ms, request } => {
            let body = RenewRequest { token: *token, ttl_ms: *ttl_ms };
            ctx.client.renew_lease(ns, name, &body, &options(request)).await?
        }
        LeaseCommand::Release { ns, name, token, request } => {
            ctx.client.release_lease(ns, name, &LeaseReleaseRequest { token: *token }, &options(request)).await?
        }
        LeaseCommand::Get { ns, name, .. } => return ctx.out.json(&ctx.client.get_lease(ns, name).await?),
    };
    note_replay(response.replayed);
    ctx.out.json(&response.value)
}
