//! The AMQP side: consuming the participant's queue, one task per delivery, replies with
//! publisher confirms, acks after them, dead-letters, reconnects, graceful shutdown.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use saga_amqp::lapin::message::Delivery;
use saga_amqp::lapin::options::BasicCancelOptions;
use saga_amqp::{AmqpError, OutgoingMessage, Publisher};
use saga_schemas::amqp::{DELIVERY_LIMIT, REPLIES_QUEUE, command_queue, header, message_type};
use saga_schemas::limits;
use saga_schemas::{Data, Outcome, PackedReply, StepCommand, StepCommands, StepReply};
use sea_orm::{DatabaseConnection, DbBackend};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::process::{Committer, Handled};
use crate::{
    DEFAULT_POSTGRES_TRANSACTIONS, Error, Participant, SdkConfig, default_connection_name,
};

/// How long to wait before handing back a command whose reply was refused other than by a nack
/// (its `reply_to` queue does not exist, say), so it does not loop hot.
const REPUBLISH_DELAY: Duration = Duration::from_secs(1);
/// How many times a command's reply may be refused other than by a nack (no such `reply_to`
/// queue, say) before the command is dead-lettered instead of handed back again.
pub(crate) const MAX_REPLY_TRIES: u32 = 5;
/// The first and the longest pause before publishing again a reply the broker nacked.
const NACKED_REPLY_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));
/// The most commands whose refused replies are counted at once; past it the counts start over
/// (a command redelivered to another consumer is never seen again here).
const MAX_COUNTED_REPLIES: usize = 10_000;

struct Context {
    participant: Arc<Participant>,
    committer: Committer,
    queue: String,
    queue_type: saga_amqp::QueueType,
    /// Per command message id: how many times its reply was refused other than by a nack.
    refused_replies: Mutex<HashMap<uuid::Uuid, u32>>,
    shutdown: CancellationToken,
}

impl Context {
    /// Counts one more refused reply for command `id`; returns the count so far.
    fn reply_refused(&self, id: uuid::Uuid) -> u32 {
        let mut counts = self
            .refused_replies
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if counts.len() >= MAX_COUNTED_REPLIES && !counts.contains_key(&id) {
            counts.clear();
        }
        let count = counts.entry(id).or_default();
        *count += 1;
        *count
    }

