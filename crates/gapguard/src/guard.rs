//! `gapguard check`, `act` and `txn`: the guarded writes.

use gapguard_api::{ActRequest, CheckRequest, TxnRequest};
use gapguard_client::RequestOptions;

use crate::failure::Failure;
use crate::kv::{options, stdin};
use crate::output::note_replay;
use crate::{ActArgs, CheckArgs, Ctx, TxnArgs};

/// Runs a check and prints the ticket response (or just the ticket with `--ticket-only`).
pub async fn check(ctx: &Ctx, args: &CheckArgs) -> anyhow::Result<()> {
    let request = CheckRequest { conditions: args.conditions.clone(), ttl_ms: args.ttl_ms, flow: args.flow.clone() };
    // The correlation id is the client's (`Ctx::new`); nothing else to send.
    let response = ctx.client.check(&args.ns, &request, &RequestOptions::default()).await?;
    if args.ticket_only {
        return ctx.out.line(&response.value.ticket);
    }
    ctx.out.json(&response.value)
}

/// Runs an act and prints its result.
pub async fn act(ctx: &Ctx, args: &ActArgs) -> anyhow::Result<()> {
    let ticket = match args.ticket.as_deref() {
        Some("-") => Some(stdin()?.trim().to_owned()),
        other => other.map(str::to_owned),
    };
    if ticket.as_deref() == Some("") {
        return Err(Failure::usage("--ticket is empty").into());
    }
    let request =
        ActRequest { ticket, conditions: args.conditions.clone(), ops: args.ops.clone(), flow: args.flow.clone() };
    let response = ctx.client.act(&args.ns, &request, &options(&args.request)).await?;
    note_replay(response.replayed);
    ctx.out.json(&response.value)
}

/// Runs a txn and prints its result (a false `if` is a result, not an error).
pub async fn txn(ctx: &Ctx, args: &TxnArgs) -> anyhow::Result<()> {
    let request =
        TxnRequest { compare: args.conditions.clone(), success: args.then_ops.clone(), failure: args.else_ops.clone() };
    let response = ctx.client.txn(&args.ns, &request, &options(&args.request)).await?;
    note_replay(response.replayed);
    ctx.out.json(&response.value)
}
