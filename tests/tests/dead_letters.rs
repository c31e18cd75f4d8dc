//! Messages nobody can read, replies for sagas nobody here knows and replies to commands never
//! sent are dead-lettered with the reason, counted in `saga_dead_letters_total`, and nothing
//! else stops.

use std::time::Duration;

use saga_amqp::{HeaderValue, OutgoingMessage};
use saga_schemas::amqp::{
    COMMANDS_EXCHANGE, REPLIES_QUEUE, command_queue, dead_letter_queue, header, message_type,
};
use saga_schemas::{Direction, Outcome, PackedReply, SCHEMA_VERSION, StepReply};
use saga_system::checkout::*;
use saga_system::prometheus::scrape;
use saga_system::{Backend, CHECKOUT, Options, System, dead_letter_reason, pretty};
use uuid::Uuid;

const MALFORMED: &[u8] = b"{\"saga_id\": \"not closed";

/// `saga_dead_letters_total{queue="saga.replies"}`; served at 0 before anything is dead-lettered.
async fn replies_dead_lettered(system: &System) -> f64 {
    let scrape = scrape(system.http_url()).await;
    scrape
        .get("saga_dead_letters_total", &[("queue", REPLIES_QUEUE)])
        .unwrap_or_else(|| {
            panic!(
                "saga_dead_letters_total for {REPLIES_QUEUE}:\n{}",
                scrape.text
            )
        })
}

/// Asserts the orchestrator counted exactly one dead letter from `saga.replies` since `before`.
/// It counts once the copy is confirmed and the original acked, a moment after the copy is in
/// its queue: so poll a little before comparing.
async fn assert_one_more_dead_letter(system: &System, before: f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut now = replies_dead_lettered(system).await;
    while now < before + 1.0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = replies_dead_lettered(system).await;
    }
    assert_eq!(
        now - before,
        1.0,
        "saga_dead_letters_total{{queue=\"{REPLIES_QUEUE}\"}} moved by one"
    );
}

async fn malformed_messages(backend: Backend) {
    let system = System::start(Options::new(backend).label("dead-letters")).await;
    let amqp = system.amqp().await;
    let before = replies_dead_lettered(&system).await;
    let version = [(
        header::SCHEMA_VERSION,
        HeaderValue::Int(SCHEMA_VERSION.into()),
    )];

    // On the orchestrator's replies queue.
    amqp.publish_raw("", REPLIES_QUEUE, MALFORMED, &version, None)
        .await;
    // On a participant's queue, the way the orchestrator sends commands.
    amqp.publish_raw(
        COMMANDS_EXCHANGE,
        "orders",
        MALFORMED,
        &version,
        Some(REPLIES_QUEUE),
    )
    .await;

    for queue in [REPLIES_QUEUE.to_owned(), command_queue("orders")] {
        let dlq = dead_letter_queue(&queue);
        let delivery = amqp
            .wait_get(&dlq, Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("nothing reached {dlq}"));
        assert_eq!(
            delivery.data, MALFORMED,
            "{dlq} holds the message as it was sent"
        );
        let reason = dead_letter_reason(&delivery).unwrap_or_else(|| {
            panic!(
                "the message in {dlq} has no x-dead-letter-reason: {:?}",
                delivery.properties
            )
        });
        assert!(!reason.trim().is_empty(), "{dlq}: empty reason");
        assert!(
            reason.to_lowercase().contains("json"),
            "{dlq}: the reason should say the body is not JSON: {reason:?}"
        );
        assert!(amqp.get(&dlq).await.is_none(), "{dlq} holds one message");
    }
    // The orchestrator counts its own (the participant's is in its `.dlq` queue's depth).
    assert_one_more_dead_letter(&system, before).await;

    // Both consumers go on: a saga started afterwards completes.
    let sku = unique_sku("fig");
    let id = system
        .start_checkout(&order("judy", 300, &[(&sku, 1)]))
        .await;
    let saga = system.wait_settled(&id, Duration::from_secs(30)).await;
    assert_eq!(status(&saga), "completed", "{}", pretty(&saga));
    amqp.close().await;
}

