//! Gateway presets and the [`Decoder`].
//!
//! Each preset reads its lines into a typed record whose fields borrow from the line
//! ([`Val`] / [`Obj`]); fields the preset does not need are skipped by the JSON parser
//! without being built. Raw key material is fingerprinted here, while it still borrows the
//! line, and never stored.

use std::borrow::Cow;

use serde::Deserialize;

use super::fpcache::FingerprintCache;
use super::mapping::{CompiledMapping, FieldMapping, EXPECTED_TIMESTAMP};
use super::redact::Redactor;
use super::time::{epoch_to_ms, parse_timestamp, scale_epoch};
use super::value::{Bounded, Header, Num, Obj, Val};
use super::{
    normalize_path, parse_too_long_marker, too_long_marker, AuthEvent, DecodeError, Fingerprinter,
    Outcome, DEFAULT_MAX_LINE_BYTES, NO_KEY,
};

/// The preset names, as accepted by [`Format::preset`].
pub const PRESETS: &[&str] = &["kong", "tyk", "traefik", "envoy", "nginx", "aws-apigw"];

/// How the lines of a source are written.
// A config value, built once per source: the size of the mapping variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Format {
    Kong,
    Tyk,
    Traefik,
    Envoy,
    Nginx,
    AwsApiGw,
    /// Any JSON object, with a user-supplied mapping.
    Json(FieldMapping),
}

impl Format {
    /// The preset with this name (one of [`PRESETS`], case-insensitive).
    pub fn preset(name: &str) -> Option<Format> {
        let name = name.trim().to_ascii_lowercase();
        Some(match name.as_str() {
            "kong" => Format::Kong,
            "tyk" => Format::Tyk,
            "traefik" => Format::Traefik,
            "envoy" => Format::Envoy,
            "nginx" => Format::Nginx,
            "aws-apigw" => Format::AwsApiGw,
            _ => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Format::Kong => "kong",
            Format::Tyk => "tyk",
            Format::Traefik => "traefik",
            Format::Envoy => "envoy",
            Format::Nginx => "nginx",
            Format::AwsApiGw => "aws-apigw",
            Format::Json(_) => "json",
        }
    }

    /// Names of the fields that hold raw key material in this format (for redaction, on top
    /// of the standard names).
    fn secret_names(&self) -> Vec<&str> {
        match self {
            Format::Kong => vec!["apikey", "x-api-key"],
            // Tyk can log the whole raw request (base64), headers included.
            Format::Tyk => vec!["api_key", "raw_request"],
            Format::Traefik => vec!["request_X-Api-Key", "request_Authorization"],
            Format::Envoy => vec!["x_api_key"],
            Format::Nginx => vec!["http_x_api_key", "http_authorization"],
            Format::AwsApiGw => vec![],
            Format::Json(m) => m.secret_leaf().into_iter().collect(),
        }
    }
}

/// More places a preset looks for the key, in order, when the preset's own fields name
/// none (a refused request carries no authenticated entity): first the id fields (a
/// credential id a plugin logs, an id header such as `request.headers.x-consumer-id`), then
/// the raw-key fields (`request.headers.x-my-key`), whose value is fingerprinted. Paths are
/// dot-separated JSON object keys. The preset's own raw-key headers come before these.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyFallbacks {
    pub id_fields: Vec<String>,
    pub secret_fields: Vec<String>,
}

impl KeyFallbacks {
    pub fn is_empty(&self) -> bool {
        self.id_fields.is_empty() && self.secret_fields.is_empty()
    }
}

/// Turns lines into [`AuthEvent`]s for one [`Format`].
#[derive(Debug, Clone)]
pub struct Decoder {
    format: Format,
    fingerprinter: Fingerprinter,
    gateway_label: Option<String>,
    mapping: Option<CompiledMapping>,
    redactor: Redactor,
    fingerprints: FingerprintCache,
    fallbacks: KeyFallbacks,
    max_line_bytes: usize,
}

/// What a record said, before the key is resolved and the outcome classified.
#[derive(Debug, Default)]
pub(super) struct Parts<'a> {
    pub(super) ts_ms: i64,
    pub(super) status: u16,
    pub(super) message: Option<Cow<'a, str>>,
    /// An id the gateway logged: wins over `key_secret`.
    pub(super) key_id: Option<Cow<'a, str>>,
    /// Raw key material: fingerprinted, then dropped.
    pub(super) key_secret: Option<Cow<'a, str>>,
    pub(super) consumer: Option<Cow<'a, str>>,
    pub(super) source_ip: Option<Cow<'a, str>>,
    pub(super) user_agent: Option<Cow<'a, str>>,
    pub(super) method: Option<Cow<'a, str>>,
    pub(super) endpoint: Option<Cow<'a, str>>,
    pub(super) latency_ms: Option<f64>,
    pub(super) gateway: Option<Cow<'a, str>>,
    pub(super) request_id: Option<Cow<'a, str>>,
}

impl Decoder {
    /// `gateway_label`: a static gateway name used when the record names none.
    ///
    /// A [`Format::Json`] mapping should have passed [`FieldMapping::validate`].
    pub fn new(
        format: Format,
        fingerprinter: Fingerprinter,
        gateway_label: Option<String>,
    ) -> Self {
        let mapping = match &format {
            Format::Json(m) => Some(CompiledMapping::new(m)),
            _ => None,
        };
        let redactor = Redactor::new(&format.secret_names());
        Decoder {
            format,
            fingerprinter,
            gateway_label: gateway_label.filter(|l| !l.trim().is_empty()),
            mapping,
            redactor,
            fingerprints: FingerprintCache::new(),
            fallbacks: KeyFallbacks::default(),
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
        }
    }

    /// Lines (Kafka messages) longer than `bytes` are refused unparsed with
    /// [`DecodeError::TooLong`], and their dead letter holds a [`too_long_marker`] instead
    /// of a copy (default [`DEFAULT_MAX_LINE_BYTES`]; at least 1).
    pub fn with_max_line_bytes(mut self, bytes: usize) -> Self {
        self.max_line_bytes = bytes.max(1);
        self
    }

    /// The over-long line's error, if `line` is too long or a source's marker for one.
    fn too_long(&self, line: &[u8]) -> Option<DecodeError> {
        let bytes = if line.len() > self.max_line_bytes {
            line.len() as u64
        } else {
            parse_too_long_marker(line)?
        };
        Some(DecodeError::TooLong {
            bytes,
            limit: self.max_line_bytes,
        })
    }

    /// Extends the preset with more key fields, tried in order when its own name no key
    /// ([`KeyFallbacks`]). The raw-key fields are redacted in dead letters too.
    pub fn with_key_fallbacks(mut self, fallbacks: KeyFallbacks) -> Self {
        let mut names = self.format.secret_names();
        let leaves: Vec<&str> = fallbacks
            .secret_fields
            .iter()
            .filter_map(|p| p.rsplit('.').next())
            .collect();
        names.extend(leaves);
        self.redactor = Redactor::new(&names);
        self.fallbacks = fallbacks;
        self
    }

    /// Applies the fallbacks to a record whose preset found no key id.
    fn fallback<'a>(&self, record: &serde_json::Value, p: &mut Parts<'a>) {
        if p.key_id.is_some() || self.fallbacks.is_empty() {
            return;
        }
        let text = |path: &str| {
            path.split('.')
                .try_fold(record, |v, seg| v.get(seg))
                .and_then(|v| match v {
                    serde_json::Value::String(s) if !s.trim().is_empty() => {
                        Some(s.trim().to_owned())
                    }
                    serde_json::Value::Number(n) => Some(n.to_string()),
                    _ => None,
                })
        };
        if let Some(id) = self.fallbacks.id_fields.iter().find_map(|f| text(f)) {
            p.key_id = Some(Cow::Owned(id));
        } else if p.key_secret.is_none() {
            p.key_secret = self
                .fallbacks
                .secret_fields
                .iter()
                .find_map(|f| text(f))
                .map(Cow::Owned);
        }
    }

    pub fn format(&self) -> &Format {
        &self.format
    }

    /// Decodes one line (one JSON object, or for Kong also a JSON array of records) and
    /// pushes the events to `out`; returns how many. Empty/whitespace-only lines give
    /// `Ok(0)`. On an error nothing is pushed (a Kong batch with one bad record is rejected
    /// whole).
    pub fn decode<'a>(
        &self,
        line: &'a [u8],
        out: &mut Vec<AuthEvent<'a>>,
    ) -> Result<usize, DecodeError> {
        if let Some(e) = self.too_long(line) {
            return Err(e);
        }
        let Some(&first) = line.iter().find(|c| !c.is_ascii_whitespace()) else {
            return Ok(0);
        };
        let line = std::str::from_utf8(line).map_err(|_| DecodeError::NotUtf8)?;
        if first != b'{' && !(first == b'[' && matches!(self.format, Format::Kong)) {
            return Err(self.not_an_object());
        }
        let mut parts = match &self.format {
            Format::Kong if first == b'[' => return self.kong_batch(line, out),
            Format::Kong => kong(parse(line)?)?,
            Format::Tyk => tyk(parse(line)?)?,
            Format::Traefik => traefik(parse(line)?)?,
            Format::Envoy => envoy(parse(line)?)?,
            Format::Nginx => nginx(parse(line)?)?,
            Format::AwsApiGw => aws(parse(line)?)?,
            Format::Json(_) => {
                let root: serde_json::Value = parse(line)?;
                let mapping = self.mapping.as_ref().expect("compiled in new()");
                mapping.parts(&root)?
            }
        };
        if parts.key_id.is_none() && !self.fallbacks.is_empty() {
            // Only records without a key id pay for a second parse.
            let root: serde_json::Value = parse(line)?;
            self.fallback(&root, &mut parts);
        }
        out.push(self.finish(parts));
        Ok(1)
    }

    /// The line made safe for a dead-letter file: the values of fields that hold raw key
    /// material (the preset's secret fields, the mapping's `key_secret`, and any field named
    /// like `api_key`, `apikey`, `x-api-key`, `x_api_key`, `authorization`,
    /// `request_X-Api-Key`, case-insensitive, at any depth) replaced by their fingerprint id.
    /// Lines that are not JSON are searched for the same names (`"name":"value"`,
    /// `name=value`, `name: value`). Invalid UTF-8 is replaced lossily.
    ///
    /// A line over the limit is not copied: its redaction is its [`too_long_marker`].
    pub fn redact(&self, line: &[u8]) -> String {
        if let Some(DecodeError::TooLong { bytes, .. }) = self.too_long(line) {
            return too_long_marker(bytes);
        }
        self.redactor.redact(line, &self.fingerprinter)
    }

    fn kong_batch<'a>(
        &self,
        line: &'a str,
        out: &mut Vec<AuthEvent<'a>>,
    ) -> Result<usize, DecodeError> {
        let Bounded(records): Bounded<Obj<KongRecord<'a>>> = parse(line)?;
        let values: Option<Vec<serde_json::Value>> = if self.fallbacks.is_empty() {
            None
        } else {
            Some(parse::<Bounded<_>>(line)?.0)
        };
        let start = out.len();
        for (i, record) in records.into_iter().enumerate() {
            let parts = match record {
                Obj::Some(r) => kong(r),
                Obj::Absent | Obj::Invalid => Err(DecodeError::Json(format!(
                    "batch element {i}: expected a JSON object"
                ))),
            };
            match parts {
                Ok(mut p) => {
                    if let Some(v) = values.as_ref().and_then(|v| v.get(i)) {
                        self.fallback(v, &mut p);
                    }
                    out.push(self.finish(p))
                }
                Err(e) => {
                    out.truncate(start);
                    return Err(e);
                }
            }
        }
        Ok(out.len() - start)
    }

    /// The error for a line that does not start like a JSON object (or, for Kong, a batch).
    fn not_an_object(&self) -> DecodeError {
        DecodeError::Json(
            if matches!(self.format, Format::Kong) {
                "expected a JSON object or an array of objects"
            } else {
                "expected a JSON object"
            }
            .to_owned(),
        )
    }

    fn finish<'a>(&self, p: Parts<'a>) -> AuthEvent<'a> {
        let (key_id, key_hint) = match (p.key_id, p.key_secret) {
            (Some(id), _) => (id, None),
            (None, Some(raw)) => {
                let (id, hint) = self.fingerprints.get(&self.fingerprinter, &raw);
                (Cow::Owned(id), hint)
            }
            (None, None) => (Cow::Borrowed(NO_KEY), None),
        };
        let outcome = Outcome::classify(p.status, p.message.as_deref());
        let mut ev = AuthEvent::new(p.ts_ms, key_id, p.status, outcome);
        ev.key_hint = key_hint;
        ev.consumer = p.consumer;
        ev.source_ip = p.source_ip.map(strip_port).filter(|s| !s.is_empty());
        ev.user_agent = p.user_agent;
        ev.method = p.method;
        ev.endpoint = p.endpoint.filter(|s| !s.is_empty());
        ev.latency_ms = p.latency_ms;
        ev.gateway = p
            .gateway
            .or_else(|| self.gateway_label.clone().map(Cow::Owned));
        ev.request_id = p.request_id;
        ev
    }
}

