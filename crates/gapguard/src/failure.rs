//! How a failed command ends: the line for a person on stderr and the exit code for scripts.
//!
//! Exit codes (also in `gapguard --help`):
//!
//! | code | meaning |
//! |---|---|
//! | 0 | ok |
//! | 1 | cannot reach the server, or an unexpected error |
//! | 2 | usage error, or the server refused the request as invalid (400, 413, 422); `serve`: a configuration it refuses (the config file, TLS files it cannot use, no API keys off loopback) |
//! | 3 | not found (404): a key, pool, reservation or orphan (`not_found`, `*_not_found`) |
//! | 4 | refused (409, 410, 412): a condition failed, the check is stale, the ticket is used or expired; a lease is held by another or lost (`lease_held`, `lease_lost`); a pool has too little (`insufficient`, `capacity_too_low`); a reservation expired, was released or committed (`reservation_*`); an orphan is already resolved; `watch`: the history asked for is compacted |
//! | 5 | unauthorized or forbidden (401, 403) |
//! | 6 | the server is unavailable (503): a write prints the `--idempotency-key` to rerun it with |
//! | 7 | `audit verify`: the audit chain does not verify |
//! | 8 | `gameday`: a guarded run violated its invariant, or a naive run showed no violation |
//! | 9 | the outcome is unknown (503 `outcome_unknown`: the server ran out of time after reading the write): rerun it with the `--idempotency-key` printed |

use std::fmt::Write as _;

use gapguard_api::{codes, ConditionFailure};
use gapguard_client::ClientError;
use serde_json::Value;

/// Success.
pub const OK: u8 = 0;
/// The server cannot be reached, or something unexpected happened.
pub const UNEXPECTED: u8 = 1;
/// A usage error, or a request the server found invalid (400, 413, 422).
pub const USAGE: u8 = 2;
/// Not found (404).
pub const NOT_FOUND: u8 = 3;
/// Refused (409, 410, 412): condition failed, stale check, ticket used or expired, lease held
/// or lost, pool insufficient, reservation expired, released or committed; a compacted watch.
pub const REFUSED: u8 = 4;
/// Unauthorized or forbidden (401, 403).
pub const FORBIDDEN: u8 = 5;
/// The server is unavailable (503).
pub const UNAVAILABLE: u8 = 6;
/// The audit chain does not verify.
pub const CHAIN_BROKEN: u8 = 7;
/// `gameday`: a guarded run violated its invariant, or a naive run proved nothing.
pub const GAMEDAY_FAILED: u8 = 8;
/// The write may or may not have taken effect (503 `outcome_unknown`).
pub const OUTCOME_UNKNOWN: u8 = 9;

/// The exit-code table of `--help`.
pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  ok
  1  cannot reach the server, or an unexpected error
  2  usage error, or the server refused the request as invalid (400, 413, 422); serve: a
     configuration it refuses (config file, TLS files, no API keys off loopback)
  3  not found (404): key, pool, reservation or orphan
  4  refused (409, 410, 412): condition failed, stale check, ticket used or expired, check failed,
     lease held or lost, pool insufficient or capacity too low, reservation expired, released or
     committed, orphan already resolved; watch: history compacted
  5  unauthorized or forbidden (401, 403)
  6  server unavailable (503): a write prints the --idempotency-key to rerun it with
  7  audit verify: the audit chain does not verify
  8  gameday: a guarded run violated its invariant, or a naive run showed no violation
  9  the write's outcome is unknown (503 outcome_unknown): rerun it with the --idempotency-key
     printed, which answers what the first did or does it once

Output is JSON on stdout (pretty, or one line with --compact; `watch` prints one line per change);
errors go to stderr.";

/// A command that ends with its own exit code and message (not an error of the client).
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub code: u8,
    /// What to tell the person.
    pub message: String,
}

