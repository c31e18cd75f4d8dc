//! The outbox relay against a real broker: a command goes out with the lifetime its decision
//! gave it as the AMQP `expiration`, counted from its publication (even when it waited in the
//! outbox past its `discard_after`), and an attempt that a later attempt of the same step in the
//! outbox supersedes is marked sent without being published; the commands of sagas started
//! while the relay runs go out once each, from memory, and are marked sent in the database.
//! Beside it, the watch on the replies queue that holds step timeouts back while replies wait.
//!
//! Needs `AMQP_URL` and `rabbitmqctl` on the PATH (the test gets a vhost of its own).

use std::process::Command;
use std::time::Duration;

use chrono::Utc;
use futures_util::StreamExt;
use orchestrator::consumers;
use orchestrator::runtime::Runtime;
use orchestrator::store::{Commit, Store};
use orchestrator::timers::RepliesWaiting;
use saga_amqp::Publisher;
use saga_amqp::lapin::options::QueueDeclareOptions;
use saga_amqp::lapin::types::FieldTable;
use saga_engine::Definitions;
use saga_schemas::amqp::{OutgoingMessage, REPLIES_QUEUE, command_queue, dead_letter_queue};
use saga_schemas::{Direction, StepCommand};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

fn rabbitmqctl(args: &[&str]) {
    let output = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl (needed for a test vhost): {e}"));
    assert!(
        output.status.success(),
        "rabbitmqctl {args:?}: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A vhost of the test's own, deleted on drop.
struct Vhost {
    name: String,
    url: String,
}

impl Vhost {
    fn new() -> Vhost {
        let base = std::env::var("AMQP_URL").unwrap_or_else(|_| {
            panic!(
                "AMQP_URL is not set: this test needs a RabbitMQ broker, e.g. \
                 AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f (and rabbitmqctl on the PATH)"
            )
        });
        let name = format!("saga-relay-test-{}", Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &name]);
        let user = base
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .and_then(|(userinfo, _)| userinfo.split(':').next())
            .unwrap_or("guest")
            .to_owned();
        rabbitmqctl(&["set_permissions", "-p", &name, &user, ".*", ".*", ".*"]);
        let (scheme, rest) = base.split_once("://").expect("AMQP_URL is a URL");
        let authority = rest.split('/').next().unwrap_or(rest);
        let url = format!("{scheme}://{authority}/{name}");
        Vhost { name, url }
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.name])
            .output();
    }
}

/// A SQLite store in a file of its own, deleted on drop.
struct TempStore {
    store: Store,
    path: std::path::PathBuf,
}

impl TempStore {
    async fn new() -> TempStore {
        let path = std::env::temp_dir().join(format!("saga-relay-{}.db", Uuid::new_v4()));
        let store = Store::connect(&format!("sqlite://{}?mode=rwc", path.display()))
            .await
            .expect("a SQLite store");
        TempStore { store, path }
    }

    /// Waits up to `limit` for every outbox row to be marked sent; `why` says what it means if
    /// they are not.
    async fn wait_until_all_sent(&self, limit: Duration, why: &str) {
        let mut waited = Duration::ZERO;
        loop {
            let unsent = self.store.outbox_backlog().await.unwrap();
            if unsent == 0 {
                return;
            }
            assert!(
                waited < limit,
                "{unsent} outbox rows unsent after {limit:?}: {why}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        }
    }
}

impl Drop for TempStore {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut p = self.path.clone().into_os_string();
            p.push(suffix);
            let _ = std::fs::remove_file(p);
        }
    }
}

/// A relay running on a store and a vhost of its own, with the sagas of a definitions file.
struct Running {
    runtime: Runtime,
    conn: saga_amqp::lapin::Connection,
    shutdown: CancellationToken,
    relay: tokio::task::JoinHandle<Result<(), saga_amqp::AmqpError>>,
    // Dropped after the connection: the vhost is deleted last.
    db: TempStore,
    _vhost: Vhost,
}

