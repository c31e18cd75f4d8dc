//! A reply that can never be handled (its saga's snapshot and event log are both unreadable) is
//! set aside with its reason, visible through the API, and acked: it never loops in the
//! replies queue, and the other sagas go on.

use std::time::{Duration, Instant};

use saga_system::checkout::*;
use saga_system::env::TestEnv;
use saga_system::{Backend, ORCHESTRATOR, Options, System, pretty};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_for_an_unreadable_saga_is_set_aside() {
    let mut system = System::start(
        Options::new(Backend::Sqlite)
            .label("poison")
            .without("shipping"),
    )
    .await;
    let sku = unique_sku("vase");
    let id = system
        .start_checkout(&order("gus", 1_000, &[(&sku, 1)]))
        .await;
    system
        .wait_until(&id, Duration::from_secs(60), "ask for the shipment", |s| {
            position(s, "command_sent", "schedule-shipment").is_some()
        })
        .await;
    // Both the snapshot and the log of the only saga become unreadable, as data written by an
    // older version would be, found at start (a running orchestrator decides on the state it
    // kept from its own last commit, not on rows changed behind its back).
    system.stop(ORCHESTRATOR).await;
    let damaged = system
        .orchestrator_sql(&[
            "UPDATE sagas SET state = 'not json'",
            "UPDATE saga_events SET payload = 'not json'",
        ])
        .await;
    assert_eq!(damaged[0], 1, "one saga");
    system.restart_orchestrator().await;

    // Shipping answers the pending command: its reply cannot be handled.
    system.start_participant("shipping").await;
    let started = Instant::now();
    let item = loop {
        let (status, body) = system.get("/set-aside").await;
        assert_eq!(status, 200, "{}", pretty(&body));
        let found = body["set_aside"].as_array().and_then(|items| {
            items
                .iter()
                .find(|i| i["kind"] == "reply" && i["saga_id"] == id.as_str())
                .cloned()
        });
        if let Some(item) = found {
            break item;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the reply was not set aside: {}",
            pretty(&body)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let reason = item["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("corrupt"),
        "the reason says why: {}",
        pretty(&item)
    );

    // It was acked, not requeued: nothing waits in the replies queue (the management API's
    // figures lag a few seconds), and the orchestrator serves on.
    let management = TestEnv::get().management().unwrap();
    let started = Instant::now();
    loop {
        let replies = management
            .queue(system.vhost(), "saga.replies")
            .await
            .unwrap();
        if replies["messages"] == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the reply loops in the queue: {}",
            pretty(&replies)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let log = std::fs::read_to_string(system.log_path("orchestrator")).unwrap();
    assert!(
        !log.contains("it will be redelivered"),
        "never requeued:\n{log}"
    );
    let (status, body) = system.get("/readyz").await;
    assert_eq!(status, 200, "{}", pretty(&body));
    let other = system
        .start_checkout(&order("hal", 1_000, &[(&sku, 1)]))
        .await;
    let saga = system.wait_settled(&other, Duration::from_secs(90)).await;
    assert_eq!(status_of(&saga), "completed", "{}", pretty(&saga));
}

fn status_of(saga: &serde_json::Value) -> &str {
    saga["status"].as_str().unwrap_or_default()
}
