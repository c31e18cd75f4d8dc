//! What a hostile message must not do to a connection: a dead-letter reason that echoes a huge
//! value, original headers that leave no room for the dead letter's own, a publish whose headers
//! exceed the frame size. Each would make the broker close the connection (`FRAME_ERROR`).

mod common;

use std::time::Duration;

use common::TestVhost;
use futures_util::StreamExt;
use saga_amqp::{
    AmqpError, Publisher,
    lapin::{
        BasicProperties, Connection, Consumer,
        message::Delivery,
        types::{AMQPValue, FieldTable},
    },
};
use saga_schemas::amqp::{HeaderValue, OutgoingMessage, REPLIES_QUEUE, header};
use saga_schemas::limits::MAX_REASON_CHARS;
use uuid::Uuid;

async fn setup(vhost: &TestVhost) -> (Connection, Publisher) {
    let conn = saga_amqp::connect(&vhost.url, "saga-amqp hostile test")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    saga_amqp::declare_orchestrator_topology(&ch, &["payments"], saga_amqp::QueueType::Quorum)
        .await
        .unwrap();
    ch.close(200, "declared".into()).await.unwrap();
    let publisher = Publisher::open(&conn).await.unwrap();
    (conn, publisher)
}

async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("no delivery within 10 s")
        .expect("the consumer ended")
        .expect("the consumer failed")
}

/// Publishes `body` to the replies queue with `headers`, and takes it back as a delivery.
async fn received(
    conn: &Connection,
    publisher: &Publisher,
    body: &[u8],
    headers: FieldTable,
) -> (Delivery, Consumer) {
    let props = BasicProperties::default()
        .with_message_id(Uuid::new_v4().to_string().into())
        .with_headers(headers);
    publisher
        .publish_raw("", REPLIES_QUEUE, body, props)
        .await
        .unwrap();
    let (_ch, mut consumer) = saga_amqp::open_consumer(conn, REPLIES_QUEUE, "", 1)
        .await
        .unwrap();
    (next(&mut consumer).await, consumer)
}

async fn dead_letter_of(conn: &Connection) -> Delivery {
    let (_ch, mut dlq) = saga_amqp::open_consumer(conn, "saga.replies.dlq", "", 1)
        .await
        .unwrap();
    let dead = next(&mut dlq).await;
    saga_amqp::ack(&dead).await.unwrap();
    dead
}

#[tokio::test]
async fn a_reason_is_cut_to_the_limit() {
    let vhost = TestVhost::new("long-reason");
    let (conn, publisher) = setup(&vhost).await;
    let (d, _consumer) = received(&conn, &publisher, b"body", FieldTable::default()).await;
    let reason = format!("refused: {}", "v".repeat(200_000));
    saga_amqp::dead_letter(&publisher, &d, REPLIES_QUEUE, &reason)
        .await
        .unwrap();
    let dead = dead_letter_of(&conn).await;
    let got = saga_amqp::header_str(&dead, header::DEAD_LETTER_REASON).unwrap();
    assert!(got.starts_with("refused: vvv"), "{got}");
    assert!(
        got.chars().count() <= MAX_REASON_CHARS + 64,
        "{}",
        got.len()
    );
    assert_eq!(dead.data, b"body");
    assert!(publisher.is_open());
    assert!(conn.status().connected());
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn headers_that_leave_no_room_are_left_out_of_the_dead_letter() {
    let vhost = TestVhost::new("large-headers");
    let (conn, publisher) = setup(&vhost).await;
    let mut headers = FieldTable::default();
    headers.insert("small".into(), AMQPValue::LongString("kept".into()));
    headers.insert(header::SCHEMA_VERSION.into(), AMQPValue::LongLongInt(1));
    // With the other properties, the frame (131,064 bytes of payload) is nearly full.
    headers.insert(
        "x-large".into(),
        AMQPValue::LongString("L".repeat(130_800).into()),
    );
    let (d, _consumer) = received(&conn, &publisher, b"the body", headers).await;
    saga_amqp::dead_letter(&publisher, &d, REPLIES_QUEUE, &"why ".repeat(200))
        .await
        .unwrap();
    let dead = dead_letter_of(&conn).await;
    assert_eq!(dead.data, b"the body", "the body is never lost");
    assert_eq!(saga_amqp::header_str(&dead, "small"), Some("kept"));
    assert_eq!(
        saga_amqp::header_int(&dead, header::SCHEMA_VERSION),
        Some(1)
    );
    assert_eq!(saga_amqp::header_str(&dead, "x-large"), None);
    let dropped = saga_amqp::header_str(&dead, header::DEAD_LETTER_DROPPED_HEADERS).unwrap();
    assert!(dropped.contains("x-large"), "{dropped}");
    assert!(
        saga_amqp::header_str(&dead, header::DEAD_LETTER_REASON)
            .unwrap()
            .starts_with("why why")
    );
    assert!(conn.status().connected());
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn a_publish_whose_headers_exceed_a_frame_is_refused_before_the_broker_sees_it() {
    let vhost = TestVhost::new("huge-header");
    let (conn, publisher) = setup(&vhost).await;
    let message = OutgoingMessage {
        exchange: String::new(),
        routing_key: REPLIES_QUEUE.into(),
        message_id: Uuid::new_v4(),
        correlation_id: None,
        message_type: "saga.step_reply".into(),
        reply_to: None,
        headers: vec![("saga-step".into(), HeaderValue::Str("s".repeat(200_000)))],
        body: "{}".into(),
        mandatory: true,
        discard_after: None,
    };
    let error = publisher.publish(&message).await.unwrap_err();
    assert!(matches!(error, AmqpError::Invalid(_)), "{error}");
    assert!(error.to_string().contains("frame"), "{error}");
    assert!(publisher.is_open(), "the channel stays open");
    assert!(conn.status().connected(), "the connection stays open");
    conn.close(200, "done".into()).await.unwrap();
}
