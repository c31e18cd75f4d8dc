//! The broker drops every connection mid-saga (a restart, a network cut): the orchestrator and
//! the participants reconnect on their own, and every saga still completes exactly once.

use std::time::Duration;

use saga_system::checkout::*;
use saga_system::env::TestEnv;
use saga_system::{Backend, Options, System, pretty};

async fn connections_dropped(backend: Backend) {
    let mut system = System::start(
        Options::new(backend)
            .label("broker-drop")
            .without("shipping"),
    )
    .await;
    let sku = unique_sku("drop");
    let mut ids = Vec::new();
    for i in 0..4 {
        ids.push(
            system
                .start_checkout(&order(&format!("before-{i}"), 1_000, &[(&sku, 1)]))
                .await,
        );
    }
    // In flight: waiting for shipping, which is not running.
    for id in &ids {
        system
            .wait_until(
                id,
                Duration::from_secs(30),
                "waiting for shipping",
                |saga| saga["current_step"] == "schedule-shipment",
            )
            .await;
    }

    // The management API lists new connections a few seconds late.
    let management = TestEnv::get().management().unwrap();
    for _ in 0..100 {
        if management.connections(system.vhost()).await.unwrap().len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let closed = management.close_connections(system.vhost()).await.unwrap();
    assert!(
        closed >= 4,
        "the orchestrator's and three participants' connections: {closed}"
    );

    // Everyone reconnects: new sagas are taken, the waiting ones finish once shipping runs.
    system.start_participant("shipping").await;
    for i in 0..4 {
        ids.push(
            system
                .start_checkout(&order(&format!("after-{i}"), 1_000, &[(&sku, 1)]))
                .await,
        );
    }
    let sagas = system.wait_all_settled(&ids, Duration::from_secs(60)).await;
    for saga in &sagas {
        assert_eq!(status(saga), "completed", "{}", pretty(saga));
        assert_eq!(events(saga, "saga_completed").len(), 1, "{}", pretty(saga));
    }
    assert_books_balance(&system.books().await, None);
    // Listed a few seconds late, as above.
    let mut reconnected = Vec::new();
    for _ in 0..100 {
        reconnected = management.connections(system.vhost()).await.unwrap();
        if reconnected.len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        reconnected.len() >= 5,
        "every service is connected again: {reconnected:?}"
    );
}

saga_system::on_both_backends!(connections_dropped);
