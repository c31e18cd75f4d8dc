//! The inbox: ids of the replies already handled (recorded by [`Store::commit`]), kept for a
//! retention and then pruned ([`Store::prune_inbox`]; see `crate::retention` for why that is
//! safe).

use std::collections::HashSet;

use chrono::{DateTime, Utc};
use sea_orm::sea_query::{Expr, ExprTrait, Query};
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use uuid::Uuid;

use super::entity::inbox;
use super::{MAX_PARAMS, PRUNE_CHUNK, Store, StoreError};

impl Store {
    /// Which of `message_ids` are already in the inbox.
    pub async fn seen(&self, message_ids: &[Uuid]) -> Result<HashSet<Uuid>, StoreError> {
        let mut seen = HashSet::new();
        for chunk in message_ids.chunks(MAX_PARAMS) {
            let ids: Vec<Uuid> = inbox::Entity::find()
                .select_only()
                .column(inbox::Column::MessageId)
                .filter(inbox::Column::MessageId.is_in(chunk.iter().copied()))
                .into_tuple()
                .all(&self.db)
                .await?;
            seen.extend(ids);
        }
        Ok(seen)
    }

    /// Deletes the inbox rows recorded before `received_before`; returns how many.
    pub async fn prune_inbox(&self, received_before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.prune_in_chunks(|| {
            let oldest = Query::select()
                .column(inbox::Column::MessageId)
                .from(inbox::Entity)
                .and_where(Expr::col(inbox::Column::ReceivedAt).lt(received_before))
                .limit(PRUNE_CHUNK)
                .to_owned();
            inbox::Entity::delete_many().filter(inbox::Column::MessageId.in_subquery(oldest))
        })
        .await
    }
}
