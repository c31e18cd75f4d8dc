//! The group-commit write path: many commits, one transaction, a handful of statements, all
//! sent to the database in one call with the transaction's begin and end.
//!
//! Every insert that can collide uses `ON CONFLICT ... DO NOTHING ... RETURNING` and compares
//! what came back with what was sent. A collision therefore never raises an error inside the
//! transaction (which on PostgreSQL would abort it and hide which row collided): the rows
//! missing from `RETURNING` name the commit at fault. In the one call only the counts are
//! checked, inside it, and a wrong count stops it before anything commits; the batch then
//! runs again in a transaction of its own, whose checks name the commit at fault. Rows are
//! sorted by key inside each statement so concurrent transactions lock them in the same order.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use chrono::{DateTime, Utc};
use hashlink::LruCache;
use saga_engine::{SagaState, TimerChange};
use sea_orm::sea_query::{
    Alias, Asterisk, CommonTableExpression, DeleteStatement, Expr, ExprTrait, InsertStatement,
    OnConflict, Query, SelectStatement, SubQueryStatement, UnionType, UpdateStatement, WithClause,
};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DbBackend, DbErr, EntityTrait,
    QueryFilter, QueryResult, QuerySelect, QueryTrait, RuntimeErr, Statement, TryGetable,
};
use uuid::Uuid;

use super::entity::{inbox, outbox, saga_events, sagas, timers};
use super::read_model::{SAGA_COLUMNS, saga_active_model};
use super::{Commit, CommitError, MAX_OR_TERMS, MAX_PARAMS, StoreError};

