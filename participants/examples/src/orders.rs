//! `orders`: creates the order (`pending`), cancels it (compensation), approves it once paid
//! and scheduled.

use saga_participant::sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr};
use saga_participant::{
    CommandExt, HandlerError, Outcome, Participant, StepCommand, failure, success,
};
use serde::Deserialize;
use serde_json::json;

use crate::CheckoutInput;
use crate::sql::{now, run_all, stmt};

pub const SERVICE: &str = "orders";

/// The `orders` participant.
pub fn participant() -> Participant {
    Participant::new(SERVICE)
        .migrations(|db| Box::pin(migrate(db)))
        .action("create_order", |cmd, tx| Box::pin(create_order(cmd, tx)))
        .compensation("cancel_order", |cmd, tx| Box::pin(cancel_order(cmd, tx)))
        .action("approve_order", |cmd, tx| Box::pin(approve_order(cmd, tx)))
}

/// Creates the service's tables if missing.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    run_all(
        db,
        &["CREATE TABLE IF NOT EXISTS orders (
               order_id TEXT PRIMARY KEY,
               saga_id TEXT NOT NULL UNIQUE,
               customer TEXT NOT NULL,
               amount BIGINT NOT NULL,
               items TEXT NOT NULL,
               status TEXT NOT NULL,
               created_at TEXT NOT NULL,
               updated_at TEXT NOT NULL
           )"],
    )
    .await
}

async fn create_order(
    cmd: &StepCommand,
    tx: &DatabaseTransaction,
) -> Result<Outcome, HandlerError> {
    let input: CheckoutInput = match cmd.data_as() {
        Ok(input) => input,
        Err(err) => return Ok(failure(format!("invalid order: {err}"))),
    };
    let order_id = uuid::Uuid::new_v4().to_string();
    let items = serde_json::to_string(&input.items)?;
    let at = now();
    tx.execute_raw(stmt(
        tx.get_database_backend(),
        "INSERT INTO orders (order_id, saga_id, customer, amount, items, status, created_at, updated_at)
         VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
        [
            order_id.clone().into(),
            cmd.saga_id.to_string().into(),
            input.customer.clone().into(),
            input.amount.into(),
            items.into(),
            at.clone().into(),
            at.into(),
        ],
    ))
    .await?;
    tracing::info!(%order_id, customer = %input.customer, amount = input.amount, "order created (pending)");
    Ok(success(json!({ "order_id": order_id })))
}

#[derive(Deserialize)]
struct OrderRef {
    order_id: Option<String>,
}

/// The order of this saga: by `order_id` in `from` if it has one, else by saga id.
async fn set_status(
    cmd: &StepCommand,
    tx: &DatabaseTransaction,
    order_id: Option<String>,
    from: &str,
    to: &str,
) -> Result<Result<String, String>, HandlerError> {
    let backend = tx.get_database_backend();
    let row = match &order_id {
        Some(id) => {
            tx.query_one_raw(stmt(
                backend,
                "SELECT order_id, status FROM orders WHERE order_id = ?",
                [id.clone().into()],
            ))
            .await?
        }
        None => {
            tx.query_one_raw(stmt(
                backend,
                "SELECT order_id, status FROM orders WHERE saga_id = ?",
                [cmd.saga_id.to_string().into()],
            ))
            .await?
        }
    };
    let Some(row) = row else {
        return Ok(Err("no order for this saga".into()));
    };
    let order_id: String = row.try_get("", "order_id")?;
    let status: String = row.try_get("", "status")?;
    if status == to {
        return Ok(Ok(order_id));
    }
    if status != from {
        return Ok(Err(format!("order {order_id} is {status}, not {from}")));
    }
    tx.execute_raw(stmt(
        backend,
        "UPDATE orders SET status = ?, updated_at = ? WHERE order_id = ?",
        [to.into(), now().into(), order_id.clone().into()],
    ))
    .await?;
    Ok(Ok(order_id))
}

async fn cancel_order(
    cmd: &StepCommand,
    tx: &DatabaseTransaction,
) -> Result<Outcome, HandlerError> {
    let order_id = cmd
        .action_output_as::<OrderRef>()
        .ok()
        .and_then(|r| r.order_id);
    match set_status(cmd, tx, order_id, "pending", "cancelled").await? {
        Ok(order_id) => {
            tracing::info!(%order_id, "order cancelled");
            Ok(success(json!({ "order_id": order_id })))
        }
        // Nothing to cancel (already gone): the compensation's goal holds.
        Err(why) => {
            tracing::warn!(%why, "nothing to cancel");
            Ok(success(json!({})))
        }
    }
}

async fn approve_order(
    cmd: &StepCommand,
    tx: &DatabaseTransaction,
) -> Result<Outcome, HandlerError> {
    let order_id = cmd.data_as::<OrderRef>().ok().and_then(|r| r.order_id);
    match set_status(cmd, tx, order_id, "pending", "approved").await? {
        Ok(order_id) => {
            tracing::info!(%order_id, "order approved");
            Ok(success(json!({ "order_status": "approved" })))
        }
        Err(why) => Ok(failure(format!("cannot approve: {why}"))),
    }
}
