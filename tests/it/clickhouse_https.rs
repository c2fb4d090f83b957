//! HTTPS to ClickHouse: a private server with an `https_port` and a certificate made here
//! with openssl (a CA of the test's own, a server certificate for `localhost` signed by
//! it, a second CA that signed nothing of the server's). keywatch stores through TLS with
//! `ca_file`, and each way a certificate can be refused says what to change.

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use keywatch::aggregate::Aggregate;
use keywatch::event::{AuthEvent, Outcome};
use keywatch::source::Position;
use keywatch::store::clickhouse::{ClickHouseConfig, ClickHouseStore};
use keywatch::store::{BatchWrite, Checkpoint, Origin, Store, StoreError, StoredEvent};

use crate::support::clickhouse::{fresh_database, ClickHouse};
use crate::support::openssl;

/// `ca.pem` (trusted by the good configs), `other-ca.pem`, and the server's `server.pem`,
/// `server.key` (subjectAltName `DNS:localhost` only) and `dh.pem`.
fn make_certificates(dir: &Path) {
    for ca in ["ca", "other-ca"] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=keywatch test {ca}"),
                "-keyout",
                &format!("{ca}.key"),
                "-out",
                &format!("{ca}.pem"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n\
         extendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            "server.pem",
        ],
    );
    // -dsaparam: seconds less than safe primes, and enough for a test server.
    openssl(dir, &["dhparam", "-dsaparam", "-out", "dh.pem", "1024"]);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A private server with HTTP (the returned server's `url`) and HTTPS on the port returned.
fn https_server(dir: &Path) -> (ClickHouse, u16) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    make_certificates(&certs);
    let server_dir = dir.join("server");
    std::fs::create_dir_all(&server_dir).unwrap();
    let port = free_port();
    let c = |f: &str| certs.join(f).display().to_string();
    std::fs::write(
        server_dir.join("extra.xml"),
        format!(
            "    <https_port>{port}</https_port>\n\
             <openSSL><server>\
             <certificateFile>{}</certificateFile>\
             <privateKeyFile>{}</privateKeyFile>\
             <dhParamsFile>{}</dhParamsFile>\
             <verificationMode>none</verificationMode>\
             <loadDefaultCAFile>false</loadDefaultCAFile>\
             <disableProtocols>sslv2,sslv3</disableProtocols>\
             </server></openSSL>\n",
            c("server.pem"),
            c("server.key"),
            c("dh.pem")
        ),
    )
    .unwrap();
    (ClickHouse::start(&server_dir), port)
}

fn cfg(url: String, ca_file: Option<&Path>) -> ClickHouseConfig {
    ClickHouseConfig {
        url,
        ca_file: ca_file.map(Path::to_owned),
        database: fresh_database("kwtls"),
        insert_timeout: Duration::from_secs(5),
        mutation_timeout: Duration::from_secs(60),
        ..ClickHouseConfig::default()
    }
}

fn fatal(r: Result<ClickHouseStore, StoreError>) -> String {
    match r {
        Err(StoreError::Fatal(m)) => m,
        Err(e) => panic!("want a fatal error, got {e:?}"),
        Ok(_) => panic!("want a fatal error, the store opened"),
    }
}

#[test]
fn stores_over_https_and_says_why_a_certificate_is_refused() {
    let dir = tempfile::Builder::new()
        .prefix("keywatch-tls-")
        .tempdir()
        .unwrap();
    let (server, port) = https_server(dir.path());
    let certs = dir.path().join("certs");
    let ca = certs.join("ca.pem");

    // The CA that signed the server's certificate: a batch goes in and is read back.
    let good = cfg(format!("https://localhost:{port}"), Some(&ca));
    let mut store = ClickHouseStore::open_standalone(&good, None).expect("opening over HTTPS");
    let events: Vec<StoredEvent<'static>> = (0..50)
        .map(|i| StoredEvent {
            event: AuthEvent::new(
                1_795_168_800_000 + i * 1000,
                Cow::Owned(format!("fp:tls{}", i % 3)),
                200,
                Outcome::Ok,
            ),
            origin: Origin {
                partition: 0,
                offset: i,
                index: 0,
            },
        })
        .collect();
    let mut agg = Aggregate::default();
    for e in &events {
        agg.add(&e.event);
    }
    store
        .commit(&BatchWrite {
            aggregate: &agg,
            events: &events,
            checkpoint: Some(Checkpoint {
                source: "stdin",
                position: &Position::Stdin { offset: 50 },
            }),
        })
        .unwrap();
    assert_eq!(store.totals().unwrap(), (50, 50));
    assert_eq!(store.key_usage(None).unwrap().len(), 3);
    drop(store);

    // No ca_file: the public roots do not know the test's CA.
    let m = fatal(ClickHouseStore::open_standalone(
        &cfg(format!("https://localhost:{port}"), None),
        None,
    ));
    assert!(m.contains("signed by a CA keywatch does not trust"), "{m}");
    assert!(m.contains("store.clickhouse.ca_file"), "{m}");

    // Another CA.
    let m = fatal(ClickHouseStore::open_standalone(
        &cfg(
            format!("https://localhost:{port}"),
            Some(&certs.join("other-ca.pem")),
        ),
        None,
    ));
    assert!(m.contains("signed by a CA keywatch does not trust"), "{m}");

    // The certificate names localhost, not 127.0.0.1.
    let m = fatal(ClickHouseStore::open_standalone(
        &cfg(format!("https://127.0.0.1:{port}"), Some(&ca)),
        None,
    ));
    assert!(m.contains("not valid for the host name"), "{m}");

    // https:// to the plain HTTP port.
    let http_port = server.url.rsplit(':').next().unwrap();
    let m = fatal(ClickHouseStore::open_standalone(
        &cfg(format!("https://localhost:{http_port}"), Some(&ca)),
        None,
    ));
    assert!(m.contains("does not speak TLS"), "{m}");

    // A CA file that holds no certificate, and one that is not there.
    let m = fatal(ClickHouseStore::open_standalone(
        &cfg(
            format!("https://localhost:{port}"),
            Some(&certs.join("san.ext")),
        ),
        None,
    ));
    assert!(
        m.contains("store.clickhouse.ca_file") && m.contains("holds no PEM certificate"),
        "{m}"
    );
    let m = fatal(ClickHouseStore::open_standalone(
        &cfg(
            format!("https://localhost:{port}"),
            Some(&certs.join("missing.pem")),
        ),
        None,
    ));
    assert!(m.contains("cannot read it"), "{m}");
}
