//! Every outcome of a saga definition, before it runs: the engine driven through every
//! combination of participant behaviour, within bounds, with the saga invariants checked on
//! every path. Pure: the participants, the broker and the clock are simulated here.
//!
//! The simulated participants keep the contract of the SDK: one recorded outcome per (step,
//! direction), given again to every later attempt; an action refused once its compensation
//! was recorded or once it expired; a compensation of an action that never ran is a null one.
//!
//! At each point every one of these may happen next:
//!
//! - an outstanding command is answered: success; or, each counted as a fault, a business
//!   failure, a retryable error, or the participant runs it and the reply is lost;
//! - a timer fires: a retry that is due, or (a fault, when something else could happen first)
//!   a step's timeout before its reply, after which that reply may still come, late, or the
//!   saga's deadline;
//! - the last reply is delivered again (a fault);
//! - an operator aborts the saga (a fault).
//!
//! A path ends where nothing is left to happen but faults (and goes on with each of them). With
//! nothing else to do, time passes: the earliest timer fires without counting as a fault.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use chrono::{DateTime, TimeZone, Utc};
use saga_schemas::{Data, Direction, Outcome as Reply, SagaEvent, SagaStatus};
use serde::Serialize;
use uuid::Uuid;

use crate::definition::{SagaDefinition, StepKind};
use crate::engine::{
    Decision, Input, OperatorCommand, Outcome, TimerChange, TimerKind, command_message_id, decide,
};
use crate::state::SagaState;

/// How far the exploration goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Bounds {
    /// Faults per path: business failures, retryable errors, lost replies, timeouts racing a
    /// reply, the deadline passing, duplicate deliveries and operator aborts, in all.
    pub faults: u32,
    /// Moves per path; a path still going past it is counted as truncated.
    pub max_moves: usize,
    /// Whether an operator abort is tried at each point.
    pub operator_abort: bool,
}

impl Default for Bounds {
    fn default() -> Self {
        // 56,187 paths of the example checkout in about a second (release build); each fault
        // more multiplies the paths by about 25.
        Bounds {
            faults: 3,
            max_moves: 200,
            operator_abort: true,
        }
    }
}

/// What the exploration found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub saga: String,
    pub bounds: Bounds,
    /// Complete paths explored.
    pub paths: u64,
    /// Calls of the decision function.
    pub decisions: u64,
    /// Paths cut at `max_moves`.
    pub truncated: u64,
    /// Each distinct way a path ends, most paths first.
    pub outcomes: Vec<Ending>,
    /// Invariants broken, each with the first path that broke it.
    pub violations: Vec<Violation>,
    /// Saga status changes seen on some path, `(from, to)`; `from` is `None` at the start.
    pub transitions: BTreeSet<(Option<&'static str>, &'static str)>,
}

