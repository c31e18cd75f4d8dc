//! Reading each service's books (its own tables), for reports and end-to-end tests.
//!
//! ```text
//! let db = saga_participant::connect_database("sqlite://payments.db?mode=rwc", None).await?;
//! let payments = saga_examples::books::payments(&db).await?;
//! ```
//!
//! [`check`] cross-checks the four services' books for the `order-checkout` saga: every order
//! approved or cancelled, every charge belonging to an approved order or refunded, every
//! reservation shipped or released.

use std::collections::{BTreeMap, BTreeSet};

use saga_participant::sea_orm::{ConnectionTrait, DatabaseConnection, DbErr, QueryResult};
use serde::{Deserialize, Serialize};

use crate::Item;
use crate::sql::stmt;

/// One of the example services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Service {
    Orders,
    Inventory,
    Payments,
    Shipping,
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::Orders,
        Service::Inventory,
        Service::Payments,
        Service::Shipping,
    ];

    /// Its participant name (and default database file name).
    pub fn name(self) -> &'static str {
        match self {
            Service::Orders => crate::orders::SERVICE,
            Service::Inventory => crate::inventory::SERVICE,
            Service::Payments => crate::payments::SERVICE,
            Service::Shipping => crate::shipping::SERVICE,
        }
    }

    /// Creates its tables if missing (what the service does at start-up).
    pub async fn migrate(self, db: &DatabaseConnection) -> Result<(), DbErr> {
        match self {
            Service::Orders => crate::orders::migrate(db).await,
            Service::Inventory => crate::inventory::migrate(db).await,
            Service::Payments => crate::payments::migrate(db).await,
            Service::Shipping => crate::shipping::migrate(db).await,
        }
    }
}

/// A row of `orders`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub saga_id: String,
    pub customer: String,
    pub amount: i64,
    pub items: Vec<Item>,
    /// `pending`, `approved` or `cancelled`.
    pub status: String,
    pub created_at: String,
    pub updated_at: String,
}

/// A row of `stock`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stock {
    pub sku: String,
    pub available: i64,
}

/// A row of `reservations`, with its items.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    pub reservation_id: String,
    pub saga_id: String,
    /// `reserved` or `released`.
    pub status: String,
    pub items: Vec<Item>,
    pub created_at: String,
    pub updated_at: String,
}

/// A row of `payments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    pub payment_id: String,
    pub saga_id: String,
    pub customer: String,
    pub amount: i64,
    /// `charged` or `refunded`.
    pub status: String,
    pub charged_at: String,
    pub refunded_at: Option<String>,
}

/// A row of `shipments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipment {
    pub shipment_id: String,
    pub saga_id: String,
    pub order_id: Option<String>,
    pub customer: Option<String>,
    pub items: Vec<Item>,
    /// `scheduled`.
    pub status: String,
    pub scheduled_at: String,
}

/// Everything a service keeps, as `--report` prints it; only its own service's fields are set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Books {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orders: Option<Vec<Order>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stock: Option<Vec<Stock>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reservations: Option<Vec<Reservation>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payments: Option<Vec<Payment>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shipments: Option<Vec<Shipment>>,
}

impl Books {
    /// Merges the books of several services (as read from each of their databases).
    pub fn merge(mut self, other: Books) -> Books {
        self.orders = self.orders.or(other.orders);
        self.stock = self.stock.or(other.stock);
        self.reservations = self.reservations.or(other.reservations);
        self.payments = self.payments.or(other.payments);
        self.shipments = self.shipments.or(other.shipments);
        self
    }
}

/// Reads the books of `service` from its database (migrated or not: missing tables are
/// created first).
pub async fn read(service: Service, db: &DatabaseConnection) -> Result<Books, DbErr> {
    service.migrate(db).await?;
    let mut books = Books::default();
    match service {
        Service::Orders => books.orders = Some(orders(db).await?),
        Service::Inventory => {
            books.stock = Some(stock(db).await?);
            books.reservations = Some(reservations(db).await?);
        }
        Service::Payments => books.payments = Some(payments(db).await?),
        Service::Shipping => books.shipments = Some(shipments(db).await?),
    }
    Ok(books)
}

fn items(json: &str) -> Result<Vec<Item>, DbErr> {
    serde_json::from_str(json).map_err(|e| DbErr::Custom(format!("bad items JSON: {e}")))
}

async fn query(db: &DatabaseConnection, sql: &str) -> Result<Vec<QueryResult>, DbErr> {
    db.query_all_raw(stmt(db.get_database_backend(), sql, []))
        .await
}

