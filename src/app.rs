//! Wiring: source → bounded channel → pipeline (decode, aggregate, store) → position.
//!
//! Shutdown order on SIGINT/SIGTERM (the `cancel` token): the source stops reading and
//! drops its end of the channel; the pipeline finishes the batches already read, commits
//! them with their positions, and ends; then the metrics server stops. Anything not yet
//! committed is read again at the next start, from the stored position.
//!
//! Architecture invariant: a batch's position is stored in the same transaction as its
//! effect ([`crate::store::Store::commit`]); nothing else moves a position.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::aggregate::Aggregate;
use crate::config::{
    Config, InputSource, KafkaInput, LifecycleInput, SecretSource, StartAt, StoreConfig,
};
use crate::deadletter::{
    DeadLetter, DeadLetterFile, DeadLetterSink, DEAD_LETTER_FILE, DEFAULT_MAX_BYTES,
};
use crate::deadletter_kafka::KafkaDeadLetters;
use crate::detect::Finding;
use crate::detection::Detection;
use crate::event::{AuthEvent, Decoder, Fingerprinter};
use crate::notify::Input;
use crate::server::Health;
use crate::source::kafka::{KafkaSettings, KafkaSource, OffsetStore};
use crate::source::lifecycle::LifecycleConsumer;
use crate::source::{self, Batch, FileFollower, FollowOptions, PartitionOffset, Position};
use crate::store::clickhouse::ClickHouseStore;
use crate::store::sqlite_offsets::SqliteOffsets;
use crate::store::{BatchWrite, Checkpoint, Origin, SqliteStore, Store, StoreError, StoredEvent};

/// File in the state directory holding the generated fingerprint secret.
pub const SECRET_FILE: &str = "fingerprint.secret";

/// What a run did, for the final log line and for tests.
#[derive(Debug, Default, Clone)]
pub struct RunSummary {
    pub lines: u64,
    pub events: u64,
    pub dead_letters: u64,
    pub batches: u64,
    /// Findings raised for the first time during the run.
    pub findings: Vec<Finding>,
}

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
    ))
}

/// The store the config asks for, and how the Kafka source reads its offsets back.
pub fn open_store(
    config: &Config,
) -> anyhow::Result<(Box<dyn Store + Send>, Arc<dyn OffsetStore>)> {
    match &config.store {
        StoreConfig::Sqlite => {
            let store = SqliteStore::open(&config.state_dir)
                .with_context(|| format!("state_dir {}", config.state_dir.display()))?;
            let offsets = Arc::new(SqliteOffsets {
                state_dir: config.state_dir.clone(),
            });
            Ok((Box::new(store), offsets))
        }
        StoreConfig::ClickHouse(c) => {
            let store = open_clickhouse(c)?;
            let offsets: Arc<dyn OffsetStore> = Arc::new(store.clone());
            Ok((Box::new(store), offsets))
        }
    }
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

/// The ClickHouse store of the config, its password read and its schema migrated.
pub fn open_clickhouse(
    c: &crate::store::clickhouse::ClickHouseConfig,
) -> anyhow::Result<ClickHouseStore> {
    let password = c
        .load_password()
        .map_err(|e| anyhow::anyhow!("store.clickhouse: {e}"))?;
    ClickHouseStore::open(c, password, tokio::runtime::Handle::current())
        .with_context(|| format!("store.clickhouse {}", c.url))
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
        max_wait: config.pipeline.batch_max_wait,
    })
}

/// Runs until the source ends (a file without `follow`, stdin at EOF) or `cancel` fires.
pub async fn run(
    config: Config,
    health: Arc<Health>,
    cancel: CancellationToken,
    findings: Option<mpsc::Sender<Input>>,
) -> anyhow::Result<RunSummary> {
    // The state directory holds the fingerprint secret and dead letters in every mode.
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("state_dir: cannot create {}", config.state_dir.display()))?;
    let (store, offsets) = open_store(&config)?;
    let mut detection = Detection::new(&config, findings)?;
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
            detection.follow_lifecycle(&config, &l.topic, rx)?;
            tracing::info!(topic = %l.topic, brokers = %l.brokers, "reading lifecycle events");
            if !detection.catch_up(l.catch_up_timeout).await? {
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
    let source_id = config.input.source.id();
    let saved = store
        .position(&source_id)
        .context("reading the stored source position")?;
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
            DeadLetterFile::open(&config.state_dir.join(DEAD_LETTER_FILE), DEFAULT_MAX_BYTES)
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
        max_wait: config.pipeline.batch_max_wait,
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
            detection.evaluate_only_when(source.leader());
            Reader::Kafka(source)
        }
    };

    let pipeline = Pipeline {
        store,
        decoder,
        source_id,
        dead_letters,
        detection,
        health: health.clone(),
        cancel: cancel.clone(),
        summary: RunSummary::default(),
        batch_max: config.pipeline.batch_max_events.get(),
    };
    let result = tokio::task::spawn_blocking(move || pipeline.run(rx))
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

