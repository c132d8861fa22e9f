//! `gapguard grant add|revoke|list` and `gapguard orphans list|resolve`.

use clap::{Args, Subcommand};
use gapguard_api::{GrantTuple, ResolveRequest};
use gapguard_client::GrantsQuery;

use crate::kv::options;
use crate::output::note_replay;
use crate::{Ctx, ReadArgs, WriteArgs};

/// A permission tuple on the command line: who may do what to what.
#[derive(Debug, Args)]
pub struct TupleArgs {
    /// Who, e.g. `user:alice`.
    pub subject: String,
    /// May do what, e.g. `read`.
    pub action: String,
    /// To what, e.g. `doc:9`.
    pub resource: String,
}

impl TupleArgs {
    fn tuple(&self) -> GrantTuple {
        GrantTuple { subject: self.subject.clone(), action: self.action.clone(), resource: self.resource.clone() }
    }
}

#[derive(Debug, Subcommand)]
pub enum GrantCommand {
    /// Grant a permission (`existed: true` if it was there already).
    Add {
        /// Namespace.
        ns: String,
        #[command(flatten)]
        tuple: TupleArgs,
        #[command(flatten)]
        request: WriteArgs,
    },
    /// Revoke a permission: every act after it is refused, even one whose check passed before.
    Revoke {
        /// Namespace.
        ns: String,
        #[command(flatten)]
        tuple: TupleArgs,
        #[command(flatten)]
        request: WriteArgs,
    },
    /// List grants.
    List {
        /// Namespace.
        ns: String,
        /// Only grants to this subject.
        #[arg(long, value_name = "S")]
        subject: Option<String>,
        /// Only grants on this resource.
        #[arg(long, value_name = "R")]
        resource: Option<String>,
        #[command(flatten)]
        request: ReadArgs,
    },
}

impl GrantCommand {
    /// The `--correlation-id` given, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            Self::Add { request, .. } | Self::Revoke { request, .. } => request.correlation_id.as_deref(),
            Self::List { request, .. } => request.correlation_id.as_deref(),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum OrphansCommand {
    /// List reservations and leases that expired unfinished, oldest first (unresolved only unless --all).
    List {
        /// Namespace.
        ns: String,
        /// Resolved ones too.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        request: ReadArgs,
    },
    /// Mark an orphan compensated (exit 3 if unknown, 4 `orphan_resolved` if already resolved).
    Resolve {
        /// Namespace.
        ns: String,
        /// Orphan id (the `id` of `orphans list`).
        id: String,
        /// What was done about it (kept with the orphan).
        #[arg(long, value_name = "TEXT")]
        note: Option<String>,
        #[command(flatten)]
        request: WriteArgs,
    },
}

impl OrphansCommand {
    /// The `--correlation-id` given, if any.
    pub fn correlation_id(&self) -> Option<&str> {
        match self {
            Self::List { request, .. } => request.correlation_id.as_deref(),
            Self::Resolve { request, .. } => request.correlation_id.as_deref(),
        }
    }
}

/// Runs a `grant` subcommand.
pub async fn grant(ctx: &Ctx, command: &GrantCommand) -> anyhow::Result<()> {
    let response = match command {
        GrantCommand::Add { ns, tuple, request } => ctx.client.grant(ns, &tuple.tuple(), &options(request)).await?,
        GrantCommand::Revoke { ns, tuple, request } => ctx.client.revoke(ns, &tuple.tuple(), &options(request)).await?,
        GrantCommand::List { ns, subject, resource, .. } => {
            let query = GrantsQuery { subject: subject.clone(), resource: resource.clone() };
            return ctx.out.json(&ctx.client.list_grants(ns, &query).await?);
        }
    };
    note_replay(response.replayed);
    ctx.out.json(&response.value)
}

/// Runs an `orphans` subcommand.
pub async fn orphans(ctx: &Ctx, command: &OrphansCommand) -> anyhow::Result<()> {
    match command {
        OrphansCommand::List { ns, all, .. } => ctx.out.json(&ctx.client.list_orphans(ns, *all).await?),
        OrphansCommand::Resolve { ns, id, note, request } => {
            let body = ResolveRequest { note: note.clone() };
            let response = ctx.client.resolve_orphan(ns, id, &body, &options(request)).await?;
            note_replay(response.replayed);
            ctx.out.json(&response.value)
        }
    }
}
