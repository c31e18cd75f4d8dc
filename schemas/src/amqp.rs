//! Names and header keys of the AMQP topology, shared by the orchestrator and the participant
//! SDK. `schemas/README.md` documents them for participants in other languages.

/// Direct exchange for step commands; the routing key is the participant's name.
pub const COMMANDS_EXCHANGE: &str = "saga.commands";
/// Topic exchange for lifecycle events; routing key `<saga name>.<event type>`.
pub const EVENTS_EXCHANGE: &str = "saga.events";
/// Direct exchange that receives dead letters; routing key is the dead-letter queue's name.
pub const DEAD_LETTER_EXCHANGE: &str = "saga.dead-letter";
/// The orchestrator's replies queue (participants publish to it via the default exchange).
pub const REPLIES_QUEUE: &str = "saga.replies";
/// Queue on which a [`crate::StartSaga`] message starts a saga.
pub const START_QUEUE: &str = "saga.start";

/// How many times a message may be delivered and not acknowledged (its consumer crashed, lost
/// its connection or handed it back) before it is set aside in its dead-letter queue: the
/// `x-delivery-limit` of every quorum queue. A message is delivered at most this many times plus
/// one.
pub const DELIVERY_LIMIT: u32 = 20;

/// The durable queue holding commands for one participant.
pub fn command_queue(participant: &str) -> String {
    format!("saga.commands.{participant}")
}

/// The dead-letter queue paired with `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// AMQP `type` property values.
pub mod message_type {
    pub const START_SAGA: &str = "saga.start";
    pub const STEP_COMMAND: &str = "saga.step_command";
    pub const STEP_REPLY: &str = "saga.step_reply";
    /// Several commands for one participant: a [`crate::StepCommands`].
    pub const STEP_COMMANDS: &str = "saga.step_commands";
    /// The replies to a [`crate::StepCommands`]: a [`crate::StepReplies`].
    pub const STEP_REPLIES: &str = "saga.step_replies";
    pub const EVENT: &str = "saga.event";
    /// The orchestrator's answer to a start message that set `reply_to`: a
    /// [`crate::SagaStartedReply`].
    pub const SAGA_STARTED: &str = "saga.started";
    /// The orchestrator's answer to a start message it refused, when it set `reply_to`: a
    /// [`crate::StartRejected`].
    pub const START_REJECTED: &str = "saga.start_rejected";
}

/// Header keys.
pub mod header {
    /// The contract version the message was written against (an integer).
    pub const SCHEMA_VERSION: &str = "x-schema-version";
    pub const SAGA_ID: &str = "saga-id";
    pub const SAGA_NAME: &str = "saga-name";
    pub const STEP: &str = "saga-step";
    pub const ACTION: &str = "saga-action";
    pub const DIRECTION: &str = "saga-direction";
    pub const ATTEMPT: &str = "saga-attempt";
    /// Set by a quorum queue on a delivery: how many earlier deliveries of the message were not
    /// acknowledged.
    pub const DELIVERY_COUNT: &str = "x-delivery-count";
    /// Set by the broker on a message it dead-lettered itself: why (`rejected`,
    /// `delivery_limit`...).
    pub const FIRST_DEATH_REASON: &str = "x-first-death-reason";
    /// Why a message was dead-lettered (on messages in a `.dlq` queue).
    pub const DEAD_LETTER_REASON: &str = "x-dead-letter-reason";
    /// The queue a dead-lettered message was taken from.
    pub const DEAD_LETTER_QUEUE: &str = "x-dead-letter-from";
    /// On a dead letter whose original headers were too large to copy whole (with the reason,
    /// they would not fit in one frame): the headers left out, with their sizes.
    pub const DEAD_LETTER_DROPPED_HEADERS: &str = "x-dead-letter-dropped-headers";
}

pub const CONTENT_TYPE_JSON: &str = "application/json";

/// The W3C trace context headers of a message alone, which are fields of each element in a
/// packed message.
pub const TRACE_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// A header value: the two kinds the contract uses.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum HeaderValue {
    Int(i64),
    Str(String),
}

