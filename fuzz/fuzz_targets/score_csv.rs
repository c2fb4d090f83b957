//! `keywatch score`'s CSV reader and the anomaly models behind it: any input gives rows
//! (scores in [0,1]) or an error saying which line.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut out = Vec::new();
    match keywatch::anomaly::score::score_csv(data, &mut out) {
        Ok(_) => {
            let text = String::from_utf8(out).expect("the output is UTF-8");
            for line in text.lines().skip(1) {
                let score: f64 = line
                    .rsplit(',')
                    .next()
                    .and_then(|s| s.parse().ok())
                    .unwrap_or_else(|| panic!("no score in {line:?}"));
                assert!((0.0..=1.0).contains(&score), "{line:?}");
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
