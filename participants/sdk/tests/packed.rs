//! Several commands in one message (`saga.step_commands`, sent by an orchestrator told to pack
//! them): each is handled exactly once as if alone, the replies come back in one message, and a
//! command that cannot be handled is dead-lettered alone while the others are answered.

mod common;

use common::*;
use saga_participant::{Direction, Outcome};
use saga_schemas::amqp::{header, message_type};
use saga_schemas::{StepCommand, StepCommands};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn packed_commands_are_answered_together_once_each() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;

    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let charge_a = charge(a);
    let declined_b = command(
        b,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({ "decline": "card declined" }),
    );
    let unknown_c = command(c, "teleport", Direction::Execute, "teleport", 1, json!({}));
    client
        .send_pack(&[&charge_a, &unknown_c, &declined_b])
        .await;

    let dead = client.dead_letter().await;
    assert_eq!(
        dead.properties.kind().as_ref().map(|k| k.as_str()),
        Some(message_type::STEP_COMMAND),
        "the command alone is set aside"
    );
    let body: StepCommand = serde_json::from_slice(&dead.data).expect("the command alone");
    assert_eq!(body, unknown_c);
    assert_eq!(header(&dead, header::SAGA_ID), Some(c.to_string()));
    let reason = header(&dead, "x-dead-letter-reason").unwrap_or_default();
    assert!(
        reason.contains("unknown execute action \"teleport\""),
        "{reason}"
    );

    let replies = client.packed_replies().await;
    let answered: Vec<Uuid> = replies.iter().map(|r| r.in_reply_to).collect();
    assert_eq!(answered, [charge_a.message_id, declined_b.message_id]);
    assert!(matches!(replies[0].outcome, Outcome::Success { .. }));
    assert_eq!(
        replies[1].outcome,
        Outcome::Failure {
            reason: "card declined".into()
        }
    );

    // The same pack again (a redelivery, or the orchestrator's relay sending it twice): the
    // recorded outcomes, and no handler runs again.
    client.send_pack(&[&charge_a, &declined_b]).await;
    let again = client.packed_replies().await;
    assert_eq!(
        again.iter().map(|r| &r.outcome).collect::<Vec<_>>(),
        replies.iter().map(|r| &r.outcome).collect::<Vec<_>>()
    );
    let conn = db.connect().await;
    assert_eq!(effects(&conn, a).await, [("charge".to_owned(), 1)]);
    assert!(
        effects(&conn, b).await.is_empty(),
        "a declined charge keeps no effect"
    );
    assert!(effects(&conn, c).await.is_empty());

    // A lone command still gets a reply of its own.
    let reply = client.call(&charge(Uuid::new_v4())).await;
    assert!(matches!(reply.outcome, Outcome::Success { .. }));
    client
        .no_dead_letter_within(std::time::Duration::from_millis(300))
        .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_empty_or_unreadable_pack_is_dead_lettered_whole() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;
    let good = charge(Uuid::new_v4());
    let properties = command_properties(&good).with_type(message_type::STEP_COMMANDS.into());

    let empty = serde_json::to_vec(&StepCommands { commands: vec![] }).unwrap();
    client.send_raw(&empty, properties.clone()).await;
    let dead = client.dead_letter().await;
    assert_eq!(dead.data, empty);
    let reason = header(&dead, "x-dead-letter-reason").unwrap_or_default();
    assert!(reason.contains("no commands"), "{reason}");

    // A command alone is not a pack.
    let alone = serde_json::to_vec(&good).unwrap();
    client.send_raw(&alone, properties).await;
    let dead = client.dead_letter().await;
    assert_eq!(dead.data, alone);
    let reason = header(&dead, "x-dead-letter-reason").unwrap_or_default();
    assert!(
        reason.contains("cannot decode the packed commands") && reason.contains("commands"),
        "{reason}"
    );

    // And the participant goes on.
    let reply = client.call(&good).await;
    assert!(matches!(reply.outcome, Outcome::Success { .. }));
    running.stop().await;
}
