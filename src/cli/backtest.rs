//! `keywatch backtest`: a log (`--input`) or the events stored in ClickHouse
//! (`--from/--to`) through the daemon's pipeline with event time as the clock
//! ([`crate::daemon::backtest`]); every finding it would raise, one JSON object per line.
//!
//! A long replay shows a progress bar on stderr (indicatif) when stderr is a terminal: bytes
//! of the log read, or event time covered of the ClickHouse range. Not a terminal (a pipe, a
//! file, CI): nothing but the closing summary, so scripts read stdout and stderr as before.
//!
//! A log line longer than `input.max_line_bytes` is never read whole, as in the daemon: it
//! is skipped up to its newline, said on stderr with its offset and size, and counted with
//! the lines that do not decode.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

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
            let bar = progress(
                file.metadata().map_or(0, |m| m.len()),
                "{bar:40} {bytes}/{total_bytes} of the log, {bytes_per_sec}, {eta} left",
            );
            // Lines as long as the daemon takes them (`input.max_line_bytes`): a longer one
            // is skipped unread and counted with its size, like the daemon's dead letter.
            let max = config.input.max_line_bytes;
            let mut too_long = 0u64;
            let summary = crate::daemon::backtest::backtest_reader(
                std::io::BufReader::new(file),
                max,
                decoder,
                pipeline,
                |line, offset| {
                    bar.inc(line.consumed);
                    if let Some(n) = line.too_long {
                        too_long += 1;
                        bar.suspend(|| {
                            eprintln!(
                                "skipped the line at byte {offset} of {}: {n} bytes, longer \
                                 than input.max_line_bytes ({max})",
                                input.display()
                            )
                        });
                    }
                },
            );
            bar.finish_and_clear();
            let summary = summary?;
            if summary.dead_letters > 0 {
                eprintln!(
                    "{} line(s) did not decode and were skipped ({too_long} too long)",
                    summary.dead_letters
                );
            }
            summary
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
            // Event time covered, in seconds of the range (up to now for an open range).
            let end = to.min(chrono::Utc::now().timestamp_millis()).max(from + 1);
            let bar = progress(
                u64::try_from((end - from) / 1000).unwrap_or(0).max(1),
                "{bar:40} {percent}% of the range, at {msg}, {eta} left",
            );
            let mut last_shown = i64::MIN;
            let replayed = (&mut events).inspect(|ev| {
                if let Ok(ev) = ev {
                    // Redraw once a minute of event time, not per event.
                    if ev.ts_ms.saturating_sub(last_shown) >= 60_000 {
                        last_shown = ev.ts_ms;
                        bar.set_position(u64::try_from((ev.ts_ms - from) / 1000).unwrap_or(0));
                        bar.set_message(crate::registry::format_rfc3339(ev.ts_ms));
                    }
                }
            });
            let summary = backtest_events(replayed, pipeline);
            bar.finish_and_clear();
            let summary = summary?;
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

/// A progress bar of `len` units on stderr when stderr is a terminal; hidden otherwise.
fn progress(len: u64, template: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr());
    bar.set_style(
        ProgressStyle::with_template(template)
            .expect("a valid progress template")
            .progress_chars("=> "),
    );
    bar
}