    fn forget_refusals(&self, id: uuid::Uuid) {
        self.refused_replies
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
}

pub(crate) async fn run(
    participant: Arc<Participant>,
    db: DatabaseConnection,
    config: SdkConfig,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let connection_name = config
        .connection_name
        .clone()
        .unwrap_or_else(|| default_connection_name(participant.name()));
    // By default within the pool, which the inbox pruning shares.
    let transactions =
        config
            .database_transactions
            .unwrap_or(if db.get_database_backend() == DbBackend::Sqlite {
                1
            } else {
                DEFAULT_POSTGRES_TRANSACTIONS.min(
                    config
                        .database_pool_size
                        .unwrap_or(crate::DEFAULT_DATABASE_POOL_SIZE),
                )
            });
    let ctx = Arc::new(Context {
        queue: command_queue(participant.name()),
        queue_type: config.queue_type,
        participant,
        committer: Committer::start(db, transactions as usize, usize::from(config.prefetch)),
        refused_replies: Mutex::new(HashMap::new()),
        shutdown: shutdown.clone(),
    });
    // Tasks handling deliveries outlive a lost connection (their database work finishes; the
    // reply or ack then fails and the broker redelivers), and shutdown waits for all of them.
    let tls = saga_amqp::Tls::from_ca_file(config.amqp_ca_file.as_deref())?;
    let tasks = TaskTracker::new();
    let result = saga_amqp::supervise(
        &config.amqp_url,
        tls,
        &connection_name,
        shutdown.clone(),
        |conn| {
            session(
                conn,
                ctx.clone(),
                config.prefetch,
                connection_name.clone(),
                shutdown.clone(),
                tasks.clone(),
            )
        },
    )
    .await;
    tasks.close();
    if !tasks.is_empty() {
        tracing::info!(in_flight = tasks.len(), "waiting for in-flight commands");
    }
    tasks.wait().await;
    result.map_err(Error::from)
}

async fn session(
    conn: saga_amqp::lapin::Connection,
    ctx: Arc<Context>,
    prefetch: u16,
    consumer_tag: String,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) -> Result<(), AmqpError> {
    let name = ctx.participant.name();
    let setup = conn
        .create_channel()
        .await
        .map_err(|e| AmqpError::amqp("opening the set-up channel", e))?;
    saga_amqp::declare_participant_topology(&setup, name, ctx.queue_type).await?;
    let _ = setup.close(200, "topology declared".into()).await;

    let publisher = Publisher::open(&conn).await?.with_app_id(name)?;
    let (channel, mut consumer) =
        saga_amqp::open_consumer(&conn, &ctx.queue, &consumer_tag, prefetch).await?;
    tracing::info!(queue = %ctx.queue, prefetch, "consuming commands");

    // A task that finds the connection unusable reports it here, ending the session.
    let (failed, mut failures) = mpsc::channel::<AmqpError>(1);
    let session_tasks = TaskTracker::new();
    let ended = loop {
        tokio::select! {
            biased;
            () = shutdown.cancelled() => break Ok(()),
            Some(error) = failures.recv() => break Err(error),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    let task = handle_delivery(ctx.clone(), publisher.clone(), delivery, failed.clone());
                    tasks.spawn(session_tasks.track_future(task));
                }
                Some(Err(error)) => break Err(AmqpError::amqp(format!("consuming {}", ctx.queue), error)),
                None => break Err(AmqpError::ConnectionLost(format!("the broker cancelled the consumer of {}", ctx.queue))),
            },
        }
    };
    ended?;

    // Shutdown: no new deliveries; those received but not started go back to the queue when the
    // channel closes; those being handled finish, reply and ack.
    tracing::info!(
        in_flight = session_tasks.len(),
        "shutting down: no more commands taken"
    );
    if let Err(error) = channel
        .basic_cancel(consumer_tag.as_str().into(), BasicCancelOptions::default())
        .await
    {
        tracing::warn!(error = %error, "cancelling the consumer");
    }
    session_tasks.close();
    tokio::select! {
        () = session_tasks.wait() => {}
        Some(error) = failures.recv() => {
            tracing::warn!(error = %error, "an AMQP error during shutdown");
        }
    }
    session_tasks.wait().await;
    let _ = channel.close(200, "shutting down".into()).await;
    let _ = publisher.channel().close(200, "shutting down".into()).await;
    let _ = conn.close(200, "shutting down".into()).await;
    Ok(())
}

/// Handles one delivery to the end: decode (or dead-letter), handle, reply, ack.
async fn handle_delivery(
    ctx: Arc<Context>,
    publisher: Publisher,
    delivery: Delivery,
    failed: mpsc::Sender<AmqpError>,
) {
    let packed = delivery
        .properties
        .kind()
        .as_ref()
        .is_some_and(|kind| kind.as_str() == message_type::STEP_COMMANDS);
    let result = if packed {
        handle_pack(&ctx, &publisher, &delivery).await
    } else {
        handle_single(&ctx, &publisher, &delivery).await
    };
    if let Err(error) = result {
        // The channel or connection is gone (or the broker would not take a dead letter): end
        // the session so it is rebuilt; unacked deliveries come back.
        let _ = failed.try_send(error);
    }
}

/// A delivery of one command.
async fn handle_single(
    ctx: &Context,
    publisher: &Publisher,
    delivery: &Delivery,
) -> Result<(), AmqpError> {
    match check(ctx, publisher, delivery) {
        Ok((cmd, reply_to)) => {
            let span = command_span(&cmd);
            // A child of the orchestrator's span for this command, when traces are exported.
            saga_amqp::trace::set_parent(
                &span,
                saga_amqp::header_str(delivery, saga_amqp::trace::TRACEPARENT),
                saga_amqp::header_str(delivery, saga_amqp::trace::TRACESTATE),
            );
            answer(ctx, publisher, delivery, cmd, reply_to)
                .instrument(span)
                .await
        }
        Err(reason) => {
            // Header values and names are logged cut: a hostile message may carry huge ones.
            let saga_id =
                limits::reason(saga_amqp::header_str(delivery, header::SAGA_ID).unwrap_or(""));
            dead_letter_whole(ctx, publisher, delivery, &saga_id, &reason).await
        }
    }
}

