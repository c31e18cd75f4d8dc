//! The four example services against a real broker, driven through `order-checkout` sagas the
//! way the orchestrator would (commands and replies, data merged by hand), then their books
//! cross-checked. Needs `AMQP_URL` and `rabbitmqctl` (for a vhost of the test's own).

use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use saga_amqp::lapin::options::QueueDeclareOptions;
use saga_amqp::lapin::types::FieldTable;
use saga_amqp::{OutgoingMessage, Publisher};
use saga_examples::books::{self, Books, Service};
use saga_examples::{inventory, orders, payments, shipping};
use saga_participant::{
    CancellationToken, Data, Direction, Outcome, Participant, SdkConfig, StepCommand, StepReply,
};
use serde_json::{Value, json};
use uuid::Uuid;

const REPLY_QUEUE: &str = "checkout-test.replies";
const INITIAL_STOCK: i64 = 10;
const PAYMENT_LIMIT: i64 = 1_000;

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| {
        panic!("AMQP_URL is not set: this test needs a RabbitMQ broker, e.g. AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f")
    })
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run rabbitmqctl: {e}"));
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Env {
    vhost: String,
    url: String,
    dir: std::path::PathBuf,
}

impl Env {
    fn new() -> Self {
        let base = amqp_url();
        let vhost = format!("saga-examples-test-{}", Uuid::new_v4().simple());
        rabbitmqctl(&["add_vhost", &vhost]);
        let user = base
            .split_once("://")
            .and_then(|(_, rest)| rest.split_once('@'))
            .map_or("guest", |(userinfo, _)| {
                userinfo.split(':').next().unwrap_or("guest")
            })
            .to_owned();
        rabbitmqctl(&["set_permissions", "-p", &vhost, &user, ".*", ".*", ".*"]);
        let (scheme, rest) = base.split_once("://").unwrap();
        let authority = rest.split(['/', '?']).next().unwrap();
        let url = format!("{scheme}://{authority}/{vhost}");
        let dir =
            std::env::temp_dir().join(format!("saga-examples-test-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        Env { vhost, url, dir }
    }

    fn database_url(&self, service: Service) -> String {
        format!(
            "sqlite://{}/{}.db?mode=rwc",
            self.dir.display(),
            service.name()
        )
    }

    fn start(
        &self,
        service: Service,
        participant: Participant,
        shutdown: &CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let config = SdkConfig {
            amqp_url: self.url.clone().into(),
            database_url: self.database_url(service).into(),
            database_schema: None,
            database_pool_size: None,
            prefetch: 8,
            database_transactions: None,
            connection_name: None,
            amqp_ca_file: None,
            queue_type: Default::default(),
        };
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            participant
                .run(config, shutdown)
                .await
                .expect("the participant runs")
        })
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.vhost])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Orchestrator {
    publisher: Publisher,
    replies: saga_amqp::lapin::Consumer,
    _conn: saga_amqp::lapin::Connection,
}

