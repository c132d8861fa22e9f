//! `gapguard kv get|put|delete|list`.

use std::io::Read as _;

use anyhow::Context as _;
use gapguard_client::RequestOptions;
use serde_json::Value;

use crate::failure::Failure;
use crate::output::note_replay;
use crate::{Ctx, KvCommand, WriteArgs};

/// Runs a `kv` subcommand.
pub async fn run(ctx: &Ctx, command: &KvCommand) -> anyhow::Result<()> {
    match command {
        KvCommand::Get { ns, key, .. } => ctx.out.json(&ctx.client.get(ns, key).await?),
        KvCommand::Put { ns, key, value, string, request } => {
            let text = if value == "-" { stdin()? } else { value.clone() };
            let value = parse_value(&text, *string)?;
            let response = ctx.client.put(ns, key, &value, &options(request)).await?;
            note_replay(response.replayed);
            ctx.out.json(&response.value)
        }
        KvCommand::Delete { ns, key, request } => {
            let response = ctx.client.delete(ns, key, &options(request)).await?;
            note_replay(response.replayed);
            ctx.out.json(&response.value)
        }
        KvCommand::List { ns, prefix, after, limit, .. } => {
            ctx.out.json(&ctx.client.list_after(ns, prefix, after.as_deref(), *limit).await?)
        }
    }
}

/// The options of a writing request (the correlation id is already a default header). Every
/// write carries an `Idempotency-Key`, the one given or a new random one, so that a write whose
/// outcome is unknown (`503 outcome_unknown`) can be rerun safely: the key is kept for
/// [`crate::failure::report`] to print.
pub fn options(request: &WriteArgs) -> RequestOptions {
    let key = request.idempotency_key.clone().unwrap_or_else(|| {
        let random: [u8; 16] = rand::random();
        format!("cli-{}", random.iter().map(|b| format!("{b:02x}")).collect::<String>())
    });
    *IDEMPOTENCY_KEY.lock().unwrap_or_else(|e| e.into_inner()) = Some(key.clone());
    RequestOptions { idempotency_key: Some(key), correlation_id: request.correlation_id.clone() }
}

/// The `Idempotency-Key` of this command's write (a command makes one write; the last one).
pub static IDEMPOTENCY_KEY: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// All of stdin, without the final newline a shell or `echo` adds.
pub fn stdin() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin().read_to_string(&mut text).context("reading stdin")?;
    let trimmed = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t));
    Ok(trimmed.map(str::to_owned).unwrap_or(text))
}

/// The value of `kv put`: JSON, or with `--string` the text itself as a JSON string.
fn parse_value(text: &str, string: bool) -> Result<Value, Failure> {
    if string {
        return Ok(Value::String(text.to_owned()));
    }
    serde_json::from_str(text).map_err(|e| {
        let quoted = serde_json::to_string(text).unwrap_or_default();
        Failure::usage(format!(
            "VALUE is not valid JSON ({e}): {text:?}; to store it as a string, pass --string \
             or quote it as JSON: '{quoted}'"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_json_unless_string_is_asked_for() {
        assert_eq!(parse_value("3", false).unwrap(), json!(3));
        assert_eq!(parse_value(r#"{"a": [1, null]}"#, false).unwrap(), json!({"a": [1, null]}));
        assert_eq!(parse_value(r#""hi""#, false).unwrap(), json!("hi"));
        assert_eq!(parse_value("hello world", true).unwrap(), json!("hello world"));
        assert_eq!(parse_value("3", true).unwrap(), json!("3"));
    }

    #[test]
    fn a_value_that_is_not_json_says_so_and_how_to_store_text() {
        let err = parse_value("hello", false).unwrap_err();
        assert_eq!(err.code, crate::failure::USAGE);
        assert!(err.message.starts_with("VALUE is not valid JSON"), "{}", err.message);
        assert!(err.message.contains("--string"), "{}", err.message);
        assert!(parse_value("", false).is_err());
        let err = parse_value(r#"say "hi""#, false).unwrap_err();
        assert!(err.message.ends_with(r#"quote it as JSON: '"say \"hi\""'"#), "{}", err.message);
    }
}
