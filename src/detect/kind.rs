//! The finding vocabulary: every kind of fact keywatch states, and everything known about a
//! kind, in one table ([`KINDS`]).
//!
//! Contract:
//! - A kind's serialized name (`lingering_old_key`) is stored in both stores, in the
//!   notification log and in routes files: it never changes. serde's snake case and
//!   [`FindingKind::as_str`] give the same name (a test checks every kind).
//! - Everything else a module needs to know about a kind (the heading of its messages, who
//!   raises it, the severities it is raised with, whether it is told again after the repeat
//!   interval, whether it belongs to a rotation) is a column of [`KINDS`], read through the
//!   accessors on [`FindingKind`]; no other module lists kinds to decide something.
//! - The anomaly models' kinds are finding kinds ([`Origin::Anomaly`]): the models raise
//!   `anomaly::AnomalyFinding`s that carry a [`FindingKind`].

use serde::{Deserialize, Serialize};

/// What kind of fact a finding states. The order is the order of [`KINDS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FindingKind {
    /// A source still sends the old key of a rotation.
    LingeringOldKey,
    /// The adoption trend will miss the rotation's deadline.
    RotationAtRisk,
    /// The deadline passed and sources still send the old key.
    RotationOverdue,
    /// A step of the reminder schedule is due (7 days, 3 days, ... before the deadline).
    RotationReminder,
    /// The old key had no traffic for the quiet period.
    SafeToRevoke,
    RevokedKeyUsed,
    ExpiredKeyUsed,
    /// Auth failures on the new key (or the owner's keys) jumped after the rotation started.
    FailedRollover,
    /// A key is older than the maximum age and not being rotated.
    KeyAgeExceeded,
    /// Many invalid-key failures from one source.
    UnknownKeyBurst,
    /// A key seen in traffic that the registry does not know.
    UnknownKey,
    // The anomaly models (`anomaly::keys`): each states what was expected, what was seen
    // and how surprising it is.
    /// Request volume far from the key's seasonal baseline (an hour, or a minute burst).
    VolumeAnomaly,
    /// Auth failures far above the key's usual rate.
    FailureRateSpike,
    /// Latency far from the key's usual latency.
    LatencyShift,
    /// A new network, user agent or endpoint for a key whose sources were stable.
    NewSource,
    /// Traffic on a key that had none for a long time.
    DormantKeyWoke,
    /// An endpoint outside the key's scopes, or a jump in requests the gateway forbade.
    OutOfScopeUse,
    /// The hour's behaviour is unlike the key's own past and its peer group.
    BehaviourAnomaly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

/// Which detector raises a kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The rotation detectors, on stored usage at an evaluation (`detect::rotation`).
    Rotation,
    /// The stream detectors, on every event (`detect::stream`).
    Stream,
    /// The key-age check of an evaluation ([`crate::detect::Engine::evaluate`]).
    KeyAge,
    /// The anomaly models (`anomaly::keys`).
    Anomaly,
}

/// How a kind relates to a rotation, for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotationClass {
    /// Not about a rotation.
    None,
    /// About a rotation's progress (lingering sources, reminder, at risk, overdue): in one
    /// message these share one section, with one list of sources.
    Progress,
    /// About a rotation, but not its progress (safe to revoke, failed rollover): a section
    /// of its own that still shows the rotation.
    Other,
}

/// Everything known about one kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindInfo {
    pub kind: FindingKind,
    /// The serialized name.
    pub name: &'static str,
    /// The heading of the kind in messages.
    pub title: &'static str,
    pub origin: Origin,
    /// The severities the detectors raise it with.
    pub severities: &'static [Severity],
    /// Whether a fact of this kind is told again after the repeat interval (unless a routes
    /// file says otherwise). Not for kinds whose dedup keys already name the step or period
    /// (a reminder step, a revoked key used per `alerts.repeat_after`, an anomaly's hour,
    /// minute or new source), or where telling again says nothing new.
    pub repeats: bool,
    pub rotation: RotationClass,
    /// Whether its evidence describes one source (IP, user agent, endpoints), which messages
    /// show as such.
    pub source_evidence: bool,
}

