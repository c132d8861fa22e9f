//! PostgreSQL's side of the `reserve` workload, with `tokio-postgres`: one connection per load
//! task, one prepared autocommit `UPDATE` per pair (each its own durable transaction). Also
//! the helpers the PostgreSQL backend and pgbench runs share: URLs, connections to a named
//! database, a fresh database per run.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio_postgres::{Client, Config, NoTls, Statement};

use crate::runner::{Outcome, Worker};
use crate::workload::Workload;

/// The database user (the superuser `initdb -U postgres` creates; trust authentication).
pub const USER: &str = "postgres";

/// Takes one unit of the hot pool if there is one: 1 row updated = a success, 0 = exhausted.
const TAKE_ONE: &str = "UPDATE pool SET n = n - 1 WHERE id = 1 AND n > 0";

/// A running PostgreSQL server.
pub struct Postgres {
    addr: SocketAddr,
}

impl Postgres {
    /// A handle on the PostgreSQL listening at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Postgres { addr }
    }

    async fn connect(&self) -> Result<Client> {
        connect(&config(self.addr, Duration::from_secs(5))).await
    }

    /// Succeeds when `SELECT 1` answers.
    pub async fn probe(addr: SocketAddr) -> Result<()> {
        let client = connect(&config(addr, Duration::from_secs(1))).await?;
        client.simple_query("SELECT 1").await?;
        Ok(())
    }

    /// Creates the table `pool(id int primary key, n bigint)` afresh, with row 1 at `n`: each
    /// run starts without the dead row versions the previous one left behind.
    pub async fn set_stock(&self, n: i64) -> Result<()> {
        let client = self.connect().await?;
        client
            .batch_execute("DROP TABLE IF EXISTS pool; CREATE TABLE pool (id int PRIMARY KEY, n bigint NOT NULL)")
            .await?;
        client.execute("INSERT INTO pool (id, n) VALUES (1, $1)", &[&n]).await?;
        Ok(())
    }

    /// Reads row 1 of `pool`.
    pub async fn read_stock(&self) -> Result<i64> {
        let client = self.connect().await?;
        let row = client.query_opt("SELECT n FROM pool WHERE id = 1", &[]).await?;
        Ok(row.context("PostgreSQL: row 1 of `pool` is missing")?.try_get(0)?)
    }

    /// Opens `connections` connections, each with the `UPDATE` prepared.
    pub async fn workers(&self, workload: Workload, connections: usize) -> Result<Vec<PostgresWorker>> {
        if workload != Workload::Reserve {
            bail!("the {} workload is not run on PostgreSQL", workload.name());
        }
        let mut workers = Vec::with_capacity(connections);
        for _ in 0..connections {
            let client = self.connect().await?;
            let take_one = client.prepare(TAKE_ONE).await.context("preparing the UPDATE")?;
            workers.push(PostgresWorker { client, take_one });
        }
        Ok(workers)
    }
}

/// One connection's load against PostgreSQL.
pub struct PostgresWorker {
    client: Client,
    take_one: Statement,
}

impl Worker for PostgresWorker {
    async fn op(&mut self) -> Result<Outcome> {
        match self.client.execute(&self.take_one, &[]).await? {
            1 => Ok(Outcome::Done { attempts: 1 }),
            0 => Ok(Outcome::Exhausted { attempts: 1 }),
            n => bail!("PostgreSQL: the UPDATE touched {n} rows"),
        }
    }
}

fn config(addr: SocketAddr, connect_timeout: Duration) -> Config {
    config_db(addr, "postgres", connect_timeout)
}

fn config_db(addr: SocketAddr, db: &str, connect_timeout: Duration) -> Config {
    let mut config = Config::new();
    config
        .host(addr.ip().to_string())
        .port(addr.port())
        .user(USER)
        .dbname(db)
        .application_name("gapguard-bench")
        .connect_timeout(connect_timeout);
    config
}

/// The URL of database `db` on the PostgreSQL at `addr`, as `gapguard serve --backend` takes it.
pub fn url(addr: SocketAddr, db: &str) -> String {
    format!("postgres://{USER}@{addr}/{db}")
}

/// Opens one connection to database `db` on the PostgreSQL at `addr`.
pub async fn connect_db(addr: SocketAddr, db: &str) -> Result<Client> {
    connect(&config_db(addr, db, Duration::from_secs(5))).await
}

/// Creates database `db` (a plain identifier: the bench's own names), dropping any database
/// of that name first; each run gets a fresh one so that none inherits the dead row
/// versions, change log or audit chain of the one before.
pub async fn create_database(addr: SocketAddr, db: &str) -> Result<()> {
    let client = connect(&config(addr, Duration::from_secs(5))).await?;
    drop_if_exists(&client, db).await?;
    client.batch_execute(&format!("CREATE DATABASE {db}")).await.with_context(|| format!("creating database {db}"))?;
    Ok(())
}

/// Drops database `db` if it exists (its clients are disconnected).
pub async fn drop_database(addr: SocketAddr, db: &str) -> Result<()> {
    let client = connect(&config(addr, Duration::from_secs(5))).await?;
    drop_if_exists(&client, db).await
}

async fn drop_if_exists(client: &tokio_postgres::Client, db: &str) -> Result<()> {
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await
        .with_context(|| format!("dropping database {db}"))
}

/// Opens one connection (TCP, no TLS) and spawns the task that drives it, which ends when
/// the returned client is dropped.
async fn connect(config: &Config) -> Result<Client> {
    let (client, connection) = config.connect(NoTls).await.context("connecting to PostgreSQL")?;
    tokio::spawn(async move {
        // An error here (the server went away) surfaces on the client's next request.
        let _ = connection.await;
    });
    Ok(client)
}
