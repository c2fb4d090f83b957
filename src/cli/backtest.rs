//! `keywatch backtest`: a log (`--input`) or the events stored in ClickHouse
//! (`--from/--to`) through the daemon's pipeline with event time as the clock
//! ([`crate::daemon::backtest`]); every finding it would raise, one JSON object per line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::config::StoreConfig;
use crate::daemon::backtest::{backtest_events, pipeline_for};
use crate::store::clickhouse::ClickHouseStore;

pub fn backtest(
    config_path: PathBuf,
    input: Option<PathBuf>,
    from: Option<i64>,
    to: Option<i64>,
    every: Duration,
    lifecycle: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let config = super::load(Some(&config_path))?;
    let pipeline = pipeline_for(&config, every, lifecycle.as_deref())?;
    let summary = match (input, from) {
        (Some(input), _) => {
            let decoder = crate::daemon::decoder(&config)?;
            let file = std::fs::File::open(&input)
                .with_context(|| format!("cannot open {}", input.display()))?;
            let lines =
                std::io::BufRead::split(std::io::BufReader::new(file), b'\n').map_while(Result::ok);
            crate::daemon::backtest::backtest(lines, decoder, pipeline)?
        }
        (None, Some(from)) => {
            let to = to.unwrap_or(i64::MAX);
            if to <= from {
                anyhow::bail!("--to must be after --from");
            }
            let StoreConfig::ClickHouse(c) = &config.store else {
                anyhow::bail!(
                    "{}: store.kind: --from/--to replay the events stored in ClickHouse, \
                     and this config's store is SQLite (store.kind = \"sqlite\", which \
                     keeps no raw events); set store.kind = \"clickhouse\" or replay a \
                     log with --input",
                    config_path.display()
                );
            };
            let password = c
                .load_password()
                .map_err(|e| anyhow::anyhow!("store.clickhouse: {e}"))?;
            let ch = ClickHouseStore::open_read_only(c, password, None)?;
            let mut events = ch.replay(from, to);
            let summary = backtest_events(&mut events, pipeline)?;
            eprintln!(
                "replayed {} event(s) from ClickHouse database {}",
                events.events_read(),
                c.database
            );
            summary
        }
        (None, None) => unreachable!("clap requires --input or --from"),
    };
    let mut out = std::io::stdout().lock();
    for f in &summary.findings {
        std::io::Write::write_all(&mut out, serde_json::to_string(f)?.as_bytes())?;
        std::io::Write::write_all(&mut out, b"\n")?;
    }
    eprintln!("{} finding(s)", summary.findings.len());
    Ok(ExitCode::SUCCESS)
}
