//! Durable state in SQL (sea-orm): the event log, the read model with the write side's
//! snapshot, the outbox, the inbox and the due timers.
//!
//! Thin on purpose: the engine decides, the store records. Everything a decision produces is
//! written by [`Store::commit`] in ONE transaction, for one saga or for many (group commit).
//!
//! # Backends
//!
//! PostgreSQL in production (a pool of [`StoreOptions::pool_size`] connections, 10 by
//! default), SQLite as the embedded default. Migrations run in [`Store::connect`].
//!
//! **SQLite write concurrency.** WAL journal (readers never block the writer), `busy_timeout`
//! 5 s, foreign keys on. Every write transaction is taken under a single-writer async mutex
//! inside the `Store` (FIFO, so concurrent writers in this process queue up instead of
//! spinning in SQLite's busy handler) AND begins with `BEGIN IMMEDIATE` (so a writer in
//! another process, e.g. an operator's CLI, waits on the busy timeout at `BEGIN` instead of
//! failing half-way when a deferred transaction tries to upgrade its read lock). Reads take
//! neither and run concurrently on the pool (8 connections; 1 for `:memory:`).
//!
//! **Outbox claims.** On PostgreSQL [`Store::outbox_batch`] selects unsent rows `FOR UPDATE
//! SKIP LOCKED` inside a transaction that the returned [`OutboxBatch`] holds: another relay
//! skips those rows until the batch is dropped or [`OutboxBatch::mark_sent`] commits. Rows
//! not passed to `mark_sent` (a failed publish) are released unsent and come back in a later
//! batch. The batch holds one pooled connection while the relay publishes, so keep it short.
//! On SQLite there is no claim: run one relay per database (SQLite means one process anyway);
//! two relays would publish the same rows (still only at-least-once duplicates).

mod commit;
mod entity;
mod migration;
mod read_model;
mod set_aside;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use saga_engine::{SagaState, TimerChange, TimerKind};
use saga_schemas::amqp::OutgoingMessage;
use saga_schemas::{Data, SagaEvent, SagaStatus};
use sea_orm::sea_query::{LockBehavior, LockType};
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ColumnTrait, Condition, ConnectOptions, ConnectionTrait, Database, DatabaseConnection,
    DatabaseTransaction, DbErr, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect,
    SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

use entity::{inbox, outbox, saga_events, sagas, timers};
pub use migration::Migrator;
pub use read_model::current_step;
pub use set_aside::{SetAside, SetAsideKind};

/// Largest number of bind parameters put in one statement (SQLite allows 32766, PostgreSQL
/// 65535): batched statements are split into chunks below it.
const MAX_PARAMS: usize = 30_000;
/// Largest number of `(a = ? AND b = ?)` terms OR-ed in one condition (SQLite's parser limits
/// expression depth to 1000).
const MAX_OR_TERMS: usize = 200;
const SQLITE_POOL_SIZE: u32 = 8;
/// PostgreSQL connections per orchestrator process unless configured otherwise.
pub const DEFAULT_POOL_SIZE: u32 = 10;
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Key of the PostgreSQL advisory lock held while migrating (any constant unique to us).
const MIGRATION_LOCK_KEY: i64 = 0x5a6a_0c1d_5a6a_0001;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer advanced the saga first (its `(saga_id, seq)` is taken): reload, decide
    /// again.
    #[error("another writer advanced the saga first")]
    Conflict,
    /// The idempotency key (for this saga name) or the inbox message id is already recorded.
    #[error("already recorded: idempotency key or inbox message id")]
    Duplicate,
    #[error("database error: {0}")]
    Db(#[from] DbErr),
    /// Stored data that does not parse, or a commit that contradicts itself.
    #[error("corrupt data: {0}")]
    Corrupt(String),
}

