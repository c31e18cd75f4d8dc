use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use uuid::Uuid;

/// A JSON object: the saga's input, its accumulated data, a step's output.
pub type Data = Map<String, Value>;

/// Asks the orchestrator to start a saga (published to the start queue).
///
/// Unknown fields are ignored, so a newer client can talk to an older orchestrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StartSaga {
    /// Name of a saga in the orchestrator's definition file.
    pub saga: String,
    /// The saga's input: becomes the initial saga data.
    #[serde(default)]
    pub input: Data,
    /// Requests with the same key start one saga; repeats return the first one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// The orchestrator's answer to a [`StartSaga`] that named a `reply_to` queue: the saga it
/// started, or the one an earlier request with the same idempotency key started.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SagaStartedReply {
    pub saga_id: Uuid,
    /// False when an earlier request with the same idempotency key started it.
    pub created: bool,
}

/// The orchestrator's answer to a [`StartSaga`] it will not start (the request is also
/// dead-lettered with the same reason).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StartRejected {
    /// The saga name the request asked for.
    pub saga: String,
    pub reason: RejectionReason,
    /// Details for people: which rule of `input_schema` failed, for example.
    pub detail: String,
}

/// Why a start request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectionReason {
    /// No saga of that name is defined.
    UnknownSaga,
    /// The input does not match the saga's `input_schema`, or is larger than the saga data
    /// limit.
    InvalidInput,
    /// The request breaks a rule every request follows: a message limit (size, nesting, a NUL
    /// character, an integer beyond 64 bits) or the idempotency key rule (1 to 255 printable
    /// ASCII characters); or it can never be handled. `detail` says which.
    InvalidRequest,
}

/// Whether a command runs a step's action or undoes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    /// Run the step's `action`.
    Execute,
    /// Run the step's `compensation`, undoing the action.
    Compensate,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Execute => "execute",
            Direction::Compensate => "compensate",
        }
    }
}

/// The orchestrator asks a participant to run one action or compensation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepCommand {
    /// Unique per (saga, step, direction, attempt); the same on every redelivery.
    pub message_id: Uuid,
    pub saga_id: Uuid,
    pub saga_name: String,
    pub step: String,
    pub direction: Direction,
    /// The action (or compensation) name the participant dispatches on.
    pub action: String,
    /// 1 for the first try; a retry after a retryable error or a timeout increments it.
    pub attempt: u32,
    /// The saga data: the start input with every completed step's output merged in.
    pub data: Data,
    /// On a compensation: the output this step's own action returned, if the orchestrator
    /// recorded one. Absent when the action's reply never arrived (it timed out, or the saga
    /// was stopped while it was in flight): the participant then finds what to undo in its own
    /// records, keyed by (`saga_id`, `step`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub action_output: Option<Data>,
    /// On an action: the participant must not start it after this instant. A command that
    /// arrives later is refused with `failure` and the reason [`EXPIRED`], and that refusal is
    /// recorded, so every later attempt of the step gets the same answer. Absent on
    /// compensations and on retriable steps, which must always run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
}

/// The `failure` reason of an action refused because its command expired.
pub const EXPIRED: &str = "expired";

/// A participant's answer to one [`StepCommand`], sent to the replies queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepReply {
    /// The reply's own id (for de-duplication).
    pub message_id: Uuid,
    /// The `message_id` of the command answered.
    pub in_reply_to: Uuid,
    pub saga_id: Uuid,
    pub step: String,
    pub direction: Direction,
    pub attempt: u32,
    pub outcome: Outcome,
}

/// Several [`StepCommand`]s for one participant in one message (AMQP `type`
/// `saga.step_commands`): the orchestrator packs the commands it publishes together for one
/// participant when told that participant takes them (`PACK_COMMANDS`), so that a step costs
/// the broker a fraction of a message. Each command is handled, de-duplicated and answered as
/// if it had come alone; the answers go back packed too ([`StepReplies`]), and the message is
/// acknowledged once they are confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepCommands {
    /// At least one.
    pub commands: Vec<PackedCommand>,
}

