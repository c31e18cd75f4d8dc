//! The decision function: given a saga's definition, its state and one input, what to
//! record and what to send. Deterministic: the same arguments always give the same decision.

use chrono::{DateTime, Utc};
use saga_schemas::{Data, Direction, Outcome as ReplyOutcome, SagaEvent, SagaStatus, StepCommand};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::definition::{SagaDefinition, StepKind};
use crate::state::{SagaState, StepState};

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
        /// The message id of the command the participant answers: it must be the command this
        /// saga sent for `step`, `direction` and `attempt` ([`command_message_id`]).
        in_reply_to: Uuid,
        outcome: ReplyOutcome,
    },
    Timer(TimerKind),
    Operator {
        #[serde(flatten)]
        command: OperatorCommand,
        /// Who issued it (an API token's name), recorded in the events it causes.
        #[serde(default)]
        by: Option<String>,
    },
}

impl Input {
    /// An operator command from no one in particular (no authentication).
    pub fn operator(command: OperatorCommand) -> Input {
        Input::Operator { command, by: None }
    }
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
    /// How the key of every [`TimerKind::StepTimeout`], and of no other timer, begins.
    pub const STEP_TIMEOUT_KEY_PREFIX: &'static str = "timeout/";

    /// Unique per saga: the runtime's key for scheduling and cancelling.
    pub fn key(&self) -> String {
        match self {
            TimerKind::StepTimeout {
                step,
                direction,
                attempt,
            } => format!(
                "{}{step}/{}/{attempt}",
                Self::STEP_TIMEOUT_KEY_PREFIX,
                direction.as_str()
            ),
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
    /// Retry the step whose definitive failure past the point of no return stopped the saga,
    /// with a fresh budget (after the participant's cause was fixed and its record cleared);
    /// or, while the saga runs past that point, send the step being retried again now, with
    /// its backoff starting over.
    RetryStep,
    /// The operator did the failed step (or the step past the point of no return that keeps
    /// being retried) by hand; `output` is merged into the saga data.
    MarkCompleted {
        step: String,
        #[serde(default)]
        output: Data,
    },
}

/// Whether the input moved the saga.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Applied,
    /// Nothing to do: a duplicate, a stale reply or timer, a reply for an unknown saga.
    Ignored(Ignored),
    /// An operator command that does not apply to the saga as it is.
    Rejected(Rejection),
}

/// Why an input changed nothing. Each variant is one rule, so callers and tests can tell them
/// apart; `Display` says it for people.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Ignored {
    #[error("unknown saga")]
    UnknownSaga,
    #[error("saga already started")]
    AlreadyStarted,
    #[error("step `{step}` is not in the definition")]
    UnknownStep { step: String },
    #[error("no command was sent for step `{step}`")]
    NotSent { step: String },
    #[error("no {direction} attempt {attempt} was sent for step `{step}`")]
    NoSuchAttempt {
        step: String,
        direction: Direction,
        attempt: u32,
    },
    #[error(
        "the reply to {direction} attempt {attempt} of step `{step}` names command {in_reply_to}, which this saga did not send"
    )]
    UnknownCommand {
        step: String,
        direction: Direction,
        attempt: u32,
        in_reply_to: Uuid,
    },
    #[error("step `{step}` already completed")]
    AlreadyCompleted { step: String },
    #[error("step `{step}` already failed")]
    AlreadyFailed { step: String },
    #[error("step `{step}` already compensated")]
    AlreadyCompensated { step: String },
    #[error("a reply for step `{step}` that no longer matters: the saga is {status}")]
    NotRunning { step: String, status: SagaStatus },
    #[error("attempt {attempt} of step `{step}` is no longer awaited")]
    NotAwaited { step: String, attempt: u32 },
    #[error("attempt {attempt} of step `{step}` belongs to a budget an operator replaced")]
    EarlierBudget { step: String, attempt: u32 },
    #[error("retry {attempt} of `{step}` is no longer due")]
    RetryNotDue { step: String, attempt: u32 },
    #[error("the deadline no longer applies")]
    DeadlineNotApplicable,
    #[error("abort already requested")]
    AbortAlreadyRequested,
    #[error("duplicate message")]
    Duplicate,
}

