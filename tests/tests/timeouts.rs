//! Time: a step whose participant does not answer is asked again until it answers (completed
//! when it comes back within the step's expiry, refused and compensated with nothing to undo
//! when it does not), and a saga past its deadline is compensated. Each uses a definition file
//! of its own with short durations.

use std::time::Duration;

use saga_system::checkout::*;
use saga_system::{Backend, Options, System, pretty};

/// `order-checkout` with short timeouts, and `deadline` if given.
fn config(deadline: Option<&str>, reserve_timeout: &str, reserve_expiry: &str) -> String {
    let deadline = deadline
        .map(|d| format!("    deadline: {d}\n"))
        .unwrap_or_default();
    format!(
        "sagas:
  - name: order-checkout
{deadline}    steps:
      - name: create-order
        participant: orders
        action: create_order
        compensation: cancel_order
        timeout: 5s
      - name: reserve-stock
        participant: inventory
        action: reserve
        compensation: release
        timeout: {reserve_timeout}
        expiry: {reserve_expiry}
        retry: {{ backoff: 100ms }}
        compensation_retry: {{ max_attempts: 30, backoff: 200ms, max_backoff: 500ms }}
      - name: charge-payment
        participant: payments
        action: charge
        kind: pivot
        timeout: 5s
      - name: schedule-shipment
        participant: shipping
        action: schedule
        kind: retriable
        timeout: 5s
        retry: {{ backoff: 200ms, max_backoff: 1s }}
      - name: approve-order
        participant: orders
        action: approve_order
        kind: retriable
        timeout: 5s
        retry: {{ backoff: 200ms, max_backoff: 1s }}
"
    )
}

/// Inventory is down. reserve-stock gets no reply, so it is asked again and again (each wait
/// doubling from 1s); the saga keeps running, since silence is not an answer. Inventory comes
/// back after the step's 4s expiry: it refuses the reservation as `expired`, and the saga is
/// compensated with no stock taken.
async fn refused_after_its_expiry(backend: Backend) {
    let mut system = System::start(
        Options::new(backend)
            .label("expired")
            .without("inventory")
            .env("inventory", "INITIAL_STOCK", 10)
            .config_yaml(config(None, "1s", "4s")),
    )
    .await;
    let sku = unique_sku("kite");
    let id = system
        .start_checkout(&order("erin", 700, &[(&sku, 1)]))
        .await;
    let saga = system
        .wait_until(
            &id,
            Duration::from_secs(30),
            "ask reserve-stock 3 times",
            |s| count(s, "command_sent", "reserve-stock") >= 3,
        )
        .await;
    let show = pretty(&saga);
    assert_eq!(
        status(&saga),
        "running",
        "silence is not an answer:\n{show}"
    );
    assert!(events(&saga, "step_failed").is_empty(), "{show}");
    let expires_at = events(&saga, "command_sent")
        .iter()
        .filter(|e| e["step"] == "reserve-stock")
        .map(|e| e["expires_at"].clone())
        .collect::<Vec<_>>();
    assert!(
        expires_at
            .windows(2)
            .all(|w| w[0] == w[1] && !w[0].is_null()),
        "every attempt carries the first one's expiry: {expires_at:?}"
    );
    // Past the expiry (4s after the first attempt), with a margin for a loaded machine.
    system
        .wait_until(&id, Duration::from_secs(30), "run past its expiry", |s| {
            let started = chrono::DateTime::parse_from_rfc3339(
                s["history"][0]["recorded_at"].as_str().unwrap_or_default(),
            );
            started.is_ok_and(|t| chrono::Utc::now() > t + chrono::Duration::seconds(6))
        })
        .await;

    system.start_participant("inventory").await;
    let saga = system.wait_settled(&id, Duration::from_secs(120)).await;
    let show = pretty(&saga);
    assert_eq!(status(&saga), "compensated", "{show}");
    let reason = saga["compensation_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("reserve-stock") && reason.contains("expired"),
        "reason {reason:?}:\n{show}"
    );
    assert_eq!(
        position(&saga, "command_sent", "charge-payment"),
        None,
        "{show}"
    );
    assert_history_ordered(&saga);

    let books = system.books().await;
    let mine = books_of(&books, &id);
    assert_eq!(mine.orders.len(), 1, "{mine:?}");
    assert_eq!(mine.orders[0].status, "cancelled", "{mine:?}");
    assert!(
        mine.reservations.iter().all(|r| r.status == "released"),
        "{mine:?}"
    );
    assert!(mine.payments.is_empty(), "{mine:?}");
    assert!(
        matches!(available(&books, &sku), None | Some(10)),
        "{books:?}"
    );
    assert_books_balance(&books, Some(10));
}

