//! Publishing with confirms, receiving, decoding and dead-lettering against a real broker.

mod common;

use std::time::Duration;

use common::TestVhost;
use futures_util::StreamExt;
use saga_amqp::{
    AmqpError, Publisher,
    lapin::{
        BasicProperties, Connection, Consumer,
        message::Delivery,
        options::{BasicPublishOptions, QueueDeclareOptions},
        types::{AMQPValue, FieldTable},
    },
};
use saga_schemas::{
    Direction, StepCommand,
    amqp::{OutgoingMessage, REPLIES_QUEUE, header, message_type},
};
use serde_json::json;
use uuid::Uuid;

async fn setup(vhost: &TestVhost) -> (Connection, Publisher) {
    let conn = saga_amqp::connect(&vhost.url, "saga-amqp messaging test")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    saga_amqp::declare_orchestrator_topology(&ch, &["payments"], saga_amqp::QueueType::Quorum)
        .await
        .unwrap();
    let publisher = Publisher::open(&conn)
        .await
        .unwrap()
        .with_app_id("saga-amqp-tests")
        .unwrap();
    (conn, publisher)
}

fn command(saga_id: Uuid, attempt: u32) -> StepCommand {
    let data = json!({"order_id": "A-1", "amount": 4999});
    StepCommand {
        message_id: Uuid::new_v4(),
        saga_id,
        saga_name: "order".into(),
        step: "charge_payment".into(),
        direction: Direction::Execute,
        action: "charge".into(),
        attempt,
        data: data.as_object().unwrap().clone(),
        action_output: None,
        expires_at: None,
    }
}

async fn next(consumer: &mut Consumer) -> Delivery {
    tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("no delivery within 10 s")
        .expect("the consumer ended")
        .expect("the consumer failed")
}

/// The number of ready messages in `queue`, by a passive declare on a throwaway channel.
async fn ready(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = ch
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .unwrap();
    let _ = ch.close(200, "done".into()).await;
    q.message_count()
}

#[tokio::test]
async fn publish_all_confirms_and_the_consumer_gets_properties_and_headers() {
    let vhost = TestVhost::new("publish");
    let (conn, publisher) = setup(&vhost).await;
    let saga_id = Uuid::new_v4();
    let commands: Vec<StepCommand> = (1..=50).map(|attempt| command(saga_id, attempt)).collect();
    let messages: Vec<OutgoingMessage> = commands
        .iter()
        .map(|c| OutgoingMessage::command(c, "payments", REPLIES_QUEUE, None))
        .collect();
    let results = publisher.publish_all(&messages).await;
    assert_eq!(results.len(), 50);
    for r in &results {
        r.as_ref().unwrap();
    }
    // And one more on its own.
    let single = command(saga_id, 51);
    publisher
        .publish(&OutgoingMessage::command(
            &single,
            "payments",
            REPLIES_QUEUE,
            None,
        ))
        .await
        .unwrap();

    let (_ch, mut consumer) =
        saga_amqp::open_consumer(&conn, "saga.commands.payments", "test-consumer", 16)
            .await
            .unwrap();
    for expected in commands.iter().chain([&single]) {
        let d = next(&mut consumer).await;
        let p = &d.properties;
        let s = |v: &Option<saga_amqp::lapin::types::ShortString>| {
            v.as_ref().map(|s| s.as_str().to_string())
        };
        assert_eq!(s(p.message_id()), Some(expected.message_id.to_string()));
        assert_eq!(s(p.correlation_id()), Some(saga_id.to_string()));
        assert_eq!(s(p.kind()).as_deref(), Some(message_type::STEP_COMMAND));
        assert_eq!(s(p.content_type()).as_deref(), Some("application/json"));
        assert_eq!(s(p.reply_to()).as_deref(), Some(REPLIES_QUEUE));
        assert_eq!(s(p.app_id()).as_deref(), Some("saga-amqp-tests"));
        assert_eq!(*p.delivery_mode(), Some(2));
        assert!(p.timestamp().is_some_and(|t| t > 1_700_000_000));
        assert_eq!(saga_amqp::header_int(&d, header::SCHEMA_VERSION), Some(1));
        assert_eq!(
            saga_amqp::header_str(&d, header::SAGA_ID),
            Some(saga_id.to_string().as_str())
        );
        assert_eq!(saga_amqp::header_str(&d, header::SAGA_NAME), Some("order"));
        assert_eq!(
            saga_amqp::header_str(&d, header::STEP),
            Some("charge_payment")
        );
        assert_eq!(saga_amqp::header_str(&d, header::ACTION), Some("charge"));
        assert_eq!(
            saga_amqp::header_str(&d, header::DIRECTION),
            Some("execute")
        );
        assert_eq!(
            saga_amqp::header_int(&d, header::ATTEMPT),
            Some(i64::from(expected.attempt))
        );
        let decoded: StepCommand = saga_amqp::decode(&d).unwrap();
        assert_eq!(&decoded, expected);
        saga_amqp::ack(&d).await.unwrap();
        // A second ack is refused by lapin, and reported.
        let again = saga_amqp::ack(&d).await.unwrap_err();
        assert!(
            matches!(again, AmqpError::NotAcknowledged { .. }),
            "{again}"
        );
    }
    conn.close(200, "done".into()).await.unwrap();
}

