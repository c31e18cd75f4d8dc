//! Handling decoded commands exactly once per (saga, step, direction): the de-dup check, the
//! handler, and the inbox record, in one database transaction, shared by the commands that
//! arrive together (group commit).

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use saga_schemas::limits::{self, LimitError, MAX_DATA_BYTES, MAX_DEPTH};
use saga_schemas::{Data, Direction, Outcome, StepCommand};
use sea_orm::{
    ActiveValue, ColumnTrait, Condition, ConnectionTrait, DatabaseConnection, DatabaseTransaction,
    DbBackend, DbErr, EntityTrait, QueryFilter, SqlErr, SqliteTransactionMode, Statement,
    TransactionOptions, TransactionTrait,
};

use tokio::sync::{Notify, mpsc, oneshot};
use uuid::Uuid;

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

/// Whether each handler runs in a savepoint of its own. Without one, a handler writes straight
/// into the batch's transaction, two statements fewer per command; but its writes cannot then be
/// undone alone, so a handler that does not succeed rolls the whole batch back and the batch
/// runs again, a savepoint each. Savepoints stay on while handlers keep failing (a participant
/// that declines every other command does not pay for two runs each time) and go off after a
/// batch in which every handler succeeded.
#[derive(Debug, Default)]
pub(crate) struct Savepoints(AtomicBool);

impl Savepoints {
    fn on(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, on: bool) {
        self.0.store(on, Ordering::Relaxed);
    }
}

/// One command waiting for its transaction.
pub(crate) struct Job {
    pub(crate) cmd: Arc<StepCommand>,
    pub(crate) handler: Arc<dyn Handler>,
    pub(crate) done: oneshot::Sender<Handled>,
}

/// Group commit: commands received at about the same time are handled in one database
/// transaction, so they share its commit (one fsync) instead of paying one each.
///
/// Up to `transactions` workers; a free one takes every command waiting (up to `max_batch`)
/// when the [`Gate`] lets it begin, so a batch grows with the load and a lone command goes
/// alone at once. Every command of a batch is answered only after the batch committed.
#[derive(Clone)]
pub(crate) struct Committer {
    jobs: mpsc::UnboundedSender<Job>,
}

/// How long commands wait for the running transaction to end before another begins beside it.
/// A batch of no-op handlers takes a few milliseconds on a busy machine; a handler slower than
/// this (a call to another service, say) holds up the others no longer than this.
const STALL: Duration = Duration::from_millis(10);

/// When a free worker may begin a transaction: at once when none is running; otherwise when one
/// ends, taking every command that arrived meanwhile into one commit, or after its `stall` if
/// none ends by then. Beginning beside a running transaction instead, as soon as a command
/// came, made most batches one command long under load: on PostgreSQL twice as many
/// transactions (five round trips each) and 10-20% more of the server's CPU per saga.
struct Gate {
    running: AtomicUsize,
    ended: Notify,
    stall: Duration,
}

/// A transaction begun through the [`Gate`]; dropping it lets the next one begin.
struct Running<'a>(&'a Gate);

impl Gate {
    fn new(stall: Duration) -> Self {
        Gate {
            running: AtomicUsize::new(0),
            ended: Notify::new(),
            stall,
        }
    }

    async fn begin(&self) -> Running<'_> {
        let ended = self.ended.notified();
        tokio::pin!(ended);
        // Registered before the count is read: an end in between still wakes it.
        ended.as_mut().enable();
        if self.running.load(Ordering::SeqCst) > 0 {
            tokio::select! {
                () = ended => {}
                () = tokio::time::sleep(self.stall) => {}
            }
        }
        self.running.fetch_add(1, Ordering::SeqCst);
        Running(self)
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::SeqCst);
        self.0.ended.notify_waiters();
    }
}