/// Why an operator command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Rejection {
    #[error("only a running saga can be aborted; it is {0}")]
    AbortNotRunning(SagaStatus),
    #[error("the saga is past its point of no return and must complete")]
    PastPointOfNoReturn,
    #[error("no compensation has failed; the saga is {0}")]
    NoFailedCompensation(SagaStatus),
    #[error("no step past the point of no return failed or keeps failing; the saga is {0}")]
    NoFailedStep(SagaStatus),
    #[error("the saga has not passed its point of no return: abort it instead")]
    NotPastPointOfNoReturn,
    #[error("step `{step}` has no compensation: reconcile it by hand, then mark it compensated")]
    NoCompensation { step: String },
    #[error("step `{step}` is not the one that failed or keeps failing (`{failed}`)")]
    NotTheFailedStep { step: String, failed: String },
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
            _ => Decision::without_change(None, Outcome::Ignored(Ignored::UnknownSaga)),
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
        Input::Start { .. } => Err(Outcome::Ignored(Ignored::AlreadyStarted)),
        Input::Reply {
            step,
            direction,
            attempt,
            in_reply_to,
            outcome,
        } => ctx.reply(step, *direction, *attempt, *in_reply_to, outcome),
        Input::Timer(timer) => ctx.timer(timer),
        Input::Operator { command, by } => ctx.operator(command, by),
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
    for index in def.stage(0) {
        ctx.send(index, Direction::Execute, 1);
    }
    ctx.into_decision()
}

/// Why an input changes nothing.
type Verdict = Result<(), Outcome>;

fn ignore(why: Ignored) -> Verdict {
    Err(Outcome::Ignored(why))
}

