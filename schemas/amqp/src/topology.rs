//! Idempotent declarations of the topology documented in `schemas/README.md` ("Topology").

use lapin::{
    Channel, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    types::{AMQPValue, FieldTable},
};
use saga_schemas::amqp::{
    COMMANDS_EXCHANGE, DEAD_LETTER_EXCHANGE, DELIVERY_LIMIT, EVENTS_EXCHANGE, REPLIES_QUEUE,
    START_QUEUE, command_queue, dead_letter_queue,
};

use crate::{AmqpError, short};

/// The kind of queue every queue of the topology is declared as: one setting for the whole
/// system (`--queue-type` / `QUEUE_TYPE` on every binary), since a declaration that differs from
/// the existing queue fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Replicated across the nodes of a cluster (Raft), with at-least-once dead-lettering and a
    /// delivery limit. The default.
    #[default]
    Quorum,
    /// A queue on one node, lost with it: what versions before quorum queues declared, kept for
    /// brokers that still have those queues.
    Classic,
}

impl QueueType {
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Quorum => "quorum",
            QueueType::Classic => "classic",
        }
    }
}

impl std::fmt::Display for QueueType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for QueueType {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "quorum" => Ok(QueueType::Quorum),
            "classic" => Ok(QueueType::Classic),
            other => Err(format!(
                "unknown queue type {other:?}: use quorum (the default) or classic"
            )),
        }
    }
}

/// One queue argument: its name and value.
type Argument = (&'static str, AMQPValue);

fn table(arguments: Vec<Argument>) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in arguments {
        table.insert(name.into(), value);
    }
    table
}

fn describe(arguments: &[Argument]) -> String {
    if arguments.is_empty() {
        return "no arguments".to_owned();
    }
    let shown: Vec<String> = arguments
        .iter()
        .map(|(name, value)| match value {
            AMQPValue::LongString(s) => format!("{name}={s}"),
            AMQPValue::LongInt(n) => format!("{name}={n}"),
            other => format!("{name}={other:?}"),
        })
        .collect();
    shown.join(", ")
}

fn string(value: &str) -> AMQPValue {
    AMQPValue::LongString(value.into())
}

/// `x-queue-type = quorum` and the delivery limit: what every queue a consumer takes work
/// from has, on quorum.
fn quorum_base() -> Vec<Argument> {
    vec![
        ("x-queue-type", string("quorum")),
        (
            "x-delivery-limit",
            AMQPValue::LongInt(DELIVERY_LIMIT as i32),
        ),
    ]
}

fn dead_letter_arguments(queue: &str) -> Vec<Argument> {
    vec![
        ("x-dead-letter-exchange", string(DEAD_LETTER_EXCHANGE)),
        (
            "x-dead-letter-routing-key",
            string(&dead_letter_queue(queue)),
        ),
    ]
}

/// The arguments of `saga.replies` and `saga.start` (and of queues of your own declared with
/// [`declare_queue_with_dead_letter`]), exactly as the README promises. Both types send what
/// the broker dead-letters (a message rejected, or delivered [`DELIVERY_LIMIT`] times more than
/// once unacknowledged) to `saga.dead-letter` with routing key `<queue>.dlq`; a quorum queue
/// does so at least once (`x-dead-letter-strategy = at-least-once`, which needs
/// `x-overflow = reject-publish`), keeping the message until the dead-letter queue has it.
fn consumed_queue_arguments(queue: &str, queue_type: QueueType) -> Vec<Argument> {
    match queue_type {
        QueueType::Quorum => {
            let mut arguments = quorum_base();
            arguments.extend(dead_letter_arguments(queue));
            arguments.push(("x-dead-letter-strategy", string("at-least-once")));
            arguments.push(("x-overflow", string("reject-publish")));
            arguments
        }
        QueueType::Classic => dead_letter_arguments(queue),
    }
}

/// The arguments of a participant's command queue `saga.commands.<participant>`.
///
/// No dead-letter exchange, on either type: a command the broker drops at its `expiration` (an
/// attempt superseded by a newer one) must vanish, not fill the dead-letter queue, and the
/// broker cannot dead-letter by reason (RabbitMQ 4 no longer shows `x-death` to a headers
/// exchange). What a participant cannot use it dead-letters itself, with the reason, by
/// publishing to `saga.dead-letter` and then acking; that includes a command delivered for the
/// last time under the delivery limit (its `x-delivery-count` header equals
/// [`DELIVERY_LIMIT`]), which the participant SDK sets aside before its handler runs.
fn command_queue_arguments(queue_type: QueueType) -> Vec<Argument> {
    match queue_type {
        QueueType::Quorum => quorum_base(),
        QueueType::Classic => Vec::new(),
    }
}

