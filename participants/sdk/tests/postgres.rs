//! The same duties on PostgreSQL, with the participant's tables in a schema of its own.

mod common;

use common::*;
use saga_participant::sea_orm::{ConnectionTrait, DbBackend, Statement};
use saga_participant::{COMPENSATED_BEFORE_EXECUTED, Direction, Outcome};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn postgres_with_a_schema_of_its_own() {
    let vhost = Vhost::new();
    let db = TestDb::postgres(Some("testsvc")).await;
    let running = Running::start(participant(), &vhost, &db, 16);
    let mut client = Client::connect(&vhost).await;

    // Success, a duplicate, a retry.
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
    output(&first);
    assert_eq!(client.call(&cmd).await.outcome, first.outcome);
    assert_eq!(client.call(&retry(&cmd, 2)).await.outcome, first.outcome);

    // A business failure, rolled back.
    let declined = Uuid::new_v4();
    let decline = command(
        declined,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({ "decline": "no" }),
    );
    assert_eq!(
        client.call(&decline).await.outcome,
        Outcome::Failure {
            reason: "no".into()
        }
    );

    // A retryable error, then success.
    let flaky = Uuid::new_v4();
    let flaky_cmd = command(
        flaky,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({ "fail_before_attempt": 2 }),
    );
    assert!(matches!(
        client.call(&flaky_cmd).await.outcome,
        Outcome::RetryableError { .. }
    ));
    output(&client.call(&retry(&flaky_cmd, 2)).await);

    // A null compensation, then the late action refused.
    let early = Uuid::new_v4();
    let refund = command(
        early,
        "charge-payment",
        Direction::Compensate,
        "refund",
        1,
        json!({}),
    );
    output(&client.call(&refund).await);
    let late = command(
        early,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({}),
    );
    assert_eq!(
        client.call(&late).await.outcome,
        Outcome::Failure {
            reason: COMPENSATED_BEFORE_EXECUTED.into()
        }
    );

    // Concurrent copies of a slow command: one effect (the advisory lock serialises them).
    let raced = Uuid::new_v4();
    let slow = command(
        raced,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({ "sleep_ms": 200 }),
    );
    for _ in 0..4 {
        client.send(&slow).await;
    }
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(client.reply().await.outcome);
    }
    assert!(answers.windows(2).all(|w| w[0] == w[1]), "{answers:?}");

    let conn = db.connect().await;
    assert_eq!(
        effects(&conn, saga_id).await,
        vec![("charge".to_owned(), 1)]
    );
    assert_eq!(effects(&conn, declined).await, vec![]);
    assert_eq!(effects(&conn, flaky).await, vec![("charge".to_owned(), 2)]);
    assert_eq!(effects(&conn, early).await, vec![]);
    assert_eq!(effects(&conn, raced).await, vec![("charge".to_owned(), 1)]);

    // The tables live in the schema `testsvc`, not in `public`.
    let tables: Vec<(String, String)> = conn
        .query_all_raw(Statement::from_string(
            DbBackend::Postgres,
            "SELECT table_schema, table_name FROM information_schema.tables
             WHERE table_name IN ('saga_inbox', 'effects') ORDER BY table_name",
        ))
        .await
        .unwrap()
        .iter()
        .map(|r| {
            (
                r.try_get("", "table_schema").unwrap(),
                r.try_get("", "table_name").unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tables,
        vec![
            ("testsvc".to_owned(), "effects".to_owned()),
            ("testsvc".to_owned(), "saga_inbox".to_owned())
        ]
    );
    conn.close().await.ok();
    running.stop().await;
}