/// One way a saga can end.
#[derive(Debug, Clone, Serialize)]
pub struct Ending {
    pub status: SagaStatus,
    /// Why it compensated, or which step it waits on.
    pub cause: Option<String>,
    /// An operator must act (a compensation or a step past the point of no return failed).
    pub needs_operator: bool,
    pub paths: u64,
    /// A shortest path to it: what happened, in order.
    pub witness: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Violation {
    pub invariant: String,
    pub witness: Vec<String>,
}

impl Report {
    /// The outcomes as a Mermaid state diagram: the statuses and the changes between them.
    pub fn mermaid(&self) -> String {
        let mut out = String::from("stateDiagram-v2\n");
        for (from, to) in &self.transitions {
            out += &format!("    {} --> {to}\n", from.unwrap_or("[*]"));
        }
        let ends: BTreeSet<&str> = self.outcomes.iter().map(|o| o.status.as_str()).collect();
        for end in ends {
            out += &format!("    {end} --> [*]\n");
        }
        out
    }
}

/// Explores every path of `def` within `bounds`.
pub fn explore(def: &SagaDefinition, bounds: Bounds) -> Report {
    let mut explorer = Explorer {
        def,
        bounds,
        paths: 0,
        decisions: 0,
        truncated: 0,
        endings: BTreeMap::new(),
        violations: BTreeMap::new(),
        transitions: BTreeSet::new(),
    };
    let mut world = World::new();
    let start = world.apply(
        def,
        Input::Start {
            saga_id: world.saga_id,
            input: Data::new(),
            business_key: None,
        },
    );
    explorer.decisions += 1;
    explorer.record_transition(None, &world);
    let mut witness = vec!["the saga starts".to_owned()];
    match start {
        Ok(()) => explorer.walk(&world, &mut witness, 0),
        Err(invariant) => explorer.violation(invariant, &witness),
    }
    let mut outcomes: Vec<Ending> = explorer.endings.into_values().collect();
    outcomes.sort_by(|a, b| {
        b.paths
            .cmp(&a.paths)
            .then(a.witness.len().cmp(&b.witness.len()))
    });
    Report {
        saga: def.name.clone(),
        bounds,
        paths: explorer.paths,
        decisions: explorer.decisions,
        truncated: explorer.truncated,
        outcomes,
        violations: explorer.violations.into_values().collect(),
        transitions: explorer.transitions,
    }
}

struct Explorer<'a> {
    def: &'a SagaDefinition,
    bounds: Bounds,
    paths: u64,
    decisions: u64,
    truncated: u64,
    endings: BTreeMap<(String, Option<String>), Ending>,
    violations: BTreeMap<String, Violation>,
    transitions: BTreeSet<(Option<&'static str>, &'static str)>,
}

impl Explorer<'_> {
    fn walk(&mut self, world: &World, witness: &mut Vec<String>, faults: u32) {
        if witness.len() > self.bounds.max_moves {
            self.truncated += 1;
            return;
        }
        let moves = world.moves(self.bounds, faults);
        // Nothing happens unless a fault does: a path may end here.
        if moves.iter().all(|(_, cost)| *cost > 0) {
            self.end(world, witness);
        }
        for (m, cost) in moves {
            let mut next = world.clone();
            let before = next.status();
            let (label, result) = next.play(self.def, &m);
            self.decisions += 1;
            witness.push(label);
            match result {
                // A move that changed nothing (a refused operator command) is no path of its own.
                Ok(changed) => {
                    if changed {
                        if next.status() != before {
                            self.record_transition(Some(before), &next);
                        }
                        self.walk(&next, witness, faults + cost);
                    }
                }
                Err(invariant) => self.violation(invariant, witness),
            }
            witness.pop();
        }
    }

    fn record_transition(&mut self, from: Option<SagaStatus>, world: &World) {
        self.transitions
            .insert((from.map(SagaStatus::as_str), world.status().as_str()));
    }

    fn end(&mut self, world: &World, witness: &[String]) {
        self.paths += 1;
        let state = world.state.as_ref().expect("started");
        if let Err(invariant) = settled(self.def, state, &world.log, &world.records) {
            self.violation(invariant, witness);
        }
        let cause = match state.status {
            SagaStatus::Compensated | SagaStatus::CompensationFailed => {
                let failed = state
                    .steps
                    .iter()
                    .find(|s| s.compensation_failed)
                    .map(|s| format!("the compensation of `{}` failed", s.name));
                match (state.compensation_reason.clone(), failed) {
                    (Some(why), Some(failed)) => Some(format!("{why}; {failed}")),
                    (why, failed) => why.or(failed),
                }
            }
            SagaStatus::CompletionFailed => state
                .steps
                .iter()
                .find(|s| s.failed && !s.completed)
                .map(|s| format!("`{}` failed past the point of no return", s.name)),
            _ => None,
        };
        let ending = self
            .endings
            .entry((state.status.as_str().to_owned(), cause.clone()))
            .or_insert_with(|| Ending {
                status: state.status,
                cause,
                needs_operator: matches!(
                    state.status,
                    SagaStatus::CompensationFailed | SagaStatus::CompletionFailed
                ),
                paths: 0,
                witness: witness.to_vec(),
            });
        ending.paths += 1;
        if witness.len() < ending.witness.len() {
            ending.witness = witness.to_vec();
        }
    }

    fn violation(&mut self, invariant: String, witness: &[String]) {
        let entry = self
            .violations
            .entry(invariant.clone())
            .or_insert_with(|| Violation {
                invariant,
                witness: witness.to_vec(),
            });
        if witness.len() < entry.witness.len() {
            entry.witness = witness.to_vec();
        }
    }
}

