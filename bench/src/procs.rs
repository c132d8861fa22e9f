//! Starting and stopping the servers under test: free loopback ports, temp dirs, readiness
//! probes, and guards whose `Drop` stops the child (also on error, panic or Ctrl-C).

use std::fs::File;
use std::future::Future;
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use gapguard_testkit::{spawn_as, User};
use tempfile::TempDir;

use crate::gapguard::ApiKey;

/// How long a server may take to become ready.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a server may take to stop politely before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A running server: stopped, then its temp dir removed, when dropped.
pub struct Server {
    /// Where its clients connect.
    pub addr: SocketAddr,
    // Field order matters: the child is stopped before its directory is removed.
    child: ChildGuard,
    _dir: TempDir,
}

impl Server {
    /// The server's process id (for its CPU time).
    pub fn pid(&self) -> u32 {
        self.child.child.id()
    }

    /// Fails, with the tail of its log, if the server has exited since it started.
    pub fn check_alive(&mut self) -> Result<()> {
        self.child.check_alive("the run")
    }
}

/// How a child is asked to stop before it is killed.
enum Stop {
    /// SIGTERM (etcd and gapguard shut down cleanly on it).
    Term,
    /// `SHUTDOWN NOSAVE` sent to the Redis at this address.
    RedisShutdown(SocketAddr),
    /// `pg_ctl -D <data> -m fast -w stop`, run as `user`; SIGINT (the same fast shutdown)
    /// if that fails.
    PgCtl { pg_ctl: PathBuf, data: PathBuf, user: Option<User> },
}

/// Owns a child process and stops it when dropped.
struct ChildGuard {
    name: &'static str,
    child: Child,
    stop: Stop,
    log: PathBuf,
}

impl ChildGuard {
    /// Fails with the tail of the child's log if the child has exited.
    fn check_alive(&mut self, during: &str) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited during {during} ({status}); last lines of {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log)
            );
        }
        Ok(())
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        match &self.stop {
            Stop::Term => signal(&self.child, libc::SIGTERM),
            Stop::RedisShutdown(addr) => {
                if redis_shutdown(*addr).is_err() {
                    signal(&self.child, libc::SIGTERM);
                }
            }
            Stop::PgCtl { pg_ctl, data, user } => {
                let mut cmd = Command::new(pg_ctl);
                cmd.arg("-D").arg(data).args(["-m", "fast", "-w", "-t", "10", "stop"]).stdin(Stdio::null());
                if let Some(dir) = data.parent() {
                    cmd.current_dir(dir);
                }
                match append(&self.log).and_then(|log| Ok((log.try_clone()?, log))) {
                    Ok((out, err)) => cmd.stdout(out).stderr(err),
                    Err(_) => cmd.stdout(Stdio::null()).stderr(Stdio::null()),
                };
                if let Some(user) = user {
                    cmd.uid(user.uid).gid(user.gid);
                }
                if !cmd.status().is_ok_and(|status| status.success()) {
                    signal(&self.child, libc::SIGINT);
                }
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("{} did not stop within {STOP_TIMEOUT:?}: killing it", self.name);
        signal(&self.child, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Sends `sig` to `child`'s process group, which [`spawn`] made the child lead: a
/// `--gapguard` wrapper script that starts the server in the background (rather than
/// `exec`ing it) is stopped with the server, which would otherwise outlive the run.
fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) has no memory-safety preconditions. The group is our own child's,
        // not yet reaped (try_wait said it is running), so its id cannot have been reused.
        unsafe {
            libc::kill(-pid, sig);
        }
    }
}

/// Sends `SHUTDOWN NOSAVE` to Redis, blocking (this runs in `Drop`).
fn redis_shutdown(addr: SocketAddr) -> std::io::Result<()> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_write_timeout(Some(Duration::from_secs(2)))?;
    stream.write_all(b"*2\r\n$8\r\nSHUTDOWN\r\n$6\r\nNOSAVE\r\n")
}

/// Spawns `cmd` in its own process group (so a terminal's Ctrl-C reaches only the bench,
/// which then stops its children in order) and arranges for the kernel to kill the child
/// if the bench itself dies without cleaning up.
fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    spawn_as(cmd, None)
}

