//! Memory per tracked key (issue 13, item 5): how many bytes each part of keywatch holds
//! per key when it tracks many keys, and the peak RSS of a real `keywatch run`.
//!
//! Run: `cargo bench --bench memory_per_key` (options: `keys=N`, default 1,000,000;
//! `requests=R` per key, default 2; `--no-run` skips the `keywatch run` processes;
//! `--keep DIR` keeps the generated logs and stores there).
//!
//! The corpus: Kong records (`keywatch sample`'s lines as templates) whose credential id
//! (`authenticated_entity.id`) is one of N keys, R requests per key, in R passes over the
//! keys spread evenly over R hours of event time, so every key is live at the end and
//! each of its requests falls in another hour (its hourly models close an hour).
//!
//! 1. In process, with a counting global allocator: the daemon's per-batch path
//!    (decode with fingerprint memo, stream detectors, per-batch aggregate, anomaly
//!    models) over batches of 4,096 lines. Each long-lived part's retained bytes are
//!    measured by dropping it at the end and seeing the live heap fall; the aggregate is
//!    per batch, so its figure is the largest batch's. "requested" is what the program
//!    asked for; "malloc" adds glibc's per-chunk header and 16-byte rounding (what RSS
//!    pays).
//! 2. Two `keywatch run` processes on the embedded store (SQLite) under GNU time: the
//!    N × R corpus and 1,000 keys × 2,000 requests over the same R hours (the same number
//!    of lines when N × R = 2 M), each reading its file once (`follow = false`). Bytes per key =
//!    (peak RSS of N keys − peak RSS of 1,000 keys) / (N − 1,000): what the keys add
//!    beyond the same traffic on few keys.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use keywatch::aggregate::Aggregate;
use keywatch::anomaly::{AnomalyConfig, AnomalyModels};
use keywatch::detect::{Engine, Policy};
use keywatch::event::{Decoder, Fingerprinter, Format};
use keywatch::registry::Registry;
use keywatch::sample::{self, SampleOptions};

