//! The generic `format = "json"`: a user-supplied mapping from event fields to dotted paths
//! in the JSON object. This is the fallback for gateways without a preset, so it reads the
//! line into a `serde_json::Value` and looks the paths up.

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::{Mutex, OnceLock};

use serde::Deserialize;
use serde_json::Value;

use super::formats::Parts;
use super::time::{self, epoch_to_ms, parse_timestamp, scale_epoch};
use super::value::{Num, Val};
use super::{normalize_path, DecodeError};

/// How the mapped timestamp is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampFormat {
    /// Strings as [`parse_timestamp`] reads them, numbers as an epoch with the unit guessed
    /// by magnitude.
    #[default]
    Auto,
    /// Epoch seconds (fractions allowed), as a number or numeric string.
    EpochS,
    EpochMs,
    EpochUs,
    EpochNs,
    /// RFC 3339 / ISO 8601 (no offset means UTC).
    Rfc3339,
    /// Common log format, `10/Oct/2000:13:55:36 -0700`.
    Clf,
}

/// The unit of the mapped latency.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LatencyUnit {
    #[default]
    Ms,
    S,
    Us,
    Ns,
}

impl LatencyUnit {
    fn ms_per_unit(self) -> f64 {
        match self {
            LatencyUnit::Ms => 1.0,
            LatencyUnit::S => 1e3,
            LatencyUnit::Us => 1e-3,
            LatencyUnit::Ns => 1e-6,
        }
    }
}

/// Config for `format = "json"`: each value a dotted path into the JSON object, e.g.
/// `"request.headers.x-api-key"`. A path segment that is a number indexes an array; a key
/// that itself contains dots is found too (the longest key wins at each level).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldMapping {
    pub timestamp: String,
    #[serde(default)]
    pub timestamp_format: TimestampFormat,
    /// A key id, stored as is. When both are set and the record has an id, the id wins.
    pub key_id: Option<String>,
    /// Raw key material: fingerprinted, never stored.
    pub key_secret: Option<String>,
    pub consumer: Option<String>,
    pub source_ip: Option<String>,
    pub user_agent: Option<String>,
    pub method: Option<String>,
    /// The request path; the endpoint when no route is mapped (normalized).
    pub path: Option<String>,
    /// A route name, used as the endpoint as is.
    pub route: Option<String>,
    /// The HTTP status; when not mapped, events have status 0.
    pub status: Option<String>,
    /// An error message or explicit outcome, for [`super::Outcome::classify`].
    pub message: Option<String>,
    pub latency: Option<String>,
    pub gateway: Option<String>,
    pub request_id: Option<String>,
    #[serde(default)]
    pub latency_unit: LatencyUnit,
}

impl FieldMapping {
    /// Checks the mapping: every path non-empty without empty segments, and a key field.
    /// The error is (field name, reason).
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        check_path("timestamp", &self.timestamp)?;
        for (name, path) in self.optional_paths() {
            if let Some(p) = path {
                check_path(name, p)?;
            }
        }
        if self.key_id.is_none() && self.key_secret.is_none() {
            return Err(("key_id", "set key_id or key_secret (or both)".to_owned()));
        }
        Ok(())
    }

    fn optional_paths(&self) -> [(&'static str, &Option<String>); 13] {
        [
            ("key_id", &self.key_id),
            ("key_secret", &self.key_secret),
            ("consumer", &self.consumer),
            ("source_ip", &self.source_ip),
            ("user_agent", &self.user_agent),
            ("method", &self.method),
            ("path", &self.path),
            ("route", &self.route),
            ("status", &self.status),
            ("message", &self.message),
            ("latency", &self.latency),
            ("gateway", &self.gateway),
            ("request_id", &self.request_id),
        ]
    }

    /// The last segment of the key_secret path, for redaction by name.
    pub(super) fn secret_leaf(&self) -> Option<&str> {
        let p = self.key_secret.as_deref()?;
        p.rsplit('.').next().filter(|s| !s.is_empty())
    }
}

