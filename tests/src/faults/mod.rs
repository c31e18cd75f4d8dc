//! The fault suite's machinery (`tests/tests/faults.rs`): a RabbitMQ node and a PostgreSQL
//! cluster of its own (started by `scripts/fault-services`), a load of `order-checkout` sagas
//! driven through the API while a fault happens, watchers that record what an operator would
//! see during the run, and the checks every scenario ends with.
//!
//! ```text
//! let mut run = Run::start("broker-outage", Backend::Sqlite, |o| o).await;
//! run.load(Duration::from_secs(20));
//! run.until(Duration::from_secs(6)).await;
//! ... the fault ...
//! run.finish().await;   // every saga terminal, effects once or not at all, no dead letters,
//!                       // metrics agree; prints the scenario's figures
//! ```
//!
//! - here: the services (`FAULT_*`), the definitions and the plan of sagas;
//! - `watch`: the load, and what runs beside it (the operator's view, a queue's depth,
//!   PostgreSQL starved of connections);
//! - `run`: a scenario and its checks.

mod run;
mod watch;

pub use run::{Counts, ExpiryCheck, Figures, MetricsCheck, Run, counts};
pub use watch::{
    Accepted, ApiUrls, Depth, LoadReport, Observed, Observer, QueueWatch, Starvation, spawn_load,
    starve_postgres,
};

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use saga_participant::sea_orm::sqlx::{self, Connection as _};
use serde_json::Value;

use crate::checkout::order;
use crate::env::{Management, TestEnv};
use crate::system::{Backend, CHECKOUT, Options};

/// What to do when the fault suite's services do not answer.
pub const RUN_FAULT_SERVICES: &str = "run `scripts/fault-services` as root first: it starts the \
     fault suite's own RabbitMQ node (AMQP 5673, management 15673) and PostgreSQL cluster (port \
     5433) and prints the FAULT_* variables; or point FAULT_AMQP_URL, FAULT_MANAGEMENT_URL, \
     FAULT_RABBIT_NODE, FAULT_DATABASE_URL and FAULT_PG_CLUSTER at services of your own that \
     the suite may stop and restart";

/// Sagas per scenario unless `FAULT_SAGAS` says otherwise: sized for CI.
pub const DEFAULT_SAGAS: usize = 120;

/// Every step's timeout in the suite's definitions: short, so that every fault outlasts it.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(2);
/// The payments participant declines amounts above this.
pub const PAYMENT_LIMIT: i64 = 100_000;
/// Units of every SKU; the hot SKU's orders take [`HOT_QUANTITY`] each, so most run out.
pub const INITIAL_STOCK: i64 = 10;
pub const HOT_QUANTITY: i64 = 3;
/// Share of shipping attempts that fail transiently (at most 3 per saga).
pub const SHIPPING_FAILURE_RATE: f64 = 0.3;

// --- the private services -------------------------------------------------------------------

/// The fault suite's RabbitMQ node and PostgreSQL cluster, from `FAULT_*` variables.
#[derive(Debug, Clone)]
pub struct FaultEnv {
    /// The services as a [`TestEnv`]: each system gets a vhost on the node and a database on
    /// the cluster.
    pub env: TestEnv,
    /// `FAULT_RABBIT_NODE`, for `rabbitmqctl -n`.
    pub node: String,
    /// `FAULT_PG_CLUSTER`, as (version, name) for `pg_ctlcluster`.
    pub pg_cluster: (String, String),
    /// `FAULT_SAGAS`.
    pub sagas: usize,
}

fn var(name: &str, default: &str) -> String {
    std::env::var(name)
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| default.to_owned())
}