impl StoreError {
    /// Whether trying the same thing again can never succeed: corrupt data, or a duplicate
    /// (already recorded). Database errors (unavailable, timed out, deadlocked) and conflicts
    /// are worth trying again. The one rule for what is set aside (see also
    /// `RuntimeError::is_permanent`).
    pub fn is_permanent(&self) -> bool {
        match self {
            StoreError::Corrupt(_) | StoreError::Duplicate => true,
            StoreError::Conflict | StoreError::Db(_) => false,
        }
    }
}

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
    fn at(index: usize, error: StoreError) -> Self {
        CommitError {
            index: Some(index),
            error,
        }
    }

    fn batch(error: impl Into<StoreError>) -> Self {
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
            now,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DueTimer {
    pub saga_id: Uuid,
    /// `timer.key()`, as stored.
    pub key: String,
    pub timer: TimerKind,
    pub due_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub saga_id: Uuid,
    pub message: OutgoingMessage,
    pub created_at: DateTime<Utc>,
}

/// A row of the read model.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaRow {
    pub id: Uuid,
    pub name: String,
    pub status: SagaStatus,
    pub business_key: Option<String>,
    pub idempotency_key: Option<String>,
    pub definition_version: String,
    pub current_step: Option<String>,
    pub data: Data,
    pub state: SagaState,
    pub version: u64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RecordedEvent {
    pub seq: u64,
    pub recorded_at: DateTime<Utc>,
    pub event: SagaEvent,
}

/// Filter and page of [`Store::list`]: newest first by `(created_at, id)`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListFilter {
    pub status: Option<SagaStatus>,
    pub name: Option<String>,
    pub limit: u64,
    /// Keyset cursor: only rows strictly older than this `(created_at, id)`; pass the last
    /// row of the previous page.
    pub before: Option<(DateTime<Utc>, Uuid)>,
}

/// How [`Store::connect_with`] opens the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// PostgreSQL: the most connections the pool opens (SQLite keeps its own: 8 for a file, 1
    /// in memory).
    pub pool_size: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            pool_size: DEFAULT_POOL_SIZE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

#[derive(Clone)]
pub struct Store {
    db: DatabaseConnection,
    backend: Backend,
    /// SQLite's single writer (see the module docs); unused on PostgreSQL.
    writer: Arc<Mutex<()>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("backend", &self.backend_name())
            .finish_non_exhaustive()
    }
}

/// A write transaction; on SQLite it also holds the single-writer lock. Fields drop in order:
/// the transaction (rolled back if still open) before the lock.
struct Writer {
    txn: DatabaseTransaction,
    _lock: Option<OwnedMutexGuard<()>>,
}

impl Writer {
    async fn commit(self) -> Result<(), DbErr> {
        let Writer { txn, _lock } = self;
        txn.commit().await
    }

    /// Rolls back now (not lazily on drop), so the SQLite write lock is free when the
    /// single-writer mutex is released.
    async fn rollback(self) {
        let Writer { txn, _lock } = self;
        if let Err(error) = txn.rollback().await {
            tracing::warn!(%error, "rollback failed");
        }
    }
}

impl Store {
    /// Connects to `sqlite://path?mode=rwc` (`sqlite::memory:` for tests) or
    /// `postgres://...` with the default options, and runs the migrations.
    pub async fn connect(url: &str) -> Result<Store, StoreError> {
        Store::connect_with(url, StoreOptions::default()).await
    }

