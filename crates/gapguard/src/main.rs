//! The `gapguard` binary: the command line (clap) and the glue that runs each command; the
//! commands live in their modules, the logic in the library crates.
//!
//! `gapguard serve` runs the server; every other command is a client of a running server
//! (`--url`, env `GAPGUARD_URL`), prints JSON on stdout and a person-readable error on stderr,
//! and exits with a code scripts can use (see [`failure`]: 0 ok, 1 cannot reach the server,
//! 2 usage or invalid request, 3 not found, 4 refused, 5 forbidden, 6 unavailable, 7 audit
//! chain broken).
//!
//! | command | what it does |
//! |---|---|
//! | `serve` | runs the server |
//! | `kv get\|put\|delete\|list` | reads and writes keys |
//! | `check`, `act`, `txn` | guarded writes: a ticket now, the write later only if it still holds |
//! | `lease acquire\|renew\|release\|get NS NAME` | leases with fencing tokens ([`lease`]) |
//! | `pool set\|get NS POOL` | counted resources ([`pool`]) |
//! | `reserve NS POOL --amount N --ttl-ms T` | holds an amount; prints the reservation id |
//! | `reservation get\|commit\|release NS ID` | reads, consumes or gives back a reservation |
//! | `grant add\|revoke NS SUBJECT ACTION RESOURCE`, `grant list NS` | permissions ([`grant`]) |
//! | `orphans list\|resolve NS` | what expired unfinished, for the user's cleanup job |
//! | `watch NS` | changes as they are committed, one JSON line each, until Ctrl-C ([`watch`]) |
//! | `audit tail\|verify`, `health`, `openapi` | the audit log and the server |
//! | `keys new --id ID --namespaces a,b --role R` | a new API key: its secret once, and the config block ([`keys`]) |
//! | `rules --config FILE --out DIR` | Prometheus SLO rules and Grafana dashboards for the config's flows ([`rules`]) |
//! | `gameday` | race scenarios, naive versus guarded, against an embedded server or `--url` ([`gameday`]) |
//!
//! Client commands send `--api-key` (env `GAPGUARD_API_KEY`) as `Authorization: Bearer`, and
//! trust the CAs of `--ca-file` (env `GAPGUARD_CA_FILE`) for an `https://` URL.
//!
//! A reservation is made by the verb `reserve` and then addressed as a noun, `reservation
//! commit NS ID`: the id is what `reserve` printed, and the pool is not needed again.

mod audit;
mod failure;
mod gameday;
mod grant;
mod guard;
mod info;
mod keys;
mod kv;
mod lease;
mod output;
mod pool;
mod rules;
mod serve;
mod watch;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::parser::ValueSource;
use clap::{Args, CommandFactory as _, FromArgMatches as _, Parser, Subcommand};
use gapguard_api::{Condition, Op};
use gapguard_client::Client;

use crate::grant::{GrantCommand, OrphansCommand};
use crate::keys::KeysCommand;
use crate::lease::LeaseCommand;
use crate::output::Printer;
use crate::pool::{PoolCommand, ReservationCommand, ReserveArgs};
use crate::watch::WatchArgs;

/// mimalloc instead of glibc's malloc: the server allocates and frees small buffers on every
/// request from both worker threads; glibc's arenas spent about a tenth of a check's server
/// time in `malloc`, `free` and `malloc_consolidate` (measured with `perf`, see README).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Where client commands look for the server unless told otherwise.
const DEFAULT_URL: &str = "http://127.0.0.1:7700";

