//! The group-commit write path: many commits, one transaction, a handful of statements.
//!
//! Every insert that can collide uses `ON CONFLICT ... DO NOTHING ... RETURNING` and compares
//! what came back with what was sent. A collision therefore never raises an error inside the
//! transaction (which on PostgreSQL would abort it and hide which row collided): the rows
//! missing from `RETURNING` name the commit at fault. Rows are sorted by key inside each
//! statement so concurrent transactions lock them in the same order.

use std::collections::{BTreeMap, HashMap, HashSet};

use chrono::{DateTime, Utc};
use saga_engine::{SagaState, TimerChange};
use sea_orm::sea_query::{Alias, Expr, ExprTrait, OnConflict};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter, QuerySelect,
};
use uuid::Uuid;

use super::entity::{inbox, outbox, saga_events, sagas, timers};
use super::read_model::{SAGA_COLUMNS, saga_active_model};
use super::{Commit, CommitError, MAX_OR_TERMS, MAX_PARAMS, StoreError};

/// Number of columns of each table, to size the chunks of multi-row statements.
const EVENT_COLUMNS: usize = 5;
const OUTBOX_COLUMNS: usize = 4;
const INBOX_COLUMNS: usize = 3;
const TIMER_COLUMNS: usize = 4;

/// The rows a batch of commits writes, checked before the transaction begins.
pub(super) struct Plan {
    inbox: Vec<(usize, Uuid, inbox::ActiveModel)>,
    events: Vec<((Uuid, i64), saga_events::ActiveModel)>,
    /// Which commit wrote each `(saga_id, seq)`.
    event_owner: HashMap<(Uuid, i64), usize>,
    new_sagas: Vec<SagaWrite>,
    /// Existing sagas, by the number of events this batch adds to each.
    updated_sagas: BTreeMap<u64, Vec<SagaWrite>>,
    outbox: Vec<outbox::ActiveModel>,
    /// The net effect of the batch on each timer: `Some` upserts, `None` deletes.
    timers: BTreeMap<TimerKey, Option<ScheduledTimer>>,
}

/// `(saga_id, timer_key)`.
type TimerKey = (Uuid, String);
/// `(due_at, timer JSON)`.
type ScheduledTimer = (DateTime<Utc>, String);

/// The saga row a batch leaves behind: the state after its last commit for that saga.
struct SagaWrite {
    /// The first commit of the batch for this saga (the one blamed on failure).
    index: usize,
    id: Uuid,
    name: String,
    idempotency_key: Option<String>,
    model: sagas::ActiveModel,
}

fn json(index: usize, what: &str, value: &impl serde::Serialize) -> Result<String, CommitError> {
    serde_json::to_string(value).map_err(|e| {
        CommitError::at(
            index,
            StoreError::Corrupt(format!("cannot serialise {what}: {e}")),
        )
    })
}

fn corrupt(index: usize, why: String) -> CommitError {
    CommitError::at(index, StoreError::Corrupt(why))
}