/// Inventory is down while reserve-stock is asked several times, and comes back well within
/// the step's expiry: the saga completes with one reservation, whatever the number of attempts.
async fn back_within_its_expiry(backend: Backend) {
    let mut system = System::start(
        Options::new(backend)
            .label("back")
            .without("inventory")
            .env("inventory", "INITIAL_STOCK", 10)
            .config_yaml(config(None, "1s", "10m")),
    )
    .await;
    let sku = unique_sku("lamp");
    let id = system
        .start_checkout(&order("fay", 900, &[(&sku, 2)]))
        .await;
    system
        .wait_until(
            &id,
            Duration::from_secs(30),
            "ask reserve-stock 3 times",
            |s| count(s, "command_sent", "reserve-stock") >= 3,
        )
        .await;
    system.start_participant("inventory").await;
    let saga = system.wait_settled(&id, Duration::from_secs(120)).await;
    let show = pretty(&saga);
    assert_eq!(status(&saga), "completed", "{show}");
    for name in STEPS {
        assert_eq!(count(&saga, "step_completed", name), 1, "{name}:\n{show}");
    }
    assert!(
        step(&saga, "reserve-stock")["attempts"]
            .as_u64()
            .unwrap_or(0)
            >= 3,
        "{show}"
    );
    let books = system.books().await;
    let mine = books_of(&books, &id);
    assert_eq!(mine.reservations.len(), 1, "one reservation: {mine:?}");
    assert_eq!(available(&books, &sku), Some(8), "{books:?}");
    assert_books_balance(&books, Some(10));
}

/// A 2s deadline passes while reserve-stock waits (inventory down, a 30s step timeout): the
/// saga is compensated for the deadline, well before the step's own timeout.
async fn deadline(backend: Backend) {
    let mut system = System::start(
        Options::new(backend)
            .label("deadline")
            .without("inventory")
            .env("inventory", "INITIAL_STOCK", 10)
            .config_yaml(config(Some("2s"), "30s", "1m")),
    )
    .await;
    let sku = unique_sku("drum");
    let id = system
        .start_checkout(&order("frank", 800, &[(&sku, 2)]))
        .await;
    let saga = system
        .wait_until(&id, Duration::from_secs(10), "pass its deadline", |s| {
            s["status"] != "running"
        })
        .await;
    let show = pretty(&saga);
    assert_eq!(status(&saga), "compensating", "{show}");
    let reason = saga["compensation_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("deadline"), "reason {reason:?}:\n{show}");
    assert!(
        history_types(&saga)
            .iter()
            .any(|t| t == "deadline_exceeded"),
        "{show}"
    );
    assert!(
        events(&saga, "attempt_timed_out").is_empty(),
        "the deadline came first:\n{show}"
    );

    system.start_participant("inventory").await;
    let saga = system.wait_settled(&id, Duration::from_secs(30)).await;
    let show = pretty(&saga);
    assert_eq!(status(&saga), "compensated", "{show}");
    assert!(
        saga["compensation_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("deadline"),
        "{show}"
    );
    assert_eq!(step_status(&saga, "create-order"), "compensated", "{show}");
    assert_eq!(
        compensated_steps(&saga).last().map(String::as_str),
        Some("create-order"),
        "{show}"
    );
    assert_eq!(
        position(&saga, "command_sent", "charge-payment"),
        None,
        "{show}"
    );
    assert_history_ordered(&saga);

    let books = system.books().await;
    let mine = books_of(&books, &id);
    assert_eq!(mine.orders[0].status, "cancelled", "{mine:?}");
    assert!(
        mine.reservations.iter().all(|r| r.status == "released"),
        "{mine:?}"
    );
    assert!(mine.payments.is_empty(), "{mine:?}");
    assert!(
        matches!(available(&books, &sku), None | Some(10)),
        "{books:?}"
    );
    assert_books_balance(&books, Some(10));
}

saga_system::on_both_backends!(refused_after_its_expiry, back_within_its_expiry, deadline);
