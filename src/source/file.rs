//! Follows a file like `tail -F`, resumably.
//!
//! # Design
//!
//! [`FileFollower`] runs on a dedicated OS thread doing blocking reads, and hands [`Batch`]es
//! to the async pipeline through a bounded `tokio::sync::mpsc` channel. The bound is what
//! keeps memory bounded: the reader blocks (cancellably) when the channel is full, so it never
//! reads further ahead than the channel holds, and the async runtime never waits on disk.
//!
//! At end of file the thread **polls**: it sleeps [`FollowOptions::poll_interval`] and looks
//! again, instead of using inotify/kqueue. Polling is portable, keeps working on NFS and on
//! overlay or bind-mounted container volumes where change notifications are missing or
//! unreliable, and rotation detection needs a `stat` of the path on every round anyway. While
//! idle it costs a few syscalls per interval.
//!
//! # Positions
//!
//! Every batch carries the [`FilePosition`] just after its last line: the configured path,
//! the (dev, inode) of the file the lines were read from and the byte offset in that file.
//! The offset always belongs to the file named by the inode, even while a rotated file is
//! being finished, and a batch never holds lines of two files. The path is the configured
//! one (a rotated file's new name is not known while it is open); resuming matches files by
//! (dev, inode), not by name.
//!
//! # Rotation and truncation
//!
//! - *rename + create* (logrotate's default): once another file appears at the path, the old
//!   file keeps being read until it has stayed quiet for [`ROTATE_GRACE_POLLS`] poll
//!   intervals (the writer may append to it until it reopens its log), then it is read to its
//!   end, its unterminated last line (if any) is sent as a line, and the new file is read from
//!   its start. While the path is missing, the old file is simply kept open and polled.
//! - *copytruncate*: the file shrinking below the read offset is a truncation: a warning, the
//!   pending partial line is dropped, and the file is read again from its start. A file that
//!   is truncated and then grows past the old offset between two polls cannot be told apart
//!   from one that only grew (the same limit as `tail -F`).
//! - Resuming ([`FileFollower::spawn`] with a saved position): see there.
//!
//! # Over-long lines
//!
//! A line longer than [`FollowOptions::max_line_bytes`] (not counting its `\n`) is not
//! buffered: its bytes are skipped up to the next newline and the batch gets, in its place,
//! a line made of exactly the bytes `<line too long: N bytes>` (N is the full length), at the
//! offset where the line started. No log format decodes that, so the pipeline dead-letters it
//! with its offset, and the skipped line can be found in the file.
//!
//! # Cancellation
//!
//! On cancel the thread stops within one poll interval (also when blocked on a full channel)
//! without sending what it holds: lines not yet sent are read again from the stored position
//! on the next start (the checkpoint contract in [`super`]). When the receiver is dropped,
//! the thread stops too.

use std::fs::{self, File, Metadata};
use std::future::Future;
use std::io::{self, Read, Seek, SeekFrom};
use std::mem;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{Batch, BufferPool, Position};

/// Bytes read from the file per `read` call.
pub(crate) const READ_CHUNK: usize = 64 * 1024;

/// After another file appears at the followed path, the old file must stay quiet for this
/// many poll intervals (1 s at the default interval) before the follower switches: a writer
/// keeps appending to the renamed file until it reopens its log (e.g. nginx on `USR1` from
/// logrotate's `postrotate`), and lines written there after the switch would be lost.
pub const ROTATE_GRACE_POLLS: u32 = 10;

/// How often the lag gauge is refreshed while reading without reaching the end of the file.
const LAG_REFRESH: Duration = Duration::from_secs(1);

/// Where a file source stands: the byte offset just after the last line handed out, in the
/// file identified by (`dev`, `inode`). `path` is the configured path being followed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilePosition {
    pub path: PathBuf,
    pub dev: u64,
    pub inode: u64,
    pub offset: u64,
}

impl FilePosition {
    fn id(&self) -> FileId {
        FileId {
            dev: self.dev,
            inode: self.inode,
        }
    }
}

/// How to read a file (or stdin, which uses the batching fields only).
#[derive(Debug, Clone)]
pub struct FollowOptions {
    pub path: PathBuf,
    /// Keep following the file (and its rotations). When false, read to the end once and
    /// stop; a final line without `\n` is sent too.
    pub follow: bool,
    /// With no saved position, start at the end of the file (like `tail`) instead of at its
    /// beginning. If the file ends mid-line, the rest of that line is skipped.
    pub start_at_end: bool,
    /// Lines per batch at most (default 4096).
    pub max_lines: usize,
    /// Line bytes per batch at most, unless a single line is longer (default 4 MiB).
    pub max_bytes: usize,
    /// A batch that is not full is sent once its first line has waited this long
    /// (default 200 ms).
    pub max_wait: Duration,
    /// Sleep between looks at a file that has no new data (default 100 ms).
    pub poll_interval: Duration,
    /// Longer lines are replaced by a `<line too long: N bytes>` marker line (default 1 MiB).
    pub max_line_bytes: usize,
}

