//! The store against both backends: SQLite (a temp file per test) and PostgreSQL (a database
//! of its own per test, created through `DATABASE_URL`). Every scenario runs on both.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use orchestrator::retention::{DEFAULT_INBOX_RETENTION, prune_inbox};
use orchestrator::store::{
    Commit, CommitError, ListFilter, Pruned, SagaRow, SetAsideKind, Store, StoreError,
};
use saga_amqp::trace::TraceContext;
use saga_engine::definition::{DEFAULT_RETRY, RetryPolicy};
use saga_engine::engine::command_message_id;
use saga_engine::{
    Decision, Input, OperatorCommand, SagaDefinition, SagaState, StepDefinition, StepKind,
    TimerChange, TimerKind, decide,
};
use saga_schemas::amqp::OutgoingMessage;
use saga_schemas::limits::{MAX_DATA_BYTES, MAX_DEPTH};
use saga_schemas::{Data, Direction, Outcome as Reply, SagaEvent, SagaStatus, StepCommand};
use sea_orm::ConnectionTrait;
use sea_orm::sea_query::{Alias, Expr, ExprTrait, Query};
use serde_json::{Value, json};
use uuid::Uuid;

// --- databases ------------------------------------------------------------------------------

enum Kind {
    Sqlite(PathBuf),
    Postgres { admin_url: String, name: String },
}

/// A database of the test's own, removed when dropped (even when the test panics).
struct TestDb {
    url: String,
    kind: Kind,
}

impl TestDb {
    fn sqlite() -> TestDb {
        let path = std::env::temp_dir().join(format!("saga-store-{}.db", Uuid::new_v4()));
        TestDb {
            url: format!("sqlite://{}?mode=rwc", path.display()),
            kind: Kind::Sqlite(path),
        }
    }

    async fn postgres() -> TestDb {
        let admin_url = std::env::var("DATABASE_URL").unwrap_or_else(|_| {
            panic!(
                "the PostgreSQL store tests need a server: set DATABASE_URL, e.g. \
                 DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres (each test creates \
                 and drops a database of its own)"
            )
        });
        let name = format!("t_{}", Uuid::new_v4().simple());
        let admin = sea_orm::Database::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL={admin_url}: {e}"));
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        admin.close().await.ok();
        TestDb {
            url: with_database(&admin_url, &name),
            kind: Kind::Postgres { admin_url, name },
        }
    }

    fn is_postgres(&self) -> bool {
        matches!(self.kind, Kind::Postgres { .. })
    }

    async fn store(&self) -> Store {
        Store::connect(&self.url)
            .await
            .expect("connect and migrate")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.kind {
            Kind::Sqlite(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
            }
            Kind::Postgres { admin_url, name } => {
                let (admin_url, name) = (admin_url.clone(), name.clone());
                // Drop runs inside the test's runtime: use a runtime of its own on a thread.
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(async {
                        if let Ok(admin) = sea_orm::Database::connect(&admin_url).await {
                            let _ = admin
                                .execute_unprepared(&format!(
                                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                                ))
                                .await;
                            admin.close().await.ok();
                        }
                    });
                })
                .join();
            }
        }
    }
}

/// `url` with its database name replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let base = match base[authority_start..].find('/') {
        Some(i) => &base[..authority_start + i],
        None => base,
    };
    match query {
        Some(query) => format!("{base}/{name}?{query}"),
        None => format!("{base}/{name}"),
    }
}

/// Runs each scenario on both backends: `<scenario>::sqlite` and `<scenario>::postgres`.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$scenario(super::TestDb::sqlite()).await
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$scenario(super::TestDb::postgres().await).await
            }
        }
    )*};
}

on_both_backends!(
    migrations_are_idempotent,
    commit_then_load_gives_the_state_back,
    the_start_trace_context_is_kept_with_its_state,
    a_stale_commit_conflicts_and_rolls_back_everything,
    group_commit_writes_many_sagas_at_once,
    a_batch_past_the_bound_values_of_one_statement_is_written_whole,
    a_batch_is_written_alike_whether_its_shape_is_new_or_came_before,
    an_idempotency_key_starts_one_saga,
    an_inbox_id_is_recorded_once,
    a_commit_that_writes_nothing_succeeds,
    timers_are_scheduled_cancelled_and_fired,
    outbox_rows_are_batched_and_marked_sent,
    outbox_prunes_go_no_further_than_the_id_given,
    outbox_batches_claim_rows,
    a_commit_gives_its_outbox_ids_and_marks_rows_sent,
    list_pages_newest_first_with_filters,
    statuses_are_counted_and_keys_searched,
    the_read_model_is_rebuilt_from_the_events,
    concurrent_writers_never_both_advance_a_saga,
    a_timer_is_set_aside_once_and_only_as_read,
    an_unreadable_snapshot_is_rebuilt_from_the_log,
    the_deepest_and_largest_data_accepted_is_read_back_unchanged,
    one_unreadable_saga_does_not_break_the_listing,
    the_inbox_forgets_replies_after_its_retention,
    definition_versions_are_kept_listed_and_pruned,
    sagas_are_counted_by_name_in_a_status,
);

// --- sagas ----------------------------------------------------------------------------------

fn step(name: &str, kind: StepKind) -> StepDefinition {
    StepDefinition {
        name: name.to_owned(),
        participant: format!("{name}-service"),
        action: format!("do_{name}"),
        compensation: (kind == StepKind::Compensatable).then(|| format!("undo_{name}")),
        kind,
        timeout: Duration::from_secs(5),
        expiry: (kind != StepKind::Retriable).then_some(Duration::from_secs(60)),
        retry: DEFAULT_RETRY,
        compensation_retry: RetryPolicy {
            max_attempts: 2,
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(4),
        },
        group: None,
        outputs: None,
    }
}

/// order (compensatable), stock (compensatable), pay (pivot), ship (retriable).
fn checkout() -> SagaDefinition {
    SagaDefinition {
        name: "checkout".into(),
        version: "v1".into(),
        deadline: None,
        input_schema: None,
        steps: vec![
            step("order", StepKind::Compensatable),
            step("stock", StepKind::Compensatable),
            step("pay", StepKind::Pivot),
            step("ship", StepKind::Retriable),
        ],
    }
}

