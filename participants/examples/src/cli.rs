//! What every example binary shares: its command line (each flag also read from the
//! environment), logging, and shutdown on SIGTERM or ctrl-c.

use clap::{Args, ValueEnum};
use saga_participant::{QueueType, SdkConfig, SecretUrl};

/// The flags every example binary takes.
#[derive(Debug, Clone, Args)]
pub struct CommonArgs {
    /// The broker; for the nodes of one cluster, repeat the flag or give a comma-separated
    /// list. The first node that answers is used, the next when it goes away.
    #[arg(long, env = "AMQP_URL", default_value = saga_participant::DEFAULT_AMQP_URL, hide_env_values = true,
          value_delimiter = ',', action = clap::ArgAction::Append)]
    pub amqp_url: Vec<SecretUrl>,
    /// The type of the queues declared: quorum (replicated; the default) or classic (for a
    /// broker that still has the classic queues of an older version). The same on every
    /// process of the system.
    #[arg(long, env = "QUEUE_TYPE", default_value_t = QueueType::Quorum)]
    pub queue_type: QueueType,
    /// A PEM file of CA certificates to trust for an `amqps://` broker, besides the built-in
    /// (Mozilla) roots: for a broker certificate signed by a private CA.
    #[arg(long, env = "AMQP_CA_FILE", value_name = "FILE")]
    pub amqp_ca_file: Option<std::path::PathBuf>,
    /// The service's own database: `sqlite://<file>?mode=rwc` or `postgres://...`
    /// [default: sqlite://<service>.db?mode=rwc].
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<SecretUrl>,
    /// PostgreSQL only: keep the service's tables in this schema (created if missing).
    #[arg(long, env = "DATABASE_SCHEMA")]
    pub database_schema: Option<String>,
    /// PostgreSQL only: the most database connections the service opens.
    #[arg(long, env = "DATABASE_POOL_SIZE", default_value_t = saga_participant::DEFAULT_DATABASE_POOL_SIZE,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub database_pool_size: u32,
    /// Commands taken at once (unacknowledged messages in flight).
    #[arg(long, env = "PREFETCH", default_value_t = saga_participant::DEFAULT_PREFETCH,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub prefetch: u16,
    /// Database transactions at once, each committing every command waiting when it started
    /// [default: 1 on SQLite, 4 on PostgreSQL].
    #[arg(long, env = "DATABASE_TRANSACTIONS", value_parser = clap::value_parser!(u32).range(1..))]
    pub database_transactions: Option<u32>,
    /// The AMQP connection name shown in the management UI [default: <service>@<host>:<pid>].
    #[arg(long, env = "CONNECTION_NAME")]
    pub connection_name: Option<String>,
    /// Threads that run the service's tasks: 1 runs them all on one thread, which on two cores
    /// shared with the broker and the database did the most sagas per second; more spreads
    /// them over that many threads, for handlers that compute a lot.
    #[arg(long, env = "RUNTIME_THREADS", default_value_t = 1,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub runtime_threads: u16,
    /// Log lines as text or as JSON objects.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Print the service's books (its tables) as JSON on stdout and exit, without connecting to
    /// the broker.
    #[arg(long)]
    pub report: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl CommonArgs {
    /// The SDK's configuration for `service`, with its defaults filled in.
    pub fn sdk_config(&self, service: &str) -> SdkConfig {
        SdkConfig {
            amqp_url: self.amqp_url.iter().cloned().collect(),
            queue_type: self.queue_type,
            database_url: self.database_url(service),
            database_schema: self.database_schema.clone().filter(|s| !s.is_empty()),
            database_pool_size: Some(self.database_pool_size),
            prefetch: self.prefetch,
            database_transactions: self.database_transactions,
            connection_name: self.connection_name.clone().filter(|s| !s.is_empty()),
            amqp_ca_file: self.amqp_ca_file.clone(),
        }
    }

    /// The database URL, or `sqlite://<service>.db?mode=rwc`.
    pub fn database_url(&self, service: &str) -> SecretUrl {
        self.database_url
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| saga_participant::default_database_url(service).into())
    }
}

/// The orchestrator's logging setup, compiled here too: one home for the `RUST_LOG` rules
/// (sqlx statements muted unless `RUST_LOG` names sqlx) and the JSON format.
#[path = "../../../orchestrator/service/src/telemetry.rs"]
#[allow(dead_code)] // `init` reads LOG_FORMAT itself; the examples take it as a flag.
mod telemetry;

