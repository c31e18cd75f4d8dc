//! The outbox relay: publishes committed outbox rows with publisher confirms, many in flight
//! at once, and marks them sent. A crash between publish and mark re-sends them: receivers
//! de-duplicate by message id.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use saga_amqp::{AmqpError, OutgoingMessage, Publisher};
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
        // A command past its discard_after was superseded by a newer attempt while it waited
        // here: publishing it would only add to the queue of a participant that is behind.
        let now = Utc::now();
        let (superseded, live): (Vec<_>, Vec<_>) = batch
            .rows
            .iter()
            .partition(|row| is_superseded(&row.message, now));
        let mut sent: Vec<i64> = Vec::with_capacity(batch.rows.len());
        for row in &superseded {
            debug!(saga_id = %row.saga_id, message_id = %row.message.message_id, routing_key = %row.message.routing_key,
                discard_after = ?row.message.discard_after, "superseded: not published");
            sent.push(row.id);
        }
        let messages: Vec<_> = live.iter().map(|row| row.message.clone()).collect();
        let results = publisher.publish_all(&messages).await;
        for (row, result) in live.iter().zip(results) {
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
        let all_sent = sent.len() == batch.rows.len();
        debug!(
            sent = sent.len() - superseded.len(),
            superseded = superseded.len(),
            of = batch.rows.len(),
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

/// Whether `message` is past its `discard_after` at `now`, so the broker would drop it anyway.
fn is_superseded(message: &OutgoingMessage, now: DateTime<Utc>) -> bool {
    message.discard_after.is_some_and(|at| at <= now)
}

async fn pause(shutdown: &CancellationToken, duration: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(duration) => {}
        _ = shutdown.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;
    use saga_schemas::amqp::message_type;

    use super::*;

    fn message(discard_after: Option<DateTime<Utc>>) -> OutgoingMessage {
        OutgoingMessage {
            exchange: "saga.commands".into(),
            routing_key: "payments".into(),
            message_id: uuid::Uuid::new_v4(),
            correlation_id: None,
            message_type: message_type::STEP_COMMAND.into(),
            reply_to: None,
            headers: Vec::new(),
            body: "{}".into(),
            mandatory: true,
            discard_after,
        }
    }

    #[test]
    fn a_message_past_its_discard_after_is_superseded() {
        let now = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let ms = chrono::Duration::milliseconds;
        assert!(is_superseded(&message(Some(now - ms(1))), now));
        assert!(is_superseded(&message(Some(now)), now));
        assert!(!is_superseded(&message(Some(now + ms(1))), now));
        assert!(!is_superseded(&message(None), now), "events never expire");
    }
}
