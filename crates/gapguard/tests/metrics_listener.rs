//! Black-box tests of `serve --metrics-listen` (and `metrics_listen` in the config): `/metrics`
//! moves to a listener of its own (with `/healthz`), the API listener answers 404 for it naming
//! where it went, the same key rule applies there, and nothing of the API is reachable on it.

mod support;

use serde_json::json;
use support::{Http, Server};

/// A loopback port that was free a moment ago (the server binds it right after).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn get(url: &str, auth: Option<&str>) -> (u16, String) {
    let mut request = reqwest::Client::new().get(url);
    if let Some(secret) = auth {
        request = request.bearer_auth(secret);
    }
    let response = request.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn metrics_are_served_on_their_own_listener_and_no_longer_on_the_api_listener() {
    let dir = tempfile::tempdir().unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let server = Server::start_with(dir.path(), &["--metrics-listen", &metrics]);
    let http = Http::new(&server);
    let check = json!({"conditions": [{"absent": "k"}], "flow": "checkout"});
    assert_eq!(http.post("/v1/ns/shop/check", check).await.status, 200);

    let (status, text) = get(&format!("http://{metrics}/metrics"), None).await;
    assert_eq!(status, 200, "{text}");
    let line = r#"gapguard_checks_total{namespace="other",flow="other",result="passed"} 1"#;
    assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
    assert!(text.contains("gapguard_http_requests_total{route=\"/v1/ns/{ns}/check\""), "{text}");
    assert_eq!(get(&format!("http://{metrics}/healthz"), None).await.0, 200);

    let moved = http.get("/metrics").await;
    assert_eq!(moved.status, 404, "{:?}", moved.body);
    assert!(moved.body["message"].as_str().unwrap().contains(&metrics), "{:?}", moved.body);
    let (status, text) = get(&format!("http://{metrics}/v1/ns/shop/kv/k"), None).await;
    assert_eq!(status, 404, "the API is not on the metrics listener: {text}");
}

#[tokio::test]
async fn the_metrics_listener_comes_from_the_config_and_keeps_its_key_rule() {
    let dir = tempfile::tempdir().unwrap();
    let secret = "scraper-secret-0123456789";
    let hash: String = {
        use sha2::Digest as _;
        sha2::Sha256::digest(secret.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    };
    let metrics = format!("127.0.0.1:{}", free_port());
    let config = format!(
        "metrics_listen = \"{metrics}\"\nmetrics_require_key = true\n[[api_key]]\nid = \"prometheus\"\n\
         secret_sha256 = \"{hash}\"\nnamespaces = [\"*\"]\nrole = \"read\"\n"
    );
    let _server = Server::start_with_config(dir.path(), &config);
    assert_eq!(get(&format!("http://{metrics}/metrics"), None).await.0, 401);
    let (status, text) = get(&format!("http://{metrics}/metrics"), Some(secret)).await;
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("# TYPE gapguard_acts counter"), "{text}");
    assert_eq!(get(&format!("http://{metrics}/healthz"), None).await.0, 200, "/healthz never needs a key");
}

#[tokio::test]
async fn with_metrics_off_nothing_is_counted_or_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start_with_config(dir.path(), "metrics = false\n");
    let http = Http::new(&server);
    assert_eq!(http.post("/v1/ns/shop/check", json!({"conditions": [{"absent": "k"}]})).await.status, 200);
    let off = http.get("/metrics").await;
    assert_eq!(off.status, 404, "{:?}", off.body);
    assert!(off.body["message"].as_str().unwrap().contains("metrics = false"), "{:?}", off.body);
}
