//! The `[clickhouse]` section of the configuration, and its secret.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// How to reach ClickHouse. Validation ([`ClickHouseConfig::validate`]) does no IO; the
/// password is read at start by [`ClickHouseConfig::load_password`].
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP interface, `http://host:8123` or `https://host:8443` (a path is allowed for
    /// proxies; no credentials).
    #[serde(default = "default_url")]
    pub url: String,
    /// HTTPS only: a PEM file of the CA certificates to trust instead of the built-in
    /// public roots (Mozilla's, from webpki-roots), for servers with a private CA.
    pub ca_file: Option<PathBuf>,
    /// Created at start when missing.
    #[serde(default = "default_database")]
    pub database: String,
    #[serde(default = "default_user")]
    pub user: String,
    /// Name of an environment variable holding the password.
    pub password_env: Option<String>,
    /// A file holding the password (trailing whitespace ignored).
    pub password_file: Option<PathBuf>,
    /// Prepended to every table name (`keywatch_events`, ...).
    #[serde(default = "default_prefix")]
    pub table_prefix: String,
    /// Raw events older than this are removed (TTL on servers that have it, dropped day
    /// partitions on older ones); 0 keeps them forever. Rollups are kept.
    #[serde(default = "default_retention_days")]
    pub retention_days: u32,
    /// Longest wait for one insert or bookkeeping query before it counts as a transient
    /// failure (and is retried by the pipeline).
    #[serde(default = "default_insert_timeout", deserialize_with = "duration")]
    pub insert_timeout: Duration,
    /// Longest wait for the deletion of an interrupted batch's rows at recovery.
    #[serde(default = "default_mutation_timeout", deserialize_with = "duration")]
    pub mutation_timeout: Duration,
    /// The body of inserts: `lz4` (ClickHouse's own framing, `decompress=1`; every server
    /// version has it) or `none`. On loopback `none` saves both sides a little CPU; over a
    /// network lz4 sends about a quarter of the bytes.
    #[serde(default)]
    pub compression: InsertCompression,
    /// A ClickHouse cluster instead of one server (`[store.clickhouse.cluster]`); unset:
    /// one server, as before.
    pub cluster: Option<ClusterConfig>,
}

/// How keywatch lays its tables out on a cluster (see `ARCHITECTURE.md`, "ClickHouse
/// cluster"). `{database}` and `{table}` in the paths are filled in by keywatch; other
/// `{macros}` (`{shard}`, `{replica}`) by each server from its `<macros>`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// A cluster of the servers' `<remote_servers>`: `ON CLUSTER` DDL, Distributed tables.
    pub name: String,
    /// ZooKeeper path of the sharded tables (events, rollups, sources, keys): one replica
    /// set per shard.
    #[serde(default = "default_shard_path")]
    pub zookeeper_path: String,
    /// Replica name of the sharded tables, unique within a shard.
    #[serde(default = "default_replica")]
    pub replica: String,
    /// ZooKeeper path of the small tables every server holds whole (offsets, findings,
    /// notifications, schema versions): one replica set over the whole cluster.
    #[serde(default = "default_global_path")]
    pub global_zookeeper_path: String,
    /// Replica name of those tables, unique over the whole cluster.
    #[serde(default = "default_global_replica")]
    pub global_replica: String,
    /// Replicas that must hold a batch's rows and offsets before it counts as committed
    /// (`insert_quorum`). 0: a majority of the replicas of each table (of the shard's
    /// replicas for sharded tables, of every server for the others); 1: no quorum.
    #[serde(default)]
    pub insert_quorum: u32,
}

fn default_shard_path() -> String {
    "/clickhouse/tables/{shard}/{database}/{table}".into()
}
fn default_replica() -> String {
    "{replica}".into()
}
fn default_global_path() -> String {
    "/clickhouse/tables/all/{database}/{table}".into()
}
fn default_global_replica() -> String {
    "{shard}-{replica}".into()
}