impl Default for FollowOptions {
    fn default() -> Self {
        FollowOptions {
            path: PathBuf::new(),
            follow: true,
            start_at_end: false,
            max_lines: 4096,
            max_bytes: 4 << 20,
            max_wait: Duration::from_millis(200),
            poll_interval: Duration::from_millis(100),
            max_line_bytes: 1 << 20,
        }
    }
}

impl FollowOptions {
    /// The poll interval, never zero (a zero interval would spin).
    pub(crate) fn poll(&self) -> Duration {
        self.poll_interval.max(Duration::from_millis(1))
    }
}

/// A running file follower: the handle of its reader thread.
#[derive(Debug)]
pub struct FileFollower {
    handle: thread::JoinHandle<io::Result<()>>,
}

impl FileFollower {
    /// Starts the reader thread. `saved` is the position stored with the data (None on first
    /// run).
    ///
    /// Where reading starts:
    /// - `saved` names the file now at the path (same dev and inode) and the file is at least
    ///   `saved.offset` long: at `saved.offset`.
    /// - Same file but shorter (truncated while keywatch was down): a warning, from 0.
    /// - Another file is at the path (rotated while keywatch was down): the saved file is
    ///   looked for by (dev, inode) in the path's directory (e.g. `access.log.1`); if found,
    ///   its rest is read first, then the file at the path from 0. If not found, a warning
    ///   (lines may have been missed) and the file at the path from 0.
    /// - No `saved` (or one saved for another path): from 0, or from the end with
    ///   `start_at_end`.
    ///
    /// If the path does not exist, the follower waits for it to appear when `follow` is set,
    /// and fails with `NotFound` otherwise. Other errors opening the file are returned here.
    pub fn spawn(
        opts: FollowOptions,
        saved: Option<FilePosition>,
        tx: Sender<Batch>,
        cancel: CancellationToken,
    ) -> io::Result<FileFollower> {
        if opts.path.as_os_str().is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "file source: empty path",
            ));
        }
        let span = tracing::info_span!("file_source", path = %opts.path.display());
        let start = span.in_scope(|| plan_start(&opts, saved))?;
        let handle = thread::Builder::new()
            .name("keywatch-file".into())
            .spawn(move || {
                let _entered = span.enter();
                let mut follower = Follower::new(opts, start, tx, cancel);
                let result = follower.run();
                match &result {
                    Ok(()) => debug!("file follower stopped"),
                    Err(e) => warn!(error = %e, "file follower failed"),
                }
                result
            })?;
        Ok(FileFollower { handle })
    }

    /// Whether the thread has ended (then [`join`](Self::join) does not block).
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    /// Waits for the thread to end (after cancel, when the receiver is dropped, or at the end
    /// of the file when not following); returns its error if it failed. Blocks: from async
    /// code, call it in `spawn_blocking`.
    pub fn join(self) -> io::Result<()> {
        self.handle
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("file follower thread panicked")))
    }
}

/// Identity of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    inode: u64,
}

impl FileId {
    #[cfg(unix)]
    fn of(meta: &Metadata) -> FileId {
        use std::os::unix::fs::MetadataExt;
        FileId {
            dev: meta.dev(),
            inode: meta.ino(),
        }
    }

    /// Without inodes, every file looks the same: rotation is not detected (truncation is).
    #[cfg(not(unix))]
    fn of(_meta: &Metadata) -> FileId {
        FileId { dev: 0, inode: 0 }
    }
}

struct OpenFile {
    file: File,
    id: FileId,
    size: u64,
}

fn open_file(path: &Path) -> io::Result<OpenFile> {
    let file = File::open(path)?;
    let meta = file.metadata()?;
    Ok(OpenFile {
        id: FileId::of(&meta),
        size: meta.len(),
        file,
    })
}

/// Where the reader thread starts.
struct Start {
    /// None: wait for the path to appear.
    file: Option<OpenFile>,
    offset: u64,
    /// Started mid-line: skip to the next newline.
    skip_first_line: bool,
}

impl Start {
    fn at(mut file: OpenFile, offset: u64) -> io::Result<Start> {
        file.file.seek(SeekFrom::Start(offset))?;
        Ok(Start {
            file: Some(file),
            offset,
            skip_first_line: false,
        })
    }
}

