//! Start before the orchestrator, shut down gracefully, survive a lost connection.

mod common;

use std::time::Duration;

use common::*;
use saga_participant::Direction;
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_finishes_the_commands_in_flight() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;
    // Up and consuming.
    output(
        &client
            .call(&command(
                Uuid::new_v4(),
                "s",
                Direction::Execute,
                "charge",
                1,
                json!({}),
            ))
            .await,
    );

    let saga_id = Uuid::new_v4();
    let slow = command(
        saga_id,
        "s",
        Direction::Execute,
        "charge",
        1,
        json!({ "sleep_ms": 700 }),
    );
    client.send(&slow).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    running.stop().await;
    // The command being handled when shutdown began was finished and answered.
    let reply = client.reply().await;
    assert_eq!(reply.in_reply_to, slow.message_id);
    output(&reply);

    // After the shutdown nothing is consumed any more: a new command waits in the queue.
    let waiting = command(
        Uuid::new_v4(),
        "s",
        Direction::Execute,
        "charge",
        1,
        json!({}),
    );
    client.send(&waiting).await;
    client.no_reply_within(Duration::from_millis(500)).await;
    // A new instance picks it up.
    let running = Running::start(participant(), &vhost, &db, 8);
    let reply = client.reply().await;
    assert_eq!(reply.in_reply_to, waiting.message_id);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_participant_starts_first_and_declares_its_own_queue() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    // Wait for the queue the participant declares, without declaring it ourselves.
    let conn = saga_amqp::connect(&vhost.url, "test-probe").await.unwrap();
    within("the participant declares its queue", async {
        loop {
            let ch = conn.create_channel().await.unwrap();
            let passive = saga_amqp::lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            };
            let queue = saga_schemas::amqp::command_queue(PARTICIPANT);
            if ch
                .queue_declare(queue.as_str().into(), passive, Default::default())
                .await
                .is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    // Same arguments as the orchestrator's declaration, or this would fail.
    let mut client = Client::connect(&vhost).await;
    output(
        &client
            .call(&command(
                Uuid::new_v4(),
                "s",
                Direction::Execute,
                "charge",
                1,
                json!({}),
            ))
            .await,
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reconnects_after_the_broker_closes_its_connection() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;
    output(
        &client
            .call(&command(
                Uuid::new_v4(),
                "s",
                Direction::Execute,
                "charge",
                1,
                json!({}),
            ))
            .await,
    );

    vhost.close_all_connections();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !running.handle.is_finished(),
        "the participant keeps running"
    );

    // The test client lost its connection too: a new one.
    let mut client = Client::connect(&vhost).await;
    let saga_id = Uuid::new_v4();
    let cmd = command(saga_id, "s", Direction::Execute, "charge", 1, json!({}));
    let reply = client.call(&cmd).await;
    output(&reply);
    let conn = db.connect().await;
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![("charge".to_owned(), 1)]
    );
    running.stop().await;
}
