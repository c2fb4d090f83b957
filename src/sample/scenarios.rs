//! Findings with known truth: a generated multi-owner Kong log over two weeks, its key
//! registry and lifecycle events, and the findings a trustworthy keywatch must raise on it.
//!
//! Contract:
//! - [`generate`] is deterministic in its options (the seed moves request times, counts,
//!   latencies and ids; the scenario's timeline, owners, keys and expectations are fixed).
//! - Twelve owners in time zones on both sides of the date line (Pacific/Auckland +13,
//!   Pacific/Pago_Pago -11), a daylight-saving change inside the log (Europe on 25 October,
//!   the US on 1 November, with nightly jobs at local times), an upstream outage with 60 s
//!   timeouts, lone slow requests, rate limiting, scanners, and one scenario per defect
//!   class of issue 16 (rejected requests that only carry the raw key, a key that rotated
//!   and was revoked later, a failing new key, a host whose user agent changes with its
//!   switch, ...).
//! - Each [`Expected`] finding names its kind, key (the registry id), optionally the
//!   source IP, and the window its `at` must fall in; `from_ms` is never before its
//!   evidence. Required ones count for recall; allowed ones (reminders, a lingering source
//!   before it moved) are merely not false. Every other finding is false.
//! - [`score`] compares `keywatch backtest` output (JSON lines) with the truth. The
//!   registry holds no raw key material: rejected requests are tied to their key by the
//!   `fp:…` fingerprint of the secret, computed with the secret the caller passes.
//! - Rendering reuses the sample generator's building blocks (`Rng`, `Obj`, ids).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{fmt_hex128, named_uuid, Obj, Rng, BASE62, DAY_MS};
use crate::event::Fingerprinter;

const HOUR_MS: i64 = 3_600_000;
const MIN_MS: i64 = 60_000;

/// 2026-10-20T00:00:00Z, a Tuesday: Europe leaves summer time on the 25th, the US on
/// 1 November.
pub const SCENARIO_START_MS: i64 = 1_792_454_400_000;
/// The span: thirteen days.
pub const SCENARIO_DAYS: i64 = 13;
/// How often `keywatch backtest` evaluates (its default): rotation findings may come this
/// much after their fact.
pub const EVAL_MS: i64 = HOUR_MS;

#[derive(Debug, Clone, PartialEq)]
pub struct ScenarioOptions {
    pub seed: u64,
    /// Multiplies every host's request rate (1.0: about 430,000 requests).
    pub rate: f64,
    /// The fingerprint secret of the config the log is read with.
    pub fingerprint_secret: Vec<u8>,
}

impl Default for ScenarioOptions {
    fn default() -> Self {
        ScenarioOptions {
            seed: 1,
            rate: 1.0,
            fingerprint_secret: b"keywatch-scenario-secret".to_vec(),
        }
    }
}

/// One finding the truth expects (or tolerates).
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub kind: &'static str,
    /// The registry id of the key (`-` for findings about no key).
    pub key_id: String,
    /// When set, the finding's evidence must name this source IP.
    pub ip: Option<String>,
    /// `at` must be in `from_ms..=to_ms`; before `from_ms` it is early.
    pub from_ms: i64,
    pub to_ms: i64,
    /// Counts for recall; else only tolerated.
    pub required: bool,
    /// Which scenario (and defect class) it belongs to.
    pub label: &'static str,
}

/// A generated log with its truth.
#[derive(Debug, Clone)]
pub struct Scenario {
    /// Kong log lines, sorted by time.
    pub log: Vec<String>,
    /// `keys.toml` with each key's history written as times, and aliases that tie rejected
    /// requests (raw key → fingerprint) to their key.
    pub registry_toml: String,
    /// The same registry in the schema keywatch read before issue 16 (no aliases, a key
    /// that rotated and was revoked written `state = "revoked"`): for the before figures.
    pub legacy_registry_toml: String,
    /// The lifecycle changes as lifecycle-topic JSON, one per line, in time order.
    pub lifecycle: Vec<String>,
    pub expected: Vec<Expected>,
    pub start_ms: i64,
    pub end_ms: i64,
}

// ---------------------------------------------------------------------------------------------
// The cast.

#[derive(Debug, Clone, Copy, PartialEq)]
enum Profile {
    /// Office hours in the owner's zone, quieter at weekends.
    Office,
    /// Round the clock.
    Flat,
    /// A burst at `NIGHTLY_LOCAL_HOUR` local time, little else.
    Nightly,
}

const NIGHTLY_LOCAL_HOUR: u32 = 2;

struct Owner {
    name: &'static str,
    tz: &'static str,
}

const OWNERS: [Owner; 12] = [
    Owner {
        name: "berlin-batch",
        tz: "Europe/Berlin",
    },
    Owner {
        name: "ny-mobile",
        tz: "America/New_York",
    },
    Owner {
        name: "akl-pay",
        tz: "Pacific/Auckland",
    },
    Owner {
        name: "pago-sync",
        tz: "Pacific/Pago_Pago",
    },
    Owner {
        name: "tokyo-iot",
        tz: "Asia/Tokyo",
    },
    Owner {
        name: "london-web",
        tz: "Europe/London",
    },
    Owner {
        name: "chicago-reports",
        tz: "America/Chicago",
    },
    Owner {
        name: "sydney-analytics",
        tz: "Australia/Sydney",
    },
    Owner {
        name: "sp-retail",
        tz: "America/Sao_Paulo",
    },
    Owner {
        name: "hooli-noisy",
        tz: "America/Los_Angeles",
    },
    Owner {
        name: "kolkata-ops",
        tz: "Asia/Kolkata",
    },
    Owner {
        name: "honolulu-labs",
        tz: "Pacific/Honolulu",
    },
];

