//! The PostgreSQL backend: any number of gapguard nodes over one database.
//!
//! Tables (schema version [`SCHEMA_VERSION`], applied by [`PgStore::connect`] under an advisory
//! lock, refused when the database's schema is newer than this build):
//!
//! | table | what |
//! |---|---|
//! | `gg_schema` | the schema version |
//! | `gg_meta` | one row: the revision counter, the audit chain's head, the ticket key |
//! | `gg_entries` | every key's entry (JSON), with its deadline and when it may be forgotten |
//! | `gg_changes` | the change log, in commit order: how nodes keep their replicas current |
//! | `gg_audit` | the audit chain |
//! | `gg_used_tickets`, `gg_idempotency`, `gg_idem_claims` | single-use tickets, stored first responses, keys in flight |
//!
//! A node's writer runs each batch as one transaction ([`SharedStorage::begin`], core, then
//! [`Storage::commit`]): it locks the `gg_meta` row first — the revision counter and the one
//! audit chain make every write transaction pass through it — then the batch's keys in key
//! order with `SELECT … FOR UPDATE`, so two transactions never wait for each other's keys in
//! opposite orders. Time comes from the database's clock. Keys and namespaces are stored as
//! `bytea` so that their order is the bytes' order whatever the database's collation.
//!
//! The store drives its connections on a small Tokio runtime of its own, so that its
//! synchronous [`Storage`] methods can be called from any thread (the engine's writer thread,
//! a blocking task); each call hands its work to that runtime and waits for the answer.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use gapguard_core::primitives::{deadline_of, retention_of};
use gapguard_core::{Entry, IdempotencyRecord, Limits, NsKey, SealedEvent, TicketId};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{AsyncMessage, Client, NoTls, Row, Statement};

use crate::{Batch, Changes, IdempotencyKey, LockRequest, Locked, Recovered, SharedStorage, Storage, StoreError};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: i32 = 1;

/// How many changes the change log keeps by default: a node that fell further behind reloads
/// everything.
pub const CHANGES_KEPT: i64 = 100_000;

/// The channel nodes are notified on after a commit that changed something.
const CHANNEL: &str = "gapguard_changes";

/// Options of the PostgreSQL backend.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// A schema to keep the tables in (created if missing); `None`: the connection's default
    /// `search_path` (normally `public`).
    pub schema: Option<String>,
    /// The limits in force: how long tombstones and resolved primitives are kept.
    pub limits: Limits,
    /// How many of the newest changes the change log keeps ([`CHANGES_KEPT`]).
    pub changes_kept: i64,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self { schema: None, limits: Limits::default(), changes_kept: CHANGES_KEPT }
    }
}

/// The migrations, in order; entry `i` takes the schema from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE gg_meta (
    id int PRIMARY KEY CHECK (id = 1),
    revision bigint NOT NULL,
    audit_seq bigint NOT NULL,
    audit_head bytea,
    ticket_key bytea,
    changes_pruned_to bigint NOT NULL DEFAULT 0
);
CREATE TABLE gg_entries (
    ns bytea NOT NULL,
    key bytea NOT NULL,
    entry bytea NOT NULL,
    deadline_ms bigint,
    forget_at_ms bigint,
    PRIMARY KEY (ns, key)
);
CREATE INDEX gg_entries_deadline ON gg_entries (deadline_ms) WHERE deadline_ms IS NOT NULL;
CREATE INDEX gg_entries_forget ON gg_entries (forget_at_ms) WHERE forget_at_ms IS NOT NULL;
CREATE TABLE gg_changes (
    seq bigserial PRIMARY KEY,
    revision bigint NOT NULL,
    ns bytea NOT NULL,
    key bytea NOT NULL,
    entry bytea
);
CREATE TABLE gg_audit (
    seq bigint PRIMARY KEY,
    body bytea NOT NULL,
    hash bytea NOT NULL
);
CREATE TABLE gg_used_tickets (
    id bytea PRIMARY KEY,
    expires_ms bigint NOT NULL
);
CREATE INDEX gg_used_tickets_expiry ON gg_used_tickets (expires_ms);
CREATE TABLE gg_idempotency (
    ns bytea NOT NULL,
    scope bytea NOT NULL,
    key bytea NOT NULL,
    record bytea NOT NULL,
    expires_ms bigint NOT NULL,
    PRIMARY KEY (ns, scope, key)
);
CREATE INDEX gg_idempotency_expiry ON gg_idempotency (expires_ms);
CREATE TABLE gg_idem_claims (
    ns bytea NOT NULL,
    scope bytea NOT NULL,
    key bytea NOT NULL,
    until_ms bigint NOT NULL,
    PRIMARY KEY (ns, scope, key)
);
"#];

/// The database's clock in ms since the Unix epoch, as SQL.
macro_rules! now_ms {
    () => {
        "(extract(epoch from clock_timestamp()) * 1000)::bigint"
    };
}
const NOW_MS: &str = now_ms!();

const META: &str = concat!("SELECT revision, audit_seq, audit_head, ", now_ms!(), " FROM gg_meta WHERE id = 1");
const META_FOR_UPDATE: &str =
    concat!("SELECT revision, audit_seq, audit_head, ", now_ms!(), " FROM gg_meta WHERE id = 1 FOR UPDATE");
const KEYS: &str = "SELECT e.ns, e.key, e.entry FROM gg_entries e \
     JOIN unnest($1::bytea[], $2::bytea[]) AS k(ns, key) ON e.ns = k.ns AND e.key = k.key ORDER BY e.ns, e.key";
const KEYS_FOR_UPDATE: &str = "SELECT e.ns, e.key, e.entry FROM gg_entries e \
     JOIN unnest($1::bytea[], $2::bytea[]) AS k(ns, key) ON e.ns = k.ns AND e.key = k.key ORDER BY e.ns, e.key \
     FOR UPDATE OF e";
const USED_TICKETS: &str = "SELECT id, expires_ms FROM gg_used_tickets WHERE id = ANY($1::bytea[])";
const IDEMPOTENCY_FOR_UPDATE: &str = "SELECT i.ns, i.scope, i.key, i.record FROM gg_idempotency i \
     JOIN unnest($1::bytea[], $2::bytea[], $3::bytea[]) AS k(ns, scope, key) \
     ON i.ns = k.ns AND i.scope = k.scope AND i.key = k.key FOR UPDATE OF i";
const ENTRIES_UPSERT: &str = "INSERT INTO gg_entries (ns, key, entry, deadline_ms, forget_at_ms) \
                     SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::int8[], $5::int8[]) \
                     ON CONFLICT (ns, key) DO UPDATE SET entry = excluded.entry, \
                     deadline_ms = excluded.deadline_ms, forget_at_ms = excluded.forget_at_ms";
