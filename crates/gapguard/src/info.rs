//! `gapguard health` and `gapguard openapi`, and the client every client command uses.

use gapguard_client::{Client, ClientError, CORRELATION_ID_HEADER};

use crate::failure::{self, Failure};
use crate::{Cli, Ctx};

/// A client of `--url` with `--api-key` and `--ca-file` (or their environment variables),
/// that sends `correlation_id` (if any) as `X-Correlation-Id` on every request, reads
/// included.
pub fn client(cli: &Cli, correlation_id: Option<&str>) -> anyhow::Result<Client> {
    let mut builder = Client::builder(&cli.url);
    if let Some(id) = correlation_id {
        builder = builder.header(CORRELATION_ID_HEADER, id);
    }
    if let Some(secret) = &cli.api_key {
        builder = builder.api_key(secret);
    }
    if let Some(path) = &cli.ca_file {
        builder = builder.ca_file(path);
    }
    builder.build().map_err(|e| match e {
        // The message names what is wrong: the base URL, the CA file, the key or the header.
        ClientError::InvalidArgument { message } => Failure::usage(message).into(),
        other => other.into(),
    })
}

/// Prints the server's health; a failing store exits 6.
pub async fn health(ctx: &Ctx, ready: bool) -> anyhow::Result<()> {
    if ready {
        // Not ready is a 503, an error exiting 6 with the server's reason.
        return ctx.out.json(&ctx.client.ready().await?);
    }
    let health = ctx.client.health().await?;
    ctx.out.json(&health)?;
    if health.status != "ok" {
        return Err(
            Failure { code: failure::UNAVAILABLE, message: format!("server status is {:?}", health.status) }.into()
        );
    }
    Ok(())
}

/// Prints the OpenAPI document.
pub async fn openapi(ctx: &Ctx) -> anyhow::Result<()> {
    ctx.out.json(&ctx.client.openapi().await?)
}
