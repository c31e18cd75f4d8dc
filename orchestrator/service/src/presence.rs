//! Orchestrators on one vhost announce themselves, so that one running against ANOTHER
//! database is noticed: it would consume replies and starts meant for this one (and this one
//! its), and each would dead-letter the other's replies as unknown. Both say so in their log
//! and fail `/readyz` until it is gone.
//!
//! Every orchestrator publishes a heartbeat (its database's id and its connection name) to the
//! fanout exchange `saga.orchestrators` every few seconds, and reads everyone's through a
//! queue of its own that lives as long as its connection.

use std::time::Duration;

use futures_util::StreamExt;
use saga_amqp::lapin::options::{
    BasicConsumeOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use saga_amqp::lapin::types::FieldTable;
use saga_amqp::lapin::{Connection, ExchangeKind};
use saga_amqp::{AmqpError, Publisher};
use saga_schemas::amqp::OutgoingMessage;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use uuid::Uuid;

use crate::service::Health;

/// The fanout exchange orchestrators announce themselves on.
pub const EXCHANGE: &str = "saga.orchestrators";
/// The message type of a heartbeat.
pub const HEARTBEAT_TYPE: &str = "saga.orchestrator_heartbeat";
/// How often an orchestrator announces itself.
pub const INTERVAL: Duration = Duration::from_secs(5);
/// How long a foreign orchestrator counts as present after its last heartbeat.
pub const FORGET_AFTER: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub database_id: Uuid,
    /// The sender's connection name, as the management UI shows it.
    pub orchestrator: String,
}

/// Announces this orchestrator and watches for others until `shutdown`.
pub async fn run(
    conn: &Connection,
    me: Heartbeat,
    health: &Health,
    shutdown: CancellationToken,
) -> Result<(), AmqpError> {
    let channel = conn.create_channel().await?;
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            EXCHANGE.into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
    let own_queue = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..QueueDeclareOptions::default()
    };
    let queue = channel
        .queue_declare("".into(), own_queue, FieldTable::default())
        .await?;
    channel
        .queue_bind(
            queue.name().clone(),
            EXCHANGE.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    // Heartbeats are news, not work: nothing to commit, so no ack to wait for.
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..BasicConsumeOptions::default()
    };
    let mut heartbeats = channel
        .basic_consume(
            queue.name().clone(),
            "orchestrator-presence".into(),
            no_ack,
            FieldTable::default(),
        )
        .await?;
    let publisher = Publisher::open(conn).await?;
    let mut tick = tokio::time::interval(INTERVAL);
    let result = loop {
        tokio::select! {
            _ = tick.tick() => {
                if let Err(error) = publisher.publish(&heartbeat_message(&me)).await {
                    break Err(error);
                }
            }
            delivery = heartbeats.next() => {
                let Some(delivery) = delivery else {
                    break Err(AmqpError::ConnectionLost(
                        "the broker cancelled the presence consumer".into(),
                    ));
                };
                let delivery = delivery?;
                match serde_json::from_slice::<Heartbeat>(&delivery.data) {
                    Ok(other) if other.database_id != me.database_id => {
                        if health.saw_foreign_orchestrator(&other.orchestrator) {
                            warn!(
                                orchestrator = %other.orchestrator,
                                database_id = %other.database_id,
                                own_database_id = %me.database_id,
                                "another orchestrator with a different database consumes this \
                                 vhost: it takes replies and starts meant for this one, and \
                                 replies for its sagas are dead-lettered here; give each database \
                                 a vhost of its own"
                            );
                        }
                    }
                    Ok(_) => {}
                    Err(error) => debug!(%error, "ignoring an unreadable heartbeat"),
                }
            }
            _ = shutdown.cancelled() => break Ok(()),
        }
    };
    publisher.channel().close(200, "done".into()).await.ok();
    channel.close(200, "done".into()).await.ok();
    result
}

fn heartbeat_message(me: &Heartbeat) -> OutgoingMessage {
    OutgoingMessage {
        exchange: EXCHANGE.into(),
        routing_key: String::new(),
        message_id: Uuid::new_v4(),
        correlation_id: None,
        message_type: HEARTBEAT_TYPE.into(),
        reply_to: None,
        headers: Vec::new(),
        body: serde_json::to_string(me).expect("a heartbeat serialises"),
        mandatory: false,
        discard_after: Some(chrono::Utc::now() + INTERVAL * 2),
    }
}