impl Plan {
    pub(super) fn build(commits: &[Commit]) -> Result<Plan, CommitError> {
        let mut plan = Plan {
            inbox: Vec::new(),
            events: Vec::new(),
            event_owner: HashMap::new(),
            new_sagas: Vec::new(),
            updated_sagas: BTreeMap::new(),
            outbox: Vec::new(),
            timers: BTreeMap::new(),
        };
        let mut inbox_ids = HashSet::new();
        let mut idempotency_keys = HashSet::new();
        // Per saga with events: (first commit, version before the batch, last state, now).
        let mut sagas: BTreeMap<Uuid, (usize, u64, &SagaState, DateTime<Utc>)> = BTreeMap::new();
        for (index, c) in commits.iter().enumerate() {
            if let Some(id) = c.inbox_id {
                if !inbox_ids.insert(id) {
                    return Err(CommitError::at(index, StoreError::Duplicate));
                }
                plan.inbox.push((
                    index,
                    id,
                    inbox::ActiveModel {
                        message_id: Set(id),
                        saga_id: Set(c.saga_id),
                        received_at: Set(c.now),
                    },
                ));
            }

            if !c.events.is_empty() {
                let Some(state) = &c.state else {
                    return Err(corrupt(index, "a commit with events has no state".into()));
                };
                if state.saga_id != c.saga_id {
                    return Err(corrupt(
                        index,
                        format!(
                            "state of saga {} in a commit for {}",
                            state.saga_id, c.saga_id
                        ),
                    ));
                }
                if state.version != c.expected_version + c.events.len() as u64 {
                    return Err(corrupt(
                        index,
                        format!(
                            "state version {} after {} events on version {}",
                            state.version,
                            c.events.len(),
                            c.expected_version
                        ),
                    ));
                }
                if let Some(key) = c
                    .idempotency_key
                    .as_deref()
                    .filter(|_| c.expected_version == 0)
                    && !idempotency_keys.insert((state.saga_name.as_str(), key))
                {
                    // Two starts with one key in this batch: the later one is the duplicate.
                    return Err(CommitError::at(index, StoreError::Duplicate));
                }
                match sagas.get_mut(&c.saga_id) {
                    // A later decision on the same saga in this batch must follow on from
                    // the earlier one.
                    Some(entry) if entry.2.version != c.expected_version => {
                        return Err(CommitError::at(index, StoreError::Conflict));
                    }
                    Some(entry) => {
                        entry.2 = state;
                        entry.3 = c.now;
                    }
                    None => {
                        sagas.insert(c.saga_id, (index, c.expected_version, state, c.now));
                    }
                }
                for (i, event) in c.events.iter().enumerate() {
                    let seq = (c.expected_version + 1 + i as u64) as i64;
                    plan.event_owner.insert((c.saga_id, seq), index);
                    plan.events.push((
                        (c.saga_id, seq),
                        saga_events::ActiveModel {
                            saga_id: Set(c.saga_id),
                            seq: Set(seq),
                            event_type: Set(event.kind().to_owned()),
                            payload: Set(json(index, "an event", event)?),
                            recorded_at: Set(c.now),
                        },
                    ));
                }
            }

            for message in &c.outbox {
                plan.outbox.push(outbox::ActiveModel {
                    id: NotSet,
                    saga_id: Set(c.saga_id),
                    message: Set(json(index, "an outbox message", message)?),
                    created_at: Set(c.now),
                    sent_at: Set(None),
                });
            }

            if let Some(key) = &c.fired_timer {
                plan.timers.insert((c.saga_id, key.clone()), None);
            }
            for change in &c.timers {
                match change {
                    TimerChange::Schedule { timer, due_at } => {
                        let value = json(index, "a timer", timer)?;
                        plan.timers
                            .insert((c.saga_id, timer.key()), Some((*due_at, value)));
                    }
                    TimerChange::Cancel { timer } => {
                        plan.timers.insert((c.saga_id, timer.key()), None);
                    }
                }
            }
        }

        for (saga_id, (index, before, state, now)) in sagas {
            let commit = &commits[index];
            let write = SagaWrite {
                index,
                id: saga_id,
                name: state.saga_name.clone(),
                idempotency_key: commit.idempotency_key.clone(),
                model: saga_active_model(
                    saga_id,
                    state,
                    commit.idempotency_key.clone().filter(|_| before == 0),
                    commit.trace_parent.clone().filter(|_| before == 0),
                    commit.now,
                    now,
                )
                .map_err(|e| corrupt(index, e))?,
            };
            if before == 0 {
                plan.new_sagas.push(write);
            } else {
                plan.updated_sagas
                    .entry(state.version - before)
                    .or_default()
                    .push(write);
            }
        }
        plan.inbox.sort_by_key(|(_, id, _)| *id);
        plan.events.sort_by_key(|(key, _)| *key);
        Ok(plan)
    }

