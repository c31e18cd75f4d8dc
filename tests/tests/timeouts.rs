//! Time: a step whose participant does not answer times out, and a saga past its deadline is
//! compensated. Both use a definition file of their own with short durations.

use std::time::Duration;

use saga_system::checkout::*;
use saga_system::{Backend, Options, System, pretty};

/// `order-checkout` with short timeouts, and `deadline` if given.
fn config(deadline: Option<&str>, reserve_timeout: &str, reserve_attempts: u32) -> String {
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
        retry: {{ max_attempts: {reserve_attempts}, backoff: 100ms }}
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

/// Inventory is down: reserve-stock gets no reply within 1s, twice, and fails; compensation
/// begins. A timed-out reservation may have happened, so its release is owed too: it waits in
/// the inventory queue until inventory comes back, then the saga is compensated and no stock
/// stays taken.
async fn step_timeout(backend: Backend) {
    let mut system = System::start(
        Options::new(backend)
            .label("step-timeout")
            .without("inventory")
            .env("inventory", "INITIAL_STOCK", 10)
            .config_yaml(config(None, "1s", 2)),
    )
    .await;
    let sku = unique_sku("kite");
    let id = system
        .start_checkout(&order("erin", 700, &[(&sku, 1)]))
        .await;
    let saga = system
        .wait_until(&id, Duration::from_secs(15), "start compensating", |s| {
            s["status"] == "compensating"
        })
        .await;
    let show = pretty(&saga);
    let timed_out: Vec<_> = events(&saga, "attempt_timed_out")
        .into_iter()
        .filter(|e| e["step"] == "reserve-stock" && e["direction"] == "execute")
        .collect();
    assert_eq!(timed_out.len(), 2, "both attempts timed out:\n{show}");
    assert_eq!(step(&saga, "reserve-stock")["attempts"], 2, "{show}");
    let reason = saga["compensation_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("reserve-stock") && reason.contains("no reply"),
        "reason {reason:?}:\n{show}"
    );
    assert_eq!(
        position(&saga, "command_sent", "charge-payment"),
        None,
        "{show}"
    );

    system.start_participant("inventory").await;
    let saga = system.wait_settled(&id, Duration::from_secs(30)).await;
    let show = pretty(&saga);
    assert_eq!(status(&saga), "compensated", "{show}");
    assert_eq!(
        compensated_steps(&saga),
        ["reserve-stock", "create-order"],
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

/// A 2s deadline passes while reserve-stock waits (inventory down, a 30s step timeout): the
/// saga is compensated for the deadline, well before the step's own timeout.
async fn deadline(backend: Backend) {
    let mut system = System::start(
        Options::new(backend)
            .label("deadline")
            .without("inventory")
            .env("inventory", "INITIAL_STOCK", 10)
            .config_yaml(config(Some("2s"), "30s", 1)),
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

saga_system::on_both_backends!(step_timeout, deadline);
