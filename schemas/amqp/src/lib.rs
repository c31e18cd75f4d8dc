//! The AMQP (RabbitMQ) binding of the saga wire contract, on [`lapin`] 4 and tokio.
//!
//! Shared by the orchestrator and the participant SDK; every name comes from
//! [`saga_schemas::amqp`], and `schemas/README.md` is the public description of what this crate
//! does on the wire.
//!
//! - [`connect`] opens a named connection; [`supervise`] keeps a session running on a fresh
//!   connection across broker restarts and dropped connections. `amqps://` URLs use rustls,
//!   with the root CAs of [`Tls`] (built-in, plus a private CA file). Both take a
//!   comma-separated list of the nodes of one cluster too, and use the first that answers.
//! - [`declare_orchestrator_topology`] / [`declare_participant_topology`] declare the exchanges
//!   and queues (idempotently, with exactly the arguments the README promises): quorum queues
//!   by default, classic as an option ([`QueueType`]).
//! - [`Publisher`] publishes [`OutgoingMessage`]s with publisher confirms and the `mandatory`
//!   flag, one at a time or pipelined.
//! - [`open_consumer`], [`decode`], [`ack`], [`dead_letter`] and the header helpers receive.
//!
//! Every error on a channel or connection is reported as an [`AmqpError`]; a session that gets
//! one should return it, so that [`supervise`] rebuilds the connection, its channels and its
//! consumers (a soft error closes the whole channel; lapin's own recovery is not used).

mod brokers;
mod error;
mod frame;
mod publish;
mod receive;
mod secret;
mod supervise;
mod tls;
mod topology;
pub mod trace;

/// The broker every binary uses by default: a local RabbitMQ, default vhost, guest user.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

pub use error::{AmqpError, redact_url};
pub use publish::{Publisher, properties};
pub use receive::{
    DecodeError, Received, ack, ack_all, dead_letter, dead_letter_part, dead_letter_undecodable,
    decode, decode_or_dead_letter, decode_pack, header_int, header_str, nack, open_consumer,
};
pub use secret::SecretUrl;
pub use supervise::{
    async_runtime, connect, connect_with_tls, default_connection_name, shutdown_on_signal,
    supervise,
};
pub use tls::Tls;
pub use topology::{
    QueueType, declare_dead_letter_exchange, declare_orchestrator_topology,
    declare_participant_topology, declare_queue_with_dead_letter, queue_arguments,
};

/// The lapin version this crate is built on, so callers name the same types.
pub use lapin;
/// Re-exported for convenience: the message data types of the contract.
pub use saga_schemas::amqp::{HeaderValue, OutgoingMessage};

/// Checks that `name` fits an AMQP short string (at most 255 bytes), the limit on exchange,
/// queue and routing key names, consumer tags and header keys.
pub(crate) fn short(name: &str, what: &str) -> Result<lapin::types::ShortString, AmqpError> {
    lapin::types::ShortString::try_new(name)
        .map_err(|e| AmqpError::Invalid(format!("{what} {name:?}: {e}")))
}
