//! `shipping`: schedules the shipment. A retriable step: it never fails for business reasons,
//! but can be made to fail transiently (a retryable error) for a share of the attempts, chosen
//! by a hash of (saga id, attempt) so a run is reproducible.

use saga_participant::sea_orm::{ConnectionTrait, DatabaseConnection, DatabaseTransaction, DbErr};
use saga_participant::{CommandExt, HandlerError, Outcome, Participant, StepCommand, success};
use serde::Deserialize;
use serde_json::json;

use crate::Item;
use crate::sql::{now, run_all, stmt};

pub const SERVICE: &str = "shipping";

/// Simulated transient failures of the carrier.
#[derive(Debug, Clone, Copy)]
pub struct FailureInjection {
    /// The share of attempts that fail, from 0 (none) to 1 (every attempt up to
    /// `max_failures`).
    pub rate: f64,
    /// Attempts after this one always succeed, so the step eventually does.
    pub max_failures: u32,
}

impl Default for FailureInjection {
    fn default() -> Self {
        FailureInjection {
            rate: 0.0,
            max_failures: 3,
        }
    }
}

impl FailureInjection {
    /// Whether `attempt` of `saga_id` fails: deterministic.
    pub fn fails(&self, saga_id: uuid::Uuid, attempt: u32) -> bool {
        if self.rate <= 0.0 || attempt > self.max_failures {
            return false;
        }
        let key = uuid::Uuid::new_v5(&saga_id, format!("shipping-attempt-{attempt}").as_bytes());
        let n = u64::from_be_bytes(key.as_bytes()[..8].try_into().expect("16 bytes"));
        (n as f64 / u64::MAX as f64) < self.rate
    }
}

/// The `shipping` participant.
pub fn participant(failures: FailureInjection) -> Participant {
    Participant::new(SERVICE)
        .migrations(|db| Box::pin(migrate(db)))
        .action("schedule", move |cmd, tx| {
            Box::pin(schedule(cmd, tx, failures))
        })
}

/// Creates the service's tables if missing.
pub async fn migrate(db: &DatabaseConnection) -> Result<(), DbErr> {
    run_all(
        db,
        &["CREATE TABLE IF NOT EXISTS shipments (
               shipment_id TEXT PRIMARY KEY,
               saga_id TEXT NOT NULL UNIQUE,
               order_id TEXT,
               customer TEXT,
               items TEXT NOT NULL,
               status TEXT NOT NULL,
               scheduled_at TEXT NOT NULL
           )"],
    )
    .await
}

#[derive(Deserialize)]
struct ShipmentInput {
    order_id: Option<String>,
    customer: Option<String>,
    #[serde(default)]
    items: Vec<Item>,
}

async fn schedule(
    cmd: &StepCommand,
    tx: &DatabaseTransaction,
    failures: FailureInjection,
) -> Result<Outcome, HandlerError> {
    if failures.fails(cmd.saga_id, cmd.attempt) {
        tracing::warn!(attempt = cmd.attempt, "carrier unavailable (simulated)");
        return Err(HandlerError::retryable(format!(
            "carrier unavailable (simulated failure of attempt {})",
            cmd.attempt
        )));
    }
    // A retriable step cannot fail for business reasons: make do with whatever data there is.
    let input = cmd.data_as::<ShipmentInput>().unwrap_or(ShipmentInput {
        order_id: None,
        customer: None,
        items: Vec::new(),
    });
    let shipment_id = uuid::Uuid::new_v4().to_string();
    tx.execute_raw(stmt(
        tx.get_database_backend(),
        "INSERT INTO shipments (shipment_id, saga_id, order_id, customer, items, status, scheduled_at)
         VALUES (?, ?, ?, ?, ?, 'scheduled', ?)",
        [
            shipment_id.clone().into(),
            cmd.saga_id.to_string().into(),
            input.order_id.into(),
            input.customer.into(),
            serde_json::to_string(&input.items)?.into(),
            now().into(),
        ],
    ))
    .await?;
    tracing::info!(%shipment_id, "shipment scheduled");
    Ok(success(json!({ "shipment_id": shipment_id })))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_injection_is_deterministic_at_about_the_rate_and_bounded() {
        let inject = FailureInjection {
            rate: 0.3,
            max_failures: 3,
        };
        let sagas: Vec<uuid::Uuid> = (0..2000u32)
            .map(|i| uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, &i.to_be_bytes()))
            .collect();
        let failed = sagas.iter().filter(|s| inject.fails(**s, 1)).count();
        assert!((450..750).contains(&failed), "{failed} of 2000 at rate 0.3");
        for saga in &sagas {
            assert_eq!(inject.fails(*saga, 2), inject.fails(*saga, 2));
            assert!(
                !inject.fails(*saga, 4),
                "attempts after max_failures succeed"
            );
        }
        assert!(!FailureInjection::default().fails(sagas[0], 1));
        let always = FailureInjection {
            rate: 1.0,
            max_failures: 2,
        };
        assert!(
            always.fails(sagas[0], 1) && always.fails(sagas[0], 2) && !always.fails(sagas[0], 3)
        );
    }
}
