//! `gapguard audit tail` and `gapguard audit verify`.

use std::time::Duration;

use gapguard_client::AuditQuery;

use crate::failure::{self, Failure};
use crate::{Ctx, TailArgs};

/// How often `--follow` asks for new events.
const FOLLOW_POLL_MS: u64 = 500;
/// Events asked for per request while following.
const FOLLOW_PAGE_EVENTS: usize = 1000;

/// Prints the newest `-n` matching events oldest first, then with `--follow` every new one
/// until Ctrl-C. Each event is its own JSON document, so the output is a stream for `jq`.
pub async fn tail(ctx: &Ctx, args: &TailArgs) -> anyhow::Result<()> {
    let filters =
        AuditQuery { correlation_id: args.correlation_id.clone(), key: args.key.clone(), ..AuditQuery::default() };
    // The namespace's head is read before the tail, so an event written in between is either
    // in the tail or after the cursor: never skipped.
    let mut after_seq = 0;
    if args.follow {
        let head = AuditQuery { limit: Some(1), newest: true, ..AuditQuery::default() };
        after_seq = ctx.client.audit(&args.ns, &head).await?.events.last().map_or(0, |e| e.seq);
    }
    if args.lines > 0 {
        let newest = AuditQuery { limit: Some(args.lines), newest: true, ..filters.clone() };
        for event in ctx.client.audit(&args.ns, &newest).await?.events {
            ctx.out.json(&event)?;
            after_seq = after_seq.max(event.seq);
        }
    }
    if !args.follow {
        return Ok(());
    }
    tokio::select! {
        result = follow(ctx, &args.ns, filters, after_seq) => result,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}

/// Prints every matching event after `after_seq`, polling for more, forever.
async fn follow(ctx: &Ctx, ns: &str, filters: AuditQuery, mut after_seq: u64) -> anyhow::Result<()> {
    loop {
        loop {
            let query = AuditQuery { after_seq: Some(after_seq), limit: Some(FOLLOW_PAGE_EVENTS), ..filters.clone() };
            let page = ctx.client.audit(ns, &query).await?;
            for event in &page.events {
                ctx.out.json(event)?;
                after_seq = after_seq.max(event.seq);
            }
            match page.next_after_seq {
                Some(next) => after_seq = after_seq.max(next),
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(FOLLOW_POLL_MS)).await;
    }
}

/// Prints the verification; a broken chain exits 7.
pub async fn verify(ctx: &Ctx) -> anyhow::Result<()> {
    let verification = ctx.client.audit_verify().await?;
    ctx.out.json(&verification)?;
    if verification.ok {
        return Ok(());
    }
    let message = match &verification.broken {
        Some(b) => format!("the audit chain is broken at event {}: {}", b.seq, b.reason),
        None => "the audit chain does not verify".to_owned(),
    };
    Err(Failure { code: failure::CHAIN_BROKEN, message }.into())
}
