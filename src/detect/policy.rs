//! The rotation policy (`rules/policy.toml`): grace and quiet periods, the reminder
//! schedule, the maximum key age, and the detectors' thresholds. Every field has a default
//! (the values in the shipped `rules/policy.toml`); errors are [`ConfigError`]s with file,
//! line, dotted field and reason.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use crate::anomaly::AnomalyConfig;
use crate::config::duration;
use crate::config::ConfigError;
use crate::registry::parse_toml;

const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 24 * HOUR_MS;

/// One step of the reminder schedule: `before_ms` before the deadline (0: when it is due).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reminder {
    /// As written in the policy (`7d`), or `due` for zero.
    pub label: String,
    pub before_ms: i64,
}

/// Unknown-key bursts: `threshold` invalid-key failures from one IP within `window_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BurstPolicy {
    pub threshold: u32,
    pub window_ms: i64,
}

/// Failed rollovers: within a window of up to two hours after the rotation started, at least
/// `min_failures` auth failures on the new key (or on both keys together), at a rate of at
/// least `max(min_rate, factor × baseline)`, the baseline being the old key's auth-failure
/// rate over `baseline_ms` before the rotation.
#[derive(Debug, Clone, PartialEq)]
pub struct RolloverPolicy {
    pub min_failures: u64,
    pub min_rate: f64,
    pub factor: f64,
    pub baseline_ms: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Deadline of a rotation that names none: this long after it started.
    pub grace_period_ms: i64,
    /// The old key is safe to revoke after no traffic for this long.
    pub quiet_period_ms: i64,
    /// Reminder steps before the deadline, furthest first.
    pub reminders: Vec<Reminder>,
    /// While overdue, a reminder this often (0: none).
    pub overdue_reminder_every_ms: i64,
    /// Keys older than this without a rotation are a finding (0: never).
    pub max_key_age_ms: i64,
    /// The adoption trend is fitted over this much of the recent share history.
    pub forecast_window_ms: i64,
    /// Revoked/expired key used, unknown-key bursts: raised again for the same key and
    /// source after this long.
    pub repeat_after_ms: i64,
    pub unknown_key_burst: BurstPolicy,
    pub failed_rollover: RolloverPolicy,
    pub anomaly: AnomalyPolicy,
}

/// The anomaly models in the daemon (`[anomaly]`): whether they run, their thresholds, and
/// how much stored history they warm up from at start.
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyPolicy {
    pub enabled: bool,
    pub models: AnomalyConfig,
    /// Peer groups are refitted this often, by event time.
    pub refit_peers_every_ms: i64,
    /// At start, the models replay this much stored history (per-minute rollups).
    pub warm_up_ms: i64,
    /// ... but at most this many rollup rows (and as many source rows), newest days first
    /// cut: a bound on start time and memory.
    pub warm_up_max_rows: u64,
}

