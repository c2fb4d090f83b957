//! Configuration: raw serde structs, validated into [`Config`].
//!
//! Loading is two steps: [`parse`] turns TOML text into [`RawConfig`] (syntax and types,
//! `deny_unknown_fields` everywhere), then [`RawConfig::validate`] checks values and cross
//! references and builds typed values. Neither does IO beyond reading the file in [`load`]:
//! secrets named by `*_env` / `*_file` are resolved at start, not during validation, so that
//! `keywatch check-config` works on a machine without them.
//!
//! Every error names the file, the field (a dotted path) and the reason, lowercase with no
//! trailing period: `keywatch.toml:4: input.format: unknown variant `kongg`, expected ...`.

use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::event::{FieldMapping, Format};

/// A configuration that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    /// 1-based line, when the error points into the text.
    pub line: Option<usize>,
    /// Dotted path of the offending field; empty when the error is about the whole file.
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.reason)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Where the embedded store, the fingerprint secret and dead letters live.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub input: RawInput,
    #[serde(default)]
    pub fingerprint: RawFingerprint,
    #[serde(default)]
    pub pipeline: RawPipeline,
    #[serde(default)]
    pub server: RawServer,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub rules: RawRules,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub dead_letter: RawDeadLetter,
}

/// `[dead_letter]`: how much of the dead-letter files is kept on disk.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDeadLetter {
    /// Bytes past which the current file is rotated (default 64 MiB).
    pub max_bytes: Option<u64>,
    /// Rotated files kept besides the current one (`.1` newest); the oldest is deleted, and
    /// its dead letters counted, when one more is rotated (default 1).
    pub keep_files: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// The embedded store in `state_dir` (the default).
    #[default]
    Sqlite,
    Clickhouse,
}

/// Where usage, positions and findings are kept.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    #[serde(default)]
    pub kind: StoreKind,
    pub clickhouse: Option<crate::store::clickhouse::ClickHouseConfig>,
}

/// Where the key registry and the rotation policy come from.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRules {
    /// The key registry (rules/README.md); without it, every key is unknown and only
    /// traffic-based findings are raised.
    pub keys: Option<PathBuf>,
    /// The rotation policy; without it, the defaults (the same as rules/policy.toml).
    pub policy: Option<PathBuf>,
    /// How often rotations are evaluated (default 1m).
    #[serde(default, deserialize_with = "duration::opt")]
    pub evaluate_every: Option<Duration>,
    /// How often the registry file is checked for changes (default 5s).
    #[serde(default, deserialize_with = "duration::opt")]
    pub reload_every: Option<Duration>,
    /// Notification routes and channels (rules/routes.toml); without it, every finding goes
    /// to the console.
    pub routes: Option<PathBuf>,
    /// Lifecycle events (key created, rotation started, key revoked or expired) from a
    /// Kafka topic, applied on top of the registry file.
    pub lifecycle: Option<RawLifecycle>,
}

