//! `keywatch run [--dry-run]`: the daemon; after a one-shot read (`follow = false`), what
//! was stored. With `--dry-run` notifications are rendered to standard output, not sent
//! ([`crate::notify::dry_run`]).

use std::path::PathBuf;
use std::process::ExitCode;

use super::inspect::{print_rotations, print_usage};
use super::report_rotation;

pub fn run(config: Option<PathBuf>, dry_run: bool) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    super::init_tracing(&config);
    super::runtime()?.block_on(async {
        let summary =
            crate::daemon::serve(config.clone(), crate::daemon::ServeOptions { dry_run }).await?;
        if config.input.follow {
            return Ok(ExitCode::SUCCESS);
        }
        // A one-shot read (the quick start): show what was stored.
        print_usage(&config, None, None, 50)?;
        if let Some(registry) = crate::daemon::lifecycle::registry_now(&config).await? {
            print_rotations(&config, Some(registry), "latest")?;
        }
        if !summary.findings.is_empty() {
            println!("Findings raised by this run:");
            println!("{}", report_rotation::findings_table(&summary.findings));
        }
        if summary.dead_letters > 0 {
            println!(
                "{} line(s) could not be decoded; see {}",
                summary.dead_letters,
                config
                    .state_dir
                    .join(crate::daemon::deadletter::DEAD_LETTER_FILE)
                    .display()
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}