fn reject(why: Rejection) -> Verdict {
    Err(Outcome::Rejected(why))
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
    fn sent_step(&self, name: &str) -> Result<(usize, StepState), Outcome> {
        let (index, _) = self.def.step(name).ok_or_else(|| {
            Outcome::Ignored(Ignored::UnknownStep {
                step: name.to_owned(),
            })
        })?;
        let step = self.state.step(name).cloned().ok_or_else(|| {
            Outcome::Ignored(Ignored::NotSent {
                step: name.to_owned(),
            })
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

    /// A step of a parallel group awaits its answer (or its retry): the group's outcome, and
    /// so the order in which its steps would be compensated, is not known yet.
    fn group_unsettled(&self) -> bool {
        (0..self.def.steps.len()).any(|i| self.def.is_parallel(i) && self.pending(i))
    }

    /// The action of step `index` awaits its reply or its retry.
    fn pending(&self, index: usize) -> bool {
        self.state
            .step(&self.def.steps[index].name)
            .is_some_and(|s| s.action.is_pending())
    }

    /// Why the step of a parallel group at `index` breaks its group, and the `seq` of the event
    /// that shows it: it failed, or its output wrote a key the step does not declare (its
    /// siblings' replies arrive in any order, so an undeclared key could overwrite theirs
    /// depending on timing).
    fn breaks_group(&self, index: usize) -> Option<(u64, String)> {
        let d = &self.def.steps[index];
        let s = self.state.step(&d.name)?;
        if s.failed {
            return Some((
                s.failed_seq.unwrap_or(u64::MAX),
                format!(
                    "step `{}` failed: {}",
                    d.name,
                    s.last_error.as_deref().unwrap_or_default()
                ),
            ));
        }
        let declared = d.outputs.as_deref().unwrap_or_default();
        let undeclared = s
            .output
            .as_ref()
            .filter(|_| s.completed)?
            .keys()
            .find(|k| !declared.contains(k))?;
        Some((
            s.completed_seq.unwrap_or(u64::MAX),
            format!(
                "step `{}` wrote the output key `{undeclared}`, which it does not declare in \
                 `outputs`",
                d.name
            ),
        ))
    }

    /// Once no step of the parallel group `stage` awaits its answer: why the saga must be
    /// compensated instead of going on, if it must. The step that broke the group first names
    /// it (a sibling's later failure may be only the consequence: not retried).
    fn group_stop(&self, stage: std::ops::Range<usize>) -> Option<String> {
        if let Some(abort) = &self.state.abort_requested {
            return Some(format!("aborted: {abort}"));
        }
        if self.state.deadline_exceeded {
            return Some("saga deadline exceeded".into());
        }
        stage
            .filter_map(|i| self.breaks_group(i))
            .min_by_key(|(seq, _)| *seq)
            .map(|(_, why)| why)
    }

    /// A sibling of step `index` in its parallel group broke the group: the saga will be
    /// compensated once the others answer, so a retryable error is not retried.
    fn group_failing(&self, index: usize) -> bool {
        self.def.is_parallel(index)
            && self
                .def
                .stage(index)
                .any(|i| i != index && self.breaks_group(i).is_some())
    }

    /// Step `index` failed definitively while running forward, for `why`. Alone, it starts
    /// compensation; in a parallel group, compensation waits for the definitive answers of the
    /// siblings still in flight, so that every step that completed is known and undone.
    fn step_failed(&mut self, index: usize, why: String) {
        let stage = self.def.stage(index);
        if stage.len() == 1 {
            self.begin_compensation(why);
        } else if !stage.clone().any(|i| self.pending(i)) {
            let why = self.group_stop(stage).unwrap_or(why);
            self.begin_compensation(why);
        }
    }

    /// The pivot was asked and its definitive answer is still owed: an attempt awaits its reply,
    /// or one went unanswered and may yet run. Compensation must wait for it, since a pivot
    /// that ran cannot be undone.
    fn pivot_unsettled(&self) -> bool {
        self.def.steps.iter().any(|d| {
            d.kind == StepKind::Pivot
                && self.state.step(&d.name).is_some_and(|s| {
                    !s.completed && !s.failed && (s.action.in_flight.is_some() || s.maybe_ran)
                })
        })
    }

    fn send(&mut self, index: usize, direction: Direction, attempt: u32) {
        let step = &self.def.steps[index];
        let saga_id = self.state.saga_id;
        let message_id = command_message_id(saga_id, &step.name, direction, attempt);
        let state = self.state.step(&step.name);
        let silences = state.map_or(0, |s| s.attempts(direction).silences);
        let timeout_at = self.now + step.wait_after(silences);
        let (action, action_output, expires_at) = match direction {
            Direction::Execute => {
                // Fixed at the first attempt, so every attempt carries the same promise.
                let expires_at = state.and_then(|s| s.expires_at).or_else(|| {
                    step.expiry.map(|expiry| {
                        let at = self.now + expiry;
                        self.state
                            .deadline_at
                            .map_or(at, |deadline| at.min(deadline))
                    })
                });
                (step.action.clone(), None, expires_at)
            }
            Direction::Compensate => (
                step.compensation.clone().unwrap_or_default(),
                state.and_then(|s| s.output.clone()),
                None,
            ),
        };
        self.emit(SagaEvent::CommandSent {
            step: step.name.clone(),
            direction,
            attempt,
            message_id,
            timeout_at,
            sent_at: Some(self.now),
            expires_at,
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
            expires_at,
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
        in_reply_to: Uuid,
        outcome: &ReplyOutcome,
    ) -> Verdict {
        let (index, step) = self.sent_step(name)?;
        if attempt == 0 || attempt > step.attempts(direction).sent {
            return ignore(Ignored::NoSuchAttempt {
                step: name.to_owned(),
                direction,
                attempt,
            });
        }
        // Only an answer to a command this saga sent may move it: a reply naming any other
        // command (forged, or meant for another saga) is not the participant's answer.
        if in_reply_to != command_message_id(self.state.saga_id, name, direction, attempt) {
            return ignore(Ignored::UnknownCommand {
                step: name.to_owned(),
                direction,
                attempt,
                in_reply_to,
            });
        }
        match direction {
            Direction::Execute => self.action_reply(index, attempt, outcome),
            Direction::Compensate => self.compensation_reply(index, attempt, outcome),
        }
    }

    /// A definitive answer (success or failure) counts from any attempt: every attempt asks the
    /// same question, and the participant answers all of them with its one recorded outcome. A
    /// retryable error counts only for the attempt being awaited.
    fn action_reply(&mut self, index: usize, attempt: u32, outcome: &ReplyOutcome) -> Verdict {
        let def = &self.def.steps[index];
        let name = def.name.clone();
        let kind = def.kind;
        let step = self.state.step(&name).cloned().expect("sent step");
        if step.completed {
            return ignore(Ignored::AlreadyCompleted { step: name });
        }
        let status = self.state.status;
        match outcome {
            ReplyOutcome::Success { output } => {
                self.cancel_pending(&name, Direction::Execute);
                self.emit(SagaEvent::StepCompleted {
                    step: name.clone(),
                    attempt,
                    output: output.clone(),
                    manual: false,
                    by: None,
                });
                match status {
                    // After a completion failure the step's success (from an earlier attempt)
                    // resumes the saga.
                    SagaStatus::Running | SagaStatus::CompletionFailed => self.advance(index),
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
            _ if status != SagaStatus::Running => {
                ignore(Ignored::NotRunning { step: name, status })
            }
            _ if step.failed => ignore(Ignored::AlreadyFailed { step: name }),
            ReplyOutcome::Failure { .. } if attempt <= step.action.budget_start => {
                ignore(Ignored::EarlierBudget {
                    step: name,
                    attempt,
                })
            }
            ReplyOutcome::Failure { reason } => {
                self.cancel_pending(&name, Direction::Execute);
                if kind == StepKind::Retriable {
                    // Past the point of no return nothing can be undone: an operator decides.
                    self.emit(SagaEvent::CompletionFailed {
                        step: name,
                        reason: reason.clone(),
                    });
                } else {
                    self.emit(SagaEvent::StepFailed {
                        step: name.clone(),
                        attempt,
                        reason: reason.clone(),
                    });
                    self.step_failed(index, format!("step `{name}` failed: {reason}"));
                }
                Ok(())
            }
            ReplyOutcome::RetryableError { .. } if step.action.in_flight != Some(attempt) => {
                ignore(Ignored::NotAwaited {
                    step: name,
                    attempt,
                })
            }
            ReplyOutcome::RetryableError { error } => {
                self.cancel_pending(&name, Direction::Execute);
                self.emit(SagaEvent::AttemptFailed {
                    step: name,
                    direction: Direction::Execute,
                    attempt,
                    error: error.clone(),
                });
                self.retry_or_fail(index, error.clone());
                Ok(())
            }
        }
    }

    /// After an attempt of an action was answered with a retryable error.
    fn retry_or_fail(&mut self, index: usize, error: String) {
        let def = &self.def.steps[index];
        let name = def.name.clone();
        let step = self.state.step(&name).cloned().expect("sent step");
        let errors = step.action.errors;
        let stopping = self.state.deadline_exceeded
            || self.state.abort_requested.is_some()
            || self.group_failing(index);
        // A pivot with an unanswered attempt may still run: only its definitive answer (the
        // recorded outcome, or the expiry refusal) may end it.
        let must_hear_back = def.kind == StepKind::Pivot && step.maybe_ran;
        let may_retry = def.kind == StepKind::Retriable
            || must_hear_back
            || (!stopping && errors < def.retry.max_attempts);
        if may_retry {
            let next = step.action.sent + 1;
            let due_at = self.now + def.retry.delay_before(errors + 1);
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
            format!("{error}; gave up after {errors} retryable errors")
        };
        self.emit(SagaEvent::StepFailed {
            step: name.clone(),
            attempt: step.action.sent,
            reason: reason.clone(),
        });
        let why = match &self.state.abort_requested {
            Some(abort) => format!("aborted: {abort}"),
            None => format!("step `{name}` failed: {reason}"),
        };
        self.step_failed(index, why);
    }

    /// Step `index` completed while running forward. In a parallel group, the saga goes on
    /// once every step of the group completed; if one broke the group (or a stop was asked
    /// meanwhile), it is compensated once none awaits its answer.
    fn advance(&mut self, index: usize) {
        let stage = self.def.stage(index);
        if stage.len() > 1 {
            if stage.clone().any(|i| self.pending(i)) {
                return;
            }
            if let Some(why) = self.group_stop(stage.clone()) {
                self.begin_compensation(why);
                return;
            }
        }
        let next = stage.end;
        let commits = self.def.steps[index].kind == StepKind::Pivot
            || self
                .def
                .steps
                .get(next)
                .is_some_and(|s| s.kind == StepKind::Retriable);
        if self.state.deadline_at.is_some()
            && !self.state.deadline_exceeded
            && (commits || next == self.def.steps.len())
        {
            self.cancel(TimerKind::Deadline);
        }
        if next < self.def.steps.len() {
            for index in self.def.stage(next) {
                let attempt = self
                    .state
                    .step(&self.def.steps[index].name)
                    .map_or(0, |s| s.action.sent)
                    + 1;
                self.send(index, Direction::Execute, attempt);
            }
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

    /// Sends the next compensation, or settles the saga. Stages are undone in reverse order;
    /// within a parallel group, steps in reverse order of completion, a step that may have run
    /// without a recorded completion first (it would have completed last).
    fn continue_compensation(&mut self) {
        if self.state.status != SagaStatus::Compensating
            || self.state.steps.iter().any(|s| s.compensation.is_pending())
        {
            return;
        }
        let owed = self
            .def
            .steps
            .iter()
            .enumerate()
            .filter_map(|(i, d)| {
                let s = self.state.step(&d.name)?;
                let owed = d.kind == StepKind::Compensatable
                    && s.may_need_undo()
                    && !s.compensated
                    && !s.compensation_failed;
                let completion = s.completed_seq.filter(|_| s.completed).unwrap_or(u64::MAX);
                owed.then_some(((self.def.stage(i).start, completion, i), (i, d)))
            })
            .max_by_key(|(order, _)| *order)
            .map(|(_, owed)| owed);
        if let Some((index, d)) = owed {
            let attempt = self.state.step(&d.name).map_or(0, |s| s.compensation.sent) + 1;
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
            return ignore(Ignored::AlreadyCompensated { step: name });
        }
        let current_budget = attempt > step.compensation.budget_start;
        match outcome {
            // Late good news is still good news, even after the budget ran out; but a success
            // of the compensation of an earlier run of the action does not undo a later one.
            ReplyOutcome::Success { .. }
                if !current_budget && self.state.status != SagaStatus::CompensationFailed =>
            {
                ignore(Ignored::EarlierBudget {
                    step: name,
                    attempt,
                })
            }
            ReplyOutcome::Success { .. } => {
                self.cancel_pending(&name, Direction::Compensate);
                self.emit(SagaEvent::StepCompensated {
                    step: name,
                    attempt,
                    manual: false,
                    by: None,
                });
                self.continue_compensation();
                Ok(())
            }
            _ if step.compensation_failed => ignore(Ignored::AlreadyFailed { step: name }),
            ReplyOutcome::Failure { .. } if !current_budget => ignore(Ignored::EarlierBudget {
                step: name,
                attempt,
            }),
            ReplyOutcome::Failure { reason } => {
                self.cancel_pending(&name, Direction::Compensate);
                self.emit(SagaEvent::CompensationFailed {
                    step: name,
                    reason: reason.clone(),
                });
                Ok(())
            }
            ReplyOutcome::RetryableError { .. } if step.compensation.in_flight != Some(attempt) => {
                ignore(Ignored::NotAwaited {
                    step: name,
                    attempt,
                })
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
        if attempts.errors < def.compensation_retry.max_attempts {
            let next = attempts.sent + 1;
            let due_at = self.now + def.compensation_retry.delay_before(attempts.errors + 1);
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
                reason: format!(
                    "{error}; gave up after {} retryable errors",
                    attempts.errors
                ),
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
                    return ignore(Ignored::NotAwaited {
                        step: step.clone(),
                        attempt: *attempt,
                    });
                }
                // Silence is not an answer: ask again. The participant answers a repeated
                // question with its recorded outcome, so asking is always safe.
                self.emit(SagaEvent::AttemptTimedOut {
                    step: step.clone(),
                    direction: *direction,
                    attempt: *attempt,
                });
                self.send(index, *direction, attempt + 1);
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
                    return ignore(Ignored::RetryNotDue {
                        step: step.clone(),
                        attempt: *attempt,
                    });
                }
                self.send(index, *direction, *attempt);
                Ok(())
            }
            TimerKind::Deadline => {
                if self.state.status != SagaStatus::Running
                    || self.committed()
                    || self.state.deadline_exceeded
                {
                    return ignore(Ignored::DeadlineNotApplicable);
                }
                self.emit(SagaEvent::DeadlineExceeded);
                // An unsettled pivot decides: if it succeeds, the saga must finish. A parallel
                // group's siblings are heard out first, so every completed step is undone.
                if !self.pivot_unsettled() && !self.group_unsettled() {
                    self.begin_compensation("saga deadline exceeded".into());
                }
                Ok(())
            }
        }
    }

    fn operator(&mut self, command: &OperatorCommand, by: &Option<String>) -> Verdict {
        let by = by.clone();
        let status = self.state.status;
        match command {
            OperatorCommand::Abort { reason } => {
                if status != SagaStatus::Running {
                    return reject(Rejection::AbortNotRunning(status));
                }
                if self.committed() {
                    return reject(Rejection::PastPointOfNoReturn);
                }
                if self.state.abort_requested.is_some() {
                    return ignore(Ignored::AbortAlreadyRequested);
                }
                self.emit(SagaEvent::AbortRequested {
                    reason: reason.clone(),
                    by,
                });
                if !self.pivot_unsettled() && !self.group_unsettled() {
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
                    return reject(Rejection::NoCompensation { step: failed });
                }
                self.emit(SagaEvent::CompensationRetryRequested { step: failed, by });
                self.continue_compensation();
                Ok(())
            }
            OperatorCommand::MarkCompensated { step } => {
                let failed = self.failed_compensation()?;
                if *step != failed {
                    return reject(Rejection::NotTheFailedStep {
                        step: step.clone(),
                        failed,
                    });
                }
                let attempt = self.state.step(step).map_or(0, |s| s.compensation.sent);
                self.emit(SagaEvent::StepCompensated {
                    step: step.clone(),
                    attempt,
                    manual: true,
                    by,
                });
                self.continue_compensation();
                Ok(())
            }
            OperatorCommand::RetryStep => {
                let (index, failed) = self.step_past_no_return()?;
                self.cancel_pending(&failed, Direction::Execute);
                self.emit(SagaEvent::StepRetryRequested {
                    step: failed.clone(),
                    by,
                });
                let attempt = self.state.step(&failed).map_or(0, |s| s.action.sent) + 1;
                self.send(index, Direction::Execute, attempt);
                Ok(())
            }
            OperatorCommand::MarkCompleted { step, output } => {
                let (index, failed) = self.step_past_no_return()?;
                if *step != failed {
                    return reject(Rejection::NotTheFailedStep {
                        step: step.clone(),
                        failed,
                    });
                }
                self.cancel_pending(step, Direction::Execute);
                let attempt = self.state.step(step).map_or(0, |s| s.action.sent);
                self.emit(SagaEvent::StepCompleted {
                    step: step.clone(),
                    attempt,
                    output: output.clone(),
                    manual: true,
                    by,
                });
                self.advance(index);
                Ok(())
            }
        }
    }

    fn failed_compensation(&self) -> Result<String, Outcome> {
        if self.state.status != SagaStatus::CompensationFailed {
            return Err(Outcome::Rejected(Rejection::NoFailedCompensation(
                self.state.status,
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

    /// The step an operator may retry or mark completed: the one whose definitive failure past
    /// the point of no return stopped the saga, or, while the saga runs past that point, the
    /// step being retried. A retriable step is retried without end on retryable errors, so a
    /// cause that never goes away would otherwise hold the saga forever: neither abort (too
    /// late) nor a failure (there is none) can end it.
    fn step_past_no_return(&self) -> Result<(usize, String), Outcome> {
        let status = self.state.status;
        let stuck = match status {
            SagaStatus::CompletionFailed => self
                .state
                .steps
                .iter()
                .rev()
                .find(|s| s.failed && !s.completed),
            SagaStatus::Running if !self.committed() => {
                return Err(Outcome::Rejected(Rejection::NotPastPointOfNoReturn));
            }
            SagaStatus::Running => self
                .state
                .steps
                .iter()
                .rev()
                .find(|s| s.action.is_pending() && !s.completed),
            _ => None,
        };
        let name = stuck
            .map(|s| s.name.clone())
            .ok_or(Outcome::Rejected(Rejection::NoFailedStep(status)))?;
        let (index, _) = self.def.step(&name).expect("a sent step is defined");
        Ok((index, name))
    }
}