pub(super) mod postgres;

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
    /// Outbox rows published, to mark sent at `sent_at`.
    sent: Vec<i64>,
    sent_at: DateTime<Utc>,
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
            sent: Vec::new(),
            sent_at: DateTime::UNIX_EPOCH,
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
                    commit.trace.clone().filter(|_| before == 0),
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

    /// Adds the marking of outbox rows `ids` as sent to the batch.
    pub(super) fn mark_sent(&mut self, ids: &[i64], now: DateTime<Utc>) {
        self.sent.extend_from_slice(ids);
        self.sent_at = now;
    }

    /// Runs the statements; the first commit found at fault aborts the batch. Returns the ids
    /// of the outbox rows, in the order of the commits' messages.
    ///
    /// The statements go to the database in one call, not one at a time: a hand-off (SQLite's
    /// thread) or a round trip (PostgreSQL) per statement was most of a lone commit's time.
    /// On SQLite the call is a string of statements, which sqlx runs in order, binding each its
    /// share of the values; on PostgreSQL, whose prepared statements are one statement each,
    /// it is one statement with the others as data-modifying `WITH` queries, as many calls as
    /// its limit of bound values needs. Their rows start with the statement's position, to
    /// sort them back to the statement they check.
    pub(super) async fn write(self, txn: &impl ConnectionTrait) -> Result<Vec<i64>, CommitError> {
        let backend = txn.get_database_backend();
        let mut statements = self.statements();
        let mut ids = Vec::with_capacity(self.outbox.len());
        let mut first = 0;
        while first < statements.len() {
            let group = match backend {
                DbBackend::Sqlite => statements.len() - first,
                _ => group_len(&statements[first..], POSTGRES_MAX_PARAMS),
            };
            let group_statements = &mut statements[first..first + group];
            let mut rows = run_together(txn, backend, first, group_statements, false)
                .await
                .map_err(CommitError::batch)?;
            for (planned, rows) in group_statements.iter().zip(&mut rows) {
                self.check(txn, &planned.check, std::mem::take(rows), &mut ids)
                    .await?;
            }
            first += group;
        }
        Ok(ids)
    }

    /// The batch and its transaction in ONE call, so without the hand-offs or round trips
    /// of `BEGIN` and `COMMIT`: on PostgreSQL one statement outside any transaction (it runs
    /// a statement atomically, and commits it with its fsync before answering); on SQLite
    /// `BEGIN IMMEDIATE`, the statements and `COMMIT` as one string. The checks run inside:
    /// each statement must return as many rows as it was given, else the statement fails
    /// (PostgreSQL: the whole of it, nothing written; SQLite: before `COMMIT`, the caller
    /// rolls back). `None` when a check failed or the batch needs more than one PostgreSQL
    /// statement: then [`Plan::write`], in a transaction, finds the commit at fault.
    ///
    /// On PostgreSQL a batch of a shape not seen lately goes as [`postgres`]'s statement of
    /// constant text, its rows bound as arrays, on `arrays`; one whose shape came before, as
    /// its own statement, prepared, on `db` (see [`Shapes`]).
    pub(super) async fn write_alone(
        &self,
        db: &DatabaseConnection,
        arrays: &DatabaseConnection,
        shapes: &Shapes,
    ) -> Result<Option<Vec<i64>>, CommitError> {
        let backend = db.get_database_backend();
        if self.is_empty() {
            // Commits that write nothing (an input ignored before it had an id).
            return Ok(Some(Vec::new()));
        }
        if backend == DbBackend::Postgres && !shapes.seen_before(&self.shape()) {
            return match self
                .write_postgres(arrays.get_postgres_connection_pool())
                .await
            {
                Ok(ids) => Ok(Some(ids)),
                Err(error) => failed_check_or(error),
            };
        }
        let mut statements = self.statements();
        if backend == DbBackend::Postgres
            && group_len(&statements, POSTGRES_MAX_PARAMS) < statements.len()
        {
            return Ok(None);
        }
        let rows = match run_together(db, backend, 0, &mut statements, true).await {
            Ok(rows) => rows,
            Err(error) => return failed_check_or(error),
        };
        let mut ids = Vec::with_capacity(self.outbox.len());
        for (planned, rows) in statements.iter().zip(rows) {
            // Every count matched, so every check passes: this only collects the outbox ids.
            self.check(db, &planned.check, rows, &mut ids).await?;
        }
        Ok(Some(ids))
    }

    /// Whether the batch writes no row at all.
    fn is_empty(&self) -> bool {
        self.shape().iter().all(|&rows| rows == 0)
    }

    /// How many rows of each kind the batch writes: what its statements' text depends on.
    fn shape(&self) -> Vec<usize> {
        let mut shape = vec![
            self.inbox.len(),
            self.events.len(),
            self.new_sagas.len(),
            self.outbox.len(),
            self.timers.values().filter(|v| v.is_some()).count(),
            self.timers.values().filter(|v| v.is_none()).count(),
            self.sent.len(),
        ];
        for (added, writes) in &self.updated_sagas {
            shape.extend([*added as usize, writes.len()]);
        }
        shape
    }

    /// Every statement of the batch, in order, each with what its rows are checked against.
    /// Those that return rows return `(position, a uuid, an integer)`, NULL where unused.
    fn statements(&self) -> Vec<Planned> {
        let mut statements = Vec::new();
        let mut returning = |mut insert: InsertStatement,
                             check: Check,
                             params: usize,
                             uuid: Option<Expr>,
                             integer: Option<Expr>| {
            let position = Expr::cust(format!("CAST({} AS BIGINT)", statements.len()));
            let uuid = uuid.unwrap_or_else(|| Expr::cust("CAST(NULL AS uuid)"));
            let integer = integer.unwrap_or_else(|| Expr::cust("CAST(NULL AS BIGINT)"));
            insert.returning(Query::returning().exprs([position, uuid, integer]));
            statements.push(Planned {
                sql: Sql::Insert(insert),
                check,
                params,
            });
        };

        // 1. Inbox: a message handled before makes its commit a duplicate.
        for range in chunks(self.inbox.len(), MAX_PARAMS / INBOX_COLUMNS) {
            let insert = inbox::Entity::insert_many(
                self.inbox[range.clone()].iter().map(|(_, _, m)| m.clone()),
            )
            .on_conflict(
                OnConflict::column(inbox::Column::MessageId)
                    .do_nothing()
                    .to_owned(),
            )
            .into_query();
            let params = range.len() * INBOX_COLUMNS;
            let key = Expr::col(inbox::Column::MessageId);
            returning(insert, Check::Inbox(range), params, Some(key), None);
        }

        // 2. Events: a taken (saga_id, seq) means another writer advanced the saga.
        for range in chunks(self.events.len(), MAX_PARAMS / EVENT_COLUMNS) {
            let insert = saga_events::Entity::insert_many(
                self.events[range.clone()].iter().map(|(_, m)| m.clone()),
            )
            .on_conflict(
                OnConflict::columns([saga_events::Column::SagaId, saga_events::Column::Seq])
                    .do_nothing()
                    .to_owned(),
            )
            .into_query();
            let params = range.len() * EVENT_COLUMNS;
            let (saga_id, seq) = (
                Expr::col(saga_events::Column::SagaId),
                Expr::col(saga_events::Column::Seq),
            );
            returning(
                insert,
                Check::Events(range),
                params,
                Some(saga_id),
                Some(seq),
            );
        }

        // 3. New sagas. Their first event went in, so a collision is the idempotency key.
        for range in chunks(self.new_sagas.len(), MAX_PARAMS / SAGA_COLUMNS) {
            let insert = sagas::Entity::insert_many(
                self.new_sagas[range.clone()]
                    .iter()
                    .map(|w| w.model.clone()),
            )
            .on_conflict(OnConflict::new().do_nothing().to_owned())
            .into_query();
            let params = range.len() * SAGA_COLUMNS;
            let id = Expr::col(sagas::Column::Id);
            returning(insert, Check::NewSagas(range), params, Some(id), None);
        }

        // 4. Existing sagas: compare-and-set on the version, in one upsert per distinct
        // number of new events (`sagas.version + n = excluded.version`).
        for (added, writes) in &self.updated_sagas {
            for range in chunks(writes.len(), MAX_PARAMS / SAGA_COLUMNS) {
                let on_version = Expr::col((sagas::Entity, sagas::Column::Version))
                    .add(*added as i64)
                    .eq(Expr::col((Alias::new("excluded"), sagas::Column::Version)));
                let insert = sagas::Entity::insert_many(
                    writes[range.clone()].iter().map(|w| w.model.clone()),
                )
                .on_conflict(
                    OnConflict::column(sagas::Column::Id)
                        .update_columns(super::read_model::STATE_COLUMNS)
                        .action_and_where(on_version)
                        .to_owned(),
                )
                .into_query();
                let params = range.len() * SAGA_COLUMNS + 1;
                let id = Expr::col(sagas::Column::Id);
                let check = Check::UpdatedSagas(*added, range);
                returning(insert, check, params, Some(id), None);
            }
        }

        // 5. Outbox. A multi-row insert takes its ids in the order of its rows (one sequence,
        // or SQLite's next rowid, per row as inserted), whatever order RETURNING lists them in.
        for range in chunks(self.outbox.len(), MAX_PARAMS / OUTBOX_COLUMNS) {
            let insert =
                outbox::Entity::insert_many(self.outbox[range.clone()].to_vec()).into_query();
            let params = range.len() * OUTBOX_COLUMNS;
            let id = Expr::col(outbox::Column::Id);
            returning(insert, Check::Outbox(range), params, None, Some(id));
        }

        // 6. Timers: upsert the scheduled, delete the cancelled and the fired.
        let scheduled: Vec<timers::ActiveModel> = self
            .timers
            .iter()
            .filter_map(|((saga_id, key), value)| {
                let (due_at, timer) = value.clone()?;
                Some(timers::ActiveModel {
                    saga_id: Set(*saga_id),
                    timer_key: Set(key.clone()),
                    due_at: Set(due_at),
                    timer: Set(timer),
                })
            })
            .collect();
        for chunk in scheduled.chunks(MAX_PARAMS / TIMER_COLUMNS) {
            let upsert = timers::Entity::insert_many(chunk.to_vec())
                .on_conflict(
                    OnConflict::columns([timers::Column::SagaId, timers::Column::TimerKey])
                        .update_columns([timers::Column::DueAt, timers::Column::Timer])
                        .to_owned(),
                )
                .into_query();
            statements.push(Planned {
                sql: Sql::Insert(upsert),
                check: Check::Nothing,
                params: chunk.len() * TIMER_COLUMNS,
            });
        }
        let deleted: Vec<&TimerKey> = self
            .timers
            .iter()
            .filter(|(_, value)| value.is_none())
            .map(|(key, _)| key)
            .collect();
        for chunk in deleted.chunks(MAX_OR_TERMS) {
            let mut any = Condition::any();
            for (saga_id, key) in chunk {
                any = any.add(
                    Condition::all()
                        .add(timers::Column::SagaId.eq(*saga_id))
                        .add(timers::Column::TimerKey.eq(key.as_str())),
                );
            }
            statements.push(Planned {
                sql: Sql::Delete(timers::Entity::delete_many().filter(any).into_query()),
                check: Check::Nothing,
                params: chunk.len() * 2,
            });
        }

        // 7. Outbox rows the relay published, marked sent.
        for chunk in self.sent.chunks(MAX_PARAMS) {
            let update = outbox::Entity::update_many()
                .col_expr(outbox::Column::SentAt, Expr::val(self.sent_at))
                .filter(outbox::Column::Id.is_in(chunk.iter().copied()))
                .filter(outbox::Column::SentAt.is_null())
                .into_query();
            statements.push(Planned {
                sql: Sql::Update(update),
                check: Check::Nothing,
                params: chunk.len() + 1,
            });
        }
        statements
    }

    /// Checks what one statement returned; fills `ids` with the outbox's.
    async fn check(
        &self,
        txn: &impl ConnectionTrait,
        check: &Check,
        rows: Vec<QueryResult>,
        ids: &mut Vec<i64>,
    ) -> Result<(), CommitError> {
        let db = CommitError::batch;
        match check {
            Check::Inbox(range) => {
                let inserted: HashSet<Uuid> = keys(&rows, 1).map_err(db)?;
                if let Some((index, _, _)) = self.inbox[range.clone()]
                    .iter()
                    .filter(|(_, id, _)| !inserted.contains(id))
                    .min_by_key(|(index, _, _)| *index)
                {
                    return Err(CommitError::at(*index, StoreError::Duplicate));
                }
            }
            Check::Events(range) => {
                let inserted: HashSet<(Uuid, i64)> = rows
                    .iter()
                    .map(|row| Ok((row.try_get_by_index(1)?, row.try_get_by_index(2)?)))
                    .collect::<Result<_, DbErr>>()
                    .map_err(db)?;
                if let Some(index) = self.events[range.clone()]
                    .iter()
                    .filter(|(key, _)| !inserted.contains(key))
                    .map(|(key, _)| self.event_owner[key])
                    .min()
                {
                    return Err(CommitError::at(index, StoreError::Conflict));
                }
            }
            Check::NewSagas(range) => {
                let inserted: HashSet<Uuid> = keys(&rows, 1).map_err(db)?;
                if let Some(write) = self.new_sagas[range.clone()]
                    .iter()
                    .filter(|w| !inserted.contains(&w.id))
                    .min_by_key(|w| w.index)
                {
                    let error = duplicate_or_conflict(txn, write).await.map_err(db)?;
                    return Err(CommitError::at(write.index, error));
                }
            }
            Check::UpdatedSagas(added, range) => {
                let updated: HashSet<Uuid> = keys(&rows, 1).map_err(db)?;
                if let Some(write) = self.updated_sagas[added][range.clone()]
                    .iter()
                    .filter(|w| !updated.contains(&w.id))
                    .min_by_key(|w| w.index)
                {
                    return Err(CommitError::at(write.index, StoreError::Conflict));
                }
            }
            Check::Outbox(range) => {
                let mut keys: Vec<i64> = keys(&rows, 2).map_err(db)?;
                if keys.len() != range.len() {
                    return Err(CommitError::batch(StoreError::Corrupt(format!(
                        "{} outbox rows inserted, {} ids returned",
                        range.len(),
                        keys.len()
                    ))));
                }
                keys.sort_unstable();
                ids.extend(keys);
            }
            Check::Nothing => {}
        }
        Ok(())
    }
}