/// Counts live heap bytes (as requested, and as glibc's chunks) and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static LIVE_CHUNKS: AtomicUsize = AtomicUsize::new(0);
static LIVE_ALLOCS: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// glibc's chunk for a request: 8 bytes of header, 16-byte granules, 32 bytes at least;
/// large requests are mmapped whole pages.
fn chunk(size: usize) -> usize {
    if size >= 128 * 1024 {
        (size + 16).div_ceil(4096) * 4096
    } else {
        (size + 8).div_ceil(16).max(2) * 16
    }
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            let now = LIVE.fetch_add(l.size(), Relaxed) + l.size();
            LIVE_CHUNKS.fetch_add(chunk(l.size()), Relaxed);
            LIVE_ALLOCS.fetch_add(1, Relaxed);
            PEAK.fetch_max(now, Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        LIVE.fetch_sub(l.size(), Relaxed);
        LIVE_CHUNKS.fetch_sub(chunk(l.size()), Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Relaxed);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            let now = if new >= l.size() {
                LIVE.fetch_add(new - l.size(), Relaxed) + new - l.size()
            } else {
                LIVE.fetch_sub(l.size() - new, Relaxed) - (l.size() - new)
            };
            LIVE_CHUNKS.fetch_add(chunk(new), Relaxed);
            LIVE_CHUNKS.fetch_sub(chunk(l.size()), Relaxed);
            PEAK.fetch_max(now, Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[derive(Clone, Copy)]
struct Heap {
    bytes: usize,
    chunks: usize,
    allocs: usize,
}

fn heap() -> Heap {
    Heap {
        bytes: LIVE.load(Relaxed),
        chunks: LIVE_CHUNKS.load(Relaxed),
        allocs: LIVE_ALLOCS.load(Relaxed),
    }
}

/// What dropping `f`'s argument freed.
fn freed<T>(v: T) -> Heap {
    let before = heap();
    drop(v);
    let after = heap();
    Heap {
        bytes: before.bytes.saturating_sub(after.bytes),
        chunks: before.chunks.saturating_sub(after.chunks),
        allocs: before.allocs.saturating_sub(after.allocs),
    }
}

const BATCH: usize = 4096;
const SMALL_KEYS: usize = 1000;
const SMALL_REQUESTS: usize = 2000;
/// Event time of the first line (2026-11-20T00:00:00Z).
const T0_MS: i64 = 1_795_132_800_000;
const HOUR_MS: i64 = 3_600_000;

/// Kong lines with a credential id, from the sample, as templates.
fn templates() -> Vec<String> {
    let opts = SampleOptions {
        lines: 2000,
        ..SampleOptions::default()
    };
    sample::generate(&opts)
        .expect("sample")
        .into_iter()
        .filter(|l| l.contains("\"authenticated_entity\":{\"id\":\""))
        .take(256)
        .collect()
}

/// Line `i` of the corpus of `keys` keys × `requests` requests over `hours` of event
/// time: pass `i / keys` over the keys, the lines evenly spaced.
fn line(t: &[String], keys: usize, requests: usize, hours: i64, i: usize, out: &mut Vec<u8>) {
    let tmpl = &t[i % t.len()];
    let key = i % keys;
    let ts = T0_MS + (i as i64 * hours * HOUR_MS) / (keys * requests) as i64;
    const ID: &str = "\"authenticated_entity\":{\"id\":\"";
    const TS: &str = "\"started_at\":";
    let id_at = tmpl.find(ID).expect("id") + ID.len();
    let id_end = id_at + tmpl[id_at..].find('"').expect("id end");
    let ts_at = tmpl.find(TS).expect("started_at") + TS.len();
    let ts_end = ts_at
        + tmpl[ts_at..]
            .find(|c: char| !c.is_ascii_digit())
            .expect("ts end");
    let id = format!("{key:08x}-0000-4000-8000-{key:012x}");
    let ts = ts.to_string();
    let mut spans = [(id_at, id_end, id.as_str()), (ts_at, ts_end, ts.as_str())];
    spans.sort_by_key(|s| s.0);
    out.clear();
    let mut at = 0;
    for (from, to, with) in spans {
        out.extend_from_slice(&tmpl.as_bytes()[at..from]);
        out.extend_from_slice(with.as_bytes());
        at = to;
    }
    out.extend_from_slice(&tmpl.as_bytes()[at..]);
}

fn per_key(h: Heap, keys: usize) -> (f64, f64, f64) {
    let k = keys as f64;
    (h.bytes as f64 / k, h.chunks as f64 / k, h.allocs as f64 / k)
}

fn in_process(t: &[String], keys: usize, requests: usize) {
    let start = heap();
    let registry = Arc::new(Registry::empty());
    let decoder = Decoder::new(
        Format::preset("kong").expect("kong"),
        Fingerprinter::new(b"benchmark-secret-0123456789", 4),
        None,
    );
    let mut engine = Engine::new(Arc::clone(&registry), Policy::default());
    let mut models = AnomalyModels::new(AnomalyConfig::default());
    models.set_registry(Arc::clone(&registry));
    let total = keys * requests;
    let mut lines: Vec<Vec<u8>> = vec![Vec::new(); BATCH];
    let mut agg_peak = 0usize;
    let mut findings = 0usize;
    let began = std::time::Instant::now();
    for first in (0..total).step_by(BATCH) {
        let n = BATCH.min(total - first);
        for (j, l) in lines.iter_mut().enumerate().take(n) {
            line(t, keys, requests, requests as i64, first + j, l);
        }
        let before = heap().bytes;
        let mut agg = Aggregate::default();
        let mut events = Vec::new();
        for l in &lines[..n] {
            decoder.decode(l, &mut events).expect("decode");
            for ev in events.drain(..) {
                engine.observe(&ev);
                agg.add(&ev);
            }
        }
        agg_peak = agg_peak.max(heap().bytes.saturating_sub(before));
        findings += models.observe_aggregate(&agg).len();
        findings += engine.take_pending().len();
    }
    let elapsed = began.elapsed();
    drop(lines);
    let peak = PEAK.load(Relaxed);
    let n_models = models.key_count();
    let model_estimate = models.bytes_per_key();
    let parts = [
        ("anomaly models", freed(models)),
        ("stream detectors", freed(engine)),
        ("decoder + fingerprint memo", freed(decoder)),
    ];
    drop(registry);
    println!(
        "in process: {keys} keys × {requests} requests ({total} Kong lines, batches of {BATCH}), {:.1} s, {findings} findings, {n_models} keys modelled",
        elapsed.as_secs_f64()
    );
    println!(
        "{:<30} {:>14} {:>12} {:>12} {:>12}",
        "part (retained)", "bytes", "B/key req.", "B/key malloc", "allocs/key"
    );
    let mut sum = Heap {
        bytes: 0,
        chunks: 0,
        allocs: 0,
    };
    for (name, h) in parts {
        let (b, c, a) = per_key(h, keys);
        println!("{name:<30} {:>14} {b:>12.1} {c:>12.1} {a:>12.2}", h.bytes);
        sum.bytes += h.bytes;
        sum.chunks += h.chunks;
        sum.allocs += h.allocs;
    }
    let (b, c, a) = per_key(sum, keys);
    println!(
        "{:<30} {:>14} {b:>12.1} {c:>12.1} {a:>12.2}",
        "total retained", sum.bytes
    );
    println!(
        "anomaly models: {} bytes inline per key model, {model_estimate} bytes per key by AnomalyModels::bytes_per_key",
        std::mem::size_of::<keywatch::anomaly::KeyModel>()
    );
    println!(
        "batch aggregate (transient, largest batch): {} bytes = {:.0} per line; peak live heap {} bytes = {:.1} per key (start {} bytes)",
        agg_peak,
        agg_peak as f64 / BATCH as f64,
        peak,
        (peak - start.bytes) as f64 / keys as f64,
        start.bytes
    );
}

fn write_corpus(t: &[String], keys: usize, requests: usize, hours: i64, path: &Path) {
    let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).unwrap());
    let mut l = Vec::new();
    for i in 0..keys * requests {
        line(t, keys, requests, hours, i, &mut l);
        f.write_all(&l).unwrap();
        f.write_all(b"\n").unwrap();
    }
    f.flush().unwrap();
}

/// Peak RSS (KiB) and wall seconds of a one-shot `keywatch run` on `log` into a fresh store.
fn run(dir: &Path, name: &str, log: &Path) -> (u64, f64) {
    let state = dir.join(format!("state-{name}"));
    let _ = std::fs::remove_dir_all(&state);
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {:?}\n[input]\nkind = \"file\"\npath = {:?}\nformat = \"kong\"\nfollow = false\n[server]\nenabled = false\n",
            state, log
        ),
    )
    .unwrap();
    let times = dir.join(format!("{name}.time"));
    let status = Command::new("/usr/bin/time")
        .arg("-o")
        .arg(&times)
        .args(["-f", "%M %e"])
        .arg(env!("CARGO_BIN_EXE_keywatch"))
        .args(["run", "-c"])
        .arg(&cfg)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap())
        .status()
        .expect("/usr/bin/time (GNU time) is needed");
    assert!(status.success(), "keywatch run failed: see {name}.log");
    let text = std::fs::read_to_string(&times).unwrap();
    let mut f = text.lines().last().unwrap().split_whitespace();
    (
        f.next().unwrap().parse().unwrap(),
        f.next().unwrap().parse().unwrap(),
    )
}