/// gapguard: the guard that closes the gap between time of check and time of use.
#[derive(Debug, Parser)]
#[command(name = "gapguard", version, after_long_help = failure::EXIT_CODES_HELP)]
struct Cli {
    /// Base URL of the gapguard server (client commands).
    #[arg(long, global = true, env = "GAPGUARD_URL", default_value = DEFAULT_URL, value_name = "URL")]
    url: String,
    /// API key, sent as `Authorization: Bearer KEY` (client commands). Prefer the environment
    /// variable: a flag's value is visible to other users in the process list.
    #[arg(long, global = true, env = "GAPGUARD_API_KEY", hide_env_values = true, value_name = "KEY")]
    api_key: Option<String>,
    /// PEM file of the CA certificates to trust for an https:// URL, instead of the built-in
    /// public roots (client commands).
    #[arg(long, global = true, env = "GAPGUARD_CA_FILE", value_name = "FILE")]
    ca_file: Option<PathBuf>,
    /// Print JSON on one line instead of pretty-printed.
    #[arg(long, global = true)]
    compact: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the server (prints `listening on ADDR` as the first line of stdout).
    Serve(ServeArgs),
    /// Read and write keys.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Evaluate conditions; if they hold, print a ticket for a later `act`.
    Check(CheckArgs),
    /// Apply ops if a ticket's conditions (and the act's own) still hold, atomically.
    Act(ActArgs),
    /// etcd-style transaction: if every condition holds run `--then`, else `--else`.
    Txn(TxnArgs),
    /// Take, renew and release leases: exclusive, TTL-bound rights with fencing tokens.
    #[command(subcommand)]
    Lease(LeaseCommand),
    /// Create pools (quota, stock, funds) and read their counters.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Hold an amount of a pool for a TTL; prints the reservation (then `reservation commit|release NS ID`).
    Reserve(ReserveArgs),
    /// Read, commit or release a reservation made by `reserve`.
    #[command(subcommand)]
    Reservation(ReservationCommand),
    /// Grant, revoke and list permissions (subject, action, resource).
    #[command(subcommand)]
    Grant(GrantCommand),
    /// List and resolve reservations and leases that expired unfinished.
    #[command(subcommand)]
    Orphans(OrphansCommand),
    /// Print changes as they are committed, one JSON line each, until Ctrl-C (exit 4 if history is compacted).
    Watch(WatchArgs),
    /// Read and verify the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// Ask the server whether it is healthy (exit 6 when its store is failing), or with
    /// `--ready` whether it can serve now (exit 6 when not, e.g. its database is away).
    Health(HealthArgs),
    /// Print the server's OpenAPI document.
    Openapi(ReadArgs),
    /// Make API keys for the server's config file.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Write Prometheus rules (SLO recordings, burn-rate alerts) and Grafana dashboards for the config's flows.
    Rules(rules::RulesArgs),
    /// Run race scenarios naive and guarded, with injected delays and faults, and judge their invariants
    /// (against an embedded server, or a running one given with --url; exit 8 if the verdict fails).
    Gameday(gameday::GamedayArgs),
}

/// `gapguard serve`.
#[derive(Debug, Args)]
struct ServeArgs {
    /// Directory of the embedded store [default: ./gapguard-data, or the config's `data`].
    #[arg(long, value_name = "DIR", conflicts_with = "backend")]
    data: Option<PathBuf>,
    /// Serve over PostgreSQL instead of the embedded store: `postgres://USER@HOST:PORT/DB`
    /// (any number of nodes may serve one database; see docs/deploy.md) [default: the config's `backend`].
    #[arg(long, value_name = "URL")]
    backend: Option<String>,
    /// Address to listen on; port 0 picks a free one [default: 127.0.0.1:7700, or the config's `listen`].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// TOML config file (flags override its `data` or `backend`, `listen`, `trace_file`,
    /// `otlp_endpoint` and `metrics_listen`).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Append finished spans to this file as OTLP JSON Lines [default: the config's `trace_file`].
    #[arg(long, value_name = "PATH")]
    trace_file: Option<PathBuf>,
    /// Send finished spans over OTLP/HTTP (protobuf) to this collector, e.g.
    /// http://127.0.0.1:4318 (spans go to URL/v1/traces) [default: the config's `otlp_endpoint`].
    #[arg(long, value_name = "URL", value_parser = otlp_endpoint)]
    otlp_endpoint: Option<String>,
    /// Serve /metrics (and /healthz) on this address instead of the API's [default: the
    /// config's `metrics_listen`].
    #[arg(long, value_name = "ADDR")]
    metrics_listen: Option<std::net::SocketAddr>,
}

/// `--otlp-endpoint`: the traces URL of a valid endpoint, else why not (clap exits 2 with it).
fn otlp_endpoint(endpoint: &str) -> Result<String, String> {
    gapguard_server::config::otlp_traces_url(endpoint)
}

/// Headers of a request that only reads.
#[derive(Debug, Args)]
struct ReadArgs {
    /// `X-Correlation-Id` of the request (ties it to your logs; stored in the audit log).
    #[arg(long, value_name = "ID")]
    correlation_id: Option<String>,
}

/// `gapguard health`.
#[derive(Debug, Args)]
struct HealthArgs {
    /// Ask `/readyz` instead of `/healthz`: whether the node can serve requests now. Over
    /// PostgreSQL, `/healthz` stays ok through a database outage (the process is sound and
    /// recovers by itself); `/readyz` answers 503 until the database is back.
    #[arg(long)]
    ready: bool,
    #[command(flatten)]
    request: ReadArgs,
}

