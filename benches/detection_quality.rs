//! Detection quality of `keywatch backtest` on generated logs with known truth
//! (`keywatch::sample::scenarios`): twelve owners over thirteen days, time zones on both
//! sides of the date line, daylight-saving changes, an upstream outage, scanners, and one
//! scenario per defect class of issue 16.
//!
//! Run: `cargo bench --bench detection_quality` (options: `--seeds 1,2,3` (default),
//! `--rate R` (default 0.5: about 215,000 requests per log), `--legacy-registry` to write
//! the registry in the schema keywatch read before issue 16 (no aliases), `--keep DIR` to
//! keep the generated files, `--list` to list every false, early or missed finding).
//!
//! It calls the real binary (`CARGO_BIN_EXE_keywatch`) as a subprocess:
//! `keywatch backtest --config DIR/keywatch.toml --input DIR/gateway.log`, with the shipped
//! rules/policy.toml. Per seed and kind it prints required findings, found ones (recall),
//! findings that match an expectation or not (precision) and early ones (before their
//! evidence); then the totals. Then the daemon on the same log: a one-shot `keywatch run`
//! with the same config, its stored findings read with `keywatch findings --json`, scored
//! the same way and compared one for one with the backtest's.
//! Goal: recall 1.0, precision >= 0.95, no early finding; the daemon's findings equal the
//! backtest's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use keywatch::sample::scenarios::{self, KindScore, ScenarioOptions, Seen};

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

const SECRET: &[u8] = b"detection-quality-bench-secret";

