//! The database's identity: a random id created once, the same for every orchestrator that
//! shares this database, different for any other.

use sea_orm::sea_query::OnConflict;
use sea_orm::{ActiveValue, EntityTrait};
use uuid::Uuid;

use super::entity::meta;
use super::{Store, StoreError};

const DATABASE_ID: &str = "database_id";

impl Store {
    /// This database's id, created by the first orchestrator that asks.
    pub async fn database_id(&self) -> Result<Uuid, StoreError> {
        if let Some(id) = self.read_database_id().await? {
            return Ok(id);
        }
        let _lock = self.write_lock().await;
        // Two processes may race here: the first insert wins, and both read its id.
        meta::Entity::insert(meta::ActiveModel {
            key: ActiveValue::Set(DATABASE_ID.into()),
            value: ActiveValue::Set(Uuid::new_v4().to_string()),
        })
        .on_conflict(
            OnConflict::column(meta::Column::Key)
                .do_nothing()
                .to_owned(),
        )
        .exec_without_returning(&self.writes)
        .await?;
        self.read_database_id()
            .await?
            .ok_or_else(|| StoreError::Corrupt("the database id was not recorded".into()))
    }

    async fn read_database_id(&self) -> Result<Option<Uuid>, StoreError> {
        let Some(row) = meta::Entity::find_by_id(DATABASE_ID.to_owned())
            .one(&self.db)
            .await?
        else {
            return Ok(None);
        };
        row.value
            .parse()
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("the database id `{}`: {e}", row.value)))
    }
}
