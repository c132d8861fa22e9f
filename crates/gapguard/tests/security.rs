//! TLS and limits under load against the real binary: HTTPS verified through a CA file (and
//! plain HTTP refused on the TLS port), clear start-up errors for bad PEM files, load shedding
//! past the in-flight bound (503 + `Retry-After`, `/healthz` still answering, every 200 applied
//! exactly once), slow clients cut off by the header read and request timeouts, and
//! `gapguard keys new` whose output the server accepts the key with.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gapguard_client::{Client, ClientError, RequestOptions, WatchMessage, WatchQuery};
use serde_json::{json, Value};
use support::{Http, Server};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// A CA, and a server certificate it signed for `localhost` and `127.0.0.1`, as PEM files in
/// `dir`: `ca.pem`, `cert.pem` (leaf then CA) and `key.pem`.
struct TestPki {
    ca: std::path::PathBuf,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

impl TestPki {
    fn create(dir: &Path) -> Self {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(DnType::CommonName, "gapguard test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();

        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf_params = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        leaf_params.distinguished_name.push(DnType::CommonName, "gapguard test server");
        let leaf = leaf_params.signed_by(&leaf_key, &ca_cert, &ca_key).unwrap();

        let pki = Self { ca: dir.join("ca.pem"), cert: dir.join("cert.pem"), key: dir.join("key.pem") };
        std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
        std::fs::write(&pki.cert, format!("{}{}", leaf.pem(), ca_cert.pem())).unwrap();
        std::fs::write(&pki.key, leaf_key.serialize_pem()).unwrap();
        pki
    }

    fn config(&self, extra: &str) -> String {
        format!("tls_cert = {}\ntls_key = {}\n{extra}", toml_path(&self.cert), toml_path(&self.key))
    }
}

/// A path as a TOML string (test paths are plain ASCII; JSON string syntax is TOML's too).
fn toml_path(path: &Path) -> String {
    serde_json::to_string(path.to_str().unwrap()).unwrap()
}

fn addr_of(server: &Server) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], server.port()))
}

/// Runs the CLI; returns (exit code, stdout, stderr).
fn cli(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_gapguard"))
        .args(args)
        .env_remove("GAPGUARD_URL")
        .env_remove("GAPGUARD_API_KEY")
        .env_remove("GAPGUARD_CA_FILE")
        .envs(env.iter().copied())
        .output()
        .expect("run the gapguard CLI");
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

/// Reads what the server sends until it closes the connection (or `limit` passes); returns
/// the bytes and whether it closed.
async fn read_until_closed(tcp: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (seen, true),
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return (seen, false),
        }
    }
}

/// The status code of a raw HTTP/1.1 response.
fn status_of(response: &[u8]) -> Option<u16> {
    let text = String::from_utf8_lossy(response);
    text.strip_prefix("HTTP/1.1 ")?.get(..3)?.parse().ok()
}

/// The JSON body of a raw HTTP/1.1 response (`Connection: close`, not chunked).
fn body_of(response: &[u8]) -> Value {
    let text = String::from_utf8_lossy(response);
    let body = text.split_once("\r\n\r\n").map_or("", |(_, body)| body);
    serde_json::from_str(body).unwrap_or(Value::Null)
}

