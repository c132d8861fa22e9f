//! Test support: start the real `gapguard` binary on a free loopback port, talk HTTP to it,
//! kill it (gracefully or with SIGKILL) and restart it on the same data directory.

#![allow(dead_code)] // each test binary uses a different part

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A running `gapguard serve`.
pub struct Server {
    child: Child,
    /// `http://127.0.0.1:PORT` (`https://` when started with [`Server::start_tls`]).
    pub url: String,
    /// Its data directory.
    pub data: PathBuf,
    /// The config file written by [`Server::start_with_config`], deleted with the server.
    config: Option<tempfile::TempPath>,
}

impl Server {
    /// Starts the binary on `data` and waits for its `listening on` line.
    pub fn start(data: &Path) -> Self {
        Self::start_with(data, &[])
    }

    /// Starts it with extra arguments after `serve`. With `GAPGUARD_TEST_BACKEND=postgres` in
    /// the environment, the server runs over PostgreSQL instead ([`backend_for`]): the same
    /// tests, the other backend.
    pub fn start_with(data: &Path, extra: &[&str]) -> Self {
        let store_args: Vec<std::ffi::OsString> = match backend_for(data) {
            Some(url) => vec!["--backend".into(), url.into()],
            None => vec!["--data".into(), data.into()],
        };
        Self::spawn(store_args.iter().map(|a| a.as_os_str()).chain(extra.iter().map(OsStr::new)), data)
    }

    /// Starts the binary as a node over the PostgreSQL database at `url` (no data directory).
    pub fn start_backend(url: &str) -> Self {
        Self::spawn(["--backend", url].map(OsStr::new), Path::new(""))
    }

