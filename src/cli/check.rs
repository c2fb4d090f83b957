//! `keywatch check-config FILE [--connect]`: the config and the rule files it names are
//! validated without connecting (exit 2 with `FILE[:LINE]: FIELD: REASON`); `--connect`
//! also reaches the services it names (exit 3 when one fails).

use std::path::Path;
use std::process::ExitCode;

use crate::config::{self, Config, ConfigError};

pub fn check_config(file: &Path, connect: bool) -> anyhow::Result<ExitCode> {
    let c = match config::load(file).and_then(check_rules) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::from(2));
        }
    };
    println!(
        "{}: ok (input {:?} as {}, state in {})",
        file.display(),
        c.input.source,
        c.input.format.name(),
        c.state_dir.display()
    );
    if !connect {
        return Ok(ExitCode::SUCCESS);
    }
    let checks = super::runtime()?.block_on(super::connect::check(&c));
    let mut failed = false;
    for (what, result) in checks {
        match result {
            Ok(detail) => println!("{what}: ok: {detail}"),
            Err(reason) => {
                failed = true;
                println!("{what}: FAILED: {reason}");
            }
        }
    }
    Ok(if failed {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// The rule files the config names, validated too (still no connections).
fn check_rules(c: Config) -> Result<Config, ConfigError> {
    if let Some(p) = &c.rules.keys {
        crate::registry::Registry::load(p)?;
    }
    if let Some(p) = &c.rules.policy {
        crate::detect::Policy::load(p)?;
    }
    if let Some(p) = &c.rules.routes {
        let routes = crate::notify::Config::load(p)?;
        crate::notify::check_templates(&routes)?;
    }
    Ok(c)
}
