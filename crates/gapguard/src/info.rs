//! `gapguard health` and `gapguard openapi`, and the client every client command uses.

use std::time::Duration;

use gapguard_client::reqwest;
use gapguard_client::{Client, ClientError, CONNECT_TIMEOUT_MS, CORRELATION_ID_HEADER};
use reqwest::header::{HeaderMap, HeaderValue};

use crate::failure::{self, Failure};
use crate::Ctx;

/// A client of `url` that sends `correlation_id` (if any) as `X-Correlation-Id` on every
/// request, reads included.
pub fn client(url: &str, correlation_id: Option<&str>) -> anyhow::Result<Client> {
    let mut headers = HeaderMap::new();
    if let Some(id) = correlation_id {
        let value = HeaderValue::from_str(id)
            .map_err(|_| Failure::usage(format!("--correlation-id {id:?} is not a valid header value")))?;
        headers.insert(CORRELATION_ID_HEADER, value);
    }
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(CONNECT_TIMEOUT_MS))
        .default_headers(headers)
        .build()?;
    Client::with_http(http, url).map_err(|e| match e {
        ClientError::InvalidArgument { message } => Failure::usage(format!("--url: {message}")).into(),
        other => other.into(),
    })
}

/// Prints the server's health; a failing store exits 6.
pub async fn health(ctx: &Ctx) -> anyhow::Result<()> {
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
