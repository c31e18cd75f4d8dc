//! Schema migrations (sea-orm-migration), applied by `Store::connect`.
//!
//! Each migration is written against its own identifiers, not the entities, so it keeps
//! meaning the same thing when the entities change later. Every statement is idempotent
//! (`IF NOT EXISTS`) and `Store::connect` runs the migrator inside one transaction, holding
//! an advisory lock on PostgreSQL, so several processes starting at once are safe.

use sea_orm_migration::prelude::*;
use sea_orm_migration::schema::*;

pub struct Migrator;

#[async_trait::async_trait]
impl MigratorTrait for Migrator {
    fn migrations() -> Vec<Box<dyn MigrationTrait>> {
        vec![
            Box::new(M0001CreateTables),
            Box::new(M0002CreateSetAside),
            Box::new(M0003CreateMeta),
            Box::new(M0004IndexInboxReceivedAt),
            Box::new(M0005CreateDefinitions),
            Box::new(M0006AddSagasTraceParent),
            Box::new(M0007IndexSagasIdempotencyKey),
            Box::new(M0008AddSagasTraceState),
        ]
    }
}

#[derive(DeriveIden)]
enum SagaEvents {
    Table,
    SagaId,
    Seq,
    EventType,
    Payload,
    RecordedAt,
}

#[derive(DeriveIden)]
enum Sagas {
    Table,
    Id,
    Name,
    Status,
    BusinessKey,
    IdempotencyKey,
    DefinitionVersion,
    CurrentStep,
    Data,
    State,
    Version,
    CreatedAt,
    UpdatedAt,
}

#[derive(DeriveIden)]
enum Outbox {
    Table,
    Id,
    SagaId,
    Message,
    CreatedAt,
    SentAt,
}

#[derive(DeriveIden)]
enum Inbox {
    Table,
    MessageId,
    SagaId,
    ReceivedAt,
}

#[derive(DeriveIden)]
enum Timers {
    Table,
    SagaId,
    TimerKey,
    DueAt,
    Timer,
}

struct M0001CreateTables;