impl Committer {
    pub(crate) fn start(db: DatabaseConnection, transactions: usize, max_batch: usize) -> Self {
        let (jobs, receiver) = mpsc::unbounded_channel::<Job>();
        let receiver = Arc::new(tokio::sync::Mutex::new(receiver));
        let savepoints = Arc::new(Savepoints::default());
        let gate = Arc::new(Gate::new(STALL));
        for _ in 0..transactions.max(1) {
            let db = db.clone();
            let receiver = receiver.clone();
            let savepoints = savepoints.clone();
            let gate = gate.clone();
            // Ends when every sender (the workers' handles) is dropped.
            tokio::spawn(async move {
                loop {
                    let mut batch = Vec::new();
                    let running = {
                        let mut receiver = receiver.lock().await;
                        match receiver.recv().await {
                            Some(job) => batch.push(job),
                            None => return,
                        }
                        // Still holding the receiver: what arrives while waiting joins this batch.
                        let running = gate.begin().await;
                        while batch.len() < max_batch.max(1) {
                            match receiver.try_recv() {
                                Ok(job) => batch.push(job),
                                Err(_) => break,
                            }
                        }
                        running
                    };
                    // Handlers' panics are caught in `run_handler`; anything else that panics
                    // fails this batch's commands (retryable), not every command after it.
                    if AssertUnwindSafe(run_batch(&db, &savepoints, batch))
                        .catch_unwind()
                        .await
                        .is_err()
                    {
                        tracing::error!(
                            "a batch of commands panicked; they are answered retryable"
                        );
                    }
                    drop(running);
                }
            });
        }
        Committer { jobs }
    }

    /// Handles `cmd` with `handler` in the next batch.
    pub(crate) async fn process(
        &self,
        cmd: Arc<StepCommand>,
        handler: Arc<dyn Handler>,
    ) -> Handled {
        let (done, result) = oneshot::channel();
        if self.jobs.send(Job { cmd, handler, done }).is_err() {
            return Handled::Retryable("the participant is stopping".into());
        }
        // Dropped unanswered only by a batch that panicked: nothing of it committed.
        result.await.unwrap_or_else(|_| {
            Handled::Retryable("the command's transaction failed unexpectedly".into())
        })
    }
}

async fn run_batch(db: &DatabaseConnection, savepoints: &Savepoints, jobs: Vec<Job>) {
    let answers = if jobs.len() == 1 {
        None
    } else {
        let commands: Vec<(&StepCommand, &dyn Handler)> = jobs
            .iter()
            .map(|job| (job.cmd.as_ref(), job.handler.as_ref()))
            .collect();
        match attempt(db, savepoints, &commands).await {
            Ok(answers) => Some(answers),
            Err(err) => {
                // Nothing of the batch committed: each command goes alone, so one command's
                // trouble is not the others'.
                tracing::info!(error = %err, commands = jobs.len(), "a batch failed; handling its commands one by one");
                None
            }
        }
    };
    match answers {
        Some(answers) => {
            for (job, handled) in jobs.into_iter().zip(answers) {
                let _ = job.done.send(handled);
            }
        }
        None => {
            for job in jobs {
                let handled = process(db, savepoints, &job.cmd, job.handler.as_ref()).await;
                let _ = job.done.send(handled);
            }
        }
    }
}

/// How long a transaction of several commands waits for a lock (PostgreSQL) before it gives up
/// and its commands run one per transaction, which wait as long as it takes. Two batches whose
/// handlers lock the same rows in different orders would otherwise wait for the server's
/// deadlock check (`deadlock_timeout`, 1 s by default) before one of them failed.
const BATCH_LOCK_TIMEOUT: &str = "50ms";

/// What a transaction given up for another one fails with (see [`conflicted`]).
const CONFLICT: &str = "given up for a concurrent transaction";

/// Whether `err` says the database gave up on the transaction because of another one: run it
/// again (alone, if it was a batch), rather than answer a retryable error, which would count
/// against the step's retries.
fn conflicted(err: &DbErr) -> bool {
    crate::handler::is_conflict(err) || matches!(err, DbErr::Custom(m) if m.starts_with(CONFLICT))
}

