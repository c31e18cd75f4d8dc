//! Starting sagas by message: a `StartSaga` on `saga.start`, with the same idempotency as the
//! HTTP API, an answer on `reply_to` (`saga.started`, or `saga.start_rejected` with the reason),
//! and dead letters for what cannot be started.

use std::time::Duration;

use saga_amqp::lapin::message::BasicGetMessage;
use saga_amqp::lapin::options::{BasicGetOptions, QueueDeclareOptions};
use saga_amqp::lapin::types::FieldTable;
use saga_amqp::{HeaderValue, OutgoingMessage};
use saga_schemas::amqp::{START_QUEUE, dead_letter_queue, header, message_type};
use saga_schemas::{RejectionReason, SCHEMA_VERSION, SagaStartedReply, StartRejected, StartSaga};
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
    let get_message = || async {
        for _ in 0..200 {
            if let Some(message) = channel
                .basic_get(answers.as_str().into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                return message;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("no answer to the start message on {answers}");
    };
    let get_answer =
        || async { serde_json::from_slice::<Value>(&get_message().await.delivery.data).unwrap() };

    let input = order("ivan", 2_000, &[(&unique_sku("kettle"), 1)]);
    let start = StartSaga {
        saga: CHECKOUT.into(),
        input: input.as_object().unwrap().clone(),
        idempotency_key: Some(format!("by-message-{}", Uuid::new_v4())),
    };
    amqp.publish(&start_message(&start, &answers)).await;
    let started = get_message().await;
    assert_answer(&started, message_type::SAGA_STARTED);
    let typed: SagaStartedReply = saga_amqp::decode(&started.delivery).unwrap();
    assert!(typed.created);
    assert_eq!(
        correlation_id(&started).as_deref(),
        Some(typed.saga_id.to_string().as_str()),
        "a saga.started answer is correlated by the saga id"
    );
    let first: Value = serde_json::from_slice(&started.delivery.data).unwrap();
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

    // A saga that does not exist, and an input its input_schema refuses: the requester is told
    // why (correlated by its request's message id), and the requests are dead-lettered.
    let unknown = StartSaga {
        saga: "no-such-saga".into(),
        input: Default::default(),
        idempotency_key: None,
    };
    let unknown_request = start_message(&unknown, &answers);
    amqp.publish(&unknown_request).await;
    let rejected = get_message().await;
    assert_answer(&rejected, message_type::START_REJECTED);
    assert_eq!(
        correlation_id(&rejected),
        Some(unknown_request.message_id.to_string()),
        "correlated by the request's message id"
    );
    let answer: StartRejected = saga_amqp::decode(&rejected.delivery).unwrap();
    assert_eq!(answer.saga, "no-such-saga");
    assert_eq!(answer.reason, RejectionReason::UnknownSaga);
    assert!(answer.detail.contains("no-such-saga"), "{answer:?}");

    let invalid = StartSaga {
        saga: CHECKOUT.into(),
        input: serde_json::json!({"customer": "ivan", "amount": -5, "items": []})
            .as_object()
            .unwrap()
            .clone(),
        idempotency_key: None,
    };
    let mut invalid_request = start_message(&invalid, &answers);
    // A requester that sets its own correlation id gets it back.
    let requester_id = Uuid::new_v4();
    invalid_request.correlation_id = Some(requester_id);
    amqp.publish(&invalid_request).await;
    let rejected = get_message().await;
    assert_answer(&rejected, message_type::START_REJECTED);
    assert_eq!(correlation_id(&rejected), Some(requester_id.to_string()));
    let answer: StartRejected = saga_amqp::decode(&rejected.delivery).unwrap();
    assert_eq!(answer.saga, CHECKOUT);
    assert_eq!(answer.reason, RejectionReason::InvalidInput, "{answer:?}");
    assert!(!answer.detail.is_empty(), "{answer:?}");

    // A version the orchestrator does not speak: dead-lettered, unanswered (it cannot read who
    // asked for what).
    let mut future = start_message(&start, &answers);
    future.headers = vec![(header::SCHEMA_VERSION.into(), HeaderValue::Int(99))];
    amqp.publish(&future).await;
    let dlq = dead_letter_queue(START_QUEUE);
    let mut reasons = Vec::new();
    for _ in 0..3 {
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
    assert!(
        reasons.iter().any(|r| r.contains("input_schema")),
        "{reasons:?}"
    );
    // All three are counted, by the queue they came from (a moment after the copy is
    // confirmed: poll briefly).
    let counted = |scrape: &saga_system::prometheus::Scrape| {
        scrape.get("saga_dead_letters_total", &[("queue", START_QUEUE)])
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut scrape = saga_system::prometheus::scrape(system.http_url()).await;
    while counted(&scrape) != Some(3.0) && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        scrape = saga_system::prometheus::scrape(system.http_url()).await;
    }
    assert_eq!(counted(&scrape), Some(3.0), "{}", scrape.text);
    assert_eq!(system.list_all("").await.len(), 1, "nothing else started");
    let stray = channel
        .basic_get(answers.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    assert!(
        stray.is_none(),
        "no other answer: {:?}",
        stray.map(|m| String::from_utf8_lossy(&m.delivery.data).into_owned())
    );
}

/// An answer on `reply_to` has its type and the schema version header.
fn assert_answer(message: &BasicGetMessage, kind: &str) {
    let body = String::from_utf8_lossy(&message.delivery.data);
    assert_eq!(
        message
            .delivery
            .properties
            .kind()
            .as_ref()
            .map(|k| k.as_str()),
        Some(kind),
        "{body}"
    );
    assert_eq!(
        saga_amqp::header_int(&message.delivery, header::SCHEMA_VERSION),
        Some(i64::from(SCHEMA_VERSION)),
        "{body}"
    );
}

fn correlation_id(message: &BasicGetMessage) -> Option<String> {
    message
        .delivery
        .properties
        .correlation_id()
        .as_ref()
        .map(|c| c.to_string())
}

saga_system::on_both_backends!(start_by_message);
