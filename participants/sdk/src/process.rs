//! Handling one decoded command exactly once per (saga, step, direction): the de-dup check,
//! the handler, and the inbox record, in one database transaction.

use std::panic::AssertUnwindSafe;

use futures_util::FutureExt;
use saga_schemas::limits::{self, LimitError, MAX_DATA_BYTES, MAX_DEPTH};
use saga_schemas::{Data, Direction, Outcome, StepCommand};
use sea_orm::{
    ActiveValue, ColumnTrait, ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbBackend,
    DbErr, EntityTrait, QueryFilter, SqlErr, SqliteTransactionMode, Statement, TransactionOptions,
    TransactionTrait,
};

use crate::db::inbox;
use crate::handler::Handler;

/// The reason given to an action that arrives after its compensation was recorded.
pub const COMPENSATED_BEFORE_EXECUTED: &str = "compensated before executed";

/// How deep a step's output sits in its reply (`{"outcome": {"output": …}}`): the whole reply
/// must stay within [`MAX_DEPTH`].
const OUTPUT_DEPTH_IN_REPLY: usize = 2;

/// How a command was answered.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Handled {
    /// The handler ran (or a null compensation / refusal was decided) and the outcome committed.
    Fresh(Outcome),
    /// The command was handled before: its recorded outcome.
    Recorded(Outcome),
    /// Nothing was committed: a retryable error from the handler or the database.
    Retryable(String),
}

impl Handled {
    pub(crate) fn outcome(self) -> Outcome {
        match self {
            Handled::Fresh(outcome) | Handled::Recorded(outcome) => outcome,
            Handled::Retryable(error) => Outcome::RetryableError { error },
        }
    }
}

/// Runs `cmd` through the inbox and, if it is new, through `handler`.
pub(crate) async fn process(
    db: &DatabaseConnection,
    cmd: &StepCommand,
    handler: &dyn Handler,
) -> Handled {
    // A unique violation on the inbox means a concurrent copy of the command committed first:
    // go round again, and the second round finds its record.
    for _ in 0..3 {
        match attempt(db, cmd, handler).await {
            Ok(handled) => return handled,
            Err(err) if matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                tracing::info!(
                    "a concurrent copy of the command committed first; reloading its outcome"
                );
            }
            Err(err) => {
                tracing::warn!(error = %err, "database error while handling the command");
                return Handled::Retryable(format!("participant database error: {err}"));
            }
        }
    }
    Handled::Retryable("the command's inbox record keeps conflicting".into())
}

async fn attempt(
    db: &DatabaseConnection,
    cmd: &StepCommand,
    handler: &dyn Handler,
) -> Result<Handled, DbErr> {
    let backend = db.get_database_backend();
    let tx = db
        .begin_with_options(TransactionOptions {
            // SQLite: take the write lock now, not at the first write, so two transactions
            // never both read and then both try to upgrade.
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..Default::default()
        })
        .await?;
    if backend == DbBackend::Postgres {
        // Serialises every command for one (saga, step), whatever its direction, so an action
        // and its compensation racing each other see each other's record.
        tx.execute_raw(Statement::from_sql_and_values(
            DbBackend::Postgres,
            "SELECT pg_advisory_xact_lock($1)",
            [lock_key(cmd).into()],
        ))
        .await?;
    }

    let records = inbox::Entity::find()
        .filter(inbox::Column::SagaId.eq(cmd.saga_id.to_string()))
        .filter(inbox::Column::Step.eq(cmd.step.clone()))
        .all(&tx)
        .await?;
    let record = |direction: Direction| records.iter().find(|r| r.direction == direction.as_str());

    if let Some(found) = record(cmd.direction) {
        tx.rollback().await?;
        return match serde_json::from_value::<Outcome>(found.outcome.clone()) {
            Ok(outcome) => {
                tracing::info!(
                    first_attempt = found.attempt,
                    "duplicate command: answering with the recorded outcome"
                );
                Ok(Handled::Recorded(outcome))
            }
            Err(err) => Ok(Handled::Retryable(format!(
                "the recorded outcome cannot be read: {err}"
            ))),
        };
    }

    let now = chrono::Utc::now();
    let outcome = match cmd.direction {
        Direction::Execute if record(Direction::Compensate).is_some() => {
            tracing::warn!("the action arrived after its compensation: refusing it");
            Outcome::Failure {
                reason: COMPENSATED_BEFORE_EXECUTED.into(),
            }
        }
        // The orchestrator may have given up on the step: never start it late. The refusal is
        // recorded below, so every later attempt gets the same definitive answer.
        Direction::Execute if cmd.expires_at.is_some_and(|at| at < now) => {
            tracing::warn!(
                expires_at = ?cmd.expires_at,
                "the action expired before it could start: refusing it"
            );
            Outcome::Failure {
                reason: saga_schemas::EXPIRED.into(),
            }
        }
        Direction::Compensate
            if !record(Direction::Execute).is_some_and(|r| {
                r.outcome.get("status").and_then(|s| s.as_str()) == Some("success")
            }) =>
        {
            tracing::info!(
                "nothing to compensate (the action never ran here or failed): null compensation"
            );
            Outcome::Success {
                output: Data::new(),
            }
        }
        _ => match run_handler(&tx, cmd, handler).await? {
            Ok(outcome) => outcome,
            Err(error) => {
                tx.rollback().await?;
                return Ok(Handled::Retryable(error));
            }
        },
    };

    let outcome_json = serde_json::to_value(&outcome).map_err(|e| DbErr::Custom(e.to_string()))?;
    inbox::Entity::insert(inbox::ActiveModel {
        saga_id: ActiveValue::Set(cmd.saga_id.to_string()),
        step: ActiveValue::Set(cmd.step.clone()),
        direction: ActiveValue::Set(cmd.direction.as_str().into()),
        action: ActiveValue::Set(cmd.action.clone()),
        message_id: ActiveValue::Set(cmd.message_id.to_string()),
        attempt: ActiveValue::Set(i32::try_from(cmd.attempt).unwrap_or(i32::MAX)),
        outcome: ActiveValue::Set(outcome_json),
        handled_at: ActiveValue::Set(chrono::Utc::now()),
    })
    .exec_without_returning(&tx)
    .await?;
    tx.commit().await?;
    Ok(Handled::Fresh(outcome))
}