/// Parses a line already checked to be UTF-8 (one pass over the line is cheaper than
/// serde_json checking each string on its own).
fn parse<'a, T: Deserialize<'a>>(line: &'a str) -> Result<T, DecodeError> {
    serde_json::from_str(line).map_err(DecodeError::json)
}

// ---------------------------------------------------------------------------------------
// Field helpers

fn invalid(field: &'static str, reason: &str) -> DecodeError {
    DecodeError::Invalid {
        field,
        reason: reason.to_owned(),
    }
}

/// A required time written as a string (any form [`parse_timestamp`] reads) or an epoch
/// number (unit by magnitude).
fn time_any(v: &Val<'_>, field: &'static str) -> Result<i64, DecodeError> {
    let ms = match v {
        _ if v.is_absent() => return Err(DecodeError::Missing(field)),
        Val::Str(s) => parse_timestamp(s),
        Val::Int(i) => epoch_to_ms(*i as f64),
        Val::Float(f) => epoch_to_ms(*f),
        _ => None,
    };
    ms.ok_or_else(|| invalid(field, EXPECTED_TIMESTAMP))
}

/// An epoch number in a known unit (`ms_per_unit`), as a number or numeric string;
/// `Ok(None)` when absent.
fn epoch(
    v: &Val<'_>,
    field: &'static str,
    ms_per_unit: f64,
    reason: &str,
) -> Result<Option<i64>, DecodeError> {
    let ms = match v.num(field).map_err(|_| invalid(field, reason))? {
        None => return Ok(None),
        Some(Num::Int(i)) if ms_per_unit == 1.0 => scale_epoch(i as f64, 1.0).map(|_| i),
        Some(n) => scale_epoch(n.as_f64(), ms_per_unit),
    };
    ms.map(Some).ok_or_else(|| invalid(field, reason))
}

fn text<'a>(v: Val<'a>, field: &'static str) -> Result<Option<Cow<'a, str>>, DecodeError> {
    v.text(field)
}

fn header<'a>(h: Header<'a>, field: &'static str) -> Result<Option<Cow<'a, str>>, DecodeError> {
    h.0.text(field)
}

/// The endpoint of a request path: no query string, ids replaced.
fn endpoint_of(path: Cow<'_, str>) -> Cow<'_, str> {
    match path {
        Cow::Borrowed(p) => normalize_path(p),
        Cow::Owned(p) => Cow::Owned(normalize_path(&p).into_owned()),
    }
}

/// Applies a sub-slicing function to a `Cow` without copying a borrowed string.
fn map_cow<'a>(c: Cow<'a, str>, f: impl for<'x> Fn(&'x str) -> &'x str) -> Cow<'a, str> {
    match c {
        Cow::Borrowed(s) => Cow::Borrowed(f(s)),
        Cow::Owned(s) => {
            let t = f(&s);
            if t.len() == s.len() {
                Cow::Owned(s)
            } else {
                Cow::Owned(t.to_owned())
            }
        }
    }
}

