//! The runtime against hostile input: saga data held to its size limit, operators settling a
//! step past the point of no return. In-process, on SQLite in memory; no broker needed.

use orchestrator::runtime::{Runtime, RuntimeError, Work};
use orchestrator::store::Store;
use saga_engine::engine::command_message_id;
use saga_engine::{Definitions, Input, OperatorCommand, Outcome};
use saga_schemas::limits::MAX_DATA_BYTES;
use saga_schemas::{Data, Direction, Outcome as Reply, SagaStatus};
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