impl Orchestrator {
    async fn connect(url: &str) -> Self {
        let conn = saga_amqp::connect(url, "checkout-test").await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        for service in Service::ALL {
            saga_amqp::declare_participant_topology(
                &ch,
                service.name(),
                saga_amqp::QueueType::Quorum,
            )
            .await
            .unwrap();
        }
        ch.queue_declare(
            REPLY_QUEUE.into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let publisher = Publisher::open(&conn).await.unwrap();
        let (_, replies) = saga_amqp::open_consumer(&conn, REPLY_QUEUE, "replies", 10)
            .await
            .unwrap();
        Orchestrator {
            publisher,
            replies,
            _conn: conn,
        }
    }

    /// Sends one command (retrying retryable errors with a new attempt) and returns the final
    /// reply and the number of attempts it took.
    async fn step(
        &mut self,
        saga_id: Uuid,
        (participant, step, action): (&str, &str, &str),
        direction: Direction,
        data: &Data,
        action_output: Option<Data>,
    ) -> (StepReply, u32) {
        for attempt in 1..=10 {
            let cmd = StepCommand {
                message_id: Uuid::new_v4(),
                saga_id,
                saga_name: "order-checkout".into(),
                step: step.into(),
                direction,
                action: action.into(),
                attempt,
                data: data.clone(),
                action_output: action_output.clone(),
                expires_at: None,
            };
            self.publisher
                .publish(&OutgoingMessage::command(
                    &cmd,
                    participant,
                    REPLY_QUEUE,
                    None,
                ))
                .await
                .unwrap();
            let delivery = tokio::time::timeout(Duration::from_secs(20), self.replies.next())
                .await
                .unwrap_or_else(|_| panic!("no reply from {participant} for {step}"))
                .unwrap()
                .unwrap();
            saga_amqp::ack(&delivery).await.unwrap();
            let reply: StepReply = saga_amqp::decode(&delivery).unwrap();
            assert_eq!(reply.in_reply_to, cmd.message_id);
            if !matches!(reply.outcome, Outcome::RetryableError { .. }) {
                return (reply, attempt);
            }
        }
        panic!("{participant}.{action} kept failing");
    }
}

/// Drives one order-checkout saga like the orchestrator would; returns "completed" or
/// "compensated" and the attempts `schedule` took.
async fn checkout(orch: &mut Orchestrator, saga_id: Uuid, input: Value) -> (String, u32) {
    let Value::Object(mut data) = input else {
        unreachable!()
    };
    let pre_pivot = [
        ("orders", "create-order", "create_order", "cancel_order"),
        ("inventory", "reserve-stock", "reserve", "release"),
    ];
    let mut done: Vec<(&str, &str, &str, Data)> = Vec::new();
    let mut failed = None;
    for (participant, step, action, compensation) in pre_pivot {
        let (reply, _) = orch
            .step(
                saga_id,
                (participant, step, action),
                Direction::Execute,
                &data,
                None,
            )
            .await;
        match reply.outcome {
            Outcome::Success { output } => {
                data.extend(output.clone());
                done.push((participant, step, compensation, output));
            }
            Outcome::Failure { reason } => {
                failed = Some(reason);
                // The failed step is compensated too (a null compensation for the participant).
                done.push((participant, step, compensation, Data::new()));
                break;
            }
            Outcome::RetryableError { .. } => unreachable!(),
        }
    }
    if failed.is_none() {
        let (reply, _) = orch
            .step(
                saga_id,
                ("payments", "charge-payment", "charge"),
                Direction::Execute,
                &data,
                None,
            )
            .await;
        match reply.outcome {
            Outcome::Success { output } => data.extend(output),
            Outcome::Failure { reason } => failed = Some(reason),
            Outcome::RetryableError { .. } => unreachable!(),
        }
    }
    if failed.is_some() {
        for (participant, step, compensation, output) in done.into_iter().rev() {
            let (reply, _) = orch
                .step(
                    saga_id,
                    (participant, step, compensation),
                    Direction::Compensate,
                    &data,
                    Some(output),
                )
                .await;
            assert!(
                matches!(reply.outcome, Outcome::Success { .. }),
                "{reply:?}"
            );
        }
        return ("compensated".into(), 0);
    }
    let (reply, attempts) = orch
        .step(
            saga_id,
            ("shipping", "schedule-shipment", "schedule"),
            Direction::Execute,
            &data,
            None,
        )
        .await;
    let Outcome::Success { output } = reply.outcome else {
        panic!("{reply:?}")
    };
    data.extend(output);
    let (reply, _) = orch
        .step(
            saga_id,
            ("orders", "approve-order", "approve_order"),
            Direction::Execute,
            &data,
            None,
        )
        .await;
    assert!(
        matches!(reply.outcome, Outcome::Success { .. }),
        "{reply:?}"
    );
    ("completed".into(), attempts)
}

#[tokio::test(flavor = "multi_thread")]
async fn order_checkout_books_agree() {
    let env = Env::new();
    let shutdown = CancellationToken::new();
    let handles = vec![
        env.start(Service::Orders, orders::participant(), &shutdown),
        env.start(
            Service::Inventory,
            inventory::participant(INITIAL_STOCK),
            &shutdown,
        ),
        env.start(
            Service::Payments,
            payments::participant(PAYMENT_LIMIT),
            &shutdown,
        ),
        env.start(
            Service::Shipping,
            shipping::participant(shipping::FailureInjection {
                rate: 0.6,
                max_failures: 3,
            }),
            &shutdown,
        ),
    ];
    let mut orch = Orchestrator::connect(&env.url).await;

    let mut shipping_attempts = 0;
    // Completes.
    // Fixed saga ids: the simulated shipping failures depend on them, so the run is reproducible.
    let (status, attempts) = checkout(
        &mut orch,
        Uuid::from_u128(1),
        json!({ "customer": "ada", "amount": 500, "items": [{ "sku": "book", "quantity": 2 }, { "sku": "pen", "quantity": 1 }] }),
    )
    .await;
    assert_eq!(status, "completed");
    shipping_attempts += attempts;
    // Declined payment: the order is cancelled and the stock released.
    let (status, _) = checkout(
        &mut orch,
        Uuid::from_u128(2),
        json!({ "customer": "bob", "amount": PAYMENT_LIMIT + 1, "items": [{ "sku": "book", "quantity": 3 }] }),
    )
    .await;
    assert_eq!(status, "compensated");
    // Not enough stock (8 books left): nothing reserved, the order cancelled.
    let (status, _) = checkout(
        &mut orch,
        Uuid::from_u128(3),
        json!({ "customer": "cy", "amount": 100, "items": [{ "sku": "pen", "quantity": 1 }, { "sku": "book", "quantity": 9 }] }),
    )
    .await;
    assert_eq!(status, "compensated");
    // More completed orders, with transient shipping failures along the way.
    for i in 0..4 {
        let (status, attempts) = checkout(
            &mut orch,
            Uuid::from_u128(10 + i),
            json!({ "customer": format!("c{i}"), "amount": 100, "items": [{ "sku": "pen", "quantity": 1 }] }),
        )
        .await;
        assert_eq!(status, "completed");
        shipping_attempts += attempts;
    }
    assert!(
        shipping_attempts > 5,
        "some shipping attempts failed transiently ({shipping_attempts} for 5 shipments)"
    );

    shutdown.cancel();
    for handle in handles {
        handle.await.unwrap();
    }

    // The books, read from each service's own database.
    let mut all = Books::default();
    for service in Service::ALL {
        let db = saga_participant::connect_database(&env.database_url(service), None)
            .await
            .unwrap();
        all = all.merge(books::read(service, &db).await.unwrap());
        db.close().await.unwrap();
    }
    let problems = books::check(&all, Some(INITIAL_STOCK));
    assert!(problems.is_empty(), "{problems:#?}");

    let orders = all.orders.as_ref().unwrap();
    assert_eq!(orders.iter().filter(|o| o.status == "approved").count(), 5);
    assert_eq!(orders.iter().filter(|o| o.status == "cancelled").count(), 2);
    assert_eq!(
        all.payments.as_ref().unwrap().len(),
        5,
        "the declined payment left no row"
    );
    assert_eq!(all.shipments.as_ref().unwrap().len(), 5);
    let stock = all.stock.as_ref().unwrap();
    let available = |sku: &str| stock.iter().find(|s| s.sku == sku).unwrap().available;
    assert_eq!(available("book"), INITIAL_STOCK - 2);
    assert_eq!(available("pen"), INITIAL_STOCK - 5);

    // `--report` prints the same books.
    let out = Command::new(env!("CARGO_BIN_EXE_payments"))
        .arg("--report")
        .env("DATABASE_URL", env.database_url(Service::Payments))
        .env_remove("DATABASE_SCHEMA")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Books = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.payments, all.payments);
}

#[test]
fn check_finds_inconsistent_books() {
    use saga_examples::books::{Order, Payment};
    let order = |saga: &str, status: &str| Order {
        order_id: format!("o-{saga}"),
        saga_id: saga.into(),
        customer: "c".into(),
        amount: 1,
        items: vec![],
        status: status.into(),
        created_at: String::new(),
        updated_at: String::new(),
    };
    let payment = |saga: &str, status: &str| Payment {
        payment_id: format!("p-{saga}"),
        saga_id: saga.into(),
        customer: "c".into(),
        amount: 1,
        status: status.into(),
        charged_at: String::new(),
        refunded_at: None,
    };
    let books = Books {
        orders: Some(vec![order("a", "pending"), order("b", "cancelled")]),
        payments: Some(vec![payment("b", "charged"), payment("z", "charged")]),
        ..Books::default()
    };
    let problems = books::check(&books, None);
    assert!(
        problems.iter().any(|p| p.contains("saga a) is pending")),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("saga b) is cancelled but charged")),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("payment p-z (saga z) is charged but its order is missing")),
        "{problems:#?}"
    );
}
