//! Consuming, decoding, acknowledging and dead-lettering.

use lapin::{
    BasicProperties, Channel, Connection, Consumer,
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions},
    types::{AMQPValue, FieldTable},
};
use saga_schemas::{
    SCHEMA_VERSION,
    amqp::{DEAD_LETTER_EXCHANGE, dead_letter_queue, header},
    limits::{self, LimitError},
};
use serde::de::DeserializeOwned;

use crate::{AmqpError, Publisher, error::chain, frame, short};

/// A decoded message together with its delivery, which is still to be acknowledged.
#[derive(Debug)]
pub struct Received<T> {
    pub message: T,
    pub delivery: Delivery,
}

impl<T> Received<T> {
    /// Acknowledges the delivery (see [`ack`]).
    pub async fn ack(&self) -> Result<(), AmqpError> {
        ack(&self.delivery).await
    }
}

/// Why a delivery could not be decoded. Its `Display` is the human reason put in the
/// `x-dead-letter-reason` header.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the message has no x-schema-version header")]
    MissingSchemaVersion,
    #[error("unsupported x-schema-version {0} (this receiver supports {SCHEMA_VERSION})")]
    UnsupportedSchemaVersion(i64),
    /// The header is there but is not an integer; the text names what it is.
    #[error("the x-schema-version header is not an integer: {0}")]
    SchemaVersionNotInteger(String),
    /// The body breaks a limit every message follows ([`limits::check_json`]: its size, its
    /// nesting, a NUL character, an integer beyond 64 bits).
    #[error("{0}")]
    Limit(LimitError),
    /// The body is not UTF-8 JSON.
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    /// The body is JSON but not the expected message (a missing field, a wrong type...).
    #[error("the body is not a valid message: {0}")]
    Invalid(String),
}

fn amqp_int(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::ShortShortInt(i) => Some((*i).into()),
        AMQPValue::ShortShortUInt(i) => Some((*i).into()),
        AMQPValue::ShortInt(i) => Some((*i).into()),
        AMQPValue::ShortUInt(i) => Some((*i).into()),
        AMQPValue::LongInt(i) => Some((*i).into()),
        AMQPValue::LongUInt(i) => Some((*i).into()),
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::Timestamp(i) => i64::try_from(*i).ok(),
        _ => None,
    }
}

fn header_value<'a>(delivery: &'a Delivery, key: &str) -> Option<&'a AMQPValue> {
    delivery.properties.headers().as_ref()?.inner().get(key)
}

/// The header `key` as a string (an AMQP long or short string holding UTF-8), if present.
pub fn header_str<'a>(delivery: &'a Delivery, key: &str) -> Option<&'a str> {
    match header_value(delivery, key)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        AMQPValue::ShortString(s) => Some(s.as_str()),
        _ => None,
    }
}

/// The header `key` as an integer, whatever its AMQP integer width and signedness (pika sends
/// a signed 32-bit `I`, this crate a signed 64-bit `l`), if present and integral.
pub fn header_int(delivery: &Delivery, key: &str) -> Option<i64> {
    amqp_int(header_value(delivery, key)?)
}

/// Checks the `x-schema-version` header against [`SCHEMA_VERSION`], the body against the
/// message limits ([`limits::check_json`], one pass over the bytes, so that no body is parsed
/// that is too large or too deep, or would store something that cannot be read back), then
/// parses the body as JSON into `T`. Unknown fields in the body are ignored (as the contract
/// requires) unless `T` says otherwise.
pub fn decode<T: DeserializeOwned>(delivery: &Delivery) -> Result<T, DecodeError> {
    decode_within(delivery, limits::MAX_DEPTH)
}

/// [`decode`] for a packed message (`saga.step_commands`, `saga.step_replies`), whose messages
/// sit [`limits::PACK_DEPTH`] levels deeper than alone.
pub fn decode_pack<T: DeserializeOwned>(delivery: &Delivery) -> Result<T, DecodeError> {
    decode_within(delivery, limits::MAX_DEPTH + limits::PACK_DEPTH)
}