/// Headers of a request that writes.
#[derive(Debug, Args)]
struct WriteArgs {
    /// `Idempotency-Key`: a retry with the same key gets the first answer instead of a second
    /// effect [default: a new random one, printed when the outcome is unknown (exit 9)].
    #[arg(long, value_name = "KEY")]
    idempotency_key: Option<String>,
    /// `X-Correlation-Id` of the request (ties it to your logs; stored in the audit log).
    #[arg(long, value_name = "ID")]
    correlation_id: Option<String>,
}

#[derive(Debug, Subcommand)]
enum KvCommand {
    /// Print a key's record (exit 3 if absent).
    Get {
        /// Namespace.
        ns: String,
        /// Key (may contain `/`).
        key: String,
        #[command(flatten)]
        request: ReadArgs,
    },
    /// Set a key to a JSON value.
    Put {
        /// Namespace.
        ns: String,
        /// Key (may contain `/`).
        key: String,
        /// The value as JSON (`3`, `-1`, `'"text"'`, `'{"a":1}'`), or `-` to read it from stdin.
        #[arg(allow_hyphen_values = true)]
        value: String,
        /// Store VALUE as a JSON string as it is, instead of parsing it as JSON.
        #[arg(long)]
        string: bool,
        #[command(flatten)]
        request: WriteArgs,
    },
    /// Delete a key (exit 3 if absent).
    Delete {
        /// Namespace.
        ns: String,
        /// Key (may contain `/`).
        key: String,
        #[command(flatten)]
        request: WriteArgs,
    },
    /// List live keys in key order.
    List {
        /// Namespace.
        ns: String,
        /// Only keys starting with this.
        #[arg(long, default_value = "")]
        prefix: String,
        /// Only keys after this one: the last key of a listing that said `"more": true`.
        #[arg(long)]
        after: Option<String>,
        /// At most this many keys [default: the server's].
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        request: ReadArgs,
    },
}

/// `gapguard check`.
#[derive(Debug, Args)]
struct CheckArgs {
    /// Namespace.
    ns: String,
    /// A condition, e.g. '{"compare": {"key": "stock/a", "op": ">=", "value": 1}}' (repeatable).
    #[arg(long = "if", value_name = "COND_JSON", required = true, value_parser = parse_condition)]
    conditions: Vec<Condition>,
    /// Ticket lifetime in ms [default: the server's, 30000].
    #[arg(long, value_name = "N")]
    ttl_ms: Option<u64>,
    /// The flow this check belongs to (labels metrics).
    #[arg(long, value_name = "F")]
    flow: Option<String>,
    /// Print only the ticket, as plain text (for `T=$(gapguard check … --ticket-only)`).
    #[arg(long)]
    ticket_only: bool,
    /// A check writes nothing: it takes no `--idempotency-key` (a retry gets a new ticket).
    #[command(flatten)]
    request: ReadArgs,
}

/// `gapguard act`.
#[derive(Debug, Args)]
struct ActArgs {
    /// Namespace.
    ns: String,
    /// The ticket of an earlier check, or `-` to read it from stdin.
    #[arg(long, value_name = "T")]
    ticket: Option<String>,
    /// A condition of the act itself (repeatable).
    #[arg(long = "if", value_name = "COND_JSON", value_parser = parse_condition)]
    conditions: Vec<Condition>,
    /// An op, e.g. '{"add": {"key": "stock/a", "by": -1}}' (repeatable; applied all or nothing).
    #[arg(long = "op", value_name = "OP_JSON", required = true, value_parser = parse_op)]
    ops: Vec<Op>,
    /// The flow [default: the ticket's].
    #[arg(long, value_name = "F")]
    flow: Option<String>,
    #[command(flatten)]
    request: WriteArgs,
}

/// `gapguard txn`.
#[derive(Debug, Args)]
struct TxnArgs {
    /// Namespace.
    ns: String,
    /// A condition (repeatable); all must hold for `--then` to run.
    #[arg(long = "if", value_name = "COND_JSON", value_parser = parse_condition)]
    conditions: Vec<Condition>,
    /// An op to apply when every condition holds (repeatable).
    #[arg(long = "then", value_name = "OP_JSON", value_parser = parse_op)]
    then_ops: Vec<Op>,
    /// An op to apply otherwise (repeatable). A false `--if` is not an error: exit 0, `succeeded: false`.
    #[arg(long = "else", value_name = "OP_JSON", value_parser = parse_op)]
    else_ops: Vec<Op>,
    #[command(flatten)]
    request: WriteArgs,
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print a namespace's newest audit events, oldest first, one JSON document each.
    Tail(TailArgs),
    /// Verify the audit log's hash chain (exit 7 if it is broken).
    Verify(ReadArgs),
}

