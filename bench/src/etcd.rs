//! etcd's side of every workload, over gRPC with the `etcd-client` crate (one client, and so
//! one HTTP/2 connection, per load task).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};

use crate::runner::{Outcome, Worker};
use crate::workload::{Workload, STOCK_KEY};

/// A running etcd server.
pub struct Etcd {
    endpoint: String,
}

impl Etcd {
    /// A handle on the etcd whose client URL is `http://{addr}`.
    pub fn new(addr: SocketAddr) -> Self {
        Etcd { endpoint: format!("http://{addr}") }
    }

    /// Succeeds when a read answers within a second.
    pub async fn probe(addr: SocketAddr) -> Result<()> {
        let options =
            ConnectOptions::new().with_connect_timeout(Duration::from_secs(1)).with_timeout(Duration::from_secs(1));
        let mut client = Client::connect([format!("http://{addr}")], Some(options)).await?;
        client.get("probe", None).await?;
        Ok(())
    }

    async fn client(&self) -> Result<Client> {
        let options =
            ConnectOptions::new().with_connect_timeout(Duration::from_secs(5)).with_timeout(Duration::from_secs(60));
        Client::connect([self.endpoint.as_str()], Some(options))
            .await
            .with_context(|| format!("connecting to etcd at {}", self.endpoint))
    }

    /// Sets the hot key `stock` to `n`.
    pub async fn set_stock(&self, n: i64) -> Result<()> {
        self.client().await?.put(STOCK_KEY, n.to_string(), None).await?;
        Ok(())
    }

    /// Reads the hot key `stock`.
    pub async fn read_stock(&self) -> Result<i64> {
        Ok(read_stock(&mut self.client().await?).await?.0)
    }

    /// Opens `connections` clients, each ready to run `workload`.
    pub async fn workers(&self, workload: Workload, connections: usize) -> Result<Vec<EtcdWorker>> {
        let mut workers = Vec::with_capacity(connections);
        for index in 0..connections {
            let mut client = self.client().await?;
            // Open the connection now rather than in the first measured request.
            client.get("probe", None).await?;
            workers.push(EtcdWorker { client, workload, key: format!("k{index}").into_bytes(), n: 0 });
        }
        Ok(workers)
    }
}

/// One connection's load against etcd.
pub struct EtcdWorker {
    client: Client,
    workload: Workload,
    key: Vec<u8>,
    /// The next value this connection puts.
    n: u64,
}

impl Worker for EtcdWorker {
    async fn op(&mut self) -> Result<Outcome> {
        match self.workload {
            Workload::Puts => {
                self.n += 1;
                self.client.put(self.key.clone(), self.n.to_string(), None).await?;
                Ok(Outcome::Done { attempts: 1 })
            }
            Workload::Checks => {
                self.client.get(STOCK_KEY, None).await?;
                Ok(Outcome::Done { attempts: 1 })
            }
            // etcd has no reservations: one successful compare-and-decrement stands for
            // one reserve -> commit pair.
            Workload::Decrement | Workload::CheckAct | Workload::Reserve => self.compare_and_decrement().await,
        }
    }
}

impl EtcdWorker {
    /// Reads `stock` and its `mod_revision`, then writes `n - 1` only if the revision is
    /// still the one read; retries from the read when another writer got there first.
    async fn compare_and_decrement(&mut self) -> Result<Outcome> {
        let mut attempts = 0;
        loop {
            let (n, seen) = read_stock(&mut self.client).await?;
            if n <= 0 {
                return Ok(Outcome::Exhausted { attempts });
            }
            attempts += 1;
            let txn = Txn::new()
                .when([Compare::mod_revision(STOCK_KEY, CompareOp::Equal, seen)])
                .and_then([TxnOp::put(STOCK_KEY, (n - 1).to_string(), None)]);
            if self.client.txn(txn).await?.succeeded() {
                return Ok(Outcome::Done { attempts });
            }
        }
    }
}

/// Reads `stock`: its value and its `mod_revision`.
async fn read_stock(client: &mut Client) -> Result<(i64, i64)> {
    let resp = client.get(STOCK_KEY, None).await?;
    let kv = resp.kvs().first().context("etcd: key `stock` is missing")?;
    let n =
        std::str::from_utf8(kv.value()).ok().and_then(|s| s.parse().ok()).context("etcd: `stock` is not an integer")?;
    Ok((n, kv.mod_revision()))
}