impl Running {
    /// Starts the relay with `yaml`'s sagas (publishing no lifecycle events), the queues of
    /// `participants` declared.
    async fn start(yaml: &str, participants: &[&str]) -> Running {
        let vhost = Vhost::new();
        let db = TempStore::new().await;
        let definitions = Definitions::parse("sagas.yaml", yaml).unwrap();
        let runtime = Runtime::new(definitions, db.store.clone())
            .unwrap()
            .publishing(orchestrator::runtime::PublishEvents::None);
        let conn = saga_amqp::connect(&vhost.url, "relay test").await.unwrap();
        declare(&conn, participants).await;
        let publisher = Publisher::open(&conn).await.unwrap();
        let shutdown = CancellationToken::new();
        let relay = tokio::spawn(orchestrator::relay::run(
            runtime.clone(),
            publisher,
            orchestrator::relay::PackCommands::None,
            shutdown.clone(),
        ));
        Running {
            runtime,
            conn,
            shutdown,
            relay,
            db,
            _vhost: vhost,
        }
    }

    /// Waits for every outbox row to be marked sent, then stops.
    async fn stop_once_all_sent(self) {
        self.db
            .wait_until_all_sent(Duration::from_secs(10), "published but never marked sent")
            .await;
        self.shutdown.cancel();
        self.relay.await.unwrap().unwrap();
        // Cleanup only: a broker slow to answer the close must not hang the test.
        let _ =
            tokio::time::timeout(Duration::from_secs(5), self.conn.close(200, "done".into())).await;
    }
}

/// Declares the queues of `participants` (and the orchestrator's own).
async fn declare(conn: &saga_amqp::lapin::Connection, participants: &[&str]) {
    let setup = conn.create_channel().await.unwrap();
    saga_amqp::declare_orchestrator_topology(&setup, participants, saga_amqp::QueueType::Quorum)
        .await
        .unwrap();
    let _ = setup.close(200, "declared".into()).await;
}

fn command(saga_id: Uuid, attempt: u32) -> StepCommand {
    StepCommand {
        message_id: Uuid::new_v4(),
        saga_id,
        saga_name: "order".into(),
        step: "charge".into(),
        direction: Direction::Execute,
        action: "charge".into(),
        attempt,
        data: Default::default(),
        action_output: None,
        expires_at: None,
    }
}

/// A delivery's AMQP `expiration`, in milliseconds.
fn expiration(delivery: &saga_amqp::lapin::message::Delivery) -> u64 {
    delivery
        .properties
        .expiration()
        .as_ref()
        .expect("an expiration")
        .as_str()
        .parse()
        .unwrap()
}

/// The next delivery of `consumer`, acked.
async fn next(consumer: &mut saga_amqp::lapin::Consumer) -> saga_amqp::lapin::message::Delivery {
    let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("a message within 10 s")
        .unwrap()
        .unwrap();
    saga_amqp::ack(&delivery).await.unwrap();
    delivery
}