fn decode_within<T: DeserializeOwned>(
    delivery: &Delivery,
    max_depth: usize,
) -> Result<T, DecodeError> {
    let version =
        header_value(delivery, header::SCHEMA_VERSION).ok_or(DecodeError::MissingSchemaVersion)?;
    let version = amqp_int(version)
        .ok_or_else(|| DecodeError::SchemaVersionNotInteger(format!("{:?}", version.get_type())))?;
    if version != i64::from(SCHEMA_VERSION) {
        return Err(DecodeError::UnsupportedSchemaVersion(version));
    }
    limits::check_json_with(&delivery.data, limits::MAX_MESSAGE_BYTES, max_depth)
        .map_err(DecodeError::Limit)?;
    serde_json::from_slice(&delivery.data).map_err(|e| {
        if e.is_data() {
            DecodeError::Invalid(e.to_string())
        } else {
            DecodeError::NotJson(e.to_string())
        }
    })
}

/// Acknowledges `delivery`. lapin answers `Ok(false)` instead of sending the ack when the
/// delivery's channel is gone (or it was already acknowledged): that is an error here,
/// [`AmqpError::NotAcknowledged`], since the broker will deliver the message again.
pub async fn ack(delivery: &Delivery) -> Result<(), AmqpError> {
    let sent = delivery
        .ack(BasicAckOptions::default())
        .await
        .map_err(|e| AmqpError::amqp(format!("acking delivery {}", delivery.delivery_tag), e))?;
    sent.then_some(()).ok_or(AmqpError::NotAcknowledged {
        delivery_tag: delivery.delivery_tag,
    })
}

/// Acknowledges every delivery of `deliveries` at once (their acks are handed to the
/// connection together), each checked like [`ack`].
pub async fn ack_all(deliveries: &[Delivery]) -> Result<(), AmqpError> {
    futures_util::future::try_join_all(deliveries.iter().map(ack)).await?;
    Ok(())
}

/// Negatively acknowledges `delivery`: back to its queue if `requeue`, else dead-lettered by
/// the broker through the queue's arguments (to `<queue>.dlq`, with an `x-death` header but no
/// reason) on `saga.replies` and `saga.start`, and dropped on a participant's command queue,
/// which has none (use [`dead_letter`] there). Checks that it was sent, like [`ack`].
pub async fn nack(delivery: &Delivery, requeue: bool) -> Result<(), AmqpError> {
    let options = BasicNackOptions {
        multiple: false,
        requeue,
    };
    let sent = delivery
        .nack(options)
        .await
        .map_err(|e| AmqpError::amqp(format!("nacking delivery {}", delivery.delivery_tag), e))?;
    sent.then_some(()).ok_or(AmqpError::NotAcknowledged {
        delivery_tag: delivery.delivery_tag,
    })
}