/// `[rules.lifecycle]`: where lifecycle events come from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLifecycle {
    /// `host:port[,host:port...]`; default: `input.kafka.brokers` (and its properties).
    pub brokers: Option<String>,
    pub topic: String,
    /// How long start-up waits to read the topic to its end before reading traffic
    /// (default 30s); after it, keywatch starts anyway and catches up as it goes.
    #[serde(default, deserialize_with = "duration::opt")]
    pub catch_up_timeout: Option<Duration>,
    /// librdkafka properties passed through, as for `input.kafka`.
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    pub properties_env: std::collections::BTreeMap<String, String>,
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("keywatch-state")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum InputKind {
    #[default]
    Stdin,
    File,
    Kafka,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    #[default]
    Beginning,
    End,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInput {
    #[serde(default)]
    pub kind: InputKind,
    pub path: Option<PathBuf>,
    /// A gateway preset, or `json` with `[input.mapping]`.
    #[serde(default = "default_format")]
    pub format: String,
    /// Keep reading as the file grows (like `tail -F`); false reads to the end once.
    #[serde(default = "yes")]
    pub follow: bool,
    /// Where to start in a file keywatch has never read.
    #[serde(default)]
    pub start_at: StartAt,
    /// A gateway name for records that carry none.
    pub gateway: Option<String>,
    /// More places a preset looks for the key of a request it names none for (a refused
    /// request): id fields or headers (dot-separated paths), in order...
    #[serde(default)]
    pub key_id_fields: Vec<String>,
    /// ...then fields holding raw key material, fingerprinted on arrival.
    #[serde(default)]
    pub key_secret_fields: Vec<String>,
    pub mapping: Option<FieldMapping>,
    pub kafka: Option<RawKafka>,
    /// Longer lines (Kafka messages) are dead-lettered with their size, unread.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: u64,
}

fn default_max_line_bytes() -> u64 {
    crate::event::DEFAULT_MAX_LINE_BYTES as u64
}

/// The largest `input.max_line_bytes` accepted: a batch holds at least one line, in memory.
pub const MAX_LINE_BYTES_LIMIT: u64 = 256 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKafka {
    /// `host:port[,host:port...]`
    pub brokers: String,
    pub topics: Vec<String>,
    #[serde(default = "default_group")]
    pub group_id: String,
    /// Undecodable messages go here (with the reason in a header); without it, to the
    /// dead-letter file.
    pub dead_letter_topic: Option<String>,
    /// librdkafka properties passed through (`security.protocol`, `sasl.mechanisms`, ...).
    #[serde(default)]
    pub properties: std::collections::BTreeMap<String, String>,
    /// librdkafka properties whose values are read from environment variables at start
    /// (`"sasl.password" = "KAFKA_PASSWORD"`), so that secrets stay out of the file.
    #[serde(default)]
    pub properties_env: std::collections::BTreeMap<String, String>,
}

fn default_group() -> String {
    "keywatch".to_owned()
}

/// librdkafka properties keywatch sets itself: its exactly-once design depends on them.
pub const MANAGED_KAFKA_PROPERTIES: [&str; 5] = [
    "group.id",
    "bootstrap.servers",
    "enable.auto.offset.store",
    "enable.auto.commit",
    "enable.partition.eof",
];

impl Default for RawInput {
    fn default() -> Self {
        RawInput {
            kind: InputKind::default(),
            path: None,
            format: default_format(),
            follow: true,
            start_at: StartAt::default(),
            gateway: None,
            key_id_fields: Vec::new(),
            key_secret_fields: Vec::new(),
            mapping: None,
            kafka: None,
            max_line_bytes: default_max_line_bytes(),
        }
    }
}

fn default_format() -> String {
    "kong".to_owned()
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawFingerprint {
    /// Name of an environment variable holding the HMAC secret.
    pub secret_env: Option<String>,
    /// A file holding the HMAC secret (trailing whitespace ignored).
    pub secret_file: Option<PathBuf>,
    /// Characters of raw key material kept as a display hint (0 disables hints).
    pub hint_chars: Option<usize>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPipeline {
    pub batch_max_events: Option<usize>,
    /// Line bytes per batch at most (a longer single line still makes a batch).
    pub batch_max_bytes: Option<usize>,
    #[serde(default, deserialize_with = "duration::opt")]
    pub batch_max_wait: Option<Duration>,
    /// Batches read ahead of the store; bounds memory.
    pub channel_capacity: Option<usize>,
    /// Threads that decode a large batch (a backlog) at once.
    pub decode_threads: Option<usize>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    /// Serve `/metrics` and `/healthz`.
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(default = "default_listen")]
    pub listen: String,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            enabled: true,
            listen: default_listen(),
        }
    }
}

fn default_listen() -> String {
    "127.0.0.1:9464".to_owned()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    #[serde(default)]
    pub format: LogFormat,
    /// A tracing filter: `info`, `keywatch=debug`, ...
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: LogFormat::default(),
            level: default_level(),
        }
    }
}

fn default_level() -> String {
    "info".to_owned()
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from, for messages (`<defaults>` without one).
    pub origin: String,
    pub state_dir: PathBuf,
    pub input: InputConfig,
    pub fingerprint: FingerprintConfig,
    pub pipeline: PipelineConfig,
    pub server: Option<SocketAddr>,
    pub log: RawLog,
    pub rules: RulesConfig,
    pub store: StoreConfig,
    pub dead_letter: DeadLetterConfig,
}

/// How much of a dead-letter file is kept: the current file up to `max_bytes`, then
/// `keep_files` rotated ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLetterConfig {
    pub max_bytes: u64,
    pub keep_files: u32,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig {
            max_bytes: 64 << 20,
            keep_files: 1,
        }
    }
}

/// The smallest `dead_letter.max_bytes`: a few records (a record holds a line of up to
/// `input.max_line_bytes`, so a larger one still makes a file of its own).
pub const DEAD_LETTER_MIN_BYTES: u64 = 4096;
/// The most rotated dead-letter files kept: a budget beyond it wants a larger `max_bytes`.
pub const DEAD_LETTER_MAX_FILES: u32 = 1000;

// Built once at start: the ClickHouse variant's size (its cluster and TLS settings) does
// not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum StoreConfig {
    Sqlite,
    ClickHouse(crate::store::clickhouse::ClickHouseConfig),
}

#[derive(Debug, Clone)]
pub struct RulesConfig {
    pub keys: Option<PathBuf>,
    pub policy: Option<PathBuf>,
    pub evaluate_every: Duration,
    pub reload_every: Duration,
    pub routes: Option<PathBuf>,
    pub lifecycle: Option<LifecycleInput>,
}

