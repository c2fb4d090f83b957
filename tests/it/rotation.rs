//! Rotation scenarios on generated logs with known truth (`keywatch::sample`): decoded like
//! the daemon decodes, folded into a real SQLite store, evaluated with event time as the
//! clock.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use keywatch::daemon::backtest::replay_pipeline;
use keywatch::daemon::pipeline::Pipeline;
use keywatch::daemon::schedule::Ticks;
use keywatch::detect::{Engine, Finding, FindingKind, Phase, Policy};
use keywatch::event::{AuthEvent, Decoder, Fingerprinter, Format};
use keywatch::registry::{format_rfc3339, KeyState, Registry, RegistryWatcher, Reload};
use keywatch::sample::{generate_sample, Sample, SampleOptions, Truth};
use keywatch::store::DetectionStore;

const HOUR: i64 = 3_600_000;
const QUIET: i64 = 72 * HOUR;

fn decoder() -> Decoder {
    Decoder::new(
        Format::preset("kong").unwrap(),
        Fingerprinter::new(b"rotation-test", 4),
        None,
    )
}

fn sample(opts: SampleOptions) -> (Sample, Vec<AuthEvent<'static>>) {
    let s = generate_sample(&opts).unwrap();
    let d = decoder();
    let mut events = Vec::new();
    for line in &s.lines {
        let mut out = Vec::new();
        d.decode(line.as_bytes(), &mut out).unwrap();
        events.extend(out.into_iter().map(AuthEvent::into_owned));
    }
    (s, events)
}

fn ip<'e>(e: &'e AuthEvent<'_>) -> &'e str {
    e.source_ip.as_deref().unwrap_or("")
}

fn ms(rfc3339: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .timestamp_millis()
}

/// The sample's registry: acme-billing in `tz` rotating A to B; every other client's key
/// active. `a_extra` replaces A's rotation fields.
fn registry_toml(t: &Truth, tz: &str, a_fields: &str) -> String {
    let mut s =
        format!("[owners.acme-billing]\ntimezone = {tz:?}\nemail = [\"ops@acme.example\"]\n");
    for c in t.clients.iter().filter(|c| c.name != "acme-billing") {
        s.push_str(&format!(
            "[owners.{}]\ntimezone = \"America/New_York\"\n",
            c.name
        ));
    }
    let rot = &t.rotation;
    s.push_str(&format!(
        "[[keys]]\nid = {:?}\nname = \"A\"\nowner = \"acme-billing\"\n{a_fields}\n",
        rot.old_key.identity
    ));
    s.push_str(&format!(
        "[[keys]]\nid = {:?}\nname = \"B\"\nowner = \"acme-billing\"\nversion = 2\n",
        rot.new_key.identity
    ));
    for c in t.clients.iter().filter(|c| c.name != "acme-billing") {
        for k in &c.keys {
            s.push_str(&format!(
                "[[keys]]\nid = {:?}\nowner = {:?}\n",
                k.identity, c.name
            ));
        }
    }
    s
}

fn rotating(t: &Truth, deadline: &str) -> String {
    format!(
        "state = \"rotating\"\nsuccessor = {:?}\nrotation_started = {:?}\ndeadline = {deadline:?}\n",
        t.rotation.new_key.identity,
        format_rfc3339(t.rotation.start_ms)
    )
}

