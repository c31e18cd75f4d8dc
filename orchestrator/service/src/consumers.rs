//! Broker → runtime: the replies queue and the start queue. Every delivery is acked only after
//! what it caused is committed; what cannot be understood is dead-lettered with the reason.

use std::time::Duration;

use futures_util::{FutureExt, StreamExt};
use saga_amqp::lapin::message::Delivery;
use saga_amqp::lapin::options::QueueDeclareOptions;
use saga_amqp::lapin::types::FieldTable;
use saga_amqp::lapin::{Channel, Consumer};
use saga_amqp::trace::TraceContext;
use saga_amqp::{AmqpError, DecodeError, Publisher, Received};
use saga_engine::{Ignored, Input, Outcome};
use saga_schemas::amqp::{
    HeaderValue, OutgoingMessage, REPLIES_QUEUE, START_QUEUE, header, message_type,
};
use saga_schemas::limits::{self, LimitError};
use saga_schemas::{
    RejectionReason, SCHEMA_VERSION, SagaStartedReply, StartRejected, StartSaga, StepReplies,
    StepReply,
};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::DEAD_LETTERS;
use crate::runtime::{Runtime, RuntimeError, Started, Work};
use crate::timers::RepliesWaiting;

/// Replies decided in one transaction: no more deliveries are taken into a batch once it holds
/// this many (a packed delivery holds up to 32). Larger batches held more memory in their
/// statements than they saved in commits.
const MAX_BATCH: usize = 128;
/// Replies for a saga this orchestrator's database does not know, dead-lettered.
pub const REPLIES_UNKNOWN: &str = "saga_replies_unknown_total";

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
        let mut batch = Vec::new();
        let mut replies = 0;
        let mut next = Some(first);
        // Group commit: take whatever else has already arrived, without waiting for more.
        while let Some(delivery) = next.take() {
            if let Some(decoded) = decode_replies(publisher, &delivery).await? {
                replies += decoded.len();
                batch.push((delivery, decoded));
            }
            if replies >= MAX_BATCH {
                break;
            }
            next = match consumer.next().now_or_never() {
                Some(Some(delivery)) => Some(delivery?),
                _ => None,
            };
        }
        if !batch.is_empty() {
            handle_replies(&runtime, publisher, batch, &shutdown).await?;
        }
    }
    Ok(())
}

/// How often [`watch_replies_waiting`] asks the broker.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Records, every second until `shutdown`, how many replies wait in `saga.replies` that no
/// orchestrator has taken yet (the timer worker holds step timeouts back while any do).
pub async fn watch_replies_waiting(
    conn: &saga_amqp::lapin::Connection,
    waiting: RepliesWaiting,
    shutdown: CancellationToken,
) -> Result<(), AmqpError> {
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| AmqpError::amqp("opening a channel to watch the replies queue", e))?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    loop {
        let queue = channel
            .queue_declare(REPLIES_QUEUE.into(), passive, FieldTable::default())
            .await
            .map_err(|e| AmqpError::amqp("reading the replies queue's length", e))?;
        waiting.record(queue.message_count());
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = shutdown.cancelled() => {
                channel.close(200, "shutting down".into()).await.ok();
                return Ok(());
            }
        }
    }
}

/// Where a reply came from: a delivery of its own, or one of a packed delivery's.
struct Part {
    /// Index of its delivery.
    delivery: usize,
    /// For a reply of a packed delivery, its place in it.
    in_pack: Option<usize>,
}

/// The replies of `deliveries`, each delivery acked once every reply in it is decided, set
/// aside or dead-lettered.
struct Replies {
    deliveries: Vec<Delivery>,
    /// Per delivery, its replies not yet settled.
    left: Vec<usize>,
    /// Deliveries whose replies are all settled, to ack together.
    to_ack: Vec<usize>,
}

impl Replies {
    fn settled(&mut self, part: &Part) {
        self.left[part.delivery] -= 1;
        if self.left[part.delivery] == 0 {
            self.to_ack.push(part.delivery);
        }
    }

    async fn ack_settled(&mut self) -> Result<(), AmqpError> {
        let acks: Vec<_> = std::mem::take(&mut self.to_ack)
            .into_iter()
            .map(|i| saga_amqp::ack(&self.deliveries[i]))
            .collect();
        futures_util::future::try_join_all(acks).await?;
        Ok(())
    }

