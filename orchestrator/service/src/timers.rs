//! Fires due timers (step timeouts, retry backoff, saga deadlines). They live in SQL, so they
//! survive restarts and need no broker plugin; any orchestrator process may fire any of them.
//!
//! [`fire_due`] is one pass of the worker: it fires the due timers of one batch and says what
//! became of them. A timer whose saga can never be handled
//! ([`crate::runtime::RuntimeError::is_permanent`]: its definition is gone, its state
//! unreadable) is set aside, so it cannot hold up the others; one that failed for a passing
//! reason (the database) stays for a later pass.

use std::time::Duration;

use chrono::{DateTime, Utc};
use saga_engine::Input;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::runtime::{Runtime, Work};
use crate::store::StoreError;

const BATCH: u64 = 256;
/// How often to look for due timers when there were none.
const POLL: Duration = Duration::from_millis(100);
/// The pause after a pass in which nothing could be done (the database is unavailable).
const RETRY_LATER: Duration = Duration::from_secs(1);

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
pub async fn fire_due(runtime: &Runtime, now: DateTime<Utc>) -> Pass {
    let due = match runtime.store().due_timers(now, BATCH).await {
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
pub async fn run(runtime: Runtime, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let pause = match fire_due(&runtime, Utc::now()).await {
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