#[tokio::test]
async fn tls_serves_https_verified_by_the_ca_file_and_refuses_plain_http() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let server = Server::start_tls(&dir.path().join("data"), &pki.config("header_read_timeout_ms = 500\n"));
    assert!(server.url.starts_with("https://127.0.0.1:"), "{}", server.url);

    // The Rust client verifies the server's certificate against the test CA.
    let ca_pem = std::fs::read(&pki.ca).unwrap();
    let client = Client::builder(&server.url).ca_pem(ca_pem.clone()).build().unwrap();
    assert_eq!(client.health().await.unwrap().status, "ok");
    client.put("tls", "k", &json!(1), &RequestOptions::new()).await.unwrap();
    assert_eq!(client.get("tls", "k").await.unwrap().value, json!(1));
    let by_name = Client::builder(&format!("https://localhost:{}", server.port())).ca_file(&pki.ca).build().unwrap();
    assert_eq!(by_name.get("tls", "k").await.unwrap().value, json!(1), "the certificate names localhost too");

    // Without the CA (the built-in public roots only), the certificate is not trusted.
    let untrusting = Client::new(&server.url).unwrap();
    let err = untrusting.health().await.unwrap_err();
    assert!(matches!(err, ClientError::Transport { .. }), "{err:?}");
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");

    // Plain HTTP to the TLS port is answered 400 in clear text, and never served.
    let plain = Http::with_client(reqwest::Client::new(), &format!("http://127.0.0.1:{}", server.port()));
    let reply = plain.put("/v1/ns/tls/kv/k", json!({"value": 2})).await;
    assert_eq!(reply.status, 400, "{reply:?}");
    assert_eq!(reply.body["error"], "invalid_request", "{reply:?}");
    assert!(reply.body["message"].as_str().unwrap().contains("https://"), "{reply:?}");
    assert_eq!(plain.get("/healthz").await.status, 400);
    assert_eq!(client.get("tls", "k").await.unwrap().value, json!(1), "the plain-HTTP put took no effect");

    // A connection that never starts the handshake is closed after the header read timeout.
    let mut silent = TcpStream::connect(addr_of(&server)).await.unwrap();
    let started = Instant::now();
    let (bytes, closed) = read_until_closed(&mut silent, Duration::from_secs(10)).await;
    assert!(closed && bytes.is_empty(), "closed {closed}, got {bytes:?}");
    assert!(started.elapsed() >= Duration::from_millis(400), "closed after {:?}", started.elapsed());

    // The CLI: --ca-file or GAPGUARD_CA_FILE; without it, a certificate error and exit 1.
    let ca_file = pki.ca.to_str().unwrap();
    let (code, stdout, stderr) = cli(&["--url", &server.url, "--ca-file", ca_file, "kv", "get", "tls", "k"], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["value"], json!(1));
    let (code, _, stderr) = cli(&["--url", &server.url, "health"], &[("GAPGUARD_CA_FILE", ca_file)]);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = cli(&["--url", &server.url, "health"], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("certificate") && stderr.contains("--ca-file"), "{stderr}");
    let (code, _, stderr) = cli(&["--url", &server.url, "--ca-file", "/nonexistent/ca.pem", "health"], &[]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("/nonexistent/ca.pem"), "{stderr}");

    // And the other way round: https:// to a plain-HTTP server says so.
    let plain_server = Server::start(&dir.path().join("plain-data"));
    let https_to_plain = plain_server.url.replacen("http://", "https://", 1);
    let (code, _, stderr) = cli(&["--url", &https_to_plain, "--ca-file", ca_file, "health"], &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("use an http:// URL"), "{stderr}");
}

#[test]
fn bad_tls_files_stop_the_start_with_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let data = dir.path().join("data");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let config = |cert: &Path, key: &Path| format!("tls_cert = {}\ntls_key = {}\n", toml_path(cert), toml_path(key));

    let missing = dir.path().join("missing.pem");
    let stderr = Server::refused_start(&data, &config(&missing, &pki.key));
    assert!(stderr.contains("TLS certificate") && stderr.contains("missing.pem"), "{stderr}");
    assert!(stderr.contains("cannot read"), "{stderr}");

    let not_pem = write("not-pem.pem", "hello, I am not a certificate\n");
    let stderr = Server::refused_start(&data, &config(&not_pem, &pki.key));
    assert!(stderr.contains("not-pem.pem") && stderr.contains("BEGIN CERTIFICATE"), "{stderr}");

    // Certificate and key swapped.
    let stderr = Server::refused_start(&data, &config(&pki.key, &pki.cert));
    assert!(stderr.contains("key.pem") && stderr.contains("BEGIN CERTIFICATE"), "{stderr}");

    let other_key = write("other-key.pem", &rcgen::KeyPair::generate().unwrap().serialize_pem());
    let stderr = Server::refused_start(&data, &config(&pki.cert, &other_key));
    assert!(stderr.contains("TLS key") && stderr.contains("other-key.pem"), "{stderr}");

    assert!(!data.join("gapguard.redb").exists(), "the store is not opened before the TLS files are checked");
}

/// An act adding 1 to `counter`.
fn add_one() -> Value {
    json!({"ops": [{"add": {"key": "counter", "by": 1}}]})
}

/// An act sent over raw TCP whose body stops halfway: it holds an in-flight slot until
/// [`SlowAct::finish`].
struct SlowAct {
    tcp: TcpStream,
    rest: Vec<u8>,
}

