//! A batch on PostgreSQL in one statement of constant text, each column of each table's rows
//! bound as one array (`unnest`), in binary: how a batch of a shape not seen lately goes
//! (see [`super::Shapes`]).
//!
//! The text is the same for every batch, whatever it holds (a table with no rows gets an
//! empty array), so the server parses and analyses about 3 KB instead of a statement the
//! size of the batch: with the values in the text (a `VALUES` list, 50 KB for 19 commits)
//! parsing, analysing, rewriting and planning took 2.0 ms of a batch's 3.5 (the server's
//! `log_*_stats`), for each batch afresh, since under load nearly every batch has a text of
//! its own.
//!
//! The statement is prepared once, on a connection of its own whose session keeps one plan
//! for it that reaches every row by its table's key (see the store's `array_plans`): neither
//! parsed nor planned per batch, and no whole-table scan however large the tables grow. Its
//! checks are the
//! one-call commit's: each table's rows must all be written, else the statement fails
//! (`division_by_zero`) having written nothing.

use sea_orm::sqlx::{self, PgPool, Row};
use sea_orm::{ActiveValue, DbErr, RuntimeErr};
use std::sync::Arc;

use super::{Plan, SagaWrite, ScheduledTimer, TimerKey};

/// Parameters, in order: inbox $1–$3, events $4–$8, new sagas $9–$22, sagas advanced
/// $23–$32 (`$24`: the version each was at), outbox $33–$35, timers scheduled $36–$39,
/// timers gone $40–$41, outbox rows sent $42–$43.
pub(in crate::store) const STATEMENT: &str = r#"WITH
inbox_rows AS (
    INSERT INTO "inbox" ("message_id", "saga_id", "received_at")
    SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::timestamptz[])
    ON CONFLICT ("message_id") DO NOTHING
    RETURNING 1
),
event_rows AS (
    INSERT INTO "saga_events" ("saga_id", "seq", "event_type", "payload", "recorded_at")
    SELECT * FROM unnest($4::uuid[], $5::int8[], $6::text[], $7::text[], $8::timestamptz[])
    ON CONFLICT ("saga_id", "seq") DO NOTHING
    RETURNING 1
),
new_saga_rows AS (
    INSERT INTO "sagas" ("id", "name", "status", "business_key", "idempotency_key",
        "definition_version", "current_step", "data", "state", "version", "trace_parent",
        "trace_state", "created_at", "updated_at")
    SELECT * FROM unnest($9::uuid[], $10::text[], $11::text[], $12::text[], $13::text[],
        $14::text[], $15::text[], $16::text[], $17::text[], $18::int8[], $19::text[],
        $20::text[], $21::timestamptz[], $22::timestamptz[])
    ON CONFLICT DO NOTHING
    RETURNING 1
),
advanced_saga_rows AS (
    UPDATE "sagas" SET "status" = u.status, "business_key" = u.business_key,
        "definition_version" = u.definition_version, "current_step" = u.current_step,
        "data" = u.data, "state" = u.state, "version" = u.version, "updated_at" = u.updated_at
    FROM unnest($23::uuid[], $24::int8[], $25::text[], $26::text[], $27::text[], $28::text[],
        $29::text[], $30::text[], $31::int8[], $32::timestamptz[])
        AS u(id, before, status, business_key, definition_version, current_step, data, state,
            version, updated_at)
    WHERE "sagas"."id" = u.id AND "sagas"."version" = u.before
    RETURNING 1
),
outbox_rows AS (
    INSERT INTO "outbox" ("saga_id", "message", "created_at")
    SELECT saga_id, message, created_at
    FROM unnest($33::uuid[], $34::text[], $35::timestamptz[])
        WITH ORDINALITY AS o(saga_id, message, created_at, n)
    ORDER BY n
    RETURNING "id"
),
timers_scheduled AS (
    INSERT INTO "timers" ("saga_id", "timer_key", "due_at", "timer")
    SELECT * FROM unnest($36::uuid[], $37::text[], $38::timestamptz[], $39::text[])
    ON CONFLICT ("saga_id", "timer_key")
        DO UPDATE SET "due_at" = excluded."due_at", "timer" = excluded."timer"
),
timers_gone AS (
    DELETE FROM "timers" t USING unnest($40::uuid[], $41::text[]) AS g(saga_id, timer_key)
    WHERE t."saga_id" = g.saga_id AND t."timer_key" = g.timer_key
),
sent AS (
    UPDATE "outbox" SET "sent_at" = $43::timestamptz
    WHERE "id" = ANY($42::int8[]) AND "sent_at" IS NULL
)
SELECT ARRAY(SELECT "id" FROM outbox_rows ORDER BY "id")
WHERE 1 / CAST(
    (SELECT count(*) FROM inbox_rows) = cardinality($1::uuid[])
    AND (SELECT count(*) FROM event_rows) = cardinality($4::uuid[])
    AND (SELECT count(*) FROM new_saga_rows) = cardinality($9::uuid[])
    AND (SELECT count(*) FROM advanced_saga_rows) = cardinality($23::uuid[])
    AND (SELECT count(*) FROM outbox_rows) = cardinality($33::uuid[])
AS int) = 1"#;