impl MigrationName for M0001CreateTables {
    fn name(&self) -> &str {
        "m0001_create_tables"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0001CreateTables {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SagaEvents::Table)
                    .if_not_exists()
                    .col(uuid(SagaEvents::SagaId))
                    .col(big_integer(SagaEvents::Seq))
                    .col(text(SagaEvents::EventType))
                    .col(text(SagaEvents::Payload))
                    .col(timestamp_with_time_zone(SagaEvents::RecordedAt))
                    .primary_key(Index::create().col(SagaEvents::SagaId).col(SagaEvents::Seq))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Sagas::Table)
                    .if_not_exists()
                    .col(uuid(Sagas::Id).primary_key())
                    .col(text(Sagas::Name))
                    .col(text(Sagas::Status))
                    .col(text_null(Sagas::BusinessKey))
                    .col(text_null(Sagas::IdempotencyKey))
                    .col(text(Sagas::DefinitionVersion))
                    .col(text_null(Sagas::CurrentStep))
                    .col(text(Sagas::Data))
                    .col(text(Sagas::State))
                    .col(big_integer(Sagas::Version))
                    .col(timestamp_with_time_zone(Sagas::CreatedAt))
                    .col(timestamp_with_time_zone(Sagas::UpdatedAt))
                    .to_owned(),
            )
            .await?;
        // NULL keys are distinct on both backends: sagas without a key never collide.
        manager
            .create_index(
                Index::create()
                    .name("sagas_name_idempotency_key")
                    .table(Sagas::Table)
                    .col(Sagas::Name)
                    .col(Sagas::IdempotencyKey)
                    .unique()
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        // Keyset paging, newest first: ORDER BY created_at DESC, id DESC.
        manager
            .create_index(
                Index::create()
                    .name("sagas_created_at_id")
                    .table(Sagas::Table)
                    .col((Sagas::CreatedAt, IndexOrder::Desc))
                    .col((Sagas::Id, IndexOrder::Desc))
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        // Status filters (in-flight sagas, a status page), also paged newest first.
        manager
            .create_index(
                Index::create()
                    .name("sagas_status_created_at_id")
                    .table(Sagas::Table)
                    .col(Sagas::Status)
                    .col((Sagas::CreatedAt, IndexOrder::Desc))
                    .col((Sagas::Id, IndexOrder::Desc))
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Outbox::Table)
                    .if_not_exists()
                    .col(big_pk_auto(Outbox::Id))
                    .col(uuid(Outbox::SagaId))
                    .col(text(Outbox::Message))
                    .col(timestamp_with_time_zone(Outbox::CreatedAt))
                    .col(timestamp_with_time_zone_null(Outbox::SentAt))
                    .to_owned(),
            )
            .await?;
        // Partial index: the relay only ever looks for unsent rows, oldest first. sea-query
        // has no builder for a partial index; this text is valid on both backends.
        manager
            .get_connection()
            .execute_unprepared(
                r#"CREATE INDEX IF NOT EXISTS "outbox_unsent" ON "outbox" ("id") WHERE "sent_at" IS NULL"#,
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Inbox::Table)
                    .if_not_exists()
                    .col(uuid(Inbox::MessageId).primary_key())
                    .col(uuid(Inbox::SagaId))
                    .col(timestamp_with_time_zone(Inbox::ReceivedAt))
                    .to_owned(),
            )
            .await?;

        manager
            .create_table(
                Table::create()
                    .table(Timers::Table)
                    .if_not_exists()
                    .col(uuid(Timers::SagaId))
                    .col(text(Timers::TimerKey))
                    .col(timestamp_with_time_zone(Timers::DueAt))
                    .col(text(Timers::Timer))
                    .primary_key(Index::create().col(Timers::SagaId).col(Timers::TimerKey))
                    .to_owned(),
            )
            .await?;
        manager
            .create_index(
                Index::create()
                    .name("timers_due_at")
                    .table(Timers::Table)
                    .col(Timers::DueAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        for table in [
            Timers::Table.into_iden(),
            Inbox::Table.into_iden(),
            Outbox::Table.into_iden(),
            Sagas::Table.into_iden(),
            SagaEvents::Table.into_iden(),
        ] {
            manager
                .drop_table(Table::drop().table(table).if_exists().to_owned())
                .await?;
        }
        Ok(())
    }
}

#[derive(DeriveIden)]
enum SetAside {
    Table,
    Id,
    SagaId,
    Kind,
    Item,
    Reason,
    At,
}

/// `set_aside`: timers and replies that can never be handled, with why.
struct M0002CreateSetAside;

impl MigrationName for M0002CreateSetAside {
    fn name(&self) -> &str {
        "m0002_create_set_aside"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0002CreateSetAside {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(SetAside::Table)
                    .if_not_exists()
                    .col(big_pk_auto(SetAside::Id))
                    .col(uuid(SetAside::SagaId))
                    .col(text(SetAside::Kind))
                    .col(text(SetAside::Item))
                    .col(text(SetAside::Reason))
                    .col(timestamp_with_time_zone(SetAside::At))
                    .to_owned(),
            )
            .await?;
        Ok(())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(SetAside::Table).if_exists().to_owned())
            .await
    }
}

#[derive(DeriveIden)]
enum Meta {
    Table,
    Key,
    Value,
}

/// `meta`: facts about the database, such as the identity orchestrators compare to find one
/// with another database on their vhost.
struct M0003CreateMeta;

impl MigrationName for M0003CreateMeta {
    fn name(&self) -> &str {
        "m0003_create_meta"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0003CreateMeta {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Meta::Table)
                    .if_not_exists()
                    .col(text(Meta::Key).primary_key())
                    .col(text(Meta::Value))
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(Table::drop().table(Meta::Table).if_exists().to_owned())
            .await
    }
}

/// The inbox is pruned by age (`Store::prune_inbox`): find the old rows without a full scan.
struct M0004IndexInboxReceivedAt;

