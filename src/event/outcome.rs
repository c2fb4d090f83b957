//! The normalized result of an authentication attempt.

use serde::{Deserialize, Serialize};

/// What the gateway decided about the key, normalized across gateways.
///
/// Gateways log a status code and sometimes a message; keywatch maps both onto these
/// outcomes. `Expired` and `Revoked` are rarely distinguishable in logs (a known Kong
/// limitation); the registry refines `InvalidKey` later when it knows the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The key was accepted (whatever the upstream answered afterwards).
    Ok,
    /// No key, or a key the gateway does not know.
    InvalidKey,
    Expired,
    Revoked,
    /// The key is valid but not allowed to do this (scope, ACL, IP restriction).
    Forbidden,
    RateLimited,
    /// A status that says nothing about the key (e.g. a 499 before auth ran, or none).
    Other,
}

impl Outcome {
    pub const ALL: [Outcome; 7] = [
        Outcome::Ok,
        Outcome::InvalidKey,
        Outcome::Expired,
        Outcome::Revoked,
        Outcome::Forbidden,
        Outcome::RateLimited,
        Outcome::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::InvalidKey => "invalid_key",
            Outcome::Expired => "expired",
            Outcome::Revoked => "revoked",
            Outcome::Forbidden => "forbidden",
            Outcome::RateLimited => "rate_limited",
            Outcome::Other => "other",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// Any refusal by the gateway, rate limiting included (the usage report's breakdown).
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::Ok | Outcome::Other)
    }

    /// An authentication failure: the key was missing, unknown, expired, revoked or not
    /// allowed. Rate limiting is not one (the key was fine, the client too fast), and
    /// every detector and stored failure count uses this, not [`Outcome::is_failure`].
    pub fn is_auth_failure(self) -> bool {
        matches!(
            self,
            Outcome::InvalidKey | Outcome::Expired | Outcome::Revoked | Outcome::Forbidden
        )
    }

    /// Classifies from the status code and, when the gateway logs one, an error message or
    /// auth-specific field. The message wins over the status when it is specific.
    pub fn classify(status: u16, message: Option<&str>) -> Outcome {
        if let Some(found) = message.and_then(Self::from_message) {
            return found;
        }
        match status {
            401 | 407 => Outcome::InvalidKey,
            403 => Outcome::Forbidden,
            429 => Outcome::RateLimited,
            100..=599 => Outcome::Ok,
            _ => Outcome::Other,
        }
    }

    /// Parses an explicit outcome (`"expired"`, `"invalid_key"`, ...) or recognizes the usual
    /// gateway error messages ("API key expired", "Invalid authentication credentials").
    pub fn from_message(msg: &str) -> Option<Outcome> {
        let m = msg.trim().to_ascii_lowercase();
        if m.is_empty() {
            return None;
        }
        for o in Outcome::ALL {
            if m == o.as_str() {
                return Some(o);
            }
        }
        let has = |words: &[&str]| words.iter().any(|w| m.contains(w));
        if has(&["expired"]) {
            Some(Outcome::Expired)
        } else if has(&["revoked", "disabled", "deactivated"]) {
            Some(Outcome::Revoked)
        } else if has(&["rate limit", "too many", "quota", "throttl"]) {
            Some(Outcome::RateLimited)
        } else if has(&[
            "invalid api key",
            "invalid key",
            "invalid authentication",
            "no api key",
            "missing api key",
            "key not found",
            "unauthorized",
            "not authorized",
            "invalid api key identifier",
            "access to this api has been disallowed",
        ]) {
            Some(Outcome::InvalidKey)
        } else if has(&[
            "scope",
            "forbidden",
            "permission",
            "not allowed",
            "cannot be accessed",
        ]) {
            Some(Outcome::Forbidden)
        } else {
            None
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_table() {
        let cases: &[(u16, Option<&str>, Outcome)] = &[
            (200, None, Outcome::Ok),
            (204, None, Outcome::Ok),
            (404, None, Outcome::Ok),
            (502, None, Outcome::Ok),
            (401, None, Outcome::InvalidKey),
            (
                401,
                Some("No API key found in request"),
                Outcome::InvalidKey,
            ),
            (
                401,
                Some("Invalid authentication credentials"),
                Outcome::InvalidKey,
            ),
            (401, Some("Key has expired, please renew"), Outcome::Expired),
            (401, Some("API key revoked"), Outcome::Revoked),
            (403, None, Outcome::Forbidden),
            (403, Some("Forbidden"), Outcome::Forbidden),
            (
                403,
                Some("Invalid API Key identifier specified"),
                Outcome::InvalidKey,
            ),
            (403, Some("insufficient scope"), Outcome::Forbidden),
            (429, None, Outcome::RateLimited),
            (429, Some("API rate limit exceeded"), Outcome::RateLimited),
            (200, Some("expired"), Outcome::Expired),
            (0, None, Outcome::Other),
            (999, None, Outcome::Other),
            (401, Some("something else entirely"), Outcome::InvalidKey),
        ];
        for &(status, msg, want) in cases {
            assert_eq!(Outcome::classify(status, msg), want, "{status} {msg:?}");
        }
    }

    #[test]
    fn failures() {
        assert!(!Outcome::Ok.is_failure());
        assert!(!Outcome::Other.is_failure());
        assert!(Outcome::InvalidKey.is_failure());
        assert!(Outcome::RateLimited.is_failure());
        let auth: Vec<Outcome> = Outcome::ALL
            .into_iter()
            .filter(|o| o.is_auth_failure())
            .collect();
        assert_eq!(
            auth,
            [
                Outcome::InvalidKey,
                Outcome::Expired,
                Outcome::Revoked,
                Outcome::Forbidden
            ]
        );
    }
}