/// Appends to the change log and answers the first and last `seq` taken (0, 0 for none).
const CHANGES_INSERT: &str = "WITH ins AS (INSERT INTO gg_changes (revision, ns, key, entry) \
     SELECT * FROM unnest($1::int8[], $2::bytea[], $3::bytea[], $4::bytea[]) RETURNING seq) \
     SELECT coalesce(min(seq), 0), coalesce(max(seq), 0) FROM ins";
const AUDIT_INSERT: &str =
    "INSERT INTO gg_audit (seq, body, hash) SELECT * FROM unnest($1::int8[], $2::bytea[], $3::bytea[])";
const TICKETS_INSERT: &str =
    "INSERT INTO gg_used_tickets (id, expires_ms) SELECT * FROM unnest($1::bytea[], $2::int8[])";
const IDEMPOTENCY_UPSERT: &str = "INSERT INTO gg_idempotency (ns, scope, key, record, expires_ms) \
                     SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::bytea[], $5::int8[]) \
                     ON CONFLICT (ns, scope, key) DO UPDATE SET record = excluded.record, expires_ms = excluded.expires_ms";
const IDEMPOTENCY_DELETE: &str =
    "DELETE FROM gg_idempotency i USING unnest($1::bytea[], $2::bytea[], $3::bytea[]) AS k(ns, scope, key) \
                     WHERE i.ns = k.ns AND i.scope = k.scope AND i.key = k.key";
const TICKETS_DELETE: &str = "DELETE FROM gg_used_tickets WHERE id = ANY($1::bytea[])";
const CLAIMS_DELETE: &str =
    "DELETE FROM gg_idem_claims c USING unnest($1::bytea[], $2::bytea[], $3::bytea[]) AS k(ns, scope, key) \
                     WHERE c.ns = k.ns AND c.scope = k.scope AND c.key = k.key";
const META_UPDATE: &str = "UPDATE gg_meta SET revision = $1, audit_seq = $2, audit_head = $3, \
                     ticket_key = coalesce(ticket_key, $4) WHERE id = 1";
const NOTIFY: &str = "SELECT pg_notify($1, '')";
/// Every statement `write_batch` pipelines, prepared before it sends any of them: a statement
/// prepared on the way would be sent after the `COMMIT` queued behind it.
const WRITE_STATEMENTS: [&str; 10] = [
    ENTRIES_UPSERT,
    CHANGES_INSERT,
    AUDIT_INSERT,
    TICKETS_INSERT,
    IDEMPOTENCY_UPSERT,
    IDEMPOTENCY_DELETE,
    TICKETS_DELETE,
    CLAIMS_DELETE,
    META_UPDATE,
    NOTIFY,
];

/// Held reservations and leases past their deadline; rows another node's transaction holds are
/// skipped (it is expiring them).
const DUE: &str = concat!(
    "SELECT ns, key, entry FROM gg_entries WHERE deadline_ms <= ",
    now_ms!(),
    " ORDER BY deadline_ms LIMIT $1 FOR UPDATE SKIP LOCKED"
);
/// The change log after a cursor, with the meta row, in one statement (one snapshot): every row
/// carries the meta columns; a row without a change (`seq` NULL) stands for "nothing new".
const CHANGES: &str = concat!(
    "SELECT m.revision, m.changes_pruned_to, ",
    now_ms!(),
    ", m.audit_seq, c.seq, c.revision, c.ns, c.key, c.entry \
     FROM gg_meta m LEFT JOIN gg_changes c ON c.seq > $1 WHERE m.id = 1 ORDER BY c.seq"
);

/// How long a session of a node may sit in an open transaction doing nothing before the
/// database ends it (`idle_in_transaction_session_timeout`): a batch's transaction is busy for
/// milliseconds, and a node frozen inside one would stall every node's writes and reads.
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "10s";

/// The `options` of the writer's connection (`writer`: the idle-in-transaction timeout first,
/// so that an `options` in the URL may set it otherwise) and of the others: the URL's, and the
/// schema's `search_path`. `None`: nothing to send (a pooler that refuses the startup
/// parameter still takes the readers).
fn session_options(given: Option<&str>, schema: Option<&str>, writer: bool) -> Result<Option<String>, StoreError> {
    let mut parts = Vec::new();
    if writer {
        parts.push(format!("-c idle_in_transaction_session_timeout={IDLE_IN_TRANSACTION_TIMEOUT}"));
    }
    if let Some(given) = given.filter(|g| !g.trim().is_empty()) {
        parts.push(given.to_owned());
    }
    if let Some(schema) = schema {
        let valid = !schema.is_empty() && schema.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            return Err(StoreError::Schema(format!("invalid schema name {schema:?}: use letters, digits and _")));
        }
        parts.push(format!("-c search_path={schema}"));
    }
    Ok((!parts.is_empty()).then(|| parts.join(" ")))
}

/// Deletes this node's claim of a key: the row only while it is still the claim this node
/// took (its `until_ms`), so a late release never frees another node's claim taken since.
const RELEASE_CLAIM: &str = "DELETE FROM gg_idem_claims WHERE ns = $1 AND scope = $2 AND key = $3 AND until_ms = $4";

/// Open claims a node remembers before it forgets those long lapsed.
const CLAIMS_KEPT_MAX: usize = 4096;

/// Records this node's claim of `key` until `until` (ms, the database's clock). Past
/// [`CLAIMS_KEPT_MAX`] claims, those lapsed more than a claim's lifetime ago (`ttl_ms`) are
/// forgotten first: claims this node never heard the end of, none in a sound run.
fn remember_claim(claims: &mut HashMap<IdempotencyKey, i64>, key: &IdempotencyKey, until: i64, ttl_ms: u64) {
    if claims.len() >= CLAIMS_KEPT_MAX {
        claims.retain(|_, kept| *kept > until - 2 * i64_of(ttl_ms));
    }
    claims.insert(key.clone(), until);
}

/// How long a failed release of an idempotency claim is retried: about as long as a claim
/// lives, after which it has expired by itself anyway.
const CLAIM_RELEASE_FOR: Duration = Duration::from_secs(30);