/// `(step, direction, attempt)` of a command.
type CommandKey = (String, Direction, u32);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Answer {
    Success,
    Failure,
    RetryableError,
    /// The participant runs the command (success) and the reply is lost.
    Lost,
}

#[derive(Debug, Clone)]
enum Move {
    Answer(CommandKey, Answer),
    Fire(String),
    DuplicateLast,
    Abort,
}

/// The saga with the participants, broker and clock around it.
#[derive(Debug, Clone)]
struct World {
    saga_id: Uuid,
    now: DateTime<Utc>,
    state: Option<SagaState>,
    log: Vec<SagaEvent>,
    /// Commands sent and not answered yet, in send order.
    outstanding: Vec<CommandKey>,
    last_delivered: Option<Input>,
    timers: BTreeMap<String, (TimerKind, DateTime<Utc>)>,
    /// The participants' records: the one outcome of each (step, direction).
    records: Records,
    /// `expires_at` of each step's actions, as the commands carried it.
    expiry: HashMap<String, DateTime<Utc>>,
}

impl World {
    fn new() -> Self {
        World {
            saga_id: Uuid::from_u128(1),
            now: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            state: None,
            log: Vec::new(),
            outstanding: Vec::new(),
            last_delivered: None,
            timers: BTreeMap::new(),
            records: HashMap::new(),
            expiry: HashMap::new(),
        }
    }

    fn status(&self) -> SagaStatus {
        self.state
            .as_ref()
            .map_or(SagaStatus::Running, |s| s.status)
    }

    /// Every move possible now, with its cost in faults, within the fault budget.
    fn moves(&self, bounds: Bounds, faults: u32) -> Vec<(Move, u32)> {
        let budget = bounds.faults.saturating_sub(faults);
        let mut moves = Vec::new();
        for key in &self.outstanding {
            if self.forced(key).is_some() {
                moves.push((Move::Answer(key.clone(), Answer::Success), 0));
                continue;
            }
            moves.push((Move::Answer(key.clone(), Answer::Success), 0));
            for answer in [Answer::Failure, Answer::RetryableError, Answer::Lost] {
                moves.push((Move::Answer(key.clone(), answer), 1));
            }
        }
        let racing = !moves.is_empty();
        for (key, (timer, _)) in &self.timers {
            let cost = match timer {
                TimerKind::Retry { .. } => 0,
                TimerKind::StepTimeout { .. } | TimerKind::Deadline => u32::from(racing),
            };
            moves.push((Move::Fire(key.clone()), cost));
        }
        if !racing && moves.len() > 1 {
            // With nothing else to do, time passes: the earliest timer is the one that fires.
            let earliest = self
                .timers
                .iter()
                .min_by_key(|(key, (_, due))| (*due, (*key).clone()))
                .map(|(key, _)| key.clone());
            moves.retain(|(m, _)| matches!(m, Move::Fire(key) if Some(key) == earliest.as_ref()));
        }
        if self.last_delivered.is_some() {
            moves.push((Move::DuplicateLast, 1));
        }
        if bounds.operator_abort
            && self.status() == SagaStatus::Running
            && self
                .state
                .as_ref()
                .is_some_and(|s| s.abort_requested.is_none())
        {
            moves.push((Move::Abort, 1));
        }
        moves.retain(|(_, cost)| *cost <= budget);
        moves
    }