#[allow(clippy::too_many_arguments)] // one argument per column keeps the table one row per kind
const fn info(
    kind: FindingKind,
    name: &'static str,
    title: &'static str,
    origin: Origin,
    severities: &'static [Severity],
    repeats: bool,
    rotation: RotationClass,
    source_evidence: bool,
) -> KindInfo {
    KindInfo {
        kind,
        name,
        title,
        origin,
        severities,
        repeats,
        rotation,
        source_evidence,
    }
}

use FindingKind as K;
use Origin as O;
use RotationClass as R;
use Severity::{Critical as CRIT, Info as INFO, Warning as WARN};

/// Every kind, in the order of [`FindingKind`]'s variants.
#[rustfmt::skip]
pub const KINDS: [KindInfo; 18] = [
    //   kind                 name                  title                             origin       severities      repeats rotation     source
    info(K::LingeringOldKey,  "lingering_old_key",  "Old key still in use",           O::Rotation, &[WARN, CRIT],  true,   R::Progress, true),
    info(K::RotationAtRisk,   "rotation_at_risk",   "Rotation at risk",               O::Rotation, &[WARN],        true,   R::Progress, false),
    info(K::RotationOverdue,  "rotation_overdue",   "Rotation overdue",               O::Rotation, &[CRIT],        true,   R::Progress, false),
    info(K::RotationReminder, "rotation_reminder",  "Rotation reminder",              O::Rotation, &[INFO, WARN],  false,  R::Progress, false),
    info(K::SafeToRevoke,     "safe_to_revoke",     "Safe to revoke",                 O::Rotation, &[INFO],        false,  R::Other,    false),
    info(K::RevokedKeyUsed,   "revoked_key_used",   "Revoked key used",               O::Stream,   &[CRIT],        false,  R::None,     true),
    info(K::ExpiredKeyUsed,   "expired_key_used",   "Expired key used",               O::Stream,   &[WARN, CRIT],  false,  R::None,     true),
    info(K::FailedRollover,   "failed_rollover",    "Failed rollover",                O::Rotation, &[CRIT],        true,   R::Other,    false),
    info(K::KeyAgeExceeded,   "key_age_exceeded",   "Key older than the maximum age", O::KeyAge,   &[WARN],        true,   R::None,     false),
    info(K::UnknownKeyBurst,  "unknown_key_burst",  "Burst of invalid keys",          O::Stream,   &[WARN],        false,  R::None,     false),
    info(K::UnknownKey,       "unknown_key",        "Unknown key",                    O::Stream,   &[INFO],        false,  R::None,     true),
    info(K::VolumeAnomaly,    "volume_anomaly",     "Unusual request volume",         O::Anomaly,  &[WARN, CRIT],  false,  R::None,     false),
    info(K::FailureRateSpike, "failure_rate_spike", "Auth failure spike",             O::Anomaly,  &[WARN, CRIT],  false,  R::None,     false),
    info(K::LatencyShift,     "latency_shift",      "Latency shift",                  O::Anomaly,  &[WARN, CRIT],  false,  R::None,     false),
    info(K::NewSource,        "new_source",         "New source for a key",           O::Anomaly,  &[WARN, CRIT],  false,  R::None,     false),
    info(K::DormantKeyWoke,   "dormant_key_woke",   "Dormant key used again",         O::Anomaly,  &[WARN, CRIT],  false,  R::None,     false),
    info(K::OutOfScopeUse,    "out_of_scope_use",   "Key used outside its scopes",    O::Anomaly,  &[WARN, CRIT],  false,  R::None,     false),
    info(K::BehaviourAnomaly, "behaviour_anomaly",  "Unusual key behaviour",          O::Anomaly,  &[WARN, CRIT],  false,  R::None,     false),
];

impl FindingKind {
    /// Every kind, in table order.
    pub const ALL: [FindingKind; KINDS.len()] = {
        let mut all = [FindingKind::LingeringOldKey; KINDS.len()];
        let mut i = 0;
        while i < KINDS.len() {
            all[i] = KINDS[i].kind;
            i += 1;
        }
        all
    };