/// A message ready to publish, independent of any AMQP client library, so it can wait in an
/// outbox table as JSON. The transport maps it onto AMQP properties and headers.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OutgoingMessage {
    pub exchange: String,
    pub routing_key: String,
    pub message_id: uuid::Uuid,
    /// The saga id.
    pub correlation_id: Option<uuid::Uuid>,
    /// One of [`message_type`].
    pub message_type: String,
    pub reply_to: Option<String>,
    pub headers: Vec<(String, HeaderValue)>,
    /// JSON text of the message.
    pub body: String,
    /// Whether the broker must route it to a queue (else the publish fails). Commands and
    /// replies must arrive; lifecycle events go to whoever subscribed, possibly no one.
    #[serde(default = "yes")]
    pub mandatory: bool,
    /// The broker may drop the message if no consumer took it by then (the AMQP `expiration`
    /// property, computed at publish time). A re-asked command supersedes its earlier attempt,
    /// so the queue of a participant that is down holds a bounded number per step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub discard_after: Option<chrono::DateTime<chrono::Utc>>,
}

fn yes() -> bool {
    true
}

fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string(value).expect("contract types always serialise")
}

/// The header every message carries: the contract version.
fn version_header() -> (String, HeaderValue) {
    (
        header::SCHEMA_VERSION.into(),
        HeaderValue::Int(crate::SCHEMA_VERSION.into()),
    )
}

fn common_headers(saga_id: uuid::Uuid) -> Vec<(String, HeaderValue)> {
    vec![
        version_header(),
        (
            header::SAGA_ID.into(),
            HeaderValue::Str(saga_id.to_string()),
        ),
    ]
}

impl OutgoingMessage {
    /// A step command, routed to its participant's queue; replies go to `reply_to`. The broker
    /// may drop it unconsumed after `discard_after` (the moment its attempt is superseded).
    pub fn command(
        cmd: &crate::StepCommand,
        participant: &str,
        reply_to: &str,
        discard_after: Option<chrono::DateTime<chrono::Utc>>,
    ) -> Self {
        let mut headers = common_headers(cmd.saga_id);
        headers.extend([
            (
                header::SAGA_NAME.into(),
                HeaderValue::Str(cmd.saga_name.clone()),
            ),
            (header::STEP.into(), HeaderValue::Str(cmd.step.clone())),
            (header::ACTION.into(), HeaderValue::Str(cmd.action.clone())),
            (
                header::DIRECTION.into(),
                HeaderValue::Str(cmd.direction.as_str().into()),
            ),
            (header::ATTEMPT.into(), HeaderValue::Int(cmd.attempt.into())),
        ]);
        OutgoingMessage {
            exchange: COMMANDS_EXCHANGE.into(),
            routing_key: participant.into(),
            message_id: cmd.message_id,
            correlation_id: Some(cmd.saga_id),
            message_type: message_type::STEP_COMMAND.into(),
            reply_to: Some(reply_to.into()),
            headers,
            body: json(cmd),
            mandatory: true,
            discard_after,
        }
    }

    /// A participant's reply, sent through the default exchange to the queue `reply_to`.
    pub fn reply(reply: &crate::StepReply, saga_name: &str, action: &str, reply_to: &str) -> Self {
        let mut headers = common_headers(reply.saga_id);
        headers.extend([
            (header::SAGA_NAME.into(), HeaderValue::Str(saga_name.into())),
            (header::STEP.into(), HeaderValue::Str(reply.step.clone())),
            (header::ACTION.into(), HeaderValue::Str(action.into())),
            (
                header::DIRECTION.into(),
                HeaderValue::Str(reply.direction.as_str().into()),
            ),
            (
                header::ATTEMPT.into(),
                HeaderValue::Int(reply.attempt.into()),
            ),
        ]);
        OutgoingMessage {
            exchange: String::new(),
            routing_key: reply_to.into(),
            message_id: reply.message_id,
            correlation_id: Some(reply.saga_id),
            message_type: message_type::STEP_REPLY.into(),
            reply_to: None,
            headers,
            body: json(reply),
            mandatory: true,
            discard_after: None,
        }
    }

