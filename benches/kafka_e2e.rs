//! End to end: Kafka → keywatch → store, next to the broker's ceiling and the simplest
//! peer path, on the same topic, in one run.
//!
//! Run: `cargo bench --bench kafka_e2e -- [RECORDS] [clickhouse|sqlite]` (defaults: 300000,
//! clickhouse). It starts its own tansu broker (SQL storage) and ClickHouse server
//! (scripts/clickhouse.sh) on free loopback ports, produces RECORDS Kong records (~1 KB,
//! `keywatch sample`), then measures one after the other:
//!
//! (a) bare read: an rdkafka consumer that reads the topic and discards the messages;
//! (b) plain copy: an rdkafka consumer that inserts each message as one String row, in
//!     JSONEachRow batches of 10,000, without decoding or aggregating;
//! (c) keywatch: the real binary, decoding, fingerprinting, aggregating, detecting and
//!     storing exactly once, until the store holds every event.
//!
//! For (c) it reports CPU seconds (user+system, from /proc) and peak RSS (VmHWM).

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

fn wait_port(port: u16) {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "port {port} never opened"
        );
        std::thread::sleep(Duration::from_millis(50));
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

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let n: usize = args.iter().find_map(|a| a.parse().ok()).unwrap_or(300_000);
    let store = if args.iter().any(|a| a == "sqlite") {
        "sqlite"
    } else {
        "clickhouse"
    };
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));

    // Broker.
    let kport = free_port();
    let url = format!("tcp://127.0.0.1:{kport}");
    let _broker = Killer(
        Command::new("tansu")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(dir.path())
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tansu on PATH (scripts/test.sh installs it)"),
    );
    wait_port(kport);
    let brokers = format!("127.0.0.1:{kport}");

    // ClickHouse.
    let chdir = dir.path().join("clickhouse");
    let chport = free_port();
    let out = Command::new("bash")
        .arg(root.join("scripts/clickhouse.sh"))
        .args(["start", chdir.to_str().unwrap(), &chport.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let churl = format!("http://127.0.0.1:{chport}/");
    let http = reqwest::blocking::Client::new();

    // Data.
    let topic = "gateway";
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .create()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(admin.create_topics(
        [&NewTopic::new(topic, 4, TopicReplication::Fixed(1))],
        &AdminOptions::new(),
    ))
    .unwrap();
    let lines = keywatch::sample::generate(&keywatch::sample::SampleOptions {
        preset: "kong".into(),
        lines: n,
        days: 30.0,
        ..Default::default()
    })
    .unwrap();
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    let text = lines.join("\n") + "\n";
    drop(lines);
    let secret = "benchmark-secret-0123456789";
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

    // (a) Bare read.
    let c = consumer(&brokers, "bare", topic);
    let mut got = 0usize;
    let mut t0 = None;
    while got < n {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(500)) {
            t0.get_or_insert_with(Instant::now);
            std::hint::black_box(m.payload());
            got += 1;
        }
    }
    let bare = n as f64 / t0.unwrap().elapsed().as_secs_f64();
    drop(c);

    // (b) Plain copy into ClickHouse, one String row per message.
    ch_query(&http, &churl, "CREATE TABLE IF NOT EXISTS default.plain_copy (line String) ENGINE = MergeTree ORDER BY tuple()");
    let c = consumer(&brokers, "copy", topic);
    let mut got = 0usize;
    let mut t0 = None;
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
    let copy = n as f64 / t0.unwrap().elapsed().as_secs_f64();
    drop(c);
    let copied = ch_query(&http, &churl, "SELECT count() FROM default.plain_copy");

    // (c) keywatch.
    let state = dir.path().join("state");
    let store_section = match store {
        "sqlite" => String::new(),
        _ => format!(
            "[store]\nkind = \"clickhouse\"\n[store.clickhouse]\nurl = \"http://127.0.0.1:{chport}\"\ndatabase = \"keywatch_bench\"\n"
        ),
    };
    let cfg = dir.path().join("keywatch.toml");
    std::fs::write(
        &cfg,
        format!(
            "state_dir = {state:?}\n[input]\nkind = \"kafka\"\nformat = \"kong\"\n\
             [input.kafka]\nbrokers = \"{brokers}\"\ntopics = [\"{topic}\"]\ngroup_id = \"keywatch\"\n\
             [fingerprint]\nsecret_env = \"KW_BENCH_SECRET\"\n[server]\nenabled = false\n\
             [pipeline]\nbatch_max_events = 20000\nbatch_max_wait = \"500ms\"\n{store_section}"
        ),
    )
    .unwrap();
    let t = Instant::now();
    let mut child = Killer(
        Command::new(env!("CARGO_BIN_EXE_keywatch"))
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .env("KW_BENCH_SECRET", secret)
            .env("KEYWATCH_LOG", "warn")
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
    let kw = n as f64 / first.map_or(total_s, |f| f.elapsed().as_secs_f64());
    println!();
    println!("{:<44} {:>12}", "path", "events/s");
    println!("{:<44} {:>12.0}", "(a) bare read (broker ceiling)", bare);
    println!(
        "{:<44} {:>12.0}",
        "(b) plain copy to ClickHouse (String rows)", copy
    );
    println!("{:<44} {:>12.0}", format!("(c) keywatch -> {store}"), kw);
    println!(
        "keywatch: {:.2}x bare, {:.2}x plain copy; {:.1} s wall from start (incl. group join), {:.1} CPU s, peak RSS {} MB; plain copy stored {} rows",
        kw / bare,
        kw / copy,
        total_s,
        stats.0,
        stats.1 / 1024,
        copied.trim()
    );
    let _ = Command::new("bash")
        .arg(root.join("scripts/clickhouse.sh"))
        .args(["stop", chdir.to_str().unwrap()])
        .status();
}