/// One command of a [`StepCommands`], with the trace context a command alone carries in its
/// headers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PackedCommand {
    pub command: StepCommand,
    /// W3C trace context of the orchestrator's span for this command, when traces are exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// The replies to the commands of one [`StepCommands`] (AMQP `type` `saga.step_replies`), sent
/// to its `reply_to` queue. The orchestrator takes these wherever it takes a [`StepReply`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepReplies {
    /// At least one.
    pub replies: Vec<PackedReply>,
}

/// One reply of a [`StepReplies`], with the trace context a reply alone carries in its headers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PackedReply {
    pub reply: StepReply,
    /// W3C trace context of the participant's span for the command, when traces are exported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracestate: Option<String>,
}

/// What happened when a participant handled a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// The local transaction committed. `output` is merged into the saga data.
    Success {
        #[serde(default)]
        output: Data,
    },
    /// A business outcome (a declined payment, no stock): final, never retried.
    Failure { reason: String },
    /// A transient problem (a dependency down): the orchestrator may retry the command.
    RetryableError { error: String },
}

/// The lifecycle of a saga as recorded in its event log, and as published on the events
/// exchange inside an [`EventEnvelope`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum SagaEvent {
    SagaStarted {
        saga_name: String,
        /// Content hash of the saga definition the saga runs.
        definition_version: String,
        input: Data,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        business_key: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        deadline_at: Option<DateTime<Utc>>,
    },
    /// A command was handed to the outbox for a participant.
    CommandSent {
        step: String,
        direction: Direction,
        attempt: u32,
        message_id: Uuid,
        timeout_at: DateTime<Utc>,
        /// When the command was decided (absent in logs written before it was added).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sent_at: Option<DateTime<Utc>>,
        /// The command's `expires_at` (actions before the point of no return).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<DateTime<Utc>>,
    },
    /// The step's action committed (or an operator marked it done by hand).
    StepCompleted {
        step: String,
        attempt: u32,
        output: Data,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        manual: bool,
        /// Who marked it done (`manual` only): the name of the API token (absent without
        /// authentication, and in logs written before it was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// The step's action will not succeed: a business failure, or its retries ran out.
    StepFailed {
        step: String,
        attempt: u32,
        reason: String,
    },
    /// One attempt failed with a retryable error.
    AttemptFailed {
        step: String,
        direction: Direction,
        attempt: u32,
        error: String,
    },
    /// One attempt got no reply in time; its action may or may not have run. The step is
    /// asked again (a new attempt); silence never decides an outcome.
    AttemptTimedOut {
        step: String,
        direction: Direction,
        attempt: u32,
    },
    /// The next attempt is due at `due_at`.
    RetryScheduled {
        step: String,
        direction: Direction,
        attempt: u32,
        due_at: DateTime<Utc>,
    },
    /// The saga passed its deadline before its point of no return.
    DeadlineExceeded,
    /// An operator asked to abort; compensation begins as soon as no pivot is in flight.
    AbortRequested {
        reason: String,
        /// Who issued the operator command: the name of the API token (absent without
        /// authentication, and in logs written before it was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// Compensation of the completed steps begins (or resumes after a late success).
    CompensationStarted {
        reason: String,
    },
    /// The step's compensation committed (or an operator marked it compensated).
    StepCompensated {
        step: String,
        attempt: u32,
        #[serde(default)]
        manual: bool,
        /// Who marked it compensated (`manual` only): the name of the API token (absent without
        /// authentication, and in logs written before it was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// A compensation could not be done; the saga waits for an operator.
    CompensationFailed {
        step: String,
        reason: String,
    },
    /// An operator asked to retry the failed compensation with a fresh budget.
    CompensationRetryRequested {
        step: String,
        /// Who issued the operator command: the name of the API token (absent without
        /// authentication, and in logs written before it was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    /// A step past the point of no return failed definitively; the saga waits for an operator
    /// to retry the step or mark it done.
    CompletionFailed {
        step: String,
        reason: String,
    },
    /// An operator asked to retry the step whose failure stopped the saga, with a fresh budget.
    StepRetryRequested {
        step: String,
        /// Who issued the operator command: the name of the API token (absent without
        /// authentication, and in logs written before it was recorded).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        by: Option<String>,
    },
    SagaCompleted,
    SagaCompensated,
}

impl SagaEvent {
    /// The `type` tag, as it appears in JSON and in the routing key on the events exchange.
    pub fn kind(&self) -> &'static str {
        match self {
            SagaEvent::SagaStarted { .. } => "saga_started",
            SagaEvent::CommandSent { .. } => "command_sent",
            SagaEvent::StepCompleted { .. } => "step_completed",
            SagaEvent::StepFailed { .. } => "step_failed",
            SagaEvent::AttemptFailed { .. } => "attempt_failed",
            SagaEvent::AttemptTimedOut { .. } => "attempt_timed_out",
            SagaEvent::RetryScheduled { .. } => "retry_scheduled",
            SagaEvent::DeadlineExceeded => "deadline_exceeded",
            SagaEvent::AbortRequested { .. } => "abort_requested",
            SagaEvent::CompensationStarted { .. } => "compensation_started",
            SagaEvent::StepCompensated { .. } => "step_compensated",
            SagaEvent::CompensationFailed { .. } => "compensation_failed",
            SagaEvent::CompensationRetryRequested { .. } => "compensation_retry_requested",
            SagaEvent::CompletionFailed { .. } => "completion_failed",
            SagaEvent::StepRetryRequested { .. } => "step_retry_requested",
            SagaEvent::SagaCompleted => "saga_completed",
            SagaEvent::SagaCompensated => "saga_compensated",
        }
    }
}

/// One recorded event with its place in the saga's log, as published on the events exchange.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct EventEnvelope {
    pub saga_id: Uuid,
    pub saga_name: String,
    /// Position in the saga's log, from 1, without gaps.
    pub seq: u64,
    pub recorded_at: DateTime<Utc>,
    pub event: SagaEvent,
}

/// The status of a saga. Stable: API clients and dashboards depend on these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SagaStatus {
    /// Executing steps forward.
    Running,
    /// Undoing completed steps in reverse order.
    Compensating,
    /// Every step succeeded. Final.
    Completed,
    /// Every completed step was undone. Final.
    Compensated,
    /// A compensation failed definitively; waits for an operator.
    CompensationFailed,
    /// A step past the point of no return failed definitively; waits for an operator.
    CompletionFailed,
}

