//! Running a gameday: the target (embedded server behind the proxy, or a URL), then each
//! scenario in both modes with the crash schedule, the progress bars, and the report.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gapguard_client::reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};
use gapguard_client::{reqwest, Client};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use rand::{Rng as _, SeedableRng as _};
use rand_chacha::ChaCha8Rng;

use crate::env::Env;
use crate::history::{resolve_from_audit, History};
use crate::proxy::Proxy;
use crate::report::{ModeReport, RestartReport, RunResult, ScenarioReport, Verdict};
use crate::server::EmbeddedServer;
use crate::{scenarios, Config, GamedayError, Mode, Report, Scenario, Target};

/// A request that takes longer than this is given up (the server may be gone).
const REQUEST_TIMEOUT_MS: u64 = 10_000;

/// The server and the way to it.
struct Stage {
    server: Option<Arc<tokio::sync::Mutex<EmbeddedServer>>>,
    proxy: Option<Arc<Proxy>>,
    client: Client,
    watch_client: Client,
}

/// Runs every scenario of `config` in both modes and returns the report (with its verdict).
/// Progress bars are drawn on `progress` (hidden when stderr is not a terminal).
pub async fn run(config: &Config, progress: &MultiProgress) -> Result<Report, GamedayError> {
    config.validate()?;
    let stage = stage(config).await?;
    // Fresh namespaces per gameday, so runs against one server never meet.
    let nonce =
        SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or_default() % 0x1_0000_0000;
    let mut reports = Vec::new();
    for scenario in &config.scenarios {
        let bar = progress.add(ProgressBar::new(config.duration.as_millis() as u64 * 2));
        bar.set_style(
            ProgressStyle::with_template("{prefix:>11} [{bar:30}] {msg}")
                .expect("a valid progress template")
                .progress_chars("=> "),
        );
        bar.set_prefix(scenario.name());
        let naive = run_mode(config, &stage, *scenario, Mode::Naive, nonce, &bar, 0).await?;
        let offset = config.duration.as_millis() as u64;
        let guarded = run_mode(config, &stage, *scenario, Mode::Guarded, nonce, &bar, offset).await?;
        bar.finish_with_message(format!(
            "naive {} violations, guarded {} violations",
            naive.violations, guarded.violations
        ));
        reports.push(ScenarioReport {
            scenario: *scenario,
            invariant: scenario.invariant(),
            guard: scenario.guard(),
            naive,
            guarded,
        });
    }
    let mut report = Report {
        seed: config.seed,
        actors: config.actors,
        duration_s: config.duration.as_secs_f64(),
        delay: config.delay.to_string(),
        target: match &config.target {
            Target::Embedded { .. } => "embedded".into(),
            Target::Url { url, .. } => url.clone(),
        },
        crashes_per_run: config.crashes,
        network: config.network.filter(|n| n.any()).map(|n| n.to_string()),
        scenarios: reports,
        verdict: Verdict { passed: false, problems: Vec::new() },
    };
    report.judge();
    Ok(report)
}

async fn stage(config: &Config) -> Result<Stage, GamedayError> {
    let faults = config.network.unwrap_or_default();
    let (server, proxy, base, api_key) = match &config.target {
        Target::Embedded { binary } => {
            let server = EmbeddedServer::start(binary).await?;
            // Always behind the proxy: its address survives restarts of the server.
            let proxy = Proxy::start(server.addr(), faults, config.seed).await?;
            let base = format!("http://{}", proxy.addr());
            (Some(Arc::new(tokio::sync::Mutex::new(server))), Some(Arc::new(proxy)), base, None)
        }
        Target::Url { url, api_key } if faults.any() => {
            let parsed =
                reqwest::Url::parse(url).map_err(|e| GamedayError::InvalidConfig(format!("--url {url}: {e}")))?;
            let host = parsed.host_str().unwrap_or("127.0.0.1").to_owned();
            let port = parsed.port_or_known_default().unwrap_or(80);
            let upstream = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map_err(|e| GamedayError::io(format!("cannot resolve {host}"), e))?
                .next()
                .ok_or_else(|| GamedayError::InvalidConfig(format!("{host} resolves to no address")))?;
            let proxy = Proxy::start(upstream, faults, config.seed).await?;
            let base = format!("http://{}", proxy.addr());
            (None, Some(Arc::new(proxy)), base, api_key.clone())
        }
        Target::Url { url, api_key } => (None, None, url.clone(), api_key.clone()),
    };
    let mut headers = HeaderMap::new();
    if let Some(key) = api_key {
        let mut value = HeaderValue::from_str(&format!("Bearer {key}"))
            .map_err(|_| GamedayError::InvalidConfig("the API key must be printable ASCII".into()))?;
        value.set_sensitive(true);
        headers.insert(AUTHORIZATION, value);
    }
    let build = |timeout: Option<Duration>| {
        let mut http =
            reqwest::Client::builder().default_headers(headers.clone()).connect_timeout(Duration::from_secs(5));
        if let Some(timeout) = timeout {
            http = http.timeout(timeout);
        }
        let http =
            http.build().map_err(|e| GamedayError::InvalidConfig(format!("cannot build the HTTP client: {e}")))?;
        Client::with_http(http, &base).map_err(|e| GamedayError::InvalidConfig(e.to_string()))
    };
    let client = build(Some(Duration::from_millis(REQUEST_TIMEOUT_MS)))?;
    let watch_client = build(None)?;
    if let Target::Url { url, .. } = &config.target {
        // Before any scenario: a server that cannot be reached is said so at once, not after
        // the first scenario's setup has run out of retries.
        client.health().await.map_err(|e| GamedayError::Client {
            scenario: "gameday".into(),
            what: format!("reaching {url} (GET /healthz)"),
            source: Box::new(e),
        })?;
    }
    Ok(Stage { server, proxy, client, watch_client })
}

