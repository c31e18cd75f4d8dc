//! At-least-once delivery absorbed: the same start request, the same command and the same reply
//! arriving more than once have one effect and cause one transition.

use std::time::Duration;

use futures_util::future::join_all;
use saga_schemas::amqp::{OutgoingMessage, REPLIES_QUEUE};
use saga_schemas::{Direction, StepCommand};
use saga_system::checkout::*;
use saga_system::{Backend, ORCHESTRATOR, Options, System, pretty};
use serde_json::Value;
use uuid::Uuid;

/// The same Idempotency-Key twice (and five times at once) starts one saga.
async fn same_idempotency_key(backend: Backend) {
    let system = System::start(Options::new(backend).label("idempotency-key")).await;
    let sku = unique_sku("mug");
    let input = order("grace", 1_500, &[(&sku, 1)]);
    let key = format!("checkout-{}", Uuid::new_v4());

    let (status1, first) = system.start_saga(&input, Some(&key)).await;
    assert_eq!(status1, 202, "{first}");
    assert_eq!(first["created"], true, "{first}");
    let (status2, second) = system.start_saga(&input, Some(&key)).await;
    assert_eq!(status2, 202, "{second}");
    assert_eq!(
        second["created"], false,
        "the second request starts nothing: {second}"
    );
    assert_eq!(first["saga_id"], second["saga_id"], "{first} vs {second}");
    let id = first["saga_id"].as_str().unwrap().to_owned();

    // Concurrent requests with one new key: one saga, created once.
    let racing_key = format!("racing-{}", Uuid::new_v4());
    let answers = join_all((0..5).map(|_| system.start_saga(&input, Some(&racing_key)))).await;
    for (status, body) in &answers {
        assert_eq!(*status, 202, "{body}");
    }
    let racing_id = answers[0].1["saga_id"].clone();
    assert!(
        answers.iter().all(|(_, body)| body["saga_id"] == racing_id),
        "{answers:?}"
    );
    let created = answers
        .iter()
        .filter(|(_, body)| body["created"] == true)
        .count();
    assert_eq!(created, 1, "exactly one request created it: {answers:?}");

    let listed = system.list_all("name=order-checkout").await;
    assert_eq!(listed.len(), 2, "two keys, two sagas: {listed:?}");
    let racing_id = racing_id.as_str().unwrap().to_owned();
    for saga_id in [&id, &racing_id] {
        let saga = system.wait_settled(saga_id, Duration::from_secs(30)).await;
        assert_eq!(status(&saga), "completed", "{}", pretty(&saga));
        assert_eq!(events(&saga, "saga_started").len(), 1, "{}", pretty(&saga));
    }
    let books = system.books().await;
    assert_eq!(books.orders.as_ref().map_or(0, Vec::len), 2, "{books:?}");
    assert_eq!(books.payments.as_ref().map_or(0, Vec::len), 2, "{books:?}");
}

