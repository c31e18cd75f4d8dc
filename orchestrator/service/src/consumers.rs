//! Broker → runtime: the replies queue and the start queue. Every delivery is acked only after
//! what it caused is committed; what cannot be understood is dead-lettered with the reason.

use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use saga_amqp::lapin::message::Delivery;
use saga_amqp::lapin::{Channel, Consumer};
use saga_amqp::{AmqpError, Publisher};
use saga_engine::Input;
use saga_schemas::amqp::{
    HeaderValue, OutgoingMessage, REPLIES_QUEUE, START_QUEUE, header, message_type,
};
use saga_schemas::{SCHEMA_VERSION, StartSaga, StepReply};
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::runtime::{Runtime, RuntimeError, Started, Work};

/// Deliveries decided in one transaction at most.
const MAX_BATCH: usize = 128;

pub async fn replies(
    runtime: Runtime,
    conn: &saga_amqp::lapin::Connection,
    publisher: &Publisher,
    prefetch: u16,
    shutdown: CancellationToken,
) -> Result<(), AmqpError> {
    let (channel, mut consumer) =
        saga_amqp::open_consumer(conn, REPLIES_QUEUE, "orchestrator-replies", prefetch).await?;
    while let Some(first) = next_delivery(&mut consumer, &channel, REPLIES_QUEUE, &shutdown).await?
    {
        let mut deliveries = vec![first];
        // Group commit: take whatever else has already arrived, without waiting for more.
        while deliveries.len() < MAX_BATCH {
            match consumer.next().now_or_never() {
                Some(Some(delivery)) => deliveries.push(delivery?),
                _ => break,
            }
        }
        handle_replies(&runtime, publisher, deliveries).await?;
    }
    Ok(())
}

async fn handle_replies(
    runtime: &Runtime,
    publisher: &Publisher,
    deliveries: Vec<Delivery>,
) -> Result<(), AmqpError> {
    let mut work = Vec::with_capacity(deliveries.len());
    let mut pending = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        match saga_amqp::decode::<StepReply>(&delivery) {
            Ok(reply) => {
                work.push(Work {
                    saga_id: reply.saga_id,
                    input: Input::Reply {
                        step: reply.step,
                        direction: reply.direction,
                        attempt: reply.attempt,
                        outcome: reply.outcome,
                    },
                    inbox_id: Some(reply.message_id),
                    fired_timer: None,
                });
                pending.push(delivery);
            }
            Err(error) => {
                let saga_id =
                    saga_amqp::header_str(&delivery, header::SAGA_ID).unwrap_or("unknown");
                warn!(saga_id, reason = %error, "dead-lettering an unreadable reply");
                saga_amqp::dead_letter(publisher, &delivery, REPLIES_QUEUE, &error.to_string())
                    .await?;
            }
        }
    }
    if work.is_empty() {
        return Ok(());
    }
    // Replies already handled (a redelivery after a crash before the ack) need no decision.
    let ids: Vec<_> = work.iter().filter_map(|w| w.inbox_id).collect();
    let seen = runtime.store().seen(&ids).await.unwrap_or_else(|error| {
        // Deciding them again is safe: the inbox makes a duplicate commit fail.
        warn!(%error, "cannot read the inbox; deciding every reply of the batch");
        Default::default()
    });
    let (mut fresh, mut fresh_deliveries) = (Vec::new(), Vec::new());
    for (w, delivery) in work.into_iter().zip(pending) {
        if w.inbox_id.is_some_and(|id| seen.contains(&id)) {
            saga_amqp::ack(&delivery).await?;
        } else {
            fresh.push(w);
            fresh_deliveries.push(delivery);
        }
    }
    let results = runtime.handle(&fresh).await;
    for ((w, delivery), result) in fresh.iter().zip(fresh_deliveries).zip(results) {
        match result {
            Ok(_) => saga_amqp::ack(&delivery).await?,
            Err(error @ RuntimeError::DefinitionGone { .. }) => {
                warn!(saga_id = %w.saga_id, %error, "dead-lettering a reply");
                let reason = result_reason(&w.saga_id, "its saga's definition is no longer loaded");
                saga_amqp::dead_letter(publisher, &delivery, REPLIES_QUEUE, &reason).await?;
            }
            Err(error) => {
                warn!(saga_id = %w.saga_id, %error, "reply not handled; it will be redelivered");
                requeue(&delivery).await?;
            }
        }
    }
    Ok(())
}