/// Bound values in one PostgreSQL statement at most (its protocol counts them in 16 bits).
const POSTGRES_MAX_PARAMS: usize = u16::MAX as usize;

/// A statement of a batch, not yet rendered for a backend.
struct Planned {
    sql: Sql,
    check: Check,
    /// How many values it binds.
    params: usize,
}

enum Sql {
    Insert(InsertStatement),
    Update(UpdateStatement),
    Delete(DeleteStatement),
}

impl Planned {
    fn returns_rows(&self) -> bool {
        !matches!(self.check, Check::Nothing)
    }
}

/// What the rows a statement returns are checked against: ranges index the plan's rows.
enum Check {
    Inbox(Range<usize>),
    Events(Range<usize>),
    NewSagas(Range<usize>),
    /// The number of events added, and the range of those sagas.
    UpdatedSagas(u64, Range<usize>),
    Outbox(Range<usize>),
    Nothing,
}

impl Check {
    /// How many rows the statement returns when this check passes.
    fn rows(&self) -> Option<usize> {
        match self {
            Check::Inbox(range)
            | Check::Events(range)
            | Check::NewSagas(range)
            | Check::UpdatedSagas(_, range)
            | Check::Outbox(range) => Some(range.len()),
            Check::Nothing => None,
        }
    }
}

