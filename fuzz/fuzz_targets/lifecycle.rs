//! Lifecycle events (the lifecycle topic's JSON) parsed, then applied to the example
//! registry: a refusal is an error message with the field, never a panic.
#![no_main]

use std::sync::OnceLock;

use keywatch::registry::{LifecycleEvent, Registry};
use libfuzzer_sys::fuzz_target;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        Registry::parse(
            "registry.toml",
            include_str!("../../examples/registry.toml"),
        )
        .expect("the example registry parses")
    })
}

fuzz_target!(|data: &[u8]| {
    match LifecycleEvent::from_json(data) {
        Ok(ev) => {
            let mut r = registry().clone();
            let _ = ev.effective_ms(&r);
            if let Err(e) = r.apply(&ev) {
                assert!(!e.is_empty());
            }
            let _ = r.apply_at(&ev, i64::MAX);
            let _ = r.apply_at(&ev, i64::MIN);
        }
        Err(e) => assert!(!e.is_empty()),
    }
});
