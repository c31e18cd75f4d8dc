//! Property tests: random definitions driven by random interleavings of replies, duplicates,
//! timeouts, late replies and operator commands, checked against the saga invariants.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use common::{saga, step, t0};
use proptest::prelude::*;
use saga_engine::definition::RetryPolicy;
use saga_engine::engine::command_message_id;
use saga_engine::{
    Decision, Ignored, Input, OperatorCommand, Outcome, SagaDefinition, SagaState, StepKind,
    TimerChange, TimerKind, decide,
};
use saga_schemas::{Data, Direction, Outcome as Reply, SagaEvent, SagaStatus};
use uuid::Uuid;

/// Random definitions: up to 5 compensatable steps, some of them run at once in `parallel`
/// groups (each declaring its own output key), a pivot or not, up to 2 retriable steps.
fn definitions() -> impl Strategy<Value = SagaDefinition> {
    (0usize..6, any::<bool>(), 0usize..3, any::<bool>())
        .prop_filter("at least one step", |(c, p, r, _)| {
            c + usize::from(*p) + r > 0
        })
        .prop_flat_map(|(compensatable, pivot, retriable, deadline)| {
            let n = compensatable + usize::from(pivot) + retriable;
            (
                prop::collection::vec((1u32..4, 1u32..4), n),
                // Whether each compensatable step runs together with the one before it.
                prop::collection::vec(any::<bool>(), compensatable),
                Just((compensatable, pivot, deadline)),
            )
        })
        .prop_map(|(budgets, joins, (compensatable, pivot, deadline))| {
            let mut steps = Vec::new();
            for (i, (attempts, compensation_attempts)) in budgets.into_iter().enumerate() {
                let kind = if i < compensatable {
                    StepKind::Compensatable
                } else if pivot && i == compensatable {
                    StepKind::Pivot
                } else {
                    StepKind::Retriable
                };
                let mut s = step(&format!("s{i}"), kind);
                s.retry = RetryPolicy {
                    max_attempts: attempts,
                    backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_millis(400),
                };
                s.compensation_retry.max_attempts = compensation_attempts;
                steps.push(s);
            }
            // A group is a run of joined compensatable steps, numbered by its first step.
            let mut starts = Vec::new();
            for i in 0..compensatable {
                let start = if i > 0 && joins[i] { starts[i - 1] } else { i };
                starts.push(start);
            }
            for i in 0..compensatable {
                if starts.iter().filter(|s| **s == starts[i]).count() > 1 {
                    steps[i].group = Some(starts[i] as u32);
                    steps[i].outputs = Some(vec![format!("k{i}")]);
                }
            }
            let mut def = saga(steps);
            def.deadline = deadline.then(|| Duration::from_secs(7));
            def
        })
}

/// What the simulated world does next. Participants keep the contract: one recorded outcome
/// per (step, direction), given again to every later attempt; an action refused once its
/// compensation was recorded or once it expired.
#[derive(Debug, Clone)]
enum Move {
    /// A participant answers one outstanding command; with `Drop` it runs the command (success)
    /// but the reply is lost, the worst case for the orchestrator.
    Answer(usize, Answer),
    /// The broker redelivers a reply already delivered.
    Duplicate(usize),
    /// Someone else's message on the replies queue: a reply naming a step and attempt the saga
    /// sent, but not its command (a forged or misrouted `in_reply_to`).
    Forge(usize, Answer),
    /// A pending timer fires (not necessarily the earliest: timers race).
    Fire(usize),
    Abort,
    RetryCompensation,
    MarkCompensated(usize),
    RetryStep,
    MarkCompleted(usize),
}

#[derive(Debug, Clone, Copy)]
enum Answer {
    Success,
    Failure,
    RetryableError,
    Drop,
}

fn answers() -> impl Strategy<Value = Answer> {
    prop_oneof![
        3 => Just(Answer::Success),
        1 => Just(Answer::Failure),
        1 => Just(Answer::RetryableError),
        1 => Just(Answer::Drop),
    ]
}

