//! A test's own connection to a system's vhost: publish contract messages or raw bytes, take
//! messages from a queue (a dead-letter queue) with `basic_get`.

use std::time::{Duration, Instant};

use anyhow::Context;
use saga_amqp::lapin::message::Delivery;
use saga_amqp::lapin::options::BasicGetOptions;
use saga_amqp::lapin::types::{AMQPValue, FieldTable};
use saga_amqp::lapin::{BasicProperties, Channel, Connection};
use saga_amqp::{HeaderValue, OutgoingMessage, Publisher};
use saga_schemas::amqp::{CONTENT_TYPE_JSON, header};

pub struct Amqp {
    pub connection: Connection,
    pub publisher: Publisher,
    channel: Channel,
}

impl Amqp {
    pub async fn connect(url: &str, name: &str) -> anyhow::Result<Amqp> {
        let connection = saga_amqp::connect(url, name).await?;
        let publisher = Publisher::open(&connection).await?;
        let channel = connection
            .create_channel()
            .await
            .context("opening a channel")?;
        Ok(Amqp {
            connection,
            publisher,
            channel,
        })
    }

    /// Publishes a contract message (mandatory, confirmed); panics when it is not confirmed.
    pub async fn publish(&self, message: &OutgoingMessage) {
        self.publisher
            .publish(message)
            .await
            .unwrap_or_else(|e| panic!("publishing {message:?}: {e}"));
    }

    /// Publishes `body` as it is, with a fresh message id, `application/json` and `headers`
    /// (mandatory, confirmed). Use exchange `""` and the queue's name to reach a queue directly.
    pub async fn publish_raw(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        headers: &[(&str, HeaderValue)],
        reply_to: Option<&str>,
    ) {
        let mut table = FieldTable::default();
        for (key, value) in headers {
            let value = match value {
                HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
                HeaderValue::Str(s) => AMQPValue::LongString(s.as_str().into()),
            };
            table.insert((*key).into(), value);
        }
        let mut properties = BasicProperties::default()
            .with_message_id(uuid::Uuid::new_v4().to_string().into())
            .with_content_type(CONTENT_TYPE_JSON.into())
            .with_delivery_mode(2)
            .with_headers(table);
        if let Some(reply_to) = reply_to {
            properties = properties.with_reply_to(reply_to.into());
        }
        self.publisher
            .publish_raw(exchange, routing_key, body, properties)
            .await
            .unwrap_or_else(|e| {
                panic!("publishing raw bytes to {exchange:?}/{routing_key:?}: {e}")
            });
    }

    /// Takes one message from `queue` (auto-ack), if there is one.
    pub async fn get(&self, queue: &str) -> Option<Delivery> {
        self.channel
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("basic_get on {queue}: {e}"))
            .map(|message| message.delivery)
    }

    /// Waits up to `timeout` for a message on `queue`.
    pub async fn wait_get(&self, queue: &str, timeout: Duration) -> Option<Delivery> {
        let started = Instant::now();
        loop {
            if let Some(delivery) = self.get(queue).await {
                return Some(delivery);
            }
            if started.elapsed() > timeout {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn close(self) {
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// The `x-dead-letter-reason` header of a dead-lettered message.
pub fn dead_letter_reason(delivery: &Delivery) -> Option<&str> {
    saga_amqp::header_str(delivery, header::DEAD_LETTER_REASON)
}