fn check_path(name: &'static str, path: &str) -> Result<(), (&'static str, String)> {
    if path.trim().is_empty() {
        return Err((name, "empty path".to_owned()));
    }
    if path.split('.').any(str::is_empty) {
        return Err((name, format!("empty segment in path `{path}`")));
    }
    Ok(())
}

/// Paths as `&'static str`, so that decode errors can name them ([`DecodeError`] holds
/// static names). Each distinct path is leaked once per process: mappings come from the
/// config, so there are few.
fn intern(s: &str) -> &'static str {
    static SEEN: OnceLock<Mutex<HashSet<&'static str>>> = OnceLock::new();
    let mut seen = SEEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if let Some(&s) = seen.get(s) {
        return s;
    }
    let leaked: &'static str = Box::leak(s.to_owned().into_boxed_str());
    seen.insert(leaked);
    leaked
}

/// A mapping ready to decode: paths interned.
#[derive(Debug, Clone)]
pub(super) struct CompiledMapping {
    timestamp: &'static str,
    timestamp_format: TimestampFormat,
    key_id: Option<&'static str>,
    key_secret: Option<&'static str>,
    consumer: Option<&'static str>,
    source_ip: Option<&'static str>,
    user_agent: Option<&'static str>,
    method: Option<&'static str>,
    path: Option<&'static str>,
    route: Option<&'static str>,
    status: Option<&'static str>,
    message: Option<&'static str>,
    latency: Option<&'static str>,
    gateway: Option<&'static str>,
    request_id: Option<&'static str>,
    latency_unit: LatencyUnit,
}

impl CompiledMapping {
    pub(super) fn new(m: &FieldMapping) -> Self {
        let i = |p: &Option<String>| p.as_deref().map(intern);
        CompiledMapping {
            timestamp: intern(&m.timestamp),
            timestamp_format: m.timestamp_format,
            key_id: i(&m.key_id),
            key_secret: i(&m.key_secret),
            consumer: i(&m.consumer),
            source_ip: i(&m.source_ip),
            user_agent: i(&m.user_agent),
            method: i(&m.method),
            path: i(&m.path),
            route: i(&m.route),
            status: i(&m.status),
            message: i(&m.message),
            latency: i(&m.latency),
            gateway: i(&m.gateway),
            request_id: i(&m.request_id),
            latency_unit: m.latency_unit,
        }
    }

