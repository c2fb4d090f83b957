//! The `keywatch` command: parses the command line and dispatches to [`keywatch::cli`].

use std::process::ExitCode;

use clap::Parser;

use keywatch::cli::args::{Cli, Command, NotifyAction, SilenceAction, TelegramAction};
use keywatch::cli::{self, inspect, notify, telegram, tools};

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run { config, dry_run } => cli::run(config, dry_run),
        Command::CheckConfig { file, connect } => cli::check_config(&file, connect),
        Command::Usage {
            config,
            since,
            key,
            limit,
        } => inspect::usage(config, since, key, limit),
        Command::Rotations { config, at, chart } => {
            inspect::rotations(config, &at, chart.as_deref())
        }
        Command::Findings {
            config,
            since,
            kind,
            json,
        } => inspect::findings(config, since, kind, json),
        Command::Backtest {
            config,
            input,
            from,
            to,
            every,
            lifecycle,
        } => cli::backtest(config, input, from, to, every, lifecycle),
        Command::Notify {
            action:
                NotifyAction::Test {
                    config,
                    channel,
                    owner,
                },
        } => notify::test(config, &channel, &owner),
        Command::Silence { action } => match action {
            SilenceAction::Add {
                config,
                matcher,
                duration,
                reason,
            } => notify::silence_add(config, &matcher, duration, &reason),
            SilenceAction::List { config, all } => notify::silence_list(config, all),
            SilenceAction::Remove { config, id } => notify::silence_remove(config, id),
        },
        Command::Telegram { action } => match action {
            TelegramAction::Link { config, owner, ttl } => telegram::link(config, &owner, ttl),
            TelegramAction::Chats { config } => telegram::chats(config),
            TelegramAction::Unlink { config, chat_id } => telegram::unlink(config, chat_id),
        },
        Command::Score { input, output } => tools::score(input, output),
        Command::Fingerprint { config } => tools::fingerprint(config),
        Command::Produce {
            brokers,
            topic,
            file,
            config,
            properties,
        } => tools::produce(&brokers, &topic, file, config, &properties),
        Command::Sample {
            preset,
            lines,
            seed,
            output,
        } => tools::sample(preset, lines, seed, output),
        Command::Completions { shell } => cli::docs::completions(shell),
        Command::Man { out } => cli::docs::man(out),
    };
    result.unwrap_or_else(|e| {
        eprintln!("error: {e:#}");
        ExitCode::FAILURE
    })
}