fn plan_start(opts: &FollowOptions, saved: Option<FilePosition>) -> io::Result<Start> {
    let saved = match saved {
        Some(s) if s.path != opts.path => {
            warn!(
                saved_path = %s.path.display(),
                "the saved position is for another path; ignoring it"
            );
            None
        }
        s => s,
    };
    let (current, open_err) = match open_file(&opts.path) {
        Ok(f) => (Some(f), None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => (None, Some(e)),
        Err(e) => return Err(e),
    };
    let missing = |open_err: Option<io::Error>| {
        if opts.follow {
            info!("file does not exist (yet); waiting for it to appear");
            Ok(Start {
                file: None,
                offset: 0,
                skip_first_line: false,
            })
        } else {
            Err(open_err.unwrap_or_else(|| io::ErrorKind::NotFound.into()))
        }
    };
    match (saved, current) {
        (Some(s), Some(f)) if f.id == s.id() => {
            if f.size >= s.offset {
                debug!(offset = s.offset, "resuming at the saved position");
                Start::at(f, s.offset)
            } else {
                warn!(
                    size = f.size,
                    saved_offset = s.offset,
                    "file is shorter than the saved position (truncated while keywatch was \
                     down); reading it from the start"
                );
                metrics::counter!("keywatch_source_truncations_total").increment(1);
                Start::at(f, 0)
            }
        }
        (Some(s), current) => match find_by_id(&opts.path, s.id()) {
            Some((old_path, old)) if old.size >= s.offset => {
                info!(
                    rotated_to = %old_path.display(),
                    offset = s.offset,
                    "file was rotated while keywatch was down; finishing the rotated file first"
                );
                Start::at(old, s.offset)
            }
            _ => {
                warn!(
                    saved_inode = s.inode,
                    saved_offset = s.offset,
                    "file was rotated while keywatch was down and the saved file was not found \
                     next to it; lines written after the saved position may have been missed"
                );
                match current {
                    Some(f) => Start::at(f, 0),
                    None => missing(open_err),
                }
            }
        },
        (None, Some(mut f)) => {
            if !opts.start_at_end || f.size == 0 {
                return Start::at(f, 0);
            }
            // If the file ends mid-line, the rest of that line arrives later: skip it rather
            // than send a fragment.
            let mut last = [0u8; 1];
            f.file.seek(SeekFrom::Start(f.size - 1))?;
            f.file.read_exact(&mut last)?;
            let offset = f.size;
            Ok(Start {
                file: Some(f),
                offset,
                skip_first_line: last[0] != b'\n',
            })
        }
        (None, None) => missing(open_err),
    }
}

/// Looks for the file with identity `id` in the directory of `path`.
fn find_by_id(path: &Path, id: FileId) -> Option<(PathBuf, OpenFile)> {
    if !cfg!(unix) {
        return None;
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) => {
            warn!(dir = %dir.display(), error = %e, "cannot list the log directory");
            return None;
        }
    };
    for entry in entries.flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        if !meta.is_file() || FileId::of(&meta) != id {
            continue;
        }
        let candidate = entry.path();
        // Check the identity of what was opened, in case it changed since the listing.
        if let Ok(f) = open_file(&candidate) {
            if f.id == id {
                return Some((candidate, f));
            }
        }
    }
    None
}

/// Why the reader thread stops.
enum Halt {
    /// Cancelled or the receiver is gone: a normal stop.
    Stopped,
    Io(io::Error),
}

impl From<Stopped> for Halt {
    fn from(_: Stopped) -> Self {
        Halt::Stopped
    }
}

impl From<io::Error> for Halt {
    fn from(e: io::Error) -> Self {
        Halt::Io(e)
    }
}

struct Current {
    file: File,
    id: FileId,
}

/// The state of the reader thread.
struct Follower {
    path: PathBuf,
    follow: bool,
    poll: Duration,
    grace: Duration,
    lines: LineBatcher,
    cur: Option<Current>,
    buf: Vec<u8>,
    /// Another file is at the path; since when the old one has been quiet.
    rotation_quiet_since: Option<Instant>,
    /// A problem with the path (missing, unreadable) was logged; log when it is resolved.
    path_problem: bool,
    lag_updated: Instant,
    rotations: metrics::Counter,
    truncations: metrics::Counter,
    lag: metrics::Gauge,
}

