//! A given/when/then harness over the pure engine, shared by the engine's test files.
#![allow(dead_code)]

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use saga_engine::definition::{DEFAULT_RETRY, RetryPolicy};
use saga_engine::engine::command_message_id;
use saga_engine::{
    Decision, Input, OperatorCommand, Outcome, SagaDefinition, SagaState, StepDefinition, StepKind,
    TimerChange, TimerKind, decide,
};
use saga_schemas::{Data, Direction, Outcome as Reply, SagaEvent, SagaStatus};
use serde_json::{Value, json};
use uuid::Uuid;

pub const STEP_TIMEOUT: Duration = Duration::from_secs(5);
pub const EXPIRY: Duration = Duration::from_secs(60);

pub fn step(name: &str, kind: StepKind) -> StepDefinition {
    StepDefinition {
        name: name.to_owned(),
        participant: format!("{name}-service"),
        action: format!("do_{name}"),
        compensation: (kind == StepKind::Compensatable).then(|| format!("undo_{name}")),
        kind,
        timeout: STEP_TIMEOUT,
        expiry: (kind != StepKind::Retriable).then_some(EXPIRY),
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

pub fn saga(steps: Vec<StepDefinition>) -> SagaDefinition {
    SagaDefinition {
        name: "test-saga".into(),
        version: "v1".into(),
        deadline: None,
        input_schema: None,
        steps,
    }
}

/// order (compensatable), stock (compensatable), pay (pivot), ship (retriable).
pub fn checkout() -> SagaDefinition {
    saga(vec![
        step("order", StepKind::Compensatable),
        step("stock", StepKind::Compensatable),
        step("pay", StepKind::Pivot),
        step("ship", StepKind::Retriable),
    ])
}

pub fn object(value: Value) -> Data {
    match value {
        Value::Object(map) => map,
        other => panic!("not an object: {other}"),
    }
}

pub fn ok(step: &str, attempt: u32, output: Value) -> Input {
    reply(
        step,
        Direction::Execute,
        attempt,
        Reply::Success {
            output: object(output),
        },
    )
}

pub fn fail(step: &str, attempt: u32, reason: &str) -> Input {
    reply(
        step,
        Direction::Execute,
        attempt,
        Reply::Failure {
            reason: reason.into(),
        },
    )
}

pub fn error(step: &str, attempt: u32, error: &str) -> Input {
    reply(
        step,
        Direction::Execute,
        attempt,
        Reply::RetryableError {
            error: error.into(),
        },
    )
}

pub fn undone(step: &str, attempt: u32) -> Input {
    reply(
        step,
        Direction::Compensate,
        attempt,
        Reply::Success {
            output: Data::new(),
        },
    )
}

pub fn undo_error(step: &str, attempt: u32) -> Input {
    reply(
        step,
        Direction::Compensate,
        attempt,
        Reply::RetryableError {
            error: "db down".into(),
        },
    )
}

pub fn undo_fail(step: &str, attempt: u32) -> Input {
    reply(
        step,
        Direction::Compensate,
        attempt,
        Reply::Failure {
            reason: "cannot".into(),
        },
    )
}

/// The saga every scenario runs.
pub const SAGA_ID: Uuid = Uuid::from_u128(42);

/// The participant's answer to the command the saga sent for (step, direction, attempt).
pub fn reply(step: &str, direction: Direction, attempt: u32, outcome: Reply) -> Input {
    answer_to(
        step,
        direction,
        attempt,
        command_message_id(SAGA_ID, step, direction, attempt),
        outcome,
    )
}

/// A reply that says it answers the command `in_reply_to`.
pub fn answer_to(
    step: &str,
    direction: Direction,
    attempt: u32,
    in_reply_to: Uuid,
    outcome: Reply,
) -> Input {
    Input::Reply {
        step: step.into(),
        direction,
        attempt,
        in_reply_to,
        outcome,
    }
}

pub fn timed_out(step: &str, direction: Direction, attempt: u32) -> Input {
    Input::Timer(TimerKind::StepTimeout {
        step: step.into(),
        direction,
        attempt,
    })
}

pub fn retry_due(step: &str, direction: Direction, attempt: u32) -> Input {
    Input::Timer(TimerKind::Retry {
        step: step.into(),
        direction,
        attempt,
    })
}

pub fn deadline() -> Input {
    Input::Timer(TimerKind::Deadline)
}

pub fn operator(command: OperatorCommand) -> Input {
    Input::operator(command)
}

pub fn abort() -> Input {
    operator(OperatorCommand::Abort {
        reason: "customer cancelled".into(),
    })
}

pub fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 1, 1, 12, 0, 0).unwrap()
}