struct Pipeline {
    store: Box<dyn Store + Send>,
    decoder: Decoder,
    source_id: String,
    dead_letters: Box<dyn DeadLetterSink>,
    detection: Detection,
    health: Arc<Health>,
    cancel: CancellationToken,
    summary: RunSummary,
    /// `pipeline.batch_max_events`: a batch this long says the source is behind.
    batch_max: usize,
}

impl Pipeline {
    fn run(mut self, mut rx: mpsc::Receiver<Batch>) -> anyhow::Result<RunSummary> {
        let rt = tokio::runtime::Handle::current();
        // Before the first batch: the source reads ahead into the bounded channel meanwhile.
        self.detection.warm_up(self.store.as_mut());
        loop {
            // Wake up for the detectors' schedule even when no input comes.
            let wait = self.detection.next_due();
            match rt.block_on(tokio::time::timeout(wait, rx.recv())) {
                Ok(Some(batch)) => {
                    // A full batch, or more waiting: the source is behind (a backlog after
                    // an outage or at start).
                    let behind = batch.len() >= self.batch_max || !rx.is_empty();
                    self.process(batch)?;
                    self.detection.set_behind(behind);
                }
                Ok(None) => break,
                Err(_elapsed) => self.detection.set_behind(false),
            }
            self.detection.tick(self.store.as_mut())?;
        }
        // The input is done (a one-shot read, or shutdown): a last evaluation.
        self.detection.evaluate(self.store.as_mut())?;
        self.summary.findings = std::mem::take(&mut self.detection.raised);
        Ok(self.summary)
    }

    fn process(&mut self, mut batch: Batch) -> anyhow::Result<()> {
        self.store_batch(&batch)?;
        self.detection.after_commit(self.store.as_mut())?;
        if let Some(ack) = batch.on_commit.take() {
            ack();
        }
        Ok(())
    }