/// Runs `cmd` through the inbox and, if it is new, through `handler`, in a transaction of its
/// own.
pub(crate) async fn process(
    db: &DatabaseConnection,
    savepoints: &Savepoints,
    cmd: &StepCommand,
    handler: &dyn Handler,
) -> Handled {
    // A unique violation on the inbox means a concurrent copy of the command committed first:
    // go round again, and the second round finds its record. A deadlock's loser goes round
    // again too.
    for _ in 0..3 {
        match attempt(db, savepoints, &[(cmd, handler)]).await {
            Ok(mut handled) => return handled.pop().expect("one answer per command"),
            Err(err) if matches!(err.sql_err(), Some(SqlErr::UniqueConstraintViolation(_))) => {
                tracing::info!(
                    "a concurrent copy of the command committed first; reloading its outcome"
                );
            }
            Err(err) if conflicted(&err) => {
                tracing::info!(error = %err, "the database gave the command's transaction up for another one; running it again");
            }
            Err(err) => {
                tracing::warn!(error = %err, "database error while handling the command");
                return Handled::Retryable(format!("participant database error: {err}"));
            }
        }
    }
    Handled::Retryable(
        "the command's transaction keeps conflicting with others (its inbox record, or locks)"
            .into(),
    )
}

/// The inbox key of a command.
type Key = (Uuid, String, Direction);

/// Handles `commands` in one transaction: one answer each, in order, committed together.
async fn attempt(
    db: &DatabaseConnection,
    savepoints: &Savepoints,
    commands: &[(&StepCommand, &dyn Handler)],
) -> Result<Vec<Handled>, DbErr> {
    if !savepoints.on()
        && let Some((answers, _)) = attempt_with(db, commands, false).await?
    {
        return Ok(answers);
    }
    let (answers, a_handler_failed) = attempt_with(db, commands, true)
        .await?
        .ok_or_else(|| DbErr::Custom("a batch with savepoints gave no answers".into()))?;
    savepoints.set(a_handler_failed);
    Ok(answers)
}

