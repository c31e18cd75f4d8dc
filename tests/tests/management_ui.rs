//! What an operator sees of a running system in the RabbitMQ management UI, read through the
//! management HTTP API: the documented queues, exchanges and bindings; every service's consumer
//! under its connection name; a dead letter with its reason; a command whose properties and
//! headers explain it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use saga_amqp::HeaderValue;
use saga_schemas::SCHEMA_VERSION;
use saga_schemas::amqp::{
    COMMANDS_EXCHANGE, CONTENT_TYPE_JSON, DEAD_LETTER_EXCHANGE, DELIVERY_LIMIT, EVENTS_EXCHANGE,
    REPLIES_QUEUE, START_QUEUE, command_queue, dead_letter_queue, header, message_type,
};
use saga_system::checkout::*;
use saga_system::management::user_provided_name;
use saga_system::{
    Backend, Management, ORCHESTRATOR, Options, PARTICIPANTS, System, TestEnv, pretty,
};
use serde_json::{Value, json};

/// How long the management API's statistics (consumers, connections) may lag behind.
const STATS_TIMEOUT: Duration = Duration::from_secs(20);

fn management() -> &'static Management {
    TestEnv::get()
        .management()
        .unwrap_or_else(|e| panic!("{e:#}"))
}

/// The queues that carry messages (each with a `.dlq` beside it), in README order.
fn main_queues() -> Vec<String> {
    let mut queues: Vec<String> = PARTICIPANTS.iter().map(|p| command_queue(p)).collect();
    queues.push(REPLIES_QUEUE.to_owned());
    queues.push(START_QUEUE.to_owned());
    queues
}

