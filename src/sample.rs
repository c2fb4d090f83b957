//! Deterministic generator of realistic gateway access logs.
//!
//! Used for the quick-start sample (`examples/gateway.log`), for tests (scenarios whose truth
//! is known) and for benchmarks. One scenario, rendered in the log format of any preset:
//!
//! - six clients (consumers), each with one or more keys, several hosts and programs;
//! - daily seasonality (office hours, a nightly batch, round-the-clock devices);
//! - `acme-billing` in mid-rotation: old key `A`, new key `B` from 40% of the span on; three
//!   of its five hosts switch to `B` at known times (one of them fumbles the rollover with a
//!   few 401s on `B`), two hosts keep using `A` until the end;
//! - `hooli-sync` is noisy and gets rate limited (429);
//! - one scanning IP presents no key or guessed keys (401; 403 on AWS API Gateway).
//!
//! Everything is derived from the seed: the same options give the same lines. Key material
//! is derived from the client and key label only, so it is the same for every seed.
//! [`generate_sample`] returns the lines with the [`Truth`] that tests assert against.

pub mod scenarios;

use std::io::{self, Write};

/// The presets the generator can render, named like the decoder presets.
pub const PRESETS: [&str; 6] = ["kong", "tyk", "traefik", "envoy", "nginx", "aws-apigw"];

/// 2026-11-20T00:00:00Z, a Friday.
pub const DEFAULT_START_MS: i64 = 1_795_132_800_000;

/// The host name clients call.
pub const API_HOST: &str = "api.example.com";

/// The IP address that scans the API with no key or guessed keys.
pub const SCANNER_IP: &str = "203.0.113.250";

/// The client that is rate limited (429) now and then.
pub const NOISY_CLIENT: &str = "hooli-sync";

/// The client in mid-rotation.
pub const ROTATING_CLIENT: &str = "acme-billing";

#[derive(Debug, Clone, PartialEq)]
pub struct SampleOptions {
    /// One of [`PRESETS`].
    pub preset: String,
    /// Number of lines to generate.
    pub lines: usize,
    pub seed: u64,
    /// Start of the time span, milliseconds since the Unix epoch.
    pub start_ms: i64,
    /// Length of the time span in days.
    pub days: f64,
}

impl Default for SampleOptions {
    fn default() -> Self {
        SampleOptions {
            preset: "kong".to_string(),
            lines: 4000,
            seed: 1,
            start_ms: DEFAULT_START_MS,
            days: 4.0,
        }
    }
}

/// Generated lines and the truth behind them.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// One log line each, without a trailing newline, sorted by time.
    pub lines: Vec<String>,
    pub truth: Truth,
}

/// What a test may assert about a generated sample.
#[derive(Debug, Clone, PartialEq)]
pub struct Truth {
    pub preset: String,
    /// Every event time is in `start_ms..end_ms`.
    pub start_ms: i64,
    pub end_ms: i64,
    pub clients: Vec<ClientTruth>,
    pub rotation: RotationTruth,
    /// Sends no key (kong: no `authenticated_entity`) or guessed keys; every request of it
    /// is rejected (401; 403 "Invalid API Key identifier specified" on aws-apigw).
    pub scanner_ip: String,
    pub scanner_requests: usize,
    /// Guessed keys the scanner presents, as they appear in the log (raw-key presets only;
    /// kong and aws-apigw log no identity for an unknown key).
    pub scanner_keys: Vec<String>,
    /// The client that gets 429s, and how many.
    pub noisy_client: String,
    pub rate_limited: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ClientTruth {
    /// Consumer name (kong `consumer.username`, tyk `alias`).
    pub name: String,
    /// Kong `consumer.id`.
    pub consumer_id: String,
    pub keys: Vec<KeyTruth>,
    /// Source IPs, in the order of the scenario's table.
    pub hosts: Vec<String>,
    pub requests: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyTruth {
    pub client: String,
    /// "A" / "B" for the rotating client, "primary" / "batch" for the others.
    pub label: String,
    /// What the log carries for this key in this preset: the Kong credential id
    /// (`authenticated_entity.id`), the AWS `apiKeyId`, or the raw key (tyk, traefik, envoy,
    /// nginx), which a decoder must fingerprint.
    pub identity: String,
    /// Whether `identity` is raw key material.
    pub raw: bool,
    /// Requests presenting this key (any status).
    pub requests: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RotationTruth {
    pub client: String,
    pub old_key: KeyTruth,
    pub new_key: KeyTruth,
    /// The new key exists from here on; before it, the client uses only the old key.
    pub start_ms: i64,
    /// Hosts that switch to the new key: from `switch_ms` on they send only the new key.
    pub switched: Vec<HostSwitch>,
    /// Hosts that send only the old key until the end.
    pub laggards: Vec<String>,
    /// The switched host whose first requests with the new key got 401 (the upstream did not
    /// know the key yet) during `switch_ms..fumble_until_ms`.
    pub fumbled_host: String,
    pub fumble_until_ms: i64,
    pub fumbled_401s: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HostSwitch {
    pub ip: String,
    /// Time of the host's first request with the new key; with at least 200 lines and 12 h
    /// there is a request with the new key at exactly this time.
    pub switch_ms: i64,
}

/// Generates the sample's lines: one log line each, no trailing newline, sorted by time.
pub fn generate(opts: &SampleOptions) -> Result<Vec<String>, String> {
    generate_sample(opts).map(|s| s.lines)
}

/// Generates the lines and the truth behind them.
pub fn generate_sample(opts: &SampleOptions) -> Result<Sample, String> {
    let (preset, events, truth) = plan(opts)?;
    let mut buf = Vec::with_capacity(1024);
    let lines = events
        .iter()
        .map(|ev| {
            buf.clear();
            render(preset, ev, &mut buf);
            String::from_utf8(buf.clone()).expect("rendered JSON is UTF-8")
        })
        .collect();
    Ok(Sample { lines, truth })
}

/// The truth of the scenario for these options (generates the events, not the lines).
pub fn scenario_truth(opts: &SampleOptions) -> Result<Truth, String> {
    plan(opts).map(|(_, _, truth)| truth)
}

/// Writes the lines joined by '\n' with a final newline (nothing for zero lines).
/// An unknown preset or bad options give an `InvalidInput` error.
pub fn write_to(opts: &SampleOptions, w: &mut impl Write) -> io::Result<()> {
    let (preset, events, _) =
        plan(opts).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let mut buf = Vec::with_capacity(64 * 1024);
    for ev in &events {
        render(preset, ev, &mut buf);
        buf.push(b'\n');
        if buf.len() >= 60 * 1024 {
            w.write_all(&buf)?;
            buf.clear();
        }
    }
    w.write_all(&buf)?;
    w.flush()
}

// ---------------------------------------------------------------------------------------------
// The scenario's tables.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Preset {
    Kong,
    Tyk,
    Traefik,
    Envoy,
    Nginx,
    AwsApigw,
}

impl Preset {
    fn parse(name: &str) -> Result<Preset, String> {
        match name.trim().to_ascii_lowercase().as_str() {
            "kong" => Ok(Preset::Kong),
            "tyk" => Ok(Preset::Tyk),
            "traefik" => Ok(Preset::Traefik),
            "envoy" => Ok(Preset::Envoy),
            "nginx" => Ok(Preset::Nginx),
            "aws-apigw" => Ok(Preset::AwsApigw),
            _ => Err(format!(
                "unknown sample preset `{name}`; expected one of: {}",
                PRESETS.join(", ")
            )),
        }
    }

    fn name(self) -> &'static str {
        PRESETS[self as usize]
    }

    fn logs_raw_keys(self) -> bool {
        !matches!(self, Preset::Kong | Preset::AwsApigw)
    }
}

struct Service {
    name: &'static str,
    host: &'static str,
    port: u16,
    upstream: &'static str,
}

const SERVICES: [Service; 6] = [
    Service {
        name: "orders-api",
        host: "orders.svc",
        port: 8080,
        upstream: "10.0.3.17",
    },
    Service {
        name: "billing-api",
        host: "billing.svc",
        port: 8080,
        upstream: "10.0.3.21",
    },
    Service {
        name: "reports-api",
        host: "reports.svc",
        port: 9000,
        upstream: "10.0.3.34",
    },
    Service {
        name: "crm-api",
        host: "crm.svc",
        port: 8080,
        upstream: "10.0.3.40",
    },
    Service {
        name: "inventory-api",
        host: "inventory.svc",
        port: 8081,
        upstream: "10.0.3.52",
    },
    Service {
        name: "iot-api",
        host: "iot.svc",
        port: 7000,
        upstream: "10.0.4.8",
    },
];

struct Route {
    name: &'static str,
    paths: &'static [&'static str],
    service: usize,
}

const R_ORDERS: usize = 0;
const R_INVOICES: usize = 1;
const R_PAYMENTS: usize = 2;
const R_REPORTS: usize = 3;
const R_CUSTOMERS: usize = 4;
const R_CATALOG: usize = 5;
const R_INVENTORY: usize = 6;
const R_IOT: usize = 7;

const ROUTES: [Route; 8] = [
    Route {
        name: "orders",
        paths: &["/v1/orders"],
        service: 0,
    },
    Route {
        name: "invoices",
        paths: &["/v1/invoices"],
        service: 1,
    },
    Route {
        name: "payments",
        paths: &["/v1/payments"],
        service: 1,
    },
    Route {
        name: "reports",
        paths: &["/v1/reports"],
        service: 2,
    },
    Route {
        name: "customers",
        paths: &["/v1/customers"],
        service: 3,
    },
    Route {
        name: "catalog",
        paths: &["/v1/catalog"],
        service: 0,
    },
    Route {
        name: "inventory",
        paths: &["/v1/inventory"],
        service: 4,
    },
    Route {
        name: "iot",
        paths: &["/v1/telemetry", "/v1/devices"],
        service: 5,
    },
];

/// A request a client makes. In `template`, `{id}` becomes a numeric id, `{page}` a page
/// number and `{date}` the day of the request.
#[derive(Debug)]
struct Endpoint {
    method: &'static str,
    template: &'static str,
    weight: u32,
    /// Median upstream latency in milliseconds.
    median_ms: f64,
    route: usize,
}

const fn ep(
    method: &'static str,
    template: &'static str,
    weight: u32,
    median_ms: f64,
    route: usize,
) -> Endpoint {
    Endpoint {
        method,
        template,
        weight,
        median_ms,
        route,
    }
}

struct HostDef {
    ip: &'static str,
    ua: &'static str,
    /// Index into the client's keys.
    key: usize,
}

const fn host(ip: &'static str, ua: &'static str, key: usize) -> HostDef {
    HostDef { ip, ua, key }
}

#[derive(Clone, Copy)]
enum Profile {
    /// Working hours (UTC), quieter at weekends.
    Office,
    /// Round the clock.
    Flat,
    /// Office hours plus a nightly batch between 01:00 and 02:30 UTC.
    NightlyBatch,
}

struct ClientDef {
    name: &'static str,
    share: u32,
    profile: Profile,
    keys: &'static [&'static str],
    hosts: &'static [HostDef],
    endpoints: &'static [Endpoint],
}

