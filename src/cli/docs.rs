//! `keywatch completions SHELL` and `keywatch man`: shell completion scripts (clap_complete)
//! and roff man pages (clap_mangen), both made from the clap definition in [`super::args`],
//! so they never disagree with the binary.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::CommandFactory;

use super::args::Cli;

pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<ExitCode> {
    let mut cmd = Cli::command();
    // Into a buffer first: the generator panics on a write error, and a closed pipe
    // (`keywatch completions bash | head`) is not an error.
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, "keywatch", &mut buf);
    write_stdout(&buf)
}

fn write_stdout(buf: &[u8]) -> anyhow::Result<ExitCode> {
    let mut out = std::io::stdout().lock();
    match out.write_all(buf).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}

/// keywatch.1 on stdout; with `out`, keywatch.1 and `keywatch-SUB.1` for every subcommand
/// (and theirs: `keywatch-notify-test.1`) in that directory.
pub fn man(out: Option<PathBuf>) -> anyhow::Result<ExitCode> {
    let cmd = Cli::command();
    let Some(dir) = out else {
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut buf)?;
        return write_stdout(&buf);
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let written = write_pages(cmd, "keywatch", &dir)?;
    eprintln!("wrote {written} man page(s) to {}", dir.display());
    Ok(ExitCode::SUCCESS)
}

fn write_pages(cmd: clap::Command, name: &str, dir: &std::path::Path) -> anyhow::Result<usize> {
    let spaced = name.replace('-', " ");
    let page = cmd.clone().display_name(name.to_owned()).bin_name(spaced);
    let mut buf = Vec::new();
    clap_mangen::Man::new(page).title(name).render(&mut buf)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf).with_context(|| format!("cannot write {}", path.display()))?;
    let mut n = 1;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        n += write_pages(sub.clone(), &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(n)
}