/// The queues, exchanges and bindings of the README's "AMQP topology", exactly.
async fn topology(backend: Backend) {
    let system = System::start(Options::new(backend).label("mgmt-topology")).await;
    let m = management();
    let vhost = system.vhost();

    let queues: BTreeMap<String, Value> = m
        .queues(vhost)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
        .into_iter()
        .map(|q| (q["name"].as_str().unwrap_or("?").to_owned(), q))
        .collect();
    let names: Vec<&String> = queues.keys().collect();
    for queue in main_queues() {
        let q = queues
            .get(&queue)
            .unwrap_or_else(|| panic!("no queue {queue} in vhost {vhost}; there are {names:?}"));
        assert_eq!(q["durable"], true, "{queue} is durable: {}", pretty(q));
        assert_eq!(q["auto_delete"], false, "{queue}: {}", pretty(q));
        assert_eq!(q["exclusive"], false, "{queue}: {}", pretty(q));
        // Quorum queues (the default), with the README's arguments. A command queue has no
        // dead-letter exchange: a command the broker drops at its expiration (a superseded
        // attempt) vanishes instead of flooding the dlq; the participant dead-letters what it
        // cannot use itself, with the reason.
        assert_eq!(q["type"], "quorum", "{queue}: {}", pretty(q));
        let expected = if queue.starts_with("saga.commands.") {
            json!({"x-queue-type": "quorum", "x-delivery-limit": DELIVERY_LIMIT})
        } else {
            json!({
                "x-queue-type": "quorum",
                "x-delivery-limit": DELIVERY_LIMIT,
                "x-dead-letter-exchange": DEAD_LETTER_EXCHANGE,
                "x-dead-letter-routing-key": dead_letter_queue(&queue),
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",
            })
        };
        assert_eq!(
            q["arguments"],
            expected,
            "{queue} has exactly the documented arguments: {}",
            pretty(q)
        );
        let dlq = dead_letter_queue(&queue);
        let d = queues
            .get(&dlq)
            .unwrap_or_else(|| panic!("no queue {dlq} in vhost {vhost}; there are {names:?}"));
        assert_eq!(d["durable"], true, "{dlq} is durable: {}", pretty(d));
        assert_eq!(d["auto_delete"], false, "{dlq}: {}", pretty(d));
        assert_eq!(
            d["arguments"],
            json!({"x-queue-type": "quorum"}),
            "{dlq} is a quorum queue without other arguments: {}",
            pretty(d)
        );
    }

    for (exchange, kind) in [
        (COMMANDS_EXCHANGE, "direct"),
        (EVENTS_EXCHANGE, "topic"),
        (DEAD_LETTER_EXCHANGE, "direct"),
    ] {
        let e = m
            .exchange(vhost, exchange)
            .await
            .unwrap_or_else(|e| panic!("exchange {exchange}: {e:#}"));
        assert_eq!(e["type"], kind, "{exchange}: {}", pretty(&e));
        assert_eq!(e["durable"], true, "{exchange} is durable: {}", pretty(&e));
        assert_eq!(e["auto_delete"], false, "{exchange}: {}", pretty(&e));
        assert_eq!(e["internal"], false, "{exchange}: {}", pretty(&e));
    }

    // saga.commands → saga.commands.<p> with key <p>; saga.dead-letter → <queue>.dlq with key
    // <queue>.dlq; nothing else.
    let bindings = |list: Vec<Value>| -> BTreeSet<(String, String, String)> {
        list.iter()
            .map(|b| {
                (
                    b["destination"].as_str().unwrap_or("?").to_owned(),
                    b["destination_type"].as_str().unwrap_or("?").to_owned(),
                    b["routing_key"].as_str().unwrap_or("?").to_owned(),
                )
            })
            .collect()
    };
    let commands = bindings(
        m.bindings_from(vhost, COMMANDS_EXCHANGE)
            .await
            .unwrap_or_else(|e| panic!("{e:#}")),
    );
    let expected: BTreeSet<_> = PARTICIPANTS
        .iter()
        .map(|p| (command_queue(p), "queue".to_owned(), (*p).to_owned()))
        .collect();
    assert_eq!(commands, expected, "the bindings of {COMMANDS_EXCHANGE}");
    let dead_letters = bindings(
        m.bindings_from(vhost, DEAD_LETTER_EXCHANGE)
            .await
            .unwrap_or_else(|e| panic!("{e:#}")),
    );
    let expected: BTreeSet<_> = main_queues()
        .iter()
        .map(|q| {
            let dlq = dead_letter_queue(q);
            (dlq.clone(), "queue".to_owned(), dlq)
        })
        .collect();
    assert_eq!(
        dead_letters, expected,
        "the bindings of {DEAD_LETTER_EXCHANGE}"
    );

    consumers(&system).await;
}

