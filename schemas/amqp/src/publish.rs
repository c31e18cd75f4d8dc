//! Publishing with publisher confirms and the `mandatory` flag.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection, PublisherConfirm,
    message::BasicReturnMessage,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, ShortString},
};
use saga_schemas::amqp::{CONTENT_TYPE_JSON, HeaderValue, OutgoingMessage};

use crate::{AmqpError, frame, short};

/// Publishes on a channel of its own with publisher confirms enabled. Every publish is
/// `mandatory`, so an unroutable message comes back as an error instead of vanishing.
///
/// A message whose properties would not fit in one frame is refused with
/// [`AmqpError::Invalid`] before it is sent: the broker would close the whole connection.
///
/// Cheap to clone (clones share the channel) and usable from several tasks at once. After any
/// error other than [`AmqpError::Unroutable`], [`AmqpError::NotConfirmed`] and
/// [`AmqpError::Invalid`] the channel is probably closed ([`Publisher::is_open`]): end the
/// session and let [`crate::supervise`] open a new one.
#[derive(Clone, Debug)]
pub struct Publisher {
    channel: Channel,
    app_id: Option<ShortString>,
    /// The largest content header the connection carries, from its negotiated frame size.
    max_content_header: usize,
}

impl Publisher {
    /// Opens a new channel on `conn` and enables publisher confirms on it.
    pub async fn open(conn: &Connection) -> Result<Self, AmqpError> {
        let channel = conn
            .create_channel()
            .await
            .map_err(|e| AmqpError::amqp("opening the publisher channel", e))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| AmqpError::amqp("enabling publisher confirms", e))?;
        Ok(Publisher {
            channel,
            app_id: None,
            max_content_header: frame::max_content_header(conn.configuration().frame_max()),
        })
    }

    /// Sets the `app_id` property of every message published from now on (e.g. the service's
    /// name), shown in the management UI.
    pub fn with_app_id(mut self, app_id: &str) -> Result<Self, AmqpError> {
        self.app_id = Some(short(app_id, "app_id")?);
        Ok(self)
    }

    /// The channel it publishes on.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Whether its channel is still open; `false` after a channel or connection error.
    pub fn is_open(&self) -> bool {
        self.channel.status().connected()
    }

    /// The largest content header (properties and headers, in bytes on the wire) that fits in
    /// one frame of this connection.
    pub(crate) fn max_content_header(&self) -> usize {
        self.max_content_header
    }

    /// Whether `msg` could be published: its names fit AMQP short strings and its properties
    /// fit in one frame. The same check [`publish`](Self::publish) makes, without sending.
    pub fn check(&self, msg: &OutgoingMessage) -> Result<(), AmqpError> {
        let properties = properties(msg, self.app_id.as_ref())?;
        self.check_size(&properties, &|| describe(msg))
    }

    /// `what` describes the publish for an error message: only called on an error, so that a
    /// message that goes through formats nothing.
    fn check_size(&self, properties: &BasicProperties, what: What<'_>) -> Result<(), AmqpError> {
        let size = frame::content_header_size(properties);
        if size > self.max_content_header {
            return Err(AmqpError::Invalid(format!(
                "{}: its properties and headers take {size} bytes, more than one frame of \
                 this connection holds ({} bytes)",
                what(),
                self.max_content_header
            )));
        }
        Ok(())
    }

    /// Publishes one message and waits for the broker's confirm. With other publishes in
    /// flight on the channel, a return can come with this message's confirm though it is
    /// another's (see [`Publisher::publish_all`]): one that is not this message's is not held
    /// against it.
    pub async fn publish(&self, msg: &OutgoingMessage) -> Result<(), AmqpError> {
        let what = || describe(msg);
        let confirmation = self
            .send(msg)
            .await?
            .await
            .map_err(|e| AmqpError::amqp(what(), e))?;
        let others = |returned: &BasicReturnMessage| {
            returned_id(returned).is_some_and(|id| id != msg.message_id.to_string())
        };
        match confirmation {
            Confirmation::Ack(Some(returned)) if others(&returned) => Ok(()),
            Confirmation::Nack(Some(returned)) if others(&returned) => {
                verdict(Confirmation::Nack(None), &what)
            }
            other => verdict(other, &what),
        }
    }

    /// Pipelined: hands every message to the connection at once (in the slice's order), then
    /// awaits every confirm, so they are all in flight together: one broker round trip for the
    /// batch instead of one per message. One result per message, in the same order. A failure
    /// of one does not stop the others (though after a channel error the rest fail too).
    ///
    /// A message the broker returns (no queue bound for it) fails, the others of the batch do
    /// not. lapin hands a return to whichever confirm of the acknowledgement it completes
    /// first (a multiple ack completes its tags in hash-map order), not to the returned
    /// message's own, so the returns of the batch are matched to its messages by message id
    /// (messages of a batch that share an id share their fate).
    /// That holds while the batch is the only one in flight on the channel: a return is carried
    /// by a confirm of the acknowledgement that covers its message, which may belong to another
    /// batch out at the same time.
    pub async fn publish_all(&self, msgs: &[OutgoingMessage]) -> Vec<Result<(), AmqpError>> {
        let pending = futures_util::future::join_all(msgs.iter().map(|msg| self.send(msg))).await;
        let mut confirmations = Vec::with_capacity(msgs.len());
        for (msg, sent) in msgs.iter().zip(pending) {
            confirmations.push(match sent {
                Ok(confirm) => confirm.await.map_err(|e| AmqpError::amqp(describe(msg), e)),
                Err(e) => Err(e),
            });
        }
        // The returns of the batch, by message id, with the broker's reason.
        let returned: HashMap<String, String> = confirmations
            .iter()
            .filter_map(|c| match c {
                Ok(Confirmation::Ack(Some(m)) | Confirmation::Nack(Some(m))) => {
                    Some((returned_id(m)?.to_owned(), return_reason(m)))
                }
                _ => None,
            })
            .collect();
        msgs.iter()
            .zip(confirmations)
            .map(|(msg, confirmation)| {
                let what = || describe(msg);
                let confirmation = confirmation?;
                if let Some(reason) = returned.get(&msg.message_id.to_string()) {
                    return Err(AmqpError::Unroutable {
                        reason: format!("{}: {reason}", what()),
                    });
                }
                match confirmation {
                    // Carrying another message's return says nothing of this one.
                    Confirmation::Ack(_) => Ok(()),
                    Confirmation::Nack(_) => verdict(Confirmation::Nack(None), &what),
                    other => verdict(other, &what),
                }
            })
            .collect()
    }

    /// Publishes a body with properties of the caller's choosing (e.g. a copy of a received
    /// message), `mandatory`, and waits for the confirm.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        let what = format!("publishing to exchange {exchange:?} with routing key {routing_key:?}");
        let confirm = self
            .send_raw(exchange, routing_key, body, properties, true, &|| {
                what.clone()
            })
            .await?;
        confirmed(confirm, &|| what.clone()).await
    }

    async fn send(&self, msg: &OutgoingMessage) -> Result<PublisherConfirm, AmqpError> {
        let properties = properties(msg, self.app_id.as_ref())?;
        self.send_raw(
            &msg.exchange,
            &msg.routing_key,
            msg.body.as_bytes(),
            properties,
            msg.mandatory,
            &|| describe(msg),
        )
        .await
    }

    async fn send_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
        what: What<'_>,
    ) -> Result<PublisherConfirm, AmqpError> {
        self.check_size(&properties, what)?;
        self.channel
            .basic_publish(
                short(exchange, "exchange")?,
                short(routing_key, "routing key")?,
                BasicPublishOptions {
                    mandatory,
                    immediate: false,
                },
                body,
                properties,
            )
            .await
            .map_err(|e| AmqpError::amqp(what(), e))
    }
}

