//! The participant's own database: connecting (SQLite or PostgreSQL with a schema of its own)
//! and the SDK's de-duplication table, `saga_inbox`, pruned after a retention.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::sqlx::postgres::PgSslMode;
use sea_orm::sqlx::sqlite::{SqliteJournalMode, SqliteSynchronous};
use sea_orm::{
    ConnectOptions, ConnectionTrait, Database, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, EntityTrait, QueryFilter, Schema, Statement, TransactionTrait,
};
use tokio_util::sync::CancellationToken;

/// PostgreSQL connections per participant process unless configured otherwise.
pub const DEFAULT_DATABASE_POOL_SIZE: u32 = 16;

/// How long a handled command's record is kept in `saga_inbox` unless configured otherwise
/// ([`Participant::inbox_retention`](crate::Participant::inbox_retention)).
///
/// Why forgetting a record then is safe:
///
/// A record of `saga_inbox` (one per saga, step and direction) does three things, each only
/// for as long as the orchestrator may still send a command for that step:
///
/// - **Answer a repeated command** with the recorded outcome instead of running the handler
///   again. The orchestrator asks again only while it has no answer: once it has recorded one
///   (moments after the reply is published) it sends no further attempt, and the copies
///   already sent are dropped by the broker at their expiration (twice the step's timeout from
///   publication). An action past its `expires_at` is refused anyway, record or not.
/// - **Refuse a late action** after its compensation was recorded: the same holds, since
///   compensation only begins once no further action is sent, and a stray copy expires.
/// - **Decide that a compensation runs the handler** (the action succeeded here) rather than
///   being a null one. A compensation can come long after its action: while the saga waits on
///   a later step, or for an operator to retry a failed compensation. This is the one record
///   that must outlive the saga, so the retention is a month: far longer than a saga is
///   expected to stay unsettled.
///
/// The one assumption: no saga stays unsettled, still asking this participant about a step or
/// yet to compensate it, for longer than the retention. One that does could have a step it
/// asks about again run a second time (unless its action expired), or a compensation here
/// taken for a null one.
pub const DEFAULT_INBOX_RETENTION: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// How often records past the retention are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(10 * 60);
/// Records deleted per statement: a long backlog is pruned in short writes, between which
/// commands are handled as usual.
const PRUNE_CHUNK: u64 = 5_000;

/// Opens the participant's database.
///
/// - `sqlite://<file>?mode=rwc`: WAL journal, a busy timeout, and one pooled connection (SQLite
///   has one writer at a time anyway, so handlers queue for it instead of failing with `BUSY`).
/// - `postgres://...`: with `schema`, the schema is created if missing and every pooled
///   connection gets `search_path` set to it, so each participant keeps its tables apart even in
///   a shared database. Without `schema`, the server's default search path applies. The pool
///   opens at most [`DEFAULT_DATABASE_POOL_SIZE`] connections (see [`connect_with_pool`]).
pub async fn connect(url: &str, schema: Option<&str>) -> Result<DatabaseConnection, DbErr> {
    connect_with_pool(url, schema, None).await
}

/// [`connect`] with a PostgreSQL pool of at most `pool_size` connections (`None`: the default;
/// ignored for SQLite).
pub async fn connect_with_pool(
    url: &str,
    schema: Option<&str>,
    pool_size: Option<u32>,
) -> Result<DatabaseConnection, DbErr> {
    // sea-orm's "no supporting driver" error would echo the URL with its password.
    if !["sqlite:", "postgres://", "postgresql://"]
        .iter()
        .any(|scheme| url.starts_with(scheme))
    {
        return Err(DbErr::Custom(format!(
            "unsupported database URL `{}`: expected sqlite://... or postgres://...",
            saga_amqp::redact_url(url)
        )));
    }
    let mut options = ConnectOptions::new(url.to_owned());
    options
        .sqlx_logging(false)
        .connect_timeout(Duration::from_secs(10))
        .acquire_timeout(Duration::from_secs(60));
    if url.starts_with("sqlite:") {
        if schema.is_some() {
            tracing::warn!("DATABASE_SCHEMA is ignored for SQLite");
        }
        options
            .max_connections(1)
            .min_connections(1)
            // A file in this process cannot hang up; a ping per checkout is a hand-off to
            // SQLite's thread and back before every batch.
            .test_before_acquire(false)
            .map_sqlx_sqlite_opts(|o| {
                o.journal_mode(SqliteJournalMode::Wal)
                    .synchronous(SqliteSynchronous::Full)
                    .busy_timeout(Duration::from_secs(30))
                    .create_if_missing(true)
            });
        return Database::connect(options).await;
    }
    let owned_url = url.to_owned();
    options.map_sqlx_postgres_opts(move |o| {
        if plaintext_to_local_server(&owned_url, o.get_host()) {
            o.ssl_mode(PgSslMode::Disable)
        } else {
            o
        }
    });
    if let Some(schema) = schema {
        check_schema_name(schema)?;
        create_schema(url, schema).await?;
        options.set_schema_search_path(schema.to_owned());
    }
    let pool_size = pool_size.unwrap_or(DEFAULT_DATABASE_POOL_SIZE);
    if pool_size == 0 {
        return Err(DbErr::Custom(
            "the database pool size must be at least 1".into(),
        ));
    }
    // Ping a connection on checkout only once it has sat idle (a firewall may have dropped
    // it), not before every batch: a round trip each. One the server dropped fails its first
    // statement, is closed on release, and the batch's deliveries are retried.
    options
        .max_connections(pool_size)
        .test_before_acquire_if_idle_for(Duration::from_secs(5));
    Database::connect(options).await
}

