//! Connecting, and keeping a session alive across lost connections.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use futures_util::StreamExt;
use lapin::{Connection, ConnectionProperties, ConnectionStatus, DefaultConnectionBuilder};
use tokio_util::sync::CancellationToken;

use crate::{
    AmqpError, Tls,
    brokers::Brokers,
    error::{chain, redact_url},
};

/// First wait before reconnecting.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
/// Longest wait before reconnecting.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A session that ran this long before failing starts the backoff afresh.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// Longest wait for the connection handshake: a broker node that is starting or stopping may
/// accept the TCP connection and never answer, which must not hang a reconnect for ever.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How often a running session's connection is checked (besides lapin's connection events).
const CHECK_INTERVAL: Duration = Duration::from_millis(250);

/// Opens a connection to `url` (e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`) with the
/// client-provided name `connection_name`, shown in the management UI. `amqps://` URLs check
/// the broker against the built-in root CAs only: see [`connect_with_tls`] for a private CA.
/// lapin's automatic recovery stays off: see [`supervise`].
///
/// `url` may be a comma-separated list of the nodes of one cluster: they are tried in order,
/// each with the connect timeout, and the first that answers is used. A list is checked
/// first (no empty entry, one vhost for all); when no address answers, the error
/// ([`AmqpError::NoBrokerAnswered`]) gives each one's.
pub async fn connect(url: &str, connection_name: &str) -> Result<Connection, AmqpError> {
    connect_with_tls(url, connection_name, &Tls::default()).await
}

/// [`connect`], checking an `amqps://` broker's certificate against the roots of `tls`.
pub async fn connect_with_tls(
    url: &str,
    connection_name: &str,
    tls: &Tls,
) -> Result<Connection, AmqpError> {
    // A single URL is passed to lapin as it is, and fails as lapin says.
    if !url.contains(',') {
        return connect_one(url, connection_name, tls).await;
    }
    let brokers = Brokers::parse(url)?;
    let mut attempts = Vec::new();
    for broker in brokers.iter() {
        match connect_one(broker, connection_name, tls).await {
            Ok(conn) => return Ok(conn),
            Err(error) => attempts.push(format!("{}: {}", redact_url(broker), chain(&error))),
        }
    }
    Err(AmqpError::NoBrokerAnswered {
        attempts: attempts.join("; "),
    })
}

/// Connects to the single address `url`, within [`CONNECT_TIMEOUT`].
async fn connect_one(url: &str, connection_name: &str, tls: &Tls) -> Result<Connection, AmqpError> {
    let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
    let connecting = async {
        DefaultConnectionBuilder::new()?
            .with_uri_str(url.to_owned())
            .with_properties(properties)
            .with_tls_config(tls.lapin_config())
            .connect()
            .await
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        // rustls' words for a certificate it does not trust.
        Ok(Err(source)) if chain(&source).contains("invalid peer certificate") => {
            Err(AmqpError::UntrustedCertificate {
                url: redact_url(url),
                source,
            })
        }
        Ok(connected) => connected.map_err(|source| AmqpError::Connect {
            url: redact_url(url),
            source,
        }),
        Err(_) => Err(AmqpError::ConnectTimeout {
            url: redact_url(url),
            after: CONNECT_TIMEOUT,
        }),
    }
}

