//! `orchestrator run`: wires the store, the runtime, the broker session and the HTTP API
//! together, supervises them, and stops them in order on SIGTERM.
//!
//! Every background task (the HTTP server, the timers, the broker session with the relay and
//! the consumers) runs under a [`Supervisor`]: one that stops, or panics, while the service is
//! not shutting down cancels the shutdown token, so the others stop too, and `serve` returns an
//! error naming it (the process exits non-zero for its supervisor to restart it). `/readyz`
//! reads [`Health`]: the broker connection as lapin sees it at that moment, and the stopped
//! tasks.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use anyhow::{Context, anyhow};
use saga_amqp::lapin::ConnectionStatus;
use saga_amqp::{AmqpError, Publisher, SecretUrl};
use saga_engine::Definitions;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::api::{self, ApiState};
use crate::auth::AuthConfig;
use crate::http::{self, HttpConfig};
use crate::metrics::Metrics;
use crate::runtime::Runtime;
use crate::store::{Store, StoreOptions};
use crate::timers::RepliesWaiting;
use crate::ui::UiConfig;
use crate::{consumers, presence, relay, retention, timers};

#[derive(Debug, Clone)]
pub struct ServiceConfig {
    pub amqp_url: SecretUrl,
    /// The type of every queue the orchestrator declares.
    pub queue_type: saga_amqp::QueueType,
    /// Which recorded events are published to `saga.events`.
    pub publish_events: crate::runtime::PublishEvents,
    /// The participants whose commands go packed, several to a message.
    pub pack_commands: relay::PackCommands,
    pub database_url: SecretUrl,
    /// PostgreSQL connections the orchestrator may hold (SQLite ignores it).
    pub database_pool_size: u32,
    pub http: SocketAddr,
    /// Shown in the RabbitMQ management UI.
    pub connection_name: String,
    pub prefetch: u16,
    /// Sagas in flight longer than this show in the `saga_long_running` gauge.
    pub long_running_threshold: std::time::Duration,
    /// How long the inbox keeps a handled reply's id (see [`crate::retention`]).
    pub inbox_retention: std::time::Duration,
    /// How an `amqps://` broker's certificate is checked.
    pub amqp_tls: saga_amqp::Tls,
    /// Who may use the HTTP API (see [`crate::auth`]).
    pub auth: AuthConfig,
    /// The RabbitMQ management UI's base URL, for the web view's links to queues.
    pub management_url: String,
}

/// The names of the supervised tasks, as `/readyz` and the exit error give them.
pub const HTTP_TASK: &str = "http";
pub const TIMERS_TASK: &str = "timers";
pub const RETENTION_TASK: &str = "inbox retention";
pub const BROKER_TASK: &str = "broker session";

/// What `/readyz` reports besides the database: whether the broker connection is open right
/// now, and which background tasks stopped. Cheap to clone; every clone is the same state.
#[derive(Clone, Default)]
pub struct Health {
    inner: Arc<HealthInner>,
}

#[derive(Default)]
struct HealthInner {
    /// The live status of the connection the current broker session runs on (lapin updates it
    /// the moment the connection closes); `None` between sessions.
    broker: Mutex<Option<ConnectionStatus>>,
    /// Tasks that stopped while the service was not shutting down, with why.
    stopped: Mutex<BTreeMap<String, String>>,
    /// Orchestrators with another database seen on this vhost, by name, when last seen.
    foreign: Mutex<BTreeMap<String, Instant>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere cannot leave these values half-written: keep using them.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

impl Health {
    pub fn new() -> Self {
        Health::default()
    }

    /// True while a broker session holds a connection that lapin sees as connected.
    pub fn broker_connected(&self) -> bool {
        lock(&self.inner.broker)
            .as_ref()
            .is_some_and(ConnectionStatus::connected)
    }

    /// Registers the connection a broker session runs on, once it is usable; the returned
    /// guard unregisters it when the session ends or is dropped (the supervisor drops a
    /// session whose connection it saw close). Between the two, readiness follows the
    /// connection's own status, which lapin updates the moment it closes.
    pub fn broker_session(&self, status: ConnectionStatus) -> BrokerSession {
        *lock(&self.inner.broker) = Some(status);
        BrokerSession {
            health: self.clone(),
        }
    }

