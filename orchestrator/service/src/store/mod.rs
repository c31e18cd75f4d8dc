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
//! neither and run concurrently on the pool (8 connections; 1 for `:memory:`). Writes go
//! through a connection of their own: SQLite drops a connection's page cache whenever another
//! connection has written since its last transaction, so writes rotating through the pool
//! read back from the files, on every transaction, the pages the last one had cached.
//!
//! **Outbox claims.** The relay gets the rows its own process commits from the commit itself
//! (their ids come back from [`Store::commit`]) and marks them sent with a later commit
//! ([`Store::commit_marking_sent`]); it reads the table for the rest. On PostgreSQL
//! [`Store::outbox_batch`] selects unsent rows `FOR UPDATE
//! SKIP LOCKED` inside a transaction that the returned [`OutboxBatch`] holds: another relay
//! skips those rows until the batch is dropped or [`OutboxBatch::mark_sent`] commits. Rows
//! not passed to `mark_sent` (a failed publish) are released unsent and come back in a later
//! batch. The batch holds one pooled connection while the relay publishes, so keep it short.
//! On SQLite there is no claim: run one relay per database (SQLite means one process anyway);
//! two relays would publish the same rows (still only at-least-once duplicates).
//!
//! # Modules, by role
//!
//! - `event_log`: the write side: the event log and the snapshot ([`Store::load`],
//!   [`Store::load_many`], [`Store::commit`], with its statements in `commit`);
//! - `outbox`: what the relay publishes; `inbox`: replies already handled;
//! - `timers`: due step timeouts, retries and deadlines;
//! - `read_model`: the `sagas` rows people read (one saga, its history, lists, counts) and
//!   their rebuild from the log;
//! - `set_aside`: inputs that can never be handled, kept with the reason;
//! - `definitions`: every definition version started with, by content hash.

mod commit;
mod definitions;
mod entity;
mod event_log;
mod identity;
mod inbox;
mod migration;
mod outbox;
mod read_model;
mod set_aside;
mod timers;

use std::sync::Arc;
use std::time::Duration;

use sea_orm::sqlx::postgres::PgSslMode;
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbErr,
    SqliteTransactionMode, TransactionOptions, TransactionTrait,
};
use sea_orm_migration::MigratorTrait;
use tokio::sync::{Mutex, OwnedMutexGuard};

pub use definitions::{DefinitionVersion, Pruned};
pub use event_log::{Commit, CommitError};
pub use migration::Migrator;
pub use outbox::{OutboxBatch, OutboxRow};
pub use read_model::{ListFilter, RecordedEvent, SagaListing, SagaRow, current_step};
pub use set_aside::{SetAside, SetAsideKind};
pub use timers::DueTimer;

/// Largest number of bind parameters put in one statement (SQLite allows 32766, PostgreSQL
/// 65535): batched statements are split into chunks below it.
const MAX_PARAMS: usize = 30_000;
/// Largest number of `(a = ? AND b = ?)` terms OR-ed in one condition (SQLite's parser limits
/// expression depth to 1000).
const MAX_OR_TERMS: usize = 200;
/// Rows a prune deletes per statement (see [`Store::prune_in_chunks`]).
const PRUNE_CHUNK: u64 = 5_000;
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

/// How [`Store::connect_with`] opens the database.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreOptions {
    /// PostgreSQL: the most connections the pool opens (SQLite keeps its own: 8 for reads and
    /// one for writes for a file, 1 in memory).
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
    /// Where writes go: on a SQLite file one connection of its own, else `db`.
    writes: DatabaseConnection,
    backend: Backend,
    /// SQLite's single writer (see the module docs); unused on PostgreSQL.
    writer: Arc<Mutex<WriterState>>,
    /// PostgreSQL: which one-call commits go as prepared statements.
    shapes: Arc<commit::Shapes>,
    /// PostgreSQL: the connection that sends a batch of a new shape as arrays, its session set
    /// to keep one plan that goes by the tables' keys (see [`array_plans`]); `None`: `writes`,
    /// whose session, when the pool is one connection, plans every execution afresh instead
    /// (see [`custom_plans`]).
    arrays: Option<DatabaseConnection>,
}