    /// The answer the participant must give whatever happens: its record, or a refusal.
    fn forced(&self, key: &CommandKey) -> Option<Reply> {
        let (step, direction, _) = key;
        let expired = self.expiry.get(step).is_some_and(|at| self.now > *at);
        contract_answer(&self.records, step, *direction, expired)
    }

    /// Plays `m`: a label for people, and whether the saga changed (or the invariant broken).
    fn play(&mut self, def: &SagaDefinition, m: &Move) -> (String, Result<bool, String>) {
        match m {
            Move::Answer(key, answer) => {
                let (step, direction, attempt) = key.clone();
                let what = command_label(&step, direction, attempt);
                let reply = self.forced(key).unwrap_or_else(|| match answer {
                    Answer::Success | Answer::Lost => Reply::Success {
                        output: Data::new(),
                    },
                    Answer::Failure => Reply::Failure {
                        reason: "declined by the participant".into(),
                    },
                    Answer::RetryableError => Reply::RetryableError {
                        error: "unavailable".into(),
                    },
                });
                // Recorded with the participant's own writes, refusals and null compensations
                // too; a retryable error records nothing.
                if !matches!(reply, Reply::RetryableError { .. }) {
                    self.records
                        .insert((step.clone(), direction), reply.clone());
                }
                self.outstanding.retain(|k| k != key);
                if *answer == Answer::Lost {
                    return (format!("{what} runs; its reply is lost"), Ok(true));
                }
                let label = format!("{what} answers {}", reply_label(&reply));
                let input = Input::Reply {
                    in_reply_to: command_message_id(self.saga_id, &step, direction, attempt),
                    step,
                    direction,
                    attempt,
                    outcome: reply,
                };
                self.last_delivered = Some(input.clone());
                (label, self.apply(def, input).map(|()| true))
            }
            Move::Fire(key) => {
                let (timer, due) = self.timers.remove(key).expect("a pending timer");
                self.now = self.now.max(due);
                let label = match &timer {
                    TimerKind::StepTimeout {
                        step,
                        direction,
                        attempt,
                    } => format!(
                        "{} gets no reply in time",
                        command_label(step, *direction, *attempt)
                    ),
                    TimerKind::Retry {
                        step,
                        direction,
                        attempt,
                    } => format!(
                        "the retry of {} is due",
                        command_label(step, *direction, *attempt)
                    ),
                    TimerKind::Deadline => "the saga's deadline passes".to_owned(),
                };
                (label, self.apply(def, Input::Timer(timer)).map(|()| true))
            }
            Move::DuplicateLast => {
                let input = self.last_delivered.clone().expect("a reply delivered");
                let label = match &input {
                    Input::Reply {
                        step,
                        direction,
                        attempt,
                        ..
                    } => format!(
                        "the reply of {} is delivered again",
                        command_label(step, *direction, *attempt)
                    ),
                    _ => "a message is delivered again".to_owned(),
                };
                (label, self.apply(def, input).map(|()| true))
            }
            Move::Abort => {
                let version = self.state.as_ref().map(|s| s.version);
                let result = self.apply(
                    def,
                    Input::operator(OperatorCommand::Abort {
                        reason: "by an operator".into(),
                    }),
                );
                let changed = self.state.as_ref().map(|s| s.version) != version;
                (
                    "an operator aborts the saga".to_owned(),
                    result.map(|()| changed),
                )
            }
        }
    }