async fn ready(conn: &saga_amqp::lapin::Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let q = ch
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .unwrap();
    let _ = ch.close(200, "done".into()).await;
    q.message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn superseded_commands_are_not_published_and_the_rest_carry_an_expiration() {
    let vhost = Vhost::new();
    let db = TempStore::new().await;
    let store = &db.store;
    let runtime = Runtime::new(Definitions { sagas: Vec::new() }, store.clone()).unwrap();

    let conn = saga_amqp::connect(&vhost.url, "relay test").await.unwrap();
    let setup = conn.create_channel().await.unwrap();
    saga_amqp::declare_orchestrator_topology(&setup, &["payments"], saga_amqp::QueueType::Quorum)
        .await
        .unwrap();

    // Attempt 1 was superseded while the relay was not running; attempt 2 is current.
    let saga_id = Uuid::new_v4();
    let now = Utc::now();
    let old = command(saga_id, 1);
    let current = command(saga_id, 2);
    let past = Some(now - chrono::Duration::seconds(1));
    let outbox = vec![
        OutgoingMessage::command(&old, "payments", REPLIES_QUEUE, past),
        // Routed nowhere: had the relay tried to publish it, the broker would have returned it
        // (mandatory) and it would stay in the outbox.
        OutgoingMessage::command(&command(saga_id, 1), "retired", REPLIES_QUEUE, past),
        OutgoingMessage::command(
            &current,
            "payments",
            REPLIES_QUEUE,
            Some(now + chrono::Duration::seconds(60)),
        ),
    ];
    store
        .commit(&[Commit {
            outbox,
            ..Commit::empty(saga_id, now)
        }])
        .await
        .unwrap();
    // Another saga's only attempt waited in the outbox past its discard_after (a broker outage):
    // it is still the question to ask, so it goes out, with its whole 30 s lifetime.
    let other = command(Uuid::new_v4(), 1);
    let decided = now - chrono::Duration::seconds(40);
    store
        .commit(&[Commit {
            outbox: vec![OutgoingMessage::command(
                &other,
                "payments",
                REPLIES_QUEUE,
                Some(decided + chrono::Duration::seconds(30)),
            )],
            ..Commit::empty(other.saga_id, decided)
        }])
        .await
        .unwrap();
    assert_eq!(store.outbox_backlog().await.unwrap(), 4);

    let publisher = Publisher::open(&conn).await.unwrap();
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(orchestrator::relay::run(
        runtime,
        publisher,
        orchestrator::relay::PackCommands::None,
        shutdown.clone(),
    ));
    db.wait_until_all_sent(
        Duration::from_secs(15),
        "the relay tried to publish a superseded command",
    )
    .await;

    let queue = command_queue("payments");
    let (_ch, mut consumer) = saga_amqp::open_consumer(&conn, &queue, "", 4)
        .await
        .unwrap();
    let mut published = std::collections::BTreeMap::new();
    while published.len() < 2 {
        let delivery = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("two commands within 10 s")
            .unwrap()
            .unwrap();
        let id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_default();
        saga_amqp::ack(&delivery).await.unwrap();
        published.insert(id, expiration(&delivery));
    }
    let current_ttl = published
        .get(&current.message_id.to_string())
        .expect("the current attempt is published");
    assert!(
        (45_000..=60_000).contains(current_ttl),
        "its 60 s lifetime: {current_ttl}"
    );
    let other_ttl = published
        .get(&other.message_id.to_string())
        .expect("a late but current attempt is published");
    assert!(
        (20_000..=30_000).contains(other_ttl),
        "its 30 s lifetime, counted from publication: {other_ttl}"
    );
    let more = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
    assert!(more.is_err(), "the superseded attempt was not published");
    assert_eq!(ready(&conn, &dead_letter_queue(&queue)).await, 0);

    shutdown.cancel();
    relay.await.unwrap().unwrap();
    // Cleanup only: a broker slow to answer the close must not hang the test.
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "done".into())).await;
}