/// One compensatable step: completes or is compensated on its first reply.
fn refund() -> SagaDefinition {
    SagaDefinition {
        name: "refund".into(),
        version: "v7".into(),
        deadline: Some(Duration::from_secs(60)),
        input_schema: None,
        steps: vec![step("refund", StepKind::Compensatable)],
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
}

fn secs(n: i64) -> chrono::TimeDelta {
    chrono::TimeDelta::seconds(n)
}

fn object(value: Value) -> Data {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

fn start_input(saga_id: Uuid) -> Input {
    Input::Start {
        saga_id,
        input: object(json!({"customer": "ada"})),
        business_key: Some(format!("order-{}", &saga_id.simple().to_string()[..8])),
    }
}

/// The participant's answer to the first attempt of `step` of saga `saga_id`.
fn answer(saga_id: Uuid, step: &str, outcome: Reply) -> Input {
    Input::Reply {
        step: step.into(),
        direction: Direction::Execute,
        attempt: 1,
        in_reply_to: command_message_id(saga_id, step, Direction::Execute, 1),
        outcome,
    }
}

fn ok(saga_id: Uuid, step: &str) -> Input {
    answer(
        saga_id,
        step,
        Reply::Success {
            output: object(json!({ format!("{step}_id"): 7 })),
        },
    )
}

fn fail(saga_id: Uuid, step: &str) -> Input {
    answer(
        saga_id,
        step,
        Reply::Failure {
            reason: "declined".into(),
        },
    )
}

/// What the runtime would commit for `decision`, made on `before`.
fn commit_of(
    def: &SagaDefinition,
    saga_id: Uuid,
    before: Option<&SagaState>,
    decision: &Decision,
    now: DateTime<Utc>,
) -> Commit {
    Commit {
        expected_version: before.map_or(0, |s| s.version),
        events: decision.events.clone(),
        state: decision.state.clone(),
        outbox: decision
            .commands
            .iter()
            .map(|c| {
                let (_, step) = def.step(&c.step).expect("a step of the definition");
                OutgoingMessage::command(c, &step.participant, "saga.replies", None)
            })
            .collect(),
        timers: decision.timers.clone(),
        ..Commit::empty(saga_id, now)
    }
}

/// Decides `input` on the stored state and commits it; returns the new state.
async fn apply(
    store: &Store,
    def: &SagaDefinition,
    saga_id: Uuid,
    input: Input,
    now: DateTime<Utc>,
) -> SagaState {
    let before = store.load(saga_id).await.unwrap();
    let decision = decide(def, before.as_ref(), &input, now);
    let commit = commit_of(def, saga_id, before.as_ref(), &decision, now);
    store.commit(&[commit]).await.unwrap();
    decision.state.expect("the saga exists")
}

/// For each saga of `ids`, the commit of its `order` step's success, each reply with an inbox id.
fn orders_done(
    def: &SagaDefinition,
    ids: &[Uuid],
    states: &HashMap<Uuid, SagaState>,
    now: DateTime<Utc>,
) -> Vec<Commit> {
    ids.iter()
        .map(|id| {
            let decision = decide(def, Some(&states[id]), &ok(*id, "order"), now);
            Commit {
                inbox_id: Some(Uuid::new_v4()),
                ..commit_of(def, *id, Some(&states[id]), &decision, now)
            }
        })
        .collect()
}

/// The commit that starts a saga (not yet written).
fn start_commit(def: &SagaDefinition, saga_id: Uuid, now: DateTime<Utc>) -> Commit {
    let decision = decide(def, None, &start_input(saga_id), now);
    commit_of(def, saga_id, None, &decision, now)
}

async fn start(store: &Store, def: &SagaDefinition, now: DateTime<Utc>) -> Uuid {
    let saga_id = Uuid::new_v4();
    store
        .commit(&[start_commit(def, saga_id, now)])
        .await
        .unwrap();
    saga_id
}

fn expect_err(result: Result<Vec<i64>, CommitError>) -> (Option<usize>, StoreError) {
    match result {
        Ok(ids) => panic!("expected the commit to fail, it wrote outbox rows {ids:?}"),
        Err(CommitError { index, error }) => (index, error),
    }
}

fn all(limit: u64) -> ListFilter {
    ListFilter {
        limit,
        ..ListFilter::default()
    }
}

// --- scenarios ------------------------------------------------------------------------------

async fn migrations_are_idempotent(db: TestDb) {
    let first = db.store().await;
    let expected = if db.is_postgres() {
        "postgres"
    } else {
        "sqlite"
    };
    assert_eq!(first.backend_name(), expected);
    first.ping().await.unwrap();
    let saga_id = start(&first, &checkout(), t0()).await;

    // A second process (or a restart) migrates again: nothing changes, nothing is lost.
    let second = db.store().await;
    second.ping().await.unwrap();
    assert_eq!(
        second.load(saga_id).await.unwrap(),
        first.load(saga_id).await.unwrap()
    );
    assert!(second.load(saga_id).await.unwrap().is_some());
    drop(second);
    let third = db.store().await;
    assert_eq!(third.history(saga_id).await.unwrap().len(), 2);
}

async fn commit_then_load_gives_the_state_back(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let saga_id = Uuid::new_v4();
    let decision = decide(&def, None, &start_input(saga_id), t0());
    let written = store
        .commit(&[Commit {
            idempotency_key: Some("request-1".into()),
            ..commit_of(&def, saga_id, None, &decision, t0())
        }])
        .await
        .unwrap();
    assert_eq!(written.len(), 1, "one command to send");
    let started = decision.state.clone().unwrap();
    assert_eq!(store.load(saga_id).await.unwrap().as_ref(), Some(&started));
    assert_eq!(store.load(Uuid::new_v4()).await.unwrap(), None);

    let row = store
        .saga(saga_id)
        .await
        .unwrap()
        .expect("the read model row");
    assert_eq!(
        row,
        SagaRow {
            id: saga_id,
            name: "checkout".into(),
            status: SagaStatus::Running,
            business_key: started.business_key.clone(),
            idempotency_key: Some("request-1".into()),
            definition_version: "v1".into(),
            current_step: Some("order".into()),
            data: object(json!({"customer": "ada"})),
            state: started.clone(),
            version: 2,
            created_at: t0(),
            updated_at: t0(),
        }
    );
    let history = store.history(saga_id).await.unwrap();
    assert_eq!(
        history.iter().map(|e| e.seq).collect::<Vec<_>>(),
        [1, 2],
        "seq from 1, without gaps"
    );
    assert_eq!(history[0].event, decision.events[0]);
    assert_eq!(history[1].recorded_at, t0());
    assert_eq!(store.outbox_backlog().await.unwrap(), 1);
    assert_eq!(store.timer_count().await.unwrap(), 1, "the step timeout");

    // The next step, a few seconds later.
    let later = t0() + secs(3);
    let state = apply(&store, &def, saga_id, ok(saga_id, "order"), later).await;
    assert_eq!(store.load(saga_id).await.unwrap(), Some(state.clone()));
    let row = store.saga(saga_id).await.unwrap().unwrap();
    assert_eq!(row.version, state.version);
    assert_eq!(row.current_step.as_deref(), Some("stock"));
    assert_eq!(row.data["order_id"], 7);
    assert_eq!((row.created_at, row.updated_at), (t0(), later));
    assert_eq!(row.idempotency_key.as_deref(), Some("request-1"), "kept");
    assert_eq!(
        store.history(saga_id).await.unwrap().len() as u64,
        state.version
    );
    assert_eq!(store.outbox_backlog().await.unwrap(), 2);
    assert_eq!(
        store.timer_count().await.unwrap(),
        1,
        "order's timeout cancelled, stock's scheduled"
    );
    let many = store.load_many(&[saga_id, Uuid::new_v4()]).await.unwrap();
    assert_eq!(many.len(), 1);
    assert_eq!(many[&saga_id], state);
}

async fn the_start_trace_context_is_kept_with_its_state(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let context = |state: Option<&str>| TraceContext {
        parent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        state: state.map(str::to_owned),
    };
    let (vendor, plain, untraced) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for (saga_id, trace) in [
        (
            vendor,
            Some(context(Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"))),
        ),
        (plain, Some(context(None))),
        (untraced, None),
    ] {
        store
            .commit(&[Commit {
                trace,
                ..start_commit(&def, saga_id, t0())
            }])
            .await
            .unwrap();
    }
    // A later commit that names another context does not replace the start's.
    let before = store.load(vendor).await.unwrap();
    let decision = decide(&def, before.as_ref(), &ok(vendor, "order"), t0() + secs(1));
    store
        .commit(&[Commit {
            trace: Some(context(Some("other=1"))),
            ..commit_of(&def, vendor, before.as_ref(), &decision, t0() + secs(1))
        }])
        .await
        .unwrap();

    let parents = store
        .trace_parents(&[vendor, plain, untraced, Uuid::new_v4()])
        .await
        .unwrap();
    assert_eq!(
        parents,
        HashMap::from([
            (
                vendor,
                context(Some("congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"))
            ),
            (plain, context(None)),
        ])
    );
}

async fn a_stale_commit_conflicts_and_rolls_back_everything(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let saga_id = start(&store, &def, t0()).await;
    let loaded = store.load(saga_id).await.unwrap().unwrap();

    // Two orchestrators decide on the same version.
    let winner = decide(&def, Some(&loaded), &ok(saga_id, "order"), t0() + secs(1));
    let loser = decide(&def, Some(&loaded), &fail(saga_id, "order"), t0() + secs(2));
    store
        .commit(&[commit_of(
            &def,
            saga_id,
            Some(&loaded),
            &winner,
            t0() + secs(1),
        )])
        .await
        .unwrap();
    let row_before = store.saga(saga_id).await.unwrap();
    let backlog = store.outbox_backlog().await.unwrap();
    let timers = store.timer_count().await.unwrap();

    let reply_id = Uuid::new_v4();
    let stale = Commit {
        inbox_id: Some(reply_id),
        fired_timer: Some("timeout/stock/execute/1".into()),
        ..commit_of(&def, saga_id, Some(&loaded), &loser, t0() + secs(2))
    };
    assert!(!stale.outbox.is_empty() || !stale.timers.is_empty());
    let (index, error) = expect_err(store.commit(std::slice::from_ref(&stale)).await);
    assert_eq!(index, Some(0));
    assert!(matches!(error, StoreError::Conflict), "{error:?}");

    assert_eq!(
        store.saga(saga_id).await.unwrap(),
        row_before,
        "read model untouched"
    );
    assert_eq!(
        store.outbox_backlog().await.unwrap(),
        backlog,
        "no outbox row"
    );
    assert_eq!(
        store.timer_count().await.unwrap(),
        timers,
        "timers untouched"
    );
    assert!(
        store.seen(&[reply_id]).await.unwrap().is_empty(),
        "no inbox row"
    );
    assert_eq!(
        store.history(saga_id).await.unwrap().len() as u64,
        winner.state.as_ref().unwrap().version
    );

    // In a batch, the stale commit takes the good ones down with it, and is named.
    let other = Uuid::new_v4();
    let good = start_commit(&def, other, t0());
    let (index, error) = expect_err(store.commit(&[good.clone(), stale]).await);
    assert_eq!(index, Some(1));
    assert!(matches!(error, StoreError::Conflict), "{error:?}");
    assert_eq!(store.load(other).await.unwrap(), None, "rolled back");
    assert!(store.history(other).await.unwrap().is_empty());
    assert_eq!(store.outbox_backlog().await.unwrap(), backlog);
    // Retried alone, the good one goes through.
    assert_eq!(store.commit(&[good]).await.unwrap().len(), 1);

    // A commit must agree with itself.
    let loaded = store.load(other).await.unwrap().unwrap();
    let mut bogus = commit_of(
        &def,
        other,
        Some(&loaded),
        &decide(&def, Some(&loaded), &ok(other, "order"), t0()),
        t0(),
    );
    bogus.expected_version += 1;
    let (index, error) = expect_err(store.commit(&[bogus]).await);
    assert_eq!(index, Some(0));
    assert!(matches!(error, StoreError::Corrupt(_)), "{error:?}");
}

async fn group_commit_writes_many_sagas_at_once(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    let starts: Vec<Commit> = ids.iter().map(|id| start_commit(&def, *id, t0())).collect();
    assert_eq!(store.commit(&starts).await.unwrap().len(), 5);
    let states = store.load_many(&ids).await.unwrap();
    assert_eq!(states.len(), 5);
    assert_eq!(store.timer_count().await.unwrap(), 5);

    // One batch: every saga advances, and an ignored reply is only recorded in the inbox.
    let now = t0() + secs(1);
    let mut batch = orders_done(&def, &ids, &states, now);
    let ignored = Uuid::new_v4();
    batch.push(Commit {
        inbox_id: Some(ignored),
        ..Commit::empty(ids[0], now)
    });
    assert_eq!(store.commit(&batch).await.unwrap().len(), 5);
    for (id, commit) in ids.iter().zip(&batch) {
        let state = store.load(*id).await.unwrap().unwrap();
        assert_eq!(Some(&state), commit.state.as_ref());
        assert_eq!(state.version, 4);
        assert_eq!(store.saga(*id).await.unwrap().unwrap().updated_at, now);
    }
    let inbox: Vec<Uuid> = batch.iter().filter_map(|c| c.inbox_id).collect();
    assert_eq!(store.seen(&inbox).await.unwrap().len(), 6);
    assert_eq!(store.outbox_backlog().await.unwrap(), 10);
    assert_eq!(store.timer_count().await.unwrap(), 5);

    // Two decisions on one saga in the same batch, the second following the first.
    let s1 = store.load(ids[0]).await.unwrap().unwrap();
    let d1 = decide(&def, Some(&s1), &ok(ids[0], "stock"), now + secs(1));
    let s2 = d1.state.clone().unwrap();
    let d2 = decide(&def, Some(&s2), &ok(ids[0], "pay"), now + secs(2));
    let chained = vec![
        commit_of(&def, ids[0], Some(&s1), &d1, now + secs(1)),
        commit_of(&def, ids[0], Some(&s2), &d2, now + secs(2)),
    ];
    assert_eq!(store.commit(&chained).await.unwrap().len(), 2);
    let row = store.saga(ids[0]).await.unwrap().unwrap();
    assert_eq!(Some(&row.state), d2.state.as_ref());
    assert_eq!(row.current_step.as_deref(), Some("ship"));
    assert_eq!(row.updated_at, now + secs(2));
    let seqs: Vec<u64> = store
        .history(ids[0])
        .await
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, (1..=row.version).collect::<Vec<_>>());

    // Chained commits that do not follow on are a conflict of the later one.
    let s3 = store.load(ids[1]).await.unwrap().unwrap();
    let d3 = decide(&def, Some(&s3), &ok(ids[1], "stock"), now);
    let broken = vec![
        commit_of(&def, ids[1], Some(&s3), &d3, now),
        commit_of(&def, ids[1], Some(&s3), &d3, now),
    ];
    let (index, error) = expect_err(store.commit(&broken).await);
    assert_eq!(index, Some(1));
    assert!(matches!(error, StoreError::Conflict), "{error:?}");

    assert_eq!(
        store.commit(&[]).await.unwrap().len(),
        0,
        "an empty batch is fine"
    );
}

/// On PostgreSQL a batch of a shape not seen lately goes as one statement of constant text,
/// its rows bound as arrays, and one whose shape came before as a statement of its own,
/// prepared: the same batches twice go one way, then the other, and must write alike.
async fn a_batch_is_written_alike_whether_its_shape_is_new_or_came_before(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let trace = TraceContext {
        parent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        state: Some("rojo=00f067aa0ba902b7".into()),
    };
    let mut backlog = 0;
    for round in 0..2u64 {
        let now = t0() + secs(10 * round as i64);
        let ids: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
        let mut starts: Vec<Commit> = ids.iter().map(|id| start_commit(&def, *id, now)).collect();
        let key = format!("key-{round}");
        starts[0].idempotency_key = Some(key.clone());
        starts[0].trace = Some(trace.clone());
        let written = store.commit(&starts).await.unwrap();
        let states = store.load_many(&ids).await.unwrap();
        for (id, commit) in ids.iter().zip(&starts) {
            assert_eq!(states.get(id), commit.state.as_ref(), "round {round}");
        }
        let row = store.saga(ids[0]).await.unwrap().unwrap();
        assert_eq!(row.idempotency_key, Some(key), "round {round}");
        assert_eq!(row.created_at, now, "round {round}");
        assert_eq!(
            store.trace_parents(&ids).await.unwrap(),
            HashMap::from([(ids[0], trace.clone())]),
            "round {round}"
        );

        // Each saga advances on a reply, its step timer replaced by the next one's.
        let later = now + secs(1);
        let replies = orders_done(&def, &ids, &states, later);
        let written: Vec<i64> = written
            .into_iter()
            .chain(store.commit(&replies).await.unwrap())
            .collect();
        for (id, commit) in ids.iter().zip(&replies) {
            let row = store.saga(*id).await.unwrap().unwrap();
            assert_eq!(Some(&row.state), commit.state.as_ref(), "round {round}");
            assert_eq!((row.created_at, row.updated_at), (now, later));
            let seqs: Vec<u64> = store
                .history(*id)
                .await
                .unwrap()
                .iter()
                .map(|e| e.seq)
                .collect();
            assert_eq!(seqs, (1..=row.version).collect::<Vec<_>>(), "round {round}");
        }
        let inbox: Vec<Uuid> = replies.iter().filter_map(|c| c.inbox_id).collect();
        assert_eq!(store.seen(&inbox).await.unwrap().len(), 3, "round {round}");
        assert_eq!(store.timer_count().await.unwrap(), 3 * (round + 1));

        // Each outbox id returned is its own message's row.
        let messages = starts
            .iter()
            .chain(&replies)
            .flat_map(|c| c.outbox.iter().map(|m| m.message_id));
        let returned: Vec<(i64, Uuid)> = written.iter().copied().zip(messages).collect();
        backlog += returned.len() as u64;
        assert_eq!(store.outbox_backlog().await.unwrap(), backlog);
        let batch = store.outbox_batch(100).await.unwrap();
        let mut stored: Vec<(i64, Uuid)> = batch
            .rows
            .iter()
            .map(|r| (r.id, r.message.message_id))
            .filter(|(id, _)| written.contains(id))
            .collect();
        batch.release().await.unwrap();
        stored.sort();
        assert_eq!(returned, stored, "round {round}");

        // The replies again: handled already, so the first is a duplicate and nothing is written.
        let (index, error) = expect_err(store.commit(&replies).await);
        assert_eq!(index, Some(0), "round {round}");
        assert!(matches!(error, StoreError::Duplicate), "{error:?}");
        assert_eq!(store.outbox_backlog().await.unwrap(), backlog);
    }
}

/// More rows than one statement binds, so the commit spans several statements per table and,
/// on PostgreSQL, several calls when the batch runs in a transaction to find the commit at
/// fault (a batch of a new shape goes in one, its rows as arrays): each is checked, and a
/// fault in the last rolls back the lot.
async fn a_batch_past_the_bound_values_of_one_statement_is_written_whole(db: TestDb) {
    const SAGAS: usize = 3_000;
    let store = db.store().await;
    let def = checkout();
    let ids: Vec<Uuid> = (0..SAGAS).map(|_| Uuid::new_v4()).collect();

    // Given 3,000 sagas started in one commit,
    let starts: Vec<Commit> = ids.iter().map(|id| start_commit(&def, *id, t0())).collect();
    let outbox = store.commit(&starts).await.unwrap();
    let rows: usize = starts.iter().map(|c| c.outbox.len()).sum();
    assert_eq!(outbox.len(), rows);
    assert!(
        outbox.windows(2).all(|w| w[0] < w[1]),
        "ids in message order"
    );
    let states = store.load_many(&ids).await.unwrap();
    assert_eq!(states.len(), SAGAS);
    assert_eq!(store.timer_count().await.unwrap(), SAGAS as u64);

    // when every one advances in one batch whose last commit is stale,
    let now = t0() + secs(1);
    let mut batch = orders_done(&def, &ids, &states, now);
    let stale = batch.pop().unwrap();
    let last = ids[SAGAS - 1];
    let advanced = decide(&def, Some(&states[&last]), &ok(last, "order"), now);
    let ahead = commit_of(&def, last, Some(&states[&last]), &advanced, now);
    let ahead_rows = ahead.outbox.len();
    store.commit(&[ahead]).await.unwrap();
    batch.push(stale);

    // then the stale one is blamed and nothing of the batch is kept,
    let (index, error) = expect_err(store.commit_marking_sent(&batch, &outbox).await);
    assert_eq!(index, Some(SAGAS - 1));
    assert!(matches!(error, StoreError::Conflict), "{error:?}");
    let first = store.load(ids[0]).await.unwrap().unwrap();
    assert_eq!(first.version, states[&ids[0]].version);
    assert_eq!(
        store.outbox_backlog().await.unwrap(),
        (rows + ahead_rows) as u64
    );

    // and without it, all the rest is written, the earlier rows marked sent with it.
    batch.pop();
    let written = store.commit_marking_sent(&batch, &outbox).await.unwrap();
    let added: usize = batch.iter().map(|c| c.outbox.len()).sum();
    assert_eq!(written.len(), added);
    assert!(
        written.windows(2).all(|w| w[0] < w[1]),
        "ids in message order"
    );
    let now_states = store.load_many(&ids).await.unwrap();
    for commit in &batch {
        assert_eq!(Some(&now_states[&commit.saga_id]), commit.state.as_ref());
    }
    let inbox: Vec<Uuid> = batch.iter().filter_map(|c| c.inbox_id).collect();
    assert_eq!(store.seen(&inbox).await.unwrap().len(), SAGAS - 1);
    assert_eq!(
        store.outbox_backlog().await.unwrap(),
        (added + ahead_rows) as u64
    );
}

async fn an_idempotency_key_starts_one_saga(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let first = Uuid::new_v4();
    let keyed = |saga_id, key: &str| Commit {
        idempotency_key: Some(key.to_owned()),
        ..start_commit(&def, saga_id, t0())
    };
    store.commit(&[keyed(first, "k1")]).await.unwrap();
    assert_eq!(
        store
            .saga_by_idempotency_key("checkout", "k1")
            .await
            .unwrap(),
        Some(first)
    );
    assert_eq!(
        store
            .saga_by_idempotency_key("checkout", "k2")
            .await
            .unwrap(),
        None
    );
    assert_eq!(
        store.saga_by_idempotency_key("refund", "k1").await.unwrap(),
        None
    );

    let second = Uuid::new_v4();
    let (index, error) = expect_err(store.commit(&[keyed(second, "k1")]).await);
    assert_eq!(index, Some(0));
    assert!(matches!(error, StoreError::Duplicate), "{error:?}");
    assert_eq!(store.load(second).await.unwrap(), None);
    assert!(
        store.history(second).await.unwrap().is_empty(),
        "events rolled back"
    );
    assert_eq!(store.outbox_backlog().await.unwrap(), 1);

    // The key is unique per saga name, and sagas without a key never collide.
    let refund_saga = Uuid::new_v4();
    store
        .commit(&[Commit {
            idempotency_key: Some("k1".into()),
            ..start_commit(&refund(), refund_saga, t0())
        }])
        .await
        .unwrap();
    assert_eq!(
        store.saga_by_idempotency_key("refund", "k1").await.unwrap(),
        Some(refund_saga)
    );
    let unkeyed = [Uuid::new_v4(), Uuid::new_v4()];
    store
        .commit(&[
            start_commit(&def, unkeyed[0], t0()),
            start_commit(&def, unkeyed[1], t0()),
        ])
        .await
        .unwrap();

    // Two starts with one key in one batch: the later one is the duplicate.
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    let (index, error) = expect_err(store.commit(&[keyed(a, "k3"), keyed(b, "k3")]).await);
    assert_eq!(index, Some(1));
    assert!(matches!(error, StoreError::Duplicate), "{error:?}");
    assert_eq!(store.load(a).await.unwrap(), None);
    store.commit(&[keyed(a, "k3")]).await.unwrap();

    // The same saga id started twice is a conflict, not a duplicate.
    let (index, error) = expect_err(store.commit(&[keyed(a, "k4")]).await);
    assert_eq!(index, Some(0));
    assert!(matches!(error, StoreError::Conflict), "{error:?}");
}

async fn an_inbox_id_is_recorded_once(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let saga_id = start(&store, &def, t0()).await;
    let row = store.saga(saga_id).await.unwrap();

    let (m1, m2) = (Uuid::new_v4(), Uuid::new_v4());
    // An ignored input: recorded, the saga untouched.
    let ignored = |id| Commit {
        inbox_id: Some(id),
        ..Commit::empty(saga_id, t0() + secs(9))
    };
    assert_eq!(store.commit(&[ignored(m1)]).await.unwrap().len(), 0);
    assert_eq!(store.saga(saga_id).await.unwrap(), row, "saga untouched");
    assert_eq!(store.seen(&[m1, m2]).await.unwrap(), HashSet::from([m1]));
    assert!(store.seen(&[]).await.unwrap().is_empty());

    let (index, error) = expect_err(store.commit(&[ignored(m1)]).await);
    assert_eq!(index, Some(0));
    assert!(matches!(error, StoreError::Duplicate), "{error:?}");

    // A duplicate reply with a real decision: nothing of the decision is written.
    let loaded = store.load(saga_id).await.unwrap().unwrap();
    let decision = decide(&def, Some(&loaded), &ok(saga_id, "order"), t0() + secs(1));
    let advance = Commit {
        inbox_id: Some(m1),
        ..commit_of(&def, saga_id, Some(&loaded), &decision, t0() + secs(1))
    };
    let (index, error) = expect_err(store.commit(&[ignored(m2), advance]).await);
    assert_eq!(index, Some(1));
    assert!(matches!(error, StoreError::Duplicate), "{error:?}");
    assert_eq!(store.load(saga_id).await.unwrap(), Some(loaded));
    assert!(
        store.seen(&[m2]).await.unwrap().is_empty(),
        "m2 rolled back too"
    );

    // The same id twice in one batch.
    let (index, error) = expect_err(store.commit(&[ignored(m2), ignored(m2)]).await);
    assert_eq!(index, Some(1));
    assert!(matches!(error, StoreError::Duplicate), "{error:?}");
    store.commit(&[ignored(m2)]).await.unwrap();
    assert_eq!(store.seen(&[m1, m2]).await.unwrap().len(), 2);
}

async fn a_commit_that_writes_nothing_succeeds(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let saga_id = start(&store, &def, t0()).await;
    let row = store.saga(saga_id).await.unwrap();

    let nothing = Commit::empty(saga_id, t0() + secs(1));
    let ids = store.commit(&[nothing.clone(), nothing]).await.unwrap();
    assert!(ids.is_empty(), "{ids:?}");
    assert_eq!(store.saga(saga_id).await.unwrap(), row);
}

async fn timers_are_scheduled_cancelled_and_fired(db: TestDb) {
    let store = db.store().await;
    let def = refund();
    // Start schedules the deadline (t0 + 60s) and the step timeout (t0 + 5s).
    let a = start(&store, &def, t0()).await;
    let b = start(&store, &def, t0() + secs(1)).await;
    assert_eq!(store.timer_count().await.unwrap(), 4);

    let due = store.due_timers(t0() + secs(100), 100).await.unwrap();
    let order: Vec<(Uuid, DateTime<Utc>)> = due.iter().map(|t| (t.saga_id, t.due_at)).collect();
    assert_eq!(
        order,
        [
            (a, t0() + secs(5)),
            (b, t0() + secs(6)),
            (a, t0() + secs(60)),
            (b, t0() + secs(61)),
        ],
        "earliest first"
    );
    assert_eq!(due[2].timer, TimerKind::Deadline);
    assert_eq!(due[2].key, TimerKind::Deadline.key());
    let timeout = TimerKind::StepTimeout {
        step: "refund".into(),
        direction: Direction::Execute,
        attempt: 1,
    };
    assert_eq!(due[0].timer, timeout);
    assert_eq!(due[0].key, timeout.key());
    assert_eq!(
        store.due_timers(t0() + secs(5), 100).await.unwrap().len(),
        1
    );
    assert!(store.due_timers(t0(), 100).await.unwrap().is_empty());
    assert_eq!(
        store.due_timers(t0() + secs(100), 2).await.unwrap().len(),
        2
    );

    // Reschedule one (upsert), schedule another, cancel a third.
    let retry = TimerKind::Retry {
        step: "refund".into(),
        direction: Direction::Execute,
        attempt: 2,
    };
    store
        .commit(&[Commit {
            timers: vec![
                TimerChange::Schedule {
                    timer: TimerKind::Deadline,
                    due_at: t0() + secs(2),
                },
                TimerChange::Schedule {
                    timer: retry.clone(),
                    due_at: t0() + secs(3),
                },
                TimerChange::Schedule {
                    timer: retry.clone(),
                    due_at: t0() + secs(4),
                },
                TimerChange::Cancel {
                    timer: timeout.clone(),
                },
            ],
            ..Commit::empty(a, t0())
        }])
        .await
        .unwrap();
    let due = store.due_timers(t0() + secs(100), 100).await.unwrap();
    let keys: Vec<(Uuid, String, DateTime<Utc>)> = due
        .iter()
        .map(|t| (t.saga_id, t.key.clone(), t.due_at))
        .collect();
    assert_eq!(
        keys,
        [
            (a, TimerKind::Deadline.key(), t0() + secs(2)),
            (a, retry.key(), t0() + secs(4)),
            (b, timeout.key(), t0() + secs(6)),
            (b, TimerKind::Deadline.key(), t0() + secs(61)),
        ],
        "changes applied in order"
    );

    // A timer fires: the decision's commit deletes it.
    let state = store.load(b).await.unwrap().unwrap();
    let decision = decide(
        &def,
        Some(&state),
        &Input::Timer(timeout.clone()),
        t0() + secs(6),
    );
    store
        .commit(&[Commit {
            fired_timer: Some(timeout.key()),
            ..commit_of(&def, b, Some(&state), &decision, t0() + secs(6))
        }])
        .await
        .unwrap();
    let due = store.due_timers(t0() + secs(6), 100).await.unwrap();
    assert!(
        due.iter()
            .all(|t| !(t.saga_id == b && t.key == timeout.key())),
        "{due:?}"
    );
    // A stale timer (ignored input) is deleted too, without touching the saga.
    let row = store.saga(a).await.unwrap();
    store
        .commit(&[Commit {
            fired_timer: Some(retry.key()),
            ..Commit::empty(a, t0() + secs(7))
        }])
        .await
        .unwrap();
    assert_eq!(store.saga(a).await.unwrap(), row);
    assert!(
        store
            .due_timers(t0() + secs(100), 100)
            .await
            .unwrap()
            .iter()
            .all(|t| t.key != retry.key())
    );

    // A timer whose saga vanished: the runtime commits nothing but the fired timer's removal.
    let count = store.timer_count().await.unwrap();
    for key in [TimerKind::Deadline.key(), "no-such-timer".to_owned()] {
        store
            .commit(&[Commit {
                fired_timer: Some(key),
                ..Commit::empty(a, t0() + secs(8))
            }])
            .await
            .unwrap();
    }
    assert_eq!(store.timer_count().await.unwrap(), count - 1);
}

async fn outbox_rows_are_batched_and_marked_sent(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let mut commands = Vec::new();
    for i in 0..3 {
        let commit = start_commit(&def, Uuid::new_v4(), t0() + secs(i));
        commands.extend(commit.outbox.clone());
        store.commit(&[commit]).await.unwrap();
    }
    assert_eq!(store.outbox_backlog().await.unwrap(), 3);

    let batch = store.outbox_batch(10).await.unwrap();
    let messages: Vec<OutgoingMessage> = batch.rows.iter().map(|r| r.message.clone()).collect();
    assert_eq!(messages, commands, "oldest first, as committed");
    assert!(batch.rows.windows(2).all(|w| w[0].id < w[1].id));
    assert_eq!(batch.rows[0].saga_id, commands[0].correlation_id.unwrap());
    assert_eq!(batch.rows[0].created_at, t0());
    let ids: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
    // Only the first two were confirmed.
    batch.mark_sent(&ids[..2]).await.unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 1);

    let batch = store.outbox_batch(10).await.unwrap();
    assert_eq!(batch.rows.len(), 1);
    assert_eq!(batch.rows[0].id, ids[2]);
    batch.mark_sent(&[ids[2]]).await.unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
    let batch = store.outbox_batch(10).await.unwrap();
    assert!(batch.is_empty());
    batch.mark_sent(&[]).await.unwrap();

    let limited = store.outbox_batch(0).await.unwrap();
    assert!(limited.is_empty());
    limited.release().await.unwrap();

    assert_eq!(
        store
            .prune_outbox(Utc::now() + secs(60), i64::MAX)
            .await
            .unwrap(),
        3
    );
}

async fn outbox_prunes_go_no_further_than_the_id_given(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    assert_eq!(store.outbox_last_id().await.unwrap(), 0, "an empty outbox");
    for i in 0..4 {
        let commit = start_commit(&def, Uuid::new_v4(), t0() + secs(i));
        store.commit(&[commit]).await.unwrap();
    }
    let batch = store.outbox_batch(10).await.unwrap();
    let ids: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), 4);
    assert_eq!(store.outbox_last_id().await.unwrap(), ids[3]);
    // The last one stays unsent.
    batch.mark_sent(&ids[..3]).await.unwrap();

    let (lately, later) = (Utc::now() - secs(60), Utc::now() + secs(60));
    assert_eq!(
        store.prune_outbox(lately, i64::MAX).await.unwrap(),
        0,
        "sent too lately"
    );
    assert_eq!(
        store.prune_outbox(later, ids[1]).await.unwrap(),
        2,
        "sent long enough ago, at or below the bound"
    );
    assert_eq!(store.prune_outbox(later, i64::MAX).await.unwrap(), 1);
    assert_eq!(
        store.outbox_backlog().await.unwrap(),
        1,
        "an unsent row is never pruned"
    );
    assert_eq!(store.outbox_last_id().await.unwrap(), ids[3]);
}

