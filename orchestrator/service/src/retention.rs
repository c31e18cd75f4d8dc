//! How long the orchestrator's inbox remembers a handled reply, and the task that forgets it.
//!
//! The inbox records the message id of every reply handled, so that a redelivery of the same
//! message (the broker hands it out again after a crash between the commit and the ack) is
//! acked without a decision. Forgetting an id after [`DEFAULT_INBOX_RETENTION`] is safe:
//!
//! - a redelivery is a message whose channel closed before its ack: another orchestrator gets
//!   it at once, or this one when it is back; the pruning runs only while an orchestrator does,
//!   so such a copy almost always comes long before its id is forgotten;
//! - and a copy that comes later still changes nothing: the engine ignores a definitive reply
//!   for a step that already completed, failed or was compensated, and a retryable error for an
//!   attempt no longer awaited (each retry is a new attempt), so deciding it again records
//!   nothing;
//! - participants answer a repeated command with a new message anyway, which the inbox never
//!   catches: the engine's rules are what make replies idempotent, the inbox only saves work.
//!
//! A week is far longer than any redelivery takes, and keeps the table to about a week of
//! replies however long the orchestrator runs.

use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::store::{Store, StoreError};

/// How long the inbox keeps a handled reply's id unless configured otherwise.
pub const DEFAULT_INBOX_RETENTION: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// How often the inbox is pruned.
pub const PRUNE_EVERY: Duration = Duration::from_secs(10 * 60);

/// Deletes the inbox rows older than `retention` at `now`; returns how many.
pub async fn prune_inbox(
    store: &Store,
    retention: Duration,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let cutoff = chrono::TimeDelta::from_std(retention)
        .ok()
        .and_then(|retention| now.checked_sub_signed(retention))
        .unwrap_or(DateTime::<Utc>::MIN_UTC);
    store.prune_inbox(cutoff).await
}

/// Prunes the inbox every [`PRUNE_EVERY`], the first time at once, until `shutdown`. A failed
/// pass is logged and tried again at the next one.
pub async fn run(store: Store, retention: Duration, shutdown: CancellationToken) {
    loop {
        match prune_inbox(&store, retention, Utc::now()).await {
            Ok(0) => {}
            Ok(pruned) => info!(pruned, ?retention, "forgot old handled replies"),
            Err(error) => warn!(%error, "cannot prune the inbox; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
