//! `orchestrator run`: wires the store, the runtime, the broker session and the HTTP API
//! together, and stops them in order on SIGTERM.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context;
use saga_amqp::{AmqpError, Publisher};
use saga_engine::Definitions;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::api::{self, ApiState};
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::store::Store;
use crate::{consumers, relay, timers};

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub amqp_url: String,
    pub database_url: String,
    pub http: SocketAddr,
    /// Shown in the RabbitMQ management UI.
    pub connection_name: String,
    pub prefetch: u16,
    /// Sagas in flight longer than this show in the `saga_long_running` gauge.
    pub long_running_threshold: std::time::Duration,
}

/// A running orchestrator; `serve` returns when `shutdown` is cancelled and everything has
/// stopped.
pub async fn serve(
    definitions: Definitions,
    config: ServiceConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let store = Store::connect(&config.database_url)
        .await
        .with_context(|| {
            format!(
                "cannot open the database at {}",
                saga_amqp::redact_url(&config.database_url)
            )
        })?;
    info!(
        backend = store.backend_name(),
        "database ready; migrations applied"
    );
    let runtime = Runtime::new(definitions, store)?;
    serve_runtime(runtime, config, shutdown).await
}

/// Serves an already built runtime (the benchmark drives the same runtime directly).
pub async fn serve_runtime(
    runtime: Runtime,
    config: ServiceConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let in_flight = runtime.store().in_flight_ids().await?.len();
    info!(in_flight, "sagas to continue after start");

    let broker_connected = Arc::new(AtomicBool::new(false));
    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("cannot listen on {}", config.http))?;
    info!(address = %listener.local_addr()?, "HTTP API listening");
    let app = api::router(ApiState {
        runtime: runtime.clone(),
        broker_connected: broker_connected.clone(),
        metrics: Metrics::install(config.long_running_threshold),
    });
    let http = tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(shutdown.cancelled_owned())
                .await
        }
    });
    let timers = tokio::spawn(timers::run(runtime.clone(), shutdown.clone()));

    let session_runtime = runtime.clone();
    let session_shutdown = shutdown.clone();
    let participants: Vec<String> = runtime
        .definitions()
        .participants()
        .into_iter()
        .map(str::to_owned)
        .collect();
    let prefetch = config.prefetch;
    saga_amqp::supervise(
        &config.amqp_url,
        &config.connection_name,
        shutdown.clone(),
        move |conn| {
            let runtime = session_runtime.clone();
            let shutdown = session_shutdown.clone();
            let participants = participants.clone();
            let connected = broker_connected.clone();
            async move {
                let result =
                    session(runtime, conn, &participants, prefetch, shutdown, &connected).await;
                connected.store(false, Ordering::Relaxed);
                result
            }
        },
    )
    .await
    .context("broker session failed")?;

    timers.await.ok();
    http.await
        .context("HTTP server task")?
        .context("HTTP server")?;
    info!("stopped");
    Ok(())
}

/// Everything that needs the broker, on one connection: topology, relay, consumers.
async fn session(
    runtime: Runtime,
    conn: saga_amqp::lapin::Connection,
    participants: &[String],
    prefetch: u16,
    shutdown: CancellationToken,
    connected: &AtomicBool,
) -> Result<(), AmqpError> {
    let channel = conn.create_channel().await?;
    let names: Vec<&str> = participants.iter().map(String::as_str).collect();
    saga_amqp::declare_orchestrator_topology(&channel, &names).await?;
    let relay_publisher = Publisher::open(&conn).await?;
    let relay_channel_owner = relay_publisher.clone();
    let dead_letters = Publisher::open(&conn).await?;
    connected.store(true, Ordering::Relaxed);
    info!("connected to the broker; topology declared");
    let result = tokio::try_join!(
        relay::run(runtime.clone(), relay_publisher, shutdown.clone()),
        consumers::replies(
            runtime.clone(),
            &conn,
            &dead_letters,
            prefetch,
            shutdown.clone()
        ),
        consumers::starts(
            runtime.clone(),
            &conn,
            &dead_letters,
            prefetch,
            shutdown.clone()
        ),
    );
    if shutdown.is_cancelled() {
        for publisher in [&dead_letters, &relay_channel_owner] {
            publisher
                .channel()
                .close(200, "shutting down".into())
                .await
                .ok();
        }
        channel.close(200, "shutting down".into()).await.ok();
        conn.close(200, "shutting down".into()).await.ok();
    }
    result.map(drop)
}