/// Retries the failed releases a second apart, on one connection at a time (an outage with
/// many keyed writes in flight must not become a storm of connections when the database comes
/// back), until each is done or given up; then the task ends.
async fn retry_releases(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = std::time::Instant::now();
        let pending: Vec<_> = {
            let mut releases = shared.releases.lock().expect("releases");
            releases.pending.retain(|(_, _, give_up)| *give_up > now);
            if releases.pending.is_empty() {
                releases.running = false;
                return;
            }
            releases.pending.clone()
        };
        let Ok(client) = connect(&shared.config).await else { continue };
        for (key, until, _) in pending {
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
                [&key.ns.as_bytes(), &key.scope.as_bytes(), &key.key.as_bytes(), &until];
            if client.execute(RELEASE_CLAIM, &params).await.is_err() {
                break;
            }
            tracing::info!("released an idempotency claim once the database answered again");
            shared.releases.lock().expect("releases").pending.retain(|(k, u, _)| !(k == &key && *u == until));
        }
    }
}

/// A connection with its prepared statements: each statement is parsed once per connection,
/// then only bound and executed (a query by text would cost a parse round trip every time).
struct Db {
    client: Client,
    statements: Mutex<HashMap<String, Statement>>,
}

impl Db {
    async fn connect(config: &tokio_postgres::Config) -> Result<Self, StoreError> {
        Ok(Self { client: connect(config).await?, statements: Mutex::new(HashMap::new()) })
    }

    fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    async fn statement(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        if let Some(statement) = self.statements.lock().expect("statement cache").get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql).await?;
        self.statements.lock().expect("statement cache").insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    async fn query(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.query(&statement, params).await
    }

    async fn query_one(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.query_one(&statement, params).await
    }

    async fn execute(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64, tokio_postgres::Error> {
        let statement = self.statement(sql).await?;
        self.client.execute(&statement, params).await
    }

    async fn batch_execute(&self, sql: &str) -> Result<(), tokio_postgres::Error> {
        self.client.batch_execute(sql).await
    }
}

/// What a batch's transaction read from `gg_meta` under lock.
#[derive(Clone, Copy)]
struct TxnMeta {
    revision: u64,
    audit_head: Option<(u64, [u8; 32])>,
    now_ms: u64,
}

/// The writer's connection, and the batch transaction open on it, if one is.
struct WriterConn {
    db: Db,
    txn: Option<TxnMeta>,
}

impl WriterConn {
    /// Connects and prepares the statements `begin` pipelines, so that their executions go
    /// out in the order they are written (the counter row's lock before the keys').
    async fn connect(config: &tokio_postgres::Config) -> Result<Self, StoreError> {
        let db = Db::connect(config).await?;
        for sql in [META_FOR_UPDATE, KEYS_FOR_UPDATE, USED_TICKETS, IDEMPOTENCY_FOR_UPDATE, DUE] {
            db.statement(sql).await.map_err(db_error)?;
        }
        Ok(Self { db, txn: None })
    }
}

struct Shared {
    config: tokio_postgres::Config,
    /// `config` with the writer's session settings (see [`session_options`]).
    writer_config: tokio_postgres::Config,
    limits: Limits,
    changes_kept: i64,
    writer: tokio::sync::Mutex<Option<WriterConn>>,
    reader: tokio::sync::Mutex<Option<Db>>,
    /// The change-log `seq` range of the last successful commit (see `last_changes`).
    last_changes: Mutex<Option<(u64, u64)>>,
    /// This node's idempotency claims still open, with their `until_ms`: a claim released
    /// late (after an outage) is deleted only if it is still this one, never another node's
    /// claim of the same key taken since it lapsed.
    claims: Mutex<HashMap<IdempotencyKey, i64>>,
    /// Releases that failed, retried by one background task (see [`PgStore::release_claim`]).
    releases: Mutex<Releases>,
}

/// Claims whose release failed (key, `until_ms`, when to give up), and whether the task that
/// retries them is running.
#[derive(Default)]
struct Releases {
    pending: Vec<(IdempotencyKey, i64, std::time::Instant)>,
    running: bool,
}

/// A [`Storage`] (and [`SharedStorage`]) over PostgreSQL.
pub struct PgStore {
    shared: Arc<Shared>,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
    handle: tokio::runtime::Handle,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.lock().expect("runtime lock").take() {
            rt.shutdown_background();
        }
    }
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Maps a database error: lost races are [`StoreError::Conflict`], a lost connection
/// [`StoreError::Unavailable`], anything else an engine error.
fn db_error(e: tokio_postgres::Error) -> StoreError {
    let text = describe(&e);
    match e.code() {
        Some(code) if *code == SqlState::T_R_SERIALIZATION_FAILURE || *code == SqlState::T_R_DEADLOCK_DETECTED => {
            StoreError::Conflict(text)
        }
        Some(code)
            if code.code().starts_with("08")
                || code.code().starts_with("57P")
                || *code == SqlState::CANNOT_CONNECT_NOW
                || *code == SqlState::TOO_MANY_CONNECTIONS =>
        {
            StoreError::Unavailable(text)
        }
        Some(_) => StoreError::Engine(text),
        None => StoreError::Unavailable(text),
    }
}

/// The whole of a database error for a person: the server's message (`db error` alone says
/// nothing), or the chain of causes of a connection failure.
fn describe(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("postgres: {} ({})", db.message(), db.code().code());
    }
    let mut text = format!("postgres: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

fn corrupt(what: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { what, detail: e.to_string() }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn entry_of(bytes: &[u8]) -> Result<Entry, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt("gg_entries.entry", e))
}

fn key_of(row: &Row, ns: usize, key: usize) -> Result<NsKey, StoreError> {
    let ns: Vec<u8> = row.get(ns);
    let key: Vec<u8> = row.get(key);
    Ok(NsKey {
        ns: String::from_utf8(ns).map_err(|e| corrupt("gg_entries.ns", e))?,
        key: String::from_utf8(key).map_err(|e| corrupt("gg_entries.key", e))?,
    })
}

fn hash_of(bytes: &[u8]) -> Result<[u8; 32], StoreError> {
    bytes.try_into().map_err(|_| corrupt("hash", "not 32 bytes"))
}

fn ticket_of(bytes: &[u8]) -> Result<TicketId, StoreError> {
    bytes.try_into().map_err(|_| corrupt("gg_used_tickets.id", "not 16 bytes"))
}

/// Splits keys into the two parallel `bytea[]` arrays the queries take.
fn key_arrays<'a>(keys: impl IntoIterator<Item = &'a NsKey>) -> (Vec<&'a [u8]>, Vec<&'a [u8]>) {
    keys.into_iter().map(|k| (k.ns.as_bytes(), k.key.as_bytes())).unzip()
}