fn moves(with_operator: bool) -> impl Strategy<Value = Vec<Move>> {
    let world = prop_oneof![
        6 => (any::<usize>(), answers()).prop_map(|(i, a)| Move::Answer(i, a)),
        2 => any::<usize>().prop_map(Move::Duplicate),
        1 => (any::<usize>(), answers()).prop_map(|(i, a)| Move::Forge(i, a)),
        3 => any::<usize>().prop_map(Move::Fire),
    ];
    let operator = prop_oneof![
        1 => Just(Move::Abort),
        1 => Just(Move::RetryCompensation),
        1 => any::<usize>().prop_map(Move::MarkCompensated),
        1 => Just(Move::RetryStep),
        1 => any::<usize>().prop_map(Move::MarkCompleted),
    ];
    let one = if with_operator {
        prop_oneof![10 => world, 1 => operator].boxed()
    } else {
        world.boxed()
    };
    prop::collection::vec(one, 0..80)
}

type CommandKey = (String, Direction, u32);

struct World {
    def: SagaDefinition,
    saga_id: Uuid,
    now: DateTime<Utc>,
    state: Option<SagaState>,
    log: Vec<SagaEvent>,
    /// Commands sent and not yet answered (in send order); dropped ones stay here forever.
    outstanding: Vec<CommandKey>,
    dropped: HashSet<CommandKey>,
    delivered: Vec<Input>,
    timers: BTreeMap<String, (TimerKind, DateTime<Utc>)>,
    /// The participants' records: the one outcome of each (step, direction).
    records: HashMap<(String, Direction), Reply>,
    /// `expires_at` of each step's actions, as the commands carried it.
    expiry: HashMap<String, DateTime<Utc>>,
}

impl World {
    fn new(def: SagaDefinition) -> Self {
        let mut world = World {
            def,
            saga_id: Uuid::from_u128(7),
            now: t0(),
            state: None,
            log: Vec::new(),
            outstanding: Vec::new(),
            dropped: HashSet::new(),
            delivered: Vec::new(),
            timers: BTreeMap::new(),
            records: HashMap::new(),
            expiry: HashMap::new(),
        };
        let saga_id = world.saga_id;
        world.apply(Input::Start {
            saga_id,
            input: Data::new(),
            business_key: None,
        });
        world
    }

    fn status(&self) -> SagaStatus {
        self.state.as_ref().expect("started").status
    }