    /// Decodes lines `range` of the batch into an aggregate (and raw events when the store
    /// keeps them). Undecodable lines go to the dead letter when `dead_letter` is set.
    fn decode<'b>(
        &mut self,
        batch: &'b Batch,
        range: std::ops::Range<usize>,
        dead_letter: bool,
    ) -> anyhow::Result<(Aggregate, Vec<StoredEvent<'b>>, u64)> {
        let mut agg = Aggregate::default();
        let mut events: Vec<AuthEvent<'b>> = Vec::new();
        let keep_raw = self.store.keeps_raw_events();
        let mut raw: Vec<StoredEvent<'b>> = Vec::new();
        let mut rejected = 0u64;
        for i in range {
            let line = batch.line(i);
            match self.decoder.decode(line, &mut events) {
                Ok(_) => {
                    for (index, ev) in events.drain(..).enumerate() {
                        agg.add(&ev);
                        if dead_letter {
                            // First pass only: a line stored again in isolation was seen.
                            self.detection.observe(&ev);
                        }
                        if keep_raw {
                            raw.push(StoredEvent {
                                origin: Origin {
                                    partition: batch.partition(i),
                                    offset: batch.line_offsets.get(i).copied().unwrap_or(0) as i64,
                                    index: index as u32,
                                },
                                event: ev,
                            });
                        }
                    }
                }
                Err(e) => {
                    rejected += 1;
                    if dead_letter {
                        metrics::counter!("keywatch_events_rejected_total", "reason" => e.kind())
                            .increment(1);
                        self.dead_letter(batch, i, &e.to_string())?;
                    }
                }
            }
        }
        if rejected > 0 && dead_letter {
            self.dead_letters
                .flush()
                .context("writing the dead letters")?;
        }
        Ok((agg, raw, rejected))
    }

    fn dead_letter(&mut self, batch: &Batch, i: usize, reason: &str) -> anyhow::Result<()> {
        let offset = batch.line_offsets.get(i).copied().unwrap_or(0);
        tracing::warn!(source = %self.source_id, offset, reason, "rejected a line");
        self.dead_letters
            .write(&DeadLetter {
                at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                source: &self.source_id,
                topic: batch.topics.get(i).map(|t| t.as_ref()),
                partition: batch.partitions.get(i).copied(),
                offset,
                reason: reason.to_owned(),
                line: self.decoder.redact(batch.line(i)),
            })
            .context("writing the dead letters")
    }

    fn store_batch(&mut self, batch: &Batch) -> anyhow::Result<()> {
        let (agg, raw, rejected) = self.decode(batch, 0..batch.len(), true)?;
        // The anomaly models see the batch once, here; what it raised (stream and anomaly
        // findings) is safe with the notifier before the batch is committed. After a crash
        // the models are warmed up from the store without this batch, and see it again.
        self.detection.observe_aggregate(&agg);
        self.detection.before_commit(self.store.as_mut())?;
        let source_id = self.source_id.clone();
        let checkpoint = batch.position.as_ref().map(|position| Checkpoint {
            source: &source_id,
            position,
        });
        let started = Instant::now();
        let stored = match self.commit_with_retry(&BatchWrite {
            aggregate: &agg,
            events: &raw,
            checkpoint,
        }) {
            Ok(()) => agg.events,
            Err(StoreError::Rejected(reason)) => {
                drop(raw);
                self.isolate_rejected(batch, &reason)?
            }
            Err(e) => return Err(e).context("storing a batch"),
        };
        metrics::histogram!("keywatch_store_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("keywatch_events_total").increment(stored);
        metrics::counter!("keywatch_batches_committed_total").increment(1);
        metrics::gauge!("keywatch_last_commit_timestamp_seconds")
            .set(chrono::Utc::now().timestamp() as f64);
        self.health.committed();

        self.summary.lines += batch.len() as u64;
        self.summary.events += stored;
        self.summary.dead_letters += rejected;
        self.summary.batches += 1;
        tracing::debug!(
            lines = batch.len(),
            events = stored,
            rejected,
            "batch committed"
        );
        Ok(())
    }

    /// The store refused the batch for good. Stores it again line by line, so that only the
    /// lines the store refuses go to the dead letter. Each line commits the position just
    /// after it (for Kafka, per partition), so that a crash in the middle neither loses nor
    /// repeats a line. Returns the events stored.
    fn isolate_rejected(&mut self, batch: &Batch, reason: &str) -> anyhow::Result<u64> {
        tracing::warn!(
            lines = batch.len(),
            reason,
            "the store rejected a batch; storing it line by line"
        );
        let source_id = self.source_id.clone();
        let mut stored = 0;
        for i in 0..batch.len() {
            let position = match &batch.position {
                Some(Position::Kafka { .. }) => Some(Position::Kafka {
                    offsets: vec![PartitionOffset {
                        topic: batch
                            .topics
                            .get(i)
                            .map(|t| t.to_string())
                            .unwrap_or_default(),
                        partition: batch.partition(i),
                        offset: batch.line_offsets.get(i).copied().unwrap_or(0) as i64 + 1,
                    }],
                }),
                // Line sources store positions only with their last line (their stores do not
                // reject rows; this path is for completeness).
                other if i + 1 == batch.len() => other.clone(),
                _ => None,
            };
            let checkpoint = position.as_ref().map(|position| Checkpoint {
                source: &source_id,
                position,
            });
            let (agg, raw, _) = self.decode(batch, i..i + 1, false)?;
            match self.commit_with_retry(&BatchWrite {
                aggregate: &agg,
                events: &raw,
                checkpoint,
            }) {
                // The models saw these lines in the first pass (those the store refuses
                // too: they happened at the gateway).
                Ok(()) => stored += agg.events,
                Err(StoreError::Rejected(why)) => {
                    metrics::counter!("keywatch_events_rejected_total", "reason" => "store_rejected")
                        .increment(1);
                    self.dead_letter(batch, i, &format!("rejected by the store: {why}"))?;
                    self.dead_letters
                        .flush()
                        .context("writing the dead letters")?;
                    let empty = Aggregate::default();
                    self.commit_with_retry(&BatchWrite {
                        aggregate: &empty,
                        events: &[],
                        checkpoint,
                    })
                    .context("storing the position after a rejected line")?;
                }
                Err(e) => return Err(e).context("storing a line"),
            }
        }
        Ok(stored)
    }

    /// Retries transient store errors with capped exponential backoff until it works or
    /// keywatch is asked to stop (the batch is then read again at the next start).
    fn commit_with_retry(&mut self, batch: &BatchWrite<'_, '_>) -> Result<(), StoreError> {
        let mut delay = Duration::from_millis(100);
        loop {
            match self.store.commit(batch) {
                Err(e) if e.is_transient() && !self.cancel.is_cancelled() => {
                    metrics::counter!("keywatch_store_errors_total", "kind" => "transient")
                        .increment(1);
                    tracing::warn!(error = %e, retry_in = ?delay, "store unavailable, retrying");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
                other => return other,
            }
        }
    }
}
