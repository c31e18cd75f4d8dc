//! The decision loop around the pure engine: load state, decide, commit everything the
//! decision implies in one transaction. Every input to a saga (start, reply, timer, operator
//! command) goes through here, so this is the one place where a saga moves.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, Utc};
use saga_amqp::trace::{self, TraceContext};
use saga_engine::{
    Decision, Definitions, Ignored, Input, OperatorCommand, Outcome, SagaDefinition, SagaState,
    decide,
};
use saga_schemas::amqp::{HeaderValue, OutgoingMessage, REPLIES_QUEUE};
use saga_schemas::{Data, EventEnvelope, SagaEvent, limits};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::group_commit::GroupCommit;
use crate::store::{Commit, CommitError, OutboxRow, Store, StoreError};

/// Which recorded events are also published to `saga.events`: every event is always recorded
/// in the event log; this only says which leave as messages, one per event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PublishEvents {
    /// Every event: for a subscriber following each step.
    All,
    /// Only the events that end a saga or hand it to an operator: `saga_completed`,
    /// `saga_compensated`, `compensation_failed`, `completion_failed`. The default: one
    /// message per saga instead of about eight, each also an outbox row written twice, and
    /// nothing in the management UI or the web view needs the others (the history is served
    /// from the event log).
    #[default]
    Terminal,
    /// None.
    None,
}

impl PublishEvents {
    fn publishes(self, event: &SagaEvent) -> bool {
        match self {
            PublishEvents::All => true,
            PublishEvents::Terminal => matches!(
                event,
                SagaEvent::SagaCompleted
                    | SagaEvent::SagaCompensated
                    | SagaEvent::CompensationFailed { .. }
                    | SagaEvent::CompletionFailed { .. }
            ),
            PublishEvents::None => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PublishEvents::All => "all",
            PublishEvents::Terminal => "terminal",
            PublishEvents::None => "none",
        }
    }
}

impl std::fmt::Display for PublishEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PublishEvents {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "all" => Ok(PublishEvents::All),
            "terminal" => Ok(PublishEvents::Terminal),
            "none" => Ok(PublishEvents::None),
            other => Err(format!(
                "unknown value {other:?}: use all, terminal (the default) or none"
            )),
        }
    }
}

/// How often a decision is retried when another writer advanced the saga first.
const CONFLICT_RETRIES: usize = 8;

/// Namespace of event message ids: one stable id per (saga, seq).
const EVENT_ID_NAMESPACE: Uuid = Uuid::from_u128(0x8b1e_4d2c_7a3f_4e9b_a6c1_5d2e_3f4a_5b6c);

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("no saga named `{0}` is defined")]
    UnknownSaga(String),
    /// An input that can never be taken, and why: a start input that does not match the
    /// saga's `input_schema` or is larger than the saga data limit, or a step output (from a
    /// reply or an operator) that would take the saga data over that limit.
    #[error("{0}")]
    InvalidInput(String),
    #[error("no saga with id {0}")]
    NotFound(Uuid),
    #[error("saga {saga_id} runs `{name}`, which is no longer defined")]
    DefinitionGone { saga_id: Uuid, name: String },
    #[error("the saga kept changing under us; try again")]
    Contended,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl RuntimeError {
    /// Whether handling the same input again can never succeed: the saga or its definition
    /// does not exist, the input is invalid, or the store says so
    /// ([`StoreError::is_permanent`]). Such an input is set aside; any other error (the
    /// database unavailable, a contended saga) is worth trying again later. The one rule, for
    /// timers and replies alike.
    pub fn is_permanent(&self) -> bool {
        match self {
            RuntimeError::UnknownSaga(_)
            | RuntimeError::InvalidInput(_)
            | RuntimeError::NotFound(_)
            | RuntimeError::DefinitionGone { .. } => true,
            RuntimeError::Contended => false,
            RuntimeError::Store(error) => error.is_permanent(),
        }
    }
}