/// Commands published together for a participant named in `PACK_COMMANDS` go out as one
/// `saga.step_commands` message, in the order they were decided; another participant's go out
/// one message each, as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_for_a_packing_participant_go_out_together() {
    let vhost = Vhost::new();
    let db = TempStore::new().await;
    let store = &db.store;
    let runtime = Runtime::new(Definitions { sagas: Vec::new() }, store.clone()).unwrap();
    let conn = saga_amqp::connect(&vhost.url, "relay test").await.unwrap();
    declare(&conn, &["payments", "inventory"]).await;

    let now = Utc::now();
    let later = |s| Some(now + chrono::Duration::seconds(s));
    let payments: Vec<StepCommand> = (0..3).map(|_| command(Uuid::new_v4(), 1)).collect();
    let inventory: Vec<StepCommand> = (0..2).map(|_| command(Uuid::new_v4(), 1)).collect();
    // Committed before the relay starts, so its first read of the database has them all.
    for (i, pay) in payments.iter().enumerate() {
        let lifetime = later(30 + i as i64);
        let mut commits = vec![Commit {
            outbox: vec![OutgoingMessage::command(
                pay,
                "payments",
                REPLIES_QUEUE,
                lifetime,
            )],
            ..Commit::empty(pay.saga_id, now)
        }];
        if let Some(reserve) = inventory.get(i) {
            commits.push(Commit {
                outbox: vec![OutgoingMessage::command(
                    reserve,
                    "inventory",
                    REPLIES_QUEUE,
                    later(30),
                )],
                ..Commit::empty(reserve.saga_id, now)
            });
        }
        store.commit(&commits).await.unwrap();
    }
    assert_eq!(store.outbox_backlog().await.unwrap(), 5);

    let publisher = Publisher::open(&conn).await.unwrap();
    let shutdown = CancellationToken::new();
    let relay = tokio::spawn(orchestrator::relay::run(
        runtime,
        publisher,
        "payments".parse().unwrap(),
        shutdown.clone(),
    ));
    db.wait_until_all_sent(Duration::from_secs(15), "the relay did not publish them")
        .await;

    let (_ch, mut packed) = saga_amqp::open_consumer(&conn, &command_queue("payments"), "", 4)
        .await
        .unwrap();
    let delivery = next(&mut packed).await;
    assert_eq!(
        delivery.properties.kind().as_ref().map(|k| k.as_str()),
        Some(saga_schemas::amqp::message_type::STEP_COMMANDS)
    );
    assert_eq!(
        delivery.properties.reply_to().as_ref().map(|r| r.as_str()),
        Some(REPLIES_QUEUE)
    );
    let expiration = expiration(&delivery);
    assert!(
        (25_000..=32_000).contains(&expiration),
        "the latest of its commands' lifetimes (32 s): {expiration}"
    );
    let pack: saga_schemas::StepCommands = saga_amqp::decode_pack(&delivery).unwrap();
    let commands: Vec<StepCommand> = pack.commands.into_iter().map(|p| p.command).collect();
    assert_eq!(
        commands, payments,
        "every command once, in the order decided"
    );
    let more = tokio::time::timeout(Duration::from_millis(500), packed.next()).await;
    assert!(more.is_err(), "one message for the three");

    let (_ch, mut single) = saga_amqp::open_consumer(&conn, &command_queue("inventory"), "", 4)
        .await
        .unwrap();
    let mut alone = Vec::new();
    for _ in 0..2 {
        let delivery = next(&mut single).await;
        assert_eq!(
            delivery.properties.kind().as_ref().map(|k| k.as_str()),
            Some(saga_schemas::amqp::message_type::STEP_COMMAND)
        );
        alone.push(saga_amqp::decode::<StepCommand>(&delivery).unwrap());
    }
    alone.sort_by_key(|c| c.message_id);
    let mut expected = inventory.clone();
    expected.sort_by_key(|c| c.message_id);
    assert_eq!(alone, expected);

    shutdown.cancel();
    relay.await.unwrap().unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "done".into())).await;
}

const SAGAS: &str = "
sagas:
  - name: pay
    steps:
      - name: charge
        participant: payments
        action: charge
        kind: retriable
        timeout: 30s
  - name: ship
    steps:
      - name: send
        participant: shipping
        action: send
        kind: retriable
        timeout: 30s
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_committed_while_the_relay_runs_go_out_once_and_are_marked_sent() {
    let running = Running::start(SAGAS, &["payments"]).await;
    let (runtime, conn) = (&running.runtime, &running.conn);

    // Started in waves while the relay runs, so they come to it through the handoff.
    let mut started = std::collections::HashSet::new();
    for _ in 0..10 {
        let starts = (0..20).map(|_| runtime.start("pay", Default::default(), None));
        for result in futures_util::future::join_all(starts).await {
            started.insert(result.expect("a start").saga_id);
        }
    }

    commanded_once_each(
        conn,
        &command_queue("payments"),
        &started,
        Duration::from_secs(20),
    )
    .await;

    // The marks rode on the group commit (or went alone, once it was idle).
    running.stop_once_all_sent().await;
}

