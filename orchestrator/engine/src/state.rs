//! A saga's state: the left fold of its events. Nothing here decides; it only remembers.

use chrono::{DateTime, Utc};
use saga_schemas::{Data, Direction, SagaEvent, SagaStatus};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The state is stored as JSON on every commit: fields at their default are left out of it
/// (most of a step's counters stay zero), and read back as the default.
fn is_default<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaState {
    pub saga_id: Uuid,
    pub saga_name: String,
    pub definition_version: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub business_key: Option<String>,
    pub status: SagaStatus,
    /// The start input with every completed step's output shallow-merged in.
    pub data: Data,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub deadline_exceeded: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_requested: Option<String>,
    /// Why compensation began, once it has.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compensation_reason: Option<String>,
    /// Steps in the order they were first sent, which is definition order (the steps of a
    /// parallel group are sent together, in definition order).
    pub steps: Vec<StepState>,
    /// Each settled status the saga reached, with the `seq` of the event that first reached
    /// it: a saga is counted once per status, however often it comes back to it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub settled_as: Vec<(SagaStatus, u64)>,
    /// Number of events folded: the `seq` of the last one.
    pub version: u64,
}

/// Attempts of one direction (action or compensation) of a step.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempts {
    /// The highest attempt number sent.
    #[serde(default, skip_serializing_if = "is_default")]
    pub sent: u32,
    /// The attempt awaiting its reply or its timeout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<u32>,
    /// When the next attempt (`sent + 1`) is due, if one is scheduled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_due: Option<DateTime<Utc>>,
    /// Attempts sent before the current budget began (an operator's retry resets it).
    #[serde(default, skip_serializing_if = "is_default")]
    pub budget_start: u32,
    /// Attempts of the current budget answered with a retryable error.
    #[serde(default, skip_serializing_if = "is_default")]
    pub errors: u32,
    /// Attempts in a row that got no reply in time (each one doubles the next wait).
    #[serde(default, skip_serializing_if = "is_default")]
    pub silences: u32,
}

impl Attempts {
    pub fn is_pending(&self) -> bool {
        self.in_flight.is_some() || self.retry_due.is_some()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepState {
    pub name: String,
    #[serde(default, skip_serializing_if = "is_default")]
    pub action: Attempts,
    #[serde(default, skip_serializing_if = "is_default")]
    pub compensation: Attempts,
    /// The action committed (a success reply was recorded).
    #[serde(default, skip_serializing_if = "is_default")]
    pub completed: bool,
    /// The action will not succeed (business failure or retries exhausted).
    #[serde(default, skip_serializing_if = "is_default")]
    pub failed: bool,
    /// An attempt timed out or was in flight when compensation began: it may have run.
    #[serde(default, skip_serializing_if = "is_default")]
    pub maybe_ran: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub compensated: bool,
    #[serde(default, skip_serializing_if = "is_default")]
    pub compensation_failed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<Data>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the action's first attempt was sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// After this the participant refuses to start the action (fixed at the first attempt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// The `seq` of the event that recorded the action's latest completion: the steps of a
    /// parallel group are compensated in reverse order of it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_seq: Option<u64>,
    /// The `seq` of the event that recorded the action's definitive failure: the first step
    /// of a group to fail names the group's failure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failed_seq: Option<u64>,
}

/// A step's status as shown to people (API, read model).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// No command sent yet.
    Pending,
    /// An attempt of the action is in flight.
    Running,
    /// An attempt failed with a retryable error or timed out; the next is scheduled.
    WaitingRetry,
    /// The action committed.
    Completed,
    /// The action failed definitively, or was interrupted by compensation before any reply.
    Failed,
    /// Its compensation has been sent and has not finished.
    Compensating,
    /// Its compensation committed.
    Compensated,
    /// Its compensation failed definitively; an operator decides.
    CompensationFailed,
}

impl StepState {
    fn new(name: &str) -> Self {
        StepState {
            name: name.to_owned(),
            action: Attempts::default(),
            compensation: Attempts::default(),
            completed: false,
            failed: false,
            maybe_ran: false,
            compensated: false,
            compensation_failed: false,
            output: None,
            last_error: None,
            started_at: None,
            expires_at: None,
            completed_seq: None,
            failed_seq: None,
        }
    }

    pub fn attempts_mut(&mut self, direction: Direction) -> &mut Attempts {
        match direction {
            Direction::Execute => &mut self.action,
            Direction::Compensate => &mut self.compensation,
        }
    }

    pub fn attempts(&self, direction: Direction) -> &Attempts {
        match direction {
            Direction::Execute => &self.action,
            Direction::Compensate => &self.compensation,
        }
    }

    /// The action committed or may have: undoing it is owed.
    pub fn may_need_undo(&self) -> bool {
        self.completed || self.maybe_ran
    }