impl Follower {
    fn new(
        opts: FollowOptions,
        start: Start,
        tx: Sender<Batch>,
        cancel: CancellationToken,
    ) -> Follower {
        let poll = opts.poll();
        let cur = start.file.map(|f| Current {
            file: f.file,
            id: f.id,
        });
        let source = file_source(&opts.path, cur.as_ref().map(|c| c.id));
        let mut lines = LineBatcher::new(&opts, source, start.offset, tx, cancel);
        if start.skip_first_line {
            lines.restart(lines.source.clone(), start.offset, true);
        }
        Follower {
            path: opts.path,
            follow: opts.follow,
            poll,
            grace: poll * ROTATE_GRACE_POLLS,
            lines,
            cur,
            buf: vec![0; READ_CHUNK],
            rotation_quiet_since: None,
            path_problem: false,
            lag_updated: Instant::now(),
            rotations: metrics::counter!("keywatch_source_rotations_total"),
            truncations: metrics::counter!("keywatch_source_truncations_total"),
            lag: metrics::gauge!("keywatch_source_lag_bytes"),
        }
    }

    fn run(&mut self) -> io::Result<()> {
        match self.run_inner() {
            Ok(()) | Err(Halt::Stopped) => Ok(()),
            Err(Halt::Io(e)) => Err(e),
        }
    }

    fn run_inner(&mut self) -> Result<(), Halt> {
        loop {
            if self.lines.should_stop() {
                return Err(Halt::Stopped);
            }
            if self.cur.is_none() {
                if !self.open_path_initially() {
                    thread::sleep(self.poll);
                }
                continue;
            }
            if self.read_some()? > 0 {
                if self.rotation_quiet_since.is_some() {
                    self.rotation_quiet_since = Some(Instant::now());
                }
                self.lines.flush_if_due()?;
                if self.lag_updated.elapsed() >= LAG_REFRESH {
                    self.check_truncation()?;
                }
                continue;
            }
            // At the end of the current file.
            if self.check_truncation()? || self.check_rotation()? {
                continue;
            }
            if !self.follow {
                self.lines.finish_line()?;
                self.lines.flush()?;
                return Ok(());
            }
            self.lines.flush_if_due()?;
            let nap = match self.lines.due_in() {
                Some(due) => self.poll.min(due).max(Duration::from_millis(1)),
                None => self.poll,
            };
            thread::sleep(nap);
        }
    }