fn check_schema_name(schema: &str) -> Result<(), DbErr> {
    let ok = !schema.is_empty()
        && schema.len() <= 63
        && schema
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !schema.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(DbErr::Custom(format!(
            "invalid database schema name {schema:?}: use letters, digits and `_`"
        )))
    }
}

async fn create_schema(url: &str, schema: &str) -> Result<(), DbErr> {
    let mut options = ConnectOptions::new(url.to_owned());
    options.sqlx_logging(false).max_connections(1);
    let db = Database::connect(options).await?;
    let result = db
        .execute_unprepared(&format!("CREATE SCHEMA IF NOT EXISTS \"{schema}\""))
        .await;
    if let Err(err) = result {
        // Two processes creating the same schema at once: one of them gets a unique
        // violation on pg_namespace although the schema now exists.
        let exists = db
            .query_one_raw(sea_orm::Statement::from_sql_and_values(
                DbBackend::Postgres,
                "SELECT 1 FROM pg_namespace WHERE nspname = $1",
                [schema.into()],
            ))
            .await?
            .is_some();
        if !exists {
            return Err(err);
        }
    }
    db.close().await
}

/// PostgreSQL: what a batch's transaction does first, in one round trip. It takes the
/// advisory locks of the batch's (saga, step) keys in their order (`lock_keys`, sorted), with
/// `batch_lock_timeout` set for the rest of the transaction when not null, and then, each
/// statement of a `VOLATILE` function seeing what committed before it ran, returns the inbox
/// records of the `wanted` (saga, step) pairs, both directions.
///
/// The lookup keeps one plan per connection that reads the primary key whatever the table held
/// when it was made: planned afresh on every batch it cost the server a share of its time;
/// kept as the server's own generic plan, one made while the table was a few pages would scan
/// the whole table ever after (8 ms a batch at 8,000 records). The settings hold only while the
/// function runs: a handler's statements are planned as the server would.
const LOCK_AND_READ: &str = "saga_sdk_lock_and_read";
/// How a batch calls it: the keys as an array literal, the wanted pairs as JSON, the timeout.
pub(crate) const CALL_LOCK_AND_READ: &str =
    "SELECT * FROM saga_sdk_lock_and_read(CAST($1 AS bigint[]), $2, $3)";
const LOCK_AND_READ_SETTINGS: [(&str, &str); 4] = [
    ("plan_cache_mode", "force_generic_plan"),
    ("enable_seqscan", "off"),
    ("enable_hashjoin", "off"),
    ("enable_mergejoin", "off"),
];
const LOCK_AND_READ_BODY: &str = r#"
BEGIN
    IF batch_lock_timeout IS NOT NULL THEN
        PERFORM set_config('lock_timeout', batch_lock_timeout, true);
    END IF;
    PERFORM pg_advisory_xact_lock(k) FROM unnest(lock_keys) AS k ORDER BY k;
    RETURN QUERY SELECT i.* FROM jsonb_to_recordset(wanted) AS w(saga_id text, step text)
        JOIN saga_inbox i ON i.saga_id = w.saga_id AND i.step = w.step;
END
"#;

/// Serialises the migrations of a participant's processes starting together: two `CREATE
/// TABLE IF NOT EXISTS` at once can fail on a duplicate key of `pg_type`, and two `CREATE OR
/// REPLACE FUNCTION` with "tuple concurrently updated".
const MIGRATION_LOCK: i64 = 0x5a6a_5344_4b4d_4947;

/// Creates the SDK's own tables (and on PostgreSQL its function) if they do not exist yet. Run
/// by [`Participant::run`](crate::Participant::run) at start-up; idempotent.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    let backend = db.get_database_backend();
    let tx = db.begin().await?;
    if backend == DbBackend::Postgres {
        tx.execute_unprepared(&format!("SELECT pg_advisory_xact_lock({MIGRATION_LOCK})"))
            .await?;
    }
    let mut table = Schema::new(backend).create_table_from_entity(inbox::Entity);
    table.if_not_exists();
    tx.execute(&table).await?;
    // Pruning looks for old records: without a full scan.
    tx.execute_unprepared(
        r#"CREATE INDEX IF NOT EXISTS "saga_inbox_handled_at" ON "saga_inbox" ("handled_at")"#,
    )
    .await?;
    if backend == DbBackend::Postgres {
        create_lock_and_read(&tx).await?;
    }
    tx.commit().await
}

