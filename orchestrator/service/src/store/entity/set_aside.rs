//! `set_aside`: inputs that can never be handled (a timer or reply whose saga's definition is
//! gone, or whose saga cannot be read), kept with the reason for an operator to look at.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "set_aside")]
pub struct Model {
    #[sea_orm(primary_key)]
    pub id: i64,
    pub saga_id: Uuid,
    /// `timer` or `reply`.
    #[sea_orm(column_type = "Text")]
    pub kind: String,
    /// JSON text of what was set aside (the timer row, the reply).
    #[sea_orm(column_type = "Text")]
    pub item: String,
    #[sea_orm(column_type = "Text")]
    pub reason: String,
    pub at: DateTimeUtc,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
