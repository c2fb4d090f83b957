//! Keyed fingerprints of raw key material.
//!
//! Architecture invariant: raw key material is replaced by a fingerprint while the line is
//! being decoded; nothing downstream of this module ever sees it.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Prefix of every fingerprinted key id, so that fingerprints never collide with gateway ids.
pub const FINGERPRINT_PREFIX: &str = "fp:";

/// Bytes of the HMAC kept in the id: 96 bits, plenty against accidental collisions.
const KEPT_BYTES: usize = 12;

/// Keys shorter than this get no display hint: four characters of an eight-character key
/// would give away half of it.
const MIN_LEN_FOR_HINT: usize = 16;

/// HMAC-SHA256 keyed with a secret from the config, so that fingerprints cannot be
/// reversed by hashing guessed keys without the secret.
#[derive(Clone)]
pub struct Fingerprinter {
    mac: Hmac<Sha256>,
    hint_chars: usize,
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fingerprinter")
            .field("secret", &"<redacted>")
            .field("hint_chars", &self.hint_chars)
            .finish()
    }
}

impl Fingerprinter {
    pub fn new(secret: &[u8], hint_chars: usize) -> Self {
        Fingerprinter {
            mac: Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts any key length"),
            hint_chars,
        }
    }

    /// The stable id of a raw key: `fp:` and 24 hex characters.
    pub fn key_id(&self, raw: &str) -> String {
        // Cloning the keyed state skips re-hashing the secret for every event.
        let mut mac = self.mac.clone();
        mac.update(raw.trim().as_bytes());
        let digest = mac.finalize().into_bytes();
        let mut id = String::with_capacity(FINGERPRINT_PREFIX.len() + KEPT_BYTES * 2);
        id.push_str(FINGERPRINT_PREFIX);
        id.push_str(&hex::encode(&digest[..KEPT_BYTES]));
        id
    }

    /// The last few characters of a long enough key, prefixed with an ellipsis.
    pub fn hint(&self, raw: &str) -> Option<String> {
        let raw = raw.trim();
        let n = raw.chars().count();
        if self.hint_chars == 0 || n < MIN_LEN_FOR_HINT || self.hint_chars * 4 > n {
            return None;
        }
        let tail: String = raw.chars().skip(n - self.hint_chars).collect();
        Some(format!("…{tail}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_keyed_and_stable() {
        let a = Fingerprinter::new(b"secret-a", 4);
        let b = Fingerprinter::new(b"secret-b", 4);
        let raw = "sk_live_4eC39HqLyjWDarjtT1zdp7dc";
        assert_eq!(a.key_id(raw), a.key_id(raw));
        assert_eq!(a.key_id(raw), a.key_id(&format!("  {raw} ")));
        assert_ne!(a.key_id(raw), b.key_id(raw));
        assert_eq!(a.key_id(raw).len(), 3 + 24);
        assert!(a.key_id(raw).starts_with("fp:"));
        assert!(!a.key_id(raw).contains("p7dc"));
        // RFC 4231 test case 2: HMAC-SHA256("Jefe", "what do ya want for nothing?").
        let jefe = Fingerprinter::new(b"Jefe", 4);
        assert_eq!(
            jefe.key_id("what do ya want for nothing?"),
            "fp:5bdcc146bf60754e6a042426"
        );
    }

    #[test]
    fn hints_only_for_long_keys() {
        let f = Fingerprinter::new(b"s", 4);
        assert_eq!(
            f.hint("sk_live_4eC39HqLyjWDarjtT1zdp7dc").as_deref(),
            Some("…p7dc")
        );
        assert_eq!(f.hint("short-key"), None);
        assert_eq!(
            Fingerprinter::new(b"s", 0).hint("sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
            None
        );
    }
}