async fn outbox_batches_claim_rows(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    for i in 0..5 {
        start(&store, &def, t0() + secs(i)).await;
    }
    let first = store.outbox_batch(2).await.unwrap();
    let second = store.outbox_batch(10).await.unwrap();
    let ids = |batch: &orchestrator::store::OutboxBatch| -> Vec<i64> {
        batch.rows.iter().map(|r| r.id).collect()
    };
    let (first_ids, second_ids) = (ids(&first), ids(&second));
    assert_eq!(first_ids.len(), 2);
    if db.is_postgres() {
        // Claimed rows are skipped by a concurrent relay.
        assert_eq!(second_ids.len(), 3);
        assert!(first_ids.iter().all(|id| !second_ids.contains(id)));
        assert!(
            first_ids.iter().max() < second_ids.iter().min(),
            "oldest first"
        );

        // Releasing a batch (a failed publish) hands its rows to the next one.
        second.release().await.unwrap();
        let third = store.outbox_batch(10).await.unwrap();
        assert_eq!(ids(&third), second_ids);
        // Dropping does the same, once the connection has rolled back in the background.
        drop(third);
        let mut waited = Duration::ZERO;
        let fourth = loop {
            let batch = store.outbox_batch(10).await.unwrap();
            if !batch.is_empty() || waited > Duration::from_secs(5) {
                break batch;
            }
            batch.release().await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            waited += Duration::from_millis(20);
        };
        assert_eq!(ids(&fourth), second_ids);
        first.mark_sent(&first_ids).await.unwrap();
        fourth.mark_sent(&second_ids).await.unwrap();
    } else {
        // SQLite claims nothing: one relay per database.
        assert_eq!(second_ids.len(), 5);
        first.mark_sent(&first_ids).await.unwrap();
        second.mark_sent(&second_ids).await.unwrap();
    }
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

/// The ids a commit returns are its outbox rows', in the order of its messages, so the relay
/// can publish them from memory; a commit can carry the relay's marks; and a read of the
/// database can leave out the rows on their way and the young ones.
async fn a_commit_gives_its_outbox_ids_and_marks_rows_sent(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let sagas: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    let starts: Vec<Commit> = sagas
        .iter()
        .enumerate()
        .map(|(i, id)| start_commit(&def, *id, t0() + secs(i as i64)))
        .collect();
    let messages: Vec<Uuid> = starts
        .iter()
        .flat_map(|c| c.outbox.iter().map(|m| m.message_id))
        .collect();
    assert!(messages.len() >= 4, "every start sends at least a command");
    let ids = store.commit(&starts).await.unwrap();
    assert_eq!(ids.len(), messages.len());
    let batch = store.outbox_batch(100).await.unwrap();
    let stored: Vec<(i64, Uuid)> = batch
        .rows
        .iter()
        .map(|r| (r.id, r.message.message_id))
        .collect();
    batch.release().await.unwrap();
    let returned: Vec<(i64, Uuid)> = ids.iter().copied().zip(messages).collect();
    let mut by_id = stored.clone();
    by_id.sort();
    assert_eq!(returned, by_id, "each id is its message's row");

    // Rows on their way are left out, and so are rows younger than asked.
    let on_their_way = &ids[..2];
    let batch = store
        .outbox_batch_where(100, on_their_way, None)
        .await
        .unwrap();
    let read: Vec<i64> = batch.rows.iter().map(|r| r.id).collect();
    batch.release().await.unwrap();
    assert_eq!(read, ids[2..].to_vec());
    let batch = store
        .outbox_batch_where(100, &[], Some(t0() + secs(1)))
        .await
        .unwrap();
    let first_saga_rows = starts[0].outbox.len();
    assert_eq!(
        batch.rows.len(),
        first_saga_rows,
        "only the first start is older"
    );
    batch.release().await.unwrap();

    // The marks ride on a commit, with or without decisions of its own.
    let third = Uuid::new_v4();
    let more = store
        .commit_marking_sent(&[start_commit(&def, third, t0() + secs(9))], on_their_way)
        .await
        .unwrap();
    assert_eq!(
        store.outbox_backlog().await.unwrap() as usize,
        ids.len() - 2 + more.len()
    );
    assert!(
        more.iter().all(|id| id > ids.iter().max().unwrap()),
        "later rows, later ids"
    );
    let rest: Vec<i64> = ids[2..].iter().chain(&more).copied().collect();
    assert!(
        store
            .commit_marking_sent(&[], &rest)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.outbox_backlog().await.unwrap(), 0);
}

async fn list_pages_newest_first_with_filters(db: TestDb) {
    let store = db.store().await;
    let (checkout, refund) = (checkout(), refund());
    let mut created = Vec::new();
    for i in 0..9 {
        let (def, name) = if i % 3 == 2 {
            (&refund, "refund")
        } else {
            (&checkout, "checkout")
        };
        // Two sagas share each second: the id breaks the tie.
        let at = t0() + secs(i / 2);
        let id = start(&store, def, at).await;
        created.push((id, name, at));
    }
    // Settle the refunds: the first completes, the others are compensated.
    let refunds: Vec<Uuid> = created
        .iter()
        .filter(|(_, name, _)| *name == "refund")
        .map(|(id, _, _)| *id)
        .collect();
    let done = apply(
        &store,
        &refund,
        refunds[0],
        ok(refunds[0], "refund"),
        t0() + secs(30),
    )
    .await;
    assert_eq!(done.status, SagaStatus::Completed);
    for id in &refunds[1..] {
        let state = apply(&store, &refund, *id, fail(*id, "refund"), t0() + secs(30)).await;
        assert_eq!(state.status, SagaStatus::Compensated);
    }

    let mut expected = created.clone();
    expected.sort_by_key(|x| std::cmp::Reverse((x.2, x.0)));
    let expected_ids: Vec<Uuid> = expected.iter().map(|e| e.0).collect();

    let whole = store.list(&all(100)).await.unwrap();
    assert_eq!(whole.iter().map(|r| r.id).collect::<Vec<_>>(), expected_ids);

    // Keyset paging: pages of 4 add up to the whole list.
    let mut paged = Vec::new();
    let mut filter = all(4);
    loop {
        let page = store.list(&filter).await.unwrap();
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        filter.before = Some((last.created_at, last.id));
        paged.extend(page.iter().map(|r| r.id));
    }
    assert_eq!(paged, expected_ids);

    let running = store
        .list(&ListFilter {
            status: Some(SagaStatus::Running),
            ..all(100)
        })
        .await
        .unwrap();
    assert_eq!(running.len(), 6);
    assert!(
        running
            .iter()
            .all(|r| r.status == SagaStatus::Running && r.name == "checkout")
    );
    let compensated_refunds = store
        .list(&ListFilter {
            status: Some(SagaStatus::Compensated),
            name: Some("refund".into()),
            ..all(100)
        })
        .await
        .unwrap();
    assert_eq!(
        compensated_refunds.iter().map(|r| r.id).collect::<Vec<_>>(),
        expected_ids
            .iter()
            .copied()
            .filter(|id| refunds[1..].contains(id))
            .collect::<Vec<_>>()
    );
    let refunds_page = store
        .list(&ListFilter {
            name: Some("refund".into()),
            before: Some((compensated_refunds[0].created_at, compensated_refunds[0].id)),
            ..all(1)
        })
        .await
        .unwrap();
    assert_eq!(refunds_page.len(), 1);
    assert_eq!(refunds_page[0].name, "refund");
    assert!(refunds_page[0].created_at <= compensated_refunds[0].created_at);

    let in_flight: HashSet<Uuid> = store.in_flight_ids().await.unwrap().into_iter().collect();
    let checkouts: HashSet<Uuid> = created
        .iter()
        .filter(|(_, name, _)| *name == "checkout")
        .map(|(id, _, _)| *id)
        .collect();
    assert_eq!(in_flight, checkouts);
}

/// What the web view's list shows above the page: counts per status (for one saga name or
/// all), and the sagas started with an idempotency key, under any saga name.
async fn statuses_are_counted_and_keys_searched(db: TestDb) {
    let store = db.store().await;
    let (checkout, refund) = (checkout(), refund());
    let keyed = |def: &SagaDefinition, key: &str| Commit {
        idempotency_key: Some(key.to_owned()),
        ..start_commit(def, Uuid::new_v4(), t0())
    };
    let (a, b, c) = (
        keyed(&checkout, "k1"),
        keyed(&refund, "k1"),
        keyed(&checkout, "k2"),
    );
    store.commit(&[a.clone(), b.clone(), c]).await.unwrap();
    let unkeyed = start(&store, &refund, t0() + secs(1)).await;
    let state = apply(
        &store,
        &refund,
        unkeyed,
        fail(unkeyed, "refund"),
        t0() + secs(2),
    )
    .await;
    assert_eq!(state.status, SagaStatus::Compensated);

    let mut counts = store.status_counts(None).await.unwrap();
    counts.sort_by_key(|(status, _)| status.as_str());
    assert_eq!(
        counts,
        vec![(SagaStatus::Compensated, 1), (SagaStatus::Running, 3)]
    );
    let refunds = store.status_counts(Some("refund")).await.unwrap();
    assert_eq!(refunds.len(), 2, "{refunds:?}");
    assert!(
        store
            .status_counts(Some("nothing"))
            .await
            .unwrap()
            .is_empty()
    );

    let by_key = |key: &str, name: Option<&str>| ListFilter {
        idempotency_key: Some(key.to_owned()),
        name: name.map(str::to_owned),
        ..all(10)
    };
    let mut found: Vec<Uuid> = store
        .listing(&by_key("k1", None))
        .await
        .unwrap()
        .iter()
        .map(|row| row.id)
        .collect();
    found.sort();
    let mut expected = vec![a.saga_id, b.saga_id];
    expected.sort();
    assert_eq!(found, expected);
    let one = store.listing(&by_key("k1", Some("refund"))).await.unwrap();
    assert_eq!(one.iter().map(|r| r.id).collect::<Vec<_>>(), [b.saga_id]);
    assert!(store.listing(&by_key("k3", None)).await.unwrap().is_empty());
}

async fn the_read_model_is_rebuilt_from_the_events(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let now = t0();
    // Sagas in various states, one with an idempotency key.
    let keyed = Uuid::new_v4();
    store
        .commit(&[Commit {
            idempotency_key: Some("req-9".into()),
            ..start_commit(&def, keyed, now)
        }])
        .await
        .unwrap();
    let running = start(&store, &def, now + secs(1)).await;
    apply(&store, &def, running, ok(running, "order"), now + secs(2)).await;
    let completed = start(&store, &def, now + secs(3)).await;
    for (i, step) in ["order", "stock", "pay", "ship"].iter().enumerate() {
        apply(
            &store,
            &def,
            completed,
            ok(completed, step),
            now + secs(4 + i as i64),
        )
        .await;
    }
    let compensating = start(&store, &def, now + secs(10)).await;
    apply(
        &store,
        &def,
        compensating,
        ok(compensating, "order"),
        now + secs(11),
    )
    .await;
    apply(
        &store,
        &def,
        compensating,
        ok(compensating, "stock"),
        now + secs(12),
    )
    .await;
    let state = apply(
        &store,
        &def,
        compensating,
        fail(compensating, "pay"),
        now + secs(13),
    )
    .await;
    assert_eq!(state.status, SagaStatus::Compensating);
    let aborted = start(&store, &def, now + secs(14)).await;
    apply(
        &store,
        &def,
        aborted,
        Input::operator(OperatorCommand::Abort {
            reason: "customer cancelled".into(),
        }),
        now + secs(15),
    )
    .await;

    let before = store.list(&all(100)).await.unwrap();
    assert_eq!(before.len(), 5);
    assert_eq!(
        before.iter().find(|r| r.id == completed).map(|r| r.status),
        Some(SagaStatus::Completed)
    );
    assert_eq!(
        before
            .iter()
            .find(|r| r.id == compensating)
            .and_then(|r| r.current_step.clone()),
        Some("stock".into()),
        "compensating stock, in reverse order"
    );

    // Corrupted rows, and a row whose saga has no events.
    let conn = store.connection();
    conn.execute_unprepared(
        "UPDATE sagas SET status = 'completed', state = '{}', data = '[]', version = 99, \
         current_step = NULL, name = 'x', business_key = NULL, created_at = updated_at",
    )
    .await
    .unwrap();
    let orphan = start(&store, &def, now + secs(16)).await;
    conn.execute(
        Query::delete()
            .from_table(Alias::new("saga_events"))
            .and_where(Expr::col(Alias::new("saga_id")).eq(orphan)),
    )
    .await
    .unwrap();
    assert_eq!(store.rebuild_read_model().await.unwrap(), 5);
    assert_eq!(
        store.list(&all(100)).await.unwrap(),
        before,
        "identical rows"
    );
    assert!(
        store.saga(orphan).await.unwrap().is_none(),
        "no events, no row"
    );

    // From nothing: identical but for the idempotency key, which no event carries.
    conn.execute_unprepared("DELETE FROM sagas").await.unwrap();
    assert!(store.list(&all(100)).await.unwrap().is_empty());
    assert_eq!(store.rebuild_read_model().await.unwrap(), 5);
    let after = store.list(&all(100)).await.unwrap();
    let without_keys: Vec<SagaRow> = before
        .iter()
        .cloned()
        .map(|r| SagaRow {
            idempotency_key: None,
            ..r
        })
        .collect();
    assert_eq!(after, without_keys);

    // The write side carries on from the rebuilt snapshots.
    let state = apply(&store, &def, running, ok(running, "stock"), now + secs(20)).await;
    assert_eq!(store.load(running).await.unwrap(), Some(state));
}

async fn concurrent_writers_never_both_advance_a_saga(db: TestDb) {
    // Two stores on one database, as two processes would have.
    let stores = [db.store().await, db.store().await];
    let def = checkout();
    let shared = start(&stores[0], &def, t0()).await;
    let tasks = 8;
    let appends = 10;
    let mut handles = Vec::new();
    for task in 0..tasks {
        let store = stores[task % 2].clone();
        let def = def.clone();
        handles.push(tokio::spawn(async move {
            // Each task also writes sagas of its own, in the same batches.
            let own = start(&store, &def, t0()).await;
            let mut conflicts = 0;
            let mut done = 0;
            while done < appends {
                let mut commits = Vec::new();
                for id in [shared, own] {
                    let state = store.load(id).await.unwrap().unwrap();
                    let event = SagaEvent::AbortRequested {
                        reason: format!("task {task}, append {done}"),
                        by: None,
                    };
                    let mut next = state.clone();
                    next.apply(&event);
                    commits.push(Commit {
                        expected_version: state.version,
                        events: vec![event],
                        state: Some(next),
                        outbox: vec![],
                        ..Commit::empty(id, t0() + secs(1))
                    });
                }
                match store.commit(&commits).await {
                    Ok(_) => done += 1,
                    Err(CommitError {
                        index: Some(0),
                        error: StoreError::Conflict,
                    }) => conflicts += 1,
                    Err(other) => panic!("task {task}: {other}"),
                }
            }
            (own, conflicts)
        }));
    }
    let mut own_sagas = Vec::new();
    let mut conflicts = 0;
    for handle in handles {
        let (own, lost) = handle.await.unwrap();
        own_sagas.push(own);
        conflicts += lost;
    }
    // Not asserted (scheduling decides), but shown: the losers retried.
    println!("{conflicts} conflicts retried");
    let store = &stores[0];
    let state = store.load(shared).await.unwrap().unwrap();
    assert_eq!(
        state.version,
        2 + (tasks * appends) as u64,
        "every append once"
    );
    let history = store.history(shared).await.unwrap();
    assert_eq!(
        history.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=state.version).collect::<Vec<_>>()
    );
    for own in own_sagas {
        let state = store.load(own).await.unwrap().unwrap();
        assert_eq!(state.version, 2 + appends as u64);
    }
    assert_eq!(
        store.saga(shared).await.unwrap().unwrap().version,
        state.version
    );
}