fn command_span(cmd: &StepCommand) -> tracing::Span {
    tracing::info_span!(
        "command",
        saga_id = %cmd.saga_id,
        trace_id = tracing::field::Empty,
        step = %limits::reason(&cmd.step),
        direction = cmd.direction.as_str(),
        action = %cmd.action,
        attempt = cmd.attempt,
    )
}

async fn dead_letter_whole(
    ctx: &Context,
    publisher: &Publisher,
    delivery: &Delivery,
    saga_id: &str,
    reason: &str,
) -> Result<(), AmqpError> {
    let span = tracing::warn_span!("dead_letter", saga_id = %saga_id);
    async {
        tracing::warn!(
            delivery_tag = delivery.delivery_tag,
            message_id = delivery.properties.message_id().as_ref().map(|s| s.as_str()),
            reason = %limits::reason(reason),
            "dead-lettering a message"
        );
        saga_amqp::dead_letter(publisher, delivery, &ctx.queue, reason).await
    }
    .instrument(span)
    .await
}

/// A delivery of several commands (`saga.step_commands`): each is checked, handled and
/// answered as if alone, the answers go back together, and the delivery is acked after them.
/// A command that cannot be handled is dead-lettered alone, with why.
async fn handle_pack(
    ctx: &Context,
    publisher: &Publisher,
    delivery: &Delivery,
) -> Result<(), AmqpError> {
    let decoded = check_delivery(delivery).and_then(|reply_to| {
        let pack: StepCommands = saga_amqp::decode_pack(delivery)
            .map_err(|e| format!("cannot decode the packed commands: {e}"))?;
        if pack.commands.is_empty() {
            return Err("a saga.step_commands message with no commands".into());
        }
        Ok((pack, reply_to))
    });
    let (pack, reply_to) = match decoded {
        Ok(decoded) => decoded,
        Err(reason) => return dead_letter_whole(ctx, publisher, delivery, "", &reason).await,
    };
    let mut valid = Vec::with_capacity(pack.commands.len());
    for packed in pack.commands {
        let cmd = packed.command;
        let span = command_span(&cmd);
        saga_amqp::trace::set_parent(
            &span,
            packed.traceparent.as_deref(),
            packed.tracestate.as_deref(),
        );
        match check_command(ctx, &cmd) {
            Ok(()) => valid.push((cmd, span)),
            Err(reason) => {
                span.in_scope(|| {
                    tracing::warn!(reason = %limits::reason(&reason), "dead-lettering a command of a packed message");
                });
                let body = serde_json::to_vec(&cmd).expect("contract types always serialise");
                saga_amqp::dead_letter_part(
                    publisher,
                    delivery,
                    &ctx.queue,
                    &reason,
                    &body,
                    message_type::STEP_COMMAND,
                    Some(&cmd.saga_id.to_string()),
                )
                .await?;
            }
        }
    }
    let Some(key) = valid.first().map(|(cmd, _)| cmd.message_id) else {
        return saga_amqp::ack(delivery).await;
    };
    let answers = futures_util::future::join_all(valid.into_iter().map(|(cmd, span)| {
        async move {
            let (reply, status, recorded) = handle(ctx, cmd).await;
            let trace = saga_amqp::trace::TraceContext::of_span(&tracing::Span::current());
            let packed = PackedReply {
                reply,
                traceparent: trace.as_ref().map(|t| t.parent.clone()),
                tracestate: trace.and_then(|t| t.state),
            };
            (packed, status, recorded, tracing::Span::current())
        }
        .instrument(span)
    }))
    .await;
    let replies: Vec<PackedReply> = answers.iter().map(|(reply, ..)| reply.clone()).collect();
    let messages = OutgoingMessage::packed_replies(&replies, &reply_to);
    if deliver(ctx, publisher, delivery, &messages, key, &reply_to).await? {
        for (_, status, recorded, span) in &answers {
            span.in_scope(|| tracing::info!(status, recorded, reply_to = %reply_to, "replied"));
        }
    }
    Ok(())
}

