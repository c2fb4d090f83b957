//! End to end: Kafka → keywatch → store, next to the broker's ceiling and the simplest
//! peer path, on the same topic, in one run.
//!
//! Run: `cargo bench --bench kafka_e2e -- [RECORDS] [clickhouse|sqlite]` (defaults:
//! 1000000, clickhouse). It starts its own Apache Kafka broker (`scripts/kafka.sh start`,
//! KRaft, one node) and ClickHouse server (`scripts/clickhouse.sh`) on free loopback ports,
//! produces RECORDS Kong records (~1 KB, `keywatch sample`) into 8 partitions, then measures
//! one after the other:
//!
//! (a) bare read: an rdkafka consumer that reads the topic and discards the messages;
//! (b) plain copy: an rdkafka consumer that inserts each message as one String row, in
//!     JSONEachRow batches of 10,000, without decoding or aggregating;
//! (c) keywatch: the real binary, decoding, fingerprinting, aggregating, detecting and
//!     storing exactly once, until the store holds every event.
//!
//! (a) and (b) run as child processes of this benchmark (the same executable, re-run with
//! `--path bare|copy`), so that each path's CPU seconds (user+system, from /proc) and peak
//! RSS (VmHWM) are its own; the broker's and ClickHouse's CPU seconds over each path are
//! reported too, since on two cores they share the machine with the path measured.
//!
//! Before the Kafka half, the file half compares `keywatch run` on the same records as a
//! file (`follow = false`) with a plain copy (`clickhouse-client ... FORMAT TabSeparated`
//! into one String column), `pairs=N` times in turn (default 1) after a warm-up pair, each
//! into a fresh table and database, and prints each pair's ratio and their median. `file-only` and
//! `kafka-only` run one half; `events=N`, `bytes=N` and `compression=none|lz4` set
//! keywatch's batch limits and insert compression; `days=D` the records' span of event
//! time (default 4, as `keywatch sample --lines N` writes them); `query-log` turns the
//! server's query log on and prints where its time went per statement (it slows the server
//! down, keywatch's many statements more than a copy's few: take ratios without it).

use std::io::Cursor;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Stops the broker started with `scripts/kafka.sh start DIR` when dropped.
struct Stopper(std::path::PathBuf, std::path::PathBuf);
impl Drop for Stopper {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(&self.0)
            .arg("stop")
            .arg(&self.1)
            .status();
    }
}

struct Killer(std::process::Child);
impl Drop for Killer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn consumer(brokers: &str, group: &str, topic: &str) -> BaseConsumer {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    c
}

fn ch_query(client: &reqwest::blocking::Client, url: &str, sql: &str) -> String {
    let r = client.post(url).body(sql.to_owned()).send().unwrap();
    let status = r.status();
    let text = r.text().unwrap();
    assert!(status.is_success(), "{sql}: {text}");
    text
}

