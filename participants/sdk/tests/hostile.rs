//! Hostile commands and handlers: huge values, headers near the frame size, a `reply_to` queue
//! that does not exist, outputs over the limits. Each gets a bounded answer or a dead letter with
//! a short reason, and the participant keeps working on the same connection.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use saga_amqp::OutgoingMessage;
use saga_amqp::lapin::BasicProperties;
use saga_amqp::lapin::options::QueueDeclareOptions;
use saga_amqp::lapin::types::{AMQPValue, FieldTable};
use saga_participant::sea_orm::{ConnectionTrait, DatabaseConnection, Statement};
use saga_participant::{Direction, Outcome, Participant, StepReply, failure, success};
use saga_schemas::amqp::{command_queue, header};
use saga_schemas::limits::{MAX_DATA_BYTES, MAX_DEPTH, MAX_REASON_CHARS};
use serde_json::{Value, json};
use uuid::Uuid;

/// A reason is cut to [`MAX_REASON_CHARS`], plus a short note of how much was cut.
const MAX_REASON_WITH_NOTE: usize = MAX_REASON_CHARS + 64;

/// The participant's connections to the vhost, by the broker's names (a reconnect makes a new
/// one).
fn connections(vhost: &Vhost) -> Vec<String> {
    let output = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_connections",
            "-p",
            &vhost.name,
            "name",
            "client_properties",
        ])
        .args(["--formatter", "json"])
        .output()
        .expect("rabbitmqctl list_connections");
    let rows: Vec<Value> = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stdout)));
    let ours = format!("\"{PARTICIPANT}@test:{}\"", vhost.name);
    let mut names: Vec<String> = rows
        .iter()
        .filter(|row| row["client_properties"].to_string().contains(&ours))
        .filter_map(|row| row["name"].as_str().map(str::to_owned))
        .collect();
    names.sort();
    names
}

fn reason_of(dead: &saga_amqp::lapin::message::Delivery) -> String {
    header(dead, header::DEAD_LETTER_REASON).expect("an x-dead-letter-reason header")
}

fn assert_short(reason: &str) {
    assert!(
        reason.chars().count() <= MAX_REASON_WITH_NOTE,
        "a reason of {} characters: {}…",
        reason.chars().count(),
        &reason[..reason.floor_char_boundary(200)]
    );
}

/// Commands whose values are huge, or whose headers nearly fill a frame, are dead-lettered with
/// a short reason and the body unchanged; the participant never loses its connection.
#[tokio::test(flavor = "multi_thread")]
async fn huge_values_and_headers_are_dead_lettered_on_the_same_connection() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;
    let queue = command_queue(PARTICIPANT);
    let good = charge(Uuid::new_v4());
    // Connected and consuming.
    output(&client.call(&good).await);
    let before = connections(&vhost);
    assert_eq!(before.len(), 1, "one connection: {before:?}");

    let mut as_json = serde_json::to_value(&good).unwrap();
    as_json["attempt"] = json!("9".repeat(200_000));
    let huge_attempt = serde_json::to_vec(&as_json).unwrap();
    let mut long_names = good.clone();
    long_names.message_id = Uuid::new_v4();
    long_names.saga_name = "n".repeat(200_000);
    long_names.step = "s".repeat(100);
    let long_names_body = serde_json::to_vec(&long_names).unwrap();
    let mut unknown_action = good.clone();
    unknown_action.action = "a".repeat(2_000);
    // Headers that, with the other properties, fill a 128 KiB frame but for about 200 bytes
    // (131,064 bytes of frame payload less 364 for the other properties): the dead letter's own
    // headers, a reason of over 500 characters, must not push its copy over.
    let near_frame = with_header(
        command_properties(&good),
        "x-padding",
        AMQPValue::LongString("p".repeat(130_500).into()),
    );
    let cases = [
        (
            "an attempt of 200,000 characters",
            huge_attempt,
            command_properties(&good),
            "invalid type",
        ),
        (
            "a saga name of 200 KB",
            long_names_body,
            command_properties(&good),
            "reply",
        ),
        (
            "headers near the frame size",
            serde_json::to_vec(&unknown_action).unwrap(),
            near_frame,
            "unknown execute action",
        ),
    ];
    for (what, body, properties, expected) in cases {
        client.send_raw(&body, properties).await;
        let dead = client.dead_letter().await;
        let reason = reason_of(&dead);
        assert!(
            reason.contains(expected),
            "{what}: the reason should mention {expected:?}: {}",
            &reason[..reason.floor_char_boundary(300)]
        );
        assert_short(&reason);
        assert_eq!(dead.data, body, "{what}: the body is kept");
        assert_eq!(
            header(&dead, header::DEAD_LETTER_QUEUE).as_deref(),
            Some(queue.as_str()),
            "{what}"
        );
        if what == "headers near the frame size" {
            assert!(
                header(&dead, "x-padding").is_none(),
                "the large header is left out of the copy"
            );
            let dropped = header(&dead, header::DEAD_LETTER_DROPPED_HEADERS)
                .expect("a header naming what was left out");
            assert!(dropped.contains("x-padding"), "{dropped}");
            assert_eq!(
                header(&dead, header::SAGA_ID),
                Some(good.saga_id.to_string()),
                "small headers are kept"
            );
        }
    }
    client.no_reply_within(Duration::from_millis(300)).await;
    let again = retry(&good, 2);
    output(&client.call(&again).await);
    assert_eq!(connections(&vhost), before, "no reconnect");
    running.stop().await;
}