/// One host of an owner: sends one key until `switch_ms`, then (if any) the other.
#[derive(Debug, Clone)]
struct Host {
    owner: usize,
    ip: String,
    ua: String,
    /// User agent after the switch (a release that also moved to the new key).
    ua_after: Option<String>,
    profile: Profile,
    /// Requests per minute at full activity.
    rate: f64,
    key: &'static str,
    /// (time, new key): from then on the host sends the new key.
    switch: Option<(i64, &'static str)>,
    /// The host sends nothing in these spans.
    off: Vec<(i64, i64)>,
    /// The host only exists from this time on.
    from_ms: i64,
    /// Requests with the new key fail (401, the gateway does not know it yet) until then.
    new_key_fails_until: Option<i64>,
    /// Requests after this time are refused (the key was revoked or expired).
    refused_from: Option<i64>,
    /// Hourly windows of heavy rate limiting: (from, to, share of 429).
    limited: Vec<(i64, i64, f64)>,
    /// Traffic multiplied in this span (a volume spike).
    spike: Option<(i64, i64, f64)>,
}

impl Host {
    fn new(
        owner: usize,
        ip: &str,
        ua: &str,
        profile: Profile,
        rate: f64,
        key: &'static str,
    ) -> Host {
        Host {
            owner,
            ip: ip.to_owned(),
            ua: ua.to_owned(),
            ua_after: None,
            profile,
            rate,
            key,
            switch: None,
            off: Vec::new(),
            from_ms: i64::MIN,
            new_key_fails_until: None,
            refused_from: None,
            limited: Vec::new(),
            spike: None,
        }
    }
}

/// A key: its label (unique in the scenario), owner, and history.
#[derive(Debug, Clone, Default)]
struct KeyDef {
    label: &'static str,
    owner: usize,
    created_ms: i64,
    expires_ms: Option<i64>,
    successor: Option<&'static str>,
    rotation_started_ms: Option<i64>,
    deadline_ms: Option<i64>,
    revoked_ms: Option<i64>,
}

fn gateway_id(label: &str) -> String {
    named_uuid(&format!("scenario-credential/{label}"))
}

fn raw_key(label: &str) -> String {
    format!(
        "kw_live_{}",
        Rng::named(&format!("scenario-raw/{label}")).chars(BASE62, 32)
    )
}

/// The outage of the shared upstream: 502/504 with timeouts, for every key.
fn outage(s: i64) -> (i64, i64) {
    (
        s + 7 * DAY_MS + 10 * HOUR_MS,
        s + 7 * DAY_MS + 10 * HOUR_MS + 20 * MIN_MS,
    )
}

struct Cast {
    keys: Vec<KeyDef>,
    hosts: Vec<Host>,
    expected: Vec<Expected>,
    /// (ip, from, to, requests): scanners presenting no key or guessed keys.
    scans: Vec<(&'static str, i64, i64, usize)>,
    /// Expectations whose window starts at a request of the generated traffic.
    anchors: Vec<(usize, Anchor)>,
}

/// Where an expectation's window really starts, once the traffic is drawn.
#[derive(Debug, Clone, Copy)]
enum Anchor {
    /// The quiet period after the key's last request before `before`.
    Quiet { key: &'static str, before: i64 },
    /// The first request from `ip` at or after `after`.
    First { ip: &'static str, after: i64 },
}

/// The policy's quiet period before "safe to revoke" (rules/policy.toml).
pub const QUIET_MS: i64 = 72 * HOUR_MS;

#[allow(clippy::too_many_lines)]
fn cast(s: i64) -> Cast {
    let d = DAY_MS;
    let h = HOUR_MS;
    let mut keys = Vec::new();
    let mut hosts = Vec::new();
    let mut ex: Vec<Expected> = Vec::new();
    let mut anchors = Vec::new();
    let created = s - 30 * d;
    let key = |label, owner| KeyDef {
        label,
        owner,
        created_ms: created,
        ..KeyDef::default()
    };
    let exp = |kind, label: &str, ip: Option<&str>, from, to, required, why| Expected {
        kind,
        key_id: gateway_id(label),
        ip: ip.map(str::to_owned),
        from_ms: from,
        to_ms: to,
        required,
        label: why,
    };

    // 0 berlin-batch: a nightly job at 02:00 Berlin time, across the end of summer time
    // (class 4). Clean.
    keys.push(key("berlin-nightly", 0));
    hosts.push(Host::new(
        0,
        "10.10.0.11",
        "berlin-etl/5.2.0",
        Profile::Nightly,
        30.0,
        "berlin-nightly",
    ));
    hosts.push(Host::new(
        0,
        "10.10.0.12",
        "python-requests/2.31.0",
        Profile::Office,
        0.6,
        "berlin-nightly",
    ));

    // 1 ny-mobile: office traffic and a nightly job across the US change; lone 60 s
    // timeouts (class 5). Clean.
    keys.push(key("ny-app", 1));
    hosts.push(Host::new(
        1,
        "10.11.0.21",
        "okhttp/4.12.0",
        Profile::Office,
        3.0,
        "ny-app",
    ));
    hosts.push(Host::new(
        1,
        "10.11.0.22",
        "okhttp/4.12.0",
        Profile::Office,
        2.0,
        "ny-app",
    ));
    hosts.push(Host::new(
        1,
        "10.11.0.23",
        "ny-reconcile/1.0.3",
        Profile::Nightly,
        12.0,
        "ny-app",
    ));

    // 2 akl-pay (east of the date line's other side, +13): a rotation with a late switcher
    // and a host whose user agent changes with the switch (class 7).
    let r1 = s + 6 * d + 3 * h;
    let r1_deadline = s + 10 * d;
    let (sw1, sw2, sw3) = (r1 + 2 * h, r1 + 5 * h, s + 8 * d + 4 * h);
    keys.push(KeyDef {
        successor: Some("akl-2"),
        rotation_started_ms: Some(r1),
        deadline_ms: Some(r1_deadline),
        ..key("akl-1", 2)
    });
    keys.push(KeyDef {
        created_ms: r1 - h,
        ..key("akl-2", 2)
    });
    let mut a = Host::new(
        2,
        "10.12.0.31",
        "Go-http-client/1.1",
        Profile::Flat,
        1.5,
        "akl-1",
    );
    a.switch = Some((sw1, "akl-2"));
    hosts.push(a);
    let mut a = Host::new(
        2,
        "10.12.0.32",
        "akl-pay-worker/2.3.1",
        Profile::Flat,
        1.0,
        "akl-1",
    );
    a.switch = Some((sw2, "akl-2"));
    a.ua_after = Some("akl-pay-worker/2.4.0".into());
    hosts.push(a);
    let mut a = Host::new(
        2,
        "10.12.0.33",
        "akl-settle/0.9.8",
        Profile::Office,
        1.2,
        "akl-1",
    );
    a.switch = Some((sw3, "akl-2"));
    hosts.push(a);
    ex.push(exp(
        "lingering_old_key",
        "akl-1",
        Some("10.12.0.33"),
        r1,
        sw3 + EVAL_MS,
        true,
        "late switcher lingers",
    ));
    ex.push(exp(
        "lingering_old_key",
        "akl-1",
        Some("10.12.0.31"),
        r1,
        sw1 + EVAL_MS,
        false,
        "lingers until it switched",
    ));
    ex.push(exp(
        "lingering_old_key",
        "akl-1",
        Some("10.12.0.32"),
        r1,
        sw2 + EVAL_MS,
        false,
        "lingers until it switched (class 7)",
    ));
    // The late switcher's last old-key request is just before its switch.
    ex.push(exp(
        "safe_to_revoke",
        "akl-1",
        None,
        sw3 + 72 * h,
        sw3 + 72 * h + EVAL_MS,
        true,
        "quiet after the late switch",
    ));
    anchors.push((
        ex.len() - 1,
        Anchor::Quiet {
            key: "akl-1",
            before: sw3 + h,
        },
    ));
    ex.push(exp(
        "rotation_reminder",
        "akl-1",
        None,
        r1,
        r1_deadline,
        false,
        "reminders",
    ));
    ex.push(exp(
        "rotation_at_risk",
        "akl-1",
        None,
        r1,
        r1_deadline,
        false,
        "at risk while a host lingers",
    ));

    // 3 pago-sync (-11): a host that never switches: lingering, overdue after the deadline.
    let r2 = s + 5 * d;
    let r2_deadline = s + 8 * d;
    keys.push(KeyDef {
        successor: Some("pago-2"),
        rotation_started_ms: Some(r2),
        deadline_ms: Some(r2_deadline),
        ..key("pago-1", 3)
    });
    keys.push(KeyDef {
        created_ms: r2 - h,
        ..key("pago-2", 3)
    });
    let mut p = Host::new(
        3,
        "10.13.0.41",
        "pago-sync/3.1.0",
        Profile::Flat,
        1.0,
        "pago-1",
    );
    p.switch = Some((r2 + h, "pago-2"));
    hosts.push(p);
    hosts.push(Host::new(
        3,
        "10.13.0.42",
        "pago-sync/3.0.7",
        Profile::Flat,
        0.8,
        "pago-1",
    ));
    ex.push(exp(
        "lingering_old_key",
        "pago-1",
        Some("10.13.0.42"),
        r2,
        r2_deadline,
        true,
        "never switches",
    ));
    ex.push(exp(
        "lingering_old_key",
        "pago-1",
        Some("10.13.0.41"),
        r2,
        r2 + h + EVAL_MS,
        false,
        "lingers until it switched",
    ));
    ex.push(exp(
        "rotation_overdue",
        "pago-1",
        None,
        r2_deadline,
        r2_deadline + EVAL_MS,
        true,
        "old-key traffic after the deadline",
    ));
    ex.push(exp(
        "rotation_reminder",
        "pago-1",
        None,
        r2,
        s + SCENARIO_DAYS * d,
        false,
        "reminders",
    ));
    ex.push(exp(
        "rotation_at_risk",
        "pago-1",
        None,
        r2,
        r2_deadline,
        false,
        "at risk",
    ));

    // 4 tokyo-iot: a rotation every host finishes, a device that went quiet, then the old
    // key revoked and the device back with it, refused by the gateway (classes 1 and 2).
    let r3 = s + 4 * d;
    let r3_deadline = s + 7 * d;
    let r3_revoked = s + 10 * d;
    let back = s + 11 * d + 5 * h;
    keys.push(KeyDef {
        successor: Some("tokyo-2"),
        rotation_started_ms: Some(r3),
        deadline_ms: Some(r3_deadline),
        revoked_ms: Some(r3_revoked),
        ..key("tokyo-1", 4)
    });
    keys.push(KeyDef {
        created_ms: r3 - h,
        ..key("tokyo-2", 4)
    });
    for (i, ip) in ["10.14.0.51", "10.14.0.52", "10.14.0.53"]
        .iter()
        .enumerate()
    {
        let mut t = Host::new(
            4,
            ip,
            "soylent-agent/3.2.1 (linux; arm64)",
            Profile::Flat,
            1.0,
            "tokyo-1",
        );
        t.switch = Some((r3 + (i as i64 + 1) * 2 * h, "tokyo-2"));
        hosts.push(t);
        ex.push(exp(
            "lingering_old_key",
            "tokyo-1",
            Some(ip),
            r3,
            r3 + (i as i64 + 1) * 2 * h + EVAL_MS,
            false,
            "lingers until it switched",
        ));
    }
    let mut t = Host::new(
        4,
        "10.14.0.59",
        "soylent-agent/3.1.0 (linux; armv7)",
        Profile::Flat,
        0.5,
        "tokyo-1",
    );
    let quiet_from = r3 + d;
    t.off = vec![(quiet_from, back)];
    t.refused_from = Some(r3_revoked);
    hosts.push(t);
    ex.push(exp(
        "lingering_old_key",
        "tokyo-1",
        Some("10.14.0.59"),
        r3,
        quiet_from + EVAL_MS,
        false,
        "lingers until it went quiet",
    ));
    ex.push(exp(
        "safe_to_revoke",
        "tokyo-1",
        None,
        quiet_from + 72 * h,
        quiet_from + 72 * h + EVAL_MS,
        true,
        "safe to revoke before the later revocation (class 2)",
    ));
    anchors.push((
        ex.len() - 1,
        Anchor::Quiet {
            key: "tokyo-1",
            before: quiet_from + h,
        },
    ));
    ex.push(exp(
        "revoked_key_used",
        "tokyo-1",
        Some("10.14.0.59"),
        back,
        back + 2 * MIN_MS,
        true,
        "revoked key used, refused (class 1)",
    ));
    anchors.push((
        ex.len() - 1,
        Anchor::First {
            ip: "10.14.0.59",
            after: back,
        },
    ));
    ex.push(exp(
        "revoked_key_used",
        "tokyo-1",
        Some("10.14.0.59"),
        back,
        s + SCENARIO_DAYS * d,
        false,
        "repeated per interval",
    ));
    ex.push(exp(
        "rotation_reminder",
        "tokyo-1",
        None,
        r3,
        r3_deadline,
        false,
        "reminders",
    ));
    ex.push(exp(
        "rotation_at_risk",
        "tokyo-1",
        None,
        r3,
        r3_deadline,
        false,
        "at risk",
    ));

    // 5 london-web: the new key fails after the rollover (classes 1, 3, 6).
    let r4 = s + 6 * d + 9 * h;
    let r4_deadline = s + 9 * d;
    let fail_from = r4 + h;
    keys.push(KeyDef {
        successor: Some("london-2"),
        rotation_started_ms: Some(r4),
        deadline_ms: Some(r4_deadline),
        ..key("london-1", 5)
    });
    keys.push(KeyDef {
        created_ms: r4 - h,
        ..key("london-2", 5)
    });
    let mut l = Host::new(
        5,
        "10.15.0.61",
        "london-web/7.4.0",
        Profile::Flat,
        2.0,
        "london-1",
    );
    l.switch = Some((fail_from, "london-2"));
    l.new_key_fails_until = Some(fail_from + 20 * MIN_MS);
    hosts.push(l);
    let mut l = Host::new(
        5,
        "10.15.0.62",
        "london-web/7.4.0",
        Profile::Flat,
        1.0,
        "london-1",
    );
    l.switch = Some((r4 + 3 * h, "london-2"));
    hosts.push(l);
    ex.push(exp(
        "failed_rollover",
        "london-1",
        None,
        fail_from,
        fail_from + 2 * h,
        true,
        "the new key fails after the rollover",
    ));
    anchors.push((
        ex.len() - 1,
        Anchor::First {
            ip: "10.15.0.61",
            after: fail_from,
        },
    ));
    ex.push(exp(
        "safe_to_revoke",
        "london-1",
        None,
        r4 + 75 * h,
        r4 + 75 * h + EVAL_MS,
        true,
        "quiet after both switched",
    ));
    anchors.push((
        ex.len() - 1,
        Anchor::Quiet {
            key: "london-1",
            before: r4 + 4 * h,
        },
    ));
    ex.push(exp(
        "lingering_old_key",
        "london-1",
        None,
        r4,
        r4 + 3 * h + EVAL_MS,
        false,
        "lingers until it switched",
    ));
    ex.push(exp(
        "rotation_reminder",
        "london-1",
        None,
        r4,
        r4_deadline,
        false,
        "reminders",
    ));
    ex.push(exp(
        "rotation_at_risk",
        "london-1",
        None,
        r4,
        r4_deadline,
        false,
        "at risk",
    ));

    // 6 chicago-reports: a steady key gets a new host (anomaly: new source).
    keys.push(key("chicago-1", 6));
    hosts.push(Host::new(
        6,
        "10.16.0.71",
        "initech-reports/4.0.2",
        Profile::Office,
        1.5,
        "chicago-1",
    ));
    hosts.push(Host::new(
        6,
        "10.16.0.72",
        "initech-reports/4.0.2",
        Profile::Office,
        1.5,
        "chicago-1",
    ));
    let new_host_from = s + 9 * d + 15 * h + 7 * MIN_MS + 13_000;
    let mut c = Host::new(
        6,
        "198.51.100.77",
        "initech-reports/4.0.2",
        Profile::Flat,
        1.0,
        "chicago-1",
    );
    c.from_ms = new_host_from;
    hosts.push(c);
    ex.push(exp(
        "new_source",
        "chicago-1",
        None,
        new_host_from,
        new_host_from + 2 * h,
        true,
        "a new host on a steady key (class 3)",
    ));
    anchors.push((
        ex.len() - 1,
        Anchor::First {
            ip: "198.51.100.77",
            after: new_host_from,
        },
    ));

    // 7 sydney-analytics: a volume spike.
    keys.push(key("sydney-1", 7));
    let spike = (s + 10 * d + 3 * h, s + 10 * d + 4 * h);
    let mut y = Host::new(
        7,
        "10.17.0.81",
        "sydney-analytics/2.2.0",
        Profile::Flat,
        1.0,
        "sydney-1",
    );
    y.spike = Some((spike.0, spike.1, 15.0));
    hosts.push(y);
    hosts.push(Host::new(
        7,
        "10.17.0.82",
        "sydney-analytics/2.2.0",
        Profile::Office,
        1.0,
        "sydney-1",
    ));
    ex.push(exp(
        "volume_anomaly",
        "sydney-1",
        None,
        spike.0,
        spike.1 + EVAL_MS,
        true,
        "volume spike",
    ));

    // 8 sp-retail: a key that expires; one host keeps sending it and is refused (class 1).
    let expiry = s + 9 * d;
    keys.push(KeyDef {
        expires_ms: Some(expiry),
        ..key("sp-old", 8)
    });
    keys.push(key("sp-new", 8));
    hosts.push(Host::new(
        8,
        "10.18.0.91",
        "sp-pos/12.0",
        Profile::Office,
        1.5,
        "sp-new",
    ));
    let mut e = Host::new(8, "10.18.0.92", "sp-pos/11.4", Profile::Flat, 0.5, "sp-old");
    e.refused_from = Some(expiry);
    hosts.push(e);
    // The first request after the expiry is within minutes of it.
    ex.push(exp(
        "expired_key_used",
        "sp-old",
        Some("10.18.0.92"),
        expiry,
        expiry + 30 * MIN_MS,
        true,
        "expired key used, refused",
    ));
    anchors.push((
        ex.len() - 1,
        Anchor::First {
            ip: "10.18.0.92",
            after: expiry,
        },
    ));
    ex.push(exp(
        "expired_key_used",
        "sp-old",
        Some("10.18.0.92"),
        expiry,
        s + SCENARIO_DAYS * d,
        false,
        "repeated per interval",
    ));

    // 9 hooli-noisy: rate limited for hours (class 8). Clean.
    keys.push(key("hooli-1", 9));
    let mut n = Host::new(
        9,
        "10.19.0.101",
        "hooli-sync/8.1.0",
        Profile::Flat,
        4.0,
        "hooli-1",
    );
    for day in [3, 8, 11] {
        n.limited
            .push((s + day * d + 14 * h, s + day * d + 17 * h, 0.6));
    }
    hosts.push(n);
    hosts.push(Host::new(
        9,
        "10.19.0.102",
        "hooli-sync/8.1.0",
        Profile::Flat,
        2.0,
        "hooli-1",
    ));

    // 10 kolkata-ops: a clean rotation, both hosts switch with a new user agent (class 7).
    let r5 = s + 3 * d + 6 * h;
    let r5_deadline = s + 6 * d;
    keys.push(KeyDef {
        successor: Some("kolkata-2"),
        rotation_started_ms: Some(r5),
        deadline_ms: Some(r5_deadline),
        ..key("kolkata-1", 10)
    });
    keys.push(KeyDef {
        created_ms: r5 - h,
        ..key("kolkata-2", 10)
    });
    for (i, ip) in ["10.20.0.111", "10.20.0.112"].iter().enumerate() {
        let mut k = Host::new(10, ip, "ops-agent/1.8.2", Profile::Flat, 1.0, "kolkata-1");
        k.switch = Some((r5 + (i as i64 + 1) * 2 * h, "kolkata-2"));
        k.ua_after = Some("ops-agent/1.9.0".into());
        hosts.push(k);
        ex.push(exp(
            "lingering_old_key",
            "kolkata-1",
            Some(ip),
            r5,
            r5 + (i as i64 + 1) * 2 * h + EVAL_MS,
            false,
            "lingers until it switched",
        ));
    }
    ex.push(exp(
        "safe_to_revoke",
        "kolkata-1",
        None,
        r5 + 76 * h,
        r5 + 76 * h + EVAL_MS,
        true,
        "quiet after a switch with a new user agent",
    ));
    anchors.push((
        ex.len() - 1,
        Anchor::Quiet {
            key: "kolkata-1",
            before: r5 + 5 * h,
        },
    ));
    ex.push(exp(
        "rotation_reminder",
        "kolkata-1",
        None,
        r5,
        r5_deadline,
        false,
        "reminders",
    ));

    // 11 honolulu-labs (-10): steady, hit by the upstream outage like everyone (class 5).
    keys.push(key("honolulu-1", 11));
    hosts.push(Host::new(
        11,
        "10.21.0.121",
        "labs-client/0.4.1",
        Profile::Office,
        2.0,
        "honolulu-1",
    ));
    hosts.push(Host::new(
        11,
        "10.21.0.122",
        "labs-client/0.4.1",
        Profile::Flat,
        0.7,
        "honolulu-1",
    ));

    // Scanners: bursts of requests with no key or guessed keys.
    let scans = vec![
        (
            "203.0.113.250",
            s + 2 * d + 4 * h,
            s + 2 * d + 4 * h + 8 * MIN_MS,
            40,
        ),
        (
            "203.0.113.251",
            s + 7 * d + 22 * h,
            s + 7 * d + 22 * h + 6 * MIN_MS,
            30,
        ),
        (
            "203.0.113.250",
            s + 12 * d + h,
            s + 12 * d + h + 10 * MIN_MS,
            50,
        ),
    ];
    Cast {
        keys,
        hosts,
        expected: ex,
        scans,
        anchors,
    }
}

// ---------------------------------------------------------------------------------------------
// Traffic.

/// One request before rendering.
struct Req {
    t_ms: i64,
    ip: String,
    ua: String,
    /// Key label; `None` for no key.
    key: Option<String>,
    /// The gateway accepted the key (logs `authenticated_entity`); else only the raw key
    /// header is in the log.
    accepted: bool,
    consumer: Option<&'static str>,
    status: u16,
    latency_ms: i64,
    method: &'static str,
    path: String,
    request_id: u128,
}

/// The local hour (0..24, fractional) and whether it is a weekend, in `tz`.
fn local(t_ms: i64, tz: chrono_tz::Tz) -> (f64, bool) {
    use chrono::{Datelike, TimeZone, Timelike};
    let t = chrono::Utc
        .timestamp_millis_opt(t_ms)
        .single()
        .expect("in range")
        .with_timezone(&tz);
    let hour = f64::from(t.hour()) + f64::from(t.minute()) / 60.0;
    let wd = t.weekday().num_days_from_monday();
    (hour, wd >= 5)
}

fn activity(profile: Profile, hour: f64, weekend: bool) -> f64 {
    let office = if (8.0..19.0).contains(&hour) {
        0.5 - 0.5 * (std::f64::consts::TAU * (hour - 8.0) / 11.0).cos()
    } else {
        0.0
    };
    match profile {
        Profile::Office => (0.05 + 0.95 * office) * if weekend { 0.3 } else { 1.0 },
        Profile::Flat => 0.9 + 0.1 * office,
        Profile::Nightly => {
            let n = f64::from(NIGHTLY_LOCAL_HOUR);
            if (n..n + 0.25).contains(&hour) {
                1.0
            } else {
                0.004
            }
        }
    }
}

/// Poisson with a small mean (Knuth), enough for per-minute counts.
fn poisson(mean: f64, rng: &mut Rng) -> u32 {
    if mean <= 0.0 {
        return 0;
    }
    if mean > 30.0 {
        return (mean + mean.sqrt() * rng.normal()).round().max(0.0) as u32;
    }
    let l = (-mean).exp();
    let (mut k, mut p) = (0u32, 1.0);
    loop {
        p *= rng.f64();
        if p <= l {
            return k;
        }
        k += 1;
    }
}

const PATHS: [(&str, &str); 5] = [
    ("GET", "/v1/orders"),
    ("GET", "/v1/orders/{id}"),
    ("POST", "/v1/orders"),
    ("GET", "/v1/invoices/{id}"),
    ("GET", "/v1/reports/daily"),
];

fn traffic(c: &Cast, start: i64, end: i64, opts: &ScenarioOptions, rng: &mut Rng) -> Vec<Req> {
    let mut out = Vec::new();
    let outage = outage(start);
    for host in &c.hosts {
        let owner = &OWNERS[host.owner];
        let tz: chrono_tz::Tz = owner.tz.parse().expect("known zone");
        let first = host.from_ms.max(start);
        let mut m = first - first.rem_euclid(MIN_MS);
        while m < end {
            let (hour, weekend) = local(m, tz);
            let mut mean = host.rate * opts.rate * activity(host.profile, hour, weekend);
            if let Some((a, b, f)) = host.spike {
                if (a..b).contains(&m) {
                    mean *= f;
                }
            }
            let n = if host.off.iter().any(|&(a, b)| (a..b).contains(&m)) {
                0
            } else {
                poisson(mean, rng)
            };
            for _ in 0..n {
                let t = m + rng.below(MIN_MS as u64) as i64;
                if t < host.from_ms || t >= end {
                    continue;
                }
                out.push(request(host, t, outage, rng));
            }
            m += MIN_MS;
        }
    }
    for &(ip, a, b, n) in &c.scans {
        for i in 0..n {
            let t = a + (b - a) * i as i64 / n as i64 + rng.below(5_000) as i64;
            let key = match rng.below(3) {
                0 => None,
                1 => Some(format!("guess-{}", rng.below(1000))),
                _ => Some("test".to_owned()),
            };
            out.push(Req {
                t_ms: t,
                ip: ip.to_owned(),
                ua: ["curl/8.5.0", "Mozilla/5.0 zgrab/0.x"][rng.below(2) as usize].to_owned(),
                key,
                accepted: false,
                consumer: None,
                status: 401,
                latency_ms: 1 + rng.below(3) as i64,
                method: "GET",
                path: ["/v1/admin", "/.env", "/v1/orders", "/api/v2/users"][rng.below(4) as usize]
                    .to_owned(),
                request_id: rng.u128(),
            });
        }
    }
    out.sort_by_key(|r| r.t_ms);
    out
}

fn request(host: &Host, t: i64, outage: (i64, i64), rng: &mut Rng) -> Req {
    let switched = host.switch.filter(|&(at, _)| t >= at);
    let key = switched.map_or(host.key, |(_, k)| k);
    let ua = match (switched, &host.ua_after) {
        (Some(_), Some(ua)) => ua.clone(),
        _ => host.ua.clone(),
    };
    let (method, template) = PATHS[rng.weighted([40u32, 25, 10, 15, 10].into_iter())];
    let path = template.replace("{id}", &(1000 + rng.below(90_000)).to_string());
    let median = if template.contains("reports") {
        180.0
    } else {
        45.0
    };
    let mut latency = (median * (0.5 * rng.normal()).exp()).round().max(1.0) as i64;
    let refused_new = switched.is_some() && host.new_key_fails_until.is_some_and(|u| t < u);
    let refused = refused_new || host.refused_from.is_some_and(|r| t >= r);
    let limited = host
        .limited
        .iter()
        .any(|&(a, b, p)| (a..b).contains(&t) && rng.chance(p));
    let status = if refused {
        latency = 1 + rng.below(3) as i64;
        401
    } else if limited {
        latency = 1;
        429
    } else if (outage.0..outage.1).contains(&t) {
        if rng.chance(0.5) {
            latency = 60_000;
            504
        } else {
            latency = 2 + rng.below(20) as i64;
            502
        }
    } else if rng.chance(0.0004) {
        // A lone gateway timeout.
        latency = 60_000;
        504
    } else if rng.chance(0.004) {
        500
    } else if template.contains("{id}") && rng.chance(0.03) {
        404
    } else if method == "POST" {
        201
    } else {
        200
    };
    Req {
        t_ms: t,
        ip: host.ip.clone(),
        ua,
        key: Some(key.to_owned()),
        accepted: !refused,
        consumer: Some(OWNERS[host.owner].name),
        status,
        latency_ms: latency,
        method,
        path,
        request_id: rng.u128(),
    }
}

/// A Kong 3.x log record: accepted requests carry `authenticated_entity` and the consumer;
/// refused ones only the `apikey` header the client sent.
fn render_kong(r: &Req, buf: &mut Vec<u8>) {
    let mut o = Obj::new(buf);
    o.o("request", |q| {
        q.s("method", r.method)
            .s("uri", &r.path)
            .s("url", &format!("https://{}:443{}", super::API_HOST, r.path))
            .o("headers", |h| {
                h.s("host", super::API_HOST).s("user-agent", &r.ua);
                if let (false, Some(k)) = (r.accepted, &r.key) {
                    // Scanners send their guesses as they are; clients their key's secret.
                    let raw = if k.starts_with("guess-") || k == "test" {
                        k.clone()
                    } else {
                        raw_key(k)
                    };
                    h.s("apikey", &raw);
                }
            })
            .s("id", &fmt_hex128(r.request_id));
    });
    o.o("response", |q| {
        q.i("status", i64::from(r.status));
    });
    let by_gateway = matches!(r.status, 401 | 429);
    o.o("latencies", |l| {
        l.i("request", r.latency_ms).i("kong", 1).i(
            "proxy",
            if by_gateway {
                -1
            } else {
                (r.latency_ms - 1).max(0)
            },
        );
    });
    o.s("client_ip", &r.ip).i("started_at", r.t_ms);
    o.o("route", |q| {
        q.s(
            "name",
            if r.path.starts_with("/v1/") {
                "api-v1"
            } else {
                "catch-all"
            },
        );
    });
    if let (true, Some(k)) = (r.accepted, &r.key) {
        o.o("authenticated_entity", |a| {
            a.s("id", &gateway_id(k));
        });
        if let Some(c) = r.consumer {
            o.o("consumer", |q| {
                q.s("id", &named_uuid(&format!("scenario-consumer/{c}")))
                    .s("username", c);
            });
        }
    }
    o.end();
}

// ---------------------------------------------------------------------------------------------
// Registry and lifecycle.

fn fmt_time(ms: i64) -> String {
    crate::registry::format_rfc3339(ms)
}

fn registry(c: &Cast, fp: &Fingerprinter, legacy: bool) -> String {
    let mut t = String::from(
        "# Generated by keywatch::sample::scenarios: every key's history written as times.\n",
    );
    for o in &OWNERS {
        let _ = writeln!(
            t,
            "[owners.{}]\ntimezone = \"{}\"\nemail = [\"oncall@{}.example\"]\n",
            o.name, o.tz, o.name
        );
    }
    for k in &c.keys {
        let _ = writeln!(
            t,
            "[[keys]]\nid = \"{}\"\nname = \"{}\"",
            gateway_id(k.label),
            k.label
        );
        let _ = writeln!(t, "owner = \"{}\"", OWNERS[k.owner].name);
        let _ = writeln!(t, "created = \"{}\"", fmt_time(k.created_ms));
        if let Some(e) = k.expires_ms {
            let _ = writeln!(t, "expires = \"{}\"", fmt_time(e));
        }
        if !legacy {
            let _ = writeln!(t, "aliases = [\"{}\"]", fp.key_id(&raw_key(k.label)));
        }
        let state = match (k.rotation_started_ms, k.revoked_ms) {
            (_, Some(_)) => "revoked",
            (Some(_), None) => "rotating",
            (None, None) => "active",
        };
        // One state, as an operator writes it at the end; the times say when each applied.
        let _ = writeln!(t, "state = \"{state}\"");
        if let Some(s) = k.successor {
            let _ = writeln!(t, "successor = \"{}\"", gateway_id(s));
        }
        if let Some(r) = k.rotation_started_ms {
            let _ = writeln!(t, "rotation_started = \"{}\"", fmt_time(r));
        }
        if let Some(dl) = k.deadline_ms {
            let _ = writeln!(t, "deadline = \"{}\"", fmt_time(dl));
        }
        if let Some(r) = k.revoked_ms {
            let _ = writeln!(t, "revoked = \"{}\"", fmt_time(r));
        }
        t.push('\n');
    }
    t
}

fn lifecycle(c: &Cast) -> Vec<String> {
    let mut evs: Vec<(i64, serde_json::Value)> = Vec::new();
    for k in &c.keys {
        evs.push((
            k.created_ms,
            serde_json::json!({"type": "key_created", "key_id": gateway_id(k.label),
                "owner": OWNERS[k.owner].name, "name": k.label,
                "created_at": fmt_time(k.created_ms)}),
        ));
        if let (Some(r), Some(s)) = (k.rotation_started_ms, k.successor) {
            let mut v = serde_json::json!({"type": "rotation_started",
                "key_id": gateway_id(k.label), "successor": gateway_id(s),
                "started_at": fmt_time(r)});
            if let Some(dl) = k.deadline_ms {
                v["deadline"] = fmt_time(dl).into();
            }
            evs.push((r, v));
        }
        if let Some(r) = k.revoked_ms {
            evs.push((
                r,
                serde_json::json!({"type": "key_revoked", "key_id": gateway_id(k.label),
                    "revoked_at": fmt_time(r)}),
            ));
        }
        if let Some(e) = k.expires_ms {
            evs.push((
                e,
                serde_json::json!({"type": "key_expired", "key_id": gateway_id(k.label),
                    "expired_at": fmt_time(e)}),
            ));
        }
    }
    evs.sort_by_key(|(t, _)| *t);
    evs.into_iter().map(|(_, v)| v.to_string()).collect()
}

/// Generates the scenario.
pub fn generate(opts: &ScenarioOptions) -> Scenario {
    let start = SCENARIO_START_MS;
    let end = start + SCENARIO_DAYS * DAY_MS;
    let c = cast(start);
    let mut rng = Rng::new(opts.seed);
    let reqs = traffic(&c, start, end, opts, &mut rng);
    let mut log = Vec::with_capacity(reqs.len());
    let mut buf = Vec::with_capacity(1024);
    for r in &reqs {
        buf.clear();
        render_kong(r, &mut buf);
        log.push(String::from_utf8(buf.clone()).expect("JSON is UTF-8"));
    }
    let fp = Fingerprinter::new(&opts.fingerprint_secret, 4);
    let mut expected = c.expected.clone();
    for &(i, anchor) in &c.anchors {
        let e = &mut expected[i];
        let width = e.to_ms - e.from_ms;
        let from = match anchor {
            Anchor::Quiet { key, before } => reqs
                .iter()
                .filter(|r| r.t_ms < before && r.key.as_deref() == Some(key))
                .map(|r| r.t_ms)
                .max()
                .map(|t| t + QUIET_MS),
            Anchor::First { ip, after } => reqs
                .iter()
                .find(|r| r.t_ms >= after && r.ip == ip)
                .map(|r| r.t_ms),
        };
        if let Some(from) = from {
            e.from_ms = from;
            e.to_ms = from + width;
        }
    }
    for &(ip, a, b, n) in &c.scans {
        // The burst threshold (10 in 15 minutes) is crossed by the 10th request.
        let tenth = a + (b - a) * 9 / n as i64;
        expected.push(Expected {
            kind: "unknown_key_burst",
            key_id: crate::event::NO_KEY.to_owned(),
            ip: Some(ip.to_owned()),
            from_ms: tenth,
            to_ms: b + 5_000,
            required: true,
            label: "scanner burst",
        });
    }
    Scenario {
        log,
        registry_toml: registry(&c, &fp, false),
        legacy_registry_toml: registry(&c, &fp, true),
        lifecycle: lifecycle(&c),
        expected,
        start_ms: start,
        end_ms: end,
    }
}

impl Scenario {
    /// Writes what `keywatch backtest` reads into `dir`: `gateway.log`, `keys.toml` (the
    /// legacy one with `legacy`), `lifecycle.jsonl`, the fingerprint secret and
    /// `keywatch.toml` (Kong preset, the rotation policy at `policy`); returns the config's
    /// path. The only IO of this module, for the bench and the scenario tests.
    pub fn write_case(
        &self,
        dir: &std::path::Path,
        opts: &ScenarioOptions,
        policy: &std::path::Path,
        legacy: bool,
    ) -> std::io::Result<std::path::PathBuf> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("gateway.log"), self.log.join("\n") + "\n")?;
        let reg = if legacy {
            &self.legacy_registry_toml
        } else {
            &self.registry_toml
        };
        std::fs::write(dir.join("keys.toml"), reg)?;
        std::fs::write(
            dir.join("lifecycle.jsonl"),
            self.lifecycle.join("\n") + "\n",
        )?;
        std::fs::write(dir.join("fingerprint.secret"), &opts.fingerprint_secret)?;
        let config = format!(
            "state_dir = {state:?}\n\
             [input]\nkind = \"file\"\npath = {log:?}\nformat = \"kong\"\nfollow = false\n\
             [server]\nenabled = false\n\
             [fingerprint]\nsecret_file = {secret:?}\n\
             [rules]\nkeys = {keys:?}\npolicy = {policy:?}\n",
            state = dir.join("state"),
            log = dir.join("gateway.log"),
            secret = dir.join("fingerprint.secret"),
            keys = dir.join("keys.toml"),
        );
        let path = dir.join("keywatch.toml");
        std::fs::write(&path, config)?;
        Ok(path)
    }
}

/// The registry id of a scenario key label (for tests).
pub fn key_id(label: &str) -> String {
    gateway_id(label)
}

/// A finding as `keywatch backtest` prints it, reduced to what scoring reads.
#[derive(Debug, Clone, PartialEq)]
pub struct Seen {
    pub kind: String,
    pub key_id: String,
    pub at_ms: i64,
    /// `evidence.ip`, when the finding names one source.
    pub ip: Option<String>,
    pub owner: Option<String>,
}

impl Seen {
    /// Reads one JSON line of `keywatch backtest`.
    pub fn parse(line: &str) -> Result<Seen, String> {
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| format!("not a finding: {e}"))?;
        let s = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
        let at = s("at").ok_or("finding without `at`")?;
        let at_ms = chrono::DateTime::parse_from_rfc3339(&at)
            .map_err(|e| format!("at: {e}"))?
            .timestamp_millis();
        Ok(Seen {
            kind: s("kind").ok_or("finding without `kind`")?,
            key_id: s("key_id").unwrap_or_default(),
            at_ms,
            ip: v["evidence"]["ip"].as_str().map(str::to_owned),
            owner: s("owner"),
        })
    }
}

/// Recall, precision and early findings of one kind (or of all).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KindScore {
    /// Required findings.
    pub required: usize,
    /// Required findings matched by a finding in their window.
    pub found: usize,
    /// Findings that match an expectation (required or allowed).
    pub true_findings: usize,
    /// Findings that match none.
    pub false_findings: usize,
    /// Findings of an expected kind, key and source whose `at` is before the window.
    pub early: usize,
}