impl Failure {
    /// A command line that parses but cannot be run as given.
    pub fn usage(message: impl Into<String>) -> Self {
        Self { code: USAGE, message: message.into() }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// The exit code of an HTTP error status.
pub fn code_for_status(status: u16) -> u8 {
    match status {
        400 | 413 | 422 => USAGE,
        404 => NOT_FOUND,
        409 | 410 | 412 => REFUSED,
        401 | 403 => FORBIDDEN,
        503 => UNAVAILABLE,
        _ => UNEXPECTED,
    }
}

/// The exit code of a failed command.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    if let Some(failure) = error.downcast_ref::<Failure>() {
        return failure.code;
    }
    if error.downcast_ref::<gapguard_server::ConfigError>().is_some() {
        return USAGE;
    }
    // `serve` refusing its configuration: TLS files it cannot use, or no keys off loopback.
    if matches!(
        error.downcast_ref::<gapguard_server::ServeError>(),
        Some(gapguard_server::ServeError::Tls(_) | gapguard_server::ServeError::Insecure(_))
    ) {
        return USAGE;
    }
    match error.downcast_ref::<ClientError>() {
        Some(ClientError::Api { body, .. }) if body.error == codes::OUTCOME_UNKNOWN => OUTCOME_UNKNOWN,
        // Not "the key is absent" (3): the request never reached a route.
        Some(ClientError::Api { body, .. }) if body.error == codes::NO_ROUTE => UNEXPECTED,
        Some(ClientError::Api { status, .. }) => code_for_status(*status),
        Some(ClientError::InvalidArgument { .. }) => USAGE,
        _ => UNEXPECTED,
    }
}

/// Whether the error is stdout having been closed by its reader (`gapguard … | head`),
/// which is not a failure of the command.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error
        .chain()
        .any(|e| e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe))
}

/// What to try when a connection fails, from the root cause's words (rustls names a
/// certificate it cannot verify, and a non-TLS answer as an invalid content type).
fn connect_hint(reason: &str) -> &'static str {
    if reason.contains("not valid for name") {
        "the certificate is trusted but does not name the host in --url: use a name (or IP) it holds, \
         as listed above, or give the server a certificate for this one"
    } else if reason.contains("certificate") {
        "pass the CA that signed the server's certificate with --ca-file (env GAPGUARD_CA_FILE)"
    } else if reason.contains("InvalidContentType") {
        "the server does not speak TLS there: use an http:// URL"
    } else {
        "is `gapguard serve` running?"
    }
}

/// What to print on stderr: `error: …`, then indented details. `base_url` is the server the
/// command talked to (`--url`).
pub fn report(error: &anyhow::Error, base_url: &str) -> String {
    if let Some(gapguard_server::ConfigError::Parse { path, message }) = error.downcast_ref() {
        return format!("error: config file {}: {}", path.display(), one_line(message));
    }
    let Some(client_error) = error.downcast_ref::<ClientError>() else {
        return format!("error: {}", chain(error));
    };
    match client_error {
        ClientError::Api { body, .. } => {
            let mut out = format!("error: {}: {}", body.error, body.message);
            for (name, value) in &body.details {
                render_detail(&mut out, name, value);
            }
            if body.error == codes::NO_ROUTE {
                let _ = write!(out, "; is {base_url} the server's base URL (scheme, host and port, no /v1)?");
            }
            // A write refused as unavailable may still have been applied when the store failed
            // mid-commit: either way, the same key makes the rerun safe.
            if body.error == codes::OUTCOME_UNKNOWN || body.error == codes::UNAVAILABLE {
                if let Some(key) = crate::kv::IDEMPOTENCY_KEY.lock().unwrap_or_else(|e| e.into_inner()).as_deref() {
                    let _ = write!(out, "; this write's key was {key}: rerun the command with --idempotency-key {key}");
                }
            }
            out
        }
        ClientError::Transport { reason, .. } if client_error.is_connect() => {
            format!("error: cannot reach gapguard at {base_url}: {reason}; {}", connect_hint(reason))
        }
        ClientError::Transport { url, reason, .. } => format!("error: request to {url} failed: {reason}"),
        ClientError::Decode { .. } => format!("error: {client_error} (is {base_url} a gapguard server?)"),
        other => format!("error: {other}"),
    }
}

/// An error and its causes on one line, leaving out a cause the text already quotes (many
/// errors repeat their source in their own message).
fn chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.is_empty() {
            text = cause;
        } else if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
    }
    text
}