    /// Commands `commands` (each built by [`OutgoingMessage::command`] for the same participant
    /// and `reply_to`) as one [`crate::StepCommands`] message. Its body is put together from
    /// theirs, without parsing them; each keeps its trace context. The broker may drop it after
    /// the latest `discard_after` of its commands (never, if one has none).
    pub fn packed_commands(commands: &[&OutgoingMessage]) -> Self {
        let first = commands.first().expect("a pack of at least one command");
        let mut body =
            String::with_capacity(16 + commands.iter().map(|m| m.body.len() + 16).sum::<usize>());
        body.push_str("{\"commands\":[");
        for (i, message) in commands.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str("{\"command\":");
            body.push_str(&message.body);
            for key in TRACE_HEADERS {
                if let Some((_, HeaderValue::Str(value))) =
                    message.headers.iter().find(|(k, _)| k == key)
                {
                    body.push_str(&format!(",{}:{}", json(&key), json(value)));
                }
            }
            body.push('}');
        }
        body.push_str("]}");
        let discard_after = commands
            .iter()
            .map(|m| m.discard_after)
            .collect::<Option<Vec<_>>>()
            .and_then(|all| all.into_iter().max());
        OutgoingMessage {
            exchange: first.exchange.clone(),
            routing_key: first.routing_key.clone(),
            message_id: uuid::Uuid::now_v7(),
            correlation_id: None,
            message_type: message_type::STEP_COMMANDS.into(),
            reply_to: first.reply_to.clone(),
            headers: vec![version_header()],
            body,
            mandatory: true,
            discard_after,
        }
    }

    /// The replies to a packed command message, as [`crate::StepReplies`] messages to the queue
    /// `reply_to`: one, unless together they would pass the message size limit.
    pub fn packed_replies(replies: &[crate::PackedReply], reply_to: &str) -> Vec<Self> {
        const OPEN: &str = "{\"replies\":[";
        const CLOSE: &str = "]}";
        let max = crate::limits::MAX_MESSAGE_BYTES - OPEN.len() - CLOSE.len();
        let mut bodies: Vec<String> = Vec::new();
        let mut body = String::new();
        for reply in replies {
            let element = json(reply);
            if !body.is_empty() && body.len() + 1 + element.len() > max {
                bodies.push(std::mem::take(&mut body));
            }
            if !body.is_empty() {
                body.push(',');
            }
            body.push_str(&element);
        }
        if !body.is_empty() {
            bodies.push(body);
        }
        bodies
            .into_iter()
            .map(|body| OutgoingMessage {
                exchange: String::new(),
                routing_key: reply_to.into(),
                message_id: uuid::Uuid::now_v7(),
                correlation_id: None,
                message_type: message_type::STEP_REPLIES.into(),
                reply_to: None,
                headers: vec![version_header()],
                body: format!("{OPEN}{body}{CLOSE}"),
                mandatory: true,
                discard_after: None,
            })
            .collect()
    }

    /// A lifecycle event for the events exchange, routed by `<saga name>.<event type>`.
    pub fn event(envelope: &crate::EventEnvelope, message_id: uuid::Uuid) -> Self {
        let mut headers = common_headers(envelope.saga_id);
        headers.push((
            header::SAGA_NAME.into(),
            HeaderValue::Str(envelope.saga_name.clone()),
        ));
        OutgoingMessage {
            exchange: EVENTS_EXCHANGE.into(),
            routing_key: format!("{}.{}", envelope.saga_name, envelope.event.kind()),
            message_id,
            correlation_id: Some(envelope.saga_id),
            message_type: message_type::EVENT.into(),
            reply_to: None,
            headers,
            body: json(envelope),
            mandatory: false,
            discard_after: None,
        }
    }
}