fn describe(msg: &OutgoingMessage) -> String {
    format!(
        "publishing {} {} to exchange {:?} with routing key {:?}",
        msg.message_type, msg.message_id, msg.exchange, msg.routing_key
    )
}

/// Says what was being published, for an error message (see [`Publisher::check_size`]).
type What<'a> = &'a (dyn Fn() -> String + Sync);

async fn confirmed(confirm: PublisherConfirm, what: What<'_>) -> Result<(), AmqpError> {
    verdict(confirm.await.map_err(|e| AmqpError::amqp(what(), e))?, what)
}

/// What the broker's answer to one publish means for it.
fn verdict(confirmation: Confirmation, what: What<'_>) -> Result<(), AmqpError> {
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(returned_error(&returned, what))
        }
        Confirmation::Nack(None) => Err(AmqpError::NotConfirmed {
            reason: format!("{}: nacked by the broker", what()),
        }),
        Confirmation::NotRequested => Err(AmqpError::NotConfirmed {
            reason: format!(
                "{}: publisher confirms are not enabled on the channel (a bug)",
                what()
            ),
        }),
    }
}

fn returned_error(returned: &BasicReturnMessage, what: What<'_>) -> AmqpError {
    AmqpError::Unroutable {
        reason: format!("{}: {}", what(), return_reason(returned)),
    }
}