/// Logs to stderr: `RUST_LOG` (default `info`; sqlx statements muted unless it names sqlx),
/// text or JSON lines; exports spans as `service` when an OTLP endpoint is configured.
pub fn init_tracing(format: LogFormat, service: &str) {
    telemetry::init_service_as(format == LogFormat::Json, service);
}

pub use saga_participant::shutdown_on_signal;

/// The body of every example binary, on a runtime of `--runtime-threads`: `--report` prints
/// the books, otherwise the participant runs until SIGTERM or ctrl-c.
pub fn main(
    service: crate::books::Service,
    common: &CommonArgs,
    participant: saga_participant::Participant,
) -> anyhow::Result<()> {
    saga_participant::async_runtime(common.runtime_threads.into())?.block_on(serve(
        service,
        common,
        participant,
    ))
}

async fn serve(
    service: crate::books::Service,
    common: &CommonArgs,
    participant: saga_participant::Participant,
) -> anyhow::Result<()> {
    if common.report {
        let db = saga_participant::connect_database(
            &common.database_url(service.name()),
            common.database_schema.as_deref().filter(|s| !s.is_empty()),
        )
        .await?;
        let books = crate::books::read(service, &db).await?;
        println!("{}", serde_json::to_string_pretty(&books)?);
        return Ok(());
    }
    init_tracing(common.log_format, service.name());
    let shutdown = shutdown_on_signal();
    let result = participant
        .run(common.sdk_config(service.name()), shutdown)
        .await;
    saga_amqp::trace::shutdown();
    result?;
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;
    use saga_participant::sea_orm::ConnectionTrait;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        common: CommonArgs,
    }

    #[test]
    fn the_pool_size_reaches_the_sdk() {
        let cli = Cli::try_parse_from(["payments", "--database-pool-size", "3"]).unwrap();
        assert_eq!(
            cli.common.sdk_config("payments").database_pool_size,
            Some(3)
        );
        assert!(Cli::try_parse_from(["payments", "--database-pool-size", "0"]).is_err());
    }

    #[test]
    fn the_broker_list_and_the_queue_type_reach_the_sdk() {
        let (a, b) = (
            "amqp://app:pw@rabbit1:5672/%2f",
            "amqp://app:pw@rabbit2:5672/%2f",
        );
        let cli = Cli::try_parse_from([
            "payments",
            "--amqp-url",
            a,
            "--amqp-url",
            b,
            "--queue-type",
            "classic",
        ])
        .unwrap();
        let config = cli.common.sdk_config("payments");
        assert_eq!(config.amqp_url.expose(), format!("{a},{b}"));
        assert_eq!(config.queue_type, QueueType::Classic);
    }

    #[test]
    fn printing_the_settings_never_shows_a_password() {
        let cli = Cli::try_parse_from([
            "payments",
            "--amqp-url",
            "amqp://app:amqp-pw@rabbit:5672/%2f",
            "--database-url",
            "postgres://app:db-pw@pg:5432/app",
        ])
        .unwrap();
        let shown = format!("{cli:?} {:?}", cli.common.sdk_config("payments"));
        assert!(
            !shown.contains("amqp-pw") && !shown.contains("db-pw"),
            "{shown}"
        );
        assert!(shown.contains("amqp://app:***@rabbit:5672/%2f"), "{shown}");
        assert!(shown.contains("postgres://app:***@pg:5432/app"), "{shown}");
    }

    /// The SDK opens the pool with the size given (PostgreSQL: `DATABASE_URL`).
    #[tokio::test]
    async fn the_postgres_pool_has_the_size_given() {
        let url = std::env::var("DATABASE_URL").expect(
            "set DATABASE_URL to a PostgreSQL server, e.g. \
             DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres (or run scripts/test)",
        );
        for (asked, expected) in [
            (Some(3), 3),
            (None, saga_participant::DEFAULT_DATABASE_POOL_SIZE),
        ] {
            let db = saga_participant::connect_with_pool(&url, None, asked)
                .await
                .expect("connect");
            db.execute_unprepared("SELECT 1").await.unwrap();
            let pool = db.get_postgres_connection_pool();
            assert_eq!(pool.options().get_max_connections(), expected);
            db.close().await.unwrap();
        }
    }
}
