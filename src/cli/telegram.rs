//! `keywatch telegram link|chats|unlink`: the chats owners linked to the owners' bot
//! ([`crate::notify::bot::links`], in the state directory).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use super::report::format_ms;
use crate::notify::bot::links::Links;

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Prints a one-time code that links the chat it is sent from to `owner`.
pub fn link(config: Option<PathBuf>, owner: &str, ttl: Duration) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    let registry = super::runtime()?
        .block_on(crate::daemon::lifecycle::registry_now(&config))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "no key registry configured (rules.keys or rules.lifecycle): no owners to link"
            )
        })?;
    if registry.owner(owner).is_none() {
        let known: Vec<&str> = registry.owners().map(|o| o.name.as_str()).collect();
        anyhow::bail!(
            "unknown owner `{owner}`, expected one of {}",
            known.join(", ")
        );
    }
    let mut links = Links::open(&config.state_dir)?;
    let now = now_ms();
    let code = links.new_code(owner, ttl, now)?;
    println!("{code}");
    eprintln!(
        "send `/start {code}` to the keywatch bot from the chat that should get {owner}'s \
         notifications; the code works once, until {} UTC",
        format_ms(now + ttl.as_millis() as i64)
    );
    Ok(ExitCode::SUCCESS)
}

/// Lists the linked chats.
pub fn chats(config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    let links = Links::open(&config.state_dir)?;
    let rows = links.chats()?;
    if rows.is_empty() {
        println!("no linked chats");
    }
    for c in rows {
        println!(
            "{}\t{}\tlinked {} UTC by {}",
            c.chat_id,
            c.owner,
            format_ms(c.linked_ms),
            c.linked_by
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Unlinks a chat.
pub fn unlink(config: Option<PathBuf>, chat_id: i64) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    let mut links = Links::open(&config.state_dir)?;
    if links.unlink(chat_id)? {
        println!("chat {chat_id} unlinked");
        Ok(ExitCode::SUCCESS)
    } else {
        anyhow::bail!("chat {chat_id} is not linked");
    }
}