    /// The JSON of the reply `part` alone (what is dead-lettered or set aside). Read again from
    /// its delivery: needed only on these rare paths.
    fn alone(&self, part: &Part) -> Vec<u8> {
        let data = &self.deliveries[part.delivery].data;
        let Some(index) = part.in_pack else {
            return data.clone();
        };
        serde_json::from_slice::<StepReplies>(data)
            .ok()
            .and_then(|pack| pack.replies.into_iter().nth(index))
            .and_then(|packed| serde_json::to_vec(&packed.reply).ok())
            .unwrap_or_else(|| data.clone())
    }

    /// Sets `part` aside in the replies' dead-letter queue with `reason`: the delivery itself
    /// when it is the part's alone (acked then), else a copy of the part.
    async fn dead_letter(
        &mut self,
        publisher: &Publisher,
        part: &Part,
        saga_id: uuid::Uuid,
        reason: &str,
    ) -> Result<(), AmqpError> {
        let delivery = &self.deliveries[part.delivery];
        match part.in_pack {
            None => {
                dead_letter(publisher, delivery, REPLIES_QUEUE, reason).await?;
                self.left[part.delivery] = 0;
            }
            Some(_) => {
                saga_amqp::dead_letter_part(
                    publisher,
                    delivery,
                    REPLIES_QUEUE,
                    reason,
                    &self.alone(part),
                    message_type::STEP_REPLY,
                    Some(&saga_id.to_string()),
                )
                .await?;
                metrics::counter!(DEAD_LETTERS, "queue" => REPLIES_QUEUE).increment(1);
                self.settled(part);
            }
        }
        Ok(())
    }
}

fn reply_work(reply: StepReply, trace: Option<TraceContext>) -> Work {
    Work {
        saga_id: reply.saga_id,
        input: Input::Reply {
            step: reply.step,
            direction: reply.direction,
            attempt: reply.attempt,
            in_reply_to: reply.in_reply_to,
            outcome: reply.outcome,
        },
        inbox_id: Some(reply.message_id),
        fired_timer: None,
        trace,
    }
}

/// A reply as decoded, with the trace context it came with.
type Decoded = (StepReply, Option<TraceContext>);

/// Whether `delivery` is a packed message of replies (`saga.step_replies`).
fn is_pack(delivery: &Delivery) -> bool {
    delivery
        .properties
        .kind()
        .as_ref()
        .is_some_and(|kind| kind.as_str() == message_type::STEP_REPLIES)
}

/// The replies in `delivery`, or `None` when it was dead-lettered (it could not be decoded).
async fn decode_replies(
    publisher: &Publisher,
    delivery: &Delivery,
) -> Result<Option<Vec<Decoded>>, AmqpError> {
    let decoded = if is_pack(delivery) {
        saga_amqp::decode_pack::<StepReplies>(delivery)
            .map_err(|e| e.to_string())
            .and_then(|pack| {
                if pack.replies.is_empty() {
                    return Err("a saga.step_replies message with no replies".into());
                }
                Ok(pack
                    .replies
                    .into_iter()
                    .map(|packed| {
                        let trace = TraceContext::from_headers(|key| match key {
                            saga_amqp::trace::TRACEPARENT => packed.traceparent.as_deref(),
                            saga_amqp::trace::TRACESTATE => packed.tracestate.as_deref(),
                            _ => None,
                        });
                        (packed.reply, trace)
                    })
                    .collect())
            })
    } else {
        saga_amqp::decode::<StepReply>(delivery)
            .map(|reply| vec![(reply, TraceContext::of_delivery(delivery))])
            .map_err(|e| e.to_string())
    };
    match decoded {
        Ok(replies) => Ok(Some(replies)),
        Err(error) => {
            saga_amqp::dead_letter_undecodable(publisher, delivery, REPLIES_QUEUE, &error).await?;
            metrics::counter!(DEAD_LETTERS, "queue" => REPLIES_QUEUE).increment(1);
            Ok(None)
        }
    }
}