/// A temporary table (the writer connection's own) whose rows can only fail to insert: the
/// checks of a SQLite commit in one call insert into it when a count is wrong.
const SQLITE_CHECKS: &str = "saga_commit_checks";
const SQLITE_CHECKS_TABLE: &str = "CREATE TEMP TABLE IF NOT EXISTS saga_commit_checks \
    (ok INTEGER NOT NULL CONSTRAINT saga_commit_check_failed CHECK (ok));\n";

/// A check of [`run_together`] with `checked` failed: PostgreSQL's `division_by_zero`, or
/// SQLite's constraint on its table of checks.
fn is_a_failed_check(error: &DbErr) -> bool {
    let database_error = match error {
        DbErr::Query(RuntimeErr::SqlxError(e)) | DbErr::Exec(RuntimeErr::SqlxError(e)) => {
            e.as_database_error()
        }
        _ => None,
    };
    database_error.is_some_and(|e| {
        e.code().as_deref() == Some("22012") || e.message().contains("saga_commit_check_failed")
    })
}

/// `None` (find the commit at fault) when `error` is a failed check, else the error.
fn failed_check_or(error: DbErr) -> Result<Option<Vec<i64>>, CommitError> {
    if is_a_failed_check(&error) {
        tracing::debug!("a check failed in the one-statement commit: finding the commit at fault");
        Ok(None)
    } else {
        Err(CommitError::batch(error))
    }
}

