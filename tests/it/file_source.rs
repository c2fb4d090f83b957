//! The file source against real files: follow, rotation, truncation, resume, cancel.
//!
//! Every receive has a timeout, so a broken follower fails a test instead of hanging it.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

use keywatch::source::{Batch, FileFollower, FilePosition, FollowOptions, Position};
use tokio::sync::mpsc;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

const RECV_TIMEOUT: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(10);

fn opts(path: &Path) -> FollowOptions {
    FollowOptions {
        path: path.to_path_buf(),
        poll_interval: POLL,
        max_wait: Duration::from_millis(10),
        ..Default::default()
    }
}

fn append(path: &Path, data: &[u8]) {
    let mut f = OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
        .unwrap();
    f.write_all(data).unwrap();
}

/// (dev, inode) of a path.
fn id(path: &Path) -> (u64, u64) {
    let m = fs::metadata(path).unwrap();
    (m.dev(), m.ino())
}

/// One received line: text, offset of its start, inode of the batch it came in.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Line {
    text: String,
    offset: u64,
    inode: u64,
}

fn line(text: &str, offset: u64, inode: u64) -> Line {
    Line {
        text: text.to_string(),
        offset,
        inode,
    }
}

struct Harness {
    rx: mpsc::Receiver<Batch>,
    cancel: CancellationToken,
    follower: FileFollower,
    /// The position of the last batch received.
    last: Option<FilePosition>,
}

fn start(opts: FollowOptions, saved: Option<FilePosition>) -> Harness {
    start_with_capacity(opts, saved, 16)
}

fn start_with_capacity(opts: FollowOptions, saved: Option<FilePosition>, cap: usize) -> Harness {
    let (tx, rx) = mpsc::channel(cap);
    let cancel = CancellationToken::new();
    let path = opts.path.clone();
    let follower = FileFollower::spawn(opts, saved, tx, cancel.clone()).unwrap();
    let h = Harness {
        rx,
        cancel,
        follower,
        last: None,
    };
    assert!(!path.as_os_str().is_empty());
    h
}

/// Waits (bounded) for the follower thread to end.
async fn join(follower: FileFollower) -> io::Result<()> {
    timeout(
        RECV_TIMEOUT,
        tokio::task::spawn_blocking(move || follower.join()),
    )
    .await
    .expect("follower thread did not end")
    .unwrap()
}

impl Harness {
    /// Receives batches until `n` lines have arrived (fails on timeout or on more lines).
    /// Checks each batch: a file position, offsets increasing and before the position.
    async fn lines(&mut self, n: usize) -> Vec<Line> {
        let mut out = Vec::new();
        while out.len() < n {
            let batch = timeout(RECV_TIMEOUT, self.rx.recv())
                .await
                .unwrap_or_else(|_| panic!("timed out after {} of {n} lines: {out:?}", out.len()))
                .expect("channel closed");
            assert!(!batch.is_empty(), "empty batch sent");
            assert_eq!(batch.lines.len(), batch.line_offsets.len());
            let Some(Position::File(pos)) = batch.position.clone() else {
                panic!("batch without a file position: {:?}", batch.position)
            };
            for i in 0..batch.len() {
                let offset = batch.line_offsets[i];
                assert!(
                    offset < pos.offset,
                    "line offset {offset} not before {pos:?}"
                );
                if i > 0 {
                    assert!(batch.line_offsets[i - 1] < offset);
                }
                let text = String::from_utf8(batch.line(i).to_vec()).unwrap();
                out.push(line(&text, offset, pos.inode));
            }
            self.last = Some(pos);
        }
        assert_eq!(out.len(), n, "more lines than expected: {out:?}");
        out
    }

    /// Nothing arrives for `d`.
    async fn quiet(&mut self, d: Duration) {
        if let Ok(got) = timeout(d, self.rx.recv()).await {
            panic!("unexpected batch: {got:?}");
        }
    }

    fn last_offset(&self) -> u64 {
        self.last.as_ref().expect("no batch received").offset
    }

    /// Cancels and waits for the thread.
    async fn stop(self) {
        self.cancel.cancel();
        join(self.follower).await.unwrap();
    }