/// Waits (at most a minute) until the server merges no parts, so that a timed run is not
/// charged for the background merges of the run before it.
fn ch_quiet(client: &reqwest::blocking::Client, url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while ch_query(client, url, "SELECT count() FROM system.merges").trim() != "0"
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn proc_stats(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = 100.0; // USER_HZ on Linux
    let cpu = fields
        .get(11)
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    (cpu / ticks, hwm)
}

/// One path's figures: events/s from its first message, its own CPU seconds and peak RSS,
/// and the CPU seconds the broker and ClickHouse spent meanwhile.
struct Measured {
    rate: f64,
    cpu: f64,
    rss_mb: f64,
    broker_cpu: f64,
    clickhouse_cpu: f64,
}

/// The pid of the ClickHouse server started by `scripts/clickhouse.sh start DIR`.
fn clickhouse_pid(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(dir.join("server.pid"))
        .ok()
        .and_then(|p| p.trim().parse().ok())
}

/// (a) or (b) in a child process: prints "events/s cpu_s peak_rss_kb".
fn child_path(args: &[String]) {
    let (path, brokers, topic, n, churl) = (
        args[0].as_str(),
        args[1].as_str(),
        args[2].as_str(),
        args[3].parse::<usize>().unwrap(),
        args[4].as_str(),
    );
    let c = consumer(brokers, path, topic);
    let mut got = 0usize;
    let mut t0 = None;
    if path == "bare" {
        while got < n {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(500)) {
                t0.get_or_insert_with(Instant::now);
                std::hint::black_box(m.payload());
                got += 1;
            }
        }
    } else {
        let http = reqwest::blocking::Client::new();
        let mut body = String::new();
        let mut rows = 0;
        while got < n {
            if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                t0.get_or_insert_with(Instant::now);
                let line = std::str::from_utf8(m.payload().unwrap_or_default()).unwrap_or("");
                body.push_str("{\"line\":");
                body.push_str(&serde_json::to_string(line).unwrap());
                body.push_str("}\n");
                rows += 1;
                got += 1;
            }
            if rows >= 10_000 || (got == n && rows > 0) {
                let r = http
                    .post(format!(
                        "{churl}?query=INSERT%20INTO%20default.plain_copy%20FORMAT%20JSONEachRow"
                    ))
                    .body(std::mem::take(&mut body))
                    .send()
                    .unwrap();
                assert!(r.status().is_success(), "{}", r.text().unwrap());
                rows = 0;
            }
        }
    }
    let rate = n as f64 / t0.unwrap().elapsed().as_secs_f64();
    let (cpu, hwm) = proc_stats(std::process::id());
    println!("{rate} {cpu} {hwm}");
}

/// A process's figures from `/usr/bin/time -f "%e %U %S %M"` (GNU time): wall, CPU and
/// peak RSS of the whole process, from the kernel's accounting at exit.
struct Timed {
    wall: f64,
    cpu: f64,
    rss_mb: f64,
}

fn run_timed(cmd: Command, stdin: Option<&Path>, log: &Path) -> Timed {
    let times = log.with_extension("time");
    let mut c = Command::new("/usr/bin/time");
    c.arg("-o").arg(&times).args(["-f", "%e %U %S %M"]);
    c.arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    if let Some(p) = stdin {
        c.stdin(std::fs::File::open(p).unwrap());
    }
    c.stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    let status = c.status().expect("/usr/bin/time (GNU time) is needed");
    assert!(
        status.success(),
        "{:?} failed; see {}",
        cmd.get_program(),
        log.display()
    );
    let f: Vec<f64> = std::fs::read_to_string(&times)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect();
    Timed {
        wall: f[0],
        cpu: f[1] + f[2],
        rss_mb: f[3] / 1024.0,
    }
}

/// The per-batch figures keywatch logs at debug level (JSON lines): pipeline segments
/// (`segment committed`), ClickHouse commits (`batch stored`) and batches (`batch committed`).
#[derive(Default)]
struct BatchTimings {
    /// field -> one value per line carrying it
    fields: std::collections::BTreeMap<String, Vec<f64>>,
}

impl BatchTimings {
    fn read(log: &Path) -> Self {
        let mut t = BatchTimings::default();
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let prefix = match v["message"].as_str() {
                Some("batch stored") => "store.",
                Some("segment committed") => "segment.",
                Some("batch committed") => "batch.",
                _ => continue,
            };
            for (k, val) in v.as_object().unwrap() {
                if let Some(x) = val.as_f64() {
                    t.fields.entry(format!("{prefix}{k}")).or_default().push(x);
                }
            }
        }
        t
    }

    fn print(&self, indent: &str) {
        let Some(n) = self.fields.get("batch.lines").map(Vec::len) else {
            println!("{indent}(no batch timings: keywatch logged none)");
            return;
        };
        println!("{indent}{n} batches; per batch: median / p90 / sum (ms where the name says so)");
        for (k, v) in &self.fields {
            let mut s = v.clone();
            s.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let q = |p: f64| s[((s.len() - 1) as f64 * p).round() as usize];
            println!(
                "{indent}  {k:<22} {:>10.1} {:>10.1} {:>12.1}",
                q(0.5),
                q(0.9),
                s.iter().sum::<f64>()
            );
        }
    }
}