    /// Records that `task` stopped, and why.
    pub fn task_stopped(&self, task: &str, why: impl Into<String>) {
        lock(&self.inner.stopped).insert(task.to_owned(), why.into());
    }

    /// The tasks that stopped while the service was running, with why, by name.
    pub fn stopped_tasks(&self) -> BTreeMap<String, String> {
        lock(&self.inner.stopped).clone()
    }

    /// Records a heartbeat from an orchestrator with another database; true when it is news
    /// (not seen within [`presence::FORGET_AFTER`]), so the caller says so once, not every beat.
    pub fn saw_foreign_orchestrator(&self, name: &str) -> bool {
        let now = Instant::now();
        let previous = lock(&self.inner.foreign).insert(name.to_owned(), now);
        previous.is_none_or(|seen| now.duration_since(seen) > presence::FORGET_AFTER)
    }

    /// Orchestrators with another database heard from recently on this vhost.
    pub fn foreign_orchestrators(&self) -> Vec<String> {
        let mut foreign = lock(&self.inner.foreign);
        foreign.retain(|_, seen| seen.elapsed() <= presence::FORGET_AFTER);
        foreign.keys().cloned().collect()
    }
}

/// A registered broker connection; see [`Health::broker_session`].
#[must_use = "the connection is unregistered when this is dropped"]
pub struct BrokerSession {
    health: Health,
}

impl Drop for BrokerSession {
    fn drop(&mut self) {
        *lock(&self.health.inner.broker) = None;
    }
}

/// Background tasks that must run for as long as the service does; see the module docs.
pub struct Supervisor {
    tasks: JoinSet<anyhow::Result<()>>,
    names: HashMap<tokio::task::Id, &'static str>,
    shutdown: CancellationToken,
    health: Health,
}

impl Supervisor {
    pub fn new(shutdown: CancellationToken, health: Health) -> Self {
        Supervisor {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            shutdown,
            health,
        }
    }