/// What the single writer leaves for the next one.
#[derive(Default)]
struct WriterState {
    /// A transaction begun outside sea-orm's (a commit in one call) may still be open: its
    /// caller was dropped before it rolled back.
    in_doubt: bool,
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
    _lock: Option<OwnedMutexGuard<WriterState>>,
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

/// Whether to turn TLS off for `url`: its server is on this machine (TLS there protects
/// nothing, and sqlx's default `prefer` encrypts whenever the server offers it: 2.6 times
/// fewer sagas per second in the benchmark) and neither the URL nor `PGSSLMODE` asks for it.
fn plaintext_to_local_server(url: &str, host: &str) -> bool {
    let asked = url.contains("sslmode=") || std::env::var_os("PGSSLMODE").is_some();
    let local = host == "localhost"
        || host.starts_with('/')
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    !asked && local
}

/// What every PostgreSQL pool of the store shares: the idle ping and plaintext to a local server.
fn postgres_options(options: &mut ConnectOptions, url: &str) {
    options.test_before_acquire_if_idle_for(PING_WHEN_IDLE_FOR);
    let url = url.to_owned();
    // One closure: sea-orm keeps only the last one given.
    options.map_sqlx_postgres_opts(move |o| {
        if plaintext_to_local_server(&url, o.get_host()) {
            o.ssl_mode(PgSslMode::Disable)
        } else {
            o
        }
    });
}

/// A session that plans each execution of a prepared statement with its parameters in hand,
/// for a pool of one connection, which runs every statement of the orchestrator: by default
/// the server would after five runs switch a statement to one generic plan for any
/// parameters, and a plan made while the tables are small goes on scanning them whole once
/// they are large. A `SET` on each new connection, not a startup parameter, which PgBouncer
/// refuses; and the pool lazy, since sqlx logs that `SET` and, run by `Database::connect`, its
/// line would carry sea-orm's span, which records the URL with its password.
fn custom_plans(options: &mut ConnectOptions) {
    after_connect(options, "SET plan_cache_mode = force_custom_plan");
}

/// The session of the connection that runs only the group commit's array statement: one
/// generic plan, made at its first run, that reaches every row it updates or deletes through
/// the table's key whatever the tables held when it was made. Planned afresh each run, that
/// statement spent 0.29 ms per batch planning, a sixth of the server's time on statements
/// (`RESULTS.md`). Without the `enable_*` settings the generic plan made on empty tables
/// scans `sagas` and `timers` whole and hash-joins them with the batch's rows. Only this
/// connection has them, so the other statements (reads of the API, the shapes that recur one
/// saga at a time) are planned as the server would.
fn array_plans(options: &mut ConnectOptions) {
    after_connect(
        options,
        "SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off; \
         SET enable_hashjoin = off; SET enable_mergejoin = off",
    );
}

fn after_connect(options: &mut ConnectOptions, settings: &'static str) {
    options.connect_lazy(true);
    options.map_sqlx_postgres_pool_opts(move |pool| {
        pool.after_connect(move |conn, _| {
            Box::pin(async move {
                sea_orm::sqlx::Executor::execute(conn, settings)
                    .await
                    .map(|_| ())
            })
        })
    });
}

/// A connection kept for the life of the pool: its page cache (or, in memory, the database)
/// with it.
fn keep_open(options: &mut ConnectOptions) {
    options.idle_timeout(None).max_lifetime(None);
}

/// How long a PostgreSQL connection may sit idle in the pool before sqlx pings it on checkout.
///
/// sqlx pings on every checkout by default: a round trip before every transaction, and on
/// SQLite a hand-off to its thread and back. A connection used within the last few seconds has
/// not been dropped by a firewall or a proxy; one the server dropped (a restart) fails its
/// first statement, is closed on release, and the caller retries as after any database error.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(5);

fn sqlite_options(options: &mut ConnectOptions, memory: bool) {
    // A connection to a file or to memory in this process cannot hang up.
    options.test_before_acquire(false);
    options.map_sqlx_sqlite_opts(move |o| {
        let o = o
            .busy_timeout(SQLITE_BUSY_TIMEOUT)
            .statement_cache_capacity(16)
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
                "unsupported database URL `{}`: expected sqlite://... or postgres://...",
                saga_amqp::redact_url(url)
            ))));
        };
        let mut options = ConnectOptions::new(url.to_owned());
        let mut writes = None;
        let mut arrays = None;
        match backend {
            Backend::Sqlite => {
                let memory = url.contains(":memory:") || url.contains("mode=memory");
                if memory {
                    // One connection holds the whole database: never close it.
                    options.max_connections(1).min_connections(1);
                    keep_open(&mut options);
                } else {
                    options.max_connections(SQLITE_POOL_SIZE);
                }
                sqlite_options(&mut options, memory);
                if !memory {
                    let mut writer = ConnectOptions::new(url.to_owned());
                    writer.max_connections(1).min_connections(1);
                    keep_open(&mut writer);
                    sqlite_options(&mut writer, false);
                    writes = Some(writer);
                }
            }
            Backend::Postgres => {
                if opts.pool_size == 0 {
                    return Err(StoreError::Db(DbErr::Custom(
                        "the database pool size must be at least 1".into(),
                    )));
                }
                postgres_options(&mut options, url);
                if opts.pool_size == 1 {
                    options.max_connections(1);
                    custom_plans(&mut options);
                } else {
                    // One of the pool's connections is the group commit's for its arrays: it
                    // writes one batch at a time.
                    options.max_connections(opts.pool_size - 1);
                    let mut custom = ConnectOptions::new(url.to_owned());
                    custom.max_connections(1);
                    postgres_options(&mut custom, url);
                    array_plans(&mut custom);
                    arrays = Some(custom);
                }
            }
        }
        let db = Database::connect(options).await?;
        let writes = match writes {
            Some(writer) => Database::connect(writer).await?,
            None => db.clone(),
        };
        let arrays = match arrays {
            Some(custom) => Some(Database::connect(custom).await?),
            None => None,
        };
        let store = Store {
            db,
            writes,
            backend,
            writer: Arc::new(Mutex::new(WriterState::default())),
            shapes: Arc::default(),
            arrays,
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

    /// The most PostgreSQL connections this store opens, all its pools together (0 on
    /// SQLite).
    pub fn postgres_connections(&self) -> u32 {
        if self.backend != Backend::Postgres {
            return 0;
        }
        let max = |db: &DatabaseConnection| {
            db.get_postgres_connection_pool()
                .options()
                .get_max_connections()
        };
        max(&self.db) + self.arrays.as_ref().map_or(0, max)
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

    /// Runs `chunk`, a delete of at most [`PRUNE_CHUNK`] rows, until it deletes fewer, each
    /// time under the write lock afresh: a long backlog is pruned in short writes, between
    /// which decisions commit as usual. Returns how many rows went.
    async fn prune_in_chunks<E: sea_orm::EntityTrait>(
        &self,
        chunk: impl Fn() -> sea_orm::DeleteMany<E>,
    ) -> Result<u64, StoreError> {
        let mut pruned = 0;
        loop {
            let _lock = self.write_lock().await;
            let deleted = chunk().exec(&self.writes).await?.rows_affected;
            pruned += deleted;
            if deleted < PRUNE_CHUNK {
                return Ok(pruned);
            }
        }
    }

    async fn write_lock(&self) -> Option<OwnedMutexGuard<WriterState>> {
        if self.backend == Backend::Postgres {
            return None;
        }
        let mut state = self.writer.clone().lock_owned().await;
        if state.in_doubt {
            self.roll_back_raw().await;
            state.in_doubt = false;
        }
        Some(state)
    }

    /// Rolls back a transaction begun with a raw `BEGIN`, if one is open ("no transaction is
    /// active" otherwise, which is fine).
    async fn roll_back_raw(&self) {
        if let Err(error) = self.writes.execute_unprepared("ROLLBACK").await {
            tracing::debug!(%error, "rollback of a commit in one call");
        }
    }

    async fn begin_write(&self) -> Result<Writer, DbErr> {
        let lock = self.write_lock().await;
        let txn = self
            .writes
            .begin_with_options(TransactionOptions {
                sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
                ..Default::default()
            })
            .await?;
        Ok(Writer { txn, _lock: lock })
    }
}

#[cfg(test)]
mod tests {
    use sea_orm::{DbBackend, Statement};

    use super::*;

    /// The one value `sql` (a `PRAGMA` or a `SHOW`) answers, as text.
    async fn setting(db: &DatabaseConnection, sql: String) -> String {
        let row = db
            .query_one_raw(Statement::from_string(db.get_database_backend(), sql))
            .await
            .unwrap()
            .unwrap();
        row.try_get_by_index::<i64>(0)
            .map(|v| v.to_string())
            .or_else(|_| row.try_get_by_index::<String>(0))
            .unwrap()
    }

    async fn pragma(db: &DatabaseConnection, name: &str) -> String {
        setting(db, format!("PRAGMA {name}")).await
    }

    #[tokio::test]
    async fn a_sqlite_file_is_written_through_a_connection_of_its_own_with_the_same_durability() {
        let path = std::env::temp_dir().join(format!("saga-store-{}.db", uuid::Uuid::new_v4()));
        let store = Store::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .unwrap();

        for (db, which) in [(&store.writes, "writer"), (&store.db, "readers")] {
            // synchronous=FULL is 2; every commit is fsynced before it is acted on.
            assert_eq!(pragma(db, "synchronous").await, "2", "{which}");
            assert_eq!(pragma(db, "journal_mode").await, "wal", "{which}");
            assert_eq!(pragma(db, "foreign_keys").await, "1", "{which}");
            assert_eq!(pragma(db, "busy_timeout").await, "5000", "{which}");
        }
        let writer = store.writes.get_sqlite_connection_pool();
        let readers = store.db.get_sqlite_connection_pool();
        assert_eq!(writer.options().get_max_connections(), 1);
        assert_eq!(readers.options().get_max_connections(), SQLITE_POOL_SIZE);

        store.db.close_by_ref().await.ok();
        store.writes.close_by_ref().await.ok();
        for suffix in ["", "-wal", "-shm"] {
            let mut p = path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }

    async fn show(db: &DatabaseConnection, name: &str) -> String {
        setting(db, format!("SHOW {name}")).await
    }

    /// A database of its own on the server of `DATABASE_URL`, and a function that drops it.
    async fn scratch_postgres() -> (String, impl AsyncFnOnce()) {
        let admin_url = std::env::var("DATABASE_URL").expect(
            "this test needs a PostgreSQL server: set DATABASE_URL, e.g. \
             DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres",
        );
        let admin = Database::connect(&admin_url).await.unwrap();
        let name = format!("t_{}", uuid::Uuid::new_v4().simple());
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let (base, _) = admin_url.rsplit_once('/').unwrap();
        let url = format!("{base}/{name}");
        let remove = async move || {
            admin
                .execute_unprepared(&format!("DROP DATABASE {name} WITH (FORCE)"))
                .await
                .unwrap();
        };
        (url, remove)
    }

    async fn close(store: &Store) {
        store.db.close_by_ref().await.ok();
        if let Some(arrays) = &store.arrays {
            arrays.close_by_ref().await.ok();
        }
    }

    #[tokio::test]
    async fn on_postgres_only_the_array_connection_keeps_one_plan_that_goes_by_the_keys() {
        let (url, remove) = scratch_postgres().await;
        for size in [1, 4] {
            let store = Store::connect_with(&url, StoreOptions { pool_size: size })
                .await
                .unwrap();
            let arrays = store.arrays.as_ref().unwrap_or(&store.writes);
            if size == 1 {
                // Given one connection for everything, it plans every execution afresh.
                assert_eq!(show(arrays, "plan_cache_mode").await, "force_custom_plan");
                assert_eq!(show(arrays, "enable_seqscan").await, "on");
            } else {
                // Given a larger pool, one connection keeps one plan, by the keys...
                assert_eq!(show(arrays, "plan_cache_mode").await, "force_generic_plan");
                for scan in ["enable_seqscan", "enable_hashjoin", "enable_mergejoin"] {
                    assert_eq!(show(arrays, scan).await, "off", "{scan}");
                }
                // ...and the others keep the server's defaults.
                assert_eq!(show(&store.db, "plan_cache_mode").await, "auto");
                assert_eq!(show(&store.db, "enable_seqscan").await, "on");
            }
            close(&store).await;
        }
        remove().await;
    }

    #[tokio::test]
    async fn on_postgres_the_array_statement_made_on_empty_tables_reads_no_table_whole() {
        let (url, remove) = scratch_postgres().await;
        let store = Store::connect_with(&url, StoreOptions { pool_size: 4 })
            .await
            .unwrap();
        let arrays = store
            .arrays
            .as_ref()
            .expect("a pool of 4 has the array connection");
        // Given the statement prepared on the array connection while every table is empty, as
        // at an orchestrator's first batch on a new database
        arrays
            .execute_unprepared(&format!(
                "PREPARE array_commit AS {}",
                commit::postgres::STATEMENT
            ))
            .await
            .unwrap();
        let params = (1..)
            .take_while(|n| commit::postgres::STATEMENT.contains(&format!("${n}::")))
            .count();
        // When its plan is shown (the generic one: the arrays' values do not matter)
        let plan: Vec<String> = arrays
            .query_all_raw(Statement::from_string(
                DbBackend::Postgres,
                format!(
                    "EXPLAIN EXECUTE array_commit({})",
                    vec!["NULL"; params].join(", ")
                ),
            ))
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get_by_index::<String>(0).unwrap())
            .collect();
        let plan = plan.join("\n");
        // Then the rows it updates and deletes are reached through their keys, and no table is
        // read whole: a plan kept for every batch after, however large the tables grow
        assert!(params >= 40, "{params} parameters found in the statement");
        for scan in ["Seq Scan", "Hash Join", "Merge Join"] {
            assert!(!plan.contains(scan), "{scan} in the kept plan:\n{plan}");
        }
        for key in ["sagas_pkey on sagas", "timers_pkey on timers"] {
            assert!(
                plan.contains(&format!("Index Scan using {key}")),
                "no index scan using {key}:\n{plan}"
            );
        }
        close(&store).await;
        remove().await;
    }

    #[tokio::test]
    async fn a_transaction_a_dropped_commit_left_open_is_rolled_back_by_the_next_writer() {
        use sea_orm::{ActiveValue::Set, EntityTrait};

        let store = Store::connect("sqlite::memory:").await.unwrap();
        let (saga_id, now) = (uuid::Uuid::new_v4(), chrono::Utc::now());
        let (stray, next) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        // Given what a commit in one call dropped after its BEGIN leaves: an open transaction.
        {
            let mut state = store.writer.lock().await;
            state.in_doubt = true;
            store
                .writes
                .execute_unprepared("BEGIN IMMEDIATE")
                .await
                .unwrap();
            entity::inbox::Entity::insert(entity::inbox::ActiveModel {
                message_id: Set(stray),
                saga_id: Set(saga_id),
                received_at: Set(now),
            })
            .exec_without_returning(&store.writes)
            .await
            .unwrap();
        }
        // When the next commit comes, it goes through, and the stray write is gone.
        let recorded = Commit {
            inbox_id: Some(next),
            ..Commit::empty(saga_id, now)
        };
        store.commit(&[recorded]).await.unwrap();
        assert_eq!(
            store.seen(&[stray, next]).await.unwrap(),
            std::collections::HashSet::from([next])
        );
    }
}
