//! `--obs-overhead`: what metrics and tracing cost gapguard's throughput (issue 4's criterion:
//! with them on, within 10 % of the figure without them).
//!
//! Three gapguard servers, each in its own temp dir, measured in the same invocation:
//! - `off`: `metrics = false` in the config (no metrics middleware, no engine observer,
//!   `/metrics` answers 404) and no span exporter (request spans are not even created);
//! - `metrics`: the default configuration: metrics on, no span exporter;
//! - `metrics+otlp`: metrics on, and every request's span exported with `--otlp-endpoint` to
//!   an OTLP/HTTP sink that this process runs on loopback (it reads and counts each export
//!   request and answers `200`, as a collector would, without decoding it);
//! - `+otlp 10%`: as `metrics+otlp`, with one trace in ten sampled, by the OpenTelemetry SDK's
//!   standard `OTEL_TRACES_SAMPLER=traceidratio`, `OTEL_TRACES_SAMPLER_ARG=0.1`.
//!
//! Each case runs eight rounds, in the order off, metrics, +otlp 10%, metrics+otlp, then the
//! same backwards, so that a linear drift of the machine weighs on every variant alike. A
//! variant's ops/s is the mean of its two rounds; its overhead is `1 - variant / off`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{Context as _, Result};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde::Serialize;

use crate::gapguard::Gapguard;
use crate::overhead::{overhead_pct, print_variants, rounds, Variant, VariantFigures};
use crate::procs::{self, Server};
use crate::report::{thousands, TargetCheck};
use crate::suite::{Plan, Sut};
use crate::workload::{System, Workload};

/// The criterion: metrics and tracing cost less than this share of throughput, in percent.
pub const TARGET_PCT: f64 = 10.0;

/// What is measured: workload and connection count.
const CASES: [(Workload, usize); 3] = [(Workload::Puts, 16), (Workload::Puts, 64), (Workload::Checks, 16)];

/// Which variant each round of a case runs on, in order.
pub const ORDER: [Variant; 8] = [
    Variant::ObsOff,
    Variant::Metrics,
    Variant::MetricsOtlpSampled,
    Variant::MetricsOtlp,
    Variant::MetricsOtlp,
    Variant::MetricsOtlpSampled,
    Variant::Metrics,
    Variant::ObsOff,
];

/// The variants, in the order of the tables.
const VARIANTS: [Variant; 4] = [Variant::ObsOff, Variant::Metrics, Variant::MetricsOtlpSampled, Variant::MetricsOtlp];

/// An OTLP/HTTP sink on loopback: answers every request `200` after reading its body.
pub struct Sink {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sink {
    /// Binds a free loopback port and serves on it until dropped.
    pub async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.context("binding the OTLP sink")?;
        let addr = listener.local_addr()?;
        let (requests, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let (counted_requests, counted_bytes) = (Arc::clone(&requests), Arc::clone(&bytes));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (requests, bytes) = (Arc::clone(&counted_requests), Arc::clone(&counted_bytes));
                let service = service_fn(move |request: Request<Incoming>| {
                    let (requests, bytes) = (Arc::clone(&requests), Arc::clone(&bytes));
                    async move {
                        let body = request.into_body().collect().await?.to_bytes();
                        requests.fetch_add(1, Ordering::Relaxed);
                        bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                        let response = Response::builder()
                            .header("content-type", "application/x-protobuf")
                            .body(Full::new(Bytes::new()))
                            .expect("a valid response");
                        Ok::<_, hyper::Error>(response)
                    }
                });
                tokio::spawn(async move {
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(tcp), service).await;
                });
            }
        });
        Ok(Self { addr, requests, bytes, task })
    }

    /// Export requests and body bytes received so far.
    pub fn received(&self) -> (u64, u64) {
        (self.requests.load(Ordering::Relaxed), self.bytes.load(Ordering::Relaxed))
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The four servers and the sink, started; dropping it stops them.
pub struct Servers {
    servers: Vec<Server>,
    suts: Vec<(Variant, Sut)>,
    /// The OTLP sink of the exporting variants.
    pub sink: Sink,
}

impl Servers {
    /// Starts the sink and gapguard four times, each in its own temp dir under `base`.
    pub async fn start(bin: &Path, base: &Path) -> Result<Self> {
        let sink = Sink::start().await?;
        let endpoint = format!("http://{}", sink.addr);
        let mut servers = Vec::new();
        let mut suts = Vec::new();
        for variant in VARIANTS {
            let otlp = ["--otlp-endpoint", endpoint.as_str()];
            let sampled = [("OTEL_TRACES_SAMPLER", "traceidratio"), ("OTEL_TRACES_SAMPLER_ARG", "0.1")];
            let (config, args, env): (&str, &[&str], &[(&str, &str)]) = match variant {
                Variant::ObsOff => ("metrics = false\n", &[], &[]),
                Variant::MetricsOtlp => ("", &otlp, &[]),
                Variant::MetricsOtlpSampled => ("", &otlp, &sampled),
                _ => ("", &[], &[]),
            };
            let server = procs::start_gapguard_with(bin, base, None, None, config, args, env).await?;
            eprintln!("gapguard ({}) listening on {}", variant.name(), server.addr);
            suts.push((variant, Sut::Gapguard(Gapguard::new(server.addr, None))));
            servers.push(server);
        }
        eprintln!("OTLP sink listening on {}", sink.addr);
        Ok(Servers { servers, suts, sink })
    }

    fn sut(&self, variant: Variant) -> &Sut {
        &self.suts.iter().find(|(v, _)| *v == variant).expect("every variant is started").1
    }

    /// Warns about a server that died during the run.
    pub fn check_alive(&mut self) {
        for server in &mut self.servers {
            if let Err(e) = server.check_alive() {
                eprintln!("warning: {e:#}");
            }
        }
    }
}

/// One case: a workload at a connection count, on every variant.
#[derive(Debug, Serialize)]
pub struct Case {
    /// The workload.
    pub workload: Workload,
    /// Concurrent keep-alive connections.
    pub connections: usize,
    /// What one operation is.
    pub operation: &'static str,
    /// Each variant's figures, in the order off, metrics, +otlp 10%, metrics+otlp.
    pub variants: Vec<VariantFigures>,
    /// `1 - variant ops/s / off ops/s`, in percent, for every variant but off; `None`
    /// when a run had errors.
    pub overhead_pct: Vec<(Variant, Option<f64>)>,
}

/// Everything `--obs-overhead` wrote to `--json`.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    /// Measured seconds per run.
    pub seconds: f64,
    /// Warm-up seconds before each measured window.
    pub warmup_seconds: f64,
    /// The variant of each round of a case, in run order.
    pub order: [Variant; 8],
    /// Export requests and bytes the OTLP sink received over the whole run.
    pub otlp_sink_requests: u64,
    /// Bytes of those requests.
    pub otlp_sink_bytes: u64,
    /// Every case.
    pub cases: &'a [Case],
    /// The overhead target, per case and variant.
    pub targets: &'a [TargetCheck],
}