    /// [`Store::connect`] with `options`.
    pub async fn connect_with(url: &str, opts: StoreOptions) -> Result<Store, StoreError> {
        let backend = if url.starts_with("sqlite:") {
            Backend::Sqlite
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Backend::Postgres
        } else {
            return Err(StoreError::Db(DbErr::Custom(format!(
                "unsupported database URL `{url}`: expected sqlite://... or postgres://..."
            ))));
        };
        let mut options = ConnectOptions::new(url.to_owned());
        match backend {
            Backend::Sqlite => {
                let memory = url.contains(":memory:") || url.contains("mode=memory");
                if memory {
                    // One connection holds the whole database: never close it.
                    options
                        .max_connections(1)
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None);
                } else {
                    options.max_connections(SQLITE_POOL_SIZE);
                }
                options.map_sqlx_sqlite_opts(move |o| {
                    let o = o
                        .busy_timeout(SQLITE_BUSY_TIMEOUT)
                        .foreign_keys(true)
                        .synchronous(SqliteSynchronous::Full);
                    if memory {
                        o
                    } else {
                        o.journal_mode(SqliteJournalMode::Wal)
                            .create_if_missing(true)
                    }
                });
            }
            Backend::Postgres => {
                if opts.pool_size == 0 {
                    return Err(StoreError::Db(DbErr::Custom(
                        "the database pool size must be at least 1".into(),
                    )));
                }
                options.max_connections(opts.pool_size);
            }
        }
        let db = Database::connect(options).await?;
        let store = Store {
            db,
            backend,
            writer: Arc::new(Mutex::new(())),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// Applies pending migrations in one transaction; on PostgreSQL under an advisory lock so
    /// processes starting together migrate one at a time.
    async fn migrate(&self) -> Result<(), StoreError> {
        let w = self.begin_write().await?;
        if self.backend == Backend::Postgres {
            w.txn
                .execute_unprepared(&format!(
                    "SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})"
                ))
                .await?;
        }
        match Migrator::up(&w.txn, None).await {
            Ok(()) => Ok(w.commit().await?),
            Err(error) => {
                w.rollback().await;
                Err(error.into())
            }
        }
    }

    /// The underlying connection, for what this API does not cover (health checks, tooling).
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    pub async fn ping(&self) -> Result<(), StoreError> {
        Ok(self.db.ping().await?)
    }

    /// `"sqlite"` or `"postgres"`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite => "sqlite",
            Backend::Postgres => "postgres",
        }
    }

    async fn write_lock(&self) -> Option<OwnedMutexGuard<()>> {
        match self.backend {
            Backend::Sqlite => Some(self.writer.clone().lock_owned().await),
            Backend::Postgres => None,
        }
    }

    async fn begin_write(&self) -> Result<Writer, DbErr> {
        let lock = self.write_lock().await;
        let txn = self
            .db
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        Ok(Writer { txn, _lock: lock })
    }

    // --- write side ------------------------------------------------------------------------

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

    /// Which of `message_ids` are already in the inbox.
    pub async fn seen(&self, message_ids: &[Uuid]) -> Result<HashSet<Uuid>, StoreError> {
        let mut seen = HashSet::new();
        for chunk in message_ids.chunks(MAX_PARAMS) {
            let ids: Vec<Uuid> = inbox::Entity::find()
                .select_only()
                .column(inbox::Column::MessageId)
                .filter(inbox::Column::MessageId.is_in(chunk.iter().copied()))
                .into_tuple()
                .all(&self.db)
                .await?;
            seen.extend(ids);
        }
        Ok(seen)
    }

    /// Writes every commit in ONE transaction (see [`Commit`]) and returns the number of
    /// outbox rows written. Statements are batched across the commits (one multi-row insert
    /// per table, a handful in all), so many sagas cost about as much as one.
    ///
    /// All or nothing: on error nothing is written and [`CommitError::index`] names the
    /// commit at fault, so the caller can retry the others one by one.
    pub async fn commit(&self, commits: &[Commit]) -> Result<usize, CommitError> {
        if commits.is_empty() {
            return Ok(0);
        }
        let plan = commit::Plan::build(commits)?;
        let w = self.begin_write().await.map_err(CommitError::batch)?;
        match plan.write(&w.txn).await {
            Ok(written) => {
                w.commit().await.map_err(CommitError::batch)?;
                Ok(written)
            }
            Err(error) => {
                w.rollback().await;
                Err(error)
            }
        }
    }

    /// Timers due at `now`, earliest first. A row whose timer does not parse can never fire:
    /// it is set aside (deleted, recorded in `set_aside` with the reason) instead of returned,
    /// so it cannot hold up the timers behind it.
    pub async fn due_timers(
        &self,
        now: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<DueTimer>, StoreError> {
        let rows = timers::Entity::find()
            .filter(timers::Column::DueAt.lte(now))
            .order_by_asc(timers::Column::DueAt)
            .order_by_asc(timers::Column::SagaId)
            .order_by_asc(timers::Column::TimerKey)
            .limit(limit)
            .all(&self.db)
            .await?;
        let mut due = Vec::with_capacity(rows.len());
        for row in rows {
            match serde_json::from_str(&row.timer) {
                Ok(timer) => due.push(DueTimer {
                    saga_id: row.saga_id,
                    key: row.timer_key,
                    timer,
                    due_at: row.due_at,
                }),
                Err(e) => {
                    let reason = format!("the timer does not parse: {e}");
                    tracing::warn!(saga_id = %row.saga_id, timer = %row.timer_key, %reason, "setting a timer aside");
                    let item = serde_json::json!({"key": row.timer_key, "due_at": row.due_at, "timer_text": row.timer});
                    self.set_aside_timer_row(
                        row.saga_id,
                        &row.timer_key,
                        row.due_at,
                        item,
                        &reason,
                        Utc::now(),
                    )
                    .await?;
                }
            }
        }
        Ok(due)
    }

    pub async fn timer_count(&self) -> Result<u64, StoreError> {
        Ok(timers::Entity::find().count(&self.db).await?)
    }

    // --- outbox ----------------------------------------------------------------------------

    /// Up to `limit` unsent outbox rows, oldest first, claimed on PostgreSQL (see the module
    /// docs). Publish them, then [`OutboxBatch::mark_sent`] the ones confirmed.
    pub async fn outbox_batch(&self, limit: u64) -> Result<OutboxBatch, StoreError> {
        let query = outbox::Entity::find()
            .filter(outbox::Column::SentAt.is_null())
            .order_by_asc(outbox::Column::Id)
            .limit(limit);
        match self.backend {
            Backend::Postgres => {
                let txn = self.db.begin().await?;
                let rows = query
                    .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
                    .all(&txn)
                    .await?;
                let rows = parse_outbox(rows)?;
                if rows.is_empty() {
                    txn.commit().await?;
                    return Ok(OutboxBatch {
                        rows,
                        claim: Claim::Nothing,
                    });
                }
                Ok(OutboxBatch {
                    rows,
                    claim: Claim::Locked(txn),
                })
            }
            Backend::Sqlite => {
                let rows = parse_outbox(query.all(&self.db).await?)?;
                Ok(OutboxBatch {
                    rows,
                    claim: Claim::Unlocked(self.clone()),
                })
            }
        }
    }

    /// Number of unsent outbox rows.
    pub async fn outbox_backlog(&self) -> Result<u64, StoreError> {
        Ok(outbox::Entity::find()
            .filter(outbox::Column::SentAt.is_null())
            .count(&self.db)
            .await?)
    }

    /// Deletes outbox rows sent before `sent_before`; returns how many.
    pub async fn prune_outbox(&self, sent_before: DateTime<Utc>) -> Result<u64, StoreError> {
        let _lock = self.write_lock().await;
        let result = outbox::Entity::delete_many()
            .filter(outbox::Column::SentAt.lt(sent_before))
            .exec(&self.db)
            .await?;
        Ok(result.rows_affected)
    }

    // --- read side -------------------------------------------------------------------------

    pub async fn saga(&self, id: Uuid) -> Result<Option<SagaRow>, StoreError> {
        match sagas::Entity::find_by_id(id).one(&self.db).await? {
            Some(row) => Ok(Some(self.saga_row(row).await?)),
            None => Ok(None),
        }
    }

    /// The read-model row, its snapshot rebuilt from the log if it does not parse.
    async fn saga_row(&self, row: sagas::Model) -> Result<SagaRow, StoreError> {
        let state = self.snapshot_or_log(row.id, &row.state).await?;
        SagaRow::from_model(row, state)
    }

    /// `snapshot` parsed, or else the state folded from the saga's whole event log.
    async fn snapshot_or_log(
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

    /// The saga's whole log, in order.
    pub async fn history(&self, id: Uuid) -> Result<Vec<RecordedEvent>, StoreError> {
        let rows = saga_events::Entity::find()
            .filter(saga_events::Column::SagaId.eq(id))
            .order_by_asc(saga_events::Column::Seq)
            .all(&self.db)
            .await?;
        rows.into_iter()
            .map(|row| {
                Ok(RecordedEvent {
                    seq: row.seq as u64,
                    recorded_at: row.recorded_at,
                    event: parse_event(&row)?,
                })
            })
            .collect()
    }

    /// Sagas newest first by `(created_at desc, id desc)`, filtered, one keyset page.
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaRow>, StoreError> {
        let mut query = sagas::Entity::find();
        if let Some(status) = filter.status {
            query = query.filter(sagas::Column::Status.eq(status.as_str()));
        }
        if let Some(name) = &filter.name {
            query = query.filter(sagas::Column::Name.eq(name.as_str()));
        }
        if let Some((created_at, id)) = filter.before {
            query = query.filter(
                Condition::any()
                    .add(sagas::Column::CreatedAt.lt(created_at))
                    .add(
                        Condition::all()
                            .add(sagas::Column::CreatedAt.eq(created_at))
                            .add(sagas::Column::Id.lt(id)),
                    ),
            );
        }
        let rows = query
            .order_by_desc(sagas::Column::CreatedAt)
            .order_by_desc(sagas::Column::Id)
            .limit(filter.limit)
            .all(&self.db)
            .await?;
        let mut sagas = Vec::with_capacity(rows.len());
        for row in rows {
            sagas.push(self.saga_row(row).await?);
        }
        Ok(sagas)
    }

    /// Ids of the sagas still moving on their own (running or compensating).
    pub async fn in_flight_ids(&self) -> Result<Vec<Uuid>, StoreError> {
        Ok(sagas::Entity::find()
            .select_only()
            .column(sagas::Column::Id)
            .filter(sagas::Column::Status.is_in([
                SagaStatus::Running.as_str(),
                SagaStatus::Compensating.as_str(),
            ]))
            .order_by_asc(sagas::Column::CreatedAt)
            .order_by_asc(sagas::Column::Id)
            .into_tuple()
            .all(&self.db)
            .await?)
    }

    /// Sagas still moving on their own (running or compensating), per saga name; with
    /// `started_before`, only those started before it (the long-running ones).
    pub async fn in_flight_by_name(
        &self,
        started_before: Option<DateTime<Utc>>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let mut query = sagas::Entity::find()
            .select_only()
            .column(sagas::Column::Name)
            .column_as(sagas::Column::Id.count(), "count")
            .filter(sagas::Column::Status.is_in([
                SagaStatus::Running.as_str(),
                SagaStatus::Compensating.as_str(),
            ]));
        if let Some(before) = started_before {
            query = query.filter(sagas::Column::CreatedAt.lt(before));
        }
        let rows: Vec<(String, i64)> = query
            .group_by(sagas::Column::Name)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .map(|(name, count)| (name, count.max(0) as u64))
            .collect())
    }

    /// Timers whose time has come and that no orchestrator has fired yet.
    pub async fn overdue_timer_count(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(timers::Entity::find()
            .filter(timers::Column::DueAt.lte(now))
            .count(&self.db)
            .await?)
    }

    /// Rebuilds every `sagas` row (snapshot and version included) from `saga_events` alone,
    /// by folding each saga's log; deletes rows whose saga has no events. `created_at` is the
    /// first event's `recorded_at`, `updated_at` the last one's; an existing row keeps its
    /// `idempotency_key` (the events do not carry it: a row rebuilt from nothing has none).
    /// One transaction; on PostgreSQL it locks `saga_events` against writers (SHARE mode)
    /// so no commit lands between the read and the rewrite. Returns the number of sagas.
    pub async fn rebuild_read_model(&self) -> Result<u64, StoreError> {
        let w = self.begin_write().await?;
        match read_model::rebuild(&w.txn, self.backend == Backend::Postgres).await {
            Ok(count) => {
                w.commit().await?;
                Ok(count)
            }
            Err(error) => {
                w.rollback().await;
                Err(error)
            }
        }
    }
}