/// `gapguard audit tail`.
#[derive(Debug, Args)]
struct TailArgs {
    /// Namespace.
    ns: String,
    /// How many of the newest events to print first.
    #[arg(short = 'n', long = "lines", value_name = "N", default_value_t = 20)]
    lines: usize,
    /// Keep printing new events as they are written (polls every 500 ms) until Ctrl-C.
    #[arg(short = 'f', long)]
    follow: bool,
    /// Only events of requests with this correlation id, and acts that used a ticket of the
    /// check with it.
    #[arg(long, value_name = "ID")]
    correlation_id: Option<String>,
    /// Only events that read or wrote this key.
    #[arg(long, value_name = "KEY")]
    key: Option<String>,
}

fn parse_condition(text: &str) -> Result<Condition, String> {
    serde_json::from_str(text).map_err(|e| {
        format!(
            "not a condition ({e}); e.g. '{{\"exists\": \"orders/42\"}}' or \
             '{{\"compare\": {{\"key\": \"stock/a\", \"op\": \">=\", \"value\": 1}}}}'"
        )
    })
}

fn parse_op(text: &str) -> Result<Op, String> {
    serde_json::from_str(text).map_err(|e| {
        format!(
            "not an op ({e}); e.g. '{{\"put\": {{\"key\": \"k\", \"value\": 1}}}}' or \
             '{{\"add\": {{\"key\": \"stock/a\", \"by\": -1}}}}'"
        )
    })
}

/// What a client command needs.
struct Ctx {
    client: Client,
    out: Printer,
}

