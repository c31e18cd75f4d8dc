//! The outbox relay: publishes committed outbox rows with publisher confirms, many in flight
//! at once, and marks them sent. A crash between publish and mark re-sends them: receivers
//! de-duplicate by message id.

use std::time::{Duration, Instant};

use chrono::Utc;

use saga_amqp::{AmqpError, Publisher};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::runtime::Runtime;

/// Rows per round trip: enough to share one confirm wait among many messages.
const BATCH: u64 = 256;
/// How often to look for rows nobody woke us for (another process wrote them, or a retry).
const POLL: Duration = Duration::from_millis(500);
/// Sent rows are kept this long (to inspect what went out), then deleted.
const KEEP_SENT: Duration = Duration::from_secs(600);
const PRUNE_EVERY: Duration = Duration::from_secs(60);

/// Runs until `shutdown`; returns an error when the broker connection is lost.
pub async fn run(
    runtime: Runtime,
    publisher: Publisher,
    shutdown: CancellationToken,
) -> Result<(), AmqpError> {
    let mut failures = 0u32;
    let mut last_prune = Instant::now();
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        if last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            let before = Utc::now() - KEEP_SENT;
            match runtime.store().prune_outbox(before).await {
                Ok(0) => {}
                Ok(pruned) => debug!(pruned, "deleted old sent outbox rows"),
                Err(error) => warn!(%error, "cannot prune the outbox"),
            }
        }
        let batch = match runtime.store().outbox_batch(BATCH).await {
            Ok(batch) => batch,
            Err(error) => {
                warn!(%error, "cannot read the outbox; retrying");
                pause(&shutdown, Duration::from_secs(1)).await;
                continue;
            }
        };
        if batch.rows.is_empty() {
            drop(batch);
            tokio::select! {
                _ = runtime.relay_wake().notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
            continue;
        }
        let messages: Vec<_> = batch.rows.iter().map(|row| row.message.clone()).collect();
        let results = publisher.publish_all(&messages).await;
        let mut sent = Vec::with_capacity(results.len());
        for (row, result) in batch.rows.iter().zip(results) {
            match result {
                Ok(()) => sent.push(row.id),
                Err(error) => {
                    let saga_id = row
                        .message
                        .correlation_id
                        .map(|id| id.to_string())
                        .unwrap_or_default();
                    warn!(%saga_id, message_id = %row.message.message_id, routing_key = %row.message.routing_key, %error,
                        "publish not confirmed; it stays in the outbox");
                }
            }
        }
        let all_sent = sent.len() == messages.len();
        debug!(
            sent = sent.len(),
            of = messages.len(),
            "relayed outbox rows"
        );
        if let Err(error) = batch.mark_sent(&sent).await {
            warn!(%error, "cannot mark outbox rows sent; they will be sent again");
        }
        if !publisher.is_open() {
            return Err(AmqpError::ConnectionLost(
                "the relay's channel closed".into(),
            ));
        }
        if all_sent {
            failures = 0;
        } else {
            failures = (failures + 1).min(6);
            pause(&shutdown, Duration::from_millis(100 << failures)).await;
        }
    }
}

async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = shutdown.cancelled() => {}
    }
}
