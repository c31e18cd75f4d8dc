//! The write side: the event log and the snapshot. [`Store::load`] reads a saga's snapshot
//! (rebuilt from its log when it does not parse); [`Store::commit`] appends what decisions
//! produced, for one saga or many, in one transaction (the statements are in `commit`).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use saga_amqp::trace::TraceContext;
use saga_engine::{SagaState, TimerChange};
use saga_schemas::SagaEvent;
use saga_schemas::amqp::OutgoingMessage;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use super::entity::{saga_events, sagas};
use super::{MAX_PARAMS, Store, StoreError, commit, read_model};

/// A failed [`Store::commit`]: nothing of the batch was written.
#[derive(Debug, thiserror::Error)]
#[error("{}: {error}", match .index { Some(i) => format!("commit #{i} of the batch failed"), None => "the batch failed".to_owned() })]
pub struct CommitError {
    /// Which commit of the batch failed (Conflict, Duplicate, Corrupt): retry the others one by
    /// one. `None` when the failure belongs to no commit in particular (a database or
    /// connection error): the whole batch may be retried later.
    pub index: Option<usize>,
    #[source]
    pub error: StoreError,
}

impl CommitError {
    pub(super) fn at(index: usize, error: StoreError) -> Self {
        CommitError {
            index: Some(index),
            error,
        }
    }

    pub(super) fn batch(error: impl Into<StoreError>) -> Self {
        CommitError {
            index: None,
            error: error.into(),
        }
    }
}

/// Everything one decision writes. A commit with no `events` (an ignored input) writes no
/// event and leaves the saga row alone, but still records `inbox_id`, deletes `fired_timer`,
/// and writes any outbox rows and timer changes given.
#[derive(Debug, Clone)]
pub struct Commit {
    pub saga_id: Uuid,
    /// The version the decision was made on (`state.version` as loaded; 0 for a new saga).
    /// The events get `seq` `expected_version + 1 ..`.
    pub expected_version: u64,
    pub events: Vec<SagaEvent>,
    /// The state after `events` (the decision's state). Required when `events` is not empty,
    /// and then its `version` must be `expected_version + events.len()`; ignored otherwise.
    pub state: Option<SagaState>,
    pub outbox: Vec<OutgoingMessage>,
    /// Applied in order: `Schedule` upserts `(saga_id, timer.key())`, `Cancel` deletes it.
    pub timers: Vec<TimerChange>,
    /// Key of the timer this input was (deleted before `timers` are applied).
    pub fired_timer: Option<String>,
    /// Id of the handled reply or timer message: a second commit with it is `Duplicate`.
    pub inbox_id: Option<Uuid>,
    /// Recorded when the saga row is inserted (`expected_version == 0`); unique per saga name.
    pub idempotency_key: Option<String>,
    /// Recorded when the saga row is inserted: the W3C trace context of the saga's start.
    pub trace: Option<TraceContext>,
    /// `recorded_at` of the events, `updated_at` (and `created_at` on insert) of the saga row.
    pub now: DateTime<Utc>,
}

impl Commit {
    /// A commit that writes nothing yet: fill in what the decision produced, e.g.
    /// `Commit { inbox_id: Some(id), ..Commit::empty(saga_id, now) }` to only record a reply.
    pub fn empty(saga_id: Uuid, now: DateTime<Utc>) -> Self {
        Commit {
            saga_id,
            expected_version: 0,
            events: Vec::new(),
            state: None,
            outbox: Vec::new(),
            timers: Vec::new(),
            fired_timer: None,
            inbox_id: None,
            idempotency_key: None,
            trace: None,
            now,
        }
    }
}

impl Store {
    /// The saga's snapshot (`sagas.state`), as the last commit left it; rebuilt from the
    /// saga's event log when the snapshot does not parse (`Corrupt` only when the log cannot
    /// be read either).
    pub async fn load(&self, saga_id: Uuid) -> Result<Option<SagaState>, StoreError> {
        let state: Option<String> = sagas::Entity::find_by_id(saga_id)
            .select_only()
            .column(sagas::Column::State)
            .into_tuple()
            .one(&self.db)
            .await?;
        match state {
            Some(state) => Ok(Some(self.snapshot_or_log(saga_id, &state).await?)),
            None => Ok(None),
        }
    }

