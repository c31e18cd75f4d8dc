//! The read model: the `sagas` row as a function of the saga's state, the queries people read
//! (one saga, its history, lists, counts), and the rebuild of every row from the event log.

use chrono::{DateTime, Utc};
use saga_amqp::trace::TraceContext;
use saga_engine::SagaState;
use saga_schemas::{Data, SagaEvent, SagaStatus};
use sea_orm::sea_query::{OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, Condition, ConnectionTrait, EntityTrait, QueryFilter,
    QueryOrder, QuerySelect,
};
use uuid::Uuid;

use super::entity::{saga_events, sagas};
use super::event_log::parse_event;
use super::{Backend, MAX_PARAMS, Store, StoreError};

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

/// A row of a listing: the read model's columns alone. Listing decodes no saga's state, so one
/// saga that cannot be read does not stop the others from being listed.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaListing {
    pub id: Uuid,
    pub name: String,
    pub status: SagaStatus,
    pub business_key: Option<String>,
    pub definition_version: String,
    pub current_step: Option<String>,
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
    /// Sagas started with this idempotency key, under any saga name.
    pub idempotency_key: Option<String>,
    pub limit: u64,
    /// Keyset cursor: only rows strictly older than this `(created_at, id)`; pass the last
    /// row of the previous page.
    pub before: Option<(DateTime<Utc>, Uuid)>,
}

impl Store {
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

    /// Sagas newest first by `(created_at desc, id desc)`, filtered, one keyset page, each
    /// with its state (so one saga that cannot be read fails the page: see [`Store::listing`]).
    pub async fn list(&self, filter: &ListFilter) -> Result<Vec<SagaRow>, StoreError> {
        let rows = page(filter).all(&self.db).await?;
        let mut sagas = Vec::with_capacity(rows.len());
        for row in rows {
            sagas.push(self.saga_row(row).await?);
        }
        Ok(sagas)
    }

    /// The page [`Store::list`] gives, from the read model's columns alone: no saga's state or
    /// data is decoded, so a saga that cannot be read is listed like any other (reading it
    /// says why).
    pub async fn listing(&self, filter: &ListFilter) -> Result<Vec<SagaListing>, StoreError> {
        let rows: Vec<ListingColumns> = page(filter)
            .select_only()
            .columns([
                sagas::Column::Id,
                sagas::Column::Name,
                sagas::Column::Status,
                sagas::Column::BusinessKey,
                sagas::Column::DefinitionVersion,
                sagas::Column::CurrentStep,
                sagas::Column::Version,
                sagas::Column::CreatedAt,
                sagas::Column::UpdatedAt,
            ])
            .into_tuple()
            .all(&self.db)
            .await?;
        rows.into_iter()
            .map(
                |(
                    id,
                    name,
                    status,
                    business_key,
                    definition_version,
                    current_step,
                    version,
                    created_at,
                    updated_at,
                )| {
                    let corrupt = |what: &str, e: &dyn std::fmt::Display| {
                        StoreError::Corrupt(format!("{what} of saga {id}: {e}"))
                    };
                    Ok(SagaListing {
                        status: status.parse().map_err(|e| corrupt("status", &e))?,
                        version: u64::try_from(version).map_err(|e| corrupt("version", &e))?,
                        id,
                        name,
                        business_key,
                        definition_version,
                        current_step,
                        created_at,
                        updated_at,
                    })
                },
            )
            .collect()
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
        self.counted_by_name(
            &[SagaStatus::Running, SagaStatus::Compensating],
            started_before,
        )
        .await
    }

    /// Sagas now in `status`, per saga name (for the gauge of sagas waiting for an operator).
    pub async fn count_by_name(
        &self,
        status: SagaStatus,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        self.counted_by_name(&[status], None).await
    }

