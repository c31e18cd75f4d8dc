//! The `order-checkout` saga seen from outside: inputs, and reading a saga's view
//! (`GET /sagas/{id}`) in assertions.

use serde_json::{Value, json};

/// The steps of `order-checkout`, in order.
pub const STEPS: [&str; 5] = [
    "create-order",
    "reserve-stock",
    "charge-payment",
    "schedule-shipment",
    "approve-order",
];

/// An `order-checkout` input: `amount` in cents, `items` as (sku, quantity).
pub fn order(customer: &str, amount: i64, items: &[(&str, i64)]) -> Value {
    let items: Vec<Value> = items
        .iter()
        .map(|(sku, quantity)| json!({"sku": sku, "quantity": quantity}))
        .collect();
    json!({"customer": customer, "amount": amount, "items": items})
}

/// A SKU no other saga of the system uses (so its stock is the saga's alone).
pub fn unique_sku(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    )
}

/// The saga's status.
pub fn status(saga: &Value) -> &str {
    saga["status"].as_str().unwrap_or("?")
}

/// The history's event types, in order.
pub fn history_types(saga: &Value) -> Vec<String> {
    history(saga)
        .iter()
        .map(|e| e["type"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The history entries.
pub fn history(saga: &Value) -> Vec<Value> {
    saga["history"].as_array().cloned().unwrap_or_default()
}

/// The history entries of type `kind`.
pub fn events(saga: &Value, kind: &str) -> Vec<Value> {
    history(saga)
        .into_iter()
        .filter(|e| e["type"] == kind)
        .collect()
}

/// Position in the history of the first event of type `kind` about `step`.
pub fn position(saga: &Value, kind: &str, step: &str) -> Option<usize> {
    history(saga)
        .iter()
        .position(|e| e["type"] == kind && e["step"] == step)
}

/// The step view named `name`.
pub fn step<'a>(saga: &'a Value, name: &str) -> &'a Value {
    saga["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name} in {}", crate::pretty(saga)))
}

/// The step's status.
pub fn step_status<'a>(saga: &'a Value, name: &str) -> &'a str {
    step(saga, name)["status"].as_str().unwrap_or("?")
}

/// Checks that the history is numbered 1, 2, 3... without gaps, with times that never go back.
pub fn assert_history_ordered(saga: &Value) {
    let history = history(saga);
    assert!(
        !history.is_empty(),
        "empty history:\n{}",
        crate::pretty(saga)
    );
    let mut previous = None;
    for (i, entry) in history.iter().enumerate() {
        assert_eq!(
            entry["seq"].as_u64(),
            Some(i as u64 + 1),
            "history entry {i} is out of sequence:\n{}",
            crate::pretty(saga)
        );
        let at = entry["recorded_at"].as_str().unwrap_or_default();
        let at = chrono::DateTime::parse_from_rfc3339(at)
            .unwrap_or_else(|e| panic!("recorded_at {at:?} of entry {i}: {e}"));
        if let Some(previous) = previous {
            assert!(
                at >= previous,
                "history entry {i} was recorded before the one before it:\n{}",
                crate::pretty(saga)
            );
        }
        previous = Some(at);
    }
    assert_eq!(
        history[0]["type"],
        "saga_started",
        "{}",
        crate::pretty(saga)
    );
}

/// Steps compensated, in the order the history records them.
pub fn compensated_steps(saga: &Value) -> Vec<String> {
    events(saga, "step_compensated")
        .iter()
        .map(|e| e["step"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The number of `type` events about `step`.
pub fn count(saga: &Value, kind: &str, step: &str) -> usize {
    history(saga)
        .iter()
        .filter(|e| e["type"] == kind && e["step"] == step)
        .count()
}

/// What the participants' books hold about one saga.
#[derive(Debug, Clone, Default)]
pub struct SagaBooks {
    pub orders: Vec<saga_examples::books::Order>,
    pub reservations: Vec<saga_examples::books::Reservation>,
    pub payments: Vec<saga_examples::books::Payment>,
    pub shipments: Vec<saga_examples::books::Shipment>,
}

/// The rows of `books` that belong to saga `id`.
pub fn books_of(books: &saga_examples::books::Books, id: &str) -> SagaBooks {
    fn mine<T: Clone>(rows: &Option<Vec<T>>, saga: impl Fn(&T) -> &str, id: &str) -> Vec<T> {
        rows.iter()
            .flatten()
            .filter(|row| saga(row) == id)
            .cloned()
            .collect()
    }
    SagaBooks {
        orders: mine(&books.orders, |o| &o.saga_id, id),
        reservations: mine(&books.reservations, |r| &r.saga_id, id),
        payments: mine(&books.payments, |p| &p.saga_id, id),
        shipments: mine(&books.shipments, |s| &s.saga_id, id),
    }
}

/// Units of `sku` available (`None` when the SKU was never seen).
pub fn available(books: &saga_examples::books::Books, sku: &str) -> Option<i64> {
    books
        .stock
        .iter()
        .flatten()
        .find(|s| s.sku == sku)
        .map(|s| s.available)
}

/// Fails with the problems when [`saga_examples::books::check`] finds any.
pub fn assert_books_balance(books: &saga_examples::books::Books, initial_stock: Option<i64>) {
    let problems = saga_examples::books::check(books, initial_stock);
    assert!(
        problems.is_empty(),
        "the books do not balance:\n  {}\nbooks: {}",
        problems.join("\n  "),
        serde_json::to_string_pretty(books).unwrap_or_default()
    );
}
