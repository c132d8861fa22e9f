//! Redis's side of every workload (one RESP connection per load task).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};

use crate::resp::{decimal, Reply, Resp};
use crate::runner::{Outcome, Worker};
use crate::workload::{Workload, STOCK_KEY};

/// The atomic conditional decrement, as in the peers' notes: 1 if it decremented, 0 if the
/// stock was already gone.
const DECREMENT_LUA: &str = "local n=tonumber(redis.call('GET',KEYS[1])) \
     if n>0 then redis.call('SET',KEYS[1],n-1) return 1 end return 0";

/// A running Redis server.
pub struct Redis {
    addr: SocketAddr,
}

impl Redis {
    /// A handle on the Redis listening at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Redis { addr }
    }

    /// Succeeds when `PING` answers.
    pub async fn probe(addr: SocketAddr) -> Result<()> {
        Resp::connect(addr).await?.call(&[b"PING"]).await?;
        Ok(())
    }

    /// Sets the hot key `stock` to `n`.
    pub async fn set_stock(&self, n: i64) -> Result<()> {
        let mut conn = Resp::connect(self.addr).await?;
        let mut digits = [0; 20];
        conn.call(&[b"SET", STOCK_KEY.as_bytes(), decimal(n, &mut digits)]).await?;
        Ok(())
    }

    /// Reads the hot key `stock`.
    pub async fn read_stock(&self) -> Result<i64> {
        let mut conn = Resp::connect(self.addr).await?;
        conn.push(&[b"GET", STOCK_KEY.as_bytes()]);
        conn.flush().await?;
        conn.read_int_bulk().await?.context("Redis: key `stock` is missing")
    }

    /// Opens `connections` connections, each ready to run `workload`.
    pub async fn workers(&self, workload: Workload, connections: usize) -> Result<Vec<RedisWorker>> {
        let mut sha: Arc<[u8]> = Arc::from(&b""[..]);
        let mut workers = Vec::with_capacity(connections);
        for index in 0..connections {
            let mut conn = Resp::connect(self.addr).await?;
            if index == 0 && workload == Workload::Decrement {
                conn.call(&[b"SCRIPT", b"LOAD", DECREMENT_LUA.as_bytes()]).await?;
                sha = Arc::from(conn.bulk.as_slice());
            }
            workers.push(RedisWorker { conn, workload, key: format!("k{index}").into_bytes(), sha: sha.clone(), n: 0 });
        }
        Ok(workers)
    }
}

/// One connection's load against Redis.
pub struct RedisWorker {
    conn: Resp,
    workload: Workload,
    key: Vec<u8>,
    /// SHA1 of [`DECREMENT_LUA`], loaded once per run.
    sha: Arc<[u8]>,
    /// The next value this connection sets.
    n: i64,
}

impl Worker for RedisWorker {
    async fn op(&mut self) -> Result<Outcome> {
        match self.workload {
            Workload::Puts => {
                self.n += 1;
                let mut digits = [0; 20];
                self.conn.push(&[b"SET", &self.key, decimal(self.n, &mut digits)]);
                self.conn.flush().await?;
                self.conn.read_status().await?;
                Ok(Outcome::Done { attempts: 1 })
            }
            Workload::Checks => {
                self.conn.push(&[b"GET", STOCK_KEY.as_bytes()]);
                self.conn.flush().await?;
                self.conn.read_int_bulk().await?;
                Ok(Outcome::Done { attempts: 1 })
            }
            Workload::Decrement => {
                let reply = self.conn.call(&[b"EVALSHA", &self.sha, b"1", STOCK_KEY.as_bytes()]).await?;
                match reply {
                    Reply::Int(1) => Ok(Outcome::Done { attempts: 1 }),
                    Reply::Int(0) => Ok(Outcome::Exhausted { attempts: 1 }),
                    other => bail!("Redis EVALSHA: unexpected reply {other:?}"),
                }
            }
            Workload::CheckAct => self.watch_and_decrement().await,
            Workload::Reserve => bail!("the reserve workload is not run on Redis"),
        }
    }
}

impl RedisWorker {
    /// Redis's optimistic check-then-act: WATCH the key, GET it, then MULTI/SET/EXEC, which
    /// aborts if anyone wrote the key since the WATCH; retries from the WATCH.
    async fn watch_and_decrement(&mut self) -> Result<Outcome> {
        let key = STOCK_KEY.as_bytes();
        let mut attempts = 0;
        loop {
            self.conn.push(&[b"WATCH", key]);
            self.conn.push(&[b"GET", key]);
            self.conn.flush().await?;
            self.conn.read_status().await?;
            let n = self.conn.read_int_bulk().await?.context("Redis: key `stock` is missing")?;
            if n <= 0 {
                self.conn.call(&[b"UNWATCH"]).await?;
                return Ok(Outcome::Exhausted { attempts });
            }
            attempts += 1;
            let mut digits = [0; 20];
            self.conn.push(&[b"MULTI"]);
            self.conn.push(&[b"SET", key, decimal(n - 1, &mut digits)]);
            self.conn.push(&[b"EXEC"]);
            self.conn.flush().await?;
            self.conn.read_status().await?; // MULTI: +OK
            self.conn.read_status().await?; // SET: +QUEUED
            match self.conn.read().await? {
                Reply::Array(Some(1)) => {
                    self.conn.read_status().await?; // the SET's +OK
                    return Ok(Outcome::Done { attempts });
                }
                Reply::Array(None) => continue, // someone wrote `stock` since the WATCH
                other => bail!("Redis EXEC: unexpected reply {other:?}"),
            }
        }
    }
}