const UA_PYTHON: &str = "python-requests/2.31.0";
const UA_OKHTTP: &str = "okhttp/4.12.0";
const UA_GO: &str = "Go-http-client/1.1";
const UA_CURL: &str = "curl/8.5.0";
const UA_CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0.0.0 Safari/537.36";
/// A browser UA with quotes and a backslash, to exercise escaping.
const UA_PORTAL: &str = "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.2 Safari/605.1.15 UmbrellaPortal/\"2.4\" (build\\2207)";
const UA_AGENT: &str = "soylent-agent/3.2.1 (linux; arm64)";

const ACME: usize = 0;
const HOOLI: usize = 4;
const KEY_A: usize = 0;
const KEY_B: usize = 1;

/// acme-billing's hosts: 0, 1 and 4 switch to key B, 2 and 3 keep key A.
const SWITCHED_HOSTS: [usize; 3] = [0, 1, 4];
const LAGGARD_HOSTS: [usize; 2] = [2, 3];
/// When each switched host switches, as a fraction of the span after the rotation start.
const SWITCH_AFTER: [f64; 3] = [0.05, 0.14, 0.27];
const FUMBLED_HOST: usize = 0;
const FUMBLE_WINDOW_MS: i64 = 10 * 60_000;
const ROTATION_AT: f64 = 0.4;

const CLIENTS: [ClientDef; 6] = [
    ClientDef {
        name: "acme-billing",
        share: 26,
        profile: Profile::Office,
        keys: &["A", "B"],
        hosts: &[
            host("10.20.1.11", UA_PYTHON, KEY_A),
            host("10.20.1.12", UA_PYTHON, KEY_A),
            host("10.20.1.13", UA_PYTHON, KEY_A),
            host("198.51.100.23", UA_GO, KEY_A),
            host("198.51.100.24", UA_CURL, KEY_A),
        ],
        endpoints: &[
            ep("GET", "/v1/invoices?page={page}", 30, 45.0, R_INVOICES),
            ep("GET", "/v1/invoices/{id}", 30, 25.0, R_INVOICES),
            ep("POST", "/v1/invoices", 12, 90.0, R_INVOICES),
            ep("GET", "/v1/payments?status=pending", 10, 60.0, R_PAYMENTS),
            ep("POST", "/v1/payments", 8, 140.0, R_PAYMENTS),
            ep("DELETE", "/v1/invoices/{id}", 3, 30.0, R_INVOICES),
        ],
    },
    ClientDef {
        name: "globex-mobile",
        share: 22,
        profile: Profile::Office,
        keys: &["primary"],
        hosts: &[
            host("203.0.113.10", UA_OKHTTP, 0),
            host("203.0.113.45", UA_OKHTTP, 0),
            host("203.0.113.77", UA_OKHTTP, 0),
            host("203.0.113.129", UA_OKHTTP, 0),
        ],
        endpoints: &[
            ep("GET", "/v1/orders", 25, 35.0, R_ORDERS),
            ep("GET", "/v1/orders/{id}", 35, 20.0, R_ORDERS),
            ep("POST", "/v1/orders", 15, 110.0, R_ORDERS),
            ep("GET", "/v1/catalog?page={page}", 20, 30.0, R_CATALOG),
            ep("DELETE", "/v1/orders/{id}", 5, 40.0, R_ORDERS),
        ],
    },
    ClientDef {
        name: "initech-reports",
        share: 10,
        profile: Profile::Office,
        keys: &["primary"],
        hosts: &[host("192.0.2.40", UA_GO, 0), host("192.0.2.41", UA_GO, 0)],
        endpoints: &[
            ep("GET", "/v1/reports/daily?date={date}", 40, 190.0, R_REPORTS),
            ep("GET", "/v1/invoices?page={page}", 30, 45.0, R_INVOICES),
            ep("GET", "/v1/orders?updated_since={date}", 30, 70.0, R_ORDERS),
        ],
    },
    ClientDef {
        name: "umbrella-web",
        share: 14,
        profile: Profile::Office,
        keys: &["primary"],
        hosts: &[
            host("10.44.0.5", UA_CHROME, 0),
            host("10.44.0.6", UA_PORTAL, 0),
        ],
        endpoints: &[
            ep("GET", "/v1/customers/{id}", 40, 22.0, R_CUSTOMERS),
            ep(
                "GET",
                "/v1/orders?status=open&customer={id}",
                30,
                55.0,
                R_ORDERS,
            ),
            ep("POST", "/v1/customers", 10, 80.0, R_CUSTOMERS),
            ep("GET", "/v1/invoices/{id}", 20, 25.0, R_INVOICES),
        ],
    },
    ClientDef {
        name: "hooli-sync",
        share: 18,
        profile: Profile::NightlyBatch,
        keys: &["primary", "batch"],
        hosts: &[
            host("198.51.100.60", UA_PYTHON, 0),
            host("198.51.100.61", UA_CURL, 1),
        ],
        endpoints: &[
            ep(
                "GET",
                "/v1/orders?page={page}&per_page=100",
                40,
                65.0,
                R_ORDERS,
            ),
            ep("GET", "/v1/inventory/{id}", 35, 18.0, R_INVENTORY),
            ep("POST", "/v1/inventory/sync", 20, 160.0, R_INVENTORY),
            ep("DELETE", "/v1/inventory/{id}", 5, 25.0, R_INVENTORY),
        ],
    },
    ClientDef {
        name: "soylent-iot",
        share: 9,
        profile: Profile::Flat,
        keys: &["primary"],
        hosts: &[
            host("2001:db8::17", UA_AGENT, 0),
            host("2001:db8::2a", UA_AGENT, 0),
            host("10.60.3.9", UA_GO, 0),
        ],
        endpoints: &[
            ep("POST", "/v1/telemetry", 70, 15.0, R_IOT),
            ep("GET", "/v1/devices/{id}/config", 30, 20.0, R_IOT),
        ],
    },
];

/// Share of the scanner, in the same unit as the clients' shares (which add up to 99).
const SCANNER_SHARE: u32 = 1;
const SCANNER_UAS: [&str; 3] = [UA_CURL, UA_PYTHON, "Mozilla/5.0 zgrab/0.x"];
const SCANNER_ENDPOINTS: [Endpoint; 4] = [
    ep("GET", "/v1/orders", 4, 5.0, R_ORDERS),
    ep("GET", "/v1/customers?limit=1000", 3, 5.0, R_CUSTOMERS),
    ep("GET", "/v1/invoices?page={page}", 2, 5.0, R_INVOICES),
    ep("POST", "/v1/payments", 1, 5.0, R_PAYMENTS),
];
/// The scanner comes three times, at these fractions of the span, for up to 15 minutes.
const SCANNER_BURSTS: [f64; 3] = [0.22, 0.57, 0.83];
/// Guessed keys besides generated lookalikes.
const SCANNER_WEAK_KEYS: [&str; 2] = ["test", "12345678"];
const SCANNER_LOOKALIKES: usize = 3;

