//! sea-orm entities, one module per table. JSON columns are plain text, (de)serialised by the
//! store, so the schema is the same on PostgreSQL and SQLite.

pub mod definitions;
pub mod inbox;
pub mod meta;
pub mod outbox;
pub mod saga_events;
pub mod sagas;
pub mod set_aside;
pub mod timers;
