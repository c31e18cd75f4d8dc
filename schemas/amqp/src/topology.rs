//! Idempotent declarations of the topology documented in `schemas/README.md` ("Topology").

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable},
};
use saga_schemas::amqp::{
    COMMANDS_EXCHANGE, DEAD_LETTER_EXCHANGE, EVENTS_EXCHANGE, REPLIES_QUEUE, START_QUEUE,
    command_queue, dead_letter_queue,
};

use crate::{AmqpError, short};

/// The arguments of `saga.replies` and `saga.start` (and of queues of your own declared with
/// [`declare_queue_with_dead_letter`]), exactly as the README promises:
/// `x-dead-letter-exchange = saga.dead-letter`, `x-dead-letter-routing-key = <queue>.dlq`
/// (both long strings). A declaration with any other arguments fails with `PRECONDITION_FAILED`.
///
/// The participant command queues `saga.commands.<participant>` have no arguments: a command
/// the broker drops at its `expiration` (an attempt superseded by a newer one) must vanish, not
/// fill the dead-letter queue. What a participant cannot use it dead-letters itself, with the
/// reason, by publishing to `saga.dead-letter`.
pub fn queue_arguments(queue: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dead_letter_queue(queue).into()),
    );
    args
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    }
}

async fn declare_exchange(ch: &Channel, name: &str, kind: ExchangeKind) -> Result<(), AmqpError> {
    ch.exchange_declare(
        short(name, "exchange")?,
        kind,
        durable_exchange(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| AmqpError::amqp(format!("declaring exchange {name}"), e))
}

/// Declares a durable queue with `args`; `expected` describes them for the error an existing
/// queue with other arguments gets.
async fn declare_queue(
    ch: &Channel,
    name: &str,
    args: FieldTable,
    expected: &str,
) -> Result<(), AmqpError> {
    ch.queue_declare(short(name, "queue")?, QueueDeclareOptions::durable(), args)
        .await
        .map(drop)
        .map_err(|e| match precondition_failed(&e) {
            Some(broker) => AmqpError::QueueMismatch {
                queue: name.to_owned(),
                expected: expected.to_owned(),
                broker,
            },
            None => AmqpError::amqp(format!("declaring queue {name}"), e),
        })
}

/// The broker's text if `error` is a `PRECONDITION_FAILED` channel close.
fn precondition_failed(error: &lapin::Error) -> Option<String> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp)
            if matches!(
                amqp.kind(),
                AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)
            ) =>
        {
            Some(amqp.get_message().to_string())
        }
        _ => None,
    }
}

fn describe_dead_letter_arguments(queue: &str) -> String {
    format!(
        "x-dead-letter-exchange={DEAD_LETTER_EXCHANGE}, x-dead-letter-routing-key={}",
        dead_letter_queue(queue)
    )
}

const NO_ARGUMENTS: &str = "no arguments";

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), AmqpError> {
    ch.queue_bind(
        short(queue, "queue")?,
        short(exchange, "exchange")?,
        short(key, "routing key")?,
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| {
        AmqpError::amqp(
            format!("binding queue {queue} to {exchange} with key {key}"),
            e,
        )
    })
}

/// Declares the dead-letter exchange `saga.dead-letter` (direct, durable).
pub async fn declare_dead_letter_exchange(ch: &Channel) -> Result<(), AmqpError> {
    declare_exchange(ch, DEAD_LETTER_EXCHANGE, ExchangeKind::Direct).await
}

/// Declares the durable queue `queue` with [`queue_arguments`], and its dead-letter queue
/// `<queue>.dlq` (durable, no arguments) bound to `saga.dead-letter` with key `<queue>.dlq`.
/// The dead-letter exchange must exist (see [`declare_dead_letter_exchange`]).
///
/// Also for queues of your own that follow the same convention, e.g. one bound to
/// `saga.events` to follow sagas.
pub async fn declare_queue_with_dead_letter(ch: &Channel, queue: &str) -> Result<(), AmqpError> {
    declare_dead_letter_queue(ch, queue).await?;
    declare_queue(
        ch,
        queue,
        queue_arguments(queue),
        &describe_dead_letter_arguments(queue),
    )
    .await
}