fn idem_arrays<'a>(keys: impl IntoIterator<Item = &'a IdempotencyKey>) -> [Vec<&'a [u8]>; 3] {
    let mut out = [Vec::new(), Vec::new(), Vec::new()];
    for k in keys {
        out[0].push(k.ns.as_bytes());
        out[1].push(k.scope.as_bytes());
        out[2].push(k.key.as_bytes());
    }
    out
}

impl PgStore {
    /// Connects to `url` (`postgres://USER@HOST:PORT/DB`), applies the schema migrations this
    /// build knows (or refuses a newer schema). The first ticket key committed wins: nodes
    /// that start together on a new database each propose one, and all read back the same.
    pub fn connect(url: &str, options: PgOptions) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Schema(format!("invalid PostgreSQL URL {url:?}: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        // A node that stops mid-transaction (frozen, paused, cut off) holds the global write
        // lock, and every node's writes and fresh reads wait behind it: the database ends such
        // a session after this long, and the node reconnects when it wakes.
        let given = config.get_options().map(str::to_owned);
        let mut writer_config = config.clone();
        if let Some(session) = session_options(given.as_deref(), options.schema.as_deref(), false)? {
            config.options(session);
        }
        if let Some(session) = session_options(given.as_deref(), options.schema.as_deref(), true)? {
            writer_config.options(session);
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gapguard-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Engine(format!("cannot start the PostgreSQL runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let shared = Arc::new(Shared {
            config,
            writer_config,
            limits: options.limits,
            changes_kept: options.changes_kept,
            writer: tokio::sync::Mutex::new(None),
            reader: tokio::sync::Mutex::new(None),
            last_changes: Mutex::new(None),
            claims: Mutex::new(HashMap::new()),
            releases: Mutex::new(Releases::default()),
        });
        let store = Self { shared, runtime: Mutex::new(Some(runtime)), handle };
        let shared = store.shared.clone();
        let schema = options.schema.clone();
        store.block(async move { migrate(&shared, schema.as_deref()).await })?;
        Ok(store)
    }

    /// Runs `fut` on the store's runtime and waits for it, from any thread.
    fn block<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().expect("the PostgreSQL runtime answers every call")
    }

    /// Runs `f` with the reader connection (reconnecting if it was lost).
    fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c Db) -> std::pin::Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'c>>
            + Send
            + 'static,
    {
        let shared = self.shared.clone();
        self.block(async move {
            let mut guard = shared.reader.lock().await;
            if guard.as_ref().is_none_or(|c| c.is_closed()) {
                *guard = Some(Db::connect(&shared.config).await?);
            }
            let client = guard.as_ref().expect("connected");
            let result = f(client).await;
            if matches!(result, Err(StoreError::Unavailable(_))) {
                *guard = None;
            }
            result
        })
    }
}

async fn connect(config: &tokio_postgres::Config) -> Result<Client, StoreError> {
    let (client, connection) = config.connect(NoTls).await.map_err(|e| unavailable(describe(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "postgres connection closed");
        }
    });
    Ok(client)
}