    /// Decides `input`, applies the decision to the world, and checks the invariants.
    fn apply(&mut self, def: &SagaDefinition, input: Input) -> Result<(), String> {
        let decision: Decision = decide(def, self.state.as_ref(), &input, self.now);
        if decision.outcome != Outcome::Applied
            && !(decision.events.is_empty() && decision.commands.is_empty())
        {
            return Err(format!(
                "an input that was not applied ({:?}) still recorded or sent something",
                decision.outcome
            ));
        }
        self.log.extend(decision.events.iter().cloned());
        for command in &decision.commands {
            self.outstanding
                .push((command.step.clone(), command.direction, command.attempt));
            if let Some(at) = command.expires_at {
                self.expiry.entry(command.step.clone()).or_insert(at);
            }
        }
        for change in &decision.timers {
            match change {
                TimerChange::Schedule { timer, due_at } => {
                    self.timers.insert(timer.key(), (timer.clone(), *due_at));
                }
                TimerChange::Cancel { timer } => {
                    self.timers.remove(&timer.key());
                }
            }
        }
        if decision.state.is_some() {
            self.state = decision.state;
        }
        let state = self.state.as_ref().ok_or("the saga does not exist")?;
        invariants(def, self.saga_id, &self.log, state)
    }
}

fn command_label(step: &str, direction: Direction, attempt: u32) -> String {
    let what = match direction {
        Direction::Execute => "action",
        Direction::Compensate => "compensation",
    };
    format!("`{step}` {what} #{attempt}")
}

fn reply_label(reply: &Reply) -> String {
    match reply {
        Reply::Success { .. } => "success".into(),
        Reply::Failure { reason } => format!("failure ({reason})"),
        Reply::RetryableError { error } => format!("a retryable error ({error})"),
    }
}

macro_rules! ensure {
    ($cond:expr, $($why:tt)+) => {
        if !$cond {
            return Err(format!($($why)+));
        }
    };
}

