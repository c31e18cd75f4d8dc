//! The wire contract: every message that crosses the broker, as Rust types.
//!
//! The JSON Schema files beside this crate (`schemas/json/`) are generated from these types
//! (`cargo run -p saga-schemas --bin generate-schemas`); a test fails when they drift apart.
//! `schemas/README.md` documents the AMQP mapping for participants written in other languages.

pub mod amqp;
pub mod definition;
pub mod generate;
pub mod limits;
mod messages;

pub use messages::*;

/// The version of the message contract. Carried in the `x-schema-version` header of every
/// message; a receiver dead-letters a message whose version it does not support.
pub const SCHEMA_VERSION: u32 = 1;