impl SagaStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SagaStatus::Running => "running",
            SagaStatus::Compensating => "compensating",
            SagaStatus::Completed => "completed",
            SagaStatus::Compensated => "compensated",
            SagaStatus::CompensationFailed => "compensation_failed",
            SagaStatus::CompletionFailed => "completion_failed",
        }
    }

    /// No further move without an operator.
    pub fn is_settled(self) -> bool {
        !matches!(self, SagaStatus::Running | SagaStatus::Compensating)
    }

    /// Settled, but waiting for an operator rather than finished.
    pub fn needs_operator(self) -> bool {
        matches!(
            self,
            SagaStatus::CompensationFailed | SagaStatus::CompletionFailed
        )
    }

    /// Every status, in lifecycle order.
    pub const ALL: [SagaStatus; 6] = [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::Completed,
        SagaStatus::Compensated,
        SagaStatus::CompensationFailed,
        SagaStatus::CompletionFailed,
    ];
}

impl std::str::FromStr for SagaStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "running" => SagaStatus::Running,
            "compensating" => SagaStatus::Compensating,
            "completed" => SagaStatus::Completed,
            "compensated" => SagaStatus::Compensated,
            "compensation_failed" => SagaStatus::CompensationFailed,
            "completion_failed" => SagaStatus::CompletionFailed,
            other => return Err(format!("unknown saga status `{other}`")),
        })
    }
}

impl std::fmt::Display for SagaStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
