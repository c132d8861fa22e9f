//! gapguard on its PostgreSQL backend: `n_nodes` gapguard nodes (`serve --backend
//! postgres://…`) over one database of the PostgreSQL the bench started. Each timed run gets
//! a fresh database and fresh nodes (the first node creates the tables, then the others
//! join), so that no run inherits the change log, audit chain or dead rows of the one before.
//! Load connections are spread over the nodes round-robin.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result};
use tokio::sync::{Mutex, MutexGuard};

use crate::gapguard::{ApiKey, Gapguard};
use crate::postgres;
use crate::procs::{self, Server};

/// A set of gapguard nodes serving one fresh database.
pub struct Cluster {
    /// The nodes' HTTP API.
    pub client: Gapguard,
    /// The nodes; dropping them stops them.
    nodes: Vec<Server>,
}

/// gapguard on PostgreSQL with a fixed number of nodes.
pub struct GapguardPg {
    bin: PathBuf,
    base: PathBuf,
    /// The PostgreSQL server.
    pg: SocketAddr,
    n_nodes: usize,
    key: Option<ApiKey>,
    /// Runs so far: run `n` uses database `bench_ggpg{n_nodes}_{n}`.
    n_runs: AtomicU64,
    cluster: Mutex<Option<Cluster>>,
}

impl GapguardPg {
    /// `n_nodes` nodes of the gapguard binary `bin`, over the PostgreSQL at `pg`; every
    /// request presents `key` when given (and the nodes are started with it).
    pub fn new(bin: &Path, base: &Path, pg: SocketAddr, n_nodes: usize, key: Option<ApiKey>) -> Self {
        GapguardPg {
            bin: bin.to_owned(),
            base: base.to_owned(),
            pg,
            n_nodes,
            key,
            n_runs: AtomicU64::new(0),
            cluster: Mutex::new(None),
        }
    }

    /// How many nodes serve.
    pub fn n_nodes(&self) -> usize {
        self.n_nodes
    }

    fn db(&self) -> String {
        format!("bench_ggpg{}_{}", self.n_nodes, self.n_runs.load(Ordering::Relaxed))
    }

    /// Stops the current nodes, drops their database, creates a fresh one and starts
    /// `n_nodes` nodes on it.
    pub async fn fresh(&self) -> Result<()> {
        let mut cluster = self.cluster.lock().await;
        if let Some(old) = cluster.take() {
            drop(old.nodes);
        }
        postgres::drop_database(self.pg, &self.db()).await?;
        self.n_runs.fetch_add(1, Ordering::Relaxed);
        let db = self.db();
        postgres::create_database(self.pg, &db).await?;
        let url = postgres::url(self.pg, &db);
        let mut nodes = Vec::with_capacity(self.n_nodes);
        // The first node alone creates the tables; the others join once it serves.
        for node_idx in 0..self.n_nodes {
            let node = procs::start_gapguard(&self.bin, &self.base, self.key.as_ref(), Some(&url))
                .await
                .with_context(|| format!("starting gapguard node {node_idx} on {db}"))?;
            nodes.push(node);
        }
        let addrs = nodes.iter().map(|n| n.addr).collect();
        *cluster = Some(Cluster { client: Gapguard::cluster(addrs, self.key.as_ref()), nodes });
        Ok(())
    }

    /// The current cluster, started if there is none.
    pub async fn cluster(&self) -> Result<MutexGuard<'_, Option<Cluster>>> {
        if self.cluster.lock().await.is_none() {
            self.fresh().await?;
        }
        Ok(self.cluster.lock().await)
    }

    /// Stops the nodes (before the PostgreSQL under them stops) and reports any that died
    /// during the run.
    pub async fn stop(&self) {
        if let Some(mut cluster) = self.cluster.lock().await.take() {
            for node in &mut cluster.nodes {
                if let Err(e) = node.check_alive() {
                    eprintln!("warning: gapguard-pg: {e:#}");
                }
            }
        }
    }
}
