//! Crash and replay: the orchestrator killed mid-saga carries on after a restart, and the read
//! model rebuilt from the event log equals the live one.

use std::time::Duration;

use saga_system::checkout::*;
use saga_system::{Backend, ORCHESTRATOR, Options, System, pretty};

/// Shipping is down, so sagas stop at schedule-shipment; more are started and the orchestrator
/// is killed with SIGKILL while they are in flight. Shipping comes up, the orchestrator
/// restarts, and every saga completes with one effect per step.
async fn killed_mid_saga(backend: Backend) {
    let mut system = System::start(Options::new(backend).label("killed").without("shipping")).await;
    let sku = unique_sku("box");
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            system
                .start_checkout(&order(&format!("kate-{i}"), 1_000 + i, &[(&sku, 1)]))
                .await,
        );
    }
    for id in &ids {
        system
            .wait_until(
                id,
                Duration::from_secs(20),
                "reach schedule-shipment",
                |s| position(s, "command_sent", "schedule-shipment").is_some(),
            )
            .await;
    }
    // A few more, killed at whatever point they reached.
    for i in 0..4 {
        ids.push(
            system
                .start_checkout(&order(&format!("leo-{i}"), 2_000 + i, &[(&sku, 1)]))
                .await,
        );
    }
    system.kill_orchestrator();

    system.start_participant("shipping").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    system.restart_orchestrator().await;
    let sagas = system.wait_all_settled(&ids, Duration::from_secs(60)).await;
    for saga in &sagas {
        let show = pretty(saga);
        assert_eq!(status(saga), "completed", "{show}");
        for name in STEPS {
            assert_eq!(count(saga, "step_completed", name), 1, "{name}:\n{show}");
        }
        assert_history_ordered(saga);
    }
    let books = system.books().await;
    for id in &ids {
        let mine = books_of(&books, id);
        assert_eq!(mine.orders.len(), 1, "{mine:?}");
        assert_eq!(mine.payments.len(), 1, "{mine:?}");
        assert_eq!(mine.shipments.len(), 1, "{mine:?}");
    }
    assert_books_balance(&books, Some(100));
}

/// After a mixed batch (completed, declined, short of stock, retried), `orchestrator rebuild`
/// with the orchestrator stopped gives back the same read model, even after the read model's
/// rows were damaged.
async fn rebuild_read_model(backend: Backend) {
    let mut system = System::start(
        Options::new(backend)
            .label("rebuild")
            .env("payments", "PAYMENT_LIMIT", 10_000)
            .env("inventory", "INITIAL_STOCK", 10)
            .env("shipping", "SHIPPING_FAILURE_RATE", 0.5),
    )
    .await;
    let sku = unique_sku("jar");
    let inputs = [
        order("mia", 1_000, &[(&sku, 1)]),
        order("ned", 2_000, &[(&sku, 2)]),
        order("olga", 20_000, &[(&sku, 1)]),
        order("pat", 30_000, &[(&sku, 1)]),
        order("quinn", 500, &[(&sku, 11)]),
        order("rosa", 700, &[(&sku, 1), ("other", 50), ("more", 200)]),
    ];
    let mut ids = Vec::new();
    for input in &inputs {
        ids.push(system.start_checkout(input).await);
    }
    let before = system.wait_all_settled(&ids, Duration::from_secs(60)).await;
    let statuses: Vec<&str> = before.iter().map(status).collect();
    assert_eq!(
        statuses,
        [
            "completed",
            "completed",
            "compensated",
            "compensated",
            "compensated",
            "compensated"
        ],
        "{before:#?}"
    );
    let list_before = system.list_all("").await;

    let stopped = system.stop(ORCHESTRATOR).await;
    assert!(
        stopped.is_some_and(|s| s.success()),
        "the orchestrator stops cleanly on SIGTERM: {stopped:?}"
    );
    // Damage the read model (not the event log) so that only a real rebuild restores it.
    let damaged = system
        .orchestrator_sql(&[
            "UPDATE sagas SET status = 'running', current_step = NULL, data = '{}'",
        ])
        .await;
    assert_eq!(
        damaged,
        [ids.len() as u64],
        "the read model has one row per saga"
    );
    let output = system.run_orchestrator_command(&["rebuild"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "orchestrator rebuild failed: {stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(&ids.len().to_string()),
        "it says how many sagas it rebuilt: {stdout}"
    );
    system.restart_orchestrator().await;

    for (id, old) in ids.iter().zip(&before) {
        let new = system.saga(id).await;
        assert_eq!(
            &new,
            old,
            "the rebuilt read model differs for saga {id}:\nbefore {}\nafter {}",
            pretty(old),
            pretty(&new)
        );
    }
    let list_after = system.list_all("").await;
    assert_eq!(
        list_after, list_before,
        "the list differs after the rebuild"
    );
}

saga_system::on_both_backends!(killed_mid_saga, rebuild_read_model);