fn processes(t: &[String], keys: usize, requests: usize, dir: &Path) {
    let big = dir.join("many-keys.log");
    let small = dir.join("few-keys.log");
    // One corpus on disk at a time: each is about 1 KB a line.
    write_corpus(t, keys, requests, requests as i64, &big);
    let (rss_big, wall_big) = run(dir, "many", &big);
    std::fs::remove_file(&big).ok();
    // Over the same event time as the many keys: the same hourly work but for the keys.
    write_corpus(t, SMALL_KEYS, SMALL_REQUESTS, requests as i64, &small);
    let (rss_small, wall_small) = run(dir, "few", &small);
    std::fs::remove_file(&small).ok();
    let mb = |kib: u64| kib as f64 / 1024.0;
    println!("keywatch run (embedded store, Kong, one pass, GNU time):");
    println!(
        "  {keys} keys × {requests} requests: peak RSS {:.0} MiB ({:.0} s)",
        mb(rss_big),
        wall_big
    );
    println!(
        "  {SMALL_KEYS} keys × {SMALL_REQUESTS} requests: peak RSS {:.0} MiB ({:.0} s)",
        mb(rss_small),
        wall_small
    );
    println!(
        "  bytes per key: {:.0} (the difference over {} keys); {:.0} (whole process / {keys})",
        (rss_big.saturating_sub(rss_small) * 1024) as f64 / (keys - SMALL_KEYS) as f64,
        keys - SMALL_KEYS,
        (rss_big * 1024) as f64 / keys as f64
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let opt = |name: &str, default: usize| {
        args.iter()
            .find_map(|a| a.strip_prefix(&format!("{name}=")))
            .map_or(default, |v| v.parse().expect("a number"))
    };
    let keys = opt("keys", 1_000_000);
    let requests = opt("requests", 2);
    assert!(keys > SMALL_KEYS, "keys must be more than {SMALL_KEYS}");
    let t = templates();
    in_process(&t, keys, requests);
    if args.iter().any(|a| a == "--no-run") {
        return;
    }
    let keep = args
        .iter()
        .position(|a| a == "--keep")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let tmp;
    let dir = match keep {
        Some(d) => {
            std::fs::create_dir_all(&d).unwrap();
            d
        }
        None => {
            tmp = tempfile::tempdir().unwrap();
            tmp.path().to_path_buf()
        }
    };
    processes(&t, keys, requests, &dir);
}
