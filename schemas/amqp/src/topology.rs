//! Idempotent declarations of the topology documented in `schemas/README.md` ("Topology").

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use saga_schemas::amqp::{
    COMMANDS_EXCHANGE, DEAD_LETTER_EXCHANGE, EVENTS_EXCHANGE, REPLIES_QUEUE, START_QUEUE,
    command_queue, dead_letter_queue,
};

use crate::{AmqpError, short};

/// The arguments of every queue except the `.dlq` queues, exactly as the README promises:
/// `x-dead-letter-exchange = saga.dead-letter`, `x-dead-letter-routing-key = <queue>.dlq`
/// (both long strings). A declaration with any other arguments fails with `PRECONDITION_FAILED`.
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

async fn declare_queue(ch: &Channel, name: &str, args: FieldTable) -> Result<(), AmqpError> {
    ch.queue_declare(short(name, "queue")?, QueueDeclareOptions::durable(), args)
        .await
        .map(drop)
        .map_err(|e| AmqpError::amqp(format!("declaring queue {name}"), e))
}

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
    let dlq = dead_letter_queue(queue);
    declare_queue(ch, &dlq, FieldTable::default()).await?;
    bind(ch, &dlq, DEAD_LETTER_EXCHANGE, &dlq).await?;
    declare_queue(ch, queue, queue_arguments(queue)).await
}

fn check_participant(participant: &str) -> Result<(), AmqpError> {
    if participant.is_empty() {
        return Err(AmqpError::Invalid(
            "a participant name must not be empty".into(),
        ));
    }
    // The longest name derived from it is its dead-letter queue.
    short(&dead_letter_queue(&command_queue(participant)), "queue")?;
    Ok(())
}

async fn declare_participant_queue(ch: &Channel, participant: &str) -> Result<(), AmqpError> {
    let queue = command_queue(participant);
    declare_queue_with_dead_letter(ch, &queue).await?;
    bind(ch, &queue, COMMANDS_EXCHANGE, participant).await
}

/// Declares everything the orchestrator uses, idempotently:
///
/// - exchanges `saga.dead-letter` (direct), `saga.commands` (direct), `saga.events` (topic),
///   all durable;
/// - for each participant `p`: queue `saga.commands.<p>` bound to `saga.commands` with key `p`;
/// - queues `saga.replies` and `saga.start` (reached through the default exchange);
/// - beside every queue its `.dlq`, bound to `saga.dead-letter` (see
///   [`declare_queue_with_dead_letter`]).
///
/// Run it on a channel used for nothing else: a mismatch with an existing declaration (other
/// arguments or type) makes the broker close the channel with `PRECONDITION_FAILED`.
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
/// `saga.commands.<participant>` bound with key `<participant>`, and its `.dlq`.
pub async fn declare_participant_topology(
    ch: &Channel,
    participant: &str,
) -> Result<(), AmqpError> {
    check_participant(participant)?;
    declare_dead_letter_exchange(ch).await?;
    declare_exchange(ch, COMMANDS_EXCHANGE, ExchangeKind::Direct).await?;
    declare_participant_queue(ch, participant).await
}