/// Checks and decodes a delivery of one command; `Err` is the reason to dead-letter it.
fn check(
    ctx: &Context,
    publisher: &Publisher,
    delivery: &Delivery,
) -> Result<(StepCommand, String), String> {
    let reply_to = check_delivery(delivery)?;
    let cmd: StepCommand =
        saga_amqp::decode(delivery).map_err(|e| format!("cannot decode the command: {e}"))?;
    check_command(ctx, &cmd)?;
    // The reply carries the saga name, step and action in its headers: names too long for one
    // frame would make the broker close the connection. Refuse the command before its handler
    // runs, rather than do work nobody can be told about.
    let skeleton = reply_to_command(
        &cmd,
        Outcome::Success {
            output: Data::new(),
        },
    );
    publisher
        .check(&OutgoingMessage::reply(
            &skeleton,
            &cmd.saga_name,
            &cmd.action,
            &reply_to,
        ))
        .map_err(|e| format!("the reply to this command could not be published: {e}"))?;
    Ok((cmd, reply_to))
}

/// What every delivery must have, whatever it carries; the reply queue, or the reason to
/// dead-letter it.
fn check_delivery(delivery: &Delivery) -> Result<String, String> {
    // The command queue has no dead-letter exchange (see `saga_amqp::QueueType`): the last
    // delivery the limit allows is set aside here, before the handler that keeps failing on it
    // runs again; the broker would drop it after this one.
    let deliveries = saga_amqp::header_int(delivery, header::DELIVERY_COUNT).unwrap_or(0);
    if deliveries >= i64::from(DELIVERY_LIMIT) {
        return Err(format!(
            "delivered {} times without being acknowledged (the participant crashed, or lost \
             its connection, while handling it each time): set aside at the delivery limit",
            deliveries + 1
        ));
    }
    let reply_to = delivery
        .properties
        .reply_to()
        .as_ref()
        .map(|s| s.as_str().to_owned())
        .ok_or_else(|| {
            format!(
                "the command has no reply_to property (expected e.g. {REPLIES_QUEUE:?}): nobody to answer"
            )
        })?;
    if reply_to.is_empty() {
        return Err("the command has an empty reply_to property: nobody to answer".into());
    }
    Ok(reply_to)
}

/// Whether this participant handles `cmd`'s action; `Err` is the reason to dead-letter it.
fn check_command(ctx: &Context, cmd: &StepCommand) -> Result<(), String> {
    if ctx
        .participant
        .handler(cmd.direction, &cmd.action)
        .is_some()
    {
        return Ok(());
    }
    let (actions, compensations) = ctx.participant.handled_actions();
    let known = match cmd.direction {
        saga_schemas::Direction::Execute => actions,
        saga_schemas::Direction::Compensate => compensations,
    };
    Err(format!(
        "unknown {} action {:?} for participant {} (it handles: {})",
        cmd.direction.as_str(),
        cmd.action,
        ctx.participant.name(),
        if known.is_empty() {
            "none".to_owned()
        } else {
            known.join(", ")
        }
    ))
}

fn reply_to_command(cmd: &StepCommand, outcome: Outcome) -> StepReply {
    StepReply {
        // Time-ordered, so the orchestrator's inbox, keyed by it, grows at its end.
        message_id: uuid::Uuid::now_v7(),
        in_reply_to: cmd.message_id,
        saga_id: cmd.saga_id,
        step: cmd.step.clone(),
        direction: cmd.direction,
        attempt: cmd.attempt,
        outcome,
    }
}

/// Publishes a reply, again and again with a growing pause while the broker nacks it and the
/// channel stays open, until shutdown. A nack says the queue exists but cannot take the message
/// now (a quorum queue electing a leader, say): handing the command back instead would count
/// towards its delivery limit and, after a few tries, set aside a command whose work is done.
async fn publish_reply(
    ctx: &Context,
    publisher: &Publisher,
    message: &OutgoingMessage,
) -> Result<(), AmqpError> {
    let (mut pause, longest) = NACKED_REPLY_BACKOFF;
    loop {
        match publisher.publish(message).await {
            Err(error @ AmqpError::NotConfirmed { .. })
                if publisher.is_open() && !ctx.shutdown.is_cancelled() =>
            {
                tracing::warn!(error = %error, retry_in = ?pause, "the broker nacked the reply; publishing it again");
                tokio::select! {
                    () = tokio::time::sleep(pause) => {}
                    () = ctx.shutdown.cancelled() => {}
                }
                pause = (pause * 2).min(longest);
            }
            other => return other,
        }
    }
}

