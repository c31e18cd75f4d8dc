//! The runtime against hostile input: saga data held to its size limit, operators settling a
//! step past the point of no return, a saga stored deeper than can be read back. In-process,
//! on SQLite in memory; no broker needed.

use orchestrator::runtime::{Runtime, RuntimeError, Work};
use orchestrator::store::{ListFilter, Store};
use orchestrator::timers::{Pass, StepTimeouts, fire_due};
use saga_engine::engine::command_message_id;
use saga_engine::{Definitions, Input, OperatorCommand, Outcome, Rejection};
use saga_schemas::amqp::COMMANDS_EXCHANGE;
use saga_schemas::limits::MAX_DATA_BYTES;
use saga_schemas::{Data, Direction, Outcome as Reply, SagaStatus};
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use serde_json::{Value, json};
use uuid::Uuid;

/// One retriable step: sent, it is past the point of no return.
const SHIP: &str = "
sagas:
  - name: ship
    steps:
      - name: ship
        participant: carrier
        action: ship
        kind: retriable
        timeout: 5s
";

async fn runtime() -> Runtime {
    let store = Store::connect("sqlite::memory:")
        .await
        .expect("an in-memory store");
    let definitions = Definitions::parse("sagas.yaml", SHIP).expect("valid definitions");
    Runtime::new(definitions, store).expect("a runtime")
}

