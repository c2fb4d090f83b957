//! A small memo of recent fingerprints, so that the HMAC runs once per distinct key rather
//! than once per request (a few keys make most of the traffic).
//!
//! The memo is indexed by a 128-bit SipHash of the raw key under random per-process keys,
//! never by the raw key itself: no raw key material is kept after a line is decoded.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;

use super::Fingerprinter;

/// Entries kept before the memo is cleared and refilled.
const CAPACITY: usize = 4096;

type Entry = (String, Option<String>);

pub(super) struct FingerprintCache {
    a: RandomState,
    b: RandomState,
    map: Mutex<HashMap<u128, Entry>>,
}

impl FingerprintCache {
    pub(super) fn new() -> Self {
        FingerprintCache {
            a: RandomState::new(),
            b: RandomState::new(),
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The fingerprint id and hint of a raw key, as [`Fingerprinter::key_id`] and
    /// [`Fingerprinter::hint`] give them.
    pub(super) fn get(&self, fp: &Fingerprinter, raw: &str) -> Entry {
        let raw = raw.trim(); // as the fingerprinter does
        let h = (u128::from(self.a.hash_one(raw)) << 64) | u128::from(self.b.hash_one(raw));
        // Never wait: under contention, computing is as cheap as waiting.
        let Ok(mut map) = self.map.try_lock() else {
            return (fp.key_id(raw), fp.hint(raw));
        };
        if let Some(e) = map.get(&h) {
            return e.clone();
        }
        let e = (fp.key_id(raw), fp.hint(raw));
        if map.len() >= CAPACITY {
            map.clear();
        }
        map.insert(h, e.clone());
        e
    }
}

impl Clone for FingerprintCache {
    /// A clone starts empty (the memo is only an optimization).
    fn clone(&self) -> Self {
        FingerprintCache::new()
    }
}

impl std::fmt::Debug for FingerprintCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.map.try_lock().map(|m| m.len()).ok();
        f.debug_struct("FingerprintCache")
            .field("len", &len)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_answers_as_the_fingerprinter() {
        let fp = Fingerprinter::new(b"s", 4);
        let cache = FingerprintCache::new();
        for raw in [
            "sk_live_4eC39HqLyjWDarjtT1zdp7dc",
            "short",
            " padded-key-0123456789 ",
        ] {
            let want = (fp.key_id(raw), fp.hint(raw));
            assert_eq!(cache.get(&fp, raw), want);
            assert_eq!(cache.get(&fp, raw), want); // from the memo
        }
        for i in 0..CAPACITY + 10 {
            let raw = format!("key-{i}");
            assert_eq!(cache.get(&fp, &raw).0, fp.key_id(&raw));
        }
        assert!(cache.map.lock().unwrap().len() <= CAPACITY);
        assert!(!format!("{cache:?}").contains("fp:"));
    }
}