    /// Not following: the thread ends by itself and closes the channel.
    async fn finished(mut self) {
        let end = timeout(RECV_TIMEOUT, self.rx.recv()).await;
        assert!(
            matches!(end, Ok(None)),
            "expected the channel to close: {end:?}"
        );
        join(self.follower).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn reads_to_eof_without_follow_including_unterminated_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"a\nbb\r\n\nlast").unwrap();
    let (dev, ino) = id(&path);
    let mut h = start(
        FollowOptions {
            follow: false,
            ..opts(&path)
        },
        None,
    );
    let got = h.lines(4).await;
    assert_eq!(
        got,
        vec![
            line("a", 0, ino),
            line("bb", 2, ino),
            line("", 6, ino),
            line("last", 7, ino),
        ]
    );
    assert_eq!(
        h.last,
        Some(FilePosition {
            path: path.clone(),
            dev,
            inode: ino,
            offset: 11
        })
    );
    h.finished().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn batches_respect_max_lines_and_carry_their_end_position() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"1\n2\n3\n4\n5\n").unwrap();
    let (tx, mut rx) = mpsc::channel(16);
    let opts = FollowOptions {
        follow: false,
        max_lines: 2,
        ..opts(&path)
    };
    let f = FileFollower::spawn(opts, None, tx, CancellationToken::new()).unwrap();
    let mut shape = Vec::new();
    while let Some(b) = timeout(RECV_TIMEOUT, rx.recv()).await.unwrap() {
        let Some(Position::File(pos)) = &b.position else {
            panic!()
        };
        shape.push((b.len(), pos.offset));
    }
    assert_eq!(shape, vec![(2, 4), (2, 8), (1, 10)]);
    join(f).await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn follows_appended_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"one\n").unwrap();
    let (_, ino) = id(&path);
    let mut h = start(opts(&path), None);
    assert_eq!(h.lines(1).await, vec![line("one", 0, ino)]);
    assert_eq!(h.last_offset(), 4);
    h.quiet(Duration::from_millis(50)).await;
    append(&path, b"two\nthree\n");
    assert_eq!(
        h.lines(2).await,
        vec![line("two", 4, ino), line("three", 8, ino)]
    );
    assert_eq!(h.last_offset(), 14);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn partial_line_waits_for_its_newline() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"hel").unwrap();
    let (_, ino) = id(&path);
    let mut h = start(opts(&path), None);
    h.quiet(Duration::from_millis(100)).await;
    append(&path, b"lo\nwor");
    assert_eq!(h.lines(1).await, vec![line("hello", 0, ino)]);
    assert_eq!(h.last_offset(), 6);
    h.quiet(Duration::from_millis(100)).await;
    append(&path, b"ld\n");
    assert_eq!(h.lines(1).await, vec![line("world", 6, ino)]);
    assert_eq!(h.last_offset(), 12);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rename_rotation_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    fs::write(&path, b"a1\n").unwrap();
    let (_, old) = id(&path);
    let mut h = start(opts(&path), None);
    assert_eq!(h.lines(1).await, vec![line("a1", 0, old)]);

    // logrotate renames; the writer keeps appending to the renamed file for a while, and
    // the path stays missing for many poll intervals.
    fs::rename(&path, &rotated).unwrap();
    append(&rotated, b"a2\n");
    tokio::time::sleep(POLL * 5).await;
    append(&rotated, b"a3\n");
    assert_eq!(
        h.lines(2).await,
        vec![line("a2", 3, old), line("a3", 6, old)]
    );

    // The new file appears, and the writer appends to the old one once more before reopening
    // (a few polls later, within the rotation grace period).
    fs::write(&path, b"b1\n").unwrap();
    let (_, new) = id(&path);
    assert_ne!(old, new);
    tokio::time::sleep(POLL * 3).await;
    append(&rotated, b"a4\n");
    // Lines are attributed per batch: a batch mixing the two files would fail here.
    assert_eq!(
        h.lines(2).await,
        vec![line("a4", 9, old), line("b1", 0, new)]
    );
    assert_eq!(h.last_offset(), 3);

    append(&path, b"b2\n");
    assert_eq!(h.lines(1).await, vec![line("b2", 3, new)]);
    assert_eq!(h.last_offset(), 6);
    // Nothing twice.
    h.quiet(Duration::from_millis(200)).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_sends_the_old_files_unterminated_last_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"a1\na2").unwrap();
    let (_, old) = id(&path);
    let mut h = start(opts(&path), None);
    assert_eq!(h.lines(1).await, vec![line("a1", 0, old)]);
    fs::rename(&path, dir.path().join("access.log.1")).unwrap();
    fs::write(&path, b"b1\n").unwrap();
    let (_, new) = id(&path);
    assert_eq!(
        h.lines(2).await,
        vec![line("a2", 3, old), line("b1", 0, new)]
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn copytruncate_is_read_again_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"x1\nx2\n").unwrap();
    let (_, ino) = id(&path);
    let mut h = start(opts(&path), None);
    assert_eq!(
        h.lines(2).await,
        vec![line("x1", 0, ino), line("x2", 3, ino)]
    );

    fs::copy(&path, dir.path().join("access.log.1")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    append(&path, b"y1\n");
    assert_eq!(h.lines(1).await, vec![line("y1", 0, ino)]);
    assert_eq!(h.last_offset(), 3);
    append(&path, b"y2\n");
    assert_eq!(h.lines(1).await, vec![line("y2", 3, ino)]);
    h.quiet(Duration::from_millis(100)).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resumes_from_a_saved_position_in_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"a\nb\nc\n").unwrap();
    let (dev, ino) = id(&path);
    let saved = FilePosition {
        path: path.clone(),
        dev,
        inode: ino,
        offset: 2,
    };
    let mut h = start(
        FollowOptions {
            follow: false,
            ..opts(&path)
        },
        Some(saved),
    );
    assert_eq!(h.lines(2).await, vec![line("b", 2, ino), line("c", 4, ino)]);
    assert_eq!(h.last_offset(), 6);
    h.finished().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn resumes_after_rotation_while_down() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    fs::write(&path, b"a\nb\n").unwrap();
    let (dev, old) = id(&path);
    let saved = FilePosition {
        path: path.clone(),
        dev,
        inode: old,
        offset: 2,
    };
    // While keywatch is down: more lines, rotation, a new file with lines.
    append(&path, b"c\n");
    fs::rename(&path, &rotated).unwrap();
    fs::write(&path, b"d\ne\n").unwrap();
    let (_, new) = id(&path);

    let mut h = start(opts(&path), Some(saved));
    assert_eq!(
        h.lines(4).await,
        vec![
            line("b", 2, old),
            line("c", 4, old),
            line("d", 0, new),
            line("e", 2, new),
        ]
    );
    assert_eq!(h.last_offset(), 4);
    append(&path, b"f\n");
    assert_eq!(h.lines(1).await, vec![line("f", 4, new)]);
    h.quiet(Duration::from_millis(100)).await;
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rotated_while_down_without_the_saved_file_starts_the_new_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"n1\nn2\n").unwrap();
    let (dev, ino) = id(&path);
    let saved = FilePosition {
        path: path.clone(),
        dev,
        inode: ino.wrapping_add(0x5eed_0000),
        offset: 4,
    };
    let mut h = start(
        FollowOptions {
            follow: false,
            ..opts(&path)
        },
        Some(saved),
    );
    assert_eq!(
        h.lines(2).await,
        vec![line("n1", 0, ino), line("n2", 3, ino)]
    );
    h.finished().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncated_while_down_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"a\nb\n").unwrap();
    let (dev, ino) = id(&path);
    let saved = FilePosition {
        path: path.clone(),
        dev,
        inode: ino,
        offset: 100,
    };
    let mut h = start(
        FollowOptions {
            follow: false,
            ..opts(&path)
        },
        Some(saved),
    );
    assert_eq!(h.lines(2).await, vec![line("a", 0, ino), line("b", 2, ino)]);
    assert_eq!(h.last_offset(), 4);
    h.finished().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn start_at_end_reads_only_new_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"old\npar").unwrap();
    let (_, ino) = id(&path);
    let mut h = start(
        FollowOptions {
            start_at_end: true,
            ..opts(&path)
        },
        None,
    );
    h.quiet(Duration::from_millis(50)).await;
    // The rest of the line the file ended in is skipped, not sent as a fragment.
    append(&path, b"tial\nnew\n");
    assert_eq!(h.lines(1).await, vec![line("new", 12, ino)]);
    assert_eq!(h.last_offset(), 16);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn over_long_lines_become_markers() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut data = b"ok\n".to_vec();
    data.extend([b'x'; 20]);
    data.extend(b"\nfine\n");
    data.extend([b'y'; 30]); // unterminated at EOF
    fs::write(&path, &data).unwrap();
    let (_, ino) = id(&path);
    let mut h = start(
        FollowOptions {
            follow: false,
            max_line_bytes: 8,
            ..opts(&path)
        },
        None,
    );
    assert_eq!(
        h.lines(4).await,
        vec![
            line("ok", 0, ino),
            line("<line too long: 20 bytes>", 3, ino),
            line("fine", 24, ino),
            line("<line too long: 30 bytes>", 29, ino),
        ]
    );
    assert_eq!(h.last_offset(), 59);
    h.finished().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn over_long_line_growing_while_followed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"zzzzzz").unwrap();
    let (_, ino) = id(&path);
    let mut h = start(
        FollowOptions {
            max_line_bytes: 8,
            ..opts(&path)
        },
        None,
    );
    h.quiet(Duration::from_millis(50)).await;
    append(&path, b"zzzzzz");
    h.quiet(Duration::from_millis(50)).await;
    append(&path, b"z\nafter\n");
    assert_eq!(
        h.lines(2).await,
        vec![
            line("<line too long: 13 bytes>", 0, ino),
            line("after", 14, ino)
        ]
    );
    assert_eq!(h.last_offset(), 20);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn waits_for_a_missing_file_when_following() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut h = start(opts(&path), None);
    h.quiet(Duration::from_millis(50)).await;
    fs::write(&path, b"hi\n").unwrap();
    let (_, ino) = id(&path);
    assert_eq!(h.lines(1).await, vec![line("hi", 0, ino)]);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_file_without_follow_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let (tx, _rx) = mpsc::channel(1);
    let opts = FollowOptions {
        follow: false,
        ..opts(&dir.path().join("nope.log"))
    };
    let err = FileFollower::spawn(opts, None, tx, CancellationToken::new()).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::NotFound);
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_within_a_poll_interval() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"a\n").unwrap();
    // A long interval, so that a busy machine's scheduling delays are small next to it.
    let poll = Duration::from_secs(2);
    let mut h = start(
        FollowOptions {
            poll_interval: poll,
            ..opts(&path)
        },
        None,
    );
    h.lines(1).await;
    let started = Instant::now();
    h.cancel.cancel();
    join(h.follower).await.unwrap();
    // One poll interval, plus slack for scheduling.
    let took = started.elapsed();
    assert!(took < 2 * poll, "took {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_a_follower_blocked_on_a_full_channel() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let data: String = (0..100).map(|i| format!("line {i}\n")).collect();
    fs::write(&path, data).unwrap();
    let h = start_with_capacity(
        FollowOptions {
            max_lines: 1,
            ..opts(&path)
        },
        None,
        1,
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let started = Instant::now();
    h.cancel.cancel();
    join(h.follower).await.unwrap();
    // Blocked on the full channel (nobody receives) it would never end; it ends at once,
    // 5 s being slack for a busy machine.
    let took = started.elapsed();
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // What was sent before the cancel is still there; nothing more.
    let mut rx = h.rx;
    assert_eq!(rx.recv().await.map(|b| b.len()), Some(1));
    assert!(rx.recv().await.is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn stops_when_the_receiver_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    fs::write(&path, b"").unwrap();
    let h = start(opts(&path), None);
    drop(h.rx);
    join(h.follower).await.unwrap();
}
