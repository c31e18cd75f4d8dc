//! A parallel step group through the broker: `order-checkout` with the stock reservation and
//! the payment sent at once. It completes when both succeed; when one fails, the other's
//! answer is awaited, then what completed is undone (the group's steps in reverse order of
//! completion) before the order is cancelled.

use std::time::Duration;

use saga_system::checkout::*;
use saga_system::{Backend, Options, System, pretty};

/// `order-checkout` with `reserve-stock` and `charge-payment` (compensatable here, refunded
/// on failure) in one group.
const CONFIG: &str = "sagas:
  - name: order-checkout
    steps:
      - name: create-order
        participant: orders
        action: create_order
        compensation: cancel_order
        timeout: 5s
      - parallel:
          - name: reserve-stock
            participant: inventory
            action: reserve
            compensation: release
            outputs: [reservation_id]
            timeout: 5s
          - name: charge-payment
            participant: payments
            action: charge
            compensation: refund
            outputs: [payment_id]
            timeout: 5s
      - name: schedule-shipment
        participant: shipping
        action: schedule
        kind: retriable
        timeout: 5s
        retry: { backoff: 200ms, max_backoff: 1s }
      - name: approve-order
        participant: orders
        action: approve_order
        kind: retriable
        timeout: 5s
        retry: { backoff: 200ms, max_backoff: 1s }
";

async fn system(backend: Backend, label: &str) -> System {
    System::start(
        Options::new(backend)
            .label(label)
            .env("payments", "PAYMENT_LIMIT", 10_000)
            .env("inventory", "INITIAL_STOCK", 20)
            .config_yaml(CONFIG),
    )
    .await
}

/// Both steps of the group are sent together, after the order and before the shipment.
async fn group_completes(backend: Backend) {
    let system = system(backend, "group-completes").await;
    let sku = unique_sku("desk");
    let id = system
        .start_checkout(&order("gil", 4_000, &[(&sku, 2)]))
        .await;
    let saga = system.wait_settled(&id, Duration::from_secs(60)).await;
    let show = pretty(&saga);
    assert_eq!(status(&saga), "completed", "{show}");
    assert_history_ordered(&saga);
    let created = position(&saga, "step_completed", "create-order").expect("order created");
    let reserve = position(&saga, "command_sent", "reserve-stock").expect("reserve sent");
    let charge = position(&saga, "command_sent", "charge-payment").expect("charge sent");
    assert_eq!(charge, reserve + 1, "sent together:\n{show}");
    let joined = position(&saga, "step_completed", "reserve-stock")
        .max(position(&saga, "step_completed", "charge-payment"))
        .expect("both completed");
    let shipped = position(&saga, "command_sent", "schedule-shipment").expect("shipment sent");
    assert!(
        created < reserve && joined < shipped,
        "fork after the order, join before the shipment:\n{show}"
    );
    assert!(saga["data"]["reservation_id"].is_string(), "{show}");
    assert!(saga["data"]["payment_id"].is_string(), "{show}");

    let books = system.books().await;
    let mine = books_of(&books, &id);
    assert_eq!(mine.reservations.len(), 1, "{mine:?}");
    assert_eq!(mine.payments.len(), 1, "{mine:?}");
    assert_eq!(mine.shipments.len(), 1, "{mine:?}");
    assert_books_balance(&books, Some(20));
}

/// The payment is declined while the stock is reserved: the reservation's answer is awaited,
/// then the stock released, then the order cancelled.
async fn group_fails(backend: Backend) {
    let system = system(backend, "group-fails").await;
    let sku = unique_sku("lamp");
    let id = system
        .start_checkout(&order("hal", 50_000, &[(&sku, 3)]))
        .await;
    let saga = system.wait_settled(&id, Duration::from_secs(60)).await;
    let show = pretty(&saga);
    assert_eq!(status(&saga), "compensated", "{show}");
    let reason = saga["compensation_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("charge-payment"), "{reason:?}:\n{show}");
    assert_eq!(step_status(&saga, "charge-payment"), "failed", "{show}");
    assert_eq!(step_status(&saga, "reserve-stock"), "compensated", "{show}");
    assert_eq!(step_status(&saga, "create-order"), "compensated", "{show}");
    assert_history_ordered(&saga);
    let started = history_types(&saga)
        .iter()
        .position(|t| t == "compensation_started")
        .expect("compensation_started");
    let reserved = position(&saga, "step_completed", "reserve-stock").expect("reserved");
    assert!(
        reserved < started,
        "the sibling's answer comes before compensation:\n{show}"
    );
    assert_eq!(
        compensated_steps(&saga),
        ["reserve-stock", "create-order"],
        "{show}"
    );

    let books = system.books().await;
    let mine = books_of(&books, &id);
    assert_eq!(mine.orders[0].status, "cancelled", "{mine:?}");
    assert_eq!(mine.reservations.len(), 1, "{mine:?}");
    assert!(
        mine.reservations.iter().all(|r| r.status == "released"),
        "{mine:?}"
    );
    assert!(mine.payments.is_empty(), "{mine:?}");
    assert!(mine.shipments.is_empty(), "{mine:?}");
    assert_eq!(available(&books, &sku), Some(20), "{books:?}");
    assert_books_balance(&books, Some(20));
}

/// The stock runs short while the payment goes through: the payment is refunded, then the
/// order cancelled.
async fn group_refunds(backend: Backend) {
    let system = system(backend, "group-refunds").await;
    let sku = unique_sku("vase");
    let id = system
        .start_checkout(&order("ida", 1_500, &[(&sku, 30)]))
        .await;
    let saga = system.wait_settled(&id, Duration::from_secs(60)).await;
    let show = pretty(&saga);
    assert_eq!(status(&saga), "compensated", "{show}");
    assert_eq!(step_status(&saga, "reserve-stock"), "failed", "{show}");
    assert_eq!(
        step_status(&saga, "charge-payment"),
        "compensated",
        "{show}"
    );
    assert_eq!(
        compensated_steps(&saga),
        ["charge-payment", "create-order"],
        "{show}"
    );
    assert_history_ordered(&saga);

    let books = system.books().await;
    let mine = books_of(&books, &id);
    assert_eq!(mine.payments.len(), 1, "{mine:?}");
    assert!(
        mine.payments.iter().all(|p| p.status == "refunded"),
        "{mine:?}"
    );
    assert_eq!(mine.orders[0].status, "cancelled", "{mine:?}");
    assert_books_balance(&books, Some(20));
}

saga_system::on_both_backends!(group_completes, group_fails, group_refunds);
