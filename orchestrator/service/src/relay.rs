//! The outbox relay: publishes committed outbox rows with publisher confirms, many in flight
//! at once, and marks them sent. A crash between publish and mark re-sends them: receivers
//! de-duplicate by message id.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use saga_amqp::{AmqpError, OutgoingMessage, Publisher};
use saga_schemas::amqp::{HeaderValue, header, message_type};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::runtime::Runtime;
use crate::store::OutboxRow;

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
        // An earlier attempt of a step that a later row of the batch asks again (after a broker
        // outage, say) would only add to the queue of a participant that is behind.
        let now = Utc::now();
        let superseded_ids = superseded(&batch.rows);
        let (superseded, live): (Vec<_>, Vec<_>) = batch
            .rows
            .iter()
            .partition(|row| superseded_ids.contains(&row.id));
        let mut sent: Vec<i64> = Vec::with_capacity(batch.rows.len());
        for row in &superseded {
            debug!(saga_id = %row.saga_id, message_id = %row.message.message_id, routing_key = %row.message.routing_key,
                "superseded by a later attempt in the outbox: not published");
            sent.push(row.id);
        }
        let messages: Vec<_> = live.iter().map(|row| lifetime_from(row, now)).collect();
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

/// Ids of the command rows for which `rows` also holds a later attempt of the same step in the
/// same direction of the same saga.
fn superseded(rows: &[OutboxRow]) -> HashSet<i64> {
    let mut latest: HashMap<(uuid::Uuid, &str, &str), (i64, i64)> = HashMap::new();
    let mut superseded = HashSet::new();
    for row in rows {
        let Some((step, direction, attempt)) = command_key(&row.message) else {
            continue;
        };
        match latest.entry((row.saga_id, step, direction)) {
            Entry::Vacant(slot) => {
                slot.insert((attempt, row.id));
            }
            Entry::Occupied(mut slot) => {
                let (best, best_id) = *slot.get();
                if attempt > best {
                    superseded.insert(best_id);
                    slot.insert((attempt, row.id));
                } else {
                    superseded.insert(row.id);
                }
            }
        }
    }
    superseded
}

/// Step, direction and attempt of a command, from its headers.
fn command_key(message: &OutgoingMessage) -> Option<(&str, &str, i64)> {
    if message.message_type != message_type::STEP_COMMAND {
        return None;
    }
    let find = |key: &str| {
        message
            .headers
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    };
    match (
        find(header::STEP)?,
        find(header::DIRECTION)?,
        find(header::ATTEMPT)?,
    ) {
        (HeaderValue::Str(step), HeaderValue::Str(direction), HeaderValue::Int(attempt)) => {
            Some((step.as_str(), direction.as_str(), *attempt))
        }
        _ => None,
    }
}

/// The row's message with its lifetime in the queue counted from now, its publication: a
/// command that waited in the outbox (a broker outage, a busy relay) still gets the whole
/// lifetime its decision gave it, so a late relay never starves a participant of commands.
fn lifetime_from(row: &OutboxRow, now: DateTime<Utc>) -> OutgoingMessage {
    let mut message = row.message.clone();
    if let Some(at) = message.discard_after {
        message.discard_after = Some(now + (at - row.created_at).max(chrono::Duration::zero()));
    }
    message
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
    use saga_schemas::{Direction, StepCommand};

    use super::*;

    fn row(id: i64, saga: u128, step: &str, direction: Direction, attempt: u32) -> OutboxRow {
        let saga_id = uuid::Uuid::from_u128(saga);
        let command = StepCommand {
            message_id: uuid::Uuid::new_v4(),
            saga_id,
            saga_name: "order".into(),
            step: step.into(),
            direction,
            action: "act".into(),
            attempt,
            data: Default::default(),
            action_output: None,
            expires_at: None,
        };
        let created_at = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        OutboxRow {
            id,
            saga_id,
            message: OutgoingMessage::command(
                &command,
                "p",
                "saga.replies",
                Some(created_at + chrono::Duration::seconds(20)),
            ),
            created_at,
        }
    }

    #[test]
    fn only_a_later_attempt_of_the_same_step_and_direction_supersedes() {
        let rows = [
            row(1, 1, "charge", Direction::Execute, 1),
            row(2, 1, "charge", Direction::Execute, 3),
            row(3, 1, "charge", Direction::Execute, 2),
            row(4, 1, "charge", Direction::Compensate, 1),
            row(5, 2, "charge", Direction::Execute, 1),
            row(6, 1, "reserve", Direction::Execute, 1),
        ];
        assert_eq!(superseded(&rows), HashSet::from([1, 3]));
    }

    #[test]
    fn a_command_lives_its_whole_lifetime_from_its_publication() {
        let r = row(1, 1, "charge", Direction::Execute, 1);
        let late = r.created_at + chrono::Duration::minutes(5);
        let published = lifetime_from(&r, late);
        assert_eq!(
            published.discard_after,
            Some(late + chrono::Duration::seconds(20))
        );
    }
}