    /// Snapshots of the sagas that exist among `ids`.
    pub async fn load_many(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, SagaState>, StoreError> {
        let mut states = HashMap::with_capacity(ids.len());
        for chunk in ids.chunks(MAX_PARAMS) {
            let rows: Vec<(Uuid, String)> = sagas::Entity::find()
                .select_only()
                .column(sagas::Column::Id)
                .column(sagas::Column::State)
                .filter(sagas::Column::Id.is_in(chunk.iter().copied()))
                .into_tuple()
                .all(&self.db)
                .await?;
            for (id, state) in rows {
                states.insert(id, self.snapshot_or_log(id, &state).await?);
            }
        }
        Ok(states)
    }

    pub async fn saga_by_idempotency_key(
        &self,
        saga_name: &str,
        key: &str,
    ) -> Result<Option<Uuid>, StoreError> {
        Ok(sagas::Entity::find()
            .select_only()
            .column(sagas::Column::Id)
            .filter(sagas::Column::Name.eq(saga_name))
            .filter(sagas::Column::IdempotencyKey.eq(key))
            .into_tuple()
            .one(&self.db)
            .await?)
    }

    /// The W3C trace context recorded at the start of each traced saga among `ids`.
    pub async fn trace_parents(
        &self,
        ids: &[Uuid],
    ) -> Result<HashMap<Uuid, TraceContext>, StoreError> {
        let mut parents = HashMap::new();
        for chunk in ids.chunks(MAX_PARAMS) {
            let rows: Vec<(Uuid, String, Option<String>)> = sagas::Entity::find()
                .select_only()
                .column(sagas::Column::Id)
                .column(sagas::Column::TraceParent)
                .column(sagas::Column::TraceState)
                .filter(sagas::Column::Id.is_in(chunk.iter().copied()))
                .filter(sagas::Column::TraceParent.is_not_null())
                .into_tuple()
                .all(&self.db)
                .await?;
            parents.extend(
                rows.into_iter()
                    .map(|(id, parent, state)| (id, TraceContext { parent, state })),
            );
        }
        Ok(parents)
    }

    /// Writes every commit in ONE transaction (see [`Commit`]) and returns the ids of the
    /// outbox rows written, in the order of the commits' messages. Statements are batched
    /// across the commits (one multi-row insert per table, a handful in all), so many sagas
    /// cost about as much as one.
    ///
    /// All or nothing: on error nothing is written and [`CommitError::index`] names the
    /// commit at fault, so the caller can retry the others one by one.
    pub async fn commit(&self, commits: &[Commit]) -> Result<Vec<i64>, CommitError> {
        self.commit_marking_sent(commits, &[]).await
    }

    /// [`Store::commit`], marking the outbox rows `sent` (published and confirmed) in the same
    /// transaction: the relay's bookkeeping rides on a transaction that commits anyway.
    pub async fn commit_marking_sent(
        &self,
        commits: &[Commit],
        sent: &[i64],
    ) -> Result<Vec<i64>, CommitError> {
        if commits.is_empty() && sent.is_empty() {
            return Ok(Vec::new());
        }
        let mut plan = commit::Plan::build(commits)?;
        plan.mark_sent(sent, Utc::now());
        if let Some(ids) = self.write_alone(&plan).await? {
            return Ok(ids);
        }
        let w = self.begin_write().await.map_err(CommitError::batch)?;
        match plan.write(&w.txn).await {
            Ok(ids) => {
                w.commit().await.map_err(CommitError::batch)?;
                Ok(ids)
            }
            Err(error) => {
                w.rollback().await;
                Err(error)
            }
        }
    }

    /// [`commit::Plan::write_alone`] under the single writer on SQLite, rolled back there
    /// when it stopped half-way (its transaction is not sea-orm's: nothing else would).
    async fn write_alone(&self, plan: &commit::Plan) -> Result<Option<Vec<i64>>, CommitError> {
        let arrays = self.arrays.as_ref().unwrap_or(&self.writes);
        let Some(mut lock) = self.write_lock().await else {
            return plan.write_alone(&self.writes, arrays, &self.shapes).await;
        };
        lock.in_doubt = true;
        let written = plan.write_alone(&self.writes, arrays, &self.shapes).await;
        if !matches!(written, Ok(Some(_))) {
            self.roll_back_raw().await;
        }
        lock.in_doubt = false;
        written
    }

    /// `snapshot` parsed, or else the state folded from the saga's whole event log.
    pub(super) async fn snapshot_or_log(
        &self,
        saga_id: Uuid,
        snapshot: &str,
    ) -> Result<SagaState, StoreError> {
        let unreadable = match parse_state(saga_id, snapshot) {
            Ok(state) => return Ok(state),
            Err(error) => error,
        };
        let log = saga_events::Entity::find()
            .filter(saga_events::Column::SagaId.eq(saga_id))
            .order_by_asc(saga_events::Column::Seq)
            .all(&self.db)
            .await?;
        match read_model::fold_log(saga_id, &log) {
            Ok(state) => {
                tracing::warn!(%saga_id, snapshot = %unreadable, version = state.version,
                    "the saga's snapshot is unreadable; rebuilt its state from the event log");
                Ok(state)
            }
            Err(log_error) => Err(StoreError::Corrupt(format!(
                "{unreadable}; and its event log cannot be read: {log_error}"
            ))),
        }
    }
}

pub(super) fn parse_state(saga_id: Uuid, json: &str) -> Result<SagaState, StoreError> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("state of saga {saga_id}: {e}")))
}

pub(super) fn parse_event(row: &saga_events::Model) -> Result<SagaEvent, StoreError> {
    serde_json::from_str(&row.payload)
        .map_err(|e| StoreError::Corrupt(format!("event {} of saga {}: {e}", row.seq, row.saga_id)))
}