    fn apply(&mut self, input: Input) -> Decision {
        let decision = decide(&self.def, self.state.as_ref(), &input, self.now);
        if decision.outcome != Outcome::Applied {
            assert!(decision.events.is_empty() && decision.commands.is_empty());
        }
        self.log.extend(decision.events.iter().cloned());
        for command in &decision.commands {
            self.outstanding
                .push((command.step.clone(), command.direction, command.attempt));
            if let Some(at) = command.expires_at {
                let first = *self.expiry.entry(command.step.clone()).or_insert(at);
                assert_eq!(
                    first, at,
                    "every attempt carries the first attempt's expiry"
                );
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
        self.state = decision.state.clone();
        let state = self.state.as_ref().expect("exists");
        check_invariants(&self.def, self.saga_id, &self.log, state);
        check_stored_round_trip(state);
        decision
    }

    fn answer(&mut self, index: usize, answer: Answer) {
        if self.outstanding.is_empty() {
            return;
        }
        let key = self.outstanding[index % self.outstanding.len()].clone();
        if self.dropped.contains(&key) {
            return;
        }
        let outcome = self.participant(&key, answer);
        if matches!(answer, Answer::Drop) {
            self.dropped.insert(key);
            return;
        }
        self.outstanding.retain(|k| *k != key);
        let (step, direction, attempt) = key;
        let input = Input::Reply {
            in_reply_to: command_message_id(self.saga_id, &step, direction, attempt),
            step,
            direction,
            attempt,
            outcome,
        };
        self.delivered.push(input.clone());
        self.apply(input);
    }

    /// A reply to no command of the saga changes nothing.
    fn forge(&mut self, index: usize, answer: Answer) {
        let Some(state) = &self.state else { return };
        let sent: Vec<CommandKey> = state
            .steps
            .iter()
            .flat_map(|s| {
                [Direction::Execute, Direction::Compensate]
                    .into_iter()
                    .filter(|d| s.attempts(*d).sent > 0)
                    .map(|d| (s.name.clone(), d, s.attempts(d).sent))
            })
            .collect();
        if sent.is_empty() {
            return;
        }
        let (step, direction, attempt) = sent[index % sent.len()].clone();
        let outcome = match answer {
            Answer::Success | Answer::Drop => Reply::Success {
                output: Data::new(),
            },
            Answer::Failure => Reply::Failure {
                reason: "forged".into(),
            },
            Answer::RetryableError => Reply::RetryableError {
                error: "forged".into(),
            },
        };
        let input = Input::Reply {
            in_reply_to: Uuid::from_u128(index as u128),
            step,
            direction,
            attempt,
            outcome,
        };
        let decision = self.apply(input);
        assert!(
            matches!(
                decision.outcome,
                Outcome::Ignored(Ignored::UnknownCommand { .. })
            ),
            "a forged reply was taken: {:?}",
            decision.outcome
        );
    }

    /// What the participant answers (and records) when it handles `key`.
    fn participant(&mut self, key: &CommandKey, answer: Answer) -> Reply {
        let (step, direction, _) = key;
        let expired = self.expiry.get(step).is_some_and(|at| self.now > *at);
        let outcome = saga_engine::check::contract_answer(&self.records, step, *direction, expired)
            .unwrap_or_else(|| match answer {
                Answer::Success | Answer::Drop => Reply::Success {
                    output: Data::new(),
                },
                Answer::Failure => Reply::Failure {
                    reason: "no".into(),
                },
                Answer::RetryableError => Reply::RetryableError {
                    error: "busy".into(),
                },
            });
        // A retryable error records nothing.
        if !matches!(outcome, Reply::RetryableError { .. }) {
            self.records
                .insert((step.clone(), *direction), outcome.clone());
        }
        outcome
    }

    /// The operator fixed the participant's cause and cleared its record of `step`.
    fn clear_record(&mut self, direction: Direction) {
        let failed = self.state.as_ref().and_then(|state| {
            state
                .steps
                .iter()
                .find(|s| match direction {
                    Direction::Execute => s.failed && !s.completed,
                    Direction::Compensate => s.compensation_failed,
                })
                .map(|s| s.name.clone())
        });
        if let Some(step) = failed {
            self.records.remove(&(step, direction));
        }
    }

    fn fire(&mut self, key: &str) {
        let (timer, due) = self.timers.remove(key).expect("pending timer");
        self.now = self.now.max(due);
        self.apply(Input::Timer(timer));
    }

    fn play(&mut self, m: &Move) {
        match m {
            Move::Answer(i, a) => self.answer(*i, *a),
            Move::Forge(i, a) => self.forge(*i, *a),
            Move::Duplicate(i) => {
                if !self.delivered.is_empty() {
                    let input = self.delivered[i % self.delivered.len()].clone();
                    self.apply(input);
                }
            }
            Move::Fire(i) => {
                if !self.timers.is_empty() {
                    let key = self
                        .timers
                        .keys()
                        .nth(i % self.timers.len())
                        .cloned()
                        .expect("key");
                    self.fire(&key);
                }
            }
            Move::Abort => {
                self.apply(Input::operator(OperatorCommand::Abort {
                    reason: "test".into(),
                }));
            }
            Move::RetryCompensation => {
                if self.status() == SagaStatus::CompensationFailed {
                    self.clear_record(Direction::Compensate);
                }
                self.apply(Input::operator(OperatorCommand::RetryCompensation));
            }
            Move::MarkCompensated(i) => {
                let step = self.def.steps[i % self.def.steps.len()].name.clone();
                self.apply(Input::operator(OperatorCommand::MarkCompensated { step }));
            }
            Move::RetryStep => {
                if self.status() == SagaStatus::CompletionFailed {
                    self.clear_record(Direction::Execute);
                }
                self.apply(Input::operator(OperatorCommand::RetryStep));
            }
            Move::MarkCompleted(i) => {
                let step = self.def.steps[i % self.def.steps.len()].name.clone();
                self.apply(Input::operator(OperatorCommand::MarkCompleted {
                    step,
                    output: Data::new(),
                }));
            }
        }
    }

    /// Participants recover and answer everything (their records, else success); timers fire
    /// in due order; until nothing is left to happen.
    fn drain(&mut self) {
        for _ in 0..10_000 {
            if let Some(i) = self
                .outstanding
                .iter()
                .position(|k| !self.dropped.contains(k))
            {
                self.answer(i, Answer::Success);
                continue;
            }
            let earliest = self
                .timers
                .iter()
                .min_by_key(|(_, (_, due))| *due)
                .map(|(k, _)| k.clone());
            match earliest {
                Some(key) => self.fire(&key),
                None => return,
            }
        }
        panic!("the saga never settled: {:?}", self.state);
    }

    /// An operator settles every saga that waits for one.
    fn operate(&mut self) {
        for _ in 0..100 {
            self.drain();
            match self.status() {
                SagaStatus::CompletionFailed => {
                    self.clear_record(Direction::Execute);
                    self.apply(Input::operator(OperatorCommand::RetryStep));
                    continue;
                }
                SagaStatus::CompensationFailed => {}
                _ => return,
            }
            self.clear_record(Direction::Compensate);
            let d = self.apply(Input::operator(OperatorCommand::RetryCompensation));
            if matches!(d.outcome, Outcome::Rejected(_)) {
                let failed = self
                    .state
                    .as_ref()
                    .unwrap()
                    .steps
                    .iter()
                    .find(|s| s.compensation_failed);
                let step = failed.expect("a failed step").name.clone();
                self.apply(Input::operator(OperatorCommand::MarkCompensated { step }));
            }
        }
        panic!("the operator could not settle the saga");
    }
}

/// The saga invariants, as `orchestrator check` checks them on every path.
fn check_invariants(def: &SagaDefinition, saga_id: Uuid, log: &[SagaEvent], state: &SagaState) {
    if let Err(broken) = saga_engine::check::invariants(def, saga_id, log, state) {
        panic!("{broken}\nlog: {log:#?}");
    }
}

/// The store keeps the state as JSON and acts on what it reads back: it must read back whole.
fn check_stored_round_trip(state: &SagaState) {
    let stored = serde_json::to_string(state).expect("a state serializes");
    let read: SagaState = serde_json::from_str(&stored).expect("a stored state reads back");
    assert_eq!(&read, state, "stored as {stored}");
}

/// The participants' books after the saga settled, as `orchestrator check` checks them.
fn check_settled(world: &World) {
    let state = world.state.as_ref().expect("started");
    if let Err(broken) = saga_engine::check::settled(&world.def, state, &world.log, &world.records)
    {
        panic!("{broken}\nlog: {:#?}", world.log);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn every_saga_settles_without_operator_help(def in definitions(), script in moves(false)) {
        let mut world = World::new(def.clone());
        for m in &script {
            world.play(m);
        }
        world.drain();
        check_settled(&world);
    }

    #[test]
    fn operators_never_break_the_invariants_and_can_always_finish(def in definitions(), script in moves(true)) {
        let mut world = World::new(def.clone());
        for m in &script {
            world.play(m);
        }
        world.operate();
        check_settled(&world);
        let state = world.state.as_ref().unwrap();
        prop_assert!(matches!(state.status, SagaStatus::Completed | SagaStatus::Compensated));
    }
}