    pub fn status(&self) -> StepStatus {
        if self.compensated {
            StepStatus::Compensated
        } else if self.compensation_failed {
            StepStatus::CompensationFailed
        } else if self.compensation.sent > 0 {
            StepStatus::Compensating
        } else if self.completed {
            StepStatus::Completed
        } else if self.failed {
            StepStatus::Failed
        } else if self.action.in_flight.is_some() {
            StepStatus::Running
        } else if self.action.retry_due.is_some() {
            StepStatus::WaitingRetry
        } else if self.action.sent > 0 {
            // Sent, then interrupted by compensation before any reply.
            StepStatus::Failed
        } else {
            StepStatus::Pending
        }
    }
}

impl SagaState {
    /// Rebuilds a saga's state from its whole log. `None` when the log does not begin with
    /// `saga_started`.
    pub fn fold<'a>(
        saga_id: Uuid,
        events: impl IntoIterator<Item = &'a SagaEvent>,
    ) -> Option<Self> {
        let mut events = events.into_iter();
        let mut state = SagaState::started(saga_id, events.next()?)?;
        for event in events {
            state.apply(event);
        }
        Some(state)
    }

    /// The state right after `saga_started`.
    pub fn started(saga_id: Uuid, event: &SagaEvent) -> Option<Self> {
        let SagaEvent::SagaStarted {
            saga_name,
            definition_version,
            input,
            business_key,
            deadline_at,
        } = event
        else {
            return None;
        };
        Some(SagaState {
            saga_id,
            saga_name: saga_name.clone(),
            definition_version: definition_version.clone(),
            business_key: business_key.clone(),
            status: SagaStatus::Running,
            data: input.clone(),
            deadline_at: *deadline_at,
            deadline_exceeded: false,
            abort_requested: None,
            compensation_reason: None,
            steps: Vec::new(),
            settled_as: Vec::new(),
            version: 1,
        })
    }

    pub fn step(&self, name: &str) -> Option<&StepState> {
        self.steps.iter().find(|s| s.name == name)
    }

    fn step_mut(&mut self, name: &str) -> &mut StepState {
        match self.steps.iter().position(|s| s.name == name) {
            Some(i) => &mut self.steps[i],
            None => {
                self.steps.push(StepState::new(name));
                self.steps.last_mut().expect("just pushed")
            }
        }
    }

