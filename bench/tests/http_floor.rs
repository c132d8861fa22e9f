//! `http-floor` keeps the contract the bench starts gapguard by, and answers as a put does.

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};

use gapguard_testkit::{http_exchange as exchange, listening_on, KillOnDrop};

fn put(body: &str) -> String {
    format!(
        "PUT /v1/ns/bench/kv/k0 HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
}

/// Starts `program` as the bench starts gapguard and holds it to a put's answers; returns the
/// names of the headers of its answer to a put, and whether it answers a chunked put.
fn serves_the_bench_contract(program: &Path) -> (Vec<String>, bool) {
    let mut child = Command::new(program)
        .args(["serve", "--data", "/nonexistent", "--listen", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start http-floor");
    let addr = listening_on(&mut child);
    let _server = KillOnDrop(child);
    let mut stream = TcpStream::connect(&addr).expect("connect");

    let (status, _, _) = exchange(&mut stream, "GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n");
    assert_eq!(status, 200, "the bench waits for /healthz to answer 200");

    // Two puts on one keep-alive connection: answered as gapguard answers, revisions rising.
    let (status, headers, body) = exchange(&mut stream, &put(r#"{"value":1}"#));
    assert_eq!((status, body.as_str()), (200, r#"{"revision":1,"version":1}"#));
    let header = |name: &str| headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str());
    assert_eq!(header("content-type"), Some("application/json"));
    assert_eq!(header("x-correlation-id").map(str::len), Some(32));
    let (status, _, body) = exchange(&mut stream, &put(r#"{"value":2}"#));
    assert_eq!((status, body.as_str()), (200, r#"{"revision":2,"version":1}"#));

    // The body is parsed, not only read: what is not JSON is refused.
    let (status, _, _) = exchange(&mut stream, &put("{not json"));
    assert_eq!(status, 400);
    let mut names: Vec<String> = headers.into_iter().map(|(name, _)| name).collect();
    names.sort();

    let mut stream = TcpStream::connect(addr).expect("connect");
    let chunked =
        "PUT /v1/ns/bench/kv/k0 HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n";
    stream.write_all(chunked.as_bytes()).expect("send");
    let mut answer = Vec::new();
    stream.set_read_timeout(Some(std::time::Duration::from_secs(1))).unwrap();
    let _ = stream.read_to_end(&mut answer);
    (names, answer.starts_with(b"HTTP/1.1 200"))
}

#[test]
fn serves_the_bench_contract_and_answers_as_a_put_on_hyper_and_without_it() {
    let hyper = serves_the_bench_contract(Path::new(env!("CARGO_BIN_EXE_http-floor")));
    // Under a name ending in `-raw`, the same binary serves without hyper.
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("http-floor-raw");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_http-floor"), &raw).expect("link http-floor-raw");
    let without = serves_the_bench_contract(&raw);
    assert_eq!(without.0, hyper.0, "both floors answer with the same headers");
    assert!(hyper.0.contains(&"date".to_owned()), "{hyper:?}");
    // What tells them apart: hyper reads a chunked body; the raw floor closes the connection.
    assert_eq!((hyper.1, without.1), (true, false));
}

#[test]
fn refuses_a_command_line_other_than_serve() {
    let out = Command::new(env!("CARGO_BIN_EXE_http-floor")).arg("kv").output().expect("run http-floor");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage: http-floor serve"));
}