fn object(value: Value) -> Data {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

/// Data of `bytes` bytes as compact JSON.
fn data_of(key: &str, bytes: usize) -> Data {
    let data = object(json!({ key: "" }));
    let overhead = serde_json::to_vec(&data).unwrap().len();
    object(json!({ key: "x".repeat(bytes - overhead) }))
}

/// The carrier's answer to attempt `attempt` of `ship`, as the replies consumer passes it on.
fn reply(saga_id: Uuid, attempt: u32, outcome: Reply) -> Work {
    Work {
        saga_id,
        input: Input::Reply {
            step: "ship".into(),
            direction: Direction::Execute,
            attempt,
            in_reply_to: command_message_id(saga_id, "ship", Direction::Execute, attempt),
            outcome,
        },
        inbox_id: Some(Uuid::new_v4()),
        fired_timer: None,
        trace: None,
    }
}

async fn handle(rt: &Runtime, work: Work) -> Result<Outcome, RuntimeError> {
    rt.handle(&[work]).await.pop().expect("one result")
}

async fn status(rt: &Runtime, saga_id: Uuid) -> SagaStatus {
    rt.store().load(saga_id).await.unwrap().unwrap().status
}

#[tokio::test]
async fn a_start_larger_than_the_data_limit_is_refused() {
    let rt = runtime().await;
    let error = rt
        .start("ship", data_of("parcel", MAX_DATA_BYTES + 1), None)
        .await
        .unwrap_err();
    assert!(matches!(error, RuntimeError::InvalidInput(_)), "{error:?}");
    assert!(
        error
            .to_string()
            .contains(&format!("the limit is {MAX_DATA_BYTES}")),
        "{error}"
    );
    assert!(
        rt.store()
            .list(&Default::default())
            .await
            .unwrap()
            .is_empty()
    );
    let at_the_limit = rt
        .start("ship", data_of("parcel", MAX_DATA_BYTES), None)
        .await
        .unwrap();
    assert!(at_the_limit.created);
}

#[tokio::test]
async fn an_output_that_would_take_the_saga_data_over_the_limit_is_not_applied() {
    let rt = runtime().await;
    let saga = rt
        .start("ship", data_of("parcel", MAX_DATA_BYTES - 100), None)
        .await
        .unwrap()
        .saga_id;
    let version = rt.store().load(saga).await.unwrap().unwrap().version;

    let oversized = reply(
        saga,
        1,
        Reply::Success {
            output: data_of("label", 200),
        },
    );
    let inbox_id = oversized.inbox_id.unwrap();
    let error = handle(&rt, oversized).await.unwrap_err();
    // Permanent: the replies consumer sets the reply aside with this reason.
    assert!(error.is_permanent(), "{error:?}");
    let reason = error.to_string();
    assert!(
        reason.contains("step `ship`")
            && reason.contains(&format!("the limit is {MAX_DATA_BYTES}")),
        "{reason}"
    );
    // Nothing of it was recorded, not even as handled.
    let state = rt.store().load(saga).await.unwrap().unwrap();
    assert_eq!(
        (state.version, state.status),
        (version, SagaStatus::Running)
    );
    assert!(!state.data.contains_key("label"));
    assert!(rt.store().seen(&[inbox_id]).await.unwrap().is_empty());

    // An operator cannot push it over either; an output that fits is taken.
    let error = rt
        .operate(
            saga,
            OperatorCommand::MarkCompleted {
                step: "ship".into(),
                output: data_of("label", 200),
            },
        )
        .await
        .unwrap_err();
    assert!(matches!(error, RuntimeError::InvalidInput(_)), "{error:?}");
    let fits = reply(
        saga,
        1,
        Reply::Success {
            output: object(json!({"label": "L-1"})),
        },
    );
    assert_eq!(handle(&rt, fits).await.unwrap(), Outcome::Applied);
    assert_eq!(status(&rt, saga).await, SagaStatus::Completed);
}

#[tokio::test]
async fn an_operator_settles_a_step_that_keeps_failing_past_the_point_of_no_return() {
    let rt = runtime().await;
    let saga = rt.start("ship", Data::new(), None).await.unwrap().saga_id;
    let refused = || Reply::RetryableError {
        error: "the carrier refuses the parcel".into(),
    };
    assert_eq!(
        handle(&rt, reply(saga, 1, refused())).await.unwrap(),
        Outcome::Applied
    );
    // Too late to abort; the operator sends the step again at once instead.
    assert_eq!(
        rt.operate(
            saga,
            OperatorCommand::Abort {
                reason: "stuck".into()
            }
        )
        .await
        .unwrap(),
        Outcome::Rejected(Rejection::PastPointOfNoReturn)
    );
    assert_eq!(
        rt.operate(saga, OperatorCommand::RetryStep).await.unwrap(),
        Outcome::Applied
    );
    let state = rt.store().load(saga).await.unwrap().unwrap();
    assert_eq!(state.step("ship").unwrap().action.in_flight, Some(2));
    assert_eq!(
        handle(&rt, reply(saga, 2, refused())).await.unwrap(),
        Outcome::Applied
    );
    // The cause never goes away: the operator ships it by hand.
    assert_eq!(
        rt.operate(
            saga,
            OperatorCommand::MarkCompleted {
                step: "ship".into(),
                output: object(json!({"tracking": "by hand"})),
            }
        )
        .await
        .unwrap(),
        Outcome::Applied
    );
    let state = rt.store().load(saga).await.unwrap().unwrap();
    assert_eq!(state.status, SagaStatus::Completed);
    assert_eq!(state.data["tracking"], "by hand");
    assert_eq!(rt.store().timer_count().await.unwrap(), 0, "no retry left");
}

/// `levels` arrays, one inside the other: deeper than serde_json reads back (128).
fn too_deep(levels: usize) -> String {
    format!("{}1{}", "[".repeat(levels), "]".repeat(levels))
}

#[tokio::test]
async fn a_saga_stored_deeper_than_can_be_read_is_set_aside_once_and_listed() {
    // Before the limits, a saga could be stored with data nested deeper than serde_json reads
    // back: written here straight into its rows, as no door accepts it any more.
    let rt = runtime().await;
    let saga = rt.start("ship", Data::new(), None).await.unwrap().saga_id;
    let other = rt.start("ship", Data::new(), None).await.unwrap().saga_id;
    let deep = too_deep(130);
    for (table, column, key, text) in [
        ("sagas", "state", "id", format!(r#"{{"data": {deep}}}"#)),
        (
            "saga_events",
            "payload",
            "saga_id",
            format!(r#"{{"input": {deep}}}"#),
        ),
    ] {
        rt.store()
            .connection()
            .execute(
                Query::update()
                    .table(Alias::new(table))
                    .value(Alias::new(column), text)
                    .and_where(Expr::col(Alias::new(key)).eq(saga)),
            )
            .await
            .unwrap();
    }
    // Read as after a restart: this runtime kept the states it committed.
    let rt = Runtime::new(
        Definitions::parse("sagas.yaml", SHIP).unwrap(),
        rt.store().clone(),
    )
    .unwrap();

    // Its step timeout is set aside, once, with why; the other saga's fires.
    let later = chrono::Utc::now() + chrono::TimeDelta::hours(1);
    let pass = fire_due(&rt, later, StepTimeouts::Fire).await;
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
    let items = rt.store().list_set_aside(10).await.unwrap();
    assert_eq!(items.len(), 1);
    assert_eq!(items[0].saga_id, saga);
    assert!(
        items[0].reason.contains("recursion limit exceeded"),
        "{}",
        items[0].reason
    );
    // Nothing of it is left to spin on: the next pass only has the other saga's new timeout.
    let pass = fire_due(&rt, later, StepTimeouts::Fire).await;
    assert!(
        matches!(
            pass,
            Pass::Idle
                | Pass::Handled {
                    set_aside: 0,
                    kept: 0,
                    ..
                }
        ),
        "{pass:?}"
    );
    assert_eq!(rt.store().list_set_aside(10).await.unwrap().len(), 1);

    // A reply for it can never be handled: set aside by the consumer, not requeued.
    let error = handle(
        &rt,
        reply(
            saga,
            1,
            Reply::Success {
                output: Data::new(),
            },
        ),
    )
    .await
    .unwrap_err();
    assert!(error.is_permanent(), "{error:?}");
    // Reading it says why; listing shows it with the others.
    assert!(rt.store().saga(saga).await.is_err());
    let mut listed: Vec<Uuid> = rt
        .store()
        .listing(&ListFilter {
            limit: 10,
            ..ListFilter::default()
        })
        .await
        .unwrap()
        .iter()
        .map(|row| row.id)
        .collect();
    listed.sort();
    let mut both = [other, saga];
    both.sort();
    assert_eq!(listed, both);
}

/// What leaves for `saga.events` follows `PublishEvents` (the terminal events unless told
/// otherwise); commands always leave, and the event log records everything either way.
#[tokio::test]
async fn only_the_chosen_events_are_published() {
    use orchestrator::runtime::PublishEvents;
    use saga_schemas::amqp::{COMMANDS_EXCHANGE, EVENTS_EXCHANGE};

    for (choice, expected) in [
        (
            Some(PublishEvents::All),
            vec![
                "ship.saga_started",
                "ship.command_sent",
                "ship.step_completed",
                "ship.saga_completed",
            ],
        ),
        (Some(PublishEvents::Terminal), vec!["ship.saga_completed"]),
        (Some(PublishEvents::None), vec![]),
        (None, vec!["ship.saga_completed"]),
    ] {
        let rt = match choice {
            Some(events) => runtime().await.publishing(events),
            None => runtime().await,
        };
        let saga_id = rt.start("ship", Data::new(), None).await.unwrap().saga_id;
        let done = Reply::Success {
            output: Data::new(),
        };
        handle(&rt, reply(saga_id, 1, done)).await.unwrap();
        assert_eq!(status(&rt, saga_id).await, SagaStatus::Completed);

        let rows = rt.store().outbox_batch(100).await.unwrap().rows;
        let events: Vec<&str> = rows
            .iter()
            .filter(|r| r.message.exchange == EVENTS_EXCHANGE)
            .map(|r| r.message.routing_key.as_str())
            .collect();
        assert_eq!(events, expected, "{choice:?}");
        let commands = rows
            .iter()
            .filter(|r| r.message.exchange == COMMANDS_EXCHANGE)
            .count();
        assert_eq!(
            commands, 1,
            "{choice:?}: the command is sent whatever is published"
        );
        let history = rt.store().history(saga_id).await.unwrap();
        assert!(history.len() >= 4, "{choice:?}: every event recorded");
    }
    assert_eq!("terminal".parse(), Ok(PublishEvents::Terminal));
    assert!("some".parse::<PublishEvents>().is_err());
}

/// Starts issued at once share transactions (group commit), yet each caller gets its own
/// answer: a key used by many concurrent requests starts one saga, which all of them are told;
/// the unkeyed ones each start their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_share_commits_and_each_gets_its_own_answer() {
    let rt = runtime().await;
    let mut requests = tokio::task::JoinSet::new();
    for i in 0..60 {
        let rt = rt.clone();
        let key = (i % 2 == 0).then(|| "the-same-key".to_owned());
        requests.spawn(async move { (key.is_some(), rt.start("ship", Data::new(), key).await) });
    }
    let (mut keyed, mut unkeyed) = (Vec::new(), Vec::new());
    while let Some(joined) = requests.join_next().await {
        let (is_keyed, started) = joined.unwrap();
        let started = started.expect("every start is answered");
        if is_keyed {
            keyed.push(started);
        } else {
            unkeyed.push(started);
        }
    }
    let winner = keyed[0].saga_id;
    assert!(keyed.iter().all(|s| s.saga_id == winner), "{keyed:?}");
    assert_eq!(keyed.iter().filter(|s| s.created).count(), 1, "{keyed:?}");
    assert!(unkeyed.iter().all(|s| s.created));
    let mut ids: Vec<Uuid> = unkeyed.iter().map(|s| s.saga_id).collect();
    ids.push(winner);
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 31, "one saga per unkeyed start, one for the key");
    for id in ids {
        assert_eq!(status(&rt, id).await, SagaStatus::Running);
        assert!(!rt.store().history(id).await.unwrap().is_empty());
    }
}

/// Two copies of one reply (a redelivery racing the first) handled at once, for many sagas:
/// they may land in one shared transaction, which then fails on the duplicate; each is then
/// committed alone, so every saga completes exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_inputs_for_one_saga_are_both_applied() {
    let rt = runtime().await;
    let mut sagas = Vec::new();
    for _ in 0..20 {
        sagas.push(rt.start("ship", Data::new(), None).await.unwrap().saga_id);
    }
    let mut inputs = tokio::task::JoinSet::new();
    for &saga_id in &sagas {
        let done = Reply::Success {
            output: Data::new(),
        };
        let (a, b) = (rt.clone(), rt.clone());
        inputs.spawn(async move { handle(&a, reply(saga_id, 1, done)).await });
        let done = Reply::Success {
            output: Data::new(),
        };
        inputs.spawn(async move { handle(&b, reply(saga_id, 1, done)).await });
    }
    let mut applied = 0;
    while let Some(joined) = inputs.join_next().await {
        match joined.unwrap().expect("handled") {
            Outcome::Ignored(_) => {}
            _ => applied += 1,
        }
    }
    assert_eq!(applied, 20, "each saga's reply applied once");
    for saga_id in sagas {
        assert_eq!(status(&rt, saga_id).await, SagaStatus::Completed);
        let history = rt.store().history(saga_id).await.unwrap();
        let completions = history
            .iter()
            .filter(|e| matches!(e.event, saga_schemas::SagaEvent::SagaCompleted))
            .count();
        assert_eq!(completions, 1);
    }
}

/// `pack` at the warehouse, then `ship` at the carrier.
const PACK_THEN_SHIP: &str = "
sagas:
  - name: ship
    steps:
      - { name: pack, participant: warehouse, action: pack, compensation: unpack, timeout: 5s }
      - { name: ship, participant: carrier, action: ship, kind: retriable, timeout: 5s }
";

/// The edited file: `pack` removed, `ship` moved to the participant renamed `courier`.
const SHIP_BY_COURIER: &str = "
sagas:
  - name: ship
    steps:
      - { name: ship, participant: courier, action: ship, kind: retriable, timeout: 5s }
";

/// Every unsent command's (saga, participant), oldest first.
async fn commands_sent(store: &Store) -> Vec<(Uuid, String)> {
    store
        .outbox_batch(1000)
        .await
        .unwrap()
        .rows
        .iter()
        .filter(|row| row.message.exchange == COMMANDS_EXCHANGE)
        .map(|row| (row.saga_id, row.message.routing_key.clone()))
        .collect()
}

#[tokio::test]
async fn a_saga_runs_to_its_end_on_the_version_it_started_with() {
    // Given a saga started on the first file, waiting for `pack`.
    let store = Store::connect("sqlite::memory:").await.unwrap();
    let first = Definitions::parse("sagas.yaml", PACK_THEN_SHIP).unwrap();
    let v1 = first.sagas[0].version.clone();
    let before = Runtime::open(first, store.clone()).await.unwrap();
    let old = before
        .start("ship", Data::new(), None)
        .await
        .unwrap()
        .saga_id;
    drop(before);

    // When the orchestrator restarts on the edited file and the warehouse answers.
    let edited = Definitions::parse("sagas.yaml", SHIP_BY_COURIER).unwrap();
    let rt = Runtime::open(edited, store.clone()).await.unwrap();
    let new = rt.start("ship", Data::new(), None).await.unwrap().saga_id;
    let packed = Work {
        saga_id: old,
        input: Input::Reply {
            step: "pack".into(),
            direction: Direction::Execute,
            attempt: 1,
            in_reply_to: command_message_id(old, "pack", Direction::Execute, 1),
            outcome: Reply::Success {
                output: Data::new(),
            },
        },
        inbox_id: Some(Uuid::new_v4()),
        fired_timer: None,
        trace: None,
    };
    assert_eq!(handle(&rt, packed).await.unwrap(), Outcome::Applied);

    // Then the old saga goes on to the carrier, the new one starts at the courier.
    let sent = commands_sent(&store).await;
    let to = |saga: Uuid| -> Vec<&str> {
        sent.iter()
            .filter(|(s, _)| *s == saga)
            .map(|(_, key)| key.as_str())
            .collect()
    };
    assert_eq!(to(old), ["warehouse", "carrier"], "{sent:?}");
    assert_eq!(to(new), ["courier"], "{sent:?}");
    let state = store.load(old).await.unwrap().unwrap();
    assert_eq!(state.definition_version, v1);
    assert_eq!(
        rt.participants(),
        ["carrier", "courier", "warehouse"],
        "every participant a saga may still need"
    );
    assert!(rt.definition_of("ship", &v1).is_some());
}

/// Two orchestrators on one database: a state one of them kept from its own commit is stale once
/// the other advanced the saga, and nothing is decided on it.
#[tokio::test]
async fn a_state_kept_before_another_orchestrator_advanced_the_saga_is_never_decided_on() {
    let a = runtime().await;
    let b = Runtime::new(
        Definitions::parse("sagas.yaml", SHIP).unwrap(),
        a.store().clone(),
    )
    .unwrap();
    let refused = || Reply::RetryableError {
        error: "the carrier refuses the parcel".into(),
    };
    let shipped = || Reply::Success {
        output: object(json!({"tracking": "T-1"})),
    };
    // Both started here, so both states are kept here at attempt 1.
    let retried = a.start("ship", Data::new(), None).await.unwrap().saga_id;
    let completed = a.start("ship", Data::new(), None).await.unwrap().saga_id;
    let other = a.start("ship", Data::new(), None).await.unwrap().saga_id;

    // The other orchestrator: attempt 1 of `retried` refused and sent again (attempt 2), and
    // `completed` completed.
    assert_eq!(
        handle(&b, reply(retried, 1, refused())).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        b.operate(retried, OperatorCommand::RetryStep)
            .await
            .unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        handle(&b, reply(completed, 1, shipped())).await.unwrap(),
        Outcome::Applied
    );
    let completed_version = a.store().load(completed).await.unwrap().unwrap().version;

    // Here, in one batch: the answer to attempt 2, which the kept state never heard of, is
    // taken on the stored state; a second copy of the answer that completed the saga is a
    // duplicate, not a second completion; and a saga nobody else touched goes on as usual.
    let results = a
        .handle(&[
            reply(retried, 2, shipped()),
            reply(completed, 1, shipped()),
            reply(other, 1, shipped()),
        ])
        .await;
    let outcomes: Vec<Outcome> = results.into_iter().map(Result::unwrap).collect();
    assert_eq!(outcomes[0], Outcome::Applied);
    assert!(matches!(outcomes[1], Outcome::Ignored(_)), "{outcomes:?}");
    assert_eq!(outcomes[2], Outcome::Applied);
    assert_eq!(status(&a, retried).await, SagaStatus::Completed);
    assert_eq!(status(&a, other).await, SagaStatus::Completed);
    let state = a.store().load(completed).await.unwrap().unwrap();
    assert_eq!(
        (state.status, state.version),
        (SagaStatus::Completed, completed_version)
    );

    // And alone (the path of one reply at a time).
    let alone = a.start("ship", Data::new(), None).await.unwrap().saga_id;
    assert_eq!(
        handle(&b, reply(alone, 1, refused())).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        b.operate(alone, OperatorCommand::RetryStep).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(
        handle(&a, reply(alone, 2, shipped())).await.unwrap(),
        Outcome::Applied
    );
    assert_eq!(status(&a, alone).await, SagaStatus::Completed);
}
