//! The timer worker against poison: timers that can never fire are set aside (deleted,
//! recorded with the reason) and do not hold up the others; and step timeouts held back while
//! replies wait unread. In-process, on SQLite in memory;
//! no broker needed (the outbox just fills up).

use chrono::{Duration, Utc};
use orchestrator::runtime::{Runtime, RuntimeError, Work};
use orchestrator::store::{RecordedEvent, SetAsideKind, Store, StoreError};
use orchestrator::timers::{Pass, StepTimeouts, fire_due};
use saga_engine::engine::command_message_id;
use saga_engine::{Definitions, Input};
use saga_schemas::{Direction, Outcome as Reply};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use sea_orm::{ConnectionTrait, DbErr};
use serde_json::json;
use uuid::Uuid;

const GOOD: &str = "
sagas:
  - name: good
    steps:
      - name: work
        participant: worker
        action: work
        compensation: undo
        timeout: 2s
";

const BOTH: &str = "
sagas:
  - name: good
    steps:
      - name: work
        participant: worker
        action: work
        compensation: undo
        timeout: 2s
  - name: gone
    steps:
      - name: work
        participant: worker
        action: work
        compensation: undo
        timeout: 1s
";

fn runtime(store: &Store, yaml: &str) -> Runtime {
    let definitions = Definitions::parse("sagas.yaml", yaml).expect("valid definitions");
    Runtime::new(definitions, store.clone()).expect("a runtime")
}

async fn memory_store() -> Store {
    Store::connect("sqlite::memory:")
        .await
        .expect("an in-memory store")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_of_a_saga_whose_definition_is_gone_do_not_block_the_others() {
    let store = memory_store().await;
    // Sagas started under the old definitions: 300 of `gone`, then one of `good`. Their step
    // timeouts sort in that order (1 s before 2 s), so the 300 come first, beyond one batch.
    let before = runtime(&store, BOTH);
    let mut gone = Vec::new();
    for _ in 0..300 {
        gone.push(
            before
                .start("gone", Default::default(), None)
                .await
                .unwrap()
                .saga_id,
        );
    }
    let good = before
        .start("good", Default::default(), None)
        .await
        .unwrap()
        .saga_id;
    assert_eq!(store.timer_count().await.unwrap(), 301);

    // Redeployed without `gone`. Every timer is due an hour from now.
    let after = runtime(&store, GOOD);
    let later = Utc::now() + Duration::hours(1);
    let (mut fired, mut set_aside) = (0, 0);
    // Two passes at most: 256 set aside, then 44 and the good one (which, an hour on, may
    // time out again in a later pass: stop once it fired).
    for _ in 0..5 {
        if fired > 0 {
            break;
        }
        match fire_due(&after, later, StepTimeouts::Fire).await {
            Pass::Idle => break,
            Pass::Handled {
                fired: f,
                set_aside: s,
                kept,
            } => {
                assert_eq!(kept, 0, "nothing failed for a passing reason");
                fired += f;
                set_aside += s;
            }
            Pass::Unavailable(error) => panic!("the store is there: {error}"),
        }
    }
    assert_eq!((fired, set_aside), (1, 300));

    // The good saga's timeout fired: it asked again (attempt 2).
    let history = store.history(good).await.unwrap();
    assert!(
        history
            .iter()
            .any(|e| e.event.kind() == "attempt_timed_out"),
        "{history:#?}"
    );
    // Each poison timer is set aside once, with its reason, and no longer scheduled.
    let items = store.list_set_aside(500).await.unwrap();
    assert_eq!(items.len(), 300);
    assert!(items.iter().all(|i| i.kind == SetAsideKind::Timer));
    assert!(
        items[0].reason.contains("no longer defined"),
        "{}",
        items[0].reason
    );
    assert_eq!(items[0].item["key"], "timeout/work/execute/1");
    let mut ids: Vec<_> = items.iter().map(|i| i.saga_id).collect();
    ids.sort();
    gone.sort();
    assert_eq!(ids, gone);
    assert!(items.windows(2).all(|w| w[0].id > w[1].id), "newest first");
    assert_eq!(
        store.set_aside_counts().await.unwrap(),
        [(SetAsideKind::Timer, 300)]
    );
    assert_eq!(
        store.timer_count().await.unwrap(),
        1,
        "only the good saga's next timeout is left"
    );
    assert!(matches!(
        fire_due(&after, Utc::now(), StepTimeouts::Fire).await,
        Pass::Idle
    ));
}

#[tokio::test]
async fn a_timer_that_does_not_parse_is_set_aside() {
    let store = memory_store().await;
    let rt = runtime(&store, GOOD);
    let saga = rt
        .start("good", Default::default(), None)
        .await
        .unwrap()
        .saga_id;
    store
        .connection()
        .execute_unprepared(r#"UPDATE "timers" SET "timer" = 'not json'"#)
        .await
        .unwrap();
    let pass = fire_due(&rt, Utc::now() + Duration::hours(1), StepTimeouts::Fire).await;
    assert!(matches!(pass, Pass::Idle), "{pass:?}");
    let items = store.list_set_aside(10).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].saga_id, saga);
    assert_eq!(items[0].item["timer_text"], "not json");
    assert!(
        items[0].reason.contains("does not parse"),
        "{}",
        items[0].reason
    );
    assert_eq!(store.timer_count().await.unwrap(), 0);
}