impl ClusterConfig {
    /// A cluster of this name with the default paths and quorum.
    pub fn named(name: &str) -> Self {
        ClusterConfig {
            name: name.to_owned(),
            zookeeper_path: default_shard_path(),
            replica: default_replica(),
            global_zookeeper_path: default_global_path(),
            global_replica: default_global_replica(),
            insert_quorum: 0,
        }
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if !is_identifier(&self.name) {
            return Err((
                "cluster.name",
                "must be letters, digits and `_`, starting with a letter or `_`".into(),
            ));
        }
        for (field, v) in [
            ("cluster.zookeeper_path", &self.zookeeper_path),
            ("cluster.replica", &self.replica),
            ("cluster.global_zookeeper_path", &self.global_zookeeper_path),
            ("cluster.global_replica", &self.global_replica),
        ] {
            if v.trim().is_empty() {
                return Err((field, "must not be empty".into()));
            }
            // Sent inside a string literal of the DDL.
            if v.contains(['\'', '\\', '\n', '\r', '\0']) {
                return Err((
                    field,
                    "must not contain quotes, backslashes or line breaks".into(),
                ));
            }
        }
        for (field, v) in [
            ("cluster.zookeeper_path", &self.zookeeper_path),
            ("cluster.global_zookeeper_path", &self.global_zookeeper_path),
        ] {
            if !v.starts_with('/') {
                return Err((field, format!("must start with `/`, found `{v}`")));
            }
            if !v.contains("{table}") {
                return Err((
                    field,
                    "must contain `{table}` (every table needs a path of its own)".into(),
                ));
            }
        }
        if !self.zookeeper_path.contains("{shard}") {
            return Err((
                "cluster.zookeeper_path",
                "must contain `{shard}` (each shard replicates its own rows)".into(),
            ));
        }
        if self.zookeeper_path == self.global_zookeeper_path {
            return Err((
                "cluster.global_zookeeper_path",
                "must differ from zookeeper_path".into(),
            ));
        }
        if self.insert_quorum > 16 {
            return Err((
                "cluster.insert_quorum",
                "must be at most 16 (0: a majority)".into(),
            ));
        }
        Ok(())
    }
}
/// See [`ClickHouseConfig::compression`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InsertCompression {
    #[default]
    Lz4,
    None,
}

fn default_url() -> String {
    "http://127.0.0.1:8123".into()
}
fn default_database() -> String {
    "keywatch".into()
}
fn default_user() -> String {
    "default".into()
}
fn default_prefix() -> String {
    "keywatch_".into()
}
fn default_retention_days() -> u32 {
    30
}
fn default_insert_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_mutation_timeout() -> Duration {
    Duration::from_secs(300)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(s.trim()).map_err(|_| {
        serde::de::Error::custom(format!(
            "expected a duration like \"30s\" or \"5m\", found `{s}`"
        ))
    })
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: default_url(),
            ca_file: None,
            database: default_database(),
            user: default_user(),
            password_env: None,
            password_file: None,
            table_prefix: default_prefix(),
            retention_days: default_retention_days(),
            insert_timeout: default_insert_timeout(),
            mutation_timeout: default_mutation_timeout(),
            compression: InsertCompression::default(),
            cluster: None,
        }
    }
}

impl fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("url", &redact_url(&self.url))
            .field("ca_file", &self.ca_file)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password_env", &self.password_env)
            .field("password_file", &self.password_file)
            .field("table_prefix", &self.table_prefix)
            .field("retention_days", &self.retention_days)
            .field("insert_timeout", &self.insert_timeout)
            .field("mutation_timeout", &self.mutation_timeout)
            .field("compression", &self.compression)
            .field("cluster", &self.cluster)
            .finish()
    }
}

/// The URL without any `user:password@` part.
pub(crate) fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => {
            let authority_end = rest.find('/').unwrap_or(rest.len());
            match rest[..authority_end].rfind('@') {
                Some(at) => format!("{scheme}://***@{}", &rest[at + 1..]),
                None => url.to_owned(),
            }
        }
        None => url.to_owned(),
    }
}

