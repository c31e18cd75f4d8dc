//! The decision function: given a saga's definition, its state and one input, what to
//! record and what to send. Deterministic: the same arguments always give the same decision.

use chrono::{DateTime, Utc};
use saga_schemas::{Data, Direction, Outcome as ReplyOutcome, SagaEvent, SagaStatus, StepCommand};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::definition::{SagaDefinition, StepKind};
use crate::state::SagaState;

/// Namespace of the deterministic command message ids (UUID v5).
const MESSAGE_ID_NAMESPACE: Uuid = Uuid::from_u128(0x5a6a_0c1d_9e2f_4b7a_8c3d_2e1f_0a9b_8c7d);

/// The message id of one command: stable, so a re-sent command is recognisably the same.
pub fn command_message_id(saga_id: Uuid, step: &str, direction: Direction, attempt: u32) -> Uuid {
    let name = format!("{saga_id}/{step}/{}/{attempt}", direction.as_str());
    Uuid::new_v5(&MESSAGE_ID_NAMESPACE, name.as_bytes())
}

/// One thing that happened to a saga.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Input {
    Start {
        saga_id: Uuid,
        input: Data,
        #[serde(default)]
        business_key: Option<String>,
    },
    Reply {
        step: String,
        direction: Direction,
        attempt: u32,
        outcome: ReplyOutcome,
    },
    Timer(TimerKind),
    Operator(OperatorCommand),
}

/// Timers the runtime keeps (in SQL) and feeds back as [`Input::Timer`] when due.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "timer", rename_all = "snake_case")]
pub enum TimerKind {
    StepTimeout {
        step: String,
        direction: Direction,
        attempt: u32,
    },
    Retry {
        step: String,
        direction: Direction,
        attempt: u32,
    },
    Deadline,
}