/// A well-formed reply for a saga id this orchestrator's database never saw (as when a second
/// orchestrator with its own database shares the vhost) is not acked silently: it lands in
/// `saga.replies.dlq` with the reason, and `saga_replies_unknown_total` counts it.
async fn replies_for_unknown_sagas(backend: Backend) {
    let system = System::start(Options::new(backend).label("unknown-saga")).await;
    let amqp = system.amqp().await;
    let counted = |text: &str| -> f64 {
        saga_system::prometheus::Scrape::parse(text)
            .unwrap()
            .get_or_zero("saga_replies_unknown_total", &[])
    };
    let before = counted(&scrape(system.http_url()).await.text);
    let dead_before = replies_dead_lettered(&system).await;

    let saga_id = Uuid::new_v4();
    let reply = StepReply {
        message_id: Uuid::new_v4(),
        in_reply_to: Uuid::new_v4(),
        saga_id,
        step: "create-order".into(),
        direction: Direction::Execute,
        attempt: 1,
        outcome: Outcome::Success {
            output: Default::default(),
        },
    };
    amqp.publish(&OutgoingMessage::reply(
        &reply,
        "order-checkout",
        "create_order",
        REPLIES_QUEUE,
    ))
    .await;

    let dlq = dead_letter_queue(REPLIES_QUEUE);
    let dead = amqp
        .wait_get(&dlq, Duration::from_secs(15))
        .await
        .unwrap_or_else(|| panic!("the reply for unknown saga {saga_id} did not reach {dlq}"));
    let body: StepReply = serde_json::from_slice(&dead.data).unwrap();
    assert_eq!(body, reply, "{dlq} holds the reply as it was sent");
    assert_eq!(
        dead_letter_reason(&dead),
        Some(
            format!(
                "saga {saga_id}: unknown to this orchestrator's database (another orchestrator \
                 with a different database may consume this vhost)"
            )
            .as_str()
        )
    );
    assert!(amqp.get(&dlq).await.is_none(), "{dlq} holds one message");

    let after = counted(&scrape(system.http_url()).await.text);
    assert_eq!(
        after - before,
        1.0,
        "saga_replies_unknown_total moved by one"
    );
    assert_one_more_dead_letter(&system, dead_before).await;
    let log = std::fs::read_to_string(system.log_path(saga_system::ORCHESTRATOR)).unwrap();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains(&saga_id.to_string())
            && l.contains("unknown saga")),
        "a warning with the saga id in the orchestrator's log:\n{}",
        system.log_tails(40)
    );
    amqp.close().await;
}

/// A system without `orders` and a checkout saga whose first command waits in that queue (taken
/// off it here), its step awaiting the reply: the system, a client, the saga id, the command.
async fn awaiting_its_first_reply(
    backend: Backend,
    label: &str,
) -> (System, saga_system::Amqp, String, saga_schemas::StepCommand) {
    let system = System::start(Options::new(backend).without("orders").label(label)).await;
    let amqp = system.amqp().await;
    let saga_id = system
        .start_checkout(&order("ada", 1000, &[("TEA-01", 1)]))
        .await;
    let queue = command_queue("orders");
    let command = amqp
        .wait_get(&queue, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("no command in {queue}"));
    let command = serde_json::from_slice(&command.data).unwrap();
    (system, amqp, saga_id, command)
}