impl SlowAct {
    async fn start(addr: SocketAddr) -> Self {
        let body = add_one().to_string().into_bytes();
        let head = format!(
            "POST /v1/ns/load/act HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n\
             connection: close\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let half = body.len() / 2;
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(&body[..half]).await.unwrap();
        Self { tcp, rest: body[half..].to_vec() }
    }

    async fn finish(mut self) -> u16 {
        self.tcp.write_all(&self.rest).await.unwrap();
        let (response, closed) = read_until_closed(&mut self.tcp, Duration::from_secs(30)).await;
        assert!(closed, "no complete answer: {:?}", String::from_utf8_lossy(&response));
        status_of(&response).unwrap_or_else(|| panic!("not HTTP: {:?}", String::from_utf8_lossy(&response)))
    }
}

/// Polls `/healthz` every 20 ms until `stop`; returns every status seen.
fn poll_health(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut statuses = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let reply = client.get(format!("{url}/healthz")).timeout(Duration::from_secs(5)).send().await;
            statuses.push(reply.map_or(0, |r| r.status().as_u16()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        statuses
    })
}

/// Sends `n` acts at once (released together); returns each reply's status, `Retry-After` and
/// error code.
async fn burst(url: &str, n: usize) -> Vec<(u16, Option<String>, Value)> {
    let client = reqwest::Client::new();
    let start = Arc::new(tokio::sync::Barrier::new(n));
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (client, start, url) = (client.clone(), Arc::clone(&start), format!("{url}/v1/ns/load/act"));
            tokio::spawn(async move {
                start.wait().await;
                let reply = client.post(url).json(&add_one()).timeout(Duration::from_secs(30)).send().await.unwrap();
                let status = reply.status().as_u16();
                let retry = reply.headers().get("retry-after").map(|v| v.to_str().unwrap().to_owned());
                let body: Value = reply.json().await.unwrap_or(Value::Null);
                (status, retry, body["error"].clone())
            })
        })
        .collect();
    let mut replies = Vec::with_capacity(n);
    for task in tasks {
        replies.push(task.await.unwrap());
    }
    replies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn past_the_in_flight_bound_requests_get_503_healthz_answers_and_each_200_applies_once() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(&dir.path().join("data"), "max_in_flight = 4\n");
    let http = Http::new(&server);
    let stop_polling = Arc::new(AtomicBool::new(false));
    let health = poll_health(server.url.clone(), Arc::clone(&stop_polling));

    // Four acts whose bodies stall hold every slot: what comes next is shed, at once.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(SlowAct::start(addr_of(&server)).await);
    }
    // Generous: on a loaded CI machine the stalled requests can take a while to be read.
    let deadline = Instant::now() + Duration::from_secs(30);
    // The probe takes a slot while it runs, and would shed a stalled act that arrives during
    // it: let the acts arrive first, and probe with a route that does no storage work (a read
    // over PostgreSQL waits for the database, and would hold its slot longer).
    tokio::time::sleep(Duration::from_millis(300)).await;
    while http.get("/v1/slo").await.status != 503 {
        assert!(Instant::now() < deadline, "the four stalled acts never filled the in-flight bound");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let shed = burst(&server.url, 100).await;
    for (status, retry, code) in &shed {
        assert_eq!((*status, retry.as_deref(), code.as_str()), (503, Some("1"), Some("unavailable")));
    }
    assert!(started.elapsed() < Duration::from_secs(10), "shedding took {:?}: a queue?", started.elapsed());
    assert_eq!(http.get("/healthz").await.status, 200, "/healthz is exempt from the bound");

    let mut n_ok = 0;
    for act in held {
        assert_eq!(act.finish().await, 200, "a stalled act completes once its body arrives");
        n_ok += 1;
    }

    // 200 acts at once: each is applied or shed, never failed; the counter counts the 200s.
    let replies = burst(&server.url, 200).await;
    stop_polling.store(true, Ordering::Relaxed);
    let mut n_shed = 0;
    for (status, retry, code) in &replies {
        match status {
            200 => n_ok += 1,
            503 => {
                assert_eq!((retry.as_deref(), code.as_str()), (Some("1"), Some("unavailable")));
                n_shed += 1;
            }
            other => panic!("status {other} ({code}) under load"),
        }
    }
    eprintln!("200 acts at once against max_in_flight = 4: {} applied, {n_shed} shed", 200 - n_shed);
    let counter = http.get("/v1/ns/load/kv/counter").await;
    assert_eq!(counter.status, 200, "{counter:?}");
    assert_eq!(counter.body["value"], json!(n_ok), "every 200 applied exactly once, nothing else applied");

    let health = health.await.unwrap();
    assert!(health.len() >= 3, "polled /healthz {} times", health.len());
    assert!(health.iter().all(|s| *s == 200), "/healthz under load: {health:?}");
}