impl TimerKind {
    /// Unique per saga: the runtime's key for scheduling and cancelling.
    pub fn key(&self) -> String {
        match self {
            TimerKind::StepTimeout {
                step,
                direction,
                attempt,
            } => format!("timeout/{step}/{}/{attempt}", direction.as_str()),
            TimerKind::Retry {
                step,
                direction,
                attempt,
            } => format!("retry/{step}/{}/{attempt}", direction.as_str()),
            TimerKind::Deadline => "deadline".to_owned(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum TimerChange {
    Schedule {
        timer: TimerKind,
        due_at: DateTime<Utc>,
    },
    Cancel {
        timer: TimerKind,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum OperatorCommand {
    /// Compensate a running saga that has not passed its point of no return.
    Abort { reason: String },
    /// Retry the failed compensation with a fresh budget.
    RetryCompensation,
    /// The operator undid the step by hand.
    MarkCompensated { step: String },
}

/// Whether the input moved the saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Applied,
    /// Nothing to do: a duplicate, a stale reply or timer, a reply for an unknown saga.
    Ignored(String),
    /// An operator command that does not apply to the saga as it is.
    Rejected(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub outcome: Outcome,
    /// To append to the saga's log, in order.
    pub events: Vec<SagaEvent>,
    /// To hand to the outbox, in the same transaction as the events.
    pub commands: Vec<StepCommand>,
    pub timers: Vec<TimerChange>,
    /// The state after `events`; `None` only for an input about a saga that does not exist.
    pub state: Option<SagaState>,
}

impl Decision {
    fn without_change(state: Option<&SagaState>, outcome: Outcome) -> Self {
        Decision {
            outcome,
            events: Vec::new(),
            commands: Vec::new(),
            timers: Vec::new(),
            state: state.cloned(),
        }
    }
}

/// Decides what `input` means for the saga. `state` is `None` for a saga not yet started.
pub fn decide(
    def: &SagaDefinition,
    state: Option<&SagaState>,
    input: &Input,
    now: DateTime<Utc>,
) -> Decision {
    let Some(state) = state else {
        return match input {
            Input::Start {
                saga_id,
                input,
                business_key,
            } => start(def, *saga_id, input, business_key.clone(), now),
            _ => Decision::without_change(None, Outcome::Ignored("unknown saga".into())),
        };
    };
    let mut ctx = Ctx {
        def,
        state: state.clone(),
        now,
        events: Vec::new(),
        commands: Vec::new(),
        timers: Vec::new(),
    };
    let result = match input {
        Input::Start { .. } => Err(Outcome::Ignored("saga already started".into())),
        Input::Reply {
            step,
            direction,
            attempt,
            outcome,
        } => ctx.reply(step, *direction, *attempt, outcome),
        Input::Timer(timer) => ctx.timer(timer),
        Input::Operator(command) => ctx.operator(command),
    };
    match result {
        Ok(()) => ctx.into_decision(),
        Err(outcome) => Decision::without_change(Some(state), outcome),
    }
}

fn start(
    def: &SagaDefinition,
    saga_id: Uuid,
    input: &Data,
    business_key: Option<String>,
    now: DateTime<Utc>,
) -> Decision {
    let deadline_at = def.deadline.map(|d| now + d);
    let started = SagaEvent::SagaStarted {
        saga_name: def.name.clone(),
        definition_version: def.version.clone(),
        input: input.clone(),
        business_key,
        deadline_at,
    };
    let state = SagaState::started(saga_id, &started).expect("saga_started starts a state");
    let mut ctx = Ctx {
        def,
        state,
        now,
        events: vec![started],
        commands: Vec::new(),
        timers: Vec::new(),
    };
    if let Some(due_at) = deadline_at {
        ctx.timers.push(TimerChange::Schedule {
            timer: TimerKind::Deadline,
            due_at,
        });
    }
    ctx.send(0, Direction::Execute, 1);
    ctx.into_decision()
}

/// Why an input changes nothing.
type Verdict = Result<(), Outcome>;

fn ignore(why: impl Into<String>) -> Verdict {
    Err(Outcome::Ignored(why.into()))
}

fn reject(why: impl Into<String>) -> Verdict {
    Err(Outcome::Rejected(why.into()))
}

/// A decision under construction: each emitted event is folded at once, so later rules see
/// the state it leads to.
struct Ctx<'a> {
    def: &'a SagaDefinition,
    state: SagaState,
    now: DateTime<Utc>,
    events: Vec<SagaEvent>,
    commands: Vec<StepCommand>,
    timers: Vec<TimerChange>,
}

impl Ctx<'_> {
    fn into_decision(self) -> Decision {
        Decision {
            outcome: Outcome::Applied,
            events: self.events,
            commands: self.commands,
            timers: self.timers,
            state: Some(self.state),
        }
    }

    fn emit(&mut self, event: SagaEvent) {
        self.state.apply(&event);
        self.events.push(event);
    }

    fn schedule(&mut self, timer: TimerKind, due_at: DateTime<Utc>) {
        self.timers.push(TimerChange::Schedule { timer, due_at });
    }

    fn cancel(&mut self, timer: TimerKind) {
        self.timers.push(TimerChange::Cancel { timer });
    }

    fn step_name(&self, index: usize) -> &str {
        &self.def.steps[index].name
    }

    /// Index and state of a step that has had at least one command sent.
    fn sent_step(&self, name: &str) -> Result<(usize, crate::state::StepState), Outcome> {
        let (index, _) = self
            .def
            .step(name)
            .ok_or_else(|| Outcome::Ignored(format!("step `{name}` is not in the definition")))?;
        let step =
            self.state.step(name).cloned().ok_or_else(|| {
                Outcome::Ignored(format!("no command was sent for step `{name}`"))
            })?;
        Ok((index, step))
    }

    /// Past the pivot (or into the retriable steps): the saga can only go forward now.
    fn committed(&self) -> bool {
        self.def.steps.iter().any(|d| {
            self.state.step(&d.name).is_some_and(|s| match d.kind {
                StepKind::Pivot => s.completed,
                StepKind::Retriable => s.action.sent > 0,
                StepKind::Compensatable => false,
            })
        })
    }

    fn pivot_in_flight(&self) -> bool {
        self.def.steps.iter().any(|d| {
            d.kind == StepKind::Pivot
                && self
                    .state
                    .step(&d.name)
                    .is_some_and(|s| s.action.in_flight.is_some())
        })
    }

    fn send(&mut self, index: usize, direction: Direction, attempt: u32) {
        let step = &self.def.steps[index];
        let saga_id = self.state.saga_id;
        let message_id = command_message_id(saga_id, &step.name, direction, attempt);
        let timeout_at = self.now + step.timeout;
        let (action, action_output) = match direction {
            Direction::Execute => (step.action.clone(), None),
            Direction::Compensate => (
                step.compensation.clone().unwrap_or_default(),
                self.state.step(&step.name).and_then(|s| s.output.clone()),
            ),
        };
        self.emit(SagaEvent::CommandSent {
            step: step.name.clone(),
            direction,
            attempt,
            message_id,
            timeout_at,
            sent_at: Some(self.now),
        });
        self.commands.push(StepCommand {
            message_id,
            saga_id,
            saga_name: self.def.name.clone(),
            step: step.name.clone(),
            direction,
            action,
            attempt,
            data: self.state.data.clone(),
            action_output,
        });
        self.schedule(
            TimerKind::StepTimeout {
                step: step.name.clone(),
                direction,
                attempt,
            },
            timeout_at,
        );
    }

    /// Cancels the timers of whatever is pending for a step in one direction.
    fn cancel_pending(&mut self, name: &str, direction: Direction) {
        let Some(attempts) = self.state.step(name).map(|s| s.attempts(direction).clone()) else {
            return;
        };
        if let Some(attempt) = attempts.in_flight {
            self.cancel(TimerKind::StepTimeout {
                step: name.to_owned(),
                direction,
                attempt,
            });
        }
        if attempts.retry_due.is_some() {
            self.cancel(TimerKind::Retry {
                step: name.to_owned(),
                direction,
                attempt: attempts.sent + 1,
            });
        }
    }

    fn reply(
        &mut self,
        name: &str,
        direction: Direction,
        attempt: u32,
        outcome: &ReplyOutcome,
    ) -> Verdict {
        let (index, step) = self.sent_step(name)?;
        if attempt == 0 || attempt > step.attempts(direction).sent {
            return ignore(format!(
                "no {} attempt {attempt} was sent for step `{name}`",
                direction.as_str()
            ));
        }
        match direction {
            Direction::Execute => self.action_reply(index, attempt, outcome),
            Direction::Compensate => self.compensation_reply(index, attempt, outcome),
        }
    }

    fn action_reply(&mut self, index: usize, attempt: u32, outcome: &ReplyOutcome) -> Verdict {
        let def = &self.def.steps[index];
        let name = def.name.clone();
        let kind = def.kind;
        let step = self.state.step(&name).cloned().expect("sent step");
        if step.completed {
            return ignore(format!("step `{name}` already completed"));
        }
        let latest = attempt == step.action.sent;
        match outcome {
            ReplyOutcome::Success { output } => {
                self.cancel_pending(&name, Direction::Execute);
                self.emit(SagaEvent::StepCompleted {
                    step: name.clone(),
                    attempt,
                    output: output.clone(),
                });
                match self.state.status {
                    SagaStatus::Running => self.advance(index),
                    // A success after compensation began: its action ran, so undo it too.
                    SagaStatus::Compensating => self.continue_compensation(),
                    SagaStatus::Compensated => {
                        self.emit(SagaEvent::CompensationStarted {
                            reason: format!(
                                "step `{name}` completed after the saga was compensated"
                            ),
                        });
                        self.continue_compensation();
                    }
                    // The operator's next command resumes compensation, this step included.
                    SagaStatus::CompensationFailed | SagaStatus::Completed => {}
                }
                Ok(())
            }
            _ if self.state.status != SagaStatus::Running => {
                ignore(format!("step `{name}` failed after compensation began"))
            }
            _ if step.failed || !latest => ignore(format!(
                "stale reply for attempt {attempt} of step `{name}`"
            )),
            ReplyOutcome::Failure { reason } if kind != StepKind::Retriable => {
                self.cancel_pending(&name, Direction::Execute);
                self.emit(SagaEvent::StepFailed {
                    step: name.clone(),
                    attempt,
                    reason: reason.clone(),
                });
                self.begin_compensation(format!("step `{name}` failed: {reason}"));
                Ok(())
            }
            ReplyOutcome::Failure { reason } => {
                // A retriable step cannot fail for business reasons: retry it regardless.
                self.retryable_error(
                    index,
                    attempt,
                    format!("business failure from a retriable step: {reason}"),
                )
            }
            ReplyOutcome::RetryableError { error } => {
                self.retryable_error(index, attempt, error.clone())
            }
        }
    }

    fn retryable_error(&mut self, index: usize, attempt: u32, error: String) -> Verdict {
        let name = self.step_name(index).to_owned();
        let in_flight = self.state.step(&name).and_then(|s| s.action.in_flight);
        if in_flight != Some(attempt) {
            return ignore(format!(
                "attempt {attempt} of step `{name}` is no longer awaited"
            ));
        }
        self.cancel_pending(&name, Direction::Execute);
        self.emit(SagaEvent::AttemptFailed {
            step: name,
            direction: Direction::Execute,
            attempt,
            error: error.clone(),
        });
        self.retry_or_fail(index, error);
        Ok(())
    }

    /// After an attempt of an action failed without a final answer.
    fn retry_or_fail(&mut self, index: usize, error: String) {
        let def = &self.def.steps[index];
        let name = def.name.clone();
        let sent = self.state.step(&name).map_or(0, |s| s.action.sent);
        let stopping = self.state.deadline_exceeded || self.state.abort_requested.is_some();
        let may_retry = match def.kind {
            StepKind::Retriable => true,
            _ => !stopping && sent < def.retry.max_attempts,
        };
        if may_retry {
            let next = sent + 1;
            let due_at = self.now + def.retry.delay_before(next);
            self.emit(SagaEvent::RetryScheduled {
                step: name.clone(),
                direction: Direction::Execute,
                attempt: next,
                due_at,
            });
            self.schedule(
                TimerKind::Retry {
                    step: name,
                    direction: Direction::Execute,
                    attempt: next,
                },
                due_at,
            );
            return;
        }
        let reason = if stopping {
            format!("{error}; not retried: the saga is being stopped")
        } else {
            format!("{error}; gave up after {sent} attempts")
        };
        self.emit(SagaEvent::StepFailed {
            step: name.clone(),
            attempt: sent,
            reason: reason.clone(),
        });
        let why = match &self.state.abort_requested {
            Some(abort) => format!("aborted: {abort}"),
            None => format!("step `{name}` failed: {reason}"),
        };
        self.begin_compensation(why);
    }

    /// Step `index` completed while running forward.
    fn advance(&mut self, index: usize) {
        let next = index + 1;
        let commits = self.def.steps[index].kind == StepKind::Pivot
            || self
                .def
                .steps
                .get(next)
                .is_some_and(|s| s.kind == StepKind::Retriable);
        if self.state.deadline_at.is_some() && (commits || next == self.def.steps.len()) {
            self.cancel(TimerKind::Deadline);
        }
        if next < self.def.steps.len() {
            self.send(next, Direction::Execute, 1);
        } else {
            self.emit(SagaEvent::SagaCompleted);
        }
    }

    fn begin_compensation(&mut self, reason: String) {
        if self.state.deadline_at.is_some() && !self.state.deadline_exceeded {
            self.cancel(TimerKind::Deadline);
        }
        let pending: Vec<String> = self
            .state
            .steps
            .iter()
            .filter(|s| s.action.is_pending())
            .map(|s| s.name.clone())
            .collect();
        for name in pending {
            self.cancel_pending(&name, Direction::Execute);
        }
        self.emit(SagaEvent::CompensationStarted { reason });
        self.continue_compensation();
    }

    /// Sends the next compensation, in reverse step order, or settles the saga.
    fn continue_compensation(&mut self) {
        if self.state.status != SagaStatus::Compensating
            || self.state.steps.iter().any(|s| s.compensation.is_pending())
        {
            return;
        }
        let owed = self.def.steps.iter().enumerate().rev().find(|(_, d)| {
            d.kind == StepKind::Compensatable
                && self
                    .state
                    .step(&d.name)
                    .is_some_and(|s| s.may_need_undo() && !s.compensated && !s.compensation_failed)
        });
        if let Some((index, _)) = owed {
            let next = self
                .state
                .steps
                .iter()
                .find(|s| s.name == self.def.steps[index].name);
            let attempt = next.map_or(0, |s| s.compensation.sent) + 1;
            self.send(index, Direction::Compensate, attempt);
            return;
        }
        let unreconciled = self.def.steps.iter().find(|d| {
            d.kind == StepKind::Pivot
                && self
                    .state
                    .step(&d.name)
                    .is_some_and(|s| s.completed && !s.compensated)
        });
        if let Some(pivot) = unreconciled {
            self.emit(SagaEvent::CompensationFailed {
                step: pivot.name.clone(),
                reason: "the pivot completed after compensation began and has no compensation: \
                         reconcile it by hand, then mark it compensated"
                    .into(),
            });
        } else {
            self.emit(SagaEvent::SagaCompensated);
        }
    }

    fn compensation_reply(
        &mut self,
        index: usize,
        attempt: u32,
        outcome: &ReplyOutcome,
    ) -> Verdict {
        let name = self.step_name(index).to_owned();
        let step = self.state.step(&name).cloned().expect("sent step");
        if step.compensated {
            return ignore(format!("step `{name}` already compensated"));
        }
        let current_budget = attempt > step.compensation.budget_start
            || self.state.status == SagaStatus::CompensationFailed;
        match outcome {
            ReplyOutcome::Success { .. } if !current_budget => ignore(format!(
                "compensation attempt {attempt} of step `{name}` belongs to an earlier budget"
            )),
            ReplyOutcome::Success { .. } => {
                // Late good news is still good news, even after the budget ran out.
                self.cancel_pending(&name, Direction::Compensate);
                self.emit(SagaEvent::StepCompensated {
                    step: name,
                    attempt,
                    manual: false,
                });
                self.continue_compensation();
                Ok(())
            }
            _ if step.compensation.in_flight != Some(attempt) => ignore(format!(
                "compensation attempt {attempt} of step `{name}` is no longer awaited"
            )),
            ReplyOutcome::Failure { reason } => {
                self.cancel_pending(&name, Direction::Compensate);
                self.emit(SagaEvent::CompensationFailed {
                    step: name,
                    reason: reason.clone(),
                });
                Ok(())
            }
            ReplyOutcome::RetryableError { error } => {
                self.cancel_pending(&name, Direction::Compensate);
                self.emit(SagaEvent::AttemptFailed {
                    step: name,
                    direction: Direction::Compensate,
                    attempt,
                    error: error.clone(),
                });
                self.retry_or_fail_compensation(index, error.clone());
                Ok(())
            }
        }
    }

    fn retry_or_fail_compensation(&mut self, index: usize, error: String) {
        let def = &self.def.steps[index];
        let name = def.name.clone();
        let attempts = self
            .state
            .step(&name)
            .map(|s| s.compensation.clone())
            .unwrap_or_default();
        if attempts.used() < def.compensation_retry.max_attempts {
            let next = attempts.sent + 1;
            let due_at = self.now + def.compensation_retry.delay_before(attempts.used() + 1);
            self.emit(SagaEvent::RetryScheduled {
                step: name.clone(),
                direction: Direction::Compensate,
                attempt: next,
                due_at,
            });
            self.schedule(
                TimerKind::Retry {
                    step: name,
                    direction: Direction::Compensate,
                    attempt: next,
                },
                due_at,
            );
        } else {
            self.emit(SagaEvent::CompensationFailed {
                step: name,
                reason: format!("{error}; gave up after {} attempts", attempts.used()),
            });
        }
    }

    fn timer(&mut self, timer: &TimerKind) -> Verdict {
        match timer {
            TimerKind::StepTimeout {
                step,
                direction,
                attempt,
            } => {
                let (index, state) = self.sent_step(step)?;
                if state.attempts(*direction).in_flight != Some(*attempt) {
                    return ignore(format!(
                        "attempt {attempt} of `{step}` was already answered"
                    ));
                }
                self.emit(SagaEvent::AttemptTimedOut {
                    step: step.clone(),
                    direction: *direction,
                    attempt: *attempt,
                });
                let error = format!(
                    "no reply within {}",
                    humantime::format_duration(self.def.steps[index].timeout)
                );
                match direction {
                    Direction::Execute => self.retry_or_fail(index, error),
                    Direction::Compensate => self.retry_or_fail_compensation(index, error),
                }
                Ok(())
            }
            TimerKind::Retry {
                step,
                direction,
                attempt,
            } => {
                let (index, state) = self.sent_step(step)?;
                let attempts = state.attempts(*direction);
                let expected_status = match direction {
                    Direction::Execute => SagaStatus::Running,
                    Direction::Compensate => SagaStatus::Compensating,
                };
                if attempts.retry_due.is_none()
                    || *attempt != attempts.sent + 1
                    || self.state.status != expected_status
                {
                    return ignore(format!("retry {attempt} of `{step}` is no longer due"));
                }
                self.send(index, *direction, *attempt);
                Ok(())
            }
            TimerKind::Deadline => {
                if self.state.status != SagaStatus::Running
                    || self.committed()
                    || self.state.deadline_exceeded
                {
                    return ignore("the deadline no longer applies");
                }
                self.emit(SagaEvent::DeadlineExceeded);
                // An in-flight pivot decides: if it succeeds, the saga must finish.
                if !self.pivot_in_flight() {
                    self.begin_compensation("saga deadline exceeded".into());
                }
                Ok(())
            }
        }
    }

    fn operator(&mut self, command: &OperatorCommand) -> Verdict {
        let status = self.state.status;
        match command {
            OperatorCommand::Abort { reason } => {
                if status != SagaStatus::Running {
                    return reject(format!(
                        "only a running saga can be aborted; it is {}",
                        status.as_str()
                    ));
                }
                if self.committed() {
                    return reject("the saga is past its point of no return and must complete");
                }
                if self.state.abort_requested.is_some() {
                    return ignore("abort already requested");
                }
                self.emit(SagaEvent::AbortRequested {
                    reason: reason.clone(),
                });
                if !self.pivot_in_flight() {
                    self.begin_compensation(format!("aborted: {reason}"));
                }
                Ok(())
            }
            OperatorCommand::RetryCompensation => {
                let failed = self.failed_compensation()?;
                let is_pivot = self
                    .def
                    .step(&failed)
                    .is_some_and(|(_, d)| d.kind != StepKind::Compensatable);
                if is_pivot {
                    return reject(format!(
                        "step `{failed}` has no compensation: reconcile it by hand, then mark it compensated"
                    ));
                }
                self.emit(SagaEvent::CompensationRetryRequested { step: failed });
                self.continue_compensation();
                Ok(())
            }
            OperatorCommand::MarkCompensated { step } => {
                let failed = self.failed_compensation()?;
                if *step != failed {
                    return reject(format!(
                        "step `{step}` is not the one whose compensation failed (`{failed}`)"
                    ));
                }
                let attempt = self.state.step(step).map_or(0, |s| s.compensation.sent);
                self.emit(SagaEvent::StepCompensated {
                    step: step.clone(),
                    attempt,
                    manual: true,
                });
                self.continue_compensation();
                Ok(())
            }
        }
    }

    fn failed_compensation(&self) -> Result<String, Outcome> {
        if self.state.status != SagaStatus::CompensationFailed {
            return Err(Outcome::Rejected(format!(
                "no compensation has failed; the saga is {}",
                self.state.status.as_str()
            )));
        }
        Ok(self
            .state
            .steps
            .iter()
            .find(|s| s.compensation_failed)
            .map(|s| s.name.clone())
            .expect("compensation_failed status has a failed step"))
    }
}