/// `0..len` in ranges of at most `size`.
fn chunks(len: usize, size: usize) -> impl Iterator<Item = Range<usize>> {
    (0..len)
        .step_by(size)
        .map(move |start| start..(start + size).min(len))
}

/// The shapes of the one-call commits sent to PostgreSQL lately, to choose how each goes.
///
/// A batch's own statement has a text fixed by its shape (how many rows of each kind). Under
/// load nearly every batch has a shape of its own: as its own text, the server would parse,
/// analyse and plan a statement the size of the batch every time (2.0 ms of a 19-commit
/// batch's 3.5), so such a batch goes as the one statement of constant text, its rows bound
/// as arrays. A shape that comes back, such as a lone commit's when sagas come one at a time,
/// goes as its own statement, prepared: sqlx keeps the statement and PostgreSQL its plan, so
/// later ones are neither parsed nor planned again, where the constant text is planned for
/// each batch (0.2 ms, and it goes unnamed: see [`postgres`]).
pub(super) struct Shapes(std::sync::Mutex<LruCache<Vec<usize>, ()>>);

/// As many shapes as sqlx keeps statements per connection by default.
const SHAPES: usize = 100;

impl Default for Shapes {
    fn default() -> Self {
        Shapes(std::sync::Mutex::new(LruCache::new(SHAPES)))
    }
}