/// The arguments of a dead-letter queue `<queue>.dlq`: nobody consumes it but operators.
fn dead_letter_queue_arguments(queue_type: QueueType) -> Vec<Argument> {
    match queue_type {
        QueueType::Quorum => vec![("x-queue-type", string("quorum"))],
        QueueType::Classic => Vec::new(),
    }
}

/// The arguments [`declare_queue_with_dead_letter`] declares `queue` with, e.g. to declare a
/// queue of your own the same way from elsewhere.
pub fn queue_arguments(queue: &str, queue_type: QueueType) -> FieldTable {
    table(consumed_queue_arguments(queue, queue_type))
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

/// Declares a durable queue with `arguments`; an existing queue with other arguments is a
/// [`AmqpError::QueueMismatch`] that says what was expected.
async fn declare_queue(
    ch: &Channel,
    name: &str,
    arguments: Vec<Argument>,
    queue_type: QueueType,
) -> Result<(), AmqpError> {
    let expected = describe(&arguments);
    ch.queue_declare(
        short(name, "queue")?,
        QueueDeclareOptions::durable(),
        table(arguments),
    )
    .await
    .map(drop)
    .map_err(|e| match precondition_failed(&e) {
        Some(broker) => AmqpError::QueueMismatch {
            queue: name.to_owned(),
            queue_type,
            expected,
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
/// `<queue>.dlq` bound to `saga.dead-letter` with key `<queue>.dlq`. The dead-letter exchange
/// must exist (see [`declare_dead_letter_exchange`]).
///
/// Also for queues of your own that follow the same convention, e.g. one bound to
/// `saga.events` to follow sagas.
pub async fn declare_queue_with_dead_letter(
    ch: &Channel,
    queue: &str,
    queue_type: QueueType,
) -> Result<(), AmqpError> {
    declare_dead_letter_queue(ch, queue, queue_type).await?;
    declare_queue(
        ch,
        queue,
        consumed_queue_arguments(queue, queue_type),
        queue_type,
    )
    .await
}

/// Declares `<queue>.dlq` bound to `saga.dead-letter` with key `<queue>.dlq`.
async fn declare_dead_letter_queue(
    ch: &Channel,
    queue: &str,
    queue_type: QueueType,
) -> Result<(), AmqpError> {
    let dlq = dead_letter_queue(queue);
    declare_queue(
        ch,
        &dlq,
        dead_letter_queue_arguments(queue_type),
        queue_type,
    )
    .await?;
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

/// `saga.commands.<participant>` (see [`command_queue_arguments`] for why it has no
/// dead-letter exchange), its `.dlq` for what the participant dead-letters itself, and the
/// binding.
async fn declare_participant_queue(
    ch: &Channel,
    participant: &str,
    queue_type: QueueType,
) -> Result<(), AmqpError> {
    let queue = command_queue(participant);
    declare_dead_letter_queue(ch, &queue, queue_type).await?;
    declare_queue(ch, &queue, command_queue_arguments(queue_type), queue_type).await?;
    bind(ch, &queue, COMMANDS_EXCHANGE, participant).await
}

/// Declares everything the orchestrator uses, idempotently, every queue of `queue_type`:
///
/// - exchanges `saga.dead-letter` (direct), `saga.commands` (direct), `saga.events` (topic),
///   all durable;
/// - for each participant `p`: queue `saga.commands.<p>` bound to `saga.commands` with key `p`;
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
    queue_type: QueueType,
) -> Result<(), AmqpError> {
    for participant in participants {
        check_participant(participant)?;
    }
    declare_dead_letter_exchange(ch).await?;
    declare_exchange(ch, COMMANDS_EXCHANGE, ExchangeKind::Direct).await?;
    declare_exchange(ch, EVENTS_EXCHANGE, ExchangeKind::Topic).await?;
    for queue in [REPLIES_QUEUE, START_QUEUE] {
        declare_queue_with_dead_letter(ch, queue, queue_type).await?;
    }
    for participant in participants {
        declare_participant_queue(ch, participant, queue_type).await?;
    }
    Ok(())
}

/// Declares what one participant needs, with the same declarations as the orchestrator, so
/// either may start first: exchanges `saga.dead-letter` and `saga.commands`, the queue
/// `saga.commands.<participant>` bound with key `<participant>`, and its `.dlq`.
pub async fn declare_participant_topology(
    ch: &Channel,
    participant: &str,
    queue_type: QueueType,
) -> Result<(), AmqpError> {
    check_participant(participant)?;
    declare_dead_letter_exchange(ch).await?;
    declare_exchange(ch, COMMANDS_EXCHANGE, ExchangeKind::Direct).await?;
    declare_participant_queue(ch, participant, queue_type).await
}