/// Runs the handler inside a savepoint: its writes are kept on success and undone on a
/// business failure. `Ok(Err(_))` is a retryable error (the caller rolls everything back).
async fn run_handler(
    tx: &DatabaseTransaction,
    cmd: &StepCommand,
    handler: &dyn Handler,
) -> Result<Result<Outcome, String>, DbErr> {
    let savepoint = tx.begin().await?;
    let result = AssertUnwindSafe(handler.handle(cmd, &savepoint))
        .catch_unwind()
        .await;
    match result {
        Ok(Ok(Outcome::Success { output })) => match check_output(&output) {
            Ok(()) => {
                savepoint.commit().await?;
                Ok(Ok(Outcome::Success { output }))
            }
            // The orchestrator could not take it: the step did not happen.
            Err(reason) => {
                savepoint.rollback().await?;
                tracing::warn!(%reason, "the handler's output breaks a limit: answering a failure");
                Ok(Ok(Outcome::Failure { reason }))
            }
        },
        Ok(Ok(Outcome::Failure { reason })) => {
            savepoint.rollback().await?;
            let reason = clean(&reason);
            tracing::info!(reason = %reason, "business failure");
            Ok(Ok(Outcome::Failure { reason }))
        }
        Ok(Ok(Outcome::RetryableError { error })) => {
            savepoint.rollback().await?;
            let error = clean(&error);
            tracing::warn!(error = %error, "retryable error");
            Ok(Err(error))
        }
        Ok(Err(err)) => {
            savepoint.rollback().await?;
            let error = clean(err.message());
            tracing::warn!(error = %error, "retryable error");
            Ok(Err(error))
        }
        Err(panic) => {
            savepoint.rollback().await?;
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            let error = clean(&format!("the handler panicked: {message}"));
            tracing::error!(%error, "the handler panicked");
            Ok(Err(error))
        }
    }
}

/// Why a step's output cannot go in a reply, if it cannot: larger than the saga data limit, or
/// breaking a message limit (a NUL, nesting, an integer beyond 64 bits) that would make the
/// reply unreadable to the orchestrator.
fn check_output(output: &Data) -> Result<(), String> {
    let json = serde_json::to_vec(output).map_err(|e| format!("the step's output: {e}"))?;
    match limits::check_json_with(&json, MAX_DATA_BYTES, MAX_DEPTH - OUTPUT_DEPTH_IN_REPLY) {
        Ok(()) => Ok(()),
        Err(LimitError::TooLarge { bytes, limit }) => Err(format!(
            "the step's output is {bytes} bytes as JSON; the limit is {limit}"
        )),
        Err(other) => Err(format!("the step's output is refused: {other}")),
    }
}

/// A handler's reason or error as it can travel in a reply: cut to the limit, without NUL (which
/// no reply may carry).
fn clean(text: &str) -> String {
    limits::reason(&text.replace('\0', "\u{FFFD}"))
}

/// A 64-bit key for `pg_advisory_xact_lock`, stable across processes.
fn lock_key(cmd: &StepCommand) -> i64 {
    let id = uuid::Uuid::new_v5(&cmd.saga_id, cmd.step.as_bytes());
    let bytes: [u8; 8] = id.as_bytes()[..8].try_into().expect("16 bytes");
    i64::from_be_bytes(bytes)
}