const ENVOY_PODS: [&str; 2] = ["envoy-gw-7c9f5d8b4-2xk4q", "envoy-gw-7c9f5d8b4-hm8rz"];
const NGINX_HOSTS: [&str; 2] = ["gw-edge-1", "gw-edge-2"];

// ---------------------------------------------------------------------------------------------
// Identities, derived from names so that they are the same for every seed.

/// SplitMix64: tiny, fast, and stable forever (the sample file must not change when a
/// dependency does).
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x6b65_7977_6174_6368) // "keywatch"
    }

    /// A stream derived from a name (FNV-1a), for identities.
    fn named(name: &str) -> Rng {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        Rng::new(h)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    fn range(&mut self, lo: i64, hi: i64) -> i64 {
        debug_assert!(hi > lo);
        lo + self.below((hi - lo) as u64) as i64
    }

    /// Uniform in `[0, 1)`.
    fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn chance(&mut self, p: f64) -> bool {
        self.f64() < p
    }

    /// Standard normal (Box-Muller).
    fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.f64();
        let u2 = self.f64();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    fn weighted(&mut self, weights: impl Iterator<Item = u32> + Clone) -> usize {
        let total: u64 = weights.clone().map(u64::from).sum();
        let mut x = self.below(total);
        for (i, w) in weights.enumerate() {
            if x < u64::from(w) {
                return i;
            }
            x -= u64::from(w);
        }
        unreachable!("weights sum to total")
    }

    fn chars(&mut self, alphabet: &[u8], n: usize) -> String {
        (0..n)
            .map(|_| alphabet[self.below(alphabet.len() as u64) as usize] as char)
            .collect()
    }

    fn u128(&mut self) -> u128 {
        (u128::from(self.next_u64()) << 64) | u128::from(self.next_u64())
    }
}

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
const LOWER_ALNUM: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// A version-4-looking UUID.
fn uuid(x: u128) -> String {
    let x = (x & !(0xf << 76) & !(0x3 << 62)) | (0x4 << 76) | (0x2 << 62);
    let h = format!("{x:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn named_uuid(name: &str) -> String {
    uuid(Rng::named(name).u128())
}

fn named_hex(name: &str, n: usize) -> String {
    Rng::named(name).chars(b"0123456789abcdef", n)
}

/// What a preset's log carries for a client's key, and whether it is raw key material.
fn key_identity(preset: Preset, client: &str, label: &str) -> (String, bool) {
    match preset {
        Preset::Kong => (
            named_uuid(&format!("kong-credential/{client}/{label}")),
            false,
        ),
        Preset::AwsApigw => (
            Rng::named(&format!("aws-key/{client}/{label}")).chars(LOWER_ALNUM, 10),
            false,
        ),
        Preset::Tyk => (
            format!(
                "tyk_{}",
                Rng::named(&format!("tyk-key/{client}/{label}")).chars(BASE62, 32)
            ),
            true,
        ),
        Preset::Traefik | Preset::Envoy | Preset::Nginx => (
            format!(
                "kw_live_{}",
                Rng::named(&format!("raw-key/{client}/{label}")).chars(BASE62, 32)
            ),
            true,
        ),
    }
}

/// Guessed keys of the scanner, for the raw-key presets.
fn scanner_keys(preset: Preset) -> Vec<String> {
    if !preset.logs_raw_keys() {
        return Vec::new();
    }
    let prefix = if preset == Preset::Tyk {
        "tyk_"
    } else {
        "kw_live_"
    };
    let mut keys: Vec<String> = (0..SCANNER_LOOKALIKES)
        .map(|i| {
            format!(
                "{prefix}{}",
                Rng::named(&format!("scanner-key/{i}")).chars(BASE62, 32)
            )
        })
        .collect();
    keys.extend(SCANNER_WEAK_KEYS.iter().map(|k| k.to_string()));
    keys
}

// ---------------------------------------------------------------------------------------------
// Events: the scenario, independent of the preset.

#[derive(Debug, Clone, Copy, PartialEq)]
enum KeyRef {
    None,
    Known {
        client: usize,
        key: usize,
    },
    /// Index into the scanner's guessed keys.
    Guessed(usize),
}

/// Who sends a request: a client's host, or the scanner.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Actor {
    Client { client: usize, host: usize },
    Scanner,
}

#[derive(Debug, Clone)]
struct Event {
    t_ms: i64,
    /// Nanoseconds within the millisecond, for the presets with nanosecond timestamps.
    sub_ns: u32,
    actor: Actor,
    ip: &'static str,
    ua: &'static str,
    key: KeyRef,
    endpoint: &'static Endpoint,
    /// The request path with its query string.
    path: String,
    status: u16,
    /// The gateway answered itself (auth failure, rate limit): no upstream.
    by_gateway: bool,
    /// Time in the gateway and in the upstream, milliseconds.
    gateway_ms: u32,
    upstream_ms: u32,
    /// Request size with headers, and of the body alone.
    req_size: u32,
    body_size: u32,
    resp_size: u32,
    request_id: u128,
    client_port: u16,
    /// Which of the two gateway nodes saw the request.
    node: usize,
}

/// The rotation's schedule for a time span.
struct Schedule {
    start_ms: i64,
    end_ms: i64,
    rotation_ms: i64,
    /// Per acme-billing host: when it switches to key B, if it does.
    switch_ms: [Option<i64>; 5],
}

impl Schedule {
    fn new(start_ms: i64, span_ms: i64) -> Schedule {
        let at = |f: f64| start_ms + (span_ms as f64 * f).round() as i64;
        let rotation_ms = at(ROTATION_AT);
        let mut switch_ms = [None; 5];
        for (i, &h) in SWITCHED_HOSTS.iter().enumerate() {
            // Whole minutes, like a deploy.
            let t = at(ROTATION_AT + SWITCH_AFTER[i]);
            switch_ms[h] = Some(t - t.rem_euclid(60_000));
        }
        Schedule {
            start_ms,
            end_ms: start_ms + span_ms,
            rotation_ms,
            switch_ms,
        }
    }

    /// The key an acme-billing host sends at `t`.
    fn acme_key(&self, host: usize, t: i64) -> usize {
        match self.switch_ms[host] {
            Some(s) if t >= s => KEY_B,
            _ => KEY_A,
        }
    }

    fn fumbled(&self, host: usize, key: usize, t: i64) -> bool {
        host == FUMBLED_HOST
            && key == KEY_B
            && self.switch_ms[host].is_some_and(|s| (s..s + FUMBLE_WINDOW_MS).contains(&t))
    }
}

const DAY_MS: i64 = 86_400_000;

/// Relative traffic at `t` for a profile, in `(0, 1]`.
fn activity(profile: Profile, t_ms: i64) -> f64 {
    let days = t_ms.div_euclid(DAY_MS);
    let hour = t_ms.rem_euclid(DAY_MS) as f64 / 3_600_000.0;
    let weekend = matches!((days + 4).rem_euclid(7), 0 | 6);
    let office = if (7.0..20.0).contains(&hour) {
        let x = (hour - 7.0) / 13.0;
        0.5 - 0.5 * (std::f64::consts::TAU * x).cos()
    } else {
        0.0
    };
    match profile {
        Profile::Office => {
            let w = 0.08 + 0.92 * office;
            if weekend {
                w * 0.35
            } else {
                w
            }
        }
        Profile::Flat => 0.85 + 0.15 * office,
        Profile::NightlyBatch => {
            if (1.0..2.5).contains(&hour) {
                1.0
            } else {
                (0.05 + 0.45 * office) * if weekend { 0.5 } else { 1.0 }
            }
        }
    }
}

fn plan(opts: &SampleOptions) -> Result<(Preset, Vec<Event>, Truth), String> {
    let preset = Preset::parse(&opts.preset)?;
    if !opts.days.is_finite() || opts.days <= 0.0 {
        return Err(format!(
            "sample days must be a positive number, not {}",
            opts.days
        ));
    }
    let span_ms = (opts.days * DAY_MS as f64).round();
    if span_ms < 3_600_000.0 {
        return Err(format!(
            "sample span must be at least one hour, not {} days",
            opts.days
        ));
    }
    if span_ms > 3650.0 * DAY_MS as f64 {
        return Err(format!(
            "sample span must be at most 3650 days, not {}",
            opts.days
        ));
    }
    let span_ms = span_ms as i64;
    let end_ok = opts
        .start_ms
        .checked_add(span_ms)
        .is_some_and(|e| e < 253_402_300_800_000);
    if opts.start_ms < 0 || !end_ok {
        return Err("sample start must be between 1970 and 9999".to_string());
    }
    let sched = Schedule::new(opts.start_ms, span_ms);
    let mut rng = Rng::new(opts.seed);
    let mut events = anchors(&sched, opts.lines, span_ms, &mut rng);
    let shares = CLIENTS.iter().map(|c| c.share).chain([SCANNER_SHARE]);
    while events.len() < opts.lines {
        let who = rng.weighted(shares.clone());
        let ev = if who == CLIENTS.len() {
            scanner_event(&sched, &mut rng)
        } else {
            let c = &CLIENTS[who];
            let t = loop {
                let t = rng.range(sched.start_ms, sched.end_ms);
                if rng.f64() < activity(c.profile, t) {
                    break t;
                }
            };
            let host = rng.below(c.hosts.len() as u64) as usize;
            client_event(&sched, who, host, t, None, &mut rng)
        };
        events.push(ev);
    }
    events.sort_by_key(|e| (e.t_ms, e.sub_ns));
    let truth = truth(preset, &sched, &events);
    Ok((preset, events, truth))
}