/// [`attempt`], each handler in a savepoint if `savepoints`; the answers and whether a handler
/// did not succeed. Without savepoints, `None` when a handler did not succeed: then nothing
/// was committed.
async fn attempt_with(
    db: &DatabaseConnection,
    commands: &[(&StepCommand, &dyn Handler)],
    savepoints: bool,
) -> Result<Option<(Vec<Handled>, bool)>, DbErr> {
    let backend = db.get_database_backend();
    let mut savepoint = HandlerSavepoint::default();
    let tx = db
        .begin_with_options(TransactionOptions {
            // SQLite: take the write lock now, not at the first write, so two transactions
            // never both read and then both try to upgrade.
            sqlite_transaction_mode: Some(SqliteTransactionMode::Immediate),
            ..Default::default()
        })
        .await?;
    // By (saga, step), both directions.
    let mut steps: Vec<(String, &str)> = commands
        .iter()
        .map(|(cmd, _)| (cmd.saga_id.to_string(), cmd.step.as_str()))
        .collect();
    steps.sort_unstable();
    steps.dedup();
    let found = if backend == DbBackend::Postgres {
        // Serialises every command for one (saga, step), whatever its direction, so an action
        // and its compensation racing each other see each other's record. Taken in key order,
        // so two batches never wait on each other in a cycle; then the records, in the same
        // round trip (see `db::LOCK_AND_READ`).
        let mut keys: Vec<i64> = commands.iter().map(|(cmd, _)| lock_key(cmd)).collect();
        keys.sort_unstable();
        keys.dedup();
        let keys = keys
            .iter()
            .map(i64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let wanted: serde_json::Value = steps
            .iter()
            .map(|(saga_id, step)| serde_json::json!({"saga_id": saga_id, "step": step}))
            .collect();
        let lock_timeout = (commands.len() > 1).then(|| BATCH_LOCK_TIMEOUT.to_owned());
        inbox::Entity::find()
            .from_raw_sql(Statement::from_sql_and_values(
                DbBackend::Postgres,
                crate::db::CALL_LOCK_AND_READ,
                [
                    format!("{{{keys}}}").into(),
                    wanted.into(),
                    lock_timeout.into(),
                ],
            ))
            .all(&tx)
            .await?
    } else {
        // Equality on two key columns is what the planner takes for an index lookup.
        let of_these_steps = steps
            .into_iter()
            .fold(Condition::any(), |any, (saga_id, step)| {
                any.add(
                    Condition::all()
                        .add(inbox::Column::SagaId.eq(saga_id))
                        .add(inbox::Column::Step.eq(step)),
                )
            });
        inbox::Entity::find()
            .filter(of_these_steps)
            .all(&tx)
            .await?
    };
    let mut records: HashMap<Key, (serde_json::Value, i32)> = found
        .into_iter()
        .filter_map(|r| {
            let saga_id = Uuid::parse_str(&r.saga_id).ok()?;
            let direction = [Direction::Execute, Direction::Compensate]
                .into_iter()
                .find(|d| d.as_str() == r.direction)?;
            Some(((saga_id, r.step, direction), (r.outcome, r.attempt)))
        })
        .collect();

    let mut answers = Vec::with_capacity(commands.len());
    let mut new_records = Vec::new();
    let mut a_handler_failed = false;
    for (cmd, handler) in commands {
        let key = |direction| (cmd.saga_id, cmd.step.clone(), direction);
        if let Some((outcome, first_attempt)) = records.get(&key(cmd.direction)) {
            answers.push(match serde_json::from_value::<Outcome>(outcome.clone()) {
                Ok(outcome) => {
                    tracing::info!(
                        saga_id = %cmd.saga_id,
                        first_attempt,
                        "duplicate command: answering with the recorded outcome"
                    );
                    Handled::Recorded(outcome)
                }
                Err(err) => {
                    Handled::Retryable(format!("the recorded outcome cannot be read: {err}"))
                }
            });
            continue;
        }
        let now = chrono::Utc::now();
        let outcome = match cmd.direction {
            Direction::Execute if records.contains_key(&key(Direction::Compensate)) => {
                tracing::warn!(saga_id = %cmd.saga_id, "the action arrived after its compensation: refusing it");
                Outcome::Failure {
                    reason: COMPENSATED_BEFORE_EXECUTED.into(),
                }
            }
            // The orchestrator may have given up on the step: never start it late. The refusal
            // is recorded below, so every later attempt gets the same definitive answer.
            Direction::Execute if cmd.expires_at.is_some_and(|at| at < now) => {
                tracing::warn!(
                    saga_id = %cmd.saga_id,
                    expires_at = ?cmd.expires_at,
                    "the action expired before it could start: refusing it"
                );
                Outcome::Failure {
                    reason: saga_schemas::EXPIRED.into(),
                }
            }
            Direction::Compensate
                if !records
                    .get(&key(Direction::Execute))
                    .is_some_and(|(outcome, _)| {
                        outcome.get("status").and_then(|s| s.as_str()) == Some("success")
                    }) =>
            {
                tracing::info!(
                    saga_id = %cmd.saga_id,
                    "nothing to compensate (the action never ran here or failed): null compensation"
                );
                Outcome::Success {
                    output: Data::new(),
                }
            }
            _ if !savepoints => match run_direct(&tx, cmd, *handler).await? {
                Some(outcome) => outcome,
                None => {
                    tx.rollback().await?;
                    return Ok(None);
                }
            },
            _ => match run_handler(&tx, &mut savepoint, cmd, *handler).await? {
                Ok(outcome) => {
                    a_handler_failed |= !matches!(outcome, Outcome::Success { .. });
                    outcome
                }
                // Nothing recorded: the next attempt runs afresh.
                Err(error) => {
                    a_handler_failed = true;
                    answers.push(Handled::Retryable(error));
                    continue;
                }
            },
        };
        let outcome_json =
            serde_json::to_value(&outcome).map_err(|e| DbErr::Custom(e.to_string()))?;
        new_records.push(inbox::ActiveModel {
            saga_id: ActiveValue::Set(cmd.saga_id.to_string()),
            step: ActiveValue::Set(cmd.step.clone()),
            direction: ActiveValue::Set(cmd.direction.as_str().into()),
            action: ActiveValue::Set(cmd.action.clone()),
            message_id: ActiveValue::Set(cmd.message_id.to_string()),
            attempt: ActiveValue::Set(i32::try_from(cmd.attempt).unwrap_or(i32::MAX)),
            outcome: ActiveValue::Set(outcome_json.clone()),
            handled_at: ActiveValue::Set(chrono::Utc::now()),
        });
        // A copy of the command later in the batch finds it, as it would in the table.
        records.insert(
            key(cmd.direction),
            (outcome_json, i32::try_from(cmd.attempt).unwrap_or(i32::MAX)),
        );
        answers.push(Handled::Fresh(outcome));
    }

    if new_records.is_empty() {
        tx.rollback().await?;
    } else {
        inbox::Entity::insert_many(new_records)
            .exec_without_returning(&tx)
            .await?;
        tx.commit().await?;
    }
    Ok(Some((answers, a_handler_failed)))
}

/// Runs the handler straight in the batch's transaction: its outcome if it succeeded with an
/// output a reply can carry, else `None` (its writes, if any, are then in the transaction and
/// can only be undone with the whole batch); an error when the database gave the transaction
/// up for another one.
async fn run_direct(
    tx: &DatabaseTransaction,
    cmd: &StepCommand,
    handler: &dyn Handler,
) -> Result<Option<Outcome>, DbErr> {
    match AssertUnwindSafe(handler.handle(cmd, tx))
        .catch_unwind()
        .await
    {
        Ok(Ok(Outcome::Success { output })) if check_output(&output).is_ok() => {
            Ok(Some(Outcome::Success { output }))
        }
        Ok(Err(err)) if err.is_conflict() => Err(DbErr::Custom(format!("{CONFLICT}: {err}"))),
        _ => Ok(None),
    }
}

/// The savepoint each handler runs in when [`Savepoints`] are on. Set by hand rather than as a
/// nested transaction, and kept between handlers: one statement per handler (`ROLLBACK TO`
/// after a failure leaves it set; after a success, `RELEASE` and a new one go in one call). A
/// nested transaction costs two each, its `SAVEPOINT` and its `RELEASE` or `ROLLBACK TO`. The
/// first one is set after the batch's locks are taken: a rollback to it would release them.
#[derive(Default)]
struct HandlerSavepoint {
    state: SavepointState,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum SavepointState {
    /// Not set yet.
    #[default]
    Unset,
    /// Set, with nothing written since.
    Clean,
    /// Set, holding a succeeded handler's writes.
    Holding,
}

const SAVEPOINT: &str = "saga_sdk_handler";

impl HandlerSavepoint {
    /// Sets a savepoint with nothing after it, for the next handler.
    async fn ready(&mut self, tx: &DatabaseTransaction) -> Result<(), DbErr> {
        let sql = match self.state {
            SavepointState::Clean => return Ok(()),
            SavepointState::Unset => format!("SAVEPOINT {SAVEPOINT}"),
            SavepointState::Holding => {
                format!("RELEASE SAVEPOINT {SAVEPOINT}; SAVEPOINT {SAVEPOINT}")
            }
        };
        tx.execute_unprepared(&sql).await?;
        self.state = SavepointState::Clean;
        Ok(())
    }

    /// Keeps the handler's writes.
    fn keep(&mut self) {
        self.state = SavepointState::Holding;
    }

    /// Undoes the handler's writes; the savepoint stays set.
    async fn undo(&mut self, tx: &DatabaseTransaction) -> Result<(), DbErr> {
        tx.execute_unprepared(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}"))
            .await?;
        self.state = SavepointState::Clean;
        Ok(())
    }
}

/// Runs the handler inside a savepoint: its writes are kept on success and undone on a
/// business failure. `Ok(Err(_))` is a retryable error (the caller rolls everything back).
async fn run_handler(
    tx: &DatabaseTransaction,
    savepoint: &mut HandlerSavepoint,
    cmd: &StepCommand,
    handler: &dyn Handler,
) -> Result<Result<Outcome, String>, DbErr> {
    savepoint.ready(tx).await?;
    let result = AssertUnwindSafe(handler.handle(cmd, tx))
        .catch_unwind()
        .await;
    match result {
        Ok(Ok(Outcome::Success { output })) => match check_output(&output) {
            Ok(()) => {
                savepoint.keep();
                Ok(Ok(Outcome::Success { output }))
            }
            // The orchestrator could not take it: the step did not happen.
            Err(reason) => {
                savepoint.undo(tx).await?;
                tracing::warn!(%reason, "the handler's output breaks a limit: answering a failure");
                Ok(Ok(Outcome::Failure { reason }))
            }
        },
        Ok(Ok(Outcome::Failure { reason })) => {
            savepoint.undo(tx).await?;
            let reason = clean(&reason);
            tracing::info!(reason = %reason, "business failure");
            Ok(Ok(Outcome::Failure { reason }))
        }
        Ok(Ok(Outcome::RetryableError { error })) => {
            savepoint.undo(tx).await?;
            let error = clean(&error);
            tracing::warn!(error = %error, "retryable error");
            Ok(Err(error))
        }
        Ok(Err(err)) if err.is_conflict() => Err(DbErr::Custom(format!("{CONFLICT}: {err}"))),
        Ok(Err(err)) => {
            savepoint.undo(tx).await?;
            let error = clean(err.message());
            tracing::warn!(error = %error, "retryable error");
            Ok(Err(error))
        }
        Err(panic) => {
            savepoint.undo(tx).await?;
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use sea_orm::{ConnectionTrait, DatabaseTransaction, Statement};

    use super::*;
    use crate::handler::{HandlerFuture, failure, success};

    /// Given a batch of commands handled in one transaction.
    async fn database() -> DatabaseConnection {
        let db = crate::db::connect("sqlite::memory:", None).await.unwrap();
        crate::db::migrate(&db).await.unwrap();
        db.execute_unprepared("CREATE TABLE effects (saga_id TEXT NOT NULL, step TEXT NOT NULL)")
            .await
            .unwrap();
        db
    }

    fn command(saga_id: Uuid, step: &str, direction: Direction) -> StepCommand {
        StepCommand {
            message_id: Uuid::new_v4(),
            saga_id,
            saga_name: "order".into(),
            step: step.into(),
            direction,
            action: "act".into(),
            attempt: 1,
            data: Data::new(),
            action_output: None,
            expires_at: None,
        }
    }

    /// Records an effect row, then answers as the step's name says: `fail` a business failure,
    /// `flaky` a retryable error, anything else a success.
    struct Recording(AtomicUsize);

    impl Handler for Recording {
        fn handle<'a>(
            &'a self,
            cmd: &'a StepCommand,
            tx: &'a DatabaseTransaction,
        ) -> HandlerFuture<'a> {
            Box::pin(async move {
                self.0.fetch_add(1, Ordering::SeqCst);
                tx.execute_raw(Statement::from_sql_and_values(
                    tx.get_database_backend(),
                    "INSERT INTO effects (saga_id, step) VALUES (?, ?)",
                    [cmd.saga_id.to_string().into(), cmd.step.clone().into()],
                ))
                .await?;
                Ok(match cmd.step.as_str() {
                    "fail" => failure("declined"),
                    "flaky" => Outcome::RetryableError {
                        error: "try later".into(),
                    },
                    _ => success(serde_json::json!({ "done": cmd.step })),
                })
            })
        }
    }

    async fn effects(db: &DatabaseConnection) -> Vec<String> {
        let rows = db
            .query_all_raw(Statement::from_string(
                DbBackend::Sqlite,
                "SELECT step FROM effects ORDER BY step",
            ))
            .await
            .unwrap();
        rows.iter()
            .map(|r| r.try_get::<String>("", "step").unwrap())
            .collect()
    }

    async fn inbox_rows(db: &DatabaseConnection) -> usize {
        inbox::Entity::find().all(db).await.unwrap().len()
    }

    #[tokio::test]
    async fn one_transaction_answers_each_command_as_if_it_were_alone() {
        let db = database().await;
        let handler = Recording(AtomicUsize::new(0));
        let (a, b, c, d) = (
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
            Uuid::new_v4(),
        );
        // When: an action and a copy of it, a compensation before its action and then the
        // action, a business failure and a retryable error, all in one batch.
        let batch = [
            command(a, "ok", Direction::Execute),
            command(a, "ok", Direction::Execute),
            command(b, "ok", Direction::Compensate),
            command(b, "ok", Direction::Execute),
            command(c, "fail", Direction::Execute),
            command(d, "flaky", Direction::Execute),
        ];
        let commands: Vec<(&StepCommand, &dyn Handler)> = batch
            .iter()
            .map(|cmd| (cmd, &handler as &dyn Handler))
            .collect();
        let savepoints = Savepoints::default();
        let answers = attempt(&db, &savepoints, &commands).await.unwrap();

        // Then: each answered as alone, in order.
        let ok = Outcome::Success {
            output: serde_json::from_value(serde_json::json!({ "done": "ok" })).unwrap(),
        };
        assert_eq!(
            answers,
            vec![
                Handled::Fresh(ok.clone()),
                Handled::Recorded(ok),
                Handled::Fresh(Outcome::Success {
                    output: Data::new()
                }),
                Handled::Fresh(Outcome::Failure {
                    reason: COMPENSATED_BEFORE_EXECUTED.into()
                }),
                Handled::Fresh(Outcome::Failure {
                    reason: "declined".into()
                }),
                Handled::Retryable("try later".into()),
            ]
        );
        // The handler ran for the first copy, the failure and the retryable error only: first
        // without savepoints until the failure (twice), then again with one each (three times).
        // The writes of the last two were undone, the first one's kept.
        assert_eq!(handler.0.load(Ordering::SeqCst), 5);
        assert!(savepoints.on());
        assert_eq!(effects(&db).await, vec!["ok"]);
        // Recorded: everything but the retryable error and the duplicate.
        assert_eq!(inbox_rows(&db).await, 4);

        // And a later copy, in a batch of its own, finds the records.
        let again = command(c, "fail", Direction::Execute);
        let answers = attempt(&db, &savepoints, &[(&again, &handler as &dyn Handler)])
            .await
            .unwrap();
        assert_eq!(
            answers,
            vec![Handled::Recorded(Outcome::Failure {
                reason: "declined".into()
            })]
        );
        assert_eq!(handler.0.load(Ordering::SeqCst), 5);
    }

    #[tokio::test]
    async fn savepoints_stay_on_while_handlers_fail_and_go_off_after_a_clean_batch() {
        let db = database().await;
        let handler = Recording(AtomicUsize::new(0));
        let savepoints = Savepoints::default();
        let run = |steps: &[&str]| {
            steps
                .iter()
                .map(|step| command(Uuid::new_v4(), step, Direction::Execute))
                .collect::<Vec<_>>()
        };
        let answer = async |batch: &[StepCommand]| {
            let commands: Vec<(&StepCommand, &dyn Handler)> = batch
                .iter()
                .map(|cmd| (cmd, &handler as &dyn Handler))
                .collect();
            attempt(&db, &savepoints, &commands).await.unwrap()
        };

        // Given savepoints off, when every handler of a batch succeeds
        answer(&run(&["a", "b"])).await;
        // Then each ran once, and savepoints stay off
        assert_eq!(handler.0.load(Ordering::SeqCst), 2);
        assert!(!savepoints.on());

        // When a handler fails, after one that succeeded
        let answers = answer(&run(&["c", "fail"])).await;
        // Then the batch ran again with savepoints (c twice, fail twice), the answers are as if
        // each were alone, and savepoints are on
        assert_eq!(handler.0.load(Ordering::SeqCst), 6);
        assert!(matches!(
            answers[0],
            Handled::Fresh(Outcome::Success { .. })
        ));
        assert!(matches!(
            answers[1],
            Handled::Fresh(Outcome::Failure { .. })
        ));
        assert!(savepoints.on());

        // When another batch has a failure, it runs once, with savepoints
        answer(&run(&["d", "fail"])).await;
        assert_eq!(handler.0.load(Ordering::SeqCst), 8);
        assert!(savepoints.on());

        // When a batch has none, savepoints go off; the next clean batch runs once without
        answer(&run(&["e"])).await;
        assert!(!savepoints.on());
        answer(&run(&["f", "g"])).await;
        assert_eq!(handler.0.load(Ordering::SeqCst), 11);
        // Only the successes' writes are kept
        assert_eq!(effects(&db).await, vec!["a", "b", "c", "d", "e", "f", "g"]);
    }

    #[tokio::test]
    async fn with_savepoints_each_handler_s_writes_are_kept_or_undone_alone() {
        let db = database().await;
        let handler = Recording(AtomicUsize::new(0));
        // Given savepoints on
        let savepoints = Savepoints::default();
        savepoints.set(true);
        // When successes, failures and retryable errors alternate in one batch, two of a kind
        // in a row too
        let steps = ["a", "fail", "b", "c", "flaky", "fail", "d"];
        let batch: Vec<StepCommand> = steps
            .iter()
            .map(|step| command(Uuid::new_v4(), step, Direction::Execute))
            .collect();
        let commands: Vec<(&StepCommand, &dyn Handler)> = batch
            .iter()
            .map(|cmd| (cmd, &handler as &dyn Handler))
            .collect();
        let answers = attempt(&db, &savepoints, &commands).await.unwrap();

        // Then the batch ran once, each answered as alone
        assert_eq!(handler.0.load(Ordering::SeqCst), steps.len());
        let kinds: Vec<&str> = answers
            .iter()
            .map(|handled| match handled {
                Handled::Fresh(Outcome::Success { .. }) => "success",
                Handled::Fresh(Outcome::Failure { .. }) => "failure",
                Handled::Retryable(_) => "retryable",
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "success",
                "failure",
                "success",
                "success",
                "retryable",
                "failure",
                "success"
            ]
        );
        // And only the successes' writes committed, with every record but the retryable one's
        assert_eq!(effects(&db).await, vec!["a", "b", "c", "d"]);
        assert_eq!(inbox_rows(&db).await, steps.len() - 1);
    }

    #[tokio::test]
    async fn a_transaction_begins_at_once_when_none_is_running() {
        let gate = Gate::new(Duration::from_secs(3600));
        // When nothing runs, then a worker begins without waiting
        let first = gate.begin().now_or_never().expect("begun at once");
        drop(first);
        // And again after the first ended
        assert!(gate.begin().now_or_never().is_some());
    }

    #[tokio::test]
    async fn a_transaction_waits_for_the_running_one_to_end() {
        let gate = Gate::new(Duration::from_secs(3600));
        // Given a running transaction
        let first = gate.begin().await;
        // When another worker has commands, then it waits, gathering them
        let mut second = std::pin::pin!(gate.begin());
        assert!(futures_util::poll!(second.as_mut()).is_pending());
        // And it begins as soon as the running one ends
        drop(first);
        tokio::time::timeout(Duration::from_secs(60), second)
            .await
            .expect("begun once the first ended");
    }

    #[tokio::test]
    async fn a_slow_transaction_holds_up_the_next_only_for_the_stall() {
        let gate = Gate::new(Duration::from_millis(20));
        // Given a transaction that does not end (a slow handler)
        let _slow = gate.begin().await;
        // When another worker has commands, then it begins beside it after the stall
        let second = tokio::time::timeout(Duration::from_secs(60), gate.begin())
            .await
            .expect("begun beside the slow one");
        assert_eq!(gate.running.load(Ordering::SeqCst), 2);
        drop(second);
        assert_eq!(gate.running.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_committer_answers_every_command_of_a_burst() {
        let db = database().await;
        let handler: Arc<dyn Handler> = Arc::new(Recording(AtomicUsize::new(0)));
        let committer = Committer::start(db.clone(), 1, 16);
        let mut burst = tokio::task::JoinSet::new();
        for i in 0..50 {
            let (committer, handler) = (committer.clone(), handler.clone());
            let step = format!("step-{i:02}");
            burst.spawn(async move {
                let cmd = Arc::new(command(Uuid::new_v4(), &step, Direction::Execute));
                (step, committer.process(cmd, handler).await)
            });
        }
        let mut steps = Vec::new();
        while let Some(joined) = burst.join_next().await {
            let (step, handled) = joined.unwrap();
            assert!(
                matches!(handled, Handled::Fresh(Outcome::Success { .. })),
                "{handled:?}"
            );
            steps.push(step);
        }
        steps.sort();
        assert_eq!(effects(&db).await, steps);
        assert_eq!(inbox_rows(&db).await, 50);
    }
}