    /// Reads one JSON object into event parts.
    pub(super) fn parts(&self, root: &Value) -> Result<Parts<'static>, DecodeError> {
        let text = |p: Option<&'static str>| match p {
            Some(p) => val_at(root, p).text(p),
            None => Ok(None),
        };
        let ts_ms = self.timestamp(&val_at(root, self.timestamp))?;
        let status = match self.status {
            Some(p) => val_at(root, p).status(p)?,
            None => 0,
        };
        let latency_ms = match self.latency {
            Some(p) => val_at(root, p)
                .f64(p)?
                .map(|v| v * self.latency_unit.ms_per_unit()),
            None => None,
        };
        let endpoint = match text(self.route)? {
            Some(r) => Some(r),
            None => text(self.path)?.map(|p| Cow::Owned(normalize_path(&p).into_owned())),
        };
        Ok(Parts {
            ts_ms,
            status,
            message: text(self.message)?,
            key_id: text(self.key_id)?,
            key_secret: text(self.key_secret)?,
            consumer: text(self.consumer)?,
            source_ip: text(self.source_ip)?,
            user_agent: text(self.user_agent)?,
            method: text(self.method)?,
            endpoint,
            latency_ms,
            gateway: text(self.gateway)?,
            request_id: text(self.request_id)?,
        })
    }

    fn timestamp(&self, v: &Val<'_>) -> Result<i64, DecodeError> {
        let field = self.timestamp;
        if v.is_absent() {
            return Err(DecodeError::Missing(field));
        }
        let bad = |reason: &str| DecodeError::Invalid {
            field,
            reason: reason.to_owned(),
        };
        let epoch = |ms_per_unit: f64, reason: &str| -> Result<i64, DecodeError> {
            let n = v.num(field).map_err(|_| bad(reason))?;
            match n {
                Some(Num::Int(i)) if ms_per_unit == 1.0 => scale_epoch(i as f64, 1.0)
                    .map(|_| i)
                    .ok_or_else(|| bad(reason)),
                Some(n) => scale_epoch(n.as_f64(), ms_per_unit).ok_or_else(|| bad(reason)),
                None => Err(DecodeError::Missing(field)),
            }
        };
        let string = |parse: fn(&str) -> Option<i64>, reason: &str| match v {
            Val::Str(s) => parse(s.trim()).ok_or_else(|| bad(reason)),
            _ => Err(bad(reason)),
        };
        match self.timestamp_format {
            TimestampFormat::Auto => match v {
                Val::Str(s) => parse_timestamp(s).ok_or_else(|| bad(EXPECTED_TIMESTAMP)),
                Val::Int(i) => epoch_to_ms(*i as f64).ok_or_else(|| bad(EXPECTED_TIMESTAMP)),
                Val::Float(f) => epoch_to_ms(*f).ok_or_else(|| bad(EXPECTED_TIMESTAMP)),
                _ => Err(bad(EXPECTED_TIMESTAMP)),
            },
            TimestampFormat::EpochS => epoch(1e3, "expected epoch seconds"),
            TimestampFormat::EpochMs => epoch(1.0, "expected epoch milliseconds"),
            TimestampFormat::EpochUs => epoch(1e-3, "expected epoch microseconds"),
            TimestampFormat::EpochNs => epoch(1e-6, "expected epoch nanoseconds"),
            TimestampFormat::Rfc3339 => string(
                |s| time::parse_iso(s.as_bytes()),
                "expected an RFC 3339 timestamp",
            ),
            TimestampFormat::Clf => string(time::parse_clf, "expected a common log format time"),
        }
    }
}

pub(super) const EXPECTED_TIMESTAMP: &str =
    "expected a timestamp (RFC 3339, common log format or epoch number)";

/// The value at a dotted path, as a [`Val`] (strings copied: the `Value` is temporary).
fn val_at(root: &Value, path: &str) -> Val<'static> {
    match lookup(root, path) {
        Some(v) => to_val(v, true),
        None => Val::Absent,
    }
}

fn to_val(v: &Value, first_of_list: bool) -> Val<'static> {
    match v {
        Value::Null => Val::Absent,
        Value::Bool(b) => Val::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Val::Int(i),
            None => n.as_f64().map_or(Val::Other, Val::Float),
        },
        Value::String(s) => Val::Str(Cow::Owned(s.clone())),
        // A repeated header logged as a list counts as its first value.
        Value::Array(a) if first_of_list => match a.first() {
            None => Val::Absent,
            Some(v) => match to_val(v, false) {
                Val::Bool(_) => Val::Other,
                v => v,
            },
        },
        Value::Array(_) | Value::Object(_) => Val::Other,
    }
}