/// Every participant queue is consumed on its service's connection, and `saga.replies` and
/// `saga.start` on the orchestrator's, with manual acks. The statistics lag: poll.
async fn consumers(system: &System) {
    let m = management();
    let vhost = system.vhost();
    let mut expected: BTreeMap<String, String> = PARTICIPANTS
        .iter()
        .map(|p| (command_queue(p), system.connection_name(p)))
        .collect();
    for queue in [REPLIES_QUEUE, START_QUEUE] {
        expected.insert(queue.to_owned(), system.connection_name(ORCHESTRATOR));
    }
    for (queue, name) in &expected {
        let service = name.split('@').next().unwrap_or_default();
        assert!(
            queue == REPLIES_QUEUE || queue == START_QUEUE || queue.ends_with(service),
            "the connection name {name:?} names the service of {queue}"
        );
    }

    let started = Instant::now();
    loop {
        let consumers = m.consumers(vhost).await.unwrap_or_else(|e| panic!("{e:#}"));
        let connections = m
            .connections(vhost)
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
        // What each consumer's connection is called: `channel_details.connection_name` as the
        // API reports it, and the client-provided name of that connection.
        let seen: Vec<(String, String, String, Value)> = consumers
            .iter()
            .map(|c| {
                let queue = c["queue"]["name"].as_str().unwrap_or("?").to_owned();
                let reported = c["channel_details"]["connection_name"]
                    .as_str()
                    .unwrap_or("?")
                    .to_owned();
                let provided = connections
                    .iter()
                    .find(|conn| conn["name"].as_str() == Some(reported.as_str()))
                    .and_then(user_provided_name)
                    .unwrap_or("?")
                    .to_owned();
                (queue, reported, provided, c.clone())
            })
            .collect();
        let missing: Vec<(&String, &String)> = expected
            .iter()
            .filter(|(queue, name)| {
                !seen.iter().any(|(q, reported, provided, _)| {
                    q == *queue && (reported == *name || provided == *name)
                })
            })
            .collect();
        if missing.is_empty() {
            for (queue, name) in &expected {
                let (_, reported, provided, consumer) = seen
                    .iter()
                    .find(|(q, reported, provided, _)| {
                        q == queue && (reported == name || provided == name)
                    })
                    .expect("found above");
                eprintln!(
                    "{queue}: consumer on connection {reported:?} (client-provided name {provided:?})"
                );
                assert_eq!(
                    consumer["ack_required"],
                    true,
                    "{queue} is consumed with manual acks: {}",
                    pretty(consumer)
                );
                assert!(
                    consumer["prefetch_count"].as_u64().unwrap_or(0) > 0,
                    "{queue} is consumed with a bounded prefetch: {}",
                    pretty(consumer)
                );
            }
            // One consumer per queue: no stray consumer on someone else's connection.
            for queue in expected.keys() {
                let on_queue: Vec<&(String, String, String, Value)> =
                    seen.iter().filter(|(q, ..)| q == queue).collect();
                assert_eq!(
                    on_queue.len(),
                    1,
                    "{queue} has one consumer: {:?}",
                    on_queue
                        .iter()
                        .map(|(_, r, p, _)| (r, p))
                        .collect::<Vec<_>>()
                );
            }
            let names: BTreeSet<&str> = connections.iter().filter_map(user_provided_name).collect();
            for service in std::iter::once(ORCHESTRATOR).chain(PARTICIPANTS) {
                let name = system.connection_name(service);
                assert!(
                    names.contains(name.as_str()),
                    "the connections list shows {name:?}: {names:?}"
                );
            }
            return;
        }
        if started.elapsed() > STATS_TIMEOUT {
            panic!(
                "after {STATS_TIMEOUT:?}, no consumer on the expected connection for {missing:?}; \
                 the consumers are (queue, channel_details.connection_name, client-provided \
                 name): {:?}",
                seen.iter()
                    .map(|(q, r, p, _)| (q, r, p))
                    .collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A header of a message from "Get messages", as the API renders it.
fn msg_header<'a>(message: &'a Value, key: &str) -> &'a Value {
    &message["properties"]["headers"][key]
}

/// "Get messages" on a participant's queue shows a command that explains itself; on its dead
/// letter queue, a message nobody could read and why.
async fn messages(backend: Backend) {
    let mut system = System::start(
        Options::new(backend)
            .label("mgmt-messages")
            .without("orders"),
    )
    .await;
    let m = management();
    let vhost = system.vhost().to_owned();

    // `orders` is not running: the saga's first command waits in its queue.
    let sku = unique_sku("ink");
    let id = system
        .start_checkout(&order("lena", 900, &[(&sku, 1)]))
        .await;
    let queue = command_queue("orders");
    let message = m
        .wait_peek(&vhost, &queue, Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
        .unwrap_or_else(|| panic!("no command reached {queue} within 15s"));
    let show = pretty(&message);
    let props = &message["properties"];
    assert_eq!(message["exchange"], COMMANDS_EXCHANGE, "{show}");
    assert_eq!(message["routing_key"], "orders", "{show}");
    assert_eq!(props["correlation_id"], id.as_str(), "{show}");
    assert_eq!(props["type"], message_type::STEP_COMMAND, "{show}");
    assert_eq!(props["content_type"], CONTENT_TYPE_JSON, "{show}");
    assert_eq!(props["delivery_mode"], 2, "persistent: {show}");
    assert_eq!(props["reply_to"], REPLIES_QUEUE, "{show}");
    // Dropped by the broker once a newer attempt supersedes it: milliseconds, as a string.
    let expiration: u64 = props["expiration"]
        .as_str()
        .and_then(|e| e.parse().ok())
        .unwrap_or_else(|| panic!("an expiration in milliseconds: {show}"));
    assert!(expiration > 0, "{show}");
    let message_id = props["message_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no message_id: {show}"));
    assert!(
        uuid::Uuid::parse_str(message_id).is_ok(),
        "message_id {message_id:?} is a UUID: {show}"
    );
    for (key, value) in [
        (header::SAGA_ID, json!(id)),
        (header::SAGA_NAME, json!("order-checkout")),
        (header::STEP, json!("create-order")),
        (header::ACTION, json!("create_order")),
        (header::DIRECTION, json!("execute")),
        (header::ATTEMPT, json!(1)),
        (header::SCHEMA_VERSION, json!(SCHEMA_VERSION)),
    ] {
        assert_eq!(msg_header(&message, key), &value, "header {key}: {show}");
    }
    assert_eq!(message["payload_encoding"], "string", "{show}");
    let body: Value = serde_json::from_str(message["payload"].as_str().unwrap_or_default())
        .unwrap_or_else(|e| panic!("the payload is JSON ({e}): {show}"));
    assert_eq!(body["saga_id"], id.as_str(), "{show}");
    assert_eq!(body["message_id"], message_id, "{show}");
    assert_eq!(body["step"], "create-order", "{show}");
    // The saga's history names the same message.
    let saga = system.saga(&id).await;
    let sent = events(&saga, "command_sent");
    assert!(
        sent.iter()
            .any(|e| e["step"] == "create-order" && e["message_id"] == message_id),
        "the history records command {message_id}:\n{}",
        pretty(&saga)
    );
    // "Get messages" handed it back.
    let again = m
        .peek_messages(&vhost, &queue, 1)
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(
        again.first().map(|m| &m["properties"]["message_id"]),
        Some(&json!(message_id)),
        "the command is still in {queue}: {again:?}"
    );

    // With `orders` up, the command is taken and the saga goes on; a message it cannot read
    // goes to the dead-letter queue, where the UI shows it with the reason.
    system.start_participant("orders").await;
    let amqp = system.amqp().await;
    let malformed = b"{not json";
    amqp.publish_raw(
        COMMANDS_EXCHANGE,
        "orders",
        malformed,
        &[(
            header::SCHEMA_VERSION,
            HeaderValue::Int(SCHEMA_VERSION.into()),
        )],
        Some(REPLIES_QUEUE),
    )
    .await;
    let dlq = dead_letter_queue(&queue);
    let dead = m
        .wait_peek(&vhost, &dlq, Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("{e:#}"))
        .unwrap_or_else(|| panic!("nothing reached {dlq} within 15s"));
    let show = pretty(&dead);
    assert_eq!(
        dead["payload"].as_str(),
        Some("{not json"),
        "the dead letter is the message as sent: {show}"
    );
    let reason = msg_header(&dead, header::DEAD_LETTER_REASON)
        .as_str()
        .unwrap_or_else(|| panic!("no {} header: {show}", header::DEAD_LETTER_REASON));
    assert!(
        reason.to_lowercase().contains("json") || reason.to_lowercase().contains("decode"),
        "the reason says the body cannot be read: {reason:?}"
    );
    assert_eq!(
        dead["message_count"], 0,
        "one dead letter, nothing else: {show}"
    );

    let saga = system.wait_settled(&id, Duration::from_secs(60)).await;
    assert_eq!(status(&saga), "completed", "{}", pretty(&saga));
    amqp.close().await;
}

saga_system::on_both_backends!(topology, messages);