impl Shapes {
    /// Whether a batch of this shape came lately; it is remembered either way.
    fn seen_before(&self, shape: &[usize]) -> bool {
        let mut seen = self
            .0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        seen.insert(shape.to_vec(), ()).is_some()
    }
}

/// How many of `statements`, from the first, bind at most `max` values together (at least
/// one: each binds fewer alone).
fn group_len(statements: &[Planned], max: usize) -> usize {
    let mut params = 0;
    statements
        .iter()
        .take_while(|planned| {
            params += planned.params;
            params <= max
        })
        .count()
        .max(1)
}

/// Column `index` of every row.
fn keys<T: TryGetable, C: FromIterator<T>>(rows: &[QueryResult], index: usize) -> Result<C, DbErr> {
    rows.iter().map(|row| row.try_get_by_index(index)).collect()
}

/// Runs `statements`, the ones from position `first` on, in one call, and returns the rows
/// of each.
///
/// With `checked`, the call fails (see [`is_a_failed_check`]) unless every statement that
/// returns rows returns as many as it was given: on PostgreSQL the statement, writing
/// nothing; on SQLite the string, which then begins a transaction and commits it at its end.
///
async fn run_together(
    txn: &impl ConnectionTrait,
    backend: DbBackend,
    first: usize,
    statements: &mut [Planned],
    checked: bool,
) -> Result<Vec<Vec<QueryResult>>, DbErr> {
    let statement = match backend {
        DbBackend::Sqlite => {
            let mut sql = String::new();
            let mut values = Vec::new();
            if checked {
                sql.push_str(SQLITE_CHECKS_TABLE);
                sql.push_str("BEGIN IMMEDIATE;\n");
            }
            for planned in statements.iter() {
                let built = match &planned.sql {
                    Sql::Insert(s) => backend.build(s),
                    Sql::Update(s) => backend.build(s),
                    Sql::Delete(s) => backend.build(s),
                };
                sql.push_str(&built.sql);
                sql.push_str(";\n");
                values.extend(built.values.into_iter().flat_map(|v| v.0));
                if let Some(expected) = planned.check.rows().filter(|_| checked) {
                    // changes(): the rows the statement just before inserted or updated.
                    sql.push_str(&format!(
                        "INSERT INTO temp.{SQLITE_CHECKS} (ok) SELECT 0 WHERE changes() <> {expected};\n"
                    ));
                }
            }
            if checked {
                sql.push_str("COMMIT;\n");
            }
            Statement::from_sql_and_values(backend, sql, values)
        }
        _ => {
            let mut with = WithClause::new();
            let mut select: Option<SelectStatement> = None;
            let mut counts = Vec::new();
            for (i, planned) in statements.iter_mut().enumerate() {
                let name = Alias::new(format!("s{}", first + i));
                if let Some(expected) = planned.check.rows().filter(|_| checked) {
                    counts.push(format!(
                        "(SELECT count(*) FROM s{}) = {expected}",
                        first + i
                    ));
                }
                let sql = std::mem::replace(&mut planned.sql, Sql::Delete(Query::delete()));
                let query: SubQueryStatement = match sql {
                    Sql::Insert(s) => s.into(),
                    Sql::Update(s) => s.into(),
                    Sql::Delete(s) => s.into(),
                };
                with.cte(
                    CommonTableExpression::new()
                        .table_name(name.clone())
                        .query(query)
                        .to_owned(),
                );
                if planned.returns_rows() {
                    let rows = Query::select().column(Asterisk).from(name).to_owned();
                    match &mut select {
                        Some(select) => {
                            select.union(UnionType::All, rows);
                        }
                        None => select = Some(rows),
                    }
                }
            }
            if !counts.is_empty() {
                // Not foldable into a constant: the planner cannot raise it before the inserts
                // run. Returns no row when every count matches.
                let guard = Query::select()
                    .exprs([
                        Expr::cust("CAST(-1 AS BIGINT)"),
                        Expr::cust("CAST(NULL AS uuid)"),
                        Expr::cust("CAST(NULL AS BIGINT)"),
                    ])
                    .and_where(Expr::cust(format!(
                        "1 / CAST(({}) AS int) = 0",
                        counts.join(" AND ")
                    )))
                    .to_owned();
                match &mut select {
                    Some(select) => {
                        select.union(UnionType::All, guard);
                    }
                    None => select = Some(guard),
                }
            }
            // A data-modifying WITH query runs whether or not the statement reads its rows.
            let select = select.unwrap_or_else(|| {
                Query::select()
                    .expr(Expr::cust("CAST(NULL AS BIGINT)"))
                    .and_where(Expr::cust("FALSE"))
                    .to_owned()
            });
            let query = select.with(with);
            backend.build(&query)
        }
    };
    let all = txn.query_all_raw(statement).await?;
    by_statement(all, first, statements.len())
}