/// ClickHouse's own view (`system.query_log`, on with `KEYWATCH_CH_QUERY_LOG=1`): per kind
/// of statement since `since`, queries, summed duration, rows and bytes written.
/// Whether the server logs its queries (`query-log`). Off by default: on ClickHouse 18.16
/// the query log doubled the server's CPU over keywatch's run (2.0-2.5 s to 4.0-4.6 s for
/// 1,000,000 events, and 1 s more wall), and much less over the copy's single insert, so
/// the comparisons are taken without it.
static QUERY_LOG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

fn query_log(http: &reqwest::blocking::Client, churl: &str, since: &str) -> String {
    if !QUERY_LOG.load(std::sync::atomic::Ordering::Relaxed) {
        return String::new();
    }
    ch_query(http, churl, "SYSTEM FLUSH LOGS");
    ch_query(
        http,
        churl,
        &format!(
            "SELECT replaceRegexpOne(query, '^(INSERT INTO [^ (]+|SELECT|ALTER|[A-Z]+).*$', '\\\\1') AS q, \
             count(), sum(query_duration_ms), sum(written_rows), sum(written_bytes) \
             FROM system.query_log WHERE type = 2 AND event_time >= '{since}' \
             AND query NOT LIKE '%query_log%' GROUP BY q ORDER BY sum(query_duration_ms) DESC \
             FORMAT TabSeparated"
        ),
    )
}

fn ch_now(http: &reqwest::blocking::Client, churl: &str) -> String {
    ch_query(http, churl, "SELECT toString(now())")
        .trim()
        .to_owned()
}

fn print_query_log(text: &str) {
    if !QUERY_LOG.load(std::sync::atomic::Ordering::Relaxed) {
        println!("    (no ClickHouse query log: run with `query-log`, which slows the server)");
        return;
    }
    println!(
        "    {:<44} {:>7} {:>9} {:>10} {:>12}",
        "ClickHouse query_log: statement", "queries", "sum ms", "rows", "bytes"
    );
    for l in text.lines() {
        let f: Vec<&str> = l.split('\t').collect();
        if f.len() == 5 {
            println!(
                "    {:<44} {:>7} {:>9} {:>10} {:>12}",
                f[0], f[1], f[2], f[3], f[4]
            );
        }
    }
}

