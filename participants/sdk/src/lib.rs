//! The participant SDK: a service that takes part in sagas writes one handler per action and
//! per compensation; the SDK does the rest of the participant's duties from
//! `schemas/README.md` ("Writing a participant").
//!
//! ```no_run
//! use saga_participant::sea_orm::ConnectionTrait;
//! use saga_participant::{CancellationToken, CommandExt, Participant, SdkConfig, failure, success};
//!
//! #[derive(serde::Deserialize)]
//! struct Charge { amount: i64 }
//!
//! # async fn example() -> Result<(), saga_participant::Error> {
//! Participant::new("payments")
//!     .migrations(|db| Box::pin(async move {
//!         db.execute_unprepared("CREATE TABLE IF NOT EXISTS charges (saga_id TEXT, amount BIGINT)")
//!             .await?;
//!         Ok(())
//!     }))
//!     .action("charge", |cmd, tx| Box::pin(async move {
//!         let Ok(charge) = cmd.data_as::<Charge>() else {
//!             return Ok(failure("no amount"));
//!         };
//!         if charge.amount > 100_000 {
//!             return Ok(failure("card declined")); // a business failure: final
//!         }
//!         // Write through `tx`; `?` on a database error makes a retryable error.
//!         tx.execute_unprepared("INSERT INTO charges VALUES ('..', 0)").await?;
//!         Ok(success(serde_json::json!({ "payment_id": "P-1" })))
//!     }))
//!     .compensation("refund", |cmd, _tx| Box::pin(async move {
//!         let _payment = cmd.action_output.as_ref().and_then(|o| o.get("payment_id"));
//!         Ok(success(()))
//!     }))
//!     .run(SdkConfig::new("payments"), CancellationToken::new())
//!     .await
//! # }
//! ```
//!
//! What the SDK guarantees:
//!
//! - It declares its own queue topology (`saga.commands.<name>`, without dead-letter arguments
//!   so that commands the broker drops at their `expiration` vanish, and its `.dlq`) at start,
//!   so the participant can start before the orchestrator, and consumes it with manual acks and
//!   a bounded prefetch, handling up to `prefetch` commands at once.
//! - **Packed commands.** A message of several commands (`saga.step_commands`, from an
//!   orchestrator whose `PACK_COMMANDS` names this participant) is handled command by command,
//!   as if each had come alone; their replies go back in one message (`saga.step_replies`), and
//!   the message is acked once that is confirmed. A command in it that cannot be handled is
//!   dead-lettered alone, with why.
//! - **Group commit.** The commands waiting when a database transaction starts are handled in
//!   it together and share its commit: one fsync for many commands under load. No reply is
//!   published and no command acked before the commit; if the transaction fails, its commands
//!   are handled again one per transaction. Handlers write straight into that transaction;
//!   when one does not succeed, the batch is rolled back and runs again with each handler in a
//!   savepoint of its own (and the next batches too, until one has no failure), so one
//!   handler's failure undoes only its writes. A handler may therefore run more than once for
//!   one command, its database writes undone in between: what it calls outside its database
//!   needs an idempotency key (see [`Handler`]).
//! - **Exactly one effect per (saga, step, direction).** Each handled command is recorded in the
//!   table `saga_inbox` in the same transaction as the handler's writes. A redelivery or a retry
//!   (any attempt) of a recorded command does not run the handler again and gets the recorded
//!   outcome. Retryable errors roll back and are not recorded. Commands for the same saga step
//!   are serialised (SQLite: one writer; PostgreSQL: an advisory lock per saga step), and the
//!   inbox's primary key catches anything else.
//! - **Null compensation.** A compensation whose action never ran here (or failed) succeeds
//!   without running the handler, and is recorded; the action arriving later is refused with
//!   the failure `compensated before executed`.
//! - **The records do not pile up**: each is deleted after the inbox retention (a month by
//!   default, [`Participant::inbox_retention`]), once no command for its step can still come.
//! - **One round trip before the handlers (PostgreSQL).** A batch's locks and its inbox
//!   records come from one call of the SDK's function `saga_sdk_lock_and_read`, created at
//!   start-up beside `saga_inbox`. Its lookup goes by the inbox's key whatever the table held
//!   when its plan was made (a new participant's inbox was once scanned whole on every batch
//!   until the server analysed it); its planner settings hold only while it runs, so a
//!   handler's statements are planned as the server would.
//! - **Expired actions never start.** An action whose command carries an `expires_at` in the
//!   past, and that has no record yet, is not handed to its handler: the SDK records and answers
//!   the failure [`EXPIRED`] (`"expired"`), in the same transaction as the inbox record, so
//!   every later attempt of the step gets the same answer; its compensation is then a null
//!   compensation. This assumes the participant's clock agrees with the orchestrator's within a
//!   small fraction of the step's expiry.
//! - **Business failures change nothing**: the handler's writes are rolled back and only the
//!   failure is recorded.
//! - It acks a command only after its reply was confirmed by the broker. A message it cannot use
//!   (bad JSON, a body over the message limits of [`saga_schemas::limits`], missing or
//!   unsupported `x-schema-version`, no `reply_to`, unknown action, names too long for the
//!   reply's headers) goes to the dead-letter queue with the reason in `x-dead-letter-reason`,
//!   cut to 512 characters. So does a command whose reply the broker refused 5 times (its
//!   `reply_to` queue does not exist); its outcome stays recorded.
//! - **Replies stay readable.** An output over the saga data limit, or breaking a message limit
//!   (a NUL, nesting, a 64-bit integer), is answered as a `failure` saying why, and the
//!   handler's writes are rolled back: the step did not happen. Failure reasons and errors are
//!   cut to 512 characters, NUL replaced.
//! - It reconnects after the broker restarts, and on shutdown (the [`CancellationToken`]) stops
//!   consuming, lets in-flight commands finish, and returns.
//! - Every log line about a command carries `saga_id` (a tracing span per command).
//! - **Traces.** With an OTLP layer installed ([`trace::otlp_layer`], when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set), the span of each command is a child of the
//!   orchestrator's span for that step (the command's `traceparent`), its log lines carry
//!   `trace_id`, and the reply carries the span's context back.