/// A command whose `reply_to` queue does not exist is tried a few times, then dead-lettered with
/// a reason naming the queue; its outcome stays recorded, so the command asked again (to a queue
/// that exists) gets it without running the handler again.
#[tokio::test(flavor = "multi_thread")]
async fn a_command_whose_reply_queue_is_missing_is_dead_lettered_after_a_few_tries() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;
    let cmd = charge(Uuid::new_v4());
    let missing = "no.such.queue";
    client
        .publisher
        .publish(&OutgoingMessage::command(&cmd, PARTICIPANT, missing, None))
        .await
        .unwrap();
    let dead = client.dead_letter().await;
    let reason = reason_of(&dead);
    assert!(reason.contains(missing), "{reason}");
    assert_short(&reason);
    assert_eq!(
        dead.properties.message_id().as_ref().map(|m| m.to_string()),
        Some(cmd.message_id.to_string())
    );

    let conn = db.connect().await;
    assert_eq!(effects(&conn, cmd.saga_id).await.len(), 1, "the work stays");
    let reply = client.call(&retry(&cmd, 2)).await;
    output(&reply);
    assert_eq!(
        effects(&conn, cmd.saga_id).await.len(),
        1,
        "answered from the record"
    );
    running.stop().await;
}

/// A reply the broker nacks (here its queue is full and rejects publishes; in a cluster, a
/// quorum queue between leaders) is published again until the broker takes it. The command is
/// not set aside after a few tries, as when the reply queue does not exist: its work is done and
/// its reply queue is there.
#[tokio::test(flavor = "multi_thread")]
async fn a_reply_the_broker_nacks_is_published_again_until_it_is_taken() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let running = Running::start(participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;
    let full = "full.replies";
    let channel = client.conn.create_channel().await.unwrap();
    let mut arguments = FieldTable::default();
    arguments.insert("x-max-length".into(), AMQPValue::LongInt(1));
    arguments.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    channel
        .queue_declare(full.into(), QueueDeclareOptions::durable(), arguments)
        .await
        .unwrap();
    client
        .publisher
        .publish_raw("", full, b"filler", BasicProperties::default())
        .await
        .unwrap();

    let cmd = charge(Uuid::new_v4());
    client
        .publisher
        .publish(&OutgoingMessage::command(&cmd, PARTICIPANT, full, None))
        .await
        .unwrap();
    // Longer than the tries a missing reply queue gets before its command is set aside.
    client.no_dead_letter_within(Duration::from_secs(8)).await;
    let conn = db.connect().await;
    assert_eq!(effects(&conn, cmd.saga_id).await.len(), 1, "handled once");

    let (_consumer_channel, mut replies) = saga_amqp::open_consumer(&client.conn, full, "", 10)
        .await
        .unwrap();
    let filler = within("the filler", replies.next()).await.unwrap().unwrap();
    assert_eq!(filler.data, b"filler");
    saga_amqp::ack(&filler).await.unwrap();
    let delivery = within("the reply, once there is room", replies.next())
        .await
        .unwrap()
        .unwrap();
    let reply: StepReply = saga_amqp::decode(&delivery).unwrap();
    assert_eq!(reply.in_reply_to, cmd.message_id);
    output(&reply);
    saga_amqp::ack(&delivery).await.unwrap();
    assert_eq!(effects(&conn, cmd.saga_id).await.len(), 1, "handled once");
    client.no_dead_letter_within(Duration::from_secs(1)).await;
    running.stop().await;
}

