//! The topology is declared idempotently, in either order, with the documented arguments.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::TestVhost;
use futures_util::StreamExt;
use saga_amqp::lapin::{
    BasicProperties,
    options::{BasicPublishOptions, QueueDeclareOptions},
    types::FieldTable,
};
use saga_schemas::amqp::{DEAD_LETTER_EXCHANGE, command_queue, dead_letter_queue, header};
use serde_json::{Value, json};

#[tokio::test]
async fn topology_is_idempotent_and_has_the_documented_arguments() {
    let vhost = TestVhost::new("topology");
    let conn = saga_amqp::connect(&vhost.url, "saga-amqp topology test")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();

    // A participant first, then the orchestrator twice, then the participant again.
    saga_amqp::declare_participant_topology(&ch, "payments")
        .await
        .unwrap();
    for _ in 0..2 {
        saga_amqp::declare_orchestrator_topology(&ch, &["payments", "inventory"])
            .await
            .unwrap();
    }
    saga_amqp::declare_participant_topology(&ch, "payments")
        .await
        .unwrap();
    assert!(
        ch.status().connected(),
        "a redeclaration closed the channel"
    );

    let exchanges: BTreeSet<(String, String, bool)> = vhost
        .list("list_exchanges", &["name", "type", "durable"])
        .into_iter()
        .filter(|e| e["name"].as_str().unwrap().starts_with("saga."))
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            (
                name,
                e["type"].as_str().unwrap().to_string(),
                e["durable"] == json!(true),
            )
        })
        .collect();
    let expected: BTreeSet<_> = [
        ("saga.commands", "direct"),
        ("saga.dead-letter", "direct"),
        ("saga.events", "topic"),
    ]
    .into_iter()
    .map(|(n, t)| (n.to_string(), t.to_string(), true))
    .collect();
    assert_eq!(exchanges, expected);

    let queues = vhost.list("list_queues", &["name", "durable", "arguments"]);
    let names: BTreeSet<&str> = queues.iter().map(|q| q["name"].as_str().unwrap()).collect();
    let main_queues = [
        "saga.replies",
        "saga.start",
        "saga.commands.payments",
        "saga.commands.inventory",
    ];
    let mut expected_names: BTreeSet<String> = BTreeSet::new();
    for q in main_queues {
        expected_names.insert(q.to_string());
        expected_names.insert(format!("{q}.dlq"));
    }
    assert_eq!(names, expected_names.iter().map(String::as_str).collect());
    for q in &queues {
        let name = q["name"].as_str().unwrap();
        assert_eq!(q["durable"], json!(true), "{name} is not durable");
        let args = arguments(&q["arguments"]);
        if name.ends_with(".dlq") || name.starts_with("saga.commands.") {
            // A command queue has no dead-letter arguments: a command the broker drops at its
            // expiration (a superseded attempt) must not flood the dlq.
            assert!(args.is_empty(), "{name} has arguments {args:?}");
        } else {
            let expected: BTreeSet<(String, String)> = [
                (
                    "x-dead-letter-exchange".to_string(),
                    "saga.dead-letter".to_string(),
                ),
                (
                    "x-dead-letter-routing-key".to_string(),
                    format!("{name}.dlq"),
                ),
            ]
            .into();
            assert_eq!(args, expected, "arguments of {name}");
        }
    }

    let bindings: BTreeSet<(String, String, String)> = vhost
        .list(
            "list_bindings",
            &["source_name", "destination_name", "routing_key"],
        )
        .into_iter()
        .filter(|b| b["source_name"] != json!(""))
        .map(|b| {
            let s = |k: &str| b[k].as_str().unwrap().to_string();
            (s("source_name"), s("destination_name"), s("routing_key"))
        })
        .collect();
    let mut expected_bindings = BTreeSet::new();
    for p in ["payments", "inventory"] {
        expected_bindings.insert(("saga.commands".into(), command_queue(p), p.to_string()));
    }
    for q in main_queues {
        let dlq = dead_letter_queue(q);
        expected_bindings.insert((DEAD_LETTER_EXCHANGE.to_string(), dlq.clone(), dlq));
    }
    assert_eq!(bindings, expected_bindings);

    // A queue declared with other arguments is refused: the arguments above are binding.
    let other = conn.create_channel().await.unwrap();
    let refused = other
        .queue_declare(
            "saga.replies".into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await;
    assert!(
        refused.is_err(),
        "a redeclaration without arguments was accepted"
    );
    assert!(
        ch.status().connected(),
        "the failure closed another channel"
    );

    // And they work: a message rejected on saga.replies is dead-lettered by the broker to its
    // dlq; one rejected (or expired) on a command queue is dropped.
    for (exchange, key) in [("", "saga.replies"), ("saga.commands", "payments")] {
        ch.basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"{}",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    ch.basic_publish(
        "saga.commands".into(),
        "payments".into(),
        BasicPublishOptions::default(),
        b"expires",
        BasicProperties::default().with_expiration("1".into()),
    )
    .await
    .unwrap();
    for queue in ["saga.replies", "saga.commands.payments"] {
        let (_consume_ch, mut consumer) =
            saga_amqp::open_consumer(&conn, queue, "", 4).await.unwrap();
        let delivery = consumer.next().await.unwrap().unwrap();
        assert_eq!(delivery.data, b"{}", "{queue}");
        saga_amqp::nack(&delivery, false).await.unwrap();
        let more = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await;
        assert!(
            more.is_err(),
            "{queue}: nothing else is delivered (the expired command is gone)"
        );
    }
    let (_dlq_ch, mut dlq) = saga_amqp::open_consumer(&conn, "saga.replies.dlq", "", 4)
        .await
        .unwrap();
    let dead = dlq.next().await.unwrap().unwrap();
    assert_eq!(dead.data, b"{}");
    assert!(
        dead.properties
            .headers()
            .as_ref()
            .unwrap()
            .contains_key("x-death")
    );
    assert_eq!(
        saga_amqp::header_str(&dead, header::DEAD_LETTER_REASON),
        None
    );
    saga_amqp::ack(&dead).await.unwrap();
    for queue in ["saga.commands.payments", "saga.commands.payments.dlq"] {
        assert_eq!(ready(&conn, queue).await, 0, "{queue} is empty");
    }

    conn.close(200, "done".into()).await.unwrap();
}

/// A command queue left by an older version, declared with dead-letter arguments: declaring
/// the topology fails with an error that names the queue and says what to do.
#[tokio::test]
async fn a_command_queue_with_old_arguments_is_reported_with_what_to_do() {
    let vhost = TestVhost::new("old-queue");
    let conn = saga_amqp::connect(&vhost.url, "saga-amqp old queue test")
        .await
        .unwrap();
    let old = conn.create_channel().await.unwrap();
    old.queue_declare(
        "saga.commands.payments".into(),
        QueueDeclareOptions::durable(),
        saga_amqp::queue_arguments("saga.commands.payments"),
    )
    .await
    .unwrap();

    for declare in [true, false] {
        let ch = conn.create_channel().await.unwrap();
        let err = if declare {
            saga_amqp::declare_participant_topology(&ch, "payments").await
        } else {
            saga_amqp::declare_orchestrator_topology(&ch, &["payments"]).await
        }
        .unwrap_err();
        let text = err.to_string();
        eprintln!("{text}");
        assert!(
            matches!(&err, saga_amqp::AmqpError::QueueMismatch { queue, .. } if queue == "saga.commands.payments"),
            "{err:?}"
        );
        assert!(!text.contains('\n'), "one line: {text}");
        for words in [
            "queue saga.commands.payments",
            "no arguments",
            "x-dead-letter-exchange",
            "drain",
            "delete_queue",
            "old arguments",
        ] {
            assert!(text.contains(words), "{words:?} in {text}");
        }
    }
    conn.close(200, "done".into()).await.unwrap();
}

#[tokio::test]
async fn bad_participant_names_are_refused_before_declaring() {
    let vhost = TestVhost::new("names");
    let conn = saga_amqp::connect(&vhost.url, "saga-amqp names test")
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let long = "p".repeat(250);
    for bad in ["", long.as_str()] {
        let err = saga_amqp::declare_orchestrator_topology(&ch, &["ok", bad])
            .await
            .unwrap_err();
        assert!(matches!(err, saga_amqp::AmqpError::Invalid(_)), "{err}");
        let err = saga_amqp::declare_participant_topology(&ch, bad)
            .await
            .unwrap_err();
        assert!(matches!(err, saga_amqp::AmqpError::Invalid(_)), "{err}");
    }
    assert!(vhost.list("list_queues", &["name"]).is_empty());
    conn.close(200, "done".into()).await.unwrap();
}

/// The number of ready messages in `queue`, by a passive declare on a throwaway channel.
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

/// rabbitmqctl's JSON for queue arguments (`[key, type, value]` triples) as (key, value) pairs;
/// every value must be an AMQP long string, as pika and this crate send them.
fn arguments(value: &Value) -> BTreeSet<(String, String)> {
    value
        .as_array()
        .expect("arguments are a list")
        .iter()
        .map(|triple| {
            let s = |i: usize| triple[i].as_str().unwrap().to_string();
            assert_eq!(s(1), "longstr", "argument {triple}");
            (s(0), s(2))
        })
        .collect()
}
