//! `definitions`: every saga definition version an orchestrator was started with.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "definitions")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false, column_type = "Text")]
    pub name: String,
    /// `SagaDefinition::version`: the content hash.
    #[sea_orm(primary_key, auto_increment = false, column_type = "Text")]
    pub version: String,
    /// JSON text of the `SagaDefinition`.
    #[sea_orm(column_type = "Text")]
    pub definition: String,
    /// When an orchestrator first started with this version.
    pub stored_at: DateTimeUtc,
    /// When an orchestrator last started with this version in its file.
    pub loaded_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