/// Moves `delivery` to the dead-letter queue of `from_queue`, as the README describes: publishes
/// a copy (same body and properties, its headers plus `x-dead-letter-reason` = `reason` and
/// `x-dead-letter-from` = `from_queue`) to `saga.dead-letter` with routing key
/// `<from_queue>.dlq`, waits for the confirm, and only then acks the original. The copy is
/// persistent and has no `expiration` nor `user_id` (the broker would refuse another user's).
///
/// The reason is cut to [`limits::MAX_REASON_CHARS`] (it may echo a huge value). If the
/// original headers leave no room in the copy's header frame for the two added ones, the
/// largest original headers are left out and named in `x-dead-letter-dropped-headers`: a
/// content header larger than the frame size would make the broker close the connection, and
/// the message would come back forever. The body is always kept.
///
/// Never loses the message: if the copy is not confirmed, the original is nacked with requeue
/// (so it is delivered again) and the publish error is returned; end the session with it, so
/// that [`crate::supervise`] retries after a backoff instead of looping hot.
/// If the ack fails after the copy was confirmed, the message may end up in the dead-letter
/// queue twice.
pub async fn dead_letter(
    publisher: &Publisher,
    delivery: &Delivery,
    from_queue: &str,
    reason: &str,
) -> Result<(), AmqpError> {
    let published = publish_dead_letter(
        publisher,
        &delivery.properties,
        &delivery.data,
        from_queue,
        reason,
        delivery.delivery_tag,
    )
    .await;
    if let Err(error) = published {
        tracing::warn!(
            queue = from_queue,
            delivery_tag = delivery.delivery_tag,
            error = %chain(&error),
            "could not dead-letter a message; requeueing it"
        );
        if let Err(nack_error) = nack(delivery, true).await {
            tracing::warn!(error = %chain(&nack_error), "could not requeue the message either; the broker redelivers it when its channel closes");
        }
        return Err(error);
    }
    ack(delivery).await
}

/// Sets aside one message of a packed `delivery` (one command of a `saga.step_commands`, one
/// reply of a `saga.step_replies`) as [`dead_letter`] would a message alone: publishes to the
/// dead-letter queue of `from_queue` a message whose body is `body` (that message alone), of
/// AMQP type `message_type`, with the delivery's other properties and headers plus `saga-id`
/// and `correlation_id` = `saga_id` and the reason, and waits for the confirm. It does not
/// acknowledge the delivery, which holds other messages: acknowledge it once each is answered
/// or set aside. On an error nothing is acknowledged, so the whole delivery comes back.
pub async fn dead_letter_part(
    publisher: &Publisher,
    delivery: &Delivery,
    from_queue: &str,
    reason: &str,
    body: &[u8],
    message_type: &str,
    saga_id: Option<&str>,
) -> Result<(), AmqpError> {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let mut properties = delivery.properties.clone().with_type(message_type.into());
    if let Some(saga_id) = saga_id {
        headers.insert(
            short(header::SAGA_ID, "header key")?,
            AMQPValue::LongString(saga_id.into()),
        );
        properties = properties.with_correlation_id(saga_id.into());
    }
    let properties = properties.with_headers(headers);
    publish_dead_letter(
        publisher,
        &properties,
        body,
        from_queue,
        reason,
        delivery.delivery_tag,
    )
    .await
}

/// Publishes the dead-letter copy of a message with `original` properties and `body`, and
/// waits for its confirm (see [`dead_letter`]).
async fn publish_dead_letter(
    publisher: &Publisher,
    original: &BasicProperties,
    body: &[u8],
    from_queue: &str,
    reason: &str,
    delivery_tag: u64,
) -> Result<(), AmqpError> {
    let mut own = FieldTable::default();
    own.insert(
        short(header::DEAD_LETTER_REASON, "header key")?,
        AMQPValue::LongString(limits::reason(reason).into()),
    );
    own.insert(
        short(header::DEAD_LETTER_QUEUE, "header key")?,
        AMQPValue::LongString(from_queue.into()),
    );
    let original_headers = original.headers().clone().unwrap_or_default();
    let mut headers = original_headers.clone();
    for (key, value) in own.inner() {
        headers.insert(key.clone(), value.clone());
    }
    let mut properties = copy_properties(original, headers);
    let max = publisher.max_content_header();
    if frame::content_header_size(&properties) > max {
        let room = max.saturating_sub(frame::content_header_size(&copy_properties(
            original,
            FieldTable::default(),
        )));
        let (headers, dropped) = fitting_headers(&original_headers, own, room);
        tracing::warn!(
            queue = from_queue,
            delivery_tag,
            %dropped,
            "the message's headers leave no room for the dead letter's own; leaving out the largest"
        );
        properties = copy_properties(original, headers);
    }
    let dlq = dead_letter_queue(from_queue);
    publisher
        .publish_raw(DEAD_LETTER_EXCHANGE, &dlq, body, properties)
        .await
}

