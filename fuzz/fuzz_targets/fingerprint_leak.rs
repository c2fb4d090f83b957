//! A raw key in each place a format reads one from, with hostile extra fields around it:
//! nothing of the key survives into an event (only its fingerprint and a short hint), nor
//! into the redacted dead-letter line.
#![no_main]

use arbitrary::Arbitrary;
use keywatch_fuzz::{check_decode, decoders};
use libfuzzer_sys::fuzz_target;

/// `@K@` is the raw key (JSON-escaped), `@X@` the extra fields.
const TEMPLATES: &[(usize, &str)] = &[
    (
        0,
        r#"{"started_at":1614232669000,"response":{"status":401},"request":{"method":"GET","uri":"/v1/x","headers":{"apikey":@K@}},"client_ip":"10.0.0.1"@X@}"#,
    ),
    (
        0,
        r#"{"started_at":1614232669000,"response":{"status":200},"request":{"method":"GET","uri":"/v1/x","headers":{"x-api-key":[@K@,"b"]@X@}}}"#,
    ),
    (
        0,
        r#"[{"started_at":1614232669000,"response":{"status":200},"request":{"headers":{"apikey":@K@}}@X@},{"started_at":1614232669001,"response":{"status":200},"request":{"headers":{"x-api-key":@K@}}}]"#,
    ),
    (
        1,
        r#"{"timestamp":"2024-01-01T00:00:00Z","response_code":200,"api_key":@K@@X@,"path":"/a","method":"GET"}"#,
    ),
    (
        2,
        r#"{"StartUTC":"2024-01-01T00:00:00Z","DownstreamStatus":200,"request_X-Api-Key":@K@,"RequestPath":"/a"@X@}"#,
    ),
    (
        3,
        r#"{"start_time":"2024-01-01T00:00:00Z","response_code":403@X@,"x_api_key":@K@,"path":"/a"}"#,
    ),
    (
        4,
        r#"{"msec":1704067200.123,"status":200,"http_x_api_key":@K@,"request_uri":"/a"@X@}"#,
    ),
    (
        6,
        r#"{"t":"2024-01-01T00:00:00Z","creds":{"token":@K@},"res":{"status":200}@X@}"#,
    ),
    (
        7,
        r#"{"started_at":1614232669000,"response":{"status":401},"request":{"headers":{"x-partner-key":@K@}}@X@}"#,
    ),
    (
        7,
        r#"{"started_at":1614232669000,"response":{"status":401},"k":@K@@X@}"#,
    ),
];

#[derive(Debug, Arbitrary)]
struct Input {
    template: u8,
    key: String,
    extra: Vec<(String, String)>,
}

fuzz_target!(|input: Input| {
    let (which, template) = TEMPLATES[input.template as usize % TEMPLATES.len()];
    let key = input.key.trim();
    // Short keys can be anything (`GET`, `200`): the hint alone shows 4 characters.
    // A key that is itself a fingerprint (`fp:…`; the fuzzer learns the one redaction
    // writes) is what redaction leaves, not a leak.
    if key.chars().count() < 8 || template.contains(key) || key.starts_with("fp:") {
        return;
    }
    // The key as it appears inside a JSON string: what the redacted line must not hold.
    let escaped_key = serde_json::to_string(key).unwrap();
    let escaped_key = &escaped_key[1..escaped_key.len() - 1];
    let mut extra = String::new();
    for (name, value) in &input.extra {
        // An extra field that holds the key, raw or once written as JSON (a NUL in a name
        // is written `\u0000`, which a key of those six characters matches), is not a key
        // field the decoder could know to redact.
        let holds = |s: &String| {
            let json = serde_json::to_string(s).unwrap();
            s.contains(key) || json.contains(escaped_key) || json.contains(key)
        };
        if holds(name) || holds(value) {
            return;
        }
        extra.push(',');
        extra.push_str(&serde_json::to_string(name).unwrap());
        extra.push(':');
        extra.push_str(&serde_json::to_string(value).unwrap());
    }
    let quoted = serde_json::to_string(&input.key).unwrap();
    let line = template.replace("@K@", &quoted).replace("@X@", &extra);
    let d = &decoders()[which];
    check_decode(d, line.as_bytes());
    let mut out = Vec::new();
    let _ = d.decode(line.as_bytes(), &mut out);
    for ev in &out {
        let fields = [
            Some(&*ev.key_id),
            ev.key_hint.as_deref(),
            ev.consumer.as_deref(),
            ev.source_ip.as_deref(),
            ev.user_agent.as_deref(),
            ev.method.as_deref(),
            ev.endpoint.as_deref(),
            ev.gateway.as_deref(),
            ev.request_id.as_deref(),
        ];
        for f in fields.into_iter().flatten() {
            assert!(!f.contains(key), "the raw key survives in {f:?}: {ev:?}");
        }
    }
    let redacted = d.redact(line.as_bytes());
    assert!(
        !redacted.contains(key) && !redacted.contains(escaped_key),
        "the raw key survives redaction: {redacted}"
    );
});
