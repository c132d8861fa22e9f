//! Connections are bounded: past `max_connections` a new connection is answered `503` and
//! closed while those open carry on; by default the bound sits below the open-file limit, so
//! that a flood of idle connections cannot take the store's file descriptors (it used to stop
//! every write until a restart).

mod support;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::Duration;

use gapguard_testkit::{http_exchange, listening_on, KillOnDrop};
use support::Server;

/// One request on `stream` (keep-alive); the status and the body.
fn exchange(stream: &mut TcpStream, method: &str, path: &str, body: &str) -> (u16, String) {
    let request = format!("{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n{body}", body.len());
    let (status, _, body) = http_exchange(stream, &request);
    (status, body)
}

/// Everything the server sends on a fresh connection before closing it (or within 5 s), after
/// `request` is sent (if not empty).
fn greeting(addr: &str, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.write_all(request.as_bytes()).expect("send");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn past_max_connections_a_new_connection_gets_503_and_those_open_carry_on() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(&dir.path().join("data"), "max_connections = 4\n");
    let addr = server.url.trim_start_matches("http://").to_owned();
    let mut open: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&addr).expect("connect")).collect();
    // Each is accepted (and counted) once it has served a request.
    for (i, stream) in open.iter_mut().enumerate() {
        assert_eq!(exchange(stream, "PUT", &format!("/v1/ns/c/kv/k{i}"), r#"{"value":1}"#).0, 200);
    }
    // Whether the client said nothing yet or sent its whole request (left unread, which must
    // not reset the connection before the answer is read), it reads the 503.
    let put = "PUT /v1/ns/c/kv/late HTTP/1.1\r\nhost: x\r\ncontent-length: 11\r\n\r\n{\"value\":1}";
    for request in ["", put] {
        let refused = greeting(&addr, request);
        assert!(refused.starts_with("HTTP/1.1 503"), "{request:?}: {refused:?}");
        assert!(refused.contains("retry-after: 1") && refused.contains("max_connections"), "{refused:?}");
    }
    // Those open are served as before.
    assert_eq!(exchange(&mut open[0], "GET", "/v1/ns/c/kv/k0", "").0, 200);
    assert_eq!(exchange(&mut open[0], "GET", "/v1/ns/c/kv/late", "").0, 404, "the refused put did nothing");
    // One closes: a new connection takes its place (once the server has seen it close).
    drop(open.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if greeting(&addr, "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").starts_with("HTTP/1.1 200")
        {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the closed connection's place was not given back");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `gapguard serve` on `data` with `extra` arguments, under a hard (and soft) limit of
/// `nofile` open files (the server raises its soft limit to the hard one); the server, and the
/// address it listens on.
fn start_limited(nofile: u32, data: &std::path::Path, extra: &[&std::ffi::OsStr]) -> (KillOnDrop, String) {
    let mut child = Command::new("prlimit")
        .arg(format!("--nofile={nofile}:{nofile}"))
        .arg(env!("CARGO_BIN_EXE_gapguard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data"])
        .arg(data)
        .args(extra)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run prlimit (util-linux) with gapguard serve");
    let addr = listening_on(&mut child);
    (KillOnDrop(child), addr)
}

#[test]
fn a_flood_of_idle_connections_at_the_open_file_limit_stops_no_write() {
    let dir = tempfile::tempdir().unwrap();
    let (_server, addr) = start_limited(256, dir.path(), &[]);

    // A client that was there before the flood keeps writing through it.
    let mut writer = TcpStream::connect(&addr).expect("connect");
    assert_eq!(exchange(&mut writer, "PUT", "/v1/ns/f/kv/w", r#"{"value":0}"#).0, 200);
    let flood: Vec<TcpStream> = (0..400).filter_map(|_| TcpStream::connect(&addr).ok()).collect();
    assert!(flood.len() > 300, "the flood connected {} times", flood.len());
    for i in 1..=20 {
        let (status, body) = exchange(&mut writer, "PUT", "/v1/ns/f/kv/w", &format!(r#"{{"value":{i}}}"#));
        assert_eq!(status, 200, "put {i} during the flood: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Past the bound, the flood was answered and closed rather than left holding descriptors.
    let refused = greeting(&addr, "");
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused:?}");
    drop(flood);
    std::thread::sleep(Duration::from_millis(1500));
    // Checkpoints ran through it all: the store is sound, writes and fresh connections too.
    let mut fresh = TcpStream::connect(&addr).expect("connect");
    let (status, body) = exchange(&mut fresh, "GET", "/healthz", "");
    assert_eq!((status, body.contains("\"ok\"")), (200, true), "{body}");
    assert_eq!(exchange(&mut fresh, "PUT", "/v1/ns/f/kv/after", r#"{"value":1}"#).0, 200);
    let (status, body) = exchange(&mut fresh, "GET", "/v1/ns/f/kv/w", "");
    assert_eq!(status, 200);
    assert!(body.contains("\"value\":20"), "{body}");
}

/// A body declared past the limit is refused from its `Content-Length`: with `Expect:
/// 100-continue` at once, the client never told to go on; without it, once the client, which
/// is sending it, has sent it, so that it reads the 413 rather than a reset (a 1 MiB upload cut
/// off by an early close failed with a broken pipe in `tests/bad_input.rs`); past 8 MiB, at once.
#[test]
fn a_body_declared_past_the_limit_is_refused_and_the_client_reads_why() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("data"));
    let addr = server.url.trim_start_matches("http://").to_owned();
    let read_answer = |stream: &mut TcpStream| {
        let mut answer = vec![0; 4096];
        let n = stream.read(&mut answer).expect("an answer");
        String::from_utf8_lossy(&answer[..n]).into_owned()
    };
    let refused = |answer: &str| answer.starts_with("HTTP/1.1 413") && answer.contains("payload_too_large");
    // Waiting for 100 Continue, or declaring more than is drained: answered before any body.
    const DRAINED: usize = 8 * 1024 * 1024;
    for (length, expect) in [(5_000_000, "expect: 100-continue\r\n"), (DRAINED + 1, "")] {
        let mut stream = TcpStream::connect(&addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let head = format!("PUT /v1/ns/c/kv/big HTTP/1.1\r\nhost: x\r\ncontent-length: {length}\r\n{expect}\r\n");
        stream.write_all(head.as_bytes()).expect("send the head");
        let answer = read_answer(&mut stream);
        assert!(refused(&answer) && !answer.contains("100 Continue"), "{length} {expect:?}: {answer:?}");
    }
    // Sending it, at the most that is drained (8 MiB): the whole upload goes through, then the
    // answer. That is more than loopback's socket buffers hold: refused with the body unread,
    // the upload fails with a reset.
    let body = "x".repeat(DRAINED);
    let mut stream = TcpStream::connect(&addr).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let head = format!("PUT /v1/ns/c/kv/big HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\n\r\n", body.len());
    stream.write_all(head.as_bytes()).expect("send the head");
    stream.write_all(body.as_bytes()).expect("the whole body is taken, not reset");
    let answer = read_answer(&mut stream);
    assert!(refused(&answer), "{answer:?}");
}

/// With a metrics listener, both listeners full and stormed by refused clients that send a
/// request and never read (each refusal lingers, holding a descriptor): the descriptors of
/// both listeners stay out of the store's reserve, and the log rotates to a new segment through
/// it all. Counting only the listeners' places, the lingering refusals of two listeners ate the
/// reserve, the rotation failed with "too many open files", and writes stopped until a restart.
#[test]
fn refusals_storming_both_listeners_leave_the_store_its_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = dir.path().join("gapguard.toml");
    std::fs::write(
        &config,
        format!("metrics_listen = \"127.0.0.1:{metrics_port}\"\nheader_read_timeout_ms = 120000\n"),
    )
    .unwrap();
    let (server, addr) = start_limited(512, &dir.path().join("data"), &["--config".as_ref(), config.as_os_str()]);
    // prlimit execs gapguard: the same process.
    let fds = format!("/proc/{}/fd", server.0.id());
    let metrics = format!("127.0.0.1:{metrics_port}");

    let mut writer = TcpStream::connect(&addr).expect("connect");
    assert_eq!(exchange(&mut writer, "PUT", "/v1/ns/f/kv/w", r#"{"value":0}"#).0, 200);
    // Both listeners full: idle connections past each bound (the refused ones are closed).
    let held: Vec<TcpStream> =
        (0..400).map(|_| &addr).chain((0..100).map(|_| &metrics)).filter_map(|a| TcpStream::connect(a).ok()).collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let storm: Vec<_> = (0..6)
        .map(|i| {
            let (target, stop) = (if i % 2 == 0 { addr.clone() } else { metrics.clone() }, stop.clone());
            std::thread::spawn(move || {
                let mut open = std::collections::VecDeque::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(mut s) = TcpStream::connect(&target) {
                        let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
                        open.push_back(s);
                    }
                    if open.len() > 50 {
                        open.pop_front();
                    }
                }
            })
        })
        .collect();
    // About 80 MB of log through the storm (values just under the 256 KiB limit): past a
    // segment's 64 MB, so it rotates.
    let value = "x".repeat(250 * 1024);
    let mut most_open = 0;
    for i in 0..320 {
        let (status, body) =
            exchange(&mut writer, "PUT", &format!("/v1/ns/f/kv/big/{}", i % 8), &format!(r#"{{"value":"{value}"}}"#));
        assert_eq!(status, 200, "put {i} during the storm: {body}");
        most_open = most_open.max(std::fs::read_dir(&fds).map_or(0, Iterator::count));
    }
    // Both listeners at their bounds hold 256 + 32 and 64 + 32 descriptors; with the store's
    // few, about 400, and never into the 128 kept for the store.
    assert!(most_open <= 512 - 64, "the server held {most_open} descriptors of 512");
    assert!(most_open > 300, "the listeners were not full ({most_open} descriptors): the storm tested nothing");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for thread in storm {
        thread.join().unwrap();
    }
    drop(held);
    assert_eq!(exchange(&mut writer, "GET", "/healthz", "").0, 200, "the store is sound");
    assert_eq!(exchange(&mut writer, "PUT", "/v1/ns/f/kv/after", r#"{"value":1}"#).0, 200);
}