/// Runs every case in the order [`ORDER`] and returns the figures.
pub async fn run(servers: &Servers, plan: &Plan) -> Vec<Case> {
    let mut cases = Vec::new();
    for (workload, connections) in CASES {
        let variants = rounds(&VARIANTS, &ORDER, |v| servers.sut(v), workload, connections, plan).await;
        let off = &variants[0];
        let overhead_pct = variants[1..].iter().map(|v| (v.variant, overhead_pct(off, v))).collect();
        cases.push(Case {
            workload,
            connections,
            operation: System::Gapguard.operation(workload),
            variants,
            overhead_pct,
        });
    }
    cases
}

/// The overhead target, checked per case and variant.
pub fn targets(cases: &[Case]) -> Vec<TargetCheck> {
    let mut targets = Vec::new();
    for case in cases {
        for (variant, pct) in &case.overhead_pct {
            targets.push(TargetCheck {
                target: format!(
                    "{} overhead, {} x{}: 1 - {}/off ops/s < {TARGET_PCT} %",
                    variant.name(),
                    case.workload.name(),
                    case.connections,
                    variant.name()
                ),
                measured: *pct,
                unit: "%",
                met: pct.map(|pct| pct < TARGET_PCT),
                note: pct.is_none().then(|| "a run it rests on had errors".to_owned()),
            });
        }
    }
    targets
}

/// Prints the cases: each variant's rounds and mean, then the overheads.
pub fn print(cases: &[Case], sink: (u64, u64)) {
    println!();
    println!("== observability overhead: gapguard with metrics and tracing off, on, and exporting spans ==");
    let order: Vec<&str> = ORDER.iter().map(|v| v.name()).collect();
    println!("rounds of each case run in the order: {}", order.join(", "));
    println!("ops/s: mean of a variant's two rounds; spread: gap between those two rounds / their mean");
    println!("overhead = 1 - (variant ops/s / off ops/s)");
    println!("OTLP sink received {} export requests, {} bytes", thousands(sink.0 as f64), thousands(sink.1 as f64));
    for case in cases {
        println!();
        println!("  {} x{}: {}", case.workload.name(), case.connections, case.operation);
        print_variants(&case.variants.iter().collect::<Vec<_>>());
        for (variant, pct) in &case.overhead_pct {
            match pct {
                Some(pct) => println!(
                    "    {} overhead {pct:.1} %  (target < {TARGET_PCT} %: {})",
                    variant.name(),
                    if *pct < TARGET_PCT { "met" } else { "NOT MET" }
                ),
                None => println!("    {} overhead n/a (a run had errors)", variant.name()),
            }
        }
        for r in case.variants.iter().flat_map(|v| &v.rounds) {
            if let Some(error) = &r.first_error {
                println!("  ! round {}: {error}", r.round);
            }
        }
    }
}
