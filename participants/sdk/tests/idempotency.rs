//! At-least-once delivery absorbed: duplicates and retries have one effect and get the same
//! answer; a compensation before its action is a null compensation, and the late action is
//! refused.

mod common;

use std::collections::BTreeSet;

use common::*;
use saga_participant::{COMPENSATED_BEFORE_EXECUTED, Direction, Outcome};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_delivery_has_one_effect_and_the_same_reply() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;

    let saga_id = Uuid::new_v4();
    let cmd = command(
        saga_id,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({}),
    );
    let first = client.call(&cmd).await;
    // The very same message again (same message id), as a redelivery would bring it.
    let second = client.call(&cmd).await;
    assert_eq!(second.outcome, first.outcome);
    assert_eq!(second.in_reply_to, cmd.message_id);
    assert_ne!(
        second.message_id, first.message_id,
        "each reply has its own id"
    );

    let conn = db.connect().await;
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![("charge".to_owned(), 1)]
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_copies_of_a_command_have_one_effect() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 16);
    let mut client = Client::connect(&vhost).await;

    let saga_id = Uuid::new_v4();
    let cmd = command(
        saga_id,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({ "sleep_ms": 200 }),
    );
    for _ in 0..5 {
        client.send(&cmd).await;
    }
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        let reply = client.reply().await;
        assert_eq!(reply.in_reply_to, cmd.message_id);
        outcomes.push(serde_json::to_string(&reply.outcome).unwrap());
    }
    let distinct: BTreeSet<_> = outcomes.iter().collect();
    assert_eq!(
        distinct.len(),
        1,
        "every copy gets the same answer: {outcomes:?}"
    );
    let conn = db.connect().await;
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![("charge".to_owned(), 1)]
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_of_a_committed_action_gets_the_stored_reply_without_running_again() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;

    let saga_id = Uuid::new_v4();
    let cmd = command(
        saga_id,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({}),
    );
    let first = client.call(&cmd).await;
    // The orchestrator timed the first attempt out and sends attempt 2 (a new message id).
    let attempt2 = retry(&cmd, 2);
    let second = client.call(&attempt2).await;
    assert_eq!(second.attempt, 2);
    assert_eq!(second.in_reply_to, attempt2.message_id);
    assert_eq!(
        second.outcome, first.outcome,
        "the stored outcome, attempt 1's output included"
    );
    assert_eq!(output(&second)["attempt"], 1);

    let conn = db.connect().await;
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![("charge".to_owned(), 1)]
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_compensation_runs_once_with_the_action_output() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;

    let saga_id = Uuid::new_v4();
    let charge = command(
        saga_id,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({}),
    );
    let charged = client.call(&charge).await;
    let charge_id = output(&charged)["charge_id"].clone();

    let mut refund = command(
        saga_id,
        "charge-payment",
        Direction::Compensate,
        "refund",
        1,
        json!({}),
    );
    refund.action_output = Some(output(&charged).clone());
    let refunded = client.call(&refund).await;
    assert_eq!(output(&refunded)["refunded"], charge_id);
    assert_eq!(refunded.direction, Direction::Compensate);
    let again = client.call(&retry(&refund, 2)).await;
    assert_eq!(again.outcome, refunded.outcome);

    let conn = db.connect().await;
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![("charge".to_owned(), 1), ("refund".to_owned(), 1)]
    );
    assert_eq!(
        inbox(&conn, saga_id).await,
        vec![
            ("compensate".to_owned(), "success".to_owned()),
            ("execute".to_owned(), "success".to_owned())
        ]
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_null_compensation_then_the_late_action_is_refused() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;

    let saga_id = Uuid::new_v4();
    let refund = command(
        saga_id,
        "charge-payment",
        Direction::Compensate,
        "refund",
        1,
        json!({}),
    );
    let refunded = client.call(&refund).await;
    assert_eq!(
        output(&refunded).len(),
        0,
        "a null compensation has an empty output"
    );

    let conn = db.connect().await;
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![],
        "the refund handler did not run"
    );

    // The action, delayed in the broker, arrives after its compensation.
    let charge = command(
        saga_id,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({}),
    );
    let late = client.call(&charge).await;
    assert_eq!(
        late.outcome,
        Outcome::Failure {
            reason: COMPENSATED_BEFORE_EXECUTED.into()
        }
    );
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![],
        "the charge handler did not run"
    );
    assert_eq!(
        inbox(&conn, saga_id).await,
        vec![
            ("compensate".to_owned(), "success".to_owned()),
            ("execute".to_owned(), "failure".to_owned())
        ]
    );
    // And it keeps being refused.
    let again = client.call(&retry(&charge, 2)).await;
    assert_eq!(again.outcome, late.outcome);

    // Another step of the same saga is not affected.
    let other = command(
        saga_id,
        "other-step",
        Direction::Execute,
        "charge",
        1,
        json!({}),
    );
    output(&client.call(&other).await);
    running.stop().await;
}