/// A validated `[rules.lifecycle]`.
#[derive(Clone, PartialEq, Eq)]
pub struct LifecycleInput {
    pub brokers: String,
    pub topic: String,
    pub catch_up_timeout: Duration,
    pub properties: Vec<(String, String)>,
    /// (property, environment variable), resolved at start.
    pub properties_env: Vec<(String, String)>,
}

impl fmt::Debug for LifecycleInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Property values may be credentials: show the names only.
        let names: Vec<&str> = self.properties.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("LifecycleInput")
            .field("brokers", &self.brokers)
            .field("topic", &self.topic)
            .field("catch_up_timeout", &self.catch_up_timeout)
            .field("properties", &names)
            .field("properties_env", &self.properties_env)
            .finish()
    }
}

#[derive(Debug, Clone)]
pub struct InputConfig {
    pub source: InputSource,
    pub format: Format,
    pub follow: bool,
    pub start_at: StartAt,
    pub gateway: Option<String>,
    /// `key_id_fields` and `key_secret_fields`.
    pub key_fallbacks: crate::event::KeyFallbacks,
    pub max_line_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InputSource {
    Stdin,
    File(PathBuf),
    Kafka(KafkaInput),
}

#[derive(Clone, PartialEq, Eq)]
pub struct KafkaInput {
    pub brokers: String,
    pub topics: Vec<String>,
    pub group_id: String,
    pub dead_letter_topic: Option<String>,
    pub properties: Vec<(String, String)>,
    /// (property, environment variable), resolved at start.
    pub properties_env: Vec<(String, String)>,
}

impl fmt::Debug for KafkaInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Property values may be credentials: show the names only.
        let names: Vec<&str> = self.properties.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("KafkaInput")
            .field("brokers", &self.brokers)
            .field("topics", &self.topics)
            .field("group_id", &self.group_id)
            .field("dead_letter_topic", &self.dead_letter_topic)
            .field("properties", &names)
            .field("properties_env", &self.properties_env)
            .finish()
    }
}

impl InputSource {
    /// The name under which the source's position is stored.
    pub fn id(&self) -> String {
        match self {
            InputSource::Stdin => "stdin".to_owned(),
            InputSource::File(p) => format!("file:{}", p.display()),
            InputSource::Kafka(k) => format!("kafka:{}", k.group_id),
        }
    }
}

#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    Env(String),
    File(PathBuf),
    /// Generated at first start and kept in the state directory.
    StateDir,
}

impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(name) => write!(f, "env:{name}"),
            SecretSource::File(p) => write!(f, "file:{}", p.display()),
            SecretSource::StateDir => f.write_str("state_dir"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct FingerprintConfig {
    pub secret: SecretSource,
    pub hint_chars: usize,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub batch_max_events: NonZeroUsize,
    pub batch_max_bytes: NonZeroUsize,
    pub batch_max_wait: Duration,
    pub channel_capacity: NonZeroUsize,
    pub decode_threads: NonZeroUsize,
}

/// `pipeline.batch_max_bytes` when not set: 16 MiB, so that the default 4,096 events is
/// what binds for lines up to 4 KiB. (Until issue 19 a fixed 4 MiB cap in the file and
/// stdin readers held batches of 1 KB lines to about 4,100 whatever `batch_max_events`
/// said.) Memory bound: `channel_capacity` + 1 batches of this size, plus their events.
pub const DEFAULT_BATCH_MAX_BYTES: usize = 16 << 20;

/// `pipeline.batch_max_bytes` with ClickHouse when not set: 64 MiB, room for the default
/// 65,536 events of lines up to 1 KiB (a Kong record is about 1 KiB).
pub const CLICKHOUSE_BATCH_MAX_BYTES: usize = 64 << 20;

/// `pipeline.decode_threads` at most: more threads than this only contend for the
/// decoder's fingerprint cache.
pub const MAX_DECODE_THREADS: usize = 64;

/// `pipeline.decode_threads` when not set: the CPUs keywatch may use, at most 4 (the
/// pipeline thread's other work and the store's inserts run beside them).
pub fn default_decode_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
}

/// Reads and validates a config file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: file.clone(),
        line: None,
        field: String::new(),
        reason: format!("cannot read: {e}"),
    })?;
    parse(&file, &text)?.validate(&file)
}

/// The embedded defaults: stdin, Kong preset, SQLite in `./keywatch-state`.
pub fn defaults() -> Config {
    parse("<defaults>", "")
        .and_then(|raw| raw.validate("<defaults>"))
        .expect("the defaults are valid")
}

/// Parses TOML text into the raw structs; `file` is only used in errors.
pub fn parse(file: &str, text: &str) -> Result<RawConfig, ConfigError> {
    parse_toml(file, text)
}

