//! `keywatch notify test` and `keywatch silence add|list|remove`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::report::format_ms;
use crate::notify::Matcher;
use crate::registry::Registry;
use crate::store::SqliteStore;

/// Sends a test message to an owner (or team receiver) through one channel.
pub fn test(config: Option<PathBuf>, channel: &str, owner: &str) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    let routes = crate::daemon::notify_config(&config)?;
    let sent = super::runtime()?.block_on(async {
        let registry = crate::daemon::lifecycle::registry_now(&config)
            .await?
            .unwrap_or_else(|| Arc::new(Registry::empty()));
        anyhow::Ok(crate::notify::send_test(&routes, &registry, channel, owner).await?)
    })?;
    println!("sent a test message: {sent}");
    Ok(ExitCode::SUCCESS)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn silence_add(
    config: Option<PathBuf>,
    matcher: &Matcher,
    duration: Duration,
    reason: &str,
) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    let mut store = SqliteStore::open(&config.state_dir)?;
    let now = now_ms();
    let s = crate::notify::silence_add(
        &mut store,
        matcher,
        now + duration.as_millis() as i64,
        reason,
        now,
    )?;
    println!(
        "silence {} on {} until {} UTC",
        s.id,
        s.matcher,
        format_ms(s.until_ms)
    );
    Ok(ExitCode::SUCCESS)
}

pub fn silence_list(config: Option<PathBuf>, all: bool) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    let store = SqliteStore::open(&config.state_dir)?;
    let rows = crate::notify::silence_list(&store, now_ms(), all)?;
    if rows.is_empty() {
        println!("no silences");
    }
    for s in rows {
        println!(
            "{}\t{}\tuntil {} UTC\t{}{}",
            s.id,
            s.matcher,
            format_ms(s.until_ms),
            s.reason,
            if s.removed_ms.is_some() {
                " (removed)"
            } else {
                ""
            }
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn silence_remove(config: Option<PathBuf>, id: i64) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    let mut store = SqliteStore::open(&config.state_dir)?;
    if crate::notify::silence_remove(&mut store, id, now_ms())? {
        println!("silence {id} removed");
        Ok(ExitCode::SUCCESS)
    } else {
        anyhow::bail!("no silence {id} in force");
    }
}