/// A command and a reply each delivered twice.
///
/// The saga waits at schedule-shipment (shipping is down); a copy of that command (same message
/// id) is published to the shipping queue, so shipping gets it twice. The orchestrator is
/// stopped while shipping answers both, the two replies are taken off `saga.replies` and each
/// published back twice (same message id, same body). Then the orchestrator comes back: one
/// shipment, one transition. Afterwards a late copy of the first command and of a reply change
/// nothing either.
async fn duplicate_command_and_reply(backend: Backend) {
    let mut system = System::start(
        Options::new(backend)
            .label("duplicates")
            .without("shipping"),
    )
    .await;
    let sku = unique_sku("hat");
    let input = order("heidi", 2_000, &[(&sku, 1)]);
    let id = system.start_checkout(&input).await;
    let saga = system
        .wait_until(
            &id,
            Duration::from_secs(20),
            "send schedule-shipment",
            |s| position(s, "command_sent", "schedule-shipment").is_some(),
        )
        .await;

    let amqp = system.amqp().await;
    let sent = events(&saga, "command_sent")
        .into_iter()
        .find(|e| e["step"] == "schedule-shipment")
        .unwrap();
    let data = saga["data"].as_object().cloned().unwrap_or_default();
    let command = StepCommand {
        message_id: sent["message_id"].as_str().unwrap().parse().unwrap(),
        saga_id: id.parse().unwrap(),
        saga_name: "order-checkout".into(),
        step: "schedule-shipment".into(),
        direction: Direction::Execute,
        action: "schedule".into(),
        attempt: sent["attempt"].as_u64().unwrap() as u32,
        data,
        action_output: None,
        expires_at: None,
    };
    amqp.publish(&OutgoingMessage::command(
        &command,
        "shipping",
        REPLIES_QUEUE,
        None,
    ))
    .await;

    // Stop the orchestrator so that the replies wait in saga.replies, then let shipping answer.
    system.stop(ORCHESTRATOR).await;
    system.start_participant("shipping").await;
    let mut replies = Vec::new();
    while replies.len() < 2 {
        let delivery = amqp
            .wait_get(REPLIES_QUEUE, Duration::from_secs(20))
            .await
            .unwrap_or_else(|| panic!("shipping answered {} of the 2 copies", replies.len()));
        replies.push(delivery);
    }
    for reply in &replies {
        let body: Value = serde_json::from_slice(&reply.data).unwrap();
        assert_eq!(body["in_reply_to"], sent["message_id"], "{body}");
        assert_eq!(body["outcome"]["status"], "success", "{body}");
        for _ in 0..2 {
            amqp.publisher
                .publish_raw("", REPLIES_QUEUE, &reply.data, reply.properties.clone())
                .await
                .unwrap();
        }
    }
    system.restart_orchestrator().await;
    let saga = system.wait_settled(&id, Duration::from_secs(30)).await;
    let show = pretty(&saga);
    assert_eq!(status(&saga), "completed", "{show}");
    for name in STEPS {
        assert_eq!(count(&saga, "step_completed", name), 1, "{name}:\n{show}");
        assert_eq!(count(&saga, "command_sent", name), 1, "{name}:\n{show}");
    }
    assert!(events(&saga, "attempt_failed").is_empty(), "{show}");
    assert_history_ordered(&saga);
    let events_before = saga["history"].as_array().unwrap().len();

    let books = system.books().await;
    let mine = books_of(&books, &id);
    assert_eq!(
        mine.shipments.len(),
        1,
        "one shipment for two commands: {mine:?}"
    );
    assert_eq!(mine.orders.len(), 1, "{mine:?}");
    assert_eq!(mine.orders[0].status, "approved", "{mine:?}");

    // Late copies after the saga completed: the first command again (orders must not create a
    // second order) and a shipping reply again.
    let created = events(&saga, "command_sent")
        .into_iter()
        .find(|e| e["step"] == "create-order")
        .unwrap();
    let late_command = StepCommand {
        message_id: created["message_id"].as_str().unwrap().parse().unwrap(),
        saga_id: id.parse().unwrap(),
        saga_name: "order-checkout".into(),
        step: "create-order".into(),
        direction: Direction::Execute,
        action: "create_order".into(),
        attempt: 1,
        data: input.as_object().cloned().unwrap(),
        action_output: None,
        expires_at: None,
    };
    amqp.publish(&OutgoingMessage::command(
        &late_command,
        "orders",
        REPLIES_QUEUE,
        None,
    ))
    .await;
    amqp.publisher
        .publish_raw(
            "",
            REPLIES_QUEUE,
            &replies[0].data,
            replies[0].properties.clone(),
        )
        .await
        .unwrap();
    // A saga started afterwards completing means the copies (queued before it) were handled.
    let later = system
        .start_checkout(&order("ivan", 100, &[(&sku, 1)]))
        .await;
    let later = system.wait_settled(&later, Duration::from_secs(30)).await;
    assert_eq!(status(&later), "completed", "{}", pretty(&later));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let saga = system.saga(&id).await;
    assert_eq!(
        saga["history"].as_array().unwrap().len(),
        events_before,
        "late duplicates changed the history:\n{}",
        pretty(&saga)
    );
    let books = system.books().await;
    let mine = books_of(&books, &id);
    assert_eq!(
        mine.orders.len(),
        1,
        "a late duplicate command created an order: {mine:?}"
    );
    assert_eq!(mine.shipments.len(), 1, "{mine:?}");
    assert!(
        amqp.get("saga.replies.dlq").await.is_none(),
        "a duplicate reply was dead-lettered"
    );
    amqp.close().await;
    assert_books_balance(&books, Some(100));
}

saga_system::on_both_backends!(same_idempotency_key, duplicate_command_and_reply);
