//! Reads lines from standard input, batched like the file source.
//!
//! Two threads: one blocks in `read` on stdin and passes chunks on through a small bounded
//! queue; the other batches them with the file source's [`LineBatcher`], so a partial batch
//! still goes out after `max_wait` and cancellation is noticed within one poll interval while
//! stdin is quiet. A blocking read on stdin cannot be interrupted: on cancel, the reading
//! thread stays blocked until the next input or EOF (it then ends, as nobody listens) or
//! until the process exits. Stdin cannot be resumed: its [`Position::Stdin`] offset is
//! informational.

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, RecvTimeoutError};
use std::thread::{self, JoinHandle};

use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::file::{FollowOptions, LineBatcher, Stopped, READ_CHUNK};
use super::{Batch, Position};

/// Chunks read ahead of the batching thread at most.
const QUEUED_CHUNKS: usize = 2;

/// Starts reading standard input into batches (`opts`: the batching fields; `path`,
/// `follow`, `start_at_end` are ignored). The thread ends at EOF, after sending everything
/// (a last line without `\n` included), on cancel (without sending what it holds), or when
/// the receiver is dropped; its result is a read error, if any.
pub fn spawn_stdin(
    opts: &FollowOptions,
    tx: Sender<Batch>,
    cancel: CancellationToken,
) -> JoinHandle<io::Result<()>> {
    spawn_reader(io::stdin(), opts, tx, cancel)
}

/// [`spawn_stdin`] for any reader.
pub(crate) fn spawn_reader<R: Read + Send + 'static>(
    mut reader: R,
    opts: &FollowOptions,
    tx: Sender<Batch>,
    cancel: CancellationToken,
) -> JoinHandle<io::Result<()>> {
    let opts = opts.clone();
    thread::Builder::new()
        .name("keywatch-stdin".into())
        .spawn(move || {
            let (chunk_tx, chunk_rx) = sync_channel::<io::Result<Vec<u8>>>(QUEUED_CHUNKS);
            thread::Builder::new()
                .name("keywatch-stdin-read".into())
                .spawn(move || loop {
                    let mut buf = vec![0; READ_CHUNK];
                    let chunk = match reader.read(&mut buf) {
                        Ok(0) => return,
                        Ok(n) => {
                            buf.truncate(n);
                            Ok(buf)
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                        Err(e) => Err(e),
                    };
                    let failed = chunk.is_err();
                    if chunk_tx.send(chunk).is_err() || failed {
                        return;
                    }
                })?;

            let poll = opts.poll();
            let source = Position::Stdin { offset: 0 };
            let mut lines = LineBatcher::new(&opts, source, 0, tx, cancel);
            let result = (|| -> Result<io::Result<()>, Stopped> {
                loop {
                    if lines.should_stop() {
                        return Err(Stopped);
                    }
                    let wait = lines.due_in().map_or(poll, |due| due.min(poll));
                    match chunk_rx.recv_timeout(wait) {
                        Ok(Ok(chunk)) => lines.feed(&chunk)?,
                        Ok(Err(e)) => {
                            // Send the complete lines read before the error.
                            lines.flush()?;
                            return Ok(Err(e));
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => {
                            lines.finish_line()?;
                            lines.flush()?;
                            debug!(bytes = lines.offset(), "end of stdin");
                            return Ok(Ok(()));
                        }
                    }
                    lines.flush_if_due()?;
                }
            })();
            result.unwrap_or(Ok(()))
        })
        .expect("cannot start the stdin reader thread")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::sync::mpsc;

    fn read_all(input: &'static [u8], opts: FollowOptions) -> Vec<(String, u64, u64)> {
        let (tx, mut rx) = mpsc::channel(4);
        let handle = spawn_reader(input, &opts, tx, CancellationToken::new());
        let mut out = Vec::new();
        while let Some(b) = rx.blocking_recv() {
            let Some(Position::Stdin { offset }) = b.position else {
                panic!("position {:?}", b.position)
            };
            for i in 0..b.len() {
                let line = String::from_utf8(b.line(i).to_vec()).unwrap();
                out.push((line, b.line_offsets[i], offset));
            }
        }
        handle.join().unwrap().unwrap();
        out
    }

    #[test]
    fn reads_lines_to_eof_including_unterminated_last() {
        let opts = FollowOptions {
            max_lines: 2,
            ..Default::default()
        };
        let got = read_all(b"one\ntwo\r\nthree\nfour", opts);
        let want = [
            ("one", 0, 9),
            ("two", 4, 9),
            ("three", 9, 19),
            ("four", 15, 19),
        ];
        let want: Vec<_> = want
            .iter()
            .map(|(l, o, e)| (l.to_string(), *o, *e))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn empty_input_sends_nothing() {
        assert!(read_all(b"", FollowOptions::default()).is_empty());
    }

    /// A reader that yields one chunk, then blocks until released (like a quiet pipe).
    struct Quiet {
        first: Option<&'static [u8]>,
        release: std::sync::mpsc::Receiver<()>,
    }

    impl Read for Quiet {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if let Some(first) = self.first.take() {
                buf[..first.len()].copy_from_slice(first);
                return Ok(first.len());
            }
            let _ = self.release.recv();
            Ok(0)
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn partial_batch_goes_out_after_max_wait_and_cancel_stops() {
        let (release_tx, release) = std::sync::mpsc::channel();
        let reader = Quiet {
            first: Some(b"a\nb\n"),
            release,
        };
        let opts = FollowOptions {
            max_wait: Duration::from_millis(20),
            poll_interval: Duration::from_millis(10),
            ..Default::default()
        };
        let (tx, mut rx) = mpsc::channel(4);
        let cancel = CancellationToken::new();
        let handle = spawn_reader(reader, &opts, tx, cancel.clone());
        let batch = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("no batch after max_wait")
            .unwrap();
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.position, Some(Position::Stdin { offset: 4 }));
        cancel.cancel();
        let started = std::time::Instant::now();
        while !handle.is_finished() {
            assert!(started.elapsed() < Duration::from_secs(2), "did not stop");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        handle.join().unwrap().unwrap();
        drop(release_tx);
    }
}