impl FaultEnv {
    /// Reads `FAULT_AMQP_URL`, `FAULT_MANAGEMENT_URL`, `FAULT_RABBIT_NODE`,
    /// `FAULT_DATABASE_URL`, `FAULT_PG_CLUSTER` and `FAULT_SAGAS`, with the defaults of
    /// `scripts/fault-services`.
    pub fn from_env() -> anyhow::Result<FaultEnv> {
        let amqp_url = var("FAULT_AMQP_URL", "amqp://guest:guest@127.0.0.1:5673/%2f");
        let management_url = var("FAULT_MANAGEMENT_URL", "http://127.0.0.1:15673");
        let management = crate::env::management_from_url(&management_url, &amqp_url)
            .context("FAULT_MANAGEMENT_URL")?;
        let cluster = var("FAULT_PG_CLUSTER", &format!("{} faults", newest_postgres()));
        let pg_cluster = match cluster.split_whitespace().collect::<Vec<_>>()[..] {
            [version, name] => (version.to_owned(), name.to_owned()),
            _ => bail!("FAULT_PG_CLUSTER={cluster:?}: expected \"<version> <name>\""),
        };
        let sagas = var("FAULT_SAGAS", &DEFAULT_SAGAS.to_string());
        let sagas: usize = sagas
            .parse()
            .ok()
            .filter(|n| *n >= 10)
            .with_context(|| format!("FAULT_SAGAS={sagas:?}: expected a number, 10 or more"))?;
        Ok(FaultEnv {
            env: TestEnv {
                amqp_url,
                management: Some(management),
                postgres_url: Some(var(
                    "FAULT_DATABASE_URL",
                    "postgres://postgres@127.0.0.1:5433/postgres",
                )),
            },
            node: var("FAULT_RABBIT_NODE", "saga-faults@localhost"),
            pg_cluster,
            sagas,
        })
    }

    /// The services, answering. What an earlier scenario cut short may leave behind (the
    /// node's application stopped, the cluster stopped) is restarted first; anything else that
    /// does not answer fails the test with what to run. Never a silent skip.
    pub async fn ready() -> FaultEnv {
        let faults = FaultEnv::from_env().unwrap_or_else(|e| panic!("{e:#}"));
        let mut problems = faults.probe().await;
        if problems.is_empty() {
            return faults;
        }
        // Heal only what an earlier scenario cut short can leave behind; anything else fails
        // at once with what to run.
        let rabbit_down = problems.iter().any(|p| p.starts_with("RabbitMQ"));
        let node_answers = !problems.iter().any(|p| p.contains("(rabbitmqctl)"));
        let postgres_down = problems.iter().any(|p| p.starts_with("PostgreSQL"));
        let mut healing = true;
        if rabbit_down {
            // The node runs with its application stopped: a broker outage cut short.
            healing &= node_answers
                && !faults.rabbit_app_running().await
                && faults.rabbitmqctl(&["start_app"]).await.is_ok();
        }
        if postgres_down && healing {
            // The cluster is stopped: a restart cut short.
            healing &= faults.pg_ctlcluster("start").await.is_ok();
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while healing && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_secs(1)).await;
            problems = faults.probe().await;
            if problems.is_empty() {
                return faults;
            }
        }
        panic!(
            "the fault suite's services do not answer:\n  {}\n{RUN_FAULT_SERVICES}",
            problems.join("\n  ")
        );
    }

    /// What does not answer, one line each.
    async fn probe(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let amqp = tokio::time::timeout(
            Duration::from_secs(10),
            saga_amqp::connect(&self.env.amqp_url, "fault-suite-probe"),
        )
        .await;
        match amqp {
            Ok(Ok(connection)) => {
                let _ = connection.close(200, "probe".into()).await;
            }
            Ok(Err(e)) => problems.push(format!(
                "RabbitMQ at FAULT_AMQP_URL={}: {e}",
                self.env.amqp_url
            )),
            Err(_) => problems.push(format!(
                "RabbitMQ at FAULT_AMQP_URL={}: no answer within 10s",
                self.env.amqp_url
            )),
        }
        if !self.management().available().await {
            problems.push(format!(
                "RabbitMQ management API at FAULT_MANAGEMENT_URL={}: no answer",
                self.management().url
            ));
        }
        if let Err(e) = self.rabbitmqctl(&["ping", "--timeout", "10"]).await {
            problems.push(format!(
                "RabbitMQ node FAULT_RABBIT_NODE={} (rabbitmqctl): {e:#}",
                self.node
            ));
        }
        let pg = tokio::time::timeout(
            Duration::from_secs(10),
            sqlx::PgConnection::connect(self.postgres_url()),
        )
        .await;
        match pg {
            Ok(Ok(connection)) => {
                let _ = connection.close().await;
            }
            Ok(Err(e)) => problems.push(format!(
                "PostgreSQL at FAULT_DATABASE_URL={}: {e}",
                self.postgres_url()
            )),
            Err(_) => problems.push(format!(
                "PostgreSQL at FAULT_DATABASE_URL={}: no answer within 10s",
                self.postgres_url()
            )),
        }
        problems
    }

    pub fn management(&self) -> &Management {
        self.env.management.as_ref().expect("set by from_env")
    }

    pub fn postgres_url(&self) -> &str {
        self.env.postgres_url.as_deref().expect("set by from_env")
    }

    /// `rabbitmqctl -n <node> -q <args>`: its output, or an error with it.
    pub async fn rabbitmqctl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut command = tokio::process::Command::new("rabbitmqctl");
        command.arg("-n").arg(&self.node).arg("-q").args(args);
        run(
            command,
            &format!("rabbitmqctl -n {} {}", self.node, args.join(" ")),
        )
        .await
    }

    /// Whether the node's application runs (`rabbitmq-diagnostics check_running`).
    async fn rabbit_app_running(&self) -> bool {
        let mut command = tokio::process::Command::new("rabbitmq-diagnostics");
        command
            .arg("-n")
            .arg(&self.node)
            .args(["-q", "check_running"]);
        run(command, "rabbitmq-diagnostics check_running")
            .await
            .is_ok()
    }

    /// `pg_ctlcluster <version> <name> <action>` (`restart`, `start`, ...).
    pub async fn pg_ctlcluster(&self, action: &str) -> anyhow::Result<String> {
        let (version, name) = &self.pg_cluster;
        let mut command = tokio::process::Command::new("pg_ctlcluster");
        command
            .arg("--skip-systemctl-redirect")
            .args([version, name, action]);
        run(command, &format!("pg_ctlcluster {version} {name} {action}")).await
    }
}

