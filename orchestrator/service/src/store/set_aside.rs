//! What can never be handled, set aside with its reason: a timer or reply whose saga's
//! definition is gone or whose saga cannot be read. Setting an input aside removes it from the
//! work (a timer row is deleted) and records it in `set_aside`, in one transaction, so it is
//! never lost and never looped on.

use chrono::{DateTime, Utc};
use sea_orm::{
    ActiveValue::{NotSet, Set},
    ColumnTrait, EntityTrait, QueryFilter, QueryOrder, QuerySelect,
};
use serde::Serialize;
use serde_json::{Value, json};
use uuid::Uuid;

use super::entity::{set_aside, timers};
use super::{DueTimer, Store, StoreError};

/// What kind of input was set aside.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SetAsideKind {
    Timer,
    Reply,
}

impl SetAsideKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SetAsideKind::Timer => "timer",
            SetAsideKind::Reply => "reply",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        match text {
            "timer" => Some(SetAsideKind::Timer),
            "reply" => Some(SetAsideKind::Reply),
            _ => None,
        }
    }
}

/// One set-aside input, as `GET /set-aside` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct SetAside {
    pub id: i64,
    pub saga_id: Uuid,
    pub kind: SetAsideKind,
    /// The input itself: the timer row (`key`, `due_at`, `timer`), or the reply.
    #[schema(value_type = Object)]
    pub item: Value,
    pub reason: String,
    pub at: DateTime<Utc>,
}

impl Store {
    /// Sets a due timer aside: deletes it and records it, in one transaction. Returns `false`,
    /// and changes nothing, when the timer is no longer as it was read (it fired, was
    /// rescheduled or cancelled meanwhile).
    pub async fn set_aside_timer(
        &self,
        timer: &DueTimer,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let item = json!({"key": timer.key, "due_at": timer.due_at, "timer": timer.timer});
        self.set_aside_timer_row(timer.saga_id, &timer.key, timer.due_at, item, reason, at)
            .await
    }

    /// [`Store::set_aside_timer`] for a row whose `timer` column may not even parse.
    pub(super) async fn set_aside_timer_row(
        &self,
        saga_id: Uuid,
        key: &str,
        due_at: DateTime<Utc>,
        item: Value,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let w = self.begin_write().await?;
        let result = async {
            let deleted = timers::Entity::delete_many()
                .filter(timers::Column::SagaId.eq(saga_id))
                .filter(timers::Column::TimerKey.eq(key))
                .filter(timers::Column::DueAt.eq(due_at))
                .exec(&w.txn)
                .await?;
            if deleted.rows_affected == 0 {
                return Ok(false);
            }
            insert(&w.txn, saga_id, SetAsideKind::Timer, &item, reason, at).await?;
            Ok(true)
        }
        .await;
        match result {
            Ok(done) => {
                w.commit().await?;
                Ok(done)
            }
            Err(error) => {
                w.rollback().await;
                Err(error)
            }
        }
    }

    /// Records a reply that can never be handled (the caller acks it after this returns).
    pub async fn set_aside_reply(
        &self,
        saga_id: Uuid,
        reply: &Value,
        reason: &str,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let _lock = self.write_lock().await;
        insert(
            &self.writes,
            saga_id,
            SetAsideKind::Reply,
            reply,
            reason,
            at,
        )
        .await
    }

    /// The set-aside inputs, newest first, at most `limit`.
    pub async fn list_set_aside(&self, limit: u64) -> Result<Vec<SetAside>, StoreError> {
        set_aside::Entity::find()
            .order_by_desc(set_aside::Column::Id)
            .limit(limit)
            .all(&self.db)
            .await?
            .into_iter()
            .map(|row| {
                let corrupt =
                    |what: &str| StoreError::Corrupt(format!("{what} of set-aside row {}", row.id));
                Ok(SetAside {
                    id: row.id,
                    saga_id: row.saga_id,
                    kind: SetAsideKind::parse(&row.kind).ok_or_else(|| corrupt("kind"))?,
                    item: serde_json::from_str(&row.item).map_err(|_| corrupt("item"))?,
                    reason: row.reason,
                    at: row.at,
                })
            })
            .collect()
    }

    /// How many inputs of each kind were ever set aside (rows are never deleted by the
    /// service, so this only grows).
    pub async fn set_aside_counts(&self) -> Result<Vec<(SetAsideKind, u64)>, StoreError> {
        let rows: Vec<(String, i64)> = set_aside::Entity::find()
            .select_only()
            .column(set_aside::Column::Kind)
            .column_as(set_aside::Column::Id.count(), "count")
            .group_by(set_aside::Column::Kind)
            .into_tuple()
            .all(&self.db)
            .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(kind, n)| Some((SetAsideKind::parse(&kind)?, n.max(0) as u64)))
            .collect())
    }
}

async fn insert(
    db: &impl sea_orm::ConnectionTrait,
    saga_id: Uuid,
    kind: SetAsideKind,
    item: &Value,
    reason: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    set_aside::Entity::insert(set_aside::ActiveModel {
        id: NotSet,
        saga_id: Set(saga_id),
        kind: Set(kind.as_str().to_owned()),
        item: Set(item.to_string()),
        reason: Set(reason.to_owned()),
        at: Set(at),
    })
    .exec_without_returning(db)
    .await?;
    Ok(())
}