/// Writes one row to `effects` and returns what the saga data asks for: an output of
/// `output_bytes` bytes, a NUL, `depth` levels of nesting, or a failure reason of
/// `reason_bytes` bytes.
fn hostile_participant() -> Participant {
    Participant::new(PARTICIPANT)
        .migrations(|db| Box::pin(create_effects(db)))
        .action("charge", |cmd, tx| {
            Box::pin(async move {
                tx.execute_raw(Statement::from_string(
                    tx.get_database_backend(),
                    format!(
                        "INSERT INTO effects (id, saga_id, step, kind, attempt) \
                         VALUES ('{}', '{}', 'charge-payment', 'charge', 1)",
                        Uuid::new_v4(),
                        cmd.saga_id
                    ),
                ))
                .await?;
                let get = |key: &str| cmd.data.get(key).and_then(Value::as_u64);
                if let Some(bytes) = get("output_bytes") {
                    return Ok(success(json!({"blob": "b".repeat(bytes as usize)})));
                }
                if let Some(levels) = get("depth") {
                    let mut deep = json!(1);
                    for _ in 0..levels {
                        deep = json!([deep]);
                    }
                    return Ok(success(json!({ "deep": deep })));
                }
                if cmd.data.contains_key("nul") {
                    return Ok(success(json!({"note": "a\u{0}b"})));
                }
                if cmd.data.contains_key("nul_reason") {
                    return Ok(failure("no\u{0}pe"));
                }
                if let Some(bytes) = get("reason_bytes") {
                    return Ok(failure(format!("declined: {}", "r".repeat(bytes as usize))));
                }
                Ok(success(json!({"ok": true})))
            })
        })
}

async fn effect_count(db: &DatabaseConnection, saga_id: Uuid) -> usize {
    effects(db, saga_id).await.len()
}

/// An output the orchestrator could not take (over the saga data limit, a NUL, too deep) is
/// answered as a failure that says why, and the handler's writes are rolled back; a failure
/// reason is cut to the limit.
#[tokio::test(flavor = "multi_thread")]
async fn outputs_over_the_limits_become_failures_and_change_nothing_sqlite() {
    outputs_over_the_limits_become_failures_and_change_nothing(TestDb::sqlite()).await;
}

/// PostgreSQL cannot store a NUL in the inbox's JSON at all: the same answers.
#[tokio::test(flavor = "multi_thread")]
async fn outputs_over_the_limits_become_failures_and_change_nothing_postgres() {
    let db = TestDb::postgres(Some("hostile")).await;
    outputs_over_the_limits_become_failures_and_change_nothing(db).await;
}