/// Handles a valid command: its reply, its status for the log, and whether it was recorded
/// before.
async fn handle(ctx: &Context, cmd: StepCommand) -> (StepReply, &'static str, bool) {
    let handler = ctx
        .participant
        .handler(cmd.direction, &cmd.action)
        .expect("checked before")
        .clone();
    let cmd = Arc::new(cmd);
    let handled = ctx.committer.process(cmd.clone(), handler).await;
    let recorded = matches!(handled, Handled::Recorded(_));
    let outcome = handled.outcome();
    let status = match &outcome {
        saga_schemas::Outcome::Success { .. } => "success",
        saga_schemas::Outcome::Failure { .. } => "failure",
        saga_schemas::Outcome::RetryableError { .. } => "retryable_error",
    };
    (reply_to_command(&cmd, outcome), status, recorded)
}

/// Handles a valid command, publishes the reply with a confirm, then acks.
async fn answer(
    ctx: &Context,
    publisher: &Publisher,
    delivery: &Delivery,
    cmd: StepCommand,
    reply_to: String,
) -> Result<(), AmqpError> {
    let (saga_name, action, key) = (cmd.saga_name.clone(), cmd.action.clone(), cmd.message_id);
    let (reply, status, recorded) = handle(ctx, cmd).await;
    let mut message = OutgoingMessage::reply(&reply, &saga_name, &action, &reply_to);
    for (key, value) in saga_amqp::trace::context_headers(&tracing::Span::current()) {
        message
            .headers
            .push((key.to_owned(), saga_amqp::HeaderValue::Str(value)));
    }
    if deliver(ctx, publisher, delivery, &[message], key, &reply_to).await? {
        tracing::info!(status, recorded, reply_to = %reply_to, "replied");
    }
    Ok(())
}

/// Publishes the replies to `delivery`'s commands, each with a confirm, then acks it: `true`.
/// When they cannot all be published, hands the delivery back or, after
/// [`MAX_REPLY_TRIES`] refusals counted under `key`, sets it aside: `false`.
async fn deliver(
    ctx: &Context,
    publisher: &Publisher,
    delivery: &Delivery,
    messages: &[OutgoingMessage],
    key: uuid::Uuid,
    reply_to: &str,
) -> Result<bool, AmqpError> {
    let mut published = Ok(());
    for message in messages {
        published = publish_reply(ctx, publisher, message).await;
        if published.is_err() {
            break;
        }
    }
    match published {
        Ok(()) => {
            ctx.forget_refusals(key);
            saga_amqp::ack(delivery).await?;
            Ok(true)
        }
        Err(error @ AmqpError::NotConfirmed { .. }) if publisher.is_open() => {
            // Nacked while shutting down: the recorded outcome is sent on the next delivery.
            tracing::warn!(error = %error, "the reply was not accepted; the command goes back to the queue");
            saga_amqp::nack(delivery, true).await?;
            Ok(false)
        }
        Err(error) if publisher.is_open() => {
            // No such reply queue (or another refusal that leaves the channel open). The
            // outcome is recorded, so a redelivery sends the same answer: hand the command back
            // after a pause, a few times; then set it aside, so that it does not hold a
            // prefetch slot forever (the orchestrator asks again if it still waits).
            let tries = ctx.reply_refused(key);
            if tries >= MAX_REPLY_TRIES {
                ctx.forget_refusals(key);
                let reason = format!(
                    "the reply could not be delivered to the reply_to queue {reply_to:?} in \
                     {tries} tries (does that queue exist?): {error}"
                );
                tracing::error!(reason = %limits::reason(&reason), "dead-lettering the command");
                saga_amqp::dead_letter(publisher, delivery, &ctx.queue, &reason).await?;
                return Ok(false);
            }
            tracing::error!(error = %error, reply_to = %reply_to, tries, "the reply was not accepted; the command will be redelivered");
            tokio::time::sleep(REPUBLISH_DELAY).await;
            saga_amqp::nack(delivery, true).await?;
            Ok(false)
        }
        Err(error) => {
            tracing::warn!(error = %error, "the reply could not be published; the command will be redelivered");
            Err(error)
        }
    }
}
