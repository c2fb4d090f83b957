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
//! evidence); then the totals. Goal: recall 1.0, precision >= 0.95, no early finding.

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
            per_kind_all.entry(kind.clone()).or_default();
            let e = per_kind_all.get_mut(kind).unwrap();
            e.required += k.required;
            e.found += k.found;
            e.true_findings += k.true_findings;
            e.false_findings += k.false_findings;
            e.early += k.early;
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
        worst_precision = worst_precision.min(t.precision());
        worst_recall = worst_recall.min(t.recall());
        all.required += t.required;
        all.found += t.found;
        all.true_findings += t.true_findings;
        all.false_findings += t.false_findings;
        all.early += t.early;
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
}