/// Declares `<queue>.dlq` (durable, no arguments) bound to `saga.dead-letter` with key
/// `<queue>.dlq`.
async fn declare_dead_letter_queue(ch: &Channel, queue: &str) -> Result<(), AmqpError> {
    let dlq = dead_letter_queue(queue);
    declare_queue(ch, &dlq, FieldTable::default(), NO_ARGUMENTS).await?;
    bind(ch, &dlq, DEAD_LETTER_EXCHANGE, &dlq).await
}

fn check_participant(participant: &str) -> Result<(), AmqpError> {
    if !saga_schemas::definition::is_participant_name(participant) {
        return Err(AmqpError::Invalid(format!(
            "participant name {participant:?}: use letters, digits, `.`, `_` and `-`"
        )));
    }
    // The longest name derived from it is its dead-letter queue.
    short(&dead_letter_queue(&command_queue(participant)), "queue")?;
    Ok(())
}

/// `saga.commands.<participant>` without arguments (see [`queue_arguments`] for why), its
/// `.dlq` for what the participant dead-letters itself, and the binding.
async fn declare_participant_queue(ch: &Channel, participant: &str) -> Result<(), AmqpError> {
    let queue = command_queue(participant);
    declare_dead_letter_queue(ch, &queue).await?;
    declare_queue(ch, &queue, FieldTable::default(), NO_ARGUMENTS).await?;
    bind(ch, &queue, COMMANDS_EXCHANGE, participant).await
}

/// Declares everything the orchestrator uses, idempotently:
///
/// - exchanges `saga.dead-letter` (direct), `saga.commands` (direct), `saga.events` (topic),
///   all durable;
/// - for each participant `p`: queue `saga.commands.<p>` (no arguments) bound to
///   `saga.commands` with key `p`;
/// - queues `saga.replies` and `saga.start` (reached through the default exchange), with the
///   dead-letter arguments of [`queue_arguments`];
/// - beside every queue its `.dlq`, bound to `saga.dead-letter`.
///
/// Run it on a channel used for nothing else: a mismatch with an existing declaration (other
/// arguments or type) makes the broker close the channel with `PRECONDITION_FAILED`; a queue
/// with other arguments is reported as [`AmqpError::QueueMismatch`], saying what to do.
pub async fn declare_orchestrator_topology(
    ch: &Channel,
    participants: &[&str],
) -> Result<(), AmqpError> {
    for participant in participants {
        check_participant(participant)?;
    }
    declare_dead_letter_exchange(ch).await?;
    declare_exchange(ch, COMMANDS_EXCHANGE, ExchangeKind::Direct).await?;
    declare_exchange(ch, EVENTS_EXCHANGE, ExchangeKind::Topic).await?;
    for queue in [REPLIES_QUEUE, START_QUEUE] {
        declare_queue_with_dead_letter(ch, queue).await?;
    }
    for participant in participants {
        declare_participant_queue(ch, participant).await?;
    }
    Ok(())
}

/// Declares what one participant needs, with the same declarations as the orchestrator, so
/// either may start first: exchanges `saga.dead-letter` and `saga.commands`, the queue
/// `saga.commands.<participant>` (no arguments) bound with key `<participant>`, and its `.dlq`.
pub async fn declare_participant_topology(
    ch: &Channel,
    participant: &str,
) -> Result<(), AmqpError> {
    check_participant(participant)?;
    declare_dead_letter_exchange(ch).await?;
    declare_exchange(ch, COMMANDS_EXCHANGE, ExchangeKind::Direct).await?;
    declare_participant_queue(ch, participant).await
}