impl KindScore {
    pub fn recall(&self) -> f64 {
        if self.required == 0 {
            1.0
        } else {
            self.found as f64 / self.required as f64
        }
    }

    pub fn precision(&self) -> f64 {
        let n = self.true_findings + self.false_findings;
        if n == 0 {
            1.0
        } else {
            self.true_findings as f64 / n as f64
        }
    }

    /// Adds another score (of a seed, a kind) to this one.
    pub fn add(&mut self, o: &KindScore) {
        self.required += o.required;
        self.found += o.found;
        self.true_findings += o.true_findings;
        self.false_findings += o.false_findings;
        self.early += o.early;
    }
}

/// The score of one run: per kind, the total, and what was missed or false.
#[derive(Debug, Clone, Default)]
pub struct Score {
    pub per_kind: BTreeMap<String, KindScore>,
    pub total: KindScore,
    /// Required findings nobody raised in their window (label, kind).
    pub missed: Vec<(String, &'static str)>,
    /// Findings that match no expectation (kind, key label or id, at).
    pub false_findings: Vec<Seen>,
    /// Early ones.
    pub early: Vec<Seen>,
}

fn matches(e: &Expected, f: &Seen) -> bool {
    e.kind == f.kind
        && e.key_id == f.key_id
        && e.ip.as_ref().is_none_or(|ip| f.ip.as_ref() == Some(ip))
}

/// Scores `findings` against the truth.
pub fn score(expected: &[Expected], findings: &[Seen]) -> Score {
    let mut sc = Score::default();
    for e in expected.iter().filter(|e| e.required) {
        let k = sc.per_kind.entry(e.kind.to_owned()).or_default();
        k.required += 1;
        if findings
            .iter()
            .any(|f| matches(e, f) && (e.from_ms..=e.to_ms).contains(&f.at_ms))
        {
            k.found += 1;
        } else {
            sc.missed.push((e.label.to_owned(), e.kind));
        }
    }
    for f in findings {
        let k = sc.per_kind.entry(f.kind.clone()).or_default();
        let on_time = expected
            .iter()
            .any(|e| matches(e, f) && (e.from_ms..=e.to_ms).contains(&f.at_ms));
        if on_time {
            k.true_findings += 1;
            continue;
        }
        k.false_findings += 1;
        if expected
            .iter()
            .any(|e| matches(e, f) && f.at_ms < e.from_ms)
        {
            k.early += 1;
            sc.early.push(f.clone());
        }
        sc.false_findings.push(f.clone());
    }
    for k in sc.per_kind.values() {
        let k = k.clone();
        sc.total.add(&k);
    }
    sc
}

/// The label of a scenario key id, for reports (`akl-1`), or the id itself.
pub fn label_of(key_id: &str) -> String {
    let c = cast(SCENARIO_START_MS);
    c.keys
        .iter()
        .find(|k| gateway_id(k.label) == key_id)
        .map_or_else(|| key_id.to_owned(), |k| k.label.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scenario_is_deterministic_and_sorted() {
        let opts = ScenarioOptions {
            rate: 0.2,
            ..ScenarioOptions::default()
        };
        let a = generate(&opts);
        let b = generate(&opts);
        assert_eq!(a.log, b.log);
        assert!(a.log.len() > 10_000, "{}", a.log.len());
        let times: Vec<i64> = a
            .log
            .iter()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["started_at"]
                    .as_i64()
                    .unwrap()
            })
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!(times.iter().all(|t| (a.start_ms..a.end_ms).contains(t)));
        // No raw key material in the registry.
        assert!(!a.registry_toml.contains("kw_live_"));
        assert!(a.registry_toml.contains("aliases = [\"fp:"));
        assert!(!a.legacy_registry_toml.contains("aliases"));
        crate::registry::Registry::parse("keys.toml", &a.legacy_registry_toml).unwrap();
    }

    #[test]
    fn scoring_counts_early_false_and_missed() {
        let e = vec![Expected {
            kind: "new_source",
            key_id: "k".into(),
            ip: None,
            from_ms: 100,
            to_ms: 200,
            required: true,
            label: "x",
        }];
        let f = |at| Seen {
            kind: "new_source".into(),
            key_id: "k".into(),
            at_ms: at,
            ip: None,
            owner: None,
        };
        let s = score(&e, &[f(150)]);
        assert_eq!((s.total.recall(), s.total.precision()), (1.0, 1.0));
        let s = score(&e, &[f(99)]);
        assert_eq!(
            (s.total.found, s.total.early, s.total.false_findings),
            (0, 1, 1)
        );
        assert_eq!(s.missed.len(), 1);
    }
}
