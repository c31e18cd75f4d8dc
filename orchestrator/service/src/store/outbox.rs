//! The outbox: messages committed with the decisions that produced them, claimed and marked
//! sent by the relay (see the module docs of `store` for claims).

use chrono::{DateTime, Utc};
use saga_schemas::amqp::OutgoingMessage;
use sea_orm::sea_query::{Expr, ExprTrait, LockBehavior, LockType, Order, Query};
use sea_orm::{
    ColumnTrait, ConnectionTrait, DatabaseTransaction, DbErr, EntityTrait, PaginatorTrait,
    QueryFilter, QueryOrder, QuerySelect, TransactionTrait,
};
use uuid::Uuid;

use super::entity::outbox;
use super::{Backend, MAX_PARAMS, PRUNE_CHUNK, Store, StoreError};

#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub saga_id: Uuid,
    pub message: OutgoingMessage,
    pub created_at: DateTime<Utc>,
}

impl Store {
    /// Up to `limit` unsent outbox rows, oldest first, claimed on PostgreSQL (see the module
    /// docs). Publish them, then [`OutboxBatch::mark_sent`] the ones confirmed.
    pub async fn outbox_batch(&self, limit: u64) -> Result<OutboxBatch, StoreError> {
        self.outbox_batch_where(limit, &[], None).await
    }

    /// [`Store::outbox_batch`] without the rows `excluding` (published, their marks not yet
    /// committed) and, with `created_before`, without the rows written since.
    pub async fn outbox_batch_where(
        &self,
        limit: u64,
        excluding: &[i64],
        created_before: Option<DateTime<Utc>>,
    ) -> Result<OutboxBatch, StoreError> {
        let mut query = outbox::Entity::find()
            .filter(outbox::Column::SentAt.is_null())
            .order_by_asc(outbox::Column::Id)
            .limit(limit);
        if !excluding.is_empty() {
            query = query
                .filter(outbox::Column::Id.is_not_in(excluding.iter().take(MAX_PARAMS).copied()));
        }
        if let Some(before) = created_before {
            query = query.filter(outbox::Column::CreatedAt.lt(before));
        }
        match self.backend {
            Backend::Postgres => {
                let txn = self.db.begin().await?;
                let rows = query
                    .lock_with_behavior(LockType::Update, LockBehavior::SkipLocked)
                    .all(&txn)
                    .await?;
                let rows = parse_outbox(rows)?;
                if rows.is_empty() {
                    txn.commit().await?;
                    return Ok(OutboxBatch {
                        rows,
                        claim: Claim::Nothing,
                    });
                }
                Ok(OutboxBatch {
                    rows,
                    claim: Claim::Locked(txn),
                })
            }
            Backend::Sqlite => {
                let rows = parse_outbox(query.all(&self.db).await?)?;
                Ok(OutboxBatch {
                    rows,
                    claim: Claim::Unlocked(self.clone()),
                })
            }
        }
    }

    /// Number of unsent outbox rows.
    pub async fn outbox_backlog(&self) -> Result<u64, StoreError> {
        Ok(outbox::Entity::find()
            .filter(outbox::Column::SentAt.is_null())
            .count(&self.db)
            .await?)
    }

    /// The id of the newest outbox row (0 when there is none): every row at or below it exists
    /// already, so it was created no later than now.
    pub async fn outbox_last_id(&self) -> Result<i64, StoreError> {
        let last: Option<Option<i64>> = outbox::Entity::find()
            .select_only()
            .column_as(outbox::Column::Id.max(), "last")
            .into_tuple()
            .one(&self.db)
            .await?;
        Ok(last.flatten().unwrap_or(0))
    }

    /// Deletes the rows sent before `sent_before` among those with ids up to `up_to`; returns
    /// how many. `sent_at` has no index (every row is marked once; an index would cost as much
    /// again), so the id bound is what keeps a prune to the old end of the table instead of
    /// reading every row kept, the minutes of younger rows included.
    pub async fn prune_outbox(
        &self,
        sent_before: DateTime<Utc>,
        up_to: i64,
    ) -> Result<u64, StoreError> {
        self.prune_in_chunks(|| {
            let oldest = Query::select()
                .column(outbox::Column::Id)
                .from(outbox::Entity)
                .and_where(Expr::col(outbox::Column::Id).lte(up_to))
                .and_where(Expr::col(outbox::Column::SentAt).lt(sent_before))
                .order_by(outbox::Column::Id, Order::Asc)
                .limit(PRUNE_CHUNK)
                .to_owned();
            outbox::Entity::delete_many().filter(outbox::Column::Id.in_subquery(oldest))
        })
        .await
    }
}

/// Unsent outbox rows handed to the relay; see [`Store::outbox_batch`].
#[must_use = "publish the rows, then mark_sent the confirmed ones"]
pub struct OutboxBatch {
    pub rows: Vec<OutboxRow>,
    claim: Claim,
}

enum Claim {
    /// PostgreSQL: the rows are locked by this open transaction.
    Locked(DatabaseTransaction),
    /// SQLite: nothing held.
    Unlocked(Store),
    /// No rows.
    Nothing,
}

impl std::fmt::Debug for OutboxBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxBatch")
            .field("rows", &self.rows)
            .finish_non_exhaustive()
    }
}

impl OutboxBatch {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Marks `ids` sent and ends the claim (commits); the batch's other rows stay unsent and
    /// come back in a later batch.
    pub async fn mark_sent(self, ids: &[i64]) -> Result<(), StoreError> {
        let now = Utc::now();
        match self.claim {
            Claim::Locked(txn) => {
                mark_sent(&txn, ids, now).await?;
                txn.commit().await?;
            }
            Claim::Unlocked(store) => {
                if !ids.is_empty() {
                    let _lock = store.write_lock().await;
                    mark_sent(&store.writes, ids, now).await?;
                }
            }
            Claim::Nothing => {}
        }
        Ok(())
    }

    /// Gives the rows back unsent (same as dropping the batch, but waits for the release).
    pub async fn release(self) -> Result<(), StoreError> {
        if let Claim::Locked(txn) = self.claim {
            txn.rollback().await?;
        }
        Ok(())
    }
}

pub(super) async fn mark_sent(
    db: &impl ConnectionTrait,
    ids: &[i64],
    now: DateTime<Utc>,
) -> Result<(), DbErr> {
    for chunk in ids.chunks(MAX_PARAMS) {
        outbox::Entity::update_many()
            .col_expr(outbox::Column::SentAt, sea_orm::sea_query::Expr::val(now))
            .filter(outbox::Column::Id.is_in(chunk.iter().copied()))
            .filter(outbox::Column::SentAt.is_null())
            .exec(db)
            .await?;
    }
    Ok(())
}

fn parse_outbox(rows: Vec<outbox::Model>) -> Result<Vec<OutboxRow>, StoreError> {
    rows.into_iter()
        .map(|row| {
            let message = serde_json::from_str(&row.message)
                .map_err(|e| StoreError::Corrupt(format!("outbox row {}: {e}", row.id)))?;
            Ok(OutboxRow {
                id: row.id,
                saga_id: row.saga_id,
                message,
                created_at: row.created_at,
            })
        })
        .collect()
}