#[tokio::test]
async fn a_client_stalling_mid_headers_is_disconnected_after_the_header_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(&dir.path().join("data"), "header_read_timeout_ms = 300\n");

    let mut slowloris = TcpStream::connect(addr_of(&server)).await.unwrap();
    slowloris.write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\nx-slow: ").await.unwrap();
    let started = Instant::now();
    let (bytes, closed) = read_until_closed(&mut slowloris, Duration::from_secs(10)).await;
    let after = started.elapsed();
    assert!(closed, "still open after 10 s");
    assert!(after >= Duration::from_millis(250) && after < Duration::from_secs(5), "closed after {after:?}");
    assert_ne!(status_of(&bytes), Some(200), "the half-sent request was not served");

    // A connection that sends nothing at all is closed the same way.
    let mut idle = TcpStream::connect(addr_of(&server)).await.unwrap();
    let (bytes, closed) = read_until_closed(&mut idle, Duration::from_secs(10)).await;
    assert!(closed && bytes.is_empty(), "closed {closed}, got {bytes:?}");

    // A client that sends its headers in time is served.
    assert_eq!(Http::new(&server).get("/healthz").await.status, 200);
}

#[tokio::test]
async fn a_stalled_body_gets_408_after_the_request_timeout_and_a_watch_outlives_it() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(&dir.path().join("data"), "request_timeout_ms = 500\n");
    let client = Client::new(&server.url).unwrap();
    let mut watch = client.watch("load", &WatchQuery::default()).await.unwrap();

    let stalled = SlowAct::start(addr_of(&server)).await;
    let mut tcp = stalled.tcp;
    let started = Instant::now();
    let (response, closed) = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
    assert!(closed, "no answer within 10 s");
    assert!(started.elapsed() >= Duration::from_millis(400), "answered after {:?}", started.elapsed());
    assert_eq!(status_of(&response), Some(408), "{:?}", String::from_utf8_lossy(&response));
    assert_eq!(body_of(&response)["error"], "request_timeout");
    let counter = client.get("load", "counter").await.unwrap_err();
    assert_eq!(counter.code(), Some("not_found"), "the stalled act did nothing");

    // The watch opened before is past the request timeout and still delivers.
    tokio::time::sleep(Duration::from_millis(700)).await;
    client.put("load", "after", &json!(true), &RequestOptions::new()).await.unwrap();
    let message = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.expect("a change within 5 s");
    let Some(Ok(WatchMessage::Change(change))) = message else { panic!("not a change: {message:?}") };
    assert_eq!(change.key, "after");
}

#[tokio::test]
async fn keys_new_prints_a_secret_and_a_config_block_the_server_accepts_it_with() {
    let (code, stdout, stderr) =
        cli(&["keys", "new", "--id", "checkout-svc", "--namespaces", "shop,cart", "--role", "write"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let mut lines = stdout.lines().filter(|line| !line.starts_with('#') && !line.is_empty());
    let secret = lines.next().expect("the secret").to_owned();
    let block: String = lines.map(|line| format!("{line}\n")).collect();
    assert!(block.starts_with("[[api_key]]\nid = \"checkout-svc\"\nsecret_sha256 = \""), "{block}");
    assert!(block.ends_with("namespaces = [\"shop\", \"cart\"]\nrole = \"write\"\n"), "{block}");
    assert!(!block.contains(&secret), "the config holds the hash, never the secret");
    let (_, again, _) = cli(&["keys", "new", "--id", "x", "--namespaces", "shop", "--role", "read"], &[]);
    assert!(!again.contains(&secret), "every secret is new");

    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(&dir.path().join("data"), &block);
    let with_key = Client::builder(&server.url).api_key(&secret).build().unwrap();
    with_key.put("shop", "k", &json!(1), &RequestOptions::new()).await.unwrap();
    let wrong_key = Client::builder(&server.url).api_key(format!("{secret}x")).build().unwrap();
    assert_eq!(wrong_key.get("shop", "k").await.unwrap_err().status(), Some(401));
    let (code, stdout, stderr) =
        cli(&["--url", &server.url, "kv", "get", "shop", "k"], &[("GAPGUARD_API_KEY", &secret)]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["value"], json!(1));
}