mod db;
mod handler;
mod process;
mod worker;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use sea_orm::{DatabaseConnection, DatabaseTransaction};

pub use db::{
    DEFAULT_DATABASE_POOL_SIZE, DEFAULT_INBOX_RETENTION, connect as connect_database,
    connect_with_pool, inbox, migrate as migrate_sdk_tables, prune_inbox,
};
pub use handler::{
    CommandExt, Handler, HandlerError, HandlerFuture, MigrationFuture, Migrations, failure, success,
};
pub use process::COMPENSATED_BEFORE_EXECUTED;
/// A [`CancellationToken`] cancelled on SIGTERM or Ctrl-C, for [`Participant::run`].
pub use saga_amqp::{QueueType, SecretUrl, async_runtime, shutdown_on_signal, trace};
pub use saga_schemas::{Data, Direction, EXPIRED, Outcome, StepCommand, StepReply};
pub use sea_orm;
pub use tokio_util::sync::CancellationToken;

/// Default AMQP URL: a local broker, default vhost.
pub use saga_amqp::DEFAULT_AMQP_URL;
/// Default prefetch: unacknowledged commands in flight at once.
pub const DEFAULT_PREFETCH: u16 = 32;

/// Database transactions at once, at most, on PostgreSQL unless configured otherwise
/// ([`SdkConfig::database_transactions`]): enough for slow handlers not to hold up every other
/// command. Under load one runs at a time all the same (see there), so commands share commits.
pub const DEFAULT_POSTGRES_TRANSACTIONS: u32 = 4;

/// Where the participant connects, and how much it takes on at once.
#[derive(Debug, Clone)]
pub struct SdkConfig {
    /// The broker, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub amqp_url: SecretUrl,
    /// The participant's own database: `sqlite://<file>?mode=rwc` or `postgres://...`.
    pub database_url: SecretUrl,
    /// PostgreSQL only: a schema of the participant's own, created if missing and set as the
    /// `search_path` of every pooled connection.
    pub database_schema: Option<String>,
    /// PostgreSQL only: the most connections the pool opens; `None` for
    /// [`DEFAULT_DATABASE_POOL_SIZE`]. SQLite always uses one.
    pub database_pool_size: Option<u32>,
    /// Unacknowledged commands in flight at once (the AMQP prefetch).
    pub prefetch: u16,
    /// Database transactions at once, at most. Each takes every command waiting when it starts
    /// (up to `prefetch`) and commits them together, so under load many commands share one
    /// commit (group commit). A transaction begins beside a running one only if that one has
    /// not ended within 10 ms (a slow handler); otherwise it begins when that one ends, with
    /// every command that came meanwhile. `None`: 1 on SQLite (one writer anyway),
    /// [`DEFAULT_POSTGRES_TRANSACTIONS`] on PostgreSQL. Keep it below the PostgreSQL pool size.
    pub database_transactions: Option<u32>,
    /// The connection name shown in the management UI; `None` for `<participant>@<host>:<pid>`.
    pub connection_name: Option<String>,
    /// A PEM file of CA certificates to trust for an `amqps://` broker besides the built-in
    /// roots (a private CA); read when [`Participant::run`] starts.
    pub amqp_ca_file: Option<std::path::PathBuf>,
    /// The type of the queues the participant declares: quorum (the default) or classic, as
    /// the orchestrator's.
    pub queue_type: QueueType,
}