/// The next delivery, or `None` once `shutdown` is cancelled (the channel is closed then, so the
/// connection closes without orphans).
async fn next_delivery(
    consumer: &mut Consumer,
    channel: &Channel,
    queue: &str,
    shutdown: &CancellationToken,
) -> Result<Option<Delivery>, AmqpError> {
    let next = tokio::select! {
        next = consumer.next() => next,
        _ = shutdown.cancelled() => {
            channel.close(200, "shutting down".into()).await.ok();
            return Ok(None);
        }
    };
    match next {
        Some(delivery) => Ok(Some(delivery?)),
        None => Err(AmqpError::ConnectionLost(format!(
            "the broker cancelled the consumer of {queue}"
        ))),
    }
}

/// The answer to a start message that named a `reply_to` queue.
fn start_reply(reply_to: &str, started: &Started) -> OutgoingMessage {
    let body = json!({"saga_id": started.saga_id, "created": started.created});
    OutgoingMessage {
        exchange: String::new(),
        routing_key: reply_to.to_owned(),
        message_id: uuid::Uuid::new_v4(),
        correlation_id: Some(started.saga_id),
        message_type: message_type::SAGA_STARTED.into(),
        reply_to: None,
        headers: vec![(
            header::SCHEMA_VERSION.into(),
            HeaderValue::Int(SCHEMA_VERSION.into()),
        )],
        body: body.to_string(),
        mandatory: true,
        discard_after: None,
    }
}

fn result_reason(saga_id: &uuid::Uuid, why: &str) -> String {
    format!("saga {saga_id}: {why}")
}

/// Gives a delivery back to the broker after a short pause, so a passing database fault
/// does not spin.
async fn requeue(delivery: &Delivery) -> Result<(), AmqpError> {
    tokio::time::sleep(Duration::from_millis(200)).await;
    saga_amqp::nack(delivery, true).await
}

pub async fn starts(
    runtime: Runtime,
    conn: &saga_amqp::lapin::Connection,
    publisher: &Publisher,
    prefetch: u16,
    shutdown: CancellationToken,
) -> Result<(), AmqpError> {
    let (channel, mut consumer) =
        saga_amqp::open_consumer(conn, START_QUEUE, "orchestrator-start", prefetch).await?;
    while let Some(delivery) =
        next_delivery(&mut consumer, &channel, START_QUEUE, &shutdown).await?
    {
        let start = match saga_amqp::decode::<StartSaga>(&delivery) {
            Ok(start) => start,
            Err(error) => {
                let saga_id =
                    saga_amqp::header_str(&delivery, header::SAGA_ID).unwrap_or("none yet");
                warn!(saga_id, reason = %error, "dead-lettering an unreadable start message");
                saga_amqp::dead_letter(publisher, &delivery, START_QUEUE, &error.to_string())
                    .await?;
                continue;
            }
        };
        match runtime
            .start(&start.saga, start.input, start.idempotency_key)
            .await
        {
            Ok(started) => {
                if let Some(reply_to) = delivery.properties.reply_to().as_ref() {
                    let reply = start_reply(reply_to.as_str(), &started);
                    if let Err(error) = publisher.publish(&reply).await {
                        warn!(saga_id = %started.saga_id, %error, "cannot answer the start request");
                    }
                }
                saga_amqp::ack(&delivery).await?;
            }
            Err(error @ (RuntimeError::UnknownSaga(_) | RuntimeError::InvalidInput(_))) => {
                info!(reason = %error, "dead-lettering a start message");
                saga_amqp::dead_letter(publisher, &delivery, START_QUEUE, &error.to_string())
                    .await?;
            }
            Err(error) => {
                warn!(%error, "start not handled; it will be redelivered");
                requeue(&delivery).await?;
            }
        }
    }
    Ok(())
}
