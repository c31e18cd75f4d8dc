//! Example participants of the `order-checkout` saga (see `orchestrator/sagas.yaml`), each a
//! binary of its own with its own database and tables:
//!
//! | Binary | Actions | Compensations | Tables |
//! | --- | --- | --- | --- |
//! | `orders` | `create_order`, `approve_order` | `cancel_order` | `orders` |
//! | `inventory` | `reserve` | `release` | `stock`, `reservations`, `reservation_items` |
//! | `payments` | `charge` | `refund` | `payments` |
//! | `shipping` | `schedule` | – | `shipments` |
//!
//! The modules hold each service's handlers and a reader of its books ([`books`]), so tests can
//! check what the services did without going through their binaries (each binary also prints its
//! books as JSON with `--report`).

pub mod books;
pub mod cli;
pub mod inventory;
pub mod orders;
pub mod payments;
pub mod shipping;
mod sql;

use serde::Deserialize;

/// The input of the `order-checkout` saga, as the handlers read it from the saga data.
#[derive(Debug, Clone, Deserialize)]
pub struct CheckoutInput {
    pub customer: String,
    /// In cents.
    pub amount: i64,
    pub items: Vec<Item>,
}

/// One line of an order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
}