/// Receives one command per saga of `expected` from `queue` and fails on a second for any.
async fn commanded_once_each(
    conn: &saga_amqp::lapin::Connection,
    queue: &str,
    expected: &std::collections::HashSet<Uuid>,
    within: Duration,
) {
    let (_ch, mut consumer) = saga_amqp::open_consumer(conn, queue, "", 50).await.unwrap();
    let mut commanded = std::collections::HashSet::new();
    while commanded.len() < expected.len() {
        let delivery = tokio::time::timeout(within, consumer.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{} of {} commands on {queue} within {within:?}",
                    commanded.len(),
                    expected.len()
                )
            })
            .unwrap()
            .unwrap();
        let command: StepCommand = serde_json::from_slice(&delivery.data).unwrap();
        saga_amqp::ack(&delivery).await.unwrap();
        assert!(
            commanded.insert(command.saga_id),
            "saga {} commanded twice on {queue}",
            command.saga_id
        );
    }
    assert_eq!(&commanded, expected);
    let more = tokio::time::timeout(Duration::from_millis(1500), consumer.next()).await;
    assert!(more.is_err(), "a command was published twice on {queue}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_the_broker_refuses_stay_unsent_while_the_rest_go_out_and_go_once_it_takes_them() {
    // No queue for shipping yet: its commands come back unroutable, never confirmed.
    let running = Running::start(SAGAS, &["payments"]).await;
    let (runtime, conn, store) = (&running.runtime, &running.conn, &running.db.store);

    // Both kinds in the same waves, so refused and confirmed rows share batches.
    let (mut paid, mut shipped) = (
        std::collections::HashSet::new(),
        std::collections::HashSet::new(),
    );
    for _ in 0..10 {
        let start = |saga| {
            futures_util::future::join_all(
                (0..10).map(|_| runtime.start(saga, Default::default(), None)),
            )
        };
        let (pays, ships) = futures_util::future::join(start("pay"), start("ship")).await;
        paid.extend(pays.into_iter().map(|r| r.expect("a start").saga_id));
        shipped.extend(ships.into_iter().map(|r| r.expect("a start").saga_id));
    }

    commanded_once_each(
        conn,
        &command_queue("payments"),
        &paid,
        Duration::from_secs(20),
    )
    .await;
    let mut waited = Duration::ZERO;
    loop {
        let unsent = store.outbox_backlog().await.unwrap();
        if unsent == shipped.len() as u64 {
            break;
        }
        assert!(
            unsent > shipped.len() as u64 && waited < Duration::from_secs(10),
            "{unsent} outbox rows unsent, expected the {} refused ones (after {waited:?})",
            shipped.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }

    // Once the queue exists, the refused commands go out (the relay backs off up to 6.4 s).
    declare(conn, &["shipping"]).await;
    commanded_once_each(
        conn,
        &command_queue("shipping"),
        &shipped,
        Duration::from_secs(30),
    )
    .await;
    running.stop_once_all_sent().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replies_waiting_unread_are_read_from_the_broker() {
    let vhost = Vhost::new();
    let conn = saga_amqp::connect(&vhost.url, "watch test").await.unwrap();
    declare(&conn, &["payments"]).await;
    let waiting = RepliesWaiting::default();
    assert_eq!(waiting.recent(), None, "nothing read yet");
    let shutdown = CancellationToken::new();
    let watch = consumers::watch_replies_waiting(&conn, waiting.clone(), shutdown.clone());

    let check = async {
        let until = |n: u32| {
            let waiting = waiting.clone();
            async move {
                while waiting.recent() != Some(n) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(20), until(0))
            .await
            .expect("the empty queue read");
        let channel = conn.create_channel().await.unwrap();
        for _ in 0..3 {
            channel
                .basic_publish(
                    "".into(),
                    REPLIES_QUEUE.into(),
                    Default::default(),
                    b"{}",
                    Default::default(),
                )
                .await
                .unwrap();
        }
        tokio::time::timeout(Duration::from_secs(20), until(3))
            .await
            .expect("the three replies read");
        channel
            .queue_purge(REPLIES_QUEUE.into(), Default::default())
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(20), until(0))
            .await
            .expect("the purge read");
        shutdown.cancel();
    };
    let (watched, ()) = tokio::join!(watch, check);
    watched.expect("the watch stops cleanly at shutdown");
    let _ = tokio::time::timeout(Duration::from_secs(5), conn.close(200, "done".into())).await;
}