/// 1-based line of the start of `span` in `text`.
pub fn line_of(text: &str, span: Option<std::ops::Range<usize>>) -> Option<usize> {
    span.map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1)
}

/// Parses TOML text into `T` (every keywatch TOML file): syntax and type errors carry the
/// line and the dotted path of the field.
pub fn parse_toml<T: DeserializeOwned>(file: &str, text: &str) -> Result<T, ConfigError> {
    let de = toml::Deserializer::parse(text).map_err(|e| ConfigError {
        file: file.to_owned(),
        line: line_of(text, e.span()),
        field: String::new(),
        reason: e.message().trim().to_owned(),
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut field = e.path().to_string();
        // A value wrapped in `Spanned` shows up as an inner field of its own.
        if let Some(i) = field.find(".$__serde_spanned") {
            field.truncate(i);
        }
        let inner = e.into_inner();
        ConfigError {
            file: file.to_owned(),
            line: line_of(text, inner.span()),
            field: if field == "." { String::new() } else { field },
            reason: inner.message().trim().to_owned(),
        }
    })
}

impl RawConfig {
    /// Checks values and cross references; no IO.
    pub fn validate(self, file: &str) -> Result<Config, ConfigError> {
        let err = |field: &str, reason: String| ConfigError {
            file: file.to_owned(),
            line: None,
            field: field.to_owned(),
            reason,
        };

        if self.state_dir.as_os_str().is_empty() {
            return Err(err("state_dir", "must not be empty".into()));
        }

        let input = &self.input;
        if input.kind != InputKind::Kafka && input.kafka.is_some() {
            return Err(err(
                "input.kafka",
                "only used with input.kind = \"kafka\"".into(),
            ));
        }
        let source = match (input.kind, &input.path) {
            (InputKind::File, Some(p)) if !p.as_os_str().is_empty() => InputSource::File(p.clone()),
            (InputKind::File, _) => {
                return Err(err(
                    "input.path",
                    "required when input.kind = \"file\"".into(),
                ))
            }
            (_, Some(_)) => {
                return Err(err(
                    "input.path",
                    "only used with input.kind = \"file\"".into(),
                ))
            }
            (InputKind::Stdin, None) => InputSource::Stdin,
            (InputKind::Kafka, None) => {
                let Some(k) = &input.kafka else {
                    return Err(err(
                        "input.kafka",
                        "required when input.kind = \"kafka\"".into(),
                    ));
                };
                InputSource::Kafka(
                    validate_kafka(k).map_err(|(f, r)| err(&format!("input.kafka.{f}"), r))?,
                )
            }
        };
        let format = match (input.format.as_str(), &input.mapping) {
            ("json", Some(m)) => {
                m.validate()
                    .map_err(|(field, reason)| err(&format!("input.mapping.{field}"), reason))?;
                Format::Json(m.clone())
            }
            ("json", None) => {
                return Err(err(
                    "input.mapping",
                    "required when input.format = \"json\"".into(),
                ))
            }
            (name, mapping) => {
                let Some(f) = Format::preset(name) else {
                    return Err(err(
                        "input.format",
                        format!(
                            "unknown format `{name}`, expected one of {}, json",
                            crate::event::PRESETS.join(", ")
                        ),
                    ));
                };
                if mapping.is_some() {
                    return Err(err(
                        "input.mapping",
                        "only used with input.format = \"json\"".into(),
                    ));
                }
                f
            }
        };
        if let Some(g) = &input.gateway {
            if g.trim().is_empty() {
                return Err(err("input.gateway", "must not be empty when set".into()));
            }
        }
        if !(1..=MAX_LINE_BYTES_LIMIT).contains(&input.max_line_bytes) {
            return Err(err(
                "input.max_line_bytes",
                format!("must be between 1 and {MAX_LINE_BYTES_LIMIT}"),
            ));
        }

        let fp = &self.fingerprint;
        let secret = match (&fp.secret_env, &fp.secret_file) {
            (Some(_), Some(_)) => {
                return Err(err(
                    "fingerprint",
                    "set secret_env or secret_file, not both".into(),
                ))
            }
            (Some(name), None) if name.is_empty() => {
                return Err(err("fingerprint.secret_env", "must not be empty".into()))
            }
            (Some(name), None) => SecretSource::Env(name.clone()),
            (None, Some(p)) => SecretSource::File(p.clone()),
            (None, None) => SecretSource::StateDir,
        };
        let hint_chars = fp.hint_chars.unwrap_or(4);
        if hint_chars > 8 {
            return Err(err(
                "fingerprint.hint_chars",
                format!("at most 8 characters of a key may be shown, found {hint_chars}"),
            ));
        }

        let p = &self.pipeline;
        let nonzero = |field: &str, v: Option<usize>, default: usize| {
            NonZeroUsize::new(v.unwrap_or(default))
                .ok_or_else(|| err(field, "must be at least 1".into()))
        };
        let pipeline = PipelineConfig {
            batch_max_events: nonzero(
                "pipeline.batch_max_events",
                p.batch_max_events,
                // ClickHouse wants large inserts: each batch is a new part in five tables,
                // and the server's CPU per part, not per row, is what a backlog costs
                // (BENCHMARKS.md, issue 19: 62 batches of 16,384 events cost 18.16 about
                // 12 CPU s per million events, 16 batches of 65,536 about 4.5). Live traffic
                // is cut by `batch_max_wait` long before this.
                match self.store.kind {
                    StoreKind::Clickhouse => 65_536,
                    StoreKind::Sqlite => 4096,
                },
            )?,
            batch_max_bytes: nonzero(
                "pipeline.batch_max_bytes",
                p.batch_max_bytes,
                match self.store.kind {
                    StoreKind::Clickhouse => CLICKHOUSE_BATCH_MAX_BYTES,
                    StoreKind::Sqlite => DEFAULT_BATCH_MAX_BYTES,
                },
            )?,
            batch_max_wait: p.batch_max_wait.unwrap_or(Duration::from_millis(200)),
            // Two batches of 64 MiB read ahead are as much as four of 16 MiB were.
            channel_capacity: nonzero(
                "pipeline.channel_capacity",
                p.channel_capacity,
                match self.store.kind {
                    StoreKind::Clickhouse => 2,
                    StoreKind::Sqlite => 4,
                },
            )?,
            decode_threads: nonzero(
                "pipeline.decode_threads",
                p.decode_threads,
                default_decode_threads(),
            )?,
        };
        if pipeline.decode_threads.get() > MAX_DECODE_THREADS {
            return Err(err(
                "pipeline.decode_threads",
                format!("must be at most {MAX_DECODE_THREADS}"),
            ));
        }
        if pipeline.batch_max_wait.is_zero() {
            return Err(err("pipeline.batch_max_wait", "must be more than 0".into()));
        }

        let server = if self.server.enabled {
            Some(self.server.listen.parse::<SocketAddr>().map_err(|_| {
                err(
                    "server.listen",
                    format!(
                        "expected an address like 127.0.0.1:9464, found `{}`",
                        self.server.listen
                    ),
                )
            })?)
        } else {
            None
        };

        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(err("log.level", format!("not a valid filter: {e}")));
        }

