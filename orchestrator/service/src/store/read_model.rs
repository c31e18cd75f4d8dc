//! The `sagas` row as a function of the saga's state, and its rebuild from the event log.

use chrono::{DateTime, Utc};
use saga_engine::SagaState;
use saga_schemas::SagaStatus;
use sea_orm::sea_query::{OnConflict, Query};
use sea_orm::{
    ActiveValue::Set, ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryOrder,
    QuerySelect,
};
use uuid::Uuid;

use super::entity::{saga_events, sagas};
use super::{MAX_PARAMS, StoreError, parse_event};

/// Columns a commit rewrites on an existing saga row (never `id`, `name`, `idempotency_key`,
/// `created_at`).
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

/// Columns the rebuild rewrites: all but `id` and `idempotency_key`.
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
pub(super) const SAGA_COLUMNS: usize = 12;

/// Sagas folded per round trip by the rebuild.
const REBUILD_CHUNK: usize = 500;

/// The step people should look at: the one with an action or compensation in flight or
/// waiting for its retry; else one whose compensation failed (waiting for an operator);
/// else, once compensation began, the last one compensated (the earliest step touched by
/// compensation, which runs in reverse); else the last step sent.
pub fn current_step(state: &SagaState) -> Option<String> {
    let steps = &state.steps;
    steps
        .iter()
        .rev()
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
    saga_active_model(saga_id, &state, None, first.recorded_at, last.recorded_at)
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