/// The newest PostgreSQL installed (`/usr/lib/postgresql/<version>`), as `scripts/fault-services`
/// picks it; 15 when none is found.
fn newest_postgres() -> String {
    std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .max()
        .unwrap_or(15)
        .to_string()
}

async fn run(mut command: tokio::process::Command, what: &str) -> anyhow::Result<String> {
    command
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(120), command.output())
        .await
        .with_context(|| format!("{what}: no answer within 120s"))?
        .with_context(|| format!("{what}: cannot run it"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        bail!("{what}: {}: {}", output.status, text.trim());
    }
    Ok(text)
}

/// Starts the node's application again if it is dropped while armed: a broker-outage scenario
/// that fails half-way leaves the node running for the next one.
pub struct StartAppOnDrop {
    node: String,
    pub armed: bool,
}

impl StartAppOnDrop {
    pub fn new(faults: &FaultEnv) -> Self {
        StartAppOnDrop {
            node: faults.node.clone(),
            armed: true,
        }
    }
}

impl Drop for StartAppOnDrop {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::process::Command::new("rabbitmqctl")
                .args(["-n", &self.node, "-q", "start_app"])
                .stdin(std::process::Stdio::null())
                .output();
        }
    }
}

// --- definitions, inputs -------------------------------------------------------------------