/// The rows of one call sorted to the statements they came from, by their first column.
fn by_statement(
    all: impl IntoIterator<Item = QueryResult>,
    first: usize,
    len: usize,
) -> Result<Vec<Vec<QueryResult>>, DbErr> {
    let mut rows: Vec<Vec<QueryResult>> = (0..len).map(|_| Vec::new()).collect();
    for row in all {
        let position: i64 = row.try_get_by_index(0)?;
        let Some(bucket) = usize::try_from(position)
            .ok()
            .and_then(|p| p.checked_sub(first))
            .and_then(|p| rows.get_mut(p))
        else {
            return Err(DbErr::Custom(format!(
                "a row returned for statement {position}, not one of {first}..{}",
                first + len
            )));
        };
        bucket.push(row);
    }
    Ok(rows)
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

#[cfg(test)]
mod tests {
    use super::{SHAPES, Shapes, chunks};

    /// A batch of `rows` outbox rows and one timer gone.
    fn batch(rows: usize) -> Vec<usize> {
        vec![0, 0, 0, rows, 0, 1, 0]
    }

    #[test]
    fn a_shape_is_seen_before_from_its_second_batch_until_it_is_the_least_recent_of_too_many() {
        let shapes = Shapes::default();
        assert!(
            !shapes.seen_before(&batch(1)),
            "a first batch goes as the statement of constant text"
        );
        assert!(
            shapes.seen_before(&batch(1)),
            "the same shape again goes prepared"
        );
        assert!(!shapes.seen_before(&batch(2)), "more rows is another text");
        for rows in 3..SHAPES + 2 {
            shapes.seen_before(&batch(rows));
        }
        assert!(
            !shapes.seen_before(&batch(1)),
            "forgotten after {SHAPES} others"
        );
        assert!(
            shapes.seen_before(&batch(SHAPES + 1)),
            "the most recent is kept"
        );
    }

    #[test]
    fn chunks_cover_every_row_once_in_order_and_none_when_empty() {
        let ranges: Vec<_> = chunks(5, 2).collect();
        assert_eq!(ranges, vec![0..2, 2..4, 4..5]);
        assert_eq!(chunks(4, 2).collect::<Vec<_>>(), vec![0..2, 2..4]);
        assert_eq!(chunks(0, 2).count(), 0);
    }
}
