//! Messages the participant cannot use go to its dead-letter queue with a reason, and it keeps
//! working after them.

mod common;

use common::*;
use saga_amqp::lapin::types::AMQPValue;
use saga_participant::Direction;
use saga_schemas::amqp::{command_queue, header};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn unusable_messages_are_dead_lettered_with_a_reason() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;
    let queue = command_queue(PARTICIPANT);

    let good = command(
        Uuid::new_v4(),
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({}),
    );
    let body = serde_json::to_vec(&good).unwrap();
    let cases: Vec<(&str, Vec<u8>, saga_amqp::lapin::BasicProperties, &str)> = vec![
        (
            "bad JSON",
            b"{not json".to_vec(),
            command_properties(&good),
            "not JSON",
        ),
        (
            "missing schema version",
            body.clone(),
            without_header(command_properties(&good), SCHEMA_VERSION_HEADER),
            "no x-schema-version",
        ),
        (
            "unsupported schema version",
            body.clone(),
            with_header(
                command_properties(&good),
                SCHEMA_VERSION_HEADER,
                AMQPValue::LongLongInt(99),
            ),
            "unsupported x-schema-version 99",
        ),
        (
            "not a StepCommand",
            br#"{"hello": "world"}"#.to_vec(),
            command_properties(&good),
            "missing field",
        ),
        (
            "unknown action",
            serde_json::to_vec(&command(
                Uuid::new_v4(),
                "s",
                Direction::Execute,
                "teleport",
                1,
                json!({}),
            ))
            .unwrap(),
            command_properties(&good),
            "unknown execute action \"teleport\"",
        ),
        (
            "unknown compensation",
            serde_json::to_vec(&command(
                Uuid::new_v4(),
                "s",
                Direction::Compensate,
                "charge",
                1,
                json!({}),
            ))
            .unwrap(),
            command_properties(&good),
            "unknown compensate action \"charge\"",
        ),
        (
            "no reply_to",
            body.clone(),
            {
                let props = command_properties(&good);
                saga_amqp::lapin::BasicProperties::default()
                    .with_headers(props.headers().clone().unwrap_or_default())
                    .with_message_id(good.message_id.to_string().into())
            },
            "no reply_to",
        ),
    ];

    for (what, body, properties, expected_reason) in cases {
        client.send_raw(&body, properties).await;
        let dead = client.dead_letter().await;
        let reason = header(&dead, header::DEAD_LETTER_REASON)
            .unwrap_or_else(|| panic!("{what}: no reason header"));
        assert!(
            reason.contains(expected_reason),
            "{what}: reason {reason:?} should mention {expected_reason:?}"
        );
        assert_eq!(
            header(&dead, header::DEAD_LETTER_QUEUE).as_deref(),
            Some(queue.as_str()),
            "{what}"
        );
        assert_eq!(dead.data, body, "{what}: the body is kept unchanged");
    }
    client
        .no_reply_within(std::time::Duration::from_millis(300))
        .await;

    // Still working.
    let reply = client.call(&good).await;
    output(&reply);
    running.stop().await;
}