impl SdkConfig {
    /// The defaults for `participant`: a local broker, SQLite file `<participant>.db` in the
    /// working directory, prefetch 32.
    pub fn new(participant: &str) -> Self {
        SdkConfig {
            amqp_url: DEFAULT_AMQP_URL.into(),
            database_url: default_database_url(participant).into(),
            database_schema: None,
            database_pool_size: None,
            prefetch: DEFAULT_PREFETCH,
            database_transactions: None,
            connection_name: None,
            amqp_ca_file: None,
            queue_type: QueueType::Quorum,
        }
    }
}

/// `sqlite://<participant>.db?mode=rwc`.
pub fn default_database_url(participant: &str) -> String {
    format!("sqlite://{participant}.db?mode=rwc")
}

/// `<participant>@<hostname>:<pid>`.
pub use saga_amqp::default_connection_name;

/// Why [`Participant::run`] stopped before its shutdown token was cancelled.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The participant is set up wrongly (a bad name, no handlers, a bad prefetch).
    #[error("invalid participant configuration: {0}")]
    Config(String),
    /// The database could not be opened or migrated at start-up.
    #[error("database error at start-up")]
    Database(#[from] sea_orm::DbErr),
    /// The broker could not be used in a way that reconnecting does not fix.
    #[error("AMQP error")]
    Amqp(#[from] saga_amqp::AmqpError),
}

/// A participant: a name, handlers, and start-up migrations. Build it, then [`run`](Self::run).
pub struct Participant {
    name: String,
    actions: BTreeMap<String, Arc<dyn Handler>>,
    compensations: BTreeMap<String, Arc<dyn Handler>>,
    migrations: Vec<Arc<dyn Migrations>>,
    inbox_retention: Duration,
}

impl Participant {
    /// A participant consuming `saga.commands.<name>`; `name` is the `participant` of its steps
    /// in the orchestrator's definition file.
    pub fn new(name: impl Into<String>) -> Self {
        Participant {
            name: name.into(),
            actions: BTreeMap::new(),
            compensations: BTreeMap::new(),
            migrations: Vec::new(),
            inbox_retention: DEFAULT_INBOX_RETENTION,
        }
    }

    /// How long the record of a handled command is kept in `saga_inbox` before it is deleted
    /// (default [`DEFAULT_INBOX_RETENTION`], a month, which says why that is safe): make it
    /// longer than any saga may wait before it compensates a step done here.
    pub fn inbox_retention(mut self, retention: Duration) -> Self {
        self.inbox_retention = retention;
        self
    }

    /// The participant's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Handles commands with `direction: execute` and `action: <name>`, with a closure
    /// `|cmd, tx| Box::pin(async move { ... })` (see [`Handler`]).
    pub fn action<F>(self, name: impl Into<String>, handler: F) -> Self
    where
        F: for<'a> Fn(&'a StepCommand, &'a DatabaseTransaction) -> HandlerFuture<'a>
            + Send
            + Sync
            + 'static,
    {
        self.action_handler(name, handler)
    }

    /// Like [`action`](Self::action), with any [`Handler`] implementation.
    pub fn action_handler(mut self, name: impl Into<String>, handler: impl Handler) -> Self {
        self.actions.insert(name.into(), Arc::new(handler));
        self
    }

    /// Handles commands with `direction: compensate` and `action: <name>` (the step's
    /// `compensation` in the definition file). `cmd.action_output` holds what the action
    /// returned. It runs only if the action succeeded here; otherwise the SDK answers with a
    /// null compensation itself.
    pub fn compensation<F>(self, name: impl Into<String>, handler: F) -> Self
    where
        F: for<'a> Fn(&'a StepCommand, &'a DatabaseTransaction) -> HandlerFuture<'a>
            + Send
            + Sync
            + 'static,
    {
        self.compensation_handler(name, handler)
    }

    /// Like [`compensation`](Self::compensation), with any [`Handler`] implementation.
    pub fn compensation_handler(mut self, name: impl Into<String>, handler: impl Handler) -> Self {
        self.compensations.insert(name.into(), Arc::new(handler));
        self
    }

    /// Adds a start-up hook creating the participant's own tables (run after the SDK's own, in
    /// the order added, on every start: make it idempotent).
    ///
    /// ```text
    /// .migrations(|db| Box::pin(async move {
    ///     db.execute_unprepared("CREATE TABLE IF NOT EXISTS ...").await?;
    ///     Ok(())
    /// }))
    /// ```
    pub fn migrations<F>(self, migrations: F) -> Self
    where
        F: for<'a> Fn(&'a DatabaseConnection) -> MigrationFuture<'a> + Send + Sync + 'static,
    {
        self.migrations_with(migrations)
    }

    /// Like [`migrations`](Self::migrations), with any [`Migrations`] implementation (e.g. a
    /// wrapper around a `sea-orm-migration` migrator).
    pub fn migrations_with(mut self, migrations: impl Migrations) -> Self {
        self.migrations.push(Arc::new(migrations));
        self
    }

    /// The action names and compensation names this participant handles.
    pub fn handled_actions(&self) -> (Vec<&str>, Vec<&str>) {
        (
            self.actions.keys().map(String::as_str).collect(),
            self.compensations.keys().map(String::as_str).collect(),
        )
    }

    /// Opens and migrates the database, then consumes commands until `shutdown` is cancelled,
    /// reconnecting to the broker whenever the connection is lost. Returns `Ok(())` after a
    /// clean shutdown (in-flight commands finished), or an error that reconnecting cannot fix.
    pub async fn run(self, config: SdkConfig, shutdown: CancellationToken) -> Result<(), Error> {
        self.validate(&config)?;
        let db = db::connect_with_pool(
            &config.database_url,
            config.database_schema.as_deref(),
            config.database_pool_size,
        )
        .await?;
        db::migrate(&db).await?;
        for migrations in &self.migrations {
            migrations.migrate(&db).await?;
        }
        tracing::info!(
            participant = %self.name,
            actions = ?self.actions.keys().collect::<Vec<_>>(),
            compensations = ?self.compensations.keys().collect::<Vec<_>>(),
            "database ready"
        );
        // Stopped with the worker, whether it ends by shutdown or by an error.
        let stop_pruning = shutdown.child_token();
        let pruning = tokio::spawn(db::prune_inbox_periodically(
            db.clone(),
            self.inbox_retention,
            stop_pruning.clone(),
        ));
        let result = worker::run(Arc::new(self), db.clone(), config, shutdown).await;
        stop_pruning.cancel();
        if let Err(err) = pruning.await {
            tracing::warn!(error = %err, "the inbox pruning task failed");
        }
        if let Err(err) = db.close().await {
            tracing::warn!(error = %err, "closing the database");
        }
        result
    }

    fn validate(&self, config: &SdkConfig) -> Result<(), Error> {
        if !saga_schemas::definition::is_participant_name(&self.name) {
            return Err(Error::Config(format!(
                "participant name {:?}: use letters, digits, `.`, `_` and `-`",
                self.name
            )));
        }
        if self.actions.is_empty() && self.compensations.is_empty() {
            return Err(Error::Config(format!(
                "participant {} has no handlers",
                self.name
            )));
        }
        if config.prefetch == 0 {
            return Err(Error::Config("prefetch must be at least 1".into()));
        }
        if config.database_transactions == Some(0) {
            return Err(Error::Config(
                "database transactions at once must be at least 1".into(),
            ));
        }
        Ok(())
    }

    pub(crate) fn handler(&self, direction: Direction, action: &str) -> Option<&Arc<dyn Handler>> {
        match direction {
            Direction::Execute => self.actions.get(action),
            Direction::Compensate => self.compensations.get(action),
        }
    }
}