/// The saga invariants over a log and the state it folds to: replay, reverse-order
/// compensation (stages in reverse definition order; within a parallel group, steps in reverse
/// order of completion, one that may have run without a recorded completion first), no
/// compensation before every sent step of a parallel group was answered definitively, no action after compensation began, no compensation of a step that is not
/// compensatable or surely did not run, no compensation past the point of no return, retry
/// budgets kept, no command after the saga completed or was compensated (but for the
/// compensation of a step whose success arrives after the saga was compensated).
pub fn invariants(
    def: &SagaDefinition,
    saga_id: Uuid,
    log: &[SagaEvent],
    state: &SagaState,
) -> Result<(), String> {
    let replayed = SagaState::fold(saga_id, log).ok_or("the events do not replay")?;
    ensure!(
        &replayed == state,
        "replaying the events does not give the same state"
    );

    let index = |name: &str| def.step(name).map(|(i, _)| i);
    let mut compensation_began = false;
    let mut committed = false;
    let mut finished = false;
    let mut late_success = false;
    let mut sent: HashSet<CommandKey> = HashSet::new();
    // (stage, completion, step) of each step's first compensation: must decrease.
    let mut first_compensations: Vec<(usize, usize, usize)> = Vec::new();
    let mut completed_at: HashMap<String, usize> = HashMap::new();
    // Steps sent whose definitive answer (completion or failure) is not recorded yet.
    let mut awaiting: BTreeSet<String> = BTreeSet::new();
    let mut budget_used: HashMap<String, u32> = HashMap::new();
    let mut may_have_run: HashMap<String, BTreeSet<u32>> = HashMap::new();
    let mut compensated_once: BTreeSet<String> = BTreeSet::new();
    let mut pivots_heard_nothing: BTreeSet<String> = BTreeSet::new();

    for (position, event) in log.iter().enumerate() {
        match event {
            SagaEvent::CommandSent {
                step,
                direction,
                attempt,
                ..
            } => {
                ensure!(
                    !finished,
                    "a command for `{step}` was sent after the saga ended"
                );
                let key = (step.clone(), *direction, *attempt);
                ensure!(sent.insert(key.clone()), "command sent twice: {key:?}");
                let i = index(step).ok_or_else(|| format!("unknown step `{step}`"))?;
                let d = &def.steps[i];
                match direction {
                    Direction::Execute => {
                        ensure!(
                            !compensation_began,
                            "the action of `{step}` was sent after compensation began"
                        );
                        if d.kind == StepKind::Retriable {
                            committed = true;
                        }
                        awaiting.insert(step.clone());
                        may_have_run
                            .entry(step.clone())
                            .or_default()
                            .insert(*attempt);
                    }
                    Direction::Compensate => {
                        ensure!(
                            d.kind == StepKind::Compensatable,
                            "`{step}` is not compensatable, yet its compensation was sent"
                        );
                        ensure!(
                            may_have_run.get(step).is_some_and(|a| !a.is_empty()),
                            "`{step}` was compensated although its action surely did not run"
                        );
                        if compensated_once.insert(step.clone()) {
                            let completion = completed_at.get(step).copied().unwrap_or(usize::MAX);
                            first_compensations.push((def.stage(i).start, completion, i));
                        }
                    }
                }
            }
            SagaEvent::AttemptFailed {
                step, direction, ..
            } => {
                let i = index(step).ok_or_else(|| format!("unknown step `{step}`"))?;
                let d = &def.steps[i];
                let used = budget_used
                    .entry(format!("{step}/{direction}"))
                    .or_default();
                *used += 1;
                let budget = match direction {
                    Direction::Execute if d.kind == StepKind::Retriable => u32::MAX,
                    Direction::Execute if pivots_heard_nothing.contains(step) => u32::MAX,
                    Direction::Execute => d.retry.max_attempts,
                    Direction::Compensate => d.compensation_retry.max_attempts,
                };
                ensure!(
                    *used <= budget,
                    "`{step}` was tried more times than its retry budget ({direction})"
                );
            }
            SagaEvent::CompensationFailed { step, .. } => {
                let i = index(step).ok_or_else(|| format!("unknown step `{step}`"))?;
                ensure!(
                    def.steps[i].kind == StepKind::Compensatable,
                    "`{step}` (not compensatable) is in a failed compensation"
                );
            }
            SagaEvent::StepFailed { step, attempt, .. } => {
                awaiting.remove(step);
                let timed_out = log.iter().any(|e| {
                    matches!(e, SagaEvent::AttemptTimedOut { step: s, direction: Direction::Execute, attempt: a }
                        if s == step && a == attempt)
                });
                if !timed_out && let Some(set) = may_have_run.get_mut(step) {
                    set.remove(attempt);
                }
            }
            SagaEvent::AttemptTimedOut {
                step,
                direction: Direction::Execute,
                ..
            } if index(step).is_some_and(|i| def.steps[i].kind == StepKind::Pivot) => {
                pivots_heard_nothing.insert(step.clone());
            }
            SagaEvent::StepCompleted { step, .. } => {
                // After the saga was compensated, a late success of a step is compensated again
                // (to be safe with a participant that would not refuse a late action): the
                // one case where commands follow the end, after a new CompensationStarted.
                late_success |= finished;
                completed_at.insert(step.clone(), position);
                awaiting.remove(step);
                may_have_run.entry(step.clone()).or_default().insert(0);
                if index(step).is_some_and(|i| def.steps[i].kind == StepKind::Pivot)
                    && !compensation_began
                {
                    committed = true;
                }
                budget_used.remove(&format!("{step}/compensate"));
            }
            SagaEvent::CompensationRetryRequested { step, .. } => {
                budget_used.remove(&format!("{step}/compensate"));
            }
            SagaEvent::StepRetryRequested { step, .. } => {
                budget_used.remove(&format!("{step}/execute"));
            }
            SagaEvent::CompensationStarted { .. } => {
                ensure!(
                    !committed,
                    "compensation began after the point of no return"
                );
                ensure!(
                    !finished || late_success,
                    "compensation began again after the saga ended, with no late success"
                );
                let unheard = awaiting
                    .iter()
                    .find(|s| index(s).is_some_and(|i| def.is_parallel(i)));
                ensure!(
                    unheard.is_none(),
                    "compensation began while `{}` of a parallel group awaited its answer",
                    unheard.map_or("", |s| s.as_str())
                );
                finished = false;
                late_success = false;
                compensation_began = true;
            }
            SagaEvent::SagaCompleted | SagaEvent::SagaCompensated => finished = true,
            _ => {}
        }
    }
    ensure!(
        first_compensations.windows(2).all(|w| w[0] > w[1]),
        "compensations out of reverse order: {:?}",
        first_compensations
            .iter()
            .map(|(_, _, i)| def.steps[*i].name.as_str())
            .collect::<Vec<_>>()
    );
    if committed {
        ensure!(
            matches!(
                state.status,
                SagaStatus::Running | SagaStatus::Completed | SagaStatus::CompletionFailed
            ),
            "past the point of no return, yet the saga is {}",
            state.status.as_str()
        );
    }
    Ok(())
}