    /// Reads one chunk of the current file into the batcher; returns the bytes read.
    fn read_some(&mut self) -> Result<usize, Halt> {
        let Some(cur) = self.cur.as_mut() else {
            return Ok(0);
        };
        let n = loop {
            match cur.file.read(&mut self.buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        };
        self.lines.feed(&self.buf[..n])?;
        Ok(n)
    }

    /// Waiting for the path to appear: tries to open it. Returns whether it did.
    fn open_path_initially(&mut self) -> bool {
        match open_file(&self.path) {
            Ok(f) => {
                info!(
                    inode = f.id.inode,
                    "file appeared; reading it from the start"
                );
                self.path_problem = false;
                self.lines
                    .restart(file_source(&self.path, Some(f.id)), 0, false);
                self.cur = Some(Current {
                    file: f.file,
                    id: f.id,
                });
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => {
                if !self.path_problem {
                    warn!(error = %e, "cannot open the file; retrying");
                    self.path_problem = true;
                }
                false
            }
        }
    }

    /// Checks the current file for truncation (and refreshes the lag gauge). Returns whether
    /// it was truncated (and is now read again from its start).
    fn check_truncation(&mut self) -> Result<bool, Halt> {
        let Some(cur) = self.cur.as_mut() else {
            return Ok(false);
        };
        let size = cur.file.metadata()?.len();
        let offset = self.lines.offset();
        self.lag_updated = Instant::now();
        if size >= offset {
            self.lag.set((size - offset) as f64);
            return Ok(false);
        }
        let dropped = self.lines.discard_partial();
        self.lines.flush()?;
        warn!(
            inode = cur.id.inode,
            size,
            offset,
            dropped_partial_bytes = dropped,
            "file was truncated (copytruncate?); reading it again from the start"
        );
        self.truncations.increment(1);
        cur.file.seek(SeekFrom::Start(0))?;
        let source = self.lines.source.clone();
        self.lines.restart(source, 0, false);
        self.lag.set(size as f64);
        Ok(true)
    }

    /// At the end of the current file: if another file is at the path (and the current one
    /// has been quiet long enough when following), finishes the current file and switches.
    /// Returns whether it switched.
    fn check_rotation(&mut self) -> Result<bool, Halt> {
        let Some(cur_id) = self.cur.as_ref().map(|c| c.id) else {
            return Ok(false);
        };
        match fs::metadata(&self.path) {
            Ok(meta) if FileId::of(&meta) == cur_id => {
                if self.path_problem {
                    info!("file is back at its path");
                    self.path_problem = false;
                }
                self.rotation_quiet_since = None;
                Ok(false)
            }
            Ok(_) => {
                if self.follow {
                    let since = *self.rotation_quiet_since.get_or_insert_with(Instant::now);
                    if since.elapsed() < self.grace {
                        return Ok(false);
                    }
                }
                self.switch_file(cur_id)
            }
            Err(e) => {
                if !self.path_problem {
                    if e.kind() == io::ErrorKind::NotFound {
                        info!(
                            "file is gone from its path (rotation?); still reading the open file"
                        );
                    } else {
                        warn!(error = %e, "cannot stat the file path; still reading the open file");
                    }
                    self.path_problem = true;
                }
                Ok(false)
            }
        }
    }

    fn switch_file(&mut self, old_id: FileId) -> Result<bool, Halt> {
        // Data may have landed since the last read: read the old file to its end.
        while self.read_some()? > 0 {
            if self.lines.should_stop() {
                return Err(Halt::Stopped);
            }
        }
        let new = match open_file(&self.path) {
            Ok(f) if f.id != old_id => f,
            // The old file is back at the path.
            Ok(_) => return Ok(false),
            Err(e) => {
                if !self.path_problem {
                    warn!(error = %e, "cannot open the new file at the path; still reading the old one");
                    self.path_problem = true;
                }
                return Ok(false);
            }
        };
        // The writer has moved on: an unterminated last line of the old file is complete.
        self.lines.finish_line()?;
        // Never mix lines of two files in one batch.
        self.lines.flush()?;
        info!(
            old_inode = old_id.inode,
            new_inode = new.id.inode,
            "file rotated; reading the new file from the start"
        );
        self.rotations.increment(1);
        self.rotation_quiet_since = None;
        self.path_problem = false;
        self.lines
            .restart(file_source(&self.path, Some(new.id)), 0, false);
        self.cur = Some(Current {
            file: new.file,
            id: new.id,
        });
        Ok(true)
    }
}

fn file_source(path: &Path, id: Option<FileId>) -> Position {
    let id = id.unwrap_or(FileId { dev: 0, inode: 0 });
    Position::File(FilePosition {
        path: path.to_path_buf(),
        dev: id.dev,
        inode: id.inode,
        offset: 0,
    })
}

/// The receiver is gone or the source was cancelled: stop reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stopped;

pub(crate) type Flow = Result<(), Stopped>;

/// What to do with the bytes of the current line until its newline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Skip {
    /// Keep them (in `partial`).
    No,
    /// Drop them silently (started in the middle of a line).
    Discard,
    /// Over-long: drop them, counting (the count so far).
    TooLong(u64),
}

/// Splits a byte stream into lines and groups them into [`Batch`]es sent on a channel:
/// shared by the file and stdin sources.
///
/// Offsets count bytes of the stream (the file) from the offset given to
/// [`new`](Self::new) / [`restart`](Self::restart). A batch is sent when it reaches
/// `max_lines` or `max_bytes`, when its first line has waited `max_wait`
/// ([`flush_if_due`](Self::flush_if_due)), or on [`flush`](Self::flush).
pub(crate) struct LineBatcher {
    max_lines: usize,
    max_bytes: usize,
    max_wait: Duration,
    max_line_bytes: usize,
    tx: Sender<Batch>,
    cancel: CancellationToken,
    /// The position of the stream; its offset is replaced when a batch is sent.
    source: Position,
    /// Just after the last byte fed.
    offset: u64,
    /// Where the current (incomplete) line starts.
    line_start: u64,
    partial: Vec<u8>,
    skip: Skip,
    batch: Batch,
    /// Where the line buffers of sent batches come back to.
    pool: BufferPool,
    /// Just after the last line in `batch`.
    batch_end: u64,
    batch_since: Option<Instant>,
    lines_total: metrics::Counter,
}

impl LineBatcher {
    pub(crate) fn new(
        opts: &FollowOptions,
        source: Position,
        offset: u64,
        tx: Sender<Batch>,
        cancel: CancellationToken,
    ) -> LineBatcher {
        let pool = BufferPool::default();
        LineBatcher {
            max_lines: opts.max_lines.max(1),
            max_bytes: opts.max_bytes.max(1),
            max_wait: opts.max_wait,
            max_line_bytes: opts.max_line_bytes.max(1),
            tx,
            cancel,
            source,
            offset,
            line_start: offset,
            partial: Vec::new(),
            skip: Skip::No,
            batch: pool.batch(),
            pool,
            batch_end: offset,
            batch_since: None,
            lines_total: metrics::counter!("keywatch_source_lines_total"),
        }
    }

    /// Cancelled, or nobody receives batches any more.
    pub(crate) fn should_stop(&self) -> bool {
        self.cancel.is_cancelled() || self.tx.is_closed()
    }

