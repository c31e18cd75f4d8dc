//! Messages nobody can read are dead-lettered with the reason, and nothing else stops.

use std::time::Duration;

use saga_amqp::HeaderValue;
use saga_schemas::SCHEMA_VERSION;
use saga_schemas::amqp::{
    COMMANDS_EXCHANGE, REPLIES_QUEUE, command_queue, dead_letter_queue, header,
};
use saga_system::checkout::*;
use saga_system::{Backend, Options, System, dead_letter_reason, pretty};

const MALFORMED: &[u8] = b"{\"saga_id\": \"not closed";

async fn malformed_messages(backend: Backend) {
    let system = System::start(Options::new(backend).label("dead-letters")).await;
    let amqp = system.amqp().await;
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

    // Both consumers go on: a saga started afterwards completes.
    let sku = unique_sku("fig");
    let id = system
        .start_checkout(&order("judy", 300, &[(&sku, 1)]))
        .await;
    let saga = system.wait_settled(&id, Duration::from_secs(30)).await;
    assert_eq!(status(&saga), "completed", "{}", pretty(&saga));
    amqp.close().await;
}

saga_system::on_both_backends!(malformed_messages);
