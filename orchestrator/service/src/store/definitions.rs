//! Definition versions: every saga definition an orchestrator started with, kept by its content
//! hash, so a saga runs to its end on the steps it started with after the file changes.
//!
//! A version is written once (its JSON never changes: the hash is of that content) and read at
//! every start. How many sagas use it comes from the read model, not from counters kept on the
//! hot path.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use saga_engine::SagaDefinition;
use saga_schemas::SagaStatus;
use sea_orm::sea_query::OnConflict;
use sea_orm::{
    ActiveValue::Set, ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect,
};
use serde::Serialize;

use super::entity::{definitions, sagas};
use super::{Store, StoreError};

/// Statuses after which a saga never needs its definition again.
const FINISHED: [SagaStatus; 2] = [SagaStatus::Completed, SagaStatus::Compensated];

/// One stored version and its use, as `GET /definitions` and `orchestrator definitions` show it.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct DefinitionVersion {
    pub name: String,
    pub version: String,
    /// Whether the definition is kept: `false` for a version only sagas recorded (started before
    /// versions were kept, or pruned).
    pub stored: bool,
    /// The last orchestrator to start had it in its file: new sagas of this name start on it.
    pub current: bool,
    /// Sagas on this version not yet completed or compensated (an operator status counts: it
    /// needs the steps to go on).
    pub in_flight: u64,
    /// Sagas ever started on this version and still in the read model.
    pub sagas: u64,
    /// When the first and the last of those sagas started.
    pub first_used: Option<DateTime<Utc>>,
    pub last_used: Option<DateTime<Utc>>,
    /// When an orchestrator first, and last, started with this version in its file.
    pub stored_at: Option<DateTime<Utc>>,
    pub loaded_at: Option<DateTime<Utc>>,
    /// The step names in order, for people comparing versions.
    pub steps: Vec<String>,
}

/// What [`Store::prune_definition`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pruned {
    Deleted,
    /// Sagas still run on it; nothing changed.
    InFlight(u64),
    /// The last orchestrator started with it in its file: it may start sagas on it at any
    /// moment.
    Loaded,
    NotFound,
}