/// The longest note of the headers left out, in bytes: [`limits::reason`] keeps
/// [`limits::MAX_REASON_CHARS`] characters (at most 4 bytes each) and adds a short note.
const DROPPED_NOTE_BYTES: usize = 4 * limits::MAX_REASON_CHARS + 64;

/// The dead letter's headers within `room` bytes: its `own` (the reason and the queue), then
/// the `original` ones from the smallest up while they fit, then
/// `x-dead-letter-dropped-headers` naming those left out (with their sizes). Also returns that
/// note.
fn fitting_headers(original: &FieldTable, own: FieldTable, room: usize) -> (FieldTable, String) {
    let mut entries: Vec<_> = original
        .inner()
        .iter()
        .filter(|(key, _)| !own.contains_key(key.as_str()))
        .map(|(key, value)| (frame::entry_size(key, value), key, value))
        .collect();
    entries.sort_by_key(|(size, _, _)| *size);
    let note_key = header::DEAD_LETTER_DROPPED_HEADERS;
    let mut used = frame::table_size(&own) + 1 + note_key.len() + 1 + 4 + DROPPED_NOTE_BYTES;
    let mut headers = own;
    let mut dropped = Vec::new();
    for (size, key, value) in entries {
        if used + size <= room {
            headers.insert(key.clone(), value.clone());
            used += size;
        } else {
            dropped.push(format!("{key} ({size} bytes)"));
        }
    }
    let note = limits::reason(&dropped.join(", "));
    headers.insert(note_key.into(), AMQPValue::LongString(note.as_str().into()));
    (headers, note)
}

/// The properties of the dead-letter copy: the original's, with `headers`, persistent, and
/// without `expiration` (a dead letter must not expire) nor `user_id` (the broker refuses a
/// `user_id` other than the publishing connection's user, closing the channel).
fn copy_properties(original: &BasicProperties, headers: FieldTable) -> BasicProperties {
    let o = original;
    let mut p = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(v) = o.content_type() {
        p = p.with_content_type(v.clone());
    }
    if let Some(v) = o.content_encoding() {
        p = p.with_content_encoding(v.clone());
    }
    if let Some(v) = o.priority() {
        p = p.with_priority(*v);
    }
    if let Some(v) = o.correlation_id() {
        p = p.with_correlation_id(v.clone());
    }
    if let Some(v) = o.reply_to() {
        p = p.with_reply_to(v.clone());
    }
    if let Some(v) = o.message_id() {
        p = p.with_message_id(v.clone());
    }
    if let Some(v) = o.timestamp() {
        p = p.with_timestamp(*v);
    }
    if let Some(v) = o.kind() {
        p = p.with_type(v.clone());
    }
    if let Some(v) = o.app_id() {
        p = p.with_app_id(v.clone());
    }
    if let Some(v) = o.cluster_id() {
        p = p.with_cluster_id(v.clone());
    }
    p
}

/// [`decode`]s `delivery`; if it cannot be decoded, [`dead_letter`]s it with the reason
/// `cannot decode the message: <why>` and returns `Ok(None)`. An `Err` comes from dead-lettering
/// (see there).
pub async fn decode_or_dead_letter<T: DeserializeOwned>(
    publisher: &Publisher,
    delivery: Delivery,
    from_queue: &str,
) -> Result<Option<Received<T>>, AmqpError> {
    match decode(&delivery) {
        Ok(message) => Ok(Some(Received { message, delivery })),
        Err(error) => {
            dead_letter_undecodable(publisher, &delivery, from_queue, &error).await?;
            Ok(None)
        }
    }
}