impl Default for Policy {
    fn default() -> Self {
        Policy::parse("<defaults>", "").expect("the default policy is valid")
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    rotation: RawRotation,
    #[serde(default)]
    alerts: RawAlerts,
    #[serde(default)]
    unknown_key_burst: RawBurst,
    #[serde(default)]
    failed_rollover: RawRollover,
    #[serde(default)]
    anomaly: RawAnomaly,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAnomaly {
    enabled: Option<bool>,
    min_surprise: Option<f64>,
    #[serde(default, deserialize_with = "duration::opt")]
    dormant_after: Option<Duration>,
    #[serde(default, deserialize_with = "duration::opt")]
    source_stable: Option<Duration>,
    #[serde(default, deserialize_with = "duration::opt")]
    min_history: Option<Duration>,
    min_requests: Option<u64>,
    min_latency_samples: Option<u64>,
    max_keys: Option<u64>,
    peer_groups: Option<u64>,
    #[serde(default, deserialize_with = "duration::opt")]
    refit_peers_every: Option<Duration>,
    #[serde(default, deserialize_with = "duration::opt")]
    warm_up: Option<Duration>,
    warm_up_max_rows: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRotation {
    #[serde(default, deserialize_with = "duration::opt")]
    grace_period: Option<Duration>,
    #[serde(default, deserialize_with = "duration::opt")]
    quiet_period: Option<Duration>,
    reminders: Option<Vec<Spanned<String>>>,
    #[serde(default, deserialize_with = "duration::opt")]
    overdue_reminder_every: Option<Duration>,
    #[serde(default, deserialize_with = "duration::opt")]
    max_key_age: Option<Duration>,
    #[serde(default, deserialize_with = "duration::opt")]
    forecast_window: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlerts {
    #[serde(default, deserialize_with = "duration::opt")]
    repeat_after: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBurst {
    threshold: Option<u32>,
    #[serde(default, deserialize_with = "duration::opt")]
    window: Option<Duration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRollover {
    min_failures: Option<u64>,
    min_rate: Option<f64>,
    factor: Option<f64>,
    #[serde(default, deserialize_with = "duration::opt")]
    baseline: Option<Duration>,
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Policy {
    /// Reads and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, ConfigError> {
        let text = crate::registry::read_text(path)?;
        Policy::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates policy TOML; `file` is only used in errors. No IO.
    pub fn parse(file: &str, text: &str) -> Result<Policy, ConfigError> {
        let raw: RawPolicy = parse_toml(file, text)?;
        let err = |field: &str, line: Option<usize>, reason: String| ConfigError {
            file: file.to_owned(),
            line,
            field: field.to_owned(),
            reason,
        };
        let positive = |field: &str, v: Option<Duration>, default: i64| match v {
            Some(d) if d.is_zero() => Err(err(field, None, "must be more than 0".into())),
            Some(d) => Ok(ms(d)),
            None => Ok(default),
        };
        let r = &raw.rotation;
        let grace_period_ms = positive("rotation.grace_period", r.grace_period, 14 * DAY_MS)?;
        let quiet_period_ms = positive("rotation.quiet_period", r.quiet_period, 72 * HOUR_MS)?;
        let forecast_window_ms =
            positive("rotation.forecast_window", r.forecast_window, 24 * HOUR_MS)?;
        if forecast_window_ms < HOUR_MS {
            return Err(err(
                "rotation.forecast_window",
                None,
                "must be at least 1h: the share is counted per hour".into(),
            ));
        }
        let overdue_reminder_every_ms = r.overdue_reminder_every.map_or(DAY_MS, ms);
        let max_key_age_ms = r.max_key_age.map_or(90 * DAY_MS, ms);

        let mut reminders = Vec::new();
        match &r.reminders {
            None => {
                for label in ["7d", "3d", "1d", "due"] {
                    let before_ms = if label == "due" {
                        0
                    } else {
                        ms(duration::parse(label).expect("valid default"))
                    };
                    reminders.push(Reminder {
                        label: label.to_owned(),
                        before_ms,
                    });
                }
            }
            Some(list) => {
                for (i, s) in list.iter().enumerate() {
                    let line = crate::registry::line_of(text, Some(s.span()));
                    let d = duration::parse(s.get_ref())
                        .map_err(|e| err(&format!("rotation.reminders[{i}]"), line, e))?;
                    let label = if d.is_zero() {
                        "due".to_owned()
                    } else {
                        s.get_ref().trim().to_owned()
                    };
                    if reminders.iter().any(|r: &Reminder| r.before_ms == ms(d)) {
                        return Err(err(
                            &format!("rotation.reminders[{i}]"),
                            line,
                            format!("`{}` is in the schedule twice", s.get_ref()),
                        ));
                    }
                    reminders.push(Reminder {
                        label,
                        before_ms: ms(d),
                    });
                }
                reminders.sort_by_key(|r| std::cmp::Reverse(r.before_ms));
            }
        }

        let repeat_after_ms = positive("alerts.repeat_after", raw.alerts.repeat_after, DAY_MS)?;

        let b = &raw.unknown_key_burst;
        let threshold = b.threshold.unwrap_or(10);
        if !(2..=100_000).contains(&threshold) {
            return Err(err(
                "unknown_key_burst.threshold",
                None,
                format!("expected 2 to 100000 failures, found {threshold}"),
            ));
        }
        let window_ms = positive("unknown_key_burst.window", b.window, 15 * 60_000)?;

        let f = &raw.failed_rollover;
        let min_failures = f.min_failures.unwrap_or(3);
        if min_failures == 0 {
            return Err(err(
                "failed_rollover.min_failures",
                None,
                "must be at least 1".into(),
            ));
        }
        let min_rate = f.min_rate.unwrap_or(0.05);
        if !(min_rate > 0.0 && min_rate <= 1.0) {
            return Err(err(
                "failed_rollover.min_rate",
                None,
                format!("expected a fraction in (0, 1], found {min_rate}"),
            ));
        }
        let factor = f.factor.unwrap_or(3.0);
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(err(
                "failed_rollover.factor",
                None,
                format!("expected a number of at least 1, found {factor}"),
            ));
        }
        let baseline_ms = positive("failed_rollover.baseline", f.baseline, 7 * DAY_MS)?;

        let anomaly = anomaly_policy(&raw.anomaly, &err, &positive)?;

        Ok(Policy {
            grace_period_ms,
            quiet_period_ms,
            reminders,
            overdue_reminder_every_ms,
            max_key_age_ms,
            forecast_window_ms,
            repeat_after_ms,
            unknown_key_burst: BurstPolicy {
                threshold,
                window_ms,
            },
            failed_rollover: RolloverPolicy {
                min_failures,
                min_rate,
                factor,
                baseline_ms,
            },
            anomaly,
        })
    }
}

/// Builds a [`ConfigError`] for a field (and line, when known).
type ErrFn<'a> = &'a dyn Fn(&str, Option<usize>, String) -> ConfigError;
/// A duration field that must be more than 0, with its default.
type PositiveFn<'a> = &'a dyn Fn(&str, Option<Duration>, i64) -> Result<i64, ConfigError>;

fn anomaly_policy(
    a: &RawAnomaly,
    err: ErrFn<'_>,
    positive: PositiveFn<'_>,
) -> Result<AnomalyPolicy, ConfigError> {
    let d = AnomalyConfig::default();
    let min_surprise = a.min_surprise.unwrap_or(d.min_surprise);
    if !(min_surprise.is_finite() && (2.0..=30.0).contains(&min_surprise)) {
        return Err(err(
            "anomaly.min_surprise",
            None,
            format!("expected -log10 of a probability from 2 to 30, found {min_surprise}"),
        ));
    }
    let range = |field: &str, v: Option<u64>, default: u64, lo: u64, hi: u64, what: &str| {
        let v = v.unwrap_or(default);
        if (lo..=hi).contains(&v) {
            Ok(v)
        } else {
            Err(err(
                field,
                None,
                format!("expected {lo} to {hi} {what}, found {v}"),
            ))
        }
    };
    let min_requests = range(
        "anomaly.min_requests",
        a.min_requests,
        d.min_requests,
        1,
        1_000_000,
        "requests",
    )?;
    let min_latency_samples = range(
        "anomaly.min_latency_samples",
        a.min_latency_samples,
        d.min_latency_samples,
        1,
        1_000_000,
        "samples",
    )?;
    let max_keys = range(
        "anomaly.max_keys",
        a.max_keys,
        d.max_keys as u64,
        10,
        100_000_000,
        "keys",
    )?;
    let peer_groups = range(
        "anomaly.peer_groups",
        a.peer_groups,
        d.peer_groups as u64,
        1,
        64,
        "groups",
    )?;
    let warm_up_max_rows = range(
        "anomaly.warm_up_max_rows",
        a.warm_up_max_rows,
        50_000_000,
        0,
        10_000_000_000,
        "rows",
    )?;
    let warm_up_ms = a.warm_up.map_or(28 * DAY_MS, ms);
    if warm_up_ms > 366 * DAY_MS {
        return Err(err(
            "anomaly.warm_up",
            None,
            format!("expected at most 366d, found {}d", warm_up_ms / DAY_MS),
        ));
    }
    Ok(AnomalyPolicy {
        enabled: a.enabled.unwrap_or(true),
        models: AnomalyConfig {
            min_surprise,
            dormant_after_ms: positive(
                "anomaly.dormant_after",
                a.dormant_after,
                d.dormant_after_ms,
            )?,
            source_stable_ms: positive(
                "anomaly.source_stable",
                a.source_stable,
                d.source_stable_ms,
            )?,
            min_history_ms: positive("anomaly.min_history", a.min_history, d.min_history_ms)?,
            min_requests,
            min_latency_samples,
            max_keys: max_keys as usize,
            peer_groups: peer_groups as usize,
        },
        refit_peers_every_ms: positive("anomaly.refit_peers_every", a.refit_peers_every, HOUR_MS)?,
        warm_up_ms,
        warm_up_max_rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let p = Policy::default();
        assert_eq!(p.quiet_period_ms, 72 * HOUR_MS);
        assert_eq!(p.max_key_age_ms, 90 * DAY_MS);
        assert_eq!(p.grace_period_ms, 14 * DAY_MS);
        let steps: Vec<_> = p.reminders.iter().map(|r| r.label.as_str()).collect();
        assert_eq!(steps, ["7d", "3d", "1d", "due"]);
        assert_eq!(p.reminders[1].before_ms, 3 * DAY_MS);
        assert_eq!(p.overdue_reminder_every_ms, DAY_MS);
    }

    #[test]
    fn the_shipped_policy_is_the_default() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/policy.toml");
        assert_eq!(Policy::load(&path).unwrap(), Policy::default());
    }

    #[test]
    fn a_policy_is_read() {
        let p = Policy::parse(
            "policy.toml",
            "[rotation]\nquiet_period = \"48h\"\nreminders = [\"1d\", \"0s\", \"14d\"]\n\
             max_key_age = \"0s\"\n[unknown_key_burst]\nthreshold = 50\nwindow = \"1m\"\n",
        )
        .unwrap();
        assert_eq!(p.quiet_period_ms, 48 * HOUR_MS);
        let steps: Vec<_> = p
            .reminders
            .iter()
            .map(|r| (r.label.as_str(), r.before_ms))
            .collect();
        assert_eq!(steps, [("14d", 14 * DAY_MS), ("1d", DAY_MS), ("due", 0)]);
        assert_eq!(p.max_key_age_ms, 0);
        assert_eq!(p.unknown_key_burst.threshold, 50);
        assert_eq!(p.unknown_key_burst.window_ms, 60_000);
    }

    #[test]
    fn the_anomaly_section_is_read_and_checked() {
        let d = Policy::default().anomaly;
        assert!(d.enabled);
        assert_eq!(d.models, AnomalyConfig::default());
        assert_eq!(d.warm_up_ms, 28 * DAY_MS);
        assert_eq!(d.refit_peers_every_ms, HOUR_MS);
        let p = Policy::parse(
            "policy.toml",
            "[anomaly]\nenabled = false\nmin_surprise = 6.5\ndormant_after = \"14d\"\n\
             warm_up = \"7d\"\nwarm_up_max_rows = 0\npeer_groups = 3\n",
        )
        .unwrap()
        .anomaly;
        assert!(!p.enabled);
        assert_eq!(p.models.min_surprise, 6.5);
        assert_eq!(p.models.dormant_after_ms, 14 * DAY_MS);
        assert_eq!(p.models.peer_groups, 3);
        assert_eq!(p.warm_up_ms, 7 * DAY_MS);
        assert_eq!(p.warm_up_max_rows, 0);
        let cases = [
            (
                "[anomaly]\nmin_surprise = 1\n",
                "policy.toml: anomaly.min_surprise: expected -log10 of a probability from 2 to 30, found 1",
            ),
            (
                "[anomaly]\npeer_groups = 0\n",
                "policy.toml: anomaly.peer_groups: expected 1 to 64 groups, found 0",
            ),
            (
                "[anomaly]\nsource_stable = \"0s\"\n",
                "policy.toml: anomaly.source_stable: must be more than 0",
            ),
            (
                "[anomaly]\nwarm_up = \"400d\"\n",
                "policy.toml: anomaly.warm_up: expected at most 366d, found 400d",
            ),
            (
                "[anomaly]\n\nenable = true\n",
                "policy.toml:3: anomaly.enable: unknown field `enable`, expected one of `enabled`, `min_surprise`, `dormant_after`, `source_stable`, `min_history`, `min_requests`, `min_latency_samples`, `max_keys`, `peer_groups`, `refit_peers_every`, `warm_up`, `warm_up_max_rows`",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                Policy::parse("policy.toml", text).unwrap_err().to_string(),
                want,
                "{text}"
            );
        }
    }

    #[test]
    fn errors_name_file_line_field_and_reason() {
        let cases = [
            (
                "[rotation]\nquiet_period = \"soon\"\n",
                "policy.toml:2: rotation.quiet_period: expected a duration like \"200ms\" or \"1m\", found `soon`",
            ),
            (
                "[rotation]\nquiet = \"72h\"\n",
                "policy.toml:2: rotation.quiet: unknown field `quiet`, expected one of `grace_period`, `quiet_period`, `reminders`, `overdue_reminder_every`, `max_key_age`, `forecast_window`",
            ),
            (
                "[rotation]\nreminders = [\"7d\",\n  \"3 fortnights\"]\n",
                "policy.toml:3: rotation.reminders[1]: expected a duration like \"200ms\" or \"1m\", found `3 fortnights`",
            ),
            (
                "[rotation]\nreminders = [\"1d\", \"24h\"]\n",
                "policy.toml:2: rotation.reminders[1]: `24h` is in the schedule twice",
            ),
            (
                "[rotation]\nquiet_period = \"0s\"\n",
                "policy.toml: rotation.quiet_period: must be more than 0",
            ),
            (
                "[unknown_key_burst]\nthreshold = 1\n",
                "policy.toml: unknown_key_burst.threshold: expected 2 to 100000 failures, found 1",
            ),
            (
                "[failed_rollover]\nmin_rate = 1.5\n",
                "policy.toml: failed_rollover.min_rate: expected a fraction in (0, 1], found 1.5",
            ),
            (
                "[failed_rollover]\nfactor = 0.5\n",
                "policy.toml: failed_rollover.factor: expected a number of at least 1, found 0.5",
            ),
        ];
        for (text, want) in cases {
            assert_eq!(
                Policy::parse("policy.toml", text).unwrap_err().to_string(),
                want,
                "{text}"
            );
        }
    }
}
