//! The `keywatch` commands. [`args`] declares them (clap); `src/main.rs` parses and
//! dispatches to one function per command, here:
//!
//! - [`run()`]: the daemon ([`crate::daemon::serve`]) and, for a one-shot read, its report;
//! - [`check_config`] (and [`connect`] for `--connect`);
//! - [`inspect`]: `usage`, `rotations`, `findings`, read from the store read-only;
//! - [`backtest()`]: a log or a ClickHouse range through the daemon's pipeline;
//! - [`notify`]: `notify test` and `silence`; [`telegram`]: the chats linked to the owners' bot;
//! - [`tools`]: `score`, `fingerprint`, `produce`, `sample`;
//! - [`docs`]: `completions` and `man`.
//!
//! Terminal tables are in [`report`] and [`report_rotation`].

pub mod args;
mod backtest;
mod check;
pub mod connect;
pub mod docs;
pub mod inspect;
pub mod notify;
pub mod produce;
pub mod report;
pub mod report_rotation;
mod run;
pub mod telegram;
pub mod tools;

use std::path::PathBuf;

pub use backtest::backtest;
pub use check::check_config;
pub use run::run;

use crate::config::{self, Config, LogFormat};

/// The config at `path`, or the embedded defaults without one.
pub fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(config::load(p)?),
        None => Ok(config::defaults()),
    }
}

/// Logs to stderr, as the config says (`KEYWATCH_LOG` overrides the level).
pub fn init_tracing(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KEYWATCH_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// A runtime for the commands that need async parts (the daemon, ClickHouse, Kafka).
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Runtime::new()?)
}
