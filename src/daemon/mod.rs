//! The daemon runtime: what runs, on which thread or task, and in what order it stops.
//!
//! - [`pipeline`]: the per-batch order (decode → detectors → findings → commit → ack), one
//!   implementation for the daemon, [`backtest`] and the scenario tests; [`schedule`]: the
//!   clock and when rotations are evaluated; [`lifecycle`]: the registry file and the
//!   lifecycle topic followed; [`findings`]: where findings go (store, then notifier);
//!   [`anomaly_feed`]: the per-key models warmed up and fed; [`deadletter`] and
//!   [`deadletter_kafka`]: where bad lines go; [`server`]: `/metrics` and `/healthz`.
//! - Threads and tasks ([`run`]): the source reads on its own thread (file, stdin) or in
//!   librdkafka's (Kafka) and sends [`Batch`]es into a bounded channel; the pipeline is one
//!   blocking task (SQLite and the detectors are synchronous); the notifier, the lifecycle
//!   consumer, the ClickHouse attempt sink and the HTTP server are tokio tasks. The pipeline
//!   meets async code only in [`findings::FindingSink`] (bounded sends to the notifier) and
//!   in the ClickHouse store (which blocks on its own runtime handle).
//! - Start: a store that does not answer (transient errors) is waited for, with `/readyz`
//!   saying why and SIGTERM still heard ([`wait_for_store`]); other errors end the start.
//! - Shutdown on SIGINT/SIGTERM (the `cancel` token): the source stops reading and drops
//!   its end of the channel; the pipeline finishes the batch in hand (with an event-time
//!   clock, up to its next evaluation cut: the segments before are committed with their
//!   positions), starts none of those waiting in the channel, evaluates once more and
//!   ends; the notifier drains what is due; then the metrics server stops. Anything not
//!   committed is read again at the next start, from the stored position.
//!
//! Architecture invariant: a batch's position is stored in the same transaction as its
//! effect ([`crate::store::Store::commit`]); nothing else moves a position.

pub mod anomaly_feed;
pub mod backtest;
pub mod deadletter;
pub mod deadletter_kafka;
pub mod findings;
pub mod lifecycle;
pub mod pipeline;
pub mod schedule;
pub mod server;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{
    Config, InputSource, KafkaInput, LifecycleInput, SecretSource, StartAt, StoreConfig,
};
use crate::event::{Decoder, Fingerprinter};
use crate::notify::Input;
use crate::source::kafka::{KafkaSettings, KafkaSource};
use crate::source::lifecycle::LifecycleConsumer;
use crate::source::{self, Batch, FileFollower, FollowOptions, Position};
use deadletter::{DeadLetterFile, DeadLetterSink, DEAD_LETTER_FILE};
use deadletter_kafka::KafkaDeadLetters;
use findings::FindingSink;
use lifecycle::{load_rules, RegistryFeed};
use pipeline::{LineStage, Parts, Pipeline};
use schedule::{Clock, Ticks};
use server::Health;

pub use pipeline::RunSummary;

/// File in the state directory holding the generated fingerprint secret.
pub const SECRET_FILE: &str = "fingerprint.secret";

/// Loads the fingerprint secret the config points at; generates and keeps one in the state
/// directory when the config names none.
pub fn load_secret(config: &Config) -> anyhow::Result<Vec<u8>> {
    let secret = match &config.fingerprint.secret {
        SecretSource::Env(name) => std::env::var(name)
            .with_context(|| {
                format!("fingerprint.secret_env: environment variable {name} is not set")
            })?
            .into_bytes(),
        SecretSource::File(path) => std::fs::read(path)
            .with_context(|| format!("fingerprint.secret_file: cannot read {}", path.display()))?,
        SecretSource::StateDir => state_dir_secret(&config.state_dir)?,
    };
    let trimmed = secret.trim_ascii_end();
    if trimmed.len() < 16 {
        bail!(
            "the fingerprint secret must be at least 16 bytes, found {}",
            trimmed.len()
        );
    }
    Ok(trimmed.to_vec())
}