/// `StoreOptions::pool_size` bounds the PostgreSQL pool (`--database-pool-size`).
#[tokio::test]
async fn the_postgres_pool_has_the_size_given() {
    use orchestrator::store::{DEFAULT_POOL_SIZE, StoreOptions};
    let db = TestDb::postgres().await;
    for size in [1, 3] {
        let store = Store::connect_with(&db.url, StoreOptions { pool_size: size })
            .await
            .expect("connect and migrate");
        assert_eq!(store.postgres_connections(), size);
        // Given a batch of a new shape (it goes as arrays) on the smallest pool, it is written.
        let def = refund();
        let saga = start(&store, &def, t0()).await;
        assert!(store.saga(saga).await.unwrap().is_some(), "pool of {size}");
    }
    let default = db.store().await;
    assert_eq!(default.postgres_connections(), DEFAULT_POOL_SIZE);
    let sqlite = TestDb::sqlite();
    assert_eq!(sqlite.store().await.postgres_connections(), 0);
    assert!(
        Store::connect_with(&db.url, StoreOptions { pool_size: 0 })
            .await
            .is_err(),
        "an empty pool is refused"
    );
}

async fn a_timer_is_set_aside_once_and_only_as_read(db: TestDb) {
    let store = db.store().await;
    let def = refund();
    let saga = start(&store, &def, t0()).await;
    let due = store.due_timers(t0() + secs(100), 100).await.unwrap();
    assert_eq!(due.len(), 2, "the step timeout and the deadline");
    let (timeout, deadline) = (&due[0], &due[1]);

    let at = t0() + secs(200);
    assert!(
        store
            .set_aside_timer(timeout, "definition gone", at)
            .await
            .unwrap()
    );
    assert!(
        !store
            .set_aside_timer(timeout, "definition gone", at)
            .await
            .unwrap(),
        "already set aside: nothing to do"
    );
    // Rescheduled since it was read: not the timer that failed any more.
    store
        .commit(&[Commit {
            timers: vec![TimerChange::Schedule {
                timer: TimerKind::Deadline,
                due_at: t0() + secs(300),
            }],
            ..Commit::empty(saga, t0())
        }])
        .await
        .unwrap();
    assert!(
        !store
            .set_aside_timer(deadline, "definition gone", at)
            .await
            .unwrap()
    );
    assert_eq!(store.timer_count().await.unwrap(), 1, "the rescheduled one");

    let items = store.list_set_aside(10).await.unwrap();
    assert_eq!(items.len(), 1);
    let item = &items[0];
    assert_eq!(
        (item.saga_id, item.kind, item.reason.as_str(), item.at),
        (saga, SetAsideKind::Timer, "definition gone", at)
    );
    assert_eq!(item.item["key"], timeout.key.as_str());
    assert_eq!(
        serde_json::from_value::<TimerKind>(item.item["timer"].clone()).unwrap(),
        timeout.timer
    );
    assert_eq!(
        store.set_aside_counts().await.unwrap(),
        [(SetAsideKind::Timer, 1)]
    );
}

