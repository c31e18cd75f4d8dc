//! `timers`: due timers (step timeouts, retry backoff, deadlines), one per `(saga_id, key)`.

use sea_orm::entity::prelude::*;

#[derive(Clone, Debug, PartialEq, Eq, DeriveEntityModel)]
#[sea_orm(table_name = "timers")]
pub struct Model {
    #[sea_orm(primary_key, auto_increment = false)]
    pub saga_id: Uuid,
    /// `TimerKind::key()`.
    #[sea_orm(primary_key, auto_increment = false, column_type = "Text")]
    pub timer_key: String,
    pub due_at: DateTimeUtc,
    /// JSON text of the `TimerKind`.
    #[sea_orm(column_type = "Text")]
    pub timer: String,
}

#[derive(Copy, Clone, Debug, EnumIter, DeriveRelation)]
pub enum Relation {}

impl ActiveModelBehavior for ActiveModel {}