/// A decision that merges a step's output (a success reply, or an operator marking the step
/// completed) is refused when it takes the saga data over [`limits::MAX_DATA_BYTES`]: the
/// output is not applied, nothing is recorded, and the error is permanent, so a reply is set
/// aside with the reason. The step stays awaited: an operator may mark it completed with a
/// smaller output, or abort the saga before its point of no return. (Data that was already
/// larger, from before the limit, may still take an output that does not make it grow.)
fn check_data_size(before: &SagaState, decision: &Decision) -> Result<(), RuntimeError> {
    let (Some(state), Some(step)) = (
        &decision.state,
        decision.events.iter().find_map(|e| match e {
            SagaEvent::StepCompleted { step, .. } => Some(step),
            _ => None,
        }),
    ) else {
        return Ok(());
    };
    let size = |data: &Data| serde_json::to_vec(data).map_or(usize::MAX, |json| json.len());
    let after = size(&state.data);
    if after <= limits::MAX_DATA_BYTES || after <= size(&before.data) {
        return Ok(());
    }
    Err(RuntimeError::InvalidInput(format!(
        "the output of step `{step}` is not applied: the saga data with it would be {after} \
         bytes as JSON; the limit is {}",
        limits::MAX_DATA_BYTES
    )))
}

/// One input for one saga, with what must be recorded alongside it.
#[derive(Debug, Clone)]
pub struct Work {
    pub saga_id: Uuid,
    pub input: Input,
    /// The message id of the reply that carried it, recorded in the inbox.
    pub inbox_id: Option<Uuid>,
    /// The timer that fired, deleted in the same transaction.
    pub fired_timer: Option<String>,
    /// The W3C trace context that came with it (a reply's): the parent of its span. Without
    /// one, the span is a child of the saga's start.
    pub trace: Option<TraceContext>,
}

impl Work {
    /// What kind of input, for spans and logs.
    fn kind(&self) -> &'static str {
        match self.input {
            Input::Start { .. } => "start",
            Input::Reply { .. } => "reply",
            Input::Timer(_) => "timer",
            Input::Operator { .. } => "operator",
        }
    }
}

/// The span a work item is decided in: a child of the context it carries, else of the saga's
/// start (`parents`), so that every span of one saga is in one trace.
fn work_span(work: &Work, parents: &HashMap<Uuid, TraceContext>) -> tracing::Span {
    // Without export the span would only cost: the log lines carry saga_id themselves.
    if !trace::enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("saga.input", saga_id = %work.saga_id, input = work.kind(),
        trace_id = tracing::field::Empty);
    let parent = work.trace.as_ref().or_else(|| parents.get(&work.saga_id));
    trace::set_parent_context(&span, parent);
    span
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub saga_id: Uuid,
    /// False when an earlier request with the same idempotency key started it.
    pub created: bool,
}

#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    definitions: Definitions,
    /// Earlier versions sagas in flight may have started on, by (name, version).
    versions: HashMap<(String, String), SagaDefinition>,
    input_validators: HashMap<String, jsonschema::Validator>,
    store: Store,
    /// Started at the first commit, inside the async runtime.
    group_commit: OnceLock<GroupCommit>,
    /// Outbox rows just committed, for the relay.
    handoff: crate::relay::Handoff,
    /// The states last committed here, to decide on without a read.
    states: crate::cache::StateCache,
    events: PublishEvents,
}

impl Runtime {
    pub fn new(definitions: Definitions, store: Store) -> Result<Self, RuntimeError> {
        let mut input_validators = HashMap::new();
        for saga in &definitions.sagas {
            if let Some(schema) = &saga.input_schema {
                let validator = jsonschema::validator_for(schema).map_err(|e| {
                    RuntimeError::InvalidInput(format!(
                        "saga `{}`: input_schema is not a valid JSON Schema: {e}",
                        saga.name
                    ))
                })?;
                input_validators.insert(saga.name.clone(), validator);
            }
        }
        Ok(Runtime {
            inner: Arc::new(Inner {
                definitions,
                versions: HashMap::new(),
                input_validators,
                store,
                group_commit: OnceLock::new(),
                handoff: crate::relay::Handoff::default(),
                states: crate::cache::StateCache::default(),
                events: PublishEvents::default(),
            }),
        })
    }

