//! `keywatch usage`, `rotations` and `findings`: what the store holds, read-only
//! ([`crate::store::open::open_read_only`]). `rotations --chart DIR` also writes each
//! rotation's adoption chart ([`crate::chart`]) from the rows it printed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use super::{report, report_rotation};
use crate::config::Config;
use crate::detect::{Engine, FindingKind, RotationStatus};
use crate::registry::Registry;
use crate::store::open::open_read_only;
use crate::store::UsageReport;

pub fn usage(
    config: Option<PathBuf>,
    since: Option<Duration>,
    key: Option<String>,
    limit: usize,
) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    print_usage(&config, since, key.as_deref(), limit)?;
    Ok(ExitCode::SUCCESS)
}

pub fn rotations(
    config: Option<PathBuf>,
    at: &str,
    chart_dir: Option<&Path>,
) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    let rt = super::runtime()?;
    let registry = rt.block_on(crate::daemon::lifecycle::registry_now(&config))?;
    let _guard = rt.enter();
    let rows = print_rotations(&config, registry, at)?;
    if let Some(dir) = chart_dir {
        write_charts(dir, &rows)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// One PNG per rotation in `dir` (created if missing), from the same view as the table.
fn write_charts(dir: &Path, rows: &[RotationStatus]) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("--chart: cannot create {}", dir.display()))?;
    let safe = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    for r in rows {
        let path = dir.join(format!("{}_to_{}.png", safe(&r.old_key), safe(&r.new_key)));
        match crate::chart::adoption_png(r) {
            Ok(png) => {
                std::fs::write(&path, png)
                    .with_context(|| format!("--chart: cannot write {}", path.display()))?;
                println!("chart of {} → {}: {}", r.old_key, r.new_key, path.display());
            }
            Err(e) => println!("no chart of {} → {}: {e}", r.old_key, r.new_key),
        }
    }
    Ok(())
}

pub fn findings(
    config: Option<PathBuf>,
    since: Option<Duration>,
    kind: Option<FindingKind>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    let store = open_read_only(&config)?;
    let all = store.findings(None, kind)?;
    let latest = all.iter().map(|f| f.last_at_ms).max();
    let rows = match (since, latest) {
        (Some(d), Some(l)) => store.findings(Some(l - d.as_millis() as i64), kind)?,
        _ => all,
    };
    if json {
        // The last raise as the finding (`at` is its time), with when it was first raised
        // and how often: a backtest prints the first raise of each fact.
        for f in &rows {
            let mut v = serde_json::to_value(&f.finding)?;
            v["first_at"] = crate::registry::format_rfc3339(f.first_at_ms).into();
            v["last_at"] = crate::registry::format_rfc3339(f.last_at_ms).into();
            v["count"] = f.count.into();
            println!("{v}");
        }
    } else if rows.is_empty() {
        println!("no findings stored in {}", store.describe(&config));
    } else {
        println!("{}", report_rotation::stored_findings_table(&rows));
    }
    Ok(ExitCode::SUCCESS)
}

/// The rotations in `registry` (the file plus the lifecycle topic, see
/// [`crate::daemon::lifecycle::registry_now`]) as of `at`; returns the rows printed.
pub fn print_rotations(
    config: &Config,
    registry: Option<Arc<Registry>>,
    at: &str,
) -> anyhow::Result<Vec<RotationStatus>> {
    let store = open_read_only(config)?;
    let now = match at {
        "latest" => store
            .latest_event_ms()?
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
        "now" => chrono::Utc::now().timestamp_millis(),
        other => chrono::DateTime::parse_from_rfc3339(other)
            .with_context(|| format!("--at: expected latest, now or RFC 3339, found `{other}`"))?
            .timestamp_millis(),
    };
    let (_, policy) = crate::daemon::lifecycle::load_rules(config)?;
    let Some(registry) = registry else {
        println!(
            "no key registry configured (rules.keys or rules.lifecycle): no rotations to show"
        );
        return Ok(Vec::new());
    };
    let engine = Engine::new(registry, policy);
    let rows = engine.rotations(now, store.rotation_source());
    if rows.is_empty() {
        println!("no rotations in progress");
    } else {
        println!("Rotations as of {} UTC:", report::format_ms(now));
        println!("{}", report_rotation::rotations_table(&rows));
    }
    Ok(rows)
}

pub fn print_usage(
    config: &Config,
    since: Option<Duration>,
    key: Option<&str>,
    limit: usize,
) -> anyhow::Result<()> {
    let store = open_read_only(config)?;
    if let Some(key) = key {
        let rows = store.key_sources(key)?;
        if rows.is_empty() {
            println!("no sources stored for key {key}");
        } else {
            println!("{}", report::sources_table(&rows));
        }
        return Ok(());
    }
    let since_ms = match (since, store.latest_event_ms()?) {
        (Some(d), Some(latest)) => Some(latest - d.as_millis() as i64),
        _ => None,
    };
    let mut rows = store.key_usage(since_ms)?;
    let total = rows.len();
    rows.truncate(limit);
    if rows.is_empty() {
        println!("no usage stored yet");
    } else {
        println!("{}", report::usage_table(&rows));
        if total > rows.len() {
            println!("({} more keys; use --limit)", total - rows.len());
        }
    }
    Ok(())
}