/// Unsent outbox rows handed to the relay; see [`Store::outbox_batch`].
#[must_use = "publish the rows, then mark_sent the confirmed ones"]
pub struct OutboxBatch {
    pub rows: Vec<OutboxRow>,
    claim: Claim,
}

enum Claim {
    /// PostgreSQL: the rows are locked by this open transaction.
    Locked(DatabaseTransaction),
    /// SQLite: nothing held.
    Unlocked(Store),
    /// No rows.
    Nothing,
}

impl std::fmt::Debug for OutboxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxBatch")
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl OutboxBatch {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Marks `ids` sent and ends the claim (commits); the batch's other rows stay unsent and
    /// come back in a later batch.
    pub async fn mark_sent(self, ids: &[i64]) -> Result<(), StoreError> {
        let now = Utc::now();
        match self.claim {
            Claim::Locked(txn) => {
                mark_sent(&txn, ids, now).await?;
                txn.commit().await?;
            }
            Claim::Unlocked(store) => {
                if !ids.is_empty() {
                    let _lock = store.write_lock().await;
                    mark_sent(&store.db, ids, now).await?;
                }
            }
            Claim::Nothing => {}
        }
        Ok(())
    }

    /// Gives the rows back unsent (same as dropping the batch, but waits for the release).
    pub async fn release(self) -> Result<(), StoreError> {
        if let Claim::Locked(txn) = self.claim {
            txn.rollback().await?;
        }
        Ok(())
    }
}

