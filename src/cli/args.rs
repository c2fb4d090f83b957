//! The command line: every subcommand and its flags (clap). `src/main.rs` parses and
//! dispatches; each command lives in its own module of [`crate::cli`].

use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "keywatch",
    version,
    about = "Watches API key usage so that key rotations finish without downtime"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Read gateway logs and keep per-key usage (the daemon)
    Run {
        /// Config file (TOML); without it, the embedded defaults: Kong logs on stdin,
        /// SQLite in ./keywatch-state
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Detect and report, tell nobody: findings are stored and logged as usual, every
        /// notification is printed to standard output instead of sent, and the
        /// notification log is left as it was (a later run still sends)
        #[arg(long)]
        dry_run: bool,
    },
    /// Validate a config file without connecting to anything (and with --connect, reach
    /// the Kafka brokers, ClickHouse, SMTP servers and Telegram bots it names)
    CheckConfig {
        file: PathBuf,
        /// Also reach the services the config names and say what failed (SMTP: connect and
        /// log in, nothing sent; Telegram: getMe)
        #[arg(long)]
        connect: bool,
    },
    /// Per-key usage from the store
    Usage {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only the last DURATION before the latest stored event (e.g. 24h, 7d)
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Show the sources (ip, user agent, endpoint, gateway) of one key
        #[arg(long)]
        key: Option<String>,
        /// At most this many rows
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Rotations in progress: share moved to the new key, forecast, who is still on the old key
    Rotations {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Evaluate at this time: `latest` (the latest stored event), `now`, or RFC 3339
        #[arg(long, default_value = "latest")]
        at: String,
        /// Also write each rotation's adoption chart (the hourly share on the new key, the
        /// deadline and the forecast) to DIR as OLD-KEY_to_NEW-KEY.png
        #[arg(long, value_name = "DIR")]
        chart: Option<PathBuf>,
    },
    /// Findings stored so far (lingering old keys, revoked keys used, ...)
    Findings {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Only findings raised in the last DURATION before the latest one (e.g. 24h)
        #[arg(long, value_parser = parse_duration)]
        since: Option<Duration>,
        /// Only this kind (lingering_old_key, safe_to_revoke, ...)
        #[arg(long)]
        kind: Option<crate::detect::FindingKind>,
        /// One JSON object per line instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Replay a log through the detectors (event time as the clock) and print every finding
    /// it would raise, one JSON object per line
    #[command(group(ArgGroup::new("replay").required(true).args(["input", "from"])))]
    Backtest {
        #[arg(long, short)]
        config: PathBuf,
        /// The log to replay (in the config's input format)
        #[arg(long)]
        input: Option<PathBuf>,
        /// Replay the events stored in ClickHouse from this time on (RFC 3339; needs
        /// store.kind = "clickhouse" in the config)
        #[arg(long, value_parser = parse_rfc3339_ms)]
        from: Option<i64>,
        /// With --from: up to this time, excluded (RFC 3339; default: every stored event)
        #[arg(long, requires = "from", conflicts_with = "input", value_parser = parse_rfc3339_ms)]
        to: Option<i64>,
        /// How often rotations are evaluated, in event time
        #[arg(long, default_value = "1h", value_parser = parse_duration)]
        every: Duration,
        /// Lifecycle events (the lifecycle topic's JSON, one per line), each applied at its
        /// own time in event-time order with the traffic
        #[arg(long)]
        lifecycle: Option<PathBuf>,
    },
    /// Notifications: send a test message through a channel
    Notify {
        #[command(subcommand)]
        action: NotifyAction,
    },
    /// Silence notifications about a key or an owner for a while
    Silence {
        #[command(subcommand)]
        action: SilenceAction,
    },
    /// The owners' Telegram bot: link owners' chats with one-time codes
    Telegram {
        #[command(subcommand)]
        action: TelegramAction,
    },
    /// Score a time series (CSV `timestamp,value`) with the anomaly models: writes
    /// `timestamp,value,anomaly_score`, same rows, same order, scores in [0,1], causal
    Score {
        /// Input CSV (stdin without it)
        #[arg(long)]
        input: Option<PathBuf>,
        /// Output CSV (stdout without it)
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Print the fingerprint id of a raw key read from stdin (to match it in reports)
    Fingerprint {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Send a gateway log into a Kafka topic, one message per line, keyed by key id
    Produce {
        /// Bootstrap brokers, host:port[,host:port]
        #[arg(long, default_value = "127.0.0.1:9092")]
        brokers: String,
        #[arg(long)]
        topic: String,
        /// The log to send (stdin without it)
        #[arg(long)]
        file: Option<PathBuf>,
        /// Decode with this config's format and fingerprint secret to key messages by key
        /// id (the embedded defaults without it)
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Extra librdkafka properties, KEY=VALUE (repeatable)
        #[arg(long = "property", short = 'X', value_parser = parse_property)]
        properties: Vec<(String, String)>,
    },
    /// Write a realistic sample gateway log (several clients, one mid-rotation)
    Sample {
        /// kong, tyk, traefik, envoy, nginx or aws-apigw
        #[arg(long, default_value = "kong")]
        preset: String,
        #[arg(long, default_value_t = 4000)]
        lines: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output file (stdout without it)
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions { shell: clap_complete::Shell },
    /// Write the man pages (keywatch.1 and one per subcommand) into a directory, or print
    /// keywatch.1 without one
    Man {
        /// Directory to write keywatch.1, keywatch-run.1, ... into
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum NotifyAction {
    /// Send a test message to an owner (or team receiver) through one channel
    Test {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// A channel name from the routes file
        #[arg(long)]
        channel: String,
        /// An owner from the registry, or a team receiver
        #[arg(long)]
        owner: String,
    },
}

#[derive(Subcommand)]
pub enum TelegramAction {
    /// Print a one-time code; the owner sends `/start CODE` to the bot from their chat
    Link {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// An owner from the registry
        owner: String,
        /// How long the code works (at most 24h)
        #[arg(long, default_value = "15m", value_parser = parse_duration)]
        ttl: Duration,
    },
    /// The linked chats
    Chats {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Unlink a chat
    Unlink {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(allow_hyphen_values = true)]
        chat_id: i64,
    },
}

#[derive(Subcommand)]
pub enum SilenceAction {
    /// Silence findings about `key=ID` or `owner=NAME`
    Add {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// `key=ID` or `owner=NAME`
        matcher: crate::notify::Matcher,
        /// How long (e.g. 2d, 12h)
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Duration,
        #[arg(long)]
        reason: String,
    },
    /// Silences in force (all of them with --all)
    List {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        all: bool,
    },
    /// End a silence now
    Remove {
        #[arg(long, short)]
        config: Option<PathBuf>,
        id: i64,
    },
}

pub fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, found `{s}`"))
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 30m, 24h, 7d)"))
}

/// An RFC 3339 time as milliseconds since the epoch.
pub fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("{e} (expected RFC 3339, e.g. 2026-11-20T10:00:00Z)"))
}
