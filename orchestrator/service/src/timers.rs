//! Fires due timers (step timeouts, retry backoff, saga deadlines). They live in SQL, so they
//! survive restarts and need no broker plugin; any orchestrator process may fire any of them.
//!
//! [`fire_due`] is one pass of the worker: it fires the due timers of one batch and says what
//! became of them. A timer whose saga can never be handled
//! ([`crate::runtime::RuntimeError::is_permanent`]: its definition is gone, its state
//! unreadable) is set aside, so it cannot hold up the others; one that failed for a passing
//! reason (the database) stays for a later pass.
//!
//! A step timeout judges a participant's silence, which only holds once the replies already
//! sent are read: while replies wait in `saga.replies` (an orchestrator that fell behind, a
//! participant draining a backlog), a step's reply may be among them, and asking again would
//! add a command, two events and a reply for each, so a backlog would feed itself. Step
//! timeouts then wait ([`RepliesWaiting`]), and so they do while the queue cannot be read (no
//! broker session: no reply is read, no command sent); retries and deadlines fire as ever.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use saga_engine::Input;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::runtime::{Runtime, Work};
use crate::store::StoreError;

const BATCH: u64 = 256;
/// How often to look for due timers when there were none.
const POLL: Duration = Duration::from_millis(100);
/// The pause after a pass in which nothing could be done (the database is unavailable).
const RETRY_LATER: Duration = Duration::from_secs(1);

/// A reading older than this says nothing (the broker is unreachable).
const READING_KEPT: Duration = Duration::from_secs(5);

/// The replies waiting in `saga.replies`, taken by no orchestrator yet, as last read from the
/// broker.
#[derive(Debug, Clone, Default)]
pub struct RepliesWaiting(Arc<Mutex<Option<(u32, Instant)>>>);

impl RepliesWaiting {
    pub fn record(&self, waiting: u32) {
        metrics::gauge!(crate::metrics::REPLIES_WAITING).set(f64::from(waiting));
        *self.0.lock().expect("replies waiting lock") = Some((waiting, Instant::now()));
    }

    /// The last reading, if it is recent.
    pub fn recent(&self) -> Option<u32> {
        let reading = *self.0.lock().expect("replies waiting lock");
        reading
            .filter(|(_, at)| at.elapsed() <= READING_KEPT)
            .map(|(waiting, _)| waiting)
    }

    /// Step timeouts fire only on a recent reading of no reply waiting: with none (no broker
    /// session, or not yet) the replies cannot be read, nor a command sent again.
    pub fn step_timeouts(reading: Option<u32>) -> StepTimeouts {
        match reading {
            Some(0) => StepTimeouts::Fire,
            _ => StepTimeouts::Wait,
        }
    }
}

/// Whether a pass fires the step timeouts that are due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepTimeouts {
    Fire,
    /// Replies wait unread: the step timeouts stay due, for a later pass.
    Wait,
}

/// What one pass of the worker did.
#[derive(Debug)]
pub enum Pass {
    /// No timer was due.
    Idle,
    /// A batch was handled.
    Handled {
        /// Timers that fired (their decision committed, the timer deleted with it).
        fired: usize,
        /// Timers that can never fire, set aside with the reason.
        set_aside: usize,
        /// Timers that failed for a passing reason; they fire again on a later pass.
        kept: usize,
    },
    /// The due timers could not be read.
    Unavailable(StoreError),
}

/// Fires the timers due at `now`, one batch.
pub async fn fire_due(runtime: &Runtime, now: DateTime<Utc>, step_timeouts: StepTimeouts) -> Pass {
    let due = match step_timeouts {
        StepTimeouts::Fire => runtime.store().due_timers(now, BATCH).await,
        StepTimeouts::Wait => {
            runtime
                .store()
                .due_timers_but_step_timeouts(now, BATCH)
                .await
        }
    };
    let due = match due {
        Ok(due) if due.is_empty() => return Pass::Idle,
        Ok(due) => due,
        Err(error) => return Pass::Unavailable(error),
    };
    let work: Vec<Work> = due
        .iter()
        .map(|t| Work {
            saga_id: t.saga_id,
            input: Input::Timer(t.timer.clone()),
            inbox_id: None,
            fired_timer: Some(t.key.clone()),
            trace: None,
        })
        .collect();
    let (mut fired, mut set_aside, mut kept) = (0, 0, 0);
    for (timer, result) in due.iter().zip(runtime.handle(&work).await) {
        let error = match result {
            Ok(_) => {
                fired += 1;
                continue;
            }
            Err(error) => error,
        };
        if !error.is_permanent() {
            warn!(saga_id = %timer.saga_id, timer = %timer.key, %error, "timer not handled; it fires again");
            kept += 1;
            continue;
        }
        let reason = error.to_string();
        match runtime
            .store()
            .set_aside_timer(timer, &reason, Utc::now())
            .await
        {
            Ok(true) => {
                warn!(saga_id = %timer.saga_id, timer = %timer.key, %reason, "timer set aside: it can never fire");
                set_aside += 1;
            }
            // Fired, rescheduled or cancelled by another process meanwhile.
            Ok(false) => {}
            Err(store_error) => {
                warn!(saga_id = %timer.saga_id, timer = %timer.key, %reason, error = %store_error,
                    "cannot set the timer aside; it fires again");
                kept += 1;
            }
        }
    }
    Pass::Handled {
        fired,
        set_aside,
        kept,
    }
}

/// Runs passes until `shutdown`: at once while there is work, every `POLL` when idle.
pub async fn run(runtime: Runtime, replies: RepliesWaiting, shutdown: CancellationToken) {
    // Until the first reading (the broker session starting) step timeouts wait, unlogged.
    let mut last: Option<u32> = None;
    while !shutdown.is_cancelled() {
        let reading = replies.recent();
        match (last, reading) {
            (Some(0) | None, Some(n)) if n > 0 => {
                info!(
                    replies_waiting = n,
                    "step timeouts wait until the replies waiting are read"
                )
            }
            (Some(n), Some(0)) if n > 0 => info!("replies read; step timeouts fire again"),
            (Some(0), None) => {
                info!("step timeouts wait until the replies queue can be read (no broker session)")
            }
            _ => {}
        }
        last = reading;
        let step_timeouts = RepliesWaiting::step_timeouts(reading);
        let pause = match fire_due(&runtime, Utc::now(), step_timeouts).await {
            Pass::Idle => POLL,
            // Only passing failures: give the database a moment instead of spinning on them.
            Pass::Handled {
                fired: 0,
                set_aside: 0,
                ..
            } => RETRY_LATER,
            Pass::Handled { .. } => continue,
            Pass::Unavailable(error) => {
                warn!(%error, "cannot read due timers; retrying");
                RETRY_LATER
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn step_timeouts_fire_only_on_a_recent_reading_of_no_reply_waiting() {
        let replies = RepliesWaiting::default();
        let decide = |replies: &RepliesWaiting| RepliesWaiting::step_timeouts(replies.recent());
        assert_eq!(decide(&replies), StepTimeouts::Wait, "nothing read yet");
        replies.record(0);
        assert_eq!(decide(&replies), StepTimeouts::Fire);
        replies.record(3);
        assert_eq!(decide(&replies), StepTimeouts::Wait);
        let long_ago = Instant::now()
            .checked_sub(READING_KEPT + Duration::from_secs(1))
            .expect("the machine is up for longer than that");
        *replies.0.lock().unwrap() = Some((0, long_ago));
        assert_eq!(decide(&replies), StepTimeouts::Wait, "a stale reading");
    }
}