        let store = match (self.store.kind, &self.store.clickhouse) {
            (StoreKind::Sqlite, None) => StoreConfig::Sqlite,
            (StoreKind::Sqlite, Some(_)) => {
                return Err(err(
                    "store.clickhouse",
                    "only used with store.kind = \"clickhouse\"".into(),
                ))
            }
            (StoreKind::Clickhouse, c) => {
                let c = c.clone().unwrap_or_default();
                c.validate()
                    .map_err(|(f, r)| err(&format!("store.clickhouse.{f}"), r))?;
                if let InputSource::Kafka(k) = &source {
                    // The ClickHouse store tells topics apart by partition number.
                    if k.topics.len() > 1 {
                        return Err(err(
                            "input.kafka.topics",
                            "one topic per keywatch group with store.kind = \"clickhouse\" \
                             (run one group per topic)"
                                .into(),
                        ));
                    }
                }
                StoreConfig::ClickHouse(c)
            }
        };

        let dead_letter = {
            let d = DeadLetterConfig::default();
            let max_bytes = self.dead_letter.max_bytes.unwrap_or(d.max_bytes);
            if max_bytes < DEAD_LETTER_MIN_BYTES {
                return Err(err(
                    "dead_letter.max_bytes",
                    format!("must be at least {DEAD_LETTER_MIN_BYTES}, found {max_bytes}"),
                ));
            }
            let keep_files = self.dead_letter.keep_files.unwrap_or(d.keep_files);
            if keep_files > DEAD_LETTER_MAX_FILES {
                return Err(err(
                    "dead_letter.keep_files",
                    format!(
                        "at most {DEAD_LETTER_MAX_FILES} files, found {keep_files} (raise \
                         dead_letter.max_bytes instead)"
                    ),
                ));
            }
            DeadLetterConfig {
                max_bytes,
                keep_files,
            }
        };

        let positive = |field: &str, d: Option<Duration>, default: Duration| match d {
            Some(d) if d.is_zero() => Err(err(field, "must be more than 0".into())),
            Some(d) => Ok(d),
            None => Ok(default),
        };
        let rules = RulesConfig {
            keys: self.rules.keys.clone(),
            policy: self.rules.policy.clone(),
            evaluate_every: positive(
                "rules.evaluate_every",
                self.rules.evaluate_every,
                Duration::from_secs(60),
            )?,
            reload_every: positive(
                "rules.reload_every",
                self.rules.reload_every,
                Duration::from_secs(5),
            )?,
            routes: self.rules.routes.clone(),
            lifecycle: match &self.rules.lifecycle {
                Some(l) => Some(
                    validate_lifecycle(l, &source)
                        .map_err(|(f, r)| err(&format!("rules.lifecycle.{f}"), r))?,
                ),
                None => None,
            },
        };