/// Requests at known times that make the rotation's truth crisp: each switched host's last
/// request with A just before its switch and its first with B at the switch, the fumbled
/// rollover, and the laggards' requests near the end.
fn anchors(sched: &Schedule, lines: usize, span_ms: i64, rng: &mut Rng) -> Vec<Event> {
    if lines < 200 || span_ms < DAY_MS / 2 {
        return Vec::new();
    }
    let mut out = Vec::new();
    for &h in &SWITCHED_HOSTS {
        let s = sched.switch_ms[h].expect("switched host has a switch time");
        out.push(client_event(sched, ACME, h, s - 180_000, None, rng));
        if h == FUMBLED_HOST {
            for dt in [0, 35_000, 110_000, 290_000] {
                out.push(client_event(sched, ACME, h, s + dt, None, rng));
            }
            out.push(client_event(
                sched,
                ACME,
                h,
                s + FUMBLE_WINDOW_MS + 60_000,
                Some(200),
                rng,
            ));
        } else {
            out.push(client_event(sched, ACME, h, s, None, rng));
        }
    }
    for (i, &h) in LAGGARD_HOSTS.iter().enumerate() {
        let t = sched.end_ms - [20 * 60_000, 47 * 60_000][i];
        out.push(client_event(sched, ACME, h, t, None, rng));
    }
    out
}

fn render_path(template: &str, t_ms: i64, rng: &mut Rng) -> String {
    let mut out = String::with_capacity(template.len() + 8);
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let j = rest[i..].find('}').map_or(rest.len(), |j| i + j + 1);
        match &rest[i..j] {
            "{id}" => out.push_str(&rng.range(10_000, 9_999_999).to_string()),
            "{page}" => out.push_str(&rng.range(1, 9).to_string()),
            "{date}" => {
                let (y, m, d) = civil_from_days(t_ms.div_euclid(DAY_MS));
                out.push_str(&format!("{y:04}-{m:02}-{d:02}"));
            }
            other => out.push_str(other),
        }
        rest = &rest[j..];
    }
    out.push_str(rest);
    out
}

fn lognormal_ms(median: f64, rng: &mut Rng) -> u32 {
    (median * (0.55 * rng.normal()).exp())
        .clamp(1.0, 30_000.0)
        .round() as u32
}

fn base_event(
    rng: &mut Rng,
    t_ms: i64,
    actor: Actor,
    ip: &'static str,
    ua: &'static str,
    endpoint: &'static Endpoint,
) -> Event {
    let path = render_path(endpoint.template, t_ms, rng);
    Event {
        t_ms,
        sub_ns: rng.below(1_000_000) as u32,
        actor,
        ip,
        ua,
        key: KeyRef::None,
        endpoint,
        path,
        status: 0,
        by_gateway: false,
        gateway_ms: rng.below(4) as u32,
        upstream_ms: 0,
        req_size: 0,
        body_size: 0,
        resp_size: 0,
        request_id: rng.u128(),
        client_port: rng.range(32_768, 61_000) as u16,
        node: rng.below(2) as usize,
    }
}

fn client_event(
    sched: &Schedule,
    client: usize,
    host: usize,
    t_ms: i64,
    force_status: Option<u16>,
    rng: &mut Rng,
) -> Event {
    let c = &CLIENTS[client];
    let h = &c.hosts[host];
    let endpoint = &c.endpoints[rng.weighted(c.endpoints.iter().map(|e| e.weight))];
    let mut ev = base_event(
        rng,
        t_ms,
        Actor::Client { client, host },
        h.ip,
        h.ua,
        endpoint,
    );
    let key = if client == ACME {
        sched.acme_key(host, t_ms)
    } else {
        h.key
    };
    ev.key = KeyRef::Known { client, key };
    let is_post = endpoint.method == "POST";
    let mut latency_factor = 1.0;
    ev.status = if let Some(s) = force_status {
        s
    } else if client == ACME && sched.fumbled(host, key, t_ms) {
        // The upstream did not know key B yet.
        latency_factor = 0.3;
        401
    } else if client == HOOLI && {
        let hour = t_ms.rem_euclid(DAY_MS) / 3_600_000;
        rng.chance(if hour == 1 || hour == 2 { 0.35 } else { 0.07 })
    } {
        ev.by_gateway = true;
        429
    } else {
        let x = rng.f64();
        if x < 0.008 {
            latency_factor = 3.0;
            500
        } else if x < 0.011 {
            latency_factor = 8.0;
            503
        } else if x < 0.05 && endpoint.template.contains("/{id}") {
            latency_factor = 0.4;
            404
        } else if x < 0.03 && is_post {
            latency_factor = 0.3;
            400
        } else {
            match endpoint.method {
                "POST" => 201,
                "DELETE" => 204,
                _ => 200,
            }
        }
    };
    if !ev.by_gateway {
        ev.upstream_ms = lognormal_ms(endpoint.median_ms * latency_factor, rng);
    }
    ev.req_size = 180 + ev.ua.len() as u32 + ev.path.len() as u32;
    if is_post {
        ev.body_size = rng.range(120, 2400) as u32;
        ev.req_size += ev.body_size + 50;
    }
    ev.resp_size = response_size(ev.status, &ev.path, endpoint, rng);
    ev
}

fn response_size(status: u16, path: &str, endpoint: &Endpoint, rng: &mut Rng) -> u32 {
    let body = match status {
        200 if path.contains('?') || !endpoint.template.contains("{id}") => {
            rng.range(1_500, 16_000)
        }
        200 => rng.range(400, 2_500),
        201 => rng.range(200, 900),
        204 => 0,
        401 => 45,
        429 => 41,
        _ => rng.range(60, 200),
    };
    body as u32 + 210
}

fn scanner_event(sched: &Schedule, rng: &mut Rng) -> Event {
    let span = sched.end_ms - sched.start_ms;
    let burst_len = (15 * 60_000).min(span / 40);
    let b = SCANNER_BURSTS[rng.below(SCANNER_BURSTS.len() as u64) as usize];
    let from = sched.start_ms + (span as f64 * b).round() as i64;
    let t = rng.range(from, from + burst_len);
    let endpoint = &SCANNER_ENDPOINTS[rng.weighted(SCANNER_ENDPOINTS.iter().map(|e| e.weight))];
    let ua = SCANNER_UAS[rng.below(SCANNER_UAS.len() as u64) as usize];
    let mut ev = base_event(rng, t, Actor::Scanner, SCANNER_IP, ua, endpoint);
    let guesses = SCANNER_LOOKALIKES + SCANNER_WEAK_KEYS.len();
    ev.key = if rng.chance(0.55) {
        KeyRef::None
    } else {
        KeyRef::Guessed(rng.below(guesses as u64) as usize)
    };
    ev.status = 401;
    ev.by_gateway = true;
    ev.req_size = 160 + ua.len() as u32 + ev.path.len() as u32;
    ev.resp_size = 45 + 210;
    ev
}

fn truth(preset: Preset, sched: &Schedule, events: &[Event]) -> Truth {
    let mut clients: Vec<ClientTruth> = CLIENTS
        .iter()
        .map(|c| ClientTruth {
            name: c.name.to_string(),
            consumer_id: named_uuid(&format!("kong-consumer/{}", c.name)),
            keys: c
                .keys
                .iter()
                .map(|label| {
                    let (identity, raw) = key_identity(preset, c.name, label);
                    KeyTruth {
                        client: c.name.to_string(),
                        label: label.to_string(),
                        identity,
                        raw,
                        requests: 0,
                    }
                })
                .collect(),
            hosts: c.hosts.iter().map(|h| h.ip.to_string()).collect(),
            requests: 0,
        })
        .collect();
    let (mut scanner_requests, mut rate_limited, mut fumbled_401s) = (0, 0, 0);
    for ev in events {
        match (ev.actor, ev.key) {
            (Actor::Client { client, host }, KeyRef::Known { key, .. }) => {
                clients[client].requests += 1;
                clients[client].keys[key].requests += 1;
                rate_limited += usize::from(ev.status == 429);
                fumbled_401s +=
                    usize::from(client == ACME && host == FUMBLED_HOST && ev.status == 401);
            }
            (Actor::Scanner, _) => scanner_requests += 1,
            _ => unreachable!("clients always send a key"),
        }
    }
    let acme = &clients[ACME];
    let hosts = CLIENTS[ACME].hosts;
    let fumble_from = sched.switch_ms[FUMBLED_HOST].expect("fumbled host switches");
    let rotation = RotationTruth {
        client: acme.name.clone(),
        old_key: acme.keys[KEY_A].clone(),
        new_key: acme.keys[KEY_B].clone(),
        start_ms: sched.rotation_ms,
        switched: SWITCHED_HOSTS
            .iter()
            .map(|&h| HostSwitch {
                ip: hosts[h].ip.to_string(),
                switch_ms: sched.switch_ms[h].expect("switches"),
            })
            .collect(),
        laggards: LAGGARD_HOSTS
            .iter()
            .map(|&h| hosts[h].ip.to_string())
            .collect(),
        fumbled_host: hosts[FUMBLED_HOST].ip.to_string(),
        fumble_until_ms: fumble_from + FUMBLE_WINDOW_MS,
        fumbled_401s,
    };
    Truth {
        preset: preset.name().to_string(),
        start_ms: sched.start_ms,
        end_ms: sched.end_ms,
        clients,
        rotation,
        scanner_ip: SCANNER_IP.to_string(),
        scanner_requests,
        scanner_keys: scanner_keys(preset),
        noisy_client: NOISY_CLIENT.to_string(),
        rate_limited,
    }
}

