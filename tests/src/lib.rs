//! System tests of the saga orchestrator with the example participants, run as the processes
//! they are in production, and the launcher the demo shares.
//!
//! - [`TestEnv`]: where RabbitMQ and PostgreSQL are (`AMQP_URL` and `DATABASE_URL`, or
//!   containers when a Docker engine is reachable, or a panic saying what to set).
//! - [`System`]: the orchestrator and the participants as child processes on a vhost, a
//!   database and a directory of the system's own, so tests run in parallel; dropping it stops
//!   the processes and removes all three (printing the logs when the test failed).
//! - [`checkout`]: inputs of the `order-checkout` saga and readers of its status view.
//! - [`faults`]: the fault suite's own services (`scripts/fault-services`), load, watchers and
//!   checks.
//! - [`cluster`]: the three-node RabbitMQ cluster (`scripts/rabbit-cluster`) whose nodes the
//!   cluster test kills.
//!
//! Every scenario runs on SQLite and on PostgreSQL: see [`on_both_backends!`].

pub mod amqp;
pub mod bins;
pub mod checkout;
pub mod cluster;
pub mod env;
pub mod faults;
pub mod management;
pub mod prometheus;
pub mod system;

pub use amqp::{Amqp, dead_letter_reason};
pub use env::{Management, TestEnv};
pub use system::{
    Backend, CHECKOUT, Config, ORCHESTRATOR, Options, PARTICIPANTS, System, VhostChoice,
    is_settled, pretty,
};

/// Declares, for each `async fn scenario(backend: Backend)` named, a module with two tests,
/// `scenario::sqlite` and `scenario::postgres`.
///
/// ```text
/// async fn completes(backend: Backend) { ... }
/// saga_system::on_both_backends!(completes);
/// ```
#[macro_export]
macro_rules! on_both_backends {
    ($($scenario:ident),+ $(,)?) => {
        $(
            mod $scenario {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$scenario($crate::Backend::Sqlite).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$scenario($crate::Backend::Postgres).await;
                }
            }
        )+
    };
}
