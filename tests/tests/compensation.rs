//! Business failures before the pivot: the steps done are compensated in reverse order.

use std::time::Duration;

use saga_system::checkout::*;
use saga_system::{Backend, Options, System, pretty};

/// The payment is declined (amount above the limit): the stock is released, then the order
/// cancelled; nothing is charged or shipped.
async fn declined_payment(backend: Backend) {
    let system = System::start(
        Options::new(backend)
            .label("declined")
            .env("payments", "PAYMENT_LIMIT", 10_000)
            .env("inventory", "INITIAL_STOCK", 20),
    )
    .await;
    let sku = unique_sku("lamp");
    let id = system
        .start_checkout(&order("bob", 50_000, &[(&sku, 3)]))
        .await;
    let saga = system.wait_settled(&id, Duration::from_secs(30)).await;
    let show = pretty(&saga);

    assert_eq!(status(&saga), "compensated", "{show}");
    let reason = saga["compensation_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("charge-payment") && reason.contains("declined"),
        "reason {reason:?}:\n{show}"
    );
    assert_eq!(step_status(&saga, "create-order"), "compensated", "{show}");
    assert_eq!(step_status(&saga, "reserve-stock"), "compensated", "{show}");
    assert_eq!(step_status(&saga, "charge-payment"), "failed", "{show}");
    assert_eq!(step_status(&saga, "schedule-shipment"), "pending", "{show}");
    assert_eq!(step_status(&saga, "approve-order"), "pending", "{show}");
    assert_eq!(
        step(&saga, "charge-payment")["attempts"],
        1,
        "a business failure is not retried:\n{show}"
    );

    // Reverse order: release before cancel, and both after the failure.
    assert_history_ordered(&saga);
    assert_eq!(
        compensated_steps(&saga),
        ["reserve-stock", "create-order"],
        "{show}"
    );
    let failed = position(&saga, "step_failed", "charge-payment").expect("step_failed");
    let started = history_types(&saga)
        .iter()
        .position(|t| t == "compensation_started")
        .expect("compensation_started");
    let released = position(&saga, "step_compensated", "reserve-stock").unwrap();
    let cancelled = position(&saga, "step_compensated", "create-order").unwrap();
    assert!(
        failed < started && started < released && released < cancelled,
        "{show}"
    );
    let compensations: Vec<String> = events(&saga, "command_sent")
        .iter()
        .filter(|e| e["direction"] == "compensate")
        .map(|e| e["step"].as_str().unwrap_or("?").to_owned())
        .collect();
    assert_eq!(compensations, ["reserve-stock", "create-order"], "{show}");
    assert_eq!(
        position(&saga, "command_sent", "schedule-shipment"),
        None,
        "{show}"
    );
    assert_eq!(
        history_types(&saga).last().map(String::as_str),
        Some("saga_compensated"),
        "{show}"
    );

    let books = system.books().await;
    let mine = books_of(&books, &id);
    assert_eq!(mine.orders.len(), 1, "{mine:?}");
    assert_eq!(mine.orders[0].status, "cancelled", "{mine:?}");
    assert!(
        mine.reservations.iter().all(|r| r.status == "released"),
        "{mine:?}"
    );
    assert_eq!(mine.reservations.len(), 1, "{mine:?}");
    assert!(
        mine.payments.is_empty(),
        "a declined payment charges nothing: {mine:?}"
    );
    assert!(mine.shipments.is_empty(), "{mine:?}");
    assert_eq!(
        available(&books, &sku),
        Some(20),
        "the stock is back: {books:?}"
    );
    assert_books_balance(&books, Some(20));
}

/// Not enough stock (for one of two items): no unit stays reserved, the order is cancelled,
/// nothing is charged.
async fn short_stock(backend: Backend) {
    let system = System::start(Options::new(backend).label("short-stock").env(
        "inventory",
        "INITIAL_STOCK",
        5,
    ))
    .await;
    let plenty = unique_sku("cup");
    let scarce = unique_sku("vase");
    let id = system
        .start_checkout(&order("carol", 1_200, &[(&plenty, 2), (&scarce, 6)]))
        .await;
    let saga = system.wait_settled(&id, Duration::from_secs(30)).await;
    let show = pretty(&saga);

    assert_eq!(status(&saga), "compensated", "{show}");
    let reason = saga["compensation_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("reserve-stock") && reason.contains("stock"),
        "reason {reason:?}:\n{show}"
    );
    assert_eq!(step_status(&saga, "create-order"), "compensated", "{show}");
    assert_eq!(step_status(&saga, "reserve-stock"), "failed", "{show}");
    assert_eq!(step_status(&saga, "charge-payment"), "pending", "{show}");
    assert_eq!(
        compensated_steps(&saga),
        ["create-order"],
        "only the order needed undoing:\n{show}"
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
    assert!(mine.payments.is_empty(), "nothing charged: {mine:?}");
    assert!(mine.shipments.is_empty(), "{mine:?}");
    assert!(
        mine.reservations.iter().all(|r| r.status == "released"),
        "nothing stays reserved: {mine:?}"
    );
    for sku in [&plenty, &scarce] {
        assert!(
            matches!(available(&books, sku), None | Some(5)),
            "the stock of {sku} is untouched: {books:?}"
        );
    }
    assert_books_balance(&books, Some(5));
}

saga_system::on_both_backends!(declined_payment, short_stock);
