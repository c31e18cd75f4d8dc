//! `sagas`: the read model, and the write side's snapshot (`state`, `version`).

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "sagas")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub id: Uuid,
    #[sea_orm(column_type = "Text")]
    pub name: String,
    /// `SagaStatus::as_str()`.
    #[sea_orm(column_type = "Text")]
    pub status: String,
    #[sea_orm(column_type = "Text", nullable)]
    pub business_key: Option<String>,
    #[sea_orm(column_type = "Text", nullable)]
    pub idempotency_key: Option<String>,
    #[sea_orm(column_type = "Text")]
    pub definition_version: String,
    #[sea_orm(column_type = "Text", nullable)]
    pub current_step: Option<String>,
    /// JSON text of the saga data.
    #[sea_orm(column_type = "Text")]
    pub data: String,
    /// JSON text of the `SagaState` snapshot.
    #[sea_orm(column_type = "Text")]
    pub state: String,
    pub version: i64,
    /// The W3C `traceparent` of the saga's start, when it was traced.
    #[sea_orm(column_type = "Text", nullable)]
    pub trace_parent: Option<String>,
    /// The W3C `tracestate` that came with `trace_parent`, passed on with it.
    #[sea_orm(column_type = "Text", nullable)]
    pub trace_state: Option<String>,
    pub created_at: DateTimeUtc,
    pub updated_at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