/// Every order, oldest first.
pub async fn orders(db: &DatabaseConnection) -> Result<Vec<Order>, DbErr> {
    query(
        db,
        "SELECT order_id, saga_id, customer, amount, items, status, created_at, updated_at
         FROM orders ORDER BY created_at, order_id",
    )
    .await?
    .iter()
    .map(|r| {
        Ok(Order {
            order_id: r.try_get("", "order_id")?,
            saga_id: r.try_get("", "saga_id")?,
            customer: r.try_get("", "customer")?,
            amount: r.try_get("", "amount")?,
            items: items(&r.try_get::<String>("", "items")?)?,
            status: r.try_get("", "status")?,
            created_at: r.try_get("", "created_at")?,
            updated_at: r.try_get("", "updated_at")?,
        })
    })
    .collect()
}

/// Units available per SKU.
pub async fn stock(db: &DatabaseConnection) -> Result<Vec<Stock>, DbErr> {
    query(db, "SELECT sku, available FROM stock ORDER BY sku")
        .await?
        .iter()
        .map(|r| {
            Ok(Stock {
                sku: r.try_get("", "sku")?,
                available: r.try_get("", "available")?,
            })
        })
        .collect()
}

/// Every reservation with its items, oldest first.
pub async fn reservations(db: &DatabaseConnection) -> Result<Vec<Reservation>, DbErr> {
    let mut lines: BTreeMap<String, Vec<Item>> = BTreeMap::new();
    for r in query(
        db,
        "SELECT reservation_id, sku, quantity FROM reservation_items ORDER BY reservation_id, sku",
    )
    .await?
    {
        lines
            .entry(r.try_get("", "reservation_id")?)
            .or_default()
            .push(Item {
                sku: r.try_get("", "sku")?,
                quantity: r.try_get("", "quantity")?,
            });
    }
    query(
        db,
        "SELECT reservation_id, saga_id, status, created_at, updated_at
         FROM reservations ORDER BY created_at, reservation_id",
    )
    .await?
    .iter()
    .map(|r| {
        let reservation_id: String = r.try_get("", "reservation_id")?;
        Ok(Reservation {
            items: lines.remove(&reservation_id).unwrap_or_default(),
            reservation_id,
            saga_id: r.try_get("", "saga_id")?,
            status: r.try_get("", "status")?,
            created_at: r.try_get("", "created_at")?,
            updated_at: r.try_get("", "updated_at")?,
        })
    })
    .collect()
}

/// Every payment (charged or refunded), oldest first.
pub async fn payments(db: &DatabaseConnection) -> Result<Vec<Payment>, DbErr> {
    query(
        db,
        "SELECT payment_id, saga_id, customer, amount, status, charged_at, refunded_at
         FROM payments ORDER BY charged_at, payment_id",
    )
    .await?
    .iter()
    .map(|r| {
        Ok(Payment {
            payment_id: r.try_get("", "payment_id")?,
            saga_id: r.try_get("", "saga_id")?,
            customer: r.try_get("", "customer")?,
            amount: r.try_get("", "amount")?,
            status: r.try_get("", "status")?,
            charged_at: r.try_get("", "charged_at")?,
            refunded_at: r.try_get("", "refunded_at")?,
        })
    })
    .collect()
}

/// Every shipment, oldest first.
pub async fn shipments(db: &DatabaseConnection) -> Result<Vec<Shipment>, DbErr> {
    query(
        db,
        "SELECT shipment_id, saga_id, order_id, customer, items, status, scheduled_at
         FROM shipments ORDER BY scheduled_at, shipment_id",
    )
    .await?
    .iter()
    .map(|r| {
        Ok(Shipment {
            shipment_id: r.try_get("", "shipment_id")?,
            saga_id: r.try_get("", "saga_id")?,
            order_id: r.try_get("", "order_id")?,
            customer: r.try_get("", "customer")?,
            items: items(&r.try_get::<String>("", "items")?)?,
            status: r.try_get("", "status")?,
            scheduled_at: r.try_get("", "scheduled_at")?,
        })
    })
    .collect()
}