    /// Runs `task` until it returns; it should return only once `shutdown` is cancelled.
    pub fn spawn<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits for every task. The first that stops before shutdown (returning, with an error
    /// or without, or panicking) cancels the shutdown token, is recorded in [`Health`], and
    /// makes this return an error naming it once the others have stopped.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let mut failure: Option<anyhow::Error> = None;
        while let Some(joined) = self.tasks.join_next_with_id().await {
            let (id, result) = match joined {
                Ok((id, result)) => (id, result),
                Err(join_error) => {
                    let id = join_error.id();
                    let why = if join_error.is_panic() {
                        anyhow!("panicked: {}", panic_message(join_error.into_panic()))
                    } else {
                        anyhow!("was cancelled")
                    };
                    (id, Err(why))
                }
            };
            let name = self.names.get(&id).copied().unwrap_or("unnamed");
            if self.shutdown.is_cancelled() {
                match result {
                    Ok(()) => info!(task = name, "stopped"),
                    Err(error) => info!(
                        task = name,
                        error = format!("{error:#}"),
                        "stopped with an error during shutdown"
                    ),
                }
                continue;
            }
            let why = match result {
                Ok(()) => "ended while the service was running".to_owned(),
                Err(error) => format!("{error:#}"),
            };
            error!(task = name, reason = %why, "a background task stopped; shutting the service down");
            self.health.task_stopped(name, why.clone());
            failure.get_or_insert_with(|| anyhow!("the {name} task stopped: {why}"));
            self.shutdown.cancel();
        }
        match failure {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_owned()
    }
}

/// A running orchestrator; `serve` returns when `shutdown` is cancelled and everything has
/// stopped, or with an error when a background task stopped on its own.
pub async fn serve(
    definitions: Definitions,
    config: ServiceConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.auth.check_address(config.http)?;
    let options = StoreOptions {
        pool_size: config.database_pool_size,
    };
    let store = Store::connect_with(&config.database_url, options)
        .await
        .with_context(|| format!("cannot open the database at {}", config.database_url))?;
    info!(
        backend = store.backend_name(),
        "database ready; migrations applied"
    );
    let runtime = Runtime::open(definitions, store)
        .await?
        .publishing(config.publish_events);
    serve_runtime(runtime, config, shutdown).await
}

/// What the HTTP server serves: the API and the web view, behind the tokens of `auth`.
pub fn app(api: ApiState, ui: UiConfig, auth: &AuthConfig) -> axum::Router {
    let view = crate::ui::router(api.runtime.clone(), ui, auth.tokens.clone());
    crate::auth::protect(api::router(api).merge(view), auth)
}

/// Serves an already built runtime (the benchmark drives the same runtime directly). Unlike
/// [`serve`], it does not refuse an unauthenticated non-loopback address: check
/// [`AuthConfig::check_address`] first.
pub async fn serve_runtime(
    runtime: Runtime,
    config: ServiceConfig,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let in_flight = runtime.store().in_flight_ids().await?.len();
    info!(in_flight, "sagas to continue after start");
    let me = presence::Heartbeat {
        database_id: runtime.store().database_id().await?,
        orchestrator: config.connection_name.clone(),
    };

    let health = Health::new();
    let listener = tokio::net::TcpListener::bind(config.http)
        .await
        .with_context(|| format!("cannot listen on {}", config.http))?;
    info!(address = %listener.local_addr()?, "HTTP API listening");
    let api = ApiState {
        runtime: runtime.clone(),
        health: health.clone(),
        metrics: Metrics::install(config.long_running_threshold),
    };
    let ui = UiConfig::new(&config.management_url, config.amqp_url.expose());
    let app = app(api, ui, &config.auth);
    let mut tasks = Supervisor::new(shutdown.clone(), health.clone());
    tasks.spawn(HTTP_TASK, {
        let shutdown = shutdown.clone();
        async move {
            http::serve(listener, app, HttpConfig::default(), shutdown).await;
            Ok(())
        }
    });
    let replies_waiting = RepliesWaiting::default();
    tasks.spawn(TIMERS_TASK, {
        let (runtime, shutdown) = (runtime.clone(), shutdown.clone());
        let replies_waiting = replies_waiting.clone();
        async move {
            timers::run(runtime, replies_waiting, shutdown).await;
            Ok(())
        }
    });
    tasks.spawn(RETENTION_TASK, {
        let (store, shutdown) = (runtime.store().clone(), shutdown.clone());
        let retention = config.inbox_retention;
        async move {
            retention::run(store, retention, shutdown).await;
            Ok(())
        }
    });
    let topology = Topology {
        participants: runtime.participants(),
        queue_type: config.queue_type,
        prefetch: config.prefetch,
        pack_commands: config.pack_commands.clone(),
    };
    tasks.spawn(BROKER_TASK, {
        let shutdown = shutdown.clone();
        async move {
            saga_amqp::supervise(
                &config.amqp_url,
                config.amqp_tls.clone(),
                &config.connection_name,
                shutdown.clone(),
                move |conn| {
                    let runtime = runtime.clone();
                    let shutdown = shutdown.clone();
                    let topology = topology.clone();
                    let health = health.clone();
                    let me = me.clone();
                    let replies_waiting = replies_waiting.clone();
                    async move {
                        session(
                            runtime,
                            conn,
                            &topology,
                            me,
                            replies_waiting,
                            shutdown,
                            &health,
                        )
                        .await
                    }
                },
            )
            .await
            .context("the broker session failed")
        }
    });
    tasks.wait().await?;
    info!("stopped");
    Ok(())
}

/// What every broker session declares and consumes with.
#[derive(Clone)]
struct Topology {
    participants: Vec<String>,
    queue_type: saga_amqp::QueueType,
    prefetch: u16,
    pack_commands: relay::PackCommands,
}

/// Everything that needs the broker, on one connection: topology, relay, consumers.
async fn session(
    runtime: Runtime,
    conn: saga_amqp::lapin::Connection,
    topology: &Topology,
    me: presence::Heartbeat,
    replies_waiting: RepliesWaiting,
    shutdown: CancellationToken,
    health: &Health,
) -> Result<(), AmqpError> {
    let channel = conn.create_channel().await?;
    let names: Vec<&str> = topology.participants.iter().map(String::as_str).collect();
    saga_amqp::declare_orchestrator_topology(&channel, &names, topology.queue_type).await?;
    let prefetch = topology.prefetch;
    let relay_publisher = Publisher::open(&conn).await?;
    let relay_channel_owner = relay_publisher.clone();
    let dead_letters = Publisher::open(&conn).await?;
    let _registered = health.broker_session(conn.status().clone());
    info!("connected to the broker; topology declared");
    let result = tokio::try_join!(
        relay::run(
            runtime.clone(),
            relay_publisher,
            topology.pack_commands.clone(),
            shutdown.clone()
        ),
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
        presence::run(&conn, me, health, shutdown.clone()),
        consumers::watch_replies_waiting(&conn, replies_waiting, shutdown.clone()),
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// A task that runs until shutdown, as every real one does.
    async fn until_shutdown(shutdown: CancellationToken) -> anyhow::Result<()> {
        shutdown.cancelled().await;
        Ok(())
    }

    async fn within<T>(what: &str, future: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .unwrap_or_else(|_| panic!("{what} did not happen within 10 s"))
    }

    #[tokio::test]
    async fn a_task_that_panics_stops_the_service_with_an_error_naming_it() {
        let shutdown = CancellationToken::new();
        let health = Health::new();
        let mut tasks = Supervisor::new(shutdown.clone(), health.clone());
        tasks.spawn(HTTP_TASK, until_shutdown(shutdown.clone()));
        tasks.spawn(TIMERS_TASK, async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            panic!("the timer loop broke");
        });
        let error = within("the supervisor's return", tasks.wait())
            .await
            .expect_err("a dead task is an error");
        let message = format!("{error:#}");
        assert!(
            message.contains("timers") && message.contains("the timer loop broke"),
            "{message}"
        );
        assert!(shutdown.is_cancelled(), "the other tasks are told to stop");
        let stopped = health.stopped_tasks();
        assert_eq!(stopped.keys().collect::<Vec<_>>(), ["timers"]);
        assert!(stopped["timers"].contains("panicked"), "{stopped:?}");
    }

    #[tokio::test]
    async fn a_task_that_returns_before_shutdown_is_a_failure_too() {
        let shutdown = CancellationToken::new();
        let health = Health::new();
        let mut tasks = Supervisor::new(shutdown.clone(), health.clone());
        tasks.spawn(TIMERS_TASK, until_shutdown(shutdown.clone()));
        tasks.spawn(BROKER_TASK, async { Err(anyhow!("invalid URL")) });
        let error = within("the supervisor's return", tasks.wait())
            .await
            .expect_err("a task that ends early is an error");
        assert_eq!(
            format!("{error:#}"),
            "the broker session task stopped: invalid URL"
        );
        assert!(shutdown.is_cancelled());

        let shutdown = CancellationToken::new();
        let mut tasks = Supervisor::new(shutdown.clone(), Health::new());
        tasks.spawn(HTTP_TASK, async { Ok(()) });
        let error = within("the supervisor's return", tasks.wait())
            .await
            .expect_err("ending cleanly but early is an error");
        assert!(format!("{error}").contains("http task stopped: ended"));
    }

    #[tokio::test]
    async fn a_requested_shutdown_is_not_a_failure() {
        let shutdown = CancellationToken::new();
        let health = Health::new();
        let mut tasks = Supervisor::new(shutdown.clone(), health.clone());
        tasks.spawn(HTTP_TASK, until_shutdown(shutdown.clone()));
        tasks.spawn(TIMERS_TASK, {
            let shutdown = shutdown.clone();
            async move {
                shutdown.cancelled().await;
                Err(anyhow!("interrupted mid-batch"))
            }
        });
        shutdown.cancel();
        within("the supervisor's return", tasks.wait())
            .await
            .expect("stopping on request is success");
        assert!(health.stopped_tasks().is_empty());
    }

    #[test]
    fn without_a_session_the_broker_is_not_connected() {
        let health = Health::new();
        assert!(!health.broker_connected());
        // A connection that never opened (or closed) is not connected either.
        let session = health.broker_session(ConnectionStatus::default());
        assert!(!health.broker_connected());
        drop(session);
        assert!(!health.broker_connected());
    }
}
