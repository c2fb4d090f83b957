//! The `keywatch` command: a thin layer over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{ArgGroup, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use keywatch::config::StoreConfig;
use keywatch::config::{self, Config, LogFormat};
use keywatch::server::{self, Health};
use keywatch::store::clickhouse::ClickHouseStore;
use keywatch::store::{SqliteStore, UsageReport};
use keywatch::{app, report, report_rotation, sample};

#[derive(Parser)]
#[command(
    name = "keywatch",
    version,
    about = "Watches API key usage so that key rotations finish without downtime"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Read gateway logs and keep per-key usage (the daemon)
    Run {
        /// Config file (TOML); without it, the embedded defaults: Kong logs on stdin,
        /// SQLite in ./keywatch-state
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config file without connecting to anything (and with --connect, reach
    /// the Kafka brokers and ClickHouse it names)
    CheckConfig {
        file: PathBuf,
        /// Also reach the services the config names and say what failed
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
        kind: Option<keywatch::detect::FindingKind>,
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
}

#[derive(Subcommand)]
enum NotifyAction {
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
enum SilenceAction {
    /// Silence findings about `key=ID` or `owner=NAME`
    Add {
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// `key=ID` or `owner=NAME`
        matcher: keywatch::notify::Matcher,
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

fn parse_property(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, found `{s}`"))
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (expected e.g. 30m, 24h, 7d)"))
}

/// An RFC 3339 time as milliseconds since the epoch.
fn parse_rfc3339_ms(s: &str) -> Result<i64, String> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| format!("{e} (expected RFC 3339, e.g. 2026-11-20T10:00:00Z)"))
}

fn load(path: Option<&PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(config::load(p)?),
        None => Ok(config::defaults()),
    }
}

fn init_tracing(config: &Config) {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match real_main(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::CheckConfig { file, connect } => match config::load(&file).and_then(check_rules) {
            Ok(c) => {
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
                let checks = tokio::runtime::Runtime::new()?.block_on(keywatch::connect::check(&c));
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
            Err(e) => {
                eprintln!("{e}");
                Ok(ExitCode::from(2))
            }
        },
        Command::Run { config } => {
            let config = load(config.as_ref())?;
            init_tracing(&config);
            tokio::runtime::Runtime::new()?.block_on(run(config))
        }
        Command::Usage {
            config,
            since,
            key,
            limit,
        } => {
            let config = load(config.as_ref())?;
            print_usage(&config, since, key.as_deref(), limit)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rotations { config, at } => {
            let config = load(config.as_ref())?;
            let registry = tokio::runtime::Runtime::new()?
                .block_on(keywatch::detection::registry_now(&config))?;
            print_rotations(&config, registry, &at)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Findings {
            config,
            since,
            kind,
            json,
        } => {
            let config = load(config.as_ref())?;
            let store = detection_store(&config)?;
            let all = store.findings(None, kind)?;
            let latest = all.iter().map(|f| f.last_at_ms).max();
            let rows = match (since, latest) {
                (Some(d), Some(l)) => store.findings(Some(l - d.as_millis() as i64), kind)?,
                _ => all,
            };
            if json {
                for f in &rows {
                    println!("{}", serde_json::to_string(&f.finding)?);
                }
            } else if rows.is_empty() {
                println!("no findings stored in {}", store.describe(&config));
            } else {
                println!("{}", report_rotation::stored_findings_table(&rows));
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Backtest {
            config: config_path,
            input,
            from,
            to,
            every,
        } => {
            let config = load(Some(&config_path))?;
            let (watcher, policy) = keywatch::detection::load_rules(&config)?;
            let registry = watcher.map_or_else(
                || Arc::new(keywatch::registry::Registry::empty()),
                |w| w.registry(),
            );
            let mut engine = keywatch::detect::Engine::new(registry, policy);
            // A scratch store in memory: the backtest must not touch the daemon's state.
            let mut store = SqliteStore::open_file(std::path::Path::new(":memory:"))?;
            let every_ms = every.as_millis() as i64;
            let found = match (input, from) {
                (Some(input), _) => {
                    let decoder = app::decoder(&config)?;
                    let file = std::fs::File::open(&input)
                        .with_context(|| format!("cannot open {}", input.display()))?;
                    let lines = std::io::BufRead::split(std::io::BufReader::new(file), b'\n')
                        .map_while(Result::ok);
                    keywatch::backtest::backtest(lines, &decoder, &mut engine, &mut store, every_ms)
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
                    let found = keywatch::backtest::backtest_events(
                        &mut events,
                        &mut engine,
                        &mut store,
                        every_ms,
                    );
                    eprintln!(
                        "replayed {} event(s) from ClickHouse database {}",
                        events.events_read(),
                        c.database
                    );
                    found
                }
                (None, None) => unreachable!("clap requires --input or --from"),
            }
            .map_err(|e| anyhow::anyhow!(e))?;
            let mut out = std::io::stdout().lock();
            for f in &found {
                std::io::Write::write_all(&mut out, serde_json::to_string(f)?.as_bytes())?;
                std::io::Write::write_all(&mut out, b"\n")?;
            }
            eprintln!("{} finding(s)", found.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Notify {
            action:
                NotifyAction::Test {
                    config,
                    channel,
                    owner,
                },
        } => {
            let config = load(config.as_ref())?;
            let routes = notify_config(&config)?;
            let sent = tokio::runtime::Runtime::new()?.block_on(async {
                let registry = registry(&config).await?;
                anyhow::Ok(keywatch::notify::send_test(&routes, &registry, &channel, &owner).await?)
            })?;
            println!("sent a test message: {sent}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Silence { action } => {
            let now = chrono::Utc::now().timestamp_millis();
            match action {
                SilenceAction::Add {
                    config,
                    matcher,
                    duration,
                    reason,
                } => {
                    let config = load(config.as_ref())?;
                    let mut store = SqliteStore::open(&config.state_dir)?;
                    let s = keywatch::notify::silence_add(
                        &mut store,
                        &matcher,
                        now + duration.as_millis() as i64,
                        &reason,
                        now,
                    )?;
                    println!(
                        "silence {} on {} until {} UTC",
                        s.id,
                        s.matcher,
                        report::format_ms(s.until_ms)
                    );
                }
                SilenceAction::List { config, all } => {
                    let config = load(config.as_ref())?;
                    let store = SqliteStore::open(&config.state_dir)?;
                    let rows = keywatch::notify::silence_list(&store, now, all)?;
                    if rows.is_empty() {
                        println!("no silences");
                    }
                    for s in rows {
                        println!(
                            "{}\t{}\tuntil {} UTC\t{}{}",
                            s.id,
                            s.matcher,
                            report::format_ms(s.until_ms),
                            s.reason,
                            if s.removed_ms.is_some() {
                                " (removed)"
                            } else {
                                ""
                            }
                        );
                    }
                }
                SilenceAction::Remove { config, id } => {
                    let config = load(config.as_ref())?;
                    let mut store = SqliteStore::open(&config.state_dir)?;
                    if keywatch::notify::silence_remove(&mut store, id, now)? {
                        println!("silence {id} removed");
                    } else {
                        anyhow::bail!("no silence {id} in force");
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Score { input, output } => {
            let reader: Box<dyn std::io::Read> = match &input {
                Some(p) => Box::new(
                    std::fs::File::open(p)
                        .with_context(|| format!("cannot open {}", p.display()))?,
                ),
                None => Box::new(std::io::stdin().lock()),
            };
            let writer: Box<dyn std::io::Write> = match &output {
                Some(p) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(p)
                        .with_context(|| format!("cannot create {}", p.display()))?,
                )),
                None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
            };
            let name = input
                .as_ref()
                .map_or("<stdin>".to_owned(), |p| p.display().to_string());
            let summary = keywatch::anomaly::score::score_csv(reader, writer)
                .with_context(|| name.clone())?;
            eprintln!(
                "{name}: scored {} rows, {} at 0.5 or more",
                summary.rows, summary.flagged
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Fingerprint { config } => {
            let config = load(config.as_ref())?;
            let secret = app::load_secret(&config)?;
            let mut raw = String::new();
            std::io::stdin().read_line(&mut raw)?;
            let fp = keywatch::event::Fingerprinter::new(&secret, config.fingerprint.hint_chars);
            println!("{}", fp.key_id(raw.trim()));
            Ok(ExitCode::SUCCESS)
        }
        Command::Produce {
            brokers,
            topic,
            file,
            config,
            properties,
        } => {
            let config = load(config.as_ref())?;
            let decoder = app::decoder(&config)?;
            let mut client = rdkafka::ClientConfig::new();
            client.set("bootstrap.servers", &brokers);
            for (k, v) in &properties {
                client.set(k, v);
            }
            let mut input: Box<dyn std::io::BufRead> = match &file {
                Some(path) => Box::new(std::io::BufReader::new(
                    std::fs::File::open(path)
                        .with_context(|| format!("cannot open {}", path.display()))?,
                )),
                None => Box::new(std::io::stdin().lock()),
            };
            let sent = keywatch::produce::produce(client, &topic, &mut input, Some(&decoder))?;
            eprintln!("sent {sent} message(s) to {topic}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Sample {
            preset,
            lines,
            seed,
            output,
        } => {
            let opts = sample::SampleOptions {
                preset,
                lines,
                seed,
                ..sample::SampleOptions::default()
            };
            match output {
                Some(path) => {
                    let mut f = std::io::BufWriter::new(
                        std::fs::File::create(&path)
                            .with_context(|| format!("cannot create {}", path.display()))?,
                    );
                    sample::write_to(&opts, &mut f)?;
                    std::io::Write::flush(&mut f)?;
                }
                None => sample::write_to(&opts, &mut std::io::stdout().lock())?,
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn run(config: Config) -> anyhow::Result<ExitCode> {
    let cancel = CancellationToken::new();
    let health = Arc::new(Health::default());
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let server_task = match config.server {
        Some(addr) => {
            let (bound, task) = server::serve(addr, health.clone(), Some(metrics), cancel.clone())
                .await
                .with_context(|| format!("server.listen {addr}"))?;
            tracing::info!(%bound, "serving /metrics and /healthz");
            Some(task)
        }
        None => None,
    };

    let signals = cancel.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down: finishing the batches read so far");
        signals.cancel();
    });

    // The notifier: its own task, fed new findings by the pipeline through a bounded
    // channel. Its log lives in the embedded store in every mode.
    let mut notifier = keywatch::notify::Notifier::new(
        notify_config(&config)?,
        // The file's registry; the detectors send the lifecycle topic's changes once read.
        match &config.rules.keys {
            Some(p) => Arc::new(keywatch::registry::Registry::load(p)?),
            None => Arc::new(keywatch::registry::Registry::empty()),
        },
        SqliteStore::open(&config.state_dir)?,
    )?;
    // In full mode every attempt is also written to ClickHouse (dashboards), in batches.
    let attempt_sink = match &config.store {
        StoreConfig::ClickHouse(c) => {
            let store = app::open_clickhouse(c)?;
            let (tx, rx) = tokio::sync::mpsc::channel(1024);
            // What the group's other instances delivered counts as told here too.
            notifier = notifier
                .with_attempt_sink(tx)
                .with_shared_log(Arc::new(store.clone()));
            Some(tokio::spawn(keywatch::store::clickhouse::run_attempt_sink(
                store, rx,
            )))
        }
        StoreConfig::Sqlite => None,
    };
    let (findings_tx, findings_rx) = tokio::sync::mpsc::channel::<keywatch::notify::Input>(64);
    let notify_cancel = CancellationToken::new();
    let notify_task = tokio::spawn(notifier.run(findings_rx, notify_cancel.clone()));

    let result = app::run(config.clone(), health, cancel.clone(), Some(findings_tx)).await;
    // The pipeline has stopped and dropped its sender: the notifier drains what is due,
    // then ends; a channel still retrying is given up after a while (the log keeps it).
    if tokio::time::timeout(Duration::from_secs(35), notify_task)
        .await
        .is_err()
    {
        notify_cancel.cancel();
    }
    if let Some(sink) = attempt_sink {
        // The notifier has ended and dropped its sender: the sink writes what it holds.
        if tokio::time::timeout(Duration::from_secs(15), sink)
            .await
            .is_err()
        {
            tracing::warn!("notification attempts not yet written to ClickHouse were dropped (they are in the embedded log)");
        }
    }
    cancel.cancel();
    if let Some(task) = server_task {
        let _ = task.await;
    }
    let summary = result?;
    tracing::info!(
        lines = summary.lines,
        events = summary.events,
        dead_letters = summary.dead_letters,
        "stopped"
    );
    if !config.input.follow {
        // A one-shot read (the quick start): show what was stored.
        print_usage(&config, None, None, 50)?;
        if let Some(registry) = keywatch::detection::registry_now(&config).await? {
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
                    .join(keywatch::deadletter::DEAD_LETTER_FILE)
                    .display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn notify_config(config: &Config) -> anyhow::Result<keywatch::notify::Config> {
    Ok(match &config.rules.routes {
        Some(p) => keywatch::notify::Config::load(p)?,
        None => keywatch::notify::Config::default(),
    })
}

/// The registry file plus the lifecycle topic, read to its end (see
/// [`keywatch::detection::registry_now`]).
async fn registry(config: &Config) -> anyhow::Result<Arc<keywatch::registry::Registry>> {
    Ok(keywatch::detection::registry_now(config)
        .await?
        .unwrap_or_else(|| Arc::new(keywatch::registry::Registry::empty())))
}

/// `check-config` also validates the rule files the config names (still no connections).
fn check_rules(c: Config) -> Result<Config, config::ConfigError> {
    if let Some(p) = &c.rules.keys {
        keywatch::registry::Registry::load(p)?;
    }
    if let Some(p) = &c.rules.policy {
        keywatch::detect::Policy::load(p)?;
    }
    if let Some(p) = &c.rules.routes {
        let routes = keywatch::notify::Config::load(p)?;
        keywatch::notify::check_templates(&routes)?;
    }
    Ok(c)
}

/// What `rotations` and `findings` read: the rotation view and the stored findings of the
/// configured store.
enum DetectionReader {
    Sqlite(SqliteStore),
    ClickHouse(ClickHouseStore),
}

impl DetectionReader {
    fn findings(
        &self,
        since_ms: Option<i64>,
        kind: Option<keywatch::detect::FindingKind>,
    ) -> Result<Vec<keywatch::store::views::StoredFinding>, keywatch::store::StoreError> {
        match self {
            DetectionReader::Sqlite(s) => s.findings(since_ms, kind),
            DetectionReader::ClickHouse(c) => c.findings(since_ms, kind),
        }
    }

    fn latest_event_ms(&self) -> Result<Option<i64>, keywatch::store::StoreError> {
        match self {
            DetectionReader::Sqlite(s) => s.latest_event_ms(),
            DetectionReader::ClickHouse(c) => c.latest_event_ms(),
        }
    }

    fn rotation_source(&self) -> &dyn keywatch::detect::RotationSource {
        match self {
            DetectionReader::Sqlite(s) => s,
            DetectionReader::ClickHouse(c) => c,
        }
    }

    /// Where the findings are, for "no findings stored in ...".
    fn describe(&self, config: &Config) -> String {
        match (self, &config.store) {
            (DetectionReader::ClickHouse(_), StoreConfig::ClickHouse(c)) => {
                format!("ClickHouse database {}", c.database)
            }
            _ => config.state_dir.display().to_string(),
        }
    }
}

/// The configured store, for the commands that need the rotation view and findings.
fn detection_store(config: &Config) -> anyhow::Result<DetectionReader> {
    match &config.store {
        StoreConfig::Sqlite => Ok(DetectionReader::Sqlite(SqliteStore::open(
            &config.state_dir,
        )?)),
        StoreConfig::ClickHouse(c) => {
            let password = c
                .load_password()
                .map_err(|e| anyhow::anyhow!("store.clickhouse: {e}"))?;
            Ok(DetectionReader::ClickHouse(
                ClickHouseStore::open_read_only(
                    c,
                    password,
                    tokio::runtime::Handle::try_current().ok(),
                )?,
            ))
        }
    }
}

/// The rotations in `registry` (the file plus the lifecycle topic, see
/// [`keywatch::detection::registry_now`]) as of `at`.
fn print_rotations(
    config: &Config,
    registry: Option<Arc<keywatch::registry::Registry>>,
    at: &str,
) -> anyhow::Result<()> {
    let store = detection_store(config)?;
    let now = match at {
        "latest" => store
            .latest_event_ms()?
            .unwrap_or_else(|| chrono::Utc::now().timestamp_millis()),
        "now" => chrono::Utc::now().timestamp_millis(),
        other => chrono::DateTime::parse_from_rfc3339(other)
            .with_context(|| format!("--at: expected latest, now or RFC 3339, found `{other}`"))?
            .timestamp_millis(),
    };
    let (_, policy) = keywatch::detection::load_rules(config)?;
    let Some(registry) = registry else {
        println!(
            "no key registry configured (rules.keys or rules.lifecycle): no rotations to show"
        );
        return Ok(());
    };
    let engine = keywatch::detect::Engine::new(registry, policy);
    let rows = engine.rotations(now, store.rotation_source());
    if rows.is_empty() {
        println!("no rotations in progress");
    } else {
        println!("Rotations as of {} UTC:", report::format_ms(now));
        println!("{}", report_rotation::rotations_table(&rows));
    }
    Ok(())
}

fn print_usage(
    config: &Config,
    since: Option<Duration>,
    key: Option<&str>,
    limit: usize,
) -> anyhow::Result<()> {
    let store: Box<dyn UsageReport> = match &config.store {
        StoreConfig::Sqlite => Box::new(SqliteStore::open_read_only(&config.state_dir)?),
        StoreConfig::ClickHouse(c) => {
            let password = c
                .load_password()
                .map_err(|e| anyhow::anyhow!("store.clickhouse: {e}"))?;
            Box::new(ClickHouseStore::open_read_only(
                c,
                password,
                tokio::runtime::Handle::try_current().ok(),
            )?)
        }
    };
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