    /// A runtime for `definitions` that also runs every saga started on an earlier version on
    /// that version's steps: stores the current definitions (marking them loaded now), then
    /// reads back every stored version.
    pub async fn open(definitions: Definitions, store: Store) -> Result<Self, RuntimeError> {
        store
            .store_definitions(&definitions.sagas, Utc::now())
            .await?;
        let stored = store.stored_definitions().await?;
        let mut runtime = Runtime::new(definitions, store)?;
        let inner = Arc::get_mut(&mut runtime.inner).expect("a runtime just built");
        for def in stored {
            let current = inner.definitions.get(&def.name);
            if current.is_none_or(|c| c.version != def.version) {
                inner
                    .versions
                    .insert((def.name.clone(), def.version.clone()), def);
            }
        }
        let mut earlier: Vec<_> = inner.versions.keys().collect();
        earlier.sort();
        if !earlier.is_empty() {
            info!(earlier = ?earlier, "earlier definition versions kept for the sagas started on them");
        }
        Ok(runtime)
    }

    /// Publishes only `events` to `saga.events` (the terminal ones unless told otherwise). Call it
    /// on the runtime just built, before it is cloned.
    pub fn publishing(mut self, events: PublishEvents) -> Self {
        Arc::get_mut(&mut self.inner)
            .expect("publishing() is called on a runtime not yet shared")
            .events = events;
        self
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    /// The definitions sagas start on: the current file.
    pub fn definitions(&self) -> &Definitions {
        &self.inner.definitions
    }

    /// The definition a saga started on: the current one when its version is current, else the
    /// stored earlier version. `None` when neither is known.
    pub fn definition_of(&self, name: &str, version: &str) -> Option<&SagaDefinition> {
        match self.definition(name) {
            Some(current) if current.version == version => Some(current),
            _ => self
                .inner
                .versions
                .get(&(name.to_owned(), version.to_owned())),
        }
    }

    /// Every participant a saga may still send a command to: those of the current file and
    /// of the earlier versions kept.
    pub fn participants(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .inner
            .definitions
            .sagas
            .iter()
            .chain(self.inner.versions.values())
            .flat_map(|s| s.steps.iter().map(|st| st.participant.clone()))
            .collect();
        all.sort_unstable();
        all.dedup();
        all
    }

    /// The outbox rows committed by this runtime, handed to the relay as they commit.
    pub(crate) fn handoff(&self) -> &crate::relay::Handoff {
        &self.inner.handoff
    }

    /// Marks outbox rows sent in the next group commit (see [`GroupCommit::mark_sent`]).
    pub(crate) fn mark_sent(&self, ids: Vec<i64>) -> tokio::sync::oneshot::Receiver<()> {
        let store = &self.inner.store;
        self.inner
            .group_commit
            .get_or_init(|| GroupCommit::start(store.clone()))
            .mark_sent(ids)
    }

    /// Commits through the shared group commit, then records what was committed
    /// ([`Self::after_commit`]: metrics, log lines, the relay's rows, the cache). Both run in a
    /// task of their own: a caller dropped while its commit is in flight (a consumer whose
    /// broker connection was lost) must not leave a committed decision uncounted, and unknown
    /// to the relay and the cache.
    ///
    /// One transaction at a time on either database: decisions are quick, and one transaction
    /// taking everything waiting commits fewer, larger batches (on PostgreSQL four at once gave
    /// smaller batches and more server CPU per saga).
    async fn commit(
        &self,
        commits: Vec<Commit>,
        spans: Vec<tracing::Span>,
    ) -> Result<(), CommitError> {
        let runtime = self.clone();
        tokio::spawn(async move {
            let store = &runtime.inner.store;
            let (commits, result) = runtime
                .inner
                .group_commit
                .get_or_init(|| GroupCommit::start(store.clone()))
                .commit(commits)
                .await;
            runtime.after_commit(commits, &spans, result?);
            Ok(())
        })
        .await
        .unwrap_or_else(|_| {
            Err(CommitError {
                index: None,
                error: StoreError::Db(sea_orm::DbErr::Custom("a commit's task panicked".into())),
            })
        })
    }

    fn definition(&self, name: &str) -> Option<&SagaDefinition> {
        self.inner.definitions.get(name)
    }

    /// Starts a saga, or returns the one an earlier request with the same key started.
    pub async fn start(
        &self,
        name: &str,
        input: Data,
        idempotency_key: Option<String>,
    ) -> Result<Started, RuntimeError> {
        self.start_traced(name, input, idempotency_key, None).await
    }

    /// [`Runtime::start`] for a request that carried a W3C trace context: the saga's spans
    /// join that trace, and pass its `tracestate` on (with export on; see `saga_amqp::trace`).
    pub async fn start_traced(
        &self,
        name: &str,
        input: Data,
        idempotency_key: Option<String>,
        trace_context: Option<TraceContext>,
    ) -> Result<Started, RuntimeError> {
        let def = self
            .definition(name)
            .ok_or_else(|| RuntimeError::UnknownSaga(name.to_owned()))?;
        limits::check_data_size("the saga input", &input).map_err(RuntimeError::InvalidInput)?;
        if let Some(validator) = self.inner.input_validators.get(name) {
            let value = serde_json::Value::Object(input.clone());
            let problems: Vec<String> = validator
                .iter_errors(&value)
                .map(|e| {
                    let path = e.instance_path().to_string();
                    if path.is_empty() {
                        e.to_string()
                    } else {
                        format!("{path}: {e}")
                    }
                })
                .collect();
            if !problems.is_empty() {
                return Err(RuntimeError::InvalidInput(format!(
                    "the input does not match the saga's input_schema: {}",
                    problems.join("; ")
                )));
            }
        }
        if let Some(key) = &idempotency_key
            && let Some(saga_id) = self.inner.store.saga_by_idempotency_key(name, key).await?
        {
            return Ok(Started {
                saga_id,
                created: false,
            });
        }
        // Time-ordered: the rows of sagas started together sit together in every index keyed
        // by saga id (events, timers, the participants' inboxes), so a batch of commits writes
        // a few hot pages instead of one random page per saga and table.
        let saga_id = Uuid::now_v7();
        let now = Utc::now();
        let decision = decide(
            def,
            None,
            &Input::Start {
                saga_id,
                input,
                business_key: None,
            },
            now,
        );
        let work = Work {
            saga_id,
            input: Input::Start {
                saga_id,
                input: Data::new(),
                business_key: None,
            },
            inbox_id: None,
            fired_timer: None,
            trace: trace_context,
        };
        let span = work_span(&work, &HashMap::new());
        let mut commit = span.in_scope(|| self.commit_for(Some(def), &work, 0, &decision, now));
        commit.idempotency_key = idempotency_key.clone();
        commit.trace = TraceContext::of_span(&span);
        match self.commit(vec![commit], vec![span.clone()]).await {
            Ok(()) => {
                span.in_scope(|| info!(%saga_id, saga = name, "saga started"));
                Ok(Started {
                    saga_id,
                    created: true,
                })
            }
            Err(e) if matches!(e.error, StoreError::Duplicate) => {
                // A concurrent request with the same key won the race.
                let key = idempotency_key.expect("only keyed starts can be duplicates");
                let saga_id = self
                    .inner
                    .store
                    .saga_by_idempotency_key(name, &key)
                    .await?
                    .ok_or(RuntimeError::Contended)?;
                Ok(Started {
                    saga_id,
                    created: false,
                })
            }
            Err(e) => Err(e.error.into()),
        }
    }

    /// An operator command on one saga, from no one in particular.
    pub async fn operate(
        &self,
        saga_id: Uuid,
        command: OperatorCommand,
    ) -> Result<Outcome, RuntimeError> {
        self.operate_as(saga_id, command, None).await
    }

    /// An operator command on one saga, issued `by` someone (an API token's name), which the
    /// events it causes record.
    pub async fn operate_as(
        &self,
        saga_id: Uuid,
        command: OperatorCommand,
        by: Option<String>,
    ) -> Result<Outcome, RuntimeError> {
        if self.inner.store.load(saga_id).await?.is_none() {
            return Err(RuntimeError::NotFound(saga_id));
        }
        let work = Work {
            saga_id,
            input: Input::Operator { command, by },
            inbox_id: None,
            fired_timer: None,
            trace: None,
        };
        self.handle_one(&work).await
    }

    /// Decides and commits a batch of inputs in ONE transaction (group commit). When that
    /// transaction fails (a concurrent writer, a duplicate), each input is retried alone.
    pub async fn handle(&self, batch: &[Work]) -> Vec<Result<Outcome, RuntimeError>> {
        if batch.len() == 1 {
            return vec![self.handle_one(&batch[0]).await];
        }
        match self.try_batch(batch).await {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            Err(error) => {
                debug!(%error, size = batch.len(), "group commit failed; handling one by one");
                let mut results = Vec::with_capacity(batch.len());
                for work in batch {
                    results.push(self.handle_one(work).await);
                }
                results
            }
        }
    }

    async fn try_batch(&self, batch: &[Work]) -> Result<Vec<Outcome>, RuntimeError> {
        let ids: Vec<Uuid> = batch.iter().map(|w| w.saga_id).collect();
        let mut states = self.inner.states.take(&ids);
        let cached: HashSet<Uuid> = states.keys().copied().collect();
        let missing: Vec<Uuid> = ids
            .iter()
            .filter(|id| !cached.contains(id))
            .copied()
            .collect();
        if !missing.is_empty() {
            states.extend(self.inner.store.load_many(&missing).await?);
        }
        let parents = self.trace_parents(batch).await?;
        let now = Utc::now();
        let mut commits: Vec<Commit> = Vec::with_capacity(batch.len());
        let mut spans = Vec::with_capacity(batch.len());
        let mut outcomes = Vec::with_capacity(batch.len());
        // Several inputs for one saga in a batch: each decides on the state the previous one
        // left, and its commit expects that version, so the store accepts them in order.
        // Sagas whose state is still the kept one: no decision of this batch has staked a
        // commit on it yet (see `cache`).
        let mut unchecked = cached;
        for work in batch {
            let span = work_span(work, &parents);
            let mut decided =
                span.in_scope(|| self.decide_for(work, states.get(&work.saga_id), now))?;
            if decided.0.events.is_empty() && unchecked.remove(&work.saga_id) {
                // The kept state may be stale: decide on the stored one.
                match self.inner.store.load(work.saga_id).await? {
                    Some(stored) => states.insert(work.saga_id, stored),
                    None => states.remove(&work.saga_id),
                };
                decided =
                    span.in_scope(|| self.decide_for(work, states.get(&work.saga_id), now))?;
            }
            let (decision, def) = decided;
            if !decision.events.is_empty() {
                // Its commit conflicts if the state it was decided on was stale.
                unchecked.remove(&work.saga_id);
            }
            let expected = states.get(&work.saga_id).map_or(0, |s| s.version);
            commits.push(span.in_scope(|| self.commit_for(def, work, expected, &decision, now)));
            spans.push(span);
            outcomes.push(decision.outcome);
            if let Some(state) = decision.state {
                states.insert(work.saga_id, state);
            }
        }
        self.commit(commits, spans)
            .await
            .map_err(|e| RuntimeError::Store(e.error))?;
        Ok(outcomes)
    }

    async fn handle_one(&self, work: &Work) -> Result<Outcome, RuntimeError> {
        let parents = self.trace_parents(std::slice::from_ref(work)).await?;
        let span = work_span(work, &parents);
        // The cached state first, if any; the stored one after a conflict, or when the cached
        // one would leave the input without an event (see `cache`).
        let mut cached = self.inner.states.take(std::slice::from_ref(&work.saga_id));
        for _ in 0..CONFLICT_RETRIES {
            let (state, from_cache) = match cached.remove(&work.saga_id) {
                Some(state) => (Some(state), true),
                None => (self.inner.store.load(work.saga_id).await?, false),
            };
            let now = Utc::now();
            let (decision, def) = span.in_scope(|| self.decide_for(work, state.as_ref(), now))?;
            if from_cache && decision.events.is_empty() {
                continue;
            }
            let expected = state.as_ref().map_or(0, |s| s.version);
            let commit = span.in_scope(|| self.commit_for(def, work, expected, &decision, now));
            match self.commit(vec![commit], vec![span.clone()]).await {
                Ok(()) => return Ok(decision.outcome),
                Err(e) => match e.error {
                    StoreError::Conflict => continue,
                    // Already handled by this or another orchestrator.
                    StoreError::Duplicate => {
                        return Ok(Outcome::Ignored(Ignored::Duplicate));
                    }
                    other => return Err(other.into()),
                },
            }
        }
        Err(RuntimeError::Contended)
    }

    /// The start's trace context of each saga whose work carries none, when spans are exported
    /// (one query; none otherwise).
    async fn trace_parents(
        &self,
        batch: &[Work],
    ) -> Result<HashMap<Uuid, TraceContext>, RuntimeError> {
        if !trace::enabled() {
            return Ok(HashMap::new());
        }
        let ids: Vec<Uuid> = batch
            .iter()
            .filter(|w| w.trace.is_none())
            .map(|w| w.saga_id)
            .collect();
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        Ok(self.inner.store.trace_parents(&ids).await?)
    }

    fn decide_for<'a>(
        &'a self,
        work: &Work,
        state: Option<&SagaState>,
        now: DateTime<Utc>,
    ) -> Result<(Decision, Option<&'a SagaDefinition>), RuntimeError> {
        let Some(state) = state else {
            let decision = Decision {
                outcome: Outcome::Ignored(Ignored::UnknownSaga),
                events: Vec::new(),
                commands: Vec::new(),
                timers: Vec::new(),
                state: None,
            };
            return Ok((decision, None));
        };
        let def = match self.definition_of(&state.saga_name, &state.definition_version) {
            Some(def) => def,
            None => {
                // Started before versions were kept, or its version was pruned by hand.
                let def = self.definition(&state.saga_name).ok_or_else(|| {
                    RuntimeError::DefinitionGone {
                        saga_id: work.saga_id,
                        name: state.saga_name.clone(),
                    }
                })?;
                warn!(saga_id = %work.saga_id, started_with = %state.definition_version, now = %def.version,
                    "the version the saga started on is not stored; continuing with the current one");
                def
            }
        };
        let decision = decide(def, Some(state), &work.input, now);
        check_data_size(state, &decision)?;
        match &decision.outcome {
            Outcome::Applied => {
                debug!(saga_id = %work.saga_id, events = ?decision.events.iter().map(SagaEvent::kind).collect::<Vec<_>>(), "decided")
            }
            Outcome::Ignored(why) => debug!(saga_id = %work.saga_id, %why, "input ignored"),
            Outcome::Rejected(why) => {
                info!(saga_id = %work.saga_id, %why, "operator command rejected")
            }
        }
        Ok((decision, Some(def)))
    }

