//! `gapguard serve`: config file and flags, logging, and the server.

use std::io::{IsTerminal as _, Write as _};

use tracing_subscriber::EnvFilter;

use crate::ServeArgs;

/// Loads the config, applies the flags over it, and serves until SIGINT or SIGTERM. The first
/// line on stdout is `listening on ADDR`, printed once the address is bound; logs go to
/// stderr (`RUST_LOG`, default `info`).
pub async fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let mut config = gapguard_server::Config::load(args.config.as_deref())?;
    if let Some(data) = &args.data {
        config.data = data.clone();
    }
    if let Some(listen) = args.listen {
        config.listen = listen;
    }
    init_tracing();
    gapguard_server::serve(config, |addr| {
        let mut out = std::io::stdout().lock();
        // A closed stdout must not stop the server; the address is in the log too.
        let _ = writeln!(out, "listening on {addr}").and_then(|()| out.flush());
    })
    .await?;
    Ok(())
}

fn init_tracing() {
    let (filter, bad_filter) = match EnvFilter::try_from_default_env() {
        Ok(filter) => (filter, None),
        Err(e) if std::env::var_os(EnvFilter::DEFAULT_ENV).is_some() => (EnvFilter::new("info"), Some(e)),
        Err(_) => (EnvFilter::new("info"), None),
    };
    let ansi = std::io::stderr().is_terminal();
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).init();
    if let Some(e) = bad_filter {
        tracing::warn!("ignoring RUST_LOG ({e}); logging at info");
    }
}