async fn migrate(shared: &Shared, schema: Option<&str>) -> Result<(), StoreError> {
    let mut client = connect(&shared.config).await?;
    // `IF NOT EXISTS` of what exists is a NOTICE, logged by tokio-postgres at every start of
    // every node after the first: not news. This connection only migrates.
    client.batch_execute("SET client_min_messages = warning").await.map_err(db_error)?;
    if let Some(schema) = schema {
        client.batch_execute(&format!("CREATE SCHEMA IF NOT EXISTS {schema}")).await.map_err(db_error)?;
    }
    let tx = client.transaction().await.map_err(db_error)?;
    // One node migrates at a time; the others wait here, then find the work done.
    tx.execute("SELECT pg_advisory_xact_lock(7426617)", &[]).await.map_err(db_error)?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS gg_schema (version int NOT NULL)").await.map_err(db_error)?;
    let version: i32 =
        tx.query_opt("SELECT version FROM gg_schema", &[]).await.map_err(db_error)?.map_or(0, |row| row.get(0));
    let known = i32::try_from(MIGRATIONS.len()).expect("few migrations");
    if version > known {
        return Err(StoreError::Schema(format!(
            "the database's gapguard schema is version {version}, newer than this gapguard knows ({known}): \
             run a gapguard at least as new as the one that upgraded it"
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(version).unwrap_or(0)) {
        tracing::info!(from = i, to = i + 1, "applying gapguard schema migration");
        tx.batch_execute(sql).await.map_err(db_error)?;
    }
    if version == 0 {
        tx.execute("INSERT INTO gg_schema (version) VALUES ($1)", &[&known]).await.map_err(db_error)?;
        tx.execute(
            "INSERT INTO gg_meta (id, revision, audit_seq, audit_head, ticket_key) VALUES (1, 0, 0, NULL, NULL)",
            &[],
        )
        .await
        .map_err(db_error)?;
    } else if version < known {
        tx.execute("UPDATE gg_schema SET version = $1", &[&known]).await.map_err(db_error)?;
    }
    tx.commit().await.map_err(db_error)?;
    Ok(())
}

/// Reads the `gg_meta` row; `lock`: `FOR UPDATE`.
async fn read_meta(db: &Db, lock: bool) -> Result<TxnMeta, StoreError> {
    let row = db.query_one(if lock { META_FOR_UPDATE } else { META }, &[]).await.map_err(db_error)?;
    meta_of(&row)
}

fn meta_of(row: &Row) -> Result<TxnMeta, StoreError> {
    let seq: i64 = row.get(1);
    let head: Option<Vec<u8>> = row.get(2);
    let audit_head = match head {
        Some(h) if seq > 0 => Some((u64_of(seq), hash_of(&h)?)),
        _ => None,
    };
    Ok(TxnMeta { revision: u64_of(row.get(0)), audit_head, now_ms: u64_of(row.get(3)) })
}

fn entries_of(rows: &[Row]) -> Result<BTreeMap<NsKey, Entry>, StoreError> {
    rows.iter().map(|row| Ok((key_of(row, 0, 1)?, entry_of(row.get(2))?))).collect()
}

async fn select_keys(db: &Db, keys: &BTreeSet<NsKey>, lock: bool) -> Result<BTreeMap<NsKey, Entry>, StoreError> {
    if keys.is_empty() {
        return Ok(BTreeMap::new());
    }
    let (ns, key) = key_arrays(keys);
    let rows = db.query(if lock { KEYS_FOR_UPDATE } else { KEYS }, &[&ns, &key]).await.map_err(db_error)?;
    entries_of(&rows)
}

async fn begin(conn: &mut WriterConn, lock: &LockRequest) -> Result<Locked, StoreError> {
    if conn.txn.take().is_some() {
        conn.db.batch_execute("ROLLBACK").await.map_err(db_error)?;
    }
    let db = &conn.db;
    let (ns, key) = key_arrays(&lock.keys);
    let tickets: Vec<&[u8]> = lock.tickets.iter().map(|t| &t[..]).collect();
    let [ins, iscope, ikey] = idem_arrays(&lock.idempotency);
    let due_limit = i64::try_from(lock.due_limit).unwrap_or(i64::MAX);
    // One round trip: the statements are prepared (`WriterConn::connect`), so they go out in
    // this order and run in it — the counter row first: every write transaction takes it, so
    // the key locks after it never wait in an order another transaction could reverse.
    let nothing = || async { Ok::<_, tokio_postgres::Error>(Vec::new()) };
    let (begun, meta, entries, used, idem, due) = futures_util::join!(
        db.batch_execute("BEGIN"),
        db.query_one(META_FOR_UPDATE, &[]),
        async {
            if ns.is_empty() {
                nothing().await
            } else {
                db.query(KEYS_FOR_UPDATE, &[&ns, &key]).await
            }
        },
        async {
            if tickets.is_empty() {
                nothing().await
            } else {
                db.query(USED_TICKETS, &[&tickets]).await
            }
        },
        async {
            if ins.is_empty() {
                nothing().await
            } else {
                db.query(IDEMPOTENCY_FOR_UPDATE, &[&ins, &iscope, &ikey]).await
            }
        },
        async {
            if due_limit == 0 {
                nothing().await
            } else {
                db.query(DUE, &[&due_limit]).await
            }
        },
    );
    begun.map_err(db_error)?;
    let meta = meta_of(&meta.map_err(db_error)?)?;
    let entries = entries_of(&entries.map_err(db_error)?)?;
    let used_tickets = used
        .map_err(db_error)?
        .iter()
        .map(|row| Ok((ticket_of(row.get(0))?, u64_of(row.get(1)))))
        .collect::<Result<Vec<_>, StoreError>>()?;
    let idempotency = idem
        .map_err(db_error)?
        .iter()
        .map(|row| {
            let text = |i: usize| String::from_utf8(row.get::<_, Vec<u8>>(i)).map_err(|e| corrupt("gg_idempotency", e));
            let key = IdempotencyKey { ns: text(0)?, scope: text(1)?, key: text(2)? };
            let record: IdempotencyRecord =
                serde_json::from_slice(row.get(3)).map_err(|e| corrupt("gg_idempotency.record", e))?;
            Ok((key, record))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let due = entries_of(&due.map_err(db_error)?)?.into_iter().collect();
    conn.txn = Some(meta);
    Ok(Locked {
        revision: meta.revision,
        audit_head: meta.audit_head,
        now_ms: meta.now_ms,
        entries,
        used_tickets,
        idempotency,
        due,
    })
}

/// Writes a batch inside the open transaction and commits it. Answers the first and last
/// change-log `seq` it took, if it logged any change.
async fn write_batch(
    conn: &mut WriterConn,
    batch: &Batch,
    limits: &Limits,
    changes_kept: i64,
) -> Result<Option<(u64, u64)>, StoreError> {
    if conn.txn.is_none() {
        // A batch without `begin` (the conformance suite, the ticket key): its own transaction.
        conn.db.batch_execute("BEGIN").await.map_err(db_error)?;
        conn.txn = Some(read_meta(&conn.db, true).await?);
    }
    let meta = conn.txn.expect("a transaction is open");
    let now_ms = meta.now_ms;
    let db = &conn.db;
    // Continuity, checked under the counter row's lock: a batch that does not continue the
    // stored chain and revision is a bug, refused whole.
    let (stored_revision, stored_head) = (meta.revision, meta.audit_head);
    let stored_seq = stored_head.map_or(0, |h| h.0);
    if let Some(first) = batch.audit.first() {
        if first.seq != stored_seq + 1 {
            return Err(StoreError::Invalid(format!(
                "audit event {} does not follow the stored chain head {stored_seq}",
                first.seq
            )));
        }
    }
    // (A batch that only proposes the ticket key carries the revision its node recovered,
    // which other nodes may have passed since: it writes no revision, so it is not behind.)
    let only_key = batch.entries.is_empty() && batch.audit.is_empty();
    if batch.revision < stored_revision && !only_key {
        return Err(StoreError::Invalid(format!(
            "batch revision {} is behind the stored revision {stored_revision}",
            batch.revision
        )));
    }
    let revision = i64_of(batch.revision.max(stored_revision));

    // Compaction and pruning come first: a batch may write a key it also forgets.
    let mut forgotten: Vec<NsKey> = batch.forget_entries.clone();
    if !forgotten.is_empty() {
        let (ns, key) = key_arrays(&forgotten);
        db.execute(
            "DELETE FROM gg_entries e USING unnest($1::bytea[], $2::bytea[]) AS k(ns, key) \
                 WHERE e.ns = k.ns AND e.key = k.key",
            &[&ns, &key],
        )
        .await
        .map_err(db_error)?;
    }
    if batch.prune_expired {
        let now = i64_of(now_ms);
        let rows = db
            .query("DELETE FROM gg_entries WHERE forget_at_ms <= $1 RETURNING ns, key", &[&now])
            .await
            .map_err(db_error)?;
        for row in &rows {
            forgotten.push(key_of(row, 0, 1)?);
        }
        let pruned = "DELETE FROM gg_used_tickets WHERE expires_ms <= $1";
        let idem = "DELETE FROM gg_idempotency WHERE expires_ms <= $1";
        let claims = "DELETE FROM gg_idem_claims WHERE until_ms <= $1";
        let changes = "WITH cut AS (SELECT max(seq) - $1 AS upto FROM gg_changes), \
             gone AS (DELETE FROM gg_changes WHERE seq <= (SELECT upto FROM cut) RETURNING seq) \
             UPDATE gg_meta SET changes_pruned_to = greatest(changes_pruned_to, (SELECT coalesce(max(seq), 0) FROM gone)) \
             WHERE id = 1";
        futures_util::try_join!(
            async { db.execute(pruned, &[&now]).await.map_err(db_error) },
            async { db.execute(idem, &[&now]).await.map_err(db_error) },
            async { db.execute(claims, &[&now]).await.map_err(db_error) },
            async { db.execute(changes, &[&changes_kept]).await.map_err(db_error) },
        )?;
    }
    let forgotten_keys = key_arrays(&forgotten);

    // Each entry is encoded once: the change log takes every one, `gg_entries` the newest of
    // each key (a batch may write a key twice).
    let bodies: Vec<Vec<u8>> =
        batch.entries.iter().map(|(_, e)| serde_json::to_vec(e).expect("entries serialize")).collect();
    let mut latest: BTreeMap<&NsKey, usize> = BTreeMap::new();
    for (i, (k, _)) in batch.entries.iter().enumerate() {
        latest.insert(k, i);
    }
    let mut e_ns = Vec::with_capacity(latest.len());
    let mut e_key = Vec::with_capacity(latest.len());
    let mut e_body: Vec<&[u8]> = Vec::with_capacity(latest.len());
    let mut e_deadline: Vec<Option<i64>> = Vec::with_capacity(latest.len());
    let mut e_forget: Vec<Option<i64>> = Vec::with_capacity(latest.len());
    for (k, &i) in &latest {
        let e = &batch.entries[i].1;
        e_ns.push(k.ns.as_bytes());
        e_key.push(k.key.as_bytes());
        e_body.push(&bodies[i]);
        e_deadline.push(deadline_of(k, e).map(i64_of));
        e_forget.push(retention_of(k, e, limits).map(|r| i64_of(now_ms.saturating_add(r))));
    }
    let mut c_rev = Vec::with_capacity(batch.entries.len() + forgotten.len());
    let mut c_ns = Vec::with_capacity(c_rev.capacity());
    let mut c_key = Vec::with_capacity(c_rev.capacity());
    let mut c_body: Vec<Option<&[u8]>> = Vec::with_capacity(c_rev.capacity());
    for (ns, key) in forgotten_keys.0.iter().zip(&forgotten_keys.1) {
        c_rev.push(i64_of(stored_revision));
        c_ns.push(*ns);
        c_key.push(*key);
        c_body.push(None);
    }
    for ((k, e), body) in batch.entries.iter().zip(&bodies) {
        c_rev.push(i64_of(e.changed_at));
        c_ns.push(k.ns.as_bytes());
        c_key.push(k.key.as_bytes());
        c_body.push(Some(body));
    }
    let a_seq: Vec<i64> = batch.audit.iter().map(|a| i64_of(a.seq)).collect();
    let a_body: Vec<&[u8]> = batch.audit.iter().map(|a| &a.body[..]).collect();
    let a_hash: Vec<&[u8]> = batch.audit.iter().map(|a| &a.hash[..]).collect();
    let t_id: Vec<&[u8]> = batch.used_tickets.iter().map(|(id, _)| &id[..]).collect();
    let t_exp: Vec<i64> = batch.used_tickets.iter().map(|(_, e)| i64_of(*e)).collect();
    let mut idem_latest: BTreeMap<&IdempotencyKey, &IdempotencyRecord> = BTreeMap::new();
    for (k, r) in &batch.idempotency {
        idem_latest.insert(k, r);
    }
    let [i_ns, i_scope, i_key] = idem_arrays(idem_latest.keys().copied());
    let i_rec: Vec<Vec<u8>> = idem_latest.values().map(|r| serde_json::to_vec(r).expect("records serialize")).collect();
    let i_exp: Vec<i64> = idem_latest.values().map(|r| i64_of(r.expires_at_ms)).collect();
    let [p_ns, p_scope, p_key] = idem_arrays(&batch.prune_idempotency);
    let p_tickets: Vec<&[u8]> = batch.prune_tickets.iter().map(|t| &t[..]).collect();
    let [r_ns, r_scope, r_key] = idem_arrays(&batch.release_claims);
    let (head_seq, head_hash) = match batch.audit.last() {
        Some(last) => (i64_of(last.seq), Some(last.hash.to_vec())),
        None => (i64_of(stored_seq), stored_head.map(|h| h.1.to_vec())),
    };
    let changed = !c_rev.is_empty();
    for sql in WRITE_STATEMENTS {
        db.statement(sql).await.map_err(db_error)?;
    }
    let (_, seqs, ..) = futures_util::try_join!(
        async {
            if e_ns.is_empty() {
                return Ok(0);
            }
            db.execute(ENTRIES_UPSERT, &[&e_ns, &e_key, &e_body, &e_deadline, &e_forget]).await.map_err(db_error)
        },
        async {
            if c_rev.is_empty() {
                return Ok(None);
            }
            let row = db.query_one(CHANGES_INSERT, &[&c_rev, &c_ns, &c_key, &c_body]).await.map_err(db_error)?;
            Ok(Some((u64_of(row.get(0)), u64_of(row.get(1)))))
        },
        async {
            if a_seq.is_empty() {
                return Ok(0);
            }
            db.execute(AUDIT_INSERT, &[&a_seq, &a_body, &a_hash]).await.map_err(db_error)
        },
        async {
            if t_id.is_empty() {
                return Ok(0);
            }
            db.execute(TICKETS_INSERT, &[&t_id, &t_exp]).await.map_err(db_error)
        },
        async {
            if i_ns.is_empty() {
                return Ok(0);
            }
            db.execute(IDEMPOTENCY_UPSERT, &[&i_ns, &i_scope, &i_key, &i_rec, &i_exp]).await.map_err(db_error)
        },
        async {
            if p_ns.is_empty() && p_tickets.is_empty() {
                return Ok(0);
            }
            db.execute(IDEMPOTENCY_DELETE, &[&p_ns, &p_scope, &p_key]).await.map_err(db_error)?;
            db.execute(TICKETS_DELETE, &[&p_tickets]).await.map_err(db_error)
        },
        async {
            if r_ns.is_empty() {
                return Ok(0);
            }
            db.execute(CLAIMS_DELETE, &[&r_ns, &r_scope, &r_key]).await.map_err(db_error)
        },
        async {
            db.execute(META_UPDATE, &[&revision, &head_seq, &head_hash, &batch.ticket_key]).await.map_err(db_error)
        },
        async {
            if !changed {
                return Ok(0);
            }
            db.execute(NOTIFY, &[&CHANNEL]).await.map_err(db_error)
        },
        // Last in the pipeline: if a statement above failed, this ends the aborted
        // transaction as a rollback, and the error above is what `try_join` returns.
        async { db.batch_execute("COMMIT").await.map(|()| 0).map_err(db_error) },
    )?;
    conn.txn = None;
    Ok(seqs)
}

impl Storage for PgStore {
    fn recover(&self) -> Result<Recovered, StoreError> {
        self.read(|client| {
            Box::pin(async move {
                // One snapshot for everything, so the cursor matches the entries.
                client.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.map_err(db_error)?;
                let result = async {
                    let meta = client
                        .query_one(
                            "SELECT revision, audit_seq, audit_head, ticket_key, \
                             (SELECT coalesce(max(seq), 0) FROM gg_changes) FROM gg_meta WHERE id = 1",
                            &[],
                        )
                        .await
                        .map_err(db_error)?;
                    let seq: i64 = meta.get(1);
                    let head: Option<Vec<u8>> = meta.get(2);
                    let audit_head = match head {
                        Some(h) if seq > 0 => Some((u64_of(seq), hash_of(&h)?)),
                        _ => None,
                    };
                    let rows = client
                        .query("SELECT ns, key, entry FROM gg_entries ORDER BY ns, key", &[])
                        .await
                        .map_err(db_error)?;
                    let entries = rows
                        .iter()
                        .map(|row| Ok((key_of(row, 0, 1)?, entry_of(row.get(2))?)))
                        .collect::<Result<_, StoreError>>()?;
                    let tickets =
                        client.query("SELECT id, expires_ms FROM gg_used_tickets", &[]).await.map_err(db_error)?;
                    let used_tickets = tickets
                        .iter()
                        .map(|row| Ok((ticket_of(row.get(0))?, u64_of(row.get(1)))))
                        .collect::<Result<_, StoreError>>()?;
                    let idem = client
                        .query("SELECT ns, scope, key, record FROM gg_idempotency", &[])
                        .await
                        .map_err(db_error)?;
                    let idempotency = idem
                        .iter()
                        .map(|row| {
                            let text = |i: usize| {
                                String::from_utf8(row.get::<_, Vec<u8>>(i)).map_err(|e| corrupt("gg_idempotency", e))
                            };
                            let key = IdempotencyKey { ns: text(0)?, scope: text(1)?, key: text(2)? };
                            let record: IdempotencyRecord =
                                serde_json::from_slice(row.get(3)).map_err(|e| corrupt("gg_idempotency.record", e))?;
                            Ok((key, record))
                        })
                        .collect::<Result<_, StoreError>>()?;
                    Ok(Recovered {
                        revision: u64_of(meta.get(0)),
                        entries,
                        used_tickets,
                        idempotency,
                        audit_head,
                        ticket_key: meta.get(3),
                        cursor: u64_of(meta.get(4)),
                    })
                }
                .await;
                let _ = client.batch_execute("COMMIT").await;
                result
            })
        })
    }

    fn commit(&self, batch: Batch) -> Result<(), StoreError> {
        let shared = self.shared.clone();
        self.block(async move {
            let mut guard = shared.writer.lock().await;
            if guard.as_ref().is_none_or(|c| c.db.is_closed()) {
                *guard = Some(WriterConn::connect(&shared.writer_config).await?);
            }
            let conn = guard.as_mut().expect("connected");
            let result = write_batch(conn, &batch, &shared.limits, shared.changes_kept).await;
            *shared.last_changes.lock().expect("last changes") = result.as_ref().ok().copied().flatten();
            if result.is_ok() && !batch.release_claims.is_empty() {
                let mut claims = shared.claims.lock().expect("claims");
                for key in &batch.release_claims {
                    claims.remove(key);
                }
            }
            let result = result.map(|_| ());
            if result.is_err() {
                conn.txn = None;
                if conn.db.batch_execute("ROLLBACK").await.is_err() {
                    *guard = None;
                }
            }
            result
        })
    }

    fn load_keys(&self, keys: &BTreeSet<NsKey>) -> Result<BTreeMap<NsKey, Entry>, StoreError> {
        let keys = keys.clone();
        self.read(move |client| Box::pin(async move { select_keys(client, &keys, false).await }))
    }

    fn audit_range(&self, from_seq: u64, limit: usize) -> Result<Vec<SealedEvent>, StoreError> {
        self.read(move |client| {
            Box::pin(async move {
                let limit = i64::try_from(limit).unwrap_or(i64::MAX);
                let rows = client
                    .query(
                        "SELECT seq, body, hash FROM gg_audit WHERE seq >= $1 ORDER BY seq LIMIT $2",
                        &[&i64_of(from_seq), &limit],
                    )
                    .await
                    .map_err(db_error)?;
                rows.iter()
                    .map(|row| {
                        Ok(SealedEvent { seq: u64_of(row.get(0)), body: row.get(1), hash: hash_of(row.get(2))? })
                    })
                    .collect()
            })
        })
    }

    fn shared(&self) -> Option<&dyn SharedStorage> {
        Some(self)
    }
}

impl SharedStorage for PgStore {
    fn begin(&self, lock: &LockRequest) -> Result<Locked, StoreError> {
        let shared = self.shared.clone();
        let lock = lock.clone();
        self.block(async move {
            let mut guard = shared.writer.lock().await;
            if guard.as_ref().is_none_or(|c| c.db.is_closed()) {
                *guard = Some(WriterConn::connect(&shared.writer_config).await?);
            }
            let conn = guard.as_mut().expect("connected");
            let result = begin(conn, &lock).await;
            if result.is_err() {
                conn.txn = None;
                if conn.db.batch_execute("ROLLBACK").await.is_err() {
                    *guard = None;
                }
            }
            result
        })
    }

    fn lock_more(&self, keys: &BTreeSet<NsKey>) -> Result<BTreeMap<NsKey, Entry>, StoreError> {
        let shared = self.shared.clone();
        let keys = keys.clone();
        self.block(async move {
            let guard = shared.writer.lock().await;
            let conn = guard
                .as_ref()
                .filter(|c| c.txn.is_some())
                .ok_or_else(|| StoreError::Invalid("lock_more outside a transaction".into()))?;
            select_keys(&conn.db, &keys, true).await
        })
    }

    fn rollback(&self) {
        let shared = self.shared.clone();
        self.block(async move {
            let mut guard = shared.writer.lock().await;
            if let Some(conn) = guard.as_mut() {
                if conn.txn.take().is_some() && conn.db.batch_execute("ROLLBACK").await.is_err() {
                    *guard = None;
                }
            }
        });
    }

    fn changes_since(&self, cursor: u64) -> Result<Changes, StoreError> {
        self.read(move |db| {
            Box::pin(async move {
                let rows = db.query(CHANGES, &[&i64_of(cursor)]).await.map_err(db_error)?;
                let first = rows.first().ok_or_else(|| StoreError::Invalid("no gg_meta row".into()))?;
                let pruned_to = u64_of(first.get(1));
                if cursor < pruned_to {
                    return Err(StoreError::Invalid(format!(
                        "the change log was pruned up to {pruned_to}, past this node's cursor {cursor}"
                    )));
                }
                let mut out = Changes {
                    cursor,
                    revision: u64_of(first.get(0)),
                    now_ms: u64_of(first.get(2)),
                    audit_seq: u64_of(first.get(3)),
                    changes: Vec::with_capacity(rows.len()),
                };
                for row in &rows {
                    let Some(seq) = row.get::<_, Option<i64>>(4) else { continue };
                    out.cursor = u64_of(seq);
                    let entry: Option<Vec<u8>> = row.get(8);
                    let entry = entry.map(|b| entry_of(&b)).transpose()?;
                    out.changes.push((u64_of(row.get(5)), key_of(row, 6, 7)?, entry));
                }
                Ok(out)
            })
        })
    }

    fn claim_idempotency(&self, key: &IdempotencyKey, ttl_ms: u64) -> Result<bool, StoreError> {
        let claimed = key.clone();
        let until: Option<i64> = self.read(move |client| {
            Box::pin(async move {
                let sql = format!(
                    "INSERT INTO gg_idem_claims (ns, scope, key, until_ms) VALUES ($1, $2, $3, {NOW_MS} + $4) \
                     ON CONFLICT (ns, scope, key) DO UPDATE SET until_ms = excluded.until_ms \
                     WHERE gg_idem_claims.until_ms <= {NOW_MS} RETURNING until_ms"
                );
                let key = &claimed;
                let rows = client
                    .query(&sql, &[&key.ns.as_bytes(), &key.scope.as_bytes(), &key.key.as_bytes(), &i64_of(ttl_ms)])
                    .await
                    .map_err(db_error)?;
                Ok(rows.first().map(|row| row.get(0)))
            })
        })?;
        if let Some(until) = until {
            remember_claim(&mut self.shared.claims.lock().expect("claims"), key, until, ttl_ms);
        }
        Ok(until.is_some())
    }

    fn release_claim(&self, claimed: &IdempotencyKey) {
        // Unknown (not claimed by this node since it started): nothing of ours to release.
        let Some(until) = self.shared.claims.lock().expect("claims").remove(claimed) else { return };
        let key = claimed.clone();
        let result = self.read(move |client| {
            Box::pin(async move {
                client
                    .execute(RELEASE_CLAIM, &[&key.ns.as_bytes(), &key.scope.as_bytes(), &key.key.as_bytes(), &until])
                    .await
                    .map_err(db_error)
            })
        });
        if let Err(e) = result {
            // The database is away (the request failed for that very reason, most likely):
            // retry in the background, so that a retry of the request is not told "in
            // progress" for the rest of the claim's life once the database is back.
            tracing::warn!(error = %e, "could not release an idempotency claim; retrying until it expires by itself");
            let give_up = std::time::Instant::now() + CLAIM_RELEASE_FOR;
            let mut releases = self.shared.releases.lock().expect("releases");
            releases.pending.push((claimed.clone(), until, give_up));
            if !releases.running {
                releases.running = true;
                self.handle.spawn(retry_releases(self.shared.clone()));
            }
        }
    }

    fn subscribe(&self, wake: Box<dyn Fn() + Send + Sync>) {
        let config = self.shared.config.clone();
        self.handle.spawn(async move {
            loop {
                match config.connect(NoTls).await {
                    Ok((client, mut connection)) => {
                        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
                        let sql = format!("LISTEN {CHANNEL}");
                        let listen = client.batch_execute(&sql);
                        let mut listen = std::pin::pin!(listen);
                        // Drive the connection while LISTEN runs, then forward notifications.
                        let mut listening = false;
                        loop {
                            tokio::select! {
                                done = &mut listen, if !listening => {
                                    if done.is_err() { break; }
                                    listening = true;
                                    wake();
                                }
                                message = messages.next() => match message {
                                    Some(Ok(AsyncMessage::Notification(_))) => wake(),
                                    Some(Ok(_)) => {}
                                    Some(Err(_)) | None => break,
                                },
                            }
                        }
                    }
                    Err(e) => tracing::debug!(error = %e, "cannot listen for changes; retrying"),
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
    }

    fn last_changes(&self) -> Option<(u64, u64)> {
        *self.shared.last_changes.lock().expect("last changes")
    }

    fn ping(&self) -> Result<(), StoreError> {
        self.read(|client| Box::pin(async move { client.execute("SELECT 1", &[]).await.map(|_| ()).map_err(db_error) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Up to the bound every claim is kept, lapsed or not; at it, the long-lapsed ones go
    /// before the new one is recorded, and the live ones stay.
    #[test]
    fn claims_are_kept_to_their_bound_then_the_long_lapsed_are_forgotten() {
        let key = |i: usize| IdempotencyKey { ns: "n".into(), scope: "s".into(), key: format!("k{i}") };
        let (ttl_ms, now) = (1_000, 1_000_000);
        let mut claims = HashMap::new();
        // One short of the bound: half long lapsed, half live.
        for i in 0..CLAIMS_KEPT_MAX - 1 {
            let until = if i % 2 == 0 { now - 10 * ttl_ms } else { now + ttl_ms };
            remember_claim(&mut claims, &key(i), until, 1_000);
        }
        assert_eq!(claims.len(), CLAIMS_KEPT_MAX - 1, "below the bound nothing is forgotten");
        remember_claim(&mut claims, &key(CLAIMS_KEPT_MAX - 1), now + ttl_ms, 1_000);
        assert_eq!(claims.len(), CLAIMS_KEPT_MAX, "at the bound, still everything");
        // One past it: the long lapsed go, the live ones and the new one stay.
        remember_claim(&mut claims, &key(CLAIMS_KEPT_MAX), now + ttl_ms, 1_000);
        assert_eq!(claims.len(), CLAIMS_KEPT_MAX / 2 + 1, "{}", claims.len());
        assert!(claims.values().all(|&until| until > now));
        assert!(claims.contains_key(&key(CLAIMS_KEPT_MAX)));
    }

    #[test]
    fn the_writer_ends_idle_transactions_and_the_urls_options_and_the_schema_come_after() {
        let timeout = "-c idle_in_transaction_session_timeout=10s";
        assert_eq!(session_options(None, None, true).unwrap().as_deref(), Some(timeout));
        assert_eq!(session_options(None, None, false).unwrap(), None, "readers send nothing of their own");
        assert_eq!(
            session_options(Some("-c work_mem=8MB"), Some("tenant_1"), true).unwrap(),
            Some(format!("{timeout} -c work_mem=8MB -c search_path=tenant_1"))
        );
        assert_eq!(
            session_options(Some("-c work_mem=8MB"), Some("tenant_1"), false).unwrap().as_deref(),
            Some("-c work_mem=8MB -c search_path=tenant_1")
        );
        assert!(session_options(None, Some("a;drop"), false).is_err());
    }
}
