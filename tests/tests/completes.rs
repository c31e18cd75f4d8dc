//! A saga that completes: every step done in order, their outputs in the saga data, the books
//! of all four services agreeing.

use std::time::Duration;

use saga_system::checkout::*;
use saga_system::{Backend, Options, System, pretty};

async fn completes(backend: Backend) {
    let system = System::start(Options::new(backend).label("completes").env(
        "inventory",
        "INITIAL_STOCK",
        10,
    ))
    .await;
    let sku = unique_sku("book");
    let input = order("alice", 2_500, &[(&sku, 2)]);
    let id = system.start_checkout(&input).await;
    let saga = system.wait_settled(&id, Duration::from_secs(30)).await;
    let show = pretty(&saga);

    assert_eq!(status(&saga), "completed", "{show}");
    assert_eq!(saga["name"], "order-checkout", "{show}");
    assert!(saga["compensation_reason"].is_null(), "{show}");
    for name in STEPS {
        let step = step(&saga, name);
        assert_eq!(step["status"], "completed", "step {name}:\n{show}");
        assert_eq!(step["attempts"], 1, "step {name}:\n{show}");
        assert_eq!(step["compensation_attempts"], 0, "step {name}:\n{show}");
    }

    // The input and every step's output are merged into the data.
    let data = &saga["data"];
    for key in ["customer", "amount", "items"] {
        assert_eq!(
            data[key], input[key],
            "input field {key} in the data:\n{show}"
        );
    }
    for key in ["order_id", "reservation_id", "payment_id", "shipment_id"] {
        assert!(data[key].is_string(), "no {key} in the data:\n{show}");
    }
    for name in STEPS {
        if let Some(output) = step(&saga, name)["output"].as_object() {
            for (key, value) in output {
                assert_eq!(
                    &data[key], value,
                    "output {key} of {name} in the data:\n{show}"
                );
            }
        }
    }

    // History: started, then each step sent and completed in order, then completed.
    assert_history_ordered(&saga);
    let mut last = 0;
    for name in STEPS {
        let sent = position(&saga, "command_sent", name)
            .unwrap_or_else(|| panic!("{name} never sent:\n{show}"));
        let done = position(&saga, "step_completed", name)
            .unwrap_or_else(|| panic!("{name} never completed:\n{show}"));
        assert!(last < sent && sent < done, "{name} out of order:\n{show}");
        assert_eq!(count(&saga, "step_completed", name), 1, "{show}");
        last = done;
    }
    let types = history_types(&saga);
    assert_eq!(
        types.last().map(String::as_str),
        Some("saga_completed"),
        "{show}"
    );
    assert!(
        !types.iter().any(|t| t.starts_with("compensation")),
        "{show}"
    );

    // The list endpoint shows it as completed.
    let listed = system
        .list_all("status=completed&name=order-checkout")
        .await;
    assert!(listed.iter().any(|s| s["id"] == id.as_str()), "{listed:?}");

    // Books: the order approved, stock reserved and shipped, the payment charged.
    let books = system.books().await;
    let mine = books_of(&books, &id);
    assert_eq!(mine.orders.len(), 1, "{mine:?}");
    assert_eq!(mine.orders[0].status, "approved", "{mine:?}");
    assert_eq!(mine.orders[0].amount, 2_500, "{mine:?}");
    assert_eq!(mine.reservations.len(), 1, "{mine:?}");
    assert_eq!(mine.reservations[0].status, "reserved", "{mine:?}");
    assert_eq!(mine.payments.len(), 1, "{mine:?}");
    assert_eq!(
        (mine.payments[0].status.as_str(), mine.payments[0].amount),
        ("charged", 2_500),
        "{mine:?}"
    );
    assert_eq!(mine.shipments.len(), 1, "{mine:?}");
    assert_eq!(available(&books, &sku), Some(8), "{books:?}");
    assert_books_balance(&books, Some(10));
}

saga_system::on_both_backends!(completes);