/// Feeds `events` (sorted by time) through the daemon's pipeline (scratch store, no
/// evaluation of its own); before the first event at or after each time in `clocks`
/// (sorted), calls `at(clock, ..)` with exactly the events before it ingested, and the
/// stream findings the pipeline handed over since the last clock. Clocks after the last
/// event see everything. Returns the pipeline, to look at the engine and store after.
fn replay(
    events: &[AuthEvent<'static>],
    registry: Arc<Registry>,
    clocks: impl IntoIterator<Item = i64>,
    mut at: impl FnMut(i64, &mut Engine, &mut dyn DetectionStore, Vec<Finding>),
) -> Pipeline {
    let mut p = replay_pipeline(registry, Policy::default(), Ticks::At(Vec::new())).unwrap();
    p.collect_streamed();
    let mut rest = events;
    for c in clocks {
        let n = rest.iter().take_while(|e| e.ts_ms < c).count();
        let (now, later) = rest.split_at(n);
        if !now.is_empty() {
            p.process_events(now.to_vec()).unwrap();
        }
        rest = later;
        let streamed = p.take_streamed();
        let (engine, store) = p.parts_mut();
        at(c, engine, store.detection().unwrap(), streamed);
    }
    if !rest.is_empty() {
        p.process_events(rest.to_vec()).unwrap();
    }
    p
}

/// What the daemon hands over by `now`: the stream findings since the last clock, then the
/// evaluation's findings (ordered like [`Engine::evaluate`]).
fn evaluate(
    engine: &mut Engine,
    now: i64,
    store: &dyn DetectionStore,
    streamed: Vec<Finding>,
) -> Vec<Finding> {
    let mut found = streamed;
    found.extend(engine.evaluate(now, store));
    found.sort_by(|a, b| (a.at_ms, a.kind, &a.dedup_key).cmp(&(b.at_ms, b.kind, &b.dedup_key)));
    found
}

/// Every hour from the first hour after `from` to `to` (inclusive).
fn hourly(from: i64, to: i64) -> impl Iterator<Item = i64> {
    let first = (from.div_euclid(HOUR) + 1) * HOUR;
    (0..)
        .map(move |i| first + i * HOUR)
        .take_while(move |t| *t <= to)
}

fn lingering_ips(found: &[Finding]) -> BTreeSet<String> {
    found
        .iter()
        .filter(|f| f.kind == FindingKind::LingeringOldKey)
        .map(|f| f.evidence["ip"].as_str().unwrap().to_owned())
        .collect()
}

fn of_kind(found: &[Finding], kind: FindingKind) -> Vec<&Finding> {
    found.iter().filter(|f| f.kind == kind).collect()
}

fn example_registry() -> Registry {
    Registry::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/registry.toml")).unwrap()
}

#[test]
fn the_example_registry_describes_the_quick_start_sample() {
    let reg = example_registry();
    let truth = keywatch::sample::scenario_truth(&SampleOptions::default()).unwrap();
    for c in &truth.clients {
        for k in &c.keys {
            let key = reg
                .key(&k.identity)
                .unwrap_or_else(|| panic!("{} {} is missing", c.name, k.label));
            assert_eq!(key.owner, c.name);
        }
    }
    let rotations: Vec<_> = reg.rotations().map(|(k, s, _)| (k.id.clone(), s)).collect();
    assert_eq!(
        rotations,
        [(
            truth.rotation.old_key.identity.clone(),
            truth.rotation.new_key.identity.as_str()
        )]
    );
    let (a, _, rot) = reg.rotations().next().unwrap();
    assert_eq!(rot.started_ms, truth.rotation.start_ms);
    assert_eq!(a.state, KeyState::Rotating);
    assert_eq!(
        rot.deadline_ms,
        Some(ms("2026-11-24T17:00:00Z")),
        "18:00 in Berlin"
    );
}

/// Two of five hosts never switch: exactly those two are lingering, with their first/last
/// seen and counts; nothing is safe to revoke; the stalled adoption is at risk.
#[test]
fn exactly_the_two_laggards_linger_and_nothing_is_safe_to_revoke() {
    let (s, events) = sample(SampleOptions::default());
    let t = &s.truth;
    let rot = &t.rotation;
    let registry = Arc::new(example_registry());
    let last_switch = rot.switched.iter().map(|s| s.switch_ms).max().unwrap();
    let laggards: BTreeSet<String> = rot.laggards.iter().cloned().collect();
    assert_eq!(laggards.len(), 2);

    let mut evaluations = 0;
    let mut last_findings = Vec::new();
    let mut pipeline = replay(
        &events,
        registry,
        hourly(t.start_ms, t.end_ms),
        |now, engine, store, streamed| {
            let found = evaluate(engine, now, store, streamed.clone());
            assert!(
                of_kind(&found, FindingKind::SafeToRevoke).is_empty(),
                "safe_to_revoke at {} while hosts still use A",
                format_rfc3339(now)
            );
            if now > last_switch + HOUR {
                assert_eq!(
                    lingering_ips(&found),
                    laggards,
                    "at {}",
                    format_rfc3339(now)
                );
                evaluations += 1;
            }
            if now < rot.start_ms {
                assert!(lingering_ips(&found).is_empty());
            }
            last_findings = found;
        },
    );
    assert!(evaluations > 20, "{evaluations}");

    // The evidence per laggard matches the log: endpoints, first/last seen and counts.
    let a = &rot.old_key.identity;
    for lag in &rot.laggards {
        let mine: Vec<_> = events
            .iter()
            .filter(|e| e.key_id == a.as_str() && ip(e) == lag)
            .collect();
        let f = last_findings
            .iter()
            .find(|f| f.kind == FindingKind::LingeringOldKey && f.evidence["ip"] == *lag)
            .unwrap();
        assert_eq!(f.evidence["requests"], mine.len() as u64, "{lag}");
        assert_eq!(
            f.evidence["last_seen"],
            format_rfc3339(mine.iter().map(|e| e.ts_ms).max().unwrap())
        );
        assert_eq!(
            f.evidence["first_seen"],
            format_rfc3339(mine.iter().map(|e| e.ts_ms).min().unwrap())
        );
        let endpoints: BTreeSet<&str> = mine.iter().filter_map(|e| e.endpoint.as_deref()).collect();
        let got: BTreeSet<&str> = f.evidence["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(got, endpoints);
        assert_eq!(f.owner.as_deref(), Some("acme-billing"));
        assert_eq!(&f.key_id, a);
    }

    let (engine, store) = pipeline.parts_mut();
    let status = engine.rotations(t.end_ms, store.detection().unwrap());
    assert_eq!(status.len(), 1);
    let st = &status[0];
    assert_eq!(st.phase, Phase::AtRisk, "{:?}", st.forecast);
    let share = st.share_24h.unwrap();
    assert!((0.45..0.75).contains(&share), "3 of 5 hosts on B: {share}");
    assert!(of_kind(&last_findings, FindingKind::RotationAtRisk).len() == 1);
    let table = keywatch::cli::report_rotation::rotations_table(&status);
    for lag in &rot.laggards {
        assert!(table.contains(lag.as_str()), "{table}");
    }
    assert!(table.contains("at risk"), "{table}");
}

/// The laggards stop (one after the other): no safe_to_revoke until the old key has been
/// quiet for 72 h after the last one, then exactly one, at that time.
#[test]
fn safe_to_revoke_once_the_last_laggard_has_been_quiet_for_the_quiet_period() {
    let opts = SampleOptions {
        lines: 12_000,
        days: 12.0,
        ..SampleOptions::default()
    };
    let (s, events) = sample(opts);
    let t = &s.truth;
    let rot = &t.rotation;
    let a = rot.old_key.identity.as_str();
    let last_switch = rot.switched.iter().map(|s| s.switch_ms).max().unwrap();
    // 10.20.1.13 stops 6 h after the last switch, 198.51.100.23 12 h after it.
    let stops: BTreeMap<&str, i64> = [
        (rot.laggards[0].as_str(), last_switch + 6 * HOUR),
        (rot.laggards[1].as_str(), last_switch + 12 * HOUR),
    ]
    .into();
    let keep =
        |e: &AuthEvent<'_>| !(e.key_id == a && stops.get(ip(e)).is_some_and(|s| e.ts_ms >= *s));
    let events: Vec<_> = events.into_iter().filter(|e| keep(e)).collect();
    let last_a = events
        .iter()
        .filter(|e| e.key_id == a)
        .map(|e| e.ts_ms)
        .max()
        .unwrap();
    let by_laggard = |l: &str| {
        events
            .iter()
            .filter(|e| e.key_id == a && ip(e) == l)
            .map(|e| e.ts_ms)
            .max()
            .unwrap()
    };
    assert_eq!(
        last_a,
        by_laggard(&rot.laggards[1]),
        "the last host stops last"
    );
    assert!(by_laggard(&rot.laggards[0]) < last_a);
    let safe_at = last_a + QUIET;
    assert!(
        safe_at + 6 * HOUR < t.end_ms,
        "the sample must run past the quiet period"
    );

    let toml = registry_toml(t, "Europe/Berlin", &rotating(t, "2026-12-15T12:00"));
    let registry = Arc::new(Registry::parse("keys.toml", &toml).unwrap());
    let mut new_safe = Vec::new();
    let mut raised_at = Vec::new();
    let clocks: Vec<i64> = hourly(t.start_ms, t.end_ms)
        .chain([safe_at - 1, safe_at])
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    replay(
        &events,
        Arc::clone(&registry),
        clocks,
        |now, engine, store, streamed| {
            let found = evaluate(engine, now, store, streamed.clone());
            let safe = of_kind(&found, FindingKind::SafeToRevoke);
            if now < safe_at {
                assert!(safe.is_empty(), "safe_to_revoke at {}", format_rfc3339(now));
            } else {
                assert_eq!(safe.len(), 1, "at {}", format_rfc3339(now));
                assert_eq!(safe[0].at_ms, safe_at);
                raised_at.push(now);
            }
            new_safe.extend(
                store
                    .record_findings(&found)
                    .unwrap()
                    .into_iter()
                    .filter(|f| f.kind == FindingKind::SafeToRevoke),
            );
        },
    );
    assert_eq!(raised_at.first(), Some(&safe_at));
    assert!(raised_at.len() > 3, "{raised_at:?}");
    assert_eq!(new_safe.len(), 1, "{new_safe:#?}");
    let f = &new_safe[0];
    assert_eq!(f.at_ms, safe_at);
    assert_eq!(f.key_id, a);
    assert_eq!(f.evidence["last_old_use"], format_rfc3339(last_a));

    // The backtest of the same log says the same, once.
    let d = decoder();
    let lines: Vec<Vec<u8>> = s
        .lines
        .iter()
        .filter(|l| {
            let mut out = Vec::new();
            d.decode(l.as_bytes(), &mut out).unwrap();
            out.iter().all(keep)
        })
        .map(|l| l.clone().into_bytes())
        .collect();
    let found = keywatch::daemon::backtest::backtest(
        lines.into_iter(),
        d,
        replay_pipeline(registry, Policy::default(), Ticks::Every(HOUR)).unwrap(),
    )
    .unwrap()
    .findings;
    let safe: Vec<_> = of_kind(&found, FindingKind::SafeToRevoke);
    assert_eq!(safe.len(), 1);
    assert_eq!(safe[0].at_ms, safe_at);
    // Every finding once, in the order raised, with the fields the CLI prints.
    let keys: BTreeSet<_> = found.iter().map(|f| &f.dedup_key).collect();
    assert_eq!(keys.len(), found.len());
    for f in &found {
        let v = serde_json::to_value(f).unwrap();
        for field in ["kind", "key_id", "owner", "at", "severity", "evidence"] {
            assert!(v.get(field).is_some(), "{field} in {v}");
        }
        assert!(v["at"].as_str().unwrap().ends_with('Z'));
    }
    // Lingering was reported for both laggards (and only for hosts of acme-billing).
    let lingering = lingering_ips(&found);
    assert!(lingering.contains(&rot.laggards[0]) && lingering.contains(&rot.laggards[1]));
    let hosts: BTreeSet<String> = t
        .client("acme-billing")
        .unwrap()
        .hosts
        .iter()
        .cloned()
        .collect();
    assert!(lingering.is_subset(&hosts));
}

/// A revoked key used once: one revoked_key_used finding, in the first evaluation after
/// the request.
#[test]
fn a_revoked_key_used_once_is_one_finding() {
    let (s, events) = sample(SampleOptions::default());
    let t = &s.truth;
    let a = t.rotation.old_key.identity.as_str();
    // A is revoked just before its very last request: exactly one request after it.
    let uses: Vec<&AuthEvent<'_>> = events.iter().filter(|e| e.key_id == a).collect();
    let last = uses.last().unwrap();
    let before_last = uses[uses.len() - 2].ts_ms;
    assert!(before_last < last.ts_ms);
    let revoked_at = before_last + 1;
    let toml = registry_toml(
        t,
        "Europe/Berlin",
        &format!(
            "state = \"revoked\"\nsuccessor = {:?}\nrevoked = {:?}\n",
            t.rotation.new_key.identity,
            format_rfc3339(revoked_at)
        ),
    );
    let registry = Arc::new(Registry::parse("keys.toml", &toml).unwrap());
    let mut seen: Vec<(i64, Finding)> = Vec::new();
    replay(
        &events,
        registry,
        hourly(t.start_ms, t.end_ms + HOUR),
        |now, engine, store, streamed| {
            for f in evaluate(engine, now, store, streamed.clone()) {
                assert_ne!(
                    f.kind,
                    FindingKind::LingeringOldKey,
                    "a revoked key has no rotation"
                );
                if f.kind == FindingKind::RevokedKeyUsed {
                    seen.push((now, f));
                }
            }
        },
    );
    assert_eq!(seen.len(), 1, "{seen:#?}");
    let (now, f) = &seen[0];
    assert_eq!(
        *now,
        (last.ts_ms.div_euclid(HOUR) + 1) * HOUR,
        "the next evaluation"
    );
    assert_eq!(f.at_ms, last.ts_ms);
    assert_eq!(f.key_id, a);
    assert_eq!(f.evidence["ip"], ip(last));
    assert_eq!(f.owner.as_deref(), Some("acme-billing"));
    assert_eq!(f.severity, keywatch::detect::Severity::Critical);
}

/// The fumbled host's 401s on B are a failed rollover, raised within an evaluation of the
/// fumble, while A is still rotating (nobody has revoked it, nothing says it is safe).
#[test]
fn a_broken_rollover_is_raised_before_the_old_key_is_revoked() {
    let (s, events) = sample(SampleOptions::default());
    let t = &s.truth;
    let rot = &t.rotation;
    let fumble_from = rot
        .switched
        .iter()
        .find(|s| s.ip == rot.fumbled_host)
        .unwrap()
        .switch_ms;
    let registry = Arc::new(example_registry());
    let mut raised: Vec<(i64, Finding)> = Vec::new();
    let mut known = BTreeSet::new();
    replay(
        &events,
        registry,
        hourly(t.start_ms, t.end_ms),
        |now, engine, store, streamed| {
            let found = evaluate(engine, now, store, streamed.clone());
            assert!(of_kind(&found, FindingKind::SafeToRevoke).is_empty());
            // Each fact the first time it is handed over (the pipeline has stored the
            // stream findings already).
            for f in found {
                if f.kind == FindingKind::FailedRollover && known.insert(f.dedup_key.clone()) {
                    assert_eq!(
                        engine.registry().key(&rot.old_key.identity).unwrap().state,
                        KeyState::Rotating
                    );
                    raised.push((now, f));
                }
            }
        },
    );
    assert_eq!(raised.len(), 1, "one burst, no false alarms: {raised:#?}");
    let (now, f) = &raised[0];
    assert!(
        *now <= rot.fumble_until_ms + HOUR,
        "raised at {}, fumble until {}",
        format_rfc3339(*now),
        format_rfc3339(rot.fumble_until_ms)
    );
    // Stamped at the failing request that crossed the threshold: inside the fumble, never
    // before its first failure; the evidence counts the failures up to that request.
    assert!(
        f.at_ms >= fumble_from && f.at_ms <= rot.fumble_until_ms,
        "at {}, fumble from {} until {}",
        format_rfc3339(f.at_ms),
        format_rfc3339(fumble_from),
        format_rfc3339(rot.fumble_until_ms)
    );
    assert_eq!(f.evidence["window_end"], format_rfc3339(f.at_ms));
    assert_eq!(f.evidence["request"]["at"], format_rfc3339(f.at_ms));
    assert_eq!(f.evidence["scope"], "new_key");
    let failures = f.evidence["failures"].as_u64().unwrap();
    assert!(
        (Policy::default().failed_rollover.min_failures..=rot.fumbled_401s as u64)
            .contains(&failures),
        "{failures}"
    );
    let failing: Vec<&str> = f.evidence["failing_sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["ip"].as_str().unwrap())
        .collect();
    assert!(!failing.is_empty());
    assert!(
        failing.iter().all(|ip| *ip == rot.fumbled_host),
        "{failing:?}"
    );
}

/// Deadlines written in the owner's local time, on the days clocks change: the overdue
/// finding comes at the right instant, and the "1d" reminder at the same wall-clock time the
/// day before (23 or 25 hours earlier).
#[test]
fn deadlines_in_local_time_across_daylight_saving_changes() {
    struct Case {
        tz: &'static str,
        sample_start: &'static str,
        deadline_local: &'static str,
        deadline_utc: &'static str,
        one_day_before_utc: &'static str,
    }
    let cases = [
        // Berlin moves to CEST at 02:00 on 2026-03-29.
        Case {
            tz: "Europe/Berlin",
            sample_start: "2026-03-26T00:00:00Z",
            deadline_local: "2026-03-29T12:00",
            deadline_utc: "2026-03-29T10:00:00Z",
            one_day_before_utc: "2026-03-28T11:00:00Z",
        },
        // Berlin back to CET at 03:00 on 2026-10-25.
        Case {
            tz: "Europe/Berlin",
            sample_start: "2026-10-22T00:00:00Z",
            deadline_local: "2026-10-25T12:00",
            deadline_utc: "2026-10-25T11:00:00Z",
            one_day_before_utc: "2026-10-24T10:00:00Z",
        },
        // New York moves to EDT at 02:00 on 2026-03-08.
        Case {
            tz: "America/New_York",
            sample_start: "2026-03-05T00:00:00Z",
            deadline_local: "2026-03-08T12:00",
            deadline_utc: "2026-03-08T16:00:00Z",
            one_day_before_utc: "2026-03-07T17:00:00Z",
        },
        // New York back to EST at 02:00 on 2026-11-01.
        Case {
            tz: "America/New_York",
            sample_start: "2026-10-29T00:00:00Z",
            deadline_local: "2026-11-01T12:00",
            deadline_utc: "2026-11-01T17:00:00Z",
            one_day_before_utc: "2026-10-31T16:00:00Z",
        },
    ];
    for c in cases {
        let (s, events) = sample(SampleOptions {
            start_ms: ms(c.sample_start),
            ..SampleOptions::default()
        });
        let t = &s.truth;
        let toml = registry_toml(t, c.tz, &rotating(t, c.deadline_local));
        let reg = Registry::parse("keys.toml", &toml).unwrap();
        let deadline = ms(c.deadline_utc);
        let day_before = ms(c.one_day_before_utc);
        let (_, _, rot) = reg.rotations().next().unwrap();
        assert_eq!(rot.deadline_ms, Some(deadline), "{}", c.deadline_local);
        assert!(t.rotation.start_ms < day_before - HOUR && deadline < t.end_ms);

        let registry = Arc::new(reg);
        let mut results: BTreeMap<i64, Vec<Finding>> = BTreeMap::new();
        replay(
            &events,
            registry,
            [
                day_before - 1,
                day_before,
                deadline - 1,
                deadline,
                deadline + 3 * HOUR,
            ],
            |now, engine, store, streamed| {
                results.insert(now, evaluate(engine, now, store, streamed.clone()));
            },
        );
        let step = |now: i64| {
            of_kind(&results[&now], FindingKind::RotationReminder)
                .first()
                .map(|f| (f.evidence["step"].as_str().unwrap().to_owned(), f.at_ms))
        };
        let case = c.deadline_local;
        // The 7d and 3d steps came before the rotation started: not sent late.
        assert_eq!(step(day_before - 1), None, "{case}");
        assert_eq!(step(day_before), Some(("1d".into(), day_before)), "{case}");
        assert_eq!(step(deadline - 1).unwrap().0, "1d", "{case}");
        assert_eq!(step(deadline), Some(("due".into(), deadline)), "{case}");
        assert!(
            of_kind(&results[&(deadline - 1)], FindingKind::RotationOverdue).is_empty(),
            "{case}"
        );
        // At the deadline no old-key request came after it yet: not overdue. Once the
        // laggards used the old key after it, overdue since the deadline.
        assert!(
            of_kind(&results[&deadline], FindingKind::RotationOverdue).is_empty(),
            "{case}"
        );
        let overdue = of_kind(
            &results[&(deadline + 3 * HOUR)],
            FindingKind::RotationOverdue,
        );
        assert_eq!(overdue.len(), 1, "{case}");
        assert_eq!(overdue[0].at_ms, deadline, "{case}");
        assert_eq!(
            lingering_ips(&results[&deadline]),
            t.rotation.laggards.iter().cloned().collect::<BTreeSet<_>>(),
            "{case}"
        );
    }
}

/// The registry file changes during the rotation (A is revoked): the change takes effect
/// at once, and stream state (what was already reported) survives the reload.
#[test]
fn a_registry_reload_during_a_rotation() {
    let (s, events) = sample(SampleOptions::default());
    let t = &s.truth;
    let rot = &t.rotation;
    let soylent = t.key("soylent-iot", "primary").unwrap().identity.clone();
    let reload_at = rot.start_ms + 36 * HOUR;
    assert!(reload_at < t.end_ms - 6 * HOUR);

    // Version 1 does not list soylent-iot's key: it is an unknown key.
    let without_soylent = |toml: String| {
        toml.replace(
            &format!("[[keys]]\nid = {soylent:?}\nowner = \"soylent-iot\"\n"),
            "",
        )
    };
    let v1 = without_soylent(registry_toml(
        t,
        "Europe/Berlin",
        &rotating(t, "2026-11-24T18:00"),
    ));
    let v2 = without_soylent(registry_toml(
        t,
        "Europe/Berlin",
        &format!(
            "state = \"revoked\"\nsuccessor = {:?}\nrevoked = {:?}\n",
            rot.new_key.identity,
            format_rfc3339(reload_at)
        ),
    ));
    assert_ne!(v1, v2);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.toml");
    std::fs::write(&path, &v1).unwrap();
    let mut watcher = RegistryWatcher::open(&path).unwrap();
    let registry = watcher.registry();

    let mut before: Vec<Finding> = Vec::new();
    let mut after: Vec<Finding> = Vec::new();
    let mut reloaded = false;
    replay(
        &events,
        registry,
        hourly(t.start_ms, t.end_ms),
        |now, engine, store, streamed| {
            if now >= reload_at && !reloaded {
                // What was pending is evaluated under the old registry.
                before.extend(evaluate(engine, now, store, streamed.clone()));
                std::fs::write(&path, &v2).unwrap();
                let Reload::Reloaded(reg) = watcher.poll() else {
                    panic!("the changed file reloads")
                };
                engine.set_registry(reg);
                reloaded = true;
                assert!(engine.rotations(now, &*store).is_empty());
                return;
            }
            let found = evaluate(engine, now, store, streamed.clone());
            if reloaded {
                after.extend(found);
            } else {
                before.extend(found);
            }
        },
    );
    assert!(reloaded);
    let laggards: BTreeSet<String> = rot.laggards.iter().cloned().collect();
    // Before: a rotation with lingering laggards, no revoked key.
    assert_eq!(lingering_ips(&before), {
        let mut all = laggards.clone();
        // Early on, hosts that had not switched yet were lingering too.
        all.extend(rot.switched.iter().map(|s| s.ip.clone()));
        all
    });
    assert!(of_kind(&before, FindingKind::RevokedKeyUsed).is_empty());
    // After: A is revoked; the laggards' requests are revoked-key use; no rotation findings.
    let revoked_ips: BTreeSet<String> = of_kind(&after, FindingKind::RevokedKeyUsed)
        .iter()
        .map(|f| f.evidence["ip"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(revoked_ips, laggards);
    assert!(of_kind(&after, FindingKind::RevokedKeyUsed)
        .iter()
        .all(|f| f.at_ms >= reload_at));
    assert!(lingering_ips(&after).is_empty());
    assert!(of_kind(&after, FindingKind::RotationAtRisk).is_empty());
    // The unknown soylent-iot key was reported once, before the reload, and not again.
    let unknown: Vec<_> = of_kind(&before, FindingKind::UnknownKey)
        .into_iter()
        .chain(of_kind(&after, FindingKind::UnknownKey))
        .collect();
    assert_eq!(unknown.len(), 1, "{unknown:#?}");
    assert_eq!(unknown[0].key_id, soylent);
    assert!(unknown[0].at_ms < reload_at);
    assert!(events
        .iter()
        .any(|e| e.key_id == soylent.as_str() && e.ts_ms > reload_at));
}

/// The scanner's bursts of requests without a key are raised, from its IP only.
#[test]
fn the_scanners_bursts_are_unknown_key_bursts() {
    let (s, events) = sample(SampleOptions::default());
    let t = &s.truth;
    let registry = Arc::new(example_registry());
    let mut found = Vec::new();
    replay(
        &events,
        registry,
        [t.end_ms],
        |now, engine, store, streamed| found = evaluate(engine, now, store, streamed),
    );
    let bursts = of_kind(&found, FindingKind::UnknownKeyBurst);
    assert!(!bursts.is_empty());
    assert!(bursts
        .iter()
        .all(|f| f.evidence["ip"] == t.scanner_ip.as_str()));
    // Every key of the sample is in the example registry.
    assert!(of_kind(&found, FindingKind::UnknownKey).is_empty());
    // globex-mobile's key is older than 90 days.
    let old = of_kind(&found, FindingKind::KeyAgeExceeded);
    assert_eq!(old.len(), 1);
    assert_eq!(old[0].owner.as_deref(), Some("globex-mobile"));
}

/// Issue 16's generated fleet (`keywatch::sample::scenarios`: twelve owners on both sides
/// of the date line, daylight-saving changes, an outage, scanners, one scenario per defect
/// class) through the real binary's backtest: every required finding in its window, none
/// before its evidence, at most one false finding in twenty, and no safe-to-revoke before
/// the old key's last use plus the quiet period.
#[test]
fn the_generated_fleet_raises_what_is_true_and_when() {
    use keywatch::sample::scenarios::{self, ScenarioOptions, Seen};
    let opts = ScenarioOptions {
        seed: 7,
        rate: 0.15,
        ..ScenarioOptions::default()
    };
    let s = scenarios::generate(&opts);
    let dir = tempfile::tempdir().unwrap();
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/policy.toml");
    let config = s.write_case(dir.path(), &opts, &policy, false).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keywatch"))
        .args(["backtest", "--config"])
        .arg(&config)
        .arg("--input")
        .arg(dir.path().join("gateway.log"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let found: Vec<Seen> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| Seen::parse(l).unwrap())
        .collect();
    let sc = scenarios::score(&s.expected, &found);
    assert!(sc.missed.is_empty(), "missed: {:?}", sc.missed);
    assert!(sc.early.is_empty(), "early: {:?}", sc.early);
    assert!(
        sc.total.precision() >= 0.95,
        "precision {:.2}, false: {:#?}",
        sc.total.precision(),
        sc.false_findings
    );
    // Findings without an owner are about no key (bursts), never a registered key's alias.
    for f in found.iter().filter(|f| f.owner.is_none()) {
        assert_eq!(f.kind, "unknown_key_burst", "{f:?}");
    }
}