/// The participants' books: the one recorded outcome of each (step, direction).
pub type Records = HashMap<(String, Direction), Reply>;

/// What a participant keeping the SDK's contract answers for `step` in `direction` whatever its
/// handler would say, if anything: its recorded outcome; for an action, a refusal once its
/// compensation was recorded or once it `expired`; for a compensation of an action that did
/// not run here, a null compensation (success).
pub fn contract_answer(
    records: &Records,
    step: &str,
    direction: Direction,
    expired: bool,
) -> Option<Reply> {
    if let Some(recorded) = records.get(&(step.to_owned(), direction)) {
        return Some(recorded.clone());
    }
    let compensated = records.contains_key(&(step.to_owned(), Direction::Compensate));
    match direction {
        Direction::Execute if compensated => Some(Reply::Failure {
            reason: "compensated before executed".into(),
        }),
        Direction::Execute if expired => Some(Reply::Failure {
            reason: saga_schemas::EXPIRED.into(),
        }),
        Direction::Compensate
            if !matches!(
                records.get(&(step.to_owned(), Direction::Execute)),
                Some(Reply::Success { .. })
            ) =>
        {
            Some(Reply::Success {
                output: Data::new(),
            })
        }
        _ => None,
    }
}

/// At the end of a path: the saga settled (or waits for an operator), and a compensated saga
/// left no effect behind at its participants (`records`) nor any step completed and not undone.
pub fn settled(
    def: &SagaDefinition,
    state: &SagaState,
    log: &[SagaEvent],
    records: &Records,
) -> Result<(), String> {
    match state.status {
        SagaStatus::Completed => {
            ensure!(
                def.steps
                    .iter()
                    .all(|d| state.step(&d.name).is_some_and(|s| s.completed)),
                "completed with a step not completed"
            );
        }
        SagaStatus::Compensated => {
            let by_hand: BTreeSet<&str> = log
                .iter()
                .filter_map(|e| match e {
                    SagaEvent::StepCompensated {
                        step, manual: true, ..
                    } => Some(step.as_str()),
                    _ => None,
                })
                .collect();
            for d in &def.steps {
                let ran = matches!(
                    records.get(&(d.name.clone(), Direction::Execute)),
                    Some(Reply::Success { .. })
                );
                let undone = matches!(
                    records.get(&(d.name.clone(), Direction::Compensate)),
                    Some(Reply::Success { .. })
                ) || by_hand.contains(d.name.as_str());
                ensure!(
                    !ran || undone,
                    "compensated, yet `{}` ran at its participant and was not undone",
                    d.name
                );
                let completed = state.step(&d.name).is_some_and(|s| s.completed);
                match d.kind {
                    StepKind::Compensatable => ensure!(
                        !completed || state.step(&d.name).is_some_and(|s| s.compensated),
                        "compensated, yet `{}` completed and was not compensated",
                        d.name
                    ),
                    StepKind::Retriable => ensure!(
                        !completed,
                        "compensated, yet `{}` (past the point of no return) completed",
                        d.name
                    ),
                    StepKind::Pivot => {}
                }
            }
        }
        SagaStatus::CompensationFailed | SagaStatus::CompletionFailed => {}
        other => {
            return Err(format!(
                "the saga never settles: it stays {} with nothing left to happen",
                other.as_str()
            ));
        }
    }
    Ok(())
}
