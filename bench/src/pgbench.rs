//! PostgreSQL measured by its own load generator, `pgbench`: the raw database that gapguard's
//! PostgreSQL backend is compared with. Each run gets a fresh database holding
//! `stock(id int primary key, n bigint)` and `kv(k int primary key, v text)`, and one pgbench
//! process (`-M prepared`, TCP to loopback, as the `postgres` user when the bench is root)
//! runs one script for the warm-up and the measured window together, logging every
//! transaction (`-l`); the bench reads the log and counts, like its own runner, the
//! transactions that completed inside the measured window.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::postgres;
use crate::procs;
use crate::runner::Tally;
use crate::workload::{Workload, STOCK_KEY};

/// The durable put: one upsert of this client's own key (as `/work/shared/peers/README.md`).
const PUT_SCRIPT: &str =
    "INSERT INTO kv VALUES (:client_id, md5(random()::text)) ON CONFLICT (k) DO UPDATE SET v = excluded.v;\n";
/// The atomic conditional decrement of the hot row.
const DECREMENT_SCRIPT: &str = "UPDATE stock SET n = n - 1 WHERE id = 1 AND n > 0;\n";

/// PostgreSQL driven by pgbench.
pub struct Pgbench {
    /// The pgbench binary.
    bin: PathBuf,
    /// Where each run's temp dir (script, transaction logs) goes.
    base: PathBuf,
    /// The PostgreSQL server.
    addr: SocketAddr,
    /// Runs so far: run `n` uses database `bench_pgbench_{n}`.
    n_runs: AtomicU64,
}

impl Pgbench {
    /// pgbench from `pg_bin`, against the PostgreSQL at `addr`.
    pub fn new(pg_bin: &Path, base: &Path, addr: SocketAddr) -> Result<Self> {
        let bin = pg_bin.join("pgbench");
        if !bin.is_file() {
            bail!(
                "no {} (PostgreSQL 15's pgbench); pass --pg-bin DIR or leave pgbench out of --systems",
                bin.display()
            );
        }
        Ok(Pgbench { bin, base: base.to_owned(), addr, n_runs: AtomicU64::new(0) })
    }

    /// The pgbench binary, for its version.
    pub fn bin(&self) -> &Path {
        &self.bin
    }

    fn db(&self) -> String {
        format!("bench_pgbench_{}", self.n_runs.load(Ordering::Relaxed))
    }

    /// Drops the previous run's database and creates a fresh one with empty tables.
    pub async fn fresh(&self) -> Result<()> {
        let previous = self.db();
        self.n_runs.fetch_add(1, Ordering::Relaxed);
        postgres::drop_database(self.addr, &previous).await?;
        let db = self.db();
        postgres::create_database(self.addr, &db).await?;
        let client = postgres::connect_db(self.addr, &db).await?;
        client
            .batch_execute(
                "CREATE TABLE stock (id int PRIMARY KEY, n bigint NOT NULL); \
                 CREATE TABLE kv (k int PRIMARY KEY, v text NOT NULL)",
            )
            .await
            .context("creating pgbench's tables")?;
        Ok(())
    }

    /// Sets row 1 of `stock` (the hot key `stock` of the other systems) to `n`.
    pub async fn set_stock(&self, n: i64) -> Result<()> {
        let client = postgres::connect_db(self.addr, &self.db()).await?;
        client
            .execute("INSERT INTO stock (id, n) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET n = excluded.n", &[&n])
            .await
            .with_context(|| format!("setting {STOCK_KEY}"))?;
        Ok(())
    }

    /// Reads row 1 of `stock`.
    pub async fn read_stock(&self) -> Result<i64> {
        let client = postgres::connect_db(self.addr, &self.db()).await?;
        let row = client.query_opt("SELECT n FROM stock WHERE id = 1", &[]).await?;
        Ok(row.context("pgbench: row 1 of `stock` is missing")?.try_get(0)?)
    }

    /// Runs pgbench with `connections` clients for `warmup + measure` (and a second more, so
    /// that the measured window is covered whenever pgbench's own clock started), then tallies
    /// its transaction log.
    pub async fn run(
        &self,
        workload: Workload,
        connections: usize,
        warmup: Duration,
        measure: Duration,
    ) -> Result<Tally> {
        let script = match workload {
            Workload::Puts => PUT_SCRIPT,
            Workload::Decrement | Workload::Reserve => DECREMENT_SCRIPT,
            Workload::Checks | Workload::CheckAct => bail!("the {} workload is not run on pgbench", workload.name()),
        };
        let dir = procs::postgres_temp_dir(&self.base, "pgbench")?;
        let script_path = dir.path().join("script.sql");
        std::fs::write(&script_path, script).with_context(|| format!("writing {}", script_path.display()))?;
        let log_prefix = dir.path().join("txn");
        let total = warmup + measure;
        let seconds = total.as_secs() + u64::from(total.subsec_nanos() > 0) + 1;
        let threads = connections.min(2);
        let args: Vec<String> = vec![
            "-n".into(),
            "-M".into(),
            "prepared".into(),
            "-h".into(),
            self.addr.ip().to_string(),
            "-p".into(),
            self.addr.port().to_string(),
            "-U".into(),
            postgres::USER.into(),
            "-c".into(),
            connections.to_string(),
            "-j".into(),
            threads.to_string(),
            "-T".into(),
            seconds.to_string(),
            "-f".into(),
            script_path.display().to_string(),
            "-l".into(),
            format!("--log-prefix={}", log_prefix.display()),
            self.db(),
        ];
        let stdout = procs::run_postgres_tool(&self.bin, &args, dir.path()).await?;
        let processed = processed(&stdout).context("pgbench printed no `number of transactions actually processed`")?;
        let mut completions = Vec::new();
        for entry in std::fs::read_dir(dir.path())? {
            let entry = entry?;
            if entry.file_name().to_string_lossy().starts_with("txn.") {
                let text = std::fs::read_to_string(entry.path())?;
                parse_log(&text, &mut completions).with_context(|| format!("reading {}", entry.path().display()))?;
            }
        }
        if u64::try_from(completions.len())? != processed {
            bail!("pgbench processed {processed} transactions but logged {}", completions.len());
        }
        tally(&completions, warmup, measure)
    }
}

