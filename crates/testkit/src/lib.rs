//! Test support shared by gapguard's test suites: [`Postgres`], a real PostgreSQL 15 server
//! started by the test itself (initdb into a temp dir, a free loopback port), stopped when
//! dropped.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root the server runs as the
//! `postgres` user (the Debian package creates it). The binaries are looked up in
//! `GAPGUARD_PG_BIN`, else `/usr/lib/postgresql/15/bin`; a missing binary fails the test with
//! the command that installs it.

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where Debian's PostgreSQL 15 keeps its server binaries.
pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A user id and its primary group id, to run a child process as.
#[derive(Clone, Copy, Debug)]
pub struct User {
    /// User id.
    pub uid: libc::uid_t,
    /// Its primary group id.
    pub gid: libc::gid_t,
}

/// A running PostgreSQL server in a temp dir. Dropping it stops the server (fast shutdown)
/// and removes the directory.
pub struct Postgres {
    child: Option<Child>,
    bin: PathBuf,
    data: PathBuf,
    user: Option<User>,
    port: u16,
    dir: tempfile::TempDir,
}

impl Postgres {
    /// Initializes a cluster in a fresh temp dir and starts it on a free loopback port, with
    /// `fsync` and `synchronous_commit` on (the defaults), trust authentication for the
    /// superuser `postgres`. Panics with an actionable message when PostgreSQL is missing.
    pub fn start() -> Self {
        let bin = std::env::var_os("GAPGUARD_PG_BIN").map(PathBuf::from).unwrap_or_else(|| DEFAULT_PG_BIN.into());
        for name in ["initdb", "postgres", "pg_ctl"] {
            assert!(
                bin.join(name).is_file(),
                "PostgreSQL 15 is needed for this test and {} is missing: install it with \
                 `apt-get install -y postgresql` (or set GAPGUARD_PG_BIN to its bin directory)",
                bin.join(name).display()
            );
        }
        let user = postgres_user().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::Builder::new().prefix("gapguard-pg-").tempdir().expect("temp dir for PostgreSQL");
        if let Some(user) = user {
            std::os::unix::fs::chown(dir.path(), Some(user.uid), Some(user.gid))
                .expect("hand the temp dir to postgres");
        }
        let data = dir.path().join("data");
        let mut initdb = Command::new(bin.join("initdb"));
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync"])
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(user) = user {
            initdb.uid(user.uid).gid(user.gid);
        }
        let out = initdb.output().expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let mut server = Self { child: None, bin, data, user, port, dir };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("open the PostgreSQL log");
        let mut cmd = Command::new(self.bin.join("postgres"));
        cmd.arg("-D")
            .arg(&self.data)
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", self.dir.path().display()))
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on", "-c", "max_connections=200"])
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log);
        self.child = Some(spawn_as(&mut cmd, self.user).expect("start postgres"));
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("postgres exited during start-up ({status}); log:\n{}", self.log_tail());
            }
            let ready = Command::new(self.bin.join("pg_isready"))
                .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-q"])
                .status()
                .is_ok_and(|s| s.success());
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "postgres not ready after 30 s; log:\n{}", self.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The loopback port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A connection URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a database and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url(name)
    }

    /// Runs one SQL command with `psql` and returns its unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", database])
            .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .or_else(|_| {
                Command::new("psql")
                    .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", database])
                    .args(["-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
                    .output()
            })
            .expect("run psql (apt-get install -y postgresql-client)");
        assert!(out.status.success(), "psql {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Stops the server (fast shutdown: open connections are cut, committed data stays).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else { return };
        // SAFETY: kill with a valid pid and signal number has no memory effects.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Starts it again on the same data directory and port, after [`Postgres::stop`].
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.log_path()) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data
    }
}

/// The process's shared server (see [`Postgres::per_process`]).
static PER_PROCESS: std::sync::OnceLock<std::sync::Mutex<Postgres>> = std::sync::OnceLock::new();

/// Stops the process's shared server and removes its directory, at process exit: statics
/// are never dropped, and each test process that used one left its directory (about 90 MB)
/// behind until the disk filled.
extern "C" fn remove_per_process() {
    if let Some(pg) = PER_PROCESS.get() {
        let mut pg = pg.lock().unwrap_or_else(|e| e.into_inner());
        pg.stop();
        let _ = std::fs::remove_dir_all(pg.dir.path());
    }
}

