//! The same duties on PostgreSQL, with the participant's tables in a schema of its own.

mod common;

use std::time::Duration;

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

/// Reads one number from the server's statistics of `saga_inbox` in the test's schema.
async fn inbox_statistic(conn: &saga_participant::sea_orm::DatabaseConnection, sql: &str) -> i64 {
    conn.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
        .await
        .unwrap()
        .and_then(|row| row.try_get::<Option<i64>>("", "n").unwrap())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_grown_inbox_is_read_by_its_key_before_it_has_statistics() {
    let vhost = Vhost::new();
    let db = TestDb::postgres(Some("testsvc")).await;
    let conn = db.connect().await;
    saga_participant::migrate_sdk_tables(&conn).await.unwrap();
    // Given an inbox of 20,000 records that the server has not analysed yet, as a new
    // participant's is in its first minutes
    conn.execute_unprepared(
        "INSERT INTO saga_inbox (saga_id, step, direction, action, message_id, attempt, outcome, handled_at)
         SELECT gen_random_uuid()::text, 'charge-payment', 'execute', 'charge',
                gen_random_uuid()::text, 1, '{\"status\":\"success\",\"output\":{}}', now()
         FROM generate_series(1, 20000)",
    )
    .await
    .unwrap();
    let running = Running::start(participant(), &vhost, &db, 64);
    let mut client = Client::connect(&vhost).await;

    // When 32 new commands come in one message
    let cmds: Vec<_> = (0..32).map(|_| charge(Uuid::new_v4())).collect();
    client.send_pack(&cmds.iter().collect::<Vec<_>>()).await;
    let mut answered = 0;
    while answered < cmds.len() {
        answered += client.packed_replies().await.len();
    }

    // Then their records were looked up through the primary key, at least one index scan per
    // (saga, step), not by reading the whole table (the server's statistics arrive within
    // seconds of a connection going idle)
    let key_scans = "SELECT sum(idx_scan)::int8 AS n FROM pg_stat_user_indexes
                     WHERE schemaname = 'testsvc' AND relname = 'saga_inbox'
                       AND indexrelname <> 'saga_inbox_handled_at'";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut scans = 0;
    while scans < 32 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        scans = inbox_statistic(&conn, key_scans).await;
    }
    let rows_read_by_scans = inbox_statistic(
        &conn,
        "SELECT seq_tup_read AS n FROM pg_stat_user_tables
         WHERE schemaname = 'testsvc' AND relname = 'saga_inbox'",
    )
    .await;
    assert!(
        scans >= 32,
        "{scans} index scans of saga_inbox's key for 32 commands; \
         {rows_read_by_scans} rows read by whole-table scans"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn processes_of_one_participant_starting_together_all_migrate() {
    for _ in 0..3 {
        // Given a new database and eight processes of one participant starting at once
        let db = TestDb::postgres(Some("testsvc")).await;
        let mut conns = Vec::new();
        for _ in 0..8 {
            conns.push(db.connect().await);
        }
        // When each creates the SDK's table and function
        let migrations = conns.iter().map(saga_participant::migrate_sdk_tables);
        let results = futures_util::future::join_all(migrations).await;
        // Then none fails, and the function is there for their batches
        for result in results {
            result.expect("a migration beside the others");
        }
        let found = conns[0]
            .query_one_raw(Statement::from_string(
                DbBackend::Postgres,
                "SELECT count(*) AS n FROM pg_proc WHERE proname = 'saga_sdk_lock_and_read'",
            ))
            .await
            .unwrap()
            .and_then(|row| row.try_get::<i64>("", "n").ok());
        assert_eq!(found, Some(1));
        for conn in conns {
            conn.close().await.ok();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_leaves_the_sdk_function_as_it_is() {
    let db = TestDb::postgres(Some("testsvc")).await;
    let conn = db.connect().await;
    let version =
        "SELECT CAST(xmin AS text) AS n FROM pg_proc WHERE proname = 'saga_sdk_lock_and_read'";
    let read = async |sql: &str| {
        conn.query_one_raw(Statement::from_string(DbBackend::Postgres, sql))
            .await
            .unwrap()
            .and_then(|row| row.try_get::<String>("", "n").ok())
    };
    // Given a participant that created its table and function
    saga_participant::migrate_sdk_tables(&conn).await.unwrap();
    let created = read(version).await.expect("the function is there");
    // When it starts again
    saga_participant::migrate_sdk_tables(&conn).await.unwrap();
    // Then the function's catalog row was not written again
    assert_eq!(read(version).await, Some(created));
    conn.close().await.ok();
}