/// File → ClickHouse: the plain copy (`clickhouse-client ... FORMAT TabSeparated < log`
/// into one String column) against `keywatch run` on the same file, each into a fresh
/// table or database of the same server (no merge running when each starts; every run's
/// rows kept until the end), after one warm-up pair, `pairs` times in turn (copy,
/// keywatch, copy, ...):
/// the ratio is taken pair by pair and its median printed, since the machine's speed
/// drifts between runs.
#[allow(clippy::too_many_arguments)]
fn file_half(
    dir: &Path,
    http: &reqwest::blocking::Client,
    churl: &str,
    chport: u16,
    ch_pid: Option<u32>,
    log: &Path,
    n: usize,
    pairs: usize,
    extra_pipeline: &str,
    store_extra: &str,
    secret: &str,
) {
    println!();
    println!(
        "File -> ClickHouse ({n} Kong records, {} MB; {pairs} pairs, fresh table and database each)",
        std::fs::metadata(log).unwrap().len() / 1_000_000
    );
    let ch_cpu = || ch_pid.map_or(0.0, |p| proc_stats(p).0);
    println!(
        "{:<44} {:>10} {:>8} {:>8} {:>9} {:>10}",
        "path", "events/s", "wall s", "CPU s", "peak RSS", "CH CPU"
    );
    let row = |name: &str, t: &Timed, chc: f64| {
        println!(
            "{:<44} {:>10.0} {:>8.2} {:>8.2} {:>6.0} MB {:>10.1}",
            name,
            n as f64 / t.wall,
            t.wall,
            t.cpu,
            t.rss_mb,
            chc
        );
    };
    let mut ratios = Vec::new();
    let (mut copy_log, mut kw_log, mut kwlog) = (String::new(), String::new(), dir.to_path_buf());
    let (mut copied, mut stored) = (String::new(), String::new());
    let mut cpu_per_event = Vec::new();
    for pair in 0..=pairs {
        let table = format!("default.file_copy_{pair}");
        ch_query(http, churl, &format!("DROP TABLE IF EXISTS {table}"));
        ch_query(
            http,
            churl,
            &format!("CREATE TABLE {table} (line String) ENGINE = MergeTree ORDER BY tuple()"),
        );
        ch_quiet(http, churl);
        let since = ch_now(http, churl);
        let before = ch_cpu();
        let mut copy = Command::new("clickhouse-client");
        copy.args([
            "--port",
            &(chport + 1).to_string(),
            "--query",
            &format!("INSERT INTO {table} FORMAT TabSeparated"),
        ]);
        let c = run_timed(copy, Some(log), &dir.join("copy.log"));
        let copy_ch = ch_cpu() - before;
        copy_log = query_log(http, churl, &since);
        copied = ch_query(http, churl, &format!("SELECT count() FROM {table}"));

        let database = format!("keywatch_file_{pair}");
        ch_query(http, churl, &format!("DROP DATABASE IF EXISTS {database}"));
        let state = dir.join(format!("state-file-{pair}"));
        let cfg = dir.join("keywatch-file.toml");
        std::fs::write(
            &cfg,
            format!(
                "state_dir = {state:?}\n[input]\nkind = \"file\"\npath = {log:?}\nfollow = false\nformat = \"kong\"\n\
                 [fingerprint]\nsecret_env = \"KW_BENCH_SECRET\"\n[server]\nenabled = false\n\
                 [log]\nformat = \"json\"\nlevel = \"warn,keywatch::store::clickhouse=debug,keywatch::daemon::pipeline=debug\"\n\
                 [pipeline]\n{extra_pipeline}\n\
                 [store]\nkind = \"clickhouse\"\n[store.clickhouse]\nurl = \"{churl}\"\ndatabase = \"{database}\"\n{store_extra}"
            ),
        )
        .unwrap();
        ch_quiet(http, churl);
        let since = ch_now(http, churl);
        let before = ch_cpu();
        let mut kw = Command::new(env!("CARGO_BIN_EXE_keywatch"));
        kw.arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("KW_BENCH_SECRET", secret);
        kwlog = dir.join("keywatch-file.log");
        let k = run_timed(kw, None, &kwlog);
        let kw_ch = ch_cpu() - before;
        kw_log = query_log(http, churl, &since);
        stored = ch_query(
            http,
            churl,
            &format!("SELECT count() FROM {database}.keywatch_events"),
        );
        if pair == 0 {
            // A warm-up pair: the first inserts into a freshly started 18.16 cost it up to
            // twice the CPU of later ones.
            println!(
                "(warm-up pair: copy {:.2} s, keywatch {:.2} s; not counted)",
                c.wall, k.wall
            );
            continue;
        }
        row(
            &format!("(f1) plain copy: clickhouse-client, TSV #{pair}"),
            &c,
            copy_ch,
        );
        row(
            &format!("(f2) keywatch run (follow = false) #{pair}"),
            &k,
            kw_ch,
        );
        ratios.push(c.wall / k.wall);
        cpu_per_event.push(k.cpu / n as f64 * 1e6);
    }
    // Dropped only now: on 18.16 every database dropped made each later insert dearer (the
    // server's CPU over keywatch's 80 inserts went 2.5, 3.1, 3.8 s after one, two, three
    // dropped databases), which taxes keywatch's many inserts against the copy's one.
    for pair in 0..=pairs {
        ch_query(
            http,
            churl,
            &format!("DROP TABLE IF EXISTS default.file_copy_{pair}"),
        );
        ch_query(
            http,
            churl,
            &format!("DROP DATABASE IF EXISTS keywatch_file_{pair}"),
        );
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let pair_ratios: Vec<String> = ratios.iter().map(|r| format!("{r:.2}")).collect();
    println!(
        "keywatch: {:.2}x plain copy (wall, whole processes; median of {pairs} pairs: {}); \
         {:.2} us CPU per event (median); rows: copy {}, keywatch events {}",
        median(&mut ratios),
        pair_ratios.join(" "),
        median(&mut cpu_per_event),
        copied.trim(),
        stored.trim()
    );
    println!("  (f1) plain copy (last pair):");
    print_query_log(&copy_log);
    println!("  (f2) keywatch (last pair):");
    print_query_log(&kw_log);
    BatchTimings::read(&kwlog).print("    ");
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if let Some(i) = args.iter().position(|a| a == "--path") {
        return child_path(&args[i + 1..]);
    }
    let n: usize = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let store = if args.iter().any(|a| a == "sqlite") {
        "sqlite"
    } else {
        "clickhouse"
    };
    let file_only = args.iter().any(|a| a == "file-only");
    let kafka_only = args.iter().any(|a| a == "kafka-only");
    // `events=N`, `bytes=N`: [pipeline] batch_max_events / batch_max_bytes of both keywatch
    // runs (default: keywatch's defaults).
    let mut extra_pipeline = String::new();
    for a in &args {
        if let Some(v) = a.strip_prefix("events=") {
            extra_pipeline.push_str(&format!("batch_max_events = {v}\n"));
        }
        if let Some(v) = a.strip_prefix("bytes=") {
            extra_pipeline.push_str(&format!("batch_max_bytes = {v}\n"));
        }
    }
    // `days=D`: the records' span of event time (default 4, as `keywatch sample`; until
    // issue 19's last figures the benchmark used 30: a batch of a backlog then spans
    // about two days, i.e. two or three parts per insert in the daily partitions).
    let days: f64 = args
        .iter()
        .find_map(|a| a.strip_prefix("days="))
        .map_or(4.0, |v| v.parse().expect("days=D"));
    // `pairs=N`: file -> ClickHouse runs N alternating pairs (default 1).
    let pairs: usize = args
        .iter()
        .find_map(|a| a.strip_prefix("pairs="))
        .map_or(1, |v| v.parse().expect("pairs=N"))
        .max(1);
    let compression = args
        .iter()
        .find_map(|a| a.strip_prefix("compression="))
        .unwrap_or("lz4")
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let secret = "benchmark-secret-0123456789";
    let lines = keywatch::sample::generate(&keywatch::sample::SampleOptions {
        preset: "kong".into(),
        lines: n,
        days,
        ..Default::default()
    })
    .unwrap();
    println!("{n} Kong records over {days} days of event time");
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    let text = lines.join("\n") + "\n";
    drop(lines);

    // ClickHouse, with its query log (where the server's time goes).
    let chdir = dir.path().join("clickhouse");
    let chport = free_port();
    let out = Command::new("bash")
        .arg(root.join("scripts/clickhouse.sh"))
        .args(["start", chdir.to_str().unwrap(), &chport.to_string()])
        .env(
            "KEYWATCH_CH_QUERY_LOG",
            if args.iter().any(|a| a == "query-log") {
                QUERY_LOG.store(true, std::sync::atomic::Ordering::Relaxed);
                "1"
            } else {
                "0"
            },
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let churl = format!("http://127.0.0.1:{chport}/");
    let http = reqwest::blocking::Client::new();
    let ch_pid = clickhouse_pid(&chdir);
    let ch_stop = Stopper(root.join("scripts/clickhouse.sh"), chdir.clone());
    let store_extra = format!("compression = \"{compression}\"\n");

    if !kafka_only {
        let log = dir.path().join("kong.log");
        std::fs::write(&log, text.as_bytes()).unwrap();
        file_half(
            dir.path(),
            &http,
            &churl,
            chport,
            ch_pid,
            &log,
            n,
            pairs,
            &extra_pipeline,
            &store_extra,
            secret,
        );
        std::fs::remove_file(&log).unwrap();
    }
    if file_only {
        return;
    }
    println!();

    // Broker.
    let kdir = dir.path().join("kafka");
    std::fs::create_dir_all(&kdir).unwrap();
    let t = Instant::now();
    let out = Command::new("bash")
        .arg(root.join("scripts/kafka.sh"))
        .args(["start", kdir.to_str().unwrap()])
        .env("KAFKA_HEAP", "-Xmx2g")
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "starting Kafka (scripts/kafka.sh)");
    let _broker = Stopper(root.join("scripts/kafka.sh"), kdir.clone());
    let brokers = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_owned();
    let broker_pid: u32 = std::fs::read_to_string(kdir.join("pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    println!(
        "Apache Kafka on {brokers}: listening {:.1} s after the start (storage format included)",
        t.elapsed().as_secs_f64()
    );

    // Data.
    let topic = "gateway";
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(admin.create_topics(
        [&NewTopic::new(topic, 8, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))
    .unwrap();
    let decoder = keywatch::event::Decoder::new(
        keywatch::event::Format::Kong,
        keywatch::event::Fingerprinter::new(secret.as_bytes(), 4),
        None,
    );
    let t = Instant::now();
    let mut producer = ClientConfig::new();
    producer.set("bootstrap.servers", &brokers);
    let sent = keywatch::cli::produce::produce(
        producer,
        topic,
        &mut Cursor::new(text.as_bytes()),
        Some(&decoder),
    )
    .unwrap();
    drop(text);
    let produce_s = t.elapsed().as_secs_f64();
    println!(
        "produced {sent} Kong records ({:.0} B avg, {:.0} MB) in {produce_s:.1} s: {:.0} msg/s",
        bytes as f64 / n as f64,
        bytes as f64 / 1e6,
        sent as f64 / produce_s
    );

    // (a) Bare read and (b) plain copy, each in a process of its own.
    ch_query(&http, &churl, "CREATE TABLE IF NOT EXISTS default.plain_copy (line String) ENGINE = MergeTree ORDER BY tuple()");
    let run_path = |path: &str| -> Measured {
        let others = (
            proc_stats(broker_pid).0,
            ch_pid.map_or(0.0, |p| proc_stats(p).0),
        );
        let exe = std::env::current_exe().unwrap();
        let out = Command::new(exe)
            .args(["--path", path, &brokers, topic, &n.to_string(), &churl])
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(out.status.success(), "path {path} failed");
        let text = String::from_utf8(out.stdout).unwrap();
        let f: Vec<f64> = text
            .split_whitespace()
            .map(|v| v.parse().unwrap())
            .collect();
        Measured {
            rate: f[0],
            cpu: f[1],
            rss_mb: f[2] / 1024.0,
            broker_cpu: proc_stats(broker_pid).0 - others.0,
            clickhouse_cpu: ch_pid.map_or(0.0, |p| proc_stats(p).0) - others.1,
        }
    };
    let bare = run_path("bare");
    let copy = run_path("copy");
    let copied = ch_query(&http, &churl, "SELECT count() FROM default.plain_copy");

    // (c) keywatch.
    let state = dir.path().join("state");
    let store_section = match store {
        "sqlite" => String::new(),
        _ => format!(
            "[store]\nkind = \"clickhouse\"\n[store.clickhouse]\nurl = \"http://127.0.0.1:{chport}\"\ndatabase = \"keywatch_bench\"\n{store_extra}"
        ),
    };
    let cfg = dir.path().join("keywatch.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {state:?}\n[input]\nkind = \"kafka\"\nformat = \"kong\"\n\
             [input.kafka]\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"keywatch\"\n\
             [fingerprint]\nsecret_env = \"KW_BENCH_SECRET\"\n[server]\nenabled = false\n\
             [log]\nformat = \"json\"\nlevel = \"warn,keywatch::store::clickhouse=debug,keywatch::daemon::pipeline=debug\"\n\
             [pipeline]\nbatch_max_wait = \"500ms\"\n{extra_pipeline}{store_section}"
        ),
    )
    .unwrap();
    let others = (
        proc_stats(broker_pid).0,
        ch_pid.map_or(0.0, |p| proc_stats(p).0),
    );
    let since = ch_now(&http, &churl);
    let t = Instant::now();
    let mut child = Killer(
        Command::new(env!("CARGO_BIN_EXE_keywatch"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("KW_BENCH_SECRET", secret)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("keywatch.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let pid = child.0.id();
    let mut first: Option<Instant> = None;
    let mut stats;
    loop {
        let count: u64 = match store {
            "sqlite" => keywatch::store::SqliteStore::open_read_only(&state)
                .ok()
                .and_then(|s| s.totals().ok())
                .map_or(0, |t| t.0),
            _ => http
                .post(&churl)
                .body("SELECT count() FROM keywatch_bench.keywatch_events")
                .send()
                .ok()
                .filter(|r| r.status().is_success())
                .and_then(|r| r.text().ok())
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0),
        };
        if count > 0 {
            first.get_or_insert_with(Instant::now);
        }
        stats = proc_stats(pid);
        if count >= n as u64 {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(1800),
            "keywatch did not finish: {count}/{n}"
        );
        if let Ok(Some(status)) = child.0.try_wait() {
            panic!("keywatch exited: {status:?}; see its log");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let total_s = t.elapsed().as_secs_f64();
    // Like (a) and (b), from the first event stored: start-up and the group join excluded.
    let kw = Measured {
        rate: n as f64 / first.map_or(total_s, |f| f.elapsed().as_secs_f64()),
        cpu: stats.0,
        rss_mb: stats.1 as f64 / 1024.0,
        broker_cpu: proc_stats(broker_pid).0 - others.0,
        clickhouse_cpu: ch_pid.map_or(0.0, |p| proc_stats(p).0) - others.1,
    };
    println!();
    println!(
        "{:<44} {:>10} {:>8} {:>9} {:>10} {:>10}",
        "path", "events/s", "CPU s", "peak RSS", "Kafka CPU", "CH CPU"
    );
    for (name, m) in [
        ("(a) bare read (rdkafka, discarded)".to_owned(), &bare),
        (
            "(b) plain copy to ClickHouse (String rows)".to_owned(),
            &copy,
        ),
        (format!("(c) keywatch -> {store}"), &kw),
    ] {
        println!(
            "{:<44} {:>10.0} {:>8.1} {:>6.0} MB {:>10.1} {:>10.1}",
            name, m.rate, m.cpu, m.rss_mb, m.broker_cpu, m.clickhouse_cpu
        );
    }
    println!(
        "keywatch: {:.2}x bare, {:.2}x plain copy; {:.1} s wall from start (incl. group join); {:.2} us CPU per event; plain copy stored {} rows",
        kw.rate / bare.rate,
        kw.rate / copy.rate,
        total_s,
        kw.cpu / n as f64 * 1e6,
        copied.trim()
    );
    drop(child);
    if store == "clickhouse" {
        print_query_log(&query_log(&http, &churl, &since));
    }
    BatchTimings::read(&dir.path().join("keywatch.log")).print("    ");
    drop(ch_stop);
}
