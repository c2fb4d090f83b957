//! When rotations are evaluated, and what "now" is for them: the pipeline's clock.
//!
//! Two clocks, one per way keywatch reads:
//! - [`Clock::Wall`], a daemon following live traffic: an evaluation every
//!   `rules.evaluate_every` of real time, judged at the wall clock. While the source reads a
//!   backlog ([`Schedule::set_behind`]) what is stored is a past that stops short of now, so
//!   evaluations wait until it is read: an evaluation judged at now on half of the past
//!   would report hosts that switched to the new key later in the backlog. They wait as
//!   long as the source catches up: its lag behind the wall clock (now minus the latest
//!   event time) shrinks by at least half of each stretch of [`MAX_POSTPONED`] intervals,
//!   that is, it reads at least 1.5 times as fast as real time. Sustained full load, which
//!   never catches up, cannot starve the reminders: after a stretch without that progress
//!   they are evaluated on what is stored.
//! - [`Clock::Event`], a backtest, a one-shot read of a file and the scenario tests: an
//!   evaluation at every tick of event time (multiples of the interval, or a given list)
//!   that the events reach, judged at the tick. The pipeline cuts its input at each tick
//!   ([`Schedule::next_cut`]), so an evaluation sees exactly the events before its clock,
//!   whatever the batch boundaries; a last evaluation runs at the last event's time when
//!   the input ends ([`Schedule::finish`]).
//!
//! Pure bookkeeping: the wall clock is read only in the [`Clock::Wall`] variant.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// While the source is behind and not catching up, rotation evaluation waits at most this
/// many intervals.
pub const MAX_POSTPONED: u32 = 10;

/// More empty event-time ticks than this between two events are skipped, evaluating once
/// at the last of them (a log with a gap of months would otherwise evaluate every hour of it).
const MAX_EMPTY_TICKS: i64 = 10_000;

/// Which time evaluations are judged at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Clock {
    /// Real time, every interval.
    Wall { every: Duration },
    /// Event time, at each tick the events reach.
    Event(Ticks),
}

/// Event-time ticks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ticks {
    /// Every multiple of this many milliseconds (the first one after the first event).
    Every(i64),
    /// At exactly these times (sorted); ticks after the last event run at the end.
    At(Vec<i64>),
}

/// The evaluation schedule of one pipeline.
#[derive(Debug)]
pub struct Schedule {
    state: State,
    /// The source is reading a backlog (wall clock only).
    behind: bool,
    /// Wall clock, while evaluations are postponed: when the current stretch of
    /// [`MAX_POSTPONED`] intervals began, and the source's lag then (ms: the wall clock
    /// minus the latest event time; none before the first event).
    postponing: Option<(Instant, Option<i64>)>,
    /// The latest event time seen.
    latest_ms: Option<i64>,
}

#[derive(Debug)]
enum State {
    Wall {
        every: Duration,
        last: Instant,
    },
    Every {
        every_ms: i64,
        /// The next tick; set by the first event.
        next: Option<i64>,
    },
    At(VecDeque<i64>),
}

/// What [`Schedule::wall_due`] decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WallTick {
    NotYet,
    /// Due, but the source reads a backlog: wait.
    Postponed,
    /// Evaluate now.
    Due,
}

impl Schedule {
    pub fn new(clock: Clock) -> Result<Schedule, String> {
        let state = match clock {
            Clock::Wall { every } => State::Wall {
                every,
                last: Instant::now(),
            },
            Clock::Event(Ticks::Every(ms)) if ms <= 0 => {
                return Err(format!(
                    "the evaluation interval must be more than 0, found {ms} ms"
                ))
            }
            Clock::Event(Ticks::Every(every_ms)) => State::Every {
                every_ms,
                next: None,
            },
            Clock::Event(Ticks::At(mut at)) => {
                at.sort_unstable();
                State::At(at.into())
            }
        };
        Ok(Schedule {
            state,
            behind: false,
            postponing: None,
            latest_ms: None,
        })
    }

    /// Whether evaluations follow event time.
    pub fn is_event_time(&self) -> bool {
        !matches!(self.state, State::Wall { .. })
    }

    /// Records an event's time (it is being ingested).
    pub fn saw(&mut self, ts_ms: i64) {
        self.latest_ms = Some(self.latest_ms.map_or(ts_ms, |l| l.max(ts_ms)));
    }

    /// Event time: the next tick. An event at or after it must wait until the tick has been
    /// evaluated over the events before it. `first_ts` is the time of the event at hand (the
    /// first tick is the first multiple of the interval after the first event).
    pub fn next_cut(&mut self, first_ts: i64) -> Option<i64> {
        match &mut self.state {
            State::Wall { .. } => None,
            State::Every { every_ms, next } => {
                Some(*next.get_or_insert((first_ts.div_euclid(*every_ms) + 1) * *every_ms))
            }
            State::At(at) => at.front().copied(),
        }
    }