    /// What a decision writes: its events, the new state, commands and lifecycle events in the
    /// outbox, timer changes, and the record that `work` was handled.
    fn commit_for(
        &self,
        def: Option<&SagaDefinition>,
        work: &Work,
        expected_version: u64,
        decision: &Decision,
        now: DateTime<Utc>,
    ) -> Commit {
        let saga_id = work.saga_id;
        let mut commit = Commit {
            expected_version,
            inbox_id: work.inbox_id,
            fired_timer: work.fired_timer.clone(),
            ..Commit::empty(saga_id, now)
        };
        let Some(def) = def else {
            // An unknown saga: nothing is recorded for the input, so the reply is set aside
            // (dead-lettered) by its consumer rather than marked as handled.
            commit.inbox_id = None;
            return commit;
        };
        for command in &decision.commands {
            let (_, step) = def
                .step(&command.step)
                .expect("the engine only sends commands for steps of the definition");
            // A command nobody consumed within twice the step's timeout has been superseded by
            // a newer attempt: the broker may drop it. With every command of a queue living as
            // long, they expire in queue order, so a participant that is down costs at most
            // two or three queued commands per waiting step, however long it is down.
            let discard_after = now + step.timeout * 2;
            let mut message = OutgoingMessage::command(
                command,
                &step.participant,
                REPLIES_QUEUE,
                Some(discard_after),
            );
            // The participant's span is a child of this one: one span per command sent.
            if trace::enabled() {
                let span = tracing::info_span!("saga.step", step = %command.step,
                    direction = command.direction.as_str(), attempt = command.attempt,
                    participant = %step.participant);
                for (key, value) in trace::context_headers(&span) {
                    message
                        .headers
                        .push((key.to_owned(), HeaderValue::Str(value)));
                }
            }
            commit.outbox.push(message);
        }
        for (seq, event) in (expected_version + 1..).zip(&decision.events) {
            if !self.inner.events.publishes(event) {
                continue;
            }
            let envelope = EventEnvelope {
                saga_id,
                saga_name: def.name.clone(),
                seq,
                recorded_at: now,
                event: event.clone(),
            };
            let id = Uuid::new_v5(&EVENT_ID_NAMESPACE, format!("{saga_id}/{seq}").as_bytes());
            commit.outbox.push(OutgoingMessage::event(&envelope, id));
        }
        commit.events = decision.events.clone();
        commit.state = decision.state.clone();
        commit.timers = decision.timers.clone();
        commit
    }