/// Runs `session(conn)` on a fresh connection to `url` (with `tls` for `amqps://`) named
/// `connection_name`, again and again: whenever the connection cannot be opened, the session
/// returns an error, or the connection drops under it (the session future is then dropped),
/// it logs a warning, waits (200 ms, doubling up to 5 s; back to 200 ms after a session that
/// ran at least 10 s) and starts again with a new connection, so the session rebuilds its
/// channels and consumers.
///
/// `url` may be a comma-separated list of the nodes of one cluster (checked at once: no empty
/// entry, one vhost for all). The session stays on the address that worked; after a failure
/// (its node went away, or it did not answer within the connect timeout) the next address of
/// the list is tried at once, round-robin, and the wait above comes only after as many
/// failures in a row as there are addresses (a whole round). Each connection is logged with
/// its address, password redacted.
///
/// Returns `Ok(())` when the session returns `Ok(())` (a clean shutdown), or when `shutdown`
/// is cancelled while connecting, waiting, or as a session ends. A running session is not
/// interrupted by `shutdown`: it should watch the token itself, finish its work and return
/// `Ok(())`. Returns an error only for a URL lapin cannot parse, or a bad list.
///
/// Dropping a session mid-flight is safe with manual acks: whatever it had not acked is
/// delivered again.
pub async fn supervise<F, Fut>(
    url: &str,
    tls: Tls,
    connection_name: &str,
    shutdown: CancellationToken,
    mut session: F,
) -> Result<(), AmqpError>
where
    F: FnMut(Connection) -> Fut,
    Fut: Future<Output = Result<(), AmqpError>>,
{
    let brokers = Brokers::parse(url)?;
    let mut delay = FIRST_BACKOFF;
    // The address to try next, and the failures since the last wait.
    let mut next = 0;
    let mut failures = 0;
    loop {
        if shutdown.is_cancelled() {
            return Ok(());
        }
        let address = next;
        let broker = brokers.url(address);
        let connected = tokio::select! {
            biased;
            () = shutdown.cancelled() => return Ok(()),
            connected = connect_one(broker, connection_name, &tls) => connected,
        };
        let failure = match connected {
            Err(error) => error,
            Ok(conn) => {
                let started = Instant::now();
                let status = conn.status().clone();
                let events = conn.events_listener();
                tracing::info!(
                    connection = connection_name,
                    broker = %redact_url(broker),
                    "connected to the broker"
                );
                let ended = tokio::select! {
                    result = session(conn) => result,
                    reason = connection_lost(status, events) => Err(AmqpError::ConnectionLost(reason)),
                };
                match ended {
                    Ok(()) => {
                        tracing::info!(connection = connection_name, "AMQP session ended cleanly");
                        return Ok(());
                    }
                    Err(error) => {
                        if shutdown.is_cancelled() {
                            tracing::info!(
                                connection = connection_name,
                                error = %chain(&error),
                                "AMQP session ended during shutdown"
                            );
                            return Ok(());
                        }
                        if started.elapsed() >= HEALTHY_SESSION {
                            delay = FIRST_BACKOFF;
                            failures = 0;
                        }
                        error
                    }
                }
            }
        };
        next = (address + 1) % brokers.len();
        failures += 1;
        // Another node of the list is tried at once; a whole round of failures waits.
        let wait = if failures >= brokers.len() {
            failures = 0;
            delay
        } else {
            Duration::ZERO
        };
        if matches!(failure, AmqpError::QueueMismatch { .. }) {
            // Not a passing fault: say so louder, and keep trying until an operator acts.
            tracing::error!(
                connection = connection_name,
                broker = %redact_url(broker),
                error = %failure,
                retry_in = ?wait,
                "cannot declare the queues; trying again until the broker's queue is fixed"
            );
        } else {
            tracing::warn!(
                connection = connection_name,
                broker = %redact_url(broker),
                error = %chain(&failure),
                retry_in = ?wait,
                "AMQP session failed; reconnecting"
            );
        }
        if !wait.is_zero() {
            tokio::select! {
                biased;
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
            delay = (delay * 2).min(MAX_BACKOFF);
        }
    }
}

/// Resolves when the connection is no longer open, with a description of why.
async fn connection_lost(
    status: ConnectionStatus,
    events: impl futures_util::Stream<Item = lapin::Event> + Send + 'static,
) -> String {
    let mut events = std::pin::pin!(events);
    let mut last_error = None;
    let mut tick = tokio::time::interval(CHECK_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if !status.connected() {
            let state = if status.errored() {
                "failed"
            } else if status.closed() {
                "closed"
            } else if status.closing() {
                "closing"
            } else if status.reconnecting() {
                "reconnecting"
            } else {
                "not connected"
            };
            return match last_error {
                Some(error) => format!("the connection is {state}: {error}"),
                None => format!("the connection is {state}"),
            };
        }
        tokio::select! {
            event = events.next() => match event {
                // A channel-level error is reported here too: only the status tells.
                Some(lapin::Event::Error(error)) => last_error = Some(chain(&error)),
                Some(_) => {}
                // The connection is gone; poll the status to say so.
                None => tokio::time::sleep(CHECK_INTERVAL).await,
            },
            _ = tick.tick() => {}
        }
    }
}

/// `<service>@<host>:<pid>`: which service and which instance, as the management UI shows
/// a connection.
pub fn default_connection_name(service: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into());
    format!("{service}@{host}:{}", std::process::id())
}

/// The async runtime every service binary runs on, with `threads` threads for its tasks.
///
/// One thread (the binaries' default) is a current-thread runtime: a service here waits on the
/// broker and the database far more than it computes, lapin reads and writes on a thread of
/// its own and SQLite runs on sqlx's, and with every task on one thread a message handed from
/// task to task wakes no other thread. On the benchmark's two cores, shared with the broker
/// and the database, that did 2-38% more sagas/s than a worker per core (README, "What each
/// setting costs"). More threads spread the tasks over a multi-thread runtime with that many
/// workers.
pub fn async_runtime(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut builder = tokio::runtime::Builder::new_multi_thread();
        builder.worker_threads(threads);
        builder
    };
    builder.enable_all().build()
}

/// A token cancelled on SIGTERM or Ctrl-C (SIGINT): what every service binary watches to stop
/// consuming, let in-flight work commit, and exit. Call it inside the tokio runtime.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    .expect("cannot listen for SIGTERM");
            tokio::select! {
                _ = ctrl_c => tracing::info!("ctrl-c: shutting down"),
                _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            }
        }
        #[cfg(not(unix))]
        {
            let _ = ctrl_c.await;
            tracing::info!("ctrl-c: shutting down");
        }
        cancel.cancel();
    });
    token
}

#[cfg(test)]
mod tests {
    use tokio::runtime::RuntimeFlavor;

    use super::async_runtime;

    #[test]
    fn one_thread_is_a_current_thread_runtime_and_more_are_that_many_workers() {
        // Given one thread, when the runtime is built, then every task runs on that thread
        let one = async_runtime(1).unwrap();
        assert_eq!(one.handle().runtime_flavor(), RuntimeFlavor::CurrentThread);
        assert_eq!(one.metrics().num_workers(), 1);
        // And the timers and I/O are enabled on it
        one.block_on(async { tokio::time::sleep(std::time::Duration::from_millis(1)).await });

        // Given three, then a multi-thread runtime with three workers
        let three = async_runtime(3).unwrap();
        assert_eq!(three.handle().runtime_flavor(), RuntimeFlavor::MultiThread);
        assert_eq!(three.metrics().num_workers(), 3);
    }
}