/// Reserves `N` distinct free loopback ports: binds them all at once, then releases them.
fn free_ports<const N: usize>() -> Result<[u16; N]> {
    let listeners = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .context("reserving a free port")?;
    let mut ports = [0; N];
    for (port, listener) in ports.iter_mut().zip(&listeners) {
        *port = listener.local_addr()?.port();
    }
    Ok(ports)
}

fn temp_dir(base: &Path, name: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!("gapguard-bench-{name}-"))
        .tempdir_in(base)
        .with_context(|| format!("creating a temp dir in {}", base.display()))
}

/// Opens `path` for appending (created if missing), for a child's stdout and stderr.
fn append(path: &Path) -> Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The last few lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path) {
        let len = file.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = file.seek(SeekFrom::Start(len.saturating_sub(2000)));
        let _ = file.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

/// Polls `probe` until it succeeds, the child exits, or [`START_TIMEOUT`] passes.
async fn wait_ready<F, Fut>(server: &mut Server, probe: F) -> Result<()>
where
    F: Fn(SocketAddr) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        server.child.check_alive("start-up")?;
        let last = match tokio::time::timeout(Duration::from_secs(2), probe(server.addr)).await {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => format!("{e:#}"),
            Err(_) => "probe timed out".to_owned(),
        };
        if Instant::now() >= deadline {
            bail!(
                "{} at {} not ready after {START_TIMEOUT:?} ({last}); last lines of {}:\n{}",
                server.child.name,
                server.addr,
                server.child.log.display(),
                tail(&server.child.log)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts `gapguard serve --data <tempdir>/data --listen 127.0.0.1:0` (with `backend`:
/// `--backend <url>` instead of `--data`) and reads the bound address from the first line of
/// its stdout. With `key`, it also writes a config file holding that one `[[api_key]]` (mode
/// 0600, in the temp dir), adds `--config <file>`, and checks once ready that the server
/// refuses a request without the key.
pub async fn start_gapguard(bin: &Path, base: &Path, key: Option<&ApiKey>, backend: Option<&str>) -> Result<Server> {
    start_gapguard_with(bin, base, key, backend, "", &[], &[]).await
}

/// As [`start_gapguard`], with `config_toml` added to its config file (if not empty), `args`
/// after `serve`, and `env` in its environment.
pub async fn start_gapguard_with(
    bin: &Path,
    base: &Path,
    key: Option<&ApiKey>,
    backend: Option<&str>,
    config_toml: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Result<Server> {
    let dir = temp_dir(base, "gapguard")?;
    let log = dir.path().join("gapguard.log");
    let stderr = append(&log)?;
    let mut cmd = Command::new(bin);
    cmd.arg("serve");
    match backend {
        Some(url) => {
            cmd.arg("--backend").arg(url);
        }
        None => {
            let data = dir.path().join("data");
            std::fs::create_dir(&data)?;
            cmd.arg("--data").arg(&data);
        }
    }
    cmd.args(["--listen", "127.0.0.1:0"]).args(args).envs(env.iter().copied());
    if key.is_some() || !config_toml.is_empty() {
        let config = dir.path().join("gapguard.toml");
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&config)
            .with_context(|| format!("creating {}", config.display()))?;
        // Top-level keys first: the key's config ends in an [[api_key]] table.
        let text = format!("{config_toml}\n{}", key.map(ApiKey::config_toml).unwrap_or_default());
        file.write_all(text.as_bytes()).with_context(|| format!("writing {}", config.display()))?;
        cmd.arg("--config").arg(&config);
    }
    let mut child =
        spawn(cmd.stdout(Stdio::piped()).stderr(stderr)).with_context(|| format!("starting {}", bin.display()))?;

    // A thread hands over the first stdout line, then appends the rest to the log so
    // that the child never blocks on a full pipe.
    let stdout = child.stdout.take().context("gapguard stdout")?;
    let mut rest = append(&log)?;
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut first = String::new();
        let read = reader.read_line(&mut first);
        let _ = first_tx.send(read.map(|_| first));
        let _ = std::io::copy(&mut reader, &mut rest);
    });

    let mut guard = ChildGuard { name: "gapguard", child, stop: Stop::Term, log };
    let first = match tokio::time::timeout(START_TIMEOUT, first_rx).await {
        Ok(Ok(Ok(line))) => line,
        _ => {
            guard.check_alive("start-up")?;
            bail!("gapguard printed no `listening on` line within {START_TIMEOUT:?}");
        }
    };
    let addr = match first.trim().strip_prefix("listening on ") {
        Some(addr) => addr.parse().with_context(|| format!("bad address in {first:?}"))?,
        None => {
            guard.check_alive("start-up")?;
            bail!("gapguard's first line was {first:?}, not `listening on 127.0.0.1:PORT`");
        }
    };
    let mut server = Server { addr, child: guard, _dir: dir };
    wait_ready(&mut server, crate::gapguard::Gapguard::probe).await?;
    if let Some(key) = key {
        crate::gapguard::Gapguard::check_auth(server.addr, key)
            .await
            .context("gapguard was started with an API key but does not enforce it")?;
    }
    Ok(server)
}

/// Starts a single-node etcd on three free loopback ports.
pub async fn start_etcd(bin: &Path, base: &Path) -> Result<Server> {
    let dir = temp_dir(base, "etcd")?;
    let [client, peer, metrics] = free_ports()?;
    let client_url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = dir.path().join("etcd.log");
    let out = append(&log)?;
    let child = spawn(
        Command::new(bin)
            .args(["--name", "bench", "--data-dir"])
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("bench={peer_url}")])
            .args(["--listen-metrics-urls", &format!("http://127.0.0.1:{metrics}")])
            .args(["--logger=zap", "--log-outputs=stderr"])
            .stdout(out.try_clone()?)
            .stderr(out),
    )
    .with_context(|| format!("starting {} (install it with `apt-get install -y etcd-server`)", bin.display()))?;
    let mut server = Server {
        addr: SocketAddr::from(([127, 0, 0, 1], client)),
        child: ChildGuard { name: "etcd", child, stop: Stop::Term, log },
        _dir: dir,
    };
    wait_ready(&mut server, crate::etcd::Etcd::probe).await?;
    Ok(server)
}