impl Truth {
    /// The truth about one key, by client name and key label.
    pub fn key(&self, client: &str, label: &str) -> Option<&KeyTruth> {
        self.clients
            .iter()
            .find(|c| c.name == client)?
            .keys
            .iter()
            .find(|k| k.label == label)
    }

    pub fn client(&self, name: &str) -> Option<&ClientTruth> {
        self.clients.iter().find(|c| c.name == name)
    }
}

// ---------------------------------------------------------------------------------------------
// Time formatting (UTC only), without a calendar library on the hot path.

/// (year, month, day) of a day number since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

struct Civil {
    y: i64,
    mo: u32,
    d: u32,
    h: i64,
    mi: i64,
    s: i64,
}

fn civil(t_ms: i64) -> Civil {
    let days = t_ms.div_euclid(DAY_MS);
    let in_day = t_ms.rem_euclid(DAY_MS);
    let (y, mo, d) = civil_from_days(days);
    Civil {
        y,
        mo,
        d,
        h: in_day / 3_600_000,
        mi: in_day / 60_000 % 60,
        s: in_day / 1000 % 60,
    }
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `2026-11-20T09:15:02` (no fraction, no zone).
fn fmt_seconds(t_ms: i64) -> String {
    let c = civil(t_ms);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        c.y, c.mo, c.d, c.h, c.mi, c.s
    )
}

/// `2026-11-20T09:15:02.123Z` (Envoy's `%START_TIME%`).
fn fmt_millis_z(t_ms: i64) -> String {
    format!("{}.{:03}Z", fmt_seconds(t_ms), t_ms.rem_euclid(1000))
}

/// Go's RFC 3339 with nanoseconds, trailing zeros of the fraction dropped.
fn fmt_go_nanos(t_ms: i64, sub_ns: u32) -> String {
    let ns = t_ms.rem_euclid(1000) as u64 * 1_000_000 + u64::from(sub_ns);
    let mut s = fmt_seconds(t_ms);
    if ns > 0 {
        let frac = format!("{ns:09}");
        s.push('.');
        s.push_str(frac.trim_end_matches('0'));
    }
    s.push('Z');
    s
}

/// `20/Nov/2026:09:15:02 +0000` (AWS `$context.requestTime`).
fn fmt_clf(t_ms: i64) -> String {
    let c = civil(t_ms);
    format!(
        "{:02}/{}/{:04}:{:02}:{:02}:{:02} +0000",
        c.d,
        MONTHS[c.mo as usize - 1],
        c.y,
        c.h,
        c.mi,
        c.s
    )
}

/// Seconds with milliseconds, as nginx writes `$msec` and `$request_time`.
fn fmt_secs_ms(ms: i64) -> String {
    format!("{}.{:03}", ms.div_euclid(1000), ms.rem_euclid(1000))
}

fn fmt_hex128(x: u128) -> String {
    format!("{x:032x}")
}

// ---------------------------------------------------------------------------------------------
// JSON writing: an object builder that keeps the field order of real logs and escapes with
// serde_json.

struct Obj<'a> {
    buf: &'a mut Vec<u8>,
    n: usize,
}

fn write_str(buf: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(buf, s).expect("writing a string to a Vec cannot fail");
}