/// Decides the replies of `batch` (deliveries with what [`decode_replies`] found in them).
async fn handle_replies(
    runtime: &Runtime,
    publisher: &Publisher,
    batch: Vec<(Delivery, Vec<Decoded>)>,
    shutdown: &CancellationToken,
) -> Result<(), AmqpError> {
    let mut works = Vec::with_capacity(batch.len());
    let mut parts = Vec::with_capacity(batch.len());
    let mut left = Vec::with_capacity(batch.len());
    let mut deliveries = Vec::with_capacity(batch.len());
    for (index, (delivery, replies)) in batch.into_iter().enumerate() {
        left.push(replies.len());
        let packed = is_pack(&delivery);
        for (place, (reply, trace)) in replies.into_iter().enumerate() {
            works.push(reply_work(reply, trace));
            parts.push(Part {
                delivery: index,
                in_pack: packed.then_some(place),
            });
        }
        deliveries.push(delivery);
    }
    let mut replies = Replies {
        deliveries,
        left,
        to_ack: Vec::new(),
    };
    // Replies already handled (a redelivery after a crash before the ack) need no decision.
    // Only a redelivery can be one, bar a publisher's own retry: the inbox insert catches that
    // one, and the batch is then decided reply by reply. Asking only about redeliveries spares
    // the common batch a query.
    let ids: Vec<_> = works
        .iter()
        .zip(&parts)
        .filter(|(_, part)| replies.deliveries[part.delivery].redelivered)
        .filter_map(|(work, _)| work.inbox_id)
        .collect();
    let seen = if ids.is_empty() {
        Default::default()
    } else {
        runtime.store().seen(&ids).await.unwrap_or_else(|error| {
            // Deciding them again is safe: the inbox makes a duplicate commit fail.
            warn!(%error, "cannot read the inbox; deciding every reply of the batch");
            Default::default()
        })
    };
    // Acks go out together once their batch is decided: one hand-off to the connection's I/O
    // task instead of one round each.
    let (mut fresh, mut fresh_parts) = (Vec::new(), Vec::new());
    for (work, part) in works.into_iter().zip(parts) {
        if work.inbox_id.is_some_and(|id| seen.contains(&id)) {
            replies.settled(&part);
        } else {
            fresh.push(work);
            fresh_parts.push(part);
        }
    }
    let mut pause = FIRST_PAUSE;
    loop {
        let results = runtime.handle(&fresh).await;
        let mut again = (Vec::new(), Vec::new());
        for ((work, part), result) in fresh.into_iter().zip(fresh_parts).zip(results) {
            let saga_id = work.saga_id;
            match result {
                // Nothing was recorded for it: say so, set it aside, count it. A reply nobody
                // here asked for usually means another orchestrator, on another database,
                // consumes this vhost and is missing the reply.
                Ok(Outcome::Ignored(Ignored::UnknownSaga)) => {
                    let reason = result_reason(
                        &saga_id,
                        "unknown to this orchestrator's database (another orchestrator with a different database may consume this vhost)",
                    );
                    warn!(%saga_id, %reason, "dead-lettering a reply for an unknown saga");
                    metrics::counter!(REPLIES_UNKNOWN).increment(1);
                    replies
                        .dead_letter(publisher, &part, saga_id, &reason)
                        .await?;
                }
                // Forged, or from another orchestrator's saga with a colliding id: never
                // applied, and kept with why rather than acked away.
                Ok(Outcome::Ignored(ignored @ Ignored::UnknownCommand { .. })) => {
                    let reason = result_reason(&saga_id, &ignored.to_string());
                    warn!(%saga_id, %reason, "dead-lettering a reply to a command never sent");
                    replies
                        .dead_letter(publisher, &part, saga_id, &reason)
                        .await?;
                }
                Ok(_) => replies.settled(&part),
                // It can never be handled (its saga's definition is gone, its saga
                // unreadable): set it aside with why, for an operator, instead of trying
                // forever.
                Err(error) if error.is_permanent() => {
                    let reply = serde_json::from_slice(&replies.alone(&part)).unwrap_or_default();
                    let reason = error.to_string();
                    match runtime
                        .store()
                        .set_aside_reply(saga_id, &reply, &reason, chrono::Utc::now())
                        .await
                    {
                        Ok(()) => {
                            warn!(%saga_id, %reason, "reply set aside: it can never be handled");
                            replies.settled(&part);
                        }
                        Err(store_error) => {
                            warn!(%saga_id, %reason, error = %store_error,
                                "cannot set aside a reply that can never be handled yet; trying again");
                            again.0.push(work);
                            again.1.push(part);
                        }
                    }
                }
                Err(error) => {
                    warn!(%saga_id, %error, ?pause, "reply not handled; trying again");
                    again.0.push(work);
                    again.1.push(part);
                }
            }
        }
        (fresh, fresh_parts) = again;
        replies.ack_settled().await?;
        if fresh.is_empty() {
            return Ok(());
        }
        // A passing fault (the database unavailable): keep the deliveries and try again here.
        // Handing them back would count against the queue's delivery limit, and a long outage
        // would dead-letter good replies.
        if !pause_or_shutdown(&mut pause, shutdown).await {
            let mut unsettled: Vec<usize> = fresh_parts.iter().map(|part| part.delivery).collect();
            unsettled.dedup();
            for index in unsettled {
                saga_amqp::nack(&replies.deliveries[index], true).await?;
            }
            return Ok(());
        }
    }
}

