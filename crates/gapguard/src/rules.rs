//! `gapguard rules --config FILE --out DIR`: writes the Prometheus recording and alerting rules
//! of the config's flow SLOs and the three Grafana dashboards. The generator is
//! `gapguard_server::rules`; this is the command around it.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use clap::Args;
use gapguard_server::rules as generator;

/// `gapguard rules`.
#[derive(Debug, Args)]
pub struct RulesArgs {
    /// The server's TOML config file: its `[[flow]]` entries and their objectives.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Directory to write `gapguard-rules.yml` and `dashboards/*.json` into (created if missing).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Where the runbook is; each alert's `runbook_url` is this plus `#<alert name, lowercase>`.
    #[arg(long, value_name = "URL", default_value = "docs/operations.md")]
    pub runbook_base: String,
}

/// Generates the files and writes them, printing each path written.
pub fn run(args: &RulesArgs) -> anyhow::Result<()> {
    let config = gapguard_server::Config::load(Some(&args.config))?;
    let options = generator::Options { runbook_base: args.runbook_base.clone() };
    let files = generator::generate(&config.flows, &options).context("cannot generate rules")?;
    for file in files {
        let path = args.out.join(Path::new(file.path));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        std::fs::write(&path, file.contents).with_context(|| format!("cannot write {}", path.display()))?;
        println!("{}", path.display());
    }
    let n_slo_flows =
        config.flows.iter().filter(|f| f.check_to_use_p99_ms.is_some() || f.correctness_objective.is_some()).count();
    if n_slo_flows == 0 {
        eprintln!("note: no [[flow]] in {} has an objective, so the rules file has no rules", args.config.display());
    }
    Ok(())
}