impl<'a> Obj<'a> {
    fn new(buf: &'a mut Vec<u8>) -> Obj<'a> {
        buf.push(b'{');
        Obj { buf, n: 0 }
    }

    fn key(&mut self, k: &str) -> &mut Vec<u8> {
        if self.n > 0 {
            self.buf.push(b',');
        }
        self.n += 1;
        write_str(self.buf, k);
        self.buf.push(b':');
        self.buf
    }

    fn s(&mut self, k: &str, v: &str) -> &mut Self {
        let buf = self.key(k);
        write_str(buf, v);
        self
    }

    fn i(&mut self, k: &str, v: i64) -> &mut Self {
        let buf = self.key(k);
        let _ = write!(buf, "{v}");
        self
    }

    /// A string, or `null` when absent.
    fn s_or_null(&mut self, k: &str, v: Option<&str>) -> &mut Self {
        match v {
            Some(v) => self.s(k, v),
            None => self.null(k),
        }
    }

    fn null(&mut self, k: &str) -> &mut Self {
        self.key(k).extend_from_slice(b"null");
        self
    }

    fn b(&mut self, k: &str, v: bool) -> &mut Self {
        let buf = self.key(k);
        buf.extend_from_slice(if v { b"true" } else { b"false" });
        self
    }

    fn strs(&mut self, k: &str, items: &[&str]) -> &mut Self {
        let buf = self.key(k);
        buf.push(b'[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            write_str(buf, item);
        }
        buf.push(b']');
        self
    }

    fn o(&mut self, k: &str, f: impl FnOnce(&mut Obj<'_>)) -> &mut Self {
        let buf = self.key(k);
        let mut inner = Obj::new(buf);
        f(&mut inner);
        inner.end();
        self
    }

    /// An array holding one object.
    fn a1(&mut self, k: &str, f: impl FnOnce(&mut Obj<'_>)) -> &mut Self {
        let buf = self.key(k);
        buf.push(b'[');
        let mut inner = Obj::new(buf);
        f(&mut inner);
        inner.end();
        buf.push(b']');
        self
    }

    fn end(self) {
        self.buf.push(b'}');
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering one event in a preset's format.

fn render(preset: Preset, ev: &Event, buf: &mut Vec<u8>) {
    match preset {
        Preset::Kong => render_kong(ev, buf),
        Preset::Tyk => render_tyk(ev, buf),
        Preset::Traefik => render_traefik(ev, buf),
        Preset::Envoy => render_envoy(ev, buf),
        Preset::Nginx => render_nginx(ev, buf),
        Preset::AwsApigw => render_aws(ev, buf),
    }
}

/// The identity a preset logs for the event's key, if any.
fn logged_key(preset: Preset, key: KeyRef) -> Option<String> {
    match key {
        KeyRef::None => None,
        KeyRef::Known { client, key } => {
            let c = &CLIENTS[client];
            Some(key_identity(preset, c.name, c.keys[key]).0)
        }
        KeyRef::Guessed(i) => scanner_keys(preset).get(i).cloned(),
    }
}

fn client_name(ev: &Event) -> Option<&'static str> {
    match ev.key {
        KeyRef::Known { client, .. } => Some(CLIENTS[client].name),
        _ => None,
    }
}

fn total_ms(ev: &Event) -> u32 {
    ev.gateway_ms + ev.upstream_ms
}

fn path_only(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

/// What each program sends as `Accept` (Go's client and okhttp send none by default).
fn accept_header(ua: &str) -> Option<&'static str> {
    match ua {
        UA_PYTHON | UA_CURL => Some("*/*"),
        UA_CHROME | UA_PORTAL => Some("application/json"),
        _ => None,
    }
}

fn sends_request_id(ua: &str) -> bool {
    matches!(ua, UA_OKHTTP | UA_CHROME | UA_PORTAL | UA_AGENT)
}

fn uses_http2(ev: &Event) -> bool {
    ev.ua == UA_OKHTTP || ev.ua == UA_CHROME || ev.ua == UA_PORTAL
}

/// Kong 3.x log plugins (file-log, http-log, kafka-log), trimmed to the fields users keep.
fn render_kong(ev: &Event, buf: &mut Vec<u8>) {
    let route = &ROUTES[ev.endpoint.route];
    let svc = &SERVICES[route.service];
    let service_id = named_uuid(&format!("kong-service/{}", svc.name));
    let query = ev.path.split_once('?').map(|(_, q)| q);
    let kong_ms = i64::from(ev.gateway_ms);
    let proxy_ms = if ev.by_gateway {
        -1
    } else {
        i64::from(ev.upstream_ms)
    };
    let mut o = Obj::new(buf);
    o.o("request", |r| {
        r.s("method", ev.endpoint.method)
            .s("uri", &ev.path)
            .s("url", &format!("https://{API_HOST}:443{}", ev.path))
            .o("querystring", |q| {
                for pair in query.into_iter().flat_map(|q| q.split('&')) {
                    match pair.split_once('=') {
                        Some((k, v)) => q.s(k, v),
                        None => q.b(pair, true),
                    };
                }
            })
            .i("size", i64::from(ev.req_size))
            .o("headers", |h| {
                h.s("host", API_HOST).s("user-agent", ev.ua);
                if let Some(accept) = accept_header(ev.ua) {
                    h.s("accept", accept);
                }
                if ev.body_size > 0 {
                    h.s("content-type", "application/json")
                        .s("content-length", &ev.body_size.to_string());
                }
                // No correlation-id plugin: only the programs that set one send it.
                if sends_request_id(ev.ua) {
                    h.s("x-request-id", &uuid(ev.request_id));
                }
            })
            .s("id", &fmt_hex128(ev.request_id));
    });
    o.s("upstream_uri", &ev.path);
    o.o("response", |r| {
        r.i("status", i64::from(ev.status))
            .i("size", i64::from(ev.resp_size))
            .o("headers", |h| {
                h.s("content-type", "application/json");
                if ev.status == 429 {
                    h.s("retry-after", "12");
                } else if ev.by_gateway {
                    h.s("www-authenticate", "Key");
                }
            });
    });
    o.o("latencies", |l| {
        l.i("request", i64::from(total_ms(ev)))
            .i("kong", kong_ms)
            .i("proxy", proxy_ms);
    });
    if !ev.by_gateway {
        o.a1("tries", |t| {
            t.s("ip", svc.upstream).i("port", i64::from(svc.port));
        });
    }
    o.s("client_ip", ev.ip).i("started_at", ev.t_ms);
    o.o("route", |r| {
        r.s("id", &named_uuid(&format!("kong-route/{}", route.name)))
            .s("name", route.name)
            .strs("paths", route.paths)
            .strs("protocols", &["https"]);
    });
    o.o("service", |s| {
        s.s("id", &service_id)
            .s("name", svc.name)
            .s("host", svc.host)
            .i("port", i64::from(svc.port))
            .s("protocol", "http");
    });
    o.s("workspace", &named_uuid("kong-workspace/default"));
    if let KeyRef::Known { client, key } = ev.key {
        let c = &CLIENTS[client];
        o.o("authenticated_entity", |a| {
            a.s("id", &key_identity(Preset::Kong, c.name, c.keys[key]).0);
        });
        o.o("consumer", |k| {
            k.s("id", &named_uuid(&format!("kong-consumer/{}", c.name)))
                .s("username", c.name);
        });
    }
    o.end();
}

/// Tyk pump analytics records (Kafka pump).
fn render_tyk(ev: &Event, buf: &mut Vec<u8>) {
    let route = &ROUTES[ev.endpoint.route];
    let org = named_hex("tyk-org", 24);
    let api_id = named_hex(&format!("tyk-api/{}", route.name), 32);
    let c = civil(ev.t_ms);
    let key = logged_key(Preset::Tyk, ev.key).unwrap_or_default();
    let mut o = Obj::new(buf);
    o.s("method", ev.endpoint.method)
        .s("host", API_HOST)
        .s("path", path_only(&ev.path))
        .s("raw_path", &ev.path)
        .i("content_length", i64::from(ev.body_size))
        .s("user_agent", ev.ua)
        .i("day", i64::from(c.d))
        .i("month", i64::from(c.mo))
        .i("year", c.y)
        .i("hour", c.h)
        .i("response_code", i64::from(ev.status))
        .s("api_key", &key)
        .s("timestamp", &fmt_go_nanos(ev.t_ms, ev.sub_ns))
        .s("api_version", "Non Versioned")
        .s("api_name", &format!("{}-v1", route.name))
        .s("api_id", &api_id)
        .s("org_id", &org)
        .s("oauth_id", "")
        .i("request_time_ms", i64::from(total_ms(ev)))
        .o("latency", |l| {
            l.i("total", i64::from(total_ms(ev)))
                .i("upstream", i64::from(ev.upstream_ms));
        })
        .s("ip_address", ev.ip)
        .strs(
            "tags",
            &[&format!("org-{org}"), &format!("api-{api_id}"), "env:prod"],
        )
        .s("alias", client_name(ev).unwrap_or(""))
        .b("track_path", false)
        .s("expireAt", &fmt_go_nanos(ev.t_ms + 7 * DAY_MS, ev.sub_ns));
    o.end();
}

/// Traefik v3 JSON access log, with the `User-Agent`, `X-Api-Key` and `X-Request-Id` request
/// headers kept.
fn render_traefik(ev: &Event, buf: &mut Vec<u8>) {
    let route = &ROUTES[ev.endpoint.route];
    let svc = &SERVICES[route.service];
    let duration_ns = i64::from(total_ms(ev)) * 1_000_000 + i64::from(ev.sub_ns % 900_000);
    let origin_ns = i64::from(ev.upstream_ms) * 1_000_000;
    let start = fmt_go_nanos(ev.t_ms, ev.sub_ns);
    let h2 = uses_http2(ev);
    let mut o = Obj::new(buf);
    o.s("ClientAddr", &socket(ev.ip, ev.client_port))
        .s("ClientHost", ev.ip)
        .s("ClientPort", &ev.client_port.to_string())
        .s("ClientUsername", "-")
        .i("DownstreamContentSize", i64::from(ev.resp_size - 210))
        .i("DownstreamStatus", i64::from(ev.status))
        .i("Duration", duration_ns)
        .i(
            "OriginContentSize",
            if ev.by_gateway {
                0
            } else {
                i64::from(ev.resp_size - 210)
            },
        )
        .i("OriginDuration", origin_ns)
        .i(
            "OriginStatus",
            if ev.by_gateway {
                0
            } else {
                i64::from(ev.status)
            },
        )
        .i("Overhead", duration_ns - origin_ns)
        .s("RequestAddr", API_HOST)
        .i("RequestContentSize", i64::from(ev.body_size))
        .i(
            "RequestCount",
            (ev.t_ms - DEFAULT_START_MS).rem_euclid(1 << 24) / 97,
        )
        .s("RequestHost", API_HOST)
        .s("RequestMethod", ev.endpoint.method)
        .s("RequestPath", &ev.path)
        .s("RequestPort", "-")
        .s("RequestProtocol", if h2 { "HTTP/2.0" } else { "HTTP/1.1" })
        .s("RequestScheme", "https")
        .i("RetryAttempts", 0)
        .s("RouterName", &format!("{}@file", route.name));
    if !ev.by_gateway {
        o.s("ServiceAddr", &format!("{}:{}", svc.upstream, svc.port))
            .s("ServiceName", &format!("{}@file", svc.name))
            .s(
                "ServiceURL",
                &format!("http://{}:{}", svc.upstream, svc.port),
            );
    }
    o.s("StartLocal", &start)
        .s("StartUTC", &start)
        .s("TLSCipher", "TLS_AES_128_GCM_SHA256")
        .s("TLSVersion", "1.3")
        .s("entryPointName", "websecure")
        .s("level", "info")
        .s("msg", "");
    if let Some(key) = logged_key(Preset::Traefik, ev.key) {
        o.s("request_X-Api-Key", &key);
    }
    o.s("request_User-Agent", ev.ua)
        .s("request_X-Request-Id", &uuid(ev.request_id))
        .s(
            "time",
            &format!("{}Z", fmt_seconds(ev.t_ms + i64::from(total_ms(ev)))),
        );
    o.end();
}

/// `ip:port`, with brackets for IPv6.
fn socket(ip: &str, port: u16) -> String {
    if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    }
}

/// Envoy JSON access log (`json_format` with the usual command operators; absent values are
/// `null`).
fn render_envoy(ev: &Event, buf: &mut Vec<u8>) {
    let route = &ROUTES[ev.endpoint.route];
    let svc = &SERVICES[route.service];
    let (flags, details) = match (ev.by_gateway, ev.status) {
        (true, 429) => ("RL", "request_rate_limited"),
        (true, _) => ("UAEX", "ext_authz_denied"),
        (false, _) => ("-", "via_upstream"),
    };
    let key = logged_key(Preset::Envoy, ev.key);
    let upstream = format!("{}:{}", svc.upstream, svc.port);
    let mut o = Obj::new(buf);
    o.s("start_time", &fmt_millis_z(ev.t_ms))
        .s("method", ev.endpoint.method)
        .s("path", &ev.path)
        .s(
            "protocol",
            if uses_http2(ev) { "HTTP/2" } else { "HTTP/1.1" },
        )
        .i("response_code", i64::from(ev.status))
        .s("response_flags", flags)
        .s("response_code_details", details)
        .i("bytes_received", i64::from(ev.body_size))
        .i("bytes_sent", i64::from(ev.resp_size - 210))
        .i("duration", i64::from(total_ms(ev)))
        .s_or_null(
            "upstream_service_time",
            (!ev.by_gateway)
                .then(|| ev.upstream_ms.to_string())
                .as_deref(),
        )
        .s("downstream_remote_address", &socket(ev.ip, ev.client_port))
        .null("x_forwarded_for")
        .s("user_agent", ev.ua)
        .s("request_id", &uuid(ev.request_id))
        .s("authority", API_HOST)
        .s("route_name", route.name)
        .s("upstream_cluster", svc.name)
        .s_or_null(
            "upstream_host",
            (!ev.by_gateway).then_some(upstream.as_str()),
        )
        .s_or_null("x_api_key", key.as_deref())
        .s("hostname", ENVOY_PODS[ev.node]);
    o.end();
}

/// nginx `log_format ... escape=json` with every variable quoted. nginx stamps `$msec` and
/// `$time_iso8601` when it writes the line; here both are the request's start, like the
/// other presets, so that the lines stay sorted by event time.
fn render_nginx(ev: &Event, buf: &mut Vec<u8>) {
    let route = &ROUTES[ev.endpoint.route];
    let svc = &SERVICES[route.service];
    let total = i64::from(total_ms(ev));
    let mut o = Obj::new(buf);
    o.s("time_iso8601", &format!("{}+00:00", fmt_seconds(ev.t_ms)))
        .s("msec", &fmt_secs_ms(ev.t_ms))
        .s("remote_addr", ev.ip)
        .s("request_method", ev.endpoint.method)
        .s("request_uri", &ev.path)
        .s(
            "server_protocol",
            if uses_http2(ev) {
                "HTTP/2.0"
            } else {
                "HTTP/1.1"
            },
        )
        .s("status", &ev.status.to_string())
        .s("body_bytes_sent", &(ev.resp_size - 210).to_string())
        .s("request_time", &fmt_secs_ms(total))
        .s(
            "upstream_addr",
            &if ev.by_gateway {
                String::new()
            } else {
                format!("{}:{}", svc.upstream, svc.port)
            },
        )
        .s(
            "upstream_response_time",
            &if ev.by_gateway {
                String::new()
            } else {
                fmt_secs_ms(i64::from(ev.upstream_ms))
            },
        )
        .s("http_host", API_HOST)
        .s("http_user_agent", ev.ua)
        .s(
            "http_x_api_key",
            &logged_key(Preset::Nginx, ev.key).unwrap_or_default(),
        )
        .s("request_id", &fmt_hex128(ev.request_id))
        .s("hostname", NGINX_HOSTS[ev.node]);
    o.end();
}

/// AWS API Gateway (REST) access log in JSON, `$context` variables quoted except
/// `requestTimeEpoch`.
fn render_aws(ev: &Event, buf: &mut Vec<u8>) {
    let (status, message, response_type) = match (ev.by_gateway, ev.status) {
        (true, 429) => (429, "Too Many Requests", "THROTTLED"),
        // API Gateway rejects a missing or unknown API key with 403.
        (true, _) => (
            403,
            "Invalid API Key identifier specified",
            "INVALID_API_KEY",
        ),
        (false, s) => (s, "-", "-"),
    };
    let resource = path_only(ev.endpoint.template);
    let mut o = Obj::new(buf);
    o.s("requestId", &uuid(ev.request_id))
        .s("ip", ev.ip)
        .s("requestTime", &fmt_clf(ev.t_ms))
        .i("requestTimeEpoch", ev.t_ms)
        .s("httpMethod", ev.endpoint.method)
        .s("resourcePath", resource)
        .s("path", path_only(&ev.path))
        .s("status", &status.to_string())
        .s("protocol", "HTTP/1.1")
        .s("responseLength", &(ev.resp_size - 210).to_string())
        .s("userAgent", ev.ua)
        .s(
            "apiKeyId",
            &logged_key(Preset::AwsApigw, ev.key).unwrap_or_else(|| "-".to_string()),
        )
        .s("responseLatency", &total_ms(ev).to_string())
        .s(
            "integrationLatency",
            &if ev.by_gateway {
                "-".to_string()
            } else {
                ev.upstream_ms.to_string()
            },
        )
        .s("errorMessage", message)
        .s("errorResponseType", response_type)
        .s("domainName", API_HOST)
        .s("stage", "prod");
    o.end();
}

// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::collections::{BTreeMap, BTreeSet};

    fn opts(preset: &str) -> SampleOptions {
        SampleOptions {
            preset: preset.to_string(),
            ..SampleOptions::default()
        }
    }

    fn rfc3339_ms(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s)
            .unwrap_or_else(|e| panic!("{s}: {e}"))
            .timestamp_millis()
    }

    /// What a decoder would read from a line: (time, source ip, logged key identity, status).
    type Row = (i64, String, Option<String>, u16);

    fn extract(preset: &str, v: &Value) -> Row {
        let s = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_string);
        let n = |p: &str| v.pointer(p).and_then(Value::as_i64);
        let nonempty = |x: Option<String>| x.filter(|k| !k.is_empty() && k != "-");
        match preset {
            "kong" => (
                n("/started_at").unwrap(),
                s("/client_ip").unwrap(),
                s("/authenticated_entity/id"),
                n("/response/status").unwrap() as u16,
            ),
            "tyk" => (
                rfc3339_ms(&s("/timestamp").unwrap()),
                s("/ip_address").unwrap(),
                nonempty(s("/api_key")),
                n("/response_code").unwrap() as u16,
            ),
            "traefik" => (
                rfc3339_ms(&s("/StartUTC").unwrap()),
                s("/ClientHost").unwrap(),
                s("/request_X-Api-Key"),
                n("/DownstreamStatus").unwrap() as u16,
            ),
            "envoy" => {
                let addr = s("/downstream_remote_address").unwrap();
                let ip = addr
                    .rsplit_once(':')
                    .unwrap()
                    .0
                    .trim_matches(['[', ']'])
                    .to_string();
                (
                    rfc3339_ms(&s("/start_time").unwrap()),
                    ip,
                    s("/x_api_key"),
                    n("/response_code").unwrap() as u16,
                )
            }
            "nginx" => {
                let msec: f64 = s("/msec").unwrap().parse().unwrap();
                (
                    (msec * 1000.0).round() as i64,
                    s("/remote_addr").unwrap(),
                    nonempty(s("/http_x_api_key")),
                    s("/status").unwrap().parse().unwrap(),
                )
            }
            "aws-apigw" => (
                n("/requestTimeEpoch").unwrap(),
                s("/ip").unwrap(),
                nonempty(s("/apiKeyId")),
                s("/status").unwrap().parse().unwrap(),
            ),
            other => panic!("no extractor for {other}"),
        }
    }