        Ok(Config {
            origin: file.to_owned(),
            state_dir: self.state_dir,
            input: InputConfig {
                source,
                format,
                follow: input.follow,
                start_at: input.start_at,
                gateway: input.gateway.clone(),
                key_fallbacks: crate::event::KeyFallbacks {
                    id_fields: input.key_id_fields.clone(),
                    secret_fields: input.key_secret_fields.clone(),
                },
                max_line_bytes: input.max_line_bytes as usize,
            },
            fingerprint: FingerprintConfig { secret, hint_chars },
            pipeline,
            server,
            log: self.log,
            rules,
            store,
            dead_letter,
        })
    }
}

fn validate_lifecycle(
    l: &RawLifecycle,
    input: &InputSource,
) -> Result<LifecycleInput, (String, String)> {
    let e = |f: &str, r: &str| (f.to_owned(), r.to_owned());
    if l.topic.trim().is_empty() {
        return Err(e("topic", "must not be empty"));
    }
    let kafka = match input {
        InputSource::Kafka(k) => Some(k),
        _ => None,
    };
    if let Some(k) = kafka {
        if k.topics.contains(&l.topic) || k.dead_letter_topic.as_ref() == Some(&l.topic) {
            return Err(e(
                "topic",
                "must not be an input or dead-letter topic of input.kafka",
            ));
        }
    }
    let (brokers, mut properties, mut properties_env) = match (&l.brokers, kafka) {
        (Some(b), _) => (b.clone(), Vec::new(), Vec::new()),
        // The same cluster as the traffic: the same client settings.
        (None, Some(k)) => (
            k.brokers.clone(),
            k.properties.clone(),
            k.properties_env.clone(),
        ),
        (None, None) => {
            return Err(e(
                "brokers",
                "required unless input.kind = \"kafka\" (then input.kafka.brokers is used)",
            ))
        }
    };
    if brokers.split(',').all(|b| b.trim().is_empty()) {
        return Err(e("brokers", "expected host:port[,host:port...]"));
    }
    for (field, map) in [
        ("properties", &l.properties),
        ("properties_env", &l.properties_env),
    ] {
        for name in map.keys() {
            if MANAGED_KAFKA_PROPERTIES.contains(&name.as_str()) {
                return Err((
                    format!("{field}.{name}"),
                    "set by keywatch (the topic is read from its start by every instance)"
                        .to_owned(),
                ));
            }
        }
    }
    for (name, value) in &l.properties {
        properties.retain(|(k, _)| k != name);
        properties_env.retain(|(k, _)| k != name);
        properties.push((name.clone(), value.clone()));
    }
    for (name, var) in &l.properties_env {
        properties.retain(|(k, _)| k != name);
        properties_env.retain(|(k, _)| k != name);
        properties_env.push((name.clone(), var.clone()));
    }
    let catch_up_timeout = l.catch_up_timeout.unwrap_or(Duration::from_secs(30));
    Ok(LifecycleInput {
        brokers,
        topic: l.topic.clone(),
        catch_up_timeout,
        properties,
        properties_env,
    })
}

fn validate_kafka(k: &RawKafka) -> Result<KafkaInput, (String, String)> {
    let e = |f: &str, r: &str| (f.to_owned(), r.to_owned());
    if k.brokers.split(',').all(|b| b.trim().is_empty()) {
        return Err(e("brokers", "expected host:port[,host:port...]"));
    }
    if k.topics.is_empty() || k.topics.iter().any(|t| t.trim().is_empty()) {
        return Err(e("topics", "expected at least one topic name, none empty"));
    }
    if k.group_id.trim().is_empty() {
        return Err(e("group_id", "must not be empty"));
    }
    if let Some(t) = &k.dead_letter_topic {
        if t.trim().is_empty() {
            return Err(e("dead_letter_topic", "must not be empty when set"));
        }
        if k.topics.contains(t) {
            return Err(e(
                "dead_letter_topic",
                "must not be one of the input topics",
            ));
        }
    }
    for name in k.properties.keys().chain(k.properties_env.keys()) {
        if MANAGED_KAFKA_PROPERTIES.contains(&name.as_str()) {
            let field = if k.properties.contains_key(name) {
                "properties"
            } else {
                "properties_env"
            };
            return Err((
                format!("{field}.{name}"),
                "set by keywatch (use brokers and group_id, offsets are managed)".to_owned(),
            ));
        }
        if k.properties.contains_key(name) && k.properties_env.contains_key(name) {
            return Err((
                format!("properties_env.{name}"),
                "also set in properties".to_owned(),
            ));
        }
    }
    Ok(KafkaInput {
        brokers: k.brokers.clone(),
        topics: k.topics.clone(),
        group_id: k.group_id.clone(),
        dead_letter_topic: k.dead_letter_topic.clone(),
        properties: k.properties.clone().into_iter().collect(),
        properties_env: k.properties_env.clone().into_iter().collect(),
    })
}

