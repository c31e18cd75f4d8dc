//! `payments`: charges the order's amount, declining anything above a limit; `refund` undoes a
//! charge (only used by a saga variant where the charge is compensatable; in `order-checkout`
//! the charge is the pivot and has no compensation).

use saga_participant::sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr};
use saga_participant::{
    CommandExt, HandlerError, Outcome, Participant, StepCommand, failure, success,
};
use serde::Deserialize;
use serde_json::json;

use crate::sql::{now, run_all, stmt};

pub const SERVICE: &str = "payments";
/// Charges above this many cents are declined, unless configured.
pub const DEFAULT_PAYMENT_LIMIT: i64 = 100_000;

/// The `payments` participant; amounts above `limit` cents are declined.
pub fn participant(limit: i64) -> Participant {
    Participant::new(SERVICE)
        .migrations(|db| Box::pin(migrate(db)))
        .action("charge", move |cmd, tx| Box::pin(charge(cmd, tx, limit)))
        .compensation("refund", |cmd, tx| Box::pin(refund(cmd, tx)))
}

/// Creates the service's tables if missing.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    run_all(
        db,
        &["CREATE TABLE IF NOT EXISTS payments (
               payment_id TEXT PRIMARY KEY,
               saga_id TEXT NOT NULL UNIQUE,
               customer TEXT NOT NULL,
               amount BIGINT NOT NULL,
               status TEXT NOT NULL,
               charged_at TEXT NOT NULL,
               refunded_at TEXT
           )"],
    )
    .await
}

#[derive(Deserialize)]
struct ChargeInput {
    customer: String,
    amount: i64,
}

async fn charge(
    cmd: &StepCommand,
    tx: &DatabaseTransaction,
    limit: i64,
) -> Result<Outcome, HandlerError> {
    let input: ChargeInput = match cmd.data_as() {
        Ok(input) => input,
        Err(err) => return Ok(failure(format!("invalid payment: {err}"))),
    };
    if input.amount < 0 {
        return Ok(failure(format!("invalid amount {}", input.amount)));
    }
    if input.amount > limit {
        tracing::info!(amount = input.amount, limit, "payment declined");
        return Ok(failure(format!(
            "payment declined: amount {} exceeds the limit of {limit}",
            input.amount
        )));
    }
    let payment_id = uuid::Uuid::new_v4().to_string();
    tx.execute_raw(stmt(
        tx.get_database_backend(),
        "INSERT INTO payments (payment_id, saga_id, customer, amount, status, charged_at)
         VALUES (?, ?, ?, ?, 'charged', ?)",
        [
            payment_id.clone().into(),
            cmd.saga_id.to_string().into(),
            input.customer.into(),
            input.amount.into(),
            now().into(),
        ],
    ))
    .await?;
    tracing::info!(%payment_id, amount = input.amount, "payment charged");
    Ok(success(json!({ "payment_id": payment_id })))
}

#[derive(Deserialize)]
struct PaymentRef {
    payment_id: String,
}

async fn refund(cmd: &StepCommand, tx: &DatabaseTransaction) -> Result<Outcome, HandlerError> {
    // What this step's own charge returned, even if a later step overwrote it in the data.
    let payment_id = match cmd.action_output_as::<PaymentRef>() {
        Ok(r) => r.payment_id,
        Err(err) => {
            // The SDK only runs a compensation after a successful charge, whose output has it.
            return Ok(failure(format!(
                "cannot refund: no payment_id in the action output ({err})"
            )));
        }
    };
    let refunded = tx
        .execute_raw(stmt(
            tx.get_database_backend(),
            "UPDATE payments SET status = 'refunded', refunded_at = ?
             WHERE payment_id = ? AND saga_id = ? AND status = 'charged'",
            [
                now().into(),
                payment_id.clone().into(),
                cmd.saga_id.to_string().into(),
            ],
        ))
        .await?;
    if refunded.rows_affected() == 0 {
        tracing::warn!(%payment_id, "no charged payment to refund");
    } else {
        tracing::info!(%payment_id, "payment refunded");
    }
    Ok(success(json!({ "payment_id": payment_id })))
}