/// `order-checkout` with every timeout [`STEP_TIMEOUT`] and expiries of 2 minutes, except
/// `create_order_expiry` on `create-order`. No deadline: only the expiries bound the sagas.
pub fn definitions(create_order_expiry: &str) -> String {
    let timeout = format!("{}s", STEP_TIMEOUT.as_secs());
    format!(
        "sagas:
  - name: {CHECKOUT}
    description: order-checkout with short timeouts, for the fault suite
    steps:
      - name: create-order
        participant: orders
        action: create_order
        compensation: cancel_order
        timeout: {timeout}
        expiry: {create_order_expiry}
      - name: reserve-stock
        participant: inventory
        action: reserve
        compensation: release
        timeout: {timeout}
        expiry: 2m
      - name: charge-payment
        participant: payments
        action: charge
        kind: pivot
        timeout: {timeout}
        expiry: 2m
      - name: schedule-shipment
        participant: shipping
        action: schedule
        kind: retriable
        timeout: {timeout}
        retry: {{ backoff: 200ms, max_backoff: 5s }}
      - name: approve-order
        participant: orders
        action: approve_order
        kind: retriable
        timeout: {timeout}
        retry: {{ backoff: 200ms, max_backoff: 5s }}
"
    )
}

/// How a saga of the plan must end, whatever the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// A valid order with stock enough: completed.
    Complete,
    /// Above the payment limit: compensated (declined, or earlier refused).
    Compensate,
    /// An order of the hot SKU: completed, or compensated for lack of stock.
    Either,
}

/// One saga of a scenario's load.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Its `Idempotency-Key`: a start request can be repeated safely while the API is down.
    pub key: String,
    pub input: Value,
    pub expect: Expect,
}

/// `n` sagas: every 9th declined (amount above [`PAYMENT_LIMIT`]), every 10th ordering
/// [`HOT_QUANTITY`] of one hot SKU (most run out of stock), the others a SKU of their own.
pub fn plan(label: &str, n: usize) -> Vec<Planned> {
    let run = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let hot = format!("HOT-{run}");
    (0..n)
        .map(|i| {
            let declined = i % 9 == 4;
            let hot_item = i % 10 == 7;
            let amount = if declined {
                PAYMENT_LIMIT + 1 + i as i64
            } else {
                1_000 + i as i64
            };
            let sku = if hot_item {
                hot.clone()
            } else {
                format!("STD-{run}-{i}")
            };
            let quantity = if hot_item { HOT_QUANTITY } else { 1 };
            Planned {
                key: format!("{label}-{run}-{i}"),
                input: order(&format!("customer-{i}"), amount, &[(&sku, quantity)]),
                expect: match (declined, hot_item) {
                    (true, _) => Expect::Compensate,
                    (false, true) => Expect::Either,
                    (false, false) => Expect::Complete,
                },
            }
        })
        .collect()
}

/// A system's options for the suite: the definitions, the payment limit, the stock, and
/// transient shipping failures.
pub fn options(label: &str, backend: Backend, definitions: String) -> Options {
    Options::new(backend)
        .label(label)
        .config_yaml(definitions)
        .env("payments", "PAYMENT_LIMIT", PAYMENT_LIMIT)
        .env("inventory", "INITIAL_STOCK", INITIAL_STOCK)
        .env("shipping", "SHIPPING_FAILURE_RATE", SHIPPING_FAILURE_RATE)
}

/// The database name of a PostgreSQL URL (what [`starve_postgres`] ends connections of).
pub fn database_name(url: &str) -> String {
    let path = url.split('?').next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn the_plan_mixes_outcomes() {
        let plan = plan("t", 100);
        let count = |e| plan.iter().filter(|p| p.expect == e).count();
        assert_eq!(count(Expect::Compensate), 11);
        assert_eq!(count(Expect::Either), 9);
        assert_eq!(count(Expect::Complete), 80);
        let keys: BTreeSet<&str> = plan.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys.len(), 100, "idempotency keys are unique");
        assert!(plan[4].input["amount"].as_i64().unwrap() > PAYMENT_LIMIT);
        assert_eq!(plan[7].input["items"][0]["quantity"], HOT_QUANTITY);
    }

    #[test]
    fn database_names() {
        assert_eq!(
            database_name("postgres://postgres@127.0.0.1:5433/saga_x_1"),
            "saga_x_1"
        );
        assert_eq!(database_name("postgres://h/db?sslmode=disable"), "db");
    }
}
