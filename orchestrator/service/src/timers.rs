//! Fires due timers (step timeouts, retry backoff, saga deadlines). They live in SQL, so they
//! survive restarts and need no broker plugin; any orchestrator process may fire any of them.

use std::time::Duration;

use chrono::Utc;
use saga_engine::Input;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::runtime::{Runtime, Work};

const BATCH: u64 = 256;
const POLL: Duration = Duration::from_millis(100);

pub async fn run(runtime: Runtime, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        let due = match runtime.store().due_timers(Utc::now(), BATCH).await {
            Ok(due) => due,
            Err(error) => {
                warn!(%error, "cannot read due timers; retrying");
                Vec::new()
            }
        };
        if due.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.cancelled() => {}
            }
            continue;
        }
        let work: Vec<Work> = due
            .into_iter()
            .map(|t| Work {
                saga_id: t.saga_id,
                input: Input::Timer(t.timer),
                inbox_id: None,
                fired_timer: Some(t.key),
            })
            .collect();
        for (work, result) in work.iter().zip(runtime.handle(&work).await) {
            if let Err(error) = result {
                warn!(saga_id = %work.saga_id, timer = ?work.fired_timer, %error, "timer not handled; it fires again");
            }
        }
    }
}
