//! Crash safety: kill -9 at random moments, restart, and the totals are still exact.

mod common;

use std::time::Duration;

use common::*;

#[test]
fn kill_9_mid_file_loses_and_double_counts_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let lines = 40_000;
    let log = sample(dir.path(), "nginx", lines, 11);
    // Small batches: many commits, so a kill lands between and inside them.
    let cfg = config(
        dir.path(),
        &log,
        "nginx",
        "[pipeline]\nbatch_max_events = 300\n",
    );
    let state = dir.path().join("state");

    // A fixed-seed sequence of kill delays, so that a failure can be replayed.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    let mut progress = Vec::new();
    for _ in 0..12 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let delay = Duration::from_millis(150 + rng % 400);
        let mut child = spawn_quiet(&mut run_config(&cfg));
        std::thread::sleep(delay);
        match child.try_wait().unwrap() {
            Some(status) => {
                assert!(status.success(), "keywatch failed: {status:?}");
                break;
            }
            None => {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                kills += 1;
                if state.join("keywatch.db").exists() {
                    progress.push(totals(&state).0);
                }
            }
        }
    }
    // Finish the file.
    let mut child = spawn_quiet(&mut run_config(&cfg));
    let status = wait_with_timeout(&mut child, Duration::from_secs(120));
    assert!(status.success());

    assert!(
        kills >= 2,
        "the test must actually kill keywatch mid-file ({kills} kills)"
    );
    assert!(
        progress.iter().any(|p| *p > 0 && *p < lines as u64),
        "some kill must land mid-file: {progress:?}"
    );
    assert!(progress.windows(2).all(|w| w[0] <= w[1]), "{progress:?}");
    assert_eq!(totals(&state), (lines as u64, lines as u64));
    eprintln!("{kills} kills, progress after each: {progress:?}");
}
