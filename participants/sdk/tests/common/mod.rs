//! Test harness: a vhost and a database of the test's own, a test participant running in the
//! background, and a client that publishes commands and reads replies and dead letters.
//!
//! Needs a real broker (`AMQP_URL`, and `rabbitmqctl` on the PATH to create the test's vhost)
//! and, for the PostgreSQL tests, `DATABASE_URL`. A test fails, never skips, when they are
//! missing.

#![allow(dead_code)]

use std::future::Future;
use std::process::Command;
use std::sync::Once;
use std::time::Duration;

use futures_util::StreamExt;
use saga_amqp::lapin::message::Delivery;
use saga_amqp::lapin::options::{QueueDeclareOptions, QueuePurgeOptions};
use saga_amqp::lapin::types::{AMQPValue, FieldTable};
use saga_amqp::lapin::{BasicProperties, Channel, Connection, Consumer};
use saga_amqp::{OutgoingMessage, Publisher};
use saga_participant::sea_orm::{
    ConnectionTrait, Database, DatabaseConnection, DbBackend, Statement,
};
use saga_participant::{
    CancellationToken, Data, Direction, HandlerError, Outcome, Participant, SdkConfig, StepCommand,
    StepReply, failure, success,
};
use saga_schemas::amqp::{command_queue, dead_letter_queue, header};
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use uuid::Uuid;

pub const PARTICIPANT: &str = "testsvc";
pub const REPLY_QUEUE: &str = "test.replies";
pub const TIMEOUT: Duration = Duration::from_secs(20);

pub fn init_tracing() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| "info,sqlx=warn,sea_orm=warn".into());
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .init();
    });
}

pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| {
        panic!(
            "AMQP_URL is not set: these tests need a RabbitMQ broker, e.g. \
             AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f (and rabbitmqctl on the PATH)"
        )
    })
}

pub fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set: the PostgreSQL tests need a server, e.g. \
             DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres"
        )
    })
}

fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl (needed to create a test vhost): {e}"));
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A vhost of the test's own, deleted on drop.
pub struct Vhost {
    pub name: String,
    pub url: String,
}