/// A simple SQL identifier: ClickHouse accepts it unquoted on every version.
pub(crate) fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl ClickHouseConfig {
    /// Checks values; no IO. The error is `(field, reason)`, the field relative to the
    /// `[clickhouse]` section.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let url = self.url.trim();
        let Some(rest) = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
        else {
            return Err((
                "url",
                format!(
                    "expected http://host:port or https://host:port, found `{}`",
                    redact_url(url)
                ),
            ));
        };
        match &self.ca_file {
            Some(_) if !self.is_https() => {
                return Err(("ca_file", "is only used with an https:// url".into()))
            }
            Some(p) if p.as_os_str().is_empty() => {
                return Err(("ca_file", "must not be empty".into()))
            }
            _ => {}
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        if authority.contains('@') {
            return Err((
                "url",
                "must not contain credentials; set user and password_env or password_file".into(),
            ));
        }
        if authority.is_empty() || authority.starts_with(':') {
            return Err(("url", "has no host".into()));
        }
        if let Some((_, port)) = authority
            .rsplit_once(':')
            .filter(|_| !authority.ends_with(']'))
        {
            if port.parse::<u16>().map_or(true, |p| p == 0) {
                return Err(("url", format!("bad port `{port}`")));
            }
        }
        if rest.contains(['?', '#']) {
            return Err(("url", "must not have a query string or fragment".into()));
        }
        if !is_identifier(&self.database) || self.database.len() > 64 {
            return Err((
                "database",
                "must be letters, digits and `_`, starting with a letter or `_` (at most 64)"
                    .into(),
            ));
        }
        if self.user.trim().is_empty() {
            return Err(("user", "must not be empty".into()));
        }
        match (&self.password_env, &self.password_file) {
            (Some(_), Some(_)) => {
                return Err((
                    "password_env",
                    "set password_env or password_file, not both".into(),
                ))
            }
            (Some(e), None) if e.trim().is_empty() => {
                return Err(("password_env", "must not be empty".into()))
            }
            (None, Some(p)) if p.as_os_str().is_empty() => {
                return Err(("password_file", "must not be empty".into()))
            }
            _ => {}
        }
        if !self.table_prefix.is_empty()
            && (!is_identifier(&self.table_prefix) || self.table_prefix.len() > 32)
        {
            return Err((
                "table_prefix",
                "must be letters, digits and `_`, starting with a letter or `_` (at most 32)"
                    .into(),
            ));
        }
        if self.retention_days > 36_500 {
            return Err((
                "retention_days",
                "must be at most 36500 (0 keeps forever)".into(),
            ));
        }
        for (field, d) in [
            ("insert_timeout", self.insert_timeout),
            ("mutation_timeout", self.mutation_timeout),
        ] {
            if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
                return Err((field, "must be between 100ms and 1h".into()));
            }
        }
        Ok(())
    }

    /// Whether the URL asks for TLS.
    pub fn is_https(&self) -> bool {
        self.url.trim().starts_with("https://")
    }

    /// Reads the password named by `password_env` or `password_file` (none when neither is
    /// set). The error names the variable or file, never the value.
    pub fn load_password(&self) -> Result<Option<Password>, String> {
        if let Some(name) = &self.password_env {
            return match std::env::var(name) {
                Ok(v) => Ok(Some(Password(v))),
                Err(std::env::VarError::NotPresent) => {
                    Err(format!("environment variable {name} is not set"))
                }
                Err(std::env::VarError::NotUnicode(_)) => {
                    Err(format!("environment variable {name} is not UTF-8"))
                }
            };
        }
        if let Some(path) = &self.password_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read password file {}: {e}", path.display()))?;
            return Ok(Some(Password(text.trim_end().to_owned())));
        }
        Ok(None)
    }
}

