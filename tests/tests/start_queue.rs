//! Starting sagas by message: a `StartSaga` on `saga.start`, with the same idempotency as the
//! HTTP API, an answer on `reply_to`, and dead letters for what cannot be started.

use std::time::Duration;

use saga_amqp::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use saga_amqp::lapin::types::FieldTable;
use saga_amqp::{HeaderValue, OutgoingMessage};
use saga_schemas::amqp::{START_QUEUE, dead_letter_queue, header, message_type};
use saga_schemas::{SCHEMA_VERSION, StartSaga};
use saga_system::amqp::dead_letter_reason;
use saga_system::checkout::*;
use saga_system::{Backend, CHECKOUT, Options, System, pretty};
use serde_json::Value;
use uuid::Uuid;

fn start_message(start: &StartSaga, reply_to: &str) -> OutgoingMessage {
    OutgoingMessage {
        exchange: String::new(),
        routing_key: START_QUEUE.into(),
        message_id: Uuid::new_v4(),
        correlation_id: None,
        message_type: message_type::START_SAGA.into(),
        reply_to: Some(reply_to.into()),
        headers: vec![(
            header::SCHEMA_VERSION.into(),
            HeaderValue::Int(SCHEMA_VERSION.into()),
        )],
        body: serde_json::to_string(start).unwrap(),
        mandatory: true,
        discard_after: None,
    }
}

async fn start_by_message(backend: Backend) {
    let system = System::start(Options::new(backend).label("start-queue")).await;
    let amqp = system.amqp().await;
    let channel = amqp.connection.create_channel().await.unwrap();
    let answers = channel
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let answers = answers.name().as_str().to_owned();
    let get_answer = || async {
        for _ in 0..200 {
            if let Some(message) = channel
                .basic_get(answers.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                return serde_json::from_slice::<Value>(&message.delivery.data).unwrap();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no answer to the start message on {answers}");
    };

    let input = order("ivan", 2_000, &[(&unique_sku("kettle"), 1)]);
    let start = StartSaga {
        saga: CHECKOUT.into(),
        input: input.as_object().unwrap().clone(),
        idempotency_key: Some(format!("by-message-{}", Uuid::new_v4())),
    };
    amqp.publish(&start_message(&start, &answers)).await;
    let first = get_answer().await;
    assert_eq!(first["created"], true, "{first}");
    // The same request again (a redelivery, or a client retrying): the same saga.
    amqp.publish(&start_message(&start, &answers)).await;
    let second = get_answer().await;
    assert_eq!(second["created"], false, "{second}");
    assert_eq!(first["saga_id"], second["saga_id"]);

    let id = first["saga_id"].as_str().unwrap();
    let saga = system.wait_settled(id, Duration::from_secs(30)).await;
    assert_eq!(status(&saga), "completed", "{}", pretty(&saga));
    assert_eq!(system.list_all("name=order-checkout").await.len(), 1);

    // A saga that does not exist, and a version the orchestrator does not speak: dead letters.
    let unknown = StartSaga {
        saga: "no-such-saga".into(),
        input: Default::default(),
        idempotency_key: None,
    };
    amqp.publish(&start_message(&unknown, &answers)).await;
    let mut future = start_message(&start, &answers);
    future.headers = vec![(header::SCHEMA_VERSION.into(), HeaderValue::Int(99))];
    amqp.publish(&future).await;
    let dlq = dead_letter_queue(START_QUEUE);
    let mut reasons = Vec::new();
    for _ in 0..2 {
        let dead = amqp
            .wait_get(&dlq, Duration::from_secs(15))
            .await
            .expect("a dead letter");
        reasons.push(dead_letter_reason(&dead).unwrap_or_default().to_owned());
    }
    assert!(
        reasons.iter().any(|r| r.contains("no-such-saga")),
        "{reasons:?}"
    );
    assert!(reasons.iter().any(|r| r.contains("99")), "{reasons:?}");
    assert_eq!(system.list_all("").await.len(), 1, "nothing else started");
}

saga_system::on_both_backends!(start_by_message);