async fn run_mode(
    config: &Config,
    stage: &Stage,
    scenario: Scenario,
    mode: Mode,
    nonce: u64,
    bar: &ProgressBar,
    bar_offset_ms: u64,
) -> Result<ModeReport, GamedayError> {
    let started = Instant::now();
    let namespace = format!("gd-{nonce:08x}-{}-{}", scenario.name(), mode.name());
    let env = Arc::new(Env {
        client: stage.client.clone(),
        watch_client: stage.watch_client.clone(),
        ns: namespace.clone(),
        scenario,
        mode,
        actors: config.actors,
        delay: config.delay,
        seed: config.seed,
        started,
        deadline: started + config.duration,
        history: History::default(),
        progress: bar.clone(),
    });
    let network_before = stage.proxy.as_ref().map(|p| p.stats());
    let crashes = match (&stage.server, config.crashes) {
        (Some(server), n) if n > 0 => {
            let schedule = crash_schedule(config, scenario, n);
            Some(tokio::spawn(crash(env.clone(), server.clone(), stage.proxy.clone(), schedule)))
        }
        _ => None,
    };
    let ticker = {
        let env = env.clone();
        let duration_ms = config.duration.as_millis() as u64;
        tokio::spawn(async move {
            loop {
                let elapsed = (env.started.elapsed().as_millis() as u64).min(duration_ms);
                env.progress.set_position(bar_offset_ms + elapsed);
                env.progress.set_message(format!("{mode}: {} ops", env.history.len()));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let outcome = scenarios::run(env.clone()).await;
    let restarts = match crashes {
        Some(task) => {
            task.await.map_err(|e| GamedayError::io("the crash schedule", std::io::Error::other(e.to_string())))??
        }
        None => Vec::new(),
    };
    ticker.abort();
    outcome?;
    tracing::debug!(%namespace, "run finished; judging");
    let mut ops = env.history.take();
    let resolved = {
        let (client, ns) = (&env.client, &env.ns);
        let mut attempts = 0;
        loop {
            match resolve_from_audit(client, ns, &mut ops).await {
                Ok(n) => break n,
                Err(e) if e.code().is_none() && attempts < 100 => {
                    attempts += 1;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(env.fail("read the audit log", e)),
            }
        }
    };
    let judgement = scenarios::judge(&env, &ops).await?;
    let network = match (stage.proxy.as_ref(), network_before, config.network) {
        (Some(proxy), Some(before), Some(faults)) if faults.any() => {
            let after = proxy.stats();
            Some(crate::ProxyStats {
                connections: after.connections - before.connections,
                resets: after.resets - before.resets,
                timeouts: after.timeouts - before.timeouts,
                upstream_refused: after.upstream_refused - before.upstream_refused,
            })
        }
        _ => None,
    };
    Ok(ModeReport::build(RunResult {
        mode,
        namespace,
        ops,
        main_kinds: scenarios::main_kinds(scenario),
        resolved_from_audit: resolved,
        judgement,
        restarts,
        network,
    }))
}

/// When the crashes of a run happen, in ms from its start: evenly spread over the run, each
/// moved by up to ±10 % of the spacing, from the seed and the scenario (the same for both modes).
fn crash_schedule(config: &Config, scenario: Scenario, crashes: u32) -> Vec<u64> {
    let scenario_idx = Scenario::ALL.iter().position(|s| *s == scenario).unwrap_or(0) as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed ^ 0xC0A5_4000 ^ (scenario_idx << 32));
    let spacing = config.duration.as_millis() as f64 / f64::from(crashes + 1);
    (1..=crashes).map(|idx| (spacing * f64::from(idx) + rng.gen_range(-0.1..0.1) * spacing).max(0.0) as u64).collect()
}

async fn crash(
    env: Arc<Env>,
    server: Arc<tokio::sync::Mutex<EmbeddedServer>>,
    proxy: Option<Arc<Proxy>>,
    schedule: Vec<u64>,
) -> Result<Vec<RestartReport>, GamedayError> {
    let mut restarts = Vec::new();
    for at_ms in schedule {
        let at = env.started + Duration::from_millis(at_ms);
        tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
        if !env.running() {
            break;
        }
        let mut server = server.lock().await;
        let at_ms = env.now_ms();
        let restart = server.crash_and_restart().await?;
        if let Some(proxy) = &proxy {
            proxy.set_upstream(restart.addr);
        }
        tracing::info!(killed = ?restart.killed_pid, started = ?restart.started_pid, "kill -9 and restart");
        restarts.push(RestartReport {
            at_ms,
            killed_pid: restart.killed_pid,
            started_pid: restart.started_pid,
            restart_ms: restart.restart_ms,
        });
    }
    Ok(restarts)
}
