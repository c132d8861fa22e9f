//! The generated rules in a real Prometheus: `gapguard rules` writes them, a real gapguard
//! serves traffic (acts that commit and acts that find their check stale), a real Prometheus
//! (Debian package `prometheus`, `/usr/bin/prometheus`) scrapes it every second and evaluates
//! the rules, and its HTTP API shows the recording rules' values for the configured flow.
//! Every wait is bounded; a missing `prometheus` fails the test, saying how to install it.

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{Http, Server};

const CONFIG: &str = r#"
metrics_namespaces = ["shop"]

[[flow]]
name = "checkout"
check_to_use_p99_ms = 500
correctness_objective = 0.99
"#;

/// How long Prometheus may take to start, and then to record the first values.
const WAIT: Duration = Duration::from_secs(60);

/// A running Prometheus, stopped (SIGTERM, then SIGKILL) when dropped.
struct Prometheus {
    child: Child,
    url: String,
    log: std::path::PathBuf,
}

impl Prometheus {
    /// Starts `prometheus` on a free loopback port with `config`, its TSDB in `dir`.
    fn start(dir: &Path, config: &Path) -> Self {
        let port = {
            let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
            listener.local_addr().unwrap().port()
        };
        let log = dir.join("prometheus.log");
        let log_file = std::fs::File::create(&log).expect("create the Prometheus log");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().unwrap())
            .stderr(log_file)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
                "prometheus is not installed, and this test needs the real one: install it \
                 (`sudo apt-get install prometheus` on Debian/Ubuntu, which provides /usr/bin/prometheus; \
                 scripts/test.sh does it when run as root)"
            ),
            Err(e) => panic!("cannot run prometheus: {e}"),
        };
        Self { child, url: format!("http://127.0.0.1:{port}"), log }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Panics (with its log) if Prometheus exited.
    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("wait on prometheus") {
            panic!("prometheus exited ({status}); its log:\n{}", self.log_tail());
        }
    }

    /// Stops it by its PID: SIGTERM, then SIGKILL after 10 s; waits for it.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `gapguard rules --config CONFIG --out out`.
fn generate_rules(config: &Path, out: &Path) {
    let output = Command::new(env!("CARGO_BIN_EXE_gapguard"))
        .args(["rules", "--config"])
        .arg(config)
        .arg("--out")
        .arg(out)
        .output()
        .expect("run gapguard rules");
    assert!(output.status.success(), "gapguard rules failed: {}", String::from_utf8_lossy(&output.stderr));
}