/// [`dead_letter`]s `delivery`, which could not be decoded, with the reason `cannot decode the
/// message: <error>`, and logs it.
pub async fn dead_letter_undecodable(
    publisher: &Publisher,
    delivery: &Delivery,
    from_queue: &str,
    error: &(dyn std::fmt::Display + Sync),
) -> Result<(), AmqpError> {
    let reason = format!("cannot decode the message: {error}");
    tracing::warn!(
        saga_id = header_str(delivery, header::SAGA_ID)
            .map_or_else(|| "unknown".into(), limits::reason),
        queue = from_queue,
        message_id = delivery.properties.message_id().as_ref().map(|s| s.as_str()),
        reason = %limits::reason(&reason),
        "dead-lettering a message"
    );
    dead_letter(publisher, delivery, from_queue, &reason).await
}

/// Opens a channel of its own on `conn`, limits it to `prefetch` unacknowledged messages
/// (`basic_qos`, per consumer) and starts consuming `queue` with manual acks.
/// `consumer_tag` may be empty for a name chosen by the broker.
///
/// The [`Consumer`] is a stream of `Result<Delivery>`; it yields an error when the channel or
/// connection fails and ends when the broker cancels the consumer (e.g. the queue was deleted):
/// both should end the session. Keep the channel alive as long as the consumer.
pub async fn open_consumer(
    conn: &Connection,
    queue: &str,
    consumer_tag: &str,
    prefetch: u16,
) -> Result<(Channel, Consumer), AmqpError> {
    if prefetch == 0 {
        return Err(AmqpError::Invalid(
            "prefetch must be at least 1 (0 would mean unbounded)".into(),
        ));
    }
    let queue_name = short(queue, "queue")?;
    let tag = short(consumer_tag, "consumer tag")?;
    let channel = conn
        .create_channel()
        .await
        .map_err(|e| AmqpError::amqp(format!("opening a channel to consume {queue}"), e))?;
    channel
        .basic_qos(prefetch, BasicQosOptions { global: false })
        .await
        .map_err(|e| AmqpError::amqp(format!("setting the prefetch for {queue}"), e))?;
    let consumer = channel
        .basic_consume(
            queue_name,
            tag,
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| AmqpError::amqp(format!("consuming {queue}"), e))?;
    Ok((channel, consumer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize, PartialEq)]
    struct Msg {
        a: i64,
    }

    fn delivery(version: Option<AMQPValue>, body: &str) -> Delivery {
        let mut d = Delivery::mock(1, "".into(), "q".into(), false, body.as_bytes().to_vec());
        let mut headers = FieldTable::default();
        if let Some(v) = version {
            headers.insert(header::SCHEMA_VERSION.into(), v);
        }
        headers.insert("saga-id".into(), AMQPValue::LongString("s-1".into()));
        d.properties = BasicProperties::default().with_headers(headers);
        d
    }

    #[test]
    fn accepts_every_integer_width() {
        for v in [
            AMQPValue::ShortShortInt(1),
            AMQPValue::ShortShortUInt(1),
            AMQPValue::ShortInt(1),
            AMQPValue::ShortUInt(1),
            AMQPValue::LongInt(1),
            AMQPValue::LongUInt(1),
            AMQPValue::LongLongInt(1),
        ] {
            let d = delivery(Some(v.clone()), r#"{"a": 5, "extra": true}"#);
            assert_eq!(decode::<Msg>(&d), Ok(Msg { a: 5 }), "{v:?}");
        }
    }

    #[test]
    fn rejects_with_reasons() {
        let missing = decode::<Msg>(&delivery(None, r#"{"a":1}"#)).unwrap_err();
        assert_eq!(missing, DecodeError::MissingSchemaVersion);
        assert!(missing.to_string().contains("x-schema-version"));

        let v2 = decode::<Msg>(&delivery(Some(AMQPValue::LongInt(2)), r#"{"a":1}"#)).unwrap_err();
        assert_eq!(v2, DecodeError::UnsupportedSchemaVersion(2));
        assert!(
            v2.to_string().contains("unsupported x-schema-version 2"),
            "{v2}"
        );

        let text = AMQPValue::LongString("1".into());
        let not_int = decode::<Msg>(&delivery(Some(text), r#"{"a":1}"#)).unwrap_err();
        assert!(
            matches!(not_int, DecodeError::SchemaVersionNotInteger(_)),
            "{not_int}"
        );

        let one = || Some(AMQPValue::LongLongInt(1));
        let not_json = decode::<Msg>(&delivery(one(), "not json")).unwrap_err();
        assert!(matches!(not_json, DecodeError::NotJson(_)), "{not_json}");
        let truncated = decode::<Msg>(&delivery(one(), r#"{"a":"#)).unwrap_err();
        assert!(matches!(truncated, DecodeError::NotJson(_)), "{truncated}");
        let invalid = decode::<Msg>(&delivery(one(), r#"{"b":1}"#)).unwrap_err();
        assert!(matches!(invalid, DecodeError::Invalid(_)), "{invalid}");
        assert!(
            invalid.to_string().contains("missing field `a`"),
            "{invalid}"
        );
    }

    #[test]
    fn refuses_bodies_that_break_the_limits_before_parsing() {
        let one = || Some(AMQPValue::LongLongInt(1));
        let deep = format!(r#"{{"a": 1, "b": {}1{}}}"#, "[".repeat(40), "]".repeat(40));
        let cases = [
            (deep, "nested deeper than 32"),
            (r#"{"a": 1, "b": "x\u0000"}"#.to_owned(), "NUL"),
            (
                r#"{"a": 123456789012345678901234567890}"#.to_owned(),
                "64 bits",
            ),
            (
                format!(
                    r#"{{"a": 1, "b": "{}"}}"#,
                    "x".repeat(limits::MAX_MESSAGE_BYTES)
                ),
                "the limit is 1048576",
            ),
        ];
        for (body, reason) in cases {
            let error = decode::<Msg>(&delivery(one(), &body)).unwrap_err();
            assert!(matches!(error, DecodeError::Limit(_)), "{error}");
            assert!(error.to_string().contains(reason), "{error}");
        }
    }

    fn long(len: usize) -> AMQPValue {
        AMQPValue::LongString("v".repeat(len).into())
    }

    #[test]
    fn the_largest_headers_are_left_out_and_named() {
        let mut original = FieldTable::default();
        original.insert("small".into(), long(10));
        original.insert("medium".into(), long(1_000));
        original.insert("large".into(), long(100_000));
        original.insert(header::DEAD_LETTER_REASON.into(), long(50_000));
        let mut own = FieldTable::default();
        own.insert(header::DEAD_LETTER_REASON.into(), long(20));
        let (headers, note) = fitting_headers(&original, own, 5_000);
        let kept: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            kept,
            [
                "medium",
                "small",
                header::DEAD_LETTER_DROPPED_HEADERS,
                header::DEAD_LETTER_REASON,
            ]
        );
        assert_eq!(headers.inner()[header::DEAD_LETTER_REASON], long(20));
        assert_eq!(note, "large (100011 bytes)");
        assert!(frame::table_size(&headers) <= 5_000);

        // Nothing fits beside the dead letter's own: all are named.
        let (headers, note) = fitting_headers(&original, FieldTable::default(), 100);
        assert_eq!(headers.inner().len(), 1);
        assert!(note.contains("small (21 bytes)"), "{note}");
    }

    #[test]
    fn reads_headers() {
        let d = delivery(Some(AMQPValue::ShortInt(7)), "{}");
        assert_eq!(header_str(&d, "saga-id"), Some("s-1"));
        assert_eq!(header_int(&d, "saga-id"), None);
        assert_eq!(header_int(&d, header::SCHEMA_VERSION), Some(7));
        assert_eq!(header_str(&d, "absent"), None);
    }
}