/// The message id of a returned message, which tells whose return it is.
fn returned_id(returned: &BasicReturnMessage) -> Option<&str> {
    returned
        .properties
        .message_id()
        .as_ref()
        .map(|id| id.as_str())
}

fn return_reason(returned: &BasicReturnMessage) -> String {
    format!(
        "returned by the broker ({} {}): no queue is bound for it",
        returned.reply_code, returned.reply_text
    )
}

/// The AMQP properties of `msg`: `message_id`, `correlation_id` (if any), `type`,
/// `content_type` `application/json`, `delivery_mode` 2 (persistent), `timestamp` (now, in
/// seconds), `reply_to` (if any), `app_id` (if given), `expiration` (if `discard_after` is set:
/// see [`expiration`]), and the headers ([`HeaderValue::Int`] as a signed 64-bit `l`,
/// [`HeaderValue::Str`] as a long string `S`).
pub fn properties(
    msg: &OutgoingMessage,
    app_id: Option<&ShortString>,
) -> Result<BasicProperties, AmqpError> {
    properties_at(msg, app_id, SystemTime::now())
}

/// The AMQP `expiration` of `msg` if it has a `discard_after`: the milliseconds left at `now`,
/// as a decimal string, at least `1` (`0` would mean "deliver at once or drop"; whether a
/// message already past its time is published at all is the caller's choice).
fn expiration(msg: &OutgoingMessage, now: SystemTime) -> Option<String> {
    let discard_after = msg.discard_after?;
    let now_ms = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let left = discard_after.timestamp_millis().saturating_sub(now_ms);
    Some(left.max(1).to_string())
}

fn properties_at(
    msg: &OutgoingMessage,
    app_id: Option<&ShortString>,
    now: SystemTime,
) -> Result<BasicProperties, AmqpError> {
    let mut headers = FieldTable::default();
    for (key, value) in &msg.headers {
        let value = match value {
            HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
            HeaderValue::Str(s) => AMQPValue::LongString(s.as_str().into()),
        };
        headers.insert(short(key, "header key")?, value);
    }
    let seconds = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut props = BasicProperties::default()
        .with_message_id(msg.message_id.to_string().into())
        .with_type(short(&msg.message_type, "message type")?)
        .with_content_type(CONTENT_TYPE_JSON.into())
        .with_delivery_mode(2)
        .with_timestamp(seconds)
        .with_headers(headers);
    if let Some(correlation_id) = msg.correlation_id {
        props = props.with_correlation_id(correlation_id.to_string().into());
    }
    if let Some(reply_to) = &msg.reply_to {
        props = props.with_reply_to(short(reply_to, "reply_to")?);
    }
    if let Some(app_id) = app_id {
        props = props.with_app_id(app_id.clone());
    }
    if let Some(expiration) = expiration(msg, now) {
        props = props.with_expiration(expiration.into());
    }
    Ok(props)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use saga_schemas::amqp::message_type;

    use super::*;

    /// A command whose `discard_after` (RFC 3339, if any) is read from the outbox JSON.
    fn expiration_of(discard_after: Option<&str>) -> Option<String> {
        let msg: OutgoingMessage = serde_json::from_value(serde_json::json!({
            "exchange": "saga.commands",
            "routing_key": "payments",
            "message_id": "6b1f2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d",
            "correlation_id": null,
            "message_type": message_type::STEP_COMMAND,
            "reply_to": null,
            "headers": [],
            "body": "{}",
            "discard_after": discard_after,
        }))
        .unwrap();
        // 2026-01-01T00:00:00Z
        let now = UNIX_EPOCH + Duration::from_millis(1_767_225_600_000);
        let props = properties_at(&msg, None, now).unwrap();
        props.expiration().as_ref().map(|e| e.as_str().to_owned())
    }

    #[test]
    fn discard_after_becomes_the_milliseconds_left() {
        let at = |t: &str| expiration_of(Some(t));
        assert_eq!(at("2026-01-01T00:00:30Z").as_deref(), Some("30000"));
        assert_eq!(at("2026-01-01T00:02:00.250Z").as_deref(), Some("120250"));
        assert_eq!(at("2026-01-01T00:00:00.001Z").as_deref(), Some("1"));
        // Already past (or due now): the shortest expiration the broker keeps, never 0 or less.
        assert_eq!(at("2026-01-01T00:00:00Z").as_deref(), Some("1"));
        assert_eq!(at("2025-12-31T23:59:55Z").as_deref(), Some("1"));
        assert_eq!(expiration_of(None), None, "no discard_after, no expiration");
    }
}