    /// Event time: the ticks at or before `ts_ms` not yet evaluated, in order (consumed).
    pub fn ticks_until(&mut self, ts_ms: i64) -> Vec<i64> {
        let mut out = Vec::new();
        match &mut self.state {
            State::Wall { .. } => {}
            State::Every { every_ms, next } => {
                let Some(tick) = next else { return out };
                if ts_ms < *tick {
                    return out;
                }
                let skipped = (ts_ms - *tick) / *every_ms;
                if skipped > MAX_EMPTY_TICKS {
                    *tick += skipped * *every_ms;
                }
                while ts_ms >= *tick {
                    out.push(*tick);
                    *tick += *every_ms;
                }
            }
            State::At(at) => {
                while at.front().is_some_and(|t| *t <= ts_ms) {
                    out.extend(at.pop_front());
                }
            }
        }
        out
    }

    /// Wall clock: whether an evaluation is due now (postponed while behind and catching
    /// up).
    pub fn wall_due(&mut self) -> WallTick {
        self.wall_due_at(Instant::now(), chrono::Utc::now().timestamp_millis())
    }

    /// [`Self::wall_due`] at `now`, the wall clock reading `wall_ms`.
    fn wall_due_at(&mut self, now: Instant, wall_ms: i64) -> WallTick {
        let State::Wall { every, last } = &mut self.state else {
            return WallTick::NotYet;
        };
        if now.saturating_duration_since(*last) < *every {
            return WallTick::NotYet;
        }
        let lag = self.latest_ms.map(|l| wall_ms - l);
        if self.behind {
            let stretch = *every * MAX_POSTPONED;
            match self.postponing {
                // The first stretch began with the last evaluation.
                None if now.saturating_duration_since(*last) < stretch => {
                    self.postponing = Some((*last, lag));
                    tracing::info!("reading a backlog: rotations are evaluated once it is read");
                    return WallTick::Postponed;
                }
                None => {}
                Some((began, _)) if now.saturating_duration_since(began) < stretch => {
                    return WallTick::Postponed;
                }
                Some((_, before)) => {
                    // A stretch has passed: wait on only if the source caught up by at
                    // least half of it (read at least 1.5 times as fast as real time), so
                    // the backlog ends within twice its lag.
                    let caught_up_ms = (stretch / 2).as_millis().min(i64::MAX as u128) as i64;
                    if let (Some(before), Some(lag)) = (before, lag) {
                        if lag <= before.saturating_sub(caught_up_ms) {
                            tracing::debug!(
                                lag_ms = lag,
                                was_ms = before,
                                "still catching up: rotations wait"
                            );
                            self.postponing = Some((now, Some(lag)));
                            return WallTick::Postponed;
                        }
                    }
                    tracing::warn!(
                        lag_ms = lag,
                        "the source is behind and not catching up: evaluating rotations on what is stored"
                    );
                }
            }
        }
        self.postponing = None;
        *last = now;
        WallTick::Due
    }

    /// Wall clock: how long the pipeline may wait for input before an evaluation is due.
    pub fn wall_wait(&self) -> Duration {
        match &self.state {
            State::Wall { every, last } => every.saturating_sub(last.elapsed()),
            _ => Duration::MAX,
        }
    }

    /// Whether the source is behind (its last batch was full, or more wait).
    pub fn set_behind(&mut self, behind: bool) {
        self.behind = behind;
    }