#[tokio::test]
async fn replies_are_set_aside_too_and_listed_newest_first() {
    let store = memory_store().await;
    let saga = uuid::Uuid::new_v4();
    for n in 0..3 {
        store
            .set_aside_reply(saga, &json!({"n": n}), "no such saga", Utc::now())
            .await
            .unwrap();
    }
    let items = store.list_set_aside(2).await.unwrap();
    assert_eq!(
        items
            .iter()
            .map(|i| i.item["n"].clone())
            .collect::<Vec<_>>(),
        [2, 1]
    );
    assert_eq!(items[0].kind, SetAsideKind::Reply);
}

#[test]
fn permanent_and_passing_errors() {
    let corrupt = || StoreError::Corrupt("state of saga x: expected value".into());
    let unavailable = || StoreError::Db(DbErr::Custom("connection refused".into()));
    assert!(corrupt().is_permanent());
    assert!(!unavailable().is_permanent());
    assert!(!StoreError::Conflict.is_permanent());
    assert!(RuntimeError::Store(corrupt()).is_permanent());
    assert!(!RuntimeError::Store(unavailable()).is_permanent());
    assert!(
        RuntimeError::DefinitionGone {
            saga_id: uuid::Uuid::nil(),
            name: "gone".into()
        }
        .is_permanent()
    );
    assert!(!RuntimeError::Contended.is_permanent());
}

#[tokio::test]
async fn a_saga_that_cannot_be_read_has_its_timers_set_aside() {
    let store = memory_store().await;
    let rt = runtime(&store, GOOD);
    let readable = rt
        .start("good", Default::default(), None)
        .await
        .unwrap()
        .saga_id;
    let unreadable = rt
        .start("good", Default::default(), None)
        .await
        .unwrap()
        .saga_id;
    let db = store.connection();
    // Both snapshots are broken; only `unreadable` has its log broken too.
    db.execute_unprepared(r#"UPDATE "sagas" SET "state" = '{not json'"#)
        .await
        .unwrap();
    db.execute(
        Query::update()
            .table(Alias::new("saga_events"))
            .value(Alias::new("payload"), "[]")
            .and_where(Expr::col(Alias::new("saga_id")).eq(unreadable)),
    )
    .await
    .unwrap();
    // Read as after a restart: this runtime kept the states it committed.
    let rt = runtime(&store, GOOD);

    let pass = fire_due(&rt, Utc::now() + Duration::hours(1), StepTimeouts::Fire).await;
    assert!(
        matches!(
            pass,
            Pass::Handled {
                fired: 1,
                set_aside: 1,
                kept: 0
            }
        ),
        "{pass:?}"
    );
    let items = store.list_set_aside(10).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].saga_id, unreadable);
    assert!(items[0].reason.contains("corrupt"), "{}", items[0].reason);
    // The other one was rebuilt from its log and timed out as usual.
    let history = store.history(readable).await.unwrap();
    assert!(
        history
            .iter()
            .any(|e| e.event.kind() == "attempt_timed_out")
    );
}

/// The answer to attempt 1 of `good`'s step, as the replies consumer passes it on.
fn retryable_error(saga_id: Uuid) -> Work {
    Work {
        saga_id,
        input: Input::Reply {
            step: "work".into(),
            direction: Direction::Execute,
            attempt: 1,
            in_reply_to: command_message_id(saga_id, "work", Direction::Execute, 1),
            outcome: Reply::RetryableError {
                error: "the ledger is busy".into(),
            },
        },
        inbox_id: Some(Uuid::new_v4()),
        fired_timer: None,
        trace: None,
    }
}

fn timed_out(history: &[RecordedEvent]) -> usize {
    history
        .iter()
        .filter(|e| e.event.kind() == "attempt_timed_out")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_replies_wait_unread_step_timeouts_wait_and_the_other_timers_fire() {
    let store = memory_store().await;
    let rt = runtime(&store, GOOD);
    // One saga waits on its step's reply (a step timeout), the other on a retry's backoff.
    let silent = rt.start("good", Default::default(), None).await.unwrap();
    let retrying = rt.start("good", Default::default(), None).await.unwrap();
    let replied = rt.handle(&[retryable_error(retrying.saga_id)]).await;
    assert!(replied[0].is_ok(), "{replied:?}");
    let later = Utc::now() + Duration::hours(1);

    // Replies wait unread: the retry fires (attempt 2 is sent), no step timeout does.
    let pass = fire_due(&rt, later, StepTimeouts::Wait).await;
    assert!(
        matches!(
            pass,
            Pass::Handled {
                fired: 1,
                set_aside: 0,
                kept: 0
            }
        ),
        "{pass:?}"
    );
    let state = store.load(retrying.saga_id).await.unwrap().unwrap();
    assert_eq!(state.step("work").unwrap().action.in_flight, Some(2));
    assert!(matches!(
        fire_due(&rt, later, StepTimeouts::Wait).await,
        Pass::Idle
    ));
    assert_eq!(timed_out(&store.history(silent.saga_id).await.unwrap()), 0);

    // Read: both steps' timeouts fire, the silent saga's first attempt and the retry.
    let pass = fire_due(&rt, later, StepTimeouts::Fire).await;
    assert!(
        matches!(
            pass,
            Pass::Handled {
                fired: 2,
                set_aside: 0,
                kept: 0
            }
        ),
        "{pass:?}"
    );
    for saga in [silent.saga_id, retrying.saga_id] {
        assert_eq!(timed_out(&store.history(saga).await.unwrap()), 1);
    }
}
