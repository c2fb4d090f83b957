//! Apache Kafka for the tests: single-node KRaft brokers and three-node clusters on free
//! loopback ports, each in its own directory, stopped when dropped or when the test process
//! dies.
//!
//! The broker's jars come from `scripts/kafka.sh fetch` (Maven, cached under
//! `~/.cache/keywatch/`; `KEYWATCH_TEST_KAFKA_LIBS` names another folder) and run on the
//! machine's Java (`JAVA`, else `java`). Storage is formatted once per node id and Kafka
//! version (the formatted directory is cached beside the jars) and copied for every broker:
//! formatting costs a JVM start of its own, and a test starts many brokers.
#![allow(dead_code)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;

/// All test clusters share this id (base64 of 16 bytes, as Kafka wants): the nodes of a
/// cluster must agree on it, and separate clusters never meet.
const CLUSTER_ID: &str = "a2V5d2F0Y2gtdGVzdHMtMQ";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn java() -> String {
    std::env::var("JAVA").unwrap_or_else(|_| "java".to_owned())
}

/// The folder of the broker's jars, fetched on first use.
pub fn libs() -> &'static Path {
    static LIBS: OnceLock<PathBuf> = OnceLock::new();
    LIBS.get_or_init(|| {
        if let Ok(dir) = std::env::var("KEYWATCH_TEST_KAFKA_LIBS") {
            return PathBuf::from(dir);
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg("fetch")
            .stderr(Stdio::inherit())
            .output()
            .expect("running scripts/kafka.sh fetch");
        assert!(
            out.status.success(),
            "scripts/kafka.sh fetch failed (Maven and Java are needed)"
        );
        let dir = String::from_utf8(out.stdout).unwrap();
        PathBuf::from(
            dir.lines()
                .last()
                .expect("kafka.sh printed no folder")
                .trim(),
        )
    })
}

/// A formatted, never-started storage directory for `node_id`.
fn template(node_id: u32) -> PathBuf {
    let libs = libs();
    let path = libs
        .parent()
        .unwrap()
        .join(format!("formatted-node-{node_id}"));
    if path.join("meta.properties").exists() {
        return path;
    }
    let work = libs.parent().unwrap().join(format!(
        "formatting-{node_id}-{}-{}",
        std::process::id(),
        unique("t")
    ));
    std::fs::create_dir_all(&work).unwrap();
    let data = work.join("data");
    // A static quorum (controller.quorum.voters) rather than --standalone: the formatted
    // directory then records no controller address, so it can be copied to any ports.
    let props = work.join("server.properties");
    std::fs::write(
        &props,
        format!(
            "process.roles=broker,controller\nnode.id={node_id}\n\
             controller.quorum.voters={node_id}@127.0.0.1:1\n\
             listeners=PLAINTEXT://127.0.0.1:2,CONTROLLER://127.0.0.1:1\n\
             controller.listener.names=CONTROLLER\nlog.dirs={}\n",
            data.display()
        ),
    )
    .unwrap();
    let out = Command::new(java())
        .arg("-cp")
        .arg(libs.join("*"))
        .args(["kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c"])
        .arg(&props)
        .output()
        .expect("running java (Java 17 or later is needed for Kafka 4)");
    assert!(
        out.status.success(),
        "formatting Kafka storage: {}",
        String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr)
    );
    // Another test process may have won the race; either copy is as good.
    if std::fs::rename(&data, &path).is_err() {
        assert!(path.join("meta.properties").exists());
    }
    let _ = std::fs::remove_dir_all(&work);
    path
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// One Kafka node (broker and controller in one JVM).
struct Node {
    id: u32,
    port: u16,
    controller_port: u16,
    dir: PathBuf,
    java: Option<Child>,
    /// Kills the JVM if the test process dies without dropping the node (a panic in another
    /// thread, a signal): it waits for its stdin, which closes when this process is gone.
    watchdog: Option<(Child, ChildStdin)>,
}

