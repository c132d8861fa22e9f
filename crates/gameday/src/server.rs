//! The embedded server: the gapguard binary itself, spawned as a child on a temp data
//! directory, so that a crash fault is a real `kill -9` (SIGKILL of the child) and a restart
//! recovers from the same files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt as _, BufReader};
use tokio::process::{Child, Command};

use crate::GamedayError;

/// How long a start (recovery included) may take before the gameday gives up.
pub const START_TIMEOUT_MS: u64 = 30_000;

/// A `gapguard serve` child process on a private data directory.
#[derive(Debug)]
pub struct EmbeddedServer {
    binary: PathBuf,
    data: tempfile::TempDir,
    child: Child,
    addr: SocketAddr,
}

impl EmbeddedServer {
    /// Starts `binary serve --data TMPDIR --listen 127.0.0.1:0` and waits for its
    /// `listening on ADDR` line. Its log (`RUST_LOG=warn`) goes to `TMPDIR/server.log`.
    pub async fn start(binary: &Path) -> Result<Self, GamedayError> {
        let data = tempfile::Builder::new()
            .prefix("gapguard-gameday-")
            .tempdir()
            .map_err(|e| GamedayError::io("cannot create the embedded server's temp dir", e))?;
        let (child, addr) = spawn(binary, data.path()).await?;
        Ok(Self { binary: binary.to_owned(), data, child, addr })
    }

    /// The address it listens on now (it changes with every restart).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The process id of the running child.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The data directory (kept across restarts, removed when the server is dropped).
    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// `kill -9`, then a start on the same data directory. Returns what happened.
    pub async fn crash_and_restart(&mut self) -> Result<Restart, GamedayError> {
        let killed_pid = self.child.id();
        let started = Instant::now();
        self.child.kill().await.map_err(|e| GamedayError::Server {
            binary: self.binary.clone(),
            reason: format!("kill -9 failed: {e}"),
        })?;
        let (child, addr) = spawn(&self.binary, self.data.path()).await?;
        self.child = child;
        self.addr = addr;
        Ok(Restart {
            killed_pid,
            started_pid: self.child.id(),
            restart_ms: started.elapsed().as_secs_f64() * 1000.0,
            addr,
        })
    }
}

/// What one crash fault did.
#[derive(Clone, Debug)]
pub struct Restart {
    /// The pid that received SIGKILL.
    pub killed_pid: Option<u32>,
    /// The pid of the new server.
    pub started_pid: Option<u32>,
    /// From the kill to the new server listening, in ms.
    pub restart_ms: f64,
    /// Where the new server listens.
    pub addr: SocketAddr,
}

async fn spawn(binary: &Path, data: &Path) -> Result<(Child, SocketAddr), GamedayError> {
    let fail = |reason: String| GamedayError::Server { binary: binary.to_owned(), reason };
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.join("server.log"))
        .map_err(|e| fail(format!("cannot open its log file: {e}")))?;
    let mut child = Command::new(binary)
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| fail(format!("cannot run it: {e}")))?;
    let stdout = child.stdout.take().ok_or_else(|| fail("no stdout".into()))?;
    let mut first = String::new();
    let read =
        tokio::time::timeout(Duration::from_millis(START_TIMEOUT_MS), BufReader::new(stdout).read_line(&mut first))
            .await;
    let log_hint = || format!("see {}", data.join("server.log").display());
    match read {
        Err(_) => {
            return Err(fail(format!(
                "it did not print `listening on ADDR` within {START_TIMEOUT_MS} ms; {}",
                log_hint()
            )))
        }
        Ok(Err(e)) => return Err(fail(format!("cannot read its stdout: {e}"))),
        Ok(Ok(_)) => {}
    }
    let addr = first.trim().strip_prefix("listening on ").and_then(|a| a.parse().ok()).ok_or_else(|| {
        fail(format!("its first line was {:?}, not `listening on ADDR`; {}", first.trim(), log_hint()))
    })?;
    tracing::debug!(%addr, pid = ?child.id(), "embedded gapguard started");
    Ok((child, addr))
}
