//! keywatch.toml (the main config): parsed and validated from any text: a refusal names the file and the field (or the line).
#![no_main]

use keywatch_fuzz::check_config_error;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The loaders read the file as UTF-8 first.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = keywatch::config::parse("fuzz.toml", text)
        .and_then(|raw| raw.validate("fuzz.toml"))
        .map(drop)
    {
        check_config_error(&e);
    }
});