impl Node {
    fn configure(&self, voters: &str, replication: usize, extra: &str) {
        let dir = &self.dir;
        let data = dir.join("data");
        if !data.exists() {
            copy_dir(&template(self.id), &data);
        }
        let min_isr = replication.min(2);
        std::fs::write(
            dir.join("server.properties"),
            format!(
                "process.roles=broker,controller\n\
                 node.id={id}\n\
                 controller.quorum.voters={voters}\n\
                 listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}\n\
                 advertised.listeners=PLAINTEXT://127.0.0.1:{port}\n\
                 controller.listener.names=CONTROLLER\n\
                 inter.broker.listener.name=PLAINTEXT\n\
                 listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
                 log.dirs={data}\n\
                 num.partitions=1\n\
                 default.replication.factor={replication}\n\
                 min.insync.replicas={min_isr}\n\
                 offsets.topic.replication.factor={replication}\n\
                 offsets.topic.num.partitions=4\n\
                 transaction.state.log.replication.factor={replication}\n\
                 transaction.state.log.min.isr={min_isr}\n\
                 transaction.state.log.num.partitions=4\n\
                 share.coordinator.state.topic.replication.factor={replication}\n\
                 share.coordinator.state.topic.min.isr={min_isr}\n\
                 group.initial.rebalance.delay.ms=0\n\
                 # Tests set short session timeouts so that a killed member leaves quickly.\n\
                 group.min.session.timeout.ms=1000\n\
                 group.consumer.min.session.timeout.ms=1000\n\
                 group.consumer.session.timeout.ms=6000\n\
                 group.consumer.min.heartbeat.interval.ms=500\n\
                 group.consumer.heartbeat.interval.ms=1000\n\
                 # Quick failover in the cluster tests.\n\
                 broker.session.timeout.ms=3000\n\
                 broker.heartbeat.interval.ms=500\n\
                 {extra}\n",
                id = self.id,
                port = self.port,
                cport = self.controller_port,
                data = data.display(),
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("log4j2.properties"),
            format!(
                "appender.file.type = File\n\
                 appender.file.name = file\n\
                 appender.file.fileName = {}\n\
                 appender.file.layout.type = PatternLayout\n\
                 appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
                 rootLogger.level = INFO\n\
                 rootLogger.appenderRef.file.ref = file\n",
                dir.join("server.log").display()
            ),
        )
        .unwrap();
    }

    fn spawn(&mut self) {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))
            .unwrap();
        let java = Command::new(java())
            // Small heap, serial GC: many brokers share two cores in the tests.
            .args(["-Xms128m", "-Xmx512m", "-XX:+UseSerialGC"])
            .arg(format!(
                "-Dlog4j2.configurationFile={}",
                self.dir.join("log4j2.properties").display()
            ))
            .arg("-cp")
            .arg(libs().join("*"))
            .arg("kafka.Kafka")
            .arg(self.dir.join("server.properties"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("starting Kafka (java on PATH; scripts/kafka.sh fetch)");
        let mut watchdog = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "read _ignored; kill -9 {} 2>/dev/null; exit 0",
                java.id()
            ))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stdin = watchdog.stdin.take().unwrap();
        self.java = Some(java);
        self.watchdog = Some((watchdog, stdin));
    }

    fn wait_listening(&mut self) {
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if let Some(status) = self.java.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!(
                    "kafka node {} exited ({status}): see {}",
                    self.id,
                    self.dir.join("server.log").display()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "kafka node {} did not start: see {}",
                self.id,
                self.dir.join("server.log").display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn disarm_watchdog(&mut self) {
        if let Some((mut w, stdin)) = self.watchdog.take() {
            let _ = w.kill();
            let _ = w.wait();
            drop(stdin);
        }
    }

    /// A clean shutdown (SIGTERM), as an operator's restart does.
    fn stop(&mut self) {
        self.disarm_watchdog();
        if let Some(mut c) = self.java.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let start = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if start.elapsed() > Duration::from_secs(30) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// kill -9: a crash, with no controlled shutdown.
    fn kill(&mut self) {
        self.disarm_watchdog();
        if let Some(mut c) = self.java.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A single-node Apache Kafka (KRaft, broker and controller in one process).
pub struct Broker {
    pub port: u16,
    node: Node,
    /// The temporary folder of a broker started with [`Broker::start_temp`].
    _temp: Option<tempfile::TempDir>,
}

impl Broker {
    /// A broker whose files live in a fresh folder under `dir`.
    pub fn start(dir: &Path) -> Broker {
        Self::start_with(dir, "")
    }

    /// With extra lines of `server.properties` (later keys override earlier ones).
    pub fn start_with(dir: &Path, extra: &str) -> Broker {
        let port = free_port();
        let controller_port = free_port();
        let dir = dir.join(format!("kafka-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let node = Node {
            id: 1,
            port,
            controller_port,
            dir,
            java: None,
            watchdog: None,
        };
        node.configure(&format!("1@127.0.0.1:{controller_port}"), 1, extra);
        Self::launch(node)
    }

    fn launch(mut node: Node) -> Broker {
        let port = node.port;
        let start = Instant::now();
        node.spawn();
        node.wait_listening();
        let b = Broker {
            port,
            node,
            _temp: None,
        };
        wait_for_brokers(&b.brokers(), 1);
        eprintln!(
            "kafka on {} ready in {:.1} s",
            b.brokers(),
            start.elapsed().as_secs_f64()
        );
        b
    }

    /// A broker whose client listener (the returned port) speaks SASL_SSL with SCRAM-SHA-512
    /// only: a certificate for 127.0.0.1 made with openssl (the CA file clients trust is
    /// returned), and one user, `user` with `password`, added when the storage is formatted.
    /// The brokers' own traffic stays on a plaintext listener.
    pub fn start_sasl_ssl(dir: &Path, user: &str, password: &str) -> (Broker, PathBuf) {
        let port = free_port();
        let internal = free_port();
        let controller_port = free_port();
        let dir = dir.join(format!("kafka-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        let out = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args(["-subj", "/CN=127.0.0.1"])
            .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl (scripts/test.sh installs it)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Kafka's PEM keystore: the private key (PKCS#8, unencrypted) then the certificate.
        let keystore = dir.join("keystore.pem");
        std::fs::write(
            &keystore,
            std::fs::read_to_string(&key).unwrap() + &std::fs::read_to_string(&cert).unwrap(),
        )
        .unwrap();
        let data = dir.join("data");
        let node = Node {
            id: 1,
            port,
            controller_port,
            dir: dir.clone(),
            java: None,
            watchdog: None,
        };
        let extra = format!(
            "listeners=SASL_SSL://127.0.0.1:{port},PLAINTEXT://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller_port}\n\
             advertised.listeners=SASL_SSL://127.0.0.1:{port},PLAINTEXT://127.0.0.1:{internal}\n\
             listener.security.protocol.map=SASL_SSL:SASL_SSL,PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             sasl.enabled.mechanisms=SCRAM-SHA-512\n\
             listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
             ssl.keystore.type=PEM\n\
             ssl.keystore.location={}\n",
            keystore.display()
        );
        node.configure(&format!("1@127.0.0.1:{controller_port}"), 1, &extra);
        // SCRAM credentials live in the metadata log: added when formatting, so this broker's
        // storage is formatted afresh rather than copied from the template.
        std::fs::remove_dir_all(&data).unwrap();
        let out = Command::new(java())
            .arg("-cp")
            .arg(libs().join("*"))
            .args(["kafka.tools.StorageTool", "format", "-t", CLUSTER_ID, "-c"])
            .arg(dir.join("server.properties"))
            .arg("--add-scram")
            .arg(format!("SCRAM-SHA-512=[name={user},password={password}]"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "formatting Kafka storage with a SCRAM user: {}",
            String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr)
        );
        let b = Self::launch_plain_check(node, internal);
        (b, cert)
    }

    /// Like [`Broker::launch`], with readiness checked on the plaintext listener `internal`.
    fn launch_plain_check(mut node: Node, internal: u16) -> Broker {
        let start = Instant::now();
        node.spawn();
        node.wait_listening();
        let port = node.port;
        wait_for_brokers(&format!("127.0.0.1:{internal}"), 1);
        eprintln!(
            "kafka (SASL_SSL) on 127.0.0.1:{port} ready in {:.1} s",
            start.elapsed().as_secs_f64()
        );
        Broker {
            port,
            node,
            _temp: None,
        }
    }

    /// A broker in a temporary folder of its own, removed when the broker is dropped.
    pub fn start_temp() -> Broker {
        let temp = tempfile::tempdir().unwrap();
        let mut b = Self::start(temp.path());
        b._temp = Some(temp);
        b
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn dir(&self) -> &Path {
        &self.node.dir
    }

    pub fn stop(&mut self) {
        self.node.stop();
    }

    /// A clean restart on the same port, with the same data.
    pub fn restart(&mut self) {
        self.node.stop();
        self.node.spawn();
        self.node.wait_listening();
        wait_for_brokers(&self.brokers(), 1);
    }

    /// kill -9, then start again: the broker recovers its logs.
    pub fn crash_and_restart(&mut self) {
        self.node.kill();
        self.node.spawn();
        self.node.wait_listening();
        wait_for_brokers(&self.brokers(), 1);
    }

    pub fn create_topic(&self, name: &str, partitions: i32) {
        create_topic(&self.brokers(), name, partitions, 1, &[]);
    }

    /// A topic whose messages the broker stores compressed with `codec` (gzip, snappy, lz4,
    /// zstd), whatever the producer sent.
    pub fn create_compressed_topic(&self, name: &str, partitions: i32, codec: &str) {
        create_topic(
            &self.brokers(),
            name,
            partitions,
            1,
            &[("compression.type", codec)],
        );
    }
}

/// Three Kafka nodes, each broker and controller, in one cluster.
pub struct Cluster {
    nodes: Vec<Node>,
}

impl Cluster {
    pub fn start(dir: &Path, size: u32) -> Cluster {
        let ports: Vec<(u16, u16)> = (0..size).map(|_| (free_port(), free_port())).collect();
        let voters = ports
            .iter()
            .enumerate()
            .map(|(i, (_, c))| format!("{}@127.0.0.1:{c}", i + 1))
            .collect::<Vec<_>>()
            .join(",");
        let start = Instant::now();
        let mut nodes: Vec<Node> = ports
            .iter()
            .enumerate()
            .map(|(i, (port, cport))| {
                let dir = dir.join(format!("kafka-node{}-{port}", i + 1));
                std::fs::create_dir_all(&dir).unwrap();
                let node = Node {
                    id: i as u32 + 1,
                    port: *port,
                    controller_port: *cport,
                    dir,
                    java: None,
                    watchdog: None,
                };
                node.configure(&voters, size as usize, "");
                node
            })
            .collect();
        for n in &mut nodes {
            n.spawn();
        }
        for n in &mut nodes {
            n.wait_listening();
        }
        let c = Cluster { nodes };
        wait_for_brokers(&c.brokers(), size as usize);
        eprintln!(
            "kafka cluster of {size} on {} ready in {:.1} s",
            c.brokers(),
            start.elapsed().as_secs_f64()
        );
        c
    }

    /// Every node, as bootstrap servers.
    pub fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A topic replicated to every node, a write needing two in-sync replicas.
    pub fn create_topic(&self, name: &str, partitions: i32) {
        create_topic(
            &self.brokers(),
            name,
            partitions,
            self.nodes.len() as i32,
            &[],
        );
    }

    /// The node id leading `partition` of `topic` (ids count from 1).
    pub fn leader_of(&self, topic: &str, partition: i32) -> u32 {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .unwrap();
        let md = c
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .unwrap();
        let t = &md.topics()[0];
        let p = t.partitions().iter().find(|p| p.id() == partition).unwrap();
        p.leader() as u32
    }

    /// kill -9 of node `id`.
    pub fn kill(&mut self, id: u32) {
        self.nodes[id as usize - 1].kill();
    }

    /// Starts node `id` again after [`Cluster::kill`].
    pub fn restart(&mut self, id: u32) {
        let n = &mut self.nodes[id as usize - 1];
        n.spawn();
        n.wait_listening();
    }
}

fn wait_for_brokers(bootstrap: &str, want: usize) {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Ok(md) = c.fetch_metadata(None, Duration::from_secs(5)) {
            if md.brokers().len() >= want {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "kafka at {bootstrap}: fewer than {want} brokers registered"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn create_topic(
    bootstrap: &str,
    name: &str,
    partitions: i32,
    replication: i32,
    config: &[(&str, &str)],
) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(replication));
    for (k, v) in config {
        topic = topic.set(k, v);
    }
    let res = rt
        .block_on(admin.create_topics([&topic], &AdminOptions::new()))
        .expect("create_topics");
    for r in res {
        r.unwrap_or_else(|(t, e)| panic!("creating topic {t}: {e}"));
    }
    // Wait until every partition has a leader: a producer that starts right away would
    // otherwise see "unknown topic or partition" for a moment.
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let start = Instant::now();
    loop {
        if let Ok(md) = c.fetch_metadata(Some(name), Duration::from_secs(5)) {
            let ready = md.topics().first().is_some_and(|t| {
                t.error().is_none()
                    && t.partitions().len() == partitions as usize
                    && t.partitions().iter().all(|p| p.leader() >= 0)
            });
            if ready {
                return;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "topic {name} has no leaders"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Each partition's low and high watermarks (first offset held, offset after the last), by
/// partition.
fn watermarks(bootstrap: &str, topic: &str) -> Vec<(i32, i64, i64)> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut out: Vec<(i32, i64, i64)> = md.topics()[0]
        .partitions()
        .iter()
        .map(|p| {
            let (lo, hi) = c
                .fetch_watermarks(topic, p.id(), Duration::from_secs(10))
                .unwrap();
            (p.id(), lo, hi)
        })
        .collect();
    out.sort_unstable();
    out
}

/// How many messages `topic` holds (high minus low watermark, over its partitions).
pub fn messages_in(bootstrap: &str, topic: &str) -> i64 {
    watermarks(bootstrap, topic)
        .iter()
        .map(|(_, lo, hi)| hi - lo)
        .sum()
}

/// Each partition's high watermark (the offset after its last message), by partition.
pub fn end_offsets(bootstrap: &str, topic: &str) -> Vec<(i32, i64)> {
    watermarks(bootstrap, topic)
        .into_iter()
        .map(|(p, _, hi)| (p, hi))
        .collect()
}

/// A random-ish name for topics and groups, unique per test run.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}