impl Ctx {
    /// A client of `--url` that sends `correlation_id` (if any) on every request.
    fn new(cli: &Cli, correlation_id: Option<&str>) -> anyhow::Result<Self> {
        Ok(Self { client: info::client(cli, correlation_id)?, out: Printer { compact: cli.compact } })
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    refuse_client_flags(&cli, &matches).unwrap_or_else(|e| e.exit());
    // `gameday` plays against --url only when one was given; otherwise it starts its own server.
    let url_given = matches!(matches.value_source("url"), Some(ValueSource::CommandLine | ValueSource::EnvVariable));
    match run(&cli, url_given).await {
        Ok(()) => ExitCode::from(failure::OK),
        Err(e) if failure::is_broken_pipe(&e) => ExitCode::from(failure::OK),
        Err(e) => {
            eprintln!("{}", failure::report(&e, &cli.url));
            ExitCode::from(failure::exit_code(&e))
        }
    }
}

/// Refuses the client flags on the command line of a command that talks to no server
/// (`serve`, `keys`, `rules`), where they would be ignored: `gapguard serve --api-key K` does
/// not give the server a key. Set in the environment (`GAPGUARD_API_KEY`…) they are left
/// alone, as a shell's settings.
fn refuse_client_flags(cli: &Cli, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
    let local = match &cli.command {
        Command::Serve(_) => "serve",
        Command::Keys(_) => "keys",
        Command::Rules(_) => "rules",
        _ => return Ok(()),
    };
    for (id, flag) in [("url", "--url"), ("api_key", "--api-key"), ("ca_file", "--ca-file")] {
        if matches.value_source(id) == Some(ValueSource::CommandLine) {
            let mut message =
                format!("{flag} is an option of the client commands; `gapguard {local}` talks to no server");
            if local == "serve" {
                message.push_str(match flag {
                    "--api-key" => ": the server's API keys are [[api_key]] entries of its --config file",
                    "--ca-file" => ": the server's certificate is [tls] in its --config file",
                    _ => ": the address it listens on is --listen",
                });
            }
            return Err(Cli::command().error(clap::error::ErrorKind::ArgumentConflict, message));
        }
    }
    Ok(())
}

async fn run(cli: &Cli, url_given: bool) -> anyhow::Result<()> {
    match &cli.command {
        Command::Serve(args) => serve::run(args).await,
        Command::Kv(command) => {
            let correlation_id = match command {
                KvCommand::Get { request, .. } | KvCommand::List { request, .. } => request.correlation_id.as_deref(),
                KvCommand::Put { request, .. } | KvCommand::Delete { request, .. } => request.correlation_id.as_deref(),
            };
            kv::run(&Ctx::new(cli, correlation_id)?, command).await
        }
        Command::Check(args) => guard::check(&Ctx::new(cli, args.request.correlation_id.as_deref())?, args).await,
        Command::Act(args) => guard::act(&Ctx::new(cli, args.request.correlation_id.as_deref())?, args).await,
        Command::Txn(args) => guard::txn(&Ctx::new(cli, args.request.correlation_id.as_deref())?, args).await,
        Command::Lease(command) => lease::run(&Ctx::new(cli, command.correlation_id())?, command).await,
        Command::Pool(command) => pool::pool(&Ctx::new(cli, command.correlation_id())?, command).await,
        Command::Reserve(args) => pool::reserve(&Ctx::new(cli, args.request.correlation_id.as_deref())?, args).await,
        Command::Reservation(command) => pool::reservation(&Ctx::new(cli, command.correlation_id())?, command).await,
        Command::Grant(command) => grant::grant(&Ctx::new(cli, command.correlation_id())?, command).await,
        Command::Orphans(command) => grant::orphans(&Ctx::new(cli, command.correlation_id())?, command).await,
        Command::Watch(args) => watch::run(&Ctx::new(cli, args.request.correlation_id.as_deref())?, args).await,
        Command::Audit(AuditCommand::Tail(args)) => audit::tail(&Ctx::new(cli, None)?, args).await,
        Command::Audit(AuditCommand::Verify(args)) => {
            audit::verify(&Ctx::new(cli, args.correlation_id.as_deref())?).await
        }
        Command::Health(args) => {
            info::health(&Ctx::new(cli, args.request.correlation_id.as_deref())?, args.ready).await
        }
        Command::Openapi(args) => info::openapi(&Ctx::new(cli, args.correlation_id.as_deref())?).await,
        Command::Keys(KeysCommand::New(args)) => keys::new(args),
        Command::Rules(args) => rules::run(args),
        Command::Gameday(args) => {
            gameday::run(args, url_given.then_some(cli.url.as_str()), cli.api_key.as_deref()).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::error::ErrorKind;
    use clap::CommandFactory;
    use gapguard_api::{AddOp, CompareCondition, CompareOp};
    use std::path::Path;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("gapguard").chain(args.iter().copied()))
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn serve_takes_optional_data_listen_and_config() {
        let cli = parse(&["serve", "--data", "/tmp/d", "--listen", "127.0.0.1:0", "--config", "g.toml"]).unwrap();
        let Command::Serve(args) = cli.command else { panic!("not serve") };
        assert_eq!(args.data, Some(PathBuf::from("/tmp/d")));
        assert_eq!(args.listen, Some("127.0.0.1:0".parse().unwrap()));
        assert_eq!(args.config, Some(PathBuf::from("g.toml")));
        let Command::Serve(args) = parse(&["serve"]).unwrap().command else { panic!("not serve") };
        assert!(args.data.is_none() && args.listen.is_none() && args.config.is_none());
        assert_eq!(parse(&["serve", "--listen", "nowhere"]).unwrap_err().kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn the_client_flags_are_refused_on_the_command_line_of_a_local_command() {
        let check = |args: &[&str]| {
            let matches =
                Cli::command().try_get_matches_from(std::iter::once("gapguard").chain(args.iter().copied()))?;
            refuse_client_flags(&Cli::from_arg_matches(&matches)?, &matches)
        };
        let refused = check(&["serve", "--api-key", "k"]).unwrap_err();
        assert_eq!(refused.kind(), ErrorKind::ArgumentConflict);
        assert!(refused.to_string().contains("[[api_key]]"), "{refused}");
        assert_eq!(check(&["--url", "http://h:1", "serve"]).unwrap_err().kind(), ErrorKind::ArgumentConflict);
        assert!(check(&["rules", "--config", "g.toml", "--ca-file", "ca.pem"]).is_err());
        // Where they belong, and a local command without them, are fine.
        check(&["--api-key", "k", "kv", "get", "ns", "a"]).unwrap();
        check(&["serve", "--listen", "127.0.0.1:0", "--compact"]).unwrap();
    }

    #[test]
    fn global_flags_go_before_or_after_the_subcommand() {
        let cli = parse(&["--url", "http://h:1", "kv", "get", "ns", "a/b", "--compact"]).unwrap();
        assert_eq!(cli.url, "http://h:1");
        assert!(cli.compact);
        let Command::Kv(KvCommand::Get { ns, key, .. }) = cli.command else { panic!("not kv get") };
        assert_eq!((ns.as_str(), key.as_str()), ("ns", "a/b"));
    }

    #[test]
    fn api_key_and_ca_file_are_global_flags() {
        let cli = parse(&["kv", "get", "ns", "k", "--api-key", "s3cret", "--ca-file", "/etc/ca.pem"]).unwrap();
        assert_eq!((cli.api_key.as_deref(), cli.ca_file.as_deref()), (Some("s3cret"), Some(Path::new("/etc/ca.pem"))));
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("GAPGUARD_API_KEY") && help.contains("GAPGUARD_CA_FILE"), "{help}");
    }

    #[test]
    fn keys_new_takes_id_namespaces_and_role() {
        let cli =
            parse(&["keys", "new", "--id", "checkout-svc", "--namespaces", "shop,cart", "--role", "write"]).unwrap();
        let Command::Keys(KeysCommand::New(args)) = cli.command else { panic!("not keys new") };
        assert_eq!(
            (args.id.as_str(), args.namespaces.clone()),
            ("checkout-svc", vec!["shop".to_owned(), "cart".into()])
        );
        assert_eq!(args.role, keys::Role::Write);
        let err = parse(&["keys", "new", "--id", "x", "--namespaces", "a", "--role", "root"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidValue);
        let err = parse(&["keys", "new", "--id", "x", "--role", "read"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn kv_put_takes_raw_value_text_and_write_headers() {
        let cli = parse(&[
            "kv",
            "put",
            "ns",
            "k",
            "hello world",
            "--string",
            "--idempotency-key",
            "i1",
            "--correlation-id",
            "c1",
        ])
        .unwrap();
        let Command::Kv(KvCommand::Put { value, string, request, .. }) = cli.command else { panic!("not kv put") };
        assert_eq!(value, "hello world");
        assert!(string);
        assert_eq!(request.idempotency_key.as_deref(), Some("i1"));
        assert_eq!(request.correlation_id.as_deref(), Some("c1"));
        // A negative number is a value, not a flag.
        let cli = parse(&["kv", "put", "ns", "k", "-1"]).unwrap();
        let Command::Kv(KvCommand::Put { value, .. }) = cli.command else { panic!("not kv put") };
        assert_eq!(value, "-1");
    }

    #[test]
    fn kv_list_defaults_to_every_key() {
        let Command::Kv(KvCommand::List { prefix, limit, .. }) = parse(&["kv", "list", "ns"]).unwrap().command else {
            panic!("not kv list")
        };
        assert_eq!((prefix.as_str(), limit), ("", None));
        let cli = parse(&["kv", "list", "ns", "--prefix", "orders/", "--limit", "5", "--after", "orders/7"]).unwrap();
        let Command::Kv(KvCommand::List { prefix, limit, after, .. }) = cli.command else { panic!("not kv list") };
        assert_eq!((prefix.as_str(), limit, after.as_deref()), ("orders/", Some(5), Some("orders/7")));
    }

    #[test]
    fn check_parses_repeated_conditions_as_json() {
        let cli = parse(&[
            "check",
            "shop",
            "--if",
            r#"{"exists": "orders/42"}"#,
            "--if",
            r#"{"compare": {"key": "stock/a", "op": ">=", "value": 1}}"#,
            "--ttl-ms",
            "500",
            "--flow",
            "checkout",
            "--ticket-only",
        ])
        .unwrap();
        let Command::Check(args) = cli.command else { panic!("not check") };
        assert_eq!(
            args.conditions,
            [
                Condition::Exists("orders/42".into()),
                Condition::Compare(CompareCondition { key: "stock/a".into(), op: CompareOp::Ge, value: 1.into() }),
            ]
        );
        assert_eq!((args.ttl_ms, args.flow.as_deref(), args.ticket_only), (Some(500), Some("checkout"), true));
    }

    #[test]
    fn a_malformed_condition_is_a_usage_error_that_says_why() {
        let err = parse(&["check", "shop", "--if", r#"{"exits": "k"}"#]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert!(err.to_string().contains("unknown variant `exits`"), "{err}");
        assert_eq!(err.exit_code(), 2);
        assert_eq!(parse(&["check", "shop"]).unwrap_err().kind(), ErrorKind::MissingRequiredArgument);
        // A check writes nothing: an idempotency key would promise what it cannot keep.
        let keyed = parse(&["check", "shop", "--if", r#"{"exists": "k"}"#, "--idempotency-key", "x"]);
        assert_eq!(keyed.unwrap_err().kind(), ErrorKind::UnknownArgument);
    }

    #[test]
    fn act_needs_an_op_and_takes_ticket_and_conditions() {
        let cli = parse(&[
            "act",
            "shop",
            "--ticket",
            "T1",
            "--if",
            r#"{"absent": "orders/42"}"#,
            "--op",
            r#"{"add": {"key": "stock/a", "by": -1}}"#,
            "--idempotency-key",
            "order-42",
        ])
        .unwrap();
        let Command::Act(args) = cli.command else { panic!("not act") };
        assert_eq!(args.ticket.as_deref(), Some("T1"));
        assert_eq!(args.conditions, [Condition::Absent("orders/42".into())]);
        assert_eq!(args.ops, [Op::Add(AddOp { key: "stock/a".into(), by: (-1).into() })]);
        assert_eq!(args.request.idempotency_key.as_deref(), Some("order-42"));
        assert_eq!(parse(&["act", "shop", "--ticket", "T"]).unwrap_err().kind(), ErrorKind::MissingRequiredArgument);
        assert_eq!(parse(&["act", "shop", "--op", r#"{"add": {}}"#]).unwrap_err().kind(), ErrorKind::ValueValidation);
    }

    #[test]
    fn txn_takes_if_then_else() {
        let cli = parse(&[
            "txn",
            "ns",
            "--if",
            r#"{"version": {"key": "k", "is": 0}}"#,
            "--then",
            r#"{"put": {"key": "k", "value": 1}}"#,
            "--else",
            r#"{"delete": {"key": "k"}}"#,
            "--else",
            r#"{"put": {"key": "j", "value": null}}"#,
        ])
        .unwrap();
        let Command::Txn(args) = cli.command else { panic!("not txn") };
        assert_eq!((args.conditions.len(), args.then_ops.len(), args.else_ops.len()), (1, 1, 2));
    }

    #[test]
    fn audit_tail_takes_count_follow_and_filters() {
        let cli = parse(&["audit", "tail", "ns", "-n", "5", "-f", "--correlation-id", "c", "--key", "k"]).unwrap();
        let Command::Audit(AuditCommand::Tail(args)) = cli.command else { panic!("not audit tail") };
        assert_eq!((args.lines, args.follow), (5, true));
        assert_eq!((args.correlation_id.as_deref(), args.key.as_deref()), (Some("c"), Some("k")));
        let Command::Audit(AuditCommand::Tail(args)) = parse(&["audit", "tail", "ns"]).unwrap().command else {
            panic!("not audit tail")
        };
        assert_eq!((args.lines, args.follow), (20, false));
        assert!(matches!(parse(&["audit", "verify"]).unwrap().command, Command::Audit(AuditCommand::Verify(_))));
    }

    #[test]
    fn lease_commands_take_name_holder_ttl_and_token() {
        let cli =
            parse(&["lease", "acquire", "ops", "migrator", "--holder", "host-1", "--ttl-ms", "5000", "--token-only"])
                .unwrap();
        let Command::Lease(LeaseCommand::Acquire { ns, name, holder, ttl_ms, token_only, .. }) = cli.command else {
            panic!("not lease acquire")
        };
        assert_eq!(
            (ns.as_str(), name.as_str(), holder.as_str(), ttl_ms, token_only),
            ("ops", "migrator", "host-1", 5000, true)
        );
        let err = parse(&["lease", "acquire", "ops", "m", "--ttl-ms", "5"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::MissingRequiredArgument);
        let cli = parse(&["lease", "renew", "ops", "m", "--token", "7", "--idempotency-key", "r1"]).unwrap();
        let Command::Lease(LeaseCommand::Renew { token, ttl_ms, request, .. }) = cli.command else {
            panic!("not renew")
        };
        assert_eq!((token, ttl_ms, request.idempotency_key.as_deref()), (7, None, Some("r1")));
        let cli = parse(&["lease", "release", "ops", "m", "--token", "7"]).unwrap();
        assert!(matches!(cli.command, Command::Lease(LeaseCommand::Release { token: 7, .. })));
        let cli = parse(&["lease", "get", "ops", "m", "--correlation-id", "c"]).unwrap();
        let Command::Lease(command) = cli.command else { panic!("not lease") };
        assert_eq!(command.correlation_id(), Some("c"));
        assert_eq!(parse(&["lease", "renew", "ops", "m"]).unwrap_err().kind(), ErrorKind::MissingRequiredArgument);
    }

    #[test]
    fn pool_reserve_and_reservation_commands() {
        let cli = parse(&["pool", "set", "cloud", "vm-quota", "--capacity", "100"]).unwrap();
        assert!(matches!(cli.command, Command::Pool(PoolCommand::Set { capacity: 100, .. })));
        assert!(matches!(
            parse(&["pool", "get", "cloud", "vm-quota"]).unwrap().command,
            Command::Pool(PoolCommand::Get { .. })
        ));
        let cli = parse(&[
            "reserve",
            "cloud",
            "vm-quota",
            "--amount",
            "4",
            "--ttl-ms",
            "60000",
            "--context",
            r#"{"vm": "v-1"}"#,
            "--id-only",
        ])
        .unwrap();
        let Command::Reserve(args) = cli.command else { panic!("not reserve") };
        assert_eq!((args.pool.as_str(), args.amount, args.ttl_ms, args.id_only), ("vm-quota", 4, 60000, true));
        assert_eq!(args.context, Some(serde_json::json!({"vm": "v-1"})));
        let err = parse(&["reserve", "cloud", "p", "--amount", "1", "--ttl-ms", "1", "--context", "{vm"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ValueValidation);
        assert_eq!(
            parse(&["reserve", "cloud", "p", "--amount", "1"]).unwrap_err().kind(),
            ErrorKind::MissingRequiredArgument
        );
        for (verb, check) in [
            (
                "get",
                (|c: &ReservationCommand| matches!(c, ReservationCommand::Get { .. }))
                    as fn(&ReservationCommand) -> bool,
            ),
            ("commit", |c| matches!(c, ReservationCommand::Commit { .. })),
            ("release", |c| matches!(c, ReservationCommand::Release { .. })),
        ] {
            let Command::Reservation(command) = parse(&["reservation", verb, "cloud", "rsv_1"]).unwrap().command else {
                panic!("not reservation {verb}")
            };
            assert!(check(&command), "{verb}: {command:?}");
        }
    }

    #[test]
    fn grant_commands_take_the_tuple_as_positionals_and_list_takes_filters() {
        let cli = parse(&["grant", "add", "docs", "user:alice", "read", "doc:9"]).unwrap();
        let Command::Grant(GrantCommand::Add { ns, tuple, .. }) = cli.command else { panic!("not grant add") };
        assert_eq!(
            (ns.as_str(), tuple.subject.as_str(), tuple.action.as_str(), tuple.resource.as_str()),
            ("docs", "user:alice", "read", "doc:9")
        );
        assert!(matches!(
            parse(&["grant", "revoke", "docs", "u", "a", "r"]).unwrap().command,
            Command::Grant(GrantCommand::Revoke { .. })
        ));
        assert_eq!(parse(&["grant", "add", "docs", "u", "a"]).unwrap_err().kind(), ErrorKind::MissingRequiredArgument);
        let cli = parse(&["grant", "list", "docs", "--subject", "user:alice"]).unwrap();
        let Command::Grant(GrantCommand::List { subject, resource, .. }) = cli.command else {
            panic!("not grant list")
        };
        assert_eq!((subject.as_deref(), resource), (Some("user:alice"), None));
    }

    #[test]
    fn orphans_commands() {
        let cli = parse(&["orphans", "list", "cloud", "--all"]).unwrap();
        assert!(matches!(cli.command, Command::Orphans(OrphansCommand::List { all: true, .. })));
        let cli = parse(&["orphans", "resolve", "cloud", "orp_1", "--note", "deleted the VM"]).unwrap();
        let Command::Orphans(OrphansCommand::Resolve { id, note, .. }) = cli.command else { panic!("not resolve") };
        assert_eq!((id.as_str(), note.as_deref()), ("orp_1", Some("deleted the VM")));
    }

    #[test]
    fn watch_takes_prefix_revision_and_known_types() {
        let cli = parse(&[
            "watch",
            "shop",
            "--prefix",
            "orders/",
            "--from-revision",
            "12",
            "--types",
            "kv,lease",
            "--types",
            "grant",
        ])
        .unwrap();
        let Command::Watch(args) = cli.command else { panic!("not watch") };
        assert_eq!((args.prefix.as_deref(), args.from_revision), (Some("orders/"), Some(12)));
        assert_eq!(args.types, ["kv", "lease", "grant"]);
        let Command::Watch(args) = parse(&["watch", "shop"]).unwrap().command else { panic!("not watch") };
        assert!(args.prefix.is_none() && args.from_revision.is_none() && args.types.is_empty());
        assert_eq!(parse(&["watch", "shop", "--types", "kv,keys"]).unwrap_err().kind(), ErrorKind::InvalidValue);
    }

    #[test]
    fn the_long_help_documents_the_exit_codes() {
        let help = Cli::command().render_long_help().to_string();
        assert!(help.contains("Exit codes:") && help.contains("4  refused"), "{help}");
    }
}