/// A command's `discard_after` goes out as the AMQP `expiration` (milliseconds left at publish
/// time); the broker drops a command nobody took by then, without dead-lettering it.
#[tokio::test]
async fn discard_after_is_published_as_the_expiration() {
    let vhost = TestVhost::new("expiration");
    let (conn, publisher) = setup(&vhost).await;
    let saga_id = Uuid::new_v4();
    let soon = chrono::Utc::now() + chrono::Duration::milliseconds(300);
    let later = chrono::Utc::now() + chrono::Duration::seconds(60);
    let superseded =
        OutgoingMessage::command(&command(saga_id, 1), "payments", REPLIES_QUEUE, Some(soon));
    let current = command(saga_id, 2);
    let kept = OutgoingMessage::command(&current, "payments", REPLIES_QUEUE, Some(later));
    for r in publisher.publish_all(&[superseded, kept]).await {
        r.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;

    let (_ch, mut consumer) = saga_amqp::open_consumer(&conn, "saga.commands.payments", "", 4)
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(
        d.properties.message_id().as_ref().map(|s| s.to_string()),
        Some(current.message_id.to_string()),
        "attempt 1 expired in the queue; attempt 2 is delivered"
    );
    let expiration: u64 = d
        .properties
        .expiration()
        .as_ref()
        .expect("an expiration property")
        .as_str()
        .parse()
        .expect("the expiration is a decimal number of milliseconds");
    assert!(
        (50_000..=60_000).contains(&expiration),
        "about 60 s were left at publish time: {expiration}"
    );
    saga_amqp::ack(&d).await.unwrap();
    let more = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(more.is_err(), "nothing else in the queue");
    assert_eq!(
        ready(&conn, "saga.commands.payments.dlq").await,
        0,
        "an expired command is dropped, not dead-lettered"
    );

    // Without discard_after, no expiration.
    publisher
        .publish(&OutgoingMessage::command(
            &command(saga_id, 3),
            "payments",
            REPLIES_QUEUE,
            None,
        ))
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert_eq!(d.properties.expiration(), &None);
    saga_amqp::ack(&d).await.unwrap();
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn an_unroutable_publish_is_an_error() {
    let vhost = TestVhost::new("unroutable");
    let (conn, publisher) = setup(&vhost).await;
    // Each message its own id, as in real use: a batch's returns are matched to its messages
    // by id.
    let saga_id = Uuid::new_v4();
    let routable = |attempt| {
        OutgoingMessage::command(&command(saga_id, attempt), "payments", REPLIES_QUEUE, None)
    };
    let unknown_participant = |attempt| {
        OutgoingMessage::command(&command(saga_id, attempt), "nobody", REPLIES_QUEUE, None)
    };
    let mut no_queue = routable(2);
    no_queue.exchange = String::new();
    no_queue.routing_key = "no-such-queue".into();

    let err = publisher
        .publish(&unknown_participant(1))
        .await
        .unwrap_err();
    assert!(matches!(err, AmqpError::Unroutable { .. }), "{err}");
    assert!(err.to_string().contains("NO_ROUTE"), "{err}");

    let results = publisher
        .publish_all(&[routable(1), no_queue, routable(3), unknown_participant(4)])
        .await;
    assert!(results[0].is_ok(), "{:?}", results[0]);
    assert!(
        matches!(results[1], Err(AmqpError::Unroutable { .. })),
        "{:?}",
        results[1]
    );
    assert!(results[2].is_ok(), "{:?}", results[2]);
    assert!(
        matches!(results[3], Err(AmqpError::Unroutable { .. })),
        "{:?}",
        results[3]
    );
    assert!(publisher.is_open(), "a returned message closed the channel");
    assert_eq!(ready(&conn, "saga.commands.payments").await, 2);
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn in_a_batch_only_the_messages_returned_are_errors() {
    let vhost = TestVhost::new("returns");
    let (conn, publisher) = setup(&vhost).await;
    // A classic queue confirms at once, so the broker acknowledges runs of messages, returned
    // ones among them, together. Every third message has no queue: its return must land on it.
    let queue = "returns-test";
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut routed = 0;
    for _ in 0..20 {
        let messages: Vec<OutgoingMessage> = (0..30)
            .map(|i| {
                let cmd = command(Uuid::new_v4(), 1);
                let mut message = OutgoingMessage::command(&cmd, "payments", REPLIES_QUEUE, None);
                message.exchange = String::new();
                message.routing_key = if i % 3 == 0 { "no-such-queue" } else { queue }.into();
                message
            })
            .collect();
        let results = publisher.publish_all(&messages).await;
        for (i, (message, result)) in messages.iter().zip(&results).enumerate() {
            if i % 3 == 0 {
                assert!(
                    matches!(result, Err(AmqpError::Unroutable { .. })),
                    "{} was not routed: {result:?}",
                    message.message_id
                );
            } else {
                assert!(
                    result.is_ok(),
                    "{} was routed: {result:?}",
                    message.message_id
                );
                routed += 1;
            }
        }
    }
    assert_eq!(ready(&conn, queue).await, routed);
    conn.close(200, "done".into()).await.unwrap();
}

/// Publishes `body` to the replies queue with `x-schema-version` = `version` (any AMQP type).
async fn publish_raw(publisher: &Publisher, version: Option<AMQPValue>, body: &str) -> String {
    let mut headers = FieldTable::default();
    if let Some(v) = version {
        headers.insert(header::SCHEMA_VERSION.into(), v);
    }
    headers.insert("custom".into(), AMQPValue::LongString("kept".into()));
    let id = Uuid::new_v4().to_string();
    // An expiration and a user id are not copied to the dead letter (the broker would refuse
    // another user's id; a dead letter must not expire).
    let props = BasicProperties::default()
        .with_message_id(id.as_str().into())
        .with_expiration("60000".into())
        .with_user_id("guest".into())
        .with_headers(headers);
    publisher
        .publish_raw("", REPLIES_QUEUE, body.as_bytes(), props)
        .await
        .unwrap();
    id
}

#[tokio::test]
async fn undecodable_messages_are_dead_lettered_with_a_reason() {
    let vhost = TestVhost::new("decode");
    let (conn, publisher) = setup(&vhost).await;
    let good = r#"{"a": 1, "unknown": "ignored"}"#;
    // pika sends a Python int as a signed 32-bit `I`; accept any integer width.
    let cases = [
        (None, good, Some("no x-schema-version header")),
        (
            Some(AMQPValue::LongInt(2)),
            good,
            Some("unsupported x-schema-version 2"),
        ),
        (
            Some(AMQPValue::LongString("1".into())),
            good,
            Some("x-schema-version header is not an integer"),
        ),
        (
            Some(AMQPValue::LongInt(1)),
            "<xml/>",
            Some("the body is not JSON"),
        ),
        (
            Some(AMQPValue::LongInt(1)),
            r#"{"b": 1}"#,
            Some("missing field `a`"),
        ),
        (Some(AMQPValue::LongInt(1)), good, None),
        (Some(AMQPValue::ShortShortUInt(1)), good, None),
        (Some(AMQPValue::LongLongInt(1)), good, None),
    ];
    let mut ids = Vec::new();
    for (version, body, _) in &cases {
        ids.push(publish_raw(&publisher, version.clone(), body).await);
    }

    #[derive(serde::Deserialize, Debug, PartialEq)]
    struct Msg {
        a: i64,
    }
    let (consume_ch, mut consumer) = saga_amqp::open_consumer(&conn, REPLIES_QUEUE, "", 4)
        .await
        .unwrap();
    for (_, _, reason) in &cases {
        let d = next(&mut consumer).await;
        let received = saga_amqp::decode_or_dead_letter::<Msg>(&publisher, d, REPLIES_QUEUE)
            .await
            .unwrap();
        match (reason, received) {
            (None, Some(r)) => {
                assert_eq!(r.message, Msg { a: 1 });
                r.ack().await.unwrap();
            }
            (Some(_), None) => {}
            (expected, got) => panic!("expected {expected:?}, got {got:?}"),
        }
    }
    // Everything was acked: nothing comes back when the consumer's channel closes.
    consume_ch.close(200, "done".into()).await.unwrap();
    assert_eq!(ready(&conn, REPLIES_QUEUE).await, 0);

    let (_dlq_ch, mut dlq) = saga_amqp::open_consumer(&conn, "saga.replies.dlq", "", 16)
        .await
        .unwrap();
    for ((version, body, reason), id) in cases.iter().zip(&ids) {
        let Some(reason) = reason else { continue };
        let d = next(&mut dlq).await;
        assert_eq!(d.properties.message_id().as_ref().unwrap().as_str(), id);
        assert_eq!(d.data, body.as_bytes());
        let got = saga_amqp::header_str(&d, header::DEAD_LETTER_REASON).unwrap();
        assert!(got.starts_with("cannot decode the message: "), "{got}");
        assert!(got.contains(reason), "{got:?} should contain {reason:?}");
        assert_eq!(
            saga_amqp::header_str(&d, header::DEAD_LETTER_QUEUE),
            Some(REPLIES_QUEUE)
        );
        assert_eq!(saga_amqp::header_str(&d, "custom"), Some("kept"));
        assert_eq!(d.properties.expiration(), &None);
        assert_eq!(d.properties.user_id(), &None);
        assert_eq!(d.properties.delivery_mode(), &Some(2));
        let headers = d.properties.headers().as_ref().unwrap().inner();
        assert_eq!(headers.get(header::SCHEMA_VERSION), version.as_ref());
        saga_amqp::ack(&d).await.unwrap();
    }
    assert_eq!(ready(&conn, "saga.replies.dlq").await, 0);
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn dead_letter_moves_the_message_and_acks_it() {
    let vhost = TestVhost::new("deadletter");
    let (conn, publisher) = setup(&vhost).await;
    let cmd = command(Uuid::new_v4(), 3);
    publisher
        .publish(&OutgoingMessage::command(
            &cmd,
            "payments",
            REPLIES_QUEUE,
            None,
        ))
        .await
        .unwrap();
    let (consume_ch, mut consumer) =
        saga_amqp::open_consumer(&conn, "saga.commands.payments", "", 4)
            .await
            .unwrap();
    let d = next(&mut consumer).await;
    saga_amqp::dead_letter(
        &publisher,
        &d,
        "saga.commands.payments",
        "unknown action charge",
    )
    .await
    .unwrap();
    consume_ch.close(200, "done".into()).await.unwrap();
    assert_eq!(ready(&conn, "saga.commands.payments").await, 0);

    let (_dlq_ch, mut dlq) = saga_amqp::open_consumer(&conn, "saga.commands.payments.dlq", "", 4)
        .await
        .unwrap();
    let dead = next(&mut dlq).await;
    assert_eq!(dead.properties.message_id(), d.properties.message_id());
    assert_eq!(
        dead.properties.correlation_id(),
        d.properties.correlation_id()
    );
    assert_eq!(dead.properties.kind(), d.properties.kind());
    assert_eq!(dead.properties.reply_to(), d.properties.reply_to());
    assert_eq!(dead.properties.delivery_mode(), &Some(2));
    assert_eq!(dead.data, d.data);
    assert_eq!(
        saga_amqp::header_str(&dead, header::DEAD_LETTER_REASON),
        Some("unknown action charge")
    );
    assert_eq!(
        saga_amqp::header_str(&dead, header::DEAD_LETTER_QUEUE),
        Some("saga.commands.payments")
    );
    assert_eq!(saga_amqp::header_int(&dead, header::ATTEMPT), Some(3));
    assert_eq!(saga_amqp::decode::<StepCommand>(&dead).unwrap(), cmd);
    saga_amqp::ack(&dead).await.unwrap();
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn a_failed_dead_letter_keeps_the_message() {
    let vhost = TestVhost::new("keep");
    let (conn, publisher) = setup(&vhost).await;
    // A queue without a dead-letter queue: the copy cannot be routed.
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "orphan".into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "orphan".into(),
        BasicPublishOptions::default(),
        b"payload",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let (_consume_ch, mut consumer) = saga_amqp::open_consumer(&conn, "orphan", "", 1)
        .await
        .unwrap();
    let d = next(&mut consumer).await;
    assert!(!d.redelivered);
    let err = saga_amqp::dead_letter(&publisher, &d, "orphan", "broken")
        .await
        .unwrap_err();
    assert!(matches!(err, AmqpError::Unroutable { .. }), "{err}");
    // Requeued, not lost.
    let again = next(&mut consumer).await;
    assert!(again.redelivered);
    assert_eq!(again.data, b"payload");
    saga_amqp::ack(&again).await.unwrap();
    conn.close(200, "done".into()).await.unwrap();
}
