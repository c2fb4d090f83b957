//! Timestamps as the decoders read them: strings (RFC 3339 and the other forms), epochs of
//! any magnitude. Results stay in 1970..=9999, and RFC 3339 agrees with chrono.
#![no_main]

use keywatch::event::{epoch_to_ms, parse_timestamp};
use keywatch_fuzz::MAX_MS;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() >= 8 {
        let v = f64::from_le_bytes(data[..8].try_into().unwrap());
        if let Some(ms) = epoch_to_ms(v) {
            assert!((0..=MAX_MS).contains(&ms), "{v} -> {ms}");
        }
    }
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let got = parse_timestamp(s);
    if let Some(ms) = got {
        assert!((0..=MAX_MS).contains(&ms), "{s:?} -> {ms}");
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        let want = t.timestamp_millis();
        if (0..=MAX_MS).contains(&want) && t.timestamp_subsec_nanos() < 1_000_000_000 {
            assert_eq!(got, Some(want), "{s:?}");
        }
    }
});
