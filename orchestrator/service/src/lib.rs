//! The saga orchestrator service: the IO around the pure engine (`saga-engine`).
//!
//! - [`runtime`]: load state, decide, commit — the one place a saga moves;
//! - [`store`]: the event log, read model, outbox, inbox and timers in SQL (sea-orm);
//! - [`relay`]: publishes committed outbox rows with publisher confirms;
//! - [`consumers`]: the replies and start queues;
//! - [`timers`]: fires due step timeouts, retries and deadlines;
//! - [`retention`]: forgets handled replies' ids after the inbox's retention;
//! - [`api`]: the HTTP API; [`openapi`]: its OpenAPI document;
//! - [`auth`]: its bearer tokens and roles;
//! - [`metrics`]: Prometheus counters, histograms and gauges;
//! - [`presence`]: notices another orchestrator with another database on the same vhost;
//! - [`ui`]: the web view at `/ui`, over the same queries and commands as the API;
//! - [`service`]: wires them together for `orchestrator run`.

pub mod api;
pub mod auth;
mod cache;
pub mod consumers;
pub mod group_commit;
pub mod http;
pub mod metrics;
pub mod openapi;
pub mod presence;
pub mod relay;
pub mod retention;
pub mod runtime;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod timers;
pub mod ui;