    /// Metrics and log lines of what was committed, each line in its work's span (`spans`, in
    /// the order of `commits`) so that it carries the trace id; then the outbox rows to the
    /// relay and the new states to the cache.
    fn after_commit(&self, commits: Vec<Commit>, spans: &[tracing::Span], outbox_ids: Vec<i64>) {
        for (index, commit) in commits.iter().enumerate() {
            let _entered = spans.get(index).map(tracing::Span::enter);
            if let Some(state) = &commit.state {
                crate::metrics::record(
                    &commit.events,
                    commit.expected_version + 1,
                    state,
                    commit.now,
                );
            }
            for event in &commit.events {
                match event {
                    SagaEvent::SagaCompleted
                    | SagaEvent::SagaCompensated
                    | SagaEvent::CompensationFailed { .. }
                    | SagaEvent::CompensationStarted { .. } => {
                        info!(saga_id = %commit.saga_id, event = event.kind(), "{}", event.kind().replace('_', " "))
                    }
                    _ => debug!(saga_id = %commit.saga_id, event = event.kind(), "recorded"),
                }
            }
        }
        // The outbox ids follow the commits' messages in order.
        let mut ids = outbox_ids.into_iter();
        let mut rows = Vec::with_capacity(ids.len());
        for commit in commits {
            for (message, id) in commit.outbox.into_iter().zip(ids.by_ref()) {
                rows.push(OutboxRow {
                    id,
                    saga_id: commit.saga_id,
                    message,
                    created_at: commit.now,
                });
            }
            if !commit.events.is_empty()
                && let Some(state) = commit.state
            {
                self.inner.states.put(state);
            }
        }
        if !rows.is_empty() {
            self.inner.handoff.push(rows);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use saga_engine::Definitions;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_start_dropped_while_its_commit_is_in_flight_is_still_recorded_after_it() {
        // Given a runtime on a SQLite file whose write lock another connection holds, so that
        // the start's commit cannot end however the threads are scheduled
        let path = std::env::temp_dir().join(format!("saga-runtime-{}.db", Uuid::new_v4()));
        let url = format!("sqlite://{}?mode=rwc", path.display());
        let store = Store::connect(&url).await.unwrap();
        let other = sea_orm::Database::connect(&url).await.unwrap();
        let lock = sea_orm::TransactionTrait::begin(&other).await.unwrap();
        sea_orm::ConnectionTrait::execute_unprepared(&lock, "CREATE TABLE hold_the_lock (x)")
            .await
            .unwrap();
        let definitions = Definitions::parse(
            "sagas.yaml",
            "sagas:\n  - name: ship\n    steps:\n      - name: ship\n        participant: carrier\n        action: ship\n        kind: retriable\n        timeout: 5s\n",
        )
        .unwrap();
        let runtime = Runtime::new(definitions, store).unwrap();

        // When a start is dropped once its commit is handed over (a consumer whose connection
        // was lost): its first poll reaches the commit, as nothing before it waits
        let mut start = Box::pin(runtime.start("ship", Data::new(), None));
        assert!(futures_util::poll!(start.as_mut()).is_pending());
        drop(start);
        lock.rollback().await.unwrap();

        // Then the saga is committed, and what follows a commit happened too: its state is
        // in the cache (as its rows are with the relay and its counts in the metrics)
        let saga_id = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                let all = crate::store::ListFilter {
                    limit: 10,
                    ..Default::default()
                };
                let sagas = runtime.store().list(&all).await.unwrap();
                if let Some(saga) = sagas.first() {
                    return saga.id;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the start was committed");
        let cached = tokio::time::timeout(Duration::from_secs(30), async {
            loop {
                if let Some(state) = runtime.inner.states.take(&[saga_id]).remove(&saga_id) {
                    return state;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the committed start's state reached the cache");
        let stored = runtime.store().load(saga_id).await.unwrap().unwrap();
        assert_eq!(cached.version, stored.version);
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}