/// The ClickHouse password. `Debug` never shows it, and store errors have it removed.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub fn new(s: impl Into<String>) -> Self {
        Password(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(***)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ClickHouseConfig, String> {
        let c: ClickHouseConfig = toml::from_str(text).map_err(|e| e.message().to_owned())?;
        c.validate().map_err(|(f, r)| format!("{f}: {r}"))?;
        Ok(c)
    }

    #[test]
    fn defaults_and_full_section() {
        let c = parse("").unwrap();
        assert_eq!(c, ClickHouseConfig::default());
        assert_eq!(c.retention_days, 30);
        let c = parse(
            r#"url = "http://ch.internal:8123/proxy"
               database = "kw"
               user = "keywatch"
               password_env = "KW_CH_PASSWORD"
               table_prefix = ""
               retention_days = 0
               insert_timeout = "5s"
               mutation_timeout = "10m""#,
        )
        .unwrap();
        assert_eq!(c.insert_timeout, Duration::from_secs(5));
        assert_eq!(c.mutation_timeout, Duration::from_secs(600));
        assert_eq!(c.table_prefix, "");
        let c = parse(
            r#"url = "https://ch.internal:8443"
               ca_file = "/etc/keywatch/ch-ca.pem"
               [cluster]
               name = "main""#,
        )
        .unwrap();
        assert!(c.is_https());
        assert_eq!(c.cluster, Some(ClusterConfig::named("main")));
    }

    #[test]
    fn rejects_bad_values_with_field_and_reason() {
        let cases = [
            ("url = \"x:8123\"", "url: expected http://host:port"),
            (
                "ca_file = \"/ca.pem\"",
                "ca_file: is only used with an https:// url",
            ),
            ("[cluster]\nname = \"a-b\"", "cluster.name: must be letters"),
            (
                "[cluster]\nname = \"c\"\nzookeeper_path = \"/t/{table}\"",
                "cluster.zookeeper_path: must contain `{shard}`",
            ),
            (
                "[cluster]\nname = \"c\"\nglobal_zookeeper_path = \"/t/x\"",
                "cluster.global_zookeeper_path: must contain `{table}`",
            ),
            (
                "[cluster]\nname = \"c\"\nreplica = \"r'1\"",
                "cluster.replica: must not contain quotes",
            ),
            (
                "url = \"http://u:secret@x:8123\"",
                "url: must not contain credentials",
            ),
            ("url = \"http://x:0\"", "url: bad port `0`"),
            (
                "url = \"http://x:8123/?database=a\"",
                "url: must not have a query",
            ),
            ("database = \"a-b\"", "database: must be letters"),
            ("table_prefix = \"kw;\"", "table_prefix: must be letters"),
            ("user = \"\"", "user: must not be empty"),
            (
                "password_env = \"A\"\npassword_file = \"/b\"",
                "password_env: set password_env or password_file, not both",
            ),
            ("retention_days = 99999", "retention_days: must be at most"),
            ("insert_timeout = \"0s\"", "insert_timeout: must be between"),
            ("insert_timeout = \"soon\"", "expected a duration"),
            ("passwd = \"x\"", "unknown field `passwd`"),
        ];
        for (text, want) in cases {
            let got = parse(text).unwrap_err();
            assert!(got.contains(want), "{text}: {got}");
            assert!(!got.contains("secret"), "{got}");
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let c = ClickHouseConfig {
            url: "http://u:hunter2@x:8123".into(),
            ..ClickHouseConfig::default()
        };
        let shown = format!("{c:?} {:?}", Password::new("hunter2"));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("http://***@x:8123"), "{shown}");
    }

    #[test]
    fn password_from_env_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let c = ClickHouseConfig {
            password_file: Some(file),
            ..ClickHouseConfig::default()
        };
        assert_eq!(c.load_password().unwrap().unwrap().expose(), "s3cret");
        let c = ClickHouseConfig {
            password_env: Some("KEYWATCH_TEST_SURELY_UNSET_VARIABLE".into()),
            ..ClickHouseConfig::default()
        };
        assert!(c.load_password().unwrap_err().contains("is not set"));
        assert_eq!(ClickHouseConfig::default().load_password().unwrap(), None);
    }
}