    /// The input has ended: the times of the last evaluations. Event time: the ticks left
    /// up to the last event (explicit ticks: all of them), then the last event's time (none
    /// without events, or when a tick after it was evaluated). Wall clock: now.
    pub fn finish(&mut self) -> Vec<i64> {
        match &mut self.state {
            State::Wall { last, .. } => {
                *last = Instant::now();
                vec![chrono::Utc::now().timestamp_millis()]
            }
            State::Every { every_ms, next } => {
                let Some(latest) = self.latest_ms else {
                    return Vec::new();
                };
                // A tick after the last event was evaluated already (a stop within a
                // batch, right after the tick that cut it): it saw every event; one more
                // evaluation would go back in time.
                let (every_ms, next) = (*every_ms, *next);
                if next.is_some_and(|n| n - every_ms > latest) {
                    return Vec::new();
                }
                let mut out = self.ticks_until(latest);
                if out.last() != Some(&latest) {
                    out.push(latest);
                }
                out
            }
            State::At(at) => at.drain(..).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn event_ticks_start_after_the_first_event_and_follow_the_events() {
        let mut s = Schedule::new(Clock::Event(Ticks::Every(H))).unwrap();
        assert_eq!(s.next_cut(10 * H + 5), Some(11 * H));
        assert!(s.ticks_until(11 * H - 1).is_empty());
        assert_eq!(s.ticks_until(13 * H), vec![11 * H, 12 * H, 13 * H]);
        assert_eq!(s.next_cut(0), Some(14 * H));
        s.saw(14 * H + 7);
        assert_eq!(s.finish(), vec![14 * H, 14 * H + 7]);
    }

    #[test]
    fn a_stop_right_after_a_tick_evaluates_nothing_before_it() {
        // The 11:00 tick ran (an event reached it, and keywatch stopped before storing
        // it): the last stored event, at 10:50, was seen by that evaluation already.
        let mut s = Schedule::new(Clock::Event(Ticks::Every(H))).unwrap();
        assert_eq!(s.next_cut(10 * H), Some(11 * H));
        s.saw(10 * H + 50 * 60_000);
        assert_eq!(s.ticks_until(11 * H), vec![11 * H]);
        assert!(s.finish().is_empty());
        // An event exactly on a multiple of the interval, alone: evaluated at its time.
        let mut s = Schedule::new(Clock::Event(Ticks::Every(H))).unwrap();
        s.next_cut(10 * H);
        s.saw(10 * H);
        assert_eq!(s.finish(), vec![10 * H]);
    }

    #[test]
    fn a_long_gap_evaluates_once_at_its_end() {
        let mut s = Schedule::new(Clock::Event(Ticks::Every(1))).unwrap();
        s.next_cut(0);
        let ticks = s.ticks_until(MAX_EMPTY_TICKS * 3);
        assert!(
            ticks.len() <= MAX_EMPTY_TICKS as usize + 1,
            "{}",
            ticks.len()
        );
        assert_eq!(ticks.last(), Some(&(MAX_EMPTY_TICKS * 3)));
    }

    #[test]
    fn explicit_ticks_all_run_even_after_the_last_event() {
        let mut s = Schedule::new(Clock::Event(Ticks::At(vec![30, 10, 20]))).unwrap();
        assert_eq!(s.next_cut(0), Some(10));
        assert_eq!(s.ticks_until(15), vec![10]);
        assert_eq!(s.finish(), vec![20, 30]);
    }

    #[test]
    fn without_events_the_end_evaluates_nothing_in_event_time() {
        let mut s = Schedule::new(Clock::Event(Ticks::Every(H))).unwrap();
        assert!(s.finish().is_empty());
        assert!(Schedule::new(Clock::Event(Ticks::Every(0))).is_err());
    }

    /// An evaluation every second, the source an hour behind and reading `tenths` tenths of
    /// a millisecond of event time per millisecond of wall time, for `for_ms` (checked every
    /// 100 ms): the schedule, and the wall times (ms from its start) it evaluated at.
    fn read_behind(tenths: i64, for_ms: i64) -> (Schedule, Vec<i64>) {
        let mut s = Schedule::new(Clock::Wall {
            every: Duration::from_secs(1),
        })
        .unwrap();
        let State::Wall { last: t0, .. } = s.state else {
            unreachable!()
        };
        s.set_behind(true);
        let mut evaluated = Vec::new();
        for ms in (0..for_ms).step_by(100) {
            s.saw(WALL0 - 3_600_000 + ms * tenths / 10);
            let now = t0 + Duration::from_millis(ms as u64);
            if s.wall_due_at(now, WALL0 + ms) == WallTick::Due {
                evaluated.push(ms);
            }
        }
        (s, evaluated)
    }

    /// The wall clock's reading at the start of [`read_behind`].
    const WALL0: i64 = 1_000_000_000_000;

    #[test]
    fn wall_evaluations_wait_while_a_backlog_is_caught_up_however_long() {
        // At 100 times real time, 36 s of reading (ten times the cap of ten intervals):
        // every evaluation waits.
        let (mut s, evaluated) = read_behind(1000, 36_000);
        assert!(evaluated.is_empty(), "evaluated at {evaluated:?} ms");
        // Caught up: the next one is due.
        s.set_behind(false);
        let State::Wall { last, .. } = s.state else {
            unreachable!()
        };
        let now = last + Duration::from_millis(36_000);
        assert_eq!(s.wall_due_at(now, WALL0 + 36_000), WallTick::Due);

        // At real time (full load, the lag stays): evaluated after one stretch of ten
        // intervals, then after each. At 1.2 times real time: too slow to wait for.
        for tenths in [10, 12] {
            assert_eq!(read_behind(tenths, 25_000).1, [10_000, 20_000], "{tenths}");
        }
    }

    #[test]
    fn wall_evaluations_wait_while_behind_but_not_forever() {
        let mut s = Schedule::new(Clock::Wall {
            every: Duration::ZERO,
        })
        .unwrap();
        assert_eq!(s.wall_due(), WallTick::Due);
        s.set_behind(true);
        // every = 0: the cap (ten intervals) has passed at once, so it is due anyway.
        assert_eq!(s.wall_due(), WallTick::Due);
        let mut s = Schedule::new(Clock::Wall {
            every: Duration::from_millis(1),
        })
        .unwrap();
        s.set_behind(true);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(s.wall_due(), WallTick::Postponed);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(s.wall_due(), WallTick::Due);
        assert!(!s.is_event_time());
        assert!(s.ticks_until(i64::MAX).is_empty());
    }
}