    fn parsed(preset: &str, o: &SampleOptions) -> (Vec<Row>, Truth) {
        let sample = generate_sample(&SampleOptions {
            preset: preset.to_string(),
            ..o.clone()
        })
        .unwrap();
        let rows = sample
            .lines
            .iter()
            .map(|line| {
                assert!(!line.contains('\n'), "{line}");
                let v: Value =
                    serde_json::from_str(line).unwrap_or_else(|e| panic!("{preset}: {e}: {line}"));
                assert!(v.is_object());
                extract(preset, &v)
            })
            .collect();
        (rows, sample.truth)
    }

    #[test]
    fn deterministic_for_a_seed() {
        for preset in PRESETS {
            let o = SampleOptions {
                lines: 500,
                ..opts(preset)
            };
            assert_eq!(generate(&o).unwrap(), generate(&o).unwrap(), "{preset}");
            let other = generate(&SampleOptions {
                seed: 2,
                ..o.clone()
            })
            .unwrap();
            assert_ne!(generate(&o).unwrap(), other, "{preset}");
        }
    }

    #[test]
    fn default_start_is_2026_11_20() {
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-20T00:00:00Z").unwrap();
        assert_eq!(DEFAULT_START_MS, t.timestamp_millis());
    }

    #[test]
    fn time_formats_match_chrono() {
        let mut rng = Rng::new(9);
        for _ in 0..2000 {
            let t = rng.range(0, 4_102_444_800_000);
            let sub = rng.below(1_000_000) as u32;
            let dt = chrono::DateTime::from_timestamp_millis(t).unwrap();
            assert_eq!(
                fmt_millis_z(t),
                dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
            );
            assert_eq!(fmt_clf(t), dt.format("%d/%b/%Y:%H:%M:%S +0000").to_string());
            let ns = chrono::DateTime::parse_from_rfc3339(&fmt_go_nanos(t, sub)).unwrap();
            assert_eq!(
                ns.timestamp_nanos_opt().unwrap(),
                t * 1_000_000 + i64::from(sub)
            );
        }
        assert_eq!(fmt_go_nanos(DEFAULT_START_MS, 0), "2026-11-20T00:00:00Z");
        assert_eq!(
            fmt_go_nanos(DEFAULT_START_MS + 120, 0),
            "2026-11-20T00:00:00.12Z"
        );
        assert_eq!(fmt_secs_ms(12), "0.012");
    }

