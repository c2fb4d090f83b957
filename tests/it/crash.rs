//! Crash safety: kill -9 at random moments, restart, and the totals are still exact.

use std::time::Duration;

use crate::support::*;

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

    // Kill at growing fractions of the file, plus a fixed-seed jitter so that the kill lands
    // at different points of a batch: mid-read, mid-decode, mid-commit.
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    let mut progress = Vec::new();
    for fraction in [0.1, 0.3, 0.5, 0.7, 0.85] {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let target = (lines as f64 * fraction) as u64;
        let mut child = spawn_quiet(&mut run_config(&cfg));
        let start = std::time::Instant::now();
        let exited = loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "keywatch failed: {status:?}");
                break true;
            }
            let done = try_totals(&state).is_some_and(|(t, _)| t >= target);
            if done || start.elapsed() > Duration::from_secs(60) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        if exited {
            break;
        }
        std::thread::sleep(Duration::from_millis(rng % 15));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;
        progress.push(totals(&state).0);
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