impl Vhost {
    pub fn new() -> Self {
        let base = amqp_url();
        let name = format!("saga-participant-test-{}", Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        // The user of AMQP_URL (guest by default) gets every permission on it.
        let user = user_of(&base);
        rabbitmqctl(&["set_permissions", "-p", &name, &user, ".*", ".*", ".*"]);
        let url = with_vhost(&base, &name);
        Vhost { name, url }
    }

    /// Makes the broker close every connection to this vhost (as a broker restart would).
    pub fn close_all_connections(&self) {
        rabbitmqctl(&[
            "close_all_connections",
            "-p",
            &self.name,
            "test: simulated broker failure",
        ]);
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

fn user_of(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    match after_scheme.split_once('@') {
        Some((userinfo, _)) => userinfo.split(':').next().unwrap_or("guest").to_owned(),
        None => "guest".to_owned(),
    }
}

fn with_vhost(url: &str, vhost: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .expect("AMQP_URL must look like amqp://host");
    let (authority, query) = match rest.split_once('/') {
        Some((authority, path)) => (authority, path.split_once('?').map(|(_, q)| q)),
        None => (
            rest.split_once('?').map_or(rest, |(a, _)| a),
            rest.split_once('?').map(|(_, q)| q),
        ),
    };
    match query {
        Some(q) => format!("{scheme}://{authority}/{vhost}?{q}"),
        None => format!("{scheme}://{authority}/{vhost}"),
    }
}

/// The test's database: a SQLite file or a PostgreSQL database of its own, removed on drop.
pub struct TestDb {
    pub url: String,
    pub schema: Option<String>,
    cleanup: Cleanup,
}

enum Cleanup {
    File(std::path::PathBuf),
    Postgres { admin_url: String, name: String },
}

impl TestDb {
    pub fn sqlite() -> Self {
        let path = std::env::temp_dir().join(format!(
            "saga-participant-test-{}.db",
            Uuid::new_v4().simple()
        ));
        TestDb {
            url: format!("sqlite://{}?mode=rwc", path.display()),
            schema: None,
            cleanup: Cleanup::File(path),
        }
    }

    /// A fresh PostgreSQL database on the server of `DATABASE_URL`, with `schema`.
    pub async fn postgres(schema: Option<&str>) -> Self {
        let admin_url = database_url();
        let name = format!("saga_participant_test_{}", Uuid::new_v4().simple());
        let admin = Database::connect(admin_url.as_str())
            .await
            .unwrap_or_else(|e| panic!("cannot connect to DATABASE_URL: {e}"));
        admin
            .execute_unprepared(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create the test database");
        admin.close().await.ok();
        let url = replace_database(&admin_url, &name);
        TestDb {
            url,
            schema: schema.map(str::to_owned),
            cleanup: Cleanup::Postgres { admin_url, name },
        }
    }

    /// A connection of its own (search path set to the schema, if any).
    pub async fn connect(&self) -> DatabaseConnection {
        saga_participant::connect_database(&self.url, self.schema.as_deref())
            .await
            .expect("connect to the test database")
    }
}

fn replace_database(url: &str, name: &str) -> String {
    let (scheme, rest) = url
        .split_once("://")
        .expect("DATABASE_URL must look like postgres://host/db");
    let (authority, query) = match rest.split_once('/') {
        Some((authority, path)) => (authority, path.split_once('?').map(|(_, q)| q)),
        None => (rest, None),
    };
    match query {
        Some(q) => format!("{scheme}://{authority}/{name}?{q}"),
        None => format!("{scheme}://{authority}/{name}"),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        match &self.cleanup {
            Cleanup::File(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let mut p = path.clone().into_os_string();
                    p.push(suffix);
                    let _ = std::fs::remove_file(p);
                }
            }
            Cleanup::Postgres { admin_url, name } => {
                let (admin_url, name) = (admin_url.clone(), name.clone());
                // Drop runs inside the test's runtime: do the async work on a thread of its own.
                let _ = std::thread::spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .ok()?;
                    rt.block_on(async {
                        let admin = Database::connect(admin_url.as_str()).await.ok()?;
                        admin
                            .execute_unprepared(&format!(
                                "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                            ))
                            .await
                            .ok()?;
                        admin.close().await.ok()
                    })
                })
                .join();
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The test participant

/// Creates its table `effects`: one row per run of `charge` that committed.
pub async fn create_effects(
    db: &DatabaseConnection,
) -> Result<(), saga_participant::sea_orm::DbErr> {
    db.execute_unprepared(
        "CREATE TABLE IF NOT EXISTS effects (
             id TEXT PRIMARY KEY,
             saga_id TEXT NOT NULL,
             step TEXT NOT NULL,
             kind TEXT NOT NULL,
             attempt BIGINT NOT NULL
         )",
    )
    .await
    .map(drop)
}

fn placeholder(backend: DbBackend, n: usize) -> String {
    if backend == DbBackend::Postgres {
        format!("${n}")
    } else {
        "?".into()
    }
}

async fn insert_effect(
    tx: &impl ConnectionTrait,
    cmd: &StepCommand,
    kind: &str,
) -> Result<String, saga_participant::sea_orm::DbErr> {
    let backend = tx.get_database_backend();
    let id = Uuid::new_v4().to_string();
    let p = |n| placeholder(backend, n);
    tx.execute_raw(Statement::from_sql_and_values(
        backend,
        format!(
            "INSERT INTO effects (id, saga_id, step, kind, attempt) VALUES ({}, {}, {}, {}, {})",
            p(1),
            p(2),
            p(3),
            p(4),
            p(5)
        ),
        [
            id.clone().into(),
            cmd.saga_id.to_string().into(),
            cmd.step.clone().into(),
            kind.into(),
            i64::from(cmd.attempt).into(),
        ],
    ))
    .await?;
    Ok(id)
}

/// Rows of `effects` for a saga, as (kind, attempt).
pub async fn effects(db: &DatabaseConnection, saga_id: Uuid) -> Vec<(String, i64)> {
    let backend = db.get_database_backend();
    db.query_all_raw(Statement::from_sql_and_values(
        backend,
        format!(
            "SELECT kind, attempt FROM effects WHERE saga_id = {} ORDER BY attempt, kind",
            placeholder(backend, 1)
        ),
        [saga_id.to_string().into()],
    ))
    .await
    .expect("read effects")
    .iter()
    .map(|r| {
        (
            r.try_get("", "kind").unwrap(),
            r.try_get("", "attempt").unwrap(),
        )
    })
    .collect()
}

/// Rows of `saga_inbox` for a saga, as (direction, outcome status).
pub async fn inbox(db: &DatabaseConnection, saga_id: Uuid) -> Vec<(String, String)> {
    use saga_participant::inbox;
    use saga_participant::sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QueryOrder};
    inbox::Entity::find()
        .filter(inbox::Column::SagaId.eq(saga_id.to_string()))
        .order_by_asc(inbox::Column::Direction)
        .all(db)
        .await
        .expect("read the inbox")
        .into_iter()
        .map(|r| {
            (
                r.direction,
                r.outcome["status"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect()
}

/// The test participant `testsvc`:
///
/// - action `charge`: writes an effect, then, per the saga data: `{"sleep_ms": n}` waits first;
///   `{"decline": "why"}` returns a business failure (after writing, to show the rollback);
///   `{"fail_before_attempt": n}` returns a retryable error on attempts below n (after writing);
///   `{"panic": true}` panics. Otherwise succeeds with `{"charge_id": <effect id>, "attempt": n}`.
/// - compensation `refund`: writes a `refund` effect and returns the `charge_id` it got in
///   `action_output`.
pub fn participant() -> Participant {
    Participant::new(PARTICIPANT)
        .migrations(|db| Box::pin(create_effects(db)))
        .action("charge", |cmd, tx| {
            Box::pin(async move {
                if let Some(ms) = cmd.data.get("sleep_ms").and_then(Value::as_u64) {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let id = insert_effect(tx, cmd, "charge").await?;
                if let Some(reason) = cmd.data.get("decline").and_then(Value::as_str) {
                    return Ok(failure(reason));
                }
                if let Some(n) = cmd.data.get("fail_before_attempt").and_then(Value::as_u64)
                    && u64::from(cmd.attempt) < n
                {
                    return Err(HandlerError::retryable(format!(
                        "gateway down on attempt {}",
                        cmd.attempt
                    )));
                }
                if cmd.data.get("panic").and_then(Value::as_bool) == Some(true) {
                    panic!("the test handler panics");
                }
                Ok(success(json!({ "charge_id": id, "attempt": cmd.attempt })))
            })
        })
        .compensation("refund", |cmd, tx| {
            Box::pin(async move {
                insert_effect(tx, cmd, "refund").await?;
                let charge_id = cmd
                    .action_output
                    .as_ref()
                    .and_then(|o| o.get("charge_id"))
                    .cloned()
                    .unwrap_or(Value::Null);
                Ok(success(json!({ "refunded": charge_id })))
            })
        })
}

/// A participant running in the background until [`Running::stop`].
pub struct Running {
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), saga_participant::Error>>,
}

impl Running {
    pub fn start(participant: Participant, vhost: &Vhost, db: &TestDb, prefetch: u16) -> Self {
        init_tracing();
        let config = SdkConfig {
            amqp_url: vhost.url.clone().into(),
            database_url: db.url.clone().into(),
            database_schema: db.schema.clone(),
            database_pool_size: None,
            prefetch,
            database_transactions: None,
            connection_name: Some(format!("{PARTICIPANT}@test:{}", vhost.name)),
            amqp_ca_file: None,
            queue_type: Default::default(),
        };
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(participant.run(config, shutdown.clone()));
        Running { shutdown, handle }
    }

    /// Cancels the shutdown token and waits for `run` to return.
    pub async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(TIMEOUT, self.handle)
            .await
            .expect("the participant stops in time")
            .expect("the participant task does not panic");
        result.expect("the participant stops cleanly");
    }
}

// ---------------------------------------------------------------------------------------------
// The client side: what the orchestrator would do

pub struct Client {
    pub conn: Connection,
    pub publisher: Publisher,
    channel: Channel,
    replies: Consumer,
    dead_letters: Consumer,
}

impl Client {
    /// Connects to the vhost, declares the participant's topology (the orchestrator would) and a
    /// reply queue, and starts consuming the replies and the participant's dead-letter queue.
    pub async fn connect(vhost: &Vhost) -> Self {
        let conn = saga_amqp::connect(&vhost.url, "test-client")
            .await
            .expect("connect the test client");
        let channel = conn.create_channel().await.expect("channel");
        saga_amqp::declare_participant_topology(
            &channel,
            PARTICIPANT,
            saga_amqp::QueueType::Quorum,
        )
        .await
        .expect("declare the topology");
        channel
            .queue_declare(
                REPLY_QUEUE.into(),
                QueueDeclareOptions::durable(),
                FieldTable::default(),
            )
            .await
            .expect("declare the reply queue");
        let publisher = Publisher::open(&conn).await.expect("publisher");
        let (_, replies) = saga_amqp::open_consumer(&conn, REPLY_QUEUE, "test-replies", 100)
            .await
            .expect("consume replies");
        let dlq = dead_letter_queue(&command_queue(PARTICIPANT));
        let (_, dead_letters) = saga_amqp::open_consumer(&conn, &dlq, "test-dlq", 100)
            .await
            .expect("consume the dlq");
        Client {
            conn,
            publisher,
            channel,
            replies,
            dead_letters,
        }
    }

    /// Publishes a step command to the participant, replies to [`REPLY_QUEUE`].
    pub async fn send(&self, cmd: &StepCommand) {
        let msg = OutgoingMessage::command(cmd, PARTICIPANT, REPLY_QUEUE, None);
        self.publisher
            .publish(&msg)
            .await
            .expect("publish the command");
    }

    /// Publishes raw bytes with these properties to the participant's queue.
    pub async fn send_raw(&self, body: &[u8], properties: BasicProperties) {
        self.publisher
            .publish_raw(
                saga_schemas::amqp::COMMANDS_EXCHANGE,
                PARTICIPANT,
                body,
                properties,
            )
            .await
            .expect("publish the raw message");
    }

    /// The next reply (acked), or a panic after [`TIMEOUT`].
    pub async fn reply(&mut self) -> StepReply {
        let delivery = next(&mut self.replies, "a reply").await;
        assert_eq!(
            delivery.properties.kind().as_ref().map(|k| k.as_str()),
            Some(saga_schemas::amqp::message_type::STEP_REPLY)
        );
        let reply: StepReply = saga_amqp::decode(&delivery).expect("a valid StepReply");
        assert_eq!(
            delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.to_string()),
            Some(reply.saga_id.to_string())
        );
        assert_eq!(
            delivery
                .properties
                .message_id()
                .as_ref()
                .map(|c| c.to_string()),
            Some(reply.message_id.to_string())
        );
        saga_amqp::ack(&delivery).await.expect("ack the reply");
        reply
    }

    /// Publishes `cmds` to the participant in one packed message (`saga.step_commands`), as the
    /// orchestrator does for a participant named in its `PACK_COMMANDS`.
    pub async fn send_pack(&self, cmds: &[&StepCommand]) {
        let alone: Vec<OutgoingMessage> = cmds
            .iter()
            .map(|cmd| OutgoingMessage::command(cmd, PARTICIPANT, REPLY_QUEUE, None))
            .collect();
        let msg = OutgoingMessage::packed_commands(&alone.iter().collect::<Vec<_>>());
        self.publisher
            .publish(&msg)
            .await
            .expect("publish the packed commands");
    }

    /// The next reply message (acked), which must be a packed one (`saga.step_replies`): its
    /// replies.
    pub async fn packed_replies(&mut self) -> Vec<StepReply> {
        let delivery = next(&mut self.replies, "packed replies").await;
        assert_eq!(
            delivery.properties.kind().as_ref().map(|k| k.as_str()),
            Some(saga_schemas::amqp::message_type::STEP_REPLIES),
            "{}",
            String::from_utf8_lossy(&delivery.data)
        );
        let pack: saga_schemas::StepReplies =
            saga_amqp::decode_pack(&delivery).expect("a valid StepReplies");
        saga_amqp::ack(&delivery).await.expect("ack the replies");
        pack.replies
            .into_iter()
            .map(|packed| packed.reply)
            .collect()
    }

    /// Sends `cmd` and waits for its reply.
    pub async fn call(&mut self, cmd: &StepCommand) -> StepReply {
        self.send(cmd).await;
        let reply = self.reply().await;
        assert_eq!(
            reply.in_reply_to, cmd.message_id,
            "the reply answers the command sent"
        );
        reply
    }

    /// Asserts that no reply arrives within `wait`.
    pub async fn no_reply_within(&mut self, wait: Duration) {
        if let Ok(Some(Ok(delivery))) = tokio::time::timeout(wait, self.replies.next()).await {
            panic!(
                "unexpected reply: {}",
                String::from_utf8_lossy(&delivery.data)
            );
        }
    }

    /// The next dead letter (acked).
    pub async fn dead_letter(&mut self) -> Delivery {
        let delivery = next(&mut self.dead_letters, "a dead letter").await;
        saga_amqp::ack(&delivery)
            .await
            .expect("ack the dead letter");
        delivery
    }

    /// Asserts that no dead letter arrives within `wait`.
    pub async fn no_dead_letter_within(&mut self, wait: Duration) {
        if let Ok(Some(Ok(delivery))) = tokio::time::timeout(wait, self.dead_letters.next()).await {
            panic!(
                "unexpected dead letter: {:?}",
                header(&delivery, "x-dead-letter-reason")
            );
        }
    }

    pub async fn purge_replies(&self) {
        self.channel
            .queue_purge(REPLY_QUEUE.into(), QueuePurgeOptions::default())
            .await
            .expect("purge");
    }
}

async fn next(consumer: &mut Consumer, what: &str) -> Delivery {
    match tokio::time::timeout(TIMEOUT, consumer.next()).await {
        Ok(Some(Ok(delivery))) => delivery,
        Ok(Some(Err(e))) => panic!("consuming {what}: {e}"),
        Ok(None) => panic!("the consumer ended while waiting for {what}"),
        Err(_) => panic!("no {what} within {TIMEOUT:?}"),
    }
}

/// A header of a delivery as text (strings) or a number.
pub fn header(delivery: &Delivery, key: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        other => saga_amqp::header_int(delivery, key)
            .map(|i| i.to_string())
            .or(Some(format!("{other:?}"))),
    }
}

/// A command for the test participant.
pub fn command(
    saga_id: Uuid,
    step: &str,
    direction: Direction,
    action: &str,
    attempt: u32,
    data: Value,
) -> StepCommand {
    let Value::Object(data) = data else {
        panic!("data must be an object")
    };
    StepCommand {
        message_id: Uuid::new_v4(),
        saga_id,
        saga_name: "test-saga".into(),
        step: step.into(),
        direction,
        action: action.into(),
        attempt,
        data,
        action_output: None,
        expires_at: None,
    }
}

/// A first attempt of the test participant's `charge` action, with no data.
pub fn charge(saga_id: Uuid) -> StepCommand {
    command(
        saga_id,
        "charge-payment",
        Direction::Execute,
        "charge",
        1,
        json!({}),
    )
}

/// The same command as a new attempt (new message id).
pub fn retry(cmd: &StepCommand, attempt: u32) -> StepCommand {
    StepCommand {
        message_id: Uuid::new_v4(),
        attempt,
        ..cmd.clone()
    }
}

pub fn output(reply: &StepReply) -> &Data {
    match &reply.outcome {
        Outcome::Success { output } => output,
        other => panic!("expected a success, got {other:?}"),
    }
}

/// The properties of a well-formed command, for raw publishing.
pub fn command_properties(cmd: &StepCommand) -> BasicProperties {
    let msg = OutgoingMessage::command(cmd, PARTICIPANT, REPLY_QUEUE, None);
    saga_amqp::properties(&msg, None).expect("properties")
}

/// Removes a header from properties.
pub fn without_header(properties: BasicProperties, key: &str) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    let mut kept = FieldTable::default();
    for (k, v) in headers.inner() {
        if k.as_str() != key {
            kept.insert(k.clone(), v.clone());
        }
    }
    headers = kept;
    properties.with_headers(headers)
}

/// Sets a header.
pub fn with_header(properties: BasicProperties, key: &str, value: AMQPValue) -> BasicProperties {
    let mut headers = properties.headers().clone().unwrap_or_default();
    headers.insert(key.into(), value);
    properties.with_headers(headers)
}

pub const SCHEMA_VERSION_HEADER: &str = header::SCHEMA_VERSION;

/// Runs `f` with a deadline.
pub async fn within<T>(what: &str, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(TIMEOUT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: timed out"))
}