impl MigrationName for M0004IndexInboxReceivedAt {
    fn name(&self) -> &str {
        "m0004_index_inbox_received_at"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0004IndexInboxReceivedAt {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_index(
                Index::create()
                    .name("inbox_received_at")
                    .table(Inbox::Table)
                    .col(Inbox::ReceivedAt)
                    .if_not_exists()
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("inbox_received_at")
                    .table(Inbox::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}

#[derive(DeriveIden)]
enum Definitions {
    Table,
    Name,
    Version,
    Definition,
    StoredAt,
    LoadedAt,
}

/// `definitions`: every saga definition an orchestrator started with, by content hash, so a
/// saga runs to its end on the version it started with whatever the file says now.
struct M0005CreateDefinitions;

impl MigrationName for M0005CreateDefinitions {
    fn name(&self) -> &str {
        "m0005_create_definitions"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0005CreateDefinitions {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .create_table(
                Table::create()
                    .table(Definitions::Table)
                    .if_not_exists()
                    .col(text(Definitions::Name))
                    .col(text(Definitions::Version))
                    .col(text(Definitions::Definition))
                    .col(timestamp_with_time_zone(Definitions::StoredAt))
                    .col(timestamp_with_time_zone(Definitions::LoadedAt))
                    .primary_key(
                        Index::create()
                            .col(Definitions::Name)
                            .col(Definitions::Version),
                    )
                    .to_owned(),
            )
            .await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_table(
                Table::drop()
                    .table(Definitions::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}

/// `sagas.trace_parent`: the W3C `traceparent` of a saga's start, the parent of the spans of
/// inputs that carry no trace context of their own (timers, operator commands).
struct M0006AddSagasTraceParent;

impl MigrationName for M0006AddSagasTraceParent {
    fn name(&self) -> &str {
        "m0006_add_sagas_trace_parent"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0006AddSagasTraceParent {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        add_sagas_text_column(manager, "trace_parent").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop_sagas_column(manager, "trace_parent").await
    }
}

/// A search by idempotency key under any saga name (the API's `idempotency_key` filter, the
/// web view's search box) finds its sagas without a full scan: `sagas_name_idempotency_key`
/// leads with the name. Partial, so sagas started without a key cost it nothing.
struct M0007IndexSagasIdempotencyKey;

impl MigrationName for M0007IndexSagasIdempotencyKey {
    fn name(&self) -> &str {
        "m0007_index_sagas_idempotency_key"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0007IndexSagasIdempotencyKey {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        // sea-query has no builder for a partial index; this text is valid on both backends.
        manager
            .get_connection()
            .execute_unprepared(
                r#"CREATE INDEX IF NOT EXISTS "sagas_idempotency_key" ON "sagas" ("idempotency_key") WHERE "idempotency_key" IS NOT NULL"#,
            )
            .await
            .map(|_| ())
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        manager
            .drop_index(
                Index::drop()
                    .name("sagas_idempotency_key")
                    .table(Sagas::Table)
                    .if_exists()
                    .to_owned(),
            )
            .await
    }
}

/// `sagas.trace_state`: the W3C `tracestate` that came with `trace_parent`, which the spans of
/// inputs without a context of their own, and the commands sent in them, pass on.
struct M0008AddSagasTraceState;

impl MigrationName for M0008AddSagasTraceState {
    fn name(&self) -> &str {
        "m0008_add_sagas_trace_state"
    }
}

#[async_trait::async_trait]
impl MigrationTrait for M0008AddSagasTraceState {
    async fn up(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        add_sagas_text_column(manager, "trace_state").await
    }

    async fn down(&self, manager: &SchemaManager) -> Result<(), DbErr> {
        drop_sagas_column(manager, "trace_state").await
    }
}

/// Adds the nullable text column `name` to `sagas` if it is not there yet.
async fn add_sagas_text_column(manager: &SchemaManager<'_>, name: &str) -> Result<(), DbErr> {
    if manager.has_column("sagas", name).await? {
        return Ok(());
    }
    manager
        .alter_table(
            Table::alter()
                .table(Sagas::Table)
                .add_column(text_null(Alias::new(name)))
                .to_owned(),
        )
        .await
}

/// Drops the column `name` of `sagas`.
async fn drop_sagas_column(manager: &SchemaManager<'_>, name: &str) -> Result<(), DbErr> {
    manager
        .alter_table(
            Table::alter()
                .table(Sagas::Table)
                .drop_column(Alias::new(name))
                .to_owned(),
        )
        .await
}