async fn mark_sent(
    db: &impl ConnectionTrait,
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    for chunk in ids.chunks(MAX_PARAMS) {
        outbox::Entity::update_many()
            .col_expr(outbox::Column::SentAt, sea_orm::sea_query::Expr::val(now))
            .filter(outbox::Column::Id.is_in(chunk.iter().copied()))
            .filter(outbox::Column::SentAt.is_null())
            .exec(db)
            .await?;
    }
    Ok(())
}

fn parse_outbox(rows: Vec<outbox::Model>) -> Result<Vec<OutboxRow>, StoreError> {
    rows.into_iter()
        .map(|row| {
            let message = serde_json::from_str(&row.message)
                .map_err(|e| StoreError::Corrupt(format!("outbox row {}: {e}", row.id)))?;
            Ok(OutboxRow {
                id: row.id,
                saga_id: row.saga_id,
                message,
                created_at: row.created_at,
            })
        })
        .collect()
}

fn parse_state(saga_id: Uuid, json: &str) -> Result<SagaState, StoreError> {
    serde_json::from_str(json)
        .map_err(|e| StoreError::Corrupt(format!("state of saga {saga_id}: {e}")))
}

fn parse_event(row: &saga_events::Model) -> Result<SagaEvent, StoreError> {
    serde_json::from_str(&row.payload)
        .map_err(|e| StoreError::Corrupt(format!("event {} of saga {}: {e}", row.seq, row.saga_id)))
}

impl SagaRow {
    /// The row, with `state` already parsed (or rebuilt) from its `state` column.
    fn from_model(row: sagas::Model, state: SagaState) -> Result<Self, StoreError> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Corrupt(format!("{what} of saga {}: {e}", row.id))
        };
        Ok(SagaRow {
            status: row.status.parse().map_err(|e| corrupt("status", &e))?,
            data: serde_json::from_str(&row.data).map_err(|e| corrupt("data", &e))?,
            state,
            version: u64::try_from(row.version).map_err(|e| corrupt("version", &e))?,
            id: row.id,
            name: row.name,
            business_key: row.business_key,
            idempotency_key: row.idempotency_key,
            definition_version: row.definition_version,
            current_step: row.current_step,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}
