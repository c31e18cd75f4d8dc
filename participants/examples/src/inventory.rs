//! `inventory`: reserves every item of the order at once, or none; releases the reservation
//! (compensation). Every SKU starts with `initial_stock` units the first time it is seen.

use std::collections::BTreeMap;

use saga_participant::sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr};
use saga_participant::{
    CommandExt, HandlerError, Outcome, Participant, StepCommand, failure, success,
};
use serde::Deserialize;
use serde_json::json;

use crate::CheckoutInput;
use crate::sql::{now, run_all, stmt};

pub const SERVICE: &str = "inventory";
/// Units of a SKU the first time it is seen, unless configured.
pub const DEFAULT_INITIAL_STOCK: i64 = 100;

/// The `inventory` participant; every new SKU starts with `initial_stock` units.
pub fn participant(initial_stock: i64) -> Participant {
    Participant::new(SERVICE)
        .migrations(|db| Box::pin(migrate(db)))
        .action("reserve", move |cmd, tx| {
            Box::pin(reserve(cmd, tx, initial_stock))
        })
        .compensation("release", |cmd, tx| Box::pin(release(cmd, tx)))
}

/// Creates the service's tables if missing.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    run_all(
        db,
        &[
            "CREATE TABLE IF NOT EXISTS stock (
                 sku TEXT PRIMARY KEY,
                 available BIGINT NOT NULL CHECK (available >= 0)
             )",
            "CREATE TABLE IF NOT EXISTS reservations (
                 reservation_id TEXT PRIMARY KEY,
                 saga_id TEXT NOT NULL UNIQUE,
                 status TEXT NOT NULL,
                 created_at TEXT NOT NULL,
                 updated_at TEXT NOT NULL
             )",
            "CREATE TABLE IF NOT EXISTS reservation_items (
                 reservation_id TEXT NOT NULL REFERENCES reservations (reservation_id),
                 sku TEXT NOT NULL,
                 quantity BIGINT NOT NULL,
                 PRIMARY KEY (reservation_id, sku)
             )",
        ],
    )
    .await
}

async fn reserve(
    cmd: &StepCommand,
    tx: &DatabaseTransaction,
    initial_stock: i64,
) -> Result<Outcome, HandlerError> {
    let input: CheckoutInput = match cmd.data_as() {
        Ok(input) => input,
        Err(err) => return Ok(failure(format!("invalid order: {err}"))),
    };
    // One line per SKU, in a fixed order (so two reservations lock rows in the same order).
    let mut wanted: BTreeMap<String, i64> = BTreeMap::new();
    for item in &input.items {
        if item.quantity <= 0 {
            return Ok(failure(format!(
                "invalid quantity {} for sku {}",
                item.quantity, item.sku
            )));
        }
        *wanted.entry(item.sku.clone()).or_default() += item.quantity;
    }
    let backend = tx.get_database_backend();
    let reservation_id = uuid::Uuid::new_v4().to_string();
    let at = now();
    tx.execute_raw(stmt(
        backend,
        "INSERT INTO reservations (reservation_id, saga_id, status, created_at, updated_at)
         VALUES (?, ?, 'reserved', ?, ?)",
        [
            reservation_id.clone().into(),
            cmd.saga_id.to_string().into(),
            at.clone().into(),
            at.into(),
        ],
    ))
    .await?;
    for (sku, quantity) in &wanted {
        tx.execute_raw(stmt(
            backend,
            "INSERT INTO stock (sku, available) VALUES (?, ?) ON CONFLICT (sku) DO NOTHING",
            [sku.clone().into(), initial_stock.into()],
        ))
        .await?;
        let taken = tx
            .execute_raw(stmt(
                backend,
                "UPDATE stock SET available = available - ? WHERE sku = ? AND available >= ?",
                [(*quantity).into(), sku.clone().into(), (*quantity).into()],
            ))
            .await?;
        if taken.rows_affected() == 0 {
            // The SDK rolls back what this handler wrote so far: nothing stays reserved.
            return Ok(failure(format!("insufficient stock for sku {sku}")));
        }
        tx.execute_raw(stmt(
            backend,
            "INSERT INTO reservation_items (reservation_id, sku, quantity) VALUES (?, ?, ?)",
            [
                reservation_id.clone().into(),
                sku.clone().into(),
                (*quantity).into(),
            ],
        ))
        .await?;
    }
    tracing::info!(%reservation_id, items = wanted.len(), "stock reserved");
    Ok(success(json!({ "reservation_id": reservation_id })))
}

#[derive(Deserialize)]
struct ReservationRef {
    reservation_id: Option<String>,
}

async fn release(cmd: &StepCommand, tx: &DatabaseTransaction) -> Result<Outcome, HandlerError> {
    let backend = tx.get_database_backend();
    // The reservation recorded for this saga, not the items in the data.
    let by_output = cmd
        .action_output_as::<ReservationRef>()
        .ok()
        .and_then(|r| r.reservation_id);
    let row = match by_output {
        Some(id) => {
            tx.query_one_raw(stmt(
                backend,
                "SELECT reservation_id, status FROM reservations WHERE reservation_id = ? AND saga_id = ?",
                [id.into(), cmd.saga_id.to_string().into()],
            ))
            .await?
        }
        None => {
            tx.query_one_raw(stmt(
                backend,
                "SELECT reservation_id, status FROM reservations WHERE saga_id = ?",
                [cmd.saga_id.to_string().into()],
            ))
            .await?
        }
    };
    let Some(row) = row else {
        tracing::warn!("no reservation for this saga: nothing to release");
        return Ok(success(json!({})));
    };
    let reservation_id: String = row.try_get("", "reservation_id")?;
    let status: String = row.try_get("", "status")?;
    if status != "reserved" {
        tracing::info!(%reservation_id, %status, "reservation already released");
        return Ok(success(json!({ "reservation_id": reservation_id })));
    }
    let items = tx
        .query_all_raw(stmt(
            backend,
            "SELECT sku, quantity FROM reservation_items WHERE reservation_id = ? ORDER BY sku",
            [reservation_id.clone().into()],
        ))
        .await?;
    for item in items {
        let sku: String = item.try_get("", "sku")?;
        let quantity: i64 = item.try_get("", "quantity")?;
        tx.execute_raw(stmt(
            backend,
            "UPDATE stock SET available = available + ? WHERE sku = ?",
            [quantity.into(), sku.into()],
        ))
        .await?;
    }
    tx.execute_raw(stmt(
        backend,
        "UPDATE reservations SET status = 'released', updated_at = ? WHERE reservation_id = ?",
        [now().into(), reservation_id.clone().into()],
    ))
    .await?;
    tracing::info!(%reservation_id, "reservation released");
    Ok(success(json!({ "reservation_id": reservation_id })))
}
