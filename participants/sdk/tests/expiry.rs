//! An action is never started after its `expires_at`: the SDK records the refusal `expired`
//! without running the handler, answers it to every later attempt, and compensates it with a
//! null compensation. An action that has not expired runs as usual.

mod common;

use chrono::{Duration as ChronoDuration, Utc};
use common::*;
use saga_participant::{Direction, EXPIRED, Outcome};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn an_expired_action_is_refused_recorded_and_compensated_with_nothing() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;
    let conn = db.connect().await;

    let saga_id = Uuid::new_v4();
    let mut cmd = command(
        saga_id,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({ "amount": 10 }),
    );
    cmd.expires_at = Some(Utc::now() - ChronoDuration::seconds(1));
    let refused = client.call(&cmd).await;
    assert_eq!(
        refused.outcome,
        Outcome::Failure {
            reason: EXPIRED.into()
        }
    );
    assert_eq!(EXPIRED, "expired");
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![],
        "the handler never ran"
    );
    assert_eq!(
        inbox(&conn, saga_id).await,
        vec![("execute".to_owned(), "failure".to_owned())],
        "the refusal is recorded"
    );

    // A later attempt gets the recorded refusal, even one that would not have expired: the
    // orchestrator may already act on the first answer.
    let mut later = retry(&cmd, 2);
    later.expires_at = Some(Utc::now() + ChronoDuration::minutes(5));
    let again = client.call(&later).await;
    assert_eq!(again.outcome, refused.outcome);
    assert_eq!(again.attempt, 2);
    assert_eq!(effects(&conn, saga_id).await, vec![]);

    // Its compensation has nothing to undo: a null compensation, the handler does not run.
    let undo = command(
        saga_id,
        "charge-payment",
        Direction::Compensate,
        "refund",
        1,
        json!({ "amount": 10 }),
    );
    let undone = client.call(&undo).await;
    assert_eq!(output(&undone).len(), 0, "{undone:?}");
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![],
        "no refund was written"
    );
    assert_eq!(
        inbox(&conn, saga_id).await,
        vec![
            ("compensate".to_owned(), "success".to_owned()),
            ("execute".to_owned(), "failure".to_owned()),
        ]
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_action_that_has_not_expired_runs() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;
    let conn = db.connect().await;

    let saga_id = Uuid::new_v4();
    let mut cmd = command(
        saga_id,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({ "amount": 10 }),
    );
    cmd.expires_at = Some(Utc::now() + ChronoDuration::minutes(5));
    let reply = client.call(&cmd).await;
    assert!(output(&reply)["charge_id"].is_string(), "{reply:?}");
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![("charge".to_owned(), 1)]
    );

    // Once it ran, its recorded success is the answer even after the expiry has passed.
    let mut late = retry(&cmd, 2);
    late.expires_at = Some(Utc::now() - ChronoDuration::seconds(1));
    let again = client.call(&late).await;
    assert_eq!(again.outcome, reply.outcome);
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![("charge".to_owned(), 1)]
    );

    // The compensation of a step that ran is a real one.
    let mut undo = command(
        saga_id,
        "charge-payment",
        Direction::Compensate,
        "refund",
        1,
        json!({}),
    );
    undo.action_output = Some(output(&reply).clone());
    let undone = client.call(&undo).await;
    assert_eq!(output(&undone)["refunded"], output(&reply)["charge_id"]);
    running.stop().await;
}
