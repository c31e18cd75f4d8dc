//! The three outcomes a handler can give: success with output, business failure (rolled back,
//! recorded), retryable error (rolled back, not recorded, so a retry runs afresh).

mod common;

use common::*;
use saga_participant::{Direction, Outcome};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn success_reply_carries_the_output_and_the_command_ids() {
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
        json!({ "amount": 10 }),
    );
    let reply = client.call(&cmd).await;
    assert_eq!(reply.saga_id, saga_id);
    assert_eq!(reply.step, "charge-payment");
    assert_eq!(reply.direction, Direction::Execute);
    assert_eq!(reply.attempt, 1);
    assert_ne!(reply.message_id, cmd.message_id);
    let out = output(&reply);
    assert!(out["charge_id"].is_string(), "{out:?}");
    assert_eq!(out["attempt"], 1);

    let conn = db.connect().await;
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![("charge".to_owned(), 1)]
    );
    assert_eq!(
        inbox(&conn, saga_id).await,
        vec![("execute".to_owned(), "success".to_owned())]
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn business_failure_is_final_rolled_back_and_recorded() {
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
        json!({ "decline": "card declined" }),
    );
    let reply = client.call(&cmd).await;
    assert_eq!(
        reply.outcome,
        Outcome::Failure {
            reason: "card declined".into()
        }
    );

    let conn = db.connect().await;
    // The handler wrote an effect before declining: rolled back.
    assert_eq!(effects(&conn, saga_id).await, vec![]);
    assert_eq!(
        inbox(&conn, saga_id).await,
        vec![("execute".to_owned(), "failure".to_owned())]
    );

    // A retry gets the same failure without running again.
    let again = client.call(&retry(&cmd, 2)).await;
    assert_eq!(again.outcome, reply.outcome);
    assert_eq!(again.attempt, 2);
    assert_eq!(effects(&conn, saga_id).await, vec![]);

    // A compensation of a failed action has nothing to undo: a null compensation.
    let undo = command(
        saga_id,
        "charge-payment",
        Direction::Compensate,
        "refund",
        1,
        json!({}),
    );
    let undone = client.call(&undo).await;
    assert_eq!(output(&undone).len(), 0);
    assert_eq!(effects(&conn, saga_id).await, vec![]);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn retryable_error_is_not_recorded_and_the_retry_succeeds() {
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
        json!({ "fail_before_attempt": 3 }),
    );
    let first = client.call(&cmd).await;
    assert_eq!(
        first.outcome,
        Outcome::RetryableError {
            error: "gateway down on attempt 1".into()
        }
    );

    let conn = db.connect().await;
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![],
        "a retryable error rolls back"
    );
    assert_eq!(
        inbox(&conn, saga_id).await,
        vec![],
        "a retryable error is not recorded"
    );

    let second = client.call(&retry(&cmd, 2)).await;
    assert!(
        matches!(second.outcome, Outcome::RetryableError { .. }),
        "{second:?}"
    );
    let third = client.call(&retry(&cmd, 3)).await;
    assert_eq!(output(&third)["attempt"], 3);
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![("charge".to_owned(), 3)]
    );
    assert_eq!(
        inbox(&conn, saga_id).await,
        vec![("execute".to_owned(), "success".to_owned())]
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_gives_a_retryable_error_and_the_participant_goes_on() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;

    let saga_id = Uuid::new_v4();
    let cmd = command(
        saga_id,
        "s",
        Direction::Execute,
        "charge",
        1,
        json!({ "panic": true }),
    );
    let reply = client.call(&cmd).await;
    match &reply.outcome {
        Outcome::RetryableError { error } => assert!(error.contains("panicked"), "{error}"),
        other => panic!("expected a retryable error, got {other:?}"),
    }
    let conn = db.connect().await;
    assert_eq!(effects(&conn, saga_id).await, vec![]);

    let ok = command(
        Uuid::new_v4(),
        "s",
        Direction::Execute,
        "charge",
        1,
        json!({}),
    );
    client.call(&ok).await;
    running.stop().await;
}