    /// The offset just after the last byte fed.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// Starts over on another stream (or the same one at another offset). The batch must
    /// have been flushed; a partial line is dropped. With `skip_first_line`, the bytes up to
    /// the first newline are dropped (the offset is mid-line).
    pub(crate) fn restart(&mut self, source: Position, offset: u64, skip_first_line: bool) {
        debug_assert!(self.batch.is_empty(), "restart with an unsent batch");
        self.source = source;
        self.offset = offset;
        self.line_start = offset;
        self.batch_end = offset;
        self.partial.clear();
        self.skip = if skip_first_line {
            Skip::Discard
        } else {
            Skip::No
        };
    }

    /// Feeds bytes that follow the ones fed before. Sends full batches.
    pub(crate) fn feed(&mut self, mut data: &[u8]) -> Flow {
        while let Some(i) = memchr::memchr(b'\n', data) {
            self.offset += i as u64 + 1;
            self.complete_line(&data[..i])?;
            data = &data[i + 1..];
        }
        if !data.is_empty() {
            self.offset += data.len() as u64;
            self.extend_partial(data);
        }
        Ok(())
    }

    /// At the real end of the stream: sends an unterminated last line as a line.
    pub(crate) fn finish_line(&mut self) -> Flow {
        self.complete_line(&[])
    }

    /// Drops the incomplete current line; returns its length in bytes.
    pub(crate) fn discard_partial(&mut self) -> u64 {
        let dropped = self.offset - self.line_start;
        self.partial.clear();
        self.skip = Skip::No;
        self.line_start = self.offset;
        dropped
    }

    /// Sends the batch if it has lines.
    pub(crate) fn flush(&mut self) -> Flow {
        if self.batch.is_empty() {
            return Ok(());
        }
        let mut batch = mem::replace(&mut self.batch, self.pool.batch());
        self.batch_since = None;
        batch.position = Some(with_offset(&self.source, self.batch_end));
        let lines = batch.len() as u64;
        let (tx, cancel) = (&self.tx, &self.cancel);
        // Like `blocking_send`, but wakes up on cancel when the channel is full.
        let sent = block_on(async {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => false,
                sent = tx.send(batch) => sent.is_ok(),
            }
        });
        if sent {
            self.lines_total.increment(lines);
            Ok(())
        } else {
            Err(Stopped)
        }
    }

    /// Sends the batch if its first line has waited `max_wait`.
    pub(crate) fn flush_if_due(&mut self) -> Flow {
        match self.batch_since {
            Some(since) if since.elapsed() >= self.max_wait => self.flush(),
            _ => Ok(()),
        }
    }

    /// How long until the batch is due, if it has lines.
    pub(crate) fn due_in(&self) -> Option<Duration> {
        self.batch_since
            .map(|since| self.max_wait.saturating_sub(since.elapsed()))
    }

    /// The current line ends with `tail` (its `\n`, if any, is already counted in `offset`).
    fn complete_line(&mut self, tail: &[u8]) -> Flow {
        let (start, end) = (self.line_start, self.offset);
        self.line_start = end;
        match mem::replace(&mut self.skip, Skip::No) {
            Skip::Discard => Ok(()),
            Skip::TooLong(n) => self.push_too_long(n + tail.len() as u64, start, end),
            Skip::No => {
                let len = self.partial.len() + tail.len();
                if len > self.max_line_bytes {
                    self.partial.clear();
                    self.push_too_long(len as u64, start, end)
                } else if self.partial.is_empty() {
                    if start == end {
                        // finish_line with nothing pending.
                        return Ok(());
                    }
                    self.push(tail, start, end)
                } else {
                    let mut line = mem::take(&mut self.partial);
                    line.extend_from_slice(tail);
                    let flow = self.push(&line, start, end);
                    line.clear();
                    self.partial = line;
                    flow
                }
            }
        }
    }

    fn extend_partial(&mut self, data: &[u8]) {
        match &mut self.skip {
            Skip::Discard => {}
            Skip::TooLong(n) => *n += data.len() as u64,
            Skip::No => {
                let len = self.partial.len() + data.len();
                if len > self.max_line_bytes {
                    self.skip = Skip::TooLong(len as u64);
                    self.partial = Vec::new();
                } else {
                    self.partial.extend_from_slice(data);
                }
            }
        }
    }

    fn push_too_long(&mut self, len: u64, start: u64, end: u64) -> Flow {
        debug!(
            offset = start,
            bytes = len,
            "over-long line replaced by a marker"
        );
        let marker = crate::event::too_long_marker(len);
        self.push(marker.as_bytes(), start, end)
    }

