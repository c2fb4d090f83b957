//! A real Kafka-protocol broker (tansu) per test, on a free loopback port.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::ClientConfig;

pub struct Broker {
    pub port: u16,
    dir: PathBuf,
    sqlite: bool,
    child: Option<Child>,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tansu() -> String {
    std::env::var("KEYWATCH_TEST_TANSU").unwrap_or_else(|_| "tansu".to_owned())
}

impl Broker {
    /// SQLite storage in `dir`: survives a broker restart.
    ///
    /// Not tansu's in-memory engine: in tansu 0.6 it answers a fetch from an offset inside a
    /// record batch with the *next* batch, skipping the rest of that one, so a consumer that
    /// resumes mid-batch (after a restart or a rebalance) silently loses messages. The SQL
    /// engines fetch record by record (`offset_id >= $4`) and behave like Kafka.
    pub fn start(dir: &Path) -> Broker {
        Self::start_with(dir, true)
    }

    pub fn start_durable(dir: &Path) -> Broker {
        Self::start_with(dir, true)
    }

    fn start_with(dir: &Path, sqlite: bool) -> Broker {
        let mut b = Broker {
            port: free_port(),
            dir: dir.to_owned(),
            sqlite,
            child: None,
        };
        b.spawn();
        b
    }

    fn spawn(&mut self) {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let storage = if self.sqlite {
            "sqlite://tansu.db".to_owned()
        } else {
            "memory://tansu/".to_owned()
        };
        let log = std::fs::File::create(self.dir.join("tansu.log")).unwrap();
        let child = Command::new(tansu())
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", &storage])
            .current_dir(&self.dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting tansu (is it installed? scripts/test.sh installs it)");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "tansu did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .unwrap();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        let res = rt
            .block_on(admin.create_topics([&topic], &AdminOptions::new()))
            .expect("create_topics");
        for r in res {
            r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A random-ish name for topics and groups, unique per test run.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}
