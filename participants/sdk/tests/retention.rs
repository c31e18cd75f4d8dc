//! `saga_inbox` does not grow forever: records past the inbox retention are deleted by the
//! running participant, newer ones are kept and still answer repeated commands. On SQLite and
//! on PostgreSQL (with a schema of the participant's own).

mod common;

use std::time::Duration;

use chrono::Utc;
use common::*;
use saga_participant::sea_orm::ConnectionTrait;
use saga_participant::sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use saga_participant::{DEFAULT_INBOX_RETENTION, prune_inbox};
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread")]
async fn old_records_are_forgotten_and_recent_ones_still_deduplicate_on_sqlite() {
    old_records_are_forgotten_and_recent_ones_still_deduplicate(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn old_records_are_forgotten_and_recent_ones_still_deduplicate_on_postgres() {
    old_records_are_forgotten_and_recent_ones_still_deduplicate(
        TestDb::postgres(Some("testsvc")).await,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_backlog_is_pruned_in_chunks_on_sqlite() {
    a_long_backlog_is_pruned_in_chunks(TestDb::sqlite()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_backlog_is_pruned_in_chunks_on_postgres() {
    a_long_backlog_is_pruned_in_chunks(TestDb::postgres(Some("testsvc")).await).await;
}

/// Makes the records of `saga_id` look handled `age` ago.
async fn age(db: &TestDb, saga_id: Uuid, age: Duration) {
    let conn = db.connect().await;
    let at = Utc::now() - chrono::TimeDelta::from_std(age).unwrap();
    conn.execute(
        Query::update()
            .table(Alias::new("saga_inbox"))
            .value(Alias::new("handled_at"), at)
            .and_where(Expr::col(Alias::new("saga_id")).eq(saga_id.to_string())),
    )
    .await
    .unwrap();
    conn.close().await.unwrap();
}

async fn old_records_are_forgotten_and_recent_ones_still_deduplicate(db: TestDb) {
    let vhost = Vhost::new();
    let (old, recent) = (Uuid::new_v4(), Uuid::new_v4());
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;
    client.call(&charge(old)).await;
    let first = client.call(&charge(recent)).await;
    running.stop().await;

    // One record is a day past the retention, the other a day short of it.
    age(
        &db,
        old,
        DEFAULT_INBOX_RETENTION + Duration::from_secs(86_400),
    )
    .await;
    age(
        &db,
        recent,
        DEFAULT_INBOX_RETENTION - Duration::from_secs(86_400),
    )
    .await;

    // The participant prunes when it starts, then every few minutes.
    let running = Running::start(participant(), &vhost, &db, 8);
    let conn = db.connect().await;
    within("the old record is deleted", async {
        while !inbox(&conn, old).await.is_empty() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert_eq!(
        inbox(&conn, recent).await,
        [("execute".to_owned(), "success".to_owned())]
    );

    // The kept record still answers a repeated command, without running the handler again.
    let again = client.call(&retry(&charge(recent), 2)).await;
    assert_eq!(again.outcome, first.outcome);
    assert_eq!(effects(&conn, recent).await, vec![("charge".to_owned(), 1)]);
    running.stop().await;
}

async fn a_long_backlog_is_pruned_in_chunks(db: TestDb) {
    let conn = db.connect().await;
    saga_participant::migrate_sdk_tables(&conn).await.unwrap();
    let long_ago = Utc::now() - chrono::TimeDelta::days(90);
    // 12,000 old records (more than one statement deletes) and one recent.
    for chunk in 0..12 {
        let mut insert = Query::insert()
            .into_table(Alias::new("saga_inbox"))
            .columns(
                [
                    "saga_id",
                    "step",
                    "direction",
                    "action",
                    "message_id",
                    "attempt",
                    "outcome",
                    "handled_at",
                ]
                .map(Alias::new),
            )
            .to_owned();
        for i in 0..1000 {
            let handled_at = if chunk == 0 && i == 0 {
                Utc::now()
            } else {
                long_ago
            };
            insert.values_panic([
                Uuid::new_v4().to_string().into(),
                "charge-payment".into(),
                "execute".into(),
                "charge".into(),
                Uuid::new_v4().to_string().into(),
                1.into(),
                json!({"status": "success", "output": {}}).into(),
                handled_at.into(),
            ]);
        }
        conn.execute(&insert).await.unwrap();
    }
    let before = Utc::now() - chrono::TimeDelta::days(30);
    assert_eq!(prune_inbox(&conn, before).await.unwrap(), 11_999);
    assert_eq!(prune_inbox(&conn, before).await.unwrap(), 0);
    let left = conn
        .query_one(
            Query::select()
                .expr(Expr::col(Alias::new("saga_id")).count())
                .from(Alias::new("saga_inbox")),
        )
        .await
        .unwrap()
        .unwrap();
    assert_eq!(left.try_get_by_index::<i64>(0).unwrap(), 1);
}