/// Cross-checks the books of all four services once every `order-checkout` saga has settled,
/// and returns every inconsistency found (empty when the books agree):
///
/// - every order is `approved` or `cancelled` (none left `pending`);
/// - an approved order has a `charged` payment, a `reserved` reservation and a shipment of its
///   saga;
/// - a cancelled order has no `charged` payment, no `reserved` reservation and no shipment;
/// - every charged payment belongs to an approved order, and every refunded one to a cancelled
///   order or to none;
/// - every reservation still `reserved` belongs to a saga with a shipment, every shipment to an
///   approved order;
/// - with `initial_stock`, the stock of every SKU plus its units still reserved adds up to it.
///
/// Fields of `books` left `None` (a service not read) are taken as empty.
pub fn check(books: &Books, initial_stock: Option<i64>) -> Vec<String> {
    let mut problems = Vec::new();
    let orders = books.orders.clone().unwrap_or_default();
    let reservations = books.reservations.clone().unwrap_or_default();
    let payments = books.payments.clone().unwrap_or_default();
    let shipments = books.shipments.clone().unwrap_or_default();

    let order_status: BTreeMap<&str, &str> = orders
        .iter()
        .map(|o| (o.saga_id.as_str(), o.status.as_str()))
        .collect();
    let charged: BTreeSet<&str> = payments
        .iter()
        .filter(|p| p.status == "charged")
        .map(|p| p.saga_id.as_str())
        .collect();
    let reserved: BTreeSet<&str> = reservations
        .iter()
        .filter(|r| r.status == "reserved")
        .map(|r| r.saga_id.as_str())
        .collect();
    let shipped: BTreeSet<&str> = shipments.iter().map(|s| s.saga_id.as_str()).collect();

    for order in &orders {
        let saga = order.saga_id.as_str();
        match order.status.as_str() {
            "approved" => {
                if !charged.contains(saga) {
                    problems.push(format!(
                        "order {} (saga {saga}) is approved but not charged",
                        order.order_id
                    ));
                }
                if !reserved.contains(saga) {
                    problems.push(format!(
                        "order {} (saga {saga}) is approved but has no stock reserved",
                        order.order_id
                    ));
                }
                if !shipped.contains(saga) {
                    problems.push(format!(
                        "order {} (saga {saga}) is approved but not shipped",
                        order.order_id
                    ));
                }
            }
            "cancelled" => {
                if charged.contains(saga) {
                    problems.push(format!(
                        "order {} (saga {saga}) is cancelled but charged",
                        order.order_id
                    ));
                }
                if reserved.contains(saga) {
                    problems.push(format!(
                        "order {} (saga {saga}) is cancelled but its stock is still reserved",
                        order.order_id
                    ));
                }
                if shipped.contains(saga) {
                    problems.push(format!(
                        "order {} (saga {saga}) is cancelled but shipped",
                        order.order_id
                    ));
                }
            }
            other => problems.push(format!("order {} (saga {saga}) is {other}", order.order_id)),
        }
    }
    for payment in &payments {
        let status = order_status.get(payment.saga_id.as_str()).copied();
        match (payment.status.as_str(), status) {
            ("charged", Some("approved")) | ("refunded", Some("cancelled") | None) => {}
            (s, o) => problems.push(format!(
                "payment {} (saga {}) is {s} but its order is {}",
                payment.payment_id,
                payment.saga_id,
                o.unwrap_or("missing")
            )),
        }
    }
    for reservation in &reservations {
        if reservation.status == "reserved" && !shipped.contains(reservation.saga_id.as_str()) {
            problems.push(format!(
                "reservation {} (saga {}) is neither shipped nor released",
                reservation.reservation_id, reservation.saga_id
            ));
        }
    }
    for shipment in &shipments {
        if order_status.get(shipment.saga_id.as_str()) != Some(&"approved") {
            problems.push(format!(
                "shipment {} (saga {}) does not belong to an approved order",
                shipment.shipment_id, shipment.saga_id
            ));
        }
    }
    if let (Some(initial), Some(stock)) = (initial_stock, &books.stock) {
        let mut held: BTreeMap<&str, i64> = BTreeMap::new();
        for reservation in reservations.iter().filter(|r| r.status == "reserved") {
            for item in &reservation.items {
                *held.entry(item.sku.as_str()).or_default() += item.quantity;
            }
        }
        for row in stock {
            let total = row.available + held.get(row.sku.as_str()).copied().unwrap_or(0);
            if total != initial {
                problems.push(format!(
                    "sku {}: {} available + {} reserved = {total}, not the initial {initial}",
                    row.sku,
                    row.available,
                    held.get(row.sku.as_str()).copied().unwrap_or(0)
                ));
            }
        }
    }
    problems
}
