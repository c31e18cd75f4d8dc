//! What a participant writes: handlers for its actions and compensations.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use saga_schemas::{Data, Outcome, StepCommand};
use sea_orm::{DatabaseConnection, DatabaseTransaction, DbErr, RuntimeErr};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The future a [`Handler`] returns.
pub type HandlerFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Outcome, HandlerError>> + Send + 'a>>;

/// Handles one action or compensation.
///
/// It gets the command and a database transaction, writes through the transaction, and returns:
///
/// - `Ok(Outcome::Success { output })`: the writes commit together with the de-dup record;
///   `output` is merged into the saga data (for an action). An output the orchestrator could
///   not take (over [`saga_schemas::limits::MAX_DATA_BYTES`] as JSON, a NUL, nested too deep)
///   becomes a failure saying why, and the writes are rolled back.
/// - `Ok(Outcome::Failure { reason })`: a business outcome (declined, out of stock). Final: the
///   orchestrator does not retry it. The handler's writes are rolled back (a failure changes
///   nothing), and the failure is recorded so every copy of the command gets it again.
/// - `Err(HandlerError)` (or `Ok(Outcome::RetryableError { .. })`): a transient problem.
///   Everything rolls back and nothing is recorded, so the next attempt runs afresh.
///
/// Any `Fn(&StepCommand, &DatabaseTransaction) -> HandlerFuture` closure is a handler:
///
/// ```text
/// |cmd, tx| Box::pin(async move {
///     tx.execute_unprepared("...").await?;
///     Ok(saga_participant::success(serde_json::json!({ "payment_id": "P-1" })))
/// })
/// ```
///
/// A handler may run more than once for one command (a redelivery before the commit, or its
/// batch run again because another handler in it failed), its database writes undone in
/// between. A handler that must call something outside its database (a payment gateway) should
/// pass it an idempotency key derived from (`saga_id`, `step`), since that call is not rolled
/// back.
pub trait Handler: Send + Sync + 'static {
    fn handle<'a>(&'a self, cmd: &'a StepCommand, tx: &'a DatabaseTransaction)
    -> HandlerFuture<'a>;
}

impl<F> Handler for F
where
    F: for<'a> Fn(&'a StepCommand, &'a DatabaseTransaction) -> HandlerFuture<'a>
        + Send
        + Sync
        + 'static,
{
    fn handle<'a>(
        &'a self,
        cmd: &'a StepCommand,
        tx: &'a DatabaseTransaction,
    ) -> HandlerFuture<'a> {
        self(cmd, tx)
    }
}

/// The future a [`Migrations`] hook returns.
pub type MigrationFuture<'a> = Pin<Box<dyn Future<Output = Result<(), DbErr>> + Send + 'a>>;

/// Creates or upgrades the participant's own tables at start-up (after the SDK's own table).
/// Runs on every start, so it must be idempotent (`CREATE TABLE IF NOT EXISTS`, or a migrator
/// that records what it applied).
pub trait Migrations: Send + Sync + 'static {
    fn migrate<'a>(&'a self, db: &'a DatabaseConnection) -> MigrationFuture<'a>;
}

impl<F> Migrations for F
where
    F: for<'a> Fn(&'a DatabaseConnection) -> MigrationFuture<'a> + Send + Sync + 'static,
{
    fn migrate<'a>(&'a self, db: &'a DatabaseConnection) -> MigrationFuture<'a> {
        self(db)
    }
}

/// A retryable error: the handler could not do its work now (a database or a dependency is
/// down). The transaction rolls back and the orchestrator may send the command again.
///
/// Any `std::error::Error` converts into it, so `?` works on database errors.
pub struct HandlerError {
    message: String,
    /// The database gave up on the transaction because of another one (a deadlock, a lock
    /// wait past its limit, a serialisation failure): running it again, alone, will do.
    conflict: bool,
}

impl HandlerError {
    /// A retryable error with this message.
    pub fn retryable(message: impl fmt::Display) -> Self {
        HandlerError {
            message: message.to_string(),
            conflict: false,
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn is_conflict(&self) -> bool {
        self.conflict
    }
}

/// Whether `err` says the database gave up on the transaction because of another one:
/// PostgreSQL's deadlock (40P01), serialisation failure (40001) or lock timeout (55P03).
pub(crate) fn is_conflict(err: &DbErr) -> bool {
    let database_error = match err {
        DbErr::Query(RuntimeErr::SqlxError(e)) | DbErr::Exec(RuntimeErr::SqlxError(e)) => {
            e.as_database_error()
        }
        _ => None,
    };
    database_error.is_some_and(|e| {
        matches!(
            e.code().as_deref(),
            Some("40P01") | Some("40001") | Some("55P03")
        )
    })
}

impl<E: std::error::Error + Send + Sync + 'static> From<E> for HandlerError {
    fn from(err: E) -> Self {
        let conflict = (&err as &dyn std::any::Any)
            .downcast_ref::<DbErr>()
            .is_some_and(is_conflict);
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        HandlerError { message, conflict }
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HandlerError").field(&self.message).finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// `Outcome::Success` with `output`, which must serialise to a JSON object (anything else
/// gives an empty output and a warning).
pub fn success(output: impl Serialize) -> Outcome {
    let output = match serde_json::to_value(output) {
        Ok(serde_json::Value::Object(map)) => map,
        Ok(serde_json::Value::Null) => Data::new(),
        Ok(other) => {
            tracing::warn!(output = %other, "a step output must be a JSON object; sending {{}}");
            Data::new()
        }
        Err(err) => {
            tracing::warn!(error = %err, "cannot serialise a step output; sending {{}}");
            Data::new()
        }
    };
    Outcome::Success { output }
}

/// `Outcome::Failure` with `reason`: a business outcome, final.
pub fn failure(reason: impl fmt::Display) -> Outcome {
    Outcome::Failure {
        reason: reason.to_string(),
    }
}

/// Typed access to a command's JSON.
pub trait CommandExt {
    /// The saga data as `T`.
    fn data_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error>;
    /// On a compensation: the output of this step's own action, as `T` (an error when the
    /// command carries none).
    fn action_output_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error>;
}

impl CommandExt for StepCommand {
    fn data_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        T::deserialize(&serde_json::Value::Object(self.data.clone()))
    }

    fn action_output_as<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        match &self.action_output {
            Some(output) => T::deserialize(&serde_json::Value::Object(output.clone())),
            None => T::deserialize(&serde_json::Value::Null),
        }
    }
}