fn state_dir_secret(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let path = dir.join(SECRET_FILE);
    match std::fs::read(&path) {
        Ok(s) => return Ok(s),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    let mut raw = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .context("cannot read /dev/urandom for a fingerprint secret")?;
    let secret = hex::encode(raw);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    use std::io::Write;
    opts.open(&path)
        .and_then(|mut f| f.write_all(secret.as_bytes()).and_then(|_| f.sync_all()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    tracing::info!(path = %path.display(), "generated a fingerprint secret");
    Ok(secret.into_bytes())
}

/// Builds the decoder the config describes.
pub fn decoder(config: &Config) -> anyhow::Result<Decoder> {
    let secret = load_secret(config)?;
    Ok(Decoder::new(
        config.input.format.clone(),
        Fingerprinter::new(&secret, config.fingerprint.hint_chars),
        config.input.gateway.clone(),
    )
    .with_key_fallbacks(config.input.key_fallbacks.clone())
    .with_max_line_bytes(config.input.max_line_bytes))
}

/// librdkafka properties: `bootstrap.servers`, the fixed ones, and those read from the
/// environment (`field` names the config section in errors).
fn client_properties(
    field: &str,
    brokers: &str,
    fixed: &[(String, String)],
    from_env: &[(String, String)],
) -> anyhow::Result<Vec<(String, String)>> {
    let mut properties = vec![("bootstrap.servers".to_owned(), brokers.to_owned())];
    properties.extend(fixed.iter().cloned());
    for (prop, var) in from_env {
        let value = std::env::var(var).with_context(|| {
            format!("{field}.properties_env.{prop}: environment variable {var} is not set")
        })?;
        properties.push((prop.clone(), value));
    }
    Ok(properties)
}

/// The lifecycle consumer's librdkafka properties.
pub fn lifecycle_properties(l: &LifecycleInput) -> anyhow::Result<Vec<(String, String)>> {
    client_properties(
        "rules.lifecycle",
        &l.brokers,
        &l.properties,
        &l.properties_env,
    )
}

/// Resolves `properties_env` and builds the Kafka settings.
pub fn kafka_settings(k: &KafkaInput, config: &Config) -> anyhow::Result<KafkaSettings> {
    let properties =
        client_properties("input.kafka", &k.brokers, &k.properties, &k.properties_env)?;
    Ok(KafkaSettings {
        properties,
        topics: k.topics.clone(),
        group_id: k.group_id.clone(),
        max_messages: config.pipeline.batch_max_events.get(),
        max_bytes: config.pipeline.batch_max_bytes.get(),
        max_wait: config.pipeline.batch_max_wait,
    })
}

/// The clock of a run: the wall clock for a daemon that follows its input; event time for
/// a one-shot read, ticking every `rules.evaluate_every` of event time like
/// `keywatch backtest --every`, so that reading yesterday's log says what was true then.
pub fn clock(config: &Config) -> Clock {
    if config.input.follow {
        Clock::Wall {
            every: config.rules.evaluate_every,
        }
    } else {
        let every = config.rules.evaluate_every.as_millis();
        Clock::Event(Ticks::Every(i64::try_from(every).unwrap_or(i64::MAX)))
    }
}

/// Runs the pipeline until the source ends (a file without `follow`, stdin at EOF) or
/// `cancel` fires; findings go to `findings` (the notifier) when given.
pub async fn run(
    config: Config,
    health: Arc<Health>,
    cancel: CancellationToken,
    findings: Option<mpsc::Sender<Input>>,
) -> anyhow::Result<RunSummary> {
    run_with_gate(config, health, cancel, findings, None).await
}

/// [`run`]; `evaluator`, when given, learns whether this instance evaluates rotations (the
/// owners' bot polls only there): `true` for a file or stdin, the group leadership for Kafka.
pub async fn run_with_gate(
    config: Config,
    health: Arc<Health>,
    cancel: CancellationToken,
    findings: Option<mpsc::Sender<Input>>,
    evaluator: Option<Arc<std::sync::atomic::AtomicBool>>,
) -> anyhow::Result<RunSummary> {
    let mut evaluator = evaluator;
    // The state directory holds the fingerprint secret and dead letters in every mode.
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("state_dir: cannot create {}", config.state_dir.display()))?;
    let (store, offsets) =
        wait_for_store(&health, &cancel, || crate::store::open::open(&config)).await?;
    let source_id = config.input.source.id();
    let saved = store
        .position(&source_id)
        .context("reading the stored source position")?;
    let (watcher, policy) = load_rules(&config).context("rules")?;
    let mut pipeline = Pipeline::new(Parts {
        store,
        registry: RegistryFeed::new(watcher, config.rules.reload_every),
        policy,
        clock: clock(&config),
        findings: FindingSink::new(findings),
        source_id: source_id.clone(),
    })?;
    pipeline.stop_retrying_on(cancel.clone());
    pipeline.report_health(health.clone());
    health.done(server::WAIT_STORE);
    // Lifecycle events first: traffic is judged against a registry that knows them.
    let lifecycle_cancel = cancel.child_token();
    let lifecycle = match &config.rules.lifecycle {
        Some(l) => {
            let (tx, rx) = mpsc::channel(1024);
            let consumer = LifecycleConsumer::spawn(
                &lifecycle_properties(l)?,
                &l.topic,
                tx,
                lifecycle_cancel.clone(),
            )
            .context("rules.lifecycle")?;
            pipeline.registry_feed().follow_topic(
                &config.state_dir,
                config.dead_letter,
                &l.topic,
                rx,
            )?;
            tracing::info!(topic = %l.topic, brokers = %l.brokers, "reading lifecycle events");
            let caught_up = pipeline.catch_up(l.catch_up_timeout).await?;
            // Caught up or not, events now apply as they arrive: ready either way.
            health.done(server::WAIT_LIFECYCLE);
            if !caught_up {
                tracing::warn!(
                    topic = %l.topic,
                    timeout = ?l.catch_up_timeout,
                    "the lifecycle topic was not read to its end in time; starting anyway, \
                     events are applied as they arrive"
                );
            }
            Some(consumer)
        }
        None => None,
    };
    let decoder = decoder(&config)?;
    let dead_letters: Box<dyn DeadLetterSink> = match &config.input.source {
        InputSource::Kafka(k) if k.dead_letter_topic.is_some() => {
            let settings = kafka_settings(k, &config)?;
            Box::new(
                KafkaDeadLetters::new(
                    settings.client_config(),
                    k.dead_letter_topic.as_deref().unwrap_or_default(),
                )
                .context("input.kafka.dead_letter_topic")?,
            )
        }
        _ => Box::new(
            DeadLetterFile::open(&config.state_dir.join(DEAD_LETTER_FILE), config.dead_letter)
                .context("opening the dead-letter file")?,
        ),
    };

    let (tx, rx) = mpsc::channel::<Batch>(config.pipeline.channel_capacity.get());
    let opts = FollowOptions {
        path: match &config.input.source {
            InputSource::File(p) => p.clone(),
            _ => PathBuf::new(),
        },
        follow: config.input.follow,
        start_at_end: config.input.start_at == StartAt::End,
        max_lines: config.pipeline.batch_max_events.get(),
        max_bytes: config.pipeline.batch_max_bytes.get(),
        max_wait: config.pipeline.batch_max_wait,
        max_line_bytes: config.input.max_line_bytes,
        ..FollowOptions::default()
    };
    // The source gets its own token so that it can be stopped before the pipeline.
    let source_cancel = cancel.child_token();
    let reader = match &config.input.source {
        InputSource::File(path) => {
            let saved = match saved {
                Some(Position::File(p)) => Some(p),
                _ => None,
            };
            tracing::info!(path = %path.display(), follow = opts.follow, resume = ?saved.as_ref().map(|p| p.offset), "reading file");
            Reader::File(
                FileFollower::spawn(opts, saved, tx, source_cancel.clone())
                    .with_context(|| format!("input.path {}", path.display()))?,
            )
        }
        InputSource::Stdin => {
            tracing::info!("reading standard input");
            Reader::Stdin(source::stdin::spawn_stdin(&opts, tx, source_cancel.clone()))
        }
        InputSource::Kafka(k) => {
            let settings = kafka_settings(k, &config)?;
            tracing::info!(brokers = %k.brokers, topics = ?k.topics, group = %k.group_id, "consuming from Kafka");
            let source = KafkaSource::spawn(settings, offsets, tx, source_cancel.clone())
                .context("input.kafka")?;
            // Members of a group share the store (ClickHouse, or one SQLite state directory
            // on one host): one of them evaluates rotations.
            pipeline.evaluate_only_when(source.leader());
            pipeline.hold_keys_of(source.partition_changes());
            health.wait_for_assignment(source.assigned());
            if let Some(gate) = evaluator.take() {
                spawn_gate_mirror(source.leader(), gate, cancel.clone());
            }
            Reader::Kafka(source)
        }
    };

    let stage = LineStage::new(
        decoder,
        Some(dead_letters),
        source_id,
        config.pipeline.decode_threads.get(),
    );
    let batch_max = config.pipeline.batch_max_events.get();
    let result = tokio::task::spawn_blocking(move || pipeline.run(rx, stage, batch_max))
        .await
        .context("pipeline task panicked")?;
    // The pipeline ends when the source does, or on a fatal error: stop the source either way.
    source_cancel.cancel();
    let source_result = reader.join().await;
    if let Some(consumer) = lifecycle {
        // The pipeline has dropped the receiving end: the consumer stops at its next send;
        // `lifecycle_cancel` stops it while it waits for messages.
        lifecycle_cancel.cancel();
        let _ = tokio::task::spawn_blocking(move || consumer.join()).await;
    }
    match result {
        Ok(summary) => {
            source_result.context("source failed")?;
            Ok(summary)
        }
        Err(e) => {
            health
                .failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            Err(e)
        }
    }
}

/// Runs `open` (a store opening) until the store answers: transient errors (ClickHouse
/// still starting, a network outage) are retried with capped backoff until it answers or
/// `cancel` fires, and `/readyz` says why the instance is not ready meanwhile. Anything
/// else (a refused password, a bad schema) ends the start at once.
async fn wait_for_store<T>(
    health: &Health,
    cancel: &CancellationToken,
    mut open: impl FnMut() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut delay = Duration::from_millis(200);
    loop {
        let e = match open() {
            Ok(opened) => {
                health.store_answers();
                return Ok(opened);
            }
            Err(e) => e,
        };
        let transient = e
            .downcast_ref::<crate::store::StoreError>()
            .is_some_and(|s| s.is_transient());
        if !transient {
            return Err(e);
        }
        metrics::counter!("keywatch_store_errors_total", "kind" => "transient").increment(1);
        tracing::warn!(error = format!("{e:#}"), retry_in = ?delay, "the store does not answer yet, retrying");
        health.store_failing(&format!("{e:#}"));
        tokio::select! {
            _ = cancel.cancelled() => {
                return Err(e.context("asked to stop while waiting for the store"));
            }
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Keeps `gate` equal to the group leadership `leader` until `cancel`.
fn spawn_gate_mirror(
    leader: Arc<std::sync::atomic::AtomicBool>,
    gate: Arc<std::sync::atomic::AtomicBool>,
    cancel: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    tokio::spawn(async move {
        while !cancel.is_cancelled() {
            gate.store(leader.load(Relaxed), Relaxed);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}

enum Reader {
    File(FileFollower),
    Stdin(std::thread::JoinHandle<std::io::Result<()>>),
    Kafka(KafkaSource),
}

impl Reader {
    async fn join(self) -> anyhow::Result<()> {
        match self {
            Reader::File(f) => Ok(tokio::task::spawn_blocking(move || f.join()).await??),
            // A stdin read cannot be interrupted: don't wait for a thread still blocked in
            // it; it ends with the process.
            Reader::Stdin(h) if !h.is_finished() => Ok(()),
            Reader::Stdin(h) => Ok(h
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("stdin reader panicked")))?),
            Reader::Kafka(k) => k.join().await,
        }
    }
}

/// How `keywatch run` tells people.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServeOptions {
    /// `--dry-run`: detect and store as usual, render every notification to standard output
    /// and send none; the notification log is only read (see [`crate::notify::dry_run`]),
    /// the owners' Telegram bot stays off and no attempt is written to ClickHouse.
    pub dry_run: bool,
}

/// The notifier of a run: the real one, or the dry run's.
enum RunNotifier {
    Real(crate::notify::Notifier),
    DryRun(crate::notify::Notifier<crate::notify::DryRunLog<crate::store::SqliteStore>>),
}

impl RunNotifier {
    fn spawn(
        self,
        rx: mpsc::Receiver<Input>,
        cancel: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        match self {
            RunNotifier::Real(n) => tokio::spawn(n.run(rx, cancel)),
            RunNotifier::DryRun(n) => tokio::spawn(n.run(rx, cancel)),
        }
    }
}

/// `keywatch run`: the metrics server, signal handling, the notifier and the pipeline, until
/// the input ends or a signal asks to stop; then everything in order (see the module doc).
pub async fn serve(config: Config, options: ServeOptions) -> anyhow::Result<RunSummary> {
    let cancel = CancellationToken::new();
    let mut steps = vec![server::WAIT_STORE, server::WAIT_WARM_UP];
    if config.rules.lifecycle.is_some() {
        steps.push(server::WAIT_LIFECYCLE);
    }
    let health = Arc::new(Health::starting(&steps));
    let metrics = crate::telemetry::install().context("installing the metrics recorder")?;
    let routes = notify_config(&config)?;
    if options.dry_run {
        tracing::info!(
            "dry run: findings are detected and stored as usual; notifications are rendered \
             to standard output and not sent, and the notification log is left as it was"
        );
    }
    // The file's registry; the pipeline sends the lifecycle topic's changes once read.
    let registry = match &config.rules.keys {
        Some(p) => Arc::new(crate::registry::Registry::load(p)?),
        None => Arc::new(crate::registry::Registry::empty()),
    };
    let bot = if options.dry_run {
        None
    } else {
        telegram_bot(&config, &routes, &registry)?
    };
    let server_task = match config.server {
        Some(addr) => {
            let hook = bot.as_ref().and_then(|b| b.hook.clone());
            let (bound, task) =
                server::serve_with(addr, health.clone(), Some(metrics), hook, cancel.clone())
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
        tracing::info!("shutting down: finishing the batch in hand");
        signals.cancel();
    });

    // The notifier: its own task, fed new findings by the pipeline through a bounded
    // channel. Its log lives in the embedded store in every mode.
    // A dry run keeps the owners' bot off but still knows the chats owners linked to it.
    let links_without_bot =
        options.dry_run && crate::notify::bot::bot_config(&routes).is_ok_and(|b| b.is_some());
    let notifier_registry = match &bot {
        Some(b) => b.registry.borrow().clone(),
        None if links_without_bot => {
            tracing::info!("dry run: the owners' Telegram bot is off");
            Arc::new(crate::notify::bot::registry_with_links(
                &registry,
                &config.state_dir,
            ))
        }
        None => registry.clone(),
    };
    let log = crate::store::SqliteStore::open(&config.state_dir)?;
    let (notifier, attempt_sink) = if options.dry_run {
        let mut notifier = crate::notify::Notifier::dry_run(
            routes,
            notifier_registry,
            log,
            crate::notify::Console::Stdout,
        )?;
        if let StoreConfig::ClickHouse(c) = &config.store {
            // Read only: what the group's other instances delivered counts as told.
            let store =
                wait_for_store(&health, &cancel, || crate::store::open::open_clickhouse(c)).await?;
            notifier = notifier.with_shared_log(Arc::new(store));
        }
        (RunNotifier::DryRun(notifier), None)
    } else {
        let mut notifier = crate::notify::Notifier::new(routes, notifier_registry, log)?;
        // In full mode every attempt is also written to ClickHouse (dashboards), in batches.
        let attempt_sink = match &config.store {
            StoreConfig::ClickHouse(c) => {
                let store =
                    wait_for_store(&health, &cancel, || crate::store::open::open_clickhouse(c))
                        .await?;
                let (tx, rx) = mpsc::channel(1024);
                // What the group's other instances delivered counts as told here too.
                notifier = notifier
                    .with_attempt_sink(tx)
                    .with_shared_log(Arc::new(store.clone()));
                Some(tokio::spawn(crate::notify::run_attempt_sink(store, rx)))
            }
            StoreConfig::Sqlite => None,
        };
        (RunNotifier::Real(notifier), attempt_sink)
    };
    let (findings_tx, findings_rx) = mpsc::channel::<Input>(64);
    let notify_cancel = CancellationToken::new();
    // With the owners' bot, its feed sits between the pipeline and the notifier.
    let mut bot_task = None;
    let (findings_tx, notifier_rx, gate) = match bot {
        Some(b) => {
            // pipeline ─▶ feed ─▶ notifier
            let (pipeline_tx, feed_rx) = mpsc::channel::<Input>(64);
            tokio::spawn(crate::notify::bot::run_feed(
                feed_rx,
                findings_tx,
                registry,
                config.state_dir.clone(),
                crate::notify::bot::FeedSenders {
                    configured: b.configured_tx,
                    registry: b.registry_tx,
                    rotations: b.rotations_tx,
                },
                b.linked_rx,
            ));
            let gate = Arc::new(std::sync::atomic::AtomicBool::new(!matches!(
                config.input.source,
                InputSource::Kafka(_)
            )));
            match b.webhook {
                Some((url, secret, updates)) => {
                    let bot = b.bot.clone();
                    let c = cancel.clone();
                    bot_task = Some(tokio::spawn(async move {
                        bot.serve_webhook(&url, &secret, updates, c).await
                    }));
                }
                None => {
                    bot_task = Some(tokio::spawn(
                        b.bot.clone().poll(gate.clone(), cancel.clone()),
                    ));
                }
            }
            (pipeline_tx, findings_rx, Some(gate))
        }
        None if links_without_bot => {
            // pipeline ─▶ links added to each reloaded registry ─▶ notifier
            let (pipeline_tx, mut links_rx) = mpsc::channel::<Input>(64);
            let state_dir = config.state_dir.clone();
            tokio::spawn(async move {
                while let Some(input) = links_rx.recv().await {
                    let input = match input {
                        Input::Registry(r) => Input::Registry(Arc::new(
                            crate::notify::bot::registry_with_links(&r, &state_dir),
                        )),
                        other => other,
                    };
                    if findings_tx.send(input).await.is_err() {
                        break;
                    }
                }
            });
            (pipeline_tx, findings_rx, None)
        }
        None => (findings_tx, findings_rx, None),
    };
    let notify_task = notifier.spawn(notifier_rx, notify_cancel.clone());

    let result = run_with_gate(config, health, cancel.clone(), Some(findings_tx), gate).await;
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
    if let Some(task) = bot_task {
        // The poller confirms the updates it handled (a few seconds at most).
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    let summary = result?;
    tracing::info!(
        lines = summary.lines,
        events = summary.events,
        dead_letters = summary.dead_letters,
        "stopped"
    );
    Ok(summary)
}

/// The owners' Telegram bot of a run, wired: see [`crate::notify::bot`].
struct BotParts {
    bot: Arc<crate::notify::bot::Bot>,
    registry: tokio::sync::watch::Receiver<Arc<crate::registry::Registry>>,
    configured_tx: tokio::sync::watch::Sender<Arc<crate::registry::Registry>>,
    registry_tx: tokio::sync::watch::Sender<Arc<crate::registry::Registry>>,
    rotations_tx: tokio::sync::watch::Sender<Arc<Vec<crate::detect::RotationStatus>>>,
    linked_rx: tokio::sync::watch::Receiver<u64>,
    hook: Option<server::TelegramHook>,
    /// Webhook mode: the public URL, the secret, the updates the server takes.
    webhook: Option<(
        String,
        crate::registry::Secret,
        mpsc::Receiver<teloxide_core::types::Update>,
    )>,
}

fn telegram_bot(
    config: &Config,
    routes: &crate::notify::Config,
    registry: &Arc<crate::registry::Registry>,
) -> anyhow::Result<Option<BotParts>> {
    use crate::notify::bot::{self, BotMode};
    use tokio::sync::watch;
    let Some(bc) = bot::bot_config(routes).map_err(anyhow::Error::msg)? else {
        return Ok(None);
    };
    let (hook, webhook) = match &bc.mode {
        BotMode::Webhook { url, secret } => {
            if config.server.is_none() {
                bail!(
                    "{}: channels.{}.bot: webhook mode needs the daemon's HTTP server (server.listen in the config)",
                    routes.origin,
                    bc.channel
                );
            }
            let secret = secret.resolve().map_err(|e| {
                anyhow::anyhow!(
                    "{}: channels.{}.webhook_secret: {e}",
                    routes.origin,
                    bc.channel
                )
            })?;
            let (tx, rx) = mpsc::channel(256);
            (
                Some(server::TelegramHook {
                    secret: secret.clone(),
                    updates: tx,
                }),
                Some((url.clone(), secret, rx)),
            )
        }
        _ => (None, None),
    };
    let merged = Arc::new(bot::registry_with_links(registry, &config.state_dir));
    let (registry_tx, registry_rx) = watch::channel(merged);
    let (configured_tx, configured_rx) = watch::channel(registry.clone());
    let (rotations_tx, rotations_rx) = watch::channel(Arc::new(Vec::new()));
    let (linked_tx, linked_rx) = watch::channel(0u64);
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(15))
        .connect_timeout(Duration::from_secs(10))
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("keywatch/", env!("CARGO_PKG_VERSION")))
        .build()
        .context("building the Telegram bot's HTTP client")?;
    let b = bot::Bot::new(
        http,
        &bc,
        config.state_dir.clone(),
        bot::Feeds {
            configured: configured_rx,
            registry: registry_rx.clone(),
            rotations: rotations_rx,
        },
        linked_tx,
    )
    .map_err(|e| anyhow::anyhow!("{}: channels.{}.{e}", routes.origin, bc.channel))?;
    let mode = if hook.is_some() { "webhook" } else { "polling" };
    tracing::info!(channel = %bc.channel, mode, "owners' Telegram bot on");
    Ok(Some(BotParts {
        bot: Arc::new(b),
        registry: registry_rx,
        configured_tx,
        registry_tx,
        rotations_tx,
        linked_rx,
        hook,
        webhook,
    }))
}

/// The routes file the config names (console only without one).
pub fn notify_config(config: &Config) -> anyhow::Result<crate::notify::Config> {
    Ok(match &config.rules.routes {
        Some(p) => crate::notify::Config::load(p)?,
        None => crate::notify::Config::default(),
    })
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
