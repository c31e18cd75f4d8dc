//! Due timers: step timeouts, retry backoff and deadlines, scheduled and cancelled by
//! [`Store::commit`], read here by the timer worker.

use chrono::{DateTime, Utc};
use saga_engine::TimerKind;
use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder, QuerySelect};
use uuid::Uuid;

use super::entity::timers;
use super::{Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct DueTimer {
    pub saga_id: Uuid,
    /// `timer.key()`, as stored.
    pub key: String,
    pub timer: TimerKind,
    pub due_at: DateTime<Utc>,
}

impl Store {
    /// Timers due at `now`, earliest first. A row whose timer does not parse can never fire:
    /// it is set aside (deleted, recorded in `set_aside` with the reason) instead of returned,
    /// so it cannot hold up the timers behind it.
    pub async fn due_timers(
        &self,
        now: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<DueTimer>, StoreError> {
        self.due_timers_of(now, limit, true).await
    }

    /// Like [`Store::due_timers`], but retries and deadlines only: no step timeout.
    pub async fn due_timers_but_step_timeouts(
        &self,
        now: DateTime<Utc>,
        limit: u64,
    ) -> Result<Vec<DueTimer>, StoreError> {
        self.due_timers_of(now, limit, false).await
    }

    async fn due_timers_of(
        &self,
        now: DateTime<Utc>,
        limit: u64,
        step_timeouts: bool,
    ) -> Result<Vec<DueTimer>, StoreError> {
        let mut query = timers::Entity::find().filter(timers::Column::DueAt.lte(now));
        if !step_timeouts {
            let prefix = format!("{}%", TimerKind::STEP_TIMEOUT_KEY_PREFIX);
            query = query.filter(timers::Column::TimerKey.not_like(prefix));
        }
        let rows = query
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

    /// Timers whose time has come and that no orchestrator has fired yet.
    pub async fn overdue_timer_count(&self, now: DateTime<Utc>) -> Result<u64, StoreError> {
        Ok(timers::Entity::find()
            .filter(timers::Column::DueAt.lte(now))
            .count(&self.db)
            .await?)
    }
}