    /// Applies one event. Total: every event is accepted as the record of what happened.
    pub fn apply(&mut self, event: &SagaEvent) {
        self.version += 1;
        match event {
            SagaEvent::SagaStarted { .. } => {}
            SagaEvent::CommandSent {
                step,
                direction,
                attempt,
                sent_at,
                expires_at,
                ..
            } => {
                let s = self.step_mut(step);
                if *direction == Direction::Execute {
                    s.started_at = s.started_at.or(*sent_at);
                    s.expires_at = s.expires_at.or(*expires_at);
                }
                let attempts = s.attempts_mut(*direction);
                attempts.sent = *attempt;
                attempts.in_flight = Some(*attempt);
                attempts.retry_due = None;
            }
            SagaEvent::StepCompleted { step, output, .. } => {
                if self.status == SagaStatus::CompletionFailed {
                    self.status = SagaStatus::Running;
                }
                let seq = self.version;
                let s = self.step_mut(step);
                s.completed = true;
                s.completed_seq = Some(seq);
                s.failed = false;
                s.action.silences = 0;
                if s.compensated {
                    // A late success after the step was undone: undo it again, with a fresh
                    // budget, and ignore stray replies to the earlier compensation.
                    s.compensated = false;
                    s.compensation.budget_start = s.compensation.sent;
                    s.compensation.errors = 0;
                }
                s.output = Some(output.clone());
                s.action.in_flight = None;
                s.action.retry_due = None;
                for (key, value) in output {
                    self.data.insert(key.clone(), value.clone());
                }
            }
            SagaEvent::StepFailed { step, reason, .. } => {
                let seq = self.version;
                let s = self.step_mut(step);
                s.failed = true;
                s.failed_seq = Some(seq);
                s.action.silences = 0;
                s.last_error = Some(reason.clone());
                s.action.in_flight = None;
                s.action.retry_due = None;
            }
            SagaEvent::AttemptFailed {
                step,
                direction,
                attempt,
                error,
            } => {
                let s = self.step_mut(step);
                s.last_error = Some(error.clone());
                let attempts = s.attempts_mut(*direction);
                attempts.errors += 1;
                attempts.silences = 0;
                if attempts.in_flight == Some(*attempt) {
                    attempts.in_flight = None;
                }
            }
            SagaEvent::AttemptTimedOut {
                step,
                direction,
                attempt,
            } => {
                let s = self.step_mut(step);
                if *direction == Direction::Execute {
                    s.maybe_ran = true;
                }
                s.last_error = Some(format!("attempt {attempt} got no reply in time"));
                let attempts = s.attempts_mut(*direction);
                attempts.silences += 1;
                if attempts.in_flight == Some(*attempt) {
                    attempts.in_flight = None;
                }
            }
            SagaEvent::RetryScheduled {
                step,
                direction,
                due_at,
                ..
            } => {
                self.step_mut(step).attempts_mut(*direction).retry_due = Some(*due_at);
            }
            SagaEvent::DeadlineExceeded => self.deadline_exceeded = true,
            SagaEvent::AbortRequested { reason, .. } => self.abort_requested = Some(reason.clone()),
            SagaEvent::CompensationStarted { reason } => {
                self.status = SagaStatus::Compensating;
                self.compensation_reason = Some(reason.clone());
                for s in &mut self.steps {
                    if s.action.in_flight.take().is_some() {
                        s.maybe_ran = true;
                    }
                    s.action.retry_due = None;
                }
            }
            SagaEvent::StepCompensated { step, .. } => {
                let s = self.step_mut(step);
                s.compensated = true;
                s.compensation_failed = false;
                s.compensation.silences = 0;
                s.compensation.in_flight = None;
                s.compensation.retry_due = None;
                if self.status == SagaStatus::CompensationFailed
                    && !self.steps.iter().any(|s| s.compensation_failed)
                {
                    self.status = SagaStatus::Compensating;
                }
            }
            SagaEvent::CompensationFailed { step, reason } => {
                let s = self.step_mut(step);
                s.compensation_failed = true;
                s.last_error = Some(reason.clone());
                s.compensation.in_flight = None;
                s.compensation.retry_due = None;
                s.compensation.silences = 0;
                self.settle(SagaStatus::CompensationFailed);
            }
            SagaEvent::CompensationRetryRequested { step, .. } => {
                let s = self.step_mut(step);
                s.compensation_failed = false;
                s.compensation.budget_start = s.compensation.sent;
                s.compensation.errors = 0;
                self.status = SagaStatus::Compensating;
            }
            SagaEvent::CompletionFailed { step, reason } => {
                let s = self.step_mut(step);
                s.failed = true;
                s.last_error = Some(reason.clone());
                s.action.in_flight = None;
                s.action.retry_due = None;
                s.action.silences = 0;
                self.settle(SagaStatus::CompletionFailed);
            }
            SagaEvent::StepRetryRequested { step, .. } => {
                let s = self.step_mut(step);
                s.failed = false;
                s.action.budget_start = s.action.sent;
                s.action.errors = 0;
                self.status = SagaStatus::Running;
            }
            SagaEvent::SagaCompleted => self.settle(SagaStatus::Completed),
            SagaEvent::SagaCompensated => self.settle(SagaStatus::Compensated),
        }
    }

    fn settle(&mut self, status: SagaStatus) {
        self.status = status;
        if !self.settled_as.iter().any(|(s, _)| *s == status) {
            self.settled_as.push((status, self.version));
        }
    }

    /// Whether the event at `seq` is the first that brought the saga to `status`.
    pub fn first_settled_at(&self, status: SagaStatus, seq: u64) -> bool {
        self.settled_as.contains(&(status, seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Snapshots stored before defaults were left out spell every field; they still read.
    #[test]
    fn a_snapshot_with_every_field_spelled_reads_as_the_compact_one() {
        let full = r#"{"saga_id":"00000000-0000-0000-0000-000000000007","saga_name":"s",
            "definition_version":"v1","business_key":null,"status":"compensated","data":{},
            "deadline_at":null,"deadline_exceeded":false,"abort_requested":null,
            "compensation_reason":"declined","steps":[{"name":"a",
            "action":{"sent":1,"in_flight":null,"retry_due":null,"budget_start":0,"errors":0,"silences":0},
            "compensation":{"sent":0,"in_flight":null,"retry_due":null,"budget_start":0,"errors":0,"silences":0},
            "completed":false,"failed":true,"maybe_ran":false,"compensated":false,
            "compensation_failed":false,"output":null,"last_error":"declined",
            "started_at":null,"expires_at":null,"completed_seq":null,"failed_seq":3}],
            "settled_as":[["compensated",4]],"version":4}"#;
        let compact = r#"{"saga_id":"00000000-0000-0000-0000-000000000007","saga_name":"s",
            "definition_version":"v1","status":"compensated","data":{},
            "compensation_reason":"declined","steps":[{"name":"a","action":{"sent":1},
            "failed":true,"last_error":"declined","failed_seq":3}],
            "settled_as":[["compensated",4]],"version":4}"#;
        let from_full: SagaState = serde_json::from_str(full).expect("full form reads");
        let from_compact: SagaState = serde_json::from_str(compact).expect("compact form reads");
        assert_eq!(from_full, from_compact);
        assert_eq!(
            serde_json::to_value(&from_full).expect("serializes"),
            serde_json::from_str::<serde_json::Value>(compact).expect("json"),
            "what is written leaves out every field at its default"
        );
    }
}