/// Overwrites a column of one row with text that is not what the store wrote.
async fn corrupt(store: &Store, table: &str, column: &str, key: (&str, Uuid), text: &str) {
    store
        .connection()
        .execute(
            Query::update()
                .table(Alias::new(table))
                .value(Alias::new(column), text)
                .and_where(Expr::col(Alias::new(key.0)).eq(key.1)),
        )
        .await
        .unwrap();
}

async fn an_unreadable_snapshot_is_rebuilt_from_the_log(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let saga = start(&store, &def, t0()).await;
    let state = apply(&store, &def, saga, ok(saga, "order"), t0() + secs(1)).await;
    let other = start(&store, &def, t0() + secs(2)).await;

    corrupt(&store, "sagas", "state", ("id", saga), "{not json").await;
    assert_eq!(store.load(saga).await.unwrap().as_ref(), Some(&state));
    assert_eq!(store.load_many(&[saga, other]).await.unwrap()[&saga], state);
    assert_eq!(store.saga(saga).await.unwrap().unwrap().state, state);
    assert!(
        store
            .list(&all(10))
            .await
            .unwrap()
            .iter()
            .any(|r| r.state == state)
    );

    // The saga moves on from the rebuilt state, and its next commit writes a good snapshot.
    let next = apply(&store, &def, saga, ok(saga, "stock"), t0() + secs(3)).await;
    assert_eq!(
        next.version,
        state.version + 2,
        "a completion and a command"
    );
    let row: Option<String> = store
        .connection()
        .query_one(
            Query::select()
                .column(Alias::new("state"))
                .from(Alias::new("sagas"))
                .and_where(Expr::col(Alias::new("id")).eq(saga)),
        )
        .await
        .unwrap()
        .map(|r| r.try_get_by_index(0).unwrap());
    assert_eq!(
        serde_json::from_str::<SagaState>(&row.unwrap()).unwrap(),
        next
    );

    // Snapshot and log both unreadable: only then is the saga corrupt, saying both.
    corrupt(&store, "sagas", "state", ("id", other), "{not json").await;
    corrupt(&store, "saga_events", "payload", ("saga_id", other), "[]").await;
    match store.load(other).await {
        Err(StoreError::Corrupt(why)) => {
            assert!(
                why.contains("state of saga") && why.contains("event log"),
                "{why}"
            )
        }
        result => panic!("expected Corrupt, got {result:?}"),
    }
    assert!(matches!(
        store.load_many(&[saga, other]).await,
        Err(StoreError::Corrupt(_))
    ));
}