/// `1.2.3.4:5678` -> `1.2.3.4`, `[::1]:80` -> `::1`; a bare IPv6 address is left alone.
fn strip_port(addr: Cow<'_, str>) -> Cow<'_, str> {
    map_cow(addr, |s| {
        let s = s.trim();
        if let Some(rest) = s.strip_prefix('[') {
            return rest.find(']').map_or(s, |end| &rest[..end]);
        }
        match s.split_once(':') {
            Some((host, port)) if !port.is_empty() && port.bytes().all(|c| c.is_ascii_digit()) => {
                host
            }
            _ => s,
        }
    })
}

/// The first address of an `X-Forwarded-For` list.
fn first_forwarded(xff: Cow<'_, str>) -> Cow<'_, str> {
    map_cow(xff, |s| s.split(',').next().unwrap_or("").trim())
}

// ---------------------------------------------------------------------------------------
// Kong (file-log, http-log, kafka-log)

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KongRecord<'a> {
    #[serde(borrow)]
    started_at: Val<'a>,
    #[serde(borrow)]
    client_ip: Val<'a>,
    #[serde(borrow)]
    request: Obj<KongRequest<'a>>,
    #[serde(borrow)]
    response: Obj<KongResponse<'a>>,
    #[serde(borrow)]
    latencies: Obj<KongLatencies<'a>>,
    #[serde(borrow)]
    authenticated_entity: Obj<KongEntity<'a>>,
    #[serde(borrow)]
    consumer: Obj<KongConsumer<'a>>,
    #[serde(borrow)]
    route: Obj<KongRoute<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KongRequest<'a> {
    #[serde(borrow)]
    method: Val<'a>,
    #[serde(borrow)]
    uri: Val<'a>,
    /// Kong 3.x
    #[serde(borrow)]
    id: Val<'a>,
    #[serde(borrow)]
    headers: Obj<KongHeaders<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KongHeaders<'a> {
    #[serde(borrow, rename = "user-agent")]
    user_agent: Header<'a>,
    #[serde(borrow)]
    apikey: Header<'a>,
    #[serde(borrow, rename = "x-api-key")]
    x_api_key: Header<'a>,
    #[serde(borrow, rename = "x-request-id")]
    x_request_id: Header<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KongResponse<'a> {
    #[serde(borrow)]
    status: Val<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KongLatencies<'a> {
    #[serde(borrow)]
    request: Val<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KongEntity<'a> {
    #[serde(borrow)]
    id: Val<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KongConsumer<'a> {
    #[serde(borrow)]
    id: Val<'a>,
    #[serde(borrow)]
    username: Val<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KongRoute<'a> {
    #[serde(borrow)]
    name: Val<'a>,
}

fn kong(r: KongRecord<'_>) -> Result<Parts<'_>, DecodeError> {
    let ts_ms = epoch(
        &r.started_at,
        "started_at",
        1.0,
        "expected epoch milliseconds",
    )?
    .ok_or(DecodeError::Missing("started_at"))?;
    let status = match r.response.take("response")? {
        Some(resp) => resp.status.status("response.status")?,
        None => return Err(DecodeError::Missing("response.status")),
    };
    let mut p = Parts {
        ts_ms,
        status,
        source_ip: text(r.client_ip, "client_ip")?,
        ..Parts::default()
    };
    if let Some(req) = r.request.take("request")? {
        p.method = text(req.method, "request.method")?;
        p.endpoint = text(req.uri, "request.uri")?.map(endpoint_of);
        p.request_id = text(req.id, "request.id")?;
        if let Some(h) = req.headers.take("request.headers")? {
            p.user_agent = header(h.user_agent, "request.headers.user-agent")?;
            p.key_secret = match header(h.apikey, "request.headers.apikey")? {
                Some(k) => Some(k),
                None => header(h.x_api_key, "request.headers.x-api-key")?,
            };
            let xrid = header(h.x_request_id, "request.headers.x-request-id")?;
            p.request_id = p.request_id.or(xrid);
        }
    }
    if let Some(e) = r.authenticated_entity.take("authenticated_entity")? {
        p.key_id = text(e.id, "authenticated_entity.id")?;
    }
    if let Some(c) = r.consumer.take("consumer")? {
        p.consumer = match text(c.username, "consumer.username")? {
            Some(u) => Some(u),
            None => text(c.id, "consumer.id")?,
        };
    }
    if let Some(route) = r.route.take("route")? {
        if let Some(name) = text(route.name, "route.name")? {
            p.endpoint = Some(name);
        }
    }
    if let Some(l) = r.latencies.take("latencies")? {
        p.latency_ms = l.request.f64("latencies.request")?;
    }
    Ok(p)
}

// ---------------------------------------------------------------------------------------
// Tyk (analytics records from the pump)

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TykRecord<'a> {
    #[serde(borrow)]
    timestamp: Val<'a>,
    #[serde(borrow)]
    method: Val<'a>,
    #[serde(borrow)]
    path: Val<'a>,
    #[serde(borrow)]
    response_code: Val<'a>,
    #[serde(borrow)]
    api_key: Val<'a>,
    #[serde(borrow)]
    alias: Val<'a>,
    #[serde(borrow)]
    request_time_ms: Val<'a>,
    #[serde(borrow)]
    ip_address: Val<'a>,
    #[serde(borrow)]
    user_agent: Val<'a>,
    #[serde(borrow)]
    host: Val<'a>,
}

fn tyk(r: TykRecord<'_>) -> Result<Parts<'_>, DecodeError> {
    Ok(Parts {
        ts_ms: time_any(&r.timestamp, "timestamp")?,
        status: r.response_code.status("response_code")?,
        // The key, or its hash when the gateway hashes keys: fingerprinted either way.
        key_secret: text(r.api_key, "api_key")?,
        consumer: text(r.alias, "alias")?,
        source_ip: text(r.ip_address, "ip_address")?,
        user_agent: text(r.user_agent, "user_agent")?,
        method: text(r.method, "method")?,
        endpoint: text(r.path, "path")?.map(endpoint_of),
        latency_ms: r.request_time_ms.f64("request_time_ms")?,
        gateway: text(r.host, "host")?,
        ..Parts::default()
    })
}

// ---------------------------------------------------------------------------------------
// Traefik (JSON access log)

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TraefikRecord<'a> {
    #[serde(borrow, rename = "StartUTC")]
    start_utc: Val<'a>,
    #[serde(borrow, rename = "ClientHost")]
    client_host: Val<'a>,
    #[serde(borrow, rename = "DownstreamStatus")]
    downstream_status: Val<'a>,
    #[serde(borrow, rename = "Duration")]
    duration: Val<'a>,
    #[serde(borrow, rename = "RequestMethod")]
    request_method: Val<'a>,
    #[serde(borrow, rename = "RequestPath")]
    request_path: Val<'a>,
    #[serde(borrow, rename = "RouterName")]
    router_name: Val<'a>,
    #[serde(borrow, rename = "ClientUsername")]
    client_username: Val<'a>,
    #[serde(borrow, rename = "request_X-Api-Key")]
    x_api_key: Val<'a>,
    #[serde(borrow, rename = "request_User-Agent")]
    user_agent: Val<'a>,
    #[serde(borrow, rename = "request_X-Request-Id")]
    request_id: Val<'a>,
}

fn traefik(r: TraefikRecord<'_>) -> Result<Parts<'_>, DecodeError> {
    let endpoint = match text(r.router_name, "RouterName")? {
        Some(router) => Some(router),
        None => text(r.request_path, "RequestPath")?.map(endpoint_of),
    };
    Ok(Parts {
        ts_ms: time_any(&r.start_utc, "StartUTC")?,
        status: r.downstream_status.status("DownstreamStatus")?,
        key_id: text(r.client_username, "ClientUsername")?,
        // Traefik writes "REDACTED" for headers in redact mode.
        key_secret: text(r.x_api_key, "request_X-Api-Key")?.filter(|k| k != "REDACTED"),
        source_ip: text(r.client_host, "ClientHost")?,
        user_agent: text(r.user_agent, "request_User-Agent")?,
        method: text(r.request_method, "RequestMethod")?,
        endpoint,
        latency_ms: r.duration.f64("Duration")?.map(|ns| ns / 1e6),
        request_id: text(r.request_id, "request_X-Request-Id")?,
        ..Parts::default()
    })
}

// ---------------------------------------------------------------------------------------
// Envoy / Istio (JSON access log)

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct EnvoyRecord<'a> {
    #[serde(borrow)]
    start_time: Val<'a>,
    #[serde(borrow)]
    method: Val<'a>,
    #[serde(borrow)]
    path: Val<'a>,
    #[serde(borrow)]
    response_code: Val<'a>,
    #[serde(borrow)]
    response_code_details: Val<'a>,
    #[serde(borrow)]
    duration: Val<'a>,
    #[serde(borrow)]
    downstream_remote_address: Val<'a>,
    #[serde(borrow)]
    x_forwarded_for: Val<'a>,
    #[serde(borrow)]
    user_agent: Val<'a>,
    #[serde(borrow)]
    request_id: Val<'a>,
    #[serde(borrow)]
    route_name: Val<'a>,
    #[serde(borrow)]
    x_api_key: Val<'a>,
    #[serde(borrow)]
    api_key_id: Val<'a>,
    #[serde(borrow)]
    hostname: Val<'a>,
}

fn envoy(r: EnvoyRecord<'_>) -> Result<Parts<'_>, DecodeError> {
    let forwarded = text(r.x_forwarded_for, "x_forwarded_for")?
        .map(first_forwarded)
        .filter(|ip| !ip.is_empty());
    let source_ip = match forwarded {
        Some(ip) => Some(ip),
        None => text(r.downstream_remote_address, "downstream_remote_address")?,
    };
    let endpoint = match text(r.route_name, "route_name")? {
        Some(route) => Some(route),
        None => text(r.path, "path")?.map(endpoint_of),
    };
    Ok(Parts {
        ts_ms: time_any(&r.start_time, "start_time")?,
        status: r.response_code.status("response_code")?,
        // "via_upstream" (the upstream answered) is most requests and says nothing about
        // the key: skip classifying it as a message.
        message: text(r.response_code_details, "response_code_details")?
            .filter(|d| d != "via_upstream"),
        key_id: text(r.api_key_id, "api_key_id")?,
        key_secret: text(r.x_api_key, "x_api_key")?,
        source_ip,
        user_agent: text(r.user_agent, "user_agent")?,
        method: text(r.method, "method")?,
        endpoint,
        latency_ms: r.duration.f64("duration")?,
        gateway: text(r.hostname, "hostname")?,
        request_id: text(r.request_id, "request_id")?,
        ..Parts::default()
    })
}

// ---------------------------------------------------------------------------------------
// nginx (log_format ... escape=json)

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct NginxRecord<'a> {
    #[serde(borrow)]
    time_iso8601: Val<'a>,
    #[serde(borrow)]
    msec: Val<'a>,
    #[serde(borrow)]
    remote_addr: Val<'a>,
    #[serde(borrow)]
    request_method: Val<'a>,
    #[serde(borrow)]
    request_uri: Val<'a>,
    #[serde(borrow)]
    status: Val<'a>,
    #[serde(borrow)]
    request_time: Val<'a>,
    #[serde(borrow)]
    http_user_agent: Val<'a>,
    #[serde(borrow)]
    http_x_api_key: Val<'a>,
    #[serde(borrow)]
    request_id: Val<'a>,
    #[serde(borrow)]
    hostname: Val<'a>,
}

/// Reported when neither time field is there.
const NGINX_TIME: &str = "time_iso8601` or `msec";

fn nginx(r: NginxRecord<'_>) -> Result<Parts<'_>, DecodeError> {
    // $msec has milliseconds, $time_iso8601 only seconds.
    let ts_ms = match epoch(&r.msec, "msec", 1e3, "expected epoch seconds")? {
        Some(ms) => ms,
        None if r.time_iso8601.is_absent() => return Err(DecodeError::Missing(NGINX_TIME)),
        None => time_any(&r.time_iso8601, "time_iso8601")?,
    };
    Ok(Parts {
        ts_ms,
        status: r.status.status("status")?,
        key_secret: text(r.http_x_api_key, "http_x_api_key")?,
        source_ip: text(r.remote_addr, "remote_addr")?,
        user_agent: text(r.http_user_agent, "http_user_agent")?,
        method: text(r.request_method, "request_method")?,
        endpoint: text(r.request_uri, "request_uri")?.map(endpoint_of),
        latency_ms: r.request_time.f64("request_time")?.map(|s| s * 1e3),
        gateway: text(r.hostname, "hostname")?,
        request_id: text(r.request_id, "request_id")?,
        ..Parts::default()
    })
}

// ---------------------------------------------------------------------------------------
// AWS API Gateway (access logging, JSON)

#[derive(Debug, Default, Deserialize)]
#[serde(default, rename_all = "camelCase")]
struct AwsRecord<'a> {
    #[serde(borrow)]
    request_time_epoch: Val<'a>,
    #[serde(borrow)]
    request_time: Val<'a>,
    #[serde(borrow)]
    request_id: Val<'a>,
    #[serde(borrow)]
    ip: Val<'a>,
    #[serde(borrow)]
    http_method: Val<'a>,
    #[serde(borrow)]
    resource_path: Val<'a>,
    #[serde(borrow)]
    path: Val<'a>,
    #[serde(borrow)]
    status: Val<'a>,
    #[serde(borrow)]
    user_agent: Val<'a>,
    #[serde(borrow)]
    api_key_id: Val<'a>,
    #[serde(borrow)]
    response_latency: Val<'a>,
    #[serde(borrow)]
    error_message: Val<'a>,
    #[serde(borrow)]
    domain_name: Val<'a>,
}

/// Reported when neither time field is there.
const AWS_TIME: &str = "requestTimeEpoch` or `requestTime";

fn aws(r: AwsRecord<'_>) -> Result<Parts<'_>, DecodeError> {
    let epoch_ms = epoch(
        &r.request_time_epoch,
        "requestTimeEpoch",
        1.0,
        "expected epoch milliseconds",
    )?;
    let ts_ms = match epoch_ms {
        Some(ms) => ms,
        None if r.request_time.is_absent() => return Err(DecodeError::Missing(AWS_TIME)),
        None => time_any(&r.request_time, "requestTime")?,
    };
    let endpoint = match text(r.resource_path, "resourcePath")? {
        Some(resource) => Some(resource),
        None => text(r.path, "path")?.map(endpoint_of),
    };
    Ok(Parts {
        ts_ms,
        status: r.status.status("status")?,
        message: text(r.error_message, "errorMessage")?,
        key_id: text(r.api_key_id, "apiKeyId")?,
        source_ip: text(r.ip, "ip")?,
        user_agent: text(r.user_agent, "userAgent")?,
        method: text(r.http_method, "httpMethod")?,
        endpoint,
        latency_ms: r.response_latency.f64("responseLatency")?,
        gateway: text(r.domain_name, "domainName")?,
        request_id: text(r.request_id, "requestId")?,
        ..Parts::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::MAX_BATCH_RECORDS;

    const SECRET: &[u8] = b"test-secret";
    const LABEL: &str = "edge-1";

    fn fingerprinter() -> Fingerprinter {
        Fingerprinter::new(SECRET, 4)
    }

    fn fp(raw: &str) -> Cow<'static, str> {
        Cow::Owned(fingerprinter().key_id(raw))
    }

    fn hint(raw: &str) -> Option<String> {
        fingerprinter().hint(raw)
    }

    fn s(v: &str) -> Option<Cow<'static, str>> {
        Some(Cow::Owned(v.to_owned()))
    }

    fn label() -> Option<Cow<'static, str>> {
        s(LABEL)
    }

    #[test]
    fn a_preset_extended_with_key_fallbacks_keeps_the_key_of_refused_requests() {
        let d = decoder(Format::Kong).with_key_fallbacks(KeyFallbacks {
            id_fields: vec!["request.headers.x-consumer-key-id".into()],
            secret_fields: vec!["request.headers.x-partner-key".into()],
        });
        let fp = |raw: &str| fingerprinter().key_id(raw);
        let rec = |headers: &str, entity: &str| {
            format!(
                r#"{{"request":{{"method":"GET","uri":"/v1/x","headers":{{{headers}}}}},"response":{{"status":401}},"client_ip":"10.0.0.9","started_at":1614232669000{entity}}}"#
            )
        };
        let secret = "partner_Key_0123456789abcdef";
        // (record, the key id it must give)
        let cases: Vec<(String, String)> = vec![
            // The preset's own id wins.
            (
                rec(
                    r#""x-consumer-key-id":"hdr-1""#,
                    r#","authenticated_entity":{"id":"gw-1"}"#,
                ),
                "gw-1".into(),
            ),
            // Refused: an id header before any raw key.
            (
                rec(
                    &format!(r#""x-consumer-key-id":"hdr-1","apikey":"{secret}""#),
                    "",
                ),
                "hdr-1".into(),
            ),
            // The preset's raw-key header before the added one.
            (
                rec(
                    &format!(r#""apikey":"{secret}","x-partner-key":"other_Key_0123456789""#),
                    "",
                ),
                fp(secret),
            ),
            // The added raw-key header, fingerprinted.
            (
                rec(&format!(r#""x-partner-key":"{secret}""#), ""),
                fp(secret),
            ),
            (rec(r#""user-agent":"curl""#, ""), NO_KEY.into()),
        ];
        for (line, want) in &cases {
            let mut out = Vec::new();
            d.decode(line.as_bytes(), &mut out).unwrap();
            assert_eq!(out[0].key_id, want.as_str(), "{line}");
            // A Kong batch gives the same.
            let (two, mut batch) = (format!("[{line},{line}]"), Vec::new());
            d.decode(two.as_bytes(), &mut batch).unwrap();
            assert!(
                batch.iter().all(|e| e.key_id == want.as_str()),
                "batch {line}"
            );
        }
        // The added raw-key field is a secret in dead letters too.
        let redacted = d.redact(cases[3].0.as_bytes());
        assert!(!redacted.contains(secret), "{redacted}");
    }

    fn decoder(format: Format) -> Decoder {
        Decoder::new(format, fingerprinter(), Some(LABEL.into()))
    }

    /// A decoding case: the line, the events it must give, and raw keys that must not
    /// appear in them.
    struct Case {
        name: &'static str,
        line: String,
        want: Vec<AuthEvent<'static>>,
        raw_keys: Vec<&'static str>,
    }

    fn check(format: Format, cases: Vec<Case>) {
        let d = decoder(format);
        for c in cases {
            let mut out = Vec::new();
            let n = d
                .decode(c.line.as_bytes(), &mut out)
                .unwrap_or_else(|e| panic!("{}: {e}", c.name));
            assert_eq!(n, c.want.len(), "{}", c.name);
            let got: Vec<_> = out.into_iter().map(AuthEvent::into_owned).collect();
            assert_eq!(got, c.want, "{}", c.name);
            let debug = format!("{got:?}");
            for raw in &c.raw_keys {
                assert!(
                    c.line.contains(raw),
                    "{}: the case must hold its key",
                    c.name
                );
                assert!(!debug.contains(raw), "{}: raw key in {debug}", c.name);
                let redacted = d.redact(c.line.as_bytes());
                assert!(!redacted.contains(raw), "{}: raw key in {redacted}", c.name);
                assert!(redacted.contains(&*fp(raw)), "{}: {redacted}", c.name);
            }
        }
    }

    fn check_errors(format: Format, cases: &[(&str, &str, DecodeError)]) {
        let d = decoder(format);
        for (name, line, want) in cases {
            let mut out = Vec::new();
            assert_eq!(
                d.decode(line.as_bytes(), &mut out).as_ref(),
                Err(want),
                "{name}"
            );
            assert!(out.is_empty(), "{name}");
        }
    }

    fn invalid(field: &'static str, reason: &str) -> DecodeError {
        DecodeError::Invalid {
            field,
            reason: reason.into(),
        }
    }

    fn not_a_number(field: &'static str) -> DecodeError {
        invalid(field, "expected a number or numeric string")
    }

    fn json(msg: &str) -> DecodeError {
        DecodeError::Json(msg.into())
    }

    #[test]
    fn decoders_can_be_shared_between_threads() {
        fn shared<T: Send + Sync + Clone>() {}
        shared::<Decoder>();
    }

    #[test]
    fn presets_by_name() {
        for name in PRESETS {
            let f = Format::preset(name).unwrap();
            assert_eq!(f.name(), *name);
        }
        assert_eq!(Format::preset("Kong"), Some(Format::Kong));
        assert_eq!(Format::preset("AWS-APIGW"), Some(Format::AwsApiGw));
        assert_eq!(Format::preset("json"), None);
        assert_eq!(Format::preset("apache"), None);
    }

    #[test]
    fn empty_lines_give_nothing() {
        for format in PRESETS.iter().map(|p| Format::preset(p).unwrap()) {
            let d = decoder(format);
            let mut out = Vec::new();
            assert_eq!(d.decode(b"", &mut out), Ok(0));
            assert_eq!(d.decode(b"  \t\r ", &mut out), Ok(0));
            assert!(out.is_empty());
        }
    }

    // -----------------------------------------------------------------------------------
    // Kong

    const KONG_KEY: &str = "kong_raw_Key_9f8e7d6c5b4a3210";
    const KONG_KEY2: &str = "second-raw-key-AAAABBBBCCCC";

    /// A full Kong 3.x file-log record, with the fields keywatch skips.
    fn kong_full() -> String {
        r#"{"service":{"host":"httpbin.org","created_at":1614232642,"connect_timeout":60000,"id":"167290ee-c682-4ebf-bdea-e49a3ac5e260","protocol":"http","read_timeout":60000,"port":80,"path":"/anything","updated_at":1614232642,"write_timeout":60000,"retries":5,"ws_id":"54baa5a9-23d6-41e0-9c9a-02434b010b25"},"route":{"id":"78f79740-c410-4fd9-a998-d0a60a99dc9b","paths":["/log"],"protocols":["http"],"strip_path":true,"created_at":1614232648,"ws_id":"54baa5a9-23d6-41e0-9c9a-02434b010b25","request_buffering":true,"updated_at":1614232648,"preserve_host":false,"regex_priority":0,"response_buffering":true,"https_redirect_status_code":426,"path_handling":"v0","service":{"id":"167290ee-c682-4ebf-bdea-e49a3ac5e260"},"name":"log-route"},"request":{"querystring":{},"size":138,"uri":"/log/123","url":"http://localhost:8000/log/123","headers":{"host":"localhost:8000","accept-encoding":"gzip, deflate","user-agent":"HTTPie/2.4.0","accept":"*/*","connection":"keep-alive"},"method":"GET","id":"5e44bd6d7b1a6b6a8fd0e8a44e9d2a7c"},"tries":[{"balancer_latency":0,"port":80,"balancer_start":1614232668399,"ip":"18.211.130.98"}],"client_ip":"192.168.144.1","workspace":"54baa5a9-23d6-41e0-9c9a-02434b010b25","upstream_uri":"/anything","response":{"headers":{"content-type":"application/json","date":"Thu, 25 Feb 2021 05:57:48 GMT","connection":"close","access-control-allow-credentials":"true","content-length":"503","server":"gunicorn/19.9.0","via":"kong/2.2.1","x-kong-proxy-latency":"57","x-kong-upstream-latency":"457","access-control-allow-origin":"*"},"status":200,"size":827},"latencies":{"request":515,"kong":58,"proxy":457},"authenticated_entity":{"id":"c62c1455-4ae0-4a7b-97f4-e2ad39a8a001"},"consumer":{"id":"ae974d6c-0f8a-4dc5-b701-fa0aa38592bd","username":"foo","created_at":1614232630},"started_at":1614232668342}"#.to_owned()
    }

    #[test]
    fn kong_records() {
        let mut ok = AuthEvent::new(
            1_614_232_668_342,
            "c62c1455-4ae0-4a7b-97f4-e2ad39a8a001".into(),
            200,
            Outcome::Ok,
        );
        ok.consumer = s("foo");
        ok.source_ip = s("192.168.144.1");
        ok.user_agent = s("HTTPie/2.4.0");
        ok.method = s("GET");
        ok.endpoint = s("log-route");
        ok.latency_ms = Some(515.0);
        ok.gateway = label();
        ok.request_id = s("5e44bd6d7b1a6b6a8fd0e8a44e9d2a7c");

        let denied_line = format!(
            r#"{{"request":{{"method":"POST","uri":"/v1/orders/42?expand=items","headers":{{"apikey":"{KONG_KEY}","user-agent":"Mozilla/5.0 (X11; \"quoted\") caf\u00e9\\bot","x-request-id":"req-77"}}}},"response":{{"status":401,"size":52}},"latencies":{{"request":3,"kong":3,"proxy":-1}},"client_ip":"10.0.0.9","started_at":1614232669000}}"#
        );
        let denied = AuthEvent {
            ts_ms: 1_614_232_669_000,
            key_id: fp(KONG_KEY),
            key_hint: hint(KONG_KEY),
            consumer: None,
            source_ip: s("10.0.0.9"),
            user_agent: s("Mozilla/5.0 (X11; \"quoted\") café\\bot"),
            method: s("POST"),
            endpoint: s("/v1/orders/:id"),
            status: 401,
            outcome: Outcome::InvalidKey,
            latency_ms: Some(3.0),
            gateway: label(),
            request_id: s("req-77"),
        };
        assert_eq!(denied.key_hint.as_deref(), Some("…3210"));

        // A repeated header is logged as a list; consumer with an id only; status as string.
        let limited_line = format!(
            r#"{{"request":{{"method":"GET","uri":"/v2/items","headers":{{"x-api-key":["{KONG_KEY2}","other"]}}}},"response":{{"status":"429"}},"latencies":{{"request":"1.5"}},"client_ip":"2001:db8::1","consumer":{{"id":"cons-1"}},"started_at":"1614232670000","route":{{"name":null}}}}"#
        );
        let limited = AuthEvent {
            ts_ms: 1_614_232_670_000,
            key_id: fp(KONG_KEY2),
            key_hint: hint(KONG_KEY2),
            consumer: s("cons-1"),
            source_ip: s("2001:db8::1"),
            user_agent: None,
            method: s("GET"),
            endpoint: s("/v2/items"),
            status: 429,
            outcome: Outcome::RateLimited,
            latency_ms: Some(1.5),
            gateway: label(),
            request_id: None,
        };

        // No key at all; Kong 2.x request id from the header only.
        let anonymous_line = r#"{"request":{"method":"GET","uri":"/health","headers":{"x-request-id":"abc"}},"response":{"status":403},"started_at":1614232671000}"#;
        let mut anonymous =
            AuthEvent::new(1_614_232_671_000, NO_KEY.into(), 403, Outcome::Forbidden);
        anonymous.method = s("GET");
        anonymous.endpoint = s("/health");
        anonymous.gateway = label();
        anonymous.request_id = s("abc");

        check(
            Format::Kong,
            vec![
                Case {
                    name: "kong success",
                    line: kong_full(),
                    want: vec![ok.clone()],
                    raw_keys: vec![],
                },
                Case {
                    name: "kong 401 raw apikey",
                    line: denied_line.clone(),
                    want: vec![denied.clone()],
                    raw_keys: vec![KONG_KEY],
                },
                Case {
                    name: "kong 429 x-api-key list",
                    line: limited_line.clone(),
                    want: vec![limited.clone()],
                    raw_keys: vec![KONG_KEY2],
                },
                Case {
                    name: "kong no key",
                    line: anonymous_line.into(),
                    want: vec![anonymous.clone()],
                    raw_keys: vec![],
                },
                Case {
                    name: "kong batch of 3",
                    line: format!(" [{},\n{denied_line}, {limited_line}] ", kong_full()),
                    want: vec![ok, denied, limited],
                    raw_keys: vec![KONG_KEY, KONG_KEY2],
                },
                Case {
                    name: "kong empty batch",
                    line: "[]".into(),
                    want: vec![],
                    raw_keys: vec![],
                },
            ],
        );
    }

    #[test]
    fn kong_errors() {
        let good = r#"{"response":{"status":200},"started_at":1614232668342}"#;
        let batch_bad = format!(r#"[{good},{{"response":{{"status":200}}}},{good}]"#);
        let batch_scalar = format!(r#"[{good},"{KONG_KEY}"]"#);
        check_errors(
            Format::Kong,
            &[
                (
                    "not JSON",
                    "not json at all",
                    json("expected a JSON object or an array of objects"),
                ),
                (
                    "truncated",
                    r#"{"response":{"status":200},"star"#,
                    json("EOF while parsing a string at line 1 column 32"),
                ),
                (
                    "truncated batch",
                    &format!("[{good},"),
                    json("EOF while parsing a value at line 1 column 56"),
                ),
                (
                    "a string",
                    &format!(r#""{KONG_KEY}""#),
                    json("expected a JSON object or an array of objects"),
                ),
                (
                    "missing time",
                    r#"{"response":{"status":200}}"#,
                    DecodeError::Missing("started_at"),
                ),
                (
                    "blank time",
                    r#"{"response":{"status":200},"started_at":"-"}"#,
                    DecodeError::Missing("started_at"),
                ),
                (
                    "bad time",
                    r#"{"response":{"status":200},"started_at":"yesterday"}"#,
                    invalid("started_at", "expected epoch milliseconds"),
                ),
                (
                    "missing status",
                    r#"{"response":{"size":1},"started_at":1614232668342}"#,
                    DecodeError::Missing("response.status"),
                ),
                (
                    "missing response",
                    r#"{"started_at":1614232668342}"#,
                    DecodeError::Missing("response.status"),
                ),
                (
                    "status object",
                    r#"{"response":{"status":{"code":200}},"started_at":1614232668342}"#,
                    not_a_number("response.status"),
                ),
                (
                    "status 1000",
                    r#"{"response":{"status":1000},"started_at":1614232668342}"#,
                    invalid("response.status", "expected an HTTP status code (0 to 999)"),
                ),
                (
                    "response a string",
                    r#"{"response":"ok","started_at":1614232668342}"#,
                    invalid("response", "expected an object"),
                ),
                (
                    "id an object",
                    r#"{"response":{"status":200},"started_at":1614232668342,"authenticated_entity":{"id":{"x":1}}}"#,
                    invalid("authenticated_entity.id", "expected a string"),
                ),
                (
                    "headers a list",
                    r#"{"response":{"status":200},"started_at":1614232668342,"request":{"headers":["a"]}}"#,
                    invalid("request.headers", "expected an object"),
                ),
                (
                    "batch with a bad record",
                    &batch_bad,
                    DecodeError::Missing("started_at"),
                ),
                (
                    "batch with a scalar",
                    &batch_scalar,
                    json("batch element 1: expected a JSON object"),
                ),
            ],
        );
        // A rejected batch leaves what was already in `out` alone.
        let d = decoder(Format::Kong);
        let mut out = Vec::new();
        assert_eq!(d.decode(good.as_bytes(), &mut out), Ok(1));
        assert!(d.decode(batch_bad.as_bytes(), &mut out).is_err());
        assert_eq!(out.len(), 1);
        // Error messages never quote values.
        let line = format!(
            r#"{{"request":{{"headers":{{"apikey":["{KONG_KEY}",["x"]]}}}},"response":{{"status":{{"v":"{KONG_KEY}"}}}},"started_at":1}}"#
        );
        let err = d.decode(line.as_bytes(), &mut out).unwrap_err().to_string();
        assert!(!err.contains(KONG_KEY), "{err}");
        let line = format!(r#"{{"started_at":true,"response":{{"status":"{KONG_KEY}"}}}}"#);
        let err = d.decode(line.as_bytes(), &mut out).unwrap_err().to_string();
        assert!(!err.contains(KONG_KEY), "{err}");
    }

    // -----------------------------------------------------------------------------------
    // Tyk

    const TYK_KEY: &str = "5e9d9544a1dcd60001d0ed20a6ab77653d5da938f452bb8cc6b9b3a6";
    const TYK_RAW: &str = "eyJvcmciOiI1ZTlkOTU0NGExZGNkNjAwMDFkMGVkMjAiLCJpZCI6ImFiYyJ9";

    #[test]
    fn tyk_records() {
        let ok_line = format!(
            r#"{{"method":"GET","host":"api.example.com","path":"/v1/users/3f2b8c1e-9d4a-4c1b-8e2f-1a2b3c4d5e6f/keys","raw_path":"/v1/users/3f2b8c1e-9d4a-4c1b-8e2f-1a2b3c4d5e6f/keys","content_length":0,"user_agent":"Go-http-client/1.1","day":25,"month":2,"year":2021,"hour":5,"response_code":200,"api_key":"{TYK_KEY}","timestamp":"2021-02-25T05:57:48.342Z","api_version":"Non Versioned","api_name":"Users API","api_id":"a1b2c3","org_id":"5e9d9544a1dcd60001d0ed20","oauth_id":"","request_time_ms":12,"raw_request":"","raw_response":"","ip_address":"172.18.0.1","geo":{{"country":{{"iso_code":""}}}},"network":{{"open_connections":0}},"latency":{{"total":12,"upstream":10}},"tags":["key-abc","org-5e9d"],"alias":"portal-developer@example.com","track_path":false,"expireAt":"2021-03-04T05:57:48.342Z"}}"#
        );
        let ok = AuthEvent {
            ts_ms: 1_614_232_668_342,
            key_id: fp(TYK_KEY),
            key_hint: hint(TYK_KEY),
            consumer: s("portal-developer@example.com"),
            source_ip: s("172.18.0.1"),
            user_agent: s("Go-http-client/1.1"),
            method: s("GET"),
            endpoint: s("/v1/users/:id/keys"),
            status: 200,
            outcome: Outcome::Ok,
            latency_ms: Some(12.0),
            gateway: s("api.example.com"),
            request_id: None,
        };
        let denied_line = format!(
            r#"{{"method":"DELETE","path":"/v1/orders?force=true","response_code":"403","api_key":"{TYK_RAW}","alias":"","timestamp":"2021-02-25T06:57:48.342+01:00","request_time_ms":"0.8","ip_address":"-","user_agent":"curl/7.68.0 \"tab\there\" \u2713"}}"#
        );
        let denied = AuthEvent {
            ts_ms: 1_614_232_668_342,
            key_id: fp(TYK_RAW),
            key_hint: hint(TYK_RAW),
            consumer: None,
            source_ip: None,
            user_agent: s("curl/7.68.0 \"tab\there\" ✓"),
            method: s("DELETE"),
            endpoint: s("/v1/orders"),
            status: 403,
            outcome: Outcome::Forbidden,
            latency_ms: Some(0.8),
            gateway: label(),
            request_id: None,
        };
        let keyless_line = r#"{"method":"GET","path":"/open","response_code":401,"api_key":"","timestamp":"2021-02-25T05:57:48Z"}"#;
        let mut keyless =
            AuthEvent::new(1_614_232_668_000, NO_KEY.into(), 401, Outcome::InvalidKey);
        keyless.method = s("GET");
        keyless.endpoint = s("/open");
        keyless.gateway = label();
        check(
            Format::Tyk,
            vec![
                Case {
                    name: "tyk success",
                    line: ok_line,
                    want: vec![ok],
                    raw_keys: vec![TYK_KEY],
                },
                Case {
                    name: "tyk 403",
                    line: denied_line,
                    want: vec![denied],
                    raw_keys: vec![TYK_RAW],
                },
                Case {
                    name: "tyk no key",
                    line: keyless_line.into(),
                    want: vec![keyless],
                    raw_keys: vec![],
                },
            ],
        );
    }

    #[test]
    fn tyk_errors() {
        check_errors(
            Format::Tyk,
            &[
                ("not JSON", "<html>", json("expected a JSON object")),
                (
                    "truncated",
                    r#"{"timestamp":"2021-02-25T05:57:48Z","response_code":2"#,
                    json("EOF while parsing an object at line 1 column 53"),
                ),
                ("an array", "[1,2]", json("expected a JSON object")),
                (
                    "missing time",
                    r#"{"response_code":200,"api_key":"k"}"#,
                    DecodeError::Missing("timestamp"),
                ),
                (
                    "bad time",
                    r#"{"timestamp":"2021-02-30T00:00:00Z","response_code":200}"#,
                    invalid("timestamp", EXPECTED_TIMESTAMP),
                ),
                (
                    "missing status",
                    r#"{"timestamp":"2021-02-25T05:57:48Z"}"#,
                    DecodeError::Missing("response_code"),
                ),
                (
                    "status object",
                    r#"{"timestamp":"2021-02-25T05:57:48Z","response_code":{"code":200}}"#,
                    not_a_number("response_code"),
                ),
                (
                    "status text",
                    &format!(
                        r#"{{"timestamp":"2021-02-25T05:57:48Z","response_code":"{TYK_RAW}"}}"#
                    ),
                    not_a_number("response_code"),
                ),
                (
                    "latency text",
                    r#"{"timestamp":"2021-02-25T05:57:48Z","response_code":200,"request_time_ms":"fast"}"#,
                    not_a_number("request_time_ms"),
                ),
                (
                    "key an object",
                    &format!(
                        r#"{{"timestamp":"2021-02-25T05:57:48Z","response_code":200,"api_key":{{"k":"{TYK_RAW}"}}}}"#
                    ),
                    invalid("api_key", "expected a string"),
                ),
            ],
        );
    }

    // -----------------------------------------------------------------------------------
    // Traefik

    const TRAEFIK_KEY: &str = "trk_live_0123456789abcdefXYZW";

    #[test]
    fn traefik_records() {
        let ok_line = r#"{"ClientAddr":"172.17.0.1:41372","ClientHost":"172.17.0.1","ClientPort":"41372","ClientUsername":"alice","DownstreamContentSize":217,"DownstreamStatus":200,"Duration":1893400,"OriginContentSize":217,"OriginDuration":1793500,"OriginStatus":200,"Overhead":99900,"RequestAddr":"whoami.localhost","RequestContentSize":0,"RequestCount":3,"RequestHost":"whoami.localhost","RequestMethod":"GET","RequestPath":"/api/v1/orders/77","RequestPort":"-","RequestProtocol":"HTTP/1.1","RequestScheme":"http","RetryAttempts":0,"RouterName":"whoami@docker","ServiceAddr":"172.17.0.3:80","ServiceName":"whoami@docker","ServiceURL":{"Scheme":"http","Host":"172.17.0.3:80"},"StartLocal":"2020-07-21T15:48:40.497523162+02:00","StartUTC":"2020-07-21T13:48:40.497523162Z","entryPointName":"web","level":"info","msg":"","request_User-Agent":"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5)","request_X-Request-Id":"f3c0","time":"2020-07-21T15:48:40+02:00"}"#;
        let ok = AuthEvent {
            ts_ms: 1_595_339_320_497,
            key_id: "alice".into(),
            key_hint: None,
            consumer: None,
            source_ip: s("172.17.0.1"),
            user_agent: s("Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5)"),
            method: s("GET"),
            endpoint: s("whoami@docker"),
            status: 200,
            outcome: Outcome::Ok,
            latency_ms: Some(1.8934),
            gateway: label(),
            request_id: s("f3c0"),
        };
        let denied_line = format!(
            r#"{{"ClientHost":"203.0.113.7","ClientUsername":"-","DownstreamStatus":401,"Duration":250000,"RequestMethod":"POST","RequestPath":"/v1/payments/123456?dry=1","StartUTC":"2020-07-21T13:48:41.001Z","request_X-Api-Key":"{TRAEFIK_KEY}","request_User-Agent":"python-requests/2.31 \"\\\\ok\"","level":"info"}}"#
        );
        let denied = AuthEvent {
            ts_ms: 1_595_339_321_001,
            key_id: fp(TRAEFIK_KEY),
            key_hint: hint(TRAEFIK_KEY),
            consumer: None,
            source_ip: s("203.0.113.7"),
            user_agent: s("python-requests/2.31 \"\\\\ok\""),
            method: s("POST"),
            endpoint: s("/v1/payments/:id"),
            status: 401,
            outcome: Outcome::InvalidKey,
            latency_ms: Some(0.25),
            gateway: label(),
            request_id: None,
        };
        let redacted_line = r#"{"ClientHost":"203.0.113.8","DownstreamStatus":"429","Duration":"1000000","RequestMethod":"GET","RequestPath":"/","StartUTC":"2020-07-21T13:48:42Z","request_X-Api-Key":"REDACTED"}"#;
        let mut redacted =
            AuthEvent::new(1_595_339_322_000, NO_KEY.into(), 429, Outcome::RateLimited);
        redacted.source_ip = s("203.0.113.8");
        redacted.method = s("GET");
        redacted.endpoint = s("/");
        redacted.latency_ms = Some(1.0);
        redacted.gateway = label();
        check(
            Format::Traefik,
            vec![
                Case {
                    name: "traefik basic auth",
                    line: ok_line.into(),
                    want: vec![ok],
                    raw_keys: vec![],
                },
                Case {
                    name: "traefik 401 raw key",
                    line: denied_line,
                    want: vec![denied],
                    raw_keys: vec![TRAEFIK_KEY],
                },
                Case {
                    name: "traefik redacted header",
                    line: redacted_line.into(),
                    want: vec![redacted],
                    raw_keys: vec![],
                },
            ],
        );
    }

    #[test]
    fn traefik_errors() {
        check_errors(
            Format::Traefik,
            &[
                (
                    "not JSON",
                    "time=\"2020-07-21\" level=info",
                    json("expected a JSON object"),
                ),
                (
                    "truncated",
                    r#"{"StartUTC":"2020-07-21T13:48:40Z","DownstreamStatus""#,
                    json("EOF while parsing an object at line 1 column 53"),
                ),
                (
                    "missing time",
                    r#"{"DownstreamStatus":200}"#,
                    DecodeError::Missing("StartUTC"),
                ),
                (
                    "missing status",
                    r#"{"StartUTC":"2020-07-21T13:48:40Z"}"#,
                    DecodeError::Missing("DownstreamStatus"),
                ),
                (
                    "status object",
                    r#"{"StartUTC":"2020-07-21T13:48:40Z","DownstreamStatus":{}}"#,
                    not_a_number("DownstreamStatus"),
                ),
                (
                    "duration list",
                    r#"{"StartUTC":"2020-07-21T13:48:40Z","DownstreamStatus":200,"Duration":[1]}"#,
                    not_a_number("Duration"),
                ),
            ],
        );
    }

    // -----------------------------------------------------------------------------------
    // Envoy

    const ENVOY_KEY: &str = "envoy-raw-key-4444-5555-6666";

    #[test]
    fn envoy_records() {
        let ok_line = r#"{"authority":"api.example.com","bytes_received":0,"bytes_sent":15,"downstream_local_address":"10.44.0.7:8080","downstream_remote_address":"10.44.0.1:51234","duration":4,"method":"GET","path":"/v1/items/98765?x=1","protocol":"HTTP/1.1","request_id":"6b0b2a68-9a5f-4bfb-9d5b-1d0f7c5a4e21","requested_server_name":null,"response_code":200,"response_flags":"-","route_name":"default","start_time":"2021-03-01T12:34:56.789Z","upstream_cluster":"outbound|80||items.default.svc.cluster.local","upstream_host":"10.44.0.9:80","user_agent":"okhttp/4.9.0","x_forwarded_for":"198.51.100.23, 10.44.0.1","api_key_id":"key_01HX","response_code_details":"via_upstream","hostname":"istio-ingressgateway-7d4b6"}"#;
        let ok = AuthEvent {
            ts_ms: 1_614_602_096_789,
            key_id: "key_01HX".into(),
            key_hint: None,
            consumer: None,
            source_ip: s("198.51.100.23"),
            user_agent: s("okhttp/4.9.0"),
            method: s("GET"),
            endpoint: s("default"),
            status: 200,
            outcome: Outcome::Ok,
            latency_ms: Some(4.0),
            gateway: s("istio-ingressgateway-7d4b6"),
            request_id: s("6b0b2a68-9a5f-4bfb-9d5b-1d0f7c5a4e21"),
        };
        let denied_line = format!(
            r#"{{"downstream_remote_address":"[2001:db8::7]:44321","duration":"1","method":"PUT","path":"/v1/items/98765","response_code":"401","route_name":"-","start_time":"2021-03-01T13:34:56.789+01:00","user_agent":"my\/agent \"v1\"","x_forwarded_for":"-","x_api_key":"{ENVOY_KEY}","response_code_details":"ext_authz_denied","request_id":null}}"#
        );
        let denied = AuthEvent {
            ts_ms: 1_614_602_096_789,
            key_id: fp(ENVOY_KEY),
            key_hint: hint(ENVOY_KEY),
            consumer: None,
            source_ip: s("2001:db8::7"),
            user_agent: s("my/agent \"v1\""),
            method: s("PUT"),
            endpoint: s("/v1/items/:id"),
            status: 401,
            outcome: Outcome::InvalidKey,
            latency_ms: Some(1.0),
            gateway: label(),
            request_id: None,
        };
        let expired_line = r#"{"downstream_remote_address":"192.0.2.1:1000","method":"GET","path":"/a","response_code":401,"start_time":"2021-03-01T12:34:56Z","api_key_id":"key_02","response_code_details":"api_key_expired"}"#;
        let mut expired = AuthEvent::new(1_614_602_096_000, "key_02".into(), 401, Outcome::Expired);
        expired.source_ip = s("192.0.2.1");
        expired.method = s("GET");
        expired.endpoint = s("/a");
        expired.gateway = label();
        check(
            Format::Envoy,
            vec![
                Case {
                    name: "envoy success",
                    line: ok_line.into(),
                    want: vec![ok],
                    raw_keys: vec![],
                },
                Case {
                    name: "envoy 401 raw key",
                    line: denied_line,
                    want: vec![denied],
                    raw_keys: vec![ENVOY_KEY],
                },
                Case {
                    name: "envoy expired",
                    line: expired_line.into(),
                    want: vec![expired],
                    raw_keys: vec![],
                },
            ],
        );
    }

    #[test]
    fn envoy_errors() {
        check_errors(
            Format::Envoy,
            &[
                (
                    "default text format",
                    r#"[2021-03-01T12:34:56.789Z] "GET /v1 HTTP/1.1" 200 - 0 15 4 3 "-" "curl/7.68.0" "id" "host" "10.0.0.1:80""#,
                    json("expected a JSON object"),
                ),
                (
                    "truncated",
                    r#"{"start_time":"2021-03-01T12:34:56.789Z","response_code":200,"#,
                    json("EOF while parsing a value at line 1 column 61"),
                ),
                (
                    "missing time",
                    r#"{"response_code":200}"#,
                    DecodeError::Missing("start_time"),
                ),
                (
                    "null time",
                    r#"{"start_time":null,"response_code":200}"#,
                    DecodeError::Missing("start_time"),
                ),
                (
                    "missing status",
                    r#"{"start_time":"2021-03-01T12:34:56.789Z","response_code":"-"}"#,
                    DecodeError::Missing("response_code"),
                ),
                (
                    "status object",
                    r#"{"start_time":"2021-03-01T12:34:56.789Z","response_code":{"v":200}}"#,
                    not_a_number("response_code"),
                ),
                (
                    "status bool",
                    r#"{"start_time":"2021-03-01T12:34:56.789Z","response_code":true}"#,
                    not_a_number("response_code"),
                ),
            ],
        );
    }

    // -----------------------------------------------------------------------------------
    // nginx

    const NGINX_KEY: &str = "ngx_key_ABCDEFGHIJKLMNOP1234";

    #[test]
    fn nginx_records() {
        let ok_line = r#"{"time_iso8601":"2021-02-25T05:57:48+00:00","msec":"1614232668.342","remote_addr":"192.0.2.10","request_method":"GET","request_uri":"/v1/orders?page=2","status":"200","body_bytes_sent":"512","request_time":"0.012","http_referrer":"","http_user_agent":"Mozilla/5.0","http_x_api_key":"-","request_id":"8a3f1c","hostname":"web-01"}"#;
        let ok = AuthEvent {
            ts_ms: 1_614_232_668_342,
            key_id: NO_KEY.into(),
            key_hint: None,
            consumer: None,
            source_ip: s("192.0.2.10"),
            user_agent: s("Mozilla/5.0"),
            method: s("GET"),
            endpoint: s("/v1/orders"),
            status: 200,
            outcome: Outcome::Ok,
            latency_ms: Some(12.0),
            gateway: s("web-01"),
            request_id: s("8a3f1c"),
        };
        let denied_line = format!(
            r#"{{"time_iso8601":"2021-03-28T03:00:00+02:00","remote_addr":"198.51.100.4","request_method":"GET","request_uri":"/v1/orders/5","status":429,"request_time":0.5,"http_user_agent":"Wget\/1.21 \u0022x\u0022","http_x_api_key":"{NGINX_KEY}","request_id":""}}"#
        );
        let denied = AuthEvent {
            ts_ms: 1_616_893_200_000,
            key_id: fp(NGINX_KEY),
            key_hint: hint(NGINX_KEY),
            consumer: None,
            source_ip: s("198.51.100.4"),
            user_agent: s("Wget/1.21 \"x\""),
            method: s("GET"),
            endpoint: s("/v1/orders/:id"),
            status: 429,
            outcome: Outcome::RateLimited,
            latency_ms: Some(500.0),
            gateway: label(),
            request_id: None,
        };
        let forbidden_line = r#"{"msec":1614232668.5,"remote_addr":"192.0.2.11","request_method":"POST","request_uri":"/admin","status":"403","http_x_api_key":""}"#;
        let mut forbidden =
            AuthEvent::new(1_614_232_668_500, NO_KEY.into(), 403, Outcome::Forbidden);
        forbidden.source_ip = s("192.0.2.11");
        forbidden.method = s("POST");
        forbidden.endpoint = s("/admin");
        forbidden.gateway = label();
        check(
            Format::Nginx,
            vec![
                Case {
                    name: "nginx success",
                    line: ok_line.into(),
                    want: vec![ok],
                    raw_keys: vec![],
                },
                Case {
                    name: "nginx 429 raw key",
                    line: denied_line,
                    want: vec![denied],
                    raw_keys: vec![NGINX_KEY],
                },
                Case {
                    name: "nginx 403 msec number",
                    line: forbidden_line.into(),
                    want: vec![forbidden],
                    raw_keys: vec![],
                },
            ],
        );
    }

    #[test]
    fn nginx_errors() {
        check_errors(
            Format::Nginx,
            &[
                (
                    "combined format",
                    r#"192.0.2.10 - - [25/Feb/2021:05:57:48 +0000] "GET / HTTP/1.1" 200 512"#,
                    json("expected a JSON object"),
                ),
                (
                    "truncated",
                    r#"{"msec":"1614232668.342","status":"20"#,
                    json("EOF while parsing a string at line 1 column 37"),
                ),
                (
                    "missing time",
                    r#"{"status":"200"}"#,
                    DecodeError::Missing("time_iso8601` or `msec"),
                ),
                (
                    "bad msec",
                    r#"{"msec":"soon","status":"200"}"#,
                    invalid("msec", "expected epoch seconds"),
                ),
                (
                    "bad iso time",
                    r#"{"time_iso8601":"25 Feb 2021","status":"200"}"#,
                    invalid("time_iso8601", EXPECTED_TIMESTAMP),
                ),
                (
                    "missing status",
                    r#"{"msec":"1614232668.342","status":""}"#,
                    DecodeError::Missing("status"),
                ),
                (
                    "status object",
                    r#"{"msec":"1614232668.342","status":{"s":200}}"#,
                    not_a_number("status"),
                ),
            ],
        );
        assert_eq!(
            DecodeError::Missing(NGINX_TIME).to_string(),
            "missing field `time_iso8601` or `msec`"
        );
    }

    // -----------------------------------------------------------------------------------
    // AWS API Gateway

    #[test]
    fn aws_records() {
        let ok_line = r#"{"requestId":"c6af9ac6-7b61-11e6-9a41-93e8deadbeef","ip":"203.0.113.50","caller":"-","user":"-","requestTime":"25/Feb/2021:06:57:48 +0100","requestTimeEpoch":"1614232668342","httpMethod":"GET","resourcePath":"/pets/{petId}","path":"/prod/pets/42","status":"200","protocol":"HTTP/1.1","responseLength":"48","userAgent":"aws-sdk-js/2.0","apiKeyId":"wJbYk3eXa1","responseLatency":"23","errorMessage":"-","domainName":"abc123.execute-api.eu-west-1.amazonaws.com"}"#;
        let ok = AuthEvent {
            ts_ms: 1_614_232_668_342,
            key_id: "wJbYk3eXa1".into(),
            key_hint: None,
            consumer: None,
            source_ip: s("203.0.113.50"),
            user_agent: s("aws-sdk-js/2.0"),
            method: s("GET"),
            endpoint: s("/pets/{petId}"),
            status: 200,
            outcome: Outcome::Ok,
            latency_ms: Some(23.0),
            gateway: s("abc123.execute-api.eu-west-1.amazonaws.com"),
            request_id: s("c6af9ac6-7b61-11e6-9a41-93e8deadbeef"),
        };
        let denied_line = r#"{"requestId":"r-2","ip":"203.0.113.51","requestTime":"25/Feb/2021:00:57:48 -0500","requestTimeEpoch":"-","httpMethod":"POST","resourcePath":"-","path":"/prod/orders/1234","status":"403","userAgent":"Mozilla/5.0 (\"compatible\")","apiKeyId":"-","responseLatency":"-","errorMessage":"Invalid API Key identifier specified","domainName":"-"}"#;
        let denied = AuthEvent {
            ts_ms: 1_614_232_668_000,
            key_id: NO_KEY.into(),
            key_hint: None,
            consumer: None,
            source_ip: s("203.0.113.51"),
            user_agent: s("Mozilla/5.0 (\"compatible\")"),
            method: s("POST"),
            endpoint: s("/prod/orders/:id"),
            status: 403,
            outcome: Outcome::InvalidKey,
            latency_ms: None,
            gateway: label(),
            request_id: s("r-2"),
        };
        let limited_line = r#"{"requestTimeEpoch":1614232668342,"status":429,"apiKeyId":"wJbYk3eXa1","errorMessage":"Too Many Requests","responseLatency":1}"#;
        let mut limited = AuthEvent::new(
            1_614_232_668_342,
            "wJbYk3eXa1".into(),
            429,
            Outcome::RateLimited,
        );
        limited.latency_ms = Some(1.0);
        limited.gateway = label();
        check(
            Format::AwsApiGw,
            vec![
                Case {
                    name: "aws success",
                    line: ok_line.into(),
                    want: vec![ok],
                    raw_keys: vec![],
                },
                Case {
                    name: "aws 403 clf time",
                    line: denied_line.into(),
                    want: vec![denied],
                    raw_keys: vec![],
                },
                Case {
                    name: "aws 429",
                    line: limited_line.into(),
                    want: vec![limited],
                    raw_keys: vec![],
                },
            ],
        );
    }

    #[test]
    fn aws_errors() {
        check_errors(
            Format::AwsApiGw,
            &[
                (
                    "not JSON",
                    "c6af9ac6 203.0.113.50 - [25/Feb/2021:05:57:48 +0000]",
                    json("expected a JSON object"),
                ),
                (
                    "truncated",
                    r#"{"requestTimeEpoch":"1614232668342","status":"#,
                    json("EOF while parsing a value at line 1 column 45"),
                ),
                (
                    "missing time",
                    r#"{"requestTimeEpoch":"-","requestTime":"-","status":"200"}"#,
                    DecodeError::Missing("requestTimeEpoch` or `requestTime"),
                ),
                (
                    "bad epoch",
                    r#"{"requestTimeEpoch":"yesterday","status":"200"}"#,
                    invalid("requestTimeEpoch", "expected epoch milliseconds"),
                ),
                (
                    "bad clf",
                    r#"{"requestTime":"25/Foo/2021:05:57:48 +0000","status":"200"}"#,
                    invalid("requestTime", EXPECTED_TIMESTAMP),
                ),
                (
                    "missing status",
                    r#"{"requestTimeEpoch":"1614232668342","status":"-"}"#,
                    DecodeError::Missing("status"),
                ),
                (
                    "status object",
                    r#"{"requestTimeEpoch":"1614232668342","status":{"code":"200"}}"#,
                    not_a_number("status"),
                ),
            ],
        );
    }

    // -----------------------------------------------------------------------------------
    // Across presets

    #[test]
    fn invalid_utf8() {
        let d = decoder(Format::Tyk);
        let mut out = Vec::new();
        let line = b"{\"timestamp\":\"2021-02-25T05:57:48Z\",\"response_code\":200,\"user_agent\":\"\xff\xfe\"}";
        assert_eq!(d.decode(line, &mut out), Err(DecodeError::NotUtf8));
        assert_eq!(d.decode(b"\xff{", &mut out), Err(DecodeError::NotUtf8));
    }

    #[test]
    fn gateway_label_is_optional() {
        let d = Decoder::new(Format::Tyk, fingerprinter(), None);
        let mut out = Vec::new();
        let line = r#"{"timestamp":"2021-02-25T05:57:48Z","response_code":200}"#;
        d.decode(line.as_bytes(), &mut out).unwrap();
        assert_eq!(out[0].gateway, None);
        // Events borrow from the line when there is nothing to unescape.
        let line = r#"{"timestamp":"2021-02-25T05:57:48Z","response_code":200,"method":"GET","path":"/a"}"#;
        d.decode(line.as_bytes(), &mut out).unwrap();
        assert!(matches!(out[1].method, Some(Cow::Borrowed("GET"))));
        assert!(matches!(out[1].endpoint, Some(Cow::Borrowed("/a"))));
    }

    #[test]
    fn source_addresses() {
        let cases = [
            ("10.0.0.1", "10.0.0.1"),
            ("10.0.0.1:443", "10.0.0.1"),
            ("[2001:db8::1]:443", "2001:db8::1"),
            ("[2001:db8::1]", "2001:db8::1"),
            ("2001:db8::1", "2001:db8::1"),
            ("::1", "::1"),
            ("host.example:80", "host.example"),
        ];
        for (input, want) in cases {
            assert_eq!(strip_port(Cow::Borrowed(input)), want, "{input}");
            assert_eq!(strip_port(Cow::Owned(input.to_owned())), want, "{input}");
        }
        assert_eq!(first_forwarded(" 1.2.3.4 , 5.6.7.8".into()), "1.2.3.4");
    }

    #[test]
    fn redact_lines() {
        let cases: Vec<(Format, String, &str)> = vec![
            (
                Format::Kong,
                format!(
                    r#"{{"request":{{"headers":{{"apikey":"{KONG_KEY}"}}}},"response":{{"status":"#
                ),
                KONG_KEY,
            ),
            (
                Format::Tyk,
                format!(r#"{{"api_key":"{TYK_RAW}","response_code":{{}}}}"#),
                TYK_RAW,
            ),
            (
                Format::Traefik,
                format!(r#"{{"request_X-Api-Key":"{TRAEFIK_KEY}"}}"#),
                TRAEFIK_KEY,
            ),
            (
                Format::Envoy,
                format!(r#"{{"x_api_key":"{ENVOY_KEY}","start_time":1}}"#),
                ENVOY_KEY,
            ),
            (
                Format::Nginx,
                format!(r#"{{"http_x_api_key":"{NGINX_KEY}","status":{{}}}}"#),
                NGINX_KEY,
            ),
            (
                Format::Nginx,
                format!(
                    r#"192.0.2.1 - - [25/Feb/2021:05:57:48 +0000] "GET /v1?api_key={NGINX_KEY} HTTP/1.1" 401"#
                ),
                NGINX_KEY,
            ),
            (
                Format::AwsApiGw,
                format!("x-api-key: {NGINX_KEY}"),
                NGINX_KEY,
            ),
        ];
        for (format, line, raw) in cases {
            let d = decoder(format);
            let out = d.redact(line.as_bytes());
            assert!(!out.contains(raw), "{out}");
            assert!(out.contains(&*fp(raw)), "{out}");
            assert_eq!(out.replace(&*fp(raw), raw), line);
        }
        // Tyk's raw request (base64, headers included) goes too.
        let d = decoder(Format::Tyk);
        let out = d
            .redact(br#"{"raw_request":"R0VUIC8gSFRUUC8xLjENClgtQXBpLUtleTogc2VjcmV0DQo=","x":1}"#);
        assert!(!out.contains("R0VUIC8g"), "{out}");
        // A mapping's secret field, whatever its name.
        let m: FieldMapping =
            toml::from_str("timestamp = \"t\"\nkey_secret = \"creds.token\"").unwrap();
        let d = decoder(Format::Json(m));
        let out = d.redact(br#"{"creds":{"token":"tok_1234567890abcdef"},"t":"-"}"#);
        assert!(!out.contains("tok_1234567890abcdef"), "{out}");
        assert!(out.contains(&*fp("tok_1234567890abcdef")), "{out}");
    }

    fn every_format() -> Vec<Format> {
        let mut all: Vec<Format> = PRESETS.iter().map(|p| Format::preset(p).unwrap()).collect();
        all.push(Format::Json(
            toml::from_str("timestamp = \"t\"\nkey_secret = \"a.b\"\nstatus = \"s.0\"").unwrap(),
        ));
        all
    }

    #[test]
    fn deep_nesting_is_refused_without_overflow() {
        // serde_json stops at 128 levels; deeper than that must be an error, not a stack
        // overflow, wherever the nesting sits (a field a preset reads, one it skips, a
        // batch element).
        let deep = |n: usize| format!("{}{}", "[".repeat(n), "]".repeat(n));
        for format in every_format() {
            let d = decoder(format.clone());
            for line in [
                format!(r#"{{"request":{}}}"#, deep(100_000)),
                format!(r#"{{"zzz_skipped":{}}}"#, deep(100_000)),
                format!(r#"{{"a":{{"b":{}}}}}"#, deep(200)),
                format!("[{}]", deep(100_000)),
            ] {
                let mut out = Vec::new();
                assert!(
                    d.decode(line.as_bytes(), &mut out).is_err(),
                    "{}",
                    format.name()
                );
                assert!(out.is_empty());
            }
        }
        // Shallow nesting in a skipped field is fine.
        let line = format!(
            r#"{{"request":{{"method":"GET","uri":"/"}},"response":{{"status":200}},"started_at":1614232669000,"x":{}}}"#,
            deep(100)
        );
        assert_eq!(
            decoder(Format::Kong).decode(line.as_bytes(), &mut Vec::new()),
            Ok(1)
        );
    }

    #[test]
    fn kong_batches_are_bounded() {
        let rec = r#"{"request":{"method":"GET","uri":"/"},"response":{"status":200},"started_at":1614232669000,"authenticated_entity":{"id":"k"}}"#;
        let batch = |n: usize| format!("[{}]", vec![rec; n].join(","));
        let d = decoder(Format::Kong).with_max_line_bytes(usize::MAX);
        let mut out = Vec::new();
        assert_eq!(
            d.decode(batch(MAX_BATCH_RECORDS).as_bytes(), &mut out),
            Ok(MAX_BATCH_RECORDS)
        );
        let line = batch(MAX_BATCH_RECORDS + 1);
        let mut out = Vec::new();
        let err = d.decode(line.as_bytes(), &mut out).unwrap_err();
        assert!(
            err.to_string().contains("batch of more than 10000 records"),
            "{err}"
        );
        assert!(out.is_empty());
        // With fallbacks (a second parse into values) too.
        let d = d.with_key_fallbacks(KeyFallbacks {
            id_fields: vec!["x".into()],
            secret_fields: vec![],
        });
        assert!(d.decode(line.as_bytes(), &mut Vec::new()).is_err());
    }

    #[test]
    fn over_long_lines_are_refused_unread_and_not_copied() {
        let d = decoder(Format::Kong).with_max_line_bytes(64);
        let long = format!(
            r#"{{"apikey":"raw_secret_key_0123456789","pad":"{}"}}"#,
            "x".repeat(100)
        );
        let err = d.decode(long.as_bytes(), &mut Vec::new()).unwrap_err();
        assert_eq!(
            err,
            DecodeError::TooLong {
                bytes: long.len() as u64,
                limit: 64
            }
        );
        assert_eq!(err.kind(), "too_long");
        assert_eq!(
            err.to_string(),
            format!("line too long: {} bytes (limit 64)", long.len())
        );
        assert_eq!(
            d.redact(long.as_bytes()),
            too_long_marker(long.len() as u64)
        );
        // The sources' marker for a line they skipped gives the same error and dead letter.
        let marker = too_long_marker(5_000_000_000);
        assert_eq!(
            d.decode(marker.as_bytes(), &mut Vec::new()),
            Err(DecodeError::TooLong {
                bytes: 5_000_000_000,
                limit: 64
            })
        );
        assert_eq!(d.redact(marker.as_bytes()), marker);
        // Not a marker: ordinary errors.
        for line in ["<line too long: x bytes>", "<line too long: 12 bytes", "<"] {
            let e = d.decode(line.as_bytes(), &mut Vec::new()).unwrap_err();
            assert_eq!(e.kind(), "json", "{line}");
        }
        // At the limit exactly: decoded.
        let ok = r#"{"started_at":1614232669000,"response":{"status":200}}"#;
        let d = decoder(Format::Kong).with_max_line_bytes(ok.len());
        assert_eq!(d.decode(ok.as_bytes(), &mut Vec::new()), Ok(1));
    }

    #[test]
    fn fuzz_finding_a_tyk_time_before_the_epoch_is_refused() {
        // fuzz/artifacts/decode/crash-833b06f0 (FUZZING.md): a year-1013 timestamp gave an
        // event at a negative time.
        let line = r#"{"method":"GET","host":"api.example.com","path":"/v1/orders","raw_path":"/v1/orders","content_length":0,"user_agent":"okhttp/4.12.0","day":20,"month":11,"year":2026,"hour":14,"response_code":200,"api_key":"tyk_bO5JNpXJHv9lOgsxwkXWZ1tgIIMF48Yg","timestamp":"1013-11-20T14:17:05.46256917Z","api_version":"Non Versioned","api_name":"orders-v1","api_id":"157206940ae957df54cdca00158b10b2","org_id":"ce800e76d6fed00bea0541f6","oauth_id":"","request_time_ms":16,"latency":{"total":16,"upstream":14},"ip_address":"203.0.113.77","tags":["org-ce800e76d6fed00bea0541f6","api-157206940ae957df54cdca00158b10b2","env:prod"],"alias":"globex-mobile","track_path":false,"expireAt":"2026-11-27T14:17:05.46256917Z"}"#;
        let err = decoder(Format::Tyk)
            .decode(line.as_bytes(), &mut Vec::new())
            .unwrap_err();
        assert_eq!(err.kind(), "invalid_field", "{err}");
    }
}