    fn push(&mut self, line: &[u8], start: u64, end: u64) -> Flow {
        if !self.batch.is_empty() && self.batch.buf.len() + line.len() > self.max_bytes {
            self.flush()?;
        }
        self.batch.push_line(line, start);
        self.batch_end = end;
        self.batch_since.get_or_insert_with(Instant::now);
        if self.batch.len() >= self.max_lines || self.batch.buf.len() >= self.max_bytes {
            self.flush()?;
        }
        Ok(())
    }
}

fn with_offset(source: &Position, offset: u64) -> Position {
    match source {
        Position::File(f) => Position::File(FilePosition {
            offset,
            ..f.clone()
        }),
        Position::Stdin { .. } => Position::Stdin { offset },
        Position::Kafka { .. } => unreachable!("line sources never hold Kafka positions"),
    }
}

/// Runs a future to completion on the current (non-async) thread, parking it while the
/// future is pending. Used for a cancellable channel send from the reader threads; the
/// futures involved (tokio `mpsc` send, `CancellationToken::cancelled`) need no runtime.
fn block_on<F: Future>(fut: F) -> F::Output {
    struct Unpark(thread::Thread);
    impl Wake for Unpark {
        fn wake(self: Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.unpark();
        }
    }
    let mut fut = std::pin::pin!(fut);
    let waker = Waker::from(Arc::new(Unpark(thread::current())));
    let mut cx = Context::from_waker(&waker);
    loop {
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(out) => return out,
            // Spurious unparks just poll again.
            Poll::Pending => thread::park(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::mpsc;

    fn batcher(opts: &FollowOptions, cap: usize) -> (LineBatcher, mpsc::Receiver<Batch>) {
        let (tx, rx) = mpsc::channel(cap);
        let source = Position::Stdin { offset: 0 };
        let b = LineBatcher::new(opts, source, 0, tx, CancellationToken::new());
        (b, rx)
    }

    /// (line, offset) pairs and the position of every batch.
    fn drain(rx: &mut mpsc::Receiver<Batch>) -> (Vec<(String, u64)>, Vec<u64>) {
        let (mut lines, mut ends) = (Vec::new(), Vec::new());
        while let Ok(b) = rx.try_recv() {
            for i in 0..b.len() {
                let line = String::from_utf8(b.line(i).to_vec()).unwrap();
                lines.push((line, b.line_offsets[i]));
            }
            match b.position.clone() {
                Some(Position::Stdin { offset }) => ends.push(offset),
                other => panic!("unexpected position {other:?}"),
            }
        }
        (lines, ends)
    }

    fn owned(v: &[(&str, u64)]) -> Vec<(String, u64)> {
        v.iter().map(|(s, o)| (s.to_string(), *o)).collect()
    }

    #[test]
    fn splits_lines_across_arbitrary_chunks() {
        let input = b"alpha\nbe\r\nc\n\nlast";
        for chunk in 1..input.len() {
            let (mut b, mut rx) = batcher(&FollowOptions::default(), 16);
            for part in input.chunks(chunk) {
                b.feed(part).unwrap();
            }
            b.flush().unwrap();
            let (lines, ends) = drain(&mut rx);
            assert_eq!(
                lines,
                owned(&[("alpha", 0), ("be", 6), ("c", 10), ("", 12)]),
                "chunk {chunk}"
            );
            assert_eq!(ends, vec![13]);
            b.finish_line().unwrap();
            b.flush().unwrap();
            assert_eq!(drain(&mut rx), (owned(&[("last", 13)]), vec![17]));
        }
    }

    #[test]
    fn finish_line_without_partial_sends_nothing() {
        let (mut b, mut rx) = batcher(&FollowOptions::default(), 4);
        b.feed(b"a\n").unwrap();
        b.finish_line().unwrap();
        b.flush().unwrap();
        assert_eq!(drain(&mut rx), (owned(&[("a", 0)]), vec![2]));
    }

    #[test]
    fn batches_by_lines_and_bytes() {
        let opts = FollowOptions {
            max_lines: 2,
            max_bytes: 6,
            ..Default::default()
        };
        let (mut b, mut rx) = batcher(&opts, 16);
        // Lines: a(1) b(1) -> full by lines; cccc(4) dd(2) -> full by bytes (6);
        // eeeeeee (7) alone (longer than max_bytes), f.
        b.feed(b"a\nb\ncccc\ndd\neeeeeee\nf\n").unwrap();
        b.flush().unwrap();
        let mut sizes = Vec::new();
        let mut ends = Vec::new();
        while let Ok(batch) = rx.try_recv() {
            sizes.push(batch.len());
            let Some(Position::Stdin { offset }) = batch.position else {
                panic!()
            };
            ends.push(offset);
        }
        assert_eq!(sizes, vec![2, 2, 1, 1]);
        assert_eq!(ends, vec![4, 12, 20, 22]);
    }

    #[test]
    fn over_long_lines_become_markers() {
        let opts = FollowOptions {
            max_line_bytes: 4,
            ..Default::default()
        };
        let (mut b, mut rx) = batcher(&opts, 16);
        // In one chunk; then across chunks (partial grows past the limit); exactly the limit.
        b.feed(b"12345\nab").unwrap();
        b.feed(b"cd").unwrap();
        b.feed(b"efg").unwrap();
        b.feed(b"h\nabcd\ntoolong").unwrap();
        b.finish_line().unwrap();
        b.flush().unwrap();
        let (lines, ends) = drain(&mut rx);
        assert_eq!(
            lines,
            owned(&[
                ("<line too long: 5 bytes>", 0),
                ("<line too long: 8 bytes>", 6),
                ("abcd", 15),
                ("<line too long: 7 bytes>", 20),
            ])
        );
        assert_eq!(ends, vec![27]);
        assert!(b.partial.capacity() <= 2 * 4 + 16);
    }

    #[test]
    fn skip_first_line_and_discard_partial() {
        let (mut b, mut rx) = batcher(&FollowOptions::default(), 16);
        b.restart(Position::Stdin { offset: 0 }, 10, true);
        b.feed(b"rest of line\nnext\npart").unwrap();
        assert_eq!(b.discard_partial(), 4);
        b.feed(b"new\n").unwrap();
        b.flush().unwrap();
        assert_eq!(
            drain(&mut rx),
            (owned(&[("next", 23), ("new", 32)]), vec![36])
        );
    }

    #[test]
    fn flush_if_due_waits_for_max_wait() {
        let opts = FollowOptions {
            max_wait: Duration::from_millis(30),
            ..Default::default()
        };
        let (mut b, mut rx) = batcher(&opts, 4);
        assert_eq!(b.due_in(), None);
        b.feed(b"x\n").unwrap();
        b.flush_if_due().unwrap();
        assert!(rx.try_recv().is_err());
        assert!(b.due_in().unwrap() <= Duration::from_millis(30));
        thread::sleep(Duration::from_millis(40));
        b.flush_if_due().unwrap();
        assert_eq!(rx.try_recv().unwrap().len(), 1);
        assert_eq!(b.due_in(), None);
    }

    #[test]
    fn send_stops_on_cancel_when_full_and_on_closed_receiver() {
        let (tx, rx) = mpsc::channel(1);
        let cancel = CancellationToken::new();
        let opts = FollowOptions {
            max_lines: 1,
            ..Default::default()
        };
        let mut b = LineBatcher::new(&opts, Position::Stdin { offset: 0 }, 0, tx, cancel.clone());
        b.feed(b"fills the channel\n").unwrap();
        let canceller = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            cancel.cancel();
        });
        let started = Instant::now();
        assert_eq!(b.feed(b"blocks\n"), Err(Stopped));
        assert!(started.elapsed() < Duration::from_secs(2));
        canceller.join().unwrap();

        let (tx, rx2) = mpsc::channel(1);
        drop(rx2);
        let mut b = LineBatcher::new(
            &opts,
            Position::Stdin { offset: 0 },
            0,
            tx,
            CancellationToken::new(),
        );
        assert_eq!(b.feed(b"nobody listens\n"), Err(Stopped));
        drop(rx);
    }

    #[test]
    fn start_at_end_mid_line_skips_the_fragment() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        fs::write(&path, b"old\npar").unwrap();
        let opts = FollowOptions {
            path: path.clone(),
            start_at_end: true,
            ..Default::default()
        };
        let start = plan_start(&opts, None).unwrap();
        assert_eq!(start.offset, 7);
        assert!(start.skip_first_line);
        fs::write(&path, b"old\n").unwrap();
        let start = plan_start(&opts, None).unwrap();
        assert_eq!(start.offset, 4);
        assert!(!start.skip_first_line);
    }

    #[test]
    fn saved_position_for_another_path_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        fs::write(&path, b"0123456789\n").unwrap();
        let id = open_file(&path).unwrap().id;
        let opts = FollowOptions {
            path: path.clone(),
            ..Default::default()
        };
        let saved = FilePosition {
            path: dir.path().join("other.log"),
            dev: id.dev,
            inode: id.inode,
            offset: 5,
        };
        assert_eq!(plan_start(&opts, Some(saved.clone())).unwrap().offset, 0);
        let saved = FilePosition { path, ..saved };
        assert_eq!(plan_start(&opts, Some(saved)).unwrap().offset, 5);
    }
}