    async fn counted_by_name(
        &self,
        statuses: &[SagaStatus],
        started_before: Option<DateTime<Utc>>,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        let mut query = sagas::Entity::find()
            .select_only()
            .column(sagas::Column::Name)
            .column_as(sagas::Column::Id.count(), "count")
            .filter(sagas::Column::Status.is_in(statuses.iter().map(|s| s.as_str())));
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

    /// How many sagas are in each status (only those of saga `name`, if given); statuses no
    /// saga is in are absent.
    pub async fn status_counts(
        &self,
        name: Option<&str>,
    ) -> Result<Vec<(SagaStatus, u64)>, StoreError> {
        let mut query = sagas::Entity::find()
            .select_only()
            .column(sagas::Column::Status)
            .column_as(sagas::Column::Id.count(), "count");
        if let Some(name) = name {
            query = query.filter(sagas::Column::Name.eq(name));
        }
        let rows: Vec<(String, i64)> = query
            .group_by(sagas::Column::Status)
            .into_tuple()
            .all(&self.db)
            .await?;
        rows.into_iter()
            .map(|(status, count)| {
                let status = status
                    .parse()
                    .map_err(|e| StoreError::Corrupt(format!("a saga's status: {e}")))?;
                Ok((status, count.max(0) as u64))
            })
            .collect()
    }

    /// Rebuilds every `sagas` row (snapshot and version included) from `saga_events` alone,
    /// by folding each saga's log; deletes rows whose saga has no events. `created_at` is the
    /// first event's `recorded_at`, `updated_at` the last one's; an existing row keeps its
    /// `idempotency_key` (the events do not carry it: a row rebuilt from nothing has none).
    /// One transaction; on PostgreSQL it locks `saga_events` against writers (SHARE mode)
    /// so no commit lands between the read and the rewrite. Returns the number of sagas.
    pub async fn rebuild_read_model(&self) -> Result<u64, StoreError> {
        let w = self.begin_write().await?;
        match rebuild(&w.txn, self.backend == Backend::Postgres).await {
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

/// `(id, name, status, business_key, definition_version, current_step, version, created_at,
/// updated_at)`: the columns of a [`SagaListing`].
type ListingColumns = (
    Uuid,
    String,
    String,
    Option<String>,
    String,
    Option<String>,
    i64,
    DateTime<Utc>,
    DateTime<Utc>,
);

/// The query of one page of a listing: filtered, newest first by `(created_at, id)`.
fn page(filter: &ListFilter) -> sea_orm::Select<sagas::Entity> {
    let mut query = sagas::Entity::find();
    if let Some(status) = filter.status {
        query = query.filter(sagas::Column::Status.eq(status.as_str()));
    }
    if let Some(name) = &filter.name {
        query = query.filter(sagas::Column::Name.eq(name.as_str()));
    }
    if let Some(key) = &filter.idempotency_key {
        query = query.filter(sagas::Column::IdempotencyKey.eq(key.as_str()));
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
    query
        .order_by_desc(sagas::Column::CreatedAt)
        .order_by_desc(sagas::Column::Id)
        .limit(filter.limit)
}

impl SagaRow {
    /// The row, with `state` already parsed (or rebuilt) from its `state` column. The data is
    /// the state's: the `data` column is written for people querying the table, never read
    /// back, so it cannot make a readable saga unreadable.
    fn from_model(row: sagas::Model, state: SagaState) -> Result<Self, StoreError> {
        let corrupt = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Corrupt(format!("{what} of saga {}: {e}", row.id))
        };
        Ok(SagaRow {
            status: row.status.parse().map_err(|e| corrupt("status", &e))?,
            data: state.data.clone(),
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

/// Columns a commit rewrites on an existing saga row (never `id`, `name`, `idempotency_key`,
/// `trace_parent`, `trace_state`, `created_at`).
pub(super) const STATE_COLUMNS: [sagas::Column; 8] = [
    sagas::Column::Status,
    sagas::Column::BusinessKey,
    sagas::Column::DefinitionVersion,
    sagas::Column::CurrentStep,
    sagas::Column::Data,
    sagas::Column::State,
    sagas::Column::Version,
    sagas::Column::UpdatedAt,
];

/// Columns the rebuild rewrites: all but `id`, `idempotency_key`, `trace_parent` and
/// `trace_state`.
const REBUILT_COLUMNS: [sagas::Column; 10] = [
    sagas::Column::Name,
    sagas::Column::Status,
    sagas::Column::BusinessKey,
    sagas::Column::DefinitionVersion,
    sagas::Column::CurrentStep,
    sagas::Column::Data,
    sagas::Column::State,
    sagas::Column::Version,
    sagas::Column::CreatedAt,
    sagas::Column::UpdatedAt,
];

/// Number of columns of `sagas`, to size the chunks of multi-row statements.
pub(super) const SAGA_COLUMNS: usize = 14;

/// Sagas folded per round trip by the rebuild.
const REBUILD_CHUNK: usize = 500;

/// The step people should look at: the one with an action or compensation in flight or
/// waiting for its retry (while a parallel group runs, the first such step in definition
/// order: the list of the group's steps is in the saga's view); else one whose compensation
/// failed (waiting for an operator); else, once compensation began, the last one compensated
/// (the earliest step touched by compensation, which runs in reverse); else the last step sent.
pub fn current_step(state: &SagaState) -> Option<String> {
    let steps = &state.steps;
    steps
        .iter()
        .find(|s| s.action.is_pending() || s.compensation.is_pending())
        .or_else(|| steps.iter().rev().find(|s| s.compensation_failed))
        .or_else(|| match state.status {
            SagaStatus::Compensating | SagaStatus::Compensated => steps
                .iter()
                .find(|s| s.compensated || s.compensation.sent > 0),
            _ => None,
        })
        .or_else(|| steps.last())
        .map(|s| s.name.clone())
}

/// The whole `sagas` row for `state`.
pub(super) fn saga_active_model(
    saga_id: Uuid,
    state: &SagaState,
    idempotency_key: Option<String>,
    trace: Option<TraceContext>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
) -> Result<sagas::ActiveModel, String> {
    let data = serde_json::to_string(&state.data).map_err(|e| format!("saga data: {e}"))?;
    let snapshot = serde_json::to_string(state).map_err(|e| format!("saga state: {e}"))?;
    let version = i64::try_from(state.version).map_err(|e| format!("saga version: {e}"))?;
    Ok(sagas::ActiveModel {
        id: Set(saga_id),
        name: Set(state.saga_name.clone()),
        status: Set(state.status.as_str().to_owned()),
        business_key: Set(state.business_key.clone()),
        idempotency_key: Set(idempotency_key),
        definition_version: Set(state.definition_version.clone()),
        current_step: Set(current_step(state)),
        data: Set(data),
        state: Set(snapshot),
        version: Set(version),
        trace_parent: Set(trace.as_ref().map(|t| t.parent.clone())),
        trace_state: Set(trace.and_then(|t| t.state)),
        created_at: Set(created_at),
        updated_at: Set(updated_at),
    })
}

/// See `Store::rebuild_read_model`; runs inside the caller's write transaction.
pub(super) async fn rebuild(
    txn: &impl ConnectionTrait,
    lock_events: bool,
) -> Result<u64, StoreError> {
    if lock_events {
        // Blocks commits (they insert events) until this transaction ends; waits for those
        // in progress. First statement, so it cannot deadlock with them.
        txn.execute_unprepared(r#"LOCK TABLE "saga_events" IN SHARE MODE"#)
            .await?;
    }
    sagas::Entity::delete_many()
        .filter(
            sagas::Column::Id.not_in_subquery(
                Query::select()
                    .column(saga_events::Column::SagaId)
                    .from(saga_events::Entity)
                    .to_owned(),
            ),
        )
        .exec(txn)
        .await?;

    let ids: Vec<Uuid> = saga_events::Entity::find()
        .select_only()
        .column(saga_events::Column::SagaId)
        .distinct()
        .order_by_asc(saga_events::Column::SagaId)
        .into_tuple()
        .all(txn)
        .await?;
    for chunk in ids.chunks(REBUILD_CHUNK) {
        let rows = saga_events::Entity::find()
            .filter(saga_events::Column::SagaId.is_in(chunk.iter().copied()))
            .order_by_asc(saga_events::Column::SagaId)
            .order_by_asc(saga_events::Column::Seq)
            .all(txn)
            .await?;
        let mut models = Vec::with_capacity(chunk.len());
        for log in rows.chunk_by(|a, b| a.saga_id == b.saga_id) {
            models.push(fold(log)?);
        }
        for models in models.chunks(MAX_PARAMS / SAGA_COLUMNS) {
            sagas::Entity::insert_many(models.to_vec())
                .on_conflict(
                    OnConflict::column(sagas::Column::Id)
                        .update_columns(REBUILT_COLUMNS)
                        .to_owned(),
                )
                .exec_without_returning(txn)
                .await?;
        }
    }
    Ok(ids.len() as u64)
}

/// One saga's row from its whole log (`log` is not empty, ordered by `seq`).
fn fold(log: &[saga_events::Model]) -> Result<sagas::ActiveModel, StoreError> {
    let saga_id = log[0].saga_id;
    let state = fold_log(saga_id, log)?;
    let (first, last) = (&log[0], &log[log.len() - 1]);
    saga_active_model(
        saga_id,
        &state,
        None,
        None,
        first.recorded_at,
        last.recorded_at,
    )
    .map_err(StoreError::Corrupt)
}

/// The saga's state as the fold of its whole log (ordered by `seq`, without gaps).
pub(super) fn fold_log(saga_id: Uuid, log: &[saga_events::Model]) -> Result<SagaState, StoreError> {
    let mut events = Vec::with_capacity(log.len());
    for (i, row) in log.iter().enumerate() {
        if row.seq != i as i64 + 1 {
            return Err(StoreError::Corrupt(format!(
                "log of saga {saga_id} has seq {} at position {}",
                row.seq,
                i + 1
            )));
        }
        events.push(parse_event(row)?);
    }
    SagaState::fold(saga_id, &events).ok_or_else(|| {
        StoreError::Corrupt(format!(
            "log of saga {saga_id} does not begin with saga_started"
        ))
    })
}

#[cfg(test)]
mod tests {
    use saga_engine::{Definitions, Input, decide};
    use saga_schemas::{Direction, Outcome};
    use sea_orm::{ConnectionTrait, DbBackend, QueryTrait, Statement};

    use super::*;

    /// What SQLite's planner says it would do for a page of the listing.
    async fn sqlite_plan(store: &Store, filter: &ListFilter) -> Vec<String> {
        let query = page(filter).build(DbBackend::Sqlite);
        let explain = Statement::from_sql_and_values(
            DbBackend::Sqlite,
            format!("EXPLAIN QUERY PLAN {}", query.sql),
            query.values.map(|v| v.0).unwrap_or_default(),
        );
        store
            .db
            .query_all_raw(explain)
            .await
            .unwrap()
            .iter()
            .map(|row| row.try_get::<String>("", "detail").unwrap())
            .collect()
    }

    #[tokio::test]
    async fn a_search_by_idempotency_key_under_any_name_uses_an_index() {
        let store = Store::connect("sqlite::memory:").await.unwrap();
        let by_key = ListFilter {
            idempotency_key: Some("order-42".into()),
            limit: 50,
            ..ListFilter::default()
        };
        let plan = sqlite_plan(&store, &by_key).await;
        assert!(
            plan.iter()
                .any(|step| step.contains("USING INDEX sagas_idempotency_key")),
            "{plan:?}"
        );
        let by_name_and_key = ListFilter {
            name: Some("order".into()),
            ..by_key
        };
        let plan = sqlite_plan(&store, &by_name_and_key).await;
        assert!(
            plan.iter().any(|step| step.contains("USING INDEX sagas_")),
            "{plan:?}"
        );
    }

    #[test]
    fn while_a_group_runs_the_current_step_is_its_first_running_step() {
        let yaml = "sagas:
  - name: g
    steps:
      - parallel:
          - {name: a, participant: p, action: x, compensation: y, outputs: []}
          - {name: b, participant: p, action: x, compensation: y, outputs: []}
          - {name: c, participant: p, action: x, compensation: y, outputs: []}
";
        let defs = Definitions::parse("g.yaml", yaml).unwrap();
        let def = &defs.sagas[0];
        let now = Utc::now();
        let saga_id = Uuid::from_u128(1);
        let start = Input::Start {
            saga_id,
            input: Data::new(),
            business_key: None,
        };
        let state = decide(def, None, &start, now).state.unwrap();
        assert_eq!(current_step(&state).as_deref(), Some("a"));
        let a_done = Input::Reply {
            step: "a".into(),
            direction: Direction::Execute,
            attempt: 1,
            in_reply_to: saga_engine::engine::command_message_id(
                saga_id,
                "a",
                Direction::Execute,
                1,
            ),
            outcome: Outcome::Success {
                output: Data::new(),
            },
        };
        let state = decide(def, Some(&state), &a_done, now).state.unwrap();
        assert_eq!(current_step(&state).as_deref(), Some("b"));
    }
}
