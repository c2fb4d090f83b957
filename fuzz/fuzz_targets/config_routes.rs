//! routes.toml (channels, receivers, routes) from any text: a refusal names the file and the field (or the line).
#![no_main]

use keywatch_fuzz::check_config_error;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // The loaders read the file as UTF-8 first.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = keywatch::notify::Config::parse("fuzz.toml", text).map(drop) {
        check_config_error(&e);
    }
});