/// Creates [`LOCK_AND_READ`] unless the schema has it as this SDK writes it: a restart then
/// writes nothing (another role may own it), and no session's cached plan of it is dropped.
async fn create_lock_and_read(tx: &DatabaseTransaction) -> Result<(), DbErr> {
    // As `pg_proc.proconfig` holds them.
    let stored_settings = LOCK_AND_READ_SETTINGS
        .map(|(name, value)| format!("{name}={value}"))
        .join(",");
    let current = tx
        .query_one_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT 1 AS current FROM pg_proc \
             WHERE proname = $1 AND pronamespace = CAST(current_schema() AS regnamespace) \
               AND prosrc = $2 AND CAST(proconfig AS text) = $3",
            [
                LOCK_AND_READ.into(),
                LOCK_AND_READ_BODY.into(),
                format!("{{{stored_settings}}}").into(),
            ],
        ))
        .await?;
    if current.is_some() {
        return Ok(());
    }
    let settings = LOCK_AND_READ_SETTINGS
        .map(|(name, value)| format!("SET {name} = {value}"))
        .join(" ");
    tx.execute_unprepared(&format!(
        "CREATE OR REPLACE FUNCTION {LOCK_AND_READ}(\
             lock_keys bigint[], wanted jsonb, batch_lock_timeout text) \
         RETURNS SETOF saga_inbox LANGUAGE plpgsql VOLATILE {settings} \
         AS $fn${LOCK_AND_READ_BODY}$fn$"
    ))
    .await?;
    Ok(())
}

/// Deletes the records of commands handled before `handled_before`; returns how many.
pub async fn prune_inbox(
    db: &DatabaseConnection,
    handled_before: DateTime<Utc>,
) -> Result<u64, DbErr> {
    let key = || {
        Expr::tuple([
            Expr::col(inbox::Column::SagaId),
            Expr::col(inbox::Column::Step),
            Expr::col(inbox::Column::Direction),
        ])
    };
    let mut pruned = 0;
    loop {
        let oldest = Query::select()
            .columns([
                inbox::Column::SagaId,
                inbox::Column::Step,
                inbox::Column::Direction,
            ])
            .from(inbox::Entity)
            .and_where(Expr::col(inbox::Column::HandledAt).lt(handled_before))
            .limit(PRUNE_CHUNK)
            .to_owned();
        let deleted = inbox::Entity::delete_many()
            .filter(key().in_subquery(oldest))
            .exec(db)
            .await?
            .rows_affected;
        pruned += deleted;
        if deleted < PRUNE_CHUNK {
            return Ok(pruned);
        }
    }
}

/// Deletes records older than `retention` every [`PRUNE_EVERY`], the first time at once, until
/// `shutdown`. A failed pass is logged and tried again at the next one.
pub(crate) async fn prune_inbox_periodically(
    db: DatabaseConnection,
    retention: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let cutoff = chrono::TimeDelta::from_std(retention)
            .ok()
            .and_then(|retention| Utc::now().checked_sub_signed(retention))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        match prune_inbox(&db, cutoff).await {
            Ok(0) => {}
            Ok(pruned) => tracing::info!(pruned, ?retention, "forgot old handled commands"),
            Err(error) => tracing::warn!(%error, "cannot prune saga_inbox; trying again later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The de-duplication record of every command handled: one row per (saga, step, direction),
/// written in the same transaction as the handler's own writes.
pub mod inbox {
    use sea_orm::entity::prelude::*;

    #[derive(Clone, Debug, PartialEq, DeriveEntityModel)]
    #[sea_orm(table_name = "saga_inbox")]
    pub struct Model {
        #[sea_orm(primary_key, auto_increment = false)]
        pub saga_id: String,
        #[sea_orm(primary_key, auto_increment = false)]
        pub step: String,
        /// `execute` or `compensate`.
        #[sea_orm(primary_key, auto_increment = false)]
        pub direction: String,
        /// The action (or compensation) name of the command handled.
        pub action: String,
        /// `message_id` of the command that was handled first.
        pub message_id: String,
        /// Its attempt number.
        pub attempt: i32,
        /// The outcome given, as the JSON of [`saga_schemas::Outcome`]; every later copy of the
        /// command gets it again.
        pub outcome: Json,
        pub handled_at: DateTimeUtc,
    }

    #[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
    pub enum Relation {}

    impl ActiveModelBehavior for ActiveModel {}
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