/// Durations written as humans do: `200ms`, `30s`, `5m`, `72h`, `7d`.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn parse(s: &str) -> Result<Duration, String> {
        humantime::parse_duration(s.trim())
            .map_err(|_| format!("expected a duration like \"200ms\" or \"1m\", found `{s}`"))
    }

    pub fn opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map(Some).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<Config, String> {
        parse("kw.toml", text)
            .and_then(|raw| raw.validate("kw.toml"))
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_valid() {
        let c = defaults();
        assert_eq!(c.input.source, InputSource::Stdin);
        assert_eq!(c.input.format.name(), "kong");
        assert_eq!(c.server, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.fingerprint.secret, SecretSource::StateDir);
        assert_eq!(c.pipeline.batch_max_events.get(), 4096);
        assert_eq!(
            c.dead_letter,
            DeadLetterConfig {
                max_bytes: 64 << 20,
                keep_files: 1
            }
        );
    }

    #[test]
    fn a_full_config_is_read() {
        let c = check(
            r#"
state_dir = "/var/lib/keywatch"
[input]
kind = "file"
path = "/var/log/nginx/api.json"
format = "nginx"
follow = false
start_at = "end"
gateway = "edge-1"
[fingerprint]
secret_env = "KW_SECRET"
hint_chars = 0
[pipeline]
batch_max_events = 100
batch_max_wait = "1s"
[server]
listen = "0.0.0.0:9000"
[log]
format = "json"
level = "keywatch=debug"
[dead_letter]
max_bytes = 1048576
keep_files = 10
"#,
        )
        .unwrap();
        assert_eq!(
            c.input.source,
            InputSource::File("/var/log/nginx/api.json".into())
        );
        assert!(!c.input.follow);
        assert_eq!(c.input.start_at, StartAt::End);
        assert_eq!(c.fingerprint.secret, SecretSource::Env("KW_SECRET".into()));
        assert_eq!(c.pipeline.batch_max_wait, Duration::from_secs(1));
        assert_eq!(c.log.format, LogFormat::Json);
        assert_eq!(
            c.dead_letter,
            DeadLetterConfig {
                max_bytes: 1 << 20,
                keep_files: 10
            }
        );
    }

    #[test]
    fn the_lifecycle_topic_shares_the_input_cluster_settings_unless_told_otherwise() {
        let c = check(
            "[input]\nkind = \"kafka\"\n[input.kafka]\nbrokers = \"b:9092\"\ntopics = [\"t\"]\n\
             [input.kafka.properties]\n\"security.protocol\" = \"ssl\"\n\
             [input.kafka.properties_env]\n\"ssl.key.password\" = \"KP\"\n\
             [rules.lifecycle]\ntopic = \"key-lifecycle\"\n\
             [rules.lifecycle.properties]\n\"ssl.key.password\" = \"inline\"\n",
        )
        .unwrap();
        let l = c.rules.lifecycle.unwrap();
        assert_eq!(l.brokers, "b:9092");
        assert_eq!(l.topic, "key-lifecycle");
        assert_eq!(l.catch_up_timeout, Duration::from_secs(30));
        assert_eq!(
            l.properties,
            vec![
                ("security.protocol".to_owned(), "ssl".to_owned()),
                ("ssl.key.password".to_owned(), "inline".to_owned())
            ]
        );
        assert!(l.properties_env.is_empty());
        // Values never reach the debug output (logs).
        assert!(!format!("{l:?}").contains("inline"));
    }

    #[test]
    fn errors_name_file_line_field_and_reason() {
        let cases: &[(&str, &str)] = &[
            (
                "[input]\nformat = 3\n",
                "kw.toml:2: input.format: invalid type: integer `3`, expected a string",
            ),
            (
                "[input]\nfromat = \"kong\"\n",
                "kw.toml:2: input.fromat: unknown field `fromat`, expected one of `kind`, `path`, `format`, `follow`, `start_at`, `gateway`, `key_id_fields`, `key_secret_fields`, `mapping`, `kafka`, `max_line_bytes`",
            ),
            (
                "[input]\nkind = \"s3\"\n",
                "kw.toml:2: input.kind: unknown variant `s3`, expected one of `stdin`, `file`, `kafka`",
            ),
            (
                "[input]\nkind = \"kafka\"\n",
                "kw.toml: input.kafka: required when input.kind = \"kafka\"",
            ),
            (
                "[input]\nkind = \"kafka\"\n[input.kafka]\nbrokers = \"b:9092\"\ntopics = []\n",
                "kw.toml: input.kafka.topics: expected at least one topic name, none empty",
            ),
            (
                "[input]\nkind = \"kafka\"\n[input.kafka]\nbrokers = \"b:9092\"\ntopics = [\"t\"]\n[input.kafka.properties]\n\"enable.auto.commit\" = \"false\"\n",
                "kw.toml: input.kafka.properties.enable.auto.commit: set by keywatch (use brokers and group_id, offsets are managed)",
            ),
            (
                "[input]\nkind = \"file\"\n",
                "kw.toml: input.path: required when input.kind = \"file\"",
            ),
            (
                "[input]\nmax_line_bytes = 0\n",
                "kw.toml: input.max_line_bytes: must be between 1 and 268435456",
            ),
            (
                "[dead_letter]\nmax_bytes = 100\n",
                "kw.toml: dead_letter.max_bytes: must be at least 4096, found 100",
            ),
            (
                "[dead_letter]\nkeep_files = 5000\n",
                "kw.toml: dead_letter.keep_files: at most 1000 files, found 5000 (raise dead_letter.max_bytes instead)",
            ),
            (
                "[dead_letter]\nkeep_files = -1\n",
                "kw.toml:2: dead_letter.keep_files: invalid value: integer `-1`, expected u32",
            ),
            (
                "[dead_letter]\nmax_files = 3\n",
                "kw.toml:2: dead_letter.max_files: unknown field `max_files`, expected `max_bytes` or `keep_files`",
            ),
            (
                "[input]\nmax_line_bytes = -1\n",
                "kw.toml:2: input.max_line_bytes: invalid value: integer `-1`, expected u64",
            ),
            (
                "[rules.lifecycle]\ntopic = \"key-lifecycle\"\n",
                "kw.toml: rules.lifecycle.brokers: required unless input.kind = \"kafka\" (then input.kafka.brokers is used)",
            ),
            (
                "[input]\nkind = \"kafka\"\n[input.kafka]\nbrokers = \"b:9092\"\ntopics = [\"t\"]\n[rules.lifecycle]\ntopic = \"t\"\n",
                "kw.toml: rules.lifecycle.topic: must not be an input or dead-letter topic of input.kafka",
            ),
            (
                "[rules.lifecycle]\nbrokers = \"b:9092\"\ntopic = \"l\"\n[rules.lifecycle.properties]\n\"group.id\" = \"x\"\n",
                "kw.toml: rules.lifecycle.properties.group.id: set by keywatch (the topic is read from its start by every instance)",
            ),
            (
                "[input]\nformat = \"kongg\"\n",
                "kw.toml: input.format: unknown format `kongg`, expected one of kong, tyk, traefik, envoy, nginx, aws-apigw, json",
            ),
            (
                "[input]\nformat = \"json\"\n",
                "kw.toml: input.mapping: required when input.format = \"json\"",
            ),
            (
                "[input]\nformat = \"json\"\n[input.mapping]\ntimestamp = \"ts\"\n",
                "kw.toml: input.mapping.key_id: set key_id or key_secret (or both)",
            ),
            (
                "[fingerprint]\nsecret_env = \"A\"\nsecret_file = \"/b\"\n",
                "kw.toml: fingerprint: set secret_env or secret_file, not both",
            ),
            (
                "[fingerprint]\nhint_chars = 12\n",
                "kw.toml: fingerprint.hint_chars: at most 8 characters of a key may be shown, found 12",
            ),
            (
                "[pipeline]\nbatch_max_events = 0\n",
                "kw.toml: pipeline.batch_max_events: must be at least 1",
            ),
            (
                "[pipeline]\ndecode_threads = 0\n",
                "kw.toml: pipeline.decode_threads: must be at least 1",
            ),
            (
                "[pipeline]\ndecode_threads = 65\n",
                "kw.toml: pipeline.decode_threads: must be at most 64",
            ),
            (
                "[pipeline]\nbatch_max_wait = \"soon\"\n",
                "kw.toml:2: pipeline.batch_max_wait: expected a duration like \"200ms\" or \"1m\", found `soon`",
            ),
            (
                "[server]\nlisten = \"localhost\"\n",
                "kw.toml: server.listen: expected an address like 127.0.0.1:9464, found `localhost`",
            ),
            ("[input\n", "kw.toml:1: unclosed table, expected `]`"),
        ];
        for (text, want) in cases {
            assert_eq!(check(text).unwrap_err(), *want, "{text}");
        }
    }
}