async fn outputs_over_the_limits_become_failures_and_change_nothing(db: TestDb) {
    let vhost = Vhost::new();
    let running = Running::start(hostile_participant(), &vhost, &db, 8);
    let mut client = Client::connect(&vhost).await;
    let conn = db.connect().await;
    let call = |data: Value| {
        command(
            Uuid::new_v4(),
            "charge-payment",
            Direction::Execute,
            "charge",
            1,
            data,
        )
    };

    let too_large = format!("the limit is {MAX_DATA_BYTES}");
    let cases = [
        (
            json!({"output_bytes": MAX_DATA_BYTES + 1}),
            too_large.as_str(),
        ),
        (json!({"nul": true}), "NUL"),
        (json!({"depth": MAX_DEPTH + 3}), "nested deeper"),
    ];
    for (data, expected) in cases {
        let cmd = call(data.clone());
        let reply = client.call(&cmd).await;
        let Outcome::Failure { reason } = &reply.outcome else {
            panic!("{data}: expected a failure, got {:?}", reply.outcome);
        };
        assert!(reason.contains("output"), "{data}: {reason}");
        assert!(reason.contains(expected), "{data}: {reason}");
        assert_short(reason);
        assert_eq!(
            effect_count(&conn, cmd.saga_id).await,
            0,
            "{data}: the handler's writes are rolled back"
        );
        assert_eq!(
            inbox(&conn, cmd.saga_id).await,
            vec![("execute".to_owned(), "failure".to_owned())],
            "{data}: the failure is recorded"
        );
    }

    // Within the limits: a success.
    let fits = call(json!({"output_bytes": MAX_DATA_BYTES - 1_000}));
    output(&client.call(&fits).await);
    assert_eq!(effect_count(&conn, fits.saga_id).await, 1);

    // A handler's failure reason is cut.
    let long = call(json!({"reason_bytes": 300_000}));
    let reply = client.call(&long).await;
    let Outcome::Failure { reason } = &reply.outcome else {
        panic!("expected a failure, got {:?}", reply.outcome);
    };
    assert!(reason.starts_with("declined: rrr"), "{reason}");
    assert_short(reason);

    // A NUL in a failure reason would make the reply unreadable: it is replaced.
    let nul = call(json!({"nul_reason": true}));
    let reply = client.call(&nul).await;
    assert_eq!(
        reply.outcome,
        Outcome::Failure {
            reason: "no\u{FFFD}pe".into()
        }
    );
    running.stop().await;
}

/// A command whose handling crashed the participant (or lost its connection) every time it
/// was delivered: at its last delivery under the queue's delivery limit the SDK sets it aside
/// with the reason, before the handler runs again, instead of crashing forever (or the broker
/// dropping it silently after the next).
#[tokio::test(flavor = "multi_thread")]
async fn a_command_at_the_delivery_limit_is_dead_lettered_before_its_handler_runs() {
    let vhost = Vhost::new();
    let db = TestDb::sqlite();
    let mut client = Client::connect(&vhost).await;
    let saga_id = Uuid::new_v4();
    let poison = charge(saga_id);
    client.send(&poison).await;

    // The crashes: delivered, never acknowledged, channel gone, DELIVERY_LIMIT times.
    let queue = command_queue(PARTICIPANT);
    for n in 0..saga_schemas::amqp::DELIVERY_LIMIT {
        let (channel, mut consumer) = saga_amqp::open_consumer(&client.conn, &queue, "", 1)
            .await
            .unwrap();
        let delivery = within("a delivery", consumer.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            saga_amqp::header_int(&delivery, header::DELIVERY_COUNT).unwrap_or(0),
            i64::from(n)
        );
        channel.close(200, "crashed".into()).await.unwrap();
    }

    let running = Running::start(participant(), &vhost, &db, 8);
    let dead = client.dead_letter().await;
    let reason = reason_of(&dead);
    assert!(
        reason.contains("delivered 21 times without being acknowledged")
            && reason.contains("delivery limit"),
        "{reason}"
    );
    assert_eq!(
        serde_json::from_slice::<Value>(&dead.data).unwrap()["message_id"],
        json!(poison.message_id)
    );
    client.no_reply_within(Duration::from_secs(1)).await;
    // The handler never ran: no effect, no inbox record.
    let conn = db.connect().await;
    assert!(effects(&conn, saga_id).await.is_empty());
    assert!(inbox(&conn, saga_id).await.is_empty());

    // The next attempt of the step (a new message) is handled as usual.
    let reply = client.call(&retry(&poison, 2)).await;
    assert!(
        matches!(reply.outcome, Outcome::Success { .. }),
        "{reply:?}"
    );
    running.stop().await;
}