/// Traffic in the `checkout` flow until `stop`: each round, one act that commits and one
/// whose check goes stale. Returns the number of rounds.
async fn traffic(http: Http, stop: Arc<AtomicBool>, rounds: Arc<AtomicU64>) {
    let fixed = json!([{"equals": {"key": "fixed", "value": true}}]);
    assert_eq!(http.put("/v1/ns/shop/kv/fixed", json!({"value": true})).await.status, 200);
    let mut price = 0u64;
    assert_eq!(http.put("/v1/ns/shop/kv/price", json!({"value": price})).await.status, 200);
    let ticket = |conditions: Value| {
        let http = &http;
        async move {
            let r = http
                .post("/v1/ns/shop/check", json!({"conditions": conditions, "ttl_ms": 60_000, "flow": "checkout"}))
                .await;
            assert_eq!(r.status, 200, "{:?}", r.body);
            r.body["ticket"].as_str().unwrap().to_owned()
        }
    };
    let act = |ticket: String| {
        let http = &http;
        async move {
            http.post("/v1/ns/shop/act", json!({"ticket": ticket, "ops": [{"put": {"key": "log", "value": 1}}]}))
                .await
                .status
        }
    };
    while !stop.load(Ordering::Relaxed) {
        let good = ticket(fixed.clone()).await;
        assert_eq!(act(good).await, 200);
        let stale = ticket(json!([{"equals": {"key": "price", "value": price}}])).await;
        price += 1;
        assert_eq!(http.put("/v1/ns/shop/kv/price", json!({"value": price})).await.status, 200);
        assert_eq!(act(stale).await, 409);
        rounds.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The value of `query` for `flow="checkout"` at `time` (Unix seconds), if Prometheus has one.
async fn checkout_value(client: &reqwest::Client, prometheus: &str, query: &str, time: f64) -> Option<f64> {
    let response = client
        .get(format!("{prometheus}/api/v1/query"))
        .query(&[("query", query), ("time", &format!("{time:.3}"))])
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    let body: Value = response.json().await.ok()?;
    assert_eq!(body["status"], "success", "query {query}: {body}");
    let sample = body["data"]["result"].as_array()?.iter().find(|s| s["metric"]["flow"] == "checkout")?;
    sample["value"][1].as_str()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_records_the_slis_from_a_real_gapguard() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gapguard.toml");
    std::fs::write(&config, CONFIG).unwrap();
    let rules_dir = dir.path().join("rules");
    generate_rules(&config, &rules_dir);
    let rules = rules_dir.join("gapguard-rules.yml");
    assert!(rules.is_file());

    let server = Server::start_with_config(&dir.path().join("data"), CONFIG);
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let driver = tokio::spawn(traffic(Http::new(&server), stop.clone(), rounds.clone()));

    let prometheus_config = dir.path().join("prometheus.yml");
    std::fs::write(
        &prometheus_config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n  - job_name: gapguard\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]\n",
            rules = serde_json::to_string(&rules.display().to_string()).unwrap(),
            port = server.port(),
        ),
    )
    .unwrap();
    let mut prometheus = Prometheus::start(dir.path(), &prometheus_config);
    let client = reqwest::Client::new();

    // Ready.
    let deadline = Instant::now() + WAIT;
    loop {
        prometheus.assert_running();
        let ready = client.get(format!("{}/-/ready", prometheus.url)).timeout(Duration::from_secs(2)).send().await;
        if ready.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus was not ready within {WAIT:?}; its log:\n{}",
            prometheus.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // The recording rules produce values for the configured flow: correctness strictly between
    // 0 and 1 (half the acts go stale), latency SLI and burn rates present.
    let queries = [
        "flow:gapguard_correctness_sli:rate5m",
        "flow:gapguard_correctness_burn_rate:rate5m",
        "flow:gapguard_latency_sli:rate5m",
        "flow:gapguard_correctness_objective:ratio",
    ];
    let deadline = Instant::now() + WAIT;
    let values = loop {
        prometheus.assert_running();
        assert!(!driver.is_finished(), "the traffic driver stopped");
        // All at one instant a few evaluations back, so that they read one evaluation's values.
        let time = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64() - 3.0;
        let mut values = Vec::new();
        for q in queries {
            values.push(checkout_value(&client, &prometheus.url, q, time).await);
        }
        let correctness_ok = values[0].is_some_and(|v| v > 0.0 && v < 1.0);
        if correctness_ok && values.iter().all(|v| v.is_some_and(f64::is_finite)) {
            break values;
        }
        if Instant::now() >= deadline {
            let targets = match client.get(format!("{}/api/v1/targets", prometheus.url)).send().await {
                Ok(r) => r.text().await.unwrap_or_default(),
                Err(e) => e.to_string(),
            };
            panic!(
                "the recording rules produced no values for flow checkout within {WAIT:?} \
                 ({} traffic rounds): {queries:?} = {values:?}\ntargets: {targets}\nprometheus log:\n{}",
                rounds.load(Ordering::Relaxed),
                prometheus.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let [correctness, burn, latency, objective] = values[..] else { unreachable!() };
    let (correctness, burn, latency, objective) =
        (correctness.unwrap(), burn.unwrap(), latency.unwrap(), objective.unwrap());
    assert_eq!(objective, 0.99);
    assert!((burn - (1.0 - correctness) / (1.0 - 0.99)).abs() < 1e-6 * burn.max(1.0), "burn {burn}, sli {correctness}");
    assert!((0.0..=1.0).contains(&latency), "latency SLI {latency}");

    stop.store(true, Ordering::Relaxed);
    tokio::time::timeout(Duration::from_secs(30), driver).await.expect("the traffic driver stops").unwrap();
    prometheus.stop();
    assert!(prometheus.child.try_wait().unwrap().is_some(), "prometheus stopped");
}