/// A field the plan always sets.
fn set<T: Clone + Into<sea_orm::Value>>(value: &ActiveValue<T>) -> T {
    value.as_ref().clone()
}

/// One column of `rows`, to bind as an array.
fn column<R, T>(rows: &[R], field: impl Fn(&R) -> T) -> Vec<T> {
    rows.iter().map(field).collect()
}

impl Plan {
    /// Writes the whole batch in one statement, committed on its own; the outbox ids in the
    /// order of the commits' messages. Fails with `division_by_zero` when a check fails.
    pub(super) async fn write_postgres(&self, pool: &PgPool) -> Result<Vec<i64>, DbErr> {
        let inbox: Vec<_> = self.inbox.iter().map(|(_, _, m)| m).collect();
        let events: Vec<_> = self.events.iter().map(|(_, m)| m).collect();
        let new: Vec<_> = self.new_sagas.iter().map(|w| &w.model).collect();
        // By id, as every other table's rows, so that writers lock rows in one order.
        let mut advanced: Vec<(i64, &SagaWrite)> = self
            .updated_sagas
            .iter()
            .flat_map(|(added, writes)| writes.iter().map(move |w| (*added as i64, w)))
            .collect();
        advanced.sort_by_key(|(_, w)| w.id);
        let before: Vec<i64> = advanced
            .iter()
            .map(|(added, w)| set(&w.model.version) - added)
            .collect();
        let advanced: Vec<_> = advanced.iter().map(|(_, w)| &w.model).collect();
        let outbox: Vec<_> = self.outbox.iter().collect();
        let (scheduled, gone): (Vec<_>, Vec<_>) =
            self.timers.iter().partition(|(_, value)| value.is_some());
        let scheduled: Vec<(&TimerKey, &ScheduledTimer)> = scheduled
            .into_iter()
            .filter_map(|(key, value)| Some((key, value.as_ref()?)))
            .collect();
        let gone: Vec<&TimerKey> = gone.into_iter().map(|(key, _)| key).collect();

        let row = sqlx::query(STATEMENT)
            .bind(column(&inbox, |m| set(&m.message_id)))
            .bind(column(&inbox, |m| set(&m.saga_id)))
            .bind(column(&inbox, |m| set(&m.received_at)))
            .bind(column(&events, |m| set(&m.saga_id)))
            .bind(column(&events, |m| set(&m.seq)))
            .bind(column(&events, |m| set(&m.event_type)))
            .bind(column(&events, |m| set(&m.payload)))
            .bind(column(&events, |m| set(&m.recorded_at)))
            .bind(column(&new, |m| set(&m.id)))
            .bind(column(&new, |m| set(&m.name)))
            .bind(column(&new, |m| set(&m.status)))
            .bind(column(&new, |m| set(&m.business_key)))
            .bind(column(&new, |m| set(&m.idempotency_key)))
            .bind(column(&new, |m| set(&m.definition_version)))
            .bind(column(&new, |m| set(&m.current_step)))
            .bind(column(&new, |m| set(&m.data)))
            .bind(column(&new, |m| set(&m.state)))
            .bind(column(&new, |m| set(&m.version)))
            .bind(column(&new, |m| set(&m.trace_parent)))
            .bind(column(&new, |m| set(&m.trace_state)))
            .bind(column(&new, |m| set(&m.created_at)))
            .bind(column(&new, |m| set(&m.updated_at)))
            .bind(column(&advanced, |m| set(&m.id)))
            .bind(before)
            .bind(column(&advanced, |m| set(&m.status)))
            .bind(column(&advanced, |m| set(&m.business_key)))
            .bind(column(&advanced, |m| set(&m.definition_version)))
            .bind(column(&advanced, |m| set(&m.current_step)))
            .bind(column(&advanced, |m| set(&m.data)))
            .bind(column(&advanced, |m| set(&m.state)))
            .bind(column(&advanced, |m| set(&m.version)))
            .bind(column(&advanced, |m| set(&m.updated_at)))
            .bind(column(&outbox, |m| set(&m.saga_id)))
            .bind(column(&outbox, |m| set(&m.message)))
            .bind(column(&outbox, |m| set(&m.created_at)))
            .bind(column(&scheduled, |((saga_id, _), _)| *saga_id))
            .bind(column(&scheduled, |((_, key), _)| key.clone()))
            .bind(column(&scheduled, |(_, (due_at, _))| *due_at))
            .bind(column(&scheduled, |(_, (_, timer))| timer.clone()))
            .bind(column(&gone, |(saga_id, _)| *saga_id))
            .bind(column(&gone, |(_, key)| key.clone()))
            .bind(&self.sent)
            .bind(self.sent_at)
            .fetch_one(pool)
            .await
            .map_err(sqlx_error)?;
        row.try_get(0).map_err(sqlx_error)
    }
}

fn sqlx_error(error: sqlx::Error) -> DbErr {
    DbErr::Query(RuntimeErr::SqlxError(Arc::new(error)))
}