/// [`saga_amqp::dead_letter`], counted in [`DEAD_LETTERS`] once the dead letter is confirmed.
async fn dead_letter(
    publisher: &Publisher,
    delivery: &Delivery,
    from_queue: &'static str,
    reason: &str,
) -> Result<(), AmqpError> {
    saga_amqp::dead_letter(publisher, delivery, from_queue, reason).await?;
    metrics::counter!(DEAD_LETTERS, "queue" => from_queue).increment(1);
    Ok(())
}

/// [`saga_amqp::decode_or_dead_letter`], counting what it dead-letters like [`dead_letter`].
async fn decode_or_dead_letter<T: serde::de::DeserializeOwned>(
    publisher: &Publisher,
    delivery: Delivery,
    from_queue: &'static str,
) -> Result<Option<Received<T>>, AmqpError> {
    let received = saga_amqp::decode_or_dead_letter(publisher, delivery, from_queue).await?;
    if received.is_none() {
        metrics::counter!(DEAD_LETTERS, "queue" => from_queue).increment(1);
    }
    Ok(received)
}

/// The first pause before handling a delivery again after a passing fault, and the longest.
const FIRST_PAUSE: Duration = Duration::from_millis(200);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);

/// Sleeps `pause` (then doubles it, up to [`LONGEST_PAUSE`]); `false` if `shutdown` came first.
async fn pause_or_shutdown(pause: &mut Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        () = tokio::time::sleep(*pause) => {
            *pause = (*pause * 2).min(LONGEST_PAUSE);
            true
        }
        () = shutdown.cancelled() => false,
    }
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

/// The answer to a start message that named a `reply_to` queue: a [`SagaStartedReply`]
/// (`saga.started`), correlated by the saga id.
fn start_reply(reply_to: &str, started: &Started) -> OutgoingMessage {
    let body = SagaStartedReply {
        saga_id: started.saga_id,
        created: started.created,
    };
    start_answer(
        reply_to,
        message_type::SAGA_STARTED,
        Some(started.saga_id),
        serde_json::to_string(&body).expect("contract types always serialise"),
    )
}

fn start_answer(
    reply_to: &str,
    kind: &str,
    correlation_id: Option<uuid::Uuid>,
    body: String,
) -> OutgoingMessage {
    OutgoingMessage {
        exchange: String::new(),
        routing_key: reply_to.to_owned(),
        message_id: uuid::Uuid::new_v4(),
        correlation_id,
        message_type: kind.into(),
        reply_to: None,
        headers: vec![(
            header::SCHEMA_VERSION.into(),
            HeaderValue::Int(SCHEMA_VERSION.into()),
        )],
        body,
        mandatory: true,
        discard_after: None,
    }
}

/// A start request refused: what the requester is told, and why it is dead-lettered.
struct Refusal {
    reason: RejectionReason,
    /// The answer's `detail` (cut to the reason limit).
    detail: String,
    /// The dead letter's reason.
    why: String,
}

impl Refusal {
    /// The same words for the answer and the dead letter.
    fn new(reason: RejectionReason, why: String) -> Self {
        Refusal {
            reason,
            detail: why.clone(),
            why,
        }
    }

    /// A start the runtime refused for good.
    fn from_runtime(error: &RuntimeError) -> Self {
        let (reason, detail) = match error {
            RuntimeError::UnknownSaga(_) => (RejectionReason::UnknownSaga, error.to_string()),
            RuntimeError::InvalidInput(detail) => (RejectionReason::InvalidInput, detail.clone()),
            other => (RejectionReason::InvalidRequest, other.to_string()),
        };
        Refusal {
            reason,
            detail,
            why: error.to_string(),
        }
    }
}

/// Answers the requester (if it named a `reply_to`) and dead-letters the request, logging why.
async fn refuse_start(
    publisher: &Publisher,
    delivery: &Delivery,
    saga: &str,
    refusal: Refusal,
) -> Result<(), AmqpError> {
    info!(saga_id = "none", saga = %limits::reason(saga), reason = %limits::reason(&refusal.why),
        "rejecting a start message; dead-lettering it");
    answer_rejection(publisher, delivery, saga, refusal.reason, &refusal.detail).await;
    dead_letter(publisher, delivery, START_QUEUE, &refusal.why).await
}

/// The idempotency key rule, as over HTTP (the runtime checks the input itself).
fn check_key(start: &StartSaga) -> Result<(), Refusal> {
    match &start.idempotency_key {
        Some(key) => limits::check_idempotency_key(key)
            .map_err(|why| Refusal::new(RejectionReason::InvalidRequest, why)),
        None => Ok(()),
    }
}