/// `levels` objects, one inside the other, around `leaf`: `{"d": {"d": ... leaf}}`.
fn nested(levels: usize, leaf: Value) -> Value {
    (0..levels).fold(leaf, |inner, _| json!({ "d": inner }))
}

/// The nesting depth of `value` as JSON (an object or array counts one level).
fn depth(value: &Value) -> usize {
    match value {
        Value::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
        Value::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

/// Data at the limits a door accepts: nested `MAX_DEPTH` levels in all (the object itself and
/// `MAX_DEPTH - 1` inside it, as deep as a whole request body may be), with text in many
/// scripts and escapes, integers at the 64-bit edges, padded to `bytes` as compact JSON.
fn data_at_the_limits(prefix: &str, bytes: usize) -> Data {
    let mut data = object(json!({
        format!("{prefix}_deep"): nested(MAX_DEPTH - 2, json!([1, "deepest"])),
        format!("{prefix}_ünïcødé_キー"): "Grüße, 世界! 🦀👩‍👩‍👧 עִבְרִית العربية e\u{301} \"quoted\" back\\slash \u{1} tab\t line\n \
            it's O''Brien's E'\\x41' $1 $$dollar$$ ? -- no comment /* nor this */ ;",
        format!("{prefix}_u64_max"): u64::MAX,
        format!("{prefix}_i64_min"): i64::MIN,
        format!("{prefix}_i64_max"): i64::MAX,
        format!("{prefix}_fractions"): [0.5, -2.25, 0, -1],
        format!("{prefix}_padding"): "",
    }));
    let size = serde_json::to_vec(&data).unwrap().len();
    data[&format!("{prefix}_padding")] = Value::String("ж".repeat((bytes - size) / 2));
    data
}

async fn the_deepest_and_largest_data_accepted_is_read_back_unchanged(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let saga_id = Uuid::new_v4();
    // Half the data limit from the start input, half from the first step's output: the saga
    // data after the merge is as large as a saga's data may be.
    let input = data_at_the_limits("input", MAX_DATA_BYTES / 2);
    let output = data_at_the_limits("output", MAX_DATA_BYTES / 2 - 1);
    assert_eq!(depth(&Value::Object(input.clone())), MAX_DEPTH);
    assert_eq!(depth(&Value::Object(output.clone())), MAX_DEPTH);
    let started = decide(
        &def,
        None,
        &Input::Start {
            saga_id,
            input: input.clone(),
            business_key: Some("ключ-'🔑'; --".into()),
        },
        t0(),
    );
    store
        .commit(&[commit_of(&def, saga_id, None, &started, t0())])
        .await
        .unwrap();
    let state = apply(
        &store,
        &def,
        saga_id,
        answer(
            saga_id,
            "order",
            Reply::Success {
                output: output.clone(),
            },
        ),
        t0() + secs(1),
    )
    .await;
    let mut merged = input.clone();
    merged.extend(output.clone());
    assert_eq!(state.data, merged);
    let size = serde_json::to_vec(&state.data).unwrap().len();
    assert!(
        (MAX_DATA_BYTES - 8..=MAX_DATA_BYTES).contains(&size),
        "the merged data is {size} bytes"
    );

    // The snapshot, the log, the read model and the outbox all give back what went in; the
    // snapshot as stored, not rebuilt from the log.
    let snapshot: String = store
        .connection()
        .query_one(
            Query::select()
                .column(Alias::new("state"))
                .from(Alias::new("sagas"))
                .and_where(Expr::col(Alias::new("id")).eq(saga_id)),
        )
        .await
        .unwrap()
        .unwrap()
        .try_get_by_index(0)
        .unwrap();
    assert_eq!(serde_json::from_str::<SagaState>(&snapshot).unwrap(), state);
    assert_eq!(store.load(saga_id).await.unwrap().as_ref(), Some(&state));
    let row = store.saga(saga_id).await.unwrap().unwrap();
    assert_eq!((&row.state, &row.data), (&state, &merged));
    assert_eq!(row.business_key.as_deref(), Some("ключ-'🔑'; --"));
    let history = store.history(saga_id).await.unwrap();
    let events: Vec<SagaEvent> = history.into_iter().map(|e| e.event).collect();
    let mut log = started.events.clone();
    log.extend(
        decide(
            &def,
            started.state.as_ref(),
            &answer(saga_id, "order", Reply::Success { output }),
            t0() + secs(1),
        )
        .events,
    );
    assert_eq!(events, log);
    assert_eq!(SagaState::fold(saga_id, &events).as_ref(), Some(&state));
    assert!(
        store
            .list(&all(10))
            .await
            .unwrap()
            .iter()
            .any(|r| r.state == state)
    );
    let batch = store.outbox_batch(10).await.unwrap();
    let commands: Vec<StepCommand> = batch
        .rows
        .iter()
        .map(|r| serde_json::from_str(&r.message.body).unwrap())
        .collect();
    batch.release().await.unwrap();
    assert_eq!(
        commands.iter().map(|c| &c.data).collect::<Vec<_>>(),
        [&input, &merged]
    );
    // Integers kept their 64-bit types (not turned into floats on the way).
    assert!(row.state.data["input_u64_max"].is_u64());
    assert_eq!(row.state.data["output_i64_min"].as_i64(), Some(i64::MIN));

    // The rebuild folds the same log into the same row.
    store.rebuild_read_model().await.unwrap();
    assert_eq!(store.saga(saga_id).await.unwrap().unwrap().state, state);
}

async fn one_unreadable_saga_does_not_break_the_listing(db: TestDb) {
    let store = db.store().await;
    let def = checkout();
    let first = start(&store, &def, t0()).await;
    let unreadable = start(&store, &def, t0() + secs(1)).await;
    let odd = start(&store, &def, t0() + secs(2)).await;
    // Its snapshot and its log cannot be read: it is corrupt.
    corrupt(&store, "sagas", "state", ("id", unreadable), "{not json").await;
    corrupt(
        &store,
        "saga_events",
        "payload",
        ("saga_id", unreadable),
        "[]",
    )
    .await;
    corrupt(&store, "sagas", "data", ("id", unreadable), "[").await;
    // Only its `data` column is bad: the data is the snapshot's, so it reads as before.
    corrupt(&store, "sagas", "data", ("id", odd), "{not json").await;

    assert!(matches!(
        store.saga(unreadable).await,
        Err(StoreError::Corrupt(_))
    ));
    let row = store.saga(odd).await.unwrap().unwrap();
    assert_eq!(row.data, object(json!({"customer": "ada"})));
    assert_eq!(row.data, row.state.data);

    // Listing needs no saga's state: every row is there, the unreadable one included.
    assert!(
        matches!(store.list(&all(10)).await, Err(StoreError::Corrupt(_))),
        "rows with their state cannot be listed past it"
    );
    let page = store.listing(&all(10)).await.unwrap();
    assert_eq!(
        page.iter()
            .map(|r| (r.id, r.status, r.current_step.as_deref()))
            .collect::<Vec<_>>(),
        [
            (odd, SagaStatus::Running, Some("order")),
            (unreadable, SagaStatus::Running, Some("order")),
            (first, SagaStatus::Running, Some("order")),
        ]
    );
    // Paging walks past it.
    let after_odd = store
        .listing(&ListFilter {
            limit: 1,
            before: Some((page[0].created_at, page[0].id)),
            ..ListFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(after_odd.len(), 1);
    assert_eq!(after_odd[0].id, unreadable);
}

async fn the_inbox_forgets_replies_after_its_retention(db: TestDb) {
    let store = db.store().await;
    let saga = start(&store, &checkout(), t0()).await;
    let day = secs(24 * 60 * 60);
    let record = |id: Uuid, at: DateTime<Utc>| Commit {
        inbox_id: Some(id),
        ..Commit::empty(saga, at)
    };
    // 12 replies handled 8 days before `now`, 3 handled 6 days before it.
    let now = t0() + day * 10;
    let old: Vec<Uuid> = (0..12).map(|_| Uuid::new_v4()).collect();
    let recent: Vec<Uuid> = (0..3).map(|_| Uuid::new_v4()).collect();
    let commits: Vec<Commit> = old
        .iter()
        .map(|id| record(*id, now - day * 8))
        .chain(recent.iter().map(|id| record(*id, now - day * 6)))
        .collect();
    store.commit(&commits).await.unwrap();

    let week = DEFAULT_INBOX_RETENTION;
    assert_eq!(week, Duration::from_secs(7 * 24 * 60 * 60));
    assert_eq!(prune_inbox(&store, week, now).await.unwrap(), 12);
    assert_eq!(prune_inbox(&store, week, now).await.unwrap(), 0, "once");
    let all_ids: Vec<Uuid> = old.iter().chain(&recent).copied().collect();
    let seen = store.seen(&all_ids).await.unwrap();
    assert_eq!(seen, recent.iter().copied().collect::<HashSet<_>>());

    // A kept reply is still caught as a duplicate; a forgotten one could be recorded again.
    let (_, error) = expect_err(store.commit(&[record(recent[0], now)]).await);
    assert!(matches!(error, StoreError::Duplicate), "{error:?}");
    store.commit(&[record(old[0], now)]).await.unwrap();

    // More than one statement's worth is pruned in several.
    let many: Vec<Commit> = (0..12_000)
        .map(|_| record(Uuid::new_v4(), now - day * 30))
        .collect();
    store.commit(&many).await.unwrap();
    assert_eq!(prune_inbox(&store, week, now).await.unwrap(), 12_000);
    assert_eq!(store.seen(&recent).await.unwrap().len(), 3);
}

// --- definition versions --------------------------------------------------------------------

async fn definition_versions_are_kept_listed_and_pruned(db: TestDb) {
    let store = db.store().await;
    // Given the first start's file: checkout v1 and refund v7, and sagas on both.
    store
        .store_definitions(&[checkout(), refund()], t0())
        .await
        .unwrap();
    let mut stored = store.stored_definitions().await.unwrap();
    stored.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(stored, vec![checkout(), refund()], "read back unchanged");
    let running = [
        start(&store, &checkout(), t0() + secs(1)).await,
        start(&store, &checkout(), t0() + secs(2)).await,
    ];
    let refunded = start(&store, &refund(), t0() + secs(3)).await;
    apply(
        &store,
        &refund(),
        refunded,
        ok(refunded, "refund"),
        t0() + secs(4),
    )
    .await;

    // When the next start's file has checkout v2 only (a step removed, refund gone).
    let mut v2 = checkout();
    v2.version = "v2".into();
    v2.steps.remove(1);
    let later = t0() + secs(3600);
    store.store_definitions(&[v2.clone()], later).await.unwrap();

    // Then every version is listed with its use.
    let listed = store.definition_versions().await.unwrap();
    let find = |name: &str, version: &str| {
        listed
            .iter()
            .find(|v| v.name == name && v.version == version)
            .unwrap_or_else(|| panic!("{name} {version} in {listed:?}"))
            .clone()
    };
    let (v1, v2_listed, v7) = (
        find("checkout", "v1"),
        find("checkout", "v2"),
        find("refund", "v7"),
    );
    assert_eq!(
        (v1.stored, v1.current, v1.in_flight, v1.sagas),
        (true, false, 2, 2),
        "{v1:?}"
    );
    assert_eq!(v1.first_used, Some(t0() + secs(1)));
    assert_eq!(v1.last_used, Some(t0() + secs(2)));
    assert_eq!(v1.steps, ["order", "stock", "pay", "ship"]);
    assert_eq!(
        (v2_listed.current, v2_listed.in_flight, v2_listed.sagas),
        (true, 0, 0),
        "{v2_listed:?}"
    );
    assert_eq!(v2_listed.stored_at, Some(later));
    assert_eq!(
        (v7.current, v7.in_flight, v7.sagas),
        (false, 0, 1),
        "{v7:?}"
    );
    assert_eq!(listed[0].version, "v2", "the latest load first: {listed:?}");

    // Storing a version again keeps when it was first stored.
    store
        .store_definitions(&[v2.clone()], later + secs(60))
        .await
        .unwrap();
    let again = store.definition_versions().await.unwrap();
    let v2_again = again.iter().find(|v| v.version == "v2").unwrap();
    assert_eq!(v2_again.stored_at, Some(later));
    assert_eq!(v2_again.loaded_at, Some(later + secs(60)));

    // Pruning: refused while sagas run on it or when the last start loaded it.
    assert_eq!(
        store.prune_definition("checkout", "v1").await.unwrap(),
        Pruned::InFlight(2)
    );
    assert_eq!(
        store.prune_definition("checkout", "v2").await.unwrap(),
        Pruned::Loaded
    );
    assert_eq!(
        store.prune_definition("checkout", "v9").await.unwrap(),
        Pruned::NotFound
    );
    assert_eq!(
        store.prune_definition("refund", "v7").await.unwrap(),
        Pruned::Deleted
    );
    let stored: Vec<String> = store
        .stored_definitions()
        .await
        .unwrap()
        .into_iter()
        .map(|d| format!("{} {}", d.name, d.version))
        .collect();
    assert_eq!(stored.len(), 2, "{stored:?}");
    assert!(!stored.contains(&"refund v7".to_owned()), "{stored:?}");
    let v7 = store
        .definition_versions()
        .await
        .unwrap()
        .into_iter()
        .find(|v| v.version == "v7")
        .expect("its saga still names it");
    assert_eq!((v7.stored, v7.sagas), (false, 1), "{v7:?}");
    for saga_id in running {
        assert_eq!(
            store
                .load(saga_id)
                .await
                .unwrap()
                .unwrap()
                .definition_version,
            "v1"
        );
    }
}

/// What the operator gauge reads: one row per saga name with sagas in the status, none for a
/// status nobody is in.
async fn sagas_are_counted_by_name_in_a_status(db: TestDb) {
    let store = db.store().await;
    let (checkout, refund) = (checkout(), refund());
    let now = t0();
    // Two checkouts past the pivot whose last step fails: completion failed.
    for _ in 0..2 {
        let id = start(&store, &checkout, now).await;
        for step in ["order", "stock", "pay"] {
            apply(&store, &checkout, id, ok(id, step), now).await;
        }
        let state = apply(&store, &checkout, id, fail(id, "ship"), now).await;
        assert_eq!(state.status, SagaStatus::CompletionFailed);
    }
    // A checkout whose stock fails and whose order cannot be undone: compensation failed.
    let id = start(&store, &checkout, now).await;
    apply(&store, &checkout, id, ok(id, "order"), now).await;
    apply(&store, &checkout, id, fail(id, "stock"), now).await;
    let refused = Input::Reply {
        step: "order".into(),
        direction: Direction::Compensate,
        attempt: 1,
        in_reply_to: command_message_id(id, "order", Direction::Compensate, 1),
        outcome: Reply::Failure {
            reason: "refund refused".into(),
        },
    };
    let state = apply(&store, &checkout, id, refused, now).await;
    assert_eq!(state.status, SagaStatus::CompensationFailed);
    // Others, in statuses that need nobody.
    start(&store, &checkout, now).await;
    start(&store, &refund, now).await;

    let sorted = |mut rows: Vec<(String, u64)>| {
        rows.sort();
        rows
    };
    assert_eq!(
        sorted(
            store
                .count_by_name(SagaStatus::CompletionFailed)
                .await
                .unwrap()
        ),
        [("checkout".to_owned(), 2)]
    );
    assert_eq!(
        sorted(
            store
                .count_by_name(SagaStatus::CompensationFailed)
                .await
                .unwrap()
        ),
        [("checkout".to_owned(), 1)]
    );
    assert_eq!(
        sorted(store.count_by_name(SagaStatus::Running).await.unwrap()),
        [("checkout".to_owned(), 1), ("refund".to_owned(), 1)]
    );
    assert!(
        store
            .count_by_name(SagaStatus::Completed)
            .await
            .unwrap()
            .is_empty()
    );
}