impl Postgres {
    /// One server for the whole test process, started on first use from a thread that never
    /// ends (so the server, whose parent-death signal follows the thread that started it,
    /// lives as long as the process, not as the first test), stopped and its directory
    /// removed when the process exits.
    pub fn per_process() -> &'static std::sync::Mutex<Postgres> {
        PER_PROCESS.get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                tx.send(Postgres::start()).expect("hand over the server");
                loop {
                    std::thread::park();
                }
            });
            let pg = rx.recv().expect("PostgreSQL started");
            // SAFETY: registers a function without arguments that only touches the static
            // above; failing to register leaves the directory behind, as before.
            unsafe { libc::atexit(remove_per_process) };
            std::sync::Mutex::new(pg)
        })
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port that was free a moment ago (bound on 127.0.0.1:0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free loopback port").port()
}

/// Spawns `cmd` in its own process group, with stdin closed, as `user` when given, and
/// arranges for the kernel to SIGKILL the child if the process that started it dies without
/// stopping it (an aborted test, a killed bench). The parent-death signal follows the
/// *thread* that forked: spawn from a thread that outlives the child.
pub fn spawn_as(cmd: &mut Command, user: Option<User>) -> std::io::Result<Child> {
    let parent = std::process::id();
    cmd.stdin(Stdio::null()).process_group(0);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe calls
    // (setgroups, setgid, setuid, prctl, getppid, _exit) in the single-threaded child. The
    // user switch comes first because changing credentials clears the parent-death signal.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(user) = user {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(user.gid) != 0
                    || libc::setuid(user.uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The parent may have died before prctl: then nobody would stop us.
            if u32::try_from(libc::getppid()).ok() != Some(parent) {
                libc::_exit(1);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// The `postgres` user when running as root (PostgreSQL refuses to run as root); `None`
/// otherwise. `Err` when running as root without a `postgres` user.
pub fn postgres_user() -> Result<Option<User>, NoPostgresUser> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    // SAFETY: a zeroed passwd is a valid out-parameter (plain integers and null pointers).
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call, and `buf.len()` is the length of `buf`;
    // getpwnam_r writes only into `pwd` and `buf`, and `found` points at `pwd` or is null.
    let rc = unsafe { libc::getpwnam_r(c"postgres".as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return Err(NoPostgresUser);
    }
    Ok(Some(User { uid: pwd.pw_uid, gid: pwd.pw_gid }))
}

/// Running as root with no `postgres` user to run PostgreSQL as.
#[derive(Debug)]
pub struct NoPostgresUser;

impl std::fmt::Display for NoPostgresUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "running as root, which PostgreSQL refuses, and there is no `postgres` user to run it as \
             (`apt-get install -y postgresql` creates one)",
        )
    }
}

impl std::error::Error for NoPostgresUser {}

/// A child process killed (and reaped) when dropped, however the test ends.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The address a server started with `--listen 127.0.0.1:0` and a piped stdout prints on its
/// first line (`listening on ADDR`); panics with the line if it is something else.
pub fn listening_on(child: &mut Child) -> String {
    use std::io::BufRead as _;
    let stdout = child.stdout.take().expect("the server's stdout is piped");
    let mut first = String::new();
    std::io::BufReader::new(stdout).read_line(&mut first).expect("the server's first line");
    first.trim().strip_prefix("listening on ").unwrap_or_else(|| panic!("first line {first:?}")).to_owned()
}

/// Sends `request` (raw HTTP/1.1) on `stream` and reads one answer by its `Content-Length`:
/// the status, the headers (names lower-cased) and the body. For tests that need the bytes on
/// the wire exactly as written (a client library would normalise them).
pub fn http_exchange(stream: &mut std::net::TcpStream, request: &str) -> (u16, Vec<(String, String)>, String) {
    use std::io::{BufRead as _, Read as _, Write as _};
    stream.write_all(request.as_bytes()).expect("send");
    let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone the stream"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("status line");
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("status line {line:?}"));
    let mut headers = Vec::new();
    loop {
        line.clear();
        reader.read_line(&mut line).expect("header");
        let Some((name, value)) = line.trim_end().split_once(':') else { break };
        headers.push((name.to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length = headers.iter().find(|(n, _)| n == "content-length").map_or(0, |(_, v)| v.parse().expect("a length"));
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("body");
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}