/// One logged transaction: when it completed and how long it took, in microseconds.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Completion {
    end_us: u64,
    latency_us: u64,
}

/// `number of transactions actually processed: N` from pgbench's report.
fn processed(stdout: &str) -> Option<u64> {
    let line = stdout.lines().find(|l| l.starts_with("number of transactions actually processed:"))?;
    line.split(':').nth(1)?.split_whitespace().next()?.parse().ok()
}

/// Parses pgbench's per-transaction log (`client_id transaction_no time script_no time_epoch
/// time_us …`, where `time` is the latency in µs and `time_epoch`/`time_us` when the
/// transaction completed). A transaction that failed or was skipped is an error.
fn parse_log(text: &str, out: &mut Vec<Completion>) -> Result<()> {
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, _, latency, _, epoch_s, epoch_us, ..] = fields[..] else {
            bail!("bad log line {line:?}");
        };
        let (Ok(latency_us), Ok(s), Ok(us)) = (latency.parse::<u64>(), epoch_s.parse::<u64>(), epoch_us.parse::<u64>())
        else {
            bail!("a transaction did not succeed: {line:?}");
        };
        out.push(Completion { end_us: s * 1_000_000 + us, latency_us });
    }
    Ok(())
}

/// The run's tally: the run starts when its first transaction did; transactions completed
/// after `warmup` and within `measure` of it count, every logged one counts as a success.
fn tally(completions: &[Completion], warmup: Duration, measure: Duration) -> Result<Tally> {
    let mut tally = Tally::new(measure.as_secs_f64());
    let Some(start_us) = completions.iter().map(|c| c.end_us.saturating_sub(c.latency_us)).min() else {
        bail!("pgbench logged no transaction");
    };
    let from = start_us + u64::try_from(warmup.as_micros())?;
    let until = from + u64::try_from(measure.as_micros())?;
    let last = completions.iter().map(|c| c.end_us).max().unwrap_or(0);
    if last < until {
        bail!("pgbench's last transaction completed {} ms before the end of the window", (until - last) / 1000);
    }
    for c in completions {
        tally.all_successes += 1;
        tally.all_attempts += 1;
        if c.end_us >= from && c.end_us < until {
            tally.ops += 1;
            tally.attempts += 1;
            tally.latency_us.saturating_record(c.latency_us.max(1));
        }
    }
    Ok(tally)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{parse_log, processed, tally, Completion};

    #[test]
    fn the_log_gives_completion_times_and_latencies() {
        let mut out = Vec::new();
        parse_log("0 1 250 0 1700000000 500000\n3 7 1200 0 1700000001 999999\n", &mut out).unwrap();
        assert_eq!(
            out,
            [
                Completion { end_us: 1_700_000_000_500_000, latency_us: 250 },
                Completion { end_us: 1_700_000_001_999_999, latency_us: 1200 }
            ]
        );
        assert!(parse_log("0 1 failed 0 1700000000 500000\n", &mut out).is_err());
        assert!(parse_log("0 1 250\n", &mut out).is_err());
    }

    #[test]
    fn only_transactions_completed_inside_the_window_count() {
        let at = |ms: u64| Completion { end_us: ms * 1000, latency_us: 1000 };
        // The run starts at 0 (the first transaction's start), warm-up 1 s, window 2 s.
        let log = [at(1), at(999), at(1000), at(2999), at(3000), at(3100)];
        let t = tally(&log, Duration::from_secs(1), Duration::from_secs(2)).unwrap();
        assert_eq!((t.ops, t.all_successes), (2, 6));
        assert!(tally(&log[..4], Duration::from_secs(1), Duration::from_secs(2)).is_err(), "window not covered");
    }

    #[test]
    fn the_report_names_the_transactions_processed() {
        let out =
            "transaction type: script.sql\nnumber of transactions actually processed: 51234\nlatency average = 3 ms\n";
        assert_eq!(processed(out), Some(51234));
    }
}