/// Starts Redis with a durable append-only file (`appendfsync always`) and no snapshots.
pub async fn start_redis(bin: &Path, base: &Path) -> Result<Server> {
    let dir = temp_dir(base, "redis")?;
    let [port] = free_ports()?;
    let log = dir.path().join("redis.log");
    // Redis appends to its log file too: start-up errors and its own log share the file.
    let out = append(&log)?;
    let child = spawn(
        Command::new(bin)
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--dir"])
            .arg(dir.path())
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .args(["--save", "", "--daemonize", "no", "--logfile"])
            .arg(&log)
            .stdout(out.try_clone()?)
            .stderr(out),
    )
    .with_context(|| format!("starting {} (install it with `apt-get install -y redis-server`)", bin.display()))?;
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut server =
        Server { addr, child: ChildGuard { name: "redis", child, stop: Stop::RedisShutdown(addr), log }, _dir: dir };
    wait_ready(&mut server, crate::redis::Redis::probe).await?;
    Ok(server)
}

/// Starts PostgreSQL 15 from `bin_dir`: `initdb` into a fresh temp dir, then `postgres` on a
/// free loopback port (its Unix socket in the temp dir), as the `postgres` user when the
/// bench runs as root (PostgreSQL refuses to run as root). `fsync` and `synchronous_commit`
/// stay on. Stopped with `pg_ctl -m fast stop`.
pub async fn start_postgres(bin_dir: &Path, base: &Path) -> Result<Server> {
    let postgres = bin_dir.join("postgres");
    let initdb = bin_dir.join("initdb");
    let pg_ctl = bin_dir.join("pg_ctl");
    for bin in [&postgres, &initdb, &pg_ctl] {
        if !bin.is_file() {
            bail!(
                "no {} (PostgreSQL 15): install it with `apt-get install -y postgresql`, pass \
                 --pg-bin DIR, or leave it out with --systems gapguard,etcd,redis",
                bin.display()
            );
        }
    }
    let user = postgres_user()?;
    let dir = temp_dir(base, "postgres")?;
    if let Some(user) = user {
        std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid))
            .with_context(|| format!("handing {} to the postgres user", dir.path().display()))?;
    }
    let data = dir.path().join("data");
    let log = dir.path().join("postgres.log");

    let out = append(&log)?;
    let mut cmd = tokio::process::Command::new(&initdb);
    cmd.arg("-D")
        .arg(&data)
        .args(["-U", crate::postgres::USER, "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    if let Some(user) = user {
        cmd.uid(user.uid).gid(user.gid);
    }
    let status = cmd.status().await.with_context(|| format!("running {}", initdb.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}; the postgres user must be able to reach {}); last lines of {}:\n{}",
            initdb.display(),
            base.display(),
            log.display(),
            tail(&log)
        );
    }

    let [port] = free_ports()?;
    let out = append(&log)?;
    let child = spawn_as(
        Command::new(&postgres)
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string()])
            .args(["-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", dir.path().display()))
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
            .current_dir(dir.path())
            .stdout(out.try_clone()?)
            .stderr(out),
        user,
    )
    .with_context(|| format!("starting {}", postgres.display()))?;
    let mut server = Server {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        child: ChildGuard { name: "postgres", child, stop: Stop::PgCtl { pg_ctl, data, user }, log },
        _dir: dir,
    };
    wait_ready(&mut server, crate::postgres::Postgres::probe).await?;
    Ok(server)
}

