//! The inbox: ids of the replies already handled (recorded by [`Store::commit`]).

use std::collections::HashSet;

use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect};
use uuid::Uuid;

use super::entity::inbox;
use super::{MAX_PARAMS, Store, StoreError};

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
}