/// A reply naming a command its saga never sent (forged, or meant for another saga) is not
/// applied, even while its step awaits an answer: it lands in `saga.replies.dlq` with the
/// reason, and the real command's answer still counts.
async fn replies_to_commands_never_sent(backend: Backend) {
    let (system, amqp, saga_id, command) = awaiting_its_first_reply(backend, "forged-reply").await;
    let reply = |in_reply_to| StepReply {
        message_id: Uuid::new_v4(),
        in_reply_to,
        saga_id: saga_id.parse().unwrap(),
        step: command.step.clone(),
        direction: Direction::Execute,
        attempt: command.attempt,
        outcome: Outcome::Success {
            output: Default::default(),
        },
    };
    let publish =
        |reply: StepReply| OutgoingMessage::reply(&reply, CHECKOUT, &command.action, REPLIES_QUEUE);

    let forged = reply(Uuid::new_v4());
    let before = replies_dead_lettered(&system).await;
    amqp.publish(&publish(forged.clone())).await;
    let dlq = dead_letter_queue(REPLIES_QUEUE);
    let dead = amqp
        .wait_get(&dlq, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("the forged reply did not reach {dlq}"));
    let body: StepReply = serde_json::from_slice(&dead.data).unwrap();
    assert_eq!(body, forged, "{dlq} holds the reply as it was sent");
    let reason = dead_letter_reason(&dead).unwrap_or_default().to_owned();
    assert!(
        reason.contains(&saga_id) && reason.contains("did not send"),
        "{reason}"
    );
    assert_one_more_dead_letter(&system, before).await;
    let saga = system.saga(&saga_id).await;
    assert_eq!(
        step_status(&saga, &command.step),
        "running",
        "{}",
        pretty(&saga)
    );

    amqp.publish(&publish(reply(command.message_id))).await;
    system
        .wait_until(
            &saga_id,
            Duration::from_secs(60),
            "take the real reply",
            |saga| step_status(saga, &command.step) == "completed",
        )
        .await;
    amqp.close().await;
}

/// A packed reply message (`saga.step_replies`) is taken reply by reply: the one for a saga
/// nobody here knows is dead-lettered alone, as a `saga.step_reply` with its saga id and the
/// reason, and the real one beside it moves its saga on.
async fn packed_replies_are_taken_one_by_one(backend: Backend) {
    let (system, amqp, saga_id, command) =
        awaiting_its_first_reply(backend, "packed-replies").await;
    let reply = |saga_id: Uuid, in_reply_to| StepReply {
        message_id: Uuid::new_v4(),
        in_reply_to,
        saga_id,
        step: command.step.clone(),
        direction: Direction::Execute,
        attempt: command.attempt,
        outcome: Outcome::Success {
            output: Default::default(),
        },
    };
    let stranger = Uuid::new_v4();
    let unknown = reply(stranger, Uuid::new_v4());
    let real = reply(saga_id.parse().unwrap(), command.message_id);
    let packed = |reply: &StepReply| PackedReply {
        reply: reply.clone(),
        traceparent: None,
        tracestate: None,
    };
    let before = replies_dead_lettered(&system).await;
    let messages =
        OutgoingMessage::packed_replies(&[packed(&unknown), packed(&real)], REPLIES_QUEUE);
    assert_eq!(messages.len(), 1);
    amqp.publish(&messages[0]).await;

    let dlq = dead_letter_queue(REPLIES_QUEUE);
    let dead = amqp
        .wait_get(&dlq, Duration::from_secs(30))
        .await
        .unwrap_or_else(|| panic!("the reply for an unknown saga did not reach {dlq}"));
    assert_eq!(
        dead.properties.kind().as_ref().map(|k| k.as_str()),
        Some(message_type::STEP_REPLY)
    );
    let body: StepReply = serde_json::from_slice(&dead.data).unwrap();
    assert_eq!(body, unknown, "{dlq} holds that reply alone");
    assert_eq!(
        saga_amqp::header_str(&dead, header::SAGA_ID),
        Some(stranger.to_string().as_str())
    );
    let reason = dead_letter_reason(&dead).unwrap_or_default().to_owned();
    assert!(
        reason.contains(&stranger.to_string()) && reason.contains("unknown to this orchestrator"),
        "{reason}"
    );
    assert_one_more_dead_letter(&system, before).await;
    system
        .wait_until(
            &saga_id,
            Duration::from_secs(60),
            "take the real reply of the pack",
            |saga| step_status(saga, &command.step) == "completed",
        )
        .await;
    assert!(amqp.get(&dlq).await.is_none(), "{dlq} holds one message");
    amqp.close().await;
}

saga_system::on_both_backends!(
    malformed_messages,
    replies_for_unknown_sagas,
    replies_to_commands_never_sent,
    packed_replies_are_taken_one_by_one
);