/// Looks a dotted path up: at each object the whole remaining path is tried as a key first,
/// then each split at a dot from the left; at an array, a numeric segment indexes it.
fn lookup<'v>(v: &'v Value, path: &str) -> Option<&'v Value> {
    match v {
        Value::Object(m) => {
            if let Some(x) = m.get(path) {
                return Some(x);
            }
            for (i, _) in path.match_indices('.') {
                if let Some(x) = m.get(&path[..i]) {
                    if let Some(found) = lookup(x, &path[i + 1..]) {
                        return Some(found);
                    }
                }
            }
            None
        }
        Value::Array(a) => {
            let (seg, rest) = match path.split_once('.') {
                Some((seg, rest)) => (seg, Some(rest)),
                None => (path, None),
            };
            let x = a.get(seg.parse::<usize>().ok()?)?;
            match rest {
                Some(rest) => lookup(x, rest),
                None => Some(x),
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::super::{AuthEvent, Decoder, Fingerprinter, Format, Outcome};
    use super::*;

    fn mapping(toml_text: &str) -> FieldMapping {
        toml::from_str(toml_text).unwrap()
    }

    fn base() -> FieldMapping {
        FieldMapping {
            timestamp: "ts".into(),
            timestamp_format: TimestampFormat::Auto,
            key_id: Some("auth.key_id".into()),
            key_secret: None,
            consumer: None,
            source_ip: None,
            user_agent: None,
            method: None,
            path: None,
            route: None,
            status: None,
            message: None,
            latency: None,
            gateway: None,
            request_id: None,
            latency_unit: LatencyUnit::Ms,
        }
    }

    fn decoder(m: FieldMapping) -> Decoder {
        Decoder::new(
            Format::Json(m),
            Fingerprinter::new(b"test-secret", 4),
            Some("edge-1".into()),
        )
    }

    fn decode_one(d: &Decoder, line: &str) -> Result<AuthEvent<'static>, DecodeError> {
        let mut out = Vec::new();
        let n = d.decode(line.as_bytes(), &mut out)?;
        assert_eq!(n, 1);
        assert_eq!(out.len(), 1);
        Ok(out.pop().unwrap().into_owned())
    }

    #[test]
    fn deserializes_from_toml() {
        let m = mapping(
            r#"
            timestamp = "request.time"
            timestamp_format = "epoch_ms"
            key_secret = "request.headers.x-api-key"
            status = "response.code"
            latency = "timing.total"
            latency_unit = "us"
            "#,
        );
        assert_eq!(m.timestamp, "request.time");
        assert_eq!(m.timestamp_format, TimestampFormat::EpochMs);
        assert_eq!(m.key_secret.as_deref(), Some("request.headers.x-api-key"));
        assert_eq!(m.key_id, None);
        assert_eq!(m.latency_unit, LatencyUnit::Us);
        assert_eq!(m.validate(), Ok(()));

        let formats = [
            ("auto", TimestampFormat::Auto),
            ("epoch_s", TimestampFormat::EpochS),
            ("epoch_ms", TimestampFormat::EpochMs),
            ("epoch_us", TimestampFormat::EpochUs),
            ("epoch_ns", TimestampFormat::EpochNs),
            ("rfc3339", TimestampFormat::Rfc3339),
            ("clf", TimestampFormat::Clf),
        ];
        for (name, want) in formats {
            let m = mapping(&format!(
                "timestamp = \"t\"\nkey_id = \"k\"\ntimestamp_format = \"{name}\""
            ));
            assert_eq!(m.timestamp_format, want);
        }
        for (name, want) in [
            ("ms", LatencyUnit::Ms),
            ("s", LatencyUnit::S),
            ("us", LatencyUnit::Us),
            ("ns", LatencyUnit::Ns),
        ] {
            let m = mapping(&format!(
                "timestamp = \"t\"\nkey_id = \"k\"\nlatency_unit = \"{name}\""
            ));
            assert_eq!(m.latency_unit, want);
        }
        assert_eq!(
            mapping("timestamp = \"t\"\nkey_id = \"k\"").latency_unit,
            LatencyUnit::Ms
        );

        for bad in [
            "timestamp = \"t\"\nkey_id = \"k\"\nbogus = \"x\"",
            "timestamp = \"t\"\nkey_id = \"k\"\ntimestamp_format = \"iso\"",
            "timestamp = \"t\"\nkey_id = \"k\"\nlatency_unit = \"minutes\"",
            "key_id = \"k\"",
        ] {
            assert!(toml::from_str::<FieldMapping>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validation() {
        assert_eq!(base().validate(), Ok(()));
        let cases: Vec<(FieldMapping, (&str, &str))> = vec![
            (
                FieldMapping {
                    key_id: None,
                    ..base()
                },
                ("key_id", "set key_id or key_secret (or both)"),
            ),
            (
                FieldMapping {
                    timestamp: "".into(),
                    ..base()
                },
                ("timestamp", "empty path"),
            ),
            (
                FieldMapping {
                    timestamp: "  ".into(),
                    ..base()
                },
                ("timestamp", "empty path"),
            ),
            (
                FieldMapping {
                    key_id: Some("".into()),
                    ..base()
                },
                ("key_id", "empty path"),
            ),
            (
                FieldMapping {
                    status: Some("".into()),
                    ..base()
                },
                ("status", "empty path"),
            ),
            (
                FieldMapping {
                    user_agent: Some("request..ua".into()),
                    ..base()
                },
                ("user_agent", "empty segment in path `request..ua`"),
            ),
            (
                FieldMapping {
                    request_id: Some("id.".into()),
                    ..base()
                },
                ("request_id", "empty segment in path `id.`"),
            ),
        ];
        for (m, (field, reason)) in cases {
            assert_eq!(m.validate(), Err((field, reason.to_owned())), "{m:?}");
        }
        let secret_only = FieldMapping {
            key_id: None,
            key_secret: Some("h.x-api-key".into()),
            ..base()
        };
        assert_eq!(secret_only.validate(), Ok(()));
        assert_eq!(secret_only.secret_leaf(), Some("x-api-key"));
    }

    #[test]
    fn dotted_paths() {
        let v: Value = serde_json::from_str(
            r#"{"a":{"b":{"c":1}},"x.y":{"z":2},"arr":[{"k":"v0"},{"k":"v1"}],"h":{"x-api-key":["k1","k2"]},"d.e.f":3}"#,
        )
        .unwrap();
        assert_eq!(val_at(&v, "a.b.c"), Val::Int(1));
        assert_eq!(val_at(&v, "x.y.z"), Val::Int(2));
        assert_eq!(val_at(&v, "arr.1.k"), Val::Str("v1".into()));
        assert_eq!(val_at(&v, "h.x-api-key"), Val::Str("k1".into()));
        assert_eq!(val_at(&v, "d.e.f"), Val::Int(3));
        assert_eq!(val_at(&v, "a.b"), Val::Other);
        assert_eq!(val_at(&v, "a.nope"), Val::Absent);
        assert_eq!(val_at(&v, "arr.9.k"), Val::Absent);
        assert_eq!(val_at(&v, "arr.x"), Val::Absent);
    }

    #[test]
    fn decodes_with_a_mapping() {
        let m = FieldMapping {
            timestamp: "request.time".into(),
            key_id: Some("auth.key.id".into()),
            key_secret: Some("request.headers.x-api-key".into()),
            consumer: Some("auth.consumer".into()),
            source_ip: Some("client.addr".into()),
            user_agent: Some("request.headers.user-agent".into()),
            method: Some("request.method".into()),
            path: Some("request.path".into()),
            route: Some("route".into()),
            status: Some("response.code".into()),
            message: Some("error".into()),
            latency: Some("timing.total".into()),
            latency_unit: LatencyUnit::S,
            gateway: Some("node".into()),
            request_id: Some("id".into()),
            ..base()
        };
        assert_eq!(m.validate(), Ok(()));
        let d = decoder(m);
        let raw = "sk_live_MAPPINGsecretKEY0042";
        let line = format!(
            r#"{{"request":{{"time":"2024-05-01T10:00:00.250+02:00","method":"POST","path":"/v1/orders/123?x=1","headers":{{"x-api-key":"{raw}","user-agent":"curl/8.5 \"q\""}}}},"response":{{"code":"401"}},"client":{{"addr":"10.1.2.3:5555"}},"error":"Key has expired","timing":{{"total":0.125}},"id":42,"auth":{{"consumer":"acme"}}}}"#
        );
        let ev = decode_one(&d, &line).unwrap();
        let fp = Fingerprinter::new(b"test-secret", 4);
        let mut want = AuthEvent::new(
            1_714_550_400_250,
            Cow::Owned(fp.key_id(raw)),
            401,
            Outcome::Expired,
        );
        want.key_hint = Some("…0042".into());
        want.consumer = Some("acme".into());
        want.source_ip = Some("10.1.2.3".into());
        want.user_agent = Some("curl/8.5 \"q\"".into());
        want.method = Some("POST".into());
        want.endpoint = Some("/v1/orders/:id".into());
        want.latency_ms = Some(125.0);
        want.gateway = Some("edge-1".into());
        want.request_id = Some("42".into());
        assert_eq!(ev, want);
        assert!(!format!("{ev:?}").contains(raw));

        // The id wins over the secret; the route over the path; the record's gateway over
        // the label.
        let line = r#"{"request":{"time":1714550400,"path":"/a/1"},"auth":{"key":{"id":"key-7"}},"route":"orders","node":"gw-3","response":{"code":200}}"#;
        let ev = decode_one(&d, line).unwrap();
        assert_eq!(ev.ts_ms, 1_714_550_400_000);
        assert_eq!(ev.key_id, "key-7");
        assert_eq!(ev.key_hint, None);
        assert_eq!(ev.endpoint.as_deref(), Some("orders"));
        assert_eq!(ev.gateway.as_deref(), Some("gw-3"));
        assert_eq!(ev.outcome, Outcome::Ok);

        // Errors name the path.
        let cases = [
            (
                r#"{"response":{"code":200}}"#,
                DecodeError::Missing("request.time"),
            ),
            (
                r#"{"request":{"time":"-"},"response":{"code":200}}"#,
                DecodeError::Missing("request.time"),
            ),
            (
                r#"{"request":{"time":"soon"},"response":{"code":200}}"#,
                DecodeError::Invalid {
                    field: "request.time",
                    reason: EXPECTED_TIMESTAMP.into(),
                },
            ),
            (
                r#"{"request":{"time":1714550400}}"#,
                DecodeError::Missing("response.code"),
            ),
            (
                r#"{"request":{"time":1714550400},"response":{"code":{"v":1}}}"#,
                DecodeError::Invalid {
                    field: "response.code",
                    reason: "expected a number or numeric string".into(),
                },
            ),
            (
                r#"{"request":{"time":1714550400},"response":{"code":200},"timing":{"total":"fast"}}"#,
                DecodeError::Invalid {
                    field: "timing.total",
                    reason: "expected a number or numeric string".into(),
                },
            ),
            (
                r#"{"request":{"time":1714550400,"headers":{"x-api-key":{"nested":"sk_x"}}},"response":{"code":200}}"#,
                DecodeError::Invalid {
                    field: "request.headers.x-api-key",
                    reason: "expected a string".into(),
                },
            ),
            (
                r#"["not","an","object"]"#,
                DecodeError::Json("expected a JSON object".into()),
            ),
        ];
        for (line, want) in cases {
            assert_eq!(decode_one(&d, line), Err(want), "{line}");
        }
        let mut out = Vec::new();
        assert!(matches!(
            d.decode(b"{\"request\":", &mut out),
            Err(DecodeError::Json(_))
        ));
        assert_eq!(d.decode(b"  \t ", &mut out), Ok(0));
        assert!(out.is_empty());
    }

    #[test]
    fn no_status_mapped_means_status_zero() {
        let d = decoder(FieldMapping {
            message: Some("result".into()),
            ..base()
        });
        let ev = decode_one(&d, r#"{"ts":"2024-05-01 08:00:00","auth":{"key_id":"k1"}}"#).unwrap();
        assert_eq!((ev.status, ev.outcome), (0, Outcome::Other));
        assert_eq!(ev.ts_ms, 1_714_550_400_000);
        let ev = decode_one(
            &d,
            r#"{"ts":"2024-05-01 08:00:00","auth":{"key_id":"k1"},"result":"rate_limited"}"#,
        )
        .unwrap();
        assert_eq!(ev.outcome, Outcome::RateLimited);
        // No key in the record at all.
        let ev = decode_one(&d, r#"{"ts":"2024-05-01 08:00:00"}"#).unwrap();
        assert_eq!(ev.key_id, super::super::NO_KEY);
    }

    #[test]
    fn each_timestamp_format() {
        let want = 1_614_232_668_342;
        let cases: &[(TimestampFormat, &str, Result<i64, &str>)] = &[
            (
                TimestampFormat::Auto,
                r#""2021-02-25T05:57:48.342Z""#,
                Ok(want),
            ),
            (
                TimestampFormat::Auto,
                r#""25/Feb/2021:06:57:48 +0100""#,
                Ok(want - 342),
            ),
            (TimestampFormat::Auto, "1614232668342", Ok(want)),
            (TimestampFormat::Auto, "1614232668.342", Ok(want)),
            (TimestampFormat::Auto, r#""1614232668342""#, Ok(want)),
            (TimestampFormat::Auto, "true", Err(EXPECTED_TIMESTAMP)),
            (TimestampFormat::EpochS, "1614232668.342", Ok(want)),
            (TimestampFormat::EpochS, r#""1614232668.342""#, Ok(want)),
            (
                TimestampFormat::EpochS,
                r#""soon""#,
                Err("expected epoch seconds"),
            ),
            (TimestampFormat::EpochMs, "1614232668342", Ok(want)),
            (TimestampFormat::EpochMs, r#""1614232668342""#, Ok(want)),
            (
                TimestampFormat::EpochMs,
                "-5",
                Err("expected epoch milliseconds"),
            ),
            (TimestampFormat::EpochUs, "1614232668342000", Ok(want)),
            (TimestampFormat::EpochNs, "1614232668342000000", Ok(want)),
            (
                TimestampFormat::EpochNs,
                r#""1614232668342000000""#,
                Ok(want),
            ),
            (
                TimestampFormat::EpochNs,
                r#"{"ns":1}"#,
                Err("expected epoch nanoseconds"),
            ),
            (
                TimestampFormat::Rfc3339,
                r#""2021-02-25T06:57:48.342+01:00""#,
                Ok(want),
            ),
            (
                TimestampFormat::Rfc3339,
                r#""2021-02-25 05:57:48.342""#,
                Ok(want),
            ),
            (
                TimestampFormat::Rfc3339,
                r#""25/Feb/2021:05:57:48 +0000""#,
                Err("expected an RFC 3339 timestamp"),
            ),
            (
                TimestampFormat::Rfc3339,
                "1614232668",
                Err("expected an RFC 3339 timestamp"),
            ),
            (
                TimestampFormat::Clf,
                r#""25/Feb/2021:00:57:48 -0500""#,
                Ok(want - 342),
            ),
            (
                TimestampFormat::Clf,
                r#""2021-02-25T05:57:48Z""#,
                Err("expected a common log format time"),
            ),
        ];
        for (fmt, ts, expected) in cases {
            let d = decoder(FieldMapping {
                timestamp: "t.at".into(),
                timestamp_format: *fmt,
                ..base()
            });
            let line = format!(r#"{{"t":{{"at":{ts}}},"auth":{{"key_id":"k"}}}}"#);
            let got = decode_one(&d, &line).map(|e| e.ts_ms);
            let expected = expected.map_err(|r| DecodeError::Invalid {
                field: "t.at",
                reason: r.into(),
            });
            assert_eq!(got, expected, "{fmt:?} {ts}");
        }
    }

    #[test]
    fn latency_units() {
        for (unit, v, want) in [
            (LatencyUnit::Ms, "12.5", 12.5),
            (LatencyUnit::S, "\"0.012\"", 12.0),
            (LatencyUnit::Us, "12500", 12.5),
            (LatencyUnit::Ns, "12500000", 12.5),
        ] {
            let d = decoder(FieldMapping {
                latency: Some("lat".into()),
                latency_unit: unit,
                ..base()
            });
            let line = format!(r#"{{"ts":1614232668,"lat":{v}}}"#);
            let got = decode_one(&d, &line).unwrap().latency_ms.unwrap();
            assert!((got - want).abs() < 1e-9, "{unit:?} {got}");
        }
    }
}
