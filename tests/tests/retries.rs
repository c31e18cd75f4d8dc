//! Transient failures of a retriable step after the pivot: retried until they succeed, with
//! one effect in the books.

use std::time::Duration;

use saga_system::checkout::*;
use saga_system::{Backend, Options, System, pretty};

/// Shipping fails half of its attempts (retryable errors): every saga still completes, and the
/// retries show on the step and in the history.
async fn transient_shipping_failures(backend: Backend) {
    let system = System::start(Options::new(backend).label("retries").env(
        "shipping",
        "SHIPPING_FAILURE_RATE",
        0.5,
    ))
    .await;
    let sku = unique_sku("pen");
    let mut ids = Vec::new();
    let mut retried = Vec::new();
    // Which attempts fail depends on the saga id: a few sagas are enough for some to retry.
    for round in 0..3 {
        let mut batch = Vec::new();
        for i in 0..6 {
            let input = order(&format!("dan-{round}-{i}"), 900 + i, &[(&sku, 1)]);
            batch.push(system.start_checkout(&input).await);
        }
        let sagas = system
            .wait_all_settled(&batch, Duration::from_secs(60))
            .await;
        for saga in &sagas {
            let show = pretty(saga);
            assert_eq!(status(saga), "completed", "{show}");
            let shipment = step(saga, "schedule-shipment");
            assert_eq!(shipment["status"], "completed", "{show}");
            let attempts = shipment["attempts"].as_u64().unwrap_or(0);
            assert!(attempts >= 1, "{show}");
            let failures = count(saga, "attempt_failed", "schedule-shipment") as u64;
            assert_eq!(
                failures,
                attempts - 1,
                "every attempt but the last failed:\n{show}"
            );
            assert_eq!(
                count(saga, "retry_scheduled", "schedule-shipment") as u64,
                attempts - 1,
                "{show}"
            );
            assert_eq!(
                count(saga, "step_completed", "schedule-shipment"),
                1,
                "{show}"
            );
            assert!(
                saga["compensation_reason"].is_null(),
                "a retriable step never compensates:\n{show}"
            );
            assert_history_ordered(saga);
            if attempts > 1 {
                retried.push(saga.clone());
            }
        }
        ids.extend(batch);
        if !retried.is_empty() {
            break;
        }
    }
    assert!(
        !retried.is_empty(),
        "none of {} sagas retried schedule-shipment with SHIPPING_FAILURE_RATE=0.5",
        ids.len()
    );
    let books = system.books().await;
    for id in &ids {
        let mine = books_of(&books, id);
        assert_eq!(mine.shipments.len(), 1, "one shipment per saga: {mine:?}");
        assert_eq!(mine.orders.len(), 1, "{mine:?}");
        assert_eq!(mine.orders[0].status, "approved", "{mine:?}");
    }
    assert_books_balance(&books, Some(100));
}

saga_system::on_both_backends!(transient_shipping_failures);