    #[test]
    fn every_preset_is_valid_json_sorted_and_within_the_span() {
        let o = SampleOptions {
            lines: 3000,
            ..SampleOptions::default()
        };
        let mut reference: Option<Vec<(i64, String, u16)>> = None;
        for preset in PRESETS {
            let (rows, truth) = parsed(preset, &o);
            assert_eq!(rows.len(), 3000, "{preset}");
            assert_eq!(truth.preset, preset);
            assert!(
                rows.windows(2).all(|w| w[0].0 <= w[1].0),
                "{preset}: not sorted"
            );
            for r in &rows {
                assert!(
                    (truth.start_ms..truth.end_ms).contains(&r.0),
                    "{preset}: {} out of span",
                    r.0
                );
            }
            // The same scenario in every preset (AWS answers a bad key with 403).
            let key: Vec<(i64, String, u16)> = rows
                .iter()
                .map(|(t, ip, _, st)| (*t, ip.clone(), if *st == 403 { 401 } else { *st }))
                .collect();
            match &reference {
                None => reference = Some(key),
                Some(r) => assert_eq!(r, &key, "{preset} differs from kong"),
            }
        }
    }

    #[test]
    fn rotation_truth_holds_in_every_preset() {
        for preset in PRESETS {
            let (rows, truth) = parsed(preset, &opts(preset));
            let rot = &truth.rotation;
            let (a, b) = (rot.old_key.identity.as_str(), rot.new_key.identity.as_str());
            assert_eq!(rot.client, "acme-billing");
            assert_ne!(a, b);
            assert_eq!(rot.laggards, ["10.20.1.13", "198.51.100.23"]);
            let switched: BTreeMap<&str, i64> = rot
                .switched
                .iter()
                .map(|s| (s.ip.as_str(), s.switch_ms))
                .collect();
            assert_eq!(switched.len(), 3);
            assert!(rot.start_ms > truth.start_ms && switched.values().all(|&s| s > rot.start_ms));

            let mut laggard_last_a: BTreeMap<&str, i64> = BTreeMap::new();
            let mut first_b: BTreeMap<String, i64> = BTreeMap::new();
            let mut acme_requests = 0;
            let mut fumbled = 0;
            for (t, ip, key, status) in &rows {
                let Some(key) = key.as_deref() else { continue };
                if key != a && key != b {
                    continue;
                }
                acme_requests += 1;
                assert!(truth.client("acme-billing").unwrap().hosts.contains(ip));
                if key == b {
                    assert!(*t >= rot.start_ms, "{preset}: B before the rotation");
                    first_b.entry(ip.clone()).or_insert(*t);
                    if *status == 401 {
                        assert_eq!(ip, &rot.fumbled_host);
                        assert!(*t < rot.fumble_until_ms);
                        fumbled += 1;
                    }
                }
                if let Some(&s) = switched.get(ip.as_str()) {
                    assert_eq!(key == b, *t >= s, "{preset}: {ip} at {t}, switch {s}");
                } else {
                    assert_eq!(key, a, "{preset}: laggard {ip} sent B");
                    laggard_last_a.insert(rot.laggards.iter().find(|l| *l == ip).unwrap(), *t);
                }
            }
            // Each switched host's first B is at its switch time; the laggards use A to the end.
            let want: BTreeMap<String, i64> =
                switched.iter().map(|(k, v)| (k.to_string(), *v)).collect();
            assert_eq!(first_b, want, "{preset}");
            assert_eq!(laggard_last_a.len(), 2);
            for (ip, last) in laggard_last_a {
                assert!(
                    truth.end_ms - last <= 3_600_000,
                    "{preset}: {ip} quiet at the end"
                );
            }
            assert!(
                fumbled >= 4 && fumbled == rot.fumbled_401s,
                "{preset}: {fumbled}"
            );
            assert_eq!(acme_requests, rot.old_key.requests + rot.new_key.requests);
            assert!(acme_requests > 700, "{acme_requests}");
        }
    }

    #[test]
    fn identities_match_the_preset() {
        let kong = scenario_truth(&opts("kong")).unwrap();
        let uuid_like = |s: &str| s.len() == 36 && s.split('-').map(str::len).eq([8, 4, 4, 4, 12]);
        for c in &kong.clients {
            assert!(uuid_like(&c.consumer_id));
            for k in &c.keys {
                assert!(uuid_like(&k.identity) && !k.raw, "{k:?}");
            }
        }
        let aws = scenario_truth(&opts("aws-apigw")).unwrap();
        assert!(aws
            .clients
            .iter()
            .flat_map(|c| &c.keys)
            .all(|k| k.identity.len() == 10 && !k.raw));
        let tyk = scenario_truth(&opts("tyk")).unwrap();
        assert!(tyk
            .clients
            .iter()
            .flat_map(|c| &c.keys)
            .all(|k| k.identity.starts_with("tyk_") && k.identity.len() == 36 && k.raw));
        for preset in ["traefik", "envoy", "nginx"] {
            let t = scenario_truth(&opts(preset)).unwrap();
            for k in t.clients.iter().flat_map(|c| &c.keys) {
                assert!(
                    k.raw && k.identity.starts_with("kw_live_") && k.identity.len() == 40,
                    "{k:?}"
                );
            }
            assert_eq!(t.scanner_keys.len(), 5);
        }
        // Keys do not depend on the seed; counts do.
        let other = scenario_truth(&SampleOptions {
            seed: 7,
            ..opts("nginx")
        })
        .unwrap();
        let nginx = scenario_truth(&opts("nginx")).unwrap();
        assert_eq!(
            other.rotation.old_key.identity,
            nginx.rotation.old_key.identity
        );
        let ids: BTreeSet<&str> = nginx
            .clients
            .iter()
            .flat_map(|c| &c.keys)
            .map(|k| k.identity.as_str())
            .collect();
        assert_eq!(ids.len(), 8);
    }

    #[test]
    fn scenario_has_the_promised_texture() {
        let (rows, truth) = parsed("kong", &opts("kong"));
        let lines = generate(&opts("kong")).unwrap();
        let scanner: Vec<_> = rows.iter().filter(|r| r.1 == SCANNER_IP).collect();
        assert!(scanner.len() >= 20 && scanner.len() == truth.scanner_requests);
        assert!(scanner.iter().all(|r| r.3 == 401 && r.2.is_none()));
        assert!(truth.rate_limited >= 50, "{}", truth.rate_limited);
        let statuses: BTreeSet<u16> = rows.iter().map(|r| r.3).collect();
        for s in [200, 201, 204, 401, 404, 429, 500] {
            assert!(statuses.contains(&s), "no {s}");
        }
        // Working hours are busier than the night.
        let hour = |t: i64| t.rem_euclid(DAY_MS) / 3_600_000;
        let day = rows
            .iter()
            .filter(|r| (10..16).contains(&hour(r.0)))
            .count();
        let night = rows
            .iter()
            .filter(|r| (20..24).contains(&hour(r.0)) || (3..7).contains(&hour(r.0)))
            .count();
        assert!(day > 2 * night, "day {day} night {night}");
        // The escaping user agent survives the round trip; IPv6 is there.
        let v: Vec<Value> = lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert!(v
            .iter()
            .any(|v| v["request"]["headers"]["user-agent"] == UA_PORTAL));
        assert!(rows.iter().any(|r| r.1 == "2001:db8::17"));
        // Records are about one kilobyte.
        let avg = lines.iter().map(String::len).sum::<usize>() / lines.len();
        assert!((700..1100).contains(&avg), "{avg}");
    }

    #[test]
    fn bad_options_are_refused() {
        let err = generate(&opts("haproxy")).unwrap_err();
        assert!(
            err.contains("haproxy") && err.contains("aws-apigw"),
            "{err}"
        );
        assert!(generate(&SampleOptions {
            days: 0.0,
            ..opts("kong")
        })
        .is_err());
        assert!(generate(&SampleOptions {
            days: f64::NAN,
            ..opts("kong")
        })
        .is_err());
        let mut out = Vec::new();
        let e = write_to(&opts("nope"), &mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn small_and_empty_samples() {
        assert!(generate(&SampleOptions {
            lines: 0,
            ..opts("envoy")
        })
        .unwrap()
        .is_empty());
        let lines = generate(&SampleOptions {
            lines: 10,
            days: 0.1,
            ..opts("tyk")
        })
        .unwrap();
        assert_eq!(lines.len(), 10);
        let mut out = Vec::new();
        write_to(
            &SampleOptions {
                lines: 0,
                ..opts("kong")
            },
            &mut out,
        )
        .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn write_to_matches_generate() {
        let o = SampleOptions {
            lines: 300,
            ..opts("traefik")
        };
        let mut out = Vec::new();
        write_to(&o, &mut out).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with('\n'));
        assert_eq!(text, generate(&o).unwrap().join("\n") + "\n");
    }

    /// The committed quick-start sample is what the generator makes with the defaults.
    #[test]
    fn example_log_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway.log");
        let mut want = Vec::new();
        write_to(&SampleOptions::default(), &mut want).unwrap();
        let have = std::fs::read(path).expect("examples/gateway.log; regenerate it with `cargo test --lib sample::tests::write_example_log -- --ignored`");
        assert!(have == want, "examples/gateway.log is stale; regenerate it with `cargo test --lib sample::tests::write_example_log -- --ignored`");
    }

    /// Regenerates `examples/gateway.log`.
    #[test]
    #[ignore]
    fn write_example_log() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gateway.log");
        let mut file = io::BufWriter::new(std::fs::File::create(path).unwrap());
        write_to(&SampleOptions::default(), &mut file).unwrap();
    }
}