/// The saga a request that breaks a message limit names, if it can be read safely: not when
/// the body is too large to parse (serde_json bounds the nesting it reads itself).
fn saga_named(delivery: &Delivery, limit: &LimitError) -> String {
    #[derive(serde::Deserialize)]
    struct Named {
        saga: String,
    }
    if matches!(limit, LimitError::TooLarge { .. }) {
        return String::new();
    }
    serde_json::from_slice::<Named>(&delivery.data).map_or_else(|_| String::new(), |n| n.saga)
}

/// Tells the requester why its start message was refused: a [`StartRejected`]
/// (`saga.start_rejected`) on its `reply_to` queue, whose `correlation_id` is the request's own
/// `correlation_id`, or else its `message_id` (the saga has no id to correlate by). A failure to
/// answer is logged; the request is dead-lettered either way.
async fn answer_rejection(
    publisher: &Publisher,
    delivery: &Delivery,
    saga: &str,
    reason: RejectionReason,
    detail: &str,
) {
    let Some(reply_to) = delivery.properties.reply_to().as_ref() else {
        return;
    };
    let body = StartRejected {
        saga: saga.to_owned(),
        reason,
        detail: limits::reason(detail),
    };
    let message = start_answer(
        reply_to.as_str(),
        message_type::START_REJECTED,
        None,
        serde_json::to_string(&body).expect("contract types always serialise"),
    );
    let request_id = delivery
        .properties
        .correlation_id()
        .as_ref()
        .or(delivery.properties.message_id().as_ref())
        .map(|id| id.to_string());
    let published = match saga_amqp::properties(&message, None) {
        Ok(mut properties) => {
            if let Some(id) = &request_id {
                properties = properties.with_correlation_id(id.as_str().into());
            }
            publisher
                .publish_raw("", reply_to.as_str(), message.body.as_bytes(), properties)
                .await
        }
        Err(error) => Err(error),
    };
    if let Err(error) = published {
        warn!(saga_id = "none", reply_to = %reply_to, request = ?request_id, %error,
            "cannot tell the requester its start was rejected");
    }
}

fn result_reason(saga_id: &uuid::Uuid, why: &str) -> String {
    format!("saga {saga_id}: {why}")
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
            // JSON, but beyond what any message may be: refused like a bad input, with an
            // answer, since the requester may be waiting for one.
            Err(DecodeError::Limit(limit)) => {
                let saga = saga_named(&delivery, &limit);
                let refusal = Refusal {
                    reason: RejectionReason::InvalidRequest,
                    detail: limit.to_string(),
                    why: format!("cannot decode the message: {limit}"),
                };
                refuse_start(publisher, &delivery, &saga, refusal).await?;
                continue;
            }
            Err(_) => {
                // Unreadable: dead-lettered unanswered, with the reason.
                decode_or_dead_letter::<StartSaga>(publisher, delivery, START_QUEUE).await?;
                continue;
            }
        };
        if let Err(refusal) = check_key(&start) {
            refuse_start(publisher, &delivery, &start.saga, refusal).await?;
            continue;
        }
        // A passing fault (the database unavailable) is tried again here, holding the
        // delivery: handing it back would count against the queue's delivery limit.
        let mut pause = FIRST_PAUSE;
        let result = loop {
            match runtime
                .start_traced(
                    &start.saga,
                    start.input.clone(),
                    start.idempotency_key.clone(),
                    TraceContext::of_delivery(&delivery),
                )
                .await
            {
                Err(error) if !error.is_permanent() => {
                    warn!(%error, ?pause, "start not handled; trying again");
                    if !pause_or_shutdown(&mut pause, &shutdown).await {
                        saga_amqp::nack(&delivery, true).await?;
                        return Ok(());
                    }
                }
                result => break result,
            }
        };
        match result {
            Ok(started) => {
                if let Some(reply_to) = delivery.properties.reply_to().as_ref() {
                    let reply = start_reply(reply_to.as_str(), &started);
                    if let Err(error) = publisher.publish(&reply).await {
                        warn!(saga_id = %started.saga_id, %error, "cannot answer the start request");
                    }
                }
                saga_amqp::ack(&delivery).await?;
            }
            // Trying again can never help: set it aside with why instead of trying forever.
            Err(error) => {
                let refusal = Refusal::from_runtime(&error);
                refuse_start(publisher, &delivery, &start.saga, refusal).await?;
            }
        }
    }
    Ok(())
}