    /// The kind's row of [`KINDS`].
    pub fn info(self) -> &'static KindInfo {
        &KINDS[self as usize]
    }

    /// The serialized name.
    pub fn as_str(self) -> &'static str {
        self.info().name
    }

    /// The heading of the kind in messages.
    pub fn title(self) -> &'static str {
        self.info().title
    }

    /// Whether the anomaly models raise this kind.
    pub fn is_anomaly(self) -> bool {
        self.info().origin == Origin::Anomaly
    }

    /// The anomaly models' kinds.
    pub fn anomalies() -> impl Iterator<Item = FindingKind> {
        FindingKind::ALL.into_iter().filter(|k| k.is_anomaly())
    }
}

impl std::fmt::Display for FindingKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for FindingKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        FindingKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s.trim())
            .ok_or_else(|| {
                let all: Vec<_> = FindingKind::ALL.iter().map(|k| k.as_str()).collect();
                format!(
                    "unknown finding kind `{s}`, expected one of {}",
                    all.join(", ")
                )
            })
    }
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Severity {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "info" => Ok(Severity::Info),
            "warning" => Ok(Severity::Warning),
            "critical" => Ok(Severity::Critical),
            other => Err(format!(
                "unknown severity `{other}`, expected info, warning or critical"
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_in_variant_order_and_names_match_serde() {
        for (i, row) in KINDS.iter().enumerate() {
            assert_eq!(row.kind as usize, i, "{row:?}");
            assert_eq!(FindingKind::ALL[i], row.kind);
            assert_eq!(
                serde_json::to_string(&row.kind).unwrap(),
                format!("\"{}\"", row.name)
            );
            assert_eq!(row.name.parse::<FindingKind>(), Ok(row.kind));
            assert!(
                !row.title.is_empty() && !row.severities.is_empty(),
                "{row:?}"
            );
        }
        assert!("lingering".parse::<FindingKind>().is_err());
    }

    #[test]
    fn facts_per_kind() {
        use FindingKind::*;
        // (kind, anomaly, repeats, rotation class, source evidence)
        let cases = [
            (LingeringOldKey, false, true, RotationClass::Progress, true),
            (RotationAtRisk, false, true, RotationClass::Progress, false),
            (RotationOverdue, false, true, RotationClass::Progress, false),
            (
                RotationReminder,
                false,
                false,
                RotationClass::Progress,
                false,
            ),
            (SafeToRevoke, false, false, RotationClass::Other, false),
            (RevokedKeyUsed, false, false, RotationClass::None, true),
            (ExpiredKeyUsed, false, false, RotationClass::None, true),
            (FailedRollover, false, true, RotationClass::Other, false),
            (KeyAgeExceeded, false, true, RotationClass::None, false),
            (UnknownKeyBurst, false, false, RotationClass::None, false),
            (UnknownKey, false, false, RotationClass::None, true),
            (VolumeAnomaly, true, false, RotationClass::None, false),
            (FailureRateSpike, true, false, RotationClass::None, false),
            (LatencyShift, true, false, RotationClass::None, false),
            (NewSource, true, false, RotationClass::None, false),
            (DormantKeyWoke, true, false, RotationClass::None, false),
            (OutOfScopeUse, true, false, RotationClass::None, false),
            (BehaviourAnomaly, true, false, RotationClass::None, false),
        ];
        assert_eq!(cases.len(), KINDS.len());
        for (kind, anomaly, repeats, rotation, source) in cases {
            let i = kind.info();
            assert_eq!(kind.is_anomaly(), anomaly, "{kind}");
            assert_eq!(i.repeats, repeats, "{kind}");
            assert_eq!(i.rotation, rotation, "{kind}");
            assert_eq!(i.source_evidence, source, "{kind}");
        }
        assert_eq!(FindingKind::anomalies().count(), 7);
        assert_eq!(SafeToRevoke.title(), "Safe to revoke");
    }

    #[test]
    fn severities_parse_and_order() {
        for s in [Severity::Info, Severity::Warning, Severity::Critical] {
            assert_eq!(s.as_str().parse::<Severity>(), Ok(s));
        }
        assert!(Severity::Info < Severity::Warning && Severity::Warning < Severity::Critical);
        assert!("fatal".parse::<Severity>().is_err());
    }
}
