//! The small commands: `score`, `fingerprint`, `produce` and `sample`.

use std::io::{BufRead, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;

use crate::sample;

/// A file to read, or stdin without one.
fn open_input(path: Option<&PathBuf>) -> anyhow::Result<Box<dyn BufRead>> {
    Ok(match path {
        Some(p) => Box::new(std::io::BufReader::new(
            std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?,
        )),
        None => Box::new(std::io::stdin().lock()),
    })
}

/// A file to write (buffered), or stdout without one.
fn open_output(path: Option<&PathBuf>) -> anyhow::Result<Box<dyn Write>> {
    Ok(match path {
        Some(p) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    })
}

/// Scores a `timestamp,value` CSV with the anomaly models.
pub fn score(input: Option<PathBuf>, output: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let reader: Box<dyn Read> = open_input(input.as_ref())?;
    let writer = open_output(output.as_ref())?;
    let name = input
        .as_ref()
        .map_or("<stdin>".to_owned(), |p| p.display().to_string());
    let summary = crate::anomaly::score::score_csv(reader, writer).with_context(|| name.clone())?;
    eprintln!(
        "{name}: scored {} rows, {} at 0.5 or more",
        summary.rows, summary.flagged
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints the fingerprint id of a raw key read from stdin.
pub fn fingerprint(config: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    let secret = crate::daemon::load_secret(&config)?;
    let mut raw = String::new();
    std::io::stdin().read_line(&mut raw)?;
    let fp = crate::event::Fingerprinter::new(&secret, config.fingerprint.hint_chars);
    println!("{}", fp.key_id(raw.trim()));
    Ok(ExitCode::SUCCESS)
}

/// Sends a gateway log into a Kafka topic, one message per line, keyed by key id.
pub fn produce(
    brokers: &str,
    topic: &str,
    file: Option<PathBuf>,
    config: Option<PathBuf>,
    properties: &[(String, String)],
) -> anyhow::Result<ExitCode> {
    let config = super::load(config.as_ref())?;
    let decoder = crate::daemon::decoder(&config)?;
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", brokers);
    for (k, v) in properties {
        client.set(k, v);
    }
    let mut input = open_input(file.as_ref())?;
    let sent = super::produce::produce(client, topic, &mut input, Some(&decoder))?;
    eprintln!("sent {sent} message(s) to {topic}");
    Ok(ExitCode::SUCCESS)
}

/// Writes a realistic sample gateway log.
pub fn sample(
    preset: String,
    lines: usize,
    seed: u64,
    output: Option<PathBuf>,
) -> anyhow::Result<ExitCode> {
    let opts = sample::SampleOptions {
        preset,
        lines,
        seed,
        ..sample::SampleOptions::default()
    };
    let mut out = open_output(output.as_ref())?;
    sample::write_to(&opts, &mut out)?;
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