/// A parser's multi-line message (position, source excerpt with a caret, explanation) as
/// `position: explanation`.
fn one_line(message: &str) -> String {
    let lines: Vec<&str> = message.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    match (lines.first(), lines.last()) {
        (Some(first), Some(last)) if lines.len() > 1 => format!("{first}: {last}"),
        _ => message.trim().to_owned(),
    }
}

/// One detail of an error body, for a person.
fn render_detail(out: &mut String, name: &str, value: &Value) {
    // The message of an invalid request already names the field.
    if name == "field" {
        return;
    }
    let failures = match name {
        "failed" | "changed" => serde_json::from_value::<Vec<ConditionFailure>>(value.clone()).ok(),
        _ => None,
    };
    let Some(failures) = failures else {
        let _ = write!(out, "\n  {name}: {value}");
        return;
    };
    for f in failures {
        let condition = serde_json::to_string(&f.condition).unwrap_or_default();
        let _ = write!(out, "\n  condition {} {condition}: {}; actual {}", f.index, f.reason, f.actual);
        if f.actual_version > 0 {
            let _ = write!(out, " (version {})", f.actual_version);
        }
        if let Some(revision) = f.changed_at_revision {
            let _ = write!(out, ", last changed at revision {revision}");
            if let Some(by) = &f.changed_by {
                let _ = write!(out, " by {by}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gapguard_api::ErrorBody;
    use serde_json::json;

    fn api(status: u16, body: Value) -> anyhow::Error {
        ClientError::Api { status, body: serde_json::from_value::<ErrorBody>(body).unwrap() }.into()
    }

    #[test]
    fn statuses_map_to_the_documented_exit_codes() {
        let table = [
            (400, USAGE),
            (413, USAGE),
            (422, USAGE),
            (404, NOT_FOUND),
            (409, REFUSED),
            (410, REFUSED),
            (412, REFUSED),
            (401, FORBIDDEN),
            (403, FORBIDDEN),
            (503, UNAVAILABLE),
            (500, UNEXPECTED),
            (405, UNEXPECTED),
        ];
        for (status, code) in table {
            assert_eq!(code_for_status(status), code, "{status}");
        }
    }

    #[test]
    fn errors_map_to_exit_codes_by_kind() {
        assert_eq!(exit_code(&api(410, json!({"error": "ticket_expired", "message": "m"}))), REFUSED);
        assert_eq!(exit_code(&Failure::usage("no").into()), USAGE);
        assert_eq!(exit_code(&Failure { code: CHAIN_BROKEN, message: "x".into() }.into()), CHAIN_BROKEN);
        let invalid = ClientError::InvalidArgument { message: "key is empty".into() };
        assert_eq!(exit_code(&invalid.into()), USAGE);
        assert_eq!(exit_code(&anyhow::anyhow!("something else")), UNEXPECTED);
        let config = gapguard_server::Config::parse("lissen = 1").unwrap_err();
        assert_eq!(exit_code(&config.into()), USAGE);
    }

    #[test]
    fn a_certificate_for_another_name_is_not_blamed_on_the_ca() {
        let wrong_name = "invalid peer certificate: certificate not valid for name \"localhost\"; certificate is only valid for DnsName(\"gapguard.internal\")";
        assert!(connect_hint(wrong_name).contains("does not name the host"), "{}", connect_hint(wrong_name));
        let unknown_ca = "invalid peer certificate: UnknownIssuer";
        assert!(connect_hint(unknown_ca).contains("--ca-file"));
    }

    #[test]
    fn a_path_with_no_route_is_not_an_absent_key() {
        let wrong = api(404, json!({"error": "no_route", "message": "no route for /v1/v1/ns/a/kv/b"}));
        assert_eq!(exit_code(&wrong), UNEXPECTED);
        assert!(report(&wrong, "http://h/v1").contains("is http://h/v1 the server's base URL"));
        assert_eq!(exit_code(&api(404, json!({"error": "not_found", "message": "no key"}))), NOT_FOUND);
    }

    /// A 503 is "nothing was done, retry" (6) unless the server says the outcome is unknown
    /// (9), when the report names the key the write carried to rerun it with.
    #[test]
    fn an_unknown_outcome_has_its_own_exit_code_and_names_the_key_to_rerun_with() {
        let shed = api(503, json!({"error": "unavailable", "message": "too many requests"}));
        assert_eq!(exit_code(&shed), UNAVAILABLE);
        let unknown = api(503, json!({"error": "outcome_unknown", "message": "may or may not have taken effect"}));
        assert_eq!(exit_code(&unknown), OUTCOME_UNKNOWN);
        let args = crate::WriteArgs { idempotency_key: None, correlation_id: None };
        let key = crate::kv::options(&args).idempotency_key.expect("every write carries a key");
        assert!(key.starts_with("cli-") && key.len() == 36, "{key}");
        let other = crate::kv::options(&args).idempotency_key.unwrap();
        assert_ne!(key, other, "a new key for each write");
        let line = report(&unknown, "http://h");
        assert!(line.ends_with(&format!("rerun the command with --idempotency-key {other}")), "{line}");
    }

    #[test]
    fn the_exit_code_table_of_the_help_matches_the_constants() {
        for (code, word) in [
            (OK, "ok"),
            (NOT_FOUND, "404"),
            (REFUSED, "412"),
            (UNAVAILABLE, "503"),
            (CHAIN_BROKEN, "audit"),
            (GAMEDAY_FAILED, "gameday"),
        ] {
            let line = EXIT_CODES_HELP.lines().find(|l| l.trim_start().starts_with(&format!("{code} "))).unwrap();
            assert!(line.contains(word), "{line}");
        }
    }

    #[test]
    fn an_api_error_shows_code_message_and_failed_conditions() {
        let error = api(
            409,
            json!({
                "error": "stale_check",
                "message": "ticket condition 0 no longer holds",
                "changed": [{
                    "index": 0, "condition": {"compare": {"key": "stock/a", "op": ">=", "value": 1}},
                    "actual": 0, "actual_version": 4, "reason": "0 is not >= 1",
                    "changed_at_revision": 12, "changed_by": "corr-9"
                }]
            }),
        );
        assert_eq!(
            report(&error, "http://x"),
            "error: stale_check: ticket condition 0 no longer holds\n  condition 0 \
             {\"compare\":{\"key\":\"stock/a\",\"op\":\">=\",\"value\":1}}: 0 is not >= 1; actual 0 (version 4), \
             last changed at revision 12 by corr-9"
        );
    }

    #[test]
    fn an_invalid_request_does_not_repeat_the_field_and_other_details_are_shown_raw() {
        let error =
            api(400, json!({"error": "invalid_request", "message": "ops[0].put.key: key is empty", "field": "ops[0]"}));
        assert_eq!(report(&error, "http://x"), "error: invalid_request: ops[0].put.key: key is empty");
        let error = api(413, json!({"error": "payload_too_large", "message": "too big", "limit_bytes": 10}));
        assert_eq!(report(&error, "http://x"), "error: payload_too_large: too big\n  limit_bytes: 10");
    }

    #[test]
    fn causes_already_quoted_are_not_repeated() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "Address already in use");
        let error = anyhow::Error::new(std::io::Error::other(format!("cannot listen: {io}")));
        assert_eq!(report(&error, "http://x"), "error: cannot listen: Address already in use");
        let error = anyhow::Error::from(io).context("starting");
        assert_eq!(report(&error, "http://x"), "error: starting: Address already in use");
    }

    #[test]
    fn a_config_parse_error_is_one_line() {
        let error = gapguard_server::Config::parse("lissen = \"x\"").unwrap_err();
        let text = report(&error.into(), "http://x");
        assert!(!text.contains('\n'), "{text}");
        assert!(text.contains("line 1") && text.contains("unknown field `lissen`"), "{text}");
    }

    #[test]
    fn broken_pipes_are_recognised_through_context() {
        let error = anyhow::Error::from(std::io::Error::from(std::io::ErrorKind::BrokenPipe)).context("writing");
        assert!(is_broken_pipe(&error));
        assert!(!is_broken_pipe(&anyhow::anyhow!("other")));
    }
}