impl Store {
    /// Stores each definition that is not stored yet and marks all of them loaded `now`.
    pub async fn store_definitions(
        &self,
        defs: &[SagaDefinition],
        now: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        if defs.is_empty() {
            return Ok(());
        }
        let rows = defs
            .iter()
            .map(|def| -> Result<definitions::ActiveModel, StoreError> {
                Ok(definitions::ActiveModel {
                    name: Set(def.name.clone()),
                    version: Set(def.version.clone()),
                    definition: Set(serde_json::to_string(def)
                        .map_err(|e| StoreError::Corrupt(e.to_string()))?),
                    stored_at: Set(now),
                    loaded_at: Set(now),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let w = self.begin_write().await?;
        let written = definitions::Entity::insert_many(rows)
            .on_conflict(
                OnConflict::columns([definitions::Column::Name, definitions::Column::Version])
                    .update_column(definitions::Column::LoadedAt)
                    .to_owned(),
            )
            .exec(&w.txn)
            .await;
        match written {
            Ok(_) => Ok(w.commit().await?),
            Err(error) => {
                w.rollback().await;
                Err(error.into())
            }
        }
    }

    /// Every stored version, each with its recorded hash as its `version`.
    pub async fn stored_definitions(&self) -> Result<Vec<SagaDefinition>, StoreError> {
        let rows = definitions::Entity::find().all(&self.db).await?;
        rows.into_iter()
            .map(|row| {
                let mut def: SagaDefinition =
                    serde_json::from_str(&row.definition).map_err(|e| {
                        StoreError::Corrupt(format!(
                            "stored definition {} {}: {e}",
                            row.name, row.version
                        ))
                    })?;
                def.version = row.version;
                Ok(def)
            })
            .collect()
    }

    /// Every version, stored or only recorded by sagas, with its use; by name, then newest load
    /// first.
    pub async fn definition_versions(&self) -> Result<Vec<DefinitionVersion>, StoreError> {
        let mut versions: BTreeMap<(String, String), DefinitionVersion> = BTreeMap::new();
        let blank = |name: &str, version: &str| DefinitionVersion {
            name: name.to_owned(),
            version: version.to_owned(),
            stored: false,
            current: false,
            in_flight: 0,
            sagas: 0,
            first_used: None,
            last_used: None,
            stored_at: None,
            loaded_at: None,
            steps: Vec::new(),
        };
        for def in definitions::Entity::find().all(&self.db).await? {
            let steps = serde_json::from_str::<SagaDefinition>(&def.definition)
                .map(|d| d.steps.into_iter().map(|s| s.name).collect())
                .unwrap_or_default();
            versions.insert(
                (def.name.clone(), def.version.clone()),
                DefinitionVersion {
                    stored: true,
                    stored_at: Some(def.stored_at),
                    loaded_at: Some(def.loaded_at),
                    steps,
                    ..blank(&def.name, &def.version)
                },
            );
        }
        type Use = (
            String,
            String,
            i64,
            Option<DateTime<Utc>>,
            Option<DateTime<Utc>>,
        );
        let used: Vec<Use> = sagas::Entity::find()
            .select_only()
            .column(sagas::Column::Name)
            .column(sagas::Column::DefinitionVersion)
            .column_as(sagas::Column::Id.count(), "count")
            .column_as(sagas::Column::CreatedAt.min(), "first")
            .column_as(sagas::Column::CreatedAt.max(), "last")
            .group_by(sagas::Column::Name)
            .group_by(sagas::Column::DefinitionVersion)
            .into_tuple()
            .all(&self.db)
            .await?;
        for (name, version, count, first, last) in used {
            let entry = versions
                .entry((name.clone(), version.clone()))
                .or_insert_with(|| blank(&name, &version));
            entry.sagas = count.max(0) as u64;
            entry.first_used = first;
            entry.last_used = last;
        }
        let in_flight: Vec<(String, String, i64)> = sagas::Entity::find()
            .select_only()
            .column(sagas::Column::Name)
            .column(sagas::Column::DefinitionVersion)
            .column_as(sagas::Column::Id.count(), "count")
            .filter(sagas::Column::Status.is_not_in(FINISHED.map(SagaStatus::as_str)))
            .group_by(sagas::Column::Name)
            .group_by(sagas::Column::DefinitionVersion)
            .into_tuple()
            .all(&self.db)
            .await?;
        for (name, version, count) in in_flight {
            if let Some(entry) = versions.get_mut(&(name, version)) {
                entry.in_flight = count.max(0) as u64;
            }
        }
        let last_load = versions.values().filter_map(|v| v.loaded_at).max();
        let mut list: Vec<DefinitionVersion> = versions.into_values().collect();
        for version in &mut list {
            version.current = version.loaded_at.is_some() && version.loaded_at == last_load;
        }
        list.sort_by(|a, b| a.name.cmp(&b.name).then(b.loaded_at.cmp(&a.loaded_at)));
        Ok(list)
    }

    /// Deletes a stored version that no saga needs and that the last orchestrator to start did
    /// not load (every version of one start shares its `loaded_at`): the checks and the delete
    /// in one transaction.
    pub async fn prune_definition(&self, name: &str, version: &str) -> Result<Pruned, StoreError> {
        let w = self.begin_write().await?;
        let result = async {
            let Some(row) = definitions::Entity::find_by_id((name.to_owned(), version.to_owned()))
                .one(&w.txn)
                .await?
            else {
                return Ok(Pruned::NotFound);
            };
            let loaded_later = definitions::Entity::find()
                .filter(definitions::Column::LoadedAt.gt(row.loaded_at))
                .count(&w.txn)
                .await?;
            if loaded_later == 0 {
                return Ok(Pruned::Loaded);
            }
            let in_flight = sagas::Entity::find()
                .filter(sagas::Column::Name.eq(name))
                .filter(sagas::Column::DefinitionVersion.eq(version))
                .filter(sagas::Column::Status.is_not_in(FINISHED.map(SagaStatus::as_str)))
                .count(&w.txn)
                .await?;
            if in_flight > 0 {
                return Ok(Pruned::InFlight(in_flight));
            }
            definitions::Entity::delete_by_id((name.to_owned(), version.to_owned()))
                .exec(&w.txn)
                .await?;
            Ok::<_, StoreError>(Pruned::Deleted)
        }
        .await;
        match result {
            Ok(Pruned::Deleted) => {
                w.commit().await?;
                Ok(Pruned::Deleted)
            }
            other => {
                w.rollback().await;
                other
            }
        }
    }
}