/// The `postgres` user to run PostgreSQL as when the bench runs as root; `None` otherwise
/// (then PostgreSQL runs as the bench's own user).
fn postgres_user() -> Result<Option<User>> {
    Ok(gapguard_testkit::postgres_user()?)
}

/// The first line `bin --version` prints, if it runs.
pub fn version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").stdin(Stdio::null()).stderr(Stdio::null()).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|line| line.trim().to_owned())
}

/// A temp dir in `base` that the PostgreSQL tools can write to: handed to the `postgres` user
/// when the bench runs as root.
pub fn postgres_temp_dir(base: &Path, name: &str) -> Result<TempDir> {
    let dir = temp_dir(base, name)?;
    if let Some(user) = postgres_user()? {
        std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid))
            .with_context(|| format!("handing {} to the postgres user", dir.path().display()))?;
    }
    Ok(dir)
}

/// Runs `bin` with `args` in `dir` to completion, as the `postgres` user when the bench runs
/// as root (like the other PostgreSQL binaries), and returns its stdout. Fails with the tail
/// of its stderr if it fails. Killed if the bench stops waiting (Ctrl-C).
pub async fn run_postgres_tool(bin: &Path, args: &[String], dir: &Path) -> Result<String> {
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(user) = postgres_user()? {
        cmd.uid(user.uid).gid(user.gid);
    }
    let out = cmd.output().await.with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = err.lines().collect();
        bail!("{} failed ({}):\n{}", bin.display(), out.status, lines[lines.len().saturating_sub(12)..].join("\n"));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether a process exists (and is not a zombie).
    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')))
    }

    #[test]
    fn stopping_a_wrapper_stops_what_it_started_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("server.pid");
        let log = dir.path().join("wrapper.log");
        // A wrapper that starts its "server" in the background and waits for it.
        let script = format!("sleep 600 & echo $! > {}; wait", pid_file.display());
        let child = spawn(Command::new("sh").args(["-c", &script])).unwrap();
        let guard = ChildGuard { name: "wrapper", child, stop: Stop::Term, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        let server: u32 = loop {
            if let Some(pid) = std::fs::read_to_string(&pid_file).ok().and_then(|s| s.trim().parse().ok()) {
                break pid;
            }
            assert!(Instant::now() < deadline, "the wrapper did not start its server");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(alive(server));
        drop(guard);
        let deadline = Instant::now() + Duration::from_secs(10);
        while alive(server) {
            assert!(Instant::now() < deadline, "the wrapper's server {server} outlived the wrapper");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