    /// Runs `gapguard serve --listen 127.0.0.1:0 ARGS…` and waits for its `listening on` line.
    fn spawn<'a>(args: impl IntoIterator<Item = &'a OsStr>, data: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_gapguard"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the gapguard binary");
        let stdout = child.stdout.take().expect("stdout piped");
        let mut first = String::new();
        BufReader::new(stdout).read_line(&mut first).expect("read the first stdout line");
        let addr = first
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("first stdout line was {first:?}, expected `listening on ADDR`"))
            .to_owned();
        Self { child, url: format!("http://{addr}"), data: data.to_owned(), config: None }
    }

    /// Starts the binary with `config_toml` as its `--config` file (a temporary file); the
    /// flags still pick a free loopback port and `data`.
    pub fn start_with_config(data: &Path, config_toml: &str) -> Self {
        let config = write_config(config_toml);
        let mut server = Self::start_with(data, &["--config", config.to_str().expect("a UTF-8 temp path")]);
        server.config = Some(config);
        server
    }

    /// As [`Server::start_with_config`], for a config that sets `tls_cert` and `tls_key`: the
    /// URL is `https://127.0.0.1:PORT` (the test certificate names that IP address).
    pub fn start_tls(data: &Path, config_toml: &str) -> Self {
        let mut server = Self::start_with_config(data, config_toml);
        server.url = server.url.replacen("http://", "https://", 1);
        server
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("a port in the URL")
    }

    /// Runs `gapguard serve` with `config_toml`, expecting it to refuse to start: returns its
    /// stderr once it exited non-zero (panics if it starts serving or takes over 30 s).
    pub fn refused_start(data: &Path, config_toml: &str) -> String {
        let config = write_config(config_toml);
        let args = [OsStr::new("--data"), data.as_os_str(), OsStr::new("--config"), config.as_os_str()];
        let (code, stderr) = Self::refused_start_with_code(&args);
        // A configuration refused is a usage error, whatever part of it.
        assert_eq!(code, Some(2), "{stderr}");
        stderr
    }

    /// Runs `gapguard serve --listen 127.0.0.1:0 ARGS…`, expecting it to refuse to start:
    /// returns its stderr once it exited non-zero (panics if it starts serving or takes over
    /// 30 s).
    pub fn refused_start_with(args: &[&OsStr]) -> String {
        Self::refused_start_with_code(args).1
    }

    /// [`Server::refused_start_with`], with the exit code.
    pub fn refused_start_with_code(args: &[&OsStr]) -> (Option<i32>, String) {
        let child = Command::new(env!("CARGO_BIN_EXE_gapguard"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the gapguard binary");
        let pid = child.id();
        let (done, outcome) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(child.wait_with_output());
        });
        let Ok(output) = outcome.recv_timeout(Duration::from_secs(30)) else {
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("gapguard serve neither started nor exited within 30 s");
        };
        let output = output.expect("wait for gapguard serve");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(!output.status.success(), "gapguard serve started: stdout {stdout:?}");
        assert!(!stdout.contains("listening on"), "gapguard serve listened: {stdout:?}");
        (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill9(mut self) {
        self.child.kill().expect("kill -9");
        self.child.wait().expect("reap");
    }

    /// SIGTERM, then waits for the process to exit; panics if it takes longer than `limit`.
    pub fn terminate_within(mut self, limit: Duration) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().expect("run kill");
        assert!(sent.success(), "kill -TERM {pid} failed");
        let deadline = std::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(std::time::Instant::now() < deadline, "the server did not stop within {limit:?} of SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server hard and starts it again on the same data directory.
    pub fn crash_and_restart(self) -> Self {
        let data = self.data.clone();
        self.kill9();
        Self::start(&data)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The PostgreSQL database standing for the data directory `data` when the tests run against
/// the PostgreSQL backend (`GAPGUARD_TEST_BACKEND=postgres`): one PostgreSQL per test process
/// ([`gapguard_testkit::Postgres::per_process`]), and one database per data directory, so that
/// a restart "on the same data directory" finds the same state. `None` for the embedded
/// backend (the default).
pub fn backend_for(data: &Path) -> Option<String> {
    match std::env::var("GAPGUARD_TEST_BACKEND").as_deref() {
        Err(_) | Ok("") | Ok("embedded") => return None,
        Ok("postgres") => {}
        Ok(other) => panic!("GAPGUARD_TEST_BACKEND={other:?}: use `embedded` or `postgres`"),
    }
    let pg = gapguard_testkit::Postgres::per_process().lock().unwrap_or_else(|e| e.into_inner());
    let name = format!("gg_{:016x}", {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        data.hash(&mut h);
        h.finish()
    });
    let exists = pg.psql("postgres", &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"));
    if exists.is_empty() {
        pg.create_database(&name);
    }
    Some(pg.url(&name))
}

/// Writes a config file that lives as long as the returned path.
fn write_config(config_toml: &str) -> tempfile::TempPath {
    use std::io::Write as _;
    let mut file = tempfile::Builder::new().suffix(".toml").tempfile().expect("create a temp config file");
    file.write_all(config_toml.as_bytes()).expect("write the config file");
    file.into_temp_path()
}

/// A response as a test sees it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Minimal HTTP helper for black-box tests that need to see statuses and headers exactly.
pub struct Http {
    client: reqwest::Client,
    base: String,
    /// Report a failed connection as status 0 instead of panicking (crash tests).
    tolerant: bool,
}

impl Http {
    pub fn new(server: &Server) -> Self {
        Self { client: reqwest::Client::new(), base: server.url.clone(), tolerant: false }
    }

    /// A helper that sends with `client` (e.g. one that trusts a test CA) to `base`.
    pub fn with_client(client: reqwest::Client, base: &str) -> Self {
        Self { client, base: base.to_owned(), tolerant: false }
    }

    /// Connection failures become `status: 0` replies.
    pub fn tolerant(mut self) -> Self {
        self.tolerant = true;
        self
    }

    pub async fn send(&self, method: &str, path: &str, body: Option<&Value>, headers: &[(&str, &str)]) -> Reply {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.client.request(method, format!("{}{path}", self.base)).timeout(Duration::from_secs(30));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body.to_string());
        }
        let failed = || Reply { status: 0, headers: Default::default(), body: Value::Null };
        let response = match req.send().await {
            Ok(r) => r,
            Err(e) if self.tolerant => {
                let _ = e;
                return failed();
            }
            Err(e) => panic!("request to {path} failed: {e}"),
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = match response.bytes().await {
            Ok(b) => b,
            Err(_) if self.tolerant => return failed(),
            Err(e) => panic!("reading the body of {path} failed: {e}"),
        };
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Reply { status, headers, body }
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send("GET", path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: Value) -> Reply {
        self.send("POST", path, Some(&body), &[]).await
    }

    pub async fn put(&self, path: &str, body: Value) -> Reply {
        self.send("PUT", path, Some(&body), &[]).await
    }
}

/// Reads SSE `change` events until `n` arrived (or the deadline passes).
pub async fn sse_events(url: &str, n: usize) -> Vec<(Option<u64>, Value)> {
    sse_events_with(url, &[], n).await
}

/// [`sse_events`], the request sent with `headers`.
pub async fn sse_events_with(url: &str, headers: &[(&str, &str)], n: usize) -> Vec<(Option<u64>, Value)> {
    let mut request = reqwest::Client::new().get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let mut response = request.send().await.unwrap();
    assert_eq!(response.status(), 200);
    let (mut buf, mut events) = (String::new(), Vec::new());
    let deadline = Instant::now() + Duration::from_secs(10);
    while events.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let chunk =
            tokio::time::timeout(left, response.chunk()).await.expect("events in time").unwrap().expect("open stream");
        buf.push_str(std::str::from_utf8(&chunk).unwrap());
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut data, mut name) = (None, None, None);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().parse().ok();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data = Some(serde_json::from_str::<Value>(v.trim()).unwrap());
                } else if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_owned());
                }
            }
            if let Some(data) = data {
                events.push((id, json!({"event": name, "data": data})));
            }
        }
    }
    events
}

/// `clients` tasks, spread round-robin over `servers`, each reserving one unit of the pool
/// `ns/pool` and committing it, until the pool answers `insufficient` (with nothing
/// available): returns the commits made, all clients together.
pub async fn reserve_and_commit_until_full(
    servers: &[std::sync::Arc<Http>],
    ns: &str,
    pool: &str,
    clients: usize,
) -> u64 {
    let tasks: Vec<_> = (0..clients)
        .map(|i| {
            let http = servers[i % servers.len()].clone();
            let reserve = format!("/v1/ns/{ns}/pools/{pool}/reserve");
            let ns = ns.to_owned();
            tokio::spawn(async move {
                let mut committed = 0;
                loop {
                    let r = http.post(&reserve, json!({"amount": 1, "ttl_ms": 30000, "context": {"vm": i}})).await;
                    match (r.status, r.body["error"].as_str()) {
                        (200, _) => {}
                        (409, Some("insufficient")) => {
                            assert_eq!(r.body["available"], 0);
                            return committed;
                        }
                        other => panic!("reserve answered {other:?}: {:?}", r.body),
                    }
                    let id = r.body["reservation"].as_str().unwrap();
                    let c = http.send("POST", &format!("/v1/ns/{ns}/reservations/{id}/commit"), None, &[]).await;
                    assert_eq!(c.status, 200, "{:?}", c.body);
                    committed += 1;
                }
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap();
    }
    total
}