fn main() {
    let seeds: Vec<u64> = arg("--seeds")
        .unwrap_or_else(|| "1,2,3".into())
        .split(',')
        .map(|s| s.trim().parse().expect("--seeds: comma-separated numbers"))
        .collect();
    let rate: f64 = arg("--rate").map_or(0.5, |r| r.parse().expect("--rate: a number"));
    let legacy = flag("--legacy-registry");
    let list = flag("--list");
    let keep = arg("--keep").map(PathBuf::from);
    let tmp = tempfile::tempdir().unwrap();
    let base = keep.unwrap_or_else(|| tmp.path().to_owned());
    let bin = env!("CARGO_BIN_EXE_keywatch");

    println!(
        "detection quality of `keywatch backtest` (seeds {seeds:?}, rate {rate}{})",
        if legacy { ", legacy registry" } else { "" }
    );
    let mut all = KindScore::default();
    let mut worst_precision: f64 = 1.0;
    let mut worst_recall: f64 = 1.0;
    let mut per_kind_all: BTreeMap<String, KindScore> = BTreeMap::new();
    let mut daemon_all = KindScore::default();
    let mut daemon_differs = 0usize;
    for seed in &seeds {
        let opts = ScenarioOptions {
            seed: *seed,
            rate,
            fingerprint_secret: SECRET.to_vec(),
        };
        let s = scenarios::generate(&opts);
        let dir = base.join(format!("seed-{seed}"));
        let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/policy.toml");
        let config = s
            .write_case(&dir, &opts, &policy, legacy)
            .expect("write the generated case");
        let t = Instant::now();
        let out = Command::new(bin)
            .args(["backtest", "--config"])
            .arg(&config)
            .arg("--input")
            .arg(dir.join("gateway.log"))
            .env("RUST_LOG", "warn")
            .output()
            .expect("run keywatch backtest");
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&out.stderr));
            panic!("keywatch backtest failed for seed {seed}");
        }
        let found: Vec<Seen> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| Seen::parse(l).expect("backtest prints findings"))
            .collect();
        let sc = scenarios::score(&s.expected, &found);

        // The daemon on the same log: a one-shot `keywatch run` (event time as its clock)
        // evaluating as often as the backtest (`--every` defaults to 1h), then its stored
        // findings. They must be the backtest's, one for one.
        let text = std::fs::read_to_string(&config).unwrap();
        assert!(text.contains("[rules]\n"), "{text}");
        std::fs::write(
            &config,
            text.replace("[rules]\n", "[rules]\nevaluate_every = \"1h\"\n"),
        )
        .unwrap();
        let t = Instant::now();
        let run = Command::new(bin)
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run keywatch run");
        let run_secs = t.elapsed().as_secs_f64();
        if !run.status.success() {
            eprintln!("{}", String::from_utf8_lossy(&run.stderr));
            panic!("keywatch run failed for seed {seed}");
        }
        let stored = Command::new(bin)
            .args(["findings", "--json", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .output()
            .expect("run keywatch findings");
        assert!(stored.status.success(), "keywatch findings failed");
        let daemon: Vec<Seen> = String::from_utf8_lossy(&stored.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| {
                // Scored at its first raise, as the backtest prints it.
                let mut v: serde_json::Value = serde_json::from_str(l).expect("findings --json");
                v["at"] = v["first_at"].clone();
                Seen::parse(&v.to_string()).expect("findings --json prints findings")
            })
            .collect();
        let dsc = scenarios::score(&s.expected, &daemon);
        let key = |f: &Seen| (f.at_ms, f.kind.clone(), f.key_id.clone(), f.ip.clone());
        let mut a: Vec<_> = found.iter().map(key).collect();
        let mut b: Vec<_> = daemon.iter().map(key).collect();
        a.sort();
        b.sort();
        let same = a == b;
        daemon_all.add(&dsc.total);
        daemon_differs += usize::from(!same);
        println!(
            "\nseed {seed}: {} requests, {} findings, backtest {secs:.1} s",
            s.log.len(),
            found.len()
        );
        println!(
            "  {:<20} {:>8} {:>6} {:>6} {:>6} {:>6} {:>7} {:>9}",
            "kind", "required", "found", "true", "false", "early", "recall", "precision"
        );
        for (kind, k) in &sc.per_kind {
            println!(
                "  {:<20} {:>8} {:>6} {:>6} {:>6} {:>6} {:>7.2} {:>9.2}",
                kind,
                k.required,
                k.found,
                k.true_findings,
                k.false_findings,
                k.early,
                k.recall(),
                k.precision()
            );
            per_kind_all.entry(kind.clone()).or_default().add(k);
        }
        let t = &sc.total;
        println!(
            "  {:<20} {:>8} {:>6} {:>6} {:>6} {:>6} {:>7.2} {:>9.2}",
            "TOTAL",
            t.required,
            t.found,
            t.true_findings,
            t.false_findings,
            t.early,
            t.recall(),
            t.precision()
        );
        println!(
            "  daemon (`keywatch run` one-shot, {run_secs:.1} s): {} findings, recall {:.2}, \
             precision {:.2}, early {}; {}",
            daemon.len(),
            dsc.total.recall(),
            dsc.total.precision(),
            dsc.total.early,
            if same {
                "the same findings as the backtest".to_owned()
            } else {
                format!(
                    "DIFFERENT from the backtest: {} only in the backtest, {} only in the daemon",
                    a.iter().filter(|x| !b.contains(x)).count(),
                    b.iter().filter(|x| !a.contains(x)).count()
                )
            }
        );
        worst_precision = worst_precision.min(t.precision());
        worst_recall = worst_recall.min(t.recall());
        all.add(t);
        if list {
            for (label, kind) in &sc.missed {
                println!("  missed  {kind:<20} {label}");
            }
            for f in &sc.false_findings {
                println!(
                    "  false   {:<20} {:<18} {} ip={} owner={}",
                    f.kind,
                    scenarios::label_of(&f.key_id),
                    keywatch::registry::format_rfc3339(f.at_ms),
                    f.ip.as_deref().unwrap_or("-"),
                    f.owner.as_deref().unwrap_or("-")
                );
            }
        }
    }
    println!("\nall seeds, per kind (required / found / false / early):");
    for (kind, k) in &per_kind_all {
        println!(
            "  {kind:<20} {:>4} / {:>4} / {:>4} / {:>4}",
            k.required, k.found, k.false_findings, k.early
        );
    }
    println!(
        "all seeds: recall {:.3} (worst seed {:.3}), precision {:.3} (worst seed {:.3}), \
         early findings {}",
        all.recall(),
        worst_recall,
        all.precision(),
        worst_precision,
        all.early
    );
    println!(
        "daemon, all seeds: recall {:.3}, precision {:.3}, early findings {}; {} of {} seeds \
         differ from the backtest",
        daemon_all.recall(),
        daemon_all.precision(),
        daemon_all.early,
        daemon_differs,
        seeds.len()
    );
}