/// A saga's history so far; `when` applies one more input and keeps the decision.
#[derive(Clone)]
pub struct Scenario {
    pub def: SagaDefinition,
    pub saga_id: Uuid,
    pub state: Option<SagaState>,
    pub log: Vec<SagaEvent>,
    pub now: DateTime<Utc>,
    pub last: Option<Decision>,
}

pub fn given(def: SagaDefinition) -> Scenario {
    Scenario {
        def,
        saga_id: SAGA_ID,
        state: None,
        log: Vec::new(),
        now: t0(),
        last: None,
    }
}

impl Scenario {
    pub fn started(self) -> Self {
        self.started_with(json!({"customer": "ada"}))
    }

    pub fn started_with(self, input: Value) -> Self {
        let saga_id = self.saga_id;
        self.when(Input::Start {
            saga_id,
            input: object(input),
            business_key: None,
        })
    }

    /// Advances the clock.
    pub fn after(mut self, elapsed: Duration) -> Self {
        self.now += elapsed;
        self
    }

    /// Applies each input in turn (the "given" part of a test).
    pub fn and(mut self, inputs: impl IntoIterator<Item = Input>) -> Self {
        for input in inputs {
            self = self.when(input);
        }
        self
    }

    /// Applies one input; every decision is checked against a replay of the whole log.
    pub fn when(mut self, input: Input) -> Self {
        let decision = decide(&self.def, self.state.as_ref(), &input, self.now);
        self.log.extend(decision.events.iter().cloned());
        if let Some(state) = &decision.state {
            let replayed = SagaState::fold(self.saga_id, &self.log).expect("log starts a saga");
            assert_eq!(
                &replayed, state,
                "replaying the log must give the decided state"
            );
        }
        if decision.outcome != Outcome::Applied {
            assert!(decision.events.is_empty() && decision.commands.is_empty());
        }
        self.state = decision.state.clone();
        self.last = Some(decision);
        self
    }

    pub fn decision(&self) -> &Decision {
        self.last.as_ref().expect("no input applied yet")
    }

    pub fn outcome(&self) -> &Outcome {
        &self.decision().outcome
    }

    /// Types of the events the last input recorded.
    pub fn events(&self) -> Vec<&'static str> {
        self.decision().events.iter().map(SagaEvent::kind).collect()
    }

    /// (step, direction, attempt) of the commands the last input sent.
    pub fn commands(&self) -> Vec<(String, Direction, u32)> {
        self.decision()
            .commands
            .iter()
            .map(|c| (c.step.clone(), c.direction, c.attempt))
            .collect()
    }

    pub fn scheduled(&self) -> Vec<(TimerKind, DateTime<Utc>)> {
        self.decision()
            .timers
            .iter()
            .filter_map(|t| match t {
                TimerChange::Schedule { timer, due_at } => Some((timer.clone(), *due_at)),
                TimerChange::Cancel { .. } => None,
            })
            .collect()
    }

    pub fn cancelled(&self) -> Vec<TimerKind> {
        self.decision()
            .timers
            .iter()
            .filter_map(|t| match t {
                TimerChange::Cancel { timer } => Some(timer.clone()),
                TimerChange::Schedule { .. } => None,
            })
            .collect()
    }

    pub fn status(&self) -> SagaStatus {
        self.state.as_ref().expect("saga exists").status
    }

    pub fn ignored(&self) -> bool {
        matches!(self.outcome(), Outcome::Ignored(_))
    }

    pub fn rejected(&self) -> bool {
        matches!(self.outcome(), Outcome::Rejected(_))
    }
}

pub fn exec(step: &str, attempt: u32) -> (String, Direction, u32) {
    (step.to_owned(), Direction::Execute, attempt)
}

pub fn comp(step: &str, attempt: u32) -> (String, Direction, u32) {
    (step.to_owned(), Direction::Compensate, attempt)
}
