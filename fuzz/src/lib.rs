//! What the fuzz targets share: the decoders under test, the checks every decode must pass,
//! and the check that a refused config names its field. See FUZZING.md.

use std::sync::OnceLock;

use keywatch::config::ConfigError;
use keywatch::event::{DecodeError, Decoder, FieldMapping, Fingerprinter, Format, KeyFallbacks};

/// The latest time an event may carry (9999-12-31T23:59:59.999Z).
pub const MAX_MS: i64 = 253_402_300_799_999;

pub const SECRET: &[u8] = b"fuzz-fingerprint-secret";

/// A mapping that reaches every path form: nested objects, array indexes, dotted keys.
pub const MAPPING: &str = r#"
timestamp = "t"
key_id = "auth.id"
key_secret = "creds.token"
consumer = "who.0.name"
source_ip = "net.ip"
user_agent = "ua"
method = "req.method"
path = "req.path"
route = "route.name"
status = "res.status"
message = "err"
latency = "res.took"
gateway = "gw"
request_id = "id"
latency_unit = "s"
"#;

pub fn fingerprinter() -> Fingerprinter {
    Fingerprinter::new(SECRET, 4)
}

pub fn mapping() -> FieldMapping {
    let m: FieldMapping = toml_mapping(MAPPING);
    m.validate().expect("the fuzz mapping is valid");
    m
}

fn toml_mapping(text: &str) -> FieldMapping {
    // Through the config parser, as a user's mapping arrives.
    let config = format!("[input]\nformat = \"json\"\n[input.mapping]\n{text}");
    let raw = keywatch::config::parse("fuzz.toml", &config).expect("the fuzz config parses");
    raw.input.mapping.expect("a mapping")
}

/// Every format, then variants: Kong with key fallbacks, Kong with a small line limit.
pub fn decoders() -> &'static [Decoder] {
    static D: OnceLock<Vec<Decoder>> = OnceLock::new();
    D.get_or_init(|| {
        let mut all: Vec<Decoder> = keywatch::event::PRESETS
            .iter()
            .map(|p| Decoder::new(Format::preset(p).unwrap(), fingerprinter(), None))
            .collect();
        all.push(Decoder::new(
            Format::Json(mapping()),
            fingerprinter(),
            Some("edge".into()),
        ));
        all.push(
            Decoder::new(Format::Kong, fingerprinter(), None).with_key_fallbacks(KeyFallbacks {
                id_fields: vec!["request.headers.x-consumer-id".into()],
                secret_fields: vec!["request.headers.x-partner-key".into(), "k".into()],
            }),
        );
        all.push(Decoder::new(Format::Kong, fingerprinter(), None).with_max_line_bytes(256));
        all
    })
}

/// Decodes `line` and checks what must hold whatever the line: a count that matches the
/// events, times in range, finite latencies, nothing pushed on an error, errors that say
/// which field; and redaction does not panic either.
pub fn check_decode(d: &Decoder, line: &[u8]) {
    let mut out = Vec::new();
    match d.decode(line, &mut out) {
        Ok(n) => {
            assert_eq!(n, out.len());
            for ev in &out {
                assert!((0..=MAX_MS).contains(&ev.ts_ms), "ts {}", ev.ts_ms);
                if let Some(l) = ev.latency_ms {
                    assert!(l.is_finite(), "latency {l}");
                }
                assert!(!ev.key_id.is_empty(), "empty key id");
            }
        }
        Err(e) => {
            assert!(out.is_empty(), "events pushed on an error");
            match &e {
                DecodeError::Missing(f) | DecodeError::Invalid { field: f, .. } => {
                    assert!(!f.is_empty())
                }
                DecodeError::Json(m) => assert!(!m.is_empty()),
                DecodeError::NotUtf8 | DecodeError::TooLong { .. } => {}
            }
        }
    }
    let _ = d.redact(line);
}

/// A refused config must say which file, and which field or line.
pub fn check_config_error(e: &ConfigError) {
    assert_eq!(e.file, "fuzz.toml", "{e}");
    assert!(!e.reason.is_empty(), "{e:?}");
    assert!(
        !e.field.is_empty() || e.line.is_some(),
        "names neither a field nor a line: {e}"
    );
}