    /// Runs the statements; the first commit found at fault aborts the batch. Returns the ids
    /// of the outbox rows, in the order of the commits' messages.
    pub(super) async fn write(self, txn: &impl ConnectionTrait) -> Result<Vec<i64>, CommitError> {
        let db = CommitError::batch;

        // 1. Inbox: a message handled before makes its commit a duplicate.
        let rows_per = MAX_PARAMS / INBOX_COLUMNS;
        for chunk in self.inbox.chunks(rows_per) {
            let inserted: HashSet<Uuid> =
                inbox::Entity::insert_many(chunk.iter().map(|(_, _, m)| m.clone()))
                    .on_conflict(
                        OnConflict::column(inbox::Column::MessageId)
                            .do_nothing()
                            .to_owned(),
                    )
                    .exec_with_returning_keys(txn)
                    .await
                    .map_err(db)?
                    .into_iter()
                    .collect();
            if let Some((index, _, _)) = chunk
                .iter()
                .filter(|(_, id, _)| !inserted.contains(id))
                .min_by_key(|(index, _, _)| *index)
            {
                return Err(CommitError::at(*index, StoreError::Duplicate));
            }
        }

        // 2. Events: a taken (saga_id, seq) means another writer advanced the saga.
        for chunk in self.events.chunks(MAX_PARAMS / EVENT_COLUMNS) {
            let inserted: HashSet<(Uuid, i64)> =
                saga_events::Entity::insert_many(chunk.iter().map(|(_, m)| m.clone()))
                    .on_conflict(
                        OnConflict::columns([
                            saga_events::Column::SagaId,
                            saga_events::Column::Seq,
                        ])
                        .do_nothing()
                        .to_owned(),
                    )
                    .exec_with_returning_keys(txn)
                    .await
                    .map_err(db)?
                    .into_iter()
                    .collect();
            if let Some(index) = chunk
                .iter()
                .filter(|(key, _)| !inserted.contains(key))
                .map(|(key, _)| self.event_owner[key])
                .min()
            {
                return Err(CommitError::at(index, StoreError::Conflict));
            }
        }

        // 3. New sagas. Their first event went in, so a collision is the idempotency key.
        for chunk in self.new_sagas.chunks(MAX_PARAMS / SAGA_COLUMNS) {
            let inserted: HashSet<Uuid> =
                sagas::Entity::insert_many(chunk.iter().map(|w| w.model.clone()))
                    .on_conflict(OnConflict::new().do_nothing().to_owned())
                    .exec_with_returning_keys(txn)
                    .await
                    .map_err(db)?
                    .into_iter()
                    .collect();
            if let Some(write) = chunk
                .iter()
                .filter(|w| !inserted.contains(&w.id))
                .min_by_key(|w| w.index)
            {
                let error = duplicate_or_conflict(txn, write).await.map_err(db)?;
                return Err(CommitError::at(write.index, error));
            }
        }

        // 4. Existing sagas: compare-and-set on the version, in one upsert per distinct
        // number of new events (`sagas.version + n = excluded.version`).
        for (added, writes) in &self.updated_sagas {
            for chunk in writes.chunks(MAX_PARAMS / SAGA_COLUMNS) {
                let on_version = Expr::col((sagas::Entity, sagas::Column::Version))
                    .add(*added as i64)
                    .eq(Expr::col((Alias::new("excluded"), sagas::Column::Version)));
                let updated: HashSet<Uuid> =
                    sagas::Entity::insert_many(chunk.iter().map(|w| w.model.clone()))
                        .on_conflict(
                            OnConflict::column(sagas::Column::Id)
                                .update_columns(super::read_model::STATE_COLUMNS)
                                .action_and_where(on_version)
                                .to_owned(),
                        )
                        .exec_with_returning_keys(txn)
                        .await
                        .map_err(db)?
                        .into_iter()
                        .collect();
                if let Some(write) = chunk
                    .iter()
                    .filter(|w| !updated.contains(&w.id))
                    .min_by_key(|w| w.index)
                {
                    return Err(CommitError::at(write.index, StoreError::Conflict));
                }
            }
        }

        // 5. Outbox. A multi-row insert takes its ids in the order of its rows (one sequence,
        // or SQLite's next rowid, per row as inserted), whatever order RETURNING lists them in.
        let mut ids = Vec::with_capacity(self.outbox.len());
        for chunk in self.outbox.chunks(MAX_PARAMS / OUTBOX_COLUMNS) {
            let mut keys: Vec<i64> = outbox::Entity::insert_many(chunk.to_vec())
                .exec_with_returning_keys(txn)
                .await
                .map_err(db)?;
            if keys.len() != chunk.len() {
                return Err(CommitError::batch(StoreError::Corrupt(format!(
                    "{} outbox rows inserted, {} ids returned",
                    chunk.len(),
                    keys.len()
                ))));
            }
            keys.sort_unstable();
            ids.extend(keys);
        }

        // 6. Timers: upsert the scheduled, delete the cancelled and the fired.
        let (scheduled, deleted): (Vec<_>, Vec<_>) =
            self.timers.into_iter().partition(|(_, v)| v.is_some());
        let scheduled: Vec<timers::ActiveModel> = scheduled
            .into_iter()
            .filter_map(|((saga_id, key), value)| {
                let (due_at, timer) = value?;
                Some(timers::ActiveModel {
                    saga_id: Set(saga_id),
                    timer_key: Set(key),
                    due_at: Set(due_at),
                    timer: Set(timer),
                })
            })
            .collect();
        for chunk in scheduled.chunks(MAX_PARAMS / TIMER_COLUMNS) {
            timers::Entity::insert_many(chunk.to_vec())
                .on_conflict(
                    OnConflict::columns([timers::Column::SagaId, timers::Column::TimerKey])
                        .update_columns([timers::Column::DueAt, timers::Column::Timer])
                        .to_owned(),
                )
                .exec_without_returning(txn)
                .await
                .map_err(db)?;
        }
        for chunk in deleted.chunks(MAX_OR_TERMS) {
            let mut any = Condition::any();
            for ((saga_id, key), _) in chunk {
                any = any.add(
                    Condition::all()
                        .add(timers::Column::SagaId.eq(*saga_id))
                        .add(timers::Column::TimerKey.eq(key.as_str())),
                );
            }
            timers::Entity::delete_many()
                .filter(any)
                .exec(txn)
                .await
                .map_err(db)?;
        }
        Ok(ids)
    }
}

/// Why a new saga's row was not inserted: its idempotency key is taken by another saga
/// (`Duplicate`), or its own id exists already (`Conflict`).
async fn duplicate_or_conflict(
    txn: &impl ConnectionTrait,
    write: &SagaWrite,
) -> Result<StoreError, sea_orm::DbErr> {
    if let Some(key) = &write.idempotency_key {
        let holder: Option<Uuid> = sagas::Entity::find()
            .select_only()
            .column(sagas::Column::Id)
            .filter(sagas::Column::Name.eq(write.name.as_str()))
            .filter(sagas::Column::IdempotencyKey.eq(key.as_str()))
            .into_tuple()
            .one(txn)
            .await?;
        if holder.is_some_and(|id| id != write.id) {
            return Ok(StoreError::Duplicate);
        }
    }
    Ok(StoreError::Conflict)
}
